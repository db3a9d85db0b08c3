"""The helpers the benchmarks share: cached training runs keyed by their arguments and the code's identity, evaluation
of a trained tokenizer, aggregation over seeds, plots (text_conditioning.py, ablations.py, generation.py), timing
(speed.py, gan_step.py, inception_speed.py).

A benchmark script puts the repository root on sys.path (one line) and imports this module from its own folder.
"""
import ast
import hashlib
import importlib
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Subset


ROOT = Path(__file__).resolve().parents[1]

import metrics  # noqa: E402
from conditions import Conditioned, collate  # noqa: E402
from data import make_datasets  # noqa: E402
from runtime.errors import InputError  # noqa: E402
from runtime.files import atomic_write, load_json, save_json  # noqa: E402
from runtime.images import to_uint8  # noqa: E402
from textok import TexTok  # noqa: E402
from tools import domain  # noqa: E402


def require(module: str, why: str) -> None:
    """Stops a bench before its first run when a module it needs (bench/requirements.txt) is not installed: one
    InputError, where the import would fail after the runs."""
    try:
        importlib.import_module(module)
    except ImportError:
        raise InputError(f"{module}: not installed, and {why}; pip install -r bench/requirements.txt") from None


def machine(device: torch.device) -> str:
    """The hardware a number was measured on, in words."""
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    return (f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
            f"torch {torch.__version__}")


