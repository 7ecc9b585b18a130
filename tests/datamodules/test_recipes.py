"""`datamodules.recipes.prepare`: tiny synthetic sources in the published Synapse/BTCV and CHAOS layouts, prepared,
then read end to end by the scanner; label geometry checked against the DICOM headers; every bad input named."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import yaml
from PIL import Image

from datamodules.indexing.scan import scan_folder
from datamodules.recipes.prepare import (
    DATASETS,
    ORGANS,
    PrepareError,
    chaos_png_labels,
    main,
    prepare,
    ssl_alpnet_folds,
)
from datamodules.recipes.prepare import (
    VALUE as ORGAN_VALUE,
)
from tests.datamodules.dicom_fixtures import affine_ras, header, write_nifti, write_series
from tests.helpers import interrupted_on_second_move

SHAPE = (16, 12, 6)  # (columns, rows, slices): not square, so a transposed label would not fit
CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "data"


# ------------------------------------------------------------------------------------------------ sources
def write_synapse(root: Path, ids=("0001", "0002", "0010")) -> Path:
    """img/imgNNNN.nii.gz (int16 HU) and label/labelNNNN.nii.gz with BTCV values, including dropped ones."""
    rng = np.random.default_rng(0)
    for n, pid in enumerate(ids):
        image = rng.integers(-1000, 1000, size=SHAPE).astype(np.int16)
        label = np.zeros(SHAPE, np.uint8)
        label[1:4, 1:4, 1:3] = 6  # liver
        label[10:13, 1:3, 2:4] = 1  # spleen
        label[1:3, 8:10, 3:5] = 2  # right kidney
        label[12:14, 8:10, 3:5] = 3  # left kidney
        label[6:8, 5:7, :] = 8  # aorta: background after preparing
        label[5, 5, 0] = 5  # esophagus: background too
        affine = affine_ras(origin=(10.0 + n, -20.0, 30.0))
        write_nifti(image, affine, root / "img" / f"img{pid}.nii.gz")
        write_nifti(label, affine, root / "label" / f"label{pid}.nii.gz")
    return root


def instance_names(reverse: bool) -> list[str]:
    """CHAOS-like file names of the slices in the order of volume axis 2 (InstanceNumber in the name)."""
    z = SHAPE[2]
    return [f"IMG-0002-{(z - k if reverse else k + 1):05d}.dcm" for k in range(z)]


def write_chaos(root: Path, ids=("1", "2", "10")) -> Path:
    """MR/<id>/T2SPIR/DICOM_anon/*.dcm (real MR DICOM, one oblique, one with InstanceNumber against geometry)
    and MR/<id>/T2SPIR/Ground/*.png: one PNG per slice, CHAOS intensities, a lone spleen pixel as a marker."""
    rng = np.random.default_rng(1)
    for n, pid in enumerate(ids):
        t2 = root / "MR" / pid / "T2SPIR"
        volume = rng.integers(0, 1000, size=SHAPE).astype(np.float64)
        reverse = n == 1
        affine = affine_ras(spacing=(1.4, 1.6, 6.0), rot_deg=20.0 * n, slice_sign=-1.0 if n == 2 else 1.0)
        write_series(t2 / "DICOM_anon", volume, affine, seed=n, hdr=header(PatientID=f"chaos-{pid}"), modality="MR",
                     intercept=0.0, reverse=reverse, file_names=instance_names(reverse))
        rows, cols = SHAPE[1], SHAPE[0]
        for inst in range(1, SHAPE[2] + 1):
            png = np.zeros((rows, cols), np.uint8)
            png[1:4, 1:5] = 63  # liver
            png[8:11, 1:3] = 120  # right kidney (inside 110-135)
            png[8:11, 12:15] = 189  # left kidney
            if inst == 3:
                png[2, 13] = 252  # spleen: one pixel, at (row 2, column 13) of the slice with InstanceNumber 3
            (t2 / "Ground").mkdir(parents=True, exist_ok=True)
            Image.fromarray(png).save(t2 / "Ground" / f"IMG-0002-{inst:05d}.png")
    return root


def dicom_pixel_world(path: Path, r: int, c: int) -> np.ndarray:
    """RAS position (mm) of pixel (row r, column c) of one DICOM slice, from its own header."""
    ds = pydicom.dcmread(path)
    iop = np.asarray(ds.ImageOrientationPatient, float)
    ps = np.asarray(ds.PixelSpacing, float)
    lps = np.asarray(ds.ImagePositionPatient, float) + c * ps[1] * iop[:3] + r * ps[0] * iop[3:]
    return lps * np.array([-1.0, -1.0, 1.0])


# ------------------------------------------------------------------------------------------------ synapse
def test_synapse_prepared_and_indexed_with_organ_names(tmp_path):
    src = write_synapse(tmp_path / "RawData" / "Training")
    out = tmp_path / "synapse_prepared"
    summary = prepare("synapse", src, out)
    assert summary["patients"] == 3 and summary["modality"] == "CT"
    index = scan_folder(out)
    assert not index.rejected, index.rejected
    assert {"dataset.json", "prepare.json", "folds.json"} <= set(index.accounted)
    assert len(index.labelled_cases) == 3
    for case in index.cases:
        assert case.modality == "CT"
        assert case.organs == {"liver": 1, "spleen": 2, "kidney_right": 3, "kidney_left": 4}
    assert len({c.patient for c in index.cases}) == 3
    # values and HU kept, BTCV values mapped, aorta/esophagus gone, both files on the image's affine
    img = nib.load(out / "imagesTr" / "synapse_0002.nii.gz")
    lab = nib.load(out / "labelsTr" / "synapse_0002.nii.gz")
    src_img = nib.load(src / "img" / "img0002.nii.gz")
    src_lab = np.asarray(nib.load(src / "label" / "label0002.nii.gz").dataobj)
    np.testing.assert_array_equal(np.asarray(img.dataobj), np.asarray(src_img.dataobj))
    np.testing.assert_allclose(img.affine, src_img.affine)
    np.testing.assert_allclose(lab.affine, img.affine)
    out_lab = np.asarray(lab.dataobj)
    for btcv, ours in ((6, 1), (1, 2), (2, 3), (3, 4)):
        np.testing.assert_array_equal(out_lab == ours, src_lab == btcv)
    assert set(np.unique(out_lab)) == {0, 1, 2, 3, 4}
    assert summary["label_mapping"]["6 liver"] == "1 liver" and summary["label_mapping"]["8 aorta"] == "0 background"
    # a second run into the same folder replaces it; a folder of something else is refused
    assert prepare("synapse", src, out)["patients"] == 3
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(PrepareError, match="not an empty folder"):
        prepare("synapse", src, tmp_path / "other")


def test_synapse_missing_label_is_named(tmp_path):
    src = write_synapse(tmp_path / "src")
    (src / "label" / "label0002.nii.gz").unlink()
    with pytest.raises(PrepareError, match=r"img0002\.nii\.gz: no label map label0002\.nii\.gz .*missing label"):
        prepare("synapse", src, tmp_path / "out")
    assert not (tmp_path / "out" / "prepare.json").exists()


def test_synapse_nan_voxels_are_named(tmp_path):
    """A NaN voxel also skipped the not-HU check (NaN >= 0 is false) and was written on."""
    src = write_synapse(tmp_path / "src", ids=("0001",))
    image = np.zeros(SHAPE, np.float32) - 500
    image[3, 3, 3] = np.nan
    write_nifti(image, affine_ras(origin=(10.0, -20.0, 30.0)), src / "img" / "img0001.nii.gz")
    with pytest.raises(PrepareError, match=r"img0001\.nii\.gz: 1 NaN or infinite voxel"):
        prepare("synapse", src, tmp_path / "out")


def test_synapse_unknown_label_value_and_layout(tmp_path):
    src = write_synapse(tmp_path / "src", ids=("0001",))
    lab = np.zeros(SHAPE, np.uint8)
    lab[2, 2, 2] = 14
    write_nifti(lab, affine_ras(origin=(10.0, -20.0, 30.0)), src / "label" / "label0001.nii.gz")
    with pytest.raises(PrepareError, match=r"label0001\.nii\.gz: unknown label value\(s\) \[14\]"):
        prepare("synapse", src, tmp_path / "out")
    with pytest.raises(PrepareError, match="expected the Synapse/BTCV layout"):
        prepare("synapse", tmp_path, tmp_path / "out2")


# ------------------------------------------------------------------------------------------------ CHAOS
def test_chaos_labels_land_on_the_dicom_pixel_grid(tmp_path):
    src = write_chaos(tmp_path / "Train_Sets")
    out = tmp_path / "chaos_prepared"
    summary = prepare("chaos_mr", src, out)
    assert summary["patients"] == 3 and [c["id"] for c in summary["cases"]] == ["1", "2", "10"]
    index = scan_folder(out)
    assert not index.rejected, index.rejected
    assert all(c.modality == "MR" and c.organs == {"liver": 1, "spleen": 2, "kidney_right": 3, "kidney_left": 4}
               for c in index.cases)
    for pid in ("1", "2", "10"):
        img = nib.load(out / "imagesTr" / f"chaos_mr_{pid}.nii.gz")
        lab = nib.load(out / "labelsTr" / f"chaos_mr_{pid}.nii.gz")
        np.testing.assert_array_equal(lab.affine, img.affine)
        data, labels = np.asarray(img.dataobj), np.asarray(lab.dataobj)
        assert labels.shape == data.shape == SHAPE
        spleen = np.argwhere(labels == 2)
        assert len(spleen) == 1, pid  # the lone marker pixel
        i, j, k = spleen[0]
        dcm = tmp_path / "Train_Sets" / "MR" / pid / "T2SPIR" / "DICOM_anon" / "IMG-0002-00003.dcm"  # InstanceNumber 3
        assert pydicom.dcmread(dcm).InstanceNumber == 3
        world = (img.affine @ np.array([i, j, k, 1.0]))[:3]
        np.testing.assert_allclose(world, dicom_pixel_world(dcm, 2, 13), atol=1e-3)
        assert data[i, j, k] == pydicom.dcmread(dcm).pixel_array[2, 13]  # the image voxel is that DICOM pixel
        # every slice: kidneys and liver at the PNG's rows/columns
        for kk in range(SHAPE[2]):
            assert (labels[1:5, 1:4, kk] == 1).all() and (labels[1:3, 8:11, kk] == 3).all()
            assert (labels[12:15, 8:11, kk] == 4).all()
    folds = json.loads((out / "folds.json").read_text())
    assert folds["order"] == ["1", "2", "10"] and not folds["exact"]
    assert folds["note"].endswith("; fold 0 has no test patient; fold 2 has no test patient")  # 3 patients, 5 folds
    assert sorted(p for f in folds["folds"] for p in f["test"]) == ["1", "10", "2"]


def test_chaos_a_missing_or_extra_file_is_named(tmp_path):
    """A review: a missing PNG, a copy of a DICOM file and a non-DICOM file under a slice's name were all told as
    "5 PNG file(s) for 6 DICOM slice(s)", naming the Ground folder only (and blaming it for a DICOM problem)."""
    import shutil

    src = write_chaos(tmp_path / "src")
    t2 = src / "MR" / "2" / "T2SPIR"
    (t2 / "Ground" / "IMG-0002-00004.png").unlink()
    with pytest.raises(PrepareError, match=r"MR/2/T2SPIR/Ground: the PNG numbers do not match .*no PNG numbered 4 "
                                           r"\(for IMG-0002-00004\.dcm\)"):
        prepare("chaos_mr", src, tmp_path / "out")
    assert not (tmp_path / "out").exists() and list(tmp_path.iterdir()) == [src]  # nothing written, no leftovers
    src = write_chaos(tmp_path / "src2")
    dcm = src / "MR" / "2" / "T2SPIR" / "DICOM_anon"
    shutil.copy(dcm / "IMG-0002-00001.dcm", dcm / "IMG-0002-00001 - Copy.dcm")
    with pytest.raises(PrepareError, match=r"IMG-0002-00001 - Copy\.dcm and IMG-0002-00001\.dcm both at"):
        prepare("chaos_mr", src, tmp_path / "out")
    (dcm / "IMG-0002-00001 - Copy.dcm").unlink()
    (dcm / "IMG-0002-00099.dcm").write_bytes(b"not a DICOM file")
    with pytest.raises(PrepareError, match=r"IMG-0002-00099\.dcm: not DICOM"):
        prepare("chaos_mr", src, tmp_path / "out")


def test_a_damaged_file_is_named_alone_and_an_output_inside_the_source_is_refused(tmp_path):
    """A review of prepare: a CHAOS file cut inside its header counted as a second series, unnamed; a truncated
    Synapse image was blamed on its label map too; an --out inside the CHAOS source was read as a patient's
    folder on the next run, which then failed."""
    src = write_chaos(tmp_path / "chaos")
    cut = src / "MR" / "2" / "T2SPIR" / "DICOM_anon" / "IMG-0002-00003.dcm"
    cut.write_bytes(cut.read_bytes()[:300])
    with pytest.raises(PrepareError) as e:
        prepare("chaos_mr", src, tmp_path / "out")
    assert "IMG-0002-00003.dcm" in str(e.value) and "2 series" not in str(e.value)
    syn = write_synapse(tmp_path / "synapse")
    image = syn / "img" / "img0002.nii.gz"
    image.write_bytes(image.read_bytes()[: image.stat().st_size // 2])
    with pytest.raises(PrepareError, match=r"img0002\.nii\.gz: cannot read") as e:
        prepare("synapse", syn, tmp_path / "out")
    assert "label0002" not in str(e.value)
    fresh = write_chaos(tmp_path / "chaos2")
    for inside in (fresh / "MR" / "prepared", fresh):
        with pytest.raises(PrepareError, match="lies inside the source folder"):
            prepare("chaos_mr", fresh, inside)
    assert not (fresh / "MR" / "prepared").exists()


def test_chaos_pngs_that_do_not_carry_the_slices_numbers_are_refused(tmp_path):
    """One PNG missing and a stray one added keeps the count: matched by rank, the labels landed on the wrong
    slices without a word (found by a review)."""
    src = write_chaos(tmp_path / "src")
    ground = src / "MR" / "2" / "T2SPIR" / "Ground"
    (ground / "IMG-0002-00002.png").rename(ground / "IMG-0002-00007.png")
    with pytest.raises(PrepareError, match=r"MR/2/T2SPIR/Ground: the PNG numbers do not match the DICOM slices .*"
                                           r"no PNG numbered 2 \(for IMG-0002-00002\.dcm\), and IMG-0002-00007\.png matches no slice"):
        prepare("chaos_mr", src, tmp_path / "out")
    (ground / "IMG-0002-00007.png").rename(ground / "ground.png")
    with pytest.raises(PrepareError, match=r"ground\.png: no slice number in the file name"):
        prepare("chaos_mr", src, tmp_path / "out")


def test_chaos_pngs_pair_with_the_dicom_file_of_their_own_number(tmp_path):
    """CHAOS names a slice's PNG as its DICOM file. With file numbers running against InstanceNumber, the k-th PNG
    was paired with the k-th slice by InstanceNumber: every label mirrored in z, without a word (a review)."""
    src = write_chaos(tmp_path / "src", ids=("1",))
    t2 = src / "MR" / "1" / "T2SPIR"
    z = SHAPE[2]
    for folder, suffix in ((t2 / "DICOM_anon", ".dcm"), (t2 / "Ground", ".png")):
        for k in range(1, z + 1):
            (folder / f"IMG-0002-{k:05d}{suffix}").rename(folder / f"tmp-{z + 1 - k:05d}{suffix}")
        for k in range(1, z + 1):
            (folder / f"tmp-{k:05d}{suffix}").rename(folder / f"IMG-0002-{k:05d}{suffix}")
    dcm = t2 / "DICOM_anon" / f"IMG-0002-{z + 1 - 3:05d}.dcm"  # its PNG holds the marker
    assert pydicom.dcmread(dcm).InstanceNumber == 3 and (np.asarray(Image.open(t2 / "Ground" / dcm.with_suffix(".png").name)) == 252).any()
    summary = prepare("chaos_mr", src, tmp_path / "out")
    img = nib.load(tmp_path / "out" / "labelsTr" / "chaos_mr_1.nii.gz")
    spleen = np.argwhere(np.asarray(img.dataobj) == 2)
    assert len(spleen) == 1
    world = (img.affine @ np.array([*spleen[0], 1.0]))[:3]
    np.testing.assert_allclose(world, dicom_pixel_world(dcm, 2, 13), atol=1e-3)
    warnings = [w for c in summary["cases"] for w in c["warnings"]]
    assert any("do not follow InstanceNumber" in w and "matched to the DICOM file of its own number" in w for w in warnings)


@pytest.mark.parametrize("shared", [0, 1])
def test_dicom_names_sharing_one_number_pair_by_rank_whatever_the_number(tmp_path, shared):
    """DICOM names without distinct numbers pair their PNGs by rank in InstanceNumber order (docs/recipes.md); names
    that shared the number 1 did, and names that shared 0 were refused with "no PNG numbered 0" (a review)."""
    src = write_chaos(tmp_path / "src", ids=("1",))
    dcm_dir = src / "MR" / "1" / "T2SPIR" / "DICOM_anon"
    by_instance = sorted(dcm_dir.iterdir(), key=lambda p: int(pydicom.dcmread(p).InstanceNumber))
    for k, p in enumerate(by_instance):
        p.rename(dcm_dir / f"slice{chr(ord('a') + k)}_{shared}.dcm")
    prepare("chaos_mr", src, tmp_path / "out")
    img = nib.load(tmp_path / "out" / "labelsTr" / "chaos_mr_1.nii.gz")
    spleen = np.argwhere(np.asarray(img.dataobj) == 2)  # the marker of the PNG numbered 3: the third by InstanceNumber
    assert len(spleen) == 1
    world = (img.affine @ np.array([*spleen[0], 1.0]))[:3]
    np.testing.assert_allclose(world, dicom_pixel_world(dcm_dir / f"slicec_{shared}.dcm", 2, 13), atol=1e-3)


def test_every_problem_is_reported_at_once(tmp_path):
    """Missing files were reported alone, before any file was read: a user found problems one rerun at a time."""
    src = write_synapse(tmp_path / "syn")
    (src / "label" / "label0002.nii.gz").unlink()
    lab = np.zeros(SHAPE, np.uint8)
    lab[2, 2, 2] = 14
    write_nifti(lab, affine_ras(origin=(10.0, -20.0, 30.0)), src / "label" / "label0001.nii.gz")
    with pytest.raises(PrepareError) as e:
        prepare("synapse", src, tmp_path / "out")
    assert "2 problem(s)" in str(e.value) and "no label map label0002" in str(e.value)
    assert "label0001.nii.gz: unknown label value(s) [14]" in str(e.value)
    src = write_chaos(tmp_path / "chaos", ids=("1", "2"))
    for p in (src / "MR" / "2" / "T2SPIR" / "Ground").iterdir():
        p.unlink()
    ground = src / "MR" / "1" / "T2SPIR" / "Ground"
    png = np.asarray(Image.open(ground / "IMG-0002-00002.png")).copy()
    png[5, 7] = 100
    Image.fromarray(png).save(ground / "IMG-0002-00002.png")
    with pytest.raises(PrepareError) as e:
        prepare("chaos_mr", src, tmp_path / "out")
    assert "2 problem(s)" in str(e.value) and "MR/2/T2SPIR/Ground: no ground-truth PNG files" in str(e.value)
    assert "IMG-0002-00002.png: unknown PNG intensity 100" in str(e.value)
    assert not (tmp_path / "out").exists()


def test_a_failed_run_leaves_the_earlier_output_intact(tmp_path):
    src = write_chaos(tmp_path / "src", ids=("1", "2"))
    out = tmp_path / "out"
    prepare("chaos_mr", src, out)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    (src / "MR" / "2" / "T2SPIR" / "Ground" / "IMG-0002-00001.png").unlink()
    with pytest.raises(PrepareError, match="1 problem"):
        prepare("chaos_mr", src, out)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]


def test_chaos_unknown_intensity_and_size_are_named(tmp_path):
    src = write_chaos(tmp_path / "src")
    ground = src / "MR" / "10" / "T2SPIR" / "Ground"
    png = np.asarray(Image.open(ground / "IMG-0002-00002.png")).copy()
    png[5, 7] = 100
    Image.fromarray(png).save(ground / "IMG-0002-00002.png")
    Image.fromarray(np.zeros((16, 12), np.uint8)).save(src / "MR" / "1" / "T2SPIR" / "Ground" / "IMG-0002-00001.png")
    with pytest.raises(PrepareError) as e:
        prepare("chaos_mr", src, tmp_path / "out")
    msg = str(e.value)
    assert "2 problem(s)" in msg
    assert "MR/10/T2SPIR/Ground/IMG-0002-00002.png: unknown PNG intensity 100 at row 5, column 7" in msg
    assert "MR/1/T2SPIR/Ground/IMG-0002-00001.png: PNG size 12x16 (columns x rows)" in msg


def test_chaos_missing_ground_truth_is_named(tmp_path):
    src = write_chaos(tmp_path / "src", ids=("1", "2"))
    for p in (src / "MR" / "2" / "T2SPIR" / "Ground").iterdir():
        p.unlink()
    with pytest.raises(PrepareError, match=r"MR/2/T2SPIR/Ground: no ground-truth PNG files \(missing label"):
        prepare("chaos_mr", src, tmp_path / "out")
    assert main(["chaos_mr", str(src), "--out", str(tmp_path / "out")]) == 1  # bad data: 1, as every command


# ------------------------------------------------------------------------------------------------ folds, configs
def test_ssl_alpnet_folds_are_its_contiguous_blocks():
    ct = [f"{i:04d}" for i in [*range(1, 11), *range(21, 41)]]  # the 30 BTCV training scans
    folds = ssl_alpnet_folds(ct, {p: p for p in ct}, expected=30)
    assert folds["exact"] and folds["separators"] == [0, 6, 12, 18, 24, 30]
    assert folds["folds"][0]["test"] == ct[:6] and folds["folds"][0]["support"] == "0007"
    assert folds["folds"][1]["test"] == ["0007", "0008", "0009", "0010", "0021", "0022"]
    assert folds["folds"][4]["support"] == "0001"  # circular: the last block's support is the first scan
    mr = ["1", "2", "3", "5", "8", "10", "13", "15", "19", "20", "21", "22", "31", "32", "33", "34", "36", "37", "38", "39"]
    folds = ssl_alpnet_folds(list(reversed(mr)), {p: p for p in mr}, expected=20)
    assert [f["test"] for f in folds["folds"]][1] == ["8", "10", "13", "15"] and folds["folds"][1]["support"] == "19"
    for f in folds["folds"]:
        assert sorted(f["test"] + f["train"] + [f["support"]], key=int) == mr


@pytest.mark.parametrize("name", ["synapse_ct_setting1", "synapse_ct_setting2", "chaos_mr_setting1", "chaos_mr_setting2"])
def test_benchmark_configs(name):
    args = yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())["data"]["init_args"]
    assert args["root"] == ("data/synapse_prepared" if name.startswith("synapse") else "data/chaos_mr_prepared")
    assert set(args["test_organs"]) <= set(ORGANS.values()) and set(args["val_organs"]) <= set(ORGANS.values())
    assert not set(args["val_organs"]) & set(args["test_organs"])
    assert args["exclude_test_organ_slices"] is name.endswith("setting2")
    assert args["protocol"] == "cross_organ" and args["n_shot"] == 1


# ------------------------------------------------------------------------------------------------ test folds
def test_the_datamodule_tests_on_one_fold_of_folds_json(tmp_path):
    """folds_file/test_fold: the test patients are the fold's test and support scans; none of them trains or
    validates; without them the split (and its digest) is the seeded one of before."""
    from datamodules.indexing.splits import make_split, read_fold
    from datamodules.segmentation import SegmentationDataModule

    ids = ("0001", "0002", "0003", "0004", "0005", "0010")
    out = tmp_path / "synapse_prepared"
    prepare("synapse", write_synapse(tmp_path / "src", ids=ids), out)
    folds = json.loads((out / "folds.json").read_text())["folds"]
    small = dict(root=str(out), cache_dir=str(tmp_path / "cache"), protocol="cross_organ",
                 test_organs=["kidney_left", "kidney_right"], val_organs=["spleen"], exclude_test_organ_slices=False,
                 val_fraction=0.25, test_fraction=0.34, n_shot=1, n_query=1, episodes_per_epoch=2, val_episodes=0,
                 test_episodes=2, batch_size=1, spacing=(1.0, 1.0), slice_size=(16, 16), min_organ_pixels=1,
                 augment=False, cache="none")
    seeded = SegmentationDataModule(**small)
    seeded.setup("fit")
    # the new arguments left None: the same split, digest and episode file as a config without them
    same = SegmentationDataModule(**small, folds_file=None, test_fold=None)
    same.setup("fit")
    assert same.split == seeded.split and same.split_digest() == seeded.split_digest()
    assert same.episode_path("test") == seeded.episode_path("test")
    digests = {seeded.split_digest()}
    for f in (0, 4):
        dm = SegmentationDataModule(**small, folds_file="folds.json", test_fold=f)  # found under root
        dm.setup("fit")
        by_image = {c.image: c.patient for c in dm.cases}
        fold_patients = {by_image[i] for i in folds[f]["test_images"] + [folds[f]["support_image"]]}
        assert dm.split.patients(dm.cases, "test") == fold_patients and len(fold_patients) == len(read_fold(out / "folds.json", f))
        rest = dm.split.patients(dm.cases, "train") | dm.split.patients(dm.cases, "val")
        assert not rest & fold_patients and rest | fold_patients == set(by_image.values())
        assert dm.split.val and (dm.split.test_organs, dm.split.val_organs) == (seeded.split.test_organs, ["spleen"])
        assert dm.episode_path("test") != seeded.episode_path("test")
        digests.add(dm.split_digest())
        assert make_split(dm.cases, "in_domain", test_images=read_fold(out / "folds.json", f)).patients(
            dm.cases, "test") == fold_patients
    assert len(digests) == 3  # each fold is its own split
    # validating on nothing, as SSL-ALPNet: the patients val_fraction holds out are named as unused (a review), and
    # with val_fraction 0 every patient outside the fold trains
    with pytest.warns(UserWarning, match=r"val_episodes is 0, and 1 patient\(s\) held out for validation \(val_fraction "
                                         r"0\.25\) are never used: set data\.init_args\.val_fraction 0"):
        SegmentationDataModule(**small, folds_file="folds.json", test_fold=0).setup("fit")
    every = SegmentationDataModule(**{**small, "val_fraction": 0.0, "val_organs": None, "val_organ_count": 0},
                                   folds_file="folds.json", test_fold=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        every.setup("fit")
    fold0 = {c.patient for c in every.cases if c.image in folds[0]["test_images"] + [folds[0]["support_image"]]}
    assert not every.split.val and every.split.patients(every.cases, "train") == {c.patient for c in every.cases} - fold0
    with pytest.raises(ValueError, match="go together"):
        SegmentationDataModule(**small, folds_file="folds.json")
    bad = out / "other_folds.json"
    bad.write_text(json.dumps({"folds": [{"fold": 0, "test_images": ["imagesTr/synapse_0099.nii.gz"]}]}))
    with pytest.raises(ValueError, match=r"synapse_0099\.nii\.gz"):
        SegmentationDataModule(**small, folds_file=str(bad), test_fold=0).setup("fit")


@pytest.mark.parametrize("name", ["synapse_ct_setting1", "synapse_ct_setting2", "chaos_mr_setting1", "chaos_mr_setting2"])
def test_benchmark_configs_offer_the_folds_unset(name):
    """The seeded split stays the default; the folds are one override away (docs/recipes.md)."""
    text = (CONFIGS / f"{name}.yaml").read_text()
    args = yaml.safe_load(text)["data"]["init_args"]
    assert args["folds_file"] is None and args["test_fold"] is None
    assert "--data.init_args.folds_file folds.json --data.init_args.test_fold 0" in text


def test_a_first_run_stopped_while_installing_does_not_block_the_next(tmp_path):
    """The marker prepare.json was written last: a first run stopped while moving its files in left them without
    it, and the next run refused the folder as not an earlier prepare output (a review)."""
    from datamodules.recipes import prepare as module

    src = write_synapse(tmp_path / "src")
    out = tmp_path / "out"
    # stopped at the second image moved into the output folder
    with interrupted_on_second_move(module.os, lambda b: b.parent == out / "imagesTr") as moved:
        with pytest.raises(KeyboardInterrupt):
            prepare("synapse", src, out)
    assert moved and json.loads((out / "prepare.json").read_text())["complete"] is False
    # the half-written folder is not trained on: the scanner indexed its files with organ names (a review)
    with pytest.raises(ValueError, match=r"prepare\.json: an interrupted `imaging-meta prepare` of 'synapse'"):
        scan_folder(out)
    summary = prepare("synapse", src, out)  # the rerun replaces the partial output
    assert summary["patients"] == 3 and "complete" not in json.loads((out / "prepare.json").read_text())
    assert len(scan_folder(out).cases) == 3
    assert sorted(p.name for p in (out / "imagesTr").iterdir()) == [f"synapse_{i}.nii.gz" for i in ("0001", "0002", "0010")]


def test_one_prepare_at_a_time_per_output_folder_and_no_staging_left(tmp_path):
    """Two runs into one --out deleted each other's staging folder and marker (a review); now the second is
    refused while the first holds the folder, and staging folders a killed run left are removed under the lock."""
    from datamodules.recipes.prepare import PrepareError, exclusive, staging_folder

    out = tmp_path / "prepared"
    (tmp_path / ".prepared.partial").mkdir()  # what a killed run of an earlier version left
    with exclusive(out):
        with pytest.raises(PrepareError, match=r"prepared: another prepare is writing this folder now"):
            with exclusive(out):
                pass
        with staging_folder(out) as staging:
            assert staging.is_dir() and staging.name.startswith(".prepared.") and staging.name.endswith(".partial")
            assert not (tmp_path / ".prepared.partial").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # the lock file and the staging folder are gone
    with exclusive(out):  # free again
        pass
    # a neighbour's staging folder (output `prepared.b`, its own lock) is not this output's to remove (a review)
    neighbour = tmp_path / "prepared.b"
    with exclusive(neighbour), staging_folder(neighbour) as theirs:
        with exclusive(out), staging_folder(out):
            assert theirs.is_dir()
    # a run that fails leaves no new empty folders above its output
    deep = tmp_path / "n1" / "n2" / "out"
    with pytest.raises(RuntimeError), exclusive(deep):
        raise RuntimeError("a bad source layout")
    assert not (tmp_path / "n1").exists()


def test_one_case_number_in_two_places_is_refused_naming_both(tmp_path):
    """img1 and img0001, img0002.nii beside img0002.nii.gz, MR/1 and MR/01 were two patients, or the .gz silently won
    (a review): a copy of one scan could sit in training and in test."""
    src = write_synapse(tmp_path / "syn", ids=("0001", "0002", "0003"))
    (src / "img" / "img1.nii.gz").write_bytes((src / "img" / "img0001.nii.gz").read_bytes())
    nib.save(nib.load(src / "img" / "img0002.nii.gz"), src / "img" / "img0002.nii")
    with pytest.raises(PrepareError) as e:
        prepare("synapse", src, tmp_path / "out")
    text = str(e.value)
    assert "img0001.nii.gz and " in text and "img1.nii.gz: one case number in 2 places" in text
    assert "img0002.nii and " in text and "img0002.nii.gz: one case number in 2 places" in text
    assert "label map without its image" not in text  # the labels of those cases are not called orphans
    assert not (tmp_path / "out").exists()

    chaos = write_chaos(tmp_path / "chaos", ids=("1", "01", "2"))
    with pytest.raises(PrepareError, match=r"MR/01 and .*MR/1: one case number in 2 places"):
        prepare("chaos_mr", chaos, tmp_path / "out_chaos")


def test_the_module_entry_point_ends_a_sigterm_as_an_exception_and_restores_the_handler(monkeypatch):
    """`python -m datamodules.recipes.prepare` died on SIGTERM without its cleanup (the staging folder and the lock
    beside --out stayed; a review): the signal now ends it through the context managers, with status 143."""
    import os
    import signal
    import time

    from datamodules.recipes import prepare as module

    seen = []

    def stopped_run(args):
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
        finally:
            seen.append("cleanup ran")
        return 0

    monkeypatch.setattr(module, "run", stopped_run)
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as e:
        module.main(["synapse", "src", "--out", "out"])
    assert e.value.code == 143 and seen == ["cleanup ran"]
    assert signal.getsignal(signal.SIGTERM) == before


# ------------------------------------------------------------------------------------------------ a mutation review
def test_a_second_run_without_a_patient_removes_that_patients_files(tmp_path):
    """A scan left out of the download the second time must not stay in the output, in no fold but indexed."""
    src = write_synapse(tmp_path / "src")
    out = tmp_path / "out"
    prepare("synapse", src, out)
    (src / "img" / "img0010.nii.gz").unlink()
    (src / "label" / "label0010.nii.gz").unlink()
    assert prepare("synapse", src, out)["patients"] == 2
    assert sorted(p.name for p in (out / "imagesTr").iterdir()) == ["synapse_0001.nii.gz", "synapse_0002.nii.gz"]
    assert sorted(p.name for p in (out / "labelsTr").iterdir()) == ["synapse_0001.nii.gz", "synapse_0002.nii.gz"]
    assert len(scan_folder(out).labelled_cases) == 2


def test_an_output_of_another_dataset_is_refused_and_kept(tmp_path):
    out = tmp_path / "out"
    prepare("synapse", write_synapse(tmp_path / "syn", ids=("0001",)), out)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(PrepareError, match=r"holds a prepared 'synapse' dataset, not 'chaos_mr'"):
        prepare("chaos_mr", write_chaos(tmp_path / "chaos", ids=("1",)), out)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_written_volumes_carry_the_affine_in_sform_and_qform(tmp_path):
    """ITK-based readers (ITK-SNAP, SimpleITK) read the qform: it must be the image's affine, not the identity."""
    src = write_synapse(tmp_path / "src", ids=("0001",))
    out = tmp_path / "out"
    prepare("synapse", src, out)
    expected = nib.load(src / "img" / "img0001.nii.gz").affine
    for sub in ("imagesTr", "labelsTr"):
        hdr = nib.load(out / sub / "synapse_0001.nii.gz").header
        qform, qcode = hdr.get_qform(coded=True)
        sform, scode = hdr.get_sform(coded=True)
        assert int(qcode) == 1 and int(scode) == 1
        np.testing.assert_allclose(qform, expected, atol=1e-5)
        np.testing.assert_allclose(sform, expected, atol=1e-5)


def test_a_label_stored_with_a_flipped_axis_lands_on_the_images_voxels(tmp_path):
    """The same grid written with its first axis reversed (another tool's orientation) is brought into the image's
    axis order, not copied array for array (which would swap left and right)."""
    src = write_synapse(tmp_path / "src", ids=("0001",))
    path = src / "label" / "label0001.nii.gz"
    lab = nib.load(path)
    data, affine = np.asarray(lab.dataobj), lab.affine
    flip = np.eye(4)
    flip[0, 0], flip[0, 3] = -1.0, SHAPE[0] - 1
    write_nifti(data[::-1].copy(), affine @ flip, path)
    prepare("synapse", src, tmp_path / "out")
    out_lab = np.asarray(nib.load(tmp_path / "out" / "labelsTr" / "synapse_0001.nii.gz").dataobj)
    for btcv, ours in ((6, 1), (1, 2), (2, 3), (3, 4)):
        np.testing.assert_array_equal(out_lab == ours, data == btcv)


def test_a_label_off_the_images_grid_is_named(tmp_path):
    src = write_synapse(tmp_path / "src", ids=("0001",))
    path = src / "label" / "label0001.nii.gz"
    write_nifti(np.asarray(nib.load(path).dataobj), affine_ras(origin=(40.0, -20.0, 30.0)), path)
    with pytest.raises(PrepareError, match=r"label0001\.nii\.gz: not on the voxel grid of img0001\.nii\.gz"):
        prepare("synapse", src, tmp_path / "out")


def test_chaos_grey_ranges_include_their_bounds_and_nothing_between():
    values = np.array([[0, 55, 70, 110, 135, 175, 200, 240, 255]])
    np.testing.assert_array_equal(chaos_png_labels(values, "gt.png"),
                                  [[0] + [ORGAN_VALUE[o] for o in ("liver", "liver", "kidney_right", "kidney_right",
                                                                   "kidney_left", "kidney_left", "spleen", "spleen")]])
    for outside in (54, 71, 109, 136, 174, 201, 239):
        with pytest.raises(PrepareError, match=rf"gt\.png: unknown PNG intensity {outside} "):
            chaos_png_labels(np.array([[outside]]), "gt.png")


def test_each_recipe_expects_its_published_number_of_patients():
    """The count decides whether folds.json is SSL-ALPNet's exact split: 30 BTCV training scans, 20 CHAOS MR."""
    assert DATASETS["synapse"].expected_patients == 30 and DATASETS["chaos_mr"].expected_patients == 20


@pytest.mark.parametrize("name", ["synapse_ct_setting1", "synapse_ct_setting2", "chaos_mr_setting1", "chaos_mr_setting2"])
def test_benchmark_configs_follow_ssl_alpnet(name):
    """The values the published table depends on: the kidneys tested, the spleen validating, the abdominal CT
    window -125..275 HU, 256 x 256 slices, SSL-ALPNet's 3 chunks."""
    args = yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())["data"]["init_args"]
    assert sorted(args["test_organs"]) == ["kidney_left", "kidney_right"] and args["val_organs"] == ["spleen"]
    assert args["slice_size"] == [256, 256] and args["n_parts"] == 3
    if name.startswith("synapse"):
        assert args["ct_window"] == [-125.0, 275.0]
