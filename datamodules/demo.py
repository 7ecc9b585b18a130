"""A deterministic synthetic multi-site abdominal cohort that exercises the real readers.

`generate_demo_cohort` writes four "scanner sites" with the formats and the problems of real data:

==================  =========================================  =====================  ===========  =========
site (folder)       format, vendor / model                     matrix @ in-plane      slices       voxel axes
==================  =========================================  =====================  ===========  =========
A ct_northfield     CT DICOM, SIEMENS SOMATOM Definition AS     96 x 96 @ 3.6 mm      64 @ 4.0 mm  L, P, S
B ct_harbor         CT DICOM, GE MEDICAL SYSTEMS LightSpeed VCT 80 x 80 @ 4.4 mm      52 @ 5.0 mm  L, P, S
C mr_bids           MR BIDS NIfTI (T1w), Philips Ingenia 1.5 T  72 x 72 @ 4.8 mm      58 @ 4.5 mm  R, A, S
D mr_decathlon      MR MSD NIfTI (T2w), SIEMENS Skyra 3 T       64 x 64 @ 5.2 mm      44 @ 6.0 mm  L, P, S
==================  =========================================  =====================  ===========  =========

Site A stores uint16 with slope 1, intercept -1024 and natural slice order (IM_0001.dcm ...). Site B stores
int16 with slope 0.5, intercept 0, InstanceNumber 1 at the most superior slice (reversed) and random hex file
names. Site C is int16 NIfTI, site D float32 NIfTI with an LPS-oriented affine. Label maps (uint8,
`ORGANS` values) share the image's voxel grid and affine; for DICOM that is the grid a reader gets by sorting
the slices by position along the slice normal.

The anatomy is an analytic phantom defined in patient coordinates (mm, RAS+) and sampled directly on
each site's voxel grid, so image and label map share one physical grid and nothing is resampled.
Every patient gets its own body size, organ sizes, positions and rotations, table position, and a
smooth random elastic displacement applied to every structure.

Lesions: every patient gets focal lesions in the liver, spleen and kidneys (`LESION_TYPES`: 18 classes such
as cyst, haemangioma, metastasis, hepatocellular carcinoma, focal nodular hyperplasia, angiomyolipoma,
infarct). A class is a geometry (round, lobulated, irregular, spiculated or wedge-shaped; sharp or
ill-defined margin; homogeneous, rim, peripheral nodules, central scar, mosaic or layered inside) and
physical tissue properties (unenhanced HU, arterial and portal-venous enhancement, relative T1 and T2
signal) that each site renders through its own intensity model: site A is a portal-venous CT, site B a
noisier late-arterial CT, site C T1-weighted and site D T2-weighted MR, so a lesion class looks different at
every site. Class frequencies are unbalanced (cysts in every patient, some classes in one patient of six);
`draw_lesion_classes` guarantees that 12 patients per site give every class at least 14 lesions in at least
8 patients. Lesions are 6-40 mm across, do not overlap, lie inside their organ (they keep the organ's label
in the label maps) and are listed in ``lesions.csv`` at the cohort root, in the lesion-CSV input format of
`datamodules.lesion_csv` (image, class, world centre x/y/z in DICOM LPS mm, size_mm, plus the host organ).

Coordinates: NIfTI world coordinates are RAS+ (nibabel "Coordinate systems and affines"): x increases
towards the subject's Right, y towards Anterior, z towards Superior. The liver, on the patient's right,
therefore has x > 0 here; the spleen, on the left, has x < 0. DICOM patient coordinates are LPS+ (x to the
Left, y to Posterior), i.e. the RAS vector with its first two components negated.

Every file is byte-identical for a given seed: random numbers come from per-site, per-patient seed
sequences, DICOM UIDs are derived from those generators, header dates are fixed and gzip streams are
written with ``mtime=0`` and no file name.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import os
import secrets
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pydicom
from pydicom.datadict import tag_for_keyword
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from scipy.ndimage import distance_transform_edt, gaussian_filter

ORGANS: dict[int, str] = {
    1: "liver",
    2: "spleen",
    3: "kidney_right",
    4: "kidney_left",
    5: "stomach",
    6: "gallbladder",
    7: "aorta",
    8: "inferior_vena_cava",
    9: "vertebrae",
    10: "psoas",
    11: "paraspinal_muscles",
}

MARKER = ".imaging-meta-demo.json"
DEMO_VERSION = 2

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
_SOP_CLASS = {"CT": CT_IMAGE_STORAGE, "MR": MR_IMAGE_STORAGE}

_RAS_TO_LPS = np.array([-1.0, -1.0, 1.0])


# ============================================================================ writers
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
    nx, ny, nz = volume.shape
    if file_names is not None and len(file_names) != nz:
        raise ValueError(f"file_names has {len(file_names)} names for {nz} slices; give one name per slice")
    unknown = [k for k in header if tag_for_keyword(k) is None]
    if unknown:
        raise ValueError(f"header keys {unknown} are not DICOM keywords; use pydicom keywords such as 'PatientName'")

    cols = affine_ras[:3, :3] * _RAS_TO_LPS[:, None]  # voxel axes in LPS
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
    origin = affine_ras[:3, 3] * _RAS_TO_LPS

    if rng is None:
        rng = np.random.default_rng()
    study_uid, series_uid, frame_uid = _uid(rng), _uid(rng), _uid(rng)
    sop_uids = [_uid(rng) for _ in range(nz)]
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

    dtype = np.dtype("<i2") if signed else np.dtype("<u2")
    info = np.iinfo(dtype)
    stored = np.clip(np.rint((volume.astype(np.float64) - intercept) / slope), info.min, info.max).astype(dtype)

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    defaults: dict[str, Any] = {
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
    # The shared elements are encoded once: the template is written to memory and read back, so that
    # its elements stay raw (already encoded) and only the per-slice elements are converted per file.
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = _SOP_CLASS[modality]
    meta.MediaStorageSOPInstanceUID = sop_uids[0]
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SOPClassUID = _SOP_CLASS[modality]
    ds.SOPInstanceUID = sop_uids[0]
    for key, value in {**defaults, **header}.items():
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
    ds.ImageOrientationPatient = [_ds_str(v, 6) for v in (*row_cos, *col_cos)]
    ds.PixelSpacing = [_ds_str(spacing[1], 6), _ds_str(spacing[0], 6)]
    ds.SliceThickness = _ds_str(abs(step), 6)
    ds.SpacingBetweenSlices = _ds_str(abs(step), 6)
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
    template = pydicom.dcmread(io.BytesIO(buf.getvalue()))

    paths = []
    for k in range(nz):
        template.file_meta.MediaStorageSOPInstanceUID = sop_uids[k]
        template.SOPInstanceUID = sop_uids[k]
        template.InstanceNumber = nz - k if reverse else k + 1
        position = origin + k * cols[:, 2]
        template.ImagePositionPatient = [_ds_str(v) for v in position]
        template.SliceLocation = _ds_str(float(position @ normal))
        template.add_new(0x7FE00010, "OW", np.ascontiguousarray(stored[:, :, k].T).tobytes())  # PixelData
        path = out_dir / names[k]
        template.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def _deterministic_gzip(raw: bytes, path: Path) -> None:
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


# ============================================================================ the phantom
# Tissue codes of the phantom (not the label values).
AIR, FAT, MUSCLE, VISCERA, CORTICAL, CANCELLOUS, DISC, CANAL, AORTA, IVC, TABLE = range(11)
LIVER, SPLEEN, KIDNEY_CORTEX, KIDNEY_MEDULLA, STOMACH, STOMACH_GAS, GALLBLADDER = range(11, 18)
_N_TISSUES = 18
_ORGAN_TISSUE = {1: LIVER, 2: SPLEEN, 3: KIDNEY_CORTEX, 4: KIDNEY_CORTEX, 5: STOMACH, 6: GALLBLADDER}

# Organ templates in body coordinates (mm, RAS+, z = 0 near L1), for a nominal 300 x 230 mm body:
# centre, semi-axes, (yaw about z, pitch about x, roll about y) in degrees, taper of the y/z axes along x.
# Painted in this order; later organs win where shapes overlap (the gallbladder sits in the liver's fossa).
_TEMPLATES: dict[int, dict[str, Any]] = {
    1: dict(c=(55.0, 5.0, 55.0), s=(88.0, 78.0, 75.0), rot=(10.0, 0.0, 0.0), taper=0.4),  # liver, right
    5: dict(c=(-42.0, 36.0, 70.0), s=(52.0, 36.0, 45.0), rot=(35.0, 0.0, 10.0), taper=0.0),  # stomach, left-anterior
    2: dict(c=(-86.0, -40.0, 65.0), s=(28.0, 50.0, 40.0), rot=(-35.0, 0.0, 0.0), taper=0.0),  # spleen, left-posterior
    3: dict(c=(64.0, -50.0, -8.0), s=(28.0, 25.0, 48.0), rot=(25.0, 0.0, 12.0), taper=0.0),  # right kidney, lower
    4: dict(c=(-64.0, -50.0, 10.0), s=(28.0, 25.0, 48.0), rot=(-25.0, 0.0, -12.0), taper=0.0),  # left kidney
    6: dict(c=(46.0, 42.0, 10.0), s=(14.0, 16.0, 28.0), rot=(0.0, 20.0, 0.0), taper=0.0),  # gallbladder
}


def _rotation(yaw: float, pitch: float, roll: float) -> np.ndarray:
    a, b, c = np.deg2rad([yaw, pitch, roll])
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    ry = np.array([[np.cos(c), 0, np.sin(c)], [0, 1, 0], [-np.sin(c), 0, np.cos(c)]])
    return rz @ rx @ ry


def _random_waves(rng: np.random.Generator, n: int, wavelength: tuple[float, float], amp: tuple[float, float]):
    """Parameters of a sum of ``n`` plane waves with random directions, wavelengths and phases."""
    d = rng.normal(size=(n, 3))
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    k = d * (2 * np.pi / rng.uniform(*wavelength, size=(n, 1)))
    return k.astype(np.float32), rng.uniform(0, 2 * np.pi, n).astype(np.float32), rng.uniform(*amp, n).astype(np.float32)


def _eval_waves(waves, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
    k, phase, amp = waves
    out = np.zeros(np.broadcast_shapes(x.shape, y.shape, z.shape), np.float32)
    for i in range(len(phase)):
        out += amp[i] * np.sin(k[i, 0] * x + k[i, 1] * y + k[i, 2] * z + phase[i])
    return out


@dataclass
class _Organ:
    value: int
    centre: np.ndarray
    semi: np.ndarray
    rot: np.ndarray
    taper: float
    bumps: tuple[np.ndarray, np.ndarray, np.ndarray]  # directions (n, 3), frequencies (n,), phases (n,)
    bump_amp: np.ndarray


class _Patient:
    """One random anatomy: body habitus, organ shapes and a smooth elastic displacement, in mm (RAS+)."""

    def __init__(self, rng: np.random.Generator):
        self.ax = rng.uniform(138.0, 160.0)  # body semi-axes (left-right, anterior-posterior)
        self.ay = rng.uniform(104.0, 124.0)
        self.fat = rng.uniform(12.0, 28.0)
        self.muscle = rng.uniform(8.0, 13.0)
        self.shift = np.array([rng.uniform(-8, 8), rng.uniform(-6, 6)])  # body centre off the table centre
        self.z_jitter = rng.uniform(-10.0, 10.0)
        self.vertebra_phase = rng.uniform(0, 32.0)
        self.rib_phase = rng.uniform(0, 2 * np.pi)
        sx, sy = self.ax / 150.0, self.ay / 115.0
        scale = rng.uniform(0.92, 1.08)
        self.organs: list[_Organ] = []
        for value, t in _TEMPLATES.items():
            c = np.array(t["c"]) * np.array([sx, sy, 1.0]) + np.clip(rng.normal(0, [5.0, 4.0, 5.0]), -10, 10)
            s = np.array(t["s"]) * scale * rng.uniform(0.88, 1.12, 3)
            yaw, pitch, roll = t["rot"]
            rot = _rotation(yaw + rng.uniform(-10, 10), pitch + rng.uniform(-6, 6), roll + rng.uniform(-6, 6))
            n_b = 4
            dirs = rng.normal(size=(n_b, 3))
            dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
            bumps = (dirs.astype(np.float32), rng.uniform(1.5, 3.5, n_b).astype(np.float32),
                     rng.uniform(0, 2 * np.pi, n_b).astype(np.float32))
            self.organs.append(_Organ(value, c, s, rot, t["taper"], bumps, rng.uniform(0.02, 0.06, n_b).astype(np.float32)))
        # elastic displacement: three components, each a sum of three long-wavelength waves (mm)
        self.elastic = [_random_waves(rng, 3, (120.0, 320.0), (1.5, 4.0)) for _ in range(3)]
        self.bias = _random_waves(rng, 3, (350.0, 700.0), (0.3, 0.5))
        self.sex = "F" if rng.random() < 0.5 else "M"

    def organ_mask(self, o: _Organ, x: np.ndarray, y: np.ndarray, z: np.ndarray):
        """Inside mask and normalised radius (inf far outside) of one organ at body coordinates (x, y, z)."""
        # only voxels in a bounding cube can be inside: evaluate the shape there
        reach = float(o.semi.max()) * (1.0 + float(o.bump_amp.sum())) * (1.0 + o.taper) + 1.0
        box = ((np.abs(x - np.float32(o.centre[0])) < reach) & (np.abs(y - np.float32(o.centre[1])) < reach)
               & (np.abs(z - np.float32(o.centre[2])) < reach))
        sel = np.flatnonzero(box)
        px = x.ravel()[sel] - np.float32(o.centre[0])
        py = y.ravel()[sel] - np.float32(o.centre[1])
        pz = z.ravel()[sel] - np.float32(o.centre[2])
        r = o.rot.astype(np.float32)
        s = o.semi.astype(np.float32)
        ux = (r[0, 0] * px + r[1, 0] * py + r[2, 0] * pz) / s[0]
        uy = (r[0, 1] * px + r[1, 1] * py + r[2, 1] * pz) / s[1]
        uz = (r[0, 2] * px + r[1, 2] * py + r[2, 2] * pz) / s[2]
        if o.taper:
            t = np.maximum(np.float32(1.0) + np.float32(o.taper) * ux, np.float32(0.3))  # thinner on the left
            uy, uz = uy / t, uz / t
        rad = np.sqrt(ux * ux + uy * uy + uz * uz) + np.float32(1e-6)
        dirs, freq, phase = o.bumps
        eps = np.zeros_like(rad)
        for i in range(len(freq)):
            proj = (dirs[i, 0] * ux + dirs[i, 1] * uy + dirs[i, 2] * uz) / rad
            eps += o.bump_amp[i] * np.sin(freq[i] * np.float32(np.pi) * proj + phase[i])
        inside = np.zeros(x.shape, bool)
        radius = np.full(x.shape, np.inf, np.float32)
        inside.ravel()[sel] = rad < 1.0 + eps
        radius.ravel()[sel] = rad
        return inside, radius

    def render(self, x: np.ndarray, y: np.ndarray, z: np.ndarray, z_anchor: float, table: bool):
        """Tissue codes and organ labels on world coordinates (x, y, z) in mm.

        Args:
            x, y, z: world (RAS+) coordinates of the voxel centres, each shaped like the grid.
            z_anchor: world z of body coordinate z = 0.
            table: draw the CT table under the patient.

        Returns:
            (tissue uint8, label uint8), each shaped like the grid.
        """
        bx = (x - self.shift[0]).astype(np.float32)
        by = (y - self.shift[1]).astype(np.float32)
        bz = (z - z_anchor - self.z_jitter).astype(np.float32)
        qx = bx + _eval_waves(self.elastic[0], bx, by, bz)
        qy = by + _eval_waves(self.elastic[1], bx, by, bz)
        qz = bz + _eval_waves(self.elastic[2], bx, by, bz)
        shape = qx.shape
        tissue = np.full(shape, AIR, np.uint8)
        label = np.zeros(shape, np.uint8)

        def ellipse(cx, cy, ax, ay):
            return ((qx - cx) / ax) ** 2 + ((qy - cy) / ay) ** 2 < 1.0

        ax, ay = self.ax, self.ay
        if table:
            table_top = -ay - 4.0
            tissue[(qy < table_top) & (qy > table_top - 9.0) & (np.abs(qx) < 230.0)] = TABLE
        body = ellipse(0, 0, ax, ay)
        tissue[body] = FAT
        wall_a, wall_b = ax - self.fat, ay - self.fat
        tissue[ellipse(0, 0, wall_a, wall_b)] = MUSCLE
        cav_a, cav_b = wall_a - self.muscle, wall_b - self.muscle
        cavity = ellipse(0, 0, cav_a, cav_b)
        y_vb = -ay + 60.0  # vertebral body centre
        paraspinal = ellipse(0, y_vb - 36.0, 50.0, 22.0) & ellipse(0, 0, wall_a, wall_b)
        cavity &= ~paraspinal
        tissue[cavity] = VISCERA
        tissue[paraspinal] = MUSCLE
        label[paraspinal] = 11
        # ribs: bony bands in the inner abdominal wall of the upper abdomen, descending anteriorly
        theta = np.arctan2(qy / wall_b, qx / wall_a)
        ring = ellipse(0, 0, cav_a + 9.0, cav_b + 9.0) & ~ellipse(0, 0, cav_a, cav_b)
        band = np.cos(2 * np.pi * (qz + 30.0 * np.sin(theta)) / 32.0 + self.rib_phase) > 0.55
        tissue[ring & band & (np.abs(np.cos(theta)) > 0.3) & (qz > 15.0)] = CORTICAL
        # psoas muscles, thickening caudally
        r_psoas = 7.0 + np.clip(-qz, 0, None) * 0.15
        psoas = (((np.abs(qx) - 42.0) ** 2 + (qy - y_vb + 4.0) ** 2) < r_psoas**2) & (qz < 40.0)
        tissue[psoas & cavity] = MUSCLE
        label[psoas & cavity] = 10

        # organs (inside the abdominal cavity only)
        for o in self.organs:
            inside, rad = self.organ_mask(o, qx, qy, qz)
            inside &= cavity
            label[inside] = o.value
            tissue[inside] = _ORGAN_TISSUE[o.value]
            if o.value in (3, 4):
                tissue[inside & (rad < 0.55)] = KIDNEY_MEDULLA
            elif o.value == 5:  # gas rises anteriorly in a supine patient
                gas = inside & (qy - o.centre[1] > 0.45 * o.semi[1]) & (rad < 0.85)
                tissue[gas] = STOMACH_GAS

        # spine and great vessels (painted last: they win over organ shapes that reach into them)
        vb = ellipse(0, y_vb, 22.0, 17.0)
        level = np.mod(qz - self.vertebra_phase, 32.0)
        disc = level < 7.0
        spine = np.zeros(shape, bool)
        cancellous = vb & ~disc & ellipse(0, y_vb, 19.5, 14.5)
        tissue[vb] = CORTICAL
        tissue[cancellous] = CANCELLOUS
        tissue[vb & disc] = DISC
        spine |= vb
        posterior = (ellipse(0, y_vb - 30.0, 13.0, 12.0) | ellipse(0, y_vb - 44.0, 5.0, 14.0)
                     | ellipse(0, y_vb - 24.0, 38.0, 5.0)) & ~disc
        tissue[posterior] = CORTICAL
        canal = ellipse(0, y_vb - 29.0, 8.0, 7.0)
        tissue[canal] = CANAL
        spine |= posterior | canal
        aorta = ellipse(-16.0, y_vb + 29.0, 11.0, 11.0)
        ivc = ellipse(22.0, y_vb + 27.0, 13.0, 9.0) & (qz < 90.0)
        tissue[aorta] = AORTA
        tissue[ivc] = IVC
        label[spine] = 9
        label[aorta] = 7
        label[ivc] = 8
        tissue[~body & (tissue != TABLE)] = AIR

        return tissue, label


# ============================================================================ the sites
# Per-tissue means (physical units) and texture amplitudes; missing tissues get 0.
_CT_BASE = {AIR: -1000, FAT: -100, MUSCLE: 50, VISCERA: 30, CORTICAL: 700, CANCELLOUS: 220, DISC: 80, CANAL: 15,
            AORTA: 40, IVC: 40, TABLE: 100, LIVER: 60, SPLEEN: 45, KIDNEY_CORTEX: 160, KIDNEY_MEDULLA: 100,
            STOMACH: 20, STOMACH_GAS: -1000, GALLBLADDER: 10}
_CT_TEXTURE = {FAT: 8, MUSCLE: 6, CANCELLOUS: 40, LIVER: 8, SPLEEN: 10, KIDNEY_CORTEX: 10, KIDNEY_MEDULLA: 10,
               STOMACH: 10, GALLBLADDER: 3, AORTA: 5, IVC: 8}


@dataclass(frozen=True)
class _Site:
    key: str
    letter: str
    modality: str
    fmt: str  # "dicom", "bids" or "decathlon"
    matrix: tuple[int, int]
    spacing: tuple[float, float]
    n_slices: int
    slice_spacing: float
    axes: str  # voxel axis codes: "LPS" or "RAS"
    manufacturer: str
    model: str
    institution: str
    field_strength: float | None
    means: dict[int, float]
    texture: dict[int, float]
    noise: float
    bias: float = 0.0
    #: how lesion tissue properties become intensities: ``offset + weights . (hu, arterial, portal, t1, t2)``
    #: (see `LesionType`); CT sites differ in contrast phase, MR sites in weighting.
    lesion_model: tuple[float, float, float, float, float, float] = (0.0, 1.0, 0.0, 1.0, 0.0, 0.0)


def _ct(offsets: dict[int, float], texture: dict[int, float] | None = None) -> tuple[dict, dict]:
    means = {t: v + offsets.get(t, 0.0) for t, v in _CT_BASE.items()}
    return means, {**_CT_TEXTURE, **(texture or {})}


_A_MEANS, _A_TEX = _ct({LIVER: 45, SPLEEN: 60, KIDNEY_CORTEX: 20, KIDNEY_MEDULLA: 70, AORTA: 120, IVC: 100, VISCERA: 10})
_B_MEANS, _B_TEX = _ct({LIVER: 15, SPLEEN: 75, KIDNEY_CORTEX: 90, KIDNEY_MEDULLA: 0, AORTA: 260, IVC: 20},
                       {SPLEEN: 25, KIDNEY_CORTEX: 14})
# T1-weighted, 1.5 T: fat bright, bile and fluid dark, liver above spleen.
_C_MEANS = {AIR: 0, FAT: 850, MUSCLE: 330, VISCERA: 260, CORTICAL: 20, CANCELLOUS: 600, DISC: 250, CANAL: 110,
            AORTA: 40, IVC: 60, LIVER: 520, SPLEEN: 380, KIDNEY_CORTEX: 420, KIDNEY_MEDULLA: 300, STOMACH: 150,
            STOMACH_GAS: 0, GALLBLADDER: 90}
_C_TEX = {FAT: 30, MUSCLE: 15, LIVER: 20, SPLEEN: 15, KIDNEY_CORTEX: 15, KIDNEY_MEDULLA: 15, STOMACH: 20,
          CANCELLOUS: 40, GALLBLADDER: 5}
# T2-weighted, 3 T: fluid (bile, stomach content, CSF) bright, spleen and kidneys above liver.
_D_MEANS = {AIR: 0, FAT: 1300, MUSCLE: 350, VISCERA: 800, CORTICAL: 40, CANCELLOUS: 700, DISC: 1500, CANAL: 2000,
            AORTA: 80, IVC: 120, LIVER: 480, SPLEEN: 1000, KIDNEY_CORTEX: 1100, KIDNEY_MEDULLA: 1350,
            STOMACH: 1900, STOMACH_GAS: 0, GALLBLADDER: 2300}
_D_TEX = {FAT: 80, MUSCLE: 40, LIVER: 50, SPLEEN: 80, KIDNEY_CORTEX: 60, KIDNEY_MEDULLA: 60, STOMACH: 120,
          CANCELLOUS: 80, GALLBLADDER: 40}

SITES: tuple[_Site, ...] = (
    # A: portal-venous phase (unenhanced HU + portal enhancement); B: late arterial phase, noisier
    _Site("ct_northfield", "A", "CT", "dicom", (96, 96), (3.6, 3.6), 64, 4.0, "LPS", "SIEMENS",
          "SOMATOM Definition AS", "Northfield General Hospital", None, _A_MEANS, _A_TEX, noise=12.0,
          lesion_model=(0.0, 1.0, 0.0, 1.0, 0.0, 0.0)),
    _Site("ct_harbor", "B", "CT", "dicom", (80, 80), (4.4, 4.4), 52, 5.0, "LPS", "GE MEDICAL SYSTEMS",
          "LightSpeed VCT", "Harbor Valley Medical Center", None, _B_MEANS, _B_TEX, noise=25.0,
          lesion_model=(0.0, 1.0, 1.0, 0.0, 0.0, 0.0)),
    # C: T1 between bile (t1 = 0) and fat (t1 = 1); D: T2 between cortical bone (t2 = 0) and bile (t2 = 1)
    _Site("mr_bids", "C", "MR", "bids", (72, 72), (4.8, 4.8), 58, 4.5, "RAS", "Philips", "Ingenia",
          "Riverside University Clinic", 1.5, _C_MEANS, _C_TEX, noise=15.0, bias=0.12,
          lesion_model=(90.0, 0.0, 0.0, 0.0, 760.0, 0.0)),
    _Site("mr_decathlon", "D", "MR", "decathlon", (64, 64), (5.2, 5.2), 44, 6.0, "LPS", "SIEMENS",
          "MAGNETOM Skyra", "Lakeside Imaging Institute", 3.0, _D_MEANS, _D_TEX, noise=40.0, bias=0.35,
          lesion_model=(40.0, 0.0, 0.0, 0.0, 0.0, 2260.0)),
)


def _grid_affine(site: _Site, table_z: float) -> np.ndarray:
    """Voxel -> RAS affine of a site: the in-plane grid centred on the table, slices centred at ``table_z``."""
    nx, ny = site.matrix
    sx, sy = site.spacing
    sz = site.slice_spacing
    sign = np.array([-1.0, -1.0]) if site.axes == "LPS" else np.array([1.0, 1.0])
    aff = np.eye(4)
    aff[0, 0], aff[1, 1], aff[2, 2] = sign[0] * sx, sign[1] * sy, sz
    aff[0, 3] = -sign[0] * (nx - 1) / 2 * sx
    aff[1, 3] = -sign[1] * (ny - 1) / 2 * sy
    aff[2, 3] = table_z - (site.n_slices - 1) / 2 * sz
    return aff


def _world_grid(affine: np.ndarray, shape: tuple[int, int, int]):
    i, j, k = (np.arange(n, dtype=np.float32) for n in shape)
    i, j, k = i[:, None, None], j[None, :, None], k[None, None, :]
    a = affine.astype(np.float32)
    return tuple(a[r, 0] * i + a[r, 1] * j + a[r, 2] * k + a[r, 3] for r in range(3))


def _lut(values: dict[int, float]) -> np.ndarray:
    lut = np.zeros(_N_TISSUES, np.float32)
    for t, v in values.items():
        lut[t] = v
    return lut


def _smooth_noise(rng: np.random.Generator, shape, sigma_mm: float, spacing) -> np.ndarray:
    """Gaussian-filtered white noise with unit standard deviation and a correlation length of ``sigma_mm``."""
    field = gaussian_filter(rng.normal(size=shape).astype(np.float32), [sigma_mm / s for s in spacing], mode="wrap")
    return field / max(float(field.std()), 1e-6)


# ============================================================================ lesions
_HOST_ORGANS = (1, 2, 3, 4)  # liver, spleen, right and left kidney


@dataclass(frozen=True)
class LesionType:
    """A focal lesion class: where it grows, how often, its geometry, and its physical tissue properties.

    Tissue properties are 5-vectors ``(hu, arterial, portal, t1, t2)``: unenhanced CT attenuation (HU), the
    extra HU in the late arterial and in the portal-venous phase, and the relative T1 and T2 signal in
    [0, 1] (T1: 0 as dark as bile, 1 as bright as fat; T2: 0 as dark as cortical bone, 1 as bright as bile).
    Each site renders them through its own ``lesion_model``, so the same lesion looks different on the
    portal-venous CT (A), the noisier arterial CT (B), T1 MR (C) and T2 MR (D).

    Attributes:
        name: class name (the ``class`` column of ``lesions.csv``).
        organs: host label value -> relative probability.
        period: a patient has the class when ``(patient + offset) % period == 0``, with an offset drawn per
            site and seed; periods divide 12, so 12 patients per site give exactly ``4 * 12 / period``
            patients with the class.
        count: (min, max) lesions of the class in a patient who has it.
        diameter_mm: (min, max) nominal diameter (smaller when the organ has no room).
        shape: "round", "lobulated", "irregular", "spiculated" or "wedge" (base towards the capsule).
        margin: "sharp" or "ill_defined".
        texture: how ``second`` mixes into ``main``: "homogeneous" (not at all), "rim" (an outer ring),
            "nodular" (peripheral nodules), "scar" (central stellate scar), "mosaic" (smooth random
            patches) or "layered" (the dependent, posterior part of the lesion).
        enhancement: the enhancement pattern in words (the numbers are in ``main`` and ``second``).
        main: tissue properties of the lesion body.
        second: tissue properties of the rim / nodules / scar / other tissue / dependent layer.
        grain: texture amplitude, as a fraction of the host organ's parenchymal texture.
    """

    name: str
    organs: dict[int, float]
    period: int
    count: tuple[int, int]
    diameter_mm: tuple[float, float]
    shape: str
    margin: str
    texture: str
    enhancement: str
    main: tuple[float, float, float, float, float]
    second: tuple[float, float, float, float, float] | None = None
    grain: float = 0.5


_KIDNEYS = {3: 0.5, 4: 0.5}
#: the lesion classes of the demo cohort, in the order their offsets are drawn.
LESION_TYPES: dict[str, LesionType] = {t.name: t for t in (
    LesionType("cyst", {1: 0.45, 3: 0.2, 4: 0.2, 2: 0.15}, 1, (2, 4), (6, 30), "round", "sharp", "homogeneous",
               "none (water density)", (5, 0, 0, 0.02, 0.97), grain=0.2),
    LesionType("haemangioma", {1: 1.0}, 2, (1, 2), (10, 40), "lobulated", "sharp", "nodular",
               "peripheral nodular, filling in", (40, 0, 15, 0.12, 0.88), (40, 190, 120, 0.12, 0.88)),
    LesionType("metastasis", {1: 0.8, 2: 0.2}, 2, (1, 3), (8, 35), "irregular", "ill_defined", "rim",
               "rim, hypovascular necrotic core", (25, 0, 10, 0.22, 0.62), (45, 55, 70, 0.35, 0.45)),
    LesionType("hepatocellular_carcinoma", {1: 1.0}, 3, (1, 2), (15, 40), "lobulated", "sharp", "mosaic",
               "arterial hyperenhancement, portal washout, mosaic", (50, 95, 20, 0.45, 0.42), (35, 35, 0, 0.3, 0.6)),
    LesionType("focal_nodular_hyperplasia", {1: 1.0}, 4, (2, 3), (15, 40), "lobulated", "sharp", "scar",
               "bright homogeneous arterial, central scar", (55, 110, 50, 0.55, 0.25), (20, 0, 10, 0.15, 0.85)),
    LesionType("adenoma", {1: 1.0}, 6, (2, 3), (12, 35), "round", "sharp", "homogeneous",
               "mild arterial, intracellular fat (T1 bright)", (30, 55, 40, 0.78, 0.32)),
    LesionType("abscess", {1: 0.8, 2: 0.2}, 6, (2, 3), (15, 40), "irregular", "ill_defined", "rim",
               "thick enhancing rim, fluid centre, oedema", (15, 0, 0, 0.05, 0.92), (50, 60, 80, 0.35, 0.5)),
    LesionType("cholangiocarcinoma", {1: 1.0}, 6, (2, 3), (15, 40), "spiculated", "ill_defined", "mosaic",
               "delayed progressive, fibrous", (45, 15, 45, 0.3, 0.45), (40, 5, 20, 0.25, 0.6)),
    LesionType("focal_fat", {1: 1.0}, 4, (2, 3), (10, 30), "wedge", "ill_defined", "homogeneous",
               "fat-containing parenchyma, no mass effect", (-15, 10, 35, 0.72, 0.35)),
    LesionType("lipoma", {1: 0.5, 3: 0.25, 4: 0.25}, 6, (2, 3), (8, 25), "round", "sharp", "homogeneous",
               "none (fat density)", (-100, 0, 0, 1.0, 0.56), grain=0.3),
    LesionType("angiomyolipoma", _KIDNEYS, 3, (1, 2), (8, 30), "lobulated", "sharp", "mosaic",
               "fat with enhancing vessels", (-90, 0, 0, 1.0, 0.56), (40, 130, 80, 0.35, 0.3)),
    LesionType("calcification", {1: 0.4, 2: 0.3, 3: 0.15, 4: 0.15}, 2, (1, 2), (6, 10), "round", "sharp",
               "homogeneous", "calcified (very dense; MR signal void)", (750, 0, 0, 0.0, 0.0), grain=0.2),
    LesionType("haematoma", {1: 0.6, 2: 0.4}, 6, (2, 3), (15, 40), "lobulated", "sharp", "layered",
               "none; dense dependent blood", (40, 0, 0, 0.45, 0.72), (78, 0, 0, 0.82, 0.3)),
    LesionType("lymphoma", {2: 1.0}, 4, (2, 3), (8, 25), "round", "ill_defined", "homogeneous",
               "mild homogeneous", (40, 25, 30, 0.3, 0.48)),
    LesionType("renal_cell_carcinoma", _KIDNEYS, 3, (1, 2), (12, 40), "lobulated", "sharp", "mosaic",
               "avid heterogeneous, necrosis", (40, 150, 90, 0.35, 0.5), (25, 0, 5, 0.15, 0.85)),
    LesionType("infarct", {2: 0.5, 3: 0.25, 4: 0.25}, 4, (2, 3), (12, 30), "wedge", "sharp", "homogeneous",
               "none (perfusion defect)", (35, 0, 5, 0.3, 0.55)),
    LesionType("oncocytoma", _KIDNEYS, 6, (2, 3), (12, 35), "round", "sharp", "scar",
               "avid homogeneous, central stellate scar", (40, 110, 100, 0.35, 0.4), (20, 0, 20, 0.2, 0.8)),
    LesionType("splenic_hamartoma", {2: 1.0}, 6, (2, 3), (10, 25), "round", "sharp", "mosaic",
               "heterogeneous arterial, iso portal", (45, 130, 75, 0.4, 0.55), (45, 70, 65, 0.38, 0.5)),
)}

#: columns of ``lesions.csv`` (the lesion-CSV input format of `datamodules.lesion_csv`, plus ``organ``)
LESION_COLUMNS = ("image", "class", "x", "y", "z", "size_mm", "organ")


def draw_lesion_classes(seed: int, site_index: int, patient: int) -> list[str]:
    """The lesion classes of one demo patient, one entry per lesion (deterministic).

    Class ``t`` is present when ``(patient + offset_t) % t.period == 0``, with offsets drawn once per
    (seed, site): 12 consecutive patients of a site hold exactly ``12 / period`` patients with it, whatever
    the seed. The number of lesions of a present class is drawn from ``t.count`` with a generator that
    depends only on (seed, site, patient).

    Args:
        seed: cohort seed.
        site_index: index into `SITES`.
        patient: 1-based patient number within the site.

    Returns:
        Class names, in `LESION_TYPES` order, repeated once per lesion.
    """
    schedule = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(site_index, 0, 0)))  # patient 0: unused
    offsets = schedule.integers(0, 12, size=len(LESION_TYPES))
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(site_index, patient, 3)))
    counts = [int(rng.integers(t.count[0], t.count[1] + 1)) for t in LESION_TYPES.values()]
    out: list[str] = []
    for t, off, n in zip(LESION_TYPES.values(), offsets, counts, strict=True):
        if (patient + int(off)) % t.period == 0:
            out += [t.name] * n
    return out


@dataclass
class _Lesion:
    kind: LesionType
    organ: int
    voxel: np.ndarray  # continuous voxel coordinates of the centre
    centre: np.ndarray  # RAS mm
    radius: float  # nominal radius (mm)
    rot: np.ndarray  # lesion frame
    semi: np.ndarray  # relative semi-axes
    bumps: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]  # directions, frequencies, phases, amplitudes
    outward: np.ndarray  # unit vector from the organ's centre to the lesion (RAS), for wedges
    level: float  # layering level (mm along RAS y) for layered lesions


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    return q * np.sign(np.diag(r))


def _place_lesions(names: Sequence[str], label: np.ndarray, affine: np.ndarray, spacing,
                   rng: np.random.Generator) -> list[_Lesion]:
    """Non-overlapping lesions inside their host organs, largest first.

    A lesion's centre keeps 1.1 radii (+1 mm) from the organ's boundary (distance transform of the organ
    mask on this grid) and 1.15 summed radii (+2 mm) from other lesions; when the drawn size does not fit
    in any allowed organ the radius shrinks (down to 3 mm), and a lesion that still does not fit is
    centred on the deepest free organ voxel instead.
    """
    draws = []
    for name in names:
        t = LESION_TYPES[name]
        lo, hi = t.diameter_mm
        d = float(np.exp(rng.uniform(np.log(lo), np.log(hi))))
        organs = list(t.organs)
        p = np.array([t.organs[o] for o in organs], float)
        first = int(rng.choice(organs, p=p / p.sum()))
        draws.append((d, t, [first] + [o for o in organs if o != first]))
    draws.sort(key=lambda x: -x[0])  # stable: ties keep their draw order
    cand: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = {}
    for v in _HOST_ORGANS:
        mask = label == v
        idx = np.argwhere(mask)
        lo_, hi_ = idx.min(0), idx.max(0) + 1
        crop = np.pad(mask[lo_[0]:hi_[0], lo_[1]:hi_[1], lo_[2]:hi_[2]], 1)
        dist = distance_transform_edt(crop, sampling=spacing)[1:-1, 1:-1, 1:-1]
        ijk = idx - lo_
        depth = dist[ijk[:, 0], ijk[:, 1], ijk[:, 2]].astype(np.float64)
        world = (affine[:3, :3] @ idx.T.astype(np.float64)).T + affine[:3, 3]
        cand[v] = (idx, world, depth, world.mean(0))
    placed: list[_Lesion] = []
    for d, t, organs in draws:
        radius = d / 2
        choice = None
        while choice is None and radius >= 3.0 - 1e-9:
            for v in organs:
                idx, world, depth, _ = cand[v]
                ok = depth >= 1.1 * radius + 1.0
                for other in placed:
                    ok &= np.linalg.norm(world - other.centre, axis=1) >= 1.15 * (radius + other.radius) + 2.0
                if ok.any():
                    choice = (v, int(rng.choice(np.flatnonzero(ok))))
                    break
            else:
                radius *= 0.85
        if choice is None:  # no room anywhere: the deepest voxel of the first organ that is not a centre yet
            radius = 3.0
            v = organs[0]
            idx, world, depth, _ = cand[v]
            score = depth.copy()
            for other in placed:
                score[np.linalg.norm(world - other.centre, axis=1) < 1.0] = -1.0
            choice = (v, int(np.argmax(score)))
        v, k = choice
        idx, world, depth, organ_centre = cand[v]
        voxel = idx[k] + rng.uniform(-0.4, 0.4, 3)
        centre = affine[:3, :3] @ voxel + affine[:3, 3]
        out = centre - organ_centre
        out /= max(float(np.linalg.norm(out)), 1e-6)
        n_b = {"lobulated": 3, "irregular": 6, "spiculated": 12}.get(t.shape, 1)
        dirs = rng.normal(size=(n_b, 3))
        dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
        freq = rng.uniform(*{"lobulated": (1.5, 2.5), "irregular": (3.0, 5.0)}.get(t.shape, (1.0, 2.0)), n_b)
        amp = rng.uniform(*{"lobulated": (0.08, 0.15), "irregular": (0.05, 0.12)}.get(t.shape, (0.0, 0.0)), n_b)
        placed.append(_Lesion(
            kind=t, organ=v, voxel=voxel, centre=centre, radius=radius, rot=_random_rotation(rng),
            semi=rng.uniform(0.85, 1.15, 3), bumps=(dirs, freq, rng.uniform(0, 2 * np.pi, n_b), amp),
            outward=out, level=float(rng.uniform(-0.3, 0.25) * radius),
        ))
    return placed


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def _box_noise(rng: np.random.Generator, shape, scale_mm: float, spacing) -> np.ndarray:
    field = gaussian_filter(rng.normal(size=shape), [max(scale_mm / s, 0.3) for s in spacing], mode="reflect")
    return field / max(float(field.std()), 1e-6)


def _lesion_shape_radius(les: _Lesion, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Normalised radius (< 1 inside) and lesion-frame coordinates at offsets ``p`` (3, ...) mm from the centre."""
    t = les.kind
    r0 = les.radius
    u = np.tensordot(les.rot.T, p, axes=1) / (r0 * les.semi[:, None, None, None])
    rad = np.sqrt((u**2).sum(0)) + 1e-6
    uh = u / rad
    if t.shape == "wedge":
        along = np.tensordot(les.outward, p, axes=1) / r0
        perp = np.sqrt(np.maximum((p**2).sum(0) / r0**2 - along**2, 0.0))
        return np.maximum(np.abs(along), perp / (0.15 + 0.75 * (along + 1.0) / 2.0)), u
    dirs, freq, phase, amp = les.bumps
    proj = np.tensordot(dirs, uh, axes=1)  # (n, ...)
    if t.shape == "spiculated":
        spikes = (np.maximum(proj, 0.0) ** 24).sum(0)
        return rad / (1.0 + 0.7 * spikes), u
    if t.shape in ("lobulated", "irregular"):
        bump = (amp[:, None, None, None] * np.sin(freq[:, None, None, None] * np.pi * proj
                                                  + phase[:, None, None, None])).sum(0)
        return rad / (1.0 + bump), u
    return rad, u


