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
that holds another run is refused unless --resume, or --overwrite (which deletes that run first), and so is one a
live run holds (OUT/.lock). Values that cannot be meant (--batch-size 0, ...) are refused before anything is written.
"""
import argparse
import dataclasses
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from conditions import Conditioned, collate
from config import (AT_LEAST_0, AT_LEAST_1, POSITIVE, ConfigError, DiTTrainConfig, MODEL_PRESETS, TexTokConfig,
                    TokenizerTrainConfig, add_flags, check_config, check_flags, get_preset, given_flags, to_dict)
from data import check_labels, make_datasets, scan_once, step_loader
from diffusion import Diffusion
from discriminator import LeCAM, StyleGANDiscriminator
from dit import DIT_SIZES, build_dit
from embedded_sets import CAPTION_STYLES, OBJECT_SETS, SHAPES
from evaluator.measures import psnr
from latents import Latents, encode_latents, latent_stats
from perceptual import load_lpips
from runtime.distributed import autocast, setup_distributed
from runtime.errors import InputError, run_main
from runtime.files import check_folder, file_sha1
from runtime.images import save_image_grid, to_uint8
from runtime.run import Run
from steps import (accumulate, discriminator_step, ema_update, generator_step, lr_lambda, schedule, split_batch,
                   step_seed)
from textok import TexTok


# ----------------------------------------------------------------------------------------------------------- setup
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", choices=["tokenizer", "dit"], required=True)
    p.add_argument("--preset", default="tiny", help="tiny (embedded CPU default), imagenet256, imagenet512")
    p.add_argument("--data", default=None, help="JSONL folder (README); default: the embedded shapes set")
    p.add_argument("--val", default=None, help="validation JSONL folder; default: a seeded 10%% of --data (the "
                   "imagenet presets train on all of --data and need --val)")
    p.add_argument("--num-images", type=int, default=4096, help="size of the embedded training set")
    p.add_argument("--captions", choices=CAPTION_STYLES, default="full",
                   help="embedded set's captions (Tab. 4a): full descriptive, short, or the class-name template")
    p.add_argument("--set", choices=["shapes", *OBJECT_SETS], default="shapes",
                   help="embedded set: shapes (1-3 shapes), or one large object per image: glyphs (the "
                        "toy-mechanism preset's), one-shape (held out)")
    p.add_argument("--shuffle-captions", action="store_true",
                   help="control: captions permuted across images (seeded; train and validation alike)")
    p.add_argument("--out", default=None, help="output folder (default runs/<stage>)")
    p.add_argument("--cache-dir", default="cache", help="text-embedding and latent caches")
    p.add_argument("--download", action="store_true",
                   help="fetch a hub model or text encoder missing from the local Hugging Face cache (else one line)")
    p.add_argument("--text-cache", choices=["on", "off"], default="on",
                   help="on: caption embeddings encoded once into --cache-dir (its size is printed first); off: the "
                        "frozen text encoder runs on each batch (no disk, more compute per step)")
    p.add_argument("--dist-timeout", type=float, default=7200,
                   help="seconds a rank waits for the others (torchrun): first-time caches are built between barriers")
    again = p.add_mutually_exclusive_group()  # an --out holding another run is refused without one of these
    again.add_argument("--resume", action="store_true", help="continue from OUT/latest")
    again.add_argument("--overwrite", action="store_true",
                       help="delete the run in OUT (checkpoints, log, grids, exported model) before training")
    p.add_argument("--max-steps", type=int, default=None,
                   help="stop after this many steps, at least 1 (schedule unchanged; without it: the whole schedule)")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per step (batch is per step, total)")
    p.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto",
                   help="auto: bf16 autocast on CUDA, fp32 on CPU (bf16 matmuls are slower on CPU: README, Measured)")
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
        overrides["text_dim"] = width(encoder_config(args.text_encoder, args.download))
    train = preset.train if args.stage == "tokenizer" else preset.dit
    try:
        train = dataclasses.replace(train, **given_flags(args, type(train)))
        model = dataclasses.replace(preset.model, **overrides)
    except ConfigError as e:  # a config's own check (__post_init__), in the flags' names
        raise InputError(e.as_flags()) from None
    blocks = len(getattr(train, "disc_multipliers", ()))  # each discriminator block halves the image
    if args.stage == "tokenizer" and model.image_size % 2 ** blocks:
        raise InputError(f"--disc-multipliers: {blocks} multipliers halve the image {blocks} times, and 2**{blocks} "
                         f"does not divide --image-size {model.image_size}")
    if args.stage == "dit" and train.model not in DIT_SIZES:
        raise InputError(f"--model: expected one of {sorted(DIT_SIZES)}, got {train.model!r}")
    return model, train, preset.note


def check_args(args) -> None:
    """Refuses flags outside the configs that cannot be meant, an --out or --cache-dir that is a file, and a preset
    that trains on the whole --data folder without --val; before anything is read or written (the configs' own
    fields: `run_configs`)."""
    counts = ("max_steps", "grad_accum", "log_every", "eval_every", "ckpt_every", "num_images")
    check_flags(args, {**dict.fromkeys(counts, AT_LEAST_1), "workers": AT_LEAST_0, "dist_timeout": POSITIVE})
    check_folder(args.out or f"runs/{args.stage}", "--out")
    check_folder(args.cache_dir, "--cache-dir")
    if args.data and args.val is None and not get_preset(args.preset).holdout:  # ImageNet: all of train is trained on
        raise InputError(f"--preset {args.preset} trains on the whole --data folder and validates on --val; give --val "
                         "DIR (a captioned folder held out from training: ImageNet's val set)")


# ----------------------------------------------------------------------------- what both stages' steps share
def make_model_and_ema(build, device):
    """(model, its EMA copy): two `build()`s, the EMA frozen in eval mode with the model's initial weights."""
    model = build().to(device)
    ema = build().to(device).eval().requires_grad_(False)
    ema.load_state_dict(model.state_dict())
    return model, ema


