"""Reptile: one SGD step on its surrogate loss is exactly the interpolation towards the adapted weights; the
inner loop adapts on support-sized minibatches of one task in training as in test; buffer safety, evaluation
under no_grad, shapes, configs, and short fits that improve on held-out tasks."""

import copy
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from imaging_meta.backbones import forward_with_support_statistics
from imaging_meta.learners import task_network
from imaging_meta.learners.base import build_learner
from imaging_meta.learners.gradient.reptile import Reptile, minibatch_indices
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


def plain_sgd_adaptation(learner, task, with_query=False):
    """phi_t computed independently of the learner's code: a copy of the network, in-place full-batch torch SGD
    on the support set (and the query set)."""
    net = copy.deepcopy(learner.net)
    opt = torch.optim.SGD(net.parameters(), lr=learner.inner_lr)
    x, y = task.support_images, task.support_labels
    if with_query:
        x, y = torch.cat([x, task.query_images]), torch.cat([y, task.query_labels])
    for _ in range(learner.inner_steps):
        opt.zero_grad()
        CLASSIFICATION.loss(net(x), y).backward()
        opt.step()
    return {n: p.detach() for n, p in net.named_parameters()}


@pytest.mark.parametrize("train_on_query", [False, True])
def test_one_sgd_step_on_the_surrogate_is_the_reptile_interpolation(train_on_query):
    # with the query, a batch of the whole pool (12 items): full-batch steps, as plain_sgd_adaptation takes
    learner = tiny(train_on_query=train_on_query, inner_batch_size=12 if train_on_query else None).double()
    ep = tiny_episode(dtype=torch.float64)
    theta = {n: p.detach().clone() for n, p in learner.net.named_parameters()}
    phis = [plain_sgd_adaptation(learner, task, with_query=train_on_query) for task in ep.tasks()]
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
    with torch.no_grad():  # queries normalised with the support's statistics (test_non_transductive.py)
        expected = forward_with_support_statistics(net, task.support_images, task.query_images)[1].softmax(-1)
    assert learner.eval_inner_steps == learner.inner_steps == 3 and torch.allclose(probs[0], expected, atol=1e-10)


