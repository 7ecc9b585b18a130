"""A predicted mask as a binary DICOM Segmentation (highdicom) that references its source slices.

The mask comes in the layout of `datamodules.io.dicom.DicomSeriesReader`: axis 0 is the DICOM column index,
axis 1 the row index, axis 2 the slices in geometric order (``DicomSeries.paths``). Each slice of it is
transposed to DICOM pixel order (rows, columns) and handed to highdicom together with the source instance
it came from, so that every frame of the Segmentation references (DerivationImageSequence) the
SOPInstanceUID of the slice whose pixels it covers, whatever the file names or InstanceNumbers.

Privacy: a DICOM Segmentation must carry the Patient and Study modules of its source images (PatientName,
PatientID, PatientBirthDate, StudyInstanceUID, ...), so that a PACS or viewer can attach it to the study.
It is therefore the one output of ``imaging-meta segment`` that contains identifying data; keep it where
the source images are allowed to be. Nothing else is copied on purpose: highdicom also records the source
scanner as contributing equipment, and its institution, station and serial number are removed from it.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np

import imaging_meta
from datamodules.io.atomic import atomic_open
from datamodules.io.dicom_files import read_dataset
from datamodules.io.dicom_header import with_transfer_syntax
from datamodules.io.dicom_series import ORIENTATION_TOL

__all__ = ["write_dicom_seg"]

#: the Manufacturer of every Segmentation written here: how `segment` tells its own file from another program's
SEG_MANUFACTURER = "imaging-meta"

#: dropped from the ContributingEquipmentSequence that highdicom fills from the source scanner (all type 3)
_EQUIPMENT_SITE_KEYWORDS = (
    "InstitutionName",
    "InstitutionAddress",
    "InstitutionalDepartmentName",
    "StationName",
    "DeviceSerialNumber",
    "OperatorsName",
)


def require_highdicom():
    try:
        import highdicom
    except ImportError as e:  # the optional extra
        raise ImportError("writing DICOM Segmentations needs highdicom: pip install 'imaging-meta[dicom-seg]'") from e
    return highdicom


def write_dicom_seg(
    mask: np.ndarray,
    series_files: Sequence[str | os.PathLike],
    out_path: str | os.PathLike,
    segment_label: str = "structure",
    *,
    series_number: int = 99,
    series_description: str = "imaging-meta few-shot segmentation",
) -> Path:
    """Write ``mask`` as a binary DICOM Segmentation of the series ``series_files``.

    The Segmentation copies the source's Patient and Study modules (PatientName, PatientID,
    StudyInstanceUID, ...): DICOM requires them so that it joins the source study. Its equipment is
    imaging-meta (Manufacturer "imaging-meta", SoftwareVersions the package version), and the source scanner
    is listed as contributing equipment without its institution, station or serial number. Its one segment is
    AUTOMATIC, with an AlgorithmIdentificationSequence naming imaging-meta and its version. Slices without
    any foreground are omitted (highdicom's ``omit_empty_frames``), unless the whole mask is empty.

    Args:
        mask: (X, Y, Z) boolean or 0/1 mask in the reader layout: ``mask[c, r, k]`` is pixel ``(r, c)``
            (row ``r``, column ``c``) of ``series_files[k]``.
        series_files: (Z,) the source slice files, in the order of mask axis 2 (``DicomSeries.paths``).
        out_path: the ``.seg.dcm`` file to write (its folder must exist).
        segment_label: the segment's label (the structure's name).
        series_number: SeriesNumber of the new Segmentation series.
        series_description: SeriesDescription of the new series.

    Returns:
        ``out_path``.

    Raises:
        ValueError: a mask that is not 3-D, not binary, or does not fit the series (slice count, Rows,
            Columns), or a series highdicom cannot derive a Segmentation from (the reason is given).
    """
    from pydicom.sr.codedict import codes

    hd = require_highdicom()
    files = [str(f) for f in series_files]
    mask = np.asarray(mask)
    if mask.ndim != 3:
        raise ValueError(f"mask must be (X, Y, Z) in the DICOM reader layout, got shape {mask.shape}")
    if len(files) == 1 and mask.shape[2] > 1:
        raise ValueError(f"{files[0]}: a multi-frame (enhanced) series; --format dicom-seg writes a segmentation of "
                         "single-frame series only: use --format nifti for this query")
    if mask.shape[2] != len(files):
        raise ValueError(f"mask has {mask.shape[2]} slices but the series has {len(files)} files; pass the series' own files")
    if mask.dtype != bool and not np.isin(mask, (0, 1)).all():
        raise ValueError("mask must be binary (bool or 0/1); threshold the probabilities first")
    sources = [_source(f) for f in files]
    for f, ds in zip(files, sources, strict=True):
        if (int(ds.Rows), int(ds.Columns)) != (mask.shape[1], mask.shape[0]):
            raise ValueError(
                f"{f}: {ds.Rows}x{ds.Columns} pixels (Rows x Columns) does not fit mask (X, Y) = {mask.shape[:2]}; "
                "the mask must be in the DicomSeriesReader layout (column index, row index, slice)"
            )
    # (X, Y, Z) -> (Z, Rows, Columns): frame k is source k in DICOM pixel order
    frames = np.ascontiguousarray(mask.astype(bool).transpose(2, 1, 0)).astype(np.uint8)
    version = imaging_meta.__version__
    description = hd.seg.SegmentDescription(
        segment_number=1,
        segment_label=segment_label,
        segmented_property_category=codes.SCT.Tissue,
        segmented_property_type=codes.SCT.Organ,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=hd.AlgorithmIdentificationSequence(
            name="imaging-meta", family=codes.cid7162.ArtificialIntelligence, version=version
        ),
    )
    _shared_geometry(sources)
    _default_repertoire_named(sources)
    folder = os.path.dirname(files[0]) if files else "?"
    _type2_present(sources, folder)
    with warnings.catch_warnings(record=True) as caught:  # re-emitted below without the patient's identifiers
        warnings.simplefilter("always")
        seg = _segmentation(hd, sources, frames, description, series_number, version, series_description, folder)
    for w in caught:
        warnings.warn_explicit(_redacted(str(w.message), sources[0]), w.category, "imaging_meta.commands.dicom_seg", 0)
    # highdicom lists the scanner as contributing equipment; its site-identifying attributes are optional there
    for item in seg.get("ContributingEquipmentSequence", []):
        for keyword in _EQUIPMENT_SITE_KEYWORDS:
            if keyword in item:
                delattr(item, keyword)
    _character_set_for(seg, segment_label)
    out = Path(out_path)
    with atomic_open(out, "wb") as stream:  # a crash leaves no half-written .seg.dcm
        seg.save_as(stream)
    return out


def _character_set_for(seg, text: str) -> None:
    """UTF-8 (``ISO_IR 192``) as the Segmentation's character set when ``text`` (the segment label) cannot be
    written in the one copied from the source: pydicom would write it with replacement characters ('Leber ?
    rechts', '??' for 肝臓), with only a warning, or (under the default repertoire, which pydicom encodes as
    Latin-1) as bytes outside it. Every other string is decoded already and re-encoded in UTF-8."""
    import warnings as _warnings

    from pydicom.charset import convert_encodings, encode_string

    charset = seg.get("SpecificCharacterSet")
    terms = list(charset) if isinstance(charset, (list, tuple)) or type(charset).__name__ == "MultiValue" else [charset]
    terms = [str(t or "").strip() for t in terms]
    if all(t in ("", "ISO_IR 6", "ISO 2022 IR 6") for t in terms):  # the default repertoire: ASCII only
        fits = text.isascii()
    else:
        try:
            with _warnings.catch_warnings():
                _warnings.simplefilter("error")  # pydicom's "using replacement characters" is a failure here
                encode_string(text, convert_encodings(terms))
            fits = True
        except Exception:  # an encoding error, a replacement warning, an unknown defined term
            fits = False
    if not fits:
        seg.SpecificCharacterSet = "ISO_IR 192"


def _default_repertoire_named(sources) -> None:
    """The in-memory source headers (never the files) with an empty first value of a multi-valued
    SpecificCharacterSet (``\\ISO 2022 IR 87``, the common Japanese and Korean form, where the empty value means
    the default repertoire) spelled ``ISO 2022 IR 6``, as highdicom requires (a review: it refused the series)."""
    for ds in sources:
        charset = ds.get("SpecificCharacterSet")
        if isinstance(charset, (list, tuple)) or type(charset).__name__ == "MultiValue":
            values = [str(v or "").strip() for v in charset]
            if len(values) > 1 and values[0] == "":
                ds.SpecificCharacterSet = ["ISO 2022 IR 6", *values[1:]]


def _shared_geometry(sources) -> None:
    """Make the in-memory source headers (never the files) what highdicom requires of a series that the reader
    accepted: one ImageOrientationPatient for every slice (the reader accepts differences below its
    ``ORIENTATION_TOL``, highdicom none: the first slice's is used), and a SliceThickness where it is absent or
    empty (type 2 in CT images; highdicom copies it into the Segmentation's pixel measures, which must have one):
    the spacing between the slices' positions."""
    if not sources:
        return
    first = [float(v) for v in sources[0].ImageOrientationPatient]
    for ds in sources[1:]:
        if np.allclose([float(v) for v in ds.ImageOrientationPatient], first, atol=ORIENTATION_TOL):
            ds.ImageOrientationPatient = list(sources[0].ImageOrientationPatient)
    missing = [ds for ds in sources if str(ds.get("SliceThickness", "") or "").strip() == ""]
    if missing:
        positions = np.array([[float(v) for v in ds.ImagePositionPatient] for ds in sources])
        # along the slices' normal: a gantry-tilted series' positions step obliquely (a review: 2.66 for 2.5 mm)
        normal = np.cross(first[:3], first[3:])
        steps = np.abs(np.diff(positions, axis=0) @ (normal / np.linalg.norm(normal)))
        thickness = float(np.median(steps)) if steps.size else 0.0
        thickness = thickness if thickness > 0 else 1.0  # one slice: 1 mm, as highdicom needs a positive one
        for ds in missing:
            ds.SliceThickness = f"{thickness:.6g}"


#: type 2 attributes of the Patient and General Study modules that highdicom reads from the first source image:
#: an anonymiser may delete them, which DICOM allows only as present and empty
_TYPE2_FROM_SOURCE = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime", "AccessionNumber",
    "StudyID", "ReferringPhysicianName",
)


def _type2_present(sources, folder: str) -> None:
    """The in-memory source headers (never the files) with each of `_TYPE2_FROM_SOURCE` that is absent present and
    empty, as DICOM allows a type 2 attribute to be: highdicom read them, so an anonymised series (PatientBirthDate
    deleted) was refused (a review). Warns when the PatientID is empty: a PACS may not attach the Segmentation to
    its study."""
    for ds in sources:
        for keyword in _TYPE2_FROM_SOURCE:
            if keyword not in ds:
                setattr(ds, keyword, None)
    if sources and not str(sources[0].get("PatientID") or "").strip():
        warnings.warn(f"{folder}: the series has no PatientID, so its DICOM Segmentation has none either; a PACS may "
                      "not attach it to the study", stacklevel=3)


#: the identifying attributes a Segmentation copies from its source (Patient, Study and General Study modules)
_IDENTIFYING_KEYWORDS = (
    "PatientName", "PatientID", "PatientBirthDate", "OtherPatientIDs", "OtherPatientNames", "AccessionNumber",
    "StudyID", "StudyInstanceUID", "ReferringPhysicianName", "StudyDescription", "IssuerOfPatientID",
)


def _redacted(message: str, source) -> str:
    """``message`` with every value of the source's identifying attributes replaced by its keyword: highdicom's
    warnings quote them (a single-component PatientName: 'The string "DOE" is unlikely to represent ...'), and
    warnings reach the console and logs, which hold no patient identifiers."""
    for keyword in _IDENTIFYING_KEYWORDS:
        value = source.get(keyword)
        values = value if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue" else [value]
        for v in values:
            text = str(v) if v is not None else ""
            if len(text.strip()) >= 2:
                message = message.replace(text, f"<{keyword}>")
    return message


def _segmentation(hd, sources, frames, description, series_number, version, series_description, folder):
    """highdicom's Segmentation of ``frames`` derived from ``sources``; its refusals as a ValueError naming
    ``folder``."""
    try:
        return hd.seg.Segmentation(
            source_images=sources,
            pixel_array=frames,
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=[description],
            series_instance_uid=hd.UID(),
            series_number=int(series_number),
            sop_instance_uid=hd.UID(),
            instance_number=1,
            manufacturer=SEG_MANUFACTURER,
            manufacturer_model_name="imaging-meta",
            software_versions=version,
            device_serial_number="0",
            series_description=series_description,
            content_label="IMAGING_META",
            content_description="few-shot segmentation by imaging-meta",
        )
    except (ValueError, TypeError, AttributeError, KeyError) as e:
        message = _redacted(f"{type(e).__name__}: {e}", sources[0]) if sources else str(e)
        raise ValueError(f"{folder}: cannot derive a DICOM Segmentation from this series ({message})") from e


def _source(path: str):
    """One source file's header, read as the series reader reads it (`read_dataset`: a file without the 128-byte
    preamble and 'DICM' marker too, whose transfer syntax is the one it was read in: `with_transfer_syntax`)."""
    return with_transfer_syntax(read_dataset(path, stop_before_pixels=True)[0])
