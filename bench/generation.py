"""Does text conditioning help generation? TexTok vs Baseline (w/o text) tokenizers under the same DiT (Table 1's
generation half, Table 3 at small scale).

For each token count N and each tokenizer variant: train the tokenizer (train.py, as bench/text_conditioning.py),
train a class-conditional DiT and a DiT-T2I over its tokens, sample both with sample.py, and measure the samples
in the feature space of a small classifier of the embedded set (never FID-Inception, comparable only within this
table): on a one-object set (glyphs, shape; domain.object_sample_report) the "object FID" against real held-out
images, the class accuracy of class-conditional samples and, for T2I, whether the sample shows the object its
caption names; on the shapes set domain.evaluate_domain's domain FID, class accuracy and caption shape / colour
accuracy. Writes, in --out/<set>: results.json, results.md (the table), fid.png (FID against N), runs/.

    python bench/generation.py                      # glyphs, toy-mechanism, N = 1 4, 2 CPU cores
    python bench/generation.py --set shapes --preset tiny --tokens 8 32 --tokenizer-steps 768 --dit-steps 768
    python bench/generation.py --tokens 32 128 --tokenizer-steps 100000 --dit-steps 400000 --batch-size 256 \\
        --num-samples 50000 --preset imagenet256 --data DIR     # on GPUs: then use metrics.py's ADM suite on the .npz

A finished run whose settings are unchanged is reused, so an interrupted benchmark continues where it stopped.
"""
import argparse
import sys
from pathlib import Path

import torch


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root (this folder is already there)
from domain import object_sample_report  # noqa: E402
from harness import line_plot, machine, require, schedule_epochs, tokenizer_argv, train_run  # noqa: E402

import domain  # noqa: E402
from data import make_datasets  # noqa: E402
from errors import run_main  # noqa: E402
from files import atomic_write, load_json, save_json  # noqa: E402
from metrics import read_npz_batch  # noqa: E402


