"""DICOM series: header reading, grouping, geometric ordering, rejection reasons, and the MONAI reader."""

from __future__ import annotations

import shutil
import warnings

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
from monai.data import NibabelReader
from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged, Orientationd, Spacingd
from pydicom.encaps import encapsulate
from pydicom.uid import JPEGLSLossless

from datamodules.indexing.scan import scan_folder
from datamodules.io import dicom_files
from datamodules.io.dicom import (
    DicomError,
    DicomSeriesError,
    DicomSeriesReader,
    NotDicomError,
    decoder_problem,
    group_series,
    order_series,
    read_header,
)
from tests.datamodules.dicom_fixtures import (
    FAKE_PHI,
    affine_ras,
    edit,
    phantom,
    place,
    truncate,
    write_nifti,
    write_series,
)


def headers_of(paths):
    return [read_header(p) for p in paths]


def positions_along_normal(series):
    o = np.asarray(series.headers[0].orientation)
    normal = np.cross(o[:3], o[3:])
    return [float(np.asarray(h.position) @ normal) for h in series.headers]


# --------------------------------------------------------------------------------------- ordering
@pytest.mark.parametrize("reverse", [False, True])
def test_order_is_geometric_not_names_or_instance_numbers(tmp_path, reverse):
    vol, aff = phantom(), affine_ras(rot_deg=15.0)
    paths = write_series(tmp_path / "s", vol, aff, reverse=reverse, shuffle_names=True)
    hs = headers_of(sorted(paths, key=lambda p: p.name))  # alphabetical: no relation to position
    series = order_series(hs)
    assert [h.path for h in series.headers] == [str(p) for p in paths]  # axis-2 order of the volume
    assert np.all(np.diff(positions_along_normal(series)) > 0)
    assert series.shape == vol.shape
    np.testing.assert_allclose(series.spacing, (1.5, 1.25, 3.0), atol=1e-4)
    np.testing.assert_allclose(series.affine, aff, atol=1e-3)


def test_slice_axis_against_the_normal_gives_the_flipped_affine(tmp_path):
    vol, aff = phantom(), affine_ras(slice_sign=-1.0)
    paths = write_series(tmp_path / "s", vol, aff, shuffle_names=True)
    series = order_series(headers_of(paths))
    assert [h.path for h in series.headers] == [str(p) for p in reversed(paths)]
    expected = aff.copy()
    expected[:3, 2] *= -1
    expected[:3, 3] = aff[:3, 3] + (vol.shape[2] - 1) * aff[:3, 2]
    np.testing.assert_allclose(series.affine, expected, atol=1e-3)


def test_reader_array_has_rescale_applied(tmp_path):
    vol = phantom()
    paths = write_series(tmp_path / "s", vol, slope=0.5, intercept=0.0, signed=True, reverse=True, shuffle_names=True)
    reader = DicomSeriesReader()
    arr, meta = reader.get_data(reader.read([str(p) for p in reversed(paths)]))
    assert arr.dtype == np.float32 and arr.shape == vol.shape
    np.testing.assert_allclose(arr, np.rint(vol / 0.5) * 0.5)
    assert meta["space"] == "RAS" and tuple(meta["spatial_shape"]) == vol.shape
    assert meta["modality"] == "CT"
    np.testing.assert_allclose(meta["affine"], affine_ras(), atol=1e-3)


# ------------------------------------------------------------------------------------- rejections
def series_error(paths, **kw) -> str:
    with pytest.raises(DicomSeriesError) as e:
        order_series(headers_of(paths), **kw)
    return e.value.reason


def test_missing_slice(tmp_path):
    paths = write_series(tmp_path / "s", phantom(shape=(8, 8, 7)))
    paths[3].unlink()
    reason = series_error([p for p in paths if p.exists()])
    assert "missing slice" in reason and "6.000 mm" in reason and "series' step is 3.000 mm" in reason


@pytest.mark.parametrize(("depth", "lost"), [(7, (2, 4)), (4, (1,))])
def test_a_short_series_that_lost_several_slices_is_missing_slices_not_uneven(tmp_path, depth, lost):
    """7 slices at 3 mm that lost two (steps 3, 6, 6, 3: median 4.5), or 4 that lost one (steps 3, 6): the median
    step hid the gaps, and the series was called unevenly spaced, with the advice to resample across the missing
    data (a review, 2026-12-07). The gap is named, with the files on either side."""
    paths = write_series(tmp_path / "s", phantom(shape=(8, 8, depth)))
    for i in lost:
        paths[i].unlink()
    reason = series_error([p for p in paths if p.exists()])
    assert "missing slice" in reason and "6.000 mm" in reason and "step is 3.000 mm" in reason, reason
    assert f"between {paths[lost[0] - 1].name} and {paths[lost[0] + 1].name}" in reason, reason
    assert "uneven" not in reason


