"""Stage 1 and stage 2 training: one step learns, GAN terms switch on at disc_start, exact resume, refused configs,
the non-finite guard, DDP (two gloo processes) against one process, and the embedded default end to end."""
import errno
import json
import math
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import perceptual
import steps
import train
from runtime.errors import InputError
from runtime.files import load_tensors
from runtime.run import Run


ROOT = Path(__file__).resolve().parents[1]


def base_args(out, cache, *extra):
    """A seconds-long tiny run: 32 embedded images, batch 8, no loader workers."""
    return ["--stage", "tokenizer", "--out", str(out), "--cache-dir", str(cache), "--num-images", "32",
            "--batch-size", "8", "--workers", "0", "--log-every", "1", "--eval-every", "100", "--ckpt-every", "100",
            "--warmup-steps", "1", *extra]


def log_rows(out):
    return [json.loads(l) for l in (Path(out) / "log.jsonl").read_text().splitlines()]


def weights(out):
    return load_tensors(Path(out) / "tokenizer" / "model.safetensors")


def test_steps_change_weights_and_lower_loss(tmp_path, text_cache):
    """Same 8 images every step (--num-images 8): the weights move and the l2 loss falls."""
    out = tmp_path / "run"
    train.main(base_args(out, text_cache, "--num-images", "8", "--epochs", "10", "--max-steps", "6", "--disc-start", "100"))
    rows = [r for r in log_rows(out) if "l2" in r]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert rows[-1]["l2"] < rows[0]["l2"]
    torch.manual_seed(0)
    from textok import TexTok
    init = TexTok(train.run_configs(train.parse_args(["--stage", "tokenizer"]))[0]).state_dict()
    trained = load_tensors(out / "step-0000006" / "state.safetensors")
    assert not torch.equal(trained["s.model.tokenizer.to_Z.weight"], init["tokenizer.to_Z.weight"])
    assert (out / "recon-0000006.png").is_file() and (out / "tokenizer" / "config.json").is_file()


def test_gan_terms_start_at_disc_start(tmp_path, text_cache):
    out = tmp_path / "run"
    train.main(base_args(out, text_cache, "--max-steps", "3", "--disc-start", "2"))
    rows = [r for r in log_rows(out) if "l2" in r]
    for r in rows[:2]:
        assert not {"gan", "d_loss", "r1", "lecam"} & set(r), r
    assert {"gan", "d_loss", "r1", "lecam"} <= set(rows[2])
    assert rows[2]["r1"] > 0


def test_exact_resume(tmp_path, text_cache):
    """2N steps in one run == N steps, stop, --resume, N more: same weights and same logged losses."""
    common = ("--disc-start", "2", "--eval-every", "2", "--ckpt-every", "2")
    one, two = tmp_path / "one", tmp_path / "two"
    train.main(base_args(one, text_cache, *common, "--max-steps", "4"))
    train.main(base_args(two, text_cache, *common, "--max-steps", "2"))
    train.main(base_args(two, text_cache, *common, "--max-steps", "4", "--resume"))
    a, b = weights(one), weights(two)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
    drop = {"img_per_s"}
    rows = lambda out: [{k: v for k, v in r.items() if k not in drop} for r in log_rows(out)]
    assert rows(one) == rows(two)
    assert any("d_loss" in r for r in rows(two))


def test_resume_refuses_other_config(tmp_path, text_cache):
    """... and leaves OUT/config.json as it was."""
    out = tmp_path / "run"
    train.main(base_args(out, text_cache, "--max-steps", "1"))
    config = (out / "config.json").read_text()
    with pytest.raises(ValueError, match=r"config differs from the requested one: .*lr: 0.001 != 0.002"):
        train.main(base_args(out, text_cache, "--max-steps", "2", "--resume", "--lr", "0.002"))
    assert (out / "config.json").read_text() == config


def folder(out):
    """OUT's entries with the bytes of its files (checkpoint folders by their listing)."""
    return {p.name: sorted(os.listdir(p)) if p.is_dir() else p.read_bytes() for p in Path(out).iterdir()}


