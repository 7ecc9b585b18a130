"""The scan segmenter at the edges of its options and of its support: the largest z smoothing, a structure on one
voxel, an empty support mask, one support slice, two support slices of one scan, more empty body slices than
support slices, the out-of-fold intensity evidence of two support scans, and a retried query with a position
prior. A mutation review (2026-12) changed each of these by one line and no test failed; every test here fails on
one of those changes (the docstrings say which)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from imaging_meta.volume.evidence import LogisticFusion, logit
from imaging_meta.volume.segmenter import ScanOptions, ScanSegmenter, structure_slices
from tests.imaging_meta.test_scan_segmenter import (
    BoxLearner,
    BrightLearner,
    ConstantLearner,
    RecordingLearner,
    _volume,
)


def _noisy(img: torch.Tensor, seed: int) -> torch.Tensor:
    """Each patient's own faint noise: the same volume given twice is refused."""
    return img + 1e-3 * torch.rand(img.shape, generator=torch.Generator().manual_seed(seed))


def test_the_largest_z_smoothing_the_message_allows_is_accepted():
    """``--z-smoothing 0.5`` (each neighbour half, the slice itself nothing) is what the error message names as
    the upper end: refusing it told the user to give a value the option then refused (``< 0.5``)."""
    opts = ScanOptions(smooth_z=0.5)
    assert opts.smooth_z == 0.5
    with pytest.raises(ValueError, match=r"from 0 \(off\) to 0.5; got 0.5001"):
        ScanOptions(smooth_z=0.5001)


def test_a_structure_on_one_voxel_of_a_slice_is_on_that_slice():
    """A mask with a single voxel on slice 3: that slice shows the structure (counting only slices with more
    than one voxel lost thin tips, and a one-voxel structure had no slice at all)."""
    mask = torch.zeros(8, 8, 6, dtype=torch.bool)
    mask[4, 2, 3] = True
    assert structure_slices(mask) == [3]
    mask[1, 1, 5] = mask[1, 2, 5] = True
    assert structure_slices(mask) == [3, 5]


def test_a_support_whose_mask_is_empty_is_refused_by_name():
    """A support scan whose structure vanished in preprocessing is named in a ValueError; without the check the
    second support was silently dropped from the fit (or the stack of no slices failed with a bare RuntimeError)."""
    a_img, a_mask = _volume()
    b_img, _ = _volume()
    empty = torch.zeros_like(a_mask)
    with pytest.raises(ValueError, match="support 1: the mask has no foreground after preprocessing"):
        ScanSegmenter(ConstantLearner(), ScanOptions()).fit([(a_img, a_mask), (_noisy(b_img, 1), empty)])
    with pytest.raises(ValueError, match="support 0: the mask has no foreground after preprocessing"):
        ScanSegmenter(ConstantLearner(), ScanOptions()).fit([(a_img, empty)])


def test_negative_slices_are_capped_by_their_own_option_not_the_support_slices():
    """20 slices of body with the organ on 5 of them: 15 slices without it, of which ``max_negative_slices`` (12)
    are kept for the slice gate even when only 2 support slices are (the negatives were capped at 2 when the
    wrong option was read, and the gate fitted on almost nothing)."""
    img, mask = _volume(depth=20, lo=4, hi=8)
    seg = ScanSegmenter(ConstantLearner(), ScanOptions(max_support_slices=2, smooth_z=0.0)).fit([(img, mask)])
    assert seg.support_images is not None and seg.support_images.shape[0] == 2
    assert seg._support_probs is not None
    negs = seg._support_probs[2]
    assert negs.shape[0] == 12
    few = ScanSegmenter(ConstantLearner(), ScanOptions(max_negative_slices=3, smooth_z=0.0)).fit([(img, mask)])
    assert few._support_probs is not None and few._support_probs[2].shape[0] == 3
    assert few.support_images is not None and few.support_images.shape[0] == 5


def test_two_support_slices_of_one_scan_are_each_predicted_from_the_other():
    """One scan, two support slices: each is calibrated leave-one-out, predicted from the other slice alone (with
    leave-one-out only from three slices up, both were predicted from both, themselves included: the in-fold
    calibration a query never sees)."""
    img, mask = _volume(lo=2, hi=9)
    for z in range(12):  # each slice's organ tells its axial position
        img[7:13, 7:13, z] = 0.5 + 0.04 * z
    learner = RecordingLearner()
    ScanSegmenter(learner, ScanOptions(negatives=False, loo_gap=0)).fit([(img, mask)], slices=[[4, 7]])
    at = {z: round(0.5 + 0.04 * z, 2) for z in (4, 7)}
    assert learner.calls[:2] == [({at[4]}, {at[7]}), ({at[7]}, {at[4]})]


