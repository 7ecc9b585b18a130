import pytest
import torch

from imaging_meta.backbones import available_backbones, build_backbone
from imaging_meta.episode import Episode
from imaging_meta.learners.base import build_learner
from imaging_meta.learners.metric.protonet_seg import PrototypicalSegmenter
from imaging_meta.learners.prototypes import (
    cosine_logits,
    local_prototypes,
    masked_average_pooling,
    pixel_distance2,
    pooled_class_logits,
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


def test_a_strong_location_term_reproduces_the_support_mask():
    """With the same appearance everywhere, only location can decide: the query mask follows the support's."""
    h = 16
    centres = window_centres(h, h, 4)
    assert centres.shape == (16, 2) and torch.allclose(centres[0], torch.tensor([-0.75, -0.75]))
    feats = torch.ones(1, 3, h, h)
    mask = torch.zeros(1, h, h)
    mask[0, 4:8, 8:12] = 1  # window (1, 2)
    fg, fg_ok = local_prototypes(feats, mask, 4)
    bg, bg_ok = local_prototypes(feats, 1 - mask, 4)
    protos = torch.stack([bg, fg], 1)  # (1, 2, 16, 3)
    valid = torch.stack([bg_ok, fg_ok], 1)
    penalty = 100.0 * pixel_distance2(centres, h, h)
    logits = pooled_class_logits(feats, protos, valid, scale=20.0, penalty=penalty)
    pred = logits.argmax(1)[0]
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
