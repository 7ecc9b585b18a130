"""Enhanced multi-frame CT/MR: read as the volume of its frames, like the single-frame series it came from.

Every enhanced file here is written by highdicom's legacy converter (`write_enhanced`) from a synthetic
single-frame series (`write_series`), so each test has the single-frame twin to compare with: the same array,
affine, spacing and site fields. highdicom (the ``[dicom-seg]`` extra, in the dev extra) only writes the test
files and gives an independent reading to compare with; the reader itself uses pydicom alone.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pydicom
import pytest

from datamodules.indexing.index import Index
from datamodules.indexing.scan import scan_folder
from datamodules.io.dicom import DicomSeriesError, DicomSeriesReader, order_series, read_header
from datamodules.transforms.volume import LoadVolumed
from tests.datamodules.dicom_fixtures import (
    drop_frames,
    edit,
    frame_item,
    frames_own,
    header,
    label_for,
    permute_frames,
    phantom,
    repeat_frames,
    truncate,
    write_enhanced,
    write_nifti,
    write_series,
)

hd = pytest.importorskip(
    "highdicom", reason="enhanced test files are written with highdicom's legacy converter (pip install imaging-meta[dicom-seg])"
)

SHAPE = (16, 16, 6)
ENHANCED_CT = "1.2.840.10008.5.1.4.1.1.2.1"
ENHANCED_MR = "1.2.840.10008.5.1.4.1.1.4.1"
SITE_FIELDS = ("Manufacturer", "ManufacturerModelName", "InstitutionName", "MagneticFieldStrength")


def oblique(tilt_deg: float = 20.0, rot_deg: float = 15.0, slice_sign: float = 1.0, spacing=(1.5, 1.25, 3.0)) -> np.ndarray:
    """A voxel -> RAS affine whose slices are tilted ``tilt_deg`` about x and turned ``rot_deg`` about z."""
    t, r = np.deg2rad(tilt_deg), np.deg2rad(rot_deg)
    rx = np.array([[1.0, 0.0, 0.0], [0.0, np.cos(t), -np.sin(t)], [0.0, np.sin(t), np.cos(t)]])
    rz = np.array([[np.cos(r), -np.sin(r), 0.0], [np.sin(r), np.cos(r), 0.0], [0.0, 0.0, 1.0]])
    aff = np.eye(4)
    aff[:3, :3] = rz @ rx @ np.diag([-spacing[0], -spacing[1], slice_sign * spacing[2]])
    aff[:3, 3] = (12.0, -25.0, 40.0)
    return aff


def read(files, min_slices: int = 3) -> tuple[np.ndarray, dict]:
    reader = DicomSeriesReader(min_slices=min_slices)
    return reader.get_data(reader.read([str(f) for f in files]))


def assert_same_volume(got: tuple[np.ndarray, dict], want: tuple[np.ndarray, dict]) -> None:
    (a, ma), (b, mb) = got, want
    assert a.shape == b.shape and a.dtype == b.dtype == np.float32
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-4)
    np.testing.assert_allclose(ma["affine"], mb["affine"], atol=1e-4)
    np.testing.assert_allclose(ma["spacing"], mb["spacing"], atol=1e-5)
    assert ma["modality"] == mb["modality"] and ma["n_slices"] == mb["n_slices"]


def series(tmp_path: Path, modality: str = "CT", affine: np.ndarray | None = None, *, seed: int = 0, **kw) -> list[Path]:
    """A single-frame series in ``tmp_path / 'single'`` (site fields with a field strength); MR values are
    positive (the CT phantom plus 1000)."""
    hdr = header(MagneticFieldStrength=3 if modality == "MR" else 1.5)
    vol = phantom(SHAPE, seed) + (1000.0 if modality == "MR" else 0.0)
    return write_series(tmp_path / "single", vol, oblique() if affine is None else affine,
                        seed=seed, hdr=hdr, modality=modality, **kw)


def in_reader_layout(path: Path, affine: np.ndarray) -> np.ndarray:
    """highdicom's own reading of an enhanced file (``Image.get_volume``: (slice, row, column), LPS) put into
    the reader's layout (column, row, slice along +normal) by matching voxel centres in patient space."""
    volume = hd.imread(str(path)).get_volume()
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])  # LPS <-> RAS
    ras = flip @ volume.affine
    np.testing.assert_allclose(ras[:3, 2], affine[:3, 0], atol=1e-4)  # column index = our axis 0
    np.testing.assert_allclose(ras[:3, 1], affine[:3, 1], atol=1e-4)  # row index = our axis 1
    out = np.full(SHAPE, np.nan)
    to_ours = np.linalg.inv(affine)
    for k in range(volume.array.shape[0]):
        x, y, z = (to_ours @ ras @ np.array([k, 0.0, 0.0, 1.0]))[:3]
        assert abs(x) < 1e-3 and abs(y) < 1e-3 and abs(z - round(z)) < 1e-3
        out[:, :, int(round(z))] = volume.array[k].T
    assert not np.isnan(out).any()
    return out


