import pytest
import torch

from imaging_meta.backbones import available_backbones, build_backbone
from imaging_meta.episode import Episode
from imaging_meta.learners.base import build_learner
from imaging_meta.learners.metric.protonet_seg import PrototypicalSegmenter
from imaging_meta.learners.prototypes import (
    compact_prototypes,
    cosine_logits,
    grouped_class_logits,
    local_prototypes,
    masked_average_pooling,
    normalised_coordinates,
    window_centres,
)


def batch(t=2, k=2, q=3, h=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    masks = torch.zeros(t, k + q, h, h)
    masks[..., 8:20, 10:24] = 1
    images = torch.rand(t, k + q, 1, h, h, generator=g) * 0.2 + masks.unsqueeze(2) * 0.6
    return Episode(images[:, :k], masks[:, :k], images[:, k:], masks[:, k:], batched=True)


def small(**kw):
    return PrototypicalSegmenter(backbone="unet", backbone_kwargs={"out_channels": 8, "features": [4, 4, 8, 8, 16, 4]}, **kw)


def test_masked_average_pooling_and_cosine():
    f = torch.arange(2 * 3 * 4 * 4, dtype=torch.float64).view(2, 3, 4, 4)
    m = torch.zeros(2, 4, 4, dtype=torch.float64)
    m[:, 0, 0] = 1
    assert torch.allclose(masked_average_pooling(f, m), f[:, :, 0, 0], atol=1e-4)
    assert torch.allclose(masked_average_pooling(f, torch.zeros_like(m)), torch.zeros(2, 3, dtype=torch.float64))
    logits = cosine_logits(f, f[:, :, 0, 0].unsqueeze(1), scale=1.0)
    assert logits.shape == (2, 1, 4, 4) and torch.allclose(logits[:, 0, 0, 0], torch.ones(2, dtype=torch.float64))


def test_a_mask_shrunk_to_coarse_features_keeps_its_structure():
    """At a stride of 8 (a ResNet's features) bilinear shrinking read 2 of every 8 mask rows: a 6 x 6 structure
    between them vanished and its foreground prototype was 0 (a review, 2026-12-08). By area each feature pixel
    holds the share of its window the mask covers; at a factor of 2 that is what bilinear gave, exactly."""
    from imaging_meta.learners.prototypes import resize_mask

    mask = torch.zeros(1, 32, 32)
    mask[0, 5:11, 5:11] = 1.0
    small_mask = resize_mask(mask, (4, 4))
    assert float(small_mask.sum()) * 64 == pytest.approx(36.0)  # the structure's whole area, spread over 4 windows
    torch.testing.assert_close(small_mask[0, :2, :2], torch.full((2, 2), 9.0 / 64))  # 3 x 3 pixels in each
    f = torch.rand(1, 3, 4, 4, generator=torch.Generator().manual_seed(0)) + 1.0
    assert float(masked_average_pooling(f, mask).norm()) > 1.0
    g = torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(resize_mask(g, (8, 8)), torch.nn.functional.interpolate(
        g[:, None], size=(8, 8), mode="bilinear", align_corners=False)[:, 0])  # factor 2: as before
    torch.testing.assert_close(resize_mask(g, (32, 32)), torch.nn.functional.interpolate(
        g[:, None], size=(32, 32), mode="bilinear", align_corners=False)[:, 0])  # growing: bilinear


def test_shapes_loss_and_gradients():
    torch.manual_seed(0)
    m = small()
    ep = batch()
    logits = m(ep)
    assert logits.shape == (2, 3, 2, 32, 32)
    p = m.predict(ep)
    assert p.shape == (2, 3, 32, 32) and (p >= 0).all() and (p <= 1).all()
    loss = m.loss(ep)
    loss.backward()
    grads = [p.grad for p in m.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(g.abs().sum() for g in grads) > 0


def test_alignment_loss_adds_to_the_loss():
    torch.manual_seed(0)
    with_par = small(align_weight=1.0)
    without = small(align_weight=0.0)
    without.load_state_dict(with_par.state_dict())
    ep = batch()
    assert with_par.loss(ep) > without.loss(ep)


def test_gradient_matches_finite_differences():
    """d loss / d scale, analytic vs central differences, in float64."""
    torch.manual_seed(0)
    m = small(align_weight=0.0).double()
    ep = batch(t=1, k=1, q=1, h=32)
    ep = Episode(ep.support_images.double(), ep.support_labels.double(), ep.query_images.double(), ep.query_labels.double(), batched=True)
    w = next(m.encoder.parameters())
    loss = m.loss(ep)
    (g,) = torch.autograd.grad(loss, w)
    idx = (0,) * w.dim()
    eps = 1e-6
    with torch.no_grad():
        w[idx] += eps
        lp = m.loss(ep)
        w[idx] -= 2 * eps
        lm = m.loss(ep)
        w[idx] += eps
    fd = (lp - lm) / (2 * eps)
    assert g[idx].item() == pytest.approx(fd.item(), rel=1e-5, abs=1e-9)


def test_a_few_steps_fit_a_toy_task():
    torch.manual_seed(0)
    m = small()
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    ep = batch(h=32, seed=1)
    first = m.loss(ep).item()
    for _ in range(15):
        opt.zero_grad()
        m.loss(ep).backward()
        opt.step()
    assert m.loss(ep).item() < 0.7 * first


def test_config_rebuilds_the_learner():
    m = small(scale=10.0)
    cfg = m.config
    assert cfg["class_path"] == "imaging_meta.learners.metric.protonet_seg.PrototypicalSegmenter"
    assert cfg["init_args"]["scale"] == 10.0
    again = build_learner(cfg)
    again.load_state_dict(m.state_dict())
    with pytest.raises(ValueError, match="refusing"):
        build_learner({"class_path": "os.system", "init_args": {}})


def test_backbone_registry():
    assert {"unet", "conv4"} <= set(available_backbones())
    assert build_backbone("conv4", 1)(torch.rand(2, 1, 32, 32)).shape == (2, 64, 2, 2)
    with pytest.raises(ValueError, match="choose one of"):
        build_backbone("vit-huge")
    with pytest.raises(ValueError, match="divisible by 16"):
        build_backbone("unet", 1)(torch.rand(1, 1, 20, 20))


def test_local_prototypes_and_fallback_to_global():
    f = torch.rand(2, 4, 16, 16)
    m = torch.zeros(2, 16, 16)
    m[0, :8, :8] = 1  # exactly one 8x8 window of sample 0
    m[1, 3:5, 3:5] = 1  # smaller than a window: no local prototype
    protos, ok = local_prototypes(f, m, window=8)
    assert protos.shape == (2, 4, 4) and ok.shape == (2, 4)
    assert ok[0].tolist() == [True, False, False, False] and not ok[1].any()
    assert torch.allclose(protos[0, 0], f[0, :, :8, :8].mean((-2, -1)), atol=1e-6)
    learner = small(local_window=8)
    ep = batch(t=1, k=1, q=1, h=32)
    ep.support_labels.zero_()
    ep.support_labels[..., 3:5, 3:5] = 1  # tiny structure: only the global prototype is valid
    out = learner.predict(ep)
    assert out.shape == (1, 1, 32, 32) and torch.isfinite(out).all()


def test_a_window_the_mask_covers_exactly_at_the_threshold_gives_a_prototype():
    f = torch.rand(1, 4, 16, 16)
    full = torch.ones(1, 16, 16)
    assert local_prototypes(f, full, window=8, threshold=1.0)[1].all()  # coverage 1.0 >= threshold 1.0
    half = torch.zeros(1, 16, 16)
    half[:, :, :4] = 1  # half of each window in the first column of windows
    assert local_prototypes(f, half, window=8, threshold=0.5)[1].tolist() == [[True, False, True, False]]


def test_every_shot_builds_the_global_prototypes():
    """K-shot: the global prototypes are the mean over the shots of each shot's masked average (a prototype of the
    first shot only would ignore the others)."""
    learner = small()
    features = torch.rand(1, 2, 8, 16, 16)
    masks = torch.zeros(1, 2, 16, 16)
    masks[0, 0, :8] = 1
    masks[0, 1, 4:] = 1
    protos, valid = learner.prototypes(features, masks)
    per_shot_fg = [masked_average_pooling(features[0, i : i + 1], masks[0, i : i + 1])[0] for i in range(2)]
    per_shot_bg = [masked_average_pooling(features[0, i : i + 1], 1 - masks[0, i : i + 1])[0] for i in range(2)]
    torch.testing.assert_close(protos[0, 1, 0], (per_shot_fg[0] + per_shot_fg[1]) / 2)
    torch.testing.assert_close(protos[0, 0, 0], (per_shot_bg[0] + per_shot_bg[1]) / 2)
    assert valid[0, :, 0].all()


def test_window_centres_lie_at_the_mean_of_their_pixels_coordinates():
    """A window's centre is on the pixels' own grid: a window is at distance 0 from itself on average, and the
    grid is symmetric about the middle (the earlier centres were shifted by about 1/h towards the far edge)."""
    h, w, window = 20, 12, 4
    rows, cols = normalised_coordinates(h, w, dtype=torch.float64)
    centres = window_centres(h, w, window, dtype=torch.float64).view(h // window, w // window, 2)
    for i in range(h // window):
        for j in range(w // window):
            torch.testing.assert_close(centres[i, j, 0], rows[i * window:(i + 1) * window].mean())
            torch.testing.assert_close(centres[i, j, 1], cols[j * window:(j + 1) * window].mean())
    torch.testing.assert_close(centres[:, :, 0], -centres.flip(0)[:, :, 0])
    torch.testing.assert_close(centres[:, :, 1], -centres.flip(1)[:, :, 1])


def test_a_strong_location_term_reproduces_the_support_mask():
    """With the same appearance everywhere, only location can decide: the query mask follows the support's."""
    h = 16
    centres = window_centres(h, h, 4)
    assert centres.shape == (16, 2)
    feats = torch.ones(1, 3, h, h)
    mask = torch.zeros(1, h, h)
    mask[0, 4:8, 8:12] = 1  # window (1, 2)
    fg, fg_ok = local_prototypes(feats, mask, 4)
    bg, bg_ok = local_prototypes(feats, 1 - mask, 4)
    protos = torch.stack([bg, fg], 1)  # (1, 2, 16, 3)
    valid = torch.stack([bg_ok, fg_ok], 1)
    logits = grouped_class_logits(feats.unsqueeze(1), protos, valid, scale=20.0, centres=centres, location_weight=100.0)
    pred = logits.argmax(2)[0, 0]
    assert pred[4:8, 8:12].all() and pred.sum() == 16


def test_location_sensitive_learner_learns_its_weight():
    torch.manual_seed(0)
    m = small(local_window=8, coord_channels=True, location_weight=1.0)
    loss = m.loss(batch())
    loss.backward()
    assert m.log_location_weight.grad is not None and m.log_location_weight.grad.abs() > 0
    assert m.encoder.net.conv_0.conv_0.conv.in_channels == 3  # image + 2 coordinate channels
    with pytest.raises(ValueError, match="needs local_window"):
        small(location_weight=1.0)


def pixel_distance2(centres, h, w):
    """Squared distance from each centre (P, 2) to each pixel: (P, h, w); NaN centres (no location): 0."""
    r, c = normalised_coordinates(h, w, centres.device, centres.dtype)
    d2 = (r.view(1, h, 1) - centres[:, 0, None, None]) ** 2 + (c.view(1, 1, w) - centres[:, 1, None, None]) ** 2
    return d2.nan_to_num(0.0)


def dense_class_logits(features, prototypes, valid, scale, penalty):
    """ALPNet's soft max over every slot, invalid ones masked out, the location penalty (P, h, w) subtracted
    from every similarity: what `grouped_class_logits` must equal."""
    t, n = features.shape[:2]
    k, p, c = prototypes.shape[1:]
    flat = features.flatten(0, 1)
    protos, ok = prototypes.repeat_interleave(n, 0), valid.repeat_interleave(n, 0)
    sims = cosine_logits(flat, protos.reshape(t * n, k * p, c), scale).view(t * n, k, p, *flat.shape[-2:])
    if penalty is not None:
        sims = sims - penalty
    sims = sims.masked_fill(~ok[..., None, None], float("-inf"))
    out = (torch.softmax(sims, 2) * sims.masked_fill(~ok[..., None, None], 0.0)).sum(2)
    return out.view(t, n, k, *flat.shape[-2:])


@pytest.mark.parametrize("located", [False, True])
def test_matching_only_the_valid_slots_gives_the_logits_and_gradients_of_matching_all(located):
    g = torch.Generator().manual_seed(3)
    t, n, k, p, c, h, w = 3, 2, 2, 17, 5, 6, 7
    features = torch.randn(t, n, c, h, w, generator=g, dtype=torch.float64, requires_grad=True)
    prototypes = torch.randn(t, k, p, c, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.tensor(2.5, dtype=torch.float64, requires_grad=True)
    valid = torch.rand(t, k, p, generator=g) < 0.3
    valid[..., 0] = True  # the global slot
    valid[1, 0, 1:] = True  # one class with every slot valid, one with only the global one
    valid[2, 1, 1:] = False
    centres = torch.rand(p, 2, generator=g, dtype=torch.float64) * 2 - 1
    centres[0] = float("nan")  # the global slot has no location
    new = grouped_class_logits(features, prototypes, valid, 20.0, centres if located else None, weight)
    ref = dense_class_logits(features, prototypes, valid, 20.0, weight * pixel_distance2(centres, h, w) if located else None)
    torch.testing.assert_close(new, ref, rtol=1e-10, atol=1e-10)
    grad_w = torch.randn(new.shape, generator=g, dtype=torch.float64)
    inputs = (features, prototypes, weight) if located else (features, prototypes)
    ga = torch.autograd.grad((new * grad_w).sum(), inputs)
    gb = torch.autograd.grad((ref * grad_w).sum(), inputs)
    for a, b in zip(ga, gb, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)
    kept, ok, slots = compact_prototypes(prototypes[:, 1], valid[:, 1])
    assert kept.shape[1] == int(valid[:, 1].sum(-1).max()) < p  # padded to the largest count, not to P
    assert (ok.sum(-1) == valid[:, 1].sum(-1)).all() and torch.equal(valid[:, 1].gather(1, slots), ok)
    assert ok[2].sum() == 1 and slots[2, 0] == 0
    assert compact_prototypes(prototypes[1:2, 0], valid[1:2, 0])[0].shape[1] == p


def test_the_learner_matches_only_valid_slots_and_predicts_as_before():
    torch.manual_seed(0)
    m = small(local_window=4, location_weight=1.0).double().eval()
    ep = batch(t=2, k=2, q=3)
    ep = Episode(ep.support_images.double(), ep.support_labels.double(), ep.query_images.double(),
                 ep.query_labels.double(), batched=True)
    s_feat, q_feat = m.episode_features(ep.support_images, ep.query_images)
    protos, valid = m.prototypes(s_feat, ep.support_labels)
    assert valid.float().mean() < 0.6  # most slots are invalid: the compaction has work to do
    h, w = q_feat.shape[-2:]
    d2 = pixel_distance2(window_centres(h, w, 4, dtype=torch.float64), h, w)
    d2 = torch.cat([torch.zeros_like(d2[:1]), d2.repeat((protos.shape[2] - 1) // d2.shape[0], 1, 1)])
    ref = dense_class_logits(q_feat, protos, valid, m.scale, m.log_location_weight.exp() * m.scale * d2)
    ref = torch.nn.functional.interpolate(ref.flatten(0, 1), size=(32, 32), mode="bilinear", align_corners=False)
    torch.testing.assert_close(m(ep), ref.view(2, 3, 2, 32, 32), rtol=1e-9, atol=1e-9)
