"""`segment` and NIfTI headers: a query in metres gives the mask of its mm original, written in the query's own
unit and affine; an unknown orientation is warned about and kept (codes 0) in the mask; a CIFTI-2 file and a NIfTI
pair are named as such. The learner's ``predict`` is a threshold of the query slice (`test_segment_outputs`)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from imaging_meta.commands.segment import check_label_source, segment
from imaging_meta.volume.segmenter import LEARNER_ONLY
from tests.datamodules.dicom_fixtures import affine_ras, label_for, phantom, write_nifti
from tests.datamodules.test_volumes_nifti_headers import write_cifti, write_in_unit
from tests.imaging_meta.test_segment_outputs import (
    PLAIN,
    ct_nifti,
    make_checkpoint,
    ras_grid,
    stand_in,
    threshold_predict,
)


def ct_in_unit(array: np.ndarray, affine_mm: np.ndarray, path: Path, unit: str, codes=(1, 1)) -> Path:
    """`write_in_unit` with a BIDS sidecar saying CT."""
    write_in_unit(array.astype(np.float32), affine_mm, path, unit, codes)
    path.with_name(path.name.removesuffix(".nii.gz") + ".json").write_text(json.dumps({"Modality": "CT"}))
    return path


@pytest.fixture
def scans(tmp_path, monkeypatch):
    """A support (mm), a query in mm, and a checkpoint whose preprocessing resamples nothing."""
    vol = phantom(seed=1)
    support = (ct_nifti(vol, affine_ras(), tmp_path / "s" / "sup.nii.gz"),
               write_nifti(label_for(vol), affine_ras(), tmp_path / "s" / "sup_label.nii.gz"))
    query = phantom(seed=2)
    spacing, size = ras_grid(query.astype(np.float32), affine_ras())
    stand_in(monkeypatch, threshold_predict)
    return support, query, make_checkpoint(tmp_path / "m.ckpt", spacing, size)


def run(ckpt, support, query: Path, out: Path) -> list[Path]:
    return segment(ckpt, [support], [query], out, largest_component=False, device="cpu", options=LEARNER_ONLY,
                   explain=True, **PLAIN)


@pytest.mark.parametrize("unit", ["meter"])  # microns: tests/datamodules/test_volumes_nifti_headers.py (read as
# millimetres, a micron query would be upsampled a thousandfold per axis: the old reader ran out of memory)
def test_a_query_in_metres_gets_the_mask_of_its_mm_original_in_its_own_unit(tmp_path, scans, unit):
    support, query, ckpt = scans
    mm = ct_nifti(query, affine_ras(), tmp_path / "mm" / "q.nii.gz")
    other = ct_in_unit(query, affine_ras(), tmp_path / unit / "q.nii.gz", unit)
    mask_mm, prob_mm = run(ckpt, support, mm, tmp_path / "out_mm")
    mask, prob = run(ckpt, support, other, tmp_path / f"out_{unit}")

    expected = np.asarray(nib.load(mask_mm).dataobj)
    assert expected.sum() > 0
    got = nib.load(mask)
    np.testing.assert_array_equal(np.asarray(got.dataobj), expected)
    np.testing.assert_allclose(np.asarray(nib.load(prob).dataobj), np.asarray(nib.load(prob_mm).dataobj), atol=1e-5)
    # written as the query: its affine in its own unit, its codes
    q = nib.load(other)
    for path in (mask, prob):
        hdr = nib.load(path).header
        assert hdr.get_xyzt_units()[0] == unit
        assert np.allclose(nib.load(path).affine, q.affine, rtol=1e-6, atol=1e-9)
        assert (int(hdr["sform_code"]), int(hdr["qform_code"])) == (1, 1)
    assert nib.load(mask_mm).header.get_xyzt_units()[0] == "mm"


def test_a_query_with_trailing_dimensions_of_size_1_gets_a_mask_of_its_own_shape(tmp_path, scans):
    """A review (2026-12-07): a query stored as (X, Y, Z, 1) got a 3D mask and probability map, where the README
    promises the query's own shape; the voxels are those of the same query stored 3D."""
    support, query, ckpt = scans
    flat = ct_nifti(query, affine_ras(), tmp_path / "flat" / "q.nii.gz")
    four = tmp_path / "four" / "q.nii.gz"
    ct_nifti(query[..., None], affine_ras(), four)
    assert nib.load(four).shape == query.shape + (1,)
    expected, expected_prob = run(ckpt, support, flat, tmp_path / "out_flat")
    mask, prob = run(ckpt, support, four, tmp_path / "out_four")
    for got, want in ((mask, expected), (prob, expected_prob)):
        img = nib.load(got)
        assert img.shape == query.shape + (1,) and np.allclose(img.affine, nib.load(four).affine)
        np.testing.assert_array_equal(np.asarray(img.dataobj)[..., 0], np.asarray(nib.load(want).dataobj))
    assert np.asarray(nib.load(expected).dataobj).sum() > 0


def test_a_query_of_unknown_orientation_is_warned_about_and_keeps_codes_0(tmp_path, scans, caplog):
    support, query, ckpt = scans
    mm = ct_nifti(query, affine_ras(), tmp_path / "mm" / "q.nii.gz")
    unknown = ct_in_unit(query, affine_ras(), tmp_path / "unknown" / "q.nii.gz", "mm", codes=(0, 0))
    (expected, _) = run(ckpt, support, mm, tmp_path / "out_mm")
    with caplog.at_level(logging.WARNING, logger="datamodules"):
        mask, prob = run(ckpt, support, unknown, tmp_path / "out")
    assert any(r.getMessage().startswith(f"{unknown}: orientation unknown") for r in caplog.records), caplog.text
    np.testing.assert_array_equal(np.asarray(nib.load(mask).dataobj), np.asarray(nib.load(expected).dataobj))
    q = nib.load(unknown)
    for path in (mask, prob):
        img = nib.load(path)
        assert (int(img.header["sform_code"]), int(img.header["qform_code"])) == (0, 0), path
        assert np.allclose(img.affine, q.affine, rtol=1e-6, atol=1e-9), "the same fallback grid as the query"


