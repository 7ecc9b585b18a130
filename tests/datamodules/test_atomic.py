"""`atomic_open`: the target is the old file or the whole new one, never a mix, and no temporary file stays."""

import pytest

from datamodules.io.atomic import atomic_open, atomic_write_text


def test_atomic_write_replaces_whole_and_an_error_keeps_the_old_file(tmp_path):
    target = tmp_path / "sub" / "index.json"
    atomic_write_text(target, "old")
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_open(target, "w") as f:
            f.write("new, half")
            raise RuntimeError("disk full")
    assert target.read_text() == "old"
    assert sorted(p.name for p in target.parent.iterdir()) == ["index.json"]
    with atomic_open(target, "wb") as f:
        f.write(b"new")
    assert target.read_bytes() == b"new"
    with pytest.raises(ValueError, match="mode must be 'w' or 'wb'"):
        with atomic_open(target, "a"):
            pass


def test_the_file_gets_the_mode_a_plain_open_would_give(tmp_path):
    import os

    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "report.md", "x")
        (tmp_path / "plain.md").write_text("x")
    finally:
        os.umask(old)
    assert (tmp_path / "report.md").stat().st_mode & 0o777 == (tmp_path / "plain.md").stat().st_mode & 0o777 == 0o644
