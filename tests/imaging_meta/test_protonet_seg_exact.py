"""Exact values of the prototypical segmenter (PANet / ALPNet, the default segmentation learner).

The tests in test_protonet_seg.py check shapes, gradients and that a toy task is learnt; these pin the values a
user relies on: which prototypes are foreground and which background, the class weights of both
cross-entropies, the hard mask of the alignment loss, the pooling and upsampling at ``feature_pool`` > 1, the
location penalty on non-square slices, the coordinate channels, the option checks, and that ``predict`` gives
the foreground probability.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from imaging_meta.backbones import uses_support_statistics
from imaging_meta.episode import Episode
from imaging_meta.learners.metric.protonet_seg import PrototypicalSegmenter
from imaging_meta.learners.prototypes import cosine_logits, local_prototypes, window_centres
from tests.imaging_meta.fewshot import segmentation_episode
from tests.imaging_meta.test_non_transductive import SMALL_CONV4, alone_and_together
from tests.imaging_meta.test_protonet_seg import batch, dense_class_logits, pixel_distance2, small

#: the class weights of ``bg_weight: 0.3``, as the learner's float32 buffer holds them (then made float64)
BG_03 = torch.tensor([0.3, 1.0]).double()


def double(ep: Episode) -> Episode:
    return Episode(ep.support_images.double(), ep.support_labels.double(), ep.query_images.double(),
                   ep.query_labels.double(), batched=True)


def weighted_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Class-weighted cross-entropy of (T, N, 2, H, W) logits against (T, N, H, W) labels, by hand: the weighted
    mean over pixels of -log softmax at the true class."""
    y = labels.long().unsqueeze(2)
    nll = -logits.log_softmax(dim=2).gather(2, y).squeeze(2)
    w = weight[y.squeeze(2)]
    return (w * nll).sum() / w.sum()


def half_covered_masks(t: int, k: int, size: int) -> torch.Tensor:
    """(T, K, size, size) masks covering some 4 x 4 windows fully and others by half (coverage 0.5)."""
    masks = torch.zeros(t, k, size, size)
    masks[:, :, :4, :8] = 1  # windows (0, 0) and (0, 1) full
    masks[:, :, 4:6, :8] = 1  # rows 4-5 of 4-7: windows (1, 0) and (1, 1) half covered
    masks[1:, 1:, 8:12, 8:12] = 1  # one more full window in the last shot of the last task
    return masks


# ---------------------------------------------------------------------------------------------- options
def test_the_background_class_comes_first_in_the_class_weights():
    """``bg_weight`` weighs the background (class 0); swapped, it would shrink the organ's loss instead."""
    m = small(bg_weight=0.3)
    assert m.class_weight.tolist() == pytest.approx([0.3, 1.0])


def test_the_location_weight_starts_at_the_configured_value():
    """The weight is learnt in log space: ``location_weight: 2`` must start as 2, not as e^2."""
    m = small(local_window=4, location_weight=2.0)
    with torch.no_grad():
        assert float(m.log_location_weight.exp()) == pytest.approx(2.0)
        assert float(m.log_location_weight) == pytest.approx(torch.tensor(2.0).log().item())


@pytest.mark.parametrize(
    "kwargs",
    [
        {"feature_pool": 0},
        {"local_threshold": 0.0},
        {"local_threshold": 1.5},
        {"local_window": -1},
        {"local_window": 4, "location_weight": -0.1},
        {"location_weight": 1.0},  # needs local_window > 0
    ],
)
def test_out_of_range_options_are_refused(kwargs):
    """A zero pool, an empty or impossible coverage threshold, a negative window or a negative location weight
    would give empty features, every window or none as a prototype, or no location term without a word."""
    with pytest.raises(ValueError, match="must be"):
        small(**kwargs)


# ------------------------------------------------------------------------------------------- prototypes
def test_local_prototypes_sit_in_their_class_slots():
    """Slots ``[:, 1, 1:]`` are the foreground windows of every shot and ``[:, 0, 1:]`` the background's, with the
    configured threshold; swapped, every pixel would be matched with the wrong class's local prototypes."""
    m = small(local_window=4, local_threshold=0.5)
    t, k, c, size = 2, 2, 8, 16
    features = torch.rand(t, k, c, size, size, generator=torch.Generator().manual_seed(0))
    masks = half_covered_masks(t, k, size)
    protos, valid = m.prototypes(features, masks)
    assert protos.shape == (t, 2, 1 + k * 16, c) and valid.shape == (t, 2, 1 + k * 16)
    flat_f, flat_m = features.flatten(0, 1), masks.flatten(0, 1)
    for cls, mask in ((0, 1.0 - flat_m), (1, flat_m)):
        p, ok = local_prototypes(flat_f, mask, 4, 0.5)
        torch.testing.assert_close(protos[:, cls, 1:], p.reshape(t, -1, c))
        assert torch.equal(valid[:, cls, 1:], ok.reshape(t, -1))
    # shot 0 of task 0: windows (0, 0), (0, 1) full, (1, 0), (1, 1) half covered by the foreground
    assert valid[0, 1, 1:17].nonzero().flatten().tolist() == [0, 1, 4, 5]
    assert not torch.equal(valid[:, 0], valid[:, 1])


