"""The benchmarks' shared pieces (bench/harness.py): seed aggregation, mean and spread per group; the class accuracy
and object PSNR of reconstructions; the run cache keyed by arguments and code."""
import sys
from pathlib import Path

import numpy as np
import pytest
import torch


sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import harness  # noqa: E402
from harness import mean_over_seeds, recon_class_accuracy  # noqa: E402

from tools import domain  # noqa: E402


def test_mean_over_seeds_groups_averages_and_keeps_labels():
    runs = [{"table": "4a", "row": "class", "seed": s, "flags": ["--conditioning", "class"], "psnr": p, "lpips": None}
            for s, p in ((0, 19.0), (1, 21.0), (2, 20.0))]
    runs.append({"table": "default", "row": "default", "seed": 0, "flags": [], "psnr": 18.0, "lpips": None})
    rows = mean_over_seeds(runs, keys=("table", "row"))
    assert [(r["table"], r["seeds"]) for r in rows] == [("4a", 3), ("default", 1)]
    assert rows[0]["psnr"] == pytest.approx(20.0) and rows[0]["psnr_std"] == pytest.approx((2 / 3) ** 0.5)
    assert rows[0]["flags"] == ["--conditioning", "class"] and rows[0]["lpips"] is None and "seed" not in rows[0]
    assert rows[1]["psnr"] == 18.0 and rows[1]["psnr_std"] == 0.0


class RedMeansCircle(torch.nn.Module):
    """A stand-in for domain.ShapesClassifier: cell 0 holds a circle (class 0) in mostly-red images, else a square."""
    outputs = ("features", "shape", "colour")

    def __init__(self):
        super().__init__()
        self.p = torch.nn.Parameter(torch.zeros(()))

    def forward(self, images):
        red = (images[..., 0].float().mean((1, 2)) > 127).long()
        shape = torch.full((len(images), 9, 9), -1.0)
        shape[:, 1:, 8] = 1.0  # the other cells are empty (the last class)
        shape[:, 0, :] = torch.nn.functional.one_hot(1 - red, 9).float()
        colour = torch.zeros(len(images), 9, 13)
        colour[..., 12] = 1.0  # every cell: no colour
        return shape.flatten(1), shape, colour


def test_recon_class_accuracy_reads_the_shape_logits():
    images = np.zeros((4, 8, 8, 3), np.uint8)
    images[:2, ..., 0] = 255  # two red images: "circles"
    assert recon_class_accuracy(RedMeansCircle(), images, [0, 0, 1, 1], batch_size=3) == 1.0
    assert recon_class_accuracy(RedMeansCircle(), images, [1, 0, 1, 0], batch_size=3) == 0.5
    assert recon_class_accuracy(None, images, [0, 0, 1, 1], batch_size=3) is None


def test_region_psnr_reads_only_the_object():
    real = np.zeros((2, 4, 4, 3), np.uint8)
    rec = real.copy()
    rec[:, 0] = 255  # wrong outside the object only
    masks = np.zeros((2, 4, 4))
    masks[:, 2:] = 1.0
    perfect = 10 * np.log10(255.0 ** 2 / 1e-10)
    assert harness.region_psnr(real, rec, masks) == pytest.approx(perfect)
    rec[0, 3, 3] = 16  # one wrong pixel of the 8 in image 0's object (3 channels each)
    want = (10 * np.log10(255.0 ** 2 / (16 ** 2 / 8)) + perfect) / 2
    assert harness.region_psnr(real, rec, masks) == pytest.approx(want)


FAKE_TRAIN = """import sys
from pathlib import Path
import helper
out = Path(sys.argv[sys.argv.index("--out") + 1])
out.mkdir(parents=True, exist_ok=True)
count = Path(sys.argv[0]).parent / "count.txt"
count.write_text(str(int(count.read_text()) + 1 if count.exists() else 1))
"""


