"""Does text conditioning help the tokenizer? TexTok against Baseline (w/o text) at several token counts (§4.3).

Trains both variants with train.py under identical settings (steps, seeds, widths, batches: only `--no-text`
differs), then evaluates each EMA tokenizer on the held-out split and writes, in --out:
    results.json      one row per run: {"variant", "tokens", "seed", "psnr", "ssim", "lpips", "rfid", "psnr_swapped",
                      "class_acc", "steps", "seconds"} (lpips / rfid are null where their weights are not available;
                      class_acc, the embedded set's classifier on the reconstructions, null for --data)
    results.md        the Table 1 analogue (markdown), with the command and the machine
    metrics.png       each metric against the number of tokens for both variants (Fig. 3 analogue)
    comparison.png    original / Baseline / TexTok reconstructions for each token count (Fig. 1 analogue)
    caption_swap.png  one image's tokens decoded with its own caption and with another image's caption
    runs/{variant}-{N}/   the train.py outputs (log.jsonl, tokenizer/)

    python bench/text_conditioning.py                             # embedded shapes set: < 30 min, 2 CPU cores
    python bench/text_conditioning.py --data DIR --tokens 32 64 128 256 --steps 100000 --batch-size 256 \\
        --preset imagenet256 --perceptual-weight 0.1              # on GPUs; unknown flags go to train.py as-is

A finished run whose settings are unchanged is reused (its folder holds bench_run.json), so an interrupted
benchmark continues where it stopped.
"""
import argparse
import json
import math
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch.utils.data import DataLoader

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(Path(__file__).resolve().parent)]
import domain  # noqa: E402
import metrics  # noqa: E402
from common import atomic_write, load_json, run_main, save_image_grid, save_json, to_uint8  # noqa: E402
from data import collate, conditioned, make_datasets  # noqa: E402
from speed import machine  # noqa: E402
from textok import TexTok  # noqa: E402

VARIANTS = {"baseline": "Baseline-{n} (w/o text)", "textok": "TexTok-{n} (w/ text)"}
COLOURS = {"baseline": (90, 90, 90), "textok": (214, 39, 40), "thumbnail": (31, 119, 180)}
LABELS = {**VARIANTS, "thumbnail": "Thumbnail ≈{n}x8 numbers"}  # the plain anchor: as many numbers as N x 8
# (key, label, higher is better): the columns of Table 1 that can be measured here.
METRICS = [("rfid", "rFID", False), ("psnr", "PSNR", True), ("ssim", "SSIM", True), ("lpips", "LPIPS", False),
           ("class_acc", "Class acc. of recon.", True)]
FRACTIONS = ("ssim", "lpips", "class_acc")  # shown with 4 decimals
# Flags the benchmark sets itself, identically for both variants: passing them through would break the pairing.
OWN_FLAGS = {"--stage", "--num-tokens", "--no-text", "--conditioning", "--out", "--max-steps", "--epochs",
             "--batch-size", "--num-images", "--seed", "--seeds", "--data", "--val", "--cache-dir", "--preset", "--resume"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)  # unknown flags go to train.py: never read them as abbreviations
    p.add_argument("--data", default=None, help="JSONL folder (README layout); default: the embedded shapes set")
    p.add_argument("--val", default=None, help="held-out JSONL folder; default: a fixed, seeded 10%% of --data")
    p.add_argument("--tokens", type=int, nargs="+", default=[4, 8, 16, 32], help="token counts N (Table 1)")
    p.add_argument("--out", default="runs/bench/text_conditioning")
    p.add_argument("--preset", default="tiny", help="train.py preset (tiny, imagenet256, imagenet512)")
    p.add_argument("--steps", type=int, default=1024,
                   help="training steps per run (the schedule ends there; the default stays below the tiny preset's "
                        "disc_start, so it compares the l2-trained autoencoders)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--num-images", type=int, default=4096, help="size of the embedded training set")
    p.add_argument("--seeds", type=int, nargs="+", default=[0],
                   help="training seeds per run; with several, the table gives mean ± std (e.g. --seeds 0 1 2)")
    p.add_argument("--cache-dir", default="cache", help="text-embedding cache (shared with train.py)")
    p.add_argument("--eval-batch-size", type=int, default=64)
    p.add_argument("--inception", default=None, help="FID Inception weights for rFID (default: metrics.py's lookup)")
    p.add_argument("--grid-images", type=int, default=6, help="rows of the comparison and caption-swap grids")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args, extra = p.parse_known_args(argv)
    clash = sorted({a.split("=")[0] for a in extra if a.split("=")[0] in OWN_FLAGS})
    if clash:
        p.error(f"{', '.join(clash)}: set by the benchmark itself (identically for both variants)")
    if min(args.tokens) < 1 or args.steps < 1 or args.grid_images < 2:
        p.error("--tokens and --steps must be positive and --grid-images at least 2")
    return args, extra


