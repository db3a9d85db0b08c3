"""block.Attention against torch.nn.MultiheadAttention (the oracle) with the same weights, self and cross, with a
key padding mask."""
import pytest
import torch
import torch.nn as nn

from block import Attention


@pytest.mark.parametrize("cross", [False, True])
def test_attention_matches_torch_multihead_attention(cross):
    torch.manual_seed(0)
    width, H, B, S, S_ctx = 32, 4, 3, 5, 7
    ours = Attention(width, H, cross=cross)
    for p in ours.parameters():
        nn.init.normal_(p, std=0.2)  # non-zero biases too
    oracle = nn.MultiheadAttention(width, H, batch_first=True)
    with torch.no_grad():
        if cross:
            oracle.in_proj_weight.copy_(torch.cat([ours.q.weight, ours.kv.weight]))
            oracle.in_proj_bias.copy_(torch.cat([ours.q.bias, ours.kv.bias]))
        else:
            oracle.in_proj_weight.copy_(ours.qkv.weight)
            oracle.in_proj_bias.copy_(ours.qkv.bias)
        oracle.out_proj.weight.copy_(ours.proj.weight)
        oracle.out_proj.bias.copy_(ours.proj.bias)
    x = torch.randn(B, S, width)
    context = torch.randn(B, S_ctx, width) if cross else x
    mask = torch.ones(B, context.shape[1], dtype=torch.bool)
    mask[0, -2:] = False  # padded keys are ignored
    mask[2, 1:] = False
    got = ours(x, context if cross else None, mask)
    want = oracle(x, context, context, key_padding_mask=~mask, need_weights=False)[0]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
