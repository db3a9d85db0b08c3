"""Tests for discriminator.py: layout size (§4.1, App. C), shapes, the blur against a depthwise conv, and GAN
losses vs hand values."""

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from discriminator import (BlurPool2d, LeCAM, StyleGANDiscriminator, discriminator_loss, generator_loss, r1_penalty,
                           real_fake_logits)


def _num_params(module):
    return sum(p.numel() for p in module.parameters())


def test_parameter_count_matches_paper_at_256_and_512():
    with torch.device("meta"):
        d256 = StyleGANDiscriminator()
        d512 = StyleGANDiscriminator(image_size=512, channel_multipliers=(0.5, 1, 2, 4, 4, 4, 4))
    n256 = _num_params(d256)
    assert n256 == 24_192_385  # MAGVIT layout, App. C channels
    assert abs(n256 - 24e6) / 24e6 < 0.01  # §4.1: "~24M parameters"
    assert abs(_num_params(d512) - 24e6) / 24e6 < 0.01


@pytest.mark.parametrize(
    "image_size,multipliers", [(32, (1, 2, 2)), (64, (0.5, 1, 2, 2)), (16, (1, 2, 2, 2))]
)
def test_small_discriminator_output_shape(image_size, multipliers):
    torch.manual_seed(0)
    d = StyleGANDiscriminator(image_size, base_channels=16, channel_multipliers=multipliers)
    logits = d(torch.rand(2, 3, image_size, image_size) * 2 - 1)
    assert logits.shape == (2,)
    assert torch.isfinite(logits).all()


def test_bad_sizes_raise():
    with pytest.raises(ValueError, match="divisible"):
        StyleGANDiscriminator(image_size=40, base_channels=8, channel_multipliers=(1, 1, 1, 1))
    d = StyleGANDiscriminator(image_size=32, base_channels=8, channel_multipliers=(1, 2))
    with pytest.raises(ValueError, match=r"\[B, 3, 32, 32\]"):
        d(torch.zeros(1, 3, 64, 64))


def test_blur_pool_of_a_delta_is_the_normalised_1331_kernel():
    x = torch.zeros(1, 2, 8, 8)
    x[0, :, 2, 2] = 1.0
    y = BlurPool2d()(x)
    assert y.shape == (1, 2, 4, 4)
    # Output (i, j) reads input rows/cols 2i-1 .. 2i+2; the delta sits at tap 3 for i=0, tap 1 for i=1.
    expected = torch.zeros(4, 4)
    expected[:2, :2] = torch.tensor([[1.0, 3.0], [3.0, 9.0]]) / 64
    torch.testing.assert_close(y[0, 0], expected)
    torch.testing.assert_close(y[0, 1], expected)


def _depthwise_conv_blur(x):
    """The reference BlurPool2d: depthwise conv, normalised [1,3,3,1] outer product, stride 2, padding 1."""
    taps = torch.tensor([1.0, 3.0, 3.0, 1.0], dtype=x.dtype)
    kernel = (taps[:, None] * taps[None, :] / 64).expand(x.shape[1], 1, 4, 4)
    return F.conv2d(x, kernel, stride=2, padding=1, groups=x.shape[1])


@pytest.mark.parametrize("shape", [(2, 3, 8, 8), (1, 4, 7, 9), (3, 2, 6, 5), (1, 1, 2, 3)])
def test_blur_pool_equals_the_depthwise_conv_to_second_order(shape):
    # R1's path: penalty = ||grad_x disc(x)||^2 with create_graph, then its gradient w.r.t. weights and inputs.
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen)
    weight = torch.randn(1, shape[1], 1, 1, generator=gen)  # a per-channel "disc weight" in front of the blur
    readout = torch.randn(_depthwise_conv_blur(x).shape, generator=gen)

    def derivatives(blur):
        xs, w = x.clone().requires_grad_(True), weight.clone().requires_grad_(True)
        out = blur(w * xs)
        logits = (F.softplus(out) * readout).sum()  # nonlinear, so second derivatives pass through the blur
        (grad,) = torch.autograd.grad(logits, xs, create_graph=True)
        penalty = grad.pow(2).sum()
        return (out, grad, *torch.autograd.grad(penalty, (w, xs)))

    for ours, oracle in zip(derivatives(BlurPool2d()), derivatives(_depthwise_conv_blur)):
        torch.testing.assert_close(ours, oracle, rtol=1e-5, atol=1e-5)


def test_generator_and_discriminator_losses_match_hand_values():
    logits = torch.tensor([0.0, math.log(3.0)])
    # softplus(-0) = log 2, softplus(-log 3) = log(4/3)
    assert generator_loss(logits).item() == pytest.approx((math.log(2) + math.log(4 / 3)) / 2)
    # softplus(-0) = log 2 for real, softplus(log 3) = log 4 for fake
    d_loss = discriminator_loss(torch.tensor([0.0]), torch.tensor([math.log(3.0)]))
    assert d_loss.item() == pytest.approx(3 * math.log(2))


