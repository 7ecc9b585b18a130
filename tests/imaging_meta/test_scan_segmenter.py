"""The scan segmenter (intensity evidence, negative slices, calibration, z smoothing) and the whole-scan
protocols, on synthetic volumes with known answers. Stand-in learners make the learned evidence known."""

from __future__ import annotations

import dataclasses
import re

import nibabel as nib
import numpy as np
import pytest
import torch

from imaging_meta.evaluation.scans import COPY, LEARNER_ONLY_NAME, WINDOW, Scan, load_structure, score_pair
from imaging_meta.learners.base import Learner
from imaging_meta.volume.evidence import (
    IntensityModel,
    LogisticFusion,
    best_threshold,
    consecutive_runs,
    logit,
    slice_gate,
    smooth_z,
)
from imaging_meta.volume.segmenter import LEARNER_ONLY, ScanOptions, ScanSegmenter, structure_slices


class ConstantLearner(Learner):
    """Predicts the same foreground probability everywhere: no learned evidence at all."""

    def __init__(self, p: float = 0.4) -> None:
        super().__init__()
        self.p = p

    def predict(self, episode):
        return torch.full(episode.query_images.shape[:2] + episode.query_images.shape[-2:], self.p)


class BrightLearner(Learner):
    """Foreground probability 0.9 where the query pixel is brighter than 0.5, else 0.05."""

    def predict(self, episode):
        q = episode.query_images[:, :, 0]
        return torch.where(q > 0.5, torch.tensor(0.9), torch.tensor(0.05))


def _volume(depth=12, size=20, lo=4, hi=8, organ=0.8, other=0.3, seed=0):
    """Body (0.3) with a 6 x 6 organ (0.8) on slices lo..hi; noise-free; returns image, mask."""
    img = torch.full((size, size, depth), other)
    img[:2], img[-2:] = 0.0, 0.0
    mask = torch.zeros(size, size, depth, dtype=torch.bool)
    mask[7:13, 7:13, lo : hi + 1] = True
    img[mask] = organ
    return img, mask


def test_intensity_model_log_ratio_sign():
    values = torch.tensor([0.1] * 50 + [0.8] * 50)
    labels = torch.tensor([0] * 50 + [1] * 50)
    m = IntensityModel().fit(values, labels)
    assert m.llr(torch.tensor([0.8])).item() > 2.0
    assert m.llr(torch.tensor([0.1])).item() < -2.0
    with pytest.raises(ValueError, match="both foreground and background"):
        IntensityModel().fit(values, torch.ones(100))


def test_logistic_fusion_learns_the_informative_feature():
    torch.manual_seed(0)
    y = (torch.rand(2000) > 0.7).float()
    x = torch.stack([torch.randn(2000), y * 4 - 2 + 0.3 * torch.randn(2000)], 1)
    f = LogisticFusion().fit(x, y)
    assert abs(f.weight[1].item()) > 5 * abs(f.weight[0].item())
    acc = ((f.logits(x) > 0).float() == y).float().mean().item()
    assert acc > 0.95


def test_a_learner_sure_of_every_pixel_still_gives_finite_evidence():
    """A float32 sigmoid saturates to exactly 0 and 1: the learner's logit is clamped, so the fusion's weights stay
    finite (unclamped they were NaN, and the query's prediction empty, a review, 2026-12-08)."""
    sure = logit(torch.tensor([0.0, 1.0]))
    torch.testing.assert_close(sure, torch.tensor([-1.0, 1.0]) * float(np.log((1 - 1e-4) / 1e-4)), atol=1e-3, rtol=0)
    y = torch.tensor([0.0, 1.0] * 50)
    f = LogisticFusion().fit(logit(y)[:, None], y)
    assert torch.isfinite(f.weight).all() and ((f.logits(logit(y)[:, None]) > 0).float() == y).all()


def test_the_fusions_penalty_keeps_a_separable_supports_weight_bounded():
    """Features of +1 and -1 separate the support perfectly: without the L2 penalty the weight only stops where
    the optimiser does (16.7 after 50 steps); with it the optimum is finite (4.7)."""
    y = torch.tensor([0.0, 1.0] * 50)
    w = LogisticFusion().fit((2 * y - 1)[:, None], y).weight
    assert w is not None and 3.0 < float(w[0]) < 10.0


def test_best_threshold_and_gate():
    probs = torch.tensor([0.1, 0.3, 0.42, 0.9])
    labels = torch.tensor([0, 0, 1, 1])
    assert 0.3 <= best_threshold(probs, labels) < 0.42
    # the lowest of tied thresholds; the whole range of candidates, up to the 0.95 cap
    assert best_threshold(torch.tensor([0.2, 0.8]), torch.tensor([0, 1])) == pytest.approx(0.2 + 0.05)
    assert best_threshold(torch.tensor([0.6, 0.97]), torch.tensor([0, 1])) == pytest.approx(0.6)
    assert slice_gate(torch.tensor([0.8, 0.9]), torch.tensor([0.1, 0.2])) == pytest.approx(0.5)
    assert slice_gate(torch.tensor([0.8]), torch.tensor([])) is None
    assert slice_gate(torch.tensor([0.1]), torch.tensor([0.9])) is None  # no better than chance: no gate


def test_smooth_z_averages_neighbours_and_keeps_edges():
    v = torch.zeros(1, 1, 5)
    v[..., 2] = 1.0
    s = smooth_z(v, 0.25)
    assert s[0, 0].tolist() == pytest.approx([0.0, 0.25, 0.5, 0.25, 0.0])
    # the edges replicated, not padded with zeros: a structure reaching the last slice keeps it whole
    assert torch.equal(smooth_z(torch.ones(1, 1, 4), 0.25), torch.ones(1, 1, 4))
    ramp = smooth_z(torch.tensor([[[1.0, 0.0, 0.0]]]), 0.25)
    assert ramp[0, 0].tolist() == pytest.approx([0.75, 0.25, 0.0])


def test_intensity_evidence_segments_what_an_uninformative_learner_cannot():
    s_img, s_mask = _volume()
    q_img, q_mask = _volume(lo=3, hi=9)
    learner = ConstantLearner(0.4)
    plain = ScanSegmenter(learner, LEARNER_ONLY).fit([(s_img, s_mask)]).predict(q_img) > 0.5
    fused = (
        ScanSegmenter(learner, ScanOptions(negatives=False, smooth_z=0.0))
        .fit([(s_img, s_mask)])
        .predict(q_img)
        > 0.5
    )
    assert not plain.any()  # 0.4 everywhere: nothing
    assert torch.equal(fused, q_mask)  # the intensity likelihood alone finds the organ exactly


def test_the_learners_passes_over_slice_chunks_report_progress():
    """A large query at a fine scale spent minutes in the learner's passes without a bar (only the queries had one)."""
    s_img, s_mask = _volume(size=80)
    q_img, _ = _volume(lo=3, hi=9, size=80)  # 80 x 80 slices: one slice a pass at query_chunk 1
    bars = []

    def progress(iterable, desc, total=None, unit="it"):
        bars.append((desc, total, unit))
        return iterable

    options = dataclasses.replace(LEARNER_ONLY, query_chunk=1)
    with_bar = ScanSegmenter(ConstantLearner(0.9), options, progress=progress).fit([(s_img, s_mask)]).predict(q_img)
    plain = ScanSegmenter(ConstantLearner(0.9), options).fit([(s_img, s_mask)]).predict(q_img)
    assert ("segmenting slices", q_img.shape[-1], "chunk") in bars and torch.equal(with_bar, plain)


