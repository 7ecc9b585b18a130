"""The crop to the body (`datamodules.transforms.body`): which voxels are body, which box is kept, and that every
scan is centred on its own body while a scan already cut to it, or one whose grid fits in the slices, is left as
it was."""

import logging
import re

import numpy as np
import pytest
import torch

from datamodules.synthetic.demo import write_nifti
from datamodules.transforms.body import body_box, body_foreground, find_body
from datamodules.transforms.volume import to_source_grid, volume_transforms


def test_body_box_keeps_large_parts_and_drops_specks_and_thin_layers():
    fg = np.zeros((100, 80, 6), bool)
    fg[10:40, 20:60] = True  # one leg
    fg[55:85, 20:60] = True  # the other, apart from it
    fg[95, 2, 3] = True  # a speck of noise far out
    assert body_box(fg) == (10, 85, 20, 60)
    assert body_box(fg, min_share=0.6) == (10, 85, 20, 60)  # the two legs are alike in size
    fg[5:95, 66:68] = True  # a couch's shell under the legs: 2 mm thick, apart from them
    assert body_box(fg) == (10, 85, 20, 60)  # eroded away: thinner than 8 mm
    fg[5:95, 60:62] = True  # touching them, it widens the box by its own thickness only, not by its length
    assert body_box(fg) == (10, 85, 20, 62)
    fg[0:16, 64:80, 2] = True  # a hand beside the body in one slice, at the edge of the grid: kept
    assert body_box(fg) == (0, 85, 20, 80)
    assert body_box(np.zeros((5, 5, 2), bool)) is None


def test_the_body_is_found_in_the_scans_own_values():
    """CT by HU, whatever window the model uses; MR from its zeroed or noisy background."""
    hu = np.array([-1000.0, -600.0, -400.0, -100.0, 40.0, 1000.0])
    assert body_foreground(hu, "CT").tolist() == [False, False, True, True, True, True]
    mr = np.concatenate([np.zeros(500), np.linspace(20, 1000, 500)])  # a zeroed background, tissue 2-100%
    assert not body_foreground(mr, "MR")[:500].any() and body_foreground(mr, "MR")[500:].all()
    assert not body_foreground(np.zeros(10), "MR").any()


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


def _cut(data) -> list[int]:
    op = next(o for o in data["image"].applied_operations if o["class"] == "CropForeground")
    return [int(v) for v in op["extra_info"]["cropped"][:4]]


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
        assert _cut(tf({"image": str(path), "modality": "CT"})) == [0, 0, 0, 0]


def test_a_grid_that_fits_in_the_slices_is_not_cropped(tmp_path):
    """Nothing of a grid that fits would be cut: the demo's scans get the slices they got before the crop to the
    body existed. An axis that does not fit is cut to the body and its 10 mm margin (4 voxels)."""
    image, _ = _ct(tmp_path, "small", (5, 55))  # 300 x 270 mm; the body x 5-45, y 55-85
    for size, cut in (((112, 112), [0, 0, 0, 0]), ((112, 48), [0, 0, 51, 1]), ((64, 96), [1, 51, 0, 0])):
        tf = volume_transforms(spacing=(3.0, 3.0), slice_size=size, keys=("image",))
        assert _cut(tf({"image": str(image), "modality": "CT"})) == cut


