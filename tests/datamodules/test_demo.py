"""The synthetic demo cohort: layout, labels, lesions, determinism, DICOM geometry round trips, site headers, fake PHI."""

import csv
import gzip
import json
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest

from datamodules.synthetic.demo import (
    LESION_COLUMNS,
    LESION_TYPES,
    MARKER,
    ORGANS,
    SITES,
    demo_is_complete,
    draw_lesion_classes,
    generate_demo_cohort,
    write_dicom_series,
    write_nifti,
)

LPS = np.array([-1.0, -1.0, 1.0])


def read_series(folder: Path):
    """A reader that trusts only geometry: sort by position along the normal, rescale, build the RAS affine."""
    dss = [pydicom.dcmread(p) for p in folder.glob("*.dcm")]
    iop = np.array(dss[0].ImageOrientationPatient, float)
    row, col = iop[:3], iop[3:]
    normal = np.cross(row, col)
    dss.sort(key=lambda d: float(np.array(d.ImagePositionPatient, float) @ normal))
    vol = np.stack([d.pixel_array.T * float(d.RescaleSlope) + float(d.RescaleIntercept) for d in dss], -1)
    first = np.array(dss[0].ImagePositionPatient, float)
    last = np.array(dss[-1].ImagePositionPatient, float)
    dr, dc = (float(v) for v in dss[0].PixelSpacing)  # row spacing, column spacing
    aff = np.eye(4)
    aff[:3, 0] = row * dc * LPS
    aff[:3, 1] = col * dr * LPS
    aff[:3, 2] = (last - first) / max(len(dss) - 1, 1) * LPS
    aff[:3, 3] = first * LPS
    return vol, aff, dss


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo") / "cohort"
    summary = generate_demo_cohort(root, seed=0, patients_per_site=2)
    return root, summary


# ------------------------------------------------------------------------------------------ layout
def test_layout_marker_and_dataset_json(cohort):
    root, summary = cohort
    assert summary["patients"] == 8 and len(summary["sites"]) >= 4 and summary["files"] > 0
    assert demo_is_complete(root)
    marker = json.loads((root / MARKER).read_text())
    assert marker["seed"] == 0 and marker["patients_per_site"] == 2
    assert not [p for p in root.parent.iterdir() if p.name.startswith(".cohort.tmp")]  # no temporary folder left

    top = json.loads((root / "dataset.json").read_text())
    assert "training" not in top and top["name"] == "imaging-meta demo"
    assert top["labels"] == {"0": "background", **{str(k): v for k, v in ORGANS.items()}}
    for i in (1, 2):
        a = root / "ct_northfield" / f"pat{i:02d}"
        assert sorted(p.name for p in (a / "CT").iterdir()) == [f"IM_{k:04d}.dcm" for k in range(1, SITES[0].n_slices + 1)]
        assert (a / "CT_label.nii.gz").is_file()
        b = root / "ct_harbor" / f"pat{i:02d}"
        assert len(list((b / "series").glob("*.dcm"))) == SITES[1].n_slices and (b / "series_label.nii.gz").is_file()
        anat = root / "mr_bids" / f"sub-{i:02d}" / "anat"
        for name in ("T1w.nii.gz", "T1w.json", "T1w_dseg.nii.gz"):
            assert (anat / f"sub-{i:02d}_{name}").is_file()
        d = root / "mr_decathlon"
        for rel in (f"imagesTr/mr_{i:03d}.nii.gz", f"imagesTr/mr_{i:03d}.json", f"labelsTr/mr_{i:03d}.nii.gz"):
            assert (d / rel).is_file()
    msd = json.loads((root / "mr_decathlon" / "dataset.json").read_text())
    assert msd["modality"] == {"0": "MRI"} and msd["labels"]["1"] == "liver"
    assert msd["training"] == [{"image": f"./imagesTr/mr_{i:03d}.nii.gz", "label": f"./labelsTr/mr_{i:03d}.nii.gz"}
                               for i in (1, 2)]


