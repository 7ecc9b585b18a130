"""Assemble the demo cohort on disk: every patient of every site, the site descriptions, lesions.csv, the marker."""

from __future__ import annotations

import csv
import json
import os
import secrets
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from datamodules.indexing.scan import DEMO_NAME
from datamodules.io.atomic import name_the_file
from datamodules.progress import progress
from datamodules.synthetic.dicom_writer import write_dicom_series
from datamodules.synthetic.headers import dicom_header, sidecar
from datamodules.synthetic.intensities import site_image
from datamodules.synthetic.lesion_types import LESION_COLUMNS, LESION_TYPES, draw_lesion_classes
from datamodules.synthetic.lesions import Lesion, lesion_rows, place_lesions
from datamodules.synthetic.nifti_writer import write_nifti
from datamodules.synthetic.phantom import ORGANS, Patient
from datamodules.synthetic.sites import SITES, Site, grid_affine, world_grid

MARKER = ".imaging-meta-demo.json"
DEMO_VERSION = 2

#: the ``generator`` of the marker file (a string in the files: it stays the same when the code moves).
_GENERATOR = "datamodules.synthetic.demo.generate_demo_cohort"


@dataclass
class _RenderedPatient:
    """One patient rendered on a site's grid, ready to be written."""

    patient: Patient
    affine: np.ndarray
    image: np.ndarray
    label: np.ndarray
    lesions: list[Lesion]


def _patient_rngs(seed: int, site_index: int, i: int) -> tuple[np.random.Generator, ...]:
    """Independent generators for anatomy, noise and UIDs; they depend only on (seed, site, patient)."""
    return tuple(np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(site_index, i, s))) for s in range(3))


def _check_labels(label: np.ndarray, where: str) -> None:
    """Raise `RuntimeError` when an organ spans fewer than 3 slices (a phantom bug, never expected)."""
    for value, name in ORGANS.items():
        slices = np.flatnonzero((label == value).any(axis=(0, 1)))
        if slices.size < 3:
            raise RuntimeError(f"demo phantom bug: {name} spans {slices.size} slices in {where}; report this with the seed")


def _write_json(obj: Any, path: Path) -> None:
    """Write ``obj`` as indented JSON with a final newline, creating the folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1) + "\n")


def _labels_json() -> dict[str, str]:
    """Label value (as a string) -> name, background included, for dataset.json files."""
    return {"0": "background", **{str(v): n for v, n in ORGANS.items()}}


def _render_patient(seed: int, si: int, site: Site, i: int, rng_anatomy: np.random.Generator,
                    rng_noise: np.random.Generator) -> _RenderedPatient:
    """Anatomy, label map, lesions and site intensities of patient ``i`` of site ``si``.

    Args:
        seed: cohort seed.
        si: index into `SITES`.
        site: ``SITES[si]``.
        i: 1-based patient number within the site.
        rng_anatomy: the patient's anatomy generator (anatomy, then table position).
        rng_noise: the patient's noise generator.

    Returns:
        The rendered patient.
    """
    pat = Patient(rng_anatomy)
    table_z = float(rng_anatomy.uniform(-380.0, -300.0))
    affine = grid_affine(site, table_z)
    shape = (*site.matrix, site.n_slices)
    xyz = world_grid(affine, shape)
    # the grid's centre sits 35 mm above body z = 0, so liver dome and kidney poles are covered
    tissue, label = pat.render(*xyz, z_anchor=table_z - 35.0, table=site.modality == "CT")
    _check_labels(label, f"{site.key} patient {i}")
    rng_lesions = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(si, i, 4)))
    spacing = (*site.spacing, site.slice_spacing)
    lesions = place_lesions(draw_lesion_classes(seed, si, i), label, affine, spacing, rng_lesions)
    img = site_image(site, pat, tissue, xyz, rng_noise, label, lesions, rng_lesions)
    return _RenderedPatient(pat, affine, img, label, lesions)


def _write_dicom_patient(site_dir: Path, si: int, site: Site, i: int, r: _RenderedPatient,
                         rng_uid: np.random.Generator) -> tuple[list[Path], str]:
    """Write a CT site's patient as a DICOM series plus a NIfTI label map; return (files, lesions.csv image)."""
    pat_dir = site_dir / f"pat{i:02d}"
    kw: dict[str, Any]
    if site.letter == "A":
        series = "CT"
        kw = dict(slope=1.0, intercept=-1024.0, signed=False)
    else:
        series = "series"
        kw = dict(slope=0.5, intercept=0.0, signed=True, reverse=True, shuffle_names=True)
    files = write_dicom_series(r.image, r.affine, pat_dir / series, header=dicom_header(si, site, i, r.patient),
                               modality="CT", rng=rng_uid, **kw)
    files.append(write_nifti(r.label, r.affine, pat_dir / f"{series}_label.nii.gz", dtype=np.uint8))
    return files, f"{site.key}/pat{i:02d}/{series}"


