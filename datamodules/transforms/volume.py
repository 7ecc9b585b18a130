"""MONAI dictionary transforms, keys ``"image"`` and ``"label"``.

Two stages:

* `volume_transforms` (deterministic, cached): load (NIfTI, its geometry in mm whatever its header's spatial
  unit, or a geometry-ordered DICOM series), channel first, a check that rejects unusable volumes
  (`CheckVolumed`: 4D or 5D, NaN/Inf, constant, a label off its image's grid), RAS orientation, in-plane resampling to a target spacing, intensity normalisation per modality
  (CT: a HU window; MR: percentile scaling), an in-plane crop to the body (`datamodules.transforms.body`: air,
  a couch or a background around it is cut, so that the scan is centred on its body), and an in-plane pad/crop to
  a fixed slice size. The axial
  axis is the last one, so ``volume[..., z]`` is a fixed-size 2D slice.
* `slice_augmentation` (random, seeded): 2D geometric and intensity augmentation of a slice; one draw is
  applied to image and label alike.
"""

from __future__ import annotations

import functools
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from monai.config import KeysCollection
from monai.data import NibabelReader
from monai.transforms import (
    Compose,
    EnsureChannelFirstd,
    LoadImage,
    MapTransform,
    Orientationd,
    RandAdjustContrastd,
    RandAffined,
    RandBiasFieldd,
    RandGaussianNoised,
    RandGaussianSmoothd,
    RandHistogramShiftd,
    RandScaleIntensityd,
    ResizeWithPadOrCropd,
    Spacingd,
    Transform,
)
from monai.utils import TraceKeys, ensure_tuple

from datamodules.indexing.inputs import Reject
from datamodules.indexing.scan import grid_mismatch
from datamodules.indexing.volumes import (
    affine_reason,
    checked_nifti,
    cifti_file_reason,
    dimensions_reason,
    grid_fix,
)
from datamodules.io.dicom import DicomSeriesReader
from datamodules.transforms.body import BodyCropd, FindBodyd

CT_MODALITIES = ("CT",)


def as_plain_tensor(t) -> torch.Tensor:
    """A plain tensor (MONAI MetaTensor metadata dropped), so that episodes built from cached volumes stay light."""
    return t.as_tensor() if hasattr(t, "as_tensor") else torch.as_tensor(t)


def _source(img) -> str:
    """The file an image was loaded from, for messages (a DICOM series: its first file and slice count)."""
    meta = getattr(img, "meta", {}) or {}
    src = meta.get("filename_or_obj", "<array>")
    if isinstance(src, (list, tuple)):
        return f"{src[0]} (+{len(src) - 1} slices)" if src else "<series>"
    # written by DicomSeriesReader (MONAI keeps only the first file name); an enhanced multi-frame series is one
    # file of many slices
    n_files = meta.get("n_files", meta.get("n_slices"))
    if n_files is not None and int(n_files) > 1:
        return f"{src} (the first of the {int(n_files)} files of its DICOM series)"
    return str(src)


