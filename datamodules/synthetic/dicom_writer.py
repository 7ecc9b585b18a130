"""Write a volume as a deterministic single-frame DICOM series (CT or MR Image Storage)."""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.datadict import tag_for_keyword
from pydicom.dataset import FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
_SOP_CLASS = {"CT": CT_IMAGE_STORAGE, "MR": MR_IMAGE_STORAGE}

#: multiply a RAS+ vector by this to get the DICOM LPS+ vector (and back).
RAS_TO_LPS = np.array([-1.0, -1.0, 1.0])

#: header values written when the caller's ``header`` does not give them.
_HEADER_DEFAULTS: dict[str, Any] = {
    "PatientName": "",
    "PatientID": "",
    "PatientBirthDate": "",
    "PatientSex": "",
    "StudyDate": "20240101",
    "StudyTime": "120000",
    "ReferringPhysicianName": "",
    "AccessionNumber": "",
    "StudyID": "1",
    "SeriesNumber": 1,
    "Manufacturer": "",
}


def _ds_str(x: float, decimals: int = 4) -> str:
    """A DICOM decimal string (at most 16 characters) without a negative zero."""
    v = round(float(x), decimals)
    if v == 0:
        v = 0.0
    s = f"{v:.{decimals}f}".rstrip("0").rstrip(".")
    if len(s) > 16:
        raise ValueError(f"value {x} does not fit a DICOM decimal string; use coordinates within +-1e10 mm")
    return s


def _uid(rng: np.random.Generator) -> str:
    """A DICOM UID whose entropy comes from ``rng`` (deterministic for a seeded generator)."""
    return str(generate_uid(entropy_srcs=[rng.bytes(16).hex()]))


@dataclass
class _SliceGeometry:
    """The DICOM (LPS) geometry of a voxel grid whose axis 2 is the slice axis.

    Attributes:
        cols: (3, 3) voxel axes in LPS mm (column ``a`` is the step along voxel axis ``a``).
        spacing: (3,) length of each voxel axis in mm.
        row_cos: (3,) unit direction of voxel axis 0 (DICOM row cosine).
        col_cos: (3,) unit direction of voxel axis 1 (DICOM column cosine).
        normal: (3,) slice normal, ``row_cos x col_cos``.
        step: signed distance between consecutive slices along ``normal`` (mm).
        origin: (3,) LPS centre of voxel ``(0, 0, 0)``.
    """

    cols: np.ndarray
    spacing: np.ndarray
    row_cos: np.ndarray
    col_cos: np.ndarray
    normal: np.ndarray
    step: float
    origin: np.ndarray


def _check_inputs(
    volume: Any,
    affine_ras: Any,
    modality: str,
    slope: float,
    header: dict[str, Any],
    file_names: Sequence[str] | None,
) -> tuple[np.ndarray, np.ndarray, str]:
    """Check the arguments of `write_dicom_series`; return (volume, affine_ras as float64, upper-case modality)."""
    volume = np.asarray(volume)
    if volume.ndim != 3 or min(volume.shape) < 1:
        raise ValueError(f"volume must be a 3-D array (X, Y, Z), got shape {volume.shape}")
    affine_ras = np.asarray(affine_ras, dtype=np.float64)
    if affine_ras.shape != (4, 4):
        raise ValueError(f"affine_ras must be a 4x4 matrix, got shape {affine_ras.shape}")
    modality = modality.upper()
    if modality not in _SOP_CLASS:
        raise ValueError(f"modality {modality!r} is not supported; use 'CT' or 'MR'")
    if slope == 0:
        raise ValueError("slope must be non-zero (RescaleSlope); use 1.0 for no scaling")
    nz = volume.shape[2]
    if file_names is not None and len(file_names) != nz:
        raise ValueError(f"file_names has {len(file_names)} names for {nz} slices; give one name per slice")
    unknown = [k for k in header if tag_for_keyword(k) is None]
    if unknown:
        raise ValueError(f"header keys {unknown} are not DICOM keywords; use pydicom keywords such as 'PatientName'")
    return volume, affine_ras, modality


