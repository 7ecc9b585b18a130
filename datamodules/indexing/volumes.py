"""Read and check NIfTI volumes and label maps, and compare a label's voxel grid with its image's.

Every NIfTI read path (`load_nifti` and `label_values` here for ``scan`` and ``segment``'s checks, and
`datamodules.transforms.volume.LoadVolumed` for the preprocessing) goes through `checked_nifti`: a CIFTI-2 file
is refused, and a file whose spatial unit (``xyzt_units``) is the metre or the micron is converted to mm (its
affine, sform, qform and pixdim; unknown units are read as mm, as ITK and nibabel do), so that spacings,
resampling and grid comparisons are always in mm.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import nibabel as nib
import numpy as np
from nibabel.openers import Opener
from nibabel.orientations import inv_ornt_aff, io_orientation, ornt_transform

from datamodules.indexing.inputs import Reject
from datamodules.io.nifti_names import compression_problem

logger = logging.getLogger(__name__)

#: a label grid matches its image when every grid corner lands within this fraction of a voxel (and 1 µm).
GRID_TOL_VOXELS = 0.05
#: millimetres per spatial unit, by the NIfTI ``xyzt_units`` code (its low 3 bits); 0 (unknown) is read as mm
MM_PER_UNIT = {0: 1.0, 1: 1000.0, 2: 1.0, 3: 0.001}
#: NIfTI intent codes of CIFTI-2 (NIFTI_INTENT_CONNECTIVITY_*)
CIFTI_INTENTS = range(3000, 3100)


def cifti_reason(img: Any) -> str | None:
    """Why ``img`` (as `nibabel.load` returns it) is no image volume when it is a CIFTI-2 file, else None."""
    header = getattr(img, "nifti_header", None) if isinstance(img, nib.Cifti2Image) else getattr(img, "header", None)
    try:
        intent = int(header["intent_code"]) if header is not None else 0
    except (KeyError, TypeError, ValueError):
        intent = 0
    if not isinstance(img, nib.Cifti2Image) and intent not in CIFTI_INTENTS:
        return None
    return _cifti_message(intent)


def _cifti_message(intent: int) -> str:
    return (
        f"a CIFTI-2 file (grayordinate data), not an image volume (NIfTI intent code {intent}): only 3D image "
        "volumes are read - give the NIfTI volume the CIFTI data was made from"
    )


def cifti_file_reason(path: str) -> str | None:
    """`cifti_reason` of a NIfTI file from its header's raw bytes (the intent code of a NIfTI-2 or NIfTI-1 header),
    without `nibabel.load`: a CIFTI-2 intent without a CIFTI-2 extension makes nibabel fail with an error that does
    not say what the file is. None for any other file, or one that cannot be read."""
    try:
        with Opener(path) as f:  # .nii or .nii.gz
            head = f.read(540)
    except Exception:
        return None
    for order in ("<", ">"):
        if len(head) >= 540 and np.frombuffer(head[:4], f"{order}i4")[0] == 540:
            intent = int(np.frombuffer(head[504:508], f"{order}i4")[0])
            break
        if len(head) >= 348 and np.frombuffer(head[:4], f"{order}i4")[0] == 348:
            intent = int(np.frombuffer(head[68:70], f"{order}i2")[0])
            break
    else:
        return None
    return _cifti_message(intent) if intent in CIFTI_INTENTS else None


def spatial_unit(img: Any) -> int:
    """The NIfTI spatial unit code of ``img`` (0 unknown, 1 metre, 2 mm, 3 micron; 0 for other images)."""
    header = getattr(img, "header", None)
    if not isinstance(header, nib.Nifti1Header):  # NIfTI-2 headers are Nifti1Header subclasses
        return 0
    return int(header["xyzt_units"]) & 0x07


def in_mm(img: Any) -> Any:
    """``img`` with its voxel-to-world geometry in mm: a NIfTI image in metres or microns becomes a new image of
    the same (lazy) data whose pixdim, qform offsets and sform rows are scaled and whose spatial unit is mm; any
    other image is returned as it is. The sform and qform codes, and the time unit, are kept."""
    code = spatial_unit(img)
    scale = MM_PER_UNIT.get(code, 1.0)
    if scale == 1.0:
        return img
    header = img.header.copy()
    header["pixdim"][1:4] = header["pixdim"][1:4] * scale
    for field in ("qoffset_x", "qoffset_y", "qoffset_z"):
        header[field] = header[field] * scale
    for field in ("srow_x", "srow_y", "srow_z"):
        header[field] = header[field] * scale
    header["xyzt_units"] = (int(header["xyzt_units"]) & ~0x07) | 2
    # the same file behind it (nibabel's file_map): the data stays lazy, with the file's own scaling
    return img.__class__(img.dataobj, header.get_best_affine(), header, extra=img.extra, file_map=img.file_map)


def orientation_unknown(img: Any) -> bool:
    """A NIfTI image whose sform_code and qform_code are both 0: its affine is nibabel's guess from pixdim."""
    header = getattr(img, "header", None)
    if not isinstance(header, nib.Nifti1Header):
        return False
    return int(header["sform_code"]) == 0 and int(header["qform_code"]) == 0


