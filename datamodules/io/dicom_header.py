"""What one DICOM file tells about itself without its pixels: the `DicomHeader` record and how it is parsed."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian


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
        frame: for one frame of an enhanced multi-frame file (`datamodules.io.dicom_enhanced`), its 0-based
            index in the file's pixel data; None for a single-frame file.
        frames: for an enhanced multi-frame file whose header passed its checks, one header per frame (in
            file order, ``frame`` set, geometry and rescale from the functional groups); None otherwise. The
            file's own ``position``, ``orientation`` and ``pixel_spacing`` stay None: it is not one slice.
        image_type: the values of ImageType, stripped and upper case (``()`` when absent), e.g.
            ("ORIGINAL", "PRIMARY", "AXIAL"); "MOSAIC" marks a Siemens mosaic, "PROJECTION IMAGE" a projection.
        mosaic_images: the Siemens private NumberOfImagesInMosaic (0019,xx0A) of the "SIEMENS MR HEADER"
            block, or None when absent or unreadable.
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
    frame: int | None = None
    frames: list[DicomHeader] | None = field(default=None, repr=False)
    image_type: tuple[str, ...] = ()
    mosaic_images: int | None = None

    def describe(self) -> str:
        """A short non-identifying description: modality and SOP class."""
        parts = [p for p in (self.modality, self.sop_class) if p]
        return ", ".join(parts) if parts else "unknown SOP class"


#: the multi-frame SOP classes read frame by frame (`datamodules.io.dicom_enhanced`): UID -> name.
ENHANCED_SOP_CLASSES: dict[str, str] = {
    "1.2.840.10008.5.1.4.1.1.2.1": "Enhanced CT Image Storage",
    "1.2.840.10008.5.1.4.1.1.2.2": "Legacy Converted Enhanced CT Image Storage",
    "1.2.840.10008.5.1.4.1.1.4.1": "Enhanced MR Image Storage",
    "1.2.840.10008.5.1.4.1.1.4.4": "Legacy Converted Enhanced MR Image Storage",
}


#: the modality an image storage SOP class implies, for a file whose Modality element is missing or empty (some
#: anonymisers delete it): a CT slice without it was scaled by its own range instead of in HU (a review)
MODALITY_OF_SOP_CLASS: dict[str, str] = {
    "1.2.840.10008.5.1.4.1.1.2": "CT", "1.2.840.10008.5.1.4.1.1.2.1": "CT", "1.2.840.10008.5.1.4.1.1.2.2": "CT",
    "1.2.840.10008.5.1.4.1.1.4": "MR", "1.2.840.10008.5.1.4.1.1.4.1": "MR", "1.2.840.10008.5.1.4.1.1.4.4": "MR",
}


def sop_class_uid_of(ds: Dataset) -> str:
    """SOPClassUID, else the file meta's MediaStorageSOPClassUID, else ""."""
    uid = get_value(ds, "SOPClassUID") or get_value(getattr(ds, "file_meta", Dataset()), "MediaStorageSOPClassUID")
    return str(uid).strip() if uid else ""


def is_enhanced(ds: Dataset) -> bool:
    """Whether the data set is an enhanced (or legacy converted enhanced) CT/MR image, read frame by frame."""
    return sop_class_uid_of(ds) in ENHANCED_SOP_CLASSES


def functional_group_value(ds: Dataset, keyword: str) -> Any:
    """``keyword`` from the functional groups of a multi-frame data set: the first item of any sequence in the
    shared functional groups, else in the first frame's per-frame functional groups (None when absent).

    Header attributes such as MagneticFieldStrength can sit there instead of at the top level (e.g. in the
    Unassigned Shared Converted Attributes Sequence of a legacy converted enhanced image).
    """
    for group in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"):
        items = get_value(ds, group)
        if not items:
            continue
        for elem in items[0]:
            if elem.VR != "SQ" or not elem.value:
                continue
            value = get_value(elem.value[0], keyword)
            if value is not None:
                return value
    return None


def get_value(ds: Dataset, keyword: str, default: Any = None) -> Any:
    """``ds.get(keyword)`` that turns pydicom's errors on malformed values into ``default``."""
    try:
        value = ds.get(keyword, default)
    except Exception:  # malformed value (e.g. IS '1A'): treat as absent; the caller reports what it needs
        return default
    if value is None or (isinstance(value, (str, bytes)) and not value.strip()):
        return default
    return value


def as_int(value: Any) -> int | None:
    """``int(value)``, or None when it is not an integer."""
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def as_floats(value: Any, n: int) -> tuple[float, ...] | None:
    """``n`` finite floats from a multi-valued element, or None."""
    try:
        out = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        return None
    if len(out) != n or not all(math.isfinite(v) for v in out):
        return None
    return out


def image_type_of(ds: Dataset) -> tuple[str, ...]:
    """The values of ImageType, stripped and upper case; ``()`` when absent or unreadable."""
    value = get_value(ds, "ImageType")
    if value is None:
        return ()
    values = [value] if isinstance(value, (str, bytes)) else value
    try:
        return tuple(
            (v.decode("ascii", "replace") if isinstance(v, bytes) else str(v)).strip().upper() for v in values
        )
    except TypeError:
        return ()


