"""A small registry of encoders, selected by name in YAML.

Every backbone maps (N, C_in, H, W) images to feature maps (N, out_channels, h, w) and exposes
``out_channels``. Segmentation learners want dense features (``unet``: full resolution); classification
learners pool them (``conv4``: the Conv-4 of the few-shot literature, h = H / 16).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
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


def build_backbone(name: str, in_channels: int = 1, **kwargs) -> nn.Module:
    """Build the backbone registered as ``name``.

    Args:
        name: a registered name (see `available_backbones`).
        in_channels: image channels.
        **kwargs: the builder's own options.

    Returns:
        An ``nn.Module`` with an ``out_channels`` attribute.
    """
    if name not in _REGISTRY:
        raise ValueError(f"unknown backbone {name!r}; choose one of {available_backbones()}")
    return _REGISTRY[name](in_channels=in_channels, **kwargs)


class UNetEncoder(nn.Module):
    """Dense features from MONAI's `BasicUNet` (2D): (N, C, H, W) -> (N, out_channels, H, W).

    Instance normalisation keeps no running statistics, so functional inner loops cannot mutate it.
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


def conv_block(c_in: int, c_out: int, pool: bool = True) -> nn.Sequential:
    """3x3 conv, BatchNorm without running statistics, ReLU, optional 2x2 max-pool."""
    layers = [nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out, track_running_stats=False), nn.ReLU(inplace=True)]
    if pool:
        layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers)


class Conv4(nn.Module):
    """Conv-4 (Vinyals et al. 2016; Snell et al. 2017): four conv blocks of ``width`` channels, each halving H and W.

    BatchNorm uses batch statistics only (``track_running_stats=False``), as MAML-style inner loops need.
    """

    def __init__(self, in_channels: int = 1, width: int = 64, depth: int = 4) -> None:
        super().__init__()
        self.layers = nn.Sequential(*[conv_block(in_channels if i == 0 else width, width) for i in range(depth)])
        self.out_channels = width
        self.stride = 2**depth

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


@register_backbone("conv4")
def _conv4(in_channels: int = 1, width: int = 64, depth: int = 4):
    return Conv4(in_channels, width, depth)
