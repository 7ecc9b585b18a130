"""The folder scanner: pairing, label checks, sites, pseudonyms, accounting for every file, PHI-free index."""

from __future__ import annotations

import json
import os
import re
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pydicom
import pytest
from monai.data import NibabelReader
from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged, Orientationd

from datamodules.indexing.index import Case, Index
from datamodules.indexing.scan import pseudonym, scan_folder, scan_to_file, site_key
from datamodules.io.dicom import DicomSeriesReader
from datamodules.synthetic.demo import ORGANS, generate_demo_cohort
from tests.datamodules.dicom_fixtures import (
    FAKE_PHI,
    affine_ras,
    edit,
    header,
    label_for,
    phantom,
    truncate,
    write_nifti,
    write_reoriented_nifti,
    write_series,
)

SALT = "test-salt"
LABEL_NAMES = {1: "liver", 2: "spleen"}
# permute axes 0 and 1 and flip two axes: the same voxels, stored differently
SWAP_FLIP = [[1, -1], [0, 1], [2, -1]]


def all_files(root: Path) -> list[str]:
    out = []
    for dirpath, _dirs, files in os.walk(root):
        out += [Path(os.path.relpath(os.path.join(dirpath, f), root)).as_posix() for f in files]
    return out


def placements(index: Index) -> list[str]:
    got = []
    for c in index.cases:
        got += list(c.image) if isinstance(c.image, list) else [c.image]
        if c.label:
            got.append(c.label)
    got += index.accounted
    for r in index.rejected:
        got += r.files or [r.path]
    return got


def assert_every_file_once(root: Path, index: Index) -> None:
    got = placements(index)
    dup = [p for p, n in Counter(got).items() if n > 1]
    assert not dup, f"files placed twice: {dup}"
    assert set(got) == set(all_files(root))


def rejection(index: Index, path: str) -> str:
    found = [r.reason for r in index.rejected if r.path == path]
    assert len(found) == 1, (path, [r.path for r in index.rejected])
    return found[0]


def case_of(index: Index, image_prefix: str):
    found = [c for c in index.cases if (c.image[0] if isinstance(c.image, list) else c.image).startswith(image_prefix)]
    assert len(found) == 1, (image_prefix, [c.image for c in index.cases])
    return found[0]


# ------------------------------------------------------------------------------------- the tree
def write_dicom_cases(root: Path) -> None:
    """Good, ambiguous and broken DICOM series under ``root/dicom``, and a series in an images/labels layout."""
    d = root / "dicom"
    # A: a good CT series, reversed instance order, random names; its label stored with swapped+flipped axes
    vol_a, aff_a = phantom(seed=1), affine_ras(rot_deg=10.0)
    write_series(d / "patA" / "CT", vol_a, aff_a, seed=1, reverse=True, shuffle_names=True,
                 hdr=header(PatientID="PHITEST-A", SeriesNumber=2))
    write_reoriented_nifti(label_for(vol_a), aff_a, d / "patA" / "CT_label.nii.gz", SWAP_FLIP)
    # B: two series of one patient in one folder
    write_series(d / "patB" / "mixed", phantom((8, 8, 4), 2), seed=2, file_names=[f"img{k}" for k in range(4)],
                 hdr=header(PatientID="PHITEST-B", SeriesNumber=3))
    write_series(d / "patB" / "mixed", phantom((6, 6, 5), 3), seed=3, file_names=[f"x{k}.dcm" for k in range(5)],
                 hdr=header(PatientID="PHITEST-B", SeriesNumber=4))
    # C: a missing slice (its label is accounted with the rejection); D: uneven; E: duplicate; F: mixed orientation
    gap = write_series(d / "patC" / "gap", phantom((8, 8, 7), 4), seed=4)
    gap[3].unlink()
    write_nifti(np.ones((8, 8, 7), np.uint8), affine_ras(), d / "patC" / "gap_label.nii.gz")
    uneven = write_series(d / "patD" / "uneven", phantom((8, 8, 6), 5), seed=5)
    edit(uneven[2], lambda ds: setattr(ds, "ImagePositionPatient", [*ds.ImagePositionPatient[:2], float(ds.ImagePositionPatient[2]) + 0.9]))
    dup = write_series(d / "patE" / "dup", phantom((8, 8, 5), 6), seed=6)
    shutil.copy(dup[1], dup[1].with_name("again.dcm"))
    orient = write_series(d / "patF" / "orient", phantom((8, 8, 5), 7), seed=7)
    edit(orient[0], lambda ds: setattr(ds, "ImageOrientationPatient", [1, 0, 0, 0, 0, -1]))
    # G: one truncated slice
    trunc = write_series(d / "patG" / "trunc", phantom((8, 8, 5), 8), seed=8)
    truncate(trunc[4], 40)
    # H: two series in one folder and one label beside it: ambiguous, so both stay unlabelled
    write_series(d / "patH" / "two", phantom((8, 8, 4), 12), seed=12, file_names=[f"a{k}" for k in range(4)])
    write_series(d / "patH" / "two", phantom((8, 8, 4), 13), seed=13, file_names=[f"b{k}" for k in range(4)])
    write_nifti(np.ones((8, 8, 4), np.uint8), affine_ras(), d / "patH" / "two_seg.nii.gz")
    # images/<series folder> with labels/<series folder>.nii.gz
    vol_s = phantom((8, 8, 4), 14)
    write_series(root / "cohort" / "images" / "S01", vol_s, seed=14, hdr=header(PatientID="PHITEST-S"))
    write_nifti(label_for(vol_s), affine_ras(), root / "cohort" / "labels" / "S01.nii.gz")


def write_odd_dicom_files(d: Path) -> None:
    """Single files that are not slices: multi-frame, no pixel data (RTSTRUCT), and a text file."""
    mf = write_series(d / "misc" / "mf", phantom((8, 8, 1), 9), seed=9)[0]

    def multi(ds):
        ds.NumberOfFrames = 2
        ds.PixelData = ds.PixelData * 2

    edit(mf, multi)
    rs = write_series(d / "misc" / "rs", phantom((8, 8, 1), 10), seed=10)[0]

    def rtstruct(ds):
        del ds.PixelData
        del ds.Rows
        ds.Modality = "RTSTRUCT"
        ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.481.3"

    edit(rs, rtstruct)
    (d / "misc" / "notes.txt").write_text("scanner notes\n")


def write_nifti_cases(root: Path, img: np.ndarray, aff: np.ndarray) -> None:
    """NIfTI images with conventional label names under ``root/nifti``: good, mismatched and broken ones."""
    n = root / "nifti"
    write_nifti(img, aff, n / "good.nii.gz")
    write_reoriented_nifti(label_for(img, values=(1, 2)), aff, n / "good_seg.nii.gz", SWAP_FLIP)
    write_nifti(img, aff, n / "badshape.nii.gz")
    write_nifti(np.ones((8, 8, 5), np.uint8), aff, n / "badshape_seg.nii.gz")
    write_nifti(img, aff, n / "shifted.nii.gz")
    shifted = aff.copy()
    shifted[:3, 3] += [3.0, 4.0, 0.0]
    write_nifti(label_for(img), shifted, n / "shifted_mask.nii.gz")
    write_nifti(img, aff, n / "empty.nii.gz")
    write_nifti(np.zeros(img.shape, np.uint8), aff, n / "empty_label.nii.gz")
    write_nifti(img, aff, n / "frac.nii.gz")
    write_nifti(label_for(img).astype(np.float32) * 0.5, aff, n / "frac_seg.nii.gz")
    nan = img.copy()
    nan[0, 0, 0] = np.nan
    write_nifti(nan, aff, n / "nan.nii.gz")
    write_nifti(np.full((8, 8, 4), 7.0), aff, n / "const.nii.gz")
    write_nifti(np.stack([img, img + 1], -1), aff, n / "four_d.nii.gz")
    write_nifti(label_for(img), aff, n / "orphan_seg.nii.gz")
    write_nifti(img, aff, n / "unlabelled.nii")


