"""Tokenizer / detokenizer: shapes for every switch, parameter counts (Tab. 4e), text masking, the VQ variant,
save/load, and clear errors for bad input."""
import pytest
import torch
from conftest import tiny_config

from conditions import Cond
from config import MODEL_PRESETS, TexTokConfig
from textok import TexTok


SWITCHES = [dict(conditioning=c, cond_arch=a, cond_location=l)
            for c in ("text", "class", "none") for a in ("in-context", "cross-attention")
            for l in ("tokenizer", "detokenizer", "both")]


@pytest.mark.parametrize("switch", SWITCHES, ids=lambda s: "-".join(s.values()))
def test_shapes_every_switch(switch, batch):
    model = TexTok(tiny_config(**switch))
    recon, Z, vq_loss = model(batch["image"], batch["cond"])
    assert Z.shape == (8, 8, 8)
    assert recon.shape == batch["image"].shape
    assert vq_loss.item() == 0
    assert (model.tokenizer.cond is not None) == model.cfg.conditions("tokenizer")
    assert (model.detokenizer.cond is not None) == model.cfg.conditions("detokenizer")


@pytest.mark.parametrize("name,size", [("small", "base"), ("base", "base"), ("large", "base")])
def test_model_presets_shapes_meta(name, size):
    """Every Tab. 4e preset builds at 256 and 512 px with the App. C patch size; shapes checked on the meta device."""
    for res, patch in ((256, 8), (512, 16)):
        cfg = TexTokConfig(image_size=res, patch_size=patch, num_tokens=32, **MODEL_PRESETS[name])
        with torch.device("meta"):
            model = TexTok(cfg)
            cond = Cond(torch.empty(2, 128, 2048), torch.ones(2, 128, dtype=torch.bool))
            Z = model.encode(torch.empty(2, 3, res, res), cond)
            out = model.decode(Z, cond)
        assert Z.shape == (2, 32, 8) and out.shape == (2, 3, res, res)


@pytest.mark.parametrize("name,paper_millions", [("small", 54), ("base", 176), ("large", 612)])
def test_parameter_counts_table_4e(name, paper_millions):
    """Tokenizer + detokenizer (T5-XL projections, text encoder excluded) within 3% of Tab. 4e."""
    with torch.device("meta"):
        model = TexTok(TexTokConfig(**MODEL_PRESETS[name]))
    n = sum(p.numel() for p in model.parameters()) / 1e6
    assert abs(n - paper_millions) / paper_millions < 0.03, n


def test_text_padding_does_not_leak(batch):
    """Whatever sits in the padded text positions changes neither Z nor the reconstruction."""
    torch.manual_seed(0)
    model = TexTok(tiny_config()).eval()
    text, mask, _ = batch["cond"]
    assert (~mask).any(), "the batch must contain padding for this test to mean anything"
    garbage = torch.where(mask[..., None], text, 100 * torch.randn_like(text))
    with torch.no_grad():
        Z1, Z2 = model.encode(batch["image"], Cond(text, mask)), model.encode(batch["image"], Cond(garbage, mask))
        out1, out2 = model.decode(Z1, Cond(text, mask)), model.decode(Z1, Cond(garbage, mask))
    torch.testing.assert_close(Z1, Z2, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out1, out2, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["in-context", "cross-attention"])
def test_detokenizer_depends_on_caption(arch, batch):
    torch.manual_seed(0)
    model = TexTok(tiny_config(cond_arch=arch)).eval()
    with torch.no_grad():
        Z = model.encode(batch["image"], batch["cond"])
        own = model.decode(Z, batch["cond"])
        swapped = model.decode(Z, Cond(*(v.roll(1, 0) for v in batch["cond"])))
    assert (own - swapped).abs().mean() > 1e-3


def test_baseline_ignores_text(batch):
    """Baseline (w/o text) is the same code with conditioning off: the caption has no effect at all."""
    model = TexTok(tiny_config(conditioning="none")).eval()
    with torch.no_grad():
        a = model(batch["image"], batch["cond"])[0]
        b = model(batch["image"], Cond(*(v.roll(1, 0) for v in batch["cond"])))[0]
    assert torch.equal(a, b)
    assert not any("cond" in name for name, _ in model.named_parameters())


def test_vq_variant(batch):
    """App. A: quantized tokens come from the 4096-entry codebook, with indices, a loss, and straight-through grads."""
    model = TexTok(tiny_config(vq=True))
    assert model.quantizer.codebook.weight.shape == (4096, 8)
    Z = model.tokenizer(batch["image"], batch["cond"])
    Zq, idx, loss = model.quantize(Z)
    assert idx.shape == (8, 8) and idx.dtype == torch.long and 0 <= idx.min() and idx.max() < 4096
    torch.testing.assert_close(Zq, model.quantizer.lookup(idx))
    recon, _, vq_loss = model(batch["image"], batch["cond"])
    (recon.pow(2).mean() + vq_loss).backward()
    assert vq_loss > 0
    assert model.tokenizer.to_Z.weight.grad.abs().sum() > 0  # straight-through estimator reaches the tokenizer
    assert model.quantizer.codebook.weight.grad.abs().sum() > 0


def test_save_and_load_roundtrip(tmp_path, batch):
    model = TexTok(tiny_config()).eval()
    model.save_pretrained(tmp_path / "ckpt")
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["README.md", "config.json", "model.safetensors"]
    loaded = TexTok.from_pretrained(tmp_path / "ckpt", text_encoder="all-MiniLM-L6-v2").eval()
    assert loaded.cfg == model.cfg
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode(batch["image"], batch["cond"]),
                                   model.encode(batch["image"], batch["cond"]))
    with pytest.raises(ValueError, match="trained with text encoder 'all-MiniLM-L6-v2', not 'google/t5-v1_1-xl'"):
        TexTok.from_pretrained(tmp_path / "ckpt", text_encoder="google/t5-v1_1-xl")


def test_load_refuses_other_architecture(tmp_path):
    TexTok(tiny_config()).save_pretrained(tmp_path / "a")
    TexTok(tiny_config(width=128)).save_pretrained(tmp_path / "b")
    (tmp_path / "a" / "model.safetensors").replace(tmp_path / "b" / "model.safetensors")
    with pytest.raises(ValueError, match="model.safetensors: checkpoint does not fit this model"):
        TexTok.from_pretrained(tmp_path / "b")


def test_bad_inputs_give_clear_errors(batch):
    model = TexTok(tiny_config())
    with pytest.raises(ValueError, match="not divisible by the patch size 4"):
        model.encode(torch.zeros(1, 3, 30, 30), batch["cond"].part(slice(0, 1)))
    with pytest.raises(ValueError, match=r"expected 32x32 images"):
        model.encode(torch.zeros(1, 3, 64, 64), batch["cond"].part(slice(0, 1)))
    with pytest.raises(ValueError, match=r"expected images \[B, 3, H, W\]"):
        model.encode(torch.zeros(1, 4, 32, 32), batch["cond"].part(slice(0, 1)))
    with pytest.raises(ValueError, match="text-conditioned: pass text embeddings"):
        model.encode(torch.zeros(1, 3, 32, 32))
    with pytest.raises(ValueError, match=r"expected Z \[B, 8, 8\]"):
        model.decode(torch.zeros(1, 4, 8), batch["cond"].part(slice(0, 1)))
    with pytest.raises(ValueError, match="TexTokConfig.patch_size: must divide image_size 30, got 4"):
        tiny_config(image_size=30)
    with pytest.raises(ValueError, match="TexTokConfig.cond_arch: expected one of .*, got 'film'"):
        tiny_config(cond_arch="film")
