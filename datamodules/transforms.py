"""MONAI dictionary transforms, keys ``"image"`` and ``"label"``.

Two stages:

* `volume_transforms` (deterministic, cached): load (NIfTI, or a geometry-ordered DICOM series), channel
  first, RAS orientation, in-plane resampling to a target spacing, intensity normalisation per modality
  (CT: a HU window; MR: percentile scaling), and an in-plane pad/crop to a fixed slice size. The axial
  axis is the last one, so ``volume[..., z]`` is a fixed-size 2D slice.
* `slice_augmentation` (random, seeded): 2D geometric and intensity augmentation of a slice; one draw is
  applied to image and label alike.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import NibabelReader
from monai.transforms import (
    Compose,
    EnsureChannelFirstd,
    LoadImaged,
    MapTransform,
    Orientationd,
    RandAdjustContrastd,
    RandAffined,
    RandGaussianNoised,
    RandScaleIntensityd,
    ResizeWithPadOrCropd,
    Spacingd,
    Transform,
)

from datamodules.dicom import DicomSeriesReader

CT_MODALITIES = ("CT",)


def _source(img) -> str:
    meta = getattr(img, "meta", {}) or {}
    src = meta.get("filename_or_obj", "<array>")
    if isinstance(src, (list, tuple)):
        src = f"{src[0]} (+{len(src) - 1} slices)" if src else "<series>"
    return str(src)


class ModalityIntensity(Transform):
    """Scale intensities to about [0, 1] by modality.

    CT (Hounsfield units): clip to ``ct_window`` and scale linearly. Other modalities (MR): scale between
    the ``mr_percentiles`` of the non-zero voxels, then clip.

    Args:
        ct_window: (lower, upper) HU window.
        mr_percentiles: (lower, upper) percentiles in [0, 100].

    Raises:
        ValueError: for an image with NaN or Inf values, or a constant image (naming the source file).
    """

    def __init__(self, ct_window: Sequence[float] = (-250.0, 250.0), mr_percentiles: Sequence[float] = (1.0, 99.0)):
        lo, hi = ct_window
        plo, phi = mr_percentiles
        if not hi > lo:
            raise ValueError(f"ct_window must be (lower, upper) with upper > lower, got {tuple(ct_window)}")
        if not 0 <= plo < phi <= 100:
            raise ValueError(f"mr_percentiles must satisfy 0 <= lower < upper <= 100, got {tuple(mr_percentiles)}")
        self.ct_window = (float(lo), float(hi))
        self.mr_percentiles = (float(plo), float(phi))

    def __call__(self, img: torch.Tensor, modality: str) -> torch.Tensor:
        if not torch.isfinite(img).all():
            raise ValueError(f"{_source(img)}: image contains NaN or Inf values; repair or exclude this file")
        if modality.upper() in CT_MODALITIES:
            lo, hi = self.ct_window
        else:
            nz = img[img != 0]
            values = (nz if nz.numel() > 0 else img.reshape(-1)).float()
            if values.numel() > 1_000_000:  # quantile's size limit; a strided sample is plenty
                values = values[:: values.numel() // 1_000_000 + 1]
            q = torch.tensor(self.mr_percentiles, dtype=values.dtype) / 100.0
            lo, hi = (float(v) for v in torch.quantile(values, q))
        if not hi > lo:
            raise ValueError(f"{_source(img)}: constant image (all voxels near {lo:g}); nothing to learn from it")
        return ((img - lo) / (hi - lo)).clamp(0.0, 1.0)


class ModalityIntensityd(MapTransform):
    """Dictionary twin of `ModalityIntensity`; the modality is read from ``data[modality_key]``."""

    def __init__(
        self,
        keys: KeysCollection,
        modality_key: str = "modality",
        ct_window: Sequence[float] = (-250.0, 250.0),
        mr_percentiles: Sequence[float] = (1.0, 99.0),
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.modality_key = modality_key
        self.scaler = ModalityIntensity(ct_window, mr_percentiles)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        modality = str(d.get(self.modality_key, "unknown"))
        for key in self.key_iterator(d):
            d[key] = self.scaler(d[key], modality)
        return d


class BinarizeLabel(Transform):
    """Foreground mask of one structure: ``label == value`` (or ``label > 0`` when value is None)."""

    def __init__(self, value: int | None = None):
        self.value = value

    def __call__(self, label: torch.Tensor) -> torch.Tensor:
        mask = label > 0 if self.value is None else label == self.value
        return mask.to(torch.float32)


class BinarizeLabeld(MapTransform):
    """Dictionary twin of `BinarizeLabel`."""

    def __init__(self, keys: KeysCollection, value: int | None = None, allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.binarize = BinarizeLabel(value)

    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.binarize(d[key])
        return d


class CastLabeld(MapTransform):
    """Round a resampled label map to integers and store it compactly (uint8, or int16 above 255)."""

    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            lbl = d[key]
            dtype = torch.uint8 if float(lbl.max()) <= 255 and float(lbl.min()) >= 0 else torch.int16
            d[key] = torch.round(lbl).to(dtype)
        return d


def volume_transforms(
    spacing: Sequence[float] = (4.0, 4.0),
    slice_size: Sequence[int] = (80, 80),
    ct_window: Sequence[float] = (-250.0, 250.0),
    mr_percentiles: Sequence[float] = (1.0, 99.0),
    keys: Sequence[str] = ("image", "label"),
) -> Compose:
    """The deterministic (cacheable) preprocessing of one volume.

    Input dict: ``image`` (a NIfTI path, or a list of DICOM files in geometric order), optional ``label``
    (NIfTI path), and ``modality``. Output: ``image`` float32 (1, H, W, D) in [0, 1], ``label`` integer
    (1, H, W, D), both MONAI MetaTensors in RAS whose transforms can be inverted.

    Args:
        spacing: in-plane target spacing (mm) along R and A; the slice spacing is kept as acquired.
        slice_size: (H, W) of each axial slice after pad/crop around the centre.
        ct_window: HU window for CT.
        mr_percentiles: percentile range for MR and other modalities.
        keys: image key first, then the label key (drop it to preprocess images alone).
    """
    keys = list(keys)
    if len(spacing) != 2 or len(slice_size) != 2:
        raise ValueError(f"spacing and slice_size are in-plane pairs, got spacing={spacing}, slice_size={slice_size}")
    modes = ["bilinear"] + ["nearest"] * (len(keys) - 1)
    label_keys = keys[1:]
    tfs = [
        # MONAI tries the last reader first: NIfTI files never reach the DICOM reader
        LoadImaged(keys, reader=[DicomSeriesReader(), NibabelReader()], image_only=True),
        EnsureChannelFirstd(keys),
        Orientationd(keys, axcodes="RAS"),
        Spacingd(keys, pixdim=(float(spacing[0]), float(spacing[1]), -1.0), mode=modes),
        ModalityIntensityd(keys[0], ct_window=ct_window, mr_percentiles=mr_percentiles),
        ResizeWithPadOrCropd(keys, spatial_size=(int(slice_size[0]), int(slice_size[1]), -1)),
    ]
    if label_keys:
        tfs.append(CastLabeld(label_keys))
    return Compose(tfs)


def slice_augmentation(
    rotate_degrees: float = 12.0,
    scale: float = 0.12,
    translate: float = 0.06,
    gamma: Sequence[float] = (0.7, 1.5),
    noise_std: float = 0.03,
    intensity_scale: float = 0.1,
    slice_size: Sequence[int] = (80, 80),
    prob: float = 0.8,
) -> Compose:
    """Seeded random 2D augmentation of one slice dict (``image`` (1, H, W), ``label`` (1, H, W)).

    One draw is shared by image and label (nearest-neighbour for the label). Call
    ``set_random_state(seed)`` on the result to make it deterministic.
    """
    h, w = (int(s) for s in slice_size)
    rad = float(np.deg2rad(rotate_degrees))
    return Compose(
        [
            RandAffined(
                ["image", "label"],
                prob=prob,
                rotate_range=(rad,),
                scale_range=(scale, scale),
                translate_range=(translate * h, translate * w),
                mode=("bilinear", "nearest"),
                padding_mode="zeros",
            ),
            RandAdjustContrastd("image", prob=prob, gamma=tuple(gamma)),
            RandScaleIntensityd("image", factors=intensity_scale, prob=prob),
            RandGaussianNoised("image", prob=prob, std=noise_std),
        ]
    )
