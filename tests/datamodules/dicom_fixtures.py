"""Tiny synthetic DICOM / NIfTI inputs for the scanner and reader tests, and ways to break them.

The writers are `datamodules.synthetic.demo.write_dicom_series` / `write_nifti`; the helpers here choose small
volumes, put distinctive fake PHI into every header, and damage files in the ways real data is damaged.
`write_enhanced` converts a written single-frame series into one enhanced multi-frame file with highdicom's
legacy converter (tests that use it skip when highdicom, the ``[dicom-seg]`` extra, is absent); the
``*_frames`` helpers rearrange or damage the frames of such a file.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pydicom
from pydicom.sequence import Sequence
from pydicom.uid import generate_uid

from datamodules.synthetic.demo import write_dicom_series, write_nifti

# distinctive fake identifiers: privacy tests grep the saved index for them
FAKE_PHI = {
    "PatientName": "PHITEST^ALICE^Q",
    "PatientID": "PHITEST-ID-98765",
    "PatientBirthDate": "19010203",
    "InstitutionName": "Saint Phitest Hospital",
    "StationName": "PHITESTSTATION7",
}


def header(**overrides: Any) -> dict[str, Any]:
    """Series header: fake PHI, scanner fields, overrides last."""
    return {**FAKE_PHI, "Manufacturer": "ACME", "ManufacturerModelName": "Scanner 3000", **overrides}


def phantom(shape=(12, 10, 6), seed: int = 0) -> np.ndarray:
    """Integer-valued HU volume (X, Y, Z) with a bright box, exactly representable with intercept -1024."""
    rng = np.random.default_rng(seed)
    vol = rng.integers(-1000, 1000, size=shape).astype(np.float64)
    x, y, z = (s // 2 for s in shape)
    vol[x - 2 : x + 2, y - 2 : y + 2, max(z - 1, 0) : z + 1] = 1500.0
    return vol


def affine_ras(spacing=(1.5, 1.25, 3.0), origin=(10.0, -20.0, 30.0), rot_deg: float = 0.0, slice_sign: float = 1.0) -> np.ndarray:
    """A voxel -> RAS affine: optional in-plane rotation about z, slice axis along +z or -z."""
    a = np.deg2rad(rot_deg)
    rot = np.array([[np.cos(a), -np.sin(a), 0.0], [np.sin(a), np.cos(a), 0.0], [0.0, 0.0, 1.0]])
    # LPS-like axes as scanners store them: axis 0 to the left (-x in RAS), axis 1 to posterior (-y)
    aff = np.eye(4)
    aff[:3, :3] = rot @ np.diag([-spacing[0], -spacing[1], slice_sign * spacing[2]])
    aff[:3, 3] = origin
    return aff


def write_series(
    folder: Path,
    volume: np.ndarray | None = None,
    affine: np.ndarray | None = None,
    *,
    seed: int = 0,
    hdr: dict[str, Any] | None = None,
    **kw: Any,
) -> list[Path]:
    """Write a small CT series; returns the paths in the order of volume axis 2."""
    volume = phantom(seed=seed) if volume is None else volume
    affine = affine_ras() if affine is None else affine
    return write_dicom_series(volume, affine, folder, header=hdr or header(), rng=np.random.default_rng(seed), **kw)


def edit(path: Path, fn: Callable[[pydicom.Dataset], None]) -> None:
    """Read a DICOM file, change it with ``fn``, write it back."""
    ds = pydicom.dcmread(path)
    fn(ds)
    ds.save_as(path, enforce_file_format=True)


def place(paths: list[Path], steps) -> None:
    """Move a series' slices (in the written order) to the given steps (mm) along the series' own direction."""
    z0 = float(pydicom.dcmread(paths[0]).ImagePositionPatient[2])
    sign = np.sign(float(pydicom.dcmread(paths[1]).ImagePositionPatient[2]) - z0)
    z = np.concatenate([[0.0], np.cumsum(steps)]) * sign
    for p, dz in zip(paths, z, strict=True):
        edit(p, lambda ds, dz=dz: setattr(ds, "ImagePositionPatient", [*ds.ImagePositionPatient[:2], z0 + float(dz)]))


def truncate(path: Path, n_bytes: int = 100) -> None:
    """Cut the last ``n_bytes`` off a file (an interrupted copy)."""
    data = path.read_bytes()
    path.write_bytes(data[:-n_bytes])


def label_for(volume: np.ndarray, values=(1,)) -> np.ndarray:
    """A uint8 label map of the bright box of `phantom` (value ``values[0]``), plus extra values in a corner."""
    lab = np.zeros(volume.shape, np.uint8)
    lab[volume >= 1500] = values[0]
    for i, v in enumerate(values[1:]):
        lab[i, 0, 0] = v
    return lab


def write_reoriented_nifti(array: np.ndarray, affine: np.ndarray, path: Path, ornt) -> Path:
    """Write the same physical grid with permuted/flipped axes (``ornt`` as in nibabel.orientations)."""
    img = nib.Nifti1Image(np.asarray(array), affine).as_reoriented(np.asarray(ornt))
    return write_nifti(np.asarray(img.dataobj), img.affine, path)


def write_enhanced(
    paths: list[Path],
    out: Path,
    *,
    include_dimension_index: bool | None = None,
    order: list[int] | None = None,
    seed: int = 0,
    instance: int = 1,
) -> Path:
    """Convert single-frame CT/MR files into one Legacy Converted Enhanced CT/MR file with highdicom.

    Args:
        paths: the files of one series (CT or MR Image Storage).
        out: the file to write (its folder is created).
        include_dimension_index: passed to highdicom (None: sort along the slices and add a dimension index;
            False: keep the given order, no index).
        order: the files in this order first (e.g. shuffled), which the frames keep when
            ``include_dimension_index`` is False.
        seed: makes the new UIDs deterministic; files written with the same seed share one series.
        instance: InstanceNumber, and what makes the SOPInstanceUID of a file of that series its own.

    Returns:
        ``out``.
    """
    import highdicom as hd

    datasets = [pydicom.dcmread(p) for p in paths]
    if order is not None:
        datasets = [datasets[i] for i in order]
    converter = {"CT": hd.legacy.LegacyConvertedEnhancedCTImage, "MR": hd.legacy.LegacyConvertedEnhancedMRImage}
    series_uid = str(generate_uid(entropy_srcs=[f"enhanced-series-{seed}"]))
    sop_uid = str(generate_uid(entropy_srcs=[f"enhanced-instance-{seed}-{instance}"]))
    image = converter[str(datasets[0].Modality)](
        datasets, series_instance_uid=series_uid, series_number=90 + seed, sop_instance_uid=sop_uid,
        instance_number=instance,
        include_dimension_index=include_dimension_index,
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    image.save_as(out, enforce_file_format=True)
    return out


def _set_frames(ds: pydicom.Dataset, stored: np.ndarray, items: list[pydicom.Dataset]) -> None:
    """Replace the frames of an uncompressed multi-frame data set: pixels (frames, rows, columns) and items."""
    ds.PerFrameFunctionalGroupsSequence = Sequence(items)
    ds.NumberOfFrames = len(items)
    ds.PixelData = np.ascontiguousarray(stored).tobytes()


def _frames(ds: pydicom.Dataset) -> tuple[np.ndarray, list[pydicom.Dataset]]:
    """The stored pixels (frames, rows, columns) and the per-frame items of a multi-frame data set."""
    stored = ds.pixel_array
    return (stored if stored.ndim == 3 else stored[None]), list(ds.PerFrameFunctionalGroupsSequence)


def permute_frames(ds: pydicom.Dataset, order: list[int]) -> None:
    """Store the frames in the order ``order`` (pixels and per-frame functional groups move together)."""
    stored, items = _frames(ds)
    _set_frames(ds, stored[order], [items[i] for i in order])


def drop_frames(ds: pydicom.Dataset, drop: list[int]) -> None:
    """Remove frames (0-based indices) from the file."""
    stored, items = _frames(ds)
    keep = [i for i in range(len(items)) if i not in drop]
    _set_frames(ds, stored[keep], [items[i] for i in keep])


def repeat_frames(ds: pydicom.Dataset) -> None:
    """Append a second copy of every frame (a second time point at the same positions), numbered as such."""
    stored, items = _frames(ds)
    second = [copy.deepcopy(item) for item in items]
    for t, group in enumerate((items, second), start=1):
        for item in group:
            if "FrameContentSequence" in item:
                item.FrameContentSequence[0].TemporalPositionIndex = t
    _set_frames(ds, np.concatenate([stored, stored]), items + second)


def frames_own(ds: pydicom.Dataset, sequence: str) -> None:
    """Move the functional group ``sequence`` from the shared item into every frame's own item."""
    shared = ds.SharedFunctionalGroupsSequence[0]
    group = shared[sequence].value
    for item in ds.PerFrameFunctionalGroupsSequence:
        setattr(item, sequence, Sequence([copy.deepcopy(group[0])]))
    delattr(shared, sequence)


def frame_item(ds: pydicom.Dataset, frame: int, sequence: str) -> pydicom.Dataset:
    """The item of functional group ``sequence`` in frame ``frame`` (0-based)'s own functional groups."""
    return ds.PerFrameFunctionalGroupsSequence[frame][sequence][0]


__all__ = [
    "FAKE_PHI",
    "affine_ras",
    "drop_frames",
    "edit",
    "place",
    "frame_item",
    "frames_own",
    "permute_frames",
    "repeat_frames",
    "header",
    "label_for",
    "phantom",
    "truncate",
    "write_nifti",
    "write_enhanced",
    "write_reoriented_nifti",
    "write_series",
]