def _render_lesions(img: np.ndarray, label: np.ndarray, xyz, site: _Site, lesions: Sequence[_Lesion],
                    rng: np.random.Generator) -> None:
    """Paint the lesions into ``img`` (before blur and noise), in place, inside their host organs only."""
    spacing = np.array([*site.spacing, site.slice_spacing])
    model = np.asarray(site.lesion_model, np.float64)
    for les in lesions:
        t = les.kind
        half = (1.7 * les.radius * 1.2 + 4.0) / spacing
        lo = np.maximum(np.floor(les.voxel - half).astype(int), 0)
        hi = np.minimum(np.ceil(les.voxel + half).astype(int) + 1, label.shape)
        box = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
        shape = tuple(int(b - a) for a, b in zip(lo, hi, strict=True))
        p = np.stack([xyz[a][box].astype(np.float64) - les.centre[a] for a in range(3)])
        r, u = _lesion_shape_radius(les, p)
        if t.margin == "sharp":
            w = np.clip(0.5 + (1.0 - r) * les.radius / 1.2, 0.0, 1.0)
        else:
            r = r * (1.0 + 0.1 * _box_noise(rng, shape, 3.0, spacing))
            w = _sigmoid((1.0 - r) * les.radius / 3.0)
        if t.texture == "rim":
            s = _sigmoid((r - 0.62) / 0.06)
        elif t.texture == "nodular":
            s = _sigmoid((r - 0.6) / 0.05) * _sigmoid((_box_noise(rng, shape, 0.25 * les.radius, spacing) - 0.3) / 0.25)
        elif t.texture == "scar":
            phi = np.arctan2(u[1], u[0])
            spokes = _sigmoid((np.abs(np.cos(2.5 * phi)) - 0.9) / 0.025) * _sigmoid((0.75 - r) / 0.05)
            s = np.maximum(_sigmoid((0.2 - r) / 0.04), spokes)
        elif t.texture == "mosaic":
            s = _sigmoid(_box_noise(rng, shape, max(0.3 * les.radius, 4.0), spacing) / 0.3)
        elif t.texture == "layered":
            s = _sigmoid((les.level - p[1]) / 1.5)
        else:
            s = np.zeros(shape)
        main = model[0] + float(model[1:] @ np.asarray(t.main, np.float64))
        value = main * (1.0 - s)
        if t.second is not None:
            value = value + s * (model[0] + float(model[1:] @ np.asarray(t.second, np.float64)))
        value = value + t.grain * site.texture.get(_ORGAN_TISSUE[les.organ], 0.0) * _box_noise(rng, shape, 3.0, spacing)
        w = w * (label[box] == les.organ)
        img[box] = ((1.0 - w) * img[box] + w * value).astype(np.float32)


