"""One training step of each stage, as Appendix C states it: stage 1's generator and discriminator updates (train.py
and the benches call them), the micro-batch accumulation both stages share, the EMA of the weights, the schedule's
length and the learning-rate schedule, and the per-step seed that makes resume exact."""
import math
from contextlib import nullcontext

import torch
import torch.nn.functional as F

from conditions import Cond
from config import TokenizerTrainConfig
from discriminator import discriminator_loss, generator_loss, real_fake_logits
from runtime.distributed import all_reduce_grads, autocast, global_mean
from runtime.errors import InputError


def schedule(num_items: int, batch_size: int, epochs: int, max_steps, grad_accum: int, world: int):
    """(total, stop, micro): the schedule's length in steps, where --max-steps stops it, and the per-rank micro-batch
    of one accumulation step; a batch that does not split over ranks x accumulation steps is refused."""
    total = max(1, num_items // batch_size) * epochs
    micro = batch_size // (world * grad_accum)
    if micro * world * grad_accum != batch_size:
        raise InputError(f"--batch-size {batch_size} is not divisible by {world} ranks x {grad_accum} accumulation "
                         "steps")
    return total, (min(total, max_steps) if max_steps else total), micro


def lr_lambda(warmup: int, total: int):
    """Linear warm-up then cosine decay to 0 (App. C), as a LambdaLR factor."""
    def f(step):
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))
    return f


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model, over parameters and floating-point buffers."""
    floats = [(a, b) for a, b in zip(ema.state_dict().values(), model.state_dict().values()) if a.is_floating_point()]
    torch._foreach_lerp_([a for a, _ in floats], [b for _, b in floats], 1 - decay)


def split_batch(batch: dict, micro: int, grad_accum: int, world: int) -> list:
    """[(micro-batch, sync)] for the `grad_accum` accumulation steps of `batch`: sync is True where DDP should
    all-reduce (the last micro-batch, or always with one rank)."""
    part = lambda v, s: v.part(s) if isinstance(v, Cond) else v[s]
    return [({k: part(v, slice(i * micro, (i + 1) * micro)) for k, v in batch.items()},
             world == 1 or i == grad_accum - 1) for i in range(grad_accum)]


def accumulate(micro_batches: list, loss_fn, net=None):
    """Backward of loss / K for each of the K `micro_batches` [(batch, sync)], DDP's all-reduce only where sync
    (`net.no_sync()` elsewhere; `net` None: not DDP-wrapped). `loss_fn(micro-batch) -> (loss, {term: tensor},
    output)`. Returns (each term's mean over the micro-batches, a detached float64 tensor left on its device: no host
    sync, Run.log reads the terms once per log row; [outputs])."""
    K, terms, outputs = len(micro_batches), {}, []
    for mb, sync in micro_batches:
        with nullcontext() if sync or net is None else net.no_sync():
            loss, parts, output = loss_fn(mb)
            (loss / K).backward()
        outputs.append(output)
        for k, v in parts.items():
            v = v.detach().double() / K  # float64: the sum of float(term) / K that the log rows always held
            terms[k] = terms[k] + v if k in terms else v
    return terms, outputs


def channels_last(images: torch.Tensor) -> torch.Tensor:
    """`images` [B, 3, H, W] in channels-last memory on CUDA (cuDNN's fast layout for the discriminator's and LPIPS'
    convolutions, which keep it from their input on), unchanged elsewhere. The weights stay NCHW: fused Adam needs
    a parameter and its moments in one layout, and checkpoints store them contiguous."""
    return images.contiguous(memory_format=torch.channels_last) if images.is_cuda else images


def sub_seed(seed: int, index: int) -> int:
    """The seed of draw `index` of a run seeded `seed` (a training step on a rank, a sample's noise): one stream per
    index, so a draw does not depend on what ran before it."""
    return seed * 1_000_003 + index


def step_seed(seed: int, step: int, rank: int, world: int) -> int:
    """The seed of every random draw of `step` on `rank`: resume at any step draws what the uninterrupted run drew."""
    return sub_seed(seed, step * world + rank)


# ------------------------------------------------------------------------------------ stage-1 step (App. C losses)
# One tokenizer step = generator_step (ℓ2 + perceptual + GAN (+ VQ) loss, backward, Adam) then, from disc_start on,
# discriminator_step (non-saturating loss + R1 + LeCAM, backward, Adam). train.py and the benches call these two.
def generator_step(net, model, opt, disc, lpips_fn, tc: TokenizerTrainConfig, micro_batches: list, precision: str,
                   gan_on: bool):
    """Updates the tokenizer and detokenizer once on App. C's generator loss, accumulated over `micro_batches`
    [(batch, sync)]; returns (loss terms, tensors: no host sync; the detached reconstructions for the discriminator
    step)."""
    if disc is not None:
        disc.requires_grad_(False)  # the GAN loss reaches the tokenizer through a frozen disc

    def loss_fn(mb):
        with autocast(mb["image"].device, precision):
            recon, _, vq_loss = net(mb["image"], mb["cond"])
            recon = recon.float()
            parts = {"l2": F.mse_loss(recon, mb["image"]), "vq": vq_loss.float()}   # ℓ2 reconstruction (+ VQ, App. A)
            if lpips_fn is not None:
                parts["perceptual"] = lpips_fn(channels_last(recon), channels_last(mb["image"])).mean()  # LPIPS-VGG
            if gan_on:
                parts["gan"] = generator_loss(disc(channels_last(recon)))          # non-saturating GAN loss
            loss = (tc.recon_weight * parts["l2"] + parts["vq"] + tc.perceptual_weight * parts.get("perceptual", 0)
                    + tc.gan_weight * parts.get("gan", 0))
        return loss, parts, recon.detach()
    terms, fakes = accumulate(micro_batches, loss_fn, net)
    terms["grad_norm"] = torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return terms, fakes


def discriminator_step(disc, d_opt, lecam, tc: TokenizerTrainConfig, micro_batches: list, fakes: list,
                       precision: str, d_step: int, lr: float, world: int = 1) -> dict:
    """Updates the discriminator once on App. C's discriminator loss: non-saturating loss + r1_cost x R1 (every
    r1_every-th disc step `d_step`) + lecam_weight x LeCAM, over `micro_batches` and the generator's `fakes`; then
    moves LeCAM's EMAs. Returns the loss terms (tensors: no host sync)."""
    disc.requires_grad_(True)

    def loss_fn(mb):
        with autocast(mb["image"].device, precision):
            logits_real, logits_fake, r1 = real_fake_logits(disc, channels_last(mb["image"]),  # R1 on real images
                                                            channels_last(mb["fake"]), every=tc.r1_every, step=d_step)
        # LeCAM against the EMAs *before* this step's update, as MAGVIT / MaskGIT-style trainers (TiTok's
        # losses.py) do: the EMAs can then move once per step by the mean over all micro-batches and ranks. (The
        # LeCAM authors' code, google/lecam-gan, updates first: a difference of (1 - lecam_decay) of one step's mean.)
        parts = {"d_loss": discriminator_loss(logits_real, logits_fake), "r1": r1,
                 "lecam": lecam.penalty(logits_real, logits_fake)}
        d_loss = parts["d_loss"] + tc.r1_cost * r1 + tc.lecam_weight * parts["lecam"]
        return d_loss, parts, (logits_real.detach().float().mean(), logits_fake.detach().float().mean())
    paired = [({**mb, "fake": fake}, sync) for (mb, sync), fake in zip(micro_batches, fakes)]
    terms, means = accumulate(paired, loss_fn)  # disc is not DDP-wrapped (R1's double backward)
    K = len(micro_batches)
    mean_real, mean_fake = sum(m[0] / K for m in means), sum(m[1] / K for m in means)
    lecam.update(global_mean(mean_real, world), global_mean(mean_fake, world))  # LeCAM's EMAs: once per step
    all_reduce_grads(disc, world)
    for group in d_opt.param_groups:  # disc follows the tokenizer's warm-up + cosine schedule
        group["lr"] = lr
    d_opt.step()
    d_opt.zero_grad(set_to_none=True)
    return terms