def test_second_run_in_same_out_is_refused_resume_and_overwrite_work(tmp_path, text_cache):
    """Issue 21's sequence: a second run into a run's folder changes nothing; --resume continues the run (a torn last
    log line dropped), pruning only its own checkpoints; --overwrite deletes the run, and only the run, first."""
    out = tmp_path / "run"
    train.main(base_args(out, text_cache, "--max-steps", "4", "--ckpt-every", "2"))
    before = folder(out)
    refusal = f"{out}: holds a run (latest step-0000004); continue it with --resume, or start over with --overwrite"
    with pytest.raises(InputError, match=re.escape(refusal)):
        train.main(base_args(out, text_cache, "--max-steps", "1", "--lr", "0.002"))
    assert folder(out) == before
    (out / "step-0000099").mkdir()  # another run's checkpoint: never pruned
    with open(out / "log.jsonl", "a") as f:
        f.write('{"step": 5, "l2": 0.0')  # the torn last line of a killed run
    train.main(base_args(out, text_cache, "--max-steps", "8", "--ckpt-every", "2", "--resume"))
    assert (out / "latest").read_text() == "step-0000008\n"
    assert sorted(p.name for p in out.glob("step-*")) == ["step-0000002", "step-0000006", "step-0000008",
                                                           "step-0000099"]
    assert [r["step"] for r in log_rows(out) if "l2" in r] == list(range(1, 9))
    (out / ".tmp-step-0000010").mkdir()  # a killed checkpoint write
    (out / "notes.txt").write_text("mine")
    train.main(base_args(out, text_cache, "--max-steps", "1", "--overwrite"))
    assert sorted(os.listdir(out)) == [".lock", "config.json", "latest", "log.jsonl", "notes.txt", "recon-0000001.png",
                                       "step-0000001", "tokenizer"]
    assert [r["step"] for r in log_rows(out)] == [1, 1]  # the losses and the validation PSNR of step 1


@pytest.mark.parametrize("held, what", [("log.jsonl", "log.jsonl"), ("step-0000003/", "step-0000003"),
                                        ("tokenizer/", "tokenizer")])
def test_folder_with_a_runs_files_but_no_latest_is_refused(tmp_path, text_cache, held, what):
    out = tmp_path / "run"
    (out / held).parent.mkdir(parents=True)
    (out / held).mkdir() if held.endswith("/") else (out / held).write_text("{}\n")
    with pytest.raises(InputError, match=re.escape(f"{out}: holds a run's files ({what}) but no latest checkpoint; "
                                                   "start over with --overwrite")):
        train.main(base_args(out, text_cache, "--max-steps", "1"))
    assert sorted(os.listdir(out)) == [".lock", held.rstrip("/")]  # the lock file: OUT was looked at under it


def test_disk_full_while_checkpointing_is_one_line(tmp_path, text_cache, monkeypatch):
    """The second checkpoint's write fails: the error names it and the last good one; no temporary folder stays."""
    from runtime import files
    calls, real = [], files.save_file

    def save_file(tensors, path):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(tensors, path)
    monkeypatch.setattr(files, "save_file", save_file)
    out = tmp_path / "run"
    with pytest.raises(InputError) as err:
        train.main(base_args(out, text_cache, "--max-steps", "4", "--ckpt-every", "2"))
    assert str(err.value) == (f"{out / 'step-0000004'}: cannot write the checkpoint ([Errno 28] No space left on "
                              f"device); last good checkpoint: {out / 'step-0000002'}")
    assert not list(out.glob(".tmp-step-*")) and (out / "latest").read_text() == "step-0000002\n"


def test_ctrl_c_is_one_line_naming_the_last_checkpoint(tmp_path, text_cache, monkeypatch, capsys):
    calls, real = [], train.ema_update

    def ema_update(*a):
        calls.append(1)
        if len(calls) == 3:  # during step 3
            raise KeyboardInterrupt
        real(*a)
    monkeypatch.setattr(train, "ema_update", ema_update)
    out = tmp_path / "run"
    try:
        train.main(base_args(out, text_cache, "--max-steps", "4", "--ckpt-every", "2"))
    except KeyboardInterrupt:  # would stop pytest itself
        pytest.fail("the KeyboardInterrupt escaped train.main")
    except SystemExit as stop:
        assert stop.code == 130
    else:
        pytest.fail("train.main went on after Ctrl-C")
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.splitlines()[-1] == (
        f"interrupted after step 2 of 4; last good checkpoint: {out / 'step-0000002'} (continue with --resume)")


