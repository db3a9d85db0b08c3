"""The tensors of a TorchScript archive (torch.jit.save), read without running anything from the file.

torch.jit.load compiles and runs the archive's code (its `code/` folder, and the classes its pickles name), so a
TorchScript file is a program. Here it is read as data only:

- The archive is a zip: `<root>/data.pkl` pickles the module tree, `<root>/data/<key>` holds each tensor's raw
  little-endian bytes. `code/`, `constants.pkl` and the debug pickles are never opened.
- data.pkl is read by `_Reader`, a pickle.Unpickler whose `find_class` maps no name from the file to Python code:
  `__torch__.*` (the scripted classes) become `_Object`, an inert record of the class name and its attribute dict;
  the `torch.<T>Storage` names become dtypes (not callable); `torch._utils._rebuild_tensor_v2` and the
  `torch.jit._pickle` list and type-tag helpers become small functions of this file; `collections.OrderedDict` is
  the standard one. Every other name is refused, so these are the only callables the pickle can reach.
  `persistent_load` accepts only ("storage", dtype, key, location, numel) and reads that zip member's bytes, checking
  their size.
- The tensors are then collected by walking the tree: {"net.layers.conv.weight": tensor, ...} in the file's order.
"""
import collections
import pickle
import re
import zipfile
import zlib

import torch

from runtime.errors import InputError

DTYPES = {"FloatStorage": torch.float32, "DoubleStorage": torch.float64, "HalfStorage": torch.float16,
          "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
          "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
          "BoolStorage": torch.bool}


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
            and all(isinstance(v, int) and v >= 0 for v in size + stride)):
        raise pickle.UnpicklingError("malformed tensor record")
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


class _Reader(pickle.Unpickler):
    """Unpickles data.pkl with the names above only (module docstring); storages come from `archive`."""

    def __init__(self, file, archive: zipfile.ZipFile, root: str):
        super().__init__(file)
        self.archive, self.root = archive, root

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
            raise pickle.UnpicklingError(f"unexpected persistent id {str(pid)[:80]}")
        _, dtype, key, _, numel = pid
        member = f"{self.root}/data/{key}"
        itemsize = torch.empty((), dtype=dtype).element_size()
        if self.archive.getinfo(member).file_size != numel * itemsize:  # KeyError when absent
            raise pickle.UnpicklingError(f"{member} does not hold {numel} {dtype} values")
        if not numel:
            return torch.empty(0, dtype=dtype)
        return torch.frombuffer(bytearray(self.archive.read(member)), dtype=dtype)


def is_torchscript(path) -> bool:
    """Whether `path` is a TorchScript archive (a zip with a constants.pkl record, torch.load's own test)."""
    try:
        with zipfile.ZipFile(path) as archive:
            return any(n.split("/")[1:] == ["constants.pkl"] for n in archive.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def _tensors(obj, prefix, out):
    """Adds the tensors of `obj`'s attribute tree to `out` as {dotted name: tensor}, in the file's order."""
    for name, value in obj.state.items():
        if isinstance(value, torch.Tensor):
            out[prefix + name] = value
        elif isinstance(value, _Object) and value.state is not None:
            _tensors(value, f"{prefix}{name}.", out)
    return out


def read_torchscript_tensors(path) -> dict:
    """{dotted name: tensor} of the TorchScript archive `path`, as its state_dict() would list them, read without
    running its code (module docstring). A file that is not such an archive raises InputError naming it."""
    try:
        with zipfile.ZipFile(path) as archive:
            if any(n.split("/")[1:] == ["byteorder"] and archive.read(n) != b"little" for n in archive.namelist()):
                raise InputError(f"{path}: a big-endian TorchScript archive; only little-endian ones are read")
            roots = [n[:-len("/data.pkl")] for n in archive.namelist() if n.count("/") == 1 and n.endswith("/data.pkl")]
            if len(roots) != 1:
                raise InputError(f"{path}: not a TorchScript archive (no single <root>/data.pkl)")
            with archive.open(f"{roots[0]}/data.pkl") as f:
                root = _Reader(f, archive, roots[0]).load()
    except (zipfile.BadZipFile, zlib.error, EOFError, KeyError, OSError) as e:
        raise InputError(f"{path}: not a readable TorchScript archive ({e})") from None
    except (pickle.UnpicklingError, ValueError, TypeError, AttributeError, IndexError, RuntimeError) as e:
        raise InputError(f"{path}: not a TorchScript archive of plain modules and tensors ({e})") from None
    if not isinstance(root, _Object) or root.state is None:
        raise InputError(f"{path}: its data.pkl holds a {type(root).__name__}, not a TorchScript module")
    return _tensors(root, "", {})
