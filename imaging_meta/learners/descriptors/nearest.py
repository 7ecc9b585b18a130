"""The nearest-prototype rule on a task's vectors, and its leave-one-out accuracy over the support.

A class's prototype is the mean of its support vectors. ``euclidean``: a query's logits are the negative
squared distances to the prototypes; ``cosine``: the cosine similarities. The predicted class is the nearest
prototype (the first one on a tie).

`leave_one_out_accuracy` estimates, from the support alone, how well that rule does in a space: each support item
is classified by the prototypes of the *other* support items (its own class's prototype is recomputed without it;
the other classes' are unchanged). Only items whose class keeps at least one other item take part.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from imaging_meta.learners.prototypes import class_onehot, class_prototypes

DISTANCES = ("euclidean", "cosine")


def _check_distance(distance: str) -> None:
    if distance not in DISTANCES:
        raise ValueError(f"distance must be one of {DISTANCES}, got {distance!r}")


def prototype_scores(vectors: torch.Tensor, prototypes: torch.Tensor, distance: str = "euclidean") -> torch.Tensor:
    """Larger-is-nearer scores (T, A, N) of vectors (T, A, D) against prototypes (T, N, D): the negative
    squared Euclidean distance, or the cosine similarity."""
    _check_distance(distance)
    if distance == "cosine":
        return F.normalize(vectors, dim=-1) @ F.normalize(prototypes, dim=-1).transpose(1, 2)
    return -(vectors.unsqueeze(2) - prototypes.unsqueeze(1)).pow(2).sum(-1)


def prototype_logits(
    support: torch.Tensor, labels: torch.Tensor, query: torch.Tensor, n_way: int, distance: str = "euclidean",
    scale: float | torch.Tensor = 1.0,
) -> torch.Tensor:
    """Query logits (T, Q, n_way): ``scale`` times the `prototype_scores` against the class means of the support.

    Args:
        support: (T, S, D) support vectors.
        labels: (T, S) class indices; every class needs a support item.
        query: (T, Q, D) query vectors.
        n_way: number of classes.
        distance: ``euclidean`` or ``cosine``.
        scale: multiplies the scores (a softmax temperature; it never changes the nearest prototype).
    """
    prototypes = class_prototypes(support, class_onehot(labels, n_way, support.dtype))
    return scale * prototype_scores(query, prototypes, distance)


def leave_one_out(
    support: torch.Tensor, labels: torch.Tensor, n_way: int, distance: str = "euclidean"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Leave-one-out nearest-prototype predictions of the support items (see the module docstring).

    Args:
        support: (T, S, D) support vectors.
        labels: (T, S) class indices; every class needs a support item.
        n_way: number of classes.
        distance: ``euclidean`` or ``cosine``.

    Returns:
        ``(correct, usable)``, both (T, S) booleans: whether item i's held-out prediction is its class, and
        whether its class has another support item (only those count).
    """
    onehot = class_onehot(labels, n_way, support.dtype)  # (T, S, N)
    labels = labels.long()
    sums = onehot.transpose(1, 2) @ support  # (T, N, D)
    counts = onehot.sum(1)  # (T, N)
    own_count = counts.gather(1, labels)  # (T, S)
    usable = own_count >= 2
    scores = prototype_scores(support, sums / counts.clamp(min=1).unsqueeze(-1), distance)  # (T, S, N)
    own_sum = sums.gather(1, labels.unsqueeze(-1).expand(-1, -1, support.shape[-1]))
    held_out = (own_sum - support) / (own_count - 1).clamp(min=1).unsqueeze(-1)  # own prototype without item i
    if distance == "cosine":
        own = (F.normalize(support, dim=-1) * F.normalize(held_out, dim=-1)).sum(-1)
    else:
        own = -(support - held_out).pow(2).sum(-1)
    scores = scores.scatter(2, labels.unsqueeze(-1), own.unsqueeze(-1))
    return (scores.argmax(-1) == labels) & usable, usable


def leave_one_out_accuracy(
    support: torch.Tensor, labels: torch.Tensor, n_way: int, distance: str = "euclidean"
) -> torch.Tensor:
    """(T,) leave-one-out accuracy of the nearest-prototype rule per task; NaN for a task where no class has two
    support items."""
    correct, usable = leave_one_out(support, labels, n_way, distance)
    n = usable.sum(1)
    acc = correct.sum(1).to(support.dtype) / n.clamp(min=1)
    return torch.where(n > 0, acc, torch.full_like(acc, float("nan")))