def _lesion_rows(site: _Site, image: str, lesions: Sequence[_Lesion]) -> list[dict[str, str]]:
    rows = []
    for les in lesions:
        lps = les.centre * _RAS_TO_LPS
        rows.append({
            "image": image, "class": les.kind.name,
            "x": f"{lps[0]:.2f}", "y": f"{lps[1]:.2f}", "z": f"{lps[2]:.2f}",
            "size_mm": f"{2 * les.radius:.1f}", "organ": ORGANS[les.organ],
        })
    return rows


def _image(site: _Site, pat: _Patient, tissue: np.ndarray, xyz, rng: np.random.Generator,
           label: np.ndarray | None = None, lesions: Sequence[_Lesion] = (),
           rng_lesions: np.random.Generator | None = None) -> np.ndarray:
    """Site-specific intensities: tissue means, texture, lesions, point-spread blur, bias field and noise."""
    spacing = (*site.spacing, site.slice_spacing)
    tex_a = _smooth_noise(rng, tissue.shape, 5.0, spacing)  # organ parenchyma
    tex_b = _smooth_noise(rng, tissue.shape, 8.0, spacing)  # bowel loops in mesenteric fat
    img = _lut(site.means)[tissue] + _lut(site.texture)[tissue] * tex_a
    visc = tissue == VISCERA
    # mesentery and bowel: a smooth mix of fat and soft tissue
    w = 1.0 / (1.0 + np.exp(-2.5 * tex_b[visc]))
    img[visc] = w * site.means[FAT] + (1.0 - w) * site.means[VISCERA]
    if lesions:
        _render_lesions(img, label, xyz, site, lesions, rng_lesions)
    sx, sy = site.spacing
    img = gaussian_filter(img, sigma=(1.8 / sx, 1.8 / sy, 1.2 / site.slice_spacing), mode="nearest")
    if site.modality == "CT":
        img = img + rng.normal(0.0, site.noise, img.shape).astype(np.float32)
    else:
        bias = np.exp(site.bias * _eval_waves(pat.bias, *xyz)).astype(np.float32)
        s = img * bias
        n1 = rng.normal(0.0, site.noise, img.shape).astype(np.float32)
        n2 = rng.normal(0.0, site.noise, img.shape).astype(np.float32)
        img = np.sqrt((s + n1) ** 2 + n2**2)  # Rician magnitude: never negative
    return img.astype(np.float32)


