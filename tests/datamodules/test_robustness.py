"""Bad inputs are rejected with a message that names the file and the fix, and never stop a scan.

Each test writes a tiny synthetic folder into ``tmp_path``: a good case or two beside one kind of damage.
Cases already covered elsewhere (and not repeated here):

* mixed series in one folder: test_scan.py::test_two_series_in_one_folder_are_two_cases_of_one_patient,
  test_dicom.py::test_two_series_in_one_folder_are_grouped_by_uid;
* duplicate / missing slices, uneven spacing: test_dicom.py::test_duplicate_slice, ::test_missing_slice,
  ::test_uneven_spacing, test_scan.py::test_dicom_rejections;
* empty label map, label shape/affine off its image at scan: test_scan.py::test_nifti_label_checks;
* infeasible episodes: test_samplers.py::test_feasibility_message_says_what_to_change,
  test_classification_sampler.py::test_infeasible_requests_name_the_class_and_the_fix.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest
from pydicom.encaps import encapsulate
from pydicom.uid import HTJ2KLossless, JPEGLosslessSV1

import datamodules.indexing.scan as scan_module
from datamodules.indexing.index import Index
from datamodules.indexing.scan import scan_folder, scan_to_file
from datamodules.io.dicom import JPEG_EXTRA, DicomSeriesError, DicomSeriesReader, decoder_problem, read_header
from datamodules.transforms.volume import volume_transforms
from tests.datamodules.dicom_fixtures import (
    affine_ras,
    edit,
    label_for,
    phantom,
    write_nifti,
    write_reoriented_nifti,
    write_series,
)

COPY_AGAIN = "copy it again from the source"


# ------------------------------------------------------------------------------------------ helpers
def good_nifti(path: Path, seed: int = 0, shape=(8, 8, 4)) -> np.ndarray:
    vol = phantom(shape, seed)
    write_nifti(vol, affine_ras(), path)
    return vol


def reason_of(index: Index, rel: str) -> str:
    found = [r.reason for r in index.rejected if r.path == rel]
    assert len(found) == 1, (rel, [(r.path, r.reason) for r in index.rejected])
    return found[0]


def indexed(index: Index) -> list[str]:
    return sorted(c.image if isinstance(c.image, str) else c.image[0].rsplit("/", 1)[0] for c in index.cases)


def load_error(tf, data) -> str:
    """The ValueError message under MONAI's ``RuntimeError("applying transform ...")`` wrapper."""
    with pytest.raises(Exception) as info:
        tf(data)
    err: BaseException | None = info.value
    while err is not None and not isinstance(err, ValueError):
        err = err.__cause__
    assert err is not None, repr(info.value)
    return str(err)


def image_only():
    return volume_transforms(spacing=(2.0, 2.0), slice_size=(8, 8), keys=("image",))


def compress(paths, transfer_syntax) -> None:
    """Give DICOM files a compressed transfer syntax with undecodable (garbage) encapsulated pixel data."""

    def fn(ds):
        ds.PixelData = encapsulate([b"\x00garbage, not a codestream\xff" * 4])
        ds["PixelData"].VR = "OB"
        ds["PixelData"].is_undefined_length = True
        ds.file_meta.TransferSyntaxUID = transfer_syntax

    for p in paths:
        edit(p, fn)


@pytest.fixture
def no_decoder(monkeypatch):
    """Make sure the compressed syntaxes below have no decoder, even where pylibjpeg/gdcm are installed."""
    import pydicom.pixels

    real = pydicom.pixels.get_decoder

    class Missing:
        is_available = False

    def get_decoder(uid):
        return Missing() if uid in (JPEGLosslessSV1, HTJ2KLossless) else real(uid)

    if decoder_problem(JPEGLosslessSV1) is None or decoder_problem(HTJ2KLossless) is None:
        monkeypatch.setattr(pydicom.pixels, "get_decoder", get_decoder)


