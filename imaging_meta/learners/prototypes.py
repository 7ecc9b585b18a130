"""Prototype pooling and similarity, and the class bookkeeping of episodes, shared by the metric learners.

Classification (`episode_n_way`, `class_onehot`, `class_prototypes`): one-hot support labels and class means
of embeddings, for ProtoNet, the Siamese and the matching network. Segmentation (`masked_average_pooling`,
`local_prototypes`, ...): prototypes pooled from feature maps under masks, for PANet and ALPNet.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from imaging_meta.episode import Episode
from imaging_meta.learners.base import check_support_classes


def episode_n_way(episode: Episode) -> int:
    """Number of classes of a batched classification episode.

    Taken from ``episode.classes`` (the class names of the first task) when given, else from the largest
    support or query label (the highest class without a support item then reaches `check_support_classes`,
    which refuses it, instead of a column too few; a review, 2026-12-07); every task of a batch has the same
    ``n_way``.
    """
    classes = episode.classes
    if isinstance(classes, (list, tuple)) and classes and isinstance(classes[0], (list, tuple)) and classes[0]:
        return len(classes[0])
    query = episode.query_labels
    return max(int(episode.support_labels.max()), int(query.max()) if query.numel() else -1) + 1


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


def resize_mask(mask: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """(N, H, W) masks resized to ``size`` (returned as is when already that size): shrunk by area (each feature
    pixel the share of its window the mask covers), else bilinearly.

    Bilinear shrinking reads only the mask pixels next to each sample point: at a stride of 8 (a ResNet's
    features) 2 of every 8 rows and columns, so a structure of 6 x 6 pixels between them vanished and its
    foreground prototype was 0 (a review, 2026-12-08). At a factor of 2 the two agree exactly."""
    if tuple(mask.shape[-2:]) == tuple(size):
        return mask
    shrink = all(int(s) <= m for s, m in zip(size, mask.shape[-2:], strict=True))
    mode = {"mode": "area"} if shrink else {"mode": "bilinear", "align_corners": False}
    return F.interpolate(mask.unsqueeze(1).float(), size=tuple(size), **mode)[:, 0]


def normalised_coordinates(h: int, w: int, device=None, dtype=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel-centre row (h,) and column (w,) coordinates spread over [-1, 1]."""
    return (torch.linspace(-1.0, 1.0, h, device=device, dtype=dtype), torch.linspace(-1.0, 1.0, w, device=device, dtype=dtype))


def masked_average_pooling(features: torch.Tensor, mask: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Average of the feature vectors under a (soft) mask (PANet's masked average pooling).

    Args:
        features: (N, C, h, w) feature maps.
        mask: (N, H, W) masks in [0, 1]; resized to (h, w) when they differ (`resize_mask`).
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
    """Centres of the `local_prototypes` windows in `normalised_coordinates`, (P, 2) (row, column).

    A window's centre is the mean of its pixels' coordinates, on the same grid as the pixels it is compared with.
    """
    rows, cols = normalised_coordinates(h, w, device, dtype)
    r = rows[: h // window * window].view(-1, window).mean(1)
    c = cols[: w // window * window].view(-1, window).mean(1)
    return torch.stack(torch.meshgrid(r, c, indexing="ij"), -1).reshape(-1, 2)


def compact_prototypes(
    prototypes: torch.Tensor, valid: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keep the valid prototype slots only, padded to the largest count.

    ALPNet's grid gives a slot to every window of every support slice; a foreground window is valid only when the
    structure covers it, so most foreground slots are invalid, and matching every pixel against them all spent
    time and memory on slots that are then masked out.

    Args:
        prototypes: (T, P, C).
        valid: (T, P) booleans.

    Returns:
        prototypes (T, M, C), validity (T, M) and the slot each came from (T, M), where M is the largest number
        of valid slots of any task (at least 1); the valid slots come first, in their order, then padding.
    """
    m = max(int(valid.sum(-1).max()), 1) if valid.numel() else 1
    order = torch.argsort((~valid).to(torch.uint8), dim=-1, stable=True)[..., :m]
    kept = prototypes.gather(1, order.unsqueeze(-1).expand(*order.shape, prototypes.shape[-1]))
    return kept, valid.gather(1, order), order


def grouped_class_logits(
    features: torch.Tensor,
    prototypes: torch.Tensor,
    valid: torch.Tensor,
    scale: float = 20.0,
    centres: torch.Tensor | None = None,
    location_weight: torch.Tensor | float = 0.0,
) -> torch.Tensor:
    """One logit map per class from several prototypes per class (ALPNet's soft max over prototypes).

    For each pixel ``x`` and class, the similarities ``s_p(x) = scale * cos(f(x), p) - location_weight *
    |x - c_p|^2`` to that class's valid prototypes ``p`` are averaged with softmax weights, so the closest
    prototypes dominate: ``sum_p softmax(s)_p s_p``. The location term (location-sensitive prototypes) lowers
    the similarity of far-away prototypes; prototypes without a centre have none.

    The N images of a task share its prototypes. Each class matches its valid slots only
    (`compact_prototypes`), and the location term is folded into the one matrix product (``|x - c|^2`` expands
    into products of ``(r, c, r^2 + c^2, 1)`` per pixel with per-prototype coefficients), so no tensor of the
    size of the similarities is built except the similarities, their softmax and their product. Same values
    as matching every slot and masking the invalid ones out (to rounding).

    Args:
        features: (T, N, C, h, w): N images per task.
        prototypes: (T, K, P, C): K classes with up to P prototypes each.
        valid: (T, K, P) booleans; every class needs at least one valid prototype.
        scale: cosine temperature.
        centres: optional (P, 2) centre of each slot in `normalised_coordinates` (row, column); a NaN row marks
            a slot without a location (no penalty).
        location_weight: weight of the squared distance (a tensor to learn it).

    Returns:
        (T, N, K, h, w) logits.
    """
    t, n, _, h, w = features.shape
    f = F.normalize(features, dim=2).flatten(3)  # (T, N, C, hw)
    if centres is not None:
        r, c = normalised_coordinates(h, w, features.device, features.dtype)
        r, c = r.view(h, 1).expand(h, w).reshape(-1), c.view(1, w).expand(h, w).reshape(-1)
        extra = torch.stack([r, c, r * r + c * c, torch.ones_like(r)])  # (4, hw)
        f = torch.cat([f, extra.expand(t, n, 4, h * w)], dim=2)
    out = []
    for k in range(prototypes.shape[1]):
        protos, ok, slots = compact_prototypes(prototypes[:, k], valid[:, k])  # (T, M, C), (T, M), (T, M)
        p = scale * F.normalize(protos, dim=-1)
        if centres is not None:
            at = centres.to(p.dtype)[slots]  # (T, M, 2)
            a = location_weight * (~at[..., 0].isnan()).to(p.dtype)  # (T, M): 0 where the slot has no location
            at = at.nan_to_num(0.0)
            # -a |x - c|^2 = 2a c_r r + 2a c_c c - a (r^2 + c^2) - a |c|^2
            p = torch.cat([p, 2 * a.unsqueeze(-1) * at, -a.unsqueeze(-1), (-a * (at * at).sum(-1)).unsqueeze(-1)], -1)
        sims = torch.matmul(p.unsqueeze(1), f)  # (T, N, M, hw)
        logits = sims if bool(ok.all()) else sims.masked_fill(~ok[:, None, :, None], float("-inf"))
        out.append((torch.softmax(logits, dim=2) * sims).sum(dim=2))  # padding: weight 0 times a finite value
    return torch.stack(out, dim=2).view(t, n, -1, h, w)
