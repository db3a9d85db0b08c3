"""Small shared utilities: atomic file writing, the one safetensors checkpoint writer/reader, the image grid writer."""
import json
import os
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from config import config_diff


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
        raise FileNotFoundError(f"{path}: file not found") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def save_tensors(tensors: dict, path) -> Path:
    """Writes a dict of tensors as safetensors, atomically (contiguous CPU copies, shared storage allowed)."""
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    return atomic_write(path, lambda tmp: save_file(tensors, tmp))


def load_tensors(path) -> dict:
    """Reads a safetensors file onto the CPU; a missing or corrupt file is an error that names it."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: checkpoint file not found")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from None


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
        raise ValueError(f"{path}: checkpoint does not fit this model ({len(problems)} problems: "
                         + "; ".join(problems[:6]) + ")")
    module.load_state_dict(state)


def check_config(saved: dict, wanted: dict, path) -> None:
    """Refuses a checkpoint whose saved config differs from the requested one, naming the differing fields."""
    diff = config_diff(saved, wanted)
    if diff:
        raise ValueError(f"{path}: checkpoint config differs from the requested one: " + "; ".join(diff))
