"""Pair label maps with their images: Decathlon ``training`` lists first, then label-like names beside images."""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import nibabel as nib
import numpy as np

from datamodules.indexing.decathlon import Decathlon
from datamodules.indexing.volumes import grid_mismatch
from datamodules.io.dicom import NIFTI_SUFFIXES, DicomHeader, nifti_stem, order_series

#: label-map name suffixes (``_gt``: ACDC and other challenge sets; a review found such maps indexed as unlabelled
#: scans and fed to self-supervision)
LABEL_SUFFIXES = ("_label", "_seg", "_dseg", "_mask", "_gt")
IMAGE_FOLDERS = ("images", "imagesTr", "imagesTs")
LABEL_FOLDERS = ("labels", "labelsTr", "labelsTs", "masks")
#: an nnU-Net channel file's stem: ``CASE_0000`` (channel 0 of case ``CASE``), ``CASE_0001``, ...
NNUNET_CHANNEL = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


def nnunet_case(path: str) -> tuple[str, int] | None:
    """(the case's path without the channel suffix and extension, the channel) of an nnU-Net channel file
    (``imagesTr/CASE_0001.nii.gz`` -> (``imagesTr/CASE``, 1)), or None for another name."""
    m = NNUNET_CHANNEL.match(nifti_stem(os.path.basename(path)))
    return None if m is None else (os.path.join(os.path.dirname(path), m["case"]), int(m["channel"]))


@dataclass
class Series:
    """A DICOM series found by the scan: its grouping key and its headers."""

    key: str
    headers: list[DicomHeader]

    @property
    def folder(self) -> str | None:
        """The one folder that holds all the files, or None when they are spread over several."""
        folders = {os.path.dirname(h.path) for h in self.headers}
        return folders.pop() if len(folders) == 1 else None


class ScanBooks(Protocol):
    """What pairing needs from the scanner: the root, its bookkeeping, and the Decathlon descriptions."""

    root: str
    placed: dict[str, str]
    decathlons: dict[str, Decathlon]

    def rel(self, path: str) -> str:
        """``path`` relative to the root, POSIX style."""
        ...

    def reject(self, path: str, reason: str, files: Sequence[str] = ()) -> None:
        """Record ``path`` (and ``files``) as rejected with ``reason``."""
        ...


#: image key ("nifti:<path>" or "dicom:<series key>") -> label files that its name could claim, best first.
_Claims = dict[str, list[str]]


def pair_labels(books: ScanBooks, nifti: list[str], series: list[Series]) -> tuple[dict[str, str], set[str]]:
    """Decide which label map belongs to which image.

    Decathlon ``dataset.json`` pairs win; other images claim ``S_label``/``S_seg``/``S_dseg``/``S_mask``
    beside them (beside the folder of a DICOM series) or the same name in a sibling label folder. A label
    claimed by several images, a second label for one image, and a label-looking file without an image are
    rejected through ``books``.

    Args:
        books: the scanner.
        nifti: every NIfTI file found (absolute paths).
        series: every DICOM series found.

    Returns:
        (label_of, label_files): image key ("nifti:<path>" / "dicom:<series key>") -> label path, and the
        set of files that are label maps (never indexed as images).
    """
    nifti_set = set(nifti)
    label_of = _decathlon_pairs(books, nifti_set)
    dec_labels = set(label_of.values())
    spelled = _label_spellings(nifti)
    claims = {**_nifti_claims(nifti, spelled, dec_labels, label_of), **_dicom_claims(books.root, series, spelled, dec_labels)}
    _keep_claiming_images(claims)
    _drop_label_claimants(claims)
    claimed = {c for found in claims.values() for c in found}
    _assign_claims(books, claims, label_of, series)
    _reject_second_labels(books, claims, label_of, series)
    label_files = dec_labels | claimed
    _reject_orphan_labels(books, [p for p in nifti if "nifti:" + p not in label_of], label_files)  # an image with
    # its own label map is an image, whatever its name (case01_gt with case01_gt_seg)
    return label_of, label_files


