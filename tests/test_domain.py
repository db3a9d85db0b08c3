"""domain.py: the embedded set's classifier, its cache, and the domain FID and accuracies computed with it."""
import os

import numpy as np
import pytest
import torch

import metrics
from embedded_sets import COLORS, SHAPES, caption, make_scene, read_caption
from runtime.errors import InputError
from tools import domain


TINY = domain.DomainSettings(num_images=1024, steps=80, batch_size=32)  # seconds: features, not accuracy


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """(classifier trained on the tiny budget, its cache folder), once per session."""
    cache = tmp_path_factory.mktemp("domain")
    return domain.load_classifier(TINY, cache), cache


@pytest.fixture(scope="session")
def held_out():
    """512 real held-out 32 px images and the ShapesDataset they come from."""
    return domain.rendered("val", 32, 512)


def domain_fid(model, a, b) -> float:
    """Fréchet distance between the classifier features of two uint8 image batches."""
    fa, fb = (metrics.compute_features(model, x, progress=False)["features"] for x in (a, b))
    return metrics.frechet_distance(*metrics.feature_statistics(fa), *metrics.feature_statistics(fb))


def test_domain_fid_is_zero_for_a_set_with_itself_and_grows_with_a_colour_shift(tiny, held_out):
    model, images = tiny[0], held_out[0]
    other = domain.rendered("train", 32, len(images), seed=1)[0]  # same distribution, other scenes
    shifted = np.clip(other.astype(np.int16) + [60, -40, 0], 0, 255).astype(np.uint8)
    sampling = domain_fid(model, images, other)  # > 0 only from the finite sample
    assert abs(domain_fid(model, images, images)) < 1e-4 * sampling  # rounding only (fewer images than features)
    assert domain_fid(model, images, shifted) > 3 * sampling


def test_classifier_is_cached_by_its_settings_and_reused(tiny, monkeypatch):
    model, cache = tiny
    path = TINY.path(cache)
    assert path.is_file() and path.suffix == ".safetensors"
    mtime = path.stat().st_mtime_ns
    monkeypatch.setattr(domain, "train_classifier", lambda settings: pytest.fail("retrained a cached classifier"))
    again = domain.load_classifier(TINY, cache)
    assert path.stat().st_mtime_ns == mtime
    for key, value in model.state_dict().items():
        torch.testing.assert_close(again.state_dict()[key], value, rtol=0, atol=0)
    assert domain.DomainSettings(num_images=1024, steps=81, batch_size=32).path(cache) != path


def test_training_is_seeded_and_leaves_the_callers_random_state_alone():
    settings = domain.DomainSettings(num_images=64, steps=3, batch_size=8)
    trained = []
    for caller_seed in (1, 2):
        torch.manual_seed(caller_seed)
        before = torch.get_rng_state()
        trained.append(domain.train_classifier(settings).state_dict())
        assert torch.equal(torch.get_rng_state(), before)
    for key, value in trained[0].items():
        torch.testing.assert_close(trained[1][key], value, rtol=0, atol=0)


def test_classifier_trains_in_fp32_on_the_cpu_unless_bf16_is_asked(monkeypatch):
    """bf16 autocast on a CPU without native bf16 is 7x slower: fp32 unless settings.precision says "bf16" (which
    then gives another cached file)."""
    dtypes, encode = [], domain.ShapesClassifier.encode

    def spy(self, images):
        features = encode(self, images)
        dtypes.append(features.dtype)
        return features
    monkeypatch.setattr(domain.ShapesClassifier, "encode", spy)
    fp32, bf16 = (domain.DomainSettings(num_images=16, steps=1, batch_size=4, precision=p) for p in ("auto", "bf16"))
    domain.train_classifier(fp32)
    domain.train_classifier(bf16)
    assert dtypes == [torch.float32, torch.bfloat16]
    assert fp32.path("cache") != bf16.path("cache") and fp32 == domain.DomainSettings(num_images=16, steps=1,
                                                                                       batch_size=4)


