"""The ViT pieces shared by the tokenizer and the detokenizer (§3.2, Fig. 2).

One pre-norm transformer block with a switch for how the caption enters (Tab. 4c): in-context, where the text
tokens are simply part of the sequence, or an extra cross-attention layer after self-attention in every block.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F


def key_mask(mask: torch.Tensor | None) -> torch.Tensor | None:
    """[B, S] bool (True = real token) -> [B, 1, 1, S] attention mask for scaled_dot_product_attention."""
    return None if mask is None else mask[:, None, None, :]


class Attention(nn.Module):
    """Multi-head attention. Self-attention (one fused qkv projection, as ViT and DiT) unless `cross`, where the
    queries come from x and the keys and values from `context` (Tab. 4c)."""

    def __init__(self, dim: int, heads: int, cross: bool = False):
        super().__init__()
        self.heads = heads
        self.qkv = None if cross else nn.Linear(dim, 3 * dim)
        self.q = nn.Linear(dim, dim) if cross else None
        self.kv = nn.Linear(dim, 2 * dim) if cross else None
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, context=None, mask=None):
        """x: [B, S, width]; context: [B, S', width] (cross-attention only); mask: [B, S'] bool over the keys
        (True = attend)."""
        B, S, width = x.shape
        if self.qkv is not None:
            q, k, v = self.qkv(x).view(B, S, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        else:
            q = self.q(x).view(B, S, self.heads, -1).transpose(1, 2)
            k, v = self.kv(context).view(B, context.shape[1], 2, self.heads, -1).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask(mask))
        return self.proj(out.transpose(1, 2).reshape(B, S, width))


class Block(nn.Module):
    """Pre-LN ViT block; with `cross=True` a cross-attention layer follows self-attention (Tab. 4c)."""

    def __init__(self, dim: int, heads: int, mlp_dim: int, cross: bool = False):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.cross = Attention(dim, heads, cross=True) if cross else None
        self.norm_cross = nn.LayerNorm(dim) if cross else None
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_dim), nn.GELU(), nn.Linear(mlp_dim, dim))

    def forward(self, x, mask=None, context=None, context_mask=None):
        """x: [B, S, width] with key mask [B, S]; context: [B, N_t, width] with mask [B, N_t] (cross-attention
        only)."""
        x = x + self.attn(self.norm1(x), mask=mask)
        if self.cross is not None and context is not None:
            x = x + self.cross(self.norm_cross(x), context, context_mask)
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    """The ViT of the tokenizer or the detokenizer: `depth` blocks and a final LayerNorm, owning how the condition
    enters (Tab. 4c). `forward(x, T, T_mask)` returns the outputs at x's positions:
    - in-context (§3.2): the sequence is [x, T] and padded text keys are masked out;
    - cross-attention (Tab. 4c): the sequence is x alone and every block attends to T."""

    def __init__(self, cfg, depth: int, conditioned: bool):
        super().__init__()
        self.in_context = cfg.cond_arch == "in-context"
        cross = conditioned and not self.in_context
        self.blocks = nn.ModuleList(Block(cfg.width, cfg.heads, cfg.mlp_dim, cross) for _ in range(depth))
        self.norm = nn.LayerNorm(cfg.width)

    def forward(self, x: torch.Tensor, T=None, T_mask=None) -> torch.Tensor:
        """x: [B, S, width]; text tokens T [B, N_t, width] with T_mask [B, N_t] from a `Conditioner`, or None.
        Returns [B, S, width]."""
        mask = context = context_mask = None
        S = x.shape[1]
        if T is not None and self.in_context:
            mask = torch.cat([torch.ones(x.shape[:2], dtype=torch.bool, device=x.device), T_mask], dim=1)
            x = torch.cat([x, T.to(x.dtype)], dim=1)
        elif T is not None:
            context, context_mask = T, T_mask
        for block in self.blocks:
            x = block(x, mask, context, context_mask)
        return self.norm(x[:, :S])


class Conditioner(nn.Module):
    """Turns a batch's condition (conditions.Cond) into tokens of the model's width: `T = Linear(text embeddings)` (§3.2)
    or a learnable class embedding (Tab. 4a), returned as (T, T_mask) with T_mask [B, N_t] (True = real token)."""

    def __init__(self, cfg):
        super().__init__()
        self.kind = cfg.conditioning
        self.proj = (nn.Linear(cfg.text_dim, cfg.width) if self.kind == "text"
                     else nn.Embedding(cfg.num_classes, cfg.width))

    def forward(self, cond):
        """cond: a conditions.Cond with `text` [B, N_t, C] + `text_mask` [B, N_t] (text) or `label` [B] (class)."""
        if self.kind == "text":
            if cond is None or cond.text is None:
                raise ValueError("this TexTok is text-conditioned: pass text embeddings, Cond(text=[B, N_t, C], "
                                 "text_mask=[B, N_t])")
            mask = cond.text_mask
            if mask is None:
                mask = torch.ones(cond.text.shape[:2], dtype=torch.bool, device=cond.text.device)
            return self.proj(cond.text), mask.bool()
        if cond is None or cond.label is None:
            raise ValueError("this TexTok is class-conditioned: pass Cond(label=[B])")
        T = self.proj(cond.label)[:, None]
        return T, torch.ones(T.shape[:2], dtype=torch.bool, device=T.device)


def init_tokens(*params: nn.Parameter) -> None:
    """N(0, 0.5) for the learned position embeddings and learnable tokens (P's position, L, P', Z's position).

    The paper does not state it. Unit-order scale (like MAE's fixed sin-cos embeddings) keeps these identity signals
    as large as a patch embedding, so each decoder query P' starts out distinct (measured: docs/RESULTS.md §8)."""
    for p in params:
        nn.init.normal_(p, std=0.5)


def init_weights(module: nn.Module) -> None:
    """Xavier-uniform linear weights (as MAE and DiT), N(0, 0.02) embeddings, zero biases, unit LayerNorms.

    The paper does not state its initialisation. Xavier scales with the width: at the paper's width 768 it is close
    to ViT's truncated-normal(0.02), and at small widths it keeps the attention from starting uniform (docs/RESULTS.md
    §8)."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.trunc_normal_(m.weight, std=0.02)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
