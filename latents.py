"""Stage 2's input (§3.2, App. C): the frozen tokenizer's tokens Z of every training image, encoded once into a
row store that all ranks fill and read a row at a time (`Latents`), normalised per channel by statistics computed in
one streaming pass (`latent_stats`): a rank's memory does not grow with the number of images M."""
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from conditions import collate
from runtime.distributed import autocast, rank_share
from runtime.files import writing
from runtime.rowstore import NpyRows, build_once
from textok import TexTok


@torch.no_grad()
def encode_latents(tokenizer: TexTok, dataset, device, precision, cache: Path, batch_size: int = 64, rank: int = 0,
                   world: int = 1, workers: int = 0) -> NpyRows:
    """Encodes the whole data set (a `Conditioned`) once with the frozen (EMA) tokenizer: Z [M, N, d] float32, cached
    in the folder `cache` (Z.npy), returned as its row reader (nothing read yet). Every rank (all must call it)
    encodes a contiguous share of the batches through a DataLoader with `workers` and writes it into the one file;
    the batches are one rank's, so Z does not depend on the number of ranks."""
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
    return NpyRows(folder / "Z.npy")


def latent_stats(Z: NpyRows, rank: int = 0, world: int = 1, chunk_values: int = 2 ** 20):
    """Per-channel mean and standard deviation (unbiased) of Z [M, N, d] over its M x N tokens, float32 [d] each, in
    one streaming pass: chunks of rows holding about `chunk_values` values (fixed by Z's shape, whatever the ranks),
    each chunk's count, mean and sum of squared deviations in float64, merged in chunk order (Chan et al.'s pairwise
    update). With `world` ranks (all must call it) each reads a contiguous share of the chunks and all gather the
    per-chunk results, so every rank gets the same bits as one rank alone; memory: one chunk (8 MiB in float64)."""
    M, d = len(Z), Z.shape[-1]
    chunk_rows = max(1, chunk_values // (Z.row_bytes // Z.dtype.itemsize))
    chunks = -(-M // chunk_rows)
    mine = rank_share(chunks, rank, world)
    parts = []
    for c in range(mine.start, mine.stop):
        x = Z.read(c * chunk_rows, min((c + 1) * chunk_rows, M)).reshape(-1, d).astype(np.float64)
        mean = x.mean(axis=0)
        parts.append((len(x), mean, ((x - mean) ** 2).sum(axis=0)))
    if world > 1:
        gathered = [None] * world
        dist.all_gather_object(gathered, parts)
        parts = [p for part in gathered for p in part]
    n, mean, m2 = 0, np.zeros(d), np.zeros(d)
    for k, mean_k, m2_k in parts:  # chunk order
        delta, total = mean_k - mean, n + k
        mean, m2, n = mean + delta * (k / total), m2 + m2_k + delta ** 2 * (n * k / total), total
    std = np.sqrt(m2 / (n - 1)) if n > 1 else np.full(d, np.nan)  # torch's unbiased std of one value: nan
    return torch.from_numpy(mean).float(), torch.from_numpy(std).float()


class Latents:
    """Stage 2's training items: row i of the latent cache Z (`NpyRows`, read with pread when asked) normalised per
    channel, (Z_i - mean) / std in float32, as {"Z": [N, d], "index": i}; picklable for DataLoader workers."""

    def __init__(self, Z: NpyRows, mean: torch.Tensor, std: torch.Tensor):
        self.Z, self.mean, self.std = Z, mean, std

    def __len__(self):
        return len(self.Z)

    def __getitem__(self, i) -> dict:
        return {"Z": (torch.from_numpy(self.Z[i]) - self.mean) / self.std, "index": i}
