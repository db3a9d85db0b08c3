"""caption.py through the real transformers loading path, on a tiny random LLaVA saved locally (its captions are
gibberish): the captions.jsonl rows, resume after a kill, a torn last line, sharding over ranks, and one-line errors."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from data import JsonlDataset
from runtime.errors import InputError, MissingInput
from tools import caption


WORDS = "a the of in on with and red green blue dog cat tree sky grass water small large photo".split()


@pytest.fixture(scope="module")
def vlm_folder(tmp_path_factory):
    return save_tiny_vlm(tmp_path_factory.mktemp("tiny_vlm"))


@pytest.fixture(scope="module")
def tiny_vlm(vlm_folder):
    return caption.Captioner(str(vlm_folder), max_new_tokens=4)


def save_tiny_vlm(path):
    """A randomly initialised LLaVA (CLIP vision tower + Llama, width 16) with a word-level tokenizer and a chat
    template, saved with its processor in `path` as a hub model folder would be."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaProcessor, PreTrainedTokenizerFast)
    vocab = {w: i for i, w in enumerate(["<pad>", "<s>", "</s>", "<unk>", "<image>", "USER:", "ASSISTANT:"] + WORDS)}
    words = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=words, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                        unk_token="<unk>", additional_special_tokens=["<image>"])
    chat = ("{% for m in messages %}USER: {% for c in m['content'] %}{% if c['type'] == 'image' %}<image> "
            "{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endfor %}{% if add_generation_prompt %} ASSISTANT:"
            "{% endif %}")
    processor = LlavaProcessor(CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}),
                               tokenizer, patch_size=8, vision_feature_select_strategy="default", chat_template=chat,
                               image_token="<image>", num_additional_image_tokens=1)
    vision = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                              image_size=16, patch_size=8)
    text = LlamaConfig(vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(LlavaConfig(vision_config=vision, text_config=text,
                                                      image_token_index=vocab["<image>"]))
    model.generation_config.eos_token_id = None  # random weights: always the full max_new_tokens, never empty
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def remote_code_copy(src, dst, marker, base="Llava", model="AutoModelForImageTextToText"):
    """A copy of model folder `src` whose config.json names custom code (auto_map, an unknown model_type): a
    configuration_tiny.py that subclasses transformers' `base` classes and creates the file `marker` when imported."""
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    config.update(model_type="tiny-remote", auto_map={"AutoConfig": "configuration_tiny.TinyConfig",
                                                      model: "configuration_tiny.TinyModel"})
    (dst / "config.json").write_text(json.dumps(config))
    (dst / "configuration_tiny.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).touch()\n"
        f"from transformers import {base}Config, {base}{'ForConditionalGeneration' if base == 'Llava' else 'Model'}\n"
        f"class TinyConfig({base}Config):\n    model_type = 'tiny-remote'\n"
        f"class TinyModel({base}{'ForConditionalGeneration' if base == 'Llava' else 'Model'}):\n"
        "    config_class = TinyConfig\n")
    return dst


def image_folder(root, classes=("n01", "n03", "n02"), per_class=2):
    """Class folders made out of order, so that a listing in creation or directory order is not sorted."""
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = np.random.default_rng([c, i]).integers(0, 256, (12 + i, 10, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f"img{i}.png")
    return root


def run(root, captioner, **kw):
    files, labels, classes = caption.list_images(root)
    prompts = [caption.PROMPT.format(class_name=name, word_count=75) for name in classes]
    kw = {"batch_size": 2, "size": 16, "workers": 0, "progress": False, **kw}
    return caption.caption_share(root, root / "captions.jsonl", files, labels, prompts, captioner, **kw)


def rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_captions_jsonl_rows_labels_from_sorted_class_folders(tmp_path, tiny_vlm):
    root = image_folder(tmp_path / "data")
    prompts = []
    assert run(root, lambda images, p: prompts.extend(p) or tiny_vlm(images, p)) == 6
    assert [p.split()[5] for p in prompts] == ["n01", "n01", "n02", "n02", "n03", "n03"]  # "... an image of a n01 ..."
    assert caption.merge_parts(root / "captions.jsonl") == 6
    got = rows(root / "captions.jsonl")
    assert [r["image"] for r in got] == [f"{c}/img{i}.png" for c in ("n01", "n02", "n03") for i in range(2)]
    assert [r["label"] for r in got] == [0, 0, 1, 1, 2, 2]  # the sorted folders' indices
    assert all(isinstance(r["caption"], str) and r["caption"] for r in got)
    assert not list(tmp_path.glob("data/captions.jsonl.part-*"))
    assert len(JsonlDataset(root, 16)) == 6  # what train.py --data reads


def test_resume_after_a_kill_loses_at_most_one_batch(tmp_path, tiny_vlm):
    root = image_folder(tmp_path / "data")
    calls = []

    def killed_after_two_batches(images, prompts):
        if len(calls) == 2:
            raise KeyboardInterrupt  # the run dies mid-batch
        calls.append(len(images))
        return tiny_vlm(images, prompts)
    with pytest.raises(KeyboardInterrupt):
        run(root, killed_after_two_batches)
    part = root / "captions.jsonl.part-00000"
    assert len(rows(part)) == 4  # two whole batches on disk
    with open(part, "a") as f:
        f.write('{"image": "n03/img0.png", "capt')  # a torn line, as a kill mid-write leaves it
    seen = []
    assert run(root, lambda images, prompts: seen.extend(images) or tiny_vlm(images, prompts)) == 2
    assert len(seen) == 2  # only the unfinished images are captioned again
    caption.merge_parts(root / "captions.jsonl")
    got = rows(root / "captions.jsonl")
    assert sorted(r["image"] for r in got) == [f"{c}/img{i}.png" for c in ("n01", "n02", "n03") for i in range(2)]


@pytest.mark.parametrize("torn", [False, True], ids=["whole lines", "a torn last line"])
def test_a_part_file_that_is_a_symlink_is_never_written_through(tmp_path, torn):
    """captions.jsonl.part-00000 a link to a user's file: the rows were appended to it (or its last line cut);
    refused in one line before any image is captioned, the file as it was."""
    root = image_folder(tmp_path / "data")
    user = tmp_path / "user.txt"
    user.write_bytes(b"root:x:0:0:root:/root:/bin/bash" + (b"" if torn else b"\n"))
    (root / "captions.jsonl.part-00000").symlink_to(user)
    with pytest.raises(InputError, match="part-00000: a symbolic link where this project keeps its own file"):
        run(root, lambda images, prompts: ["a caption"] * len(images))
    assert user.read_bytes() == b"root:x:0:0:root:/root:/bin/bash" + (b"" if torn else b"\n")


def test_ranks_caption_disjoint_shares_into_one_sorted_file(tmp_path, tiny_vlm):
    one, two = image_folder(tmp_path / "one"), image_folder(tmp_path / "two")
    run(one, tiny_vlm)
    caption.merge_parts(one / "captions.jsonl")
    assert run(two, tiny_vlm, rank=0, world=2) == 3 and run(two, tiny_vlm, rank=1, world=2) == 3
    assert len(list(two.glob("captions.jsonl.part-*"))) == 2
    caption.merge_parts(two / "captions.jsonl")
    assert rows(two / "captions.jsonl") == rows(one / "captions.jsonl")  # greedy decoding: same captions, same order


def test_labels_follow_the_sorted_class_folders_whatever_the_listing_order(tmp_path, monkeypatch):
    image_folder(tmp_path)
    listing = Path.iterdir
    monkeypatch.setattr(Path, "iterdir", lambda self: iter(sorted(listing(self), reverse=True)))
    files, labels, classes = caption.list_images(tmp_path)
    assert classes == ["n01", "n02", "n03"] and labels == [0, 0, 1, 1, 2, 2]
    assert files == [f"{c}/img{i}.png" for c in classes for i in range(2)]


def test_flat_folder_has_no_labels_and_wordnet_folders_need_class_names(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "b.jpg")
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    assert caption.list_images(tmp_path) == (["a.png", "b.jpg"], None, None)
    with pytest.raises(InputError, match="give --class-names FILE"):
        caption.class_names(None, ["n01440764"])
    (tmp_path / "map.txt").write_text("n01440764 tench, Tinca tinca\n")
    assert caption.class_names(tmp_path / "map.txt", ["n01440764"]) == ["tench"]
    assert caption.class_names(None, ["golden_retriever"]) == ["golden retriever"]


def test_missing_weights_are_one_line_naming_the_model():
    with pytest.raises(MissingInput, match=r"^someone/no-such-vlm: model weights not found .*hf download "
                                           r"someone/no-such-vlm"):
        caption.Captioner("someone/no-such-vlm")


def test_custom_code_runs_only_with_trust_remote_code(tmp_path, monkeypatch, vlm_folder):
    """A folder naming its own code is refused in one line naming its config.json, whatever a prompt would have been
    answered; with trust_remote_code (caption.py --trust-remote-code) the code runs and the model captions."""
    import transformers.dynamic_module_utils
    monkeypatch.setattr(transformers.dynamic_module_utils, "HF_MODULES_CACHE", str(tmp_path / "modules"))
    monkeypatch.setattr("builtins.input", lambda *args: "y")  # what transformers' [y/N] prompt would read
    remote = remote_code_copy(vlm_folder, tmp_path / "remote", tmp_path / "ran")
    with pytest.raises(InputError) as err:
        caption.Captioner(str(remote))
    assert str(err.value).startswith(f"{remote / 'config.json'}: names custom model code (auto_map), which is not "
                                     "run; pass --trust-remote-code")
    assert not (tmp_path / "ran").exists()
    trusted = caption.Captioner(str(remote), max_new_tokens=2, trust_remote_code=True)
    assert (tmp_path / "ran").exists() and type(trusted.model).__name__ == "TinyModel"
