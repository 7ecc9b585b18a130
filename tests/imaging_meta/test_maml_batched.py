"""The MAML family's two ways of adapting a meta-batch (a Python loop over tasks, or ``torch.func.vmap``) and
second-order inner-step checkpointing: equal meta-gradients (float64), equal predictions, segmentation with the
U-Net, buffer safety, the error messages, and the config round trip of the new arguments."""

import copy
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from imaging_meta.learners import inner_loop, task_network
from imaging_meta.learners.base import build_learner
from imaging_meta.learners.gradient.anil import ANIL
from imaging_meta.learners.gradient.maml import MAML
from imaging_meta.learners.gradient.meta_sgd import MetaSGD
from imaging_meta.learners.inner_loop import (
    DecomposedNorms,
    adapt,
    adapt_functional,
    functional_forward,
    split_state,
)
from tests.imaging_meta.fewshot import (
    TINY,
    TINY_UNET,
    TrackingBody,
    classification_episode,
    loss_and_grads,
    segmentation_episode,
    tiny_maml,
)

VARIANTS = [(MAML, {}), (MAML, {"first_order": True}), (ANIL, {}), (MetaSGD, {}), (MetaSGD, {"first_order": True})]
IDS = ["maml", "fomaml", "anil", "metasgd", "fo-metasgd"]


def tiny(cls=MAML, **kw):
    return tiny_maml(cls, **kw).double()


def episode64(tasks=3, seed=0):
    ep = classification_episode(n_way=3, n_shot=2, n_query=2, tasks=tasks, size=8, seed=seed)
    return replace(ep, support_images=ep.support_images.double(), query_images=ep.query_images.double())


def seg_episode64(tasks=2):
    ep = segmentation_episode(n_shot=1, n_query=1, tasks=tasks, size=32)
    return replace(ep, **{k: getattr(ep, k).double() for k in ep.TENSOR_FIELDS})


def assert_same_gradients(a, b):
    (la, ga), (lb, gb) = a, b
    torch.testing.assert_close(lb, la, rtol=1e-10, atol=0)
    assert ga.keys() == gb.keys()
    for n in ga:  # ~1e-8 relative; atol only for coordinates whose gradient is zero up to rounding
        torch.testing.assert_close(gb[n], ga[n], rtol=1e-8, atol=1e-12, msg=n)


def twins(cls, kw, build=tiny, **other):
    """The same learner (same weights) with task_batching='loop' and 'vmap'."""
    loop = build(cls, **kw, **other)
    batched = build(cls, **kw, **other, task_batching="vmap")
    batched.load_state_dict(loop.state_dict())
    return loop, batched


# ---------------------------------------------------------------------------------- loop == vmap
@pytest.mark.parametrize(("cls", "kw"), VARIANTS, ids=IDS)
def test_vmap_gives_the_loops_loss_and_meta_gradients(cls, kw):
    loop, batched = twins(cls, kw)
    ep = episode64()
    reference = loss_and_grads(loop, ep)
    assert_same_gradients(reference, loss_and_grads(batched, ep))
    grads = reference[1]
    assert grads["net.head.weight"].abs().max() > 1e-4 and grads["net.body.backbone.layers.0.0.weight"].abs().max() > 1e-4
    if cls is MetaSGD:  # the learned rates get (equal) meta-gradients
        assert grads["inner_lrs.head__weight"].abs().max() > 1e-6
        assert grads["inner_lrs.body__backbone__layers__0__0__weight"].abs().max() > 1e-8


def test_vmap_second_order_really_is_second_order():
    # against first order: the second-order terms are present (and equal to the loop's, above)
    _, second = loss_and_grads(tiny(task_batching="vmap"), episode64())
    _, first = loss_and_grads(tiny(first_order=True, task_batching="vmap"), episode64())
    assert not torch.allclose(second["net.head.weight"], first["net.head.weight"], rtol=1e-4, atol=1e-8)


@pytest.mark.parametrize(("cls", "kw"), VARIANTS[:1] + VARIANTS[2:4], ids=["maml", "anil", "metasgd"])
def test_vmap_gives_the_loops_predictions_with_and_without_no_grad(cls, kw):
    loop, batched = twins(cls, kw)
    ep = episode64()
    expected = loop.predict(ep)
    with torch.no_grad():  # validation: the inner loop turns gradients on by itself
        guarded = batched.predict(ep)
    free = batched.predict(ep)
    assert not guarded.requires_grad and not free.requires_grad and guarded.shape == (3, 6, 3)
    torch.testing.assert_close(guarded, expected, rtol=1e-8, atol=1e-12)
    torch.testing.assert_close(free, expected, rtol=1e-8, atol=1e-12)
    with torch.no_grad():  # the validation loss too
        torch.testing.assert_close(batched.loss(ep), loop.loss(ep), rtol=1e-10, atol=0)
    assert batched.predict(ep.task(1)).shape == (1, 6, 3)  # an unbatched episode


