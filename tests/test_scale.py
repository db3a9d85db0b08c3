"""The paper-scale path (issue 19): the text-embedding store and the stage-2 latents built by several ranks equal one
rank's, a killed build leaves nothing that looks complete, on-the-fly text encoding equals the store, one permutation
per epoch, the encoder width from its config alone, the process-group timeout."""
import datetime
import os
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from conftest import tiny_config
from test_train import ROOT, free_port

import latents
import train
from conditions import Conditioned, collate
from config import OFFLINE_TEXT_ENCODER
from data import JsonlDataset, StepBatches, step_loader
from embedded_sets import ShapesDataset
from runtime import distributed, rowstore
from runtime.errors import InputError
from runtime.rowstore import NpyRows, build_once
from text_encoder import cached_text_embeddings
from textok import TexTok


CAPTIONS = [f"a {c} {s} at the {p}" for c in ("red", "blue", "green") for s in ("circle", "star", "ring", "cross")
            for p in ("top", "bottom")]  # 24 captions: 3 batches of 8, shared 1 + 2 by two ranks

# Each rank: the text store, the stage-2 latents (a DataLoader with a worker) and the scan of a folder whose one bad
# image is in rank 1's share; prints the scan's error, then the folder's identity and the images it stated.
RANK_CODE = """
import sys
from pathlib import Path
from runtime.distributed import setup_distributed
from runtime.errors import InputError
from conftest import tiny_config
from conditions import Conditioned
from data import JsonlDataset
from embedded_sets import ShapesDataset
from text_encoder import cached_text_embeddings
from textok import TexTok
import latents
out, captions = sys.argv[1], sys.argv[2:]
rank, world, device = setup_distributed(60)
cached_text_embeddings("{enc}", 8, captions, out + "/text", batch_size=8, rank=rank, world=world)
data = Conditioned.for_model(ShapesDataset("train", 32, 10), tiny_config(conditioning="none"), out)
tok = TexTok.from_pretrained(out + "/tok").eval()
latents.encode_latents(tok, data, device, "fp32", Path(out) / "Z", batch_size=4, rank=rank, world=world, workers=1)
try:
    JsonlDataset(out + "/jsonl", 16).scan(rank=rank, world=world)
except InputError as e:
    print("scan:", e)
import pathlib
stated, real_stat = [], pathlib.Path.stat
pathlib.Path.stat = lambda p, *a, **k: (stated.append(p) if p.suffix == ".png" else None) or real_stat(p, *a, **k)
print("identity:", JsonlDataset(out + "/jsonl", 16).identity(rank=rank, world=world), len(stated))
"""


