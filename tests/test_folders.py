"""One run, one folder: a live run's --out is refused to a second run (train.py's two stages, sample.py) and freed
when it dies, even by kill -9; sample.py keeps earlier samples unless --overwrite, and decodes only with the
tokenizer the DiT was trained over; a killed write's temporary files are cleaned at the next start; a read-only or
full disk, and a state.json edited by hand, are one line."""
import errno
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_config
from test_inputs import edited_copy, models  # noqa: F401 (models: the tiny untrained folders, a fixture)
from test_train import base_args, log_rows

import sample
import train
from runtime import files, run
from runtime.errors import InputError
from runtime.files import file_sha1, load_json
from textok import TexTok


ROOT = Path(__file__).resolve().parents[1]


def listing(folder):
    """A folder's entries with the bytes of its files (folders by their listing)."""
    return {p.name: sorted(os.listdir(p)) if p.is_dir() else p.read_bytes() for p in Path(folder).iterdir()}


def held_message(out, pid):
    return f"{out}: in use by another run (pid {pid}); wait for it to end, or choose another --out"


# ------------------------------------------------------------------------------------------------- the lock
def test_a_second_run_into_a_training_runs_folder_is_refused(tmp_path, text_cache, monkeypatch):
    """Issue 27's two runs (seeds 0 and 1) into one --out: while the first trains, the second (a process of its own)
    exits 1 with one line naming the first's pid and changes nothing; the log is the first run's alone."""
    out, second = tmp_path / "run", []
    real = train.ema_update

    def ema_update(*args):
        if not second:  # during step 1 of the first run
            before = listing(out)
            second.append(subprocess.run([sys.executable, "train.py", *base_args(out, text_cache, "--seed", "1",
                                                                               "--max-steps", "1")],
                                         cwd=ROOT, capture_output=True, text=True))
            assert listing(out) == before
        real(*args)
    monkeypatch.setattr(train, "ema_update", ema_update)
    train.main(base_args(out, text_cache, "--max-steps", "2"))
    assert second[0].returncode == 1 and second[0].stderr == f"error: {held_message(out, os.getpid())}\n", \
        second[0].stderr
    assert [r["step"] for r in log_rows(out) if "l2" in r] == [1, 2]
    assert load_json(out / "config.json")["train"]["seed"] == 0


