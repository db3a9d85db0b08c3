"""Classifiers of the embedded sets (embedded_sets.py), trained once by one trainer (`fit`) and cached: FID in their
feature space, and class / caption accuracy of samples. The shapes set's classifier (`ShapesClassifier`, the
`tools/domain.py` command below) and the one-object sets' (`ObjectClassifier`, the benches' "object FID").

    python tools/domain.py SAMPLE.npz --classes-in-turn       # domain FID against real held-out images, class accuracy
    python tools/domain.py SAMPLE.npz --ref REF.npz --captions-file samples/captions.txt  # caption accuracy too
    python tools/domain.py [--image-size 32]       # train (or load) the classifier, print its held-out accuracy

Offline, without the FID Inception weights, generation on the embedded set is measured with a small CNN trained on
that set: the Fréchet distance between its penultimate features on reference and sample images (evaluator.measures'
feature_statistics and frechet_distance), and how often its predictions agree with the condition a sample was drawn
for. This is FID in a domain feature space, for toy data; it is never FID-Inception, and its values compare only with
values from the same classifier (the same DomainSettings), never with published FIDs.

The classifier reads a scene as embedded_sets.make_scene lays it out: for each cell of the 3x3 grid, the shape and
the colour of the object there, or none. The class label (the shape of the first object) cannot be read off an image, since
nothing marks which object is first: a class-conditional sample counts as right when its class's shape is in it
(`class_accuracy`). A caption names the cell of its first object, whose shape and colour are checked there
(`caption_accuracy`). Its held-out accuracies are in docs/RESULTS.md §8 (`python tools/domain.py` prints them).

The classifier trains once per settings, deterministically (fixed seed; about a minute on a CPU), and is cached
as safetensors in CACHE/domain/.
"""
import argparse
import hashlib
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for `python tools/domain.py`
from embedded_sets import COLORS, OBJECT_SETS, SHAPES, SIZES, ObjectDataset, ShapesDataset, read_caption, render
from evaluator import measures, npz_batch
from runtime.distributed import autocast
from runtime.errors import InputError, MissingInput, run_main
from runtime.files import load_state, load_tensors, read_lines, save_tensors
from runtime.images import to_uint8


CELLS = 9  # embedded_sets.make_scene's 3x3 grid, row-major
NO_SHAPE, NO_COLOUR = len(SHAPES), len(COLORS)  # the class of an empty cell, after the shapes / colours
@dataclass(frozen=True)
class DomainSettings:
    """Everything the cached classifier depends on; its cache key."""
    image_size: int = 32  # of the training images; the classifier resizes any size to its 36 px
    num_images: int = 16384  # training scenes (the train split of embedded_sets.ShapesDataset)
    steps: int = 1000
    batch_size: int = 64
    lr: float = 3e-3
    width: int = 64  # features per cell: the domain features are [B, 9 * width]
    seed: int = 0
    precision: str = "auto"  # runtime.distributed.autocast's: fp32 on the CPU (bf16 is 7x slower without native bf16)
    version: int = 1  # bump when the network or the training changes

    def path(self, cache_dir) -> Path:
        """The weights file in `cache_dir`, named by a hash of the settings."""
        key = hashlib.sha1(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:12]
        return Path(cache_dir) / "domain" / f"shapes-{self.image_size}px-{key}.safetensors"