def test_a_configured_local_threshold_decides_which_windows_give_prototypes():
    """``local_threshold: 0.5`` must let half-covered windows give prototypes, which the default 0.95 refuses."""
    features = torch.rand(1, 1, 8, 16, 16, generator=torch.Generator().manual_seed(1))
    masks = half_covered_masks(1, 1, 16)
    _, loose = small(local_window=4, local_threshold=0.5).prototypes(features, masks)
    _, strict = small(local_window=4).prototypes(features, masks)
    assert loose[0, 1, 1:].nonzero().flatten().tolist() == [0, 1, 4, 5]
    assert strict[0, 1, 1:].nonzero().flatten().tolist() == [0, 1]


# ------------------------------------------------------------------------------------------------ losses
def test_the_query_loss_is_the_class_weighted_cross_entropy():
    """With ``bg_weight: 0.3`` each background pixel counts 0.3 in the query loss (a weighted mean)."""
    torch.manual_seed(0)
    m = small(align_weight=0.0, bg_weight=0.3).double()
    ep = double(batch(t=2, k=1, q=2))
    logits = m(ep)
    ref = weighted_cross_entropy(logits, ep.query_labels, BG_03)
    unweighted = weighted_cross_entropy(logits, ep.query_labels, torch.ones(2, dtype=torch.float64))
    assert abs(float((ref - unweighted).detach())) > 1e-3  # the weights matter here
    torch.testing.assert_close(m.loss(ep), ref, rtol=1e-10, atol=1e-12)


