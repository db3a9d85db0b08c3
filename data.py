"""Captioned image data: the embedded procedural shapes set and the JSONL folder layout (the one place that knows it).

JSONL layout (`--data DIR`): `DIR/captions.jsonl`, one line per image,
    {"image": "relative/path.jpg", "caption": "a detailed description ...", "label": 3}
("label" is optional; it is needed for class-conditional generation: an integer in 0..num_classes-1). The file is
UTF-8, one JSON object per "\\n"-ended line. Images are turned upright (EXIF orientation), made 8-bit RGB (16-bit and
float images scaled, transparent pixels composited on white), center-cropped and resized to the configured resolution.
ImageNet with captions fits this layout. Validation is a fixed, seeded 10% of DIR unless a second folder is given.

Embedded set: deterministic scenes of one to three shapes with colour, size and position on a background, described
in a caption (like the paper's descriptive captions, App. D). Each image also holds detail its caption does not state
(position jitter, rotation, shading, texture, noise), so the tokens still have work to do. The class label is the
shape of the first object; each class has a pool of held-out captions (for class-conditional sampling, §3.2).
Splits draw from disjoint seed streams, so train, validation and the caption pool never share a seed.
"""
import hashlib
import json
import math
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image, ImageDraw, ImageOps
from torch.utils.data import DataLoader, Dataset, default_collate

from common import InputError, MissingInput, rank_share, read_lines
from text_encoder import TextEncoder, cached_text_embeddings

SHAPES = ["circle", "square", "triangle", "star", "hexagon", "diamond", "cross", "ring"]
COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (240, 210, 40),
          "orange": (245, 140, 30), "purple": (140, 60, 190), "cyan": (40, 200, 210), "pink": (240, 130, 180),
          "white": (245, 245, 245), "black": (20, 20, 20), "brown": (130, 80, 40), "gray": (128, 128, 128)}
BACKGROUNDS = {"light gray": (200, 200, 200), "dark gray": (60, 60, 60), "beige": (225, 210, 170),
               "navy": (20, 30, 80), "sky blue": (150, 200, 240), "pale green": (190, 230, 190)}
SIZES = {"small": 0.13, "medium": 0.2, "large": 0.28}  # radius as a fraction of the image side
ROWS, COLS = ["top", "middle", "bottom"], ["left", "center", "right"]
SPLITS = {"train": 0, "val": 1, "pool": 2}  # each split has its own seed stream


def _place(row: int, col: int) -> str:
    if (row, col) == (1, 1):
        return "in the center"
    if row == 1:
        return f"on the {COLS[col]}"
    if col == 1:
        return f"at the {ROWS[row]}"
    return f"at the {ROWS[row]} {COLS[col]}"


def make_scene(rng: np.random.Generator) -> dict:
    """Draws a scene: background, 1-3 objects (shape, colour, size, 3x3 cell), and the unstated details."""
    bg = str(rng.choice(list(BACKGROUNDS)))
    cells = rng.permutation(9)[: rng.integers(1, 4)]
    objects = []
    for cell in cells:
        colour = str(rng.choice([c for c in COLORS if np.abs(np.subtract(COLORS[c], BACKGROUNDS[bg])).sum() > 120]))
        objects.append(dict(shape=str(rng.choice(SHAPES)), colour=colour, size=str(rng.choice(list(SIZES))),
                            row=int(cell) // 3, col=int(cell) % 3,
                            jitter=rng.uniform(-0.08, 0.08, 2), angle=rng.uniform(0, 2 * math.pi),
                            shade=rng.uniform(0.55, 1.0), shade_dir=rng.uniform(0, 2 * math.pi),
                            stripes=rng.uniform() < 0.3, stripe_freq=rng.uniform(8, 16)))
    return dict(background=bg, bg_tilt=rng.uniform(-0.25, 0.25), noise=rng.uniform(0.0, 0.06),
                objects=objects, noise_seed=int(rng.integers(2 ** 31)))


CAPTION_STYLES = ("full", "short", "class")  # Tab. 4a: detailed caption, short caption, class-name template