def train_argv(args, extra, variant: str, tokens: int, epochs: int, seed: int = 0) -> list:
    """train.py's command line for one run; the two variants differ only by --no-text."""
    argv = ["--stage", "tokenizer", "--preset", args.preset, "--num-tokens", str(tokens),
            "--out", str(Path(args.out) / "runs" / f"{variant}-{tokens}-seed{seed}"), "--max-steps", str(args.steps),
            "--epochs", str(epochs), "--batch-size", str(args.batch_size), "--num-images", str(args.num_images),
            "--seed", str(seed), "--cache-dir", args.cache_dir]
    argv += ["--data", args.data] if args.data else []
    argv += ["--val", args.val] if args.val else []
    argv += ["--no-text"] if variant == "baseline" else []
    return argv + list(extra)


def train_run(argv: list, script: str = "train.py") -> float:
    """Runs `python SCRIPT ARGV` (train.py, or sample.py) unless an identical finished run exists; returns its
    seconds. A run is finished when it recorded its argv in OUT/bench_run.json."""
    out = Path(argv[argv.index("--out") + 1])
    record = out / "bench_run.json"
    if record.is_file():
        done = load_json(record)
        if done.get("argv") == argv:
            print(f"reusing {out} (same settings, trained in {done['seconds']:.0f} s)")
            return done["seconds"]
    shutil.rmtree(out, ignore_errors=True)  # a stale or half-finished run: start it afresh
    start = time.perf_counter()
    subprocess.run([sys.executable, str(ROOT / script), *argv], cwd=ROOT, check=True)
    seconds = time.perf_counter() - start
    save_json({"argv": argv, "seconds": seconds}, record)
    return seconds


def load_optional(loader, what: str):
    """A metric model from local weights, or None (with one line saying why) when they are missing."""
    try:
        return loader()
    except FileNotFoundError as e:
        print(f"{what} skipped: {e}")
        return None


@torch.no_grad()
def reconstruct(model: TexTok, dataset, device, batch_size: int):
    """(originals, reconstructions, caption-swapped reconstructions or None), uint8 [M, H, W, 3], EMA weights.

    The swap decodes each image's tokens (encoded with its own caption) with the caption of the next image in the
    batch (the last takes the first's): how far the result moves shows what the text carries and what the tokens
    carry."""
    real, rec, swap = [], [], []
    text = model.cfg.conditioning == "text"
    for batch in DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0, collate_fn=collate):
        x, cond = batch["image"].to(device), batch["cond"].to(device)
        Z = model.encode(x, cond)
        real.append(to_uint8(x))
        rec.append(to_uint8(model.decode(Z, cond)))
        if text:
            swap.append(to_uint8(model.decode(Z, type(cond)(*(v.roll(-1, 0) for v in cond)))))
    return np.concatenate(real), np.concatenate(rec), np.concatenate(swap) if text else None


def recon_class_accuracy(classifier, images: np.ndarray, labels, batch_size: int):
    """Share of reconstructions (uint8 [N, H, W, 3]) in which the embedded set's classifier (domain.py) finds the
    class's shape: whether the outlines survive tokenization (None without a classifier)."""
    if classifier is None:
        return None
    logits = metrics.compute_features(classifier, images, batch_size, progress=False)["shape"]
    return domain.class_accuracy(logits, labels)