def wrap(model, device, world: int, compile_):
    """DDP across ranks (when there are several), then torch.compile (`compile_` None: on CUDA only)."""
    net = DDP(model, device_ids=[device.index] if device.type == "cuda" else None) if world > 1 else model
    return torch.compile(net) if (device.type == "cuda" if compile_ is None else compile_) else net


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


def datasets_for(args, cfg: TexTokConfig, device, rank: int = 0, world: int = 1, classes=None):
    """(train, val) `Conditioned` data sets with the conditions `cfg` reads (caption embeddings, labels), after
    checking that every image of a --data folder decodes (once per data set: `data.scan_once`). All ranks call it:
    they share the scan, the data set's identity and the embedding store's encoding. `classes` (count, who reads the
    labels): every training image (and in stage 1 every validation image) needs a label below the count, checked
    first."""
    train, val = make_datasets(args.data, args.val, cfg.image_size, args.num_images, captions=args.captions,
                               family=args.set, shuffle_captions=args.shuffle_captions)
    if classes:
        check_labels(train, *classes)
        if args.stage == "tokenizer":
            check_labels(val, *classes)
    if args.data:  # once per data set (a record in --cache-dir), rank 0 stating the images for all
        scan_once(train, args.cache_dir, rank, world)
        scan_once(val, args.cache_dir, rank, world)
    return tuple(Conditioned.for_model(ds, cfg, args.cache_dir, device, args.text_cache, args.precision, rank, world,
                                       args.download)
                 for ds in (train, val))


def make_run(args, run_config: dict, stop: int, rank: int, world: int, device) -> Run:
    """This stage's run folder (--out, default runs/<stage>), refusing one held by another run."""
    return Run(args.out or f"runs/{args.stage}", args.stage, "tokenizer" if args.stage == "tokenizer" else "dit",
               run_config, lambda saved, path: check_config(saved, run_config, path), stop, resume=args.resume,
               overwrite=args.overwrite, log_every=args.log_every, ckpt_every=args.ckpt_every, rank=rank, world=world,
               device=device)