# ------------------------------------------------------------------------------ the same volume
@pytest.mark.parametrize(
    ("modality", "affine", "rescale"),
    [
        ("CT", oblique(), dict(slope=0.5, intercept=-100.0, signed=True)),
        ("CT", oblique(tilt_deg=0.0, slice_sign=-1.0), dict(slope=1.0, intercept=0.0, signed=True)),
        ("MR", oblique(tilt_deg=-30.0, rot_deg=40.0), dict(slope=2.0, intercept=-1024.0, signed=False)),
        ("MR", oblique(slice_sign=-1.0), dict(slope=1.0, intercept=0.0, signed=False)),
    ],
    ids=["ct-oblique-rescaled", "ct-axial-descending", "mr-oblique", "mr-descending"],
)
def test_enhanced_file_reads_as_its_single_frame_series(tmp_path, modality, affine, rescale):
    paths = series(tmp_path, modality, affine, **rescale)
    single = read(paths)
    enhanced = write_enhanced(paths, tmp_path / "enhanced" / "volume.dcm")
    ds = pydicom.dcmread(enhanced)
    assert ds.SOPClassUID.name == f"Legacy Converted Enhanced {modality} Image Storage" and int(ds.NumberOfFrames) == 6
    got = read([enhanced])
    assert_same_volume(got, single)
    # the geometry the series was written with (axis 2 reversed when it was written against the slice normal)
    along_z = np.eye(4)
    along_z[2, 2], along_z[2, 3] = -1.0, SHAPE[2] - 1
    written = affine @ along_z if affine[2, 2] < 0 else affine  # these affines step against the normal iff z < 0
    np.testing.assert_allclose(got[1]["affine"], written, atol=1e-3)
    assert got[1]["n_files"] == 1 and got[1]["n_slices"] == 6 and single[1]["n_files"] == 6
    np.testing.assert_allclose(got[0], in_reader_layout(enhanced, got[1]["affine"]), atol=1e-4)  # highdicom agrees
    np.testing.assert_allclose(read([tmp_path / "enhanced"])[0], single[0])  # a folder holding the file


def test_a_monochrome1_enhanced_ct_keeps_its_hounsfield_units(tmp_path):
    """As a single-frame series: MONOCHROME1 changes the display, not the HU (test_dicom)."""
    paths = series(tmp_path, "CT", slope=0.5, intercept=-100.0, signed=True)
    enhanced = write_enhanced(paths, tmp_path / "enhanced.dcm")
    expected = read(paths)
    edit(enhanced, lambda ds: setattr(ds, "PhotometricInterpretation", "MONOCHROME1"))
    assert pydicom.dcmread(enhanced).PhotometricInterpretation == "MONOCHROME1"
    assert_same_volume(read([enhanced]), expected)


