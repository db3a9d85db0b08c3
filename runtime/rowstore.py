"""The on-disk row store: .npy arrays read and written a few rows at a time (`NpyRows`), and folders of them built
once by all ranks together (`build_once`): the text-embedding store and the latent cache."""
import math
import os
import shutil
from pathlib import Path

import numpy as np

from runtime.distributed import barrier, rank_share
from runtime.errors import InputError
from runtime.files import load_json, open_own, refuse_link, remove_path, save_json


class NpyRows:
    """A .npy array on disk, read and written a few rows at a time with os.pread / os.pwrite: never a memory map, so
    a process's memory does not grow with the rows it touches. Picklable (each process opens its own descriptor)."""

    def __init__(self, path, writable: bool = False):
        self.path, self.writable, self._fd, self._pid = Path(path), writable, None, None
        try:
            self.fd()  # never through a symbolic link (files.open_own)
            with open(self._fd, "rb", closefd=False) as f:
                version = np.lib.format.read_magic(f)
                read_header = np.lib.format.read_array_header_2_0 if version == (2, 0) else \
                    np.lib.format.read_array_header_1_0  # np.save writes 1.0 (2.0 for huge headers)
                self.shape, fortran, self.dtype = read_header(f)
                self.offset, size = f.tell(), os.fstat(f.fileno()).st_size
        except InputError:
            raise
        except (OSError, ValueError) as e:
            raise InputError(f"{self.path}: not a readable .npy file ({str(e).splitlines()[0]})") from None
        if self.dtype.hasobject or fortran or not self.shape or min(self.shape) < 0:
            raise InputError(f"{self.path}: not an array of rows (dtype {self.dtype}, shape {self.shape}, "
                             f"{'Fortran' if fortran else 'C'} order)")
        self.row_bytes = math.prod(self.shape[1:]) * self.dtype.itemsize
        need = self.offset + self.shape[0] * self.row_bytes
        if size < need:
            raise InputError(f"{self.path}: {size:,} bytes where its header needs {need:,} (truncated)")

    @classmethod
    def create(cls, path, shape, dtype) -> "NpyRows":
        """A new file of `shape` and `dtype`, its rows not yet written (a sparse file: disk fills as rows arrive)."""
        with open(open_own(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC), "wb") as f:
            header = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False,
                      "shape": tuple(shape)}
            np.lib.format.write_array_header_1_0(f, header)
            f.truncate(f.tell() + math.prod(shape) * np.dtype(dtype).itemsize)
        return cls(path, writable=True)

    def __len__(self):
        return self.shape[0]

    def __getstate__(self):
        return {**self.__dict__, "_fd": None, "_pid": None}

    def fd(self) -> int:
        if self._pid != os.getpid():  # a forked DataLoader worker opens its own
            self._fd, self._pid = open_own(self.path, os.O_RDWR if self.writable else os.O_RDONLY), os.getpid()
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


class Chunks:
    """A resumable build's chunks still to do on this rank (iterate them; `rows(c)` is chunk c's rows) and
    `done(c)`, which flushes the files and then records chunk c complete in the build's done mask (done.npy), so a
    killed build restarts after its last recorded chunk."""

    def __init__(self, files: dict, mask: NpyRows, todo: list, chunk_rows: int, n: int):
        self.files, self.mask, self.todo, self.chunk_rows, self.n = files, mask, todo, chunk_rows, n

    def __iter__(self):
        return iter(self.todo)

    def __len__(self):
        return len(self.todo)

    def rows(self, c: int) -> range:
        return range(c * self.chunk_rows, min((c + 1) * self.chunk_rows, self.n))

    def done(self, c: int) -> None:
        for f in self.files.values():
            f.flush()  # the rows are on disk before the record that says so
        self.mask.write(c, np.ones(1, np.uint8))


def _start(tmp: Path, arrays: dict, spec: dict, chunks: int) -> int:
    """Rank 0: keeps a killed build's temporary folder made for the same `spec` (arrays and chunk size), else makes
    it afresh (sparse files, a zero done mask, spec.json last); the number of chunks already done."""
    done = {"done": ((chunks,), np.uint8)} if chunks else {}
    if chunks and (tmp / "spec.json").is_file():
        try:
            if load_json(tmp / "spec.json") == spec:
                files = open_built(tmp, {**arrays, **done})
                files.pop("done")
                return _finite_chunks(files, NpyRows(tmp / "done.npy", writable=True), spec["chunk_rows"])
        except InputError:  # a leftover of another kind (a link in it too): started afresh
            pass
    remove_path(tmp)
    tmp.mkdir()
    for name, (shape, dtype) in {**arrays, **done}.items():
        NpyRows.create(tmp / f"{name}.npy", shape, dtype)
    save_json(spec, tmp / "spec.json")  # last: a folder made only in part is never resumed
    return 0