def test_uneven_steps_that_are_whole_multiples_say_slices_may_be_missing(tmp_path):
    """9 slices at 3 mm that lost three (steps 3, 6, 6, 6, 3): the 6 mm steps are the most common, so the series'
    step cannot be told from the steps alone (an extra slice half-way would look alike); the message says that
    slices may be missing rather than only to resample across them (a review, 2026-12-07)."""
    paths = write_series(tmp_path / "s", phantom(shape=(8, 8, 9)))
    for i in (2, 4, 6):
        paths[i].unlink()
    reason = series_error([p for p in paths if p.exists()])
    assert "uneven slice spacing" in reason and "every step is a whole multiple of 3.000 mm, so slices may be " \
        "missing (copy the complete series)" in reason, reason


def test_uneven_spacing(tmp_path):
    paths = write_series(tmp_path / "s", phantom(shape=(8, 8, 6)))
    edit(paths[2], lambda ds: setattr(ds, "ImagePositionPatient", [*ds.ImagePositionPatient[:2], float(ds.ImagePositionPatient[2]) + 0.9]))
    reason = series_error(paths)
    assert "uneven slice spacing" in reason and "2.100" in reason and "3.900" in reason


def test_steps_within_the_spread_that_add_up_to_a_drift_are_refused(tmp_path):
    """31 steps of 3.0 mm then 32 of 3.26 mm: each within the spread tolerance, but the volume is placed on the grid of
    the mean step, which puts slice 31 about a slice from its true place (a review measured 5.5 mm on a mask);
    steps that alternate around the mean stay within a quarter slice and are accepted."""
    n = 64
    paths = write_series(tmp_path / "s", phantom(shape=(8, 8, n)))
    place(paths, [3.0] * 31 + [3.26] * (n - 32))
    reason = series_error(paths)
    assert "uneven slice spacing" in reason and "from the regular grid of the series' mean step" in reason
    alternating = write_series(tmp_path / "a", phantom(shape=(8, 8, 12)))
    place(alternating, [3.0, 3.2] * 5 + [3.0])
    order_series(headers_of(alternating))  # accepted


def test_duplicate_slice(tmp_path):
    paths = write_series(tmp_path / "s", phantom(shape=(8, 8, 5)))
    copy = tmp_path / "s" / "copy_of_slice.dcm"
    shutil.copy(paths[1], copy)
    reason = series_error([*paths, copy])
    assert "duplicate slice positions" in reason and "same SOPInstanceUID" in reason


def test_a_series_copied_into_a_second_folder_names_both_folders(tmp_path):
    """Two copies of one series (same file names, same UIDs) in two folders: the message tells the copies apart
    by their folders and says to keep one, instead of naming one file name twice."""
    paths = write_series(tmp_path / "p1" / "ct", phantom(shape=(8, 8, 5)))
    shutil.copytree(tmp_path / "p1" / "ct", tmp_path / "copy")
    copies = sorted((tmp_path / "copy").iterdir())
    reason = series_error([*paths, *copies])
    name = paths[0].name
    assert f"p1/ct/{name} and copy/{name}" in reason or f"copy/{name} and p1/ct/{name}" in reason
    assert "stored in 2 folders" in reason and f"keep one of {tmp_path / 'copy'}, {tmp_path / 'p1' / 'ct'}" in reason


def test_mixed_orientation(tmp_path):
    paths = write_series(tmp_path / "s", phantom(shape=(8, 8, 5)))
    edit(paths[0], lambda ds: setattr(ds, "ImageOrientationPatient", [1, 0, 0, 0, 0, -1]))
    reason = series_error(paths)
    assert "mixed orientations" in reason and "4 file(s)" in reason and "1 file(s)" in reason


def test_inconsistent_pixel_spacing(tmp_path):
    paths = write_series(tmp_path / "s", phantom(shape=(8, 8, 4)))
    edit(paths[1], lambda ds: setattr(ds, "PixelSpacing", [2.0, 2.0]))
    assert "inconsistent PixelSpacing" in series_error(paths)


