"""MAML, first-order MAML, ANIL and Meta-SGD: exact meta-gradients, what each variant adapts, buffer safety,
evaluation under no_grad, shapes, and short fits that improve on held-out tasks."""

from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml

from imaging_meta.learners import task_network
from imaging_meta.learners.base import build_learner
from imaging_meta.learners.gradient.anil import ANIL
from imaging_meta.learners.gradient.maml import MAML
from imaging_meta.learners.gradient.meta_sgd import MetaSGD
from imaging_meta.learners.task_network import forward_query
from imaging_meta.tasks import CLASSIFICATION
from tests.imaging_meta.fewshot import (
    TINY,
    TINY_UNET,
    TrackingBody,
    accuracy,
    assert_gradients_match_finite_differences,
    classification_episode,
    dice,
    segmentation_episode,
    short_fit,
)
from tests.imaging_meta.fewshot import tiny_maml as tiny

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "model"


def tiny_episode(seed=0, dtype=torch.float32):
    ep = classification_episode(n_way=3, n_shot=2, n_query=2, tasks=2, size=8, seed=seed)
    ep.support_images, ep.query_images = ep.support_images.to(dtype), ep.query_images.to(dtype)
    return ep


def meta_gradient(learner, ep):
    learner.zero_grad()
    learner.loss(ep).backward()
    return {n: p.grad.clone() for n, p in learner.named_parameters()}


# ------------------------------------------------------------------------------------- meta-gradients
def test_second_order_meta_gradient_matches_finite_differences():
    learner = tiny().double()
    ep = tiny_episode(dtype=torch.float64)
    assert_gradients_match_finite_differences(learner, ep, meta_gradient(learner, ep))


def test_first_order_drops_second_order_terms_and_is_the_query_gradient_at_adapted_weights():
    second = tiny().double()
    first = tiny(first_order=True).double()
    first.load_state_dict(second.state_dict())
    ep = tiny_episode(dtype=torch.float64)
    g2, g1 = meta_gradient(second, ep), meta_gradient(first, ep)
    # FOMAML: the mean over tasks of the query gradient at the (detached) adapted weights
    expected = {n: torch.zeros_like(p) for n, p in first.named_parameters()}
    for task in ep.tasks():
        adapted, frozen = first.adapt_task(task, first.inner_steps, first_order=True)
        at = {n: v.detach().requires_grad_() for n, v in adapted.items()}
        # the query is normalised with the support's statistics at the adapted weights (test_non_transductive.py)
        logits = forward_query(first.net, at, frozen, task.support_images, task.query_images)
        loss = CLASSIFICATION.loss(logits, task.query_labels)
        for n, gr in zip(at, torch.autograd.grad(loss, list(at.values())), strict=True):
            expected["net." + n] += gr / ep.n_tasks
    for n in g1:
        assert torch.allclose(g1[n], expected[n], rtol=0, atol=1e-12), n
    differs = [n for n in g1 if not torch.allclose(g1[n], g2[n], rtol=1e-4, atol=1e-8)]
    assert "net.head.weight" in differs and any(n.startswith("net.body") for n in differs)


def test_anil_adapts_only_the_head_but_meta_trains_the_body():
    learner = tiny(ANIL)
    ep = tiny_episode()
    adapted, frozen = learner.adapt_task(ep.task(0), learner.inner_steps, first_order=False)
    assert set(adapted) == learner.net.head_names() == {"head.weight", "head.bias"}
    for n, p in learner.net.named_parameters():
        if n.startswith("body."):
            assert frozen[n] is p  # the body enters every inner step at its meta-value, unadapted
        else:
            assert not torch.equal(adapted[n], p)  # the head did move
    grads = meta_gradient(learner, ep)
    body = [g for n, g in grads.items() if n.startswith("net.body") and "weight" in n]
    assert body and all(g.abs().sum() > 0 for g in body)


