"""DICOM series: robust header reading, grouping by series, geometric ordering, and a MONAI reader.

A DICOM series is a set of single-frame slice files that share a ``SeriesInstanceUID``. Folder and file
names say nothing reliable about which files belong together or in what order, so this module

1. reads each file's header once (`read_header`); a file that is not DICOM or is corrupt raises a
   `DicomError` whose message names the file and says why;
2. groups files by ``SeriesInstanceUID`` (`group_series`), wherever they lie in the tree;
3. validates a group and orders it by geometry (`order_series`): slice positions are projected onto the
   slice normal (the cross product of the row and column direction cosines) and sorted along it, never by
   file name or ``InstanceNumber``. Any problem raises a `DicomSeriesError` with a precise reason;
4. builds the voxel-to-world affine in RAS (NIfTI convention) for the array layout used everywhere here:
   axis 0 runs along the DICOM row direction (column index), axis 1 along the column direction (row index),
   axis 2 through the slices in the geometric order;
5. `DicomSeriesReader` wraps all of this as a `monai.data.ImageReader`, so that
   ``LoadImaged(keys, reader=[DicomSeriesReader(), NibabelReader()])`` reads the ordered file lists stored
   in the scan index (or a folder holding one series) next to NIfTI files.

Identifying attributes (PatientName, PatientID, UIDs, ...) are read only to group and pseudonymise; they are
never put into the metadata returned by the reader.
"""

from __future__ import annotations

import logging
import math
import os
import warnings
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pydicom
from monai.data import ImageReader
from monai.utils import MetaKeys, SpaceKeys, ensure_tuple
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import (
    UID,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000TransferSyntaxes,
    JPEGLSTransferSyntaxes,
    JPEGTransferSyntaxes,
    RLETransferSyntaxes,
)

__all__ = [
    "DicomError",
    "NotDicomError",
    "DicomSeriesError",
    "DicomHeader",
    "DicomSeries",
    "DicomSeriesReader",
    "read_header",
    "group_series",
    "order_series",
    "series_affine",
    "decoder_problem",
    "JPEG_EXTRA",
    "load_series_array",
    "NIFTI_SUFFIXES",
    "is_nifti",
    "nifti_stem",
]

logger = logging.getLogger(__name__)

NIFTI_SUFFIXES = (".nii.gz", ".nii")

#: keywords read from every header: geometry, pixel description, and what the scanner needs for sites.
_GEOMETRY_KEYWORDS = ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing")

#: cosines of two orientations closer than this (per component) are the same orientation.
ORIENTATION_TOL = 1e-3
#: two slices closer than this along the normal (mm) are at the same position.
DUPLICATE_TOL_MM = 1e-3

_HIGH_THROUGHPUT_J2K = (
    "1.2.840.10008.1.2.4.201",
    "1.2.840.10008.1.2.4.202",
    "1.2.840.10008.1.2.4.203",
)


class DicomError(ValueError):
    """A DICOM file cannot be read; the message names the file and what to do.

    Attributes:
        path: the file.
        reason: the reason without the path, for reports.
    """

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


class NotDicomError(DicomError):
    """The file is not a DICOM file at all (no 'DICM' marker and no recognisable DICOM data set)."""


class DicomSeriesError(ValueError):
    """A group of DICOM files does not form a usable volume; ``reason`` says why and what to fix.

    Attributes:
        paths: the files of the series.
        reason: the reason, without the file list.
    """

    def __init__(self, paths: Sequence[str], reason: str):
        self.paths = [str(p) for p in paths]
        self.reason = reason
        where = self.paths[0] if len(self.paths) == 1 else f"{_common_folder(self.paths)} ({len(self.paths)} files)"
        super().__init__(f"{where}: {reason}")


