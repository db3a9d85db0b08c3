"""The training checkpoint, one format for both stages: OUT/step-XXXXXXX/ (state.safetensors + state.json +
config.json), written under a temporary name and renamed, with OUT/latest naming the newest."""
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError

from runtime.errors import InputError
from runtime.files import atomic_write, load_json, load_state, load_tensors, remove_path, save_json, save_tensors


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
    remove_path(tmp)  # a link there is removed, never written through
    try:
        tensors = {}
        skeleton = _pack({k: v.state_dict() for k, v in objects.items()}, tensors, "s")
        save_tensors(tensors, tmp / "state.safetensors")
        save_json({"step": step, "state": skeleton}, tmp / "state.json")
        save_json(run_config, tmp / "config.json")
        remove_path(final)
        os.replace(tmp, final)
        atomic_write(out / "latest", lambda t: Path(t).write_text(final.name + "\n"))
    except (OSError, SafetensorError) as e:
        raise InputError(f"{final}: cannot write the checkpoint ({e})") from None
    finally:  # also on Ctrl-C
        remove_path(tmp)
    return final


def load_checkpoint(out: Path, objects: dict, check_config, map_location) -> int:
    """Restores `objects` from OUT/latest (modules strictly, naming mismatches) after `check_config(saved config,
    path)` accepted its config.json; returns the checkpoint's step."""
    ckpt = latest_checkpoint(out, check_config)
    meta = load_json(ckpt / "state.json")
    tensors = {k: v.to(map_location) for k, v in load_tensors(ckpt / "state.safetensors").items()}
    try:  # a state.json edited by hand, or of another program: one line, not a KeyError
        step, states = meta["step"], _unpack(meta["state"], tensors)
        if not isinstance(step, int) or isinstance(step, bool) or step < 0:
            raise ValueError(f"step {step!r} is not a step number")
        for name, obj in objects.items():
            if isinstance(obj, torch.nn.Module):
                load_state(obj, states[name], f"{ckpt}: {name}")
            else:
                obj.load_state_dict(states[name])
    except InputError:
        raise
    except (KeyError, IndexError, TypeError, ValueError, AttributeError) as e:
        raise InputError(f"{ckpt / 'state.json'}: not a training state this run can resume from "
                         f"({type(e).__name__}: {e})") from None
    return step


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
            + sorted(out.glob("recon-*.png")) if os.path.lexists(p)]  # a dangling link too


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
