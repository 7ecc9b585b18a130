"""Prepare SSL-ALPNet's few-shot abdominal benchmarks (Ouyang et al., ECCV 2020) for this project's scanner.

Two datasets, as their public downloads unpack (nothing is downloaded here):

* ``synapse`` (Abd-CT): the 30 training scans of the Synapse / BTCV "Multi-Atlas Labeling Beyond the Cranial
  Vault" challenge, ``img/img0001.nii.gz ...`` and ``label/label0001.nii.gz ...`` (``RawData/Training``).
  Images are kept in HU as stored; labels keep the liver, spleen and kidneys, every other BTCV structure
  becomes background.
* ``chaos_mr`` (Abd-MRI): the CHAOS challenge T2-SPIR MR training scans, ``MR/<patient>/T2SPIR/DICOM_anon/
  *.dcm`` with one ground-truth PNG per slice in ``MR/<patient>/T2SPIR/Ground/``. The DICOM series is read with
  this project's DICOM reader (slices sorted along the slice normal, RAS affine from the headers); the PNG
  numbered as a slice's DICOM file (`_pair_pngs`; by rank in InstanceNumber order where the DICOM names carry no
  distinct numbers) is the label of that slice, its pixel (row r, column c) the DICOM pixel (r, c): label and
  image share one voxel grid and one affine. MR intensities are kept as stored (RescaleSlope/Intercept applied).

The output is what `datamodules.indexing.scan` reads as a Decathlon dataset, so the organs carry names::

    out/dataset.json                 labels {1: liver, 2: spleen, 3: kidney_right, 4: kidney_left}, training pairs
    out/imagesTr/<dataset>_<id>.nii.gz
    out/labelsTr/<dataset>_<id>.nii.gz
    out/folds.json                   SSL-ALPNet's 5-fold cross-validation split (see `ssl_alpnet_folds`)
    out/prepare.json                 what was done: source, layout, label mapping, counts, warnings

Every problem of the input (a missing label, a PNG count or size that does not match the DICOM series, an
unknown PNG intensity or label value, an unreadable file) is reported with the file and the problem; all of
them are collected and raised together as one `PrepareError`. The volumes are written beside ``out`` and moved
in only when every patient converted, so a failed run leaves ``out`` as it was.

The same command also takes ``medmnist`` (MedMNIST 2D ``.npz`` files -> a data config and fixed few-shot test
episodes), implemented in `datamodules.recipes.medmnist`.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import json
import logging
import os
import re
import shutil
import signal
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import nibabel as nib
import numpy as np
import pydicom
from nibabel.orientations import apply_orientation, io_orientation, ornt_transform
from nibabel.spatialimages import SpatialImage
from PIL import Image

from datamodules.indexing.volumes import grid_fix, grid_mismatch
from datamodules.io.atomic import atomic_open
from datamodules.io.dicom import DicomError, DicomSeriesError, load_series_array, order_series, read_header

logger = logging.getLogger(__name__)

GENERATOR = "datamodules.recipes.prepare"  # the scanner accounts JSON files with this generator
#: the output label values: the four organs SSL-ALPNet evaluates (the demo cohort's values and names)
ORGANS = {1: "liver", 2: "spleen", 3: "kidney_right", 4: "kidney_left"}
VALUE = {name: v for v, name in ORGANS.items()}

#: BTCV / Synapse multi-organ label values, from the challenge's data description (Synapse syn3193805) and the
#: same order in SSL-ALPNet's code (dataloaders/dataset_utils.py, DATASET_INFO["SABS"]["REAL_LABEL_NAME"]).
BTCV_LABELS = {
    1: "spleen", 2: "kidney_right", 3: "kidney_left", 4: "gallbladder", 5: "esophagus", 6: "liver", 7: "stomach",
    8: "aorta", 9: "inferior_vena_cava", 10: "portal_and_splenic_veins", 11: "pancreas", 12: "adrenal_right",
    13: "adrenal_left",
}
#: CHAOS MR ground-truth PNG intensities (CHAOS challenge data description): organ -> (nominal, low, high).
CHAOS_MR_RANGES = {"liver": (63, 55, 70), "kidney_right": (126, 110, 135), "kidney_left": (189, 175, 200),
                   "spleen": (252, 240, 255)}

#: SSL-ALPNet's 5 folds: patients sorted by numeric id, cut into 5 contiguous blocks at these separators
#: (``_SEP`` in SSL-ALPNet's dataloaders/dataset_utils.py: [0, 6, 12, 18, 24, 30] for 30 CT scans, [0, 4, 8, 12,
#: 16, 20] for 20 MR scans, i.e. floor(linspace(0, n, 6))); fold f tests block f and takes its 1-shot support
#: scan from the next patient after the block (circularly: ``get_scanids`` in dataloaders/ManualAnnoDatasetv2.py,
#: ``support_idx`` [6] / [4] in its examples/*.sh), which is not a query; the other patients train.
N_FOLDS = 5


class PrepareError(ValueError):
    """The source is not in the expected layout or holds a bad file; the message names each file and problem."""


class PrepareUsageError(PrepareError):
    """Options that cannot work whatever the data (``--shots 0``): a wrong command line, exit status 2."""


@dataclass
class Converted:
    """One patient, ready to write: image (X, Y, Z), label (X, Y, Z) uint8 in `ORGANS` values, one affine."""

    image: np.ndarray
    label: np.ndarray
    affine: np.ndarray
    sources: list[str]
    warnings: list[str] = field(default_factory=list)


@dataclass
class Recipe:
    """How to find the patients of one dataset and convert each one."""

    description: str
    modality: str
    intensities: str
    source_layout: str
    label_mapping: dict[str, str]
    expected_patients: int
    find: Callable[[Path], tuple[list[tuple[str, tuple[Path, ...]]], list[str]]]
    convert: Callable[..., Converted]


# ------------------------------------------------------------------------------------------------ helpers
def _numeric_order(ids: Sequence[str]) -> list[str]:
    """Patient ids sorted as SSL-ALPNet sorts them: by number when every id is a number, else by name."""
    if all(i.isdigit() for i in ids):
        return sorted(ids, key=lambda i: (int(i), i))
    return sorted(ids)


def _compact(data: np.ndarray) -> np.ndarray:
    """int16 when every value is an integer in its range (CT in HU, most MR), else float32."""
    if np.issubdtype(data.dtype, np.integer) or np.all(np.mod(data, 1) == 0):
        if data.size and data.min() >= -32768 and data.max() <= 32767:
            return data.astype(np.int16)
    return data.astype(np.float32)


def _write_nifti(path: Path, data: np.ndarray, affine: np.ndarray) -> None:
    """Write a gzipped NIfTI atomically (complete or absent), sform and qform both set to ``affine``."""
    img = nib.Nifti1Image(data, affine)
    img.set_sform(affine, code=1)
    img.set_qform(affine, code=1)
    img.header.set_xyzt_units("mm")
    with atomic_open(path, "wb") as f:
        f.write(gzip.compress(img.to_bytes(), compresslevel=6, mtime=0))


def _write_json(path: Path, obj: Any) -> None:
    with atomic_open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1)
        f.write("\n")


def _integer_values(data: np.ndarray, path: Path) -> np.ndarray:
    """The label array as int64; `PrepareError` on non-integer or negative values."""
    if np.issubdtype(data.dtype, np.floating):
        frac = ~np.isfinite(data) | (data != np.round(data))
        if frac.any():
            raise PrepareError(f"{path}: label map with non-integer values (e.g. {data[frac].flat[0]!r}); "
                               "expected the integer BTCV labels 0-13 - use the original label file")
    out = np.asarray(data).astype(np.int64)
    if out.size and out.min() < 0:
        raise PrepareError(f"{path}: label map with negative values (min {out.min()}); expected BTCV labels 0-13")
    return out


# ------------------------------------------------------------------------------------------------ synapse
def _find_synapse(source: Path) -> tuple[list[tuple[str, tuple[Path, ...]]], list[str]]:
    """(patient id, (image, label)) for every ``img/imgNNNN.nii.gz`` with its label, and a problem for every unpaired
    file (reported together with the conversion's problems)."""
    img_dir, lbl_dir = source / "img", source / "label"
    if not img_dir.is_dir() or not lbl_dir.is_dir():
        raise PrepareError(
            f"{source}: expected the Synapse/BTCV layout img/img0001.nii.gz ... and label/label0001.nii.gz ... "
            f"(missing {'img/' if not img_dir.is_dir() else 'label/'}); the download unpacks to RawData/Training/ - "
            "give that folder")

    problems: list[str] = []
    shared: set[str] = set()

    def ids(folder: Path, prefix: str) -> dict[str, Path]:
        found: dict[str, list[Path]] = {}
        for p in sorted(folder.iterdir()):
            m = re.fullmatch(prefix + r"(\d+)\.nii(\.gz)?", p.name)
            if m:
                found.setdefault(m.group(1), []).append(p)
        # one case number in two files (img0002.nii and img0002.nii.gz, img1 and img0001) was two patients, or the
        # .gz silently won (a review): a copy of one scan could sit in training and test
        shared.update(_shared_numbers(found, problems))
        return {i: paths[0] for i, paths in found.items() if i not in shared}

    images, labels = ids(img_dir, "img"), ids(lbl_dir, "label")
    if not images:
        raise PrepareError(f"{img_dir}: no image named img<number>.nii.gz (the Synapse/BTCV layout)")
    problems += [f"{images[i]}: no label map label{i}.nii.gz in {lbl_dir} (missing label for this image)"
                 for i in sorted(set(images) - set(labels) - shared)]
    problems += [f"{labels[i]}: label map without its image img{i}.nii.gz in {img_dir}"
                 for i in sorted(set(labels) - set(images) - shared)]
    return [(i, (images[i], labels[i])) for i in _numeric_order(list(images)) if i in labels], problems


def _convert_synapse(image_path: Path, label_path: Path) -> Converted:
    """One BTCV scan: the image as stored (HU), the label reduced to `ORGANS` on the image's grid."""
    def read(path: Path) -> tuple[SpatialImage, np.ndarray]:
        """The volume and its array; a file that cannot be read is named alone (a truncated image was blamed on its
        label map too; a review)."""
        try:
            # nib.load is typed as any image file; these are volumes (NIfTI), with an array and an affine
            vol = cast(SpatialImage, nib.load(path))
            return vol, np.asanyarray(vol.dataobj)
        except Exception as e:
            raise PrepareError(f"{path}: cannot read ({type(e).__name__}: {e}); the file is corrupt or truncated - "
                               "download it again") from e

    (img, data), (lab, lab_data) = read(image_path), read(label_path)
    for path, arr in ((image_path, data), (label_path, lab_data)):
        if arr.ndim != 3:
            raise PrepareError(f"{path}: {arr.ndim}D array of shape {arr.shape}; a 3D volume is expected")
    affine = np.asarray(img.affine, dtype=np.float64)
    mismatch = grid_mismatch(data.shape, affine, lab_data.shape, np.asarray(lab.affine, dtype=np.float64))
    if mismatch:
        fix = grid_fix(data.shape, affine, lab_data.shape, np.asarray(lab.affine, dtype=np.float64))
        raise PrepareError(f"{label_path}: not on the voxel grid of {image_path.name} ({mismatch}); {fix}")
    # the same grid possibly stored with flipped/permuted axes: bring it into the image's axis order
    lab_data = apply_orientation(lab_data, ornt_transform(io_orientation(lab.affine), io_orientation(affine)))
    values = _integer_values(lab_data, label_path)
    unknown = sorted(set(np.unique(values).tolist()) - set(BTCV_LABELS) - {0})
    if unknown:
        raise PrepareError(f"{label_path}: unknown label value(s) {unknown[:10]}; BTCV labels are 0-13 "
                           f"({', '.join(f'{v} {n}' for v, n in BTCV_LABELS.items())})")
    lut = np.zeros(max(BTCV_LABELS) + 1, dtype=np.uint8)
    for v, name in BTCV_LABELS.items():
        lut[v] = VALUE.get(name, 0)
    label = lut[values]
    warnings = []
    finite = np.isfinite(data)
    if not finite.all():
        raise PrepareError(f"{image_path}: {int((~finite).sum())} NaN or infinite voxel(s); repair or exclude the "
                           "scan (training refuses such images)")
    if data.size and float(data.min()) >= 0:
        warnings.append(f"{image_path}: smallest value {float(data.min()):g} >= 0: not HU? (air is about -1000 HU "
                        "in BTCV); the CT window of the data config assumes HU")
    return Converted(_compact(np.asarray(data)), label, affine, [str(image_path), str(label_path)], warnings)


# ------------------------------------------------------------------------------------------------ CHAOS MR
def _find_chaos(source: Path) -> tuple[list[tuple[str, tuple[Path, ...]]], list[str]]:
    """(patient id, (DICOM folder, Ground folder)) for every ``MR/<id>/T2SPIR``, and a problem for every missing
    folder (reported together with the conversion's problems)."""
    mr = source / "MR"
    if not mr.is_dir():
        raise PrepareError(
            f"{source}: expected the CHAOS layout MR/<patient id>/T2SPIR/DICOM_anon/*.dcm and .../T2SPIR/Ground/*.png "
            "(no MR/ folder); the training download unpacks to CHAOS_Train_Sets/Train_Sets/ - give that folder")
    found, problems = [], []
    for patient in sorted(p for p in mr.iterdir() if p.is_dir() and not p.name.startswith(".")):
        t2 = patient / "T2SPIR"
        dcm, ground = t2 / "DICOM_anon", t2 / "Ground"
        if not dcm.is_dir() or not any(_dicom_files(dcm)):
            problems.append(f"{dcm}: no DICOM slices (*.dcm) of the T2-SPIR series")
        elif not ground.is_dir() or not any(_png_files(ground)):
            problems.append(f"{ground}: no ground-truth PNG files (missing label for the series in {dcm})")
        else:
            found.append((patient.name, (dcm, ground)))
    if not found and not problems:
        raise PrepareError(f"{mr}: no patient folder MR/<patient id>/T2SPIR")
    shared = _shared_numbers({pid: [dcm.parent.parent] for pid, (dcm, _) in found}, problems)  # MR/1 and MR/01 (a review)
    paths = {pid: folders for pid, folders in found if pid not in shared}
    order = _numeric_order(list(paths))
    return [(pid, paths[pid]) for pid in order], problems


def _shared_numbers(places: dict[str, list[Path]], problems: list[str]) -> set[str]:
    """The case ids (of ``places``: id -> the files or folders that carry it) whose number is in more than one place:
    two files of one id, or ids of one number (``1``, ``01``, ``0001``); a problem for each such number, naming
    every place."""
    by_number: dict[int | str, list[str]] = {}
    for i in places:
        by_number.setdefault(int(i) if i.isdigit() else i, []).append(i)
    shared: set[str] = set()
    for ids in by_number.values():
        where = [str(p) for i in ids for p in places[i]]
        if len(where) > 1:
            problems.append(f"{' and '.join(where)}: one case number in {len(where)} places (a copy, or two numberings "
                            "of one case?); keep one, so that a scan cannot be in training and test at once")
            shared.update(ids)
    return shared


def _dicom_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() == ".dcm" and not p.name.startswith("."))


