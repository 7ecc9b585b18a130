"""`segment` outputs: DICOM-SEG frames aligned with their source slices, probability maps, PHI-free NIfTI.

The checkpoints are built directly (a tiny untrained PrototypicalSegmenter, saved through
`EpisodicModule.on_save_checkpoint` as `imaging-meta fit` does), and where the expected mask must be known
the learner's ``predict`` is replaced by a threshold of the query slice: the mask then depends only on the
query's pixels and geometry, not on a network.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import sys
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch

from datamodules.io.dicom import DicomSeriesReader
from imaging_meta.commands.cli import cli_main
from imaging_meta.commands.segment import segment
from imaging_meta.learners.metric.protonet_seg import PrototypicalSegmenter
from imaging_meta.module import EpisodicModule
from imaging_meta.volume.segmenter import LEARNER_ONLY
from tests.datamodules.dicom_fixtures import (
    FAKE_PHI,
    affine_ras,
    edit,
    label_for,
    phantom,
    write_nifti,
    write_reoriented_nifti,
    write_series,
)

# the fake predict's threshold on the windowed image (CT window -250..250 HU): HU 0 -> 0.5 (background),
# HU 1 -> 0.502 (foreground); the phantom's values are integers, so the expected mask is HU >= 1
THRESHOLD = 0.501
CT_WINDOW = (-250.0, 250.0)
# the model as trained: no rescaling to the structure, no test-time adaptation (the tests below check geometry
# and formats against masks known from the pixels; segment's default recipe adds both)
PLAIN = {"scale": "checkpoint", "adapt_steps": 0}


def make_checkpoint(path: Path, spacing, slice_size) -> Path:
    """A tiny untrained ProtoNet-seg checkpoint with the given preprocessing, in the `imaging-meta fit` format."""
    torch.manual_seed(0)
    learner = PrototypicalSegmenter(backbone="unet", backbone_kwargs={"out_channels": 8, "features": [4, 4, 8, 8, 16, 4]})
    module = EpisodicModule(learner, baselines=False)
    ckpt = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(ckpt)  # learner config, task, version (no trainer: no datamodule section)
    ckpt["imaging_meta"]["preprocessing"] = {
        "spacing": [float(s) for s in spacing],
        "slice_size": [int(s) for s in slice_size],
        "ct_window": list(CT_WINDOW),
        "mr_percentiles": [1.0, 99.0],
    }
    torch.save(ckpt, path)
    return path


def ct_nifti(array: np.ndarray, affine: np.ndarray, path: Path, ornt=None) -> Path:
    """A NIfTI volume with its BIDS sidecar saying CT (the DICOM series say it in their headers)."""
    path = write_nifti(array, affine, path) if ornt is None else write_reoriented_nifti(array, affine, path, ornt)
    path.with_name(path.name.removesuffix(".nii.gz") + ".json").write_text(json.dumps({"Modality": "CT"}))
    return path


def threshold_predict(self, episode):
    """(T, Q, H, W): foreground exactly where the windowed query image exceeds THRESHOLD."""
    return (episode.query_images[:, :, 0] > THRESHOLD).float()


def intensity_predict(self, episode):
    """(T, Q, H, W): the windowed query image itself, a smooth 'probability' in [0, 1]."""
    return episode.query_images[:, :, 0].float()


def pooled_encode(self, images):
    """(N, 1, H, W) -> (N, 4, 1, 4): the slice average-pooled into 4 x 4 cells, a cell row per channel, for the
    appearance check (`imaging_meta.volume.appearance`) of a learner whose ``predict`` is a stand-in."""
    return torch.nn.functional.adaptive_avg_pool2d(images, 4).transpose(1, 2)


def stand_in(monkeypatch, predict) -> None:
    """Replace the checkpoint learner's ``predict`` (and the encoder that the appearance check reads)."""
    monkeypatch.setattr(PrototypicalSegmenter, "predict", predict)
    monkeypatch.setattr(PrototypicalSegmenter, "encode", pooled_encode)


@pytest.fixture
def support(tmp_path):
    vol = phantom(seed=1)
    image = ct_nifti(vol, affine_ras(), tmp_path / "support" / "sup.nii.gz")
    label = write_nifti(label_for(vol), affine_ras(), tmp_path / "support" / "sup_label.nii.gz")
    return image, label


def tricky_series(folder: Path, seed: int = 3) -> tuple[np.ndarray, np.ndarray, list[Path]]:
    """A series rotated 90 degrees in plane, slices along -z, InstanceNumbers reversed, random file names."""
    vol = phantom(shape=(12, 10, 6), seed=seed)
    aff = affine_ras(rot_deg=90.0, slice_sign=-1.0)
    files = write_series(folder, vol, aff, seed=seed, reverse=True, shuffle_names=True)
    return vol, aff, files


def ras_grid(vol: np.ndarray, aff: np.ndarray) -> tuple[tuple[float, float], tuple[int, int]]:
    """In-plane (spacing, size) of the volume in RAS: preprocessing with these resamples nothing."""
    img = nib.Nifti1Image(vol, aff).as_reoriented(nib.orientations.io_orientation(aff))
    return tuple(float(z) for z in img.header.get_zooms()[:2]), tuple(int(s) for s in img.shape[:2])


def expected_mask(ds: pydicom.Dataset) -> np.ndarray:
    """(Rows, Columns) mask the threshold predict gives for this source slice."""
    hu = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    return hu >= 1


def test_dicom_seg_frames_reference_the_slices_their_pixels_came_from(tmp_path, support, monkeypatch):
    import highdicom as hd

    folder = tmp_path / "SERIES_A"
    vol, aff, files = tricky_series(folder)
    spacing, size = ras_grid(vol, aff)
    assert size == (10, 12), "the in-plane axes are swapped by the RAS reorientation"
    ckpt = make_checkpoint(tmp_path / "m.ckpt", spacing, size)
    stand_in(monkeypatch, threshold_predict)

    written = segment(ckpt, [support], [folder], tmp_path / "out", output_format="dicom-seg",
                      largest_component=False, device="cpu", options=LEARNER_ONLY, **PLAIN)
    assert written == [tmp_path / "out" / "SERIES_A.seg.dcm"]
    sources = {str(pydicom.dcmread(f).SOPInstanceUID): pydicom.dcmread(f) for f in files}

    seg = hd.seg.segread(written[0])
    raw = pydicom.dcmread(written[0])
    frames = raw.pixel_array.reshape(-1, int(raw.Rows), int(raw.Columns))  # (frames, Rows, Columns), unpacked bits
    assert (int(raw.Rows), int(raw.Columns)) == (10, 12)  # DICOM pixel order of the source, not RAS
    assert len(frames) == len(files), "every slice has foreground in this phantom, so no frame is omitted"
    seen = set()
    for i, item in enumerate(raw.PerFrameFunctionalGroupsSequence):
        uid = str(item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID)
        src = sources[uid]
        seg_id = item.get("SegmentIdentificationSequence") or raw.SharedFunctionalGroupsSequence[0].SegmentIdentificationSequence
        assert seg_id[0].ReferencedSegmentNumber == 1
        np.testing.assert_array_equal(frames[i].astype(bool), expected_mask(src), err_msg=f"frame {i} vs {uid}")
        assert np.allclose(item.PlanePositionSequence[0].ImagePositionPatient, src.ImagePositionPatient, atol=1e-3)
        seen.add(uid)
    assert seen == set(sources)

    # what a DICOM-SEG must carry (and the docstring says so): the study's patient; plus our equipment
    first = next(iter(sources.values()))
    assert raw.PatientID == first.PatientID and raw.StudyInstanceUID == first.StudyInstanceUID
    assert raw.Manufacturer == "imaging-meta" and raw.Modality == "SEG"
    seg_bytes = written[0].read_bytes()
    for keyword in ("InstitutionName", "StationName"):  # only the Patient and Study modules are copied
        assert FAKE_PHI[keyword].encode() not in seg_bytes, keyword
    desc = seg.SegmentSequence[0]
    assert desc.SegmentAlgorithmType == "AUTOMATIC"
    assert desc.SegmentAlgorithmName == "imaging-meta"
    assert desc.SegmentationAlgorithmIdentificationSequence[0].AlgorithmName == "imaging-meta"

    # the NIfTI mask of the same query, located through its affine only, shows the same pixels
    nifti = segment(ckpt, [support], [folder], tmp_path / "out_nii", largest_component=False, device="cpu",
                    options=LEARNER_ONLY, **PLAIN)[0]
    img = nib.load(nifti)
    mask = np.asarray(img.dataobj).astype(bool)
    to_vox = np.linalg.inv(img.affine)
    for src in sources.values():
        lps = np.asarray(src.ImagePositionPatient, dtype=np.float64)
        ijk = to_vox @ np.r_[-lps[0], -lps[1], lps[2], 1.0]
        assert np.allclose(ijk[:2], 0, atol=1e-3), "voxel (0, 0) of each slice is its first transmitted pixel"
        k = int(round(ijk[2]))
        np.testing.assert_array_equal(mask[:, :, k].T, expected_mask(src))


def test_dicom_seg_of_a_nifti_query_is_a_clear_error(tmp_path, support):
    ckpt = make_checkpoint(tmp_path / "m.ckpt", (2.0, 2.0), (32, 32))
    query = ct_nifti(phantom(), affine_ras(), tmp_path / "q.nii.gz")
    with pytest.raises(ValueError, match=r"--format dicom-seg needs a DICOM series query; .*q\.nii\.gz is NIfTI"):
        segment(ckpt, [support], [query], tmp_path / "out", output_format="dicom-seg", device="cpu")
    with pytest.raises(ValueError, match="output_format must be one of"):
        segment(ckpt, [support], [query], tmp_path / "out", output_format="png", device="cpu")


