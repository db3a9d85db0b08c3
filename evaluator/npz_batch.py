"""ADM reference and sample batches (.npz): images `arr_0` uint8 [N, H, W, 3] streamed in batches, or a reference's
precomputed Inception statistics (mu, sigma, mu_s, sigma_s); a file the ADM evaluator could not read is one line."""
import lzma
import math
import os
import zipfile
import zlib
from dataclasses import dataclass

import numpy as np

from evaluator.inception import SPATIAL_CHANNELS
from runtime.errors import InputError


STAT_SHAPES = {"mu": (2048,), "sigma": (2048, 2048), "mu_s": (17 * 17 * SPATIAL_CHANNELS,),
               "sigma_s": (17 * 17 * SPATIAL_CHANNELS,) * 2}
READABLE = (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA)  # zipfile's methods


class NpzError(InputError):
    """A reference or sample .npz that the ADM evaluator could not read."""


@dataclass
class NpzImages:
    """The uint8 [N, H, W, 3] images (`arr_0`) of an ADM .npz, read in batches straight from the archive."""
    path: str
    shape: tuple
    array: np.ndarray = None  # only for Fortran-ordered arrays, which cannot be streamed

    def __len__(self):
        return self.shape[0]

    def batches(self, batch_size: int):
        """Yields consecutive uint8 [<=batch_size, H, W, 3] arrays."""
        if self.array is not None:
            yield from (self.array[i:i + batch_size] for i in range(0, len(self), batch_size))
            return
        with zipfile.ZipFile(self.path) as archive, archive.open("arr_0.npy") as f:
            _npy_header(f, self.path)
            for i in range(0, len(self), batch_size):
                batch = np.empty((min(batch_size, len(self) - i), *self.shape[1:]), np.uint8)
                view, got = memoryview(batch).cast("B"), 0
                while got < len(view):
                    n = f.readinto(view[got:])
                    if not n:
                        raise NpzError(f"{self.path}: arr_0 is truncated ({i + got // batch[0].nbytes} of "
                                       f"{len(self)} images)")
                    got += n
                yield batch


def _npy_header(f, path, key="arr_0"):
    """(shape, fortran_order, dtype) of the .npy stream `f` (array `key` of the .npz `path`)."""
    try:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            return np.lib.format.read_array_header_1_0(f)
        if version == (2, 0):
            return np.lib.format.read_array_header_2_0(f)
    except ValueError as e:
        raise NpzError(f"{path}: {key} is not a valid .npy array ({e})") from None
    raise NpzError(f"{path}: {key} uses .npy format version {version}; expected 1.0 or 2.0 (np.savez)")


def _member_header(archive: zipfile.ZipFile, key: str, path):
    """(shape, fortran_order, dtype) of array `key` from its .npy header alone; a header that claims another size than
    the archive holds (a huge shape, a truncated file) is refused before anything is allocated."""
    with archive.open(key + ".npy") as f:
        shape, fortran, dtype = _npy_header(f, path, key)
        claimed, held = math.prod(shape) * dtype.itemsize, archive.getinfo(key + ".npy").file_size - f.tell()
    if claimed != held:
        raise NpzError(f"{path}: {key}'s header claims {dtype} shape {list(shape)} ({claimed} bytes) but the archive "
                       f"holds {held} bytes (truncated or corrupt)")
    return shape, fortran, dtype


def read_npz_batch(path):
    """Opens an ADM reference or sample batch: (NpzImages, stats), stats being {"mu", "sigma", "mu_s", "sigma_s"}
    (float64) when the file holds them (the evaluator then uses them instead of recomputing), else None.
    A file that is not what the evaluator reads raises NpzError naming the file and the problem; every byte is checked
    (the zip CRCs) and every array's size read from its header here, before any expensive work."""
    path = str(path)
    if not os.path.isfile(path):
        raise NpzError(f"{path}: no such file")
    if not zipfile.is_zipfile(path):
        raise NpzError(f"{path}: not an .npz file (not a zip archive)")
    try:
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():  # what zipfile cannot read raises RuntimeError / NotImplementedError
                if info.flag_bits & 0x1:
                    raise NpzError(f"{path}: {info.filename!r} is encrypted; np.savez writes no password")
                if info.compress_type not in READABLE:
                    raise NpzError(f"{path}: {info.filename!r} uses zip compression method {info.compress_type}, "
                                   "which is not read (np.savez stores or deflates)")
            corrupt = archive.testzip()  # reads every member once: a flipped byte fails its CRC
            if corrupt:
                raise NpzError(f"{path}: {corrupt} is corrupt (its CRC check failed)")
            keys = [n[:-4] for n in archive.namelist() if n.endswith(".npy")]
            if "arr_0" not in keys:
                raise NpzError(f"{path}: no 'arr_0' array (keys: {keys}); the ADM evaluator reads the images from "
                               "arr_0, as written by np.savez(path, images)")
            headers = {k: _member_header(archive, k, path) for k in ["arr_0", *STAT_SHAPES] if k in keys}
    except UnicodeDecodeError as e:  # a name flagged UTF-8 that is not
        raise NpzError(f"{path}: not a readable .npz archive (a member name is not UTF-8: byte "
                       f"0x{e.object[e.start]:02x})") from None
    except (zipfile.BadZipFile, zlib.error, lzma.LZMAError, EOFError, OSError) as e:
        raise NpzError(f"{path}: not a readable .npz archive ({e})") from None
    shape, fortran, dtype = headers.pop("arr_0")
    if dtype != np.uint8:
        raise NpzError(f"{path}: arr_0 has dtype {dtype}, expected uint8 images with values in [0, 255]")
    if len(shape) != 4 or shape[3] != 3 or min(shape[1], shape[2]) < 1:
        raise NpzError(f"{path}: arr_0 has shape {list(shape)}, expected [N, H, W, 3] (RGB, channels last)")
    if shape[0] < 2:
        raise NpzError(f"{path}: arr_0 holds {shape[0]} images; FID needs at least 2")
    images = NpzImages(path, tuple(shape), np.ascontiguousarray(np.load(path)["arr_0"]) if fortran else None)
    if not headers:
        return images, None
    if len(headers) < len(STAT_SHAPES):
        raise NpzError(f"{path}: has {list(headers)} but not {[k for k in STAT_SHAPES if k not in headers]}; "
                       "precomputed statistics need all of mu, sigma, mu_s, sigma_s")
    for k, want in STAT_SHAPES.items():
        shape, _, dtype = headers[k]
        if shape != want or dtype.kind != "f":
            raise NpzError(f"{path}: {k} has {dtype} shape {list(shape)}, expected floats of shape {list(want)}")
    with np.load(path) as arrays:
        stats = {k: arrays[k] for k in STAT_SHAPES}
    for k in STAT_SHAPES:
        if not np.isfinite(stats[k]).all():
            raise NpzError(f"{path}: {k} holds non-finite values")
    return images, {k: v.astype(np.float64) for k, v in stats.items()}
