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


def test_reading_the_umask_never_changes_it(monkeypatch):
    """Setting the umask to read it is not thread-safe: two threads writing files left the process at 000, and a
    file created by another thread meanwhile got mode 666 (a review). It is read from /proc where Linux has it."""
    import os
    from concurrent.futures import ThreadPoolExecutor

    from datamodules.io import atomic

    real, calls = os.umask, []
    old = real(0o077)
    try:
        monkeypatch.setattr(os, "umask", lambda mask: calls.append(mask) or real(mask))
        with ThreadPoolExecutor(2) as pool:
            masks = list(pool.map(lambda _: atomic._umask(), range(200)))
    finally:
        monkeypatch.undo()
        real(old)
    assert set(masks) == {0o077}
    if os.path.exists("/proc/self/status"):
        assert calls == []


def test_a_requeue_checkpoints_temporary_file_does_not_look_like_one(tmp_path):
    """A review: a save of hpc_ckpt_2.ckpt killed mid-write left ``.hpc_ckpt_2.ckpt.k3z9_a1b.partial``, and
    Lightning's requeue, which joins every digit after ``hpc_ckpt_`` in any name of the folder, then looked for
    hpc_ckpt_2391.ckpt at every later requeue. The temporary name spells it otherwise; errors still name the
    target."""
    from pathlib import Path

    from datamodules.io.atomic import partial_target

    target = tmp_path / "hpc_ckpt_2.ckpt"
    with atomic_open(target, "wb") as f:
        (temporary,) = [p for p in tmp_path.iterdir()]
        assert "hpc_ckpt_" not in temporary.name and temporary.name.startswith(".hpc-ckpt-2.ckpt.")
        assert partial_target(temporary) == target
        f.write(b"x")
    assert [p.name for p in tmp_path.iterdir()] == ["hpc_ckpt_2.ckpt"]
    assert partial_target(Path(".index.json.rw8hfvgo.partial")) == Path("index.json")
