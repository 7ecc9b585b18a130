"""A small registry of encoders, selected by name in YAML.

Every backbone maps (N, C_in, H, W) images (or (N, C_in, D, H, W) volumes for ``conv4`` with
``spatial_dims=3``) to feature maps (N, out_channels, h, w) and exposes ``out_channels``. Segmentation
learners want dense features (``unet``: full resolution); classification learners pool them into vectors
with `build_encoder` (``conv4``: the Conv-4 of the few-shot literature, h = H / 16; ``resnet12``: the
ResNet-12 of TADAM / MetaOptNet, h = H / 16).

Normalisation and the queries. ``conv4`` and ``resnet12`` normalise with batch statistics (BatchNorm without
running statistics, as MAML-style inner loops need), so an image's features depend on the other images of its
forward pass. Their norm layers are `SupportBatchNorm2d` / `SupportBatchNorm3d`: inside
``with support_statistics(n):`` they normalise every row of a batch with the statistics of its first ``n``
rows. Learners forward a task's support and queries together with the support first
(`forward_with_support_statistics`), so a query is normalised with its task's support statistics and its
prediction never depends on the other queries (TaskNorm's "MetaBN": Bronskill, Gordon, Requeima, Nowozin,
Turner. "TaskNorm: Rethinking Batch Normalization for Meta-Learning." ICML 2020). Outside the context they
are plain BatchNorm, with the same state dict. ``backbone_kwargs={"transductive": True}`` (see
`build_backbone`) keeps the old, transductive behaviour: statistics of whatever batch is forwarded, queries
included. The ``unet`` backbone uses instance normalisation, which normalises each image on its own: it is
never transductive.
"""

from __future__ import annotations

import collections.abc
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import TYPE_CHECKING, cast