def test_vmap_names_the_inference_mode_fix():
    learner = tiny(task_batching="vmap")
    ep = episode64()
    with torch.inference_mode(), pytest.raises((RuntimeError, ValueError), match="inference_mode=False"):
        learner.predict(ep)


@pytest.mark.parametrize(("cls", "kw"), [(MAML, {}), (MAML, {"first_order": True}), (ANIL, {})], ids=["maml", "fomaml", "anil"])
def test_vmap_segmentation_with_the_instance_norm_unet(cls, kw):
    def build(cls, **kw):
        torch.manual_seed(0)
        return cls(task="segmentation", backbone="unet", backbone_kwargs=TINY_UNET, inner_steps=1, inner_lr=0.1, **kw).double()

    loop, batched = twins(cls, kw, build=build)
    ep = seg_episode64()
    assert_same_gradients(loss_and_grads(loop, ep), loss_and_grads(batched, ep))
    torch.testing.assert_close(batched.predict(ep), loop.predict(ep), rtol=1e-8, atol=1e-12)


def test_vmap_volumes_with_a_3d_conv4():
    loop, batched = twins(MAML, {}, backbone_kwargs={**TINY, "spatial_dims": 3}, inner_steps=1)
    g = torch.Generator().manual_seed(0)
    ep = replace(
        episode64(tasks=2),
        support_images=torch.randn(2, 6, 1, 4, 8, 8, generator=g, dtype=torch.float64),
        query_images=torch.randn(2, 6, 1, 4, 8, 8, generator=g, dtype=torch.float64),
    )
    assert_same_gradients(loss_and_grads(loop, ep), loss_and_grads(batched, ep))


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_vmap_with_running_statistics_matches_the_loop_and_never_mutates_them(mode, monkeypatch):
    monkeypatch.setattr(task_network, "build_encoder", lambda *a, **k: TrackingBody())
    loop, batched = twins(MAML, {})
    ep = episode64()
    with torch.no_grad():  # statistics that are not the initial ones, so eval mode uses real values
        for m in (loop, batched):
            m.net.body.net[1].running_mean.fill_(0.1)
            m.net.body.net[1].running_var.fill_(2.0)
    getattr(loop, mode)(), getattr(batched, mode)()
    before = copy.deepcopy(batched.state_dict())
    assert_same_gradients(loss_and_grads(loop, ep), loss_and_grads(batched, ep))
    torch.testing.assert_close(batched.predict(ep), loop.predict(ep), rtol=1e-8, atol=1e-12)
    for k, v in batched.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} changed"


# -------------------------------------------------------------------------- the functional pieces
def test_adapt_functional_matches_adapt_including_learned_rates():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Tanh(), nn.Linear(4, 2)).double()
    g = torch.Generator().manual_seed(1)
    xs, xq = torch.randn(6, 3, generator=g, dtype=torch.float64), torch.randn(5, 3, generator=g, dtype=torch.float64)
    ys, yq = torch.randint(0, 2, (6,), generator=g), torch.randint(0, 2, (5,), generator=g)
    params, frozen = split_state(net)
    lrs = {k: torch.full_like(v, 0.2, requires_grad=True) for k, v in params.items()}

    def support(p):
        return F.cross_entropy(functional_forward(net, p, frozen, xs), ys)

    results = []
    for inner in (adapt, adapt_functional):
        adapted = inner(net, support, params, 2, lrs)
        query = F.cross_entropy(functional_forward(net, adapted, frozen, xq), yq)
        results.append(torch.autograd.grad(query, [*params.values(), *lrs.values()]))
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-14)
    with pytest.raises(ValueError, match=">= 0"):
        adapt_functional(net, support, params, -1, 0.1)