def test_a_narrow_window_or_a_dim_side_does_not_cut_the_body(tmp_path):
    """The body is found in HU, not in the window (a brain window hid the fat around a nodule in the flank, which
    was cut); an MR coil's dim far side is body, and an evaluation's query is cropped without its label."""
    hu = np.full((110, 110, 4), -1000.0, np.float32)
    hu[20:90, 20:90] = -100.0  # fat
    hu[20:90, 20:21] = hu[20:21, 20:90] = 40.0  # a thin skin line
    hu[45:65, 45:65] = 40.0  # muscle
    hu[22:30, 60:68] = 40.0  # a nodule in the flank fat
    lab = np.zeros(hu.shape, np.uint8)
    lab[22:30, 60:68] = 1
    affine = np.diag([2.0, 2.0, 5.0, 1.0])
    image = write_nifti(hu, affine, tmp_path / "fat.nii.gz")
    tf = volume_transforms(spacing=(2.0, 2.0), slice_size=(96, 96), ct_window=(0.0, 80.0), keys=("image",))
    d = tf({"image": str(image), "modality": "CT"})
    back, _ = to_source_grid(d["image"], torch.ones(d["image"].shape[1:]), tf)
    assert (back[lab > 0] > 0.5).all()
    # a label beyond the body (here in the air) widens a support's crop, and not an evaluation's query's
    lab[100:104, 50:54] = 2
    label = write_nifti(lab, affine, tmp_path / "fat_l.nii.gz")
    item = {"image": str(image), "label": str(label), "modality": "CT"}
    support = volume_transforms(spacing=(2.0, 2.0), slice_size=(96, 96))(item)
    query = volume_transforms(spacing=(2.0, 2.0), slice_size=(96, 96), body_keeps_labels=False)(item)
    assert int((support["label"] == 2).sum()) == 16 * 4 and _cut(support)[1] < _cut(query)[1]
    assert _cut(query) == _cut(d)

    xx = np.arange(200)[:, None] * np.ones((1, 160))
    yy = np.ones((200, 1)) * np.arange(160)[None, :]
    body = ((xx - 100) / 80.0) ** 2 + ((yy - 80) / 50.0) ** 2 <= 1
    gain = np.exp(np.log(0.03) * (180 - xx) / 160.0)  # a surface coil at high x: 3% at the far side
    noise = np.abs(np.random.default_rng(0).normal(0, 8, (200, 160))) + 1.0
    organ = body & ((xx - 38) ** 2 + (yy - 80) ** 2 <= 64)
    mr = np.where(body, 800 * gain, noise)
    mr = np.repeat(np.where(organ, 0.7 * mr, mr)[..., None], 4, 2).astype(np.float32)
    organ3 = np.repeat(organ[..., None], 4, 2)
    path = write_nifti(mr, affine, tmp_path / "coil.nii.gz")
    tf = volume_transforms(spacing=(2.0, 2.0), slice_size=(176, 176), keys=("image",))
    d = tf({"image": str(path), "modality": "MR"})
    back, _ = to_source_grid(d["image"], torch.ones(d["image"].shape[1:]), tf)
    assert (back[organ3] > 0.5).all()
    assert find_body(mr, (2.0, 2.0), "MR")[:2] == pytest.approx((20, 181), abs=2)


def test_a_body_filling_most_of_an_off_centre_grid_is_not_cut_by_the_slices(tmp_path):
    """A box of over nine tenths of the grid left the grid uncut, and the slices, cut around the grid's centre,
    then cut an off-centre body's edge (a review). Such a box is now cut to when the centred slices would not
    hold it."""
    hu = np.full((100, 40, 4), -1000.0, np.float32)
    hu[0:92, 5:35] = 40.0  # against one edge of the grid
    path = write_nifti(hu, np.diag([3.0, 3.0, 5.0, 1.0]), tmp_path / "edge.nii.gz")
    tf = volume_transforms(spacing=(3.0, 3.0), slice_size=(96, 48), keys=("image",))
    d = tf({"image": str(path), "modality": "CT"})
    assert _cut(d) == [0, 4, 0, 0]
    assert float(d["image"][0, :, :, 0].sum()) == pytest.approx(92 * 30 * 0.58, rel=1e-5)  # all of it


def test_the_scales_field_and_the_crop_find_the_same_body(tmp_path):
    """A review: the field `--scale structure` sizes its slices to was measured on the support's own grid, the crop
    at the working spacing, and an 8 mm couch eroded at one and kept at the other cut 958 of 1552 voxels of an
    organ at the flank of an off-centre body. Both now take the box `find_body` finds on the scan's own grid."""
    from imaging_meta.evaluation.scans import supports_preprocessing

    sp, n = 0.7, 700
    xx, yy = np.meshgrid((np.arange(n) - n / 2) * sp, (np.arange(n) - n / 2) * sp, indexing="ij")
    body = ((xx - 40) / 180) ** 2 + ((yy - 30) / 105) ** 2 <= 1  # 360 x 210 mm, off the grid's centre
    organ = (xx - 190) ** 2 + (yy - 40) ** 2 <= 11 ** 2  # 22 mm, at the right flank
    couch = (np.abs(xx + 20) <= 220) & (yy <= -95) & (yy > -103)  # an 8 mm shell, 460 mm wide, under the body
    hu = np.full((n, n), -1000.0)
    hu[body], hu[organ], hu[couch] = 40.0, 60.0, 100.0
    affine = np.diag([sp, sp, 5.0, 1.0])
    image = write_nifti(np.repeat(hu[..., None], 2, 2).astype(np.float32), affine, tmp_path / "couch.nii.gz")
    label = write_nifti(np.repeat(organ[..., None], 2, 2).astype(np.uint8), affine, tmp_path / "couch_l.nii.gz")
    pre = supports_preprocessing({"spacing": [4.5, 4.5], "slice_size": [80, 80], "ct_window": [-250.0, 250.0],
                                  "mr_percentiles": [1.0, 99.0]}, [(str(image), str(label), 1, "CT")], "structure")
    assert pre["slice_size"] == [128, 128] and pre["spacing"][0] < 3.0  # the body's 380 mm, not the 490 mm grid
    tf = volume_transforms(pre["spacing"], pre["slice_size"], keys=("image",))
    d = tf({"image": str(image), "modality": "CT"})
    kept, _ = to_source_grid(d["image"], torch.ones(d["image"].shape[1:]), tf)
    assert (kept[..., 0][body] > 0.5).all()


