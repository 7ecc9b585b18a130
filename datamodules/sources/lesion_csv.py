"""A lesion table over 3D volumes (a CSV file) as an `ItemTable` of resampled patches.

The CSV file, one row per lesion::

    image,class,x,y,z,size_mm
    ct_northfield/pat01/CT,haemangioma,-58.65,29.18,-313.34,14.8
    mr_bids/sub-01/anat/sub-01_T1w.nii.gz,cyst,41.20,-12.02,-330.10,9.5

Columns:

* ``image`` (required): a NIfTI file or a DICOM series folder (or one slice file of the series: the way to name
  one series of a folder that holds several), relative to ``root`` (default: the CSV's folder).
* ``class`` (required): the lesion class name.
* the lesion centre ``x, y, z``, or a box ``x_min, y_min, z_min, x_max, y_max, z_max`` whose centre is used:
  world coordinates in mm, DICOM patient coordinates (``coordinates="LPS"``, the default; what a DICOM
  viewer shows) or NIfTI scanner coordinates (``"RAS"``: x and y negated).
* optional ``size_mm`` (a positive diameter, checked and otherwise informative), ``patient`` and ``site``
  (they override the header-derived ones; patient values are pseudonymised with the salt; every row of one
  image must give the same, or leave it blank on all of them, and one centre of an image has one class: rows
  that contradict each other are refused, naming the lines). Other columns (e.g. ``organ``) are ignored.

Patients and sites come from scanning ``root`` with `datamodules.indexing.scan` (header-derived pseudonymous patient,
site key built from scanner fields), joined on the image path. Each volume is loaded once (MONAI
`LoadVolumed` + ``EnsureChannelFirstd`` + `CheckVolumed` + ``Orientationd("RAS")`` + `ModalityIntensityd`: CT
window or MR percentiles), and every lesion of it becomes a patch resampled in world space around its centre
(`extract_patches`: the patch grid's world coordinates are mapped through the inverse of the volume's affine
and sampled with trilinear interpolation, zero outside the volume), so voxel spacing and orientation
differences between sites do not change the patch geometry.

Patch axes follow the segmentation slices (`datamodules.transforms.volume.volume_transforms`): a 2D patch (H, W)
is axial, its H index growing along RAS +x (towards the patient's Right) and its W index along RAS +y
(towards Anterior); a 3D patch (D, H, W) adds D along +z (towards Superior).

Item ids are ``<case id>#<line>`` (the CSV line number of the row; the header is line 1): pseudonymous,
never a file name. Errors name the CSV file and the line.
"""

from __future__ import annotations

import functools
import math
import os
import warnings
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.transforms import Compose, EnsureChannelFirstd, Orientationd

from datamodules.indexing.bids import sidecars_of
from datamodules.indexing.index import Case, Index
from datamodules.indexing.pseudonyms import normalise_modality, salt_or_env, unsaid_modality
from datamodules.indexing.scan import DEFAULT_SITE_FIELDS, pseudonym, scan_folder
from datamodules.io.dicom import is_nifti
from datamodules.io.folders import files_under
from datamodules.messages import first
from datamodules.sources.items import ItemSource, ItemTable
from datamodules.sources.lesion_rows import (
    MAX_LISTED,
    LesionRow,
    _check_consistent,
    _drop_duplicates,
    read_lesion_rows,
)
from datamodules.transforms.volume import CheckVolumed, LoadVolumed, ModalityIntensityd

__all__ = ["LesionCSV", "load_volume", "extract_patches", "lesion_patches", "to_ras"]

_LPS_TO_RAS = np.array([-1.0, -1.0, 1.0])


def to_ras(points: np.ndarray, coordinates: str = "LPS") -> np.ndarray:
    """World points (..., 3) in mm from ``coordinates`` ("LPS" or "RAS") to RAS."""
    coordinates = _check_coordinates(coordinates)
    points = np.asarray(points, dtype=np.float64)
    return points * _LPS_TO_RAS if coordinates == "LPS" else points.copy()