def test_non_finite_loss_stops_with_step_and_checkpoint(tmp_path, text_cache, monkeypatch):
    """The terms are read once per log row: a NaN at a step between rows stops the run at the next row or
    checkpoint, whichever comes first, naming that step, before a checkpoint holds the weights it reached."""
    out = tmp_path / "run"
    real, calls = steps.F.mse_loss, []
    monkeypatch.setattr(steps.F, "mse_loss", lambda a, b: real(a, b) * float("nan"))
    with pytest.raises(FloatingPointError, match=r"non-finite loss at step 0: l2=nan.*last good checkpoint: none"):
        train.main(base_args(out, text_cache, "--max-steps", "2"))

    def nan_at_step_2(a, b):
        calls.append(1)
        return real(a, b) * (float("nan") if len(calls) == 3 else 1.0)
    monkeypatch.setattr(steps.F, "mse_loss", nan_at_step_2)
    for log_every, ckpt_every in ((4, 4), (5, 3)):
        calls.clear()
        out = tmp_path / f"run-{log_every}-{ckpt_every}"
        with pytest.raises(FloatingPointError, match=r"non-finite loss at step 2: l2=nan.*checkpoint: none"):
            train.main(base_args(out, text_cache, "--max-steps", "8", "--log-every", str(log_every), "--ckpt-every",
                                 str(ckpt_every)))
        assert not list(out.glob("step-*"))


