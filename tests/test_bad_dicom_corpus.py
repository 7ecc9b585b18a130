"""A seeded corpus of DICOM series with damaged headers and pixels goes through `imaging-meta scan`, then
`imaging-meta segment`, as a user runs them: no traceback anywhere, and every failure is one line that names
the series folder or the file (issue 18).

Each series is a small CT phantom with one mutation: missing or invalid pixel-module elements (BitsStored,
BitsAllocated, PixelRepresentation, Rows/Columns, PhotometricInterpretation, SamplesPerPixel), missing or
invalid geometry (ImagePositionPatient, ImageOrientationPatient, PixelSpacing), truncated or missing pixels,
truncated or empty files, missing, duplicated or unevenly spaced slices, NaN/Inf/zero rescale, two series
in one folder, and a few harmless oddities the reader tolerates. The mutations are in `MUTATIONS`; which file
of a series is damaged comes from the corpus seed.

`scan` runs over the whole corpus: every damaged series is listed as rejected, one line each. `segment` then
runs on every series as the query (and on a few as the support) with the committed legacy checkpoint: every
failure exits with status 1 (bad input, not a bug) and prints exactly one line naming the series. Most runs
are in-process through `imaging_meta.commands.cli.main`; the last tests run the installed command in a process of
its own for the whole-process picture (warnings, logging, exit status); the one for scan is marked slow.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataelem import RawDataElement
from pydicom.tag import Tag

from imaging_meta.commands.cli import main
from tests.datamodules.dicom_fixtures import (
    affine_ras,
    edit,
    header,
    label_for,
    phantom,
    truncate,
    write_nifti,
    write_series,
)

SEED = 18
SHAPE = (16, 14, 8)  # columns, rows, slices

Mutation = Callable[[list[Path], np.random.Generator], None]


# ------------------------------------------------------------------------------------------- mutations
def on_all(fn: Callable[[pydicom.Dataset], None]) -> Mutation:
    """Apply ``fn`` to every file of the series."""

    def mutate(paths, rng):
        for p in paths:
            edit(p, fn)

    return mutate


def on_one(fn: Callable[[pydicom.Dataset], None]) -> Mutation:
    """Apply ``fn`` to one inner file of the series, chosen by the corpus seed."""

    def mutate(paths, rng):
        edit(paths[int(rng.integers(1, len(paths) - 1))], fn)

    return mutate


def delete(keyword: str) -> Callable[[pydicom.Dataset], None]:
    return lambda ds: delattr(ds, keyword)


def set_value(keyword: str, value) -> Callable[[pydicom.Dataset], None]:
    return lambda ds: setattr(ds, keyword, value)


def raw(tag: int, vr: str, text: str) -> Callable[[pydicom.Dataset], None]:
    """Store ``text`` as the element's bytes, unvalidated: a value pydicom could not have written ('12.5' for a
    position, 'NaN' for a slope), as broken exporters do."""
    value = text.encode() + b" " * (len(text) % 2)

    def fn(ds):
        ds._dict[Tag(tag)] = RawDataElement(Tag(tag), vr, len(value), value, 0, False, True)

    return fn


def cut_pixels(ds: pydicom.Dataset) -> None:
    ds.PixelData = ds.PixelData[: len(ds.PixelData) // 2]


def taller_slice(paths, rng) -> None:
    """One slice two rows taller than the others, consistently so (its pixel data fits its header)."""

    def fn(ds):
        ds.Rows += 2
        ds.PixelData += b"\0" * (2 * ds.Columns * 2)

    edit(paths[int(rng.integers(0, len(paths)))], fn)


def drop_middle_slice(paths, rng) -> None:
    paths[len(paths) // 2].unlink()


def empty_one_file(paths, rng) -> None:
    paths[int(rng.integers(1, len(paths) - 1))].write_bytes(b"")


def truncate_one_file(paths, rng) -> None:
    truncate(paths[int(rng.integers(0, len(paths)))], 300)


def duplicate_position(paths, rng) -> None:
    k = int(rng.integers(1, len(paths) - 1))
    position = list(pydicom.dcmread(paths[k - 1]).ImagePositionPatient)
    edit(paths[k], set_value("ImagePositionPatient", position))


def shift_one_slice(paths, rng) -> None:
    def fn(ds):
        ds.ImagePositionPatient = [*ds.ImagePositionPatient[:2], float(ds.ImagePositionPatient[2]) + 1.3]

    edit(paths[int(rng.integers(1, len(paths) - 1))], fn)


def noise_files(paths, rng) -> None:
    for p in paths:
        p.write_bytes(rng.integers(0, 256, 600, dtype=np.uint8).tobytes())


def second_series(paths, rng) -> None:
    write_series(paths[0].parent, phantom(SHAPE, SEED + 100), seed=SEED + 100,
                 file_names=[f"B_{k:04d}.dcm" for k in range(SHAPE[2])])


MUTATIONS: dict[str, Mutation] = {
    # the pixel module
    "bits_stored_missing": on_all(delete("BitsStored")),
    "bits_stored_40": on_all(set_value("BitsStored", 40)),
    "bits_allocated_12": on_all(set_value("BitsAllocated", 12)),
    "bits_allocated_missing": on_all(delete("BitsAllocated")),
    "pixel_representation_missing": on_all(delete("PixelRepresentation")),
    "pixel_representation_7": on_all(set_value("PixelRepresentation", 7)),
    "rows_missing": on_all(delete("Rows")),
    "rows_off_by_one": on_all(set_value("Rows", SHAPE[1] + 1)),
    "columns_off_in_one_file": on_one(set_value("Columns", SHAPE[0] + 4)),
    "one_slice_taller": taller_slice,
    "photometric_garbage": on_all(set_value("PhotometricInterpretation", "NOT_A_PHOTOMETRIC")),
    "photometric_missing": on_all(delete("PhotometricInterpretation")),
    "samples_per_pixel_3": on_all(set_value("SamplesPerPixel", 3)),
    "multi_frame_ct": on_all(set_value("NumberOfFrames", 2)),
    # the geometry
    "position_single_number": on_all(raw(0x00200032, "DS", "12.5")),
    "position_nan": on_all(raw(0x00200032, "DS", "nan\\0\\0")),
    "position_missing_in_one": on_one(delete("ImagePositionPatient")),
    "orientation_missing": on_all(delete("ImageOrientationPatient")),
    "orientation_zeros": on_all(set_value("ImageOrientationPatient", [0, 0, 0, 0, 0, 0])),
    "orientation_parallel": on_all(set_value("ImageOrientationPatient", [1, 0, 0, 1, 0, 0])),
    "orientation_five_values": on_all(raw(0x00200037, "DS", "1\\0\\0\\0\\1")),
    "spacing_empty": on_all(raw(0x00280030, "DS", "")),
    "spacing_missing": on_all(delete("PixelSpacing")),
    "spacing_zero": on_all(set_value("PixelSpacing", [0, 0])),
    "spacing_single_number": on_all(raw(0x00280030, "DS", "0.7")),
    # pixels and files
    "pixels_truncated": on_one(cut_pixels),
    "pixels_missing": on_one(delete("PixelData")),
    "file_truncated": truncate_one_file,
    "file_empty": empty_one_file,
    "not_dicom": noise_files,
    # the series
    "slice_missing": drop_middle_slice,
    "position_duplicated": duplicate_position,
    "spacing_uneven": shift_one_slice,
    "series_uid_missing": on_all(delete("SeriesInstanceUID")),
    "two_series": second_series,
    # the rescale
    "rescale_slope_nan": on_all(raw(0x00281053, "DS", "NaN")),
    "rescale_slope_zero": on_all(set_value("RescaleSlope", 0)),
    "rescale_intercept_inf": on_all(raw(0x00281052, "DS", "inf")),
    # harmless oddities: read, indexed and segmented
    "modality_missing": on_all(delete("Modality")),  # a CT Image Storage SOP class says CT (READER_VERSION 4)
    "instance_number_garbage": on_all(raw(0x00200013, "IS", "x1")),
    "slice_thickness_garbage": on_all(raw(0x00180050, "DS", "abc")),
    "window_centre_garbage": on_all(raw(0x00281050, "DS", "abc")),
    "sop_class_missing": on_all(delete("SOPClassUID")),
    # nothing says the modality: a secondary capture without Modality (segment needs --modality); last, so that
    # the random draws of the series above stay as they were
    "modality_unknown": on_all(lambda ds: (delattr(ds, "Modality"), setattr(ds, "SOPClassUID", "1.2.840.10008.5.1.4.1.1.7"))),
}
#: series `scan` indexes (the others are rejected): header fields the volume does not need, and a folder of two
#: good series (two cases). `segment` reads them too, except where the folder holds two series, or where the
#: modality must be given (--modality).
INDEXED = {"modality_missing", "modality_unknown", "instance_number_garbage", "slice_thickness_garbage", "window_centre_garbage",
           "photometric_missing",
           "sop_class_missing", "two_series"}
SEGMENTED = INDEXED - {"two_series", "modality_unknown"}
#: a series without PhotometricInterpretation (a required element some exporters drop) is read as MONOCHROME2,
#: by scan's header check and by the loader alike


# ------------------------------------------------------------------------------------------- the corpus
@pytest.fixture(scope="module")
def corpus(tmp_path_factory, legacy_checkpoints) -> dict[str, Path]:
    """Every mutated series in its own folder under ``<tmp>/corpus``, a good series ``good`` beside them, and a
    NIfTI support scan with its label map and a BIDS sidecar (``support``, ``support_label``)."""
    root = tmp_path_factory.mktemp("bad_dicom")
    rng = np.random.default_rng(SEED)
    folders = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # pydicom warns about the invalid values it is given
        for i, (name, mutate) in enumerate(MUTATIONS.items()):
            paths = write_series(root / "corpus" / name, phantom(SHAPE, SEED + i), seed=SEED + i,
                                 hdr=header(PatientID=f"PHITEST-{i:03d}"))
            mutate(paths, rng)
            folders[name] = root / "corpus" / name
    write_series(root / "good", phantom(SHAPE, SEED - 1), seed=SEED - 1)
    volume = phantom(SHAPE, SEED - 2)
    support = write_nifti(volume, affine_ras(), root / "support" / "support.nii.gz")
    label = write_nifti(label_for(volume), affine_ras(), root / "support" / "support_dseg.nii.gz")
    (root / "support" / "support.json").write_text(json.dumps({"Modality": "CT"}))
    return {**folders, "root": root, "good": root / "good", "support": support, "support_label": label,
            "checkpoint": legacy_checkpoints["protonet_seg"]}


def run(argv: list[str], capsys) -> tuple[int, str, str]:
    """``imaging-meta ARGV`` in this process: (exit status, stdout, stderr)."""
    capsys.readouterr()
    try:
        main(argv)
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err


def segment_args(corpus, query: Path, out: Path, support: Path | None = None) -> list[str]:
    return ["segment", "--checkpoint", str(corpus["checkpoint"]), "--support-image", str(support or corpus["support"]),
            "--support-label", str(corpus["support_label"]), "--query", str(query), "--out", str(out),
            "--scale", "checkpoint", "--adapt-steps", "0"]  # the reading is under test, not the recipe


def about_reading(err: str) -> str:
    """``err`` without the segmenter's warnings about its masks (the support self-check, an empty first answer
    segmented again): the test checkpoint is untrained, so its masks are poor; the reading is under test, not the
    model."""
    return "".join(line for line in err.splitlines(keepends=True)
                   if "support self-check" not in line and "the segmenter found nothing" not in line)


def assert_one_line_naming(err: str, where: Path, command: str = "segment") -> str:
    """``err`` is exactly one line, the command's error, and it names ``where`` (a folder or a file in it)."""
    assert "Traceback" not in err, err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"imaging-meta {command}: error: "), lines[0]
    assert str(where) in lines[0], (str(where), lines[0])
    return lines[0]


