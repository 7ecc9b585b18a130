import sys

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from datamodules.transforms.superpixels import (
    DEFAULT_SETTINGS,
    Superpixelsd,
    body_mask,
    filter_superpixels,
    slice_superpixels,
    superpixel_table,
    volume_superpixels,
)

H = W = 80
YY, XX = np.mgrid[:H, :W]
BLOBS = ((28, 30, 9, 0.85), (50, 52, 8, 0.65), (30, 55, 6, 0.15))  # (row, col, radius, intensity)


def _disc(r):
    return (YY - 40) ** 2 + (XX - 40) ** 2 < r * r


def _phantom(blobs=BLOBS, noise=0.01, seed=0):
    """A disc "body" (0.4) on air (0), with blobs of other intensities inside; (H, W) in [0, 1]."""
    s = np.where(_disc(34), 0.4, 0.0)
    for cy, cx, r, v in blobs:
        s[(YY - cy) ** 2 + (XX - cx) ** 2 < r * r] = v
    rng = np.random.default_rng(seed)
    return np.clip(s + rng.normal(0, noise, s.shape) * (s > 0), 0, 1)


def _volume(d=6):
    vol = np.stack([_phantom(seed=z) for z in range(d)], -1)
    vol[..., 2] = 0.0  # an empty slice (e.g. outside the patient)
    return vol[None].astype(np.float32)  # (1, H, W, D)


def test_volume_superpixels_is_deterministic():
    vol = _volume()
    a, b = volume_superpixels(vol), volume_superpixels(vol)
    assert a.dtype == np.int32 and a.shape == vol.shape[1:]
    assert np.array_equal(a, b)
    assert np.array_equal(a, volume_superpixels(torch.from_numpy(vol)))  # tensor, array, with or without channel
    assert np.array_equal(a, volume_superpixels(vol[0]))


def test_blobs_become_superpixels_and_nothing_lies_outside_the_body():
    s = _phantom()
    body = body_mask(s)
    assert np.array_equal(body, _disc(34))
    sp = slice_superpixels(s)
    assert not sp[~body].any()  # the air around the disc stays 0
    for cy, cx, r, _ in BLOBS:  # each blob is (essentially) one superpixel of its own
        blob = (YY - cy) ** 2 + (XX - cx) ** 2 < r * r
        ids, counts = np.unique(sp[blob], return_counts=True)
        best = ids[np.argmax(counts)]
        assert best > 0 and counts.max() >= 0.9 * blob.sum()
        assert (sp == best).sum() <= 1.1 * blob.sum()


def test_body_mask_keeps_the_largest_component_and_fills_holes():
    s = _phantom(blobs=(), noise=0.0)
    s[_disc(8)] = 0.0  # air inside the body (lungs, bowel gas)
    s[2:5, 2:5] = 0.9  # a speck in the air, not connected to the body
    assert np.array_equal(body_mask(s), _disc(34))
    assert not body_mask(np.zeros((H, W))).any()
    with pytest.raises(ValueError, match="threshold"):
        body_mask(s, threshold=1.5)


def test_size_filtering_drops_tiny_and_huge_superpixels():
    lab = np.zeros((10, 10), np.int64)
    lab[:, :6] = 7  # 60 px: "the body"
    lab[:, 6:9] = 3  # 30 px
    lab[0, 9] = 5  # 1 px
    lab[1:, 9] = 4  # 9 px
    out = filter_superpixels(lab, min_pixels=5, max_fraction=0.5)  # body = 100 px: drop > 50 and < 5
    assert out.dtype == np.int32
    assert not out[:, :6].any() and not out[0, 9]
    assert np.array_equal(np.unique(out), [0, 1, 2])
    assert (out[:, 6:9] == 1).all() and (out[1:, 9] == 2).all()  # renumbered 1..n, raster order
    out = filter_superpixels(lab, min_pixels=10, max_fraction=1.0)  # the 9 px one goes too; 60 px stays
    assert np.array_equal(np.unique(out[lab == 7]), [1]) and not out[lab == 4].any()
    # through the whole pipeline: a uniform disc is one superpixel covering the whole body
    disc = _phantom(blobs=(), noise=0.0)
    assert not slice_superpixels(disc).any()  # > max_fraction of the body
    assert np.array_equal(slice_superpixels(disc, max_fraction=1.0), _disc(34).astype(np.int32))
    small = _phantom(blobs=((40, 40, 7, 0.9),))  # a 145 px blob
    kept = slice_superpixels(small, max_fraction=1.0)
    assert kept[40, 40] > 0 and (kept == kept[40, 40]).sum() == 145
    assert slice_superpixels(small, min_pixels=146, max_fraction=1.0)[40, 40] == 0


