"""Train TexTok (stage 1) or a DiT over its tokens (stage 2), §3.2 and Appendix C.

    python train.py --stage tokenizer                      # embedded default: CPU, minutes
    python train.py --stage dit --tokenizer runs/tokenizer/tokenizer
    torchrun --nproc_per_node 8 train.py --stage tokenizer --preset imagenet256 --data /data/imagenet-captions

Every field of the configs (config.py, Appendix C line by line) is a flag: `--lr`, `--batch-size`, `--patch-size`,
`--width`, ... TexTokConfig's flags belong to stage 1 (stage 2 reads the architecture from --tokenizer); in stage 2
`--num-classes` states the class count of a class-conditional DiT (default: the tokenizer's), never max(label) + 1.
Outputs in --out: `log.jsonl`, `config.json`, checkpoints `step-XXXXXXX/` (safetensors; `latest` names the newest),
PNG grids, and the EMA model in `save_pretrained` form (`tokenizer/` or `dit/`). `--resume` continues exactly:
the data order and every random draw are functions of (seed, step, rank), so N + N steps equal 2N steps. An --out
that holds another run is refused unless --resume, or --overwrite (which deletes that run first).
"""
import argparse
import dataclasses
import hashlib
import math
import sys
from contextlib import nullcontext
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from common import (InputError, Run, all_reduce_grads, autocast, build_once, global_mean, rank_share, run_main,
                    save_image_grid, setup_distributed, to_uint8)
from config import (DiTTrainConfig, MODEL_PRESETS, TexTokConfig, TokenizerTrainConfig, add_flags, check_config,
                    get_preset, given_flags, to_dict)
from data import (CAPTION_STYLES, OBJECT_SETS, SHAPES, Conditions, LatentSet, check_labels, collate, conditioned,
                  make_datasets, step_loader)
from diffusion import Diffusion
from dit import build_dit
from discriminator import LeCAM, StyleGANDiscriminator, discriminator_loss, generator_loss, r1_penalty
from metrics import load_lpips, psnr
from textok import TexTok


# ----------------------------------------------------------------------------------------------------------- setup
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", choices=["tokenizer", "dit"], required=True)
    p.add_argument("--preset", default="tiny", help="tiny (embedded CPU default), imagenet256, imagenet512")
    p.add_argument("--data", default=None, help="JSONL folder (README); default: the embedded shapes set")
    p.add_argument("--val", default=None, help="validation JSONL folder; default: a seeded 10%% of --data")
    p.add_argument("--num-images", type=int, default=4096, help="size of the embedded training set")
    p.add_argument("--captions", choices=CAPTION_STYLES, default="full",
                   help="embedded set's captions (Tab. 4a): full descriptive, short, or the class-name template")
    p.add_argument("--set", choices=["shapes", *OBJECT_SETS], default="shapes",
                   help="embedded set: shapes (1-3 shapes), or one large object per image: glyphs (the "
                        "toy-mechanism preset's), shape (held out)")
    p.add_argument("--shuffle-captions", action="store_true",
                   help="control: captions permuted across images (seeded; train and validation alike)")
    p.add_argument("--out", default=None, help="output folder (default runs/<stage>)")
    p.add_argument("--cache-dir", default="cache", help="text-embedding and latent caches")
    p.add_argument("--text-cache", choices=["on", "off"], default="on",
                   help="on: caption embeddings encoded once into --cache-dir (its size is printed first); off: the "
                        "frozen text encoder runs on each batch (no disk, more compute per step)")
    p.add_argument("--dist-timeout", type=float, default=7200,
                   help="seconds a rank waits for the others (torchrun): first-time caches are built between barriers")
    again = p.add_mutually_exclusive_group()  # an --out holding another run is refused without one of these
    again.add_argument("--resume", action="store_true", help="continue from OUT/latest")
    again.add_argument("--overwrite", action="store_true",
                       help="delete the run in OUT (checkpoints, log, grids, exported model) before training")
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many steps (schedule unchanged)")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per step (batch is per step, total)")
    p.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto",
                   help="auto: bf16 autocast on CUDA, fp32 on CPU (bf16 matmuls are slower on CPU here)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the model (default: on CUDA only)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--eval-every", type=int, default=200, help="validation PSNR + PNG grid every K steps")
    p.add_argument("--ckpt-every", type=int, default=500)
    p.add_argument("--model-size", choices=sorted(MODEL_PRESETS), default=None, help="stage 1: Tab. 4e")
    p.add_argument("--no-text", dest="conditioning", action="store_const", const="none",
                   help="Baseline (w/o text): an alias of --conditioning none")
    p.add_argument("--tokenizer", default=None, help="stage 2: a TexTok save_pretrained folder")
    p.add_argument("--task", choices=["class", "t2i"], default="class", help="stage 2: class-conditional or T2I")
    names = lambda cls: {f.name for f in dataclasses.fields(cls)}
    add_flags(p, TexTokConfig)
    add_flags(p, TokenizerTrainConfig)
    add_flags(p, DiTTrainConfig, skip=names(TokenizerTrainConfig))  # shared names (--lr, ...) serve both stages
    args = p.parse_args(argv)
    given = {n for n in names(TexTokConfig) | names(TokenizerTrainConfig) | names(DiTTrainConfig)
             if getattr(args, n) is not None}
    if args.stage == "tokenizer":
        wrong = given & (names(DiTTrainConfig) - names(TokenizerTrainConfig))
    else:
        wrong = given & (names(TexTokConfig) | names(TokenizerTrainConfig)) - names(DiTTrainConfig) - {"num_classes"}
        wrong |= {"model_size"} if args.model_size else set()
    if wrong:
        p.error(f"--stage {args.stage} does not take " + ", ".join("--" + w.replace("_", "-") for w in sorted(wrong))
                + (" (stage 2 reads the TexTok architecture from --tokenizer)" if args.stage == "dit" else ""))
    return args