# ------------------------------------------------------------------------------------------------ scan
def test_scan_lists_every_damaged_series_on_one_line(corpus, tmp_path, capsys):
    code, out, err = run(["scan", str(corpus["root"] / "corpus"), "--out", str(tmp_path / "index.json")], capsys)
    assert code == 0, err
    assert "Traceback" not in out + err
    index = json.loads((tmp_path / "index.json").read_text())
    rejected = [r["path"] for r in index["rejected"]]
    indexed = {Path(c["image"] if isinstance(c["image"], str) else c["image"][0]).parts[0] for c in index["cases"]}
    assert indexed == INDEXED, sorted(indexed)
    summary = [line for line in out.splitlines() if line.startswith("  rejected ")]
    for name in MUTATIONS:
        if name in indexed:
            continue
        # the series folder, or each of its files that cannot be read, is rejected with its reason on one line
        mine = [r for r in rejected if r == name or r.startswith(f"{name}/")]
        assert mine, (name, rejected)
        for path in mine:
            assert [line for line in summary if line.startswith(f"  rejected {path}: ")], (path, out)
    assert sum("two_series" in (c["image"] if isinstance(c["image"], str) else c["image"][0]) for c in index["cases"]) == 2


# --------------------------------------------------------------------------------------------- segment
@pytest.mark.parametrize("name", sorted(set(MUTATIONS) - SEGMENTED))
def test_segment_refuses_a_damaged_query_in_one_line(corpus, name, tmp_path, capsys):
    out = tmp_path / "masks"
    code, stdout, err = run(["--quiet", *segment_args(corpus, corpus[name], out)], capsys)
    assert code == 1, (code, err)  # bad input, not a bug (70)
    line = assert_one_line_naming(err, corpus[name])
    assert "Traceback" not in stdout and not list(out.glob("*.nii.gz"))
    if name == "modality_unknown":
        assert "pass --modality CT or MR" in line
        code, _, err = run(["--quiet", *segment_args(corpus, corpus[name], out), "--modality", "CT"], capsys)
        assert code == 0 and about_reading(err) == "" and (out / f"{name}.nii.gz").exists(), err


