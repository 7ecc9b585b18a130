"""DICOM images that are no slice of a volume by their header: Siemens mosaics, projection images (a MIP), too few
slices, files without pixel data. The series reader (`segment`, `fit`), `scan` and the 2D reader (`classify`)
refuse them alike, with one message naming the file, what is wrong and the fix."""

from __future__ import annotations

import inspect
from pathlib import Path

import pydicom
import pytest

from datamodules.indexing.scan import scan_folder
from datamodules.io.dicom import DicomSeriesError, DicomSeriesReader, read_header
from datamodules.sources.image_folder import load_image
from tests.datamodules.dicom_fixtures import affine_ras, edit, phantom, write_series

MOSAIC = ["ORIGINAL", "PRIMARY", "M", "ND", "MOSAIC"]
MIP = ["DERIVED", "SECONDARY", "PROJECTION IMAGE", "CSA MIP", "", "CSAPARALLEL", "M", "ND", "NORM"]
RT_STRUCT = "1.2.840.10008.5.1.4.1.1.481.3"


def mr_series(folder: Path, n_slices: int = 3, seed: int = 0) -> list[Path]:
    """A small MR series of ``n_slices`` single-frame files."""
    return write_series(folder, phantom((12, 10, n_slices), seed), affine_ras(), seed=seed, modality="MR")


def set_image_type(paths: list[Path], values: list[str]) -> None:
    for p in paths:
        edit(p, lambda ds: setattr(ds, "ImageType", values))


def add_mosaic_count(path: Path, count: int, vr: str = "US") -> None:
    """Add the Siemens private block with NumberOfImagesInMosaic (0019,xx0A), as US or as raw UN bytes."""

    def add(ds: pydicom.Dataset) -> None:
        block = ds.private_block(0x0019, "SIEMENS MR HEADER", create=True)
        block.add_new(0x0A, vr, count if vr == "US" else count.to_bytes(2, "little"))

    edit(path, add)


def strip_pixels(path: Path, **attributes: str) -> None:
    def strip(ds: pydicom.Dataset) -> None:
        del ds.PixelData
        for k, v in attributes.items():
            setattr(ds, k, v)

    edit(path, strip)


# ------------------------------------------------------------------------------ Siemens mosaics
def test_a_mosaic_series_is_refused_by_the_series_reader_with_the_dcm2niix_fix(tmp_path):
    folder = tmp_path / "fmri"
    paths = mr_series(folder, 3)
    set_image_type(paths, MOSAIC)
    with pytest.raises(DicomSeriesError, match=r"fmri \(3 files\): every file: a Siemens mosaic .*`dcm2niix -z y "
                       r"<folder>` and use the \.nii\.gz"):
        DicomSeriesReader().read(str(folder))
    with pytest.raises(DicomSeriesError, match=r"IM_0001\.dcm: a Siemens mosaic \(ImageType MOSAIC"):
        DicomSeriesReader(min_slices=1).read([str(paths[0])])  # the one-file form names the file


def test_scan_rejects_an_fmri_mosaic_series_as_a_mosaic_not_as_duplicate_slices(tmp_path):
    """Each file of an fMRI run is one time point at the same position: the advice must be the mosaic's."""
    root = tmp_path / "data"
    paths = mr_series(root / "bold", 3)
    position = pydicom.dcmread(paths[0]).ImagePositionPatient

    def time_point(ds: pydicom.Dataset) -> None:
        ds.ImageType = MOSAIC
        ds.ImagePositionPatient = position

    for p in paths:
        edit(p, time_point)
    index = scan_folder(root)
    assert index.cases == []
    (rejection,) = index.rejected
    assert "Siemens mosaic" in rejection.reason and "dcm2niix -z y" in rejection.reason
    assert "duplicate" not in rejection.reason
    assert sorted(rejection.files) == sorted(f"bold/{p.name}" for p in paths)


