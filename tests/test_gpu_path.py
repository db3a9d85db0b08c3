"""The training path that runs only on GPUs, run here on the CPU: torch.compile of the DDP-wrapped model
(train.wrap) for a stage-1 generator step and a DiT step, against eager, and bf16 autocast (--precision bf16) through
both stages and sampling."""
import json
import math
from functools import partial

import numpy as np
import pytest
import torch
import torch.distributed as dist

import sample
import text_encoder
import train
from config import TokenizerTrainConfig
from conftest import tiny_config
from diffusion import Diffusion
from discriminator import StyleGANDiscriminator
from dit import build_dit
from runtime.files import load_tensors
from steps import accumulate, generator_step
from textok import TexTok


CPU = torch.device("cpu")


@pytest.fixture
def one_rank_group():
    """A one-rank gloo process group: DDP's hooks (and dynamo's DDPOptimizer under torch.compile) run as on 8 GPUs."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
    dist.destroy_process_group()


def compiled_and_eager(build):
    """(net, model), (eager model): two copies of `build()` with the same weights; net = train.wrap(model) as train.py
    wraps it on several GPUs (DDP, then torch.compile): world 2 makes wrap build the DDP, over the one-rank group."""
    torch.manual_seed(0)
    model, eager = build(), build()
    eager.load_state_dict(model.state_dict())
    net = train.wrap(model, CPU, world=2, compile_=True)
    assert isinstance(net, torch._dynamo.eval_frame.OptimizedModule) and isinstance(
        net._orig_mod, torch.nn.parallel.DistributedDataParallel)
    return (net, model), eager


def one_graph(model, *args) -> bool:
    """Whether dynamo captures `model(*args)` whole, in one graph (a graph break costs speed on a GPU)."""
    explained = torch._dynamo.explain(model)(*args)
    return explained.graph_count == 1 and explained.graph_break_count == 0


def randomised(model):
    """`model` with every parameter perturbed (seeded): adaLN-Zero's zero-initialised gates and output layer carry
    signal, so every block counts in the loss."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.1)
    return model


