"""Plots a training run's log.jsonl as one PNG of curves: the loss terms, the validation PSNR and the throughput.

    python bench/plot_run.py runs/tokenizer            # writes runs/tokenizer/curves.png
    python bench/plot_run.py runs/dit --out dit.png

Works for both stages: every numeric field train.py logs gets a curve, grouped into panels (losses, validation PSNR,
images/s or latents/s, learning rate, the rest). matplotlib is a bench-only dependency (bench/requirements.txt).
"""
import argparse
import json
import sys
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from harness import require  # noqa: E402
from runtime.errors import InputError, run_main  # noqa: E402
from runtime.files import atomic_write  # noqa: E402


LOSSES = ("l2", "vq", "perceptual", "gan", "d_loss", "r1", "lecam", "loss")  # train.py's loss terms, both stages
THROUGHPUT = ("img_per_s", "latents_per_s")


def read_log(path: Path) -> dict:
    """{field: ([step, ...], [value, ...])} of every numeric field in a log.jsonl (a torn last line is skipped)."""
    if not path.is_file():
        raise InputError(f"{path}: not found (give a run folder written by train.py)")
    series = {}
    lines = path.read_text().splitlines()
    for i, line in enumerate(lines):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                continue  # a killed run can leave a torn last line
            raise InputError(f"{path}:{i + 1}: not a JSON line") from None
        for key, value in row.items():
            if key != "step" and isinstance(value, (int, float)):
                steps, values = series.setdefault(key, ([], []))
                steps.append(row["step"])
                values.append(value)
    if not series:
        raise InputError(f"{path}: no logged values yet")
    return series


def panels(series: dict) -> list:
    """[(title, [fields])] for the fields present and not all zero (vq without VQ): losses, validation PSNR,
    throughput, learning rate, then the rest."""
    series = {k: v for k, v in series.items() if any(v[1])}
    groups = [("loss terms", [k for k in LOSSES if k in series]),
              ("validation PSNR (dB)", [k for k in series if k.startswith("val_psnr")]),
              ("throughput", [k for k in THROUGHPUT if k in series]),
              ("learning rate", [k for k in ("lr",) if k in series])]
    used = {k for _, keys in groups for k in keys}
    groups.append(("other", [k for k in series if k not in used]))
    return [(title, keys) for title, keys in groups if keys]


def plot(series: dict, out: Path, title: str) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = panels(series)
    fig, axes = plt.subplots(len(groups), 1, figsize=(8, 2.8 * len(groups)), sharex=True, squeeze=False)
    for ax, (name, keys) in zip(axes[:, 0], groups):
        for key in keys:
            ax.plot(*series[key], label=key, marker="o" if len(series[key][0]) < 3 else None)
        if name == "loss terms" and all(v > 0 for k in keys for v in series[k][1]):
            ax.set_yscale("log")
        ax.set_title(name)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small", ncol=4)
    axes[-1, 0].set_xlabel("step")
    fig.suptitle(title)
    fig.tight_layout()
    atomic_write(out, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="a train.py output folder (holding log.jsonl)")
    p.add_argument("--out", default=None, help="PNG path (default: RUN/curves.png)")
    args = p.parse_args(argv)
    require("matplotlib", "bench/plot_run.py draws the curves with it")  # before the first run
    run = Path(args.run)
    out = plot(read_log(run / "log.jsonl"), Path(args.out) if args.out else run / "curves.png", str(run))
    print(f"written: {out}")
    return out


if __name__ == "__main__":
    run_main(main)