def test_explain_writes_the_probability_map_in_the_query_geometry(tmp_path, support, monkeypatch):
    # a coarser grid than the queries': the map is interpolated back, not copied
    ckpt = make_checkpoint(tmp_path / "m.ckpt", (2.0, 2.0), (32, 32))
    stand_in(monkeypatch, intensity_predict)
    nifti_q = ct_nifti(phantom(seed=4), affine_ras(rot_deg=20.0), tmp_path / "q4.nii.gz", [[1, -1], [0, 1], [2, -1]])
    _, aff, _ = tricky_series(tmp_path / "SERIES_B")
    out = tmp_path / "out"
    written = segment(ckpt, [support], [nifti_q, tmp_path / "SERIES_B"], out, explain=True,
                      largest_component=False, device="cpu", structure_name="left kidney", **PLAIN)
    assert written == [out / "q4.nii.gz", out / "SERIES_B.nii.gz", out / "q4_probability.nii.gz",
                       out / "SERIES_B_probability.nii.gz"]
    q_img = nib.load(nifti_q)
    for mask_path, prob_path, shape, affine in ((written[0], written[2], q_img.shape, q_img.affine),
                                                (written[1], written[3], (12, 10, 6), None)):
        m, p = nib.load(mask_path), nib.load(prob_path)
        prob = np.asarray(p.dataobj)
        assert prob.dtype == np.float32 and p.shape == m.shape == shape
        assert np.allclose(p.affine, m.affine) and (affine is None or np.allclose(p.affine, affine, atol=1e-4))
        assert prob.min() >= 0.0 and prob.max() <= 1.0
        inner = (prob > 0.01) & (prob < 0.99)
        assert inner.mean() > 0.05, "a linearly interpolated map, not a mask"
        np.testing.assert_array_equal(prob > 0.5, np.asarray(m.dataobj).astype(bool))
    # the series' own grid: same voxel centres as the written volume, slices in geometric (ascending) order
    series = DicomSeriesReader().read(str(tmp_path / "SERIES_B")).series
    assert np.allclose(nib.load(written[3]).affine, series.affine, atol=1e-4)
    flip_slices = aff @ np.array([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, -1, 5], [0, 0, 0, 1]])
    assert np.allclose(series.affine, flip_slices, atol=1e-4), "written along -z, read back along +z"

    # the coordinate codes: a NIfTI query's own (qform 0 takes the sform's; both 0 stay 0:
    # test_segment_nifti_headers.py), a DICOM series' scanner coordinates
    q_codes = (int(q_img.header["sform_code"]), int(q_img.header["qform_code"]))
    for path, expected in zip(written, (q_codes, (1, 1), q_codes, (1, 1)), strict=True):
        hdr = nib.load(path).header
        got = (int(hdr["sform_code"]), int(hdr["qform_code"]))
        assert got == (expected[0] or expected[1], expected[1] or expected[0]) != (0, 0), path
    # no patient data in any NIfTI header or byte: the description is the product's own (the structure's name)
    for path in written:
        hdr = nib.load(path).header
        words = b"imaging-meta segment: left kidney" + (b", probability" if "probability" in path.name else b"")
        # aux_file: a salted digest of which scan the mask or map is of (query_marks), no identifier
        aux = hdr["aux_file"].item()
        assert hdr["descrip"].item() == words
        assert re.fullmatch(rb"q2?:[0-9a-f]{16}", aux)
        raw = gzip.decompress(path.read_bytes())
        for value in FAKE_PHI.values():
            assert value.encode() not in raw and value.split("^")[0].encode() not in raw


def test_cli_segment_dicom_seg_with_explain(tmp_path, support, capsys):
    import highdicom as hd

    ckpt = make_checkpoint(tmp_path / "m.ckpt", (2.0, 2.0), (32, 32))
    _, _, files = tricky_series(tmp_path / "SERIES_C")
    out = tmp_path / "out"
    rc = cli_main(["segment", "--checkpoint", str(ckpt), "--support-image", str(support[0]),
                   "--support-label", str(support[1]), "--query", str(tmp_path / "SERIES_C"), "--out", str(out),
                   "--format", "dicom-seg", "--explain", "--device", "cpu", "--scale", "checkpoint", "--adapt-steps", "0",
                   "--structure-name", "spleen"])
    assert rc == 0
    assert sorted(p.name for p in out.iterdir()) == ["SERIES_C.seg.dcm", "SERIES_C_probability.nii.gz"]
    assert f"wrote {out / 'SERIES_C.seg.dcm'}" in capsys.readouterr().out
    seg = hd.seg.segread(out / "SERIES_C.seg.dcm")
    referenced = {str(i.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID)
                  for i in seg.PerFrameFunctionalGroupsSequence}
    assert referenced <= {str(pydicom.dcmread(f).SOPInstanceUID) for f in files}
    assert seg.SegmentSequence[0].SegmentLabel == "spleen"  # a viewer shows the structure's name
    assert nib.load(out / "SERIES_C_probability.nii.gz").shape == (12, 10, 6)


def test_an_all_foreground_support_label_is_rejected(tmp_path):
    ckpt = make_checkpoint(tmp_path / "m.ckpt", (2.0, 2.0), (32, 32))
    vol = phantom(seed=1)
    image = ct_nifti(vol, affine_ras(), tmp_path / "sup.nii.gz")
    label = write_nifti(np.ones(vol.shape, np.uint8), affine_ras(), tmp_path / "sup_label.nii.gz")
    query = ct_nifti(phantom(seed=2), affine_ras(), tmp_path / "q.nii.gz")
    with pytest.raises(ValueError, match=r"label map \S*sup_label\.nii\.gz has no background: every voxel is labelled.*is it an image"):
        segment(ckpt, [(image, label)], [query], tmp_path / "out", device="cpu")


