"""Read and check NIfTI volumes and label maps, and compare a label's voxel grid with its image's."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import nibabel as nib
import numpy as np
from nibabel.orientations import inv_ornt_aff, io_orientation, ornt_transform

from datamodules.indexing.inputs import Reject

#: a label grid matches its image when every grid corner lands within this fraction of a voxel (and 1 µm).
GRID_TOL_VOXELS = 0.05


def grid_mismatch(
    image_shape: Sequence[int],
    image_affine: np.ndarray,
    label_shape: Sequence[int],
    label_affine: np.ndarray,
    tol_mm: float | None = None,
) -> str | None:
    """Compare two voxel grids in a canonical orientation.

    The label grid is first re-expressed in the image's axis order and directions (a label stored with
    flipped or permuted axes but covering the same voxels is a match), then the image grid's corner voxels
    are mapped to world coordinates with both affines.

    Args:
        image_shape: (3,) image grid.
        image_affine: (4, 4) voxel -> world of the image.
        label_shape: (3,) label grid (trailing singleton dimensions allowed).
        label_affine: (4, 4) voxel -> world of the label.
        tol_mm: largest accepted corner distance; default `GRID_TOL_VOXELS` of the smallest image voxel.

    Returns:
        None when they match, else "shape ... vs ..., affine differs by ... mm".
    """
    image_shape = [int(s) for s in image_shape]
    label_shape = [int(s) for s in label_shape]
    while len(label_shape) > 3 and label_shape[-1] == 1:
        label_shape = label_shape[:-1]
    image_affine = np.asarray(image_affine, dtype=np.float64)
    label_affine = np.asarray(label_affine, dtype=np.float64)
    if tol_mm is None:
        tol_mm = max(1e-3, GRID_TOL_VOXELS * float(np.linalg.norm(image_affine[:3, :3], axis=0).min()))
    if len(label_shape) != 3:
        return f"shape {tuple(image_shape)} vs {tuple(label_shape)} (the label map is not 3D)"
    t = ornt_transform(io_orientation(label_affine), io_orientation(image_affine))
    aligned = label_affine @ inv_ornt_aff(t, label_shape)
    aligned_shape = [0, 0, 0]
    for i, (axis, _flip) in enumerate(t):
        aligned_shape[int(axis)] = label_shape[i]
    corners = np.array(
        [[i, j, k, 1.0] for i in (0, image_shape[0] - 1) for j in (0, image_shape[1] - 1) for k in (0, image_shape[2] - 1)]
    ).T
    dist = float(np.max(np.linalg.norm((image_affine @ corners - aligned @ corners)[:3], axis=0)))
    if aligned_shape != image_shape:
        permuted = f" (in the image's axis order: {tuple(aligned_shape)})" if aligned_shape != label_shape else ""
        return f"shape {tuple(image_shape)} vs {tuple(label_shape)}{permuted}, affine differs by {dist:.3g} mm"
    if dist > tol_mm:
        return (
            f"shape {tuple(image_shape)} vs {tuple(label_shape)}, affine differs by {dist:.3g} mm "
            f"(tolerance {tol_mm:.3g} mm)"
        )
    return None


@dataclass
class Volume:
    """An image's voxel grid: shape (3,) and voxel -> world affine (4, 4)."""

    shape: list[int]
    affine: np.ndarray


def load_nifti(path: str) -> tuple[Any, np.ndarray, list[int]]:
    """Header and data of a 3D NIfTI; `Reject` with the reason otherwise."""
    try:
        img: Any = nib.load(path)  # a spatial image (nibabel types it as the file-based base class)
    except Exception as e:
        raise Reject(
            f"cannot read the NIfTI header ({type(e).__name__}: {e}); the file is corrupt or not NIfTI - "
            "copy it again from the source, or rename it if it is another format"
        ) from e
    shape = [int(s) for s in img.shape]
    spatial = list(shape)
    while len(spatial) > 3 and spatial[-1] == 1:
        spatial.pop()
    if len(spatial) > 3:
        raise Reject(
            f"4D image (shape {tuple(shape)}): only 3D volumes are read; split it into one 3D file per "
            "channel or time point (e.g. `fslsplit`)"
        )
    if len(spatial) < 3:
        raise Reject(f"{len(spatial)}D image (shape {tuple(shape)}): a 3D volume is needed")
    affine = np.asarray(img.affine, dtype=np.float64)
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise Reject(f"invalid voxel-to-world affine (sform/qform) {affine.tolist()}; fix the header")
    try:
        data = np.asanyarray(img.dataobj)
    except Exception as e:
        raise Reject(
            f"cannot read the NIfTI data ({type(e).__name__}: {e}); the file is probably truncated or corrupt - "
            "copy it again from the source"
        ) from e
    if data.dtype.fields is not None:
        raise Reject(f"RGB/structured NIfTI data ({data.dtype}): not a grey-level volume")
    if np.iscomplexobj(data):
        raise Reject(f"complex-valued data ({data.dtype}): not a grey-level volume")
    return img, data.reshape(spatial), spatial


