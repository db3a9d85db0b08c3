"""The on-disk row store: .npy arrays read and written a few rows at a time (`NpyRows`), and folders of them built
once by all ranks together (`build_once`): the text-embedding store and the latent cache."""
import math
import os
import shutil
from pathlib import Path

import numpy as np

from distributed import barrier
from errors import InputError


class NpyRows:
    """A .npy array on disk, read and written a few rows at a time with os.pread / os.pwrite: never a memory map, so
    a process's memory does not grow with the rows it touches. Picklable (each process opens its own descriptor)."""

    def __init__(self, path, writable: bool = False):
        self.path, self.writable, self._fd, self._pid = Path(path), writable, None, None
        try:
            with open(self.path, "rb") as f:
                version = np.lib.format.read_magic(f)
                read_header = np.lib.format.read_array_header_2_0 if version == (2, 0) else \
                    np.lib.format.read_array_header_1_0  # np.save writes 1.0 (2.0 for huge headers)
                self.shape, fortran, self.dtype = read_header(f)
                self.offset, size = f.tell(), os.fstat(f.fileno()).st_size
        except (OSError, ValueError) as e:
            raise InputError(f"{self.path}: not a readable .npy file ({str(e).splitlines()[0]})") from None
        if self.dtype.hasobject or fortran or not self.shape:
            raise InputError(f"{self.path}: not an array of rows (dtype {self.dtype}, shape {self.shape}, "
                             f"{'Fortran' if fortran else 'C'} order)")
        self.row_bytes = math.prod(self.shape[1:]) * self.dtype.itemsize
        need = self.offset + self.shape[0] * self.row_bytes
        if size < need:
            raise InputError(f"{self.path}: {size:,} bytes where its header needs {need:,} (truncated)")

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

    def __del__(self):  # also after a failed __init__: _fd is set first
        if self._fd is not None and self._pid == os.getpid():
            os.close(self._fd)


def open_built(folder, arrays: dict) -> dict:
    """{name: NpyRows} of a built folder, each file checked against `arrays` ({name: (shape, dtype)}, None in a shape
    matching any size): one that is missing, unreadable, truncated or of another shape or dtype is an InputError that
    says to delete the folder."""
    folder, files = Path(folder), {}
    for name, (shape, dtype) in arrays.items():
        try:
            rows = NpyRows(folder / f"{name}.npy")
        except InputError as e:
            raise InputError(f"{e}; delete {folder} to recompute it") from None
        fits = len(rows.shape) == len(shape) and all(s in (None, r) for s, r in zip(shape, rows.shape))
        if not fits or rows.dtype != np.dtype(dtype):
            raise InputError(f"{rows.path}: {rows.dtype} {rows.shape}, expected {np.dtype(dtype)} {tuple(shape)}; "
                             f"delete {folder} to recompute it")
        files[name] = rows
    return files


def build_once(folder, arrays: dict, fill, rank: int = 0, world: int = 1, what: str = "cache", advice: str = "") -> Path:
    """The folder of .npy files `arrays` ({name: (shape, dtype)}), computed once by all ranks together: rank 0 makes
    the files in a temporary folder, every rank calls `fill({name: NpyRows})` to write its share, and rank 0 renames
    the folder once every rank is done, so a killed build never leaves a folder that looks complete. Every rank must
    call it (it holds barriers), and all must see the same `folder` (one node, or a shared file system). Rank 0
    prints the disk it needs first; too little free space is an InputError (ending with `advice`) on every rank."""
    folder = Path(folder)
    if folder.is_dir():
        open_built(folder, arrays)
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