def test_a_dicom_seg_given_as_the_support_label_is_named_with_how_to_convert_it(tmp_path):
    """A review: the SEG that ``--format dicom-seg`` writes, given back as ``--support-label``, was told "pass the
    folder that holds its files" (the images' advice), and the folder was then refused as a label."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.66.4"  # Segmentation Storage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    seg = Dataset()
    seg.file_meta, seg.Modality = meta, "SEG"
    seg.SOPClassUID, seg.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    seg.save_as(tmp_path / "q.seg.dcm", enforce_file_format=True)
    image = ct_nifti(phantom(seed=1), affine_ras(), tmp_path / "sup.nii.gz")
    query = ct_nifti(phantom(seed=2), affine_ras(), tmp_path / "q.nii.gz")
    with pytest.raises(ValueError, match=r"q\.seg\.dcm: a DICOM Segmentation object; support label maps are NIfTI files .*"
                                         r"Convert it first"):
        segment(tmp_path / "never-read.ckpt", [(image, tmp_path / "q.seg.dcm")], [query], tmp_path / "out")
    (tmp_path / "segs").mkdir()
    (tmp_path / "q.seg.dcm").rename(tmp_path / "segs" / "q.seg.dcm")
    with pytest.raises(ValueError, match=r"segs: a folder holding a DICOM Segmentation object \(q\.seg\.dcm\); .*"
                                         r"Convert it first"):
        segment(tmp_path / "never-read.ckpt", [(image, tmp_path / "segs")], [query], tmp_path / "out")
    # an RT structure set (contours), as a file or in a folder: named as one, with how to convert it (a review: it
    # was "a DICOM image file (RTSTRUCT)", sent to --support-image, and its folder "not a DICOM series")
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.481.3"  # RT Structure Set Storage
    rt = Dataset()
    rt.file_meta, rt.Modality = meta, "RTSTRUCT"
    rt.SOPClassUID, rt.SOPInstanceUID = meta.MediaStorageSOPClassUID, generate_uid()
    (tmp_path / "rt").mkdir()
    rt.save_as(tmp_path / "rt" / "rs.dcm", enforce_file_format=True)
    for given, named in ((tmp_path / "rt" / "rs.dcm", r"rs\.dcm: a DICOM RT structure set; "),
                         (tmp_path / "rt", r"rt: a folder holding a DICOM RT structure set \(rs\.dcm\); ")):
        with pytest.raises(ValueError, match=named + r"support label maps are NIfTI files .* SlicerRT"):
            segment(tmp_path / "never-read.ckpt", [(image, given)], [query], tmp_path / "out")
    # a slice of the support series given as its label: named as an image, not sent to its folder (refused as a label)
    series = write_series(tmp_path / "series")
    with pytest.raises(ValueError, match=r"a DICOM image file \(CT\), not a label map; the support's series goes to "
                                         r"--support-image"):
        segment(tmp_path / "never-read.ckpt", [(image, series[0])], [query], tmp_path / "out")


def test_a_2d_picture_is_rejected_before_any_work_naming_it(tmp_path, support):
    """PNG, JPEG, TIFF or BMP as an image, a label map or a query: an error that names the file and says what to do
    (it used to reach the DICOM reader and fail on a missing DICOM header), before the checkpoint is read."""
    from PIL import Image

    picture = tmp_path / "mask.png"
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(picture)
    query = ct_nifti(phantom(seed=2), affine_ras(), tmp_path / "q.nii.gz")
    missing_checkpoint = tmp_path / "never-read.ckpt"
    for sup, queries in [((support[0], picture), [query]), ((picture, support[1]), [query]), (support, [picture])]:
        with pytest.raises(ValueError, match=r"mask\.png: a 2D picture \(\.png\); segment reads NIfTI volumes .* one-slice NIfTI"):
            segment(missing_checkpoint, [sup], queries, tmp_path / "out", device="cpu")
    assert not (tmp_path / "out").exists()


def test_segment_with_adaptation_is_deterministic_for_a_seed(tmp_path, support):
    ckpt = make_checkpoint(tmp_path / "m.ckpt", (2.0, 2.0), (32, 32))
    query = ct_nifti(phantom(seed=5), affine_ras(), tmp_path / "q5.nii.gz")
    runs = []
    for name in ("a", "b"):
        out = segment(ckpt, [support], [query], tmp_path / name, device="cpu", adapt_steps=2, adapt_seed=3, explain=True,
                      scale="checkpoint")
        runs.append(np.asarray(nib.load(out[1]).dataobj))
    np.testing.assert_array_equal(runs[0], runs[1])
    other = segment(ckpt, [support], [query], tmp_path / "c", device="cpu", explain=True, **PLAIN)
    assert not np.array_equal(np.asarray(nib.load(other[1]).dataobj), runs[0])  # the adaptation changed the model


def test_with_adaptation_a_querys_mask_does_not_depend_on_the_other_queries(tmp_path, support):
    """Each query is adapted to on its own: its probability map is the same alone, after another query, or in
    another order (adapting once on all the queries together made a patient's mask depend on the batch)."""
    def blocks(seed: int) -> np.ndarray:  # regions the superpixel episodes of the adaptation can draw from
        rng = np.random.default_rng(seed)
        vol = np.full((32, 32, 6), -100.0)
        for _ in range(4):
            x, y = rng.integers(0, 22, 2)
            vol[x : x + 10, y : y + 10] = rng.integers(-800, 1200)
        return vol

    ckpt = make_checkpoint(tmp_path / "m.ckpt", (2.0, 2.0), (32, 32))
    query = ct_nifti(blocks(5), affine_ras(), tmp_path / "q5.nii.gz")
    other = ct_nifti(blocks(6), affine_ras(), tmp_path / "q6.nii.gz")

    def prob_map(name: str, queries: list) -> np.ndarray:
        out = segment(ckpt, [support], queries, tmp_path / name, device="cpu", adapt_steps=2, adapt_seed=3, explain=True,
                      scale="checkpoint")
        (path,) = [p for p in out if Path(p).name.startswith("q5") and "prob" in Path(p).name]
        return np.asarray(nib.load(path).dataobj)

    alone = prob_map("alone", [query])
    np.testing.assert_array_equal(prob_map("after", [other, query]), alone)
    np.testing.assert_array_equal(prob_map("before", [query, other]), alone)


def test_dicom_seg_of_an_enhanced_multi_frame_query_says_to_write_nifti(tmp_path):
    from imaging_meta.commands.dicom_seg import write_dicom_seg

    pytest.importorskip("highdicom")
    one_file = tmp_path / "enhanced.dcm"
    one_file.write_bytes(b"")  # never read: the shapes already refuse it
    with pytest.raises(ValueError, match=r"enhanced.dcm: a multi-frame \(enhanced\) series; .*--format nifti"):
        write_dicom_seg(np.zeros((8, 8, 6), dtype=bool), [one_file], tmp_path / "out.seg.dcm")


@pytest.mark.parametrize("support_parts", [1, 2])
def test_segment_keeps_every_part_when_the_support_structure_has_several(tmp_path, monkeypatch, support_parts):
    """The query shows two bright blocks (64 and 27 voxels). The 3D step keeps both when the support's structure
    is in two parts (both kidneys under one label), and only the larger when it is in one."""
    shape = (12, 10, 6)
    aff = affine_ras()

    sup = np.zeros(shape, np.int16)
    sup[1:5, 1:5, 1:5] = 200
    if support_parts == 2:
        sup[7:11, 1:5, 1:5] = 200
    s_img = ct_nifti(sup, aff, tmp_path / "s" / "sup.nii.gz")
    s_lab = write_nifti((sup > 0).astype(np.uint8), aff, tmp_path / "s" / "sup_label.nii.gz")
    query = np.zeros(shape, np.int16)
    query[1:5, 1:5, 1:5] = 200
    query[8:11, 1:4, 1:4] = 200  # a smaller second block
    q_img = ct_nifti(query, aff, tmp_path / "q" / "query.nii.gz")
    spacing, size = ras_grid(query.astype(np.float32), aff)
    ckpt = make_checkpoint(tmp_path / "m.ckpt", spacing, size)
    stand_in(monkeypatch, threshold_predict)
    (written,) = segment(ckpt, [(s_img, s_lab)], [q_img], tmp_path / "out", device="cpu", options=LEARNER_ONLY,
                         **PLAIN)
    mask = np.asarray(nib.load(str(written)).dataobj) > 0
    assert mask.sum() == (64 + 27 if support_parts == 2 else 64)
    assert mask[1:5, 1:5, 1:5].all()


def test_dicom_seg_warnings_never_quote_the_patients_identifiers(tmp_path, capsys, caplog):
    """highdicom warns about a single-component PatientName by quoting it; the warning is re-emitted with the
    name replaced by its keyword, so that no identifier reaches the console or a log (the .seg.dcm itself copies
    the Patient module, as DICOM requires)."""
    import warnings

    from imaging_meta.commands.dicom_seg import write_dicom_seg
    from tests.datamodules.dicom_fixtures import header

    pytest.importorskip("highdicom")
    volume = phantom(shape=(8, 8, 4))
    files = write_series(tmp_path / "q", volume, hdr=header(PatientName="PHITESTSOLO", PatientID="PHITEST-ID-1"))
    paths = DicomSeriesReader().read(str(tmp_path / "q")).series.paths  # the mask's slice order
    assert sorted(paths) == sorted(str(f) for f in files)
    mask = np.zeros(volume.shape, dtype=bool)
    mask[2:5, 2:5, 1:3] = True
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = write_dicom_seg(mask, paths, tmp_path / "q.seg.dcm")
    messages = [str(w.message) for w in caught]
    assert any("<PatientName>" in m and "single component" in m for m in messages), messages
    everything = " ".join(messages) + capsys.readouterr().err + caplog.text
    assert "PHITESTSOLO" not in everything and "PHITEST-ID-1" not in everything
    assert str(pydicom.dcmread(out).PatientName) == "PHITESTSOLO"  # the file joins the patient's study


@pytest.mark.parametrize("check, warned", [(0.15, True), (0.39, True), (0.41, False), (0.9, False), (None, False)])
def test_segment_warns_when_the_support_self_check_is_poor(tmp_path, support, monkeypatch, caplog, check, warned):
    """The segmenter's support self-check (`ScanSegmenter.support_dice`, tested in test_scan_segmenter) below
    `SUPPORT_CHECK_WARN` gives one warning naming the figure; above it, or unmeasured (one support slice), none."""
    import logging

    from imaging_meta.commands import segment as command
    from imaging_meta.volume.segmenter import ScanSegmenter

    class Checked(ScanSegmenter):
        def fit(self, *args, **kwargs):
            super().fit(*args, **kwargs)
            self.support_dice = check
            return self

    monkeypatch.setattr(command, "ScanSegmenter", Checked)
    stand_in(monkeypatch, threshold_predict)
    vol = phantom(seed=2)
    query = ct_nifti(vol, affine_ras(), tmp_path / "q.nii.gz")
    ckpt = make_checkpoint(tmp_path / "m.ckpt", (1.0, 1.0), (12, 10))
    with caplog.at_level(logging.WARNING, logger="imaging_meta.commands.segment"):
        segment(ckpt, [support], [query], tmp_path / "out", device="cpu", **PLAIN)
    lines = [r.getMessage() for r in caplog.records if "support self-check" in r.getMessage()]
    assert len(lines) == (1 if warned else 0)
    if warned:
        assert f"Dice of only {check:.2f}" in lines[0]


def test_a_query_of_another_modality_than_the_support_is_segmented_by_the_learner_alone(tmp_path, support,
                                                                                        monkeypatch, caplog):
    """A CT support's intensity histogram, calibration and slice gate say nothing of an MR query (on the real CT
    and MR of benchmarks/real: Dice 0.07 with them, 0.17 without). Such a query gets the learner alone, with a
    warning that names it; a CT query of the same run keeps the full segmenter."""
    import logging

    from imaging_meta.commands import segment as command
    from imaging_meta.volume.segmenter import ScanSegmenter

    used: list[tuple[bool, bool]] = []

    class Recorded(ScanSegmenter):
        def predict(self, volume, slices=None):
            used.append((self.options.intensity, self.options.calibrate))
            return super().predict(volume, slices)

    monkeypatch.setattr(command, "ScanSegmenter", Recorded)
    stand_in(monkeypatch, intensity_predict)
    vol = phantom(seed=2)
    ct_query = ct_nifti(vol, affine_ras(), tmp_path / "ct_q.nii.gz")
    mr_query = write_nifti(np.abs(vol).astype(np.int16), affine_ras(), tmp_path / "mr_q.nii.gz")
    mr_query.with_name("mr_q.json").write_text(json.dumps({"Modality": "MR"}))
    ckpt = make_checkpoint(tmp_path / "m.ckpt", (1.0, 1.0), (12, 10))
    with caplog.at_level(logging.WARNING, logger="imaging_meta.commands.segment"):
        written = segment(ckpt, [support], [ct_query, mr_query], tmp_path / "out", device="cpu", **PLAIN)
    assert [p.name for p in written] == ["ct_q.nii.gz", "mr_q.nii.gz"]
    assert used == [(True, True), (False, False)]
    lines = [r.getMessage() for r in caplog.records if "across modalities" in r.getMessage()]
    assert len(lines) == 1 and lines[0].startswith("mr_q.nii.gz is MR and the support CT")

    # --modality is for files that do not say: an MR query without a sidecar, beside a CT support that says CT
    bare = write_nifti(np.abs(vol).astype(np.int16) + 2000, affine_ras(), tmp_path / "bare" / "mr2.nii.gz")
    used.clear()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="imaging_meta.commands.segment"):
        segment(ckpt, [support], [bare], tmp_path / "out2", device="cpu", modality="MR", **PLAIN)
    assert used == [(False, False)]  # the support stayed CT; only the learner's fit ran, once
    assert sum("across modalities" in r.getMessage() for r in caplog.records) == 1


def test_modality_spellings_are_normalised_and_a_file_is_read_once(tmp_path, caplog, monkeypatch):
    """A sidecar "T1w" or "MRI" is MR, as the folder scan reads it; a support in HU without a sidecar is warned
    about once, not once per use."""
    import logging

    from imaging_meta.commands.segment import modality_of

    stand_in(monkeypatch, threshold_predict)
    vol = phantom(seed=1)
    sup = write_nifti(vol, affine_ras(), tmp_path / "hu" / "sup.nii.gz")  # no sidecar: read as CT by its HU
    lab = write_nifti(label_for(vol), affine_ras(), tmp_path / "hu" / "sup_label.nii.gz")
    query = ct_nifti(phantom(seed=2), affine_ras(), tmp_path / "q.nii.gz")
    ckpt = make_checkpoint(tmp_path / "m.ckpt", (1.0, 1.0), (12, 10))
    with caplog.at_level(logging.WARNING, logger="imaging_meta.commands.segment"):
        segment(ckpt, [(sup, lab)], [query], tmp_path / "out", device="cpu", **PLAIN)
    assert sum("sup.nii.gz does not say its modality" in r.getMessage() for r in caplog.records) == 1

    image = write_nifti(np.abs(phantom(seed=3)).astype(np.int16) + 100, affine_ras(), tmp_path / "t1.nii.gz")
    for word in ("T1w", "MRI", " mr "):
        image.with_name("t1.json").write_text(json.dumps({"Modality": word}))
        assert modality_of(image) == "MR"
    image.with_name("t1.json").write_text(json.dumps({"Modality": "ct "}))
    assert modality_of(image, "MR") == "CT"  # the file's own word wins over --modality