def test_perceptual_loss_needs_vgg_weights(tmp_path, text_cache, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    with pytest.raises(InputError, match=r"vgg16-397923af.pth: not found.*--perceptual-weight 0"):
        train.main(base_args(tmp_path / "run", text_cache, "--max-steps", "1", "--perceptual-weight", "0.1"))


def test_perceptual_loss_runs_with_local_vgg_weights(tmp_path, text_cache, monkeypatch):
    """The real lpips code path, with random VGG weights placed in a temporary TORCH_HOME (no download), named with
    their own hash as torchvision names its files."""
    import torchvision
    from test_lpips import torchvision_file
    home = tmp_path / "torch_home"
    path = torchvision_file(torchvision.models.vgg16().state_dict(), home / "hub" / "checkpoints", "vgg16-random")
    monkeypatch.setitem(perceptual.LPIPS_TRUNKS, "vgg", path.name)
    monkeypatch.setenv("TORCH_HOME", str(home))
    out = tmp_path / "run"
    train.main(base_args(out, text_cache, "--max-steps", "1", "--perceptual-weight", "0.1"))
    assert log_rows(out)[0]["perceptual"] > 0
    assert json.loads((out / "config.json").read_text())["perceptual_loss"].startswith("on")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def states(out, step):
    """The tokenizer, EMA, discriminator and LeCAM tensors of checkpoint `step` (optimizer moments left out)."""
    state = load_tensors(Path(out) / f"step-{step:07d}" / "state.safetensors")
    return {k: v for k, v in state.items() if k.split(".")[1] in ("model", "ema", "disc", "lecam")}


def assert_same_states(a, b):
    assert a.keys() == b.keys() and any(k.startswith("s.disc.") for k in a) and "s.lecam.ema_real" in a
    for k in a:  # Adam magnifies float noise in near-zero gradients: 5e-5 is 5% of one step at lr 1e-3
        tol = dict(rtol=1e-4, atol=0) if k.startswith("s.lecam.") else dict(rtol=1e-4, atol=5e-5)
        torch.testing.assert_close(a[k], b[k], **tol, msg=lambda m: f"{k}: {m}")


GAN_ON = ("--disc-start", "0", "--r1-every", "1", "--max-steps", "2", "--ckpt-every", "2")  # R1 on both steps


@pytest.mark.slow
def test_ddp_two_gloo_processes_match_one(tmp_path, text_cache):
    """Two gloo ranks of 4 images each take the same two GAN steps as one process on the combined batch of 8:
    tokenizer, discriminator (R1 and LeCAM through all_reduce_grads) and LeCAM's EMAs agree."""
    train.main(base_args(tmp_path / "single", text_cache, *GAN_ON))  # also fills the text cache the ranks read
    port, procs = free_port(), []
    for rank in range(2):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
        argv = base_args(tmp_path / "ddp", text_cache, *GAN_ON)
        procs.append(subprocess.Popen([sys.executable, "-c", f"import train; train.main({argv!r})"], cwd=ROOT,
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    for p in procs:
        output = p.communicate(timeout=300)[0]
        assert p.returncode == 0, output[-3000:]
    assert_same_states(states(tmp_path / "single", 2), states(tmp_path / "ddp", 2))
    a, b = log_rows(tmp_path / "single")[0], log_rows(tmp_path / "ddp")[0]
    for k in ("l2", "d_loss", "r1", "lecam"):
        assert a[k] == pytest.approx(b[k], rel=1e-5), k


def test_grad_accumulation_matches_full_batch(tmp_path, text_cache):
    """K micro-batches of B/K equal one batch of B, GAN included: LeCAM's EMAs move once per step."""
    train.main(base_args(tmp_path / "full", text_cache, *GAN_ON))
    train.main(base_args(tmp_path / "accum", text_cache, *GAN_ON, "--grad-accum", "2"))
    assert_same_states(states(tmp_path / "full", 2), states(tmp_path / "accum", 2))


def test_embedded_images_render_once(monkeypatch):
    """ShapesDataset renders each scene on first use only, and the kept image is the rendered one."""
    import embedded_sets
    from runtime.images import to_tensor
    renders, real = [], embedded_sets.render
    monkeypatch.setattr(embedded_sets, "render", lambda scene, size: renders.append(scene) or real(scene, size))
    ds = embedded_sets.ShapesDataset("train", 32, 4)
    first = [ds[i]["image"] for i in (0, 1, 2, 3)]
    again = [ds[i]["image"] for i in (3, 2, 1, 0, 0)]
    assert len(renders) == 4
    for i in range(4):
        expected = to_tensor(real(ds.scenes[i], 32))
        assert torch.equal(first[i], expected) and torch.equal(again[3 - i], expected)


def test_embedded_default_command_end_to_end(tmp_path):
    """`python train.py --stage tokenizer` as the README says, shortened by --max-steps."""
    out = tmp_path / "run"
    subprocess.run([sys.executable, "train.py", "--stage", "tokenizer", "--max-steps", "3", "--out", str(out),
                    "--cache-dir", str(tmp_path / "cache"), "--num-images", "64", "--workers", "0"],
                   cwd=ROOT, check=True, capture_output=True)
    assert (out / "latest").read_text().strip() == "step-0000003"
    assert {"state.safetensors", "state.json", "config.json"} <= {p.name for p in (out / "step-0000003").iterdir()}
    assert (out / "recon-0000003.png").is_file() and (out / "tokenizer" / "model.safetensors").is_file()
    config = json.loads((out / "config.json").read_text())
    assert "perceptual loss OFF" in config["note"] and config["perceptual_loss"].startswith("OFF")


@pytest.mark.parametrize("task", ["class", "t2i"])
def test_stage2_and_sampling_end_to_end(tmp_path, text_cache, task):
    """Tiny tokenizer -> latent cache -> DiT (a few steps) -> sample.py writes an ADM .npz and a PNG grid. Whatever
    the sampling seed, the captions are held out: T2I reads the validation split, class sampling the caption pool."""
    import numpy as np

    import sample
    tok = tmp_path / "tok"
    train.main(base_args(tok, text_cache, "--max-steps", "2"))
    dit = tmp_path / "dit"
    train.main(["--stage", "dit", "--task", task, "--tokenizer", str(tok / "tokenizer"), "--out", str(dit),
                "--cache-dir", str(tmp_path / "cache"), "--num-images", "32", "--batch-size", "8", "--workers", "0",
                "--max-steps", "3", "--log-every", "1", "--warmup-steps", "1"])
    assert [r["step"] for r in log_rows(dit)] == [1, 2, 3] and all(r["loss"] > 0 for r in log_rows(dit))
    from runtime.files import file_sha1
    assert json.loads((dit / "dit" / "config.json").read_text())["tokenizer_sha1"] == \
        file_sha1(tok / "tokenizer" / "model.safetensors")  # sample.py checks the tokenizer against it
    npz = sample.main(["--dit", str(dit / "dit"), "--num-samples", "5", "--batch-size", "4", "--sampling-steps", "3",
                       "--cfg-scale", "1.5", "--out", str(tmp_path / "samples"), "--seed", "1"])
    arr = np.load(npz)["arr_0"]
    assert arr.shape == (5, 32, 32, 3) and arr.dtype == np.uint8
    assert (tmp_path / "samples" / "samples.png").is_file()
    captions = (tmp_path / "samples" / "captions.txt").read_text().splitlines()
    from data import class_caption_pool
    from embedded_sets import ShapesDataset
    held_out = ShapesDataset("val", 32, 64).captions if task == "t2i" else sum(class_caption_pool().values(), [])
    assert len(captions) == 5 and set(captions) <= set(held_out)
    assert not set(captions) & set(ShapesDataset("train", 32, 32).captions)


def test_sample_refuses_bad_values_and_missing_class_captions(tmp_path, monkeypatch):
    from types import SimpleNamespace

    import sample
    args = SimpleNamespace(num_samples=4, batch_size=2, sampling_steps=0, cfg_scale=None, cfg_power=None, seed=0,
                           out=str(tmp_path / "samples"))
    with pytest.raises(InputError, match="--sampling-steps: DDIM needs 1 to 1000 steps, got 0"):
        sample.check_args(args, 1000)
    args.sampling_steps, args.cfg_power = None, 0.0
    with pytest.raises(InputError, match=r"--cfg-power: must be > 0, got 0.0"):
        sample.check_args(args, 1000)
    (tmp_path / "class_captions.jsonl").write_text('{"label": 0, "caption": "a dog"}\n')
    dit = SimpleNamespace(meta={"task": "class", "num_classes": 2, "split": {"data": str(tmp_path), "captions": "full"}})
    tok = SimpleNamespace(cfg=SimpleNamespace(conditioning="text"))
    with pytest.raises(InputError, match=r"class_captions.jsonl: no held-out caption for class 1"):
        sample.labels_and_captions(dit, tok, SimpleNamespace(data=None, seed=0), 4)


def test_sampling_reads_the_held_out_captions_of_the_dits_one_object_set():
    """A DiT trained on --set glyphs samples with glyph captions: class i's caption names glyph i (its pool split),
    T2I's come from the glyphs' validation split; and a tokenizer on an embedded set embeds that set's classes."""
    from types import SimpleNamespace

    import sample
    from embedded_sets import GLYPHS, ObjectDataset
    split = {"data": None, "val": None, "num_images": 64, "captions": "full", "set": "glyphs"}
    tok = SimpleNamespace(cfg=SimpleNamespace(conditioning="text", image_size=32))
    args = SimpleNamespace(data=None, seed=0, prompts=None)
    labels, captions = sample.labels_and_captions(SimpleNamespace(meta={"task": "class", "num_classes": 36, "split": split}),
                                         tok, args, 40)
    assert labels == [i % 36 for i in range(40)]
    assert all(f" {GLYPHS[c]} " in text for c, text in zip(labels, captions)), captions
    _, captions = sample.labels_and_captions(SimpleNamespace(meta={"task": "t2i", "split": split}), tok, args, 5)
    assert set(captions) <= set(ObjectDataset("glyphs", "val", 32, 64).captions)
    for preset, set_, classes in (("toy-mechanism", "one-shape", 8), ("toy-mechanism", "glyphs", 36), ("tiny", "shapes", 8)):
        args = train.parse_args(["--stage", "tokenizer", "--preset", preset, "--set", set_])
        assert train.run_configs(args)[0].num_classes == classes
    args = train.parse_args(["--stage", "tokenizer", "--preset", "toy-mechanism", "--set", "one-shape", "--num-classes", "3"])
    assert train.run_configs(args)[0].num_classes == 3


def jsonl_folder(root, n=8, bad=None):
    """n tiny captioned PNGs in the README's layout; image `bad` (if given) is corrupt."""
    import numpy as np
    from PIL import Image
    (root / "img").mkdir(parents=True)
    for i in range(n):
        Image.fromarray(np.full((32, 32, 3), 15 * i, np.uint8)).save(root / "img" / f"{i}.png")
    if bad is not None:
        (root / "img" / f"{bad}.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    (root / "captions.jsonl").write_text("".join(json.dumps({"image": f"img/{i}.png", "caption": f"gray {i}",
                                                              "label": i % 2}) + "\n" for i in range(n)))
    return root