def label_files(root: Path):
    return sorted(root.glob("ct_*/pat*/*_label.nii.gz")) + sorted(root.glob("mr_bids/sub-*/anat/*_dseg.nii.gz")) \
        + sorted(root.glob("mr_decathlon/labelsTr/*.nii.gz"))


def test_every_label_map_holds_all_organs_over_several_slices(cohort):
    root, _ = cohort
    files = label_files(root)
    assert len(files) == 8
    for f in files:
        img = nib.load(f)
        assert img.get_data_dtype() == np.uint8
        lbl = np.asarray(img.dataobj)
        assert set(np.unique(lbl)) == {0, *ORGANS}, f
        for v, name in ORGANS.items():
            assert np.count_nonzero((lbl == v).any(axis=(0, 1))) >= 3, (f, name)


def organ_centroid_ras(lbl: np.ndarray, affine: np.ndarray, value: int) -> np.ndarray:
    ijk = np.argwhere(lbl == value).mean(axis=0)
    return affine[:3, :3] @ ijk + affine[:3, 3]


def test_geometry_orientation_and_intensities(cohort):
    """Labels sit on the image grid; the liver is on the patient's right (RAS x > 0) at every site."""
    root, _ = cohort
    # site A and B: the label grid is the grid a position-sorting DICOM reader builds
    for series, label in (("ct_northfield/pat01/CT", "ct_northfield/pat01/CT_label.nii.gz"),
                          ("ct_harbor/pat01/series", "ct_harbor/pat01/series_label.nii.gz")):
        vol, aff, _ = read_series(root / series)
        lab = nib.load(root / label)
        assert vol.shape == lab.shape
        np.testing.assert_allclose(aff, lab.affine, atol=1e-3)
        lbl = np.asarray(lab.dataobj)
        assert organ_centroid_ras(lbl, aff, 1)[0] > 20 and organ_centroid_ras(lbl, aff, 2)[0] < -20
        assert organ_centroid_ras(lbl, aff, 3)[0] > 20 and organ_centroid_ras(lbl, aff, 4)[0] < -20
        liver_hu, spleen_hu = vol[lbl == 1].mean(), vol[lbl == 2].mean()
        assert 50 < liver_hu < 160 and 50 < spleen_hu < 160
        assert vol[0, 0, :].mean() < -950  # air in the corner
    # site C is RAS, site D is LPS; both put the liver on the patient's right
    c = nib.load(root / "mr_bids/sub-01/anat/sub-01_T1w.nii.gz")
    d = nib.load(root / "mr_decathlon/imagesTr/mr_001.nii.gz")
    assert nib.aff2axcodes(c.affine) == ("R", "A", "S") and nib.aff2axcodes(d.affine) == ("L", "P", "S")
    for img, lab in ((c, root / "mr_bids/sub-01/anat/sub-01_T1w_dseg.nii.gz"), (d, root / "mr_decathlon/labelsTr/mr_001.nii.gz")):
        lab = nib.load(lab)
        np.testing.assert_allclose(img.affine, lab.affine)
        lbl = np.asarray(lab.dataobj)
        assert organ_centroid_ras(lbl, lab.affine, 1)[0] > 20 and organ_centroid_ras(lbl, lab.affine, 2)[0] < -20
        assert img.get_fdata().min() >= 0
    # MR contrast and scale differ by site: T1w (C) liver brighter than spleen, T2w (D) the reverse
    cd = c.get_fdata()
    dd = d.get_fdata()
    cl = np.asarray(nib.load(root / "mr_bids/sub-01/anat/sub-01_T1w_dseg.nii.gz").dataobj)
    dl = np.asarray(nib.load(root / "mr_decathlon/labelsTr/mr_001.nii.gz").dataobj)
    assert cd[cl == 1].mean() > cd[cl == 2].mean() and dd[dl == 1].mean() < dd[dl == 2].mean()
    assert np.percentile(dd, 99.5) > 1.5 * np.percentile(cd, 99.5)


