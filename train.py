"""Train TexTok (stage 1) or a DiT over its tokens (stage 2), §3.2 and Appendix C.

    python train.py --stage tokenizer                      # embedded default: CPU, minutes
    python train.py --stage dit --tokenizer runs/tokenizer/tokenizer
    torchrun --nproc_per_node 8 train.py --stage tokenizer --preset imagenet256 --data /data/imagenet-captions

Every field of the stage's config (config.py, Appendix C line by line) is a flag (`--lr`, `--batch-size`, ...).
Outputs in --out: `log.jsonl`, `config.json`, checkpoints `step-XXXXXXX/` (safetensors; `latest` names the newest),
PNG grids, and the EMA model in `save_pretrained` form (`tokenizer/` or `dit/`). `--resume` continues exactly:
the data order and every random draw are functions of (seed, step, rank), so N + N steps equal 2N steps.
"""
import argparse
import dataclasses
import hashlib
import json
import math
import os
import shutil
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, default_collate
import numpy as np
from tqdm import tqdm

from common import (atomic_write, check_config, load_json, load_state, load_tensors, save_image_grid,
                    save_json, save_tensors)
from config import (DiTTrainConfig, MODEL_PRESETS, TexTokConfig, TokenizerTrainConfig, from_dict, get_preset,
                    to_dict)
from data import WithText, cond_kwargs, make_datasets
from diffusion import Diffusion
from dit import build_dit, save_dit
from discriminator import LeCAM, StyleGANDiscriminator, discriminator_loss, generator_loss, r1_penalty
from textok import TexTok

VGG_FILE = "vgg16-397923af.pth"


# ----------------------------------------------------------------------------------------------------------- setup
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", choices=["tokenizer", "dit"], required=True)
    p.add_argument("--preset", default="tiny", help="tiny (embedded CPU default), imagenet256, imagenet512")
    p.add_argument("--data", default=None, help="JSONL folder (README); default: the embedded shapes set")
    p.add_argument("--val", default=None, help="validation JSONL folder; default: a seeded 10%% of --data")
    p.add_argument("--num-images", type=int, default=4096, help="size of the embedded training set")
    p.add_argument("--out", default=None, help="output folder (default runs/<stage>)")
    p.add_argument("--cache-dir", default="cache", help="text-embedding and latent caches")
    p.add_argument("--resume", action="store_true", help="continue from OUT/latest")
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many steps (schedule unchanged)")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per step (batch is per step, total)")
    p.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto",
                   help="auto: bf16 autocast on CUDA, fp32 on CPU (bf16 matmuls are slower on CPU here)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (CUDA)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--eval-every", type=int, default=200, help="validation PSNR + PNG grid every K steps")
    p.add_argument("--ckpt-every", type=int, default=500)
    # Table 4 switches on the TexTok architecture (stage 1)
    p.add_argument("--model-size", choices=sorted(MODEL_PRESETS), default=None, help="Tab. 4e")
    p.add_argument("--num-tokens", type=int, default=None, help="N image tokens (Table 1)")
    p.add_argument("--no-text", action="store_true", help="Baseline (w/o text): conditioning none")
    p.add_argument("--conditioning", choices=["text", "class", "none"], default=None, help="Tab. 4a")
    p.add_argument("--cond-arch", choices=["in-context", "cross-attention"], default=None, help="Tab. 4c")
    p.add_argument("--cond-location", choices=["tokenizer", "detokenizer", "both"], default=None, help="Tab. 4d")
    p.add_argument("--text-encoder", default=None, help="HF name or local folder (T5 for the paper, Tab. 4b)")
    p.add_argument("--vq", action="store_true", help="App. A: vector-quantized tokens")
    # Stage 2
    p.add_argument("--tokenizer", default=None, help="stage 2: a TexTok save_pretrained folder")
    p.add_argument("--task", choices=["class", "t2i"], default="class", help="stage 2: class-conditional or T2I")
    # Every field of both training configs, default None = the preset's value.
    seen = {a.dest for a in p._actions}
    for cls in (TokenizerTrainConfig, DiTTrainConfig):
        for f in dataclasses.fields(cls):
            if f.name not in seen:
                seen.add(f.name)
                kind = type(f.default)
                p.add_argument("--" + f.name.replace("_", "-"), default=None, metavar=kind.__name__.upper(),
                               type=(lambda s: tuple(float(v) for v in s.split(","))) if kind is tuple else kind,
                               help=f"{cls.__name__}.{f.name}")
    return p.parse_args(argv)


