"""A folder with one subfolder per class of 2D images (PNG, JPEG or JFIF, TIFF, BMP, single-frame DICOM) as an
`ItemTable`.

Layout::

    root/
      cyst/        img001.png  img002.png  patient7/IM_0001.dcm ...
      haemangioma/ ...
      metastasis/  ...

Each subfolder of ``root`` is a class (its name is the class name); images are found recursively inside
it. Hidden files and folders (``.thumbnails/``) and ``__MACOSX/`` (left by unzipping an archive made on a Mac)
are ignored, as classes and inside them. Every image is read, turned into a float tensor (C, H, W) in [0, 1]
and resized to ``image_size`` keeping its aspect ratio: it is scaled to fit inside ``image_size`` and
zero-padded symmetrically (nothing is cropped). `load_image` does exactly this for one file, so that
``imaging-meta classify`` prepares its query images as the training items were.

Formats are told by content, not by name: a DICOM file named ``.png`` is read as DICOM, and a PNG, JPEG, TIFF or
BMP named ``.dcm`` as that image.

Intensities:

* PNG / JPEG / TIFF / BMP: decoded by `datamodules.io.pictures` (its docstring has every rule: orientation,
  transparency, bit depths, size limits), scaled per image between its minimum and maximum.
* DICOM: decoded as the volume reader decodes a slice (`datamodules.io.dicom_pixels`): MONOCHROME1 images of a
  projection modality (DX, CR, ...; not CT or MR, whose values are measurements) have their stored values
  inverted over the stored range, then
  RescaleSlope/RescaleIntercept are applied; CT is clipped to ``ct_window`` (HU) and scaled to [0, 1]; other
  modalities are scaled per image between their minimum and maximum (a DX/CR/MR image's WindowCenter/Width and
  VOI LUT, a viewer's display settings, are not applied: a PNG exported through that window is another image).
  Palette colour becomes RGB. DICOM objects
  that are no image (a DICOMDIR, an RT structure set or dose, a report...) are skipped with a warning; a file
  without pixel data and a Siemens mosaic (slices tiled into one image) are refused with the fix.

Channels: with ``channels=1`` colour images become grey (ITU-R 601-2 luma); with ``channels=3`` grey images
are repeated. A colour image whose three channels are equal counts as grey. A folder that mixes true colour
and grey images is refused (naming the first image of each kind): that is nearly always a stray image from
another dataset.

Patients, sites and ids: by default every image is its own patient; DICOM files use their PatientID; a
``patient_regex`` with a named group ``patient`` applied to the file name overrides both. Patients are
keyed hashes (`datamodules.indexing.scan.pseudonym`), item ids are keyed hashes of the path relative to ``root``, so
no file name, PatientID or PatientName reaches an episode or a report. The site of a DICOM image is its
header site key (`datamodules.indexing.scan.site_key`; identifying fields become tokens); PNG/JPEG images get the
source ``name`` (default: the root folder's name).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import re
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from datamodules.indexing.pseudonyms import merge_case_variants, salt_or_env, warn_unknown_site_fields
from datamodules.indexing.scan import DEFAULT_SITE_FIELDS, pseudonym, site_key
from datamodules.io.dicom import DicomError, NotDicomError, checked_header, non_image_kind, read_dataset
from datamodules.io.dicom_checks import kind_problem
from datamodules.io.dicom_files import DICOM_CLAIMED, DICOM_SUFFIXES
from datamodules.io.dicom_header import as_int, get_value
from datamodules.io.dicom_pixels import invert_monochrome1, inverts_monochrome1, stored_pixel_array
from datamodules.io.folders import files_under
from datamodules.io.pictures import PIL_KINDS, Read, content_kind, grey_if_equal, read_pil, scale
from datamodules.messages import LISTED, listed
from datamodules.sources.items import ItemSource, ItemTable, class_name

#: 2D image files read with Pillow (TIFF: single-page, 8/16-bit or float grey, or RGB, as pathology tiles are)
PIL_EXTENSIONS = (".png", ".jpg", ".jpeg", ".jfif", ".tif", ".tiff", ".bmp")  # .jfif: a JPEG, as browsers save it
DICOM_EXTENSIONS = DICOM_CLAIMED
#: names tried as DICOM and skipped when they are not: none (``IM0001``), and the vendors' '.ima' / '.dic', which
#: other formats use too (a spelling dictionary)
MAYBE_DICOM = ("", *(s for s in DICOM_SUFFIXES if s not in DICOM_CLAIMED))
DEFAULT_EXTENSIONS = [*PIL_EXTENSIONS, *DICOM_EXTENSIONS, *MAYBE_DICOM]
#: folders never read as a class nor for images: macOS archive metadata, left by unzipping (hidden names too)
IGNORED_FOLDERS = frozenset({"__MACOSX"})

_LUMA = np.array([0.299, 0.587, 0.114])

logger = logging.getLogger(__name__)


def listed_file(path: Path) -> bool:
    """A file to consider in an image folder: a file, or a symbolic link whose target is missing (kept, so that
    reading it names it as unreadable: dropping it left a query out of the predictions without a word)."""
    return path.is_file() or (path.is_symlink() and not path.exists())


def dangling_link(path: Path) -> str:
    """What to say of a symbolic link whose target does not exist (`listed_file` keeps it)."""
    return f"{path}: a symbolic link to {os.readlink(path)}, which does not exist"


def ignored_name(name: str) -> bool:
    """A hidden file or folder (``.thumbnails``, ``.DS_Store``) or ``__MACOSX``: never an image nor a class."""
    return name.startswith(".") or name in IGNORED_FOLDERS


def class_folders(root: Path, level: int = logging.DEBUG) -> list[Path]:
    """The class subfolders of ``root``, sorted (hidden ones and ``__MACOSX`` left out, the latter logged at
    ``level``)."""
    dirs = []
    for d in sorted(root.iterdir()):
        if d.is_dir() and d.name in IGNORED_FOLDERS:
            logger.log(level, "ignoring %s: macOS archive metadata (left by unzipping), not a class folder", d)
        elif d.is_dir() and not ignored_name(d.name):
            dirs.append(d)
    return dirs


def _read_dicom(path: Path, ct_window: Sequence[float]) -> Read:
    """One 2D DICOM image by the volume reader's rules (`datamodules.io.dicom_pixels`): the same decoding
    (headerless files, a missing PhotometricInterpretation), MONOCHROME1 inverted over the stored range before the
    rescale; palette colour becomes RGB; objects that are not images, files without pixel data and Siemens mosaics
    (`dicom_checks.kind_problem`) are refused. A projection image (a MIP) is a 2D picture: it is read."""
    ds, caught = read_dataset(str(path))  # NotDicomError / DicomError name the file
    h = checked_header(ds, str(path), DEFAULT_SITE_FIELDS, caught)
    kind = non_image_kind(h)
    if kind is not None and not h.is_dicomdir:  # a structure set, dose grid, SEG, report...: the wrong folder
        raise DicomError(
            path, f"{kind}, not an image ({h.describe()}); a class or query folder holds only 2D images: move it out"
        )
    problem = kind_problem(ds, h)  # a DICOMDIR, no pixel data, a mosaic: the reason names the fix
    if problem is not None:
        raise DicomError(path, problem)
    frames = as_int(get_value(ds, "NumberOfFrames", 1))
    if frames is None:
        raise DicomError(path, f"invalid NumberOfFrames {get_value(ds, 'NumberOfFrames')!r}: the header is corrupt")
    if frames > 1 or "PerFrameFunctionalGroupsSequence" in ds:
        what = f"multi-frame DICOM (NumberOfFrames={frames})" if frames > 1 else "an enhanced (multi-frame) DICOM object"
        raise DicomError(path, f"{what}: a class or query folder holds single-frame 2D images; export the frames as separate files")
    arr = stored_pixel_array(ds, h)  # DicomError naming the fix
    stored_dtype = arr.dtype
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
    if photometric == "PALETTE COLOR":
        from pydicom.pixels import apply_color_lut

        try:
            arr = apply_color_lut(arr, ds)
        except Exception as e:  # a missing or malformed lookup table
            raise DicomError(path, f"palette colour image whose colour lookup table cannot be applied ({type(e).__name__}: {e})") from e
    arr = np.asarray(arr, dtype=np.float64)
    if arr.ndim == 3 and arr.shape[-1] == 3:
        arr = grey_if_equal(arr)
        return Read(scale(arr, path), 1 if arr.ndim == 2 else 3, ds, h)
    if arr.ndim != 2:
        raise DicomError(path, f"pixel array of shape {arr.shape} (PhotometricInterpretation {photometric}); expected one 2D frame")
    slope, intercept = h.rescale_slope, h.rescale_intercept
    if not (np.isfinite(slope) and np.isfinite(intercept) and slope != 0):
        raise DicomError(path, f"invalid RescaleSlope/RescaleIntercept ({slope}, {intercept})")
    if inverts_monochrome1(ds, h.modality):  # as in a volume: bright is bright, one intensity scale for every file
        arr = invert_monochrome1(arr, ds, stored_dtype)
    arr = arr * slope + intercept
    if h.modality == "CT":
        lo, hi = (float(v) for v in ct_window)
        out = scale(arr, path, lo, hi)
        if not out.max() > out.min():
            where = "below" if out.max() <= 0 else "above" if out.min() >= 1 else None
            raise DicomError(
                path, f"every pixel lies {where} the CT window [{lo:g}, {hi:g}] HU: nothing to see in it; remove it, "
                "or set a wider ct_window" if where else f"constant image (every pixel is {arr.flat[0]:g} HU); remove it"
            )
    else:
        out = scale(arr, path)
    return Read(out, 1, ds, h, windowed=h.modality == "CT")


def mixed_scaling(where: str, windowed: str, own_range: str) -> str:
    """The warning for images scaled in two ways in one set: CT DICOM images through the CT window (in HU) and
    pictures (or other DICOM images) by their own range, so the same anatomy gets other intensities."""
    return (f"{where}: CT DICOM images are read in Hounsfield units through ct_window (e.g. {windowed}), other "
            f"images by their own range (e.g. {own_range}): the same picture saved both ways gets other intensities "
            "(and can get another answer); give the images in one form (export the CT slices to PNG with one window, "
            "or keep them all DICOM)")


def dicom_kind(path: Path) -> str | None:
    """What a file is, by its header alone: ``"image"`` for a DICOM file that may be an image (a corrupt one
    counts: reading it then names the problem), what it is for a DICOM object that is no image (a DICOMDIR, an RT
    structure set, a report: `datamodules.io.dicom.non_image_kind`), None for a file that is not DICOM."""
    try:
        ds, caught = read_dataset(str(path), stop_before_pixels=True)
    except NotDicomError:
        return None
    except DicomError:
        return "image"
    try:
        return non_image_kind(checked_header(ds, str(path), (), caught)) or "image"
    except DicomError:
        return "image"


def maybe_dicom_name(path: Path) -> bool:
    """A name that DICOM files often have: no suffix (``IM0001``), a SOP instance UID (``1.2.840...321``: digits
    for a suffix), or a vendor's '.ima' / '.dic' (read when they are DICOM by content, skipped when not)."""
    return path.suffix.lower() in MAYBE_DICOM or path.suffix[1:].isdigit()