def _conv(cin, cout, stride=1, kernel=3, padding=1) -> list:
    return [nn.Conv2d(cin, cout, kernel, stride, padding, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]


class ShapesClassifier(nn.Module):
    """uint8 [B, H, W, 3] -> (features [B, 9 * width], shape logits [B, 9, 9], colour logits [B, 9, 13]): per cell of
    the 3x3 grid, scores for each shape / colour and, last, for an empty cell."""
    outputs = ("features", "shape", "colour")  # the names measures.compute_features gives them
    size = 36  # working resolution: 36 -> 18 -> 9 -> 3, one output per 12 px cell
    grid = 9  # positions of the trunk's output map

    def __init__(self, width: int = 64):
        super().__init__()
        self.trunk = nn.Sequential(*_conv(6, 32), *_conv(32, 64, 2), *_conv(64, 64), *_conv(64, 128, 2),
                                   *_conv(128, 128))
        self.cells = nn.Sequential(*_conv(128, width, 3, 3, 0))  # 3x3 stride 3: one output per cell
        self.shape = nn.Conv2d(width, NO_SHAPE + 1, 1)
        self.colour = nn.Conv2d(width, NO_COLOUR + 1, 1)
        self.dense = nn.Conv2d(128, NO_SHAPE + NO_COLOUR + 2, 1)  # training only: the same at each trunk position

    def encode(self, images):
        """uint8 [B, H, W, 3] -> trunk features [B, 128, 9, 9]. The input holds the image and its difference from the
        per-channel median, the background colour: the shapes' outlines stand out on every background."""
        x = images.permute(0, 3, 1, 2).float() / 127.5 - 1
        x = F.interpolate(x, size=self.size, mode="bilinear", antialias=True, align_corners=False)
        background = x.flatten(2).median(-1).values[..., None, None]
        return self.trunk(torch.cat([x, x - background], 1))

    def read_cells(self, h):
        """Trunk features -> (features, shape logits, colour logits) of the cells."""
        cells = self.cells(h)  # [B, width, 3, 3]
        return (cells.flatten(1), self.shape(cells).flatten(2).transpose(1, 2),
                self.colour(cells).flatten(2).transpose(1, 2))

    def forward(self, images):
        return self.read_cells(self.encode(images))


def targets(scenes, grid: int = ShapesClassifier.grid) -> tuple:
    """Training targets of embedded_sets.make_scene scenes: the shape and colour class of each cell (long [N, 9] each)
    and of each position of a grid x grid map (long [N, grid, grid] each), a position taking the last-drawn object whose
    centre lies within 0.8 of its radius (embedded_sets.render's geometry), else empty."""
    n = len(scenes)
    cell_shape, cell_colour = torch.full((n, CELLS), NO_SHAPE), torch.full((n, CELLS), NO_COLOUR)
    map_shape, map_colour = torch.full((n, grid, grid), NO_SHAPE), torch.full((n, grid, grid), NO_COLOUR)
    centres = (np.arange(grid) + 0.5) / grid
    for i, scene in enumerate(scenes):
        for o in scene["objects"]:
            shape, colour = SHAPES.index(o["shape"]), list(COLORS).index(o["colour"])
            cell_shape[i, 3 * o["row"] + o["col"]], cell_colour[i, 3 * o["row"] + o["col"]] = shape, colour
            x, y = (o["col"] + 0.5 + 3 * o["jitter"][0]) / 3, (o["row"] + 0.5 + 3 * o["jitter"][1]) / 3
            inside = torch.from_numpy((centres - x) ** 2 + (centres[:, None] - y) ** 2 <= (0.8 * SIZES[o["size"]]) ** 2)
            map_shape[i][inside], map_colour[i][inside] = shape, colour
    return cell_shape, cell_colour, map_shape, map_colour


def rendered(split: str, size: int, num_images: int, seed: int = 0):
    """(uint8 [N, size, size, 3] images, the ShapesDataset they come from) of a split of the embedded set."""
    data = ShapesDataset(split, size, num_images, seed)
    return np.stack([render(scene, size) for scene in data.scenes]), data


def fit(model: nn.Module, batch_loss, steps: int, lr: float, weight_decay: float) -> nn.Module:
    """The one trainer of the embedded sets' classifiers: AdamW with a one-cycle schedule (15% warm-up), `steps`
    steps on `batch_loss(model)`, then eval mode."""
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=steps, pct_start=0.15)
    for _ in range(steps):
        loss = batch_loss(model)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        schedule.step()
    return model.eval()


def cached(path: Path, build, train, device) -> nn.Module:
    """A classifier from its safetensors file `path` (weights into `build()`), else `train()`ed now on the CPU and
    saved there; frozen, on `device`."""
    if path.is_file():
        model = build()
        load_state(model, load_tensors(path), path)
    else:
        model = train()
        save_tensors(model.state_dict(), path)
    return model.eval().requires_grad_(False).to(device)


@torch.random.fork_rng(devices=[])
def train_classifier(settings: DomainSettings) -> ShapesClassifier:
    """Trains the shapes classifier on the train split (on the CPU: fp32 unless settings.precision is "bf16"), seeded
    by settings.seed. Cross-entropy on each cell's shape and colour, plus the same on each position of the trunk's map:
    an object then teaches the trunk at every position it covers, not only through its cell."""
    images, data = rendered("train", settings.image_size, settings.num_images, settings.seed)
    images, wanted = torch.from_numpy(images), targets(data.scenes)
    torch.manual_seed(settings.seed)  # the caller's random state comes back afterwards (fork_rng)

    def batch_loss(model):
        idx = torch.randint(len(images), (settings.batch_size,))
        with autocast("cpu", settings.precision):
            h = model.encode(images[idx])
            _, shape_logits, colour_logits = model.read_cells(h)
            logits = [shape_logits.transpose(1, 2), colour_logits.transpose(1, 2),  # all [B, classes, ...]
                      *model.dense(h).split([NO_SHAPE + 1, NO_COLOUR + 1], 1)]
        return sum(F.cross_entropy(z.float(), t[idx]) for z, t in zip(logits, wanted))
    return fit(ShapesClassifier(settings.width), batch_loss, settings.steps, settings.lr, weight_decay=0.0)