_WARNED_ORIENTATION: set[str] = set()


def warn_unknown_orientation(path: str, img: Any) -> None:
    """Log once per file (per process) that a NIfTI file does not say where its voxels lie."""
    if not orientation_unknown(img) or str(path) in _WARNED_ORIENTATION:
        return
    _WARNED_ORIENTATION.add(str(path))
    logger.warning(
        "%s: orientation unknown (sform_code and qform_code are 0): its voxels are placed from pixdim alone, so it "
        "may not be aligned with the other scans as you think - set the sform/qform from the source (e.g. convert "
        "the DICOM again with dcm2niix)",
        path,
    )


def checked_nifti(img: Any, path: str) -> Any:
    """What every NIfTI read path does after `nibabel.load`: refuse a CIFTI-2 file, warn when the orientation is
    unknown, and return the image in mm (`in_mm`).

    Raises:
        Reject: a CIFTI-2 file (the reason, without the file's name).
    """
    reason = cifti_reason(img)
    if reason:
        raise Reject(reason)
    warn_unknown_orientation(path, img)
    return in_mm(img)


#: the most voxels a volume may have (8 GiB as float32; a whole-body CT of 512 x 512 x 2000 has a quarter of it):
#: a header that declares more (a damaged one, or a gzip bomb) is refused before its data is read
MAX_VOXELS = 2**31


def spatial_shape(shape: Sequence[int]) -> list[int]:
    """``shape`` as ints without its trailing singleton dimensions beyond the third (a 3D map stored as
    (X, Y, Z, 1))."""
    out = [int(s) for s in shape]
    while len(out) > 3 and out[-1] == 1:
        out.pop()
    return out


def dimensions_reason(shape: Sequence[int]) -> str | None:
    """Why a NIfTI file of this shape (its own axis order, ``dim[1:]``) is no 3D volume, or None when it is one
    (trailing singleton dimensions allowed). NIfTI's 4th dimension is time, its 5th vector components."""
    shape = tuple(int(s) for s in shape)
    spatial = spatial_shape(shape)
    if len(spatial) < 3:
        return (
            f"{len(spatial)}D image (shape {shape}): a 3D volume is needed - stack the slices into one 3D NIfTI "
            "file (scan and fit need at least 3 slices; segment also takes one slice saved with shape (X, Y, 1))"
        )
    if len(spatial) == 3:
        voxels = int(np.prod(np.asarray(spatial, dtype=np.float64)))
        if voxels > MAX_VOXELS:
            return (f"shape {shape}: {voxels / 1e9:.1f} billion voxels ({4 * voxels / 2**30:.0f} GiB as float32), more "
                    f"than the {MAX_VOXELS / 1e9:.1f} billion read here; the header is damaged, or crop or resample "
                    "the volume first")
        return None
    if len(spatial) == 4:
        return (
            f"4D image (shape {shape}): only 3D volumes are read; split it into one 3D file per channel or time "
            "point (e.g. `fslsplit`)"
        )
    times = spatial[3]
    if len(spatial) == 5:
        what = f"a vector image of {spatial[4]} components per voxel" + (f", {times} time points" if times > 1 else "")
        return (
            f"5D image (shape {shape}): {what} (e.g. a displacement field or a tensor); only 3D volumes are read - "
            "split it into one 3D file per component, e.g. nibabel.save(nibabel.Nifti1Image(img.dataobj[:, :, :, "
            f"{'0' if times == 1 else 't'}, k], img.affine), 'component_k.nii.gz')"
        )
    return f"{len(spatial)}D image (shape {shape}): only 3D volumes are read - save each 3D volume as its own NIfTI file"


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
    label_shape = spatial_shape(label_shape)
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


