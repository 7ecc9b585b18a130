"""Decode the pixels of a validated DICOM series into an (X, Y, Z) float32 volume with the modality rescale
(MONOCHROME1 slices inverted first, so that bright is bright as in MONOCHROME2). The frames of an enhanced
multi-frame file go through the same inversion and rescale (each with its own slope and intercept)."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from contextvars import ContextVar

import numpy as np
from pydicom.dataset import Dataset

from datamodules.io.dicom_checks import decode_failure_fix, decoder_problem
from datamodules.io.dicom_errors import DicomError
from datamodules.io.dicom_files import read_dataset
from datamodules.io.dicom_header import (
    ENHANCED_SOP_CLASSES,
    DicomHeader,
    sop_class_uid_of,
    with_transfer_syntax,
)
from datamodules.io.dicom_series import DicomSeries

#: the file that pydicom is decoding in this thread or task, if any
_DECODING: ContextVar[str | None] = ContextVar("imaging_meta_dicom_decoding", default=None)


class _NameTheFile(logging.Filter):
    """Prefix pydicom's log lines (e.g. about excess padding), which do not name the file, with the path of the
    file being decoded, in the thread that decodes it; other lines pass unchanged."""

    def filter(self, record: logging.LogRecord) -> bool:
        path = _DECODING.get()
        if path is not None and not getattr(record, "names_the_file", False):
            record.msg, record.args = f"{path}: {record.getMessage()}", None
            record.__dict__["names_the_file"] = True
        return True


logging.getLogger("pydicom").addFilter(_NameTheFile())


def stored_pixel_array(ds: Dataset, h: DicomHeader) -> np.ndarray:
    """The stored values of the file as pydicom decodes them (no rescale); `DicomError` naming the fix."""
    with_transfer_syntax(ds)  # headerless files read with force=True
    if "PhotometricInterpretation" not in ds and h.samples_per_pixel == 1:
        # a required element some exporters drop; the header check reads its absence as MONOCHROME2, and so
        # must the decoder (pydicom refuses to decode without it)
        ds.PhotometricInterpretation = "MONOCHROME2"
    token = _DECODING.set(h.path)  # pydicom's log lines while it decodes name the file (`_NameTheFile`)
    try:
        return ds.pixel_array
    except Exception as e:
        fix = decoder_problem(h.transfer_syntax) or decode_failure_fix(h.transfer_syntax)
        raise DicomError(h.path, f"cannot decode the pixel data ({type(e).__name__}: {e}); {fix}") from e
    finally:
        _DECODING.reset(token)


def _decode_slice(ds: Dataset, h: DicomHeader) -> np.ndarray:
    """Pixel array of one slice, (Rows, Columns) float32 with the modality rescale applied."""
    arr = stored_pixel_array(ds, h)
    if arr.shape != (h.rows, h.columns):
        raise DicomError(h.path, f"decoded pixel array has shape {arr.shape}, expected ({h.rows}, {h.columns})")
    return _physical(arr, ds, h)


def _decode_frames(ds: Dataset, h: DicomHeader) -> np.ndarray:
    """Stored values of every frame of a multi-frame file, (NumberOfFrames, Rows, Columns), no rescale."""
    arr = stored_pixel_array(ds, h)
    expected = (h.number_of_frames, h.rows, h.columns)
    if arr.shape == expected[1:] and h.number_of_frames == 1:
        arr = arr[None]
    if arr.shape != expected:
        raise DicomError(h.path, f"decoded pixel array has shape {arr.shape}, expected {expected} (frames, rows, columns)")
    return arr


#: modalities whose pixel values are measurements (Hounsfield units, MR signal, counts): their rescaled values are
#: the data whatever the photometric interpretation, which only says how to display them (DICOM PS3.3 C.7.6.3.1.2)
MEASURED_MODALITIES = ("CT", "MR", "PT", "NM")

#: the image storage SOP classes of `MEASURED_MODALITIES` (DICOM PS3.4 B.5): a file whose Modality was dropped (some
#: anonymisers do) is still a measurement when its SOP class says so
MEASURED_SOP_CLASSES = frozenset({
    "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.4", "1.2.840.10008.5.1.4.1.1.4.3",  # CT, MR, colour MR
    "1.2.840.10008.5.1.4.1.1.128", "1.2.840.10008.5.1.4.1.1.128.1", "1.2.840.10008.5.1.4.1.1.130",  # PET
    "1.2.840.10008.5.1.4.1.1.20",  # NM
    *ENHANCED_SOP_CLASSES,  # enhanced and legacy converted enhanced CT and MR
})


def inverts_monochrome1(ds: Dataset, modality: str | None) -> bool:
    """Whether a file's stored values are inverted as `invert_monochrome1` does: an image of a projection modality
    (CR, DX, MG, ...), whose values are only what is displayed, that is displayed with its minimum white, so that
    bright is bright as in ``MONOCHROME2``: ``MONOCHROME1``, or ``MONOCHROME2`` with ``PresentationLUTShape``
    ``INVERSE`` (some "for presentation" exports). Never for `MEASURED_MODALITIES`: a MONOCHROME1 CT still holds
    HU after its rescale, nor for a file of their SOP classes (`MEASURED_SOP_CLASSES`) that lacks its Modality."""
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
    inverse = str(ds.get("PresentationLUTShape", "") or "").strip().upper() == "INVERSE"
    shown_inverted = photometric == "MONOCHROME1" or (photometric == "MONOCHROME2" and inverse)
    if not shown_inverted:
        return False
    code = (modality or "").strip().upper()
    if code:
        return code not in MEASURED_MODALITIES
    return sop_class_uid_of(ds) not in MEASURED_SOP_CLASSES


def _physical(arr: np.ndarray, ds: Dataset, h: DicomHeader) -> np.ndarray:
    """Stored values of one slice (Rows, Columns) as float32 physical values: MONOCHROME1 of a projection modality
    inverted (`inverts_monochrome1`), then the slice's RescaleSlope/RescaleIntercept."""
    stored = arr.astype(np.float64)
    if inverts_monochrome1(ds, h.modality):
        stored = invert_monochrome1(stored, ds, arr.dtype)
    out = stored * h.rescale_slope + h.rescale_intercept
    return out.astype(np.float32)


