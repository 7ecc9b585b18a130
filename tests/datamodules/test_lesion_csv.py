"""The lesion-CSV input format: world-space patches on the demo cohort and on synthetic volumes, bad input."""

import csv
import os
import re
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from datamodules.sources.items import ItemTable
from datamodules.sources.lesion_csv import LesionCSV, extract_patches, lesion_patches
from datamodules.synthetic.demo import write_nifti

LPS = np.array([-1.0, -1.0, 1.0])
BLOB = np.array([12.0, -20.0, 31.0])  # RAS mm


# ------------------------------------------------------------------------------------------ demo cohort
HIGH_CONTRAST = ("cyst", "calcification", "lipoma")


@pytest.fixture(scope="module")
def demo_table(demo_root, tmp_path_factory):
    """The demo's lesion table restricted to a few volumes (one per site, plus one per high-contrast class), read
    from a CSV in another folder with ``root`` pointing at the cohort."""
    with open(demo_root / "lesions.csv", newline="") as f:
        reader = csv.DictReader(f)
        columns, rows = reader.fieldnames, list(reader)
    images = {next(r["image"] for r in rows if r["image"].startswith(site))
              for site in ("ct_northfield", "ct_harbor", "mr_bids", "mr_decathlon")}
    images |= {next(r["image"] for r in rows if r["class"] == c and float(r["size_mm"]) >= 8) for c in HIGH_CONTRAST}
    subset = [r for r in rows if r["image"] in images]
    path = write_rows(tmp_path_factory.mktemp("lesions") / "subset.csv", subset, columns)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # MONAI's optional-codec notices, single-lesion classes
        table = LesionCSV(csv=str(path), root=str(demo_root)).build()
    return subset, table


def test_demo_lesions_become_2d_patches(demo_table):
    rows, t = demo_table
    assert isinstance(t, ItemTable) and len(t) == len(rows)
    assert t.images.shape == (len(rows), 1, 32, 32) and t.images.dtype == torch.float32
    assert torch.isfinite(t.images).all() and t.images.min() >= 0 and t.images.max() <= 1 + 1e-5
    assert t.classes == sorted({r["class"] for r in rows})
    assert [t.classes[k] for k in t.labels] == [r["class"] for r in rows]
    assert len(set(t.patients)) == len({r["image"] for r in rows}) and len(set(t.sites)) == 4
    assert all(re.fullmatch(r"p-[0-9a-f]{12}", p) for p in t.patients)
    assert all(re.fullmatch(r"c-[0-9a-f]{12}#\d+", i) for i in t.item_ids) and len(set(t.item_ids)) == len(t)
    assert [int(i.split("#")[1]) for i in t.item_ids] == list(range(2, len(rows) + 2))  # CSV line numbers
    assert not any("DEMO" in s or "MRN" in s or "Northfield" in s for s in t.patients + t.sites + t.item_ids)
    assert t.source["format"] == "lesion_csv" and t.source["patch_size"] == [32, 32]


def test_demo_lesions_are_visible_at_the_patch_centre(demo_root, demo_table):
    """High-contrast lesions: the patch centre differs from the organ's mean intensity in the same volume."""
    rows, t = demo_table
    diffs = {}
    for k, r in enumerate(rows):
        if r["class"] in HIGH_CONTRAST and float(r["size_mm"]) >= 8:
            centre = t.images[k, 0, 15:17, 15:17].mean()
            diffs.setdefault(r["class"], []).append(abs(float(centre) - _organ_mean(demo_root, r)))
    assert set(diffs) == set(HIGH_CONTRAST)
    for cls, d in diffs.items():
        assert np.median(d) > 0.15, (cls, d)


_ORGAN_CACHE: dict[str, tuple] = {}


def _organ_mean(root: Path, row: dict) -> float:
    """Mean of the organ's voxels in the preprocessed volume (the intensities the patches are sampled from)."""
    from datamodules.sources.lesion_csv import load_volume
    from datamodules.synthetic.demo import ORGANS

    image = row["image"]
    if image not in _ORGAN_CACHE:
        if image.endswith(("/CT", "/series")):
            label = root / f"{image}_label.nii.gz"
        elif image.startswith("mr_bids"):
            label = root / image.replace("_T1w.nii.gz", "_T1w_dseg.nii.gz")
        else:
            label = root / image.replace("imagesTr", "labelsTr")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            vol = load_volume(root / image, "CT" if image.startswith("ct_") else "MR")
        lab = np.asarray(nib.as_closest_canonical(nib.load(label)).dataobj)
        _ORGAN_CACHE[image] = (vol[0].numpy(), lab)
    vol, lab = _ORGAN_CACHE[image]
    value = {n: v for v, n in ORGANS.items()}[row["organ"]]
    return float(vol[lab == value].mean())


