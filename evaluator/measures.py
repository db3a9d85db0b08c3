"""The measures of the evaluation suite (§4.2), each a function of arrays: Inception features of uint8 batches, FID
and sFID (the Fréchet distance of feature statistics), IS, improved precision and recall, and PSNR and SSIM of image
pairs. metrics.py builds the ADM report and the reconstruction report on them; training takes its validation PSNR here.
"""
from contextlib import contextmanager

import numpy as np
import scipy.linalg
import torch
import torch.nn.functional as F
from tqdm import tqdm


# ---------------------------------------------------------------------------------------------------------------------
# Feature extraction

@contextmanager
def no_tf32():
    """Full float32 inside: TF32 off for CUDA matmuls and cuDNN convolutions (with it, GPU FID differs from CPU FID by
    ~4e-4 relative); the previous settings come back on exit, also after an exception."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@torch.inference_mode()
def compute_features(model, images, batch_size: int = 64, progress: bool = True, desc: str = "inception") -> dict:
    """uint8 [N, H, W, 3] images (an array, or NpzImages streamed from disk), run in batches in full float32 on the
    model's device -> {name: float32 numpy [N, ...]} for each of the model's `outputs`; for InceptionFeatures
    {"pool": [N, 2048], "spatial": [N, 2023], "logits": [N, 1008]}."""
    device = next(model.parameters()).device
    if hasattr(images, "batches"):  # NpzImages: read from disk a batch at a time
        batches = images.batches(batch_size)
    else:
        batches = (images[i:i + batch_size] for i in range(0, len(images), batch_size))
    out = {key: [] for key in model.outputs}
    with no_tf32(), tqdm(total=len(images), desc=desc, unit="img", disable=not progress) as bar:
        for batch in batches:
            for key, value in zip(out, model(torch.as_tensor(batch).to(device, non_blocking=True))):
                out[key].append(value.float().cpu().numpy())
            bar.update(len(batch))
    return {key: np.concatenate(values) for key, values in out.items()}


# ---------------------------------------------------------------------------------------------------------------------
# FID / sFID, IS, precision and recall

def feature_statistics(features, chunk: int = 4096):
    """Mean and covariance (as np.cov, rowvar=False) of [N, dim] features, accumulated in float64 in two passes."""
    n = len(features)
    if n < 2:
        raise ValueError(f"feature statistics need at least 2 images, got {n}")
    mu = np.zeros(features.shape[1])
    for i in range(0, n, chunk):
        mu += features[i:i + chunk].sum(0, dtype=np.float64)
    mu /= n
    sigma = np.zeros((len(mu), len(mu)))
    for i in range(0, n, chunk):
        centered = features[i:i + chunk].astype(np.float64) - mu
        sigma += centered.T @ centered
    return mu, sigma / (n - 1)


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """FID (Heusel et al. 2017): |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2)).

    With S1 = R R^T on its range (R = V sqrt(w) from S1's eigendecomposition), S1 S2 and the symmetric PSD R^T S2 R
    share their nonzero eigenvalues, so tr((S1 S2)^(1/2)) is the sum of the square roots of the latter's. It stays
    real and stable when S1 S2 is singular (fewer images than feature dimensions), where scipy.linalg.sqrtm(S1 @ S2)
    turns complex. Eigenvalues under numpy's matrix-rank tolerance are zeros in rounding noise, which the square root
    would amplify, and are dropped."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise ValueError(f"statistics do not match: mu {mu1.shape} vs {mu2.shape}, "
                         f"sigma {sigma1.shape} vs {sigma2.shape}")

    def nonzero(w):
        return w > np.abs(w).max(initial=0) * len(w) * np.finfo(np.float64).eps

    w1, v1 = scipy.linalg.eigh(sigma1, driver="evd")
    root1 = v1[:, nonzero(w1)] * np.sqrt(w1[nonzero(w1)])
    w = scipy.linalg.eigh(root1.T @ sigma2 @ root1, eigvals_only=True, driver="evd")
    tr_covmean = np.sqrt(w[nonzero(w)]).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)


def inception_score(logits, split_size: int = 5000) -> float:
    """IS (Salimans et al. 2016) as the ADM evaluator: exp(E_x KL(p(y|x) || p(y))) on consecutive splits of
    `split_size` samples (one smaller split for fewer), averaged over the splits."""
    log_p = torch.log_softmax(torch.as_tensor(np.asarray(logits), dtype=torch.float64), 1)
    scores = []
    for part in log_p.split(split_size):
        p = part.exp()
        # KL per sample; xlogy keeps 0 log 0 = 0 for classes that no sample of the split uses.
        kl = (p * part).sum(1) - torch.xlogy(p, p.mean(0)).sum(1)
        scores.append(kl.mean().exp().item())
    return float(np.mean(scores))