def test_two_gloo_ranks_build_what_one_rank_builds(tmp_path):
    """Text store and latents Z from 2 gloo ranks are bit-identical to 1 rank's; the scan is shared and both ranks
    report the bad file that only rank 1 checked; the folder's identity is rank 0's stat of each image, sent to rank 1
    (which stats none)."""
    one, two = tmp_path / "one", tmp_path / "two"
    (two / "jsonl").mkdir(parents=True)
    for i in range(4):
        Image.new("RGB", (8, 8)).save(two / "jsonl" / f"{i}.png")
    (two / "jsonl" / "3.png").write_bytes(b"not a png")
    (two / "jsonl" / "captions.jsonl").write_text("".join(f'{{"image": "{i}.png", "caption": "c"}}\n' for i in range(4)))
    torch.manual_seed(0)
    TexTok(tiny_config(conditioning="none")).save_pretrained(two / "tok")  # no text: one encoder load per rank
    port, procs = free_port(), []
    for rank in range(2):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1",
               "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}"}
        code = RANK_CODE.replace("{enc}", OFFLINE_TEXT_ENCODER)
        procs.append(subprocess.Popen([sys.executable, "-c", code, str(two), *CAPTIONS], cwd=ROOT, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    # Meanwhile, one rank here.
    emb, mask = cached_text_embeddings(OFFLINE_TEXT_ENCODER, 8, CAPTIONS, one / "text", batch_size=8)
    data = Conditioned.for_model(ShapesDataset("train", 32, 10), tiny_config(conditioning="none"), one)
    tok = TexTok.from_pretrained(two / "tok").eval()
    Z = latents.encode_latents(tok, data, torch.device("cpu"), "fp32", one / "Z", batch_size=4)
    Z = torch.from_numpy(Z.read(0, len(Z)))
    identities = []
    for p in procs:
        output = p.communicate(timeout=300)[0]
        assert p.returncode == 0, output[-3000:]
        assert "scan: " in output and "1 of 4 listed images are bad: " in output and "3.png: cannot read" in output
        identities.append(output.split("identity: ")[1].split())
    folder = JsonlDataset(two / "jsonl", 16).identity()
    assert identities == [[folder, "4"], [folder, "0"]]
    emb2, mask2 = cached_text_embeddings(OFFLINE_TEXT_ENCODER, 8, CAPTIONS, two / "text")
    assert np.array_equal(emb.read(0, 24), emb2.read(0, 24)) and np.array_equal(mask.read(0, 24), mask2.read(0, 24))
    assert np.abs(emb.read(0, 24).astype(np.float32)).sum(axis=(1, 2)).min() > 0  # every row written
    Z2 = torch.from_numpy(np.load(two / "Z" / "Z.npy"))
    assert Z.shape == (10, 8, tiny_config().token_dim) and torch.equal(Z, Z2)
    with torch.no_grad():  # the first batch, encoded directly as before the store (one batch in the main process)
        batch = data.batch(range(4))
        direct = tok.encode(torch.stack([data[i]["image"] for i in range(4)]), batch)
    assert torch.equal(Z[:4], direct)


def test_stage2_latents_are_rows_read_on_demand_normalised_as_the_whole_array(tmp_path):
    """Stage 2 holds no [M, N, d] array (issue 31): its items read rows of Z.npy and normalise each by the streamed
    per-channel statistics, which equal the whole array's (torch's std to the bit, the mean within 1e-6 std: float64
    against torch's float32 sum) and give the rows the old in-place normalisation gave."""
    torch.manual_seed(0)
    cfg = tiny_config(conditioning="none")
    tok, data = TexTok(cfg).eval(), Conditioned.for_model(ShapesDataset("train", 32, 12), cfg, tmp_path)
    args = SimpleNamespace(cache_dir=tmp_path, precision="fp32", workers=0, task="class", text_cache="on",
                           download=False)
    ds, mean, std = train.stage2_latents(args, tok, "w", data, torch.device("cpu"), 0, 1)
    whole = 12 * cfg.num_tokens * cfg.token_dim
    size = lambda v: v.numel() if isinstance(v, torch.Tensor) else v.size if isinstance(v, np.ndarray) else 0
    held = [v for obj in (ds, ds.items) for v in vars(obj).values() if size(v) >= whole]
    assert not held and isinstance(ds.items.Z, NpyRows)
    Z = torch.from_numpy(np.load(next((tmp_path / "latents").iterdir()) / "Z.npy"))
    old_mean, old_std = Z.mean(dim=(0, 1)), Z.std(dim=(0, 1)).clamp_min(1e-6)
    assert torch.equal(std, old_std) and ((mean - old_mean).abs() / old_std).max() < 1e-6
    rows = torch.stack([ds[i]["Z"] for i in range(12)])
    assert torch.equal(rows, (Z - mean) / std)  # the old in-place sub_/div_, with these statistics
    torch.testing.assert_close(rows, (Z - old_mean) / old_std, rtol=0, atol=1e-5)


def test_a_failed_build_leaves_no_complete_looking_store(tmp_path, monkeypatch):
    arrays = {"x": ((6, 2), np.float32)}

    def killed(files):
        files["x"].write(0, np.ones((3, 2)))
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        build_once(tmp_path / "store", arrays, killed)
    assert not (tmp_path / "store").exists()
    folder = build_once(tmp_path / "store", arrays, lambda files: files["x"].write(0, np.arange(12).reshape(6, 2)))
    assert np.array_equal(NpyRows(folder / "x.npy").read(0, 6), np.arange(12).reshape(6, 2))
    assert [p.name for p in tmp_path.iterdir()] == ["store"]  # the killed build's files are gone
    monkeypatch.setattr(rowstore.shutil, "disk_usage", lambda path: SimpleNamespace(free=10))
    with pytest.raises(InputError, match=r"store2 need 0\.0 GB and 0\.0 GB are free; free space"):
        build_once(tmp_path / "store2", arrays, lambda files: None, what="store2")


def test_text_cache_off_equals_the_store(tmp_path):
    """--text-cache off: the loader's batches carry embeddings encoded on the fly equal to the store's (both rounded
    through fp16), for the same steps."""
    ds = ShapesDataset("train", 32, 12)
    stored = Conditioned.for_model(ds, tiny_config(), tmp_path)
    fly = Conditioned.for_model(ds, tiny_config(), tmp_path / "unused", text_cache="off")
    assert fly[0]["cond"].text is None and not (tmp_path / "unused").exists()
    a, b = (next(iter(step_loader(d, 4, 0, 1, 0, 1, 2, 0))) for d in (stored, fly))
    assert torch.equal(a["index"], b["index"]) and torch.equal(a["cond"].text_mask, b["cond"].text_mask)
    torch.testing.assert_close(b["cond"].text, a["cond"].text, atol=0, rtol=2 ** -10)  # one fp16 rounding step
    assert torch.equal(b["cond"].text, b["cond"].text.half().float())
    assert torch.equal(fly.batch([5, 2]).text, fly.complete(collate([fly[5], fly[2]]))["cond"].text)


def test_step_batches_draw_one_permutation_per_epoch(monkeypatch):
    calls = []
    real = torch.randperm
    monkeypatch.setattr(torch, "randperm", lambda *a, **k: calls.append(a) or real(*a, **k))
    n, batch, world = 20, 3, 2
    got = [list(StepBatches(n, batch, r, world, 7, 0, 9)) for r in range(world)]
    assert len(calls) == 2 * 3  # 9 steps of 3 per epoch: 3 epochs, per rank
    for r in range(world):  # the draw as it was made on every step
        for step, b in enumerate(got[r]):
            epoch, k = divmod(step, 3)
            perm = real(n, generator=torch.Generator().manual_seed(7 * 100_003 + epoch))
            assert b == perm.repeat(2)[(k * world + r) * batch:][:batch].tolist()


def test_run_configs_read_the_encoder_width_from_its_config_alone(tmp_path):
    """A T5 folder with config.json and no weights: the width is its d_model (a model load would fail)."""
    from transformers import T5Config
    T5Config(d_model=48, num_layers=1, num_heads=2, d_kv=8, d_ff=32, vocab_size=64).save_pretrained(tmp_path)
    cfg = train.run_configs(train.parse_args(["--stage", "tokenizer", "--text-encoder", str(tmp_path)]))[0]
    assert cfg.text_dim == 48


def test_dist_timeout_reaches_the_process_group(monkeypatch):
    seen = {}
    monkeypatch.setattr(distributed.dist, "init_process_group", lambda backend, **k: seen.update(k))
    monkeypatch.setattr(distributed.dist, "get_rank", lambda: 0)
    monkeypatch.setattr(distributed.dist, "get_world_size", lambda: 1)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert distributed.setup_distributed(90)[:2] == (0, 1)
    assert seen["timeout"] == datetime.timedelta(seconds=90)
    assert train.parse_args(["--stage", "dit"]).dist_timeout == 7200


def test_stage1_runs_with_text_cache_off(tmp_path):
    """`--text-cache off`: a step and the validation batch with captions encoded on the fly, no store on disk."""
    from test_train import base_args, log_rows
    train.main(base_args(tmp_path / "run", tmp_path / "cache", "--max-steps", "1", "--eval-every", "1",
                         "--text-cache", "off"))
    assert [r["step"] for r in log_rows(tmp_path / "run")] == [1, 1] and "val_psnr_uint8" in log_rows(tmp_path / "run")[1]
    assert not (tmp_path / "cache" / "text").exists()


def test_the_loader_memory_bench_measures_a_rank_with_its_workers(tmp_path):
    """bench/scale.py's loader-memory row at a small M (docs/RESULTS.md §6 has 20k and 200k): a full pass through
    the training loader with 2 workers, the rank's PSS summed over its process and both workers."""
    out = subprocess.run([sys.executable, "bench/scale.py", "--num-captions", "--no-latents", "--no-step-cost",
                          "--loader-num-captions", "600", "--workers", "2", "--loader-batch", "64", "--out", str(tmp_path)],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    row = next(line for line in out.stdout.splitlines() if line.startswith("| 600 |"))
    cells = [float(c) for c in row.strip("|").split("|")[2:9]]
    data, first, peak, main, workers, worker_uss, steps = cells  # MiB but for the counts
    assert workers == 2 and 0 < worker_uss and main < peak and data < 10 and steps == 540 // 64  # one pass
