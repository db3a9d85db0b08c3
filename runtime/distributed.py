"""Where the work runs: torchrun ranks (on CUDA NCCL for CUDA tensors and gloo for CPU ones, gloo on CPU), their
shares of the work, cross-rank means, and bf16 autocast."""
import datetime
import os
from contextlib import nullcontext

import torch
import torch.distributed as dist


def autocast(device, precision: str = "auto"):
    """bf16 autocast on CUDA ("auto"/"bf16"), none on CPU unless asked: slower there (README, Measured)."""
    device = torch.device(device)
    bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()


# The process group's backend per device type. NCCL serves CUDA tensors only: on CUDA, gloo serves the CPU ones (log
# terms, barriers, all_gather_object), so a collective never meets a device its group lacks.
BACKENDS = {"cuda": "cpu:gloo,cuda:nccl", "cpu": "gloo"}


def setup_distributed(timeout: float = 7200):
    """(rank, world, device) from torchrun's environment: a group of NCCL (CUDA tensors) and gloo (CPU tensors) on
    CUDA, gloo on CPU (BACKENDS); (0, 1, device) otherwise. A rank waits up to `timeout` seconds at a collective:
    first-time caches are built between barriers."""
    cuda = torch.cuda.is_available()
    if "RANK" not in os.environ:
        return 0, 1, torch.device("cuda" if cuda else "cpu")
    dist.init_process_group(BACKENDS["cuda" if cuda else "cpu"], timeout=datetime.timedelta(seconds=timeout))
    device = torch.device(f"cuda:{int(os.environ['LOCAL_RANK'])}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    return dist.get_rank(), dist.get_world_size(), device


def barrier(world: int) -> None:
    if world > 1:
        dist.barrier()


def rank_share(n: int, rank: int, world: int) -> range:
    """Rank `rank`'s contiguous share of range(n) (shares differ in size by at most one)."""
    return range(n * rank // world, n * (rank + 1) // world)


def global_mean(x: torch.Tensor, world: int) -> torch.Tensor:
    """Mean of a tensor across ranks (a detached float copy)."""
    x = x.detach().float().clone()
    if world > 1:
        dist.all_reduce(x)
        x /= world
    return x


def all_reduce_grads(module: torch.nn.Module, world: int) -> None:
    """Averages gradients across ranks (for modules not wrapped in DDP, e.g. the discriminator with the R1 double
    backward) in one collective over their concatenation, not one per parameter (the discriminator has ~100)."""
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    if world > 1 and grads:
        flat = global_mean(torch.cat([g.reshape(-1) for g in grads]), world)
        for g, part in zip(grads, flat.split([g.numel() for g in grads])):
            g.copy_(part.view_as(g))