def _finite_chunks(files: dict, mask: "NpyRows", chunk_rows: int) -> int:
    """The number of chunks a killed build recorded done, once those whose float rows are not all finite (a NaN
    written by another program, a damaged disk) are marked to do again."""
    done, n = np.flatnonzero(mask.read(0, len(mask))), len(next(iter(files.values())))
    bad = [c for c in done for f in files.values() if f.dtype.kind == "f"
           and not np.isfinite(f.read(c * chunk_rows, min((c + 1) * chunk_rows, n))).all()]
    for c in sorted(set(bad)):
        mask.write(c, np.zeros(1, np.uint8))
    if bad:
        print(f"{mask.path.parent}: {len(set(bad))} chunks recorded done hold non-finite values; computed again")
    return len(done) - len(set(bad))


def _check_disk(folder: Path, tmp: Path, arrays: dict, rank: int, what: str, advice: str) -> None:
    """Rank 0 prints the disk the arrays need; too little free space (a killed build's files count as free) is an
    InputError ending with `advice`."""
    need = sum(math.prod(shape) * np.dtype(dtype).itemsize for shape, dtype in arrays.values())
    leftover = sum(f.lstat().st_blocks * 512 for f in tmp.glob("*"))
    free = shutil.disk_usage(folder.parent).free + leftover
    if rank == 0:
        print(f"{what}: {need / 1e9:.2f} GB on disk in {folder} ({free / 1e9:.1f} GB free)")
    if need > free:
        raise InputError(f"{folder.parent}: {what} need {need / 1e9:.1f} GB and {free / 1e9:.1f} GB are free; free "
                         f"space or choose another --cache-dir{advice}")


def build_once(folder, arrays: dict, fill, rank: int = 0, world: int = 1, what: str = "cache", advice: str = "",
               chunk_rows: int = 0) -> Path:
    """The folder of .npy files `arrays` ({name: (shape, dtype)}), computed once by all ranks together: rank 0 makes
    the files in a temporary folder, every rank calls `fill({name: NpyRows})` to write its share, and rank 0 renames
    the folder once every rank is done, so a killed build never leaves a folder that looks complete. Every rank must
    call it (it holds barriers), and all must see the same `folder` (one node, or a shared file system). Rank 0
    prints the disk it needs first; too little free space is an InputError (ending with `advice`) on every rank.

    With `chunk_rows`, the build resumes: the arrays' rows (one first axis) come in chunks of that many, and
    `fill(files, chunks)` gets this rank's share of the chunks not yet done (`Chunks`), calling `chunks.done(c)`
    after writing chunk c; a killed build's temporary folder is kept, and the next build with the same arrays and
    chunk size computes only the chunks it had not recorded, and again those whose float rows are not all finite.
    The files are never written through a symbolic link: a link where the temporary folder goes is an InputError on
    every rank, and a killed build's folder holding one is started afresh."""
    folder = Path(folder)
    if folder.is_dir():
        open_built(folder, arrays)
        return folder
    tmp = folder.with_name(f".{folder.name}.tmp")
    refuse_link(tmp)  # on every rank: a killed build's folder is resumed in place, never through a link
    folder.parent.mkdir(parents=True, exist_ok=True)
    _check_disk(folder, tmp, arrays, rank, what, advice)
    n = next(iter(arrays.values()))[0][0]  # rows (with chunk_rows, every array's first axis)
    chunks = -(-n // chunk_rows) if chunk_rows else 0
    spec = {"arrays": {k: [list(shape), np.dtype(dtype).str] for k, (shape, dtype) in arrays.items()},
            "chunk_rows": chunk_rows}
    barrier(world)  # every rank has looked at the leftovers before rank 0 removes them
    if rank == 0 and (done := _start(tmp, arrays, spec, chunks)):
        print(f"{what}: resuming a killed build, {done} of {chunks} chunks done")
    barrier(world)
    if not tmp.is_dir():
        raise InputError(f"{folder.parent}: rank {rank} does not see the folder rank 0 made; the cache folder must be "
                         "shared by all ranks")
    files = {name: NpyRows(tmp / f"{name}.npy", writable=True) for name in arrays}
    if chunks:
        mask = NpyRows(tmp / "done.npy", writable=True)
        todo = np.flatnonzero(mask.read(0, chunks) == 0).tolist()  # the same list on every rank
        share = rank_share(len(todo), rank, world)
        barrier(world)  # every rank has read the mask before any adds to it
        fill(files, Chunks(files, mask, todo[share.start: share.stop], chunk_rows, n))
    else:
        fill(files)
    for f in files.values():
        f.flush()
    barrier(world)
    if rank == 0:
        for name in ("done.npy", "spec.json"):
            (tmp / name).unlink(missing_ok=True)
        os.replace(tmp, folder)
    barrier(world)
    return folder