def _decathlon_pairs(books: ScanBooks, nifti_set: set[str]) -> dict[str, str]:
    """Image key -> label of every Decathlon training pair whose files exist (warning about the others)."""
    label_of: dict[str, str] = {}
    for dec in books.decathlons.values():
        for img, lbl in dec.pairs.items():
            if img not in nifti_set:
                # nnU-Net v1 (Task folders) lists a case as imagesTr/CASE.nii.gz, whose files are CASE_0000.nii.gz,
                # CASE_0001.nii.gz...: channel 0 takes the label (every case was warned about as missing, and then
                # paired by name anyway; a review)
                channel0 = _channel0(img, nifti_set)
                if channel0 is None:
                    warnings.warn(f"{dec.path}: training image {books.rel(img)} does not exist; skipped", stacklevel=3)
                    continue
                img = channel0
            if lbl not in nifti_set:
                warnings.warn(
                    f"{dec.path}: label {os.path.relpath(lbl, books.root)} of {books.rel(img)} does not exist; "
                    "the image is indexed without a label",
                    stacklevel=3,
                )
                continue
            label_of.setdefault("nifti:" + img, lbl)
    return label_of


def _channel0(image: str, nifti_set: set[str]) -> str | None:
    """nnU-Net's channel-0 file of a case listed as ``image`` (``CASE.nii.gz`` -> ``CASE_0000.nii.gz``, any
    NIfTI extension), when it exists."""
    base = os.path.join(os.path.dirname(image), nifti_stem(os.path.basename(image)) + "_0000")
    return next((base + ext for ext in NIFTI_SUFFIXES if base + ext in nifti_set), None)


def label_suffix(stem: str) -> str | None:
    """The label suffix that ends ``stem`` in any case (``_Seg``, ``_MASK``), as ``LABEL_SUFFIXES`` spells it, or
    None."""
    low = stem.lower()
    return next((s for s in LABEL_SUFFIXES if low.endswith(s) and len(stem) > len(s)), None)


def _label_spellings(nifti: list[str]) -> dict[str, list[str]]:
    """Each NIfTI path as `candidates` spells it (its label suffix and extension in lower case: ``CT3_Seg.nii.gz``
    -> ``CT3_seg.nii.gz``) -> the files spelled so, the one spelled as `candidates` spells it first. A capitalised
    suffix left the label map indexed as an image of its own, and its image unlabelled (a review); two files that
    differ only in the suffix's case are both claimed, and the second named as a second label map."""
    out: dict[str, list[str]] = {p: [p] for p in nifti}
    for p in sorted(nifti):
        name = os.path.basename(p)
        stem = nifti_stem(name)
        suffix = label_suffix(stem)
        # a map in a label folder is named after its image: its extension in lower case too (labels/e.NII.GZ was
        # left unpaired and rejected as an orphan beside images/e.nii.gz; a review)
        if suffix is not None or os.path.basename(os.path.dirname(p)) in LABEL_FOLDERS:
            base = stem[: -len(suffix)] + suffix if suffix is not None else stem
            spelling = os.path.join(os.path.dirname(p), base + name[len(stem):].lower())
            if spelling != p:
                out.setdefault(spelling, []).append(p)
    return out


def _spelled(spelled: dict[str, list[str]], paths: list[str]) -> list[str]:
    """The files that `candidates`' ``paths`` name, in their order, each once."""
    return list(dict.fromkeys(f for c in paths for f in spelled.get(c, [])))


def _nifti_claims(nifti: list[str], spelled: dict[str, list[str]], dec_labels: set[str],
                  label_of: dict[str, str]) -> _Claims:
    """The labels each NIfTI image not paired by Decathlon could claim by name (nnU-Net ``_0000`` stems too);
    ``spelled``: `_label_spellings`."""
    claims: _Claims = {}
    for p in nifti:
        if p in dec_labels or "nifti:" + p in label_of:
            continue
        name = os.path.basename(p)
        stems = [nifti_stem(name)]
        channel = NNUNET_CHANNEL.match(stems[0])
        if channel:  # nnU-Net channel suffix: case_0000 -> case
            stems.append(channel["case"])
        found = [f for f in _spelled(spelled, candidates(os.path.dirname(p), stems, [name]))
                 if f != p and f not in dec_labels]
        if found:
            claims["nifti:" + p] = found
    return claims