def _png_files(folder: Path) -> list[Path]:
    """The PNGs in slice order: by the last number in the name (CHAOS: IMG-0004-00012.png), then the name."""
    def key(p: Path) -> tuple[int, str]:
        number = _last_number(p)
        return (-1 if number is None else number, p.name)

    return sorted((p for p in folder.iterdir() if p.suffix.lower() == ".png" and not p.name.startswith(".")), key=key)


def _last_number(path: Path) -> int | None:
    nums = re.findall(r"\d+", path.stem)
    return int(nums[-1]) if nums else None


def _check_png_numbers(pngs: list[Path], files: list[Path], ground_dir: Path, dcm_dir: Path) -> None:
    """The PNGs are matched to the slices by the number in their names (`_pair_pngs`; CHAOS: IMG-0004-00012.png for
    IMG-0004-00012.dcm). A PNG without a number, or numbers that the DICOM file names do not have (one PNG missing
    and a stray one added keeps the count), would put the labels on the wrong slices, silently.

    Raises:
        PrepareError: naming the first PNG that cannot be matched."""
    numbers = [_last_number(p) for p in pngs]
    if None in numbers:
        raise PrepareError(f"{pngs[numbers.index(None)]}: no slice number in the file name (CHAOS: IMG-0004-00012.png); "
                           "the ground-truth PNGs are matched to the slices by that number")
    dicom = [_last_number(p) for p in files]
    if None in dicom or len(set(dicom)) != len(dicom):
        # DICOM files named without distinct numbers: only the order can match them, as `_pair_pngs` does (names that
        # shared one number passed when it was 1, by chance, and were refused when it was 0: a review)
        return
    dicom_file = {n: p for n, p in zip(dicom, files, strict=True) if n is not None}  # every one (checked above)
    png_numbers = {n: p for n, p in zip(numbers, pngs, strict=True) if n is not None}  # every one (checked above)
    missing = sorted(set(dicom_file) - set(png_numbers))
    extra = sorted(set(png_numbers) - set(dicom_file))
    if missing or extra or len(png_numbers) != len(pngs):
        said = []
        if missing:
            said.append(f"no PNG numbered {missing[0]} (for {dicom_file[missing[0]].name})"
                        + (f" and {len(missing) - 1} more" if len(missing) > 1 else ""))
        if len(png_numbers) != len(pngs):
            said.append("two PNGs with one number")
        if extra:
            said.append(f"{png_numbers[extra[0]].name} matches no slice")
        raise PrepareError(f"{ground_dir}: the PNG numbers do not match the DICOM slices of {dcm_dir}: "
                           + ", and ".join(said) + "; CHAOS has one PNG per slice, numbered as its DICOM file")