# ---------------------------------------------------------------------------------------------- cached runs
def imported_files(script: str, root: Path = ROOT) -> list:
    """The repository's .py files that `script` (a path under `root`) imports, directly or through each other,
    found by reading their import statements: sorted paths relative to `root`, `script` first."""
    todo, seen = [Path(script)], []
    while todo:
        rel = todo.pop()
        if rel in seen:
            continue
        seen.append(rel)
        for node in ast.walk(ast.parse((root / rel).read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.module and not node.level else []
            todo += [Path(n.split(".")[0] + ".py") for n in names if (root / (n.split(".")[0] + ".py")).is_file()]
    return [seen[0]] + sorted(seen[1:])


def code_identity(script: str, root: Path = ROOT) -> str:
    """A hash of the contents of the .py files a run of `script` imports (imported_files): a run is reused only
    while none of them changed."""
    h = hashlib.sha1()
    for rel in imported_files(script, root):
        h.update(f"{rel}\n".encode() + (root / rel).read_bytes())
    return h.hexdigest()[:16]


def _record(argv: list) -> Path:
    return Path(argv[argv.index("--out") + 1]) / "bench_run.json"


def finished(argv: list, code: str):
    """The seconds of the finished run of `argv` under code `code`, or None."""
    record = _record(argv)
    if record.is_file():
        done = load_json(record)
        if done.get("argv") == argv and done.get("code") == code:
            return done["seconds"]
    return None


def train_runs(argvs: list, script: str = "train.py", jobs: int = 1, threads: int = None, root: Path = ROOT) -> list:
    """Runs `python SCRIPT ARGV` for each argv (train.py or sample.py), `jobs` at a time as subprocesses, skipping
    runs already finished with the same argv and the same code (code_identity), each with `threads` torch threads
(OMP_NUM_THREADS; default torch's choice); returns each run's seconds. A
    finished run records both in OUT/bench_run.json; a stale or half-finished run starts afresh. jobs > 1 is for a
    GPU that one tiny run leaves mostly idle, or one run per CPU core."""
    code = code_identity(script, root)
    seconds = [finished(argv, code) for argv in argvs]
    todo = [i for i, s in enumerate(seconds) if s is None]
    for i in set(range(len(argvs))) - set(todo):
        print(f"reusing {_record(argvs[i]).parent} (same settings and code, trained in {seconds[i]:.0f} s)")
    running = {}
    while todo or running:
        while todo and len(running) < jobs:
            i = todo.pop(0)
            out = _record(argvs[i]).parent
            if out.exists():
                shutil.rmtree(out)
            env = {**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
            running[i] = (subprocess.Popen([sys.executable, str(root / script), *argvs[i]], cwd=root, env=env),
                          time.perf_counter())
        for i, (proc, start) in list(running.items()):
            if proc.poll() is None:
                continue
            del running[i]
            if proc.returncode:
                for other, _ in running.values():
                    other.terminate()
                raise subprocess.CalledProcessError(proc.returncode, [script, *argvs[i]])
            seconds[i] = time.perf_counter() - start
            save_json({"argv": argvs[i], "code": code, "seconds": seconds[i]}, _record(argvs[i]))
        time.sleep(0.2 if running else 0)
    return seconds


def default_jobs(device: str, threads: int) -> int:
    """Training runs at once: 4 on a GPU (one tiny run leaves most of it idle), else one per `threads` of the CPU
    cores this process may use."""
    return 4 if device == "cuda" else max(1, len(os.sched_getaffinity(0)) // threads)


def schedule_epochs(steps: int, images: int, batch_size: int) -> int:
    """The --epochs that make train.py's schedule end at (or just after) step `steps` over `images` training images."""
    return -(-steps // max(1, images // batch_size))


def tokenizer_argv(args, extra, variant: str, tokens: int, epochs: int, seed: int = 0) -> list:
    """train.py's command line for one tokenizer run of a benchmark (args: its set, data, val, out, preset, steps,
    batch_size, num_images, cache_dir); the variants differ only by --no-text (Baseline) or --shuffle-captions
    (TexTok with captions shuffled across images, the control)."""
    data_set = getattr(args, "set", "shapes")
    argv = ["--stage", "tokenizer", "--preset", args.preset, "--set", data_set, "--num-tokens", str(tokens),
            "--out", str(run_dir(args, variant, tokens, seed)), "--max-steps", str(args.train_steps),
            "--epochs", str(epochs), "--batch-size", str(args.batch_size), "--num-images", str(args.num_images),
            "--seed", str(seed), "--cache-dir", args.cache_dir, "--eval-every", str(max(1, args.train_steps // 12))]
    argv += ["--data", args.data] if args.data else []
    argv += ["--val", args.val] if args.val else []
    argv += {"baseline": ["--no-text"], "textok": [], "shuffled": ["--shuffle-captions"]}[variant]
    return argv + list(extra)


def run_dir(args, variant: str, tokens: int, seed: int) -> Path:
    """The folder of one tokenizer run of a benchmark: OUT/runs/<set or --data folder>-<variant>-<N>-seed<k>."""
    name = Path(args.data).name if args.data else getattr(args, "set", "shapes")
    return Path(args.out) / "runs" / f"{name}-{variant}-{tokens}-seed{seed}"


def train_run(argv: list, script: str = "train.py") -> float:
    """One cached run (train_runs); its seconds."""
    return train_runs([argv], script)[0]


# ---------------------------------------------------------------------------------------------- evaluation
def load_optional(loader, what: str):
    """A metric model from local weights, or None (with one line saying why) when they are missing."""
    try:
        return loader()
    except FileNotFoundError as e:
        print(f"{what} skipped: {e}")
        return None


@torch.no_grad()
def reconstruct(model: TexTok, dataset, device, batch_size: int, swap: bool = True):
    """(originals, reconstructions, caption-swapped reconstructions or None), uint8 [M, H, W, 3], EMA weights.

    The swap (skipped with swap=False) decodes each image's tokens (encoded with its own caption) with the caption of the next image in the
    batch (the last takes the first's): how far the result moves shows what the text carries and what the tokens
    carry."""
    real, rec, swapped = [], [], []
    text = swap and model.cfg.conditioning == "text"
    for batch in DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0, collate_fn=collate):
        x, cond = batch["image"].to(device), batch["cond"].to(device)
        Z = model.encode(x, cond)
        real.append(to_uint8(x))
        rec.append(to_uint8(model.decode(Z, cond)))
        if text:
            swapped.append(to_uint8(model.decode(Z, type(cond)(*(v.roll(-1, 0) for v in cond)))))
    return np.concatenate(real), np.concatenate(rec), np.concatenate(swapped) if text else None


def region_psnr(real: np.ndarray, rec: np.ndarray, masks: np.ndarray, threshold: float = 0.5) -> float:
    """Mean over images of the PSNR (dB) over the pixels where the object's mask [M, H, W] is >= `threshold`:
    the part of the image a one-object set's caption names."""
    inside = np.asarray(masks) >= threshold
    err = (real.astype(np.float64) - rec.astype(np.float64)) ** 2
    mse = np.array([e[m].mean() for e, m in zip(err, inside) if m.any()])
    return float(np.mean(10 * np.log10(255.0 ** 2 / np.maximum(mse, 1e-10))))


def set_classifier(args, device):
    """The class-accuracy classifier of the run's data: domain.py's for the shapes set, object_classifier for a
    one-object set, data_classifier (trained on its training split) for a labelled --data folder, else None."""
    if args.data:
        train_set = make_datasets(args.data, args.val, num_images=args.num_images)[0]
        labels = np.asarray(train_set.labels)
        if len(labels) == 0 or (labels < 0).any():
            return None
        return domain.data_classifier(train_set, int(labels.max()) + 1, args.cache_dir, device)
    if getattr(args, "set", "shapes") == "shapes":
        return domain.load_classifier(domain.DomainSettings(), args.cache_dir, device)
    return domain.object_classifier(args.set, args.cache_dir, device)


def recon_class_accuracy(classifier, images: np.ndarray, labels, batch_size: int):
    """Share of images (uint8 [N, H, W, 3]) whose class the classifier finds (None without a classifier): for
    domain.py's shapes classifier, the class's shape in some cell; for an ObjectClassifier, its top prediction."""
    if classifier is None:
        return None
    features = metrics.compute_features(classifier, images, batch_size, progress=False)
    if "shape" in features:
        return domain.class_accuracy(features["shape"], labels)
    return float((features["logits"].argmax(1) == np.asarray(labels)).mean())


def evaluate(run_dir: Path, args, device, batch_size: int, lpips_model, inception, reference: dict,
             captions: str = "full", classifier=None):
    """Metrics of one trained tokenizer on the held-out split (shapes set: captions of style `captions`; a
    --shuffle-captions run is evaluated with the same shuffled captions it trained with), `train_psnr` on as many
    of its training images (held-out minus training PSNR: what it memorised), and its uint8
    reconstructions for the grids. `reference` keeps the Inception statistics of the originals between calls (rFID);
    `classifier` gives the class accuracy of the reconstructions; a one-object set adds the object region's PSNR."""
    model = TexTok.from_pretrained(run_dir / "tokenizer", map_location=device).eval()
    config = load_json(run_dir / "config.json")
    train, val = make_datasets(args.data, args.val, model.cfg.image_size, args.num_images, captions=captions,
                               family=config.get("set", "shapes"),
                               shuffle_captions=config.get("shuffle_captions", False))
    real, rec, swap = reconstruct(model, Conditioned.for_model(val, model.cfg, args.cache_dir, device), device, batch_size)
    seen = Subset(Conditioned.for_model(train, model.cfg, args.cache_dir, device),
                  range(min(len(train), len(val))))  # as many training images as held-out ones
    row = {"psnr": metrics.psnr(real, rec), "ssim": metrics.ssim(real, rec), "lpips": None, "rfid": None,
           "train_psnr": metrics.psnr(*reconstruct(model, seen, device, batch_size, swap=False)[:2]),
           "object_psnr": region_psnr(real, rec, val.masks) if getattr(val, "masks", None) is not None else None,
           "psnr_swapped": metrics.psnr(real, swap) if swap is not None else None,
           "class_acc": recon_class_accuracy(classifier, rec, val.labels, batch_size)}
    if lpips_model is not None:
        row["lpips"] = metrics.lpips_distance(real, rec, lpips_model, batch_size)
    if inception is not None:
        def stats(images):
            return metrics.feature_statistics(metrics.compute_features(inception, images, batch_size,
                                                                       progress=False)["pool"])
        if "real" not in reference:
            reference["real"] = stats(real)
        row["rfid"] = metrics.frechet_distance(*stats(rec), *reference["real"])
    return row, real, rec, swap


def thumbnail(real: np.ndarray, tokens: int) -> np.ndarray:
    """The images squeezed to a bicubic k x k x 3 thumbnail with about as many numbers as N tokens of d = 8
    (k = round(sqrt(8 N / 3))), then enlarged back (bicubic): what a tokenizer must beat."""
    k = max(1, round(math.sqrt(8 * tokens / 3)))
    size = real.shape[1]
    return np.stack([np.asarray(Image.fromarray(x).resize((k, k), Image.BICUBIC).resize((size, size), Image.BICUBIC))
                     for x in real])


def mean_over_seeds(runs: list, keys=("variant", "tokens")) -> list:
    """One row per distinct `keys` (default: variant, tokens): each numeric field's mean over the seeds, with its
    standard deviation as key_std, and `seeds`, their count; other fields are the first seed's."""
    rows = []
    for group in dict.fromkeys(tuple(r[k] for k in keys) for r in runs):
        same = [r for r in runs if tuple(r[k] for k in keys) == group]
        row = {**dict(zip(keys, group)), "seeds": len(same)}
        for key in same[0]:
            if key in row or key == "seed":
                continue
            vals = [r[key] for r in same]
            if any(isinstance(v, (list, str, dict)) for v in vals):
                row[key] = vals[0]
            else:
                row[key] = None if None in vals else float(np.mean(vals))
                row[key + "_std"] = None if None in vals else float(np.std(vals))
        rows.append(row)
    return rows


def last_step(log_path: Path) -> int:
    """The last training step train.py logged."""
    return max(json.loads(line)["step"] for line in log_path.read_text().splitlines() if line.strip())


def val_curve(log_path: Path) -> tuple:
    """(steps, validation PSNR) of a train.py run, from its log.jsonl (`val_psnr_uint8`; runs logged before the
    one PSNR have the float-image `val_psnr`)."""
    rows = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    key = "val_psnr_uint8" if any("val_psnr_uint8" in r for r in rows) else "val_psnr"
    rows = [r for r in rows if key in r]
    return [r["step"] for r in rows], [r[key] for r in rows]


def as_images(u8: np.ndarray, min_size: int = 128) -> torch.Tensor:
    """uint8 [B, H, W, 3] -> float [B, 3, H', W'] in [-1, 1], enlarged (nearest) to at least `min_size` for viewing."""
    x = torch.from_numpy(u8).permute(0, 3, 1, 2).float() / 127.5 - 1
    scale = max(1, -(-min_size // x.shape[-1]))
    return torch.nn.functional.interpolate(x, scale_factor=scale, mode="nearest") if scale > 1 else x


# ---------------------------------------------------------------------------------------------- plots
COLOURS = {"shuffled": "tab:orange", "baseline": "tab:gray", "textok": "tab:red", "thumbnail": "tab:blue"}  # by name


def line_plot(path, panels: list, xlabel: str = "number of tokens", log2_x: bool = True) -> Path:
    """One panel per (title, {name: (xs, ys, ys_std or None)}), drawn with matplotlib (bench/requirements.txt):
    a line per series with its spread as error bars (dashed for a "reconstructions ..." ceiling), x on a log2 axis
    by default."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 3.6), squeeze=False)
    for ax, (title, series) in zip(axes[0], panels):
        for k, (name, (xs, ys, std)) in enumerate(series.items()):
            colour = next((c for key, c in COLOURS.items() if key in name.lower()), f"C{k}")
            ax.errorbar(xs, ys, yerr=std, label=name, color=colour, marker="o", ms=3, capsize=3,
                        ls="--" if name.startswith("reconstructions") else "-")  # a ceiling: dashed
        if log2_x:
            ax.set_xscale("log", base=2)
            ticks = sorted({x for xs, _, _ in series.values() for x in xs})
            ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.set_title(title, fontsize=10)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)
    return Path(path)


# ------------------------------------------------------------------------------------------------------- timing
def sync(device) -> None:
    """Waits for the device's queued work (CUDA), so a wall-clock time covers it."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def best_seconds(fn, repeats: int, device, warmup=None) -> float:
    """Best wall-clock seconds of fn() over `repeats` calls, after one warm-up call (of `warmup` when given)."""
    (warmup or fn)()
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - start)
    return best
