"""A cache is read again only for the same inputs and settings. A review (2026-12-07) dropped one input from each
cache's key in turn and found these reads of a stale entry that no test caught; each test here fails on one."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from datamodules.indexing.index import Index
from datamodules.segmentation import SegmentationDataModule
from tests.datamodules.dicom_fixtures import affine_ras, label_for, phantom, write_nifti


def _later(path: Path) -> None:
    """A second later modification time, as an edit a second later gives it."""
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))


@pytest.fixture
def one_scan(tmp_path):
    vol = phantom(seed=1)
    write_nifti(vol, affine_ras(), tmp_path / "data" / "a.nii.gz")
    write_nifti(label_for(vol), affine_ras(), tmp_path / "data" / "a_label.nii.gz")
    return tmp_path


def _disk_module(tmp_path, **kw) -> SegmentationDataModule:
    dm = SegmentationDataModule(root=str(tmp_path / "data"), cache_dir=str(tmp_path / "cache"), cache="disk",
                                spacing=(1.5, 1.5), slice_size=(32, 32), **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dm.prepare_data()
    dm.index = Index.load(dm.index_path)
    dm.cases = dm.index.labelled_cases
    return dm


def test_the_volume_cache_is_keyed_by_the_preprocessing(one_scan):
    """Another CT window over the same cache folder reads the scan again (the old window was served)."""
    wide = _disk_module(one_scan, ct_window=(-1000, 1000))._volume_dataset()[0]["image"]
    narrow = _disk_module(one_scan, ct_window=(-100, 100))._volume_dataset()[0]["image"]
    assert not torch.equal(torch.as_tensor(wide), torch.as_tensor(narrow))


def test_the_superpixel_cache_is_keyed_by_the_superpixel_settings(one_scan):
    def count(**kw):
        dm = _disk_module(one_scan, **kw)
        dm.selfsup_volume_cases = dm.index.cases
        return len(torch.unique(torch.as_tensor(dm._superpixel_dataset()[0]["superpixels"])))

    assert count() != count(superpixels={"scale": 1.0, "min_size": 1, "min_pixels": 1})


def test_a_sidecar_edited_to_the_same_size_is_scanned_again(tmp_path):
    """The index is keyed by each file's modification time too: a sidecar rewritten from MR to CT (same size)."""
    root = tmp_path / "data"
    for p in ("a", "b"):
        vol = phantom(seed=ord(p))
        write_nifti(vol + 1100, affine_ras(), root / f"{p}.nii.gz")
        write_nifti(label_for(vol), affine_ras(), root / f"{p}_label.nii.gz")
    sidecar = root / "a.json"

    def modalities():
        dm = SegmentationDataModule(root=str(root), cache_dir=str(tmp_path / "cache"))
        dm.prepare_data()
        return sorted(c["modality"] for c in json.loads(dm.index_path.read_text())["cases"])

    sidecar.write_text(json.dumps({"Modality": "MR"}))
    assert modalities() == ["MR", "unknown"]
    sidecar.write_text(json.dumps({"Modality": "CT"}))
    _later(sidecar)
    assert modalities() == ["CT", "unknown"]


def test_a_lesion_csv_edited_to_the_same_size_is_read_again(tmp_path):
    from datamodules.sources.lesion_csv import LesionCSV
    from tests.datamodules.test_lesion_csv import BLOB, affines, blob_volume, centre_row, write_rows

    blob_volume(tmp_path / "vol.nii.gz", affines()["ras"])
    write_rows(tmp_path / "l.csv", [centre_row("vol.nii.gz", "a", BLOB, "LPS"),
                                    centre_row("vol.nii.gz", "b", BLOB + 3, "LPS")])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert LesionCSV(csv=str(tmp_path / "l.csv"), patch_size=[9, 9]).load(tmp_path / "cache").classes == ["a", "b"]
        text = (tmp_path / "l.csv").read_bytes()  # bytes: a text round trip would change the line ends and the size
        (tmp_path / "l.csv").write_bytes(text.replace(b",a,", b",c,", 1))
        assert len(text) == (tmp_path / "l.csv").stat().st_size
        _later(tmp_path / "l.csv")
        assert LesionCSV(csv=str(tmp_path / "l.csv"), patch_size=[9, 9]).load(tmp_path / "cache").classes == ["b", "c"]


def test_the_support_superpixel_memo_is_keyed_by_content_not_shape():
    from imaging_meta.adaptation import _in_unit_range, _support_superpixels, volume_superpixels

    a = torch.zeros(32, 32, 3)
    a[4:14, 4:14] = 1.0
    b = torch.zeros(32, 32, 3)
    b[16:30, 10:28] = 0.7
    _support_superpixels([a])
    assert np.array_equal(_support_superpixels([b])[0], volume_superpixels(_in_unit_range(b)))
