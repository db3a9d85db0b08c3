"""LPIPS (Zhang et al. 2018), frozen: App. C's perceptual loss (LPIPS-VGG, train.py) and the reconstruction metric
(LPIPS-Alex, metrics.py). Its ImageNet trunk is torchvision's weights file, already in torch.hub.get_dir()/checkpoints/
(never downloaded); nothing is unpickled: the trunk is read weights-only once its SHA-256 matches its name, and so are
the linear layers the lpips package ships."""
import hashlib
import os
import warnings

import torch

from runtime.errors import InputError, MissingInput
from runtime.files import weights_file


# torchvision's ImageNet weights of the LPIPS trunks (IMAGENET1K_V1), read from torch.hub.get_dir()/checkpoints/
LPIPS_TRUNKS = {"alex": "alexnet-owt-7be5be79.pth", "vgg": "vgg16-397923af.pth"}
TORCHVISION_URL = "https://download.pytorch.org/models/"


def load_lpips(net: str = "alex", device="cpu", hint: str = ""):
    """LPIPS (Zhang et al. 2018) from the `lpips` package, frozen: the one loader of the metric (net "alex") and of
    train.py's perceptual loss (net "vgg"). Its ImageNet trunk is torchvision's weights file, which must already be in
    torch.hub.get_dir()/checkpoints/ (this never downloads); `hint` ends the error saying what to do instead. Nothing
    is unpickled: the trunk is read weights-only once its SHA-256 matches its name, and so are lpips' linear layers."""
    import lpips
    path = os.path.join(torch.hub.get_dir(), "checkpoints", LPIPS_TRUNKS[net])
    if not os.path.isfile(path):
        url = TORCHVISION_URL + LPIPS_TRUNKS[net]
        raise MissingInput(f"{path}: not found (the LPIPS-{net} backbone); download {LPIPS_TRUNKS[net]} from "
                           f"{url} into {os.path.dirname(path)} (TORCH_HOME moves it){hint}")
    check_hash(path)
    with warnings.catch_warnings():  # lpips calls torchvision with the deprecated `pretrained=False`
        warnings.simplefilter("ignore")
        model = lpips.LPIPS(net=net, pretrained=False, pnet_rand=True, verbose=False)  # random: nothing read
    model.net.load_state_dict(lpips_trunk(model.net, weights_file(path), path))
    load_lpips_linear(model, os.path.join(os.path.dirname(lpips.__file__), "weights", "v0.1", f"{net}.pth"))
    return model.eval().requires_grad_(False).to(device)


def load_lpips_linear(model, path) -> None:
    """Loads the linear layers lpips ships (`lin0..lin4`, shared with `lins`) weights-only from `path`."""
    state = weights_file(path)
    own = sorted(k for k in model.state_dict() if k.startswith("lin") and not k.startswith("lins."))
    if sorted(state) != own:
        raise InputError(f"{path}: not lpips' linear layers (keys {sorted(state)[:2]}..., expected {own[:2]}...)")
    model.load_state_dict(state, strict=False)


def check_hash(path) -> None:
    """torchvision's naming convention: the hex digits after the file name's last '-' begin its SHA-256."""
    name = os.path.basename(path)
    prefix = name.rsplit("-", 1)[-1].split(".")[0]
    with open(path, "rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    if not digest.startswith(prefix):
        raise InputError(f"{path}: SHA-256 {digest[:len(prefix)]}... does not match the {prefix} in its name (not "
                         f"the file torchvision publishes); download it again from {TORCHVISION_URL + name}")


def lpips_trunk(net, state: dict, path) -> dict:
    """lpips' trunk `net` state from torchvision's: its `sliceK.N.*` tensors are `features.N.*` (each slice keeps
    the feature indices as module names); missing or misshapen tensors are an InputError naming the file."""
    own = {"features." + k.split(".", 1)[1]: v for k, v in net.state_dict().items()}
    problems = [f"missing {k}" for k in own if k not in state]
    problems += [f"{k}: shape {tuple(state[k].shape)} != {tuple(v.shape)}" for k, v in own.items()
                 if k in state and state[k].shape != v.shape]
    if problems:
        raise InputError(f"{path}: not torchvision's {type(net).__name__} weights ({len(problems)} problems: "
                         + "; ".join(problems[:4]) + ")")
    return {k: state["features." + k.split(".", 1)[1]] for k in net.state_dict()}
