"""Tests for diffusion.py: the App. C schedule, the v-prediction identities, DDIM and the MDT guidance schedule."""

import math

import numpy as np
import pytest
import torch

from diffusion import Diffusion, cfg_scale


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: one intra-op thread is as fast alone and far faster on a busy shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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


@pytest.mark.parametrize("steps", [1000, 250, 7])
def test_ddim_with_true_v_reproduces_x0(steps):
    diffusion = Diffusion()
    x0 = torch.randn(3, 8, 8, generator=torch.Generator().manual_seed(0))
    out = diffusion.ddim_sample(_oracle(diffusion, x0), x0.shape, steps=steps,
                                generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(out, x0, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("steps", [1000, 250])
def test_ddim_with_exact_v_maps_noise_to_gaussian_data(steps):
    # Data x0 ~ N(μ, s²) per element: E[x0 | x_t] = μ + √ᾱ s² / (ᾱ s² + 1 − ᾱ) · (x_t − √ᾱ μ), and DDIM (an ODE
    # solver) must map the initial noise z to ≈ μ + s z. A point-mass oracle cannot test this: there x̂0 is exact
    # at every step, whatever the trajectory.
    diffusion, mu, s = Diffusion(), 1.0, 0.5

    def model_fn(x_t, t):
        a = diffusion.alphas_cumprod[t.cpu()].view(-1, 1).float()
        x0 = mu + a.sqrt() * s**2 / (a * s**2 + 1 - a) * (x_t - a.sqrt() * mu)
        return (a.sqrt() * x_t - x0) / (1 - a).sqrt()

    z = torch.randn(256, 8, generator=torch.Generator().manual_seed(0))
    out = diffusion.ddim_sample(model_fn, z.shape, steps=steps, generator=torch.Generator().manual_seed(0))
    gain = ((out - out.mean()) * (z - z.mean())).sum() / (z - z.mean()).pow(2).sum()
    offset = (out - gain * z).mean()
    torch.testing.assert_close(out, gain * z + offset, atol=1e-3, rtol=0)  # one affine map for every element
    assert gain.item() == pytest.approx(s, rel=0.02)
    assert offset.item() == pytest.approx(mu, rel=0.01)


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
