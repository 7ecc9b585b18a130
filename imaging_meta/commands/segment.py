"""Few-shot segmentation of a user's structure: a checkpoint, a few labelled support scans, query scans.

Every volume goes through the same deterministic preprocessing as in training (read from the checkpoint).
Support slices are taken where the support mask is present; each axial query slice is segmented against
the support; the foreground probability is mapped back through the inverse of the preprocessing (linear
interpolation) and thresholded at 0.5, so the mask that is written has the query's own shape and affine
and equals the probability map (``explain``) > 0.5, before the optional 3D step (the largest connected
component, or every component when a support shows the structure in several parts).

Outputs: a NIfTI mask per query, or (``output_format="dicom-seg"``, DICOM series queries only) a DICOM
Segmentation that references the query's slices (`imaging_meta.commands.dicom_seg`). NIfTI outputs are written
with a fresh header (`imaging_meta.commands.nifti_out`): nothing copied from the query's header but its sform and
qform with their codes (both 0, orientation unknown, stay 0) and its spatial unit (a query in metres is read in mm,
`datamodules.indexing.volumes.in_mm`, and its mask written in metres, as the query), hence no patient data; the
description names the structure.
The DICOM Segmentation is the exception: it must copy the source's Patient and Study modules.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import cast

import nibabel as nib
import numpy as np
import pydicom
import torch
from monai.data import MetaTensor
from nibabel.spatialimages import SpatialImage

from datamodules.indexing.bids import sidecars_of
from datamodules.indexing.inputs import Reject, nifti_pair_kind
from datamodules.indexing.pseudonyms import normalise_modality
from datamodules.indexing.volumes import (
    cifti_file_reason,
    dimensions_reason,
    hounsfield_air_share,
    label_data_values,
    load_nifti,
)
from datamodules.io.dicom import is_nifti, nifti_stem
from datamodules.io.nifti_names import compression_problem
from datamodules.messages import LISTED, first, listed
from datamodules.progress import progress
from datamodules.sources.image_folder import PIL_EXTENSIONS
from datamodules.transforms.volume import CheckVolume, to_source_grid, volume_transforms
from imaging_meta.adaptation import DEFAULT_STEPS
from imaging_meta.checkpoint_io import CheckpointError, load_learner, resolve_device
from imaging_meta.commands.console import SEED_LIMIT, user_error
from imaging_meta.commands.dicom_seg import SEG_MANUFACTURER
from imaging_meta.commands.nifti_out import NiftiGeometry, nifti_description, save_nifti
from imaging_meta.commands.outputs import check_output_folder, check_outputs
from imaging_meta.commands.query_marks import is_mark_of, mark_of, query_mark, seg_series_uid, series_uid
from imaging_meta.evaluation.volumes import keep_components, structure_parts
from imaging_meta.learners.base import Learner
from imaging_meta.tasks import SEGMENTATION, get_task
from imaging_meta.volume.appearance import NOVELTY_WARN
from imaging_meta.volume.segmenter import LEARNER_ONLY, SUPPORT_CHECK_WARN, ScanOptions, ScanSegmenter, spread

logger = logging.getLogger(__name__)


def image_source(path: str | Path) -> str:
    """A NIfTI path or a DICOM series folder (the DICOM reader groups, checks and orders the folder's slices).

    Raises:
        FileNotFoundError: nothing at ``path``.
        ValueError: a 2D picture (PNG, JPEG, TIFF, BMP), which ``segment`` does not read: it would otherwise reach
            the DICOM reader and fail with a message about DICOM headers; a NIfTI pair (.hdr/.img); a CIFTI-2 file
            (grayordinate data, no image volume: its header is read).
    """
    p = Path(path)
    if p.is_symlink() and not p.exists():
        raise FileNotFoundError(f"{p}: a symbolic link to {os.readlink(p)}, which does not exist or links back to "
                                "itself; give the file or folder it should point to")
    if not p.exists():
        raise FileNotFoundError(f"{p}: no such file or folder")
    if p.is_file() and p.suffix.lower() in PIL_EXTENSIONS:
        raise ValueError(
            f"{p}: a 2D picture ({p.suffix.lower()}); segment reads NIfTI volumes (.nii, .nii.gz) and DICOM series "
            "folders, for images and label maps alike. Save the picture as a one-slice NIfTI volume, e.g. "
            "nibabel.save(nibabel.Nifti1Image(array[:, :, None], numpy.eye(4)), 'image.nii.gz')"
        )
    if p.is_file() and not is_nifti(p.name):
        pair = nifti_pair_kind(str(p))
        if pair:
            raise ValueError(f"{p}: {pair}; segment reads NIfTI files of one piece (.nii, .nii.gz)")
        raise ValueError(
            f"{p}: not a NIfTI file (.nii, .nii.gz); segment reads NIfTI volumes and DICOM series folders. For a DICOM "
            "series pass the folder that holds its files, not one file"
        )
    cifti = cifti_file_reason(str(p)) if p.is_file() else None
    if cifti:
        raise ValueError(f"{p}: {cifti}")
    if p.is_file():  # the header only: what the voxels cannot be read as, or too many of them
        try:
            header_image = cast(SpatialImage, nib.load(str(p)))
            dtype, shape = header_image.get_data_dtype(), header_image.shape
        except Exception as e:
            renamed = compression_problem(p)
            if renamed:
                raise ValueError(f"{p}: {renamed}") from None
            raise ValueError(f"{p}: cannot be read as a NIfTI file ({type(e).__name__}: {e}); export it again") from None
        problem = dimensions_reason(shape)
        if problem:
            raise ValueError(f"{p}: {problem}")
        if dtype.fields is not None:  # RGB24, RGBA32: called truncated or corrupt after the slow part (a review)
            raise ValueError(f"{p}: colour voxels ({', '.join(dtype.names or ())}; {dtype}); segment reads one grey "
                             "value per voxel, so save one channel or the luminance as the image")
        if np.issubdtype(dtype, np.complexfloating):
            raise ValueError(f"{p}: complex-valued voxels ({dtype}); segment reads real intensities, so save the "
                             "magnitude (numpy.abs) as the image")
    return str(p)


def _content_problem(path: Path) -> str | None:
    """Why a NIfTI file's voxels cannot be segmented (unreadable, not one 3D volume, NaN or Inf, constant), as
    the volume reader would say it later; None when they can, or for a DICOM folder."""
    if path.is_dir() or not is_nifti(path.name):
        return None
    try:
        img = cast(SpatialImage, nib.load(str(path)))
        shape = tuple(img.shape)
        while len(shape) > 3 and shape[-1] == 1:
            shape = shape[:-1]
        if len(shape) != 3:  # said from the header, before the voxels are read
            return f"{path}: not one 3D volume (shape {tuple(img.shape)}); segment reads 3D volumes"
        data = np.asanyarray(img.dataobj)
    except Exception as e:
        return f"{path}: its voxels cannot be read ({type(e).__name__}: {e}); the file is damaged or cut short"
    volume = MetaTensor(torch.from_numpy(np.asarray(data, dtype=np.float64).reshape(shape))[None],
                        meta={"filename_or_obj": str(path)})
    try:
        CheckVolume()(volume)  # NaN or Inf voxels, a constant image: the reader's own check and words
    except ValueError as e:
        return str(e)
    return None


def modality_of(path: str | Path, given: str | None = None, default: str | None = None) -> str:
    """CT or MR: the DICOM Modality or the BIDS sidecar's, else ``given`` (``--modality``, for files that do not
    say), else CT for a NIfTI volume in Hounsfield units with air in it
    (`datamodules.indexing.volumes.hounsfield_air_share`, with a warning; the folder scan reads such a training
    volume as CT too), else ``default`` (the checkpoint's ``modality`` for files that do not say, as in
    training), else an error that says what to pass. Spellings are normalised as the folder scan does ("MRI",
    "T1w": MR)."""
    try:
        return _declared_modality(path)
    except _Undeclared as e:
        if given:
            return normalise_modality(given) or given.strip().upper()
        air = _air_share(Path(path))
        if air is not None:
            logger.warning("%s does not say its modality: read as CT, since %.0f%% of its voxels are air at about "
                           "-1000 HU (pass --modality to override)", path, 100 * air)
            return "CT"
        if default:
            logger.info("%s does not say its modality: %s, as the checkpoint's training data config says", path, default)
            return default
        raise ValueError(_content_problem(Path(path)) or str(e)) from None  # a damaged file: say that first


def _cropped_field(vol: torch.Tensor, pre: dict) -> tuple[tuple[float, float], tuple[float, float]] | None:
    """The query's in-plane extent (mm, along the two in-plane axes of its grid turned to RAS, as the slices are
    cut, less what the crop to its body cut away) and the working slices' (``slice_size`` times ``spacing``), when
    the slices hold more than a tenth less of it: the preprocessing crops every slice around its body's centre.
    None when they hold it, or the file's grid is unknown."""
    meta = getattr(vol, "meta", {})
    shape, affine = meta.get("spatial_shape"), meta.get("original_affine")
    if shape is None or affine is None:
        return None
    a = np.asarray(affine, dtype=np.float64)
    sizes = np.asarray(shape, dtype=np.float64)[:3] * nib.affines.voxel_sizes(a)[:3]  # along the file's own axes
    extent = np.zeros(3)
    for axis, (to, _) in enumerate(nib.orientations.io_orientation(a)):
        extent[int(to)] = sizes[axis]  # along the RAS-turned grid's axes (a world bounding box overstated an
        # oblique grid: a 25 degree rotation read 290 mm for 192; a review)
    body = next((op for op in getattr(vol, "applied_operations", []) if op.get("class") == "CropForeground"), None)
    if body is not None:  # `BodyCropd`: voxels cut before and after, per axis, at the working spacing
        cut = [int(v) for v in body.get("extra_info", {}).get("cropped", [])]
        for axis in range(min(2, len(cut) // 2)):
            extent[axis] -= (cut[2 * axis] + cut[2 * axis + 1]) * float(pre["spacing"][axis])
    field = tuple(float(n) * float(sp) for n, sp in zip(pre["slice_size"], pre["spacing"], strict=True))
    if extent[0] <= 1.1 * field[0] and extent[1] <= 1.1 * field[1]:
        return None
    return (float(extent[0]), float(extent[1])), (field[0], field[1])


def _air_share(path: Path) -> float | None:
    """`hounsfield_air_share` of a NIfTI file, counted on its stored integers; None for other formats and files
    that cannot be read (the error that asks for ``--modality`` then stands)."""
    if path.is_dir() or not is_nifti(path.name):
        return None
    try:
        img = cast(SpatialImage, nib.load(str(path)))
        if sum(int(n) > 1 for n in img.shape[3:]) > 0:
            return None
        proxy = img.dataobj
        if hasattr(proxy, "get_unscaled"):
            slope, inter = getattr(proxy, "slope", 1.0), getattr(proxy, "inter", 0.0)
            return hounsfield_air_share(np.asanyarray(proxy.get_unscaled()), 1.0 if slope is None else slope,
                                        0.0 if inter is None else inter)
        return hounsfield_air_share(np.asanyarray(proxy))
    except Exception:
        return None


class _Undeclared(Exception):
    """A NIfTI file without a sidecar 'Modality'."""


def _declared_modality(path: str | Path) -> str:
    p = Path(path)
    if p.is_dir():
        return _dicom_modality(p)
    # its own sidecar and those it inherits from above by BIDS' rule, the nearest last: what the scan reads
    own = p.with_name(p.stem + ".json")
    sidecars = [Path(j) for j in sidecars_of(str(p))] if is_nifti(p.name) else ([own] if own.exists() else [])
    declared = None
    for sidecar in sidecars:
        try:
            doc = json.loads(sidecar.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:  # skipped with a word, as the scan does
            logger.warning("%s: BIDS sidecar is not valid JSON (%s); its fields are ignored", sidecar, e)
            continue
        mod = doc.get("Modality") if isinstance(doc, dict) else None
        if mod and str(mod).strip():
            declared = normalise_modality(str(mod)) or str(mod).strip().upper()
    if declared:
        return declared
    raise _Undeclared(f"{p}: cannot tell CT from MR (no DICOM header or sidecar 'Modality'); pass --modality CT or MR")


def _dicom_modality(folder: Path) -> str:
    """The Modality of the first DICOM image file in ``folder`` that states one (headers only); objects that are
    no image (a structure set, a report, a DICOMDIR: `datamodules.io.dicom.non_image_kind`), which the series
    reader leaves out too, do not count.

    Raises:
        ValueError: an empty folder, or one without a readable DICOM file (files without a Modality: `_Undeclared`).
    """
    from datamodules.io.dicom import DicomError, checked_header, non_image_kind, read_dataset

    files = sorted(f for f in folder.iterdir() if f.is_file())
    if not files:
        below = _series_below(folder)[:3]
        hint = (f"; files lie in its subfolder(s) {', '.join(str(b) for b in below)}: give the folder of the series itself"
                if below else "; give a NIfTI file or a folder that holds one DICOM series")
        raise ValueError(f"{folder}: no files in this folder{hint}")
    unreadable: list[DicomError] = []
    others: list[str] = []
    for f in files:
        try:
            ds, caught = read_dataset(str(f), stop_before_pixels=True)
            header = checked_header(ds, str(f), (), caught)
            kind = non_image_kind(header)
        except DicomError as e:
            unreadable.append(e)
            continue
        if kind is not None:
            others.append(f"{f.name}: {kind}")
            continue
        modality = header.modality  # the SOP class's where Modality is missing, as the scan reads it (a review)
        if modality:
            return normalise_modality(modality) or modality
    series = _series_below(folder)
    series_hint = (f"; its subfolder(s) {first([str(d) for d in series], sep=', ')} hold files: give the folder "
                   "of the series itself") if series else ""
    if len(unreadable) == len(files):
        niftis = [f.name for f in files if is_nifti(f.name) and not f.name.startswith(".")]
        if niftis and not series:  # a BIDS or NIfTI folder: the file is the scan (its DICOM error says "gunzip")
            raise ValueError(f"{folder}: a folder of NIfTI files ({first(niftis, sep=', ')}), not a DICOM series; "
                             "give the NIfTI file of the scan itself")
        raise ValueError(f"{folder}: none of its {len(files)} files is a readable DICOM file (e.g. {unreadable[0]})"
                         + (series_hint or "; give a NIfTI file or a folder that holds one DICOM series"))
    if len(unreadable) + len(others) == len(files):
        raise ValueError(f"{folder}: no DICOM image in this folder ({'; '.join(others[:3])}"
                         f"{', ...' if len(others) > 3 else ''})" + (series_hint or "; give a folder that holds one DICOM series"))
    raise _Undeclared(f"{folder}: no DICOM file in this folder states its Modality; pass --modality CT or MR")


def _series_below(folder: Path) -> list[Path]:
    """The folders below ``folder``, at any depth, that hold visible files (a patient's or an export's series
    folders, a study's series one level further down), sorted; hidden folders, and folders that cannot be listed,
    are left out."""
    found = []
    for root, dirs, names in os.walk(folder):  # a folder that cannot be listed is skipped (os.walk's default)
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        if Path(root) != folder and any(not n.startswith(".") for n in names):
            found.append(Path(root))
    return sorted(found)


def _support_slices(mask: torch.Tensor, max_slices: int, min_pixels: int = 1) -> list[int]:
    """Axial slices of ``mask`` (H, W, D) that show the structure, evenly spread, at most ``max_slices``."""
    counts = mask.flatten(0, 1).sum(0)
    return spread(torch.nonzero(counts >= min_pixels).flatten().tolist(), max_slices)


OUTPUT_FORMATS = ("nifti", "dicom-seg")


def _file_modality(p: Path) -> str | None:
    """The Modality of a DICOM file as the project's reader gives it (`datamodules.io.dicom_files.read_header`, as
    `_multi_frame_file` reads it; "" when it names none), or None for a file that is not DICOM."""
    from datamodules.io.dicom_files import read_header

    try:
        return read_header(p).modality or ""
    except Exception:  # not DICOM (or unreadable): the images' checks name it
        return None


#: how to turn a DICOM SEG into what ``--support-label`` reads
SEG_ADVICE = ("support label maps are NIfTI files on the support image's grid. Convert it first, e.g. in 3D Slicer: "
              "load the support series and the SEG, then export the segmentation as a labelmap with the support series "
              "as reference geometry (a SEG may hold only the slices that show the structure)")


#: how to turn a DICOM RT structure set (contours) into what ``--support-label`` reads
RTSTRUCT_ADVICE = ("support label maps are NIfTI files on the support image's grid, and a structure set holds contours. "
                   "Convert it first, e.g. in 3D Slicer with SlicerRT: load the support series and the RTSTRUCT, then "
                   "export the structure as a labelmap with the support series as reference geometry")
#: the label-side advice for a DICOM object that is not an image, by Modality
_LABEL_ADVICE = {"SEG": ("a DICOM Segmentation object", SEG_ADVICE), "RTSTRUCT": ("a DICOM RT structure set", RTSTRUCT_ADVICE)}


def label_format(p: Path) -> None:
    """Refuse, with the label's own advice, a support label that is a DICOM SEG (the format ``segment --format
    dicom-seg`` writes), another DICOM file (an image), or a folder (holding a SEG or a series). Checked before the
    inputs are read as images, whose advice for a DICOM file ("pass the series' folder") led in a circle for a label,
    whose folder is refused (a review); other files get the images' checks (a 2D picture, a NIfTI pair) and then
    `check_label_source`'s."""
    if p.is_dir():
        for f in sorted(p.iterdir())[:200]:
            kind = _LABEL_ADVICE.get(_file_modality(f) or "") if f.is_file() else None
            if kind is not None:  # an RT structure set was called "not a DICOM series" (a review)
                raise ValueError(f"{p}: a folder holding {kind[0]} ({f.name}); {kind[1]}")
        raise ValueError(
            f"{p}: a folder; a support label map is a NIfTI file (.nii, .nii.gz) on its image's grid, not a DICOM series"
        )
    if is_nifti(p.name) or not p.is_file():
        return
    modality = _file_modality(p)
    if modality in _LABEL_ADVICE:  # an RT structure set was called a DICOM image file (a review)
        raise ValueError(f"{p}: {_LABEL_ADVICE[modality][0]}; {_LABEL_ADVICE[modality][1]}")
    if modality is not None:
        raise ValueError(f"{p}: a DICOM image file ({modality or 'no Modality'}), not a label map; the support's series "
                         "goes to --support-image (its folder), and its label map is a NIfTI file on that series' grid "
                         "(.nii, .nii.gz)")


def check_label_source(path: str | Path, label_value: int | None = None) -> list[int]:
    """A support label map as ``segment`` reads it: a readable 3D NIfTI file of non-negative integer labels with
    background (`datamodules.indexing.volumes.label_data_values`, the rule of ``imaging-meta scan``).

    Raises:
        ValueError: a folder (a DICOM series is an image, never a label map here), another format, or a file
            that is corrupt, truncated, or not a label map (an image passed by mistake, a resampled label);
            a map without ``label_value``.

    Returns:
        The non-zero values in the map.
    """
    p = Path(path)
    label_format(p)
    if not is_nifti(p.name):
        pair = nifti_pair_kind(str(p))
        if pair:
            raise ValueError(f"{p}: {pair}; support label maps are read from NIfTI files of one piece (.nii, .nii.gz)")
        raise ValueError(f"{p}: not a NIfTI file (.nii, .nii.gz); support label maps are read from NIfTI files")
    try:
        _, data, _ = load_nifti(str(p))
        present = label_data_values(data, str(p))
    except Reject as e:
        message = str(e)
        raise ValueError(message if message.startswith(f"label map {p}") else f"{p}: {message}") from e
    if label_value is not None and label_value not in present:
        shown = ", ".join(map(str, present[:12])) + (", ..." if len(present) > 12 else "")
        raise ValueError(f"{p}: the label map has no voxel of value {label_value} (values present: {shown}); check --label-value")
    return [int(v) for v in present if int(v) != 0]


def _plain(values: dict) -> str:
    """``key value, ...`` with numbers to 3 significant digits, for one log line."""

    def fmt(v) -> str:
        if isinstance(v, float):
            return f"{v:.3g}"
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(fmt(x) for x in v) + "]"
        if isinstance(v, dict):
            return "(" + _plain(v) + ")"
        return str(v)

    return ", ".join(f"{k.replace('_', ' ')} {fmt(v)}" for k, v in values.items())


def _query_name(q: Path) -> str:
    q = Path(os.path.abspath(q))  # `--query .` is the folder's name, not '' (which wrote a hidden '.nii.gz')
    return q.name if q.is_dir() else (nifti_stem(q.name) if is_nifti(q.name) else q.stem)


def _structure_of(path: Path) -> str | None:
    """The structure an existing mask of `segment` holds (its NIfTI description or its segment label), or None
    when that cannot be read or the file is no mask of `segment`."""
    try:
        if path.name.endswith(".seg.dcm"):
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            # a Segmentation of another program (a radiologist's manual one) is never taken for ours (a review)
            ours = ds.get("Modality") == "SEG" and ds.get("Manufacturer") == SEG_MANUFACTURER
            return str(ds.SegmentSequence[0].SegmentLabel) if ours else None
        header = cast(nib.Nifti1Header, nib.load(path).header)
        text = bytes(header["descrip"]).split(b"\0")[0].decode("utf-8", "replace")
    except Exception:
        return None
    prefix = nifti_description("")
    return text[len(prefix):] if text.startswith(prefix) else None


def _check_same_structure(paths: Sequence[Path], name: str, queries: Sequence[str | Path] | None = None,
                          suffix: str = "") -> None:
    """Refuse to replace a mask that an earlier run wrote for another structure (by its name: ``--structure-name``,
    else ``label <value>``, else ``structure``), or of another scan of the same name (``queries``, in the order of
    ``paths``: the `query_mark` in the mask), or a file there that no run of `segment` wrote: each run writes
    one structure and names its mask after the query, so segmenting a second structure of a scan into the same
    folder replaced the first one's mask without a word (a review), and so did segmenting another patient's series
    folder of the same name (every DICOM export named ``series``) into it. ``suffix``: that of the files' NIfTI
    description (``", probability"`` for the probability maps of ``--explain``, checked alike: a review)."""
    for i, path in enumerate(paths):
        if not path.is_file():
            continue
        if queries is not None:
            if path.name.endswith(".seg.dcm"):
                held_uid, uid = seg_series_uid(path), series_uid(Path(queries[i]))
                other = held_uid is not None and held_uid != uid  # a query whose series cannot be told: refused
            else:
                held_mark = mark_of(path)
                other = held_mark is not None and not is_mark_of(held_mark, queries[i])
            if other:
                raise ValueError(f"{path} holds the mask of another scan named like {queries[i]} from an earlier run "
                                 "(masks are named after their query; another patient's series folder of the same "
                                 "name, or this scan changed): give another --out folder, or remove the file to "
                                 "replace it")
        held = _structure_of(path)
        if held is None:  # a file of the user's (or unreadable) where a mask goes: never replaced
            raise ValueError(f"{path} exists and is not a mask that imaging-meta segment wrote: move it, or give "
                             "another --out folder")
        written = (nifti_description(name, suffix)[len(nifti_description("")):] if not path.name.endswith(".seg.dcm")
                   else name)
        if held != written:
            raise ValueError(f"{path} holds the mask of {held!r} from an earlier run, and this run segments {name!r}: "
                             "give another --out folder for each structure, or remove the file to replace it")


def output_paths(query: str | Path, out_dir: str | Path, output_format: str = "nifti", explain: bool = False) -> list[Path]:
    """The files ``segment`` writes for one query: its mask, then (``explain``) its probability map."""
    name, out = _query_name(Path(query)), Path(out_dir)
    paths = [out / (f"{name}.seg.dcm" if output_format == "dicom-seg" else f"{name}.nii.gz")]
    return paths + ([out / f"{name}_probability.nii.gz"] if explain else [])


def _segmenter(checkpoint: str | Path, device: torch.device) -> tuple[Learner, dict]:
    """The segmentation learner of a checkpoint and the preprocessing it was trained with.

    Raises:
        CheckpointError: a checkpoint of another task, or one without preprocessing settings.
    """
    learner, extra = load_learner(checkpoint, device)
    task = get_task(extra.get("task", learner.task))
    if task is not SEGMENTATION:
        raise CheckpointError(f"{checkpoint}: a {task.name} checkpoint cannot segment; use `imaging-meta classify`")
    pre = extra.get("preprocessing")
    if not pre:
        raise CheckpointError(f"{checkpoint}: no preprocessing settings stored; re-save it with this version of imaging-meta")
    return learner, pre


#: a support structure filling more of its (preprocessed) volume than this is warned about
NEAR_ALL = 0.95


def _mm(spacing: Sequence[float]) -> str:
    return " x ".join(f"{float(v):g}" for v in spacing)


def _support_volumes(tf_pair, supports, label_value, modalities: Sequence[str], max_support_slices,
                     spacing: Sequence[float], slice_size: Sequence[int], hint: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Preprocessed (image, structure mask) volumes (H, W, D) of the supports (each of its ``modalities``), checked.

    Raises:
        ValueError: a label map whose structure vanishes at ``spacing`` (in-plane, mm) and ``slice_size`` (``hint``
            says what to do), or that is the structure everywhere (`check_label_source` has refused maps without it).
    """
    out: list[tuple[torch.Tensor, torch.Tensor]] = []
    for k, ((image, label), modality) in enumerate(zip(supports, modalities, strict=True)):
        d = tf_pair({"image": str(image), "label": str(label), "modality": modality})  # checked by `segment`
        pixels = d["image"].as_tensor()[0].float()
        for (earlier, _), (volume, _) in zip(supports[:k], out, strict=True):
            # a copy of one scan under another path is one patient, not two (the fits across support scans would
            # be in fold); `fit` refused it after the first query's adaptation, naming neither file (a review)
            if volume.shape == pixels.shape and torch.equal(volume, pixels):
                raise ValueError(f"support images {earlier} and {image} are the same scan (a copy): give each support "
                                 "scan once")
        lbl = d["label"][0]
        mask = (lbl > 0) if label_value is None else (lbl == label_value)
        what = "any non-zero voxel" if label_value is None else f"value {label_value}"
        if not _support_slices(mask, max_support_slices):
            raise ValueError(
                f"{label}: the structure ({what}) is in the label map but not in the support once it is resampled to "
                f"{_mm(spacing)} mm in-plane and cropped to {' x '.join(str(int(v)) for v in slice_size)} pixels "
                f"around the centre: it is smaller than a voxel there, or outside that field of view. {hint}")
        if bool(mask.all()):
            raise ValueError(
                f"{label}: every voxel of the label map is the structure ({what}); this is almost certainly the wrong "
                "file (an image or a body mask instead of the label map); check --support-label and --label-value"
            )
        edge = bool(mask[0].any() or mask[-1].any() or mask[:, 0].any() or mask[:, -1].any())
        if edge:  # the crop to the slices cut the structure, or it reaches the edge of the file's own grid
            logger.warning(
                "%s: the structure (%s) reaches the edge of the support's %s-pixel slices at %s mm (%s mm across): "
                "any part of it beyond them is cut off, and the model learns from what is left. If the scan's "
                "body is wider than that, crop the scans closer to the structure or use a checkpoint trained on "
                "larger slices", label, what, " x ".join(str(int(v)) for v in slice_size), _mm(spacing),
                " x ".join(f"{float(n) * float(sp):.0f}" for n, sp in zip(slice_size, spacing, strict=True)))
        share = float(mask.float().mean())
        if share > NEAR_ALL:
            logger.warning("%s: the structure (%s) fills %.1f%% of the support volume; check --support-label and "
                           "--label-value (a body mask or an inverted label map?)", label, what, 100 * share)
        out.append((pixels, mask.as_tensor().bool()))
    return out


@torch.no_grad()
def segment(
    checkpoint: str | Path,
    supports: Sequence[tuple[str | Path, str | Path]],
    queries: Sequence[str | Path],
    out_dir: str | Path,
    label_value: int | None = None,
    structure_name: str | None = None,
    modality: str | None = None,
    max_support_slices: int = 12,
    largest_component: bool = True,
    device: str = "auto",
    query_chunk: int = 16,
    output_format: str = "nifti",
    explain: bool = False,
    options: ScanOptions | None = None,
    adapt_steps: int = DEFAULT_STEPS,
    adapt_seed: int = 0,
    scale: str = "structure",
    empty_if_unlike: bool = False,
) -> list[Path]:
    """Segment ``queries`` with the structure labelled in ``supports``.

    Outputs, per query, in ``out_dir`` (the query's name is its NIfTI stem or its series folder's name):

    * ``output_format="nifti"``: ``<query name>.nii.gz``, a uint8 mask (X, Y, Z) with the query's shape
      and affine (a DICOM series: the reader layout, column index, row index, slice in geometric order).
    * ``output_format="dicom-seg"``: ``<query name>.seg.dcm``, a binary DICOM Segmentation whose frames
      reference the query's slices by SOPInstanceUID, in DICOM pixel order (see
      `imaging_meta.commands.dicom_seg.write_dicom_seg`). It copies the query's Patient and Study modules (PatientName,
      PatientID, StudyInstanceUID, ...), as DICOM requires for it to join the study in a PACS: it is the one
      output that carries identifying data. Every NIfTI output has a fresh header without any.
    * ``explain=True``: also ``<query name>_probability.nii.gz``, the float32 foreground probability in
      [0, 1] with the mask's shape and affine (the mask is this map > 0.5, before the 3D component step).

    Args:
        checkpoint: a checkpoint from ``imaging-meta fit``.
        supports: (image, label map) pairs; images are NIfTI files or DICOM series folders.
        queries: NIfTI files or DICOM series folders (``dicom-seg``: DICOM series folders only).
        out_dir: output folder (created).
        label_value: the structure's value in the label maps (default: every non-zero voxel).
        structure_name: the structure's name, written into each mask's NIfTI description and as the DICOM-SEG
            segment label (default: ``label <value>``, or ``structure``).
        modality: CT or MR when the files do not say.
        max_support_slices: slices taken from each support scan (spread over the structure).
        largest_component: keep only the largest 3D connected component of each mask, unless a support's
            structure is in several parts (`imaging_meta.evaluation.volumes.structure_parts`): then every
            component is kept.
        device: "auto", "cpu" or "cuda".
        query_chunk: query slices per forward pass.
        output_format: "nifti" or "dicom-seg".
        explain: also write each query's foreground probability map.
        options: what the scan segmenter adds to the learner (`imaging_meta.volume.segmenter.ScanOptions`;
            default: everything, with ``max_support_slices``); ``LEARNER_ONLY`` is the learner alone.
        adapt_steps: before predicting a query, fine-tune a copy of the learner for this many steps on episodes
            from the support scans and that query (`imaging_meta.adaptation`; 0: off). Default 40. Each query is
            adapted to on its own, so its mask does not depend on the other queries (and costs one adaptation).
        adapt_seed: the seed of that adaptation (the same seed gives the same mask for a query).
        scale: ``structure`` (default: a finer spacing when a support's structure is thin or small, the finest
            of the supports', `imaging_meta.evaluation.scans.supports_preprocessing`) or ``checkpoint`` (the
            spacing the model was trained at).
            The defaults of ``scale`` and ``adapt_steps`` are the recipe that scored best on the real scans of
            ``benchmarks/real/`` (docs/segmentation.md); ``scale="checkpoint", adapt_steps=0`` is the model as
            trained, and faster.
        empty_if_unlike: write an empty mask for a query whose appearance is unlike the support scans'
            (`imaging_meta.volume.appearance`, above ``NOVELTY_WARN``), which may be another body region; it is
            warned about either way.

    Returns:
        The written files: the masks (NIfTI or DICOM-SEG), one per query, then the probability maps.

    Raises:
        ValueError: an unknown ``output_format``; ``dicom-seg`` with a query that is not a DICOM series
            folder; ``max_support_slices`` below 1, ``label_value`` below 1, an empty ``modality``; a
            support label map without the structure, or that is the structure everywhere, or whose structure
            vanishes at the working spacing; an output folder under a file; ``dicom-seg`` with a multi-frame
            query (before the work), or queries whose Segmentation highdicom refuses (after the others are written);
            queries whose volume cannot be used (a missing slice, truncated or NaN data: after the others are
            written; a single query's own error); a query whose header cannot be read, before any work.
        CheckpointError: a checkpoint that cannot segment.
    """
    if output_format not in OUTPUT_FORMATS:
        raise ValueError(f"output_format must be one of {OUTPUT_FORMATS}, got {output_format!r}")
    if max_support_slices < 1:
        raise ValueError(f"--max-support-slices must be at least 1, got {max_support_slices}")
    if adapt_steps < 0:
        raise ValueError(f"--adapt-steps must be at least 0 (0: no adaptation), got {adapt_steps}")
    if not 0 <= adapt_seed < SEED_LIMIT:
        raise ValueError(f"--adapt-seed must be >= 0 and below 2**64, got {adapt_seed}")
    if structure_name is not None:  # a DICOM segment label drops trailing spaces: 'liver ' came back as 'liver', and a
        structure_name = structure_name.strip()  # rerun into the same --out was refused; '   ' became empty (a review)
    if structure_name is not None and (not 0 < len(structure_name) <= 64 or "\\" in structure_name
                                       or any(ord(ch) < 32 or 0xD800 <= ord(ch) < 0xE000 for ch in structure_name)):
        raise ValueError(f"--structure-name {structure_name!r}: 1 to 64 characters (spaces around it dropped) without a "
                         "backslash or control "
                         "characters or unpaired surrogates (a DICOM segment label)")
    name = structure_name or ("structure" if label_value is None else f"label {label_value}")
    # in an order of their own (their paths), not the order given: the calibration's folds and the adaptation's
    # episodes follow the supports' order, and swapping two supports moved a mask by 234 voxels (a review)
    # (os.path.realpath does not raise on a symbolic link loop, which image_source names below; Path.resolve does)
    supports = sorted(supports, key=lambda pair: (os.path.realpath(pair[0]), os.path.realpath(pair[1])))
    # a support given twice counted as a second patient in the fits across support scans (a review): the same pair
    # is used once, the same scan with two label maps is refused
    unique_supports: dict[tuple[str, str], tuple] = {}
    for pair in supports:
        unique_supports.setdefault((os.path.realpath(pair[0]), os.path.realpath(pair[1])), pair)
    if len(unique_supports) < len(supports):
        logger.warning("%d support (image, label) pair(s) given more than once, used once",
                       len(supports) - len(unique_supports))
        supports = list(unique_supports.values())
    images_given = [real for real, _ in unique_supports]
    twice = sorted({p for p in images_given if images_given.count(p) > 1})
    if twice:
        raise ValueError(f"support image {twice[0]} is given with {images_given.count(twice[0])} label maps: each "
                         "support scan once, with the label map of the structure to segment")
    if label_value is not None and label_value < 1:
        raise ValueError(f"--label-value {label_value}: 0 is the background and labels are non-negative; give the "
                         "structure's value (1 or more), or leave it out for every non-zero voxel")
    if modality is not None and not modality.strip():
        raise ValueError("--modality is empty: give CT or MR")
    if modality is not None and normalise_modality(modality) not in ("CT", "MR"):
        logger.warning("--modality %r is neither CT nor a spelling of MR: files that do not say their modality are "
                       "read as MR (scaled between intensity percentiles, not a CT window)", modality)
    if output_format == "dicom-seg":
        from imaging_meta.commands.dicom_seg import require_highdicom

        require_highdicom()  # the optional extra, before the work rather than after it
        for query in queries:
            q = Path(query)
            if is_nifti(q.name):
                raise ValueError(f"--format dicom-seg needs a DICOM series query; {q} is NIfTI (use --format nifti)")
            if not q.is_dir():
                raise ValueError(f"--format dicom-seg needs a DICOM series query; {q} is not a folder of DICOM files")
            enhanced = _multi_frame_file(q)
            if enhanced:
                raise ValueError(f"{enhanced}: a multi-frame (enhanced) series; --format dicom-seg writes a segmentation "
                                 "of single-frame series only: use --format nifti for this query")

    unique: dict[tuple[str, str], str | Path] = {}  # a query given twice (`a.nii.gz`, `./a.nii.gz`): segmented once;
    for query in queries:  # links of other names to one scan stay apart (their masks have their names)
        where = Path.cwd() / query  # not os.path.abspath, which drops `link/..` without following the link; the
        # folder resolved (links and ..), the query's own name kept
        unique.setdefault((os.path.realpath(where.parent), where.name), query)
    if len(unique) < len(queries):
        logger.warning("%d query path(s) given more than once, segmented once", len(queries) - len(unique))
        queries = list(unique.values())
    for _, label in supports:  # a label's own advice first (as an image, a SEG file was told to give a folder)
        label_format(Path(label))
    inputs = [*(p for pair in supports for p in pair), *queries]
    for path in inputs:  # every input, before the checkpoint is read (the reads below take them as checked)
        image_source(path)
    inputs.append(checkpoint)  # never overwritten either
    for _, label in supports:
        values = check_label_source(label, label_value)
        if label_value is None and len(values) > 1:  # a multi-label map: the union of its structures is segmented
            shown = ", ".join(map(str, values[:12])) + (", ..." if len(values) > 12 else "")
            logger.warning("%s holds %d label values (%s): without --label-value every non-zero voxel is the structure, "
                           "all of them together; give --label-value to segment one", label, len(values), shown)
    out = check_output_folder(out_dir)
    planned = [(p, str(q)) for q in queries for p in output_paths(q, out, output_format, explain)]
    check_outputs(planned, inputs)
    for path, _ in planned:  # a folder of a mask's name fails now, not after the work
        if path.is_dir():
            raise ValueError(f"{path}: a folder of that name exists where this run writes a file; move it, or give "
                             "another --out folder")
    _check_same_structure([paths[0] for paths in (output_paths(q, out, output_format) for q in queries)], name, queries)
    if explain:  # a file of the user's named like a probability map was replaced without a word (a review)
        _check_same_structure([output_paths(q, out, output_format, True)[1] for q in queries], name, queries,
                              ", probability")
    if not explain:  # left as it is, but a map of another run beside this run's mask could be taken for its own
        for stale in (p for q in queries for p in output_paths(q, out, output_format, True)[1:] if p.exists()):
            logger.warning("%s is a probability map of an earlier run, not of this one (without --explain this run "
                           "writes none): remove it, or pass --explain to replace it", stale)
    dev = resolve_device(device)
    learner, pre = _segmenter(checkpoint, dev)
    trained_fov = [float(n) * float(sp) for n, sp in zip(pre["slice_size"], pre["spacing"], strict=True)]
    fallback = pre.get("modality")  # the data config's modality for files that do not say, when it set one
    support_list = [modality_of(image, modality, fallback) for image, _ in supports]
    support_modalities = set(support_list)
    if len(support_modalities) > 1:  # one histogram and calibration would be fitted over CT windows and MR percentiles
        kinds = "; ".join(f"{m}: " + first([str(img) for (img, _), k in zip(supports, support_list, strict=True) if k == m],
                                           sep=", ") for m in sorted(support_modalities))
        raise ValueError(f"the support scans are of {len(support_modalities)} modalities ({kinds}): give supports of one "
                         "modality, the queries' (a query of another modality is segmented by the learner alone)")
    # every query's modality before any work (headers and sidecars only): an undeclared one is a usage error
    query_modalities = [modality_of(q, modality, fallback) for q in queries]
    if scale != "checkpoint":
        from imaging_meta.evaluation.scans import supports_preprocessing

        pre = supports_preprocessing(pre, [(str(image), str(label), label_value, kind)
                                           for (image, label), kind in zip(supports, support_list, strict=True)], scale)
        logger.info("segmenting at %s mm, %s pixels per slice", pre["spacing"], pre["slice_size"])
    tf_pair = volume_transforms(pre["spacing"], pre["slice_size"], pre["ct_window"], pre["mr_percentiles"])
    tf_image = volume_transforms(pre["spacing"], pre["slice_size"], pre["ct_window"], pre["mr_percentiles"], keys=("image",))
    supports_pre = _support_volumes(
        tf_pair, supports, label_value, support_list, max_support_slices, pre["spacing"], pre["slice_size"],
        "Pass --scale structure (a spacing and field of view chosen from the structure), or label more of it"
        if scale == "checkpoint" else "Label more of it, or crop the support scan around it")
    support_images = {Path(img).resolve() for img, _ in supports}
    same = [q for q in queries if Path(q).resolve() in support_images]
    if same:
        logger.warning("%d quer%s also a support scan (e.g. %s): its mask is drawn from its own labels, so it says "
                       "nothing about new scans", len(same), "y is" if len(same) == 1 else "ies are", same[0])
    options = options or ScanOptions(max_support_slices=max_support_slices, query_chunk=query_chunk)
    # one segmenter per set of options (the queries of the supports' modality, and the learner alone for the
    # others), each fitted once, when a query first needs it; with adaptation, one learner per query, adapted
    # on the supports and that query alone, so that a query's mask does not depend on the other queries
    fitted: dict[ScanOptions, ScanSegmenter] = {}

    def segmenter_for(opts: ScanOptions, query_volume: torch.Tensor) -> ScanSegmenter:
        if adapt_steps > 0:
            # looked up at call time (benchmarks.segment_cost times it)
            from imaging_meta.adaptation import adapt

            adapted = adapt(learner, supports_pre, [query_volume], steps=adapt_steps, seed=adapt_seed, device=dev)
            segmenter = ScanSegmenter(adapted, opts, dev, progress).fit(supports_pre)
            _log_fitted(segmenter)
            return segmenter
        if opts not in fitted:
            fitted[opts] = ScanSegmenter(learner, opts, dev, progress).fit(supports_pre)
            _log_fitted(fitted[opts])
        return fitted[opts]

    # the largest component, unless a support shows the structure in several parts (ribs, both kidneys)
    parts = max(structure_parts(mask.numpy()) for _, mask in supports_pre)
    out.mkdir(parents=True, exist_ok=True)
    masks_written, probs_written = [], []
    seg_failures: list[str] = []
    unreadable: list[str] = []  # a query whose volume cannot be used is named, and the others are still segmented
    first_error: Exception | None = None
    said_unchecked = False  # the appearance check's being off, said once a run
    for query, query_modality in progress(zip(queries, query_modalities, strict=True), "segment: queries",
                                          total=len(queries), unit="scan"):
        q = Path(query)
        try:
            vol = tf_image({"image": str(q), "modality": query_modality})["image"]  # (1, H, W, D) MetaTensor
        except Exception as e:  # bad input (a missing slice, truncated or NaN data) names the file; else a bug
            message = user_error(e)
            if message is None:
                raise
            unreadable.append(message)  # named in the error at the end (the first few) or in a warning before it
            first_error = first_error or e
            continue
        opts = options if query_modality in support_modalities else across_modalities(options)
        if opts != options:
            logger.warning(
                "%s is %s and the support %s: the support's intensity evidence, calibration and slice gate do not "
                "carry across modalities, so this query is segmented by the learner alone (real CT and MR of two "
                "patients, 12 structures: 3D Dice 0.17 against 0.07 with them; 0.31 with --scale checkpoint "
                "--adapt-steps 0; docs/segmentation.md)",
                q.name, query_modality, "/".join(sorted(support_modalities)))
        volume = vol.as_tensor()[0].float()
        cut = _cropped_field(vol, pre)
        if cut is not None and min(trained_fov) > min(cut[1]):
            logger.warning(
                "%s spans %.0f x %.0f mm in plane, and the working slices hold its central %.0f x %.0f mm (the field of "
                "view of the support scans at %.2f mm): a structure outside them is not found. Give supports of the "
                "query's field of view, crop the query around the region, or pass --scale checkpoint (%.0f x %.0f mm)",
                q.name, *cut[0], *cut[1], float(pre["spacing"][0]), *trained_fov)
        elif cut is not None:  # the checkpoint's own field of view: since each scan is cut to its body, what spans
            # more is body, not the air of a wide grid (a large patient's flanks)
            logger.warning(
                "%s spans %.0f x %.0f mm in plane (its body), and the working slices hold its central %.0f x %.0f mm "
                "(the checkpoint's %d x %d pixels at %.2f mm): a structure outside them is not found. Crop the query "
                "around the region, or segment with a checkpoint trained on wider slices",
                q.name, *cut[0], *cut[1], *(int(n) for n in pre["slice_size"]), float(pre["spacing"][0]))
        segmenter = segmenter_for(opts, volume)
        probs = segmenter.predict(volume)
        novelty = segmenter.novelty
        unlike = segmenter.unlike and opts == options
        unchecked = segmenter.appearance_unchecked if novelty is None and opts == options else None
        if empty_if_unlike and (novelty is None or opts != options):
            logger.warning("%s: --empty-if-unlike did not check this query (%s); its mask is written as found", q.name,
                           "another modality than the supports" if opts != options
                           else unchecked or "no body slice to measure")
        elif unchecked is not None and not said_unchecked:  # the check is said to be always on: once a run
            logger.warning("the appearance check of the queries is off: %s", unchecked)
            said_unchecked = True
        if unlike:
            logger.warning(
                "%s looks unlike the support scan%s: in the model's features its slices lie %.1f times farther from "
                "the nearest support slice than the support's slices from each other (above %g; other scans of the "
                "same region measured 0.7 to 10). It may be another body region, field of view or protocol, and may "
                "not show the structure, yet segment marks something in almost every such scan (docs/segmentation.md): "
                "check this mask.%s", q.name, "s" if len(supports) > 1 else "", novelty, NOVELTY_WARN,
                " --empty-if-unlike: its mask is left empty" if empty_if_unlike
                else " An empty answer is not segmented again" if opts.relax_empty and opts.calibrate else "")
            if empty_if_unlike:
                probs = torch.zeros_like(probs)
        if segmenter.relaxed:
            logger.warning(
                "%s: the segmenter found nothing, so it was segmented again %s: the support's intensities and slice "
                "gate, fitted on the support scan, can veto the structure in another patient's scan or contrast phase "
                "(docs/segmentation.md). Check this mask; pass --keep-empty when a query may not show the structure",
                q.name, segmenter.relaxed)
        # linear interpolation back to the query grid (the image's own modes), then one threshold
        source, source_affine = to_source_grid(vol, probs, tf_image)
        prob_map = np.clip(source, 0.0, 1.0, out=source)  # (X, Y, Z), in place: a CT's grid is GBs
        mask = prob_map > 0.5
        if largest_component and mask.any():
            mask = keep_components(mask, parts)
        if not mask.any() and not (unlike and empty_if_unlike):  # that one was warned about, and emptied, above
            found = int((probs > 0.5).sum())
            logger.warning(
                "%s: the mask is empty: %s. Check that this scan shows the structure; --explain writes the "
                "probability map", q.name,
                f"the segmenter marked {found} voxels at its own {_mm(pre['spacing'])} mm, and none is left after "
                "interpolation to this scan's grid (the structure may be thinner than that spacing, or the voxels lie outside "
                "the scan's field of view, in the padding of the working grid)" if found
                else "the segmenter found nothing" + (" (--keep-empty: not segmented again)"
                                                     if opts.calibrate and not opts.relax_empty else ""))
        paths = output_paths(q, out, output_format, explain)
        if q.is_dir():  # a DICOM series: scanner coordinates, in mm
            affine, geometry = source_affine, NiftiGeometry.scanner(source_affine, mask.shape)
        else:
            # a NIfTI volume: its own sform and qform, codes and spatial unit (the mask lies on its voxels in any reader)
            header = cast(SpatialImage, nib.load(str(q)))
            affine, geometry = header.affine, NiftiGeometry.of(header)
            if mask.shape != header.shape[:3]:
                raise RuntimeError(f"{q}: inverted mask shape {mask.shape} differs from the image {header.shape}")
            if len(header.shape) > 3:  # (X, Y, Z, 1, ...): a true 4D scan is refused on reading; the mask keeps
                mask = mask.reshape(header.shape)  # the query's own shape (a review: it came out 3D)
                prob_map = prob_map.reshape(header.shape)
        mark = query_mark(q)  # a NIfTI query's whole file digested: once for the mask and its probability map
        if output_format == "dicom-seg":
            try:
                target = _write_seg(mask, q, affine, paths[0], name)
            except ValueError as e:  # highdicom's refusal of one series: the other queries are still written
                logger.warning("%s: no DICOM Segmentation written: %s", q.name, e)
                seg_failures.append(str(e))
                continue
        else:
            target = save_nifti(mask.astype(np.uint8), geometry, paths[0], nifti_description(name), mark)
        logger.info("%s: %d foreground voxels -> %s%s", q.name, int(mask.sum()), target,
                    "" if novelty is None else f" (novelty {novelty:.2f})")
        masks_written.append(target)
        if explain:
            probs_written.append(save_nifti(prob_map, geometry, paths[1], nifti_description(name, ", probability"),
                                            mark))
    if len(queries) == 1 and unreadable:
        raise ValueError(unreadable[0]) from first_error
    for message in unreadable[LISTED:]:
        logger.warning("not segmented: %s", message)
    if unreadable:
        written = f"{len(masks_written)} mask(s) written to {out}" if masks_written else "nothing was written"
        raise ValueError(f"{len(unreadable)} of {len(queries)} queries were not segmented, their volume cannot be used "
                         f"({written}): {listed(unreadable)}"
                         + (f"; and {len(seg_failures)} got no DICOM Segmentation: {listed(seg_failures)}"
                            if seg_failures else "")) from first_error
    if seg_failures:
        raise ValueError(f"{len(seg_failures)} of {len(queries)} queries got no DICOM Segmentation (the others are "
                         f"in {out}; --format nifti writes a mask of every series): " + "; ".join(seg_failures))
    return masks_written + probs_written


def _multi_frame_file(folder: Path) -> Path | None:
    """A multi-frame (enhanced) image file of a series folder, else None (headers only). The folder's first image
    file (by name) decides: the reader refuses a folder that mixes an enhanced file with single-frame images of
    another series. Files that are not DICOM (a README beside an enhanced file) and DICOM objects that are not
    images (a DICOMDIR, a presentation state, a SEG, which is multi-frame too) are passed over, as the reader
    passes over them (reviews: an enhanced series split over two files or beside a README was refused only after
    the segmenting; a SEG sorting first got a single-frame series refused)."""
    from datamodules.io.dicom_checks import non_image_kind
    from datamodules.io.dicom_files import read_header

    for f in sorted(f for f in folder.iterdir() if f.is_file() and not f.name.startswith(".")):
        try:
            h = read_header(f)
        except Exception:  # not DICOM, or unreadable: the reader names the problem when the query is loaded
            continue
        if h.modality == "SEG" or non_image_kind(h) is not None:
            continue  # not an image: the reader leaves it out of the series
        return f if h.number_of_frames > 1 else None
    return None


def _log_fitted(segmenter: ScanSegmenter) -> None:
    """What the segmenter fitted (info), and the support self-check's warning when it is poor."""
    assert segmenter.support_images is not None  # fit sets them
    logger.info("segmenter fitted on %d support slices: %s", segmenter.support_images.shape[0],
                _plain(segmenter.describe()))
    if segmenter.options.position and not segmenter.describe().get("position_prior"):  # said, not ignored (a review)
        logger.warning("--position-prior is not used: it is fitted across two or more support scans that each show "
                       "the structure and have slices without it, with the calibration across scans (not "
                       "--pooled-calibration)")
    check = segmenter.support_dice
    # one slice used although more were allowed: the support shows the structure on one slice only
    if check is None and segmenter.options.calibrate and segmenter.support_images.shape[0] == 1 < \
            segmenter.options.max_support_slices:
        logger.warning("the support shows the structure on one slice only: its fusion is not fitted (the learner's "
                       "and the intensity evidence are added) and there is no support self-check; label more slices "
                       "for a calibrated answer")
    if check is not None and check < SUPPORT_CHECK_WARN:
        logger.warning(
            "support self-check: the support's own slices, each segmented from the others (with several support scans: "
            "from the other scans), reach a Dice of only %.2f; "
            "expect a poor mask (on the real scans of docs/segmentation.md every pair below %.1f scored at most 0.39 "
            "on its query). A checkpoint trained on scans like these, more support slices or --adapt-steps may help",
            check, SUPPORT_CHECK_WARN)


def across_modalities(options: ScanOptions) -> ScanOptions:
    """The segmenter for a query of another modality than its supports: the learner alone (`LEARNER_ONLY`), with
    the caller's slice limits. A histogram of CT numbers says nothing of MR intensities, and the calibration and
    gate are fitted on the learner's output for the support's modality."""
    return dataclasses.replace(LEARNER_ONLY, max_support_slices=options.max_support_slices,
                               max_negative_slices=options.max_negative_slices, query_chunk=options.query_chunk)


def _write_seg(mask: np.ndarray, folder: Path, affine: np.ndarray, target: Path, name: str) -> Path:
    """The DICOM-SEG of a series folder; the mask (reader layout) is checked against the series' geometry."""
    from datamodules.io.dicom import DicomSeriesReader
    from imaging_meta.commands.dicom_seg import write_dicom_seg

    # the same reader (and defaults) as the preprocessing: the same files in the same geometric order
    series = DicomSeriesReader().read(str(folder)).series
    if tuple(mask.shape) != tuple(series.shape) or not np.allclose(affine, series.affine, atol=1e-3):
        raise RuntimeError(
            f"{folder}: the inverted mask {mask.shape} does not have the series geometry {series.shape}; "
            "cannot align it with the DICOM slices"
        )
    return write_dicom_seg(mask, series.paths, target, segment_label=name)