def build_configs(args):
    """(TexTokConfig, stage training config, preset note) from the preset and the command-line overrides."""
    preset = get_preset(args.preset)
    model = preset.model
    overrides = dict(MODEL_PRESETS[args.model_size]) if args.model_size else {}
    for flag in ("num_tokens", "conditioning", "cond_arch", "cond_location", "text_encoder"):
        if getattr(args, flag) is not None:
            overrides[flag] = getattr(args, flag)
    if args.no_text:
        overrides["conditioning"] = "none"
    if args.vq:
        overrides["vq"] = True
    if args.text_encoder is not None:
        from text_encoder import TextEncoder
        overrides["text_dim"] = TextEncoder(args.text_encoder, 1).dim
    model = dataclasses.replace(model, **overrides)
    train = preset.train if args.stage == "tokenizer" else preset.dit
    train = dataclasses.replace(train, **{f.name: getattr(args, f.name) for f in dataclasses.fields(train)
                                          if getattr(args, f.name) is not None})
    return model, train, preset.note


def setup_distributed():
    """(rank, world, device) from torchrun's environment: NCCL on CUDA, gloo on CPU; (0, 1, device) otherwise."""
    cuda = torch.cuda.is_available()
    if "RANK" not in os.environ:
        return 0, 1, torch.device("cuda" if cuda else "cpu")
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device(f"cuda:{int(os.environ['LOCAL_RANK'])}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    return rank, world, device


def autocast(device, precision):
    """bf16 autocast on CUDA ("auto"/"bf16"), none on CPU unless asked: measured slower there (README)."""
    bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()


class StepBatches:
    """Batch sampler: step s of epoch e = s // steps_per_epoch reads a fixed slice of a permutation seeded by
    (seed, e), split across ranks. Starting at `start_step` makes resume exact without replaying the loader."""

    def __init__(self, n, batch, rank, world, seed, start_step, total_steps):
        self.n, self.batch, self.rank, self.world, self.seed = n, batch, rank, world, seed
        self.start, self.total = start_step, total_steps
        self.per_epoch = max(1, n // (batch * world))

    def __len__(self):
        return self.total - self.start

    def __iter__(self):
        for step in range(self.start, self.total):
            epoch, k = divmod(step, self.per_epoch)
            perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch))
            at = (k * self.world + self.rank) * self.batch
            yield (perm.repeat(2)[at: at + self.batch]).tolist()


