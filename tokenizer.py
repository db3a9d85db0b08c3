"""TexTok tokenizer E (§3.2, Fig. 2): image patches P, learnable image tokens L and text tokens T go through one
ViT; the outputs at L are projected to the image tokens Z in R^{N x d}. Also the optional vector quantizer (App. A).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from block import ViT, Conditioner, init_tokens, init_weights
from config import TexTokConfig


def patchify(images: torch.Tensor, s: int) -> torch.Tensor:
    """[B, 3, H, W] -> [B, hw, 3 s s] with h = H / s, w = W / s, patches in raster order."""
    B, C, H, W = images.shape
    x = images.reshape(B, C, H // s, s, W // s, s)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(B, (H // s) * (W // s), C * s * s)


def unpatchify(x: torch.Tensor, s: int, channels: int = 3) -> torch.Tensor:
    """Inverse of `patchify`: [B, hw, 3 s s] -> [B, 3, H, W] for a square grid."""
    B, hw, _ = x.shape
    h = int(round(hw ** 0.5))
    x = x.reshape(B, h, h, channels, s, s).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(B, channels, h * s, h * s)


class Tokenizer(nn.Module):
    """E: image [B, 3, H, W] in [-1, 1] (+ condition) -> Z [B, N, d] (§3.2, Tokenization stage)."""

    def __init__(self, cfg: TexTokConfig):
        super().__init__()
        self.cfg = cfg
        width, s = cfg.width, cfg.patch_size
        self.patch_embed = nn.Linear(3 * s * s, width)                       # P: patchify + linear projection
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.grid ** 2, width))  # P: learned position embedding
        self.L = nn.Parameter(torch.zeros(1, cfg.num_tokens, width))         # L: N learnable image tokens
        self.cond = Conditioner(cfg) if cfg.conditions("tokenizer") else None  # T: projected text tokens
        self.vit = ViT(cfg, cfg.enc_layers, conditioned=self.cond is not None)
        self.to_Z = nn.Linear(width, cfg.token_dim)                          # outputs at L -> Z in R^{N x d}
        init_weights(self)
        init_tokens(self.pos_embed, self.L)

    def check_images(self, images: torch.Tensor) -> None:
        """Raises a ValueError naming the problem when `images` is not [B, 3, image_size, image_size]."""
        size = self.cfg.image_size
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images [B, 3, H, W] (RGB, NCHW), got shape {tuple(images.shape)}")
        if images.shape[2] % self.cfg.patch_size or images.shape[3] % self.cfg.patch_size:
            raise ValueError(f"image size {tuple(images.shape[2:])} is not divisible by the patch size "
                             f"{self.cfg.patch_size}")
        if tuple(images.shape[2:]) != (size, size):
            raise ValueError(f"expected {size}x{size} images for this config, got {tuple(images.shape[2:])}")

    def forward(self, images, cond=None) -> torch.Tensor:
        """images: [B, 3, H, W]; cond: the batch's conditions.Cond (caption embeddings or labels). Returns Z [B, N, d]."""
        self.check_images(images)
        P = self.patch_embed(patchify(images, self.cfg.patch_size)) + self.pos_embed
        L = self.L.expand(P.shape[0], -1, -1)
        T, T_mask = self.cond(cond) if self.cond is not None else (None, None)
        x = self.vit(torch.cat([P, L], dim=1), T, T_mask)  # in-context: ViT([P, L, T]); Tab. 4c: [P, L] attending to T
        return self.to_Z(x[:, P.shape[1]:])       # outputs at L -> Z


class VectorQuantizer(nn.Module):
    """VQ bottleneck on Z for the discrete variant (App. A): nearest of `codebook_size` codes, straight-through
    gradient, loss = ||sg[z] - e||^2 + beta ||z - sg[e]||^2 (VQ-VAE)."""

    def __init__(self, codebook_size: int, dim: int, commitment: float):
        super().__init__()
        self.commitment = commitment
        self.codebook = nn.Embedding(codebook_size, dim)
        nn.init.uniform_(self.codebook.weight, -1.0 / codebook_size, 1.0 / codebook_size)

    def forward(self, z: torch.Tensor):
        """z: [B, N, d] -> (z_q [B, N, d] with straight-through gradient, indices [B, N], loss scalar)."""
        flat = z.float().reshape(-1, z.shape[-1])
        codes = self.codebook.weight.float()
        dist = flat.pow(2).sum(1, keepdim=True) - 2 * flat @ codes.t() + codes.pow(2).sum(1)[None]
        indices = dist.argmin(1).view(z.shape[:-1])
        e = self.codebook(indices).to(z.dtype)
        loss = F.mse_loss(e, z.detach()) + self.commitment * F.mse_loss(z, e.detach())
        return z + (e - z).detach(), indices, loss

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        """indices [B, N] -> codes [B, N, d]."""
        return self.codebook(indices)