def _fake_identity(site_index: int, site: _Site, i: int) -> dict[str, str]:
    """Distinctive fake PHI for the DICOM headers (privacy tests look for these strings)."""
    tag = f"{site.letter}{i:02d}"
    year = 1940 + (7 * i + 13 * site_index) % 45
    return {
        "PatientName": f"DEMO^PATIENT^{tag}",
        "PatientID": f"MRN-{tag}-{4711 + 97 * i + 1009 * site_index}",
        "PatientBirthDate": f"{year:04d}{1 + i % 12:02d}{1 + (3 * i) % 28:02d}",
        "AccessionNumber": f"ACC{tag}{3000 + 17 * i}",
    }


def _dicom_header(site_index: int, site: _Site, i: int, pat: _Patient) -> dict[str, Any]:
    header = {
        **_fake_identity(site_index, site, i),
        "PatientSex": pat.sex,
        "Manufacturer": site.manufacturer,
        "ManufacturerModelName": site.model,
        "InstitutionName": site.institution,
        "StationName": f"{site.letter}CT01",
        "StudyDate": f"2023{1 + (i + 3 * site_index) % 12:02d}{1 + (5 * i) % 28:02d}",
        "StudyTime": f"{8 + i % 9:02d}3000",
        "StudyDescription": "CT ABDOMEN",
        "SeriesDescription": "Abdomen PV 4.0 B30f" if site.letter == "A" else "ART 5mm STND",
        "SeriesNumber": 2 if site.letter == "A" else 3,
        "BodyPartExamined": "ABDOMEN",
        "PatientPosition": "FFS",
        "KVP": "120",
        "ConvolutionKernel": "B30f" if site.letter == "A" else "STANDARD",
        "WindowCenter": "40",
        "WindowWidth": "400",
    }
    return header


