"""A folder with one subfolder per class of 2D images (PNG, JPEG, TIFF, BMP, single-frame DICOM) as an `ItemTable`.

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

* PNG / JPEG / TIFF / BMP (8 or 16 bit or float, grey or colour): scaled per image between its minimum and
  maximum. The picture is read as a viewer shows it: the EXIF/TIFF orientation is applied, and transparency
  (an alpha channel, a palette or colour key) is composited over black, so that two files that look the same
  give the same input whatever colour hides under their transparent pixels. An image whose picture is only in
  its alpha channel (a shape drawn as opacity on one colour) is what that gives: blank over black if the
  colour is black, and refused as constant. A phone's multi-picture JPEG (MPO) gives its main picture.
  16-bit colour and float colour TIFFs (planar or not), 16-bit grey+alpha and 64-bit TIFFs are read at full
  precision with tifffile (Pillow cuts or garbles them); 16-bit colour and grey+alpha PNGs, which Pillow
  decodes at 8 bits only, are refused with the fix. Images over Pillow's decompression-bomb limit (about 89
  megapixels) are refused with their size.
* DICOM: decoded as the volume reader decodes a slice (`datamodules.io.dicom_pixels`): MONOCHROME1 images
  (minimum displayed white) have their stored values inverted over the stored range, then
  RescaleSlope/RescaleIntercept are applied; CT is clipped to ``ct_window`` (HU) and scaled to [0, 1]; other
  modalities are scaled per image between their minimum and maximum. Palette colour becomes RGB. DICOM objects
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

import importlib
import logging
import re
import struct
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from datamodules.indexing.scan import DEFAULT_SITE_FIELDS, pseudonym, site_key
from datamodules.io.dicom import DicomError, NotDicomError, checked_header, non_image_kind, read_dataset
from datamodules.io.dicom_checks import kind_problem
from datamodules.io.dicom_header import as_int, get_value
from datamodules.io.dicom_pixels import invert_monochrome1, stored_pixel_array
from datamodules.sources.items import ItemSource, ItemTable

#: 2D image files read with Pillow (TIFF: single-page, 8/16-bit or float grey, or RGB, as pathology tiles are)
PIL_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
DICOM_EXTENSIONS = (".dcm", ".dicom")
DEFAULT_EXTENSIONS = [*PIL_EXTENSIONS, *DICOM_EXTENSIONS, ""]  # "": extension-less files are tried as DICOM
#: folders never read as a class nor for images: macOS archive metadata, left by unzipping (hidden names too)
IGNORED_FOLDERS = frozenset({"__MACOSX"})

_LUMA = np.array([0.299, 0.587, 0.114])
#: what a file is by its first bytes: (bytes, offset, name), DICOM first (its 128-byte preamble may hold a TIFF header)
_MAGIC = (
    (b"DICM", 128, "DICOM"), (b"\x89PNG\r\n\x1a\n", 0, "PNG"), (b"\xff\xd8\xff", 0, "JPEG"), (b"II*\x00", 0, "TIFF"),
    (b"MM\x00*", 0, "TIFF"), (b"II+\x00", 0, "TIFF"), (b"MM\x00+", 0, "TIFF"), (b"BM", 0, "BMP"), (b"GIF8", 0, "GIF"),
    (b"WEBP", 8, "WebP"), (b"\x00\x00\x00\x0cjP  ", 0, "JPEG 2000"), (b"\xffO\xffQ", 0, "JPEG 2000"),
    (b"%PDF", 0, "PDF"), (b"PK\x03\x04", 0, "ZIP archive"), (b"\x1f\x8b", 0, "gzip-compressed"),
    (b"n+1\x00", 344, "NIfTI volume"), (b"ni1\x00", 344, "NIfTI volume"),
)
_PIL_KINDS = ("PNG", "JPEG", "TIFF", "BMP")
#: Pillow's plugin of each kind, opened directly to learn the size before `Image.open` warns about it
_PLUGINS = {"PNG": ("PngImagePlugin", "PngImageFile"), "JPEG": ("JpegImagePlugin", "JpegImageFile"),
            "TIFF": ("TiffImagePlugin", "TiffImageFile"), "BMP": ("BmpImagePlugin", "BmpImageFile")}
_ORIENTATION = 0x0112  # EXIF/TIFF Orientation


logger = logging.getLogger(__name__)

#: tifffile's log lines while this thread or task reads a TIFF (`_KeepTifffileLines`); None: not reading
_TIFF_LINES: ContextVar[list[str] | None] = ContextVar("imaging_meta_tifffile_lines", default=None)


class _KeepTifffileLines(logging.Filter):
    """tifffile's complaints about the TIFF this thread is reading are kept for our one-line message, not
    printed (a damaged header gives hundreds); other lines pass unchanged."""

    def filter(self, record: logging.LogRecord) -> bool:
        lines = _TIFF_LINES.get()
        if lines is None:
            return True
        lines.append(record.getMessage())
        return False


logging.getLogger("tifffile").addFilter(_KeepTifffileLines())


@contextmanager
def _tifffile_lines() -> Iterator[list[str]]:
    lines: list[str] = []
    token = _TIFF_LINES.set(lines)
    try:
        yield lines
    finally:
        _TIFF_LINES.reset(token)


def ignored_name(name: str) -> bool:
    """A hidden file or folder (``.thumbnails``, ``.DS_Store``) or ``__MACOSX``: never an image nor a class."""
    return name.startswith(".") or name in IGNORED_FOLDERS


class _NotRead(ValueError):
    """Our own refusal raised among Pillow's calls: passed on as it is, never called a corrupt file."""


