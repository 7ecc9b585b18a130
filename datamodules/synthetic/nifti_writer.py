"""Write NIfTI-1 files whose bytes depend only on the array and the affine."""

from __future__ import annotations

import gzip
import os
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np


def _deterministic_gzip(raw: bytes, path: Path) -> None:
    """Gzip ``raw`` into ``path`` with ``mtime=0`` and no embedded file name (the same bytes every time)."""
    with open(path, "wb") as f, gzip.GzipFile(filename="", mode="wb", fileobj=f, mtime=0, compresslevel=6) as gz:
        gz.write(raw)


def write_nifti(array: np.ndarray, affine: np.ndarray, path: str | os.PathLike, dtype: Any = None) -> Path:
    """Write a NIfTI-1 file with the affine as both qform and sform (code 1, scanner), in mm.

    ``.nii.gz`` files are compressed with ``mtime=0`` and no embedded file name, so the same array and
    affine always give the same bytes.

    Args:
        array: the voxel data (X, Y, Z[, ...]).
        affine: 4x4 voxel-to-world matrix (RAS+, mm).
        path: ``.nii`` or ``.nii.gz`` file to write.
        dtype: on-disk data type. ``None`` keeps the array's type, except float64 -> float32,
            int64 -> int32 and bool -> uint8.

    Returns:
        The path written.

    Raises:
        ValueError: on a non-4x4 affine, a path that is not ``.nii``/``.nii.gz``, or int64 data out of the
            int32 range without an explicit ``dtype``.
    """
    path = Path(path)
    if not (path.name.endswith(".nii") or path.name.endswith(".nii.gz")):
        raise ValueError(f"{path}: NIfTI file names must end with .nii or .nii.gz")
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4):
        raise ValueError(f"affine must be a 4x4 matrix, got shape {affine.shape}")
    arr = np.asarray(array)
    if dtype is None:
        if arr.dtype == np.bool_:
            dtype = np.uint8
        elif arr.dtype == np.float64:
            dtype = np.float32
        elif arr.dtype == np.int64:
            if arr.size and (arr.min() < np.iinfo(np.int32).min or arr.max() > np.iinfo(np.int32).max):
                raise ValueError(f"{path}: int64 data exceeds the int32 range; pass dtype explicitly")
            dtype = np.int32
        else:
            dtype = arr.dtype
    arr = arr.astype(dtype, copy=False)
    img = nib.Nifti1Image(arr, affine)
    img.header.set_data_dtype(arr.dtype)
    img.header.set_xyzt_units("mm", "sec")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    raw = img.to_bytes()
    if path.name.endswith(".gz"):
        _deterministic_gzip(raw, path)
    else:
        path.write_bytes(raw)
    return path
