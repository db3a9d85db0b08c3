"""StyleGAN discriminator and the GAN losses used to train TexTok (§3.2, §4.1, App. C).

The paper follows MaskGIT / MAGVIT: a StyleGAN discriminator (~24M parameters at 256 px, §4.1),
non-saturating GAN losses, LeCAM regularisation (Tseng et al., 2021) and an R1 gradient penalty.
The layout reproduces MAGVIT's `videogvt/models/stylegan_discriminator_2d.py` with MaskGIT's
blur-pool resampling (`maskgit/nets/discriminator.py`, `blur_resample=True`).
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def _leaky_relu(x):
    return F.leaky_relu(x, negative_slope=0.2)


class BlurPool2d(nn.Module):
    """[1,3,3,1] outer-product blur, then stride-2 subsampling (Zhang et al., 2019), per channel.

    Exactly the depthwise conv with the normalised 4x4 kernel, stride 2 and zero padding 1 (what JAX 'SAME' gives a
    4-tap, stride-2 filter on even sizes; odd sizes work too), computed as the separable 1D [1,3,3,1] filter along
    H, then W, from strided views and sums, then / 64. Its first and second derivatives are then pads, slices and
    elementwise sums, not a depthwise conv's double backward (R1), which is slow on GPUs (docs/RESULTS.md §8).
    """

    def forward(self, x):
        return _blur_1331(_blur_1331(x, 2), 3) / 64  # the 2D kernel's taps sum to 8 x 8


def _blur_1331(x, dim):
    """Unscaled [1,3,3,1] along `dim`, zero padding 1, stride 2: out[i] = x[2i-1] + 3 x[2i] + 3 x[2i+1] + x[2i+2]."""
    size = x.shape[dim]
    n = (size - 2) // 2 + 1  # the conv's output length, (size + 2 * 1 - 4) // 2 + 1
    # Pad to 2n + 2 entries (1 on the left, 1 or 0 on the right) and read them as n + 1 (even, odd) pairs: output i
    # is pair i with taps (1, 3) plus pair i + 1 with taps (3, 1). F.pad lists the last dim first.
    x = F.pad(x, (0, 0) * (x.dim() - 1 - dim) + (1, 2 * n + 1 - size))
    even, odd = x.unflatten(dim, (n + 1, 2)).unbind(dim + 1)
    return torch.add(even, odd, alpha=3).narrow(dim, 0, n) + torch.add(odd, even, alpha=3).narrow(dim, 1, n)


class ResBlock(nn.Module):
    """StyleGAN discriminator residual block: 3x3 conv, blur-pool on both paths, 1x1 skip, sum / sqrt(2)."""

    def __init__(self, in_channels, out_channels):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, in_channels, 3, padding=1)
        self.conv2 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.skip = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        self.blur = BlurPool2d()

    def forward(self, x):
        residual = self.skip(self.blur(x))
        x = self.blur(_leaky_relu(self.conv1(x)))
        x = _leaky_relu(self.conv2(x))
        return (residual + x) / math.sqrt(2)


class StyleGANDiscriminator(nn.Module):
    """StyleGAN discriminator: images [B, 3, H, W] in [-1, 1] -> logits [B].

    One stride-2 ResBlock per channel multiplier, so the final feature map is
    image_size / 2**len(channel_multipliers) on a side. Defaults are App. C at 256 px
    (24,192,385 parameters, the paper's ~24M); at 512 px App. C uses multipliers
    (0.5, 1, 2, 4, 4, 4, 4).
    """

    def __init__(self, image_size=256, base_channels=128, channel_multipliers=(1, 2, 4, 4, 4, 4)):
        super().__init__()
        num_blocks = len(channel_multipliers)
        if num_blocks == 0 or image_size % 2**num_blocks:
            raise ValueError(
                f"StyleGANDiscriminator: image_size {image_size} must be divisible by "
                f"2**len(channel_multipliers) = {2**num_blocks}"
            )
        self.image_size = image_size
        self.conv_in = nn.Conv2d(3, base_channels, 3, padding=1)
        blocks, channels = [], base_channels
        for multiplier in channel_multipliers:
            out_channels = int(base_channels * multiplier)
            blocks.append(ResBlock(channels, out_channels))
            channels = out_channels
        self.blocks = nn.Sequential(*blocks)
        self.conv_out = nn.Conv2d(channels, channels, 3, padding=1)
        final_size = image_size // 2**num_blocks
        self.fc = nn.Linear(channels * final_size**2, channels)
        self.logit = nn.Linear(channels, 1)
        # Reference init: xavier-uniform kernels (flax default_kernel_init), zero biases.
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def forward(self, images):
        if images.ndim != 4 or images.shape[1:] != (3, self.image_size, self.image_size):
            raise ValueError(
                f"StyleGANDiscriminator expects images [B, 3, {self.image_size}, {self.image_size}], "
                f"got {tuple(images.shape)}"
            )
        x = _leaky_relu(self.conv_in(images))
        x = self.blocks(x)
        x = _leaky_relu(self.conv_out(x))
        x = _leaky_relu(self.fc(x.flatten(1)))
        return self.logit(x).squeeze(1)


def generator_loss(logits_fake):
    """Non-saturating generator loss (App. C): mean(softplus(-disc(fake))) = -mean(log sigmoid(disc(fake))).

    MaskGIT/MAGVIT `generator_loss(loss_type='non-saturating')`: sigmoid cross-entropy against label 1.
    """
    return F.softplus(-logits_fake.float()).mean()


def discriminator_loss(logits_real, logits_fake):
    """Non-saturating discriminator loss: mean(softplus(-disc(real))) + mean(softplus(disc(fake))).

    MaskGIT/MAGVIT `discriminator_loss(loss_type='non-saturating')` (their configs' choice):
    sigmoid cross-entropy with label 1 for real and 0 for fake, each averaged separately.
    """
    return F.softplus(-logits_real.float()).mean() + F.softplus(logits_fake.float()).mean()


class LeCAM(nn.Module):
    """LeCAM regulariser (Tseng et al., 2021; weight 0.0001 in App. C) with EMAs of the mean logits.

    The EMAs are buffers, so they are saved with the discriminator state. They start at 0 and
    follow ema <- decay * ema + (1 - decay) * mean(logits), as in MAGVIT's trainer; steps.discriminator_step
    takes the penalty first, then updates (the order is explained there).
    """

    def __init__(self, decay=0.999):
        super().__init__()
        self.decay = decay
        self.register_buffer("ema_real", torch.zeros(()))
        self.register_buffer("ema_fake", torch.zeros(()))

    @torch.no_grad()
    def update(self, logits_real, logits_fake):
        """Move the EMAs towards this step's mean real / fake logits."""
        self.ema_real.lerp_(logits_real.detach().float().mean(), 1 - self.decay)
        self.ema_fake.lerp_(logits_fake.detach().float().mean(), 1 - self.decay)

    def penalty(self, logits_real, logits_fake):
        """mean(relu(disc(real) - ema_fake)^2) + mean(relu(ema_real - disc(fake))^2), before the weight.

        Applied per logit as in the LeCAM authors' code; MAGVIT's `lecam_reg` applies the same formula
        to the batch-mean logits (pass `logits.mean()[None]` to reproduce that).
        """
        real_term = F.relu(logits_real.float() - self.ema_fake).pow(2).mean()
        fake_term = F.relu(self.ema_real - logits_fake.float()).pow(2).mean()
        return real_term + fake_term


def r1_penalty(discriminator, real_images, *, every=1, step=0):
    """R1 gradient penalty on real images: mean over the batch of ||grad_x disc(x)||^2.

    Returns (logits_real [B], penalty), so the real logits can feed the disc loss without a second
    forward pass. The graph is kept (create_graph=True), so the penalty trains disc. App. C's
    "r1 with cost 10" is applied by the caller as 10 * penalty: MaskGIT/MAGVIT
    `r1_gradient_penalty` multiply the mean squared gradient norm by `penalty_cost` directly,
    without StyleGAN's gamma / 2.

    Lazy R1 (StyleGAN2's lazy regularisation, Karras et al. 2020, §3.1): with every=k and `step` the disc step
    count, the penalty is computed only when step % k == 0 and returned multiplied by k, so its average weight
    stays the same; on the other steps it is 0 and the logits come from a plain forward pass (no double
    backward). The default every=1 is App. C's setting. StyleGAN2 uses k = 16.
    """
    if step % every:
        return discriminator(real_images), torch.zeros((), device=real_images.device)
    images = real_images.detach().requires_grad_(True)
    logits = discriminator(images)
    (grad,) = torch.autograd.grad(logits.sum(), images, create_graph=True)
    penalty = grad.float().pow(2).flatten(1).sum(1).mean()
    return logits, every * penalty


def real_fake_logits(discriminator, real_images, fake_images, *, every=1, step=0):
    """(logits_real [B], logits_fake [B], R1 penalty) of one discriminator step (`every`, `step`: r1_penalty's).

    On a step without R1, one call on cat(real, fake): no layer mixes samples across the batch (no minibatch-std
    layer), so these are the logits of two calls, up to the rounding of a larger batch. On an R1 step, two calls:
    R1's gradient is taken w.r.t. the real images, and on cat(real, fake) its double backward would run over the
    fakes too (1.2-1.3x the two calls' time on the CPU, bench/gan_step.py --compare-gan-changes).
    """
    if step % every == 0:
        logits_real, penalty = r1_penalty(discriminator, real_images, every=every, step=step)
        return logits_real, discriminator(fake_images), penalty
    logits_real, logits_fake = discriminator(torch.cat([real_images, fake_images])).split(len(real_images))
    return logits_real, logits_fake, torch.zeros((), device=real_images.device)
