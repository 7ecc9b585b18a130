"""Pretrained ResNet encoders: torchvision's ResNet-18/34/50, with weights the user supplies.

The leading few-shot medical segmentation methods start from an ImageNet-pretrained encoder (PANet and
SSL-ALPNet: a ResNet-101/VGG trunk; later work: SAM, DINOv2). This module builds the plain-torch ResNet of
He, Zhang, Ren, Sun ("Deep Residual Learning for Image Recognition", CVPR 2016) with module and parameter
names that are exactly torchvision's (``conv1``, ``bn1``, ``layer1``..``layer4``, blocks ``N.conv1/bn1/conv2/bn2
[/conv3/bn3]/downsample.0/downsample.1``), so a torchvision ImageNet file (``resnet18-f37072fd.pth``) loads
key for key; its ``fc`` is dropped. Neither torchvision nor timm is needed.

Weights come only from where the config says (``backbone_kwargs: {weights: ...}``): a local file, read with
``torch.load(weights_only=True)``, or an ``http(s)://`` / ``file://`` URL, fetched once with
``torch.hub.download_url_to_file`` into a cache kept per URL (`cached_download`), then read the same way (no
pickled code runs either way). Nothing is ever downloaded unless the config names a URL; a URL that cannot be
reached raises `WeightsUnavailableError`, which says to pass a local file instead.

One-channel input. ImageNet's ``conv1`` takes RGB. For a grey slice the RGB kernels are summed (the
``in_chans=1`` rule of timm's ``adapt_input_conv`` and of segmentation_models_pytorch's ``patch_first_conv``):
the 1-channel convolution is then exactly the RGB one applied to the grey image copied into all three
channels. Other channel counts repeat the RGB kernels cyclically, scaled by 3 / channels (timm's rule).
``imagenet_norm`` normalises the input as ImageNet images were, ``(x - mean) / std`` (the datamodules scale
intensities to about [0, 1], the range these statistics assume); for a grey input the per-channel mean and
std (0.485, 0.456, 0.406 / 0.229, 0.224, 0.225) are replaced by their averages, 0.449 / 0.226 (the summed
kernel cannot apply three different normalisations; the channel values differ by under 10 %).

Batch normalisation. A query's prediction must not depend on the other queries (`imaging_meta.backbones`).
With ``freeze_bn`` (the default when weights are given) every BatchNorm is a `FrozenBatchNorm2d`: it always
normalises with the pretrained running statistics and never updates them, in training and in prediction
(each image on its own, as detection and segmentation fine-tuning of ImageNet ResNets usually do); its
affine weight and bias still train. Without it the norms are the project's `SupportBatchNorm2d`
(``track_running_stats=True``): in training, a task's support statistics (the learners forward the support
first); in eval mode, the running statistics. Frozen stages (``freeze_stages``) always use `FrozenBatchNorm2d`.

Dense features. ``feature_stride`` 32 runs the whole trunk (layer4, what classification pools); 16 stops at
layer3; 8 concatenates layer2 with layer3 upsampled to it (PANet segments from stride-8 features), and layer4
is not built. An optional 1x1 convolution (``out_channels``) projects the features.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import pickle
import re
import socket
import urllib.error
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import urlparse
from urllib.request import url2pathname

import torch
import torch.nn.functional as F
from torch import nn

from imaging_meta.backbones import SupportBatchNorm2d

#: depth -> (block, blocks per stage), as torchvision's resnet18 / resnet34 / resnet50
DEPTHS = {18: ("basic", (2, 2, 2, 2)), 34: ("basic", (3, 4, 6, 3)), 50: ("bottleneck", (3, 4, 6, 3))}
FEATURE_STRIDES = (8, 16, 32)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
URL_SCHEMES = ("http", "https", "file")
#: torchvision's ImageNet files (IMAGENET1K_V1; ResNet-50's V2 recipe: resnet50-11ad3fa6.pth), what a user
#: downloads once elsewhere from https://download.pytorch.org/models/<file>
TORCHVISION_FILES = {18: "resnet18-f37072fd.pth", 34: "resnet34-b627a593.pth", 50: "resnet50-0676ba61.pth"}


class WeightsUnavailableError(OSError):
    """Pretrained weights named by a URL could not be fetched (no network, or the address is unreachable)."""


class FrozenBatchNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` (same arguments, same state dict) that always normalises with its running statistics
    and never updates them, whatever the mode: each image is normalised on its own. ``train()`` leaves it in
    eval mode. Its affine weight and bias are ordinary parameters (frozen only inside a frozen stage)."""

    def train(self, mode: bool = True) -> FrozenBatchNorm2d:
        return super().train(False)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        return F.batch_norm(input, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)


