"""Tests for diffusion.py: the App. C schedule, the v-prediction identities, DDIM and the MDT guidance schedule."""

import math

import numpy as np
import pytest
import torch
from torch.overrides import TorchFunctionMode

from conditions import Cond
from diffusion import Diffusion, cfg_scale
from dit import DiT, DiTConfig


def _oracle(diffusion, x0):
    """A model that knows the data is exactly x0: it returns the true v = (√ᾱ x_t − x0) / √(1−ᾱ)."""
    def model_fn(x_t, t):
        a = diffusion.alphas_cumprod[t.cpu()].view(-1, 1, 1)
        return ((a.sqrt() * x_t.double() - x0.double()) / (1 - a).sqrt()).float()
    return model_fn


def test_linear_schedule_alphas_cumprod():
    diffusion = Diffusion()
    betas = np.linspace(1e-4, 0.02, 1000)  # App. C: β_1 = 1e-4 … β_1000 = 0.02
    np.testing.assert_allclose(diffusion.betas.numpy(), betas, rtol=1e-12)
    np.testing.assert_allclose(diffusion.alphas_cumprod.numpy(), np.exp(np.cumsum(np.log1p(-betas))), rtol=1e-10)
    assert diffusion.alphas_cumprod[0].item() == pytest.approx(1 - 1e-4, rel=1e-12)
    # ᾱ at the last step: the product of all 1000 (1 − β), ≈ 4.04e-5 for DDPM's linear schedule.
    assert diffusion.alphas_cumprod[-1].item() == pytest.approx(4.0358e-5, rel=1e-3)


