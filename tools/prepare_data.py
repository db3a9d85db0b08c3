"""Turns the two layouts real captioned or labelled image sets come in into captions.jsonl (data.py's layout).

    python tools/prepare_data.py folder SRC OUT      # SRC/**/img.jpg + SRC/**/img.txt (its caption) -> OUT/captions.jsonl
    python tools/prepare_data.py idx train-images-idx3-ubyte.gz train-labels-idx1-ubyte.gz OUT --class-names fashion-mnist

folder: every image under SRC (recursively; hidden files and folders left out) with a same-name .txt caption beside
it; the caption is stripped and its whitespace runs, newlines included, folded to one space. An image without a caption
(missing or empty .txt) is refused, naming the first, unless --skip-uncaptioned; so is one that train.py would refuse
(its header, and a PNG's chunks, checked as train.py does) or whose file name is not UTF-8. Image paths are written
relative to OUT (the folder data.JsonlDataset resolves them from), so OUT == SRC writes captions.jsonl in place.

idx: MNIST / Fashion-MNIST IDX files (gzipped or not): each image becomes OUT/images/NNNNN.png (greyscale as stored;
the loader makes it RGB and resizes it), captions.jsonl gets its label and the class-name caption ("An image of a
sneaker.", embedded_sets.class_caption: the "class" template, Tab. 4a), and class_captions.jsonl that caption once
per class; --first N keeps the first N images only.

Nothing is written before all input is read and checked; files are written atomically, and an existing
OUT/captions.jsonl (idx: also OUT/images/, OUT/class_captions.jsonl) is replaced only with --overwrite.
"""
import argparse
import gzip
import json
import math
import os
import shutil
import struct
import sys
import tempfile
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for `python tools/prepare_data.py`
from data import IMAGE_SUFFIXES, image_problem, jsonl_image_path, jsonl_line, parallel_map
from embedded_sets import class_caption
from runtime.errors import InputError, MissingInput, run_main
from runtime.files import atomic_write, check_folder, read_lines, remove_path, writing


CLASS_NAMES = {  # label order of the IDX label files
    "mnist": [f"digit {d}" for d in range(10)],
    "fashion-mnist": ["t-shirt/top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
                      "ankle boot"],
}