def _pair_pngs(files: list[Path], by_instance: list[Path], pngs: list[Path],
               dcm_dir: Path) -> tuple[dict[str, Path], list[str]]:
    """Each DICOM file's PNG: the PNG of its own number when every DICOM file name carries a distinct number (CHAOS
    names a slice's PNG as its DICOM file: IMG-0004-00012.png for IMG-0004-00012.dcm; `_check_png_numbers` checked
    that the numbers match), else the PNG of the same rank in InstanceNumber order. A warning when the two rules
    disagree (file numbers that do not follow InstanceNumber): the file names decide."""
    by_rank = {str(p): png for p, png in zip(by_instance, pngs, strict=True)}
    numbers = [_last_number(p) for p in files]
    if None in numbers or len(set(numbers)) != len(numbers):
        return by_rank, []
    png_by_number = {_last_number(png): png for png in pngs}
    by_name = {str(p): png_by_number[n] for p, n in zip(files, numbers, strict=True)}
    if by_name == by_rank:
        return by_name, []
    differ = sum(by_name[k] != by_rank[k] for k in by_name)
    return by_name, [f"{dcm_dir}: the DICOM file numbers do not follow InstanceNumber ({differ} of {len(files)} "
                     "slice(s) would pair differently); each PNG was matched to the DICOM file of its own number"]


