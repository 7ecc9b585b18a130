"""`ImageFolder`: PNG, JPEG and single-frame DICOM class folders -> an ItemTable; bad inputs name the file."""

import json
import warnings

import numpy as np
import pydicom
import pytest
import torch

from datamodules.indexing.scan import pseudonym
from datamodules.sources.image_folder import ImageFolder, load_image
from tests.datamodules.dicom_fixtures import FAKE_PHI, edit, truncate
from tests.helpers import pattern, write_dicom, write_folder, write_png


def test_pngs_and_dicoms_load_with_pseudonymous_ids(tmp_path):
    root = write_folder(tmp_path / "data")
    (root / "class0" / "notes.txt").write_text("stray")
    with pytest.warns(UserWarning, match=r"skipped 1 file.*notes\.txt"):
        table = ImageFolder(str(root), image_size=[16, 16]).build()
    assert table.classes == ["class0", "class1", "class2", "ct_class"]
    assert table.images.shape == (16, 1, 16, 16) and table.images.dtype == torch.float32
    assert float(table.images.min()) >= 0.0 and float(table.images.max()) <= 1.0
    assert table.class_counts() == {"class0": 4, "class1": 4, "class2": 4, "ct_class": 4}
    assert len(set(table.item_ids)) == 16
    png = [i for i in range(16) if table.labels[i] < 3]
    assert len({table.patients[i] for i in png}) == len(png)  # default: every image its own patient
    assert {table.sites[i] for i in png} == {"data"}  # the source name
    dcm = [i for i in range(16) if table.labels[i] == 3]
    assert len({table.patients[i] for i in dcm}) == 2  # pseudonymised PatientID, repeated in pairs
    assert {table.sites[i] for i in dcm} == {table.sites[dcm[0]]} and "ACME | Scanner 3000 | inst-" in table.sites[dcm[0]]
    blob = json.dumps([table.item_ids, table.patients, table.sites, table.source])
    for phi in (*FAKE_PHI.values(), "img0", "IM_0", "PHITEST", "Saint"):
        assert phi not in blob


def test_ct_dicom_images_beside_pictures_are_warned_about(tmp_path, caplog):
    """A CT DICOM image is read in HU through ct_window, a PNG by its own range: the same picture saved both ways
    got other intensities (and another answer in classify) without a word."""
    import logging

    from datamodules.sources.image_folder import load_image_and_shape

    root = write_folder(tmp_path / "data")  # PNG classes and a class of CT DICOM images
    with caplog.at_level(logging.WARNING), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ImageFolder(str(root), image_size=[16, 16]).build()
    assert "CT DICOM images are read in Hounsfield units through ct_window" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        ImageFolder(str(write_folder(tmp_path / "png", dicom_class=False)), image_size=[16, 16]).build()
    assert "Hounsfield" not in caplog.text
    dcm = next((root / "ct_class").rglob("*.dcm"))
    png = next((root / "class0").glob("*.png"))
    assert load_image_and_shape(dcm)[2] is True and load_image_and_shape(png)[2] is False


def test_patient_regex_groups_images_and_must_match_every_file(tmp_path):
    root = write_folder(tmp_path / "data", dicom_class=False)
    table = ImageFolder(str(root), patient_regex=r"^(?P<patient>P\d+)_").build()
    # P0_img0/P0_img1 and P1_img2/P1_img3 of each class: "P0" names the same patient in every class
    assert len(set(table.patients)) == 2 and "P0" not in table.patients[0]
    write_png(root / "class1" / "odd_name.png", pattern(1, 9))
    with pytest.raises(ValueError, match=r"odd_name\.png: patient_regex .* does not match"):
        ImageFolder(str(root), patient_regex=r"^(?P<patient>P\d+)_").build()
    with pytest.raises(ValueError, match="named group 'patient'"):
        ImageFolder(str(root), patient_regex=r"^P\d+_")
    # the named group is the patient, not the whole match, and the regex is searched anywhere in the name
    grouped = ImageFolder(str(root), patient_regex=r"(?P<patient>P\d+|odd)_(img\d+|name)").build()
    assert len(set(grouped.patients)) == 3  # P0, P1 and odd: the image numbers are not part of the patient
    searched = ImageFolder(str(root), patient_regex=r"(?P<patient>img\d+|name)").build()  # not at the start
    assert len(set(searched.patients)) == 5  # img0..img3 and name


