"""The functional inner loop shared by the MAML family (MAML, first-order MAML, ANIL, Meta-SGD) and Reptile.

The model's parameters are never modified in place: adaptation produces a new dict of tensors, and the
model is run on it with ``torch.func.functional_call``. Second-order MAML keeps the graph of every inner
step (``create_graph=True``), so the meta-gradient flows through the adaptation; first-order MAML drops it.

Buffers (BatchNorm running statistics) are cloned for every adaptation, so an inner loop never mutates the
model's buffers.

Two variants of the same steps:

* `adapt` uses ``torch.autograd.grad`` on one task at a time; in second order it can checkpoint each inner
  step (``checkpoint=True``): memory grows more slowly with the number of steps, and each step is computed
  again during ``backward``.
* `adapt_functional` uses ``torch.func.grad``, so a whole meta-batch of tasks can be adapted at once under
  ``torch.func.vmap`` (what ``MAML(task_batching="vmap")`` does). ``torch.func`` transforms do not support
  saved-tensor hooks, so it cannot checkpoint.

Under ``vmap``, PyTorch's fused batch, instance and layer normalisation with affine parameters give wrong
second-order meta-gradients (compared in float64 against the loop, the errors are far above rounding;
non-affine normalisation and group norm are exact; likely the batching rule of their backward,
pytorch/functorch#534). `DecomposedNorms` computes these three from elementary tensor operations,
which are exact at every order; vmapped second-order inner loops run under it.

Finn, Abbeel, Levine. "Model-Agnostic Meta-Learning for Fast Adaptation of Deep Networks." ICML 2017.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.func import grad as func_grad
from torch.overrides import TorchFunctionMode
from torch.utils.checkpoint import checkpoint as activation_checkpoint

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


def _no_gradient_error(model: nn.Module) -> RuntimeError:
    return RuntimeError(
        f"the inner loss of {type(model).__name__} has no gradient: under Lightning set "
        "Trainer(inference_mode=False) so that validation and test can adapt"
    )


def _step_lr(lr: float | Mapping[str, torch.Tensor], name: str) -> float | torch.Tensor:
    return lr[name] if isinstance(lr, Mapping) else lr


def adapt(
    model: nn.Module,
    loss_fn: Callable[[Params], torch.Tensor],
    params: Params,
    steps: int,
    lr: float | Mapping[str, torch.Tensor],
    first_order: bool = False,
    checkpoint: bool = False,
) -> Params:
    """Gradient steps on the support loss, functionally.

    Args:
        model: the network (only used for error messages; ``loss_fn`` runs it).
        loss_fn: support loss of a parameter dict, e.g. ``lambda p: F.cross_entropy(functional_forward(model, p, frozen, x), y)``.
        params: starting parameters (the meta-parameters).
        steps: inner steps (>= 0).
        lr: inner learning rate, a float or one tensor per parameter (Meta-SGD learns these).
        first_order: drop second-order terms (first-order MAML): inner gradients are not differentiated.
        checkpoint: second order only (ignored with ``first_order=True``, whose steps keep no activations):
            run each whole step (support forward, inner gradient with ``create_graph``, update) under
            ``torch.utils.checkpoint.checkpoint(use_reentrant=False)``. Between steps only the parameters are
            kept; the outer ``backward`` recomputes each step's forward and inner gradient, so memory grows
            more slowly with the number of steps, at the cost of time (see ``benchmarks/learner_steps.py``).
            Same values and gradients. (Checkpointing the support forward alone saves nothing in second order:
            the graph of the inner gradient holds the same activations.) ``loss_fn`` is called again during
            ``backward``, so it must not depend on state that changes meanwhile; dropout is replayed with the
            saved RNG state.

    Returns:
        The adapted parameters; with ``first_order=False`` they are differentiable functions of ``params``
        (and of ``lr`` when it is a tensor dict).
    """
    if steps < 0:
        raise ValueError(f"inner steps must be >= 0, got {steps}")

    def step(p: Params) -> Params:
        loss = loss_fn(p)
        if not loss.requires_grad:
            raise _no_gradient_error(model)
        grads = torch.autograd.grad(loss, list(p.values()), create_graph=not first_order, allow_unused=True)
        new = {}
        for (name, v), g in zip(p.items(), grads, strict=True):
            new[name] = v if g is None else v - _step_lr(lr, name) * (g.detach() if first_order else g)
        return new

    with torch.enable_grad():  # validation and test run under no_grad; the inner loop needs gradients
        for _ in range(steps):
            if checkpoint and not first_order:
                params = activation_checkpoint(step, params, use_reentrant=False)
            else:
                params = step(params)
    return params


def adapt_functional(
    model: nn.Module,
    loss_fn: Callable[..., torch.Tensor],
    params: Params,
    steps: int,
    lr: float | Mapping[str, torch.Tensor],
    first_order: bool = False,
    state: tuple = (),
) -> Params:
    """The steps of `adapt`, with ``torch.func.grad``: the same values, and it runs under ``torch.func.vmap``.

    Second order is automatic: ``torch.func.grad`` keeps the graph of ``params`` (and of ``lr``) for the
    outer ``backward``. With ``first_order=True`` the inner gradients are detached, as in `adapt`.
    ``torch.func.grad`` ignores an outer ``torch.no_grad()``; under ``torch.inference_mode()`` this raises
    the same error as `adapt`.

    Args:
        model: the network (only used for error messages; ``loss_fn`` runs it).
        loss_fn: ``loss_fn(params, *state)`` -> scalar support loss. Tensors the forward pass mutates in
            place (BatchNorm running statistics) must come through ``state``, not a closure: ``torch.func``
            refuses to mutate captured tensors.
        params: starting parameters (under vmap these may be shared by every task or batched).
        steps: inner steps (>= 0).
        lr: inner learning rate, a float or one tensor per parameter (Meta-SGD).
        first_order: drop second-order terms.
        state: extra arguments of ``loss_fn`` that are not differentiated.

    Returns:
        The adapted parameters, as in `adapt`. Parameters ``loss_fn`` does not use get a zero gradient and
        so keep their values (`adapt` skips them), which is the same result.
    """
    if steps < 0:
        raise ValueError(f"inner steps must be >= 0, got {steps}")
    if steps and torch.is_inference_mode_enabled():
        raise _no_gradient_error(model)
    grad_fn = func_grad(loss_fn)
    with torch.enable_grad():  # the outer graph (second order, Meta-SGD rates) is built under no_grad too
        for _ in range(steps):
            if first_order:
                grads = grad_fn({n: p.detach() for n, p in params.items()}, *state)
                params = {n: p - _step_lr(lr, n) * grads[n].detach() for n, p in params.items()}
            else:
                grads = grad_fn(params, *state)
                params = {n: p - _step_lr(lr, n) * grads[n] for n, p in params.items()}
    return params



def _normalise(input, mean, var, weight, bias, eps, shape):
    """(input - mean) / sqrt(var + eps), then the optional affine ``weight`` and ``bias`` broadcast as ``shape``."""
    out = (input - mean) * torch.rsqrt(var + eps)
    if weight is not None:
        out = out * weight.view(shape)
    if bias is not None:
        out = out + bias.view(shape)
    return out

def _batch_norm(input, running_mean, running_var, weight=None, bias=None, training=False, momentum=0.1, eps=1e-5):
    """`F.batch_norm` from elementary operations: (N, C, *spatial) -> (N, C, *spatial)."""
    shape = (1, -1) + (1,) * (input.dim() - 2)
    if training:
        dims = [0, *range(2, input.dim())]
        mean = input.mean(dims, keepdim=True)
        var = input.var(dims, unbiased=False, keepdim=True)
        if running_mean is not None and running_var is not None:
            n = input.numel() // input.shape[1]
            with torch.no_grad():
                running_mean.mul_(1 - momentum).add_(momentum * mean.detach().flatten())
                running_var.mul_(1 - momentum).add_(momentum * var.detach().flatten() * (n / max(n - 1, 1)))
    else:
        mean, var = running_mean.view(shape), running_var.view(shape)
    return _normalise(input, mean, var, weight, bias, eps, shape)


def _instance_norm(
    input, running_mean=None, running_var=None, weight=None, bias=None, use_input_stats=True, momentum=0.1, eps=1e-5
):
    """`F.instance_norm` from elementary operations: (N, C, *spatial) -> (N, C, *spatial)."""
    shape = (1, -1) + (1,) * (input.dim() - 2)
    if use_input_stats:
        dims = list(range(2, input.dim()))
        mean = input.mean(dims, keepdim=True)
        var = input.var(dims, unbiased=False, keepdim=True)
        if running_mean is not None and running_var is not None:
            n = math.prod(input.shape[2:])
            with torch.no_grad():
                running_mean.mul_(1 - momentum).add_(momentum * mean.detach().mean(0).flatten())
                running_var.mul_(1 - momentum).add_(momentum * var.detach().mean(0).flatten() * (n / max(n - 1, 1)))
    else:
        mean, var = running_mean.view(shape), running_var.view(shape)
    return _normalise(input, mean, var, weight, bias, eps, shape)


def _layer_norm(input, normalized_shape, weight=None, bias=None, eps=1e-5):
    """`F.layer_norm` from elementary operations (normalises the last ``len(normalized_shape)`` dimensions)."""
    dims = list(range(input.dim() - len(normalized_shape), input.dim()))
    mean = input.mean(dims, keepdim=True)
    var = input.var(dims, unbiased=False, keepdim=True)
    out = (input - mean) * torch.rsqrt(var + eps)
    if weight is not None:
        out = out * weight
    if bias is not None:
        out = out + bias
    return out


_DECOMPOSED = {F.batch_norm: _batch_norm, F.instance_norm: _instance_norm, F.layer_norm: _layer_norm}
_SIGNATURES = {f: inspect.signature(f) for f in _DECOMPOSED}


class DecomposedNorms(TorchFunctionMode):
    """While active, ``F.batch_norm``, ``F.instance_norm`` and ``F.layer_norm`` (and so ``nn.BatchNorm*d``,
    ``nn.InstanceNorm*d``, ``nn.LayerNorm``) run as elementary tensor operations.

    The values equal the fused kernels' to rounding, running statistics are updated the same way, and
    derivatives of every order are exact under ``torch.func.vmap``, where the fused kernels' batched
    second derivatives are wrong (see the module docstring). Slower than the fused kernels; other operations
    pass through untouched.

    Example:
        >>> with DecomposedNorms():
        ...     losses = torch.func.vmap(support_loss)(support_images, support_labels)
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _DECOMPOSED:
            bound = _SIGNATURES[func].bind(*args, **kwargs)
            return _DECOMPOSED[func](*bound.args, **bound.kwargs)
        return func(*args, **kwargs)
