"""`DicomSeriesReader`, a MONAI reader for one DICOM series, and the public face of the DICOM modules.

A DICOM series is a set of single-frame slice files that share a ``SeriesInstanceUID``, or an enhanced
multi-frame CT/MR file (Enhanced or Legacy Converted Enhanced CT/MR Image Storage) that holds the slices as
frames. Folder and file names, frame order and instance numbers say nothing reliable about which slices
belong together or in what order, so

1. each file's header is read once (`read_header`, `datamodules.io.dicom_files`); a file that is not DICOM
   or is corrupt raises a `DicomError` whose message names the file and says why, and a file that cannot
   be a slice gets a ``problem`` (`datamodules.io.dicom_checks`); an enhanced CT/MR file gets one header per
   frame (``frames``), with the geometry and rescale of its functional groups (`datamodules.io.dicom_enhanced`);
2. files are grouped by ``SeriesInstanceUID`` (`group_series`), wherever they lie in the tree;
3. a group is validated and ordered by geometry (`order_series`, `datamodules.io.dicom_series`): slice
   positions are projected onto the slice normal (the cross product of the row and column direction
   cosines) and sorted along it, never by file name, frame number or ``InstanceNumber``; the frames of an
   enhanced file go through the same checks as single-frame files. Any problem raises a `DicomSeriesError`
   with a precise reason;
4. the voxel-to-world affine is built in RAS (NIfTI convention) for the array layout used everywhere here:
   axis 0 runs along the DICOM row direction (column index), axis 1 along the column direction (row index),
   axis 2 through the slices in the geometric order (`series_affine`);
5. `DicomSeriesReader` (this module) wraps all of this as a `monai.data.ImageReader`, so that
   `datamodules.transforms.volume.LoadVolumed` (this reader, or NibabelReader for NIfTI) reads the ordered file lists stored
   in the scan index (or a folder holding one series) next to NIfTI files; pixels are decoded by
   `load_series_array` (`datamodules.io.dicom_pixels`).

Identifying attributes (PatientName, PatientID, UIDs, ...) are read only to group and pseudonymise; they are
never put into the metadata returned by the reader.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pydicom
from monai.data import ImageReader
from monai.utils import MetaKeys, SpaceKeys, ensure_tuple
from pydicom.dataset import Dataset

from datamodules.io.dicom_checks import JPEG_EXTRA, decoder_problem, non_image_kind
from datamodules.io.dicom_enhanced import read_frames
from datamodules.io.dicom_errors import DicomError, DicomSeriesError, NotDicomError
from datamodules.io.dicom_files import (
    DICOM_CLAIMED,
    DICOM_SUFFIXES,
    NO_UID,
    NO_UID_REASON,
    checked_header,
    group_series,
    read_dataset,
    read_header,
)
from datamodules.io.dicom_header import ENHANCED_SOP_CLASSES, DicomHeader, is_enhanced
from datamodules.io.dicom_pixels import load_series_array
from datamodules.io.dicom_series import (
    DUPLICATE_TOL_MM,
    MIN_SLICES,
    ORIENTATION_TOL,
    DicomSeries,
    order_series,
    series_affine,
)
from datamodules.io.nifti_names import NIFTI_SUFFIXES, is_nifti, nifti_stem

__all__ = [
    "DUPLICATE_TOL_MM",
    "MIN_SLICES",
    "ORIENTATION_TOL",
    "checked_header",
    "read_dataset",
    "DicomError",
    "NotDicomError",
    "DicomSeriesError",
    "DicomHeader",
    "DicomSeries",
    "ENHANCED_SOP_CLASSES",
    "is_enhanced",
    "read_frames",
    "DicomSeriesReader",
    "read_header",
    "group_series",
    "order_series",
    "series_affine",
    "decoder_problem",
    "JPEG_EXTRA",
    "non_image_kind",
    "load_series_array",
    "NIFTI_SUFFIXES",
    "is_nifti",
    "nifti_stem",
]

logger = logging.getLogger(__name__)


@dataclass
class _LoadedSeries:
    """What `DicomSeriesReader.read` hands to `get_data`: the ordered series and its already-read data sets."""

    series: DicomSeries
    datasets: dict[str, Dataset]


def _not_an_image(h: DicomHeader) -> bool:
    """True for a DICOMDIR, an object that is no image by its modality (structure sets, RT dose, reports...)
    or a file without pixel data."""
    return non_image_kind(h) is not None or bool(h.problem and h.problem.startswith("no pixel data"))


def _claims_dicom(path: str) -> bool:
    """Whether a file that pydicom cannot read was meant to be DICOM: a name that claims DICOM (`DICOM_CLAIMED`), no bytes
    at all under a name a slice may have (an interrupted copy: no extension, or digits as in a UID), or the 'DICM'
    marker after the 128-byte preamble. An empty ``Thumbs.db``, ``desktop.ini`` or ``notes.txt`` is no slice: it
    refused the whole series (a review)."""
    if path.lower().endswith(DICOM_CLAIMED):
        return True
    if os.path.getsize(path) == 0:
        suffix = os.path.splitext(os.path.basename(path))[1].lower()
        return not suffix or suffix[1:].isdigit() or suffix in DICOM_SUFFIXES  # a Siemens .IMA slice too
    with open(path, "rb") as f:
        f.seek(128)
        return f.read(4) == b"DICM"


def _no_series_reason(skipped: Sequence[tuple[str, str]], shown: int = 3) -> str:
    """Why a folder holds no DICOM image series: each skipped file's reason, the files with the same reason
    together (the first ``shown`` reasons, naming a file and how many share it)."""
    if not skipped:
        return "no DICOM image series in this folder: it holds no file (hidden files and NIfTI aside)"
    by_reason: dict[str, list[str]] = {}
    for path, reason in sorted(skipped, key=lambda t: os.path.basename(t[0])):
        by_reason.setdefault(reason, []).append(os.path.basename(path))
    parts = []
    for reason, names in list(by_reason.items())[:shown]:
        alike = f" (and {len(names) - 1} other file(s) alike)" if len(names) > 1 else ""
        parts.append(f"{names[0]}{alike}: {reason}")
    more = f"; and {len(by_reason) - shown} other reason(s)" if len(by_reason) > shown else ""
    files = f"none of its {len(skipped)} files is" if len(skipped) > 1 else "its only file is not"
    return f"no DICOM image series in this folder ({files} an image slice): " + "; ".join(parts) + more


class DicomSeriesReader(ImageReader):
    """MONAI image reader for one DICOM series given as an ordered file list or as a folder.

    Input: a list/tuple of DICOM file paths (normally the geometry-ordered list stored in the scan index;
    the reader orders them by geometry again, so any order gives the same result), or a folder, which must
    then hold exactly one image series (other files are ignored). An enhanced multi-frame CT/MR file (alone,
    or with the other enhanced files of its series) is read as the volume of its frames, sorted along the
    slice normal like single-frame files.

    Output of `get_data`: an (X, Y, Z) float32 array (X = DICOM column index, Y = row index, Z = slice along
    the normal) with RescaleSlope/Intercept applied, and metadata in MONAI's conventions: ``affine`` and
    ``original_affine`` (RAS, (4, 4)), ``spatial_shape``, ``space`` = "RAS", ``original_channel_dim`` (NaN,
    i.e. no channel, as MONAI's own readers write it), ``spacing``, ``modality``, ``n_slices`` and ``n_files``
    (equal for single-frame files). No identifying attribute is copied.

    Args:
        min_slices: fewest slices accepted; the default is the scan's (`MIN_SLICES`), so that `segment` and `fit`
            refuse what `scan` refuses (1 reads a single slice as a one-slice volume).
        gap_factor: see `order_series`.
        spacing_rtol: see `order_series`.

    Example:
        >>> LoadImage(image_only=True)(folder, reader=DicomSeriesReader())  # doctest: +SKIP
    """

    def __init__(self, min_slices: int = MIN_SLICES, gap_factor: float = 1.5, spacing_rtol: float = 0.1):
        super().__init__()
        self.min_slices = int(min_slices)
        self.gap_factor = float(gap_factor)
        self.spacing_rtol = float(spacing_rtol)

    def verify_suffix(self, filename: Sequence[str | os.PathLike] | str | os.PathLike) -> bool:
        """True for a folder, or a list/tuple of (non-NIfTI) paths, or one DICOM file."""
        if isinstance(filename, (list, tuple)):
            names = [str(f) for f in filename]
            if len(names) == 1 and os.path.isdir(names[0]):
                return True
            return bool(names) and not any(is_nifti(n) for n in names)
        name = str(filename)
        if os.path.isdir(name):
            return True
        if is_nifti(name):
            return False
        try:
            return name.lower().endswith(DICOM_CLAIMED) or pydicom.misc.is_dicom(name)
        except OSError:
            return False

    def read(self, data: Sequence[str | os.PathLike] | str | os.PathLike, **kwargs) -> _LoadedSeries:
        """Read and order one series.

        Args:
            data: a folder, or DICOM file paths of one series.

        Returns:
            an object for `get_data`.

        Raises:
            ValueError: a NIfTI path (so that MONAI falls through to the next reader); `DicomError` for a
                file that cannot be read; `DicomSeriesError` when the files are not one valid series.
        """
        names = [str(n) for n in ensure_tuple(data)]
        if not names:
            raise ValueError("DicomSeriesReader: no file given")
        nifti = [n for n in names if is_nifti(n)]
        if nifti:
            raise ValueError(f"{nifti[0]}: a NIfTI file, not a DICOM series; read it with monai.data.NibabelReader")
        datasets: dict[str, Dataset] = {}
        if len(names) == 1 and os.path.isdir(names[0]):
            headers = self._read_folder(names[0], datasets)
        else:
            headers = self._read_files(names, datasets)
        series = order_series(
            headers, min_slices=self.min_slices, gap_factor=self.gap_factor, spacing_rtol=self.spacing_rtol
        )
        return _LoadedSeries(series=series, datasets=datasets)

    def _read_folder(self, folder: str, datasets: dict[str, Dataset]) -> list[DicomHeader]:
        """The headers of the one image series in ``folder`` (non-DICOM files skipped); fills ``datasets``.

        When no image series remains, the error names why the files were skipped (`_no_series_reason`)."""
        headers: list[DicomHeader] = []
        skipped: list[tuple[str, str]] = []  # (file, why it is no slice), for the error when no series remains
        for entry in sorted(os.listdir(folder)):
            p = os.path.join(folder, entry)
            if not os.path.isfile(p) or is_nifti(p) or entry.startswith("."):  # AppleDouble ._x.dcm, .gitkeep
                continue
            try:
                ds, caught = read_dataset(p)
            except NotDicomError as e:
                if _claims_dicom(p):  # a slice that cannot be read: skipping it would shorten the volume
                    raise DicomError(
                        p, f"{e.reason}; a file named or marked as DICOM in a series folder must be readable - copy "
                        "it again from the source, or remove it if it is no slice of the series"
                    ) from e
                reason = e.reason
                if os.path.getsize(p) == 0:  # a system or text file left empty (Thumbs.db), not a cut copy
                    reason = "an empty file whose name is no slice's (no DICOM, numeric or no suffix)"
                logger.warning("skipping %s: %s", p, reason)
                skipped.append((p, reason))
                continue
            header = self._header(ds, p, caught)
            if len(ds) == 0:  # a file meta header and nothing after it: a truncated file, not a non-image object
                raise DicomError(p, header.problem or "no data element after the file meta header: the file is truncated")
            kind = non_image_kind(header)
            if kind is not None and not header.is_dicomdir:  # even with the images' SeriesInstanceUID
                logger.warning("skipping %s: %s, not an image", p, kind)
                skipped.append((p, header.problem or f"{kind}, not an image"))
                continue
            headers.append(header)
            datasets[p] = ds
        # series without any image (reports, a DICOMDIR, files without pixel data) do not count
        groups: dict[str, list[DicomHeader]] = {}
        for key, group in group_series(headers).items():
            if all(_not_an_image(h) for h in group):
                skipped += [(h.path, h.problem or f"{non_image_kind(h) or 'no image'}, not an image") for h in group]
            else:
                groups[key] = group
        if not groups:
            raise DicomSeriesError([folder], _no_series_reason(skipped))
        no_uid = sorted(os.path.basename(k[len(NO_UID):]) for k in groups if k.startswith(NO_UID))
        if len(groups) > 1 and no_uid:
            raise DicomSeriesError(
                [folder],
                f"{len(no_uid)} image file{'s have' if len(no_uid) > 1 else ' has'} {NO_UID_REASON} (first "
                f"{no_uid[0]}); or, from Python, pass the file list of one series",
            )
        if len(groups) > 1:
            numbers = [v[0].series_number for v in groups.values()]
            same = len(set(numbers)) < len(numbers)  # then the UIDs tell them apart
            desc = "; ".join(
                f"series #{v[0].series_number if v[0].series_number is not None else '?'} ({v[0].modality or '?'}, "
                + (f"UID ...{str(v[0].series_uid)[-10:]}, " if same else "")
                + f"{len(v)} files, first {os.path.basename(sorted(h.path for h in v)[0])})"
                for v in groups.values()
            )
            raise DicomSeriesError(
                [folder],
                f"the folder holds {len(groups)} image series ({desc}); move each series into its own folder "
                "(`imaging-meta scan` lists the files of each), or, from Python, pass the file list of one series",
            )
        return next(iter(groups.values()))

    def _read_files(self, names: list[str], datasets: dict[str, Dataset]) -> list[DicomHeader]:
        """The headers of the files ``names``, which must share one series; fills ``datasets``."""
        headers: list[DicomHeader] = []
        for p in names:
            ds, caught = read_dataset(p)
            headers.append(self._header(ds, p, caught))
            datasets[p] = ds
        uids = {h.series_uid for h in headers}
        if len(uids) > 1:
            raise DicomSeriesError(names, f"the files belong to {len(uids)} different series; pass one series")
        return headers

    @staticmethod
    def _header(ds: Dataset, path: str, caught: list[str]) -> DicomHeader:
        """`checked_header`, with pydicom's warnings logged."""
        h = checked_header(ds, path, (), caught)
        for msg in h.warnings:
            logger.warning("%s: pydicom: %s", path, msg)
        return h

    def get_data(self, img: _LoadedSeries | Sequence[_LoadedSeries]) -> tuple[np.ndarray, dict]:
        """Decode the series.

        Args:
            img: what `read` returned.

        Returns:
            (array, meta): array (X, Y, Z) float32; meta with ``affine``, ``original_affine``,
            ``spatial_shape``, ``space``, ``original_channel_dim``, ``spacing``, ``modality``, ``n_slices``,
            ``n_files``.
        """
        if isinstance(img, (list, tuple)):
            if len(img) != 1:
                raise ValueError("DicomSeriesReader reads one series at a time; got several")
            img = img[0]
        assert isinstance(img, _LoadedSeries)
        series = img.series
        array = load_series_array(series, img.datasets)
        affine = series.affine.copy()
        meta: dict[str, Any] = {
            MetaKeys.AFFINE: affine,
            MetaKeys.ORIGINAL_AFFINE: affine.copy(),
            MetaKeys.SPATIAL_SHAPE: np.asarray(series.shape),
            MetaKeys.SPACE: SpaceKeys.RAS,
            MetaKeys.ORIGINAL_CHANNEL_DIM: float("nan"),
            "spacing": np.asarray(series.spacing, dtype=np.float64),
            "modality": series.modality or "unknown",
            "n_slices": len(series.headers),
            "n_files": len(series.paths),
        }
        return array, meta

