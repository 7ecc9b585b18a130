"""Reptile: one SGD step on its surrogate loss is exactly the interpolation towards the adapted weights;
buffer safety, evaluation under no_grad, shapes, configs, and short fits that improve on held-out tasks."""

import copy
from pathlib import Path

import pytest
import torch
import yaml

from imaging_meta.learners import task_network
from imaging_meta.learners.base import build_learner
from imaging_meta.learners.gradient.reptile import Reptile
from imaging_meta.tasks import CLASSIFICATION
from tests.imaging_meta.fewshot import (
    TINY,
    TINY_UNET,
    TrackingBody,
    accuracy,
    classification_episode,
    dice,
    segmentation_episode,
    short_fit,
)

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "model"


def tiny(**kw):
    torch.manual_seed(0)
    return Reptile(**{"n_way": 3, "backbone_kwargs": TINY, "inner_steps": 3, "inner_lr": 0.3, **kw})


def tiny_episode(seed=0, dtype=torch.float32):
    ep = classification_episode(n_way=3, n_shot=2, n_query=2, tasks=3, size=8, seed=seed)
    ep.support_images, ep.query_images = ep.support_images.to(dtype), ep.query_images.to(dtype)
    return ep


def plain_sgd_adaptation(learner, task):
    """phi_t computed independently of the learner's code: a copy of the network, in-place torch SGD."""
    net = copy.deepcopy(learner.net)
    opt = torch.optim.SGD(net.parameters(), lr=learner.inner_lr)
    x = torch.cat([task.support_images, task.query_images])
    y = torch.cat([task.support_labels, task.query_labels])
    for _ in range(learner.inner_steps):
        opt.zero_grad()
        CLASSIFICATION.loss(net(x), y).backward()
        opt.step()
    return {n: p.detach() for n, p in net.named_parameters()}


def test_one_sgd_step_on_the_surrogate_is_the_reptile_interpolation():
    learner = tiny().double()
    ep = tiny_episode(dtype=torch.float64)
    theta = {n: p.detach().clone() for n, p in learner.net.named_parameters()}
    phis = [plain_sgd_adaptation(learner, task) for task in ep.tasks()]
    phi_bar = {n: torch.stack([phi[n] for phi in phis]).mean(0) for n in theta}
    assert all(not torch.allclose(phi_bar[n], theta[n]) for n in theta if "head" in n)  # the inner loop moved
    eps = 0.37
    opt = torch.optim.SGD(learner.parameters(), lr=eps)
    opt.zero_grad()
    loss = learner.loss(ep)
    expected_value = sum(0.5 * sum((theta[n] - phi[n]).pow(2).sum() for n in theta) for phi in phis) / len(phis)
    assert loss.item() == pytest.approx(expected_value.item(), rel=1e-9)
    loss.backward()
    opt.step()
    for n, p in learner.net.named_parameters():
        target = theta[n] + eps * (phi_bar[n] - theta[n])
        assert torch.allclose(p.detach(), target, rtol=0, atol=1e-6), n


def test_predict_adapts_on_the_support_only():
    learner = tiny().double()
    ep = tiny_episode(dtype=torch.float64)
    probs = learner.predict(ep)
    task = ep.task(0)
    net = copy.deepcopy(learner.net)
    opt = torch.optim.SGD(net.parameters(), lr=learner.inner_lr)
    for _ in range(learner.eval_inner_steps):
        opt.zero_grad()
        CLASSIFICATION.loss(net(task.support_images), task.support_labels).backward()
        opt.step()
    with torch.no_grad():
        expected = net(task.query_images).softmax(-1)
    assert learner.eval_inner_steps == 6 and torch.allclose(probs[0], expected, atol=1e-10)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_inner_loops_never_mutate_batchnorm_running_statistics(mode, monkeypatch):
    monkeypatch.setattr(task_network, "build_encoder", lambda *a, **k: TrackingBody())
    learner = getattr(tiny(), mode)()
    before = {k: v.clone() for k, v in learner.state_dict().items()}
    assert any("running_mean" in k for k in before)
    ep = tiny_episode()
    learner.loss(ep).backward()
    learner.predict(ep)
    with torch.no_grad():
        learner.predict(ep)
    for k, v in learner.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} changed"


