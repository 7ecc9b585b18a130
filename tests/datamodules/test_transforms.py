import nibabel as nib
import numpy as np
import pytest
import torch

from datamodules.synthetic.demo import write_dicom_series, write_nifti
from datamodules.transforms.volume import ModalityIntensity, volume_transforms


def _volume(seed=0):
    rng = np.random.default_rng(seed)
    vol = rng.normal(40, 30, size=(40, 36, 12)).astype(np.float32)
    vol[10:25, 8:20, 3:9] += 300
    lbl = np.zeros(vol.shape, np.uint8)
    lbl[10:25, 8:20, 3:9] = 2
    return vol, lbl


def test_dicom_and_nifti_give_the_same_arrays(tmp_path):
    vol, lbl = _volume()
    # an LPS-like, non-unit grid: the DICOM path converts LPS<->RAS, the NIfTI path reads the affine as is
    affine = np.array([[-3.0, 0, 0, 60.0], [0, -3.5, 0, 40.0], [0, 0, 5.0, -20.0], [0, 0, 0, 1]])
    files = write_dicom_series(np.round(vol), affine, tmp_path / "dcm", header={"PatientID": "X", "PatientName": "A^B"},
                               modality="CT", reverse=True, shuffle_names=True, rng=np.random.default_rng(1))
    write_nifti(np.round(vol), affine, tmp_path / "img.nii.gz")
    write_nifti(lbl, affine, tmp_path / "lbl.nii.gz")
    from datamodules.io.dicom import DicomSeriesReader

    ordered = DicomSeriesReader().read(str(tmp_path / "dcm"))  # folder: grouped and ordered by geometry
    assert ordered is not None and len(files) == 12
    tf = volume_transforms(spacing=(4.0, 4.0), slice_size=(32, 32))
    a = tf({"image": str(tmp_path / "dcm"), "label": str(tmp_path / "lbl.nii.gz"), "modality": "CT"})
    b = tf({"image": str(tmp_path / "img.nii.gz"), "label": str(tmp_path / "lbl.nii.gz"), "modality": "CT"})
    assert a["image"].shape == b["image"].shape == (1, 32, 32, 12)
    assert torch.allclose(a["image"].as_tensor(), b["image"].as_tensor(), atol=1e-4)
    assert torch.equal(a["label"].as_tensor(), b["label"].as_tensor())
    assert np.allclose(a["image"].affine, b["image"].affine, atol=1e-4)
    # the organ is where the label says: bright inside the mask
    img, m = b["image"][0], b["label"][0] == 2
    assert img[m].mean() > img[~m].mean() + 0.3


def test_intensity_errors_name_the_problem():
    t = ModalityIntensity()
    bad = torch.zeros(1, 4, 4, 4)
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        t(bad, "CT")
    with pytest.raises(ValueError, match="constant image"):
        t(torch.full((1, 4, 4, 4), 7.0), "MR")
    ct = t(torch.tensor([-1000.0, 0.0, 1000.0]), "CT")
    assert torch.allclose(ct, torch.tensor([0.0, 0.5, 1.0]))


def test_nifti_orientation_is_normalised_to_ras(tmp_path):
    vol, lbl = _volume(1)
    ras = np.diag([4.0, 4.0, 5.0, 1.0])
    write_nifti(vol, ras, tmp_path / "ras.nii.gz")
    flipped = ras @ np.array([[-1, 0, 0, vol.shape[0] - 1], [0, -1, 0, vol.shape[1] - 1], [0, 0, 1, 0], [0, 0, 0, 1]])
    write_nifti(vol[::-1, ::-1].copy(), flipped, tmp_path / "lps.nii.gz")
    assert nib.aff2axcodes(flipped) == ("L", "P", "S")
    tf = volume_transforms(spacing=(4.0, 4.0), slice_size=(32, 32), keys=("image",))
    a = tf({"image": str(tmp_path / "ras.nii.gz"), "modality": "MR"})["image"]
    b = tf({"image": str(tmp_path / "lps.nii.gz"), "modality": "MR"})["image"]
    assert torch.allclose(a.as_tensor(), b.as_tensor(), atol=1e-5)