def _dicom_claims(root: str, series: list[Series], spelled: dict[str, list[str]], dec_labels: set[str]) -> _Claims:
    """The labels each DICOM series (in its own folder, not the root) could claim by its folder's name;
    ``spelled``: `_label_spellings`."""
    claims: _Claims = {}
    for s in series:
        folder = s.folder
        if folder is None or os.path.abspath(folder) == root:
            continue
        stem = os.path.basename(folder)
        named = candidates(os.path.dirname(folder), [stem], [stem + ".nii.gz", stem + ".nii"], beside=True)
        found = [f for f in _spelled(spelled, named) if f not in dec_labels]
        if found:
            claims["dicom:" + s.key] = found
    return claims


def _keep_claiming_images(claims: _Claims) -> None:
    """Remove, in place, the candidates that claim a label map of their own: those are images. ``case01_gt`` with
    its own ``case01_gt_seg`` is an image named like a label of ``case01`` (a review: with the ``_gt`` suffix it
    became case01's label map and both images were lost)."""
    for key in list(claims):
        kept = [c for c in claims[key] if "nifti:" + c not in claims]
        if kept:
            claims[key] = kept
        else:
            del claims[key]


def _drop_label_claimants(claims: _Claims) -> None:
    """Remove, in place and until none is left, the claims of NIfTI files that another image claims as label."""
    while True:
        claimed = {c for found in claims.values() for c in found}
        drop = [k for k in claims if k.startswith("nifti:") and k[6:] in claimed]
        if not drop:
            break
        for k in drop:
            del claims[k]


def _series_on_the_labels_grid(label: str, keys: list[str], series: Sequence[Series]) -> list[str]:
    """Of several DICOM series in one folder that claim ``label`` (a PACS export keeps the localizer or a
    reconstruction beside the series), the one whose matrix and slice count are the label map's shape, when exactly
    one is; of several that size (two contrast phases of one study), the one whose voxels the label map lies on
    (`grid_mismatch`), when exactly one does; else none (the claim stays contested). Reads the label's header only."""
    try:
        img = nib.load(label)
        shape = tuple(int(v) for v in img.shape[:3])  # type: ignore[attr-defined]  # a NIfTI image
        affine = np.asarray(img.affine, dtype=np.float64)  # type: ignore[attr-defined]
    except Exception:  # an unreadable label is rejected with its reason when its image is indexed
        return []
    by_key = {"dicom:" + s.key: s for s in series}
    fits, in_plane = [], []
    for k in keys:
        s = by_key.get(k)
        if s is None or not s.headers:
            continue
        grid = {(h.rows, h.columns) for h in s.headers}
        if len(grid) == 1:
            rows, columns = grid.pop()
            if {(columns, rows, len(s.headers)), (rows, columns, len(s.headers))} & {shape}:
                fits.append(k)
            if {(columns, rows), (rows, columns)} & {shape[:2]}:
                in_plane.append(k)
    if len(fits) > 1:
        fits = [k for k in fits if _label_lies_on(by_key[k], shape, affine)]
    if not fits and len(in_plane) == 1:
        # none has the label's slice count: a series missing a slice beside a file cut inside its header (no
        # series UID, so a "series" of its own); the one of the label's matrix takes it, and its rejection then says
        # the label is not used, instead of advice to move series into folders of their own (a review)
        fits = in_plane
    return fits if len(fits) == 1 else []


def _label_lies_on(s: Series, shape: tuple[int, ...], affine: np.ndarray) -> bool:
    """Whether a label map of ``shape`` and ``affine`` covers the voxels of series ``s`` (False for a series that
    cannot form a volume: its problem is reported when it is indexed)."""
    try:
        volume = order_series(s.headers)
        return grid_mismatch(volume.shape, volume.affine, shape, affine) is None
    except Exception:
        return False


def _assign_claims(books: ScanBooks, claims: _Claims, label_of: dict[str, str], series: Sequence[Series]) -> None:
    """Give each image its first claimed label when no other image claims it first; reject contested labels."""
    owners: dict[str, list[str]] = {}
    for k, found in claims.items():
        owners.setdefault(found[0], []).append(k)
    for lbl, keys in owners.items():
        if len(keys) > 1 and all(k.startswith("dicom:") for k in keys):
            keys = _series_on_the_labels_grid(lbl, keys, series) or keys
        if len(keys) > 1:
            keys = _first_channel(keys) or keys
        if len(keys) == 1:
            label_of[keys[0]] = lbl
        else:
            what = ", ".join(key_desc(books, k, series) for k in keys)
            fix = ("move each series into a folder of its own and name the label map after that folder "
                   "(SERIES_label.nii.gz beside the folder SERIES)" if all(k.startswith("dicom:") for k in keys)
                   else "name it after one image (S_seg.nii.gz beside S.nii.gz) or list the pairs in a dataset.json")
            books.reject(
                lbl, f"label map claimed by {len(keys)} images ({what}): cannot tell which it belongs to; {fix}"
            )