# ---------------------------------------------------------------------------------- 1. corrupt DICOM
def test_corrupt_and_truncated_dicom_files_are_rejected_with_copy_again(tmp_path):
    root = tmp_path / "data"
    write_series(root / "ok", phantom((8, 8, 4)))
    data = write_series(tmp_path / "other", phantom((8, 8, 4), 1), seed=1)[0].read_bytes()  # another series
    bad = root / "bad"
    bad.mkdir()
    (bad / "empty.dcm").write_bytes(b"")
    (bad / "noise.dcm").write_bytes(bytes(range(256)) * 3)  # named like DICOM, no marker
    (bad / "marker_only.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\xab" * 40)
    (bad / "cut_in_meta.dcm").write_bytes(data[:154])  # pydicom itself fails
    (bad / "cut_in_header.dcm").write_bytes(data[:700])
    rows = data.find(b"\x28\x00\x10\x00US\x02\x00")
    assert rows > 0
    (bad / "garbled_rows.dcm").write_bytes(data[:rows] + b"\x28\x00\x10\x00US\x03\x00\x01\x02\x03" + data[rows + 10 :])
    index = scan_folder(root)
    assert indexed(index) == ["ok"]
    for name in ("empty.dcm", "noise.dcm", "marker_only.dcm", "cut_in_meta.dcm", "cut_in_header.dcm", "garbled_rows.dcm"):
        reason = reason_of(index, f"bad/{name}")
        assert COPY_AGAIN in reason or "copy the file again from the source" in reason, (name, reason)
    assert reason_of(index, "bad/empty.dcm").startswith("empty file (0 bytes)")
    assert "named like DICOM ('.dcm')" in reason_of(index, "bad/noise.dcm")
    assert "corrupt or truncated" in reason_of(index, "bad/cut_in_meta.dcm")
    assert "unreadable Rows value" in reason_of(index, "bad/garbled_rows.dcm")
    # the reader, given a file list, raises with the file's path
    with pytest.raises(ValueError, match=rf"{bad / 'cut_in_meta.dcm'}: corrupt or truncated DICOM file.*{COPY_AGAIN}"):
        DicomSeriesReader().read([str(bad / "cut_in_meta.dcm")])