@dataclass
class _Read:
    """One decoded image before resizing: ``array`` (H, W) or (H, W, 3) float32 in [0, 1]."""

    array: np.ndarray
    channels: int  # native channel count: 1 grey, 3 colour
    dicom: Any = None  # the pydicom data set of a DICOM file (headers for patient and site)
    header: Any = None  # its DicomHeader


def _scale(arr: np.ndarray, path: Path, lo: float | None = None, hi: float | None = None) -> np.ndarray:
    """Clip to [lo, hi] (default: the image's own range) and scale to [0, 1], in float32 for 8- and 16-bit and
    float32 data (exact), float64 otherwise."""
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        raise ValueError(f"{path}: the image holds NaN or Inf values; repair or remove this file")
    work = np.float32 if arr.dtype.itemsize <= 2 or arr.dtype == np.float32 else np.float64
    if lo is None or hi is None:
        lo, hi = float(arr.min()), float(arr.max())
        if not hi > lo:
            raise ValueError(f"{path}: constant image (every pixel is {lo:g}); nothing to learn from it, remove it")
        out = arr.astype(work)
    else:
        out = np.clip(arr, lo, hi).astype(work, copy=False)
    np.subtract(out, lo, out=out)
    np.divide(out, hi - lo, out=out)
    return out.astype(np.float32, copy=False)


def _grey_if_equal(arr: np.ndarray) -> np.ndarray:
    """(H, W, 3) with three equal channels -> (H, W); anything else unchanged."""
    if arr.ndim == 3 and np.array_equal(arr[..., 0], arr[..., 1]) and np.array_equal(arr[..., 0], arr[..., 2]):
        return arr[..., 0]
    return arr


def _content_kind(path: Path) -> str | None:
    """What a file is by its first bytes: ``"PNG"``, ``"JPEG"``, ``"TIFF"``, ``"BMP"``, ``"DICOM"`` (the
    ``DICM`` marker at byte 128), another format's name (GIF, PDF, a NIfTI volume...), or None."""
    try:
        with open(path, "rb") as f:
            head = f.read(348)
    except OSError:
        return None
    return next((name for magic, at, name in _MAGIC if head[at : at + len(magic)] == magic), None)


