"""The body in a scan's grid, and an in-plane crop to it.

A scanner reconstructs a fixed field of view (a CT's 500 mm circle, an MR's rectangle), so the body can fill a
fraction of the grid: air, a couch, or a zeroed background around it, and not always at the grid's centre. The
preprocessing crops every slice to a fixed size around the centre of what it is given, and `--scale structure`
chooses its spacing from the field of view it must hold (`imaging_meta.volume.scale`). Given the whole grid,
both spend their pixels on air: a 510 mm CT grid coarsened a support's kidney from 3.0 to 4.0 mm pixels
(`benchmarks.scanner_values`).

`find_body` finds the body on the scan's own grid, in its own values (before any window: a narrow CT window
would hide the fat, and a lung window show the air), on every k-th voxel in plane (k to about 2 mm, so that the
same scan gives the same box whatever spacing it is then resampled to):

* the body is CT above -500 HU, or any other modality above 2% of the range from its 1st percentile (a zeroed
  background: 0) to the 99th of its non-zero values: MR fat, muscle and organs, and a coil's dim far side (a
  noisy background may pass too: then nothing is cropped);
* on CT, layers thinner than about 8 mm (a couch's carbon shells, a blanket) are eroded away in plane. Not on
  MR, where a couch gives no signal and a thin bright layer can be body: skin beyond fat that a fat-suppressed
  sequence makes dark, or the scalp beyond a dark skull (eroding it cut a lesion in the dark fat out of a query;
  a review, 2026-12-06);
* seen along the axial axis, every connected part of at least 2% of the largest one's area is kept (two legs,
  an arm, a hand in a few slices; not a speck of noise);
* with a label map (a support, a training scan), every labelled voxel is kept too.

`FindBodyd` stores that box (its corners in world millimetres) with the image; `BodyCropd`, after the resampling,
crops image and labels in plane to it with 10 mm of air (all slices kept), so that every scan is centred on its
own body. It never crops an axis along which the whole grid fits in the slices (nothing would be cut: the demo's
scans get the slices they got before the crop existed), nor one the box would shorten by less than a tenth (a
scan already cut to its body) when the slices, cut around the grid's centre, hold the box anyway. Plain numpy
and scipy; no I/O.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import CropForegroundd, MapTransform
from nibabel.affines import voxel_sizes
from scipy import ndimage

#: CT voxels above this (HU) are body: fat (about -100) and skin are; air and a couch's foam (about -900) are not
CT_BODY_HU = -500.0
#: other modalities: above this share of the range from the 1st percentile to the 99th of the non-zero values
BODY_SHARE = 0.02
#: a part of the body (seen along the axial axis) is kept when its area is at least this share of the largest's
BODY_MIN_SHARE = 0.02
#: layers up to about twice this thick (mm) are not body
BODY_THIN_MM = 4.0
#: air kept around the body on each side (mm)
BODY_MARGIN_MM = 10.0
#: an axis is cropped only when the box is less than this share of it
BODY_KEEP_SHARE = 0.9
#: the body is found on every k-th voxel in plane, k the largest with k voxels at most this wide (mm)
BODY_ANALYSIS_MM = 2.0
#: the image's meta key of the body box's corners (world mm, RAS; 3 x 8), None when no body was found
BODY_META = "body_corners"


def _is_ct(modality: str) -> bool:
    from datamodules.transforms.volume import CT_MODALITIES  # volume imports this module

    return modality.upper() in CT_MODALITIES


def body_foreground(values: np.ndarray, modality: str) -> np.ndarray:
    """The voxels of a scan's own values (HU on CT) that may be body (module docstring)."""
    values = np.asarray(values, dtype=np.float32)
    if _is_ct(modality):
        return values > CT_BODY_HU
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return np.zeros(values.shape, bool)
    nonzero = finite[finite != 0]
    # the floor over every voxel (a zeroed background is its floor), the top over the non-zero ones
    lo, hi = float(np.percentile(finite, 1.0)), float(np.percentile(nonzero if nonzero.size else finite, 99.0))
    return values > lo + BODY_SHARE * (hi - lo)


