"""Does text conditioning help generation? TexTok vs Baseline (w/o text) tokenizers under the same DiT (Table 1's
generation half, Table 3 at small scale), and where the samples stop improving with the DiT's training steps.

For each token count N and each tokenizer variant: train the tokenizer (train.py, as bench/text_conditioning.py;
--tokenizer-runs reuses that bench's runs), train a DiT per task (class-conditional, T2I) and per --dit-steps over
its tokens, sample it with sample.py, and score the samples against the held-out real images:
  gFID      FID-Inception (the ADM evaluator's network, metrics.py's weights; 32 px images upsampled to 299) of the
            samples against all held-out real images: Table 1's metric, biased upwards at a few hundred images, so
            compare rows of one table only;
  Class accuracy  the share of class-conditional samples (class i % classes for sample i) in which the set's
            classifier (harness.set_classifier: the embedded set's, or one trained on a labelled --data folder's
            training split) finds their class;
  on an embedded one-object set also "Object FID" (the Fréchet distance in that classifier's 64-d features,
  domain.object_sample_report: it sees the object's identity, which Inception at 32 px barely does) and, for T2I,
  "Caption object accuracy"; on the shapes set domain.evaluate_domain's measures.
Each tokenizer's reconstructions of the held-out images get the same scores (task "reconstructions"): the ceiling
a perfect generator of its tokens would reach. Writes, in --out/<set>: results.json, results.md, fid.png (gFID
against N; with several --dit-steps, gFID and class accuracy against the DiT's steps), runs/.

    python bench/generation.py                      # glyphs, toy-mechanism, N = 1 4, 2 CPU cores
    python bench/generation.py --num-tokens 1 --variants textok --tasks class --dit-steps 480 960 1920 3840 7680
    python bench/generation.py --data DIR --val VAL --tasks class --tokenizer-runs runs/bench/text_conditioning
    python bench/generation.py --set shapes --preset tiny --num-tokens 8 32 --tokenizer-steps 768 --dit-steps 768
    python bench/generation.py --num-tokens 32 128 --tokenizer-steps 100000 --dit-steps 400000 --batch-size 256 \\
        --num-samples 50000 --preset imagenet256 --data DIR     # on GPUs: then use metrics.py's ADM suite on the .npz

A finished run whose settings are unchanged is reused, so an interrupted benchmark continues where it stopped.
"""
import argparse
import sys
from pathlib import Path

import numpy as np
import torch


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root (this folder is already there)
from harness import (line_plot, load_optional, machine, reconstruct, recon_class_accuracy, require,  # noqa: E402
                     schedule_epochs, set_classifier, tokenizer_argv, train_run)
from tools.domain import object_sample_report  # noqa: E402

import metrics  # noqa: E402
from conditions import Conditioned  # noqa: E402
from config import get_preset  # noqa: E402
from data import make_datasets  # noqa: E402
from metrics import read_npz_batch  # noqa: E402
from runtime.errors import run_main  # noqa: E402
from runtime.files import atomic_write, load_json, save_json  # noqa: E402
from textok import TexTok  # noqa: E402
from tools import domain  # noqa: E402


