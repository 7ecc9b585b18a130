"""Bad inputs and output plans of `segment` and `classify`: each is refused with one message that names the file,
before the checkpoint is read (a path that does not exist stands in for it), and nothing is overwritten.

Found by a review that ran about 95 bad inputs through the commands (2026-12-05): an output folder holding the
query replaced the query with its mask, two queries of one name wrote one mask, an image given as the label map
was segmented, and a truncated NIfTI or a truncated slice at the end of a DICOM series ended as an internal
error or a silently shorter volume.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from datamodules.indexing.inputs import Reject
from datamodules.indexing.volumes import MAX_LABELS, label_data_values, same_neighbours
from datamodules.io.dicom import DicomSeriesReader
from datamodules.io.dicom_errors import DicomError
from datamodules.transforms.volume import LoadVolumed
from imaging_meta.commands.classify import (
    MANIFEST,
    classify,
    query_files,
    remove_old_explanations,
    support_folder,
)
from imaging_meta.commands.segment import segment
from tests.datamodules.dicom_fixtures import affine_ras, label_for, phantom, write_nifti, write_series

NEVER_READ = Path("never-read.ckpt")  # the checks come first: a checkpoint that does not exist is never opened


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def scans(tmp_path):
    vol = phantom(seed=1)
    image = write_nifti(vol, affine_ras(), tmp_path / "in" / "ct.nii.gz")
    label = write_nifti(label_for(vol), affine_ras(), tmp_path / "in" / "ct_label.nii.gz")
    return image, label


# ------------------------------------------------------------------------------------------ segment: outputs
def test_segment_refuses_an_output_folder_in_which_the_mask_would_replace_the_query(tmp_path, scans):
    image, label = scans
    before = digest(image)
    with pytest.raises(ValueError, match=r"ct\.nii\.gz: this input would be overwritten by the output of"):
        segment(NEVER_READ, [(image, label)], [image], image.parent)
    assert digest(image) == before


def test_segment_refuses_two_queries_whose_masks_have_one_name(tmp_path, scans):
    image, label = scans
    other = write_nifti(phantom(seed=2), affine_ras(), tmp_path / "other" / "ct.nii.gz")
    with pytest.raises(ValueError, match=r"out/ct\.nii\.gz: \S+in/ct\.nii\.gz and \S+other/ct\.nii\.gz would both be written"):
        segment(NEVER_READ, [(image, label)], [image, other], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_segment_refuses_an_output_folder_that_is_a_file(tmp_path, scans):
    image, label = scans
    (tmp_path / "taken").write_text("x")
    with pytest.raises(ValueError, match=r"taken: a file of that name exists; --out names the output folder"):
        segment(NEVER_READ, [(image, label)], [image], tmp_path / "taken")


# ------------------------------------------------------------------------------------------ segment: label maps
def test_segment_refuses_an_image_given_as_the_label_map(tmp_path, scans):
    image, _ = scans
    ct = write_nifti(np.random.default_rng(0).integers(-1000, 1500, (24, 24, 8)).astype(np.int16), affine_ras(),
                     tmp_path / "ct_as_label.nii.gz")
    with pytest.raises(ValueError, match=r"ct_as_label\.nii\.gz has \d+ distinct values .* looks like an image"):
        segment(NEVER_READ, [(image, ct)], [image], tmp_path / "out")
    with pytest.raises(ValueError, match=r"in: a folder; a support label map is a NIfTI file"):
        segment(NEVER_READ, [(image, image.parent)], [image], tmp_path / "out")


def test_segment_refuses_non_integer_labels_and_a_missing_label_value(tmp_path, scans):
    image, label = scans
    blurred = write_nifti(label_for(phantom(seed=1)).astype(np.float32) * 0.5, affine_ras(), tmp_path / "blur.nii.gz")
    with pytest.raises(ValueError, match=r"blur\.nii\.gz has non-integer values .* nearest neighbour"):
        segment(NEVER_READ, [(image, blurred)], [image], tmp_path / "out")
    with pytest.raises(ValueError, match=r"ct_label\.nii\.gz: the label map has no voxel of value 7 \(values present: 1"):
        segment(NEVER_READ, [(image, label)], [image], tmp_path / "out", label_value=7)


def test_label_data_values_rejects_more_distinct_values_than_structures():
    data = np.repeat(np.arange(MAX_LABELS + 1, dtype=np.int32), 3).reshape(1, 1, -1)  # regions of 3 voxels each
    with pytest.raises(Reject, match="distinct values"):
        label_data_values(data, "x.nii.gz")
    assert label_data_values(data[..., : 3 * MAX_LABELS], "x.nii.gz") == list(range(1, MAX_LABELS))


def test_label_data_values_rejects_a_noisy_image_with_fewer_values_than_that():
    """An MR of 832 distinct values (benchmarks/real/abdomen/mr.nii.gz) passed as a label map was accepted: label
    maps are piecewise constant, scans are not (`same_neighbours`)."""
    rng = np.random.default_rng(0)
    mr = rng.integers(1, 800, (20, 20, 6)).astype(np.int16)
    mr[:3] = 0  # a background
    with pytest.raises(Reject, match=r"mr\.nii\.gz has \d+ distinct values, is non-zero in 85% of its voxels, and only "
                                     r"\d+% of neighbouring voxels share"):
        label_data_values(mr, "mr.nii.gz")
    lesions = np.zeros((40, 40, 10), np.int16)  # 60 one-voxel lesions, each its own label: a legitimate instance map
    for k in range(60):
        lesions[(k // 6) * 4, (k % 6) * 6, k % 10] = k + 1
    assert len(label_data_values(lesions, "instances.nii.gz")) == 60
    atlas = np.zeros((30, 30, 8), np.int32)  # 60 labels in blocks, and a one-voxel tube along z of its own label
    for k in range(60):
        atlas[(k // 10) * 5 : (k // 10) * 5 + 4, (k % 10) * 3 : (k % 10) * 3 + 2, :] = k + 1
    atlas[29, 29, :] = 99
    assert len(label_data_values(atlas, "atlas.nii.gz")) == 61
    assert same_neighbours(np.zeros((3, 3))) == 1.0 and same_neighbours(np.array([[0, 5, 0]])) == 0.0


# ------------------------------------------------------------------------------------------ readers
def test_a_truncated_or_foreign_nifti_is_a_one_line_error_naming_it(tmp_path, scans):
    image, _ = scans
    cut = tmp_path / "cut.nii.gz"
    cut.write_bytes(image.read_bytes()[: image.stat().st_size // 2])
    text = tmp_path / "text.nii.gz"
    text.write_text("not an image")
    for bad in (cut, text, tmp_path / "empty.nii.gz"):
        bad.touch()
        with pytest.raises(ValueError, match=rf"{bad.name}: cannot read this NIfTI file .* copy it again"):
            LoadVolumed(["image"])({"image": str(bad)})


@pytest.mark.parametrize("damage", ["empty", "garbage", "truncated"])
@pytest.mark.parametrize("where", [0, -1])
def test_a_damaged_slice_of_a_series_folder_is_named_not_skipped(tmp_path, damage, where):
    """A damaged first or last slice used to be skipped as 'not DICOM', so the volume lost a slice silently."""
    files = sorted(write_series(tmp_path / "series", phantom(shape=(12, 10, 6), seed=0), affine_ras(), seed=0))
    bad = files[where]
    data = bad.read_bytes()
    bad.write_bytes({"empty": b"", "garbage": np.random.default_rng(0).bytes(500), "truncated": data[:300]}[damage])
    with pytest.raises(DicomError, match=rf"{bad.name}: "):
        DicomSeriesReader().read(str(tmp_path / "series"))


def test_a_stray_file_in_a_series_folder_is_skipped_with_a_warning(tmp_path, caplog):
    write_series(tmp_path / "series", phantom(shape=(12, 10, 6), seed=0), affine_ras(), seed=0)
    (tmp_path / "series" / "README").write_text("exported by the scanner")
    (tmp_path / "series" / "._IM_0001.dcm").write_bytes(b"\x00\x05\x16\x07 AppleDouble")  # macOS metadata
    (tmp_path / "series" / ".gitkeep").write_bytes(b"")
    with caplog.at_level(logging.WARNING, logger="datamodules.io.dicom"):
        arr, _ = DicomSeriesReader().get_data(DicomSeriesReader().read(str(tmp_path / "series")))
    assert arr.shape[-1] == 6
    assert any("skipping" in r.message and "README" in r.message for r in caplog.records)


# ------------------------------------------------------------------------------------------ classify
@pytest.fixture
def folders(tmp_path):
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        for i in range(2):
            path = tmp_path / "support" / c / f"{c}{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 255, (16, 16), dtype=np.uint8)).save(path)
    (tmp_path / "queries").mkdir()
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (16, 16), dtype=np.uint8)).save(tmp_path / "queries" / f"q{i}.png")
    return tmp_path / "support", tmp_path / "queries"


def test_classify_refuses_a_csv_path_that_is_an_input_or_a_folder(tmp_path, folders):
    support, queries = folders
    target = queries / "q0.png"
    before = digest(target)
    with pytest.raises(ValueError, match=r"q0\.png: this input would be overwritten by the output of the predictions CSV"):
        classify(NEVER_READ, support, [queries], target)
    assert digest(target) == before
    with pytest.raises(ValueError, match=r"queries: names a folder; --out names the file to write"):
        classify(NEVER_READ, support, [queries], queries)


def test_classify_and_segment_never_write_over_the_checkpoint(tmp_path, folders, scans):
    """A review found `classify --out model.ckpt` replacing the checkpoint with the CSV, exit 0."""
    support, queries = folders
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"weights")
    with pytest.raises(ValueError, match=r"model\.ckpt: this input would be overwritten by the output of the predictions CSV"):
        classify(ckpt, support, [queries], ckpt)
    image, label = scans
    named = tmp_path / "ct.nii.gz"  # a checkpoint named like the mask of the query `ct.nii.gz`
    named.write_bytes(b"weights")
    with pytest.raises(ValueError, match=r"ct\.nii\.gz: this input would be overwritten"):
        segment(named, [(image, label)], [image], tmp_path)
    assert ckpt.read_bytes() == named.read_bytes() == b"weights"


def test_classify_refuses_explanations_inside_an_input_folder(tmp_path, folders):
    """Their PNG panels would become support images (or queries) of the next run on the same folders."""
    support, queries = folders
    for where, folder in ((support / "a" / "preds.csv", support), (queries / "preds.csv", queries)):
        with pytest.raises(ValueError, match=rf"preds_explain: the explanations folder lies inside .*{folder.name}, an input folder"):
            classify(NEVER_READ, support, [queries], where, explain=True)
    with pytest.raises(Exception) as e:  # without --explain the CSV may sit there: it is no image; the checkpoint is read
        classify(NEVER_READ, support, [queries], queries / "preds.csv")
    assert "input folder" not in str(e.value)


def test_classify_warns_about_queries_that_are_support_images_and_keeps_odd_file_names(tmp_path, folders, caplog,
                                                                                       monkeypatch):
    """A query that is a support image is compared with itself (a warning names it); a file name that is not valid
    UTF-8 is written to the CSV as the bytes it has on disk instead of failing the whole run."""
    import os

    from imaging_meta.commands import classify as command
    from imaging_meta.learners.descriptors.classifier import DescriptorClassifier

    support, queries = folders
    odd = queries / os.fsdecode(b"caf\xe9.png")
    (queries / "q1.png").rename(odd)
    preprocessing = {"preprocessing": {"image_size": [16, 16], "channels": 1}}
    monkeypatch.setattr(command, "load_learner", lambda path, dev: (DescriptorClassifier("pixels"), preprocessing))
    out = tmp_path / "p.csv"
    with caplog.at_level(logging.WARNING):
        classify("any.ckpt", support, [queries, support / "a" / "a0.png"], out, device="cpu")
    assert "1 query is also a support image" in caplog.text and "a0.png" in caplog.text
    raw = out.read_bytes()
    assert b"caf\xe9.png" in raw and raw.count(b"\n") == 4  # the header and three queries


def test_bad_devices_are_named_as_the_option():
    from imaging_meta.checkpoint_io import resolve_device

    with pytest.raises(ValueError, match=r"--device 'banana' is not a device"):
        resolve_device("banana")
    with pytest.raises(ValueError, match=r"--device mps: imaging-meta runs on cpu or cuda"):
        resolve_device("mps")
    assert resolve_device("cpu").type == "cpu"
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"--device cuda: this torch sees no CUDA GPU"):
            resolve_device("cuda")
    else:
        with pytest.raises(ValueError, match=r"numbered from 0"):
            resolve_device(f"cuda:{torch.cuda.device_count()}")


def test_far_smaller_images_get_a_note():
    from imaging_meta.commands.classify import resolution_notes

    notes = resolution_notes({Path("icon.png"): (2, 2), Path("ok.png"): (30, 32)}, (32, 32))
    assert len(notes) == 1 and "1 of 2 images are at most 1/4" in notes[0] and "icon.png" in notes[0]
    assert resolution_notes({Path("ok.png"): (16, 16)}, (32, 32)) == []


def test_classify_skips_stray_files_without_suffix_and_refuses_volumes_as_queries(tmp_path, folders):
    support, queries = folders
    (support / "a" / "README").write_text("notes")
    (queries / "LOCK").write_bytes(b"")
    assert [f.name for f, _ in support_folder(support)[1]] == ["a0.png", "a1.png", "b0.png", "b1.png"]
    assert [f.name for f in query_files([queries])] == ["q0.png", "q1.png"]
    volume = write_nifti(phantom(seed=0), affine_ras(), tmp_path / "scan.nii.gz")
    with pytest.raises(ValueError, match=r"scan\.nii\.gz: a NIfTI volume \(use `imaging-meta segment`"):
        query_files([volume])
    dicom = sorted(write_series(tmp_path / "series", phantom(shape=(12, 10, 6), seed=0), affine_ras(), seed=0))[0]
    ima = dicom.with_name("X0001.IMA")  # a Siemens name: DICOM whatever the suffix
    dicom.rename(ima)
    assert query_files([ima]) == [ima]
    with pytest.raises(ValueError, match=r"notes\.txt: a \.txt file; classify reads 2D images"):
        (tmp_path / "notes.txt").write_text("x")
        query_files([tmp_path / "notes.txt"])
    explain_folder = tmp_path / "pred_explain"
    explain_folder.mkdir()
    (queries / "q0.png").rename(explain_folder / "q0.png")
    with pytest.raises(ValueError, match=r"q0\.png: an input inside .*pred_explain, the explanations folder"):
        classify(NEVER_READ, support, [explain_folder], tmp_path / "pred.csv", explain=True)


def test_a_query_folder_names_the_volumes_and_other_files_it_skips(tmp_path, folders, caplog):
    """A NIfTI (or another volume format) and files of other suffixes inside a query folder used to be dropped
    without a word; each volume is named with what to do, the other files in one line; hidden and system files
    stay silent."""
    _, queries = folders
    write_nifti(phantom(seed=0), affine_ras(), queries / "scan.nii.gz")
    (queries / "brain.mgz").write_bytes(b"\x00" * 10)
    (queries / "notes.txt").write_text("x")
    (queries / "Thumbs.db").write_bytes(b"\x00")
    (queries / ".DS_Store").write_bytes(b"\x00")
    with caplog.at_level(logging.WARNING):
        assert [f.name for f in query_files([queries])] == ["q0.png", "q1.png"]
    assert "scan.nii.gz: a NIfTI or other volume file; classify takes 2D images" in caplog.text
    assert "brain.mgz: a NIfTI or other volume file" in caplog.text
    assert "skipping 1 file(s) in" in caplog.text and ": notes.txt" in caplog.text
    assert "Thumbs.db" not in caplog.text and "DS_Store" not in caplog.text


def test_an_earlier_runs_explanations_are_removed_and_nothing_else(tmp_path, caplog):
    """Only the files an earlier run listed in its manifest go: a user's own date-named files stay (a review found
    `20240101_patient_scan.png` deleted by the name pattern alone)."""
    folder = tmp_path / "pred_explain"
    folder.mkdir()
    old = [folder / "0000_a.json", folder / "0000_a.png", folder / "0007_b.json"]
    kept = [folder / "notes.txt", folder / "my_0001_x.png", folder / "20240101_patient_scan.png",
            folder / "2024_notes.json"]
    for f in old + kept:
        f.write_text("x")
    (folder / MANIFEST).write_text("\n".join([f.name for f in old] + ["0009_gone.png", "notes.txt"]) + "\n")
    with caplog.at_level(logging.WARNING):
        assert remove_old_explanations(folder) == sorted(old)
    assert sorted(folder.iterdir()) == sorted(kept)  # the manifest went with its files
    assert "kept 2 file(s)" in caplog.text and "20240101_patient_scan.png" in caplog.text
    assert remove_old_explanations(folder) == []  # no manifest: nothing is removed
    assert sorted(folder.iterdir()) == sorted(kept)
    assert remove_old_explanations(tmp_path / "absent") == []


def test_explanations_of_a_run_before_the_manifest_are_recognised_by_their_records(tmp_path, caplog):
    """A folder without a manifest: each explanation record (query, saliency, panel) goes with the panel it names;
    a JSON of another kind with an explanation's name stays, and this run's own names are not called strays."""
    folder = tmp_path / "pred_explain"
    folder.mkdir()
    for i, name in enumerate(("a", "b", "c")):
        (folder / f"000{i}_{name}.json").write_text(json.dumps({"query": name, "saliency": {}, "panel": f"000{i}_{name}.png"}))
        (folder / f"000{i}_{name}.png").write_bytes(b"png")
    (folder / "0009_mine.json").write_text(json.dumps({"my": "notes"}))
    with caplog.at_level(logging.WARNING):
        removed = remove_old_explanations(folder, planned=["0000_a.json", "0000_a.png"])
    assert [f.name for f in removed] == [f"000{i}_{n}.{x}" for i, n in enumerate("abc") for x in ("json", "png")]
    assert [f.name for f in folder.iterdir()] == ["0009_mine.json"]
    assert "kept 1 file(s)" in caplog.text and "0009_mine.json" in caplog.text


def test_a_users_file_with_an_explanations_name_is_refused_not_written_over(tmp_path, folders):
    """A review: a file of the user's named as this run's explanation would be (``0000_q0.png``), which no earlier
    run wrote, was written over without a word."""
    folder = tmp_path / "pred_explain"
    folder.mkdir()
    (folder / "0000_q0.png").write_text("precious")
    (folder / "0003_old.json").write_text("x")
    (folder / MANIFEST).write_text("0003_old.json\n")
    with pytest.raises(ValueError, match=r"0000_q0\.png: exists and is not an explanation that classify wrote"):
        remove_old_explanations(folder, planned=["0000_q0.json", "0000_q0.png"])
    assert (folder / "0000_q0.png").read_text() == "precious" and (folder / "0003_old.json").exists()  # nothing removed
    # classify refuses it before any work: here before the (missing) checkpoint is read
    from imaging_meta.commands.classify import classify, explain_dir

    support, queries = folders
    out = tmp_path / "other" / "pred.csv"
    explain_dir(out).mkdir(parents=True)
    (explain_dir(out) / "0001_q1.png").write_text("mine")
    with pytest.raises(ValueError, match=r"0001_q1\.png: exists and is not an explanation"):
        classify(tmp_path / "absent.ckpt", support, [queries], out, explain=True)
    assert not out.exists()
    (folder / MANIFEST).write_text("0003_old.json\n0000_q0.png\n")  # an earlier run's: replaced
    assert [f.name for f in remove_old_explanations(folder, planned=["0000_q0.json", "0000_q0.png"])] == [
        "0000_q0.png", "0003_old.json"]


# ------------------------------------------------------------------------------------------ modality
def test_volumes_that_do_not_say_their_modality_take_the_data_configs_and_segment_follows_the_checkpoint(tmp_path):
    """A NIfTI CT without a sidecar was scaled by percentiles in training and, given `--modality CT`, by the HU
    window in `segment`: the model saw one scaling and was asked about the other (found by a review, 2026-12-05).
    Now the data config's ``modality`` scales such volumes, is stored with the checkpoint's preprocessing, and
    `segment` applies it to files that do not say."""
    from datamodules.indexing.scan import scan_folder
    from datamodules.segmentation import SegmentationDataModule
    from imaging_meta.commands.segment import modality_of

    vol = phantom(seed=1)
    write_nifti(vol + 1100, affine_ras(), tmp_path / "root" / "p1.nii.gz")  # no air at -1000: not recognisably CT
    write_nifti(label_for(vol), affine_ras(), tmp_path / "root" / "p1_label.nii.gz")
    index = scan_folder(str(tmp_path / "root"), label_names={1: "liver"})
    assert [c.modality for c in index.cases] == ["unknown"]
    write_nifti(vol, affine_ras(), tmp_path / "hu" / "p1.nii.gz")  # the same in HU: indexed as CT, as segment reads it
    write_nifti(label_for(vol), affine_ras(), tmp_path / "hu" / "p1_label.nii.gz")
    assert [c.modality for c in scan_folder(str(tmp_path / "hu"), label_names={1: "liver"}).cases] == ["CT"]
    assert modality_of(tmp_path / "hu" / "p1.nii.gz", None, "MR") == "CT"  # its HU win over the checkpoint's default

    plain = SegmentationDataModule(root=str(tmp_path / "root"), cache_dir=str(tmp_path / "cache"))
    with pytest.warns(UserWarning, match=r"1 volume\(s\) .* do not say their modality .* data.init_args.modality: CT"):
        assert [c.modality for c in plain._with_modality(index).cases] == ["unknown"]
    assert "modality" not in plain.preprocessing  # the settings (and cache digests) of every earlier run hold

    ct = SegmentationDataModule(root=str(tmp_path / "root"), cache_dir=str(tmp_path / "cache"), modality="CT")
    assert [c.modality for c in ct._with_modality(index).cases] == ["CT"]
    unsaid = index.cases[0]  # (the index's cases were replaced by CT ones)
    said = dataclasses.replace(unsaid, case_id="mr", modality="MR")  # a volume whose files say MR keeps it
    index.cases = [said, dataclasses.replace(unsaid, modality="unknown")]
    assert [c.modality for c in ct._with_modality(index).cases] == ["MR", "CT"]
    assert ct.preprocessing["modality"] == "CT"
    with pytest.raises(ValueError, match="modality must be CT or MR"):
        SegmentationDataModule(root=str(tmp_path / "root"), modality="PET")

    image = tmp_path / "root" / "p1.nii.gz"
    assert modality_of(image, None, "CT") == "CT"  # the checkpoint's, for a file that does not say
    assert modality_of(image, "MR", "CT") == "MR"  # --modality wins
    with pytest.raises(ValueError, match=r"p1\.nii\.gz: cannot tell CT from MR .* pass --modality CT or MR"):
        modality_of(image, None, None)
    image.with_name("p1.json").write_text('{"Modality": "MR"}')
    assert modality_of(image, None, "CT") == "MR"  # the file's own word wins over the checkpoint's
    # a DICOM series whose Modality an anonymiser deleted says CT by its SOP class, as the scan reads it (a review:
    # segment asked for --modality, or took the checkpoint's MR and scaled the HU by percentiles)
    from tests.datamodules.dicom_fixtures import edit

    files = write_series(tmp_path / "anon", phantom(shape=(12, 10, 6), seed=0), affine_ras(), seed=0)
    for f in files:
        edit(f, lambda d: delattr(d, "Modality"))
    assert modality_of(tmp_path / "anon", None, "MR") == modality_of(tmp_path / "anon", None, None) == "CT"



def test_segment_reads_the_modality_a_bids_image_inherits_as_the_scan_does(tmp_path, caplog):
    """A review: a BIDS dataset that states the modality once, in a top-level ``T1w.json``, was indexed as CT by
    the scan, while ``segment`` said no sidecar stated it (or took the checkpoint's modality without a word)."""
    import nibabel as nib
    import numpy as np

    from datamodules.indexing.scan import scan_folder
    from imaging_meta.commands.segment import modality_of

    root = tmp_path / "bids"
    image = root / "sub-01" / "ses-1" / "anat" / "sub-01_ses-1_T1w.nii.gz"
    image.parent.mkdir(parents=True)
    nib.save(nib.Nifti1Image(np.random.default_rng(0).normal(100, 30, (12, 12, 6)).astype(np.float32), np.eye(4)), image)
    (root / "T1w.json").write_text('{"Modality": "CT"}')
    assert [c.modality for c in scan_folder(str(root)).cases] == ["CT"]
    assert modality_of(image) == modality_of(image, None, "MR") == "CT"  # no marker file: the folder above sub-01
    (root / "sub-01" / "sub-01_T1w.json").write_text('{"Modality": "MR", "Manufacturer": "GE"}')  # nearer wins
    assert modality_of(image) == "MR" == scan_folder(str(root)).cases[0].modality
    (root / "sub-01" / "sub-01_T2w.json").write_text('{"Modality": "CT"}')  # another suffix: not this image's
    (root / "sub-01" / "ses-1" / "anat" / "sub-02_T1w.json").write_text('{"Modality": "CT"}')  # another subject's
    assert modality_of(image) == "MR"
    # a sidecar that cannot be read is skipped with a warning, as the scan skips it (a review: one broken JSON
    # above the image refused it, even with --modality)
    (root / "sub-01" / "sub-01_T1w.json").write_text("{not json")
    with caplog.at_level(logging.WARNING, logger="imaging_meta.commands.segment"):
        assert modality_of(image) == "CT" == scan_folder(str(root)).cases[0].modality
    assert "sub-01_T1w.json: BIDS sidecar is not valid JSON" in caplog.text
    (root / "T1w.json").write_text("{not json either")
    assert modality_of(image, "MR") == "MR" and modality_of(image, None, "CT") == "CT"
    with pytest.raises(ValueError, match="pass --modality CT or MR"):
        modality_of(image)
    # a file that is not BIDS-named keeps only its own sidecar; a JSON above it is not read
    plain = tmp_path / "plain" / "scan" / "p1.nii.gz"
    plain.parent.mkdir(parents=True)
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), np.eye(4)), plain)
    (tmp_path / "plain" / "p1.json").write_text('{"Modality": "CT"}')
    assert modality_of(plain, None, "MR") == "MR"


