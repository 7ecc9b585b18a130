"""Exact values of the whole-scan segmenter's parts and of the protocols' baselines, on volumes built so that each
answer is known by hand. A review (2026-12-07) broke each of these with a one-line change that no test caught;
every test here fails on one of those changes (the docstrings say which)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import imaging_meta.evaluation.scans as S
from imaging_meta.evaluation import volumes as V
from imaging_meta.evaluation.scans import COPY, WINDOW, Scan, score_pair
from imaging_meta.volume.evidence import IntensityModel, body_extent, position_prior, slice_scores
from imaging_meta.volume.scale import scale_and_shortfall, structure_extent_mm
from imaging_meta.volume.segmenter import ScanOptions, ScanSegmenter
from tests.imaging_meta.test_scan_segmenter import BrightLearner, ConstantLearner, _volume, _write, organ_at

PRE = {"spacing": [4.5, 4.5], "slice_size": [16, 16], "ct_window": [-250.0, 250.0], "mr_percentiles": [1.0, 99.0]}


def _pair(tmp_path, support_extent, query_extent, spot=False, query_spacing=(4.5, 4.5, 5.0), sites=("", "")):
    """A support and a query, each a uniform body with the structure (value 3) on its extent's slices; the support
    at 4.5 x 4.5 x 5 mm, the query at ``query_spacing``; ``sites``: theirs."""
    scans = []
    for name, (lo, hi), spacing, site in (("s", support_extent, (4.5, 4.5, 5.0), sites[0]),
                                           ("q", query_extent, query_spacing, sites[1])):
        hu = np.full((16, 16, 10), 40.0, np.float32)
        lab = np.zeros(hu.shape, np.uint8)
        lab[5:9, 5:9, lo : hi + 1] = 3
        hu[lab == 3] = 200.0
        if spot:
            hu[0:2, 0:2, :] = 200.0  # as bright as the structure, outside it, on every slice
        scans.append(Scan(_write(tmp_path / f"{name}.nii.gz", hu, spacing),
                          _write(tmp_path / f"{name}_l.nii.gz", lab, spacing), 3, "CT", "organ", site=site))
    return scans


def test_the_oracle_segments_each_query_chunk_from_its_own_support_slice(tmp_path, monkeypatch):
    """Chunks of the query's extent (2..7 in three parts) each from the support slice at the centre of its own
    part, without the slice gate or the retry (in reverse order, or from one slice, or with the gate, it passed)."""
    calls = []
    fit, predict = S.ScanSegmenter.fit, S.ScanSegmenter.predict
    monkeypatch.setattr(S.ScanSegmenter, "fit", lambda self, supports, slices=None: calls.append(
        ("fit", slices, self.options.negatives, self.options.relax_empty)) or fit(self, supports, slices))
    monkeypatch.setattr(S.ScanSegmenter, "predict", lambda self, v, slices=None: calls.append(
        ("predict", slices)) or predict(self, v, slices))
    s, q = _pair(tmp_path, (2, 7), (2, 7))
    score_pair(ConstantLearner(0.99), PRE, s, q, "oracle_extent", ablations=False)
    assert calls[:6] == [("fit", [[3]], False, False), ("predict", [2, 3]), ("fit", [[5]], False, False),
                         ("predict", [4, 5]), ("fit", [[7]], False, False), ("predict", [6, 7])]


def test_the_oracle_baselines_follow_the_query_extent_exactly(tmp_path):
    """Under the oracle the copied mask spans the query's true extent (a one-slice shift scored 0.75 and passed a
    '> 0.7' check), and the window keeps to that extent: 64 true voxels a slice, 16 of the bright spot."""
    s, q = _pair(tmp_path, (2, 7), (3, 6), spot=True)
    rows = {r["method"]: r for r in score_pair(ConstantLearner(0.99), PRE, s, q, "oracle_extent", ablations=False)}
    assert rows[COPY]["dice"] == 1.0
    assert rows[WINDOW]["dice"] == pytest.approx(2 * 64 / (64 + 64 + 16))


def test_the_copied_mask_takes_the_nearest_support_slice():
    """Query slice z of a 7-slice body takes the support slice round(z * 3 / 6) of a 4-slice body: the mask on
    support slice 1 lands on query slices 1 and 2 (floor gave 2 and 3)."""
    s_mask = np.zeros((10, 10, 4), bool)
    s_mask[:, :, 1] = True
    out = V.copy_mask_at_relative_position(s_mask, np.full((10, 10, 4), 100.0), np.full((10, 10, 7), 100.0), "CT")
    assert np.flatnonzero(out.any((0, 1))).tolist() == [1, 2]


def test_the_position_prior_maps_the_support_mask_by_relative_position_with_its_reach():
    """A support of 10 slices with its mask on 4..5, a query of 20: the prior is 0.95 on 8..11 (and two slices
    further each way with reach 2) and 0.05 elsewhere: the extent ratio, the reach, the scaling to 1 and the floor."""
    s, q = torch.full((16, 16, 10), 0.5), torch.full((16, 16, 20), 0.5)
    m = torch.zeros(16, 16, 10, dtype=torch.bool)
    m[6:10, 6:10, 4:6] = True
    for reach, on in ((0, range(8, 12)), (2, range(4, 16))):
        centre = position_prior(s, m, q, reach=reach)[8, 8]
        expected = torch.tensor([0.95 if z in on else 0.05 for z in range(20)])
        torch.testing.assert_close(centre, expected), reach


def test_body_extent_and_slice_scores_and_intensity_bins():
    """The body's extent leaves out slices with only a sliver (a table: 2% of the largest area) and keeps the last
    one; a slice's score is its strongest 3 x 3 mean (one sure 3 x 3 patch scores 1); the intensity model tells
    values 0.3 apart with 4 bins."""
    v = torch.zeros(20, 20, 8)
    v[2:18, 2:18, 2:8] = 1.0
    v[0, 0:8, 0:2] = 1.0
    assert body_extent(v) == (2, 7)
    assert body_extent(torch.zeros(4, 4, 3)) == (0, 2)  # no body (all air): every slice
    probs = torch.zeros(10, 10, 2)
    probs[2:5, 2:5, 0] = 1.0
    probs[:, :, 1] = 0.2
    torch.testing.assert_close(slice_scores(probs), torch.tensor([1.0, 0.2]))
    model = IntensityModel(bins=4).fit(torch.tensor([0.9] * 10 + [0.6] * 10), torch.tensor([1.0] * 10 + [0.0] * 10))
    llr = model.llr(torch.tensor([0.9, 0.6]))
    assert float(llr[0]) > 2.0 and float(llr[1]) < -2.0


def test_the_structures_thickness_and_the_finest_pixels_set_the_scale():
    """A 4-pixel band at 1 mm touching the slice border is 4 mm thick (in-plane, whatever the slice spacing); of
    two supports the finest pixels (0.5 mm) bound the spacing chosen for the thinner structure."""
    band = np.zeros((10, 10, 1), bool)
    band[:, 0:4, 0] = True
    assert structure_extent_mm(band, (1.0, 1.0, 1.0)) == 4.0
    bar = np.zeros((20, 20, 3), bool)
    bar[5:15, 8:12, 1] = True
    assert structure_extent_mm(bar, (1.0, 1.0, 5.0)) == 4.0
    thin = np.zeros((40, 40, 3), bool)
    thin[10:30, 18:22, 1] = True
    thick = np.zeros((40, 40, 3), bool)
    thick[5:35, 5:35, 1] = True
    chosen, _ = scale_and_shortfall({"spacing": [4.5, 4.5], "slice_size": [80, 80]},
                                    [(thin, (0.5, 0.5, 1.0), (20.0, 20.0)), (thick, (1.5, 1.5, 1.0), (60.0, 60.0))])
    assert chosen["spacing"] == [0.5, 0.5]


def test_negative_slices_come_from_the_body_and_pooled_calibration_leaves_out_only_its_own_scans_neighbours():
    img = torch.zeros(20, 20, 18)
    img[2:-2, 2:-2, 3:15] = 0.3  # the body on 3..14, air at both ends
    mask = torch.zeros(20, 20, 18, dtype=torch.bool)
    mask[7:13, 7:13, 7:11] = True
    img[mask] = 0.8
    seg = ScanSegmenter(BrightLearner(), ScanOptions(smooth_z=0.0, max_negative_slices=50)).fit([(img, mask)])
    negatives = seg._support_probs[2]
    assert negatives.shape[0] == 8 and bool((negatives.flatten(1).amax(1) > 0).all())  # 12 body slices - 4 with it
    a, am = _volume(organ=0.8)
    b, bm = _volume(organ=0.55)
    pooled = ScanSegmenter(BrightLearner(), ScanOptions(across_scans=False, loo_gap=2)).fit([(a, am), (b, bm)])
    kept, _ = pooled._without(0)  # slice 0 and its neighbours within 2 in scan 0 (the first of its slices: 2 more)
    assert kept.shape[0] == pooled.support_images.shape[0] - 3


def test_each_support_scans_position_prior_is_from_the_other_scans_and_the_querys_from_all():
    (a, am), (b, bm) = organ_at(4, 0), organ_at(20, 1)
    opts = ScanOptions(smooth_z=0.0, relax_empty=False, intensity=False, position=True)
    seg = ScanSegmenter(BrightLearner(), opts).fit([(a, am), (b, bm)])
    k = seg.support_images.shape[0]
    assert float(seg._support_prior[0, 6, 9]) == pytest.approx(0.05)  # scan 0's slice: scan 1's mask lies elsewhere
    q, _ = organ_at(12, 2)
    seg.predict(q)
    assert seg._support_prior.shape[0] >= k
    assert float(seg._query_prior[:, 6, 9].max()) == pytest.approx(0.5)  # the mean of both scans' priors
    assert float(seg._query_prior[:, 22, 9].max()) == pytest.approx(0.5)


def test_an_adapted_learner_is_returned_in_eval_mode():
    from imaging_meta.adaptation import adapt
    from tests.imaging_meta.test_adaptation import _scans
    from tests.imaging_meta.test_protonet_seg import small

    supports, queries = _scans()
    adapted = adapt(small(), supports, queries, steps=1, batch_size=2, seed=0, progress=False)
    assert not adapted.training and not any(m.training for m in adapted.modules())


# ------------------------------------------------------------------------------------------ a review, 2026-12-08
def test_the_oracles_copied_mask_is_placed_within_each_body_not_the_whole_plane():
    """The same 16 x 16 body, alone in the support's grid and amid air in a 32 x 32 query grid: the copied mask lands
    on the query's structure under both protocols (the oracle stretched the whole support slice over the query's
    plane: Dice 0.4)."""
    from types import SimpleNamespace

    def scan(side: int, off: int) -> SimpleNamespace:
        hu = np.full((side, side, 10), -1000.0, np.float32)
        hu[off : off + 16, off : off + 16, :] = 40.0
        truth = np.zeros(hu.shape, bool)
        truth[off + 4 : off + 8, off + 4 : off + 8, 2:8] = True
        hu[truth] = 200.0
        return SimpleNamespace(raw=hu, truth=truth, affine=None, pre={})

    s, q = scan(16, 0), scan(32, 8)
    for protocol in ("whole_scan", "oracle_extent"):
        assert V.dice3d(S.baseline_masks(s, q, "CT", protocol)[COPY], q.truth) == 1.0, protocol


def test_a_pairs_records_are_the_querys_its_grid_its_site_and_its_baselines_from_the_support(tmp_path):
    """HD95 in the query's millimetres (a query of twice the voxel size: twice the distance), the query's site, and
    baselines fitted on the support: the copied mask of slices 2..7 on a query structure of slices 3..6 scores
    2·64/(96 + 64) = 0.8, not the 1.0 of the query's own labels."""
    rows = {}
    for name, spacing in (("fine", (4.5, 4.5, 5.0)), ("coarse", (9.0, 9.0, 10.0))):
        (tmp_path / name).mkdir()
        pair = _pair(tmp_path / name, (2, 7), (3, 6), spot=True, query_spacing=spacing, sites=("north", "south"))
        rows[name] = {r["method"]: r for r in score_pair(ConstantLearner(0.99), PRE, *pair, "whole_scan", ablations=False)}
    fine, coarse = rows["fine"], rows["coarse"]
    assert {r["site"] for r in fine.values()} == {"south"}
    assert fine[COPY]["dice"] == pytest.approx(0.8)
    assert fine[WINDOW]["hd95"] > 0 and coarse[WINDOW]["hd95"] == pytest.approx(2 * fine[WINDOW]["hd95"])


