"""Gaussian diffusion for the DiT generator (App. C): 1000 steps, linear β, v-prediction, DDIM, MDT's CFG schedule.

Notation as DDPM (Ho et al. 2020) and DDIM (Song et al. 2021), neither in the paper's references:
ᾱ_t = Π_{s≤t} (1 − β_s), x_t = √ᾱ_t x_0 + √(1−ᾱ_t) ε. The model predicts v = √ᾱ_t ε − √(1−ᾱ_t) x_0
(Salimans & Ho 2022, "Progressive distillation", §4). Timesteps are 0-indexed, t ∈ {0, …, n−1} with
n = num_timesteps, as in DiT's code; the paper's β_1 … β_1000 are betas[0] … betas[999].
"""
import math

import torch
import torch.nn.functional as F
from tqdm import tqdm


def cfg_scale(t, w: float, num_timesteps: int = 1000, scale_pow: float = 4.0,
              schedule: str = "power-cosine") -> torch.Tensor:
    """Guidance scale at timestep(s) t (App. C: the guidance schedule of MDT [12]).

    'power-cosine' (MDT's code, forward_with_cfg): w_t = 1 + (w − 1) · (1 − cos(π · (1 − t/n) ** scale_pow)) / 2,
    n = num_timesteps, which rises from ≈1 at t = n−1 (pure noise) to w at t = 0. 'constant': w_t = w. Returns
    float32, t's shape, on t's device (elementwise, so a device t needs no host sync).
    """
    t = torch.as_tensor(t, dtype=torch.float32)
    if schedule == "constant":
        return torch.full_like(t, float(w))
    if schedule != "power-cosine":
        raise ValueError(f"unknown guidance schedule {schedule!r}: choose 'power-cosine' or 'constant'")
    return 1 + (w - 1) * (1 - torch.cos(math.pi * (1 - t / num_timesteps) ** scale_pow)) / 2