def test_a_refused_dicom_series_is_never_read_by_another_reader(tmp_path, monkeypatch):
    """MONAI's LoadImaged would fall back to every other registered reader (ITK, when installed) after ours
    refused a series; the loader raises our reader's reason instead, even with a permissive reader registered."""
    from monai.data import ITKReader

    from datamodules.io.dicom import DicomSeriesError
    from tests.datamodules.dicom_fixtures import edit, phantom, write_series

    paths = write_series(tmp_path / "s", phantom(shape=(8, 8, 6)))
    for p in paths:
        edit(p, lambda ds: setattr(ds, "PhotometricInterpretation", "XYZ123"))
    calls = []
    monkeypatch.setattr(ITKReader, "read", lambda self, *a, **k: calls.append(a) or pytest.fail("ITK was tried"))
    with pytest.raises(RuntimeError) as e:
        volume_transforms(keys=("image",))({"image": str(tmp_path / "s"), "modality": "CT"})
    cause = e.value
    while cause.__cause__ is not None:
        cause = cause.__cause__
    assert isinstance(cause, DicomSeriesError) and "PhotometricInterpretation=XYZ123" in str(cause)
    assert not calls


@pytest.mark.parametrize("source", ["dicom_lps_reversed", "nifti_padded", "nifti_cropped", "nifti_oblique", "nifti_tilted",
                                    "nifti_body_off_centre"])
def test_to_source_grid_equals_monais_invertd_slab_by_slab(tmp_path, source, monkeypatch):
    """The map on the preprocessed grid goes back to the file's grid as MONAI's Invertd takes it (linear), in
    slabs: padded or cropped to the slice size, LPS or RAS files, reversed DICOM slices, an oblique grid, a body
    off the centre of a grid of air (cropped to the body, then to the slice size)."""
    from monai.transforms import Compose, Invertd

    from datamodules.transforms import volume
    from datamodules.transforms.volume import to_source_grid

    slabs, by_slice = [], []
    resample, per_slice = volume._resample_affine, volume._resample_slices
    monkeypatch.setattr(volume, "_resample_affine", lambda *a: slabs.append(a[-1]) or resample(*a))
    monkeypatch.setattr(volume, "_resample_slices", lambda *a: by_slice.append(a[-1]) or per_slice(*a))
    vol, _ = _volume()
    affines = {
        "dicom_lps_reversed": np.array([[-3.0, 0, 0, 60.0], [0, -3.5, 0, 40.0], [0, 0, 5.0, -20.0], [0, 0, 0, 1]]),
        "nifti_padded": np.diag([3.0, 3.5, 5.0, 1.0]),
        "nifti_cropped": np.diag([-0.9, 0.8, 2.5, 1.0]),
        "nifti_oblique": np.array([[2.9, 0.6, 0, 5.0], [-0.7, 3.4, 0, 4.0], [0, 0, 5.0, -2.0], [0, 0, 0, 1]]),
        # slices tilted against the axial plane, and sheared: the working grid keeps the slices 5.14 mm apart along
        # their normal (the sheared column is 5.14), so each slice still lies on one working slice
        "nifti_tilted": np.array([[3.0, 0, 1.2, 5.0], [0, 3.5, 0, 4.0], [-0.6, 0, 5.0, -2.0], [0, 0, 0, 1]]),
        "nifti_body_off_centre": np.diag([3.0, 3.5, 5.0, 1.0]),
    }
    affine = affines[source]
    if source == "nifti_body_off_centre":
        body, vol = vol, np.full((80, 60, vol.shape[2]), -1000.0, np.float32)
        vol[5:45, 10:46] = body
    if source.startswith("dicom"):
        write_dicom_series(np.round(vol), affine, tmp_path / "dcm", header={"PatientID": "X"}, modality="CT",
                           reverse=True, rng=np.random.default_rng(1))
        path = str(tmp_path / "dcm")
    else:
        path = write_nifti(np.round(vol), affine, tmp_path / "img.nii.gz")
    slice_size = (8, 8) if source == "nifti_cropped" else (32, 32)
    tf = volume_transforms(spacing=(4.0, 4.0), slice_size=slice_size, keys=("image",))
    data = tf({"image": str(path), "modality": "CT"})
    pre = data["image"]
    values = torch.rand(pre.shape[1:], generator=torch.Generator().manual_seed(0))
    prob = pre.clone()
    prob.set_array(values.unsqueeze(0))
    expected = Invertd("prob", transform=Compose(tf.transforms), orig_keys="image", nearest_interp=False)(
        {**data, "prob": prob})["prob"]
    for slab in (1, 5):  # and twice: the preprocessed image is not changed by the first call
        got, affine_out = to_source_grid(pre, values, tf, slab=slab)
        assert got.shape == tuple(expected.shape[1:]) == vol.shape
        np.testing.assert_allclose(got, np.asarray(expected[0]), atol=1e-5)
        np.testing.assert_allclose(affine_out, np.asarray(expected.affine), atol=1e-4)
    assert slabs == [1, 5]  # the slab path, not MONAI's Invertd
    if source == "nifti_body_off_centre":  # cut to the body (37 x 40 of 60 x 54 pixels at 4 mm), then to 32 x 32
        assert [op["class"] for op in pre.applied_operations][-2:] == ["CropForeground", "ResizeWithPadOrCrop"]
        assert pre.applied_operations[-2]["extra_info"]["cropped"][:4] == [0, 23, 5, 9]
        assert got[50:].max() == 0.0  # nothing back where the body crop cut only air
    # each output slice from one preprocessed slice (bilinear, a tenth of the work); before 2026-12-07 the sheared,
    # tilted grid was resampled to slices of the sheared column's length, between the acquired ones (the 3D path)
    assert by_slice == [1, 5]


