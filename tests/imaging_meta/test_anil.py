"""ANIL encodes each task once and adapts the head on the features (issue 17): the same losses, meta-gradients
and predictions as the formulation before, MAML restricted to the head's parameters (float64), for second and
first order, classification and segmentation, the task-batching and checkpointing options; finite differences;
the body runs once per task; old checkpoints load."""

from dataclasses import replace

import pytest
import torch
from torch import nn

from imaging_meta.backbones import SupportBatchNorm2d, forward_with_support_statistics
from imaging_meta.learners import support_norms, task_network
from imaging_meta.learners.base import build_learner
from imaging_meta.learners.gradient import anil
from imaging_meta.learners.gradient.anil import ANIL
from imaging_meta.learners.gradient.maml import MAML
from imaging_meta.learners.task_network import forward_query
from tests.imaging_meta.fewshot import (
    TINY,
    TINY_UNET,
    TrackingBody,
    assert_gradients_match_finite_differences,
    classification_episode,
    loss_and_grads,
    segmentation_episode,
)


class HeadOnlyMAML(MAML):
    """The formulation before: MAML whose inner loop adapts the head's parameters only, and so runs the whole
    network at every inner step."""

    def adapted_names(self) -> set[str]:
        return self.net.head_names()


def build(cls, **kw):
    torch.manual_seed(0)
    args = {"n_way": 3, "backbone_kwargs": TINY, "inner_steps": 2, "inner_lr": 0.3, **kw}
    return cls(**args).double()


def twins(**kw):
    """(new ANIL, old formulation) with the same weights."""
    new, old = build(ANIL, **kw), build(HeadOnlyMAML, **kw)
    old.load_state_dict(new.state_dict())
    return new, old


def cls_episode(tasks=2, seed=0, spatial=2):
    ep = classification_episode(n_way=3, n_shot=2, n_query=2, tasks=tasks, size=8, seed=seed)
    if spatial == 3:
        g = torch.Generator().manual_seed(seed)
        return replace(ep, support_images=torch.randn(tasks, 6, 1, 4, 8, 8, generator=g, dtype=torch.float64),
                       query_images=torch.randn(tasks, 6, 1, 4, 8, 8, generator=g, dtype=torch.float64))
    return replace(ep, support_images=ep.support_images.double(), query_images=ep.query_images.double())


def seg_episode(tasks=2):
    ep = segmentation_episode(n_shot=2, n_query=2, tasks=tasks, size=32, seed=1)
    return replace(ep, **{k: getattr(ep, k).double() for k in ep.TENSOR_FIELDS})


def assert_equivalent(new, old, ep):
    (l_new, g_new), (l_old, g_old) = loss_and_grads(new, ep), loss_and_grads(old, ep)
    torch.testing.assert_close(l_new, l_old, rtol=1e-10, atol=0)
    assert g_new.keys() == g_old.keys()
    for n in g_old:
        torch.testing.assert_close(g_new[n], g_old[n], rtol=1e-8, atol=1e-12, msg=n)
    torch.testing.assert_close(new.predict(ep), old.predict(ep), rtol=1e-8, atol=1e-12)
    with torch.no_grad():  # validation: loss without a graph
        torch.testing.assert_close(new.loss(ep), old.loss(ep), rtol=1e-10, atol=0)
    return g_old


SEG = {"task": "segmentation", "backbone": "unet", "backbone_kwargs": TINY_UNET, "inner_lr": 0.1}
CASES = {
    "cls": {},
    "cls-first-order": {"first_order": True},
    "cls-transductive": {"backbone_kwargs": {**TINY, "transductive": True}},
    "cls-vmap": {"task_batching": "vmap"},
    "cls-vmap-first-order": {"task_batching": "vmap", "first_order": True},
    "cls-checkpoint": {"checkpoint_inner": True},
    "cls-3d": {"backbone_kwargs": {**TINY, "spatial_dims": 3}, "_spatial": 3},
    "seg": SEG,
    "seg-first-order": {**SEG, "first_order": True},
    "seg-vmap": {**SEG, "task_batching": "vmap"},
}


@pytest.mark.parametrize("case", list(CASES))
def test_same_loss_meta_gradients_and_predictions_as_maml_restricted_to_the_head(case):
    kw = dict(CASES[case])
    spatial = kw.pop("_spatial", 2)
    new, old = twins(**kw)
    ep = seg_episode() if kw.get("task") == "segmentation" else cls_episode(spatial=spatial)
    grads = assert_equivalent(new, old, ep)
    # not vacuous: the meta-gradient reaches the body and the head
    body = [g for n, g in grads.items() if n.startswith("net.body") and n.endswith("weight")]
    assert grads["net.head.weight"].abs().max() > 1e-6 and max(g.abs().max() for g in body) > 1e-6


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_same_as_before_with_running_statistics_and_they_are_never_mutated(mode, monkeypatch):
    monkeypatch.setattr(task_network, "build_encoder", lambda *a, **k: TrackingBody())
    new, old = twins()
    with torch.no_grad():  # statistics that are not the initial ones, so eval mode uses real values
        for m in (new, old):
            m.net.body.net[1].running_mean.fill_(0.1)
            m.net.body.net[1].running_var.fill_(2.0)
    getattr(new, mode)(), getattr(old, mode)()
    before = {k: v.clone() for k, v in new.state_dict().items()}
    assert_equivalent(new, old, cls_episode())
    for k, v in new.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} changed"


