"""Scan a folder tree of DICOM series and NIfTI volumes into an `Index` of pseudonymous `Case` records.

Every regular file under the root ends up in exactly one place: a case (as its image or its label map),
``Index.accounted`` (BIDS sidecars, Decathlon ``dataset.json``, DICOMDIR files, an earlier index), or
``Index.rejected`` with a reason a user can act on. The scan never stops at a bad file.

What is read, and how it is paired:

* NIfTI (``.nii``, ``.nii.gz``): header and data once. 4D, NaN/Inf and constant images are rejected.
* DICOM (any file name, extension-less too): headers grouped by SeriesInstanceUID and ordered by
  geometry (`datamodules.dicom`); pixel data is checked for presence, size and decodability but not decoded.
* Label maps (NIfTI) are paired with images by (a) the nearest Decathlon ``dataset.json`` "training" list,
  else (b) by name: ``S_label``/``S_seg``/``S_dseg``/``S_mask`` beside image ``S`` (beside the folder ``S`` of
  a DICOM series), or the same name in a sibling ``labels``/``labelsTr``/``labelsTs``/``masks`` folder of an
  ``images``/``imagesTr``/``imagesTs`` folder. A label must be integer-valued, non-empty, not all foreground
  (some background 0), and on the image's voxel grid (compared in a canonical orientation, so a flipped or
  permuted copy of the same grid matches).
* Sites come from the DICOM headers or a BIDS JSON sidecar; identifying attributes such as InstitutionName
  become keyed-hash tokens. Patients and cases are keyed hashes (HMAC-SHA256 with ``salt``).

No PatientName, PatientID, PatientBirthDate or UID is written to the index.
"""

from __future__ import annotations

import csv
import errno
import hashlib
import hmac
import json
import logging
import os
import re
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from nibabel.orientations import inv_ornt_aff, io_orientation, ornt_transform

from datamodules.dicom import (
    NIFTI_SUFFIXES,
    DicomError,
    DicomHeader,
    DicomSeriesError,
    NotDicomError,
    group_series,
    is_nifti,
    nifti_stem,
    order_series,
    read_header,
)
from datamodules.index import Case, Index, Rejection

__all__ = [
    "DEFAULT_SITE_FIELDS",
    "IDENTIFYING_FIELDS",
    "LABEL_SUFFIXES",
    "scan_folder",
    "scan_to_file",
    "pseudonym",
    "site_key",
    "grid_mismatch",
]

logger = logging.getLogger(__name__)

DEFAULT_SITE_FIELDS: tuple[str, ...] = ("Manufacturer", "ManufacturerModelName", "InstitutionName", "MagneticFieldStrength")

#: DICOM PS3.15 basic-profile attributes that may be asked for as site fields: stored only as tokens.
IDENTIFYING_FIELDS: dict[str, str] = {
    "InstitutionName": "inst",
    "InstitutionAddress": "addr",
    "InstitutionalDepartmentName": "dept",
    "StationName": "station",
    "DeviceSerialNumber": "device",
    "DeviceUID": "device",
    "OperatorsName": "anon",
    "PerformingPhysicianName": "anon",
    "ReferringPhysicianName": "anon",
    "PhysiciansOfRecord": "anon",
    "RequestingPhysician": "anon",
    "ScheduledStationName": "station",
    "PerformedStationName": "station",
    "PerformedLocation": "anon",
}

LABEL_SUFFIXES = ("_label", "_seg", "_dseg", "_mask")
BIDS_SUPPORT_JSON = ("dataset_description.json", "participants.json", "genetic_info.json")
IMAGE_FOLDERS = ("images", "imagesTr", "imagesTs")
LABEL_FOLDERS = ("labels", "labelsTr", "labelsTs", "masks")

#: a label grid matches its image when every grid corner lands within this fraction of a voxel (and 1 µm).
GRID_TOL_VOXELS = 0.05

_MR_WORDS = ("MRI", "MR", "T1", "T2", "FLAIR", "ADC", "DWI", "T1W", "T2W", "T1GD", "PD", "MP-MRI", "BOLD")
_KNOWN_MODALITIES = ("CT", "MR", "PT", "US", "CR", "DX", "MG", "NM", "XA", "RF", "OT")
_DICOM_SUFFIXES = (".dcm", ".dicom", ".ima", ".dic")
_NON_IMAGE_KINDS = {
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
    ".npy": "NumPy array",
    ".npz": "NumPy archive",
    ".txt": "text",
    ".md": "text",
    ".csv": "table",
    ".json": "JSON that is neither a BIDS sidecar of a NIfTI image nor a Decathlon dataset.json",
}


class _Reject(Exception):
    """Internal: an input is rejected with this reason."""


def _broken_link_reason(path: str) -> str:
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


# ---------------------------------------------------------------------------------- pseudonyms, sites
def pseudonym(salt: str, value: str, n: int = 12) -> str:
    """First ``n`` hex digits of HMAC-SHA256(salt, value)."""
    return hmac.new(salt.encode("utf-8"), value.encode("utf-8"), hashlib.sha256).hexdigest()[:n]