def _instance_number(path: Path) -> int:
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["InstanceNumber"])
        return int(ds.InstanceNumber)
    except Exception as e:
        raise PrepareError(f"{path}: no readable InstanceNumber ({type(e).__name__}: {e}); the PNG ground truth "
                           "is matched to the slices in InstanceNumber order") from e


def _read_png(path: Path) -> np.ndarray:
    """A ground-truth PNG as a (rows, columns) integer array."""
    try:
        with Image.open(path) as im:
            arr = np.asarray(im.convert("L") if im.mode in ("P", "LA", "1") else im)
    except Exception as e:
        raise PrepareError(f"{path}: cannot read the PNG ({type(e).__name__}: {e})") from e
    if arr.ndim == 3:
        if not all(np.array_equal(arr[..., 0], arr[..., i]) for i in range(1, min(arr.shape[2], 3))):
            raise PrepareError(f"{path}: a colour PNG; CHAOS ground truth is grey-level (one intensity per organ)")
        arr = arr[..., 0]
    return arr.astype(np.int64)


def chaos_png_labels(arr: np.ndarray, path: Path | str) -> np.ndarray:
    """CHAOS MR PNG intensities -> `ORGANS` values; `PrepareError` naming the first pixel of an unknown intensity."""
    out = np.zeros(arr.shape, dtype=np.uint8)
    known = arr == 0
    for organ, (_nominal, lo, hi) in CHAOS_MR_RANGES.items():
        hit = (arr >= lo) & (arr <= hi)
        out[hit] = VALUE[organ]
        known |= hit
    if not known.all():
        bad = np.argwhere(~known)
        r, c = (int(v) for v in bad[0])
        ranges = ", ".join(f"{o} {n} ({lo}-{hi})" for o, (n, lo, hi) in CHAOS_MR_RANGES.items())
        raise PrepareError(f"{path}: unknown PNG intensity {int(arr[r, c])} at row {r}, column {c} ({len(bad)} pixel(s) "
                           f"outside the CHAOS MR ranges: background 0, {ranges})")
    return out