def _too_large(path: Path, width: int, height: int) -> None:
    from PIL import Image

    limit = Image.MAX_IMAGE_PIXELS
    if limit and width * height > limit:
        raise _NotRead(
            f"{path}: the image is {width} x {height} pixels ({width * height / 1e6:.3g} megapixels), more than the "
            f"{limit / 1e6:.3g} read here (Pillow's decompression-bomb limit); downsample it (it is shrunk to the configured image_size "
            "anyway) and save it again"
        )


def _orient(arr: np.ndarray, orientation: int) -> np.ndarray:
    """(H, W, ...) as a viewer shows an image of this EXIF/TIFF Orientation (as `PIL.ImageOps.exif_transpose`)."""
    ops = {2: lambda a: a[:, ::-1], 3: lambda a: a[::-1, ::-1], 4: lambda a: a[::-1], 5: lambda a: a.swapaxes(0, 1),
           6: lambda a: np.rot90(a, -1), 7: lambda a: a.swapaxes(0, 1)[::-1, ::-1], 8: lambda a: np.rot90(a, 1)}
    return ops[orientation](arr) if orientation in ops else arr


def _exif_orientation(exif: object) -> int:
    """The Orientation (tag 0x0112) in raw EXIF bytes (a JPEG's APP1, a PNG's eXIf chunk); 1 when absent or
    unreadable. Read here: Pillow's own parser warns about damaged EXIF without naming the file."""
    if not isinstance(exif, bytes):
        return 1
    data = exif[6:] if exif.startswith(b"Exif\x00\x00") else exif
    try:
        order = {b"II": "<", b"MM": ">"}[data[:2]]
        (ifd,) = struct.unpack(order + "I", data[4:8])
        (n,) = struct.unpack(order + "H", data[ifd : ifd + 2])
        for at in range(ifd + 2, ifd + 2 + 12 * n, 12):
            tag, kind = struct.unpack(order + "HH", data[at : at + 4])
            if tag == _ORIENTATION and kind == 3:  # SHORT
                return int(struct.unpack(order + "H", data[at + 8 : at + 10])[0])
    except (KeyError, struct.error):
        pass
    return 1


def _composited(path: Path, colour: np.ndarray, alpha: np.ndarray | None, mode: str) -> _Read:
    """Colour (H, W) or (H, W, 3), native values, composited over black with ``alpha`` in [0, 1] (opaque: None)."""
    if colour.ndim == 3 and colour.shape[-1] != 3:
        raise ValueError(f"{path}: image mode {mode!r} with {colour.shape[-1]} channels; save it as grey-level or RGB")
    if alpha is not None:
        work = np.float32 if colour.dtype.itemsize <= 2 or colour.dtype == np.float32 else np.float64
        colour = colour.astype(work) * (alpha if colour.ndim == 2 else alpha[..., None])
        if alpha.min() < alpha.max() and not colour.max() > colour.min():
            raise ValueError(
                f"{path}: constant image once its transparency is composited over black (as every image is): the "
                "picture is only in its alpha channel; save the shape as grey levels (e.g. white on black)"
            )
    colour = _grey_if_equal(colour)
    return _Read(_scale(colour, path), 1 if colour.ndim == 2 else 3)


