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

A meta-batch's meta-gradient can be taken one task at a time: `per_task_backward` differentiates each task's
loss as soon as it exists, so only one task's graph is alive at a time (as ``higher``'s MAML example does with a
backward per task), and returns the mean loss as a scalar whose ``backward`` hands the summed gradients to the
parameters: to Lightning, DDP, gradient clipping and accumulation it is an ordinary loss.

`FastKernels` (inside `fast_kernels`, as `MAML.loss` runs its loop) replaces three CPU operations by autograd
functions with the same values and derivatives that cost less: batch norm's double backward in closed form,
the weight gradient of the images' convolution as one matrix product, 2x2 max-pooling from elementwise maxima.
The inner update of all parameters is two fused list operations (``torch._foreach_*``).

Under ``vmap``, PyTorch's fused batch, instance and layer normalisation with affine parameters give wrong
second-order meta-gradients (compared in float64 against the loop, the errors are far above rounding;
non-affine normalisation and group norm are exact; likely the batching rule of their backward,
pytorch/functorch#534). `DecomposedNorms` computes these three from elementary tensor operations,
which are exact at every order; vmapped second-order inner loops run under it.

Finn, Abbeel, Levine. "Model-Agnostic Meta-Learning for Fast Adaptation of Deep Networks." ICML 2017.
"""

from __future__ import annotations

import contextlib
import inspect
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextvars import ContextVar
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable
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
    params: dict[str, torch.Tensor] = {}
    frozen: dict[str, torch.Tensor] = {}
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


_FAST_KERNELS: ContextVar[bool] = ContextVar("fast_kernels", default=False)


@contextlib.contextmanager
def fast_kernels(enabled: bool = True) -> Iterator[None]:
    """Inside the context, the steps of `adapt` run their loss under `FastKernels` (and `kernels_if_enabled` gives it)."""
    token = _FAST_KERNELS.set(bool(enabled))
    try:
        yield
    finally:
        _FAST_KERNELS.reset(token)


def kernels_if_enabled() -> contextlib.AbstractContextManager:
    """`FastKernels` inside `fast_kernels`, else a context that changes nothing."""
    return FastKernels() if _FAST_KERNELS.get() else contextlib.nullcontext()


class NoGradientError(ValueError):
    """The inner loop ran where autograd is off (Lightning's ``inference_mode``): a setting to change, not a bug."""


def _no_gradient_error(model: nn.Module) -> NoGradientError:
    return NoGradientError(
        f"the inner loss of {type(model).__name__} has no gradient: gradient-based learners adapt on the support "
        "in validation and test too, so run them with --trainer.inference_mode false (the shipped trainer configs "
        "do; from Python, Trainer(inference_mode=False))"
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

    Inside `fast_kernels` (as `MAML.loss` runs it), ``loss_fn`` runs under `FastKernels`.

    Returns:
        The adapted parameters; with ``first_order=False`` they are differentiable functions of ``params``
        (and of ``lr`` when it is a tensor dict).
    """
    if steps < 0:
        raise ValueError(f"inner steps must be >= 0, got {steps}")
    # decided now, not when a checkpointed step is recomputed in backward (it must save the same tensors)
    kernels = FastKernels if _FAST_KERNELS.get() else contextlib.nullcontext

    def step(p: Params) -> Params:
        with kernels():
            loss = loss_fn(p)
        if not loss.requires_grad:
            raise _no_gradient_error(model)
        grads = torch.autograd.grad(loss, list(p.values()), create_graph=not first_order, allow_unused=True)
        moved = [(name, v, g.detach() if first_order else g) for (name, v), g in zip(p.items(), grads, strict=True)
                 if g is not None]
        if not moved:
            return dict(p)
        names, values, gs = zip(*moved, strict=True)
        rates = [lr[n] for n in names] if isinstance(lr, Mapping) else lr
        new = dict(p)  # v - lr * g, for all parameters in two fused list operations
        new.update(zip(names, torch._foreach_sub(list(values), torch._foreach_mul(list(gs), rates)), strict=True))
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



# ------------------------------------------------------------------------------------ a backward per task
class _PrecomputedGradients(torch.autograd.Function):
    """Returns ``value``; its backward hands ``grads`` (times the incoming gradient) to ``params``."""

    @staticmethod
    def forward(ctx, value: torch.Tensor, grads: tuple, *params: torch.Tensor) -> torch.Tensor:
        ctx.grads = grads
        return value.clone()

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        return (None, None, *(None if g is None else g * grad_output for g in ctx.grads))


def per_task_backward(losses: Iterable[torch.Tensor], params: Sequence[torch.Tensor], n: int) -> torch.Tensor:
    """The mean of ``n`` task losses, each differentiated (and its graph freed) before the next one is built.

    ``losses`` is consumed lazily (pass a generator that builds each task's loss when asked): every loss is
    differentiated with respect to ``params`` at once, with the weight ``1 / n`` that the mean gives it, and
    the gradients are summed, so that the peak memory holds one task's graph instead of all of them. The
    value returned is the mean of the losses (as ``torch.stack(losses).mean()``); its ``backward`` adds the
    summed gradients, times the incoming gradient, to ``params``, in one call, like any loss: under DDP its
    backward is the one gradient synchronisation of the meta-batch (the losses must still be built inside
    the DDP-wrapped forward, as Lightning's ``training_step`` is), and loss scaling, accumulation and
    clipping see the same gradients. The meta-gradient equals that of one backward through the mean (to
    rounding: the sum runs over the tasks in order).

    The work of the backward happens here, when the losses are built. Calling ``backward`` on the result
    differentiates nothing else: gradients reach ``params`` only, never other tensors the losses depend on.

    Args:
        losses: ``n`` scalar losses, produced one after the other.
        params: the tensors to differentiate (those that do not require grad are skipped).
        n: the number of losses (the mean's denominator).

    Raises:
        ValueError: when ``losses`` does not yield exactly ``n`` losses.
    """
    params = [p for p in params if p.requires_grad]
    sums: list[torch.Tensor | None] = [None] * len(params)
    values = []
    for loss in losses:
        values.append(loss.detach())
        if not (params and loss.requires_grad):
            continue
        weight = torch.full_like(loss, 1.0 / n)
        for i, g in enumerate(torch.autograd.grad(loss, params, weight, allow_unused=True)):
            if g is not None:
                acc = sums[i]
                sums[i] = g if acc is None else acc + g
    if len(values) != n:
        raise ValueError(f"per_task_backward expected {n} losses, got {len(values)}")
    return _PrecomputedGradients.apply(torch.stack(values).mean(), tuple(sums), *params)


# --------------------------------------------------------------------------------- faster CPU kernels
def _per_channel(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A (C,) tensor viewed to broadcast over ``like`` (N, C, *spatial)."""
    return t.view((1, -1) + (1,) * (like.dim() - 2))


class _BatchNormTraining(torch.autograd.Function):
    """Affine batch norm with the batch's statistics: PyTorch's fused kernels, and a backward that
    `_BatchNormBackward` differentiates in closed form."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps):
        y, mean, invstd = torch.native_batch_norm(x, weight, bias, None, None, True, 0.0, eps)
        ctx.save_for_backward(x, weight, mean, invstd)
        ctx.eps = eps
        return y

    @staticmethod
    def backward(ctx, gy):
        x, weight, mean, invstd = ctx.saved_tensors
        return (*_BatchNormBackward.apply(gy, x, weight, mean, invstd, ctx.eps), None)


class _BatchNormBackward(torch.autograd.Function):
    """``(grad_input, grad_weight, grad_bias)`` of batch norm (PyTorch's kernel), with its derivative written out.

    With x̂ the normalised input, s the inverse standard deviation, M the values per channel and P the
    projection g -> g - mean(g) - x̂ mean(g x̂) (per channel): gx = w s P(gy), gw = sum(gy x̂), gb = sum(gy). For
    incoming gradients (a, c, d) of (gx, gw, gb) and K = sum(a P(gy)): d/dgy = w s P(a) + c x̂ + d,
    d/dw = s K, d/dx = -(w s² K / M) x̂ + (c s - w s² sum(a x̂) / M) P(gy) - w s² mean(gy x̂) P(a). About a dozen
    passes over the activations, against some forty in PyTorch's generic double backward of batch norm, the
    largest cost of a second-order step on CPU after the convolutions. No third derivative.
    """

    @staticmethod
    def forward(ctx, gy, x, weight, mean, invstd, eps):
        gx, gw, gb = torch.ops.aten.native_batch_norm_backward(
            gy, x, weight, None, None, mean, invstd, True, eps, [True, True, True])
        ctx.save_for_backward(gy, x, weight, mean, invstd)
        ctx.sums = (gw.detach(), gb.detach())
        return gx, gw, gb

    @staticmethod
    @once_differentiable
    def backward(ctx, a, c, d):
        gy, x, weight, mean, invstd = ctx.saved_tensors
        m, dims, s = x.numel() // x.shape[1], [0, *range(2, x.dim())], invstd
        ws = weight * s
        xhat = (x - _per_channel(mean, x)).mul_(_per_channel(s, x))
        g0, g1 = ctx.sums[1] / m, ctx.sums[0] / m  # mean(gy), mean(gy x̂)
        zero = torch.zeros_like(s)
        c, d = (zero if c is None else c), (zero if d is None else d)
        a0 = a1 = k = zero
        buffer = torch.empty_like(x)  # the one full-size temporary besides x̂; it becomes d/dgy
        if a is not None:
            a0, a1 = a.sum(dims), torch.mul(a, xhat, out=buffer).sum(dims)
            k = torch.mul(a, gy, out=buffer).sum(dims) - a0 * g0 - a1 * g1
        d_gy = d_x = None
        if ctx.needs_input_grad[0]:
            d_gy = torch.mul(xhat, _per_channel(c - ws * a1 / m, x), out=buffer).add_(_per_channel(d - ws * a0 / m, x))
            if a is not None:
                d_gy.addcmul_(a, _per_channel(ws, x))
        if ctx.needs_input_grad[1]:  # in the storage of x̂, its last use
            u, v = c * s - ws * s * a1 / m, -ws * s * g1
            d_x = xhat.mul_(_per_channel(-ws * s * k / m - u * g1 - v * a1 / m, x))
            d_x.add_(_per_channel(-u * g0 - v * a0 / m, x)).addcmul_(gy, _per_channel(u, x))
            if a is not None:
                d_x.addcmul_(a, _per_channel(v, x))
        d_w = s * k if ctx.needs_input_grad[2] and a is not None else None
        return d_gy, d_x, d_w, None, None, None


class _InputConv(torch.autograd.Function):
    """``F.conv2d`` of an input that needs no gradient (the images), whose weight gradient is one batched
    matrix product over the unfolded input (`_InputConvWeightGrad`): oneDNN's backward-weights kernel is several
    times slower for the single channel of most scans."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation):
        ctx.save_for_backward(x)
        ctx.conf = (weight.shape, stride, padding, dilation, bias is not None)
        return F.conv2d(x, weight, bias, stride, padding, dilation)

    @staticmethod
    def backward(ctx, gy):
        return None, *_InputConvWeightGrad.apply(gy, ctx.saved_tensors[0], ctx.conf), None, None, None


class _InputConvWeightGrad(torch.autograd.Function):
    """The weight and bias gradients of `_InputConv`; their derivative in ``gy`` is a convolution of the input."""

    @staticmethod
    def forward(ctx, gy, x, conf):
        shape, stride, padding, dilation, has_bias = conf
        cols = F.unfold(x, shape[-2:], dilation, padding, stride)  # (N, C_in * kh * kw, L)
        ctx.save_for_backward(x)
        ctx.conf, ctx.gy_shape = conf, gy.shape
        return torch.bmm(gy.flatten(2), cols.transpose(1, 2)).sum(0).view(shape), gy.sum([0, 2, 3]) if has_bias else None

    @staticmethod
    def backward(ctx, ggw, ggb):
        _, stride, padding, dilation, _ = ctx.conf
        if ggw is not None:
            return F.conv2d(ctx.saved_tensors[0], ggw, ggb, stride, padding, dilation), None, None
        return (None if ggb is None else _per_channel(ggb, ctx.saved_tensors[0]).expand(ctx.gy_shape)), None, None


def _quarters(t: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The four positions of every 2x2 window: upper left, upper right, lower left, lower right (strided views)."""
    return t[..., 0::2, 0::2], t[..., 0::2, 1::2], t[..., 1::2, 0::2], t[..., 1::2, 1::2]


class _Route2x2(torch.autograd.Function):
    """Gradients of 2x2 max-pooling. ``scatter``: (N, C, h, w) -> (N, C, 2h, 2w), each value to the maximum that
    ``top`` (the upper row) and ``left`` (the left column of that row) pick in its window, zeros elsewhere;
    otherwise its adjoint, the gather. The masks are 0 or 1, so the products are exact; each direction's
    derivative is the other."""

    @staticmethod
    def forward(ctx, g, left, top, scatter):
        ctx.save_for_backward(left, top)
        ctx.scatter = scatter
        lf, tf = left.to(g.dtype), top.to(g.dtype)
        if not scatter:
            g00, g01, g10, g11 = _quarters(g)
            rf = 1 - lf
            upper, lower = torch.addcmul(g01 * rf, g00, lf), torch.addcmul(g11 * rf, g10, lf)
            return torch.addcmul(lower.mul_(1 - tf), upper, tf)
        out = g.new_empty(*g.shape[:-2], 2 * g.shape[-2], 2 * g.shape[-1])
        o00, o01, o10, o11 = _quarters(out)  # computed in place: no temporary of the output's size
        torch.mul(g, tf, out=o01)  # the upper row's share
        torch.mul(o01, lf, out=o00)
        o01.sub_(o00)
        torch.sub(g, o00, out=o11).sub_(o01)  # the lower row's share (one of the two terms is zero: exact)
        torch.mul(o11, lf, out=o10)
        o11.sub_(o10)
        return out

    @staticmethod
    def backward(ctx, gg):
        return _Route2x2.apply(gg, *ctx.saved_tensors, not ctx.scatter), None, None, None


class _MaxPool2x2(torch.autograd.Function):
    """``F.max_pool2d(x, 2)`` for even H and W from elementwise maxima (PyTorch's NCHW kernel is several times
    slower on CPU); the gradient goes to the first maximum of each window in row-major order, as PyTorch's, and
    two boolean masks of the output's size replace PyTorch's 64-bit indices."""

    @staticmethod
    def forward(ctx, x):
        x00, x01, x10, x11 = _quarters(x)
        upper, lower = torch.maximum(x00, x01), torch.maximum(x10, x11)
        top = upper >= lower
        ctx.save_for_backward(torch.where(top, x00 >= x01, x10 >= x11), top)
        return torch.maximum(upper, lower, out=upper)

    @staticmethod
    def backward(ctx, gy):
        return _Route2x2.apply(gy, *ctx.saved_tensors, True)


#: measured crossovers (CPU, one thread): below them PyTorch's kernels are as fast (per-operation overhead)
_MIN_FAST_NORM, _MIN_FAST_POOL, _MAX_UNFOLDED = 1024, 2**18, 64
_pair = torch.nn.modules.utils._pair


def _plain_float(t: torch.Tensor, *others: torch.Tensor | None) -> bool:
    return (t.device.type == "cpu" and t.dtype in (torch.float32, torch.float64) and not torch.is_autocast_enabled("cpu")
            and all(o is None or o.dtype == t.dtype for o in others))


def _fast_batch_norm(input, running_mean, running_var, weight=None, bias=None, training=False, momentum=0.1, eps=1e-5):
    if (training and running_mean is None and running_var is None and weight is not None and bias is not None
            and input.dim() >= 2 and input.numel() >= _MIN_FAST_NORM * input.shape[1] and _plain_float(input, weight, bias)):
        return _BatchNormTraining.apply(input, weight, bias, eps)
    return F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)


def _fast_conv2d(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    if (not input.requires_grad and weight.requires_grad and groups == 1 and input.dim() == 4
            and not isinstance(padding, str) and weight[0].numel() <= _MAX_UNFOLDED and _plain_float(input, weight, bias)):
        return _InputConv.apply(input, weight, bias, _pair(stride), _pair(padding), _pair(dilation))
    return F.conv2d(input, weight, bias, stride, padding, dilation, groups)


def _fast_max_pool2d(input, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False, return_indices=False):
    if (_pair(kernel_size) == _pair(2) and stride in (None, 2, (2, 2), [2, 2]) and _pair(padding) == _pair(0)
            and _pair(dilation) == _pair(1) and not return_indices and input.dim() == 4 and input.shape[-1] % 2 == 0
            and input.shape[-2] % 2 == 0 and input.numel() >= _MIN_FAST_POOL and _plain_float(input)):
        return _MaxPool2x2.apply(input)
    return F.max_pool2d(input, kernel_size, stride, padding, dilation, ceil_mode=ceil_mode, return_indices=return_indices)


_FAST = {F.batch_norm: _fast_batch_norm, F.conv2d: _fast_conv2d, F.max_pool2d: _fast_max_pool2d}


class FastKernels(TorchFunctionMode):
    """While active, three CPU operations run through autograd functions that are faster on CPU, with the same
    values and derivatives (first and second) as PyTorch's, to rounding: batch norm with batch statistics
    (`_BatchNormBackward`: a closed-form double backward), convolutions of the images (`_InputConv`: the
    weight gradient as one matrix product) and 2x2 max-pooling (`_MaxPool2x2`). Each only above a measured size,
    in float32/64 without autocast; everything else passes through. `MAML.loss` runs its inner steps and
    query passes under it (`fast_kernels`); not under ``torch.func`` transforms, not measured on GPUs (so off
    there). Together they make a second-order Conv-4 step about a fifth faster at 84x84 (``benchmarks/``).
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        fast = _FAST.get(func)  # the mode is off inside this method: the functions called below are PyTorch's
        return func(*args, **(kwargs or {})) if fast is None else fast(*args, **(kwargs or {}))


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


_DECOMPOSED: dict[Callable[..., Any], Callable[..., Any]] = {F.batch_norm: _batch_norm, F.instance_norm: _instance_norm, F.layer_norm: _layer_norm}
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