def test_x0_and_eps_recovered_from_x_t_and_v():
    torch.manual_seed(0)
    diffusion = Diffusion()
    x0, noise = torch.randn(6, 8, 8, dtype=torch.float64), torch.randn(6, 8, 8, dtype=torch.float64)
    t = torch.tensor([0, 1, 100, 500, 998, 999])
    x_t = diffusion.q_sample(x0, t, noise)
    a = diffusion.alphas_cumprod[t].view(-1, 1, 1)
    torch.testing.assert_close(x_t, a.sqrt() * x0 + (1 - a).sqrt() * noise)  # DDPM Eq. 4
    v = diffusion.v_target(x0, noise, t)
    torch.testing.assert_close(v, a.sqrt() * noise - (1 - a).sqrt() * x0)
    torch.testing.assert_close(diffusion.x0_from_v(x_t, v, t), x0, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(diffusion.eps_from_v(x_t, v, t), noise, rtol=1e-10, atol=1e-10)


def test_sample_timesteps_span_999_to_0():
    diffusion = Diffusion()
    ts = diffusion.sample_timesteps(250)
    assert len(ts) == 250 and ts[0] == 999 and ts[-1] == 0
    assert all(a > b for a, b in zip(ts, ts[1:]))
    assert diffusion.sample_timesteps(1000) == list(range(999, -1, -1))
    assert diffusion.sample_timesteps(4) == [999, 666, 333, 0]
    assert diffusion.sample_timesteps(1) == [999]
    with pytest.raises(ValueError):
        diffusion.sample_timesteps(1001)


@pytest.mark.parametrize("steps", [50, 1000])
def test_ddim_with_exact_v_follows_the_closed_form_gaussian_flow(steps):
    # Data x0 ~ N(μ, s²) per element, so x_t ~ N(√ᾱ μ, σ²) with σ² = ᾱ s² + 1 − ᾱ (DDPM Eq. 4) and the regression
    # targets are exact: E[x0 | x_t] = μ + √ᾱ s² (x_t − √ᾱ μ) / σ², E[ε | x_t] = √(1−ᾱ) (x_t − √ᾱ μ) / σ², so
    # v* = √ᾱ E[ε | x_t] − √(1−ᾱ) E[x0 | x_t]. In u = (x_t − √ᾱ μ) / σ a DDIM step (Eq. 12, η = 0) is
    # u ← cos(θ_t − θ_prev) u with θ = atan2(√(1−ᾱ), √ᾱ s), and ᾱ = 1 after t = 0 gives x0 = μ + s u: DDIM maps the
    # noise z to μ + s G (z − √ᾱ_999 μ) / σ_999, G = Π cos(Δθ). The ODE's limit G / σ_999 → 1 is the data
    # distribution, but at 50 steps std(x0) is 5% below s, more than the errors to catch move it: ᾱ_t for ᾱ_prev
    # (x2), ᾱ_prev one step off (4%), the model called at t − 1 (1%), a respacing from 998 (7e-5). So the sample
    # statistics must match this discretisation's closed form, here to 1e-5 (the float32 sampler is at 1e-7).
    # (A point mass cannot test this: there x̂0 is exact at every step, whatever the trajectory.)
    diffusion, mu, s = Diffusion(), 1.0, 0.5
    abar = diffusion.alphas_cumprod

    def model_fn(x_t, t):
        a, x_t = abar[t].view(-1, 1), x_t.double()
        centred, var = x_t - a.sqrt() * mu, a * s**2 + 1 - a
        x0, eps = mu + a.sqrt() * s**2 * centred / var, (1 - a).sqrt() * centred / var
        return (a.sqrt() * eps - (1 - a).sqrt() * x0).float()

    z = torch.randn(20000, 2, generator=torch.Generator().manual_seed(0)).double()  # the sampler's initial noise
    out = diffusion.ddim_sample(model_fn, z.shape, steps=steps, generator=torch.Generator().manual_seed(0)).double()
    ts = torch.linspace(999, 0, steps, dtype=torch.float64).round().long()  # 999 → 0 evenly, as DiT's respacing
    a = torch.cat([abar[ts], torch.ones(1, dtype=torch.float64)])
    theta = torch.atan2((1 - a).sqrt(), a.sqrt() * s)
    gain = torch.cos(theta[:-1] - theta[1:]).prod() / (a[0] * s**2 + 1 - a[0]).sqrt()
    expected = mu + s * gain * (z - a[0].sqrt() * mu)
    assert out.mean().item() == pytest.approx(expected.mean().item(), rel=1e-5)
    assert out.std().item() == pytest.approx(expected.std().item(), rel=1e-5)
    if steps == 1000:  # the limit: the data distribution itself
        assert out.mean().item() == pytest.approx(mu, abs=0.01)
        assert out.std().item() == pytest.approx(s, rel=0.01)


def _reference_ddim(diffusion, model_fn, shape, steps, generator):
    """The DDIM loop before issue 14, the oracle of the device loop: Python timesteps, a CPU tensor of timesteps
    and CPU coefficient gathers each step, and ᾱ_prev read back with .item()."""
    ts = diffusion.sample_timesteps(steps)
    x = torch.randn(shape, generator=generator)
    for i, t in enumerate(ts):
        t_cpu = torch.full((shape[0],), t, dtype=torch.long)
        v = model_fn(x, t_cpu).float()
        x0, eps = diffusion.x0_from_v(x, v, t_cpu), diffusion.eps_from_v(x, v, t_cpu)
        a_prev = diffusion.alphas_cumprod[ts[i + 1]].item() if i + 1 < len(ts) else 1.0
        x = math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev) * eps
    return x


def _recording(calls):
    """A nonlinear v model that appends each (x, t) it is called with to `calls`."""
    def model_fn(x, t):
        calls.append((x.clone(), t.clone()))
        return torch.tanh(x) * (t.float()[:, None, None] / 1000) + 0.1 * x
    return model_fn


@pytest.mark.parametrize("steps", [7, 250])
def test_ddim_loop_equals_the_reference_loop_step_by_step(steps):
    diffusion, shape = Diffusion(), (3, 4, 5)
    ours, reference = [], []
    out = diffusion.ddim_sample(_recording(ours), shape, steps=steps, generator=torch.Generator().manual_seed(0))
    ref = _reference_ddim(diffusion, _recording(reference), shape, steps, torch.Generator().manual_seed(0))
    assert len(ours) == len(reference) == steps
    for (x, t), (x_ref, t_ref) in zip(ours, reference):
        assert t.dtype == torch.long and torch.equal(t, t_ref)
        torch.testing.assert_close(x, x_ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)