@dataclass
class _Tiff:
    """The first page of a TIFF as tifffile parses its header."""

    shape: tuple[int, ...]
    axes: str
    bits: int
    samples: int
    sample_format: int  # 1 unsigned, 2 signed, 3 float
    photometric: int  # 0 min-is-white, 1 min-is-black, 2 RGB, ...
    extras: tuple[int, ...]  # ExtraSamples: 0 unspecified, 1 associated (premultiplied) alpha, 2 alpha
    compression: str
    orientation: int

    def pillow_misreads(self) -> bool:
        """Pillow garbles or cuts it (16-bit colour, planar or not; float colour; uint32 wraps to negative) or
        cannot open it (64-bit, float other than 32-bit grey, 16-bit grey+alpha)."""
        if self.samples > 1:
            return self.bits > 8 or self.sample_format == 3
        return self.bits == 64 or (self.bits == 32 and self.sample_format == 1) or (self.sample_format == 3 and self.bits != 32)

    def describe(self) -> str:
        kind = {1: "", 2: "signed ", 3: "float "}.get(self.sample_format, "")
        what = {0: "grey", 1: "grey", 2: "colour (RGB)"}.get(self.photometric, f"photometric {self.photometric}")
        return f"{self.bits}-bit {kind}{what} TIFF with {self.samples} sample(s) per pixel"


def _tiff_header(path: Path) -> _Tiff | None:
    """The first page's layout by tifffile; None without tifffile or when it finds the header damaged."""
    try:
        import tifffile
    except ImportError:
        return None
    with _tifffile_lines() as lines:
        try:
            with tifffile.TiffFile(path) as tif:
                p = tif.pages[0]
                if not isinstance(p, tifffile.TiffPage):
                    return None
                tag = p.tags.get(_ORIENTATION)
                layout = _Tiff(tuple(p.shape), p.axes, int(p.bitspersample), int(p.samplesperpixel), int(p.sampleformat),
                               int(p.photometric), tuple(int(e) for e in p.extrasamples), tifffile.COMPRESSION(p.compression).name,
                               int(tag.value) if tag is not None else 1)
                sane = all(isinstance(s, int) and s > 0 for s in layout.shape)
        except Exception:
            return None
    return layout if sane and not lines else None


def _read_tifffile(path: Path, t: _Tiff, failed: Exception | None = None) -> _Read:
    """A TIFF that Pillow misreads, or cannot decode (``failed``: Pillow's error), read with tifffile: grey or RGB,
    an alpha sample composited over black. After Pillow failed, any complaint of tifffile makes it corrupt."""
    try:
        import tifffile
    except ImportError as e:
        raise ValueError(f"{path}: a {t.describe()}, which Pillow cannot read exactly; reading it needs tifffile "
                         "(installed with scikit-image): pip install tifffile") from e
    with _tifffile_lines() as lines:
        try:
            with tifffile.TiffFile(path) as tif:
                if len(tif.pages) > 1:
                    raise _NotRead(f"{path}: an animated/multi-page image ({len(tif.pages)} frames); save one frame per file")
                h, w = (t.shape[1], t.shape[2]) if t.axes.startswith("S") else (t.shape[0], t.shape[1])
                _too_large(path, w, h)
                arr = tif.pages[0].asarray()
        except _NotRead:
            raise
        except MemoryError:
            raise
        except Exception as e:
            if "imagecodecs" in str(e):
                raise ValueError(f"{path}: a {t.describe()} compressed with {t.compression}, which is decoded here only "
                                 "with the imagecodecs package: save it uncompressed or deflate-compressed, or pip "
                                 "install imagecodecs") from e
            raise ValueError(f"{path}: cannot read the image (tifffile: {type(e).__name__}: {e}); the file is a "
                             "corrupt or truncated TIFF: replace it or remove it") from e
    if lines and failed is not None:
        raise ValueError(f"{path}: cannot read the image ({type(failed).__name__}: {failed}; tifffile: {lines[0]}); "
                         "the file is a corrupt or truncated TIFF: replace it or remove it")
    for line in lines[:1]:
        logger.warning("%s: tifffile: %s", path, line)
    if t.axes in ("SYX", "YXS", "YX"):
        arr = np.moveaxis(arr, 0, -1) if t.axes == "SYX" else arr
    else:
        raise ValueError(f"{path}: a TIFF of axes {t.axes} and shape {t.shape}; save one 2D grey or RGB image per file")
    arr = _orient(arr if arr.ndim == 3 else arr[..., None], t.orientation)
    n_colour = 3 if t.photometric == 2 else 1
    extras = arr.shape[-1] - n_colour
    if t.photometric not in (0, 1, 2) or not 0 <= extras <= len(t.extras) or (n_colour == 1 and 0 in t.extras[:extras]):
        raise ValueError(f"{path}: a {t.describe()} (photometric {t.photometric}); save it as grey-level or RGB")
    colour = arr[..., 0] if n_colour == 1 else arr[..., :3]
    if t.photometric == 0:  # min-is-white: as a viewer shows it
        colour = ~colour if colour.dtype.kind in "bu" else -colour.astype(np.float64)
    alpha = None
    if extras and t.extras[:1] == (2,):  # unassociated alpha; associated alpha is already over black
        a = arr[..., n_colour]
        alpha = a / np.iinfo(a.dtype).max if a.dtype.kind in "ui" else np.clip(a, 0, 1)
        alpha = alpha.astype(np.float32)
    return _composited(path, colour, alpha, t.describe())