TASKS = {"class": "class-conditional", "t2i": "text-to-image"}
VARIANTS = {"baseline": "Baseline-{n} (w/o text)", "textok": "TexTok-{n} (w/ text)"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--set", default="glyphs", help="embedded set (train.py --set): glyphs, shape, shapes")
    p.add_argument("--data", default=None, help="JSONL folder; the metrics need an embedded set (the default)")
    p.add_argument("--val", default=None)
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 4], help="token counts N")
    p.add_argument("--out", default="runs/bench/generation")
    p.add_argument("--preset", default="toy-mechanism")
    p.add_argument("--tokenizer-steps", type=int, default=2048, help="as bench/text_conditioning.py")
    p.add_argument("--dit-steps", type=int, default=1920, help="the preset's DiT schedule: 30 epochs of 4096 at 64")
    p.add_argument("--batch-size", type=int, default=32, help="tokenizer batch (the DiT uses its preset's)")
    p.add_argument("--num-images", type=int, default=4096)
    p.add_argument("--num-samples", type=int, default=256)
    p.add_argument("--sampling-steps", type=int, default=50)
    p.add_argument("--cfg-scale", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache-dir", default="cache")
    return p.parse_args(argv)


def run_pair(args, variant: str, tokens: int, task: str, tokenizer: Path) -> dict:
    """DiT over one tokenizer's tokens -> samples -> domain metrics for one task."""
    out = Path(args.out) / "runs" / f"{variant}-{tokens}-{task}"
    dit_argv = ["--stage", "dit", "--task", task, "--tokenizer", str(tokenizer), "--out", str(out / "train"),
                "--preset", args.preset, "--max-steps", str(args.dit_steps), "--num-images", str(args.num_images),
                "--seed", str(args.seed), "--cache-dir", args.cache_dir, "--set", args.set]
    dit_argv += ["--data", args.data] if args.data else []
    dit_seconds = train_run(dit_argv)
    sample_argv = ["--dit", str(out / "train" / "dit"), "--num-samples", str(args.num_samples), "--steps",
                   str(args.sampling_steps), "--cfg-scale", str(args.cfg_scale), "--cache-dir", args.cache_dir,
                   "--out", str(out / "samples"), "--seed", str(args.seed)]
    train_run(sample_argv, "sample.py")
    (npz,) = (out / "samples").glob("samples_*.npz")
    captions = (out / "samples" / "captions.txt").read_text().splitlines() if task == "t2i" else None
    if args.set == "shapes":
        report = domain.evaluate_domain(None, npz, classes_in_turn=task == "class", captions=captions,
                                        cache_dir=args.cache_dir)
    else:  # sample.py draws classes in turn: sample i is of class i % num_classes
        samples = read_npz_batch(npz)[0]
        classes = load_json(out / "train" / "config.json")["num_classes"]
        labels = [i % classes for i in range(len(samples))] if task == "class" else None
        report = object_sample_report(samples, args.set, labels, captions, args.cache_dir)
    return {"variant": variant, "tokens": tokens, "task": task, "dit_seconds": round(dit_seconds, 1), **report}


def markdown_table(rows: list) -> str:
    keys = [k for k in dict.fromkeys(k for r in rows for k in r) if k not in ("variant", "tokens", "task", "dit_seconds")]
    lines = ["| task | tokenizer | # tokens | " + " | ".join(keys) + " | DiT train time |", "|" + "---|" * (len(keys) + 4)]
    for r in sorted(rows, key=lambda r: (r["task"], r["tokens"], r["variant"])):
        cells = [TASKS[r["task"]], VARIANTS[r["variant"]].format(n=r["tokens"]), str(r["tokens"])]
        cells += ["–" if r.get(k) is None else f"{r[k]:.4g}" for k in keys] + [f"{r['dit_seconds']:.0f} s"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    require("matplotlib", "bench/generation.py plots its FID curves with it")  # before the first run
    args.out = str(Path(args.out) / (Path(args.data).name if args.data else args.set))
    out = Path(args.out)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    command = "python bench/generation.py " + " ".join(sys.argv[1:] if argv is None else argv)
    train_set, _ = make_datasets(args.data, args.val, num_images=args.num_images, family=args.set)
    tok_args = argparse.Namespace(**{**vars(args), "steps": args.tokenizer_steps})  # text_conditioning's names
    epochs = schedule_epochs(args.tokenizer_steps, len(train_set), args.batch_size)
    rows = []
    for tokens in args.tokens:
        for variant in VARIANTS:
            argv_tok = tokenizer_argv(tok_args, [], variant, tokens, epochs)
            train_run(argv_tok)
            tokenizer = Path(argv_tok[argv_tok.index("--out") + 1]) / "tokenizer"
            for task in TASKS:
                rows.append(run_pair(args, variant, tokens, task, tokenizer))
                save_json(rows, out / "results.json")
                print({k: v for k, v in rows[-1].items()})
    table = markdown_table(rows)
    fid = [k for k in rows[0] if "FID" in k][0]
    line_plot(out / "fid.png", [
        (f"{TASKS[t]}: {fid}", {VARIANTS[v].format(n="N"): (sorted(args.tokens), [
            r[fid] for r in sorted(rows, key=lambda r: r["tokens"]) if r["variant"] == v and r["task"] == t], None)
            for v in VARIANTS}) for t in TASKS])
    atomic_write(out / "results.md", lambda tmp: Path(tmp).write_text(
        f"`{command}` on {machine(device)}; tokenizers {args.tokenizer_steps} steps, DiTs {args.dit_steps} steps, "
        f"{args.num_samples} samples of {args.sampling_steps} DDIM steps (w = {args.cfg_scale}) each; set "
        f"{args.set}; FID in the set classifier's features, never FID-Inception.\n\n{table}\n"))
    print("\n" + table + f"\n\nwritten: {out / 'results.md'}, results.json, fid.png")
    return rows


if __name__ == "__main__":
    run_main(main)
