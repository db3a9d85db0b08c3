"""Several ranks: the process group a CUDA run asks for serves every tensor the code hands a collective, and two gloo
ranks run both stages and sampling through their real entry points (torchrun), with gradient accumulation, the
text encoder per batch, DiT-T2I without dropout, --resume and the samples' gather."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch.distributed.distributed_c10d import BackendConfig

from runtime import distributed
from runtime.run import Run


ROOT = Path(__file__).resolve().parents[1]


def test_cuda_process_group_serves_the_host_tensors_of_a_log_row(tmp_path, monkeypatch):
    """NCCL has no CPU backend: a CUDA run's group must serve CPU tensors too, or the all_reduce of Run.log's
    host-side terms stops every multi-GPU run at its first log row. No GPU here: the group setup_distributed asks for
    on CUDA is built with gloo in NCCL's place, for the same device types, and takes a log row (one rank standing in
    for two; the row's values are not the point)."""
    asked, init = [], dist.init_process_group

    def gloo_for_nccl(backend, **kw):
        asked.append(backend)
        devices = BackendConfig(backend).get_device_backend_map()
        init(",".join(f"{d}:gloo" for d in devices), store=dist.HashStore(), rank=0, world_size=1, **kw)

    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    monkeypatch.setattr(dist, "init_process_group", gloo_for_nccl)
    try:
        rank, _, device = distributed.setup_distributed()
        assert device == torch.device("cuda:0")
        with Run(tmp_path / "run", "tokenizer", "tokenizer", {}, None, 1, resume=False, overwrite=False,
                 log_every=1, ckpt_every=1, rank=rank, world=2, device=torch.device("cpu")) as run:
            run.begin({})
            run.log(1, {"l2": 0.5}, 8)
        assert "l2" in json.loads((tmp_path / "run" / "log.jsonl").read_text())
        assert BackendConfig(asked[0]).get_device_backend_map()["cuda"] == "nccl"  # CUDA tensors still go by NCCL
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_grads_outside_ddp_are_averaged_in_one_collective(monkeypatch):
    """all_reduce_grads (the discriminator's): one all-reduce over the concatenated gradients, not one per parameter,
    each gradient then the mean over the ranks in its own shape; parameters without a gradient are left alone."""
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Conv2d(4, 2, 3), torch.nn.Linear(2, 2))
    for p in module[:2].parameters():
        p.grad = torch.randn_like(p)
    mine = [p.grad.clone() for p in module[:2].parameters()]
    other = [torch.randn_like(g) for g in mine]  # the other rank's gradients
    sizes = []

    def all_reduce(t):  # the sum over two ranks
        sizes.append(t.numel())
        t += torch.cat([g.reshape(-1) for g in other])

    monkeypatch.setattr(distributed.dist, "all_reduce", all_reduce)
    distributed.all_reduce_grads(module, 2)
    assert sizes == [sum(g.numel() for g in mine)]
    for p, a, b in zip(module[:2].parameters(), mine, other):
        torch.testing.assert_close(p.grad, (a + b) / 2)
    assert all(p.grad is None for p in module[2].parameters())


def torchrun(script: str, *args) -> str:
    """`torchrun --nproc_per_node 2 script args` (gloo ranks on the CPU, one thread each); its output."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        script, *map(str, args)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    return p.stdout


def steps_logged(out, key):
    return [r["step"] for r in map(json.loads, (Path(out) / "log.jsonl").read_text().splitlines()) if key in r]


def tiny_run(stage, out, cache, *extra):
    """Seconds-long runs: 16 embedded images, 8 a step (2 a micro-batch: 2 ranks x --grad-accum 2), a log row and a
    checkpoint every step."""
    return list(map(str, ["--stage", stage, "--out", out, "--cache-dir", cache, "--num-images", 16, "--batch-size", 8,
                          "--grad-accum", 2, "--workers", 0, "--log-every", 1, "--ckpt-every", 1, "--warmup-steps", 1,
                          *extra]))


@pytest.mark.slow
def test_two_ranks_both_stages_dit_t2i_without_dropout_resume_and_sampling(tmp_path):
    """Through torchrun, 2 ranks accumulating 2 micro-batches each step: stage 1 with the text encoder run on each
    batch (--text-cache off) and the discriminator from step 2 (R1, LeCAM: cross-rank gradients and means); stage 2
    DiT-T2I with --class-dropout 0 (the null text joins no sample, yet DDP needs the same used parameters every
    step), building the latent and caption caches between barriers, then --resume from them; sample.py on 2 ranks
    (an odd count: uneven shares, gathered through OUT/.parts)."""
    tok, dit, cache = tmp_path / "tok", tmp_path / "dit", tmp_path / "cache"
    torchrun("train.py", *tiny_run("tokenizer", tok, cache, "--text-cache", "off", "--disc-start", "1",
                                   "--r1-every", "1", "--eval-every", "2", "--max-steps", "2"))
    assert steps_logged(tok, "l2") == [1, 2] and steps_logged(tok, "d_loss") == [2]
    t2i = ("--task", "t2i", "--tokenizer", tok / "tokenizer", "--class-dropout", "0")
    torchrun("train.py", *tiny_run("dit", dit, cache, *t2i, "--max-steps", "2"))  # DDP checks at the second step
    torchrun("train.py", *tiny_run("dit", dit, cache, *t2i, "--max-steps", "3", "--resume"))
    assert steps_logged(dit, "loss") == [1, 2, 3] and (dit / "latest").read_text().strip() == "step-0000003"
    torchrun("sample.py", "--dit", dit / "dit", "--num-samples", "3", "--batch-size", "2", "--sampling-steps", "2",
             "--cfg-scale", "1.5", "--out", tmp_path / "samples", "--cache-dir", cache)
    assert np.load(tmp_path / "samples" / "samples_3x32x32x3.npz")["arr_0"].shape == (3, 32, 32, 3)
    assert not (tmp_path / "samples" / ".parts").exists()