import torch
import torch.nn.functional as F
from monai.networks.nets import BasicUNet
from torch import nn

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register_backbone(name: str) -> Callable:
    """Decorator: make a backbone builder available under ``name``."""

    def deco(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _REGISTRY:
            raise ValueError(f"backbone {name!r} is registered twice")
        _REGISTRY[name] = fn
        return fn

    return deco


def available_backbones() -> list[str]:
    return sorted(_REGISTRY)


def build_backbone(name: str, in_channels: int = 1, transductive: bool = False, **kwargs) -> nn.Module:
    """Build the backbone registered as ``name``.

    Args:
        name: a registered name (see `available_backbones`).
        in_channels: image channels.
        transductive: its `SupportBatchNorm2d` layers ignore `support_statistics` and normalise with the
            statistics of the whole batch they are given, queries included (the behaviour before support
            statistics). Only for backbones with batch statistics (``conv4``, ``resnet12``).
        **kwargs: the builder's own options.

    Returns:
        An ``nn.Module`` with an ``out_channels`` attribute.
    """
    if name not in _REGISTRY:
        raise ValueError(f"unknown backbone {name!r}; choose one of {available_backbones()}")
    _check_option_names(name, kwargs)
    backbone = _REGISTRY[name](in_channels=in_channels, **_typed_options(name, kwargs))
    if transductive:
        layers = [m for m in backbone.modules() if isinstance(m, _SupportStatistics)]
        if not layers:
            raise ValueError(
                f"the {name!r} backbone has no batch-statistics normalisation (each image is normalised on its own), "
                "so transductive=True would change nothing; remove it from backbone_kwargs"
            )
        for m in layers:
            m.transductive = True
    return backbone


def _builder_target(name: str) -> Callable:
    """The function whose signature lists the registered builder's options (``signature_of``, e.g. the ``resnet``
    builder's `imaging_meta.pretrained.build_resnet`, or the builder itself)."""
    fn = _REGISTRY[name]
    return fn.signature_of() if hasattr(fn, "signature_of") else fn


def _check_option_names(name: str, kwargs: dict) -> None:
    """Refuse an option the builder does not take, naming the ones it does: ``backbone_kwargs`` is an untyped dict,
    so a misspelt key (``feature`` for ``features``) passed the config check and stopped ``fit`` with "internal
    error: TypeError ... unexpected keyword argument" (a review)."""
    import inspect

    params = inspect.signature(_builder_target(name)).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    accepted = [k for k in params if k != "in_channels"]
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise ValueError(f"backbone {name!r}: unknown option(s) {', '.join(unknown)} in backbone_kwargs; its options "
                         f"are {', '.join(accepted + ['transductive'])}")


def _option_kinds(name: str) -> dict[str, tuple[type | None, bool]]:
    """The registered builder's options whose values are numbers, bools or sequences, or that allow None: option ->
    (kind, None for any other, whether None is allowed), from the annotations (or the default) of the builder, or of
    the function it stands for (``signature_of``, e.g. the ``resnet`` builder's `imaging_meta.pretrained.build_resnet`)."""
    import inspect
    import types
    import typing

    target = _builder_target(name)
    try:
        hints = typing.get_type_hints(target)
    except Exception:  # an annotation that cannot be evaluated: the defaults alone decide
        hints = {}
    out: dict[str, tuple[type | None, bool]] = {}
    for key, param in inspect.signature(target).parameters.items():
        hint = hints.get(key)
        args = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
        optional = type(None) in args
        kinds = [typing.get_origin(a) or a for a in args if a is not type(None) and a is not None]
        if param.default is not inspect.Parameter.empty and param.default is not None:
            kinds = [type(param.default)]
        kind = kinds[0] if len(kinds) == 1 else None
        if kind in (list, tuple, collections.abc.Sequence):
            kind = tuple if kind is tuple else list
        if kind in (bool, int, float, list, tuple):
            out[key] = (kind, optional)
        elif optional:  # e.g. a weights path: only its null is read
            out[key] = (None, True)
    return out


#: how a null given on the command line arrives in the untyped ``backbone_kwargs``: jsonargparse passes
#: ``--...backbone_kwargs.weights null`` on as the text ``'None'``
_NULL_TEXTS = {"none", "null", "~", ""}


def _typed_options(name: str, kwargs: dict) -> dict:
    """``kwargs`` with a text value read as YAML where the builder's option is a number, a bool or a sequence:
    ``backbone_kwargs`` is an untyped dict, so one key set on the command line
    (``--model.learner.init_args.backbone_kwargs.width 16``) arrives as the text ``'16'`` (and ``freeze_bn false``
    as ``'false'``, which is true).

    Raises:
        ValueError: a text value that does not read as the option's kind, naming the option and the whole-dict form.
    """
    if not any(isinstance(v, str) for v in kwargs.values()):
        return kwargs  # every backbone a learner builds from a config: nothing to read, no signature to inspect
    import yaml

    kinds = _option_kinds(name)
    out = dict(kwargs)
    for key, value in kwargs.items():
        if not isinstance(value, str) or key not in kinds:
            continue
        kind, optional = kinds[key]
        if optional and value.strip().lower() in _NULL_TEXTS:  # a null (a review: `weights null`, the documented
            out[key] = None  # way back to random weights, looked for a file named 'None')
            continue
        if kind is None:
            continue
        try:
            parsed = yaml.safe_load(value)
        except yaml.YAMLError:
            parsed = value
        if kind is float and isinstance(parsed, str):  # YAML 1.1 reads "1e-3" as text
            try:
                parsed = float(parsed)
            except ValueError:
                pass
        if parsed is None and optional:
            out[key] = None
        elif kind is bool and isinstance(parsed, bool):
            out[key] = parsed
        elif kind is int and not isinstance(parsed, bool) and isinstance(parsed, (int, float)) and float(parsed).is_integer():
            out[key] = int(parsed)
        elif kind is float and not isinstance(parsed, bool) and isinstance(parsed, (int, float)):
            out[key] = float(parsed)
        elif kind in (list, tuple) and isinstance(parsed, list):
            out[key] = tuple(parsed) if kind is tuple else parsed
        else:
            raise ValueError(
                f"backbone {name!r}: option {key}={value!r} does not read as a {kind.__name__}"
                f"{' (or null)' if optional else ''}; give the options as one dict, e.g. "
                f"--model.learner.init_args.backbone_kwargs '{{{key}: ...}}'")
    return out


def backbone_channels(backbone: nn.Module) -> int:
    """The ``out_channels`` of a backbone from `build_backbone` (every registered backbone sets it; the type
    checker sees only ``nn.Module``, whose attribute lookup is untyped)."""
    return int(cast(int, backbone.out_channels))


# ---------------------------------------------------------------------- support statistics
_SUPPORT_ROWS: ContextVar[int | None] = ContextVar("support_rows", default=None)
#: the normalisation pass that owns the batch-statistics norm calls now: `support_statistics` (a token of its own)
#: or a `imaging_meta.learners.support_norms.SupportNorms`; a pass nested in another takes them over until it ends
NORM_PASS: ContextVar[object | None] = ContextVar("norm_pass", default=None)


@contextmanager
def support_statistics(n_support: int) -> Iterator[None]:
    """Inside the context, `SupportBatchNorm2d` / `SupportBatchNorm3d` layers (not transductive ones) take their
    batch statistics from the first ``n_support`` rows of their input and normalise every row with them.

    Put a task's support first in the batch: its queries are then normalised with the support's statistics,
    each independently of the others. A batch of exactly ``n_support`` rows is normalised as plain BatchNorm
    does. Plain ``nn.BatchNorm*d`` layers are not affected.
    """
    if int(n_support) < 1:
        raise ValueError(f"support_statistics needs at least one support row, got {n_support}")
    token, owner = _SUPPORT_ROWS.set(int(n_support)), NORM_PASS.set(object())
    try:
        yield
    finally:
        NORM_PASS.reset(owner)
        _SUPPORT_ROWS.reset(token)


if TYPE_CHECKING:  # the type checker sees the mixin's host class; at run time it mixes into nn.BatchNorm*d
    _BatchNormHost = nn.modules.batchnorm._BatchNorm
else:
    _BatchNormHost = object


class _SupportStatistics(_BatchNormHost):
    """The forward pass of `SupportBatchNorm2d` / `SupportBatchNorm3d` (mixed into ``nn.BatchNorm*d``)."""

    #: ignore `support_statistics`: normalise with the statistics of the whole batch
    transductive: bool = False
    #: normalise with batch (or support) statistics in eval mode too, as without running statistics, which are
    #: then neither used nor updated (kept in the state dict unchanged): `batch_statistics_only`
    ignore_running_statistics: bool = False

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        n = _SUPPORT_ROWS.get()
        batch_statistics = self.training or self.running_mean is None or self.ignore_running_statistics
        if self.ignore_running_statistics and (n is None or self.transductive or n == input.shape[0]):
            self._check_input_dim(input)
            return F.batch_norm(input, None, None, self.weight, self.bias, True, 0.0, self.eps)
        if n is None or self.transductive or not batch_statistics or n == input.shape[0]:
            return super().forward(input)
        if n > input.shape[0]:
            raise ValueError(f"support_statistics({n}) but the batch has {input.shape[0]} rows; put the support first")
        self._check_input_dim(input)
        support = input[:n]
        if self.training and self.running_mean is not None and not self.ignore_running_statistics:
            with torch.no_grad():  # running statistics, if kept, follow the support as a support-only pass would
                super().forward(support.detach())
        dims = [0, *range(2, input.dim())]
        mean = support.mean(dims, keepdim=True)
        var = support.var(dims, unbiased=False, keepdim=True)
        out = (input - mean) * torch.rsqrt(var + self.eps)
        if self.affine:
            shape = (1, -1) + (1,) * (input.dim() - 2)
            out = out * self.weight.view(shape) + self.bias.view(shape)
        return out


class SupportBatchNorm2d(_SupportStatistics, nn.BatchNorm2d):
    """``nn.BatchNorm2d`` (same arguments, same state dict) that honours `support_statistics`.

    Inside ``support_statistics(n)`` (and unless ``transductive``) a batch's statistics are those of its first
    ``n`` rows, computed from elementary tensor operations (so derivatives of every order are exact under
    ``torch.func.vmap``); otherwise it is ``nn.BatchNorm2d``.
    """


class SupportBatchNorm3d(_SupportStatistics, nn.BatchNorm3d):
    """``nn.BatchNorm3d`` that honours `support_statistics` (see `SupportBatchNorm2d`)."""


def batch_statistics_only(module: nn.Module) -> None:
    """Make every `SupportBatchNorm2d` / `SupportBatchNorm3d` of ``module`` normalise with batch (or support)
    statistics in eval mode as in training, ignoring running statistics it keeps.

    For networks that only ever run functionally on copies of their buffers (MAML's family: `torch.func`
    inner loops clone them), whose running statistics therefore never follow training: in eval mode they would
    normalise with their initial (or pretrained) values, statistics training never used. Frozen norms
    (``FrozenBatchNorm2d``) are not `SupportBatchNorm2d` and keep theirs.

    A plain ``nn.BatchNorm2d`` / ``nn.BatchNorm3d`` that keeps running statistics (in a backbone registered with
    `register_backbone`) becomes a `SupportBatchNorm2d` / `SupportBatchNorm3d` (the same state dict) that ignores
    them: its eval-mode answers used statistics training never moved (0 and 1), not the support's, without a word
    (a review: test probabilities 0.70 apart from training's).

    Raises:
        ValueError: another batch norm of feature maps that keeps running statistics (``SyncBatchNorm``, a
            subclass), which cannot be made to ignore them: build the backbone with `SupportBatchNorm2d`, or
            ``track_running_stats=False``. An ``nn.BatchNorm1d`` (on vectors, which has no support-statistics twin)
            is left as it was.
    """
    from torch.nn.modules.batchnorm import _BatchNorm

    from imaging_meta.pretrained import FrozenBatchNorm2d

    swapped: dict[type, type] = {nn.BatchNorm2d: SupportBatchNorm2d, nn.BatchNorm3d: SupportBatchNorm3d}
    for name, m in module.named_modules():
        if not isinstance(m, _SupportStatistics) and type(m) in swapped and m.track_running_stats:
            m.__class__ = swapped[type(m)]  # the mixin adds behaviour only (class attributes), no state
        if isinstance(m, _SupportStatistics):
            if m.running_mean is not None:
                m.ignore_running_statistics = True
        elif (isinstance(m, _BatchNorm) and not isinstance(m, FrozenBatchNorm2d) and m.track_running_stats
              and not isinstance(m, nn.BatchNorm1d)):  # on a vector: kept as it was (no support-statistics twin)
            raise ValueError(
                f"layer {name or type(module).__name__} is a {type(m).__name__} that keeps running statistics: "
                "MAML's family runs its inner loops on copies of the buffers, so they never follow training and "
                "validation and test would normalise with their initial values. Build the backbone with "
                "imaging_meta.backbones.SupportBatchNorm2d (or SupportBatchNorm3d), or with track_running_stats=False")


def uses_support_statistics(module: nn.Module) -> bool:
    """Whether ``module`` has a norm layer that `support_statistics` changes (a non-transductive
    `SupportBatchNorm2d` / `SupportBatchNorm3d`): its queries must then be forwarded after their support."""
    return any(isinstance(m, _SupportStatistics) and not m.transductive for m in module.modules())


def is_transductive(module: nn.Module) -> bool:
    """Whether ``module`` has a batch-statistics norm layer built with ``transductive=True``."""
    return any(isinstance(m, _SupportStatistics) and m.transductive for m in module.modules())


def forward_with_support_statistics(
    fn: Callable[[torch.Tensor], torch.Tensor], support: torch.Tensor, query: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``fn`` on one task's support and queries in one pass, normalised with the support's statistics.

    Args:
        fn: a network, (N, C, *spatial) -> (N, ...).
        support: (S, C, *spatial) the task's support images.
        query: (Q, C, *spatial) its query images.

    Returns:
        ``fn``'s (S, ...) support and (Q, ...) query outputs. A query's output depends on the support and on
        itself only; the support's equal ``fn(support)`` (to rounding).
    """
    n = support.shape[0]
    with support_statistics(n):
        out = fn(torch.cat([support, query]))
    return out[:n], out[n:]


class UNetEncoder(nn.Module):
    """Dense features from MONAI's `BasicUNet` (2D): (N, C, H, W) -> (N, out_channels, H, W).

    Instance normalisation keeps no running statistics, so functional inner loops cannot mutate it, and it
    normalises each image on its own, so a query's features never depend on the other images of a batch.
    """

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 32,
        features: tuple[int, ...] = (16, 32, 64, 128, 256, 32),
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if len(features) != 6:
            raise ValueError(f"features needs 6 entries (4 encoder levels, bottleneck, last decoder), got {features}")
        self.net = BasicUNet(
            spatial_dims=2, in_channels=in_channels, out_channels=out_channels, features=tuple(features), dropout=dropout
        )
        self.out_channels = out_channels
        self.stride = 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        if h % 16 or w % 16:
            raise ValueError(f"the unet backbone needs H and W divisible by 16, got {h}x{w}; change slice_size")
        return self.net(x)


@register_backbone("unet")
def _unet(in_channels: int = 1, out_channels: int = 32, features: tuple[int, ...] = (16, 32, 64, 128, 256, 32), dropout: float = 0.0):
    return UNetEncoder(in_channels, out_channels, tuple(features), dropout)


def _layers(spatial_dims: int):
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
    if spatial_dims == 2:
        return nn.Conv2d, SupportBatchNorm2d, nn.MaxPool2d
    return nn.Conv3d, SupportBatchNorm3d, nn.MaxPool3d


# ---------------------------------------------------------------------- a norm folded into its convolution
#: ``lookup(norm) -> (scale, shift) | None``: while set, a `ConvBlock` whose norm layer ``lookup`` knows applies that
#: per-channel affine map through its convolution's weight and bias instead of running the norm layer
_FOLDED_NORMS: ContextVar[Callable[[nn.Module], tuple[torch.Tensor, torch.Tensor] | None] | None] = ContextVar(
    "folded_norms", default=None
)


@contextmanager
def folded_norms(lookup: Callable[[nn.Module], tuple[torch.Tensor, torch.Tensor] | None] | None) -> Iterator[None]:
    """Inside the context, each `ConvBlock` asks ``lookup`` for its norm layer's fixed per-channel ``(scale,
    shift)`` (the norm as ``x * scale + shift``) and, when it gets one, runs ``conv(x, weight * scale, bias * scale +
    shift)`` instead of the convolution and then the norm: the same values to rounding, and one pass over the
    activations fewer forward and backward. Gradients reach ``scale`` and ``shift``.
    `imaging_meta.learners.support_norms` uses it for a task's queries, normalised with its support's statistics.
    ``folded_norms(None)`` turns folding off inside (a nested support pass). A block never folds inside
    `support_statistics` (the one-pass form) or when its convolution or norm has hooks (they would not run).
    """
    token = _FOLDED_NORMS.set(lookup)
    try:
        yield
    finally:
        _FOLDED_NORMS.reset(token)


def _hooked(module: nn.Module) -> bool:
    """Whether a forward or backward hook would run for ``module`` (its own or a global one)."""
    from torch.nn.modules import module as m

    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks or m._global_forward_hooks or m._global_forward_pre_hooks
                or m._global_backward_hooks or m._global_backward_pre_hooks)


class ConvBlock(nn.Sequential):
    """`conv_block`'s layers (conv, norm, optional pool, ReLU): ``nn.Sequential`` with the same state dict, whose
    norm can be folded into its convolution (`folded_norms`)."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        lookup = _FOLDED_NORMS.get()
        fold = lookup is not None and _SUPPORT_ROWS.get() is None and not _hooked(self[0]) and not _hooked(self[1])
        affine = lookup(self[1]) if fold and lookup is not None else None
        if affine is None:
            return super().forward(input)
        conv = cast(nn.Conv2d | nn.Conv3d, self[0])
        scale, shift = affine
        bias = shift if conv.bias is None else conv.bias * scale + shift
        out = conv._conv_forward(input, conv.weight * scale.view((-1,) + (1,) * (conv.weight.dim() - 1)), bias)
        for layer in list(self)[2:]:
            out = layer(out)
        return out


def conv_block(c_in: int, c_out: int, pool: bool = True, spatial_dims: int = 2) -> ConvBlock:
    """3x3 conv, BatchNorm without running statistics (`SupportBatchNorm2d`), ReLU, optional 2x2 max-pool (3D:
    3x3x3, 2x2x2).

    The max-pool runs before the ReLU: the two commute (ReLU is monotonic; the gradient reaches the same
    element), so values and gradients are those of conv, norm, ReLU, pool, but the ReLU and its backward touch a
    quarter of the values (an eighth in 3D). Neither has parameters: the state dict is unchanged.
    """
    conv, norm, maxpool = _layers(spatial_dims)
    layers = [conv(c_in, c_out, 3, padding=1), norm(c_out, track_running_stats=False)]
    if pool:
        layers.append(maxpool(2, ceil_mode=True))
    layers.append(nn.ReLU(inplace=True))
    return ConvBlock(*layers)


class Conv4(nn.Module):
    """Conv-4 (Vinyals et al. 2016; Snell et al. 2017): four conv blocks of ``width`` channels, each halving H and W.

    BatchNorm uses batch statistics only (``track_running_stats=False``), as MAML-style inner loops need; the
    support's, inside `support_statistics`.
    Pooling rounds up, so small inputs (MedMNIST's 28 x 28) keep a 2 x 2 map.
    """

    def __init__(self, in_channels: int = 1, width: int = 64, depth: int = 4, spatial_dims: int = 2) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            *[conv_block(in_channels if i == 0 else width, width, spatial_dims=spatial_dims) for i in range(depth)]
        )
        self.out_channels = width
        self.stride = 2**depth
        #: on a CPU its 2D convolutions run about 1.5x faster with channels-last weights
        #: (`imaging_meta.learners.base.keep_channels_last_on_cpu`); measured slower or level for the U-Net and ResNets
        self.cpu_channels_last = spatial_dims == 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