def test_bad_data_is_one_line_before_step_0(tmp_path):
    """A corrupt image in --data stops the command at start-up with one `error: <file>: <problem>` line."""
    data = jsonl_folder(tmp_path / "data", bad=3)
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, "train.py", "--stage", "tokenizer", "--data", str(data), "--out", str(out),
                        "--cache-dir", str(tmp_path / "cache"), "--max-steps", "1", "--workers", "0"],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and "1 of" in lines[-1] and "3.png: cannot read image" in lines[-1]
    assert "Traceback" not in r.stderr
    assert not (out / "latest").exists()


def test_bad_data_mid_run_names_last_checkpoint(tmp_path, text_cache, monkeypatch):
    """Data that goes bad after the scan (through a loader worker) is one InputError naming the last checkpoint."""
    data = jsonl_folder(tmp_path / "data", n=16)
    import data as data_module
    monkeypatch.setattr(data_module.JsonlDataset, "scan", lambda self, **kwargs: None)
    out = tmp_path / "run"
    val = jsonl_folder(tmp_path / "val", n=4)
    argv = ["--stage", "tokenizer", "--data", str(data), "--val", str(val), "--out", str(out), "--cache-dir", str(text_cache),
            "--batch-size", "4", "--ckpt-every", "1", "--workers", "1", "--warmup-steps", "1"]
    train.main(argv + ["--max-steps", "1"])
    for i in range(16):
        (data / "img" / f"{i}.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    with pytest.raises(InputError) as err:
        train.main(argv + ["--max-steps", "3", "--resume"])
    msg = str(err.value)
    assert "png: cannot read image" in msg and msg.endswith(f"last good checkpoint: {out / 'step-0000001'}")
    assert "Traceback" not in msg and len(msg.splitlines()) == 1


def test_ema_update_is_exact():
    """ema <- decay * ema + (1 - decay) * model over parameters and float buffers; integer buffers untouched."""
    ema, model = torch.nn.BatchNorm1d(3), torch.nn.BatchNorm1d(3)
    with torch.no_grad():
        for m, v in ((ema, 1.0), (model, 3.0)):
            m.weight.fill_(v), m.running_mean.fill_(v)
    model.num_batches_tracked.fill_(7)
    train.ema_update(ema, model, 0.75)
    assert torch.equal(ema.weight, torch.full((3,), 1.5)) and torch.equal(ema.running_mean, torch.full((3,), 1.5))
    assert ema.num_batches_tracked.item() == 0 and torch.equal(model.weight, torch.full((3,), 3.0))


def test_lr_schedule_warmup_then_cosine_to_zero():
    f = train.lr_lambda(warmup=4, total=12)
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(4) == 1.0 and f(8) == pytest.approx(0.5) and f(12) == pytest.approx(0.0, abs=1e-12)
    assert f(6) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4))) and f(100) == pytest.approx(0.0, abs=1e-12)