def write_layouts(root: Path, img: np.ndarray, aff: np.ndarray) -> None:
    """nnU-Net, Decathlon (with macOS junk) and BIDS layouts."""
    # nnU-Net naming: imagesTr/<case>_0000.nii.gz with labelsTr/<case>.nii.gz
    write_nifti(img, aff, root / "nnunet" / "imagesTr" / "c1_0000.nii.gz")
    write_nifti(label_for(img), aff, root / "nnunet" / "labelsTr" / "c1.nii.gz")

    # Decathlon layout (label value 3 named there), with macOS junk
    t = root / "Task01_Heart"
    write_nifti(img, aff, t / "imagesTr" / "h1.nii.gz")
    write_nifti(label_for(img, values=(3,)), aff, t / "labelsTr" / "h1.nii.gz")
    (t / "imagesTr" / "._h1.nii.gz").write_bytes(b"\0\5\26\7 mac resource fork")
    (t / "dataset.json").write_text(json.dumps({
        "name": "Heart", "modality": {"0": "MRI"}, "labels": {"0": "background", "3": "heart"},
        "training": [{"image": "./imagesTr/h1.nii.gz", "label": "./labelsTr/h1.nii.gz"}], "test": [],
    }))

    # BIDS: a sidecar with scanner fields (and the identifying institution)
    anat = root / "bids" / "sub-07" / "anat"
    write_nifti(img, aff, anat / "sub-07_T1w.nii.gz")
    write_nifti(label_for(img), aff, anat / "sub-07_T1w_dseg.nii.gz")
    (anat / "sub-07_T1w.json").write_text(json.dumps({
        "Modality": "MRI", "Manufacturer": "Siemens", "ManufacturerModelName": "Prisma",
        "InstitutionName": FAKE_PHI["InstitutionName"], "MagneticFieldStrength": 3, "EchoTime": 0.002,
    }))
    write_nifti(img + 5, aff, anat / "sub-07_T2w.nii.gz")
    (root / "bids" / "stray.json").write_text("{}")


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("scan") / "data"
    write_dicom_cases(root)
    write_odd_dicom_files(root / "dicom")
    aff = affine_ras()
    img = phantom((8, 8, 4), 11)
    write_nifti_cases(root, img, aff)
    write_layouts(root, img, aff)
    # links: a loop back to the root, and a broken one
    (root / "loop").symlink_to(root, target_is_directory=True)
    (root / "broken.nii.gz").symlink_to(root / "does_not_exist.nii.gz")

    index = scan_folder(root, label_names=LABEL_NAMES, salt=SALT)
    return root, index


# ------------------------------------------------------------------------------------- accounting
def test_every_file_is_placed_exactly_once(tree):
    root, index = tree
    assert_every_file_once(root, index)
    assert all(r.reason.strip() for r in index.rejected)


def test_counts(tree):
    _, index = tree
    images = sorted(c.image if isinstance(c.image, str) else c.image[0].rsplit("/", 1)[0] for c in index.cases)
    assert images == sorted([
        "dicom/patA/CT", "dicom/patB/mixed", "dicom/patB/mixed", "dicom/patH/two", "dicom/patH/two",
        "cohort/images/S01", "nnunet/imagesTr/c1_0000.nii.gz",
        "nifti/good.nii.gz", "nifti/unlabelled.nii", "Task01_Heart/imagesTr/h1.nii.gz",
        "bids/sub-07/anat/sub-07_T1w.nii.gz", "bids/sub-07/anat/sub-07_T2w.nii.gz",
    ])
    assert sorted(index.accounted) == sorted([
        "Task01_Heart/dataset.json", "bids/sub-07/anat/sub-07_T1w.json",
    ])


# ------------------------------------------------------------------------------------------ DICOM
def test_dicom_case_geometric_order_site_and_flipped_label(tree):
    root, index = tree
    c = case_of(index, "dicom/patA/CT")
    assert c.image_format == "dicom" and c.modality == "CT" and c.label == "dicom/patA/CT_label.nii.gz"
    assert c.organs == {"liver": 1} and c.shape == [12, 10, 6]
    np.testing.assert_allclose(c.spacing, [1.5, 1.25, 3.0], atol=1e-4)
    np.testing.assert_allclose(c.affine, affine_ras(rot_deg=10.0), atol=1e-3)
    z = [float(pydicom.dcmread(root / p).ImagePositionPatient[2]) for p in c.image]
    assert z == sorted(z)
    token = "inst-" + pseudonym(SALT, FAKE_PHI["InstitutionName"].casefold(), 6)
    assert c.site == f"ACME | Scanner 3000 | {token}"
    assert c.site_info == {"Manufacturer": "ACME", "ManufacturerModelName": "Scanner 3000", "InstitutionName": token}
    assert c.patient == "p-" + pseudonym(SALT, "PHITEST-A")
    assert c.case_id == "c-" + pseudonym(SALT, c.image[0])


def test_a_series_whose_slices_name_two_scanners_is_indexed_with_a_warning(tmp_path, caplog):
    """Noticed before and left: a series put together from two scanners' files took the first slice's site
    without a word."""
    import logging

    files = write_series(tmp_path / "patX" / "CT", seed=0, hdr=header(PatientID="X1"))
    edit(files[-1], lambda ds: setattr(ds, "Manufacturer", "OTHERCO"))
    with caplog.at_level(logging.WARNING, logger="datamodules"):
        index = scan_folder(tmp_path, salt=SALT)
    [case] = index.cases
    warned = [r.getMessage() for r in caplog.records if "scanners" in r.getMessage()]
    assert len(warned) == 1 and "patX/CT" in warned[0] and "its slices name 2 scanners" in warned[0]
    assert "OTHERCO" in warned[0] and case.site_info["Manufacturer"] in ("ACME", "OTHERCO")
    caplog.clear()
    edit(files[-1], lambda ds: setattr(ds, "Manufacturer", "Acme"))  # one site in another case: no warning
    with caplog.at_level(logging.WARNING, logger="datamodules"):
        scan_folder(tmp_path, salt=SALT)
    assert not [r for r in caplog.records if "scanners" in r.getMessage()]


def test_flipped_label_loads_aligned_with_its_image(tree):
    root, index = tree
    load = Compose([
        LoadImaged(["image", "label"], reader=[DicomSeriesReader(), NibabelReader()]),
        EnsureChannelFirstd(["image", "label"]),
        Orientationd(["image", "label"], axcodes="RAS"),
    ])
    for prefix in ("dicom/patA/CT", "nifti/good.nii.gz"):
        c = case_of(index, prefix)
        out = load({"image": index.resolve(c.image), "label": index.resolve(c.label)})
        assert out["image"].shape == out["label"].shape
        np.testing.assert_allclose(out["image"].affine, out["label"].affine, atol=1e-3)
        bright = out["image"][0] >= 1500
        assert bool(((out["label"][0] == 1) == bright).all())


def test_two_series_in_one_folder_are_two_cases_of_one_patient(tree):
    _, index = tree
    cs = [c for c in index.cases if isinstance(c.image, list) and c.image[0].startswith("dicom/patB/mixed/")]
    assert sorted(len(c.image) for c in cs) == [4, 5]
    assert len({c.case_id for c in cs}) == 2 and len({c.patient for c in cs}) == 1
    assert all(c.label is None and c.organs == {} for c in cs)


def test_label_pairing_by_folders_and_ambiguity(tree):
    _, index = tree
    s01 = case_of(index, "cohort/images/S01/")
    assert s01.label == "cohort/labels/S01.nii.gz" and s01.organs == {"liver": 1}
    nn = case_of(index, "nnunet/imagesTr/c1_0000.nii.gz")
    assert nn.label == "nnunet/labelsTr/c1.nii.gz"
    two = [c for c in index.cases if isinstance(c.image, list) and c.image[0].startswith("dicom/patH/two/")]
    assert len(two) == 2 and all(c.label is None for c in two)
    assert "claimed by 2 images" in rejection(index, "dicom/patH/two_seg.nii.gz")


