"""Small shared utilities that know nothing of the models: the user-input error, atomic file writing, safetensors
weights and the one training-checkpoint format (both stages), the image grid writer, bf16 autocast."""
import json
import os
import shutil
import sys
import tempfile
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file


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


def save_image_grid(images: torch.Tensor, path, ncol: int, pad: int = 2) -> Path:
    """Writes images [B, 3, H, W] in [-1, 1] as one PNG grid with `ncol` columns, atomically."""
    x = to_uint8(images)
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
def setup_distributed():
    """(rank, world, device) from torchrun's environment: NCCL on CUDA, gloo on CPU; (0, 1, device) otherwise."""
    cuda = torch.cuda.is_available()
    if "RANK" not in os.environ:
        return 0, 1, torch.device("cuda" if cuda else "cpu")
    dist.init_process_group("nccl" if cuda else "gloo")
    device = torch.device(f"cuda:{int(os.environ['LOCAL_RANK'])}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    return dist.get_rank(), dist.get_world_size(), device


def global_mean(x: torch.Tensor, world: int) -> torch.Tensor:
    """Mean of a tensor across ranks (a detached float copy)."""
    x = x.detach().float().clone()
    if world > 1:
        dist.all_reduce(x)
        x /= world
    return x


def all_reduce_grads(module: torch.nn.Module, world: int) -> None:
    """Averages gradients across ranks (for modules not wrapped in DDP, e.g. D with the R1 double backward)."""
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


def save_checkpoint(out: Path, step: int, objects: dict, run_config: dict, keep: int = 2) -> Path:
    """Writes the `state_dict()` of every object (modules, optimizers, schedulers) to OUT/step-XXXXXXX/
    (state.safetensors + state.json + config.json) under a temporary name, renames it, then points OUT/latest at it;
    checkpoints older than the newest `keep` are removed."""
    out = Path(out)
    final, tmp = out / f"step-{step:07d}", out / f".tmp-step-{step:07d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tensors = {}
    skeleton = _pack({k: v.state_dict() for k, v in objects.items()}, tensors, "s")
    save_tensors(tensors, tmp / "state.safetensors")
    save_json({"step": step, "state": skeleton}, tmp / "state.json")
    save_json(run_config, tmp / "config.json")
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    (out / ".latest.tmp").write_text(final.name + "\n")
    os.replace(out / ".latest.tmp", out / "latest")
    for old in sorted(out.glob("step-*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(out: Path, objects: dict, check_config, map_location) -> int:
    """Restores `objects` from OUT/latest (modules strictly, naming mismatches) after `check_config(saved config,
    path)` accepted its config.json; returns the checkpoint's step."""
    latest = Path(out) / "latest"
    if not latest.is_file():
        raise InputError(f"{latest}: no checkpoint to resume from")
    ckpt = latest.parent / latest.read_text().strip()
    check_config(load_json(ckpt / "config.json"), ckpt / "config.json")
    meta = load_json(ckpt / "state.json")
    tensors = {k: v.to(map_location) for k, v in load_tensors(ckpt / "state.safetensors").items()}
    states = _unpack(meta["state"], tensors)
    for name, obj in objects.items():
        if isinstance(obj, torch.nn.Module):
            load_state(obj, states[name], f"{ckpt}: {name}")
        else:
            obj.load_state_dict(states[name])
    return meta["step"]