def load_classifier(settings: DomainSettings = DomainSettings(), cache_dir="cache", device="cpu") -> ShapesClassifier:
    """The shapes classifier for `settings` on `device`, cached under cache_dir/domain/."""
    return cached(settings.path(cache_dir), lambda: ShapesClassifier(settings.width), lambda: train_classifier(settings),
                  device)


def class_accuracy(shape_logits, labels) -> float:
    """Share of images in which some cell holds the shape of their class (label = index in embedded_sets.SHAPES), from
    shape
    logits [N, 9, 9]."""
    return float((np.asarray(shape_logits).argmax(-1) == np.asarray(labels)[:, None]).any(1).mean())


def caption_accuracy(shape_logits, colour_logits, captions) -> tuple:
    """(shape, colour) accuracy of the first object each caption names, read in the cell the caption places it in."""
    read = [read_caption(c) for c in captions]
    shape, colour, cell = (np.array([r[k] for r in read], dtype=int) for k in ("label", "colour", "cell"))
    image = np.arange(len(cell))
    return (float((np.asarray(shape_logits).argmax(-1)[image, cell] == shape).mean()),
            float((np.asarray(colour_logits).argmax(-1)[image, cell] == colour).mean()))


def held_out_accuracy(model: ShapesClassifier, image_size: int = 32, num_images: int = 1024) -> dict:
    """The classifier on real held-out images (the val split) with their labels and captions: class accuracy,
    caption (first-object) shape and colour accuracy."""
    images, data = rendered("val", image_size, num_images)
    with torch.inference_mode():
        _, shape_logits, colour_logits = (x.cpu().numpy() for x in model(torch.from_numpy(images).to(
            next(model.parameters()).device)))
    shape, colour = caption_accuracy(shape_logits, colour_logits, data.captions)
    return {"class accuracy": class_accuracy(shape_logits, data.labels), "caption shape accuracy": shape,
            "caption colour accuracy": colour}


def evaluate_domain(ref_path, sample_path, classes_in_turn: bool = False, captions=None, batch_size: int = 64,
                    cache_dir="cache", device="cpu") -> dict:
    """Domain FID of a sample .npz against a reference .npz, or, with ref_path None, against as many (at most 10K)
    real held-out images of the embedded set: FID in the feature space of this file's classifier, never
    FID-Inception. Class accuracy when the labels are known, from the sample file's `labels` array or, with
    `classes_in_turn`, sample i of class i % 8 (sample.py's order); caption shape / colour accuracy for `captions`,
    one per sample (sample.py's captions.txt)."""
    sample, _ = npz_batch.read_npz_batch(sample_path)
    if ref_path:
        ref = npz_batch.read_npz_batch(ref_path)[0]
    else:
        ref = rendered("val", sample.shape[1], min(len(sample), 10_000))[0]
    if ref.shape[1:] != sample.shape[1:]:
        raise npz_batch.NpzError(f"{ref_path or 'embedded set'}: images of shape {list(ref.shape[1:])}, but the "
                               f"samples' are {list(sample.shape[1:])}")
    labels = sample_labels(sample_path)
    if labels is None and classes_in_turn:
        labels = np.arange(len(sample)) % len(SHAPES)
    for name, given in [("labels", labels), ("captions", captions)]:
        if given is not None and len(given) != len(sample):
            raise npz_batch.NpzError(f"{sample_path}: {len(sample)} samples but {len(given)} {name}")
    model = load_classifier(DomainSettings(image_size=sample.shape[1]), cache_dir, device)
    ref_features = measures.compute_features(model, ref, batch_size, desc="reference batch")
    features = measures.compute_features(model, sample, batch_size, desc="sample batch")
    report = {"Domain FID": measures.frechet_distance(*measures.feature_statistics(features["features"]),
                                                      *measures.feature_statistics(ref_features["features"]))}
    if labels is not None:
        report["Class accuracy"] = class_accuracy(features["shape"], labels)
    if captions is not None:
        report["Caption shape accuracy"], report["Caption colour accuracy"] = caption_accuracy(
            features["shape"], features["colour"], captions)
    return report


