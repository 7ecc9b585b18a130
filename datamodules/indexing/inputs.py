"""What the scanner makes of a file before reading it as an image: kinds by suffix, and rejection reasons."""

from __future__ import annotations

import csv
import errno
import os

from datamodules.io.dicom import NotDicomError

BIDS_SUPPORT_JSON = ("dataset_description.json", "participants.json", "genetic_info.json")
DICOM_SUFFIXES = (".dcm", ".dicom", ".ima", ".dic")
NON_IMAGE_KINDS = {
    ".gz": "gzip archive; only .nii.gz is read - decompress it first",
    ".zip": "zip archive - extract it first",
    ".tar": "tar archive - extract it first",
    ".tgz": "tar archive - extract it first",
    ".nrrd": "NRRD - convert it to NIfTI (.nii.gz)",
    ".nhdr": "NRRD header - convert it to NIfTI (.nii.gz)",
    ".mha": "MetaImage - convert it to NIfTI (.nii.gz)",
    ".mhd": "MetaImage - convert it to NIfTI (.nii.gz)",
    ".mgz": "FreeSurfer MGH - convert it to NIfTI (.nii.gz)",
    ".img": "Analyze/raw - convert it to NIfTI (.nii.gz)",
    ".hdr": "Analyze header - convert it to NIfTI (.nii.gz)",
    ".png": "2D image",
    ".jpg": "2D image",
    ".jpeg": "2D image",
    ".tif": "2D image",
    ".tiff": "2D image",
    ".bmp": "2D image",
    ".npy": "NumPy array",
    ".npz": "NumPy archive",
    ".txt": "text",
    ".md": "text",
    ".csv": "table",
    ".json": "JSON that is neither a BIDS sidecar of a NIfTI image nor a Decathlon dataset.json",
}


class Reject(Exception):
    """An input is rejected with this reason (internal to the scan: it becomes an `Index` rejection)."""


def broken_link_reason(path: str) -> str:
    """Why a symbolic link that leads nowhere is rejected: a loop, or a missing target."""
    try:
        target = os.readlink(path)
    except OSError as e:
        target = f"unreadable: {e.strerror}"
    try:
        os.stat(path)
    except OSError as e:
        if e.errno == errno.ELOOP:
            return f"symbolic link loop (to {target}, which leads back to itself); remove the link or point it at the file"
    return f"broken symbolic link (to {target}, which does not exist); remove the link or restore its target"


def not_dicom_reason(path: str, suffix: str, error: NotDicomError) -> str:
    """Why a file that pydicom does not read as DICOM is rejected, and what to do about it."""
    if os.path.getsize(path) == 0:
        return "empty file (0 bytes): nothing to read; if it should be an image, copy it again from the source"
    if suffix in DICOM_SUFFIXES:
        return (
            f"named like DICOM ('{suffix}') but {error.reason}; the file is corrupt or truncated - "
            "copy it again from the source"
        )
    kind = NON_IMAGE_KINDS.get(suffix, f"suffix '{suffix}'" if suffix else "no suffix")
    reason = f"not an image file we read ({kind}; not DICOM: no 'DICM' marker)"
    if " - " not in kind:  # the kind carries no fix of its own
        reason += "; skipped: only NIfTI (.nii, .nii.gz) and DICOM files are indexed, convert images to one of them"
    return reason


def is_lesion_table(path: str) -> bool:
    """A CSV whose header holds the lesion-CSV columns ``image`` and ``class`` (`datamodules.sources.lesion_csv`)."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            header = next(csv.reader(f), [])
    except (OSError, UnicodeDecodeError, csv.Error):
        return False
    return {"image", "class"} <= {h.strip() for h in header}