def _first_channel(keys: list[str]) -> list[str]:
    """Of the NIfTI images that claim one label map, the lowest channel when they are all the channels of one
    nnU-Net case (``CASE_0000``, ``CASE_0001``... in one folder, the label ``CASE`` in labelsTr): the label map
    belongs to the case, and the learners read one channel (a review: the label was rejected as claimed by two
    images, with a fix that breaks the nnU-Net layout); else none."""
    cases = [nnunet_case(k[6:]) if k.startswith("nifti:") else None for k in keys]
    if any(c is None for c in cases) or len({c[0] for c in cases if c is not None}) != 1:
        return []
    return [min(zip(keys, cases, strict=True), key=lambda kc: kc[1][1] if kc[1] else 0)[0]]


def _reject_second_labels(books: ScanBooks, claims: _Claims, label_of: dict[str, str], series: Sequence[Series]) -> None:
    """Reject every further label an image claims beyond the one it uses."""
    used = set(label_of.values())
    for k, found in claims.items():
        for extra in found[1:]:
            if extra not in used and extra not in books.placed:
                books.reject(
                    extra,
                    f"a second label map for {key_desc(books, k, series)}, which already uses "
                    f"{books.rel(label_of[k]) if k in label_of else books.rel(found[0])}; remove or rename one",
                )


def _reject_orphan_labels(books: ScanBooks, nifti: list[str], label_files: set[str]) -> None:
    """Reject label-looking NIfTI files with no image (so they are not indexed as images); add them to ``label_files``."""
    for p in nifti:
        if p in label_files or p in books.placed:
            continue
        name = os.path.basename(p)
        stem = nifti_stem(name)
        suffix = label_suffix(stem)
        if suffix is not None:
            suffix = stem[-len(suffix):]  # as the file spells it
        parent = os.path.basename(os.path.dirname(p))
        if suffix or parent in LABEL_FOLDERS:
            base = stem[: -len(suffix)] if suffix else stem
            expected = (f"{base}.nii.gz, or a DICOM series folder {base}/, beside it" if suffix
                        else f"{name}, or nnU-Net's {base}_0000.nii.gz, in a sibling images folder")
            books.reject(p, f"looks like a label map ({'suffix ' + suffix if suffix else 'in ' + parent + '/'}) but no image was found for it (expected {expected})")
            label_files.add(p)


def candidates(parent: str, stems: Sequence[str], names: Sequence[str], beside: bool = False) -> list[str]:
    """Label paths an image could have: ``stem + label suffix`` in ``parent``, and ``names`` in sibling label folders.

    Args:
        parent: the folder of the image (of the series folder, for DICOM).
        stems: image name stems.
        names: image file names, looked up in the label folders beside an images folder.
        beside: unused (the DICOM series pass True).

    Returns:
        Distinct candidate paths, best first.
    """
    out = [os.path.join(parent, s + suf + ext) for s in stems for suf in LABEL_SUFFIXES for ext in NIFTI_SUFFIXES]
    folder_name = os.path.basename(parent)
    if folder_name in IMAGE_FOLDERS:
        grand = os.path.dirname(parent)
        for lf in LABEL_FOLDERS:
            for n in names:
                out.append(os.path.join(grand, lf, n))
            for s in stems:
                for ext in NIFTI_SUFFIXES:
                    out.append(os.path.join(grand, lf, s + ext))
    return list(dict.fromkeys(out))  # in order, without repeats


def key_desc(books: ScanBooks, key: str, series: Sequence[Series]) -> str:
    """A readable description of an image key, for rejection reasons."""
    if key.startswith("nifti:"):
        return books.rel(key[6:])
    for s in series:
        if "dicom:" + s.key == key:
            num = s.headers[0].series_number
            return (
                f"DICOM series {'#' + str(num) + ' ' if num is not None else ''}in {books.rel(s.folder or s.headers[0].path)}"
                f" ({len(s.headers)} files, e.g. {os.path.basename(s.headers[0].path)})"
            )
    return key