def read_captions(path) -> list:
    """The captions of --captions `path` (sample.py's captions.txt: one a line, split at "\\n" only), each in the
    shapes set's style; a caption that is not is an InputError naming its line."""
    if not Path(path).is_file():
        raise MissingInput(f"{path}: file not found (--captions)")
    captions = list(read_lines(path))
    for n, text in enumerate(captions, 1):
        try:
            read_caption(text)
        except InputError as e:
            raise InputError(f"{path}:{n}: {e}") from None
    return captions


def sample_labels(path):
    """The `labels` array of a sample .npz (None without one): integer classes of the shapes set, one per sample;
    an object array (never unpickled), another dtype or a label outside 0..7 is an InputError naming the file."""
    try:
        with np.load(path) as arrays:
            labels = arrays["labels"] if "labels" in arrays.files else None
    except ValueError as e:  # numpy refuses to unpickle an object array (allow_pickle=False)
        problem = "an object array (pickled Python objects)" if "allow_pickle" in str(e) else f"unreadable ({e})"
        raise InputError(f"{path}: labels is {problem}, not integer class labels") from None
    if labels is None:
        return None
    if not np.issubdtype(labels.dtype, np.integer):
        raise InputError(f"{path}: labels has dtype {labels.dtype}, not integer class labels")
    if labels.ndim != 1:
        raise InputError(f"{path}: labels has shape {list(labels.shape)}, not one label per sample")
    outside = labels[(labels < 0) | (labels >= len(SHAPES))]
    if len(outside):
        raise InputError(f"{path}: labels {outside[:8].tolist()} are not classes of the shapes set (0.."
                         f"{len(SHAPES) - 1})")
    return labels


# ------------------------------------------------------------------ one-object sets (glyphs, shape): the object
class ObjectClassifier(torch.nn.Module):
    """uint8 [B, H, W, 3] -> (logits [B, classes], pooled features [B, 4 x width]): which object of a one-object set
    (embedded_sets.OBJECT_SETS) an image holds, and the feature space of its Fréchet distance
    (object_sample_report)."""
    outputs = ("logits", "features")  # the names measures.compute_features gives them

    def __init__(self, classes: int, width: int = 16):
        super().__init__()
        layers, cin = [], 3
        for cout, stride in ((width, 1), (2 * width, 2), (2 * width, 1), (4 * width, 2), (4 * width, 1)):
            layers += [torch.nn.Conv2d(cin, cout, 3, stride, 1, bias=False), torch.nn.BatchNorm2d(cout),
                       torch.nn.ReLU()]
            cin = cout
        self.net = torch.nn.Sequential(*layers, torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                                       torch.nn.Linear(cin, classes))

    def forward(self, images):
        x = images.permute(0, 3, 1, 2).float() / 127.5 - 1
        features = self.net[:-1](torch.nn.functional.interpolate(x, size=32, mode="bilinear", antialias=True))
        return self.net[-1](features), features