def _write_bids_patient(site_dir: Path, site: Site, i: int, r: _RenderedPatient) -> tuple[list[Path], str]:
    """Write a BIDS site's patient: int16 T1w NIfTI, JSON sidecar, dseg label map; return (files, image)."""
    anat = site_dir / f"sub-{i:02d}" / "anat"
    stem = f"sub-{i:02d}_T1w"
    files = [write_nifti(np.rint(r.image), r.affine, anat / f"{stem}.nii.gz", dtype=np.int16)]
    _write_json(sidecar(site), anat / f"{stem}.json")
    files.append(anat / f"{stem}.json")
    files.append(write_nifti(r.label, r.affine, anat / f"{stem}_dseg.nii.gz", dtype=np.uint8))
    return files, f"{site.key}/sub-{i:02d}/anat/{stem}.nii.gz"


def _write_decathlon_patient(site_dir: Path, site: Site, i: int, r: _RenderedPatient,
                             training: list[dict[str, str]]) -> tuple[list[Path], str]:
    """Write a Decathlon site's patient (imagesTr/labelsTr), append its training entry; return (files, image)."""
    name = f"mr_{i:03d}"
    files = [write_nifti(r.image, r.affine, site_dir / "imagesTr" / f"{name}.nii.gz", dtype=np.float32)]
    _write_json(sidecar(site), site_dir / "imagesTr" / f"{name}.json")
    files.append(site_dir / "imagesTr" / f"{name}.json")
    files.append(write_nifti(r.label, r.affine, site_dir / "labelsTr" / f"{name}.nii.gz", dtype=np.uint8))
    training.append({"image": f"./imagesTr/{name}.nii.gz", "label": f"./labelsTr/{name}.nii.gz"})
    return files, f"{site.key}/imagesTr/{name}.nii.gz"


def _write_site_description(site_dir: Path, site: Site, training: list[dict[str, str]]) -> list[Path]:
    """The site-level description: BIDS ``dataset_description.json`` or Decathlon ``dataset.json`` (none for DICOM)."""
    if site.fmt == "bids":
        _write_json({"Name": "imaging-meta demo, site C", "BIDSVersion": "1.8.0", "DatasetType": "raw"},
                    site_dir / "dataset_description.json")
        return [site_dir / "dataset_description.json"]
    if site.fmt == "decathlon":
        _write_json({
            "name": "imaging-meta demo, site D",
            "description": "synthetic T2-weighted abdominal MR in the Medical Segmentation Decathlon layout",
            "reference": "synthetic", "licence": "CC0", "release": f"demo {DEMO_VERSION}",
            "tensorImageSize": "3D", "modality": {"0": "MRI"}, "labels": _labels_json(),
            "numTraining": len(training), "numTest": 0,
            "training": training, "test": [],
        }, site_dir / "dataset.json")
        return [site_dir / "dataset.json"]
    return []