def slice_count_fix(image_shape, image_affine, label_shape, label_affine) -> str | None:
    """The fix when an image and its label map lie on one grid but for whole slices along one axis (same axes,
    same spacing): a series that lost slices at an end, whose label map is right; None otherwise."""
    label_shape = spatial_shape(label_shape)
    image_affine, label_affine = np.asarray(image_affine, float), np.asarray(label_affine, float)
    if len(label_shape) != 3 or not np.allclose(image_affine[:3, :3], label_affine[:3, :3], atol=1e-3):
        return None
    differ = [i for i in range(3) if int(image_shape[i]) != label_shape[i]]
    if len(differ) != 1:
        return None
    axis = differ[0]
    step = image_affine[:3, axis]
    offset = np.linalg.lstsq(image_affine[:3, :3], label_affine[:3, 3] - image_affine[:3, 3], rcond=None)[0]
    others = [i for i in range(3) if i != axis]
    if not (np.allclose(offset[others], 0, atol=0.05) and abs(offset[axis] - round(offset[axis])) < 0.05):
        return None
    fewer = label_shape[axis] - int(image_shape[axis])
    where = f"{abs(fewer)} slice(s) {'fewer' if fewer > 0 else 'more'} than its label map"
    return (f"the image has {where} along axis {axis} ({float(np.linalg.norm(step)):.3g} mm apart), on the same grid "
            "otherwise: a series with slices missing at an end (copy the complete series again), or a label map "
            "drawn on another series")


def grid_fix(image_shape, image_affine, label_shape, label_affine) -> str:
    """What to do about a label map off its image's grid (`grid_mismatch`): `slice_count_fix` where that applies;
    where the shapes are the same, save the voxels again with the image's affine (a label saved without it, as
    ``Nifti1Image(data, np.eye(4))`` does, is placed hundreds of mm away, and resampling it would move the structure
    there; a review); else resample it."""
    fix = slice_count_fix(image_shape, image_affine, label_shape, label_affine)
    if fix is not None:
        return fix
    if spatial_shape(label_shape) == [int(v) for v in image_shape]:
        return ("the shapes are the same: if the label's voxels are the image's (a label saved without the image's "
                "affine, e.g. Nifti1Image(data, np.eye(4)) or with no sform/qform), save the same data with the image's "
                "affine (Nifti1Image(data, image.affine, image.header)); else resample the label onto the image grid "
                "(nearest neighbour)")
    return "resample the label onto the image grid (nearest neighbour)"


@dataclass
class Volume:
    """An image's voxel grid: shape (3,) and voxel -> world affine (4, 4)."""

    shape: list[int]
    affine: np.ndarray


def affine_reason(affine) -> str | None:
    """Why a voxel-to-world affine cannot place the voxels (not finite, or singular), or None when it can."""
    a = np.asarray(affine, dtype=np.float64)
    if not np.all(np.isfinite(a)) or abs(np.linalg.det(a[:3, :3])) < 1e-12:
        return f"invalid voxel-to-world affine (sform/qform) {a.tolist()}; fix the header"
    return None


def load_nifti(path: str) -> tuple[Any, np.ndarray, list[int]]:
    """Header and data of a 3D NIfTI, its geometry in mm (`checked_nifti`); `Reject` with the reason otherwise."""
    try:
        img: Any = nib.load(path)  # a spatial image (nibabel types it as the file-based base class)
    except Exception as e:
        cifti = cifti_file_reason(path)
        if cifti:
            raise Reject(cifti) from e
        renamed = compression_problem(path)
        if renamed:
            raise Reject(renamed) from e
        raise Reject(
            f"cannot read the NIfTI header ({type(e).__name__}: {e}); the file is corrupt or not NIfTI - "
            "copy it again from the source, or rename it if it is another format"
        ) from e
    img = checked_nifti(img, path)
    shape = [int(s) for s in img.shape]
    problem = dimensions_reason(shape)
    if problem:
        raise Reject(problem)
    spatial = shape[:3]
    problem = affine_reason(img.affine)
    if problem:
        raise Reject(problem)
    try:
        data = np.asanyarray(img.dataobj)
    except Exception as e:
        raise Reject(
            f"cannot read the NIfTI data ({type(e).__name__}: {e}); the file is probably truncated or corrupt - "
            "copy it again from the source"
        ) from e
    if data.dtype.fields is not None:
        raise Reject(f"RGB/structured NIfTI data ({data.dtype}): not a grey-level volume")
    if np.iscomplexobj(data):
        raise Reject(f"complex-valued data ({data.dtype}): not a grey-level volume")
    return img, data.reshape(spatial), spatial


