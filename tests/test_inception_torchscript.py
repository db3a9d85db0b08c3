"""torchscript_weights.py and the TorchScript path of inception.py on archives built here with torch.jit.save: tensors
read without running the file, code-naming pickles refused, NVIDIA's layout (with the output layer: IS) mapped onto
InceptionFeatures, and where the weights are looked up. Random weights throughout."""
import importlib
import pickle
import re
import struct
import sys
import tracemalloc
import zipfile

import numpy as np
import pytest
import torch
import torch.nn as nn

import metrics
from evaluator import inception, torchscript_weights
from evaluator.torchscript_weights import is_torchscript, read_torchscript_tensors
from runtime.errors import InputError


class Leaf(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(4, 3).t())  # stored with strides (1, 3)
        self.register_buffer("steps", torch.arange(5))
        self.padding = [0, 3]  # an int list attribute (torch.jit._pickle.build_intlist)

    def forward(self, x):
        return x @ self.weight


class Tree(nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.randn(2, dtype=torch.float64))
        self.leaf = Leaf()
        self.blocks = nn.Sequential(Leaf(), nn.Linear(4, 2))

    def forward(self, x):
        return self.blocks[1](self.leaf(x))


def test_tensors_are_read_as_the_state_dict_without_torch_jit_load(tmp_path, monkeypatch):
    torch.manual_seed(0)
    scripted = torch.jit.script(Tree())
    scripted.save(str(tmp_path / "tree.pt"))
    monkeypatch.setattr(torch.jit, "load", lambda *a, **k: pytest.fail("torch.jit.load runs the file's code"))
    tensors = read_torchscript_tensors(tmp_path / "tree.pt")
    want = scripted.state_dict()
    assert list(tensors) == list(want)  # names and the file's order
    for key, value in want.items():
        assert tensors[key].dtype == value.dtype and torch.equal(tensors[key], value), key
    assert tensors["leaf.weight"].stride() == (1, 3)
    assert is_torchscript(tmp_path / "tree.pt")
    torch.save(Tree().state_dict(), tmp_path / "state.pth")  # torch.save's zip is not TorchScript
    assert not is_torchscript(tmp_path / "state.pth")


def archive_with_data_pkl(tmp_path, data_pkl: bytes):
    """A TorchScript archive (a scripted Leaf) whose data.pkl is replaced by `data_pkl`."""
    torch.jit.script(Leaf()).save(str(tmp_path / "leaf.pt"))
    path = tmp_path / "crafted.pt"
    with zipfile.ZipFile(tmp_path / "leaf.pt") as src, zipfile.ZipFile(path, "w") as dst:
        for info in src.infolist():
            dst.writestr(info, data_pkl if info.filename.endswith("/data.pkl") else src.read(info))
    return path


@pytest.mark.parametrize("module,name", [("os", "system"), ("builtins", "eval"), ("subprocess", "call"),
                                         ("torch", "load"), ("torch.jit", "load")])
def test_a_pickle_naming_other_code_is_refused_and_nothing_runs(tmp_path, module, name):
    marker = tmp_path / "ran"
    command = f"open({str(marker)!r}, 'w')" if name == "eval" else f"touch {marker}"

    func = getattr(importlib.import_module(module), name)

    class Call:  # pickles as `func(command)`
        def __reduce__(self):
            return func, (command,)
    path = archive_with_data_pkl(tmp_path, pickle.dumps({"x": Call()}, protocol=2))
    with pytest.raises(InputError, match=re.escape(f"{path}: ") + ".*refused to load .*" + func.__name__):
        read_torchscript_tensors(path)
    assert not marker.exists()


def test_a_broken_archive_is_one_line(tmp_path):
    path = archive_with_data_pkl(tmp_path, pickle.dumps([1, 2], protocol=2))
    with pytest.raises(InputError, match="holds a list, not a TorchScript module"):
        read_torchscript_tensors(path)
    (tmp_path / "bytes.pt").write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(InputError, match="not a readable TorchScript archive"):
        read_torchscript_tensors(tmp_path / "bytes.pt")


# --- NVIDIA's layout --------------------------------------------------------------------------------------------------

