"""A tiny TexTok must really overfit: >= 28 dB PSNR on a fixed batch of 8 embedded images within 700 steps (it
reaches about 29 dB at step 600 and 30 dB at step 700; about a minute on one CPU thread)."""
import torch
from conftest import tiny_config

from evaluator.measures import psnr
from runtime.images import to_uint8
from textok import TexTok


def test_tiny_textok_overfits_8_images(batch):
    torch.manual_seed(0)
    model = TexTok(tiny_config(width=128, enc_layers=2, dec_layers=2, mlp_dim=512, num_tokens=16))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x, cond = batch["image"], batch["cond"]
    best = 0.0
    for step in range(1, 701):
        loss = (model(x, cond)[0] - x).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 25 == 0:
            with torch.no_grad():
                best = max(best, psnr(to_uint8(model(x, cond)[0]), to_uint8(x)))  # the one PSNR (uint8)
            if best >= 28:
                break
    print(f"overfit: {best:.2f} dB after {step} steps")
    assert best >= 28, f"PSNR {best:.2f} dB after {step} steps"