def test_meta_sgd_learns_a_rate_per_parameter():
    learner = tiny(MetaSGD)
    rates = dict(learner.inner_lrs.items())
    assert set(rates) == {n.replace(".", "__") for n, _ in learner.net.named_parameters()}
    for n, p in learner.net.named_parameters():
        r = rates[n.replace(".", "__")]
        assert r.shape == p.shape and torch.all(r == 0.3)
    before = {k: v.detach().clone() for k, v in rates.items()}
    grads = meta_gradient(learner, tiny_episode())
    # (a conv bias right before a batch-statistics BatchNorm has no effect, so its rate's gradient is ~0)
    live = {k for k in rates if grads["inner_lrs." + k].abs().max() > 1e-6}
    assert {"head__weight", "head__bias"} <= live and sum("weight" in k for k in live) == 5
    torch.optim.SGD(learner.parameters(), lr=0.1).step()
    assert all(not torch.equal(rates[k].detach(), before[k]) for k in live)


def test_meta_sgd_rates_are_used_in_the_inner_step():
    learner = tiny(MetaSGD, inner_steps=1)
    with torch.no_grad():
        for r in learner.inner_lrs.values():
            r.zero_()
    task = tiny_episode().task(0)
    adapted, _ = learner.adapt_task(task, 1, first_order=False)
    params = dict(learner.net.named_parameters())
    assert all(torch.equal(adapted[n], params[n]) for n in params)  # zero rates: no step at all


# ------------------------------------------------------------------------------ safety in evaluation
@pytest.mark.parametrize("cls", [MAML, ANIL, MetaSGD])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_inner_loops_never_mutate_batchnorm_running_statistics(cls, mode, monkeypatch):
    monkeypatch.setattr(task_network, "build_encoder", lambda *a, **k: TrackingBody())
    learner = tiny(cls)
    assert isinstance(learner.net.body, TrackingBody)
    getattr(learner, mode)()
    before = {k: v.clone() for k, v in learner.state_dict().items()}
    assert any("running_mean" in k for k in before)
    ep = tiny_episode()
    learner.loss(ep).backward()
    learner.predict(ep)
    with torch.no_grad():
        learner.predict(ep)
    for k, v in learner.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} changed"


@pytest.mark.parametrize("cls", [MAML, ANIL, MetaSGD])
def test_predict_adapts_under_no_grad_and_names_the_inference_mode_fix(cls):
    learner = tiny(cls).eval()
    ep = tiny_episode()
    free = learner.predict(ep)
    with torch.no_grad():
        guarded = learner.predict(ep)
    assert not free.requires_grad and not guarded.requires_grad
    assert torch.allclose(free, guarded, atol=1e-6)
    unadapted = tiny(cls, eval_inner_steps=0).predict(ep)
    assert not torch.allclose(unadapted, guarded, atol=1e-3)  # adaptation did something
    with torch.inference_mode(), pytest.raises((RuntimeError, ValueError), match="inference_mode=False|Inference tensors"):
        learner.predict(ep)


# ------------------------------------------------------------------------------------ shapes and args
@pytest.mark.parametrize("cls", [MAML, ANIL, MetaSGD])
def test_shapes_for_classification_segmentation_and_3d_patches(cls):
    ep = classification_episode(n_way=3, n_shot=2, n_query=4, tasks=2, size=8)
    probs = tiny(cls).predict(ep)
    assert probs.shape == (2, 12, 3) and torch.allclose(probs.sum(-1), torch.ones(2, 12))
    seg = tiny(cls, task="segmentation", backbone="unet", backbone_kwargs=TINY_UNET, inner_steps=1)
    sep = segmentation_episode(n_shot=1, n_query=3, tasks=2, size=32)
    fg = seg.predict(sep)
    assert fg.shape == (2, 3, 32, 32) and (fg >= 0).all() and (fg <= 1).all()
    assert torch.isfinite(seg.loss(sep))
    with pytest.raises(ValueError, match=r"'conv4' backbone shrinks the image \d+x: set backbone: unet"):
        tiny(cls, task="segmentation")  # its logits were 1/16 the mask's size: an internal error in the loss (a review)
    vol = tiny(cls, backbone_kwargs={**TINY, "spatial_dims": 3}, inner_steps=1)
    g = torch.Generator().manual_seed(0)
    ep3 = replace(ep, support_images=torch.randn(2, 6, 1, 4, 8, 8, generator=g), query_images=torch.randn(2, 12, 1, 4, 8, 8, generator=g))
    assert vol.predict(ep3).shape == (2, 12, 3) and torch.isfinite(vol.loss(ep3))