def _write_cohort_files(root: Path, rows: list[dict[str, str]]) -> list[Path]:
    """The cohort-level ``dataset.json`` and ``lesions.csv``."""
    _write_json({
        "name": DEMO_NAME,  # the scan knows the demo by it (its fake institutions need no secret salt)
        "description": "synthetic multi-site abdominal cohort (CT DICOM x2, MR NIfTI x2) for imaging-meta; "
                       "written by datamodules.synthetic.demo.generate_demo_cohort",
        "labels": _labels_json(),
        "modality": {s.key: s.modality for s in SITES},
        "lesions": "lesions.csv",
        "lesion_classes": list(LESION_TYPES),
    }, root / "dataset.json")
    with open(root / "lesions.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=LESION_COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    return [root / "dataset.json", root / "lesions.csv"]


def _write_cohort(root: Path, seed: int, patients_per_site: int) -> list[Path]:
    """Write every file of the cohort under ``root``; return them in writing order (the marker excluded)."""
    files: list[Path] = []
    rows: list[dict[str, str]] = []
    decathlon_training: list[dict[str, str]] = []
    for si, site in enumerate(SITES):
        site_dir = root / site.key
        for i in progress(range(1, patients_per_site + 1), f"demo: site {site.key}", unit="patient"):
            rng_anatomy, rng_noise, rng_uid = _patient_rngs(seed, si, i)
            r = _render_patient(seed, si, site, i, rng_anatomy, rng_noise)
            if site.fmt == "dicom":
                written, image = _write_dicom_patient(site_dir, si, site, i, r, rng_uid)
            elif site.fmt == "bids":
                written, image = _write_bids_patient(site_dir, site, i, r)
            else:
                written, image = _write_decathlon_patient(site_dir, site, i, r, decathlon_training)
            files += written
            rows += lesion_rows(site, image, r.lesions)
        files += _write_site_description(site_dir, site, decathlon_training)
    return files + _write_cohort_files(root, rows)


def _check_target(out: Path) -> None:
    """Raise `FileExistsError` when ``out`` exists and is not an empty folder, naming an outdated cohort."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        old = _marker_version(out)
        if old is not None and old != DEMO_VERSION:
            raise FileExistsError(
                f"{out} is not empty: it holds a demo cohort of version {old}, and this code writes version "
                f"{DEMO_VERSION} (with lesions and lesions.csv); delete the folder to regenerate it"
            )
        missing = _missing_files(out)
        if missing:
            shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
            raise FileExistsError(f"{out} holds a demo cohort that has lost files since it was written ({shown}; a "
                                  "scan would train on fewer cases); delete the folder to regenerate it")
        raise FileExistsError(f"{out} exists and is not empty; choose a new folder or delete it first")


def generate_demo_cohort(out_dir: str | os.PathLike, seed: int = 0, patients_per_site: int = 12) -> dict:
    """Write the demo cohort into ``out_dir``, atomically.

    The cohort is built in a temporary sibling folder, the marker file ``.imaging-meta-demo.json`` is
    written last, and the folder is then renamed to ``out_dir``; an interrupted run leaves no partial
    cohort behind.

    Args:
        out_dir: target folder; it must not exist or be empty.
        seed: non-negative seed; the same seed gives byte-identical files.
        patients_per_site: patients at each of the four sites (patient ``i`` of a site is the same
            whatever this number is).

    Returns:
        Summary: ``out_dir``, ``seed``, ``patients_per_site``, ``sites`` (site folder -> patients),
        ``patients``, ``files`` (number written) and ``seconds``.

    Raises:
        FileExistsError: ``out_dir`` exists and is not empty.
        ValueError: a negative seed or fewer than one patient per site.
    """
    t0 = time.perf_counter()
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    if not isinstance(patients_per_site, (int, np.integer)) or patients_per_site < 1:
        raise ValueError(f"patients_per_site must be an integer >= 1, got {patients_per_site!r}")
    # the real folder: a link to scratch storage (or to a folder not made yet) is written through, not replaced
    out = Path(out_dir).resolve()
    _check_target(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    # a unique hidden sibling; mkdir (unlike mkdtemp) keeps the usual umask permissions for the result
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        files = _write_cohort(tmp, int(seed), int(patients_per_site))
        marker = {
            "generator": _GENERATOR,
            "version": DEMO_VERSION,
            "seed": int(seed),
            "patients_per_site": int(patients_per_site),
            "sites": [s.key for s in SITES],
            "files": len(files),
            # the names, so that --if-missing sees a lost file even beside one added (a count cannot)
            "paths": sorted(f.relative_to(tmp).as_posix() for f in files),
        }
        _write_json(marker, tmp / MARKER)
        if out.exists():
            out.rmdir()  # empty (checked above); os.rename cannot replace a directory everywhere
        os.rename(tmp, out)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        name_the_file(e, out)
        raise
    return {
        "out_dir": str(out),
        "seed": int(seed),
        "patients_per_site": int(patients_per_site),
        "sites": {s.key: int(patients_per_site) for s in SITES},
        "patients": int(patients_per_site) * len(SITES),
        "files": len(files) + 1,
        "seconds": round(time.perf_counter() - t0, 2),
    }


def _marker(out_dir: str | os.PathLike) -> dict | None:
    """A demo cohort's marker file, or None when there is no valid marker."""
    try:
        data = json.loads((Path(out_dir) / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("generator") == _GENERATOR else None


def _marker_version(out_dir: str | os.PathLike) -> int | None:
    """The version in a demo cohort's marker file, or None when there is no valid marker."""
    marker = _marker(out_dir)
    return None if marker is None else marker.get("version")


def demo_settings(out_dir: str | os.PathLike) -> dict | None:
    """The ``seed`` and ``patients_per_site`` a finished demo cohort was written with (None: no valid marker)."""
    marker = _marker(out_dir)
    return None if marker is None else {k: marker.get(k) for k in ("seed", "patients_per_site")}


def demo_is_complete(out_dir: str | os.PathLike) -> bool:
    """True when ``out_dir`` holds a finished demo cohort of the current `DEMO_VERSION`.

    An older cohort (e.g. one without ``lesions.csv``) is not complete: `generate_demo_cohort` then asks for
    the folder to be deleted.
    """
    return _marker_version(out_dir) == DEMO_VERSION and not _missing_files(out_dir)


def _missing_files(out_dir: str | os.PathLike) -> list[str]:
    """The files a demo cohort's marker lists that are gone (none without a marker): a cohort missing a slice
    or a label map was called complete, and training went on with fewer cases (a review). Files added beside
    them do not count against it. A marker written before the names were recorded holds only a count; then
    the lost files are counted, not named (``"N file(s)"``), and one added hides one lost."""
    marker = _marker(out_dir)
    if marker is None:
        return []
    root = Path(out_dir)
    paths = marker.get("paths")
    if isinstance(paths, list) and all(isinstance(name, str) for name in paths):
        return [name for name in paths if not (root / name).is_file()]
    if not isinstance(marker.get("files"), int):
        return []
    present = sum(len(names) for _, _, names in os.walk(os.fspath(out_dir))) - 1  # without the marker itself
    lost = marker["files"] - present
    return [f"{lost} file(s)"] if lost > 0 else []
