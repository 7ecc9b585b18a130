"""Superpixel pseudo-labels of unlabelled scans, for self-supervised few-shot segmentation.

After SSL-ALPNet (Ouyang et al., "Self-Supervision with Superpixels: Training Few-shot Medical Image
Segmentation without Annotation", ECCV 2020): in a self-supervised episode the "organ" is one Felzenszwalb
superpixel of an unlabelled slice. This module computes the superpixels (deterministic, so they belong in the
cached preprocessing chain) and the index a sampler draws from; it never reads a label map.

Pipeline per axial slice (H, W) in [0, 1], as produced by `datamodules.transforms.volume.volume_transforms`:

1. `body_mask`: threshold above the air level, keep the largest connected component, fill holes.
2. ``skimage.segmentation.felzenszwalb`` on the slice, then everything outside the body set to 0.
3. Connected pieces relabelled 1..n by their first pixel in raster (row-major) order.
4. `filter_superpixels`: pieces smaller than ``min_pixels`` or larger than ``max_fraction`` of the body are
   dropped (0) and the survivors relabelled 1..n, keeping the raster order.

Default settings, for the project's 80 x 80 slices at about 4.5 mm (a 360 mm field of view):
SSL-ALPNet uses ``scale=100, sigma=0.8, min_size=400`` on 256 x 256 slices that cover about the same field of
view, so a pixel here has about (256 / 80)^2 = 10.2 times the area of one there. Sizes are scaled by that
factor: ``min_size=40`` (400 / 10.2: the smallest superpixel covers the same ~8 cm^2 of anatomy) and
``scale=10`` (Felzenszwalb's merge threshold is ``scale / |C|`` for a component of ``|C|`` pixels, so scaling
``scale`` with the pixel count keeps the threshold of a component of a given physical size unchanged).
``sigma=0.5`` px: 0.8 px at 256 is about 0.25 px here, which is no smoothing at all; 0.5 px still removes
pixel noise without blurring organ boundaries that are only a few pixels apart at 4.5 mm. scikit-image
divides ``scale`` by 255, so on [0, 1] images it means what it means in the reference 8-bit implementation.
On the demo cohort (`datamodules.synthetic.demo`, CT and MR at 4.5 mm, 80 x 80) these defaults give more
superpixels a slice, each purer in its majority label (an organ or background), than SSL-ALPNet's settings
taken literally. Superpixels are too slow to compute per episode: compute them once, in the cached
preprocessing (`Superpixelsd`).
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform
from scipy import ndimage

__all__ = [
    "DEFAULT_SETTINGS",
    "Superpixelsd",
    "body_mask",
    "filter_superpixels",
    "settings_for_spacing",
    "slice_superpixels",
    "superpixel_table",
    "volume_superpixels",
]

DEFAULT_SETTINGS: dict[str, Any] = {
    "threshold": 0.05,
    "scale": 10.0,
    "sigma": 0.5,
    "min_size": 40,
    "min_pixels": 40,
    "max_fraction": 0.5,
}
"""Defaults for 80 x 80 slices at about 4.5 mm; see the module docstring for why."""

#: the in-plane pixel (mm) that `DEFAULT_SETTINGS` are for
DEFAULT_PIXEL_MM = 4.5


def settings_for_spacing(spacing: Sequence[float], given: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """`DEFAULT_SETTINGS` for slices of another in-plane pixel size (mm), with the ``given`` settings over them.

    The sizes in pixels (``min_size``, ``min_pixels``) and ``scale`` are scaled by the ratio of the pixel areas, as
    the module docstring derives the defaults from SSL-ALPNet's, so that a superpixel covers the same anatomy at
    any spacing: at 1.5 mm, ``scale`` 90 and sizes of 360 pixels, about SSL-ALPNet's own 100 and 400 for its
    256 x 256 slices. The 4.5 mm defaults at 1.5 mm cut a slice into about 6 times as many superpixels, each
    a ninth of the area (a review, 2026-12-07). ``sigma`` stays in pixels: it removes pixel noise.
    """
    sx, sy = (float(v) for v in spacing)
    area = (DEFAULT_PIXEL_MM / sx) * (DEFAULT_PIXEL_MM / sy)
    out = dict(DEFAULT_SETTINGS)
    if area != 1.0:
        out["scale"] = DEFAULT_SETTINGS["scale"] * area
        for key in ("min_size", "min_pixels"):
            out[key] = max(1, int(round(DEFAULT_SETTINGS[key] * area)))
    return {**out, **(given or {})}

_EIGHT = np.ones((3, 3), dtype=bool)  # 8-connectivity, as in skimage's Felzenszwalb graph


def _skimage():
    """``(felzenszwalb, label)`` from scikit-image, or an ImportError naming the package to install."""
    try:
        from skimage.measure import label
        from skimage.segmentation import felzenszwalb
    except ImportError as e:  # a dependency, but an environment can lack it
        raise ImportError(
            "superpixels need scikit-image (skimage.segmentation.felzenszwalb), a dependency of imaging-meta: pip install scikit-image"
        ) from e
    return felzenszwalb, label


def _as_numpy(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.as_tensor() if hasattr(x, "as_tensor") else x  # MONAI MetaTensor -> plain tensor
        return x.detach().cpu().numpy()
    return np.asarray(x)


def _check_slice(slice_2d, name: str = "slice_2d") -> np.ndarray:
    """A finite float (H, W) array in [0, 1], or a ValueError that says what to fix."""
    s = _as_numpy(slice_2d)
    if s.ndim != 2:
        raise ValueError(
            f"{name} must be one 2D slice (H, W), got shape {tuple(s.shape)}; index a volume (1, H, W, D) as "
            "volume[0, :, :, z], or use volume_superpixels for a whole volume"
        )
    if not (np.issubdtype(s.dtype, np.floating) or np.issubdtype(s.dtype, np.integer) or s.dtype == bool):
        raise ValueError(f"{name} must hold real numbers, got dtype {s.dtype}")
    s = s.astype(np.float64, copy=False)
    if s.size and not np.isfinite(s).all():
        raise ValueError(f"{name} holds NaN or Inf values; repair or exclude the volume (nothing is replaced here)")
    if s.size and (s.min() < -1e-6 or s.max() > 1 + 1e-6):
        raise ValueError(
            f"{name} has values in [{s.min():g}, {s.max():g}], expected [0, 1]; apply the intensity normalisation "
            "of datamodules.transforms.volume.volume_transforms (ModalityIntensityd) first"
        )
    return s


def _check_settings(threshold=None, scale=None, sigma=None, min_size=None, min_pixels=None, max_fraction=None):
    if threshold is not None and not 0.0 <= threshold < 1.0:
        raise ValueError(f"threshold must be in [0, 1) (the air level of a [0, 1] slice), got {threshold}")
    if scale is not None and not scale > 0:
        raise ValueError(f"scale must be > 0 (larger: fewer, larger superpixels), got {scale}")
    if sigma is not None and not sigma >= 0:
        raise ValueError(f"sigma must be >= 0 (Gaussian pre-smoothing in pixels; 0: none), got {sigma}")
    if min_size is not None and (int(min_size) != min_size or min_size < 1):
        raise ValueError(f"min_size must be a positive integer number of pixels, got {min_size}")
    if min_pixels is not None and (int(min_pixels) != min_pixels or min_pixels < 1):
        raise ValueError(f"min_pixels must be a positive integer number of pixels, got {min_pixels}")
    if max_fraction is not None and not 0.0 < max_fraction <= 1.0:
        raise ValueError(f"max_fraction must be in (0, 1] (a share of the body's pixels), got {max_fraction}")


def body_mask(slice_2d, threshold: float = DEFAULT_SETTINGS["threshold"]) -> np.ndarray:
    """The patient's body in a normalised slice: the air around the patient is excluded.

    Pixels above ``threshold`` are kept, then only the largest 8-connected component (so noise specks in the
    air and small detached objects are dropped), and its holes are filled (air inside the body, such as the
    lungs or bowel gas of a CT under an abdominal window, belongs to the body).

    Args:
        slice_2d: (H, W) array or tensor with intensities in [0, 1]; air is near 0.
        threshold: the air level; pixels strictly above it can be body. 0.05 sits well below fat on a CT
            window of [-250, 250] HU (about 0.3) and above the background of percentile-scaled MR.

    Returns:
        (H, W) bool array; all False for a slice with nothing above ``threshold`` (e.g. all zero).

    Raises:
        ValueError: ``slice_2d`` is not 2D, holds NaN/Inf or values outside [0, 1], or ``threshold`` is
            outside [0, 1).
    """
    _check_settings(threshold=threshold)
    s = _check_slice(slice_2d)
    fg = s > threshold
    if not fg.any():
        return fg
    components, n = ndimage.label(fg, structure=_EIGHT)
    if n > 1:
        sizes = np.bincount(components.ravel())
        sizes[0] = 0
        fg = components == int(np.argmax(sizes))  # ties: the lowest id, i.e. the first in raster order
    return ndimage.binary_fill_holes(fg)


def _raster_relabel(labels: np.ndarray) -> np.ndarray:
    """Split every label into its 8-connected pieces and number them 1..n by first pixel in raster order."""
    if not labels.any():
        return np.zeros(labels.shape, dtype=np.int32)
    pieces = _skimage()[1](labels, background=0, connectivity=2)  # equal values joined by 8-connectivity
    return _consecutive_by_first_pixel(pieces)


def _consecutive_by_first_pixel(labels: np.ndarray) -> np.ndarray:
    """Relabel the non-zero ids of ``labels`` as 1..n in the raster order of their first pixel."""
    flat = labels.ravel()
    ids, first = np.unique(flat, return_index=True)
    keep = ids > 0
    ids, first = ids[keep], first[keep]
    lut = np.zeros(int(flat.max()) + 1 if flat.size else 1, dtype=np.int32)
    lut[ids[np.argsort(first, kind="stable")]] = np.arange(1, len(ids) + 1, dtype=np.int32)
    return lut[labels].astype(np.int32, copy=False)


def filter_superpixels(
    labels,
    min_pixels: int = DEFAULT_SETTINGS["min_pixels"],
    max_fraction: float = DEFAULT_SETTINGS["max_fraction"],
    body_pixels: int | None = None,
) -> np.ndarray:
    """Drop superpixels that are too small or too large to be organ-like, and renumber the rest.

    Args:
        labels: (H, W) integer superpixel map, 0 = none.
        min_pixels: a superpixel with fewer pixels is dropped (set to 0).
        max_fraction: a superpixel with more than ``max_fraction * body_pixels`` pixels is dropped (it is
            mostly "the body": a trivial foreground, not an organ).
        body_pixels: the body's size in pixels; default: the non-zero pixels of ``labels``.

    Returns:
        (H, W) int32 map with the kept superpixels numbered 1..n in the raster order of their first pixel.

    Raises:
        ValueError: ``labels`` is not a 2D integer map, or a threshold is out of range.
    """
    _check_settings(min_pixels=min_pixels, max_fraction=max_fraction)
    lab = _as_numpy(labels)
    if lab.ndim != 2 or not (np.issubdtype(lab.dtype, np.integer) or lab.dtype == bool):
        raise ValueError(f"labels must be a 2D integer superpixel map (H, W), got shape {lab.shape}, dtype {lab.dtype}")
    if lab.size and lab.min() < 0:
        raise ValueError("labels must be >= 0 (0 = no superpixel); relabel negative ids first")
    lab = lab.astype(np.int64, copy=False)
    if body_pixels is None:
        body_pixels = int((lab > 0).sum())
    if body_pixels <= 0 or not lab.any():
        return np.zeros(lab.shape, dtype=np.int32)
    counts = np.bincount(lab.ravel())
    drop = (counts < int(min_pixels)) | (counts > float(max_fraction) * body_pixels)
    drop[0] = True
    return _consecutive_by_first_pixel(np.where(drop[lab], 0, lab))


def slice_superpixels(
    slice_2d,
    scale: float = DEFAULT_SETTINGS["scale"],
    sigma: float = DEFAULT_SETTINGS["sigma"],
    min_size: int = DEFAULT_SETTINGS["min_size"],
    threshold: float = DEFAULT_SETTINGS["threshold"],
    min_pixels: int = DEFAULT_SETTINGS["min_pixels"],
    max_fraction: float = DEFAULT_SETTINGS["max_fraction"],
) -> np.ndarray:
    """Felzenszwalb superpixels of one slice, inside the body, size-filtered, numbered in raster order.

    Args:
        slice_2d: (H, W) array or tensor in [0, 1] (a preprocessed axial slice).
        scale: Felzenszwalb's ``k`` (``skimage.segmentation.felzenszwalb``); larger: fewer, larger superpixels.
        sigma: Gaussian pre-smoothing in pixels.
        min_size: Felzenszwalb's minimum component size in pixels (enforced before masking).
        threshold: the air level for `body_mask`.
        min_pixels: after masking, drop superpixels with fewer pixels.
        max_fraction: drop superpixels larger than this share of the body.

    Returns:
        (H, W) int32 map: 0 outside the body and for dropped superpixels, else ids 1..n numbered by their
        first pixel in raster (row-major) order. A superpixel cut in two by the body mask counts as two.
        All zero for a slice without a body (e.g. an all-zero slice), which is not an error.

    Raises:
        ValueError: a non-2D slice, NaN/Inf or values outside [0, 1], or a setting out of range.
        ImportError: scikit-image is missing.
    """
    _check_settings(threshold, scale, sigma, min_size, min_pixels, max_fraction)
    s = _check_slice(slice_2d)
    body = body_mask(s, threshold)
    if not body.any():
        return np.zeros(s.shape, dtype=np.int32)
    segments = _skimage()[0](s, scale=float(scale), sigma=float(sigma), min_size=int(min_size), channel_axis=None)
    segments = np.where(body, segments.astype(np.int64) + 1, 0)  # felzenszwalb ids start at 0
    return filter_superpixels(_raster_relabel(segments), min_pixels, max_fraction, body_pixels=int(body.sum()))


def _volume_array(volume, name: str = "volume") -> np.ndarray:
    v = _as_numpy(volume)
    if v.ndim == 4:
        if v.shape[0] != 1:
            raise ValueError(
                f"{name} must be one channel-first volume (1, H, W, D) or (H, W, D), got shape {tuple(v.shape)} "
                f"with {v.shape[0]} channels; pass one channel (volume[c:c + 1])"
            )
        v = v[0]
    elif v.ndim != 3:
        raise ValueError(
            f"{name} must be a volume (1, H, W, D) or (H, W, D) with the axial axis last, got shape {tuple(v.shape)}"
            + ("; use slice_superpixels for a single slice" if v.ndim == 2 else "")
        )
    return v


def volume_superpixels(
    volume,
    scale: float = DEFAULT_SETTINGS["scale"],
    sigma: float = DEFAULT_SETTINGS["sigma"],
    min_size: int = DEFAULT_SETTINGS["min_size"],
    threshold: float = DEFAULT_SETTINGS["threshold"],
    min_pixels: int = DEFAULT_SETTINGS["min_pixels"],
    max_fraction: float = DEFAULT_SETTINGS["max_fraction"],
) -> np.ndarray:
    """Per-slice superpixels of a preprocessed volume (`slice_superpixels` on every ``volume[..., z]``).

    Deterministic: the same volume and settings always give the same array (no randomness is involved).

    Args:
        volume: (1, H, W, D) or (H, W, D) array or tensor in [0, 1], axial axis last.
        scale, sigma, min_size, threshold, min_pixels, max_fraction: as in `slice_superpixels`.

    Returns:
        (H, W, D) int32 array; ids are unique within a slice (1..n_z, raster order), 0 = none. Ids in
        different slices are unrelated.

    Raises:
        ValueError: a volume that is not (1, H, W, D) or (H, W, D) (e.g. several channels), NaN/Inf or values
            outside [0, 1], or a setting out of range.
    """
    _check_settings(threshold, scale, sigma, min_size, min_pixels, max_fraction)
    v = _volume_array(volume)
    out = np.zeros(v.shape, dtype=np.int32)
    for z in range(v.shape[-1]):
        out[..., z] = slice_superpixels(v[..., z], scale, sigma, min_size, threshold, min_pixels, max_fraction)
    return out


class Superpixelsd(MapTransform):
    """Add the superpixel map of an image to a data dict (deterministic, so it can be cached).

    Append it to the cached chain, e.g. ``Compose([volume_transforms(keys=("image",)), Superpixelsd()])``.
    It reads only ``keys[0]`` and never a label map, so it works on unlabelled scans.

    Args:
        keys: the one image key, a preprocessed (1, H, W, D) volume in [0, 1].
        output_key: where the superpixel map goes: a (1, H, W, D) int32 tensor (a MONAI MetaTensor carrying
            the image's metadata, affine included, when the image is one).
        allow_missing_keys: leave the dict unchanged when the image key is absent.
        **settings: ``scale``, ``sigma``, ``min_size``, ``threshold``, ``min_pixels``, ``max_fraction`` of
            `volume_superpixels` (defaults: `DEFAULT_SETTINGS`).

    Raises:
        ValueError: more than one key, an unknown setting, or (when called) an image `volume_superpixels`
            rejects.
    """

    def __init__(
        self,
        keys: KeysCollection = ("image",),
        output_key: str = "superpixels",
        allow_missing_keys: bool = False,
        **settings,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        if len(self.keys) != 1:
            raise ValueError(f"Superpixelsd takes one image key, got {list(self.keys)}; use one transform per image")
        unknown = sorted(set(settings) - set(DEFAULT_SETTINGS))
        if unknown:
            raise ValueError(f"unknown superpixel setting(s) {unknown}; choose from {sorted(DEFAULT_SETTINGS)}")
        self.settings = {**DEFAULT_SETTINGS, **settings}
        _check_settings(**self.settings)
        self.output_key = output_key

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            sp = torch.from_numpy(volume_superpixels(img, **self.settings))[None]  # (1, H, W, D) int32
            meta = getattr(img, "meta", None)
            if meta is not None:
                from monai.data import MetaTensor

                sp = MetaTensor(sp, meta=dict(meta))
            d[self.output_key] = sp
        return d


def superpixel_table(superpixels, min_pixels: int = DEFAULT_SETTINGS["min_pixels"]) -> dict[int, list[int]]:
    """The index a self-supervised sampler draws from: which superpixels of each slice are big enough.

    Indices only, no pixels: the sampler picks a slice ``z`` and an id from ``table[z]``; the mask is
    ``superpixels[..., z] == id``, read later where the pixels are loaded.

    Args:
        superpixels: (1, H, W, D) or (H, W, D) integer map from `volume_superpixels` / `Superpixelsd`.
        min_pixels: an id is listed when its superpixel has at least this many pixels in its slice.

    Returns:
        slice index z -> sorted superpixel ids (Python ints). Slices with no such superpixel are left out.

    Raises:
        ValueError: a map of the wrong shape or dtype, negative ids, or ``min_pixels`` < 1.
    """
    _check_settings(min_pixels=min_pixels)
    sp = _volume_array(superpixels, "superpixels")
    if not (np.issubdtype(sp.dtype, np.integer)):
        raise ValueError(f"superpixels must be an integer map, got dtype {sp.dtype}; pass the output of volume_superpixels")
    if sp.size and sp.min() < 0:
        raise ValueError("superpixels must be >= 0 (0 = none)")
    table: dict[int, list[int]] = {}
    for z in range(sp.shape[-1]):
        counts = np.bincount(sp[..., z].ravel().astype(np.int64))
        ids = [int(i) for i in np.nonzero(counts >= int(min_pixels))[0] if i > 0]
        if ids:
            table[z] = ids
    return table