def test_predict_of_an_unbatched_episode_and_label_checks():
    learner = tiny()
    ep = tiny_episode()
    assert learner.predict(ep.task(1)).shape == (1, 6, 3)
    big = classification_episode(n_way=4, n_shot=1, n_query=1, tasks=1, size=8)
    with pytest.raises(ValueError, match="n_way=3"):
        learner.loss(big)
    with pytest.raises(ValueError, match="inner_lr"):
        MAML(inner_lr=0.0)
    with pytest.raises(ValueError, match="task must be"):
        MAML(task="detection")


@pytest.mark.parametrize("cls", [MAML, ANIL, MetaSGD])
def test_config_rebuilds_the_learner_with_its_arguments(cls):
    learner = tiny(cls, first_order=True, eval_inner_steps=3)
    rebuilt = build_learner(learner.config)
    assert type(rebuilt) is cls and rebuilt.config == learner.config
    assert rebuilt.first_order and rebuilt.eval_inner_steps == 3 and rebuilt.inner_lr == 0.3
    rebuilt.load_state_dict(learner.state_dict())
    assert MAML(inner_steps=4).eval_inner_steps == 8  # the paper's test-time default


@pytest.mark.parametrize("name", ["maml_cls", "fomaml_cls", "anil_cls", "metasgd_cls", "maml_seg"])
def test_model_configs_build_and_run_on_demo_shaped_episodes(name):
    config = yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())["model"]
    args = dict(config["learner"]["init_args"])
    learner = build_learner({"class_path": config["learner"]["class_path"], "init_args": args})
    assert isinstance(learner, MAML) and learner.inner_steps >= 1
    assert config["optimizer"]["class_path"].startswith("torch.optim.")
    # one tiny forward of the demo shapes, with one inner step, so the test stays fast
    small = build_learner({"class_path": config["learner"]["class_path"], "init_args": {**args, "inner_steps": 1}})
    if learner.task == "classification":
        assert learner.n_way == 5 and args["in_channels"] == 1  # n_way: set in the config or linked from the data
        ep = classification_episode(n_way=5, n_shot=1, n_query=1, tasks=1, size=32)
        assert small.predict(ep).shape == (1, 5, 5)
    else:
        ep = segmentation_episode(n_shot=1, n_query=1, tasks=1, size=80)
        assert small.predict(ep).shape == (1, 1, 80, 80)
    assert torch.isfinite(small.loss(ep))


# ---------------------------------------------------------------------------------------- short fits
def held_out_classification():
    return classification_episode(n_way=5, n_shot=1, n_query=5, tasks=8, size=16, seed=7, class_offset=20)


@pytest.mark.parametrize(
    ("cls", "kw"), [(MAML, {}), (MAML, {"first_order": True}), (ANIL, {}), (MetaSGD, {})], ids=["maml", "fomaml", "anil", "metasgd"]
)
def test_short_fit_improves_held_out_accuracy(cls, kw):
    torch.manual_seed(0)
    learner = cls(n_way=5, backbone_kwargs={"width": 8}, inner_steps=3, inner_lr=0.3, **kw)
    held = held_out_classification()
    before = accuracy(learner, held)

    def make(seed):
        return classification_episode(n_way=5, n_shot=1, n_query=3, tasks=2, size=16, seed=seed)

    # 40 steps: at 25 the gain of Meta-SGD and MAML was +0.08 and +0.11 on one CPU (its rounding), too near the
    # threshold; at 40 it was +0.19 and +0.18 there
    short_fit(learner, make, steps=40, lr=3e-3)
    after = accuracy(learner, held)
    assert after >= before + 0.1, (before, after)


@pytest.mark.parametrize(("cls", "kw"), [(MAML, {"first_order": True}), (ANIL, {}), (MetaSGD, {})], ids=["fomaml", "anil", "metasgd"])
def test_short_fit_improves_held_out_dice(cls, kw):
    torch.manual_seed(0)
    learner = cls(task="segmentation", backbone="unet", backbone_kwargs=TINY_UNET, inner_steps=1, inner_lr=0.1, **kw)
    held = segmentation_episode(n_shot=1, n_query=4, tasks=4, size=32, seed=99)
    before = dice(learner, held)

    def make(seed):
        return segmentation_episode(n_shot=1, n_query=2, tasks=2, size=32, seed=seed)

    short_fit(learner, make, steps=10, lr=1e-2)
    after = dice(learner, held)
    assert after >= before + 0.2, (before, after)