def run_configs(args):
    """(TexTokConfig, this stage's training config, preset note) from the preset and the command-line flags."""
    preset = get_preset(args.preset)
    overrides = {**(MODEL_PRESETS[args.model_size] if args.model_size else {}), **given_flags(args, TexTokConfig)}
    if args.stage == "tokenizer" and args.data is None and args.num_classes is None:  # an embedded set's own count
        overrides["num_classes"] = len(OBJECT_SETS.get(args.set, SHAPES))
    if args.text_encoder is not None and args.text_dim is None:  # the encoder's config.json, not its weights
        from text_encoder import encoder_config, width
        overrides["text_dim"] = width(encoder_config(args.text_encoder))
    train = preset.train if args.stage == "tokenizer" else preset.dit
    try:
        train = dataclasses.replace(train, **given_flags(args, type(train)))
        return dataclasses.replace(preset.model, **overrides), train, preset.note
    except ValueError as e:  # a config's own check (__post_init__)
        raise InputError(str(e)) from None


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


# ------------------------------------------------------------------------------------ stage-1 step (App. C losses)
# One tokenizer step = generator_step (ℓ2 + perceptual + GAN (+ VQ) loss, backward, Adam) then, from disc_start on,
# discriminator_step (non-saturating loss + R1 + LeCAM, backward, Adam). train.py and the benches call these two.
def generator_step(net, model, opt, disc, lpips_fn, tc: TokenizerTrainConfig, micro_batches: list, precision: str,
                   gan_on: bool, check=None):
    """Updates the tokenizer and detokenizer once on App. C's generator loss, accumulated over `micro_batches`
    [(batch, sync)]; returns (loss terms, the detached reconstructions for the discriminator step)."""
    device, K = micro_batches[0][0]["image"].device, len(micro_batches)
    terms, fakes = {}, []
    if disc is not None:
        disc.requires_grad_(False)  # the GAN loss reaches the tokenizer through a frozen disc
    for mb, sync in micro_batches:
        with nullcontext() if sync else net.no_sync(), autocast(device, precision):
            recon, _, vq_loss = net(mb["image"], mb["cond"])
            recon = recon.float()
            parts = {"l2": F.mse_loss(recon, mb["image"]), "vq": vq_loss.float()}   # ℓ2 reconstruction (+ VQ, App. A)
            if lpips_fn is not None:
                parts["perceptual"] = lpips_fn(recon, mb["image"]).mean()          # perceptual loss (LPIPS-VGG)
            if gan_on:
                parts["gan"] = generator_loss(disc(recon))                         # non-saturating GAN loss
            loss = (tc.recon_weight * parts["l2"] + parts["vq"] + tc.perceptual_weight * parts.get("perceptual", 0)
                    + tc.gan_weight * parts.get("gan", 0))
            (loss / K).backward()
        fakes.append(recon.detach())
        for k, v in parts.items():
            terms[k] = terms.get(k, 0.0) + v.item() / K
    if check is not None:
        check(terms)  # a non-finite loss stops here, before it reaches the weights
    terms["grad_norm"] = torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip).item()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return terms, fakes


