"""Scale simulation (issue 19): the text-embedding store and the stage-2 latents at many captions, on 1 and 2 gloo
ranks, with the real store code (text_encoder.cached_text_embeddings, latents.encode_latents) and the real MiniLM
encoder at a short --text-len.

    python bench/scale.py                              # M = 20k and 200k synthetic captions, 1 and 2 ranks
    python bench/scale.py --num-captions 1280000           # ImageNet's 1.28M (hours on a CPU: ~2-4 ms per caption)
    python bench/scale.py --num-captions 20000 --ranks 2 --no-latents --no-step-cost   # one quick row
    python bench/scale.py --num-captions --no-latents --no-step-cost --loader-num-captions 20000 200000   # loader memory

Each rank is its own process (torchrun's environment, gloo) with one thread, as one device per rank. Per rank: the
peak resident memory (VmHWM) of the whole process while it builds the store, against a baseline process that imports,
loads the encoder and encodes 20 batches (the allocator's steady state), beside the caption list's own size (the
input, in RAM as in training) and the whole array the old cache held in RAM; then how much the resident memory grows
while the rank reads its share back row by row through conditions.Conditioned (the training read path). Targets: peak RSS
less the baseline flat in M, 2 ranks <= 0.6x the wall of 1 rank (the CPU seconds per rank show the split where the
machine is loaded), sampled rows equal to a direct encoding. Then: stage-2 latents Z from 2 ranks against 1 rank's,
and the per-step cost of --text-cache off against the store on the tiny preset. Last, the loader's memory: one rank
reads a full pass of a captions.jsonl folder of M lines (synthetic 8 px images, many lines to a file) through the
training loader (data.make_datasets, data.step_loader) with --workers DataLoader workers, and the rank's memory is
the sum over its process and its workers of PSS (proportional set size: each page shared by k processes counts 1/k)
from /proc/PID/smaps_rollup, with each worker's USS (its private pages: what copy-on-read copies). Target: flat in M
but for the data itself (held once). And stage 2's latent read path (--latent-rows): a synthetic Z.npy of M rows
(N x d float32, the ImageNet preset's 128 x 8 by default) read by each rank as training reads it (latents.latent_stats,
then its share of the rows through latents.Latents): the growth of the rank's peak RSS against the whole array
that the old np.load held in every rank. Target: flat in M. Prints markdown tables.

    python bench/scale.py --num-captions --no-latents --no-step-cost --latent-rows 20000 200000   # latent read memory
"""
import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from config import OFFLINE_TEXT_ENCODER, get_preset  # noqa: E402
from embedded_sets import BACKGROUNDS, COLORS, SHAPES, SIZES  # noqa: E402