@pytest.mark.parametrize("name", ["slice_missing", "spacing_empty", "orientation_missing"])
def test_segment_refuses_a_damaged_support_in_one_line(corpus, name, tmp_path, capsys):
    code, _, err = run(["--quiet", *segment_args(corpus, corpus["good"], tmp_path / "masks", support=corpus[name])], capsys)
    assert code == 1
    assert_one_line_naming(err, corpus[name])


@pytest.mark.parametrize("name", sorted(SEGMENTED | {"good"}))
def test_segment_reads_what_it_tolerates(corpus, name, tmp_path, capsys):
    query = corpus[name]
    code, stdout, err = run(["--quiet", *segment_args(corpus, query, tmp_path / "masks")], capsys)
    assert code == 0, err
    assert about_reading(err) == "" and f"wrote {tmp_path / 'masks' / name}.nii.gz" in stdout


def test_segment_names_missing_and_wrong_files(corpus, tmp_path, capsys):
    for args, where in [
        (segment_args(corpus, tmp_path / "nowhere", tmp_path / "m"), tmp_path / "nowhere"),
        (["segment", "--checkpoint", str(tmp_path / "none.ckpt"), *segment_args(corpus, corpus["good"], tmp_path / "m")[3:]],
         tmp_path / "none.ckpt"),
        (["segment", "--checkpoint", str(corpus["support"]), *segment_args(corpus, corpus["good"], tmp_path / "m")[3:]],
         corpus["support"]),
    ]:
        code, _, err = run(["--quiet", *args], capsys)
        assert code == 1, err
        assert_one_line_naming(err, where)


