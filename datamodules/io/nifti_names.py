"""Recognise NIfTI files by name and strip their suffix."""

from __future__ import annotations

import os

NIFTI_SUFFIXES = (".nii.gz", ".nii")


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


def compression_problem(path: str | os.PathLike) -> str | None:
    """Why a NIfTI file cannot be read because its name and its compression disagree, or None: a ``.nii.gz`` that
    is not gzip-compressed (a plain NIfTI renamed, which nibabel reads as gzip and fails on), or a ``.nii`` that is.
    The fix is a rename, not a new export."""
    name = str(path).lower()
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError:
        return None
    gzipped = head[:2] == b"\x1f\x8b"
    # a plain NIfTI starts with its header's size: 348 (NIfTI-1) or 540 (NIfTI-2), in either byte order
    plain = len(head) == 4 and {int.from_bytes(head, "little"), int.from_bytes(head, "big")} & {348, 540}
    if name.endswith(".nii.gz") and plain:
        return "named .nii.gz but not gzip-compressed (a plain NIfTI file): rename it to .nii"
    if name.endswith(".nii") and gzipped:
        return "named .nii but gzip-compressed: rename it to .nii.gz"
    return None
