"""On a CPU, Conv-4 weights are kept channels-last (faster oneDNN kernels), except in learners that differentiate
them twice (MAML's family); the values, gradients and checkpoints do not change with the layout."""

from dataclasses import replace

import pytest
import torch

from imaging_meta.checkpoint_io import load_learner
from imaging_meta.learners.base import keep_channels_last_on_cpu
from imaging_meta.learners.descriptors.task_adaptive import TaskAdaptiveClassifier
from imaging_meta.learners.gradient.anil import ANIL
from imaging_meta.learners.gradient.maml import MAML
from imaging_meta.learners.gradient.meta_sgd import MetaSGD
from imaging_meta.learners.metric.protonet import PrototypicalNetwork
from imaging_meta.learners.metric.protonet_seg import PrototypicalSegmenter
from tests.imaging_meta.fewshot import TINY, classification_episode, loss_and_grads

CONV4 = {"width": 4, "depth": 2}


def conv_weights(learner) -> list[torch.Tensor]:
    return [p for p in learner.parameters() if p.dim() == 4]


def channels_last(learner) -> bool:
    weights = conv_weights(learner)
    assert weights
    # the strides, not `is_contiguous`: with one input channel a weight is "contiguous" in both layouts, but only
    # channels-last strides (C stride 1) make PyTorch pick the channels-last kernels for the first convolution
    flags = {p.stride() == torch.empty_like(p, memory_format=torch.channels_last).stride() for p in weights}
    assert len(flags) == 1, "some weights converted, others not"
    return flags.pop()


def test_conv4_learners_are_converted_on_a_cpu_only_and_maml_family_never():
    proto = PrototypicalNetwork(backbone_kwargs=CONV4)
    assert not channels_last(proto)
    assert keep_channels_last_on_cpu(proto, "cuda") == 0 and not channels_last(proto)  # not measured there
    assert keep_channels_last_on_cpu(proto, torch.device("cpu")) == 1 and channels_last(proto)
    assert keep_channels_last_on_cpu(ANIL(n_way=3, backbone_kwargs=TINY), "cpu") == 1
    for cls in (MAML, MetaSGD):
        maml = cls(n_way=3, backbone_kwargs=TINY)
        assert keep_channels_last_on_cpu(maml, "cpu") == 0 and not channels_last(maml)
    # a wrapper follows what it wraps
    assert keep_channels_last_on_cpu(TaskAdaptiveClassifier(PrototypicalNetwork(backbone_kwargs=CONV4)), "cpu") == 1
    wrapped_maml = TaskAdaptiveClassifier(MAML(n_way=3, backbone_kwargs=TINY))
    assert keep_channels_last_on_cpu(wrapped_maml, "cpu") == 0 and not channels_last(wrapped_maml)
    # the U-Net does not ask (measured level or slower)
    seg = PrototypicalSegmenter(backbone="unet", backbone_kwargs={"out_channels": 4, "features": [4, 4, 8, 8, 16, 4]})
    assert keep_channels_last_on_cpu(seg, "cpu") == 0 and not channels_last(seg)


@pytest.mark.parametrize("cls", [PrototypicalNetwork, ANIL])
def test_the_layout_changes_no_loss_gradient_or_prediction(cls):
    torch.manual_seed(0)
    kwargs = {"backbone_kwargs": CONV4} if cls is PrototypicalNetwork else {"n_way": 3, "backbone_kwargs": TINY,
                                                                           "inner_steps": 2, "inner_lr": 0.3}
    plain = cls(**kwargs).double()
    last = cls(**kwargs).double()
    last.load_state_dict(plain.state_dict())
    assert keep_channels_last_on_cpu(last, "cpu") == 1 and channels_last(last)
    ep = classification_episode(n_way=3, n_shot=2, n_query=2, tasks=2, size=16, seed=1)
    ep = replace(ep, support_images=ep.support_images.double(), query_images=ep.query_images.double())
    loss_a, grads_a = loss_and_grads(plain, ep)
    loss_b, grads_b = loss_and_grads(last, ep)  # second order for ANIL: through the head's inner gradients
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-12, atol=1e-12)
    for name, g in grads_a.items():
        torch.testing.assert_close(grads_b[name], g, rtol=1e-10, atol=1e-12, msg=name)
    plain.eval(), last.eval()
    with torch.enable_grad():
        torch.testing.assert_close(last.predict(ep), plain.predict(ep), rtol=1e-10, atol=1e-12)


def test_a_checkpoint_written_from_channels_last_weights_loads_with_the_same_values(tmp_path):
    proto = PrototypicalNetwork(backbone_kwargs=CONV4)
    reference = {k: v.clone().contiguous() for k, v in proto.state_dict().items()}
    keep_channels_last_on_cpu(proto, "cpu")
    path = tmp_path / "weights.pt"
    torch.save(proto.state_dict(), path)
    fresh = PrototypicalNetwork(backbone_kwargs=CONV4)
    fresh.load_state_dict(torch.load(path, weights_only=True))
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, reference[k]), k


def test_load_learner_keeps_channels_last_on_a_cpu(legacy_checkpoints):
    learner, _ = load_learner(legacy_checkpoints["protonet_cls"], "cpu")
    assert channels_last(learner)


@pytest.mark.parametrize("cls", [MAML, MetaSGD])
def test_maml_query_pass_in_channels_last_changes_no_loss_gradient_or_prediction(cls, monkeypatch):
    """MAML's query pass (differentiated once) runs channels-last on a CPU; its inner steps keep the default
    layout. Second-order meta-gradients in float64 equal those of the default-layout query pass."""
    import imaging_meta.learners.gradient.maml as maml_module

    torch.manual_seed(0)
    kwargs = {"n_way": 3, "backbone_kwargs": TINY, "inner_steps": 2, "inner_lr": 0.3}
    learner = cls(**kwargs).double()
    ep = classification_episode(n_way=3, n_shot=2, n_query=2, tasks=2, size=16, seed=1)
    ep = replace(ep, support_images=ep.support_images.double(), query_images=ep.query_images.double())
    assert maml_module.query_in_channels_last(learner.net, ep.query_images)
    loss_a, grads_a = loss_and_grads(learner, ep)
    with torch.enable_grad():
        probs_a = learner.predict(ep)
    monkeypatch.setattr(maml_module, "query_in_channels_last", lambda net, images: False)
    loss_b, grads_b = loss_and_grads(learner, ep)
    with torch.enable_grad():
        probs_b = learner.predict(ep)
    torch.testing.assert_close(loss_a, loss_b, rtol=1e-12, atol=1e-12)
    for name, g in grads_b.items():
        assert g.abs().sum() > 0, name  # the meta-gradient reaches every parameter
        torch.testing.assert_close(grads_a[name], g, rtol=1e-10, atol=1e-12, msg=name)
    torch.testing.assert_close(probs_a, probs_b, rtol=1e-10, atol=1e-12)
    assert not maml_module.query_in_channels_last(learner.net, ep.query_images.to("meta"))  # CPU only
