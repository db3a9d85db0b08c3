"""A tiny TexTok must really overfit: >= 28 dB PSNR on a fixed batch of 8 embedded images within 60 s on CPU."""
import time

import torch

from conftest import tiny_config
from textok import TexTok


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of images in [-1, 1]."""
    mse = ((a.clamp(-1, 1) - b) / 2).pow(2).mean()
    return (-10 * torch.log10(mse)).item()


def test_tiny_textok_overfits_8_images(batch):
    torch.manual_seed(0)
    model = TexTok(tiny_config(width=128, enc_layers=2, dec_layers=2, mlp_dim=512, num_tokens=16))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x, text, mask = batch["image"], batch["text"], batch["text_mask"]
    start, best = time.perf_counter(), 0.0
    while time.perf_counter() - start < 60 and best < 28:
        for _ in range(25):
            loss = (model(x, text, mask)[0] - x).pow(2).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        with torch.no_grad():
            best = max(best, psnr(model(x, text, mask)[0], x))
    print(f"overfit: {best:.2f} dB after {time.perf_counter() - start:.1f} s")
    assert best >= 28, f"PSNR {best:.2f} dB after 60 s"
