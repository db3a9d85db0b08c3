"""The DiT generator over 1D TexTok tokens (§3.2 "Generation stage", §4.1, App. C).

Class-conditional generation uses the original DiT [32]: adaLN-Zero blocks, a sinusoidal timestep embedder, a label
embedder with a null class for classifier-free guidance and a final adaLN layer. TexTok tokens Z [B, N, d] are 1D, so
patch size 1 (App. C) is a linear projection of the d channels plus a fixed 1D sin-cos position embedding.

DiT-T2I (§4.1, after PixArt-α [5]) adds a multi-head cross-attention layer after the self-attention of every block,
attending to the frozen T5 embeddings [B, N_t, C] with their padding mask. Its conditioning vector c is the timestep
embedding alone (as PixArt-α); the caption enters only through cross-attention, and a learned null text is the
unconditional input for guidance.

The model predicts v (App. C: v-prediction), with no learned variance.
"""
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from huggingface_hub import ModelHubMixin

from block import Attention
from config import (AT_LEAST_1, POSITIVE, ConfigError, Range, check_config, check_divides, check_ranges, from_dict,
                    to_dict)
from runtime.errors import InputError
from runtime.files import load_json, load_state, load_tensors, save_json, save_tensors
from runtime.hub import pretrained_folder


@dataclass
class DiTConfig:
    """A DiT's architecture (the constructor's arguments), saved as `config.json`'s "dit" entry."""
    num_tokens: int = 128            # N TexTok tokens
    in_channels: int = 8             # d channels per token (App. C: N x 8)
    hidden_size: int = 1152          # DiT-XL
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    class_dropout_prob: float = 0.1  # DiT: label dropout for classifier-free guidance
    num_classes: int = 1000
    text_dim: int | None = None      # None: class-conditional DiT; C: DiT-T2I over C-channel text embeddings

    def __post_init__(self):
        """Refuses sizes no DiT has (a ConfigError naming the field), before any layer is built."""
        sizes = ("num_tokens", "in_channels", "hidden_size", "depth", "num_heads", "num_classes", "text_dim")
        check_ranges(self, {**dict.fromkeys(sizes, AT_LEAST_1), "mlp_ratio": POSITIVE,
                            "class_dropout_prob": Range(0, 1)})
        check_divides(self, "num_heads", "hidden_size")
        if self.hidden_size % 2:  # the sin-cos position embedding: half sines, half cosines
            raise ConfigError("DiTConfig", "hidden_size", f"must be even, got {self.hidden_size}")


def modulate(x, shift, scale):
    """adaLN: x * (1 + scale) + shift, with per-sample [B, hidden_size] shift and scale broadcast over the tokens."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def sincos_pos_embed(num_tokens: int, dim: int) -> torch.Tensor:
    """Fixed 1D sin-cos position embedding [num_tokens, dim] (DiT/MAE form: sines then cosines)."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    angles = torch.arange(num_tokens, dtype=torch.float64)[:, None] * omega[None]
    return torch.cat([angles.sin(), angles.cos()], dim=1).float()


class TimestepEmbedder(nn.Module):
    """Timestep t -> 256 sinusoidal frequencies -> two-layer SiLU MLP -> [B, hidden_size] (DiT)."""

    def __init__(self, hidden_size: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))

    def forward(self, t):
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t.float()[:, None] * freqs[None]
        return self.mlp(torch.cat([args.cos(), args.sin()], dim=-1))


