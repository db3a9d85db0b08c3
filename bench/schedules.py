"""Is TexTok's gap to the Baseline a matter of training length? text_conditioning.py at several schedule lengths, then
one report across them. The plateau is across lengths, not within one run: a variant has plateaued when doubling its
schedule gains under 0.1 dB of final held-out PSNR.

Each length is one text_conditioning.py invocation in OUT/s<steps>/ (its runs cached there, its own results.md); every
other flag goes to text_conditioning.py unchanged (and from there to train.py: `--patch-size 4` trains every run at
patch 4). Seeds and variants apply to every length, so three seeds at one length are a second command, and the report
over every finished run a third (--no-train evaluates the finished runs and skips the rest; --report-only reads the
results.json each length's last evaluation wrote):

    python bench/schedules.py --num-tokens 4 16 --train-steps 2048 4096 8192 16384 --num-images 16384
    python bench/schedules.py --num-tokens 4 --train-steps 8192 --num-images 16384 --seeds 0 1 2 \\
        --variants baseline textok
    python bench/schedules.py --num-tokens 4 16 --train-steps 2048 4096 8192 16384 --num-images 16384 --seeds 0 1 2 \\
        --no-train

Writes in OUT/:
    schedules.md        per N and length: each variant's held-out PSNR (mean ± std over its seeds), TexTok −
                        Baseline and shuffled − Baseline (paired by seed), the gain over the half-length schedule
                        (under 0.1 dB: plateaued), held-out minus training-image PSNR (memorised?), the training l2 at
                        the end and the train time of each run
    schedules_N<n>.png  validation PSNR and training l2 against the step (a line per variant and length, first seed),
                        and the two differences against the length
"""
import argparse
import sys
from pathlib import Path

import numpy as np


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root (this folder is already there)
import harness  # noqa: E402
import text_conditioning  # noqa: E402
from plot_run import read_log  # noqa: E402
from runtime.errors import InputError, run_main  # noqa: E402
from runtime.files import atomic_write, load_json  # noqa: E402


PLATEAU_DB = 0.1  # the criterion: doubling the schedule gains less than this
NAMES = {"baseline": "Baseline", "textok": "TexTok", "shuffled": "shuffled"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train-steps", type=int, nargs="+", default=[2048, 4096, 8192],
                   help="schedule lengths, each run's cosine schedule ending there")
    p.add_argument("--out", default="runs/bench/schedules")
    p.add_argument("--report-only", action="store_true",
                   help="train and evaluate nothing: report each length's results.json as text_conditioning.py last "
                        "wrote it")
    args, rest = p.parse_known_args(argv)
    if min(args.train_steps) < 1:
        p.error("--train-steps must be positive")
    args.train_steps = sorted(set(args.train_steps))
    return args, rest


def main(argv=None):
    args, rest = parse_args(argv)
    harness.require("matplotlib", "bench/schedules.py plots its curves with it")  # before the first run
    for steps in [] if args.report_only else args.train_steps:
        print(f"=== {steps} steps")
        text_conditioning.main([*rest, "--train-steps", str(steps), "--out", str(Path(args.out) / f"s{steps}")])
    tc_args, _ = text_conditioning.parse_args(rest)
    runs = read_runs(Path(args.out), args.train_steps, tc_args)
    command = "python bench/schedules.py " + " ".join(sys.argv[1:] if argv is None else argv)
    report = f"# TexTok against the Baseline across schedule lengths\n\nCommand: `{command}`\n\n" + markdown(runs)
    atomic_write(Path(args.out) / "schedules.md", lambda tmp: Path(tmp).write_text(report))
    for n in sorted({r["tokens"] for r in runs}):
        figure(Path(args.out) / f"schedules_N{n}.png", [r for r in runs if r["tokens"] == n])
    print(report)