def _convert_chaos(dcm_dir: Path, ground_dir: Path) -> Converted:
    """One CHAOS T2-SPIR series and its PNGs on one voxel grid (the DICOM geometry)."""
    files, pngs = _dicom_files(dcm_dir), _png_files(ground_dir)
    # the DICOM files are read and the PNG numbers matched before the counts are compared: a damaged or duplicated
    # DICOM file, or a missing PNG, is then named, where the count named only the Ground folder (a review)
    try:
        headers = [read_header(str(p)) for p in files]
        # a file cut inside its header has no series UID: `order_series` names it, where it counted as a second
        # series, unnamed (a review)
        uids = {h.series_uid for h in headers if h.series_uid}
        if len(uids) > 1:
            raise PrepareError(f"{dcm_dir}: DICOM files of {len(uids)} series (SeriesInstanceUID); the T2SPIR folder "
                               "should hold one series")
        series = order_series(headers, min_slices=1)
        volume = load_series_array(series)
    except (DicomError, DicomSeriesError) as e:
        raise PrepareError(str(e)) from e
    number = {p: _instance_number(p) for p in files}
    by_instance = sorted(files, key=lambda p: (number[p], p.name))
    numbers = [number[p] for p in by_instance]
    if len(set(numbers)) != len(numbers):
        dup = next(n for n in numbers if numbers.count(n) > 1)
        raise PrepareError(f"{dcm_dir}: InstanceNumber {dup} appears on more than one slice; the PNGs cannot be "
                           "matched to the slices")
    _check_png_numbers(pngs, files, ground_dir, dcm_dir)
    if len(pngs) != len(files):  # file names without distinct numbers: only the count can tell
        raise PrepareError(f"{ground_dir}: {len(pngs)} ground-truth PNG file(s) for {len(files)} DICOM slice(s) in "
                           f"{dcm_dir}; CHAOS has one PNG per slice - is a file missing or extra?")
    png_of, warnings = _pair_pngs(files, by_instance, pngs, dcm_dir)
    label = np.zeros(series.shape, dtype=np.uint8)
    for k, h in enumerate(series.headers):  # k: the geometric position of the slice, as in `volume`
        png = png_of[str(Path(h.path))]
        arr = _read_png(png)
        if arr.shape != (h.rows, h.columns):
            raise PrepareError(f"{png}: PNG size {arr.shape[1]}x{arr.shape[0]} (columns x rows), but its DICOM slice "
                               f"{h.path} is {h.columns}x{h.rows}")
        label[:, :, k] = chaos_png_labels(arr, png).T  # PNG (row r, column c) -> voxel (c, r, k), as the image
    return Converted(_compact(volume), label, np.asarray(series.affine, dtype=np.float64),
                     [str(dcm_dir), str(ground_dir)], warnings)


DATASETS: dict[str, Recipe] = {
    "synapse": Recipe(
        description="Synapse / BTCV multi-organ abdominal CT (SSL-ALPNet Abd-CT), liver, spleen and kidneys",
        modality="CT",
        intensities="HU, as stored in the source NIfTI",
        source_layout="img/img<id>.nii.gz and label/label<id>.nii.gz (BTCV RawData/Training)",
        label_mapping={f"{v} {n}": f"{VALUE[n]} {n}" if n in VALUE else "0 background" for v, n in BTCV_LABELS.items()},
        expected_patients=30,
        find=_find_synapse,
        convert=_convert_synapse,
    ),
    "chaos_mr": Recipe(
        description="CHAOS T2-SPIR abdominal MR (SSL-ALPNet Abd-MRI), liver, spleen and kidneys",
        modality="MR",
        intensities="MR signal as stored in the DICOM files (RescaleSlope/Intercept applied)",
        source_layout="MR/<patient id>/T2SPIR/DICOM_anon/*.dcm and MR/<patient id>/T2SPIR/Ground/*.png, one PNG per "
                      "slice, numbered as its DICOM file (CHAOS_Train_Sets/Train_Sets)",
        label_mapping={"PNG 0": "0 background",
                       **{f"PNG {lo}-{hi} (nominal {n})": f"{VALUE[o]} {o}" for o, (n, lo, hi) in CHAOS_MR_RANGES.items()}},
        expected_patients=20,
        find=_find_chaos,
        convert=_convert_chaos,
    ),
}