# ------------------------------------------------------------------------------------- determinism
CHOSEN = [
    "ct_northfield/pat01/CT/IM_0001.dcm",
    "ct_northfield/pat01/CT/IM_0030.dcm",
    "ct_northfield/pat01/CT_label.nii.gz",
    "ct_harbor/pat01/series_label.nii.gz",
    "mr_bids/sub-01/anat/sub-01_T1w.nii.gz",
    "mr_bids/sub-01/anat/sub-01_T1w.json",
    "mr_decathlon/imagesTr/mr_001.nii.gz",
    "mr_decathlon/labelsTr/mr_001.nii.gz",
]


def harbor_series(root: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in (root / "ct_harbor/pat01/series").iterdir()}


def test_same_seed_same_bytes_and_patients_do_not_depend_on_the_cohort_size(cohort, tmp_path):
    root, _ = cohort
    again = tmp_path / "again"
    again.mkdir()  # an existing empty folder is accepted
    generate_demo_cohort(again, seed=0, patients_per_site=1)
    for rel in CHOSEN:
        assert (root / rel).read_bytes() == (again / rel).read_bytes(), rel
    assert harbor_series(root) == harbor_series(again)  # shuffled names and UIDs too
    assert (root / "dataset.json").read_bytes() == (again / "dataset.json").read_bytes()
    small, large = read_lesions(again), read_lesions(root)
    assert small and all(r in large for r in small)  # patient 1's lesions do not depend on the cohort size

    other = tmp_path / "other"
    generate_demo_cohort(other, seed=1, patients_per_site=1)
    for rel in CHOSEN[:5] + CHOSEN[6:]:
        assert (root / rel).read_bytes() != (other / rel).read_bytes(), rel
    assert set(harbor_series(root)) != set(harbor_series(other))


def test_refuses_a_non_empty_folder_and_bad_arguments(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "keep.txt").write_text("user data")
    with pytest.raises(FileExistsError, match="not empty"):
        generate_demo_cohort(tmp_path / "x", patients_per_site=1)
    assert (tmp_path / "x" / "keep.txt").read_text() == "user data"
    assert not demo_is_complete(tmp_path / "x") and not demo_is_complete(tmp_path / "missing")
    (tmp_path / "old").mkdir()  # a cohort written by an older version of the generator (no lesions)
    (tmp_path / "old" / MARKER).write_text(json.dumps({"generator": "datamodules.synthetic.demo.generate_demo_cohort", "version": 1}))
    assert not demo_is_complete(tmp_path / "old")
    with pytest.raises(FileExistsError, match="version 1.*delete the folder"):
        generate_demo_cohort(tmp_path / "old", patients_per_site=1)
    with pytest.raises(ValueError, match="patients_per_site"):
        generate_demo_cohort(tmp_path / "y", patients_per_site=0)
    with pytest.raises(ValueError, match="seed"):
        generate_demo_cohort(tmp_path / "y", seed=-1)
    assert not (tmp_path / "y").exists()


def test_a_linked_folder_is_written_through_and_a_damaged_cohort_is_not_complete(tmp_path):
    """Reviews: ``--out`` as a link (to scratch storage, or to a folder not made yet) failed after the whole cohort
    was written; and a cohort that had lost a slice or a label map was called complete by ``--if-missing``."""
    (tmp_path / "scratch").mkdir()
    link = tmp_path / "demo"
    link.symlink_to(tmp_path / "scratch" / "cohort")  # a link to a folder not made yet
    generate_demo_cohort(link, seed=0, patients_per_site=1)
    assert link.is_symlink() and demo_is_complete(link) and (tmp_path / "scratch" / "cohort" / MARKER).is_file()
    slices = sorted((link / "ct_harbor").rglob("*.dcm"))
    (link / "notes.txt").write_text("a file added beside the cohort")  # does not make it incomplete
    assert demo_is_complete(link)
    slices[3].unlink()  # lost beside the added file: the marker names its files, so the two do not cancel out
    assert not demo_is_complete(link)
    lost = slices[3].relative_to(link).as_posix()
    with pytest.raises(FileExistsError, match=f"has lost files .*{re.escape(lost)}.*delete the folder to regenerate"):
        generate_demo_cohort(link, seed=0, patients_per_site=1)


