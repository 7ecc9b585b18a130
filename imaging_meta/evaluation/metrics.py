"""Metrics on tensors: Dice and HD95 per mask; accuracy, balanced accuracy, macro AUC and calibration per episode."""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

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


def hausdorff95_mm(pred: torch.Tensor, target: torch.Tensor, spacing: Sequence[float]) -> torch.Tensor:
    """95th-percentile symmetric Hausdorff distance per item, in millimetres (MONAI's metric).

    An empty prediction or an empty truth has no boundary, so no distance: the score is then the image
    diagonal in millimetres, the worst distance a mask on that image can have (both empty: 0). The mean
    over episodes stays finite and a model that predicts nothing is penalised, not skipped.

    Args:
        pred: (N, H, W) binary predictions.
        target: (N, H, W) binary ground truth.
        spacing: (row, column) pixel size in mm.

    Returns:
        (N,) float64 distances in mm.
    """
    from monai.metrics import compute_hausdorff_distance

    if pred.shape != target.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} must have the same shape")
    p = pred.bool().cpu()
    t = target.bool().cpu()
    out = torch.zeros(p.shape[0], dtype=torch.float64)
    both = p.flatten(1).any(1) & t.flatten(1).any(1)
    diagonal = math.hypot(*(s * float(sp) for s, sp in zip(p.shape[1:], spacing, strict=True)))
    out[p.flatten(1).any(1) ^ t.flatten(1).any(1)] = diagonal
    if both.any():
        with warnings.catch_warnings():  # MONAI's deprecation notice of an argument it passes itself
            warnings.simplefilter("ignore", FutureWarning)
            d = compute_hausdorff_distance(
                p[both, None].float(), t[both, None].float(), include_background=True, percentile=95,
                spacing=[float(s) for s in spacing],
            )
        out[both] = d[:, 0].double()
    return out


def balanced_accuracy(probs: torch.Tensor, labels: torch.Tensor, n_classes: int) -> float:
    """Mean per-class recall of the argmax predictions over the classes present in ``labels``.

    Args:
        probs: (Q, n_classes) class probabilities.
        labels: (Q,) true class indices.
    """
    pred = probs.argmax(-1)
    recalls = [float((pred[labels == c] == c).float().mean()) for c in range(n_classes) if (labels == c).any()]
    return sum(recalls) / len(recalls)


def macro_auc(probs: torch.Tensor, labels: torch.Tensor, n_classes: int) -> float:
    """One-vs-rest ROC AUC averaged over the classes that have both positives and negatives in ``labels``.

    Exact (Mann-Whitney U, ties counted one half), so it does not depend on a threshold grid.

    Args:
        probs: (Q, n_classes) class probabilities.
        labels: (Q,) true class indices.

    Returns:
        The macro AUC, or NaN when no class has both positives and negatives.
    """
    aucs = [ovr_auc(probs[:, c], labels == c) for c in range(n_classes) if (labels == c).any() and (labels != c).any()]
    return sum(aucs) / len(aucs) if aucs else float("nan")


def ovr_auc(scores: torch.Tensor, positive: torch.Tensor) -> float:
    """ROC AUC of ``scores`` (N,) for the ``positive`` (N,) bool items against the rest; ties count one half."""
    pos, neg = scores[positive].double(), scores[~positive].double()
    diff = pos[:, None] - neg[None, :]
    return float(((diff > 0).double() + 0.5 * (diff == 0).double()).mean())


def calibration_bins(confidence: torch.Tensor, correct: torch.Tensor, n_bins: int = 15) -> list[dict]:
    """Equal-width confidence bins of top-label predictions: the data of a reliability diagram.

    Args:
        confidence: (N,) probability of the predicted class.
        correct: (N,) whether the prediction was right.
        n_bins: bins over [0, 1].

    Returns:
        One ``{"lo", "hi", "count", "confidence", "accuracy"}`` per bin (mean confidence and accuracy of its
        predictions; NaN for an empty bin).
    """
    conf = confidence.double().cpu()
    corr = correct.double().cpu()
    idx = torch.clamp((conf * n_bins).long(), max=n_bins - 1)
    bins = []
    for b in range(n_bins):
        sel = idx == b
        n = int(sel.sum())
        bins.append({"lo": b / n_bins, "hi": (b + 1) / n_bins, "count": n,
                     "confidence": float(conf[sel].mean()) if n else float("nan"),
                     "accuracy": float(corr[sel].mean()) if n else float("nan")})
    return bins


def expected_calibration_error(confidence: torch.Tensor, correct: torch.Tensor, n_bins: int = 15) -> float:
    """ECE (Guo et al., 2017): the count-weighted mean |accuracy - confidence| over equal-width bins.

    Args:
        confidence: (N,) probability of the predicted class.
        correct: (N,) whether the prediction was right.
        n_bins: bins over [0, 1].
    """
    total = len(confidence)
    if total == 0:
        return float("nan")
    return sum(b["count"] / total * abs(b["accuracy"] - b["confidence"]) for b in calibration_bins(confidence, correct, n_bins)
               if b["count"])
