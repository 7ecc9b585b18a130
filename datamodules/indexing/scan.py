"""Scan a folder tree of DICOM series and NIfTI volumes into an `Index` of pseudonymous `Case` records.

Every regular file under the root ends up in exactly one place: a case (as its image or its label map),
``Index.accounted`` (BIDS sidecars, Decathlon ``dataset.json``, DICOMDIR files, an earlier index), or
``Index.rejected`` with a reason a user can act on. The scan never stops at a bad file. A NIfTI image reached by
two paths (a symbolic or hard link, such as an nnU-Net view of the raw files) is indexed once, at the path with a
label map, else one that is not a link, and rejected at the others, naming it: one scan is never two cases of two
patients. Label maps may be one file for several images.

What is read, and how it is paired:

* NIfTI (``.nii``, ``.nii.gz``): header and data once. 4D, NaN/Inf and constant images are rejected.
* DICOM (any file name, extension-less too): headers grouped by SeriesInstanceUID and ordered by
  geometry (`datamodules.io.dicom`); pixel data is checked for presence, size and decodability but not decoded.
  An enhanced multi-frame CT/MR file is a series of its own frames (ordered and checked the same way); its
  site fields may sit in its functional groups.
* Label maps (NIfTI) are paired with images by (a) the nearest Decathlon ``dataset.json`` "training" list,
  else (b) by name: ``S_label``/``S_seg``/``S_dseg``/``S_mask``/``S_gt`` beside image ``S`` (beside the folder ``S`` of
  a DICOM series), or the same name in a sibling ``labels``/``labelsTr``/``labelsTs``/``masks`` folder of an
  ``images``/``imagesTr``/``imagesTs`` folder. A label must be integer-valued, non-empty, not all foreground
  (some background 0), and on the image's voxel grid (compared in a canonical orientation, so a flipped or
  permuted copy of the same grid matches).
* Sites come from the DICOM headers or BIDS JSON sidecars (an image's own, and those it inherits from the
  folders above: `datamodules.indexing.bids`); identifying attributes such as InstitutionName
  become keyed-hash tokens. Patients and cases are keyed hashes (HMAC-SHA256 with ``salt``).

No PatientName, PatientID, PatientBirthDate or UID is written to the ind

The pieces live beside this module: `datamodules.indexing.inputs` (file kinds, rejection reasons),
`datamodules.indexing.volumes` (NIfTI checks, `grid_mismatch`), `datamodules.indexing.decathlon`,
`datamodules.indexing.pairing` (labels to images) and `datamodules.indexing.pseudonyms` (`pseudonym`,
`site_key`); this module walks the tree and builds the cases.
"""

from __future__ import annotations

import json
import logging
import os
import re
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from datamodules.indexing.bids import Images, Sidecars
from datamodules.indexing.decathlon import IGNORE_LABEL, Decathlon, parse_decathlon, parse_label_names
from datamodules.indexing.index import Case, Index, Rejection
from datamodules.indexing.inputs import (
    BIDS_SUPPORT_JSON,
    NON_IMAGE_KINDS,
    Reject,
    broken_link_reason,
    is_lesion_table,
    not_dicom_reason,
)
from datamodules.indexing.pairing import LABEL_SUFFIXES, Series, nnunet_case, pair_labels
from datamodules.indexing.pseudonyms import (
    DEFAULT_SALT,
    DEFAULT_SITE_FIELDS,
    IDENTIFYING_FIELDS,
    SHIPPED_SALTS,
    merge_case_variants,
    normalise_modality,
    pseudonym,
    site_key,
    warn_unknown_site_fields,
)
from datamodules.indexing.volumes import (
    Volume,
    check_image_data,
    grid_mismatch,
    hounsfield_air_share,
    label_values,
    load_nifti,
)
from datamodules.io.dicom import (
    MIN_SLICES,
    DicomError,
    DicomHeader,
    DicomSeriesError,
    NotDicomError,
    group_series,
    is_nifti,
    nifti_stem,
    non_image_kind,
    order_series,
    read_header,
)
from datamodules.io.dicom_files import NO_UID, NO_UID_REASON
from datamodules.io.folders import files_under
from datamodules.progress import progress