# ------------------------------------------------------------------------------------------------ folds
def ssl_alpnet_folds(ids: Sequence[str], files: dict[str, str], expected: int) -> dict[str, Any]:
    """SSL-ALPNet's 5-fold split of ``ids`` (see `N_FOLDS`); ``files`` maps a patient to its image path."""
    order = _numeric_order(list(ids))
    n = len(order)
    sep = [int(s) for s in np.floor(np.linspace(0, n, N_FOLDS + 1))]
    folds = []
    for f in range(N_FOLDS):
        test = order[sep[f]:sep[f + 1]]
        support = order[sep[f + 1] % n] if test and n > len(test) else None
        train = [p for p in order if p not in test and p != support]
        folds.append({"fold": f, "test": test, "support": support, "train": train,
                      "test_images": [files[p] for p in test], "support_image": files.get(support) if support is not None else None})
    return {
        "generator": GENERATOR,
        "scheme": "SSL-ALPNet 5-fold cross-validation (Ouyang et al., ECCV 2020)",
        "rule": "patients sorted by numeric id; fold f tests the contiguous block order[sep[f]:sep[f+1]] with "
                "sep = floor(linspace(0, n, 6)); its 1-shot support scan is the next patient after the block "
                "(circularly), never a query; every other patient trains",
        "source": "SSL-ALPNet code (github.com/cheng-01037/Self-supervised-Fewshot-Medical-Image-Segmentation): "
                  "dataloaders/dataset_utils.py _SEP, dataloaders/ManualAnnoDatasetv2.py get_scanids, "
                  "examples/*.sh support_idx",
        "exact": n == expected,
        "note": (f"{n} patients as in SSL-ALPNet: these are its fold lists" if n == expected else
                 f"{n} patients, SSL-ALPNet used {expected}: the same rule applied to these patients, not its lists"
                 + ("".join(f"; fold {f['fold']} has no test patient" for f in folds if not f["test"]))),
        "order": order,
        "separators": sep,
        "folds": folds,
    }


# ------------------------------------------------------------------------------------------------ prepare
def _check_out(out: Path, dataset: str) -> list[str]:
    """Files an earlier prepare of the same dataset wrote into ``out`` (to replace); refuse any other folder."""
    marker = out / "prepare.json"
    if marker.is_file():
        try:
            earlier = json.loads(marker.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise PrepareError(f"{marker}: unreadable ({e}); remove the folder {out} and prepare again") from e
        if earlier.get("dataset") != dataset:
            raise PrepareError(f"{out}: holds a prepared {earlier.get('dataset')!r} dataset, not {dataset!r}; "
                               "choose another --out folder")
        return [str(f) for f in earlier.get("files", [])]
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise PrepareError(f"{out}: exists and is not an empty folder nor an earlier prepare output; choose an empty "
                           "or new --out folder")
    return []


def prepare(dataset: str, source: Path, out: Path) -> dict[str, Any]:
    """Convert a downloaded benchmark into a folder the scanner indexes with organ names (see the module doc).

    Args:
        dataset: a key of `DATASETS` (``synapse`` or ``chaos_mr``).
        source: the downloaded folder, in the layout of that dataset.
        out: the folder to write (new, empty, or an earlier output of the same dataset, which is replaced).

    Returns:
        The content of ``out/prepare.json``: counts, label mapping, layouts, folds, warnings.

    Raises:
        PrepareError: an unknown dataset, a source not in the layout, or bad files (every problem listed).
    """
    if dataset not in DATASETS:
        raise PrepareError(f"unknown dataset {dataset!r}; choose from {sorted(DATASETS)}")
    recipe = DATASETS[dataset]
    source, out = Path(source).expanduser().resolve(), Path(out).expanduser().resolve()
    if not source.is_dir():
        raise PrepareError(f"{source}: not a folder; give the folder of the downloaded {dataset} data")
    patients, missing = recipe.find(source)  # reads the source only: a source in another layout is said first
    if out == source or source in out.parents:  # a rerun read the prepared files as source (a review)
        raise PrepareError(f"--out {out} lies inside the source folder {source}; a second run would read the "
                           "prepared files as part of the download: give an output folder outside it")
    with exclusive(out):  # one prepare at a time per output folder
        earlier = _check_out(out, dataset)
        # written beside `out`, moved in only when every patient converted: a failed run leaves `out` as it was
        with staging_folder(out) as staging:
            records, problems = _convert_all(dataset, recipe, patients, staging, failed=bool(missing))
            problems = missing + problems
            if problems:
                raise PrepareError(f"{len(problems)} problem(s) in {source}; nothing was prepared:\n" + "\n".join(problems))
            written = [f for r in records for f in (r["image"], r["label"])]
            # and files of an earlier run whose patient is gone go
            install_marked(staging, out, dataset, written, earlier, DESCRIPTION_FILES)
        return _write_descriptions(dataset, recipe, source, out, records, written)


@contextlib.contextmanager
def exclusive(out: Path) -> Iterator[None]:
    """Hold an exclusive lock on the output folder ``out`` (a hidden file beside it, removed again) while a prepare
    writes it: two runs into one folder deleted each other's staging folder and marker (a review: raw "No such
    file" errors, or exit 0 with an incomplete output). Where the platform has no ``fcntl`` (Windows), nothing is
    locked.

    Raises:
        PrepareError: another process holds the lock.
    """
    locks: Any
    try:
        import fcntl as locks
    except ImportError:  # Windows: no locks
        locks = None
    created = [p for p in reversed(out.parents) if not p.exists()]  # removed again if the run leaves them empty
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise PrepareError(f"{out}: cannot create its folder {out.parent} ({e.strerror}); give another --out") from None
    try:
        with _held(out, locks) if locks is not None else contextlib.nullcontext():
            yield
    finally:
        for folder in reversed(created):  # a failed run leaves no new empty folders above its output
            try:
                folder.rmdir()
            except OSError:
                break


@contextlib.contextmanager
def _held(out: Path, fcntl: Any) -> Iterator[None]:
    """The lock of `exclusive` (``fcntl``: the module), taken on a file beside ``out`` and removed when released."""
    lock = out.parent / f".{out.name}.lock"
    while True:
        try:
            handle = open(lock, "a")
        except OSError as e:
            raise PrepareError(f"{out}: cannot write in {out.parent} ({e.strerror}); give another --out") from None
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.close()
            raise PrepareError(f"{out}: another prepare is writing this folder now; wait for it to finish, or give "
                               "another --out") from None
        try:  # the file locked must still be the one at the path (its holder removes it when it is done)
            if os.stat(lock).st_ino == os.fstat(handle.fileno()).st_ino:
                break
        except FileNotFoundError:
            pass
        handle.close()
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)  # while still held: a waiting process then finds another file, or none
        handle.close()


