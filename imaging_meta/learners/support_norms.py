"""A task's queries normalised with its support's batch statistics, in two passes: the support, then the queries
(in cache-sized chunks on a CPU).

`imaging_meta.backbones.forward_with_support_statistics` runs the support and the queries in one pass, the
support first, and its norm layers take their statistics from the support rows with elementary tensor
operations (exact derivatives of every order under ``torch.func.vmap``). `forward_in_two_passes` gives the same
values to rounding, faster on a CPU, forward and backward: the support runs alone through the fused kernels,
each norm layer's statistics are kept (`SupportNorms`), and the queries then run with them, ``x * scale +
shift`` per channel, in chunks of about `QUERY_CHUNK_PIXELS` input pixels so that a chunk's activations stay in
cache. In a Conv-4 block (`imaging_meta.backbones.ConvBlock`) that affine map is folded into the convolution's
weight and bias (`imaging_meta.backbones.folded_norms`), so the queries' norm layers cost no pass of their own. Each query is normalised with the support's statistics, so its output does not depend on the chunk it is
in; gradients reach the network through the kept statistics too. ANIL's encoder (`learners/gradient/anil.py`),
the query pass of MAML's family (`task_network.forward_query`) and the embeddings of the metric and memory
learners (`imaging_meta.learners.base.embed_tasks`) use it; ``benchmarks/two_pass_queries.py`` and
``benchmarks/anil_vs_maml.py`` measure it.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from imaging_meta.backbones import (
    NORM_PASS,
    SupportBatchNorm2d,
    SupportBatchNorm3d,
    folded_norms,
    forward_with_support_statistics,
)

_BATCH_NORM = inspect.signature(F.batch_norm)

#: on a CPU, queries run in chunks of about this many input pixels (9 to 12 images of 84 x 84): a Conv-4 forward
#: and backward over 25 queries of 84 x 84 took about 0.8x the time of one pass on a 2-core EPYC
#: (``benchmarks/anil_vs_maml.py``); small images (28 x 28) stay in one pass
QUERY_CHUNK_PIXELS = 12 * 84 * 84


def query_chunk(query: torch.Tensor) -> int:
    """Queries per chunk of (Q, C, *spatial) ``query``: chunks of equal size (to within one query) and at most
    `QUERY_CHUNK_PIXELS` input pixels each, or all of them off the CPU."""
    n = max(1, query.shape[0])
    if query.device.type != "cpu" or query.dim() < 3:
        return n
    chunks = -(-n // max(1, QUERY_CHUNK_PIXELS // max(1, math.prod(query.shape[2:]))))
    return -(-n // chunks)


def moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and biased variance of (N, C, *spatial) ``x``, as batch normalisation computes them.

    Reduced over the spatial dimensions first, then the batch: the same values as ``torch.var_mean`` over
    every dimension but the channels, and faster forward and backward on a CPU.
    """
    spatial = list(range(2, x.dim()))
    mean = x.mean(spatial).mean(0)
    var = (x - mean.view((1, -1) + (1,) * len(spatial))).square().mean(spatial).mean(0)
    return mean, var