def _slice_geometry(affine_ras: np.ndarray) -> _SliceGeometry:
    """The LPS slice geometry of a RAS affine; `ValueError` when DICOM cannot store it."""
    cols = affine_ras[:3, :3] * RAS_TO_LPS[:, None]  # voxel axes in LPS
    spacing = np.linalg.norm(cols, axis=0)
    if np.any(spacing < 1e-9):
        raise ValueError(f"affine_ras has a zero-length voxel axis (spacings {spacing}); fix the affine")
    row_cos, col_cos = cols[:, 0] / spacing[0], cols[:, 1] / spacing[1]
    if abs(float(row_cos @ col_cos)) > 1e-4:
        raise ValueError("affine_ras axes 0 and 1 are not orthogonal; DICOM cannot store a sheared in-plane grid")
    normal = np.cross(row_cos, col_cos)
    step = float(cols[:, 2] @ normal)  # signed distance between consecutive slices along the normal
    if abs(step) < 1e-6:
        raise ValueError("affine_ras axis 2 lies in the image plane; axis 2 must be the slice axis")
    origin = affine_ras[:3, 3] * RAS_TO_LPS
    return _SliceGeometry(cols, spacing, row_cos, col_cos, normal, step, origin)


def _slice_file_names(
    nz: int, file_names: Sequence[str] | None, shuffle_names: bool, reverse: bool, rng: np.random.Generator
) -> list[str]:
    """One distinct file name per slice: the given names, random hex names, or ``IM_0001.dcm ...``."""
    if file_names is not None:
        names = [str(n) for n in file_names]
    elif shuffle_names:
        names = []
        while len(names) < nz:
            n = rng.bytes(8).hex() + ".dcm"
            if n not in names:
                names.append(n)
    else:
        names = [f"IM_{(nz - k if reverse else k + 1):04d}.dcm" for k in range(nz)]
    if len(set(names)) != nz:
        raise ValueError("file_names must be distinct")
    return names


def _stored_values(volume: np.ndarray, slope: float, intercept: float, signed: bool) -> np.ndarray:
    """``round((volume - intercept) / slope)`` clipped to int16 or uint16, like a scanner stores it."""
    dtype = np.dtype("<i2") if signed else np.dtype("<u2")
    info = np.iinfo(dtype)
    return np.clip(np.rint((volume.astype(np.float64) - intercept) / slope), info.min, info.max).astype(dtype)


def _series_template(
    header: dict[str, Any],
    modality: str,
    uids: tuple[str, str, str, str],
    geometry: _SliceGeometry,
    shape: tuple[int, int],
    slope: float,
    intercept: float,
    signed: bool,
) -> pydicom.Dataset:
    """The elements all slices share, already encoded.

    The template is written to memory and read back, so that its elements stay raw (already encoded) and
    only the per-slice elements are converted per file.

    Args:
        header: caller's DICOM keywords -> values.
        modality: "CT" or "MR".
        uids: (study, series, frame of reference, first SOP instance) UIDs.
        geometry: from `_slice_geometry`.
        shape: (X, Y) in-plane voxel counts: Columns and Rows.
        slope: RescaleSlope.
        intercept: RescaleIntercept.
        signed: PixelRepresentation 1 (int16) instead of 0 (uint16).

    Returns:
        The data set read back from its encoded bytes.
    """
    study_uid, series_uid, frame_uid, first_sop_uid = uids
    nx, ny = shape
    g = geometry
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(_SOP_CLASS[modality])
    meta.MediaStorageSOPInstanceUID = UID(first_sop_uid)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SOPClassUID = _SOP_CLASS[modality]
    ds.SOPInstanceUID = first_sop_uid
    for key, value in {**_HEADER_DEFAULTS, **header}.items():
        setattr(ds, key, value)
    ds.SeriesDate = ds.get("SeriesDate", ds.StudyDate)
    ds.SeriesTime = ds.get("SeriesTime", ds.StudyTime)
    ds.ContentDate = ds.get("ContentDate", ds.StudyDate)
    ds.ContentTime = ds.get("ContentTime", ds.StudyTime)
    ds.Modality = modality
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.FrameOfReferenceUID = frame_uid
    ds.PositionReferenceIndicator = ""
    ds.ImageOrientationPatient = [_ds_str(v, 6) for v in (*g.row_cos, *g.col_cos)]
    ds.PixelSpacing = [_ds_str(g.spacing[1], 6), _ds_str(g.spacing[0], 6)]
    ds.SliceThickness = _ds_str(abs(g.step), 6)
    ds.SpacingBetweenSlices = _ds_str(abs(g.step), 6)
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = ny
    ds.Columns = nx
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1 if signed else 0
    ds.RescaleIntercept = _ds_str(intercept, 6)
    ds.RescaleSlope = _ds_str(slope, 6)
    ds.RescaleType = "HU" if modality == "CT" else "US"
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return pydicom.dcmread(io.BytesIO(buf.getvalue()))


