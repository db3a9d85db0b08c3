"""Stage 2's input (§3.2, App. C): the frozen tokenizer's tokens Z of every training image, encoded once into a
row store that all ranks fill and read."""
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from conditions import collate
from runtime.distributed import autocast, rank_share
from runtime.files import writing
from runtime.rowstore import build_once
from textok import TexTok


@torch.no_grad()
def encode_latents(tokenizer: TexTok, dataset, device, precision, cache: Path, batch_size: int = 64, rank: int = 0,
                   world: int = 1, workers: int = 0) -> torch.Tensor:
    """Encodes the whole data set (a `Conditioned`) once with the frozen (EMA) tokenizer: Z [M, N, d] float32, cached
    in the folder `cache` (Z.npy). Every rank (all must call it) encodes a contiguous share of the batches through a
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
            batch = dataset.complete(batch)  # --text-cache off: the captions encoded here
            with autocast(device, precision):
                Z = tokenizer.encode(batch["image"].to(device), batch["cond"].to(device)).float().cpu()
            files["Z"].write(at, Z.numpy())
            at += len(Z)
    with writing(cache.parent, " (--cache-dir must be a writable folder)"):
        folder = build_once(cache, {"Z": ((M, cfg.num_tokens, cfg.token_dim), np.float32)}, fill, rank, world,
                            f"latents Z ({M:,} x {cfg.num_tokens} x {cfg.token_dim}, float32)")
    return torch.from_numpy(np.load(folder / "Z.npy"))