def test_on_mr_a_thin_bright_layer_beyond_a_dark_one_is_body(tmp_path):
    """Skin beyond fat that a fat-suppressed MR makes dark, with a lesion in the dark fat: eroding thin layers (for
    a CT's couch) took the skin and the lesion out of a query's crop (a review). On MR nothing is eroded; the
    query's crop, found from its image alone, keeps the lesion."""
    from imaging_meta.evaluation.scans import Scan, load_structure

    x, y = np.meshgrid(np.arange(320) - 159.5, np.arange(320) - 159.5, indexing="ij")
    outer, core = (x / 130) ** 2 + (y / 95) ** 2 < 1, (x / 105) ** 2 + (y / 70) ** 2 < 1
    skin = outer & ~((x / 127) ** 2 + (y / 92) ** 2 < 1)
    lesion = (x + 30) ** 2 + (y - 89) ** 2 < 4.5**2  # in the dark fat, 19 mm beyond the core
    plane = np.select([lesion, core, skin, outer], [600.0, 250.0, 200.0, 6.0], 0.0)
    rng = np.random.default_rng(0)
    values = np.abs(plane[..., None] + rng.normal(0, 5, (320, 320, 8)) + 1j * rng.normal(0, 5, (320, 320, 8)))
    affine = np.diag([1.0, 1.0, 4.0, 1.0])  # a magnitude image: Rician noise in the background
    image = write_nifti(values.astype(np.float32), affine, tmp_path / "mr.nii.gz")
    label = write_nifti(np.repeat(lesion[..., None], 8, 2).astype(np.uint8), affine, tmp_path / "mr_l.nii.gz")
    box = find_body(values, (1.0, 1.0, 4.0), "MR")
    assert box is not None and box[2] <= 160 - 92 and box[3] >= 160 + 92  # the skin, both sides
    pre = dict(spacing=[1.0, 1.0], slice_size=[256, 256], ct_window=[-250, 250], mr_percentiles=[1, 99])
    scan = Scan(str(image), str(label), 1, "MR")
    support, query = load_structure(scan, pre), load_structure(scan, pre, query=True)
    assert int(query.pre["struct"].sum()) == int(support.pre["struct"].sum()) > 0
    # on CT the couch's thin shells are still eroded away (test_body_box_keeps_large_parts_...)
    ct = np.where(np.repeat(outer[..., None], 2, 2), 40.0, -1000.0)
    ct[:, 250:252] = 100.0  # a 2 mm shell under the body
    assert find_body(ct, (1.0, 1.0, 4.0), "CT")[3] <= 160 + 95 + 1


def test_a_query_structure_outside_the_body_is_named_as_cropped_away(tmp_path, caplog):
    """An evaluation query's label that the crop to its body (found from its image alone) leaves out: the error
    says that the crop removed it, not that the scan has no such structure (a review)."""
    import nibabel as nib

    from imaging_meta.evaluation.scans import Scan, load_structure

    image, label = _ct(tmp_path, "q", (5, 5))
    lab = np.asarray(nib.load(label).dataobj)
    lab[:] = 0
    lab[85:92, 75:85, 2:6] = 1  # in the air, 60 mm and more beyond the body
    label = write_nifti(lab, nib.load(label).affine, tmp_path / "q_far.nii.gz")
    pre = dict(spacing=[3.0, 3.0], slice_size=[96, 96], ct_window=[-250, 250], mr_percentiles=[1, 99])
    scan = Scan(str(image), str(label), 1, "CT")
    assert load_structure(scan, pre).pre["struct"].any()  # a support keeps its labelled voxels
    with caplog.at_level(logging.WARNING, logger="imaging_meta.evaluation.scans"):
        assert not load_structure(scan, pre, query=True).pre["struct"].any()  # scored as missed, not an error
    assert re.search(r"q_far\.nii\.gz: the structure \(value 1, 280 voxels in the file\) is not left after "
                     r"preprocessing: the working slices \(.*\) or the crop to the body.*scored as missed", caplog.text)