def test_a_nifti_in_hounsfield_units_with_air_is_read_as_ct_and_nothing_else_is(tmp_path, caplog):
    """Most public NIfTI CTs (Decathlon, BTCV, TotalSegmentator) have no sidecar. One in HU with air around the
    body is read as CT, with a warning; an MR, a CT stored without its rescale (0-4095), a signed phase map
    spread over thousands of units, or an unreadable file still get the error that asks for --modality."""
    from imaging_meta.commands.segment import modality_of

    rng = np.random.default_rng(0)
    body = rng.normal(40, 20, (32, 32, 8))
    ct = body.copy()
    ct[:6] = rng.normal(-1000, 15, (6, 32, 8))  # air outside the body
    ct[:, :2] = -3024  # padding outside the field of view
    cases = {
        "ct": ct,
        "mr": np.abs(rng.normal(300, 100, (32, 32, 8))),
        "unrescaled_ct": ct + 1024 + 3024 * (ct == -3024),
        "phase": rng.uniform(-4096, 4096, (32, 32, 8)),
    }
    for name, data in cases.items():
        write_nifti(data.astype(np.int16), affine_ras(), tmp_path / f"{name}.nii.gz")
    (tmp_path / "broken.nii.gz").write_bytes(b"not a nifti")
    with caplog.at_level(logging.WARNING, logger="imaging_meta.commands.segment"):
        assert modality_of(tmp_path / "ct.nii.gz") == "CT"
    assert re.search(r"ct\.nii\.gz does not say its modality: read as CT, since 18% of its voxels are air", caplog.text)
    assert modality_of(tmp_path / "ct.nii.gz", "MR") == "MR"  # --modality wins
    # stored integers with a rescale (counted unscaled, never copied to float), and a 4D series
    import nibabel as nib

    scaled = nib.Nifti1Image(((ct + 1024) / 2).astype(np.int16), affine_ras())
    scaled.header.set_slope_inter(2.0, -1024.0)
    nib.save(scaled, tmp_path / "scaled_ct.nii.gz")
    assert modality_of(tmp_path / "scaled_ct.nii.gz") == "CT"
    nib.save(nib.Nifti1Image(np.stack([ct, ct], -1).astype(np.int16), affine_ras()), tmp_path / "series.nii.gz")
    for name in ("mr", "unrescaled_ct", "phase"):
        with pytest.raises(ValueError, match=rf"{name}\.nii\.gz: cannot tell CT from MR .* pass --modality CT or MR"):
            modality_of(tmp_path / f"{name}.nii.gz")
    # a file that could not be segmented anyway says why, not that its modality is unknown (a review found
    # truncated, 4D, NaN and constant files all asking for --modality first)
    good = (tmp_path / "mr.nii.gz").read_bytes()
    (tmp_path / "cut.nii.gz").write_bytes(good[: len(good) // 2])
    write_nifti(np.full((8, 8, 4), np.nan), affine_ras(), tmp_path / "nan.nii.gz")
    write_nifti(np.zeros((8, 8, 4)), affine_ras(), tmp_path / "flat.nii.gz")
    for name, why in (("broken", "its voxels cannot be read"), ("cut", "its voxels cannot be read"),
                      ("series", r"not one 3D volume \(shape \(32, 32, 8, 2\)\)"), ("nan", "256 NaN/Inf voxel"),
                      ("flat", "constant image")):
        with pytest.raises(ValueError, match=rf"{name}\.nii\.gz: {why}"):
            modality_of(tmp_path / f"{name}.nii.gz")


def test_a_complex_or_unreadable_nifti_is_refused_before_any_work(tmp_path):
    """A complex-valued image was read as its real part (a numpy warning the only sign) and segmented."""
    import nibabel as nib

    from imaging_meta.commands.segment import image_source

    nib.save(nib.Nifti1Image(np.ones((8, 8, 4), np.complex64), affine_ras()), tmp_path / "complex.nii.gz")
    with pytest.raises(ValueError, match=r"complex\.nii\.gz: complex-valued voxels \(complex64\).*magnitude"):
        image_source(tmp_path / "complex.nii.gz")
    (tmp_path / "broken.nii").write_bytes(b"not a nifti at all")
    with pytest.raises(ValueError, match=r"broken\.nii: cannot be read as a NIfTI file"):
        image_source(tmp_path / "broken.nii")
    # an RGB NIfTI was called truncated or corrupt, and only after the checkpoint and supports were read (a review)
    rgb = np.zeros((8, 8, 4), dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    nib.save(nib.Nifti1Image(rgb, affine_ras()), tmp_path / "rgb.nii.gz")
    with pytest.raises(ValueError, match=r"rgb\.nii\.gz: colour voxels \(R, G, B;.*one channel or the luminance"):
        image_source(tmp_path / "rgb.nii.gz")

def test_masks_are_written_with_the_usual_permissions(tmp_path):
    """The atomic write goes through a temporary file (mode 0600): the mask gets the mode a plain save gives."""
    import os

    from imaging_meta.commands.nifti_out import NiftiGeometry, save_nifti

    old = os.umask(0o022)
    try:
        path = save_nifti(np.zeros((4, 4, 2), np.uint8), NiftiGeometry.scanner(np.eye(4), (4, 4, 2)), tmp_path / "m.nii.gz")
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.nii.gz"]  # no temporary file left


def test_scan_names_label_values_as_the_data_config_does(tmp_path, capsys):
    from imaging_meta.commands.cli import cli_main

    vol = phantom(seed=1)
    write_nifti(vol, affine_ras(), tmp_path / "root" / "p1.nii.gz")
    write_nifti(label_for(vol), affine_ras(), tmp_path / "root" / "p1_label.nii.gz")
    assert cli_main(["scan", str(tmp_path / "root"), "--out", str(tmp_path / "index.json"), "--label-names", "1=liver"]) == 0
    assert '"liver"' in (tmp_path / "index.json").read_text()
    from imaging_meta.commands.cli import main

    with pytest.raises(SystemExit) as e:
        main(["scan", str(tmp_path / "root"), "--out", str(tmp_path / "x.json"), "--label-names", "liver"])
    assert e.value.code == 1 and "--label-names: 'liver' is not VALUE=NAME" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()


# ------------------------------------------------------------------------------------------ DICOM objects that are no image
RT_DOSE = "1.2.840.10008.5.1.4.1.1.481.2"  # RT Dose Storage: pixel data, but a dose grid
RT_STRUCT = "1.2.840.10008.5.1.4.1.1.481.3"


def _as(path: Path, modality: str, sop_class: str, keep_pixels: bool = True) -> Path:
    import pydicom

    ds = pydicom.dcmread(path)
    ds.Modality, ds.SOPClassUID = modality, sop_class
    ds.SeriesInstanceUID = pydicom.uid.generate_uid()  # an RT object is a series of its own
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    if not keep_pixels:
        del ds.PixelData
    ds.save_as(path, enforce_file_format=True)
    return path


def test_objects_that_are_no_image_are_skipped_in_folders_and_refused_as_files(tmp_path, folders, caplog):
    """A PACS export holds structure sets, dose grids and DICOMDIRs beside the images: classify's folders skip
    them with a warning; given as a file, each is refused naming what it is; segment's modality and the series
    reader ignore them."""
    import shutil

    from datamodules.sources.image_folder import load_image
    from imaging_meta.commands.segment import modality_of

    support, queries = folders
    series = write_series(tmp_path / "series", phantom((12, 10, 4), 0), affine_ras())
    dose = _as(Path(shutil.copy(series[0], queries / "dose.dcm")), "RTDOSE", RT_DOSE)
    struct = _as(Path(shutil.copy(series[0], support / "a" / "RS1")), "RTSTRUCT", RT_STRUCT, keep_pixels=False)
    with caplog.at_level(logging.WARNING):
        assert [f.name for f in query_files([queries])] == ["q0.png", "q1.png"]
        assert [f.name for f, _ in support_folder(support)[1]] == ["a0.png", "a1.png", "b0.png", "b1.png"]
    assert "dose.dcm: an RT dose grid (radiation dose, not an image of the patient), not an image" in caplog.text
    assert "RS1: an RT structure set (contours), not an image" in caplog.text
    with pytest.raises(ValueError, match=r"dose\.dcm: an RT dose grid .*not an image \(RTDOSE, RT Dose Storage\)"):
        load_image(dose)
    # segment: the structure set, first in name order, sets no modality; a dose grid is no image of a series
    shutil.copy(struct, series[0].parent / "0000_RS.dcm")
    assert modality_of(series[0].parent) == "CT"
    assert DicomSeriesReader().read(str(series[0].parent)).series.headers[0].modality == "CT"
    only_dose = tmp_path / "dose_series"
    only_dose.mkdir()
    shutil.copy(dose, only_dose / "d1.dcm")
    with pytest.raises(ValueError, match=r"dose_series: no DICOM image in this folder \(d1\.dcm: an RT dose grid"):
        modality_of(only_dose)
    with pytest.raises(ValueError, match="no DICOM image series in this folder"):
        DicomSeriesReader().read(str(only_dose))


def test_segment_refuses_one_dicom_file_and_names_its_series_folder(tmp_path, scans):
    image, label = scans
    one = write_series(tmp_path / "series", phantom((12, 10, 4), 0), affine_ras())[0]
    with pytest.raises(ValueError, match=r"IM_0001\.dcm: not a NIfTI file .*pass the folder that holds its files"):
        segment(NEVER_READ, [(image, label)], [one], tmp_path / "out")


def test_an_rt_object_with_the_images_series_uid_and_a_seg_beside_a_series_are_left_out(tmp_path, caplog):
    """Anonymisers can give every file of a folder one SeriesInstanceUID: a structure set then joins the CT's
    series; a SEG sits beside it as a series of its own. Neither is read as a slice, nor sets the modality."""
    import shutil

    import pydicom

    from datamodules.indexing.scan import scan_folder
    from imaging_meta.commands.segment import modality_of

    folder = tmp_path / "data" / "ct"
    series = write_series(folder, phantom((12, 10, 4), 0), affine_ras())
    same_uid = Path(shutil.copy(series[0], folder / "0000_RS.dcm"))
    ds = pydicom.dcmread(same_uid)
    ds.Modality, ds.SOPClassUID = "RTSTRUCT", RT_STRUCT
    ds.file_meta.MediaStorageSOPClassUID = RT_STRUCT
    del ds.PixelData
    ds.save_as(same_uid, enforce_file_format=True)
    _as(Path(shutil.copy(series[1], folder / "0001_SEG.dcm")), "SEG", "1.2.840.10008.5.1.4.1.1.66.4")
    with caplog.at_level(logging.WARNING):
        read = DicomSeriesReader().read(str(folder))
    assert len(read.series.headers) == 4 and "0000_RS.dcm: an RT structure set (contours), not an image" in caplog.text
    assert modality_of(folder) == "CT"
    index = scan_folder(tmp_path / "data")
    assert [len(c.image) for c in index.cases] == [4]
    reasons = {Path(r.path).name: r.reason for r in index.rejected}
    assert reasons["0000_RS.dcm"].startswith("an RT structure set (contours), not an image")
    assert reasons["0001_SEG.dcm"].startswith("a DICOM SEG object: segmentations are read as NIfTI label maps")


def test_fit_and_classify_skip_the_same_objects_in_a_class_folder(tmp_path, folders, caplog):
    import shutil

    from datamodules.sources.image_folder import ImageFolder

    support, _ = folders
    dicom = write_series(tmp_path / "s", phantom((12, 10, 2), 0), affine_ras())[0]
    _as(Path(shutil.copy(dicom, support / "a" / "RS.dcm")), "RTSTRUCT", RT_STRUCT, keep_pixels=False)
    with caplog.at_level(logging.WARNING):
        table = ImageFolder(str(support)).build()
    assert len(table.images) == 4 and list(table.labels) == [0, 0, 1, 1]
    assert "RS.dcm: an RT structure set (contours), not an image" in caplog.text
    assert [f.name for f, _ in support_folder(support)[1]] == ["a0.png", "a1.png", "b0.png", "b1.png"]


def test_classify_keeps_the_answers_for_readable_queries_and_names_every_unreadable_one(tmp_path, folders,
                                                                                      legacy_checkpoints):
    import csv

    support, queries = folders
    for name in ("broken.png", "cut.png"):
        (queries / name).write_bytes(b"\x89PNG\r\n\x1a\n not a png")
    ckpt = legacy_checkpoints["protonet_cls"]
    out = tmp_path / "pred.csv"
    with pytest.raises(ValueError, match=r"2 of 4 queries cannot be read, and are not in \S+pred\.csv, which holds the "
                                         r"other 2: \S+broken\.png: cannot read the image.*; \S+cut\.png: cannot read"):
        classify(ckpt, support, [queries], out, device="cpu", batch_size=2)
    with out.open() as f:
        rows = list(csv.DictReader(f))
    assert [Path(r["path"]).name for r in rows] == ["q0.png", "q1.png"]
    for name in ("q0.png", "q1.png"):
        (queries / name).unlink()
    with pytest.raises(ValueError, match=r"none of the 2 queries can be read: \S+broken\.png"):
        classify(ckpt, support, [queries], tmp_path / "none.csv", device="cpu")
    assert not (tmp_path / "none.csv").exists()


# ------------------------------------------------------------------------------ segment: arguments and headers
@pytest.mark.parametrize(("kwargs", "match"), [
    ({"max_support_slices": 0}, r"--max-support-slices must be at least 1, got 0"),
    ({"max_support_slices": -3}, r"--max-support-slices must be at least 1, got -3"),
    ({"label_value": 0}, r"--label-value 0: 0 is the background"),
    ({"label_value": -2}, r"--label-value -2: 0 is the background"),
    ({"modality": " "}, r"--modality is empty: give CT or MR"),
])
def test_segment_refuses_bad_arguments_before_reading_anything(tmp_path, scans, kwargs, match):
    image, label = scans
    with pytest.raises(ValueError, match=match):
        segment(NEVER_READ, [(image, label)], [image], tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()


def test_an_unusual_modality_word_is_read_as_mr_with_a_warning(tmp_path, scans, caplog):
    """MR sequence names that the folder scan does not know (T1ce, SWI) are read as MR, as before, and so is any
    other word; what is neither CT nor a known MR spelling is said."""
    image, label = scans
    for word, warned in (("T1ce", True), ("PT", True), ("mri", False), ("T2w", False), ("ct", False)):
        caplog.clear()
        with caplog.at_level(logging.WARNING), pytest.raises(Exception) as e:  # then the checkpoint is missing
            segment(NEVER_READ, [(image, label)], [image], tmp_path / "out", modality=word)
        assert "never-read.ckpt" in str(e.value)
        assert ("is neither CT nor a spelling of MR" in caplog.text) == warned, word


def test_segment_refuses_an_output_folder_under_a_file(tmp_path, scans):
    """The folder could never be created: refused before the work, not as an OS error after it."""
    image, label = scans
    blocker = tmp_path / "notes.txt"
    blocker.write_text("keep me")
    with pytest.raises(ValueError, match=r"notes\.txt is a file, so --out cannot be created under it"):
        segment(NEVER_READ, [(image, label)], [image], blocker / "sub" / "out")
    assert blocker.read_text() == "keep me"


@pytest.mark.parametrize("damage", ["nan", "singular", "zero"])
def test_an_image_with_a_broken_affine_is_refused_naming_it(tmp_path, damage):
    """MONAI's header correction would put such an image on 1 mm voxels without a word (a mask in the wrong place,
    or an internal error when it is written); the reader refuses it, naming the file."""
    import nibabel as nib

    affine = affine_ras()
    if damage == "nan":
        affine[0, 3] = np.nan
    elif damage == "singular":
        affine[:3, 2] = 0.0
    else:
        affine[:3, :3] = 0.0
    data = phantom(seed=1).astype(np.int16)
    header = nib.Nifti1Image(data, np.eye(4)).header  # the raw srows, as a broken writer leaves them
    header.set_qform(None, code=0)
    header["sform_code"] = 1
    header["srow_x"], header["srow_y"], header["srow_z"] = affine[0], affine[1], affine[2]
    path = tmp_path / f"{damage}.nii.gz"
    nib.Nifti1Image(data, None, header=header).to_filename(str(path))
    with pytest.raises(ValueError, match=rf"{damage}\.nii\.gz: invalid voxel-to-world affine"):
        LoadVolumed(["image"])({"image": str(path)})


def test_colour_notes_name_a_stray_colour_image_and_colour_queries_against_a_grey_support():
    from imaging_meta.commands.classify import colour_notes

    grey = torch.rand(1, 8, 8).expand(3, 8, 8)  # grey stored as RGB
    colour = torch.rand(3, 8, 8)
    support = [Path("a0.png"), Path("a1.png"), Path("b0.png")]
    notes = colour_notes(support, torch.stack([grey, colour, grey]), [], [])
    assert len(notes) == 1 and "1 of 3 in colour" in notes[0] and "a1.png" in notes[0]
    notes = colour_notes(support, torch.stack([grey, grey, grey]), [Path("q.png"), Path("r.png")], [False, True])
    assert len(notes) == 1 and "1 of 2 queries are colour and the support grey (e.g. r.png)" in notes[0]
    assert colour_notes(support, torch.stack([grey] * 3), [Path("q.png")], [False]) == []
    assert colour_notes(support, torch.stack([colour] * 3), [Path("q.png")], [True]) == []


def test_a_png_given_as_the_checkpoint_is_named_as_not_a_checkpoint(tmp_path):
    from imaging_meta.checkpoint_io import CheckpointError, read_checkpoint

    fake = tmp_path / "model.ckpt"
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(fake, format="PNG")
    with pytest.raises(CheckpointError, match=r"model\.ckpt: not a PyTorch checkpoint file \(neither torch's zip"):
        read_checkpoint(fake)
    torch.save({"x": 1}, tmp_path / "real.ckpt")
    assert read_checkpoint(tmp_path / "real.ckpt") == {"x": 1}


def test_an_output_file_in_a_folder_that_cannot_be_written_is_refused_before_the_work(tmp_path, folders, monkeypatch):
    """The CSV failed only when written, after every query was classified, naming a temporary file."""
    import os

    from imaging_meta.commands import outputs

    support, queries = folders
    locked = tmp_path / "locked"
    locked.mkdir()
    real = os.access
    monkeypatch.setattr(outputs.os, "access", lambda p, mode: False if Path(p) == locked else real(p, mode))
    with pytest.raises(ValueError, match=r"p\.csv: cannot write in .*locked \(permission denied\)"):
        classify(NEVER_READ, support, [queries], locked / "sub" / "p.csv")
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ValueError, match=r"afile is a file, so --out cannot be written under it"):
        classify(NEVER_READ, support, [queries], tmp_path / "afile" / "p.csv")


def test_a_series_folder_given_one_level_too_high_names_the_subfolder(tmp_path):
    from imaging_meta.commands.segment import modality_of

    write_series(tmp_path / "study" / "series1", phantom(), affine_ras())
    with pytest.raises(ValueError, match=r"study: no files in this folder; files lie in its subfolder\(s\) \S*series1: give "
                                         r"the folder of the series itself"):
        modality_of(tmp_path / "study")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"empty: no files in this folder; give a NIfTI file or a folder that holds one"):
        modality_of(tmp_path / "empty")


def test_a_nifti_whose_name_and_compression_disagree_is_told_to_rename(tmp_path, scans):
    """A review: a plain NIfTI named .nii.gz was told to be exported again; the fix is a rename."""
    import gzip

    from datamodules.indexing.inputs import Reject
    from datamodules.indexing.volumes import load_nifti
    from imaging_meta.commands.segment import image_source

    image, _ = scans
    plain = tmp_path / "plain.nii.gz"
    plain.write_bytes(gzip.decompress(image.read_bytes()))
    with pytest.raises(ValueError, match=r"plain\.nii\.gz: named \.nii\.gz but not gzip-compressed .*rename it to \.nii"):
        image_source(plain)
    with pytest.raises(Reject, match=r"named \.nii\.gz but not gzip-compressed"):
        load_nifti(str(plain))
    text = tmp_path / "text.nii.gz"
    text.write_text("not an image at all")
    with pytest.raises(ValueError, match=r"text\.nii\.gz: cannot be read as a NIfTI file"):  # no rename advice
        image_source(text)


# ------------------------------------------------------------------------------------------ filesystem oddities
def test_scan_refuses_an_out_that_is_an_input_and_rewrites_its_own_index(tmp_path):
    """`scan --out root/dataset.json` replaced a Decathlon dataset.json with the index, exit 0 (a review)."""
    from imaging_meta.commands.cli import main as cli_main

    root = tmp_path / "data"
    write_nifti(phantom(seed=1), affine_ras(), root / "ct.nii.gz")
    dataset = root / "dataset.json"
    dataset.write_text(json.dumps({"name": "x", "labels": {"0": "background"}}))
    before = dataset.read_bytes()

    def status(out: Path) -> int:
        with pytest.raises(SystemExit) as code:
            cli_main(["scan", str(root), "--out", str(out)])
        return code.value.code

    assert status(dataset) == status(root / "ct.nii.gz") == 1
    assert dataset.read_bytes() == before
    index = root / "index.json"
    assert status(index) == status(index) == 0  # a rerun writes over its own index
    assert json.loads(index.read_text())["cases"]


def test_scan_names_an_out_that_is_an_input(tmp_path):
    from datamodules.indexing.index import Index

    taken = tmp_path / "dataset.json"
    taken.write_text('{"labels": {}}')
    with pytest.raises(ValueError, match=r"dataset\.json: exists and is not an index written by `imaging-meta scan`"):
        Index.check_target(taken)
    assert Index.check_target(tmp_path / "new.json") == tmp_path / "new.json"


def test_outputs_that_differ_only_in_case_or_are_too_long_are_refused_before_the_work(tmp_path, scans, monkeypatch):
    """Masks named `ct.nii.gz` and `CT.nii.gz` are one file where the file system ignores case (probed), two here."""
    from imaging_meta.commands import outputs

    image, label = scans
    upper = write_nifti(phantom(seed=2), affine_ras(), tmp_path / "other" / "CT.nii.gz")
    assert not outputs._ignores_case(tmp_path)  # this file system tells them apart: the plan is fine
    with pytest.raises(Exception, match="never-read.ckpt"):
        segment(NEVER_READ, [(image, label)], [image, upper], tmp_path / "out")
    with monkeypatch.context() as m:
        m.setattr(outputs, "_ignores_case", lambda folder: True)
        with pytest.raises(ValueError, match=r"differ only in the case of their letters, and this file system ignores"):
            segment(NEVER_READ, [(image, label)], [image, upper], tmp_path / "out")
    long = write_nifti(phantom(seed=3), affine_ras(), tmp_path / "long" / ("日本" * 40 + ".nii.gz"))  # 247 bytes
    with pytest.raises(ValueError, match=r"is 2\d\d bytes, more than the 255 its file system takes"):
        segment(NEVER_READ, [(image, label)], [long], tmp_path / "out", explain=True)  # + "_prob" and more
    assert not (tmp_path / "out").exists()


def test_a_name_near_the_limit_is_written_whole(tmp_path):
    """The temporary file of an atomic write adds 18 bytes to the target's name: a 247-byte name failed after
    the work ('File name too long') while the name itself was valid."""
    from datamodules.io.atomic import atomic_write_text

    target = tmp_path / ("日本" * 40 + ".nii.gz")
    atomic_write_text(target, "mask")
    assert target.read_text() == "mask" and [p.name for p in tmp_path.iterdir()] == [target.name]


def test_symbolic_links_to_nothing_are_named_not_dropped(tmp_path, folders, scans):
    """A dangling link among the queries was left out of the CSV without a word (exit 0); a link loop given as a
    support ended as an internal error (Path.resolve's RuntimeError)."""
    support, queries = folders
    (queries / "gone.png").symlink_to(tmp_path / "nowhere.png")
    with pytest.raises(FileNotFoundError, match=r"gone\.png: a symbolic link to \S+nowhere\.png, which does not exist"):
        classify(NEVER_READ, support, [queries], tmp_path / "p.csv")
    image, label = scans
    loop = tmp_path / "loop.nii.gz"
    loop.symlink_to(loop)
    with pytest.raises(FileNotFoundError, match=r"loop\.nii\.gz: a symbolic link to \S+, which does not exist or links"):
        segment(NEVER_READ, [(loop, label)], [image], tmp_path / "out")


def test_fit_names_a_dangling_link_in_a_class_folder(tmp_path, folders):
    from datamodules.sources.image_folder import ImageFolder

    support, _ = folders
    (support / "a" / "gone.png").symlink_to(tmp_path / "nowhere.png")
    with pytest.raises(ValueError, match=r"1 image\(s\) of \S+ cannot be read: \S+gone\.png: a symbolic link"):
        ImageFolder(root=str(support)).build()


def test_images_in_a_linked_folder_are_read_and_a_link_loop_once(tmp_path, folders):
    """`Path.rglob` does not enter a symbolic link to a folder: its images were left out of a class, and of the
    queries, without a word (a review, 2026-12-07). They are read now, and a link back up is walked once."""
    from datamodules.sources.image_folder import ImageFolder
    from imaging_meta.commands.classify import _image_files, support_folder

    support, queries = folders
    extra = tmp_path / "elsewhere"
    extra.mkdir()
    Image.fromarray(np.arange(256, dtype=np.uint8).reshape(16, 16)).save(extra / "x.png")
    (support / "a" / "more").symlink_to(extra, target_is_directory=True)
    (support / "a" / "more_again").symlink_to(support / "a", target_is_directory=True)  # a loop
    (queries / "linked").symlink_to(extra, target_is_directory=True)
    names = [p.relative_to(support).as_posix() for p, _ in support_folder(support)[1]]
    assert names == ["a/a0.png", "a/a1.png", "a/more/x.png", "b/b0.png", "b/b1.png"], names
    assert [p.name for p in _image_files(queries)] == ["x.png", "q0.png", "q1.png"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        table = ImageFolder(root=str(support)).build()
    assert len(table.item_ids) == 5


def test_an_empty_system_file_in_a_series_folder_is_skipped_and_a_gzipped_slice_is_named(tmp_path, caplog):
    """An empty Thumbs.db refused the whole series as an 'empty file ... named or marked as DICOM'; an empty file
    named like a slice is still an interrupted copy; a gzipped slice says to decompress it."""
    import gzip

    paths = write_series(tmp_path / "series", phantom(shape=(12, 10, 6), seed=0), affine_ras(), seed=0)
    for name in ("Thumbs.db", "desktop.ini", "notes.txt"):
        (tmp_path / "series" / name).write_bytes(b"")
    with caplog.at_level(logging.WARNING, logger="datamodules.io.dicom"):
        arr, _ = DicomSeriesReader().get_data(DicomSeriesReader().read(str(tmp_path / "series")))
    assert arr.shape[-1] == 6 and any("Thumbs.db" in r.message for r in caplog.records)
    assert "an empty file whose name is no slice's" in caplog.text  # not "an interrupted copy"
    for name in ("IM_0099", "PAT.CT.0099.IMA", "1.2.840.99"):  # a slice's name, no bytes: refused as before
        (tmp_path / "series" / name).write_bytes(b"")
        with pytest.raises(DicomError, match=rf"{re.escape(name)}: empty file .*must be readable"):
            DicomSeriesReader().read(str(tmp_path / "series"))
        (tmp_path / "series" / name).unlink()
    zipped = tmp_path / "gz"
    zipped.mkdir()
    for p in paths:
        (zipped / (p.name + ".gz")).write_bytes(gzip.compress(p.read_bytes()))
    with pytest.raises(ValueError, match=r"a gzip archive, not a DICOM file - decompress it first"):
        DicomSeriesReader().read(str(zipped))


def test_os_errors_name_the_file_meant_and_the_fix():
    """Read-only file systems, full disks and paths through files printed the raw errno and the atomic write's
    temporary name ('.index.json.rw8hfvgo.partial'); the message fits a file read as well as one written."""
    import errno
    import os

    from imaging_meta.commands.console import error_line

    ro = OSError(errno.EROFS, os.strerror(errno.EROFS), "/data/demo/.index.json.rw8hfvgo.partial")
    assert error_line(ro).startswith("imaging-meta: error: /data/demo/index.json: on a read-only file system")
    cut = OSError(errno.EROFS, os.strerror(errno.EROFS), f"/o/.{'a' * 94}.abcd1234.partial")
    assert f"/o/{'a' * 94}…: on a read-only" in error_line(cut)  # 94 bytes: maybe cut, so not called whole
    denied = OSError(errno.EACCES, os.strerror(errno.EACCES), "sup/a/1.png")  # an input that cannot be read
    assert "sup/a/1.png: permission denied to this user; give it read (inputs) or write (outputs)" in error_line(denied)
    full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # a full disk's error names no file
    assert error_line(full).startswith("imaging-meta: error: No space left on the device; free some space")
    moved = OSError(errno.ENOTEMPTY, os.strerror(errno.ENOTEMPTY), "/e/.out.tmp-1-ab", None, "/e/out")  # os.rename
    assert error_line(moved).startswith("imaging-meta: error: /e/out: a folder that is not empty is in the way")
    other = OSError(errno.ECONNRESET, "reset", "x")  # no fix known: the message as it was
    assert "reset" in error_line(other)


def test_one_query_given_twice_is_segmented_once(tmp_path, scans, caplog, monkeypatch):
    """`--query a.nii.gz --query ./a.nii.gz` was refused as two queries with one name ('rename one of them'), and
    the very same path twice was segmented twice."""
    image, label = scans
    monkeypatch.chdir(image.parent)
    with caplog.at_level(logging.WARNING, logger="imaging_meta.commands.segment"):
        with pytest.raises(Exception) as err:  # past the output checks: the checkpoint that does not exist
            segment(NEVER_READ, [(image, label)], [image, Path("./ct.nii.gz"), image], tmp_path / "out")
    assert "would both be written" not in str(err.value) and "never-read.ckpt" in str(err.value)
    assert "2 query path(s) given more than once, segmented once" in caplog.text


def test_a_cache_may_be_read_only_and_a_finished_demo_is_found_on_a_read_only_share(tmp_path, monkeypatch, capsys):
    """The writability check refused a complete evaluate --cache-dir on read-only storage, and made `demo
    --if-missing` (make train) fail on a finished cohort it could not write to (a review of the change)."""
    import datamodules.synthetic.demo as demo
    from imaging_meta.commands import outputs
    from imaging_meta.commands.cli import main

    monkeypatch.setattr(outputs.os, "access", lambda path, mode: False)  # as for a user without write permission
    with pytest.raises(ValueError, match="cannot write in"):
        outputs.check_output_folder(tmp_path, "--log-dir")
    assert outputs.check_output_folder(tmp_path, "--cache-dir", writable=False) == tmp_path
    monkeypatch.setattr(demo, "demo_is_complete", lambda folder: True)
    monkeypatch.setattr(demo, "demo_settings", lambda folder: {"seed": 0, "patients_per_site": 12})
    with pytest.raises(SystemExit) as code:
        main(["demo", "--out", str(tmp_path), "--if-missing"])
    assert code.value.code == 0 and "already in" in capsys.readouterr().out


def test_a_header_that_declares_billions_of_voxels_is_refused_before_its_data_is_read(tmp_path):
    """A damaged header or a gzip bomb (100000 x 100000 x 1000 voxels) reached MONAI's loader and ended as a
    MemoryError reported as an internal error (with --modality), after gigabytes of memory."""
    import nibabel as nib

    from datamodules.indexing.inputs import Reject
    from datamodules.indexing.volumes import MAX_VOXELS, load_nifti
    from imaging_meta.commands.segment import image_source

    header = nib.Nifti1Header()
    header.set_data_shape((30000, 30000, 3000))  # dims are int16
    header.set_data_dtype(np.uint8)
    header["vox_offset"] = 352
    bomb = tmp_path / "bomb.nii"
    bomb.write_bytes(header.binaryblock + b"\0" * 4)  # the header alone: no data follows
    with pytest.raises(ValueError, match=r"bomb\.nii: shape \(30000, 30000, 3000\): 2700\.0 billion voxels"):
        image_source(bomb)
    with pytest.raises(Reject, match=r"billion voxels .* the header is damaged, or crop or resample"):
        load_nifti(str(bomb))
    assert MAX_VOXELS >= 512 * 512 * 2000  # a whole-body CT is read


def test_a_query_through_a_link_and_dot_dot_is_not_taken_for_another(tmp_path, scans, caplog, monkeypatch):
    """`link/../a.nii.gz` is the file beside the link's target, not `./a.nii.gz`: lexical normalisation took them
    for one query and dropped one with only a warning (a review)."""
    image, label = scans
    (tmp_path / "real" / "sub").mkdir(parents=True)
    other = write_nifti(phantom(seed=5), affine_ras(), tmp_path / "real" / "ct.nii.gz")
    (tmp_path / "in" / "link").symlink_to(tmp_path / "real" / "sub")
    monkeypatch.chdir(image.parent)
    with caplog.at_level(logging.WARNING, logger="imaging_meta.commands.segment"):
        with pytest.raises(ValueError, match="would both be written"):  # two queries, one mask name: refused
            segment(NEVER_READ, [(image, label)], [Path("ct.nii.gz"), Path("link/../ct.nii.gz")], tmp_path / "out")
    assert "given more than once" not in caplog.text and other.exists()


def test_a_rank_whose_peer_stopped_says_so_not_that_it_is_a_bug(monkeypatch):
    """Under DDP a rank waiting at a barrier when another rank met bad input got a gloo 'Connection closed by
    peer' and printed 'internal error ... This is a bug' after the other's clear line (a review, 2026-12-06)."""
    from imaging_meta.commands.console import error_line, peer_stopped

    gone = RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer [127.0.0.1]:5163")
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    assert not peer_stopped(gone) and "This is a bug" in error_line(gone, "imaging-meta fit")  # not distributed
    monkeypatch.setenv("RANK", "0")  # set for a single process too (a cluster's environment): not enough
    assert not peer_stopped(gone)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    line = error_line(gone, "imaging-meta fit")
    assert peer_stopped(gone) and "This is a bug" not in line
    assert line.startswith("imaging-meta fit: stopped (process of rank 0): another process of this distributed run failed")
    assert not peer_stopped(RuntimeError("CUDA out of memory"))  # other errors stay what they are


def test_a_query_folder_of_nifti_files_or_of_series_folders_says_what_to_give(tmp_path):
    """A patient's or BIDS folder given as a query was read as a DICOM series, and the error advised to gunzip
    its NIfTI label map (a review): now it names the NIfTI files, or the subfolders that hold the series."""
    from imaging_meta.commands.segment import modality_of

    bids = tmp_path / "sub-04" / "anat"
    bids.mkdir(parents=True)
    (bids / "sub-04_T1w.nii.gz").write_bytes(b"\x1f\x8b not really")
    (bids / "sub-04_T1w.json").write_text("{}")
    (bids / "._sub-04_T1w.nii.gz").write_bytes(b"macOS")  # hidden: not named
    with pytest.raises(ValueError, match=r"anat: a folder of NIfTI files \(sub-04_T1w\.nii\.gz\), not a DICOM series; "
                                         r"give the NIfTI file of the scan itself") as e:
        modality_of(bids)
    assert "gunzip" not in str(e.value)
    # the project's own layout: the series in a subfolder beside its NIfTI label map, which is not the scan
    patient = tmp_path / "pat03"
    (patient / "series").mkdir(parents=True)
    (patient / ".cache").mkdir()
    (patient / ".cache" / "x").write_text("x")
    (patient / "series" / "1.dcm").write_bytes(b"not dicom either")
    (patient / "series_label.nii.gz").write_bytes(b"\x1f\x8b not really")
    with pytest.raises(ValueError, match=r"none of its 1 files is a readable DICOM file .*; its subfolder\(s\) "
                                         r"\S*pat03/series hold files: give the folder of the series itself") as e:
        modality_of(patient)
    assert ".cache" not in str(e.value)
    # a study's series one level further down, beside a loose file: named too, as when the folder has no files
    (tmp_path / "export" / "study" / "series7").mkdir(parents=True)
    (tmp_path / "export" / "study" / "series7" / "1.dcm").write_bytes(b"x")
    (tmp_path / "export" / "README.txt").write_text("x")
    with pytest.raises(ValueError, match=r"its subfolder\(s\) \S*study/series7 hold files"):
        modality_of(tmp_path / "export")
