"""`datamodules.progress`: bars on a terminal or when asked, the bare iterable otherwise."""

from __future__ import annotations

from datamodules.progress import enabled, progress


def test_progress_is_off_in_logs_and_on_when_asked(monkeypatch, capsys):
    monkeypatch.setenv("IMAGING_META_PROGRESS", "0")
    items = [1, 2, 3]
    assert progress(items, "x") is items and not enabled()
    monkeypatch.delenv("IMAGING_META_PROGRESS")
    assert not enabled()  # pytest's stderr is not a terminal
    monkeypatch.setenv("IMAGING_META_PROGRESS", "1")
    assert list(progress(items, "scan: files", unit="file")) == items
    err = capsys.readouterr().err
    assert "scan: files" in err and "/3 " in err  # the bar counts to the total, then clears itself