@pytest.mark.parametrize("norm", ["batch", "instance", "layer"])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_decomposed_norms_equal_the_fused_kernels_and_update_statistics_alike(norm, mode):
    torch.manual_seed(0)
    module = {
        "batch": nn.BatchNorm2d(3),
        "instance": nn.InstanceNorm2d(3, affine=True, track_running_stats=True),
        "layer": nn.LayerNorm([5, 5]),
    }[norm].double()
    with torch.no_grad():
        for p in module.parameters():
            p.normal_()
    getattr(module, mode)()
    twin = copy.deepcopy(module)
    x = 2 * torch.randn(4, 3, 5, 5, dtype=torch.float64) + 1
    expected = module(x)
    with DecomposedNorms():
        got = twin(x)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    for (k, a), b in zip(module.state_dict().items(), twin.state_dict().values(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12, msg=k)


# ----------------------------------------------------------------------- second-order checkpointing
@pytest.mark.parametrize(("cls", "kw"), VARIANTS, ids=IDS)
def test_checkpoint_inner_gives_the_same_meta_gradients(cls, kw):
    plain = tiny(cls, **kw)
    checkpointed = tiny(cls, **kw, checkpoint_inner=True)
    checkpointed.load_state_dict(plain.state_dict())
    ep = episode64(tasks=2)
    assert_same_gradients(loss_and_grads(plain, ep), loss_and_grads(checkpointed, ep))
    torch.testing.assert_close(checkpointed.predict(ep), plain.predict(ep), rtol=1e-10, atol=1e-14)


def test_checkpoint_inner_segmentation_unet_second_order():
    def build(**kw):
        torch.manual_seed(0)
        return MAML(task="segmentation", backbone="unet", backbone_kwargs=TINY_UNET, inner_steps=2, inner_lr=0.1, **kw).double()

    plain, checkpointed = build(), build(checkpoint_inner=True)
    ep = seg_episode64(tasks=1)
    assert_same_gradients(loss_and_grads(plain, ep), loss_and_grads(checkpointed, ep))


def test_checkpoint_inner_recomputes_second_order_steps_during_backward(monkeypatch):
    """It composes with create_graph: every second-order step is checkpointed and recomputed in backward,
    and the meta-gradient keeps its second-order terms; first order and predict do not checkpoint."""
    calls = []
    original = inner_loop.activation_checkpoint

    def spy(fn, *args, **kwargs):
        calls.append(kwargs)
        return original(fn, *args, **kwargs)

    monkeypatch.setattr(inner_loop, "activation_checkpoint", spy)
    learner = tiny(checkpoint_inner=True, meta_backward="once")  # the backward a per-task `loss` takes inside
    forwards = []
    learner.net.register_forward_hook(lambda *_: forwards.append(torch.is_grad_enabled()))
    ep = episode64(tasks=2)
    loss = learner.loss(ep)
    assert len(calls) == 2 * 2 and all(kw == {"use_reentrant": False} for kw in calls)  # tasks x inner steps
    n_forward = len(forwards)
    loss.backward()
    assert len(forwards) - n_forward == 2 * 2  # each step's support forward was recomputed in backward
    second = {n: p.grad.clone() for n, p in learner.named_parameters()}
    _, first = loss_and_grads(tiny(first_order=True), ep)
    assert not torch.allclose(second["net.head.weight"], first["net.head.weight"], rtol=1e-4, atol=1e-8)
    calls.clear()
    tiny(first_order=True, checkpoint_inner=True).loss(ep).backward()
    learner.predict(ep)
    assert calls == []


def test_checkpoint_inner_with_a_backward_per_task_recomputes_inside_loss():
    """By default `loss` differentiates each task as soon as it is built: the checkpointed steps are recomputed
    there, task by task, and the final backward only hands the gradients over."""
    def forwards(meta_backward):
        learner = tiny(checkpoint_inner=True, meta_backward=meta_backward)
        calls = []
        learner.net.register_forward_hook(lambda *_: calls.append(1))
        loss = learner.loss(ep)
        in_loss = len(calls)
        loss.backward()
        return in_loss, len(calls) - in_loss

    ep = episode64(tasks=2)
    once_loss, once_backward = forwards("once")
    assert once_backward == 2 * 2  # tasks x inner steps, recomputed
    assert forwards("per_task") == (once_loss + once_backward, 0)
    assert_same_gradients(loss_and_grads(tiny(meta_backward="once"), ep), loss_and_grads(tiny(checkpoint_inner=True), ep))


def test_checkpoint_inner_saves_memory_that_grows_with_inner_steps():
    """Tensors the autograd graph keeps after the forward pass: without checkpointing they grow with the
    inner steps (activations of every step); with it, only each step's parameters are kept."""

    def kept_bytes(**kw):
        learner = tiny(inner_steps=4, meta_backward="once", **kw)  # the graph `loss` returns
        kept = {}  # storage address -> bytes; the graph keeps every saved tensor alive, so addresses are unique

        def pack(t):
            kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = learner.loss(episode64(tasks=1))
        del loss
        return sum(kept.values())

    assert kept_bytes(checkpoint_inner=True) < 0.5 * kept_bytes()


# --------------------------------------------------------------------------------- options, configs
def test_bad_options_name_the_fix():
    with pytest.raises(ValueError, match="task_batching must be one of \\('loop', 'vmap'\\), got 'vectorised'"):
        MAML(task_batching="vectorised")
    with pytest.raises(ValueError, match="checkpoint_inner=True needs task_batching='loop'"):
        MetaSGD(task_batching="vmap", checkpoint_inner=True)


@pytest.mark.parametrize("cls", [MAML, ANIL, MetaSGD])
@pytest.mark.parametrize("kw", [{"task_batching": "vmap"}, {"checkpoint_inner": True}], ids=["vmap", "checkpoint"])
def test_config_round_trip_keeps_the_new_arguments(cls, kw):
    learner = tiny(cls, **kw)
    assert {"task_batching", "checkpoint_inner"} <= set(learner.config["init_args"])
    rebuilt = build_learner(learner.config)
    assert type(rebuilt) is cls and rebuilt.config == learner.config
    assert rebuilt.task_batching == kw.get("task_batching", "loop")
    assert rebuilt.checkpoint_inner == kw.get("checkpoint_inner", False)
    default = cls()
    assert default.task_batching == "loop" and default.checkpoint_inner is False
