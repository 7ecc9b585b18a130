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
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from datamodules.indexing.volumes import spatial_unit
from datamodules.io.atomic import atomic_open

#: the largest distance, in voxels (of the smallest voxel size), at which the qform nibabel makes of an affine may
#: place a corner of the grid for it to stand for the affine: float32 rounding of the quaternion and offsets, and
#: the rounding of a DICOM orientation, stay far below; a gantry tilt's shear adds up over the slices, far above
QFORM_TOLERANCE_VOXELS = 0.01


def qform_holds(affine: np.ndarray, shape: tuple[int, ...]) -> bool:
    """Whether a NIfTI qform can stand for ``affine`` on a grid of ``shape``: every corner voxel it places within
    `QFORM_TOLERANCE_VOXELS` of where the affine places it (a shear cannot be held by a qform)."""
    affine = np.asarray(affine, dtype=np.float64)
    header = nib.Nifti1Header()
    header.set_qform(affine, code=1)
    n = [max(int(s), 1) - 1 for s in tuple(shape)[:3]]
    corners = np.array([[i, j, k, 1.0] for i in (0, n[0]) for j in (0, n[1]) for k in (0, n[2])]).T
    distance = np.linalg.norm(((header.get_qform() - affine) @ corners)[:3], axis=0).max()
    voxel = float(np.linalg.norm(affine[:3, :3], axis=0).min())
    return bool(distance <= QFORM_TOLERANCE_VOXELS * voxel)


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
    def scanner(cls, affine: np.ndarray, shape: tuple[int, ...]) -> NiftiGeometry:
        """A DICOM series' voxel-to-patient affine (converted to RAS) for a grid of ``shape``, in mm, as the DICOM
        converters write it: sform and qform with code 1, the qform not set where the affine has a shear."""
        affine = np.asarray(affine, dtype=np.float64)
        return cls(affine, 1, affine, 1 if qform_holds(affine, shape) else 0, 2)

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
            qform, q_code = sform, (s_code if qform_holds(sform, img.shape) else 0)
        return cls(np.asarray(sform, dtype=np.float64), s_code, np.asarray(qform, dtype=np.float64), q_code,
                   spatial_unit(img))


def save_nifti(array: np.ndarray, geometry: NiftiGeometry, path: Path, description: str = "", aux: str = "") -> Path:
    """Write ``array`` with a fresh header: nothing from the source header (no description, no aux file) but the
    ``geometry``, ``description`` (our own words) and ``aux`` (at most 23 ASCII characters: `segment` writes the
    `imaging_meta.commands.query_marks.query_mark` of the scan a mask is of).

    The file is complete or absent (`datamodules.io.atomic.atomic_open`): the gzip stream is written to a temporary
    file beside ``path``, which then takes its name."""
    img = nib.Nifti1Image(array, geometry.sform)
    img.set_sform(geometry.sform, code=int(geometry.sform_code))
    img.set_qform(geometry.qform, code=int(geometry.qform_code))
    img.header["xyzt_units"] = int(geometry.unit) & 0x07
    img.header["descrip"] = description.encode()
    img.header["aux_file"] = aux.encode("ascii")[:23]
    with atomic_open(path, "wb") as f, gzip.GzipFile(fileobj=f, mode="wb", compresslevel=1, mtime=0) as gz:
        img.to_file_map({"image": nib.FileHolder(fileobj=gz)})  # nibabel's own .nii.gz level
    return path


def nifti_description(name: str, suffix: str = "") -> str:
    """A NIfTI description (79 bytes at most) of a written map: the product, the structure's name and ``suffix``.
    A name too long to fit is shortened (never the suffix, never inside a character) and ends in ``~`` and 8 hex
    digits of its whole text's SHA-1, so that two names that differ only past the cut still tell their masks
    apart (a review: `segment` compares the descriptions, and took the second structure's run for the first's)."""
    prefix, budget = "imaging-meta segment: ", 79
    room = budget - len(prefix.encode()) - len(suffix.encode())
    if len(name.encode()) > room:
        tag = "~" + hashlib.sha1(name.encode()).hexdigest()[:8]
        while len(name.encode()) > room - len(tag):
            name = name[:-1]
        name += tag
    return prefix + name + suffix
