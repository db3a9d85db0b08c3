"""files.atomic_write: a failed write leaves the old file and no temporary behind; a new file has the usual
permissions. Checkpoint writes that fail, the log read back on --resume, and a symbolic link in OUT (the lock, the
log, a checkpoint's temporary folder) never written through."""
import errno
import os
import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import SafetensorError

from runtime.checkpoint import save_checkpoint
from runtime.errors import InputError
from runtime.files import atomic_write, lock_folder, open_own
from runtime.images import save_image_grid
from runtime.run import Run


def test_failed_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "out.json"
    path.write_text("old")

    def broken(tmp):
        open(tmp, "w").write("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_write(path, broken)
    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]


def test_written_file_has_umask_permissions(tmp_path):
    umask = os.umask(0o022)
    try:
        path = atomic_write(tmp_path / "sub" / "grid.png", lambda tmp: open(tmp, "wb").write(b"png"))
    finally:
        os.umask(umask)
    assert path.read_bytes() == b"png"
    assert path.stat().st_mode & 0o777 == 0o644


def test_checkpoint_write_failure_leaves_no_temporary_folder(tmp_path, monkeypatch):
    """Disk full (OSError, or safetensors' own error) is one InputError naming the checkpoint; Ctrl-C stays a
    KeyboardInterrupt; neither leaves a .tmp-step-* folder, and `latest` still names the last good checkpoint."""
    from runtime import files
    module = torch.nn.Linear(2, 2)
    save_checkpoint(tmp_path, 1, {"m": module}, {})
    for error in (OSError(errno.ENOSPC, "No space left on device"), SafetensorError("Error while serializing"),
                  KeyboardInterrupt()):
        def fail(tensors, path):
            open(path, "wb").write(b"half")
            raise error
        monkeypatch.setattr(files, "save_file", fail)
        with pytest.raises(type(error) if isinstance(error, KeyboardInterrupt) else InputError) as err:
            save_checkpoint(tmp_path, 2, {"m": module}, {})
        if not isinstance(error, KeyboardInterrupt):
            assert str(err.value).startswith(f"{tmp_path / 'step-0000002'}: cannot write the checkpoint (")
        assert sorted(os.listdir(tmp_path)) == ["latest", "step-0000001"]
        assert (tmp_path / "latest").read_text() == "step-0000001\n"


def test_resumed_log_drops_a_torn_last_line_and_refuses_a_bad_one(tmp_path):
    path = tmp_path / "log.jsonl"
    path.write_text('{"step": 1}\n{"step": 2, "val_psnr": 9.5}\n{"step": 3}\n{"step": 4, "l2": 0.')
    Run.trim_log(SimpleNamespace(out=tmp_path), 2)
    assert path.read_text() == '{"step": 1}\n{"step": 2, "val_psnr": 9.5}\n'
    path.write_text('{"step": 1}\n[1, 2]\n{"step": 3}\n')
    with pytest.raises(InputError, match=re.escape(f"{path}:2: not a JSON log row with a \"step\"")):
        Run.trim_log(SimpleNamespace(out=tmp_path), 2)


# ------------------------------------------------------------- a symbolic link in OUT is never written through
SECRET = b"root:x:0:0:root:/root:/bin/bash\n"


def a_link(out, name, target, content=SECRET):
    """OUT/`name` a symbolic link to `target` (a file holding `content`, or with None a path where nothing is)."""
    out.mkdir(exist_ok=True)
    if content is not None:
        target.write_bytes(content)
    (out / name).symlink_to(target)
    return target


@pytest.mark.parametrize("dangling", [False, True], ids=["to a file", "dangling"])
def test_a_lock_that_is_a_symlink_is_one_line_and_its_target_untouched(tmp_path, dangling):
    """OUT/.lock a link to a user's file (train.py truncated it to the pid) or to nowhere (train.py created a file
    outside OUT): refused in one line, the target as it was."""
    target = a_link(tmp_path / "o", ".lock", tmp_path / "v", None if dangling else SECRET)
    with pytest.raises(InputError, match=re.escape(f"{tmp_path / 'o' / '.lock'}: a symbolic link where this project "
                                                   "keeps its own file")):
        lock_folder(tmp_path / "o")
    assert (not target.exists()) if dangling else target.read_bytes() == SECRET


