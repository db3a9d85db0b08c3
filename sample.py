"""Generate images with a trained DiT over TexTok tokens (§3.2 "Generation stage", App. C).

    python sample.py                                   # runs/dit/dit on the embedded set: grid + ADM .npz
    python sample.py --dit runs/dit/dit --num-samples 50000 --batch-size 256 --cfg-scale 1.5

Class-conditional: DiT generates the tokens of a class; the detokenizer gets a caption drawn from that class's
held-out caption pool, as the paper does. Text-to-image: one caption drives both DiT-T2I and the detokenizer.
Writes OUT/samples.png and OUT/samples_NxHxWx3.npz (`arr_0` uint8 [N, H, W, 3], the ADM evaluator's layout).
"""
import argparse
import math
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from common import atomic_write, load_json, save_image_grid, to_uint8
from data import class_caption_pool, make_datasets
from diffusion import Diffusion, cfg_scale
from dit import load_dit
from text_encoder import TextEncoder
from textok import TexTok


@torch.no_grad()
def generate(dit, tokenizer: TexTok, diffusion: Diffusion, latent_mean, latent_std, steps: int, w: float,
             schedule: str, power: float, labels=None, text=None, text_mask=None, generator=None, dtype=None):
    """One batch of images [B, 3, H, W] in [-1, 1].

    DiT samples normalised tokens with DDIM (guided by `w` on the MDT schedule; w = 1 runs no unconditional
    half), they are de-normalised to Z, and the detokenizer decodes Z once for the whole batch with the caption."""
    cfg = tokenizer.cfg
    B = len(labels) if labels is not None else len(text)
    device = latent_mean.device
    cond = {"y": labels} if dit.text_dim is None else {"text": text, "text_mask": text_mask}
    autocast = (lambda: torch.autocast(device.type, dtype=dtype)) if dtype is not None else nullcontext

    def model_fn(x, t):
        with autocast():
            if w == 1.0:
                return dit(x, t, **cond).float()
            return dit.forward_with_cfg(x, t, cfg_scale(t, w, diffusion.num_timesteps, power, schedule), **cond).float()

    Z = diffusion.ddim_sample(model_fn, (B, cfg.num_tokens, cfg.token_dim), steps, device, generator)
    Z = Z * latent_std + latent_mean
    with autocast():
        return tokenizer.decode(Z, text, text_mask, labels).float().clamp(-1, 1)


def write_npz(images: np.ndarray, path: Path) -> Path:
    """Writes uint8 [N, H, W, 3] as `arr_0` of an .npz (ADM evaluator layout), atomically."""
    return atomic_write(path, lambda tmp: np.savez(tmp, arr_0=images))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dit", default="runs/dit/dit", help="a DiT folder written by train.py --stage dit")
    p.add_argument("--tokenizer", default=None, help="TexTok folder (default: the one the DiT was trained on)")
    p.add_argument("--data", default=None, help="JSONL folder: class caption pool / T2I captions (default embedded)")
    p.add_argument("--prompts", default=None, help="T2I: a text file with one caption per line")
    p.add_argument("--num-samples", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=None, help="DDIM steps (default: the DiT config, App. C: 250)")
    p.add_argument("--cfg-scale", type=float, default=None, help="guidance scale w (default: the DiT config)")
    p.add_argument("--cfg-schedule", choices=["power-cosine", "constant"], default=None)
    p.add_argument("--cfg-power", type=float, default=None, help="MDT scale_pow")
    p.add_argument("--out", default="samples")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else None
    meta = load_json(Path(args.dit) / "config.json")
    tokenizer = TexTok.from_pretrained(args.tokenizer or meta["tokenizer"]).to(device).eval()
    cfg = tokenizer.cfg
    dit, meta, mean, std = load_dit(args.dit, cfg, device)
    train = meta["train"]
    steps = args.steps or train["sampling_steps"]
    w = train["cfg_scale"] if args.cfg_scale is None else args.cfg_scale
    schedule, power = args.cfg_schedule or train["cfg_schedule"], args.cfg_power or train["cfg_power"]
    diffusion = Diffusion(train["diffusion_steps"], train["beta_start"], train["beta_end"])
    encoder = TextEncoder(cfg.text_encoder, cfg.text_len, device) if cfg.conditioning == "text" else None

    # Conditions for all samples: classes in turn (+ a held-out caption each), or captions for T2I.
    rng = np.random.default_rng(args.seed)
    if meta["task"] == "class":
        labels = [i % meta["num_classes"] for i in range(args.num_samples)]
        pool = class_caption_pool(args.data, meta["num_classes"]) if encoder is not None else None
        captions = [str(rng.choice(pool[c])) for c in labels] if pool is not None else None
    else:
        if args.prompts:
            captions = [l.strip() for l in Path(args.prompts).read_text().splitlines() if l.strip()]
        else:
            captions = make_datasets(args.data, None, cfg.image_size, 1, args.seed)[1].captions
        captions = [captions[i % len(captions)] for i in range(args.num_samples)]
        labels = None

    generator = torch.Generator(device).manual_seed(args.seed)
    images, start = [], time.perf_counter()
    for i in tqdm(range(0, args.num_samples, args.batch_size), desc=f"sampling ({steps} DDIM steps, w={w})"):
        n = min(args.batch_size, args.num_samples - i)
        y = torch.tensor(labels[i: i + n], device=device) if labels is not None else None
        text, text_mask = encoder(captions[i: i + n]) if encoder is not None else (None, None)
        images.append(to_uint8(generate(dit, tokenizer, diffusion, mean, std, steps, w, schedule, power, y, text,
                                        text_mask, generator, dtype)))
    seconds = time.perf_counter() - start
    images = np.concatenate(images)
    out = Path(args.out)
    npz = write_npz(images, out / f"samples_{'x'.join(map(str, images.shape))}.npz")
    k = min(len(images), 64)
    grid = torch.from_numpy(images[:k]).permute(0, 3, 1, 2).float() / 127.5 - 1
    png = save_image_grid(grid, out / "samples.png", ncol=int(math.ceil(math.sqrt(k))))
    if captions is not None:
        atomic_write(out / "captions.txt", lambda tmp: Path(tmp).write_text("\n".join(captions) + "\n"))
    print(f"{len(images)} samples in {seconds:.1f} s ({seconds / len(images) * 1000:.1f} ms/image) -> {npz}, {png}")
    return npz


if __name__ == "__main__":
    main()