class SupportNorms(TorchFunctionMode):
    """The normalisation of `imaging_meta.backbones.support_statistics` in two passes, support then queries,
    with the fused kernels, instead of one pass of both with elementary operations (slower, forward and
    backward; see ``benchmarks/``).

    While ``recording`` (the support pass), each batch-statistics ``F.batch_norm`` call of a known layer
    (recognised by its weight tensor) runs as usual, and its input's mean and (biased) variance are kept; in
    the query pass each such call normalises its input with them instead, ``x * scale + shift`` per channel.
    The values equal those of `imaging_meta.backbones.forward_with_support_statistics` to rounding, and
    gradients reach the body through the kept statistics too. ``foreign`` is set when the support pass meets a
    batch-statistics norm it does not know (then the caller runs the queries the usual way).
    """

    def __init__(self, layers: Mapping[int, str]) -> None:
        super().__init__()
        self.layers = dict(layers)  # id(weight tensor) -> layer name
        self.stats: dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]] = {}
        self.calls: dict[str, int] = {}
        self.recording = True
        self.foreign = False

    def queries(self) -> SupportNorms:
        self.recording, self.calls = False, {}
        return self

    def _next_key(self, name: str) -> tuple[str, int]:
        key = (name, self.calls.get(name, 0))
        self.calls[name] = key[1] + 1
        return key

    def fold(self, norm: nn.Module) -> tuple[torch.Tensor, torch.Tensor] | None:
        """In the query pass, ``norm``'s normalisation with the kept statistics as a per-channel ``(scale, shift)``
        (for `imaging_meta.backbones.folded_norms`), or None when ``norm`` is not a known batch-statistics layer
        (it then runs, and this mode sees its call)."""
        if self.recording or not isinstance(norm, nn.modules.batchnorm._BatchNorm):
            return None
        batch = norm.training or getattr(norm, "ignore_running_statistics", False)
        if not (batch or (norm.running_mean is None and norm.running_var is None)):
            return None
        name = self.layers.get(id(norm.weight))
        if name is None or norm.bias is None:
            return None
        return self._affine(self._next_key(name), norm.weight, norm.bias, norm.eps)

    def _affine(self, key: tuple[str, int], weight: torch.Tensor, bias: torch.Tensor, eps: float
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """The kept statistics of call ``key`` as the per-channel ``(scale, shift)`` of ``x * scale + shift``."""
        mean, var = self.stats[key]
        scale = weight * torch.rsqrt(var + eps)
        return scale, bias - mean * scale

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not F.batch_norm or NORM_PASS.get() is not self:  # another pass nested in this one owns it
            return func(*args, **kwargs)
        a = _BATCH_NORM.bind(*args, **kwargs).arguments
        if not a.get("training", False):  # running statistics: the same for every row
            return func(*args, **kwargs)
        name = self.layers.get(id(a.get("weight")))
        if name is None:
            self.foreign = True
            return func(*args, **kwargs)
        key = self._next_key(name)
        x, weight = a["input"], a["weight"]
        if self.recording:  # statistics in the parameters' precision, as the kernel computes them (autocast)
            self.stats[key] = moments(x.to(weight.dtype))
            return func(*args, **kwargs)
        eps = a.get("eps", 1e-5)
        scale, shift = self._affine(key, weight, a["bias"], eps)
        # x * scale + shift, as the fused kernel of an eval-mode norm with mean 0 and variance 1: its backward is
        # one pass (elementwise operations would take several), and gradients reach scale and shift
        ones = torch.ones_like(scale)
        return func(x, torch.zeros_like(scale), ones, scale * torch.sqrt(ones + eps), shift, False, 0.0, eps)


def support_norm_layers(module: nn.Module, state: Mapping[str, torch.Tensor], prefix: str = "") -> dict[int, str]:
    """``id(weight) -> name`` of ``module``'s affine, non-transductive support-statistics norm layers, their weight
    tensors taken from ``state`` (keyed ``prefix + name + ".weight"``), as `SupportNorms` recognises them."""
    kinds = (SupportBatchNorm2d, SupportBatchNorm3d)
    return {
        id(state[f"{prefix}{name}.weight"]): name
        for name, m in module.named_modules()
        if isinstance(m, kinds) and not m.transductive and m.affine and f"{prefix}{name}.weight" in state
    }


def module_norm_layers(module: nn.Module) -> dict[int, str]:
    """`support_norm_layers` of a module called as it is (its own parameters, not a functional state)."""
    return support_norm_layers(module, {f"{n}.weight": m.weight for n, m in module.named_modules()
                                        if getattr(m, "weight", None) is not None})


def forward_in_two_passes(
    fn: Callable[[torch.Tensor], torch.Tensor], layers: Mapping[int, str], support: torch.Tensor, query: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``fn``'s (S, ...) support and (Q, ...) query outputs, the queries normalised with the support's statistics
    (see the module docstring). The query output is None when the support pass met a batch-statistics norm layer
    that ``layers`` (`support_norm_layers`) does not name: the caller then runs the queries with
    `imaging_meta.backbones.forward_with_support_statistics`."""
    norms = SupportNorms(layers)
    owner = NORM_PASS.set(norms)  # its norm calls until it ends (a pass nested in it takes them over meanwhile)
    try:
        with norms, folded_norms(None):  # an outer query pass's folding does not reach this support pass
            fs = fn(support)
        if norms.foreign:
            return fs, None
        parts = []
        for chunk in query.split(query_chunk(query)):
            with norms.queries(), folded_norms(norms.fold):
                parts.append(fn(chunk))
    finally:
        NORM_PASS.reset(owner)
    return fs, parts[0] if len(parts) == 1 else torch.cat(parts)


def forward_with_known_norms(
    fn: Callable[[torch.Tensor], torch.Tensor], layers: Mapping[int, str], support: torch.Tensor, query: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``fn``'s (S, ...) support and (Q, ...) query outputs, the queries normalised with the support's statistics:
    in two passes (`forward_in_two_passes`) when ``layers`` name every batch-statistics norm layer the support pass
    meets, else (and at once when ``layers`` is empty) in one pass,
    `imaging_meta.backbones.forward_with_support_statistics`."""
    if layers:
        fs, fq = forward_in_two_passes(fn, layers, support, query)
        if fq is not None:
            return fs, fq
    return forward_with_support_statistics(fn, support, query)