def test_too_few_slices(tmp_path):
    paths = write_series(tmp_path / "s", phantom(shape=(8, 8, 2)))
    assert "only 2 slice(s)" in series_error(paths) and "at least 3" in series_error(paths)
    assert order_series(headers_of(paths), min_slices=2).shape == (8, 8, 2)


@pytest.mark.parametrize("deferred", [False, True], ids=["read", "deferred"])
def test_truncated_file(tmp_path, monkeypatch, deferred):
    # the scan defers pixel data above HEADER_DEFER_BYTES (a CT slice); then the declared length and the file size
    # must find the truncation that reading the bytes finds
    monkeypatch.setattr(dicom_files, "HEADER_DEFER_BYTES", 16 if deferred else 1 << 30)
    paths = write_series(tmp_path / "s", phantom(shape=(8, 8, 4)))
    truncate(paths[2], 40)
    h = read_header(paths[2])
    assert "pixel data is truncated: 88 bytes, expected 128" in h.problem
    reason = series_error(paths)
    assert reason.startswith("1 of 4 files cannot be used") and paths[2].name in reason
    truncate(paths[3], 400)  # cut inside the header: the PixelData element is gone
    assert "truncated" in read_header(paths[3]).problem


def test_a_deflated_file_is_not_taken_for_a_truncated_one(tmp_path):
    """A deferred value's position is in the inflated stream of a Deflated Explicit VR file, not in the file: a
    review found every such slice refused as truncated once the scan deferred the pixel data."""
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    (path,) = write_series(tmp_path / "s", phantom(shape=(96, 96, 1)))[:1]

    def deflate(ds):
        ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian

    edit(path, deflate)
    assert pydicom.dcmread(path).file_meta.TransferSyntaxUID == DeflatedExplicitVRLittleEndian
    assert read_header(path).problem is None


def test_indexing_a_folder_never_reads_the_pixel_data(tmp_path, monkeypatch):
    """Scanning 300 CT slices should read their headers, not 150 MB of pixels: every PixelData stays deferred."""
    write_series(tmp_path / "s", phantom(shape=(96, 96, 4)))  # 18 KB of pixels per slice
    read = []
    dcmread = pydicom.dcmread

    def spy(*args, **kwargs):
        read.append(dcmread(*args, **kwargs))
        return read[-1]

    monkeypatch.setattr(dicom_files.pydicom, "dcmread", spy)
    index = scan_folder(tmp_path)
    assert len(index.cases) == 1 and len(read) == 4
    for ds in read:
        raw = ds.get_item("PixelData", keep_deferred=True)
        assert raw.value is None, "the pixel data was read while indexing"
    assert len(read[0].PixelData) == 96 * 96 * 2  # reading the bytes is seen by the same check
    assert read[0].get_item("PixelData", keep_deferred=True).value is not None


