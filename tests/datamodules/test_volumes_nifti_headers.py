"""NIfTI headers every read path must understand alike (`load_nifti`, `label_values` and `LoadVolumed`): spatial
units (metres, microns), CIFTI-2, 5D vector images, NIfTI pairs, an unknown orientation, and the formats the
scanner names by suffix. Each file is written into ``tmp_path`` with nibabel."""

from __future__ import annotations

import logging
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from nibabel import cifti2

from datamodules.indexing.inputs import Reject, not_dicom_reason
from datamodules.indexing.scan import scan_folder
from datamodules.indexing.volumes import Volume, label_values, load_nifti
from datamodules.io.dicom import NotDicomError
from datamodules.transforms.volume import LoadVolumed, volume_transforms
from tests.datamodules.dicom_fixtures import affine_ras, label_for, phantom, write_nifti

#: NIfTI spatial unit -> millimetres per unit
UNITS = {"meter": 1000.0, "micron": 0.001}


def write_in_unit(array: np.ndarray, affine_mm: np.ndarray, path: Path, unit: str, codes=(1, 1)) -> Path:
    """The same grid as ``affine_mm`` written in another spatial unit (affine, sform, qform and pixdim)."""
    affine = np.asarray(affine_mm, dtype=np.float64).copy()
    affine[:3, :] /= {"mm": 1.0, **UNITS}[unit]
    img = nib.Nifti1Image(np.asarray(array), affine)
    img.set_sform(affine, code=codes[0])
    img.set_qform(affine, code=codes[1])
    img.header.set_xyzt_units(unit, "sec")
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, path)
    return path


def value_error(fn, *args) -> str:
    """The ValueError under MONAI's ``RuntimeError("applying transform ...")`` wrapper."""
    with pytest.raises(Exception) as info:
        fn(*args)
    err: BaseException | None = info.value
    while err is not None and not isinstance(err, ValueError):
        err = err.__cause__
    assert err is not None, repr(info.value)
    return str(err)


def reason_of(index, rel: str) -> str:
    found = [r.reason for r in index.rejected if r.path == rel]
    assert len(found) == 1, (rel, [(r.path, r.reason) for r in index.rejected])
    return found[0]


# ------------------------------------------------------------------------------------------ spatial units
@pytest.mark.parametrize("unit", sorted(UNITS))
def test_a_volume_in_metres_or_microns_is_read_in_mm_by_every_path(tmp_path, unit):
    vol = phantom(seed=1)
    aff = affine_ras()  # exactly the mm file's affine once scaled (a rotation would differ by float32 rounding)
    mm = write_nifti(vol, aff, tmp_path / "mm" / "scan.nii.gz")
    write_nifti(label_for(vol), aff, tmp_path / "mm" / "scan_label.nii.gz")
    other = write_in_unit(vol.astype(np.float32), aff, tmp_path / unit / "scan.nii.gz", unit)
    write_in_unit(label_for(vol), aff, tmp_path / unit / "scan_label.nii.gz", unit)

    # load_nifti (scan, segment's checks): the same voxels, the affine and zooms in mm
    img_mm, data_mm, shape_mm = load_nifti(str(mm))
    img, data, shape = load_nifti(str(other))
    np.testing.assert_array_equal(data, data_mm)
    assert shape == shape_mm
    assert np.allclose(img.affine, aff, atol=1e-4)
    assert np.allclose(img.header.get_zooms()[:3], (1.5, 1.25, 3.0), atol=1e-5)
    assert img.header.get_xyzt_units() == ("mm", "sec")

    # the scan: spacing in mm, the label in the other unit matches its image
    index_mm, index = scan_folder(tmp_path / "mm"), scan_folder(tmp_path / unit)
    assert not index.rejected, [(r.path, r.reason) for r in index.rejected]
    (case_mm,), (case,) = index_mm.cases, index.cases
    assert np.allclose(case.spacing, case_mm.spacing, atol=1e-5) and np.allclose(case.spacing, (1.5, 1.25, 3.0))
    assert np.allclose(case.affine, case_mm.affine, atol=1e-4)

    # a label in mm on an image in metres (and the other way round): the same grid
    assert label_values(str(tmp_path / "mm" / "scan_label.nii.gz"), "l", Volume(shape, img.affine)) == [1]
    assert label_values(str(tmp_path / unit / "scan_label.nii.gz"), "l", Volume(shape_mm, img_mm.affine)) == [1]

    # the MONAI path: the same preprocessed image and label, the same affine in mm
    tf = volume_transforms(spacing=(2.0, 2.0), slice_size=(16, 16))
    outs = [tf({"image": str(folder / "scan.nii.gz"), "label": str(folder / "scan_label.nii.gz"), "modality": "CT"})
            for folder in (tmp_path / "mm", tmp_path / unit)]
    np.testing.assert_allclose(np.asarray(outs[1]["image"]), np.asarray(outs[0]["image"]), atol=1e-5)
    np.testing.assert_array_equal(np.asarray(outs[1]["label"]), np.asarray(outs[0]["label"]))
    assert np.allclose(np.asarray(outs[1]["image"].affine), np.asarray(outs[0]["image"].affine), atol=1e-4)
    raw = LoadVolumed(["image"])({"image": str(other)})["image"]
    assert np.allclose(np.asarray(raw.affine), aff, atol=1e-4)
    assert np.allclose(np.asarray(raw.meta["pixdim"])[1:4], (1.5, 1.25, 3.0), atol=1e-5)