def main(argv=None):
    parser = argparse.ArgumentParser(description="Write captions.jsonl (README's layout) for a captioned image "
                                                 "folder or MNIST-style IDX files")
    sub = parser.add_subparsers(dest="mode", required=True)
    folder = sub.add_parser("folder", help="images with a same-name .txt caption beside each (recursively)")
    folder.add_argument("src", help="image folder")
    folder.add_argument("out", help="folder for captions.jsonl (SRC itself: in place)")
    folder.add_argument("--skip-uncaptioned", action="store_true", help="leave out images without a caption "
                                                                         "instead of refusing them")
    idx = sub.add_parser("idx", help="MNIST / Fashion-MNIST IDX image and label files (.gz or not)")
    idx.add_argument("images", help="images IDX file (idx3-ubyte)")
    idx.add_argument("labels", help="labels IDX file (idx1-ubyte)")
    idx.add_argument("out", help="output folder: images/, captions.jsonl, class_captions.jsonl")
    idx.add_argument("--class-names", required=True, help="mnist, fashion-mnist, or a file with one class name a "
                                                          "line (line i: label i)")
    idx.add_argument("--first", type=int, default=None, help="keep only the first N images (a subset that trains "
                                                             "on a CPU; default: all)")
    for p in (folder, idx):
        p.add_argument("--overwrite", action="store_true", help="replace what an earlier run wrote in OUT")
    args = parser.parse_args(argv)
    out = Path(args.out)
    check_folder(out, "OUT")
    if args.mode == "folder":
        files, captions, skipped = captioned_images(Path(args.src), args.skip_uncaptioned)
        refuse_existing([out / "captions.jsonl"], args.overwrite)
        paths = [jsonl_image_path(args.src, out / "captions.jsonl", f) for f in files]
        for f, p in zip(files, paths):
            utf8_name(Path(args.src) / f, p)
        bad = [p for p in parallel_map(image_problem, [Path(args.src) / f for f in files]) if p]
        if bad:  # train.py's scan would refuse them: say so here, where the user is
            raise InputError(bad[0] + (f" (and {len(bad) - 1} more of {len(files)} images)" if len(bad) > 1 else ""))
        with writing(out):
            write_text(out / "captions.jsonl", [jsonl_line(p, c) for p, c in zip(paths, captions)])
        print(f"{out / 'captions.jsonl'}: {len(paths)} images" + (f" ({skipped} without a caption left out)"
                                                                  if skipped else ""))
    else:
        images, labels = read_idx(args.images, 3), read_idx(args.labels, 1)
        if len(labels) != len(images):
            raise InputError(f"{args.labels}: {len(labels)} labels, but {args.images} holds {len(images)} images")
        if args.first is not None:
            if args.first < 1:
                raise InputError(f"--first: must be >= 1, got {args.first}")
            images, labels = images[: args.first], labels[: args.first]
        names = class_names(args.class_names)
        if labels.max() >= len(names):
            i = int(np.argmax(labels >= len(names)))
            raise InputError(f"{args.labels}: label {labels[i]} (item {i}) but --class-names {args.class_names} "
                             f"names {len(names)} classes")
        refuse_existing([out / "captions.jsonl", out / "class_captions.jsonl"], args.overwrite, [out / "images"])
        pool = [{"label": c, "caption": class_caption(n)} for c, n in enumerate(names)]  # README's held-out captions
        with writing(out):
            files = write_images(images, out / "images")
            write_text(out / "class_captions.jsonl", [json.dumps(row, ensure_ascii=False) + "\n" for row in pool])
            write_text(out / "captions.jsonl", [jsonl_line(f, class_caption(names[y]), y)
                                                for f, y in zip(files, labels)])
        print(f"{out / 'captions.jsonl'}: {len(files)} images of {len(names)} classes")


def captioned_images(src: Path, skip: bool) -> tuple[list, list, int]:
    """(image paths relative to `src`, sorted; their captions; the number skipped) of the images under `src` with a
    same-name .txt caption; the first without one (missing or empty) is refused unless `skip`."""
    if not src.is_dir():
        raise MissingInput(f"{src}: no such folder")
    files, captions, skipped = [], [], 0
    for path in sorted(p for p in src.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()):
        name = path.relative_to(src)
        if any(part.startswith(".") for part in name.parts):
            continue
        txt = path.with_suffix(".txt")
        text = " ".join(w for line in read_lines(txt) for w in line.split()) if txt.is_file() else ""
        if not text:
            if skip:
                skipped += 1
                continue
            problem = "is empty" if txt.is_file() else "not found"
            raise InputError(f"{path}: its caption {txt.name} {problem} (--skip-uncaptioned leaves such images out)")
        files.append(name.as_posix())
        captions.append(text)
    if not files:
        raise InputError(f"{src}: no captioned images ({', '.join(sorted(IMAGE_SUFFIXES))} with a .txt beside)")
    return files, captions, skipped


