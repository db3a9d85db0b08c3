"""perceptual.load_lpips reads the torchvision trunk in the torch hub cache weights-only, after checking its SHA-256
against its name: a pickle planted there never runs, and a random trunk gives what lpips' own loading gives."""
import hashlib
import warnings

import pytest
import torch

import perceptual
from runtime.errors import InputError


def torchvision_file(state, folder, stem):
    """`state` saved in `folder` as torchvision names its files: `stem-<its SHA-256's first 8 hex digits>.pth`."""
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(state, folder / "tmp.pth")
    digest = hashlib.sha256((folder / "tmp.pth").read_bytes()).hexdigest()
    return (folder / "tmp.pth").rename(folder / f"{stem}-{digest[:8]}.pth")


class Planted:
    """Unpickling it creates the file `marker`: code that pickle runs."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


@pytest.fixture
def checkpoints(tmp_path, monkeypatch):
    """An empty torch hub cache: TORCH_HOME in tmp_path."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "home"))
    (tmp_path / "home" / "hub" / "checkpoints").mkdir(parents=True)
    return tmp_path / "home" / "hub" / "checkpoints"


@pytest.mark.parametrize("name", ["torchvision's", "its own hash"])
def test_a_pickle_planted_as_the_trunk_never_runs(checkpoints, monkeypatch, name):
    """At torchvision's name the hash check refuses it unread; under a name with its own hash, torch.load's
    weights-only unpickler does. Either way one line naming the file, and the marker is never made."""
    marker = checkpoints / "ran"
    if name == "torchvision's":
        path = checkpoints / perceptual.LPIPS_TRUNKS["alex"]
        torch.save(Planted(marker), path)
        problem = "does not match the 7be5be79 in its name"
    else:
        path = torchvision_file(Planted(marker), checkpoints, "alexnet-planted")
        monkeypatch.setitem(perceptual.LPIPS_TRUNKS, "alex", path.name)
        problem = "not a weights-only PyTorch file"
    with pytest.raises(InputError) as err:
        perceptual.load_lpips("alex")
    assert not marker.exists()
    message = str(err.value)
    assert message.startswith(f"{path}: ") and problem in message and "\n" not in message, message


def test_a_trunk_with_other_keys_is_one_line(checkpoints, monkeypatch):
    path = torchvision_file({"features.0.weight": torch.zeros(3)}, checkpoints, "alexnet-other")
    monkeypatch.setitem(perceptual.LPIPS_TRUNKS, "alex", path.name)
    with pytest.raises(InputError, match=r"alexnet-other-\w{8}.pth: not torchvision's alexnet weights \(10 problems: "
                                         r"missing features.0.bias; missing features.3.weight;"):
        perceptual.load_lpips("alex")


@pytest.mark.filterwarnings("ignore:.*(pretrained|weights).*:UserWarning")  # lpips calls torchvision's old API
def test_a_random_alexnet_trunk_gives_lpips_own_result(checkpoints, monkeypatch):
    """The same random torchvision AlexNet read by load_lpips and by lpips' own torchvision path: equal weights and
    equal distances."""
    import lpips
    import torchvision
    torch.manual_seed(0)
    alexnet = torchvision.models.alexnet()
    path = torchvision_file(alexnet.state_dict(), checkpoints, "alexnet-random")
    monkeypatch.setitem(perceptual.LPIPS_TRUNKS, "alex", path.name)
    model = perceptual.load_lpips("alex")
    monkeypatch.setattr(lpips.pretrained_networks.tv, "alexnet", lambda **kwargs: alexnet)
    reference = lpips.LPIPS(net="alex", verbose=False).eval()
    assert model.state_dict().keys() == reference.state_dict().keys()
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(model.state_dict()[key], value, rtol=0, atol=0, msg=key)
    x, y = torch.rand(2, 4, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(model(x, y), reference(x, y), rtol=0, atol=0)


def test_vgg16_features_map_into_lpips_slices():
    """Every tensor of lpips' VGG slices comes from torchvision's `features` at the same index (built on the meta
    device: no 528 MB of weights)."""
    import lpips
    import torchvision
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        net = lpips.pretrained_networks.vgg16(pretrained=False)
        state = torchvision.models.vgg16().state_dict()
    mapped = perceptual.lpips_trunk(net, state, "vgg16.pth")
    features = {k for k in state if k.startswith("features.")}
    assert mapped.keys() == net.state_dict().keys() and len(mapped) == len(features) == 26
    assert {id(v) for v in mapped.values()} == {id(state[k]) for k in features}
    assert mapped["slice1.0.weight"] is state["features.0.weight"]
    assert mapped["slice5.28.bias"] is state["features.28.bias"]