class CheckVolume(Transform):
    """Reject a loaded volume that cannot be used, with a message naming its file and the fix.

    Corrupt values are never repaired here (no NaN -> 0): the volume is returned unchanged or an error is
    raised. The file name comes from the MetaTensor's ``filename_or_obj`` metadata.

    Args:
        allow_constant: accept a constant volume (True for label maps, where an all-background map is valid
            at this stage; the scan rejects empty label maps).

    Raises:
        ValueError: the volume is not one channel-first 3D volume (1, X, Y, Z) (a 2D image, a 4D image such
            as a time series or several channels in one file, a 5D vector image), holds NaN or Inf values, or is
            constant.
    """

    def __init__(self, allow_constant: bool = False):
        self.allow_constant = bool(allow_constant)

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        """Check ``img`` (C, X, Y, Z), channel first; return it unchanged."""
        src = _source(img)
        shape = tuple(int(v) for v in img.shape)
        if img.ndim != 4:
            file_shape = _file_shape(img)
            problem = dimensions_reason(file_shape) or (
                f"a 3D volume stored with {len(file_shape) - 3} extra singleton dimension(s) (shape {file_shape}); "
                f"save it with shape {file_shape[:3]}"
            )
            raise ValueError(f"{src}: {problem}")
        if shape[0] != 1:
            raise ValueError(
                f"{src}: {shape[0]} volumes in one file (4D image, channel-first shape {shape}); only 3D volumes "
                "are read - split it into one 3D file per time point or channel (e.g. `fslsplit`) and use one"
            )
        if img.is_floating_point() or img.is_complex():
            bad = int((~torch.isfinite(img)).sum())
            if bad:
                raise ValueError(
                    f"{src}: {bad} NaN/Inf voxel(s) of {img.numel()}; repair the file at its source or exclude it "
                    "(corrupt values are never replaced)"
                )
        if not self.allow_constant and img.numel() > 0:
            lo, hi = img.min(), img.max()
            if bool(lo == hi):
                raise ValueError(
                    f"{src}: constant image (every voxel is {float(lo):g}), nothing to learn from; export it again "
                    "from the source or exclude it"
                )
        return img


