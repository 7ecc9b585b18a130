"""Prototype pooling and similarity, shared by the prototypical learners."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def masked_average_pooling(features: torch.Tensor, mask: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Average of the feature vectors under a (soft) mask (PANet's masked average pooling).

    Args:
        features: (N, C, h, w) feature maps.
        mask: (N, H, W) masks in [0, 1]; resized to (h, w) bilinearly when they differ.
        eps: keeps an empty mask from dividing by zero.

    Returns:
        (N, C) pooled features; the zero vector for an empty mask.
    """
    if mask.shape[-2:] != features.shape[-2:]:
        mask = F.interpolate(mask.unsqueeze(1).float(), size=features.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    mask = mask.unsqueeze(1).to(features.dtype)
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