def test_lazy_r1_flag(tmp_path, text_cache):
    """--r1-every 2: the penalty (x 2) on disc steps 0, 2, ...; none on step 1."""
    out = tmp_path / "run"
    train.main(base_args(out, text_cache, "--max-steps", "3", "--disc-start", "0", "--r1-every", "2"))
    r1 = [r["r1"] for r in log_rows(out) if "l2" in r]
    assert r1[0] > 0 and r1[1] == 0 and r1[2] > 0


def test_stage1_steps_reproduce_recorded_losses(tmp_path, text_cache):
    """Two GAN steps from seed 0 give the losses and LeCAM EMAs recorded before the stage-1 step became
    steps.generator_step / steps.discriminator_step (the LeCAM penalty reads the EMAs before this step's update)."""
    out = tmp_path / "run"
    train.main(base_args(out, text_cache, *GAN_ON))
    rows = [r for r in log_rows(out) if "l2" in r]
    recorded = [{"l2": 1.12767, "gan": 0.704512, "grad_norm": 1.41804, "d_loss": 1.38447, "r1": 5.29535e-05,
                 "lecam": 0.000541862},
                {"l2": 0.916964, "gan": 0.754858, "grad_norm": 1.45534, "d_loss": 1.35019, "r1": 8.64946e-05,
                 "lecam": 0.0144067}]
    for row, expected in zip(rows, recorded, strict=True):
        assert {k: row[k] for k in expected} == pytest.approx(expected, rel=1e-4), row  # a swapped LeCAM: 1e-3
    state = load_tensors(out / "step-0000002" / "state.safetensors")
    assert state["s.lecam.ema_real"].item() == pytest.approx(-6.184484664e-05, rel=1e-4)
    assert state["s.lecam.ema_fake"].item() == pytest.approx(-1.424030779e-04, rel=1e-4)