def assert_close_after_one_sgd_step(model, eager, rtol, atol):
    """SGD at lr 1 moves each weight by its (clipped) gradient: equal weights after the step are equal gradients."""
    for (name, a), b in zip(model.state_dict().items(), eager.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


def test_compiled_ddp_generator_step_matches_eager(one_rank_group, batch):
    """torch.compile(DDP(TexTok)) (inductor, C++ kernels here) takes the stage-1 generator step (ℓ2 + VQ + GAN loss
    through the discriminator, text condition) that the eager TexTok takes: losses within 1e-5 relative, gradients
    within 1e-5 + 1e-4 relative (inductor fuses and reorders float32 sums: ~1e-6 seen)."""
    cfg = tiny_config()
    tc = TokenizerTrainConfig(perceptual_weight=0.0, grad_clip=1e9)
    (net, model), eager = compiled_and_eager(lambda: TexTok(cfg))
    disc = StyleGANDiscriminator(32, 8, (1, 2))
    micro_batches = [({"image": batch["image"][:4], "cond": batch["cond"].part(slice(0, 4))}, True)]
    results = []
    for n, m in ((net, model), (eager, eager)):
        opt = torch.optim.SGD(m.parameters(), lr=1.0)
        terms, fakes = generator_step(n, m, opt, disc, None, tc, micro_batches, "fp32", gan_on=True)
        results.append(({k: v.item() for k, v in terms.items()}, fakes[0]))
    (compiled_terms, compiled_fake), (eager_terms, eager_fake) = results
    assert compiled_terms.keys() == eager_terms.keys() == {"l2", "vq", "gan", "grad_norm"}
    assert compiled_terms == pytest.approx(eager_terms, rel=1e-5)
    torch.testing.assert_close(compiled_fake, eager_fake, rtol=1e-5, atol=1e-5)
    assert_close_after_one_sgd_step(model, eager, rtol=1e-4, atol=1e-5)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # it was compiled, not run eagerly
    assert one_graph(model, micro_batches[0][0]["image"], micro_batches[0][0]["cond"])


def test_compiled_ddp_dit_step_matches_eager(one_rank_group, batch, monkeypatch):
    """torch.compile(DDP(DiT-T2I)) takes the v-prediction step the eager DiT takes (text condition, class dropout's
    random draw as eager's: inductor's fallback_random), losses within 1e-5 relative, gradients within 1e-5 + 1e-4
    relative. Backend aot_eager (dynamo, AOT autograd, DDPOptimizer: all the GPU path shares with the CPU; the C++
    kernels are the stage-1 test's and test_generation's), for the time: inductor's compile here is ~40 s of CPU."""
    monkeypatch.setattr(torch, "compile", partial(torch.compile, backend="aot_eager"))
    tok = tiny_config()
    (net, model), eager = compiled_and_eager(lambda: randomised(build_dit("DiT-T", 0.5, tok, "t2i", tok.num_classes)))
    diffusion = Diffusion()
    torch.manual_seed(1)
    x0, t = torch.randn(4, tok.num_tokens, tok.token_dim), torch.tensor([0, 250, 500, 999])
    noise, cond = torch.randn_like(x0), batch["cond"].part(slice(0, 4))
    losses = []
    for n, m in ((net, model), (eager, eager)):
        torch.manual_seed(2)  # the same class-dropout draw
        terms, _ = accumulate([({"Z": x0}, True)], lambda mb: (lambda loss: (loss, {"loss": loss}, None))(
            diffusion.training_loss(n, mb["Z"], {"cond": cond}, t, noise)), n)
        torch.optim.SGD(m.parameters(), lr=1.0).step()
        losses.append(terms["loss"].item())
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    assert_close_after_one_sgd_step(model, eager, rtol=1e-4, atol=1e-5)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1
    assert one_graph(model, x0, t, cond)


def test_bf16_autocast_runs_both_stages_and_sampling(tmp_path, text_cache, monkeypatch):
    """--precision bf16 (the GPU default, forced on the CPU): one stage-1 GAN step with R1, one DiT-T2I step (captions
    encoded on the fly, --text-cache off) and sampling run their matmuls and convolutions in bf16, and keep float32
    weights and finite losses. (The embedding store, which sampling fills, encodes in fp32 by design: not counted.)"""
    seen, paused, encode = {}, [], text_encoder.TextEncoder.__call__

    def spied_encode(self, captions, precision="fp32"):
        paused.append(precision == "fp32")
        try:
            return encode(self, captions, precision)
        finally:
            paused.pop()
    monkeypatch.setattr(text_encoder.TextEncoder, "__call__", spied_encode)
    hook = torch.nn.modules.module.register_module_forward_hook(
        lambda module, args, out: seen.setdefault(type(module).__name__, set()).add(out.dtype)
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)) and not any(paused) else None)
    try:
        tok, dit = tmp_path / "tok", tmp_path / "dit"
        common = ["--cache-dir", str(text_cache), "--num-images", "16", "--batch-size", "4", "--workers", "0",
                  "--max-steps", "1", "--log-every", "1", "--precision", "bf16", "--text-cache", "off"]
        train.main(["--stage", "tokenizer", "--out", str(tok), "--disc-start", "0", "--eval-every", "1", *common])
        assert seen == {"Linear": {torch.bfloat16}, "Conv2d": {torch.bfloat16}}, seen  # TexTok, disc (R1 too)
        seen.clear()
        train.main(["--stage", "dit", "--task", "t2i", "--tokenizer", str(tok / "tokenizer"), "--out", str(dit),
                    *common])
        assert seen == {"Linear": {torch.bfloat16}}, seen  # the latent cache's tokenizer pass and the DiT
        seen.clear()
        npz = sample.main(["--dit", str(dit / "dit"), "--num-samples", "2", "--batch-size", "2", "--sampling-steps", "2",
                           "--cfg-scale", "2", "--out", str(tmp_path / "samples"), "--precision", "bf16",
                           "--no-compile"])
        assert seen == {"Linear": {torch.bfloat16}}, seen
    finally:
        hook.remove()
    for out, terms in ((tok, {"l2", "gan", "d_loss", "r1", "lecam", "val_psnr_uint8"}), (dit, {"loss"})):
        rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
        assert terms <= {k for r in rows for k in r} and all(math.isfinite(v) for r in rows for v in r.values()), rows
        assert {v.dtype for v in load_tensors(out / "step-0000001" / "state.safetensors").values()
                if v.is_floating_point()} == {torch.float32}
    samples = np.load(npz)["arr_0"]
    assert samples.shape == (2, 32, 32, 3) and samples.std() > 0