# ------------------------------------------------------------------------------------ real processes
def imaging_meta(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """The installed command in a process of its own, as a user starts it (about 10 s: the imports)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("IMAGING_META_TRACEBACK", None)
    return subprocess.run([sys.executable, "-m", "imaging_meta", *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=300)


def test_a_real_segment_process_prints_one_error_line_and_no_traceback(corpus, tmp_path):
    """Its whole stderr (logging, the warnings pytest would capture in-process) has no traceback, one error line
    naming the series, and otherwise log lines only."""
    bad = corpus["pixels_truncated"]
    seg = imaging_meta(segment_args(corpus, bad, tmp_path / "masks"), tmp_path)
    assert seg.returncode == 1 and "Traceback" not in seg.stdout + seg.stderr, seg.stderr
    errors = [line for line in seg.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith("imaging-meta segment: error: ") and str(bad) in errors[0], seg.stderr
    others = [line for line in seg.stderr.splitlines() if line not in errors]
    assert all(line.startswith(("INFO ", "WARNING ")) for line in others), others  # log lines, no stray output


@pytest.mark.slow
def test_a_real_scan_process_prints_no_traceback(corpus, tmp_path):
    scan = imaging_meta(["scan", str(corpus["root"] / "corpus"), "--out", str(tmp_path / "index.json")], tmp_path)
    assert scan.returncode == 0, scan.stderr
    assert "Traceback" not in scan.stdout + scan.stderr
    assert all(line.startswith(("INFO ", "WARNING ")) for line in scan.stderr.splitlines()), scan.stderr
