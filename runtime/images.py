"""Image tensors and arrays: float [B, 3, H, W] in [-1, 1] to and from uint8 [B, H, W, 3], and the PNG grid writer."""
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from runtime.files import atomic_write


def to_tensor(img: np.ndarray) -> torch.Tensor:
    """uint8 [H, W, 3] -> float [3, H, W] in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1).float() / 127.5 - 1


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """Images [B, 3, H, W] in [-1, 1] -> uint8 [B, H, W, 3] (the ADM .npz layout)."""
    x = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def save_image_grid(images: torch.Tensor, path, ncol: int, pad: int = 2, min_side: int = 128) -> Path:
    """Writes images [B, 3, H, W] in [-1, 1] as one PNG grid with `ncol` columns, atomically. Images smaller than
    `min_side` are enlarged by the smallest whole factor that reaches it, nearest neighbour (a 32 px image: 4 x 4
    pixels per pixel), so small images stay readable and sharp."""
    x = to_uint8(images)
    factor = -(-min_side // max(x.shape[1:3]))  # ceil; 1 for images of min_side and larger
    x = x.repeat(factor, 1).repeat(factor, 2) if factor > 1 else x
    B, H, W, _ = x.shape
    nrow = -(-B // ncol)
    grid = np.full((nrow * (H + pad) + pad, ncol * (W + pad) + pad, 3), 255, np.uint8)
    for i, img in enumerate(x):
        r, c = divmod(i, ncol)
        grid[pad + r * (H + pad): pad + r * (H + pad) + H, pad + c * (W + pad): pad + c * (W + pad) + W] = img
    return atomic_write(path, lambda tmp: Image.fromarray(grid).save(tmp, format="PNG"))