def test_dicom_rejections(tree):
    _, index = tree
    gap = [r for r in index.rejected if r.path == "dicom/patC/gap"]
    assert len(gap) == 1 and "missing slice" in gap[0].reason and "not used" in gap[0].reason
    assert "dicom/patC/gap_label.nii.gz" in gap[0].files and len(gap[0].files) == 7
    assert "uneven slice spacing" in rejection(index, "dicom/patD/uneven")
    assert "duplicate slice positions" in rejection(index, "dicom/patE/dup")
    assert "mixed orientations" in rejection(index, "dicom/patF/orient")
    assert "pixel data is truncated" in rejection(index, "dicom/patG/trunc")
    assert "multi-frame images are not supported yet" in rejection(index, "dicom/misc/mf/IM_0001.dcm")
    assert "an RT structure set (contours), not an image (RTSTRUCT, RT Structure Set Storage)" in rejection(
        index, "dicom/misc/rs/IM_0001.dcm"
    )
    assert rejection(index, "dicom/misc/notes.txt").startswith("not an image file we read (text")


# ------------------------------------------------------------------------------------------ NIfTI
def test_nifti_label_checks(tree):
    _, index = tree
    good = case_of(index, "nifti/good.nii.gz")
    assert good.label == "nifti/good_seg.nii.gz" and good.organs == {"liver": 1, "spleen": 2}
    assert good.site == "unknown" and good.modality == "unknown"
    unl = case_of(index, "nifti/unlabelled.nii")
    assert unl.label is None and unl.organs == {}
    r = rejection(index, "nifti/badshape.nii.gz")
    assert "label map nifti/badshape_seg.nii.gz does not match its image: shape (8, 8, 4) vs (8, 8, 5)" in r
    r = rejection(index, "nifti/shifted.nii.gz")
    assert "does not match its image" in r and "affine differs by 5 mm" in r
    assert "is empty (no foreground voxel)" in rejection(index, "nifti/empty.nii.gz")
    assert "non-integer values (e.g. 0.5" in rejection(index, "nifti/frac.nii.gz")
    assert "contains NaN/Inf" in rejection(index, "nifti/nan.nii.gz")
    assert "constant image" in rejection(index, "nifti/const.nii.gz")
    assert rejection(index, "nifti/four_d.nii.gz").startswith("4D image (shape (8, 8, 4, 2))")
    assert "looks like a label map" in rejection(index, "nifti/orphan_seg.nii.gz")
    assert "broken symbolic link" in rejection(index, "broken.nii.gz")
    files = {r.path: r.files for r in index.rejected}
    assert files["nifti/empty.nii.gz"] == ["nifti/empty.nii.gz", "nifti/empty_label.nii.gz"]


def test_decathlon_pairing_names_and_modality(tree):
    _, index = tree
    c = case_of(index, "Task01_Heart/imagesTr/h1.nii.gz")
    assert c.label == "Task01_Heart/labelsTr/h1.nii.gz" and c.organs == {"heart": 3} and c.modality == "MR"
    assert "resource-fork" in rejection(index, "Task01_Heart/imagesTr/._h1.nii.gz")
    assert index.label_names == {1: "liver", 2: "spleen", 3: "heart"}


def test_a_dataset_json_names_only_the_maps_it_describes(tmp_path):
    """A review: a ``dataset.json`` at the root that lists one sub-folder's cases named every label map of the
    tree by its labels, over ``label_names``, without a word (``test_organs: [spleen]`` then tested livers)."""
    vol = phantom(seed=0)
    lab = label_for(vol, values=(1, 2))
    for name in ("dec/imagesTr/d1.nii.gz", "other/p1.nii.gz"):
        write_nifti(vol, affine_ras(), tmp_path / name)
    write_nifti(lab, affine_ras(), tmp_path / "dec/labelsTr/d1.nii.gz")
    write_nifti(lab, affine_ras(), tmp_path / "other/p1_label.nii.gz")
    (tmp_path / "dataset.json").write_text(json.dumps({
        "name": "x", "modality": {"0": "CT"}, "labels": {"0": "background", "1": "spleen", "2": "liver"},
        "training": [{"image": "./dec/imagesTr/d1.nii.gz", "label": "./dec/labelsTr/d1.nii.gz"}]}))
    write_nifti(vol, affine_ras(), tmp_path / "dec/imagesTs/t1.nii.gz")  # a labelled test case it does not list
    write_nifti(lab, affine_ras(), tmp_path / "dec/labelsTs/t1.nii.gz")
    index = scan_folder(tmp_path, salt=SALT, label_names={1: "liver", 2: "spleen"})
    assert case_of(index, "dec/imagesTr/d1.nii.gz").organs == {"spleen": 1, "liver": 2}  # the ones it lists
    assert case_of(index, "other/p1.nii.gz").organs == {"liver": 1, "spleen": 2}  # label_names, as documented
    # the maps in a description's own label folders are its own, listed or not (a review of this rule)
    (tmp_path / "dec" / "dataset.json").write_text((tmp_path / "dataset.json").read_text().replace("./dec/", "./"))
    (tmp_path / "dataset.json").unlink()
    index = scan_folder(tmp_path, salt=SALT, label_names={1: "liver", 2: "spleen"})
    assert case_of(index, "dec/imagesTs/t1.nii.gz").organs == {"spleen": 1, "liver": 2}
    assert case_of(index, "dec/imagesTr/d1.nii.gz").organs == {"spleen": 1, "liver": 2}
    assert case_of(index, "other/p1.nii.gz").organs == {"liver": 1, "spleen": 2}
    # a description that lists no cases (nnU-Net v2's) still names every map below it
    (tmp_path / "dec" / "dataset.json").unlink()
    (tmp_path / "dataset.json").write_text(json.dumps({"name": "x", "channel_names": {"0": "CT"},
                                                       "labels": {"background": 0, "spleen": 1, "liver": 2}}))
    index = scan_folder(tmp_path, salt=SALT, label_names={1: "liver", 2: "spleen"})
    assert case_of(index, "other/p1.nii.gz").organs == {"spleen": 1, "liver": 2}


def test_bids_sidecar_site_and_patient(tree):
    _, index = tree
    t1 = case_of(index, "bids/sub-07/anat/sub-07_T1w.nii.gz")
    t2 = case_of(index, "bids/sub-07/anat/sub-07_T2w.nii.gz")
    token = "inst-" + pseudonym(SALT, FAKE_PHI["InstitutionName"].casefold(), 6)
    assert t1.site == f"Siemens | Prisma | {token} | 3" and t1.modality == "MR"
    assert t1.label == "bids/sub-07/anat/sub-07_T1w_dseg.nii.gz" and t1.organs == {"liver": 1}
    assert t2.site == "unknown" and t2.label is None
    assert t1.patient == t2.patient == "p-" + pseudonym(SALT, "sub-07")
    assert "neither a BIDS sidecar" in rejection(index, "bids/stray.json")


def test_site_key_tokens_identifying_fields():
    key, info = site_key(
        {"Manufacturer": " GE  MEDICAL ", "StationName": "CT99", "MagneticFieldStrength": "1.50"},
        ["Manufacturer", "StationName", "MagneticFieldStrength", "ManufacturerModelName"], "s",
    )
    assert key == f"GE MEDICAL | station-{pseudonym('s', 'ct99', 6)} | 1.5"  # tokens of the value in lower case
    assert info["MagneticFieldStrength"] == "1.5" and "ManufacturerModelName" not in info
    assert site_key({}, ["Manufacturer"], "s") == ("unknown", {})
    # accession numbers, descriptions and comments are tokens too (a review: they were stored as written)
    fields = ["AccessionNumber", "StudyDescription", "ImageComments", "ProtocolName", "Manufacturer"]
    key, info = site_key({"AccessionNumber": "ZZACC1", "StudyDescription": "CT for J. Doe", "ImageComments": "x",
                          "Manufacturer": "GE"}, fields, "s")
    assert "ZZACC1" not in key and "Doe" not in key and key.endswith("| GE")
    assert info["AccessionNumber"] == "anon-" + pseudonym("s", "zzacc1", 6)


