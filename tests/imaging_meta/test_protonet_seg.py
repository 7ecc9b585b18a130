import pytest
import torch

from imaging_meta.backbones import available_backbones, build_backbone
from imaging_meta.episode import Episode
from imaging_meta.learners.base import build_learner
from imaging_meta.learners.protonet_seg import PrototypicalSegmenter
from imaging_meta.learners.prototypes import cosine_logits, masked_average_pooling


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
    assert cfg["class_path"] == "imaging_meta.learners.protonet_seg.PrototypicalSegmenter"
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
