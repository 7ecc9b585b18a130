"""`segment` with several queries: one that cannot be read is named, and the others are still segmented; a DICOM
series written without the 128-byte preamble and 'DICM' marker (read by the scanner and the volume reader) gets
its DICOM Segmentation too. The learner's ``predict`` is a threshold of the query slice (`test_segment_outputs`)."""

from __future__ import annotations

import logging
from pathlib import Path

import pydicom
import pytest

from datamodules.messages import LISTED
from imaging_meta.commands.segment import segment
from imaging_meta.volume.segmenter import LEARNER_ONLY
from tests.imaging_meta.test_segment_outputs import (
    PLAIN,
    make_checkpoint,
    ras_grid,
    stand_in,
    support,  # noqa: F401  (a fixture)
    threshold_predict,
    tricky_series,
)


def without_preamble(files: list[Path]) -> None:
    """Rewrite each file as a bare data set: no preamble, no 'DICM' marker, no file meta (implicit VR, as old
    archives hold them)."""
    for f in files:
        ds = pydicom.dcmread(f)
        ds.preamble = None
        del ds.file_meta
        pydicom.dcmwrite(f, ds, enforce_file_format=False, implicit_vr=True, little_endian=True)
        assert f.read_bytes()[128:132] != b"DICM"


def test_a_series_without_preamble_gets_its_dicom_segmentation(tmp_path, support, monkeypatch):  # noqa: F811
    pytest.importorskip("highdicom")
    vol, aff, files = tricky_series(tmp_path / "BARE")
    without_preamble(files)
    spacing, size = ras_grid(vol, aff)
    ckpt = make_checkpoint(tmp_path / "m.ckpt", spacing, size)
    stand_in(monkeypatch, threshold_predict)
    written = segment(ckpt, [support], [tmp_path / "BARE"], tmp_path / "out", output_format="dicom-seg",
                      largest_component=False, device="cpu", options=LEARNER_ONLY, **PLAIN)
    raw = pydicom.dcmread(written[0])
    referenced = {str(item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID)
                  for item in raw.PerFrameFunctionalGroupsSequence}
    assert referenced == {str(pydicom.dcmread(f, force=True).SOPInstanceUID) for f in files}


def test_a_query_that_cannot_be_read_is_named_and_the_others_are_segmented(tmp_path, support, monkeypatch, caplog):  # noqa: F811
    vol, aff, _ = tricky_series(tmp_path / "GOOD")
    _, _, files = tricky_series(tmp_path / "GAP", seed=4)
    middle = sorted(files, key=lambda f: float(pydicom.dcmread(f).ImagePositionPatient[2]))[len(files) // 2]
    middle.unlink()  # a missing slice
    spacing, size = ras_grid(vol, aff)
    ckpt = make_checkpoint(tmp_path / "m.ckpt", spacing, size)
    stand_in(monkeypatch, threshold_predict)
    run = dict(largest_component=False, device="cpu", options=LEARNER_ONLY, **PLAIN)
    with pytest.raises(ValueError, match=r"^1 of 2 queries were not segmented, their volume cannot be used \(1 mask\(s\) "
                                         r"written to .*out\): .*GAP.*missing slice"):
        segment(ckpt, [support], [tmp_path / "GAP", tmp_path / "GOOD"], tmp_path / "out", **run)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["GOOD.nii.gz"]
    with pytest.raises(ValueError, match=r"^\S*GAP \(\d+ files\): missing slice"):  # one query: its own error
        segment(ckpt, [support], [tmp_path / "GAP"], tmp_path / "out2", **run)
    # more than the error lists: the others are each named in a warning
    for k in range(LISTED + 1):
        (tmp_path / f"GAP{k}").symlink_to(tmp_path / "GAP")
    with caplog.at_level(logging.WARNING, logger="imaging_meta"), pytest.raises(
            ValueError, match=rf"^{LISTED + 1} of {LISTED + 2} queries .*; and 1 more, each named"):
        segment(ckpt, [support], [tmp_path / f"GAP{k}" for k in range(LISTED + 1)] + [tmp_path / "GOOD"],
                tmp_path / "out3", **run)
    warned = [r.getMessage() for r in caplog.records if r.getMessage().startswith("not segmented: ")]
    assert len(warned) == 1 and f"GAP{LISTED} (" in warned[0] and "missing slice" in warned[0], warned


def test_an_error_that_is_not_bad_input_still_stops_the_run(tmp_path, support, monkeypatch):  # noqa: F811
    """Only bad input (an error that names the file) is set aside; a bug still ends the command as a bug."""
    from imaging_meta.commands import segment as command

    vol, aff, _ = tricky_series(tmp_path / "GOOD")
    spacing, size = ras_grid(vol, aff)
    ckpt = make_checkpoint(tmp_path / "m.ckpt", spacing, size)
    stand_in(monkeypatch, threshold_predict)

    real = command.volume_transforms

    def transforms(*args, keys=("image", "label")):
        if keys != ("image",):
            return real(*args, keys=keys)

        def broken(data):  # the query's loading, not the support's
            raise KeyError("a bug")
        return broken

    monkeypatch.setattr(command, "volume_transforms", transforms)
    with pytest.raises(KeyError, match="a bug"):
        segment(ckpt, [support], [tmp_path / "GOOD"], tmp_path / "out", largest_component=False, device="cpu",
                options=LEARNER_ONLY, **PLAIN)
