"""The two-pass normalisation with the support's statistics (`imaging_meta.learners.support_norms`) and its use in
`task_network.forward_query`: the same values and derivatives as the one-pass form, chunked or not."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from imaging_meta.backbones import forward_with_support_statistics
from imaging_meta.learners import support_norms, task_network
from imaging_meta.learners.gradient.maml import MAML
from imaging_meta.learners.gradient.meta_lstm import MetaLSTM
from imaging_meta.learners.gradient.reptile import Reptile
from imaging_meta.learners.inner_loop import split_state
from tests.imaging_meta.fewshot import TINY, classification_episode, loss_and_grads, tiny_maml


def episode(tasks=2, n_query=3):
    ep = classification_episode(n_way=3, n_shot=2, n_query=n_query, tasks=tasks, size=8, seed=3)
    return replace(ep, support_images=ep.support_images.double(), query_images=ep.query_images.double())


def test_query_chunk_splits_evenly_on_a_cpu_and_not_elsewhere():
    assert support_norms.query_chunk(torch.zeros(25, 1, 84, 84)) == 9  # 3 chunks: 9, 9, 7
    assert support_norms.query_chunk(torch.zeros(25, 1, 28, 28)) == 25  # small images: one pass
    assert support_norms.query_chunk(torch.zeros(3, 1, 512, 512)) == 1
    assert support_norms.query_chunk(torch.zeros(25, 1, 84, 84, device="meta")) == 25  # accelerators: one pass
    assert support_norms.query_chunk(torch.zeros(0, 1, 84, 84)) == 1  # no queries (support-only embedding)
    learner = tiny_maml().double().train()
    fs, fq = support_norms.forward_in_two_passes(learner.net, support_norms.module_norm_layers(learner.net),
                                                 torch.randn(4, 1, 8, 8, dtype=torch.float64),
                                                 torch.zeros(0, 1, 8, 8, dtype=torch.float64))
    assert fs.shape == (4, 3) and fq is not None and fq.shape == (0, 3)


@pytest.mark.parametrize("chunk_pixels", [support_norms.QUERY_CHUNK_PIXELS, 1], ids=["one-chunk", "one-query-per-chunk"])
def test_forward_query_two_passes_equal_one_pass_with_first_and_second_derivatives(chunk_pixels, monkeypatch):
    monkeypatch.setattr(support_norms, "QUERY_CHUNK_PIXELS", chunk_pixels)
    learner = tiny_maml().double().train()
    task = episode().task(0)
    params, frozen = split_state(learner.net, learner.adapted_names())
    outs, firsts, seconds = [], [], []
    for two_pass in (True, False):
        out = task_network.forward_query(learner.net, params, frozen, task.support_images, task.query_images, two_pass)
        loss = (out.sin() * torch.arange(out.numel(), dtype=out.dtype).view_as(out)).sum()
        g = torch.autograd.grad(loss, list(params.values()), create_graph=True)
        gg = torch.autograd.grad(sum((x * x).sum() for x in g), list(params.values()))
        outs.append(out.detach())
        firsts.append([x.detach() for x in g])
        seconds.append(gg)
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-12, atol=1e-12)
    for a, b in zip(firsts[0], firsts[1], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    scale = max(float(x.abs().max()) for x in seconds[1])  # some entries are zero analytically: rounding there
    for a, b in zip(seconds[0], seconds[1], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12 * scale)
    assert scale > 1e-3
    # not vacuous: the support statistics matter (queries alone, with their own statistics, differ)
    alone = task_network.functional_forward(learner.net, params, frozen, task.query_images)
    assert (alone - outs[0]).abs().max() > 1e-3


@pytest.mark.parametrize("cls", [MAML, Reptile, MetaLSTM], ids=lambda c: c.__name__)
def test_learners_give_the_same_losses_gradients_and_predictions_in_one_or_two_passes(cls, monkeypatch):
    """The learners that call forward_query in a loop, with the two-pass form (chunked to one query) and with
    the one-pass form forced."""
    ep = episode()
    if cls is MAML:
        make = lambda: tiny_maml().double()  # noqa: E731
    elif cls is Reptile:
        make = lambda: tiny_maml(Reptile).double()  # noqa: E731
    else:
        def make():
            torch.manual_seed(0)
            return MetaLSTM(n_way=3, backbone_kwargs=TINY).double()
    monkeypatch.setattr(support_norms, "QUERY_CHUNK_PIXELS", 1)
    two = make()
    results = [(loss_and_grads(two, ep) if cls is not Reptile else (None, None), two.predict(ep))]
    one_pass = task_network.forward_query

    def forced(*args, **kwargs):
        return one_pass(*args, **{**kwargs, "two_pass": False})

    for module in ("imaging_meta.learners.gradient.maml", "imaging_meta.learners.gradient.reptile",
                   "imaging_meta.learners.gradient.meta_lstm"):
        monkeypatch.setattr(f"{module}.forward_query", forced)
    one = make()
    results.append((loss_and_grads(one, ep) if cls is not Reptile else (None, None), one.predict(ep)))
    (lg_two, p_two), (lg_one, p_one) = results
    torch.testing.assert_close(p_two, p_one, rtol=1e-10, atol=1e-12)
    if lg_two[0] is not None:
        torch.testing.assert_close(lg_two[0], lg_one[0], rtol=1e-12, atol=0)
        for n in lg_one[1]:
            torch.testing.assert_close(lg_two[1][n], lg_one[1][n], rtol=1e-8, atol=1e-12, msg=n)


def test_an_unknown_batch_statistics_norm_falls_back_to_one_pass():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 3, 3), torch.nn.BatchNorm2d(3, track_running_stats=False)).double()
    support, query = torch.randn(4, 1, 6, 6, dtype=torch.float64), torch.randn(5, 1, 6, 6, dtype=torch.float64)
    fs, fq = support_norms.forward_in_two_passes(net, {}, support, query)
    assert fq is None  # the caller runs the queries in one pass
    torch.testing.assert_close(fs, net(support))
    one_pass = forward_with_support_statistics(net, support, query)
    for layers in ({}, {id(torch.zeros(1)): "not this net's"}):  # nothing known, or a layer the support never meets
        for a, b in zip(support_norms.forward_with_known_norms(net, layers, support, query), one_pass, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("chunk_pixels", [support_norms.QUERY_CHUNK_PIXELS, 1], ids=["one-chunk", "one-query-per-chunk"])
def test_embed_tasks_two_passes_equal_one_pass_for_a_metric_learner(chunk_pixels, monkeypatch):
    """ProtoNet embeds through `embed_tasks` (its own encoder, its own parameters): the same embeddings, loss and
    gradients as the one-pass form."""
    from imaging_meta.learners import base
    from imaging_meta.learners.metric.protonet import PrototypicalNetwork

    monkeypatch.setattr(support_norms, "QUERY_CHUNK_PIXELS", chunk_pixels)
    ep = episode()
    torch.manual_seed(0)
    learner = PrototypicalNetwork(backbone_kwargs=TINY).double().train()
    layers = support_norms.module_norm_layers(learner)
    assert len(layers) == TINY["depth"]  # every Conv-4 block's norm is known: the two-pass form runs
    two = (learner.embed_episode(ep), loss_and_grads(learner, ep))
    monkeypatch.setattr(base, "module_norm_layers", lambda module: {})  # the one-pass form
    one = (learner.embed_episode(ep), loss_and_grads(learner, ep))
    for a, b in zip(two[0], one[0], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(two[1][0], one[1][0], rtol=1e-12, atol=0)
    for n in one[1][1]:
        torch.testing.assert_close(two[1][1][n], one[1][1][n], rtol=1e-9, atol=1e-12, msg=n)


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("bias", [True, False])
def test_a_conv_block_folds_a_fixed_norm_into_its_convolution(dims, bias):
    """`folded_norms`: conv(x, w * scale, b * scale + shift), then pool and ReLU, equals the block with its norm
    replaced by ``x * scale + shift``, values and gradients (scale and shift included); a norm the lookup does not
    know runs as usual."""
    from imaging_meta.backbones import conv_block, folded_norms

    torch.manual_seed(0)
    block = conv_block(2, 3, spatial_dims=dims).double()
    if not bias:
        block[0].bias = None
    x = torch.randn((4, 2) + (6,) * dims, dtype=torch.float64)
    scale = torch.rand(3, dtype=torch.float64, requires_grad=True)
    shift = torch.randn(3, dtype=torch.float64, requires_grad=True)
    shape = (1, -1) + (1,) * dims
    with folded_norms(lambda norm: (scale, shift) if norm is block[1] else None):
        folded = block(x)
    reference = block[0](x) * scale.view(shape) + shift.view(shape)
    for layer in list(block)[2:]:
        reference = layer(reference)
    torch.testing.assert_close(folded, reference, rtol=1e-12, atol=1e-12)
    weights = torch.randn_like(folded)
    inputs = [scale, shift, *block.parameters()]
    for a, b in zip(torch.autograd.grad((folded * weights).sum(), inputs, allow_unused=True),
                    torch.autograd.grad((reference * weights).sum(), inputs, allow_unused=True), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    with folded_norms(lambda norm: None):  # unknown: the norm itself runs, with the batch's statistics
        torch.testing.assert_close(block(x), torch.nn.Sequential(*block)(x), rtol=0, atol=0)


def test_the_query_pass_of_a_conv4_runs_no_norm_layer():
    """Every Conv-4 block folds its support-statistics norm into the convolution for the queries: the query pass
    calls no batch norm at all (the support pass calls one per block), and gives the one-pass form's values."""
    from torch.overrides import TorchFunctionMode

    class CountNorms(TorchFunctionMode):
        calls = 0

        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func is torch.nn.functional.batch_norm:
                CountNorms.calls += 1
            return func(*args, **(kwargs or {}))

    torch.manual_seed(0)
    net = tiny_maml().double().train().net
    layers = support_norms.module_norm_layers(net)
    support, query = torch.randn(4, 1, 8, 8, dtype=torch.float64), torch.randn(5, 1, 8, 8, dtype=torch.float64)
    with CountNorms():
        fs, fq = support_norms.forward_in_two_passes(net, layers, support, query)
    assert CountNorms.calls == TINY["depth"] == len(layers)  # the support pass only
    one_pass = forward_with_support_statistics(net, support, query)
    torch.testing.assert_close(fq, one_pass[1], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fs, one_pass[0], rtol=1e-12, atol=1e-12)


