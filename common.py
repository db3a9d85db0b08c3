"""Small shared utilities that know nothing of the models: the user-input error, atomic file writing, safetensors
weights and the one training-checkpoint format (both stages), the image grid writer, bf16 autocast."""
import datetime
import json
import math
import os
import shutil
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm


class InputError(ValueError):
    """A problem with what the user gave (data, flags, config, checkpoint, .npz, missing weights): the entry points
    print it as one line, `error: <file>: <problem>`, and exit non-zero (`run_main`). Bugs raise anything else and
    keep their tracebacks."""


class MissingInput(InputError, FileNotFoundError):
    """An `InputError` for a file that is not there."""


def run_main(main) -> None:
    """Runs an entry point's `main()`; an `InputError` ends it with one line, `error: <message>`, and exit code 1."""
    try:
        main()
    except InputError as e:
        sys.exit(f"error: {e}")


def autocast(device, precision: str = "auto"):
    """bf16 autocast on CUDA ("auto"/"bf16"), none on CPU unless asked: measured slower there (README)."""
    device = torch.device(device)
    bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()


def atomic_write(path, write) -> Path:
    """Calls write(tmp_path) on a temporary file beside `path`, then renames it to `path`: never a half file.
    The file gets the usual permissions (0666 less the umask), not mkstemp's owner-only 0600."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix)
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def save_json(obj, path) -> Path:
    """Writes `obj` as indented JSON, atomically."""
    return atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(obj, indent=2) + "\n"))


def load_json(path) -> dict:
    """Reads a JSON file; a missing or malformed file is an error that names it."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise MissingInput(f"{path}: file not found") from None
    except json.JSONDecodeError as e:
        raise InputError(f"{path}: not valid JSON ({e})") from None
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start})") from None


def read_lines(path) -> list:
    """The lines of a UTF-8 text file (a leading BOM dropped), split on "\\n" only, each without its "\\r\\n" or "\\n":
    a caption may hold U+2028 or another separator that str.splitlines() would split at. A missing file or bytes that
    are not UTF-8 are an error naming the file (and the line)."""
    try:
        raw = Path(path).read_bytes().removeprefix(b"\xef\xbb\xbf")
    except FileNotFoundError:
        raise MissingInput(f"{path}: file not found") from None
    except OSError as e:
        raise InputError(f"{path}: cannot read the file ({e.strerror})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise InputError(f"{path}:{line}: not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start})") from None
    return [line.removesuffix("\r") for line in text.split("\n")]


def save_tensors(tensors: dict, path) -> Path:
    """Writes a dict of tensors as safetensors, atomically (contiguous CPU copies, shared storage allowed)."""
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    return atomic_write(path, lambda tmp: save_file(tensors, tmp))


def load_tensors(path) -> dict:
    """Reads a safetensors file onto the CPU; a missing or corrupt file is an error that names it."""
    if not Path(path).is_file():
        raise MissingInput(f"{path}: checkpoint file not found")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise InputError(f"{path}: not a readable safetensors file ({e})") from None


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """Images [B, 3, H, W] in [-1, 1] -> uint8 [B, H, W, 3] (the ADM .npz layout)."""
    x = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def save_image_grid(images: torch.Tensor, path, ncol: int, pad: int = 2, min_side: int = 128) -> Path:
    """Writes images [B, 3, H, W] in [-1, 1] as one PNG grid with `ncol` columns, atomically. Images smaller than
    `min_side` are enlarged by the smallest whole factor that reaches it, nearest neighbour (a 32 px image: 4 x 4
    pixels per pixel), so small images stay readable and sharp."""
    x = to_uint8(images)
    factor = -(-min_side // max(x.shape[1:3]))  # ceil; 1 for images of min_side and larger
    x = x.repeat(factor, 1).repeat(factor, 2) if factor > 1 else x
    B, H, W, _ = x.shape
    nrow = -(-B // ncol)
    grid = np.full((nrow * (H + pad) + pad, ncol * (W + pad) + pad, 3), 255, np.uint8)
    for i, img in enumerate(x):
        r, c = divmod(i, ncol)
        grid[pad + r * (H + pad): pad + r * (H + pad) + H, pad + c * (W + pad): pad + c * (W + pad) + W] = img
    return atomic_write(path, lambda tmp: Image.fromarray(grid).save(tmp, format="PNG"))


def load_state(module: torch.nn.Module, state: dict, path) -> None:
    """Loads `state` into `module` strictly; a mismatch is an error naming the file and the differing tensors."""
    own = module.state_dict()
    problems = [f"missing {k}" for k in own if k not in state] + [f"unexpected {k}" for k in state if k not in own]
    problems += [f"{k}: shape {tuple(state[k].shape)} != {tuple(v.shape)}" for k, v in own.items()
                 if k in state and state[k].shape != v.shape]
    if problems:
        raise InputError(f"{path}: checkpoint does not fit this model ({len(problems)} problems: "
                         + "; ".join(problems[:6]) + ")")
    module.load_state_dict(state)


# ---------------------------------------------------------------------------------------- torchrun (DDP) helpers
def setup_distributed(timeout: float = 7200):
    """(rank, world, device) from torchrun's environment: NCCL on CUDA, gloo on CPU; (0, 1, device) otherwise.
    A rank waits up to `timeout` seconds at a collective: first-time caches are built between barriers."""
    cuda = torch.cuda.is_available()
    if "RANK" not in os.environ:
        return 0, 1, torch.device("cuda" if cuda else "cpu")
    dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=timeout))
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


