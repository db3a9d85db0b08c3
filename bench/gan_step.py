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

--compare-gan-changes instead runs the same --timed-steps GAN steps (lazy R1, k = --r1-every: steps with and without R1)
from one seed as the code before issue 31 did and with each of its changes added in turn, and prints per row the
time per step, the host reads (.item(), float(), bool(), .tolist()) per step, and the largest difference of any
loss term (relative) and of any weight (tokenizer and discriminator) from the first row:
  before: a read per term    steps.py as at e1d3b5b: each loss term read (.item()) at every step, two discriminator
                             calls (real, then fake), NCHW
  + terms on the device      the terms stay tensors, read once per log row (Run.log): none in a step
  + channels-last            the discriminator's (and LPIPS') inputs in channels-last memory (train.py: on CUDA;
                             here forced on the CPU to show the losses keep)
  + one discriminator call   discriminator.real_fake_logits: one call on cat(real, fake) on steps without R1
  ... (R1 steps, one call)   for comparison, one call on R1 steps too (R1's double backward then runs over the fakes)

    python bench/gan_step.py --threads 1 --compare-conv-blur   # CPU: the tiny preset at batch 8, ~20 s
    python bench/gan_step.py --preset imagenet256 --batch-size 32 --timed-steps 32 --compare-conv-blur   # GPU (App. C sizes)
    python bench/gan_step.py --threads 1 --compare-gan-changes --r1-every 2 --timed-steps 8   # CPU, ~1 minute

--compare-compile instead times train.py's stage-1 step (the preset's TexTok with random text embeddings, batch
--batch-size) eager and with the TexTok compiled (train.py --compile: torch.compile, inductor), in --repeats
interleaved rounds of --timed-steps steps each (eager, then compiled: a loaded machine slows both alike), after the
compile and a warm-up; it prints each round's ratio, their median and range, and the first step's losses:

    python bench/gan_step.py --compare-compile --batch-size 32 --timed-steps 8 --repeats 5   # the tiny main job's step

On a shared CPU, --threads 1 gives steadier times than two threads competing with other processes.
"""
import argparse
import dataclasses
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from harness import best_seconds, sync  # noqa: E402

import steps  # noqa: E402
from conditions import Cond  # noqa: E402
from config import PRESETS, get_preset  # noqa: E402
from discriminator import LeCAM, ResBlock, StyleGANDiscriminator, r1_penalty, real_fake_logits  # noqa: E402
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
    p.add_argument("--compare-gan-changes", action="store_true",
                   help="instead: issue 31's GAN-step changes one by one, their losses against the code before")
    p.add_argument("--compare-compile", action="store_true",
                   help="instead: the stage-1 step eager against torch.compile'd, interleaved rounds")
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


def two_calls(disc, real_images, fake_images, *, every=1, step=0):
    """The discriminator's logits as steps.py took them before issue 31: the real batch (with R1), then the fakes."""
    logits_real, penalty = r1_penalty(disc, real_images, every=every, step=step)
    return logits_real, disc(fake_images), penalty


def one_call(disc, real_images, fake_images, *, every=1, step=0):
    """One call on cat(real, fake) on every step, R1 steps too (the penalty's gradient over the real half)."""
    if step % every:
        return real_fake_logits(disc, real_images, fake_images, every=every, step=step)
    images = torch.cat([real_images, fake_images]).detach().requires_grad_(True)
    logits_real, logits_fake = disc(images).split(len(real_images))
    (grad,) = torch.autograd.grad(logits_real.sum(), images, create_graph=True)
    return logits_real, logits_fake, every * grad[:len(real_images)].float().pow(2).flatten(1).sum(1).mean()


class HostReads:
    """Counts the calls that read a tensor on the host (a device sync on CUDA) while active."""
    NAMES = ("item", "tolist", "__bool__", "__float__", "__int__")

    def __enter__(self):
        self.count, self.saved = 0, {n: getattr(torch.Tensor, n) for n in self.NAMES}
        for name, real in self.saved.items():
            setattr(torch.Tensor, name, self.counted(real))
        return self

    def counted(self, real):
        def f(*a, **k):
            self.count += 1
            return real(*a, **k)
        return f

    def __exit__(self, *exc):
        for name, real in self.saved.items():
            setattr(torch.Tensor, name, real)


