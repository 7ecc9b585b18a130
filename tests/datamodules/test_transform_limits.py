"""The limits of the preprocessing's transforms (`datamodules.transforms.body`, `datamodules.transforms.volume`):
when the crop to the body leaves a grid alone, how its margin and threshold are measured on non-square pixels
and a shifted background, which label ids and modality names keep their meaning, which files and settings are
refused with a clear error, and that the augmentation's shift follows each axis of a non-square slice."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from datamodules.transforms.body import (
    BODY_META,
    BodyCropd,
    FindBodyd,
    body_box,
    body_field,
    body_foreground,
)
from datamodules.transforms.volume import (
    CastLabeld,
    ModalityIntensity,
    ModalityIntensityd,
    slice_augmentation,
    volume_transforms,
)
from tests.datamodules.dicom_fixtures import affine_ras, phantom, write_nifti
from tests.datamodules.test_body import _cut
from tests.datamodules.test_robustness import load_error


def _ct_body(tmp_path, name: str, grid, body, spacing: float) -> str:
    """A CT of air with a 40 HU body over ``body`` (x0, x1, y0, y1) on a ``grid`` of square ``spacing`` mm pixels."""
    hu = np.full(grid, -1000.0, np.float32)
    x0, x1, y0, y1 = body
    hu[x0:x1, y0:y1] = 40.0
    return str(write_nifti(hu, np.diag([spacing, spacing, 5.0, 1.0]), tmp_path / f"{name}.nii.gz"))


# ------------------------------------------------------------------------------------------ the crop to the body
def test_a_scan_cut_close_to_its_body_away_from_the_grid_edges_is_not_cropped_again(tmp_path):
    """A scan already cut to its body with a few mm of air left (the body 16 mm from each edge, its 10 mm margin
    inside the grid): the box keeps nine tenths of the grid and the centred slices hold it, so the slices are the
    ones it got before the crop existed, not cut again by 6 mm on each side."""
    path = _ct_body(tmp_path, "close", (60, 60, 4), (8, 52, 8, 52), 2.0)
    tf = volume_transforms(spacing=(2.0, 2.0), slice_size=(56, 56), keys=("image",))
    assert _cut(tf({"image": path, "modality": "CT"})) == [0, 0, 0, 0]
    # without a slice size (held by any slices), the same
    image = MetaTensor(torch.full((1, 60, 60, 2), -1000.0), affine=torch.diag(torch.tensor([2.0, 2.0, 5.0, 1.0])))
    image[0, 8:52, 8:52] = 40.0
    d = FindBodyd(["image"])({"image": image, "modality": "CT"})
    assert BodyCropd(["image"]).box(d["image"]) == (0, 60, 0, 60)


def test_a_grid_exactly_the_slice_size_is_left_alone_with_its_body_off_centre(tmp_path):
    """A grid of exactly the slice size loses nothing to the slices: it is not cropped, even around a small body
    in its corner (which a crop would move to the slices' centre, so that the scan no longer matched its file's
    grid as it did before the crop existed)."""
    path = _ct_body(tmp_path, "exact", (48, 40, 4), (2, 14, 24, 36), 3.0)
    tf = volume_transforms(spacing=(3.0, 3.0), slice_size=(48, 40), keys=("image",))
    d = tf({"image": path, "modality": "CT"})
    assert _cut(d) == [0, 0, 0, 0]
    assert tuple(d["image"].shape) == (1, 48, 40, 4)


def test_the_field_kept_counts_the_margin_on_both_sides_and_keeps_a_nearly_whole_axis():
    """`body_field`, the extent `--scale structure` sizes the slices to: the box and 10 mm of air on each side
    (40 + 20 = 60 mm of a 100 mm axis), and the whole axis where that is nine tenths of it or more (a box of 75 mm:
    95 mm, so the 100 mm axis; a box as wide as the grid: the grid, not 120 mm)."""
    assert body_field((10, 50, 0, 100), (1.0, 1.0), (100, 100)) == (60.0, 100.0)
    assert body_field((5, 80, 20, 40), (1.0, 1.0), (100, 100)) == (100.0, 40.0)
    # each axis in its own pixel size: 20 voxels of 3 mm and 20 mm of air
    assert body_field((10, 50, 20, 40), (1.0, 3.0), (100, 100)) == (60.0, 80.0)
    assert body_field(None, (1.0, 3.0), (100, 100)) == (100.0, 300.0)


def test_an_mr_with_a_non_zero_background_has_the_same_body():
    """The threshold is 2% of the range from the background to the tissue's top, not of the top alone: an MR whose
    background is 1000 instead of 0 (an offset in its scaling) keeps all its tissue as body, its darkest 2% too."""
    mr = np.concatenate([np.zeros(500), np.linspace(20, 1000, 500)])  # a zeroed background, tissue 2-100%
    plain = body_foreground(mr, "MR")
    shifted = body_foreground(mr + 1000.0, "MR")
    assert not plain[:500].any() and plain[500:].all()
    assert shifted.tolist() == plain.tolist()


def test_thin_layers_are_measured_in_the_finer_pixel_size_of_non_square_pixels():
    """On pixels of 1 x 3 mm, a couch's 5 mm shell (5 voxels along the 1 mm axis) is eroded away: erosion counted
    in the coarser 3 mm pixels (one step) kept it, and the box reached out to it."""
    fg = np.zeros((100, 60, 2), bool)
    fg[20:80, 10:50] = True  # the body
    fg[90:95, 10:50] = True  # a 5 mm shell beside it, apart from it
    assert body_box(fg, spacing=(1.0, 3.0)) == (20, 80, 10, 50)
    assert body_box(fg, spacing=(1.0, 1.0)) == (20, 80, 10, 50)


def test_the_crop_margin_is_10_mm_along_each_axis_of_non_square_pixels():
    """Pixels of 1 x 3 mm: the 10 mm of air kept around the body is 10 voxels along x and 4 (12 mm) along y; the
    x spacing used for both axes kept 30 mm of air along y."""
    image = MetaTensor(torch.full((1, 100, 60, 2), -1000.0), affine=torch.diag(torch.tensor([1.0, 3.0, 5.0, 1.0])))
    image[0, 30:70, 20:40] = 40.0
    d = FindBodyd(["image"])({"image": image, "modality": "CT"})
    assert d["image"].meta[BODY_META] is not None
    assert BodyCropd(["image"]).box(d["image"]) == (20, 80, 16, 44)
    out = BodyCropd(["image"])(d)
    assert tuple(out["image"].shape) == (1, 60, 28, 2)
    assert float((out["image"] > 0).sum()) == 40 * 20 * 2  # the whole body


# ------------------------------------------------------------------------------------------ labels and modality
def test_a_label_id_above_int16_keeps_its_value():
    """Atlas-style ids up to 65535 do not fit int16 (whose top is 32767): a map of ids 0 and 40000 is stored as
    int32 and keeps 40000, not wrapped around to -25536."""
    lbl = torch.zeros(1, 4, 4, 2)
    lbl[0, :2] = 40000.0
    out = CastLabeld(["label"])({"label": lbl})["label"]
    assert out.dtype == torch.int32
    assert sorted(out.unique().tolist()) == [0, 40000]
    small = CastLabeld(["label"])({"label": lbl.clamp(max=32767.0)})["label"]
    assert small.dtype == torch.int16 and int(small.max()) == 32767


def test_a_modality_in_lower_case_is_windowed_as_ct():
    """A modality given as "ct" (a CSV written by hand) is CT: its HU are windowed, not scaled between their own
    percentiles as an MR's would be."""
    hu = torch.tensor([-1000.0, -250.0, 0.0, 250.0, 1000.0])
    expected = torch.tensor([0.0, 0.0, 0.5, 1.0, 1.0])
    assert torch.allclose(ModalityIntensity()(hu, "ct"), expected)
    d = ModalityIntensityd("image")({"image": hu.clone(), "modality": "ct"})
    assert torch.allclose(d["image"], expected)


