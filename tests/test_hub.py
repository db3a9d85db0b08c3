"""TexTok and DiT on the Hugging Face hub, offline: from_pretrained reads a repo id from the hub cache, a repo that is
not there is one InputError naming it and how to download it, and push_to_hub uploads the save_pretrained folder."""
import shutil

import huggingface_hub.hub_mixin
import pytest
import torch
from conftest import tiny_config

from dit import DiT, DiTConfig
from runtime.errors import MissingInput
from textok import TexTok


COMMIT = "0123456789abcdef0123456789abcdef01234567"


def hub_cache(folder, cache, repo_id):
    """Lays `folder` out as huggingface_hub's cache holds a downloaded snapshot of model repo `repo_id`."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    shutil.copytree(folder, repo / "snapshots" / COMMIT)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    return cache


def tiny_dit():
    return DiT(DiTConfig(num_tokens=8, in_channels=8, hidden_size=64, depth=1, num_heads=4, num_classes=8)).eval()


@pytest.mark.parametrize("make", [lambda: TexTok(tiny_config()).eval(), tiny_dit], ids=["textok", "dit"])
def test_from_pretrained_reads_a_repo_id_from_the_hub_cache(tmp_path, make):
    model = make()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))  # no two fresh models alike
    meta = {"tokenizer": "user/tok"} if isinstance(model, DiT) else None
    model.save_pretrained(tmp_path / "folder", *([meta] if meta else []))
    assert {"config.json", "model.safetensors"} <= {p.name for p in (tmp_path / "folder").iterdir()}
    cache = hub_cache(tmp_path / "folder", tmp_path / "cache", "user/tiny")
    loaded = type(model).from_pretrained("user/tiny", cache_dir=cache, local_files_only=True)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value, rtol=0, atol=0)
    if meta:
        assert loaded.meta == meta


@pytest.mark.parametrize("cls", [TexTok, DiT])
def test_a_repo_id_not_in_the_cache_is_one_line_naming_it(tmp_path, cls):
    with pytest.raises(MissingInput) as err:
        cls.from_pretrained("user/not-downloaded", cache_dir=tmp_path, local_files_only=True)
    message = str(err.value)
    assert message.startswith("user/not-downloaded: no such folder") and "hf download user/not-downloaded" in message
    assert "\n" not in message
    with pytest.raises(MissingInput, match=r"typo: no such folder$"):  # a local path: no hub look-up
        cls.from_pretrained(tmp_path / "typo")


def test_push_to_hub_uploads_the_save_pretrained_folder(tmp_path, monkeypatch):
    uploaded = {}

    class FakeApi:  # stands in for the network
        def __init__(self, token=None):
            pass

        def create_repo(self, repo_id, **kwargs):
            return type("Repo", (), {"repo_id": repo_id})

        def upload_folder(self, repo_id, folder_path, **kwargs):
            uploaded[repo_id] = {p.name: p.read_bytes() for p in folder_path.iterdir()}
            shutil.copytree(folder_path, tmp_path / "pushed")

    monkeypatch.setattr(huggingface_hub.hub_mixin, "HfApi", FakeApi)
    dit = tiny_dit()
    dit.meta = {"tokenizer": "user/tok"}
    dit.push_to_hub("user/dit")
    assert {"config.json", "model.safetensors", "README.md"} <= set(uploaded["user/dit"])
    loaded = DiT.from_pretrained(tmp_path / "pushed")
    assert loaded.meta == {"tokenizer": "user/tok"} and loaded.cfg == dit.cfg


def test_sample_takes_a_dit_repo_id(tmp_path, monkeypatch):
    """`sample.py --dit user/dit` reads the DiT (and the meta naming its tokenizer) from the hub cache."""
    import huggingface_hub.constants
    import numpy as np

    import sample
    from config import DiTTrainConfig, to_dict
    from dit import build_dit
    cfg = tiny_config()
    TexTok(cfg).save_pretrained(tmp_path / "tok")
    meta = {"task": "t2i", "num_classes": 8, "tokenizer": str(tmp_path / "tok"), "tokenizer_config": to_dict(cfg),
            "split": {"data": None, "val": None, "num_images": 64, "captions": "full"},
            "train": to_dict(DiTTrainConfig(model="DiT-T", sampling_steps=2))}
    build_dit("DiT-T", 0.1, cfg, "t2i", 8).save_pretrained(tmp_path / "dit", meta)
    cache = hub_cache(tmp_path / "dit", tmp_path / "hub", "user/dit")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    npz = sample.main(["--dit", "user/dit", "--num-samples", "2", "--batch-size", "2", "--out", str(tmp_path / "out"),
                       "--cache-dir", str(tmp_path / "cache")])
    assert np.load(npz)["arr_0"].shape == (2, 32, 32, 3)


@pytest.fixture
def no_network(monkeypatch):
    """Every attempt to reach a host, recorded and refused at once (as on a machine without network)."""
    import socket
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args[:2])
        raise OSError("network is unreachable (test)")
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    return attempts


@pytest.mark.parametrize("cls", [TexTok, DiT])
def test_a_repo_id_not_in_the_cache_fails_at_once_without_the_network(tmp_path, cls, no_network):
    """Without download=True, a repo id is looked up in the local cache only: one line, no network retries."""
    import time
    t0 = time.perf_counter()
    with pytest.raises(MissingInput) as err:
        cls.from_pretrained("user/not-downloaded", cache_dir=tmp_path)
    message = str(err.value)
    assert no_network == [] and time.perf_counter() - t0 < 2
    assert message.startswith("user/not-downloaded: no such folder") and "not in the local Hugging Face cache" in message
    assert "--download" in message and "hf download user/not-downloaded" in message and "\n" not in message


def test_download_true_asks_the_hub(tmp_path, monkeypatch):
    import huggingface_hub
    asked = []

    def fake_download(repo_id, filename, **kwargs):
        asked.append((repo_id, filename, kwargs.get("local_files_only")))
        (tmp_path / "snapshot").mkdir(exist_ok=True)
        return str(tmp_path / "snapshot" / filename)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    from runtime.hub import pretrained_folder
    assert pretrained_folder("user/tiny", download=True) == tmp_path / "snapshot"
    assert asked == [("user/tiny", "config.json", False), ("user/tiny", "model.safetensors", False)]


@pytest.mark.parametrize("load", ["config", "encoder"])
def test_a_text_encoder_not_in_the_cache_fails_at_once_without_the_network(load, no_network):
    """`--text-encoder google/t5-v1_1-xl` on a machine that never downloaded it: one line, no network retries."""
    import time

    from runtime.errors import InputError
    from text_encoder import TextEncoder, encoder_config
    t0 = time.perf_counter()
    with pytest.raises(InputError) as err:
        encoder_config("user/t5-not-downloaded") if load == "config" else TextEncoder("user/t5-not-downloaded")
    message = str(err.value)
    assert no_network == [] and time.perf_counter() - t0 < 5
    assert message.startswith("text encoder 'user/t5-not-downloaded': not a folder, and not in the local Hugging Face "
                              "cache") and "--download" in message and "\n" not in message