def _png_depth_problem(path: Path) -> str | None:
    """16-bit colour and grey+alpha PNGs, which Pillow decodes at 8 bits (from the IHDR chunk)."""
    with open(path, "rb") as f:
        head = f.read(26)
    what = {2: "colour (RGB)", 4: "grey+alpha", 6: "colour+alpha (RGBA)"}.get(head[25]) if len(head) == 26 else None
    if head[24:25] != b"\x10" or what is None:
        return None
    return (f"a 16-bit {what} PNG, which is read here at 8 bits only (12-bit data would keep 16 grey levels); save it "
            "as a 16-bit grey PNG, an 8-bit colour PNG or a 16-bit TIFF (read at full precision)")


def _pil_pixels(path: Path, kind: str | None) -> tuple[np.ndarray, np.ndarray | None, str]:
    """(colour, alpha in [0, 1] or None, mode) as Pillow decodes the file, oriented as a viewer shows it.
    Pillow's own exceptions pass: the caller names a corrupt file."""
    from PIL import Image

    if kind in _PLUGINS:  # the size before Image.open, which warns without naming the file
        module, name = _PLUGINS[kind]
        with open(path, "rb") as fp, getattr(importlib.import_module(f"PIL.{module}"), name)(fp) as header:
            _too_large(path, *header.size)
    if kind == "PNG":  # loading skips the checksums of the image data: a damaged PNG would read as wrong pixels
        with open(path, "rb") as fp, Image.open(fp) as check:
            try:
                check.verify()
            except OSError:  # truncated: loading decides whether the pixels are complete
                pass
    with open(path, "rb") as fp, Image.open(fp) as opened:  # a file object: Pillow 13 memory-maps a TIFF at
        im: Image.Image = opened  # its rotated size if given a path, and garbles an orientation of 5 to 8
        frames = 1 if im.format == "MPO" else getattr(im, "n_frames", 1)  # MPO: a phone's main picture first
        if frames > 1:
            raise _NotRead(f"{path}: an animated/multi-page image ({frames} frames); save one frame per file")
        im.load()  # a TIFF's orientation is applied by Pillow while loading
        orientation = 1 if im.format == "TIFF" else _exif_orientation(im.info.get("exif"))
        mode = im.mode
        if mode in ("P", "PA"):  # a palette, and its transparency as alpha
            im = im.convert("RGBA" if mode == "PA" or "transparency" in im.info else "RGB")
        elif mode in ("La", "RGBa"):  # premultiplied
            im = im.convert(mode.upper())
        elif mode in ("CMYK", "YCbCr", "LAB", "HSV", "RGBX"):
            im = im.convert("RGB")
        arr, alpha = np.asarray(im), None
        key = im.info.get("transparency")
        if im.mode in ("LA", "RGBA"):
            arr, alpha = (arr[..., 0] if im.mode == "LA" else arr[..., :3]), arr[..., -1].astype(np.float32) / 255
        elif isinstance(key, (int, tuple)) and im.mode != "P":  # a colour key (tRNS) on grey or RGB
            hidden = np.all(arr == np.asarray(key), axis=-1) if arr.ndim == 3 else arr == key
            alpha = (~hidden).astype(np.float32)
    return _orient(arr, orientation), None if alpha is None else _orient(alpha, orientation), mode