# ------------------------------------------------------------------------------------------ refused files and settings
def test_a_4d_nifti_of_two_volumes_is_refused_naming_the_file(tmp_path):
    """Two time points or channels in one file are refused with the split to make, not read as one volume."""
    vol = phantom((8, 8, 4), 5)
    path = write_nifti(np.stack([vol, vol + 1], -1), affine_ras(), tmp_path / "two.nii.gz")
    tf = volume_transforms(spacing=(2.0, 2.0), slice_size=(8, 8), keys=("image",))
    msg = load_error(tf, {"image": str(path), "modality": "CT"})
    assert msg.startswith(f"{path}: 2 volumes in one file (4D image") and "fslsplit" in msg, msg


def test_a_2d_nifti_is_refused_naming_the_file(tmp_path):
    """A single 2D slice saved as (X, Y) is told to become a 3D volume, naming the file, not failed on somewhere
    deeper in the preprocessing."""
    path = write_nifti(phantom((12, 10, 6), 2)[..., 0], affine_ras(), tmp_path / "slice.nii.gz")
    tf = volume_transforms(spacing=(2.0, 2.0), slice_size=(8, 8), keys=("image",))
    msg = load_error(tf, {"image": str(path), "modality": "CT"})
    assert msg.startswith(f"{path}: 2D image (shape (12, 10)): a 3D volume is needed"), msg


@pytest.mark.parametrize("kwargs, match", [
    ({"ct_window": (100.0, 100.0)}, "ct_window must be"),
    ({"mr_percentiles": (50.0, 50.0)}, "mr_percentiles must satisfy"),
], ids=["empty-window", "equal-percentiles"])
def test_an_empty_window_or_percentile_range_is_refused_when_built(kwargs, match):
    """A window of no width would divide by zero on every CT, equal percentiles on every MR: refused when the
    transforms are built, before any volume is read."""
    with pytest.raises(ValueError, match=match):
        ModalityIntensity(**kwargs)
    with pytest.raises(ValueError, match=match):
        volume_transforms(**kwargs)


# ------------------------------------------------------------------------------------------ augmentation
def test_the_augmentation_shift_follows_each_axis_of_a_non_square_slice():
    """Slices of 112 x 48 pixels are shifted by up to 6% of each axis: up to 6.7 pixels along the long one and
    2.9 along the short one (shifts swapped between the axes moved a structure out of a short slice)."""
    aug = slice_augmentation(rotate_degrees=0.0, scale=0.0, translate=0.06, slice_size=(112, 48), prob=1.0)
    aug.set_random_state(3)
    label = torch.zeros(1, 112, 48)
    label[0, 54:58, 22:26] = 1.0  # centred at (55.5, 23.5)
    shifts = []
    for _ in range(60):
        out = aug({"image": label.clone(), "label": label.clone()})["label"][0]
        xs, ys = torch.nonzero(out > 0.5, as_tuple=True)
        shifts.append((float(xs.float().mean()) - 55.5, float(ys.float().mean()) - 23.5))
    dx, dy = (max(abs(s[i]) for s in shifts) for i in range(2))
    assert 4.0 < dx <= 6.72 + 0.5, shifts
    assert dy <= 2.88 + 0.5, shifts