def test_lecam_penalty_and_ema_update_match_hand_values():
    lecam = LeCAM()
    assert set(lecam.state_dict()) == {"ema_real", "ema_fake"}
    lecam.ema_real.fill_(0.5)
    lecam.ema_fake.fill_(-0.5)
    real = torch.tensor([1.0, -1.0], requires_grad=True)
    fake = torch.tensor([0.0, 1.0], requires_grad=True)
    penalty = lecam.penalty(real, fake)
    # relu([1.5, -0.5])^2 -> mean 1.125 ; relu([0.5, -0.5])^2 -> mean 0.125
    assert penalty.item() == pytest.approx(1.25)
    penalty.backward()
    torch.testing.assert_close(real.grad, torch.tensor([1.5, 0.0]))
    torch.testing.assert_close(fake.grad, torch.tensor([-0.5, 0.0]))

    lecam.update(real, fake)  # means: real 0.0, fake 0.5
    assert lecam.ema_real.item() == pytest.approx(0.999 * 0.5)
    assert lecam.ema_fake.item() == pytest.approx(0.999 * -0.5 + 0.001 * 0.5)
    assert not lecam.ema_real.requires_grad


class _SquareD(nn.Module):
    """disc(x) = sum(w * x^2) per sample, so grad_x disc = 2 w x."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.tensor([1.0, -2.0, 0.5, 3.0, 0.0, 1.0]).view(1, 3, 1, 2))

    def forward(self, x):
        return (self.w * x**2).flatten(1).sum(1)


def test_r1_penalty_matches_analytic_gradient_and_trains_d():
    d = _SquareD()
    x = torch.tensor([[1.0, 2.0, -1.0, 0.5, 3.0, 1.0], [0.0, 1.0, 2.0, -2.0, 1.0, 1.0]]).view(2, 3, 1, 2)
    logits, penalty = r1_penalty(d, x)
    torch.testing.assert_close(logits, d(x))
    # ||2 w x||^2 = 4 sum(w^2 x^2), averaged over the batch
    expected = (4 * (d.w**2 * x**2).flatten(1).sum(1)).mean()
    assert penalty.item() == pytest.approx(expected.item())
    penalty.backward()
    # d/dw of mean_b 4 sum(w^2 x^2) = 8 w mean_b(x^2)
    torch.testing.assert_close(d.w.grad, 8 * d.w.detach() * (x**2).mean(0, keepdim=True))


def test_r1_penalty_on_stylegan_discriminator_reaches_every_parameter():
    torch.manual_seed(0)
    d = StyleGANDiscriminator(image_size=16, base_channels=8, channel_multipliers=(1, 2))
    real = torch.rand(2, 3, 16, 16) * 2 - 1
    logits, penalty = r1_penalty(d, real)
    assert logits.shape == (2,)
    assert penalty.item() > 0
    penalty.backward()
    assert real.grad is None
    # grad_x disc is piecewise linear in the weights and constant in the biases (leaky ReLU), so
    # R1 trains every weight and no bias.
    for name, p in d.named_parameters():
        if name.endswith("weight"):
            assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_lazy_r1_is_k_times_the_penalty_every_kth_step_and_zero_between():
    d = _SquareD()
    x = torch.randn(2, 3, 1, 2, generator=torch.Generator().manual_seed(0))
    _, penalty = r1_penalty(d, x)
    for step in range(8):
        logits, lazy = r1_penalty(d, x, every=4, step=step)
        torch.testing.assert_close(logits, d(x))
        torch.testing.assert_close(lazy, 4 * penalty if step % 4 == 0 else torch.tensor(0.0))


def test_one_call_on_cat_real_fake_gives_the_two_calls_logits_and_gradients():
    """Without R1, one discriminator call on cat(real, fake) (no layer mixes samples) gives the logits and disc
    gradients of a call on each half, up to the rounding of a larger batch; an R1 step is r1_penalty's two calls."""
    torch.manual_seed(0)
    d = StyleGANDiscriminator(image_size=16, base_channels=8, channel_multipliers=(1, 2))
    real, fake = torch.rand(2, 4, 3, 16, 16) * 2 - 1

    def loss_and_grads(logits_real, logits_fake, penalty):
        d.zero_grad()
        (discriminator_loss(logits_real, logits_fake) + 10 * penalty).backward()
        return logits_real, logits_fake, penalty, [p.grad.clone() for p in d.parameters()]
    for step in range(2):  # every=2: step 0 takes R1, step 1 does not
        ours = loss_and_grads(*real_fake_logits(d, real, fake, every=2, step=step))
        logits_real, penalty = r1_penalty(d, real, every=2, step=step)
        two_calls = loss_and_grads(logits_real, d(fake), penalty)
        for a, b in zip(ours[:3], two_calls[:3]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        for a, b in zip(ours[3], two_calls[3]):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
