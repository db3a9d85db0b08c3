"""Helpers the bench scripts share."""
import time

import torch


# ------------------------------------------------------------------------------------------------------- timing
def sync(device) -> None:
    """Waits for the device's queued work (CUDA), so a wall-clock time covers it."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def best_seconds(fn, repeats: int, device, warmup=None) -> float:
    """Best wall-clock seconds of fn() over `repeats` calls, after one warm-up call (of `warmup` when given)."""
    (warmup or fn)()
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - start)
    return best