CHANGES = [("before: a read per term, two disc calls, NCHW", dict(read_each=True, logits=two_calls, nhwc=False)),
           ("+ terms on the device", dict(read_each=False, logits=two_calls, nhwc=False)),
           ("+ channels-last (forced on the CPU)", dict(read_each=False, logits=two_calls, nhwc=True)),
           ("+ one discriminator call (steps without R1)", dict(read_each=False, logits=None, nhwc=True)),
           ("... one call on R1 steps too", dict(read_each=False, logits=one_call, nhwc=True))]


def gan_run(args, device, read_each: bool, logits, nhwc: bool):
    """(seconds per step, host reads per step, [each step's loss terms], final weights) of --timed-steps GAN steps from
    seed 0 with one variant of the step; the first step (R1) is a warm-up outside the timing."""
    preset = get_preset(args.preset)
    cfg, tc = dataclasses.replace(preset.model, conditioning="none"), preset.train
    tc = dataclasses.replace(tc, r1_every=args.r1_every, perceptual_weight=0.0)  # no VGG trunk offline
    torch.manual_seed(0)
    model = TexTok(cfg).to(device).train()
    disc = StyleGANDiscriminator(cfg.image_size, tc.disc_channels, tc.disc_multipliers).to(device)
    lecam = LeCAM(tc.lecam_decay).to(device)
    opt = torch.optim.Adam(model.parameters(), tc.lr, betas=(tc.beta1, tc.beta2), fused=True)
    d_opt = torch.optim.Adam(disc.parameters(), tc.lr, betas=(tc.beta1, tc.beta2), fused=True)
    images = torch.rand(args.timed_steps + 1, args.batch_size, 3, cfg.image_size, cfg.image_size, device=device) * 2 - 1
    layout = (lambda x: x.contiguous(memory_format=torch.channels_last)) if nhwc else (lambda x: x)
    saved = steps.channels_last, steps.real_fake_logits
    steps.channels_last, steps.real_fake_logits = layout, logits or real_fake_logits
    rows, seconds, reads = [], 0.0, 0
    try:
        for i in range(args.timed_steps + 1):
            micro_batches = [({"image": images[i], "cond": None}, True)]
            sync(device)
            start = time.perf_counter()
            with HostReads() as host:
                terms, fakes = generator_step(model, model, opt, disc, None, tc, micro_batches, "auto", True)
                terms |= discriminator_step(disc, d_opt, lecam, tc, micro_batches, fakes, "auto", i, tc.lr)
                if read_each:
                    terms = {k: v.item() for k, v in terms.items()}
                sync(device)
            if i:
                seconds, reads = seconds + time.perf_counter() - start, reads + host.count
            rows.append({k: float(v) for k, v in terms.items()})
    finally:
        steps.channels_last, steps.real_fake_logits = saved
    weights = torch.cat([p.detach().flatten().cpu() for p in [*model.parameters(), *disc.parameters()]])
    return seconds / args.timed_steps, reads / args.timed_steps, rows, weights


def compare_gan_changes(args, device) -> None:
    """The table of --compare-gan-changes: runs interleaved over --repeats rounds, the best time of each row."""
    results = {}
    for _ in range(args.repeats):
        for name, kwargs in CHANGES:
            seconds, reads, rows, weights = gan_run(args, device, **kwargs)
            best = results.get(name, (float("inf"),))[0]
            results[name] = (min(best, seconds), reads, rows, weights)
    base = results[CHANGES[0][0]]
    print("| GAN step | ms / step | vs before | host reads / step | max rel. loss diff | max weight diff |\n"
          "|---|---|---|---|---|---|")
    for name, (seconds, reads, rows, weights) in results.items():
        loss = max(abs(r[k] - b[k]) / max(abs(b[k]), 1e-30) for r, b in zip(rows, base[2]) for k in b)
        print(f"| {name} | {1e3 * seconds:.1f} | {seconds / base[0]:.2f}x | {reads:.0f} | {loss:.1e} | "
              f"{(weights - base[3]).abs().max().item():.1e} |", flush=True)