def test_one_scanner_as_dicom_and_as_dcm2niix_nifti_is_one_site_and_stays_held_out(tmp_path, caplog):
    """A review: a dcm2niix sidecar spells the model ``ManufacturersModelName`` and the vendor ``Siemens`` where the
    DICOM header has ``SIEMENS``; the model was never read from a sidecar, so the scanner's NIfTI scans were another
    site, and holding the scanner out (cross_site) trained on them. Field strength in gauss (15000, older GE headers)
    and "3T" are the numbers in tesla; cases that name no scanner beside others that do are warned about. An
    institution written in capitals in the sidecar is the same institution (a review: its token, taken from the
    name as written, made a second site)."""
    import logging

    from datamodules.indexing.splits import make_split

    root = tmp_path / "data"
    scanner = dict(InstitutionName="Lakeside", MagneticFieldStrength=3)
    for n in range(3):
        write_series(root / "dicom" / f"p{n}", seed=n,
                     hdr=header(PatientID=f"d{n}", Manufacturer="SIEMENS", ManufacturerModelName="Skyra", **scanner))
        nifti = root / "nifti" / f"sub-n{n}" / f"sub-n{n}_ct.nii.gz"
        write_nifti(phantom(seed=10 + n).astype(np.float32), affine_ras(), nifti)
        nifti.with_name(f"sub-n{n}_ct.json").write_text(json.dumps(
            {"Manufacturer": "Siemens", "ManufacturersModelName": "Skyra", "InstitutionName": "LAKESIDE",
             "MagneticFieldStrength": "3T", "Modality": "CT"}))
        write_series(root / "other" / f"o{n}", seed=20 + n,
                     hdr=header(PatientID=f"o{n}", Manufacturer="GE", ManufacturerModelName="Signa",
                                MagneticFieldStrength=15000))
    write_nifti(phantom(seed=99).astype(np.float32), affine_ras(), root / "bare" / "sub-x" / "sub-x_ct.nii.gz")
    with caplog.at_level(logging.WARNING, logger="datamodules.indexing.scan"):
        index = scan_folder(root, salt=SALT)
    sites = Counter(c.site for c in index.cases)
    skyra = f"SIEMENS | Skyra | inst-{pseudonym(SALT, 'lakeside', 6)} | 3"
    ge = f"GE | Signa | inst-{pseudonym(SALT, FAKE_PHI['InstitutionName'].casefold(), 6)} | 1.5"
    assert sites == {skyra: 6, ge: 3, "unknown": 1}, sites
    assert "1 of 10 cases" in caplog.text and "name no scanner" in caplog.text
    split = make_split(index.cases, "cross_site", test_sites=["Skyra"], seed=0)
    held = {index.cases[i].site for i in split.test}
    assert held == {skyra} and not {index.cases[i].site for i in split.train + split.val} & held
    assert sum(index.cases[i].site == skyra for i in split.test) == 6  # the NIfTI scans are held out with the DICOM


def test_the_dataset_root_of_a_single_bids_image(tmp_path):
    """Outside a scan (``segment``, a lesion table's cache), the sidecars an image inherits stop at BIDS' marker
    ``dataset_description.json``, else at the folder above its ``sub-*`` folder, else at its own folder."""
    from datamodules.indexing.bids import bids_root, sidecars_of

    image = tmp_path / "study" / "sub-01" / "anat" / "sub-01_T1w.nii.gz"
    image.parent.mkdir(parents=True)
    image.touch()
    (tmp_path / "T1w.json").write_text("{}")  # above the dataset: never read
    (tmp_path / "study" / "T1w.json").write_text("{}")
    (image.parent / "sub-01_T1w.json").write_text("{}")
    assert bids_root(str(image)) == str(tmp_path / "study")
    assert sidecars_of(str(image)) == [str(tmp_path / "study" / "T1w.json"), str(image.parent / "sub-01_T1w.json")]
    (tmp_path / "dataset_description.json").write_text("{}")
    assert bids_root(str(image)) == str(tmp_path)
    assert sidecars_of(str(image))[0] == str(tmp_path / "T1w.json")
    plain = tmp_path / "flat" / "scan.nii.gz"
    plain.parent.mkdir()
    assert bids_root(str(plain)) == str(tmp_path)  # the marker above it
    (plain.parent / "scan.json").write_text("{}")
    assert sidecars_of(str(plain)) == [str(plain.parent / "scan.json")]
    assert sidecars_of(str(image), str(tmp_path / "flat")) == [str(image.parent / "sub-01_T1w.json")]  # not under root


def test_bids_sidecars_are_inherited_from_the_folders_above(tmp_path):
    """A review: a dataset that keeps its scanner fields in a top-level ``T1w.json`` (the BIDS inheritance
    principle) had every case at site ``unknown``, and the file was rejected as not a sidecar. The nearest sidecar's
    values win; another suffix's, or another subject's, do not apply."""
    root = tmp_path / "bids"
    root.mkdir()
    (root / "T1w.json").write_text(json.dumps({"Manufacturer": "Philips", "ManufacturersModelName": "Ingenia",
                                               "MagneticFieldStrength": 1.5}))
    (root / "T2w.json").write_text(json.dumps({"Manufacturer": "GE"}))
    for sub in ("01", "02", "03"):
        anat = root / f"sub-{sub}" / "anat"
        write_nifti(phantom(seed=int(sub)).astype(np.float32), affine_ras(), anat / f"sub-{sub}_T1w.nii.gz")
    (root / "sub-02" / "sub-02_T1w.json").write_text(json.dumps({"MagneticFieldStrength": 3}))  # a subject's own
    (root / "sub-03" / "anat" / "sub-03_T1w.json").write_text(json.dumps({"ManufacturersModelName": "Achieva"}))
    (root / "sub-01" / "sub-02_T1w.json").write_text(json.dumps({"Manufacturer": "nobody"}))  # another subject's
    # not BIDS-named, its extension in capitals: its own sidecar is read, and accounted (a review: it was rejected)
    write_nifti(phantom(seed=4).astype(np.float32), affine_ras(), root / "ct.nii.gz")
    (root / "ct.nii.gz").rename(root / "CT2.NII.GZ")
    (root / "CT2.json").write_text(json.dumps({"Manufacturer": "GE"}))
    index = scan_folder(root, salt=SALT)
    assert {c.image: c.site for c in index.cases} == {
        "CT2.NII.GZ": "GE",
        "sub-01/anat/sub-01_T1w.nii.gz": "Philips | Ingenia | 1.5",
        "sub-02/anat/sub-02_T1w.nii.gz": "Philips | Ingenia | 3",
        "sub-03/anat/sub-03_T1w.nii.gz": "Philips | Achieva | 1.5"}
    rejected = {r.path for r in index.rejected}
    assert rejected == {"T2w.json", "sub-01/sub-02_T1w.json"}  # they describe no image here