class DiTBlock(nn.Module):
    """adaLN-Zero DiT block; with `cross_attn` a cross-attention layer (own LayerNorm) follows self-attention (§4.1)."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, cross_attn: bool = False):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads)
        self.norm_cross = nn.LayerNorm(hidden_size, eps=1e-6) if cross_attn else None
        self.cross_attn = Attention(hidden_size, num_heads, cross=True) if cross_attn else None
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        mlp_hidden = int(hidden_size * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(hidden_size, mlp_hidden), nn.GELU(approximate="tanh"),
                                 nn.Linear(mlp_hidden, hidden_size))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x, c, context=None, context_mask=None):
        """x: [B, N, D]; c: [B, D]; context: [B, N_t, D] with mask [B, N_t] (DiT-T2I only)."""
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        if self.cross_attn is not None:
            x = x + self.cross_attn(self.norm_cross(x), context, context_mask)
        return x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class FinalLayer(nn.Module):
    """Final adaLN (shift, scale) then a linear map back to the d token channels (DiT)."""

    def __init__(self, hidden_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class DiT(nn.Module, ModelHubMixin, library_name="textok", paper_url="https://arxiv.org/abs/2412.05796",
          tags=["diffusion-transformer", "textok"]):
    """DiT over N TexTok tokens of d channels (patch size 1, App. C); class-conditional, or DiT-T2I if `text_dim`.

    Holds the per-channel mean and std of the training latents (buffers `latent_mean`, `latent_std` [d]): it generates
    normalised tokens, and `denormalize` maps them back to the TexTok's Z. `meta` is what config.json holds beside the
    architecture (train.py's training config and tokenizer); `push_to_hub(repo_id)` comes from ModelHubMixin."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.cfg, width = cfg, cfg.hidden_size
        self.num_tokens, self.in_channels, self.text_dim = cfg.num_tokens, cfg.in_channels, cfg.text_dim
        self.num_classes, self.class_dropout_prob = cfg.num_classes, cfg.class_dropout_prob
        self.meta = {}
        self.register_buffer("latent_mean", torch.zeros(cfg.in_channels))
        self.register_buffer("latent_std", torch.ones(cfg.in_channels))
        self.x_embedder = nn.Linear(cfg.in_channels, width)  # patch size 1: one token in, one token out
        self.register_buffer("pos_embed", sincos_pos_embed(cfg.num_tokens, width)[None], persistent=False)
        self.t_embedder = TimestepEmbedder(width)
        if cfg.text_dim is None:
            # Row `num_classes` is the null class used for classifier-free guidance (DiT).
            self.y_embedder = nn.Embedding(cfg.num_classes + 1, width)
        else:
            # PixArt-α [5]: a two-layer GELU MLP projects the text embeddings to the DiT width.
            self.text_proj = nn.Sequential(nn.Linear(cfg.text_dim, width), nn.GELU(approximate="tanh"),
                                           nn.Linear(width, width))
            self.null_text = nn.Parameter(torch.randn(1, cfg.text_dim) / cfg.text_dim ** 0.5)  # one-token null caption
        self.blocks = nn.ModuleList([DiTBlock(width, cfg.num_heads, cfg.mlp_ratio, cross_attn=cfg.text_dim is not None)
                                     for _ in range(cfg.depth)])
        self.final_layer = FinalLayer(width, cfg.in_channels)
        self.initialize_weights()

    def initialize_weights(self):
        """DiT initialisation: xavier linears, N(0, 0.02) embedders, adaLN-Zero (zero modulation and output)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        if self.text_dim is None:
            nn.init.normal_(self.y_embedder.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
            if block.cross_attn is not None:  # PixArt-α [5]: cross-attention output starts at zero too
                nn.init.zeros_(block.cross_attn.proj.weight)
                nn.init.zeros_(block.cross_attn.proj.bias)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def _drop_ids(self, batch: int, device, force_drop_ids):
        """[B] bool: samples given the null condition (forced, or with prob. class_dropout_prob in training; all
        False at prob. 0, so the null condition stays in the graph: DDP sees the same used parameters every step)."""
        if force_drop_ids is not None:
            return force_drop_ids.to(device).bool()
        if self.training:
            if self.class_dropout_prob == 0:
                return torch.zeros(batch, dtype=torch.bool, device=device)
            return torch.rand(batch, device=device) < self.class_dropout_prob
        return None

    def _condition(self, B, device, cond, force_drop_ids):
        """The adaLN input's class part [B, hidden_size] (or 0 for T2I) and the cross-attention context and mask."""
        drop = self._drop_ids(B, device, force_drop_ids)
        if self.text_dim is None:
            label = None if cond is None else cond.label
            if label is None:
                raise ValueError("class-conditional DiT needs labels, Cond(label=[B])")
            if drop is not None:
                label = torch.where(drop, self.num_classes, label)
            return self.y_embedder(label), None, None
        text, text_mask = (None, None) if cond is None else (cond.text, cond.text_mask)
        if text is None or text_mask is None:
            raise ValueError("DiT-T2I needs Cond(text=[B, N_t, C], text_mask=[B, N_t])")
        if text.dim() != 3 or text.shape[-1] != self.text_dim or text_mask.shape != text.shape[:2]:
            raise ValueError(f"text {tuple(text.shape)} / text_mask {tuple(text_mask.shape)}: "
                             f"expected [B, N_t, {self.text_dim}] and [B, N_t]")
        text_mask = text_mask.bool()
        if drop is not None:
            # The null text: a one-token caption `null_text`, padded to N_t with masked-out positions.
            N_t = text.shape[1]
            null = F.pad(self.null_text.to(text.dtype), (0, 0, 0, N_t - 1)).expand_as(text)
            null_mask = torch.arange(N_t, device=device) == 0
            text = torch.where(drop[:, None, None], null, text)
            text_mask = torch.where(drop[:, None], null_mask, text_mask)
        # Each text_mask row needs a True token (else attention is NaN): checked once where captions become
        # conditions (conditions.Conditioned), never here, where it would be a host sync per DDIM step.
        return 0, self.text_proj(text), text_mask

    def forward(self, x, t, cond=None, force_drop_ids=None):
        """Predict v.

        x: [B, N, d] noisy tokens; t: [B] timesteps in [0, 1000); cond: the batch's conditions.Cond, read for its `label`
        [B] (class-conditional) or its frozen text embeddings `text` [B, N_t, C] with `text_mask` [B, N_t] bool,
        True = valid (DiT-T2I); force_drop_ids: [B] (1/True = use the null condition). Returns v: [B, N, d].
        """
        B, N, d = x.shape
        if (N, d) != (self.num_tokens, self.in_channels):
            raise ValueError(f"x {tuple(x.shape)}: expected [B, {self.num_tokens}, {self.in_channels}]")
        h = self.x_embedder(x) + self.pos_embed
        c_cond, context, context_mask = self._condition(B, x.device, cond, force_drop_ids)
        c = self.t_embedder(t) + c_cond
        for block in self.blocks:
            h = block(h, c, context, context_mask)
        return self.final_layer(h, c)

    def forward_with_cfg(self, x, t, scale, cond=None):
        """Classifier-free guidance (DiT §3.1): uncond + scale * (cond - uncond), both in one batched forward.

        scale: a float or a [B] tensor (e.g. diffusion.cfg_scale(t, w)). Returns guided v: [B, N, d].
        """
        B = x.shape[0]
        drop = torch.arange(2 * B, device=x.device) >= B  # first half conditional, second half null

        def twice(a):
            return None if a is None else torch.cat([a, a])

        cond2 = None if cond is None else type(cond)(*(twice(v) for v in cond))
        out = self.forward(twice(x), twice(t), cond2, force_drop_ids=drop)
        cond, uncond = out.chunk(2)
        if torch.is_tensor(scale):
            scale = scale.to(out.dtype).view(-1, 1, 1)
        return uncond + scale * (cond - uncond)


    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        """Generated (normalised) tokens [B, N, d] -> the TexTok's Z."""
        return x * self.latent_std + self.latent_mean

    def save_pretrained(self, directory, meta: dict | None = None, **hub) -> None:
        """Writes `model.safetensors` (weights and latent statistics), `config.json`: {"dit": this DiTConfig, **meta}
        (train.py's meta: the training config, the tokenizer and its config, the held-out data split; default: the
        model's own `meta`), and a model card; `hub` as ModelHubMixin.save_pretrained (push_to_hub, repo_id)."""
        if meta is not None:
            self.meta = meta
        super().save_pretrained(directory, **hub)

    def _save_pretrained(self, directory: Path) -> None:
        save_tensors(self.state_dict(), directory / "model.safetensors")
        save_json({"dit": to_dict(self.cfg), **self.meta}, directory / "config.json")

    @classmethod
    def from_pretrained(cls, name_or_path, tokenizer_config=None, map_location="cpu", **hub) -> "DiT":
        """Loads a `save_pretrained` folder or a Hugging Face repo id (`hub`: revision, cache_dir, local_files_only,
        token, as hf_hub_download) in eval mode, with its meta as `model.meta`. With `tokenizer_config` (a
        TexTokConfig), refuses a DiT trained over the tokens of another tokenizer config."""
        directory = pretrained_folder(name_or_path, **hub)
        meta = read_meta(directory)
        if tokenizer_config is not None:
            check_config(meta.get("tokenizer_config", {}), to_dict(tokenizer_config), directory / "config.json")
        model = cls(from_dict(DiTConfig, meta.pop("dit"), directory / "config.json"))
        load_state(model, load_tensors(directory / "model.safetensors"), directory / "model.safetensors")
        model.meta = meta
        return model.to(map_location).eval()


# What sampling reads from a DiT's config.json beside the DiT's own config (train.py writes them all).
SAMPLING_META = {"tokenizer": str, "task": str, "split": dict, "train": dict}
SPLIT = ("data", "val", "num_images", "captions")  # the DiT's training data, whose held-out part sampling reads


def read_meta(folder, sampling: bool = False) -> dict:
    """A DiT folder's config.json, checked: the DiT's config (what building it reads) and, with `sampling`, what
    sample.py reads: the tokenizer, the task (with its class count), the training data's split and training config."""
    path = Path(folder) / "config.json"
    meta = load_json(path)
    if not isinstance(meta, dict) or "dit" not in meta or (sampling and "tokenizer" not in meta):
        raise InputError(f"{path}: not a DiT folder written by train.py --stage dit")
    if not sampling:
        return meta
    for key, kind in SAMPLING_META.items():
        if key not in meta:
            raise InputError(f"{path}: no \"{key}\"; not a DiT folder written by train.py --stage dit")
        if not isinstance(meta[key], kind):
            raise InputError(f"{path}: \"{key}\" is {meta[key]!r}, not a {kind.__name__}")
    if meta["task"] not in ("class", "t2i"):
        raise InputError(f"{path}: \"task\" must be \"class\" or \"t2i\", got {meta['task']!r}")
    missing = [k for k in SPLIT if k not in meta["split"]]
    if missing:
        raise InputError(f"{path}: \"split\" has no {missing[0]!r} (the DiT's training data)")
    classes = meta.get("num_classes")
    if meta["task"] == "class" and (not isinstance(classes, int) or isinstance(classes, bool) or classes < 1):
        raise InputError(f"{path}: \"num_classes\" must be an integer >= 1, got {classes!r}")
    return meta


# Sizes as in the DiT paper (Table 1): depth / hidden size / heads. DiT-T is not in the paper: a CPU-sized model
# for the `tiny` preset.
DIT_SIZES = {"DiT-T": dict(depth=4, hidden_size=192, num_heads=3),
             "DiT-S": dict(depth=12, hidden_size=384, num_heads=6),
             "DiT-B": dict(depth=12, hidden_size=768, num_heads=12),
             "DiT-L": dict(depth=24, hidden_size=1024, num_heads=16),
             "DiT-XL": dict(depth=28, hidden_size=1152, num_heads=16)}


def build_dit(name: str, class_dropout: float, tok_cfg, task: str, num_classes: int, latent_mean=None,
              latent_std=None) -> DiT:
    """The stage-2 generator over a TexTok's tokens: DiT `name` (DIT_SIZES) for task "class", DiT-T2I for "t2i",
    patch size 1; with the training latents' per-channel statistics when given."""
    model = DiT(DiTConfig(num_tokens=tok_cfg.num_tokens, in_channels=tok_cfg.token_dim, class_dropout_prob=class_dropout,
                          num_classes=num_classes, text_dim=tok_cfg.text_dim if task == "t2i" else None,
                          **DIT_SIZES[name]))
    if latent_mean is not None:
        model.latent_mean.copy_(latent_mean)
        model.latent_std.copy_(latent_std)
    return model