def read_runs(out: Path, lengths: list, tc_args) -> list:
    """Every run of results.json in OUT/s<steps>/<set>/ (text_conditioning.py's rows), with `length`, its curves
    (validation PSNR and training l2 from its log.jsonl) and `train_l2`, the mean l2 of its last 10% of log rows."""
    name = Path(tc_args.data).name if tc_args.data else tc_args.set
    runs = []
    for steps in lengths:
        folder = out / f"s{steps}"
        results = folder / name / "results.json"
        if not results.is_file():
            raise InputError(f"{results}: not found (no run of {steps} steps has finished)")
        for row in load_json(results):
            if row["variant"] == "thumbnail":
                continue
            log = read_log(harness.run_dir(argparse.Namespace(out=folder, data=tc_args.data, set=tc_args.set),
                                           row["variant"], row["tokens"], row["seed"]) / "log.jsonl")
            l2 = log["l2"][1]
            val = log.get("val_psnr_uint8", ([], []))
            runs.append({**row, "length": steps, "val": val, "l2": log["l2"],
                         "train_l2": float(np.mean(l2[-max(1, len(l2) // 10):]))})
    return runs


def runs_of(runs: list, variant: str, n: int, length: int) -> list:
    """The runs (one per seed) of one variant at N tokens and one length."""
    return [r for r in runs if (r["variant"], r["tokens"], r["length"]) == (variant, n, length)]


def psnr_of(runs: list, variant: str, n: int, length: int) -> dict:
    """{seed: final held-out PSNR} of one variant at N tokens and one length."""
    return {r["seed"]: r["psnr"] for r in runs_of(runs, variant, n, length)}


def spread(values: list, sign: str = "+") -> str:
    """mean ± std (k seeds), or the one value; sign "+" writes differences."""
    if not values:
        return "–"
    mean = f"{np.mean(values):{sign}.2f}"
    return mean if len(values) == 1 else f"{mean} ± {np.std(values):.2f} ({len(values)})"


def paired(runs: list, variant: str, n: int, length: int) -> list:
    """variant − Baseline, per seed trained for both."""
    a, b = psnr_of(runs, variant, n, length), psnr_of(runs, "baseline", n, length)
    return [a[s] - b[s] for s in sorted(a) if s in b]


def markdown(runs: list) -> str:
    """One table per N: a row per schedule length."""
    variants = [v for v in NAMES if any(r["variant"] == v for r in runs)]
    parts = []
    for n in sorted({r["tokens"] for r in runs}):
        lengths = sorted({r["length"] for r in runs if r["tokens"] == n})
        head = ["steps"] + [f"{NAMES[v]} PSNR" for v in variants] + ["TexTok − Baseline", "shuffled − Baseline"]
        each = " (" + " / ".join(NAMES[v] for v in variants) + ")"
        head += [f"{NAMES[v]}: gain over half" for v in variants]
        head += ["held-out − training PSNR" + each, "training l2" + each, "train time, s" + each]
        lines = [f"## N = {n}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for length in lengths:
            cells = [str(length)]
            for v in variants:
                cells.append(spread(list(psnr_of(runs, v, n, length).values()), sign=""))
            cells += [spread(paired(runs, v, n, length)) for v in ("textok", "shuffled")]
            for v in variants:  # the plateau: final PSNR gained by doubling the schedule (seeds both lengths have)
                now, half = psnr_of(runs, v, n, length), psnr_of(runs, v, n, length // 2)
                gains = [now[s] - half[s] for s in now if s in half]
                plateau = " plateau" if gains and np.mean(gains) < PLATEAU_DB else ""
                cells.append(spread(gains) + plateau)
            mine = {v: runs_of(runs, v, n, length) for v in variants}
            cells.append(" / ".join(f"{np.mean([r['psnr'] - r['train_psnr'] for r in mine[v]]):+.2f}"
                                    if mine[v] and all(r.get("train_psnr") for r in mine[v]) else "–"
                                    for v in variants))
            cells.append(" / ".join(f"{np.mean([r['train_l2'] for r in mine[v]]):.4f}" if mine[v] else "–"
                                    for v in variants))
            cells.append(" / ".join(",".join(f"{r['seconds']:.0f}" for r in mine[v]) or "–" for v in variants))
            lines.append("| " + " | ".join(cells) + " |")
        parts.append("\n".join(lines))
    return "\n\n".join(parts) + (
        "\n\nPSNR on the held-out images (EMA weights), mean ± std over seeds (their count in brackets); differences "
        "paired by seed. \"gain over half\": final PSNR minus the same variant's at half the steps (same seeds); "
        f"under {PLATEAU_DB} dB it has plateaued. Held-out − training PSNR: the final tokenizer on as many training "
        "images as held-out ones (well below 0: memorised). Training l2: mean of the last 10% of the log rows "
        "(the training weights, not the EMA). Train time: each "
        "run's seconds as text_conditioning.py measured them (runs trained side by side share the CPU).\n")


def figure(path: Path, runs: list) -> None:
    """Validation PSNR and training l2 against the step (first seed of each variant and length), and TexTok −
    Baseline / shuffled − Baseline against the length (mean ± std over seeds)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(1, 3, figsize=(15, 4))
    lengths = sorted({r["length"] for r in runs})
    styles = dict(zip(reversed(lengths), ["-", "--", ":", "-."] * len(lengths)))
    first = {}
    for r in sorted(runs, key=lambda r: r["seed"]):
        first.setdefault((r["variant"], r["length"]), r)
    for (v, length), r in sorted(first.items()):
        style = {"ls": styles[length], "color": harness.COLOURS[v], "label": f"{NAMES[v]}, {length} steps"}
        ax[0].plot(*r["val"], **style)
        steps, l2 = r["l2"]
        k = max(1, min(20, len(l2) // 5))  # a running mean over k log rows
        ax[1].plot(steps[k - 1:], np.convolve(l2, np.ones(k) / k, "valid"), **style)
    n = runs[0]["tokens"]
    ax[0].set(xlabel="step", ylabel="held-out PSNR during training (dB, EMA)", title=f"N = {n}")
    ax[1].set(xlabel="step", ylabel="training l2 (running mean)", yscale="log", title=f"N = {n}")
    for v in ("textok", "shuffled"):
        diffs = [(length, paired(runs, v, n, length)) for length in lengths]
        diffs = [(length, d) for length, d in diffs if d]
        if diffs:
            ax[2].errorbar([x for x, _ in diffs], [np.mean(d) for _, d in diffs], yerr=[np.std(d) for _, d in diffs],
                           marker="o", capsize=3, color=harness.COLOURS[v], label=f"{NAMES[v]} − Baseline")
    ax[2].axhline(0, color="k", lw=0.5)
    ax[2].set_xscale("log", base=2)
    ax[2].set_xticks(lengths, [str(x) for x in lengths])
    ax[2].set(xlabel="schedule (steps)", ylabel="final held-out PSNR difference (dB)", title=f"N = {n}")
    for a in ax:
        a.grid(alpha=0.3)
        a.legend(fontsize=7)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)


if __name__ == "__main__":
    run_main(main)
