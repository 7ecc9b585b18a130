"""Tensors a learner makes while it predicts follow its inputs' device.

No GPU runs here, so the test moves the *default* device instead: the inputs and modules stay on the CPU while
``torch.device("meta")`` is the default, and a tensor made without ``device=`` lands on the meta device, where
mixing it with the inputs raises. On a GPU host that tensor would sit on the CPU beside CUDA inputs and raise
there: the task-adaptive weighting (``classify``'s default) and the fine-tuning head's class weights did
(a review, 2026-12-06).
"""

from __future__ import annotations

import pytest
import torch

from imaging_meta.learners.descriptors.task_adaptive import TaskAdaptiveClassifier
from imaging_meta.learners.descriptors.weighting import fit_weights, loo_distances
from imaging_meta.learners.metric.protonet import PrototypicalNetwork
from imaging_meta.learners.transfer.support_finetune import SupportFineTune
from tests.imaging_meta.fewshot import classification_episode


def tiny_protonet() -> PrototypicalNetwork:
    torch.manual_seed(0)
    return PrototypicalNetwork(backbone="conv4", backbone_kwargs={"width": 4, "depth": 2}).eval()


def elsewhere(fn):
    """``fn()`` with the meta device as the default device (the inputs stay where they are)."""
    with torch.device("meta"):
        return fn()


def test_the_weighting_fit_makes_its_parameters_on_the_distances_device():
    torch.manual_seed(0)
    labels = torch.tensor([[0, 0, 1, 1], [0, 1, 0, 1]])
    loo, usable = zip(*(loo_distances(torch.randn(2, 4, 5), labels, 2) for _ in range(3)), strict=True)
    here = fit_weights(loo, labels, usable[0])
    there = elsewhere(lambda: fit_weights(loo, labels, usable[0]))
    assert there.device == here.device
    torch.testing.assert_close(there, here)


@pytest.mark.parametrize("n_shot", [1, 2])
def test_task_adaptive_predict_keeps_to_the_inputs_device(n_shot):
    learner = TaskAdaptiveClassifier(tiny_protonet()).eval()
    ep = classification_episode(n_way=3, n_shot=n_shot, n_query=2, tasks=2, size=16, seed=0)
    with torch.no_grad():
        here = learner.predict(ep)
        there = elsewhere(lambda: learner.predict(ep))
    torch.testing.assert_close(there, here)


def test_fine_tuning_class_weights_follow_the_labels_device():
    ft = SupportFineTune(tiny_protonet(), steps=2, lr=0.1)
    labels = torch.tensor([0, 0, 0, 1, 2])
    here = ft.class_weights(labels, 4)
    there = elsewhere(lambda: ft.class_weights(labels, 4))
    torch.testing.assert_close(there, here)
    assert here.tolist() == pytest.approx([5 / 9, 5 / 3, 5 / 3, 0.0])


def test_fine_tuning_predict_keeps_to_the_inputs_device():
    ft = SupportFineTune(tiny_protonet(), steps=2, lr=0.1).eval()
    ep = classification_episode(n_way=3, n_shot=2, n_query=2, tasks=1, size=16, seed=0)
    with torch.no_grad():
        here = ft.predict(ep)
        there = elsewhere(lambda: ft.predict(ep))
    torch.testing.assert_close(there, here)