def _check_coordinates(coordinates: str) -> str:
    """``coordinates`` upper-cased; `ValueError` unless it is "LPS" or "RAS"."""
    c = str(coordinates).upper()
    if c not in ("LPS", "RAS"):
        raise ValueError(f"coordinates must be 'LPS' (DICOM patient coordinates) or 'RAS' (NIfTI world), got {coordinates!r}")
    return c


def _patch_settings(patch_size: Sequence[int], patch_spacing: Sequence[float] | None) -> tuple[list[int], list[float]]:
    """Checked patch size and spacing (default 1.5 mm in-plane, 3.0 mm through-plane)."""
    size = [int(s) for s in patch_size]
    if len(size) not in (2, 3) or min(size) < 1 or any(float(s) != float(p) for s, p in zip(size, patch_size, strict=True)):
        raise ValueError(f"patch_size must be [H, W] (2D axial) or [D, H, W] (3D) positive integers, got {list(patch_size)}")
    if patch_spacing is None:
        spacing = [3.0, 1.5, 1.5][3 - len(size):]
    else:
        spacing = [float(s) for s in patch_spacing]
        if len(spacing) != len(size) or not all(math.isfinite(s) and s > 0 for s in spacing):
            raise ValueError(
                f"patch_spacing must give one positive mm value per patch axis ({len(size)} for patch_size {size}), "
                f"got {list(patch_spacing)}; or leave it out for 1.5 mm in-plane and 3.0 mm through-plane"
            )
    return size, spacing


