"""No patient identifier leaves the pipeline.

The demo cohort's DICOM series carry distinctive fake PHI (names, MRNs, birth dates, accession numbers,
institutions, stations, UIDs). This test runs the whole pipeline on it: scan, fit (TensorBoard, checkpoints,
hyperparameters), test (the report), evaluate (report, records, plots, episode files) and segment (masks
and probability maps of a DICOM query). Then it reads back every byte written (NIfTI decompressed,
checkpoints unzipped) and every line logged, and looks for every identifying value of the DICOM PS3.15
basic confidentiality profile that the inputs hold.
"""

import gzip
import logging
import zipfile
from pathlib import Path

import pydicom
import pytest

from imaging_meta.commands.cli import cli_main
from tests.helpers import CONFIGS, SMALL_MODEL, data_args

#: attributes of PS3.15 Annex E's basic profile (Table E.1-1) that identify a patient, a visit or a place;
#: whichever of them the input files hold is searched for in every output.
BASIC_PROFILE = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientBirthTime", "OtherPatientIDs", "OtherPatientNames",
    "PatientBirthName", "PatientMotherBirthName", "PatientAddress", "PatientTelephoneNumbers", "MedicalRecordLocator",
    "AccessionNumber", "StudyID", "StudyDate", "StudyTime", "SeriesDate", "AcquisitionDate", "ContentDate",
    "InstitutionName", "InstitutionAddress", "InstitutionalDepartmentName", "StationName", "DeviceSerialNumber",
    "ReferringPhysicianName", "PerformingPhysicianName", "OperatorsName", "PhysiciansOfRecord",
    "NameOfPhysiciansReadingStudy", "RequestingPhysician", "StudyInstanceUID", "SeriesInstanceUID",
    "SOPInstanceUID", "FrameOfReferenceUID", "MediaStorageSOPInstanceUID", "IssuerOfPatientID",
    "PatientComments", "AdditionalPatientHistory", "RequestAttributesSequence",
)


def _phi_values(root: Path) -> set[str]:
    values: set[str] = set()
    for f in root.rglob("*"):
        if not f.is_file() or f.suffix in (".gz", ".nii", ".json", ".csv"):
            continue
        try:
            ds = pydicom.dcmread(f, stop_before_pixels=True)
        except Exception:
            continue
        for kw in BASIC_PROFILE:
            v = ds.get(kw) if kw != "MediaStorageSOPInstanceUID" else getattr(ds.file_meta, kw, None)
            if v is None or isinstance(v, pydicom.Sequence):
                continue
            s = str(v).strip()
            if len(s) >= 6:  # shorter values ("1", "M") are not identifying on their own, and occur anywhere
                values.add(s)
    return values


def _variants(value: str) -> set[bytes]:
    out = {value, value.replace("^", " "), value.lower(), value.replace("^", " ").lower()}
    return {v.encode() for v in out if v.strip()}


def _readable_bytes(f: Path) -> bytes:
    data = f.read_bytes()
    if f.suffix == ".gz":
        data += gzip.decompress(data)
    if zipfile.is_zipfile(f):
        with zipfile.ZipFile(f) as z:
            data += b"".join(z.read(n) for n in z.namelist())
    return data


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_no_phi_in_anything_the_pipeline_writes_or_logs(demo_root, tmp_path, capsys, caplog):
    phi = _phi_values(demo_root)
    assert any(v.startswith("DEMO^PATIENT^") for v in phi) and any(v.startswith("MRN-") for v in phi)
    assert len(phi) > 50, "the fixture must carry PHI for this test to mean anything"
    caplog.set_level(logging.DEBUG)
    out = tmp_path / "out"
    index = out / "index.json"
    assert cli_main(["scan", str(demo_root), "--out", str(index)]) == 0
    cli = cli_main(["fit", "--config", str(CONFIGS / "trainer/cpu.yaml"), "--config", str(CONFIGS / "data/demo_segmentation.yaml"),
                    "--config", str(CONFIGS / "model/protonet_seg.yaml"), *SMALL_MODEL,
                    *data_args(demo_root, index, out / "cache"),
                    "--trainer.logger.init_args.save_dir", str(out / "runs"), "--trainer.max_epochs", "1",
                    "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1", "--test_after_fit", "true"])
    ckpt = next(Path(cli.trainer.log_dir, "checkpoints").glob("best*.ckpt"))
    assert cli_main(["evaluate", "--checkpoint", str(ckpt), "--out", str(out / "eval"), "--shots", "1", "--episodes", "4",
                     "--cache-dir", str(out / "cache")]) == 0
    dicom_series = sorted(p for p in (demo_root / "ct_harbor").glob("pat*/series") if p.is_dir())
    support, query = dicom_series[0], dicom_series[1]
    assert cli_main(["segment", "--checkpoint", str(ckpt), "--support-image", str(support),
                     "--support-label", str(support.parent / "series_label.nii.gz"), "--query", str(query),
                     "--out", str(out / "seg"), "--explain"]) == 0
    written = [f for f in out.rglob("*") if f.is_file()]
    kinds = {f.suffix for f in written}
    assert {".json", ".ckpt", ".gz", ".png", ".md", ".csv", ".yaml"} <= kinds, kinds
    assert any(f.name.startswith("events.out.tfevents") for f in written)
    captured = capsys.readouterr()
    logs = (captured.out + captured.err + "\n".join(r.getMessage() for r in caplog.records)).encode()
    leaks = []
    for f in written:
        data = _readable_bytes(f)
        leaks += [(str(f.relative_to(out)), v) for v in sorted(phi) if any(x in data for x in _variants(v))]
    leaks += [("logs", v) for v in sorted(phi) if any(x in logs for x in _variants(v))]
    assert not leaks, f"PHI found in outputs: {leaks[:10]}"
    # the search itself finds PHI where it is: in the input series, and in a gzip-compressed copy of a header
    first = next(f for f in support.iterdir() if f.is_file())
    assert sum(any(x in _readable_bytes(first) for x in _variants(v)) for v in phi) >= 5
    packed = tmp_path / "copy.gz"
    packed.write_bytes(gzip.compress(first.read_bytes()))
    assert any(any(x in _readable_bytes(packed) for x in _variants(v)) for v in phi)