def test_segment_warns_when_a_query_was_segmented_again_and_keep_empty_switches_it_off(tmp_path, support,
                                                                                       monkeypatch, caplog):
    """A query in which the segmenter found nothing is predicted again without the support-fitted rules
    (`ScanSegmenter.relaxed`, tested in test_scan_segmenter); `segment` warns, naming the query and what was relaxed.
    ``--keep-empty`` maps to ``ScanOptions(relax_empty=False)``."""
    import logging

    from imaging_meta.commands import segment as command
    from imaging_meta.commands.cli import _scan_options, _tool_parser
    from imaging_meta.volume.segmenter import ScanSegmenter

    class Relaxed(ScanSegmenter):
        def predict(self, volume, slices=None):
            out = super().predict(volume, slices)
            self.relaxed = "without intensity evidence"
            return out

    monkeypatch.setattr(command, "ScanSegmenter", Relaxed)
    stand_in(monkeypatch, threshold_predict)
    query = ct_nifti(phantom(seed=2), affine_ras(), tmp_path / "q.nii.gz")
    ckpt = make_checkpoint(tmp_path / "m.ckpt", (1.0, 1.0), (12, 10))
    with caplog.at_level(logging.WARNING, logger="imaging_meta.commands.segment"):
        segment(ckpt, [support], [query], tmp_path / "out", device="cpu", **PLAIN)
    lines = [r.getMessage() for r in caplog.records if "found nothing" in r.getMessage()]
    assert len(lines) == 1 and lines[0].startswith("q.nii.gz: the segmenter found nothing, so it was segmented "
                                                   "again without intensity evidence")
    base = ["segment", "--checkpoint", "c", "--support-image", "s", "--support-label", "l", "--query", "q", "--out", "o"]
    assert _scan_options(_tool_parser().parse_args(base)).relax_empty
    assert not _scan_options(_tool_parser().parse_args([*base, "--keep-empty"])).relax_empty
    assert _scan_options(_tool_parser().parse_args(base)).across_scans
    assert not _scan_options(_tool_parser().parse_args([*base, "--pooled-calibration"])).across_scans
    assert not _scan_options(_tool_parser().parse_args(base)).position  # measured, and off by default
    assert _scan_options(_tool_parser().parse_args([*base, "--position-prior"])).position


def test_segment_logs_each_querys_novelty_and_warns_about_one_unlike_the_support(tmp_path, support, monkeypatch,
                                                                                   caplog):
    """The appearance check (`imaging_meta.volume.appearance`, tested in test_appearance) runs on the checkpoint's
    encoder; `segment` logs each query's novelty and warns, naming the query, above `NOVELTY_WARN`."""
    import logging

    from imaging_meta.volume import segmenter

    stand_in(monkeypatch, threshold_predict)
    query = ct_nifti(phantom(seed=2), affine_ras(), tmp_path / "q.nii.gz")
    ckpt = make_checkpoint(tmp_path / "m.ckpt", (1.0, 1.0), (12, 10))
    with caplog.at_level(logging.INFO, logger="imaging_meta.commands.segment"):
        segment(ckpt, [support], [query], tmp_path / "out", device="cpu", **PLAIN)
    logged = [r.getMessage() for r in caplog.records if "foreground voxels" in r.getMessage()]
    assert len(logged) == 1 and "(novelty " in logged[0], logged
    assert not [r for r in caplog.records if "looks unlike" in r.getMessage()]  # a phantom like its support
    monkeypatch.setattr(segmenter, "NOVELTY_WARN", -1.0)  # every query is "unlike" its support
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="imaging_meta.commands.segment"):
        segment(ckpt, [support], [query], tmp_path / "out2", device="cpu", **PLAIN)
    lines = [r.getMessage() for r in caplog.records if "looks unlike" in r.getMessage()]
    assert len(lines) == 1 and lines[0].startswith("q.nii.gz looks unlike the support scan: "), lines
    assert "may not show the structure" in lines[0]
    (kept,) = segment(ckpt, [support], [query], tmp_path / "out3", device="cpu", **PLAIN)
    assert np.asarray(nib.load(str(kept)).dataobj).any()  # warned about, and its mask written
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="imaging_meta.commands.segment"):
        (emptied,) = segment(ckpt, [support], [query], tmp_path / "out4", device="cpu", empty_if_unlike=True, **PLAIN)
    assert not np.asarray(nib.load(str(emptied)).dataobj).any()
    lines = [r.getMessage() for r in caplog.records]
    assert any("--empty-if-unlike: its mask is left empty" in line for line in lines), lines
    assert not any("the mask is empty" in line for line in lines)  # not also "the segmenter found nothing"
    monkeypatch.setattr(PrototypicalSegmenter, "slice_features", lambda self, images: None)  # no features
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="imaging_meta.commands.segment"):
        (unchecked,) = segment(ckpt, [support], [query], tmp_path / "out5", device="cpu", empty_if_unlike=True, **PLAIN)
    assert np.asarray(nib.load(str(unchecked)).dataobj).any()
    assert any("--empty-if-unlike did not check this query (no slice features" in r.getMessage() for r in caplog.records)
    monkeypatch.undo()  # the learner's features back, and the stand-in again
    stand_in(monkeypatch, threshold_predict)
    # a support of 3 slices: every slice within GAP of the others, nothing to measure; the warning blamed the
    # checkpoint's learner, and without --empty-if-unlike nothing was said (a review, 2026-12-07)
    vol = phantom(shape=(12, 10, 3), seed=1)
    thin = (ct_nifti(vol, affine_ras(), tmp_path / "thin" / "s.nii.gz"),
            write_nifti(label_for(vol), affine_ras(), tmp_path / "thin" / "l.nii.gz"))
    for extra, out, expected in (({"empty_if_unlike": True}, "out6", "--empty-if-unlike did not check this query (the "
                                  "support scan has too few body slices (3)"),
                                 ({}, "out7", "the appearance check of the queries is off: the support scan has too few "
                                  "body slices (3)")):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="imaging_meta.commands.segment"):
            segment(ckpt, [thin], [query], tmp_path / out, device="cpu", **{**PLAIN, **extra})
        said = [r.getMessage() for r in caplog.records]
        assert sum(expected in line for line in said) == 1, said
        assert not any("no slice features" in line for line in said), said
    from imaging_meta.commands.cli import _tool_parser

    base = ["segment", "--checkpoint", "c", "--support-image", "s", "--support-label", "l", "--query", "q", "--out", "o"]
    assert _tool_parser().parse_args([*base, "--empty-if-unlike"]).empty_if_unlike


def test_segment_warns_about_an_empty_mask_and_says_whether_it_vanished_on_the_query_grid(tmp_path, support,
                                                                                         monkeypatch, caplog):
    """An empty written mask is never silent: the warning names the query and says whether the segmenter found
    nothing, or found voxels at its own spacing that interpolation to the query's grid lost."""
    import logging

    from imaging_meta.commands import segment as command
    from imaging_meta.volume.segmenter import ScanSegmenter

    stand_in(monkeypatch, threshold_predict)
    query = ct_nifti(phantom(seed=2), affine_ras(), tmp_path / "q.nii.gz")
    ckpt = make_checkpoint(tmp_path / "m.ckpt", (1.0, 1.0), (12, 10))

    class Nothing(ScanSegmenter):
        def predict(self, volume, slices=None):
            return torch.zeros(volume.shape)

    monkeypatch.setattr(command, "ScanSegmenter", Nothing)
    with caplog.at_level(logging.WARNING, logger="imaging_meta.commands.segment"):
        (mask,) = segment(ckpt, [support], [query], tmp_path / "out", device="cpu", **PLAIN)
    lines = [r.getMessage() for r in caplog.records if "the mask is empty" in r.getMessage()]
    assert len(lines) == 1 and lines[0].startswith("q.nii.gz: the mask is empty: the segmenter found nothing")
    assert not np.asarray(nib.load(str(mask)).dataobj).any()

    monkeypatch.setattr(command, "ScanSegmenter", ScanSegmenter)
    real_grid = command.to_source_grid
    monkeypatch.setattr(command, "to_source_grid",
                        lambda vol, probs, tf: (np.zeros_like(real_grid(vol, probs, tf)[0]), real_grid(vol, probs, tf)[1]))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="imaging_meta.commands.segment"):
        segment(ckpt, [support], [query], tmp_path / "out2", device="cpu", **PLAIN)
    lines = [r.getMessage() for r in caplog.records if "the mask is empty" in r.getMessage()]
    assert len(lines) == 1 and "none is left after interpolation" in lines[0], lines


def test_a_structure_that_vanishes_at_the_checkpoints_spacing_is_named_as_such(tmp_path, monkeypatch):
    """A structure of one voxel in the label map is lost when resampled to a coarse spacing: the error says so and
    suggests --scale structure, instead of blaming --label-value (the value is in the map)."""
    stand_in(monkeypatch, threshold_predict)
    vol = phantom(seed=1)
    image = ct_nifti(vol, affine_ras(), tmp_path / "sup.nii.gz")
    lab = np.zeros(vol.shape, np.uint8)
    lab[5, 5, 2] = 1  # one 1.5 x 1.25 mm voxel
    label = write_nifti(lab, affine_ras(), tmp_path / "sup_label.nii.gz")
    ckpt = make_checkpoint(tmp_path / "m.ckpt", (6.0, 6.0), (4, 4))
    with pytest.raises(ValueError, match=r"sup_label\.nii\.gz: the structure \(value 1\) is in the label map but "
                                         r"not in the support once it is resampled to 6 x 6 mm in-plane and cropped to "
                                         r"4 x 4 pixels.*Pass --scale structure"):
        segment(ckpt, [(image, label)], [image], tmp_path / "out", label_value=1, device="cpu", **PLAIN)