#: the private creator of the Siemens block that holds NumberOfImagesInMosaic at element 0x0A of group 0x0019
_SIEMENS_MR_HEADER = "SIEMENS MR HEADER"


def siemens_mosaic_images(ds: Dataset) -> int | None:
    """The Siemens private NumberOfImagesInMosaic (0019,xx0A), or None when absent or unreadable.

    The element is US; read without its private dictionary (VR UN) it is two little-endian bytes.
    """
    try:
        value = ds.get_private_item(0x0019, 0x0A, _SIEMENS_MR_HEADER).value
    except Exception:  # no Siemens block, or a malformed one: not told
        return None
    if isinstance(value, (bytes, bytearray)):
        return int.from_bytes(value[:2], "little") if len(value) >= 2 else None
    if isinstance(value, (list, tuple, pydicom.multival.MultiValue)):
        value = value[0] if len(value) else None
    return as_int(value)


def transfer_syntax_of(ds: Dataset) -> UID:
    """The TransferSyntaxUID of the file meta, or a guess from how the data set was encoded."""
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


def with_transfer_syntax(ds: Dataset) -> Dataset:
    """``ds`` with a file meta that names its transfer syntax (`transfer_syntax_of`): a file read without the
    preamble and 'DICM' marker has none, and pydicom's decoder and highdicom need it."""
    meta = getattr(ds, "file_meta", None)
    if meta is None or "TransferSyntaxUID" not in meta:
        syntax = transfer_syntax_of(ds)
        if meta is None:
            ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = syntax
    return ds


def parse_header(ds: Dataset, path: str, keywords: Iterable[str]) -> DicomHeader:
    """The header fields of a data set, unchecked (``problem`` stays None).

    Args:
        ds: the data set, pixels included or not.
        path: the file, for the record.
        keywords: extra DICOM keywords to copy into ``attributes``.

    Returns:
        The header; malformed values become None (or NaN for the rescale), for the checks to report.
    """
    sop_class_uid = get_value(ds, "SOPClassUID") or get_value(getattr(ds, "file_meta", Dataset()), "MediaStorageSOPClassUID")
    sop_class = UID(str(sop_class_uid)).name if sop_class_uid else ""
    spacing = as_floats(get_value(ds, "PixelSpacing"), 2)
    thickness = None
    for k in ("SpacingBetweenSlices", "SliceThickness"):
        v = get_value(ds, k)
        try:
            if v is not None and float(v) > 0:
                thickness = float(v)
                break
        except (TypeError, ValueError):
            continue
    attributes: dict[str, Any] = {}
    multi_frame = "SharedFunctionalGroupsSequence" in ds or "PerFrameFunctionalGroupsSequence" in ds
    for k in keywords:
        v = get_value(ds, k)
        if v is None and multi_frame:
            v = functional_group_value(ds, k)
        if v is None:
            continue
        if isinstance(v, (list, tuple, pydicom.multival.MultiValue)):
            v = "\\".join(str(x) for x in v)
        attributes[k] = str(v).strip() if not isinstance(v, (int, float)) else v
    slope = get_value(ds, "RescaleSlope", 1.0)
    intercept = get_value(ds, "RescaleIntercept", 0.0)
    try:
        slope, intercept = float(slope), float(intercept)
    except (TypeError, ValueError):
        slope, intercept = math.nan, math.nan
    h = DicomHeader(
        path=str(path),
        series_uid=str(get_value(ds, "SeriesInstanceUID")) if get_value(ds, "SeriesInstanceUID") else None,
        sop_instance_uid=str(get_value(ds, "SOPInstanceUID")) if get_value(ds, "SOPInstanceUID") else None,
        sop_class=sop_class,
        modality=(str(get_value(ds, "Modality", "")).strip().upper()
                  or MODALITY_OF_SOP_CLASS.get(str(sop_class_uid).strip() if sop_class_uid else "", "")),
        series_number=as_int(get_value(ds, "SeriesNumber")),
        rows=as_int(get_value(ds, "Rows")),
        columns=as_int(get_value(ds, "Columns")),
        pixel_spacing=spacing,  # type: ignore[arg-type]
        orientation=as_floats(get_value(ds, "ImageOrientationPatient"), 6),  # type: ignore[arg-type]
        position=as_floats(get_value(ds, "ImagePositionPatient"), 3),  # type: ignore[arg-type]
        samples_per_pixel=as_int(get_value(ds, "SamplesPerPixel", 1)) or 1,
        bits_allocated=as_int(get_value(ds, "BitsAllocated")),
        number_of_frames=as_int(get_value(ds, "NumberOfFrames", 1)) or 1,
        transfer_syntax=str(transfer_syntax_of(ds)),
        rescale_slope=slope,
        rescale_intercept=intercept,
        slice_thickness=thickness,
        attributes=attributes,
        patient_id=str(get_value(ds, "PatientID")).strip() if get_value(ds, "PatientID") else None,
        is_dicomdir=sop_class_uid == "1.2.840.10008.1.3.10" or "DirectoryRecordSequence" in ds,
        image_type=image_type_of(ds),
        mosaic_images=siemens_mosaic_images(ds),
    )
    return h
