"""Reading and writing files safely: atomic writes (never a half file), files written in place never through a
symbolic link (open_own), an output folder held by one process at a time, JSON, UTF-8 lines, safetensors weights."""
import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import stat
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from runtime.errors import InputError, MissingInput


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


def open_own(path, flags: int, mode: int = 0o666) -> int:
    """os.open of a file the project writes in place (a lock, an appended log, a row store's .npy), never through a
    symbolic link (O_NOFOLLOW) and only a regular file (a FIFO neither blocks nor is used): a link, folder or other
    kind of file at `path` is an InputError naming it; so is, when opened for writing, a file with another name
    (a hard link: O_NOFOLLOW does not see it), checked before O_TRUNC empties it. Returns the descriptor. The other
    files are written beside and renamed over (atomic_write), which replaces a link and never writes to its target."""
    try:
        fd = os.open(path, (flags & ~os.O_TRUNC) | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, mode)
    except OSError as e:
        if e.errno == errno.ELOOP:
            refuse_link(path)
        if e.errno == errno.EISDIR:
            raise InputError(f"{path}: a folder where this project keeps its own file; remove it") from None
        raise
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        what = "a folder" if stat.S_ISDIR(info.st_mode) else "a FIFO, socket or device"
        raise InputError(f"{path}: {what} where this project keeps its own file; remove it")
    if flags & (os.O_WRONLY | os.O_RDWR) and info.st_nlink > 1:
        os.close(fd)
        raise InputError(f"{path}: a hard link (the file has {info.st_nlink} names) where this project keeps its own "
                         "file; it never writes through a link: remove the link")
    if flags & os.O_TRUNC:
        os.ftruncate(fd, 0)
    os.set_blocking(fd, True)
    return fd


def refuse_link(path) -> None:
    """An InputError if `path` is a symbolic link where the project keeps a file of its own (open_own)."""
    if os.path.islink(path):
        raise InputError(f"{path}: a symbolic link where this project keeps its own file; it never writes through a "
                         "link: remove the link")


def remove_path(path) -> None:
    """Deletes `path` if it is there: a folder with what it holds, a file, or a symbolic link (the link alone, never
    what it points to)."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.is_symlink() or path.exists():
        path.unlink(missing_ok=True)


def is_temporary(name: str) -> bool:
    """Whether `name` is one of atomic_write's temporary files (`.NAME.XXXXXXXX` + NAME's suffix, mkstemp's 8
    characters), which only a process killed between writing and renaming leaves behind."""
    found = re.fullmatch(r"\.(.+)\.[a-z0-9_]{8}(\.[^.]*)?", name)
    return bool(found) and (found[2] or "") == Path(found[1]).suffix


def remove_temporaries(folder) -> list:
    """Deletes the temporary files killed atomic writes left in `folder` (not in its subfolders); returns them."""
    stale = [p for p in Path(folder).glob(".*") if p.is_file() and is_temporary(p.name)]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


@contextmanager
def writing(path, after: str = ""):
    """Turns an OSError while writing `path` (read-only, disk full, a file where a folder should be) into one
    InputError naming `path` and the OS's reason, then `after`."""
    try:
        yield
    except InputError:
        raise
    except OSError as e:
        raise InputError(f"{path}: cannot write ({e.strerror or e}){after}") from None


def check_folder(path, flag: str) -> None:
    """Refuses an output folder `path` (the value of `flag`) that is a file, or lies inside one; writes nothing."""
    for p in (Path(path), *Path(path).parents):
        if p.exists():
            if not p.is_dir():
                inside = "" if p == Path(path) else f"; {flag} {path} would be inside it"
                raise InputError(f"{p}: a file, not a folder ({flag}){inside}")
            return


def lock_folder(folder, flag: str = "--out") -> int:
    """Holds output folder `folder` for this process: an advisory lock (fcntl.flock) on `folder/.lock`, which holds
    the pid. Returns its descriptor; closing it, or the process ending in any way (kill -9 too), releases it. A
    folder another process holds is an InputError naming that pid."""
    check_folder(folder, flag)
    with writing(folder, f" ({flag} must be a writable folder)"):
        Path(folder).mkdir(parents=True, exist_ok=True)
        fd = open_own(Path(folder) / ".lock", os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise InputError(f"{folder}: in use by another run (pid {holder}); wait for it to end, or choose another "
                         f"{flag}") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


@contextmanager
def holding(folder, flag: str = "--out"):
    """A context in which this process holds output folder `folder` (lock_folder)."""
    fd = lock_folder(folder, flag)
    try:
        yield
    finally:
        os.close(fd)


def file_sha1(path, length: int = 16) -> str:
    """The first `length` hex digits of the SHA-1 of file `path` (a model's weights: its identity)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha1").hexdigest()[:length]


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


def read_lines(path, digest=None):
    """The lines of a UTF-8 text file, one at a time (memory does not grow with the file): a leading BOM dropped,
    split on "\\n" only, each without its "\\r\\n" or "\\n" (a caption may hold U+2028 or another separator that
    str.splitlines() would split at), no empty line after the last newline. A missing file or bytes that are not UTF-8
    are an error naming the file (and the line); `digest` (a hashlib object) is fed the file's bytes."""
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        raise MissingInput(f"{path}: file not found") from None
    except OSError as e:
        raise InputError(f"{path}: cannot read the file ({e.strerror})") from None
    with f:
        at = 0
        for n, raw in enumerate(f, 1):  # binary lines end at b"\n" only
            if digest is not None:
                digest.update(raw)
            raw = raw.removeprefix(b"\xef\xbb\xbf") if n == 1 else raw
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise InputError(f"{path}:{n}: not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {at + e.start})") \
                    from None
            at += len(raw)
            yield text.removesuffix("\n").removesuffix("\r")


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


def weights_file(path) -> dict:
    """A state dict of tensors read with torch.load(weights_only=True); anything else is an InputError naming it."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch.load raises many types for a file that is not plain weights
        raise InputError(f"{path}: not a weights-only PyTorch file (torch.load(weights_only=True): "
                         f"{type(e).__name__})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise InputError(f"{path}: holds a {type(state).__name__}, not a state dict of tensors")
    return state