class NpyRows:
    """A .npy array on disk, read and written a few rows at a time with os.pread / os.pwrite: never a memory map, so
    a process's memory does not grow with the rows it touches. Picklable (each process opens its own descriptor)."""

    def __init__(self, path, writable: bool = False):
        self.path, self.writable = Path(path), writable
        try:
            header = np.load(self.path, mmap_mode="r")  # reads the header; maps no page
        except (OSError, ValueError) as e:
            raise InputError(f"{self.path}: not a readable .npy file ({e})") from None
        self.shape, self.dtype, self.offset = header.shape, header.dtype, header.offset
        self.row_bytes = int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize
        self._fd = self._pid = None

    @classmethod
    def create(cls, path, shape, dtype) -> "NpyRows":
        """A new file of `shape` and `dtype`, its rows not yet written (a sparse file: disk fills as rows arrive)."""
        np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=tuple(shape))  # header; the map is dropped
        return cls(path, writable=True)

    def __len__(self):
        return self.shape[0]

    def __getstate__(self):
        return {**self.__dict__, "_fd": None, "_pid": None}

    def fd(self) -> int:
        if self._pid != os.getpid():  # a forked DataLoader worker opens its own
            self._fd, self._pid = os.open(self.path, os.O_RDWR if self.writable else os.O_RDONLY), os.getpid()
        return self._fd

    def read(self, start: int, stop: int) -> np.ndarray:
        """Rows start..stop as a new array."""
        out = np.empty((stop - start, *self.shape[1:]), self.dtype)
        view, at = memoryview(out.reshape(-1).view(np.uint8)), self.offset + start * self.row_bytes
        while len(view):
            n = os.preadv(self.fd(), [view], at)
            if n == 0:
                raise InputError(f"{self.path}: file ends before row {stop} (truncated)")
            view, at = view[n:], at + n
        return out

    def __getitem__(self, i: int) -> np.ndarray:
        return self.read(i, i + 1)[0]

    def write(self, start: int, rows: np.ndarray) -> None:
        """Writes `rows` (converted to the file's dtype) from row `start` on."""
        view = memoryview(np.ascontiguousarray(rows, self.dtype).reshape(-1).view(np.uint8))
        at = self.offset + start * self.row_bytes
        while len(view):
            n = os.pwrite(self.fd(), view, at)
            view, at = view[n:], at + n

    def flush(self) -> None:
        if self._fd is not None:
            os.fsync(self._fd)

    def __del__(self):
        if self._fd is not None and self._pid == os.getpid():
            os.close(self._fd)