def test_a_label_in_metres_on_an_image_in_mm_passes_the_grid_check(tmp_path):
    vol = phantom(seed=2)
    image = write_nifti(vol, affine_ras(), tmp_path / "scan.nii.gz")
    label = write_in_unit(label_for(vol), affine_ras(), tmp_path / "scan_label.nii.gz", "meter")
    tf = volume_transforms(spacing=(2.0, 2.0), slice_size=(16, 16))
    out = tf({"image": str(image), "label": str(label), "modality": "CT"})
    assert int(np.asarray(out["label"]).sum()) > 0


# ------------------------------------------------------------------------------------------ CIFTI-2
def write_cifti(path: Path) -> Path:
    """A tiny dense-scalar CIFTI-2 file: one map over 8 voxels of a brain structure."""
    scalars = cifti2.ScalarAxis(["thickness"])
    models = cifti2.BrainModelAxis.from_mask(np.ones((2, 2, 2), bool), affine=np.eye(4), name="thalamus_left")
    img = cifti2.Cifti2Image(np.zeros((1, 8), np.float32), header=(scalars, models))
    img.nifti_header.set_intent("ConnDenseScalar")
    nib.save(img, path)
    return path


def write_cifti_intent_only(path: Path) -> Path:
    """A NIfTI-2 volume with a CIFTI-2 intent code but no CIFTI extension (nibabel refuses to load it)."""
    img = nib.Nifti2Image(np.zeros((4, 4, 4), np.float32), np.eye(4))
    img.header["intent_code"] = 3006
    nib.save(img, path)
    return path


@pytest.mark.parametrize("writer", [write_cifti, write_cifti_intent_only])
def test_a_cifti_file_is_named_as_such_by_every_path(tmp_path, writer):
    path = writer(tmp_path / "thick.dscalar.nii")
    expected = "a CIFTI-2 file (grayordinate data), not an image volume"
    with pytest.raises(Reject, match=r"^a CIFTI-2 file \(grayordinate data\), not an image volume"):
        load_nifti(str(path))
    with pytest.raises(Reject, match=r"label map l: a CIFTI-2 file \(grayordinate data\)"):
        label_values(str(path), "l", Volume([4, 4, 4], np.eye(4)))
    msg = value_error(LoadVolumed(["image"]), {"image": str(path)})
    assert msg.startswith(f"{path}: {expected}"), msg
    msg = value_error(volume_transforms(spacing=(2.0, 2.0), slice_size=(8, 8), keys=("image",)),
                      {"image": str(path), "modality": "CT"})
    assert msg.startswith(f"{path}: {expected}"), msg
    assert reason_of(scan_folder(tmp_path), path.name).startswith(expected)


# ------------------------------------------------------------------------------------------ 5D
def test_a_5d_vector_image_is_named_as_such(tmp_path):
    path = tmp_path / "field.nii.gz"
    nib.save(nib.Nifti1Image(np.random.default_rng(0).random((9, 8, 5, 1, 3)).astype(np.float32), np.eye(4)), path)
    msg = value_error(volume_transforms(spacing=(2.0, 2.0), slice_size=(8, 8), keys=("image",)),
                      {"image": str(path), "modality": "CT"})
    assert msg.startswith(f"{path}: 5D image (shape (9, 8, 5, 1, 3)): a vector image of 3 components per voxel"), msg
    assert "4D" not in msg and "split it into one 3D file per component" in msg
    with pytest.raises(Reject, match=r"^5D image \(shape \(9, 8, 5, 1, 3\)\): a vector image of 3 components"):
        load_nifti(str(path))


