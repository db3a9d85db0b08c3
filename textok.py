"""TexTok: tokenizer E + optional VQ (App. A) + detokenizer D, with the public API
`encode(images, text) -> Z`, `decode(Z, text) -> images`, `save_pretrained(dir)` / `from_pretrained(dir or hub repo
id)` / `push_to_hub(repo_id)` (huggingface_hub's ModelHubMixin; the folder holds config.json + model.safetensors).

Images are float tensors in [-1, 1], NCHW. `cond` is the batch's condition, a `conditions.Cond`: the frozen encoder's
caption embeddings `text` [B, N_t, C] with their padding mask `text_mask` [B, N_t] (True = real token), computed
once per caption and cached (conditions.Conditioned), or the class `label` [B] (Tab. 4a). The Baseline needs none.
"""
from pathlib import Path

import torch
import torch.nn as nn
from huggingface_hub import ModelHubMixin

from config import TexTokConfig, from_dict, to_dict
from detokenizer import Detokenizer
from runtime.errors import InputError
from runtime.files import load_json, load_state, load_tensors, save_json, save_tensors
from runtime.hub import pretrained_folder
from tokenizer import Tokenizer, VectorQuantizer


class TexTok(nn.Module, ModelHubMixin, library_name="textok", paper_url="https://arxiv.org/abs/2412.05796",
             tags=["image-tokenizer", "textok"]):
    """Text-conditioned image tokenizer (§3.2, Fig. 2)."""

    def __init__(self, cfg: TexTokConfig):
        super().__init__()
        self.cfg = cfg
        self.tokenizer = Tokenizer(cfg)
        self.quantizer = VectorQuantizer(cfg.codebook_size, cfg.token_dim, cfg.commitment) if cfg.vq else None
        self.detokenizer = Detokenizer(cfg)

    def quantize(self, Z: torch.Tensor):
        """(Z_q, indices, vq_loss) for the VQ variant; (Z, None, 0) for continuous tokens."""
        if self.quantizer is None:
            return Z, None, Z.new_zeros(())
        return self.quantizer(Z)

    def encode(self, images, cond=None) -> torch.Tensor:
        """images [B, 3, H, W] in [-1, 1] -> image tokens Z [B, N, d] (quantized for the VQ variant)."""
        return self.quantize(self.tokenizer(images, cond))[0]

    def decode(self, Z, cond=None) -> torch.Tensor:
        """Z [B, N, d] -> images [B, 3, H, W], guided by the same condition as the tokenizer."""
        return self.detokenizer(Z, cond)

    def forward(self, images, cond=None):
        """Reconstruction for training: returns (images_hat, Z, vq_loss)."""
        Z, _, vq_loss = self.quantize(self.tokenizer(images, cond))
        return self.decode(Z, cond), Z, vq_loss

    def _save_pretrained(self, directory: Path) -> None:
        """Writes `config.json` and `model.safetensors` (each atomically); ModelHubMixin's `save_pretrained(dir)` and
        `push_to_hub(repo_id)` call it and add a model card (README.md)."""
        save_tensors(self.state_dict(), directory / "model.safetensors")
        save_json(to_dict(self.cfg), directory / "config.json")

    @classmethod
    def from_pretrained(cls, name_or_path, text_encoder: str | None = None, map_location="cpu", **hub) -> "TexTok":
        """Loads a `save_pretrained` folder or a Hugging Face repo id (`hub`: revision, cache_dir, local_files_only,
        token, as hf_hub_download). With `text_encoder`, refuses weights trained with another encoder."""
        directory = pretrained_folder(name_or_path, **hub)
        cfg = from_dict(TexTokConfig, load_json(directory / "config.json"), directory / "config.json")
        if text_encoder is not None and cfg.conditioning == "text" and cfg.text_encoder != text_encoder:
            raise InputError(f"{directory}: this TexTok was trained with text encoder {cfg.text_encoder!r}, "
                             f"not {text_encoder!r}; text embeddings of another encoder do not fit it")
        model = cls(cfg)
        load_state(model, load_tensors(directory / "model.safetensors"), directory / "model.safetensors")
        return model.to(map_location)

