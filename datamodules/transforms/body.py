"""The body in a scan's grid, and an in-plane crop to it.

A scanner reconstructs a fixed field of view (a CT's 500 mm circle, an MR's rectangle), so the body can fill a
fraction of the grid: air, a couch, or a zeroed background around it, and not always at the grid's centre. The
preprocessing crops every slice to a fixed size around the centre of what it is given, and `--scale structure`
chooses its spacing from the field of view it must hold (`imaging_meta.volume.scale`). Given the whole grid,
both spend their pixels on air: a 510 mm CT grid coarsened a support's kidney from 3.0 to 4.0 mm pixels
(`benchmarks.scanner_values`). `body_box` finds the body; `BodyCropd` crops each scan in plane to it (all its
slices kept), before the pad or crop to the slice size, so that every scan is centred on its own body.

The body is every voxel of the normalised image (CT windowed, MR percentile-scaled: about [0, 1], air at 0)
above ``threshold``, less thin layers (a couch's shells), in the connected components that hold at least
``min_share`` of the largest one's voxels (two legs, an arm beside the trunk; not noise or a coil's speck), seen
along the axial axis. A box that would crop less than a tenth of an axis leaves that axis as it is, so a
scan already cut to the body is not changed, and so is an axis along which the whole grid fits in the slices. Plain numpy and scipy; no I/O.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import CropForegroundd
from scipy import ndimage

#: the body is above this in the normalised image: 0.05 of a (-250, 250) HU window is -225 HU (fat is above),
#: of an MR's 1st-99th percentile range, its background noise
BODY_THRESHOLD = 0.05
#: a connected component is body when it holds at least this share of the largest component's voxels
BODY_MIN_SHARE = 0.02
#: layers up to about twice this thick (mm) are not body (a couch's carbon shells, a blanket)
BODY_THIN_MM = 4.0
#: air kept around the body on each side (mm)
BODY_MARGIN_MM = 10.0
#: an axis is cropped only when the box is less than this share of it
BODY_KEEP_SHARE = 0.9


def body_box(volume: np.ndarray, spacing: Sequence[float] = (1.0, 1.0), threshold: float = BODY_THRESHOLD,
             min_share: float = BODY_MIN_SHARE, thin_mm: float = BODY_THIN_MM) -> tuple[int, int, int, int] | None:
    """The in-plane bounding box ``(x0, x1, y0, y1)`` (ends exclusive) of the body in a normalised (X, Y, Z)
    volume of in-plane voxel size ``spacing`` (mm), over all its slices; None when no voxel is above ``threshold``.

    Layers thinner than about ``2 * thin_mm`` (a couch's shells, a blanket, a line of noise) are eroded away in
    plane before the components are counted; the box is then widened back by the erosion."""
    foreground = np.asarray(volume) > threshold
    if not foreground.any():
        return None
    steps = max(1, int(round(float(thin_mm) / float(min(spacing[0], spacing[1])))))
    cross = ndimage.generate_binary_structure(2, 1)[..., None]  # in plane only: slices are not joined or thinned
    core = ndimage.binary_erosion(foreground, structure=cross, iterations=steps)
    if not core.any():  # nothing thicker than the layers: the foreground as it is
        core, steps = foreground, 0
    labels = np.asarray(ndimage.label(core)[0])
    sizes = np.bincount(labels.ravel())[1:]
    keep = np.flatnonzero(sizes >= min_share * sizes.max()) + 1
    x0, x1, y0, y1 = _plane_box(np.asarray(np.isin(labels, keep).any(axis=2)))
    nx, ny = labels.shape[:2]
    return max(0, x0 - steps), min(nx, x1 + steps), max(0, y0 - steps), min(ny, y1 + steps)


def _plane_box(plane: np.ndarray) -> tuple[int, int, int, int]:
    """The bounding box ``(x0, x1, y0, y1)`` (ends exclusive) of a non-empty boolean (X, Y) plane."""
    xs, ys = np.flatnonzero(plane.any(axis=1)), np.flatnonzero(plane.any(axis=0))
    return int(xs[0]), int(xs[-1]) + 1, int(ys[0]), int(ys[-1]) + 1


def crop_box(shape: Sequence[int], spacing: Sequence[float], body: tuple[int, int, int, int] | None,
             keep: Sequence[tuple[int, int, int, int]] = (), margin_mm: float = BODY_MARGIN_MM,
             keep_share: float = BODY_KEEP_SHARE, fit: Sequence[int] | None = None) -> tuple[int, int, int, int]:
    """The in-plane box ``(x0, x1, y0, y1)`` a (X, Y, ...) grid is cropped to: the body's, widened by ``margin_mm``
    and to hold every box of ``keep`` (a label's structures), within the grid. An axis keeps its full length when
    the box would shorten it by less than ``1 - keep_share``, when the grid already fits in ``fit`` pixels along
    it (the slices it is padded to: nothing would be cut), and when there is no body."""
    full = [0, int(shape[0]), 0, int(shape[1])]
    if body is None:
        return full[0], full[1], full[2], full[3]
    box = list(body)
    for other in keep:
        box = [min(box[0], other[0]), max(box[1], other[1]), min(box[2], other[2]), max(box[3], other[3])]
    out = []
    for axis in range(2):
        pad = int(math.ceil(margin_mm / float(spacing[axis])))
        lo, hi = max(0, box[2 * axis] - pad), min(int(shape[axis]), box[2 * axis + 1] + pad)
        if hi - lo >= keep_share * int(shape[axis]) or (fit is not None and int(shape[axis]) <= int(fit[axis])):
            lo, hi = 0, int(shape[axis])
        out += [lo, hi]
    return out[0], out[1], out[2], out[3]


def mask_box(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """The in-plane bounding box of the non-zero voxels of an (X, Y, Z) array; None when there is none."""
    plane = np.asarray(np.asarray(mask, dtype=bool).reshape(mask.shape[0], mask.shape[1], -1).any(axis=2))
    return _plane_box(plane) if plane.any() else None


def _spacing(img) -> list[float]:
    """The in-plane voxel size (mm) of a channel-first MetaTensor, from its affine (1 mm without one)."""
    affine = getattr(img, "affine", None)
    if affine is None:
        return [1.0, 1.0]
    a = np.asarray(affine, dtype=np.float64)[:3, :3]
    return [float(v) for v in np.sqrt((a ** 2).sum(0))[:2]]


class BodyCropd(CropForegroundd):
    """Crop image and labels in plane to the body of the image (`body_box`, `crop_box`; every slice kept).

    The first key is the image, in which the body is found (normalised intensities); the others are its label
    maps, whose non-zero voxels are always kept inside the box. An axis along which the grid fits in ``fit``
    pixels (the slice size it is then padded to) is not cropped: nothing of it would be lost, and a scan that
    fits, as every scan of the demo does, gets the slices it got before the crop existed. Invertible as MONAI's
    ``CropForegroundd`` (which it is, with the box chosen here): the inverse pads back to the grid it was given.
    """

    def __init__(self, keys: KeysCollection, fit: Sequence[int] | None = None, margin_mm: float = BODY_MARGIN_MM,
                 threshold: float = BODY_THRESHOLD, min_share: float = BODY_MIN_SHARE,
                 keep_share: float = BODY_KEEP_SHARE, allow_missing_keys: bool = False) -> None:
        names = [keys] if isinstance(keys, str) else [str(k) for k in keys]  # type: ignore[union-attr]
        super().__init__(names, source_key=names[0], allow_smaller=True, start_coord_key=None, end_coord_key=None,
                         allow_missing_keys=allow_missing_keys)
        self.fit = None if fit is None else [int(v) for v in fit]
        self.margin_mm, self.threshold = float(margin_mm), float(threshold)
        self.min_share, self.keep_share = float(min_share), float(keep_share)

    def __call__(self, data: Mapping[Hashable, torch.Tensor], lazy: bool | None = None) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        image = d[self.source_key]
        volume = np.asarray(image.detach().cpu() if isinstance(image, torch.Tensor) else image)[0]
        spacing = _spacing(image)
        body = body_box(volume, spacing, self.threshold, self.min_share)
        labels = [mask_box(np.asarray(d[k])[0] != 0) for k in self.keys[1:] if k in d]
        box = crop_box(volume.shape, spacing, body, [b for b in labels if b is not None], self.margin_mm,
                       self.keep_share, self.fit)
        start = np.asarray([box[0], box[2], 0])
        end = np.asarray([box[1], box[3], volume.shape[2]])
        lazy_ = self.lazy if lazy is None else lazy
        for key, mode in self.key_iterator(d, self.mode):
            d[key] = self.cropper.crop_pad(img=d[key], box_start=start, box_end=end, mode=mode, lazy=lazy_)
        return d