def test_negative_slices_leave_distractor_slices_empty():
    s_img, s_mask = _volume()
    q_img, q_mask = _volume()
    for img in (s_img, q_img):  # isolated bright specks on slices without the organ, in support and query
        for z in (0, 1, 10, 11):
            img[4, 4, z] = img[15, 12, z] = 0.8
    learner = BrightLearner()
    base = ScanOptions(intensity=False, smooth_z=0.0)
    without = (
        ScanSegmenter(learner, dataclasses.replace(base, negatives=False))
        .fit([(s_img, s_mask)])
        .predict(q_img)
    )
    seg = ScanSegmenter(learner, base).fit([(s_img, s_mask)])
    with_gate = seg.predict(q_img)
    assert seg.gate is not None
    assert (without[..., [0, 1, 10, 11]] > 0.5).any()  # the specks are foreground without the rule
    assert not (with_gate[..., [0, 1, 10, 11]] > 0.5).any()  # and left empty with it
    assert torch.equal(with_gate[..., 4:9] > 0.5, q_mask[..., 4:9])


def test_oracle_slices_restrict_the_prediction():
    s_img, s_mask = _volume()
    seg = ScanSegmenter(ConstantLearner(0.9), LEARNER_ONLY).fit([(s_img, s_mask)], slices=[[6]])
    out = seg.predict(s_img, slices=[5, 6])
    assert (out[..., [5, 6]] > 0.5).all() and not (out[..., [0, 1, 2, 3, 4, 7]] > 0).any()


def test_z_smoothing_treats_slices_not_predicted_as_not_predicted():
    """The oracle predicts its chunks one at a time; smoothing a one-slice chunk with the zeros of the slices
    around it (not predicted, not empty) halved its probability and emptied the mask (a review: 3D Dice 0.000 on
    every pair, 0.918 without smoothing). Each run of predicted slices is smoothed on its own, its ends replicated."""
    s_img, s_mask = _volume()
    opts = dataclasses.replace(LEARNER_ONLY, smooth_z=0.25)
    seg = ScanSegmenter(ConstantLearner(0.9), opts).fit([(s_img, s_mask)], slices=[[6]])
    one = seg.predict(s_img, slices=[6])
    torch.testing.assert_close(one[..., 6], torch.full_like(one[..., 6], 0.9))
    assert not (one[..., [5, 7]] > 0).any()
    runs = seg.predict(s_img, slices=[2, 3, 6, 7, 8])
    # each run's ends replicated: a constant 0.9 stays 0.9 (averaged with zeros around a run it fell to 0.675)
    torch.testing.assert_close(runs[..., [2, 3, 6, 7, 8]], torch.full_like(runs[..., [2, 3, 6, 7, 8]], 0.9))
    assert not (runs[..., [0, 1, 4, 5, 9]] > 0).any()
    assert consecutive_runs([5, 6, 7, 9, 3]) == [(3, 4), (5, 8), (9, 10)] and consecutive_runs([]) == []


def organ_at(x0, seed):
    """A 32 x 32 x 12 scan (air on its first and last two rows) with its organ at rows ``x0``..``x0 + 5``."""
    img = torch.full((32, 32, 12), 0.3)
    img[:2], img[-2:] = 0.0, 0.0
    mask = torch.zeros(32, 32, 12, dtype=torch.bool)
    mask[x0 : x0 + 6, 7:13, 4:9] = True
    img[mask] = 0.8
    return img + 1e-3 * torch.rand(img.shape, generator=torch.Generator().manual_seed(seed)), mask


def _write(path, array, spacing=(4.5, 4.5, 5.0)):
    nib.save(nib.Nifti1Image(array, np.diag([*spacing, 1.0])), str(path))
    return str(path)


def test_the_oracle_extent_is_the_query_files_even_where_preprocessing_loses_a_thin_tip(tmp_path):
    """A review (2026-12-07): the oracle's extent came from the preprocessed query mask, where one-voxel tips at
    0.8 mm vanish at 4.5 mm, so their slices were never predicted (scored as missed) while the baselines got the
    whole extent. With a learner that says 'foreground' everywhere the oracle predicts every slice of the file's
    extent, tips included."""
    pre = {"spacing": [4.5, 4.5], "slice_size": [16, 16], "ct_window": [-250.0, 250.0], "mr_percentiles": [1.0, 99.0]}
    scans = []
    for name in ("s", "q"):
        hu = np.full((32, 32, 12), 40.0, np.float32)
        lab = np.zeros(hu.shape, np.uint8)
        lab[8:24, 8:24, 3:9] = 3
        if name == "q":
            lab[16, 16, [2, 9]] = 3  # the tips
        hu[lab == 3] = 200.0
        spacing = (0.8, 0.8, 5.0)
        scans.append(Scan(_write(tmp_path / f"{name}.nii.gz", hu, spacing), _write(tmp_path / f"{name}_l.nii.gz", lab, spacing),
                          3, "CT", "organ"))
    query = load_structure(scans[1], pre, query=True)
    assert structure_slices(query.pre["struct"]) == list(range(3, 9)), "the tips are gone after preprocessing"
    oracle = {r["method"]: r for r in score_pair(ConstantLearner(0.99), pre, scans[0], scans[1], "oracle_extent",
                                                  ablations=False)}
    truth = 16 * 16 * 6 + 2
    assert oracle[LEARNER_ONLY_NAME]["dice"] == pytest.approx(2 * truth / (truth + 32 * 32 * 8))


def test_protocols_known_answers(tmp_path):
    """A learner that says 'foreground' everywhere: whole_scan predicts the whole volume, oracle_extent the
    query's true extent; 3D Dice is then known in closed form, and the window baseline is exact."""
    shape = (16, 16, 10)
    pre = {
        "spacing": [4.5, 4.5],
        "slice_size": [16, 16],
        "ct_window": [-250.0, 250.0],
        "mr_percentiles": [1.0, 99.0],
    }
    scans = []
    for name, (lo, hi) in (("s", (2, 7)), ("q", (3, 6))):
        hu = np.full(shape, 40.0, np.float32)
        lab = np.zeros(shape, np.uint8)
        lab[5:9, 5:9, lo : hi + 1] = 3
        hu[lab == 3] = 200.0
        scans.append(
            Scan(
                _write(tmp_path / f"{name}.nii.gz", hu),
                _write(tmp_path / f"{name}_l.nii.gz", lab),
                3,
                "CT",
                "organ",
            )
        )
    truth = 16 * 4  # 4 x 4 x 4 query voxels
    everywhere = ConstantLearner(0.99)
    whole = {
        r["method"]: r for r in score_pair(everywhere, pre, scans[0], scans[1], "whole_scan", ablations=False)
    }
    oracle = {
        r["method"]: r
        for r in score_pair(everywhere, pre, scans[0], scans[1], "oracle_extent", ablations=False)
    }
    assert whole[LEARNER_ONLY_NAME]["dice"] == pytest.approx(2 * truth / (truth + 16 * 16 * 10))
    assert oracle[LEARNER_ONLY_NAME]["dice"] == pytest.approx(2 * truth / (truth + 16 * 16 * 4))
    assert (
        oracle[LEARNER_ONLY_NAME]["uses_query_extent"] and not whole[LEARNER_ONLY_NAME]["uses_query_extent"]
    )
    assert {r["scale"] for r in [*whole.values(), *oracle.values()]} == {"checkpoint"}
    assert whole[WINDOW]["dice"] == pytest.approx(
        1.0
    )  # support foreground is 200 HU exactly, so is the query's
    assert whole["trained"]["dice"] == pytest.approx(1.0)  # the intensity evidence fixes the learner
    # the untrained encoder runs the same recipe as "trained", so that "trained − untrained encoder" is what
    # meta-training added: with the very same network it is 0 (with the learner alone it was +0.80; a review)
    same = {r["method"]: r for r in score_pair(everywhere, pre, scans[0], scans[1], "whole_scan", ablations=False,
                                                untrained=everywhere)}
    assert same["untrained encoder"]["dice"] == same["trained"]["dice"] == pytest.approx(1.0)
    assert oracle[COPY]["dice"] > 0.7  # the support's extent mapped onto the query's
    with pytest.raises(ValueError, match="protocol"):
        score_pair(everywhere, pre, scans[0], scans[1], "nope")