def invert_monochrome1(stored: np.ndarray, ds: Dataset, dtype: np.dtype) -> np.ndarray:
    """MONOCHROME1 (the minimum is displayed white) as MONOCHROME2: each stored value v becomes lo + hi - v over
    the stored range [lo, hi] of BitsStored and PixelRepresentation (of the decoded dtype when BitsStored is
    missing), the same for every slice, so a series keeps one intensity scale, as the 2D reader does."""
    bits = ds.get("BitsStored") or ds.get("BitsAllocated")
    signed = int(ds.get("PixelRepresentation", 0) or 0) == 1
    if isinstance(bits, int) and 1 <= bits <= 32:
        lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    elif np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        lo, hi = info.min, info.max
    else:
        lo, hi = float(stored.min()), float(stored.max())
    return (lo + hi) - stored


def load_series_array(series: DicomSeries, datasets: Mapping[str, Dataset] | None = None) -> np.ndarray:
    """Decode a validated series into a volume.

    Args:
        series: from `order_series`.
        datasets: already-read data sets by path (read again from disk when missing).

    Returns:
        (X, Y, Z) float32 array: X = column index, Y = row index, Z = slice in geometric order, with
        RescaleSlope/RescaleIntercept applied (per frame for an enhanced multi-frame file).
    """
    X, Y, Z = series.shape
    vol = np.empty((X, Y, Z), dtype=np.float32)
    # a multi-frame file: read and decoded once for all its frames (a single-frame file is let go after its slice)
    frame_files: dict[str, tuple[Dataset, np.ndarray]] = {}
    for k, h in enumerate(series.headers):
        if h.frame is not None and h.path in frame_files:
            ds, stored = frame_files[h.path]
            vol[:, :, k] = _physical(stored[h.frame], ds, h).T
            continue
        found = datasets.get(h.path) if datasets else None
        ds = found if found is not None else read_dataset(h.path)[0]
        if h.frame is None:
            vol[:, :, k] = _decode_slice(ds, h).T
        else:
            frame_files[h.path] = ds, _decode_frames(ds, h)
            vol[:, :, k] = _physical(frame_files[h.path][1][h.frame], ds, h).T
    return vol