class Conv(nn.Module):
    """NVIDIA's Conv2dLayer: weight, beta, mean, var (TF's batch norm without scale)."""

    def __init__(self, weight, beta, mean, var):
        super().__init__()
        self.weight, self.beta, self.mean, self.var = (nn.Parameter(t.clone()) for t in (weight, beta, mean, var))

    def forward(self, x):
        return x


class Block(nn.Module):
    def __init__(self, convs):
        super().__init__()
        for i, conv in enumerate(convs):
            self.add_module(f"c{i}", conv)

    def forward(self, x):
        return x


class NvidiaInception(nn.Module):
    """`layers.<TF block>.<convs>` and, with `output`, the 1008-way `output` Linear, as NVIDIA's file nests them."""

    def __init__(self, model: inception.InceptionFeatures, output: bool):
        super().__init__()
        self.layers = nn.Module()
        for block, (_, m) in zip(inception.TF_BLOCKS, model.named_children()):
            convs = [Conv(c.conv.weight, c.bn.bias, c.bn.running_mean, c.bn.running_var)
                     for c in m.modules() if isinstance(c, inception._ConvBN)]
            self.layers.add_module(block, Block(convs))
        if output:
            self.output = nn.Linear(2048, 1008)

    def forward(self, x):
        return x


@pytest.fixture(scope="module")
def random_model():
    torch.manual_seed(0)
    model = inception.InceptionFeatures().eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_var.uniform_(0.5, 2.0)
            m.running_mean.normal_(0, 0.1)
            m.bias.data.normal_(0, 0.1)  # weight stays 1, as in TF's graph
    return model


@pytest.fixture(scope="module")
def nvidia_file(tmp_path_factory, random_model):
    """A full-size TorchScript archive in NVIDIA's layout with the output layer, and its scripted module."""
    path = tmp_path_factory.mktemp("nvidia") / "inception-2015-12-05.pt"
    scripted = torch.jit.script(NvidiaInception(random_model, output=True))
    scripted.save(str(path))
    return path, scripted


def test_nvidia_layout_maps_onto_inception_features_and_gives_is(tmp_path, monkeypatch, capsys, random_model,
                                                                 nvidia_file):
    path, scripted = nvidia_file
    monkeypatch.setattr(torch.jit, "load", lambda *a, **k: pytest.fail("torch.jit.load runs the file's code"))
    model = inception.load_inception(str(path))
    assert model.outputs == ("pool", "spatial", "logits") and model.path == str(path)
    loaded = model.state_dict()
    for key, value in random_model.state_dict().items():
        if not key.startswith("fc."):
            torch.testing.assert_close(loaded[key], value, rtol=0, atol=0, msg=key)
    torch.testing.assert_close(model.fc.weight, scripted.output.weight, rtol=0, atol=0)
    images = np.random.default_rng(0).integers(0, 256, (4, 20, 20, 3), dtype=np.uint8)
    with torch.inference_mode():
        pool, _, logits = model(torch.from_numpy(images))
    torch.testing.assert_close(logits, pool @ scripted.output.weight.detach().T)  # the evaluator's: no bias
    np.savez(tmp_path / "ref.npz", images)
    metrics.main([str(tmp_path / "ref.npz"), str(tmp_path / "ref.npz"), "--inception", str(path)])
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split(": ")[0] for line in lines] == ["Inception Score", "FID", "sFID", "Precision", "Recall"]


def rename(tensors, old, new):
    """Renames `old` to `new` in every key of `tensors`, in place, keeping the order."""
    items = [(k.replace(old, new), v) for k, v in tensors.items()]
    tensors.clear()
    tensors.update(items)


@pytest.mark.parametrize("change,problem", [
    (lambda t: t.pop("layers.mixed_3.c0.var"), "not the FID Inception's layers"),
    (lambda t: t.update({"layers.extra": torch.zeros(1)}), "not the FID Inception's layers"),
    (lambda t: t.update({"extra.weight": torch.zeros(1)}), "and also ['extra.weight']"),
    (lambda t: rename(t, ".mixed_9.", ".mixed_7."), "not the FID Inception's layers"),  # a block misnamed
    (lambda t: rename(t, "layers.", "net."), "no `layers` module"),
    (lambda t: t.update({"output.weight": t.pop("output.weight")[:10]}), "fc.weight: shape (10, 2048)")])