def test_scan_pairs_cross_patient_same_modality_and_report():
    from imaging_meta.commands.evaluate_scans import scan_pairs, scans_markdown

    scans = [
        {"image": f"{p}.nii.gz", "label": f"{p}_l.nii.gz", "modality": m, "organs": o, "patient": p, "site": m}
        for p, m, o in (("a", "CT", {"spleen": 1}), ("b", "CT", {"spleen": 1}), ("c", "MR", {"spleen": 1}),
                        ("d", "CT", {"liver": 2}))
    ]
    pairs = scan_pairs(scans, pairs=10)
    assert {(s.patient, q.patient) for s, q in pairs} == {("a", "b"), ("b", "a")}  # no MR-CT, no self, no liver pair
    assert scan_pairs(scans, pairs=10) == pairs  # seeded
    assert scan_pairs(scans, pairs=10, pairing="cross_site") == []  # a and b share their site
    assert len(scan_pairs(scans, pairs=10, pairing="any")) == 2
    recs = [{"protocol": "whole_scan", "method": m, "dice": d, "hd95": 3.0, "structure": "spleen", "support": s,
             "query": q} for s, q in (("a", "b"), ("b", "a")) for m, d in (("trained", 0.8), (COPY, 0.5))]
    md = scans_markdown(recs)
    assert "| trained − copy support mask | 0.300" in md and "2 (support, query) volume pairs" in md
    assert "--scale structure" not in md
    assert "--scale structure" in scans_markdown([{**r, "scale": "structure"} for r in recs])
    assert "| 3.0 | – |" in md and "self-check below" not in md  # records without the self-check (older runs)
    checked = [{**r, "support_dice": (0.3 if r["support"] == "a" else 0.9) if r["method"] == "trained" else None}
               for r in recs]
    md = scans_markdown(checked)
    assert "| 3.0 | 0.600 |" in md  # the trained rows' mean self-check; the baselines have none
    assert "1 pair(s) with a support self-check below 0.4 (`segment` warns there): trained 3D Dice 0.800" in md
    assert "found nothing" not in md
    retried = [{**r, "relaxed": "without intensity evidence" if r["support"] == "b" and r["method"] == "trained"
                else None} for r in recs]
    assert "trained: 1 pair(s) in which it found nothing and predicted again" in scans_markdown(retried)
    # each relaxation named as the record names it: the first keeps the slice gate (a review: every retry read
    # "without the support's intensity evidence or slice gate")
    md = scans_markdown(retried)
    assert "predicted again without intensity evidence (`segment` warns" in md and "slice gate" not in md
    both = [{**r, "relaxed": {"a": "without intensity evidence or slice gate", "b": "without intensity evidence"}[
        r["support"]] if r["method"] == "trained" else None} for r in recs]
    md = scans_markdown(both)
    assert "trained: 1 pair(s) in which it found nothing and predicted again without intensity evidence or slice gate" in md
    assert "trained: 1 pair(s) in which it found nothing and predicted again without intensity evidence (" in md
    # an empty mask has no HD95: the median leaves it out and says so (a method that finds nothing in most scans
    # looked best by HD95), and records without one read back from scans.json as null
    empty = [{**r, "hd95": float("nan") if r["method"] == "trained" and r["support"] == "a" else 1.0} for r in recs]
    assert "| 1.0 (1 of 2 empty: not in the median) |" in scans_markdown(empty)
    assert "| 1.0 (1 of 2 empty: not in the median) |" in scans_markdown(
        [{**r, "hd95": None if r["hd95"] != r["hd95"] else r["hd95"]} for r in empty])


def test_structure_scale_refines_only_small_structures():
    from imaging_meta.volume.scale import structure_extent_mm, structure_scale

    pre = {"spacing": [4.5, 4.5], "slice_size": [80, 80], "ct_window": [-250.0, 250.0], "mr_percentiles": [1.0, 99.0]}
    small = np.zeros((200, 200, 5), bool)
    small[100:110, 90:130, 2] = True  # 10 x 40 pixels of 1 mm: a thin structure, measured across
    assert structure_extent_mm(small, (1.0, 1.0, 5.0)) == 10.0
    fine = structure_scale(pre, small, (1.0, 1.0, 5.0), small.shape[:2])
    assert fine["spacing"] == [200 / 128, 200 / 128] and fine["slice_size"] == [128, 128]  # capped at 128 px
    big = np.zeros((200, 200, 5), bool)
    big[20:180, 20:180, 2] = True
    assert structure_scale(pre, big, (1.0, 1.0, 5.0), big.shape[:2]) == pre  # 160 mm spans 35 pixels at 4.5 mm
    # the same structure in a 500 mm body: the checkpoint's spacing, slices widened to hold the body (80 slices of
    # 4.5 mm cut 62% of a lateral structure away; a review), at most 128
    assert structure_scale(pre, big, (1.0, 1.0, 5.0), (500.0, 300.0)) == {**pre, "slice_size": [112, 112]}
    assert structure_scale(pre, big, (1.0, 1.0, 5.0), (900.0, 300.0)) == {**pre, "slice_size": [128, 128]}
    with pytest.raises(ValueError, match="no foreground"):
        structure_extent_mm(np.zeros((4, 4, 2), bool), (1.0, 1.0, 1.0))
    # thin parts spread across the slice (ribs): their thickness, not the bounding box's smaller side (160 mm)
    ribs = np.zeros((200, 200, 5), bool)
    for x in range(20, 180, 40):
        ribs[x : x + 8, 20:30, 2] = True
        ribs[x : x + 8, 170:180, 2] = True
    assert structure_extent_mm(ribs, (1.0, 1.0, 5.0)) == 8.0
    assert structure_extent_mm(ribs, (0.5, 2.0, 5.0)) == 4.0  # 8 pixels of 0.5 mm across
    assert structure_scale(pre, ribs, (1.0, 1.0, 5.0), ribs.shape[:2])["spacing"] == [200 / 128, 200 / 128]
    # a small field of view: finer spacing, but slices never smaller than the checkpoint's 80 x 80
    tiny = np.zeros((20, 20, 3), bool)
    tiny[8:12, 8:12, 1] = True
    assert structure_scale(pre, tiny, (1.0, 1.0, 5.0), tiny.shape[:2]) == {**pre, "spacing": [1.0, 1.0]}