def test_truncated_nifti_is_rejected_with_copy_again(tmp_path):
    good_nifti(tmp_path / "ok.nii.gz")
    good_nifti(tmp_path / "raw.nii", 1)
    data = (tmp_path / "raw.nii").read_bytes()
    (tmp_path / "raw.nii").write_bytes(data[: len(data) - 100])  # the voxel data is cut short
    zipped = (tmp_path / "ok.nii.gz").read_bytes()
    (tmp_path / "cut.nii.gz").write_bytes(zipped[: len(zipped) // 2])
    (tmp_path / "garbage.nii").write_bytes(b"not a nifti header" * 30)
    index = scan_folder(tmp_path)
    assert indexed(index) == ["ok.nii.gz"]
    assert reason_of(index, "raw.nii").startswith("cannot read the NIfTI data")
    for name in ("raw.nii", "cut.nii.gz", "garbage.nii"):
        assert COPY_AGAIN in reason_of(index, name), name
    assert reason_of(index, "garbage.nii").startswith("cannot read the NIfTI header")


# --------------------------------------------------------------------------------- 2. missing decoder
@pytest.mark.parametrize("syntax", [JPEGLosslessSV1, HTJ2KLossless], ids=["jpeg-lossless", "htj2k"])
def test_compressed_series_without_decoder_names_the_package_and_the_jpeg_extra(tmp_path, no_decoder, syntax):
    root = tmp_path / "data"
    write_series(root / "plain", phantom((8, 8, 4), 1), seed=1)
    paths = write_series(root / "packed", phantom((8, 8, 4), 2), seed=2)
    compress(paths, syntax)
    problem = read_header(paths[0]).problem
    package = "pylibjpeg-libjpeg" if syntax == JPEGLosslessSV1 else "pylibjpeg-openjpeg"
    assert syntax.name in problem and "pip install imaging-meta[jpeg]" in problem and package in problem
    index = scan_folder(root)
    assert indexed(index) == ["plain"]
    reason = reason_of(index, "packed")  # the series folder
    assert reason.startswith("DICOM series #1 (CT, 4 files): every file: compressed transfer syntax")
    assert "pip install imaging-meta[jpeg]" in reason
    with pytest.raises(DicomSeriesError, match=r"packed \(4 files\): every file: .*pip install imaging-meta\[jpeg\]"):
        DicomSeriesReader().read([str(p) for p in paths])


# ---------------------------------------------------------------------------- 5. 4D and multi-frame
def test_multi_frame_dicom_and_4d_nifti_are_rejected_at_scan_with_the_conversion(tmp_path):
    good_nifti(tmp_path / "ok.nii.gz")
    mf = write_series(tmp_path / "mf", phantom((8, 8, 1), 3), seed=3)[0]

    def multi(ds):
        ds.NumberOfFrames = 2
        ds.PixelData = ds.PixelData * 2

    edit(mf, multi)
    vol = phantom((8, 8, 4), 4)
    write_nifti(np.stack([vol, vol + 1], -1), affine_ras(), tmp_path / "time.nii.gz")
    index = scan_folder(tmp_path)
    assert indexed(index) == ["ok.nii.gz"]
    reason = reason_of(index, "mf/IM_0001.dcm")
    # a classic CT Image Storage file with two frames; enhanced CT/MR are read (test_enhanced_dicom.py)
    assert "multi-frame images are not supported yet (NumberOfFrames=2, CT, CT Image Storage)" in reason
    assert "except enhanced CT/MR (Enhanced or Legacy Converted Enhanced CT/MR Image Storage)" in reason
    assert "dcm2niix" in reason
    assert "4D image (shape (8, 8, 4, 2))" in reason_of(index, "time.nii.gz") and "fslsplit" in reason_of(index, "time.nii.gz")
    with pytest.raises(DicomSeriesError, match=rf"{mf}: multi-frame .*dcm2niix"):
        DicomSeriesReader().read([str(mf)])


def test_4d_nifti_loaded_without_a_scan_is_rejected_naming_the_file(tmp_path):
    vol = phantom((8, 8, 4), 5)
    path = write_nifti(np.stack([vol, vol + 1, vol + 2], -1), affine_ras(), tmp_path / "time.nii.gz")
    msg = load_error(image_only(), {"image": str(path), "modality": "CT"})
    assert str(path) in msg and "3 volumes in one file (4D image" in msg and "fslsplit" in msg


# --------------------------------------------------------------------------------- 6. NaN, Inf, constant
@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "-inf"])
def test_nan_or_inf_volume_is_rejected_at_load_and_never_zeroed(tmp_path, value):
    vol = phantom((8, 8, 4), 6).astype(np.float32)
    vol[2, 3, 1] = value
    path = write_nifti(vol, affine_ras(), tmp_path / "bad.nii.gz")
    msg = load_error(image_only(), {"image": str(path), "modality": "MR"})
    assert str(path) in msg and "1 NaN/Inf voxel(s)" in msg and "repair the file at its source or exclude it" in msg


def test_inf_and_constant_volumes_are_rejected_at_scan_with_the_fix(tmp_path):
    good_nifti(tmp_path / "ok.nii.gz")
    vol = phantom((8, 8, 4), 7).astype(np.float32)
    vol[0, 0, 0] = np.inf
    write_nifti(vol, affine_ras(), tmp_path / "inf.nii.gz")
    write_nifti(np.full((8, 8, 4), 7.0, np.float32), affine_ras(), tmp_path / "flat.nii.gz")
    index = scan_folder(tmp_path)
    assert indexed(index) == ["ok.nii.gz"]
    assert "contains NaN/Inf values (1 voxels); fix or mask them" in reason_of(index, "inf.nii.gz")
    reason = reason_of(index, "flat.nii.gz")
    assert "constant image (every voxel is 7)" in reason and "export it again from the source or remove it" in reason