def body_box(foreground: np.ndarray, spacing: Sequence[float] = (1.0, 1.0), min_share: float = BODY_MIN_SHARE,
             thin_mm: float = BODY_THIN_MM) -> tuple[int, int, int, int] | None:
    """The in-plane bounding box ``(x0, x1, y0, y1)`` (ends exclusive) of the body in a boolean (X, Y, Z)
    foreground of in-plane voxel size ``spacing`` (mm); None when there is no foreground.

    Layers thinner than about ``2 * thin_mm`` are eroded away in plane (the box is widened back by the erosion;
    ``thin_mm=0``: nothing is eroded); the rest is seen along the axial axis, and its connected parts of at least
    ``min_share`` of the largest's area are kept."""
    foreground = np.asarray(foreground, dtype=bool)
    if not foreground.any():
        return None
    steps = max(1, int(round(float(thin_mm) / float(min(spacing[0], spacing[1]))))) if thin_mm > 0 else 0
    cross = ndimage.generate_binary_structure(2, 1)[..., None]  # in plane only: slices are not joined or thinned
    # (scipy erodes until nothing changes for iterations < 1)
    core = ndimage.binary_erosion(foreground, structure=cross, iterations=steps) if steps else foreground
    if not core.any():  # nothing thicker than the layers: the foreground as it is
        core, steps = foreground, 0
    labels = np.asarray(ndimage.label(core.any(axis=2))[0])
    sizes = np.bincount(labels.ravel())[1:]
    keep = np.flatnonzero(sizes >= min_share * sizes.max()) + 1
    x0, x1, y0, y1 = _plane_box(np.asarray(np.isin(labels, keep)))
    nx, ny = labels.shape
    return max(0, x0 - steps), min(nx, x1 + steps), max(0, y0 - steps), min(ny, y1 + steps)


def _plane_box(plane: np.ndarray) -> tuple[int, int, int, int]:
    """The bounding box ``(x0, x1, y0, y1)`` (ends exclusive) of a non-empty boolean (X, Y) plane."""
    xs, ys = np.flatnonzero(plane.any(axis=1)), np.flatnonzero(plane.any(axis=0))
    return int(xs[0]), int(xs[-1]) + 1, int(ys[0]), int(ys[-1]) + 1