def test_a_cifti_file_is_named_as_such_before_any_work(tmp_path, scans):
    support, query, ckpt = scans
    cifti = write_cifti(tmp_path / "thick.dscalar.nii")
    expected = rf"^{cifti}: a CIFTI-2 file \(grayordinate data\), not an image volume"
    never_read = tmp_path / "never-read.ckpt"
    for pair, queries in (((support[0], cifti), [support[0]]), ((cifti, support[1]), [support[0]]), (support, [cifti])):
        with pytest.raises(ValueError, match=expected):
            segment(never_read, [pair], queries, tmp_path / "out", device="cpu", **PLAIN)
    with pytest.raises(ValueError, match=expected):
        check_label_source(cifti)
    assert not (tmp_path / "out").exists()


def test_a_nifti_pair_is_told_to_become_one_file(tmp_path, scans):
    support, query, ckpt = scans
    nib.save(nib.Nifti1Pair(query.astype(np.float32), affine_ras()), tmp_path / "pair.img")
    for path in (tmp_path / "pair.hdr", tmp_path / "pair.img"):
        with pytest.raises(ValueError, match=r"pair\.(hdr|img): .*NIfTI-1 pair \(\.hdr/\.img(, with pair\.hdr)?\) - save it as one \.nii\.gz"):
            segment(ckpt, [support], [path], tmp_path / "out", device="cpu", **PLAIN)
        with pytest.raises(ValueError, match=r"pair\.(hdr|img): .*NIfTI-1 pair \(\.hdr/\.img(, with pair\.hdr)?\) - save it as one \.nii\.gz"):
            segment(ckpt, [(support[0], path)], [support[0]], tmp_path / "out", device="cpu", **PLAIN)
        with pytest.raises(ValueError, match=r"pair\.(hdr|img): .*NIfTI-1 pair .*support label maps are read from"):
            check_label_source(path)


def test_a_query_whose_sform_and_qform_disagree_gets_both_in_its_mask(tmp_path, scans):
    """A tool that places images by the qform (ITK) must draw the mask where it draws the query: the mask copies
    the query's sform and qform exactly, not its sform twice (which put the mask 40 mm off in such a tool)."""
    support, query, ckpt = scans
    path = ct_nifti(query, affine_ras(), tmp_path / "q" / "q.nii.gz")
    img = nib.load(path)
    qform = affine_ras().copy()
    qform[:3, 3] += [40.0, 0.0, 0.0]  # 40 mm away: what the query's qform says
    img.set_qform(qform, code=1)
    nib.save(img, path)
    mask, prob = run(ckpt, support, path, tmp_path / "out")
    q = nib.load(path)
    for written in (mask, prob):
        hdr = nib.load(written).header
        np.testing.assert_allclose(hdr.get_sform(), q.header.get_sform(), atol=1e-4)
        np.testing.assert_allclose(hdr.get_qform(), q.header.get_qform(), atol=1e-4)
        assert (int(hdr["sform_code"]), int(hdr["qform_code"])) == (1, 1)


def test_a_sheared_affine_is_written_without_a_qform_that_cannot_hold_it(tmp_path):
    """A DICOM series acquired with gantry tilt has a sheared affine; a qform cannot hold a shear, and nibabel's
    nearest qform lies tens of mm off at the corners: the mask's qform code is 0 (not set), its sform exact."""
    from imaging_meta.commands.nifti_out import NiftiGeometry, qform_holds, save_nifti

    shape = (8, 8, 40)
    for degrees in (20, 5, 1):
        for origin in ((0.0, 0.0, 0.0), (-180.0, -200.0, -600.0)):  # far from the origin: an element-wise test of
            tilted = np.diag([0.8, 0.8, 2.5, 1.0])                 # the affine let a 5 degree tilt through (20 mm off)
            tilted[1, 2] = 2.5 * np.tan(np.radians(degrees))  # each slice shifted along y: a tilt
            tilted[:3, 3] = origin
            assert not qform_holds(tilted, shape), (degrees, origin)
    far = affine_ras()
    far[:3, 3] = (-180.0, -200.0, -600.0)
    noisy = far.copy()
    noisy[:3, 0] += 2e-6  # the rounding of a DICOM orientation: no shear to speak of
    assert qform_holds(affine_ras(), shape) and qform_holds(far, shape) and qform_holds(noisy, shape)
    path = save_nifti(np.zeros(shape, np.uint8), NiftiGeometry.scanner(tilted, shape), tmp_path / "m.nii.gz")
    hdr = nib.load(path).header
    assert (int(hdr["sform_code"]), int(hdr["qform_code"])) == (1, 0)
    np.testing.assert_allclose(hdr.get_sform(), tilted, atol=1e-4)
    upright = save_nifti(np.zeros((8, 8, 4), np.uint8), NiftiGeometry.scanner(far, (8, 8, 4)), tmp_path / "u.nii.gz")
    assert (int(nib.load(upright).header["sform_code"]), int(nib.load(upright).header["qform_code"])) == (1, 1)
    # a NIfTI image with a sheared sform and no qform: the mask sets none either
    img = nib.Nifti1Image(np.zeros((8, 8, 40), np.float32), tilted)
    img.set_qform(None, code=0)
    img.set_sform(tilted, code=2)
    geometry = NiftiGeometry.of(img)
    assert (geometry.sform_code, geometry.qform_code) == (2, 0)
