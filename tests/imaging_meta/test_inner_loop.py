"""The functional inner loop: exact second-order meta-gradients, first-order behaviour, buffer safety."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from imaging_meta.learners.inner_loop import adapt, functional_forward, split_state


def tiny_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()


def task(seed=1):
    g = torch.Generator().manual_seed(seed)
    xs, xq = torch.randn(6, 3, generator=g, dtype=torch.float64), torch.randn(5, 3, generator=g, dtype=torch.float64)
    ys, yq = torch.randint(0, 2, (6,), generator=g), torch.randint(0, 2, (5,), generator=g)
    return xs, ys, xq, yq


def meta_loss(net, flat_params=None, first_order=False, steps=2, lr=0.3):
    params, frozen = split_state(net)
    if flat_params is not None:
        params = dict(zip(params, flat_params, strict=True))
    xs, ys, xq, yq = task()
    adapted = adapt(net, lambda p: F.cross_entropy(functional_forward(net, p, frozen, xs), ys), params, steps, lr, first_order)
    return F.cross_entropy(functional_forward(net, adapted, frozen, xq), yq), params


def test_second_order_meta_gradient_matches_finite_differences():
    net = tiny_net()
    loss, params = meta_loss(net)
    grads = torch.autograd.grad(loss, list(params.values()))
    eps = 1e-6
    g = torch.Generator().manual_seed(0)
    for (name, p), grad in zip(params.items(), grads, strict=True):
        for _ in range(3):
            i = tuple(int(torch.randint(s, (1,), generator=g)) for s in p.shape)
            values = [q.detach().clone() for q in params.values()]
            k = list(params).index(name)
            values[k][i] += eps
            lp, _ = meta_loss(net, [v.clone().requires_grad_() for v in values])
            values[k][i] -= 2 * eps
            lm, _ = meta_loss(net, [v.clone().requires_grad_() for v in values])
            fd = ((lp - lm) / (2 * eps)).item()
            assert grad[i].item() == pytest.approx(fd, rel=1e-6, abs=1e-10), (name, i)


def test_first_order_drops_the_second_order_terms():
    net = tiny_net()
    loss2, params = meta_loss(net)
    second = torch.autograd.grad(loss2, list(params.values()))
    loss1, params1 = meta_loss(net, first_order=True)
    first = torch.autograd.grad(loss1, list(params1.values()))
    # first-order MAML: the meta-gradient is the query gradient at the adapted parameters
    p, frozen = split_state(net)
    xs, ys, xq, yq = task()
    adapted = adapt(net, lambda q: F.cross_entropy(functional_forward(net, q, frozen, xs), ys), p, 2, 0.3, first_order=True)
    detached = {k: v.detach().requires_grad_() for k, v in adapted.items()}
    at_adapted = torch.autograd.grad(F.cross_entropy(functional_forward(net, detached, frozen, xq), yq), list(detached.values()))
    for a, b in zip(first, at_adapted, strict=True):
        assert torch.allclose(a, b, atol=1e-12)
    assert any(not torch.allclose(a, b, atol=1e-6) for a, b in zip(first, second, strict=True))


def test_batchnorm_running_stats_are_never_mutated():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 2)).train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    params, frozen = split_state(net)
    x, y = torch.randn(5, 1, 8, 8), torch.randint(0, 2, (5,))
    adapted = adapt(net, lambda p: F.cross_entropy(functional_forward(net, p, frozen, x), y), params, 3, 0.1)
    F.cross_entropy(functional_forward(net, adapted, frozen, x), y).backward()
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} changed"


def test_adapts_under_no_grad_and_names_the_inference_mode_fix():
    net = tiny_net()
    params, frozen = split_state(net)
    xs, ys, _, _ = task()

    def loss(p):
        return F.cross_entropy(functional_forward(net, p, frozen, xs), ys)

    with torch.no_grad():  # what validation does: the loop turns gradients back on
        adapted = adapt(net, loss, params, 5, 0.5)
        assert loss(adapted) < loss(params)
    with torch.inference_mode():
        with pytest.raises((RuntimeError, ValueError), match="inference_mode=False|inference tensors|Inference tensors"):
            adapt(net, lambda p: F.cross_entropy(functional_forward(net, p, frozen, xs.clone()), ys), params, 1, 0.5)


def test_anil_adapts_the_named_head_only_and_meta_sgd_learns_rates():
    net = tiny_net()
    params, frozen = split_state(net, names={"2.weight", "2.bias"})
    assert set(params) == {"2.weight", "2.bias"} and "0.weight" in frozen
    with pytest.raises(ValueError, match="no parameters named"):
        split_state(net, names={"head.weight"})
    lrs = {k: torch.full_like(v, 0.1, requires_grad=True) for k, v in params.items()}
    xs, ys, xq, yq = task()
    adapted = adapt(net, lambda p: F.cross_entropy(functional_forward(net, p, frozen, xs), ys), params, 1, lrs)
    F.cross_entropy(functional_forward(net, adapted, frozen, xq), yq).backward()
    assert all(v.grad is not None and v.grad.abs().sum() > 0 for v in lrs.values())