def mask_box(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """The in-plane bounding box of the non-zero voxels of an (X, Y, Z) array; None when there is none."""
    plane = np.asarray(np.asarray(mask, dtype=bool).reshape(mask.shape[0], mask.shape[1], -1).any(axis=2))
    return _plane_box(plane) if plane.any() else None


def find_body(values: np.ndarray, spacing: Sequence[float], modality: str,
              labels: Sequence[np.ndarray] = ()) -> tuple[int, int, int, int] | None:
    """The body's in-plane box ``(x0, x1, y0, y1)`` (ends exclusive) in a scan's own (X, Y, Z) grid, axial axis
    last, in its own values (module docstring), widened to hold every non-zero voxel of ``labels`` (on the same
    grid); None when there is neither body nor label."""
    values = np.asarray(values)
    nx, ny = values.shape[:2]
    k = max(1, int(BODY_ANALYSIS_MM // float(min(spacing[0], spacing[1]))))
    thin = BODY_THIN_MM if _is_ct(modality) else 0.0  # thin layers: on CT only
    found = body_box(body_foreground(values[::k, ::k], modality), [float(spacing[0]) * k, float(spacing[1]) * k],
                     thin_mm=thin)
    boxes = [] if found is None else [(found[0] * k, min(nx, found[1] * k), found[2] * k, min(ny, found[3] * k))]
    boxes += [b for b in (mask_box(lab) for lab in labels) if b is not None]
    if not boxes:
        return None
    return min(b[0] for b in boxes), max(b[1] for b in boxes), min(b[2] for b in boxes), max(b[3] for b in boxes)


def box_corners(box: tuple[int, int, int, int], affine: np.ndarray, depth: int) -> np.ndarray:
    """The 8 corners (3 x 8, world mm) of the voxels of an in-plane box over all ``depth`` slices of a grid."""
    x0, x1, y0, y1 = box
    idx = np.array([[x, y, z, 1.0] for x in (x0 - 0.5, x1 - 0.5) for y in (y0 - 0.5, y1 - 0.5)
                    for z in (-0.5, depth - 0.5)]).T
    return (np.asarray(affine, dtype=np.float64) @ idx)[:3]


def body_field(box: tuple[int, int, int, int] | None, spacing: Sequence[float], shape: Sequence[int],
               margin_mm: float = BODY_MARGIN_MM, keep_share: float = BODY_KEEP_SHARE) -> tuple[float, float]:
    """The in-plane extent (mm) `BodyCropd` keeps of a grid of ``shape`` and ``spacing`` with the body in ``box``:
    the box with its margin, within the grid; the whole axis where that is at least ``keep_share`` of it, or
    without a box."""
    field = []
    for axis in range(2):
        full = float(shape[axis]) * float(spacing[axis])
        kept = full if box is None else (box[2 * axis + 1] - box[2 * axis]) * float(spacing[axis]) + 2.0 * margin_mm
        field.append(full if kept >= keep_share * full else kept)
    return field[0], field[1]


def _in_plane_spacing(affine: np.ndarray) -> list[float]:
    return [float(v) for v in voxel_sizes(np.asarray(affine, dtype=np.float64))[:2]]


class FindBodyd(MapTransform):
    """Find the body of the image (the first key) on its own grid, after the turn to RAS and before any
    resampling or intensity scaling (`find_body`), and keep its box with the image (``meta[BODY_META]``) for
    `BodyCropd`. The other keys are its label maps, whose labelled voxels the box holds when ``keep_labels``
    (leave it off for a scan whose label is what is being predicted: an evaluation's query)."""

    def __init__(self, keys: KeysCollection, modality_key: str = "modality", keep_labels: bool = True,
                 allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.modality_key, self.keep_labels = modality_key, bool(keep_labels)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        keys = list(self.key_iterator(d))
        if not keys:
            return d
        image = d[keys[0]]
        values = np.asarray(image.detach().cpu() if isinstance(image, torch.Tensor) else image)[0]
        affine = np.asarray(getattr(image, "affine", np.eye(4)), dtype=np.float64)
        labels = [np.asarray(d[k])[0] != 0 for k in keys[1:]] if self.keep_labels else []
        labels = [lab for lab in labels if lab.shape == values.shape]  # off its grid: `CheckVolumed` said so
        box = find_body(values, _in_plane_spacing(affine), str(d.get(self.modality_key, "unknown")), labels)
        if hasattr(image, "meta"):
            image.meta[BODY_META] = None if box is None else box_corners(box, affine, values.shape[2])
        return d


class BodyCropd(CropForegroundd):
    """Crop image and labels in plane to the body box `FindBodyd` kept with the image (the first key), with
    ``margin_mm`` of air; every slice kept. An axis along which the grid fits in ``fit`` pixels (the slice size it
    is then padded to) is not cropped, nor one that the box would shorten by less than ``1 - keep_share`` when
    ``fit`` pixels around the grid's centre hold the box (a body off the centre is cut to, not cut off). The slices
    are then padded with zeros around the box, not filled with what lies beyond it: a couch under the body, whose
    shells look like a contrast-filled vessel, stays out (keeping the slices' width of the scan around the body
    brought it back: the aorta of `benchmarks.scanner_values`' couch in support and query went 0.31 -> 0.00).
    Without a box (no `FindBodyd` before it, or no body found) nothing is cropped. Invertible as MONAI's ``CropForegroundd`` (which it is, with the box chosen
    here): the inverse pads back with zeros to the grid it was given."""

    def __init__(self, keys: KeysCollection, fit: Sequence[int] | None = None, margin_mm: float = BODY_MARGIN_MM,
                 keep_share: float = BODY_KEEP_SHARE, allow_missing_keys: bool = False) -> None:
        names = [keys] if isinstance(keys, str) else [str(k) for k in keys]  # type: ignore[union-attr]
        super().__init__(names, source_key=names[0], allow_smaller=True, start_coord_key=None, end_coord_key=None,
                         allow_missing_keys=allow_missing_keys)
        self.fit = None if fit is None else [int(v) for v in fit]
        self.margin_mm, self.keep_share = float(margin_mm), float(keep_share)

    def box(self, image) -> tuple[int, int, int, int]:
        """The in-plane box ``(x0, x1, y0, y1)`` this crops a (C, X, Y, Z) image with its body corners to."""
        shape = [int(n) for n in image.shape[1:3]]
        corners = getattr(image, "meta", {}).get(BODY_META)
        if corners is None:
            return 0, shape[0], 0, shape[1]
        affine = np.asarray(image.affine, dtype=np.float64)
        idx = (np.linalg.inv(affine) @ np.vstack([np.asarray(corners, dtype=np.float64), np.ones((1, 8))]))[:2]
        spacing = _in_plane_spacing(affine)
        out: list[int] = []
        for axis in range(2):
            n = shape[axis]
            fit = None if self.fit is None else self.fit[axis]
            if fit is not None and n <= fit:
                out += [0, n]
                continue
            pad = int(math.ceil(self.margin_mm / spacing[axis]))
            lo = int(math.floor(idx[axis].min() + 0.5)) - pad  # the voxels the box's corners reach, and the margin
            hi = int(math.ceil(idx[axis].max() - 0.5)) + 1 + pad
            lo, hi = max(0, lo), min(n, hi)
            # held by the slices that the pad or crop then cuts around the grid's centre (or no slice size given)
            held = fit is None or ((n - fit) // 2 - 1 <= lo and hi <= (n - fit) // 2 + fit + 1)
            if hi <= lo or (held and hi - lo >= self.keep_share * n):  # uncut: nothing, or nothing the slices lose
                lo, hi = 0, n
            out += [lo, hi]
        return out[0], out[1], out[2], out[3]

    def __call__(self, data: Mapping[Hashable, torch.Tensor], lazy: bool | None = None) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        image = d[self.source_key]
        x0, x1, y0, y1 = self.box(image)
        start, end = np.asarray([x0, y0, 0]), np.asarray([x1, y1, int(image.shape[3])])
        lazy_ = self.lazy if lazy is None else lazy
        for key, mode in self.key_iterator(d, self.mode):
            d[key] = self.cropper.crop_pad(img=d[key], box_start=start, box_end=end, mode=mode, lazy=lazy_)
        return d
