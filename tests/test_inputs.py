"""Inputs nobody here prepared: images that are not 8-bit RGB, labels out of range, and a table of bad files, each
ending the real entry point (train.py, sample.py, metrics.py) with one line `error: <file>: <problem>` and exit 1."""
import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from conftest import tiny_config
from test_caption import remote_code_copy, save_tiny_vlm

import metrics
import perceptual
import sample
import train
from config import DiTTrainConfig, to_dict
from data import JsonlDataset, class_caption_pool, load_image
from dit import build_dit
from runtime.errors import InputError, run_main
from runtime.files import load_json, load_tensors
from textok import TexTok
from tools import caption, domain


ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------- images that are not 8-bit RGB
def halves(left, right, size=(32, 32)):
    """A uint8 image (L, LA, RGB or RGBA by the pixels' length) whose left half is pixel `left`, right half `right`."""
    w, h = size
    x = np.empty((h, w, len(left)), np.uint8)
    x[:, : w // 2], x[:, w // 2:] = left, right
    return Image.fromarray(x[..., 0] if len(left) == 1 else x)


@pytest.mark.parametrize("kind", ["png16", "float-tiff", "int32-tiff"])
def test_wide_grey_images_are_scaled_to_8_bit(tmp_path, kind):
    """A 16-bit PNG gradient over 0..65535 and a float TIFF gradient over [0, 1] load as the same 8-bit ramp (a plain
    convert("RGB") turns the first almost all white and the second all black)."""
    ramp = np.linspace(0, 1, 64)[None].repeat(8, 0)
    file, image = {"png16": ("g.png", np.round(ramp * 65535).astype(np.uint16)),
                   "float-tiff": ("g.tiff", ramp.astype(np.float32)),
                   "int32-tiff": ("g.tiff", np.round(ramp * 65535).astype(np.int32))}[kind]
    Image.fromarray(image).save(tmp_path / file)
    x = load_image(tmp_path / file, 8)  # the center 8x8 square: columns 28..35 of the ramp
    np.testing.assert_allclose(x[..., 0].astype(float), np.round(ramp[:8, 28:36] * 255), atol=1)
    assert (x[..., 0] == x[..., 2]).all()


@pytest.mark.parametrize("mode,values", [("F", [0.0, 255.0]), ("F", [0.0, float("nan")]), ("I", [0, 70000])])
def test_wide_images_out_of_range_are_refused_by_mode(tmp_path, mode, values):
    Image.fromarray(np.array([values] * 2, np.float32 if mode == "F" else np.int32)).save(tmp_path / "x.tiff")
    with pytest.raises(InputError, match=rf"x.tiff: mode {mode} image with values in .*; expected \[0, "):
        load_image(tmp_path / "x.tiff", 2)


def test_exif_orientation_is_applied(tmp_path):
    """A 48x32 JPEG stored red | blue with EXIF orientation 6 (display rotated 90 degrees clockwise) is red on top."""
    im = halves((200, 0, 0), (0, 0, 200), (48, 32))
    exif = Image.Exif()
    exif[0x0112] = 6
    im.save(tmp_path / "r.jpg", exif=exif, quality=95)
    x = load_image(tmp_path / "r.jpg", 32).astype(float)
    top, bottom = x[:12].mean((0, 1)), x[20:].mean((0, 1))
    assert top[0] > 180 and top[2] < 20 and bottom[2] > 180 and bottom[0] < 20, (top, bottom)


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P"])
def test_transparency_is_composited_on_white(tmp_path, mode):
    """Left half fully transparent over a green (or dark) colour, right half opaque: the left loads white, whatever
    colour sits under the transparent pixels."""
    if mode == "RGBA":
        im, right = halves((0, 255, 0, 0), (200, 0, 0, 255)), (200, 0, 0)
    elif mode == "LA":
        im, right = halves((30, 0), (100, 255)), (100, 100, 100)
    else:
        im, right = halves((0,), (1,)).convert("P"), (200, 0, 0)
        im.putpalette([0, 255, 0, 200, 0, 0])
        im.info["transparency"] = 0
    im.save(tmp_path / "t.png")
    assert Image.open(tmp_path / "t.png").mode == mode
    x = load_image(tmp_path / "t.png", 32)
    assert (x[:, :16] == 255).all()
    assert (x[:, 16:] == right).all()


# ------------------------------------------------------------------------------------------------------ U+2028 is text
def test_a_caption_with_a_line_separator_is_accepted(tmp_path):
    """U+2028 (and U+0085, U+001C ...) are line breaks to str.splitlines() but legal inside a JSON string."""
    text = "a red circle\u2028on a navy\x85background"
    folder(tmp_path, [{"image": "0.png", "caption": text, "label": 1}, {"image": "1.png", "caption": "two"}])
    (tmp_path / "class_captions.jsonl").write_text(json.dumps({"label": 1, "caption": text}, ensure_ascii=False)
                                                   + "\n", encoding="utf-8")
    ds = JsonlDataset(tmp_path, 8)
    assert ds.captions == [text, "two"] and ds.lines.tolist() == [1, 2] and ds.labels.tolist() == [1, -1]
    assert class_caption_pool(tmp_path, 2)[1] == [text]


# ---------------------------------------------------------------------------------------------------------- fixtures
def folder(root, rows, raw: bytes = b""):
    """A JSONL folder: one 8x8 PNG per row (its "image"), `rows` as captions.jsonl (UTF-8, not escaped), then `raw`."""
    root.mkdir(parents=True, exist_ok=True)
    for r in rows:
        if isinstance(r, dict) and isinstance(r.get("image"), str):
            Image.fromarray(np.full((8, 8, 3), 90, np.uint8)).save(root / r["image"])
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    (root / "captions.jsonl").write_bytes(text.encode() + raw)
    return root


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Untrained tiny folders: a text-conditioned TexTok `tok`, a class-conditioned one `tok_class`, DiT-T folders
    over `tok` for class-conditional (`dit_class`) and text-to-image (`dit_t2i`) sampling, and a tiny VLM `vlm`."""
    root = tmp_path_factory.mktemp("models")
    save_tiny_vlm(root / "vlm")
    torch.manual_seed(0)
    cfg = tiny_config()
    TexTok(cfg).save_pretrained(root / "tok")
    TexTok(tiny_config(conditioning="class")).save_pretrained(root / "tok_class")
    for task in ("class", "t2i"):
        meta = {"task": task, "num_classes": 8, "tokenizer": str(root / "tok"), "tokenizer_config": to_dict(cfg),
                "split": {"data": None, "val": None, "num_images": 64, "captions": "full"},
                "train": to_dict(DiTTrainConfig(model="DiT-T", sampling_steps=2))}
        build_dit("DiT-T", 0.1, cfg, task, 8).save_pretrained(root / f"dit_{task}", meta)
    return root


def edited_copy(src, dst, file, edit):
    """A copy of folder `src` with its JSON `file` changed by `edit(dict)` (in place, or by what it returns)."""
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    obj = load_json(dst / file)
    obj = edit(obj) or obj  # changed in place, or replaced
    (dst / file).write_text(json.dumps(obj))
    return dst


def flipped(path, at=0.5):
    """`path` with one byte inverted at fraction `at` of its length."""
    raw = bytearray(path.read_bytes())
    raw[int(len(raw) * at)] ^= 0xFF
    path.write_bytes(bytes(raw))
    return path


def npy_header_only(path, shape, fortran=False):
    """An .npz whose arr_0 header claims `shape` (uint8) over 100 bytes of data."""
    header = {"descr": "|u1", "fortran_order": fortran, "shape": shape}
    with zipfile.ZipFile(path, "w") as z, z.open("arr_0.npy", "w") as f:
        np.lib.format.write_array_header_1_0(f, header)
        f.write(bytes(100))
    return path


def zip_patched(path, flag=0, method=None, old=b"", new=b""):
    """The .npz `path` with general-purpose `flag` bits set and compression `method` given in every member's local and
    central header, and bytes `old` replaced by `new` (as long) throughout."""
    raw = bytearray(path.read_bytes().replace(old, new))
    for sig, at in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):  # the flag's offset in each header; the method's next
        i = raw.find(sig)
        while i >= 0:
            raw[i + at] |= flag
            if method is not None:
                raw[i + at + 2: i + at + 4] = method.to_bytes(2, "little")
            i = raw.find(sig, i + 4)
    path.write_bytes(bytes(raw))
    return path


def lzma_npz(path):
    """arr_0 compressed with LZMA, its filter properties byte broken."""
    np.savez(path, images())
    data = zipfile.ZipFile(path).read("arr_0.npy")
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("arr_0.npy", data, compress_type=zipfile.ZIP_LZMA)
    raw = bytearray(path.read_bytes())
    raw[raw.index(b"arr_0.npy") + 9 + 4] = 0xFF  # after the name: 4 bytes of LZMA version and size, then lc/lp/pb
    path.write_bytes(bytes(raw))
    return path


def images(n=4):
    return np.random.default_rng(0).integers(0, 256, (n, 16, 16, 3), dtype=np.uint8)


# ------------------------------------------------------------------------------------- the table of bad inputs
# Each row: (id, make(tmp, models) -> (entry point, argv, the file the line names, the problem it states)).
def _train(tmp, *extra):
    return ["--out", str(tmp / "out"), "--cache-dir", str(tmp / "cache"), "--workers", "0", "--max-steps", "1", *extra]


def _captions(rows=(), raw=b""):
    def make(tmp, models):
        data = folder(tmp / "data", [{"image": "0.png", "caption": "a", "label": 0}, *rows], raw)
        return "train", ["--stage", "tokenizer", "--data", str(data), *_train(tmp)], data / "captions.jsonl:2"
    return make


def _labels(stage, label, *extra, tokenizer="tok"):
    def make(tmp, models):
        row = {"image": "1.png", "caption": "b"} | ({} if label is None else {"label": label})
        data = folder(tmp / "data", [{"image": "0.png", "caption": "a", "label": 0}, row])
        argv = ["--stage", stage, "--data", str(data), "--val", str(data), *_train(tmp, *extra)]
        argv += ["--tokenizer", str(models / tokenizer)] if stage == "dit" else ["--conditioning", "class"]
        return "train", argv, data / "captions.jsonl:2"
    return make


def _class_captions(text: bytes):
    def make(tmp, models):
        (tmp / "data").mkdir()
        (tmp / "data" / "class_captions.jsonl").write_bytes(b'{"label": 0, "caption": "a"}\n' + text)
        return "sample", ["--dit", str(models / "dit_class"), "--data", str(tmp / "data"), "--out", str(tmp / "out")], \
            tmp / "data" / "class_captions.jsonl:2"
    return make


def _prompts(content):
    def make(tmp, models):
        if content is not None:
            (tmp / "prompts.txt").write_bytes(content)
        return "sample", ["--dit", str(models / "dit_t2i"), "--prompts", str(tmp / "prompts.txt"),
                          "--out", str(tmp / "out")], tmp / "prompts.txt"
    return make


def _tok_config(edit):
    def make(tmp, models):
        tok = edited_copy(models / "tok", tmp / "tok", "config.json", edit)
        return "train", ["--stage", "dit", "--tokenizer", str(tok), *_train(tmp)], tok / "config.json"
    return make


def _tok_config_bytes(raw: bytes):
    def make(tmp, models):
        tok = edited_copy(models / "tok", tmp / "tok", "config.json", lambda c: None)
        (tok / "config.json").write_bytes(raw)
        return "train", ["--stage", "dit", "--tokenizer", str(tok), *_train(tmp)], tok / "config.json"
    return make


def _dit_config(edit):
    def make(tmp, models):
        dit = edited_copy(models / "dit_t2i", tmp / "dit", "config.json", edit)
        return "sample", ["--dit", str(dit), "--out", str(tmp / "out")], dit / "config.json"
    return make


def _npz(write):
    def make(tmp, models):
        np.savez(tmp / "ref.npz", images())
        bad = write(tmp / "bad.npz")
        return "metrics", [str(tmp / "ref.npz"), str(bad)], bad
    return make


def _inception(write):
    def make(tmp, models):
        np.savez(tmp / "ref.npz", images())
        weights = write(tmp / "weights.pth")
        return "metrics", [str(tmp / "ref.npz"), str(tmp / "ref.npz"), "--inception", str(weights)], weights
    return make


def _lpips_trunk(write):
    def make(tmp, models):
        path = tmp / "torch_home" / "hub" / "checkpoints" / perceptual.LPIPS_TRUNKS["alex"]
        path.parent.mkdir(parents=True)
        write(path)
        return "metrics", ["--tokenizer", str(models / "tok_class"), "--num-images", "4", "--batch-size", "4",
                           "--cache-dir", str(tmp / "cache"), "--device", "cpu"], path
    return make


def _text_encoder_remote_code(tmp, models):
    """A TexTok whose text encoder is a folder naming custom code (a config.json with auto_map)."""
    encoder = tmp / "encoder"
    encoder.mkdir()
    (encoder / "config.json").write_text(json.dumps({"model_type": "tiny-remote",
                                                     "auto_map": {"AutoConfig": "configuration_tiny.TinyConfig"}}))
    tok = edited_copy(models / "tok", tmp / "tok", "config.json", lambda c: c.update(text_encoder=str(encoder)))
    return "train", ["--stage", "dit", "--tokenizer", str(tok), *_train(tmp)], encoder / "config.json"


def _caption(setup):
    """caption.py on two class folders of one PNG each, with the tiny VLM and `setup(tmp, models)`'s (flags, the
    file the line names)."""
    def make(tmp, models):
        for c in ("cat", "dog"):
            (tmp / "images" / c).mkdir(parents=True)
            Image.fromarray(np.full((8, 8, 3), 90, np.uint8)).save(tmp / "images" / c / "0.png")
        flags, file = setup(tmp, models)
        return "caption", [str(tmp / "images"), "--vlm", str(models / "vlm"), "--size", "16", "--max-new-tokens",
                           "2", "--workers", "0", *flags], file
    return make


def _truncated_image(tmp, models):
    Image.fromarray(images(1)[0].repeat(4, 0).repeat(4, 1)).save(tmp / "full.png")
    (tmp / "images" / "dog" / "1.png").write_bytes((tmp / "full.png").read_bytes()[:600])
    return ["--workers", "2"], tmp / "images" / "dog" / "1.png"


def _pickled_weights(tmp, models):
    shutil.copytree(models / "vlm", tmp / "bin")
    torch.save(load_tensors(tmp / "bin" / "model.safetensors"), tmp / "bin" / "pytorch_model.bin")
    (tmp / "bin" / "model.safetensors").unlink()
    return ["--vlm", str(tmp / "bin")], tmp / "bin"


def _remote_vlm(tmp, models):
    remote = remote_code_copy(models / "vlm", tmp / "remote", tmp / "ran")
    return ["--vlm", str(remote)], remote / "config.json"


def _class_names_file(tmp, models):
    (tmp / "names.txt").write_bytes(b"cat le chat\ndog caf\xe9\n")
    return ["--class-names", str(tmp / "names.txt")], f"{tmp / 'names.txt'}:2"


def _write(data: bytes):
    return lambda path: path.write_bytes(data) and path


def _torch_save(obj):
    return lambda path: torch.save(obj, path) or path


def _savez_flipped(save, at=0.5):
    """Random images (stored as is by either save), or for np.savez_compressed a repeating pattern that deflates into
    Huffman blocks, where a flipped byte breaks the stream itself."""
    x = images(8) if save is np.savez else (np.arange(8 * 16 * 16 * 3) % 7).astype(np.uint8).reshape(8, 16, 16, 3)
    return lambda path: flipped(save(path, x) or path, at)


FAST = ("--num-images", "16", "--batch-size", "8", "--epochs", "1")  # were the flag taken: a 2-step schedule


def _flag(flag, value, stage="tokenizer"):
    """train.py with a flag value that makes no sense, given last (after a short schedule it would otherwise run)."""
    def make(tmp, models):
        tokenizer = ["--tokenizer", str(models / "tok")] if stage == "dit" else []
        return "train", ["--stage", stage, *tokenizer, *_train(tmp), *FAST, flag, value], flag
    return make


def _entry_flag(entry, flag, value):
    """sample.py or metrics.py (on the tiny models) with `flag value`."""
    def make(tmp, models):
        argv = {"sample": ["--dit", str(models / "dit_class"), "--out", str(tmp / "out"), "--num-samples", "2"],
                "metrics": ["--tokenizer", str(models / "tok"), "--batch-size", "4", "--cache-dir", str(tmp / "cache"),
                            "--device", "cpu"]}[entry]
        return entry, [*argv, flag, value], flag
    return make


def _a_file_as(flag, entry="train"):
    """`flag` (--out or --cache-dir) naming a file."""
    def make(tmp, models):
        (tmp / "a-file").write_text("notes\n")
        argv = ["--stage", "tokenizer", *_train(tmp)] if entry == "train" else \
            ["--dit", str(models / "dit_class"), "--out", str(tmp / "out"), "--num-samples", "2"]
        return entry, [*argv, flag, str(tmp / "a-file")], tmp / "a-file"
    return make


def _domain(write=None, captions=None, *flags):
    """domain.py on 4 random 16 px samples (`write(path)` adds arrays to the .npz), with `captions` bytes as
    --captions; the file the line names is the .npz, or the captions file."""
    def make(tmp, models):
        path = tmp / "samples.npz"
        arrays = write() if write else {}
        np.savez(path, images(), **arrays)
        argv = [str(path), *flags]
        if captions is not None:
            (tmp / "captions.txt").write_bytes(captions)
            argv += ["--captions-file", str(tmp / "captions.txt")]
        return "domain", argv, tmp / "captions.txt" if captions is not None else path
    return make


BAD_INPUTS = [
    # captions.jsonl
    ("captions-not-utf8", _captions(raw=b'{"image": "0.png", "caption": "caf\xe9"}\n'), "not UTF-8 text (byte 0xe9"),
    ("captions-array", _captions(raw=b'["0.png", "a"]\n'), "expected a JSON object, got an array"),
    ("captions-number", _captions(raw=b"3\n"), "expected a JSON object, got a number"),
    ("captions-string", _captions(raw=b'"0.png"\n'), "expected a JSON object, got a string"),
    ("captions-label-string", _captions([{"image": "1.png", "caption": "b", "label": "3"}]),
     "\"label\" must be an integer >= 0, got '3'"),
    ("captions-label-negative", _captions([{"image": "1.png", "caption": "b", "label": -2}]),
     "\"label\" must be an integer >= 0, got -2"),
    ("captions-label-bool", _captions([{"image": "1.png", "caption": "b", "label": True}]),
     "\"label\" must be an integer >= 0, got True"),
    ("captions-label-huge", _captions([{"image": "1.png", "caption": "b", "label": 10 ** 30}]),
     "\"label\" 1000000000000000000000000000000 is too large for a class index"),
    # labels against the class count
    ("stage1-label-out-of-range", _labels("tokenizer", 8),
     "label 8; --conditioning class needs a label in 0..7 for every image (1 of 2 are not"),
    ("stage1-label-missing", _labels("tokenizer", None), "no \"label\"; --conditioning class needs a label in 0..7"),
    ("stage2-label-typo", _labels("dit", 5000), "label 5000; a class-conditional DiT needs a label in 0..7"),
    ("stage2-num-classes", _labels("dit", 5, "--num-classes", "4"),
     "label 5; a class-conditional DiT needs a label in 0..3"),
    ("stage2-label-missing", _labels("dit", None), "no \"label\"; a class-conditional DiT needs a label in 0..7"),
    # class_captions.jsonl
    ("class-captions-not-utf8", _class_captions(b'{"label": 1, "caption": "\xff"}\n'), "not UTF-8 text (byte 0xff"),
    ("class-captions-array", _class_captions(b'[1, "a dog"]\n'), "expected a JSON object, got an array"),
    ("class-captions-bad-json", _class_captions(b'{"label": 1, "caption": "a dog"\n'), "not valid JSON"),
    ("class-captions-label-string", _class_captions(b'{"label": "1", "caption": "a"}\n'),
     "expected an integer \"label\" in 0..7, got '1'"),
    ("class-captions-label-range", _class_captions(b'{"label": 8, "caption": "a"}\n'),
     "expected an integer \"label\" in 0..7, got 8"),
    ("class-captions-no-caption", _class_captions(b'{"label": 1, "caption": 5}\n'), "missing or empty caption"),
    # sample.py --prompts
    ("prompts-missing", _prompts(None), "file not found"),
    ("prompts-not-utf8", _prompts(b"a red circle\n\x80 a blue square\n"), "not UTF-8 text (byte 0x80"),
    # .npz batches: refused before Inception is loaded ($TEXTOK_INCEPTION points nowhere)
    ("npz-flipped-byte", _npz(_savez_flipped(np.savez)), "arr_0.npy is corrupt (its CRC check failed)"),
    ("npz-flipped-byte-compressed", _npz(_savez_flipped(np.savez_compressed, at=0.3)), "not a readable .npz archive"),
    ("npz-huge-header", _npz(lambda p: npy_header_only(p, (10 ** 9, 256, 256, 3))),
     "arr_0's header claims uint8 shape [1000000000, 256, 256, 3] (196608000000000 bytes) but the archive holds 100"),
    ("npz-huge-header-fortran", _npz(lambda p: npy_header_only(p, (10 ** 9, 256, 256, 3), fortran=True)),
     "arr_0's header claims uint8 shape"),
    ("npz-huge-stats", _npz(lambda p: np.savez(p, images(), mu=np.zeros(2), sigma=np.zeros((2, 2)), mu_s=np.zeros(2),
                                               sigma_s=np.zeros((2, 2))) or npz_huge_member(p, "sigma")),
     "sigma's header claims float64 shape [1000000, 1000000]"),
    ("npz-name-not-utf8", _npz(lambda p: zip_patched(np.savez(p, images(), **{"arr_\u00e9": np.zeros(2)}) or p,
                                                      old="\u00e9".encode(), new=b"\xff\xfe")),
     "not a readable .npz archive (a member name is not UTF-8: byte 0xff)"),
    ("npz-lzma-corrupt", _npz(lzma_npz), "not a readable .npz archive (Invalid or unsupported options)"),
    ("npz-encrypted", _npz(lambda p: zip_patched(np.savez(p, images()) or p, flag=1)),
     "'arr_0.npy' is encrypted; np.savez writes no password"),
    ("npz-method-99", _npz(lambda p: zip_patched(np.savez(p, images()) or p, method=99)),
     "'arr_0.npy' uses zip compression method 99, which is not read"),
    ("npz-3-images", _npz(lambda p: np.savez(p, images(3)) or p),
     "arr_0 holds 3 images; precision and recall (k=3 nearest neighbours) need at least 4"),
    # --inception
    ("inception-random-bytes", _inception(_write(np.random.default_rng(0).bytes(4096))),
     "not a PyTorch weights file (torch.load: UnpicklingError)"),
    ("inception-text-file", _inception(_write(b"pt_inception weights go here\n")), "not a PyTorch weights file"),
    ("inception-other-weights", _inception(_torch_save({"fc.weight": torch.zeros(3)})),
     "checkpoint does not fit this model"),
    ("inception-a-tensor", _inception(_torch_save(torch.zeros(3))), "holds a Tensor, not the FID Inception's state"),
    # the LPIPS trunk in the torch hub cache ($TORCH_HOME is tmp/torch_home)
    ("lpips-trunk-not-torchvisions", _lpips_trunk(_torch_save({"features.0.weight": torch.zeros(3)})),
     "does not match the 7be5be79 in its name (not the file torchvision publishes)"),
    # a text encoder naming custom code
    ("text-encoder-remote-code", _text_encoder_remote_code, "names custom model code (auto_map), which is not run"),
    # caption.py
    ("caption-truncated-image-in-a-worker", _caption(_truncated_image), "cannot read image (image file is truncated"),
    ("caption-prompt-lone-brace", _caption(lambda tmp, models: (["--prompt", "{word_count} words, a {"], "--prompt")),
     "not a format template (Single '{' encountered in format string)"),
    ("caption-class-names-not-utf8", _caption(_class_names_file), "not UTF-8 text (byte 0xe9 at offset 19)"),
    ("caption-pickled-weights", _caption(_pickled_weights), "no safetensors weights; only safetensors are read"),
    ("caption-remote-code", _caption(_remote_vlm),
     "names custom model code (auto_map), which is not run; pass --trust-remote-code"),
    # config.json
    ("config-wrong-type", _tok_config(lambda c: c.update(image_size="32")),
     "TexTokConfig.image_size: expected int, got '32' (str)"),
    ("config-unknown-field", _tok_config(lambda c: c.update(colour="red")), "TexTokConfig: unknown fields ['colour']"),
    ("config-refused-value", _tok_config(lambda c: c.update(patch_size=7)),
     "TexTokConfig.patch_size: must divide image_size 32, got 7"),
    ("config-zero-heads", _tok_config(lambda c: c.update(heads=0)), "TexTokConfig.heads: must be >= 1, got 0"),
    ("config-negative-tokens", _tok_config(lambda c: c.update(num_tokens=-4)),
     "TexTokConfig.num_tokens: must be >= 1, got -4"),
    ("config-not-utf8", _tok_config_bytes(b'{"image_size": 32, "text_encoder": "caf\xe9"}'),
     "not UTF-8 text (byte 0xe9 at offset 39)"),
    ("config-not-an-object", _tok_config_bytes(b'[32, 8]'), "TexTokConfig: expected a JSON object of fields, got list"),
    ("dit-config-not-an-object", _dit_config(lambda c: [c]), "not a DiT folder written by train.py --stage dit"),
    ("dit-config-wrong-type", _dit_config(lambda c: c["dit"].update(depth=4.0)),
     "DiTConfig.depth: expected int, got 4.0 (float)"),
    ("dit-train-config-wrong-type", _dit_config(lambda c: c["train"].update(cfg_scale="1.5")),
     "DiTTrainConfig.cfg_scale: expected float, got '1.5' (str)"),
    ("dit-config-no-split", _dit_config(lambda c: c.pop("split") and None), "no \"split\"; not a DiT folder written by train.py"),
    ("dit-config-no-task", _dit_config(lambda c: c.pop("task") and None), "no \"task\"; not a DiT folder written by train.py"),
    ("dit-config-zero-heads", _dit_config(lambda c: c["dit"].update(num_heads=0)),
     "DiTConfig.num_heads: must be >= 1, got 0"),
    # numbers that make no sense, refused before anything runs
    ("max-steps-0", _flag("--max-steps", "0"), "must be >= 1, got 0"),
    ("max-steps-negative", _flag("--max-steps", "-3"), "must be >= 1, got -3"),
    ("epochs-0", _flag("--epochs", "0"), "must be >= 1, got 0"),
    ("ema-decay-2", _flag("--ema-decay", "2"), "must be in [0, 1), got 2.0"),
    ("num-tokens-0", _flag("--num-tokens", "0"), "must be >= 1, got 0"),
    ("ckpt-every-0", _flag("--ckpt-every", "0"), "must be >= 1, got 0"),
    ("log-every-0", _flag("--log-every", "0"), "must be >= 1, got 0"),
    ("eval-every-0", _flag("--eval-every", "0"), "must be >= 1, got 0"),
    ("batch-size-0", _flag("--batch-size", "0"), "must be >= 1, got 0"),
    ("heads-0", _flag("--heads", "0"), "must be >= 1, got 0"),
    ("heads-not-dividing", _flag("--heads", "3"), "must divide --width 128, got 3"),
    ("patch-size-0", _flag("--patch-size", "0"), "must be >= 1, got 0"),
    ("workers-negative", _flag("--workers", "-1"), "must be >= 0, got -1"),
    ("lr-negative", _flag("--lr", "-1"), "must be > 0, got -1.0"),
    ("lr-nan", _flag("--lr", "nan"), "must be > 0, got nan"),
    ("disc-multipliers-too-many", _flag("--disc-multipliers", "1,1,1,1,1,1"),
     "6 multipliers halve the image 6 times, and 2**6 does not divide --image-size 32"),
    ("dit-ema-decay-2", _flag("--ema-decay", "2", stage="dit"), "must be in [0, 1), got 2.0"),
    ("dit-sampling-steps", _flag("--sampling-steps", "2000", stage="dit"),
     "must be at most --diffusion-steps 1000, got 2000"),
    ("dit-model-unknown", _flag("--model", "DiT-Q", stage="dit"), "expected one of"),
    ("sample-seed-negative", _entry_flag("sample", "--seed", "-1"), "must be in [0, 4294967295], got -1"),
    ("metrics-num-images-0", _entry_flag("metrics", "--num-images", "0"), "must be >= 2, got 0"),
    # --out and --cache-dir naming a file
    ("train-out-a-file", _a_file_as("--out"), "a file, not a folder (--out)"),
    ("train-cache-dir-a-file", _a_file_as("--cache-dir"), "a file, not a folder (--cache-dir)"),
    ("sample-out-a-file", _a_file_as("--out", "sample"), "a file, not a folder (--out)"),
    # domain.py
    ("domain-labels-out-of-range", _domain(lambda: {"labels": np.array([0, 1, 50, -3])}),
     "labels [50, -3] are not classes of the shapes set (0..7)"),
    ("domain-labels-object", _domain(lambda: {"labels": np.array([0, "a", None, 1], dtype=object)}),
     "labels is an object array (pickled Python objects), not integer class labels"),
    ("domain-labels-float", _domain(lambda: {"labels": np.array([0.0, 1.5, 2.0, 3.0])}),
     "labels has dtype float64, not integer class labels"),
    ("domain-captions-not-utf8", _domain(captions=b"a red circle\n\xff\n"), "not UTF-8 text (byte 0xff"),
    ("domain-captions-not-the-sets", _domain(captions=b"a\nb\nc\nd\n"),
     "1: caption names no object as the embedded set does"),
]


def npz_huge_member(path, key):
    """Rewrites array `key` of the .npz `path` as a header claiming 10^6 x 10^6 floats over its old data."""
    with zipfile.ZipFile(path) as z:
        members = {n: z.read(n) for n in z.namelist()}
    with zipfile.ZipFile(path, "w") as z:
        for name, data in members.items():
            if name == key + ".npy":
                with z.open(name, "w") as f:
                    np.lib.format.write_array_header_1_0(f, {"descr": "<f8", "fortran_order": False,
                                                             "shape": (10 ** 6, 10 ** 6)})
                    f.write(data[128:])
            else:
                z.writestr(name, data)
    return path


ENTRY = {"train": train.main, "sample": sample.main, "metrics": metrics.main, "caption": caption.main,
         "domain": domain.main}


@pytest.mark.parametrize("make,problem", [row[1:] for row in BAD_INPUTS], ids=[row[0] for row in BAD_INPUTS])
def test_bad_input_is_one_line(tmp_path, monkeypatch, models, capsys, make, problem):
    """The entry point exits 1 with one line `error: <file>: ...` stating the problem, and writes nothing."""
    monkeypatch.setenv("TEXTOK_INCEPTION", str(tmp_path / "no-inception-weights.pth"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setattr(domain, "load_classifier", lambda *a, **k: pytest.fail("the inputs are checked first"))
    entry, argv, file = make(tmp_path, models)
    with pytest.raises(SystemExit) as err:
        run_main(lambda: ENTRY[entry](argv))
    message = err.value.code
    assert isinstance(message, str) and "\n" not in message, message  # sys.exit(str): exit status 1
    assert message.startswith(f"error: {file}:") and problem in message, message
    assert not (tmp_path / "out").exists()
    assert capsys.readouterr().out == ""


def test_bad_input_process_exits_1_without_a_traceback(tmp_path):
    """The same as a process: `python train.py` on a captions.jsonl that is not UTF-8."""
    data = folder(tmp_path / "d", [], b'{"image": "\xff"}\n')
    r = subprocess.run([sys.executable, "train.py", "--stage", "tokenizer", "--data", str(data)], cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr == f"error: {data / 'captions.jsonl'}:1: not UTF-8 text (byte 0xff at offset 11)\n", r.stderr


def test_metrics_without_inception_weights_is_one_line(tmp_path, monkeypatch):
    """The missing weights and the hint at domain.py's metrics, in one line."""
    monkeypatch.setenv("TEXTOK_INCEPTION", str(tmp_path / "no-inception-weights.pth"))
    np.savez(tmp_path / "ref.npz", images())
    with pytest.raises(SystemExit) as err:
        run_main(lambda: metrics.main([str(tmp_path / "ref.npz")] * 2))
    message = err.value.code
    assert isinstance(message, str) and "\n" not in message, message
    assert "no-inception-weights.pth" in message and "python tools/domain.py SAMPLE.npz" in message, message


