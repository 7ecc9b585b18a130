"""2D pictures: one file decoded to an array, by its content.

A PNG, JPEG, TIFF or BMP file is told by its first bytes (`content_kind`), not by its name, and decoded by
`read_pil` with Pillow, or with tifffile for the TIFFs Pillow misreads, into a `Read`: (H, W) or (H, W, 3)
float32 in [0, 1], before any resizing. Every failure is a ValueError naming the file and the fix. The DICOM
side of the 2D reader, the choice between the two and the tensors are `datamodules.sources.image_folder`'s.

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
  megapixels) are refused with their size. A PNG's checksums are verified, so that a damaged file is refused
  rather than read as wrong pixels.
"""

from __future__ import annotations

import importlib
import logging
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

#: what a file is by its first bytes: (bytes, offset, name), DICOM first (its 128-byte preamble may hold a TIFF header)
_MAGIC = (
    (b"DICM", 128, "DICOM"), (b"\x89PNG\r\n\x1a\n", 0, "PNG"), (b"\xff\xd8\xff", 0, "JPEG"), (b"II*\x00", 0, "TIFF"),
    (b"MM\x00*", 0, "TIFF"), (b"II+\x00", 0, "TIFF"), (b"MM\x00+", 0, "TIFF"), (b"BM", 0, "BMP"), (b"GIF8", 0, "GIF"),
    (b"WEBP", 8, "WebP"), (b"\x00\x00\x00\x0cjP  ", 0, "JPEG 2000"), (b"\xffO\xffQ", 0, "JPEG 2000"),
    (b"%PDF", 0, "PDF"), (b"PK\x03\x04", 0, "ZIP archive"), (b"\x1f\x8b", 0, "gzip-compressed"),
    (b"n+1\x00", 344, "NIfTI volume"), (b"ni1\x00", 344, "NIfTI volume"),
)
#: the kinds (`content_kind`) decoded here
PIL_KINDS = ("PNG", "JPEG", "TIFF", "BMP")
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


class _NotRead(ValueError):
    """Our own refusal raised among Pillow's calls: passed on as it is, never called a corrupt file."""


@dataclass
class Read:
    """One decoded image before resizing: ``array`` (H, W) or (H, W, 3) float32 in [0, 1]; a picture's, or a
    DICOM image's with its data set and header (read by `datamodules.sources.image_folder`)."""

    array: np.ndarray
    channels: int  # native channel count: 1 grey, 3 colour
    dicom: Any = None  # the pydicom data set of a DICOM file (headers for patient and site)
    header: Any = None  # its DicomHeader
    windowed: bool = False  # scaled through a fixed window (a CT image in HU: ``ct_window``), not its own range
    own_range: tuple[float, float] | None = None  # a picture's (lowest, highest) stored value, which ``array`` spans
    native_max: float | None = None  # an integer picture's largest storable value (255 for 8 bits), else None

    def in_native_range(self) -> np.ndarray | None:
        """The picture's values divided by the largest its integer type can store, 255, as MedMNIST's
        ``uint8 / 255``, instead of stretched over its own range; None for DICOM, float, signed, 1-bit and 16-bit
        pictures. A 16-bit picture does not say how many of its bits are used (a 12-bit X-ray exported to a 16-bit
        PNG spans 0-4095, near black divided by 65535; a review, 2026-12-06), and guessing the depth from each
        image's highest value would scale two images of one detector differently."""
        if self.own_range is None or self.native_max is None or self.native_max > 255:
            return None
        lo, hi = self.own_range
        return np.clip((self.array * (hi - lo) + lo) / self.native_max, 0.0, 1.0).astype(np.float32)


def scale(arr: np.ndarray, path: Path, lo: float | None = None, hi: float | None = None) -> np.ndarray:
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


def grey_if_equal(arr: np.ndarray) -> np.ndarray:
    """(H, W, 3) with three equal channels -> (H, W); anything else unchanged."""
    if arr.ndim == 3 and np.array_equal(arr[..., 0], arr[..., 1]) and np.array_equal(arr[..., 0], arr[..., 2]):
        return arr[..., 0]
    return arr


def content_kind(path: Path) -> str | None:
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
            if tag == _ORIENTATION and kind == 3:  # SHORT, as the standard has it
                return int(struct.unpack(order + "H", data[at + 8 : at + 10])[0])
            if tag == _ORIENTATION and kind == 4:  # LONG, as some writers store it (Pillow reads it too)
                return int(struct.unpack(order + "I", data[at + 8 : at + 12])[0])
    except (KeyError, struct.error):
        pass
    return 1


