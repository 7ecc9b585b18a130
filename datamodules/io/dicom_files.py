"""Read DICOM files: the data set with pydicom, its checked header, and the grouping of headers by series."""

from __future__ import annotations

import os
import threading
import warnings
from collections.abc import Iterable

import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from datamodules.io.dicom_checks import file_problem, rescale_problem
from datamodules.io.dicom_enhanced import read_frames
from datamodules.io.dicom_errors import DicomError, NotDicomError
from datamodules.io.dicom_header import DicomHeader, is_enhanced, parse_header

#: names that claim DICOM: such a file that pydicom cannot read is a damaged DICOM file (an error), and a 2D image
#: folder reads them as DICOM
DICOM_CLAIMED = (".dcm", ".dicom")
#: names that may be DICOM (Siemens exports '.IMA', some PACS '.dic', which are also other formats' names: a
#: spelling dictionary, a camera image): named as DICOM in the folder scan's reasons, read only by content
DICOM_SUFFIXES = (*DICOM_CLAIMED, ".ima", ".dic")


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


#: held while pydicom's warnings are recorded: ``warnings.catch_warnings`` swaps process-wide state, and two threads
#: entering and leaving it interleaved (the cache-filling threads of the segmentation data) left the process
#: recording every later warning into a dead list, so no warning of the run was ever shown again (a review: the
#: warning that a resumed checkpoint's settings changed). While one thread records, a warning another thread
#: raises is recorded with that file's (Python 3.11 has no per-thread warning state).
RECORD_LOCK = threading.RLock()

#: values longer than this are deferred when only the header is wanted (`read_header`).
HEADER_DEFER_BYTES = 16384


#: the first bytes of compressed archives a DICOM file may arrive in
_ARCHIVE_MAGIC = ((b"\x1f\x8b", "gzip"), (b"PK\x03\x04", "zip"), (b"BZh", "bzip2"), (b"\xfd7zXZ\x00", "xz"),
                  (b"(\xb5/\xfd", "zstd"))


def archive_kind(path: str) -> str | None:
    """``gzip``, ``zip``, ``bzip2``, ``xz`` or ``zstd`` when ``path`` starts with that archive's magic bytes, else None."""
    try:
        with open(path, "rb") as f:
            head = f.read(6)
    except OSError:
        return None
    return next((kind for magic, kind in _ARCHIVE_MAGIC if head.startswith(magic)), None)


def read_dataset(
    path: str, *, stop_before_pixels: bool = False, defer_size: int | None = None
) -> tuple[Dataset, list[str]]:
    """Read a DICOM file with pydicom; raise `NotDicomError` / `DicomError` with the reason.

    ``defer_size``: values longer than this many bytes (the pixel data) are not read until accessed (pydicom's
    ``defer_size``); their declared length and position stay known. ``force=False`` first; a file with no preamble/'DICM' marker that starts like a raw data set is then read
    with ``force=True`` and accepted only when it holds a SOP class or a modality.
    """
    caught: list[str] = []
    try:
        empty = os.path.getsize(path) == 0
    except OSError as e:
        raise DicomError(path, f"cannot read the file ({type(e).__name__}: {e})") from e
    if empty:
        raise NotDicomError(path, "empty file (0 bytes), probably an interrupted copy; copy it again from the source")
    with RECORD_LOCK, warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        try:
            try:
                ds = pydicom.dcmread(
                    path, force=False, stop_before_pixels=stop_before_pixels, defer_size=defer_size
                )
            except InvalidDicomError as e:
                archive = archive_kind(path)
                if archive:  # a compressed copy (x.dcm.gz): what to do, not pydicom's "missing File Meta"
                    raise NotDicomError(path, f"a {archive} archive, not a DICOM file - decompress it first "
                                              "(e.g. gunzip for .gz)") from e
                if not _looks_like_headerless_dicom(path):
                    raise NotDicomError(path, f"not DICOM ({e})".replace(" Use force=True to force reading.", "")) from e
                ds = pydicom.dcmread(path, force=True, stop_before_pixels=stop_before_pixels, defer_size=defer_size)
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


def _header_from_dataset(ds: Dataset, path: str, keywords: Iterable[str]) -> DicomHeader:
    """`parse_header`, then the first problem of the file (`file_problem`, else `rescale_problem`); for an
    enhanced CT/MR image, then its frames (`read_frames`: ``frames``, or the problem of its frames)."""
    h = parse_header(ds, path, keywords)
    h.problem = file_problem(ds, h)
    if h.problem is None:
        h.problem = rescale_problem(ds, h)
    if h.problem is None and is_enhanced(ds):
        h.frames, h.problem = read_frames(ds, h)
    return h


def read_header(path: str | os.PathLike, *, keywords: Iterable[str] = ()) -> DicomHeader:
    """Read one DICOM file's header and check it as a volume slice.

    The pixel data is neither read nor decoded (it is deferred): indexing a folder of CT series reads a few
    kilobytes per file instead of the whole slice. Its declared length is checked against the matrix and the
    file's size, so a truncated file is still found here.

    Args:
        path: the file.
        keywords: extra DICOM keywords to copy into ``attributes`` (e.g. the site fields).

    Returns:
        The header; ``problem`` says why the file cannot be a slice of a volume (None when it can). For an
        enhanced multi-frame CT/MR image, ``frames`` holds one header per frame (see `read_frames`) and
        ``problem`` says why the frames cannot form a volume.

    Raises:
        NotDicomError: the file is not DICOM.
        DicomError: the file is DICOM but cannot be parsed (corrupt or truncated header).
    """
    path = str(path)
    ds, caught = read_dataset(path, defer_size=HEADER_DEFER_BYTES)
    return checked_header(ds, path, keywords, caught)


def checked_header(ds: Dataset, path: str, keywords: Iterable[str], caught: list[str]) -> DicomHeader:
    """`_header_from_dataset`, with pydicom's warnings on lazily parsed values collected, errors as `DicomError`."""
    with RECORD_LOCK, warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        try:
            h = _header_from_dataset(ds, path, keywords)
        except Exception as e:  # a malformed element that pydicom parses lazily
            raise DicomError(path, f"malformed DICOM header ({type(e).__name__}: {e})") from e
    h.warnings = list(caught) + [str(w.message) for w in record]
    return h


#: the `group_series` key prefix of a file without a SeriesInstanceUID, which forms a group of its own
NO_UID = "no-uid:"
#: why such a file stands alone, for the message of a reader that finds it beside others or too short on its own
NO_UID_REASON = "no SeriesInstanceUID (0020,000E), which joins the files of a series: export the series again with its UIDs"


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
        key = h.series_uid if h.series_uid else f"{NO_UID}{h.path}"
        groups.setdefault(key, []).append(h)
    return groups