# ------------------------------------------------------------------------------------------ volumes
@functools.lru_cache(maxsize=8)
def _volume_loader(ct_window: tuple[float, ...], mr_percentiles: tuple[float, ...]) -> Compose:
    """The MONAI loading pipeline of `load_volume` (cached per intensity setting)."""
    return Compose([
        # MONAI tries the last reader first: NIfTI files never reach the DICOM reader
        LoadVolumed(["image"]),
        EnsureChannelFirstd(["image"]),
        CheckVolumed(["image"]),
        Orientationd(["image"], axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S"))),
        ModalityIntensityd("image", ct_window=ct_window, mr_percentiles=mr_percentiles),
    ])


def load_volume(
    image: str | os.PathLike | Sequence[str | os.PathLike],
    modality: str,
    ct_window: Sequence[float] = (-250.0, 250.0),
    mr_percentiles: Sequence[float] = (1.0, 99.0),
):
    """Load one volume as the lesion patches see it.

    Args:
        image: a NIfTI path, a DICOM series folder, or the DICOM slice files of one series.
        modality: "CT" (HU window) or anything else (MR: percentile scaling).
        ct_window: (lower, upper) HU window for CT.
        mr_percentiles: (lower, upper) percentiles for other modalities.

    Returns:
        A MONAI MetaTensor (1, X, Y, Z) float32 in [0, 1], in RAS orientation; ``.affine`` (4, 4) maps voxel
        indices to RAS world mm.
    """
    if isinstance(image, (list, tuple)):
        src: Any = [str(p) for p in image]
    else:
        src = str(image)
    tf = _volume_loader(tuple(float(v) for v in ct_window), tuple(float(v) for v in mr_percentiles))
    return tf({"image": src, "modality": modality})["image"]


def extract_patches(
    volume: torch.Tensor,
    affine: np.ndarray | torch.Tensor,
    centres_ras: np.ndarray,
    patch_size: Sequence[int] = (32, 32),
    patch_spacing: Sequence[float] | None = None,
) -> torch.Tensor:
    """Resample patches around world points, independent of the volume's voxel grid.

    The patch grid is built in world space (axes along RAS +x, +y and, for 3D patches, +z; voxel ``k`` of
    an axis of n at ``(k - (n - 1) / 2) * spacing`` mm from the centre), mapped to voxel coordinates with
    the inverse of ``affine``, and sampled trilinearly; points outside the volume read 0.

    Args:
        volume: (C, X, Y, Z) intensities.
        affine: (4, 4) voxel -> RAS world (mm) of ``volume``.
        centres_ras: (N, 3) patch centres, RAS mm.
        patch_size: [H, W] (axial 2D) or [D, H, W] (3D).
        patch_spacing: mm per patch voxel, one per axis; default 1.5 in-plane, 3.0 through-plane.

    Returns:
        (N, C, H, W) or (N, C, D, H, W) float32 patches.
    """
    size, spacing = _patch_settings(patch_size, patch_spacing)
    vol = volume.as_tensor() if hasattr(volume, "as_tensor") else torch.as_tensor(volume)  # drop MONAI metadata
    if vol.ndim != 4:
        raise ValueError(f"volume must be (C, X, Y, Z), got shape {tuple(vol.shape)}")
    centres = np.asarray(centres_ras, dtype=np.float64).reshape(-1, 3)
    n = len(centres)
    if n == 0:
        return torch.zeros((0, vol.shape[0], *size), dtype=torch.float32)
    aff = np.asarray(affine.detach().cpu().numpy() if isinstance(affine, torch.Tensor) else affine, dtype=np.float64)
    if aff.shape != (4, 4) or not np.all(np.isfinite(aff)) or abs(np.linalg.det(aff[:3, :3])) < 1e-12:
        raise ValueError(f"affine must be an invertible (4, 4) voxel-to-world matrix, got {aff.tolist()}")
    d, (h, w) = (size[0], size[1:]) if len(size) == 3 else (1, size)
    sd, sh, sw = spacing if len(size) == 3 else (0.0, *spacing)
    oz = (np.arange(d) - (d - 1) / 2) * sd
    ox = (np.arange(h) - (h - 1) / 2) * sh
    oy = (np.arange(w) - (w - 1) / 2) * sw
    gz, gx, gy = np.meshgrid(oz, ox, oy, indexing="ij")  # (D, H, W)
    offsets = np.stack([gx, gy, gz], -1)  # RAS mm
    world = centres[:, None, None, None, :] + offsets[None]  # (N, D, H, W, 3)
    inv = np.linalg.inv(aff)
    vox = world @ inv[:3, :3].T + inv[:3, 3]
    shape = np.array(vol.shape[1:], dtype=np.float64)
    norm = 2.0 * vox / np.maximum(shape - 1.0, 1.0) - 1.0  # align_corners=True
    grid = torch.from_numpy(norm[..., ::-1].copy()).to(torch.float32)  # grid_sample wants (z, y, x) -> (W_in, H_in, D_in)
    grid = grid.reshape(1, n * d, h, w, 3)
    out = F.grid_sample(vol[None].to(torch.float32), grid, mode="bilinear", padding_mode="zeros", align_corners=True)
    out = out[0].reshape(vol.shape[0], n, d, h, w).transpose(0, 1)  # (N, C, D, H, W)
    return (out if len(size) == 3 else out[:, :, 0]).contiguous()


def lesion_patches(
    image: str | os.PathLike | Sequence[str | os.PathLike],
    centres: np.ndarray,
    *,
    modality: str,
    coordinates: str = "LPS",
    patch_size: Sequence[int] = (32, 32),
    patch_spacing: Sequence[float] | None = None,
    ct_window: Sequence[float] = (-250.0, 250.0),
    mr_percentiles: Sequence[float] = (1.0, 99.0),
) -> torch.Tensor:
    """The patches of one volume's lesions, exactly as `LesionCSV.build` makes them.

    Args:
        image: NIfTI path, DICOM series folder, or the slice files of one series.
        centres: (N, 3) lesion centres in world mm, in ``coordinates``.
        modality: "CT" or another modality code (MR: percentile scaling).
        coordinates: "LPS" (DICOM patient) or "RAS" (NIfTI world).
        patch_size: [H, W] or [D, H, W].
        patch_spacing: mm per patch voxel; default 1.5 in-plane, 3.0 through-plane.
        ct_window: CT HU window.
        mr_percentiles: MR percentile range.

    Returns:
        (N, 1, H, W) or (N, 1, D, H, W) float32 patches in [0, 1].

    Raises:
        ValueError: a centre outside the volume (naming the image and the centre).
    """
    vol = load_volume(image, modality, ct_window, mr_percentiles)
    ras = to_ras(np.asarray(centres, dtype=np.float64).reshape(-1, 3), coordinates)
    affine = np.asarray(vol.affine, dtype=np.float64)
    outside = _outside(ras, affine, vol.shape[1:])
    if outside:
        k, vox = outside[0]
        raise ValueError(
            f"{image if not isinstance(image, (list, tuple)) else os.path.dirname(str(image[0]))}: centre {k} "
            f"{centres[k].tolist()} ({coordinates}) lies outside the volume (voxel {np.round(vox, 1).tolist()}, "
            f"shape {list(vol.shape[1:])}); check the coordinate convention"
        )
    return extract_patches(vol, affine, ras, patch_size, patch_spacing)


def _outside(ras: np.ndarray, affine: np.ndarray, shape: Sequence[int]) -> list[tuple[int, np.ndarray]]:
    """Indices (and voxel coordinates) of the centres that fall outside the voxel grid (half a voxel margin)."""
    inv = np.linalg.inv(affine)
    vox = ras @ inv[:3, :3].T + inv[:3, 3]
    bad = np.any((vox < -0.5) | (vox > np.asarray(shape, dtype=np.float64) - 0.5), axis=1)
    return [(int(k), vox[k]) for k in np.flatnonzero(bad)]


# ------------------------------------------------------------------------------------------ the CSV
def _first_file(case: Case) -> str:
    """The relative path the scan lists a case under in ``Index.own_patient``: the NIfTI file, or a DICOM series'
    first file."""
    return case.image if isinstance(case.image, str) else case.image[0]


def _case_keys(case: Case) -> list[str]:
    """The paths a CSV may use for a case: the NIfTI file; the series folder and each slice of a DICOM series."""
    if isinstance(case.image, str):
        return [Path(os.path.normpath(case.image)).as_posix()]
    files = [Path(os.path.normpath(f)).as_posix() for f in case.image]
    folders = {os.path.dirname(f) for f in files}
    return files + ([folders.pop()] if len(folders) == 1 else [])


class LesionCSV(ItemSource):
    """Lesion patches from a CSV over NIfTI volumes and DICOM series (see the module docstring for the format).

    Args:
        csv: the lesion table.
        root: folder the ``image`` paths are relative to; default the CSV's folder. It is scanned with
            `datamodules.indexing.scan.scan_folder` for patients, sites and modalities.
        patch_size: [H, W] for 2D axial patches, or [D, H, W] for 3D patches.
        patch_spacing: mm per patch voxel, one per axis; default 1.5 in-plane and 3.0 through-plane.
        coordinates: "LPS" (DICOM patient coordinates) or "RAS" (NIfTI world coordinates) of the CSV.
        ct_window: CT HU window (lower, upper).
        mr_percentiles: MR percentile range (lower, upper).
        site_fields: header keywords of the site key (default `datamodules.indexing.scan.DEFAULT_SITE_FIELDS`).
        salt: secret for the keyed hashes of patients and cases; keep it private and fixed. None (default): the
            environment's ``IMAGING_META_SALT``, else the public default.
        modality: the modality of the volumes whose files do not say theirs (no DICOM header, sidecar 'Modality',
            Decathlon modality, nor air at -1000 HU): "CT" reads them through ``ct_window``. None (default): they
            are scaled by percentiles as MR is, with a warning (a review: a cropped CT without air was, silently).

    Raises:
        ValueError: from `__init__` for bad settings; from `build`, naming the CSV and its line: a missing
            CSV or column, an unknown image (with the scan's rejections), an empty class, a missing, NaN or
            non-numeric coordinate, a centre outside its volume, a non-positive size.
    """

    def __init__(
        self,
        csv: str,
        root: str | None = None,
        patch_size: list[int] | None = None,
        patch_spacing: list[float] | None = None,
        coordinates: str = "LPS",
        ct_window: list[float] | None = None,
        mr_percentiles: list[float] | None = None,
        site_fields: list[str] | None = None,
        salt: str | None = None,
        modality: str | None = None,
    ) -> None:
        self.csv = str(Path(csv).expanduser().resolve())
        self.root = str(Path(root).expanduser().resolve()) if root is not None else str(Path(self.csv).parent)
        self.patch_size, self.patch_spacing = _patch_settings(patch_size if patch_size is not None else [32, 32],
                                                              patch_spacing)
        self.coordinates = _check_coordinates(coordinates)
        self.ct_window = [float(v) for v in (ct_window if ct_window is not None else [-250.0, 250.0])]
        self.mr_percentiles = [float(v) for v in (mr_percentiles if mr_percentiles is not None else [1.0, 99.0])]
        if len(self.ct_window) != 2 or not self.ct_window[1] > self.ct_window[0]:
            raise ValueError(f"ct_window must be [lower, upper] HU with upper > lower, got {ct_window}")
        if len(self.mr_percentiles) != 2 or not 0 <= self.mr_percentiles[0] < self.mr_percentiles[1] <= 100:
            raise ValueError(f"mr_percentiles must be [lower, upper] with 0 <= lower < upper <= 100, got {mr_percentiles}")
        self.site_fields = list(site_fields or DEFAULT_SITE_FIELDS)
        self._salt = salt_or_env(salt)  # None: IMAGING_META_SALT, else the public default
        self.modality = normalise_modality(modality) if modality is not None else None
        if modality is not None and self.modality is None:
            raise ValueError(f"modality {modality!r} is not a modality code; give CT or MR")

    # ------------------------------------------------------------ contract
    def preprocessing(self) -> dict[str, Any]:
        """The settings that shape the patches (recorded with the items and in checkpoints)."""
        return {"format": "lesion_csv", "patch_size": list(self.patch_size), "patch_spacing": list(self.patch_spacing),
                "channels": 1, "coordinates": self.coordinates, "ct_window": list(self.ct_window),
                "mr_percentiles": list(self.mr_percentiles),
                "resampling": "world-space patch around the centre, axes (D, H, W) along RAS (+z, +x, +y), trilinear, zero outside"} \
            | ({"modality_for_unknown": self.modality} if self.modality is not None else {})

    def files(self) -> list[Path]:
        """The input files whose change must cut the patches again instead of reading a stale cache (reviews):
        the CSV; every image it names, with each file of a DICOM series (its folder's files where a row names
        one slice, since every slice goes into the volume); a NIfTI file's BIDS sidecars, its own and those it inherits from above; and each Decathlon
        ``dataset.json`` from an image's folder up to root (the sidecar and ``dataset.json`` set the modality and
        the site)."""
        out = [Path(self.csv)]
        try:
            with warnings.catch_warnings():  # build() warns about the rows, once
                warnings.simplefilter("ignore")
                rows, _ = self.read_rows()
        except ValueError:  # build() reports what is wrong with the CSV
            return out
        root = Path(self.root)
        folders: set[Path] = set()
        for image in dict.fromkeys(r.image for r in rows):
            p = root / image
            if p.is_dir():
                out += [f for f in files_under(p) if f.is_file()]  # into linked folders too, as the scan reads it
                folders.add(p)
            elif p.is_file():
                if is_nifti(p.name):  # its own sidecar and those it inherits, as the scan reads them
                    out += [p, *(Path(j) for j in sidecars_of(str(p), str(root)))]
                elif p.parent not in folders:  # one slice of a DICOM series: its folder listed once, however many
                    out += sorted(f for f in p.parent.iterdir() if f.is_file())  # rows name its slices (a review)
                folders.add(p.parent)
        for folder in folders:
            while True:
                if (folder / "dataset.json").is_file():
                    out.append(folder / "dataset.json")
                if folder == root or root not in folder.parents:
                    break
                folder = folder.parent
        return list(dict.fromkeys(out))

    # ------------------------------------------------------------ reading
    def read_rows(self) -> tuple[list[LesionRow], list[dict[str, Any]]]:
        """Parse and check the CSV (no image is read).

        Returns:
            (rows, dropped): the usable rows, and the duplicate rows dropped (``{"line", "reason"}``).

        Raises:
            ValueError: every problem found, each naming the CSV and its line.
        """
        return read_lesion_rows(Path(self.csv), Path(self.root))

    def _join(self, rows: Sequence[LesionRow], index: Index) -> dict[str, Case]:
        """Image path -> case, for every row; errors name the row and the scan's verdict on the image."""
        by_key: dict[str, Case] = {}
        shared: dict[str, int] = {}  # a folder that holds several series: the cases its key would name
        for case in index.cases:
            for k in _case_keys(case):
                if k in by_key and by_key[k] is not case:
                    shared[k] = shared.get(k, 1) + 1
                by_key.setdefault(k, case)
        errors = []
        for r in rows:
            if r.image in shared:  # it named whichever series was listed first (a review)
                errors.append(f"{self.csv}: line {r.line}: image {r.image!r} is a folder that holds "
                              f"{shared[r.image]} DICOM series; name the lesion's series by one of its files (any "
                              "slice), or give each series its own folder")
                continue
            if r.image in by_key:
                continue
            errors.append(f"{self.csv}: line {r.line}: image {r.image!r} {self._why_unknown(r.image, index)}")
        if errors:
            rejected = first([f"{x.path}: {x.reason}" for x in index.rejected], MAX_LISTED)
            tail = f"\nthe scan of {self.root} rejected {len(index.rejected)} input(s): {rejected}" if index.rejected else ""
            named = first(errors, MAX_LISTED, "\n")
            raise ValueError(f"{len(errors)} lesion row(s) name an image that is not indexed:\n{named}{tail}")
        return {r.image: by_key[r.image] for r in rows}

    def _why_unknown(self, image: str, index: Index) -> str:
        """Why a CSV image is not an indexed case: rejected by the scan, missing, a folder, a label map, ..."""
        full = Path(self.root) / image
        if Path(image).is_absolute() or image == ".." or image.startswith("../"):  # outside root, which the scan covers
            # (absolute: kept so by the reading; '../scans/a.nii.gz' beside the CSV's folder was "not an image")
            return (f"lies outside root {self.root}, and only images under root are scanned; set root to a folder "
                    "that holds every image of the CSV")
        for x in index.rejected:
            if x.path == image or image in x.files or x.path.startswith(image + "/"):
                return f"was rejected by the scan: {x.reason}"
        if not full.exists():
            return f"does not exist under root {self.root}; paths are relative to root (default: the CSV's folder)"
        if full.is_dir():
            return (f"is a folder that holds no single indexed DICOM series under {self.root}; give the series "
                    "folder or a NIfTI file")
        if image in {c.label for c in index.cases}:
            return "is a label map, not an image; give the image the label belongs to"
        return "exists but is not an image the scan indexed (a support file?); give a NIfTI file or a DICOM series folder"

    # ------------------------------------------------------------ build
    def build(self) -> ItemTable:
        """Read the CSV, scan ``root``, load each volume once and cut every lesion's patch."""
        rows, dropped = self.read_rows()
        index = scan_folder(self.root, site_fields=self.site_fields, salt=self._salt, skip=self._skip)
        cases = self._join(rows, index)
        # rows that write one DICOM series two ways (its folder, one of its files) are one scan (a review)
        def scan_of(r: LesionRow) -> str:
            return cases[r.image].case_id

        _check_consistent(rows, Path(self.csv), scan_of=scan_of)
        rows, more = _drop_duplicates(rows, Path(self.csv), scan_of=scan_of)
        dropped = dropped + more  # one lesion written both ways was two identical items
        no_patient = set(index.own_patient)
        own = sorted({r.image for r in rows if not r.patient and _first_file(cases[r.image]) in no_patient})
        if own:  # as the segmentation data and the image folder warn: each such volume counts as its own patient
            warnings.warn(f"{self.csv}: {len(own)} image(s) without a 'patient' in the CSV name no patient in their path "
                          f"or header either (e.g. {own[0]}), so each counts as its own patient and two scans of one "
                          "patient can land on both sides of an episode: fill the CSV's 'patient' column", stacklevel=2)
        classes = sorted({r.cls for r in rows})
        class_index = {c: i for i, c in enumerate(classes)}
        by_image: dict[str, list[LesionRow]] = defaultdict(list)
        for r in rows:
            by_image[r.image].append(r)
        patches: dict[int, torch.Tensor] = {}
        errors: list[str] = []
        unsaid = [image for image in by_image if normalise_modality(cases[image].modality) is None]
        if unsaid and self.modality is None:
            warnings.warn(unsaid_modality(len(unsaid), unsaid[0], self.root, "source.init_args.modality"), stacklevel=2)
        for image, group in by_image.items():  # each volume once, for all its lesions
            case = cases[image]
            said = normalise_modality(case.modality) is not None
            modality = self.modality if self.modality is not None and not said else case.modality
            try:
                vol = load_volume(index.resolve(case.image), modality, self.ct_window, self.mr_percentiles)
            except Exception as e:
                raise ValueError(
                    f"{self.csv}: line(s) {', '.join(str(r.line) for r in group[:MAX_LISTED])}: cannot load image "
                    f"{image!r} ({type(e).__name__}: {e})"
                ) from e
            affine = np.asarray(vol.affine, dtype=np.float64)
            ras = to_ras(np.stack([r.centre for r in group]), self.coordinates)
            bad = _outside(ras, affine, vol.shape[1:])
            for k, vox in bad:
                r = group[k]
                errors.append(
                    f"{self.csv}: line {r.line}: centre {r.centre.tolist()} ({self.coordinates} mm) lies outside image "
                    f"{image!r} (voxel {np.round(vox, 1).tolist()} of a {list(vol.shape[1:])} grid in RAS order); "
                    f"check the coordinate convention (coordinates={self.coordinates!r}) and the image path"
                )
            if bad:
                continue
            out = extract_patches(vol, affine, ras, self.patch_size, self.patch_spacing)
            for r, p in zip(group, out, strict=True):
                patches[r.line] = p
        if errors:
            raise ValueError(f"{len(errors)} lesion centre(s) outside their image:\n" + first(errors, MAX_LISTED, "\n"))
        images = torch.stack([patches[r.line] for r in rows]) if rows else torch.zeros((0, 1, *self.patch_size))
        patients = [("p-" + pseudonym(self._salt, r.patient)) if r.patient else cases[r.image].patient for r in rows]
        sites = [r.site or cases[r.image].site for r in rows]
        return ItemTable(
            images=images.to(torch.float32),
            labels=np.array([class_index[r.cls] for r in rows], dtype=np.int64),
            classes=classes,
            patients=patients,
            sites=sites,
            item_ids=[f"{cases[r.image].case_id}#{r.line}" for r in rows],
            source={**self.preprocessing(), "rows": len(rows), "images": len(by_image), "rejected": dropped},
        )