# --------------------------------------------------------------------------------------------- headers
@dataclass
class DicomHeader:
    """What one DICOM file tells about itself, without its pixels.

    ``series_uid``, ``sop_instance_uid`` and ``patient_id`` are kept in memory only, to group files and to
    pseudonymise; they must never be written to an index, a log or metadata.

    Attributes:
        path: the file.
        series_uid: SeriesInstanceUID, or None when missing.
        sop_instance_uid: SOPInstanceUID, or None.
        sop_class: human-readable SOP class (e.g. "CT Image Storage").
        modality: Modality code ("CT", "MR", ...), "" when missing.
        series_number: SeriesNumber, or None.
        rows, columns: image matrix, or None.
        pixel_spacing: (row spacing, column spacing) in mm, i.e. PixelSpacing as stored, or None.
        orientation: ImageOrientationPatient, six direction cosines (LPS), or None.
        position: ImagePositionPatient (LPS, mm) of the first transmitted voxel, or None.
        samples_per_pixel: SamplesPerPixel (1 for grey-level).
        bits_allocated: BitsAllocated, or None.
        number_of_frames: NumberOfFrames (1 when absent).
        transfer_syntax: TransferSyntaxUID (a guess from the encoding when the file meta lacks it).
        rescale_slope, rescale_intercept: modality rescale (stored value -> HU or other physical unit).
        slice_thickness: SpacingBetweenSlices, else SliceThickness, else None (used for one-slice series).
        attributes: the extra keywords asked for (e.g. site fields), as stripped strings, when present.
        patient_id: PatientID or None (pseudonymise before storing anywhere!).
        problem: why this file alone cannot be a slice of a volume, or None when it can.
        warnings: what pydicom warned about while reading.
        is_dicomdir: the file is a DICOMDIR (media index), not an image.
    """

    path: str
    series_uid: str | None = None
    sop_instance_uid: str | None = None
    sop_class: str = ""
    modality: str = ""
    series_number: int | None = None
    rows: int | None = None
    columns: int | None = None
    pixel_spacing: tuple[float, float] | None = None
    orientation: tuple[float, float, float, float, float, float] | None = None
    position: tuple[float, float, float] | None = None
    samples_per_pixel: int = 1
    bits_allocated: int | None = None
    number_of_frames: int = 1
    transfer_syntax: str = ""
    rescale_slope: float = 1.0
    rescale_intercept: float = 0.0
    slice_thickness: float | None = None
    attributes: dict[str, Any] = field(default_factory=dict)
    patient_id: str | None = None
    problem: str | None = None
    warnings: list[str] = field(default_factory=list)
    is_dicomdir: bool = False

    def describe(self) -> str:
        """A short non-identifying description: modality and SOP class."""
        parts = [p for p in (self.modality, self.sop_class) if p]
        return ", ".join(parts) if parts else "unknown SOP class"


def _looks_like_headerless_dicom(path: str) -> bool:
    """True when a file without the 'DICM' marker starts like a raw DICOM data set (group 0x0008 or 0x0002)."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError:
        return False
    if len(head) < 8:
        return False
    return head[:2] in (b"\x08\x00", b"\x00\x08", b"\x02\x00", b"\x00\x02")


def read_dataset(path: str, *, stop_before_pixels: bool = False) -> tuple[Dataset, list[str]]:
    """Read a DICOM file with pydicom; raise `NotDicomError` / `DicomError` with the reason.

    ``force=False`` first; a file with no preamble/'DICM' marker that starts like a raw data set is then read
    with ``force=True`` and accepted only when it holds a SOP class or a modality.
    """
    caught: list[str] = []
    try:
        empty = os.path.getsize(path) == 0
    except OSError as e:
        raise DicomError(path, f"cannot read the file ({type(e).__name__}: {e})") from e
    if empty:
        raise NotDicomError(path, "empty file (0 bytes), probably an interrupted copy; copy it again from the source")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        try:
            try:
                ds = pydicom.dcmread(path, force=False, stop_before_pixels=stop_before_pixels)
            except InvalidDicomError as e:
                if not _looks_like_headerless_dicom(path):
                    raise NotDicomError(path, f"not DICOM ({e})".replace(" Use force=True to force reading.", "")) from e
                ds = pydicom.dcmread(path, force=True, stop_before_pixels=stop_before_pixels)
                if "SOPClassUID" not in ds and "Modality" not in ds:
                    raise NotDicomError(
                        path, "not DICOM (no 'DICM' marker, and no SOP class or modality when read without it)"
                    ) from e
        except DicomError:
            raise
        except (OSError, MemoryError) as e:
            raise DicomError(path, f"cannot read the file ({type(e).__name__}: {e})") from e
        except Exception as e:  # pydicom raises many types on corrupt data; each becomes a reason
            raise DicomError(
                path, f"corrupt or truncated DICOM file ({type(e).__name__}: {e}); copy it again from the source"
            ) from e
        caught.extend(str(w.message) for w in record)
    return ds, caught


def _get(ds: Dataset, keyword: str, default: Any = None) -> Any:
    """``ds.get(keyword)`` that turns pydicom's errors on malformed values into ``default``."""
    try:
        value = ds.get(keyword, default)
    except Exception:  # malformed value (e.g. IS '1A'): treat as absent; the caller reports what it needs
        return default
    if value is None or (isinstance(value, (str, bytes)) and not value.strip()):
        return default
    return value