#: a NIfTI file's patient, by default: a BIDS subject folder or file name prefix (the ``sub-`` entity at the start
#: of a folder or file name: ``liver-sub-sampled/`` names no patient; until 2026-12-07 it matched anywhere, and
#: every case in such a folder was one patient)
DEFAULT_PATIENT_REGEX = r"(?:^|/)(sub-[A-Za-z0-9]+)(?=[/_.]|$)"

__all__ = [
    "DEFAULT_PATIENT_REGEX",
    "DEFAULT_SITE_FIELDS",
    "IDENTIFYING_FIELDS",
    "SHIPPED_SALTS",
    "LABEL_SUFFIXES",
    "scan_folder",
    "scan_to_file",
    "pseudonym",
    "site_key",
    "grid_mismatch",
]

logger = logging.getLogger(__name__)
#: the ``name`` the demo cohort's dataset.json carries (`datamodules.synthetic.cohort`): its institutions are fake
DEMO_NAME = "imaging-meta demo"
#: changes whenever the scan indexes the same files otherwise, so that cached folder indexes are rebuilt (1: a
#: ``dataset.json`` names only the label maps it describes, 2026-12-07; before, every map below it; 2: the channels
#: of an nnU-Net case share its label map and patient, nnU-Net's "ignore" value is no structure, 2026-12-07; 3: the
#: default patient pattern anchored to a folder or file name, a second link to one file rejected, an upper-case
#: extension in a label folder paired, 2026-12-07)
SCAN_VERSION = 3