def test_second_order_terms_reach_the_body_through_the_heads_inner_gradients():
    second, first = build(ANIL), build(ANIL, first_order=True)
    ep = cls_episode()
    _, g2 = loss_and_grads(second, ep)
    _, g1 = loss_and_grads(first, ep)
    name = "net.body.backbone.layers.0.0.weight"
    assert not torch.allclose(g2[name], g1[name], rtol=1e-4, atol=1e-10)
    assert not torch.allclose(g2["net.head.weight"], g1["net.head.weight"], rtol=1e-4, atol=1e-10)


def test_meta_gradient_matches_finite_differences():
    learner = build(ANIL)
    ep = cls_episode()
    _, grads = loss_and_grads(learner, ep)
    assert_gradients_match_finite_differences(learner, ep, grads)


@pytest.mark.parametrize("task", ["classification", "segmentation"])
def test_the_body_runs_once_per_task_and_never_in_the_inner_loop(task):
    kw = SEG if task == "segmentation" else {}
    ep = seg_episode(tasks=3) if kw else cls_episode(tasks=3)
    # per task: one pass of the support and one of the queries (the old formulation: one per inner step, then
    # `forward_query`: the support and the queries with Conv-4's support statistics, the queries alone with the
    # U-Net's instance norm); 3 tasks, 3 inner steps in training, 5 in predict
    q = 1 if kw else 2
    for cls, expected in ((ANIL, (3 * 2, 3 * 2)), (HeadOnlyMAML, (3 * (3 + q), 3 * (5 + q)))):
        learner = build(cls, inner_steps=3, eval_inner_steps=5, **kw)
        calls = []
        learner.net.body.register_forward_hook(lambda *_, calls=calls: calls.append(1))
        learner.loss(ep).backward()
        n_loss = len(calls)
        learner.predict(ep)
        assert (n_loss, len(calls) - n_loss) == expected, cls.__name__


def test_adapt_task_keeps_its_contract():
    """``adapt_task`` still gives (adapted head, frozen state with the body's meta-parameters themselves), which
    `forward_query` turns into the same query logits as the fast path."""
    new, old = twins()
    task = cls_episode().task(0)
    adapted, frozen = new.adapt_task(task, 2, first_order=False)
    ref, _ = old.adapt_task(task, 2, first_order=False)
    assert set(adapted) == {"head.weight", "head.bias"}
    body = dict(new.net.named_parameters())
    assert all(frozen[n] is body[n] for n in body if n.startswith("body."))
    for n in adapted:
        torch.testing.assert_close(adapted[n], ref[n], rtol=1e-10, atol=1e-14)
    logits = forward_query(new.net, adapted, frozen, task.support_images, task.query_images)
    _, fq = new.encode(frozen, task.support_images, task.query_images)
    torch.testing.assert_close(new.head_logits(adapted, fq), logits, rtol=1e-10, atol=1e-12)


def test_state_dict_and_config_are_unchanged_so_old_checkpoints_load():
    new, old = twins(first_order=True, eval_inner_steps=3)
    assert list(new.state_dict()) == list(old.state_dict())  # the keys of every checkpoint written before
    rebuilt = build_learner(new.config)
    assert type(rebuilt) is ANIL and rebuilt.config == new.config
    assert new.config["init_args"] == old.config["init_args"]
    rebuilt.load_state_dict(old.state_dict())  # strict


# ------------------------------------------------------------------ the support-statistics encoding
class MixedBody(nn.Module):
    """A user's body: a support-statistics norm (affine or not) and a plain batch-statistics BatchNorm."""

    out_features = 4

    def __init__(self, affine=True, plain=True):
        super().__init__()
        second = nn.BatchNorm2d(4, track_running_stats=False) if plain else SupportBatchNorm2d(4, track_running_stats=False)
        self.net = nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1), SupportBatchNorm2d(4, affine=affine, track_running_stats=False), nn.ReLU(),
            nn.Conv2d(4, 4, 3, padding=1), second, nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )

    def forward(self, x):
        return self.net(x)