def _sidecar(site: _Site) -> dict[str, Any]:
    """BIDS-style JSON sidecar: scanner fields only, no patient identifiers."""
    common = {
        "Modality": "MR",
        "Manufacturer": site.manufacturer,
        "ManufacturerModelName": site.model,
        "MagneticFieldStrength": site.field_strength,
        "InstitutionName": site.institution,
    }
    if site.letter == "C":
        return {**common, "SeriesDescription": "T1 mDIXON W abdomen", "MRAcquisitionType": "3D",
                "RepetitionTime": 0.0045, "EchoTime": 0.0022, "FlipAngle": 10}
    return {**common, "SeriesDescription": "t2_haste_tra", "MRAcquisitionType": "2D",
            "RepetitionTime": 1.4, "EchoTime": 0.092, "FlipAngle": 150}


def _patient_rngs(seed: int, site_index: int, i: int) -> tuple[np.random.Generator, ...]:
    """Independent generators for anatomy, noise and UIDs; they depend only on (seed, site, patient)."""
    return tuple(np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(site_index, i, s))) for s in range(3))


def _check_labels(label: np.ndarray, where: str) -> None:
    for value, name in ORGANS.items():
        slices = np.flatnonzero((label == value).any(axis=(0, 1)))
        if slices.size < 3:
            raise RuntimeError(f"demo phantom bug: {name} spans {slices.size} slices in {where}; report this with the seed")


