"""Why a DICOM file cannot be one slice of a grey-level volume, and whether its pixels can be decoded here."""

from __future__ import annotations

import math
import os

import numpy as np
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    JPEG2000TransferSyntaxes,
    JPEGLSTransferSyntaxes,
    JPEGTransferSyntaxes,
    RLETransferSyntaxes,
)

from datamodules.io.dicom_header import DicomHeader, as_int, get_value, is_enhanced

#: a DICOM value length of 0xFFFFFFFF: the value is encapsulated (items up to a delimiter).
UNDEFINED_LENGTH = 0xFFFFFFFF

#: the geometry keywords every slice of a volume needs.
_GEOMETRY_KEYWORDS = ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing")

_HIGH_THROUGHPUT_J2K = (
    "1.2.840.10008.1.2.4.201",
    "1.2.840.10008.1.2.4.202",
    "1.2.840.10008.1.2.4.203",
)

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


#: pydicom plugins that decode only some variants of their transfer syntaxes: Pillow reads 8-bit JPEG but not
#: 12-bit JPEG Extended, lossless JPEG or every JPEG 2000 file
_PARTIAL_PLUGINS = frozenset({"pillow"})


def decode_failure_fix(transfer_syntax: str | None) -> str:
    """The fix to name when a file of ``transfer_syntax`` failed to decode although a decoder is installed: the
    project's decoders when only a partial one (`_PARTIAL_PLUGINS`, Pillow, a core dependency) was there to try,
    since a 12-bit JPEG CT is then not corrupt; otherwise that the data is corrupt or the decoder cannot read it."""
    if not transfer_syntax:
        return "the pixel data is truncated or corrupt; copy the file again from the source"
    ts = UID(transfer_syntax)
    if not ts.is_compressed:
        return "the pixel data is truncated or corrupt; copy the file again from the source"
    from pydicom.pixels import get_decoder

    try:
        plugins = set(get_decoder(ts).available_plugins)
    except (NotImplementedError, AttributeError):
        plugins = set()
    if plugins and plugins <= _PARTIAL_PLUGINS:
        return (
            f"the only decoder installed for {ts.name} ({', '.join(sorted(plugins))}) does not read every variant of "
            f"it (Pillow reads 8-bit JPEG, not 12-bit or lossless JPEG): run {_install_hint(ts)}, then try again; "
            "if it still fails, the file is corrupt: copy it again from the source"
        )
    return (
        "the compressed pixel data is corrupt or the decoder cannot read it; copy the file again from the source, "
        "or convert it to an uncompressed transfer syntax"
    )