def _file_id(path: str) -> tuple[int, int] | None:
    """The file ``path`` reaches: its device and inode (links followed); None when it cannot be stat'ed (the
    readers then name why)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _label_folders(folder: str) -> set[str]:
    """A Decathlon or nnU-Net dataset's own label folders, whose maps its ``labels`` name whether or not its
    ``training`` list names them (``labelsTs``: the labelled test cases; a review of the rule above)."""
    return {os.path.normpath(os.path.join(os.path.abspath(folder), name)) for name in ("labelsTr", "labelsTs", "labels")}


class _Scanner:
    """One scan of ``root``: walks the tree, reads headers, pairs labels, and places every file once.

    Args:
        root: folder to scan.
        site_fields: header keywords of the site key.
        label_names: label value -> name for label maps without a Decathlon dataset.json.
        salt: secret for the keyed hashes.
        patient_regex: pattern of the NIfTI patient key in the relative path ("" for none).
        min_slices: fewest slices of a usable volume.
    """

    def __init__(
        self,
        root: str,
        site_fields: Sequence[str],
        label_names: Mapping[Any, str] | None,
        salt: str,
        patient_regex: str,
        min_slices: int,
        skip: Sequence[str | os.PathLike] = (),
    ):
        self.root = os.path.abspath(os.fspath(root))
        self.skip = tuple(skip)  # folders `files_under` leaves out (it compares their real paths)
        self.site_fields = list(site_fields)
        warn_unknown_site_fields(self.site_fields, logger)
        try:
            self.default_names = parse_label_names(dict(label_names)) if label_names else {}
        except ValueError as e:  # bad input: the data config's label_names
            raise ValueError(f"label_names: {e}") from e
        self.salt = salt
        try:
            self.patient_re = re.compile(patient_regex) if patient_regex else None
        except re.error as e:  # bad input, not a bug (exit 70 as an internal error; a review)
            raise ValueError(f"patient_regex {patient_regex!r} is not a valid regular expression: {e}") from e
        self.min_slices = int(min_slices)
        self.index = Index(root=self.root, site_fields=list(self.site_fields), patient_regex=patient_regex or "")
        self.placed: dict[str, str] = {}  # abs path -> "case" / "accounted" / "rejected"
        self.all_files: list[str] = []
        self.decathlons: dict[str, Decathlon] = {}  # folder -> description
        self._sidecar_files = Sidecars([], self.root)  # the JSON files found (`run`), looked up per image
        self._channel_cases: dict[str, tuple[str, int]] = {}  # the files of nnU-Net cases with several channels
        self._ignored: list[str] = []  # label maps with nnU-Net's "ignore" value (`_organs`)
        self._sidecars: dict[str, dict[str, Any]] = {}  # a sidecar's path -> its fields, read once
        self._images = Images([], self.root)  # the NIfTI images found (`run`), which JSON files describe (`_json`)
        self.dicom_warnings = 0

    # ------------------------------------------------------------ bookkeeping
    def rel(self, path: str) -> str:
        """``path`` relative to the root, POSIX style (what the index stores)."""
        return Path(os.path.relpath(path, self.root)).as_posix()

    def _place(self, path: str, where: str) -> None:
        """Record where a file went ("case", "accounted" or "rejected"); a second placement is logged as a bug."""
        if path in self.placed:
            logger.error("%s is already %s; not also %s (a bug in the scanner, please report)", self.rel(path), self.placed[path], where)
            return
        self.placed[path] = where

    def reject(self, path: str, reason: str, files: Sequence[str] = ()) -> None:
        """Record an input as rejected with ``reason``; ``files`` are the not yet placed files it covers."""
        files = [f for f in files if f not in self.placed]
        covered = files or [path]
        for f in covered:
            self._place(f, "rejected")
        rel_files = [self.rel(f) for f in files] if files and files != [path] else []
        self.index.rejected.append(Rejection(path=self.rel(path), reason=reason, files=rel_files))
        logger.info("rejected %s: %s", self.rel(path), reason)

    def account(self, path: str) -> None:
        """Record a support file (sidecar, dataset.json, DICOMDIR, ...) as accounted for, unless already placed."""
        if path not in self.placed:
            self._place(path, "accounted")
            self.index.accounted.append(self.rel(path))

    # ------------------------------------------------------------ walk
    def walk(self) -> list[str]:
        """The regular files under the root (each real folder once, `files_under`); links to nowhere and special
        files are rejected."""
        def revisit(path: Path, real: str) -> None:
            logger.warning("%s: a link to a folder already scanned (%s); not scanned twice", self.rel(str(path)), real)

        files: list[str] = []
        for path in files_under(Path(self.root), skip=self.skip, on_revisit=revisit, on_error=self._walk_error):
            p = str(path)
            self.all_files.append(p)
            if os.path.islink(p) and not os.path.exists(p):
                self.reject(p, broken_link_reason(p))
            elif not os.path.isfile(p):
                self.reject(p, "not a regular file")
            else:
                files.append(p)
        return files

    def _one_path_per_image(self, images: list[str], label_of: Mapping[str, str]) -> list[str]:
        """``images`` with each file (device and inode: symbolic and hard links alike) once: the path with a label
        map, else one that is not a symbolic link, else the first in sorted order. The others are rejected naming
        it, with their label maps: a second link to one scan was a second case of another patient, one scan in
        training and test (a review). Label maps are not compared: two patients' identical masks may be one file."""
        by_file: dict[Any, list[str]] = {}
        for p in images:
            by_file.setdefault(_file_id(p) or p, []).append(p)
        kept = []
        for paths in by_file.values():
            best = min(paths, key=lambda p: ("nifti:" + p not in label_of, os.path.islink(p), p))
            kept.append(best)
            for p in paths:
                if p != best:
                    label = label_of.get("nifti:" + p)
                    self.reject(p, f"the same file as {self.rel(best)} (a link): each scan is indexed once"
                                + (", with the label map of that path" if label else ""), [p, *([label] if label else [])])
        return sorted(kept)

    def _walk_error(self, err: OSError) -> None:
        """Warn about a folder that cannot be listed (its files are not indexed)."""
        warnings.warn(f"{err.filename}: cannot list this folder ({err.strerror}); its files are not indexed", stacklevel=2)

    # ------------------------------------------------------------ main
    def run(self) -> Index:
        """Scan the tree: sort files by kind, read Decathlon descriptions, pair labels, build cases, place the rest."""
        if not os.path.isdir(self.root):
            raise NotADirectoryError(f"{self.root}: not a folder; give the folder that holds your scans")
        logger.info("scanning %s", self.root)
        files = self.walk()
        nifti: list[str] = []
        jsons: list[str] = []
        headers: list[DicomHeader] = []
        dataset_jsons: list[str] = []
        for p in progress(files, "scan: files", unit="file"):
            name = os.path.basename(p)
            if name.startswith("._"):
                self.reject(p, "not an image file we read (a macOS resource-fork file, '._' prefix)")
            elif is_nifti(name):
                nifti.append(p)
            elif name == "dataset.json":
                dataset_jsons.append(p)
            elif name.lower().endswith(".json"):
                jsons.append(p)
            elif name.lower().endswith(".csv") and is_lesion_table(p):
                self.account(p)  # a lesion table (datamodules.sources.lesion_csv), e.g. the demo cohort's lesions.csv
            else:
                h = self._read_dicom(p)
                if h is not None:
                    headers.append(h)
        if self.dicom_warnings:
            logger.info("pydicom reported %d warning(s) while reading headers (details at DEBUG level)", self.dicom_warnings)
        for p in dataset_jsons:
            try:
                dec = parse_decathlon(p)
            except Reject as r:
                self.reject(p, str(r))
                continue
            self.decathlons[dec.folder] = dec
            self.account(p)
        series = [Series(k, v) for k, v in group_series(headers).items()]
        logger.info(
            "%d files: %d NIfTI, %d DICOM in %d series, %d JSON, %d dataset.json",
            len(self.all_files), len(nifti), len(headers), len(series), len(jsons), len(dataset_jsons),
        )
        label_of, label_files = pair_labels(self, nifti, series)
        nifti_set = set(nifti)
        self._channel_cases = self._multichannel_cases(sorted(nifti_set - label_files), label_of)
        further = [p for p, (_, channel) in self._channel_cases.items() if "nifti:" + p not in label_of and channel]
        if further:
            logger.info("%d further channel(s) of %d nnU-Net case(s) with several channels (e.g. %s) are indexed "
                        "without a label, as scans of their case's patient: the label map goes with the case's first "
                        "channel (_0000), and the learners read one channel", len(further),
                        len({case for case, _ in self._channel_cases.values()}), self.rel(further[0]))
        self._sidecar_files = Sidecars(jsons, self.root)  # the BIDS sidecars each NIfTI image inherits (`_sidecar`)
        self._images = Images(nifti_set, self.root)
        # each volume is read (about a second for a 512 x 512 x 160 CT): a bar, where hundreds of them took minutes
        # without a line (a review)
        images = self._one_path_per_image(sorted(nifti_set - label_files), label_of)
        for p in progress(images, "scan: NIfTI volumes", total=len(images), unit="volume"):
            self._guarded(p, lambda p=p: self._nifti_case(p, label_of.get("nifti:" + p)), [p, label_of.get("nifti:" + p)])
        for s in progress(series, "scan: DICOM series", total=len(series), unit="series"):
            files = [h.path for h in s.headers]
            label = label_of.get("dicom:" + s.key)
            self._guarded(files[0], lambda s=s, label=label: self._dicom_case(s, label), [*files, label])
        # labels that no case took (their image was not found or was rejected without them)
        for p in sorted(label_files - set(self.placed)):
            self.reject(p, "label map whose image was not indexed")
        for p in jsons:
            self._json(p)
        for p in self.all_files:  # safety net: every file is somewhere
            if p not in self.placed:
                warnings.warn(f"{p}: the scanner did not classify this file (a bug, please report)", stacklevel=2)
                self.reject(p, "not classified by the scanner (a bug, please report)")
        self.index.cases.sort(key=lambda c: c.image if isinstance(c.image, str) else c.image[0])
        self._merge_site_variants()
        self._warn_about_sites()
        if self._ignored:
            logger.warning("%d label map(s) under %s (e.g. %s) hold nnU-Net's '%s' value (voxels not annotated): it is "
                           "no structure, and its voxels are background in every episode, so a structure left "
                           "unannotated there is taught as background; use fully annotated maps for training",
                           len(self._ignored), self.root, self.rel(self._ignored[0]), IGNORE_LABEL)
        logger.info(
            "scan of %s: %d cases (%d labelled), %d support files used (sidecars, dataset.json, lesion tables), %d inputs rejected",
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
        """The header of a DICOM image file, or None after rejecting (not DICOM, unreadable) or accounting (DICOMDIR) it."""
        name = os.path.basename(p)
        suffix = "".join(Path(name).suffixes[-1:]).lower()
        try:
            h = read_header(p, keywords=self.site_fields)
        except NotDicomError as e:
            self.reject(p, not_dicom_reason(p, suffix, e))
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
        kind = non_image_kind(h)
        if kind is not None:  # rejected on its own, even when it carries the images' series UID
            self.reject(p, h.problem or f"{kind}, not an image")
            return None
        return h

    def _dicom_case(self, s: Series, label: str | None) -> None:
        """Index one DICOM series (and its label map) as a case, or reject it with the reason."""
        files = [h.path for h in s.headers]
        first = s.headers[0]
        num = f"#{first.series_number} " if first.series_number is not None else ""
        what = f"{len(files)} file{'s' if len(files) > 1 else ''}"
        if all(h.frames is not None for h in s.headers):
            n_frames = sum(len(h.frames or ()) for h in s.headers)
            what = f"{len(files)} enhanced multi-frame file{'s' if len(files) > 1 else ''}, {n_frames} frames"
        desc = f"DICOM series {num}({first.modality or '?'}, {what})"
        where = files[0] if len(files) == 1 else (s.folder or os.path.commonpath(files))
        covered = files + ([label] if label else [])
        try:
            ser = order_series(s.headers, min_slices=self.min_slices)
        except DicomSeriesError as e:
            reason = e.reason if len(files) == 1 else f"{desc}: {e.reason}"
            if s.key.startswith(NO_UID):
                reason += f"; the file has {NO_UID_REASON}"
            if label:
                reason += f" (its label map {self.rel(label)} is not used)"
            self.reject(where, reason, covered if len(covered) > 1 else ())
            return
        volume = Volume(shape=list(ser.shape), affine=ser.affine)
        values: list[int] = []
        if label:
            try:
                values = label_values(label, self.rel(label), volume)
            except Reject as r:
                self.reject(where, f"{desc}: {r}", covered)
                return
        rel_files = [self.rel(p) for p in ser.paths]
        patients = sorted({(h.patient_id or "").strip() for h in ser.headers} - {""})
        if len(patients) > 1:  # one series, several patients: a split by patient could put it on both sides
            self.reject(where, f"{desc}: its slices name {len(patients)} patients (PatientID); one series is one "
                               "patient - export it again from the source", covered)
            return
        raw_patient = (first.patient_id or "").strip() or self._path_patient(where)
        if not patients and self.patient_re is not None and self._regex_patient(where) is None:
            self.index.own_patient.append(rel_files[0])  # anonymised: no PatientID, and its path names no patient
        key, info = site_key(ser.headers[0].attributes, self.site_fields, self.salt)
        # keys that differ only in case are one site (`merge_case_variants`): not two scanners
        keys = {site_key(h.attributes, self.site_fields, self.salt)[0] for h in ser.headers[1:]}
        others = sorted({k.casefold(): k for k in keys if k.casefold() != key.casefold()}.values())
        if others:  # a series put together from two scanners' files: indexed at its first slice's site, with a word
            logger.warning("%s: %s: its slices name %d scanners (%s); it is indexed at the first slice's site, %r",
                           self.rel(where), desc, 1 + len(others), "; ".join([key, *others]), key)
        case = Case(
            case_id="c-" + pseudonym(self.salt, rel_files[0]),
            patient="p-" + pseudonym(self.salt, raw_patient),
            site=key,
            modality=ser.modality or "unknown",
            image=rel_files,
            image_format="dicom",
            label=self.rel(label) if label else None,
            organs=self._organs(values, self._names_for(where, label), label),
            shape=[int(v) for v in ser.shape],
            spacing=[float(v) for v in ser.spacing],
            affine=np.asarray(ser.affine, dtype=float).tolist(),
            site_info=info,
        )
        self._add_case(case, covered)

    # ------------------------------------------------------------ NIfTI
    def _nifti_case(self, p: str, label: str | None) -> None:
        """Index one NIfTI image (and its label map) as a case, or reject it with the reason."""
        covered = [p] + ([label] if label else [])
        note = f" (its label map {self.rel(label)} is not used)" if label else ""
        try:
            img, data, shape = load_nifti(p)
            check_image_data(data, self.min_slices)
        except Reject as r:
            self.reject(p, f"{r}{note}", covered if label else ())
            return
        affine = np.asarray(img.affine, dtype=np.float64)
        air = hounsfield_air_share(data)  # for a file that does not say its modality (below), as `segment` does
        del data
        values: list[int] = []
        if label:
            try:
                values = label_values(label, self.rel(label), Volume(shape=shape, affine=affine))
            except Reject as r:
                self.reject(p, str(r), covered)
                return
        sidecar = self._sidecar(p)
        key, info = site_key(sidecar, self.site_fields, self.salt)
        dec = self._nearest_decathlon(p)
        modality = normalise_modality(sidecar.get("Modality")) or (dec.modality if dec else None)
        if modality is None and air is not None:
            logger.info("%s does not say its modality: indexed as CT, since %.0f%% of its voxels are air at about "
                        "-1000 HU", self.rel(p), 100 * air)
        modality = modality or ("CT" if air is not None else "unknown")
        rel = self.rel(p)
        if dec is None and self.patient_re is not None and self._regex_patient(p) is None:  # "": every file its own
            self.index.own_patient.append(rel)
        case = Case(
            case_id="c-" + pseudonym(self.salt, rel),
            patient="p-" + pseudonym(self.salt, self._path_patient(p)),
            site=key,
            modality=modality,
            image=rel,
            image_format="nifti",
            label=self.rel(label) if label else None,
            organs=self._organs(values, self._names_for(p, label), label),
            shape=[int(v) for v in shape],
            spacing=[round(float(v), 6) for v in np.linalg.norm(affine[:3, :3], axis=0)],
            affine=affine.tolist(),
            site_info=info,
        )
        self._add_case(case, covered)

    def _merge_site_variants(self) -> None:
        """One key for site keys that differ only in case (`merge_case_variants`), said in the log."""
        merged = merge_case_variants([c.site for c in self.index.cases])
        for k, v in sorted((k, v) for k, v in merged.items() if k != v):
            logger.info("site %r is read as %r (the same scanner written in another case)", k, v)
        for c in self.index.cases:
            c.site = merged[c.site]

    def _warn_about_sites(self) -> None:
        """Warnings about the site keys: institution or station tokens made with a shipped salt (not on the demo),
        and cases that name no scanner beside cases that do (they form one site, ``unknown``, of their own)."""
        institutions = [c for c in self.index.cases if any(k in IDENTIFYING_FIELDS for k in (c.site_info or {}))]
        # the patient ids are keyed hashes of a PatientID or a path: with a public salt an MRN is found by trying
        # every number (a review: a million in 2.5 s), so every cohort but the demo is warned, with or without an
        # institution token (anonymised headers and --site-fields without one were not)
        if self.salt in SHIPPED_SALTS and self.index.cases and not self._is_demo():
            tokens = f" and {len(institutions)} institution or station token(s)" if institutions else ""
            logger.warning("the patient ids of the %d case(s) under %s%s are salted with the shipped default salt %r: "
                           "anyone can test a guessed MRN or name against them (trying every MRN takes seconds). Set "
                           "your own secret before sharing reports: export IMAGING_META_SALT (fit, scan and evaluate "
                           "read it), or a config's salt: (data.init_args.salt; for a lesion CSV "
                           "data.init_args.source.init_args.salt; imaging-meta scan --salt)",
                           len(self.index.cases), self.root, tokens, self.salt)
        unknown = sum(c.site == "unknown" for c in self.index.cases)
        if self.site_fields and unknown == len(self.index.cases) > 1:
            logger.info("none of the %d cases under %s names a scanner (%s; no DICOM header or BIDS sidecar holds "
                        "these fields): they all form one site, 'unknown', and no split can hold out a site",
                        unknown, self.root, ", ".join(self.site_fields))
        if 0 < unknown < len(self.index.cases):
            logger.warning("%d of %d cases under %s name no scanner (%s; no DICOM header or BIDS sidecar fields): they "
                           "form one site, 'unknown', whatever scanners they come from", unknown, len(self.index.cases),
                           self.root, ", ".join(self.site_fields))

    def _is_demo(self) -> bool:
        """Whether the root is the demo cohort the project writes (its dataset.json names it), whose names are fake."""
        try:
            with open(os.path.join(self.root, "dataset.json"), encoding="utf-8") as f:
                return json.load(f).get("name") == DEMO_NAME
        except (OSError, ValueError, AttributeError):
            return False

    def _sidecar(self, image: str) -> dict[str, Any]:
        """The BIDS sidecar fields of a NIfTI image: its own ``<stem>.json`` and those it inherits from above
        (`datamodules.indexing.bids`), the nearest winning."""
        fields: dict[str, Any] = {}
        for path in self._sidecar_files.of(image):
            if path not in self._sidecars:
                self._sidecars[path] = self._read_sidecar(path)
            fields.update(self._sidecars[path])
        return fields

    def _read_sidecar(self, path: str) -> dict[str, Any]:
        """A BIDS JSON sidecar as a dict; an invalid one gives {} and a warning."""
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
        """Add a case, place its files, and merge its organ names into ``index.label_names`` (warning on conflicts)."""
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
    def _regex_patient(self, path: str) -> str | None:
        """The ``patient_regex`` match in the path relative to the root (group 1 if any); None without one."""
        m = self.patient_re.search(self.rel(path)) if self.patient_re is not None else None
        return None if m is None else (m.group(1) if m.groups() else m.group(0))

    def _multichannel_cases(self, images: list[str], label_of: Mapping[str, str]) -> dict[str, tuple[str, int]]:
        """path -> (case, channel) of the NIfTI images that are channels of an nnU-Net case with two or more of its
        channels among ``images`` (`nnunet_case`): the channels run _0000, _0001, ... without a gap, no channel but
        the first has a label map, and the first has the label map named after the case (labelsTr/CASE.nii.gz), or
        none while the nearest dataset.json names at least that many channels (test cases). Names alone do not say
        it: ``synapse_0002``, ``synapse_0003`` are cases of their own, each with its own label map, and so are
        ``case_0001``... beside a dataset.json of several modalities (a review: all were merged into one patient)."""
        by_case: dict[str, dict[str, tuple[str, int]]] = {}
        for p in images:
            found = nnunet_case(p)
            if found is not None:
                by_case.setdefault(found[0], {})[p] = found
        out: dict[str, tuple[str, int]] = {}
        for case, files in by_case.items():
            channels = sorted(c for _, c in files.values())
            if len(files) < 2 or channels != list(range(len(files))):  # _0000, _0001, ... and nothing else
                continue
            first = min(files, key=lambda p: files[p][1])
            label = label_of.get("nifti:" + first)
            if any("nifti:" + p in label_of for p in files if p != first):  # numbered cases, each with its label
                continue
            dec = self._nearest_decathlon(first)
            if label is not None:  # named after the case: its channels; named after the file: a case of its own
                channels_of_case = nifti_stem(os.path.basename(label)) == os.path.basename(case)
            else:  # test cases: the dataset.json must name that many channels
                channels_of_case = dec is not None and dec.channels >= len(files)
            if channels_of_case:
                out.update(files)
        return out

    def _path_patient(self, path: str) -> str:
        """The raw patient key of a path: the ``patient_regex`` match (group 1 if any), else the path without suffix
        (without its channel suffix for a channel of an nnU-Net case with several: one patient, who was counted once
        per channel and could be split between training and test; a review)."""
        found = self._regex_patient(path)
        if found is not None:
            return found
        channel = self._channel_cases.get(path)
        return self.rel(channel[0]) if channel is not None else nifti_stem(self.rel(path))

    def _nearest_decathlon(self, path: str) -> Decathlon | None:
        """The Decathlon description in the folder of ``path`` or the nearest one above it, up to the root."""
        folder = os.path.dirname(os.path.abspath(path)) if not os.path.isdir(path) else path
        while True:
            if folder in self.decathlons:
                return self.decathlons[folder]
            if folder == self.root or os.path.dirname(folder) == folder or not folder.startswith(self.root):
                return None
            folder = os.path.dirname(folder)

    def _names_for(self, path: str, label: str | None = None) -> dict[int, str]:
        """Label names for ``path`` (and its label map ``label``): the nearest Decathlon description with labels that
        describes the map (lists it among its training pairs, keeps it in its own ``labelsTr``/``labelsTs``/``labels``
        folder, or lists no pairs, as nnU-Net v2's does), else the default
        names. A ``dataset.json`` at the root listing one sub-folder's cases named every other map of the tree by its
        labels, over ``label_names`` and without a word (a review)."""
        folder = os.path.dirname(path) if not os.path.isdir(path) else path
        image, mask = os.path.normpath(os.path.abspath(path)), label and os.path.normpath(os.path.abspath(label))
        while True:
            dec = self.decathlons.get(folder)
            if dec is not None and dec.labels and (not dec.pairs or image in dec.pairs or mask in dec.pairs.values()
                                                   or (mask and os.path.dirname(mask) in _label_folders(dec.folder))):
                return dec.labels
            if folder == self.root or os.path.dirname(folder) == folder or not folder.startswith(self.root):
                return self.default_names
            folder = os.path.dirname(folder)

    def _organs(self, values: Iterable[int], names: Mapping[int, str], label: str | None) -> dict[str, int]:
        """Structure name -> label value for the values present; unnamed values become ``label_<value>`` (warned)."""
        organs: dict[str, int] = {}
        unnamed = []
        for v in values:
            if v == 0:
                continue
            name = names.get(v)
            if name == IGNORE_LABEL:  # not annotated: no structure (a review: it was validated on as an organ)
                self._ignored.append(label or "")
                continue
            if name is None:
                name = f"label_{v}"
                if names:
                    unnamed.append(v)
            if name in organs:
                name = f"{name}_{v}"
            organs[name] = int(v)
        if unnamed and label:
            warnings.warn(
                f"{label}: label value(s) {unnamed} have no name in the label names; called 'label_<value>', they are "
                "structures like the named ones (episode targets in training): name them, or list the structures to "
                "use in data.init_args.organs",
                stacklevel=2,
            )
        return organs

    # ------------------------------------------------------------ JSON
    def _json(self, p: str) -> None:
        """Account for a known JSON file (BIDS sidecar or description, an index, the demo marker) or reject it."""
        if self._images.described_by(p):
            self.account(p)  # BIDS sidecar, of the image beside it or inherited by those below it
            return
        try:
            with open(p, encoding="utf-8") as f:
                d = json.load(f)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            self.reject(p, f"not an image file we read (JSON; invalid: {type(e).__name__})")
            return
        if os.path.basename(p) == "prepare.json" and isinstance(d, dict) and d.get("complete") is False:
            # what `imaging-meta prepare` writes before it moves files in, and replaces last: a run was stopped, and
            # the folder mixes its files with an earlier run's (or has only some); training on it would go unnoticed
            raise ValueError(
                f"{p}: an interrupted `imaging-meta prepare` of {d.get('dataset', 'a dataset')!r} left this folder "
                "incomplete; run the same prepare command again (it replaces the partial output)")
        if isinstance(d, dict) and "cases" in d and "rejected" in d and "version" in d:
            self.account(p)  # an imaging-meta index written into the data folder
            return
        if isinstance(d, dict) and str(d.get("generator", "")).startswith(("datamodules.synthetic.demo", "datamodules.recipes")):
            self.account(p)  # the demo cohort's marker file; a prepared benchmark's prepare.json / folds.json
            return
        if os.path.basename(p) in BIDS_SUPPORT_JSON and isinstance(d, dict):
            self.account(p)  # BIDS dataset-level description
            return
        self.reject(p, f"not an image file we read ({NON_IMAGE_KINDS['.json']})")



def scan_folder(
    root: str | os.PathLike,
    *,
    site_fields: Sequence[str] = DEFAULT_SITE_FIELDS,
    label_names: Mapping[int, str] | None = None,
    salt: str = DEFAULT_SALT,
    patient_regex: str = DEFAULT_PATIENT_REGEX,
    min_slices: int = MIN_SLICES,
    skip: Sequence[str | os.PathLike] = (),
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
        skip: folders not scanned (compared by their real paths): a cache folder inside ``root``, whose files
            were each opened and rejected as no image on every scan after the first (a review).

    Returns:
        The index: cases, rejected inputs with reasons, and accounted support files. Every regular file
        under ``root`` but those in ``skip`` is in exactly one of them.

    Raises:
        NotADirectoryError: ``root`` is not a folder.
    """
    return _Scanner(os.fspath(root), site_fields, label_names, salt, patient_regex, min_slices, skip).run()


def scan_to_file(root: str | os.PathLike, out: str | os.PathLike, **kw: Any) -> Index:
    """`scan_folder`, then write the index to ``out`` atomically (`Index.save`).

    Args:
        root: folder to scan.
        out: index JSON to write.
        **kw: keyword arguments of `scan_folder`.

    Returns:
        The index.
    """
    Index.check_target(out)  # never over an input (a Decathlon dataset.json), checked before the scan
    index = scan_folder(root, **kw)
    path = index.save(out)
    logger.info("index written to %s", path)
    return index