# ------------------------------------------------------------------------------------- a model's own code
def test_a_text_encoder_naming_its_own_code_never_runs_it(tmp_path, monkeypatch):
    """A copy of the offline encoder whose config.json names custom code: refused in one line naming the file,
    whatever transformers' [y/N] prompt would have been answered, and the code never runs."""
    import transformers.dynamic_module_utils

    import text_encoder
    from config import OFFLINE_TEXT_ENCODER
    monkeypatch.setattr(transformers.dynamic_module_utils, "HF_MODULES_CACHE", str(tmp_path / "modules"))
    monkeypatch.setattr("builtins.input", lambda *args: "y")
    folder = remote_code_copy(Path(text_encoder.resolve(OFFLINE_TEXT_ENCODER)), tmp_path / "encoder",
                              tmp_path / "ran", base="Bert", model="AutoModel")
    for load in (text_encoder.encoder_config, text_encoder.TextEncoder):
        with pytest.raises(InputError, match=rf"^{folder / 'config.json'}: names custom model code \(auto_map\)"):
            load(str(folder))
    assert not (tmp_path / "ran").exists()


# ------------------------------------------------------------------------------------- stage 2's class count
def test_stage2_class_count_is_the_tokenizers_unless_stated(tmp_path, models):
    """Labels 0..2 with a tokenizer of 8 classes: the DiT gets 8 classes (not max(label) + 1 = 3), or what
    --num-classes states; a class-conditioned TexTok refuses a count above its own."""
    data = folder(tmp_path / "data", [{"image": f"{i}.png", "caption": f"c{i}", "label": i % 3} for i in range(8)])
    TexTok(tiny_config(conditioning="none")).save_pretrained(tmp_path / "base")
    argv = ["--stage", "dit", "--tokenizer", str(tmp_path / "base"), "--data", str(data), "--batch-size", "4",
            "--log-every", "1", "--ckpt-every", "100", "--warmup-steps", "1", *_train(tmp_path)]
    for extra, want in [([], 8), (["--num-classes", "3"], 3)]:
        out = train.main(argv + extra + ["--out", str(tmp_path / f"out{want}")])
        assert load_json(out / "config.json")["num_classes"] == want
        assert load_json(out / "dit" / "config.json")["dit"]["num_classes"] == want
    with pytest.raises(InputError, match=r"--num-classes 9: the class-conditioned TexTok .* embeds only 8 classes"):
        train.main(argv + ["--tokenizer", str(models / "tok_class"), "--num-classes", "9"])