@pytest.mark.parametrize(("modality", "sop_class"), [("CT", ENHANCED_CT), ("MR", ENHANCED_MR)])
def test_enhanced_ct_and_mr_image_storage_read_the_same_way(tmp_path, modality, sop_class):
    paths = series(tmp_path, modality)
    enhanced = write_enhanced(paths, tmp_path / "enhanced.dcm")

    def relabel(ds):
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = sop_class

    edit(enhanced, relabel)
    assert read_header(enhanced).sop_class == f"Enhanced {modality} Image Storage"
    assert_same_volume(read([enhanced]), read(paths))


def test_per_frame_functional_groups_and_per_frame_rescale_read_the_same(tmp_path):
    paths = series(tmp_path, "CT", slope=0.5, intercept=-100.0, signed=True)
    expected = read(paths)
    enhanced = write_enhanced(paths, tmp_path / "enhanced.dcm")

    def per_frame(ds):  # every group in each frame's own item; every other frame stored at half the slope
        for sequence in ("PlaneOrientationSequence", "PixelMeasuresSequence", "PixelValueTransformationSequence"):
            frames_own(ds, sequence)
        stored = ds.pixel_array.astype(np.int64)
        for k in range(0, stored.shape[0], 2):
            frame_item(ds, k, "PixelValueTransformationSequence").RescaleSlope = "0.25"
            stored[k] *= 2  # the same value: (value + 100) / 0.25 instead of / 0.5
        ds.PixelData = stored.astype(np.int16).tobytes()

    edit(enhanced, per_frame)
    assert "PixelValueTransformationSequence" not in pydicom.dcmread(enhanced).SharedFunctionalGroupsSequence[0]
    assert_same_volume(read([enhanced]), expected)


def test_top_level_rescale_is_used_without_a_pixel_value_transformation(tmp_path):
    paths = series(tmp_path, "MR", slope=2.0, intercept=-1024.0)
    expected = read(paths)
    enhanced = write_enhanced(paths, tmp_path / "enhanced.dcm")

    def top_level(ds):
        del ds.SharedFunctionalGroupsSequence[0].PixelValueTransformationSequence
        ds.RescaleSlope, ds.RescaleIntercept = "2", "-1024"

    edit(enhanced, top_level)
    assert_same_volume(read([enhanced]), expected)


# ------------------------------------------------------------------------------ frame order
def along_normal(ds: pydicom.Dataset) -> list[float]:
    """Each frame's position along the slice normal, in the order of the frames in the file."""
    o = np.asarray(ds.SharedFunctionalGroupsSequence[0].PlaneOrientationSequence[0].ImageOrientationPatient, float)
    normal = np.cross(o[:3], o[3:])
    return [float(np.asarray(i.PlanePositionSequence[0].ImagePositionPatient, float) @ normal)
            for i in ds.PerFrameFunctionalGroupsSequence]


def test_shuffled_frames_load_sorted_along_the_slice_normal(tmp_path):
    paths = series(tmp_path, "MR", oblique(slice_sign=-1.0))
    single = read(paths)
    order = [3, 0, 5, 1, 4, 2]
    # the frames of a converted file, moved afterwards (DimensionIndexValues now out of step too)
    moved = write_enhanced(paths, tmp_path / "moved.dcm")
    edit(moved, lambda ds: permute_frames(ds, order))
    # the converter itself keeping the given order, without a dimension index
    kept = write_enhanced(paths, tmp_path / "kept.dcm", include_dimension_index=False, order=order)
    for f in (moved, kept):
        along = along_normal(pydicom.dcmread(f))
        assert along != sorted(along) and along != sorted(along, reverse=True)
        assert_same_volume(read([f]), single)


def test_a_series_split_over_two_enhanced_files_is_one_volume(tmp_path):
    paths = series(tmp_path, "CT")
    first = write_enhanced(paths[3:], tmp_path / "two" / "b.dcm", instance=2)
    second = write_enhanced(paths[:3], tmp_path / "two" / "a.dcm", instance=1)
    assert_same_volume(read([first, second]), read(paths))
    loaded = DicomSeriesReader().read([str(first), str(second)]).series
    assert loaded.paths == [str(second), str(first)]  # each file once, in geometric order


