"""common.atomic_write: a failed write leaves the old file and no temporary behind; a new file has the usual
permissions. Checkpoint writes that fail, and the log read back on --resume."""
import errno
import os
import re
from types import SimpleNamespace

import pytest
import torch
from safetensors import SafetensorError

from common import InputError, Run, atomic_write, save_checkpoint


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
    import common
    module = torch.nn.Linear(2, 2)
    save_checkpoint(tmp_path, 1, {"m": module}, {})
    for error in (OSError(errno.ENOSPC, "No space left on device"), SafetensorError("Error while serializing"),
                  KeyboardInterrupt()):
        def fail(tensors, path):
            open(path, "wb").write(b"half")
            raise error
        monkeypatch.setattr(common, "save_file", fail)
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