def lr_lambda(warmup: int, total: int):
    """Linear warm-up then cosine decay to 0 (App. C), as a LambdaLR factor."""
    def f(step):
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))
    return f


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model, over parameters and buffers."""
    e, m = list(ema.state_dict().values()), list(model.state_dict().values())
    floats = [(a, b) for a, b in zip(e, m) if a.is_floating_point()]
    torch._foreach_lerp_([a for a, _ in floats], [b for _, b in floats], 1 - decay)


def all_reduce_grads(module, world):
    """Averages gradients across ranks (for modules not wrapped in DDP, e.g. D with the R1 double backward)."""
    if world > 1:
        for p in module.parameters():
            if p.grad is not None:
                dist.all_reduce(p.grad)
                p.grad /= world


def global_mean(x: torch.Tensor, world: int) -> torch.Tensor:
    """Mean of a scalar tensor across ranks."""
    x = x.detach().float().clone()
    if world > 1:
        dist.all_reduce(x)
        x /= world
    return x


# ----------------------------------------------------------------------------------------------------- checkpoints
def pack(obj, tensors, prefix=""):
    """Splits a nested state (dicts, lists, tensors, numbers) into JSON plus a flat tensor dict for safetensors."""
    if isinstance(obj, torch.Tensor):
        tensors[prefix] = obj
        return {"__tensor__": prefix}
    if isinstance(obj, dict):
        items = {str(k): pack(v, tensors, f"{prefix}.{k}") for k, v in obj.items()}
        return {"__intkeys__": items} if obj and all(isinstance(k, int) for k in obj) else items
    if isinstance(obj, (list, tuple)):
        return [pack(v, tensors, f"{prefix}.{i}") for i, v in enumerate(obj)]
    return obj


def unpack(obj, tensors):
    """Inverse of `pack`."""
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__intkeys__" in obj:
            return {int(k): unpack(v, tensors) for k, v in obj["__intkeys__"].items()}
        return {k: unpack(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [unpack(v, tensors) for v in obj]
    return obj


def save_checkpoint(out: Path, step: int, states: dict, run_config: dict, keep: int = 2) -> Path:
    """Writes OUT/step-XXXXXXX/ (state.safetensors + state.json + config.json) under a temporary name, renames it,
    then points OUT/latest at it; older checkpoints beyond `keep` are removed."""
    final = out / f"step-{step:07d}"
    tmp = out / f".tmp-step-{step:07d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tensors = {}
    skeleton = pack(states, tensors, "s")
    save_tensors(tensors, tmp / "state.safetensors")
    save_json({"step": step, "state": skeleton}, tmp / "state.json")
    save_json(run_config, tmp / "config.json")
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    (out / ".latest.tmp").write_text(final.name + "\n")
    os.replace(out / ".latest.tmp", out / "latest")
    for old in sorted(out.glob("step-*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(out: Path, run_config: dict, map_location):
    """(step, states) of OUT/latest; refuses a checkpoint whose config differs from `run_config`, naming fields."""
    latest = out / "latest"
    if not latest.is_file():
        raise FileNotFoundError(f"{latest}: no checkpoint to resume from")
    ckpt = out / latest.read_text().strip()
    check_config(load_json(ckpt / "config.json"), run_config, ckpt / "config.json")
    meta = load_json(ckpt / "state.json")
    tensors = {k: v.to(map_location) for k, v in load_tensors(ckpt / "state.safetensors").items()}
    return meta["step"], unpack(meta["state"], tensors)


def load_states(states: dict, objects: dict, where) -> None:
    """Restores modules (strictly, naming mismatches), optimizers and schedulers from a checkpoint's states."""
    for name, obj in objects.items():
        if isinstance(obj, torch.nn.Module):
            load_state(obj, states[name], f"{where}: {name}")
        else:
            obj.load_state_dict(states[name])


# ----------------------------------------------------------------------------------------------------------- loop
class Run:
    """What both stages share: output folder, JSONL log, progress bar, checkpoint cadence, non-finite guard."""

    def __init__(self, args, rank, run_config):
        self.args, self.rank, self.run_config = args, rank, run_config
        self.out = Path(args.out or f"runs/{args.stage}")
        self.last_ckpt = None
        if rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
            save_json(run_config, self.out / "config.json")

    def log(self, row: dict) -> None:
        if self.rank == 0:
            with open(self.out / "log.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")

    def check_finite(self, step: int, terms: dict) -> None:
        bad = [k for k, v in terms.items() if not math.isfinite(float(v))]
        if bad:
            raise FloatingPointError(
                f"non-finite loss at step {step}: " + ", ".join(f"{k}={float(v):.4g}" for k, v in terms.items())
                + f"; last good checkpoint: {self.last_ckpt or 'none written yet'}")

    def checkpoint(self, step: int, states_fn) -> None:
        if self.rank == 0:
            self.last_ckpt = save_checkpoint(self.out, step, states_fn(), self.run_config)

    def resume(self, objects: dict, device) -> int:
        """With --resume, restores `objects` from OUT/latest and drops log rows after its step (so the log reads as
        one uninterrupted run); returns the step to start from (0 without --resume)."""
        if not self.args.resume:
            return 0
        step, states = load_checkpoint(self.out, self.run_config, device)
        load_states(states, objects, self.out / "latest")
        path = self.out / "log.jsonl"
        if self.rank == 0 and path.is_file():
            rows = [r for r in path.read_text().splitlines() if r.strip() and json.loads(r)["step"] <= step]
            atomic_write(path, lambda tmp: Path(tmp).write_text("".join(r + "\n" for r in rows)))
        return step


def make_loader(dataset, batch, rank, world, seed, start, total, workers):
    sampler = StepBatches(len(dataset), batch, rank, world, seed, start, total)
    return DataLoader(dataset, batch_sampler=sampler, num_workers=workers, collate_fn=default_collate,
                      persistent_workers=False, pin_memory=torch.cuda.is_available())