def test_shrinking_an_image_averages_its_pixels(tmp_path):
    """Antialiased resizing: one column in four shrunk four times reads as its mean grey, not as whichever pixels a
    plain bilinear sample hits (here none of the bright ones)."""
    stripes = np.zeros((32, 32), np.uint8)
    stripes[:, ::4] = 255  # one column in four: a quarter grey
    x = load_image(write_png(tmp_path / "stripes.png", stripes), image_size=[8, 8])
    inner = x[..., 1:-1]  # the edge columns' kernels are cut by the border
    assert torch.allclose(inner, torch.full_like(inner, 0.25), atol=0.02)


def test_load_image_matches_the_table_and_keeps_aspect(tmp_path):
    root = write_folder(tmp_path / "data", n_classes=2, dicom_class=False)
    table = ImageFolder(str(root), image_size=[16, 16]).build()
    f = root / "class1" / "P1_img3.png"
    x = load_image(f, image_size=[16, 16])
    assert torch.equal(table.images[table.item_ids.index("i-" + pseudonym("imaging-meta", "class1/P1_img3.png"))], x)
    # 20 x 24 into 16 x 16: scaled to 13 x 16 (aspect kept) and padded with zero rows above and below
    assert x.shape == (1, 16, 16)
    assert float(x[0, 0].abs().sum()) == 0.0 and float(x[0, -1].abs().sum()) == 0.0 and float(x[0, 8].abs().sum()) > 0
    assert float(x[:, :, 0].abs().sum()) > 0  # no padding columns
    # per-image min-max scaling: at native size the full [0, 1] range is used
    big = load_image(f, image_size=[20, 24])
    raw = pattern(1, 3).astype(np.float64)
    assert np.allclose(big[0].numpy(), (raw - raw.min()) / (raw.max() - raw.min()), atol=1e-6)


def test_channels_rgb_to_grey_and_grey_to_rgb(tmp_path):
    rgb = np.stack([pattern(0, 0), pattern(1, 0), pattern(2, 0)], axis=-1)
    f = write_png(tmp_path / "rgb.png", rgb)
    grey = load_image(f, image_size=[20, 24], channels=1)
    lum = rgb.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    expected = (rgb.astype(np.float64) - rgb.min()) / (rgb.max() - rgb.min()) @ np.array([0.299, 0.587, 0.114])
    assert grey.shape == (1, 20, 24) and np.allclose(grey[0].numpy(), expected, atol=1e-5)
    assert np.corrcoef(grey[0].numpy().ravel(), lum.ravel())[0, 1] > 0.999
    g = write_png(tmp_path / "grey.jpg", pattern(0, 1), quality=95)
    three = load_image(g, image_size=[8, 8], channels=3)
    assert three.shape == (3, 8, 8) and torch.equal(three[0], three[1]) and torch.equal(three[1], three[2])


