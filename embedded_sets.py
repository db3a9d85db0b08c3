"""The embedded captioned image sets: built in, procedurally generated, no download (`--set`).

shapes (the default): deterministic scenes of one to three shapes with colour, size and position on a background,
described in a caption (like the paper's descriptive captions, App. D). Each image also holds detail its caption does
not state (position jitter, rotation, shading, texture, noise), so the tokens still have work to do. The class label is
the shape of the first object. glyphs and one-shape: one large object per image (a letter or digit; a shape), the
token-limited setting of the mechanism harness. Each class has a pool of held-out captions (for class-conditional
sampling, §3.2); `ShuffledCaptions` is the shuffled-caption control. Splits draw from disjoint seed streams, so train,
validation and the caption pool never share a seed.
"""
import math
import re

import numpy as np
from PIL import Image, ImageDraw
from torch.utils.data import Dataset

from runtime.errors import InputError
from runtime.images import to_tensor


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


def _contrasting_colour(rng: np.random.Generator, background: str) -> str:
    """A colour that stands out from `background` (summed RGB difference above 120)."""
    return str(rng.choice([c for c in COLORS if np.abs(np.subtract(COLORS[c], BACKGROUNDS[background])).sum() > 120]))


def make_scene(rng: np.random.Generator) -> dict:
    """Draws a scene: background, 1-3 objects (shape, colour, size, 3x3 cell), and the unstated details."""
    bg = str(rng.choice(list(BACKGROUNDS)))
    cells = rng.permutation(9)[: rng.integers(1, 4)]
    objects = []
    for cell in cells:
        colour = _contrasting_colour(rng, bg)
        objects.append(dict(shape=str(rng.choice(SHAPES)), colour=colour, size=str(rng.choice(list(SIZES))),
                            row=int(cell) // 3, col=int(cell) % 3,
                            jitter=rng.uniform(-0.08, 0.08, 2), angle=rng.uniform(0, 2 * math.pi),
                            shade=rng.uniform(0.55, 1.0), shade_dir=rng.uniform(0, 2 * math.pi),
                            stripes=rng.uniform() < 0.3, stripe_freq=rng.uniform(8, 16)))
    return dict(background=bg, bg_tilt=rng.uniform(-0.25, 0.25), noise=rng.uniform(0.0, 0.06),
                objects=objects, noise_seed=int(rng.integers(2 ** 31)))


CAPTION_STYLES = ("full", "short", "class")  # Tab. 4a: detailed caption, short caption, class-name template


def class_caption(name: str) -> str:
    """Tab. 4a's class-name caption, the "class" caption style of every set: "An image of a sneaker." ("an" before a
    vowel)."""
    return f"An image of {'an' if name[:1].lower() in 'aeiou' else 'a'} {name}."


def caption(scene: dict, style: str = "full") -> str:
    """The scene's caption. "full" (the descriptive caption, like the paper's 75 words): every object's size,
    colour, shape and place, and the background; "short" (like 25 words): each object's colour and shape; "class"
    (Tab. 4a's class-name template): the first object's shape, the class label."""
    if style == "class":
        return class_caption(scene["objects"][0]["shape"])
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


# ---------------------------------------------------------------------- one-object sets (the mechanism harness)
GLYPHS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
OBJECT_SETS = {"glyphs": list(GLYPHS), "one-shape": SHAPES}  # --set: glyphs (toy-mechanism's); one-shape, held out
OBJECT_PLACES = {"on the left": -0.17, "in the center": 0.0, "on the right": 0.17}  # horizontal offset / image side


def make_object_scene(rng: np.random.Generator, family: str) -> dict:
    """One large object of `family` (OBJECT_SETS): what the caption names (object, colour, place, background) and
    what only the tokens can carry (jitter, size, rotation, shading, stripes, background tilt, noise)."""
    bg = str(rng.choice(list(BACKGROUNDS)))
    colour = _contrasting_colour(rng, bg)
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
        return class_caption(name)
    if style == "short":
        return f"A {scene['colour']} {name}."
    return f"A {scene['colour']} {name} {scene['place']}, on a {scene['background']} background."


# --------------------------------------------------------------------------- captions read back (the classifiers)
PLACES = {_place(row, col): 3 * row + col for row in range(3) for col in range(3)}  # caption phrase -> cell


def _alternatives(words) -> str:
    """A regex group matching any of `words`, the longest first ("at the top left" before "at the top")."""
    return "(" + "|".join(sorted(words, key=len, reverse=True)) + ")"


FIRST_OBJECT = re.compile(f"an? {_alternatives(SIZES)} {_alternatives(COLORS)} {_alternatives(SHAPES)} "
                          f"{_alternatives(PLACES)}")  # `caption`'s "a {size} {colour} {shape} {place}"


def read_caption(text: str, family: str = "shapes") -> dict:
    """The inverse of `caption` / `object_caption`: what a caption of the set `family` says of its first object.
    shapes (a "full" caption): {"label": shape index, "colour": colour index, "cell": 3x3 cell}; a one-object set
    (any style): {"label": the object's index in OBJECT_SETS[family]}. A caption not in the set's style is an
    InputError."""
    if family == "shapes":
        match = FIRST_OBJECT.search(text)
        if match is None:
            raise InputError(f"caption names no object as the embedded set does (a SIZE COLOUR SHAPE PLACE): "
                             f"{text!r}")
        _, colour, shape, place = match.groups()
        return {"label": SHAPES.index(shape), "colour": list(COLORS).index(colour), "cell": PLACES[place]}
    words, objects = text.rstrip(".").replace(",", "").split(), OBJECT_SETS[family]
    if family == "glyphs":  # "... letter B ..." / "... digit 7 ..."
        found = [words[i + 1] for i, w in enumerate(words[:-1]) if w in ("letter", "digit")]
    else:
        found = [w for w in words if w in objects]
    if not found or found[0] not in objects:
        raise InputError(f"caption names no object of the {family} set: {text!r}")
    return {"label": objects.index(found[0])}


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
        try:  # a JSONL set's packed captions (data.Strings): a view, no string copied
            self.captions = dataset.captions[self.perm]
        except TypeError:  # a list
            self.captions = [dataset.captions[j] for j in self.perm]
        self.labels, self.masks = dataset.labels, getattr(dataset, "masks", None)

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        return self.dataset[i]

    def identity(self, **kwargs) -> str:
        return f"{self.dataset.identity(**kwargs)}-shuffled"

    def scan(self, **kwargs) -> None:
        self.dataset.scan(**kwargs)


def embedded_caption_pool(family: str = "shapes", num_classes: int = 8, per_class: int = 32, seed: int = 0,
                          captions: str = "full") -> dict:
    """Held-out captions per class of the embedded set `family` (style `captions`): {label: [captions]}, drawn from
    its `pool` split, never seen in training."""
    if num_classes > len(OBJECT_SETS.get(family, SHAPES)):
        raise InputError(f"set {family!r} has {len(OBJECT_SETS.get(family, SHAPES))} classes, not {num_classes}")
    pool, i = {c: [] for c in range(num_classes)}, 0
    while min(len(v) for v in pool.values()) < per_class:
        rng = np.random.default_rng([SPLITS["pool"], seed, i])
        if family == "shapes":
            scene = make_scene(rng)
            label, text = SHAPES.index(scene["objects"][0]["shape"]), caption(scene, captions)
        else:
            scene = make_object_scene(rng, family)
            label, text = OBJECT_SETS[family].index(scene["object"]), object_caption(scene, captions)
        if label < num_classes and len(pool[label]) < per_class:
            pool[label].append(text)
        i += 1
    return pool
