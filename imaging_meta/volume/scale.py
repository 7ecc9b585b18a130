"""The scale a structure is segmented at: from the support structure's size, not the checkpoint's alone.

A checkpoint is trained at one in-plane spacing (the demo's: 4.5 mm, 80 x 80 slices). A 1 cm lesion or a rib is
then two pixels or less, which no feature and no intensity histogram can resolve. `structure_scale` picks the
in-plane spacing at which the support's structure spans at least ``min_pixels`` pixels across (its thickness,
`structure_extent_mm`) (never finer than
the scan's own pixels, never coarser than the checkpoint's, and coarser than asked where the widest support body
would not fit ``max_size`` pixels: `scale_and_shortfall` says how many it then spans), and a slice size that keeps the scan's field of
view: its body's in-plane extent, as the preprocessing crops it (`datamodules.transforms.body`; until
2026-12-06 the file's whole grid, so that a 510 mm CT grid of mostly air coarsened a kidney's pixels from 3.0 to
4.0 mm) (a multiple of 16, at most ``max_size``: memory grows with the pixels times the support's local
prototypes). Plain numpy and scipy; no I/O.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import ndimage

SCALES = ("checkpoint", "structure")
#: the pixels across that `structure_scale` asks of the support's structure
MIN_PIXELS = 12


def structure_extent_mm(mask: np.ndarray, spacing: Sequence[float]) -> float:
    """The structure's thickness (mm) on the slice where it is largest: twice the largest in-plane distance
    from one of its pixels to the nearest pixel outside it. A thin structure is measured across, not along,
    whether it is straight, curved (a rib) or in several parts (the ribs of one slice), where the smaller side
    of its bounding box would be the width of the body. The distances run between pixel centres, so this is
    exact for a band of an even number of pixels across and one pixel more for an odd number (a one-pixel
    line reads as two): within a pixel, which is all the choice of scale needs."""
    areas = mask.reshape(-1, mask.shape[-1]).sum(0)
    if not areas.any():
        raise ValueError("the support mask has no foreground")
    z = int(np.argmax(areas))
    plane = np.pad(np.asarray(mask[..., z], dtype=bool), 1)  # the border of the slice counts as outside
    depth = ndimage.distance_transform_edt(plane, sampling=(float(spacing[0]), float(spacing[1])))
    return float(2.0 * depth.max())


def structure_scale(preprocessing: dict, mask: np.ndarray, spacing: Sequence[float], field: Sequence[float],
                    min_pixels: int = MIN_PIXELS, max_size: int = 128) -> dict:
    """The checkpoint's preprocessing with the spacing and slice size chosen for the support structure.

    Args:
        preprocessing: the checkpoint's (``spacing``, ``slice_size``, ...).
        mask: the support's structure mask in its own grid (X, Y, Z), axial axis last.
        spacing: that grid's voxel size (mm).
        field: the in-plane extent (mm, two axes) the slices must hold: the support scan's body, as the
            preprocessing crops it (`datamodules.transforms.body.body_field`), or its whole grid.
        min_pixels: the structure should span at least this many pixels across.
        max_size: the largest slice side.

    Returns:
        A copy of ``preprocessing`` with ``spacing`` and ``slice_size`` (never smaller than the checkpoint's);
        the checkpoint's spacing when the structure already spans ``min_pixels`` at it (its slices widened to hold
        ``field`` all the same).
    """
    return supports_scale(preprocessing, [(mask, spacing, field)], min_pixels, max_size)


def supports_scale(preprocessing: dict, supports: Sequence[tuple[np.ndarray, Sequence[float], Sequence[float]]],
                   min_pixels: int = MIN_PIXELS, max_size: int = 128) -> dict:
    """`structure_scale` for several supports, ``(mask, spacing, field)`` each: the thinnest structure sets the
    spacing (never finer than the finest scan's pixels), and the slices hold the widest field of view at it, so
    that no support's structure is cropped away (a tumour-centred crop beside a whole scan lost every voxel of
    the whole scan's structure at the crop's slice size; a review). The order of the supports does not matter.

    When every structure is thick enough at the checkpoint's spacing, that spacing is kept, and the slices still
    hold the widest field (up to ``max_size``): a 500 mm body at the checkpoint's 80 slices of 4.5 mm lost 62% of
    a lateral support structure (a review). `imaging_meta.commands.segment` warns when a support's structure
    reaches the edge of its slices all the same."""
    return scale_and_shortfall(preprocessing, supports, min_pixels, max_size)[0]


def scale_and_shortfall(preprocessing: dict, supports: Sequence[tuple[np.ndarray, Sequence[float], Sequence[float]]],
                        min_pixels: int = MIN_PIXELS, max_size: int = 128) -> tuple[dict, float | None]:
    """`supports_scale`, and the pixels the thinnest structure spans where the widest body had to fit
    ``max_size`` pixels and so set a spacing coarser than the structure asked for (finer than the checkpoint's and
    than the scans' pixels); None where it did not (a review: the docs promised ``min_pixels``)."""
    coarse = float(min(preprocessing["spacing"]))
    thinnest = min(structure_extent_mm(mask, spacing) for mask, spacing, _ in supports)
    wanted = thinnest / float(min_pixels)
    fov = max(max(float(field[0]), float(field[1])) for _, _, field in supports)
    native = min(float(min(spacing[0], spacing[1])) for _, spacing, _ in supports)
    new = coarse if wanted >= coarse else min(coarse, float(max(wanted, native, fov / max_size)))
    held = _holding(preprocessing, fov / new, max_size)
    if new >= coarse:  # the checkpoint's own spacing
        return held, None
    return {**held, "spacing": [new, new]}, (thinnest / new if new > max(wanted, native) else None)


def _holding(preprocessing: dict, pixels: float, max_size: int) -> dict:
    """``preprocessing`` with its slices widened (to a multiple of 16, at most ``max_size``) to hold ``pixels``;
    never narrower than the checkpoint's, which its network was trained on (a U-Net's deepest level would shrink
    to one pixel on a small field of view); a copy of it unchanged when they already hold them."""
    side = min(max_size, int(math.ceil(pixels / 16.0)) * 16)
    size = [max(side, int(n)) for n in preprocessing["slice_size"]]
    if size == [int(n) for n in preprocessing["slice_size"]]:
        return dict(preprocessing)
    return {**preprocessing, "slice_size": size}