def test_several_supports_share_the_finest_spacing_and_the_widest_field_of_view():
    """The first support's scale decided for all: a tumour-centred crop listed first gave slices of its own small
    field of view, which cropped away every voxel of a whole scan's structure 150 mm off-centre (a review)."""
    from imaging_meta.volume.scale import supports_scale

    pre = {"spacing": [4.5, 4.5], "slice_size": [80, 80], "ct_window": [-250.0, 250.0], "mr_percentiles": [1.0, 99.0]}
    crop = np.zeros((100, 100, 3), bool)  # 100 mm across, a 6 mm structure
    crop[47:53, 47:53, 1] = True
    whole = np.zeros((400, 400, 3), bool)  # 400 mm across, a 40 mm structure off-centre
    whole[330:370, 180:220, 1] = True
    a, b = (crop, (1.0, 1.0, 5.0), (100.0, 100.0)), (whole, (1.0, 1.0, 5.0), (400.0, 400.0))
    both = supports_scale(pre, [a, b])
    assert both == supports_scale(pre, [b, a])
    # the crop's 6 mm structure wants 0.5 mm, but 128 slices must hold the whole scan's 400 mm
    assert both["spacing"] == [400 / 128, 400 / 128] and both["slice_size"] == [128, 128]
    assert supports_scale(pre, [a])["spacing"] == [1.0, 1.0]  # alone, the crop keeps its own


@pytest.mark.parametrize("two_parts", [True, False])
def test_whole_scan_keeps_every_part_of_a_structure_the_support_shows_in_parts(tmp_path, two_parts, monkeypatch):
    """Bright (200 HU) blocks in a 40 HU body, the intensity evidence exact. A structure in two parts in the
    support and the query (both kidneys under one label) keeps both predicted parts; a structure in one part
    keeps its largest component, and a smaller bright block that is not the structure is dropped."""
    shape = (24, 16, 10)
    pre = {"spacing": [4.5, 4.5], "slice_size": [24, 16], "ct_window": [-250.0, 250.0],
           "mr_percentiles": [1.0, 99.0]}
    scans = []
    for name in ("s", "q"):
        hu = np.full(shape, 40.0, np.float32)
        lab = np.zeros(shape, np.uint8)
        lab[3:9, 5:11, 2:8] = 3
        if two_parts:
            lab[15:21, 5:11, 2:8] = 3
        hu[lab == 3] = 200.0
        if name == "q" and not two_parts:
            hu[16:19, 6:9, 3:6] = 200.0  # bright, not the structure, smaller than it
        scans.append(Scan(_write(tmp_path / f"{name}.nii.gz", hu), _write(tmp_path / f"{name}_l.nii.gz", lab), 3, "CT",
                          "organ"))
    records = {r["method"]: r for r in score_pair(ConstantLearner(0.99), pre, scans[0], scans[1], "whole_scan",
                                                  ablations=False)}
    assert records[WINDOW]["dice"] == pytest.approx(1.0 if two_parts else 2 * 216 / (216 + 216 + 27))
    assert records["trained"]["dice"] == pytest.approx(1.0)  # largest-only would give 2/3 for two equal parts
    if not two_parts:  # the adapted row records its steps: two runs' adapted rows were named alike (a review)
        import imaging_meta.adaptation as adaptation

        monkeypatch.setattr(adaptation, "adapt", lambda learner, *args, **kwargs: learner)
        adapted = {r["method"]: r for r in score_pair(ConstantLearner(0.99), pre, scans[0], scans[1], "whole_scan",
                                                      ablations=False, adapt_steps=7)}
        assert adapted["trained + test-time adaptation"]["adapt_steps"] == 7 and adapted["trained"]["adapt_steps"] is None
        from imaging_meta.commands.evaluate_scans import scans_markdown

        assert "Test-time adaptation: 7 steps (`--adapt-steps`)." in scans_markdown(list(adapted.values()))


def test_structure_preprocessing_reads_the_label_map_as_segment_does(tmp_path):
    """Without a label value every non-zero voxel is the structure (segment's default); a label map without the
    structure is refused naming the file; the checkpoint's scale reads nothing."""
    from imaging_meta.evaluation.scans import structure_preprocessing

    pre = {"spacing": [4.5, 4.5], "slice_size": [80, 80], "ct_window": [-250.0, 250.0], "mr_percentiles": [1.0, 99.0]}
    lab = np.zeros((100, 100, 3), np.uint8)
    lab[40:50, 40:50, 1] = 7  # 10 mm across, value 7
    label = _write(tmp_path / "s_l.nii.gz", lab, spacing=(1.0, 1.0, 5.0))
    hu = np.full(lab.shape, 40.0, np.float32)  # a body filling the grid, with the structure brighter
    hu[lab == 7] = 200.0
    image = _write(tmp_path / "s.nii.gz", hu, spacing=(1.0, 1.0, 5.0))
    fine = structure_preprocessing(pre, image, label, None, "CT", "structure")
    assert fine["spacing"] == [1.0, 1.0] and fine["slice_size"] == [112, 112]  # the scan's 1 mm, 100 mm across
    assert structure_preprocessing(pre, image, label, 7, "CT", "structure") == fine
    with pytest.raises(ValueError, match=r"s_l\.nii\.gz: the label map has no voxel of value 2"):
        structure_preprocessing(pre, image, label, 2, "CT", "structure")
    assert structure_preprocessing(pre, "missing.nii.gz", "missing_l.nii.gz", None, "CT", "checkpoint") is pre


def test_the_structures_scale_does_not_depend_on_the_files_storage_order(tmp_path):
    """The label was measured along the file's own axes: a sagittal or coronal file of the same scan got another
    scale (and another mask) than the axial one. It is measured after the turn to RAS, as the preprocessing reads it."""
    from imaging_meta.evaluation.scans import structure_preprocessing

    pre = {"spacing": [4.5, 4.5], "slice_size": [80, 80], "ct_window": [-250.0, 250.0], "mr_percentiles": [1.0, 99.0]}
    lab = np.zeros((120, 90, 24), np.uint8)  # RAS, 0.8 x 0.8 x 3 mm: a plate 6.4 mm thick on one axial slice
    lab[40:48, 20:70, 10] = 1
    axial = np.diag([0.8, 0.8, 3.0, 1.0])
    nib.save(nib.Nifti1Image(lab, axial), str(tmp_path / "ras.nii.gz"))
    order = (2, 0, 1)  # stored (z, x, y): voxel (k, i, j) of the file is voxel (i, j, k) of the scan
    stored = np.transpose(lab, order)
    affine = np.zeros((4, 4))
    affine[3, 3] = 1.0
    for file_axis, scan_axis in enumerate(order):
        affine[:3, file_axis] = axial[:3, scan_axis]
    nib.save(nib.Nifti1Image(stored, affine), str(tmp_path / "zxy.nii.gz"))
    body = np.full(lab.shape, -1000.0, np.float32)  # air, with a body of 40 HU on one side of the grid
    body[10:80, 5:85] = 40.0
    nib.save(nib.Nifti1Image(body, axial), str(tmp_path / "ras_img.nii.gz"))
    nib.save(nib.Nifti1Image(np.transpose(body, order), affine), str(tmp_path / "zxy_img.nii.gz"))
    ras = structure_preprocessing(pre, str(tmp_path / "ras_img.nii.gz"), str(tmp_path / "ras.nii.gz"), 1, "CT",
                                  "structure")
    # at the scan's 0.8 mm, the body's 56 mm (70 pixels) and 10 mm of air each side, not the 96 mm grid (128)
    assert ras["spacing"] == [pytest.approx(0.8)] * 2 and ras["slice_size"] == [96, 96]
    assert structure_preprocessing(pre, str(tmp_path / "zxy_img.nii.gz"), str(tmp_path / "zxy.nii.gz"), 1, "CT",
                                   "structure") == ras