def test_a_one_slice_support_and_a_structure_that_fills_the_volume_are_warned_about(tmp_path, monkeypatch, caplog):
    import logging

    stand_in(monkeypatch, threshold_predict)
    vol = phantom(seed=1)
    image = ct_nifti(vol, affine_ras(), tmp_path / "sup.nii.gz")
    one = label_for(vol)
    one[..., :2] = 0
    one[..., 3:] = 0  # the box on slice 2 only
    assert one.any()
    label = write_nifti(one, affine_ras(), tmp_path / "one_label.nii.gz")
    ckpt = make_checkpoint(tmp_path / "m.ckpt", (1.0, 1.0), (12, 10))
    with caplog.at_level(logging.WARNING, logger="imaging_meta.commands.segment"):
        segment(ckpt, [(image, label)], [image], tmp_path / "out", device="cpu", **PLAIN)
    assert "the support shows the structure on one slice only" in caplog.text
    assert "fills" not in caplog.text
    caplog.clear()
    two = label_for(vol)  # on two slices, one of them used by choice: no warning
    assert len(np.unique(np.nonzero(two)[2])) == 2
    label = write_nifti(two, affine_ras(), tmp_path / "two_label.nii.gz")
    with caplog.at_level(logging.WARNING, logger="imaging_meta.commands.segment"):
        segment(ckpt, [(image, label)], [image], tmp_path / "out1", device="cpu", max_support_slices=1, **PLAIN)
    assert "one slice only" not in caplog.text
    most = np.ones(vol.shape, np.uint8)
    most[6, 5, :] = 0  # all but a central column: a body mask, or an inverted map
    label = write_nifti(most, affine_ras(), tmp_path / "most_label.nii.gz")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="imaging_meta.commands.segment"):
        segment(ckpt, [(image, label)], [image], tmp_path / "out2", device="cpu", **PLAIN)
    assert "most_label.nii.gz: the structure (any non-zero voxel) fills" in caplog.text


ANONYMISED = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime", "AccessionNumber",
              "StudyID", "ReferringPhysicianName")


@pytest.mark.parametrize("damage", ["empty thickness", "no thickness", "orientation noise", "anonymised"])
def test_a_dicom_seg_of_a_series_the_reader_accepts_is_written_and_reads_back(tmp_path, damage):
    """An empty or absent SliceThickness (type 2 in CT) gave an unreadable .seg.dcm or a late refusal, a
    per-slice orientation that differs by 2e-6 (accepted by the reader) made highdicom refuse the series, and so
    did an anonymiser's deleted type 2 patient and study attributes (PatientBirthDate...; a review): they are
    written present and empty. The source files are never changed."""
    hd = pytest.importorskip("highdicom")
    from imaging_meta.commands.dicom_seg import write_dicom_seg

    volume = phantom(shape=(8, 8, 4))
    files = write_series(tmp_path / "q", volume)
    for k, f in enumerate(files):
        def change(ds, k=k):
            if damage == "empty thickness":
                ds.SliceThickness = ""
            elif damage == "no thickness":
                del ds.SliceThickness
            elif damage == "anonymised":
                for keyword in ANONYMISED:
                    if keyword in ds:
                        delattr(ds, keyword)
            elif k % 2:
                ds.ImageOrientationPatient = [float(v) + 2e-6 for v in ds.ImageOrientationPatient]
        edit(f, change)
    before = {f: f.read_bytes() for f in files}
    paths = DicomSeriesReader().read(str(tmp_path / "q")).series.paths
    mask = np.zeros(volume.shape, dtype=bool)
    mask[2:5, 2:5, 1:3] = True
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = write_dicom_seg(mask, paths, tmp_path / "q.seg.dcm")
    assert any("has no PatientID" in str(w.message) for w in caught) == (damage == "anonymised")
    seg = hd.seg.Segmentation.from_dataset(pydicom.dcmread(out))
    if damage == "anonymised":
        assert all(keyword in seg and not seg[keyword].value for keyword in ANONYMISED)
    measures = seg.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
    assert float(measures.SliceThickness) > 0
    assert int(seg.NumberOfFrames) >= 1
    assert {f: f.read_bytes() for f in files} == before


def test_a_tilted_series_without_slice_thickness_gets_the_spacing_across_its_slices(tmp_path):
    """A review: the fallback SliceThickness was the straight distance between slice positions, which on a
    gantry-tilted series is longer than the spacing across the slices (2.66 for 2.5 mm at 20 degrees)."""
    hd = pytest.importorskip("highdicom")
    from imaging_meta.commands.dicom_seg import write_dicom_seg

    affine = affine_ras(spacing=(1.0, 1.0, 2.5))
    affine[1, 2] = 2.5 * np.tan(np.deg2rad(20.0))  # each slice shifted along y: a tilt of 20 degrees
    volume = phantom(shape=(8, 8, 4))
    files = write_series(tmp_path / "q", volume, affine)
    for f in files:
        edit(f, lambda ds: delattr(ds, "SliceThickness"))
    paths = DicomSeriesReader().read(str(tmp_path / "q")).series.paths
    mask = np.zeros(volume.shape, dtype=bool)
    mask[2:5, 2:5, 1:3] = True
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = write_dicom_seg(mask, paths, tmp_path / "q.seg.dcm")
    seg = hd.seg.Segmentation.from_dataset(pydicom.dcmread(out))
    assert float(seg.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].SliceThickness) == pytest.approx(2.5)


def test_a_series_whose_character_set_starts_with_the_default_repertoire_left_empty_gets_its_seg(tmp_path):
    """A review: ``\\ISO 2022 IR 87`` (an empty first value: the default repertoire, the common Japanese form)
    made highdicom refuse the series; the Segmentation is written, the patient's name read back intact."""
    pytest.importorskip("highdicom")
    from imaging_meta.commands.dicom_seg import write_dicom_seg

    volume = phantom(shape=(8, 8, 3))
    files = write_series(tmp_path / "q", volume)
    name = "Yamada^Tarou=\u5c71\u7530^\u592a\u90ce"
    for f in files:
        def change(ds):
            ds.SpecificCharacterSet = ["", "ISO 2022 IR 87"]
            ds.PatientName = name
        edit(f, change)
    before = {f: f.read_bytes() for f in files}
    paths = DicomSeriesReader().read(str(tmp_path / "q")).series.paths
    mask = np.zeros(volume.shape, dtype=bool)
    mask[2:5, 2:5, 1] = True
    out = write_dicom_seg(mask, paths, tmp_path / "q.seg.dcm")
    back = pydicom.dcmread(out)
    assert str(back.PatientName) == name and list(back.SpecificCharacterSet)[1] == "ISO 2022 IR 87"
    assert {f: f.read_bytes() for f in files} == before  # the source files are never changed


def test_dicom_seg_refusals_come_before_the_work_or_spare_the_other_queries(tmp_path, support, monkeypatch):
    """An enhanced (multi-frame) query is refused before the checkpoint is read; a series whose Segmentation
    highdicom refuses no longer ends the run before the queries after it are written."""
    from imaging_meta.commands import segment as command

    folder = tmp_path / "ENH"
    folder.mkdir()
    single = write_series(tmp_path / "tmp_one", phantom(shape=(8, 8, 3)))[0]
    edit(single, lambda ds: setattr(ds, "NumberOfFrames", 3))
    single.rename(folder / "volume.dcm")
    with pytest.raises(ValueError, match=r"ENH/volume\.dcm: a multi-frame \(enhanced\) series; --format dicom-seg"):
        segment(Path("never-read.ckpt"), [support], [folder], tmp_path / "out", output_format="dicom-seg")
    with monkeypatch.context() as m:  # without the [dicom-seg] extra: refused before the work, not after it
        m.setitem(sys.modules, "highdicom", None)
        with pytest.raises(ImportError, match=r"needs highdicom: pip install 'imaging-meta\[dicom-seg\]'"):
            segment(Path("never-read.ckpt"), [support], [tmp_path / "no-such-series"], tmp_path / "out",
                    output_format="dicom-seg")

    vol_a, aff_a, _ = tricky_series(tmp_path / "SERIES_A")
    tricky_series(tmp_path / "SERIES_B")
    spacing, size = ras_grid(vol_a, aff_a)
    ckpt = make_checkpoint(tmp_path / "m.ckpt", spacing, size)
    stand_in(monkeypatch, threshold_predict)
    real = command._write_seg

    def refuse_a(mask, q, affine, target, label_value):
        if q.name == "SERIES_A":
            raise ValueError(f"{q}: cannot derive a DICOM Segmentation from this series (ValueError: test)")
        return real(mask, q, affine, target, label_value)

    monkeypatch.setattr(command, "_write_seg", refuse_a)
    with pytest.raises(ValueError, match=r"1 of 2 queries got no DICOM Segmentation .*SERIES_A: cannot derive"):
        segment(ckpt, [support], [tmp_path / "SERIES_A", tmp_path / "SERIES_B"], tmp_path / "out", output_format="dicom-seg",
                largest_component=False, device="cpu", options=LEARNER_ONLY, **PLAIN)
    assert (tmp_path / "out" / "SERIES_B.seg.dcm").is_file() and not (tmp_path / "out" / "SERIES_A.seg.dcm").exists()


def test_a_probability_map_of_an_earlier_run_is_named_when_this_run_writes_none(tmp_path, support, caplog):
    import logging

    ckpt = make_checkpoint(tmp_path / "m.ckpt", (2.0, 2.0), (32, 32))
    query = ct_nifti(phantom(seed=5), affine_ras(), tmp_path / "q5.nii.gz")
    segment(ckpt, [support], [query], tmp_path / "out", device="cpu", explain=True, **PLAIN)
    with caplog.at_level(logging.WARNING, logger="imaging_meta.commands.segment"):
        segment(ckpt, [support], [query], tmp_path / "out", device="cpu", **PLAIN)
    assert re.search(r"q5_probability\.nii\.gz is a probability map of an earlier run, not of this one", caplog.text)