# ------------------------------------------------------------------------------------------ NIfTI pairs
def test_a_nifti_pair_is_told_to_become_one_nii_gz_file(tmp_path):
    data = phantom(seed=3).astype(np.float32)
    nib.save(nib.Nifti1Pair(data, affine_ras()), tmp_path / "pair.img")
    nib.save(nib.AnalyzeImage(data, affine_ras()), tmp_path / "old.img")
    error = NotDicomError(str(tmp_path / "pair.hdr"), "no 'DICM' marker")
    reason = not_dicom_reason(str(tmp_path / "pair.hdr"), ".hdr", error)
    assert "a NIfTI-1 pair (.hdr/.img) - save it as one .nii.gz file" in reason and "Analyze" not in reason

    index = scan_folder(tmp_path)
    assert "a NIfTI-1 pair (.hdr/.img) - save it as one .nii.gz file" in reason_of(index, "pair.hdr")
    assert "nibabel.load('pair.hdr'), 'pair.nii.gz'" in reason_of(index, "pair.hdr")
    assert "the data file of a NIfTI-1 pair (.hdr/.img, with pair.hdr)" in reason_of(index, "pair.img")
    assert "Analyze header" in reason_of(index, "old.hdr")  # a real Analyze pair keeps its name


# ------------------------------------------------------------------------------------------ orientation unknown
def test_an_unknown_orientation_is_warned_about_naming_the_file(tmp_path, caplog):
    vol = phantom(seed=4)
    path = tmp_path / "where.nii.gz"
    write_in_unit(vol.astype(np.float32), affine_ras(), path, "meter", codes=(0, 0))
    nib.save(nib.Nifti1Image(vol.astype(np.float32), affine_ras()), tmp_path / "known.nii.gz")
    with caplog.at_level(logging.WARNING, logger="datamodules"):
        img, _, _ = load_nifti(str(path))
        load_nifti(str(tmp_path / "known.nii.gz"))
    warned = [r.getMessage() for r in caplog.records if "orientation unknown" in r.getMessage()]
    assert len(warned) == 1 and warned[0].startswith(f"{path}: orientation unknown (sform_code and qform_code are 0)")
    assert np.allclose(img.header.get_zooms()[:3], (1.5, 1.25, 3.0), atol=1e-5)  # nibabel's fallback, in mm

    other = tmp_path / "where2.nii.gz"
    write_in_unit(vol.astype(np.float32), affine_ras(), other, "meter", codes=(0, 0))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="datamodules"):
        LoadVolumed(["image"])({"image": str(other)})
    assert any(r.getMessage().startswith(f"{other}: orientation unknown") for r in caplog.records)


# ------------------------------------------------------------------------------------------ other formats
@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("brain.mnc", "MINC - convert it to NIfTI"),
        ("brain.PAR", "Philips PAR/REC header - convert the PAR/REC pair to NIfTI (.nii.gz), e.g. with dcm2niix"),
        ("brain.REC", "Philips PAR/REC data - convert"),
        ("brain+orig.HEAD", "AFNI header (.HEAD/.BRIK) - convert the dataset to NIfTI"),
        ("brain+orig.BRIK", "AFNI data (.HEAD/.BRIK) - convert the dataset to NIfTI"),
        ("brain+tlrc.BRIK.gz", "AFNI data (.HEAD/.BRIK) - convert the dataset to NIfTI"),
        ("pet.v", "ECAT 7 (.v) - convert it to NIfTI"),
        ("T1.mgz", "FreeSurfer MGH (.mgz) - convert it to NIfTI (.nii.gz), e.g. with mri_convert"),
        ("T1.mgh", "FreeSurfer MGH (.mgh) - convert it to NIfTI (.nii.gz), e.g. with mri_convert"),
    ],
)
def test_other_neuroimaging_formats_are_named_with_the_fix(tmp_path, name, expected):
    (tmp_path / name).write_bytes(b"\x00not dicom, not nifti" * 8)
    reason = reason_of(scan_folder(tmp_path), name)
    assert expected in reason, reason
    assert "suffix" not in reason and "decompress" not in reason