def to_device(batch: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def perceptual_loss(device):
    """LPIPS-VGG (App. C: perceptual loss), requiring the pretrained VGG trunk in the torch hub cache."""
    path = Path(torch.hub.get_dir()) / "checkpoints" / VGG_FILE
    if not path.is_file():
        raise SystemExit(f"perceptual loss: {path} not found. Download {VGG_FILE} from "
                         f"https://download.pytorch.org/models/{VGG_FILE} into {path.parent} (TORCH_HOME moves it), "
                         f"or switch the perceptual loss off with --perceptual-weight 0 (recorded in the run config).")
    import lpips
    return lpips.LPIPS(net="vgg", verbose=False).to(device).eval().requires_grad_(False)


def datasets_for(args, cfg: TexTokConfig, device):
    """(train, val) with cached caption embeddings when the model reads text."""
    train, val = make_datasets(args.data, args.val, cfg.image_size, args.num_images)
    if cfg.conditioning == "text":
        cache = Path(args.cache_dir) / "text"
        train = WithText(train, cfg.text_encoder, cfg.text_len, cache, device)
        val = WithText(val, cfg.text_encoder, cfg.text_len, cache, device)
    return train, val


def micro_batch(batch_size: int, world: int, grad_accum: int) -> int:
    """Per-rank micro-batch of one accumulation step; the global batch must split evenly."""
    micro = batch_size // (world * grad_accum)
    if micro * world * grad_accum != batch_size:
        raise SystemExit(f"batch {batch_size} is not divisible by {world} ranks x {grad_accum} accumulation")
    return micro


def wrap(model, world: int, device, compile_: bool):
    """DDP across ranks (when there are several), then torch.compile if asked."""
    net = DDP(model, device_ids=[device.index] if device.type == "cuda" else None) if world > 1 else model
    return torch.compile(net) if compile_ else net


def steps_for(n: int, batch: int, epochs: int, max_steps):
    total = max(1, n // batch) * epochs
    return total, min(total, max_steps) if max_steps else total


# --------------------------------------------------------------------------------------------------- stage 1
def train_tokenizer(args, rank, world, device):
    cfg, tc, note = build_configs(args)
    train_set, val_set = datasets_for(args, cfg, device)
    total, stop = steps_for(len(train_set), tc.batch_size, tc.epochs, args.max_steps)
    run_config = {"stage": "tokenizer", "preset": args.preset, "note": note, "data": args.data or "embedded",
                  "num_images": len(train_set), "model": to_dict(cfg), "train": to_dict(tc),
                  "perceptual_loss": "on (LPIPS-VGG)" if tc.perceptual_weight > 0 else "OFF (perceptual_weight 0)"}
    run = Run(args, rank, run_config)

    torch.manual_seed(tc.seed)  # after data set-up, so the initial weights never depend on a cache hit
    model = TexTok(cfg).to(device)
    ema = TexTok(cfg).to(device).eval().requires_grad_(False)
    ema.load_state_dict(model.state_dict())
    disc = StyleGANDiscriminator(cfg.image_size, tc.disc_channels, tc.disc_multipliers).to(device)
    lecam = LeCAM(tc.lecam_decay).to(device)
    betas = (tc.beta1, tc.beta2)
    fused = device.type == "cuda"
    opt = torch.optim.Adam(model.parameters(), lr=tc.lr, betas=betas, fused=fused)
    d_opt = torch.optim.Adam(disc.parameters(), lr=tc.lr, betas=betas, fused=fused)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(tc.warmup_steps, total))
    objects = {"model": model, "ema": ema, "disc": disc, "lecam": lecam, "opt": opt, "d_opt": d_opt,
               "sched": sched}
    start = run.resume(objects, device)
    lpips_fn = perceptual_loss(device) if tc.perceptual_weight > 0 else None
    net = wrap(model, world, device, args.compile)
    if rank == 0:
        print(f"TexTok {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params, D "
              f"{sum(p.numel() for p in disc.parameters()) / 1e6:.2f}M; {note}; perceptual loss "
              f"{run_config['perceptual_loss']}; {total} steps ({stop - start} in this run) on {device} x {world}")

    micro = micro_batch(tc.batch_size, world, args.grad_accum)
    loader = make_loader(train_set, micro * args.grad_accum, rank, world, tc.seed, start, stop, args.workers)
    val_batch = to_device(default_collate([val_set[i] for i in range(min(len(val_set), 64))]), device)
    bar = tqdm(total=stop, initial=start, disable=rank != 0, desc="tokenizer", dynamic_ncols=True)
    t0, seen = time.perf_counter(), 0
    for step, batch in enumerate(loader, start):
        torch.manual_seed(tc.seed * 1_000_003 + step * world + rank)  # every draw is a function of (seed, step, rank)
        batch = to_device(batch, device)
        gan_on = step >= tc.disc_start
        terms, fakes = {}, []
        # ---- tokenizer / detokenizer update: l2 + perceptual + GAN (+ VQ) losses (§3.2, App. C)
        disc.requires_grad_(False)
        for i in range(args.grad_accum):
            mb = {k: v[i * micro:(i + 1) * micro] for k, v in batch.items()}
            sync = nullcontext() if (world == 1 or i == args.grad_accum - 1) else net.no_sync()
            with sync, autocast(device, args.precision):
                recon, _, vq_loss = net(mb["image"], **cond_kwargs(mb))
                recon = recon.float()
                parts = {"l2": F.mse_loss(recon, mb["image"]), "vq": vq_loss.float()}
                if lpips_fn is not None:
                    parts["perceptual"] = lpips_fn(recon, mb["image"]).mean()
                if gan_on:
                    parts["gan"] = generator_loss(disc(recon))
                loss = (tc.recon_weight * parts["l2"] + parts["vq"] + tc.perceptual_weight * parts.get("perceptual", 0)
                        + tc.gan_weight * parts.get("gan", 0))
                (loss / args.grad_accum).backward()
            fakes.append(recon.detach())
            for k, v in parts.items():
                terms[k] = terms.get(k, 0.0) + v.item() / args.grad_accum
        run.check_finite(step, terms)
        terms["grad_norm"] = torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip).item()
        lr = sched.get_last_lr()[0]
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        ema_update(ema, model, tc.ema_decay)
        # ---- discriminator update: non-saturating loss + R1 (cost 10) + LeCAM (App. C), from disc_start on
        if gan_on:
            disc.requires_grad_(True)
            for i in range(args.grad_accum):
                real = batch["image"][i * micro:(i + 1) * micro]
                with autocast(device, args.precision):
                    logits_real, r1 = r1_penalty(disc, real)
                    logits_fake = disc(fakes[i])
                lecam.update(global_mean(logits_real.mean(), world)[None], global_mean(logits_fake.mean(), world)[None])
                d_parts = {"d_loss": discriminator_loss(logits_real, logits_fake), "r1": r1,
                           "lecam": lecam.penalty(logits_real, logits_fake)}
                d_loss = d_parts["d_loss"] + tc.r1_cost * r1 + tc.lecam_weight * d_parts["lecam"]
                (d_loss / args.grad_accum).backward()
                for k, v in d_parts.items():
                    terms[k] = terms.get(k, 0.0) + v.item() / args.grad_accum
            run.check_finite(step, terms)
            all_reduce_grads(disc, world)
            for group in d_opt.param_groups:  # D follows the same warm-up + cosine schedule as the tokenizer
                group["lr"] = lr
            d_opt.step()
            d_opt.zero_grad(set_to_none=True)

        seen += tc.batch_size
        done = step + 1
        if done % args.log_every == 0 or done == stop:
            rate = seen / (time.perf_counter() - t0)
            terms = {k: global_mean(torch.tensor(v), world).item() for k, v in terms.items()}  # mean over ranks
            row = {"step": done, **{k: round(v, 6) for k, v in terms.items()}, "lr": lr,
                   "img_per_s": round(rate, 2)}
            run.log(row)
            bar.set_postfix({k: f"{v:.4g}" for k, v in row.items() if k not in ("step",)}, refresh=False)
        if done % args.eval_every == 0 or done == stop:
            psnr = evaluate_tokenizer(ema, val_batch, run.out / f"recon-{done:07d}.png", rank, device, args.precision)
            run.log({"step": done, "val_psnr": psnr})
            bar.write(f"step {done}: validation PSNR {psnr:.2f} dB (EMA)") if rank == 0 else None
        if done % args.ckpt_every == 0 or done == stop:
            run.checkpoint(done, lambda: {k: v.state_dict() for k, v in objects.items()})
        bar.update(1)
    bar.close()
    if rank == 0:
        ema.save_pretrained(run.out / "tokenizer")
        print(f"done: EMA tokenizer in {run.out / 'tokenizer'}, log {run.out / 'log.jsonl'}")
    return run.out


