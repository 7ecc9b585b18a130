"""What the scanner makes of a file before reading it as an image: kinds by suffix, and rejection reasons."""

from __future__ import annotations

import csv
import errno
import os
from pathlib import Path

from datamodules.io.dicom import NotDicomError
from datamodules.io.dicom_files import DICOM_SUFFIXES

BIDS_SUPPORT_JSON = ("dataset_description.json", "participants.json", "genetic_info.json")
NON_IMAGE_KINDS = {
    ".gz": "gzip archive; only .nii.gz is read - decompress it first",
    ".zip": "zip archive - extract it first",
    ".tar": "tar archive - extract it first",
    ".tgz": "tar archive - extract it first",
    ".nrrd": "NRRD - convert it to NIfTI (.nii.gz)",
    ".nhdr": "NRRD header - convert it to NIfTI (.nii.gz)",
    ".mha": "MetaImage - convert it to NIfTI (.nii.gz)",
    ".mhd": "MetaImage - convert it to NIfTI (.nii.gz)",
    ".mgz": "FreeSurfer MGH (.mgz) - convert it to NIfTI (.nii.gz), e.g. with mri_convert or nibabel",
    ".mgh": "FreeSurfer MGH (.mgh) - convert it to NIfTI (.nii.gz), e.g. with mri_convert or nibabel",
    ".mnc": "MINC - convert it to NIfTI (.nii.gz), e.g. with mnc2nii or nibabel",
    ".par": "Philips PAR/REC header - convert the PAR/REC pair to NIfTI (.nii.gz), e.g. with dcm2niix or "
    "nibabel's parrec2nii",
    ".rec": "Philips PAR/REC data - convert the PAR/REC pair to NIfTI (.nii.gz), e.g. with dcm2niix or "
    "nibabel's parrec2nii",
    ".head": "AFNI header (.HEAD/.BRIK) - convert the dataset to NIfTI (.nii.gz), e.g. with AFNI's 3dAFNItoNIFTI "
    "or nibabel",
    ".brik": "AFNI data (.HEAD/.BRIK) - convert the dataset to NIfTI (.nii.gz), e.g. with AFNI's 3dAFNItoNIFTI "
    "or nibabel",
    ".v": "ECAT 7 (.v) - convert it to NIfTI (.nii.gz), e.g. with nibabel",
    ".img": "Analyze/raw - convert it to NIfTI (.nii.gz)",
    ".hdr": "Analyze header - convert it to NIfTI (.nii.gz)",
    ".png": "2D image",
    ".jpg": "2D image",
    ".jpeg": "2D image",
    ".jfif": "2D image",
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


#: the fix for either file of a NIfTI pair (`nifti_pair_kind`)
NIFTI_PAIR_FIX = "save it as one .nii.gz file, e.g. nibabel.save(nibabel.load('{hdr}'), '{stem}.nii.gz')"


def nifti_pair_magic(hdr: str) -> str | None:
    """``NIfTI-1`` or ``NIfTI-2`` when ``hdr`` is the header of a NIfTI pair (its magic: b'ni1\\0' at byte 344,
    b'ni2\\0' at byte 4), else None (an Analyze header, another file, or none)."""
    try:
        with open(hdr, "rb") as f:
            head = f.read(348)
    except OSError:
        return None
    if head[344:348] == b"ni1\0":
        return "NIfTI-1"
    if head[4:8] == b"ni2\0":
        return "NIfTI-2"
    return None


def nifti_pair_kind(path: str) -> str | None:
    """What a ``.hdr`` or ``.img`` file is when it belongs to a NIfTI pair (two files: header and data), with the fix
    ("kind - fix", as `NON_IMAGE_KINDS`); None for anything else (an Analyze pair, a raw image)."""
    stem, suffix = os.path.splitext(path)
    if suffix.lower() not in (".hdr", ".img"):
        return None
    hdr = path if suffix.lower() == ".hdr" else next(
        (stem + s for s in (".hdr", ".HDR", ".Hdr") if os.path.isfile(stem + s)), stem + ".hdr"
    )
    version = nifti_pair_magic(hdr)
    if version is None:
        return None
    fix = NIFTI_PAIR_FIX.format(hdr=os.path.basename(hdr), stem=os.path.basename(stem))
    if suffix.lower() == ".hdr":
        return f"a {version} pair (.hdr/.img) - {fix}"
    return f"the data file of a {version} pair (.hdr/.img, with {os.path.basename(hdr)}) - {fix}"


def file_kind(path: str, suffix: str) -> str | None:
    """What a file that is neither NIfTI nor DICOM is, with the fix when there is one ("kind - fix"): a NIfTI pair
    by its header's magic, else by suffix (``X.BRIK.gz``, ``X.mnc.gz``: the compressed file's own suffix)."""
    pair = nifti_pair_kind(path)
    if pair:
        return pair
    if suffix == ".gz":
        inner = "".join(Path(path).suffixes[-2:-1]).lower()
        if inner in NON_IMAGE_KINDS and inner != ".gz":
            return NON_IMAGE_KINDS[inner]
    return NON_IMAGE_KINDS.get(suffix)


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
    kind = file_kind(path, suffix) or (f"suffix '{suffix}'" if suffix else "no suffix")
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
    return {"image", "class"} <= {h.strip().lower() for h in header}  # header names in any case, as the reader
