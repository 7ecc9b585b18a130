"""BIDS sidecars by the inheritance principle: which JSON files describe a NIfTI image.

A BIDS dataset may keep the fields that every scan of a kind shares in one JSON file higher up, ``T1w.json`` at
its root or ``sub-01/sub-01_T1w.json`` for one subject, instead of repeating them beside each image
(BIDS specification, "The Inheritance Principle"). A sidecar applies to an image when it lies in the image's
folder or a folder above it (up to the scanned root), has the same suffix (``T1w``), and its entities
(``sub-01``, ``ses-2``) are among the image's. The nearest sidecar's values win, and within one folder the more
specific one (more entities). Only the same-stem sidecar beside the image was read, and a dataset whose scanner
fields sit in a top-level ``T1w.json`` had every case at site ``unknown``, with the file rejected as not a
sidecar (a review).

Both lookups go through dictionaries keyed by folder and suffix, so that a folder of thousands of images with
their sidecars is scanned in time about linear in its files (comparing every image with every JSON made a flat
folder of 10,000 images take minutes; a review), and never build every subset of a name's entities where the
folder holds fewer sidecars (a name of 16 entities has 65,536).
"""

from __future__ import annotations

import itertools
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


def _subsets(entities: frozenset[str]) -> list[frozenset[str]]:
    items = sorted(entities)
    return [frozenset(c) for r in range(len(items) + 1) for c in itertools.combinations(items, r)]


def _folders_up(folder: str, root: str) -> list[str]:
    """``folder`` and the folders above it up to ``root`` (or the file system's root), nearest first."""
    out = [folder]
    while folder != root and os.path.dirname(folder) != folder:
        folder = os.path.dirname(folder)
        out.append(folder)
    return out


def _bids_image(image: str) -> tuple[frozenset[str], str] | None:
    """The entities and suffix of a BIDS-named NIfTI image (at least one entity), else None: an image that is
    not BIDS-named has only its own sidecar."""
    parts = bids_parts(nifti_stem(os.path.basename(image)))
    return parts if parts is not None and parts[0] else None


class Sidecars:
    """The JSON files of a scan, looked up by the BIDS inheritance principle.

    Args:
        jsons: every JSON file found.
        root: the scanned root: no sidecar above it applies.
    """

    def __init__(self, jsons: Iterable[str], root: str) -> None:
        self.root = root
        self._by_stem: dict[tuple[str, str], str] = {}
        self._by_place: dict[tuple[str, str], dict[frozenset[str], str]] = {}  # (folder, suffix) -> entities -> path
        for j in sorted(jsons):
            folder, stem = os.path.dirname(j), os.path.basename(j)[: -len(".json")]
            self._by_stem[(folder, stem)] = j
            parts = bids_parts(stem)
            if parts is not None:
                self._by_place.setdefault((folder, parts[1]), {})[parts[0]] = j

    def of(self, image: str) -> list[str]:
        """The JSON files that describe ``image``, from the root's down to its own folder, the more specific last
        within a folder: read in this order, a later file's values replace an earlier one's."""
        folder = os.path.dirname(image)
        parts = _bids_image(image)
        if parts is None:
            own = self._by_stem.get((folder, nifti_stem(os.path.basename(image))))
            return [own] if own else []
        entities, suffix = parts
        out: list[str] = []
        for f in reversed(_folders_up(folder, self.root)):
            place = self._by_place.get((f, suffix))
            if not place:
                continue
            # the cheaper of the two: the folder's sidecars of this suffix, or the subsets of the image's entities
            if len(place) <= 2 ** len(entities):
                found = [ents for ents in place if ents <= entities]
            else:
                found = [ents for ents in _subsets(entities) if ents in place]
            out += [place[ents] for ents in sorted(found, key=lambda e: (len(e), sorted(e)))]
        return out


class Images:
    """The NIfTI images of a scan, for telling whether a JSON file describes one of them.

    Args:
        images: every NIfTI file found.
        root: the scanned root.
    """

    def __init__(self, images: Iterable[str], root: str) -> None:
        self._stems: set[tuple[str, str]] = set()  # (folder, stem): an image's own sidecar, any extension case
        self._below: dict[tuple[str, str], list[frozenset[str]]] = {}  # (folder, suffix) -> entities of images
        for image in images:
            folder = os.path.dirname(image)
            self._stems.add((folder, nifti_stem(os.path.basename(image))))
            parts = _bids_image(image)
            if parts is not None:
                for f in _folders_up(folder, root):
                    self._below.setdefault((f, parts[1]), []).append(parts[0])

    def described_by(self, sidecar: str) -> bool:
        """Whether the JSON file ``sidecar`` describes an image: its own (the same stem beside it) or one below it
        that inherits it."""
        folder, stem = os.path.dirname(sidecar), os.path.basename(sidecar)[: -len(".json")]
        if (folder, stem) in self._stems:
            return True
        parts = bids_parts(stem)
        return parts is not None and any(parts[0] <= ents for ents in self._below.get((folder, parts[1]), ()))


def bids_root(image: str) -> str:
    """The dataset root of one image outside a scan: the nearest folder above it that holds
    ``dataset_description.json`` (BIDS' marker), else the folder above its nearest ``sub-*`` folder, else its own
    folder (then only its own sidecar applies)."""
    folder = os.path.dirname(os.path.abspath(image))
    ups = _folders_up(folder, os.path.abspath(os.sep))
    for f in ups:
        if os.path.isfile(os.path.join(f, "dataset_description.json")):
            return f
    for f in ups:
        if os.path.basename(f).startswith("sub-") and os.path.dirname(f) != f:
            return os.path.dirname(f)
    return folder


def sidecars_of(image: str, root: str | None = None) -> list[str]:
    """The JSON files that describe one NIfTI ``image``, in `Sidecars.of`'s order, without scanning a tree: only
    the folders from ``root`` (default: `bids_root`) down to the image's are listed. For ``segment``, the lesion
    table's cache key and any other reader of single files, so that they read what the scan reads (a review: they
    read only the image's own sidecar)."""
    image = os.path.abspath(image)
    root = os.path.abspath(root) if root is not None else bids_root(image)
    folders = _folders_up(os.path.dirname(image), root)
    if folders[-1] != root:  # the image is not under root: only its own folder
        folders = folders[:1]
    jsons = [e.path for f in folders if os.path.isdir(f) for e in os.scandir(f)
             if e.name.lower().endswith(".json") and e.name != "dataset.json" and e.is_file()]
    return Sidecars(jsons, root).of(image)