def test_a_structure_name_must_be_a_dicom_segment_label_and_fits_the_nifti_description(tmp_path):
    from imaging_meta.commands.nifti_out import nifti_description as _description

    # spaces around a name are dropped (a DICOM segment label loses trailing ones): '   ' is empty (a review)
    for bad in ("", "   ", "x" * 65, "left\\\\right", "tab\there", "lone\udc80"):
        with pytest.raises(ValueError, match=r"--structure-name .*1 to 64 characters \(spaces around it dropped\) "
                                             r"without a backslash"):
            segment(tmp_path / "never-read.ckpt", [], [], tmp_path / "out", structure_name=bad)
    long = "Ä" * 64  # two bytes each: the name is shortened, never the suffix, and never inside a character
    for suffix in ("", ", probability"):
        text = _description(long, suffix)
        assert len(text.encode()) <= 79 and re.search(r"Ä~[0-9a-f]{8}" + re.escape(suffix) + "$", text)
        assert text.startswith("imaging-meta segment: Ä")


@pytest.mark.parametrize("charset,label,utf8", [
    ("ISO_IR 100", "Leber – rechts", True), ("ISO_IR 100", "肝臓", True), ("ISO_IR 100", "liver", False),
    ("ISO_IR 100", "Leber é", False),  # é is in Latin-1
    (None, "Leber é", True), (None, "liver", False),  # no SpecificCharacterSet: the default repertoire, ASCII
    ("ISO_IR 13", "肝臓", True),  # JIS X 0201: katakana, no kanji (Python's shift_jis codec would take them)
])
def test_a_segment_label_outside_the_sources_character_set_is_written_as_given(tmp_path, charset, label, utf8):
    """A review: 肝臓 was written as '??' and 'Leber – rechts' as 'Leber ? rechts' under the source's ISO_IR 100,
    with only pydicom's warning. The Segmentation then uses UTF-8; a label that fits keeps the source's set."""
    pytest.importorskip("highdicom")
    from imaging_meta.commands.dicom_seg import write_dicom_seg

    volume = phantom(shape=(8, 8, 3))
    files = write_series(tmp_path / "q", volume)
    for f in files:
        def change(ds):
            if charset is None:
                if "SpecificCharacterSet" in ds:
                    del ds.SpecificCharacterSet
            else:
                ds.SpecificCharacterSet = charset
        edit(f, change)
    paths = DicomSeriesReader().read(str(tmp_path / "q")).series.paths
    mask = np.zeros(volume.shape, dtype=bool)
    mask[2:5, 2:5, 1] = True
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no replacement characters
        out = write_dicom_seg(mask, paths, tmp_path / "q.seg.dcm", segment_label=label)
    back = pydicom.dcmread(out)
    assert back.SegmentSequence[0].SegmentLabel == label
    assert back.get("SpecificCharacterSet") == ("ISO_IR 192" if utf8 else charset)


def test_a_files_mark_needs_no_python_3_11(tmp_path, monkeypatch):
    """A review: the mark used hashlib.file_digest (Python 3.11), so on Python 3.10, which the package allows,
    every NIfTI query failed after its segmentation was done. The mark is the sha256 of the whole file."""
    import hashlib

    from imaging_meta.commands import query_marks

    scan = tmp_path / "q.nii.gz"
    scan.write_bytes(bytes(range(256)) * 9000)
    before = query_marks.query_mark(scan)
    monkeypatch.delattr(hashlib, "file_digest", raising=False)
    assert query_marks.query_mark(scan) == before == query_marks._mark(
        "q2:", b"file:" + str(256 * 9000).encode() + b":" + hashlib.sha256(scan.read_bytes()).digest())


def test_two_scans_that_differ_after_their_first_mib_have_different_marks(tmp_path, monkeypatch):
    """A review (2026-12-07): a file's mark was its size and first MiB, so two uncompressed NIfTI scans of one size
    whose first MiB is zero padding under the same header had one mark, and `segment` replaced one patient's mask
    with the other's without a word. The mark now covers the whole file; a mask marked the old way is still its
    own scan's."""
    import hashlib

    from imaging_meta.commands.query_marks import is_mark_of, query_mark

    head = bytes(2**20 + 4096)
    a, b = tmp_path / "a" / "T1w.nii", tmp_path / "b" / "T1w.nii"
    for path, tail in ((a, b"patient A"), (b, b"patient B")):
        path.parent.mkdir()
        path.write_bytes(head + tail)
    assert query_mark(a) != query_mark(b) and query_mark(a).startswith("q2:")
    assert is_mark_of(query_mark(a), a) and not is_mark_of(query_mark(a), b)
    # a mask written before: "q:" of the size and first MiB, salted
    salt = b"imaging-meta"
    monkeypatch.delenv("IMAGING_META_SALT", raising=False)
    legacy = "q:" + hashlib.sha256(salt + b"\0" + b"file:" + str(a.stat().st_size).encode() + b":" + head[: 2**20]).hexdigest()[:16]
    assert is_mark_of(legacy, a)
    other = tmp_path / "c.nii"
    other.write_bytes(b"x" + head[1:] + b"patient A")
    assert not is_mark_of(legacy, other)


def test_a_second_structure_never_replaces_the_first_ones_mask_and_output_names_are_checked_first(
        tmp_path, support, monkeypatch):
    """A review: segmenting a second structure of a scan into the same folder replaced the first one's mask
    without a word; `--query .` wrote a hidden '.nii.gz'; a folder at a mask's path failed after all the work."""
    from imaging_meta.commands.segment import output_paths

    ckpt = make_checkpoint(tmp_path / "m.ckpt", (2.0, 2.0), (32, 32))
    query = ct_nifti(phantom(seed=5), affine_ras(), tmp_path / "q5.nii.gz")
    out = tmp_path / "out"
    segment(ckpt, [support], [query], out, device="cpu", structure_name="liver", **PLAIN)
    mask = out / "q5.nii.gz"
    before = mask.read_bytes()
    with pytest.raises(ValueError, match=r"q5\.nii\.gz holds the mask of 'liver' from an earlier run, and this run "
                                         r"segments 'vertebrae'"):
        segment(ckpt, [support], [query], out, device="cpu", structure_name="vertebrae", **PLAIN)
    assert mask.read_bytes() == before
    segment(ckpt, [support], [query], out, device="cpu", structure_name="liver", **PLAIN)  # the same one: replaced
    # ... also given with spaces around it, which a DICOM segment label drops (a rerun was refused; a review)
    segment(ckpt, [support], [query], out, device="cpu", structure_name=" liver ", **PLAIN)
    # another patient's scan of the same name (every DICOM export named `series`), by a later run: refused, where it
    # replaced the first patient's mask without a word (a review of concurrent and repeated runs)
    other = ct_nifti(phantom(seed=7), affine_ras(), tmp_path / "other" / "q5.nii.gz")
    before = mask.read_bytes()
    with pytest.raises(ValueError, match=r"q5\.nii\.gz holds the mask of another scan named like \S+other/q5\.nii\.gz"):
        segment(ckpt, [support], [other], out, device="cpu", structure_name="liver", **PLAIN)
    assert mask.read_bytes() == before
    moved = tmp_path / "moved" / "q5.nii.gz"  # the same scan after the data moved: its own mask, replaced
    moved.parent.mkdir()
    moved.write_bytes(query.read_bytes())
    segment(ckpt, [support], [moved], out, device="cpu", structure_name="liver", **PLAIN)
    # `--query .`: the folder's name
    monkeypatch.chdir(tmp_path / "support")
    assert output_paths(Path("."), out)[0].name == "support.nii.gz"
    # a folder where a mask goes is refused before the checkpoint is read
    (tmp_path / "busy" / "q5.nii.gz").mkdir(parents=True)
    with pytest.raises(ValueError, match=r"q5\.nii\.gz: a folder of that name exists"):
        segment(tmp_path / "never-read.ckpt", [support], [query], tmp_path / "busy", **PLAIN)


def test_a_file_of_the_users_where_a_mask_goes_is_never_replaced(tmp_path, support):
    ckpt = make_checkpoint(tmp_path / "m.ckpt", (2.0, 2.0), (32, 32))
    query = ct_nifti(phantom(seed=5), affine_ras(), tmp_path / "q5.nii.gz")
    out = tmp_path / "out"
    out.mkdir()
    mine = write_nifti(phantom(seed=6), affine_ras(), out / "q5.nii.gz")  # the user's own volume, same name
    before = mine.read_bytes()
    with pytest.raises(ValueError, match=r"q5\.nii\.gz exists and is not a mask that imaging-meta segment wrote"):
        segment(ckpt, [support], [query], out, device="cpu", **PLAIN)
    assert mine.read_bytes() == before
    # nor one named like a probability map of --explain (it was replaced without a word: a review)
    mine.rename(out / "q5_probability.nii.gz")
    with pytest.raises(ValueError, match=r"q5_probability\.nii\.gz exists and is not a mask that imaging-meta segment"):
        segment(ckpt, [support], [query], out, device="cpu", explain=True, **PLAIN)
    assert (out / "q5_probability.nii.gz").read_bytes() == before and not (out / "q5.nii.gz").exists()
    (out / "q5_probability.nii.gz").unlink()  # a run's own map is replaced by the next run of that structure
    segment(ckpt, [support], [query], out, device="cpu", explain=True, **PLAIN)
    segment(ckpt, [support], [query], out, device="cpu", explain=True, **PLAIN)


