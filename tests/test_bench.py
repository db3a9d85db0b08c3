"""The benchmarks' pieces (bench/text_conditioning.py, shared by bench/ablations.py): seed aggregation, mean and
spread per group; the class accuracy of reconstructions."""
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from text_conditioning import mean_over_seeds, recon_class_accuracy  # noqa: E402


def test_mean_over_seeds_groups_averages_and_keeps_labels():
    runs = [{"table": "4a", "row": "class", "seed": s, "flags": ["--conditioning", "class"], "psnr": p, "lpips": None}
            for s, p in ((0, 19.0), (1, 21.0), (2, 20.0))]
    runs.append({"table": "default", "row": "default", "seed": 0, "flags": [], "psnr": 18.0, "lpips": None})
    rows = mean_over_seeds(runs, keys=("table", "row"))
    assert [(r["table"], r["seeds"]) for r in rows] == [("4a", 3), ("default", 1)]
    assert rows[0]["psnr"] == pytest.approx(20.0) and rows[0]["psnr_std"] == pytest.approx((2 / 3) ** 0.5)
    assert rows[0]["flags"] == ["--conditioning", "class"] and rows[0]["lpips"] is None and "seed" not in rows[0]
    assert rows[1]["psnr"] == 18.0 and rows[1]["psnr_std"] == 0.0


class RedMeansCircle(torch.nn.Module):
    """A stand-in for domain.ShapesClassifier: cell 0 holds a circle (class 0) in mostly-red images, else a square."""
    outputs = ("features", "shape", "colour")

    def __init__(self):
        super().__init__()
        self.p = torch.nn.Parameter(torch.zeros(()))

    def forward(self, images):
        red = (images[..., 0].float().mean((1, 2)) > 127).long()
        shape = torch.full((len(images), 9, 9), -1.0)
        shape[:, 1:, 8] = 1.0  # the other cells are empty (the last class)
        shape[:, 0, :] = torch.nn.functional.one_hot(1 - red, 9).float()
        colour = torch.zeros(len(images), 9, 13)
        colour[..., 12] = 1.0  # every cell: no colour
        return shape.flatten(1), shape, colour


def test_recon_class_accuracy_reads_the_shape_logits():
    images = np.zeros((4, 8, 8, 3), np.uint8)
    images[:2, ..., 0] = 255  # two red images: "circles"
    assert recon_class_accuracy(RedMeansCircle(), images, [0, 0, 1, 1], batch_size=3) == 1.0
    assert recon_class_accuracy(RedMeansCircle(), images, [1, 0, 1, 0], batch_size=3) == 0.5
    assert recon_class_accuracy(None, images, [0, 0, 1, 1], batch_size=3) is None