# ------------------------------------------------------------------------------- synthetic geometry
def blob_volume(path: Path, affine: np.ndarray, shape=(40, 36, 18), centre=BLOB, sigma=3.0) -> Path:
    """A smooth background and a bright Gaussian blob at ``centre`` (RAS mm)."""
    ijk = np.indices(shape).reshape(3, -1).astype(float)
    world = (affine[:3, :3] @ ijk + affine[:3, 3:4]).T
    d2 = ((world - centre) ** 2).sum(1)
    data = 100.0 + 0.2 * world[:, 2] + 1000.0 * np.exp(-d2 / (2 * sigma**2))
    return write_nifti(data.reshape(shape).astype(np.float32), affine, path)


def affines() -> dict[str, np.ndarray]:
    ras = np.diag([2.0, 2.0, 3.0, 1.0])
    ras[:3, 3] = [-30.0, -60.0, 5.0]
    lps = np.diag([-2.0, -2.0, 3.0, 1.0])  # the flipped axes of DICOM-derived NIfTI
    lps[:3, 3] = [50.0, 20.0, 5.0]
    permuted = np.zeros((4, 4))  # voxel axes (z, x, y), one of them flipped
    permuted[2, 0], permuted[0, 1], permuted[1, 2], permuted[3, 3] = 3.0, -2.0, 2.0, 1.0
    permuted[:3, 3] = [40.0, -40.0, 0.0]
    return {"ras": ras, "lps_flipped": lps, "permuted": permuted}


def write_rows(path: Path, rows: list[dict], columns=("image", "class", "x", "y", "z")) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    return path


def centre_row(image: str, cls: str, ras: np.ndarray, coordinates: str) -> dict:
    xyz = ras * LPS if coordinates == "LPS" else ras
    return {"image": image, "class": cls, "x": f"{xyz[0]:.3f}", "y": f"{xyz[1]:.3f}", "z": f"{xyz[2]:.3f}"}


def peak(p: torch.Tensor) -> np.ndarray:
    """Intensity-weighted centre (pixel units) of the bright part of a patch."""
    w = (p - p.min()).clamp(min=0) ** 4
    idx = np.indices(p.shape).reshape(p.ndim, -1)
    return (idx * w.reshape(-1).numpy()).sum(1) / float(w.sum())


@pytest.mark.parametrize("coordinates", ["LPS", "RAS"])
@pytest.mark.parametrize("kind", ["ras", "lps_flipped", "permuted"])
def test_patch_is_centred_on_the_world_point(tmp_path, coordinates, kind):
    blob_volume(tmp_path / "vol.nii.gz", affines()[kind])
    shift = np.array([6.0, 0.0, 0.0])  # 6 mm towards the patient's right -> the blob 4 px up along H
    rows = [centre_row("vol.nii.gz", "blob", BLOB, coordinates), centre_row("vol.nii.gz", "shifted", BLOB + shift, coordinates),
            centre_row("vol.nii.gz", "shifted_a", BLOB + [0.0, 3.0, 0.0], coordinates)]
    src = LesionCSV(csv=str(write_rows(tmp_path / "l.csv", rows)), patch_size=[33, 33], coordinates=coordinates,
                    mr_percentiles=[0, 100])
    with pytest.warns(UserWarning, match="single lesion"):
        t = src.build()
    by = {t.classes[k]: t.images[i, 0] for i, k in enumerate(t.labels)}
    assert t.images.shape == (3, 1, 33, 33)
    np.testing.assert_allclose(peak(by["blob"]), [16, 16], atol=0.15)
    assert by["blob"].argmax() == 16 * 33 + 16
    np.testing.assert_allclose(peak(by["shifted"]), [12, 16], atol=0.15)  # H grows along RAS +x
    np.testing.assert_allclose(peak(by["shifted_a"]), [16, 14], atol=0.15)  # W grows along RAS +y


def test_3d_patches(tmp_path):
    blob_volume(tmp_path / "vol.nii.gz", affines()["lps_flipped"])
    rows = [centre_row("vol.nii.gz", "blob", BLOB, "RAS"), centre_row("vol.nii.gz", "blob", BLOB + [0, 0, 6.0], "RAS")]
    t = LesionCSV(csv=str(write_rows(tmp_path / "l.csv", rows)), patch_size=[9, 17, 17], coordinates="RAS",
                  mr_percentiles=[0, 100]).build()
    assert t.images.shape == (2, 1, 9, 17, 17) and t.source["patch_spacing"] == [3.0, 1.5, 1.5]
    np.testing.assert_allclose(peak(t.images[0, 0]), [4, 8, 8], atol=0.15)
    np.testing.assert_allclose(peak(t.images[1, 0]), [2, 8, 8], atol=0.15)  # 6 mm superior = 2 slices of 3 mm