class _CPUOps(TorchFunctionMode):
    """Counts the torch calls that take or return a CPU tensor."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        values = (*args, *(kwargs or {}).values(), *(out if isinstance(out, (tuple, list)) else (out,)))
        self.count += any(isinstance(v, torch.Tensor) and v.device.type == "cpu" for v in values)
        return out


def test_ddim_and_guidance_loop_builds_no_cpu_tensor_per_step():
    # On the meta device a host read (.item(), bool(tensor)) raises, and a CPU tensor made per step (then copied to
    # the device, a sync on CUDA) shows as CPU calls that grow with the number of steps.
    diffusion = Diffusion()
    diffusion.ddim_sample(lambda x, t: x, (2, 3), steps=2, device="meta")  # caches ᾱ on the meta device

    def cpu_calls(steps):
        def model_fn(x, t):
            return x * cfg_scale(t, 4.0).view(-1, 1) + diffusion.x0_from_v(x, x, t) - diffusion.q_sample(x, t, x)

        with _CPUOps() as mode:
            out = diffusion.ddim_sample(model_fn, (2, 3), steps=steps, device="meta")
        assert out.device.type == "meta"
        return mode.count

    assert cpu_calls(10) == cpu_calls(2)


def test_dit_t2i_guided_ddim_loop_needs_no_host_sync():
    # The same check through DiT-T2I with classifier-free guidance on the MDT schedule: on the meta device a host
    # read of the text mask (a sync per step on CUDA) raises, and no CPU tensor is made per step.
    dit = DiT(DiTConfig(num_tokens=4, in_channels=3, hidden_size=32, depth=1, num_heads=2, text_dim=8)).eval().to("meta")
    text = torch.empty(2, 5, 8, device="meta")
    cond = Cond(text, torch.ones(2, 5, dtype=torch.bool, device="meta"))
    diffusion = Diffusion()
    diffusion.ddim_sample(lambda x, t: x, (2, 3), steps=2, device="meta")  # caches ᾱ on the meta device

    def cpu_calls(steps):
        with _CPUOps() as mode:
            out = diffusion.ddim_sample(lambda x, t: dit.forward_with_cfg(x, t, cfg_scale(t, 4.0), cond), (2, 4, 3),
                                        steps=steps, device="meta")
        assert out.device.type == "meta"
        return mode.count

    assert cpu_calls(6) == cpu_calls(2)


def test_ddim_is_deterministic_given_the_generator():
    diffusion = Diffusion()

    def model_fn(x, t):
        return torch.tanh(x) * (t.float()[:, None, None] / 1000)

    runs = [diffusion.ddim_sample(model_fn, (2, 4, 8), steps=10, generator=torch.Generator().manual_seed(3))
            for _ in range(2)]
    torch.testing.assert_close(runs[0], runs[1], rtol=0, atol=0)


def test_training_loss_targets_v_at_the_noised_timestep():
    torch.manual_seed(0)
    diffusion = Diffusion()
    x0 = torch.randn(16, 8, 8)
    zero = diffusion.training_loss(lambda x, t: torch.zeros_like(x), x0)
    assert zero.dim() == 0 and 0.5 < zero.item() < 2.0  # E[v²] = ᾱ E[ε²] + (1−ᾱ) E[x0²] ≈ 1
    t, noise = torch.randint(0, 1000, (16,)), torch.randn_like(x0)
    assert diffusion.training_loss(lambda x, t: torch.zeros_like(x), x0, t=t, noise=noise).item() == pytest.approx(
        diffusion.v_target(x0, noise, t).pow(2).mean().item(), rel=1e-6)
    assert diffusion.training_loss(_oracle(diffusion, x0), x0).item() < 1e-8


def test_power_cosine_guidance_schedule():
    t = torch.arange(1000)
    w = cfg_scale(t, 4.0)
    assert w[0].item() == pytest.approx(1 + 3 * (1 - math.cos(math.pi * 1.0)) / 2)  # = w at t = 0
    assert w[0].item() == pytest.approx(4.0)
    assert w[999].item() == pytest.approx(1.0, abs=1e-6)  # no guidance at pure noise
    assert w[500].item() == pytest.approx(1 + 3 * (1 - math.cos(math.pi * 0.5 ** 4)) / 2, rel=1e-6)
    assert (w[:-1] >= w[1:]).all()  # guidance grows as t falls
    assert cfg_scale(t, 4.0, scale_pow=1.0)[500].item() == pytest.approx(2.5, rel=1e-5)  # (1 − cos(π/2)) / 2 = ½
    assert torch.equal(cfg_scale(t, 1.0), torch.ones(1000))
    assert torch.equal(cfg_scale(t, 1.5, schedule="constant"), torch.full((1000,), 1.5))
    with pytest.raises(ValueError, match="power-cosine"):
        cfg_scale(t, 2.0, schedule="linear")