TASKS = {"class": "class-conditional", "t2i": "text-to-image", "recon": "reconstructions (ceiling)"}
VARIANTS = {"baseline": "Baseline-{n} (w/o text)", "textok": "TexTok-{n} (w/ text)"}
OWN_KEYS = ("variant", "tokens", "task", "dit_steps", "dit_seconds")  # the row's identity, not a metric


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--set", default="glyphs", help="embedded set (train.py --set): glyphs, one-shape, shapes")
    p.add_argument("--data", default=None, help="JSONL folder (README layout) instead of an embedded set")
    p.add_argument("--val", default=None, help="held-out JSONL folder; default: a fixed, seeded 10%% of --data")
    p.add_argument("--num-tokens", type=int, nargs="+", default=[1, 4], help="token counts N")
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    p.add_argument("--tasks", nargs="+", choices=["class", "t2i"], default=["class", "t2i"])
    p.add_argument("--out", default="runs/bench/generation")
    p.add_argument("--tokenizer-runs", default=None, help="train (or reuse) the tokenizers under this folder's runs/ "
                   "instead of --out's: bench/text_conditioning.py's --out reuses its runs of the same settings")
    p.add_argument("--preset", default="toy-mechanism")
    p.add_argument("--tokenizer-steps", type=int, default=2048, help="as bench/text_conditioning.py")
    p.add_argument("--dit-steps", type=int, nargs="+", default=[1920],
                   help="DiT training steps, one DiT per value (each its own schedule); the default is the preset's "
                        "30 epochs of 4096 at 64")
    p.add_argument("--batch-size", type=int, default=32, help="tokenizer batch (the DiT uses its preset's)")
    p.add_argument("--num-images", type=int, default=4096)
    p.add_argument("--num-samples", type=int, default=256)
    p.add_argument("--sampling-steps", type=int, default=50)
    p.add_argument("--cfg-scale", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache-dir", default="cache")
    p.add_argument("--inception", default=None, help="FID Inception weights for gFID (default: metrics.py's lookup)")
    p.add_argument("--eval-batch-size", type=int, default=64)
    args = p.parse_args(argv)
    if min(args.num_tokens + args.dit_steps + [args.tokenizer_steps, args.num_samples - 1]) < 1:
        p.error("--num-tokens, --dit-steps and --tokenizer-steps must be >= 1, --num-samples >= 2")
    return args


class Scorer:
    """The scores of one set of uint8 images [M, H, W, 3] against the held-out real images `real`: gFID (None
    without the Inception weights), class accuracy against `labels`, and the embedded set's own measures."""

    def __init__(self, args, real: np.ndarray, device):
        self.args = args
        self.inception = load_optional(lambda: metrics.load_inception(args.inception, device), "gFID")
        self.real = self.statistics(real) if self.inception is not None else None
        self.classifier = set_classifier(args, device)  # scores --data samples; embedded sets have their own reports
        self.num_real = len(real)

    def statistics(self, images):
        pool = metrics.compute_features(self.inception, images, self.args.eval_batch_size, progress=False)["pool"]
        return metrics.feature_statistics(pool)

    def __call__(self, images, labels=None, captions=None, npz=None, task="class") -> dict:
        args = self.args
        row = {"gFID": None if self.real is None else metrics.frechet_distance(*self.statistics(images), *self.real)}
        if args.data:
            row["Class accuracy"] = None if labels is None else recon_class_accuracy(
                self.classifier, images, labels, args.eval_batch_size)
        elif args.set == "shapes":  # domain.py scores an .npz file; reconstructions have none
            row.update(domain.evaluate_domain(None, npz, classes_in_turn=task == "class", captions=captions,
                                              cache_dir=args.cache_dir) if npz else {})
        else:
            row.update(object_sample_report(images, args.set, labels, captions, args.cache_dir))
        return row


def run_dit(args, variant: str, tokens: int, task: str, steps: int, tokenizer: Path, epochs: int,
            score: Scorer) -> dict:
    """DiT over one tokenizer's tokens -> samples -> scores, for one task and one length of training."""
    out = Path(args.out) / "runs" / f"{variant}-{tokens}-{task}-{steps}steps"
    dit_argv = ["--stage", "dit", "--task", task, "--tokenizer", str(tokenizer), "--out", str(out / "train"),
                "--preset", args.preset, "--max-steps", str(steps), "--epochs", str(epochs),
                "--num-images", str(args.num_images), "--seed", str(args.seed), "--cache-dir", args.cache_dir,
                "--set", args.set]
    dit_argv += (["--data", args.data] if args.data else []) + (["--val", args.val] if args.val else [])
    dit_argv += ["--num-classes", str(args.num_classes)] if args.num_classes else []
    dit_seconds = train_run(dit_argv)
    samples_dir = out / f"samples-w{args.cfg_scale:g}"
    sample_argv = ["--dit", str(out / "train" / "dit"), "--num-samples", str(args.num_samples), "--sampling-steps",
                   str(args.sampling_steps), "--cfg-scale", str(args.cfg_scale), "--cache-dir", args.cache_dir,
                   "--out", str(samples_dir), "--seed", str(args.seed)]
    train_run(sample_argv, "sample.py")
    (npz,) = samples_dir.glob("samples_*.npz")
    samples = read_npz_batch(npz)[0]
    captions = (samples_dir / "captions.txt").read_text().splitlines() if task == "t2i" else None
    classes = load_json(out / "train" / "config.json")["num_classes"]  # sample.py draws classes in turn
    labels = [i % classes for i in range(len(samples))] if task == "class" else None
    return {"variant": variant, "tokens": tokens, "task": task, "dit_steps": steps, "dit_seconds": round(dit_seconds, 1),
            **score(samples, labels, captions, npz, task)}


def reconstructions(args, tokenizer: Path, val_set, device) -> tuple:
    """(the held-out images as the tokenizer reads them, its reconstructions of them, each with its own caption)."""
    model = TexTok.from_pretrained(tokenizer, map_location=device).eval()
    return reconstruct(model, Conditioned.for_model(val_set, model.cfg, args.cache_dir, device), device,
                       args.eval_batch_size)[:2]


def markdown_table(rows: list) -> str:
    keys = [k for k in dict.fromkeys(k for r in rows for k in r) if k not in OWN_KEYS]
    lines = ["| task | tokenizer | # tokens | DiT steps | " + " | ".join(keys) + " | DiT train time |",
             "|" + "---|" * (len(keys) + 5)]
    for r in sorted(rows, key=lambda r: (r["task"], r["tokens"], r["variant"], r["dit_steps"] or 0)):
        cells = [TASKS[r["task"]], VARIANTS[r["variant"]].format(n=r["tokens"]), str(r["tokens"]),
                 "–" if r["dit_steps"] is None else str(r["dit_steps"])]
        cells += ["–" if r.get(k) is None else f"{r[k]:.4g}" for k in keys]
        lines.append("| " + " | ".join(cells + ["–" if r["dit_seconds"] is None else f"{r['dit_seconds']:.0f} s"]) + " |")
    return "\n".join(lines)


def plot(args, rows: list, path: Path) -> None:
    """gFID (or the set's first FID) against N per task; with several --dit-steps, gFID, Object FID and class
    accuracy against the DiT's steps, each tokenizer's reconstructions (the ceiling) dashed."""
    fid = "gFID" if any(r.get("gFID") is not None for r in rows) else next(k for k in rows[0] if "FID" in k)
    tasks = [t for t in TASKS if t != "recon" and any(r["task"] == t for r in rows)]
    if len(args.dit_steps) == 1:
        line_plot(path, [(f"{TASKS[t]}: {fid}", {VARIANTS[v].format(n="N"): (sorted(args.num_tokens), [
            r[fid] for r in sorted(rows, key=lambda r: r["tokens"]) if r["variant"] == v and r["task"] == t], None)
            for v in args.variants}) for t in tasks])
        return
    panels = []
    for key in dict.fromkeys([fid, "Object FID", "Class accuracy"]):
        series = {}
        for t in tasks:
            for v in args.variants:
                for n in args.num_tokens:
                    mine = sorted((r for r in rows if (r["task"], r["variant"], r["tokens"]) == (t, v, n)),
                                  key=lambda r: r["dit_steps"])
                    if mine and mine[0].get(key) is not None:
                        name = f"{TASKS[t]}, {VARIANTS[v].format(n=n)}"
                        series[name] = ([r["dit_steps"] for r in mine], [r[key] for r in mine], None)
                        top = next(r for r in rows if (r["task"], r["variant"], r["tokens"]) == ("recon", v, n))
                        if top.get(key) is not None:
                            series[f"reconstructions, {VARIANTS[v].format(n=n)}"] = (
                                [min(args.dit_steps), max(args.dit_steps)], [top[key]] * 2, None)
        if series:
            panels.append((f"{key} against DiT steps", series))
    line_plot(path, panels, xlabel="DiT training steps")


def main(argv=None):
    args = parse_args(argv)
    require("matplotlib", "bench/generation.py plots its FID curves with it")  # before the first run
    name = Path(args.data).name if args.data else args.set
    tok_out = args.tokenizer_runs or str(Path(args.out) / name)
    args.out = str(Path(args.out) / name)
    out = Path(args.out)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    command = "python bench/generation.py " + " ".join(sys.argv[1:] if argv is None else argv)
    train_set, val_set = make_datasets(args.data, args.val, num_images=args.num_images, family=args.set)
    tok_args = argparse.Namespace(**{**vars(args), "steps": args.tokenizer_steps, "out": tok_out})  # its names
    epochs = schedule_epochs(args.tokenizer_steps, len(train_set), args.batch_size)
    dit_batch = get_preset(args.preset).dit.batch_size
    labels = np.asarray(train_set.labels)  # a --data DiT's classes: the labels' (train.py takes the preset's)
    args.num_classes = int(labels.max()) + 1 if args.data and "class" in args.tasks else None
    score, rows = None, []
    for tokens in args.num_tokens:
        for variant in args.variants:
            argv_tok = tokenizer_argv(tok_args, [], variant, tokens, epochs, args.seed)
            train_run(argv_tok)
            tokenizer = Path(argv_tok[argv_tok.index("--out") + 1]) / "tokenizer"
            real, rec = reconstructions(args, tokenizer, val_set, device)
            score = score or Scorer(args, real, device)  # the real images' statistics once
            rows.append({"variant": variant, "tokens": tokens, "task": "recon", "dit_steps": None,
                         "dit_seconds": None, **score(rec, np.asarray(val_set.labels), task="recon")})  # the ceiling
            for task in args.tasks:
                for steps in args.dit_steps:
                    rows.append(run_dit(args, variant, tokens, task, steps, tokenizer,
                                        schedule_epochs(steps, len(train_set), dit_batch), score))
                    save_json(rows, out / "results.json")
                    print({k: v for k, v in rows[-1].items()})
    table = markdown_table(rows)
    plot(args, rows, out / "fid.png")
    real_acc = recon_class_accuracy(score.classifier, real, np.asarray(val_set.labels), args.eval_batch_size)
    atomic_write(out / "results.md", lambda tmp: Path(tmp).write_text(
        f"`{command}` on {machine(device)}; tokenizers {args.tokenizer_steps} steps, DiTs {args.dit_steps} steps, "
        f"{args.num_samples} samples of {args.sampling_steps} DDIM steps (w = {args.cfg_scale}) each; {name}: "
        f"{len(train_set)} training / {len(val_set)} held-out images. gFID: FID-Inception of the "
        f"{args.num_samples} samples (reconstructions: all {score.num_real}) against the {score.num_real} held-out "
        f"real images" + ("" if score.inception else " (skipped: no Inception weights)") + "; Object / domain FID "
        "in the set classifier's features, never FID-Inception" + ("" if real_acc is None else
        f"; the classifier finds the class of {real_acc:.3f} of the real held-out images") + f".\n\n{table}\n"))
    print("\n" + table + f"\n\nwritten: {out / 'results.md'}, results.json, fid.png")
    return rows


if __name__ == "__main__":
    run_main(main)