def discriminator_step(disc, d_opt, lecam, tc: TokenizerTrainConfig, micro_batches: list, fakes: list,
                       precision: str, d_step: int, lr: float, world: int = 1, check=None) -> dict:
    """Updates the discriminator once on App. C's discriminator loss: non-saturating loss + r1_cost x R1 (every
    r1_every-th disc step `d_step`) + lecam_weight x LeCAM, over `micro_batches` and the generator's `fakes`; then
    moves LeCAM's EMAs. Returns the loss terms."""
    device, K = fakes[0].device, len(micro_batches)
    terms, mean_real, mean_fake = {}, 0.0, 0.0
    disc.requires_grad_(True)
    for (mb, _), fake in zip(micro_batches, fakes):
        with autocast(device, precision):
            logits_real, r1 = r1_penalty(disc, mb["image"], every=tc.r1_every, step=d_step)  # R1 on real images
            logits_fake = disc(fake)
        # LeCAM against the EMAs *before* this step's update, as MAGVIT / MaskGIT-style trainers (TiTok's
        # losses.py) do: the EMAs can then move once per step by the mean over all micro-batches and ranks. (The
        # LeCAM authors' code, google/lecam-gan, updates first: a difference of (1 - lecam_decay) of one step's mean.)
        parts = {"d_loss": discriminator_loss(logits_real, logits_fake), "r1": r1,
                 "lecam": lecam.penalty(logits_real, logits_fake)}
        d_loss = parts["d_loss"] + tc.r1_cost * r1 + tc.lecam_weight * parts["lecam"]
        (d_loss / K).backward()
        mean_real = mean_real + logits_real.detach().float().mean() / K
        mean_fake = mean_fake + logits_fake.detach().float().mean() / K
        for k, v in parts.items():
            terms[k] = terms.get(k, 0.0) + v.item() / K
    if check is not None:
        check(terms)
    lecam.update(global_mean(mean_real, world), global_mean(mean_fake, world))  # LeCAM's EMAs: once per step
    all_reduce_grads(disc, world)  # disc is not DDP-wrapped (R1's double backward)
    for group in d_opt.param_groups:  # disc follows the tokenizer's warm-up + cosine schedule
        group["lr"] = lr
    d_opt.step()
    d_opt.zero_grad(set_to_none=True)
    return terms


def datasets_for(args, cfg: TexTokConfig, device, rank: int = 0, world: int = 1, classes=None):
    """(train, val) data sets with the conditions `cfg` reads (caption embeddings, labels), after checking that every
    image of a --data folder decodes. All ranks call it: they share the scan and the embedding store's encoding.
    `classes` (count, who reads the labels): every image needs a label below the count, checked first (stage 1
    validates with labels too)."""
    train, val = make_datasets(args.data, args.val, cfg.image_size, args.num_images, captions=args.captions,
                               set=args.set, shuffle_captions=args.shuffle_captions)
    for ds in ((train, val) if args.stage == "tokenizer" else (train,)) if classes else ():
        check_labels(ds, *classes)
    for ds in (train, val) if args.data else ():
        ds.scan(rank=rank, world=world)
    return tuple(conditioned(ds, cfg, args.cache_dir, device, args.text_cache, args.precision, rank, world)
                 for ds in (train, val))


def loader_for(args, dataset, rank, world, seed):
    """A factory of this rank's loader over steps start..stop (`data.StepBatches`), for `Run.steps`."""
    return lambda start, stop, batch: step_loader(dataset, batch, rank, world, seed, start, stop, args.workers)