def compare_compile(args, device) -> None:
    """--compare-compile: eager against compiled stage-1 steps (ℓ2 only, as the tiny main job's first 2560 steps,
    then with the discriminator), from the same weights and batch, in interleaved rounds."""
    preset = get_preset(args.preset)
    cfg, tc = preset.model, dataclasses.replace(preset.train, perceptual_weight=0.0, r1_every=args.r1_every)
    B = args.batch_size
    images = torch.rand(B, 3, cfg.image_size, cfg.image_size, device=device) * 2 - 1
    lengths = torch.randint(4, cfg.text_len, (B, 1), device=device)
    cond = Cond(torch.randn(B, cfg.text_len, cfg.text_dim, device=device),
                torch.arange(cfg.text_len, device=device)[None] < lengths, torch.randint(cfg.num_classes, (B,)))
    micro_batches = [({"image": images, "cond": cond}, True)]
    for gan in (False, True):
        runs = {}
        for name in ("eager", "compiled"):
            torch.manual_seed(0)
            model = TexTok(cfg).to(device).train()
            disc = StyleGANDiscriminator(cfg.image_size, tc.disc_channels, tc.disc_multipliers).to(device)
            opt = torch.optim.Adam(model.parameters(), tc.lr, betas=(tc.beta1, tc.beta2), fused=True)
            d_opt = torch.optim.Adam(disc.parameters(), tc.lr, betas=(tc.beta1, tc.beta2), fused=True)
            net, lecam = torch.compile(model) if name == "compiled" else model, LeCAM(tc.lecam_decay).to(device)

            def step(i, net=net, model=model, disc=disc, opt=opt, d_opt=d_opt, lecam=lecam):
                terms, fakes = generator_step(net, model, opt, disc, None, tc, micro_batches, "auto", gan)
                if gan:
                    terms |= discriminator_step(disc, d_opt, lecam, tc, micro_batches, fakes, "auto", i, tc.lr)
                return terms
            start = time.perf_counter()
            first = {k: v.item() for k, v in step(0).items()}
            for i in range(1, 3):
                step(i)  # warm-up
            sync(device)
            runs[name] = (step, first, time.perf_counter() - start, [])
        for _ in range(args.repeats):
            for step, _, _, times in runs.values():
                sync(device)
                start = time.perf_counter()
                for i in range(args.timed_steps):
                    step(i)
                sync(device)
                times.append((time.perf_counter() - start) / args.timed_steps)
        eager, compiled = runs["eager"], runs["compiled"]
        ratios = sorted(e / c for e, c in zip(eager[3], compiled[3]))
        median = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
        loss = max(abs(compiled[1][k] - v) / max(abs(v), 1e-30) for k, v in eager[1].items())
        print(f"{f'with disc + R1 (k = {args.r1_every}) + LeCAM' if gan else 'ℓ2 only'}: eager "
              f"{1e3 * median(eager[3]):.1f} ms / step, compiled {1e3 * median(compiled[3]):.1f} ms / step "
              f"(compile + 3 steps {compiled[2]:.0f} s); eager / compiled per round "
              f"{', '.join(f'{r:.2f}' for r in ratios)}: median {median(ratios):.2f}x, range {ratios[0]:.2f}-"
              f"{ratios[-1]:.2f}; the first step's losses within {loss:.1e} (relative)", flush=True)


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
    if args.compare_gan_changes:
        return compare_gan_changes(args, device)
    if args.compare_compile:
        return compare_compile(args, device)
    print("| step | ms / step | vs ℓ2 only |\n|---|---|---|")
    base = None
    for name, kwargs in rows:
        seconds = seconds_per_step(args, device, **kwargs)
        base = base or seconds
        print(f"| {name} | {1e3 * seconds:.1f} | {seconds / base:.2f}x |", flush=True)


if __name__ == "__main__":
    run_main(main)
