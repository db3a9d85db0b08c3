"""prepare_data.py: captioned folders and MNIST-style IDX files into captions.jsonl, read back through the loader."""
import gzip
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import skimage.data
from PIL import Image

from data import JsonlDataset, class_caption_pool, make_datasets
from runtime.errors import InputError, run_main
from tools import prepare_data


ROOT = Path(__file__).resolve().parents[1]


def idx_bytes(array: np.ndarray) -> bytes:
    """An IDX file's bytes: magic 0x0000, type 0x08, the dimension count, big-endian uint32 dims, the uint8 data."""
    head = bytes([0, 0, 8, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return head + array.astype(np.uint8).tobytes()


def write_idx(path: Path, array: np.ndarray, gz: bool = False) -> Path:
    data = idx_bytes(array)
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


def digits(n=7, side=28):
    """n greyscale images [n, side, side], image i a vertical ramp plus 30 i (each distinct), and labels 9 - i."""
    ramp = np.linspace(0, 100, side)[:, None].repeat(side, 1)
    return np.stack([ramp + 30 * i for i in range(n)]).astype(np.uint8), np.arange(9, 9 - n, -1).astype(np.uint8)


def error_line(argv) -> str:
    """The one line `run_main` exits with for prepare_data's `argv`."""
    with pytest.raises(SystemExit) as err:
        run_main(lambda: prepare_data.main([str(a) for a in argv]))
    message = err.value.code
    assert isinstance(message, str) and "\n" not in message, message
    return message


# ----------------------------------------------------------------------------------------------------------- idx
@pytest.mark.parametrize("gz", [False, True])
def test_idx_mode_reads_back_through_the_loader(tmp_path, gz):
    images, labels = digits()
    suffix = ".gz" if gz else ""
    prepare_data.main(["idx", str(write_idx(tmp_path / f"img-idx3-ubyte{suffix}", images, gz)),
                       str(write_idx(tmp_path / f"lab-idx1-ubyte{suffix}", labels, gz)), str(tmp_path / "out"),
                       "--class-names", "fashion-mnist"])
    ds = JsonlDataset(tmp_path / "out", 28)
    assert len(ds) == 7 and ds.labels.tolist() == labels.tolist()
    assert ds.captions[0] == "An image of an ankle boot." and ds.captions[2] == "An image of a sneaker."
    for i in range(7):  # greyscale as stored, 3 equal channels at the stored size
        x = ((ds[i]["image"] + 1) * 127.5).round().numpy()
        assert x.shape == (3, 28, 28) and (x == images[i]).all()
    train, val = make_datasets(tmp_path / "out", size=32)
    assert (len(train), len(val)) == (6, 1) and train[0]["image"].shape == (3, 32, 32)
    pool = class_caption_pool(tmp_path / "out", 10)
    assert pool[0] == ["An image of a t-shirt/top."] and pool[9] == ["An image of an ankle boot."]
    assert all(len(v) == 1 for v in pool.values())


def test_idx_class_names_mnist_and_file(tmp_path):
    images, labels = digits(3)
    img, lab = write_idx(tmp_path / "i", images), write_idx(tmp_path / "l", labels - 7)  # labels 2, 1, 0
    prepare_data.main(["idx", str(img), str(lab), str(tmp_path / "m"), "--class-names", "mnist"])
    assert JsonlDataset(tmp_path / "m", 8).captions == [f"An image of a digit {d}." for d in (2, 1, 0)]
    (tmp_path / "names.txt").write_text("owl\n\ncat\nemu\n")
    prepare_data.main(["idx", str(img), str(lab), str(tmp_path / "f"), "--class-names", str(tmp_path / "names.txt")])
    assert JsonlDataset(tmp_path / "f", 8).captions == ["An image of an emu.", "An image of a cat.",
                                                        "An image of an owl."]


def test_idx_first_keeps_the_first_images(tmp_path):
    images, labels = digits()
    argv = ["idx", str(write_idx(tmp_path / "i", images)), str(write_idx(tmp_path / "l", labels)),
            str(tmp_path / "out"), "--class-names", "fashion-mnist"]
    prepare_data.main(argv + ["--first", "3"])
    ds = JsonlDataset(tmp_path / "out", 28)
    assert len(ds) == 3 and ds.labels.tolist() == labels[:3].tolist()
    assert (((ds[2]["image"] + 1) * 127.5).round().numpy() == images[2]).all()
    with pytest.raises(InputError, match="--first: must be >= 1, got 0"):
        prepare_data.main(argv + ["--first", "0", "--overwrite"])


def test_overwrite_replaces_an_earlier_run(tmp_path):
    images, labels = digits(4)
    argv = ["idx", write_idx(tmp_path / "i", images), write_idx(tmp_path / "l", labels), tmp_path / "out",
            "--class-names", "fashion-mnist"]
    prepare_data.main([str(a) for a in argv])
    before = (tmp_path / "out" / "captions.jsonl").read_bytes()
    assert error_line(argv) == f"error: {tmp_path / 'out' / 'captions.jsonl'}: exists; --overwrite replaces it"
    write_idx(tmp_path / "i", images[:2]), write_idx(tmp_path / "l", labels[:2])
    prepare_data.main([str(a) for a in argv] + ["--overwrite"])
    assert (tmp_path / "out" / "captions.jsonl").read_bytes() != before
    assert len(JsonlDataset(tmp_path / "out", 8)) == 2
    assert sorted(p.name for p in (tmp_path / "out" / "images").iterdir()) == ["00000.png", "00001.png"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["captions.jsonl", "class_captions.jsonl",
                                                                     "images"]


# -------------------------------------------------------------------------------------------------------- folder
def test_folder_mode_recursive_captions_in_place_and_elsewhere(tmp_path):
    src = tmp_path / "src"
    for i, name in enumerate(["a/b/img001.jpg", "a/img002.PNG", "top.webp", ".hidden/x.png"]):
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((20, 30, 3), 50 * i, np.uint8)).save(src / name)
        (src / name).with_suffix(".txt").write_text(f"  caption {i}\nsecond line\r\n\n", encoding="utf-8")
    for out in (src, tmp_path / "elsewhere" / "out"):
        prepare_data.main(["folder", str(src), str(out)])
        ds = JsonlDataset(out, 16)
        assert ds.captions == [f"caption {i} second line" for i in (0, 1, 2)]  # sorted paths, hidden left out
        assert [f.resolve() for f in ds.files] == [(src / n).resolve() for n in ("a/b/img001.jpg", "a/img002.PNG",
                                                                                  "top.webp")]
        assert ds.labels.tolist() == [-1] * 3 and ds[2]["image"].shape == (3, 16, 16)
    rows = (tmp_path / "elsewhere" / "out" / "captions.jsonl").read_text()
    assert '"image": "../../src/a/b/img001.jpg"' in rows  # relative to OUT, as the loader resolves it


def test_folder_mode_skip_uncaptioned(tmp_path):
    for name in ("a.png", "b.png", "c.png"):
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / name)
    (tmp_path / "a.txt").write_text("one")
    (tmp_path / "c.txt").write_text(" \n")
    assert error_line(["folder", tmp_path, tmp_path]) == \
        f"error: {tmp_path / 'b.png'}: its caption b.txt not found (--skip-uncaptioned leaves such images out)"
    (tmp_path / "b.txt").write_text("two")
    assert error_line(["folder", tmp_path, tmp_path]).startswith(f"error: {tmp_path / 'c.png'}: its caption c.txt "
                                                                 "is empty")
    assert not (tmp_path / "captions.jsonl").exists()
    prepare_data.main(["folder", str(tmp_path), str(tmp_path), "--skip-uncaptioned"])
    assert JsonlDataset(tmp_path, 8).captions == ["one", "two"]


def block_mean(x: np.ndarray, size: int) -> np.ndarray:
    """A square image [s, s(, 3)] averaged over size x size blocks: what any resize to `size` approximates."""
    s = x.shape[0] // size
    return x.reshape(size, s, size, s, -1).astype(float).mean((1, 3))


def test_real_photographs_through_folder_mode_and_the_loader(tmp_path):
    """scikit-image's photographs: RGB, greyscale, non-square, RGBA with transparent pixels, 16-bit greyscale."""
    astronaut, camera, coffee = skimage.data.astronaut(), skimage.data.camera(), skimage.data.coffee()
    rgba = np.dstack([astronaut, np.full(camera.shape, 255, np.uint8)])
    rgba[:, :256] = (0, 255, 0, 0)  # the left half fully transparent over green
    photos = {"astronaut.png": astronaut, "camera.png": camera, "coffee.jpg": coffee,
              "coffee-square.png": coffee[:, 100:500], "rgba.png": rgba,
              "camera16.png": camera.astype(np.uint16) * 257}
    for name, x in photos.items():
        Image.fromarray(x).save(tmp_path / name, **({"quality": 100} if name.endswith(".jpg") else {}))
        (tmp_path / name).with_suffix(".txt").write_text(f"a photograph: {name}")
    assert Image.open(tmp_path / "rgba.png").mode == "RGBA" and Image.open(tmp_path / "camera16.png").mode == "I;16"
    prepare_data.main(["folder", str(tmp_path), str(tmp_path)])
    ds = JsonlDataset(tmp_path, 32)
    assert sorted(ds.captions) == sorted(f"a photograph: {n}" for n in photos)
    got = {f.name: ((ds[i]["image"] + 1) * 127.5).round().permute(1, 2, 0).numpy() for i, f in enumerate(ds.files)}
    assert all(x.shape == (32, 32, 3) for x in got.values())
    assert np.abs(got["astronaut.png"] - block_mean(astronaut, 32)).mean() < 6
    grey = got["camera.png"]
    assert (grey[..., 0] == grey[..., 1]).all() and (grey[..., 0] == grey[..., 2]).all()
    assert np.abs(grey[..., 0] - block_mean(camera, 32)[..., 0]).mean() < 6
    assert np.abs(got["camera16.png"] - grey).max() <= 1  # 16-bit scaled from 0..65535, not clipped white
    squashed = np.asarray(Image.fromarray(coffee).resize((32, 32), Image.BICUBIC), float)
    assert np.abs(got["coffee.jpg"] - got["coffee-square.png"]).mean() < 2  # the center square, not squashed
    assert np.abs(got["coffee.jpg"] - squashed).mean() > 10
    # transparent on white, not the green under it (away from the edge at 16: bicubic reaches 2 pixels across it)
    assert (got["rgba.png"][:, :14] == 255).all()
    np.testing.assert_allclose(got["rgba.png"][:, 18:], got["astronaut.png"][:, 18:], atol=1)


# ------------------------------------------------------------------------------------------------------ bad input
def bad_header(tmp_path):
    images, labels = digits()
    data = bytearray(idx_bytes(images))
    data[2] = 0x0D  # float element type
    (tmp_path / "i").write_bytes(data)
    return ["idx", tmp_path / "i", write_idx(tmp_path / "l", labels)], tmp_path / "i", "IDX element type 0x0d"


def bad_magic(tmp_path):
    images, labels = digits()
    (tmp_path / "i").write_bytes(b"\x12\x34" + idx_bytes(images)[2:])
    return ["idx", tmp_path / "i", write_idx(tmp_path / "l", labels)], tmp_path / "i", "not an IDX file (magic 1234"


def cut_data(tmp_path):
    images, labels = digits()
    (tmp_path / "i").write_bytes(idx_bytes(images)[:-5])
    return ["idx", tmp_path / "i", write_idx(tmp_path / "l", labels)], tmp_path / "i", \
        "5483 data bytes; its dimensions (7, 28, 28) need 5488"


def trailing_data(tmp_path):
    images, labels = digits()
    (tmp_path / "l").write_bytes(idx_bytes(labels) + b"\0")
    return ["idx", write_idx(tmp_path / "i", images), tmp_path / "l"], tmp_path / "l", \
        "8 data bytes; its dimensions (7,) need 7"


def swapped(tmp_path):
    images, labels = digits()
    return ["idx", write_idx(tmp_path / "l", labels), write_idx(tmp_path / "i", images)], tmp_path / "l", \
        "an IDX of 1 dimensions; expected 3"


def counts_differ(tmp_path):
    images, labels = digits()
    return ["idx", write_idx(tmp_path / "i", images), write_idx(tmp_path / "l", labels[:5])], tmp_path / "l", \
        f"5 labels, but {tmp_path / 'i'} holds 7 images"


def corrupt_gzip(tmp_path):
    images, labels = digits()
    (tmp_path / "i.gz").write_bytes(gzip.compress(idx_bytes(images))[:40])
    return ["idx", tmp_path / "i.gz", write_idx(tmp_path / "l", labels)], tmp_path / "i.gz", "cannot read the gzip"


def label_out_of_range(tmp_path):
    images, labels = digits()
    return ["idx", write_idx(tmp_path / "i", images), write_idx(tmp_path / "l", labels + 1)], tmp_path / "l", \
        "label 10 (item 0) but --class-names fashion-mnist names 10 classes"


def missing_caption(tmp_path):
    (tmp_path / "src" / "a").mkdir(parents=True)
    for name in ("a/x.png", "a/y.png"):
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "src" / name)
    (tmp_path / "src" / "a" / "x.txt").write_text("x")
    return ["folder", tmp_path / "src", tmp_path / "out"], tmp_path / "src" / "a" / "y.png", \
        "its caption y.txt not found"