def test_site_key_reads_bids_spellings_and_field_strength_in_tesla():
    from datamodules.indexing.pseudonyms import merge_case_variants

    fields = ["Manufacturer", "ManufacturerModelName", "MagneticFieldStrength"]
    assert site_key({"Manufacturer": "Philips", "ManufacturersModelName": "Ingenia", "MagneticFieldStrength": 1.5},
                    fields, "s")[0] == "Philips | Ingenia | 1.5"
    assert site_key({"ManufacturersModelName": "Ingenia"}, ["ManufacturersModelName"], "s")[0] == "Ingenia"  # not hashed
    for given, read in ((15000, "1.5"), ("30000", "3"), ("3T", "3"), ("1.5 T", "1.5"), ("1.50000", "1.5"), (0.5, "0.5"),
                        ("3.0 Tesla", "3"), (10000, "1"), ("N/A", "N/A")):
        assert site_key({"MagneticFieldStrength": given}, ["MagneticFieldStrength"], "s")[0] == read, given
    assert merge_case_variants(["A | x", "a | X", "a | X", "B"]) == {"A | x": "a | X", "a | X": "a | X", "B": "B"}
    assert merge_case_variants(["A", "a"]) == {"A": "A", "a": "A"}  # a tie: the first in sorted order


def test_a_misspelt_site_field_is_named_with_the_keyword_meant(tmp_path, caplog):
    """A site field that is no DICOM keyword is read from no header: the scan names it and the keyword it is
    nearest, and says when no case names a scanner at all (before, every case fell silently into 'unknown')."""
    write_series(tmp_path / "a", phantom(shape=(8, 8, 4)), hdr=header(PatientID="A"), seed=1)
    write_series(tmp_path / "b", phantom(shape=(8, 8, 4)), hdr=header(PatientID="B", Manufacturer="GE"), seed=2)
    with caplog.at_level("INFO"):
        index = scan_folder(tmp_path, site_fields=["Manufactuer", "MagneticFieldStrength"])
    assert {c.site for c in index.cases} == {"unknown"}
    text = caplog.text
    assert "site field 'Manufactuer' (did you mean 'Manufacturer'?) is not a DICOM keyword" in text
    assert "MagneticFieldStrength" not in text.split("is not a DICOM keyword")[0]
    assert "none of the 2 cases" in text and "names a scanner" in text
    caplog.clear()
    with caplog.at_level("INFO"):
        index = scan_folder(tmp_path, site_fields=["Manufacturer"])
    assert len({c.site for c in index.cases}) == 2 and "DICOM keyword" not in caplog.text
    assert "names a scanner" not in caplog.text


def test_nnunet_cases_with_several_channels_v1_lists_and_the_ignore_label(tmp_path, caplog, recwarn):
    """A review of nnU-Net folders: a case's channels (CASE_0000, CASE_0001) each claimed its label map, which was
    rejected, and each channel was a patient of its own; a v1 dataset.json listing CASE.nii.gz (files CASE_0000...)
    warned that every case was missing, then paired it anyway; v2's 'ignore' value (not annotated) was an organ."""
    img, aff = phantom(), affine_ras()
    v2 = tmp_path / "v2"
    for case in ("A", "B"):
        for channel in (0, 1):
            write_nifti(img + channel, aff, v2 / "imagesTr" / f"{case}_{channel:04d}.nii.gz")
        write_nifti(label_for(img, values=(1, 3)), aff, v2 / "labelsTr" / f"{case}.nii.gz")
    (v2 / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT", "1": "CT"}, "file_ending": ".nii.gz",
                                                 "labels": {"background": 0, "liver": 1, "ignore": 3}}))
    v1 = tmp_path / "v1"
    for case in ("C", "D"):
        write_nifti(img, aff, v1 / "imagesTr" / f"{case}_0000.nii.gz")
        write_nifti(label_for(img), aff, v1 / "labelsTr" / f"{case}.nii.gz")
    (v1 / "dataset.json").write_text(json.dumps({
        "modality": {"0": "CT"}, "labels": {"0": "background", "1": "spleen"},
        "training": [{"image": f"./imagesTr/{c}.nii.gz", "label": f"./labelsTr/{c}.nii.gz"} for c in ("C", "D")]}))
    write_nifti(label_for(img), aff, v1 / "labelsTr" / "E.nii.gz")  # no image at all
    with caplog.at_level("INFO"):
        index = scan_folder(tmp_path, salt=SALT)
    first = [case_of(index, f"v2/imagesTr/{c}_0000") for c in ("A", "B")]
    other = [case_of(index, f"v2/imagesTr/{c}_0001") for c in ("A", "B")]
    assert [c.label for c in first] == ["v2/labelsTr/A.nii.gz", "v2/labelsTr/B.nii.gz"]
    assert all(c.organs == {"liver": 1} for c in first)  # 'ignore' is no structure
    assert all(not c.label for c in other)
    assert [c.patient for c in first] == [c.patient for c in other] and first[0].patient != first[1].patient
    assert "further channel(s) of 2 nnU-Net case(s)" in caplog.text
    assert "hold nnU-Net's 'ignore' value" in caplog.text
    listed = [case_of(index, f"v1/imagesTr/{c}_0000") for c in ("C", "D")]
    assert [c.organs for c in listed] == [{"spleen": 1}] * 2
    assert not [w for w in recwarn if "does not exist" in str(w.message)]
    orphan = next(r for r in index.rejected if r.path == "v1/labelsTr/E.nii.gz")
    assert "E_0000.nii.gz" in orphan.reason
    # a single-channel nnU-Net case keeps the patient key it had (its channel suffix stays), and names alone do not
    # make channels: synapse_0002 and synapse_0003 are two cases, two patients, with their own label maps
    single = scan_folder(v1, salt=SALT)
    assert case_of(single, "imagesTr/C_0000").patient == "p-" + pseudonym(SALT, "imagesTr/C_0000")
    numbered = tmp_path / "numbered"
    for n in (2, 3):
        write_nifti(img, aff, numbered / "imagesTr" / f"synapse_{n:04d}.nii.gz")
        write_nifti(label_for(img), aff, numbered / "labelsTr" / f"synapse_{n:04d}.nii.gz")
    assert len({c.patient for c in scan_folder(numbered, salt=SALT).labelled_cases}) == 2
    # nor beside a dataset.json of several modalities that pairs each numbered file with its own label map
    (numbered / "dataset.json").write_text(json.dumps({
        "modality": {"0": "T2", "1": "ADC"}, "labels": {"0": "background", "1": "organ"},
        "training": [{"image": f"./imagesTr/synapse_{n:04d}.nii.gz", "label": f"./labelsTr/synapse_{n:04d}.nii.gz"}
                     for n in (2, 3)]}))
    for n in (0, 1):
        write_nifti(img, aff, numbered / "imagesTr" / f"synapse_{n:04d}.nii.gz")
        write_nifti(label_for(img), aff, numbered / "labelsTr" / f"synapse_{n:04d}.nii.gz")
    assert len({c.patient for c in scan_folder(numbered, salt=SALT).labelled_cases}) == 4
    # the channels of test cases (no label maps) are one patient when the dataset.json names several channels
    write_nifti(img, aff, v2 / "imagesTs" / "T_0000.nii.gz")
    write_nifti(img, aff, v2 / "imagesTs" / "T_0001.nii.gz")
    test_cases = [case_of(scan_folder(v2, salt=SALT), f"imagesTs/T_{k:04d}") for k in (0, 1)]
    assert test_cases[0].patient == test_cases[1].patient


# ---------------------------------------------------------------------------------------- privacy
def test_saved_index_has_no_phi_and_round_trips(tree, tmp_path):
    root, _ = tree
    out = tmp_path / "index.json"
    index = scan_to_file(root, out, label_names=LABEL_NAMES, salt=SALT)
    text = out.read_text()
    for value in FAKE_PHI.values():
        assert value not in text, value
    assert "PHITEST" not in text
    uids = set()
    for dirpath, _, files in os.walk(root):
        for f in files:
            p = os.path.join(dirpath, f)
            try:
                ds = pydicom.dcmread(p, stop_before_pixels=True)
            except Exception:
                continue
            uids |= {str(ds.get(k)) for k in ("SeriesInstanceUID", "StudyInstanceUID", "SOPInstanceUID") if k in ds}
    assert uids and not [u for u in uids if u in text]
    loaded = Index.load(out)
    assert loaded.to_dict() == index.to_dict()
    # the salt keys every pseudonym
    other = scan_folder(root, label_names=LABEL_NAMES, salt="another-salt")
    assert not {c.case_id for c in other.cases} & {c.case_id for c in index.cases}