#: a volume that does not state its modality is read as CT when at least this share of its voxels lies at air's
#: -1000 HU (-1100 to -900) ...
AIR_SHARE = 0.02
#: ... and at most this share lies above +1000 HU (dense bone and metal are rare in CT; a signed MR phase map
#: spread evenly over thousands of units has as many values there as near -1000)
DENSE_SHARE = 0.05


def hounsfield_air_share(data: np.ndarray, slope: float = 1.0, inter: float = 0.0) -> float | None:
    """The share of a volume's voxels at air's Hounsfield units when its intensities look like CT in HU
    (`AIR_SHARE`, `DENSE_SHARE`), else None. ``data`` may be the stored integers with the file's ``slope`` and
    ``inter`` (values are ``data * slope + inter``), so that a large volume is never copied to float.

    MR has no intensities near -1000; a CT stored without its rescale (0 to 4095) is not recognised, nor is
    anything with more than three non-singleton dimensions. Not caught: an MR resampled into a grid filled with
    -1000 (the warning that names the inferred modality is there for that)."""
    if data.size == 0 or data.dtype.kind not in "iuf" or sum(int(n) > 1 for n in data.shape[3:]) > 0:
        return None
    slope, inter = float(slope), float(inter)
    if not np.isfinite(slope) or not np.isfinite(inter) or slope == 0:
        return None
    lo, hi, dense = ((v - inter) / slope for v in (-1100.0, -900.0, 1000.0))
    if slope < 0:
        lo, hi = hi, lo
    air = float(np.count_nonzero((data >= lo) & (data <= hi))) / data.size
    high = float(np.count_nonzero(data > dense if slope > 0 else data < dense)) / data.size
    return air if air >= AIR_SHARE and high <= DENSE_SHARE else None


def check_image_data(data: np.ndarray, min_slices: int) -> None:
    """`Reject` an image that is too small along an axis, holds NaN/Inf, or is constant."""
    if min(data.shape) < min_slices:
        raise Reject(f"shape {tuple(data.shape)}: a volume needs at least {min_slices} voxels along every axis")
    if np.issubdtype(data.dtype, np.floating):
        bad = int(np.count_nonzero(~np.isfinite(data)))
        if bad:
            raise Reject(f"contains NaN/Inf values ({bad} voxels); fix or mask them before scanning")
    lo, hi = data.min(), data.max()
    if lo == hi:
        raise Reject(
            f"constant image (every voxel is {float(lo):g}): no usable content; export it again from the source "
            "or remove it"
        )


def label_values(path: str, rel: str, image: Volume) -> list[int]:
    """Check a label map against its image; return the non-zero values present."""
    try:
        img: Any = nib.load(path)
    except Exception as e:
        cifti = cifti_file_reason(path)
        raise Reject(f"label map {rel}: {cifti or f'cannot read the NIfTI header ({type(e).__name__}: {e})'}") from e
    try:
        img = checked_nifti(img, path)
    except Reject as e:
        raise Reject(f"label map {rel}: {e}") from e
    try:
        mismatch = grid_mismatch(image.shape, image.affine, img.shape, np.asarray(img.affine, dtype=np.float64))
    except Exception as e:
        raise Reject(f"label map {rel}: cannot compare its grid with the image ({type(e).__name__}: {e})") from e
    if mismatch:
        fix = grid_fix(image.shape, image.affine, img.shape, np.asarray(img.affine, dtype=np.float64))
        raise Reject(f"label map {rel} does not match its image: {mismatch}; {fix}")
    try:
        data = np.asanyarray(img.dataobj)
    except Exception as e:
        raise Reject(f"label map {rel}: cannot read the data ({type(e).__name__}: {e}); the file may be truncated") from e
    return label_data_values(data, rel)