def dims_wrap_int64(tmp_path):
    """Dimensions 2^31 x 2^31 x 4, whose product is 2^64: 0 in int64, as many bytes as the file holds."""
    (tmp_path / "i").write_bytes(b"\0\0\x08\x03" + struct.pack(">III", 2 ** 31, 2 ** 31, 4))
    return ["idx", tmp_path / "i", write_idx(tmp_path / "l", digits()[1])], tmp_path / "i", \
        "0 data bytes; its dimensions (2147483648, 2147483648, 4) need 18446744073709551616"


def idx_files(tmp_path, out, *flags):
    images, labels = digits()
    return ["idx", write_idx(tmp_path / "i", images), write_idx(tmp_path / "l", labels), out, "--class-names",
            "fashion-mnist", *flags]


def out_a_file(tmp_path):
    (tmp_path / "notes").write_text("notes\n")
    return idx_files(tmp_path, tmp_path / "notes"), tmp_path / "notes", "a file, not a folder (OUT)"


def out_inside_a_file(tmp_path):
    (tmp_path / "notes").write_text("notes\n")
    return idx_files(tmp_path, tmp_path / "notes" / "out"), tmp_path / "notes", \
        f"a file, not a folder (OUT); OUT {tmp_path / 'notes' / 'out'} would be inside it"