def test_other_layouts_are_refused_with_the_file_named(tmp_path, nvidia_file, change, problem):
    path = nvidia_file[0]
    tensors = read_torchscript_tensors(path)
    change(tensors)
    model = inception.InceptionFeatures()
    with pytest.raises(InputError) as err:
        state = inception.torchscript_state(tensors, path, model)
        inception.load_state(model, state, path)
    assert str(err.value).startswith(f"{path}: ") and problem in str(err.value)


def test_default_1_layout_without_the_output_layer_names_is_skipped(tmp_path, random_model):
    path = tmp_path / "layers.pt"
    torch.jit.script(NvidiaInception(random_model, output=False)).save(str(path))
    model = inception.load_inception(str(path))
    assert model.outputs == ("pool", "spatial") and not hasattr(model, "fc")
    skipped = []
    metrics._check_logits(model, "Inception Score", skipped)
    assert skipped == [f"Inception Score ({path}: {inception.NO_LOGITS})"]
    with pytest.raises(InputError, match="no 1008-way output layer"):
        metrics._check_logits(model, "Inception Score", None)  # --strict


# --- where the weights are looked up ----------------------------------------------------------------------------------

def test_lookup_order_flag_env_package_cache_without_importing_the_package(tmp_path, monkeypatch):
    package = tmp_path / "site" / "textok_fake_weights"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("raise RuntimeError('the package was imported')\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setattr(inception, "WEIGHTS_PACKAGE", "textok_fake_weights")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "home"))
    monkeypatch.delenv(inception.INCEPTION_ENV, raising=False)
    cache = str(tmp_path / "home" / "hub" / "checkpoints" / inception.INCEPTION_FILE)
    packaged = str(package / inception.PACKAGE_FILE)
    assert inception.packaged_inception() == packaged
    assert inception.inception_path() == cache  # the package without its file: on to the cache
    (package / inception.PACKAGE_FILE).write_bytes(b"")
    assert inception.inception_path() == packaged
    monkeypatch.setenv(inception.INCEPTION_ENV, "env.pt")
    assert inception.inception_path() == "env.pt"
    assert inception.inception_path("flag.pt") == "flag.pt"
    assert "textok_fake_weights" not in sys.modules  # find_spec located it without running __init__.py
    monkeypatch.setattr(inception, "WEIGHTS_PACKAGE", "textok_no_such_package")
    assert inception.packaged_inception() is None


# --- crafted archives: one line for any of them, bounded memory (issue 33) --------------------------------------------

def _str(s):
    return b"X" + struct.pack("<I", len(s.encode())) + s.encode()  # BINUNICODE


def _int(i):  # BININT, or LONG1 of 9 bytes
    return b"J" + struct.pack("<i", i) if -2 ** 31 <= i < 2 ** 31 else b"\x8a\x09" + i.to_bytes(9, "little", signed=1)


def _global(module, name):
    return f"c{module}\n{name}\n".encode()


def _tuple(items):
    return b"(" + b"".join(items) + b"t"


def _tensor(size, stride, numel, key="0"):
    """_rebuild_tensor_v2 of a view of storage `key` (a FloatStorage of `numel`), as torch.jit.save writes it."""
    storage = _tuple([_str("storage"), _global("torch", "FloatStorage"), _str(key), _str("cpu"), _int(numel)]) + b"Q"
    args = [storage, _int(0), _tuple(map(_int, size)), _tuple(map(_int, stride)), b"\x89",
            _global("collections", "OrderedDict") + b")R"]
    return _global("torch._utils", "_rebuild_tensor_v2") + _tuple(args) + b"R"


def _object(items, name="M"):
    """A scripted object: NEWOBJ of __torch__.<name>, then BUILD with the dict of (key, value) pickles."""
    return _global("__torch__", name) + b")\x81}(" + b"".join(k + v for k, v in items) + b"ub"


def _pkl(body):
    return b"\x80\x02" + body + b"."


def crafted(tmp_path, data_pkl, storages=(("0", b"\0" * 8),), extra=(), method=zipfile.ZIP_STORED):
    """A TorchScript-shaped zip: archive/data.pkl (compressed with `method`), constants.pkl, byteorder, the storages
    and `extra` members."""
    path = tmp_path / "crafted.pt"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", data_pkl, compress_type=method)
        z.writestr("archive/constants.pkl", b"\x80\x02).")
        z.writestr("archive/byteorder", b"little")
        for key, data in storages:
            z.writestr(f"archive/data/{key}", data)
        for name, data in extra:
            z.writestr(name, data)
    return path


def patched(path, old: bytes, new: bytes):
    """`path` with every `old` replaced by `new` (same length): a zip's fields rewritten in place."""
    raw = path.read_bytes()
    assert old in raw and len(old) == len(new)
    path.write_bytes(raw.replace(old, new))
    return path


def nvidia_pkl(first_beta=None):
    """data.pkl of NVIDIA's layout (no output layer): every tensor a stride-0 view of storage "0" (one float), the
    first conv's beta of size `first_beta` where given."""
    with torch.device("meta"):
        model = inception.InceptionFeatures(logits=False)
    blocks = []
    for block, (_, m) in zip(inception.TF_BLOCKS, model.named_children()):
        convs = [c for c in m.modules() if isinstance(c, inception._ConvBN)]
        blocks.append((_str(block), _object([(_str(f"c{i}"), _object(
            [(_str(k), _tensor(shape, (0,) * len(shape), 1)) for k, shape in
             [("weight", c.conv.weight.shape), ("beta", first_beta or c.bn.bias.shape), ("mean", c.bn.bias.shape),
              ("var", c.bn.bias.shape)]], "Conv")) for i, c in enumerate(convs)], "Block")))
        first_beta = None
    return _pkl(_object([(_str("layers"), _object(blocks, "Layers"))], "Net"))


def deep(levels):
    body = _object([(_str("w"), _tensor((2,), (1,), 2))])
    for _ in range(levels):
        body = _object([(_str("c"), body)])
    return _pkl(body)


def lzma_data_pkl(tmp_path):
    """data.pkl (the first member) LZMA-compressed, a byte of its stream flipped."""
    path = crafted(tmp_path, bytes(range(256)) * 4, method=zipfile.ZIP_LZMA)
    raw = bytearray(path.read_bytes())
    raw[30 + len("archive/data.pkl") + 9] ^= 0xFF  # past the local header, zipfile's LZMA header and properties
    path.write_bytes(bytes(raw))
    return path


CRAFTED = {  # case: (archive builder, the one line's problem)
    "integer key": (lambda p: crafted(p, _pkl(_object([(_int(3), _tensor((2,), (1,), 2))]))),
                    "has an attribute named 3, not a string"),
    "cycle": (lambda p: crafted(p, _pkl(_global("__torch__", "M") + b")\x81q\x00}(" + _str("me") + b"h\x00ub")),
              "me is an object met before"),
    "5000 deep": (lambda p: crafted(p, deep(5000)), "objects nested more than 64 deep"),
    "BINBYTES8 2^64-1": (lambda p: crafted(p, b"\x80\x04\x8e" + b"\xff" * 8 + b"."), "BINBYTES8 exceeds"),
    "BINUNICODE8 2^64-1": (lambda p: crafted(p, b"\x80\x04\x8d" + b"\xff" * 8 + b"."), "BINUNICODE8 exceeds"),
    "FRAME 2^64-1": (lambda p: crafted(p, b"\x80\x04\x95" + b"\xff" * 8 + b"."), "frame size > sys.maxsize"),
    "BINBYTES8 2^44": (lambda p: crafted(p, b"\x80\x04\x8e" + struct.pack("<Q", 2 ** 44) + b"."),
                       "data.pkl asks for 17592186044416 bytes where 1 are left"),
    "BYTEARRAY8 2^44": (lambda p: crafted(p, b"\x80\x05\x96" + struct.pack("<Q", 2 ** 44) + b"."),
                        "data.pkl asks for 17592186044416 bytes"),
    "name not UTF-8": (lambda p: patched(crafted(p, _pkl(_object([])), extra=[("archive/x\u00ff", b"")]),
                                         b"x\xc3\xbf", b"x\xff\xff"), "name is flagged UTF-8 but is not"),
    "corrupt LZMA data.pkl": (lzma_data_pkl, "data.pkl is encrypted or compressed with method 14"),
    "beta a stride-0 view of 2^40": (lambda p: crafted(p, nvidia_pkl(first_beta=(2 ** 40,)), [("0", b"\0" * 4)]),
                                     "Conv2d_1a_3x3.bn.bias: shape (1099511627776,) != (32,)"),
    "size above 2^63": (lambda p: crafted(p, _pkl(_object([(_str("x"), _tensor((2 ** 63 + 1,), (0,), 2))]))),
                        "malformed tensor record"),
    "stride above 2^63": (lambda p: crafted(p, _pkl(_object([(_str("x"), _tensor((0,), (2 ** 64,), 2))]))),
                          "malformed tensor record"),
    "BUILD on a function": (  # BUILD (None, {"__defaults__": (True, None, None)}): setattr on the function
        lambda p: crafted(p, _pkl(_global("torch._utils", "_rebuild_tensor_v2") + b"N}(" + _str("__defaults__")
                                  + _tuple([b"\x88", b"N", b"N"]) + b"u\x86b")), "BUILD on a function"),
    "BUILD on a class": (lambda p: crafted(p, _pkl(_global("__torch__", "M") + b"N}(" + _str("x") + b"Nu\x86b")),
                         "BUILD on a type"),
    "BUILD on a tensor": (lambda p: crafted(p, _pkl(_tensor((2,), (1,), 2) + _tuple(
        [_tensor((2,), (1,), 2), _int(0), _tuple([_int(2 ** 20)]), _tuple([_int(1)])]) + b"b")), "BUILD on a Tensor"),
}


@pytest.mark.parametrize("case", CRAFTED)
def test_a_crafted_archive_is_one_line(tmp_path, case):
    make, problem = CRAFTED[case]
    path = make(tmp_path)
    defaults = torchscript_weights._rebuild_tensor.__defaults__
    with pytest.raises(InputError) as err:
        inception.load_inception(str(path))
    message = str(err.value)
    assert message.startswith(f"{path}: ") and problem in message and "\n" not in message, message
    assert torchscript_weights._rebuild_tensor.__defaults__ == defaults  # BUILD reached no function


def test_a_storage_named_many_times_is_read_once(tmp_path, monkeypatch):
    path = crafted(tmp_path, _pkl(_object([(_str(f"x{i}"), _tensor((1024,), (1,), 1024)) for i in range(16)])),
                   [("0", b"\0" * 4096)])
    opened = []
    open_member = zipfile.ZipFile.open
    monkeypatch.setattr(zipfile.ZipFile, "open", lambda self, name, *a, **k: opened.append(
        getattr(name, "filename", name)) or open_member(self, name, *a, **k))
    tensors = read_torchscript_tensors(path)
    assert len(tensors) == 16 and len({t.data_ptr() for t in tensors.values()}) == 1
    assert opened.count("archive/data/0") == 1


def test_a_deflated_storage_beyond_the_models_tensors_is_refused_before_reading(tmp_path):
    path = crafted(tmp_path, _pkl(_object([(_str("x"), _tensor((2 ** 25,), (1,), 2 ** 25))])), storages=())
    with zipfile.ZipFile(path, "a") as z:  # 128 MB of zeros, deflated to 128 KB
        info = zipfile.ZipInfo("archive/data/0")
        info.compress_type = zipfile.ZIP_DEFLATED
        with z.open(info, "w") as f:
            for _ in range(128):
                f.write(bytes(1 << 20))
    assert path.stat().st_size < 1 << 20
    tracemalloc.start()
    try:
        with pytest.raises(InputError, match="storages declare 134217728 bytes or more, beyond the 95542320"):
            inception.load_inception(str(path))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20, peak