#: more distinct values than this, and a "label map" is an image (a CT or MR volume passed by mistake)
MAX_LABELS = 1000
#: with more distinct values than `FEW_LABELS` and at least `IMAGE_FOREGROUND` of its voxels non-zero, a "label
#: map" in which fewer than this share of neighbouring voxel pairs (along its most regular axis, pairs that are not
#: both background) hold the same value is an image: label maps are piecewise constant (0.72-0.99 on the label maps
#: of benchmarks/real and the demo), scans are noisy (0.00-0.09 on their images, among them an MR of 832 distinct
#: values). Scans are non-zero almost everywhere (91-100% there, label maps 0.1-30%); a map of many tiny regions
#: (small lesions, points, scribbles), whose neighbours are mostly background, is not refused
MIN_SAME_NEIGHBOURS = 0.3
FEW_LABELS = 20
IMAGE_FOREGROUND = 0.5


def same_neighbours(data: np.ndarray) -> float:
    """The largest, over the axes, share of neighbouring voxel pairs that hold the same value, among the pairs that
    are not both 0 (1.0 when there is none)."""
    best = 0.0
    for axis in range(data.ndim):
        if data.shape[axis] < 2:
            continue
        a, b = np.moveaxis(data, axis, 0)[:-1], np.moveaxis(data, axis, 0)[1:]
        some = (a != 0) | (b != 0)
        n = int(some.sum())
        best = max(best, float((a[some] == b[some]).sum()) / n if n else 1.0)
    return best


def label_data_values(data: np.ndarray, rel: str) -> list[int]:
    """The non-zero values of a label map's data; `Reject` data that is no label map: NaN/Inf, non-integer or
    negative values, no background, no foreground, or more than `MAX_LABELS` distinct values, or more than
    `FEW_LABELS` that are not piecewise constant in a volume that is mostly non-zero (`same_neighbours`; an image)."""
    if np.issubdtype(data.dtype, np.floating):
        if not np.all(np.isfinite(data)):
            raise Reject(f"label map {rel} contains NaN/Inf values; expected integer structure labels")
        frac = data != np.round(data)
        if frac.any():
            example = float(data[frac].flat[0])
            raise Reject(
                f"label map {rel} has non-integer values (e.g. {example!r}, {int(frac.sum())} voxels); expected "
                "integer structure labels - was it resampled with linear interpolation? use nearest neighbour"
            )
    elif not np.issubdtype(data.dtype, np.integer) and data.dtype != np.bool_:
        raise Reject(f"label map {rel} has data type {data.dtype}; expected integer structure labels")
    values = np.unique(data)
    if values.size > MAX_LABELS:
        raise Reject(
            f"label map {rel} has {values.size} distinct values (at most {MAX_LABELS} structures are expected): "
            "this looks like an image, not a label map - check which file is the label"
        )
    foreground = np.count_nonzero(data) / max(data.size, 1)
    if values.size > FEW_LABELS and foreground >= IMAGE_FOREGROUND:
        same = same_neighbours(data)
        if same < MIN_SAME_NEIGHBOURS:
            raise Reject(
                f"label map {rel} has {values.size} distinct values, is non-zero in {foreground:.0%} "
                f"of its voxels, and only {same:.0%} of neighbouring voxels share a value, as in a scan (a label map's "
                "structures are regions of one value): this looks like an image, not a label map - check which file "
                "is the label"
            )
    if values.size and values.min() < 0:
        raise Reject(f"label map {rel} has negative values (min {values.min():g}); expected labels >= 0")
    present = [int(v) for v in values if v != 0]
    if not present:
        raise Reject(f"label map {rel} is empty (no foreground voxel); remove it or label the structures")
    if values[0] != 0:
        raise Reject(
            f"label map {rel} has no background: every voxel is labelled ({', '.join(str(v) for v in present[:5])}"
            f"{', ...' if len(present) > 5 else ''}), so it is not a mask of structures - is it an image, or an "
            "inverted mask? Label the background 0, or remove it"
        )
    return present
