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