class Diffusion:
    """Discrete-time Gaussian diffusion with a v-prediction model (App. C)."""

    def __init__(self, num_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02):
        self.num_timesteps = num_timesteps
        # App. C: linear schedule from β = 1e-4 to 0.02 over 1000 steps (DDPM §4); float64 for the schedule
        # math, cast to the data's dtype where used.
        self.betas = torch.linspace(beta_start, beta_end, num_timesteps, dtype=torch.float64)
        self.alphas_cumprod = torch.cumprod(1.0 - self.betas, dim=0)  # ᾱ_t = Π_{s≤t} (1 − β_s), DDPM Eq. 4
        self._alphas_cumprod_on = {}  # device -> ᾱ there (see alphas_cumprod_on)

    def alphas_cumprod_on(self, device) -> torch.Tensor:
        """ᾱ [num_timesteps] (float64) on `device`, copied there once and cached: gathers with device timesteps need
        no sync."""
        device = torch.device(device)
        if device not in self._alphas_cumprod_on:
            self._alphas_cumprod_on[device] = self.alphas_cumprod.to(device)
        return self._alphas_cumprod_on[device]

    def _coefs(self, t, x):
        """(√ᾱ_t, √(1−ᾱ_t)) for timesteps t [B], shaped [B, 1, …] like x, in x's dtype, gathered on x's device."""
        a = self.alphas_cumprod_on(x.device)[torch.as_tensor(t, device=x.device)]
        shape = (-1,) + (1,) * (x.dim() - 1)
        return a.sqrt().to(x.dtype).view(shape), (1 - a).sqrt().to(x.dtype).view(shape)

    def q_sample(self, x0, t, noise):
        """Noise x0 to step t: x_t = √ᾱ_t x0 + √(1−ᾱ_t) ε (DDPM Eq. 4)."""
        a, s = self._coefs(t, x0)
        return a * x0 + s * noise

    def v_target(self, x0, noise, t):
        """v = √ᾱ_t ε − √(1−ᾱ_t) x0 (Salimans & Ho 2022, §4): the training target (App. C: v-prediction)."""
        a, s = self._coefs(t, x0)
        return a * noise - s * x0

    def x0_from_v(self, x_t, v, t):
        """x0 = √ᾱ_t x_t − √(1−ᾱ_t) v (inverts DDPM Eq. 4 and the v definition, using ᾱ + (1−ᾱ) = 1)."""
        a, s = self._coefs(t, x_t)
        return a * x_t - s * v

    def eps_from_v(self, x_t, v, t):
        """ε = √(1−ᾱ_t) x_t + √ᾱ_t v (same inversion, for the noise)."""
        a, s = self._coefs(t, x_t)
        return s * x_t + a * v

    def training_loss(self, model, x0, model_kwargs=None, t=None, noise=None):
        """MSE between model(x_t, t, **model_kwargs) and the v target, t uniform in {0, …, num_timesteps−1} (App. C).

        x0: [B, N, d] clean tokens. `t` ([B] long) and `noise` (like x0) are drawn when not given.
        Returns the mean over all elements (a scalar).
        """
        if t is None:
            t = torch.randint(0, self.num_timesteps, (x0.shape[0],), device=x0.device)
        if noise is None:
            noise = torch.randn_like(x0)
        x_t = self.q_sample(x0, t, noise)
        v = model(x_t, t.to(x0.device), **(model_kwargs or {}))
        return F.mse_loss(v.float(), self.v_target(x0, noise, t).float())

    def sample_timesteps(self, steps: int) -> list[int]:
        """The DDIM timesteps, descending: `steps` evenly spaced integers from n−1 down to 0 (n = num_timesteps), both
        included.

        This is ADM's `space_timesteps(n, [steps])` respacing that DiT's sample.py uses (round(i · (n−1)/(steps−1)));
        ADM's "ddimN" variant (stride n//steps from 0) would never visit n−1. steps = n gives every timestep.
        """
        n = self.num_timesteps
        if not 1 <= steps <= n:
            raise ValueError(f"sampling steps must be in [1, {n}], got {steps}")
        if steps == 1:
            return [n - 1]
        return [round(i * (n - 1) / (steps - 1)) for i in reversed(range(steps))]

    @torch.no_grad()
    def ddim_sample(self, model_fn, shape, steps: int = 250, device="cpu", generator=None, progress=False, noise=None):
        """Deterministic DDIM (η = 0) from x_{n−1} ~ N(0, I) (n = num_timesteps) to x0 (App. C: DDIM, 250 steps).

        model_fn(x [B, …] float32, t [B] long on `device`) returns v; for guidance pass e.g.
        `lambda x, t: model.forward_with_cfg(x, t, cfg_scale(t, w), cond)`. The start x_{n−1} is `noise` when given
        (sample.py seeds it per sample), else drawn with `generator`, which must live on `device`.
        Each step is DDIM Eq. 12 with σ_t = 0: x_prev = √ᾱ_prev x̂0 + √(1−ᾱ_prev) ε̂, with ᾱ_prev = 1 after t = 0.
        The timesteps and coefficients are device tensors made once per call, so the loop never waits for the
        device: it is as fast as model_fn.
        """
        ts = torch.tensor(self.sample_timesteps(steps), device=device)
        a = self.alphas_cumprod_on(device)[ts]  # ᾱ_prev = ᾱ of the next (smaller) timestep
        a_prev = torch.cat([a[1:], a.new_ones(1)])
        sqrt_a_prev, sqrt_1ma_prev = a_prev.sqrt().float(), (1 - a_prev).sqrt().float()
        t_batch = ts[:, None].repeat(1, shape[0])  # row i: timestep i for every sample, [B] contiguous
        x = torch.randn(shape, generator=generator, device=device) if noise is None else noise.float()
        for i in tqdm(range(len(ts)), disable=not progress, desc="DDIM"):
            v = model_fn(x, t_batch[i]).float()
            x0, eps = self.x0_from_v(x, v, t_batch[i]), self.eps_from_v(x, v, t_batch[i])
            x = sqrt_a_prev[i] * x0 + sqrt_1ma_prev[i] * eps
        return x
