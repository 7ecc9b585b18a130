"""The appearance check: how unlike the support scans a query scan looks, in the learner's encoder features."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from imaging_meta.volume.appearance import GAP, NOVELTY_WARN, AppearanceCheck, describe_slices


class PooledLearner:
    """Encoder stand-in: the slice average-pooled 4 x 4 into 4 x 4 cells, as one feature channel per cell row."""

    def slice_features(self, x: torch.Tensor) -> torch.Tensor:
        p = F.adaptive_avg_pool2d(x, 4)  # (N, 1, 4, 4)
        return p.transpose(1, 2)  # (N, 4, 1, 4): each cell row a channel


def _abdomen(depth: int = 16, size: int = 24, seed: int = 0) -> torch.Tensor:
    """A body (0.4) with a bright organ (0.8) whose place drifts along z, and a little noise."""
    g = torch.Generator().manual_seed(seed)
    v = torch.full((size, size, depth), 0.4) + 0.02 * torch.randn(size, size, depth, generator=g)
    v[:2], v[-2:], v[:, :2], v[:, -2:] = 0.0, 0.0, 0.0, 0.0
    for z in range(depth):
        c = 6 + z // 3
        v[c : c + 6, 5:11, z] = 0.8
    return v


def _thigh(depth: int = 16, size: int = 24) -> torch.Tensor:
    """Another region: a dark centre (bone marrow at 0.1) in a bright ring (muscle at 0.7), no organ."""
    r = torch.arange(size).float() - size / 2
    d = (r[:, None] ** 2 + r[None, :] ** 2).sqrt()
    s = torch.where(d < 4, 0.1, torch.where(d < 10, 0.7, 0.0))
    return s.unsqueeze(-1).repeat(1, 1, depth)


def test_describe_slices_is_none_without_an_encoder_and_means_and_spreads_with_one():
    from imaging_meta.learners.gradient.anil import ANIL
    from imaging_meta.learners.metric.protonet_seg import PrototypicalSegmenter

    assert describe_slices(object(), torch.zeros(3, 8, 8)) is None
    anil = ANIL(task="segmentation", backbone="unet", backbone_kwargs={"out_channels": 4, "features": [4, 4, 4, 4, 4, 4]})
    assert describe_slices(anil, torch.zeros(3, 32, 32)) is None  # its encode takes other arguments: not used
    flat = PooledLearner()
    flat.slice_features = lambda x: x.flatten(1)  # type: ignore[method-assign]  # (N, D): no feature maps
    assert describe_slices(flat, torch.zeros(3, 8, 8)) is None
    # an encoder with batch statistics: each slice's features from itself alone, whatever its batch
    bn = PrototypicalSegmenter(backbone="conv4", backbone_kwargs={"width": 4}).eval()
    x = torch.rand(5, 16, 16)
    torch.testing.assert_close(describe_slices(bn, x, chunk=5)[:2], describe_slices(bn, x[:2], chunk=2))
    d = describe_slices(PooledLearner(), torch.rand(5, 8, 8), chunk=2)
    assert d is not None and d.shape == (5, 8)  # 4 channels: their means, then their standard deviations


def test_another_region_is_far_more_novel_than_another_scan_of_the_same_region():
    check = AppearanceCheck(PooledLearner()).fit([_abdomen(seed=0)])
    assert check.reference is not None and check.reference > 0
    same = check.novelty(_abdomen(seed=1))
    other = check.novelty(_thigh())
    assert same is not None and other is not None
    assert same < 3.0 and other > NOVELTY_WARN
    assert check.novelty(_abdomen(seed=0)) == pytest.approx(0.0)  # the support itself


def test_the_reference_leaves_out_each_slices_near_copies():
    vol = _abdomen(depth=3 * (GAP + 1))
    check = AppearanceCheck(PooledLearner()).fit([vol])
    # every slice's neighbours within GAP are skipped, so the nearest other slice is at least GAP + 1 away
    assert check.reference is not None
    too_few = AppearanceCheck(PooledLearner()).fit([vol[..., : GAP + 1]])
    assert too_few.reference is None  # nothing else left
    # the message asks for what is enough: GAP + 2 slices (it asked for more than 2 * GAP + 1, a review, 2026-12-08)
    assert too_few.unchecked is not None and f"more than {GAP + 1} in one scan, or two scans" in too_few.unchecked
    assert AppearanceCheck(PooledLearner()).fit([vol[..., : GAP + 2]]).reference is not None
    # the last body slice is one of them: a scan of GAP + 2 slices whose body fills every slice
    assert AppearanceCheck(PooledLearner()).fit([_abdomen(depth=GAP + 2)]).reference is not None
    # only a slice's neighbours in its own scan are skipped: the same slice of another support scan is its nearest
    # (two copies of one scan: every slice's nearest is its twin, at distance 0, so no reference can be taken)
    twins = AppearanceCheck(PooledLearner()).fit([vol, vol.clone()])
    assert twins.reference is None and twins.unchecked is not None and "alike" in twins.unchecked


def test_no_check_without_an_encoder_or_with_a_single_slice():
    assert AppearanceCheck(object()).fit([_abdomen()]).novelty(_thigh()) is None
    assert AppearanceCheck(PooledLearner()).fit([_abdomen(depth=1)]).novelty(_thigh()) is None


def test_slices_are_described_by_each_channels_spread_as_well_as_its_mean():
    """A flat slice and a checkerboard of the same mean: the same means, told apart by their spreads."""

    class Pixels:
        def slice_features(self, x: torch.Tensor) -> torch.Tensor:
            return x

    flat = torch.full((1, 4, 4), 0.5)
    board = (torch.arange(4)[:, None] + torch.arange(4)[None, :]).remainder(2).float()[None]
    d = describe_slices(Pixels(), torch.cat([flat, board]))
    torch.testing.assert_close(d, torch.tensor([[0.5, 0.0], [0.5, 0.5]]))


def test_a_channel_constant_over_the_support_does_not_make_every_query_novel():
    """One channel never changes over the support's slices (its corner voxel, air): a query whose corner is a
    little brighter, by about the features' median spread, must not be measured in units of that channel's zero
    spread (without the floor on the spread the novelty is about 10^5)."""

    class WithCorner(PooledLearner):
        def slice_features(self, x: torch.Tensor) -> torch.Tensor:
            return torch.cat([super().slice_features(x), x[:, :, :1, :1].expand(-1, 1, 1, 4)], 1)

    support, query = _abdomen(seed=0), _abdomen(seed=1)
    query[0, 0, :] = 0.001
    novelty = AppearanceCheck(WithCorner()).fit([support]).novelty(query)
    assert novelty is not None and novelty < NOVELTY_WARN


def test_novelty_is_the_median_over_the_query_slices():
    """A query of 10 abdomen slices and 6 of another region is still mostly like the support: the median reads
    it so, where a mean is pulled over the warning by the minority of other slices."""
    support = _abdomen(seed=0)
    query = torch.cat([_abdomen(depth=10, seed=1), _thigh(depth=6)], -1)
    check = AppearanceCheck(PooledLearner()).fit([support])
    assert check.novelty(_thigh()) > NOVELTY_WARN  # the other region alone
    assert check.novelty(query) < 3.0