class CheckVolumed(MapTransform):
    """Dictionary twin of `CheckVolume`: the first key is the image, the others its label maps.

    The image must not be constant; each label map must be a 3D volume on the image's voxel grid (compared
    with `datamodules.indexing.scan.grid_mismatch`, so a flipped or permuted copy of the same grid passes). Use it
    right after ``EnsureChannelFirstd``.

    Args:
        keys: image key first, then label keys.
        allow_missing_keys: skip keys that are absent.

    Raises:
        ValueError: as `CheckVolume`, or a label map whose grid differs from its image's (naming both files).
    """

    def __init__(self, keys: KeysCollection, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.image_check = CheckVolume(allow_constant=False)
        self.label_check = CheckVolume(allow_constant=True)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        image = None
        for key in self.key_iterator(d):
            if image is None:
                image = self.image_check(d[key])
                continue
            label = self.label_check(d[key])
            mismatch = grid_mismatch(image.shape[1:], _affine(image), label.shape[1:], _affine(label))
            if mismatch:
                fix = grid_fix(image.shape[1:], _affine(image), label.shape[1:], _affine(label))
                raise ValueError(f"{_source(label)}: label map does not match its image {_source(image)}: {mismatch}; {fix}")
        return d


def _file_shape(img) -> tuple[int, ...]:
    """The shape of a loaded image as its file stores it: NIfTI's ``dim`` (x, y, z, time, components), else the
    channel-first shape with the channel moved last."""
    meta = getattr(img, "meta", {}) or {}
    dim = meta.get("dim")
    if dim is not None:
        dim = [int(v) for v in np.asarray(dim).ravel()]
        if dim and 1 <= dim[0] <= 7 and len(dim) > dim[0]:
            return tuple(dim[1 : dim[0] + 1])
    shape = tuple(int(v) for v in img.shape)
    return shape[1:] + shape[:1]


def _affine(img) -> np.ndarray:
    affine = getattr(img, "affine", None)
    return np.eye(4) if affine is None else np.asarray(affine, dtype=np.float64)


class ModalityIntensity(Transform):
    """Scale intensities to about [0, 1] by modality.

    CT (Hounsfield units): clip to ``ct_window`` and scale linearly. Other modalities (MR): scale between
    the ``mr_percentiles`` of the non-zero voxels, then clip.

    Args:
        ct_window: (lower, upper) HU window.
        mr_percentiles: (lower, upper) percentiles in [0, 100].

    Raises:
        ValueError: for an image with NaN or Inf values, or a constant image (naming the source file).
    """

    def __init__(self, ct_window: Sequence[float] = (-250.0, 250.0), mr_percentiles: Sequence[float] = (1.0, 99.0)):
        lo, hi = ct_window
        plo, phi = mr_percentiles
        if not hi > lo:
            raise ValueError(f"ct_window must be (lower, upper) with upper > lower, got {tuple(ct_window)}")
        if not 0 <= plo < phi <= 100:
            raise ValueError(f"mr_percentiles must satisfy 0 <= lower < upper <= 100, got {tuple(mr_percentiles)}")
        self.ct_window = (float(lo), float(hi))
        self.mr_percentiles = (float(plo), float(phi))

    # MONAI's Transform declares __call__(data); an array transform that needs the modality takes two arguments
    def __call__(self, img: torch.Tensor, modality: str) -> torch.Tensor:  # type: ignore[override]
        if not torch.isfinite(img).all():
            raise ValueError(f"{_source(img)}: image contains NaN or Inf values; repair or exclude this file")
        if modality.upper() in CT_MODALITIES:
            lo, hi = self.ct_window
        else:
            nz = img[img != 0]
            values = (nz if nz.numel() > 0 else img.reshape(-1)).float()
            if values.numel() > 1_000_000:  # quantile's size limit; a strided sample is plenty
                values = values[:: values.numel() // 1_000_000 + 1]
            q = torch.tensor(self.mr_percentiles, dtype=values.dtype) / 100.0
            lo, hi = (float(v) for v in torch.quantile(values, q))
        if not hi > lo:
            raise ValueError(f"{_source(img)}: constant image (all voxels near {lo:g}); nothing to learn from it")
        return ((img - lo) / (hi - lo)).clamp(0.0, 1.0)


class ModalityIntensityd(MapTransform):
    """Dictionary twin of `ModalityIntensity`; the modality is read from ``data[modality_key]``."""

    def __init__(
        self,
        keys: KeysCollection,
        modality_key: str = "modality",
        ct_window: Sequence[float] = (-250.0, 250.0),
        mr_percentiles: Sequence[float] = (1.0, 99.0),
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.modality_key = modality_key
        self.scaler = ModalityIntensity(ct_window, mr_percentiles)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        modality = str(d.get(self.modality_key, "unknown"))
        for key in self.key_iterator(d):
            d[key] = self.scaler(d[key], modality)
        return d


class BinarizeLabel(Transform):
    """Foreground mask of one structure: ``label == value`` (or ``label > 0`` when value is None)."""

    def __init__(self, value: int | None = None):
        self.value = value

    def __call__(self, label: torch.Tensor) -> torch.Tensor:
        mask = label > 0 if self.value is None else label == self.value
        return mask.to(torch.float32)


class BinarizeLabeld(MapTransform):
    """Dictionary twin of `BinarizeLabel`."""

    def __init__(self, keys: KeysCollection, value: int | None = None, allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.binarize = BinarizeLabel(value)

    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.binarize(d[key])
        return d


class CastLabeld(MapTransform):
    """Round a resampled label map to integers and store it compactly: uint8, int16 above 255, int32 above 32767
    (atlas-style ids such as 65537 would wrap around in int16 and merge with another structure)."""

    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            lbl = d[key]
            low, high = float(lbl.min()), float(lbl.max())
            if low >= 0 and high <= 255:
                dtype = torch.uint8
            elif low >= -32768 and high <= 32767:
                dtype = torch.int16
            else:
                dtype = torch.int32
            d[key] = torch.round(lbl).to(dtype)
        return d


@functools.cache
def _shared_loader() -> LoadImage:
    """One MONAI `LoadImage` per process: building one instantiates every registered reader (with their log
    lines and warnings); `LoadVolumed` always passes the reader to use, so they never read anything."""
    return LoadImage(image_only=True)


def unreadable_nifti(name, error: BaseException) -> ValueError:
    """The error of a NIfTI file that nibabel cannot read, naming it."""
    return ValueError(
        f"{name}: cannot read this NIfTI file ({type(error).__name__}: {error}); it is truncated, corrupt or "
        "not NIfTI - copy it again from the source"
    )


#: changes whenever the volume readers give other arrays for the same files, so that on-disk caches of
#: preprocessed volumes and folder indexes are rebuilt (2: NIfTI in metres or microns read in mm; 3: a NIfTI that
#: does not say its modality is indexed as CT when it is in HU with air, and windowed as CT; both 2026-12-05; 4: a
#: DICOM file without a Modality element takes it from its SOP class, CT or MR Image Storage, 2026-12-07; 5: an
#: unevenly stepped DICOM series reports its mean slice step, the affine's, not the median, 2026-12-08)
READER_VERSION = 5
#: changes whenever `volume_transforms` gives other arrays for the same files and settings, so that on-disk caches
#: of preprocessed volumes are rebuilt (1: the in-plane crop to the body, `BodyCropd`; 2: its body found on the
#: scan's own grid and values, and kept whole by the slices; both 2026-12-06; 3: a sheared (gantry-tilted) grid keeps
#: its slices, `SliceSpacingd`, 2026-12-07)
PREPROCESSING_VERSION = 3


def _pixdim_from_affine(img):
    """The image with its header's voxel sizes (pixdim) set from its affine (nibabel's: the sform when its code is
    set, else the qform), when they disagree. MONAI's `correct_nifti_header_if_necessary` would instead replace a
    valid sform by a qform that matches a wrong pixdim, so that the volume was loaded on another grid (1 mm instead
    of 3 mm) than the one `imaging-meta scan` checked and indexed."""
    zooms = tuple(float(z) for z in img.header.get_zooms())
    n = min(3, len(zooms))
    norm = np.sqrt((np.asarray(img.affine, dtype=np.float64)[:3, :n] ** 2).sum(0))
    if not np.allclose(zooms[:n], norm):
        img.header.set_zooms(tuple(float(v) for v in norm) + zooms[n:])
    return img


class NiftiVolumeReader(NibabelReader):
    """MONAI's `NibabelReader` with the NIfTI rules of every read path (`datamodules.indexing.volumes.checked_nifti`):
    a CIFTI-2 file is refused, an unknown orientation is warned about, and a file in metres or microns is read
    with its affine, sform, qform and pixdim in mm (the voxels are unchanged), as `scan` reads it."""

    def read(self, data, **kwargs):
        """`NibabelReader.read`, each image through `checked_nifti`, then `_pixdim_from_affine`.

        Raises:
            ValueError: a CIFTI-2 file, a file nibabel cannot read, or one whose affine is not finite or is singular,
                naming it.
        """
        filenames = ensure_tuple(data)
        self.filenames = filenames  # what `get_data` pairs the images with, as in NibabelReader.read
        options = {**self.kwargs, **kwargs}
        images = []
        for name in filenames:
            try:
                loaded = nib.load(name, **options)
            except Exception as e:  # nibabel and gzip raise many types on a truncated or foreign file
                cifti = cifti_file_reason(str(name))
                raise (ValueError(f"{name}: {cifti}") if cifti else unreadable_nifti(name, e)) from e
            try:
                img = checked_nifti(loaded, str(name))
            except Reject as e:
                raise ValueError(f"{name}: {e}") from None
            # an affine that cannot place the voxels (MONAI's reader would fall back to 1 mm voxels, silently)
            problem = affine_reason(img.affine)
            if problem:
                raise ValueError(f"{name}: {problem}")
            # a 3D volume stored with trailing singleton dimensions, (X, Y, Z, 1, 1), is read as 3D, as `scan`
            # accepts it (`dimensions_reason`): it was kept 5D and refused in training, after scan had indexed it
            # (a review). A vector or time series keeps its shape, and its own refusal
            images.append(_pixdim_from_affine(nib.funcs.squeeze_image(img)))
        return images if len(filenames) > 1 else images[0]


class LoadVolumed(MapTransform):
    """Load each key with exactly one of our two readers: NIfTI paths with `NiftiVolumeReader`, anything else
    (a DICOM series folder, or its files) with `DicomSeriesReader`, which checks, groups and orders the slices.

    MONAI's ``LoadImaged(reader=[...])`` falls back to every other registered reader when the given ones raise:
    with itk installed, ITK would read a series that `DicomSeriesReader` refused (a missing slice, a garbled
    header) and the user would get a silently wrong volume. Here the reader's own error is raised, as the cause
    of MONAI's ``applying transform`` error, naming the file and what is wrong.
    """

    def __init__(self, keys: KeysCollection, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.loader = _shared_loader()
        self.dicom, self.nifti = DicomSeriesReader(), NiftiVolumeReader()

    def reader_for(self, source) -> DicomSeriesReader | NiftiVolumeReader:
        """The reader of a path, or of a list of DICOM files."""
        name = str(source).lower() if isinstance(source, (str, Path)) else ""
        return self.nifti if name.endswith((".nii", ".nii.gz")) else self.dicom

    def __call__(self, data: Mapping[Hashable, Any]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            reader = self.reader_for(d[key])
            try:
                d[key] = self.loader(d[key], reader=reader)
            except (ValueError, MemoryError):
                raise
            except Exception as e:  # nibabel and gzip raise many types on a truncated or foreign file
                if reader is not self.nifti:
                    raise
                raise unreadable_nifti(d[key], e) from e
        return d


def slice_separation(affine: np.ndarray, tol: float = 1e-4) -> float | None:
    """The distance (mm) between a grid's slices along the normal of their plane, when the grid is sheared (the
    third column of ``affine`` is not normal to the first two: a gantry-tilted series, each slice shifted in-plane);
    None for an unsheared grid, whose slice spacing is that column's length."""
    a = np.asarray(affine, dtype=np.float64)[:3, :3]
    normal = np.cross(a[:, 0], a[:, 1])
    if not np.linalg.norm(normal) > 0:
        return None
    separation = abs(float(a[:, 2] @ normal)) / float(np.linalg.norm(normal))
    return separation if float(np.linalg.norm(a[:, 2])) - separation > tol * float(np.linalg.norm(a[:, 2])) else None


class SliceSpacingd(Spacingd):
    """`Spacingd` to an in-plane ``spacing`` that keeps the slices as acquired: the slice spacing -1 (kept) for an
    unsheared grid; for a sheared one, the distance between the slices along their normal. MONAI resamples a sheared
    grid onto an unsheared one whose slice spacing, with -1, was the sheared column's length (5.22 mm for 5 mm
    slices shifted 1.5 mm each), so every working slice fell between two acquired ones and a mask came back smeared
    over two slices (a review, with a 17 degree gantry tilt). A sheared volume gets its own `Spacingd` for the
    call (no shared state between the threads that fill a cache); the inverse is `Spacingd`'s, from the trace."""

    def __init__(self, keys: KeysCollection, spacing: Sequence[float], mode: Sequence[str]) -> None:
        self._in_plane = (float(spacing[0]), float(spacing[1]))
        self._mode = list(mode)
        super().__init__(keys, pixdim=(*self._in_plane, -1.0), mode=self._mode)

    def __call__(self, data: Mapping[Hashable, Any], lazy: bool | None = None) -> dict[Hashable, Any]:
        first = next((data[k] for k in self.keys if k in data), None)
        separation = slice_separation(_affine(first)) if first is not None else None
        if separation is None:
            return super().__call__(data, lazy)
        keys = [k for k in self.keys if k in data]
        out = Spacingd(keys, pixdim=(*self._in_plane, separation), mode=self._mode[: len(keys)],
                       allow_missing_keys=True)(data, lazy)
        for k in keys:  # the trace names the transform that inverts it: ours (its inverse reads only the trace)
            ops = getattr(out[k], "applied_operations", None)
            if ops:
                ops[-1][TraceKeys.ID] = id(self.spacing_transform.sp_resample)
        return out


def volume_transforms(
    spacing: Sequence[float] = (4.0, 4.0),
    slice_size: Sequence[int] = (80, 80),
    ct_window: Sequence[float] = (-250.0, 250.0),
    mr_percentiles: Sequence[float] = (1.0, 99.0),
    keys: Sequence[str] = ("image", "label"),
    body_keeps_labels: bool = True,
) -> Compose:
    """The deterministic (cacheable) preprocessing of one volume.

    Input dict: ``image`` (a NIfTI path, or a list of DICOM files in geometric order), optional ``label``
    (NIfTI path), and ``modality``. Output: ``image`` float32 (1, H, W, D) in [0, 1], ``label`` integer
    (1, H, W, D), both MONAI MetaTensors in RAS whose transforms can be inverted.

    Args:
        spacing: in-plane target spacing (mm) along R and A; the slice spacing is kept as acquired.
        slice_size: (H, W) of each axial slice after pad/crop around the centre of the body (`BodyCropd`).
        ct_window: HU window for CT.
        mr_percentiles: percentile range for MR and other modalities.
        keys: image key first, then the label key (drop it to preprocess images alone).
        body_keeps_labels: the crop to the body keeps every labelled voxel (off for a scan whose label is what is
            being predicted: an evaluation's query is cropped as `segment` crops it, from its image alone).

    Applying the result raises (inside MONAI's ``RuntimeError("applying transform ...")``, as its cause) a
    ``ValueError`` naming the file for a volume that `CheckVolumed` rejects: 2D, 4D or 5D, NaN/Inf, constant, or
    a label map off its image's grid; or that `NiftiVolumeReader` refuses (a CIFTI-2 file).
    """
    keys = list(keys)
    if len(spacing) != 2 or len(slice_size) != 2:
        raise ValueError(f"spacing and slice_size are in-plane pairs, got spacing={spacing}, slice_size={slice_size}")
    modes = ["bilinear"] + ["nearest"] * (len(keys) - 1)
    label_keys = keys[1:]
    tfs = [
        LoadVolumed(keys),
        EnsureChannelFirstd(keys),
        CheckVolumed(keys),
        Orientationd(keys, axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S"))),
        FindBodyd(keys, keep_labels=body_keeps_labels),  # on the scan's own grid and values
        SliceSpacingd(keys, spacing, modes),  # the slices as acquired, a gantry-tilted series' too
        ModalityIntensityd(keys[0], ct_window=ct_window, mr_percentiles=mr_percentiles),
        BodyCropd(keys, fit=(int(slice_size[0]), int(slice_size[1]))),
        ResizeWithPadOrCropd(keys, spatial_size=(int(slice_size[0]), int(slice_size[1]), -1)),
    ]
    if label_keys:
        tfs.append(CastLabeld(label_keys))
    return Compose(tfs)


def slice_augmentation(
    rotate_degrees: float = 12.0,
    scale: float = 0.12,
    translate: float = 0.06,
    gamma: Sequence[float] = (0.7, 1.5),
    noise_std: float = 0.03,
    intensity_scale: float = 0.1,
    slice_size: Sequence[int] = (80, 80),
    prob: float = 0.8,
    randomise_domain: bool = False,
) -> Compose:
    """Seeded random 2D augmentation of one slice dict (``image`` (1, H, W), ``label`` (1, H, W)).

    One draw is shared by image and label (nearest-neighbour for the label). Call
    ``set_random_state(seed)`` on the result to make it deterministic. ``randomise_domain`` adds what a scanner
    varies beyond gain and noise (domain randomisation, as SynthSeg trains on synthetic images for real scans):
    a smooth multiplicative bias field (half the slices, coefficients up to 0.15, degree 3), a random monotone
    remapping of the intensities (histogram shift, 5-10 control points, half the slices) and a blur (sigma
    0.25-1 pixel, 30% of the slices).
    """
    h, w = (int(s) for s in slice_size)
    gamma_lo, gamma_hi = gamma
    rad = float(np.deg2rad(rotate_degrees))
    return Compose(
        [
            RandAffined(
                ["image", "label"],
                prob=prob,
                rotate_range=(rad,),
                scale_range=(scale, scale),
                translate_range=(translate * h, translate * w),
                mode=("bilinear", "nearest"),
                padding_mode="zeros",
            ),
            RandAdjustContrastd("image", prob=prob, gamma=(gamma_lo, gamma_hi)),
            RandScaleIntensityd("image", factors=intensity_scale, prob=prob),
            *([RandBiasFieldd("image", prob=0.5, coeff_range=(0.0, 0.15), degree=3),
               RandHistogramShiftd("image", prob=0.5, num_control_points=(5, 10)),
               RandGaussianSmoothd("image", prob=0.3, sigma_x=(0.25, 1.0), sigma_y=(0.25, 1.0))]
              if randomise_domain else []),
            RandGaussianNoised("image", prob=prob, std=noise_std),
        ]
    )


def to_source_grid(pre, values: torch.Tensor, transforms: Compose, slab: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """A map on the preprocessed grid, linearly interpolated back to the grid of the file it came from.

    The same values as MONAI's ``Invertd(..., nearest_interp=False)`` of `volume_transforms` (checked to 1e-5
    in the tests), at a fraction of its memory: MONAI resamples the whole volume at once, with a float sampling
    grid of the full source size (4.8 GB for a 512 x 512 x 300 CT), where this goes ``slab`` source slices at a
    time. The pad or crop to the slice size and the crop to the body are undone by MONAI (the map is 0 outside
    the body's box); orientation and spacing, which only map voxels
    to voxels, are one affine, from the source voxel to the preprocessed one, sampled with `grid_sample` (border
    padding, as MONAI's `Spacingd`). Any other chain of transforms goes through ``Invertd``.

    Args:
        pre: the preprocessed image (a MetaTensor (1, H, W, D) with its applied transforms) the map lies on.
        values: (H, W, D) the map, e.g. foreground probabilities.
        transforms: the `volume_transforms` that made ``pre``.
        slab: source slices resampled at a time.

    Returns:
        The map on the source grid (X, Y, Z) float32, and the source affine (RAS, 4 x 4).
    """
    from monai.transforms import Invertd

    prob = pre.clone()
    prob.set_array(values.detach().to(torch.float32).unsqueeze(0))
    # found by type: a chain with label maps ends in `CastLabeld`, which took every evaluation to `Invertd`
    crop = next((t for t in reversed(transforms.transforms) if isinstance(t, ResizeWithPadOrCropd)), None)
    body = next((t for t in transforms.transforms if isinstance(t, BodyCropd)), None)
    ops = [op["class"] for op in prob.applied_operations]
    if (isinstance(crop, ResizeWithPadOrCropd) and isinstance(body, BodyCropd)
            and ops[-4:] == ["Orientation", "SpatialResample", "CropForeground", "ResizeWithPadOrCrop"]):
        grid = crop.padder.inverse(prob)  # the body's box before the pad or crop (the array transforms' inverses:
        grid = body.cropper.inverse(grid)  # the dictionary ones ask for every key); the resampled grid, 0 outside
        if [op["class"] for op in grid.applied_operations][-2:] == ["Orientation", "SpatialResample"]:
            source_affine = np.asarray(grid.meta["original_affine"], dtype=np.float64)
            shape = tuple(int(s) for s in np.asarray(grid.meta["spatial_shape"]).ravel()[:3])
            return _resample_affine(grid.as_tensor()[0], np.asarray(grid.affine, dtype=np.float64), shape,
                                    source_affine, slab), source_affine
    key = transforms.transforms[0].keys[0]  # the image key of `volume_transforms` (its first transform loads it)
    inv = Invertd("prob", transform=transforms, orig_keys=key, nearest_interp=False)({key: pre, "prob": prob})
    return np.asarray(inv["prob"][0], dtype=np.float32), np.asarray(inv["prob"].affine, dtype=np.float64)


def _resample_affine(values: torch.Tensor, values_affine: np.ndarray, shape: tuple[int, ...], affine: np.ndarray,
                     slab: int) -> np.ndarray:
    """``values`` (H, W, D) on the grid of ``values_affine`` sampled linearly at every voxel of the grid (``shape``,
    ``affine``), ``slab`` slices of the output at a time; positions off the grid take the nearest border value."""
    size = np.asarray(values.shape, dtype=np.float64)
    # output voxel -> grid_sample's normalised position (align_corners=False): (2 * index + 1) / size - 1
    voxels = np.linalg.inv(values_affine) @ affine  # output voxel -> values voxel
    to_grid = np.diag([*(2.0 / size), 1.0]) @ voxels
    to_grid[:3, 3] += 1.0 / size - 1.0
    m = torch.as_tensor(to_grid)
    if _slice_to_slice(voxels, shape):
        return _resample_slices(values, to_grid, voxels, shape, slab)
    src = values.to(torch.float32)[None, None].permute(0, 1, 4, 3, 2)  # (1, 1, D, W, H): grid_sample's z, y, x
    x, y, z = shape
    ii = torch.arange(x, dtype=torch.float64).view(x, 1)
    jj = torch.arange(y, dtype=torch.float64).view(1, y)
    plane = [m[c, 0] * ii + m[c, 1] * jj for c in range(3)]  # (x, y) per coordinate: the in-plane terms, once
    out = np.zeros(shape, dtype=np.float32)
    for z0 in range(0, z, slab):
        kk = torch.arange(z0, min(z, z0 + slab), dtype=torch.float64)
        n = len(kk)
        grid = torch.stack([(plane[c][..., None] + (m[c, 2] * kk + m[c, 3])).to(torch.float32) for c in range(3)], -1)
        sampled = F.grid_sample(src, grid.permute(2, 1, 0, 3)[None], mode="bilinear", padding_mode="border",
                                align_corners=False)  # (1, 1, n, y, x)
        out[:, :, z0:z0 + n] = sampled[0, 0].permute(2, 1, 0).numpy()
    return out


def _slice_to_slice(voxels: np.ndarray, shape: tuple[int, ...], tol: float = 1e-3) -> bool:
    """Whether the voxel map ``voxels`` (4 x 4, output voxel -> values voxel) takes every output slice of a grid of
    ``shape`` onto one whole slice of the values, to ``tol`` of a slice anywhere on the grid (the preprocessing
    keeps the slice spacing: ``Spacingd`` with -1 along z), so that linear sampling is bilinear within that slice."""
    x, y, z = shape[:3]
    across = abs(voxels[2, 0]) * max(x - 1, 0) + abs(voxels[2, 1]) * max(y - 1, 0)  # the slice moving in-plane
    along = voxels[2, 2] * np.arange(z) + voxels[2, 3]  # each output slice's position among the values' slices
    return bool(across < tol and np.abs(along - np.round(along)).max(initial=0.0) < tol)


def _resample_slices(values: torch.Tensor, to_grid: np.ndarray, voxels: np.ndarray, shape: tuple[int, ...],
                     slab: int) -> np.ndarray:
    """`_resample_affine` for a `_slice_to_slice` map: each output slice sampled bilinearly from its one slice of
    the values (a slice off the values takes the nearest border slice, as the 3D sampling's border padding does);
    the same values to rounding, a tenth of the work of trilinear sampling."""
    x, y, z = shape
    depth = values.shape[2]
    src = values.to(torch.float32).permute(2, 1, 0)[:, None]  # (D, 1, W, H): grid_sample's y, x per slice
    ii = torch.arange(x, dtype=torch.float64).view(x, 1)
    jj = torch.arange(y, dtype=torch.float64).view(1, y)
    m = torch.as_tensor(to_grid)
    plane = torch.stack([m[c, 0] * ii + m[c, 1] * jj + m[c, 3] for c in range(2)], -1)  # (x, y, 2)
    out = np.zeros(shape, dtype=np.float32)
    for z0 in range(0, z, slab):
        ks = np.arange(z0, min(z, z0 + slab))
        source = np.clip(np.round(voxels[2, 2] * ks + voxels[2, 3]).astype(np.int64), 0, depth - 1)
        shift = torch.stack([m[c, 2] * torch.as_tensor(ks, dtype=torch.float64) for c in range(2)], -1)  # (n, 2)
        grid = (plane[None] + shift[:, None, None]).permute(0, 2, 1, 3).to(torch.float32)  # (n, y, x, 2)
        sampled = F.grid_sample(src[torch.as_tensor(source)], grid, mode="bilinear", padding_mode="border",
                                align_corners=False)  # (n, 1, y, x)
        out[:, :, z0:z0 + len(ks)] = sampled[:, 0].permute(2, 1, 0).numpy()
    return out
