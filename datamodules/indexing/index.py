"""The scan index: one `Case` record per usable image, plus the report of rejected inputs.

The index is the contract between `datamodules.indexing.scan` (which writes it once) and everything
downstream (splits, samplers, transforms), which read it. It carries pseudonymous ids only:
no DICOM PatientName, PatientID, PatientBirthDate or UID ever enters it.

Paths are stored relative to the index's ``root`` so that an index can move with its data.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from datamodules.io.atomic import atomic_open

INDEX_VERSION = 1


@dataclass
class Case:
    """One usable image volume (a NIfTI file or one DICOM series), with its label map if any.

    Attributes:
        case_id: pseudonymous id of this image, stable for a given salt and input path.
        patient: pseudonymous id of the patient; splits are made on this.
        site: site key built from scanner headers (vendor, model, institution token, field strength).
        modality: "CT", "MR" or another DICOM modality code.
        image: NIfTI path, or the DICOM slice files ordered by position along the slice normal,
            relative to the index root.
        image_format: "nifti" or "dicom".
        label: label map path relative to the index root, or None for an unlabelled image.
        organs: structure name -> integer value, for the structures present in the label map.
        shape: voxel grid of the image, in file order (x, y, z).
        spacing: voxel size in mm, in file order.
        affine: 4x4 voxel-to-world (RAS, mm) matrix of the image.
        lesions: lesion records (filled by later issues), each a dict.
        site_info: the non-identifying header fields that built ``site`` (institution pseudonymised).
    """

    case_id: str
    patient: str
    site: str
    modality: str
    image: str | list[str]
    image_format: str
    label: str | None = None
    organs: dict[str, int] = field(default_factory=dict)
    shape: list[int] = field(default_factory=list)
    spacing: list[float] = field(default_factory=list)
    affine: list[list[float]] = field(default_factory=list)
    lesions: list[dict[str, Any]] = field(default_factory=list)
    site_info: dict[str, str] = field(default_factory=dict)

    @property
    def labelled(self) -> bool:
        return self.label is not None


@dataclass
class Rejection:
    """An input that could not be used: the file (or series folder) and why, in words a user can act on.

    Attributes:
        path: the file, or the folder of a rejected DICOM series, relative to the index root.
        reason: why, and what to fix.
        files: every file this rejection covers (the slices of a DICOM series, an image and its label),
            relative to the index root; empty when it is just ``path``.
    """

    path: str
    reason: str
    files: list[str] = field(default_factory=list)


def own_patient_note(root: str, paths: Sequence[str]) -> str:
    """What it means that ``paths`` (images under ``root``: NIfTI files, DICOM series by their first file) name no patient, and the fix."""
    return (f"{len(paths)} image(s) under {root} name no patient (e.g. {paths[0]}: its path does not match "
            "the patient pattern, by default 'sub-<id>', and it is not in a Decathlon folder, or it is a DICOM series "
            "whose PatientID is empty), so each counts as its "
            "own patient and two scans of one patient can land in training and test; put each patient's files under "
            "a 'sub-<id>' folder, or set data.init_args.patient_regex (its first group is the patient: '^([^/]+)/' "
            "for one folder per patient, '^([^_]+)_' for '<patient>_ct.nii.gz')")


@dataclass
class Index:
    """All cases under one root, and what was rejected.

    Attributes:
        root: absolute folder the relative paths start from.
        cases: usable images.
        rejected: unusable inputs with reasons.
        accounted: other files that were read and used as support material (sidecars, dataset.json).
        label_names: integer value -> structure name used for all label maps.
        site_fields: the header fields that build the site key.
        own_patient: images (relative paths; a DICOM series by its first file) that name no patient: no match of
            the scan's patient pattern in their path and no Decathlon folder (where each image is one patient), and
            for a DICOM series an empty PatientID, so each is its own patient.
        patient_regex: the pattern the scan read NIfTI patients with ("" for none); None in indexes written
            before it was recorded (which used the default).
    """

    root: str
    cases: list[Case] = field(default_factory=list)
    rejected: list[Rejection] = field(default_factory=list)
    accounted: list[str] = field(default_factory=list)
    label_names: dict[int, str] = field(default_factory=dict)
    site_fields: list[str] = field(default_factory=list)
    version: int = INDEX_VERSION
    own_patient: list[str] = field(default_factory=list)
    patient_regex: str | None = None

    # ------------------------------------------------------------------ paths
    def resolve(self, rel: str | list[str]) -> str | list[str]:
        """Absolute path(s) for a path stored relative to ``root``."""
        if isinstance(rel, (list, tuple)):
            return [str(Path(self.root) / r) for r in rel]
        return str(Path(self.root) / rel)

    # ---------------------------------------------------------------- queries
    @property
    def labelled_cases(self) -> list[Case]:
        return [c for c in self.cases if c.labelled]

    @property
    def organs(self) -> list[str]:
        """Structure names present in at least one labelled case, in label-value order."""
        present = {name for c in self.cases for name in c.organs}
        by_value = sorted(((v, n) for v, n in self.label_names.items() if n in present))
        names = list(dict.fromkeys(n for _, n in by_value))  # one name given to two values is listed once
        return names + sorted(present - set(names))

    @property
    def sites(self) -> list[str]:
        return sorted({c.site for c in self.cases})

    def case(self, case_id: str) -> Case:
        for c in self.cases:
            if c.case_id == case_id:
                return c
        raise KeyError(f"no case {case_id!r} in the index of {self.root}")

    # -------------------------------------------------------------------- I/O
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["label_names"] = {str(k): v for k, v in self.label_names.items()}
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Index:
        if d.get("version") != INDEX_VERSION:
            raise ValueError(
                f"index version {d.get('version')!r} is not {INDEX_VERSION}; re-run `imaging-meta scan` to rebuild it"
            )
        return cls(
            root=d["root"],
            cases=[Case(**c) for c in d.get("cases", [])],
            rejected=[Rejection(**r) for r in d.get("rejected", [])],
            accounted=list(d.get("accounted", [])),
            label_names={int(k): v for k, v in d.get("label_names", {}).items()},
            site_fields=list(d.get("site_fields", [])),
            version=d["version"],
            own_patient=list(d.get("own_patient", [])),  # absent from indexes written before it existed
            patient_regex=d.get("patient_regex"),
        )

    def save(self, path: str | os.PathLike) -> Path:
        """Write the index as JSON atomically.

        The JSON goes to a temporary file in the same folder, is flushed to disk, and then replaces ``path``
        with `os.replace`; an error or an interruption (Ctrl-C) while writing leaves the previous index (or no
        index) in place and removes the temporary file.

        Args:
            path: the index JSON file.

        Returns:
            ``path``.
        """
        path = Path(path)
        with atomic_open(path, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=1)
        return path

    @staticmethod
    def check_target(path: str | os.PathLike) -> Path:
        """Where `save` may write: a new file, or an index written before (any version), never another file.

        Raises:
            ValueError: ``path`` is an existing file that is not an index (a scanned input such as a Decathlon
                ``dataset.json`` or a NIfTI volume: `scan --out` replaced it and exited 0; a review).
        """
        path = Path(path)
        if not path.is_file():
            return path
        try:
            with open(path, "rb") as f:  # a volume or an image is told by its first bytes, not read whole
                looks_like_json = f.read(64).lstrip().startswith(b"{")
            d = json.loads(path.read_text(encoding="utf-8")) if looks_like_json else None
            is_index = isinstance(d, dict) and {"version", "root", "cases"} <= d.keys()
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            is_index = False
        if not is_index:
            raise ValueError(f"{path}: exists and is not an index written by `imaging-meta scan` (it may be one of "
                             "your inputs, such as a Decathlon dataset.json); give a new --out")
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> Index:
        path = Path(path)
        try:
            with open(path) as f:
                d = json.load(f)
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: no index file; create it with `imaging-meta scan ROOT --out {path}`") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not a valid index JSON ({e}); delete it and re-run `imaging-meta scan`") from e
        return cls.from_dict(d)

    def summary(self) -> str:
        """A few human-readable lines: counts per site and modality, and the rejections."""
        lines = [
            f"{len(self.cases)} cases ({len(self.labelled_cases)} labelled) from "
            f"{len({c.patient for c in self.cases})} patients at {len(self.sites)} sites; "
            f"{len(self.rejected)} inputs rejected"
        ]
        for site in self.sites:
            cs = [c for c in self.cases if c.site == site]
            mods = sorted({c.modality for c in cs})
            lines.append(f"  site {site!r}: {len(cs)} cases, modality {'/'.join(mods)}")
        if self.organs:
            lines.append(f"  structures: {', '.join(self.organs)}")
        if self.own_patient:
            lines.append(f"  {own_patient_note(self.root, self.own_patient)}")
        for r in self.rejected:
            lines.append(f"  rejected {r.path}: {r.reason}")
        return "\n".join(lines)
