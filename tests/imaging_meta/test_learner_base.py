"""Learners record the arguments they were built with, so checkpoints rebuild them without pickled code."""

import pytest

from imaging_meta.learners.base import build_learner
from imaging_meta.learners.gradient.maml import MAML


class NoInit(MAML):
    """A subclass without an __init__ of its own."""


def test_a_subclass_without_init_records_its_parents_arguments_under_its_own_path():
    learner = NoInit(n_way=3, inner_steps=2)
    cfg = learner.config
    assert cfg["class_path"].endswith(".NoInit")
    assert cfg["init_args"]["n_way"] == 3 and cfg["init_args"]["inner_steps"] == 2


def test_build_learner_round_trip_and_refuses_foreign_classes():
    learner = MAML(n_way=4, backbone_kwargs={"width": 8})
    again = build_learner(learner.config)
    assert type(again) is MAML and again.config == learner.config
    with pytest.raises(ValueError, match="imaging_meta.learners"):
        build_learner({"class_path": "os.system", "init_args": {}})


def test_a_plain_batchnorm_in_a_registered_backbone_uses_batch_statistics_in_eval_too(monkeypatch):
    """A review: MAML's inner loops run on copies of the buffers, so a plain ``nn.BatchNorm2d`` of a backbone a user
    registered kept running statistics of 0 and 1, and eval answers differed from training's by up to 0.70, without
    a word (only the project's SupportBatchNorm2d switched to support statistics in eval). Such a layer now becomes
    a SupportBatchNorm2d (same state dict) that ignores them; a batch norm that cannot is refused, naming it."""
    import torch
    from torch import nn

    import imaging_meta.backbones as backbones
    from tests.imaging_meta.fewshot import segmentation_episode

    def body(norm):
        def build(in_channels=1, **_):
            net = nn.Sequential(nn.Conv2d(in_channels, 4, 3, padding=1), norm(4), nn.ReLU())
            net.out_channels = 4
            return net
        return build

    monkeypatch.setitem(backbones._REGISTRY, "plainbn", body(nn.BatchNorm2d))
    torch.manual_seed(0)
    learner = MAML(n_way=3, backbone="plainbn", task="segmentation", inner_steps=1)
    norm = learner.net.body[1]
    assert isinstance(norm, backbones.SupportBatchNorm2d) and norm.ignore_running_statistics
    assert "body.1.running_mean" in dict(learner.net.named_buffers())  # the same state dict as before
    ep = segmentation_episode(n_shot=1, n_query=2, tasks=1, size=16)
    ep = type(ep)(**{**ep.__dict__, "support_images": ep.support_images * 5 + 3, "query_images": ep.query_images * 5 + 3})
    with torch.no_grad():
        trained = learner.train().predict(ep)
        tested = learner.eval().predict(ep)
    assert torch.allclose(trained, tested, atol=1e-6)  # 0.70 apart before
    monkeypatch.setitem(backbones._REGISTRY, "bn1d", body(nn.BatchNorm1d))  # a vector norm: built as before
    assert type(MAML(n_way=3, backbone="bn1d", task="segmentation").net.body[1]) is nn.BatchNorm1d
    monkeypatch.setitem(backbones._REGISTRY, "syncbn", body(nn.SyncBatchNorm))
    with pytest.raises(ValueError, match=r"layer 1 is a SyncBatchNorm that keeps running statistics: .*SupportBatchNorm2d"):
        MAML(n_way=3, backbone="syncbn", task="segmentation")