def test_a_marker_with_only_a_count_still_finds_lost_files(tmp_path):
    """A cohort written before the marker named its files holds only their count; a lost file is still found."""
    generate_demo_cohort(tmp_path / "demo", seed=0, patients_per_site=1)
    marker = json.loads((tmp_path / "demo" / MARKER).read_text())
    del marker["paths"]
    (tmp_path / "demo" / MARKER).write_text(json.dumps(marker))
    assert demo_is_complete(tmp_path / "demo")
    next((tmp_path / "demo").rglob("*.nii.gz")).unlink()
    assert not demo_is_complete(tmp_path / "demo")
    with pytest.raises(FileExistsError, match=r"has lost files .*\(1 file\(s\);"):
        generate_demo_cohort(tmp_path / "demo", seed=0, patients_per_site=1)


def test_write_nifti_gzip_is_deterministic(tmp_path):
    a = np.arange(24, dtype=np.int64).reshape(2, 3, 4)
    p1 = write_nifti(a, np.diag([-2.0, -2.0, 3.0, 1.0]), tmp_path / "a.nii.gz")
    p2 = write_nifti(a, np.diag([-2.0, -2.0, 3.0, 1.0]), tmp_path / "b" / "a.nii.gz")
    assert p1.read_bytes() == p2.read_bytes()
    assert gzip.decompress(p1.read_bytes())[:4] == (348).to_bytes(4, "little")
    img = nib.load(p1)
    assert img.get_data_dtype() == np.int32 and np.array_equal(np.asarray(img.dataobj), a)
    assert int(img.header["sform_code"]) == 1 and int(img.header["qform_code"]) == 1
    with pytest.raises(ValueError, match=".nii"):
        write_nifti(a, np.eye(4), tmp_path / "a.img")


# -------------------------------------------------------------------------------- DICOM round trip
def oblique_affine() -> np.ndarray:
    """LPS-like in-plane flips, a 30 degree rotation about z, non-unit spacings, slices running inferior."""
    t = np.deg2rad(30)
    rot = np.array([[np.cos(t), -np.sin(t), 0], [np.sin(t), np.cos(t), 0], [0, 0, 1]])
    aff = np.eye(4)
    aff[:3, :3] = rot @ np.diag([-0.7, -1.3, -2.5])
    aff[:3, 3] = [40.0, -12.5, 80.0]
    return aff