def test_non_dicom_and_corrupt_files(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("hello, not an image\n" * 10)
    with pytest.raises(NotDicomError, match="not DICOM"):
        read_header(text)
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    with pytest.raises(DicomError):
        read_header(empty)
    # a DICM marker followed by garbage: pydicom reads nothing useful, the header says why it is unusable
    bad = tmp_path / "bad.dcm"
    bad.write_bytes(b"\0" * 128 + b"DICM" + b"\x02\x00\x10\x00UI\xff\x7f" + b"garbage")
    assert read_header(bad).problem.startswith("no pixel data")


def test_multi_frame_no_pixels_colour_geometry_and_codec(tmp_path):
    paths = write_series(tmp_path / "s", phantom(shape=(8, 8, 6)))

    def multi(ds):
        ds.NumberOfFrames = 2
        ds.PixelData = ds.PixelData * 2

    def no_pixels(ds):
        del ds.PixelData
        del ds.Rows
        ds.Modality = "RTSTRUCT"
        ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.481.3"

    def colour(ds):
        ds.SamplesPerPixel = 3
        ds.PhotometricInterpretation = "RGB"

    def codec(ds):
        ds.PixelData = encapsulate([ds.PixelData])
        ds["PixelData"].is_undefined_length = True
        ds.file_meta.TransferSyntaxUID = JPEGLSLossless

    edit(paths[0], multi)
    edit(paths[1], no_pixels)
    edit(paths[2], colour)
    edit(paths[3], lambda ds: delattr(ds, "ImagePositionPatient"))
    assert read_header(paths[0]).problem.startswith("multi-frame images are not supported yet (NumberOfFrames=2")
    assert read_header(paths[1]).problem == (
        "an RT structure set (contours), not an image (RTSTRUCT, RT Structure Set Storage)"
    )
    assert read_header(paths[2]).problem.startswith("not a grey-level volume (SamplesPerPixel=3")
    assert read_header(paths[3]).problem.startswith("missing ImagePositionPatient")
    if decoder_problem(JPEGLSLossless) is None:
        pytest.skip("a JPEG-LS decoder is installed here")
    edit(paths[4], codec)
    problem = read_header(paths[4]).problem
    assert "JPEG-LS Lossless" in problem and "pip install pylibjpeg pylibjpeg-libjpeg" in problem
    reason = series_error(paths)
    assert "5 of 6 files cannot be used" in reason


def test_two_series_in_one_folder_are_grouped_by_uid(tmp_path):
    folder = tmp_path / "mixed"
    a = write_series(folder, phantom(shape=(8, 8, 4), seed=1), seed=1, file_names=[f"z{k}" for k in range(4)])
    b = write_series(folder, phantom(shape=(6, 6, 5), seed=2), seed=2, file_names=[f"a{k}" for k in range(5)])
    groups = group_series(headers_of(sorted(folder.iterdir())))
    assert sorted(len(g) for g in groups.values()) == [4, 5]
    shapes = sorted(order_series(g).shape for g in groups.values())
    assert shapes == [(6, 6, 5), (8, 8, 4)]
    with pytest.raises(DicomSeriesError, match="holds 2 image series"):
        DicomSeriesReader().read(str(folder))
    with pytest.raises(DicomSeriesError, match="2 different series"):
        DicomSeriesReader().read([str(a[0]), str(b[0])])


def test_a_series_without_series_uids_is_said_to_lack_them(tmp_path):
    """Files without a SeriesInstanceUID cannot be grouped: the reader and the scan say so, not "4 series" to move
    into folders or four one-slice volumes without the cause (a review)."""
    paths = write_series(tmp_path / "nouid", phantom(shape=(8, 8, 4)))
    for p in paths:
        edit(p, lambda ds: delattr(ds, "SeriesInstanceUID"))
    with pytest.raises(DicomSeriesError, match=r"4 image files have no SeriesInstanceUID \(0020,000E\)") as e:
        DicomSeriesReader().read(str(tmp_path / "nouid"))
    assert "move each series" not in str(e.value)
    index = scan_folder(tmp_path)
    assert not index.cases and len(index.rejected) == 4
    assert all("only 1 slice" in r.reason and "no SeriesInstanceUID" in r.reason for r in index.rejected)


def test_reader_folder_input_and_verify_suffix(tmp_path):
    paths = write_series(tmp_path / "s", phantom(), reverse=True, shuffle_names=True)
    (tmp_path / "s" / "README.txt").write_text("not DICOM")
    reader = DicomSeriesReader()
    assert reader.verify_suffix(str(tmp_path / "s")) and reader.verify_suffix([str(p) for p in paths])
    assert not reader.verify_suffix(["a.nii.gz"]) and not reader.verify_suffix("a.nii")
    arr, _ = reader.get_data(reader.read(str(tmp_path / "s")))
    np.testing.assert_allclose(arr, phantom())
    with pytest.raises(ValueError, match="NibabelReader"):
        reader.read("image.nii.gz")


# ------------------------------------------------------------------------------- MONAI equivalence
@pytest.mark.parametrize("rot_deg,slice_sign", [(0.0, 1.0), (0.0, -1.0), (25.0, -1.0)])
@pytest.mark.parametrize("dicom_first", [True, False])
def test_dicom_and_nifti_of_the_same_data_agree_after_orientation(tmp_path, rot_deg, slice_sign, dicom_first):
    """One physical volume, written as a DICOM series (reversed, shuffled) and as NIfTI, loads identically."""
    vol = phantom(shape=(12, 10, 7), seed=3)
    aff = affine_ras(spacing=(1.5, 1.25, 3.0), rot_deg=rot_deg, slice_sign=slice_sign)
    paths = write_series(tmp_path / "dcm", vol, aff, reverse=True, shuffle_names=True, seed=3)
    nii = write_nifti(vol.astype(np.int16), aff, tmp_path / "vol.nii.gz")
    ordered = [str(p) for p in order_series(headers_of(paths)).paths]
    readers = [DicomSeriesReader(), NibabelReader()] if dicom_first else [NibabelReader(), DicomSeriesReader()]
    load = Compose([
        LoadImaged(["dcm", "nii"], reader=readers, image_only=False),
        EnsureChannelFirstd(["dcm", "nii"]),
        Orientationd(["dcm", "nii"], axcodes="RAS"),
    ])
    out = load({"dcm": ordered, "nii": str(nii)})
    d, n = out["dcm"], out["nii"]
    assert d.shape == n.shape == (1, 12, 10, 7)
    np.testing.assert_allclose(d.numpy(), n.numpy())
    np.testing.assert_allclose(d.affine.numpy(), n.affine.numpy(), atol=1e-3)
    assert nib.aff2axcodes(d.affine.numpy()) == ("R", "A", "S")
    # resampling too gives the same voxels
    res = Spacingd(["dcm", "nii"], pixdim=(2.0, 2.0, 3.0), mode="nearest")(out)
    np.testing.assert_allclose(res["dcm"].numpy(), res["nii"].numpy())
    # no identifying value leaks into the metadata
    text = repr({k: v for k, v in d.meta.items() if k != "filename_or_obj"})
    for value in FAKE_PHI.values():
        assert value not in text
    series_uid = str(pydicom.dcmread(paths[0]).SeriesInstanceUID)
    assert series_uid not in text


def test_unknown_transfer_syntax_reason():
    assert decoder_problem("1.2.840.10008.1.2.1") is None
    reason = decoder_problem("1.2.840.10008.1.2.4.100")  # MPEG2: pydicom has no decoder at all
    assert "MPEG2" in reason and "uncompressed" in reason


@pytest.mark.parametrize("drop_modality", [False, True])
def test_a_monochrome1_ct_series_keeps_its_hounsfield_units(tmp_path, drop_modality):
    """MONOCHROME1 says how to display an image, not what its values are: the rescaled values of a CT are HU either
    way (DICOM PS3.3 C.7.6.3.1.2). The stored values used to be inverted first, which read water as about 63,000
    HU (found by a review); only projection images (CR, DX, ...) are inverted, see test_image_folder. A file
    whose Modality an anonymiser dropped is still a CT by its SOP class (it was inverted: a review, 2026-12-07)."""
    vol = phantom()
    paths = write_series(tmp_path / "s", vol, slope=0.5, intercept=-100.0, signed=True)
    reader = DicomSeriesReader()
    expected, _ = reader.get_data(reader.read([str(p) for p in paths]))

    def to_monochrome1(ds):
        ds.PhotometricInterpretation = "MONOCHROME1"
        if drop_modality:
            del ds.Modality

    for p in paths:
        edit(p, to_monochrome1)
    arr, _ = reader.get_data(reader.read([str(p) for p in paths]))
    np.testing.assert_allclose(arr, expected)


@pytest.mark.parametrize("syntax", ["RLELossless", "JPEG2000Lossless", "JPEGLSLossless"])
def test_compressed_series_and_image_read_as_their_uncompressed_twins(tmp_path, syntax):
    """`make install` includes the ``[jpeg]`` decoders: a lossless compressed series (and a 2D DICOM for
    `classify`) gives the same values as the uncompressed files, scale, sign and orientation kept."""
    import pydicom.uid

    from datamodules.sources.image_folder import load_image

    ts = getattr(pydicom.uid, syntax)
    if decoder_problem(ts) is not None:
        pytest.skip(f"no decoder for {syntax} here: {decoder_problem(ts)}")
    vol = phantom(shape=(40, 36, 4))  # OpenJPEG's default 6 decomposition levels need more than a few pixels
    paths = write_series(tmp_path / "s", vol, slope=0.5, intercept=-100.0, signed=True, reverse=True)
    reader = DicomSeriesReader()
    expected, expected_meta = reader.get_data(reader.read([str(p) for p in paths]))
    plain_image = load_image(paths[2], image_size=(40, 36))
    for p in paths:
        edit(p, lambda ds: ds.compress(ts))
    assert read_header(paths[0]).transfer_syntax == ts and read_header(paths[0]).problem is None
    arr, meta = reader.get_data(reader.read([str(p) for p in paths]))
    np.testing.assert_array_equal(arr, expected)
    np.testing.assert_array_equal(meta["affine"], expected_meta["affine"])
    assert torch.equal(load_image(paths[2], image_size=(40, 36)), plain_image)


def test_missing_or_invalid_bits_stored_and_pixel_representation_are_rejected(tmp_path):
    paths = write_series(tmp_path / "s", phantom(shape=(8, 8, 6)))
    edit(paths[0], lambda ds: delattr(ds, "BitsStored"))
    edit(paths[1], lambda ds: setattr(ds, "BitsStored", 40))  # more than BitsAllocated
    edit(paths[2], lambda ds: setattr(ds, "PixelRepresentation", 7))
    edit(paths[3], lambda ds: delattr(ds, "PixelRepresentation"))
    assert read_header(paths[0]).problem.startswith("invalid BitsStored ('missing'")
    assert read_header(paths[1]).problem.startswith("invalid BitsStored (40; BitsAllocated 16)")
    assert read_header(paths[2]).problem.startswith("invalid PixelRepresentation (7;")
    assert read_header(paths[3]).problem.startswith("invalid PixelRepresentation ('missing'")
    assert read_header(paths[4]).problem is None
    with pytest.raises(Exception, match="invalid BitsStored"):  # the reader that segment uses refuses it too
        DicomSeriesReader().read([str(p) for p in paths])


def test_reading_headers_in_threads_leaves_the_warnings_machinery_as_it_was(tmp_path):
    """The segmentation data's cache-filling threads read DICOM files concurrently. Recording pydicom's warnings
    with ``warnings.catch_warnings`` in two threads at once left the process recording into a dead list: every
    later warning of the run was swallowed (a review: the warning that a resumed checkpoint's settings changed)."""
    from concurrent.futures import ThreadPoolExecutor

    files = write_series(tmp_path / "s", np.zeros((8, 8, 40), np.int16), seed=1)
    state = (warnings.showwarning, warnings.filters, warnings._showwarnmsg_impl)  # type: ignore[attr-defined]
    for _ in range(5):
        with ThreadPoolExecutor(2) as pool:
            list(pool.map(read_header, files * 4))
    assert (warnings.showwarning, warnings.filters, warnings._showwarnmsg_impl) == state  # type: ignore[attr-defined]


@pytest.mark.parametrize("signed", [False, True])
def test_a_monochrome1_projection_series_is_inverted_over_its_stored_range(tmp_path, signed):
    """A CR series displayed MONOCHROME1 (its minimum white) reads as its MONOCHROME2 twin: each stored value v as
    lo + hi - v over the stored range (65535 - v unsigned, -1 - v signed), before the rescale. A PET file without
    its Modality is a measurement by its SOP class and is never inverted (a mutation review: neither was tested for
    the volume reader)."""
    vol = phantom()
    paths = write_series(tmp_path / "s", vol, slope=1.0, intercept=0.0, signed=signed)
    reader = DicomSeriesReader()

    def read():
        return reader.get_data(reader.read([str(p) for p in paths]))[0]

    def as_(modality, sop_class, photometric):
        def change(ds):
            ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = sop_class
            ds.PhotometricInterpretation = photometric
            if modality is None:
                del ds.Modality
            else:
                ds.Modality = modality
        for p in paths:
            edit(p, change)

    cr = "1.2.840.10008.5.1.4.1.1.1"
    as_("CR", cr, "MONOCHROME2")
    plain = read()
    as_("CR", cr, "MONOCHROME1")
    bits = int(pydicom.dcmread(paths[0]).BitsStored)
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    np.testing.assert_allclose(read(), (lo + hi) - plain)
    as_(None, "1.2.840.10008.5.1.4.1.1.128", "MONOCHROME1")  # PET, its Modality dropped
    np.testing.assert_allclose(read(), plain)


def test_a_slice_off_the_line_of_the_others_is_refused(tmp_path):
    """A series whose slice positions leave a straight line (stacks mixed) is refused, not read misplaced."""
    paths = write_series(tmp_path / "s", phantom())

    def shift(ds):
        ds.ImagePositionPatient = [float(ds.ImagePositionPatient[0]) + 5.0, *ds.ImagePositionPatient[1:]]

    edit(paths[2], shift)
    reader = DicomSeriesReader()
    with pytest.raises(DicomSeriesError, match=r"do not lie on a straight line \(largest deviation"):
        reader.get_data(reader.read([str(p) for p in paths]))