def test_ids_are_consecutive_per_slice_in_raster_order():
    sp = volume_superpixels(_volume())
    for z in range(sp.shape[-1]):
        s = sp[..., z]
        ids, first = np.unique(s.ravel(), return_index=True)
        assert np.array_equal(ids, np.arange(len(ids)))  # 0, 1, ..., n
        assert np.all(np.diff(first[1:]) > 0)  # id i starts before id i + 1 in raster order
    assert sp[..., 0].max() >= 4  # background tissue pieces and the three blobs
    lab = np.array([[0, 9, 9], [2, 0, 4], [2, 4, 4]])  # first pixels: 9, then 2, then 4
    assert np.array_equal(filter_superpixels(lab, min_pixels=1, max_fraction=1.0), [[0, 1, 1], [2, 0, 3], [2, 3, 3]])


class _NoLabel(dict):
    def __getitem__(self, key):
        if key == "label":
            raise AssertionError("Superpixelsd read the label")
        return super().__getitem__(key)

    def get(self, key, default=None):
        if key == "label":
            raise AssertionError("Superpixelsd read the label")
        return super().get(key, default)


def test_transform_adds_superpixels_without_reading_a_label():
    vol = _volume()
    image = MetaTensor(torch.from_numpy(vol), affine=torch.diag(torch.tensor([4.5, 4.5, 5.0, 1.0])))
    tf = Superpixelsd(keys=("image",), output_key="superpixels", min_pixels=30)
    out = tf(_NoLabel(image=image, label=object(), modality="CT"))
    sp = out["superpixels"]
    assert sp.shape == (1, H, W, 6) and sp.dtype == torch.int32
    assert np.array_equal(sp.as_tensor()[0].numpy(), volume_superpixels(vol, min_pixels=30))
    assert torch.equal(sp.affine, image.affine)  # on the image's grid
    assert out["image"] is image
    plain = Superpixelsd()({"image": torch.from_numpy(vol)})  # no label key at all, a plain tensor
    assert type(plain["superpixels"]) is torch.Tensor and plain["superpixels"].shape == (1, H, W, 6)
    with pytest.raises(ValueError, match="one image key"):
        Superpixelsd(keys=("image", "label"))
    with pytest.raises(ValueError, match="unknown superpixel setting"):
        Superpixelsd(scales=3)


def test_superpixel_table_lists_exactly_the_ids_meeting_min_pixels():
    sp = np.zeros((1, 8, 8, 3), np.int32)
    sp[0, :2, :, 0] = 1  # 16 px
    sp[0, 2:3, :5, 0] = 2  # 5 px
    sp[0, 4:8, :, 0] = 3  # 32 px
    sp[0, :1, :4, 2] = 1  # 4 px; slice 1 is empty
    assert superpixel_table(sp, min_pixels=5) == {0: [1, 2, 3]}
    assert superpixel_table(sp, min_pixels=6) == {0: [1, 3]}
    assert superpixel_table(torch.from_numpy(sp[0]), min_pixels=4) == {0: [1, 2, 3], 2: [1]}
    assert all(type(i) is int for ids in superpixel_table(sp, 1).values() for i in ids)
    real = volume_superpixels(_volume(), min_pixels=1)
    table = superpixel_table(real, min_pixels=50)
    for z in range(real.shape[-1]):
        counts = np.bincount(real[..., z].ravel())
        assert table.get(z, []) == [i for i in range(1, len(counts)) if counts[i] >= 50]
    with pytest.raises(ValueError, match="min_pixels"):
        superpixel_table(sp, min_pixels=0)