def _unreadable(path: Path, kind: str | None, e: Exception) -> str:
    from PIL import Image, UnidentifiedImageError

    if path.is_file() and path.stat().st_size == 0:
        return f"{path}: an empty file (0 bytes); copy it again from its source, or remove it"
    if isinstance(e, Image.DecompressionBombError):
        return f"{path}: {e}; downsample it (it is shrunk to the configured image_size anyway) and save it again"
    if kind is not None and kind not in _PIL_KINDS:
        return (f"{path}: by its content a {kind} file, not an image format read here (PNG, JPEG, TIFF, BMP, "
                "DICOM); convert it or remove it")
    why = "Pillow does not recognise it" if isinstance(e, UnidentifiedImageError) else f"{type(e).__name__}: {e}"
    what = f"a corrupt or truncated {kind}" if kind else "corrupt, truncated or not a PNG/JPEG/TIFF/BMP"
    return f"{path}: cannot read the image ({why}); the file is {what}: replace it or remove it"


def _read_pil(path: Path, kind: str | None = None) -> _Read:
    """A PNG, JPEG, TIFF or BMP (``kind``: what its content says) by Pillow, or by tifffile for TIFFs Pillow
    misreads; every failure is a ValueError naming the file."""
    from PIL import UnidentifiedImageError

    tiff = _tiff_header(path) if kind == "TIFF" else None
    if tiff is not None and tiff.pillow_misreads():
        return _read_tifffile(path, tiff)
    problem = _png_depth_problem(path) if kind == "PNG" else None
    if problem:
        raise ValueError(f"{path}: {problem}")
    try:
        colour, alpha, mode = _pil_pixels(path, kind)
    except (_NotRead, MemoryError):
        raise
    except Exception as e:  # decoders raise anything for a damaged file: TypeError, struct.error, IndexError...
        if tiff is not None and isinstance(e, UnidentifiedImageError):  # a TIFF layout Pillow does not know
            return _read_tifffile(path, tiff, failed=e)
        raise ValueError(_unreadable(path, kind, e)) from e
    return _composited(path, colour, alpha, mode)


def _read_dicom(path: Path, ct_window: Sequence[float]) -> _Read:
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
        arr = _grey_if_equal(arr)
        return _Read(_scale(arr, path), 1 if arr.ndim == 2 else 3, ds, h)
    if arr.ndim != 2:
        raise DicomError(path, f"pixel array of shape {arr.shape} (PhotometricInterpretation {photometric}); expected one 2D frame")
    slope, intercept = h.rescale_slope, h.rescale_intercept
    if not (np.isfinite(slope) and np.isfinite(intercept) and slope != 0):
        raise DicomError(path, f"invalid RescaleSlope/RescaleIntercept ({slope}, {intercept})")
    if photometric == "MONOCHROME1":  # as in a volume: bright is bright, one intensity scale for every file
        arr = invert_monochrome1(arr, ds, stored_dtype)
    arr = arr * slope + intercept
    if h.modality == "CT":
        lo, hi = (float(v) for v in ct_window)
        out = _scale(arr, path, lo, hi)
        if not out.max() > out.min():
            where = "below" if out.max() <= 0 else "above" if out.min() >= 1 else None
            raise DicomError(
                path, f"every pixel lies {where} the CT window [{lo:g}, {hi:g}] HU: nothing to see in it; remove it, "
                "or set a wider ct_window" if where else f"constant image (every pixel is {arr.flat[0]:g} HU); remove it"
            )
    else:
        out = _scale(arr, path)
    return _Read(out, 1, ds, h)


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