def test_folding_leaves_nested_passes_and_hooked_layers_alone():
    """A two-pass or one-pass forward nested inside a query pass gets its own statistics (the outer pass's
    folding does not reach it), and a block whose convolution or norm has a hook runs both layers, so the hook
    sees the queries too."""
    torch.manual_seed(0)
    net = tiny_maml().double().train().net
    layers = support_norms.module_norm_layers(net)
    support, query = torch.randn(4, 1, 8, 8, dtype=torch.float64), torch.randn(5, 1, 8, 8, dtype=torch.float64)
    other_support, other_query = torch.randn(3, 1, 8, 8, dtype=torch.float64), torch.randn(2, 1, 8, 8, dtype=torch.float64)
    inner = {}

    def nested(x):
        if x.shape[0] == query.shape[0]:  # the outer query pass embeds another task on the way
            inner["two"] = support_norms.forward_in_two_passes(net, layers, other_support, other_query)
            inner["one"] = forward_with_support_statistics(net, other_support, other_query)
            inner["alone"] = forward_with_support_statistics(net, other_support, other_query[:0])[0]  # the norms' own kernels
        return net(x)

    fs, fq = support_norms.forward_in_two_passes(nested, layers, support, query)
    for got, want in zip((fs, fq, *inner["two"], *inner["one"]),
                         (*forward_with_support_statistics(net, support, query),
                          *forward_with_support_statistics(net, other_support, other_query),
                          *forward_with_support_statistics(net, other_support, other_query)), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(inner["alone"], net(other_support), rtol=1e-12, atol=1e-12)

    seen = []
    conv = next(m for m in net.modules() if isinstance(m, torch.nn.Conv2d))
    handle = conv.register_forward_hook(lambda module, args, out: seen.append(out.shape[0]))
    try:
        _, fq_hooked = support_norms.forward_in_two_passes(net, layers, support, query)
    finally:
        handle.remove()
    assert seen == [support.shape[0], query.shape[0]]
    torch.testing.assert_close(fq_hooked, fq, rtol=1e-12, atol=1e-12)
