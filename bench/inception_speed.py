"""Inception feature-extraction throughput: inception.InceptionFeatures against pytorch-fid's InceptionV3.

Both networks get the same random weights and the same uint8 images. pytorch-fid is timed on its own input (float
[0, 1] NCHW, as its data loader produces it) and returns pool features only; ours starts from uint8 NHWC and returns
pool, sFID spatial features and logits in the same pass. Prints a table of images/s and the ratio.

    python bench/inception_speed.py [--images 64] [--size 256] [--batch-size 32] [--threads 2] [--repeats 3]
    python bench/inception_speed.py --size 32   # 32 px images (the embedded set's) upsampled to 299 inside

The weights are random: the time of a pass does not depend on them, so it is the real network's time too.
"""
import argparse
import sys
import time
from pathlib import Path

import pytorch_fid.inception as pfi
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from evaluator import inception  # noqa: E402
from harness import sync  # noqa: E402


def throughputs(runs, repeats):
    """Best images/s of each (run, batches) in `runs`, after a warm-up batch; repeats alternate between the runs so
    that load from other processes falls on all of them alike."""
    for run, batches in runs:
        run(batches[0])
    best = [float("inf")] * len(runs)
    for _ in range(repeats):
        for i, (run, batches) in enumerate(runs):
            start = time.perf_counter()
            for batch in batches:
                run(batch)
            best[i] = min(best[i], time.perf_counter() - start)
    return [sum(len(b) for b in batches) / t for (_, batches), t in zip(runs, best)]


@torch.inference_mode()
def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    ours = inception.InceptionFeatures().eval().to(args.device, memory_format=torch.channels_last)
    state = {k: v.cpu() for k, v in ours.state_dict().items()}
    pfi.load_state_dict_from_url = lambda *a, **k: state  # same random weights, no download
    theirs = pfi.InceptionV3([pfi.InceptionV3.DEFAULT_BLOCK_INDEX]).eval().to(args.device)

    images = torch.randint(0, 256, (args.images, args.size, args.size, 3), dtype=torch.uint8, device=args.device)
    u8 = list(images.split(args.batch_size))
    f01 = [b.permute(0, 3, 1, 2).float() / 255 for b in u8]
    diff = (ours(u8[0])[0] - theirs(f01[0])[0].flatten(1)).abs().max().item()

    names = ["pytorch-fid InceptionV3 (pool)", "inception.InceptionFeatures (pool+spatial+logits)"]
    rows = list(zip(names, throughputs([(lambda b: (theirs(b), sync(args.device)), f01),
                                        (lambda b: (ours(b), sync(args.device)), u8)], args.repeats)))
    print(f"{args.images} images {args.size}px, batch {args.batch_size}, {args.threads} threads, {args.device}; "
          f"max |pool difference| {diff:.2e}")
    print(f"{'implementation':<50}{'images/s':>10}{'ratio':>8}")
    for name, ips in rows:
        print(f"{name:<50}{ips:>10.2f}{ips / rows[0][1]:>8.2f}")


if __name__ == "__main__":
    main()
