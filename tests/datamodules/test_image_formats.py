"""How the 2D reader (`datamodules.io.pictures`, through `datamodules.sources.image_folder.load_image`) decodes PNG,
JPEG, TIFF and BMP files: the picture a viewer shows, at full precision, or a one-line refusal naming the file and the
fix; never wrong pixels without a word."""

import shutil
import struct
import warnings
import zlib

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

from datamodules.sources.image_folder import load_image
from tests.helpers import write_dicom

H, W = 12, 20


def _minmax(a: np.ndarray) -> np.ndarray:
    a = a.astype(np.float64)
    return (a - a.min()) / (a.max() - a.min())


def _read(path, channels=1) -> np.ndarray:
    """The image at its own size, (H, W) or (H, W, 3)."""
    x = load_image(path, image_size=[H, W], channels=channels).numpy()
    return x[0] if channels == 1 else x.transpose(1, 2, 0)


def _ramp12() -> np.ndarray:
    """12-bit data in 16 bits, as CT windows and microscopes export it: Pillow's 8 bits keep 16 levels of it."""
    yy, xx = np.mgrid[0:H, 0:W]
    return (xx * 200 + yy * 3).astype(np.uint16)


def _png16(path, arr: np.ndarray, colour_type: int) -> None:
    """A 16-bit PNG of any colour type (Pillow cannot write 16-bit colour): (H, W, samples) uint16."""
    h, w = arr.shape[:2]
    raw = b"".join(b"\x00" + arr[i].astype(">u2").tobytes() for i in range(h))

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, colour_type, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


# ---------------------------------------------------------------------------------------- full precision
def _tiffs():
    g = _ramp12()
    rgb = np.stack([g, g[:, ::-1], np.full_like(g, 2000)], -1)
    yy, xx = np.mgrid[0:H, 0:W]
    f = (xx / W * 3 - 1 + yy / 100.0)
    return {
        # tifffile.imwrite(p, (3, H, W) uint16, photometric="rgb", planarconfig="separate"): Pillow read garbage
        "planar_rgb16": (np.moveaxis(rgb, -1, 0), {"photometric": "rgb", "planarconfig": "separate"}, rgb),
        "rgb16": (rgb, {"photometric": "rgb"}, rgb),  # Pillow cut it to 8 bits: 16 levels of 12-bit data
        "grey_alpha16": (np.stack([g, np.full_like(g, 65535)], -1),
                         {"photometric": "minisblack", "extrasamples": ["unassalpha"]}, g),  # Pillow: "corrupt"
        "float64": (f, {}, f),  # Pillow: "corrupt"
        "rgb_float32": (np.stack([f, -f, f * 0.5], -1).astype(np.float32), {"photometric": "rgb"},
                        np.stack([f, -f, f * 0.5], -1).astype(np.float32)),
        "uint32": (g.astype(np.uint32) * 1_000_000, {}, g.astype(np.float64) * 1_000_000),  # Pillow wrapped past 2^31
    }


@pytest.mark.parametrize("name", list(_tiffs()))
def test_tiffs_that_pillow_garbles_cuts_or_cannot_open_are_read_exactly(tmp_path, name):
    data, kw, truth = _tiffs()[name]
    path = tmp_path / f"{name}.tif"
    tifffile.imwrite(path, data, **kw)
    colour = truth.ndim == 3
    assert np.allclose(_read(path, channels=3 if colour else 1), _minmax(truth), atol=1e-6)


