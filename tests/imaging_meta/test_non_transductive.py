"""A query's prediction must not depend on the other queries (issue 14).

The Conv-4 and ResNet-12 backbones normalise with batch statistics. Every learner now normalises a task's
queries with the statistics of its support (`imaging_meta.backbones.support_statistics`), so `predict` gives a
query the same probabilities alone (as `imaging-meta classify` scores it) as inside its batch of queries. With
``backbone_kwargs={"transductive": True}`` the statistics are those of the batch the learner forwards, queries
included (the behaviour before), and the two differ. The U-Net's instance norm is per image, never transductive.
"""

from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from imaging_meta.backbones import (
    SupportBatchNorm2d,
    SupportBatchNorm3d,
    build_backbone,
    build_encoder,
    conv_block,
    forward_with_support_statistics,
    support_statistics,
    uses_support_statistics,
)
from imaging_meta.learners.base import build_learner
from imaging_meta.learners.gradient.maml import MAML
from imaging_meta.learners.inner_loop import functional_forward
from imaging_meta.learners.task_network import forward_query
from tests.imaging_meta.fewshot import TINY_UNET, classification_episode, segmentation_episode

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "model"
MODELS = sorted(p.stem for p in CONFIGS.glob("*.yaml"))
CLS_MODELS = [m for m in MODELS if m.endswith("_cls")]
SMALL_CONV4 = {"width": 8, "depth": 2}
#: backbone name -> the options that shrink it (merged over the config's own ``backbone_kwargs``)
SMALL_BACKBONES = {"unet": TINY_UNET, "conv4": SMALL_CONV4, "resnet12": {"widths": (4, 8)}, "resnet": {"depth": 18, "width": 8}}


def learner_config(model: str) -> dict:
    return yaml.safe_load((CONFIGS / f"{model}.yaml").read_text())["model"]["learner"]


def backbone_of(model: str) -> str | None:
    return learner_config(model)["init_args"].get("backbone")  # None: no network (the descriptor baselines)


# the ResNet's BatchNorm keeps running statistics, which eval mode uses: predictions are never transductive there;
# a learner without a network has no batch statistics at all
BATCH_STATISTICS_CLS_MODELS = [m for m in CLS_MODELS if backbone_of(m) not in ("resnet", None)]


def build(model: str, transductive: bool = False, **init_args):
    """The learner of ``configs/model/<model>.yaml`` with a small backbone (seeded), in eval mode."""
    learner = learner_config(model)
    init = learner["init_args"]
    if "backbone" not in init:  # no network to shrink
        return build_learner({"class_path": learner["class_path"], "init_args": {**init, **init_args}}).eval()
    backbone_kwargs = {**(init.get("backbone_kwargs") or {}), **SMALL_BACKBONES[init["backbone"]]}
    if transductive:
        backbone_kwargs["transductive"] = True
    args = {**learner["init_args"], "backbone_kwargs": backbone_kwargs, **init_args}
    torch.manual_seed(0)
    return build_learner({"class_path": learner["class_path"], "init_args": args}).eval()


def episode_for(model: str):
    if model.endswith("_seg"):
        return segmentation_episode(n_shot=1, n_query=3, tasks=2, size=32, seed=3)
    return classification_episode(n_way=5, n_shot=2, n_query=2, tasks=2, size=16, seed=3)


def one_query(ep, j: int):
    """The episode with only query ``j`` of each task (same support)."""
    return replace(
        ep, query_images=ep.query_images[:, j : j + 1], query_labels=ep.query_labels[:, j : j + 1],
        query_ids=[ids[j : j + 1] for ids in ep.query_ids],
    )


def alone_and_together(learner, ep) -> tuple[torch.Tensor, torch.Tensor]:
    """``predict`` of every query alone (stacked) and of the full episode: both (T, Q, ...)."""
    with torch.no_grad():
        together = learner.predict(ep)
        alone = torch.cat([learner.predict(one_query(ep, j)) for j in range(ep.query_images.shape[1])], dim=1)
    return alone, together


