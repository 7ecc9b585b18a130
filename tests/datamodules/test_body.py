"""The crop to the body (`datamodules.transforms.body`): which voxels are body, which box is kept, and that every
scan is centred on its own body while a scan already cut to it is left as it was."""

import numpy as np
import pytest
import torch

from datamodules.synthetic.demo import write_nifti
from datamodules.transforms.body import body_box, crop_box
from datamodules.transforms.volume import volume_transforms


def test_body_box_keeps_large_components_and_drops_specks():
    vol = np.zeros((100, 80, 6), np.float32)
    vol[10:40, 20:60] = 0.5  # one leg
    vol[55:85, 20:60] = 0.4  # the other, apart from it
    vol[95, 2, 3] = 1.0  # a bright speck (noise, a coil's marker) far out
    assert body_box(vol) == (10, 85, 20, 60)
    assert body_box(vol, min_share=0.6) == (10, 85, 20, 60)  # the two legs are alike in size
    vol[5:95, 66:68] = 0.3  # a couch's shell under the legs: 2 mm thick, 15% of a leg's voxels, apart from them
    assert body_box(vol) == (10, 85, 20, 60)  # eroded away: thinner than 8 mm
    vol[5:95, 60:62] = 0.3  # touching them, it widens the box by its own thickness only, not by its length
    assert body_box(vol) == (10, 85, 20, 62)
    assert body_box(vol, spacing=(4.0, 4.0)) == (9, 86, 20, 62)  # one step at 4 mm pixels, widened back by one
    assert body_box(np.zeros((5, 5, 2))) is None
    assert body_box(np.full((5, 5, 2), 0.04)) is None  # below the threshold: air


def test_crop_box_widens_by_the_margin_keeps_labels_and_leaves_near_full_axes_alone():
    shape, spacing = (200, 100), (2.0, 2.0)
    assert crop_box(shape, spacing, (50, 100, 5, 95)) == (45, 105, 0, 100)  # 10 mm = 5 pixels; y spans 90%+: kept
    assert crop_box(shape, spacing, (50, 100, 30, 60), keep=[(110, 120, 40, 50)]) == (45, 125, 25, 65)
    assert crop_box(shape, spacing, (0, 200, 0, 100)) == (0, 200, 0, 100)
    assert crop_box(shape, spacing, None) == (0, 200, 0, 100)
    assert crop_box(shape, (0.5, 4.0), (50, 100, 30, 60)) == (30, 120, 27, 63)  # the margin is in mm
    assert crop_box(shape, spacing, (50, 100, 30, 60), fit=(200, 64)) == (0, 200, 25, 65)  # x fits: not cut


def _ct(tmp_path, name, body_at, grid=(100, 90, 8)):
    """A CT of air with a 40 HU body of 40 x 30 voxels of 3 mm at ``body_at``, and a 200 HU organ in it."""
    hu = np.full(grid, -1000.0, np.float32)
    lab = np.zeros(grid, np.uint8)
    x, y = body_at
    hu[x : x + 40, y : y + 30] = 40.0
    hu[x + 10 : x + 20, y + 10 : y + 20, 2:6] = 200.0
    lab[x + 10 : x + 20, y + 10 : y + 20, 2:6] = 1
    affine = np.diag([3.0, 3.0, 5.0, 1.0])
    return write_nifti(hu, affine, tmp_path / f"{name}.nii.gz"), write_nifti(lab, affine, tmp_path / f"{name}_l.nii.gz")


def test_every_scan_is_centred_on_its_own_body(tmp_path):
    """The same body at two places of a wide grid of air gives the same slices; before the crop to the body, the
    slices were cut around the grid's centre, and one of them lost the body's flank."""
    tf = volume_transforms(spacing=(3.0, 3.0), slice_size=(48, 48))
    out = []
    for name, at in (("centre", (30, 30)), ("corner", (5, 55))):
        image, label = _ct(tmp_path, name, at)
        d = tf({"image": str(image), "label": str(label), "modality": "CT"})
        out.append((d["image"].as_tensor(), d["label"].as_tensor()))
    assert out[0][0].shape == (1, 48, 48, 8)
    assert torch.equal(out[0][0], out[1][0]) and torch.equal(out[0][1], out[1][1])
    assert int(out[0][1].sum()) == 10 * 10 * 4  # every labelled voxel kept
    assert float(out[0][0][0, :, :, 0].sum()) == pytest.approx(40 * 30 * 0.58, rel=1e-5)  # the whole body: 40 HU


def test_a_scan_already_cut_to_its_body_is_not_changed(tmp_path):
    """A body filling most of its grid (the cropped files of benchmarks/real) gets the slices it got before."""
    hu = np.full((60, 50, 4), -1000.0, np.float32)
    hu[2:58, 3:48] = 40.0  # 10 mm of margin reaches past the grid on every side
    path = write_nifti(hu, np.diag([2.0, 2.0, 5.0, 1.0]), tmp_path / "tight.nii.gz")
    for size in (32, 64):  # slices smaller than the grid (cut around the body's centre) or larger (padded)
        tf = volume_transforms(spacing=(2.0, 2.0), slice_size=(size, size), keys=("image",))
        crop = tf({"image": str(path), "modality": "CT"})["image"].applied_operations[-2]
        assert crop["class"] == "CropForeground" and crop["extra_info"]["cropped"] == [0, 0, 0, 0, 0, 0]


def test_a_grid_that_fits_in_the_slices_is_not_cropped(tmp_path):
    """Nothing of it would be cut: the demo's scans get the slices they got before the crop to the body existed."""
    image, _ = _ct(tmp_path, "small", (5, 55))  # 300 x 270 mm, the body in a corner
    for size, cut in (((112, 112), [0, 0, 0, 0]), ((112, 48), [0, 0, 51, 1]), ((96, 96), [1, 51, 0, 0])):
        tf = volume_transforms(spacing=(3.0, 3.0), slice_size=size, keys=("image",))
        crop = tf({"image": str(image), "modality": "CT"})["image"].applied_operations[-2]
        assert crop["extra_info"]["cropped"][:4] == cut