def caption(scene: dict, style: str = "full") -> str:
    """The scene's caption. "full" (the descriptive caption, like the paper's 75 words): every object's size,
    colour, shape and place, and the background; "short" (like 25 words): each object's colour and shape; "class"
    (Tab. 4a's class-name template): the first object's shape, the class label."""
    if style == "class":
        return f"An image of a {scene['objects'][0]['shape']}."
    if style == "short":
        parts = [f"a {o['colour']} {o['shape']}" for o in scene["objects"]]
    else:
        parts = [f"a {o['size']} {o['colour']} {o['shape']} {_place(o['row'], o['col'])}" for o in scene["objects"]]
    body = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return f"An image of {body}." if style == "short" else f"An image of {body}, on a {scene['background']} background."


def _outline(shape: str, cx: float, cy: float, r: float, angle: float) -> list:
    """Polygon vertices of `shape` (circles and rings are drawn as 48-gons)."""
    def poly(n, radii):
        return [(cx + radii[k % len(radii)] * r * math.cos(angle + 2 * math.pi * k / n),
                 cy + radii[k % len(radii)] * r * math.sin(angle + 2 * math.pi * k / n)) for k in range(n)]
    if shape in ("circle", "ring"):
        return poly(48, [1.0])
    if shape == "star":
        return poly(10, [1.0, 0.45])
    if shape == "cross":
        a = 0.35
        pts = [(a, 1), (a, a), (1, a), (1, -a), (a, -a), (a, -1), (-a, -1), (-a, -a), (-1, -a), (-1, a), (-a, a), (-a, 1)]
        c, s = math.cos(angle), math.sin(angle)
        return [(cx + r * (x * c - y * s), cy + r * (x * s + y * c)) for x, y in pts]
    n = {"square": 4, "triangle": 3, "hexagon": 6, "diamond": 4}[shape]
    radii = [1.0, 0.6] if shape == "diamond" else [1.0]
    return poly(n, radii)


def _background(scene: dict, yy: np.ndarray) -> np.ndarray:
    """The scene's background colour [size, size, 3] under its vertical brightness tilt."""
    tilt = 1 + scene["bg_tilt"] * (yy - 0.5)
    return np.asarray(BACKGROUNDS[scene["background"]], np.float32)[None, None] * tilt[..., None]


def _paint(img: np.ndarray, m: np.ndarray, o: dict, cx: float, cy: float, diagonal: np.ndarray) -> np.ndarray:
    """`img` with object `o` composited through its mask `m` [size, size, 1]: its colour under a shading gradient toward
    shade_dir from its centre (cx, cy, in image sides), with stripes along `diagonal` on striped objects."""
    yy, xx = np.mgrid[0:img.shape[0], 0:img.shape[1]].astype(np.float32) / img.shape[0]
    u = (xx - cx) * math.cos(o["shade_dir"]) + (yy - cy) * math.sin(o["shade_dir"])
    shade = o["shade"] + (1 - o["shade"]) * (0.5 + 0.5 * np.tanh(4 * u))
    if o["stripes"]:
        shade = shade * (0.85 + 0.15 * np.sign(np.sin(o["stripe_freq"] * 2 * math.pi * diagonal)))
    fill = np.asarray(COLORS[o["colour"]], np.float32)[None, None] * shade[..., None]
    return img * (1 - m) + fill * m


def _noised(img: np.ndarray, scene: dict) -> np.ndarray:
    """The scene's seeded pixel noise added, as uint8."""
    img = img + 255 * scene["noise"] * np.random.default_rng(scene["noise_seed"]).standard_normal(img.shape)
    return np.clip(img, 0, 255).round().astype(np.uint8)