def read_idx(path, ndim: int) -> np.ndarray:
    """The uint8 array of an IDX file (gzipped or not): magic 0x0000, type 0x08 (unsigned byte), `ndim` big-endian
    uint32 dimensions, then exactly their product of bytes; anything else is an InputError naming the file."""
    try:
        raw = Path(path).read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except FileNotFoundError:
        raise MissingInput(f"{path}: file not found") from None
    except (OSError, EOFError, zlib.error) as e:  # BadGzipFile, a cut or corrupt stream
        raise InputError(f"{path}: cannot read the gzip stream ({e})") from None
    what = "images (n, rows, cols)" if ndim == 3 else "labels (n)"
    if len(raw) < 4 or raw[:2] != b"\0\0":
        raise InputError(f"{path}: not an IDX file (magic {raw[:4].hex() or 'missing'}, expected 0000080{ndim})")
    if raw[2] != 0x08:
        raise InputError(f"{path}: IDX element type 0x{raw[2]:02x}; only 0x08 (unsigned byte) is read")
    if raw[3] != ndim:
        raise InputError(f"{path}: an IDX of {raw[3]} dimensions; expected {ndim}: {what}")
    head = 4 + 4 * ndim
    if len(raw) < head:
        raise InputError(f"{path}: IDX header cut short ({len(raw)} bytes; {head} needed)")
    dims = struct.unpack(f">{ndim}I", raw[4:head])
    if 0 in dims:
        raise InputError(f"{path}: IDX dimensions {dims}: no {what.split()[0]}")
    size = math.prod(dims)  # a Python int: np.prod in int64 wraps (2^31 x 2^31 x 4 is 0)
    if len(raw) - head != size:
        raise InputError(f"{path}: {len(raw) - head} data bytes; its dimensions {dims} need {size}")
    return np.frombuffer(raw, np.uint8, offset=head).reshape(dims)


def class_names(spec: str) -> list:
    """The class names of --class-names: a built-in set (CLASS_NAMES) or a file's non-blank lines, in label order."""
    if spec in CLASS_NAMES:
        return CLASS_NAMES[spec]
    if not Path(spec).is_file():
        raise MissingInput(f"{spec}: class-name file not found (or use {' or '.join(CLASS_NAMES)})")
    names = [line.strip() for line in read_lines(spec) if line.strip()]
    if not names:
        raise InputError(f"{spec}: no class names in it")
    return names


def refuse_existing(files: list, overwrite: bool, folders: list = ()) -> None:
    """Refuses to replace any of `files` and `folders` that exists, unless `overwrite`; and always one of the other
    kind (a folder where a file is written, or a file where a folder is), which --overwrite does not replace."""
    held = [p for p in [*files, *folders] if p.exists()]
    for p in held:
        if p.is_dir() != (p in folders):
            kind = ("folder", "file") if p.is_dir() else ("file", "folder")
            raise InputError(f"{p}: a {kind[0]} where prepare_data writes a {kind[1]}; move it away")
    if held and not overwrite:
        raise InputError(f"{held[0]}: exists; --overwrite replaces it")


def utf8_name(path: Path, name: str) -> None:
    """Refuses an image whose path in captions.jsonl, `name`, is not UTF-8 text (a file name in another encoding)."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError as e:
        shown = os.fsencode(path).decode("utf-8", "backslashreplace")
        raise InputError(f"{shown}: its name is not UTF-8 (byte 0x{ord(e.object[e.start]) - 0xDC00:02x}), and "
                         "captions.jsonl is UTF-8 text; rename it") from None


def write_text(path: Path, lines: list) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text("".join(lines), encoding="utf-8"))


def write_images(images: np.ndarray, folder: Path) -> list:
    """Writes images [n, rows, cols] as greyscale PNGs NNNNN.png into a hidden folder beside `folder`, then renames it
    to `folder` (an earlier one is removed after): never half a folder. Returns their paths relative to its parent."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    width = max(5, len(str(len(images) - 1)))
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}-"))
    try:
        names = [f"{i:0{width}d}.png" for i in range(len(images))]
        for name, image in zip(names, images):
            Image.fromarray(image).save(tmp / name)
        old = folder.parent / f"{tmp.name}-old"
        if folder.exists():
            os.replace(folder, old)
        os.replace(tmp, folder)
        remove_path(old)  # a link that stood at `folder`: the link alone
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return [f"{folder.name}/{n}" for n in names]


if __name__ == "__main__":
    run_main(main)