def build_once(folder, arrays: dict, fill, rank: int = 0, world: int = 1, what: str = "cache", advice: str = "") -> Path:
    """The folder of .npy files `arrays` ({name: (shape, dtype)}), computed once by all ranks together: rank 0 makes
    the files in a temporary folder, every rank calls `fill({name: NpyRows})` to write its share, and rank 0 renames
    the folder once every rank is done, so a killed build never leaves a folder that looks complete. Every rank must
    call it (it holds barriers), and all must see the same `folder` (one node, or a shared file system). Rank 0
    prints the disk it needs first; too little free space is an InputError (ending with `advice`) on every rank."""
    folder = Path(folder)
    if folder.is_dir():
        return folder
    tmp = folder.with_name(f".{folder.name}.tmp")
    folder.parent.mkdir(parents=True, exist_ok=True)
    need = sum(math.prod(shape) * np.dtype(dtype).itemsize for shape, dtype in arrays.values())
    leftover = sum(f.stat().st_blocks * 512 for f in tmp.glob("*"))  # a killed build's files, removed below
    free = shutil.disk_usage(folder.parent).free + leftover
    if rank == 0:
        print(f"{what}: {need / 1e9:.2f} GB on disk in {folder} ({free / 1e9:.1f} GB free)")
    if need > free:
        raise InputError(f"{folder.parent}: {what} need {need / 1e9:.1f} GB and {free / 1e9:.1f} GB are free; free "
                         f"space or choose another --cache-dir{advice}")
    barrier(world)  # every rank has looked at the leftovers before rank 0 removes them
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        for name, (shape, dtype) in arrays.items():
            NpyRows.create(tmp / f"{name}.npy", shape, dtype)
    barrier(world)
    if not tmp.is_dir():
        raise InputError(f"{folder.parent}: rank {rank} does not see the folder rank 0 made; the cache folder must be "
                         "shared by all ranks")
    files = {name: NpyRows(tmp / f"{name}.npy", writable=True) for name in arrays}
    fill(files)
    for f in files.values():
        f.flush()
    barrier(world)
    if rank == 0:
        os.replace(tmp, folder)
    barrier(world)
    return folder


def global_mean(x: torch.Tensor, world: int) -> torch.Tensor:
    """Mean of a tensor across ranks (a detached float copy)."""
    x = x.detach().float().clone()
    if world > 1:
        dist.all_reduce(x)
        x /= world
    return x


def all_reduce_grads(module: torch.nn.Module, world: int) -> None:
    """Averages gradients across ranks (for modules not wrapped in DDP, e.g. the discriminator with the R1 double
    backward)."""
    if world > 1:
        for p in module.parameters():
            if p.grad is not None:
                dist.all_reduce(p.grad)
                p.grad /= world


# ------------------------------------------------------------------------------ training checkpoints (both stages)
def _pack(obj, tensors, prefix=""):
    """Splits a nested state (dicts, lists, tensors, numbers) into JSON plus a flat tensor dict for safetensors."""
    if isinstance(obj, torch.Tensor):
        tensors[prefix] = obj
        return {"__tensor__": prefix}
    if isinstance(obj, dict):
        items = {str(k): _pack(v, tensors, f"{prefix}.{k}") for k, v in obj.items()}
        return {"__intkeys__": items} if obj and all(isinstance(k, int) for k in obj) else items
    if isinstance(obj, (list, tuple)):
        return [_pack(v, tensors, f"{prefix}.{i}") for i, v in enumerate(obj)]
    return obj