def test_not_a_folder(tmp_path):
    with pytest.raises(NotADirectoryError, match="not a folder"):
        scan_folder(tmp_path / "missing")


# ------------------------------------------------------------------------------- real-world files
def test_scan_of_pydicom_test_files(caplog):
    """pydicom's own odd files (colour, compressed, truncated, SR, RT, DICOMDIR, ...): no exception, all placed."""
    root = Path(os.path.dirname(pydicom.data.get_testdata_file("CT_small.dcm")))
    index = scan_folder(root)
    assert_every_file_once(root, index)
    assert len(all_files(root)) > 100
    assert all(r.reason.strip() for r in index.rejected)
    assert any(isinstance(c.image, list) and c.image[0].startswith("dicomdirtests/98892001/CT5N/") for c in index.cases)
    reasons = " ".join(r.reason for r in index.rejected)
    for expected in ("not a grey-level volume", "no pixel data", "multi-frame images are not supported yet",
                     "mixed orientations", "missing slice"):
        assert expected in reasons


def test_scan_of_the_demo_cohort(tmp_path):
    root = tmp_path / "demo"
    generate_demo_cohort(root, seed=0, patients_per_site=1)
    index = scan_folder(root)
    assert_every_file_once(root, index)
    assert not index.rejected, index.summary()
    assert len(index.cases) == 4 and len(index.labelled_cases) == 4 and len(index.sites) == 4
    assert {c.modality for c in index.cases} == {"CT", "MR"}
    assert all(len(c.organs) == len(ORGANS) for c in index.cases)
    assert index.own_patient == []  # BIDS subjects, DICOM PatientIDs and a Decathlon folder all name their patient


def test_nifti_files_that_name_no_patient_are_counted_and_a_pattern_names_them(tmp_path):
    """`sts1_ct` and `sts1_mr` are one patient; without a pattern that says so each file is its own patient (and a
    split could put them on both sides), which the index records; ``patient_regex`` makes them one."""
    for name in ("sts1_ct", "sts1_mr", "sts2_ct"):
        vol = phantom(seed=len(name))
        write_nifti(vol, affine_ras(), tmp_path / f"{name}.nii.gz")
        write_nifti(label_for(vol), affine_ras(), tmp_path / f"{name}_label.nii.gz")
    index = scan_folder(tmp_path, salt=SALT)
    assert sorted(index.own_patient) == ["sts1_ct.nii.gz", "sts1_mr.nii.gz", "sts2_ct.nii.gz"]
    assert len({c.patient for c in index.cases}) == 3 and "name no patient" in index.summary()
    assert Index.from_dict(index.to_dict()).own_patient == index.own_patient
    named = scan_folder(tmp_path, salt=SALT, patient_regex=r"^([^_]+)_")
    assert named.own_patient == [] and len({c.patient for c in named.cases}) == 2
    assert "name no patient" not in named.summary() and named.patient_regex == r"^([^_]+)_"
    from imaging_meta.commands.cli import cli_main

    assert cli_main(["scan", str(tmp_path), "--out", str(tmp_path / "index.json"), "--patient-regex", r"^([^_]+)_"]) == 0
    assert Index.load(tmp_path / "index.json").patient_regex == r"^([^_]+)_"


def test_a_dicom_series_without_a_patient_id_is_counted_as_its_own_patient(tmp_path):
    """Anonymised exports blank PatientID: each such series is its own patient, as a NIfTI file that names none,
    and the index says so (it was silent, so one patient's two series could land in training and test; a review)."""
    write_series(tmp_path / "patientA" / "study1", seed=1, hdr=header(PatientID="", SeriesNumber=1))
    write_series(tmp_path / "patientA" / "study2", seed=2, hdr=header(PatientID="", SeriesNumber=2))
    write_series(tmp_path / "B", seed=3, hdr=header(PatientID="B-123", SeriesNumber=3))
    index = scan_folder(tmp_path, salt=SALT)
    assert [p.split("/")[:2] for p in sorted(index.own_patient)] == [["patientA", "study1"], ["patientA", "study2"]]
    assert len({c.patient for c in index.cases}) == 3 and "or it is a DICOM series whose PatientID is empty" in index.summary()
    named = scan_folder(tmp_path, salt=SALT, patient_regex=r"^([^/]+)/")  # one folder per patient
    assert named.own_patient == [] and len({c.patient for c in named.cases}) == 2


def test_one_name_for_two_values_in_one_set_of_label_names_is_refused(tmp_path):
    """Two values named alike in one mapping became 'kidney' and 'kidney_3', so holding out the kidney trained
    on half of it (a review): the data config's label_names and a dataset.json's labels now refuse it."""
    from datamodules.indexing.decathlon import parse_label_names

    with pytest.raises(ValueError, match="give 'kidney' to values \\[2, 3\\]: a structure is one label value"):
        parse_label_names({"1": "liver", "2": "kidney", "3": "kidney"})
    assert parse_label_names({"background": 0, "liver": 1, "kidney": 2}) == {0: "background", 1: "liver", 2: "kidney"}
    vol = phantom(seed=1)
    write_nifti(vol, affine_ras(), tmp_path / "sub-01_ct.nii.gz")
    with pytest.raises(ValueError, match="^label_names: the label names give 'kidney'"):
        scan_folder(tmp_path, salt=SALT, label_names={1: "liver", 2: "kidney", 3: "kidney"})
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": {"0": "background", "1": "kidney", "2": "kidney"}}))
    # refused outright: rejecting the description alone indexed its images with no names at all (a review)
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path / 'dataset.json'}: its 'labels': the label names give "
                                                   "'kidney' to values [1, 2]")):
        scan_folder(tmp_path, salt=SALT)


def test_one_name_for_two_label_values_is_listed_once():
    """Two label values named alike (a user's label_names beside a dataset.json) used to list the name twice."""
    index = Index(root="/r", label_names={1: "aorta", 2: "aorta", 3: "liver"})
    index.cases = [Case(case_id="c", patient="p", site="s", modality="CT", image="a.nii.gz", image_format="nifti",
                        label="a_label.nii.gz", organs={"aorta": 1, "liver": 3}, shape=[2, 2, 2], spacing=[1, 1, 1],
                        affine=np.eye(4).tolist(), site_info={})]
    assert index.organs == ["aorta", "liver"]


def test_a_localizer_beside_a_series_does_not_take_its_label_map(tmp_path):
    """A PACS export keeps a one-slice localizer (its own series) in the series' folder. Both claimed the folder's
    label map, which was then rejected as contested and the series indexed without labels; the label goes to the
    one series on its grid (matrix and slice count), and the localizer is rejected on its own."""
    d = tmp_path / "root" / "pat1"
    write_series(d / "CT", phantom((8, 8, 5), 1), seed=1, file_names=[f"a{k}.dcm" for k in range(5)])
    write_series(d / "CT", phantom((8, 8, 1), 2), seed=2, file_names=["scout.dcm"])
    write_nifti(label_for(phantom((8, 8, 5), 1)), affine_ras(), d / "CT_seg.nii.gz")
    index = scan_folder(tmp_path / "root", salt=SALT)
    (case,) = index.cases
    assert len(case.image) == 5 and case.label == "pat1/CT_seg.nii.gz" and case.organs
    assert "only 1 slice" in rejection(index, "pat1/CT/scout.dcm")


