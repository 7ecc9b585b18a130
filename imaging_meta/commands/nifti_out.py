"""The NIfTI files ``imaging-meta segment`` writes: a mask or probability map on a query's own voxels, with a fresh
header that carries the query's geometry and nothing else.

A reader places a NIfTI image by its sform or by its qform, depending on the tool: nibabel and MONAI take the
sform when its code is set, ITK-based tools (ITK-SNAP, 3D Slicer, SimpleITK) may take the qform. So a mask
copies both of its query's exactly (`NiftiGeometry.of`): wherever a tool draws the query, it draws the mask on
the same voxels. A qform is a rotation, voxel sizes and an offset, and cannot hold a shear (a DICOM series
acquired with gantry tilt has one): where it cannot equal the affine, its code is 0 ("not set"), never an
approximation tens of millimetres off (`qform_holds`).
"""

from __future__ import annotations

import gzip
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from datamodules.indexing.volumes import spatial_unit
from datamodules.io.atomic import atomic_open

#: the largest difference (in the affine's unit) between an affine and the qform nibabel makes of it, for the
#: qform to stand for it: float32 rounding of the quaternion and offsets stays far below, a shear far above
QFORM_TOLERANCE = 1e-3


def qform_holds(affine: np.ndarray) -> bool:
    """Whether a NIfTI qform can equal ``affine`` (no shear; within `QFORM_TOLERANCE` at every element)."""
    header = nib.Nifti1Header()
    header.set_qform(np.asarray(affine, dtype=np.float64), code=1)
    return bool(np.abs(header.get_qform() - affine).max() <= QFORM_TOLERANCE * max(1.0, float(np.abs(affine).max())))


@dataclass(frozen=True)
class NiftiGeometry:
    """Where a written map lies: sform and qform with their codes (0 not set, 1 scanner, 2 aligned, 3 Talairach,
    4 MNI), and the spatial unit of both (the NIfTI code: 0 unknown, 1 metre, 2 mm, 3 micron)."""

    sform: np.ndarray
    sform_code: int
    qform: np.ndarray
    qform_code: int
    unit: int = 2

    @classmethod
    def scanner(cls, affine: np.ndarray) -> NiftiGeometry:
        """A DICOM series' voxel-to-patient affine (converted to RAS), in mm, as the DICOM converters write it:
        sform and qform with code 1, the qform not set where the affine has a shear."""
        affine = np.asarray(affine, dtype=np.float64)
        return cls(affine, 1, affine, 1 if qform_holds(affine) else 0, 2)

    @classmethod
    def of(cls, img: Any) -> NiftiGeometry:
        """A NIfTI image's own sform and qform, codes and unit. One that is not set takes the other (a qform only
        where it can equal the sform); both not set stay not set, on nibabel's fallback affine."""
        header = img.header
        s_code, q_code = int(header["sform_code"]), int(header["qform_code"])
        sform, qform = header.get_sform(), header.get_qform()
        if s_code == 0 and q_code == 0:
            sform = qform = np.asarray(img.affine, dtype=np.float64)
        elif s_code == 0:
            sform, s_code = qform, q_code
        elif q_code == 0:
            qform, q_code = sform, (s_code if qform_holds(sform) else 0)
        return cls(np.asarray(sform, dtype=np.float64), s_code, np.asarray(qform, dtype=np.float64), q_code,
                   spatial_unit(img))


def save_nifti(array: np.ndarray, geometry: NiftiGeometry, path: Path, description: str = "") -> Path:
    """Write ``array`` with a fresh header: nothing from the source header (no description, no aux file) but the
    ``geometry``, and ``description`` (our own words).

    The file is complete or absent (`datamodules.io.atomic.atomic_open`): the gzip stream is written to a temporary
    file beside ``path``, which then takes its name."""
    img = nib.Nifti1Image(array, geometry.sform)
    img.set_sform(geometry.sform, code=int(geometry.sform_code))
    img.set_qform(geometry.qform, code=int(geometry.qform_code))
    img.header["xyzt_units"] = int(geometry.unit) & 0x07
    img.header["descrip"] = description.encode()
    img.header["aux_file"] = b""
    with atomic_open(path, "wb") as f, gzip.GzipFile(fileobj=f, mode="wb", compresslevel=1, mtime=0) as gz:
        img.to_file_map({"image": nib.FileHolder(fileobj=gz)})  # nibabel's own .nii.gz level
    return path


def nifti_description(name: str, suffix: str = "") -> str:
    """A NIfTI description (79 bytes at most) of a written map: the product, the structure's name (shortened to
    fit, never the suffix) and ``suffix``."""
    prefix, budget = "imaging-meta segment: ", 79
    room = budget - len(prefix.encode()) - len(suffix.encode())
    while len(name.encode()) > room:
        name = name[:-1]
    return prefix + name + suffix