def images_a_file_with_overwrite(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "images").write_text("notes\n")
    return idx_files(tmp_path, tmp_path / "out", "--overwrite"), tmp_path / "out" / "images", \
        "a file where prepare_data writes a folder"


def captioned(tmp_path, name: bytes, content=None):
    """SRC with one image `name` (bytes, a PNG unless `content`) and its caption beside it."""
    src = tmp_path / "src"
    src.mkdir()
    image = os.path.join(os.fsencode(src), name)
    if content is None:
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(image, format="PNG")
    else:
        Path(os.fsdecode(image)).write_bytes(content)
    Path(os.fsdecode(image)).with_suffix(".txt").write_text("a caption")
    return src, Path(os.fsdecode(image))


def captions_a_folder_with_overwrite(tmp_path):
    src, _ = captioned(tmp_path, b"x.png")
    (tmp_path / "out" / "captions.jsonl").mkdir(parents=True)
    return ["folder", src, tmp_path / "out", "--overwrite"], tmp_path / "out" / "captions.jsonl", \
        "a folder where prepare_data writes a file"


def image_name_not_utf8(tmp_path):
    src, _ = captioned(tmp_path, b"caf\xe9.png")
    return ["folder", src, tmp_path / "out"], f"{src}/caf\\xe9.png", "its name is not UTF-8 (byte 0xe9)"


