"""Generate images with a trained DiT over TexTok tokens (§3.2 "Generation stage", App. C).

    python sample.py                                   # runs/dit/dit on the embedded set: grid + ADM .npz
    torchrun --nproc_per_node 8 sample.py --dit runs/dit/dit --num-samples 50000 --batch-size 256 --cfg-scale 1.5

Class-conditional: DiT generates the tokens of a class (classes in turn); the detokenizer gets a caption drawn from
that class's held-out caption pool, as the paper does. Text-to-image: one caption drives both DiT-T2I and the
detokenizer; captions come from --prompts or from the held-out split the DiT was trained beside (stored in its
config, so they are never training captions): its --val folder (the imagenet presets, which train on the whole
--data folder, require one: ImageNet val, §4.2), else the seeded 10% of --data that training held out. Caption
embeddings come from the same on-disk cache training used.

Sample i starts from noise seeded by (--seed, i) and reads caption i, so any number of ranks writes the same images:
rank r draws samples r, r + K, ...; rank 0 gathers them into OUT/samples_NxHxWx3.npz (`arr_0` uint8 [N, H, W, 3],
the ADM evaluator's layout) and OUT/samples.png. An OUT that holds samples is refused unless --overwrite, and one
that another live run holds (OUT/.lock) is refused. The tokenizer must be the one the DiT's tokens came from (the
SHA-1 of its weights, recorded by train.py) unless --allow-other-tokenizer.
"""
import argparse
import math
import time
from contextlib import nullcontext
from typing import NamedTuple
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from conditions import Conditioned
from config import AT_LEAST_0, AT_LEAST_1, POSITIVE, SEED, DiTTrainConfig, check_flags, from_dict
from data import class_caption_pool, make_datasets
from diffusion import Diffusion, cfg_scale
from dit import DiT, read_meta
from runtime.distributed import autocast, setup_distributed
from runtime.errors import InputError, run_main
from runtime.files import (atomic_write, check_folder, file_sha1, holding, read_lines, remove_temporaries,
                   writing)
from runtime.hub import pretrained_folder
from runtime.images import save_image_grid, to_uint8
from steps import sub_seed
from textok import TexTok


@torch.no_grad()
def generate(dit: DiT, tokenizer: TexTok, diffusion: Diffusion, cond, noise, steps: int, w: float, schedule: str,
             power: float, precision: str = "auto", compiled=None):
    """One batch of images [B, 3, H, W] in [-1, 1] from initial noise [B, N, d] and the batch's conditions.Cond.

    DiT samples normalised tokens with DDIM (guided by `w` on the MDT schedule; w = 1 runs no unconditional half),
    they are de-normalised to Z, and the detokenizer decodes Z once for the whole batch with the caption.
    `compiled`: a compiled `dit` (w = 1) or `dit.forward_with_cfg` (w != 1) to call instead."""
    device, guided = noise.device, w != 1.0
    net = compiled if compiled is not None else (dit.forward_with_cfg if guided else dit)

    def model_fn(x, t):
        with autocast(device, precision):
            if guided:
                return net(x, t, cfg_scale(t, w, diffusion.num_timesteps, power, schedule), cond).float()
            return net(x, t, cond).float()

    Z = dit.denormalize(diffusion.ddim_sample(model_fn, noise.shape, steps, device, noise=noise))
    with autocast(device, precision):
        return tokenizer.decode(Z, cond).float().clamp(-1, 1)


def write_npz(images: np.ndarray, path: Path) -> Path:
    """Writes uint8 [N, H, W, 3] as `arr_0` of an .npz (ADM evaluator layout), atomically."""
    return atomic_write(path, lambda tmp: np.savez(tmp, arr_0=images))


def labels_and_captions(dit: DiT, tokenizer: TexTok, args, n: int):
    """(labels, captions) of samples 0..n-1: classes in turn with a held-out caption each, or T2I captions."""
    meta, cfg = dit.meta, tokenizer.cfg
    split = meta["split"]  # the DiT's training data: its held-out part is what sampling may read
    data = args.data or split["data"]
    if meta["task"] == "class":
        labels = [i % meta["num_classes"] for i in range(n)]
        if cfg.conditioning != "text":
            return labels, None
        pool = class_caption_pool(data, meta["num_classes"], captions=split["captions"], family=split.get("set", "shapes"))
        for c in sorted(set(labels)):
            if not pool.get(c):
                where = f"{data}/class_captions.jsonl" if data else "the embedded caption pool"
                raise InputError(f"{where}: no held-out caption for class {c}")
        return labels, [str(np.random.default_rng([args.seed, i]).choice(pool[c])) for i, c in enumerate(labels)]
    if args.prompts:
        captions = [line.strip() for line in read_lines(args.prompts) if line.strip()]
        if not captions:
            raise InputError(f"{args.prompts}: no prompts (one caption per line)")
    else:  # the validation split of the DiT's training data (its --val folder, else a seeded 10%): held out of both
        captions = make_datasets(data, split["val"], cfg.image_size, split["num_images"], captions=split["captions"],
                                 family=split.get("set", "shapes"))[1].captions
    return [0] * n, [captions[i % len(captions)] for i in range(n)]