def test_tiff_orientation_is_applied_also_when_tifffile_reads_it(tmp_path):
    g = _ramp12()
    rgb = np.stack([g, g // 2, np.full_like(g, 7)], -1)
    tifffile.imwrite(tmp_path / "rot.tif", rgb, photometric="rgb", extratags=[(274, "H", 1, 6, True)])
    x = load_image(tmp_path / "rot.tif", image_size=[W, H], channels=3).numpy().transpose(1, 2, 0)
    assert np.allclose(x, _minmax(np.rot90(rgb, -1)), atol=1e-6)  # 6: rotate 90 degrees clockwise to display


def test_16_bit_colour_and_grey_alpha_pngs_are_refused_with_the_fix_and_16_bit_grey_is_exact(tmp_path):
    g = _ramp12()
    _png16(tmp_path / "rgb16.png", np.stack([g, g[:, ::-1], g // 2], -1), 2)
    _png16(tmp_path / "la16.png", np.stack([g, np.full_like(g, 65535)], -1), 4)
    with pytest.raises(ValueError, match=r"rgb16\.png: a 16-bit colour \(RGB\) PNG, which is read here at 8 bits "
                                         r"only.*save it as a 16-bit grey PNG, an 8-bit colour PNG or a 16-bit TIFF"):
        load_image(tmp_path / "rgb16.png")
    with pytest.raises(ValueError, match=r"la16\.png: a 16-bit grey\+alpha PNG"):
        load_image(tmp_path / "la16.png")
    _png16(tmp_path / "grey16.png", g[..., None], 0)
    assert np.allclose(_read(tmp_path / "grey16.png"), _minmax(g), atol=1e-6)


# ------------------------------------------------------------------------------------------ transparency
def _disk(hidden: int, fg: int = 128) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:H, 0:W]
    inside = (yy - H / 2) ** 2 + (xx - W / 2) ** 2 < 16
    return np.where(inside, fg, hidden).astype(np.uint8), np.where(inside, 255, 0).astype(np.uint8)


def test_transparent_pixels_are_composited_over_black_whatever_colour_hides_under_them(tmp_path):
    """A grey disk on a transparent background looked the same in any viewer but read as disk-on-black or
    disk-on-white (inverted contrast) depending on the hidden colour."""
    reads = []
    for hidden in (0, 255):
        grey, alpha = _disk(hidden)
        Image.fromarray(np.stack([grey, alpha], -1), "LA").save(tmp_path / f"la{hidden}.png")
        Image.fromarray(np.stack([grey, grey, grey, alpha], -1), "RGBA").save(tmp_path / f"rgba{hidden}.png")
        pal = Image.fromarray(np.where(alpha > 0, 1, 0).astype(np.uint8), "P")  # index 0: the transparent one
        pal.putpalette([hidden] * 3 + [128] * 3)
        pal.save(tmp_path / f"pal{hidden}.png", transparency=0)
        reads += [_read(tmp_path / f"{kind}{hidden}.png") for kind in ("la", "rgba", "pal")]
    _, alpha = _disk(0)
    for x in reads:
        assert np.array_equal(x, (alpha > 0).astype(np.float32))  # the disk white, the rest black


def test_a_colour_key_is_transparency_too_and_a_picture_only_in_alpha_is_what_compositing_gives(tmp_path):
    grey, alpha = _disk(255, fg=100)
    Image.fromarray(grey).save(tmp_path / "key.png", transparency=255)  # tRNS: grey 255 is transparent
    assert np.array_equal(_read(tmp_path / "key.png"), (alpha > 0).astype(np.float32))
    _, alpha = _disk(0)
    black = np.zeros_like(alpha)
    Image.fromarray(np.stack([black, alpha], -1), "LA").save(tmp_path / "black_shape.png")
    with pytest.raises(ValueError, match=r"black_shape\.png: constant image once its transparency is composited over "
                                         r"black.*only in its alpha channel"):
        load_image(tmp_path / "black_shape.png")
    Image.fromarray(np.stack([black + 255, alpha], -1), "LA").save(tmp_path / "white_shape.png")
    assert np.array_equal(_read(tmp_path / "white_shape.png"), (alpha > 0).astype(np.float32))


# ------------------------------------------------------------------------ damaged files, orientation, MPO
def _second_page_without_width(data: bytes) -> bytes:
    """A little-endian one-page TIFF whose next-IFD offset points to an IFD without ImageWidth (a damaged IFD
    chain): Pillow opens the first page, then raises TypeError('Missing dimensions') while counting pages."""
    ifd = struct.unpack("<I", data[4:8])[0]
    after = ifd + 2 + 12 * struct.unpack("<H", data[ifd : ifd + 2])[0]  # the next-IFD offset
    at = len(data) + len(data) % 2
    page2 = struct.pack("<HHHII", 1, 257, 3, 1, H) + struct.pack("<I", 0)  # ImageLength only
    data = data + b"\x00" * (at - len(data)) + page2
    return data[:after] + struct.pack("<I", at) + data[after + 4 :]


def test_damaged_files_are_unreadable_with_their_name_whatever_the_decoder_raises(tmp_path, monkeypatch):
    """A TIFF without its width made Pillow raise TypeError, which escaped: classify ended as an internal error."""
    good = tmp_path / "good.tif"
    Image.fromarray(_ramp12()).save(good)
    (tmp_path / "bad.tif").write_bytes(_second_page_without_width(good.read_bytes()))
    with pytest.raises(ValueError, match=r"bad\.tif: cannot read the image \(TypeError: Missing dimensions\); the "
                                         r"file is a corrupt or truncated TIFF: replace it or remove it"):
        load_image(tmp_path / "bad.tif")

    import PIL.ImageFile

    def broken(self):
        raise struct.error("unpack requires a buffer of 4 bytes")

    Image.fromarray(_ramp12().astype(np.uint8)).save(tmp_path / "any.png")
    monkeypatch.setattr(PIL.ImageFile.ImageFile, "load", broken)
    with pytest.raises(ValueError, match=r"any\.png: cannot read the image \(error: unpack requires"):
        load_image(tmp_path / "any.png")


def test_a_png_whose_image_data_fail_their_checksum_is_refused(tmp_path):
    """Pillow stops inflating once it has every row: a damaged byte can give wrong pixels without an error."""
    yy, xx = np.mgrid[0:64, 0:96]
    good = tmp_path / "good.png"
    Image.fromarray((xx / 95 * 255).astype(np.uint8)).save(good)
    data = good.read_bytes()
    start = data.index(b"IDAT") + 4
    for at in range(start + 2, start + struct.unpack(">I", data[start - 8 : start - 4])[0]):
        bad = tmp_path / f"bad{at}.png"
        bad.write_bytes(data[:at] + bytes([data[at] ^ 0x10]) + data[at + 1 :])
        try:
            with Image.open(bad) as im:
                silent = not np.array_equal(np.asarray(im), np.asarray(Image.open(good)))
        except Exception:
            silent = False
        if silent:
            break
    else:
        pytest.skip("no byte of this PNG decodes silently into wrong pixels with this zlib")
    with pytest.raises(ValueError, match=rf"bad{at}\.png: cannot read the image \(SyntaxError: .*checksum.*corrupt"):
        load_image(bad)


def _asymmetric() -> np.ndarray:
    a = np.zeros((H, W), np.uint8)
    a[:, :5] = 255
    a[:3] = 128
    return a


@pytest.mark.parametrize("suffix", [".jpg", ".png", ".tif"])
def test_the_exif_orientation_is_applied(tmp_path, suffix):
    """A phone photo with orientation 6 reads as the viewer shows it (rotated 90 degrees clockwise)."""
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(_asymmetric()).save(tmp_path / f"phone{suffix}", exif=exif if suffix == ".tif" else exif.tobytes(),
                                        **({"quality": 100} if suffix == ".jpg" else {}))
    x = load_image(tmp_path / f"phone{suffix}", image_size=[W, H]).numpy()[0]
    expected = _minmax(np.rot90(_asymmetric(), -1))
    assert np.abs(x - expected).max() < (0.1 if suffix == ".jpg" else 1e-6)


def test_a_phone_multi_picture_jpeg_gives_its_main_picture(tmp_path):
    main = Image.fromarray(_asymmetric())
    main.save(tmp_path / "phone.jpg", format="MPO", save_all=True, append_images=[main.resize((W // 2, H // 2))],
              quality=100)
    assert Image.open(tmp_path / "phone.jpg").n_frames == 2
    with Image.open(tmp_path / "phone.jpg") as im:
        first = np.asarray(im.convert("L"))
    assert np.allclose(_read(tmp_path / "phone.jpg"), _minmax(first), atol=1e-6)


# ----------------------------------------------------------------------------------- formats and messages
def test_a_file_is_read_by_its_content_not_its_name(tmp_path):
    dcm = write_dicom(tmp_path / "ct", (_ramp12().astype(np.float64) - 1500) / 10, "a.dcm")
    shutil.copy(dcm, tmp_path / "exported.png")
    assert np.array_equal(_read(tmp_path / "exported.png"), _read(dcm))
    png = tmp_path / "real.png"
    Image.fromarray(_asymmetric()).save(png)
    shutil.copy(png, tmp_path / "named.dcm")
    assert np.array_equal(_read(tmp_path / "named.dcm"), _read(png))
    (tmp_path / "report.png").write_bytes(b"%PDF-1.4\n" + b"\x00" * 400)
    with pytest.raises(ValueError, match=r"report\.png: by its content a PDF file, not an image format read here"):
        load_image(tmp_path / "report.png")
    (tmp_path / "clip.dcm").write_bytes(b"GIF89a" + b"\x00" * 400)
    with pytest.raises(ValueError, match=r"clip\.dcm: not DICOM but, by its content, a GIF file"):
        load_image(tmp_path / "clip.dcm")


def test_an_image_over_pillows_pixel_limit_is_refused_with_its_size_and_no_bare_warning(tmp_path, monkeypatch):
    Image.fromarray(np.tile(_asymmetric(), (4, 4))).save(tmp_path / "huge.png")  # 48 x 80: 3840 pixels
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 3000)  # Pillow warned, without the file, then read it
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(ValueError, match=r"huge\.png: the image is 80 x 48 pixels \(0.00384 megapixels\), more "
                                             r"than the 0.003 read here .*downsample it"):
            load_image(tmp_path / "huge.png")
    assert not caught


# ------------------------------------------------------------------------------ after review
def test_a_tifffile_complaint_about_another_tag_does_not_send_16_bit_colour_back_to_pillow(tmp_path, caplog):
    """A private tag of an invalid type makes tifffile complain, but its layout and pixels are good: the 16-bit
    colour TIFF is still read exactly (by tifffile, which Pillow would have cut or garbled), and the complaint is
    named in a warning."""
    import logging

    rgb = np.stack([_ramp12(), _ramp12()[::-1], np.full((H, W), 900, np.uint16)], -1)
    for planar in (False, True):
        path = tmp_path / f"tagged_{planar}.tif"
        data = np.moveaxis(rgb, -1, 0) if planar else rgb
        tifffile.imwrite(path, data, photometric="rgb", planarconfig="separate" if planar else "contig",
                         extratags=[(65000, 3, 1, 7, True)])
        raw = bytearray(path.read_bytes())
        at = raw.find(struct.pack("<HH", 65000, 3))
        struct.pack_into("<H", raw, at + 2, 99)  # an invalid data type
        path.write_bytes(bytes(raw))
        with caplog.at_level(logging.WARNING):
            x = _read(path, channels=3)
        assert np.abs(x - _minmax(rgb)).max() < 1e-6, planar
        assert f"{path}: tifffile:" in caplog.text


def test_16_bit_colour_compressed_without_its_decoder_is_read_at_8_bits_with_a_warning(tmp_path, monkeypatch, caplog):
    """LZW and JPEG need imagecodecs, which is not installed: an interleaved 16-bit colour TIFF is then read by
    Pillow at 8 bits (as before tifffile), saying so; a planar one, which Pillow garbles, is refused with the fix."""
    import logging

    rgb = np.stack([_ramp12(), _ramp12()[::-1], np.full((H, W), 900, np.uint16)], -1) * 16  # the full 16 bits

    def no_codec(self, *args, **kwargs):
        raise ValueError("<COMPRESSION.LZW: 5> requires the 'imagecodecs' package")

    monkeypatch.setattr(tifffile.TiffPage, "asarray", no_codec)
    interleaved, planar = tmp_path / "lzw.tif", tmp_path / "lzw_planar.tif"
    tifffile.imwrite(interleaved, rgb, photometric="rgb")
    tifffile.imwrite(planar, np.moveaxis(rgb, -1, 0), photometric="rgb", planarconfig="separate")
    with caplog.at_level(logging.WARNING):
        x = _read(interleaved, channels=3)
    assert np.abs(x - _minmax(rgb)).max() < 0.02  # its top 8 bits
    assert "imagecodecs" in caplog.text and "read at 8 bits per channel instead" in caplog.text
    with pytest.raises(ValueError, match=r"lzw_planar\.tif: a 16-bit .*pip install imagecodecs"):
        load_image(planar)


@pytest.mark.parametrize("suffix", [".png", ".bmp"])
def test_an_image_transparent_everywhere_is_read_as_opaque(tmp_path, suffix, caplog):
    """An alpha of 0 everywhere (32-bit BMPs of some Windows tools; viewers show them opaque) is no transparency:
    compositing would leave a black image."""
    import logging

    rgba = np.zeros((H, W, 4), np.uint8)
    rgba[..., :3] = _asymmetric()[..., None]
    Image.fromarray(rgba, "RGBA").save(tmp_path / f"clear{suffix}")
    if Image.open(tmp_path / f"clear{suffix}").mode != "RGBA":
        pytest.skip(f"Pillow writes no alpha to {suffix}")
    with caplog.at_level(logging.WARNING):
        x = _read(tmp_path / f"clear{suffix}")
    assert np.abs(x - _minmax(_asymmetric())).max() < 1e-6
    assert "fully transparent" in caplog.text


def test_a_signed_8_bit_tiff_is_not_wrapped(tmp_path):
    signed = (np.arange(H * W).reshape(H, W) % 200 - 100).astype(np.int8)
    tifffile.imwrite(tmp_path / "signed.tif", signed)
    assert np.abs(_read(tmp_path / "signed.tif") - _minmax(signed)).max() < 1e-6


def test_an_exif_orientation_stored_as_long_is_applied(tmp_path):
    """The standard says SHORT; some writers store a LONG, which Pillow applies too."""
    Image.fromarray(_asymmetric()).save(tmp_path / "plain.png")
    ifd = struct.pack("<2sHI", b"II", 42, 8) + struct.pack("<H", 1) + struct.pack("<HHII", 0x0112, 4, 1, 6) + b"\0" * 4
    raw = (tmp_path / "plain.png").read_bytes()
    chunk = struct.pack(">I", len(ifd)) + b"eXIf" + ifd + struct.pack(">I", zlib.crc32(b"eXIf" + ifd))
    end = raw.rfind(b"IEND") - 4
    (tmp_path / "long.png").write_bytes(raw[:end] + chunk + raw[end:])
    x = load_image(tmp_path / "long.png", image_size=[W, H]).numpy()[0]
    assert np.abs(x - _minmax(np.rot90(_asymmetric(), -1))).max() < 1e-6


def test_the_native_range_scales_a_picture_by_its_type_as_medmnist_does(tmp_path, caplog):
    """A MedMNIST checkpoint saw uint8 / 255; `classify` read its PNG queries stretched over their own range (a
    review: a blood cell of values 154-213 had mean 0.72 in training and 0.50 in classify)."""
    from datamodules.sources.image_folder import NATIVE_RANGE

    rng = np.random.default_rng(0)
    grey = rng.integers(154, 214, (28, 28)).astype(np.uint8)
    Image.fromarray(grey).save(tmp_path / "cell.png")
    own = load_image(tmp_path / "cell.png", image_size=(28, 28))
    native = load_image(tmp_path / "cell.png", image_size=(28, 28), intensity=NATIVE_RANGE)
    np.testing.assert_allclose(native[0].numpy(), grey / 255.0, atol=1e-6)
    assert float(own.min()) == 0.0 and float(own.max()) == 1.0  # ImageFolder's rule, unchanged
    colour = rng.integers(30, 200, (28, 28, 3)).astype(np.uint8)
    Image.fromarray(colour).save(tmp_path / "rgb.png")
    got = load_image(tmp_path / "rgb.png", image_size=(28, 28), channels=3, intensity=NATIVE_RANGE)
    np.testing.assert_allclose(got.permute(1, 2, 0).numpy(), colour / 255.0, atol=1e-6)
    # 16 bits do not say how many are used (a 12-bit X-ray in a 16-bit PNG, 0-4095, was near black divided by
    # 65535; a review, 2026-12-06): each such picture keeps its own range, as a DICOM does, with the warning below
    for name, values in (("deep.png", grey.astype(np.uint16) * 200), ("twelve.png", grey.astype(np.uint16) * 16)):
        Image.fromarray(values).save(tmp_path / name)
        np.testing.assert_allclose(load_image(tmp_path / name, image_size=(28, 28), intensity=NATIVE_RANGE).numpy(),
                                   load_image(tmp_path / name, image_size=(28, 28)).numpy())
    deep = grey.astype(np.uint16) * 200
    Image.frombytes("I;16B", (28, 28), deep.astype(">u2").tobytes()).save(tmp_path / "big.tif")  # Motorola order
    np.testing.assert_allclose(load_image(tmp_path / "big.tif", image_size=(28, 28), intensity=NATIVE_RANGE)[0].numpy(),
                               (deep - deep.min()) / float(deep.max() - deep.min()), atol=1e-6)
    from datamodules.sources import image_folder

    image_folder._NATIVE_FALLBACK_SAID.clear()  # said once per process: this test's first one is the warning
    Image.fromarray(grey.astype(np.int32) - 100).save(tmp_path / "signed.tif")  # Pillow mode 'I': its own range
    with caplog.at_level("WARNING"):
        signed = load_image(tmp_path / "signed.tif", image_size=(28, 28), intensity=NATIVE_RANGE)
    assert float(signed.min()) == 0.0 and float(signed.max()) == 1.0 and "signed.tif" in caplog.text
    assert "is none (DICOM, 16-bit, floating point, signed or 1-bit)" in caplog.text
    ct = write_dicom(tmp_path, grey.astype(np.float64), "ct.dcm")
    caplog.clear()
    with caplog.at_level("WARNING"):
        dicom = load_image(ct, image_size=(28, 28), intensity=NATIVE_RANGE)
    assert "ct.dcm" not in caplog.text and float(dicom.max()) <= 1.0  # said once, for signed.tif
    with pytest.raises(ValueError, match="intensity must be None"):
        load_image(tmp_path / "cell.png", intensity="percentile")


@pytest.mark.parametrize("shape", [(2200, 100), (500, 1)])
def test_a_tall_narrow_picture_resized_to_one_pixel_wide_is_its_transpose(tmp_path, shape):
    """torch's antialiased bilinear resize (CPU) returns its first value down a one-pixel-wide output: a tall
    gradient came out as a near-black column (a review, 2026-12-06). The picture and its transpose agree."""
    from datamodules.sources.image_folder import resize_bilinear

    h, w = shape
    ramp = np.repeat(np.linspace(0, 255, h).astype(np.uint8)[:, None], w, 1)
    Image.fromarray(ramp).save(tmp_path / "tall.png")
    Image.fromarray(np.ascontiguousarray(ramp.T)).save(tmp_path / "wide.png")
    tall = load_image(tmp_path / "tall.png", image_size=(32, 32))[0]
    wide = load_image(tmp_path / "wide.png", image_size=(32, 32))[0]
    torch.testing.assert_close(tall, wide.T)
    assert float(tall.max()) > 0.9
    x = torch.linspace(0, 1, 40)[:, None].expand(2, 40, 7)[None].contiguous()  # a ramp down the rows
    torch.testing.assert_close(resize_bilinear(x, (9, 1), antialias=True),
                               torch.nn.functional.interpolate(x, size=(9, 1), mode="area"), atol=0.02, rtol=0)


def test_a_jfif_file_is_a_jpeg_in_a_class_folder(tmp_path):
    """Browsers save JPEGs as ``.jfif``; they were skipped as non-images by `fit` and `classify` (a review,
    2026-12-06). They are read, as ``.jpg`` is."""
    from datamodules.sources.image_folder import ImageFolder

    rng = np.random.default_rng(0)
    for cls in ("a", "b"):
        (tmp_path / cls).mkdir()
        for i in range(2):
            pixels = rng.integers(0, 255, (40, 40)).astype(np.uint8)
            Image.fromarray(pixels).save(tmp_path / cls / f"{i}.jfif", format="JPEG")
    assert len(ImageFolder(str(tmp_path), image_size=[16, 16]).build().labels) == 4


def test_min_is_white_tiffs_read_alike_at_every_bit_depth(tmp_path):
    """A min-is-white TIFF is read as a viewer shows it: the 8-bit one was, but Pillow's 16-bit and float modes
    ignore the photometric tag, and those came out inverted (a review, 2026-12-07)."""
    a = (np.arange(H * W).reshape(H, W) * 255 // (H * W - 1)).astype(np.uint8)
    tifffile.imwrite(tmp_path / "w8.tif", a, photometric="miniswhite")
    tifffile.imwrite(tmp_path / "w16.tif", a.astype(np.uint16) * 257, photometric="miniswhite")
    tifffile.imwrite(tmp_path / "wf.tif", a.astype(np.float32), photometric="miniswhite")
    eight = _read(tmp_path / "w8.tif")
    np.testing.assert_allclose(eight, _minmax(255.0 - a.astype(np.float64)), atol=1e-6)
    for name in ("w16.tif", "wf.tif"):
        np.testing.assert_allclose(_read(tmp_path / name), eight, atol=1e-6, err_msg=name)


@pytest.mark.parametrize("orientation", range(2, 9))
def test_every_exif_orientation_reads_as_pillows_exif_transpose_shows_it(tmp_path, orientation):
    """Orientations 2..8 (mirrors and rotations), each against `PIL.ImageOps.exif_transpose` (only 6 was tested: a
    mirror swapped for a flip passed)."""
    from PIL import ImageOps

    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / "o.png"
    Image.fromarray(_asymmetric()).save(path, exif=exif.tobytes())
    shown = np.asarray(ImageOps.exif_transpose(Image.open(path)))
    x = load_image(path, image_size=list(shown.shape)).numpy()[0]
    np.testing.assert_allclose(x, _minmax(shown), atol=1e-6)


def test_a_grey_image_saved_as_rgb_is_grey_beside_grey_images(tmp_path):
    """A grey picture saved with three equal channels (as many exports do) is one channel: a folder with it and a
    grey one builds at one channel (it was refused as mixing grey and colour images when the check was dropped)."""
    from datamodules.sources.image_folder import ImageFolder

    for c in range(2):
        grey = np.tile((np.arange(W) * (5 + c)).astype(np.uint8), (H, 1))
        (tmp_path / f"class{c}").mkdir()
        Image.fromarray(grey).save(tmp_path / f"class{c}" / "grey.png")
        Image.fromarray(np.stack([grey] * 3, axis=-1)).save(tmp_path / f"class{c}" / "rgb_grey.png")
    table = ImageFolder(str(tmp_path), image_size=[H, W]).build()
    assert table.images.shape == (4, 1, H, W)