def test_to_source_grid_takes_the_slab_path_for_a_chain_with_a_label_map(tmp_path, monkeypatch):
    """`evaluate` preprocesses image and label together (the chain ends in `CastLabeld`): the map still goes back
    slab by slab, not through MONAI's whole-grid `Invertd`, with the same values."""
    from datamodules.transforms import volume
    from datamodules.transforms.volume import to_source_grid

    slabs = []
    resample = volume._resample_affine
    monkeypatch.setattr(volume, "_resample_affine", lambda *a: slabs.append(a[-1]) or resample(*a))
    vol, lbl = _volume()
    image = write_nifti(np.round(vol), np.diag([3.0, 3.5, 5.0, 1.0]), tmp_path / "img.nii.gz")
    label = write_nifti(lbl, np.diag([3.0, 3.5, 5.0, 1.0]), tmp_path / "lbl.nii.gz")
    pair = volume_transforms(spacing=(4.0, 4.0), slice_size=(32, 32))
    alone = volume_transforms(spacing=(4.0, 4.0), slice_size=(32, 32), keys=("image",))
    pre = pair({"image": str(image), "label": str(label), "modality": "CT"})["image"]
    values = torch.rand(pre.shape[1:], generator=torch.Generator().manual_seed(0))
    got, _ = to_source_grid(pre, values, pair)
    assert slabs == [8]
    expected, _ = to_source_grid(alone({"image": str(image), "modality": "CT"})["image"], values, alone)
    np.testing.assert_allclose(got, expected, atol=1e-6)


def test_the_per_slice_resampling_equals_the_trilinear_one(monkeypatch):
    """`_resample_slices` against the general trilinear path: flipped slice order, slices past the end, an in-plane
    drift along z (it was left out: 2.3e-2 on random values over 300 slices), and a z offset half-way between
    slices, which must take the trilinear path."""
    from datamodules.transforms import volume

    values = torch.rand(24, 20, 9, generator=torch.Generator().manual_seed(0))
    a = np.diag([0.8, 0.8, 3.0, 1.0])
    a[:3, 3] = [-5, 7, 11]
    plain = np.eye(4)
    plain[0, 0] = plain[1, 1] = 0.7
    plain[:2, 3] = [-1.3, 0.4]
    flipped = plain.copy()
    flipped[2, 2], flipped[2, 3] = -1.0, 12.0  # reversed, and 3 slices past the end
    drift = plain.copy()
    drift[0, 2] = 9e-5
    half = plain.copy()
    half[2, 3] = 2.5
    for m, shape, per_slice in ((flipped, (30, 26, 9), True), (drift, (30, 26, 300), True), (half, (30, 26, 9), False)):
        assert volume._slice_to_slice(m, shape) is per_slice
        fast = volume._resample_affine(values, a, shape, a @ m, 4)
        with monkeypatch.context() as p:
            p.setattr(volume, "_slice_to_slice", lambda *args: False)
            slow = volume._resample_affine(values, a, shape, a @ m, 4)
        np.testing.assert_allclose(fast, slow, atol=1e-5)