def render(scene: dict, size: int) -> np.ndarray:
    """Renders a scene as uint8 [size, size, 3] (4x supersampled masks for smooth edges)."""
    S = 4 * size
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    img = _background(scene, yy)
    for o in scene["objects"]:
        r = SIZES[o["size"]] * S
        cx, cy = (o["col"] + 0.5 + o["jitter"][0] * 3) * S / 3, (o["row"] + 0.5 + o["jitter"][1] * 3) * S / 3
        canvas = Image.new("L", (S, S), 0)
        draw = ImageDraw.Draw(canvas)
        draw.polygon(_outline(o["shape"], cx, cy, r, o["angle"]), fill=255)
        if o["shape"] == "ring":
            draw.polygon(_outline("circle", cx, cy, 0.55 * r, 0.0), fill=0)
        m = np.asarray(canvas.resize((size, size), Image.BILINEAR), np.float32)[..., None] / 255
        img = _paint(img, m, o, cx / S, cy / S, xx + yy)
    return _noised(img, scene)


def to_tensor(img: np.ndarray) -> torch.Tensor:
    """uint8 [H, W, 3] -> float [3, H, W] in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1).float() / 127.5 - 1


class ShapesDataset(Dataset):
    """The embedded captioned shapes set: item i of `split` is drawn from seed (split, seed, i) and rendered once
    (per loader worker), on first use: 12 MB for 4096 images of 32 px."""

    def __init__(self, split: str = "train", size: int = 32, num_images: int = 4096, seed: int = 0,
                 captions: str = "full"):
        if captions not in CAPTION_STYLES:
            raise InputError(f"caption style {captions!r}: choose from {CAPTION_STYLES}")
        self.size, self.split, self.seed, self.style = size, split, seed, captions
        self.scenes = [make_scene(np.random.default_rng([SPLITS[split], seed, i])) for i in range(num_images)]
        self.captions = [caption(s, captions) for s in self.scenes]
        self.labels = [SHAPES.index(s["objects"][0]["shape"]) for s in self.scenes]
        self.images = [None] * num_images  # uint8 renders, filled on first use

    def __len__(self):
        return len(self.scenes)

    def __getitem__(self, i):
        if self.images[i] is None:
            self.images[i] = render(self.scenes[i], self.size)
        return dict(image=to_tensor(self.images[i]), index=i)

    def identity(self) -> str:
        """What determines the items: the generator's split, seed, count and size."""
        return f"shapes-{self.split}-{self.seed}-{len(self)}-{self.size}px-{self.style}"


BACKGROUND = (255, 255, 255)  # transparent pixels are composited on white


def to_rgb(im: Image.Image, path) -> Image.Image:
    """8-bit RGB from any mode Pillow opens: 16-bit (I;16) and 32-bit integer (I) grey scaled from 0..65535, float (F)
    grey from [0, 1] (values outside are refused), transparency (RGBA, LA, P with a transparent colour) composited on
    white (BACKGROUND)."""
    if im.mode.startswith("I") or im.mode == "F":
        x = np.asarray(im, np.float64)
        top = 1.0 if im.mode == "F" else 65535.0
        if not (np.isfinite(x).all() and 0 <= x.min() and x.max() <= top):
            raise InputError(f"{path}: mode {im.mode} image with values in [{x.min():g}, {x.max():g}]; expected "
                             f"[0, {top:g}] (save it as 8- or 16-bit RGB)")
        im = Image.fromarray(np.round(x * (255 / top)).astype(np.uint8))
    if im.has_transparency_data:
        return Image.alpha_composite(Image.new("RGBA", im.size, (*BACKGROUND, 255)), im.convert("RGBA")).convert("RGB")
    try:
        return im.convert("RGB")
    except ValueError:
        raise InputError(f"{path}: image mode {im.mode} cannot be converted to RGB") from None


# ---------------------------------------------------------------------- one-object sets (the mechanism harness)
GLYPHS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
OBJECT_SETS = {"glyphs": list(GLYPHS), "shape": SHAPES}  # --set: glyphs (toy-mechanism's); shape, held out
OBJECT_PLACES = {"on the left": -0.17, "in the center": 0.0, "on the right": 0.17}  # horizontal offset / image side