@pytest.mark.parametrize("modality", ["CT", "MR"])
def test_constant_volume_is_rejected_at_load_for_every_modality(tmp_path, modality):
    path = write_nifti(np.full((8, 8, 4), -1000.0, np.float32), affine_ras(), tmp_path / "blank.nii.gz")
    msg = load_error(image_only(), {"image": str(path), "modality": modality})
    assert str(path) in msg and "constant image (every voxel is -1000)" in msg and "exclude it" in msg


def test_constant_dicom_series_passes_the_header_scan_but_not_the_load(tmp_path):
    paths = write_series(tmp_path / "blank", np.full((8, 8, 4), 40.0))
    index = scan_folder(tmp_path)
    assert indexed(index) == ["blank"]  # the scan reads headers only
    c = index.cases[0]
    msg = load_error(image_only(), {"image": index.resolve(c.image), "modality": c.modality})
    assert "constant image (every voxel is 40)" in msg
    assert any(str(p) in msg for p in paths)


# ---------------------------------------------------------------------------------------- 7. labels
def test_all_foreground_label_map_is_rejected_at_scan(tmp_path):
    vol = good_nifti(tmp_path / "ok.nii.gz", 8)
    write_nifti(label_for(vol), affine_ras(), tmp_path / "ok_seg.nii.gz")
    good_nifti(tmp_path / "full.nii.gz", 9)
    write_nifti(np.ones((8, 8, 4), np.uint8), affine_ras(), tmp_path / "full_seg.nii.gz")
    index = scan_folder(tmp_path)
    assert indexed(index) == ["ok.nii.gz"] and index.cases[0].label == "ok_seg.nii.gz"
    reason = reason_of(index, "full.nii.gz")
    assert "label map full_seg.nii.gz has no background: every voxel is labelled (1)" in reason
    assert "Label the background 0, or remove it" in reason
    assert [r.files for r in index.rejected if r.path == "full.nii.gz"] == [["full.nii.gz", "full_seg.nii.gz"]]


def test_label_off_the_image_grid_is_rejected_at_load_naming_both_files(tmp_path):
    vol = phantom((8, 8, 4), 10)
    image = write_nifti(vol, affine_ras(), tmp_path / "img.nii.gz")
    shifted = affine_ras()
    shifted[:3, 3] += [3.0, 4.0, 0.0]
    label = write_nifti(label_for(vol), shifted, tmp_path / "lbl.nii.gz")
    tf = volume_transforms(spacing=(2.0, 2.0), slice_size=(8, 8))
    msg = load_error(tf, {"image": str(image), "label": str(label), "modality": "CT"})
    assert msg.startswith(f"{label}: label map does not match its image {image}")
    assert "affine differs by 5 mm" in msg and "resample the label onto the image grid" in msg
    # the same grid stored with permuted and flipped axes is fine
    flipped = write_reoriented_nifti(label_for(vol), affine_ras(), tmp_path / "flipped.nii.gz", [[1, -1], [0, 1], [2, -1]])
    out = tf({"image": str(image), "label": str(flipped), "modality": "CT"})
    assert out["image"].shape == out["label"].shape


