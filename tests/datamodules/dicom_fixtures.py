"""Tiny synthetic DICOM / NIfTI inputs for the scanner and reader tests, and ways to break them.

The writers are `datamodules.synthetic.demo.write_dicom_series` / `write_nifti`; the helpers here choose small
volumes, put distinctive fake PHI into every header, and damage files in the ways real data is damaged.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pydicom

from datamodules.synthetic.demo import write_dicom_series, write_nifti

# distinctive fake identifiers: privacy tests grep the saved index for them
FAKE_PHI = {
    "PatientName": "PHITEST^ALICE^Q",
    "PatientID": "PHITEST-ID-98765",
    "PatientBirthDate": "19010203",
    "InstitutionName": "Saint Phitest Hospital",
    "StationName": "PHITESTSTATION7",
}


def header(**overrides: Any) -> dict[str, Any]:
    """Series header: fake PHI, scanner fields, overrides last."""
    return {**FAKE_PHI, "Manufacturer": "ACME", "ManufacturerModelName": "Scanner 3000", **overrides}


def phantom(shape=(12, 10, 6), seed: int = 0) -> np.ndarray:
    """Integer-valued HU volume (X, Y, Z) with a bright box, exactly representable with intercept -1024."""
    rng = np.random.default_rng(seed)
    vol = rng.integers(-1000, 1000, size=shape).astype(np.float64)
    x, y, z = (s // 2 for s in shape)
    vol[x - 2 : x + 2, y - 2 : y + 2, max(z - 1, 0) : z + 1] = 1500.0
    return vol


def affine_ras(spacing=(1.5, 1.25, 3.0), origin=(10.0, -20.0, 30.0), rot_deg: float = 0.0, slice_sign: float = 1.0) -> np.ndarray:
    """A voxel -> RAS affine: optional in-plane rotation about z, slice axis along +z or -z."""
    a = np.deg2rad(rot_deg)
    rot = np.array([[np.cos(a), -np.sin(a), 0.0], [np.sin(a), np.cos(a), 0.0], [0.0, 0.0, 1.0]])
    # LPS-like axes as scanners store them: axis 0 to the left (-x in RAS), axis 1 to posterior (-y)
    aff = np.eye(4)
    aff[:3, :3] = rot @ np.diag([-spacing[0], -spacing[1], slice_sign * spacing[2]])
    aff[:3, 3] = origin
    return aff


def write_series(
    folder: Path,
    volume: np.ndarray | None = None,
    affine: np.ndarray | None = None,
    *,
    seed: int = 0,
    hdr: dict[str, Any] | None = None,
    **kw: Any,
) -> list[Path]:
    """Write a small CT series; returns the paths in the order of volume axis 2."""
    volume = phantom(seed=seed) if volume is None else volume
    affine = affine_ras() if affine is None else affine
    return write_dicom_series(volume, affine, folder, header=hdr or header(), rng=np.random.default_rng(seed), **kw)


def edit(path: Path, fn: Callable[[pydicom.Dataset], None]) -> None:
    """Read a DICOM file, change it with ``fn``, write it back."""
    ds = pydicom.dcmread(path)
    fn(ds)
    ds.save_as(path, enforce_file_format=True)


def truncate(path: Path, n_bytes: int = 100) -> None:
    """Cut the last ``n_bytes`` off a file (an interrupted copy)."""
    data = path.read_bytes()
    path.write_bytes(data[:-n_bytes])


def label_for(volume: np.ndarray, values=(1,)) -> np.ndarray:
    """A uint8 label map of the bright box of `phantom` (value ``values[0]``), plus extra values in a corner."""
    lab = np.zeros(volume.shape, np.uint8)
    lab[volume >= 1500] = values[0]
    for i, v in enumerate(values[1:]):
        lab[i, 0, 0] = v
    return lab


def write_reoriented_nifti(array: np.ndarray, affine: np.ndarray, path: Path, ornt) -> Path:
    """Write the same physical grid with permuted/flipped axes (``ornt`` as in nibabel.orientations)."""
    img = nib.Nifti1Image(np.asarray(array), affine).as_reoriented(np.asarray(ornt))
    return write_nifti(np.asarray(img.dataobj), img.affine, path)


__all__ = [
    "FAKE_PHI",
    "affine_ras",
    "edit",
    "header",
    "label_for",
    "phantom",
    "truncate",
    "write_nifti",
    "write_reoriented_nifti",
    "write_series",
]
