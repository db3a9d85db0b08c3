"""A batch's condition (§3.2) and the caption's one path to it: `Conditioned` gives each image its class label and
its caption's frozen embeddings (the input of T = Linear(embeddings)), from the on-disk store or encoded on the fly."""
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch.utils.data import Dataset, default_collate

from runtime.errors import InputError
from runtime.files import writing
from text_encoder import TextEncoder, cached_text_embeddings


class OnTheFly(NamedTuple):
    """The frozen text encoder that runs on each batch (text_cache "off"): its name, text length, device, autocast
    precision, and whether a hub encoder missing from the local cache may be fetched."""
    encoder: str
    text_len: int
    device: str
    precision: str
    download: bool


class Cond(NamedTuple):
    """The condition of one image or a batch (§3.2), the one object TexTok, the latent cache, DiT and sample.py read:
    the frozen encoder's caption embeddings `text` [B, N_t, C] (float32, from the fp16 cache) with their padding mask
    `text_mask` [B, N_t] (True = real token), and the class `label` [B] (long). Fields nobody reads are None."""
    text: torch.Tensor | None = None
    text_mask: torch.Tensor | None = None
    label: torch.Tensor | None = None

    def to(self, device, non_blocking: bool = False) -> "Cond":
        return Cond(*(None if v is None else v.to(device, non_blocking=non_blocking) for v in self))

    def part(self, index) -> "Cond":
        """The rows `index` (a slice or index tensor) of a batch's condition."""
        return Cond(*(None if v is None else v[index] for v in self))

    @staticmethod
    def stack(conds) -> "Cond":
        """One batch from per-item conditions."""
        return Cond(*(None if v[0] is None else torch.stack(v) for v in zip(*conds)))


def first_empty_row(mask, chunk: int = 65536):
    """The index of the first row of a text mask store (`rowstore.NpyRows` [M, N_t]) with no real token, or None; read
    a chunk at a time, so memory does not grow with M."""
    for start in range(0, len(mask), chunk):
        empty = np.flatnonzero(~mask.read(start, min(start + chunk, len(mask))).any(axis=1))
        if len(empty):
            return start + int(empty[0])
    return None


class Conditioned(Dataset):
    """Each item of `items` with its condition (§3.2; `condition(i)`, a Cond): the class label, and with `text_encoder`
    the caption's frozen embeddings, which the model projects to T. The one path from a caption to T, with two ways to get the
    embeddings:
      - the on-disk store (text_cache "on"): `text_encoder.cached_text_embeddings`, fp16, built once by the `world`
        ranks together, read a row per item (in the loader's workers);
      - on the fly (text_cache "off"): the frozen encoder runs on each batch in this process, in `complete(batch)`.
    Both give float32 rounded through fp16. `items`: a data set of dicts ({"image", "index"}; stage 2's latent rows,
    `latents.Latents`: {"Z", "index"}), or None (the conditions alone). `complete(batch)` must see every batch (a no-op
    with the store); `batch(indices)` is the completed `Cond` of those items."""

    def __init__(self, items, captions, labels, text_encoder=None, text_len: int = 128, cache_dir="cache",
                 device="cpu", text_cache: str = "on", precision: str = "auto", rank: int = 0, world: int = 1,
                 download: bool = False):
        self.items, self.captions, self.labels = items, captions, labels
        self.label_tensor = torch.as_tensor(labels, dtype=torch.long)  # data.py refuses a label past int64
        self.emb = self.mask = self.on_the_fly = self.encoder = None
        if text_encoder is not None and text_cache == "off":
            self.on_the_fly = OnTheFly(text_encoder, text_len, device, precision, download)
        elif text_encoder is not None:
            store = Path(cache_dir) / "text"
            with writing(store, " (--cache-dir must be a writable folder)"):
                self.emb, self.mask = cached_text_embeddings(text_encoder, text_len, captions, store, device=device,
                                                             progress=True, rank=rank, world=world, download=download)
            empty = first_empty_row(self.mask)  # DiT's attention needs one real token per caption
            if empty is not None:
                raise InputError(f"{cache_dir}/text: caption {empty} has no text token in its mask "
                                 f"({captions[empty]!r}); delete the cache to recompute it")

    @classmethod
    def for_model(cls, dataset, cfg, cache_dir="cache", device="cpu", text_cache: str = "on", precision: str = "auto",
                  rank: int = 0, world: int = 1, download: bool = False) -> "Conditioned":
        """`dataset` with the conditions a TexTok of config `cfg` reads: caption embeddings (when `cfg.conditioning`
        is "text") and labels. With `world` ranks, all must call it (they build the embedding store together).
        `download`: a hub encoder not in the local cache is fetched (else refused)."""
        encoder = cfg.text_encoder if cfg.conditioning == "text" else None
        return cls(dataset, dataset.captions, dataset.labels, encoder, cfg.text_len, cache_dir, device, text_cache,
                   precision, rank, world, download)

    def __len__(self):
        return len(self.labels)

    def __getstate__(self):  # DataLoader workers (spawned) never run the on-the-fly encoder
        return {**self.__dict__, "encoder": None}

    def condition(self, i) -> Cond:
        """Item i's condition: its label, and its caption's embeddings when they come from the store."""
        if self.emb is None:  # no text, or text encoded later (`complete`)
            return Cond(label=self.label_tensor[i])
        emb = self.emb[i]
        if not np.isfinite(emb).all():  # checked as read: never a pass over the whole store at launch
            raise InputError(f"{self.emb.path}: row {i} holds non-finite values; delete {self.emb.path.parent} to "
                             "recompute it")
        return Cond(torch.from_numpy(emb.astype(np.float32)), torch.from_numpy(self.mask[i]), self.label_tensor[i])

    def __getitem__(self, i) -> dict:
        cond = self.condition(i)
        if self.items is None:
            return {"cond": cond, "index": i}
        return {**self.items[i], "cond": cond}

    def complete(self, batch: dict) -> dict:
        """`batch` (collated items, with their "index") with its condition complete: as it is when the embeddings
        came from the store; with text_cache "off", the captions encoded now (the frozen encoder on `device`, bf16
        autocast on CUDA with precision "auto")."""
        if self.on_the_fly is None:
            return batch
        how = self.on_the_fly
        if self.encoder is None:
            self.encoder = TextEncoder(how.encoder, how.text_len, how.device, how.download)
        emb, mask = self.encoder([self.captions[int(i)] for i in batch["index"]], how.precision)
        return {**batch, "cond": Cond(emb.half().float(), mask, batch["cond"].label)}  # fp16-rounded, as the store

    def batch(self, indices) -> Cond:
        """The completed condition of the items `indices`."""
        return self.complete({"cond": Cond.stack([self.condition(int(i)) for i in indices]),
                              "index": torch.as_tensor(list(indices))})["cond"]


def collate(items: list) -> dict:
    """Batches items {name: tensor or int, ..., "cond": Cond}: tensors stacked, conditions into one batch `Cond`."""
    return {k: Cond.stack([it[k] for it in items]) if k == "cond" else default_collate([it[k] for it in items])
            for k in items[0]}
