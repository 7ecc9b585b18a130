"""BIDS sidecars by the inheritance principle: which JSON files describe a NIfTI image.

A BIDS dataset may keep the fields that every scan of a kind shares in one JSON file higher up, ``T1w.json`` at
its root or ``sub-01/sub-01_T1w.json`` for one subject, instead of repeating them beside each image
(BIDS specification, "The Inheritance Principle"). A sidecar applies to an image when it lies in the image's
folder or a folder above it (up to the scanned root), has the same suffix (``T1w``), and its entities
(``sub-01``, ``ses-2``) are among the image's. The nearest sidecar's values win, and within one folder the more
specific one (more entities). Only the same-stem sidecar beside the image was read, and a dataset whose scanner
fields sit in a top-level ``T1w.json`` had every case at site ``unknown``, with the file rejected as not a
sidecar (a review).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable

from datamodules.io.nifti_names import nifti_stem

_ENTITY = re.compile(r"^[A-Za-z0-9]+-[A-Za-z0-9]+$")
_SUFFIX = re.compile(r"^[A-Za-z0-9]+$")


def bids_parts(stem: str) -> tuple[frozenset[str], str] | None:
    """The entities and suffix of a BIDS-style name stem (``sub-01_ses-2_T1w`` -> ({sub-01, ses-2}, T1w)), or
    None for a stem that is not one."""
    *entities, suffix = stem.split("_")
    if not _SUFFIX.match(suffix) or not all(_ENTITY.match(e) for e in entities):
        return None
    return frozenset(entities), suffix


def applies(sidecar: str, image: str) -> bool:
    """Whether the JSON file ``sidecar`` describes the NIfTI file ``image`` by BIDS inheritance: the same stem
    beside it, or a BIDS-named sidecar in its folder or above with its suffix and a subset of its entities."""
    folder, image_folder = os.path.dirname(sidecar), os.path.dirname(image)
    stem, image_stem = os.path.basename(sidecar)[: -len(".json")], nifti_stem(os.path.basename(image))
    if folder == image_folder and stem == image_stem:
        return True
    if os.path.commonpath([folder, image_folder]) != folder:
        return False  # not in the image's folder or above it
    mine, theirs = bids_parts(stem), bids_parts(image_stem)
    # an image that is not BIDS-named (no entities) has only its own sidecar
    return mine is not None and theirs is not None and bool(theirs[0]) and mine[1] == theirs[1] and mine[0] <= theirs[0]


def sidecars_of(image: str, root: str, jsons_by_folder: dict[str, list[str]]) -> list[str]:
    """The JSON files that describe ``image``, from the root's down to its own folder, the more specific last
    within a folder: read in this order, a later file's values replace an earlier one's.

    Args:
        jsons_by_folder: folder -> the JSON files in it (`by_folder`).
    """
    folders = []
    folder = os.path.dirname(image)
    while True:
        folders.append(folder)
        if folder == root or os.path.dirname(folder) == folder:
            break
        folder = os.path.dirname(folder)
    out: list[str] = []
    for folder in reversed(folders):
        found = [j for j in jsons_by_folder.get(folder, []) if applies(j, image)]
        out += sorted(found, key=lambda j: (len((bids_parts(os.path.basename(j)[: -len(".json")]) or (frozenset(),))[0]), j))
    return out


def by_folder(jsons: Iterable[str]) -> dict[str, list[str]]:
    """JSON paths grouped by their folder, each group sorted."""
    out: dict[str, list[str]] = {}
    for j in sorted(jsons):
        out.setdefault(os.path.dirname(j), []).append(j)
    return out