def test_of_two_phases_in_one_folder_the_label_goes_to_the_series_it_lies_on(tmp_path):
    """Two series of one study (arterial and venous) share a folder, a matrix and a slice count, 30 mm apart. Their
    folder's label map was rejected as claimed by both, with fixes that do not apply to DICOM; it goes to the
    series whose voxels it lies on. Two series on the same grid stay contested, with a fix for DICOM."""
    d = tmp_path / "root" / "pat1"
    arterial = affine_ras()
    venous = affine_ras()
    venous[2, 3] += 30.0
    write_series(d / "CT", phantom((8, 8, 5), 1), arterial, seed=1, file_names=[f"art{k}.dcm" for k in range(5)])
    write_series(d / "CT", phantom((8, 8, 5), 2), venous, seed=2, file_names=[f"ven{k}.dcm" for k in range(5)])
    write_nifti(label_for(phantom((8, 8, 5), 1)), arterial, d / "CT_seg.nii.gz")
    index = scan_folder(tmp_path / "root", salt=SALT)
    labelled = [c for c in index.cases if c.label]
    assert len(index.cases) == 2 and len(labelled) == 1 and labelled[0].image[0].startswith("pat1/CT/art")
    assert labelled[0].label == "pat1/CT_seg.nii.gz" and not index.rejected

    e = tmp_path / "same" / "pat1"
    write_series(e / "CT", phantom((8, 8, 5), 1), arterial, seed=1, file_names=[f"art{k}.dcm" for k in range(5)])
    write_series(e / "CT", phantom((8, 8, 5), 2), arterial, seed=2, file_names=[f"ven{k}.dcm" for k in range(5)])
    write_nifti(label_for(phantom((8, 8, 5), 1)), arterial, e / "CT_seg.nii.gz")
    index = scan_folder(tmp_path / "same", salt=SALT)
    assert all(c.label is None for c in index.cases)
    assert "claimed by 2 images" in rejection(index, "pat1/CT_seg.nii.gz")
    assert "move each series into a folder of its own" in rejection(index, "pat1/CT_seg.nii.gz")


def test_a_file_cut_inside_its_header_does_not_contest_its_series_label(tmp_path):
    """A review: a slice cut inside its header (no series UID left) formed a "series" of its own, so the label map
    beside the folder was rejected as claimed by two images, with advice to move each series into its own folder;
    the series itself was rejected for the missing slice. The label goes to the series of its matrix, whose
    rejection says that its label map is not used."""
    d = tmp_path / "root" / "pat1"
    vol = phantom((8, 8, 6), 1)
    files = write_series(d / "ct", vol, seed=1)
    files[2].write_bytes(files[2].read_bytes()[:300])
    write_nifti(label_for(vol), affine_ras(), d / "ct_label.nii.gz")
    index = scan_folder(tmp_path / "root", salt=SALT)
    reasons = {r.path: r.reason for r in index.rejected}
    assert not any("claimed by" in r for r in reasons.values()), reasons
    assert any("its label map pat1/ct_label.nii.gz is not used" in r for r in reasons.values()), reasons


def test_a_series_whose_slices_name_two_patients_is_rejected(tmp_path):
    """The patient was taken from the first file without comparing the others: a split by patient could then put
    one person on both sides."""
    d = tmp_path / "root" / "pat1"
    files = write_series(d / "CT", phantom((8, 8, 5), 1), seed=1)
    ds = pydicom.dcmread(files[2])
    ds.PatientID = "SOMEONE-ELSE"
    ds.save_as(files[2])
    index = scan_folder(tmp_path / "root", salt=SALT)
    assert index.cases == []
    assert "its slices name 2 patients (PatientID)" in rejection(index, "pat1/CT")


def test_a_label_map_named_gt_pairs_with_its_image_and_is_never_an_unlabelled_scan(tmp_path):
    """A review: ACDC-style ``case1_gt.nii.gz`` beside ``case1.nii.gz`` was indexed as a scan of its own, without
    labels, and self-supervision trained on the label map as if it were an image."""
    img, aff = phantom(seed=3), affine_ras()
    write_nifti(img, aff, tmp_path / "case1.nii.gz")
    write_nifti(label_for(img), aff, tmp_path / "case1_gt.nii.gz")
    write_nifti(label_for(img), aff, tmp_path / "case2_gt.nii.gz")  # its image is missing
    index = scan_folder(str(tmp_path))
    assert [(c.image, c.label) for c in index.cases] == [("case1.nii.gz", "case1_gt.nii.gz")]
    assert [(r.path, "suffix _gt" in r.reason) for r in index.rejected] == [("case2_gt.nii.gz", True)]


def test_a_label_suffix_in_capitals_pairs_as_in_lower_case(tmp_path):
    """A review: ``CT3_Seg.nii.gz`` beside the DICOM series folder ``CT3`` (and ``Case1_MASK.nii.gz`` beside
    ``Case1.nii.gz``) was indexed as an image of its own, of unknown modality, and its image as unlabelled; an
    orphan ``Case2_Seg`` was not named as a label map. A file spelled as listed still wins over a capitalised one."""
    img, aff = phantom(seed=3), affine_ras()
    write_series(tmp_path / "pat3" / "CT3", img, aff, seed=3)
    write_nifti(label_for(img), aff, tmp_path / "pat3" / "CT3_Seg.nii.gz")
    write_nifti(img, aff, tmp_path / "Case1.nii.gz")
    write_nifti(label_for(img), aff, tmp_path / "Case1_MASK.nii.gz")
    write_nifti(label_for(img), aff, tmp_path / "Case2_Seg.nii.gz")  # its image is missing
    write_nifti(img, aff, tmp_path / "c4.nii.gz")
    write_nifti(label_for(img), aff, tmp_path / "c4_seg.nii.gz")
    write_nifti(label_for(img), aff, tmp_path / "c4_SEG.nii.gz")  # a second label map, named otherwise
    write_nifti(img, aff, tmp_path / "c5.nii.gz")
    write_nifti(label_for(img), aff, tmp_path / "c5_Seg.nii.gz")
    write_nifti(label_for(img), aff, tmp_path / "c5_SEG.nii.gz")  # both capitalised: the second is a second map
    index = scan_folder(str(tmp_path))
    pairs = sorted((c.image if isinstance(c.image, str) else os.path.dirname(c.image[0]), c.label) for c in index.cases)
    assert pairs == [("Case1.nii.gz", "Case1_MASK.nii.gz"), ("c4.nii.gz", "c4_seg.nii.gz"),
                     ("c5.nii.gz", "c5_SEG.nii.gz"), ("pat3/CT3", "pat3/CT3_Seg.nii.gz")]
    reasons = {r.path: r.reason for r in index.rejected}
    assert "suffix _Seg" in reasons["Case2_Seg.nii.gz"]
    for second, used in (("c4_SEG.nii.gz", "c4_seg.nii.gz"), ("c5_Seg.nii.gz", "c5_SEG.nii.gz")):
        assert reasons[second].startswith(f"a second label map for {second[:2]}.nii.gz, which already uses {used}")


def test_an_image_named_like_a_label_that_has_a_label_of_its_own_stays_an_image(tmp_path):
    """A review of the _gt suffix: case01_gt.nii.gz with its own case01_gt_seg.nii.gz was taken for case01's label
    map, and both images were lost; a file that claims a label of its own is an image."""
    img, aff = phantom(seed=3), affine_ras()
    write_nifti(img, aff, tmp_path / "case01.nii.gz")
    write_nifti(img + 0.5, aff, tmp_path / "case01_gt.nii.gz")
    write_nifti(label_for(img), aff, tmp_path / "case01_gt_seg.nii.gz")
    index = scan_folder(str(tmp_path))
    assert sorted((c.image, c.label) for c in index.cases) == [("case01.nii.gz", None),
                                                               ("case01_gt.nii.gz", "case01_gt_seg.nii.gz")]


