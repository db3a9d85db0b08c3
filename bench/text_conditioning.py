"""Does text conditioning help the tokenizer? TexTok against Baseline (w/o text) and against TexTok trained with
shuffled captions, at several token counts (§4.3, Table 1, Fig. 3).

Trains the variants with train.py under identical settings (steps, seeds, widths, batches): Baseline adds
`--no-text`, the control `--shuffle-captions` (each image trained and evaluated with another image's caption: the
same amount of text, none of its information). Each EMA tokenizer is evaluated on the held-out split. Writes, in
--out/<set>/ (<set> the embedded set, or the --data folder's name):
    results.json      one row per run: variant, tokens, seed, psnr, ssim, object_psnr (one-object sets: PSNR over the
                      object's mask), class_acc (a classifier of the set on the reconstructions), lpips / rfid (null
                      without their weights), psnr_swapped, last_quarter (validation PSNR gained over the last quarter
                      of the schedule), steps, seconds
    results.md        the Table 1 analogue (mean ± std over --seeds), with the command and the machine
    metrics.png       each metric against N, per variant and the equal-size bicubic thumbnail (Fig. 3 analogue)
    curves.png        validation PSNR against the step, per N and variant (has the run flattened?)
    comparison.png    original, then Baseline / TexTok / shuffled reconstructions for each N (Fig. 1 analogue)
    caption_swap.png  TexTok's tokens decoded with their own caption and with the next image's caption
and the train.py outputs in --out/runs/<set>-<variant>-<N>-seed<k>/.

    python bench/text_conditioning.py                          # glyphs, toy-mechanism, N = 1 2 4 16: 2 CPU cores
    python bench/text_conditioning.py --set one-shape --num-tokens 1   # the held-out one-object family
    python bench/text_conditioning.py --device cuda --jobs 6 --seeds 0 1 2   # runs at once on one GPU
    python bench/text_conditioning.py --data DIR --num-tokens 32 64 128 256 --train-steps 100000 --batch-size 256 \\
        --preset imagenet256 --perceptual-weight 0.1           # on GPUs; unknown flags go to train.py as-is

A run is reused when its train.py arguments and the code it imports are unchanged (harness.train_runs), so an
interrupted benchmark continues where it stopped and a code change retrains.
"""
import argparse
import sys
from pathlib import Path

import numpy as np
import torch


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root (this folder is already there)
import harness  # noqa: E402

import metrics  # noqa: E402
import perceptual  # noqa: E402
from data import make_datasets  # noqa: E402
from runtime.errors import InputError, run_main  # noqa: E402
from runtime.files import atomic_write, save_json  # noqa: E402
from runtime.images import save_image_grid  # noqa: E402


VARIANTS = {"baseline": "Baseline-{n} (w/o text)", "textok": "TexTok-{n} (w/ text)",
            "shuffled": "TexTok-{n}, shuffled captions"}
LABELS = {**VARIANTS, "thumbnail": "Thumbnail ≈{n}x8 numbers"}  # the plain anchor: as many numbers as N x 8
# (key, label, higher is better): the columns of Table 1 that can be measured here, and the object-level ones.
METRICS = [("rfid", "rFID", False), ("psnr", "PSNR", True), ("object_psnr", "object PSNR", True),
           ("ssim", "SSIM", True), ("lpips", "LPIPS", False), ("class_acc", "Class acc. of recon.", True)]