def _is_pil(path: Path) -> bool:
    return path.suffix.lower() in PIL_EXTENSIONS


def _read(path: Path, ct_window: Sequence[float]) -> _Read:
    """One image, by its content where its name says an image: a DICOM file named ``.png`` is read as DICOM, a
    PNG, JPEG, TIFF or BMP named ``.dcm`` with Pillow; any other name is read as DICOM."""
    kind = _content_kind(path)
    suffix = path.suffix.lower()
    if kind != "DICOM" and (suffix in PIL_EXTENSIONS or (suffix in DICOM_EXTENSIONS and kind in _PIL_KINDS)):
        return _read_pil(path, kind)
    try:
        return _read_dicom(path, ct_window)
    except NotDicomError:
        if kind is None or kind == "DICOM":
            raise
        fix = "give it the suffix of its format" if kind in _PIL_KINDS else "convert it to PNG, TIFF or DICOM, or move it out"
        raise NotDicomError(path, f"not DICOM but, by its content, a {kind} file; {fix}") from None


def _check_settings(image_size: Sequence[int], channels: int, ct_window: Sequence[float]) -> None:
    if len(image_size) != 2 or min(int(s) for s in image_size) < 1:
        raise ValueError(f"image_size must be [height, width] with positive sizes, got {list(image_size)}")
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 (grey) or 3 (RGB), got {channels}")
    if len(ct_window) != 2 or not float(ct_window[1]) > float(ct_window[0]):
        raise ValueError(f"ct_window must be [lower, upper] HU with upper > lower, got {list(ct_window)}")


def _to_tensor(read: _Read, image_size: Sequence[int], channels: int) -> torch.Tensor:
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
        x = F.interpolate(x[None], size=(nh, nw), mode="bilinear", align_corners=False, antialias=scale < 1)[0]
    top, left = (th - nh) // 2, (tw - nw) // 2
    x = F.pad(x, (left, tw - nw - left, top, th - nh - top))
    return x.clamp(0.0, 1.0).contiguous()


def load_image(
    path: str | Path,
    image_size: Sequence[int] = (32, 32),
    channels: int = 1,
    ct_window: Sequence[float] = (-250.0, 250.0),
) -> torch.Tensor:
    """Read and preprocess one 2D image exactly as `ImageFolder` does.

    Args:
        path: a PNG, JPEG, TIFF, BMP or single-frame DICOM file (any other suffix is read as DICOM).
        image_size: (H, W) of the output; the image is scaled to fit and zero-padded (aspect kept).
        channels: 1 (colour becomes grey) or 3 (grey is repeated).
        ct_window: HU window for CT DICOM.

    Returns:
        (channels, H, W) float32 tensor in [0, 1].

    Raises:
        ValueError: for an unreadable, corrupt, multi-frame, constant or non-finite image, naming the file.
    """
    return load_image_and_shape(path, image_size, channels, ct_window)[0]


