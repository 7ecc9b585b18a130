"""Prototype pooling and similarity, and the class bookkeeping of episodes, shared by the metric learners.

Classification (`episode_n_way`, `class_onehot`, `class_prototypes`): one-hot support labels and class means
of embeddings, for ProtoNet, the Siamese and the matching network. Segmentation (`masked_average_pooling`,
`local_prototypes`, ...): prototypes pooled from feature maps under masks, for PANet and ALPNet.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from imaging_meta.episode import Episode
from imaging_meta.learners.base import check_support_classes


def episode_n_way(episode: Episode) -> int:
    """Number of classes of a batched classification episode.

    Taken from ``episode.classes`` (the class names of the first task) when given, else from the largest
    support label; every task of a batch has the same ``n_way``.
    """
    classes = episode.classes
    if isinstance(classes, (list, tuple)) and classes and isinstance(classes[0], (list, tuple)) and classes[0]:
        return len(classes[0])
    return int(episode.support_labels.max()) + 1


def class_onehot(labels: torch.Tensor, n_way: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """One-hot support labels, checking that every class has a support item (`check_support_classes`).

    Args:
        labels: (T, S) class indices in ``[0, n_way)``.
        n_way: number of classes.
        dtype: floating type of the result.

    Returns:
        (T, S, n_way) one-hot matrix.
    """
    check_support_classes(labels, n_way)
    return F.one_hot(labels.long(), n_way).to(dtype)


def class_prototypes(embeddings: torch.Tensor, onehot: torch.Tensor) -> torch.Tensor:
    """Mean support embedding of each class.

    Args:
        embeddings: (T, S, D) support embeddings.
        onehot: (T, S, N) one-hot support labels (every class present).

    Returns:
        (T, N, D) prototypes.
    """
    return onehot.transpose(1, 2) @ embeddings / onehot.sum(1).unsqueeze(-1)


def resize_mask(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(N, H, W) masks resized bilinearly to ``size`` (returned as is when already that size)."""
    if tuple(mask.shape[-2:]) == tuple(size):
        return mask
    return F.interpolate(mask.unsqueeze(1).float(), size=size, mode="bilinear", align_corners=False)[:, 0]


def normalised_coordinates(h: int, w: int, device=None, dtype=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel-centre row (h,) and column (w,) coordinates spread over [-1, 1]."""
    return (torch.linspace(-1.0, 1.0, h, device=device, dtype=dtype), torch.linspace(-1.0, 1.0, w, device=device, dtype=dtype))


def masked_average_pooling(features: torch.Tensor, mask: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Average of the feature vectors under a (soft) mask (PANet's masked average pooling).

    Args:
        features: (N, C, h, w) feature maps.
        mask: (N, H, W) masks in [0, 1]; resized to (h, w) bilinearly when they differ.
        eps: keeps an empty mask from dividing by zero.

    Returns:
        (N, C) pooled features; the zero vector for an empty mask.
    """
    mask = resize_mask(mask, features.shape[-2:]).unsqueeze(1).to(features.dtype)
    return (features * mask).sum(dim=(-2, -1)) / (mask.sum(dim=(-2, -1)) + eps)


def cosine_logits(features: torch.Tensor, prototypes: torch.Tensor, scale: float = 20.0) -> torch.Tensor:
    """Scaled cosine similarity between each pixel and each prototype.

    Args:
        features: (N, C, h, w).
        prototypes: (N, P, C) prototypes per item (or (P, C), shared).
        scale: temperature multiplying the cosine (PANet uses 20).

    Returns:
        (N, P, h, w) logits.
    """
    if prototypes.dim() == 2:
        prototypes = prototypes.unsqueeze(0).expand(features.shape[0], -1, -1)
    f = F.normalize(features, dim=1)
    p = F.normalize(prototypes, dim=-1)
    return scale * torch.einsum("nchw,npc->nphw", f, p)


def local_prototypes(
    features: torch.Tensor, mask: torch.Tensor, window: int, threshold: float = 0.95
) -> tuple[torch.Tensor, torch.Tensor]:
    """Adaptive local prototypes (ALPNet): features average-pooled over a grid of windows.

    A window yields a prototype of the masked class when the mask covers at least ``threshold`` of it.

    Args:
        features: (N, C, h, w).
        mask: (N, H, W) in [0, 1] (resized to (h, w) when they differ).
        window: window side in feature pixels.
        threshold: minimum mask coverage of a window.

    Returns:
        prototypes (N, P, C) with P = (h // window) * (w // window), and a boolean validity mask (N, P).
    """
    mask = resize_mask(mask, features.shape[-2:])
    pooled = F.avg_pool2d(features, window, stride=window)  # (N, C, h', w')
    cover = F.avg_pool2d(mask.unsqueeze(1).to(features.dtype), window, stride=window)  # (N, 1, h', w')
    return pooled.flatten(2).transpose(1, 2), cover.flatten(1) >= threshold


def window_centres(h: int, w: int, window: int, device=None, dtype=None) -> torch.Tensor:
    """Centres of the `local_prototypes` windows in normalised [-1, 1] (row, column) coordinates, (P, 2)."""
    gh, gw = h // window, w // window
    r = ((torch.arange(gh, device=device, dtype=dtype) + 0.5) * window / h) * 2 - 1
    c = ((torch.arange(gw, device=device, dtype=dtype) + 0.5) * window / w) * 2 - 1
    return torch.stack(torch.meshgrid(r, c, indexing="ij"), -1).reshape(-1, 2)


def pixel_distance2(centres: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Squared distance (normalised coordinates) from each prototype centre (P, 2) to each pixel: (P, h, w)."""
    r, c = normalised_coordinates(h, w, centres.device, centres.dtype)
    return (r.view(1, h, 1) - centres[:, 0, None, None]) ** 2 + (c.view(1, 1, w) - centres[:, 1, None, None]) ** 2


def pooled_class_logits(
    features: torch.Tensor,
    prototypes: torch.Tensor,
    valid: torch.Tensor,
    scale: float = 20.0,
    penalty: torch.Tensor | None = None,
) -> torch.Tensor:
    """One logit map per class from several prototypes per class (ALPNet's soft max over prototypes).

    For each pixel and class, the scaled cosine similarities to that class's valid prototypes are averaged
    with softmax weights, so the closest prototypes dominate.

    Args:
        features: (N, C, h, w).
        prototypes: (N, K, P, C): K classes with up to P prototypes each.
        valid: (N, K, P) booleans; every class needs at least one valid prototype.
        scale: cosine temperature.
        penalty: optional (P, h, w) term subtracted from every similarity of prototype slot p at each pixel
            (location-sensitive prototypes: far-away prototypes count less).

    Returns:
        (N, K, h, w) logits.
    """
    n, k, p, c = prototypes.shape
    sims = cosine_logits(features, prototypes.reshape(n, k * p, c), scale).view(n, k, p, *features.shape[-2:])
    if penalty is not None:
        sims = sims - penalty
    sims = sims.masked_fill(~valid[..., None, None], float("-inf"))
    weights = torch.softmax(sims, dim=2)
    return (weights * sims.masked_fill(~valid[..., None, None], 0.0)).sum(dim=2)