def _composited(path: Path, colour: np.ndarray, alpha: np.ndarray | None, mode: str) -> Read:
    """Colour (H, W) or (H, W, 3), native values, composited over black with ``alpha`` in [0, 1] (opaque: None)."""
    if colour.ndim == 3 and colour.shape[-1] != 3:
        raise ValueError(f"{path}: image mode {mode!r} with {colour.shape[-1]} channels; save it as grey-level or RGB")
    # unsigned 8- and 16-bit pictures only: Pillow reads int16 and int32 TIFFs as signed 32-bit ('I'), whose type
    # range says nothing about the values (they would all be near 0)
    unsigned = colour.dtype.kind == "u" and colour.dtype.itemsize in (1, 2)  # either byte order ('>u2': I;16B)
    native_max = float(np.iinfo(colour.dtype).max) if unsigned else None
    if alpha is not None and not alpha.max() > 0:
        logger.warning("%s: every pixel is fully transparent (alpha 0 everywhere); read as opaque, as viewers show "
                       "such files (BMPs of some Windows tools)", path)
        alpha = None
    if alpha is not None:
        work = np.float32 if colour.dtype.itemsize <= 2 or colour.dtype == np.float32 else np.float64
        colour = colour.astype(work) * (alpha if colour.ndim == 2 else alpha[..., None])
        if alpha.min() < alpha.max() and not colour.max() > colour.min():
            raise ValueError(
                f"{path}: constant image once its transparency is composited over black (as every image is): the "
                "picture is only in its alpha channel; save the shape as grey levels (e.g. white on black)"
            )
    colour = grey_if_equal(colour)
    own = (float(colour.min()), float(colour.max()))
    return Read(scale(colour, path), 1 if colour.ndim == 2 else 3, own_range=own, native_max=native_max)


class _NoCodec(ValueError):
    """tifffile lacks the decoder of this TIFF's compression (imagecodecs is not installed)."""


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
        if self.photometric == 0 and (self.bits > 8 or self.sample_format == 3):
            return True  # min-is-white beyond 8 bits: Pillow's I;16 and F modes ignore it (read inverted; a review)
        return (self.bits == 64 or (self.bits == 32 and self.sample_format == 1) or (self.sample_format == 3 and self.bits != 32)
                or (self.bits == 8 and self.sample_format == 2))  # signed 8-bit: Pillow wraps it as unsigned

    def pillow_reads_coarsely(self) -> bool:
        """Pillow reads it right but for precision: 16-bit colour, samples interleaved (not planar), unsigned."""
        return self.samples > 1 and self.bits == 16 and self.sample_format == 1 and self.axes == "YXS"

    def describe(self) -> str:
        kind = {1: "", 2: "signed ", 3: "float "}.get(self.sample_format, "")
        what = {0: "grey", 1: "grey", 2: "colour (RGB)"}.get(self.photometric, f"photometric {self.photometric}")
        return f"{self.bits}-bit {kind}{what} TIFF with {self.samples} sample(s) per pixel"


def _tiff_header(path: Path) -> _Tiff | None:
    """The first page's layout by tifffile; None without tifffile or when the header cannot be parsed."""
    try:
        import tifffile
    except ImportError:
        return None
    with _tifffile_lines():  # its complaints are named when it reads the pixels
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
    return layout if sane else None  # a complaint about another tag leaves the layout good; reading names it


def _read_tifffile(path: Path, t: _Tiff, failed: Exception | None = None) -> Read:
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
                raise _NoCodec(f"{path}: a {t.describe()} compressed with {t.compression}, which is decoded here at full "
                               "precision only with the imagecodecs package: save it uncompressed or deflate-compressed, "
                               "or pip install imagecodecs") from e
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
    if kind is not None and kind not in PIL_KINDS:
        return (f"{path}: by its content a {kind} file, not an image format read here (PNG, JPEG, TIFF, BMP, "
                "DICOM); convert it or remove it")
    why = "Pillow does not recognise it" if isinstance(e, UnidentifiedImageError) else f"{type(e).__name__}: {e}"
    what = f"a corrupt or truncated {kind}" if kind else "corrupt, truncated or not a PNG/JPEG/TIFF/BMP"
    return f"{path}: cannot read the image ({why}); the file is {what}: replace it or remove it"


def read_pil(path: Path, kind: str | None = None) -> Read:
    """A PNG, JPEG, TIFF or BMP (``kind``: what its content says) by Pillow, or by tifffile for TIFFs Pillow
    misreads; every failure is a ValueError naming the file."""
    from PIL import UnidentifiedImageError

    tiff = _tiff_header(path) if kind == "TIFF" else None
    if tiff is not None and tiff.pillow_misreads():
        try:
            return _read_tifffile(path, tiff)
        except _NoCodec as e:
            if not tiff.pillow_reads_coarsely():
                raise ValueError(str(e)) from e
            logger.warning("%s; read at 8 bits per channel instead", e)
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