def blurred(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Each image of uint8 [B, H, W, 3] squeezed to a random side in 8..H and enlarged back (bilinear), as uint8:
    the classifier learns to read blurry reconstructions, not only sharp originals."""
    out = []
    for img in x.permute(0, 3, 1, 2).float():
        k = int(torch.randint(8, x.shape[1] + 1, (1,), generator=generator))
        small = torch.nn.functional.interpolate(img[None], size=k, mode="bilinear", antialias=True)
        out.append(torch.nn.functional.interpolate(small, size=x.shape[1], mode="bilinear"))
    return torch.cat(out).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)


@torch.random.fork_rng(devices=[])
def object_classifier(family: str, cache_dir="cache", device="cpu", num_images: int = 8192, steps: int = 600,
                      batch_size: int = 64, lr: float = 3e-3, seed: int = 0) -> ObjectClassifier:
    """A classifier of the object in `family`'s images, trained once on its "pool" split (never a run's train or
    validation images; half of each batch blurred), seeded, and cached under cache_dir/bench/."""
    key = hashlib.sha1(f"{family}|{num_images}|{steps}|{batch_size}|{lr}|{seed}|v2".encode()).hexdigest()[:12]
    path = Path(cache_dir) / "bench" / f"object-classifier-{family}-{key}.safetensors"

    def train():
        pool = ObjectDataset(family, "pool", 32, num_images, seed)
        return train_object_classifier(pool.images, pool.labels, len(OBJECT_SETS[family]), steps, batch_size, lr, seed)
    return cached(path, lambda: ObjectClassifier(len(OBJECT_SETS[family])), train, device)


def data_classifier(train_set, classes: int, cache_dir="cache", device="cpu", steps: int = 600,
                    batch_size: int = 64, lr: float = 3e-3, seed: int = 0) -> ObjectClassifier:
    """A classifier of the labels of a labelled --data set (data.JsonlDataset, e.g. Fashion-MNIST from
    tools/prepare_data.py idx), trained as object_classifier on that set's *training* split (the one the tokenizers and
    DiTs train on; the held-out split scores it), cached under cache_dir/bench/ by its captions.jsonl and split."""
    if (np.asarray(train_set.labels) < 0).any():
        raise InputError(f"{train_set.jsonl}: images without a \"label\"; class accuracy needs a labelled set")
    split = hashlib.sha1(np.asarray(train_set.indices, np.int64).tobytes()).hexdigest()
    key = hashlib.sha1(f"{train_set.jsonl_sha1}|{split}|{train_set.size}|{classes}|{steps}|{batch_size}|{lr}|{seed}"
                       .encode()).hexdigest()[:12]
    path = Path(cache_dir) / "bench" / f"data-classifier-{key}.safetensors"

    def train():
        images = np.concatenate([to_uint8(train_set[i]["image"][None]) for i in range(len(train_set))])
        return train_object_classifier(images, train_set.labels, classes, steps, batch_size, lr, seed)
    return cached(path, lambda: ObjectClassifier(classes), train, device)


def train_object_classifier(images: np.ndarray, labels, classes: int, steps: int, batch_size: int, lr: float,
                            seed: int) -> ObjectClassifier:
    """An ObjectClassifier fitted to uint8 images [M, H, W, 3] and their labels, half of each batch blurred, seeded."""
    images, labels = torch.from_numpy(images), torch.as_tensor(np.asarray(labels), dtype=torch.long)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)

    def batch_loss(model):
        idx = torch.randint(len(images), (batch_size,), generator=gen)
        x = images[idx]
        x[: batch_size // 2] = blurred(x[: batch_size // 2], gen)
        return F.cross_entropy(model(x)[0], labels[idx])
    return fit(ObjectClassifier(classes), batch_loss, steps, lr, weight_decay=0.01)


def object_sample_report(samples: np.ndarray, family: str, labels=None, captions=None, cache_dir="cache",
                         device="cpu", batch_size: int = 64) -> dict:
    """Generation metrics of samples (uint8 [N, H, W, 3]) of a one-object set, in its classifier (object_classifier):
    "Object FID", the Fréchet distance of the classifier's pooled features to as many real held-out images (like
    domain.py's domain FID: comparable within one table, never FID-Inception); class accuracy against `labels`; for
    T2I, the share of samples whose object is the one their caption names."""
    classifier = object_classifier(family, cache_dir, device)
    real = ObjectDataset(family, "val", samples.shape[1], len(samples)).images
    ours, theirs = (measures.compute_features(classifier, x, batch_size, progress=False) for x in (samples, real))
    report = {"Object FID": measures.frechet_distance(*measures.feature_statistics(ours["features"]),
                                                      *measures.feature_statistics(theirs["features"]))}
    found = ours["logits"].argmax(1)
    if labels is not None:
        report["Class accuracy"] = float((found == np.asarray(labels)).mean())
    if captions is not None:
        report["Caption object accuracy"] = float((found == [read_caption(c, family)["label"] for c in captions]).mean())
    return report



def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sample_batch", nargs="?", help="sample batch .npz (ADM format: arr_0 uint8 [N, H, W, 3]); "
                                                        "without it, print the classifier's held-out accuracy")
    parser.add_argument("--ref", help="reference batch .npz (default: as many real held-out images of the set)")
    parser.add_argument("--classes-in-turn", action="store_true",
                        help="sample i is of class i %% 8, as sample.py draws them (else the sample file's `labels` "
                             "array, if any)")
    parser.add_argument("--captions-file", help="text file, the caption of each sample on its line (sample.py's "
                                           "captions.txt)")
    parser.add_argument("--image-size", type=int, default=32, help="without SAMPLE.npz: the classifier's image size")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--cache-dir", default="cache", help="cache folder (the classifier goes in CACHE/domain/)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    if args.sample_batch:
        captions = None
        if args.captions_file:
            captions = read_captions(args.captions_file)
        report = evaluate_domain(args.ref, args.sample_batch, args.classes_in_turn, captions, args.batch_size,
                                 args.cache_dir, args.device)
        for name, value in report.items():
            print(f"{name}: {value}")
        return
    settings = DomainSettings(image_size=args.image_size)
    start = time.perf_counter()
    classifier = load_classifier(settings, args.cache_dir)
    print(f"{settings.path(args.cache_dir)}: ready in {time.perf_counter() - start:.1f} s")
    for name, value in held_out_accuracy(classifier, args.image_size).items():
        print(f"{name}: {value:.4f}")


if __name__ == "__main__":
    run_main(main)