def test_encode_equals_one_pass_with_support_statistics():
    learner = build(ANIL, backbone_kwargs={"width": 4, "depth": 3})
    task = cls_episode().task(1)
    _, frozen = learner._split()
    fs, fq = learner.encode(frozen, task.support_images, task.query_images)
    es, eq = forward_with_support_statistics(learner.net.body, task.support_images, task.query_images)
    torch.testing.assert_close(fs, es, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fq, eq, rtol=1e-12, atol=1e-12)
    # the support features are those of the support alone, as in MAML's inner loop
    torch.testing.assert_close(fs, learner.net.body(task.support_images), rtol=0, atol=0)


@pytest.mark.parametrize("case", ["cls", "cls-first-order", "cls-vmap", "seg"])
def test_queries_encoded_in_chunks_give_the_same_losses_gradients_and_predictions(case, monkeypatch):
    """Each query is normalised with the support's statistics, so chunking the query pass changes nothing."""
    kw = dict(CASES[case])
    ep = seg_episode() if kw.get("task") == "segmentation" else cls_episode()
    whole = build(ANIL, **kw)
    (l_whole, g_whole), p_whole = loss_and_grads(whole, ep), whole.predict(ep)
    monkeypatch.setattr(support_norms, "QUERY_CHUNK_PIXELS", 1)  # one query per chunk
    chunked = build(ANIL, **kw)
    calls = []
    chunked.net.body.register_forward_hook(lambda *_: calls.append(1))
    (l_chunk, g_chunk), p_chunk = loss_and_grads(chunked, ep), chunked.predict(ep)
    torch.testing.assert_close(l_chunk, l_whole, rtol=1e-12, atol=0)
    for n in g_whole:
        torch.testing.assert_close(g_chunk[n], g_whole[n], rtol=1e-10, atol=1e-14, msg=n)
    torch.testing.assert_close(p_chunk, p_whole, rtol=1e-10, atol=1e-14)
    if kw.get("task_batching") != "vmap":  # not vacuous: Conv-4 encodes one query per call (the U-Net, whose
        # instance norm has no support statistics, runs its queries in one call)
        per_task = 1 + (1 if kw.get("task") == "segmentation" else ep.query_images.shape[1])
        assert len(calls) == 2 * ep.n_tasks * per_task  # loss and predict


def spy_fallback(monkeypatch) -> list:
    """Calls of the one-pass support-and-queries encoding inside ANIL (the fallback of `ANIL.encode`)."""
    calls = []

    def spy(*args, **kwargs):
        calls.append(1)
        return forward_with_support_statistics(*args, **kwargs)

    monkeypatch.setattr(anil, "forward_with_support_statistics", spy)
    return calls


@pytest.mark.parametrize("task_batching", ["loop", "vmap"])
def test_conv4_takes_the_two_pass_encoding(task_batching, monkeypatch):
    calls = spy_fallback(monkeypatch)
    learner = build(ANIL, task_batching=task_batching)
    learner.loss(cls_episode()).backward()
    learner.predict(cls_episode())
    assert calls == []


@pytest.mark.parametrize(("affine", "plain"), [(True, True), (False, False)], ids=["plain-batchnorm", "not-affine"])
def test_bodies_of_other_norms_fall_back_to_one_pass_and_stay_equal(affine, plain, monkeypatch):
    monkeypatch.setattr(task_network, "build_encoder", lambda *a, **k: MixedBody(affine, plain))
    calls = spy_fallback(monkeypatch)
    new, old = twins()
    assert_equivalent(new, old, cls_episode())
    assert calls  # the queries went through the support in one pass, as forward_query runs them


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_mixed_precision_autocast_matches_the_old_formulation(dtype):
    """gpu.yaml trains under bf16-mixed autocast: the two-pass encoding keeps its statistics in float32."""
    torch.manual_seed(0)
    new = ANIL(n_way=3, backbone_kwargs=TINY, inner_steps=2, inner_lr=0.3)
    old = HeadOnlyMAML(n_way=3, backbone_kwargs=TINY, inner_steps=2, inner_lr=0.3)
    old.load_state_dict(new.state_dict())
    ep = classification_episode(n_way=3, n_shot=2, n_query=2, tasks=2, size=16)
    grads = []
    for m in (new, old):
        m.zero_grad()
        with torch.autocast("cpu", dtype=dtype):
            loss = m.loss(ep)
        loss.backward()
        assert torch.isfinite(loss)
        grads.append({n: p.grad.clone() for n, p in m.named_parameters()})
    # a conv bias right before a batch norm has no gradient but rounding: not compared
    for n in (n for n in grads[1] if not (n.startswith("net.body") and n.endswith(".0.bias"))):
        torch.testing.assert_close(grads[0][n], grads[1][n], rtol=0.05, atol=0.05 * grads[1][n].abs().max().item(), msg=n)
    with torch.autocast("cpu", dtype=dtype):
        torch.testing.assert_close(new.predict(ep), old.predict(ep), rtol=0, atol=0.02)