def test_patch_geometry_does_not_depend_on_the_voxel_grid(tmp_path):
    """The same physical blob sampled from a coarse flipped grid and a fine grid gives nearly the same patch."""
    fine = np.diag([1.0, 1.0, 1.5, 1.0])
    fine[:3, 3] = [-20.0, -50.0, 10.0]
    coarse = affines()["lps_flipped"]
    patches = []
    for name, aff, shape in (("fine.nii.gz", fine, (64, 60, 30)), ("coarse.nii.gz", coarse, (40, 36, 18))):
        blob_volume(tmp_path / name, aff, shape=shape, sigma=5.0)
        vol = nib.load(tmp_path / name)
        data = torch.from_numpy(np.asarray(vol.dataobj, dtype=np.float32))[None]
        patches.append(extract_patches(data, vol.affine, BLOB[None], [24, 24], [1.0, 1.0])[0, 0])
    assert patches[0].max() > 900
    assert (patches[0] - patches[1]).abs().max() < 0.08 * patches[0].max()


def test_lesion_patches_helper_matches_build(tmp_path):
    blob_volume(tmp_path / "vol.nii.gz", affines()["ras"])
    rows = [centre_row("vol.nii.gz", "a", BLOB, "LPS"), centre_row("vol.nii.gz", "a", BLOB + 4.0, "LPS")]
    t = LesionCSV(csv=str(write_rows(tmp_path / "l.csv", rows))).build()
    direct = lesion_patches(tmp_path / "vol.nii.gz", np.array([BLOB * LPS, (BLOB + 4.0) * LPS]), modality="unknown")
    assert direct.shape == (2, 1, 32, 32)
    torch.testing.assert_close(direct, t.images)


def test_box_columns_overrides_and_cache(tmp_path):
    blob_volume(tmp_path / "vol.nii.gz", affines()["ras"])
    lo, hi = (BLOB - 5.0) * LPS, (BLOB + 5.0) * LPS
    lo, hi = np.minimum(lo, hi), np.maximum(lo, hi)
    cols = ("image", "class", "x_min", "y_min", "z_min", "x_max", "y_max", "z_max", "patient", "site", "size_mm")
    row = dict(image="vol.nii.gz", **{"class": "a"}, x_min=lo[0], y_min=lo[1], z_min=lo[2], x_max=hi[0], y_max=hi[1],
               z_max=hi[2], patient="Doe^John", site="site-7", size_mm="10")
    write_rows(tmp_path / "l.csv", [row, {**row, "x_min": lo[0] - 2}], cols)
    src = LesionCSV(csv=str(tmp_path / "l.csv"), patch_size=[33, 33], mr_percentiles=[0, 100])
    t = src.load(cache_dir=tmp_path / "cache")
    np.testing.assert_allclose(peak(t.images[0, 0]), [16, 16], atol=0.15)  # the box centre
    assert t.patients[0].startswith("p-") and "Doe" not in t.patients[0]
    assert t.patients[1] == t.patients[0] and t.sites == ["site-7", "site-7"]
    assert src.files() == [tmp_path / "l.csv", tmp_path / "vol.nii.gz"]  # the volumes stamp the cache too
    again = LesionCSV(csv=str(tmp_path / "l.csv"), patch_size=[33, 33], mr_percentiles=[0, 100]).load(tmp_path / "cache")
    torch.testing.assert_close(again.images, t.images)
    assert len(list((tmp_path / "cache").iterdir())) == 1  # the second load came from the cache
    assert LesionCSV(csv=str(tmp_path / "l.csv"), salt="other").cache_key() != src.cache_key()