def empty_png(tmp_path):
    src, image = captioned(tmp_path, b"x.png", b"")
    return ["folder", src, tmp_path / "out"], image, "cannot read image (cannot identify image file"


def text_as_png(tmp_path):
    src, image = captioned(tmp_path, b"x.png", b"a caption, not an image\n")
    return ["folder", src, tmp_path / "out"], image, "cannot read image (cannot identify image file"


BAD = [bad_header, bad_magic, cut_data, trailing_data, swapped, counts_differ, corrupt_gzip, label_out_of_range,
       missing_caption, dims_wrap_int64, out_a_file, out_inside_a_file, images_a_file_with_overwrite, captions_a_folder_with_overwrite,
       image_name_not_utf8, empty_png, text_as_png]


def files_under(folder: Path) -> dict:
    return {p: p.read_bytes() if p.is_file() else None for p in sorted(folder.rglob("*"))}


@pytest.mark.parametrize("make", BAD, ids=[f.__name__ for f in BAD])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, make):
    argv, file, problem = make(tmp_path)
    if argv[0] == "idx" and "--class-names" not in argv:
        argv += [tmp_path / "out", "--class-names", "fashion-mnist"]
    before = files_under(tmp_path)
    message = error_line(argv)
    assert message.startswith(f"error: {file}: ") and problem in message, message
    assert files_under(tmp_path) == before


def test_bad_input_process_exits_1_without_a_traceback(tmp_path):
    (tmp_path / "i").write_bytes(b"\0\0\x08")
    r = subprocess.run([sys.executable, "tools/prepare_data.py", "idx", str(tmp_path / "i"), str(tmp_path / "l"),
                        str(tmp_path / "out"), "--class-names", "mnist"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 1 and r.stderr == f"error: {tmp_path / 'i'}: not an IDX file (magic 000008, expected " \
                                             "00000803)\n", r.stderr