# ------------------------------------------------------------------------------ 8. non-images, links
def test_non_image_files_are_listed_with_what_to_do(tmp_path):
    good_nifti(tmp_path / "ok.nii.gz")
    (tmp_path / "notes.txt").write_text("scanner notes\n")
    (tmp_path / "photo.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 64)
    (tmp_path / "scans.zip").write_bytes(b"PK\x03\x04" + b"\0" * 64)
    (tmp_path / "vol.nrrd").write_bytes(b"NRRD0004\n" + b"\0" * 64)
    (tmp_path / ".gitkeep").write_bytes(b"")
    index = scan_folder(tmp_path)
    assert indexed(index) == ["ok.nii.gz"]
    only = "only NIfTI (.nii, .nii.gz) and DICOM files are indexed"
    assert reason_of(index, "notes.txt").startswith("not an image file we read (text") and only in reason_of(index, "notes.txt")
    assert only in reason_of(index, "photo.png")
    assert "extract it first" in reason_of(index, "scans.zip")
    assert "convert it to NIfTI (.nii.gz)" in reason_of(index, "vol.nrrd")
    assert reason_of(index, ".gitkeep").startswith("empty file (0 bytes)")


def test_symlink_loops_do_not_hang_the_scan(tmp_path, caplog):
    root = tmp_path / "data"
    sub = root / "a" / "b"
    good_nifti(sub / "ok.nii.gz")
    (sub / "up").symlink_to(root / "a", target_is_directory=True)  # a folder link to its own parent
    (sub / "self.nii.gz").symlink_to("self.nii.gz")  # a file link to itself
    (root / "ping").symlink_to("pong")  # two links pointing at each other
    (root / "pong").symlink_to("ping")
    (root / "gone.nii.gz").symlink_to(root / "missing.nii.gz")
    with caplog.at_level(logging.WARNING, logger="datamodules.indexing.scan"):
        index = scan_folder(root)
    assert indexed(index) == ["a/b/ok.nii.gz"]  # indexed once, not again through the link
    assert any("a/b/up: a link to a folder already scanned" in r.getMessage() for r in caplog.records)
    for name in ("a/b/self.nii.gz", "ping", "pong"):
        reason = reason_of(index, name)
        assert reason.startswith("symbolic link loop") and "remove the link" in reason, (name, reason)
    reason = reason_of(index, "gone.nii.gz")
    assert reason.startswith("broken symbolic link") and "remove the link or restore its target" in reason


def test_a_link_to_a_sibling_folder_is_walked_as_the_folder_by_the_scan_and_the_index_key(tmp_path, caplog):
    """The scan and `files_under` (the index key, image folders, classify) walk one way: the scan claimed a folder
    when its parent was listed, `files_under` when it was entered, so ``a/link -> b`` beside ``b`` was ``b/`` to
    one and ``a/link/`` to the other (a review: the two walks were twins that had drifted apart)."""
    from datamodules.io.folders import files_under

    root = tmp_path / "data"
    good_nifti(root / "b" / "ok.nii.gz")
    (root / "a").mkdir()
    (root / "a" / "link").symlink_to(root / "b", target_is_directory=True)
    revisits = []
    assert files_under(root, on_revisit=lambda path, real: revisits.append(path)) == [root / "b" / "ok.nii.gz"]
    assert revisits == [root / "a" / "link"]
    with caplog.at_level(logging.WARNING, logger="datamodules.indexing.scan"):
        index = scan_folder(root)
    assert indexed(index) == ["b/ok.nii.gz"]
    assert any("a/link: a link to a folder already scanned" in r.getMessage() for r in caplog.records)


# -------------------------------------------------------------------------------- 10. mixed folder
def test_scan_indexes_the_good_files_and_lists_every_bad_one(tmp_path, no_decoder, monkeypatch):
    vol = good_nifti(tmp_path / "n1.nii.gz", 11)
    write_nifti(label_for(vol), affine_ras(), tmp_path / "n1_seg.nii.gz")
    good_nifti(tmp_path / "n2.nii.gz", 12)
    write_series(tmp_path / "dcm_ok", phantom((8, 8, 4), 13), seed=13)
    compress(write_series(tmp_path / "dcm_packed", phantom((8, 8, 4), 14), seed=14), JPEGLosslessSV1)
    gap = write_series(tmp_path / "dcm_gap", phantom((8, 8, 6), 15), seed=15)
    gap[2].unlink()
    (tmp_path / "broken.dcm").write_bytes(b"\0" * 128 + b"DICM")
    good_nifti(tmp_path / "full.nii.gz", 16)
    write_nifti(np.ones((8, 8, 4), np.uint8), affine_ras(), tmp_path / "full_seg.nii.gz")
    write_nifti(np.full((8, 8, 4), 3.0), affine_ras(), tmp_path / "flat.nii.gz")
    (tmp_path / "readme.txt").write_text("hello")
    vol = good_nifti(tmp_path / "crash.nii.gz", 17)
    write_nifti(label_for(vol), affine_ras(), tmp_path / "crash_seg.nii.gz")
    real = scan_module.label_values

    def label_values(path, rel, image):  # an unforeseen failure on one input must not stop the scan
        if rel == "crash_seg.nii.gz":
            raise RuntimeError("simulated failure")
        return real(path, rel, image)

    monkeypatch.setattr(scan_module, "label_values", label_values)
    index = scan_folder(tmp_path)
    assert indexed(index) == ["dcm_ok", "n1.nii.gz", "n2.nii.gz"]
    assert index.case(index.cases[1].case_id).label == "n1_seg.nii.gz"
    expected = {
        "dcm_packed": "pip install imaging-meta[jpeg]",
        "dcm_gap": "copy the complete series",
        "broken.dcm": COPY_AGAIN,
        "full.nii.gz": "Label the background 0",
        "flat.nii.gz": "export it again from the source",
        "readme.txt": "only NIfTI",
        "crash.nii.gz": "unexpected error while indexing (RuntimeError: simulated failure)",
    }
    assert sorted(r.path for r in index.rejected) == sorted(expected)
    for path, fix in expected.items():
        assert fix in reason_of(index, path), path
    summary = index.summary()
    assert "3 cases (1 labelled)" in summary and "7 inputs rejected" in summary
    assert "rejected dcm_packed: DICOM series" in summary


# ----------------------------------------------------------------------------- 11. atomic index write
def test_interrupted_index_write_keeps_the_old_index_and_leaves_no_temp_file(tmp_path, monkeypatch):
    data = tmp_path / "data"
    good_nifti(data / "one.nii.gz")
    out_dir = tmp_path / "out"
    first = scan_to_file(data, out_dir / "index.json")
    before = (out_dir / "index.json").read_bytes()
    good_nifti(data / "two.nii.gz", 1)
    real_dump = json.dump

    def dump_then_fail(obj, f, **kw):  # half the JSON reaches the file, then the run is interrupted
        f.write(json.dumps(obj, **kw)[:50])
        f.flush()
        raise KeyboardInterrupt

    monkeypatch.setattr(json, "dump", dump_then_fail)
    with pytest.raises(KeyboardInterrupt):
        scan_to_file(data, out_dir / "index.json")
    assert (out_dir / "index.json").read_bytes() == before  # the old index, whole
    assert os.listdir(out_dir) == ["index.json"]  # no temporary file left behind
    with pytest.raises(KeyboardInterrupt):
        scan_to_file(data, out_dir / "fresh.json")
    assert os.listdir(out_dir) == ["index.json"]  # no half-written new index either
    monkeypatch.setattr(json, "dump", real_dump)
    second = scan_to_file(data, out_dir / "index.json")
    assert len(first.cases) == 1 and len(Index.load(out_dir / "index.json").cases) == len(second.cases) == 2


def test_the_jpeg_extra_named_in_messages_exists():
    pyproject = Path(__file__).resolve().parents[2] / "pyproject.toml"
    assert 'jpeg = ["pylibjpeg' in pyproject.read_text()
    assert JPEG_EXTRA == "`pip install imaging-meta[jpeg]`"


def test_a_series_that_lost_slices_at_an_end_is_told_so_not_to_resample_its_label(tmp_path):
    """A review: a DICOM series missing its last slice was told to 'resample the label onto the image grid', while
    its label map was right and the series incomplete."""
    vol = phantom((8, 8, 5), 10)
    image = write_nifti(vol[..., :4], affine_ras(), tmp_path / "short.nii.gz")
    label = write_nifti(label_for(vol), affine_ras(), tmp_path / "short_seg.nii.gz")
    reason = reason_of(scan_folder(tmp_path), "short.nii.gz")
    assert "the image has 1 slice(s) fewer than its label map along axis 2" in reason
    assert "copy the complete series again" in reason and "resample" not in reason
    tf = volume_transforms(spacing=(2.0, 2.0), slice_size=(8, 8))
    msg = load_error(tf, {"image": str(image), "label": str(label), "modality": "CT"})
    assert "1 slice(s) fewer than its label map" in msg
    # a label shifted by part of a voxel is still told to resample
    shifted = affine_ras()
    shifted[:3, 3] += [0.7, 0.0, 0.0]
    write_nifti(label_for(vol[..., :4]), shifted, tmp_path / "short_seg.nii.gz")
    assert "resample the label onto the image grid" in reason_of(scan_folder(tmp_path), "short.nii.gz")


def test_a_jpeg_that_only_pillow_could_try_names_the_jpeg_extra_not_a_corrupt_file(monkeypatch):
    """Pillow, a core dependency, counts as a JPEG decoder but reads no 12-bit JPEG: a 12-bit JPEG CT was
    reported as corrupt ("copy the file again") when the fix is the project's decoders (a review of the wheel)."""
    import pydicom.pixels
    from pydicom.data import get_testdata_file

    from datamodules.io.dicom_errors import DicomError
    from datamodules.io.dicom_pixels import stored_pixel_array

    path = get_testdata_file("JPGExtended.dcm")  # 12-bit JPEG Extended, shipped inside pydicom
    if path is None:
        pytest.skip("pydicom's test file JPGExtended.dcm is not installed here")

    class Decoder:
        is_available = True
        available_plugins: tuple[str, ...] = ("pillow",)

    def pillow_only(self):
        raise ValueError("Pillow cannot decode 12-bit JPEG")  # what Pillow says, in substance

    monkeypatch.setattr(pydicom.pixels, "get_decoder", lambda uid: Decoder())
    monkeypatch.setattr(pydicom.dataset.Dataset, "pixel_array", property(pillow_only))
    h = read_header(path)
    with pytest.raises(DicomError) as err:
        stored_pixel_array(pydicom.dcmread(path), h)
    message = str(err.value)
    assert path in message and JPEG_EXTRA in message and "JPEG Extended" in message and "12-bit" in message
    Decoder.available_plugins = ("pillow", "pylibjpeg")  # a full decoder failed too: the file is corrupt
    with pytest.raises(DicomError, match="corrupt or the decoder cannot read it; copy the file again"):
        stored_pixel_array(pydicom.dcmread(path), h)


def test_a_label_saved_without_its_images_affine_is_told_to_take_it_not_to_resample(tmp_path):
    """A review: a label map on the image's voxels saved with an identity affine (``Nifti1Image(data, np.eye(4))``)
    was told to "resample the label onto the image grid", which would move the structure hundreds of mm away."""
    from datamodules.indexing.volumes import grid_fix

    image_affine = np.diag([0.8, 0.8, 2.5, 1.0])
    image_affine[:3, 3] = [-200.0, -180.0, -300.0]
    fix = grid_fix((64, 64, 20), image_affine, (64, 64, 20), np.eye(4))
    assert fix.startswith("the shapes are the same: if the label's voxels are the image's") and "image.affine" in fix
    assert grid_fix((64, 64, 20), image_affine, (64, 64, 20, 1), np.eye(4)) == fix  # a trailing singleton too
    assert grid_fix((64, 64, 20), image_affine, (32, 32, 20), np.eye(4)) == (
        "resample the label onto the image grid (nearest neighbour)")
    img = np.zeros((16, 16, 6), np.float32)
    img[4:12, 4:12, 1:5] = 100.0
    lab = (img > 0).astype(np.uint8)
    write_nifti(img, image_affine, tmp_path / "ct.nii.gz")
    write_nifti(lab, np.eye(4), tmp_path / "ct_seg.nii.gz")
    assert "save the same data with the image's affine" in reason_of(scan_folder(tmp_path), "ct.nii.gz")