# --------------------------------------------------------------------------------------------------- stage 1
def train_tokenizer(args, rank, world, device):
    cfg, tc, note = run_configs(args)
    classes = (cfg.num_classes, "--conditioning class") if cfg.conditioning == "class" else None
    train_set, val_set = datasets_for(args, cfg, device, rank, world, classes)
    run_config = {"stage": "tokenizer", "preset": args.preset, "note": note, "data": args.data or "embedded",
                  "val": args.val,  # metrics.py reads the split: all of --data is trained on when --val is given
                  "captions": args.captions if args.data is None else "captions.jsonl",
                  "set": args.set, "shuffle_captions": args.shuffle_captions,
                  "num_images": len(train_set), "model": to_dict(cfg), "train": to_dict(tc),
                  "perceptual_loss": "on (LPIPS-VGG)" if tc.perceptual_weight > 0 else "OFF (perceptual_weight 0)"}
    total, stop, micro = schedule(len(train_set), tc.batch_size, tc.epochs, args.max_steps, args.grad_accum, world)
    with make_run(args, run_config, stop, rank, world, device) as run:
        torch.manual_seed(tc.seed)  # after data set-up, so the initial weights never depend on a cache hit
        model, ema = make_model_and_ema(lambda: TexTok(cfg), device)
        disc = StyleGANDiscriminator(cfg.image_size, tc.disc_channels, tc.disc_multipliers).to(device)
        lecam = LeCAM(tc.lecam_decay).to(device)
        opt = torch.optim.Adam(model.parameters(), lr=tc.lr, betas=(tc.beta1, tc.beta2), fused=True)  # one kernel
        d_opt = torch.optim.Adam(disc.parameters(), lr=tc.lr, betas=(tc.beta1, tc.beta2), fused=True)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(tc.warmup_steps, total))
        objects = {"model": model, "ema": ema, "disc": disc, "lecam": lecam, "opt": opt, "d_opt": d_opt,
                   "sched": sched}
        lpips_fn = load_lpips("vgg", device, hint=", or switch the perceptual loss off with --perceptual-weight 0 "
                              "(recorded in the run config)") if tc.perceptual_weight > 0 else None  # App. C: LPIPS-VGG
        net = wrap(model, device, world, args.compile)
        if rank == 0:
            print(f"TexTok {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params, discriminator "
                  f"{sum(p.numel() for p in disc.parameters()) / 1e6:.2f}M; {note}; perceptual loss "
                  f"{run_config['perceptual_loss']}; {total} steps on {device} x {world}")
        val_batch = to_device(val_set.complete(collate([val_set[i] for i in range(min(len(val_set), 64))])), device)
        start = run.begin(objects)  # --resume: the objects restored from OUT/latest
        loader = step_loader(train_set, micro * args.grad_accum, rank, world, tc.seed, start, stop, args.workers)
        for step, batch in enumerate(run.batches(loader), start):
            torch.manual_seed(step_seed(tc.seed, step, rank, world))
            micro_batches = split_batch(to_device(batch, device), micro, args.grad_accum, world)  # DDP: last syncs
            gan_on = step >= tc.disc_start  # App. C: the discriminator joins at 80k steps; before, ℓ2 + perceptual
            lr = sched.get_last_lr()[0]  # this step's rate (linear warm-up, then cosine), disc's too
            # 1. Tokenizer + detokenizer: recon_weight x ℓ2 + perceptual_weight x LPIPS + gan_weight x non-saturating
            #    GAN loss through the frozen disc (+ VQ), backward, grad clip, Adam.
            terms, fakes = generator_step(net, model, opt, disc, lpips_fn, tc, micro_batches, args.precision, gan_on)
            sched.step()
            # 2. EMA of the weights (App. C: decay 0.999): the model evaluated below and saved at the end.
            ema_update(ema, model, tc.ema_decay)
            # 3. Discriminator, from disc_start on: non-saturating loss + R1 (cost 10, on every r1_every-th disc step,
            #    counted from disc_start) + LeCAM (weight 1e-4) on the reconstructions of step 1; then LeCAM's EMAs.
            if gan_on:
                terms |= discriminator_step(disc, d_opt, lecam, tc, micro_batches, fakes, args.precision,
                                            step - tc.disc_start, lr, world)
            # 4. Log (the terms stay on the device until a row reads them: a non-finite one stops the run there,
            #    before a checkpoint holds it); every --eval-every steps the EMA model's validation PSNR (uint8) and a
            #    reconstruction grid.
            done = step + 1
            run.log(done, {**terms, "lr": lr}, tc.batch_size)
            if done % args.eval_every == 0 or done == stop:
                with run.writing(run.out / f"recon-{done:07d}.png"):
                    val_psnr = evaluate_tokenizer(ema, val_batch, run.out / f"recon-{done:07d}.png", rank, device,
                                                  args.precision)
                run.write_log({"step": done, "val_psnr_uint8": val_psnr})
                run.bar.write(f"step {done}: validation PSNR {val_psnr:.2f} dB (EMA, uint8)") if rank == 0 else None
            # 5. Checkpoint every --ckpt-every steps and at the last (rank 0).
            run.checkpoint(done, objects)
        run.export_model(ema)  # OUT is still this run's
    if rank == 0:
        print(f"done: EMA tokenizer in {run.out / 'tokenizer'}, log {run.out / 'log.jsonl'}")
    return run.out


