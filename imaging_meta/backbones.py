"""A small registry of encoders, selected by name in YAML.

Every backbone maps (N, C_in, H, W) images (or (N, C_in, D, H, W) volumes for ``conv4`` with
``spatial_dims=3``) to feature maps (N, out_channels, h, w) and exposes ``out_channels``. Segmentation
learners want dense features (``unet``: full resolution); classification learners pool them into vectors
with `build_encoder` (``conv4``: the Conv-4 of the few-shot literature, h = H / 16; ``resnet12``: the
ResNet-12 of TADAM / MetaOptNet, h = H / 16).
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


def _layers(spatial_dims: int):
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
    if spatial_dims == 2:
        return nn.Conv2d, nn.BatchNorm2d, nn.MaxPool2d
    return nn.Conv3d, nn.BatchNorm3d, nn.MaxPool3d


def conv_block(c_in: int, c_out: int, pool: bool = True, spatial_dims: int = 2) -> nn.Sequential:
    """3x3 conv, BatchNorm without running statistics, ReLU, optional 2x2 max-pool (3D: 3x3x3, 2x2x2)."""
    conv, norm, maxpool = _layers(spatial_dims)
    layers = [conv(c_in, c_out, 3, padding=1), norm(c_out, track_running_stats=False), nn.ReLU(inplace=True)]
    if pool:
        layers.append(maxpool(2, ceil_mode=True))
    return nn.Sequential(*layers)


class Conv4(nn.Module):
    """Conv-4 (Vinyals et al. 2016; Snell et al. 2017): four conv blocks of ``width`` channels, each halving H and W.

    BatchNorm uses batch statistics only (``track_running_stats=False``), as MAML-style inner loops need.
    Pooling rounds up, so small inputs (MedMNIST's 28 x 28) keep a 2 x 2 map.
    """

    def __init__(self, in_channels: int = 1, width: int = 64, depth: int = 4, spatial_dims: int = 2) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            *[conv_block(in_channels if i == 0 else width, width, spatial_dims=spatial_dims) for i in range(depth)]
        )
        self.out_channels = width
        self.stride = 2**depth

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


@register_backbone("conv4")
def _conv4(in_channels: int = 1, width: int = 64, depth: int = 4, spatial_dims: int = 2):
    return Conv4(in_channels, width, depth, spatial_dims)


class ResidualBlock12(nn.Module):
    """One ResNet-12 block: three 3x3 convs (BatchNorm without running statistics, leaky ReLU), a 1x1
    shortcut, and a 2x2 max-pool."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.convs = nn.Sequential(
            nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out, track_running_stats=False), nn.LeakyReLU(0.1),
            nn.Conv2d(c_out, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out, track_running_stats=False), nn.LeakyReLU(0.1),
            nn.Conv2d(c_out, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out, track_running_stats=False),
        )
        self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, bias=False), nn.BatchNorm2d(c_out, track_running_stats=False))
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


class Encoder(nn.Module):
    """A backbone followed by global average pooling: (N, C, *spatial) -> (N, out_features) vectors."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.out_features = int(backbone.out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x).flatten(2).mean(-1)


def build_encoder(name: str, in_channels: int = 1, **kwargs) -> Encoder:
    """A registered backbone pooled into embedding vectors, for classification learners.

    Args:
        name: a registered backbone name (``conv4``, ``resnet12``, ...).
        in_channels: image channels.
        **kwargs: the builder's own options.

    Returns:
        An `Encoder` mapping (N, C, *spatial) to (N, out_features).
    """
    return Encoder(build_backbone(name, in_channels, **kwargs))