@contextlib.contextmanager
def staging_folder(out: Path) -> Iterator[Path]:
    """A new folder beside ``out`` to write into before the files move in, removed on leaving; under `exclusive`,
    the staging folders an earlier killed run left beside ``out`` are removed first."""
    # only this output's: `.<name>.partial` (earlier versions) or `.<name>.<8 characters>.partial` (mkdtemp's),
    # never `.<name>.b.<...>.partial` of an output `<name>.b`, whose run holds another lock
    mine = re.compile(rf"^\.{re.escape(out.name)}\.(?:[A-Za-z0-9_]{{8}}\.)?partial$")
    for stale in (p for p in out.parent.iterdir() if mine.match(p.name)):
        shutil.rmtree(stale, ignore_errors=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def install_marked(staging: Path, out: Path, dataset: str, written: Sequence[str], earlier: Iterable[str],
                   described: Iterable[str] = ()) -> None:
    """`install_staged`, after a provisional ``prepare.json`` (``"complete": false``) that names every file this run
    and the earlier one write (and ``described``: what is written after the install): a run stopped while
    installing left files but no marker, and the next run refused the folder as not its own. The run's own
    summary replaces the marker last; until then the scanner refuses the folder as incomplete
    (`datamodules.indexing.scan`)."""
    earlier = list(earlier)
    out.mkdir(parents=True, exist_ok=True)
    _write_json(out / "prepare.json", {"dataset": dataset, "complete": False,
                                       "files": sorted(set(written) | set(earlier) | set(described))})
    install_staged(staging, out, written, earlier)


def install_staged(staging: Path, out: Path, written: Sequence[str], earlier: Iterable[str]) -> None:
    """Move the files ``written`` (paths relative to both folders) from ``staging`` into ``out``, then delete the
    files of an earlier run, ``earlier``, that this run did not write."""
    for f in written:
        (out / f).parent.mkdir(parents=True, exist_ok=True)
        os.replace(staging / f, out / f)
    for f in set(earlier) - set(written):
        (out / f).unlink(missing_ok=True)


def _convert_all(dataset: str, recipe: Recipe, patients: list[tuple[str, tuple[Path, ...]]],
                 staging: Path, failed: bool = False) -> tuple[list[dict[str, Any]], list[str]]:
    """Convert every patient into ``staging``: (a record per patient converted, the problems found). With
    ``failed`` (problems were found before) every patient is still checked, and nothing is written."""
    problems: list[str] = []
    records = []
    for pid, paths in patients:
        try:
            conv = recipe.convert(*paths)
        except PrepareError as e:
            problems.append(str(e))
            continue
        counts = {ORGANS[v]: int(np.count_nonzero(conv.label == v)) for v in ORGANS}
        if not any(counts.values()):
            problems.append(f"{conv.sources[-1]}: none of {', '.join(ORGANS.values())} is labelled")
            continue
        if failed or problems:  # the run fails anyway: check the other patients, write nothing more
            continue
        image, label = f"imagesTr/{dataset}_{pid}.nii.gz", f"labelsTr/{dataset}_{pid}.nii.gz"
        _write_nifti(staging / image, conv.image, conv.affine)
        _write_nifti(staging / label, conv.label, conv.affine)
        for w in conv.warnings:
            logger.warning(w)
        logger.info("%s: %s, %s", pid, image, ", ".join(f"{k} {v}" for k, v in counts.items()))
        records.append({"id": pid, "image": image, "label": label, "shape": list(conv.image.shape),
                        "spacing": [round(float(s), 6) for s in np.linalg.norm(conv.affine[:3, :3], axis=0)],
                        "organ_voxels": counts, "sources": conv.sources, "warnings": conv.warnings})
    return records, problems


#: what `_write_descriptions` writes besides prepare.json
DESCRIPTION_FILES = {"dataset.json", "folds.json"}


def _write_descriptions(dataset: str, recipe: Recipe, source: Path, out: Path, records: list[dict],
                        written: list[str]) -> dict[str, Any]:
    """Write dataset.json, folds.json and (last: it marks a complete output) prepare.json."""
    _write_json(out / "dataset.json", {
        "name": dataset,
        "description": recipe.description,
        "modality": {"0": recipe.modality},
        "labels": {"0": "background", **{str(v): n for v, n in ORGANS.items()}},
        "numTraining": len(records),
        "training": [{"image": f"./{r['image']}", "label": f"./{r['label']}"} for r in records],
        "test": [],
    })
    folds = ssl_alpnet_folds([r["id"] for r in records], {r["id"]: r["image"] for r in records},
                             recipe.expected_patients)
    _write_json(out / "folds.json", folds)
    summary: dict[str, Any] = {
        "generator": GENERATOR,
        "dataset": dataset,
        "description": recipe.description,
        "source": str(source),
        "source_layout": recipe.source_layout,
        "output_layout": "Decathlon: dataset.json (label names, training pairs), imagesTr/, labelsTr/; folds.json",
        "modality": recipe.modality,
        "intensities": recipe.intensities,
        "labels": {str(v): n for v, n in ORGANS.items()},
        "label_mapping": recipe.label_mapping,
        "patients": len(records),
        "expected_patients": recipe.expected_patients,
        "organ_voxels": {o: sum(r["organ_voxels"][o] for r in records) for o in ORGANS.values()},
        "folds": {"file": "folds.json", "exact": folds["exact"], "note": folds["note"]},
        "files": written,
        "warnings": [w for r in records for w in r["warnings"]],
        "cases": records,
    }
    if len(records) != recipe.expected_patients:
        summary["warnings"].append(f"{len(records)} patients; SSL-ALPNet's {dataset} benchmark has "
                                   f"{recipe.expected_patients}")
    _write_json(out / "prepare.json", summary)
    return summary


# ------------------------------------------------------------------------------------------------ command
def add_arguments(p: argparse.ArgumentParser) -> None:
    from datamodules.recipes import medmnist  # it imports this module: not at the top

    p.add_argument("dataset", choices=[*sorted(DATASETS), medmnist.DATASET],
                   help="synapse (BTCV Abd-CT), chaos_mr (CHAOS T2-SPIR Abd-MRI) or medmnist (MedMNIST 2D .npz files: "
                        "a data config and fixed few-shot test episodes)")
    p.add_argument("source", nargs="+", help="the downloaded folder: RawData/Training (synapse), "
                                             "CHAOS_Train_Sets/Train_Sets (chaos_mr); medmnist: a folder of .npz "
                                             "files, or the files")
    p.add_argument("--out", default=None, help="folder to write (default: data/<dataset>_prepared, the data "
                                              "configs' root)")
    medmnist.add_arguments(p)


def run(args: argparse.Namespace) -> int:
    from datamodules.recipes import medmnist

    if args.dataset == medmnist.DATASET:
        return medmnist.run(args)
    wrong = medmnist.options_given(args)
    if len(args.source) != 1 or wrong:
        print(f"imaging-meta prepare: {args.dataset} takes one source folder ({len(args.source)} given)" if not wrong
              else f"imaging-meta prepare: {', '.join(wrong)} apply to medmnist only, not {args.dataset}", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else Path("data") / f"{args.dataset}_prepared"
    try:
        summary = prepare(args.dataset, Path(args.source[0]), out)
    except PrepareError as e:  # bad input data: 1, as every command (2 is for a wrong command line)
        print(f"imaging-meta prepare: {e}", file=sys.stderr)
        return 1
    print(f"{summary['patients']} patients of {args.dataset} prepared in {out} "
          f"({', '.join(f'{o}: {n} voxels' for o, n in summary['organ_voxels'].items())})")
    for w in summary["warnings"]:
        print(f"warning: {w}", file=sys.stderr)
    print(f"folds: {out / 'folds.json'} ({summary['folds']['note']})")
    return 0


def _terminated(signum: int, frame: object) -> None:
    """SIGTERM (a scheduler's stop) as an exception, so that the staging folder and the lock are removed on the way
    out, as `imaging-meta prepare` removes them (this entry point left them; a review)."""
    raise SystemExit(128 + signum)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m datamodules.recipes.prepare", description=__doc__.split("\n")[0])
    add_arguments(parser)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parser.parse_args(argv)
    previous = signal.signal(signal.SIGTERM, _terminated)
    try:
        return run(args)
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    raise SystemExit(main())