# --------------------------------------------------------------------------------------------------- stage 2
def load_frozen_tokenizer(args, device):
    """The frozen (EMA) TexTok of --tokenizer and its folder; a class-conditioned one cannot serve DiT-T2I."""
    path = Path(args.tokenizer or "runs/tokenizer/tokenizer")
    if not path.is_dir():
        raise InputError(f"{path}: no TexTok folder; run `python train.py --stage tokenizer` first or pass "
                         "--tokenizer DIR")
    tokenizer = TexTok.from_pretrained(path, download=args.download).to(device).eval().requires_grad_(False)
    if args.task == "t2i" and tokenizer.cfg.conditioning == "class":  # Table 3 pairs DiT-T2I with TexTok or Baseline
        raise InputError(f"{path}: a class-conditioned TexTok cannot decode text-to-image samples (it needs "
                         "labels); use a text-conditioned TexTok or the Baseline (conditioning none)")
    return tokenizer, path


def stage2_latents(args, tokenizer, weights: str, train_set, device, rank, world):
    """Stage 2's training set: the tokens Z of every training image (cached, keyed by the tokenizer's `weights`
    hash and the data's identity: never stale, never shared by two data sets), read a row at a time and normalised
    per channel (`latents.Latents`), with each image's condition (DiT-T2I: the same caption embeddings the tokenizer
    read); and Z's (mean, std)."""
    cache = Path(args.cache_dir) / "latents" / f"{weights}-{train_set.items.identity()}"
    Z = encode_latents(tokenizer, train_set, device, args.precision, cache, rank=rank, world=world,
                       workers=args.workers)  # a row reader: no rank holds Z in memory
    mean, std = latent_stats(Z, rank, world)  # per-channel latent normalisation, one streaming pass
    std = std.clamp_min(1e-6)
    cfg = tokenizer.cfg
    text = cfg.text_encoder if args.task == "t2i" else None
    latents = Conditioned(Latents(Z, mean, std), train_set.captions, train_set.labels, text, cfg.text_len,
                          args.cache_dir, device, args.text_cache, args.precision, rank, world, args.download)
    return latents, mean, std