def test_segment_adapts_by_the_adaptation_modules_default():
    import inspect

    from imaging_meta import adaptation
    from imaging_meta.commands import segment
    from imaging_meta.commands.cli import _tool_parser

    assert inspect.signature(segment.segment).parameters["adapt_steps"].default == adaptation.DEFAULT_STEPS
    args = _tool_parser().parse_args(["segment", "--checkpoint", "c", "--support-image", "i", "--support-label", "l",
                                      "--query", "q", "--out", "o"])
    assert args.adapt_steps == adaptation.DEFAULT_STEPS and args.scale == "structure"


def test_the_support_self_check_tells_a_findable_structure_from_an_unfindable_one():
    """``support_dice``: each support slice with the structure predicted from the others. A structure whose
    intensity marks it is found (near 1); one with the body's intensity, which no evidence here can see, is
    not (near 0); one support slice leaves nothing to check."""
    img, mask = _volume(organ=0.8)
    seg = ScanSegmenter(ConstantLearner(), ScanOptions(negatives=False, smooth_z=0.0)).fit([(img, mask)])
    assert seg.support_dice is not None and seg.support_dice > 0.9
    assert seg.describe()["support_dice"] == seg.support_dice
    hidden, _ = _volume(organ=0.3)  # the structure looks like the body around it
    seg = ScanSegmenter(ConstantLearner(), ScanOptions(negatives=False, smooth_z=0.0)).fit([(hidden, mask)])
    assert seg.support_dice is not None and seg.support_dice < 0.3
    one = ScanSegmenter(ConstantLearner()).fit([(img, mask)], slices=[[5]])
    assert one.support_dice is None


def test_evaluate_scans_keeps_each_scored_pair_when_a_later_one_fails(tmp_path, monkeypatch):
    """scans.json and scans.md are written after every pair: a run stopped (or failing) part way keeps what it
    scored, and its table of them (scans.md was written at the end only, so an earlier run's stayed beside the new
    scans.json; a review)."""
    import json

    from imaging_meta.commands import evaluate_scans as E

    class DM:
        preprocessing: dict = {}

        def test_scans(self):
            return [{"image": f"{p}.nii.gz", "label": f"{p}_l.nii.gz", "modality": "CT", "organs": {"spleen": 1},
                     "patient": p, "site": "CT", "case_id": f"case-{p}"} for p in ("a", "b", "c")]

    calls = []

    def fake_score(learner, pre, s, q, protocol, **kw):
        calls.append((s.patient, q.patient))
        if len(calls) == 2:
            raise RuntimeError("stopped")
        return [{"protocol": protocol, "method": "trained", "dice": 0.5, "hd95": 1.0, "structure": "spleen",
                 "support": "x", "query": "y"}]

    monkeypatch.setattr(E, "score_pair", fake_score)
    with pytest.raises(RuntimeError, match="stopped"):
        E.evaluate_scans(None, None, DM(), tmp_path, ["whole_scan"], pairs=3)
    kept = json.loads((tmp_path / "scans.json").read_text())
    assert len(kept) == 1 and (kept[0]["support_patient"], kept[0]["query_patient"]) == calls[0]
    # the scans by their case ids: two scans of one patient are two pairs (the patients are the bootstrap's units)
    assert (kept[0]["support"], kept[0]["query"]) == tuple(f"case-{p}" for p in calls[0])
    assert "1 (support, query) volume pairs" in (tmp_path / "scans.md").read_text()


class BoxLearner(Learner):
    """Finds the structure by its place alone: 0.9 inside rows and columns 7..12 of every slice, 0.05 outside."""

    def predict(self, episode):
        out = torch.full(episode.query_images.shape[:2] + episode.query_images.shape[-2:], 0.05)
        out[..., 7:13, 7:13] = 0.9
        return out


def _phase_pair():
    """A support whose organ is at 0.8 and a query whose organ is at 0.55 (another contrast phase), where the
    support shows 0.55 only in a background stripe: the support's intensities call the query's organ background."""
    s_img, s_mask = _volume()
    q_img, q_mask = _volume(organ=0.55)
    for img in (s_img, q_img):
        img[15:17, 3:17, :] = 0.55
    return s_img, s_mask, q_img, q_mask


def test_an_empty_query_is_predicted_again_without_the_support_fitted_rules():
    s_img, s_mask, q_img, q_mask = _phase_pair()
    strict = ScanSegmenter(BoxLearner(), ScanOptions(smooth_z=0.0, relax_empty=False)).fit([(s_img, s_mask)])
    assert not (strict.predict(q_img) > 0.5).any()  # the support's intensities veto the organ
    assert strict.relaxed is None
    seg = ScanSegmenter(BoxLearner(), ScanOptions(smooth_z=0.0)).fit([(s_img, s_mask)])
    relaxed = seg.predict(q_img) > 0.5
    assert seg.relaxed == "without intensity evidence"
    assert relaxed[q_mask].all()  # every organ voxel found, from the same learner output
    assert seg.fusion is not None and seg.fusion.weight is not None and seg.fusion.weight.numel() == 2  # unchanged
    # a query that the full segmenter finds is not touched: the support itself
    assert torch.equal(seg.predict(s_img) > 0.5, strict.predict(s_img) > 0.5) and seg.relaxed is None
    # the rules are relaxed in order: when the first retry finds nothing either, the slice gate goes too
    first = seg._relaxed(dict(intensity=False))
    assert first is not None
    first.gate = 10.0  # a gate no slice passes
    assert (seg.predict(q_img) > 0.5)[q_mask].all() and seg.relaxed == "without intensity evidence or slice gate"


def test_an_empty_query_that_looks_unlike_the_support_is_not_predicted_again():
    from imaging_meta.volume.appearance import NOVELTY_WARN

    s_img, s_mask, q_img, _ = _phase_pair()
    seg = ScanSegmenter(BoxLearner(), ScanOptions(smooth_z=0.0)).fit([(s_img, s_mask)])

    class Unlike:
        def novelty(self, volume):
            return NOVELTY_WARN + 1.0

    seg._appearance = Unlike()  # type: ignore[assignment]  # the check's verdict, without an encoder to compute it
    assert not (seg.predict(q_img) > 0.5).any()  # the support's veto stands: this query may not show the organ
    assert seg.relaxed is None and seg.novelty == NOVELTY_WARN + 1.0
    assert seg.predict(q_img, slices=[4, 5]) is not None and seg.novelty is None  # chosen slices: not measured
    fresh = ScanSegmenter(BoxLearner(), ScanOptions(smooth_z=0.0)).fit([(s_img, s_mask)])
    assert (fresh.predict(q_img) > 0.5).any() and fresh.novelty is None  # no encoder: no check, the retry as before


def test_relaxation_skips_rules_that_are_already_off():
    s_img, s_mask, q_img, q_mask = _phase_pair()
    seg = ScanSegmenter(BoxLearner(), ScanOptions(intensity=False, smooth_z=0.0)).fit([(s_img, s_mask)])
    assert (seg.predict(q_img) > 0.5)[q_mask].all() and seg.relaxed is None  # no intensity evidence: no veto
    assert seg._relaxed(dict(intensity=False)) is None  # nothing to relax there
    assert seg._relaxed(dict(intensity=False, negatives=False)) is not None
    assert not LEARNER_ONLY.relax_empty  # the learner alone has no support-fitted rule