def _sq_dists(a, b):
    """Pairwise squared Euclidean distances [len(a), len(b)]."""
    return (a.pow(2).sum(1, keepdim=True) - 2 * a @ b.T + b.pow(2).sum(1)).clamp_min_(0)


def _knn_radii(features, k, batch):
    """Squared distance from each feature to its k-th nearest neighbour in its own set (itself is the 0-th)."""
    return torch.cat([_sq_dists(features[i:i + batch], features).kthvalue(k + 1, 1).values
                      for i in range(0, len(features), batch)])


NEIGHBOURS = 3  # k of the ADM evaluator's manifold estimator


def precision_recall(real_features, fake_features, k: int = NEIGHBOURS, batch: int = 10000, device="cpu"):
    """Improved precision and recall (Kynkäänniemi et al. 2019) with the ADM manifold estimator: a point lies on a
    set's manifold when it is within the k-NN radius of one of its points. Returns (precision, recall): the share of
    fake points on the real manifold and of real points on the fake manifold. Distances in full float32 on `device`.
    Not bit-for-bit the evaluator's: its DistanceBlock computes each distance block in float16 first and uses float32
    only where that overflows, so a distance within float16 rounding of a k-NN radius can land on the other side."""
    real = torch.as_tensor(np.asarray(real_features), dtype=torch.float32, device=device)
    fake = torch.as_tensor(np.asarray(fake_features), dtype=torch.float32, device=device)
    if min(len(real), len(fake)) <= k:
        raise ValueError(f"precision/recall with k={k} needs more than {k} real and fake images, "
                         f"got {len(real)} and {len(fake)}")
    real_in = torch.zeros(len(real), dtype=torch.bool, device=device)
    fake_in = torch.zeros(len(fake), dtype=torch.bool, device=device)
    with no_tf32():
        radii_real, radii_fake = _knn_radii(real, k, batch), _knn_radii(fake, k, batch)
        for i in range(0, len(real), batch):
            for j in range(0, len(fake), batch):
                d = _sq_dists(real[i:i + batch], fake[j:j + batch])
                real_in[i:i + batch] |= (d <= radii_fake[j:j + batch]).any(1)
                fake_in[j:j + batch] |= (d <= radii_real[i:i + batch, None]).any(0)
    return fake_in.double().mean().item(), real_in.double().mean().item()


# ---------------------------------------------------------------------------------------------------------------------
# PSNR, SSIM on uint8 [N, H, W, 3] batches

def _image_pair(a, b):
    """Two uint8 [N, H, W, 3] batches (numpy or torch) -> float64 NCHW tensors on a's device."""
    a, b = torch.as_tensor(a), torch.as_tensor(b)
    if a.dtype != torch.uint8 or b.dtype != torch.uint8 or a.shape != b.shape or a.ndim != 4 or a.shape[-1] != 3:
        raise ValueError(f"expected two uint8 [N, H, W, 3] batches of one shape, got {a.dtype} {tuple(a.shape)} "
                         f"and {b.dtype} {tuple(b.shape)}")
    return a.permute(0, 3, 1, 2).double(), b.permute(0, 3, 1, 2).to(a.device).double()


def psnr(a, b) -> float:
    """Mean over images of 10 log10(255^2 / MSE) (inf for identical images, as scikit-image)."""
    x, y = _image_pair(a, b)
    mse = (x - y).pow(2).flatten(1).mean(1)
    return (10 * torch.log10(255.0 ** 2 / mse)).mean().item()


def ssim(a, b, sigma: float = 1.5) -> float:
    """Mean SSIM (Wang et al. 2004): 11x11 Gaussian window (sigma 1.5, truncated at 3.5 sigma), K1 = 0.01,
    K2 = 0.03, population covariances, averaged over the valid region of each channel, channels and images
    (= scikit-image's structural_similarity with gaussian_weights=True, use_sample_covariance=False)."""
    x, y = _image_pair(a, b)
    radius = int(3.5 * sigma + 0.5)
    t = torch.arange(-radius, radius + 1, dtype=torch.float64, device=x.device)
    g = torch.exp(-0.5 * (t / sigma) ** 2)
    g = g / g.sum()
    if min(x.shape[-2:]) < len(g):
        raise ValueError(f"SSIM needs images of at least {len(g)}x{len(g)} pixels, got {tuple(x.shape[-2:])}")

    def blur(z):  # separable, 'valid' region only: the border skimage crops never enters the mean
        z = F.conv2d(z, g.view(1, 1, 1, -1).expand(3, 1, 1, -1), groups=3)
        return F.conv2d(z, g.view(1, 1, -1, 1).expand(3, 1, -1, 1), groups=3)

    ux, uy = blur(x), blur(y)
    vx, vy, vxy = blur(x * x) - ux * ux, blur(y * y) - uy * uy, blur(x * y) - ux * uy
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    s = (2 * ux * uy + c1) * (2 * vxy + c2) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
    return s.mean((1, 2, 3)).mean().item()