def embedded_classifier(args, device):
    """domain.py's classifier of the embedded set (trained once, cached), or None for a --data folder."""
    return None if args.data else domain.load_classifier(domain.DomainSettings(), args.cache_dir, device)


def evaluate(run_dir: Path, args, device, batch_size: int, lpips_model, inception, reference: dict,
             captions: str = "full", classifier=None):
    """Metrics of one trained tokenizer on the held-out split (embedded set: captions of style `captions`), and its
    uint8 reconstructions for the grids. `reference` keeps the Inception statistics of the originals between calls
    (rFID); `classifier` (embedded set) gives the class accuracy of the reconstructions."""
    model = TexTok.from_pretrained(run_dir / "tokenizer", map_location=device).eval()
    val = make_datasets(args.data, args.val, model.cfg.image_size, args.num_images, captions=captions)[1]
    real, rec, swap = reconstruct(model, conditioned(val, model.cfg, args.cache_dir, device), device, batch_size)
    row = {"psnr": metrics.psnr(real, rec), "ssim": metrics.ssim(real, rec), "lpips": None, "rfid": None,
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


def as_images(u8: np.ndarray, min_size: int = 128) -> torch.Tensor:
    """uint8 [B, H, W, 3] -> float [B, 3, H', W'] in [-1, 1], enlarged (nearest) to at least `min_size` for viewing."""
    x = torch.from_numpy(u8).permute(0, 3, 1, 2).float() / 127.5 - 1
    scale = max(1, -(-min_size // x.shape[-1]))
    return torch.nn.functional.interpolate(x, scale_factor=scale, mode="nearest") if scale > 1 else x


def line_plot(path, tokens: list, panels: list) -> Path:
    """Fig. 3 analogue: one panel per (title, {variant: [value per token count]}), tokens on a log2 x axis."""
    font, small = ImageFont.load_default(size=15), ImageFont.load_default(size=12)
    W, H, left, right, top, bottom = 420, 340, 62, 16, 54, 46
    img = Image.new("RGB", (W * len(panels), H), "white")
    draw = ImageDraw.Draw(img)
    xs = [math.log2(n) for n in tokens]
    for k, (title, series) in enumerate(panels):
        x0, x1, y0, y1 = k * W + left, (k + 1) * W - right, top, H - bottom
        values = [v for vals in series.values() for v in vals]
        lo, hi = min(values), max(values)
        pad = (hi - lo) * 0.1 or abs(hi) * 0.05 or 1.0
        lo, hi = lo - pad, hi + pad
        decimals = max(0, 1 - math.floor(math.log10((hi - lo) / 4)))

        def px(x, y):
            fx = (x - xs[0]) / (xs[-1] - xs[0]) if len(xs) > 1 else 0.5
            return x0 + 10 + fx * (x1 - x0 - 20), y1 - (y - lo) / (hi - lo) * (y1 - y0)

        draw.text(((x0 + x1) / 2, 8), title, fill="black", font=font, anchor="mt")
        draw.rectangle([x0, y0, x1, y1], outline="black")
        for i in range(5):
            y = lo + (hi - lo) * i / 4
            _, py = px(xs[0], y)
            draw.line([x0 - 4, py, x0, py], fill="black")
            draw.text((x0 - 6, py), f"{y:.{decimals}f}", fill="black", font=small, anchor="rm")
        for x, n in zip(xs, tokens):
            qx, _ = px(x, lo)
            draw.line([qx, y1, qx, y1 + 4], fill="black")
            draw.text((qx, y1 + 6), str(n), fill="black", font=small, anchor="mt")
        draw.text(((x0 + x1) / 2, H - 6), "number of tokens", fill="black", font=small, anchor="mb")
        for j, (variant, vals) in enumerate(series.items()):
            points = [px(x, v) for x, v in zip(xs, vals)]
            if len(points) > 1:
                draw.line(points, fill=COLOURS[variant], width=2)
            for qx, qy in points:
                draw.ellipse([qx - 3, qy - 3, qx + 3, qy + 3], fill=COLOURS[variant])
            lx = x0 + j * (x1 - x0) / len(series)  # legend between the title and the axes
            draw.line([lx + 4, 36, lx + 22, 36], fill=COLOURS[variant], width=2)
            draw.text((lx + 26, 36), LABELS[variant].format(n="N").split(" (")[0], fill="black", font=small,
                      anchor="lm")
    return atomic_write(path, lambda tmp: img.save(tmp, format="PNG"))


def markdown_table(rows: list) -> str:
    """Table 1 analogue; TexTok rows add the change against the Baseline with the same number of tokens."""
    shown = [m for m in METRICS if any(r[m[0]] is not None for r in rows)]
    swapped = any(r["psnr_swapped"] is not None for r in rows)
    head = ["Tokenizer", "# tokens"] + [f"{label} {'↑' if up else '↓'}" for _, label, up in shown]
    head += ["PSNR, swapped caption"] * swapped + ["steps", "train time"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    base = {r["tokens"]: r for r in rows if r["variant"] == "baseline"}
    order = {"thumbnail": 0, "baseline": 1, "textok": 2}
    for r in sorted(rows, key=lambda r: (r["tokens"], order[r["variant"]])):
        cells = [LABELS[r["variant"]].format(n=r["tokens"]), str(r["tokens"])]
        for key, _, _ in shown:
            v, b, sd = r[key], base.get(r["tokens"], {}).get(key), r.get(key + "_std")
            cell = "–" if v is None else f"{v:.4f}" if key in FRACTIONS else f"{v:.2f}"
            if sd and r.get("seeds", 1) > 1:
                cell += f" ± {sd:.4f}" if key in FRACTIONS else f" ± {sd:.2f}"
            if r["variant"] == "textok" and v is not None and b is not None:
                cell += f" ({v - b:+.4f})" if key in FRACTIONS else f" ({v - b:+.2f})"
            cells.append(cell)
        if swapped:
            cells.append("–" if r["psnr_swapped"] is None else f"{r['psnr_swapped']:.2f}")
        cells += ["–", "–"] if r["variant"] == "thumbnail" else [str(round(r["steps"])), f"{r['seconds']:.0f} s"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    args, extra = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    command = "python bench/text_conditioning.py " + " ".join(sys.argv[1:] if argv is None else argv)

    # The split exactly as train.py makes it (same call); each run is evaluated with its own config's conditions.
    train_set, val_set = make_datasets(args.data, args.val, num_images=args.num_images)
    per_epoch = max(1, len(train_set) // args.batch_size)
    epochs = -(-args.steps // per_epoch)  # the cosine schedule ends at (or just after) the last step
    print(f"{len(train_set)} training / {len(val_set)} held-out images; {args.steps} steps of {args.batch_size} "
          f"({epochs} epochs) per run on {machine(device)}")

    lpips_model = load_optional(lambda: metrics.load_lpips("alex", device), "LPIPS")
    inception = load_optional(lambda: metrics.load_inception(args.inception, device), "rFID")
    classifier = embedded_classifier(args, device)
    runs, recons, swaps, reference = [], {}, {}, {}
    for tokens in args.tokens:
        for seed in args.seeds:
            for variant in VARIANTS:
                argv_run = train_argv(args, extra, variant, tokens, epochs, seed)
                seconds = train_run(argv_run)
                run_dir = Path(argv_run[argv_run.index("--out") + 1])
                row, real, rec, swap = evaluate(run_dir, args, device, args.eval_batch_size, lpips_model, inception,
                                                reference, classifier=classifier)
                runs.append({"variant": variant, "tokens": tokens, "seed": seed, **row,
                             "steps": last_step(run_dir / "log.jsonl"), "seconds": round(seconds, 1)})
                if seed == args.seeds[0]:
                    recons[variant, tokens] = rec[: args.grid_images]
                    if swap is not None:
                        swaps[tokens] = (rec[: args.grid_images], swap[: args.grid_images])
                save_json(runs, out / "results.json")
                print(f"{VARIANTS[variant].format(n=tokens)}, seed {seed}: PSNR {row['psnr']:.2f} dB, "
                      f"SSIM {row['ssim']:.4f}")
        thumb = thumbnail(real, tokens)
        runs.append({"variant": "thumbnail", "tokens": tokens, "seed": None, "psnr": metrics.psnr(real, thumb),
                     "ssim": metrics.ssim(real, thumb), "lpips": None, "rfid": None, "psnr_swapped": None,
                     "class_acc": recon_class_accuracy(classifier, thumb, val_set.labels, args.eval_batch_size),
                     "steps": 0, "seconds": 0.0})
    rows = mean_over_seeds(runs)

    first_batch = min(args.eval_batch_size, len(val_set))
    k = min(args.grid_images, first_batch)
    tokens = sorted(args.tokens)
    columns = [real[:k]] + [recons[v, n] for n in tokens for v in VARIANTS]
    save_image_grid(as_images(np.stack(columns, 1).reshape(-1, *real.shape[1:])), out / "comparison.png",
                    ncol=len(columns))
    partner = (np.arange(k) + 1) % first_batch  # the pairing of the swap in `reconstruct`
    columns = [real[:k], real[partner]] + [s for n in tokens for s in swaps[n]]
    save_image_grid(as_images(np.stack(columns, 1).reshape(-1, *real.shape[1:])), out / "caption_swap.png",
                    ncol=len(columns))
    panels = [(f"{label} ({'higher' if up else 'lower'} is better)",
               {v: [next(r[key] for r in rows if r["variant"] == v and r["tokens"] == n) for n in tokens]
                for v in COLOURS if any(r["variant"] == v and r[key] is not None for r in rows)})
              for key, label, up in METRICS if all(r[key] is not None for r in rows)]
    line_plot(out / "metrics.png", tokens, panels)

    table = markdown_table(rows)
    captions = "\n".join(f"{i + 1}. own: \"{val_set.captions[i]}\" / swapped in: \"{val_set.captions[partner[i]]}\""
                         for i in range(k))
    rfid_note = (f" rFID on {len(val_set)} images (the paper uses 50K) is only comparable within this table."
                 if inception is not None else "")
    report = f"""# Text conditioning: TexTok vs Baseline (w/o text)

Command: `{command}`
Machine: {machine(device)}
Settings: preset `{args.preset}`, {args.steps} steps of batch {args.batch_size} per run, seeds {args.seeds}, \
{len(train_set)} training images, evaluated on {len(val_set)} held-out images (EMA weights).
Train flags passed through: `{' '.join(extra) or 'none'}`

{table}

Numbers in brackets: TexTok minus Baseline at the same number of tokens (means over the seeds; ± is the standard
deviation over seeds). "PSNR, swapped caption": TexTok's tokens decoded with the next image's caption instead of
their own. The thumbnail rows are the plain anchor: each image squeezed to a bicubic k x k x 3 thumbnail with about
N x 8 numbers and enlarged back; a tokenizer should beat it.{rfid_note}

- `metrics.png`: the metrics against the number of tokens (Fig. 3 analogue).
- `comparison.png`: columns original, then Baseline-N, TexTok-N for N = {', '.join(map(str, tokens))} (Fig. 1).
- `caption_swap.png`: columns original, the image whose caption is swapped in, then for each N: TexTok-N with its
  own caption, with the swapped caption. Captions per row:

{captions}
"""
    atomic_write(out / "results.md", lambda tmp: Path(tmp).write_text(report))
    print("\n" + table + f"\n\nwritten: {out / 'results.md'}, results.json, metrics.png, comparison.png, "
          "caption_swap.png")
    return rows


if __name__ == "__main__":
    run_main(main)
