"""bench/plot_run.py: a run's log.jsonl as a PNG of curves. matplotlib is a bench-only dependency, so these tests
are skipped where it is not installed."""
import json
import sys
from pathlib import Path

import pytest
from PIL import Image


pytest.importorskip("matplotlib")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import plot_run  # noqa: E402

from runtime.errors import InputError  # noqa: E402


def test_plot_run_writes_a_png_of_the_logged_curves(tmp_path):
    rows = [{"step": s, "l2": 1 / s, "vq": 0.0, "grad_norm": 1.0, "lr": 1e-3, "img_per_s": 200.0 + s}
            for s in range(1, 21)]
    rows += [{"step": 10, "val_psnr_uint8": 18.5}, {"step": 20, "val_psnr_uint8": 20.1}]
    (tmp_path / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 21, "l2"')  # torn
    series = plot_run.read_log(tmp_path / "log.jsonl")
    assert series["val_psnr_uint8"] == ([10, 20], [18.5, 20.1]) and len(series["l2"][0]) == 20
    assert plot_run.panels(series) == [("loss terms", ["l2"]), ("validation PSNR (dB)", ["val_psnr_uint8"]),
                                       ("throughput", ["img_per_s"]), ("learning rate", ["lr"]),
                                       ("other", ["grad_norm"])]  # vq: all zero, left out
    out = plot_run.main([str(tmp_path)])
    assert out == tmp_path / "curves.png"
    with Image.open(out) as image:
        assert image.format == "PNG" and image.size[0] >= 600 and image.size[1] >= 5 * 200
    with pytest.raises(InputError, match="log.jsonl: not found"):
        plot_run.main([str(tmp_path / "missing")])