def test_an_enhanced_file_stored_in_two_folders_is_named_as_a_copy(tmp_path):
    """One enhanced file copied into a second folder: as for a copied single-frame series, the message names both
    copies by their folders and says to keep one. It was read as several volumes in one file (echoes, phases...),
    naming "enh.dcm frame 6 and enh.dcm frame 6" (a review, 2026-12-07)."""
    enhanced = write_enhanced(series(tmp_path, "CT"), tmp_path / "p1" / "ct" / "enh.dcm")
    copy = tmp_path / "backup" / "ct" / "enh.dcm"
    copy.parent.mkdir(parents=True)
    copy.write_bytes(enhanced.read_bytes())
    with pytest.raises(DicomSeriesError) as err:
        DicomSeriesReader().read([str(enhanced), str(copy)])
    reason = str(err.value)
    assert "duplicate slice positions" in reason and "stored in 2 folders" in reason, reason
    assert "backup/ct/enh.dcm frame" in reason and "p1/ct/enh.dcm frame" in reason, reason
    assert "several volumes" not in reason


def test_a_one_frame_enhanced_file_is_a_one_slice_volume(tmp_path):
    paths = series(tmp_path, "MR")
    enhanced = write_enhanced(paths[2:3], tmp_path / "one.dcm")
    assert int(pydicom.dcmread(enhanced).NumberOfFrames) == 1
    (got, meta), (want, want_meta) = read([enhanced], min_slices=1), read(paths[2:3], min_slices=1)
    assert got.shape == want.shape == (16, 16, 1)
    np.testing.assert_allclose(got, want)
    np.testing.assert_allclose(meta["affine"][:, [0, 1, 3]], want_meta["affine"][:, [0, 1, 3]], atol=1e-4)
    # the slice step of one slice: SpacingBetweenSlices, else SliceThickness, as for a single-frame file, here
    # from the PixelMeasuresSequence (where highdicom's converter writes 1.0 for one frame)
    measures = pydicom.dcmread(enhanced).SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
    assert meta["spacing"][2] == pytest.approx(float(measures.SpacingBetweenSlices))


# ------------------------------------------------------------------------------ scan and load
def test_scan_indexes_enhanced_files_with_the_site_of_their_series(tmp_path):
    root = tmp_path / "data"
    cases = {}
    for modality, seed in (("CT", 1), ("MR", 2)):
        paths = series(root / modality.lower(), modality, seed=seed)
        enhanced = write_enhanced(paths, root / f"{modality.lower()}_enh" / "volume.dcm", seed=seed)
        write_nifti(label_for(phantom(SHAPE, seed)), oblique(), root / f"{modality.lower()}_enh_label.nii.gz")
        cases[modality] = paths, enhanced
    ct = pydicom.dcmread(cases["CT"][1])
    assert "MagneticFieldStrength" not in ct  # the converter moved it into the shared functional groups
    index = scan_folder(root, site_fields=SITE_FIELDS)
    assert index.rejected == []
    by_image = {c.image[0]: c for c in index.cases}
    assert len(index.cases) == 4
    for modality, (paths, enhanced) in cases.items():
        single = by_image[os.path.relpath(paths[0], root)]
        enh = by_image[os.path.relpath(enhanced, root)]
        assert enh.image == [os.path.relpath(enhanced, root)] and enh.image_format == "dicom"
        assert enh.modality == single.modality == modality
        assert enh.site == single.site and enh.site_info == single.site_info
        assert set(enh.site_info) == set(SITE_FIELDS) and enh.site_info["InstitutionName"].startswith("inst-")
        assert enh.patient == single.patient  # the same PatientID
        assert enh.shape == single.shape == list(SHAPE)
        np.testing.assert_allclose(enh.spacing, single.spacing, atol=1e-5)
        np.testing.assert_allclose(enh.affine, single.affine, atol=1e-4)
        assert enh.label == f"{modality.lower()}_enh_label.nii.gz" and enh.organs == {"label_1": 1}
        # the index entry loads through the same transform as every volume, to the single-frame array
        load = LoadVolumed(keys=["image"])
        got = load({"image": [str(root / f) for f in enh.image]})["image"]
        want = load({"image": [str(root / f) for f in single.image]})["image"]
        np.testing.assert_allclose(np.asarray(got), np.asarray(want))
        np.testing.assert_allclose(np.asarray(got.affine), np.asarray(want.affine), atol=1e-4)