MiB = 2 ** 20


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-captions", type=int, nargs="*", default=[20_000, 200_000],
                   help="M values (1280000: ImageNet; none: skip the store table)")
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    p.add_argument("--text-len", type=int, default=16, help="tokens per caption (the paper: 128)")
    p.add_argument("--batch-size", type=int, default=256, help="captions per encoder batch")
    p.add_argument("--samples", type=int, default=64, help="rows checked against a direct encoding")
    p.add_argument("--images", type=int, default=96, help="stage-2 check: embedded images encoded into Z")
    p.add_argument("--latents", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--step-cost", action=argparse.BooleanOptionalAction, default=True,
                   help="--text-cache off against the store, per step, on the tiny preset")
    p.add_argument("--loader-num-captions", type=int, nargs="*", default=[],
                   help="M values of the loader-memory table (e.g. 20000 200000; none: skipped)")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers per rank (loader-memory table)")
    p.add_argument("--loader-batch", type=int, default=256, help="images per batch (loader-memory table)")
    p.add_argument("--loader-steps", type=int, default=0, help="steps per row (default 0: one full pass)")
    p.add_argument("--latent-rows", type=int, nargs="*", default=[],
                   help="M values of the stage-2 latent read table (e.g. 20000 200000; none: skipped)")
    p.add_argument("--latent-shape", type=int, nargs=2, default=[128, 8], help="N d of each latent row")
    p.add_argument("--out", default=None, help="work folder (default: a temporary one, removed at the end)")
    p.add_argument("--worker", choices=["store", "baseline", "latents", "loader", "latents_read"], default=None,
                   help=argparse.SUPPRESS)
    p.add_argument("--M", type=int, default=0, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def synthetic_captions(M: int) -> list:
    """M distinct captions from the embedded set's vocabulary, one to three objects each."""
    rng = np.random.default_rng(0)
    words = [list(SIZES), list(COLORS), SHAPES, list(BACKGROUNDS)]
    picks = [rng.integers(len(w), size=(M, 3)) for w in words]
    count = rng.integers(1, 4, size=M)
    caps = []
    for i in range(M):
        objs = [f"a {words[0][picks[0][i, k]]} {words[1][picks[1][i, k]]} {words[2][picks[2][i, k]]}"
                for k in range(count[i])]
        caps.append(f"Image {i}: " + " and ".join(objs) + f" on a {words[3][picks[3][i, 0]]} background.")
    return caps


def memory() -> dict:
    """VmRSS and VmHWM of this process, MiB."""
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return {k: int(status[k].split()[0]) / 1024 for k in ("VmRSS", "VmHWM")}


def smaps(pid) -> dict:
    """Rss, Pss and USS (Private_Clean + Private_Dirty) of process `pid`, MiB (/proc/PID/smaps_rollup)."""
    rows = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:])
    kib = {k: int(v.split()[0]) for k, v in rows.items()}
    return {"rss": kib["Rss"] / 1024, "pss": kib["Pss"] / 1024,
            "uss": (kib["Private_Clean"] + kib["Private_Dirty"]) / 1024}


def children(pid: int) -> list:
    """The pids whose parent is `pid` (here: the DataLoader workers)."""
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                kids.append(int(stat.parent.name))
        except (OSError, IndexError, ValueError):  # ended meanwhile
            pass
    return kids


def rank_memory() -> dict:
    """This rank's memory with its workers: PSS summed over them all, this process's PSS, the workers' largest USS."""
    main, workers = smaps("self"), []
    for pid in children(os.getpid()):
        try:
            workers.append(smaps(pid))
        except OSError:
            pass
    return {"pss": main["pss"] + sum(w["pss"] for w in workers), "main_pss": main["pss"], "workers": len(workers),
            "worker_uss": max((w["uss"] for w in workers), default=0.0)}


def reset_peak() -> None:
    """Restarts VmHWM at the current RSS (Linux: write 5 to clear_refs)."""
    Path("/proc/self/clear_refs").write_text("5")