def test_a_gantry_tilted_grid_keeps_its_slices_and_a_one_slice_map_comes_back_to_that_slice(tmp_path):
    """A review: 5 mm slices each shifted 1.5 mm in-plane (a 17 degree gantry tilt) were resampled to 15 slices of
    5.22 mm (the sheared column's length), so every working slice lay between two acquired ones and a mask came back
    smeared over two slices. The working grid keeps the 16 slices 5 mm apart, and a map on one working slice comes
    back on exactly its acquired slice."""
    from datamodules.transforms.volume import slice_separation, to_source_grid

    vol = np.full((48, 48, 16), 40.0, np.float32)
    vol[10:38, 10:38] = 60.0
    vol[20:28, 20:28, 8] = 300.0  # one bright acquired slice
    affine = np.diag([1.0, 1.0, 5.0, 1.0])
    affine[1, 2] = 1.5  # each slice 1.5 mm anterior of the one below
    assert slice_separation(affine) == pytest.approx(5.0) and slice_separation(np.diag([1.0, 1.0, 5.0, 1.0])) is None
    path = write_nifti(vol, affine, tmp_path / "tilted.nii.gz")
    tf = volume_transforms(spacing=(1.0, 1.0), slice_size=(48, 48), keys=("image",))
    pre = tf({"image": str(path), "modality": "CT"})["image"]
    assert pre.shape[-1] == 16 and np.allclose(np.asarray(pre.affine)[:3, 2], [0.0, 0.0, 5.0], atol=1e-6)
    bright = pre[0].flatten(0, 1).amax(0)
    # the bright slice alone, not blended into its neighbours (which stay at the body's value)
    assert int(bright.argmax()) == 8 and float(bright[7]) == float(bright[9]) == pytest.approx(float(bright[0]))
    one = torch.zeros(pre.shape[1:])
    one[..., 8] = 1.0
    back, back_affine = to_source_grid(pre, one, tf)
    np.testing.assert_allclose(back_affine, affine, atol=1e-6)
    per_slice = back.reshape(-1, back.shape[-1]).max(0)
    assert per_slice[8] == pytest.approx(1.0, abs=1e-5) and np.abs(np.delete(per_slice, 8)).max() < 1e-5


def test_domain_randomisation_adds_a_bias_field_a_remapping_and_a_blur_seeded_and_labels_untouched():
    """`slice_augmentation(randomise_domain=True)` (the datamodule's ``domain_randomisation``): seeded like the rest,
    the label map moved only by the geometric part, and the image's values no longer an affine map of the plain
    augmentation's (a bias field or a remapping changed them)."""
    import torch

    from datamodules.transforms.volume import slice_augmentation

    image = torch.linspace(0, 1, 32 * 32).reshape(1, 32, 32)
    label = (image > 0.5).float()
    outs = []
    for domain in (False, True, True):
        aug = slice_augmentation(slice_size=(32, 32), randomise_domain=domain)
        aug.set_random_state(7)
        outs.append([aug({"image": image.clone(), "label": label.clone()}) for _ in range(8)])
    plain, first, again = outs
    assert all(torch.equal(a["image"], b["image"]) for a, b in zip(first, again, strict=True))
    assert all(torch.equal(a["label"], b["label"]) for a, b in zip(plain, first, strict=True))
    assert set(torch.cat([o["label"].flatten() for o in first]).unique().tolist()) <= {0.0, 1.0}
    changed = 0
    for p, d in zip(plain, first, strict=True):
        x, y = p["image"].flatten().double(), d["image"].flatten().double()
        fit = torch.linalg.lstsq(torch.stack([x, torch.ones_like(x)], 1), y[:, None]).solution
        changed += int((torch.stack([x, torch.ones_like(x)], 1) @ fit - y[:, None]).abs().max() > 1e-3)
    assert changed >= 4


def test_mr_is_scaled_between_the_percentiles_of_its_non_zero_voxels():
    """An MR volume with zero-filled background: its percentiles are taken over the tissue (the non-zero voxels),
    so the tissue spans [0, 1] however much air the field of view holds."""
    img = torch.zeros(1, 20, 20, 4)
    img[:, 10:] = torch.linspace(100.0, 200.0, 10 * 20 * 4).reshape(1, 10, 20, 4)
    out = ModalityIntensity(mr_percentiles=(1.0, 99.0))(img, "MR")
    tissue = out[:, 10:]
    assert float(tissue.min()) == 0.0 and float(tissue.max()) == 1.0
    assert float(tissue.median()) == pytest.approx(0.5, abs=0.02)


def test_item_augmentation_applies_its_gamma():
    from datamodules.transforms.augment import RandItemAugment

    x = torch.rand(2, 1, 8, 8)
    p = {"gamma": np.array([2.0, 0.5]), "factor": np.array([1.0, 1.0]), "noise": np.zeros(x.shape, np.float32)}
    out = RandItemAugment.intensity(x, p)
    torch.testing.assert_close(out[0], x[0] ** 2)
    torch.testing.assert_close(out[1], x[1] ** 0.5)