def test_runs_are_cached_by_arguments_and_by_the_code_they_import(tmp_path):
    (tmp_path / "fake_train.py").write_text(FAKE_TRAIN)
    (tmp_path / "helper.py").write_text("import other\nVALUE = 1\n")
    (tmp_path / "other.py").write_text("X = 0\n")
    (tmp_path / "unrelated.py").write_text("Y = 0\n")
    argv = ["--out", str(tmp_path / "run"), "--seed", "0"]
    count = lambda: int((tmp_path / "count.txt").read_text())
    assert [str(p) for p in harness.imported_files("fake_train.py", tmp_path)] == ["fake_train.py", "helper.py",
                                                                                    "other.py"]
    harness.train_runs([argv], "fake_train.py", root=tmp_path)
    harness.train_runs([argv], "fake_train.py", root=tmp_path)
    assert count() == 1  # same arguments, same code: reused
    (tmp_path / "unrelated.py").write_text("Y = 1\n")
    harness.train_runs([argv], "fake_train.py", root=tmp_path)
    assert count() == 1  # a file the run does not import
    (tmp_path / "other.py").write_text("X = 1\n")  # imported through helper.py
    harness.train_runs([argv], "fake_train.py", root=tmp_path)
    assert count() == 2
    harness.train_runs([argv[:-1] + ["1"]], "fake_train.py", root=tmp_path)
    assert count() == 3  # other arguments
    second = ["--out", str(tmp_path / "second"), "--seed", "1"]
    harness.train_runs([argv[:-1] + ["1"], second], "fake_train.py", jobs=2, root=tmp_path)
    assert count() == 4 and (tmp_path / "second" / "bench_run.json").is_file()  # only the new run


def test_read_caption_reads_back_the_object_every_caption_names():
    from embedded_sets import CAPTION_STYLES, OBJECT_SETS, make_object_scene, object_caption, read_caption
    for family, objects in OBJECT_SETS.items():
        for label, name in enumerate(objects):
            scene = {**make_object_scene(np.random.default_rng(label), family), "object": name}
            for style in CAPTION_STYLES:
                assert read_caption(object_caption(scene, style), family) == {"label": label}


class TopLeftPixelIsTheClass(torch.nn.Module):
    """A stand-in for ObjectClassifier: the class is the top-left red value, the features the channel means."""
    outputs = ("logits", "features")

    def __init__(self):
        super().__init__()
        self.p = torch.nn.Parameter(torch.zeros(()))

    def forward(self, images):
        logits = torch.nn.functional.one_hot(images[:, 0, 0, 0].long() % 36, 36).float()
        return logits, images.float().mean((1, 2)) + torch.linspace(0, 1, 4)[None, :3] * images[:, 1, 1].float()


def test_object_sample_report_scores_class_caption_and_distance(monkeypatch):
    from embedded_sets import ObjectDataset, object_caption
    monkeypatch.setattr(domain, "object_classifier", lambda *a, **k: TopLeftPixelIsTheClass())
    real = ObjectDataset("glyphs", "val", 32, 40)
    same = domain.object_sample_report(real.images.copy(), "glyphs")
    assert same == {"Object FID": pytest.approx(0.0, abs=1e-6)}  # the real images themselves
    samples = real.images.copy()
    labels = np.arange(40) % 36
    samples[:, 0, 0, 0] = labels
    samples[:10, 0, 0, 0] = (labels[:10] + 1) % 36  # 10 of 40 of another class
    scenes = [{**s, "object": "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"[c]} for s, c in zip(real.scenes, labels)]
    report = domain.object_sample_report(samples, "glyphs", labels, [object_caption(s) for s in scenes])
    assert report["Class accuracy"] == report["Caption object accuracy"] == 0.75
    assert report["Object FID"] > 0