def _unpack(obj, tensors):
    """Inverse of `_pack`."""
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__intkeys__" in obj:
            return {int(k): _unpack(v, tensors) for k, v in obj["__intkeys__"].items()}
        return {k: _unpack(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_unpack(v, tensors) for v in obj]
    return obj


def save_checkpoint(out: Path, step: int, objects: dict, run_config: dict) -> Path:
    """Writes the `state_dict()` of every object (modules, optimizers, schedulers) to OUT/step-XXXXXXX/
    (state.safetensors + state.json + config.json) under a temporary name, renames it, then points OUT/latest at it.
    A failed write (disk full) leaves no temporary folder and raises an InputError naming the checkpoint."""
    out = Path(out)
    final, tmp = out / f"step-{step:07d}", out / f".tmp-step-{step:07d}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tensors = {}
        skeleton = _pack({k: v.state_dict() for k, v in objects.items()}, tensors, "s")
        save_tensors(tensors, tmp / "state.safetensors")
        save_json({"step": step, "state": skeleton}, tmp / "state.json")
        save_json(run_config, tmp / "config.json")
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        atomic_write(out / "latest", lambda t: Path(t).write_text(final.name + "\n"))
    except (OSError, SafetensorError) as e:
        raise InputError(f"{final}: cannot write the checkpoint ({e})") from None
    finally:  # also on Ctrl-C
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def load_checkpoint(out: Path, objects: dict, check_config, map_location) -> int:
    """Restores `objects` from OUT/latest (modules strictly, naming mismatches) after `check_config(saved config,
    path)` accepted its config.json; returns the checkpoint's step."""
    ckpt = latest_checkpoint(out, check_config)
    meta = load_json(ckpt / "state.json")
    tensors = {k: v.to(map_location) for k, v in load_tensors(ckpt / "state.safetensors").items()}
    states = _unpack(meta["state"], tensors)
    for name, obj in objects.items():
        if isinstance(obj, torch.nn.Module):
            load_state(obj, states[name], f"{ckpt}: {name}")
        else:
            obj.load_state_dict(states[name])
    return meta["step"]


def latest_checkpoint(out: Path, check_config) -> Path:
    """The checkpoint OUT/latest names, once `check_config(saved config, path)` accepted its config.json."""
    latest = Path(out) / "latest"
    if not latest.is_file():
        raise InputError(f"{latest}: no checkpoint to resume from")
    ckpt = latest.parent / latest.read_text().strip()
    check_config(load_json(ckpt / "config.json"), ckpt / "config.json")
    return ckpt


def run_files(out: Path, export: str) -> list:
    """What a training run leaves in OUT, `latest` first: its checkpoints (and unfinished ones), log, config, PNG
    grids and exported model folder `export`."""
    out = Path(out)
    names = ["latest", "log.jsonl", "config.json", export]
    return [p for p in [out / n for n in names] + sorted(out.glob("step-*")) + sorted(out.glob(".tmp-step-*"))
            + sorted(out.glob("recon-*.png")) if p.exists()]


def remove_run(out: Path, files: list) -> None:
    """Deletes `files` (a previous run's, from `run_files`) from OUT: moved into a hidden OUT/.trash-* folder, in
    order (`latest` first), then deleted with any trash folder a killed deletion left behind."""
    out = Path(out)
    if files:
        trash = Path(tempfile.mkdtemp(dir=out, prefix=".trash-"))
        for p in files:
            os.replace(p, trash / p.name)
    for trash in out.glob(".trash-*"):
        shutil.rmtree(trash, ignore_errors=True)


# ---------------------------------------------------------------------------------- the training loops' shared part
class Run:
    """What train.py's two loops share: output folder, JSONL log, tqdm progress, exact resume and checkpoints, the
    micro-batch split, DDP and torch.compile, the non-finite guard. `args` are train.py's parsed flags;
    `check_config(saved, path)` refuses to resume from a checkpoint of another run config. OUT holding another run
    is refused unless --resume (continue it) or --overwrite (delete it first); nothing in OUT changes before
    training starts."""

    def __init__(self, args, rank, world, device, run_config, num_items, batch_size, epochs, check_config):
        self.args, self.rank, self.world, self.device, self.run_config = args, rank, world, device, run_config
        self.check_config = check_config
        self.out = Path(args.out or f"runs/{args.stage}")
        self.export = "tokenizer" if args.stage == "tokenizer" else "dit"  # the EMA model's save_pretrained folder
        self.total = max(1, num_items // batch_size) * epochs  # the schedule's length; --max-steps stops earlier
        self.stop = min(self.total, args.max_steps) if args.max_steps else self.total
        self.micro = batch_size // (world * args.grad_accum)  # per-rank micro-batch of one accumulation step
        if self.micro * world * args.grad_accum != batch_size:
            raise InputError(f"--batch-size {batch_size} is not divisible by {world} ranks x {args.grad_accum} "
                             "accumulation steps")
        self.last_ckpt, self.ckpts, self.done, self.t0, self.seen = None, [], None, time.perf_counter(), 0
        args.run = self  # train.main reads where a Ctrl-C stopped it
        if args.resume:  # refused here, before anything is written: no checkpoint, or one of another config
            self.last_ckpt = latest_checkpoint(self.out, check_config)
        elif not args.overwrite:
            self.refuse_held_run()

    def refuse_held_run(self) -> None:
        """Refuses an OUT that holds another run's checkpoints, log or exported model."""
        latest, ckpts = self.out / "latest", sorted(p.name for p in self.out.glob("step-*"))
        if latest.is_file():
            raise InputError(f"{self.out}: holds a run (latest {latest.read_text().strip()}); continue it with "
                             "--resume, or start over with --overwrite")
        held = ckpts[-1:] or [p.name for p in (self.out / "log.jsonl", self.out / self.export) if p.exists()]
        if held:
            raise InputError(f"{self.out}: holds a run's files ({held[0]}) but no latest checkpoint; start over "
                             "with --overwrite")

    def last_good(self) -> str:
        return f"last good checkpoint: {self.last_ckpt or 'none written yet'}"

    def interrupted(self) -> str:
        """Where a Ctrl-C stopped the run, and how to continue it."""
        where = "before the first step" if self.done is None else f"after step {self.done} of {self.stop}"
        return f"interrupted {where}; {self.last_good()}" + (" (continue with --resume)" if self.last_ckpt else "")

    def micro_batches(self, batch: dict):
        """(micro-batch, sync) for each accumulation step of `batch`: sync is True where DDP should all-reduce
        (the last micro-batch, or always with one rank)."""
        for i in range(self.args.grad_accum):
            s = slice(i * self.micro, (i + 1) * self.micro)
            last = self.world == 1 or i == self.args.grad_accum - 1
            yield {k: v.part(s) if k == "cond" else v[s] for k, v in batch.items()}, last

    def wrap(self, model):
        """DDP across ranks (when there are several), then torch.compile (default on CUDA)."""
        net = DDP(model, device_ids=[self.device.index] if self.device.type == "cuda" else None) if self.world > 1 \
            else model
        compile_ = self.device.type == "cuda" if self.args.compile is None else self.args.compile
        return torch.compile(net) if compile_ else net

    def log(self, step: int, terms: dict, batch_size: int, name: str = "img_per_s") -> None:
        """Logs the mean over ranks of `terms` with throughput (and peak GPU memory on CUDA)."""
        self.seen += batch_size
        if step % self.args.log_every and step != self.stop:
            return
        row = {"step": step, **{k: float(f"{global_mean(torch.tensor(v), self.world).item():.6g}")
                                for k, v in terms.items()},
               name: round(self.seen / (time.perf_counter() - self.t0), 2)}
        if self.device.type == "cuda":
            row["peak_mem_gib"] = round(torch.cuda.max_memory_allocated(self.device) / 2 ** 30, 2)
        self.write_log(row)
        self.bar.set_postfix({k: f"{v:.4g}" for k, v in row.items() if k != "step"}, refresh=False)

    def write_log(self, row: dict) -> None:
        if self.rank == 0:
            with open(self.out / "log.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")

    def check_finite(self, step: int, terms: dict) -> None:
        bad = [k for k, v in terms.items() if not math.isfinite(float(v))]
        if bad:
            raise FloatingPointError(
                f"non-finite loss at step {step}: " + ", ".join(f"{k}={float(v):.4g}" for k, v in terms.items())
                + f"; {self.last_good()}")

    def steps(self, make_loader, objects: dict, seed: int):
        """Resumes `objects` with --resume (or deletes the run in OUT with --overwrite) and writes OUT/config.json,
        then yields (step, batch on the device) from `make_loader(start, stop, micro-batch x accumulation)` with the
        checkpoint cadence and every random draw seeded by (seed, step, rank)."""
        start = 0
        if self.args.resume:
            start = load_checkpoint(self.out, objects, self.check_config, self.device)
            self.last_ckpt = self.out / f"step-{start:07d}"
            self.ckpts = [self.last_ckpt]
        if self.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
            remove_run(self.out, run_files(self.out, self.export) if self.args.overwrite else [])
            if self.args.resume:
                self.trim_log(start)
            save_json(self.run_config, self.out / "config.json")
        loader = make_loader(start, self.stop, self.micro * self.args.grad_accum)
        self.bar = tqdm(total=self.stop, initial=start, disable=self.rank != 0, desc=self.args.stage,
                        dynamic_ncols=True)
        self.done = start
        try:
            for step, batch in enumerate(self.checked(loader), start):
                torch.manual_seed(seed * 1_000_003 + step * self.world + self.rank)
                yield step, {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
                self.done = step + 1
                if self.rank == 0 and (self.done % self.args.ckpt_every == 0 or self.done == self.stop):
                    self.checkpoint(objects)
                self.bar.update(1)
        finally:
            self.bar.close()

    def checkpoint(self, objects: dict) -> None:
        """Writes checkpoint `self.done`, then removes this run's checkpoints (or the resumed one) but the newest 2:
        never a checkpoint some other run left."""
        try:
            self.last_ckpt = save_checkpoint(self.out, self.done, objects, self.run_config)
        except InputError as e:
            raise InputError(f"{e}; {self.last_good()}") from None
        self.ckpts.append(self.last_ckpt)
        for old in self.ckpts[:-2]:
            shutil.rmtree(old, ignore_errors=True)
        self.ckpts = self.ckpts[-2:]

    def trim_log(self, start: int) -> None:
        """Drops log rows after the resumed checkpoint (and a torn last line a killed run left): the log reads as
        one uninterrupted run."""
        path = self.out / "log.jsonl"
        if not path.is_file():
            return
        lines, rows = path.read_text().split("\n"), []
        for n, line in enumerate(lines, 1):
            try:
                if line.strip() and json.loads(line)["step"] <= start:
                    rows.append(line)
            except (json.JSONDecodeError, KeyError, TypeError):
                if n == len(lines):  # no newline after it: the write a killed run left unfinished
                    break
                raise InputError(f"{path}:{n}: not a JSON log row with a \"step\"") from None
        atomic_write(path, lambda tmp: Path(tmp).write_text("".join(r + "\n" for r in rows)))

    def checked(self, loader):
        """The loader's batches; bad data met mid-run (a truncated image, from a worker) is one InputError line that
        names the last good checkpoint."""
        batches = iter(loader)
        while True:
            try:
                batch = next(batches)
            except StopIteration:
                return
            except InputError as e:  # a worker's error arrives with its traceback: keep the message line
                message = str(e).strip().splitlines()[-1].split("InputError: ")[-1]
                raise InputError(f"{message}; {self.last_good()}") from None
            yield batch


# ------------------------------------------------------------------------------ pretrained folders or hub repo ids
def pretrained_folder(name_or_path, files=("config.json", "model.safetensors"), **hub) -> Path:
    """The folder holding `files`: `name_or_path` itself when it is a folder, else that Hugging Face model repo's
    snapshot (downloaded by huggingface_hub, or from its cache; `hub`: revision, cache_dir, local_files_only, token,
    force_download). A repo that cannot be had is an InputError naming it and how to download it."""
    path = Path(name_or_path)
    if path.is_dir():
        return path
    if path.is_absolute() or str(name_or_path).startswith((".", "~")) or path.parent.name and path.parent.is_dir():
        raise MissingInput(f"{name_or_path}: no such folder")  # a local path, not a repo id: no hub round trip
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, HFValidationError, HfHubHTTPError, LocalEntryNotFoundError
    name = str(name_or_path)
    try:
        paths = [Path(hf_hub_download(name, f, **hub)) for f in files]  # one snapshot folder holds them all
        return paths[0].parent
    except HFValidationError:
        raise MissingInput(f"{name}: no such folder (nor a Hugging Face repo id)") from None
    except (EntryNotFoundError, LocalEntryNotFoundError, HfHubHTTPError, OSError) as e:
        raise MissingInput(f"{name}: no such folder, and the Hugging Face model repo {name!r} could not be had "
                           f"({type(e).__name__}); download it with `hf download {name}` (or "
                           f"huggingface_hub.snapshot_download) where there is network, or give a local folder") \
            from None