def test_a_lock_or_log_that_is_a_hard_link_is_one_line_and_the_other_name_untouched(tmp_path):
    """A hard link is no symbolic link (O_NOFOLLOW opens it): OUT/.lock or OUT/log.jsonl another name of a user's
    file is refused before a byte is written (the lock is truncated to the pid, the log appended to); reading one is
    harmless and allowed."""
    (tmp_path / "o").mkdir()
    target = tmp_path / "notes.txt"
    target.write_bytes(SECRET)
    os.link(target, tmp_path / "o" / ".lock")
    with pytest.raises(InputError, match=re.escape(f"{tmp_path / 'o' / '.lock'}: a hard link (the file has 2 names)")):
        lock_folder(tmp_path / "o")
    os.link(target, tmp_path / "o" / "log.jsonl")
    with pytest.raises(InputError, match="log.jsonl: a hard link"):
        open_own(tmp_path / "o" / "log.jsonl", os.O_WRONLY | os.O_APPEND | os.O_CREAT)  # Run.write_log's open
    assert target.read_bytes() == SECRET
    fd = open_own(tmp_path / "o" / "log.jsonl", os.O_RDONLY)
    assert os.read(fd, 100) == SECRET
    os.close(fd)


def run_in(out, **flags) -> Run:
    return Run(out, "tokenizer", "tokenizer", {}, None, 2, **{"resume": False, "overwrite": False, **flags},
               log_every=1, ckpt_every=1, rank=0, world=1, device=torch.device("cpu"))


def test_a_log_that_is_a_dangling_symlink_is_one_line_before_step_0_and_nothing_is_written_outside(tmp_path):
    """OUT/log.jsonl a link to nowhere: the rows went to the file it names. Refused when the run begins (and by the
    appender itself); --overwrite removes the link, never its target."""
    target = a_link(tmp_path / "o", "log.jsonl", tmp_path / "outside.jsonl", None)
    with run_in(tmp_path / "o") as run:
        with pytest.raises(InputError, match=re.escape(f"{tmp_path / 'o' / 'log.jsonl'}: a symbolic link")):
            run.begin({})
        with pytest.raises(InputError, match="a symbolic link"):
            run.write_log({"step": 1})
    assert not target.exists()
    with run_in(tmp_path / "o", overwrite=True) as run:
        run.begin({})
        run.write_log({"step": 1})
    assert not target.exists() and (tmp_path / "o" / "log.jsonl").read_text() == '{"step": 1}\n'


def test_a_checkpoints_temporary_folder_that_is_a_symlink_is_never_written_through(tmp_path):
    """OUT/.tmp-step-XXXXXXX a link to a user's folder: the checkpoint was written there (its config.json replaced);
    the link is removed instead."""
    (tmp_path / "user").mkdir()
    a_link(tmp_path / "o", ".tmp-step-0000001", tmp_path / "user", None)
    (tmp_path / "user" / "config.json").write_bytes(SECRET)
    save_checkpoint(tmp_path / "o", 1, {"m": torch.nn.Linear(2, 2)}, {})
    assert os.listdir(tmp_path / "user") == ["config.json"]
    assert (tmp_path / "user" / "config.json").read_bytes() == SECRET
    assert sorted(os.listdir(tmp_path / "o")) == ["latest", "step-0000001"]


def test_image_grid_enlarges_small_images_with_nearest_neighbour(tmp_path):
    """Two 32 px images, 2 columns: each pixel becomes a 4 x 4 block (128 px tiles) between 2 px white borders;
    128 px images stay at 1x."""
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    grid = np.asarray(Image.open(save_image_grid(images, tmp_path / "small.png", ncol=2)))
    assert grid.shape == (2 + 128 + 2, 2 + 2 * (128 + 2), 3)
    pixels = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    tile = grid[2:130, 132:260]
    assert np.array_equal(tile, pixels[1].repeat(4, 0).repeat(4, 1))
    assert (grid[:2] == 255).all() and (grid[:, 130:132] == 255).all()
    large = np.asarray(Image.open(save_image_grid(torch.zeros(1, 3, 128, 128), tmp_path / "large.png", ncol=1)))
    assert large.shape == (132, 132, 3)