# ----------------------------------------------------------------------------------------- the network
def _conv3x3(c_in: int, c_out: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)


def _conv1x1(c_in: int, c_out: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """torchvision's ``BasicBlock`` (ResNet-18/34): two 3x3 convolutions and a shortcut."""

    expansion = 1

    def __init__(self, c_in: int, width: int, stride: int, norm: type[nn.BatchNorm2d]) -> None:
        super().__init__()
        self.conv1 = _conv3x3(c_in, width, stride)
        self.bn1 = norm(width)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(width, width)
        self.bn2 = norm(width)
        self.downsample = _downsample(c_in, width, stride, norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + (x if self.downsample is None else self.downsample(x)))


class Bottleneck(nn.Module):
    """torchvision's ``Bottleneck`` (ResNet-50, "v1.5": the stride on the 3x3 convolution): 1x1, 3x3, 1x1."""

    expansion = 4

    def __init__(self, c_in: int, width: int, stride: int, norm: type[nn.BatchNorm2d]) -> None:
        super().__init__()
        self.conv1 = _conv1x1(c_in, width)
        self.bn1 = norm(width)
        self.conv2 = _conv3x3(width, width, stride)
        self.bn2 = norm(width)
        self.conv3 = _conv1x1(width, width * self.expansion)
        self.bn3 = norm(width * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _downsample(c_in, width * self.expansion, stride, norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + (x if self.downsample is None else self.downsample(x)))


def _downsample(c_in: int, c_out: int, stride: int, norm: type[nn.BatchNorm2d]) -> nn.Sequential | None:
    if stride == 1 and c_in == c_out:
        return None
    return nn.Sequential(_conv1x1(c_in, c_out, stride), norm(c_out))


def _norm(frozen: bool) -> type[nn.BatchNorm2d]:
    return FrozenBatchNorm2d if frozen else SupportBatchNorm2d


class ResNet(nn.Module):
    """torchvision's ResNet-18/34/50 trunk (no ``avgpool``/``fc``) as a dense encoder:
    (N, C, H, W) -> (N, out_channels, ~H / feature_stride, ~W / feature_stride).

    Args:
        depth: 18, 34 or 50.
        in_channels: image channels (1 for CT/MR slices).
        width: channels of the stem and of layer1 (torchvision: 64; pretrained weights need 64).
        feature_stride: 32 (layer4), 16 (layer3) or 8 (layer2 and upsampled layer3, concatenated).
        out_channels: a 1x1 projection of the features to this many channels; None keeps them.
        freeze_bn: every BatchNorm is a `FrozenBatchNorm2d` (running statistics, never updated); otherwise
            `SupportBatchNorm2d` (support statistics in training, running statistics in eval mode).
        freeze_stages: 0 trains everything; k freezes conv1, bn1 and layer1..layer k (no gradients, frozen
            BatchNorm).
        imagenet_norm: normalise the input with ImageNet's mean and std (see the module docstring).
    """

    # registered in __init__ (setattr, register_buffer); declared for the type checker. layer4 exists when
    # feature_stride is 32
    layer1: nn.Sequential
    layer2: nn.Sequential
    layer3: nn.Sequential
    layer4: nn.Sequential
    input_mean: torch.Tensor
    input_std: torch.Tensor

    def __init__(
        self,
        depth: int = 18,
        in_channels: int = 1,
        width: int = 64,
        feature_stride: int = 32,
        out_channels: int | None = None,
        freeze_bn: bool = False,
        freeze_stages: int = 0,
        imagenet_norm: bool = False,
    ) -> None:
        super().__init__()
        if depth not in DEPTHS:
            raise ValueError(f"depth must be one of {sorted(DEPTHS)} (torchvision's resnet18/34/50), got {depth}")
        if feature_stride not in FEATURE_STRIDES:
            raise ValueError(f"feature_stride must be one of {FEATURE_STRIDES}, got {feature_stride}")
        n_stages = 4 if feature_stride == 32 else 3
        if not 0 <= freeze_stages <= n_stages:
            raise ValueError(f"freeze_stages must be in 0..{n_stages} (feature_stride {feature_stride} builds "
                             f"layer1..layer{n_stages}), got {freeze_stages}")
        kind, counts = DEPTHS[depth]
        block = BasicBlock if kind == "basic" else Bottleneck
        self.depth, self.in_channels, self.stride = int(depth), int(in_channels), int(feature_stride)
        self.built_stages, self.freeze_stages = n_stages, int(freeze_stages)
        self.conv1 = nn.Conv2d(in_channels, width, 7, stride=2, padding=3, bias=False)
        self.bn1 = _norm(freeze_bn or freeze_stages >= 1)(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        c, stage_channels = width, []
        for i in range(n_stages):
            norm = _norm(freeze_bn or freeze_stages >= i + 1)
            blocks = []
            for j in range(counts[i]):
                blocks.append(block(c, width * 2**i, 2 if i > 0 and j == 0 else 1, norm))
                c = width * 2**i * block.expansion
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
            stage_channels.append(c)
        features = stage_channels[1] + stage_channels[2] if feature_stride == 8 else stage_channels[-1]
        self.proj = nn.Conv2d(features, int(out_channels), 1) if out_channels else None
        self.out_channels = int(out_channels) if out_channels else features
        self.imagenet_norm = bool(imagenet_norm)
        mean, std = _input_statistics(in_channels)
        self.register_buffer("input_mean", mean, persistent=False)
        self.register_buffer("input_std", std, persistent=False)
        self._init_weights()
        for module in self._frozen_modules():
            module.requires_grad_(False)

    def _init_weights(self) -> None:
        """torchvision's initialisation: Kaiming-normal convolutions (fan out), BatchNorm weight 1, bias 0."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _frozen_modules(self) -> list[nn.Module]:
        if self.freeze_stages == 0:
            return []
        return [self.conv1, self.bn1, *(getattr(self, f"layer{i}") for i in range(1, self.freeze_stages + 1))]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.imagenet_norm:
            x = (x - self.input_mean.view(1, -1, 1, 1)) / self.input_std.view(1, -1, 1, 1)
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        c2 = self.layer2(self.layer1(x))
        c3 = self.layer3(c2)
        if self.stride == 8:
            f = torch.cat([c2, F.interpolate(c3, size=c2.shape[-2:], mode="bilinear", align_corners=False)], dim=1)
        else:
            f = c3 if self.stride == 16 else self.layer4(c3)
        return f if self.proj is None else self.proj(f)

    # ------------------------------------------------------------------------------------- weights
    def _skipped(self, key: str) -> bool:
        """Keys of a torchvision file that this encoder does not use: the classifier, layers not built,
        BatchNorm's batch counters."""
        head = key.split(".")[0]
        unbuilt = {f"layer{i}" for i in range(self.built_stages + 1, 5)}
        return head == "fc" or head in unbuilt or key.endswith("num_batches_tracked")

    def load_pretrained(self, state: Mapping[str, torch.Tensor], source: str = "the weights") -> None:
        """Load a torchvision-layout state dict (``fc.*`` dropped), adapting ``conv1`` to ``in_channels``.

        Raises:
            ValueError: keys missing from ``state`` or not expected in it (each named), or shapes that differ.
        """
        own = self.state_dict()
        expected = {k for k in own if not k.startswith("proj.") and not k.endswith("num_batches_tracked")}
        given = {k for k in state if not self._skipped(k)}
        missing, unexpected = sorted(expected - given), sorted(given - expected)
        if missing or unexpected:
            raise ValueError(
                f"{source} do not fit torchvision's resnet{self.depth} layout: "
                f"{_listing('missing keys', missing)}{'; ' if missing and unexpected else ''}"
                f"{_listing('unexpected keys', unexpected)}{_prefix_hint(unexpected, expected)}"
            )
        state = {k: v for k, v in state.items() if k in expected or (k in own and k.endswith("num_batches_tracked"))}
        try:
            state["conv1.weight"] = adapt_input_conv(state["conv1.weight"], self.in_channels)
        except ValueError as e:  # named with the file and the setting to change (a review)
            raise ValueError(f"{source}: {e}; set in_channels to {state['conv1.weight'].shape[1]} to use these "
                             "weights as they are") from e
        wrong = [f"{k} {tuple(state[k].shape)} in the file, {tuple(own[k].shape)} here"
                 for k in sorted(expected) if state[k].shape != own[k].shape]
        if wrong:
            raise ValueError(f"{source}: shapes differ from resnet{self.depth} (is width 64?): {'; '.join(wrong[:8])}")
        self.load_state_dict(state, strict=False)


def _input_statistics(in_channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ImageNet's mean and std per input channel: RGB's for 3 channels, their averages otherwise."""
    if in_channels == 3:
        return torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
    mean, std = sum(IMAGENET_MEAN) / 3, sum(IMAGENET_STD) / 3
    return torch.full((in_channels,), mean), torch.full((in_channels,), std)


def _listing(what: str, keys: list[str], shown: int = 8) -> str:
    if not keys:
        return ""
    more = f" and {len(keys) - shown} more" if len(keys) > shown else ""
    return f"{len(keys)} {what} ({', '.join(keys[:shown])}{more})"


def _prefix_hint(unexpected: list[str], expected: set[str]) -> str:
    """The dotted prefix shared by every unexpected key whose removal makes them the expected keys (the longest such:
    a fit checkpoint's ``learner.encoder.``, where stripping ``learner.`` alone was advised and did not load; a
    review); else, when they share a first part, that part."""
    if len(unexpected) < 2:
        return ""
    parts = [k.split(".")[:-1] for k in unexpected]
    shared = len(os.path.commonprefix(parts))  # the dotted parts every key begins with
    for n in range(shared, 0, -1):
        prefix = ".".join(parts[0][:n]) + "."
        if sum(k[len(prefix):] in expected for k in unexpected) * 2 >= len(unexpected):
            return f"; every unexpected key starts with {prefix!r}, and without it they fit: strip that prefix from the file"
    if shared:
        return f"; every unexpected key starts with {parts[0][0] + '.'!r}"
    return ""


def adapt_input_conv(weight: torch.Tensor, in_channels: int) -> torch.Tensor:
    """A pretrained (O, 3, k, k) first convolution for ``in_channels`` inputs.

    One channel: the sum over RGB (the same output as the RGB kernel on a grey image copied into the three
    channels; timm's ``adapt_input_conv``). Three: unchanged. Other counts: the RGB kernels repeated cyclically,
    scaled by 3 / ``in_channels``. A kernel that already has ``in_channels`` inputs is returned as it is.
    """
    c = weight.shape[1]
    if c == in_channels:
        return weight
    if c != 3:
        raise ValueError(f"conv1.weight has {c} input channels; only RGB (3) kernels can be adapted to {in_channels}")
    if in_channels == 1:
        return weight.sum(dim=1, keepdim=True)
    reps = -(-in_channels // 3)
    return weight.repeat(1, reps, 1, 1)[:, :in_channels] * (3.0 / in_channels)


# ----------------------------------------------------------------------------------------- loading
def load_weights(source: str | Path, cache_dir: str | Path | None = None, timeout: float = 30.0) -> dict[str, torch.Tensor]:
    """A state dict from a local file or a URL, without running pickled code.

    Args:
        source: a path, or an ``http(s)://`` / ``file://`` URL (downloaded once into ``cache_dir``; see
            `cached_download`).
        cache_dir: where URLs are cached; None: torch.hub's (``$TORCH_HOME/hub/checkpoints``).
        timeout: seconds a network read may wait.

    Returns:
        The state dict: the file's, or its ``state_dict`` / ``model`` entry, with a ``module.`` prefix
        (DistributedDataParallel) stripped.

    Raises:
        FileNotFoundError: no such local file.
        WeightsUnavailableError: (an ``OSError``) the URL could not be fetched.
        ValueError: a file that is not a weights-only state dict, or a URL of another scheme.
    """
    text = str(source)
    scheme = urlparse(text).scheme.lower()
    if scheme in URL_SCHEMES:
        path = cached_download(text, cache_dir, timeout)
        try:
            content = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # a download cut short, or an error page served as the file
            if _holds_code(e):  # whole, but with objects weights_only refuses: not a damaged download
                raise ValueError(f"{text} ({path}): {_needs_code(e)}") from e
            downloaded = path.parent.parent.name == "by-url"  # this module's copy, not torchvision's
            if downloaded:
                path.unlink(missing_ok=True)
            raise ValueError(
                f"{text}: the downloaded file {path} is not a weights file readable with weights_only=True "
                f"({type(e).__name__}: {without_torch_advice(str(e))}); "
                + ("it was deleted, so the next run downloads it again" if downloaded else
                   "delete it to download it again")
                + "; if that fails too, download the file yourself and pass its path") from e
        return unwrap_state_dict(content, text)
    if len(scheme) > 1 and "://" in text:  # one letter: a Windows drive
        raise ValueError(f"pretrained weights {text}: {scheme}:// URLs are not supported; give an http(s):// or "
                         "file:// URL, or download the file and pass its path (backbone_kwargs.weights)")
    path = Path(text).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"pretrained weights {path}: no such file (backbone_kwargs.weights). Resuming a fit whose checkpoint "
            "already holds the weights? Set weights: null together with freeze_bn: true and imagenet_norm: true "
            "(what the weights switched on), or the run continues with other BatchNorm and input settings")
    try:
        content = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a damaged or foreign file: name it and the cause
        if _holds_code(e):
            raise ValueError(f"{path}: {_needs_code(e)}") from e
        raise ValueError(f"{path}: not a weights file readable with weights_only=True ({type(e).__name__}: {without_torch_advice(str(e))})") from e
    return unwrap_state_dict(content, text)


def without_torch_advice(text: str) -> str:
    """torch's ``weights_only`` refusal without its paragraphs that suggest ``weights_only=False`` (wrong advice for
    a damaged file or an error page), ask for an issue and point at its docs: "Unsupported operand 60", say."""
    drop = ("Weights only load failed", "Please file an issue", "Check the documentation")
    kept = [p.strip() for p in text.split("\n\n") if p.strip() and not p.strip().startswith(drop)]
    return " ".join(" ".join(kept).split()) or text


def refused_global(text: str) -> str | None:
    """The object torch's ``weights_only`` refusal names (``posix.system``, ``argparse.Namespace``), when it names
    one: a whole file holding more than tensors, not bytes that are no pickle at all."""
    match = re.search(r"(?:[Uu]nsupported global: |unsupported )GLOBAL ([\w.]+)", text)
    return match.group(1) if match else None


def _holds_code(e: BaseException) -> bool:
    """Whether torch's refusal names an object that weights_only=True would not build (`refused_global`): an HTML
    error page or a JSON file also raise `pickle.UnpicklingError` ("Unsupported operand 60"), and were called
    complete files and kept in the download cache (a review)."""
    return isinstance(e, pickle.UnpicklingError) and refused_global(str(e)) is not None


def _needs_code(e: BaseException) -> str:
    """What to say of a file that `_holds_code`: the object torch refused, by name (torch's own first line is its
    generic paragraph, which suggests weights_only=False and named nothing: a review, 2026-12-07)."""
    return (f"a complete file, but it holds objects besides tensors, which weights_only=True does not build, so none "
            f"of its code ran (it names {refused_global(str(e))}); where you trust the file, load it once and save "
            "its weights alone: "
            "torch.save(torch.load(path, weights_only=False)['state_dict'], 'weights.pth'), or "
            "torch.save(torch.load(path, weights_only=False).state_dict(), 'weights.pth') for a whole saved model")


def sha256_file(path: str | os.PathLike) -> str:
    """The SHA-256 of a file's bytes, read in blocks (hex)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


#: torch.hub's convention for content-addressed names, ``<name>-<first hex digits of the SHA-256>.<ext>``
#: (torchvision's ``resnet18-f37072fd.pth``)
HUB_HASH = re.compile(r"-([a-f0-9]{8,})\.")


def _verified(path: Path) -> bool:
    """True for a file whose name follows `HUB_HASH` and whose content has that hash."""
    m = HUB_HASH.search(path.name)
    if m is None or not path.is_file():
        return False
    return sha256_file(path).startswith(m.group(1))


def cached_download(url: str, cache_dir: str | Path | None = None, timeout: float = 30.0) -> Path:
    """The local copy of ``url``, downloaded on first use.

    Copies are kept per URL (``<cache>/by-url/<hash of the URL>/<file name>``; a ``file://`` URL's hash also
    covers the file's size and time, so a file replaced in place is copied again): torch.hub keeps them by file
    name alone, so two URLs ending in the same name (``.../imagenet/resnet18.pth`` and
    ``.../radimagenet/resnet18.pth``) shared one copy, and the second silently loaded the first one's weights
    (a review). A file named by torch.hub's content-hash convention (`HUB_HASH`, torchvision's files) whose
    content has that hash is kept, or found, where torch.hub and torchvision keep it, ``<cache>/<file name>``:
    weights torchvision already downloaded on a cluster are reused without a download.

    Raises:
        WeightsUnavailableError: the URL could not be fetched (the cause and what to do in the message).
    """
    root = Path(cache_dir) if cache_dir is not None else Path(torch.hub.get_dir()) / "checkpoints"
    name = Path(urlparse(url).path).name or "weights.pth"
    shared = root / name
    if HUB_HASH.search(name) and _verified(shared):
        return shared
    key = url
    if urlparse(url).scheme.lower() == "file":  # a local file's copy is keyed by its size and time too: replaced in
        try:  # place, it was never read again (a review)
            st = os.stat(url2pathname(urlparse(url).path))
            key = f"{url}|{st.st_size}|{st.st_mtime_ns}"
        except OSError:  # no such file: the download below names it
            pass
    own = root / "by-url" / hashlib.sha256(key.encode()).hexdigest()[:16] / name
    if not own.is_file():
        own.parent.mkdir(parents=True, exist_ok=True)
        previous = socket.getdefaulttimeout()
        socket.setdefaulttimeout(timeout)  # urllib's connections in torch.hub take no timeout of their own
        try:
            torch.hub.download_url_to_file(url, str(own), None, progress=False)
        except (OSError, http.client.HTTPException) as e:
            raise WeightsUnavailableError(_fetch_failure(url, name, e)) from e
        finally:
            socket.setdefaulttimeout(previous)
    if HUB_HASH.search(name):
        if _verified(own):  # hashed once: the moved copy is the verified one
            try:
                os.replace(own, shared)
            except FileNotFoundError:  # another process (a DDP rank) moved the same verified download first
                pass
            return shared
        if _verified(shared):
            return shared
    return own


def _fetch_failure(url: str, name: str, e: BaseException) -> str:
    """Why ``url`` could not be fetched, and what to do."""
    cause = f"{type(e).__name__}: {e}"
    if isinstance(e, urllib.error.HTTPError):
        return (f"could not fetch pretrained weights from {url}: the server answered HTTP {e.code} ({e.reason}); "
                "check the URL, or download the file and pass its path")
    if urlparse(url).scheme.lower() == "file":
        return f"could not read pretrained weights from {url} ({cause}); check the path"
    return (f"could not fetch pretrained weights from {url} ({cause}). No download is possible from this machine "
            f"(no network access, or it cannot reach that address): download the file on a machine with internet "
            f"access, copy it here and pass the local file (weights: /path/to/{name})")


def unwrap_state_dict(content: object, source: str = "the weights") -> dict[str, torch.Tensor]:
    """The state dict in a loaded file: itself, or under ``state_dict`` / ``model``; ``module.`` stripped."""
    for _ in range(3):
        if isinstance(content, Mapping) and content and all(isinstance(v, torch.Tensor) for v in content.values()):
            return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in content.items()}
        inner = next((content[k] for k in ("state_dict", "model") if isinstance(content, Mapping)
                      and isinstance(content.get(k), Mapping)), None)
        if inner is None:
            break
        content = inner
    keys = sorted(content)[:8] if isinstance(content, Mapping) else type(content).__name__
    odd = ""
    if isinstance(content, Mapping) and any(isinstance(v, torch.Tensor) for v in content.values()):
        k, v = next((k, v) for k, v in content.items() if not isinstance(v, torch.Tensor))
        odd = f"; its entry {k!r} is a {type(v).__name__}, not a tensor"
    raise ValueError(f"{source}: no state dict found (a dict of tensors, or one under 'state_dict' or 'model'); "
                     f"got {keys}{odd}")


# ----------------------------------------------------------------------------------------- the builder
def build_resnet(
    in_channels: int = 1,
    depth: int = 18,
    weights: str | None = None,
    freeze_bn: bool | None = None,
    imagenet_norm: bool | None = None,
    out_channels: int | None = None,
    feature_stride: int = 32,
    freeze_stages: int = 0,
    width: int = 64,
) -> ResNet:
    """The ``resnet`` backbone of `imaging_meta.backbones` (arguments: see `ResNet`).

    ``weights`` (None, a path or a URL) is read only when given; ``freeze_bn`` and ``imagenet_norm`` default
    to True when it is and to False when it is not.
    """
    given = weights is not None
    model = ResNet(
        depth=depth, in_channels=in_channels, width=width, feature_stride=feature_stride, out_channels=out_channels,
        freeze_bn=given if freeze_bn is None else bool(freeze_bn), freeze_stages=freeze_stages,
        imagenet_norm=given if imagenet_norm is None else bool(imagenet_norm),
    )
    if weights is not None:  # given
        model.load_pretrained(load_weights(weights), source=str(weights))
    return model


def without_weights(backbone_kwargs: Mapping) -> dict:
    """``backbone_kwargs`` of the ``resnet`` backbone that build the same network without reading ``weights``
    (``freeze_bn`` and ``imagenet_norm`` resolved as the weights made them): for rebuilding a learner whose
    checkpoint already holds the weights, on a machine without the file."""
    out = dict(backbone_kwargs)
    given = out.get("weights") is not None
    for key in ("freeze_bn", "imagenet_norm"):
        if out.get(key) is None:
            out[key] = given
    out["weights"] = None
    return out