def check_args(args, num_timesteps: int) -> None:
    """Refuses values that cannot be meant (rather than silently replacing them), and an --out that is a file."""
    check_flags(args, {"num_samples": AT_LEAST_1, "batch_size": AT_LEAST_1, "cfg_scale": AT_LEAST_0,
                       "cfg_power": POSITIVE, "seed": SEED})
    if args.sampling_steps is not None and not 1 <= args.sampling_steps <= num_timesteps:
        raise InputError(f"--sampling-steps: DDIM needs 1 to {num_timesteps} steps, got {args.sampling_steps}")
    check_folder(args.out, "--out")


def check_tokenizer(meta, tokenizer: Path, path, allow_other: bool) -> None:
    """Refuses a tokenizer (folder) whose weights are not those the DiT's tokens came from: the SHA-1 that train.py
    recorded in the DiT's config.json `path` (a DiT without the record is not checked), unless `allow_other`."""
    recorded = meta.get("tokenizer_sha1")
    found = file_sha1(tokenizer / "model.safetensors") if recorded and not allow_other else recorded
    if found != recorded:
        raise InputError(f"{tokenizer}: not the tokenizer this DiT was trained over (its model.safetensors has SHA-1 "
                         f"{found}..., {path} records {recorded}...); pass --allow-other-tokenizer to decode with it")


def sample_files(out: Path) -> list:
    """The files a sampling run leaves in `out`."""
    return sorted(out.glob("samples_*.npz")) + [p for p in (out / "samples.png", out / "captions.txt") if p.exists()]


def refuse_samples(out: Path, overwrite: bool) -> None:
    """Refuses an --out that holds samples, unless `overwrite`."""
    held = sample_files(out)
    if held and not overwrite:
        raise InputError(f"{out}: holds samples ({held[0].name}); replace them with --overwrite, or choose another "
                         "--out")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dit", default="runs/dit/dit", help="a DiT folder written by train.py --stage dit, or a Hugging "
                   "Face repo id (DiT.push_to_hub; pass --tokenizer too)")
    p.add_argument("--tokenizer", default=None, help="TexTok folder (default: the one the DiT was trained on)")
    p.add_argument("--data", default=None, help="JSONL folder: class caption pool / T2I captions (default: the "
                   "DiT's training data)")
    p.add_argument("--prompts", default=None, help="T2I: a text file with one caption per line")
    p.add_argument("--cache-dir", default="cache", help="text-embedding cache (shared with train.py)")
    p.add_argument("--download", action="store_true",
                   help="fetch a hub model or text encoder missing from the local Hugging Face cache (else one line)")
    p.add_argument("--num-samples", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=32,
                   help="samples per batch over all ranks, as train.py's (each rank draws its share)")
    p.add_argument("--sampling-steps", type=int, default=None,
                   help="DDIM steps (default: the DiT config's, App. C: 250)")
    p.add_argument("--cfg-scale", type=float, default=None, help="guidance scale w (default: the DiT config)")
    p.add_argument("--cfg-schedule", choices=["power-cosine", "constant"], default=None)
    p.add_argument("--cfg-power", type=float, default=None, help="MDT scale_pow")
    p.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="CUDA graphs for the DiT forward (default: on CUDA only)")
    p.add_argument("--out", default="samples")
    p.add_argument("--overwrite", action="store_true", help="replace the samples an --out holds")
    p.add_argument("--allow-other-tokenizer", action="store_true",
                   help="decode with a --tokenizer whose weights are not those the DiT was trained over")
    p.add_argument("--seed", type=int, default=0, help="noise of sample i seeded by (seed, i); 0 to 2**32 - 1")
    args = p.parse_args(argv)

    rank, world, device = setup_distributed()
    try:
        return sample(args, rank, world, device)
    finally:
        if world > 1:
            dist.destroy_process_group()