def test_predict_adapts_under_no_grad_and_names_the_inference_mode_fix():
    learner = tiny().eval()
    ep = tiny_episode()
    free = learner.predict(ep)
    with torch.no_grad():
        guarded = learner.predict(ep)
    assert not free.requires_grad and torch.allclose(free, guarded, atol=1e-6)
    assert not torch.allclose(tiny(eval_inner_steps=0).predict(ep), guarded, atol=1e-3)
    with torch.inference_mode(), pytest.raises(RuntimeError, match="inference_mode=False|Inference tensors"):
        learner.predict(ep)


def test_shapes_args_and_config_round_trip():
    ep = classification_episode(n_way=3, n_shot=2, n_query=4, tasks=2, size=8)
    probs = tiny().predict(ep)
    assert probs.shape == (2, 12, 3) and torch.allclose(probs.sum(-1), torch.ones(2, 12))
    seg = tiny(task="segmentation", backbone="unet", backbone_kwargs=TINY_UNET, inner_steps=1)
    sep = segmentation_episode(n_shot=1, n_query=3, tasks=2, size=32)
    fg = seg.predict(sep)
    assert fg.shape == (2, 3, 32, 32) and (fg >= 0).all() and (fg <= 1).all() and torch.isfinite(seg.loss(sep))
    learner = tiny(eval_inner_steps=4)
    rebuilt = build_learner(learner.config)
    assert type(rebuilt) is Reptile and rebuilt.config == learner.config and rebuilt.eval_inner_steps == 4
    with pytest.raises(ValueError, match="inner_steps"):
        Reptile(inner_steps=0)
    with pytest.raises(ValueError, match="n_way=3"):
        tiny().loss(classification_episode(n_way=4, n_shot=1, n_query=1, tasks=1, size=8))


@pytest.mark.parametrize("name", ["reptile_cls", "reptile_seg"])
def test_model_configs_build_and_run_on_demo_shaped_episodes(name):
    config = yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())["model"]
    assert config["optimizer"]["class_path"] == "torch.optim.SGD"  # lr = epsilon: the exact Reptile step
    assert "weight_decay" not in config["optimizer"].get("init_args", {})
    args = {**config["learner"]["init_args"], "inner_steps": 1}  # one inner step keeps the test fast
    learner = build_learner({"class_path": config["learner"]["class_path"], "init_args": args})
    assert isinstance(learner, Reptile)
    if learner.task == "classification":
        assert learner.n_way == 5 and args["in_channels"] == 1  # n_way: set in the config or linked from the data
        ep = classification_episode(n_way=5, n_shot=1, n_query=1, tasks=1, size=32)
        assert learner.predict(ep).shape == (1, 5, 5)
    else:
        ep = segmentation_episode(n_shot=1, n_query=1, tasks=1, size=80)
        assert learner.predict(ep).shape == (1, 1, 80, 80)
    assert torch.isfinite(learner.loss(ep))


def test_short_fit_improves_held_out_accuracy():
    torch.manual_seed(0)
    learner = Reptile(n_way=5, backbone_kwargs={"width": 8}, inner_steps=3, inner_lr=0.3)
    held = classification_episode(n_way=5, n_shot=1, n_query=5, tasks=8, size=16, seed=7, class_offset=20)
    before = accuracy(learner, held)

    def make(seed):
        return classification_episode(n_way=5, n_shot=1, n_query=3, tasks=2, size=16, seed=seed)

    short_fit(learner, make, steps=25, lr=1e-2)  # Adam on the surrogate: "Reptile with Adam"
    after = accuracy(learner, held)
    assert after >= before + 0.1, (before, after)


def test_short_fit_improves_held_out_dice():
    torch.manual_seed(0)
    learner = Reptile(task="segmentation", backbone="unet", backbone_kwargs=TINY_UNET, inner_steps=2, inner_lr=0.1)
    held = segmentation_episode(n_shot=1, n_query=4, tasks=4, size=32, seed=99)
    before = dice(learner, held)

    def make(seed):
        return segmentation_episode(n_shot=1, n_query=2, tasks=2, size=32, seed=seed)

    short_fit(learner, make, steps=10, lr=1e-2)
    after = dice(learner, held)
    assert after >= before + 0.2, (before, after)