@pytest.mark.parametrize(
    "kw",
    [
        dict(modality="CT", slope=1.0, intercept=-1024.0, signed=False),
        dict(modality="CT", slope=0.5, intercept=0.0, signed=True, reverse=True, shuffle_names=True),
        dict(modality="MR", slope=2.0, intercept=0.0, signed=False, reverse=True),
    ],
)
def test_write_dicom_series_round_trip(tmp_path, kw):
    rng = np.random.default_rng(3)
    lo = 0.0 if kw["modality"] == "MR" else -1000.0
    vol = rng.uniform(lo, 1500.0, size=(6, 4, 5))
    aff = oblique_affine()
    header = {"Manufacturer": "ACME", "PatientName": "DEMO^ROUND^TRIP", "PatientID": "RT-1"}
    if kw["modality"] == "MR":
        header["MagneticFieldStrength"] = 3.0
    paths = write_dicom_series(vol, aff, tmp_path / "s", header=header, rng=np.random.default_rng(7), **kw)
    assert len(paths) == 5 and all(p.is_file() for p in paths)
    if kw.get("shuffle_names"):
        assert all(re.fullmatch(r"[0-9a-f]{16}\.dcm", p.name) for p in paths)
    else:
        assert [p.name for p in paths] == [f"IM_{(5 - k if kw.get('reverse') else k + 1):04d}.dcm" for k in range(5)]

    got, got_aff, dss = read_series(tmp_path / "s")
    d0 = dss[0]
    sop = {"CT": "1.2.840.10008.5.1.4.1.1.2", "MR": "1.2.840.10008.5.1.4.1.1.4"}[kw["modality"]]
    assert d0.SOPClassUID == sop and d0.file_meta.MediaStorageSOPClassUID == sop
    assert d0.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    assert d0.Modality == kw["modality"] and d0.Manufacturer == "ACME"
    assert (d0.Rows, d0.Columns) == (4, 6) and d0.BitsAllocated == 16 and d0.BitsStored == 16
    assert d0.PixelRepresentation == (1 if kw["signed"] else 0) and d0.PhotometricInterpretation == "MONOCHROME2"
    np.testing.assert_allclose([float(v) for v in d0.PixelSpacing], [1.3, 0.7])
    assert float(d0.SliceThickness) == pytest.approx(2.5) and float(d0.SpacingBetweenSlices) == pytest.approx(2.5)
    assert len({d.SeriesInstanceUID for d in dss}) == 1 and len({d.SOPInstanceUID for d in dss}) == 5
    assert len({d.StudyInstanceUID for d in dss}) == 1 and len({d.FrameOfReferenceUID for d in dss}) == 1
    if kw["modality"] == "MR":
        assert float(d0.MagneticFieldStrength) == 3.0
    # every voxel the reader built maps to the same world point, and carries the same value (within rounding)
    m = np.linalg.inv(aff) @ got_aff
    np.testing.assert_allclose(m, np.round(m), atol=1e-4)
    idx = np.indices(got.shape).reshape(3, -1)
    orig = np.rint(m[:3, :3] @ idx + m[:3, 3:4]).astype(int)
    np.testing.assert_allclose(got[tuple(idx)], vol[tuple(orig)], atol=kw["slope"] / 2 + 1e-6)
    # positions: the slice that got InstanceNumber n sits where the affine puts slice k
    for d in dss:
        k = (5 - d.InstanceNumber) if kw.get("reverse") else d.InstanceNumber - 1
        np.testing.assert_allclose(np.array(d.ImagePositionPatient, float), (aff @ [0, 0, k, 1])[:3] * LPS, atol=1e-3)


def test_same_rng_same_series(tmp_path):
    vol = np.zeros((3, 3, 2))
    a = write_dicom_series(vol, np.eye(4), tmp_path / "a", header={}, shuffle_names=True, rng=np.random.default_rng(1))
    b = write_dicom_series(vol, np.eye(4), tmp_path / "b", header={}, shuffle_names=True, rng=np.random.default_rng(1))
    assert [p.name for p in a] == [p.name for p in b]
    assert [p.read_bytes() for p in a] == [p.read_bytes() for p in b]


@pytest.mark.parametrize(
    "args, match",
    [
        (dict(volume=np.zeros((3, 3))), "3-D"),
        (dict(affine_ras=np.array([[1, 1, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1.0]])), "not orthogonal"),
        (dict(affine_ras=np.diag([1.0, 1.0, 0.0, 1.0])), "zero-length"),
        (dict(modality="US"), "'CT' or 'MR'"),
        (dict(header={"PatientsName": "x"}), "not DICOM keywords"),
        (dict(file_names=["a.dcm"]), "one name per slice"),
    ],
)
def test_write_dicom_series_errors_say_what_to_fix(tmp_path, args, match):
    kw = dict(volume=np.zeros((3, 3, 2)), affine_ras=np.eye(4), out_dir=tmp_path / "s", header={})
    kw.update(args)
    with pytest.raises(ValueError, match=match):
        write_dicom_series(**kw)


