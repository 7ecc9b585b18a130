"""What a mutation review of the DICOM Segmentation writer and the explanations found unguarded: the SEG's own
identity (new series and instance UIDs, BINARY at one bit), its frames (one per slice that shows the structure,
each the mask of the slice it references, on a tilted series with empty slices), the occlusion map's rows and
columns on a query that is not square, and what the classify explanation's panel and JSON show."""

import json
import warnings

import numpy as np
import pydicom
import pytest
import torch
from PIL import Image

from datamodules.io.dicom import DicomSeriesReader
from imaging_meta.commands import explain as explain_module
from imaging_meta.commands.classify import classify, explain_dir
from imaging_meta.commands.explain import occlusion_saliency
from imaging_meta.episode import Episode
from tests.datamodules.dicom_fixtures import affine_ras, write_series
from tests.imaging_meta.test_classify_answers import pixels_checkpoint
from tests.imaging_meta.test_classify_explain import region_learner, write_folders


# ------------------------------------------------------------------------------------------ DICOM Segmentation
def test_a_seg_has_its_own_uids_one_bit_frames_and_one_frame_per_slice_that_shows_the_structure(tmp_path):
    pytest.importorskip("highdicom")
    from imaging_meta.commands.dicom_seg import write_dicom_seg

    shape = (11, 7, 5)
    vol = np.random.default_rng(1).integers(-1000, 1000, size=shape).astype(float)
    aff = affine_ras(spacing=(1.5, 1.25, 3.0), rot_deg=30.0, slice_sign=-1.0)
    tilt = np.deg2rad(25)
    aff[:3, :3] = np.array([[1, 0, 0], [0, np.cos(tilt), -np.sin(tilt)], [0, np.sin(tilt), np.cos(tilt)]]) @ aff[:3, :3]
    write_series(tmp_path / "q", vol, aff, seed=5, reverse=True, shuffle_names=True)
    series = DicomSeriesReader().read(str(tmp_path / "q")).series
    mask = np.random.default_rng(7).random(series.shape) > 0.6
    mask[:, :, 1] = mask[:, :, 3] = False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(write_dicom_seg(mask, series.paths, tmp_path / "q.seg.dcm", segment_label="liver"))
    sources = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID): k for k, p in enumerate(series.paths)}
    first = pydicom.dcmread(series.paths[0], stop_before_pixels=True)
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4" and ds.SegmentationType == "BINARY"
    assert int(ds.BitsAllocated) == 1
    assert ds.SeriesInstanceUID != first.SeriesInstanceUID and ds.SOPInstanceUID not in sources
    assert ds.StudyInstanceUID == first.StudyInstanceUID and ds.FrameOfReferenceUID == first.FrameOfReferenceUID
    rows, cols, n = int(ds.Rows), int(ds.Columns), int(ds.NumberOfFrames)
    frames = np.unpackbits(np.frombuffer(ds.PixelData, np.uint8), bitorder="little")[: n * rows * cols]
    frames = frames.reshape(n, rows, cols).astype(bool)
    shown = []
    for frame, item in zip(frames, ds.PerFrameFunctionalGroupsSequence, strict=True):
        k = sources[str(item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID)]
        np.testing.assert_array_equal(frame, mask[:, :, k].T)
        shown.append(k)
    assert sorted(shown) == [0, 2, 4]  # the empty slices have no frame
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        empty = pydicom.dcmread(write_dicom_seg(np.zeros(series.shape, bool), series.paths, tmp_path / "e.seg.dcm"))
    assert int(empty.NumberOfFrames) == shape[2]  # nothing found: every slice, empty, so the SEG still says so


# ------------------------------------------------------------------------------------------ occlusion
ROWS, COLS = slice(2, 6), slice(16, 24)  # not square, not centred, in a 20 x 28 image


def test_the_occlusion_map_lies_on_the_rows_and_columns_the_model_reads():
    query = torch.zeros(1, 1, 20, 28)
    query[..., ROWS, COLS] = 1.0
    ep = Episode(support_images=torch.rand(4, 1, 20, 28), support_labels=torch.tensor([0, 0, 1, 1]),
                 query_images=query, query_labels=torch.zeros(1, dtype=torch.long), classes=["a", "b"])
    occ = occlusion_saliency(region_learner(region=(ROWS, COLS)), ep, patch_size=2, stride=2)
    inside = torch.zeros(20, 28, dtype=torch.bool)
    inside[ROWS, COLS] = True
    assert occ.saliency.shape == (20, 28)
    assert float(occ.saliency[inside].min()) > 0 and float(occ.saliency[~inside].abs().max()) == 0.0
    assert occlusion_saliency(region_learner(region=(ROWS, COLS)), ep, patch_size=6).stride == 3  # half the patch when not given


# ------------------------------------------------------------------------------------------ classify --explain
def test_the_panel_shows_the_nearest_supports_and_the_json_the_maps_extremes(tmp_path, monkeypatch):
    support, queries = write_folders(tmp_path)
    # a query halfway between two classes: its probability is not saturated, so occluding moves it both ways
    halves = [np.asarray(Image.open(queries / f"q{c}.png"), dtype=np.float64) for c in (0, 1)]
    Image.fromarray(((halves[0] + halves[1]) / 2).astype(np.uint8)).save(queries / "q_mix.png")
    shown = []
    real = explain_module.save_explanation_panel

    def captured(path, image, supports, titles, saliency, **kwargs):
        shown.append((supports.clone(), saliency.clone()))
        return real(path, image, supports, titles, saliency, **kwargs)

    monkeypatch.setattr(explain_module, "save_explanation_panel", captured)
    out = classify(pixels_checkpoint(tmp_path / "px.ckpt"), support, [queries], tmp_path / "p.csv", device="cpu",
                   space="learned", explain=True)
    records = [json.loads(p.read_text()) for p in sorted(explain_dir(out).glob("*.json"))]
    assert len(records) == len(shown) == 4
    files = sorted(support.rglob("*.png"))
    pixels = {f: np.asarray(Image.open(f), dtype=np.float64).ravel() for f in files}
    for rec, (supports, saliency) in zip(records, shown, strict=True):
        for item, image in zip(rec["nearest_supports"]["items"], supports, strict=True):
            drawn = image.double().reshape(image.shape[0], -1).mean(0).numpy()  # grey, whatever the channels
            closest = max(files, key=lambda f: np.corrcoef(pixels[f], drawn)[0, 1])  # the support file it is
            assert str(closest) == item["path"]
        assert rec["saliency"]["min_drop"] == round(float(saliency.min()), 6)
        assert rec["saliency"]["max_drop"] == round(float(saliency.max()), 6)
    mixed = shown[-1][1]  # q_mix, last by name
    assert float(mixed.min()) < 0 < float(mixed.max())