def test_a_volume_edited_in_place_is_cut_again_not_read_from_the_cache(tmp_path):
    """A review: the cache key stamped the CSV only, so patches of a replaced volume were read from the cache."""
    blob_volume(tmp_path / "vol.nii.gz", affines()["ras"])
    write_rows(tmp_path / "l.csv", [centre_row("vol.nii.gz", "a", BLOB, "LPS"), centre_row("vol.nii.gz", "b", BLOB + 3, "LPS")])
    before = LesionCSV(csv=str(tmp_path / "l.csv"), patch_size=[9, 9]).load(tmp_path / "cache")
    first = list((tmp_path / "cache").iterdir())
    blob_volume(tmp_path / "vol.nii.gz", affines()["lps_flipped"])  # another volume under the same name
    st = (tmp_path / "vol.nii.gz").stat()
    os.utime(tmp_path / "vol.nii.gz", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    after = LesionCSV(csv=str(tmp_path / "l.csv"), patch_size=[9, 9]).load(tmp_path / "cache")
    now = list((tmp_path / "cache").iterdir())
    assert len(now) == 2 and set(first) < set(now)  # cut again, into a new cache file
    assert not torch.equal(before.images, after.images)


@pytest.mark.parametrize("rows, match", [
    # one image, two patients (a blank cell against a filled one too): its lesions could be support and query; the
    # patient values are identifiers, named by their lines only (a review, 2026-12-07: the raw ids were quoted)
    ([("vol.nii.gz", "a", 0.0, "P1", ""), ("vol.nii.gz", "b", 3.0, "", "")],
     r"image 'vol\.nii\.gz' has several patients \('value 1' on line\(s\) 2; 'blank' on line\(s\) 3\)"),
    ([("vol.nii.gz", "a", 0.0, "", "s1"), ("vol.nii.gz", "b", 3.0, "", "s2")], r"has several sites"),
    # one centre, two classes
    ([("vol.nii.gz", "a", 0.0, "", ""), ("vol.nii.gz", "b", 0.0, "", "")],
     r"line 3 labels the centre .* 'b', line 2 labels it 'a'; one lesion has one class"),
])
def test_rows_that_contradict_each_other_are_refused_naming_the_lines(tmp_path, rows, match):
    blob_volume(tmp_path / "vol.nii.gz", affines()["ras"])
    cols = ("image", "class", "x", "y", "z", "patient", "site")
    out = []
    for image, cls, shift, patient, site in rows:
        c = centre_row(image, cls, BLOB + shift, "LPS")
        out.append({**c, "patient": patient, "site": site})
    write_rows(tmp_path / "l.csv", out, cols)
    with pytest.raises(ValueError, match=match):
        LesionCSV(csv=str(tmp_path / "l.csv"), patch_size=[9, 9]).build()


# ------------------------------------------------------------------------------------------ bad input
@pytest.fixture
def folder(tmp_path):
    blob_volume(tmp_path / "a.nii.gz", affines()["ras"])
    blob_volume(tmp_path / "b.nii.gz", affines()["lps_flipped"])
    write_nifti(np.full((8, 8, 8), 5.0, np.float32), np.eye(4), tmp_path / "flat.nii.gz")  # the scan rejects it
    return tmp_path


def good_rows() -> list[dict]:
    return [centre_row("a.nii.gz", "cyst", BLOB, "LPS"), centre_row("b.nii.gz", "cyst", BLOB, "LPS"),
            centre_row("a.nii.gz", "metastasis", BLOB + 3, "LPS"), centre_row("b.nii.gz", "metastasis", BLOB + 3, "LPS")]


@pytest.mark.parametrize(
    "change, line, match",
    [
        (lambda rows: rows, 1, "missing column.*class"),  # written without the class column
        (lambda rows: rows.__setitem__(2, {**rows[2], "image": "nope.nii.gz"}) or rows, 4, "nope.nii.gz.*does not exist"),
        (lambda rows: rows.__setitem__(1, {**rows[1], "image": "flat.nii.gz"}) or rows, 3, "rejected by the scan: constant image"),
        (lambda rows: rows.__setitem__(3, {**rows[3], "x": "900"}) or rows, 5, "outside image 'b.nii.gz'"),
        (lambda rows: rows.__setitem__(0, {**rows[0], "y": "nan"}) or rows, 2, "y is nan"),
        (lambda rows: rows.__setitem__(1, {**rows[1], "z": "12,5mm"}) or rows, 3, "not a number"),
        (lambda rows: rows.__setitem__(1, {**rows[1], "z": ""}) or rows, 3, "missing coordinate"),
        (lambda rows: rows.__setitem__(2, {**rows[2], "class": " "}) or rows, 4, "empty class"),
    ],
    ids=["missing_column", "unknown_image", "rejected_image", "outside", "nan", "not_a_number", "empty_coordinate",
         "empty_class"],
)
def test_bad_rows_name_the_line_and_the_file(folder, change, line, match):
    rows = change(good_rows())
    cols = ("image", "x", "y", "z") if line == 1 else ("image", "class", "x", "y", "z")
    path = write_rows(folder / "lesions.csv", rows, cols)
    with pytest.raises(ValueError, match=match) as info:
        LesionCSV(csv=str(path)).build()
    assert f"line {line}" in str(info.value) and str(path) in str(info.value)


def test_unknown_image_lists_what_the_scan_rejected(folder):
    rows = good_rows()
    rows[0]["image"] = "missing/scan.nii.gz"
    # the lesion table itself is accounted for by the scan, not rejected: the constant image is the one rejection
    with pytest.raises(ValueError, match=r"rejected 1 input\(s\): flat.nii.gz: constant image"):
        LesionCSV(csv=str(write_rows(folder / "lesions.csv", rows))).build()


def test_a_cache_folder_inside_root_is_not_scanned(folder):
    """A review: the datamodule's cache folder inside the table's root was scanned with it, and each cached table
    and episode file was opened and listed among the rejections that an unknown image's error names."""
    from datamodules.classification import ClassificationDataModule

    rows = [centre_row(f"{v}.nii.gz", c, BLOB + 6 * i + k, "LPS") for i, c in enumerate(("cyst", "metastasis"))
            for k in (0, 3) for v in ("a", "b")]
    path = write_rows(folder / "lesions.csv", rows)
    dm = ClassificationDataModule(source=LesionCSV(csv=str(path)), cache_dir=str(folder / "cache"), n_way=2,
                                  n_query=1, val_classes_count=0, test_classes_count=0, val_episodes=0, test_episodes=0)
    dm.prepare_data()
    assert any((folder / "cache").rglob("*.pt"))  # the cache is inside the table's root now
    rows[0]["image"] = "missing/scan.nii.gz"
    write_rows(path, rows)
    again = ClassificationDataModule(source=LesionCSV(csv=str(path)), cache_dir=str(folder / "cache"), n_way=2)
    with pytest.raises(ValueError, match=r"rejected 1 input\(s\): flat.nii.gz: constant image [^\n]*$"):
        again.prepare_data()


def test_duplicates_and_single_lesion_classes_warn(folder):
    rows = good_rows() + [good_rows()[1], centre_row("a.nii.gz", "lonely", BLOB - 3, "LPS")]
    path = write_rows(folder / "lesions.csv", rows)
    with pytest.warns(UserWarning) as record:
        t = LesionCSV(csv=str(path)).build()
    text = " ".join(str(w.message) for w in record)
    assert "duplicate" in text and "line 6" in text and "line 3" in text
    assert "single lesion" in text and "'lonely' (line 7)" in text
    assert len(t) == 5 and t.source["rejected"] == [{"line": 6, "reason": "duplicate of line 3 (same image, class and centre)"}]


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(patch_size=[32]), "patch_size"),
        (dict(patch_size=[32, 32], patch_spacing=[1.0]), "patch_spacing"),
        (dict(coordinates="XYZ"), "coordinates"),
        (dict(ct_window=[100, -100]), "ct_window"),
        (dict(mr_percentiles=[99, 1]), "mr_percentiles"),
    ],
)
def test_bad_settings(tmp_path, kw, match):
    with pytest.raises(ValueError, match=match):
        LesionCSV(csv=str(tmp_path / "l.csv"), **kw)