def test_validation_psnr_is_metrics_psnr_on_uint8_images(tmp_path):
    """One PSNR: a reconstruction 0.6 grey levels off rounds to 1 level off, so the logged PSNR is 20 log10(255)
    (48.13 dB, metrics.psnr on uint8 images), not the float images' 52.57 dB."""
    levels = torch.randint(0, 254, (4, 3, 8, 8)).float()
    batch = {"image": levels / 127.5 - 1, "cond": None}
    model = lambda images, cond: ((levels + 0.6) / 127.5 - 1,)  # noqa: E731
    value = train.evaluate_tokenizer(model, batch, tmp_path / "grid.png", 0, torch.device("cpu"), "fp32")
    assert value == pytest.approx(20 * math.log10(255), abs=1e-4)
    assert (tmp_path / "grid.png").is_file()


def test_imagenet_presets_train_on_the_whole_data_folder(tmp_path):
    """The imagenet presets train on all of --data (ImageNet train, §4.2) and validate on --val: --data
    without --val is refused in one line before anything is read or written, in both stages; with --val the training
    set is every line of --data and validation is --val."""
    from conftest import tiny_config, train_and_val_folders
    train_and_val_folders(tmp_path)
    common = ["--preset", "imagenet256", "--data", str(tmp_path / "train"), "--cache-dir", str(tmp_path / "cache")]
    for stage in ("tokenizer", "dit"):
        with pytest.raises(InputError, match=r"^--preset imagenet256 trains on the whole --data folder .*--val DIR"):
            train.main(["--stage", stage, *common, "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()
    args = train.parse_args(["--stage", "tokenizer", *common, "--val", str(tmp_path / "val")])
    train.check_args(args)
    train_set, val_set = train.datasets_for(args, tiny_config(conditioning="none", image_size=8, patch_size=4), "cpu")
    assert len(train_set) == 10 and len(val_set) == 2 and val_set.items.root == tmp_path / "val"


class HostReads:
    """Counts, from Run.begin on (the training loop, after the set-up), the calls that read a floating-point or bool
    tensor on the host: each a device sync on CUDA. (The loader's integer index tensors never leave the host.)"""
    NAMES = ("item", "tolist", "__bool__", "__float__", "__int__")

    def __init__(self, monkeypatch):
        self.count, self.counting, self.monkeypatch = 0, False, monkeypatch

    def __enter__(self):
        for name in self.NAMES:
            self.monkeypatch.setattr(torch.Tensor, name, self.counted(getattr(torch.Tensor, name)))
        begin = Run.begin

        def counting_begin(run, objects):
            self.counting = True
            return begin(run, objects)
        self.monkeypatch.setattr(Run, "begin", counting_begin)
        return self

    def counted(self, real):
        def f(tensor, *args, **kwargs):
            self.count += self.counting and (tensor.is_floating_point() or tensor.dtype == torch.bool)
            return real(tensor, *args, **kwargs)
        return f

    def __exit__(self, *exc):
        self.monkeypatch.undo()


def test_training_steps_read_nothing_on_the_host_and_a_log_row_reads_once(tmp_path, text_cache, monkeypatch):
    """Both stages' loops (GAN steps with and without R1 in stage 1): 2 more steps in one more log row cost one host
    read, the row's (Run.read_terms); loss terms, grad norms and the non-finite check stay on the device."""
    tok = ("--disc-start", "0", "--r1-every", "2", "--log-every", "2", "--ckpt-every", "100", "--eval-every", "100")
    dit = ["--stage", "dit", "--tokenizer", str(tmp_path / "tok2" / "tokenizer"), "--cache-dir", str(text_cache),
           "--num-images", "32", "--batch-size", "8", "--workers", "0", "--log-every", "2", "--warmup-steps", "1"]
    reads = {}
    for steps_ in (2, 4):
        with HostReads(monkeypatch) as host:
            train.main(base_args(tmp_path / f"tok{steps_}", text_cache, *tok, "--max-steps", str(steps_)))
        reads["tokenizer", steps_] = host.count
    for steps_ in (2, 4):
        with HostReads(monkeypatch) as host:
            train.main([*dit, "--out", str(tmp_path / f"dit{steps_}"), "--max-steps", str(steps_)])
        reads["dit", steps_] = host.count
    assert reads["tokenizer", 4] - reads["tokenizer", 2] == 1, reads
    assert reads["dit", 4] - reads["dit", 2] == 1, reads
    assert [r["step"] for r in log_rows(tmp_path / "tok4") if "r1" in r] == [2, 4]