@torch.no_grad()
def evaluate_tokenizer(model, batch, grid_path, rank, device, precision) -> float:
    """Validation PSNR (dB, images in [-1, 1]) of `model` on `batch`; rank 0 writes originals beside
    reconstructions as a PNG grid (Fig. 1 layout: pairs of columns)."""
    with autocast(device, precision):
        recon = model(batch["image"], **cond_kwargs(batch))[0].float().clamp(-1, 1)
    mse = ((recon - batch["image"]) / 2).pow(2).flatten(1).mean(1)
    psnr = (-10 * torch.log10(mse.clamp_min(1e-10))).mean().item()
    if rank == 0:
        k = min(16, len(recon))
        pairs = torch.stack([batch["image"][:k], recon[:k]], 1).flatten(0, 1)
        save_image_grid(pairs, grid_path, ncol=8)
    return round(psnr, 4)


# --------------------------------------------------------------------------------------------------- stage 2
@torch.no_grad()
def encode_latents(tokenizer: TexTok, dataset, device, batch_size, precision, cache: Path):
    """Encodes the whole data set once with the frozen (EMA) tokenizer: Z [M, N, d] float32, cached on disk."""
    if cache.is_file():
        return load_tensors(cache)["Z"]
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0)
    Z = []
    for batch in tqdm(loader, desc="encoding latents"):
        batch = to_device(batch, device)
        with autocast(device, precision):
            Z.append(tokenizer.encode(batch["image"], **cond_kwargs(batch)).float().cpu())
    Z = torch.cat(Z)
    save_tensors({"Z": Z}, cache)
    return Z