# --------------------------------------------------------------------------------------------------- stage 1
def train_tokenizer(args, rank, world, device):
    cfg, tc, note = run_configs(args)
    classes = (cfg.num_classes, "--conditioning class") if cfg.conditioning == "class" else None
    train_set, val_set = datasets_for(args, cfg, device, rank, world, classes)
    run_config = {"stage": "tokenizer", "preset": args.preset, "note": note, "data": args.data or "embedded",
                  "captions": args.captions if args.data is None else "captions.jsonl",
                  "set": args.set, "shuffle_captions": args.shuffle_captions,
                  "num_images": len(train_set), "model": to_dict(cfg), "train": to_dict(tc),
                  "perceptual_loss": "on (LPIPS-VGG)" if tc.perceptual_weight > 0 else "OFF (perceptual_weight 0)"}
    run = Run(args, rank, world, device, run_config, len(train_set), tc.batch_size, tc.epochs,
              lambda saved, path: check_config(saved, run_config, path))

    torch.manual_seed(tc.seed)  # after data set-up, so the initial weights never depend on a cache hit
    model = TexTok(cfg).to(device)
    ema = TexTok(cfg).to(device).eval().requires_grad_(False)
    ema.load_state_dict(model.state_dict())
    disc = StyleGANDiscriminator(cfg.image_size, tc.disc_channels, tc.disc_multipliers).to(device)
    lecam = LeCAM(tc.lecam_decay).to(device)
    # Fused Adam on CUDA and CPU alike: one kernel per step, not a Python loop over tensors (4x faster on CPU here).
    opt = torch.optim.Adam(model.parameters(), lr=tc.lr, betas=(tc.beta1, tc.beta2), fused=True)
    d_opt = torch.optim.Adam(disc.parameters(), lr=tc.lr, betas=(tc.beta1, tc.beta2), fused=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(tc.warmup_steps, run.total))
    objects = {"model": model, "ema": ema, "disc": disc, "lecam": lecam, "opt": opt, "d_opt": d_opt, "sched": sched}
    lpips_fn = load_lpips("vgg", device, hint=", or switch the perceptual loss off with --perceptual-weight 0 "
                          "(recorded in the run config)") if tc.perceptual_weight > 0 else None  # App. C: LPIPS-VGG
    net = run.wrap(model)
    if rank == 0:
        print(f"TexTok {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params, discriminator "
              f"{sum(p.numel() for p in disc.parameters()) / 1e6:.2f}M; {note}; perceptual loss "
              f"{run_config['perceptual_loss']}; {run.total} steps on {device} x {world}")
    val_batch = collate([val_set[i] for i in range(min(len(val_set), 64))])
    val_batch["cond"] = val_set.conds.with_text(val_batch["cond"], val_batch["index"])  # --text-cache off
    val_batch = {k: v.to(device) for k, v in val_batch.items()}
    for step, batch in run.steps(loader_for(args, train_set, rank, world, tc.seed), objects, tc.seed):
        # The discriminator joins at disc_start (App. C: 80k steps); before it the loss is ℓ2 + perceptual (+ VQ).
        gan_on = step >= tc.disc_start
        lr = sched.get_last_lr()[0]  # this step's rate (linear warm-up, then cosine), disc's too
        micro_batches = list(run.micro_batches(batch))  # --grad-accum micro-batches; DDP syncs on the last
        check = partial(run.check_finite, step)  # a non-finite loss stops before it reaches the weights
        # 1. Tokenizer + detokenizer: recon_weight x ℓ2 + perceptual_weight x LPIPS + gan_weight x non-saturating
        #    GAN loss through the frozen disc (+ VQ), backward, grad clip, Adam.
        terms, fakes = generator_step(net, model, opt, disc, lpips_fn, tc, micro_batches, args.precision, gan_on,
                                      check)
        sched.step()
        # 2. EMA of the weights (App. C: decay 0.999): the model evaluated below and saved at the end.
        ema_update(ema, model, tc.ema_decay)
        # 3. Discriminator, from disc_start on: non-saturating loss + R1 (cost 10, on every r1_every-th disc step,
        #    counted from disc_start) + LeCAM (weight 1e-4) on the reconstructions of step 1; then LeCAM's EMAs.
        if gan_on:
            terms |= discriminator_step(disc, d_opt, lecam, tc, micro_batches, fakes, args.precision,
                                        step - tc.disc_start, lr, world, check)
        # 4. Log, and every --eval-every steps the EMA model's validation PSNR (uint8) and a reconstruction grid.
        done = step + 1
        run.log(done, {**terms, "lr": lr}, tc.batch_size)
        if done % args.eval_every == 0 or done == run.stop:
            val_psnr = evaluate_tokenizer(ema, val_batch, run.out / f"recon-{done:07d}.png", rank, device,
                                          args.precision)
            run.write_log({"step": done, "val_psnr_uint8": val_psnr})
            run.bar.write(f"step {done}: validation PSNR {val_psnr:.2f} dB (EMA, uint8)") if rank == 0 else None
    if rank == 0:
        ema.save_pretrained(run.out / "tokenizer")
        print(f"done: EMA tokenizer in {run.out / 'tokenizer'}, log {run.out / 'log.jsonl'}")
    return run.out