def test_the_fusion_is_fitted_on_the_out_of_fold_intensity_evidence_of_two_support_scans():
    """Two support scans, each organ's intensity a background tissue of the other: across scans, the intensity
    evidence the fusion is fitted on is each scan's from the other scan's histograms (the organ's is negative),
    not the pooled model's in-sample evidence (positive on every organ pixel), which let the fusion trust the
    intensity as if it carried from patient to patient."""
    a_img, a_mask = _volume(organ=0.8)
    b_img, b_mask = _volume(organ=0.55)
    a_img[15:17, 3:17, :] = 0.55
    b_img[15:17, 3:17, :] = 0.8
    fitted_on = []
    fit = LogisticFusion.fit

    def spy(self, features, labels, steps=50):
        fitted_on.append(features.clone())
        return fit(self, features, labels, steps)

    opts = ScanOptions(smooth_z=0.0, relax_empty=False)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(LogisticFusion, "fit", spy)
        seg = ScanSegmenter(BoxLearner(), opts).fit([(a_img, a_mask), (b_img, b_mask)])
    assert seg._support_llr is not None and seg.intensity is not None and seg.support_images is not None
    assert len(fitted_on) == 1 and fitted_on[0].shape[-1] == 2
    torch.testing.assert_close(fitted_on[0][:, 1], seg._support_llr.flatten(), rtol=0, atol=0)
    organ = (seg.support_masks > 0.5).flatten()
    intensity = fitted_on[0][: organ.numel(), 1]
    assert (intensity[organ] < 0).all()  # out of fold: each organ looks like the other scan's background
    assert (seg.intensity.llr(seg.support_images[:, 0]).flatten()[organ] > 0).all()  # in sample it would not


def test_one_support_slice_adds_the_log_odds_at_threshold_one_half():
    """With one support slice there is nothing to leave out: the fusion adds the learner's and the intensity's
    log-odds (weights 1, 1; bias 0) at threshold 0.5, also when the same segmenter was fitted before on more
    slices (it kept that fit's threshold)."""
    img, mask = _volume()
    seg = ScanSegmenter(BrightLearner(), ScanOptions(smooth_z=0.0, relax_empty=False, negatives=False))
    seg.threshold = 0.2  # as left by an earlier fit on several slices
    d = seg.fit([(img, mask)], slices=[[6]]).describe()
    assert d["support_slices"] == 1 and d["support_dice"] is None
    assert d["threshold"] == 0.5 and d["fusion_weight"] == [1.0, 1.0] and d["fusion_bias"] == 0.0
    assert seg.intensity is not None
    q_img, _ = _volume(organ=0.7)
    images = torch.stack([q_img[..., z] for z in range(q_img.shape[-1])])
    learned = torch.where(images > 0.5, torch.tensor(0.9), torch.tensor(0.05))
    expected = torch.sigmoid(logit(learned) + seg.intensity.llr(images)).permute(1, 2, 0)
    torch.testing.assert_close(seg.predict(q_img), expected)
    alone = ScanSegmenter(BrightLearner(), ScanOptions(intensity=False, negatives=False)).fit([(img, mask)], slices=[[6]])
    assert alone.describe()["fusion_weight"] == [1.0] and alone.threshold == 0.5


def test_an_empty_query_with_a_position_prior_is_retried_with_the_querys_prior():
    """Two support scans with the position prior, and a query whose organ is at an intensity the supports call
    background: the fitted rules leave it empty, and the retry without intensity evidence fuses the same query's
    position prior (without handing it over the retry failed on an AssertionError instead of finding the organ)."""
    def support(seed):
        img, mask = _volume()
        img[15:17, 3:17, :] = 0.55
        return _noisy(img, seed), mask

    a, b = support(0), support(1)
    q_img, q_mask = _volume(organ=0.55)
    q_img[15:17, 3:17, :] = 0.55
    opts = ScanOptions(smooth_z=0.0, position=True)
    strict = ScanSegmenter(BoxLearner(), dataclasses.replace(opts, relax_empty=False)).fit([a, b])
    assert strict.describe()["position_prior"]
    assert not (strict.predict(q_img) > 0.5).any()
    seg = ScanSegmenter(BoxLearner(), opts).fit([a, b])
    found = seg.predict(q_img) > 0.5
    assert seg.relaxed == "without intensity evidence"
    assert found[q_mask].all()