def hold(folder):
    """A process holding `folder`'s lock (files.lock_folder) until it is killed."""
    holder = subprocess.Popen([sys.executable, "-c", "import sys; from runtime import files; "
                               "files.lock_folder(sys.argv[1]); print('held', flush=True); sys.stdin.read()",
                               str(folder)], cwd=ROOT,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline() == "held\n"
    return holder


@pytest.mark.parametrize("entry", ["tokenizer", "dit", "sample"])
def test_a_held_folder_is_refused_until_its_holder_is_killed(tmp_path, text_cache, models, entry):  # noqa: F811
    """Stage 1, stage 2 and sample.py refuse an --out another process holds, naming its pid; once that process is
    killed (kill -9: nothing of it runs), the folder is free: the OS released the lock."""
    out = tmp_path / "out"
    argv = {"tokenizer": base_args(out, text_cache, "--max-steps", "1"),
            "dit": ["--stage", "dit", "--tokenizer", str(models / "tok"), *base_args(out, text_cache)[2:],
                    "--max-steps", "1"],
            "sample": ["--dit", str(models / "dit_class"), "--out", str(out), "--num-samples", "2",
                       "--cache-dir", str(text_cache)]}[entry]
    main = sample.main if entry == "sample" else train.main
    holder = hold(out)
    try:
        with pytest.raises(InputError, match=f"^{re.escape(held_message(out, holder.pid))}$"):
            main(argv)
        assert os.listdir(out) == [".lock"]
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    main(argv)
    assert (out / ("samples.png" if entry == "sample" else "latest")).is_file()


# -------------------------------------------------------------------------------------------- sample.py's OUT
def sample_args(models, out, cache, *extra):  # noqa: F811
    return ["--dit", str(models / "dit_class"), "--out", str(out), "--num-samples", "2", "--batch-size", "2",
            "--cache-dir", str(cache), *extra]


def test_sampling_into_a_folder_with_samples_needs_overwrite(tmp_path, text_cache, models):  # noqa: F811
    """A second sample.py into the same --out is refused and changes nothing; --overwrite replaces the samples,
    an .npz of another size included."""
    out = tmp_path / "samples"
    sample.main(sample_args(models, out, text_cache))
    before = listing(out)
    with pytest.raises(InputError, match=rf"^{out}: holds samples \(samples_2x32x32x3.npz\); replace them with "
                                         "--overwrite, or choose another --out$"):
        sample.main(sample_args(models, out, text_cache, "--seed", "1"))
    assert listing(out) == before
    sample.main(sample_args(models, out, text_cache, "--seed", "1", "--num-samples", "3", "--overwrite"))
    assert sorted(os.listdir(out)) == [".lock", "captions.txt", "samples.png", "samples_3x32x32x3.npz"]


def test_sampling_refuses_a_tokenizer_with_other_weights(tmp_path, text_cache, models):  # noqa: F811
    """The DiT records its tokenizer's weights (SHA-1): a tokenizer of the same config but other weights is refused
    in one line, unless --allow-other-tokenizer; the recorded one samples."""
    recorded = file_sha1(models / "tok" / "model.safetensors")
    dit = edited_copy(models / "dit_class", tmp_path / "dit", "config.json", lambda c: c.update(tokenizer_sha1=recorded))
    torch.manual_seed(1)
    TexTok(tiny_config()).save_pretrained(tmp_path / "other")
    argv = lambda name, *extra: ["--dit", str(dit), "--tokenizer", str(tmp_path / name), "--out",
                                 str(tmp_path / f"out-{name}{len(extra)}"), "--num-samples", "2", "--cache-dir",
                                 str(text_cache), *extra]
    with pytest.raises(InputError, match=rf"^{tmp_path / 'other'}: not the tokenizer this DiT was trained over .*"
                                         rf"{dit / 'config.json'} records {recorded}\.\.\.\); pass "
                                         "--allow-other-tokenizer"):
        sample.main(argv("other"))
    assert not (tmp_path / "out-other0").exists()
    assert sample.main(argv("other", "--allow-other-tokenizer")).is_file()
    own = argv("other")
    del own[2:4]  # no --tokenizer: the DiT's own, which its config.json names
    assert sample.main(own).is_file()


# ------------------------------------------------------------------------------ a killed write's temporary files
KILL_AT_LATEST = """
import os, signal, sys, train
real, seen = os.replace, []
def replace(src, dst):
    if os.path.basename(dst) == "latest":
        seen.append(dst)
        if len(seen) == 2:  # the second checkpoint's OUT/latest: written, not yet renamed
            os.kill(os.getpid(), signal.SIGKILL)
    real(src, dst)
os.replace = replace
train.main(sys.argv[1:])
"""


def test_a_temporary_file_left_by_kill_9_is_removed_at_the_next_start(tmp_path, text_cache):
    """kill -9 between writing OUT/latest's temporary file and renaming it leaves `.latest.XXXXXXXX`; --resume removes
    it (and other killed writes' temporaries, in OUT and its exported model), never the lock or other hidden files."""
    out = tmp_path / "run"
    argv = base_args(out, text_cache, "--max-steps", "2", "--ckpt-every", "1")
    killed = subprocess.run([sys.executable, "-c", KILL_AT_LATEST, *argv], cwd=ROOT, capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert [p.name[:8] for p in out.glob(".latest.*")] == [".latest."]
    (out / "tokenizer").mkdir()
    (out / "tokenizer" / ".model.safetensors.k3j4h5g6.safetensors").write_bytes(b"half")
    (out / ".config.json.x1y2z3w4.json").write_text("{")
    (out / ".tmp-step-0000009").mkdir()
    (out / ".notes").write_text("mine")
    train.main(base_args(out, text_cache, "--max-steps", "3", "--ckpt-every", "1", "--resume"))
    assert sorted(p.name for p in out.glob(".*")) == [".lock", ".notes"]
    assert sorted(os.listdir(out / "tokenizer")) == ["README.md", "config.json", "model.safetensors"]
    assert [r["step"] for r in log_rows(out) if "l2" in r] == [1, 2, 3]


# ---------------------------------------------------------------------------------- read-only and full disks
def failing(real, under: Path, error: int, name: str = ""):
    """`real` (os.open or os.mkdir), raising OSError(`error`) for paths under `under` (whose name starts with
    `name`): a read-only folder or a full disk, which root, who runs the tests in CI, would not meet by chmod."""
    def call(path, *args, **kwargs):
        p = Path(os.fsdecode(path))
        if (p == under or under in p.parents) and p.name.startswith(name):
            raise OSError(error, os.strerror(error), str(path))
        return real(path, *args, **kwargs)
    return call


@pytest.mark.parametrize("where", ["out", "cache"])
def test_a_read_only_out_or_cache_dir_is_one_line(tmp_path, monkeypatch, where):
    """An --out or --cache-dir on a read-only file system: one line naming it, and nothing written."""
    folder = tmp_path / where
    folder.mkdir()
    for name in ("open", "mkdir"):
        monkeypatch.setattr(os, name, failing(getattr(os, name), folder, errno.EROFS))
    with pytest.raises(InputError) as err:
        train.main(base_args(tmp_path / "out", tmp_path / "cache", "--max-steps", "1"))
    named = {"out": f"{folder}: cannot write (Read-only file system) (--out must be a writable folder)",
             "cache": f"{folder / 'text'}: cannot write (Read-only file system) (--cache-dir must be a writable "
                      "folder)"}[where]
    assert str(err.value) == named
    assert os.listdir(folder) == []


@pytest.mark.parametrize("at", ["config.json", "log.jsonl"])
def test_a_full_disk_at_the_start_or_at_a_log_row_is_one_line(tmp_path, text_cache, monkeypatch, at):
    """ENOSPC writing OUT/config.json (before step 0), or appending step 3's row to log.jsonl: one line naming the
    file and the last good checkpoint, which stays intact."""
    out, rows = tmp_path / "run", []

    def open_own(path, flags, *args):  # run.py's own: the log's, opened to append
        if Path(path).name == "log.jsonl" and flags & os.O_APPEND and len(rows) == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        rows.append(path) if flags & os.O_APPEND else None
        return files.open_own(path, flags, *args)
    if at == "config.json":
        monkeypatch.setattr(os, "open", failing(os.open, out, errno.ENOSPC, ".config.json."))  # its atomic write
    else:
        monkeypatch.setattr(run, "open_own", open_own)
    with pytest.raises(InputError) as err:
        train.main(base_args(out, text_cache, "--max-steps", "4", "--ckpt-every", "2"))
    assert str(err.value) == {
        "config.json": f"{out}: cannot write (No space left on device); last good checkpoint: none written yet",
        "log.jsonl": f"{out / 'log.jsonl'}: cannot write (No space left on device); last good checkpoint: "
                     f"{out / 'step-0000002'}"}[at]
    assert sorted(os.listdir(out)) == ([".lock"] if at == "config.json" else
                                       [".lock", "config.json", "latest", "log.jsonl", "step-0000002"])
    if at == "log.jsonl":
        assert (out / "latest").read_text() == "step-0000002\n" and len(log_rows(out)) == 2


# ------------------------------------------------------------------------------------- a state.json edited by hand
@pytest.mark.parametrize("edit, problem", [
    (lambda s: s.pop("step"), "KeyError: 'step'"),
    (lambda s: s.update(step="two"), "ValueError: step 'two' is not a step number"),
    (lambda s: s["state"]["model"].update({"tokenizer.L": {"__tensor__": "s.nothing"}}), "KeyError: 's.nothing'"),
    (lambda s: s["state"].pop("opt"), "KeyError: 'opt'"),
])
def test_resume_from_an_edited_state_json_is_one_line(tmp_path, text_cache, edit, problem):
    out = tmp_path / "run"
    train.main(base_args(out, text_cache, "--max-steps", "1"))
    path = out / "step-0000001" / "state.json"
    state = json.loads(path.read_text())
    edit(state)
    path.write_text(json.dumps(state))
    before = listing(out)
    with pytest.raises(InputError) as err:
        train.main(base_args(out, text_cache, "--max-steps", "2", "--resume"))
    assert str(err.value) == f"{path}: not a training state this run can resume from ({problem})"
    assert listing(out) == before