def check_image_data(data: np.ndarray, min_slices: int) -> None:
    """`Reject` an image that is too small along an axis, holds NaN/Inf, or is constant."""
    if min(data.shape) < min_slices:
        raise Reject(f"shape {tuple(data.shape)}: a volume needs at least {min_slices} voxels along every axis")
    if np.issubdtype(data.dtype, np.floating):
        bad = int(np.count_nonzero(~np.isfinite(data)))
        if bad:
            raise Reject(f"contains NaN/Inf values ({bad} voxels); fix or mask them before scanning")
    lo, hi = data.min(), data.max()
    if lo == hi:
        raise Reject(
            f"constant image (every voxel is {float(lo):g}): no usable content; export it again from the source "
            "or remove it"
        )


def label_values(path: str, rel: str, image: Volume) -> list[int]:
    """Check a label map against its image; return the non-zero values present."""
    try:
        img: Any = nib.load(path)
    except Exception as e:
        raise Reject(f"label map {rel}: cannot read the NIfTI header ({type(e).__name__}: {e})") from e
    try:
        mismatch = grid_mismatch(image.shape, image.affine, img.shape, np.asarray(img.affine, dtype=np.float64))
    except Exception as e:
        raise Reject(f"label map {rel}: cannot compare its grid with the image ({type(e).__name__}: {e})") from e
    if mismatch:
        raise Reject(f"label map {rel} does not match its image: {mismatch}; resample the label onto the image grid")
    try:
        data = np.asanyarray(img.dataobj)
    except Exception as e:
        raise Reject(f"label map {rel}: cannot read the data ({type(e).__name__}: {e}); the file may be truncated") from e
    return label_data_values(data, rel)


#: more distinct values than this, and a "label map" is an image (a CT or MR volume passed by mistake)
MAX_LABELS = 1000


def label_data_values(data: np.ndarray, rel: str) -> list[int]:
    """The non-zero values of a label map's data; `Reject` data that is no label map: NaN/Inf, non-integer or
    negative values, no background, no foreground, or more than `MAX_LABELS` distinct values (an image)."""
    if np.issubdtype(data.dtype, np.floating):
        if not np.all(np.isfinite(data)):
            raise Reject(f"label map {rel} contains NaN/Inf values; expected integer structure labels")
        frac = data != np.round(data)
        if frac.any():
            example = float(data[frac].flat[0])
            raise Reject(
                f"label map {rel} has non-integer values (e.g. {example:g}, {int(frac.sum())} voxels); expected "
                "integer structure labels - was it resampled with linear interpolation? use nearest neighbour"
            )
    elif not np.issubdtype(data.dtype, np.integer) and data.dtype != np.bool_:
        raise Reject(f"label map {rel} has data type {data.dtype}; expected integer structure labels")
    values = np.unique(data)
    if values.size > MAX_LABELS:
        raise Reject(
            f"label map {rel} has {values.size} distinct values (at most {MAX_LABELS} structures are expected): "
            "this looks like an image, not a label map - check which file is the label"
        )
    if values.size and values.min() < 0:
        raise Reject(f"label map {rel} has negative values (min {values.min():g}); expected labels >= 0")
    present = [int(v) for v in values if v != 0]
    if not present:
        raise Reject(f"label map {rel} is empty (no foreground voxel); remove it or label the structures")
    if values[0] != 0:
        raise Reject(
            f"label map {rel} has no background: every voxel is labelled ({', '.join(str(v) for v in present[:5])}"
            f"{', ...' if len(present) > 5 else ''}), so it is not a mask of structures - is it an image, or an "
            "inverted mask? Label the background 0, or remove it"
        )
    return present
