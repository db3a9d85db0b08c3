"""TexTok detokenizer D (§3.2, Fig. 2): hw learnable patch tokens P', the image tokens projected to Z' and the
text tokens projected to T' go through one ViT; the outputs at P' are projected to pixels and unpatchified.
"""
import torch
import torch.nn as nn

from block import ViT, Conditioner, init_tokens, init_weights
from config import TexTokConfig
from tokenizer import unpatchify


class Detokenizer(nn.Module):
    """D: Z [B, N, d] (+ condition) -> image [B, 3, H, W] in about [-1, 1] (§3.2)."""

    def __init__(self, cfg: TexTokConfig):
        super().__init__()
        self.cfg = cfg
        width, s = cfg.width, cfg.patch_size
        self.P_prime = nn.Parameter(torch.zeros(1, cfg.grid ** 2, width))  # P': hw learnable patch tokens
        self.z_proj = nn.Linear(cfg.token_dim, width)                      # Z': linearly projected image tokens
        self.z_pos = nn.Parameter(torch.zeros(1, cfg.num_tokens, width))   # position of each of the N tokens in Z'
        self.cond = Conditioner(cfg) if cfg.conditions("detokenizer") else None  # T': projected from the same text
        self.vit = ViT(cfg, cfg.dec_layers, conditioned=self.cond is not None)
        self.to_pixels = nn.Linear(width, 3 * s * s)                        # outputs at P' -> pixel patches
        init_weights(self)
        init_tokens(self.P_prime, self.z_pos)

    def forward(self, Z, cond=None) -> torch.Tensor:
        """Z: [B, N, d]; cond: the batch's conditions.Cond (caption embeddings or labels). Returns images [B, 3, H, W]."""
        if Z.ndim != 3 or Z.shape[1:] != (self.cfg.num_tokens, self.cfg.token_dim):
            raise ValueError(f"expected Z [B, {self.cfg.num_tokens}, {self.cfg.token_dim}], got {tuple(Z.shape)}")
        P_prime = self.P_prime.expand(Z.shape[0], -1, -1)
        Z_prime = self.z_proj(Z) + self.z_pos
        T_prime, T_mask = self.cond(cond) if self.cond is not None else (None, None)
        x = self.vit(torch.cat([P_prime, Z_prime], dim=1), T_prime, T_mask)  # in-context: ViT([P', Z', T'])
        return unpatchify(self.to_pixels(x[:, : P_prime.shape[1]]), self.cfg.patch_size)  # outputs at P' -> pixels
