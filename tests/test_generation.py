"""Stage 2 end to end on a two-class toy set whose class sets the colour: class-conditional samples have their
class's colour (so latent de-normalisation and the guidance sign are exercised), the DiT folder carries its latent
statistics, and sampling on 2 gloo ranks writes exactly what 1 rank writes."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import sample
import train
from dit import DiT


ROOT = Path(__file__).resolve().parents[1]
COLOURS = {0: (210, 40, 40), 1: (40, 60, 210)}  # class 0 red, class 1 blue


def two_colour_folder(data: Path, n: int = 64) -> Path:
    """A labelled --data folder of n noisy 32 px images, alternately class 0 (red) and class 1 (blue)."""
    (data / "img").mkdir(parents=True)
    rng, rows = np.random.default_rng(0), []
    for i in range(n):
        c = i % 2
        img = np.clip(np.array(COLOURS[c]) + rng.normal(0, 12, (32, 32, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(data / "img" / f"{i}.png")
        rows.append({"image": f"img/{i}.png", "caption": f"a {'red' if c == 0 else 'blue'} image", "label": c})
    (data / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return data


@pytest.fixture(scope="module")
def two_colour_dit(tmp_path_factory):
    """A tiny Baseline TexTok and a DiT-T trained on 64 noisy red / blue 32 px images (label = colour)."""
    root = tmp_path_factory.mktemp("two_colour")
    data = two_colour_folder(root / "data")
    common = ["--data", str(data), "--cache-dir", str(root / "cache"), "--workers", "0", "--log-every", "50",
              "--warmup-steps", "10", "--ckpt-every", "1000"]
    train.main(["--stage", "tokenizer", "--out", str(root / "tok"), "--conditioning", "none", "--width", "64",
                "--enc-layers", "1", "--dec-layers", "1", "--heads", "4", "--mlp-dim", "128", "--num-tokens", "4",
                "--batch-size", "16", "--epochs", "100", "--max-steps", "400", "--eval-every", "1000", *common])
    train.main(["--stage", "dit", "--task", "class", "--tokenizer", str(root / "tok" / "tokenizer"),
                "--out", str(root / "dit"), "--batch-size", "32", "--epochs", "1000", "--max-steps", "300",
                "--class-dropout", "0.2", "--num-classes", "2", *common])
    return root


def mean_colours(npz):
    """Mean RGB of each sample in an ADM .npz: [N, 3]."""
    return np.load(npz)["arr_0"].reshape(-1, 32 * 32, 3).mean(1)


@pytest.mark.slow
@pytest.mark.parametrize("w", [1.0, 3.0])
def test_class_conditional_samples_have_the_class_colour(two_colour_dit, tmp_path, w):
    """Samples alternate class 0, 1, ...: each must be near its class's colour, with and without guidance (w = 3
    on a constant schedule: a flipped guidance sign pushes the samples away from their class)."""
    npz = sample.main(["--dit", str(two_colour_dit / "dit" / "dit"), "--num-samples", "8", "--sampling-steps", "20",
                       "--cfg-scale", str(w), "--cfg-schedule", "constant", "--out", str(tmp_path)])
    for i, colour in enumerate(mean_colours(npz)):
        target = np.array(COLOURS[i % 2])
        assert np.abs(colour - target).max() < 15, (i, colour, target)


@pytest.mark.slow
def test_dit_folder_holds_the_latent_normalisation(two_colour_dit):
    """The DiT's buffers are the per-channel mean and std of the cached training latents, and `denormalize`
    inverts the normalisation the DiT was trained on."""
    dit = DiT.from_pretrained(two_colour_dit / "dit" / "dit")
    (cache,) = (two_colour_dit / "cache" / "latents").glob("*/Z.npy")
    Z = torch.from_numpy(np.load(cache))
    torch.testing.assert_close(dit.latent_mean, Z.mean(dim=(0, 1)))
    torch.testing.assert_close(dit.latent_std, Z.std(dim=(0, 1)))
    torch.testing.assert_close(dit.denormalize((Z - Z.mean(dim=(0, 1))) / Z.std(dim=(0, 1))), Z, atol=1e-5, rtol=1e-5)
    assert dit.meta["split"]["data"] == str(two_colour_dit / "data") and dit.meta["task"] == "class"


@pytest.mark.slow
def test_two_gloo_ranks_sample_what_one_rank_samples(two_colour_dit, tmp_path):
    """`torchrun --nproc_per_node 2 sample.py` (two gloo ranks) writes the same .npz as one process, for a count
    that 2 does not divide, with no padding and no leftover part files."""
    argv = ["--dit", str(two_colour_dit / "dit" / "dit"), "--num-samples", "5", "--batch-size", "2", "--sampling-steps", "5",
            "--cfg-scale", "2.0"]
    one = sample.main(argv + ["--out", str(tmp_path / "one")])
    from test_train import free_port
    port, procs = free_port(), []
    for rank in range(2):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
        code = f"import sample; sample.main({argv + ['--out', str(tmp_path / 'two')]!r})"
        procs.append(subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    for p in procs:
        output = p.communicate(timeout=300)[0]
        assert p.returncode == 0, output[-3000:]
    two = tmp_path / "two" / Path(one).name
    a, b = np.load(one)["arr_0"], np.load(two)["arr_0"]
    assert a.shape == (5, 32, 32, 3) and np.array_equal(a, b)
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == [".lock", "samples.png", two.name]  # rank 0's lock


@pytest.mark.slow
def test_compiled_sampling_equals_eager(two_colour_dit, tmp_path):
    """`--compile` (CUDA graphs on a GPU; inductor here) samples what the eager DiT samples, guided and not."""
    for w in ("1.0", "2.0"):
        argv = ["--dit", str(two_colour_dit / "dit" / "dit"), "--num-samples", "4", "--sampling-steps", "4", "--cfg-scale", w]
        eager = np.load(sample.main(argv + ["--no-compile", "--out", str(tmp_path / f"eager{w}")]))["arr_0"]
        compiled = np.load(sample.main(argv + ["--compile", "--out", str(tmp_path / f"compiled{w}")]))["arr_0"]
        assert np.abs(eager.astype(int) - compiled.astype(int)).max() <= 1