class RecordingLearner(BoxLearner):
    """`BoxLearner` that records, per call, the organ intensity of its query slices and of its support slices."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[set, set]] = []

    def predict(self, episode):
        def organs(x):
            return {round(v, 2) for v in x[..., 9, 9].flatten().tolist()}

        self.calls.append((organs(episode.query_images), organs(episode.support_images)))
        return super().predict(episode)


def test_two_support_scans_are_calibrated_across_scans():
    """With two support patients, each scan's slices are predicted from the other scan alone (learner and intensity
    histogram), as a query from a third patient will be; one support scan is calibrated as before."""
    a_img, a_mask = _volume(organ=0.8)
    b_img, b_mask = _volume(organ=0.55)
    a_img[15:17, 3:17, :] = 0.55  # each support's organ intensity is a background tissue in the other
    b_img[15:17, 3:17, :] = 0.8
    opts = ScanOptions(smooth_z=0.0, relax_empty=False, position=True)
    learner = RecordingLearner()
    across = ScanSegmenter(learner, opts).fit([(a_img, a_mask), (b_img, b_mask)])
    # every support slice, with the organ or without, was predicted from the other scan's slices only (each
    # slice's organ pixel tells its scan: the organ or the other's stripe value at (9, 9) is absent on its
    # negative slices, where it is the body, 0.3; so a negative slice is told by the call's support set)
    assert len(learner.calls) == 4  # per scan: its positive slices, then its negative slices
    assert [s for _, s in learner.calls] == [{0.55}, {0.55}, {0.8}, {0.8}]
    assert [q for q, _ in learner.calls] == [{0.8}, {0.3}, {0.55}, {0.3}]
    assert across._support_llr is not None and across.intensity is not None
    assert across.support_images is not None and across.support_masks is not None
    k = across.support_images.shape[0]
    images, masks = across.support_images[:, 0], across.support_masks
    own = across.intensity.llr(images)
    organ = masks > 0.5
    # out of fold, each organ's intensity is the other scan's background: negative evidence; in sample, positive
    assert (across._support_llr[:k][organ] < 0).all() and (own[organ] > 0).all()
    # the negative slices' evidence is out of fold too, and the fusion and threshold are fitted on all of it
    p_pos, p_neg, negs = across._support_probs
    half_k, half_n = k // 2, negs.shape[0] // 2  # the first half of each is scan a's
    other = IntensityModel().fit(torch.cat([images[half_k:], negs[half_n:]]),
                                 torch.cat([masks[half_k:], torch.zeros_like(negs[half_n:])]))
    assert torch.equal(across._support_llr[k : k + half_n], other.llr(negs[:half_n]))
    all_i, all_p = torch.cat([images, negs]), torch.cat([p_pos, p_neg])
    all_y = torch.cat([masks, torch.zeros_like(negs)])
    feats = across._features(all_p, all_i, across._support_llr, across._support_prior).flatten(0, -2)
    assert feats.shape[-1] == 3  # the learner, the intensity and (two scans) the position prior
    refit = LogisticFusion().fit(feats, all_y.flatten())
    assert torch.allclose(across.fusion.weight, refit.weight) and torch.allclose(across.fusion.bias, refit.bias)
    assert across.threshold == best_threshold(torch.sigmoid(refit.logits(feats)), all_y)
    pooled = ScanSegmenter(BoxLearner(), dataclasses.replace(opts, across_scans=False)).fit([(a_img, a_mask), (b_img, b_mask)])
    assert pooled._support_llr is None
    # one support scan: nothing to leave out across scans, the same fit either way
    q_img, _ = _volume(organ=0.7)
    one = [ScanSegmenter(BoxLearner(), dataclasses.replace(opts, across_scans=x)).fit([(a_img, a_mask)]) for x in (False, True)]
    assert torch.equal(one[0].predict(q_img), one[1].predict(q_img)) and one[0].threshold == one[1].threshold


def test_across_scans_falls_back_to_the_pooled_fit_when_a_fold_has_nothing_to_fit_on():
    """Support slices chosen by the caller: a scan without slices that show the structure, or a fold whose other
    scans show no foreground, is fitted pooled (as with one scan) instead of failing."""
    a_img, a_mask = _volume(organ=0.8)
    b_img, b_mask = _volume(organ=0.55)
    supports = [(a_img, a_mask), (b_img, b_mask)]
    opts = ScanOptions(smooth_z=0.0)
    for slices in ([[5, 6], []], [[0], [5, 6]]):  # slice 0 of a shows no organ
        seg = ScanSegmenter(BoxLearner(), opts).fit(supports, slices=slices)
        assert seg._support_llr is None and seg.fusion is not None
    assert ScanSegmenter(BoxLearner(), opts).fit(supports, slices=[[5, 6], [5]])._support_llr is not None


def test_leave_one_out_leaves_out_the_axial_neighbours_of_the_same_scan():
    """A support slice is predicted from support slices at least ``loo_gap`` + 1 slices away in its own scan (the
    neighbours are near copies); from all the others when nothing would be left."""
    img, mask = _volume(lo=2, hi=9)
    for z in range(12):  # each slice's organ tells its axial position
        img[7:13, 7:13, z] = 0.5 + 0.04 * z
    learner = RecordingLearner()
    ScanSegmenter(learner, ScanOptions(loo_gap=2, negatives=False)).fit([(img, mask)])
    loo = [(q, s) for q, s in learner.calls if len(q) == 1 and q != {0.3}][: 8]  # one call per support slice
    for q, s in loo:
        z = round((next(iter(q)) - 0.5) / 0.04)
        assert {round((v - 0.5) / 0.04) for v in s} == {w for w in range(2, 10) if abs(w - z) > 2}
    learner.calls.clear()
    ScanSegmenter(learner, ScanOptions(loo_gap=20, negatives=False)).fit([(img, mask)])
    q, s = learner.calls[0]
    assert len(s) == 7  # nothing would be left: every other slice


@pytest.mark.parametrize("bad, message", [
    ({"smooth_z": float("nan")}, r"--z-smoothing is the weight of each axial neighbour, from 0 \(off\) to 0.5; got nan"),
    ({"smooth_z": -3.0}, r"--z-smoothing .* got -3.0"),
    ({"smooth_z": 5.0}, r"--z-smoothing .* got 5.0"),
    ({"query_chunk": 0}, r"query_chunk must be at least 1, got 0"),
    ({"loo_gap": -1}, r"loo_gap must be at least 0, got -1"),
])
def test_options_out_of_range_are_refused(bad, message):
    """A NaN or negative z-smoothing acted as 0, and 5 inverted the slice's own weight, all silently."""
    with pytest.raises(ValueError, match=message):
        ScanOptions(**bad)


def test_segment_refuses_negative_adaptation_steps(tmp_path):
    from imaging_meta.commands.segment import segment

    with pytest.raises(ValueError, match=r"--adapt-steps must be at least 0 \(0: no adaptation\), got -1"):
        segment(tmp_path / "never-read.ckpt", [], [], tmp_path / "out", adapt_steps=-1)