def test_ct_window_and_monochrome1(tmp_path):
    hu = np.array([[-1000.0, -250.0, 0.0, 250.0], [1000.0, 125.0, -125.0, 0.0]])
    f = write_dicom(tmp_path / "ct", hu, "a.dcm")
    ds = pydicom.dcmread(f)
    assert np.allclose(ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept), hu)
    x = load_image(f, image_size=[2, 4], ct_window=[-250, 250])[0].numpy()
    assert np.allclose(x, np.clip((hu + 250) / 500, 0, 1), atol=1e-6)
    x2 = load_image(f, image_size=[2, 4], ct_window=[-1000, 1000])[0].numpy()
    assert np.allclose(x2, (hu + 1000) / 2000, atol=1e-6)

    def mono1(d):
        d.PhotometricInterpretation = "MONOCHROME1"

    edit(f, mono1)
    # the volume reader's rule (datamodules.io.dicom_pixels.inverts_monochrome1): a CT's rescaled values are HU
    # whatever its photometric interpretation, so a MONOCHROME1 CT reads as before
    x3 = load_image(f, image_size=[2, 4], ct_window=[-250, 250])[0].numpy()
    assert np.allclose(x3, x, atol=1e-6)
    # a projection image (CR) is only what is displayed: MONOCHROME1 is inverted, so that bright is bright
    edit(f, lambda d: setattr(d, "Modality", "CR"))
    x4 = load_image(f, image_size=[2, 4])[0].numpy()
    assert np.allclose(x4, 1 - (hu - hu.min()) / (hu.max() - hu.min()), atol=1e-6)
    # MONOCHROME2 shown through an INVERSE presentation LUT (some "for presentation" exports): displayed with its
    # minimum white as MONOCHROME1 is, so read the same way (it came out with the opposite contrast)
    edit(f, lambda d: (setattr(d, "PhotometricInterpretation", "MONOCHROME2"), setattr(d, "PresentationLUTShape", "INVERSE")))
    assert np.allclose(load_image(f, image_size=[2, 4])[0].numpy(), x4, atol=1e-6)
    edit(f, lambda d: setattr(d, "PresentationLUTShape", "IDENTITY"))
    assert np.allclose(load_image(f, image_size=[2, 4])[0].numpy(), 1 - x4, atol=1e-6)


def test_a_ct_file_without_its_modality_is_read_in_hu_and_site_keys_of_one_scanner_are_one(tmp_path):
    """Reviews: a CT slice whose Modality an anonymiser deleted was scaled by its own range, not through ct_window;
    and two files of one scanner, its make written SIEMENS and Siemens, were two sites (the volume index merges
    keys that differ only in case)."""
    hu = np.array([[-1000.0, -250.0, 0.0, 250.0], [1000.0, 125.0, -125.0, 0.0]])
    f = write_dicom(tmp_path / "ct", hu, "a.dcm")
    windowed = load_image(f, image_size=[2, 4], ct_window=[-250, 250])[0].numpy()
    edit(f, lambda d: delattr(d, "Modality"))
    assert np.allclose(load_image(f, image_size=[2, 4], ct_window=[-250, 250])[0].numpy(), windowed, atol=1e-6)

    root = tmp_path / "folder"
    for c in ("a", "b"):
        for k, make in enumerate(("SIEMENS", "Siemens", "SIEMENS", "GE")):
            write_dicom(root / c, hu + 10 * k + (c == "b"), f"P{k}_{c}.dcm", Manufacturer=make)
    sites = ImageFolder(root=str(root), image_size=[2, 4], salt="x").build().sites
    assert len(set(sites)) == 2 and sites.count(next(s for s in sites if s.startswith("SIEMENS"))) == 6


def test_monochrome1_image_reads_as_its_slice_in_a_volume(tmp_path):
    """classify and fit/segment read one MONOCHROME1 CT slice the same way (the volume reader's rule)."""
    from datamodules.io.dicom import DicomSeriesReader
    from tests.datamodules.dicom_fixtures import phantom, write_series

    paths = write_series(tmp_path / "s", phantom((16, 16, 3)), slope=0.5, intercept=-100.0, signed=True)

    def to_monochrome1(d):
        stored = d.pixel_array.astype(np.int64)
        bits = int(d.BitsStored)
        d.PixelData = ((-(2 ** (bits - 1)) + 2 ** (bits - 1) - 1) - stored).astype(d.pixel_array.dtype).tobytes()
        d.PhotometricInterpretation = "MONOCHROME1"

    for p in paths:
        edit(p, to_monochrome1)
    reader = DicomSeriesReader()
    volume, _ = reader.get_data(reader.read([str(p) for p in paths]))  # (X, Y, Z) in HU
    window = (-1000.0, 1000.0)
    image = load_image(paths[1], image_size=[16, 16], ct_window=window)[0].numpy()  # (rows, columns)
    expected = np.clip((volume[:, :, 1].T - window[0]) / (window[1] - window[0]), 0, 1)
    assert np.allclose(image, expected, atol=1e-6)