# ------------------------------------------------------------------------------ rejections
def _other_orientation(ds):
    frames_own(ds, "PlaneOrientationSequence")
    frame_item(ds, 2, "PlaneOrientationSequence").ImageOrientationPatient = [1, 0, 0, 0, 0, -1]


def _other_spacing(ds):
    frames_own(ds, "PixelMeasuresSequence")
    frame_item(ds, 4, "PixelMeasuresSequence").PixelSpacing = [2.0, 2.0]


def _no_position(ds):
    del ds.PerFrameFunctionalGroupsSequence[3].PlanePositionSequence


def _gap(ds):
    drop_frames(ds, [int(np.argsort(along_normal(ds))[2])])  # the third slice along the normal


def _two_stacks(ds):
    for item in ds.PerFrameFunctionalGroupsSequence[3:]:
        item.FrameContentSequence[0].StackID = "2"


def _two_organisations(ds):
    second = pydicom.Dataset()
    second.DimensionOrganizationUID = pydicom.uid.generate_uid(entropy_srcs=["second organisation"])
    ds.DimensionOrganizationSequence.append(second)


def _tiled(ds):
    ds.DimensionOrganizationType = "TILED_FULL"


def _frame_count(ds):
    ds.NumberOfFrames = 5


def _zero_slope(ds):
    ds.SharedFunctionalGroupsSequence[0].PixelValueTransformationSequence[0].RescaleSlope = "0"


REJECTIONS = {
    "orientation": (_other_orientation, r"mixed orientations within the series \(5 frame\(s\) with \[.*\]; 1 frame\(s\) "
                    r"with \[1\.0, 0\.0, 0\.0, 0\.0, 0\.0, -1\.0\]\); the frames form several stacks .*export one stack per series"),
    "spacing": (_other_spacing, r"inconsistent PixelSpacing within the series: 5 frame\(s\) \[1\.25, 1\.5\], 1 frame\(s\) "
                r"\[2\.0, 2\.0\]; export one stack per series"),
    "position": (_no_position, r"1 of 6 frames \(e\.g\. frame 4\): no ImagePositionPatient \(PlanePositionSequence\), in "
                 r"neither the frame's own nor the shared functional groups; .*cannot be placed in a volume; export the "
                 r"series again"),
    "gap": (_gap, r"missing slice\(s\): a gap of 6\.000 mm between volume\.dcm frame 4 and volume\.dcm frame 3 where the "
            r"series' step is 3\.000 mm \(about 1 slice\(s\) missing\); frames are missing: export the complete series"),
    "stacks": (_two_stacks, r"2 stacks in one file \(StackID '1' \(3 frames\), '2' \(3 frames\)\); only one stack is read"),
    "organisations": (_two_organisations, r"2 dimension organisations \(DimensionOrganizationSequence\) in one file"),
    "tiled": (_tiled, r"a tiled image \(DimensionOrganizationType TILED_FULL, CT, Legacy Converted Enhanced CT Image "
              r"Storage\), not a CT/MR volume; move it out of the folder"),
    "two-per-position": (repeat_frames, r"more than one frame per position: 12 frames at 6 distinct position\(s\), e\.g\. "
                         r"volume\.dcm frame \d+ and volume\.dcm frame \d+ both at .* mm along the slice normal; the frames "
                         r"form several volumes \(echoes, phases, time points or diffusion directions\?\)"),
    "frame-count": (_frame_count, r"PerFrameFunctionalGroupsSequence has 6 item\(s\) for NumberOfFrames=5: the file is "
                    r"malformed"),
    "rescale": (_zero_slope, r"every frame \(e\.g\. frame 1\): invalid RescaleSlope/RescaleIntercept \('0', '-1024'; "
                r"PixelValueTransformationSequence\); the stored values cannot be turned into physical values"),
}