def make_object_scene(rng: np.random.Generator, family: str) -> dict:
    """One large object of `family` (OBJECT_SETS): what the caption names (object, colour, place, background) and
    what only the tokens can carry (jitter, size, rotation, shading, stripes, background tilt, noise)."""
    bg = str(rng.choice(list(BACKGROUNDS)))
    colour = str(rng.choice([c for c in COLORS if np.abs(np.subtract(COLORS[c], BACKGROUNDS[bg])).sum() > 120]))
    return dict(family=family, object=str(rng.choice(OBJECT_SETS[family])), colour=colour, background=bg,
                place=str(rng.choice(list(OBJECT_PLACES))), jitter=rng.uniform(-0.06, 0.06, 2),
                scale=rng.uniform(0.75, 1.0), angle=rng.uniform(-0.35, 0.35), shade=rng.uniform(0.55, 1.0),
                shade_dir=rng.uniform(0, 2 * math.pi), stripes=rng.uniform() < 0.3, stripe_freq=rng.uniform(6, 12),
                bg_tilt=rng.uniform(-0.25, 0.25), noise=rng.uniform(0.0, 0.04), noise_seed=int(rng.integers(2 ** 31)))


def object_caption(scene: dict, style: str = "full") -> str:
    """The caption. "full" fixes the layout: "A red letter B on the left, on a navy background."; "short" (Tab. 4a's
    short caption): "A red letter B."; "class" (the class-name template): "An image of a letter B." """
    kind = ("digit" if scene["object"].isdigit() else "letter") if scene["family"] == "glyphs" else ""
    name = f"{kind} {scene['object']}" if kind else scene["object"]
    if style == "class":
        return f"An image of a {name}."
    if style == "short":
        return f"A {scene['colour']} {name}."
    return f"A {scene['colour']} {name} {scene['place']}, on a {scene['background']} background."


_FONTS = {}


def _font(size: int):
    """PIL's bundled scalable default font (no system fonts), one instance per size."""
    if size not in _FONTS:
        from PIL import ImageFont
        _FONTS[size] = ImageFont.load_default(size=size)
    return _FONTS[size]


def render_object(scene: dict, size: int) -> tuple:
    """(uint8 image [size, size, 3], float object mask [size, size] in [0, 1]); masks 4x supersampled."""
    S = 4 * size
    cx = (0.5 + OBJECT_PLACES[scene["place"]] + scene["jitter"][0]) * S
    cy = (0.5 + scene["jitter"][1]) * S
    canvas = Image.new("L", (S, S), 0)
    draw = ImageDraw.Draw(canvas)
    if scene["family"] == "glyphs":  # a bold glyph about 0.75 of the side high, rotated about its centre
        draw.text((cx, cy), scene["object"], fill=255, font=_font(round(scene["scale"] * S)), anchor="mm",
                  stroke_width=round(0.05 * scene["scale"] * S), stroke_fill=255)
        canvas = canvas.rotate(math.degrees(scene["angle"]), resample=Image.BILINEAR, center=(cx, cy))
    else:
        draw.polygon(_outline(scene["object"], cx, cy, 0.4 * scene["scale"] * S, scene["angle"] - math.pi / 2),
                     fill=255)
        if scene["object"] == "ring":
            draw.polygon(_outline("circle", cx, cy, 0.22 * scene["scale"] * S, 0.0), fill=0)
    m = np.asarray(canvas.resize((size, size), Image.BILINEAR), np.float32) / 255
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    img = _paint(_background(scene, yy), m[..., None], scene, cx / S, cy / S, xx - yy)
    return _noised(img, scene), m


class ObjectDataset(Dataset):
    """A one-object captioned set (`family` of OBJECT_SETS), rendered once: item i of `split` is drawn from seed
    (split, seed, i); the label is the object's index in its family; `masks` [M, size, size] are the objects'."""

    def __init__(self, family: str = "glyphs", split: str = "train", size: int = 32, num_images: int = 4096,
                 seed: int = 0, captions: str = "full"):
        if family not in OBJECT_SETS:
            raise InputError(f"set {family!r}: choose from {['shapes', *OBJECT_SETS]}")
        self.family, self.size, self.split, self.seed, self.style = family, size, split, seed, captions
        self.scenes = [make_object_scene(np.random.default_rng([SPLITS[split], seed, i]), family)
                       for i in range(num_images)]
        self.captions = [object_caption(s, captions) for s in self.scenes]
        self.labels = [OBJECT_SETS[family].index(s["object"]) for s in self.scenes]
        pairs = [render_object(s, size) for s in self.scenes]
        self.images = np.stack([p[0] for p in pairs])
        self.masks = np.stack([p[1] for p in pairs])

    def __len__(self):
        return len(self.scenes)

    def __getitem__(self, i):
        return dict(image=to_tensor(self.images[i]), index=i)

    def identity(self) -> str:
        return f"{self.family}-{self.split}-{self.seed}-{len(self)}-{self.size}px" + (
            "" if self.style == "full" else f"-{self.style}")