def test_two_scans_of_one_patient_are_two_pairs_and_per_site_rows():
    """A review: the records named scans by their patient, so a T1 and a T2 scan of one patient collided: 3 pairs
    were reported as 2, and a paired difference took the other scan's baseline (0.100 instead of 0.267)."""
    from imaging_meta.commands.evaluate_scans import scans_markdown

    def rec(support, query, sp, qp, method, dice, site="s1"):
        return {"protocol": "whole_scan", "method": method, "dice": dice, "hd95": 1.0, "structure": "spleen",
                "support": support, "query": query, "support_patient": sp, "query_patient": qp, "site": site}

    recs = []
    for (s, q, sp, qp, trained, copy) in (("t1-a", "b", "a", "b", 0.9, 0.5), ("t2-a", "b", "a", "b", 0.6, 0.6),
                                          ("b", "c", "b", "c", 0.7, 0.4)):
        recs += [rec(s, q, sp, qp, "trained", trained, "s2" if q == "c" else "s1"),
                 rec(s, q, sp, qp, COPY, copy, "s2" if q == "c" else "s1")]
    md = scans_markdown(recs)
    assert "3 (support, query) volume pairs of 3 patients" in md
    assert "| trained − copy support mask | 0.233" in md  # (0.4 + 0.0 + 0.3) / 3, each pair its own baseline
    assert "| site of the query | pairs | trained | copy support mask |" in md
    assert "| s2 | 1 | 0.700 | 0.400 |" in md and "| s1 | 2 | 0.750" in md  # each row with its number of pairs
    assert "| spleen | 3 | " in md
    # a site key holds '|' (vendor | model | institution): escaped, the table keeps its columns
    piped = scans_markdown([{**r, "site": "GE | LightSpeed | inst-1"} for r in recs])
    assert "| GE \\| LightSpeed \\| inst-1 | 3 | 0.733" in piped


def test_the_pair_bootstrap_counts_a_pair_only_when_both_its_patients_are_drawn():
    from imaging_meta.evaluation.statistics import _resample_counts, pair_bootstrap

    g = np.random.default_rng(3)
    patients = [f"p{i}" for i in range(6)]
    units = [(s, q, float(g.random())) for s in patients for q in patients if s != q and g.random() < 0.5]
    b = pair_bootstrap(units, seed=5, n_boot=400)
    assert b["mean"] == pytest.approx(np.mean([u[2] for u in units])) and b["n_pairs"] == len(units)
    # by hand: each resample's weighted mean with weight w_s * w_q, resamples without any pair left out
    counts = _resample_counts(len(patients), 5, 400)
    boot = []
    for row in counts:
        w = dict(zip(sorted(patients), row, strict=True))
        weights = [w[s] * w[q] for s, q, _ in units]
        if sum(weights):
            boot.append(sum(wt * x for wt, (_, _, x) in zip(weights, units, strict=True)) / sum(weights))
    assert b["resamples"] == len(boot)
    assert b["ci_low"] == pytest.approx(np.percentile(boot, 2.5)) and b["ci_high"] == pytest.approx(np.percentile(boot, 97.5))
    # the review's case: four pairs of differences 0.573, 0.519, 0.490, 0.521 over four patients; the old
    # half-and-half weighting gave [0.521, 0.529], narrower than the spread of the four pairs allows
    review = [("a", "b", 0.573), ("b", "a", 0.519), ("c", "d", 0.490), ("d", "c", 0.521)]
    r = pair_bootstrap(review)
    assert r["ci_low"] < 0.51 and r["ci_high"] > 0.54  # the two patient pairs' means, 0.546 and 0.5055
    assert pair_bootstrap(review[:2])["ci_low"] is None  # two patients: no interval


@pytest.mark.parametrize("backbone", ["unet", "conv4"])
def test_the_support_is_encoded_once_for_every_chunk_of_a_scan_and_the_answer_is_unchanged(backbone):
    """`Learner.fit_support`: the scan segmenter encodes the support slices once for all of a query's chunks
    (they were encoded again for each: two thirds of the encoder's passes at a fine scale), with the same
    probabilities as before; an encoder with batch statistics (conv4) still predicts chunk by chunk."""
    from imaging_meta.learners.metric.protonet_seg import PrototypicalSegmenter

    class Uncached(PrototypicalSegmenter):
        def fit_support(self, episode):
            return None

    kwargs = {"out_channels": 8, "features": [4, 4, 8, 8, 16, 4]} if backbone == "unet" else {"width": 4}
    s_img, s_mask = _volume(size=80)
    q_img, _ = _volume(lo=3, hi=9, size=80, seed=1)  # 80 x 80 slices at query_chunk 1: one chunk a slice
    options = dataclasses.replace(LEARNER_ONLY, query_chunk=1)
    answers, encoded = [], []
    for kind in (PrototypicalSegmenter, Uncached):
        torch.manual_seed(0)
        learner = kind(backbone=backbone, backbone_kwargs=kwargs).eval()
        images = []
        learner.encoder.register_forward_hook(lambda m, i, o, images=images: images.append(i[0].shape[0]))
        answers.append(ScanSegmenter(learner, options).fit([(s_img, s_mask)]).predict(q_img))
        encoded.append(sum(images))
    torch.testing.assert_close(answers[0], answers[1])

    class Tempered(PrototypicalSegmenter):  # its own predict: never bypassed by predict_fitted
        def predict(self, episode):
            return super().predict(episode).sqrt()

    assert Tempered(backbone=backbone, backbone_kwargs=kwargs).fit_support(None) is None
    n_support, n_chunks = int(s_mask.any(0).any(0).sum()), q_img.shape[-1]
    if backbone == "unet":  # at least the query's chunks but one fewer passes of the support
        assert encoded[1] - encoded[0] >= (n_chunks - 1) * n_support
    else:
        assert encoded[0] == encoded[1]


def test_with_two_support_scans_where_the_structure_lies_is_fitted_and_tells_it_from_a_lookalike():
    """A bright unlabelled lookalike beside the organ, on the same slices, in every scan: the learner cannot tell
    them apart, the organ's place can. With two support scans the position prior's weight is
    fitted across them (each scan's slices against the other scan's mask) and the lookalike is left out; without
    it (``position=False``, or one support scan, where nothing can fit its weight) both are marked."""
    def scan(seed):
        img, mask = _volume(size=32, seed=seed)
        img[20:25, 20:25, 4:9] = 0.8  # the lookalike: as bright as the organ, never labelled, 8 pixels away
        # each patient's own faint noise: the same volume given twice is refused (it would fit in fold)
        return img + 1e-3 * torch.rand(img.shape, generator=torch.Generator().manual_seed(seed)), mask

    (a, a_mask), (b, b_mask), (q, q_mask) = scan(0), scan(1), scan(2)
    lookalike = torch.zeros_like(q_mask)
    lookalike[20:25, 20:25, 4:9] = True
    opts = ScanOptions(smooth_z=0.0, relax_empty=False, intensity=False, position=True)  # the learner and the place
    fitted = ScanSegmenter(BrightLearner(), opts).fit([(a, a_mask), (b, b_mask)])
    assert fitted.describe()["position_prior"] and len(fitted.fusion.weight) == 2 and fitted.fusion.weight[1] > 0
    with_position = fitted.predict(q) > 0.5
    assert with_position[q_mask].float().mean() > 0.9 and not with_position[lookalike].any()
    for seg in (ScanSegmenter(BrightLearner(), dataclasses.replace(opts, position=False)).fit([(a, a_mask), (b, b_mask)]),
                ScanSegmenter(BrightLearner(), opts).fit([(a, a_mask)])):
        assert not seg.describe()["position_prior"]
        marked = seg.predict(q) > 0.5
        assert marked[q_mask].all() and marked[lookalike].all()


