"""Which scan a mask of `segment` is of: a query mark (a salted digest of the scan's identity) kept in the mask's
NIfTI ``aux_file``, and the series a DICOM Segmentation references. Masks are named after their query, so a later
run into the same folder must tell another patient's scan of the same name (every DICOM export named ``series``)
from its own before replacing its mask."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import cast

import nibabel as nib
import pydicom


def series_uid(folder: Path) -> str | None:
    """The SeriesInstanceUID of the first DICOM image file of a series folder that has one (headers only), else
    None. Read as the series reader reads (`datamodules.io.dicom_files.read_header`: files without the preamble
    too), passing over objects that are not images (a SEG, a presentation state, a DICOMDIR), as the reader does:
    a SEG sorting first gave its own series' UID, and a series without preambles gave none, so another patient's
    SEG of the same name was replaced (a review, 2026-12-07)."""
    from datamodules.io.dicom_checks import non_image_kind
    from datamodules.io.dicom_files import read_header

    for f in sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")):
        try:
            h = read_header(f)
        except Exception:
            continue
        if h.modality == "SEG" or non_image_kind(h) is not None:
            continue
        if h.series_uid:
            return str(h.series_uid)
    return None


def query_mark(query: str | Path) -> str:
    """A salted digest of what the query scan is, not where it lies, kept in a mask's NIfTI ``aux_file``:
    ``q:<16 hex>`` of its SeriesInstanceUID for a DICOM series (or of its real path when it has neither a UID nor
    a file), ``q2:<16 hex>`` of a file's size and whole content. A later run so tells a mask of another scan of the
    same name (every DICOM export named ``series``) from its own, also after the data moved. Files were marked by
    their size and first MiB until 2026-12-07 (``q:``): two scans of one size whose first MiB is the same (zero
    padding under the same header, in registered or MR volumes) had one mark, and one patient's mask replaced the
    other's without a word (a review); `is_mark_of` still accepts those marks for their own scans. The salt is the
    pseudonyms' (``IMAGING_META_SALT``): the mark carries no readable identifier."""
    p = Path(query)
    if p.is_file():
        h = hashlib.sha256()
        with open(p, "rb") as f:  # in chunks, not hashlib.file_digest: that is Python 3.11's, and 3.10 is supported
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        content = h.digest()
        return _mark("q2:", b"file:" + str(p.stat().st_size).encode() + b":" + content)
    uid = series_uid(p) if p.is_dir() else None
    return _mark("q:", b"uid:" + uid.encode() if uid is not None else b"path:" + os.fsencode(os.path.realpath(p)))


def _mark(prefix: str, identity: bytes) -> str:
    salt = os.environ.get("IMAGING_META_SALT", "imaging-meta").encode()
    return prefix + hashlib.sha256(salt + b"\0" + identity).hexdigest()[:16]


def is_mark_of(mark: str, query: str | Path) -> bool:
    """Whether a mask's ``mark`` (`mark_of`) is that of ``query``: its `query_mark`, or for a file the mark of its
    size and first MiB that masks written before 2026-12-07 hold."""
    p = Path(query)
    if mark.startswith("q:") and p.is_file():  # a file's mark of before: the whole file's digest cannot match it
        with open(p, "rb") as f:
            return mark == _mark("q:", b"file:" + str(p.stat().st_size).encode() + b":" + f.read(2**20))
    return mark == query_mark(query)


def seg_series_uid(path: Path) -> str | None:
    """The series a DICOM Segmentation of `segment` was made from (its ReferencedSeriesSequence), or None."""
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        return str(ds.ReferencedSeriesSequence[0].SeriesInstanceUID)
    except Exception:
        return None


def mark_of(path: Path) -> str | None:
    """The query mark in a mask's header (`query_mark`), or None (written before
    marks, or unreadable)."""
    try:
        header = cast(nib.Nifti1Header, nib.load(path).header)
        text = bytes(header["aux_file"]).split(b"\0")[0].decode("ascii")
    except Exception:
        return None
    return text if text.startswith(("q:", "q2:")) else None