class RecordingBody(nn.Module):
    """A body that records, for every forward pass, the tag of each image (its constant pixel value)."""

    out_features = 4

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.pool = nn.Sequential(nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.seen: list[list[int]] = []

    def forward(self, x):
        self.seen.append([int(v) for v in x.detach()[:, 0, 0, 0].round()])
        return self.pool(self.conv(x))


def tagged_episode():
    """3-way 2-shot, 2 queries per class, 2 tasks; every image is constant: task t's support item i is
    100 t + i, its query item i is 100 t + 50 + i."""
    ep = classification_episode(n_way=3, n_shot=2, n_query=2, tasks=2, size=8)
    for t in range(ep.n_tasks):
        for i in range(ep.support_images.shape[1]):
            ep.support_images[t, i] = 100 * t + i
        for i in range(ep.query_images.shape[1]):
            ep.query_images[t, i] = 100 * t + 50 + i
    return ep


def recording(monkeypatch, **kw):
    monkeypatch.setattr(task_network, "build_encoder", lambda *a, **k: RecordingBody())
    return tiny(inner_lr=1e-4, **kw)


SUPPORT = [set(range(6)), set(range(100, 106))]  # the support tags of the two tasks of `tagged_episode`


@pytest.mark.parametrize("batch", [None, 2, 4])
def test_meta_training_adapts_on_support_sized_minibatches_of_one_task(monkeypatch, batch):
    """The paper's inner loop: SGD on minibatches of one task's training examples, here its support set (the
    set a test task adapts on), never its query set; full batch by default."""
    learner = recording(monkeypatch, inner_batch_size=batch)
    learner.loss(tagged_episode())
    seen = learner.net.body.seen
    size = batch or 6
    assert len(seen) == 2 * learner.inner_steps and all(len(b) == size for b in seen), seen
    per_task = [seen[: learner.inner_steps], seen[learner.inner_steps :]]
    for pool, batches in zip(SUPPORT, per_task, strict=True):
        assert all(set(b) <= pool for b in batches), batches  # support of one task only: no query, no other task
        flat = [i for b in batches for i in b]
        assert all(sorted(flat[k : k + 6]) == sorted(pool) for k in range(0, len(flat) - 5, 6))  # epochs of the pool


@pytest.mark.parametrize("batch", [None, 4])
def test_test_adaptation_sees_the_batches_training_sees(monkeypatch, batch):
    learner = recording(monkeypatch, inner_batch_size=batch)
    ep = tagged_episode()
    learner.loss(ep)
    trained = learner.net.body.seen[:]
    learner.net.body.seen.clear()
    learner.predict(ep)
    tested = learner.net.body.seen
    queries = [b for b in tested if min(b) % 100 >= 50]
    adapting = [b for b in tested if b not in queries]
    assert [len(b) for b in adapting] == [len(b) for b in trained] and len(queries) == 2
    for pool, batches in zip(SUPPORT, [adapting[:3], adapting[3:]], strict=True):
        assert all(set(b) <= pool for b in batches)


def test_train_on_query_widens_the_pool_but_keeps_support_sized_batches(monkeypatch):
    """The paper's larger meta-training pool per task ("train shots"), as an option."""
    learner = recording(monkeypatch, train_on_query=True)
    learner.loss(tagged_episode())
    seen = learner.net.body.seen
    pools = [p | {i + 50 for i in p} for p in SUPPORT]
    assert all(len(b) == 6 for b in seen)
    assert all(set(b) <= pools[0] for b in seen[:3]) and all(set(b) <= pools[1] for b in seen[3:])
    assert {i for b in seen for i in b} & {50, 150}  # some query item was used


def test_minibatch_indices_follow_the_papers_stream():
    assert torch.equal(minibatch_indices(5, 5, 3), torch.arange(5).repeat(3, 1))  # full batch: no shuffling
    g = torch.Generator().manual_seed(0)
    for n, batch, steps in [(6, 4, 3), (2, 5, 2), (7, 3, 5)]:
        idx = minibatch_indices(n, batch, steps, g)
        assert idx.shape == (steps, batch)
        flat = idx.flatten().tolist()
        for k in range(0, len(flat) - n + 1, n):  # consecutive reshuffles of all n examples
            assert sorted(flat[k : k + n]) == list(range(n))
    assert minibatch_indices(6, 4, 0).shape == (0, 4)
    with pytest.raises(ValueError, match="inner_batch_size"):
        Reptile(inner_batch_size=0)


def test_minibatch_predictions_are_deterministic_and_per_task():
    learner = tiny(inner_batch_size=2)
    ep = tiny_episode()
    probs = learner.predict(ep)
    assert torch.equal(probs, learner.predict(ep))
    assert torch.allclose(learner.predict(ep.task(1)), probs[1:2], atol=1e-6)  # independent of its place in a batch
    assert not torch.allclose(probs, tiny().predict(ep), atol=1e-4)  # minibatches are not the full batch


def test_minibatch_predictions_do_not_depend_on_the_order_the_support_is_listed_in():
    # predict draws its minibatches in the support's content order, not in its listed order (a review found
    # 0.38 of probability moved by reversing a support with inner_batch_size=2)
    learner = tiny(inner_batch_size=2)
    ep = tiny_episode().task(0)
    probs = learner.predict(ep)
    n = ep.support_images.shape[0]
    for perm in (torch.arange(n).flip(0), torch.randperm(n, generator=torch.Generator().manual_seed(3))):
        listed = replace(ep, support_images=ep.support_images[perm], support_labels=ep.support_labels[perm])
        torch.testing.assert_close(learner.predict(listed), probs, rtol=0, atol=1e-6)  # rounding of batch sums


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
    with torch.inference_mode(), pytest.raises((RuntimeError, ValueError), match="inference_mode=False|Inference tensors"):
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
    assert isinstance(learner, Reptile) and not learner.train_on_query  # meta-train on the support set, as test adapts
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

    short_fit(learner, make, steps=25, lr=1e-2)  # Adam on the surrogate: an outer Adam step
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