def test_several_supports_give_the_same_mask_in_any_order_and_must_share_a_modality(tmp_path, support, monkeypatch,
                                                                                     caplog):
    """Swapping two supports changed the mask: the structure's scale came from the first support alone
    (`test_several_supports_share_the_finest_spacing_and_the_widest_field_of_view`), and the calibration's folds
    and the adaptation's episodes followed the order given (a review). Supports of two modalities (one histogram
    and calibration over CT windows and MR percentiles) are refused; a query that is a support is warned about."""
    import logging

    vol = phantom(seed=4)
    other = (ct_nifti(vol, affine_ras(), tmp_path / "other" / "sup2.nii.gz"),
             write_nifti(label_for(vol), affine_ras(), tmp_path / "other" / "sup2_label.nii.gz"))
    query = ct_nifti(phantom(seed=2), affine_ras(), tmp_path / "q.nii.gz")
    ckpt = make_checkpoint(tmp_path / "m.ckpt", (4.0, 4.0), (32, 32))
    masks = []
    for order, folder in (([support, other], "ab"), ([other, support], "ba")):
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="imaging_meta.commands.segment"):
            out = segment(ckpt, order, [query], tmp_path / folder, device="cpu", scale="structure", adapt_steps=2,
                          explain=True)
        masks.append([np.asarray(nib.load(p).dataobj) for p in out])  # the mask and the probability map
    assert len(masks[0]) == 2 and masks[0][1].std() > 0
    for a, b in zip(*masks, strict=True):
        np.testing.assert_array_equal(a, b)

    stand_in(monkeypatch, intensity_predict)

    mr = write_nifti(np.abs(vol).astype(np.int16), affine_ras(), tmp_path / "mr" / "mr.nii.gz")
    mr.with_name("mr.json").write_text(json.dumps({"Modality": "MR"}))
    with pytest.raises(ValueError, match=r"the support scans are of 2 modalities \(CT: .*sup\.nii\.gz; MR: .*mr\.nii\.gz\)"):
        segment(ckpt, [support, (mr, other[1])], [query], tmp_path / "mixed", device="cpu", **PLAIN)
    assert not (tmp_path / "mixed").exists()

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="imaging_meta.commands.segment"):
        segment(ckpt, [support], [support[0]], tmp_path / "self", device="cpu", **PLAIN)
    assert any("1 query is also a support scan" in r.getMessage() for r in caplog.records)


def test_a_query_wider_than_the_structures_working_slices_is_warned_about(tmp_path, support, monkeypatch, caplog):
    """--scale structure sizes the slices to the supports' field of view: a query of a wider field of view is cut to
    its centre, where a structure outside is never found. That is said, naming the query and the fixes; and so is
    a body wider than the checkpoint's own slices (each scan is cut to its body, so that is body, not air)."""
    import logging

    stand_in(monkeypatch, threshold_predict)
    ckpt = make_checkpoint(tmp_path / "m.ckpt", (4.0, 4.0), (32, 32))  # 128 mm slices as trained
    same = ct_nifti(phantom(seed=2), affine_ras(), tmp_path / "same.nii.gz")  # the support's 18 x 12.5 mm
    wide_volume = np.random.default_rng(3).integers(-400, 1000, size=(100, 80, 6)).astype(np.float64)  # all body
    wide = ct_nifti(wide_volume, affine_ras(), tmp_path / "wide.nii.gz")  # 150 x 100 mm
    with caplog.at_level(logging.WARNING, logger="imaging_meta.commands.segment"):
        segment(ckpt, [support], [same, wide], tmp_path / "out", device="cpu", scale="structure", adapt_steps=0)
    lines = [r.getMessage() for r in caplog.records if "working slices hold its central" in r.getMessage()]
    assert len(lines) == 1 and lines[0].startswith("wide.nii.gz spans 150 x 100 mm in plane")
    assert "pass --scale checkpoint (128 x 128 mm)" in lines[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="imaging_meta.commands.segment"):
        segment(ckpt, [support], [same, wide], tmp_path / "out2", device="cpu", scale="checkpoint", adapt_steps=0)
    # at the checkpoint's own 128 mm slices the 150 mm body is cut too: said, without the advice to pass that scale
    lines = [r.getMessage() for r in caplog.records if "working slices hold its central" in r.getMessage()]
    assert len(lines) == 1 and lines[0].startswith("wide.nii.gz spans 150 x 100 mm in plane (its body)")
    assert "the checkpoint's 32 x 32 pixels at 4.00 mm" in lines[0] and "--scale checkpoint" not in lines[0]


def test_a_body_off_the_centre_of_a_wide_grid_of_air_is_segmented_where_it_lies(tmp_path, support, monkeypatch, caplog):
    """A scanner's wide field of view with the body off its centre (a couch under it, a patient off the
    isocentre): the slices were cut around the grid's centre, so a body in a corner was cut away, the mask came
    back empty and the query was warned about as wider than the slices. Each scan is now cropped to its own body
    (`datamodules.transforms.body`) first."""
    import logging

    stand_in(monkeypatch, threshold_predict)
    ckpt = make_checkpoint(tmp_path / "m.ckpt", (4.0, 4.0), (32, 32))
    body = phantom(seed=2)  # 12 x 10 x 6 voxels, its bright box the structure
    grid = np.full((100, 80, 6), -1000.0)  # 150 x 100 mm of air
    grid[80:92, 66:76] = body
    query = ct_nifti(grid, affine_ras(), tmp_path / "corner.nii.gz")
    with caplog.at_level(logging.WARNING, logger="imaging_meta.commands.segment"):
        out = segment(ckpt, [support], [query], tmp_path / "out", device="cpu", scale="structure", adapt_steps=0)
    assert not any("working slices hold its central" in r.getMessage() for r in caplog.records)
    mask = np.asarray(nib.load(out[0]).dataobj) > 0
    truth = np.zeros(grid.shape, bool)
    truth[80:92, 66:76] = label_for(body) > 0
    assert mask[truth].mean() > 0.9 and not mask[:60].any()


def test_the_width_warning_measures_an_oblique_query_along_its_own_axes(tmp_path):
    """The query's extent was its world bounding box: a grid rotated 25 degrees in plane read 30% wider than it is,
    and a query the slices held was warned about (a review). It is measured along the grid's axes."""
    from datamodules.transforms.volume import volume_transforms
    from imaging_meta.commands.segment import _cropped_field

    pre = {"spacing": [2.0, 2.0], "slice_size": [64, 64]}  # 128 mm slices
    tf = volume_transforms(pre["spacing"], pre["slice_size"], keys=("image",))
    for rot, warned in ((0.0, False), (25.0, False), (0.0, True)):
        shape = (60, 60, 4) if not warned else (120, 60, 4)  # 120 x 120 mm, or 240 mm wide
        vol = np.random.default_rng(0).normal(40.0, 20.0, shape)  # a body filling its grid
        path = ct_nifti(vol, affine_ras(spacing=(2.0, 2.0, 5.0), rot_deg=rot), tmp_path / f"q{rot}{warned}.nii.gz")
        cut = _cropped_field(tf({"image": str(path), "modality": "CT"})["image"], pre)
        assert (cut is not None) == warned
        if warned:
            assert cut[0] == pytest.approx((240.0, 120.0))


def test_a_multi_label_support_map_without_label_value_is_warned_about(tmp_path, monkeypatch, caplog):
    """Without --label-value every non-zero voxel is the structure: a multi-label map (a binary map beside a
    TotalSegmentator one took a real liver from Dice 0.72 to 0.24; a review) gets a warning naming its values."""
    import logging

    stand_in(monkeypatch, threshold_predict)
    vol = phantom(seed=1)
    image = ct_nifti(vol, affine_ras(), tmp_path / "s" / "sup.nii.gz")
    label = write_nifti(label_for(vol, values=(1, 5, 7)), affine_ras(), tmp_path / "s" / "sup_label.nii.gz")
    query = ct_nifti(phantom(seed=2), affine_ras(), tmp_path / "q.nii.gz")
    ckpt = make_checkpoint(tmp_path / "m.ckpt", (1.0, 1.0), (12, 10))
    for value, folder in ((None, "all"), (1, "one")):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="imaging_meta.commands.segment"):
            segment(ckpt, [(image, label)], [query], tmp_path / folder, label_value=value, device="cpu", **PLAIN)
        lines = [r.getMessage() for r in caplog.records if "label values" in r.getMessage()]
        assert lines == ([f"{label} holds 3 label values (1, 5, 7): without --label-value every non-zero voxel is "
                          "the structure, all of them together; give --label-value to segment one"] if value is None else [])