@pytest.mark.parametrize("vr", ["US", "UN"])
def test_the_siemens_private_tag_alone_marks_a_mosaic_and_gives_its_count(tmp_path, vr):
    (path,) = mr_series(tmp_path / "s", 1)
    add_mosaic_count(path, 48, vr)
    h = read_header(path)
    assert h.problem is not None and h.problem.startswith("a Siemens mosaic of 48 images per file (NumberOfImagesInMosaic 48")
    assert h.mosaic_images == 48 and "MOSAIC" not in h.image_type
    if vr == "UN":  # pydicom gives a known private element its VR when it reads a file; in memory it stays bytes
        from datamodules.io.dicom_header import siemens_mosaic_images

        ds = pydicom.Dataset()
        ds.private_block(0x0019, "SIEMENS MR HEADER", create=True).add_new(0x0A, "UN", b"\x30\x00")
        assert siemens_mosaic_images(ds) == 48


def test_the_2d_reader_refuses_a_mosaic_naming_the_file(tmp_path):
    (path,) = mr_series(tmp_path / "s", 1)
    set_image_type([path], MOSAIC)
    add_mosaic_count(path, 48)
    with pytest.raises(ValueError, match=r"IM_0001\.dcm: a Siemens mosaic of 48 images per file .*dcm2niix -z y") as e:
        load_image(path)
    assert "class or query folder" not in str(e.value)


def test_an_ordinary_siemens_image_is_no_mosaic(tmp_path):
    paths = mr_series(tmp_path / "s", 3)
    add_mosaic_count(paths[0], 1)  # not a mosaic: one image
    set_image_type(paths, ["ORIGINAL", "PRIMARY", "M", "ND", "NORM"])
    assert DicomSeriesReader().read(str(tmp_path / "s")).series.shape == (12, 10, 3)
    assert load_image(paths[0]).shape == (1, 32, 32)


def test_another_creators_private_element_is_no_mosaic_count(tmp_path):
    """(0019,xx0A) is NumberOfImagesInMosaic only in the "SIEMENS MR HEADER" block: the same element of another
    private creator (a CT block here) above 1 does not make a file a mosaic."""
    paths = mr_series(tmp_path / "s", 3)

    def add(ds: pydicom.Dataset) -> None:
        ds.private_block(0x0019, "SIEMENS CT VA0  COAD", create=True).add_new(0x0A, "US", 48)

    for p in paths:
        edit(p, add)
    assert DicomSeriesReader().read(str(tmp_path / "s")).series.shape == (12, 10, 3)
    assert load_image(paths[0]).shape == (1, 32, 32)


@pytest.mark.parametrize("image_type", [["DERIVED", "SECONDARY", "MPR"], ["DERIVED", "SECONDARY", "REFORMATTED"],
                                        ["DERIVED", "SECONDARY", "MIP"], ["ORIGINAL", "PRIMARY", "AXIAL"]])
def test_reformatted_series_are_volumes(tmp_path, image_type):
    """Only PROJECTION IMAGE (and MOSAIC) in ImageType are refused: multiplanar reformats are volumes."""
    paths = mr_series(tmp_path / "s", 3)
    set_image_type(paths, image_type)
    assert DicomSeriesReader().read(str(tmp_path / "s")).series.shape == (12, 10, 3)
    assert not scan_folder(tmp_path).rejected


# ------------------------------------------------------------------------------ projections, too few slices
def test_a_projection_image_is_no_volume_but_is_a_2d_picture(tmp_path):
    (path,) = mr_series(tmp_path / "mip", 1)
    set_image_type([path], MIP)
    for reader in (DicomSeriesReader(), DicomSeriesReader(min_slices=1)):
        with pytest.raises(DicomSeriesError, match=r"IM_0001\.dcm: a projection image \(ImageType DERIVED\\SECONDARY"
                           r"\\PROJECTION IMAGE\\CSA MIP.*use the original series it was computed from"):
            reader.read(str(tmp_path / "mip"))
    (rejection,) = scan_folder(tmp_path).rejected
    assert rejection.path == "mip/IM_0001.dcm" and rejection.reason.startswith("a projection image")
    assert load_image(path).shape == (1, 32, 32)  # classify reads it as the 2D picture it is