@register_backbone("conv4")
def _conv4(in_channels: int = 1, width: int = 64, depth: int = 4, spatial_dims: int = 2):
    return Conv4(in_channels, width, depth, spatial_dims)


class ResidualBlock12(nn.Module):
    """One ResNet-12 block: three 3x3 convs (BatchNorm without running statistics, `SupportBatchNorm2d`, leaky
    ReLU), a 1x1 shortcut, and a 2x2 max-pool."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.convs = nn.Sequential(
            nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), SupportBatchNorm2d(c_out, track_running_stats=False), nn.LeakyReLU(0.1),
            nn.Conv2d(c_out, c_out, 3, padding=1, bias=False), SupportBatchNorm2d(c_out, track_running_stats=False), nn.LeakyReLU(0.1),
            nn.Conv2d(c_out, c_out, 3, padding=1, bias=False), SupportBatchNorm2d(c_out, track_running_stats=False),
        )
        self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, bias=False), SupportBatchNorm2d(c_out, track_running_stats=False))
        self.out = nn.Sequential(nn.LeakyReLU(0.1), nn.MaxPool2d(2, ceil_mode=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.convs(x) + self.shortcut(x))


class ResNet12(nn.Module):
    """ResNet-12 (Oreshkin, Rodríguez, Lacoste. "TADAM." NeurIPS 2018; Lee et al. "MetaOptNet." CVPR 2019):
    four residual blocks of widths ``widths``, each halving H and W."""

    def __init__(self, in_channels: int = 1, widths: tuple[int, ...] = (64, 128, 256, 512)) -> None:
        super().__init__()
        chans = (in_channels, *widths)
        self.layers = nn.Sequential(*[ResidualBlock12(a, b) for a, b in zip(chans[:-1], chans[1:], strict=True)])
        self.out_channels = int(widths[-1])
        self.stride = 2 ** len(widths)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


@register_backbone("resnet12")
def _resnet12(in_channels: int = 1, widths: tuple[int, ...] = (64, 128, 256, 512)):
    return ResNet12(in_channels, tuple(widths))


@register_backbone("resnet")
def _resnet(in_channels: int = 1, **kwargs):
    """torchvision's ResNet-18/34/50, optionally with pretrained weights (see `imaging_meta.pretrained`)."""
    from imaging_meta.pretrained import build_resnet  # here: imaging_meta.pretrained imports this module

    return build_resnet(in_channels=in_channels, **kwargs)


def _build_resnet() -> Callable:
    from imaging_meta.pretrained import build_resnet

    return build_resnet


_resnet.signature_of = _build_resnet  # its options, for `_typed_options`


class Encoder(nn.Module):
    """A backbone followed by global average pooling: (N, C, *spatial) -> (N, out_features) vectors."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.out_features = backbone_channels(backbone)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x).flatten(2).mean(-1)


def build_encoder(name: str, in_channels: int = 1, **kwargs) -> Encoder:
    """A registered backbone pooled into embedding vectors, for classification learners.

    Args:
        name: a registered backbone name (``conv4``, ``resnet12``, ...).
        in_channels: image channels.
        **kwargs: the builder's own options, and ``transductive`` (see `build_backbone`).

    Returns:
        An `Encoder` mapping (N, C, *spatial) to (N, out_features).
    """
    return Encoder(build_backbone(name, in_channels, **kwargs))