def test_read_caption_gives_shape_colour_and_cell_of_the_first_object():
    cells = set()
    for seed in range(40):
        scene = make_scene(np.random.default_rng(seed))
        o = scene["objects"][0]
        cells.add(3 * o["row"] + o["col"])
        assert read_caption(caption(scene)) == {"label": SHAPES.index(o["shape"]),
                                                "colour": list(COLORS).index(o["colour"]), "cell": 3 * o["row"] + o["col"]}
    assert len(cells) == 9  # every place phrase, "at the top left" as much as "at the top"
    with pytest.raises(InputError, match="names no object"):
        read_caption("A photo of a dog.")


def one_hot(classes, n):
    return np.eye(n)[classes]


def test_class_and_caption_accuracy_on_known_predictions():
    empty_s, empty_c = domain.NO_SHAPE, domain.NO_COLOUR
    shape = np.full((2, 9), empty_s)
    shape[0, 4], shape[1, 0], shape[1, 8] = 3, 1, 2  # image 0: a star in the centre; 1: square top left, triangle
    colour = np.full((2, 9), empty_c)
    colour[0, 4], colour[1, 0] = 0, 5
    shape_logits, colour_logits = one_hot(shape, empty_s + 1), one_hot(colour, empty_c + 1)
    assert domain.class_accuracy(shape_logits, [3, 2]) == 1.0  # the triangle need not be the first object
    assert domain.class_accuracy(shape_logits, [3, 0]) == 0.5
    red, purple = list(COLORS)[0], list(COLORS)[5]
    captions = [f"An image of a small {red} star in the center, on a navy background.",
                f"An image of a large {purple} triangle at the top left and a small {red} square on the left, on a "
                "navy background."]
    assert domain.caption_accuracy(shape_logits, colour_logits, captions) == (0.5, 1.0)


@pytest.mark.slow
def test_held_out_accuracy_of_the_default_classifier(tmp_path):
    """The classifier that `domain.py SAMPLE.npz` uses, trained as it is (80 s on 2 idle cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count())  # conftest's one thread suits tiny tensors, not this training
    try:
        model = domain.load_classifier(domain.DomainSettings(), tmp_path)
    finally:
        torch.set_num_threads(threads)
    accuracy = domain.held_out_accuracy(model)
    assert accuracy["class accuracy"] >= 0.9
    assert accuracy["caption shape accuracy"] >= 0.85 and accuracy["caption colour accuracy"] >= 0.95


def test_cli_prints_the_domain_report(tiny, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(domain, "load_classifier", lambda settings, cache_dir, device: tiny[0])
    images, data = domain.rendered("val", 32, 24)
    np.savez(tmp_path / "ref.npz", domain.rendered("train", 32, 24)[0])
    np.savez(tmp_path / "sample.npz", images)
    np.savez(tmp_path / "labelled.npz", images, labels=np.array(data.labels))
    (tmp_path / "captions.txt").write_text("\n".join(data.captions) + "\n")

    def report(*args):
        domain.main([*map(str, args)])
        return {line.split(": ")[0]: float(line.split(": ")[1]) for line in capsys.readouterr().out.splitlines()}
    assert list(report(tmp_path / "sample.npz", "--ref", tmp_path / "ref.npz")) == ["Domain FID"]
    assert list(report(tmp_path / "sample.npz")) == ["Domain FID"]  # against real held-out images
    assert list(report(tmp_path / "labelled.npz")) == ["Domain FID", "Class accuracy"]
    full = report(tmp_path / "sample.npz", "--ref", tmp_path / "ref.npz", "--classes-in-turn", "--captions-file",
                  tmp_path / "captions.txt")
    assert list(full) == ["Domain FID", "Class accuracy", "Caption shape accuracy", "Caption colour accuracy"]
    assert full["Domain FID"] > 0 and all(0 <= v <= 1 for k, v in full.items() if k != "Domain FID")
    with pytest.raises(InputError, match=r"missing.txt: file not found \(--captions\)"):
        domain.main([str(tmp_path / "sample.npz"), "--captions-file", str(tmp_path / "missing.txt")])