def load_image_and_shape(
    path: str | Path,
    image_size: Sequence[int] = (32, 32),
    channels: int = 1,
    ct_window: Sequence[float] = (-250.0, 250.0),
) -> tuple[torch.Tensor, tuple[int, int]]:
    """`load_image`, and the image's (height, width) as read, before resizing."""
    _check_settings(image_size, channels, ct_window)
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such image file")
    read = _read(path, ct_window)
    return _to_tensor(read, image_size, channels), (int(read.array.shape[0]), int(read.array.shape[1]))


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
            DICOM). Other files are skipped with one warning that lists them; hidden files and folders and ``__MACOSX`` are ignored.
        name: site of the PNG/JPEG images and the format's name in reports (default: the root folder's name).
        site_fields: DICOM header fields that make the site key.
        salt: secret for the pseudonymous patients and item ids (set your own for real data).

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
        salt: str = "imaging-meta",
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
        self._salt = salt

    # ------------------------------------------------------------ contract
    def preprocessing(self) -> dict[str, Any]:
        return {"format": "image_folder", "image_size": list(self.image_size), "channels": self.channels,
                "ct_window": list(self.ct_window), "resize": "fit and zero-pad (aspect kept)"}

    def _class_dirs(self) -> list[Path]:
        root = Path(self.root)
        if not root.is_dir():
            raise ValueError(f"ImageFolder root {root} is not a folder; set source.init_args.root to a folder of class subfolders")
        dirs = sorted(d for d in root.iterdir() if d.is_dir() and not ignored_name(d.name))
        for d in sorted(root.iterdir()):
            if d.is_dir() and d.name in IGNORED_FOLDERS:
                logger.debug("ignoring %s: macOS archive metadata (left by unzipping), not a class folder", d)
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
            for f in sorted(d.rglob("*")):
                if not f.is_file() or any(map(ignored_name, f.relative_to(root).parts)):
                    continue
                (files if f.suffix.lower() in self.extensions else skipped).append(f)
            per_class[d.name] = files
        return per_class, skipped

    def files(self) -> list[Path]:
        per_class, _ = self._candidates()
        return [f for files in per_class.values() for f in files]

    def build(self) -> ItemTable:
        per_class, skipped = self._candidates()
        root = Path(self.root)
        regex = re.compile(self.patient_regex) if self.patient_regex else None
        images, labels, patients, sites, ids = [], [], [], [], []
        first_of: dict[int, Path] = {}  # native channel count -> first file with it
        classes = sorted(per_class)
        for label, cls in enumerate(classes):
            n_read = 0
            for f in per_class[cls]:
                rel = f.relative_to(root).as_posix()
                try:
                    read = _read(f, self.ct_window)
                except NotDicomError:
                    if f.suffix == "":  # an extension-less file that is not DICOM: a stray file
                        skipped.append(f)
                        continue
                    raise
                except DicomError as e:
                    if not _is_pil(f) and dicom_kind(f) not in (None, "image"):  # a DICOMDIR, structure set, report...
                        logger.warning("skipping %s: %s", f, e.reason)
                        continue
                    raise
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
                if read.dicom is not None:
                    site, _ = site_key(_dicom_values(read.dicom, self.site_fields), self.site_fields, self._salt)
                else:
                    site = self.name
                images.append(_to_tensor(read, self.image_size, self.channels))
                labels.append(label)
                patients.append("p-" + pseudonym(self._salt, raw_patient))
                sites.append(site)
                ids.append("i-" + pseudonym(self._salt, rel))
                n_read += 1
            if n_read == 0:
                raise ValueError(
                    f"{root / cls}: empty class folder (no image with a suffix in {self.extensions}); add images or remove it"
                )
            if n_read == 1:
                raise ValueError(
                    f"{root / cls}: a class folder with a single image; few-shot episodes need at least two images "
                    "per class (one support, one query); add images or remove the folder"
                )
        if skipped:
            shown = ", ".join(str(f.relative_to(root)) for f in skipped[:10])
            more = f" and {len(skipped) - 10} more" if len(skipped) > 10 else ""
            warnings.warn(
                f"{root}: skipped {len(skipped)} file(s) that are not images in a class folder: {shown}{more} "
                f"(image suffixes: {self.extensions}; files directly under the root belong to no class)",
                stacklevel=2,
            )
        return ItemTable(
            images=torch.stack(images),
            labels=np.asarray(labels, dtype=np.int64),
            classes=classes,
            patients=patients,
            sites=sites,
            item_ids=ids,
            source={"format": "image_folder", **self.preprocessing(), "name": self.name,
                    "rejected": [str(f.relative_to(root)) for f in skipped]},
        )
