"""The functional inner loop shared by the MAML family (MAML, first-order MAML, ANIL, Meta-SGD) and Reptile.

The model's parameters are never modified in place: adaptation produces a new dict of tensors, and the
model is run on it with ``torch.func.functional_call``. Second-order MAML keeps the graph of every inner
step (``create_graph=True``), so the meta-gradient flows through the adaptation; first-order MAML drops it.

Buffers (BatchNorm running statistics) are cloned for every adaptation, so an inner loop never mutates the
model's buffers.

Finn, Abbeel, Levine. "Model-Agnostic Meta-Learning for Fast Adaptation of Deep Networks." ICML 2017.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import nn
from torch.func import functional_call

Params = dict[str, torch.Tensor]


def split_state(model: nn.Module, names: set[str] | None = None) -> tuple[Params, Params]:
    """The model's parameters to adapt (all trainable ones, or those named), and every other tensor of its state.

    Args:
        model: the network.
        names: parameter names to adapt (ANIL adapts the head only); default: every parameter that
            requires grad.

    Returns:
        (params, frozen): ``params`` are the live parameters (gradients reach them); ``frozen`` holds the
        other parameters and clones of the buffers.
    """
    params, frozen = {}, {}
    for n, p in model.named_parameters():
        if (names is None and p.requires_grad) or (names is not None and n in names):
            params[n] = p
        else:
            frozen[n] = p
    if names is not None and set(names) - set(params):
        raise ValueError(f"no parameters named {sorted(set(names) - set(params))} in {type(model).__name__}")
    for n, b in model.named_buffers():
        frozen[n] = b.clone()
    return params, frozen


def functional_forward(model: nn.Module, params: Mapping[str, torch.Tensor], frozen: Mapping[str, torch.Tensor], *args, **kwargs):
    """Run ``model`` with ``params`` and ``frozen`` tensors in place of its own state."""
    return functional_call(model, {**frozen, **params}, args, kwargs, strict=True)


def adapt(
    model: nn.Module,
    loss_fn: Callable[[Params], torch.Tensor],
    params: Params,
    steps: int,
    lr: float | Mapping[str, torch.Tensor],
    first_order: bool = False,
) -> Params:
    """Gradient steps on the support loss, functionally.

    Args:
        model: the network (only used for error messages; ``loss_fn`` runs it).
        loss_fn: support loss of a parameter dict, e.g. ``lambda p: F.cross_entropy(functional_forward(model, p, frozen, x), y)``.
        params: starting parameters (the meta-parameters).
        steps: inner steps (>= 0).
        lr: inner learning rate, a float or one tensor per parameter (Meta-SGD learns these).
        first_order: drop second-order terms (first-order MAML): inner gradients are not differentiated.

    Returns:
        The adapted parameters; with ``first_order=False`` they are differentiable functions of ``params``
        (and of ``lr`` when it is a tensor dict).
    """
    if steps < 0:
        raise ValueError(f"inner steps must be >= 0, got {steps}")
    with torch.enable_grad():  # validation and test run under no_grad; the inner loop needs gradients
        for _ in range(steps):
            loss = loss_fn(params)
            if not loss.requires_grad:
                raise RuntimeError(
                    f"the inner loss of {type(model).__name__} has no gradient: under Lightning set "
                    "Trainer(inference_mode=False) so that validation and test can adapt"
                )
            grads = torch.autograd.grad(loss, list(params.values()), create_graph=not first_order, allow_unused=True)
            new = {}
            for (name, p), g in zip(params.items(), grads, strict=True):
                if g is None:
                    new[name] = p
                    continue
                step_lr = lr[name] if isinstance(lr, Mapping) else lr
                new[name] = p - step_lr * (g.detach() if first_order else g)
            params = new
    return params