@pytest.mark.parametrize("bench", ["text_conditioning", "ablations", "generation", "plot_run", "schedules"])
def test_a_bench_without_matplotlib_stops_in_one_line_before_its_first_run(bench, monkeypatch, tmp_path):
    """A bench that plots checks for matplotlib first: one InputError, no training run started, no data built."""
    import importlib

    import data
    from runtime.errors import InputError
    module = importlib.import_module(bench)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` fails, installed or not
    for owner in (module, harness, data):  # what would start work
        for name in ("train_runs", "train_run", "make_datasets", "read_log"):
            if hasattr(owner, name):
                monkeypatch.setattr(owner, name, lambda *a, name=name, **k: pytest.fail(f"{name} called"))
    with pytest.raises(InputError, match=rf"^matplotlib: not installed, and bench/{bench}.py .*; pip install") as err:
        module.main([str(tmp_path)] if bench == "plot_run" else ["--out", str(tmp_path)])
    assert "\n" not in str(err.value)


def test_data_classifier_learns_a_labelled_folder_and_is_cached(tmp_path, monkeypatch):
    """set_classifier of a labelled --data folder: trained on its training split, right on its held-out split,
    saved once and then loaded (not trained again)."""
    from types import SimpleNamespace

    from data import make_datasets
    from test_generation import two_colour_folder
    folder = two_colour_folder(tmp_path / "data")
    args = SimpleNamespace(data=str(folder), val=None, num_images=0, cache_dir=str(tmp_path / "cache"))
    classifier = harness.set_classifier(args, "cpu")
    val = make_datasets(str(folder))[1]
    images = np.concatenate([harness.to_uint8(val[i]["image"][None]) for i in range(len(val))])
    assert recon_class_accuracy(classifier, images, val.labels, 8) == 1.0
    assert recon_class_accuracy(classifier, images, 1 - np.asarray(val.labels), 8) == 0.0
    monkeypatch.setattr(domain, "fit", lambda *a, **k: pytest.fail("trained again"))
    again = harness.set_classifier(args, "cpu")
    for a, b in zip(classifier.state_dict().values(), again.state_dict().values()):
        torch.testing.assert_close(a, b)


class MeanColour(torch.nn.Module):
    """A stand-in for the FID Inception: an image's mean colour and its spread as a 6-d "pool" feature."""
    outputs = ("pool",)

    def __init__(self):
        super().__init__()
        self.p = torch.nn.Parameter(torch.zeros(()))

    def forward(self, images):
        x = images.float().flatten(1, 2)
        return (torch.cat([x.mean(1), x.std(1)], 1),)


def test_generation_scores_against_the_held_out_real_images(tmp_path, monkeypatch):
    """bench/generation.py's Scorer: gFID of the real images against themselves is 0 and grows for other images;
    on a --data folder class accuracy is its classifier's against the labels asked for."""
    from types import SimpleNamespace

    import generation
    monkeypatch.setattr(generation.metrics, "load_inception", lambda *a, **k: MeanColour())
    monkeypatch.setattr(generation, "set_classifier", lambda *a, **k: TopLeftPixelIsTheClass())
    rng = np.random.default_rng(0)
    real = rng.integers(0, 256, (40, 8, 8, 3), dtype=np.uint8)
    args = SimpleNamespace(data="DIR", set="glyphs", inception=None, eval_batch_size=16, cache_dir=str(tmp_path))
    score = generation.Scorer(args, real, "cpu")
    labels = real[:, 0, 0, 0] % 36
    same = score(real, labels)
    assert same["gFID"] == pytest.approx(0.0, abs=1e-6) and same["Class accuracy"] == 1.0
    darker = score(real // 2, (real[:, 0, 0, 0] // 2 + 1) % 36)  # every sample of another class than asked
    assert darker["gFID"] > 100 and darker["Class accuracy"] == 0.0
    assert score(real, None)["Class accuracy"] is None  # T2I samples have no class to ask for


def test_schedules_runs_each_length_in_its_folder_and_pairs_the_differences_by_seed(tmp_path, monkeypatch):
    """bench/schedules.py: one text_conditioning.py call per length (its --train-steps, OUT/s<steps>), then per N and
    length the PSNR over seeds, variant − Baseline paired by seed, the gain over the half length (plateau under
    0.1 dB) and the training l2 of the last 10% of the log rows."""
    import json

    import schedules
    psnr = {("baseline", 1024, 0): 20.0, ("baseline", 1024, 1): 20.2, ("textok", 1024, 0): 20.1,
            ("textok", 1024, 1): 20.5, ("baseline", 2048, 0): 20.05, ("baseline", 2048, 1): 20.25,
            ("textok", 2048, 0): 21.0, ("textok", 2048, 1): 21.4}
    calls = []

    def fake_text_conditioning(argv):  # what text_conditioning.main leaves in OUT/s<steps>/glyphs and runs/
        steps, out = int(argv[argv.index("--train-steps") + 1]), Path(argv[argv.index("--out") + 1])
        calls.append((steps, out))
        rows = [{"variant": "thumbnail", "tokens": 4, "seed": None, "psnr": 17.0}]
        for (variant, length, seed), value in psnr.items():
            if length == steps:
                rows.append({"variant": variant, "tokens": 4, "seed": seed, "psnr": value, "seconds": 60.0,
                             "train_psnr": value + 0.1 * seed})
                log = [{"step": i, "l2": 1.0 if i <= 90 else 0.5 + 0.2 * seed} for i in range(1, 101)]
                log += [{"step": 100, "val_psnr_uint8": value}]
                run = out / "runs" / f"glyphs-{variant}-4-seed{seed}"
                run.mkdir(parents=True)
                (run / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log))
        (out / "glyphs").mkdir(parents=True)
        (out / "glyphs" / "results.json").write_text(json.dumps(rows))

    monkeypatch.setattr(schedules.text_conditioning, "main", fake_text_conditioning)
    monkeypatch.setattr(harness, "require", lambda *a: None)
    monkeypatch.setattr(schedules, "figure", lambda path, runs: calls.append((path.name, len(runs))))
    schedules.main(["--train-steps", "2048", "1024", "--num-tokens", "4", "--seeds", "0", "1", "--out", str(tmp_path)])
    assert calls == [(1024, tmp_path / "s1024"), (2048, tmp_path / "s2048"), ("schedules_N4.png", 8)]
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ") for line in
            (tmp_path / "schedules.md").read_text().splitlines() if line.startswith(("| 1024", "| 2048"))}
    assert rows["1024"][1:4] == ["20.10 ± 0.10 (2)", "20.30 ± 0.20 (2)", "+0.20 ± 0.10 (2)"]
    assert rows["2048"][3] == "+1.05 ± 0.10 (2)"  # TexTok − Baseline, seed by seed: +0.95, +1.15
    assert rows["2048"][5:7] == ["+0.05 ± 0.00 (2) plateau", "+0.90 ± 0.00 (2)"]  # gain over 1024: Baseline, TexTok
    assert rows["2048"][7] == "-0.05 / -0.05"  # held-out − training PSNR, mean over the seeds (0, -0.1)
    assert rows["2048"][8] == "0.6000 / 0.6000"  # training l2: the seeds' mean over the last 10 rows (0.5, 0.7)
    calls.clear()
    schedules.main(["--train-steps", "1024", "2048", "--out", str(tmp_path), "--report-only"])
    assert calls == [("schedules_N4.png", 8)]  # no text_conditioning.py call: the results.json already there


def test_evaluate_measures_the_training_images_beside_the_held_out_ones(tmp_path):
    """harness.evaluate's train_psnr: the tokenizer on the first len(held-out) images of the split it trained on."""
    import argparse

    import metrics
    from conditions import Conditioned
    from data import make_datasets
    from runtime.files import save_json
    from conftest import tiny_config
    from textok import TexTok
    torch.manual_seed(0)
    model = TexTok(tiny_config(conditioning="none")).eval()
    model.save_pretrained(tmp_path / "run" / "tokenizer")
    save_json({"set": "glyphs"}, tmp_path / "run" / "config.json")
    args = argparse.Namespace(data=None, val=None, num_images=128, cache_dir=str(tmp_path / "cache"))
    row, real, _, _ = harness.evaluate(tmp_path / "run", args, torch.device("cpu"), 32, None, None, {})
    train, val = make_datasets(None, None, 32, 128, family="glyphs")
    seen = torch.utils.data.Subset(Conditioned.for_model(train, model.cfg, args.cache_dir), range(len(val)))
    expected = metrics.psnr(*harness.reconstruct(model, seen, torch.device("cpu"), 32)[:2])
    assert len(real) == len(val) == 64 and row["train_psnr"] == pytest.approx(expected)
    assert abs(row["train_psnr"] - row["psnr"]) > 1e-3  # other images than the held-out ones