class LatentSet(torch.utils.data.Dataset):
    """Normalised latents with their condition (labels, or the cached caption embeddings for T2I)."""

    def __init__(self, Z, base, task):
        self.Z, self.base, self.task = Z, base, task

    def __len__(self):
        return len(self.Z)

    def __getitem__(self, i):
        item = {"Z": self.Z[i], "label": self.base.labels[i]}
        if self.task == "t2i":
            item["text"] = torch.from_numpy(np.array(self.base.emb[i], np.float32))
            item["text_mask"] = torch.from_numpy(np.array(self.base.mask[i]))
        return item


def train_dit(args, rank, world, device):
    if args.tokenizer is None:
        args.tokenizer = str(Path("runs/tokenizer/tokenizer"))
        if not Path(args.tokenizer).is_dir():
            raise SystemExit(f"--tokenizer not given and {args.tokenizer} does not exist: run "
                             "`python train.py --stage tokenizer` first or pass a TexTok folder")
    tokenizer = TexTok.from_pretrained(args.tokenizer).to(device).eval().requires_grad_(False)
    cfg = tokenizer.cfg
    _, dc, note = build_configs(args)
    if args.task == "t2i" and cfg.conditioning != "text":
        raise SystemExit(f"{args.tokenizer}: text-to-image needs a text-conditioned TexTok (it has "
                         f"conditioning={cfg.conditioning!r})")
    train_set, _ = datasets_for(args, cfg, device)
    num_classes = max(max(train_set.labels) + 1, 1)
    if args.task == "class" and min(train_set.labels) < 0:
        raise SystemExit("class-conditional DiT needs a \"label\" for every image in captions.jsonl")
    total, stop = steps_for(len(train_set), dc.batch_size, dc.epochs, args.max_steps)
    run_config = {"stage": "dit", "preset": args.preset, "note": note, "task": args.task, "data": args.data or "embedded",
                  "tokenizer": str(Path(args.tokenizer).resolve()), "num_classes": num_classes,
                  "tokenizer_config": to_dict(cfg), "train": to_dict(dc)}
    run = Run(args, rank, run_config)

    # Keyed by the tokenizer's weights and the data, so a retrained tokenizer at the same path never reads stale Z.
    weights = hashlib.sha1((Path(args.tokenizer) / "model.safetensors").read_bytes()).hexdigest()[:16]
    data_name = Path(args.data or "embedded").name
    latent_cache = Path(args.cache_dir) / "latents" / f"{weights}-{data_name}-{len(train_set)}.safetensors"
    Z = encode_latents(tokenizer, train_set, device, 64, args.precision, latent_cache) if rank == 0 else None
    if world > 1:
        dist.barrier()
        Z = load_tensors(latent_cache)["Z"] if Z is None else Z
    mean, std = Z.mean(dim=(0, 1)), Z.std(dim=(0, 1)).clamp_min(1e-6)  # per-channel latent normalisation
    latents = LatentSet((Z - mean) / std, train_set, args.task)

    torch.manual_seed(dc.seed)
    model = build_dit(dc.model, dc.class_dropout, cfg, args.task, num_classes).to(device)
    ema = build_dit(dc.model, dc.class_dropout, cfg, args.task, num_classes).to(device).eval().requires_grad_(False)
    ema.load_state_dict(model.state_dict())
    diffusion = Diffusion(dc.diffusion_steps, dc.beta_start, dc.beta_end)
    opt = torch.optim.AdamW(model.parameters(), lr=dc.lr, betas=(dc.beta1, dc.beta2), weight_decay=dc.weight_decay,
                            fused=device.type == "cuda")
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(dc.warmup_steps, total))
    objects = {"model": model, "ema": ema, "opt": opt, "sched": sched}
    start = run.resume(objects, device)
    net = wrap(model, world, device, args.compile)
    if rank == 0:
        print(f"{dc.model} ({args.task}) {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params over "
              f"{cfg.num_tokens}x{cfg.token_dim} tokens; {total} steps ({stop - start} in this run) on {device} x {world}")
    micro = micro_batch(dc.batch_size, world, args.grad_accum)
    loader = make_loader(latents, micro * args.grad_accum, rank, world, dc.seed, start, stop, args.workers)
    bar = tqdm(total=stop, initial=start, disable=rank != 0, desc="dit", dynamic_ncols=True)
    t0, seen = time.perf_counter(), 0
    for step, batch in enumerate(loader, start):
        torch.manual_seed(dc.seed * 1_000_003 + step * world + rank)
        batch = to_device(batch, device)
        loss_sum = 0.0
        for i in range(args.grad_accum):
            mb = {k: v[i * micro:(i + 1) * micro] for k, v in batch.items()}
            kw = {"y": mb["label"]} if args.task == "class" else {"text": mb["text"], "text_mask": mb["text_mask"]}
            sync = nullcontext() if (world == 1 or i == args.grad_accum - 1) else net.no_sync()
            with sync, autocast(device, args.precision):
                loss = diffusion.training_loss(net, mb["Z"], kw).float()  # v-prediction MSE (App. C)
                (loss / args.grad_accum).backward()
            loss_sum += loss.item() / args.grad_accum
        run.check_finite(step, {"loss": loss_sum})
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), dc.grad_clip).item()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        ema_update(ema, model, dc.ema_decay)
        seen += dc.batch_size
        done = step + 1
        if done % args.log_every == 0 or done == stop:
            row = {"step": done, "loss": round(global_mean(torch.tensor(loss_sum), world).item(), 6), "grad_norm": round(grad_norm, 4),
                   "lr": sched.get_last_lr()[0], "latents_per_s": round(seen / (time.perf_counter() - t0), 1)}
            run.log(row)
            bar.set_postfix({k: f"{v:.4g}" for k, v in row.items() if k != "step"}, refresh=False)
        if done % args.ckpt_every == 0 or done == stop:
            run.checkpoint(done, lambda: {k: v.state_dict() for k, v in objects.items()})
        bar.update(1)
    bar.close()
    if rank == 0:
        save_dit(ema, run.out / "dit", {"model": dc.model, "task": args.task, "num_classes": num_classes,
                                         "tokenizer": str(Path(args.tokenizer).resolve()), "train": to_dict(dc),
                                         "tokenizer_config": to_dict(cfg)}, mean, std)
        print(f"done: EMA DiT in {run.out / 'dit'}; sample with `python sample.py --dit {run.out / 'dit'}`")
    return run.out


def main(argv=None):
    args = parse_args(argv)
    rank, world, device = setup_distributed()
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    try:
        return (train_tokenizer if args.stage == "tokenizer" else train_dit)(args, rank, world, device)
    finally:
        if world > 1:
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