def derangement(n: int, seed) -> np.ndarray:
    """A seeded permutation of range(n) moving every index (one random n-cycle); identity for n < 2."""
    order = np.random.default_rng(seed).permutation(n)
    perm = np.arange(n)
    perm[order] = np.roll(order, -1)
    return perm


class ShuffledCaptions(Dataset):
    """The shuffled-caption control: `dataset` with caption i replaced by caption perm[i] of a seeded derangement;
    images, labels and masks stay with their images."""

    def __init__(self, dataset, seed):
        self.dataset, self.perm = dataset, derangement(len(dataset), seed)
        self.captions = [dataset.captions[j] for j in self.perm]
        self.labels, self.masks = dataset.labels, getattr(dataset, "masks", None)

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        return self.dataset[i]

    def identity(self) -> str:
        return f"{self.dataset.identity()}-shuffled"

    def scan(self, **kwargs) -> None:
        self.dataset.scan(**kwargs)


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


def read_jsonl(path) -> list:
    """(line number, object) for each non-blank line of a JSONL file (UTF-8, lines split on "\\n" only); a line that is
    not a JSON object is an error naming it."""
    rows = []
    for n, line in enumerate(read_lines(path), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{path}:{n}: not valid JSON ({e})") from None
        if not isinstance(row, dict):
            kind = {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(type(row), "a number")
            raise InputError(f"{path}:{n}: expected a JSON object, got {kind}")
        rows.append((n, row))
    return rows


class JsonlDataset(Dataset):
    """A folder with `captions.jsonl` (module docstring); `indices` selects a subset (for the held-out split)."""

    def __init__(self, root, size: int, indices=None):
        self.root, self.size = Path(root), size
        path = self.root / "captions.jsonl"
        if not path.is_file():
            raise MissingInput(f"{path}: not found; --data DIR needs DIR/captions.jsonl (see README)")
        rows = read_jsonl(path)
        for n, row in rows:
            if not isinstance(row.get("image"), str):
                raise InputError(f"{path}:{n}: missing \"image\" path")
            if not isinstance(row.get("caption"), str) or not row["caption"].strip():
                raise InputError(f"{path}:{n}: missing or empty caption for {row['image']}")
            if "label" in row and not _is_label(row["label"]):
                raise InputError(f"{path}:{n}: \"label\" must be an integer >= 0, got {row['label']!r}")
        if not rows:
            raise InputError(f"{path}: no images listed")
        self.jsonl, self.jsonl_sha1 = path, hashlib.sha1(path.read_bytes()).hexdigest()
        self.indices = list(range(len(rows))) if indices is None else list(indices)
        self.lines = [rows[i][0] for i in self.indices]  # captions.jsonl line of each selected image
        rows = [rows[i][1] for i in self.indices]
        self.files = [self.root / r["image"] for r in rows]
        self.captions = [r["caption"] for r in rows]
        self.labels = [r.get("label", -1) for r in rows]  # -1: no label

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        return dict(image=to_tensor(load_image(self.files[i], self.size)), index=i)

    def scan(self, threads: int = 16, show: int = 10, rank: int = 0, world: int = 1) -> None:
        """Checks, in parallel, that every listed image exists and its header decodes; raises one InputError naming
        up to `show` bad files and their count, so a bad file stops a run before its first step. With `world` ranks
        (all must call it), each checks a contiguous share and all raise the same error."""
        def problem(f):
            try:
                with Image.open(f) as im:
                    im.verify()
            except FileNotFoundError:
                return f"{f}: image file not found"
            except Exception as e:  # PIL raises many types for undecodable data
                return f"{f}: cannot read image ({e})"
        share = rank_share(len(self.files), rank, world)
        bad = [p for p in parallel_map(problem, self.files[share.start: share.stop], threads) if p]
        if world > 1:
            parts = [None] * world
            dist.all_gather_object(parts, bad)
            bad = [p for part in parts for p in part]
        if bad:
            raise InputError(f"{self.root / 'captions.jsonl'}: {len(bad)} of {len(self.files)} listed images are bad: "
                             + "; ".join(bad[:show]) + ("; ..." if len(bad) > show else ""))

    def identity(self) -> str:
        """A hash of what determines the items: captions.jsonl's content, the selected rows, the resolution, and each
        image file's size and modification time (a replaced image changes it)."""
        h = hashlib.sha1(f"{self.jsonl_sha1}|{self.indices}|{self.size}".encode())
        for f, st in zip(self.files, parallel_map(Path.stat, self.files)):  # many stat calls in flight (NFS)
            h.update(f"|{f}|{st.st_size}|{st.st_mtime_ns}".encode())
        return f"{self.root.name}-{h.hexdigest()[:16]}"


def check_labels(dataset, num_classes: int, needed_by: str) -> None:
    """Refuses an image without a label or with one outside 0..num_classes-1 (an embedding lookup would fail mid-run),
    naming its captions.jsonl line; `needed_by` says what reads the labels."""
    if num_classes < 1:
        raise InputError(f"--num-classes {num_classes}: {needed_by} needs at least 1 class")
    bad = [i for i, label in enumerate(dataset.labels) if not 0 <= label < num_classes]
    if bad:
        i, label = bad[0], dataset.labels[bad[0]]
        where = f"{dataset.jsonl}:{dataset.lines[i]}" if isinstance(dataset, JsonlDataset) else \
            f"embedded set {dataset.identity()}, image {i}"
        found = "no \"label\"" if label < 0 else f"label {label}"
        raise InputError(f"{where}: {found}; {needed_by} needs a label in 0..{num_classes - 1} for every image "
                         f"({len(bad)} of {len(dataset.labels)} are not; --num-classes states the count)")


def parallel_map(fn, items: list, threads: int = 16, chunk: int = 4096):
    """fn over items in `threads` threads, in order; a chunk at a time, so a million items never wait as futures."""
    with ThreadPoolExecutor(threads) as pool:
        for i in range(0, len(items), chunk):
            yield from pool.map(fn, items[i: i + chunk])


def split_indices(n: int, val_fraction: float = 0.1, seed: int = 0):
    """A fixed, seeded split of range(n) into (train, val) index lists, val holding `val_fraction`."""
    perm = np.random.default_rng(seed).permutation(n)
    k = max(1, int(round(n * val_fraction)))
    return sorted(perm[k:].tolist()), sorted(perm[:k].tolist())


def jsonl_line(image: str, caption: str, label: int | None = None) -> str:
    """One line of captions.jsonl (module docstring), newline included: the layout's one writer (caption.py)."""
    row = {"image": image, "caption": caption, **({} if label is None else {"label": int(label)})}
    return json.dumps(row, ensure_ascii=False) + "\n"


def make_datasets(data=None, val=None, size: int = 32, num_images: int = 4096, seed: int = 0, captions: str = "full",
                  set: str = "shapes", shuffle_captions: bool = False):
    """(train, val) datasets: the JSONL folder `data` (and `val`, else a seeded 10% of `data`), or the embedded set
    `set` ("shapes" with captions of style `captions` (CAPTION_STYLES), or a one-object set of OBJECT_SETS). With
    `shuffle_captions`, both splits' captions are permuted across their images (ShuffledCaptions, seeded)."""
    if shuffle_captions:
        train, val = make_datasets(data, val, size, num_images, seed, captions, set)
        return ShuffledCaptions(train, [seed, SPLITS["train"]]), ShuffledCaptions(val, [seed, SPLITS["val"]])
    if data is None and set != "shapes":
        return (ObjectDataset(set, "train", size, num_images, seed, captions),
                ObjectDataset(set, "val", size, max(64, num_images // 16), seed, captions))
    if data is None:
        return (ShapesDataset("train", size, num_images, seed, captions),
                ShapesDataset("val", size, max(64, num_images // 16), seed, captions))
    if val is not None:
        return JsonlDataset(data, size), JsonlDataset(val, size)
    n = len(JsonlDataset(data, size))
    train_idx, val_idx = split_indices(n, 0.1, seed)
    return JsonlDataset(data, size, train_idx), JsonlDataset(data, size, val_idx)


def class_caption_pool(data=None, num_classes: int = 8, per_class: int = 32, seed: int = 0, captions: str = "full",
                       set: str = "shapes") -> dict:
    """Held-out captions per class for class-conditional sampling (§3.2): {label: [captions]}.

    Embedded set `set`: captions (style `captions`) of its `pool` split, never seen in training. JSONL folder:
    `DIR/class_captions.jsonl` ({"label": int, "caption": str} per line), as the paper pre-generates unseen captions
    per category."""
    pool = {c: [] for c in range(num_classes)}
    if data is None:
        if num_classes > len(OBJECT_SETS.get(set, SHAPES)):
            raise InputError(f"set {set!r} has {len(OBJECT_SETS.get(set, SHAPES))} classes, not {num_classes}")
        i = 0
        while min(len(v) for v in pool.values()) < per_class:
            rng = np.random.default_rng([SPLITS["pool"], seed, i])
            if set == "shapes":
                scene = make_scene(rng)
                label, text = SHAPES.index(scene["objects"][0]["shape"]), caption(scene, captions)
            else:
                scene = make_object_scene(rng, set)
                label, text = OBJECT_SETS[set].index(scene["object"]), object_caption(scene, captions)
            if label < num_classes and len(pool[label]) < per_class:
                pool[label].append(text)
            i += 1
        return pool
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


class Cond(NamedTuple):
    """The condition of one image or a batch (§3.2), the one object TexTok, the latent cache, DiT and sample.py read:
    the frozen encoder's caption embeddings `text` [B, N_t, C] (float32, from the fp16 cache) with their padding mask
    `text_mask` [B, N_t] (True = real token), and the class `label` [B] (long). Fields nobody reads are None."""
    text: torch.Tensor | None = None
    text_mask: torch.Tensor | None = None
    label: torch.Tensor | None = None

    def to(self, device, non_blocking: bool = False) -> "Cond":
        return Cond(*(None if v is None else v.to(device, non_blocking=non_blocking) for v in self))

    def part(self, index) -> "Cond":
        """The rows `index` (a slice or index tensor) of a batch's condition."""
        return Cond(*(None if v is None else v[index] for v in self))

    @staticmethod
    def stack(conds) -> "Cond":
        """One batch from per-item conditions."""
        return Cond(*(None if v[0] is None else torch.stack(v) for v in zip(*conds)))


def first_empty_row(mask, chunk: int = 65536):
    """The index of the first row of a text mask store (`common.NpyRows` [M, N_t]) with no real token, or None; read
    a chunk at a time, so memory does not grow with M."""
    for start in range(0, len(mask), chunk):
        empty = np.flatnonzero(~mask.read(start, min(start + chunk, len(mask))).any(axis=1))
        if len(empty):
            return start + int(empty[0])
    return None


class Conditions:
    """The conditions of a caption list: labels, and with `text_encoder` the captions' embeddings, from the one
    on-disk store (text_encoder.cached_text_embeddings: fp16, built once by the `world` ranks together, read a row at
    a time) or, with text_cache "off", encoded on the fly (`with_text`). Both give float32 rounded through fp16.
    `conds[i]` is one image's `Cond`; `conds.batch(indices)` a batch's."""

    def __init__(self, captions, labels, text_encoder=None, text_len: int = 128, cache_dir="cache", device="cpu",
                 text_cache: str = "on", precision: str = "auto", rank: int = 0, world: int = 1):
        self.labels = torch.as_tensor(labels, dtype=torch.long)
        self.emb = self.mask = self.on_the_fly = self.encoder = None
        if text_encoder is not None and text_cache == "off":
            self.captions, self.on_the_fly = list(captions), (text_encoder, text_len, device, precision)
        elif text_encoder is not None:
            self.emb, self.mask = cached_text_embeddings(text_encoder, text_len, list(captions), Path(cache_dir) / "text",
                                                         device=device, progress=True, rank=rank, world=world)
            empty = first_empty_row(self.mask)  # DiT's attention needs one real token per caption
            if empty is not None:
                raise InputError(f"{cache_dir}/text: caption {empty} has no text token in its mask "
                                 f"({captions[empty]!r}); delete the cache to recompute it")

    def __len__(self):
        return len(self.labels)

    def __getstate__(self):  # DataLoader workers (spawned) never run the on-the-fly encoder
        return {**self.__dict__, "encoder": None}

    def __getitem__(self, i) -> Cond:
        if self.emb is None:  # no text, or text encoded later (`with_text`)
            return Cond(label=self.labels[i])
        return Cond(torch.from_numpy(self.emb[i].astype(np.float32)), torch.from_numpy(self.mask[i]), self.labels[i])

    def batch(self, indices) -> Cond:
        return self.with_text(Cond.stack([self[int(i)] for i in indices]), indices)

    def with_text(self, cond: Cond, indices) -> Cond:
        """`cond`, the condition of the items `indices`, with their caption embeddings: as it is when they came from
        the store; encoded now with text_cache "off" (the frozen encoder on this batch, on `device`, bf16 autocast on
        CUDA with precision "auto")."""
        if self.on_the_fly is None:
            return cond
        name, text_len, device, precision = self.on_the_fly
        if self.encoder is None:
            self.encoder = TextEncoder(name, text_len, device)
        emb, mask = self.encoder([self.captions[int(i)] for i in indices], precision)
        return Cond(emb.half().float(), mask, cond.label)  # rounded through fp16, as the store holds it


def collate(items: list) -> dict:
    """Batches items {name: tensor or int, ..., "cond": Cond}: tensors stacked, conditions into one batch `Cond`."""
    return {k: Cond.stack([it[k] for it in items]) if k == "cond" else default_collate([it[k] for it in items])
            for k in items[0]}


class WithCond(Dataset):
    """Each item of a captioned data set with its condition `cond` (a `Cond`) added."""

    def __init__(self, dataset, conds: Conditions):
        self.dataset, self.conds = dataset, conds
        self.captions, self.labels = dataset.captions, dataset.labels

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        return {**self.dataset[i], "cond": self.conds[i]}


class LatentSet(Dataset):
    """Stage 2's items: the cached tokens Z [N, d] of image i with that image's condition."""

    def __init__(self, Z: torch.Tensor, conds: Conditions):
        self.Z, self.conds = Z, conds

    def __len__(self):
        return len(self.Z)

    def __getitem__(self, i):
        return {"Z": self.Z[i], "cond": self.conds[i], "index": i}


def conditioned(dataset, cfg, cache_dir="cache", device="cpu", text_cache: str = "on", precision: str = "auto",
                rank: int = 0, world: int = 1) -> WithCond:
    """`dataset` with the conditions a TexTok of config `cfg` reads: caption embeddings (when `cfg.conditioning` is
    "text") and labels. With `world` ranks, all must call it (they build the embedding store together)."""
    encoder = cfg.text_encoder if cfg.conditioning == "text" else None
    return WithCond(dataset, Conditions(dataset.captions, dataset.labels, encoder, cfg.text_len, cache_dir, device,
                                        text_cache, precision, rank, world))


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
    """Steps `start`..`total` of this rank's batches (`StepBatches`), collated into {"image" or "Z", "cond",
    "index"}; with captions encoded on the fly (text_cache "off"), their embeddings are added here, in this process."""
    loader = DataLoader(dataset, batch_sampler=StepBatches(len(dataset), batch, rank, world, seed, start, total),
                        num_workers=workers, collate_fn=collate, pin_memory=torch.cuda.is_available())
    conds = dataset.conds
    if conds.on_the_fly is None:
        return loader
    return ({**b, "cond": conds.with_text(b["cond"], b["index"])} for b in loader)
