"""Table 4 at small scale: what each design choice of TexTok does to reconstruction (§4.7).

Trains one tokenizer per row and seed with train.py under identical settings (steps, seed, data, batch: only the
row's flags differ), evaluates each EMA tokenizer on the held-out split (PSNR, SSIM; LPIPS and rFID where their
weights are present) and writes, in --out:
    results.json                one entry per run (row and seed)
    results.md                  one row per row of Table 4 (a, c, d, e), mean ± std over the seeds when several
    psnr.png                    mean PSNR of every row (bars), the default row marked
    runs/<row>-seed<k>/         the train.py outputs

Rows (the embedded sets provide the class-name text and the short caption: embedded_sets.caption and
object_caption):
    4a  none (Baseline) | class embedding | class text "An image of a letter B." | short caption "A red letter B." |
        full caption (default)
    4c  cross-attention layer | in-context (default)
    4d  text in the tokenizer only | the detokenizer only | both (default)
    4e  the preset's model (default) | a larger model (--large-flags)
Tab. 4b (T5 size) is not run: one offline text encoder exists here (pass --text-encoder PATH to train.py for T5).

    python bench/ablations.py                       # glyphs, toy-mechanism (TexTok-1), 2 CPU cores
    python bench/ablations.py --set shapes --preset tiny --train-steps 640      # RESULTS §3's shapes-set table
    python bench/ablations.py --train-steps 100000 --batch-size 256 --preset imagenet256 --data DIR \\
        --large-flags "--model-size large" --perceptual-weight 0.1      # on GPUs; unknown flags go to train.py

A finished run whose settings are unchanged is reused, so an interrupted benchmark continues where it stopped.
"""
import argparse
import shlex
import sys
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root (this folder is already there)
from harness import (default_jobs, evaluate, last_step, load_optional, machine, mean_over_seeds,  # noqa: E402
                     require, schedule_epochs, set_classifier, train_runs)

import metrics  # noqa: E402
import perceptual  # noqa: E402
from data import make_datasets  # noqa: E402
from runtime.errors import run_main  # noqa: E402
from runtime.files import atomic_write, save_json  # noqa: E402


# (table, row label, train.py flags, caption style); the default row (full caption, in-context, both, tiny) is
# trained once and shown in every group.
DEFAULT = ("default", "full caption, in-context, both, preset's model (default)", [], "full")
ROWS = [("4a", "none (Baseline)", ["--conditioning", "none"], "full"),
        ("4a", "class embedding", ["--conditioning", "class"], "full"),
        ("4a", "class text", [], "class"),
        ("4a", "short caption", [], "short"),
        ("4c", "cross-attention layer", ["--cond-arch", "cross-attention"], "full"),
        ("4d", "text in tokenizer only", ["--cond-location", "tokenizer"], "full"),
        ("4d", "text in detokenizer only", ["--cond-location", "detokenizer"], "full"),
        ("4e", "larger model", None, "full")]  # flags from --large-flags
OWN_FLAGS = {"--stage", "--out", "--max-steps", "--epochs", "--batch-size", "--num-images", "--seed", "--data",
             "--val", "--cache-dir", "--preset", "--resume", "--captions", "--conditioning", "--cond-arch",
             "--cond-location", "--set"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--set", default="glyphs", help="embedded set (train.py --set): glyphs (the default), shape, "
                   "shapes; 4a's caption rows need an embedded set")
    p.add_argument("--data", default=None, help="JSONL folder instead of an embedded set")
    p.add_argument("--val", default=None)
    p.add_argument("--out", default="runs/bench/ablations")
    p.add_argument("--preset", default="toy-mechanism")
    p.add_argument("--train-steps", type=int, default=2048, help="training steps per run (the schedule ends there)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--num-images", type=int, default=4096)
    p.add_argument("--seeds", type=int, nargs="+", default=[0],
                   help="training seeds per row; with several, the table gives mean ± std (e.g. --seeds 0 1 2)")
    p.add_argument("--cache-dir", default="cache")
    p.add_argument("--eval-batch-size", type=int, default=64)
    p.add_argument("--inception", default=None, help="FID Inception weights for rFID (default: metrics.py's lookup)")
    p.add_argument("--large-flags", default="--width 192 --heads 6 --mlp-dim 768 --enc-layers 3 --dec-layers 3",
                   help="train.py flags of Tab. 4e's larger model")
    p.add_argument("--rows", nargs="+", default=None, help="only these tables (4a 4c 4d 4e)")
    p.add_argument("--jobs", type=int, default=None, help="runs trained at once (default: 4 on a GPU, else one per "
                   "--threads CPU cores)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads per training run on a CPU")
    args, extra = p.parse_known_args(argv)
    clash = sorted({a.split("=")[0] for a in extra if a.split("=")[0] in OWN_FLAGS})
    if clash:
        p.error(f"{', '.join(clash)}: set by the benchmark itself (identically for every row)")
    return args, extra


def train_argv(args, extra, name: str, flags: list, captions: str, epochs: int, seed: int) -> list:
    out = Path(args.out) / "runs" / f"{name}-seed{seed}"
    argv = ["--stage", "tokenizer", "--preset", args.preset, "--out", str(out),
            "--max-steps", str(args.train_steps), "--epochs", str(epochs), "--batch-size", str(args.batch_size),
            "--num-images", str(args.num_images), "--seed", str(seed), "--cache-dir", args.cache_dir,
            "--captions", captions, "--eval-every", str(args.train_steps)]
    argv += ["--data", args.data] if args.data else ["--set", args.set]
    argv += ["--val", args.val] if args.val else []
    return argv + flags + list(extra)