def _write_json(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1) + "\n")


def _labels_json() -> dict[str, str]:
    return {"0": "background", **{str(v): n for v, n in ORGANS.items()}}


def _write_cohort(root: Path, seed: int, patients_per_site: int) -> list[Path]:
    files: list[Path] = []
    lesion_rows: list[dict[str, str]] = []
    decathlon_training = []
    for si, site in enumerate(SITES):
        site_dir = root / site.key
        for i in range(1, patients_per_site + 1):
            rng_anatomy, rng_noise, rng_uid = _patient_rngs(seed, si, i)
            pat = _Patient(rng_anatomy)
            table_z = float(rng_anatomy.uniform(-380.0, -300.0))
            affine = _grid_affine(site, table_z)
            shape = (*site.matrix, site.n_slices)
            xyz = _world_grid(affine, shape)
            # the grid's centre sits 35 mm above body z = 0, so liver dome and kidney poles are covered
            tissue, label = pat.render(*xyz, z_anchor=table_z - 35.0, table=site.modality == "CT")
            _check_labels(label, f"{site.key} patient {i}")
            rng_lesions = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(si, i, 4)))
            spacing = (*site.spacing, site.slice_spacing)
            lesions = _place_lesions(draw_lesion_classes(seed, si, i), label, affine, spacing, rng_lesions)
            img = _image(site, pat, tissue, xyz, rng_noise, label, lesions, rng_lesions)
            if site.fmt == "dicom":
                pat_dir = site_dir / f"pat{i:02d}"
                if site.letter == "A":
                    series = "CT"
                    kw = dict(slope=1.0, intercept=-1024.0, signed=False)
                else:
                    series = "series"
                    kw = dict(slope=0.5, intercept=0.0, signed=True, reverse=True, shuffle_names=True)
                files += write_dicom_series(img, affine, pat_dir / series, header=_dicom_header(si, site, i, pat),
                                            modality="CT", rng=rng_uid, **kw)
                files.append(write_nifti(label, affine, pat_dir / f"{series}_label.nii.gz", dtype=np.uint8))
                image = f"{site.key}/pat{i:02d}/{series}"
            elif site.fmt == "bids":
                anat = site_dir / f"sub-{i:02d}" / "anat"
                stem = f"sub-{i:02d}_T1w"
                files.append(write_nifti(np.rint(img), affine, anat / f"{stem}.nii.gz", dtype=np.int16))
                _write_json(_sidecar(site), anat / f"{stem}.json")
                files.append(anat / f"{stem}.json")
                files.append(write_nifti(label, affine, anat / f"{stem}_dseg.nii.gz", dtype=np.uint8))
                image = f"{site.key}/sub-{i:02d}/anat/{stem}.nii.gz"
            else:
                name = f"mr_{i:03d}"
                files.append(write_nifti(img, affine, site_dir / "imagesTr" / f"{name}.nii.gz", dtype=np.float32))
                _write_json(_sidecar(site), site_dir / "imagesTr" / f"{name}.json")
                files.append(site_dir / "imagesTr" / f"{name}.json")
                files.append(write_nifti(label, affine, site_dir / "labelsTr" / f"{name}.nii.gz", dtype=np.uint8))
                decathlon_training.append({"image": f"./imagesTr/{name}.nii.gz", "label": f"./labelsTr/{name}.nii.gz"})
                image = f"{site.key}/imagesTr/{name}.nii.gz"
            lesion_rows += _lesion_rows(site, image, lesions)
        if site.fmt == "bids":
            _write_json({"Name": "imaging-meta demo, site C", "BIDSVersion": "1.8.0", "DatasetType": "raw"},
                        site_dir / "dataset_description.json")
            files.append(site_dir / "dataset_description.json")
        if site.fmt == "decathlon":
            _write_json({
                "name": "imaging-meta demo, site D",
                "description": "synthetic T2-weighted abdominal MR in the Medical Segmentation Decathlon layout",
                "reference": "synthetic", "licence": "CC0", "release": f"demo {DEMO_VERSION}",
                "tensorImageSize": "3D", "modality": {"0": "MRI"}, "labels": _labels_json(),
                "numTraining": len(decathlon_training), "numTest": 0,
                "training": decathlon_training, "test": [],
            }, site_dir / "dataset.json")
            files.append(site_dir / "dataset.json")
    _write_json({
        "name": "imaging-meta demo",
        "description": "synthetic multi-site abdominal cohort (CT DICOM x2, MR NIfTI x2) for imaging-meta; "
                       "written by datamodules.demo.generate_demo_cohort",
        "labels": _labels_json(),
        "modality": {s.key: s.modality for s in SITES},
        "lesions": "lesions.csv",
        "lesion_classes": list(LESION_TYPES),
    }, root / "dataset.json")
    files.append(root / "dataset.json")
    with open(root / "lesions.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=LESION_COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(lesion_rows)
    files.append(root / "lesions.csv")
    return files


def generate_demo_cohort(out_dir: str | os.PathLike, seed: int = 0, patients_per_site: int = 12) -> dict:
    """Write the demo cohort into ``out_dir``, atomically.

    The cohort is built in a temporary sibling folder, the marker file ``.imaging-meta-demo.json`` is
    written last, and the folder is then renamed to ``out_dir``; an interrupted run leaves no partial
    cohort behind.

    Args:
        out_dir: target folder; it must not exist or be empty.
        seed: non-negative seed; the same seed gives byte-identical files.
        patients_per_site: patients at each of the four sites (patient ``i`` of a site is the same
            whatever this number is).

    Returns:
        Summary: ``out_dir``, ``seed``, ``patients_per_site``, ``sites`` (site folder -> patients),
        ``patients``, ``files`` (number written) and ``seconds``.

    Raises:
        FileExistsError: ``out_dir`` exists and is not empty.
        ValueError: a negative seed or fewer than one patient per site.
    """
    t0 = time.perf_counter()
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    if not isinstance(patients_per_site, (int, np.integer)) or patients_per_site < 1:
        raise ValueError(f"patients_per_site must be an integer >= 1, got {patients_per_site!r}")
    out = Path(out_dir).absolute()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        old = _marker_version(out)
        if old is not None and old != DEMO_VERSION:
            raise FileExistsError(
                f"{out} is not empty: it holds a demo cohort of version {old}, and this code writes version "
                f"{DEMO_VERSION} (with lesions and lesions.csv); delete the folder to regenerate it"
            )
        raise FileExistsError(f"{out} exists and is not empty; choose a new folder or delete it first")
    out.parent.mkdir(parents=True, exist_ok=True)
    # a unique hidden sibling; mkdir (unlike mkdtemp) keeps the usual umask permissions for the result
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        files = _write_cohort(tmp, int(seed), int(patients_per_site))
        marker = {
            "generator": "datamodules.demo.generate_demo_cohort",
            "version": DEMO_VERSION,
            "seed": int(seed),
            "patients_per_site": int(patients_per_site),
            "sites": [s.key for s in SITES],
            "files": len(files),
        }
        _write_json(marker, tmp / MARKER)
        if out.exists():
            out.rmdir()  # empty (checked above); os.rename cannot replace a directory everywhere
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {
        "out_dir": str(out),
        "seed": int(seed),
        "patients_per_site": int(patients_per_site),
        "sites": {s.key: int(patients_per_site) for s in SITES},
        "patients": int(patients_per_site) * len(SITES),
        "files": len(files) + 1,
        "seconds": round(time.perf_counter() - t0, 2),
    }


def _marker_version(out_dir: str | os.PathLike) -> int | None:
    """The version in a demo cohort's marker file, or None when there is no valid marker."""
    try:
        data = json.loads((Path(out_dir) / MARKER).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("generator") != "datamodules.demo.generate_demo_cohort":
        return None
    return data.get("version")


def demo_is_complete(out_dir: str | os.PathLike) -> bool:
    """True when ``out_dir`` holds a finished demo cohort of the current `DEMO_VERSION` (an older cohort, e.g.
    one without ``lesions.csv``, is not complete: `generate_demo_cohort` then asks for the folder to be deleted)."""
    return _marker_version(out_dir) == DEMO_VERSION