def test_the_alignment_loss_uses_the_hard_predicted_query_mask_and_the_class_weights():
    """PAR: prototypes masked-averaged from the query features under the query's own argmax mask must segment
    the support, scored with the same class-weighted cross-entropy; computed here by hand (PANet, global
    prototypes, no upsampling at feature_pool 1)."""
    torch.manual_seed(0)
    m = small(align_weight=0.7, bg_weight=0.3).double()
    ep = double(batch(t=2, k=2, q=2))
    weight = BG_03
    q_logits = m(ep)
    hard = q_logits.argmax(dim=2).double()  # (T, Q, H, W)
    assert ((hard.flatten(1).mean(1) > 0.05) & (hard.flatten(1).mean(1) < 0.95)).all()  # both classes predicted
    s_feat, q_feat = m.episode_features(ep.support_images, ep.query_images)

    def pooled(mask):  # (T, Q, H, W) -> (T, F): masked average per query, then the mean over the queries
        mask = mask.unsqueeze(2)
        return ((q_feat * mask).sum((-2, -1)) / (mask.sum((-2, -1)) + 1e-5)).mean(1)

    protos = torch.stack([pooled(1.0 - hard), pooled(hard)], 1)  # (T, 2, F)
    cos = torch.einsum("tkfhw,tcf->tkchw", F.normalize(s_feat, dim=2), F.normalize(protos, dim=-1))
    align = weighted_cross_entropy(m.scale * cos, ep.support_labels, weight)
    query = weighted_cross_entropy(q_logits, ep.query_labels, weight)
    unweighted = weighted_cross_entropy(m.scale * cos, ep.support_labels, torch.ones(2, dtype=torch.float64))
    assert abs(float((align - unweighted).detach())) > 1e-3
    torch.testing.assert_close(m.loss(ep), query + 0.7 * align, rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------------------------------ features and logits
def test_feature_pool_averages_the_encoder_features():
    """``feature_pool: 2`` average-pools the dense features (as the docs say), not max-pools them."""
    torch.manual_seed(0)
    m = small(feature_pool=2)
    x = torch.rand(3, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(m.encode(x), F.avg_pool2d(m.encoder(x), 2))
        assert m.features(x.view(1, 3, 1, 32, 32)).shape == (1, 3, 8, 16, 16)


@pytest.mark.parametrize("local_window", [0, 4])
def test_pooled_logits_are_upsampled_bilinearly(local_window):
    """At ``feature_pool: 2`` the logits of the pooled grid come back to the slice size bilinearly (nearest
    upsampling would give a blocky mask)."""
    torch.manual_seed(0)
    kw = {"local_window": local_window, "location_weight": 1.0} if local_window else {}
    m = small(feature_pool=2, **kw).double().eval()
    ep = double(batch(t=2, k=2, q=3))
    with torch.no_grad():
        s_feat, q_feat = m.episode_features(ep.support_images, ep.query_images)
        protos, valid = m.prototypes(s_feat, ep.support_labels)
        h, w = q_feat.shape[-2:]
        assert (h, w) == (16, 16)
        if local_window:
            d2 = pixel_distance2(window_centres(h, w, 4, dtype=torch.float64), h, w)
            d2 = torch.cat([torch.zeros_like(d2[:1]), d2.repeat((protos.shape[2] - 1) // d2.shape[0], 1, 1)])
            coarse = dense_class_logits(q_feat, protos, valid, m.scale, m.log_location_weight.exp() * m.scale * d2)
            coarse = coarse.flatten(0, 1)
        else:
            coarse = cosine_logits(q_feat.flatten(0, 1), protos[:, :, 0].repeat_interleave(3, 0), m.scale)
        ref = F.interpolate(coarse, size=(32, 32), mode="bilinear", align_corners=False).view(2, 3, 2, 32, 32)
        torch.testing.assert_close(m(ep), ref, rtol=1e-9, atol=1e-9)


def test_the_location_penalty_on_non_square_slices_uses_rows_and_columns():
    """On 32 x 48 slices the window centres are 8 rows by 12 columns of windows; with height and width swapped
    the prototypes would be penalised by the distance to the wrong places (same count, wrong centres)."""
    torch.manual_seed(0)
    h, w = 32, 48
    g = torch.Generator().manual_seed(2)
    masks = torch.zeros(1, 3, h, w, dtype=torch.float64)
    masks[..., 6:22, 10:38] = 1
    images = torch.rand(1, 3, 1, h, w, generator=g, dtype=torch.float64) * 0.2 + masks.unsqueeze(2) * 0.6
    ep = Episode(images[:, :2], masks[:, :2], images[:, 2:], masks[:, 2:], batched=True)
    m = small(local_window=4, location_weight=3.0).double().eval()
    with torch.no_grad():
        s_feat, q_feat = m.episode_features(ep.support_images, ep.query_images)
        protos, valid = m.prototypes(s_feat, ep.support_labels)
        assert q_feat.shape[-2:] == (h, w)
        d2 = pixel_distance2(window_centres(h, w, 4, dtype=torch.float64), h, w)
        assert d2.shape[0] == (h // 4) * (w // 4)
        d2 = torch.cat([torch.zeros_like(d2[:1]), d2.repeat((protos.shape[2] - 1) // d2.shape[0], 1, 1)])
        ref = dense_class_logits(q_feat, protos, valid, m.scale, m.log_location_weight.exp() * m.scale * d2)
        torch.testing.assert_close(m(ep), ref, rtol=1e-9, atol=1e-9)


def test_coordinate_channels_hold_the_row_then_the_column():
    """CoordConv: channel 1 of the encoder's input is the normalised row (constant along a row), channel 2 the
    column, on a non-square slice; the image stays channel 0."""
    m = small(coord_channels=True)
    seen = []
    handle = m.encoder.register_forward_pre_hook(lambda _module, args: seen.append(args[0].detach().clone()))
    x = torch.rand(2, 1, 16, 32, generator=torch.Generator().manual_seed(0))
    try:
        with torch.no_grad():
            m.encode(x)
    finally:
        handle.remove()
    (inp,) = seen
    assert inp.shape == (2, 3, 16, 32)
    torch.testing.assert_close(inp[:, 0], x[:, 0])
    rows = torch.linspace(-1, 1, 16).view(16, 1).expand(16, 32)
    cols = torch.linspace(-1, 1, 32).view(1, 32).expand(16, 32)
    torch.testing.assert_close(inp[:, 1], rows.expand(2, 16, 32))
    torch.testing.assert_close(inp[:, 2], cols.expand(2, 16, 32))


# ------------------------------------------------------------------------------------------- predictions
def test_a_conv4_segmenter_predicts_a_query_alone_as_in_its_batch():
    """The Conv-4 normalises with batch statistics: its queries must be normalised with the support's statistics
    (per task), so a query's mask does not depend on the other queries it is segmented with."""
    torch.manual_seed(0)
    m = PrototypicalSegmenter(backbone="conv4", backbone_kwargs=SMALL_CONV4).eval()
    assert uses_support_statistics(m.encoder)
    alone, together = alone_and_together(m, segmentation_episode(n_shot=1, n_query=3, tasks=2, size=32, seed=3))
    assert alone.shape == together.shape == (2, 3, 32, 32)
    torch.testing.assert_close(alone, together, rtol=0, atol=1e-5)


class BrightDark(nn.Module):
    """A stand-in encoder with orthogonal features for bright (1) and dark (0) pixels: (x, 1 - x)."""

    def forward(self, x):
        return torch.cat([x, 1.0 - x], dim=1)


def test_predict_gives_the_foreground_probability():
    """Where the query looks like the support's foreground the predicted probability is near 1, elsewhere near
    0 (the background channel would give the complement: an inverted mask)."""
    m = small()
    m.encoder = BrightDark()
    support = torch.zeros(1, 1, 16, 16)
    support[..., 2:9, 3:12] = 1
    query = torch.zeros(1, 2, 16, 16)
    query[:, 0, 8:14, 1:6] = 1
    query[:, 1, 0:5, 10:16] = 1
    ep = Episode(support.unsqueeze(2), support, query.unsqueeze(2), query, batched=True)
    with torch.no_grad():
        p = m.predict(ep)
    assert p.shape == (1, 2, 16, 16)
    assert p[query == 1].min() > 0.99 and p[query == 0].max() < 0.01