def test_bad_inputs_raise_naming_the_file(tmp_path, caplog):
    def fresh(name):
        return write_folder(tmp_path / name, n_classes=2, dicom_class=False)

    root = fresh("corrupt")
    bad = root / "class0" / "P9_broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    with pytest.raises(ValueError, match=r"P9_broken\.png: cannot read the image"):
        ImageFolder(str(root)).build()

    root = fresh("truncated")
    f = root / "class1" / "P0_img0.png"
    truncate(f, 200)
    with pytest.raises(ValueError, match=r"P0_img0\.png"):
        ImageFolder(str(root)).build()

    root = fresh("empty")
    (root / "class2").mkdir()
    with pytest.raises(ValueError, match=r"class2: empty class folder"):
        ImageFolder(str(root)).build()

    root = fresh("single")
    write_png(root / "lonely" / "one.png", pattern(3, 0))
    with pytest.raises(ValueError, match=r"lonely: a class folder with a single image"):
        ImageFolder(str(root)).build()

    root = fresh("all_at_once")  # every problem of the folder in one run (a review: one per run)
    (root / "class2").mkdir()
    write_png(root / "lonely" / "one.png", pattern(3, 0))
    (root / "class0" / "P9_broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    with caplog.at_level("WARNING"), pytest.raises(ValueError, match=r"1 image\(s\) .* cannot be read \(and 2 class "
                                                   r"folder\(s\) with too few images, above\): .*P9_broken\.png"):
        ImageFolder(str(root)).build()
    assert "class2: empty class folder" in caplog.text and "lonely: a class folder with a single image" in caplog.text
    (root / "class0" / "P9_broken.png").unlink()
    with pytest.raises(ValueError, match=r"class2: empty class folder.*\(and 1 more, above\)"):
        ImageFolder(str(root)).build()

    root = fresh("mixed")
    write_png(root / "class1" / "colour.png", np.stack([pattern(0, 5), pattern(1, 5), pattern(2, 5)], -1))
    with pytest.raises(ValueError, match=r"colour\.png: colour \(RGB\) image, but .*P0_img0\.png is grey-level"):
        ImageFolder(str(root)).build()

    root = fresh("multiframe")
    d = write_dicom(root / "class0", pattern(0, 7).astype(float), "mf.dcm")

    def two_frames(ds):
        ds.NumberOfFrames = 2
        ds.PixelData = ds.PixelData * 2

    edit(d, two_frames)
    with pytest.raises(ValueError, match=r"mf\.dcm: multi-frame DICOM \(NumberOfFrames=2\)"):
        ImageFolder(str(root)).build()

    root = fresh("fake_dcm")
    (root / "class0" / "scan.dcm").write_bytes(b"not dicom at all" * 20)
    with pytest.raises(ValueError, match=r"scan\.dcm: not DICOM"):
        ImageFolder(str(root)).build()

    root = fresh("constant")
    write_png(root / "class0" / "blank.png", np.zeros((8, 8), np.uint8))
    with pytest.raises(ValueError, match=r"blank\.png: constant image"):
        ImageFolder(str(root)).build()

    with pytest.raises(ValueError, match="is not a folder"):
        ImageFolder(str(tmp_path / "nowhere")).build()
    with pytest.raises(ValueError, match="channels must be 1"):
        ImageFolder(str(root), channels=2)


def test_extensionless_stray_files_are_skipped_with_a_warning_and_stray_root_files_listed(tmp_path):
    root = write_folder(tmp_path / "data", n_classes=2, dicom_class=False)
    (root / "class0" / "README").write_text("not an image")
    (root / "labels.csv").write_text("a,b")
    (root / "class1" / ".DS_Store").write_bytes(b"\x00" * 10)  # hidden files are ignored silently
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        table = ImageFolder(str(root)).build()
    msgs = [str(w.message) for w in rec]
    assert len(msgs) == 1 and "README" in msgs[0] and "labels.csv" in msgs[0] and ".DS_Store" not in msgs[0]
    assert len(table) == 8 and sorted(table.source["rejected"]) == ["class0/README", "labels.csv"]


def test_files_named_like_dicom_by_some_vendors_but_not_dicom_are_skipped(tmp_path):
    """'.dic' and '.ima' are DICOM names for some exports and other formats' names too (a spelling dictionary):
    a class folder skips such a file with a warning rather than failing (a review, 2026-12-05)."""
    root = write_folder(tmp_path / "data", n_classes=2, dicom_class=False)
    (root / "class0" / "en_US.dic").write_text("2\nhello\nworld\n")
    (root / "class1" / "scan.IMA").write_bytes(b"not dicom either")
    with pytest.warns(UserWarning, match=r"skipped 2 file"):
        table = ImageFolder(str(root)).build()
    assert len(table) == 8 and sorted(table.source["rejected"]) == ["class0/en_US.dic", "class1/scan.IMA"]
    # a real DICOM file with a Siemens '.IMA' name is read (by its content)
    dicom = write_folder(tmp_path / "dicom", n_classes=1, dicom_class=True)
    for f in sorted((dicom / "ct_class").iterdir()):
        f.rename(f.with_suffix(".IMA"))
    table = ImageFolder(str(dicom)).build()
    assert table.class_counts()["ct_class"] == 4 and not table.source["rejected"]
    # PACS exports name files by their SOP instance UID: `classify` read them and `fit` skipped them as no images
    for k, f in enumerate(sorted((dicom / "ct_class").iterdir())):
        f.rename(f.with_name(f"1.2.840.113619.2.55.{k}"))
    (dicom / "ct_class" / "notes.2024").write_text("not dicom")  # digits for a suffix, not DICOM: skipped
    with pytest.warns(UserWarning, match=r"skipped 1 file"):
        table = ImageFolder(str(dicom)).build()
    assert table.class_counts()["ct_class"] == 4 and table.source["rejected"] == ["ct_class/notes.2024"]


def test_cache_is_reused_and_invalidated_by_a_new_file(tmp_path):
    root = write_folder(tmp_path / "data", n_classes=2, dicom_class=False)
    src = ImageFolder(str(root))
    a = src.load(tmp_path / "cache")
    assert len(list((tmp_path / "cache").glob("items-*.pt"))) == 1
    b = ImageFolder(str(root)).load(tmp_path / "cache")
    assert torch.equal(a.images, b.images) and a.item_ids == b.item_ids
    write_png(root / "class0" / "P7_new.png", pattern(0, 11))
    c = ImageFolder(str(root)).load(tmp_path / "cache")
    assert len(c) == len(a) + 1
    assert len(list((tmp_path / "cache").glob("items-*.pt"))) == 2  # the newest other state's table is kept
    write_png(root / "class1" / "P8_new.png", pattern(1, 12))
    d = ImageFolder(str(root)).load(tmp_path / "cache")
    assert len(d) == len(c) + 1 and len(list((tmp_path / "cache").glob("items-*.pt"))) == 2  # the oldest removed
    assert ImageFolder(str(root), salt="other").load(tmp_path / "cache").item_ids != d.item_ids
    assert len(list((tmp_path / "cache").glob("items-*.pt"))) == 3  # other settings: a table of their own


def test_a_cache_folder_inside_the_root_is_no_class(tmp_path):
    """A review: a datamodule's cache folder inside the image folder was a class folder of no image once written,
    and the next build (after an image changed) stopped on it."""
    from datamodules.classification import ClassificationDataModule

    root = write_folder(tmp_path / "data", n_classes=4, dicom_class=False)
    kw = dict(n_way=2, n_query=1, val_classes_count=0, test_classes_count=0, val_episodes=0, test_episodes=0)
    ClassificationDataModule(source=ImageFolder(str(root)), cache_dir=str(root / "cache"), **kw).prepare_data()
    assert any((root / "cache").rglob("items-*.pt"))
    write_png(root / "class0" / "P7_new.png", pattern(0, 11))
    dm = ClassificationDataModule(source=ImageFolder(str(root)), cache_dir=str(root / "cache"), **kw)
    dm.prepare_data()
    dm.setup("fit")
    assert dm.table.classes == ["class0", "class1", "class2", "class3"] and len(dm.table) == 17


def test_item_tables_are_built_again_by_new_reader_code_and_name_a_dangling_link(tmp_path, monkeypatch):
    """A review (2026-12-07): the table's key held no code version, so an upgrade with a reader or site-key fix kept
    the old patches and sites; and with a cache folder a link to nothing ended as a bare FileNotFoundError."""
    import datamodules.indexing.pseudonyms as pseudonyms
    import datamodules.transforms.volume as volume

    root = write_folder(tmp_path / "data", n_classes=2, dicom_class=False)
    src = ImageFolder(str(root))
    keys = (src.settings_key(), src.cache_key())
    for module, name in ((volume, "READER_VERSION"), (volume, "PREPROCESSING_VERSION"), (pseudonyms, "SITE_KEY_VERSION")):
        with monkeypatch.context() as m:
            m.setattr(module, name, getattr(module, name) + 1)
            assert (src.settings_key(), src.cache_key()) != keys, name
    (root / "class0" / "gone.png").symlink_to(tmp_path / "nowhere.png")
    with pytest.raises(ValueError, match=r"gone\.png: a symbolic link to \S+nowhere\.png, which does not exist"):
        ImageFolder(str(root)).load(tmp_path / "cache")


def test_tiff_and_bmp_tiles_load_like_png(tmp_path):
    """Pathology and microscopy tiles are often TIFF (8-bit RGB, 16-bit or float grey); BMP turns up too."""
    from PIL import Image

    from imaging_meta.commands.classify import support_folder

    root = tmp_path / "tiles"
    rgb = np.stack([pattern(0, 0), pattern(1, 0), pattern(2, 0)], axis=-1)
    write_png(root / "tumour" / "a.tif", rgb)
    write_png(root / "tumour" / "b.bmp", rgb[::-1].copy())
    write_png(root / "stroma" / "c.tiff", np.stack([pattern(3, 1)] * 2 + [pattern(4, 1)], axis=-1))
    write_png(root / "stroma" / "d.TIF", np.stack([pattern(3, 2)] * 2 + [pattern(4, 2)], axis=-1))
    table = ImageFolder(str(root), image_size=[20, 24], channels=1).build()
    assert table.classes == ["stroma", "tumour"] and table.class_counts() == {"stroma": 2, "tumour": 2}
    png = load_image(write_png(tmp_path / "same.png", rgb), image_size=[20, 24])
    assert torch.allclose(load_image(root / "tumour" / "a.tif", image_size=[20, 24]), png, atol=1e-6)
    grey16 = pattern(3, 1).astype(np.uint16) * 200
    write_png(tmp_path / "grey16.tiff", grey16)  # Pillow writes mode I;16
    g16 = load_image(tmp_path / "grey16.tiff", image_size=[20, 24])[0].numpy()
    raw = grey16.astype(np.float64)
    assert np.allclose(g16, (raw - raw.min()) / (raw.max() - raw.min()), atol=1e-6)  # all 16 bits kept
    grey_f = pattern(4, 1).astype(np.float32) / 7.0
    Image.fromarray(grey_f, mode="F").save(tmp_path / "float.TIF")
    gf = load_image(tmp_path / "float.TIF", image_size=[20, 24])[0].numpy()
    assert np.allclose(gf, (grey_f - grey_f.min()) / (grey_f.max() - grey_f.min()), atol=1e-6)
    classes, items = support_folder(root)  # `imaging-meta classify` finds the same files
    assert classes == ["stroma", "tumour"] and sorted(p.name for p, _ in items) == ["a.tif", "b.bmp", "c.tiff", "d.TIF"]

    pages = tmp_path / "pages.tif"
    Image.fromarray(pattern(0, 0)).save(pages, save_all=True, append_images=[Image.fromarray(pattern(1, 0))])
    with pytest.raises(ValueError, match=r"pages\.tif: an animated/multi-page image \(2 frames\)"):
        load_image(pages)


def test_palette_colour_headerless_and_windowed_out_dicom_images(tmp_path):
    """The 2D reader decodes as the volume reader does (a file without its file meta header, without
    PhotometricInterpretation), turns palette colour into RGB, and refuses an image the CT window blanks."""
    from pydicom.data import get_testdata_file
    from pydicom.pixels import apply_color_lut

    palette = get_testdata_file("examples_palette.dcm")  # shipped inside pydicom: no download
    ds = pydicom.dcmread(palette)
    rgb = apply_color_lut(ds.pixel_array, ds).astype(np.float64)
    expected = (rgb - rgb.min()) / (rgb.max() - rgb.min())
    image = load_image(palette, image_size=list(rgb.shape[:2]), channels=3).numpy()
    assert np.allclose(image, expected.transpose(2, 0, 1), atol=1e-6)

    hu = np.array([[-1000.0, -250.0, 0.0, 250.0], [1000.0, 125.0, -125.0, 0.0]])
    f = write_dicom(tmp_path / "ct", hu, "a.dcm")
    reference = load_image(f, image_size=[2, 4])
    plain = pydicom.dcmread(f)
    del plain.PhotometricInterpretation
    bare = tmp_path / "bare"
    plain.preamble, meta = None, plain.file_meta  # a data set alone: no preamble, no file meta header
    plain.file_meta = pydicom.dataset.FileMetaDataset()
    pydicom.filewriter.write_dataset(pydicom.filebase.DicomFileLike(open(bare, "wb")), plain)
    assert meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    assert torch.equal(load_image(bare, image_size=[2, 4]), reference)

    dark = write_dicom(tmp_path / "dark", np.full((4, 4), -900.0) + np.eye(4), "d.dcm")
    with pytest.raises(ValueError, match=r"d\.dcm: every pixel lies below the CT window \[-250, 250\] HU"):
        load_image(dark, image_size=[4, 4], ct_window=[-250, 250])
    edit(f, lambda d: setattr(d, "NumberOfFrames", 1))
    data = f.read_bytes()
    element = b"\x28\x00\x08\x00IS\x02\x001 "  # (0028,0008) IS "1 " in explicit VR little endian
    assert data.count(element) == 1
    f.write_bytes(data.replace(element, element[:-2] + b"1A"))  # garbled, as some exporters write it
    with pytest.raises(ValueError, match=r"a\.dcm: invalid NumberOfFrames '1A'"):
        load_image(f, image_size=[2, 4])


def test_a_decoder_warning_names_the_file(caplog):
    import logging

    from pydicom.data import get_testdata_file

    padded = get_testdata_file("MR_small_padded.dcm")  # shipped inside pydicom; 128 bytes of excess padding
    with caplog.at_level(logging.WARNING):
        load_image(padded)
    lines = [r.getMessage() for r in caplog.records if "excess padding" in r.getMessage()]
    assert lines and all(line.startswith(f"{padded}: ") for line in lines)


def test_decoding_in_threads_names_each_file_and_leaves_logging_as_it_was(caplog):
    import logging
    from concurrent.futures import ThreadPoolExecutor

    from pydicom.data import get_testdata_file

    padded, plain = get_testdata_file("MR_small_padded.dcm"), get_testdata_file("CT_small.dcm")
    pydicom_log = logging.getLogger("pydicom")
    level, filters = pydicom_log.level, list(pydicom_log.filters)
    with caplog.at_level(logging.WARNING), ThreadPoolExecutor(4) as pool:
        list(pool.map(load_image, [padded, plain] * 8))
        pydicom_log.warning("a line outside decoding")
    lines = [r.getMessage() for r in caplog.records if "excess padding" in r.getMessage()]
    assert len(lines) == 8 and all(line.startswith(f"{padded}: ") for line in lines)
    assert "a line outside decoding" in [r.getMessage() for r in caplog.records]
    assert pydicom_log.level == level and pydicom_log.filters == filters


def test_images_without_a_patient_are_warned_about_once(tmp_path, caplog):
    """Without patient_regex (and without DICOM PatientIDs) every image is its own patient: the build says so,
    once, with the fix; with a patient_regex it is silent."""
    import logging

    from tests.helpers import write_folder

    root = write_folder(tmp_path / "data", n_classes=2, per_class=4, dicom_class=False)  # P0_img0.png ... P1_img3.png
    with caplog.at_level(logging.WARNING, logger="datamodules.sources.image_folder"):
        ImageFolder(str(root), image_size=[8, 8]).build()
    lines = [r.getMessage() for r in caplog.records if "name no patient" in r.getMessage()]
    assert len(lines) == 1 and "8 of 8 images" in lines[0] and "patient_regex" in lines[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="datamodules.sources.image_folder"):
        table = ImageFolder(str(root), image_size=[8, 8], patient_regex="^(?P<patient>P[0-9])_").build()
    assert "name no patient" not in caplog.text and len(set(table.patients)) == 2


def test_every_image_that_cannot_be_read_is_named_in_one_pass(tmp_path):
    """`fit` stopped at the first broken image: with three, a user needed three runs to find them."""
    root = write_folder(tmp_path / "data", n_classes=3, dicom_class=False)
    for c in ("class0", "class1", "class2"):
        (root / c / "zz_bad.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    with pytest.raises(ValueError, match=r"^3 image\(s\) of .* cannot be read: .*class0/zz_bad\.png: .*class1/zz_bad\.png: "
                                         r".*class2/zz_bad\.png: "):
        ImageFolder(str(root)).build()


def test_byte_for_byte_copies_are_named(tmp_path, caplog):
    """One image under two patients' names, or in two classes, was taken silently: the copies could be support and
    query of one episode (a flattering test) or contradict each other's label."""
    import logging
    import shutil

    root = write_folder(tmp_path / "data", n_classes=2, dicom_class=False)
    first = sorted((root / "class0").iterdir())[0]
    shutil.copy(first, root / "class0" / "copy_in_class.png")
    shutil.copy(first, root / "class1" / "copy_elsewhere.png")
    with caplog.at_level(logging.WARNING, logger="datamodules"):
        ImageFolder(str(root)).build()
    warned = [r.getMessage() for r in caplog.records if "byte-for-byte copies" in r.getMessage()]
    assert len(warned) == 1 and "2 image(s)" in warned[0], caplog.text
    assert f"class0/{first.name} = class0/copy_in_class.png = class1/copy_elsewhere.png" in warned[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="datamodules"):
        ImageFolder(str(write_folder(tmp_path / "clean", n_classes=2, dicom_class=False))).build()
    assert "byte-for-byte" not in caplog.text


def test_the_item_table_is_built_in_one_buffer_and_holds_only_the_items_read(tmp_path):
    """The images are written into one buffer of every candidate file (a list stacked at the end held the table
    twice at its peak); a candidate that is skipped (an extensionless file that is not DICOM) leaves a table of
    the items read alone, in storage too (a view of the buffer would save all of it); and a NaN is still refused."""
    from datamodules.sources.items import ItemTable

    root = write_folder(tmp_path / "data", n_classes=2, dicom_class=False)
    (root / "class0" / "README").write_text("not an image")  # a candidate name (no suffix), skipped as no DICOM
    with pytest.warns(UserWarning, match=r"skipped 1 file\(s\) that are not images"):
        table = ImageFolder(str(root)).build()
    n = len(table.labels)
    assert table.images.shape[0] == n and table.images.untyped_storage().nbytes() == table.images.numel() * 4
    images = table.images.clone()
    images[n - 1, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"hold NaN or Inf values"):
        ItemTable(images, table.labels, table.classes, table.patients, table.sites, table.item_ids)


def test_a_class_name_in_two_unicode_forms_is_one_class(tmp_path):
    """A folder unzipped from a macOS archive names `métastase` in NFD: the config's NFC spelling was "not in the
    data" (while the error listed what looked like it), and the two forms in one cohort were two classes (a
    review). Class names are read in NFC everywhere."""
    import unicodedata

    from datamodules.classification import split_classes
    from datamodules.sources.lesion_rows import _parse_record

    nfc, nfd = unicodedata.normalize("NFC", "métastase"), unicodedata.normalize("NFD", "métastase")
    assert nfc != nfd
    root = write_folder(tmp_path / "data", dicom_class=False)
    (root / "class0").rename(root / nfd)
    for k in range(2):
        write_png(root / nfc / f"P{k}_extra.png", pattern(k, 9))
    table = ImageFolder(str(root), image_size=[16, 16]).build()
    assert nfc in table.classes and nfd not in table.classes and len(table.classes) == len(set(table.classes))
    assert split_classes(table.classes, 0, 1, 0, test=[nfd])["test"] == [nfc]
    problems: list[str] = []
    row = _parse_record({"image": "a.nii.gz", "class": f" {nfd} ", "x": "1", "y": "2", "z": "3"}, 2, tmp_path, True, False,
                       problems)
    assert row is not None and row.cls == nfc, problems