def test_an_empty_slice_gives_no_superpixels():
    assert not slice_superpixels(np.zeros((H, W), np.float32)).any()
    sp = volume_superpixels(_volume())
    assert not sp[..., 2].any() and sp[..., 1].any()
    assert 2 not in superpixel_table(sp, DEFAULT_SETTINGS["min_pixels"])


def test_bad_inputs_say_what_to_fix():
    vol = _volume()
    with pytest.raises(ValueError, match="channels"):
        volume_superpixels(np.concatenate([vol, vol]))
    with pytest.raises(ValueError, match="slice_superpixels"):
        volume_superpixels(vol[0, ..., 0])
    with pytest.raises(ValueError, match="intensity normalisation"):
        volume_superpixels(vol * 1000 - 500)  # raw HU, not normalised
    nan = vol.copy()
    nan[0, 1, 1, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        volume_superpixels(nan)
    with pytest.raises(ValueError, match="volume_superpixels"):
        slice_superpixels(vol[0])
    with pytest.raises(ValueError, match="max_fraction"):
        slice_superpixels(vol[0, ..., 0], max_fraction=0)


def test_missing_scikit_image_names_the_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "skimage.segmentation", None)  # import fails as if not installed
    with pytest.raises(ImportError, match=r"pip install scikit-image"):
        slice_superpixels(_phantom())


def test_settings_scaled_to_the_spacing_cut_the_same_anatomy_into_the_same_superpixels():
    """The defaults are for 4.5 mm pixels. The same slice at 1.5 mm (3x finer) was cut into about 6x as many
    superpixels, each a ninth of the area, with the Synapse and CHAOS recipes' spacing (a review, 2026-12-07);
    `settings_for_spacing` scales the sizes and ``scale`` by the pixel area, and a given setting still wins."""
    from scipy import ndimage

    from datamodules.transforms.superpixels import settings_for_spacing

    rng = np.random.default_rng(0)
    field = ndimage.gaussian_filter(rng.normal(size=(80, 80)), 4)
    img = 0.2 + 0.15 * np.digitize(field, np.quantile(field, [0.2, 0.4, 0.6, 0.8])) + rng.normal(0, 0.02, (80, 80))
    yy, xx = np.mgrid[:80, :80]
    img = np.where((yy - 40) ** 2 / 38**2 + (xx - 40) ** 2 / 34**2 < 1, img, 0).clip(0, 1).astype(np.float32)
    fine = ndimage.zoom(img, 3, order=1).clip(0, 1).astype(np.float32)

    def area_cm2(sp, mm):
        return float(np.median(np.bincount(sp.ravel())[1:])) * mm**2 / 100

    coarse = slice_superpixels(img, **settings_for_spacing((4.5, 4.5)))
    scaled = slice_superpixels(fine, **settings_for_spacing((1.5, 1.5)))
    literal = slice_superpixels(fine, **DEFAULT_SETTINGS)
    assert settings_for_spacing((4.5, 4.5)) == DEFAULT_SETTINGS  # the demo's settings are unchanged
    assert 0.6 < scaled.max() / coarse.max() < 1.5 and 0.6 < area_cm2(scaled, 1.5) / area_cm2(coarse, 4.5) < 1.6
    assert literal.max() > 4 * coarse.max()  # what the recipes got before
    fine_settings = settings_for_spacing((1.5, 1.5))
    assert fine_settings["scale"] == pytest.approx(90.0) and fine_settings["min_size"] == fine_settings["min_pixels"] == 360
    assert settings_for_spacing((1.5, 1.5), {"min_pixels": 7})["min_pixels"] == 7