def test_two_scans_of_one_patient_are_never_paired():
    """A patient's T1 and T2 (two scans, one patient) would pair the patient with themselves: a support and a query
    of one body. Pairs are of two patients (the rule compared the scans, not the patients, under a mutation)."""
    from imaging_meta.commands.evaluate_scans import scan_pairs

    def scan(patient: str, image: str) -> dict:
        return {"image": image, "label": image + "_l", "organs": {"liver": 1}, "modality": "MR", "site": "a",
                "patient": patient}

    scans = [scan("p", "p_t1"), scan("p", "p_t2"), scan("q", "q_t1")]
    pairs = scan_pairs(scans, pairs=10, pairing="any")
    assert pairs and all(s.patient != q.patient for s, q in pairs)
    assert {(s.image, q.image) for s, q in pairs} == {("p_t1", "q_t1"), ("p_t2", "q_t1"), ("q_t1", "p_t1"),
                                                         ("q_t1", "p_t2")}


def test_the_scans_reports_intervals_resample_patients_not_pairs():
    """Pairs that share patients are not independent: the interval is the two-way bootstrap of the patients behind
    them (`pair_bootstrap`), not one over the records."""
    from imaging_meta.commands.evaluate_scans import _interval
    from imaging_meta.evaluation.statistics import pair_bootstrap

    recs = [{"support_patient": s, "query_patient": q, "dice": d, "support": f"{s}.nii.gz", "query": f"{q}.nii.gz"}
            for s, q, d in (("a", "b", 0.9), ("a", "c", 0.8), ("b", "a", 0.2), ("c", "a", 0.3), ("b", "c", 0.6),
                            ("c", "b", 0.5))]
    b = pair_bootstrap([(r["support_patient"], r["query_patient"], r["dice"]) for r in recs], seed=0)
    assert _interval(recs, lambda r: r["dice"]) == f"{b['mean']:.3f} [{b['ci_low']:.3f}, {b['ci_high']:.3f}]"
    records = pair_bootstrap([(str(i), str(i), r["dice"]) for i, r in enumerate(recs)], seed=0)
    assert (records["ci_low"], records["ci_high"]) != (b["ci_low"], b["ci_high"])  # the test can tell them apart
