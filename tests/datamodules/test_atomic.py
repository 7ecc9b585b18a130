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


def test_a_link_is_written_through_and_a_fifo_is_refused_not_replaced(tmp_path):
    """A review: `--out` given as a link replaced the link with a file of its own (the file it named kept its old
    content), and a FIFO or a device (as root, /dev/full) was replaced by a file."""
    import os

    from imaging_meta.commands.outputs import check_output_file

    shared = tmp_path / "shared" / "preds.csv"
    atomic_write_text(shared, "old")
    link = tmp_path / "links" / "preds.csv"
    link.parent.mkdir()
    link.symlink_to(shared)
    atomic_write_text(link, "new")
    assert link.is_symlink() and shared.read_text() == "new"
    dangling = tmp_path / "links" / "later.csv"
    dangling.symlink_to(tmp_path / "shared" / "later.csv")
    atomic_write_text(dangling, "made")
    assert dangling.is_symlink() and (tmp_path / "shared" / "later.csv").read_text() == "made"
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    with pytest.raises(ValueError, match=r"pipe: not a regular file \(a FIFO"):
        atomic_write_text(fifo, "x")
    with pytest.raises(ValueError, match=r"pipe: not a regular file \(a FIFO.*--out names the file to write"):
        check_output_file(fifo)
    assert check_output_file(link) == link
    assert sorted(p.name for p in tmp_path.iterdir()) == ["links", "pipe", "shared"] and fifo.is_fifo()


def test_a_full_disk_names_the_file_it_was_writing(tmp_path, monkeypatch):
    """A review: a write that filled the disk said "No space left on the device" without naming a file (the
    error of write() and fsync() names none); the command's one line names the file it was to write."""
    import errno
    import os

    from imaging_meta.commands.console import _os_error_message

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    target = tmp_path / "out" / "mask.nii.gz"
    with pytest.raises(OSError) as caught:
        atomic_write_text(target, "x")
    assert caught.value.filename == str(target) and not any(target.parent.iterdir())  # no temporary file left
    assert _os_error_message(caught.value).startswith(f"{target}: no space left on the device")
    monkeypatch.undo()
    # an OSError without an errno (PIL's "cannot write mode RGBA as JPEG") keeps its message (a review of the fix)
    with pytest.raises(OSError, match="^cannot write mode RGBA as JPEG$"):
        with atomic_open(target, "wb"):
            raise OSError("cannot write mode RGBA as JPEG")


def test_a_full_disk_while_writing_the_demo_names_its_folder(tmp_path, monkeypatch):
    import errno
    import os

    from datamodules.synthetic import cohort

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(cohort, "_write_cohort", full)
    with pytest.raises(OSError) as caught:
        cohort.generate_demo_cohort(tmp_path / "demo", seed=0, patients_per_site=1)
    assert caught.value.filename == str((tmp_path / "demo").resolve()) and not list(tmp_path.iterdir())


def test_the_bytes_are_on_disk_before_the_file_takes_its_name(tmp_path, monkeypatch):
    """What a later run trusts is durable: the temporary file is flushed and fsync'd, holding every byte, before
    ``os.replace`` gives it the target's name."""
    import os

    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: events.append(("fsync", os.fstat(fd).st_size)) or real_fsync(fd))
    monkeypatch.setattr(os, "replace", lambda a, b: events.append(("replace", None)) or real_replace(a, b))
    atomic_write_text(tmp_path / "index.json", "x" * 1000)
    assert events == [("fsync", 1000), ("replace", None)]