def reasons_for(index: Index, rel: str) -> list[str]:
    return [r.reason for r in index.rejected if r.path == rel]


@pytest.mark.parametrize("damage", list(REJECTIONS))
def test_enhanced_file_that_is_not_one_volume_is_rejected_with_one_message_naming_it(tmp_path, damage):
    fn, pattern = REJECTIONS[damage]
    paths = series(tmp_path / "src", "CT")
    enhanced = write_enhanced(paths, tmp_path / "data" / "bad" / "volume.dcm")
    edit(enhanced, fn)
    with pytest.raises(DicomSeriesError) as info:
        DicomSeriesReader().read([str(enhanced)])
    message = str(info.value)
    assert message.startswith(f"{enhanced}: ") and message.count(str(enhanced)) == 1
    assert re.search(pattern, message), message
    index = scan_folder(tmp_path / "data")
    assert index.cases == [] and [r.path for r in index.rejected] == ["bad/volume.dcm"]
    reason = reasons_for(index, "bad/volume.dcm")[0]
    assert re.search(pattern, reason), reason
    assert "Traceback" not in reason and "unexpected error" not in reason


def test_truncated_enhanced_file_counts_the_frames_in_its_message(tmp_path):
    paths = series(tmp_path / "src", "CT")
    enhanced = write_enhanced(paths, tmp_path / "data" / "volume.dcm")
    truncate(enhanced, 100)
    problem = read_header(enhanced).problem
    assert problem.startswith("pixel data is truncated: 2972 bytes, expected 3072 ") and "16*16*1*16/8*6 frames" in problem
    index = scan_folder(tmp_path / "data")
    assert reasons_for(index, "volume.dcm") == [problem]


def test_series_mixing_enhanced_and_single_frame_files_is_rejected(tmp_path):
    paths = series(tmp_path, "CT")
    enhanced = write_enhanced(paths, tmp_path / "single" / "volume.dcm")
    uid = pydicom.dcmread(paths[0]).SeriesInstanceUID
    edit(enhanced, lambda ds: setattr(ds, "SeriesInstanceUID", uid))  # e.g. a converter that kept the series
    with pytest.raises(DicomSeriesError, match=r"the series mixes 1 enhanced multi-frame file\(s\) \(e\.g\. volume\.dcm\) "
                       r"and 6 single-frame file\(s\) \(e\.g\. IM_0001\.dcm\); keep one of the two forms"):
        DicomSeriesReader().read(str(tmp_path / "single"))
    index = scan_folder(tmp_path)
    assert index.cases == [] and [r.path for r in index.rejected] == ["single"]
    assert "(CT, 7 files): the series mixes" in index.rejected[0].reason
    # one file of each form: the single-frame file is not dropped for want of frames
    with pytest.raises(DicomSeriesError, match=r"mixes 1 enhanced multi-frame file\(s\) \(e\.g\. volume\.dcm\) and 1 "):
        order_series([read_header(enhanced), read_header(paths[0])])


def test_other_multi_frame_objects_are_still_rejected_with_the_conversion(tmp_path):
    paths = series(tmp_path, "CT")
    enhanced = write_enhanced(paths, tmp_path / "pet.dcm")

    def relabel(ds):  # an Enhanced PET image is not read frame by frame
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.130"

    edit(enhanced, relabel)
    problem = read_header(enhanced).problem
    assert problem.startswith("multi-frame images are not supported yet (NumberOfFrames=6, CT, Enhanced PET Image Storage) "
                              "except enhanced CT/MR") and "dcm2niix" in problem