@torch.no_grad()
def evaluate_tokenizer(model, batch, grid_path, rank, device, precision) -> float:
    """Validation PSNR (dB) of `model` on `batch` by metrics.psnr, on uint8-quantised images as metrics.py; rank 0
    writes originals beside reconstructions as a PNG grid (Fig. 1 layout: pairs of columns)."""
    with autocast(device, precision):
        recon = model(batch["image"], batch["cond"])[0].float().clamp(-1, 1)
    value = psnr(to_uint8(batch["image"]), to_uint8(recon))
    if rank == 0:
        k = min(16, len(recon))
        save_image_grid(torch.stack([batch["image"][:k], recon[:k]], 1).flatten(0, 1), grid_path, ncol=8)
    return round(value, 4)


# --------------------------------------------------------------------------------------------------- stage 2
@torch.no_grad()
def encode_latents(tokenizer: TexTok, dataset, device, precision, cache: Path, batch_size: int = 64, rank: int = 0,
                   world: int = 1, workers: int = 0) -> torch.Tensor:
    """Encodes the whole data set (a `WithCond`) once with the frozen (EMA) tokenizer: Z [M, N, d] float32, cached in
    the folder `cache` (Z.npy). Every rank (all must call it) encodes a contiguous share of the batches through a
    DataLoader with `workers` and writes it into the one file; the batches are one rank's, so Z does not depend on
    the number of ranks."""
    M, cfg = len(dataset), tokenizer.cfg

    def fill(files):
        mine = rank_share(-(-M // batch_size), rank, world)
        share = range(mine.start * batch_size, min(mine.stop * batch_size, M))
        loader = DataLoader(Subset(dataset, share), batch_size, num_workers=workers, collate_fn=collate,
                            pin_memory=device.type == "cuda")
        at = share.start
        for batch in tqdm(loader, desc=f"encoding latents ({world} rank(s))", disable=rank != 0):
            cond = dataset.conds.with_text(batch["cond"], batch["index"]).to(device)  # --text-cache off: encoded here
            with autocast(device, precision):
                Z = tokenizer.encode(batch["image"].to(device), cond).float().cpu()
            files["Z"].write(at, Z.numpy())
            at += len(Z)
    folder = build_once(cache, {"Z": ((M, cfg.num_tokens, cfg.token_dim), np.float32)}, fill, rank, world,
                        f"latents Z ({M:,} x {cfg.num_tokens} x {cfg.token_dim}, float32)")
    return torch.from_numpy(np.load(folder / "Z.npy"))


def train_dit(args, rank, world, device):
    tok_path = Path(args.tokenizer or "runs/tokenizer/tokenizer")
    if not tok_path.is_dir():
        raise InputError(f"{tok_path}: no TexTok folder; run `python train.py --stage tokenizer` first or pass "
                         "--tokenizer DIR")
    tokenizer = TexTok.from_pretrained(tok_path).to(device).eval().requires_grad_(False)
    cfg = tokenizer.cfg
    _, dc, note = run_configs(args)
    if args.task == "t2i" and cfg.conditioning == "class":  # Table 3 pairs DiT-T2I with TexTok or the Baseline
        raise InputError(f"{tok_path}: a class-conditioned TexTok cannot decode text-to-image samples (it needs "
                         "labels); use a text-conditioned TexTok or the Baseline (conditioning none)")
    num_classes = cfg.num_classes if args.num_classes is None else args.num_classes  # never max(label) + 1
    if cfg.conditioning == "class" and num_classes > cfg.num_classes:
        raise InputError(f"--num-classes {num_classes}: the class-conditioned TexTok {tok_path} embeds only "
                         f"{cfg.num_classes} classes")
    classes = (num_classes, "a class-conditional DiT") if args.task == "class" else None
    train_set, _ = datasets_for(args, cfg, device, rank, world, classes)
    labels = train_set.labels
    split = {"data": args.data, "val": args.val, "num_images": args.num_images, "captions": args.captions,
             "set": args.set, "shuffle_captions": args.shuffle_captions}
    run_config = {"stage": "dit", "preset": args.preset, "note": note, "task": args.task, "split": split,
                  "tokenizer": str(tok_path.resolve()), "num_classes": num_classes, "tokenizer_config": to_dict(cfg),
                  "train": to_dict(dc)}
    run = Run(args, rank, world, device, run_config, len(train_set), dc.batch_size, dc.epochs,
              lambda saved, path: check_config(saved, run_config, path))

    # Keyed by the tokenizer's weights and the data's identity: never stale, never shared by two data sets.
    with open(tok_path / "model.safetensors", "rb") as f:
        weights = hashlib.file_digest(f, "sha1").hexdigest()[:16]
    cache = Path(args.cache_dir) / "latents" / f"{weights}-{train_set.dataset.identity()}"
    Z = encode_latents(tokenizer, train_set, device, args.precision, cache, rank=rank, world=world,
                       workers=args.workers)
    mean, std = Z.mean(dim=(0, 1)), Z.std(dim=(0, 1)).clamp_min(1e-6)  # per-channel latent normalisation
    Z.sub_(mean).div_(std)  # in place: one copy of Z in memory
    text = cfg.text_encoder if args.task == "t2i" else None  # the same embeddings the tokenizer read
    latents = LatentSet(Z, Conditions(train_set.captions, labels, text, cfg.text_len, args.cache_dir, device,
                                      args.text_cache, args.precision, rank, world))

    torch.manual_seed(dc.seed)
    model = build_dit(dc.model, dc.class_dropout, cfg, args.task, num_classes).to(device)
    model.latent_mean.copy_(mean)
    model.latent_std.copy_(std)
    ema = build_dit(dc.model, dc.class_dropout, cfg, args.task, num_classes).to(device).eval().requires_grad_(False)
    ema.load_state_dict(model.state_dict())
    diffusion = Diffusion(dc.diffusion_steps, dc.beta_start, dc.beta_end)
    opt = torch.optim.AdamW(model.parameters(), lr=dc.lr, betas=(dc.beta1, dc.beta2), weight_decay=dc.weight_decay,
                            fused=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(dc.warmup_steps, run.total))
    objects = {"model": model, "ema": ema, "opt": opt, "sched": sched}
    net = run.wrap(model)
    if rank == 0:
        print(f"{dc.model} ({args.task}) {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params over "
              f"{cfg.num_tokens}x{cfg.token_dim} tokens; {run.total} steps on {device} x {world}")
    for step, batch in run.steps(loader_for(args, latents, rank, world, dc.seed), objects, dc.seed):
        loss_sum = 0.0
        for mb, sync in run.micro_batches(batch):
            with nullcontext() if sync else net.no_sync(), autocast(device, args.precision):
                loss = diffusion.training_loss(net, mb["Z"], {"cond": mb["cond"]}).float()  # v-prediction MSE
                (loss / args.grad_accum).backward()
            loss_sum += loss.item() / args.grad_accum
        run.check_finite(step, {"loss": loss_sum})
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), dc.grad_clip).item()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        ema_update(ema, model, dc.ema_decay)
        run.log(step + 1, {"loss": loss_sum, "grad_norm": grad_norm, "lr": sched.get_last_lr()[0]}, dc.batch_size,
                "latents_per_s")
    if rank == 0:
        ema.save_pretrained(run.out / "dit", {k: v for k, v in run_config.items() if k != "stage"})
        print(f"done: EMA DiT in {run.out / 'dit'}; sample with `python sample.py --dit {run.out / 'dit'}`")
    return run.out


def main(argv=None):
    args = parse_args(argv)
    rank, world, device = setup_distributed(args.dist_timeout)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    try:
        return (train_tokenizer if args.stage == "tokenizer" else train_dit)(args, rank, world, device)
    except KeyboardInterrupt:  # Ctrl-C: one line saying what to resume from, not a traceback
        run = getattr(args, "run", None)
        if rank == 0:
            print(run.interrupted() if run else "interrupted before training started (nothing written)",
                  file=sys.stderr)
        raise SystemExit(130) from None
    finally:
        if world > 1:
            dist.destroy_process_group()


if __name__ == "__main__":
    run_main(main)
