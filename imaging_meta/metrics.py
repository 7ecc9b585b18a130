"""Per-item metrics on tensors."""

from __future__ import annotations

import torch


def dice_score(pred: torch.Tensor, target: torch.Tensor, empty: float = 1.0) -> torch.Tensor:
    """Dice coefficient per item, 2|A∩B| / (|A| + |B|).

    Args:
        pred: (N, H, W) binary (bool or {0, 1}) predictions.
        target: (N, H, W) binary ground truth.
        empty: the score when both are empty.

    Returns:
        (N,) float scores in [0, 1].
    """
    if pred.shape != target.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} must have the same shape")
    p = pred.flatten(1).float()
    t = target.flatten(1).float()
    inter = (p * t).sum(1)
    denom = p.sum(1) + t.sum(1)
    return torch.where(denom > 0, 2 * inter / denom.clamp_min(1e-12), torch.full_like(denom, empty))
