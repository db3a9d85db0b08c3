"""Captioned image data on disk, the JSONL folder layout (the one place that knows it), and the step sampler.

JSONL layout (`--data DIR`): `DIR/captions.jsonl`, one line per image,
    {"image": "relative/path.jpg", "caption": "a detailed description ...", "label": 3}
("label" is optional; it is needed for class-conditional generation: an integer in 0..num_classes-1). The file is
UTF-8, one JSON object per "\\n"-ended line. Images are turned upright (EXIF orientation), made 8-bit RGB (16-bit and
float images scaled, transparent pixels composited on white), center-cropped and resized to the configured resolution.
ImageNet with captions fits this layout. Validation is a fixed, seeded 10% of DIR unless a second folder is given.
`make_datasets` gives (train, val) of a folder or of an embedded set (embedded_sets.py); `step_loader` the batches of
training steps start..stop.
"""
import hashlib
import json
import os
from array import array
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image, ImageOps
from torch.utils.data import DataLoader, Dataset

from conditions import collate
from embedded_sets import ObjectDataset, SPLITS, ShapesDataset, ShuffledCaptions, embedded_caption_pool
from runtime.distributed import rank_share
from runtime.errors import InputError, MissingInput
from runtime.files import read_lines, save_json, writing
from runtime.images import to_tensor


IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}  # what an image folder may hold
MATTE = (255, 255, 255)  # transparent pixels are composited on white


def to_rgb(im: Image.Image, path) -> Image.Image:
    """8-bit RGB from any mode Pillow opens: 16-bit (I;16) and 32-bit integer (I) grey scaled from 0..65535, float (F)
    grey from [0, 1] (values outside are refused), transparency (RGBA, LA, P with a transparent colour) composited on
    white (MATTE)."""
    if im.mode.startswith("I") or im.mode == "F":
        x = np.asarray(im, np.float64)
        top = 1.0 if im.mode == "F" else 65535.0
        if not (np.isfinite(x).all() and 0 <= x.min() and x.max() <= top):
            raise InputError(f"{path}: mode {im.mode} image with values in [{x.min():g}, {x.max():g}]; expected "
                             f"[0, {top:g}] (save it as 8- or 16-bit RGB)")
        im = Image.fromarray(np.round(x * (255 / top)).astype(np.uint8))
    if im.has_transparency_data:
        return Image.alpha_composite(Image.new("RGBA", im.size, (*MATTE, 255)), im.convert("RGBA")).convert("RGB")
    try:
        return im.convert("RGB")
    except ValueError:
        raise InputError(f"{path}: image mode {im.mode} cannot be converted to RGB") from None


def load_image(path: Path, size: int) -> np.ndarray:
    """Opens an image, turns it upright (its EXIF orientation), makes it 8-bit RGB (`to_rgb`: wider modes scaled,
    transparency on white), center-crops it to a square and resizes it to `size` (bicubic): uint8 [size, size, 3]."""
    try:
        with Image.open(path) as im:
            im = to_rgb(ImageOps.exif_transpose(im), path)
            w, h = im.size
            s = min(w, h)
            im = im.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
            return np.array(im.resize((size, size), Image.BICUBIC))
    except FileNotFoundError:
        raise MissingInput(f"{path}: image file not found") from None
    except OSError as e:
        raise InputError(f"{path}: cannot read image ({e})") from None


