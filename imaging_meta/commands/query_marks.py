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
    """The SeriesInstanceUID of the first DICOM file of a series folder that has one (headers only), else None."""
    for f in sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")):
        try:
            ds = pydicom.dcmread(f, stop_before_pixels=True, specific_tags=["SeriesInstanceUID"])
        except Exception:
            continue
        if ds.get("SeriesInstanceUID"):
            return str(ds.SeriesInstanceUID)
    return None


def query_mark(query: str | Path) -> str:
    """``q:<16 hex>``, kept in a mask's NIfTI ``aux_file``: a salted digest of what the query scan is, not where
    it lies (its SeriesInstanceUID for a DICOM series, its size and first MiB for a NIfTI file), so that a later run
    tells a mask of another scan of the same name (every DICOM export named ``series``) from its own, also after the
    data moved. The salt is the pseudonyms' (``IMAGING_META_SALT``): the mark carries no readable identifier."""
    p = Path(query)
    uid = series_uid(p) if p.is_dir() else None
    if uid is not None:
        identity = b"uid:" + uid.encode()
    elif p.is_file():
        with open(p, "rb") as f:
            identity = b"file:" + str(p.stat().st_size).encode() + b":" + f.read(2**20)
    else:
        identity = b"path:" + os.fsencode(os.path.realpath(p))
    salt = os.environ.get("IMAGING_META_SALT", "imaging-meta").encode()
    return "q:" + hashlib.sha256(salt + b"\0" + identity).hexdigest()[:16]


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
    return text if text.startswith("q:") else None