# ------------------------------------------------------------------------------------------------ rank processes
def worker_store(args) -> dict:
    from conditions import Conditioned
    from runtime.distributed import setup_distributed
    from text_encoder import TextEncoder, cached_text_embeddings
    rank, world, _ = setup_distributed(3600)
    start = memory()["VmRSS"]
    captions = synthetic_captions(args.M)
    after_captions = memory()["VmRSS"]
    t0, cpu0 = time.perf_counter(), time.process_time()
    emb, mask = cached_text_embeddings(OFFLINE_TEXT_ENCODER, args.text_len, captions, Path(args.out) / "text",
                                       args.batch_size, rank=rank, world=world)
    build_s, build_cpu_s = time.perf_counter() - t0, time.process_time() - cpu0
    build = memory()
    reset_peak()
    read_start = memory()["VmRSS"]
    conds = Conditioned(None, captions, [0] * args.M, OFFLINE_TEXT_ENCODER, args.text_len, args.out, rank=rank, world=world)
    share = range(args.M * rank // world, args.M * (rank + 1) // world)
    t0 = time.perf_counter()
    for i in share:  # the training read path: one row per item
        conds[i]
    read_s, read = time.perf_counter() - t0, memory()
    equal = None
    if rank == 0:  # sampled rows against a direct encoding of the batch that holds them
        enc = TextEncoder(OFFLINE_TEXT_ENCODER, args.text_len)
        rows = np.random.default_rng(1).choice(args.M, min(args.samples, args.M), replace=False)
        equal = True
        for b in sorted({int(r) // args.batch_size for r in rows}):
            e, m = enc(captions[b * args.batch_size: (b + 1) * args.batch_size])
            for r in (int(r) for r in rows if int(r) // args.batch_size == b):
                k = r - b * args.batch_size
                equal &= np.array_equal(emb[r], e[k].half().numpy()) and np.array_equal(mask[r], m[k].numpy())
    return dict(rank=rank, start=start, captions=after_captions - start, build_peak=build["VmHWM"],
                read_growth=read["VmHWM"] - read_start, build_s=build_s, build_cpu_s=build_cpu_s, read_s=read_s,
                equal=equal)


def worker_baseline(args) -> dict:
    """Imports, the encoder and 20 batches (the allocator's steady state): what every rank holds whatever M."""
    from conditions import Conditioned  # noqa: F401  (the imports a store rank makes)
    from text_encoder import TextEncoder
    enc = TextEncoder(OFFLINE_TEXT_ENCODER, args.text_len)
    captions = synthetic_captions(20 * args.batch_size)
    for b in range(20):
        enc(captions[b * args.batch_size: (b + 1) * args.batch_size])
    return dict(peak=memory()["VmHWM"])


def worker_latents(args) -> dict:
    import latents
    from conditions import Conditioned
    from runtime.distributed import setup_distributed
    from embedded_sets import ShapesDataset
    from textok import TexTok
    rank, world, device = setup_distributed(3600)
    cfg = get_preset("tiny").model
    tok = TexTok.from_pretrained(Path(args.out) / "tokenizer").eval()
    data = Conditioned.for_model(ShapesDataset("train", cfg.image_size, args.M), cfg, args.out, rank=rank, world=world)
    t0 = time.perf_counter()
    latents.encode_latents(tok, data, device, "fp32", Path(args.out) / f"Z-{world}", 16, rank, world, workers=1)
    return dict(rank=rank, seconds=time.perf_counter() - t0)


def worker_latents_read(args) -> dict:
    """One rank's stage-2 read path over `args.out`/Z.npy: the streaming statistics, then its share of the rows
    through latents.Latents; the growth of its peak RSS over it (reset after the imports)."""
    from latents import Latents, latent_stats
    from runtime.distributed import rank_share, setup_distributed
    from runtime.rowstore import NpyRows
    rank, world, _ = setup_distributed(3600)
    Z = NpyRows(Path(args.out) / "Z.npy")
    reset_peak()
    start = memory()["VmRSS"]
    t0 = time.perf_counter()
    mean, std = latent_stats(Z, rank, world)
    stats_peak, stats_s = memory()["VmHWM"], time.perf_counter() - t0
    rows = Latents(Z, mean, std.clamp_min(1e-6))
    t0 = time.perf_counter()
    for i in rank_share(len(rows), rank, world):  # the training read path: one row per item
        rows[i]
    return dict(rank=rank, stats_growth=stats_peak - start, growth=memory()["VmHWM"] - start, stats_s=stats_s,
                read_s=time.perf_counter() - t0)


def latent_read_table(args, work: Path) -> list:
    from runtime.rowstore import NpyRows
    N, d = args.latent_shape
    lines = [f"Stage 2's latent read path: Z.npy of M rows x {N} x {d} float32 (synthetic), each rank computing the "
             "streaming statistics (latents.latent_stats) then reading its share of the rows (latents.Latents); "
             "growth of the rank's peak RSS over the imports (MiB):", "",
             "| M rows | ranks | Z on disk (MiB) = the old np.load per rank | peak growth, statistics (MiB/rank) | "
             "peak growth, statistics + rows (MiB/rank) | statistics (s) | rows (s/rank) |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    for M in args.latent_rows:
        folder = work / f"latents-{M}"
        folder.mkdir(parents=True, exist_ok=True)
        Z, rng = NpyRows.create(folder / "Z.npy", (M, N, d), np.float32), np.random.default_rng(0)
        for at in range(0, M, 4096):
            Z.write(at, rng.standard_normal((min(4096, M - at), N, d), np.float32))
        Z.flush()
        for world in args.ranks:
            res = launch(args, "latents_read", M, world, folder)
            lines.append(f"| {M:,} | {world} | {M * N * d * 4 / MiB:.0f} | "
                         f"{max(r['stats_growth'] for r in res):.0f} | {max(r['growth'] for r in res):.0f} | "
                         f"{max(r['stats_s'] for r in res):.1f} | {max(r['read_s'] for r in res):.1f} |")
            print(lines[-1], flush=True)
    return lines


def worker_loader(args) -> dict:
    """One rank's full pass over the JSONL folder `args.out` through the training loader; its memory sampled on the
    way (rank_memory), before the data set, after it, at the first batch and at the pass's peak."""
    from conditions import Conditioned
    from data import make_datasets, step_loader
    from runtime.distributed import setup_distributed
    rank, world, _ = setup_distributed(3600)
    start = rank_memory()
    train, _ = make_datasets(args.out, size=8)
    data = Conditioned(train, train.captions, train.labels)  # class labels: no text store, workers read images
    built, steps = rank_memory(), args.loader_steps or len(train) // (args.loader_batch * world)
    first = peak = None
    t0 = time.perf_counter()
    for step, _ in enumerate(step_loader(data, args.loader_batch, rank, world, 0, 0, steps, args.workers)):
        if step % 10 == 0 or step == steps - 1:
            m = rank_memory()
            first = first or m
            peak = m if peak is None or m["pss"] > peak["pss"] else peak
    return dict(rank=rank, start=start["pss"], data=built["pss"] - start["pss"], first=first, peak=peak,
                steps=steps, seconds=time.perf_counter() - t0)


def jsonl_folder(folder: Path, M: int, files: int = 16) -> float:
    """A captions.jsonl of M synthetic captions over `files` tiny PNGs (line i shows image i % files); the mean
    caption length in bytes."""
    from PIL import Image
    (folder / "img").mkdir(parents=True, exist_ok=True)
    for k in range(files):
        Image.new("RGB", (8, 8), (16 * k, 255 - 16 * k, 90)).save(folder / "img" / f"n{k:08d}_{k}.png")
    captions = synthetic_captions(M)
    with open(folder / "captions.jsonl", "w") as f:
        for i, c in enumerate(captions):
            f.write(json.dumps({"image": f"img/n{i % files:08d}_{i % files}.png", "caption": c, "label": i % 1000})
                    + "\n")
    return sum(len(c.encode()) for c in captions) / M


def loader_table(args, work: Path) -> list:
    steps = f"{args.loader_steps} steps" if args.loader_steps else "a full pass"
    lines = [f"Loader memory: one rank, {args.workers} DataLoader workers, batch {args.loader_batch}, {steps} "
             "(PSS summed over the rank's process and its workers; MiB):", "",
             "| M captions | mean caption (B) | data set in the rank (PSS) | rank at the first batch | rank, peak over "
             "the pass | rank's process at the peak | workers seen | largest worker USS at the peak | steps | wall (s) |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for M in args.loader_num_captions:
        mean = jsonl_folder(work / f"jsonl-{M}", M)
        r = launch(args, "loader", M, 1, work / f"jsonl-{M}")[0]
        lines.append(f"| {M:,} | {mean:.0f} | {r['data']:.0f} | {r['first']['pss']:.0f} | {r['peak']['pss']:.0f} | "
                     f"{r['peak']['main_pss']:.0f} | {r['peak']['workers']} | {r['peak']['worker_uss']:.0f} | "
                     f"{r['steps']} | {r['seconds']:.1f} |")
        print(lines[-1], flush=True)
    return lines


def launch(args, kind: str, M: int, world: int, out: Path) -> list:
    """`world` rank processes of this script's `--worker kind`; their JSON results."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in range(world):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
        cmd = [sys.executable, __file__, "--worker", kind, "--M", str(M), "--out", str(out),
               "--text-len", str(args.text_len), "--batch-size", str(args.batch_size), "--samples", str(args.samples),
               "--workers", str(args.workers), "--loader-batch", str(args.loader_batch),
               "--loader-steps", str(args.loader_steps)]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results = []
    for p in procs:
        stdout, stderr = p.communicate()
        if p.returncode:
            sys.exit(f"error: a {kind} rank failed:\n{stderr[-3000:]}")
        results.append(json.loads(stdout.strip().splitlines()[-1]))
    return results


def disk(folder: Path) -> tuple:
    """(allocated, apparent) bytes of the files under `folder`."""
    files = [f for f in folder.rglob("*") if f.is_file()]
    return sum(f.stat().st_blocks * 512 for f in files), sum(f.stat().st_size for f in files)


# ------------------------------------------------------------------------------------------------------ the tables
def store_table(args, work: Path) -> list:
    base = launch(args, "baseline", 0, 1, work)[0]["peak"]
    lines = [f"Baseline (a process that imports, loads MiniLM and encodes 20 batches of {args.batch_size}): {base:.0f} "
             "MiB peak RSS.", "",
             "| M captions | ranks | caption list (MiB) | peak RSS, build (MiB/rank) | read-back growth (MiB/rank) | "
             "build wall (s) | build CPU (s/rank) | read wall (s/rank) | disk (GB) | the old in-RAM array (MiB) | "
             "rows equal a direct encoding |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    walls, peaks = {}, {}
    for M in args.num_captions:
        for world in args.ranks:
            out = work / f"store-{M}-{world}"
            res = launch(args, "store", M, world, out)
            caps = max(r["captions"] for r in res)
            peaks[M, world] = max(r["build_peak"] for r in res), caps
            walls[M, world] = max(r["build_s"] for r in res)
            allocated, apparent = disk(out / "text")
            lines.append(f"| {M:,} | {world} | {caps:.0f} | {peaks[M, world][0]:.0f} | "
                         f"{max(r['read_growth'] for r in res):.0f} | {walls[M, world]:.1f} | "
                         f"{max(r['build_cpu_s'] for r in res):.1f} | "
                         f"{max(r['read_s'] for r in res):.1f} | {allocated / 1e9:.3f} (apparent {apparent / 1e9:.3f}) "
                         f"| {apparent / MiB:.0f} | {'yes' if res[0]['equal'] else 'NO'} |")
            print(lines[-1], flush=True)
    lines.append("")
    lo, hi = min(args.num_captions), max(args.num_captions)
    for world in args.ranks if hi > lo else ():
        (p_lo, c_lo), (p_hi, c_hi) = peaks[lo, world], peaks[hi, world]
        lines.append(f"{world} rank(s): peak RSS less the baseline {p_lo - base:.0f} -> {p_hi - base:.0f} MiB/rank "
                     f"from {lo:,} to {hi:,} captions, of which the caption list grew {c_hi - c_lo:.0f} MiB; "
                     f"without it {p_lo - base - c_lo:.0f} -> {p_hi - base - c_hi:.0f} MiB")
    for M in args.num_captions if 1 in args.ranks and 2 in args.ranks else ():
        lines.append(f"M = {M:,}: 2 ranks take {walls[M, 2] / walls[M, 1]:.2f}x the wall of 1 rank (target <= 0.6; "
                     "the wall includes loading the encoder)")
    return lines


def latents_table(args, work: Path) -> list:
    from textok import TexTok
    torch.manual_seed(0)
    TexTok(get_preset("tiny").model).save_pretrained(work / "tokenizer")
    seconds = {w: max(r["seconds"] for r in launch(args, "latents", args.images, w, work)) for w in (1, 2)}
    Z1, Z2 = (np.load(work / f"Z-{w}" / "Z.npy") for w in (1, 2))
    return [f"Stage 2: {args.images} embedded images, tiny-preset TexTok (random weights), batch 16, 1 loader worker "
            f"per rank: Z {Z1.shape} from 2 ranks {'bit-identical to' if np.array_equal(Z1, Z2) else 'DIFFERS from'} "
            f"1 rank's ({seconds[1]:.1f} s vs {seconds[2]:.1f} s)."]


def step_cost_table(work: Path, repeats: int = 20) -> list:
    """--text-cache off against the store on the tiny preset: the condition of one batch, and one generator step."""
    import torch.nn.functional as F

    from conditions import Conditioned
    from embedded_sets import ShapesDataset
    from textok import TexTok
    preset = get_preset("tiny")
    cfg, B = preset.model, preset.train.batch_size
    ds = ShapesDataset("train", cfg.image_size, 1024)
    stored, fly = Conditioned.for_model(ds, cfg, work), Conditioned.for_model(ds, cfg, work, text_cache="off")
    model = TexTok(cfg)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    rng = np.random.default_rng(0)

    def timed(*fns):  # interleaved, so a change in the machine's load hits all alike
        times = np.zeros((repeats, len(fns)))
        for r in range(repeats):
            idx = rng.choice(len(ds), B, replace=False).tolist()
            for k, fn in enumerate(fns):
                t0 = time.perf_counter()
                fn(idx)
                times[r, k] = time.perf_counter() - t0
        return np.median(times, axis=0) * 1e3

    images = torch.stack([ds[i]["image"] for i in range(B)])

    def step(idx):
        loss = F.mse_loss(model(images, stored.batch(idx))[0], images)
        loss.backward()
        opt.step()
        opt.zero_grad()
    fly.batch([0])  # loads the encoder
    read, encode, full = timed(stored.batch, fly.batch, step)
    return [f"Per step, tiny preset (batch {B}, {cfg.text_len} MiniLM tokens, {torch.get_num_threads()} threads), "
            f"median of {repeats}:", "",
            "| condition of one batch | ms | generator step (l2, Adam) incl. the store read | ms | off / on per step |",
            "|---|---:|---|---:|---:|",
            f"| store read (--text-cache on) | {read:.1f} | on | {full:.1f} | 1.00 |",
            f"| MiniLM encoding (--text-cache off) | {encode:.1f} | off (estimated: step - read + encoding) | "
            f"{full - read + encode:.1f} | {(full - read + encode) / full:.2f} |"]


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        torch.set_num_threads(1)  # one device per rank
        kinds = {"store": worker_store, "baseline": worker_baseline, "latents": worker_latents, "loader": worker_loader,
                 "latents_read": worker_latents_read}
        print(json.dumps(kinds[args.worker](args)))
        return
    work = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="textok-scale-"))
    lines = [f"bench/scale.py {' '.join(sys.argv[1:])}: {platform.processor() or platform.machine()}, "
             f"{os.cpu_count()} CPUs, torch {torch.__version__}, MiniLM at --text-len {args.text_len}", ""]
    print(lines[0], flush=True)
    if args.num_captions:
        lines += store_table(args, work)
    if args.latents:
        lines += [""] + latents_table(args, work)
        print(lines[-1], flush=True)
    if args.step_cost:
        lines += [""] + step_cost_table(work)
    if args.loader_num_captions:
        lines += [""] + loader_table(args, work)
    if args.latent_rows:
        lines += [""] + latent_read_table(args, work)
    print("\n".join(lines))
    if not args.out:
        import shutil
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
