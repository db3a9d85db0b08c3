"""common.atomic_write: a failed write leaves the old file and no temporary behind; a new file has the usual
permissions."""
import os

import pytest

from common import atomic_write


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