# ---------------------------------------------------------------------------------- every learner
@pytest.mark.parametrize("model", MODELS)
def test_a_query_gets_the_same_probabilities_alone_and_in_its_batch(model):
    learner = build(model)
    assert not learner.transductive
    alone, together = alone_and_together(learner, episode_for(model))
    assert alone.shape == together.shape
    torch.testing.assert_close(alone, together, rtol=0, atol=1e-5)


@pytest.mark.parametrize("model", BATCH_STATISTICS_CLS_MODELS)
def test_transductive_batch_statistics_make_a_query_depend_on_the_others(model):
    """The old behaviour, kept as an option: queries normalised with statistics that include the other queries."""
    learner = build(model, transductive=True)
    assert learner.transductive and learner.config["init_args"]["backbone_kwargs"]["transductive"] is True
    alone, together = alone_and_together(learner, episode_for(model))
    assert (alone - together).abs().max() > 1e-4  # ten times the tolerance of the test above


def test_maml_vmap_predictions_are_query_independent_and_equal_the_loops():
    loop = build("maml_cls")
    batched = build("maml_cls", task_batching="vmap")
    batched.load_state_dict(loop.state_dict())
    ep = episode_for("maml_cls")
    alone, together = alone_and_together(batched, ep)
    torch.testing.assert_close(alone, together, rtol=0, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(together, loop.predict(ep), rtol=1e-5, atol=1e-6)


def test_transductive_is_recorded_in_the_config_and_survives_a_rebuild():
    learner = build("protonet_cls", transductive=True)
    rebuilt = build_learner(learner.config)
    assert rebuilt.transductive and rebuilt.config == learner.config
    rebuilt.load_state_dict(learner.state_dict())
    assert not build("protonet_cls").transductive and not build("protonet_seg").transductive


# ------------------------------------------------------------------------------------ the norm layer
def test_support_batchnorm_keeps_batchnorms_state_dict_and_behaviour_outside_the_context():
    torch.manual_seed(0)
    plain, support = nn.BatchNorm2d(3, track_running_stats=False), SupportBatchNorm2d(3, track_running_stats=False)
    assert plain.state_dict().keys() == support.state_dict().keys()
    with torch.no_grad():
        plain.weight.normal_(), plain.bias.normal_()
    support.load_state_dict(plain.state_dict())  # checkpoints of the old backbones load unchanged
    x = 3 * torch.randn(7, 3, 4, 4) + 1
    assert torch.equal(support(x), plain(x))
    with support_statistics(7):  # the whole batch is the support: plain BatchNorm, bit for bit
        assert torch.equal(support(x), plain(x))
    with support_statistics(4):
        out = support(x)
    torch.testing.assert_close(out[:4], plain(x[:4]), rtol=1e-5, atol=1e-5)
    mean, var = x[:4].mean((0, 2, 3), keepdim=True), x[:4].var((0, 2, 3), unbiased=False, keepdim=True)
    expected = (x[4:] - mean) / torch.sqrt(var + plain.eps) * plain.weight.view(1, -1, 1, 1) + plain.bias.view(1, -1, 1, 1)
    torch.testing.assert_close(out[4:], expected, rtol=1e-5, atol=1e-5)
    with support_statistics(8), pytest.raises(ValueError, match="put the support first"):
        support(x)
    with pytest.raises(ValueError, match="at least one"):
        with support_statistics(0):
            pass


def test_running_statistics_kept_in_training_follow_the_support_only():
    """With running statistics, a training pass inside ``support_statistics(n)`` updates them from the support rows
    alone, as a support-only pass of nn.BatchNorm2d would (the queries must not leak into them)."""
    torch.manual_seed(0)
    support, plain = SupportBatchNorm2d(3), nn.BatchNorm2d(3)
    x = torch.randn(6, 3, 4, 4)
    x[4:] += 50.0  # queries far from the support
    with support_statistics(4):
        support(x)
    plain(x[:4])
    torch.testing.assert_close(support.running_mean, plain.running_mean)
    torch.testing.assert_close(support.running_var, plain.running_var)


def test_backbones_use_support_statistics_and_the_unet_normalises_each_image():
    for name, kw in [("conv4", SMALL_CONV4), ("resnet12", {"widths": (4, 8)}), ("conv4", {**SMALL_CONV4, "spatial_dims": 3})]:
        backbone = build_backbone(name, 1, **kw)
        norms = [m for m in backbone.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        assert norms and all(isinstance(m, (SupportBatchNorm2d, SupportBatchNorm3d)) for m in norms)
        assert uses_support_statistics(backbone) and not uses_support_statistics(build_backbone(name, 1, transductive=True, **kw))
    unet = build_backbone("unet", 1, **TINY_UNET)
    kinds = {type(m) for m in unet.modules()}
    assert nn.InstanceNorm2d in kinds and not any(issubclass(k, nn.modules.batchnorm._BatchNorm) for k in kinds)
    with pytest.raises(ValueError, match="transductive=True would change nothing"):
        build_backbone("unet", 1, transductive=True, **TINY_UNET)


def test_an_encoder_embeds_a_query_from_the_support_and_itself_only():
    torch.manual_seed(0)
    encoder = build_encoder("conv4", 1, **SMALL_CONV4)
    g = torch.Generator().manual_seed(0)
    support, query = torch.randn(4, 1, 16, 16, generator=g), torch.randn(5, 1, 16, 16, generator=g)
    fs, fq = forward_with_support_statistics(encoder, support, query)
    torch.testing.assert_close(fs, encoder(support), rtol=1e-5, atol=1e-5)
    _, alone = forward_with_support_statistics(encoder, support, query[2:3])
    torch.testing.assert_close(alone, fq[2:3], rtol=1e-5, atol=1e-5)
    # a query that is a support image gets that image's support features
    _, copy = forward_with_support_statistics(encoder, support, support[1:2])
    torch.testing.assert_close(copy, fs[1:2], rtol=1e-5, atol=1e-5)


def test_maml_query_forward_uses_the_support_statistics_under_the_adapted_weights():
    torch.manual_seed(0)
    learner = MAML(n_way=5, backbone_kwargs=SMALL_CONV4, inner_steps=2, inner_lr=0.3).double()
    task = episode_for("maml_cls").task(0)
    task = replace(task, support_images=task.support_images.double(), query_images=task.query_images.double())
    adapted, frozen = learner.adapt_task(task, 2, first_order=False)
    support_logits = functional_forward(learner.net, adapted, frozen, task.support_images)
    # a query that is a support image gets that image's logits at the adapted weights
    copies = forward_query(learner.net, adapted, frozen, task.support_images, task.support_images[[3, 0]])
    torch.testing.assert_close(copies, support_logits[[3, 0]], rtol=1e-9, atol=1e-10)
    # the query logits are differentiable in the adapted weights (the second-order meta-gradient through this
    # forward pass is checked against finite differences in test_maml.py)
    logits = forward_query(learner.net, adapted, frozen, task.support_images, task.query_images)
    assert logits.shape == (10, 5) and logits.requires_grad


@pytest.mark.parametrize(("dims", "shape"), [(2, (6, 3, 13, 14)), (3, (2, 3, 7, 6, 5))])
def test_conv_block_pools_before_its_relu_with_the_values_and_derivatives_of_relu_then_pool(dims, shape):
    """Max-pool and ReLU commute: the block's output, gradients and second derivatives equal those of the
    conv, norm, ReLU, pool order (odd sizes: ceil_mode's partial windows), exactly, in float64."""
    torch.manual_seed(0)
    block = conv_block(3, 4, spatial_dims=dims).double()
    assert [type(m).__name__ for m in block][2:] == [f"MaxPool{dims}d", "ReLU"]
    reference = nn.Sequential(block[0], block[1], nn.ReLU(), block[2])
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    a, b = block(x), reference(x)
    assert torch.equal(a, b)
    g = torch.randn_like(a)
    params = [x, *block.parameters()]
    ga = torch.autograd.grad((a * g).sum(), params, create_graph=True)
    gb = torch.autograd.grad((b * g).sum(), params, create_graph=True)
    assert all(torch.equal(u, v) for u, v in zip(ga, gb, strict=True))
    h = torch.randn_like(ga[0])
    sa = torch.autograd.grad((ga[0] * h).sum(), list(block.parameters()), allow_unused=True)
    sb = torch.autograd.grad((gb[0] * h).sum(), list(block.parameters()), allow_unused=True)
    assert all((u is None and v is None) or torch.equal(u, v) for u, v in zip(sa, sb, strict=True))