@pytest.mark.parametrize("codes", [(0, 1), (1, 0), (2, 1)], ids=["qform-only", "sform-only", "both"])
@pytest.mark.parametrize("unit", sorted(UNITS))
def test_a_rotated_volume_in_another_unit_keeps_its_qform_and_sform_in_mm(tmp_path, unit, codes):
    """Each of sform and qform (and so whichever nibabel takes as the affine) is converted, also when only one
    is set and the grid is oblique: a qform left in metres would move a qform-only file a thousandfold."""
    angle = np.deg2rad(25.0)
    rot = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    aff = np.eye(4)
    aff[:3, :3] = rot @ np.diag([1.5, 1.25, 3.0])
    aff[:3, 3] = (-40.0, 25.0, -60.0)
    vol = phantom(seed=3).astype(np.float32)
    mm = write_in_unit(vol, aff, tmp_path / "mm.nii.gz", "mm", codes)
    other = write_in_unit(vol, aff, tmp_path / f"{unit}.nii.gz", unit, codes)
    img_mm, img = load_nifti(str(mm))[0], load_nifti(str(other))[0]
    assert np.allclose(img.affine, img_mm.affine, atol=1e-3)
    for get in ("get_qform", "get_sform"):
        assert np.allclose(getattr(img.header, get)(), getattr(img_mm.header, get)(), atol=1e-3), get
    assert tuple(int(c) for c in img.header.get_qform(coded=True)[1:]) == (codes[1],)
    assert int(img.header["sform_code"]) == codes[0] and int(img.header["qform_code"]) == codes[1]
    raw_mm, raw = (LoadVolumed(["image"])({"image": str(p)})["image"] for p in (mm, other))
    assert np.allclose(np.asarray(raw.affine), np.asarray(raw_mm.affine), atol=1e-3)


@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("endian", ["<", ">"])
def test_a_cifti_intent_is_read_from_either_header_version_and_byte_order(tmp_path, version, endian):
    """The raw-header check (for files nibabel will not load) reads the intent code at NIfTI-1's and NIfTI-2's
    offsets, in little- and big-endian files alike."""
    cls = nib.Nifti1Image if version == 1 else nib.Nifti2Image
    img = cls(np.zeros((4, 4, 4), np.float32), np.eye(4))
    img.header["intent_code"] = 3006
    path = tmp_path / "intent.nii"
    if endian == ">":
        img = cls(img.dataobj, img.affine, img.header.as_byteswapped(">"))
    nib.save(img, path)
    assert img.header.endianness == endian
    with pytest.raises(Reject, match=r"^a CIFTI-2 file \(grayordinate data\)"):
        load_nifti(str(path))


def test_a_3d_volume_stored_with_trailing_singleton_dimensions_is_read_as_3d_by_every_path(tmp_path):
    """A review: ``scan`` accepts a volume stored as (X, Y, Z, 1, 1) (its label map too), but the training reader
    kept it 5D and refused it, after scan had indexed it. Every path now reads it as the 3D volume it is."""
    image, label = phantom(seed=4).astype(np.float32), label_for(phantom(seed=4))
    root = tmp_path / "data"
    root.mkdir()
    for name, array in (("ct.nii.gz", image), ("ct_label.nii.gz", label)):
        nib.save(nib.Nifti1Image(array[..., None, None], affine_ras()), root / name)
    index = scan_folder(root)
    assert [(c.image, c.label) for c in index.cases] == [("ct.nii.gz", "ct_label.nii.gz")], index.rejected
    loaded = volume_transforms(spacing=(2.0, 2.0), slice_size=(16, 16))(
        {"image": str(root / "ct.nii.gz"), "label": str(root / "ct_label.nii.gz"), "modality": "CT"})
    plain = tmp_path / "plain"
    plain.mkdir()
    write_nifti(image, affine_ras(), plain / "ct.nii.gz")
    write_nifti(label, affine_ras(), plain / "ct_label.nii.gz")
    reference = volume_transforms(spacing=(2.0, 2.0), slice_size=(16, 16))(
        {"image": str(plain / "ct.nii.gz"), "label": str(plain / "ct_label.nii.gz"), "modality": "CT"})
    for key in ("image", "label"):
        assert loaded[key].shape == reference[key].shape and torch.equal(loaded[key].as_tensor(), reference[key].as_tensor())