def train_dit(args, rank, world, device):
    tokenizer, tok_path = load_frozen_tokenizer(args, device)
    cfg = tokenizer.cfg
    _, dc, note = run_configs(args)
    num_classes = cfg.num_classes if args.num_classes is None else args.num_classes  # never max(label) + 1
    if cfg.conditioning == "class" and num_classes > cfg.num_classes:
        raise InputError(f"--num-classes {num_classes}: the class-conditioned TexTok {tok_path} embeds only "
                         f"{cfg.num_classes} classes")
    classes = (num_classes, "a class-conditional DiT") if args.task == "class" else None
    train_set, _ = datasets_for(args, cfg, device, rank, world, classes)
    split = {"data": args.data, "val": args.val, "num_images": args.num_images, "captions": args.captions,
             "set": args.set, "shuffle_captions": args.shuffle_captions}
    weights = file_sha1(tok_path / "model.safetensors")  # sample.py checks it: the tokens are this tokenizer's
    run_config = {"stage": "dit", "preset": args.preset, "note": note, "task": args.task, "split": split,
                  "tokenizer": str(tok_path.resolve()), "tokenizer_sha1": weights, "num_classes": num_classes,
                  "tokenizer_config": to_dict(cfg), "train": to_dict(dc)}
    total, stop, micro = schedule(len(train_set), dc.batch_size, dc.epochs, args.max_steps, args.grad_accum, world)
    with make_run(args, run_config, stop, rank, world, device) as run:
        latents, mean, std = stage2_latents(args, tokenizer, weights, train_set, device, rank, world)
        torch.manual_seed(dc.seed)
        model, ema = make_model_and_ema(lambda: build_dit(dc.model, dc.class_dropout, cfg, args.task, num_classes,
                                                          mean, std), device)
        diffusion = Diffusion(dc.diffusion_steps, dc.beta_start, dc.beta_end)
        opt = torch.optim.AdamW(model.parameters(), lr=dc.lr, betas=(dc.beta1, dc.beta2),
                                weight_decay=dc.weight_decay, fused=True)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(dc.warmup_steps, total))
        objects = {"model": model, "ema": ema, "opt": opt, "sched": sched}
        net = wrap(model, device, world, args.compile)
        if rank == 0:
            print(f"{dc.model} ({args.task}) {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params over "
                  f"{cfg.num_tokens}x{cfg.token_dim} tokens; {total} steps on {device} x {world}")

        def v_loss(mb):
            with autocast(device, args.precision):
                loss = diffusion.training_loss(net, mb["Z"], {"cond": mb["cond"]}).float()
            return loss, {"loss": loss}, None
        start = run.begin(objects)  # --resume: the objects restored from OUT/latest
        loader = step_loader(latents, micro * args.grad_accum, rank, world, dc.seed, start, stop, args.workers)
        for step, batch in enumerate(run.batches(loader), start):
            torch.manual_seed(step_seed(dc.seed, step, rank, world))
            micro_batches = split_batch(to_device(batch, device), micro, args.grad_accum, world)  # DDP: last syncs
            # 1. v-prediction MSE (App. C) at random timesteps, backward over the micro-batches, grad clip, AdamW.
            terms, _ = accumulate(micro_batches, v_loss, net)
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), dc.grad_clip)  # no host sync (Run.log)
            opt.step()
            opt.zero_grad(set_to_none=True)
            sched.step()
            # 2. EMA of the weights (App. C: decay 0.9999), the model sample.py uses.
            ema_update(ema, model, dc.ema_decay)
            # 3. Log, and checkpoint every --ckpt-every steps and at the last (rank 0).
            run.log(step + 1, {**terms, "grad_norm": grad_norm, "lr": sched.get_last_lr()[0]}, dc.batch_size,
                    "latents_per_s")
            run.checkpoint(step + 1, objects)
        run.export_model(ema, {k: v for k, v in run_config.items() if k != "stage"})  # OUT is still this run's
    if rank == 0:
        print(f"done: EMA DiT in {run.out / 'dit'}; sample with `python sample.py --dit {run.out / 'dit'}`")
    return run.out


def to_device(batch: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def main(argv=None):
    args = parse_args(argv)
    check_args(args)
    rank, world, device = setup_distributed(args.dist_timeout)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True  # fixed image sizes: the discriminator's and LPIPS' fastest convs
    try:
        return (train_tokenizer if args.stage == "tokenizer" else train_dit)(args, rank, world, device)
    except KeyboardInterrupt:  # Ctrl-C before the run folder was opened (after: `Run` says where it stopped)
        if rank == 0:
            print("interrupted before training started (nothing written)", file=sys.stderr)
        raise SystemExit(130) from None
    finally:
        if world > 1:
            dist.destroy_process_group()


if __name__ == "__main__":
    run_main(main)