# -------------------------------------------------------------------------------------- site headers
def test_sites_a_and_b_differ_and_b_names_carry_no_order(cohort):
    root, _ = cohort
    _, _, a = read_series(root / "ct_northfield/pat01/CT")
    _, _, b = read_series(root / "ct_harbor/pat01/series")
    a0, b0 = a[0], b[0]
    assert (a0.Manufacturer, a0.ManufacturerModelName, a0.InstitutionName) == (
        "SIEMENS", "SOMATOM Definition AS", "Northfield General Hospital")
    assert (b0.Manufacturer, b0.ManufacturerModelName, b0.InstitutionName) == (
        "GE MEDICAL SYSTEMS", "LightSpeed VCT", "Harbor Valley Medical Center")
    assert float(a0.SpacingBetweenSlices) != float(b0.SpacingBetweenSlices)
    assert (a0.Rows, a0.Columns) != (b0.Rows, b0.Columns) and a0.PixelSpacing != b0.PixelSpacing
    # rescale matters at B
    assert (float(a0.RescaleSlope), float(a0.RescaleIntercept), a0.PixelRepresentation) == (1.0, -1024.0, 0)
    assert float(b0.RescaleSlope) == 0.5 and b0.PixelRepresentation == 1
    # A: natural order; B: instance numbers run against the position order
    assert [d.InstanceNumber for d in a] == list(range(1, len(a) + 1))
    assert [d.InstanceNumber for d in b] == list(range(len(b), 0, -1))
    # B's names are random hex: sorting by name scrambles the position order
    names = sorted((root / "ct_harbor/pat01/series").iterdir())
    assert all(re.fullmatch(r"[0-9a-f]{16}\.dcm", p.name) for p in names)
    by_name = [pydicom.dcmread(p, stop_before_pixels=True).InstanceNumber for p in names]
    assert by_name != sorted(by_name) and by_name != sorted(by_name, reverse=True)


def test_dicom_headers_hold_fake_phi_and_nothing_else_does(cohort):
    root, _ = cohort
    phi = []
    for site, letter, series in (("ct_northfield", "A", "CT"), ("ct_harbor", "B", "series")):
        for i in (1, 2):
            f = next((root / site / f"pat{i:02d}" / series).glob("*.dcm"))
            ds = pydicom.dcmread(f, stop_before_pixels=True)
            assert str(ds.PatientName) == f"DEMO^PATIENT^{letter}{i:02d}"
            assert re.fullmatch(rf"MRN-{letter}{i:02d}-\d+", ds.PatientID)
            assert re.fullmatch(r"19\d{6}", ds.PatientBirthDate)
            phi += [str(ds.PatientName), ds.PatientID, ds.PatientBirthDate]
    assert len(set(phi)) == len(phi)
    needles = phi + ["DEMO^PATIENT", "MRN-"]
    for f in root.rglob("*"):
        assert not any(n in part for n in needles for part in f.relative_to(root).parts), f
        if f.suffix == ".json":
            text = f.read_text()
            assert not any(n in text for n in needles), f
        elif f.suffix == ".csv":
            text = f.read_text()
            assert not any(n in text for n in needles), f
        elif f.name.endswith(".nii.gz"):
            head = gzip.decompress(f.read_bytes())[:352]
            assert b"DEMO" not in head and b"MRN" not in head, f
    for sidecar in list(root.glob("mr_bids/sub-*/anat/*.json")) + list(root.glob("mr_decathlon/imagesTr/*.json")):
        meta = json.loads(sidecar.read_text())
        assert meta["Modality"] == "MR" and meta["MagneticFieldStrength"] in (1.5, 3.0)
        assert not {"PatientName", "PatientID", "PatientBirthDate"} & set(meta)
    c = json.loads((root / "mr_bids/sub-01/anat/sub-01_T1w.json").read_text())
    d = json.loads((root / "mr_decathlon/imagesTr/mr_001.json").read_text())
    assert (c["Manufacturer"], c["ManufacturerModelName"], c["MagneticFieldStrength"]) == ("Philips", "Ingenia", 1.5)
    assert (d["Manufacturer"], d["ManufacturerModelName"], d["MagneticFieldStrength"]) == ("SIEMENS", "MAGNETOM Skyra", 3.0)