def _as_int(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _as_floats(value: Any, n: int) -> tuple[float, ...] | None:
    try:
        out = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        return None
    if len(out) != n or not all(math.isfinite(v) for v in out):
        return None
    return out


def _transfer_syntax(ds: Dataset) -> UID:
    meta = getattr(ds, "file_meta", None)
    ts = meta.get("TransferSyntaxUID") if meta is not None else None
    if ts:
        return UID(str(ts))
    implicit, little = getattr(ds, "original_encoding", (None, None))
    if implicit:
        return ImplicitVRLittleEndian
    if little is False:
        return ExplicitVRBigEndian
    return ExplicitVRLittleEndian


#: the optional extra of this project that installs the JPEG, JPEG-LS and JPEG 2000 decoders (pyproject.toml).
JPEG_EXTRA = "`pip install imaging-meta[jpeg]`"


def _install_hint(ts: UID) -> str:
    """What to install so that pydicom can decode ``ts``: the project's ``jpeg`` extra first, then alternatives."""
    if ts in JPEGLSTransferSyntaxes:
        return f"{JPEG_EXTRA} (or `pip install pylibjpeg pylibjpeg-libjpeg`, `pip install pyjpegls`, or `pip install python-gdcm`)"
    if ts in JPEGTransferSyntaxes:
        return f"{JPEG_EXTRA} (or `pip install pylibjpeg pylibjpeg-libjpeg`, or `pip install python-gdcm`)"
    if ts in JPEG2000TransferSyntaxes or ts in _HIGH_THROUGHPUT_J2K:
        return f"{JPEG_EXTRA} (or `pip install pylibjpeg pylibjpeg-openjpeg`, or `pip install python-gdcm`)"
    if ts in RLETransferSyntaxes:
        return "`pip install pylibjpeg pylibjpeg-rle`"
    return "a pydicom pixel data plugin for it (see pydicom.pixels.get_decoder(uid).missing_dependencies)"


def decoder_problem(transfer_syntax: str) -> str | None:
    """Why pydicom cannot decode pixel data in ``transfer_syntax`` here, or None when it can.

    Uses pydicom's decoder availability API (`pydicom.pixels.get_decoder(uid).is_available`), so the
    answer reflects the plugins installed in this environment.

    Args:
        transfer_syntax: a TransferSyntaxUID.

    Returns:
        None, or a reason naming the transfer syntax and the package(s) to install.
    """
    from pydicom.pixels import get_decoder

    ts = UID(transfer_syntax)
    if not ts.is_compressed:
        return None
    try:
        decoder = get_decoder(ts)
    except NotImplementedError:
        return (
            f"transfer syntax {ts.name} ({ts}) has no pixel data decoder in pydicom; convert the series to an "
            "uncompressed transfer syntax first (e.g. `gdcmconv --raw` or `dcmdjpeg`)"
        )
    if decoder.is_available:
        return None
    return (
        f"compressed transfer syntax {ts.name} ({ts}) needs a pixel data decoder that is not installed: "
        f"run {_install_hint(ts)}, then scan again"
    )


def _expected_pixel_bytes(rows: int, columns: int, samples: int, bits: int, frames: int) -> int:
    n = rows * columns * samples * frames
    if bits == 1:
        return (n + 7) // 8
    return n * (bits // 8)


_MULTI_FRAME_FIX = "convert it to a NIfTI volume (e.g. `dcm2niix -z y <folder>`) and scan the .nii.gz instead"


def _file_problem(ds: Dataset, h: DicomHeader) -> str | None:
    """The first reason why this file cannot be one slice of a grey-level volume, or None."""
    if h.is_dicomdir:
        return "a DICOMDIR (media index), not an image"
    if "PixelData" not in ds:
        if "FloatPixelData" in ds or "DoubleFloatPixelData" in ds:
            return f"float pixel data is not supported yet ({h.describe()})"
        if len(ds) == 0 or (not h.sop_class and not h.modality and "Rows" not in ds):
            return (
                "no pixel data and no readable image attributes (no SOP class, modality or Rows): the file is "
                "corrupt or truncated; copy it again from the source"
            )
        if "Rows" in ds or "Image Storage" in h.sop_class:
            return (
                f"no pixel data although it is an image ({h.describe()}): the file is truncated (cut short "
                "during copying) or was stripped of its pixels; copy it again from the source"
            )
        return f"no pixel data ({h.describe()}): not an image"
    if h.modality == "SEG":
        return "a DICOM SEG object: segmentations are read as NIfTI label maps; export it to NIfTI first"
    frames_raw = _get(ds, "NumberOfFrames", 1)
    frames = _as_int(frames_raw)
    if frames is None:
        return f"invalid NumberOfFrames {frames_raw!r}"
    if frames > 1:
        return f"multi-frame images are not supported yet (NumberOfFrames={frames}, {h.describe()}); {_MULTI_FRAME_FIX}"
    if "PerFrameFunctionalGroupsSequence" in ds or "SharedFunctionalGroupsSequence" in ds:
        return (
            f"enhanced multi-frame object ({h.describe()}): its geometry is in functional groups; "
            f"multi-frame images are not supported yet; {_MULTI_FRAME_FIX}"
        )
    if h.samples_per_pixel != 1:
        photometric = _get(ds, "PhotometricInterpretation", "?")
        return (
            f"not a grey-level volume (SamplesPerPixel={h.samples_per_pixel}, PhotometricInterpretation={photometric})"
        )
    photometric = str(_get(ds, "PhotometricInterpretation", "MONOCHROME2")).strip()
    if not photometric.startswith("MONOCHROME"):
        return f"not a grey-level volume (PhotometricInterpretation={photometric})"
    missing = [k for k in ("Rows", "Columns", "BitsAllocated") if _get(ds, k) is None]
    if missing:
        garbled = [k for k in missing if k in ds]
        if garbled:
            return (
                f"unreadable {', '.join(garbled)} value(s) ({h.describe()}): the header is corrupt; copy the file "
                "again from the source"
            )
        return f"missing {', '.join(missing)} ({h.describe()}): not a valid image header; export it again from the source"
    missing = [k for k in _GEOMETRY_KEYWORDS if _get(ds, k) is None]
    if missing:
        return (
            f"missing {', '.join(missing)} ({h.describe()}): without patient geometry the slices cannot be "
            "placed in a volume"
        )
    if h.pixel_spacing is None or min(h.pixel_spacing) <= 0:
        return f"invalid PixelSpacing {_get(ds, 'PixelSpacing')!r}"
    if h.position is None:
        return f"invalid ImagePositionPatient {_get(ds, 'ImagePositionPatient')!r}"
    if h.orientation is None:
        return f"invalid ImageOrientationPatient {_get(ds, 'ImageOrientationPatient')!r}"
    row, col = np.asarray(h.orientation[:3]), np.asarray(h.orientation[3:])
    if not (0.99 < np.linalg.norm(row) < 1.01 and 0.99 < np.linalg.norm(col) < 1.01) or abs(row @ col) > 1e-2:
        return f"ImageOrientationPatient {list(h.orientation)} is not two orthogonal unit vectors"
    problem = decoder_problem(h.transfer_syntax)
    if problem:
        return problem
    ts = UID(h.transfer_syntax)
    if not ts.is_compressed:
        elem = ds["PixelData"]
        value = elem.value
        if elem.is_undefined_length or not isinstance(value, (bytes, bytearray)):
            return f"uncompressed transfer syntax {ts.name} but encapsulated pixel data: the file is malformed"
        expected = _expected_pixel_bytes(h.rows or 0, h.columns or 0, 1, h.bits_allocated or 0, 1)
        if len(value) < expected:
            return (
                f"pixel data is truncated: {len(value)} bytes, expected {expected} "
                f"(Rows*Columns*SamplesPerPixel*BitsAllocated/8 = {h.rows}*{h.columns}*1*{h.bits_allocated}/8); "
                "the file was probably cut short, copy it again from the source"
            )
    return None


def _header_from_dataset(ds: Dataset, path: str, keywords: Iterable[str]) -> DicomHeader:
    sop_class_uid = _get(ds, "SOPClassUID") or _get(getattr(ds, "file_meta", Dataset()), "MediaStorageSOPClassUID")
    sop_class = UID(str(sop_class_uid)).name if sop_class_uid else ""
    spacing = _as_floats(_get(ds, "PixelSpacing"), 2)
    thickness = None
    for k in ("SpacingBetweenSlices", "SliceThickness"):
        v = _get(ds, k)
        try:
            if v is not None and float(v) > 0:
                thickness = float(v)
                break
        except (TypeError, ValueError):
            continue
    attributes: dict[str, Any] = {}
    for k in keywords:
        v = _get(ds, k)
        if v is None:
            continue
        if isinstance(v, (list, tuple, pydicom.multival.MultiValue)):
            v = "\\".join(str(x) for x in v)
        attributes[k] = str(v).strip() if not isinstance(v, (int, float)) else v
    slope = _get(ds, "RescaleSlope", 1.0)
    intercept = _get(ds, "RescaleIntercept", 0.0)
    try:
        slope, intercept = float(slope), float(intercept)
    except (TypeError, ValueError):
        slope, intercept = math.nan, math.nan
    h = DicomHeader(
        path=str(path),
        series_uid=str(_get(ds, "SeriesInstanceUID")) if _get(ds, "SeriesInstanceUID") else None,
        sop_instance_uid=str(_get(ds, "SOPInstanceUID")) if _get(ds, "SOPInstanceUID") else None,
        sop_class=sop_class,
        modality=str(_get(ds, "Modality", "")).strip().upper(),
        series_number=_as_int(_get(ds, "SeriesNumber")),
        rows=_as_int(_get(ds, "Rows")),
        columns=_as_int(_get(ds, "Columns")),
        pixel_spacing=spacing,  # type: ignore[arg-type]
        orientation=_as_floats(_get(ds, "ImageOrientationPatient"), 6),  # type: ignore[arg-type]
        position=_as_floats(_get(ds, "ImagePositionPatient"), 3),  # type: ignore[arg-type]
        samples_per_pixel=_as_int(_get(ds, "SamplesPerPixel", 1)) or 1,
        bits_allocated=_as_int(_get(ds, "BitsAllocated")),
        number_of_frames=_as_int(_get(ds, "NumberOfFrames", 1)) or 1,
        transfer_syntax=str(_transfer_syntax(ds)),
        rescale_slope=slope,
        rescale_intercept=intercept,
        slice_thickness=thickness,
        attributes=attributes,
        patient_id=str(_get(ds, "PatientID")).strip() if _get(ds, "PatientID") else None,
        is_dicomdir=sop_class_uid == "1.2.840.10008.1.3.10" or "DirectoryRecordSequence" in ds,
    )
    h.problem = _file_problem(ds, h)
    if h.problem is None and not (math.isfinite(slope) and math.isfinite(intercept) and slope != 0):
        h.problem = f"invalid RescaleSlope/RescaleIntercept ({_get(ds, 'RescaleSlope')!r}, {_get(ds, 'RescaleIntercept')!r})"
    return h


def read_header(path: str | os.PathLike, *, keywords: Iterable[str] = ()) -> DicomHeader:
    """Read one DICOM file's header (pixels are read but not decoded) and check it as a volume slice.

    Args:
        path: the file.
        keywords: extra DICOM keywords to copy into ``attributes`` (e.g. the site fields).

    Returns:
        The header; ``problem`` says why the file cannot be a slice of a volume (None when it can).

    Raises:
        NotDicomError: the file is not DICOM.
        DicomError: the file is DICOM but cannot be parsed (corrupt or truncated header).
    """
    path = str(path)
    ds, caught = read_dataset(path)
    return checked_header(ds, path, keywords, caught)


def checked_header(ds: Dataset, path: str, keywords: Iterable[str], caught: list[str]) -> DicomHeader:
    """`_header_from_dataset`, with pydicom's warnings on lazily parsed values collected, errors as `DicomError`."""
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        try:
            h = _header_from_dataset(ds, path, keywords)
        except Exception as e:  # a malformed element that pydicom parses lazily
            raise DicomError(path, f"malformed DICOM header ({type(e).__name__}: {e})") from e
    h.warnings = list(caught) + [str(w.message) for w in record]
    return h


def group_series(headers: Iterable[DicomHeader]) -> dict[str, list[DicomHeader]]:
    """Group headers by SeriesInstanceUID (never by folder or name).

    Files without a SeriesInstanceUID each form their own group, keyed ``"no-uid:<path>"``.

    Args:
        headers: headers of DICOM files, from anywhere in a tree.

    Returns:
        key -> headers of that series, keys in order of first appearance.
    """
    groups: dict[str, list[DicomHeader]] = {}
    for h in headers:
        key = h.series_uid if h.series_uid else f"no-uid:{h.path}"
        groups.setdefault(key, []).append(h)
    return groups


# -------------------------------------------------------------------------------------- geometry
@dataclass
class DicomSeries:
    """A validated single-frame DICOM series, in geometric order.

    Attributes:
        headers: one per slice, sorted by position along the slice normal (ascending).
        affine: (4, 4) float64 voxel -> world (RAS, mm) for arrays laid out (column index, row index, slice).
        shape: (X, Y, Z) = (Columns, Rows, number of slices).
        spacing: (PixelSpacing[1], PixelSpacing[0], slice step) in mm.
        modality: the series' Modality code ("" when missing).
    """

    headers: list[DicomHeader]
    affine: np.ndarray
    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    modality: str

    @property
    def paths(self) -> list[str]:
        return [h.path for h in self.headers]

    @property
    def folder(self) -> str:
        """The folder that holds all the files (their deepest common folder)."""
        return _common_folder(self.paths)


def _common_folder(paths: Sequence[str]) -> str:
    parents = [os.path.dirname(p) for p in paths]
    if not parents:
        return ""
    try:
        return os.path.commonpath(parents)
    except ValueError:  # a mix of absolute and relative paths
        return parents[0]


def series_affine(
    orientation: Sequence[float],
    first_position: Sequence[float],
    pixel_spacing: Sequence[float],
    step: Sequence[float],
) -> np.ndarray:
    """Voxel -> world (RAS, mm) affine of a slice stack.

    Array axis 0 runs along the row direction cosine (DICOM column index ``i``, spacing PixelSpacing[1]),
    axis 1 along the column direction cosine (row index ``j``, spacing PixelSpacing[0]), axis 2 through the
    slices. DICOM patient coordinates are LPS; the result is flipped to RAS like NIfTI.

    Args:
        orientation: ImageOrientationPatient, (6,): row cosine then column cosine (LPS).
        first_position: ImagePositionPatient of slice 0, (3,) (LPS, mm).
        pixel_spacing: PixelSpacing as stored, (2,): (row spacing, column spacing).
        step: (3,) LPS vector (mm) from one slice position to the next.

    Returns:
        (4, 4) float64 affine.
    """
    row = np.asarray(orientation[:3], dtype=np.float64)
    col = np.asarray(orientation[3:6], dtype=np.float64)
    row, col = row / np.linalg.norm(row), col / np.linalg.norm(col)
    lps = np.eye(4)
    lps[:3, 0] = row * float(pixel_spacing[1])
    lps[:3, 1] = col * float(pixel_spacing[0])
    lps[:3, 2] = np.asarray(step, dtype=np.float64)
    lps[:3, 3] = np.asarray(first_position, dtype=np.float64)
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps


def _name(h: DicomHeader) -> str:
    return os.path.basename(h.path)


def _distinct(values: Sequence[Any], close) -> list[tuple[Any, int]]:
    """Cluster ``values`` by ``close(a, b)``: [(representative, count)], most common first."""
    clusters: list[list[Any]] = []
    for v in values:
        for c in clusters:
            if close(c[0], v):
                c.append(v)
                break
        else:
            clusters.append([v])
    return sorted(((c[0], len(c)) for c in clusters), key=lambda t: -t[1])


def order_series(
    headers: Sequence[DicomHeader],
    *,
    min_slices: int = 3,
    gap_factor: float = 1.5,
    spacing_rtol: float = 0.1,
) -> DicomSeries:
    """Validate a group of headers as one volume and sort it by position along the slice normal.

    Args:
        headers: the files of one series (any order).
        min_slices: fewest slices accepted.
        gap_factor: a step larger than ``gap_factor`` times the median step means a missing slice.
        spacing_rtol: largest accepted (max step - min step) / median step.

    Returns:
        The series in geometric order with its RAS affine.

    Raises:
        DicomSeriesError: with the reason (bad files, mixed orientation, inconsistent matrix or pixel
            spacing, too few slices, duplicate positions, missing slices, uneven spacing).
    """
    headers = list(headers)
    paths = [h.path for h in headers]
    if not headers:
        raise DicomSeriesError(paths, "no files")
    bad = [h for h in headers if h.problem]
    if bad:
        problems = Counter(h.problem for h in bad)
        problem, count = problems.most_common(1)[0]
        if len(headers) == 1:
            raise DicomSeriesError(paths, str(problem))
        example = next(h for h in bad if h.problem == problem)
        others = f"; {len(problems) - 1} other problem(s) too" if len(problems) > 1 else ""
        if len(bad) == len(headers):
            if len(problems) == 1:
                raise DicomSeriesError(paths, f"every file: {problem}")
            raise DicomSeriesError(paths, f"no file can be used: {count} like {_name(example)}: {problem}{others}")
        raise DicomSeriesError(
            paths,
            f"{len(bad)} of {len(headers)} files cannot be used, e.g. {_name(example)}: {problem}{others}",
        )
    # orientation
    orients = _distinct([h.orientation for h in headers], lambda a, b: np.allclose(a, b, atol=ORIENTATION_TOL))
    if len(orients) > 1:
        desc = "; ".join(f"{n} file(s) with {[round(x, 4) for x in o]}" for o, n in orients[:3])
        if len(orients) > 3:
            desc += f"; {len(orients) - 3} more orientation(s)"
        raise DicomSeriesError(
            paths,
            f"mixed orientations within the series ({desc}); a localizer or a reformat may share the series "
            "- move those files out",
        )
    matrices = Counter((h.rows, h.columns) for h in headers)
    if len(matrices) > 1:
        desc = ", ".join(f"{n} file(s) {r}x{c}" for (r, c), n in matrices.most_common())
        raise DicomSeriesError(paths, f"inconsistent Rows/Columns within the series: {desc}")
    spacings = _distinct([h.pixel_spacing for h in headers], lambda a, b: np.allclose(a, b, rtol=1e-4, atol=1e-6))
    if len(spacings) > 1:
        desc = ", ".join(f"{n} file(s) {list(s)}" for s, n in spacings)
        raise DicomSeriesError(paths, f"inconsistent PixelSpacing within the series: {desc}")
    if len(headers) < min_slices:
        raise DicomSeriesError(
            paths,
            f"only {len(headers)} slice(s) ({headers[0].describe()}); a volume needs at least {min_slices}",
        )
    orientation = np.asarray(headers[0].orientation, dtype=np.float64)
    row, col = orientation[:3] / np.linalg.norm(orientation[:3]), orientation[3:] / np.linalg.norm(orientation[3:])
    normal = np.cross(row, col)
    normal /= np.linalg.norm(normal)
    positions = np.asarray([h.position for h in headers], dtype=np.float64)
    along = positions @ normal
    order = np.argsort(along, kind="stable")
    headers = [headers[i] for i in order]
    positions, along = positions[order], along[order]
    spacing2d = headers[0].pixel_spacing
    assert spacing2d is not None
    n = len(headers)
    if n == 1:
        step_len = headers[0].slice_thickness or 1.0
        step = normal * step_len
    else:
        steps = np.diff(along)
        dup = np.flatnonzero(steps <= DUPLICATE_TOL_MM)
        if dup.size:
            a, b = headers[dup[0]], headers[dup[0] + 1]
            same = " (the same SOPInstanceUID: one image stored twice)" if a.sop_instance_uid and a.sop_instance_uid == b.sop_instance_uid else ""
            raise DicomSeriesError(
                paths,
                f"duplicate slice positions: {dup.size} pair(s) of slices at the same position, e.g. {_name(a)} and "
                f"{_name(b)} both at {along[dup[0]]:.3f} mm along the slice normal{same}; remove the duplicates "
                "(or split echoes/phases into separate series)",
            )
        median = float(np.median(steps))
        big = int(np.argmax(steps))
        if steps[big] > gap_factor * median:
            missing = int(round(steps[big] / median)) - 1
            raise DicomSeriesError(
                paths,
                f"missing slice(s): a gap of {steps[big]:.3f} mm between {_name(headers[big])} and "
                f"{_name(headers[big + 1])} where the median step is {median:.3f} mm (about {max(missing, 1)} slice(s) "
                "missing); copy the complete series",
            )
        spread = float((steps.max() - steps.min()) / median)
        if spread > spacing_rtol:
            raise DicomSeriesError(
                paths,
                f"uneven slice spacing: steps from {steps.min():.3f} to {steps.max():.3f} mm (median {median:.3f} mm, "
                f"relative spread {spread:.3f} > {spacing_rtol}); resample it to a regular grid first",
            )
        step = (positions[-1] - positions[0]) / (n - 1)
        # every slice must lie on the line p0 + k * step (a constant in-plane shift, e.g. gantry tilt, is fine)
        expected = positions[0] + np.outer((along - along[0]) / (along[-1] - along[0]) * (n - 1), step)
        deviation = float(np.max(np.linalg.norm(positions - expected, axis=1)))
        if deviation > 0.1 * min(spacing2d):
            raise DicomSeriesError(
                paths,
                f"slice positions do not lie on a straight line (largest deviation {deviation:.3f} mm); the "
                "series mixes stacks - split it",
            )
        step_len = median
    affine = series_affine(orientation, positions[0], spacing2d, step)
    modality = Counter(h.modality for h in headers).most_common(1)[0][0]
    shape = (int(headers[0].columns or 0), int(headers[0].rows or 0), n)
    return DicomSeries(
        headers=headers,
        affine=affine,
        shape=shape,
        spacing=(float(spacing2d[1]), float(spacing2d[0]), float(step_len)),
        modality=modality,
    )


# ----------------------------------------------------------------------------------------- pixels
def _decode_slice(ds: Dataset, h: DicomHeader) -> np.ndarray:
    """Pixel array of one slice, (Rows, Columns) float32 with the modality rescale applied."""
    meta = getattr(ds, "file_meta", None)
    if meta is None or "TransferSyntaxUID" not in meta:  # headerless files read with force=True
        if meta is None:
            ds.file_meta = pydicom.dataset.FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = UID(h.transfer_syntax)
    try:
        arr = ds.pixel_array
    except Exception as e:
        fix = decoder_problem(h.transfer_syntax) or "check the file, or convert it to an uncompressed transfer syntax"
        raise DicomError(h.path, f"cannot decode the pixel data ({type(e).__name__}: {e}); {fix}") from e
    if arr.shape != (h.rows, h.columns):
        raise DicomError(h.path, f"decoded pixel array has shape {arr.shape}, expected ({h.rows}, {h.columns})")
    out = arr.astype(np.float64) * h.rescale_slope + h.rescale_intercept
    return out.astype(np.float32)


def load_series_array(series: DicomSeries, datasets: Mapping[str, Dataset] | None = None) -> np.ndarray:
    """Decode a validated series into a volume.

    Args:
        series: from `order_series`.
        datasets: already-read data sets by path (read again from disk when missing).

    Returns:
        (X, Y, Z) float32 array: X = column index, Y = row index, Z = slice in geometric order, with
        RescaleSlope/RescaleIntercept applied.
    """
    X, Y, Z = series.shape
    vol = np.empty((X, Y, Z), dtype=np.float32)
    for k, h in enumerate(series.headers):
        ds = datasets.get(h.path) if datasets else None
        if ds is None:
            ds, _ = read_dataset(h.path)
        vol[:, :, k] = _decode_slice(ds, h).T
    return vol


# -------------------------------------------------------------------------------------- the reader
@dataclass
class _LoadedSeries:
    series: DicomSeries
    datasets: dict[str, Dataset]


def _not_an_image(h: DicomHeader) -> bool:
    return h.is_dicomdir or bool(h.problem and h.problem.startswith("no pixel data"))


def is_nifti(path: str | os.PathLike) -> bool:
    """True for a ``.nii`` or ``.nii.gz`` name (any case)."""
    return str(path).lower().endswith(NIFTI_SUFFIXES)


def nifti_stem(name: str) -> str:
    """``name`` without its ``.nii``/``.nii.gz`` suffix (unchanged when it has neither)."""
    low = name.lower()
    for suf in NIFTI_SUFFIXES:
        if low.endswith(suf):
            return name[: -len(suf)]
    return name


class DicomSeriesReader(ImageReader):
    """MONAI image reader for one DICOM series given as an ordered file list or as a folder.

    Input: a list/tuple of DICOM file paths (normally the geometry-ordered list stored in the scan index;
    the reader orders them by geometry again, so any order gives the same result), or a folder, which must
    then hold exactly one image series (other files are ignored).

    Output of `get_data`: an (X, Y, Z) float32 array (X = DICOM column index, Y = row index, Z = slice along
    the normal) with RescaleSlope/Intercept applied, and metadata in MONAI's conventions: ``affine`` and
    ``original_affine`` (RAS, (4, 4)), ``spatial_shape``, ``space`` = "RAS", ``original_channel_dim`` (NaN,
    i.e. no channel, as MONAI's own readers write it), ``spacing``, ``modality``. No identifying attribute
    is copied.

    Args:
        min_slices: fewest slices accepted (1 reads a single slice as a one-slice volume).
        gap_factor: see `order_series`.
        spacing_rtol: see `order_series`.

    Example:
        >>> LoadImaged(["image", "label"], reader=[DicomSeriesReader(), NibabelReader()])  # doctest: +SKIP
    """

    def __init__(self, min_slices: int = 1, gap_factor: float = 1.5, spacing_rtol: float = 0.1):
        super().__init__()
        self.min_slices = int(min_slices)
        self.gap_factor = float(gap_factor)
        self.spacing_rtol = float(spacing_rtol)

    def verify_suffix(self, filename: Sequence[str | os.PathLike] | str | os.PathLike) -> bool:
        """True for a folder, or a list/tuple of (non-NIfTI) paths, or one DICOM file."""
        if isinstance(filename, (list, tuple)):
            names = [str(f) for f in filename]
            if len(names) == 1 and os.path.isdir(names[0]):
                return True
            return bool(names) and not any(is_nifti(n) for n in names)
        name = str(filename)
        if os.path.isdir(name):
            return True
        if is_nifti(name):
            return False
        try:
            return name.lower().endswith(".dcm") or pydicom.misc.is_dicom(name)
        except OSError:
            return False

    def read(self, data: Sequence[str | os.PathLike] | str | os.PathLike, **kwargs) -> _LoadedSeries:
        """Read and order one series.

        Args:
            data: a folder, or DICOM file paths of one series.

        Returns:
            an object for `get_data`.

        Raises:
            ValueError: a NIfTI path (so that MONAI falls through to the next reader); `DicomError` for a
                file that cannot be read; `DicomSeriesError` when the files are not one valid series.
        """
        names = [str(n) for n in ensure_tuple(data)]
        if not names:
            raise ValueError("DicomSeriesReader: no file given")
        nifti = [n for n in names if is_nifti(n)]
        if nifti:
            raise ValueError(f"{nifti[0]}: a NIfTI file, not a DICOM series; read it with monai.data.NibabelReader")
        datasets: dict[str, Dataset] = {}
        headers: list[DicomHeader] = []
        if len(names) == 1 and os.path.isdir(names[0]):
            folder = names[0]
            for entry in sorted(os.listdir(folder)):
                p = os.path.join(folder, entry)
                if not os.path.isfile(p) or is_nifti(p):
                    continue
                try:
                    ds, caught = read_dataset(p)
                except NotDicomError as e:
                    logger.debug("skipping %s", e)
                    continue
                headers.append(self._header(ds, p, caught))
                datasets[p] = ds
            # series without any image (structure sets, reports, a DICOMDIR) do not count
            groups = {k: v for k, v in group_series(headers).items() if not all(_not_an_image(h) for h in v)}
            if not groups:
                raise DicomSeriesError([folder], "no DICOM image series in this folder")
            if len(groups) > 1:
                desc = "; ".join(
                    f"series #{v[0].series_number if v[0].series_number is not None else '?'} ({v[0].modality or '?'}, {len(v)} files)"
                    for v in groups.values()
                )
                raise DicomSeriesError(
                    [folder],
                    f"the folder holds {len(groups)} image series ({desc}); pass the file list of one series "
                    "(as stored in the scan index) instead of the folder",
                )
            headers = next(iter(groups.values()))
        else:
            for p in names:
                ds, caught = read_dataset(p)
                headers.append(self._header(ds, p, caught))
                datasets[p] = ds
            uids = {h.series_uid for h in headers}
            if len(uids) > 1:
                raise DicomSeriesError(names, f"the files belong to {len(uids)} different series; pass one series")
        series = order_series(
            headers, min_slices=self.min_slices, gap_factor=self.gap_factor, spacing_rtol=self.spacing_rtol
        )
        return _LoadedSeries(series=series, datasets=datasets)

    @staticmethod
    def _header(ds: Dataset, path: str, caught: list[str]) -> DicomHeader:
        h = checked_header(ds, path, (), caught)
        for msg in h.warnings:
            logger.warning("%s: pydicom: %s", path, msg)
        return h

    def get_data(self, img: _LoadedSeries | Sequence[_LoadedSeries]) -> tuple[np.ndarray, dict]:
        """Decode the series.

        Args:
            img: what `read` returned.

        Returns:
            (array, meta): array (X, Y, Z) float32; meta with ``affine``, ``original_affine``,
            ``spatial_shape``, ``space``, ``original_channel_dim``, ``spacing``, ``modality``.
        """
        if isinstance(img, (list, tuple)):
            if len(img) != 1:
                raise ValueError("DicomSeriesReader reads one series at a time; got several")
            img = img[0]
        series = img.series
        array = load_series_array(series, img.datasets)
        affine = series.affine.copy()
        meta: dict[str, Any] = {
            MetaKeys.AFFINE: affine,
            MetaKeys.ORIGINAL_AFFINE: affine.copy(),
            MetaKeys.SPATIAL_SHAPE: np.asarray(series.shape),
            MetaKeys.SPACE: SpaceKeys.RAS,
            MetaKeys.ORIGINAL_CHANNEL_DIM: float("nan"),
            "spacing": np.asarray(series.spacing, dtype=np.float64),
            "modality": series.modality or "unknown",
            "n_slices": len(series.headers),
        }
        return array, meta