def test_missing_csv(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        LesionCSV(csv=str(tmp_path / "none.csv")).build()


def test_one_dicom_series_written_two_ways_under_two_patients_is_refused(tmp_path):
    """The same series as its folder (patient given) and as one of its files (patient blank) was two patients:
    the rows were checked by the path as written, not by the scan (a review)."""
    from tests.datamodules.dicom_fixtures import header, write_series

    files = write_series(tmp_path / "pat01" / "CT", seed=0, hdr=header(PatientID="A1"))
    write_series(tmp_path / "pat02" / "CT", seed=1, hdr=header(PatientID="B2"))
    one = files[0].relative_to(tmp_path).as_posix()
    (tmp_path / "lesions.csv").write_text("\n".join([
        "image,class,x,y,z,patient", "pat01/CT,cyst,1,-26,39,A1-research", "pat01/CT,cyst,2,-25,39,A1-research",
        f"{one},hcc,1,-26,36,", f"{one},hcc,0,-24,36,", "pat02/CT,cyst,1,-26,39,", "pat02/CT,hcc,2,-25,36,"]) + "\n")
    with pytest.raises(ValueError, match=re.escape(f"image 'pat01/CT (also written {one})' has several patients")):
        LesionCSV(csv=str(tmp_path / "lesions.csv"), coordinates="RAS").build()
    # one lesion written both ways (same class and centre) is one item, not two identical ones
    (tmp_path / "lesions.csv").write_text("\n".join([
        "image,class,x,y,z,patient", "pat01/CT,cyst,1,-26,39,A1", f"{one},cyst,1,-26,39,A1", "pat01/CT,hcc,0,-24,36,A1",
        "pat02/CT,cyst,1,-26,39,B2", "pat02/CT,hcc,2,-25,36,B2"]) + "\n")
    with pytest.warns(UserWarning, match="1 duplicate row\\(s\\) dropped: line 3 \\(duplicate of line 2"):
        table = LesionCSV(csv=str(tmp_path / "lesions.csv"), coordinates="RAS").build()
    assert len(table.labels) == 4


def test_volumes_that_name_no_patient_are_warned_about(tmp_path):
    """Two phases of one patient in a folder that is not 'sub-<id>', no 'patient' column: each volume is its own
    patient, which the segmentation data and the image folder warned about and the lesion CSV did not (a review)."""
    rng = np.random.default_rng(0)
    rows = []
    for pat in ("pat01", "pat02"):
        for phase in ("arterial", "venous"):
            write_nifti((rng.random((40, 40, 20)) * 200 - 100).astype(np.float32), np.diag([1.0, 1.0, 2.0, 1.0]),
                        tmp_path / pat / f"{phase}.nii.gz")
            rows += [{"image": f"{pat}/{phase}.nii.gz", "class": c, "x": x, "y": 20, "z": 10}
                     for c, x in (("cyst", 10), ("hcc", 25))]
    csv_path = write_rows(tmp_path / "lesions.csv", rows)
    with pytest.warns(UserWarning, match=r"4 image\(s\) without a 'patient' in the CSV name no patient .*fill the CSV"):
        LesionCSV(csv=str(csv_path), coordinates="RAS").build()
    named = write_rows(tmp_path / "named.csv", [{**r, "patient": r["image"].split("/")[0]} for r in rows],
                       columns=("image", "class", "x", "y", "z", "patient"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every row names its patient: no warning
        table = LesionCSV(csv=str(named), coordinates="RAS", modality="MR").build()
    assert len(set(table.patients)) == 2


def test_a_folder_of_two_dicom_series_is_refused_not_read_as_either(tmp_path):
    """A review: a row naming a folder that holds two series took whichever the scan listed first, so renaming
    the files changed which volume the lesions were cut from, without a word."""
    from tests.datamodules.dicom_fixtures import header, write_series

    (tmp_path / "study").mkdir()
    for prefix, seed in (("A_", 0), ("B_", 1)):  # two series of one patient, exported into one folder
        for f in write_series(tmp_path / f"tmp{seed}", seed=seed, hdr=header(PatientID="A1")):
            f.rename(tmp_path / "study" / (prefix + f.name))
    (tmp_path / "lesions.csv").write_text("image,class,x,y,z\nstudy,cyst,1,-26,39\nstudy,hcc,2,-25,36\n")
    with pytest.raises(ValueError, match=r"line 2: image 'study' is a folder that holds 2 DICOM series; name the "
                                         r"lesion's series by one of its files"):
        LesionCSV(csv=str(tmp_path / "lesions.csv"), coordinates="RAS").build()


def test_the_cache_is_keyed_by_every_slice_of_a_series_and_by_sidecars(tmp_path):
    """A review: a row naming one slice stamped only that slice, and a NIfTI file's BIDS sidecar (which sets the
    modality and the site) was not stamped at all, so edits to either were read from a stale cache."""
    import json

    from tests.datamodules.dicom_fixtures import header, write_series

    files = write_series(tmp_path / "pat01" / "CT", seed=0, hdr=header(PatientID="A1"))
    blob_volume(tmp_path / "mr" / "vol.nii.gz", affines()["ras"])
    sidecar = tmp_path / "mr" / "vol.json"
    sidecar.write_text(json.dumps({"Modality": "MR", "Manufacturer": "Siemens"}))
    (tmp_path / "dataset.json").write_text(json.dumps({"name": "x", "modality": {"0": "MR"}}))
    one = files[0].relative_to(tmp_path).as_posix()
    rows = [{"image": one, "class": "cyst", "x": 1, "y": -26, "z": 39}, {"image": one, "class": "hcc", "x": 2, "y": -25, "z": 36},
            centre_row("mr/vol.nii.gz", "cyst", BLOB, "RAS"), centre_row("mr/vol.nii.gz", "hcc", BLOB + 3, "RAS")]
    write_rows(tmp_path / "lesions.csv", rows)
    src = LesionCSV(csv=str(tmp_path / "lesions.csv"), coordinates="RAS", patch_size=[9, 9])
    listed = src.files()
    stamped = set(listed)
    assert set(files) <= stamped and {sidecar, tmp_path / "dataset.json"} <= stamped
    assert len(listed) == len(stamped)  # each slice once, however many rows name the series' slices
    before = src.load(tmp_path / "cache")
    sidecar.write_text(json.dumps({"Modality": "MR", "Manufacturer": "GE"}))
    st = sidecar.stat()
    os.utime(sidecar, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    after = LesionCSV(csv=str(tmp_path / "lesions.csv"), coordinates="RAS", patch_size=[9, 9]).load(tmp_path / "cache")
    assert before.sites[2] != after.sites[2] and before.sites[0] == after.sites[0]  # cut again, with the new site


def test_the_cache_is_keyed_by_the_files_of_a_named_folder_inside_linked_folders_too(tmp_path):
    """A row naming a series' folder stamped the folder's files with ``rglob``, which does not enter a linked
    folder, though the scan reads the slices there: an edit to one of them was read from a stale cache."""
    from tests.datamodules.dicom_fixtures import header, write_series

    files = write_series(tmp_path / "elsewhere" / "part", seed=0, hdr=header(PatientID="A1"))
    (tmp_path / "pat01").mkdir()
    (tmp_path / "pat01" / "part").symlink_to(tmp_path / "elsewhere" / "part", target_is_directory=True)
    write_rows(tmp_path / "lesions.csv", [{"image": "pat01", "class": "cyst", "x": 1, "y": -26, "z": 39}])
    listed = LesionCSV(csv=str(tmp_path / "lesions.csv"), root=str(tmp_path)).files()
    assert {tmp_path / "pat01" / "part" / f.name for f in files} <= set(listed)


def test_the_cache_is_keyed_by_the_sidecars_an_image_inherits(tmp_path):
    """A review: the scan reads a BIDS image's modality and site from a sidecar higher up (``T1w.json`` at the
    root), but the cache stamped only the image's own sidecar, so editing the inherited one reused the old patches,
    with the old site and intensity scaling."""
    import json

    image = tmp_path / "sub-01" / "anat" / "sub-01_T1w.nii.gz"
    blob_volume(image, affines()["ras"])
    top = tmp_path / "T1w.json"
    top.write_text(json.dumps({"Modality": "MR", "Manufacturer": "Siemens"}))
    image_rel = image.relative_to(tmp_path).as_posix()
    write_rows(tmp_path / "lesions.csv", [centre_row(image_rel, "cyst", BLOB, "RAS"), centre_row(image_rel, "hcc", BLOB + 3, "RAS")])
    src = LesionCSV(csv=str(tmp_path / "lesions.csv"), coordinates="RAS", patch_size=[9, 9])
    assert top in src.files()
    before = src.load(tmp_path / "cache")
    top.write_text(json.dumps({"Modality": "MR", "Manufacturer": "GE"}))
    st = top.stat()
    os.utime(top, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    after = LesionCSV(csv=str(tmp_path / "lesions.csv"), coordinates="RAS", patch_size=[9, 9]).load(tmp_path / "cache")
    assert before.sites[0] != after.sites[0]  # cut again, with the new site


def test_a_csv_not_in_utf8_and_an_image_outside_root_are_named_with_the_fix(tmp_path):
    """A review: a Latin-1 table ended with a bare codec error, and an absolute path outside root was called
    'not an image the scan indexed (a support file?)'."""
    blob_volume(tmp_path / "vol.nii.gz", affines()["ras"])
    (tmp_path / "latin.csv").write_bytes("image,class,x,y,z\nvol.nii.gz,h\xe9matome,0,0,0\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin\.csv: line 2 is not UTF-8 text .*save the lesion table as UTF-8"):
        LesionCSV(csv=str(tmp_path / "latin.csv")).build()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    write_rows(elsewhere / "l.csv", [centre_row(str(tmp_path / "vol.nii.gz"), c, BLOB + s, "LPS")
                                     for c, s in (("a", 0), ("b", 3))])
    with pytest.raises(ValueError, match=r"vol\.nii\.gz' lies outside root .*elsewhere, and only images under root "
                                         r"are scanned"):
        LesionCSV(csv=str(elsewhere / "l.csv")).build()


def test_an_image_beside_the_csvs_folder_is_outside_root_and_a_linked_image_under_root_is_under_it(tmp_path):
    """A review (2026-12-07): '../scans/a.nii.gz' from a CSV in a sibling folder was called "not an image the scan
    indexed (a support file?)" instead of outside root; an absolute path to an image under root that is a symbolic
    link to a file elsewhere was refused as outside root, where its relative path was read."""
    (tmp_path / "scans").mkdir()
    (tmp_path / "tables").mkdir()
    blob_volume(tmp_path / "scans" / "a.nii.gz", affines()["ras"])
    write_rows(tmp_path / "tables" / "l.csv", [centre_row("../scans/a.nii.gz", c, BLOB + sh, "LPS")
                                               for c, sh in (("a", 0), ("b", 3))])
    with pytest.raises(ValueError, match=r"'\.\./scans/a\.nii\.gz' lies outside root .*tables, and only images under "
                                         r"root are scanned"):
        LesionCSV(csv=str(tmp_path / "tables" / "l.csv")).build()
    root = tmp_path / "root"
    root.mkdir()
    (root / "a.nii.gz").symlink_to(tmp_path / "scans" / "a.nii.gz")
    write_rows(root / "l.csv", [centre_row(str(root / "a.nii.gz"), c, BLOB + sh, "LPS") for c, sh in (("a", 0), ("b", 3))])
    assert len(LesionCSV(csv=str(root / "l.csv"), patch_size=[9, 9]).build().labels) == 2


def test_a_partial_centre_beside_a_box_is_refused_not_replaced_by_the_box(tmp_path):
    """A review: a row with x alone and a complete box was cut at the box's centre, its x ignored without a word."""
    blob_volume(tmp_path / "vol.nii.gz", affines()["ras"])
    lo, hi = np.minimum((BLOB - 5.0) * LPS, (BLOB + 5.0) * LPS), np.maximum((BLOB - 5.0) * LPS, (BLOB + 5.0) * LPS)
    cols = ("image", "class", "x", "y", "z", "x_min", "y_min", "z_min", "x_max", "y_max", "z_max")
    box = dict(x_min=lo[0], y_min=lo[1], z_min=lo[2], x_max=hi[0], y_max=hi[1], z_max=hi[2])
    rows = [{"image": "vol.nii.gz", "class": "a", **box}, {"image": "vol.nii.gz", "class": "b", "x": "3", **box}]
    write_rows(tmp_path / "l.csv", rows, cols)
    with pytest.raises(ValueError, match=r"line 3: a partial centre: x given, y, z empty; give all three, or none"):
        LesionCSV(csv=str(tmp_path / "l.csv")).build()


def test_a_header_in_capitals_is_read_and_a_column_given_twice_is_refused(tmp_path):
    """A review of the left-alone list: a spreadsheet's ``Image,Class,X,Y,Z,Patient`` header was refused for missing
    columns, and an optional ``Patient`` column beside a lower-case header was ignored without a word, so the
    patient split fell back to each image's own patient (from its headers or its path)."""
    from datamodules.sources.lesion_rows import read_lesion_rows

    rows = [{"Image": "vol.nii.gz", "Class": c, "X": "1", "Y": "2", "Z": str(z), "Patient": "p7", "Site": "north"}
            for c, z in (("a", 3), ("b", 9))]
    write_rows(tmp_path / "caps.csv", rows, ("Image", "Class", "X", "Y", "Z", "Patient", "Site"))
    parsed, _ = read_lesion_rows(tmp_path / "caps.csv", tmp_path)
    assert [(r.image, r.cls, r.patient, r.site) for r in parsed] == [("vol.nii.gz", "a", "p7", "north"),
                                                                     ("vol.nii.gz", "b", "p7", "north")]
    from datamodules.indexing.inputs import is_lesion_table

    assert is_lesion_table(str(tmp_path / "caps.csv"))  # the folder scan accounts for it, not "not an image" (a review)
    twice = [{"image": "vol.nii.gz", "class": "a", "x": "1", "X": "2", "y": "2", "z": "3"}]
    write_rows(tmp_path / "twice.csv", twice, ("image", "class", "x", "X", "y", "z"))
    with pytest.raises(ValueError, match=r"twice\.csv: line 1: column\(s\) x given twice"):
        read_lesion_rows(tmp_path / "twice.csv", tmp_path)


def test_volumes_that_do_not_say_their_modality_are_warned_about_and_can_be_set_ct(tmp_path):
    """A review: a cropped CT without air (no header, sidecar or Decathlon modality) was scaled by percentiles as
    MR, without a word and without a way to say it is CT. The table now warns, and `modality: CT` windows it."""
    affine = np.diag([2.0, 2.0, 3.0, 1.0])
    hu = np.full((20, 20, 6), 60.0, np.float32)  # liver, no air
    hu[8:12, 8:12, 2:4] = 20.0  # a hypodense lesion
    write_nifti(hu, affine, tmp_path / "crop.nii.gz")
    rows = [{"image": "crop.nii.gz", "class": "lesion", "x": "20", "y": "20", "z": "7.5", "patient": "p1"},
            {"image": "crop.nii.gz", "class": "lesion", "x": "19", "y": "19", "z": "7.5", "patient": "p1"}]
    path = write_rows(tmp_path / "l.csv", rows, columns=("image", "class", "x", "y", "z", "patient"))
    with pytest.warns(UserWarning, match=r"do not say their modality.*modality: CT"):
        LesionCSV(csv=str(path), patch_size=[9, 9], coordinates="RAS").build()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        t = LesionCSV(csv=str(path), patch_size=[9, 9], coordinates="RAS", modality="CT").build()
    assert float(t.images[0, 0, 4, 4]) == pytest.approx(270 / 500, abs=1e-4)  # 20 HU through [-250, 250]
    assert float(t.images[0, 0, 0, 0]) == pytest.approx(310 / 500, abs=1e-4)  # 60 HU
    with pytest.raises(ValueError, match="not a modality code"):
        LesionCSV(csv=str(path), modality="XYZ")


def test_a_patch_reads_zero_beyond_the_volume_and_a_centre_half_a_voxel_out_is_outside(tmp_path):
    """Points outside the volume read 0 (not the edge voxel's value), and a centre is outside once it is more than
    half a voxel beyond the grid (a margin of 5 voxels, or border padding, passed the tests)."""
    from datamodules.sources.lesion_csv import _outside

    ones = torch.ones(1, 10, 10, 10)
    edge = extract_patches(ones, np.eye(4), np.array([[0.0, 5.0, 5.0]]), patch_size=[9, 9], patch_spacing=[1.0, 1.0])
    # rows along RAS +x, from x = -4 mm: x < 0 is outside and reads 0, x >= 0 inside and reads 1
    torch.testing.assert_close(edge[0, 0, :4], torch.zeros(4, 9), atol=1e-6, rtol=0)
    torch.testing.assert_close(edge[0, 0, 4:], torch.ones(5, 9))
    points = np.array([[-0.4, 0, 0], [-0.6, 0, 0], [-1.0, 5, 5], [9.4, 9, 9], [9.6, 0, 0]])
    assert [k for k, _ in _outside(points, np.eye(4), (10, 10, 10))] == [1, 2, 4]


def test_a_size_of_zero_mm_is_refused(folder):
    rows = [{**r, "size_mm": "0" if i == 1 else "10"} for i, r in enumerate(good_rows())]
    path = write_rows(folder / "lesions.csv", rows, ("image", "class", "x", "y", "z", "size_mm"))
    with pytest.raises(ValueError, match=r"line 3.*size_mm '0' is not a positive number"):
        LesionCSV(csv=str(path)).build()
