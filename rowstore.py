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