def test_one_support_volume_given_twice_is_refused_and_the_position_prior_never_steers_away():
    """A review: a support given twice was its own "other patient", so the fits across support scans were in
    fold (a perfect position prior) and the novelty's reference distance was 0; and two supports whose structures
    lie apart fitted the position prior a negative weight, steering the query's mask away from where the supports
    show the structure. Now the same volume twice is refused and the prior's weight is never below 0."""
    (a, a_mask) = _volume(size=32)
    with pytest.raises(ValueError, match="supports 0 and 1 are the same volume: give each support scan once"):
        ScanSegmenter(BrightLearner(), ScanOptions()).fit([(a, a_mask), (a.clone(), a_mask)])

    apart = organ_at  # the organ in another place of each scan

    opts = ScanOptions(smooth_z=0.0, relax_empty=False, intensity=False, position=True)
    fitted = ScanSegmenter(BrightLearner(), opts).fit([apart(4, 0), apart(20, 1)])
    assert fitted.describe()["position_prior"] and float(fitted.fusion.weight[-1]) >= 0.0


def test_a_few_support_slices_are_taken_from_the_middle_of_the_structure_not_its_tips():
    """A review (2026-12-07): ``--max-support-slices 1`` took the first slice showing the structure (its tip, 13
    pixels of a sphere's 333 at the middle) and 2 its two tips, from ``np.linspace``'s end points. Each slice is
    now the centre of one of equal parts of the structure's slices."""
    from imaging_meta.volume.segmenter import spread

    zs = list(range(10, 31))  # a sphere's 21 slices
    assert spread(zs, 1) == [20] and spread(zs, 2) == [15, 25] and spread(zs, 3) == [13, 20, 27]
    assert spread(zs, 21) == zs and spread(zs, 40) == zs
    assert len(set(spread(zs, 20))) == 20 and spread([4, 9], 1) == [9]


def test_the_window_of_a_ct_support_on_an_mr_query_compares_both_on_the_learners_scale():
    """A review (2026-12-07): with MR put on the learner's [0, 1] scale and CT kept in HU, a CT support's window
    took every voxel of an MR query or none. Two modalities are both put on [0, 1] (CT through its window)."""
    from types import SimpleNamespace

    from imaging_meta.evaluation.scans import WINDOW, baseline_masks
    from imaging_meta.evaluation.volumes import dice3d

    rng = np.random.default_rng(0)
    mask = np.zeros((16, 16, 6), dtype=bool)
    mask[4:10, 4:10, 1:5] = True
    ct = np.full(mask.shape, 40.0, np.float32)
    ct[mask] = rng.uniform(150, 230, int(mask.sum()))
    ct[0:2] = -240.0  # fat and bone: the window's ends, as an MR's 1st and 99th percentiles would be
    ct[14:16] = 250.0
    mr = np.interp(ct, [-250, 250], [0, 1000]).astype(np.float32)  # the same contrast, MR-like values
    support = SimpleNamespace(raw=ct, truth=mask, affine=None, pre={})
    query = SimpleNamespace(raw=mr, truth=mask, affine=None)
    window = baseline_masks(support, query, "MR", "whole_scan", "CT")[WINDOW]
    assert 0.6 < dice3d(window, mask) and window.sum() < 2 * mask.sum()


def test_a_structure_under_12_pixels_for_a_wide_body_is_warned_about(tmp_path, caplog):
    """A review (2026-12-07): the docs promised 12 pixels across, but a body too wide for 128-pixel slices at that
    spacing coarsens it, silently; a narrower body of the same structure gets its 12 pixels and no warning."""
    import logging

    from imaging_meta.evaluation.scans import structure_preprocessing

    pre = {"spacing": [4.5, 4.5], "slice_size": [80, 80], "ct_window": [-250.0, 250.0], "mr_percentiles": [1.0, 99.0]}
    for side, warned in ((400, True), (120, False)):
        lab = np.zeros((side, side, 3), np.uint8)
        lab[side // 2 - 10 : side // 2 + 10, side // 2 - 10 : side // 2 + 10, 1] = 1  # 20 mm across at 1 mm
        hu = np.full(lab.shape, 40.0, np.float32)  # a body filling the grid
        hu[lab == 1] = 200.0
        image = _write(tmp_path / f"s{side}.nii.gz", hu, spacing=(1.0, 1.0, 5.0))
        label = _write(tmp_path / f"s{side}_l.nii.gz", lab, spacing=(1.0, 1.0, 5.0))
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="imaging_meta.evaluation.scans"):
            chosen = structure_preprocessing(pre, image, label, 1, "CT", "structure")
        assert ("spans" in caplog.text and "not 12" in caplog.text and "crop the support and the query" in caplog.text) is warned
        assert (chosen["spacing"][0] > 20 / 12) is warned, chosen


def test_a_query_structure_outside_the_working_slices_is_named_and_scored_as_missed(tmp_path, caplog):
    """A review (2026-12-07): at a support's small field of view the working slices keep a wide query's centre; a
    structure near its edge was lost there, and the error blamed the crop to the body. Since then the pair is not an
    error that stops the evaluation: it is scored as `segment` would do (missed), with a warning naming the cause."""
    import logging

    from imaging_meta.evaluation.scans import TRAINED_FULL, structure_preprocessing

    pre = {"spacing": [4.5, 4.5], "slice_size": [80, 80], "ct_window": [-250.0, 250.0], "mr_percentiles": [1.0, 99.0]}
    scans = {}
    for name, side, at in (("s", 120, 50), ("q", 400, 20)):
        lab = np.zeros((side, side, 3), np.uint8)
        lab[at : at + 20, side // 2 - 10 : side // 2 + 10, :] = 1
        hu = np.full(lab.shape, 40.0, np.float32)
        hu[lab == 1] = 200.0
        scans[name] = Scan(_write(tmp_path / f"{name}.nii.gz", hu, (1.0, 1.0, 5.0)),
                           _write(tmp_path / f"{name}_l.nii.gz", lab, (1.0, 1.0, 5.0)), 1, "CT", "organ")
    chosen = structure_preprocessing(pre, scans["s"].image, scans["s"].label, 1, "CT", "structure")
    load_structure(scans["s"], chosen)
    with caplog.at_level(logging.WARNING, logger="imaging_meta.evaluation.scans"):
        lost = load_structure(scans["q"], chosen, query=True)
    assert lost.truth.any() and not lost.pre["struct"].any()
    assert re.search(r"q_l\.nii\.gz: .* the working slices \(\d+ x \d+ mm around the body's centre.* scored as missed.*"
                     r"--scale checkpoint, or supports of the query's field of view, keep it", caplog.text)
    assert load_structure(scans["q"], pre, query=True).pre["struct"].any()  # at the checkpoint's scale it is kept
    rows = {r["method"]: r for r in score_pair(ConstantLearner(0.9), pre, scans["s"], scans["q"], "whole_scan",
                                               ablations=False, scale="structure")}
    assert rows[TRAINED_FULL]["dice"] == 0.0 and rows[COPY]["dice"] is not None  # every method scored, on one grid
    with pytest.raises(ValueError, match=r"s_l\.nii\.gz: no voxel of value 2"):  # a support without it: refused
        load_structure(Scan(scans["s"].image, scans["s"].label, 2, "CT", "organ"), chosen)