def file_digest(path: Path) -> str:
    """The sha256 of a file's bytes: two files with the same digest are copies of one image."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _is_pil(path: Path) -> bool:
    return path.suffix.lower() in PIL_EXTENSIONS


def _read(path: Path, ct_window: Sequence[float]) -> Read:
    """One image, by its content where its name says an image: a DICOM file named ``.png`` is read as DICOM, a
    PNG, JPEG, TIFF or BMP named ``.dcm`` with Pillow; any other name is read as DICOM."""
    kind = content_kind(path)
    suffix = path.suffix.lower()
    if kind != "DICOM" and (suffix in PIL_EXTENSIONS or (suffix in DICOM_EXTENSIONS and kind in PIL_KINDS)):
        return read_pil(path, kind)
    try:
        return _read_dicom(path, ct_window)
    except NotDicomError:
        if kind is None or kind == "DICOM":
            raise
        fix = "give it the suffix of its format" if kind in PIL_KINDS else "convert it to PNG, TIFF or DICOM, or move it out"
        raise NotDicomError(path, f"not DICOM but, by its content, a {kind} file; {fix}") from None


def _check_settings(image_size: Sequence[int], channels: int, ct_window: Sequence[float]) -> None:
    if len(image_size) != 2 or min(int(s) for s in image_size) < 1:
        raise ValueError(f"image_size must be [height, width] with positive sizes, got {list(image_size)}")
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 (grey) or 3 (RGB), got {channels}")
    if len(ct_window) != 2 or not float(ct_window[1]) > float(ct_window[0]):
        raise ValueError(f"ct_window must be [lower, upper] HU with upper > lower, got {list(ct_window)}")


def resize_bilinear(x: torch.Tensor, size: Sequence[int], antialias: bool) -> torch.Tensor:
    """``F.interpolate(x, size, mode="bilinear", align_corners=False, antialias=...)`` of (B, C, H, W), except that an
    output one pixel wide is computed as the transpose of one pixel high: torch's antialiased bilinear kernel on
    the CPU (2.13) returns the first output value in every row when the output width is 1 (a 2200 x 100 gradient
    came out as a near-black column; one pixel high is right)."""
    h, w = (int(s) for s in size)
    if w == 1 and h > 1 and antialias:
        return F.interpolate(x.transpose(-1, -2), size=(w, h), mode="bilinear", align_corners=False,
                             antialias=True).transpose(-1, -2)
    return F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False, antialias=antialias)


def _to_tensor(read: Read, image_size: Sequence[int], channels: int) -> torch.Tensor:
    """(C, H, W) float32: channel conversion, aspect-preserving resize into ``image_size``, zero padding."""
    arr = read.array
    if arr.ndim == 3 and channels == 1:
        arr = arr @ _LUMA
    x = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))
    x = x.unsqueeze(0) if x.ndim == 2 else x.permute(2, 0, 1)
    if x.shape[0] == 1 and channels == 3:
        x = x.repeat(3, 1, 1)
    th, tw = (int(s) for s in image_size)
    h, w = x.shape[-2:]
    scale = min(th / h, tw / w)
    nh, nw = max(1, min(th, round(h * scale))), max(1, min(tw, round(w * scale)))
    if (nh, nw) != (h, w):
        x = resize_bilinear(x[None], (nh, nw), antialias=scale < 1)[0]
    top, left = (th - nh) // 2, (tw - nw) // 2
    x = F.pad(x, (left, tw - nw - left, top, th - nh - top))
    return x.clamp(0.0, 1.0).contiguous()


#: the intensity settings whose fallback to an image's own range was already warned about (`load_image_and_shape`)
_NATIVE_FALLBACK_SAID: set[str] = set()

#: ``intensity`` of `load_image`: scale an 8-bit picture by 255, as the
#: MedMNIST source does (its checkpoints record ``"intensity": "uint8 / 255"``), instead of by its own range
NATIVE_RANGE = "uint8 / 255"


def load_image(
    path: str | Path,
    image_size: Sequence[int] = (32, 32),
    channels: int = 1,
    ct_window: Sequence[float] = (-250.0, 250.0),
    intensity: str | None = None,
) -> torch.Tensor:
    """Read and preprocess one 2D image exactly as `ImageFolder` does (or, with ``intensity`` `NATIVE_RANGE`, as
    `datamodules.sources.medmnist.MedMNIST` does).

    Args:
        path: a PNG, JPEG, TIFF, BMP or single-frame DICOM file (any other suffix is read as DICOM).
        image_size: (H, W) of the output; the image is scaled to fit and zero-padded (aspect kept).
        channels: 1 (colour becomes grey) or 3 (grey is repeated).
        ct_window: HU window for CT DICOM.
        intensity: None (a picture spans [0, 1] from its own lowest to highest value, `ImageFolder`'s rule) or
            `NATIVE_RANGE` (an 8-bit picture divided by 255; a DICOM, 16-bit or float image, whose range that
            does not give, keeps its own range, with a warning).

    Returns:
        (channels, H, W) float32 tensor in [0, 1].

    Raises:
        ValueError: for an unreadable, corrupt, multi-frame, constant or non-finite image, naming the file.
    """
    return load_image_and_shape(path, image_size, channels, ct_window, intensity)[0]


def load_image_and_shape(
    path: str | Path,
    image_size: Sequence[int] = (32, 32),
    channels: int = 1,
    ct_window: Sequence[float] = (-250.0, 250.0),
    intensity: str | None = None,
    colour_as_grey: bool = False,
) -> tuple[torch.Tensor, tuple[int, int], bool]:
    """`load_image`, the image's (height, width) as read, before resizing, and whether it was scaled through the
    CT window (a CT DICOM image) rather than by its own range (`Read.windowed`).

    With ``colour_as_grey``, a colour image becomes grey as a grey picture is read: its luma at full size,
    stretched over its own range (under the own-range rule: not with ``intensity`` `NATIVE_RANGE` or through the
    CT window), before resizing; with three ``channels`` the grey is repeated. A grey copy of the image is read
    to the same values (up to the rounding of the colour channels), which the luma of the resized colour image,
    stretched afterwards, is not: resizing narrows the range. ``classify`` reads a colour query of a grey support
    this way."""
    _check_settings(image_size, channels, ct_window)
    if intensity not in (None, NATIVE_RANGE):
        raise ValueError(f"intensity must be None (each image's own range) or {NATIVE_RANGE!r}, got {intensity!r}")
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such image file")
    read = _read(path, ct_window)
    if intensity == NATIVE_RANGE:
        native = read.in_native_range()
        if native is None:  # said once per process (a folder of DICOM queries would repeat it for each)
            log = logger.debug if intensity in _NATIVE_FALLBACK_SAID else logger.warning
            _NATIVE_FALLBACK_SAID.add(intensity)
            log("%s: the checkpoint scales 8-bit pictures by their type's range (%s); this image is none "
                "(DICOM, 16-bit, floating point, signed or 1-bit): scaled by its own range instead (said once; every "
                "such image at debug level)", path, intensity)
        else:
            read = dataclasses.replace(read, array=native)
    if colour_as_grey and read.array.ndim == 3:
        grey = read.array @ _LUMA
        lo, hi = float(grey.min()), float(grey.max())
        if intensity is None and not read.windowed and hi > lo:
            grey = (grey - lo) / (hi - lo)
        read = dataclasses.replace(read, array=grey.astype(np.float32), channels=1)
    return _to_tensor(read, image_size, channels), (int(read.array.shape[0]), int(read.array.shape[1])), read.windowed


def _dicom_values(ds, fields: Sequence[str]) -> dict[str, Any]:
    out = {}
    for f in fields:
        v = ds.get(f)
        if v is None:
            continue
        if isinstance(v, (list, tuple)) or type(v).__name__ == "MultiValue":
            v = "\\".join(str(x) for x in v)
        out[f] = v if isinstance(v, (int, float)) else str(v)
    return out


class ImageFolder(ItemSource):
    """One subfolder per class of 2D images (see the module docstring for every rule).

    Args:
        root: the folder of class subfolders.
        image_size: (H, W) of every item; images are scaled to fit and zero-padded (aspect kept).
        channels: 1 (colour converted to grey) or 3 (grey repeated).
        ct_window: HU window for CT DICOM.
        patient_regex: a regular expression with a named group ``patient``, searched in each file name
            (e.g. ``"^(?P<patient>P\\d+)_"``); a file it does not match is an error. Default: DICOM PatientID,
            else every image its own patient.
        extensions: file suffixes read as images (lower case, with the dot; ``""`` = no suffix, tried as
            DICOM, and with it a name whose suffix is digits, a SOP instance UID such as ``1.2.840.1136.321``). Other files are skipped with one warning that lists them; hidden files and folders and ``__MACOSX`` are ignored.
        name: site of the PNG/JPEG images and the format's name in reports (default: the root folder's name).
        site_fields: DICOM header fields that make the site key.
        salt: secret for the pseudonymous patients and item ids (set your own for real data); None (default): the
            environment's ``IMAGING_META_SALT``, else the public default.

    Raises:
        ValueError: from `build`, naming the file or folder: a missing root, no class folders, an empty class
            folder, a class with a single image, an unreadable or corrupt image, a multi-frame DICOM, mixed
            grey and colour images, a file the ``patient_regex`` does not match.
    """

    def __init__(
        self,
        root: str,
        image_size: list[int] | None = None,
        channels: int = 1,
        ct_window: list[float] | None = None,
        patient_regex: str | None = None,
        extensions: list[str] | None = None,
        name: str | None = None,
        site_fields: list[str] | None = None,
        salt: str | None = None,
    ) -> None:
        self.root = str(Path(root).expanduser().resolve())
        self.image_size = [int(s) for s in (image_size if image_size is not None else [32, 32])]
        self.channels = int(channels)
        self.ct_window = [float(v) for v in (ct_window if ct_window is not None else [-250.0, 250.0])]
        _check_settings(self.image_size, self.channels, self.ct_window)
        self.patient_regex = patient_regex
        if patient_regex is not None:
            try:
                compiled = re.compile(patient_regex)
            except re.error as e:
                raise ValueError(f"patient_regex {patient_regex!r} is not a valid regular expression: {e}") from e
            if "patient" not in compiled.groupindex:
                raise ValueError(f"patient_regex {patient_regex!r} needs a named group 'patient', e.g. '^(?P<patient>[^_]+)_'")
        self.extensions = [e.lower() for e in (extensions if extensions is not None else DEFAULT_EXTENSIONS)]
        self.name = name or Path(self.root).name
        self.site_fields = list(site_fields or DEFAULT_SITE_FIELDS)
        warn_unknown_site_fields(self.site_fields, logger)
        self._salt = salt_or_env(salt)  # None: IMAGING_META_SALT, else the public default

    # ------------------------------------------------------------ contract
    def preprocessing(self) -> dict[str, Any]:
        return {"format": "image_folder", "image_size": list(self.image_size), "channels": self.channels,
                "ct_window": list(self.ct_window), "resize": "fit and zero-pad (aspect kept)"}

    def _class_dirs(self) -> list[Path]:
        root = Path(self.root)
        if not root.is_dir():
            raise ValueError(f"ImageFolder root {root} is not a folder; set source.init_args.root to a folder of class subfolders")
        # a cache folder inside the root (`skip_folders`) is no class: once written it was an empty class (a review)
        dirs = [d for d in class_folders(root) if os.path.realpath(d) not in self._skip]
        if not dirs:
            raise ValueError(f"{root}: no class subfolders; put the images of each class in a subfolder named after the class")
        return dirs

    def _candidates(self) -> tuple[dict[str, list[Path]], list[Path]]:
        """Image files per class (sorted) and the skipped files."""
        root = Path(self.root)
        per_class: dict[str, list[Path]] = {}
        dirs = self._class_dirs()
        skipped = [f for f in sorted(root.iterdir()) if f.is_file() and not f.name.startswith(".")]
        for d in dirs:
            files: list[Path] = []
            for f in files_under(d, skip=self._skip):
                if not listed_file(f) or any(map(ignored_name, f.relative_to(root).parts)):
                    continue
                # a name that is a SOP instance UID (1.2.840....321) has digits for a suffix: DICOM files named
                # without a suffix are read, so are these (`classify` reads both)
                uid = f.suffix[1:].isdigit() and "" in self.extensions
                (files if f.suffix.lower() in self.extensions or uid else skipped).append(f)
            per_class.setdefault(class_name(d.name), []).extend(files)  # two Unicode forms of one name: one class
        return per_class, skipped

    def files(self) -> list[Path]:
        per_class, _ = self._candidates()
        return [f for files in per_class.values() for f in files]

    def build(self) -> ItemTable:
        per_class, skipped = self._candidates()
        root = Path(self.root)
        regex = re.compile(self.patient_regex) if self.patient_regex else None
        labels: list[int] = []
        patients: list[str] = []
        sites: list[str] = []
        ids: list[str] = []
        # one buffer of every candidate file's row, filled in place: a list of images stacked at the end held the
        # table twice (a review, 2026-12-06: 3.4 GB at the peak for a 0.8 GB table of 4000 images at 224 x 224);
        # rows never written are never touched, so they cost no memory
        capacity = sum(len(files) for files in per_class.values())
        buffer = torch.empty(capacity, self.channels, *(int(s) for s in self.image_size))
        own_patient = 0  # images that are their own patient (no patient_regex, no DICOM PatientID)
        first_of: dict[int, Path] = {}  # native channel count -> first file with it
        classes = sorted(per_class)
        scaling: dict[bool, str] = {}  # an image of each intensity scaling: a CT window, or its own range
        unreadable: list[str] = []  # every image that cannot be read, named together at the end
        too_few: list[str] = []  # every class folder with fewer than two images, named with them
        copies: dict[str, list[str]] = {}  # file digest -> the images (class/name) with those bytes
        for label, cls in enumerate(classes):
            n_read, n_bad = 0, len(unreadable)
            for f in per_class[cls]:
                rel = f.relative_to(root).as_posix()
                if not f.exists():  # a link to nothing (`listed_file`)
                    unreadable.append(dangling_link(f))
                    continue
                try:
                    read = _read(f, self.ct_window)
                except NotDicomError as e:
                    if maybe_dicom_name(f):  # no suffix, a UID or '.dic', and not DICOM
                        skipped.append(f)
                    else:
                        unreadable.append(str(e))
                    continue
                except DicomError as e:
                    if not _is_pil(f) and dicom_kind(f) not in (None, "image"):  # a DICOMDIR, structure set, report...
                        logger.warning("skipping %s: %s", f, e.reason)
                    else:
                        unreadable.append(str(e))
                    continue
                except ValueError as e:  # the 2D reader's refusals name the file
                    unreadable.append(str(e))
                    continue
                first_of.setdefault(read.channels, f)
                if len(first_of) > 1:
                    kind = {1: "grey-level", 3: "colour (RGB)"}
                    other = 3 if read.channels == 1 else 1
                    raise ValueError(
                        f"{f}: {kind[read.channels]} image, but {first_of[other]} is {kind[other]}; the folder mixes grey and colour "
                        "images (a stray image from another dataset?): convert them to one kind or remove the odd ones"
                    )
                if regex is not None:
                    m = regex.search(f.name)
                    if m is None or not m.group("patient"):
                        raise ValueError(
                            f"{f}: patient_regex {self.patient_regex!r} does not match this file name; "
                            "rename the file or fix the regex"
                        )
                    raw_patient = "name:" + m.group("patient")
                elif read.header is not None and read.header.patient_id:
                    raw_patient = "dicom:" + read.header.patient_id
                else:
                    raw_patient = "file:" + rel
                    own_patient += 1
                if read.dicom is not None:
                    site, _ = site_key(_dicom_values(read.dicom, self.site_fields), self.site_fields, self._salt)
                else:
                    site = self.name
                scaling.setdefault(read.windowed, rel)
                copies.setdefault(file_digest(f), []).append(rel)
                buffer[len(labels)] = _to_tensor(read, self.image_size, self.channels)
                labels.append(label)
                patients.append("p-" + pseudonym(self._salt, raw_patient))
                sites.append(site)
                ids.append("i-" + pseudonym(self._salt, rel))
                n_read += 1
            if n_read < 2 and len(unreadable) > n_bad:
                continue  # the images that cannot be read explain it: they are named below
            if n_read == 0:
                too_few.append(
                    f"{root / cls}: empty class folder (no image with a suffix in {self.extensions}); add images or remove it"
                )
            if n_read == 1:
                too_few.append(
                    f"{root / cls}: a class folder with a single image; few-shot episodes need at least two images "
                    "per class (one support, one query); add images or remove the folder"
                )
        if unreadable or too_few:  # every problem of the folder in one run, not one per run
            for message in unreadable[LISTED:]:
                logger.warning("cannot be read: %s", message)
            for message in too_few[1:] if not unreadable else too_few:
                logger.warning("%s", message)
            if unreadable:
                also = f" (and {len(too_few)} class folder(s) with too few images, above)" if too_few else ""
                raise ValueError(f"{len(unreadable)} image(s) of {root} cannot be read{also}: {listed(unreadable)}")
            raise ValueError(too_few[0] + (f" (and {len(too_few) - 1} more, above)" if len(too_few) > 1 else ""))
        if len(scaling) > 1:
            logger.warning(mixed_scaling(str(root), scaling[True], scaling[False]))
        repeated = [files for files in copies.values() if len(files) > 1]
        if repeated:
            shown = "; ".join(" = ".join(files) for files in repeated[:5]) + (
                f"; and {len(repeated) - 5} more" if len(repeated) > 5 else "")
            logger.warning(
                "%s: %d image(s) are byte-for-byte copies of others (%s): a copy in another class contradicts its "
                "label, and copies counted as other patients can be support and query of one episode, which flatters "
                "the test accuracy; remove the copies", root, sum(len(f) - 1 for f in repeated), shown)
        if own_patient:
            logger.warning(
                "%s: %d of %d images name no patient (no patient_regex, no DICOM PatientID), so each counts as a "
                "patient of its own: if several come from one patient (slices, crops or views of one scan), its "
                "images can be support and query of one episode and the reports' patient intervals are too narrow; "
                "name the patient in the file names and set patient_regex, e.g. '^(?P<patient>[^_]+)_'",
                root, own_patient, len(labels))
        if skipped:
            shown = ", ".join(str(f.relative_to(root)) for f in skipped[:10])
            more = f" and {len(skipped) - 10} more" if len(skipped) > 10 else ""
            warnings.warn(
                f"{root}: skipped {len(skipped)} file(s) that are not images in a class folder: {shown}{more} "
                f"(image suffixes: {self.extensions}; files directly under the root belong to no class)",
                stacklevel=2,
            )
        merged = merge_case_variants(sites)  # SIEMENS and Siemens are one scanner, as the volume index reads them
        for k, v in sorted((k, v) for k, v in merged.items() if k != v):  # (a review: ImageFolder kept them apart)
            logger.info("site %r is read as %r (the same scanner written in another case)", k, v)
        sites = [merged[k] for k in sites]
        return ItemTable(
            # a few skipped candidates: the rows read, a view (the unused rows were never written, so they cost no
            # memory, and the saved table a few rows); many: a copy, which a view would save whole
            images=buffer[: len(labels)] if capacity - len(labels) <= capacity // 10 else buffer[: len(labels)].clone(),
            labels=np.asarray(labels, dtype=np.int64),
            classes=classes,
            patients=patients,
            sites=sites,
            item_ids=ids,
            source={"format": "image_folder", **self.preprocessing(), "name": self.name,
                    "rejected": [str(f.relative_to(root)) for f in skipped]},
        )