@pytest.mark.parametrize("n_slices", [1, 2])
def test_segment_and_fit_refuse_the_short_series_that_scan_refuses(tmp_path, n_slices):
    from datamodules.transforms.volume import LoadVolumed

    folder = tmp_path / "short"
    mr_series(folder, n_slices)
    reason = rf"only {n_slices} slice\(s\) \(MR, MR Image Storage\); a volume needs at least 3"
    with pytest.raises(DicomSeriesError, match=reason):
        DicomSeriesReader().read(str(folder))
    with pytest.raises(ValueError) as e:  # the loader of `segment` and `fit`
        LoadVolumed(["image"])({"image": str(folder)})
    chain = [e.value, e.value.__cause__, getattr(e.value.__cause__, "__cause__", None)]
    assert any(isinstance(x, DicomSeriesError) and "a volume needs at least 3" in str(x) for x in chain)
    (rejection,) = scan_folder(tmp_path).rejected
    assert f"only {n_slices} slice(s)" in rejection.reason
    from datamodules.io.dicom import MIN_SLICES  # one minimum for the scan and the reader

    assert DicomSeriesReader().min_slices == MIN_SLICES == inspect.signature(scan_folder).parameters["min_slices"].default


# ------------------------------------------------------------------------------ no image series in a folder
def test_a_folder_without_an_image_series_names_why_its_files_are_skipped(tmp_path):
    folder = tmp_path / "truncated"
    (path,) = mr_series(folder, 1)
    strip_pixels(path)
    with pytest.raises(DicomSeriesError, match=r"truncated: no DICOM image series in this folder \(its only file is "
                       r"not an image slice\): IM_0001\.dcm: no pixel data although it is an image .*copy it again "
                       r"from the source$"):
        DicomSeriesReader().read(str(folder))


def test_several_skipped_files_are_named_by_reason(tmp_path):
    folder = tmp_path / "export"
    paths = mr_series(folder, 3)
    for p in paths[:2]:
        strip_pixels(p)
    strip_pixels(paths[2], Modality="RTSTRUCT", SOPClassUID=RT_STRUCT)
    (folder / "notes.txt").write_text("from the PACS")
    with pytest.raises(DicomSeriesError) as e:
        DicomSeriesReader().read(str(folder))
    message = str(e.value)
    assert "no DICOM image series in this folder (none of its 4 files is an image slice): " in message
    assert "IM_0001.dcm (and 1 other file(s) alike): no pixel data although it is an image" in message
    assert "IM_0003.dcm: an RT structure set (contours), not an image" in message
    assert "notes.txt: not DICOM" in message


# ------------------------------------------------------------------------------ the 2D reader's messages
def test_the_2d_reader_names_a_missing_pixel_data_without_a_non_sequitur(tmp_path):
    (path,) = mr_series(tmp_path / "s", 1)
    strip_pixels(path)
    with pytest.raises(ValueError) as e:
        load_image(path)
    message = str(e.value)
    assert message.startswith(f"{path}: no pixel data although it is an image")
    assert message.endswith("copy it again from the source")
    assert "class or query folder" not in message


def test_the_2d_reader_says_an_object_that_is_no_image_belongs_elsewhere(tmp_path):
    (path,) = mr_series(tmp_path / "s", 1)
    strip_pixels(path, Modality="RTSTRUCT", SOPClassUID=RT_STRUCT)
    with pytest.raises(ValueError, match=r"IM_0001\.dcm: an RT structure set \(contours\), not an image \(RTSTRUCT, "
                       r"RT Structure Set Storage\); a class or query folder holds only 2D images: move it out$"):
        load_image(path)