def _write_slices(
    template: pydicom.Dataset,
    stored: np.ndarray,
    geometry: _SliceGeometry,
    sop_uids: Sequence[str],
    names: Sequence[str],
    out_dir: Path,
    reverse: bool,
) -> list[Path]:
    """Write one file per slice of ``stored`` (X, Y, Z) from ``template``; return the paths in slice order."""
    nz = stored.shape[2]
    paths = []
    for k in range(nz):
        template.file_meta.MediaStorageSOPInstanceUID = UID(sop_uids[k])
        template.SOPInstanceUID = sop_uids[k]
        template.InstanceNumber = nz - k if reverse else k + 1
        position = geometry.origin + k * geometry.cols[:, 2]
        template.ImagePositionPatient = [_ds_str(v) for v in position]
        template.SliceLocation = _ds_str(float(position @ geometry.normal))
        template.add_new(0x7FE00010, "OW", np.ascontiguousarray(stored[:, :, k].T).tobytes())  # PixelData
        path = out_dir / names[k]
        template.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def write_dicom_series(
    volume: np.ndarray,
    affine_ras: np.ndarray,
    out_dir: str | os.PathLike,
    *,
    header: dict[str, Any],
    modality: str = "CT",
    reverse: bool = False,
    shuffle_names: bool = False,
    rng: np.random.Generator | None = None,
    slope: float = 1.0,
    intercept: float = -1024.0,
    signed: bool = False,
    file_names: Sequence[str] | None = None,
) -> list[Path]:
    """Write a volume as a DICOM series, one single-frame file per slice.

    The slice files get CT Image Storage (``modality="CT"``) or MR Image Storage (``"MR"``) SOP classes,
    explicit VR little endian file meta, and the geometry of ``affine_ras`` converted to DICOM LPS:
    ImageOrientationPatient is the direction of voxel axis 0 (row cosine, along which the column index
    grows) then of axis 1 (column cosine); ImagePositionPatient is the centre of voxel ``(0, 0, k)``;
    PixelSpacing is ``[spacing of axis 1, spacing of axis 0]``. Hence ``pixel_array[r, c] ==
    volume[c, r, k]`` (before rescale). Stored values are ``round((value - intercept) / slope)``,
    clipped to the 16-bit range like a scanner does.

    Args:
        volume: float array (X, Y, Z) in physical units (HU for CT) on the voxel grid of ``affine_ras``;
            axis 2 is the slice axis.
        affine_ras: 4x4 NIfTI-style voxel-to-world matrix (RAS+, mm). Axes 0 and 1 must be orthogonal;
            axis 2 must not lie in their plane.
        out_dir: folder for the files (created).
        header: DICOM keywords -> values for the series (Manufacturer, ManufacturerModelName,
            InstitutionName, PatientName, PatientID, PatientBirthDate, MagneticFieldStrength, ...).
        modality: "CT" or "MR".
        reverse: write InstanceNumber 1 at the last slice (``k = Z - 1``) instead of the first.
        shuffle_names: name the files with random hex strings that carry no ordering information.
        rng: generator for the UIDs and random names; ``None`` uses an unseeded one (output then differs
            between calls).
        slope: RescaleSlope.
        intercept: RescaleIntercept.
        signed: store int16 (PixelRepresentation 1) instead of uint16.
        file_names: explicit file names, one per slice in the order of axis 2 (overrides the naming).

    Returns:
        The written paths, in the order of volume axis 2 (``k = 0 .. Z - 1``).

    Raises:
        ValueError: on a volume that is not 3-D, a malformed affine, an unknown modality, a zero slope, an
            unknown header keyword, or a wrong number of file names.
    """
    volume, affine_ras, modality = _check_inputs(volume, affine_ras, modality, slope, header, file_names)
    nx, ny, nz = volume.shape
    geometry = _slice_geometry(affine_ras)
    if rng is None:
        rng = np.random.default_rng()
    # the draw order (study, series, frame, SOP UIDs, then names) fixes the bytes of every file
    study_uid, series_uid, frame_uid = _uid(rng), _uid(rng), _uid(rng)
    sop_uids = [_uid(rng) for _ in range(nz)]
    names = _slice_file_names(nz, file_names, shuffle_names, reverse, rng)
    stored = _stored_values(volume, slope, intercept, signed)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    template = _series_template(header, modality, (study_uid, series_uid, frame_uid, sop_uids[0]), geometry,
                                (nx, ny), slope, intercept, signed)
    return _write_slices(template, stored, geometry, sop_uids, names, out_dir, reverse)
