"""common.atomic_write: a failed write leaves the old file and no temporary behind; a new file has the usual
permissions."""
import os

import numpy as np
import pytest
import torch
from PIL import Image

from common import atomic_write, save_image_grid


def test_failed_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "out.json"
    path.write_text("old")

    def broken(tmp):
        open(tmp, "w").write("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_write(path, broken)
    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]


def test_written_file_has_umask_permissions(tmp_path):
    umask = os.umask(0o022)
    try:
        path = atomic_write(tmp_path / "sub" / "grid.png", lambda tmp: open(tmp, "wb").write(b"png"))
    finally:
        os.umask(umask)
    assert path.read_bytes() == b"png"
    assert path.stat().st_mode & 0o777 == 0o644


def test_image_grid_enlarges_small_images_with_nearest_neighbour(tmp_path):
    """Two 32 px images, 2 columns: each pixel becomes a 4 x 4 block (128 px tiles) between 2 px white borders;
    128 px images stay at 1x."""
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    grid = np.asarray(Image.open(save_image_grid(images, tmp_path / "small.png", ncol=2)))
    assert grid.shape == (2 + 128 + 2, 2 + 2 * (128 + 2), 3)
    pixels = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    tile = grid[2:130, 132:260]
    assert np.array_equal(tile, pixels[1].repeat(4, 0).repeat(4, 1))
    assert (grid[:2] == 255).all() and (grid[:, 130:132] == 255).all()
    large = np.asarray(Image.open(save_image_grid(torch.zeros(1, 3, 128, 128), tmp_path / "large.png", ncol=1)))
    assert large.shape == (132, 132, 3)