def _is_label(value) -> bool:
    """A class label in JSON: an integer >= 0 (not a bool, a float or a string)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def read_jsonl(path, digest=None):
    """(line number, object) for each non-blank line of a JSONL file (UTF-8, lines split on "\\n" only), read a line
    at a time; a line that is not a JSON object is an error naming it. `digest` is fed the file's bytes."""
    for n, line in enumerate(read_lines(path, digest), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{path}:{n}: not valid JSON ({e})") from None
        if not isinstance(row, dict):
            kind = {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(type(row), "a number")
            raise InputError(f"{path}:{n}: expected a JSON object, got {kind}")
        yield n, row


class Strings(Sequence):
    """Many strings held as one UTF-8 byte buffer with each one's (start, end) offsets, all numpy arrays: a million
    captions or paths are three arrays, not a million Python objects that every DataLoader worker would copy page by
    page as it touches their reference counts (copy-on-read, pytorch/pytorch#13246). `s[i]` decodes one (a Path
    under `root` when given); `s[a:b]` and `s[index_array]` are views sharing the buffer."""

    def __init__(self, buffer: np.ndarray, starts: np.ndarray, ends: np.ndarray, root: Path | None = None):
        self.buffer, self.starts, self.ends, self.root = buffer, starts, ends, root

    @classmethod
    def pack(cls, buffer: bytearray, ends: array, root: Path | None = None) -> "Strings":
        """The strings whose encodings end at `ends` in `buffer` (both kept, not copied)."""
        ends = np.frombuffer(ends, np.int64)
        return cls(np.frombuffer(buffer, np.uint8), np.concatenate([[0], ends[:-1]]).astype(np.int64), ends, root)

    def __len__(self):
        return len(self.starts)

    def __getitem__(self, i):
        if isinstance(i, (slice, np.ndarray, list)):
            return Strings(self.buffer, self.starts[i], self.ends[i], self.root)
        text = self.buffer[self.starts[i]: self.ends[i]].tobytes().decode("utf-8", "surrogatepass")
        return text if self.root is None else self.root / text

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def __eq__(self, other):  # as a list compares
        return isinstance(other, Sequence) and not isinstance(other, str) and list(self) == list(other)

    __hash__ = None


class JsonlTable(NamedTuple):
    """captions.jsonl read once: its path and sha1, and per listed image its line, path (a Path under the folder),
    caption and label (-1: none)."""
    path: Path
    sha1: str
    lines: np.ndarray
    images: Strings
    captions: Strings
    labels: np.ndarray


def read_captions_jsonl(root) -> JsonlTable:
    """`root`/captions.jsonl (module docstring) read once, a line at a time, into packed arrays; a line without an
    image path or a caption, or with a label that is not an integer >= 0, is an error naming it."""
    path = Path(root) / "captions.jsonl"
    if not path.is_file():
        raise MissingInput(f"{path}: not found; --data DIR needs DIR/captions.jsonl (see README)")
    digest, lines, labels = hashlib.sha1(), array("q"), array("q")
    text, ends = {"image": bytearray(), "caption": bytearray()}, {"image": array("q"), "caption": array("q")}
    for n, row in read_jsonl(path, digest):
        if not isinstance(row.get("image"), str):
            raise InputError(f"{path}:{n}: missing \"image\" path")
        if not isinstance(row.get("caption"), str) or not row["caption"].strip():
            raise InputError(f"{path}:{n}: missing or empty caption for {row['image']}")
        if "label" in row and not _is_label(row["label"]):
            raise InputError(f"{path}:{n}: \"label\" must be an integer >= 0, got {row['label']!r}")
        if row.get("label", 0) >= 2 ** 63:
            raise InputError(f"{path}:{n}: \"label\" {row['label']} is too large for a class index")
        for key in text:
            text[key] += row[key].encode("utf-8", "surrogatepass")
            ends[key].append(len(text[key]))
        lines.append(n)
        labels.append(row.get("label", -1))
    if not lines:
        raise InputError(f"{path}: no images listed")
    return JsonlTable(path, digest.hexdigest(), np.frombuffer(lines, np.int64),
                      Strings.pack(text["image"], ends["image"], Path(root)),
                      Strings.pack(text["caption"], ends["caption"]), np.frombuffer(labels, np.int64))


def _hash_list(h, values: np.ndarray, chunk: int = 65536) -> None:
    """Feeds `h` the text of the Python list of the integers `values` ("[0, 1, 2]"), a chunk at a time."""
    h.update(b"[")
    for at in range(0, len(values), chunk):
        h.update(((", " if at else "") + ", ".join(map(str, values[at: at + chunk].tolist()))).encode())
    h.update(b"]")


class JsonlDataset(Dataset):
    """A folder with `captions.jsonl` (module docstring); `indices` selects a subset (for the held-out split), of
    `table` when the file was read already (read_captions_jsonl). Paths, captions, lines and labels are packed
    arrays (`Strings`, numpy int64; label -1: none), so DataLoader workers copy nothing as they read them."""

    def __init__(self, root, size: int, indices=None, table: JsonlTable | None = None):
        self.root, self.size = Path(root), size
        table = table or read_captions_jsonl(self.root)
        self.jsonl, self.jsonl_sha1 = table.path, table.sha1
        self.indices = np.arange(len(table.lines)) if indices is None else np.asarray(indices, np.int64)
        self.lines = table.lines[self.indices]  # captions.jsonl line of each selected image
        self.files, self.captions = table.images[self.indices], table.captions[self.indices]
        self.labels = table.labels[self.indices]
        self._identity = None  # identity(), once computed

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        return dict(image=to_tensor(load_image(self.files[i], self.size)), index=i)

    def scan(self, threads: int = 16, show: int = 10, rank: int = 0, world: int = 1) -> None:
        """Checks, in parallel, that every listed image exists and its header decodes; raises one InputError naming
        up to `show` bad files and their count, so a bad file stops a run before its first step. With `world` ranks
        (all must call it), each checks a contiguous share and all raise the same error."""
        share = rank_share(len(self.files), rank, world)
        bad = [p for p in parallel_map(image_problem, self.files[share.start: share.stop], threads) if p]
        if world > 1:
            parts = [None] * world
            dist.all_gather_object(parts, bad)
            bad = [p for part in parts for p in part]
        if bad:
            raise InputError(f"{self.root / 'captions.jsonl'}: {len(bad)} of {len(self.files)} listed images are bad: "
                             + "; ".join(bad[:show]) + ("; ..." if len(bad) > show else ""))

    def identity(self, rank: int = 0, world: int = 1) -> str:
        """A hash of what determines the items: captions.jsonl's content, the selected rows, the resolution, and each
        image file's size and modification time (a replaced image changes it). Computed once per object (at launch):
        with `world` ranks (all must call it), rank 0 stats the images and sends the result to the others."""
        if self._identity is None:
            value = [self._hash_files() if rank == 0 else None]
            if world > 1:
                dist.broadcast_object_list(value, 0)
            self._identity = value[0]
        return self._identity

    def _hash_files(self) -> str:
        h = hashlib.sha1(f"{self.jsonl_sha1}|".encode())
        _hash_list(h, self.indices)
        h.update(f"|{self.size}".encode())
        for f, st in zip(self.files, parallel_map(Path.stat, self.files)):  # many stat calls in flight (NFS)
            h.update(f"|{f}|{st.st_size}|{st.st_mtime_ns}".encode())
        return f"{self.root.name}-{h.hexdigest()[:16]}"


def scan_once(dataset, cache_dir, rank: int = 0, world: int = 1) -> None:
    """`dataset.scan` (every listed image exists and its header decodes) once per data set: a clean scan is recorded
    in `cache_dir`/scans/ under the data set's identity (captions.jsonl's sha1, the selected rows, the resolution,
    each image's size and mtime: one stat per image, by rank 0 alone, shared with the other ranks), so a later launch
    of either stage skips it unless captions.jsonl or an image's size or mtime changed. All ranks must call it; the
    record lives where all ranks see it (the shared --cache-dir)."""
    record = Path(cache_dir) / "scans" / dataset.identity(rank=rank, world=world)
    done = [record.is_file() if rank == 0 else None]
    if world > 1:
        dist.broadcast_object_list(done, 0)
    if done[0]:
        return
    dataset.scan(rank=rank, world=world)
    if rank == 0:
        with writing(record.parent, " (--cache-dir must be a writable folder)"):
            record.parent.mkdir(parents=True, exist_ok=True)
            save_json({"images": len(dataset), "bad": 0}, record)


def check_labels(dataset, num_classes: int, needed_by: str) -> None:
    """Refuses an image without a label or with one outside 0..num_classes-1 (an embedding lookup would fail mid-run),
    naming its captions.jsonl line; `needed_by` says what reads the labels."""
    if num_classes < 1:
        raise InputError(f"--num-classes {num_classes}: {needed_by} needs at least 1 class")
    labels = np.asarray(dataset.labels)
    bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
    if len(bad):
        i, label = bad[0], labels[bad[0]]
        where = f"{dataset.jsonl}:{dataset.lines[i]}" if isinstance(dataset, JsonlDataset) else \
            f"embedded set {dataset.identity()}, image {i}"
        found = "no \"label\"" if label < 0 else f"label {label}"
        raise InputError(f"{where}: {found}; {needed_by} needs a label in 0..{num_classes - 1} for every image "
                         f"({len(bad)} of {len(dataset.labels)} are not; --num-classes states the count)")


def image_problem(path) -> str | None:
    """Why image file `path` cannot be read ("<path>: <problem>"), from its header and PIL's verify (a PNG's chunk
    CRCs), without decoding the pixels; None for a readable image."""
    try:
        with Image.open(path) as im:
            im.verify()
    except FileNotFoundError:
        return f"{path}: image file not found"
    except Exception as e:  # PIL raises many types for undecodable data
        return f"{path}: cannot read image ({e})"
    return None


def parallel_map(fn, items, threads: int = 16, chunk: int = 4096):
    """fn over items in `threads` threads, in order; a chunk at a time, so a million items never wait as futures."""
    with ThreadPoolExecutor(threads) as pool:
        for i in range(0, len(items), chunk):
            yield from pool.map(fn, items[i: i + chunk])


def split_indices(n: int, val_fraction: float = 0.1, seed: int = 0):
    """A fixed, seeded split of range(n) into (train, val) index lists, val holding `val_fraction`."""
    perm = np.random.default_rng(seed).permutation(n)
    k = max(1, int(round(n * val_fraction)))
    return sorted(perm[k:].tolist()), sorted(perm[:k].tolist())


def jsonl_image_path(root, out, file) -> str:
    """An image's path as captions.jsonl holds it: relative to the folder of `out` (the captions.jsonl)."""
    return Path(os.path.relpath(Path(root) / file, Path(out).parent)).as_posix()


def jsonl_line(image: str, caption: str, label: int | None = None) -> str:
    """One line of captions.jsonl (module docstring), newline included: the layout's one writer (caption.py)."""
    row = {"image": image, "caption": caption, **({} if label is None else {"label": int(label)})}
    return json.dumps(row, ensure_ascii=False) + "\n"


def make_datasets(data=None, val=None, size: int = 32, num_images: int = 4096, seed: int = 0, captions: str = "full",
                  family: str = "shapes", shuffle_captions: bool = False):
    """(train, val) datasets: the JSONL folder `data` (and `val`, else a seeded 10% of `data`), or the embedded set
    `family` ("shapes" with captions of style `captions` (CAPTION_STYLES), or a one-object set of OBJECT_SETS). With
    `shuffle_captions`, both splits' captions are permuted across their images (ShuffledCaptions, seeded)."""
    if shuffle_captions:
        train, val = make_datasets(data, val, size, num_images, seed, captions, family)
        return ShuffledCaptions(train, [seed, SPLITS["train"]]), ShuffledCaptions(val, [seed, SPLITS["val"]])
    if data is None and family != "shapes":
        return (ObjectDataset(family, "train", size, num_images, seed, captions),
                ObjectDataset(family, "val", size, max(64, num_images // 16), seed, captions))
    if data is None:
        return (ShapesDataset("train", size, num_images, seed, captions),
                ShapesDataset("val", size, max(64, num_images // 16), seed, captions))
    if val is not None:
        return JsonlDataset(data, size), JsonlDataset(val, size)
    table = read_captions_jsonl(data)  # read once, for both splits
    train_idx, val_idx = split_indices(len(table.lines), 0.1, seed)
    return JsonlDataset(data, size, train_idx, table), JsonlDataset(data, size, val_idx, table)


def class_caption_pool(data=None, num_classes: int = 8, per_class: int = 32, seed: int = 0, captions: str = "full",
                       family: str = "shapes") -> dict:
    """Held-out captions per class for class-conditional sampling (§3.2): {label: [captions]}.

    Embedded set `family`: `embedded_sets.embedded_caption_pool`. JSONL folder: `DIR/class_captions.jsonl`
    ({"label": int, "caption": str} per line), as the paper pre-generates unseen captions per category."""
    if data is None:
        return embedded_caption_pool(family, num_classes, per_class, seed, captions)
    pool = {c: [] for c in range(num_classes)}
    path = Path(data) / "class_captions.jsonl"
    if not path.is_file():
        raise MissingInput(f"{path}: not found; class-conditional sampling needs held-out captions per class")
    for n, row in read_jsonl(path):
        label, text = row.get("label"), row.get("caption")
        if not _is_label(label) or label >= num_classes:
            raise InputError(f"{path}:{n}: expected an integer \"label\" in 0..{num_classes - 1}, got {label!r}")
        if not isinstance(text, str) or not text.strip():
            raise InputError(f"{path}:{n}: missing or empty caption")
        pool[label].append(text)
    return pool


class StepBatches:
    """Batch sampler: step s of epoch e = s // steps_per_epoch reads a fixed slice of a permutation seeded by
    (seed, e), split across ranks. Starting at `start_step` makes resume exact without replaying the loader."""

    def __init__(self, n, batch, rank, world, seed, start_step, total_steps):
        self.n, self.batch, self.rank, self.world, self.seed = n, batch, rank, world, seed
        self.start, self.total = start_step, total_steps
        self.per_epoch = max(1, n // (batch * world))

    def __len__(self):
        return self.total - self.start

    def __iter__(self):
        perm, perm_epoch = None, None
        for step in range(self.start, self.total):
            epoch, k = divmod(step, self.per_epoch)
            if epoch != perm_epoch:  # one permutation per epoch (n can be 1.28M)
                g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
                perm, perm_epoch = torch.randperm(self.n, generator=g).repeat(2), epoch
            at = (k * self.world + self.rank) * self.batch
            yield perm[at: at + self.batch].tolist()


def step_loader(dataset, batch, rank, world, seed, start, total, workers):
    """Steps `start`..`total` of this rank's batches (`StepBatches`) of a `conditions.Conditioned` data set, collated
    into {"image" or "Z", "cond", "index"}, each batch's condition completed in this process (`Conditioned.complete`:
    the caption embeddings when they are encoded on the fly)."""
    loader = DataLoader(dataset, batch_sampler=StepBatches(len(dataset), batch, rank, world, seed, start, total),
                        num_workers=workers, collate_fn=collate, pin_memory=torch.cuda.is_available())
    return map(dataset.complete, loader)
