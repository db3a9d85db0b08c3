"""What the adversarial losses cost in a stage-1 (tokenizer) training step (App. C: GAN loss, LeCAM, R1 with cost 10).

Rows, each the mean time of one training step (tokenizer update, then discriminator update where there is one):
  stage-1 step, ℓ2 only                  TexTok forward, l2 loss, backward, clipping, Adam.
  stage-1 step with disc + R1 + LeCAM    + the generator loss through disc, and a disc step: non-saturating loss,
                                         R1 on the real batch (double backward), LeCAM; App. C's setting.
  ... lazy R1 (k = 16)                   R1 every 16th disc step, weighted by 16 (StyleGAN2's lazy regularisation).
  ... depthwise-conv blur                (--compare-conv-blur) the discriminator's blur as the depthwise conv it
                                         was before (issue 14: on an H100 its double backward took 85% of the
                                         R1 step).
Each step is train.py's: steps.generator_step, then steps.discriminator_step. TexTok runs with
conditioning "none" (no text encoder needed; text adds the same cost to every row). Random images,
bf16 autocast on CUDA, float32 on the CPU.

    python bench/gan_step.py --threads 1 --compare-conv-blur   # CPU: the tiny preset at batch 8, ~20 s
    python bench/gan_step.py --preset imagenet256 --batch-size 32 --timed-steps 32 --compare-conv-blur   # GPU (App. C sizes)

On a shared CPU, --threads 1 gives steadier times than two threads competing with other processes.
"""
import argparse
import dataclasses
import sys
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from harness import best_seconds  # noqa: E402

from config import PRESETS, get_preset  # noqa: E402
from discriminator import LeCAM, ResBlock, StyleGANDiscriminator  # noqa: E402
from runtime.errors import run_main  # noqa: E402
from steps import discriminator_step, generator_step  # noqa: E402
from textok import TexTok  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="tiny", help="TexTok and discriminator sizes")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--timed-steps", type=int, default=16, help="timed steps per row (a multiple of --r1-every)")
    p.add_argument("--repeats", type=int, default=3, help="timed blocks of --timed-steps steps; the best is kept")
    p.add_argument("--r1-every", type=int, default=16, help="k of the lazy-R1 row (StyleGAN2: 16)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--compare-conv-blur", action="store_true",
                   help="add a row with the former depthwise-conv blur in the discriminator")
    args = p.parse_args(argv)
    if args.timed_steps % args.r1_every:
        p.error(f"--timed-steps {args.timed_steps} is not a multiple of --r1-every {args.r1_every}")
    return args


class DepthwiseConvBlur(nn.Module):
    """The former BlurPool2d: a depthwise conv with the normalised [1,3,3,1] outer product, stride 2, padding 1."""

    def __init__(self):
        super().__init__()
        taps = torch.tensor([1.0, 3.0, 3.0, 1.0])
        self.register_buffer("kernel", (taps[:, None] * taps[None, :] / 64)[None, None])

    def forward(self, x):
        channels = x.shape[1]
        return F.conv2d(x, self.kernel.to(x.dtype).expand(channels, 1, 4, 4), stride=2, padding=1, groups=channels)


def seconds_per_step(args, device, gan: bool, r1_every: int = 1, conv_blur: bool = False) -> float:
    """Seconds per stage-1 step (the best block's mean, after a warm-up step), App. C's loss weights and Adam betas."""
    preset = get_preset(args.preset)
    cfg, tc = dataclasses.replace(preset.model, conditioning="none"), preset.train
    torch.manual_seed(0)
    model = TexTok(cfg).to(device).train()
    disc = StyleGANDiscriminator(cfg.image_size, tc.disc_channels, tc.disc_multipliers).to(device)
    if conv_blur:
        for block in disc.modules():
            if isinstance(block, ResBlock):
                block.blur = DepthwiseConvBlur().to(device)
    lecam = LeCAM(tc.lecam_decay).to(device)
    opt = torch.optim.Adam(model.parameters(), tc.lr, betas=(tc.beta1, tc.beta2), fused=True)
    d_opt = torch.optim.Adam(disc.parameters(), tc.lr, betas=(tc.beta1, tc.beta2), fused=True)
    images = torch.rand(args.batch_size, 3, cfg.image_size, cfg.image_size, device=device) * 2 - 1
    micro_batches = [({"image": images, "cond": None}, True)]
    tc = dataclasses.replace(tc, r1_every=r1_every, perceptual_weight=0.0)  # no VGG trunk offline

    def step(i):
        """train.py's stage-1 step: the generator step, then (gan) the discriminator step, the i-th disc step."""
        _, fakes = generator_step(model, model, opt, disc, None, tc, micro_batches, "auto", gan)
        if gan:
            discriminator_step(disc, d_opt, lecam, tc, micro_batches, fakes, "auto", i, tc.lr)

    def block():
        for i in range(1, args.timed_steps + 1):
            step(i)

    return best_seconds(block, args.repeats, device, warmup=lambda: step(0)) / args.timed_steps  # warm-up: an R1 step


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    k = args.r1_every
    rows = [("stage-1 step, ℓ2 only", dict(gan=False)),
            ("stage-1 step with disc + R1 + LeCAM", dict(gan=True)),
            (f"stage-1 step with disc + lazy R1 (k = {k}) + LeCAM", dict(gan=True, r1_every=k))]
    if args.compare_conv_blur:
        rows += [("stage-1 step with disc + R1 + LeCAM, depthwise-conv blur", dict(gan=True, conv_blur=True)),
                 (f"stage-1 step with disc + lazy R1 (k = {k}) + LeCAM, depthwise-conv blur",
                  dict(gan=True, r1_every=k, conv_blur=True))]
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"preset {args.preset}, batch {args.batch_size}, best of {args.repeats} x {args.timed_steps} steps; {where}, "
          f"torch {torch.__version__}\n")
    print("| step | ms / step | vs ℓ2 only |\n|---|---|---|")
    base = None
    for name, kwargs in rows:
        seconds = seconds_per_step(args, device, **kwargs)
        base = base or seconds
        print(f"| {name} | {1e3 * seconds:.1f} | {seconds / base:.2f}x |", flush=True)


if __name__ == "__main__":
    run_main(main)