FRACTIONS = ("ssim", "lpips", "class_acc")  # shown with 3 decimals
# Flags the benchmark sets itself, identically for every variant: passing them through would break the pairing.
OWN_FLAGS = {"--stage", "--num-tokens", "--no-text", "--conditioning", "--out", "--max-steps", "--epochs",
             "--batch-size", "--num-images", "--seed", "--seeds", "--data", "--val", "--cache-dir", "--preset",
             "--resume", "--set", "--shuffle-captions", "--eval-every"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)  # unknown flags go to train.py: never read them as abbreviations
    p.add_argument("--set", default="glyphs", help="embedded set (train.py --set): glyphs (the default), one-shape "
                   "(held out), shapes (1-3 shapes, the old harness)")
    p.add_argument("--data", default=None, help="JSONL folder (README layout) instead of an embedded set")
    p.add_argument("--val", default=None, help="held-out JSONL folder; default: a fixed, seeded 10%% of --data")
    p.add_argument("--num-tokens", type=int, nargs="+", default=[1, 2, 4, 16], help="token counts N (Table 1)")
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    p.add_argument("--out", default="runs/bench/text_conditioning")
    p.add_argument("--preset", default="toy-mechanism", help="train.py preset (toy-mechanism, tiny, imagenet256, ...)")
    p.add_argument("--train-steps", type=int, default=2048, help="training steps per run (the schedule ends there)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--num-images", type=int, default=4096, help="size of the embedded training set")
    p.add_argument("--seeds", type=int, nargs="+", default=[0],
                   help="training seeds per run; with several, the table gives mean ± std (e.g. --seeds 0 1 2)")
    p.add_argument("--cache-dir", default="cache", help="text-embedding cache (shared with train.py)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                   help="cuda: --jobs runs at once on one GPU (subprocesses), evaluation on the GPU")
    p.add_argument("--jobs", type=int, default=None, help="runs trained at once (default: 4 on cuda, else one per --threads CPU cores)")
    p.add_argument("--no-train", action="store_true",
                   help="evaluate only the runs already finished (same arguments and code); skip the others")
    p.add_argument("--eval-batch-size", type=int, default=64)
    p.add_argument("--inception", default=None, help="FID Inception weights for rFID (default: metrics.py's lookup)")
    p.add_argument("--grid-images", type=int, default=8, help="rows of the comparison and caption-swap grids")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads per training run and for the evaluation (1: fastest for these tiny models "
                        "on a shared CPU)")
    args, extra = p.parse_known_args(argv)
    clash = sorted({a.split("=")[0] for a in extra if a.split("=")[0] in OWN_FLAGS})
    if clash:
        p.error(f"{', '.join(clash)}: set by the benchmark itself (identically for every variant)")
    if min(args.num_tokens) < 1 or args.train_steps < 1 or args.grid_images < 2:
        p.error("--num-tokens and --train-steps must be positive and --grid-images at least 2")
    args.jobs = args.jobs or harness.default_jobs(args.device, args.threads)
    return args, extra


def last_quarter(log_path: Path) -> float:
    """Validation PSNR gained over the last quarter of a run (its last logged value minus the value logged nearest
    to three quarters of its steps): under 0.2 dB, the curve has flattened."""
    steps, psnr = harness.val_curve(log_path)
    at = min(range(len(steps)), key=lambda i: abs(steps[i] - 0.75 * steps[-1]))
    return psnr[-1] - psnr[at]


def cell(r: dict, key: str, base: dict | None) -> str:
    """One table cell: mean (± std over seeds), and the change against the Baseline at the same N in brackets."""
    v, sd = r.get(key), r.get(key + "_std")
    if v is None:
        return "–"
    f = ".3f" if key in FRACTIONS else ".2f"
    text = f"{v:{f}}" + (f" ± {sd:{f}}" if sd is not None and r.get("seeds", 1) > 1 else "")
    if base is not None and base.get(key) is not None and r["variant"] in ("textok", "shuffled"):
        text += f" ({v - base[key]:+{f}})"
    return text


def markdown_table(rows: list, images: int = None) -> str:
    """Table 1 analogue; TexTok and shuffled rows add the change against the Baseline with the same number of
    tokens. `images`: the held-out images the metrics (rFID among them) are computed over, named in rFID's header."""
    shown = [m for m in METRICS if any(r.get(m[0]) is not None for r in rows)]
    head = ["Tokenizer", "seeds"] + [f"{label}{f' ({images} images)' if key == 'rfid' and images else ''} "
                                     f"{'↑' if up else '↓'}" for key, label, up in shown]
    head += ["PSNR, swapped caption", "last quarter (dB)", "steps", "train time"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    base = {r["tokens"]: r for r in rows if r["variant"] == "baseline"}
    order = {"thumbnail": 0, "baseline": 1, "textok": 2, "shuffled": 3}
    for r in sorted(rows, key=lambda r: (r["tokens"], order[r["variant"]])):
        thumb = r["variant"] == "thumbnail"
        cells = [LABELS[r["variant"]].format(n=r["tokens"]), "–" if thumb else str(r["seeds"])]
        cells += [cell(r, key, base.get(r["tokens"])) for key, _, _ in shown]
        cells += [cell(r, "psnr_swapped", None)]
        cells += ["–"] * 3 if thumb else [cell(r, "last_quarter", None), str(round(r["steps"])),
                                         f"{r['seconds']:.0f} s"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    args, extra = parse_args(argv)
    harness.require("matplotlib", "bench/text_conditioning.py plots its metrics and curves with it")  # before the first run
    torch.set_num_threads(args.threads)
    name = Path(args.data).name if args.data else args.set
    out = Path(args.out) / name
    device = torch.device(args.device)
    command = "python bench/text_conditioning.py " + " ".join(sys.argv[1:] if argv is None else argv)

    # The split exactly as train.py makes it (same call); each run is evaluated with its own config's conditions.
    train_set, val_set = make_datasets(args.data, args.val, num_images=args.num_images, family=args.set)
    epochs = harness.schedule_epochs(args.train_steps, len(train_set), args.batch_size)
    print(f"{len(train_set)} training / {len(val_set)} held-out images; {args.train_steps} steps of {args.batch_size} "
          f"({epochs} epochs) per run on {harness.machine(device)}, {args.jobs} at a time")
    plan = [(n, seed, v) for n in args.num_tokens for seed in args.seeds for v in args.variants]
    argvs = [harness.tokenizer_argv(args, extra, v, n, epochs, seed) for n, seed, v in plan]
    plan, argvs, seconds = train_or_reuse(args, plan, argvs)
    classifier = harness.set_classifier(args, device)
    runs, real, recons, swaps, curves = evaluate_runs(args, device, plan, argvs, seconds, classifier)
    runs += thumbnail_rows(args, real, val_set, classifier, sorted({n for n, _, _ in plan}))
    save_json(runs, out / "results.json")
    rows = harness.mean_over_seeds(runs)
    real_acc = harness.recon_class_accuracy(classifier, real, val_set.labels, args.eval_batch_size)
    tokens = sorted({n for n, _, _ in plan})
    write_figures(args, out, rows, real, recons, swaps, curves, tokens)
    table = markdown_table(rows, len(val_set))
    report = REPORT.format(command=command, machine=harness.machine(device), preset=args.preset, name=name,
                           steps=args.train_steps, batch_size=args.batch_size, seeds=args.seeds, train=len(train_set),
                           val=len(val_set), extra=" ".join(extra) or "none",
                           real_acc="–" if real_acc is None else f"{real_acc:.3f}", table=table,
                           variants=", ".join(LABELS[v].format(n="N") for v in args.variants),
                           tokens=", ".join(map(str, tokens)))
    atomic_write(out / "results.md", lambda tmp: Path(tmp).write_text(report))
    print("\n" + table + f"\n\nwritten: {out}/results.md, results.json, metrics.png, curves.png, comparison.png")
    return rows


def train_or_reuse(args, plan: list, argvs: list):
    """(plan, argvs, seconds) of the runs: trained now (or reused when finished with the same code), or with
    --no-train only the finished ones."""
    if not args.no_train:
        return plan, argvs, harness.train_runs(argvs, jobs=args.jobs, threads=args.threads if args.device == "cpu"
                                               else None)
    code = harness.code_identity("train.py")
    seconds = [harness.finished(argv, code) for argv in argvs]
    print("not finished, skipped: " + (", ".join(f"{v}-{n}-seed{s}" for (n, s, v), secs in zip(plan, seconds)
                                                 if secs is None) or "none"))
    if all(secs is None for secs in seconds):
        raise InputError(f"{Path(args.out) / 'runs'}: no finished run of these settings to evaluate (--no-train)")
    plan, argvs, seconds = zip(*[x for x in zip(plan, argvs, seconds) if x[2] is not None])
    return plan, argvs, seconds


def evaluate_runs(args, device, plan, argvs, seconds, classifier):
    """Each run's row (harness.evaluate, the log's last quarter and steps), the real held-out images, and for the
    first seed the reconstructions, the caption-swapped reconstructions and the validation curves."""
    lpips_model = harness.load_optional(lambda: perceptual.load_lpips("alex", device), "LPIPS")
    inception = harness.load_optional(lambda: metrics.load_inception(args.inception, device), "rFID")
    runs, recons, swaps, curves, reference = [], {}, {}, {}, {}
    for (tokens, seed, variant), argv_run, secs in zip(plan, argvs, seconds):
        run_dir = Path(argv_run[argv_run.index("--out") + 1])
        row, real, rec, swap = harness.evaluate(run_dir, args, device, args.eval_batch_size, lpips_model, inception,
                                                reference, classifier=classifier)
        runs.append({"variant": variant, "tokens": tokens, "seed": seed, **row,
                     "last_quarter": last_quarter(run_dir / "log.jsonl"),
                     "steps": harness.last_step(run_dir / "log.jsonl"), "seconds": round(secs, 1)})
        if seed == args.seeds[0]:
            recons[variant, tokens] = rec[: args.grid_images]
            curves[variant, tokens] = harness.val_curve(run_dir / "log.jsonl")
            if swap is not None and variant == "textok":
                swaps[tokens] = (rec[: args.grid_images], swap[: args.grid_images])
        nan = float("nan")
        print(f"{VARIANTS[variant].format(n=tokens)}, seed {seed}: PSNR {row['psnr']:.2f} dB, object PSNR "
              f"{row['object_psnr'] or nan:.2f}, class acc. {row['class_acc'] or nan:.3f}, rFID "
              f"{row['rfid'] or nan:.2f} ({len(real)} images)")
    return runs, real, recons, swaps, curves


def thumbnail_rows(args, real, val_set, classifier, tokens: list) -> list:
    """The plain anchor's rows: each held-out image as a bicubic thumbnail of about N x 8 numbers, enlarged back."""
    rows = []
    for n in tokens:
        thumb = harness.thumbnail(real, n)
        rows.append({"variant": "thumbnail", "tokens": n, "seed": None, "psnr": metrics.psnr(real, thumb),
                     "ssim": metrics.ssim(real, thumb), "lpips": None, "rfid": None, "psnr_swapped": None,
                     "object_psnr": harness.region_psnr(real, thumb, val_set.masks)
                     if getattr(val_set, "masks", None) is not None else None,
                     "class_acc": harness.recon_class_accuracy(classifier, thumb, val_set.labels,
                                                               args.eval_batch_size),
                     "last_quarter": None, "steps": 0, "seconds": 0.0})
    return rows


def write_figures(args, out, rows, real, recons, swaps, curves, tokens) -> None:
    """comparison.png and caption_swap.png (image grids), metrics.png (metrics against N), curves.png."""
    k = min(args.grid_images, len(real))
    columns = [real[:k]] + [recons[v, n] for n in tokens for v in args.variants if (v, n) in recons]
    save_image_grid(harness.as_images(np.stack(columns, 1).reshape(-1, *real.shape[1:])), out / "comparison.png",
                    ncol=len(columns))
    if swaps:
        partner = (np.arange(k) + 1) % min(args.eval_batch_size, len(real))  # the pairing of harness.reconstruct
        columns = [real[:k], real[partner]] + [s for n in tokens if n in swaps for s in swaps[n]]
        save_image_grid(harness.as_images(np.stack(columns, 1).reshape(-1, *real.shape[1:])),
                        out / "caption_swap.png", ncol=len(columns))

    def series(v, key):
        """(N, mean, std) of variant v's rows that have `key`."""
        have = sorted((r["tokens"], r[key], r.get(key + "_std") or 0.0) for r in rows
                      if r["variant"] == v and r.get(key) is not None)
        return tuple(map(list, zip(*have))) if have else None
    panels = [(f"{label} ({'higher' if up else 'lower'} is better)",
               {LABELS[v].format(n="N").split(" (")[0]: series(v, key) for v in [*args.variants, "thumbnail"]
                if series(v, key)})
              for key, label, up in METRICS if any(r.get(key) is not None for r in rows)]
    harness.line_plot(out / "metrics.png", panels)
    harness.line_plot(out / "curves.png", [(f"N = {n}: validation PSNR (64 images, dB)",
                                            {LABELS[v].format(n=n): (*curves[v, n], None) for v in args.variants
                                             if (v, n) in curves}) for n in tokens], xlabel="step", log2_x=False)


REPORT = """# Text conditioning: TexTok vs Baseline (w/o text) vs TexTok with shuffled captions

Command: `{command}`
Machine: {machine}
Settings: preset `{preset}`, set `{name}`, {steps} steps of batch {batch_size} per run, seeds {seeds}, {train} training \
images, evaluated on {val} held-out images (EMA weights).
Train flags passed through: `{extra}`
Class accuracy of the real held-out images (its ceiling): {real_acc}

{table}

Numbers in brackets: the change against the Baseline at the same number of tokens (means over the seeds; ± is the
standard deviation over seeds). "object PSNR": PSNR over the pixels of the object's mask (one-object sets).
"PSNR, swapped caption": the tokens decoded with the next image's caption instead of their own. "last quarter":
validation PSNR gained over the last quarter of the schedule (under 0.2 dB: flattened). The thumbnail rows are the
plain anchor: each image squeezed to a bicubic k x k x 3 thumbnail with about N x 8 numbers and enlarged back.

- `metrics.png`: the metrics against the number of tokens (Fig. 3 analogue); `curves.png`: validation PSNR per step.
- `comparison.png`: columns original, then {variants} for N = {tokens} (Fig. 1).
- `caption_swap.png`: columns original, the image whose caption is swapped in, then for each N: TexTok-N with its
  own caption, with the swapped caption.
"""


if __name__ == "__main__":
    run_main(main)