_IDENTIFYING_PATTERN = re.compile(
    r"^(Patient|OtherPatient|Institution|Referring|Performing|Requesting|Operators|Physician)|(UID|Date|Time|Address|ID|Name|Names)$"
)
_SAFE_FIELDS = frozenset({"Manufacturer", "ManufacturerModelName", "MagneticFieldStrength", "Modality"})


def _is_identifying(keyword: str) -> bool:
    """Whether a header keyword may identify a person or an institution (PS3.15 basic profile, broadly)."""
    return keyword in IDENTIFYING_FIELDS or (keyword not in _SAFE_FIELDS and bool(_IDENTIFYING_PATTERN.search(keyword)))


def _format_value(value: Any) -> str | None:
    if value is None or isinstance(value, (dict, bool)):
        return None
    if isinstance(value, (list, tuple)):
        parts = [_format_value(v) for v in value]
        joined = "\\".join(p for p in parts if p)
        return joined or None
    if isinstance(value, (int, float, np.integer, np.floating)):
        f = float(value)
        return f"{f:g}" if np.isfinite(f) else None
    text = " ".join(str(value).split())
    if not text:
        return None
    if re.fullmatch(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?", text):
        return f"{float(text):g}"
    return text


def site_key(values: Mapping[str, Any], site_fields: Sequence[str], salt: str) -> tuple[str, dict[str, str]]:
    """Build the site key from header values.

    Identifying fields (InstitutionName, StationName, ... see `IDENTIFYING_FIELDS`) enter only as a token,
    e.g. ``"inst-3fa2c1"`` (first 6 hex digits of HMAC-SHA256(salt, value)).

    Args:
        values: header keyword -> value (DICOM header or BIDS sidecar).
        site_fields: keywords, in key order.
        salt: secret for the tokens.

    Returns:
        (key, info): key is the present values joined by ``" | "`` (``"unknown"`` when none), info the same
        values by field name.
    """
    info: dict[str, str] = {}
    for f in site_fields:
        text = _format_value(values.get(f))
        if text is None:
            continue
        if _is_identifying(f):
            text = f"{IDENTIFYING_FIELDS.get(f, 'anon')}-{pseudonym(salt, text, 6)}"
        info[f] = text
    key = " | ".join(info[f] for f in site_fields if f in info)
    return (key or "unknown"), info


def _normalise_modality(value: Any) -> str | None:
    if isinstance(value, Mapping):  # Decathlon {"0": "CT"} / nnU-Net channel_names
        items = [str(v) for v in value.values()]
        mods = {m for m in (_normalise_modality(v) for v in items) if m}
        return mods.pop() if len(mods) == 1 else None
    if not isinstance(value, str) or not value.strip():
        return None
    v = value.strip().upper()
    if v in _KNOWN_MODALITIES:
        return v
    if v in _MR_WORDS or v.startswith("MR") or "MRI" in v:
        return "MR"
    return None


# --------------------------------------------------------------------------------------- geometry
def grid_mismatch(
    image_shape: Sequence[int],
    image_affine: np.ndarray,
    label_shape: Sequence[int],
    label_affine: np.ndarray,
    tol_mm: float | None = None,
) -> str | None:
    """Compare two voxel grids in a canonical orientation.

    The label grid is first re-expressed in the image's axis order and directions (a label stored with
    flipped or permuted axes but covering the same voxels is a match), then the image grid's corner voxels
    are mapped to world coordinates with both affines.

    Args:
        image_shape: (3,) image grid.
        image_affine: (4, 4) voxel -> world of the image.
        label_shape: (3,) label grid (trailing singleton dimensions allowed).
        label_affine: (4, 4) voxel -> world of the label.
        tol_mm: largest accepted corner distance; default `GRID_TOL_VOXELS` of the smallest image voxel.

    Returns:
        None when they match, else "shape ... vs ..., affine differs by ... mm".
    """
    image_shape = [int(s) for s in image_shape]
    label_shape = [int(s) for s in label_shape]
    while len(label_shape) > 3 and label_shape[-1] == 1:
        label_shape = label_shape[:-1]
    image_affine = np.asarray(image_affine, dtype=np.float64)
    label_affine = np.asarray(label_affine, dtype=np.float64)
    if tol_mm is None:
        tol_mm = max(1e-3, GRID_TOL_VOXELS * float(np.linalg.norm(image_affine[:3, :3], axis=0).min()))
    if len(label_shape) != 3:
        return f"shape {tuple(image_shape)} vs {tuple(label_shape)} (the label map is not 3D)"
    t = ornt_transform(io_orientation(label_affine), io_orientation(image_affine))
    aligned = label_affine @ inv_ornt_aff(t, label_shape)
    aligned_shape = [0, 0, 0]
    for i, (axis, _flip) in enumerate(t):
        aligned_shape[int(axis)] = label_shape[i]
    corners = np.array(
        [[i, j, k, 1.0] for i in (0, image_shape[0] - 1) for j in (0, image_shape[1] - 1) for k in (0, image_shape[2] - 1)]
    ).T
    dist = float(np.max(np.linalg.norm((image_affine @ corners - aligned @ corners)[:3], axis=0)))
    if aligned_shape != image_shape:
        permuted = f" (in the image's axis order: {tuple(aligned_shape)})" if aligned_shape != label_shape else ""
        return f"shape {tuple(image_shape)} vs {tuple(label_shape)}{permuted}, affine differs by {dist:.3g} mm"
    if dist > tol_mm:
        return (
            f"shape {tuple(image_shape)} vs {tuple(label_shape)}, affine differs by {dist:.3g} mm "
            f"(tolerance {tol_mm:.3g} mm)"
        )
    return None


# ------------------------------------------------------------------------------------------ NIfTI
@dataclass
class _Volume:
    shape: list[int]
    affine: np.ndarray


def _load_nifti(path: str) -> tuple[Any, np.ndarray, list[int]]:
    """Header and data of a 3D NIfTI; `_Reject` with the reason otherwise."""
    try:
        img = nib.load(path)
    except Exception as e:
        raise _Reject(
            f"cannot read the NIfTI header ({type(e).__name__}: {e}); the file is corrupt or not NIfTI - "
            "copy it again from the source, or rename it if it is another format"
        ) from e
    shape = [int(s) for s in img.shape]
    spatial = list(shape)
    while len(spatial) > 3 and spatial[-1] == 1:
        spatial.pop()
    if len(spatial) > 3:
        raise _Reject(
            f"4D image (shape {tuple(shape)}): only 3D volumes are read; split it into one 3D file per "
            "channel or time point (e.g. `fslsplit`)"
        )
    if len(spatial) < 3:
        raise _Reject(f"{len(spatial)}D image (shape {tuple(shape)}): a 3D volume is needed")
    affine = np.asarray(img.affine, dtype=np.float64)
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise _Reject(f"invalid voxel-to-world affine (sform/qform) {affine.tolist()}; fix the header")
    try:
        data = np.asanyarray(img.dataobj)
    except Exception as e:
        raise _Reject(
            f"cannot read the NIfTI data ({type(e).__name__}: {e}); the file is probably truncated or corrupt - "
            "copy it again from the source"
        ) from e
    if data.dtype.fields is not None:
        raise _Reject(f"RGB/structured NIfTI data ({data.dtype}): not a grey-level volume")
    if np.iscomplexobj(data):
        raise _Reject(f"complex-valued data ({data.dtype}): not a grey-level volume")
    return img, data.reshape(spatial), spatial


def _check_image_data(data: np.ndarray, min_slices: int) -> None:
    if min(data.shape) < min_slices:
        raise _Reject(f"shape {tuple(data.shape)}: a volume needs at least {min_slices} voxels along every axis")
    if np.issubdtype(data.dtype, np.floating):
        bad = int(np.count_nonzero(~np.isfinite(data)))
        if bad:
            raise _Reject(f"contains NaN/Inf values ({bad} voxels); fix or mask them before scanning")
    lo, hi = data.min(), data.max()
    if lo == hi:
        raise _Reject(
            f"constant image (every voxel is {float(lo):g}): no usable content; export it again from the source "
            "or remove it"
        )


def _label_values(path: str, rel: str, image: _Volume) -> list[int]:
    """Check a label map against its image; return the non-zero values present."""
    try:
        img = nib.load(path)
    except Exception as e:
        raise _Reject(f"label map {rel}: cannot read the NIfTI header ({type(e).__name__}: {e})") from e
    try:
        mismatch = grid_mismatch(image.shape, image.affine, img.shape, np.asarray(img.affine, dtype=np.float64))
    except Exception as e:
        raise _Reject(f"label map {rel}: cannot compare its grid with the image ({type(e).__name__}: {e})") from e
    if mismatch:
        raise _Reject(f"label map {rel} does not match its image: {mismatch}; resample the label onto the image grid")
    try:
        data = np.asanyarray(img.dataobj)
    except Exception as e:
        raise _Reject(f"label map {rel}: cannot read the data ({type(e).__name__}: {e}); the file may be truncated") from e
    if np.issubdtype(data.dtype, np.floating):
        if not np.all(np.isfinite(data)):
            raise _Reject(f"label map {rel} contains NaN/Inf values; expected integer structure labels")
        frac = data != np.round(data)
        if frac.any():
            example = float(data[frac].flat[0])
            raise _Reject(
                f"label map {rel} has non-integer values (e.g. {example:g}, {int(frac.sum())} voxels); expected "
                "integer structure labels - was it resampled with linear interpolation? use nearest neighbour"
            )
    elif not np.issubdtype(data.dtype, np.integer) and data.dtype != np.bool_:
        raise _Reject(f"label map {rel} has data type {data.dtype}; expected integer structure labels")
    values = np.unique(data)
    if values.size and values.min() < 0:
        raise _Reject(f"label map {rel} has negative values (min {values.min():g}); expected labels >= 0")
    present = [int(v) for v in values if v != 0]
    if not present:
        raise _Reject(f"label map {rel} is empty (no foreground voxel); remove it or label the structures")
    if values[0] != 0:
        raise _Reject(
            f"label map {rel} has no background: every voxel is labelled ({', '.join(str(v) for v in present[:5])}"
            f"{', ...' if len(present) > 5 else ''}), so it is not a mask of structures - is it an image, or an "
            "inverted mask? Label the background 0, or remove it"
        )
    return present


# ----------------------------------------------------------------------------------------- Decathlon
@dataclass
class _Decathlon:
    path: str
    folder: str
    pairs: dict[str, str] = field(default_factory=dict)  # image abs path -> label abs path
    labels: dict[int, str] = field(default_factory=dict)
    modality: str | None = None


def _parse_label_names(raw: Any) -> dict[int, str]:
    out: dict[int, str] = {}
    if not isinstance(raw, Mapping):
        return out
    for k, v in raw.items():
        if isinstance(v, str):  # Decathlon: {"0": "background", "1": "liver"}
            try:
                out[int(k)] = v
            except (TypeError, ValueError):
                continue
        elif isinstance(v, int) and not isinstance(v, bool):  # nnU-Net v2: {"background": 0, "liver": 1}
            out[int(v)] = str(k)
    return out


def _parse_decathlon(path: str) -> _Decathlon:
    try:
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _Reject(f"dataset.json is not valid JSON ({type(e).__name__}: {e})") from e
    if not isinstance(d, dict) or not ({"training", "labels"} & set(d)):
        raise _Reject("a dataset.json without 'training' or 'labels': not a Decathlon dataset description")
    folder = os.path.dirname(path)
    dec = _Decathlon(path=path, folder=folder, labels=_parse_label_names(d.get("labels")))
    dec.modality = _normalise_modality(d.get("modality")) or _normalise_modality(d.get("channel_names"))
    for entry in d.get("training") or []:
        if isinstance(entry, Mapping) and isinstance(entry.get("image"), str) and isinstance(entry.get("label"), str):
            img = os.path.normpath(os.path.join(folder, entry["image"]))
            lbl = os.path.normpath(os.path.join(folder, entry["label"]))
            dec.pairs[img] = lbl
    return dec


def _is_lesion_table(path: str) -> bool:
    """A CSV whose header holds the lesion-CSV columns ``image`` and ``class`` (`datamodules.lesion_csv`)."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            header = next(csv.reader(f), [])
    except (OSError, UnicodeDecodeError, csv.Error):
        return False
    return {"image", "class"} <= {h.strip() for h in header}


# --------------------------------------------------------------------------------------------- scan
@dataclass
class _Series:
    key: str
    headers: list[DicomHeader]

    @property
    def folder(self) -> str | None:
        folders = {os.path.dirname(h.path) for h in self.headers}
        return folders.pop() if len(folders) == 1 else None


class _Scanner:
    def __init__(
        self,
        root: str,
        site_fields: Sequence[str],
        label_names: Mapping[Any, str] | None,
        salt: str,
        patient_regex: str,
        min_slices: int,
    ):
        self.root = os.path.abspath(os.fspath(root))
        self.site_fields = list(site_fields)
        self.default_names = _parse_label_names(dict(label_names)) if label_names else {}
        self.salt = salt
        self.patient_re = re.compile(patient_regex) if patient_regex else None
        self.min_slices = int(min_slices)
        self.index = Index(root=self.root, site_fields=list(self.site_fields))
        self.placed: dict[str, str] = {}  # abs path -> "case" / "accounted" / "rejected"
        self.all_files: list[str] = []
        self.decathlons: dict[str, _Decathlon] = {}  # folder -> description
        self.dicom_warnings = 0

    # ------------------------------------------------------------ bookkeeping
    def rel(self, path: str) -> str:
        return Path(os.path.relpath(path, self.root)).as_posix()

    def _place(self, path: str, where: str) -> None:
        if path in self.placed:
            logger.error("%s is already %s; not also %s (a bug in the scanner, please report)", self.rel(path), self.placed[path], where)
            return
        self.placed[path] = where

    def reject(self, path: str, reason: str, files: Sequence[str] = ()) -> None:
        files = [f for f in files if f not in self.placed]
        covered = files or [path]
        for f in covered:
            self._place(f, "rejected")
        rel_files = [self.rel(f) for f in files] if files and files != [path] else []
        self.index.rejected.append(Rejection(path=self.rel(path), reason=reason, files=rel_files))
        logger.info("rejected %s: %s", self.rel(path), reason)

    def account(self, path: str) -> None:
        if path not in self.placed:
            self._place(path, "accounted")
            self.index.accounted.append(self.rel(path))

    # ------------------------------------------------------------ walk
    def walk(self) -> list[str]:
        seen = {os.path.realpath(self.root)}
        files: list[str] = []
        for dirpath, dirnames, filenames in os.walk(self.root, followlinks=True, onerror=self._walk_error):
            keep = []
            for d in sorted(dirnames):
                real = os.path.realpath(os.path.join(dirpath, d))
                if real in seen:
                    logger.warning("%s: a link to a folder already scanned (%s); not scanned twice", self.rel(os.path.join(dirpath, d)), real)
                    continue
                seen.add(real)
                keep.append(d)
            dirnames[:] = keep
            for f in sorted(filenames):
                p = os.path.join(dirpath, f)
                if os.path.islink(p) and not os.path.exists(p):
                    self.all_files.append(p)
                    self.reject(p, _broken_link_reason(p))
                elif not os.path.isfile(p):
                    self.all_files.append(p)
                    self.reject(p, "not a regular file")
                else:
                    self.all_files.append(p)
                    files.append(p)
        return files

    def _walk_error(self, err: OSError) -> None:
        warnings.warn(f"{err.filename}: cannot list this folder ({err.strerror}); its files are not indexed", stacklevel=2)

    # ------------------------------------------------------------ main
    def run(self) -> Index:
        if not os.path.isdir(self.root):
            raise NotADirectoryError(f"{self.root}: not a folder; give the folder that holds your scans")
        logger.info("scanning %s", self.root)
        files = self.walk()
        nifti: list[str] = []
        jsons: list[str] = []
        headers: list[DicomHeader] = []
        dataset_jsons: list[str] = []
        for p in files:
            name = os.path.basename(p)
            if name.startswith("._"):
                self.reject(p, "not an image file we read (a macOS resource-fork file, '._' prefix)")
            elif is_nifti(name):
                nifti.append(p)
            elif name == "dataset.json":
                dataset_jsons.append(p)
            elif name.lower().endswith(".json"):
                jsons.append(p)
            elif name.lower().endswith(".csv") and _is_lesion_table(p):
                self.account(p)  # a lesion table (datamodules.lesion_csv), e.g. the demo cohort's lesions.csv
            else:
                h = self._read_dicom(p)
                if h is not None:
                    headers.append(h)
        if self.dicom_warnings:
            logger.info("pydicom reported %d warning(s) while reading headers (details at DEBUG level)", self.dicom_warnings)
        for p in dataset_jsons:
            try:
                dec = _parse_decathlon(p)
            except _Reject as r:
                self.reject(p, str(r))
                continue
            self.decathlons[dec.folder] = dec
            self.account(p)
        series = [_Series(k, v) for k, v in group_series(headers).items()]
        logger.info(
            "%d files: %d NIfTI, %d DICOM in %d series, %d JSON, %d dataset.json",
            len(self.all_files), len(nifti), len(headers), len(series), len(jsons), len(dataset_jsons),
        )
        label_of, label_files = self._pair(nifti, series)
        nifti_set = set(nifti)
        for p in sorted(nifti_set - label_files):
            self._guarded(p, lambda p=p: self._nifti_case(p, label_of.get("nifti:" + p)), [p, label_of.get("nifti:" + p)])
        for s in series:
            files = [h.path for h in s.headers]
            label = label_of.get("dicom:" + s.key)
            self._guarded(files[0], lambda s=s, label=label: self._dicom_case(s, label), [*files, label])
        # labels that no case took (their image was not found or was rejected without them)
        for p in sorted(label_files - set(self.placed)):
            self.reject(p, "label map whose image was not indexed")
        for p in jsons:
            self._json(p, nifti_set)
        for p in self.all_files:  # safety net: every file is somewhere
            if p not in self.placed:
                warnings.warn(f"{p}: the scanner did not classify this file (a bug, please report)", stacklevel=2)
                self.reject(p, "not classified by the scanner (a bug, please report)")
        self.index.cases.sort(key=lambda c: c.image if isinstance(c.image, str) else c.image[0])
        logger.info(
            "scan of %s: %d cases (%d labelled), %d files accounted, %d inputs rejected",
            self.root, len(self.index.cases), len(self.index.labelled_cases), len(self.index.accounted), len(self.index.rejected),
        )
        return self.index

    def _guarded(self, path: str, fn, files: Sequence[str | None]) -> None:
        """Run one case builder; an unexpected exception becomes a rejection with its message."""
        try:
            fn()
        except Exception as e:
            logger.warning("unexpected error while indexing %s", self.rel(path), exc_info=True)
            self.reject(
                path,
                f"unexpected error while indexing ({type(e).__name__}: {e}); the input is damaged in a way the scanner "
                "does not recognise - check or re-export it, and report this message if it looks fine",
                [f for f in files if f],
            )

    # ------------------------------------------------------------ DICOM
    def _read_dicom(self, p: str) -> DicomHeader | None:
        name = os.path.basename(p)
        suffix = "".join(Path(name).suffixes[-1:]).lower()
        try:
            h = read_header(p, keywords=self.site_fields)
        except NotDicomError as e:
            self.reject(p, self._not_dicom_reason(p, suffix, e))
            return None
        except DicomError as e:
            self.reject(p, f"unreadable DICOM file: {e.reason}")
            return None
        if h.warnings:
            self.dicom_warnings += len(h.warnings)
            for w in h.warnings:  # may quote header values: DEBUG only
                logger.debug("%s: pydicom: %s", self.rel(p), w)
        if h.is_dicomdir:
            self.account(p)  # the media index of a DICOM disc; the series are read from their own files
            return None
        return h

    @staticmethod
    def _not_dicom_reason(path: str, suffix: str, error: NotDicomError) -> str:
        """Why a file that pydicom does not read as DICOM is rejected, and what to do about it."""
        if os.path.getsize(path) == 0:
            return "empty file (0 bytes): nothing to read; if it should be an image, copy it again from the source"
        if suffix in _DICOM_SUFFIXES:
            return (
                f"named like DICOM ('{suffix}') but {error.reason}; the file is corrupt or truncated - "
                "copy it again from the source"
            )
        kind = _NON_IMAGE_KINDS.get(suffix, f"suffix '{suffix}'" if suffix else "no suffix")
        reason = f"not an image file we read ({kind}; not DICOM: no 'DICM' marker)"
        if " - " not in kind:  # the kind carries no fix of its own
            reason += "; skipped: only NIfTI (.nii, .nii.gz) and DICOM files are indexed, convert images to one of them"
        return reason

    def _dicom_case(self, s: _Series, label: str | None) -> None:
        files = [h.path for h in s.headers]
        first = s.headers[0]
        num = f"#{first.series_number} " if first.series_number is not None else ""
        desc = f"DICOM series {num}({first.modality or '?'}, {len(files)} file{'s' if len(files) > 1 else ''})"
        where = files[0] if len(files) == 1 else (s.folder or os.path.commonpath(files))
        covered = files + ([label] if label else [])
        try:
            ser = order_series(s.headers, min_slices=self.min_slices)
        except DicomSeriesError as e:
            reason = e.reason if len(files) == 1 else f"{desc}: {e.reason}"
            if label:
                reason += f" (its label map {self.rel(label)} is not used)"
            self.reject(where, reason, covered if len(covered) > 1 else ())
            return
        volume = _Volume(shape=list(ser.shape), affine=ser.affine)
        values: list[int] = []
        if label:
            try:
                values = _label_values(label, self.rel(label), volume)
            except _Reject as r:
                self.reject(where, f"{desc}: {r}", covered)
                return
        rel_files = [self.rel(p) for p in ser.paths]
        raw_patient = (first.patient_id or "").strip() or self._path_patient(where)
        key, info = site_key(ser.headers[0].attributes, self.site_fields, self.salt)
        case = Case(
            case_id="c-" + pseudonym(self.salt, rel_files[0]),
            patient="p-" + pseudonym(self.salt, raw_patient),
            site=key,
            modality=ser.modality or "unknown",
            image=rel_files,
            image_format="dicom",
            label=self.rel(label) if label else None,
            organs=self._organs(values, self._names_for(where), label),
            shape=[int(v) for v in ser.shape],
            spacing=[float(v) for v in ser.spacing],
            affine=np.asarray(ser.affine, dtype=float).tolist(),
            site_info=info,
        )
        self._add_case(case, covered)

    # ------------------------------------------------------------ NIfTI
    def _nifti_case(self, p: str, label: str | None) -> None:
        covered = [p] + ([label] if label else [])
        note = f" (its label map {self.rel(label)} is not used)" if label else ""
        try:
            img, data, shape = _load_nifti(p)
            _check_image_data(data, self.min_slices)
        except _Reject as r:
            self.reject(p, f"{r}{note}", covered if label else ())
            return
        affine = np.asarray(img.affine, dtype=np.float64)
        del data
        values: list[int] = []
        if label:
            try:
                values = _label_values(label, self.rel(label), _Volume(shape=shape, affine=affine))
            except _Reject as r:
                self.reject(p, str(r), covered)
                return
        sidecar_path = os.path.join(os.path.dirname(p), nifti_stem(os.path.basename(p)) + ".json")
        sidecar: dict[str, Any] = {}
        if os.path.isfile(sidecar_path):
            sidecar = self._read_sidecar(sidecar_path)
        key, info = site_key(sidecar, self.site_fields, self.salt)
        dec = self._nearest_decathlon(p)
        modality = _normalise_modality(sidecar.get("Modality")) or (dec.modality if dec else None) or "unknown"
        rel = self.rel(p)
        case = Case(
            case_id="c-" + pseudonym(self.salt, rel),
            patient="p-" + pseudonym(self.salt, self._path_patient(p)),
            site=key,
            modality=modality,
            image=rel,
            image_format="nifti",
            label=self.rel(label) if label else None,
            organs=self._organs(values, self._names_for(p), label),
            shape=[int(v) for v in shape],
            spacing=[round(float(v), 6) for v in np.linalg.norm(affine[:3, :3], axis=0)],
            affine=affine.tolist(),
            site_info=info,
        )
        self._add_case(case, covered)

    def _read_sidecar(self, path: str) -> dict[str, Any]:
        try:
            with open(path, encoding="utf-8") as f:
                d = json.load(f)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            warnings.warn(f"{path}: BIDS sidecar is not valid JSON ({e}); its site fields are ignored", stacklevel=2)
            return {}
        if not isinstance(d, dict):
            warnings.warn(f"{path}: BIDS sidecar is not a JSON object; its site fields are ignored", stacklevel=2)
            return {}
        return d

    def _add_case(self, case: Case, covered: Sequence[str]) -> None:
        for f in covered:
            self._place(f, "case")
        self.index.cases.append(case)
        for v, name in ((v, n) for n, v in case.organs.items()):
            known = self.index.label_names.get(v)
            if known is None:
                self.index.label_names[v] = name
            elif known != name:
                warnings.warn(
                    f"label value {v} is {known!r} in some label maps and {name!r} in {case.label}; "
                    f"index.label_names keeps {known!r} (each case's organs keep their own name)",
                    stacklevel=2,
                )

    # ------------------------------------------------------------ patients, names
    def _path_patient(self, path: str) -> str:
        rel = self.rel(path)
        if self.patient_re is not None:
            m = self.patient_re.search(rel)
            if m:
                return m.group(1) if m.groups() else m.group(0)
        return nifti_stem(rel)

    def _nearest_decathlon(self, path: str) -> _Decathlon | None:
        folder = os.path.dirname(os.path.abspath(path)) if not os.path.isdir(path) else path
        while True:
            if folder in self.decathlons:
                return self.decathlons[folder]
            if folder == self.root or os.path.dirname(folder) == folder or not folder.startswith(self.root):
                return None
            folder = os.path.dirname(folder)

    def _names_for(self, path: str) -> dict[int, str]:
        folder = os.path.dirname(path) if not os.path.isdir(path) else path
        while True:
            dec = self.decathlons.get(folder)
            if dec is not None and dec.labels:
                return dec.labels
            if folder == self.root or os.path.dirname(folder) == folder or not folder.startswith(self.root):
                return self.default_names
            folder = os.path.dirname(folder)

    def _organs(self, values: Iterable[int], names: Mapping[int, str], label: str | None) -> dict[str, int]:
        organs: dict[str, int] = {}
        unnamed = []
        for v in values:
            if v == 0:
                continue
            name = names.get(v)
            if name is None:
                name = f"label_{v}"
                if names:
                    unnamed.append(v)
            if name in organs:
                name = f"{name}_{v}"
            organs[name] = int(v)
        if unnamed and label:
            warnings.warn(
                f"{label}: label value(s) {unnamed} have no name in the label names; called 'label_<value>'",
                stacklevel=2,
            )
        return organs

    # ------------------------------------------------------------ pairing
    def _pair(self, nifti: list[str], series: list[_Series]) -> tuple[dict[str, str], set[str]]:
        """Image key ("nifti:<path>" / "dicom:<series key>") -> label path, and the set of label files."""
        nifti_set = set(nifti)
        label_of: dict[str, str] = {}
        for dec in self.decathlons.values():
            for img, lbl in dec.pairs.items():
                if img not in nifti_set:
                    warnings.warn(f"{dec.path}: training image {self.rel(img)} does not exist; skipped", stacklevel=2)
                    continue
                if lbl not in nifti_set:
                    warnings.warn(
                        f"{dec.path}: label {os.path.relpath(lbl, self.root)} of {self.rel(img)} does not exist; "
                        "the image is indexed without a label",
                        stacklevel=2,
                    )
                    continue
                label_of.setdefault("nifti:" + img, lbl)
        dec_labels = set(label_of.values())
        claims: dict[str, list[str]] = {}
        for p in nifti:
            if p in dec_labels or "nifti:" + p in label_of:
                continue
            name = os.path.basename(p)
            stems = [nifti_stem(name)]
            if re.search(r"_\d{4}$", stems[0]):  # nnU-Net channel suffix: case_0000 -> case
                stems.append(stems[0][:-5])
            found = [c for c in self._candidates(os.path.dirname(p), stems, [name]) if c in nifti_set and c != p and c not in dec_labels]
            if found:
                claims["nifti:" + p] = found
        for s in series:
            folder = s.folder
            if folder is None or os.path.abspath(folder) == self.root:
                continue
            stem = os.path.basename(folder)
            found = [
                c for c in self._candidates(os.path.dirname(folder), [stem], [stem + ".nii.gz", stem + ".nii"], beside=True)
                if c in nifti_set and c not in dec_labels
            ]
            if found:
                claims["dicom:" + s.key] = found
        # a file that is itself a label cannot claim labels
        while True:
            claimed = {c for found in claims.values() for c in found}
            drop = [k for k in claims if k.startswith("nifti:") and k[6:] in claimed]
            if not drop:
                break
            for k in drop:
                del claims[k]
        claimed = {c for found in claims.values() for c in found}
        owners: dict[str, list[str]] = {}
        for k, found in claims.items():
            owners.setdefault(found[0], []).append(k)
        for lbl, keys in owners.items():
            if len(keys) == 1:
                label_of[keys[0]] = lbl
            else:
                what = ", ".join(self._key_desc(k, series) for k in keys)
                self.reject(
                    lbl,
                    f"label map claimed by {len(keys)} images ({what}): cannot tell which it belongs to; name it "
                    "after one image (S_seg.nii.gz beside S.nii.gz) or list the pairs in a dataset.json",
                )
        used = set(label_of.values())
        for k, found in claims.items():
            for extra in found[1:]:
                if extra not in used and extra not in self.placed:
                    self.reject(
                        extra,
                        f"a second label map for {self._key_desc(k, series)}, which already uses "
                        f"{self.rel(label_of[k]) if k in label_of else self.rel(found[0])}; remove or rename one",
                    )
        label_files = dec_labels | claimed
        # label-looking files with no image: do not index them as images
        for p in nifti:
            if p in label_files or p in self.placed:
                continue
            name = os.path.basename(p)
            stem = nifti_stem(name)
            suffix = next((s for s in LABEL_SUFFIXES if stem.endswith(s) and len(stem) > len(s)), None)
            parent = os.path.basename(os.path.dirname(p))
            if suffix or parent in LABEL_FOLDERS:
                expected = f"{stem[: -len(suffix)]}.nii.gz beside it" if suffix else f"{name} in a sibling images folder"
                self.reject(p, f"looks like a label map ({'suffix ' + suffix if suffix else 'in ' + parent + '/'}) but no image was found for it (expected {expected})")
                label_files.add(p)
        return label_of, label_files

    @staticmethod
    def _candidates(parent: str, stems: Sequence[str], names: Sequence[str], beside: bool = False) -> list[str]:
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
        seen: set[str] = set()
        return [c for c in out if not (c in seen or seen.add(c))]

    def _key_desc(self, key: str, series: Sequence[_Series]) -> str:
        if key.startswith("nifti:"):
            return self.rel(key[6:])
        for s in series:
            if "dicom:" + s.key == key:
                num = s.headers[0].series_number
                return (
                    f"DICOM series {'#' + str(num) + ' ' if num is not None else ''}in {self.rel(s.folder or s.headers[0].path)}"
                    f" ({len(s.headers)} files, e.g. {os.path.basename(s.headers[0].path)})"
                )
        return key

    # ------------------------------------------------------------ JSON
    def _json(self, p: str, nifti_set: set[str]) -> None:
        stem = os.path.basename(p)[: -len(".json")]
        folder = os.path.dirname(p)
        if any(os.path.join(folder, stem + ext) in nifti_set for ext in NIFTI_SUFFIXES):
            self.account(p)  # BIDS sidecar
            return
        try:
            with open(p, encoding="utf-8") as f:
                d = json.load(f)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            self.reject(p, f"not an image file we read (JSON; invalid: {type(e).__name__})")
            return
        if isinstance(d, dict) and "cases" in d and "rejected" in d and "version" in d:
            self.account(p)  # an imaging-meta index written into the data folder
            return
        if isinstance(d, dict) and str(d.get("generator", "")).startswith("datamodules.demo"):
            self.account(p)  # the demo cohort's marker file
            return
        if os.path.basename(p) in BIDS_SUPPORT_JSON and isinstance(d, dict):
            self.account(p)  # BIDS dataset-level description
            return
        self.reject(p, f"not an image file we read ({_NON_IMAGE_KINDS['.json']})")


def scan_folder(
    root: str | os.PathLike,
    *,
    site_fields: Sequence[str] = DEFAULT_SITE_FIELDS,
    label_names: Mapping[int, str] | None = None,
    salt: str = "imaging-meta",
    patient_regex: str = r"(sub-[A-Za-z0-9]+)",
    min_slices: int = 3,
) -> Index:
    """Index every image under ``root``.

    Args:
        root: folder to scan (followed through symbolic links, each real folder once).
        site_fields: header keywords that build the site key (identifying ones are pseudonymised).
        label_names: label value -> structure name, for label maps without a Decathlon dataset.json.
        salt: secret for the keyed hashes of patient, case and institution ids; keep it private and fixed.
        patient_regex: for NIfTI, the first match in the path relative to ``root`` (group 1 if any) is the
            patient key; without a match each file is its own patient. DICOM uses PatientID.
        min_slices: fewest slices (voxels along each axis, for NIfTI) of a usable volume.

    Returns:
        The index: cases, rejected inputs with reasons, and accounted support files. Every regular file
        under ``root`` is in exactly one of them.

    Raises:
        NotADirectoryError: ``root`` is not a folder.
    """
    return _Scanner(os.fspath(root), site_fields, label_names, salt, patient_regex, min_slices).run()


def scan_to_file(root: str | os.PathLike, out: str | os.PathLike, **kw: Any) -> Index:
    """`scan_folder`, then write the index to ``out`` atomically (`Index.save`).

    Args:
        root: folder to scan.
        out: index JSON to write.
        **kw: keyword arguments of `scan_folder`.

    Returns:
        The index.
    """
    index = scan_folder(root, **kw)
    path = index.save(out)
    logger.info("index written to %s", path)
    return index