def _expected_pixel_bytes(rows: int, columns: int, samples: int, bits: int, frames: int) -> int:
    """Bytes of uncompressed pixel data for the matrix (bit-packed when ``bits == 1``)."""
    n = rows * columns * samples * frames
    if bits == 1:
        return (n + 7) // 8
    return n * (bits // 8)


_MULTI_FRAME_FIX = "convert it to a NIfTI volume (e.g. `dcm2niix -z y <folder>`) and scan the .nii.gz instead"
_ENHANCED_NAMES = "Enhanced or Legacy Converted Enhanced CT/MR Image Storage"


#: modalities of DICOM objects that are not images of the patient, even those that carry pixel data (an RT
#: Dose grid, a SEG): structure sets, plans, dose, reports, presentation states, key objects, registrations
NON_IMAGE_MODALITIES = {
    "RTSTRUCT": "an RT structure set (contours)",
    "RTPLAN": "an RT plan",
    "RTDOSE": "an RT dose grid (radiation dose, not an image of the patient)",
    "RTRECORD": "an RT treatment record",
    "SR": "a structured report",
    "PR": "a presentation state",
    "KO": "a key object selection",
    "REG": "a spatial registration",
    "DOC": "an encapsulated document",
    "SEG": "a DICOM Segmentation (SEG)",
    "ECG": "a waveform (ECG)",
    "HD": "a waveform (hemodynamic)",
    "EPS": "a waveform (cardiac electrophysiology)",
    "AU": "an audio recording",
}


def non_image_kind(h: DicomHeader) -> str | None:
    """What the object is when, by its header alone, it is not an image (a DICOMDIR, an RT structure set, plan
    or dose, a report...), or None. Needs no pixel data: works on headers read with ``stop_before_pixels``."""
    if h.is_dicomdir:
        return "a DICOMDIR (media index)"
    kind = NON_IMAGE_MODALITIES.get(h.modality)
    if kind is None and h.sop_class.startswith("RT ") and "Image" not in h.sop_class:
        kind = f"an {h.sop_class} object"
    if kind is None and any(w in h.sop_class for w in ("Waveform", "Segmentation Storage", "Presentation State")):
        kind = f"a {h.sop_class} object"
    return kind


def kind_problem(ds: Dataset, h: DicomHeader) -> str | None:
    """Why the file is not an image at all (a DICOMDIR, an RT or report object, no pixel data, a SEG object), or
    not one image (a Siemens mosaic: `mosaic_problem`), or None. Used for volume slices and 2D images alike."""
    if h.modality == "SEG" or "Segmentation Storage" in h.sop_class:
        return "a DICOM SEG object: segmentations are read as NIfTI label maps; export it to NIfTI first"
    kind = non_image_kind(h)
    if kind is not None:
        return f"{kind}, not an image ({h.describe()})" if not h.is_dicomdir else f"{kind}, not an image"
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
    return mosaic_problem(h)


def is_mosaic(h: DicomHeader) -> bool:
    """Whether the file is a Siemens mosaic: ImageType holds MOSAIC, or the Siemens private NumberOfImagesInMosaic
    is above 1. Header-only."""
    return "MOSAIC" in h.image_type or (h.mosaic_images or 0) > 1


def mosaic_problem(h: DicomHeader) -> str | None:
    """Why a Siemens mosaic (the slices of a volume tiled into one image, as fMRI and diffusion series are stored)
    is neither one slice of a volume nor one 2D image, with the fix; None for any other file. Header-only."""
    if not is_mosaic(h):
        return None
    count = f" of {h.mosaic_images} images per file" if h.mosaic_images else ""
    tag = "ImageType MOSAIC" if "MOSAIC" in h.image_type else f"NumberOfImagesInMosaic {h.mosaic_images}"
    matrix = f" {h.rows}x{h.columns}" if h.rows and h.columns else ""
    return (
        f"a Siemens mosaic{count} ({tag}: the slices of a volume tiled into one{matrix} image), not one slice or "
        "2D image; convert the series with `dcm2niix -z y <folder>` and use the .nii.gz"
    )


def projection_problem(h: DicomHeader) -> str | None:
    """Why a projection image (ImageType PROJECTION IMAGE: a maximum-intensity or other projection computed from a
    volume) is no slice of a volume, or None. Header-only. A 2D reader may still read it as a 2D picture."""
    if "PROJECTION IMAGE" not in h.image_type:
        return None
    image_type = "\\".join(h.image_type)
    return (
        f"a projection image (ImageType {image_type}, {h.describe()}): a 2D picture computed from a "
        "volume, not a slice of one; use the original series it was computed from"
    )


def _frames_problem(ds: Dataset, h: DicomHeader) -> str | None:
    """Why the image is neither a single frame nor an enhanced CT/MR image read frame by frame, or None.

    Enhanced and legacy converted enhanced CT/MR images (`ENHANCED_SOP_CLASSES`) pass here; their frames
    are checked by `datamodules.io.dicom_enhanced.read_frames`.
    """
    frames_raw = get_value(ds, "NumberOfFrames", 1)
    frames = as_int(frames_raw)
    if frames is None:
        return f"invalid NumberOfFrames {frames_raw!r}"
    if is_enhanced(ds):
        return None
    if frames > 1:
        return (
            f"multi-frame images are not supported yet (NumberOfFrames={frames}, {h.describe()}) except enhanced "
            f"CT/MR ({_ENHANCED_NAMES}); {_MULTI_FRAME_FIX}"
        )
    if "PerFrameFunctionalGroupsSequence" in ds or "SharedFunctionalGroupsSequence" in ds:
        return (
            f"enhanced multi-frame object ({h.describe()}): of the objects whose geometry is in functional groups "
            f"only enhanced CT/MR ({_ENHANCED_NAMES}) are read; {_MULTI_FRAME_FIX}"
        )
    return None


def _pixel_format_problem(ds: Dataset, h: DicomHeader) -> str | None:
    """Why the pixels are not one grey-level sample with a readable matrix (colour, missing Rows...), or None."""
    if h.samples_per_pixel != 1:
        photometric = get_value(ds, "PhotometricInterpretation", "?")
        return (
            f"not a grey-level volume (SamplesPerPixel={h.samples_per_pixel}, PhotometricInterpretation={photometric})"
        )
    photometric = str(get_value(ds, "PhotometricInterpretation", "MONOCHROME2")).strip()
    if not photometric.startswith("MONOCHROME"):
        return f"not a grey-level volume (PhotometricInterpretation={photometric})"
    missing = [k for k in ("Rows", "Columns", "BitsAllocated") if get_value(ds, k) is None]
    if missing:
        garbled = [k for k in missing if k in ds]
        if garbled:
            return (
                f"unreadable {', '.join(garbled)} value(s) ({h.describe()}): the header is corrupt; copy the file "
                "again from the source"
            )
        return f"missing {', '.join(missing)} ({h.describe()}): not a valid image header; export it again from the source"
    return _bits_problem(ds, h)


def _bits_problem(ds: Dataset, h: DicomHeader) -> str | None:
    """Why BitsStored or PixelRepresentation cannot decode the pixels (missing, garbled, out of range), or None."""
    allocated = as_int(get_value(ds, "BitsAllocated"))
    stored = as_int(get_value(ds, "BitsStored"))
    representation = as_int(get_value(ds, "PixelRepresentation"))
    if stored is None or not 1 <= stored <= (allocated or 64):
        value = get_value(ds, "BitsStored") if "BitsStored" in ds else "missing"
        return (f"invalid BitsStored ({value!r}; BitsAllocated {allocated}) ({h.describe()}): the pixels cannot be "
                "decoded; export the series again from the source")
    if representation not in (0, 1):
        value = get_value(ds, "PixelRepresentation") if "PixelRepresentation" in ds else "missing"
        return (f"invalid PixelRepresentation ({value!r}; must be 0 unsigned or 1 signed) ({h.describe()}): the "
                "pixels cannot be decoded; export the series again from the source")
    return None


def _geometry_problem(ds: Dataset, h: DicomHeader) -> str | None:
    """Why the slice cannot be placed in patient space (missing or invalid position, orientation, spacing), or None.

    An enhanced image has its geometry per frame in functional groups: `dicom_enhanced.read_frames` checks it.
    """
    if is_enhanced(ds):
        return None
    missing = [k for k in _GEOMETRY_KEYWORDS if get_value(ds, k) is None]
    if missing:
        return (
            f"missing {', '.join(missing)} ({h.describe()}): without patient geometry the slices cannot be "
            "placed in a volume"
        )
    if h.pixel_spacing is None or min(h.pixel_spacing) <= 0:
        return f"invalid PixelSpacing {get_value(ds, 'PixelSpacing')!r}"
    if h.position is None:
        return f"invalid ImagePositionPatient {get_value(ds, 'ImagePositionPatient')!r}"
    if h.orientation is None:
        return f"invalid ImageOrientationPatient {get_value(ds, 'ImageOrientationPatient')!r}"
    return orientation_problem(h.orientation)


def orientation_problem(orientation: tuple[float, ...]) -> str | None:
    """Why six direction cosines are not two orthogonal unit vectors, or None."""
    row, col = np.asarray(orientation[:3]), np.asarray(orientation[3:])
    if not (0.99 < np.linalg.norm(row) < 1.01 and 0.99 < np.linalg.norm(col) < 1.01) or abs(row @ col) > 1e-2:
        return f"ImageOrientationPatient {list(orientation)} is not two orthogonal unit vectors"
    return None


def _pixel_bytes_problem(ds: Dataset, h: DicomHeader) -> str | None:
    """Why uncompressed pixel data is malformed or shorter than the matrix needs, or None."""
    ts = UID(h.transfer_syntax)
    if not ts.is_compressed:
        elem = ds.get_item("PixelData", keep_deferred=True)
        if isinstance(elem, RawDataElement) and elem.value is None:  # deferred (`read_header`): not read, not decoded
            if elem.length == UNDEFINED_LENGTH:
                return f"uncompressed transfer syntax {ts.name} but encapsulated pixel data: the file is malformed"
            present = elem.length
            if ts != DeflatedExplicitVRLittleEndian:  # a deflated file's positions are in the inflated stream
                try:  # the bytes that the file holds after the value's start
                    present = min(elem.length, max(0, os.path.getsize(h.path) - elem.value_tell))
                except OSError:
                    pass
        else:
            elem = ds["PixelData"]
            if elem.is_undefined_length or not isinstance(elem.value, (bytes, bytearray)):
                return f"uncompressed transfer syntax {ts.name} but encapsulated pixel data: the file is malformed"
            present = len(elem.value)
        frames = h.number_of_frames
        expected = _expected_pixel_bytes(h.rows or 0, h.columns or 0, 1, h.bits_allocated or 0, frames)
        if present < expected:
            times = f"*{frames} frames" if frames > 1 else ""
            return (
                f"pixel data is truncated: {present} bytes, expected {expected} "
                f"(Rows*Columns*SamplesPerPixel*BitsAllocated/8{'*NumberOfFrames' if times else ''} = "
                f"{h.rows}*{h.columns}*1*{h.bits_allocated}/8{times}); "
                "the file was probably cut short, copy it again from the source"
            )
    return None


def file_problem(ds: Dataset, h: DicomHeader) -> str | None:
    """The first reason why this file cannot be one slice of a grey-level volume, or None.

    The checks run in a fixed order: the kind of object (a mosaic among them), a projection image, the number of
    frames, the pixel format, the patient geometry, the decoder for the transfer syntax, then the size of uncompressed pixel data.

    Args:
        ds: the data set; its pixel data may be deferred (`read_dataset`'s ``defer_size``): then only its declared
            length and the file's size are checked, nothing is read.
        h: its parsed header.

    Returns:
        The reason, naming what to do, or None when the file can be a slice.
    """
    return (
        kind_problem(ds, h)
        or projection_problem(h)
        or _frames_problem(ds, h)
        or _pixel_format_problem(ds, h)
        or _geometry_problem(ds, h)
        or decoder_problem(h.transfer_syntax)
        or _pixel_bytes_problem(ds, h)
    )


def rescale_problem(ds: Dataset, h: DicomHeader) -> str | None:
    """Why RescaleSlope/RescaleIntercept are unusable (not finite, or a zero slope), or None."""
    if not (math.isfinite(h.rescale_slope) and math.isfinite(h.rescale_intercept) and h.rescale_slope != 0):
        return (
            f"invalid RescaleSlope/RescaleIntercept ({get_value(ds, 'RescaleSlope')!r}, "
            f"{get_value(ds, 'RescaleIntercept')!r})"
        )
    return None