def test_a_shipped_salt_over_real_institutions_is_warned_about_but_not_on_the_demo(tmp_path, caplog):
    """A review: the institution token is an HMAC with the public default salt, so a guessed hospital name can be
    tested against a published report; a scan that makes such tokens with a shipped salt says so (not the demo's
    fake institutions)."""
    import logging

    root = tmp_path / "data"
    write_series(root / "p0", seed=0, hdr=header(PatientID="a"))  # FAKE_PHI holds an InstitutionName
    for salt, warned in (("imaging-meta", True), ("change-me", True), ("my-own-secret", False)):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="datamodules.indexing.scan"):
            scan_folder(root, salt=salt)
        assert ("salted with the shipped default salt" in caplog.text) is warned, salt
    (root / "dataset.json").write_text(json.dumps({"name": "imaging-meta demo", "labels": {"0": "background"}}))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="datamodules.indexing.scan"):
        scan_folder(root, salt="imaging-meta")
    assert "shipped default salt" not in caplog.text
    # a review (2026-12-07): the patient ids are keyed hashes of a PatientID, so an MRN is found by trying every
    # number; a cohort whose headers carry no institution (anonymised, or other --site-fields) is warned too
    bare = tmp_path / "bare"
    write_nifti(phantom(seed=1), affine_ras(), bare / "sub-01" / "anat" / "sub-01_T1w.nii.gz")
    for salt, warned in (("imaging-meta", True), ("my-own-secret", False)):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="datamodules.indexing.scan"):
            scan_folder(bare, salt=salt)
        assert ("patient ids of the 1 case(s)" in caplog.text and "guessed MRN" in caplog.text) is warned, salt
        # a setting that works for every data module (a lesion CSV's has no data.init_args.salt: a review)
        assert ("export IMAGING_META_SALT (fit, scan and evaluate read it)" in caplog.text) is warned


def test_a_second_link_to_one_image_is_indexed_once(tmp_path):
    """A review: an nnU-Net view made of links to the raw files indexed each scan twice, as two patients, so one
    scan could fall in training and in test. Each image file is indexed once: at the path with a label map, else
    one that is not a link; the others are rejected naming it, with their label maps. A review of that fix: a
    folder of links beside the raw data must not cost the raw image its label, and two patients' identical label
    maps may be one file."""
    img, aff = phantom(seed=3), affine_ras()
    for k in range(3):
        write_nifti(img + k, aff, tmp_path / "raw" / f"case{k}.nii.gz")
        write_nifti(label_for(img), aff, tmp_path / "raw" / f"case{k}_seg.nii.gz")
    for folder in ("imagesTr", "labelsTr"):
        (tmp_path / "view" / folder).mkdir(parents=True)
    for k in range(3):
        os.symlink(tmp_path / "raw" / f"case{k}.nii.gz", tmp_path / "view" / "imagesTr" / f"case{k}_0000.nii.gz")
        os.symlink(tmp_path / "raw" / f"case{k}_seg.nii.gz", tmp_path / "view" / "labelsTr" / f"case{k}.nii.gz")
    (tmp_path / "a_selection").mkdir()  # sorts first, unlabelled: the raw image keeps its label
    os.symlink(tmp_path / "raw" / "case0.nii.gz", tmp_path / "a_selection" / "case0.nii.gz")
    os.link(tmp_path / "raw" / "case1.nii.gz", tmp_path / "raw" / "hard.nii.gz")  # a hard link is the same file too
    index = scan_folder(str(tmp_path))
    assert sorted((c.image, c.label) for c in index.cases) == [
        (f"raw/case{k}.nii.gz", f"raw/case{k}_seg.nii.gz") for k in range(3)]
    assert len({c.patient for c in index.cases}) == 3
    rejected = {r.path: r for r in index.rejected}
    view = rejected["view/imagesTr/case2_0000.nii.gz"]
    assert view.reason.startswith("the same file as raw/case2.nii.gz (a link)") and view.files == [
        "view/imagesTr/case2_0000.nii.gz", "view/labelsTr/case2.nii.gz"]
    assert rejected["a_selection/case0.nii.gz"].reason.startswith("the same file as raw/case0.nii.gz (a link)")
    assert rejected["raw/hard.nii.gz"].reason.startswith("the same file as raw/case1.nii.gz (a link)")
    assert len(index.rejected) == 5  # three view images (with their maps), the selection's link, the hard link
    # two patients whose identical masks are one file: both labelled
    other = tmp_path / "other"
    for sub in ("sub-00", "sub-01"):
        write_nifti(img, aff, other / sub / f"{sub}_ct.nii.gz")
    write_nifti(label_for(img), aff, other / "sub-00" / "sub-00_ct_seg.nii.gz")
    os.link(other / "sub-00" / "sub-00_ct_seg.nii.gz", other / "sub-01" / "sub-01_ct_seg.nii.gz")
    shared = scan_folder(str(other))
    assert [c.label for c in shared.cases] == ["sub-00/sub-00_ct_seg.nii.gz", "sub-01/sub-01_ct_seg.nii.gz"]
    assert not shared.rejected


def test_the_default_patient_pattern_is_the_bids_entity_not_sub_inside_a_name(tmp_path):
    """A review: ``sub-`` anywhere in the path was the patient, so every case under ``liver-sub-sampled/`` was one
    patient. The entity starts a folder or file name; BIDS folders and file name prefixes still name the subject."""
    img, aff = phantom(seed=3), affine_ras()
    for k in range(3):
        write_nifti(img + k, aff, tmp_path / "liver-sub-sampled" / f"case{k}.nii.gz")
        write_nifti(label_for(img), aff, tmp_path / "liver-sub-sampled" / f"case{k}_seg.nii.gz")
    for ses in ("ses-1", "ses-2"):
        write_nifti(img, aff, tmp_path / "bids" / "sub-07" / ses / "anat" / f"sub-07_{ses}_T1w.nii.gz")
    write_nifti(img, aff, tmp_path / "flat" / "sub-08_T1w.nii.gz")
    write_nifti(img + 1, aff, tmp_path / "flat" / "sub-08_T2w.nii.gz")
    index = scan_folder(str(tmp_path))
    patients = {c.image: c.patient for c in index.cases}
    assert len({patients[f"liver-sub-sampled/case{k}.nii.gz"] for k in range(3)}) == 3
    bids = {p for name, p in patients.items() if name.startswith("bids/")}
    flat = {p for name, p in patients.items() if name.startswith("flat/")}
    assert len(bids) == len(flat) == 1 and bids != flat


def test_a_label_in_a_label_folder_with_an_upper_case_extension_pairs(tmp_path):
    """A review: ``labels/e.NII.GZ`` beside ``images/e.nii.gz`` left the image unlabelled and the map rejected as an
    orphan, though the image is there (the other way round it paired)."""
    img, aff = phantom(seed=3), affine_ras()
    write_nifti(img, aff, tmp_path / "images" / "e.nii.gz")
    write_nifti(label_for(img), aff, tmp_path / "labels" / "e.nii.gz")
    (tmp_path / "labels" / "e.nii.gz").rename(tmp_path / "labels" / "e.NII.GZ")
    index = scan_folder(str(tmp_path))
    assert [(c.image, c.label) for c in index.cases] == [("images/e.nii.gz", "labels/e.NII.GZ")]
    assert not index.rejected


def test_a_dataset_json_whose_training_is_not_a_list_is_rejected_not_a_crash(tmp_path):
    """A review: ``"training": 5`` stopped the whole scan as an internal error; the file is rejected with the reason
    and the images are paired by their names."""
    img, aff = phantom(seed=3), affine_ras()
    write_nifti(img, aff, tmp_path / "imagesTr" / "liver_1.nii.gz")
    write_nifti(label_for(img), aff, tmp_path / "labelsTr" / "liver_1.nii.gz")
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": {"0": "background", "1": "liver"}, "training": 5}))
    index = scan_folder(str(tmp_path))
    assert [(c.image, c.label) for c in index.cases] == [("imagesTr/liver_1.nii.gz", "labelsTr/liver_1.nii.gz")]
    assert [(r.path, "'training' is a int, not a list" in r.reason) for r in index.rejected] == [("dataset.json", True)]
