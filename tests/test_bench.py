"""The benchmarks' seed aggregation: one row per group, mean and spread over the seeds (bench/text_conditioning.py,
bench/ablations.py)."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from text_conditioning import mean_over_seeds  # noqa: E402


def test_mean_over_seeds_groups_averages_and_keeps_labels():
    runs = [{"table": "4a", "row": "class", "seed": s, "flags": ["--conditioning", "class"], "psnr": p, "lpips": None}
            for s, p in ((0, 19.0), (1, 21.0), (2, 20.0))]
    runs.append({"table": "default", "row": "default", "seed": 0, "flags": [], "psnr": 18.0, "lpips": None})
    rows = mean_over_seeds(runs, keys=("table", "row"))
    assert [(r["table"], r["seeds"]) for r in rows] == [("4a", 3), ("default", 1)]
    assert rows[0]["psnr"] == pytest.approx(20.0) and rows[0]["psnr_std"] == pytest.approx((2 / 3) ** 0.5)
    assert rows[0]["flags"] == ["--conditioning", "class"] and rows[0]["lpips"] is None and "seed" not in rows[0]
    assert rows[1]["psnr"] == 18.0 and rows[1]["psnr_std"] == 0.0
