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


def test_scanning_volumes_and_filling_the_disk_cache_show_bars(monkeypatch, capsys, tmp_path, demo_root, demo_index, caplog):
    """A review on clinical-size folders: reading each NIfTI volume in the scan (a second each) and preprocessing
    each into the disk cache on a first fit (seconds each) printed nothing, minutes to half an hour for hundreds of
    CTs; each now has a bar, and the fill says where the cache is."""
    import logging

    from datamodules.indexing.scan import scan_folder
    from datamodules.segmentation import SegmentationDataModule
    from tests.datamodules.dicom_fixtures import affine_ras, phantom, write_nifti, write_series
    from tests.helpers import SMALL_DATA

    monkeypatch.setenv("IMAGING_META_PROGRESS", "1")
    write_nifti(phantom(), affine_ras(), tmp_path / "folder" / "a.nii.gz")
    write_series(tmp_path / "folder" / "series", phantom(shape=(8, 8, 4)))
    scan_folder(tmp_path / "folder")
    err = capsys.readouterr().err
    assert "scan: NIfTI volumes" in err and "scan: DICOM series" in err
    dm = SegmentationDataModule(root=str(demo_root), index_path=str(demo_index[1]), cache_dir=str(tmp_path / "cache"),
                                **{**SMALL_DATA, "cache": "disk"})
    with caplog.at_level(logging.INFO, logger="datamodules.segmentation"):
        dm.setup("fit")
    assert "volumes (preprocessed once, then cached)" in capsys.readouterr().err
    assert "preprocessed volumes from the cache under" in caplog.text