@pytest.mark.slow
def test_six_patients_per_site(tmp_path):
    summary = generate_demo_cohort(tmp_path / "c6", seed=5, patients_per_site=6)
    assert summary["patients"] == 24
    files = label_files(tmp_path / "c6")
    assert len(files) == 24
    for f in files:
        assert set(np.unique(np.asarray(nib.load(f).dataobj))) == {0, *ORGANS}, f


# -------------------------------------------------------------------------------------------- lesions
def read_lesions(root: Path) -> list[dict[str, str]]:
    with open(root / "lesions.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_lesion_class_assignment_is_rich_enough_and_unbalanced_for_48_patients():
    """At 12 patients per site every class supports patient-disjoint 5-shot + 5-query episodes."""
    for seed in (0, 1, 7):
        lesions = {(si, i): draw_lesion_classes(seed, si, i) for si in range(len(SITES)) for i in range(1, 13)}
        counts = {name: sum(v.count(name) for v in lesions.values()) for name in LESION_TYPES}
        patients = {name: sum(name in v for v in lesions.values()) for name in LESION_TYPES}
        assert len(LESION_TYPES) >= 15 and all(counts.values())
        for name in LESION_TYPES:
            assert counts[name] >= 14 and patients[name] >= 8, (seed, name, counts[name], patients[name])
        assert max(counts.values()) >= 4 * min(counts.values()), counts
        assert max(counts, key=counts.get) == "cyst"
    # deterministic, and a patient's lesions depend only on (seed, site, patient)
    assert draw_lesion_classes(0, 2, 5) == draw_lesion_classes(0, 2, 5)
    assert [draw_lesion_classes(0, si, i) for si in range(4) for i in range(1, 13)] != \
        [draw_lesion_classes(1, si, i) for si in range(4) for i in range(1, 13)]


def test_lesion_types_differ_in_shape_margin_texture_and_enhancement():
    kinds = list(LESION_TYPES.values())
    assert {"round", "lobulated", "wedge"} <= {t.shape for t in kinds}
    assert {"irregular", "spiculated"} & {t.shape for t in kinds}
    assert {t.margin for t in kinds} == {"sharp", "ill_defined"}
    assert {"homogeneous", "mosaic", "scar", "layered", "rim", "nodular"} <= {t.texture for t in kinds}
    # physical properties: water, fat and calcium densities, and arterial-only vs portal enhancement
    hu = {t.name: t.main[0] for t in kinds}
    assert hu["cyst"] < 20 and hu["lipoma"] < -50 and hu["calcification"] > 300
    assert LESION_TYPES["hepatocellular_carcinoma"].main[1] > LESION_TYPES["hepatocellular_carcinoma"].main[2]
    assert len({t.main for t in kinds}) == len(kinds)  # no two classes share their tissue
    for t in kinds:
        assert set(t.organs) <= {1, 2, 3, 4} and 6 <= t.diameter_mm[0] < t.diameter_mm[1] <= 40, t.name
        assert 12 % t.period == 0 and (t.second is None) == (t.texture == "homogeneous"), t.name


def test_small_cohort_lesion_table(demo_root):
    rows = read_lesions(demo_root)
    assert tuple(rows[0]) == LESION_COLUMNS
    images = {r["image"] for r in rows}
    assert len(images) == 12  # every patient has lesions
    for img in images:
        assert (demo_root / img).exists(), img
    assert len({r["class"] for r in rows}) >= 14  # most classes already appear with 3 patients per site
    assert {r["class"] for r in rows} <= set(LESION_TYPES)
    assert {r["organ"] for r in rows} <= {"liver", "spleen", "kidney_right", "kidney_left"}
    sizes = np.array([float(r["size_mm"]) for r in rows])
    assert sizes.min() >= 6.0 and sizes.max() <= 40.0
    assert not any("DEMO" in v or "MRN" in v for r in rows for v in r.values())


def label_of(root: Path, image: str) -> Path:
    if image.endswith(("/CT", "/series")):
        return root / f"{image}_label.nii.gz"
    if image.startswith("mr_bids"):
        return root / image.replace("_T1w.nii.gz", "_T1w_dseg.nii.gz")
    return root / image.replace("imagesTr", "labelsTr")


def test_every_lesion_centre_lies_in_its_organ_and_lesions_do_not_overlap(demo_root):
    rows = read_lesions(demo_root)
    by_image: dict[str, list[dict]] = {}
    for r in rows:
        by_image.setdefault(r["image"], []).append(r)
    values = {name: v for v, name in ORGANS.items()}
    for image, rs in by_image.items():
        lab = nib.load(label_of(demo_root, image))
        data = np.asarray(lab.dataobj)
        ras = np.array([[float(r["x"]), float(r["y"]), float(r["z"])] for r in rs]) * LPS  # LPS -> RAS
        ijk = np.rint((np.linalg.inv(lab.affine) @ np.c_[ras, np.ones(len(ras))].T)[:3].T).astype(int)
        for r, v in zip(rs, ijk, strict=True):
            assert data[tuple(v)] == values[r["organ"]], (image, r)
        radius = np.array([float(r["size_mm"]) / 2 for r in rs])
        dist = np.linalg.norm(ras[:, None] - ras[None], axis=-1)
        np.fill_diagonal(dist, np.inf)
        assert np.all(dist >= radius[:, None] + radius[None]), image


def test_lesions_change_the_image_like_their_tissue(demo_root):
    """Water, fat and calcium lesions are darker / brighter than their organ on CT (HU), calcium dark on MR."""
    rows = read_lesions(demo_root)
    values = {name: v for v, name in ORGANS.items()}
    seen = set()
    volumes = {}
    for r in rows:
        if r["class"] not in ("cyst", "lipoma", "calcification") or not r["image"].startswith(("ct_northfield", "mr_decathlon")):
            continue
        if r["image"] not in volumes:
            if r["image"].startswith("ct_"):
                vol, aff, _ = read_series(demo_root / r["image"])
            else:
                img = nib.load(demo_root / r["image"])
                vol, aff = img.get_fdata(), img.affine
            volumes[r["image"]] = vol, aff, np.asarray(nib.load(label_of(demo_root, r["image"])).dataobj)
        vol, aff, lbl = volumes[r["image"]]
        ras = np.array([float(r["x"]), float(r["y"]), float(r["z"])]) * LPS
        v = tuple(np.rint((np.linalg.inv(aff) @ np.r_[ras, 1.0])[:3]).astype(int))
        organ = np.median(vol[lbl == values[r["organ"]]])
        centre = vol[v]
        if r["image"].startswith("ct_"):
            expected = {"cyst": centre < organ - 30, "lipoma": centre < organ - 60, "calcification": centre > organ + 200}
        else:  # T2: fluid bright, calcium void
            expected = {"cyst": centre > organ * 1.5, "lipoma": True, "calcification": centre < organ * 0.7}
        assert expected[r["class"]], (r, centre, organ)
        seen.add((r["image"][:2], r["class"]))
    assert {("ct", "cyst"), ("mr", "cyst")} <= seen