def bar_plot(path, rows: list) -> Path:
    """PSNR of every row as a horizontal bar, the default row in red."""
    font = ImageFont.load_default(size=13)
    left = 16 + max(font.getlength(f"{r['table']}: {r['row']}") for r in rows)  # the longest label fits
    W, bar_h = int(left) + 430, 24
    img = Image.new("RGB", (W, 40 + bar_h * len(rows)), "white")
    draw = ImageDraw.Draw(img)
    lo, hi = min(r["psnr"] for r in rows) - 0.5, max(r["psnr"] for r in rows) + 0.2
    draw.text((W / 2, 8), f"validation PSNR (dB), axis from {lo:.1f}", fill="black", font=font, anchor="mt")
    for i, r in enumerate(rows):
        y = 32 + i * bar_h
        x = left + (r["psnr"] - lo) / (hi - lo) * (W - left - 70)
        colour = (214, 39, 40) if r["table"] == "default" else (90, 90, 90)
        draw.text((left - 8, y + bar_h / 2), f"{r['table']}: {r['row']}", fill="black", font=font, anchor="rm")
        draw.rectangle([left, y + 4, x, y + bar_h - 4], fill=colour)
        draw.text((x + 6, y + bar_h / 2), f"{r['psnr']:.2f}", fill="black", font=font, anchor="lm")
    return atomic_write(path, lambda tmp: img.save(tmp, format="PNG"))


def markdown_table(rows: list) -> str:
    """Table 4 analogue: each group with the default row repeated, the change against it in brackets (means and
    standard deviations over the seeds when there are several)."""
    default = next(r for r in rows if r["table"] == "default")
    head = ["table", "conditioning", "PSNR ↑", "object PSNR ↑", "SSIM ↑", "LPIPS ↓", "rFID ↓",
            "class acc. of recon. ↑", "steps", "train time"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for table in dict.fromkeys(r["table"] for r in rows if r["table"] != "default"):
        for r in [x for x in rows if x["table"] == table] + [default]:
            spread = r["seeds"] > 1
            psnr = f"{r['psnr']:.2f}" + (f" ± {r['psnr_std']:.2f}" if spread else "")
            cells = [table, r["row"], psnr + ("" if r is default else f" ({r['psnr'] - default['psnr']:+.2f})")]
            cells += ["–" if r.get(k) is None else f"{r[k]:{f}}" + (f" ± {r[k + '_std']:{f}}" if spread else "")
                      for k, f in (("object_psnr", ".2f"), ("ssim", ".4f"))]
            cells += ["–" if r[k] is None else f"{r[k]:.4f}" for k in ("lpips", "rfid")]
            cells += ["–" if r["class_acc"] is None else f"{r['class_acc']:.3f}" + (
                f" ± {r['class_acc_std']:.3f}" if spread else "")]
            cells += [str(round(r["steps"])), f"{r['seconds']:.0f} s"]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    args, extra = parse_args(argv)
    require("matplotlib", "bench/ablations.py plots its bar chart with it")  # before the first run
    torch.set_num_threads(args.threads)  # the evaluation's, and what the report's machine line names
    args.out = str(Path(args.out) / (Path(args.data).name if args.data else args.set))
    out = Path(args.out)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    command = "python bench/ablations.py " + " ".join(sys.argv[1:] if argv is None else argv)
    train_set, _ = make_datasets(args.data, args.val, num_images=args.num_images, family=args.set)
    epochs = schedule_epochs(args.train_steps, len(train_set), args.batch_size)
    lpips_model = load_optional(lambda: perceptual.load_lpips("alex", device), "LPIPS")
    inception = load_optional(lambda: metrics.load_inception(args.inception, device), "rFID")
    classifier = set_classifier(args, device)
    todo = [DEFAULT] + [r for r in ROWS if args.rows is None or r[0] in args.rows]
    plan = [(seed, table, label, shlex.split(args.large_flags) if flags is None else flags, captions)
            for seed in args.seeds for table, label, flags, captions in todo]
    argvs = [train_argv(args, extra, "default" if table == "default" else
                        f"{table}-{label.split(' (')[0].replace(' ', '-')}", flags, captions, epochs, seed)
             for seed, table, label, flags, captions in plan]
    seconds = train_runs(argvs, jobs=args.jobs or default_jobs(device.type, args.threads),
                         threads=args.threads if device.type == "cpu" else None)
    runs = []
    for (seed, table, label, flags, captions), argv_run, secs in zip(plan, argvs, seconds):
        run_dir = Path(argv_run[argv_run.index("--out") + 1])
        row = evaluate(run_dir, args, device, args.eval_batch_size, lpips_model, inception, {}, captions,
                       classifier)[0]
        runs.append({"table": table, "row": label, "seed": seed, "flags": flags, "captions": captions, **row,
                     "steps": last_step(run_dir / "log.jsonl"), "seconds": round(secs, 1)})
        save_json(runs, out / "results.json")
        print(f"{table} {label}, seed {seed}: PSNR {row['psnr']:.2f} dB, SSIM {row['ssim']:.4f}")
    rows = mean_over_seeds(runs, keys=("table", "row"))
    table = markdown_table(rows)
    bar_plot(out / "psnr.png", rows)
    atomic_write(out / "results.md", lambda tmp: Path(tmp).write_text(
        f"`{command}` on {machine(device)}; {args.train_steps} steps of batch {args.batch_size} per run, seeds "
        f"{' '.join(map(str, args.seeds))}, EMA weights, held-out split.\n\n{table}\n"))
    print("\n" + table + f"\n\nwritten: {out / 'results.md'}, results.json, psnr.png")
    return rows


if __name__ == "__main__":
    run_main(main)
