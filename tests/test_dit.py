"""Tests for dit.py: sizes (DiT Table 1), adaLN-Zero init, conditioning, CFG, bf16, and a tiny-DiT overfit."""

import numpy as np
import pytest
import torch

import conditions
from conditions import Cond
from diffusion import Diffusion
from dit import DIT_SIZES, DiT, DiTConfig
from runtime.errors import InputError
from runtime.rowstore import NpyRows


N, CHANNELS, CLASSES, TEXT_DIM = 8, 8, 10, 16


def _num_params(module):
    return sum(p.numel() for p in module.parameters())


def _tiny(text_dim=None, **kwargs):
    return DiT(DiTConfig(num_tokens=N, in_channels=CHANNELS, hidden_size=64, depth=2, num_heads=4, num_classes=CLASSES,
                         text_dim=text_dim, **kwargs))


def _randomised(model):
    """The model with every parameter perturbed, so that zero-initialised paths carry signal."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def _text(B=3, N_t=5):
    text = torch.randn(B, N_t, TEXT_DIM)
    mask = torch.arange(N_t)[None] < torch.tensor([5, 3, 1])[:B, None]  # varying caption lengths
    return text, mask


def test_dit_sizes_match_the_dit_paper():
    with torch.device("meta"):
        sizes = {name: _num_params(DiT(DiTConfig(num_tokens=32, **DIT_SIZES[name]))) for name in ("DiT-S", "DiT-B", "DiT-L", "DiT-XL")}
    # DiT Table 1 (§4.4 / Tab. 2 of TexTok: DiT-XL 675M); over 32 tokens x 8 channels, 1000 classes, patch size 1.
    for name, paper in {"DiT-S": 33e6, "DiT-B": 130e6, "DiT-L": 458e6, "DiT-XL": 675e6}.items():
        assert abs(sizes[name] - paper) / paper < 0.01, (name, sizes[name])


def test_t2i_adds_cross_attention_and_no_label_table():
    cc, t2i = _tiny(), _tiny(text_dim=TEXT_DIM)
    hidden = 64
    cross = 2 * (4 * hidden * hidden + 4 * hidden + 2 * hidden)  # q, kv, proj + LayerNorm, per block
    text = TEXT_DIM * hidden + hidden + hidden * hidden + hidden + TEXT_DIM  # text_proj MLP + null_text
    assert _num_params(t2i) == _num_params(cc) - (CLASSES + 1) * hidden + cross + text


@pytest.mark.parametrize("text_dim", [None, TEXT_DIM])
def test_output_shape_and_zero_init(text_dim):
    torch.manual_seed(0)
    model = _tiny(text_dim).eval()
    x, t = torch.randn(3, N, CHANNELS), torch.tensor([0, 500, 999])
    text, mask = _text()
    kwargs = {"cond": Cond(label=torch.tensor([0, 1, 9])) if text_dim is None else Cond(text, mask)}
    out = model(x, t, **kwargs)
    assert out.shape == (3, N, CHANNELS)
    assert torch.equal(out, torch.zeros_like(out))  # adaLN-Zero: zero modulation and zero output layer
    out = _randomised(model)(x, t, **kwargs)
    assert out.abs().mean() > 1e-3


def test_bad_shapes_raise():
    model = _tiny().eval()
    with pytest.raises(ValueError, match="expected"):
        model(torch.randn(2, N + 1, CHANNELS), torch.zeros(2, dtype=torch.long),
              Cond(label=torch.zeros(2, dtype=torch.long)))
    with pytest.raises(ValueError, match="labels"):
        model(torch.randn(2, N, CHANNELS), torch.zeros(2, dtype=torch.long))


def test_a_caption_without_text_tokens_is_refused_where_conditions_are_built(tmp_path, monkeypatch):
    # DiT reads no mask on the host (a sync per DDIM step): conditions.Conditioned checks every row has a real token.
    mask = np.array([[True, True, False], [False, False, False]])

    def store(*args, **kwargs):  # the on-disk store's two files
        np.save(tmp_path / "emb.npy", np.zeros((2, 3, 4), np.float16))
        np.save(tmp_path / "mask.npy", mask)
        return NpyRows(tmp_path / "emb.npy"), NpyRows(tmp_path / "mask.npy")
    monkeypatch.setattr(conditions, "cached_text_embeddings", store)
    with pytest.raises(InputError, match=r"caption 1 has no text token in its mask \('b'\)"):
        conditions.Conditioned(None, ["a", "b"], [0, 0], "encoder", 3, tmp_path)
    mask[1, 0] = True
    assert conditions.Conditioned(None, ["a", "b"], [0, 0], "encoder", 3, tmp_path).condition(1).text_mask.tolist() == [True, False, False]


def test_cross_attention_ignores_padded_text():
    model = _randomised(_tiny(TEXT_DIM))
    x, t = torch.randn(3, N, CHANNELS), torch.tensor([3, 400, 900])
    text, mask = _text()
    noisy = torch.where(mask[..., None], text, torch.randn_like(text) * 100)
    torch.testing.assert_close(model(x, t, Cond(text, mask)), model(x, t, Cond(noisy, mask)))
    assert not torch.allclose(model(x, t, Cond(text, mask)), model(x, t, Cond(noisy, mask | True)))


def test_null_condition_and_label_dropout():
    model = _randomised(_tiny(class_dropout_prob=1.0))
    x, t, y = torch.randn(3, N, CHANNELS), torch.tensor([10, 20, 30]), torch.tensor([1, 2, 3])
    null = model(x, t, Cond(label=torch.full((3,), CLASSES)))
    torch.testing.assert_close(model(x, t, Cond(label=y), force_drop_ids=torch.ones(3)), null)
    assert not torch.allclose(model(x, t, Cond(label=y)), null)  # eval: no dropout
    model.train()
    torch.testing.assert_close(model(x, t, Cond(label=y)), null)  # training with p = 1: every label dropped

    t2i = _randomised(_tiny(TEXT_DIM))
    text, mask = _text()
    one_token = t2i(x, t, Cond(t2i.null_text.expand(3, 1, TEXT_DIM), torch.ones(3, 1, dtype=torch.bool)))
    dropped = t2i(x, t, Cond(text, mask), force_drop_ids=torch.tensor([True, True, False]))
    torch.testing.assert_close(dropped[:2], one_token[:2])
    torch.testing.assert_close(dropped[2:], t2i(x, t, Cond(text, mask))[2:])


@pytest.mark.parametrize("text_dim", [None, TEXT_DIM])
def test_cfg_scale_one_is_conditional_and_zero_is_unconditional(text_dim):
    model = _randomised(_tiny(text_dim))
    x, t = torch.randn(3, N, CHANNELS), torch.tensor([5, 250, 990])
    text, mask = _text()
    kwargs = {"cond": Cond(label=torch.tensor([4, 5, 6])) if text_dim is None else Cond(text, mask)}
    cond = model(x, t, **kwargs)
    uncond = model(x, t, **kwargs, force_drop_ids=torch.ones(3))
    torch.testing.assert_close(model.forward_with_cfg(x, t, 1.0, **kwargs), cond, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model.forward_with_cfg(x, t, torch.ones(3), **kwargs), cond, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model.forward_with_cfg(x, t, 0.0, **kwargs), uncond, atol=1e-5, rtol=1e-5)
    scale = torch.tensor([1.0, 2.0, 4.0])
    guided = model.forward_with_cfg(x, t, scale, **kwargs)
    torch.testing.assert_close(guided, uncond + scale.view(-1, 1, 1) * (cond - uncond), atol=1e-5, rtol=1e-5)


def test_bf16_autocast_forward():
    model = _randomised(_tiny(TEXT_DIM))
    x, t = torch.randn(3, N, CHANNELS), torch.tensor([1, 2, 3])
    text, mask = _text()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model.forward_with_cfg(x, t, 2.0, Cond(text, mask))
    ref = model.forward_with_cfg(x, t, 2.0, Cond(text, mask))
    assert torch.isfinite(out).all()
    assert (out.float() - ref).abs().max() < 0.1 * ref.abs().max()


def test_tiny_dit_overfits_one_batch():
    torch.manual_seed(0)
    model = _tiny(class_dropout_prob=0.0)
    diffusion = Diffusion()
    x0, y = torch.randn(4, N, CHANNELS), torch.tensor([0, 1, 2, 3])
    t_eval, noise_eval = torch.arange(0, 1000, 50).repeat_interleave(4), torch.randn(80, N, CHANNELS)

    def eval_loss():
        with torch.no_grad():
            return diffusion.training_loss(model, x0.repeat(20, 1, 1), {"cond": Cond(label=y.repeat(20))}, t_eval, noise_eval).item()

    before = eval_loss()
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=300)
    for _ in range(300):
        loss = diffusion.training_loss(model, x0.repeat(8, 1, 1), {"cond": Cond(label=y.repeat(8))})
        opt.zero_grad()
        loss.backward()
        opt.step()
        schedule.step()
    after = eval_loss()
    assert after < before / 10, (before, after)