def test_a_dicom_segmentation_of_another_series_of_the_same_folder_name_is_not_replaced(tmp_path):
    """`--format dicom-seg` had no such check: a second patient's `series.seg.dcm` replaced the first one's."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    from imaging_meta.commands.segment import _check_same_structure

    first = write_series(tmp_path / "a" / "series", phantom(shape=(8, 8, 3)), seed=1)
    second = write_series(tmp_path / "b" / "series", phantom(shape=(8, 8, 3)), seed=2)
    uid_of = {k: str(pydicom.dcmread(f[0]).SeriesInstanceUID) for k, f in (("a", first), ("b", second))}
    assert uid_of["a"] != uid_of["b"]
    seg = Dataset()
    seg.file_meta = FileMetaDataset()
    seg.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    seg.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.66.4"  # Segmentation Storage
    seg.file_meta.MediaStorageSOPInstanceUID = seg.SOPInstanceUID = "1.2.3.4.5"
    seg.SOPClassUID = "1.2.840.10008.5.1.4.1.1.66.4"
    seg.Modality = "SEG"
    seg.Manufacturer = "imaging-meta"  # written by segment (a SEG of another program is never replaced)
    label, ref = Dataset(), Dataset()
    label.SegmentLabel = "liver"
    ref.SeriesInstanceUID = uid_of["a"]
    seg.SegmentSequence, seg.ReferencedSeriesSequence = [label], [ref]
    path = tmp_path / "out" / "series.seg.dcm"
    path.parent.mkdir()
    seg.save_as(path, enforce_file_format=True)
    _check_same_structure([path], "liver", [tmp_path / "a" / "series"])  # its own series: replaced later
    with pytest.raises(ValueError, match=r"series\.seg\.dcm holds the mask of another scan named like \S+b/series"):
        _check_same_structure([path], "liver", [tmp_path / "b" / "series"])
    # a review (2026-12-07): a SEG sorting first in the query's folder gave its own series' UID, so the query's own
    # mask was refused; files without the preamble gave no UID, so another patient's mask was replaced
    seg.save_as(tmp_path / "a" / "series" / "0_SEG.dcm", enforce_file_format=True)
    _check_same_structure([path], "liver", [tmp_path / "a" / "series"])
    from tests.imaging_meta.test_segment_queries import without_preamble

    without_preamble(second)
    with pytest.raises(ValueError, match=r"series\.seg\.dcm holds the mask of another scan named like \S+b/series"):
        _check_same_structure([path], "liver", [tmp_path / "b" / "series"])


def test_a_support_structure_cut_by_the_slices_is_warned_about(tmp_path, monkeypatch, caplog):
    """A support whose structure lies partly beyond the slices the checkpoint sees loses those voxels: a warning
    names the label map and the field of view (a review found 62% of a lateral structure lost silently)."""
    import logging

    stand_in(monkeypatch, threshold_predict)
    vol = phantom(seed=1)
    image = ct_nifti(vol, affine_ras(), tmp_path / "sup.nii.gz")
    lab = np.zeros(vol.shape, np.uint8)
    lab[0:4, 3:7, 1:5] = 1  # at the grid's lateral edge: 18 mm of grid, 8 mm of slices
    label = write_nifti(lab, affine_ras(), tmp_path / "edge_label.nii.gz")
    small = make_checkpoint(tmp_path / "m.ckpt", (1.0, 1.0), (8, 8))
    with caplog.at_level(logging.WARNING, logger="imaging_meta.commands.segment"):
        segment(small, [(image, label)], [image], tmp_path / "out", device="cpu", **PLAIN)
    assert "edge_label.nii.gz: the structure (any non-zero voxel) reaches the edge of the support's 8 x 8-pixel " \
           "slices at 1 x 1 mm (8 x 8 mm across)" in caplog.text
    caplog.clear()
    central = write_nifti(label_for(vol), affine_ras(), tmp_path / "central_label.nii.gz")
    wide = make_checkpoint(tmp_path / "w.ckpt", (1.0, 1.0), (24, 24))
    with caplog.at_level(logging.WARNING, logger="imaging_meta.commands.segment"):
        segment(wide, [(image, central)], [image], tmp_path / "out1", device="cpu", **PLAIN)
    assert "reaches the edge" not in caplog.text


def test_a_segmentation_of_another_program_is_never_replaced(tmp_path):
    """A review: any DICOM SEG at a mask's path whose segment was named like this run's structure was taken for an
    earlier run's and replaced without a word (a radiologist's manual segmentation, say). Only a Segmentation that
    imaging-meta wrote is ours."""
    pytest.importorskip("highdicom")
    from imaging_meta.commands.dicom_seg import write_dicom_seg
    from imaging_meta.commands.segment import _check_same_structure, _structure_of

    volume = phantom(shape=(8, 8, 3))
    paths = DicomSeriesReader().read(str(write_series(tmp_path / "q", volume)[0].parent)).series.paths
    mask = np.zeros(volume.shape, dtype=bool)
    mask[2:5, 2:5, 1] = True
    ours = write_dicom_seg(mask, paths, tmp_path / "ours.seg.dcm", segment_label="structure")
    theirs = write_dicom_seg(mask, paths, tmp_path / "theirs.seg.dcm", segment_label="structure")
    edit(theirs, lambda ds: setattr(ds, "Manufacturer", "Radiologist workstation"))
    before = theirs.read_bytes()
    assert _structure_of(ours) == "structure" and _structure_of(theirs) is None
    _check_same_structure([ours], "structure")  # an earlier run's own mask of this structure: may be replaced
    with pytest.raises(ValueError, match=r"theirs\.seg\.dcm exists and is not a mask that imaging-meta segment wrote"):
        _check_same_structure([theirs], "structure")
    assert theirs.read_bytes() == before


def test_two_long_structure_names_that_differ_past_the_nifti_cut_keep_their_masks_apart(tmp_path, support):
    """A review: names were compared after being cut to fit the NIfTI description (57 bytes), so a second
    structure whose name differed only past the cut replaced the first one's mask."""
    from imaging_meta.commands.nifti_out import nifti_description

    stem = "left anterior descending coronary artery, proximal segment"
    first, second = stem + " 1", stem + " 2"
    assert nifti_description(first) != nifti_description(second)
    assert nifti_description(first) == nifti_description(first) and len(nifti_description(first).encode()) <= 79
    ckpt = make_checkpoint(tmp_path / "m.ckpt", (2.0, 2.0), (32, 32))
    query = ct_nifti(phantom(seed=5), affine_ras(), tmp_path / "q5.nii.gz")
    out = tmp_path / "out"
    segment(ckpt, [support], [query], out, device="cpu", structure_name=first, **PLAIN)
    before = (out / "q5.nii.gz").read_bytes()
    with pytest.raises(ValueError, match=r"q5\.nii\.gz holds the mask of .* from an earlier run, and this run segments"):
        segment(ckpt, [support], [query], out, device="cpu", structure_name=second, **PLAIN)
    assert (out / "q5.nii.gz").read_bytes() == before
    segment(ckpt, [support], [query], out, device="cpu", structure_name=first, **PLAIN)  # the same one: replaced


@pytest.mark.parametrize("layout", ["two enhanced files", "an enhanced file and a README"])
def test_an_enhanced_query_is_refused_for_dicom_seg_before_the_work_however_its_folder_looks(tmp_path, support, layout):
    """A review: only a folder of exactly one file was checked up front; a series split into two enhanced files,
    or an enhanced file beside a README, was refused after the segmenting (the first with an error about the
    number of files)."""
    pytest.importorskip("highdicom")
    from tests.datamodules.dicom_fixtures import write_enhanced

    files = write_series(tmp_path / "single", phantom(shape=(8, 8, 4)))
    folder = tmp_path / "ENH"
    if layout == "two enhanced files":
        write_enhanced(files[:2], folder / "a.dcm", instance=1)
        write_enhanced(files[2:], folder / "b.dcm", instance=2)
    else:
        write_enhanced(files, folder / "b.dcm")
        (folder / "README.txt").write_text("exported by a workstation\n")
    with pytest.raises(ValueError, match=r"ENH/[ab]\.dcm: a multi-frame \(enhanced\) series; --format dicom-seg"):
        segment(Path("never-read.ckpt"), [support], [folder], tmp_path / "out", output_format="dicom-seg")


def test_a_support_given_twice_is_used_once_and_one_scan_with_two_label_maps_is_refused(tmp_path, support, caplog):
    """A review: a support pair given twice was accepted and counted as a second patient in the fits across
    support scans (its novelty reference distance 0: a query called unlike the supports and emptied)."""
    import logging
    import shutil

    ckpt = make_checkpoint(tmp_path / "m.ckpt", (2.0, 2.0), (32, 32))
    query = ct_nifti(phantom(seed=5), affine_ras(), tmp_path / "q5.nii.gz")
    once = segment(ckpt, [support], [query], tmp_path / "once", device="cpu", **PLAIN)
    again = (Path(str(support[0])), Path(os.path.relpath(support[1])))  # the same files, written another way
    with caplog.at_level(logging.WARNING, logger="imaging_meta.commands.segment"):
        twice = segment(ckpt, [support, again], [query], tmp_path / "twice", device="cpu", **PLAIN)
    assert "1 support (image, label) pair(s) given more than once, used once" in caplog.text
    assert nib.load(twice[0]).get_fdata().tolist() == nib.load(once[0]).get_fdata().tolist()
    other_label = shutil.copy(support[1], tmp_path / "rater2_label.nii.gz")
    with pytest.raises(ValueError, match=r"sup\.nii\.gz is given with 2 label maps: each support scan once"):
        segment(ckpt, [support, (support[0], other_label)], [query], tmp_path / "two", device="cpu", **PLAIN)
    # a copy of the scan in another folder (a review, 2026-12-07: refused after the first query's adaptation,
    # naming neither file, with indices of the supports' sorted order): refused up front, naming both
    (tmp_path / "copy").mkdir()
    copy = (shutil.copy(support[0], tmp_path / "copy" / "sup.nii.gz"), shutil.copy(support[1], tmp_path / "copy" / "l.nii.gz"))
    with pytest.raises(ValueError, match=r"support images \S+sup\.nii\.gz and \S+sup\.nii\.gz are the same scan \(a copy\)"):
        segment(ckpt, [support, copy], [query], tmp_path / "copied", device="cpu", **{**PLAIN, "adapt_steps": 2})


def test_a_position_prior_that_cannot_be_fitted_is_said_not_ignored(tmp_path, support, caplog):
    """A review: --position-prior with one support scan, or with --pooled-calibration, was dropped without a word."""
    import logging

    from imaging_meta.volume.segmenter import ScanOptions

    ckpt = make_checkpoint(tmp_path / "m.ckpt", (2.0, 2.0), (32, 32))
    query = ct_nifti(phantom(seed=5), affine_ras(), tmp_path / "q5.nii.gz")
    with caplog.at_level(logging.WARNING, logger="imaging_meta.commands.segment"):
        segment(ckpt, [support], [query], tmp_path / "out", device="cpu", options=ScanOptions(position=True), **PLAIN)
    assert "--position-prior is not used: it is fitted across two or more support scans" in caplog.text


def test_the_up_front_enhanced_check_passes_over_objects_that_are_not_images(tmp_path):
    """A review of the check above: a SEG object (multi-frame too) sorting first got a single-frame series refused,
    and a presentation state sorting first let an enhanced query through to the work."""
    pytest.importorskip("highdicom")
    from imaging_meta.commands.segment import _multi_frame_file
    from tests.datamodules.dicom_fixtures import write_enhanced

    files = write_series(tmp_path / "CT", phantom(shape=(8, 8, 4)))
    seg = tmp_path / "CT" / "0000_manual_seg.dcm"
    seg.write_bytes(files[0].read_bytes())
    edit(seg, lambda ds: (setattr(ds, "Modality", "SEG"), setattr(ds, "SOPClassUID", "1.2.840.10008.5.1.4.1.1.66.4"),
                          setattr(ds, "NumberOfFrames", 4)))
    assert _multi_frame_file(tmp_path / "CT") is None  # a single-frame series, whatever sorts first
    enhanced = write_enhanced(files, tmp_path / "ENH" / "b.dcm")
    state = tmp_path / "ENH" / "PR_0001.dcm"
    state.write_bytes(files[0].read_bytes())
    edit(state, lambda ds: (setattr(ds, "Modality", "PR"), setattr(ds, "SOPClassUID", "1.2.840.10008.5.1.4.1.1.11.1")))
    assert _multi_frame_file(tmp_path / "ENH") == enhanced