def sample(args, rank, world, device):
    folder = pretrained_folder(args.dit, download=args.download)  # a folder, or a Hugging Face repo id
    meta = read_meta(folder, sampling=True)
    tok_folder = pretrained_folder(args.tokenizer or meta["tokenizer"], download=args.download)
    tokenizer = TexTok.from_pretrained(tok_folder).to(device).eval()
    check_tokenizer(meta, tok_folder, folder / "config.json", args.allow_other_tokenizer)
    dit = DiT.from_pretrained(folder, tokenizer.cfg, map_location=device)  # refuses another tokenizer's DiT
    cfg, train = tokenizer.cfg, from_dict(DiTTrainConfig, dit.meta["train"], folder / "config.json")
    check_args(args, train.diffusion_steps)
    refuse_samples(Path(args.out), args.overwrite)
    steps = train.sampling_steps if args.sampling_steps is None else args.sampling_steps
    w = train.cfg_scale if args.cfg_scale is None else args.cfg_scale
    schedule = args.cfg_schedule or train.cfg_schedule
    power = train.cfg_power if args.cfg_power is None else args.cfg_power
    diffusion = Diffusion(train.diffusion_steps, train.beta_start, train.beta_end)
    compile_ = device.type == "cuda" if args.compile is None else args.compile
    compiled = torch.compile(dit.forward_with_cfg if w != 1.0 else dit, mode="reduce-overhead") if compile_ else None

    n = args.num_samples
    labels, captions = labels_and_captions(dit, tokenizer, args, n)
    text = cfg.text_encoder if captions is not None else None
    make = lambda: Conditioned(None, captions, labels, text, cfg.text_len, args.cache_dir, device,
                               download=args.download)
    conds = make() if rank == 0 else None
    if world > 1:
        dist.barrier()  # rank 0 filled the embedding cache once; the others read it
        conds = make() if conds is None else conds

    out, start = Path(args.out), time.perf_counter()
    with holding(out) if rank == 0 else nullcontext():  # OUT is this run's until its samples are written
        if rank == 0:
            refuse_samples(out, args.overwrite)  # again: another run may have written some meanwhile
        mine = draw(dit, tokenizer, diffusion, conds, args, Sampler(steps, w, schedule, power, compiled), rank, world)
        seconds = time.perf_counter() - start
        images = gather(mine, out, n, rank, world)
        if rank != 0:
            return None
        npz, png = write_samples(images, captions, out)
    print(f"{n} samples in {seconds:.1f} s ({seconds / max(1, len(mine)) * 1000:.1f} ms/image on rank 0, "
          f"{world} rank(s)) -> {npz}, {png}")
    return npz


class Sampler(NamedTuple):
    """How each batch is drawn: DDIM `steps`, guidance scale `cfg_scale` (w) on the MDT schedule `cfg_schedule` with
    `cfg_power`, and the compiled DiT to call (None: eager)."""
    steps: int
    cfg_scale: float
    cfg_schedule: str
    cfg_power: float
    compiled: object = None


def draw(dit, tokenizer, diffusion, conds, args, sampler: Sampler, rank: int, world: int) -> np.ndarray:
    """This rank's samples rank, rank + K, ... of --num-samples as uint8 [n_r, H, W, 3], its share of --batch-size at
    a time, the noise of sample i seeded by sub_seed(--seed, i)."""
    cfg, device = tokenizer.cfg, next(dit.parameters()).device
    mine, parts = list(range(rank, args.num_samples, world)), []
    per_rank = -(-args.batch_size // world)  # --batch-size is over all ranks, as train.py's
    for at in tqdm(range(0, len(mine), per_rank), disable=rank != 0,
                   desc=f"sampling ({sampler.steps} DDIM steps, w={sampler.cfg_scale}, {world} rank(s))"):
        idx = mine[at: at + per_rank]
        noise = torch.stack([torch.randn(cfg.num_tokens, cfg.token_dim, generator=torch.Generator().manual_seed(
            sub_seed(args.seed, i))) for i in idx]).to(device)
        parts.append(to_uint8(generate(dit, tokenizer, diffusion, conds.batch(idx).to(device), noise, sampler.steps,
                                       sampler.cfg_scale, sampler.cfg_schedule, sampler.cfg_power, args.precision,
                                       sampler.compiled)))
    return np.concatenate(parts) if parts else np.zeros((0, cfg.image_size, cfg.image_size, 3), np.uint8)


def gather(mine: np.ndarray, out: Path, n: int, rank: int, world: int):
    """On rank 0, all n samples in order from every rank's share (with K ranks, through OUT/.parts/); None
    elsewhere."""
    if world == 1:
        return mine
    with writing(out / ".parts"):  # every rank leaves its part on disk; rank 0 interleaves them back
        write_npz(mine, out / ".parts" / f"rank{rank}.npz")
    dist.barrier()
    if rank != 0:
        return None
    images = np.zeros((n, *mine.shape[1:]), np.uint8)
    for r in range(world):
        path = out / ".parts" / f"rank{r}.npz"
        images[r::world] = np.load(path)["arr_0"]
        path.unlink()
    (out / ".parts").rmdir()
    return images


def write_samples(images: np.ndarray, captions, out: Path):
    """Replaces the samples in `out` by `images` (and their `captions`): the ADM .npz, a PNG grid of the first 64,
    captions.txt. Returns (the .npz, the grid)."""
    with writing(out):
        remove_temporaries(out)  # a killed write's
        for old in sample_files(out):
            old.unlink()
        npz = write_npz(images, out / f"samples_{'x'.join(map(str, images.shape))}.npz")
        k = min(len(images), 64)
        grid = torch.from_numpy(images[:k]).permute(0, 3, 1, 2).float() / 127.5 - 1
        png = save_image_grid(grid, out / "samples.png", ncol=int(math.ceil(math.sqrt(k))))
        if captions is not None:
            atomic_write(out / "captions.txt", lambda tmp: Path(tmp).write_text("\n".join(captions) + "\n"))
    return npz, png


if __name__ == "__main__":
    run_main(main)
