"""A per-task weighting of feature spaces, fitted by leave-one-out over the support: the nearest prototype under
a weighted sum of squared distances.

Each space's vectors are task-normalised (centred on the support mean, unit length; see
`imaging_meta.learners.descriptors.features.task_normalise`), so every squared distance lies in [0, 4]. A query's
logit for class c is

    - sum_k beta_k * |x_k - p_k,c|^2,        beta_k = (SCALE / K) * exp(theta_k)

where ``p_k,c`` is the class mean of the support in space k. With theta = 0 this is the nearest prototype of the
concatenated spaces with the fusion's temperature: the ``fusion`` space. Fitting (`fit_weights`), per task, is a
multinomial logistic regression on the K distances with a Gaussian prior on theta:

* the data are the support items whose class has another item, each scored against the prototypes of the
  *other* support items (its own class's mean recomputed without it), as in
  `imaging_meta.learners.descriptors.nearest.leave_one_out`;
* the loss is their mean cross-entropy plus ``prior / n`` times ``|theta|^2`` (n: the items held out): with few
  held-out items the fit stays near the fusion, with many the evidence decides. A space whose prototypes
  separate the held-out items gains weight (and sharpens the probabilities), one that misleads them loses it,
  smoothly rather than by a hard choice among noisy leave-one-out accuracies;
* a task with no item to hold out (one shot per class) keeps theta = 0, the fusion's equal weights, at a softer
  temperature of its own, ``beta_k = ONE_SHOT_SCALE / K``: the same ranking of the classes for each query, and
  probabilities that are less sure of it (the fixed SCALE was sharp where nothing sets it). A task in which some
  class has two items is fitted, at SCALE.

The reported weights are ``beta / sum(beta)``. Query labels are never an input. Plain torch; gradients are
enabled locally, and inference tensors are copied out of inference mode, so that fitting works under
``torch.no_grad()`` and ``torch.inference_mode()``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from imaging_meta.learners.prototypes import class_onehot

#: the strength of the prior toward equal weights, in held-out items
PRIOR = 4.0
#: the initial softmax temperature (that of the fusion space's probabilities)
SCALE = 10.0
#: beta's scale for a task with nothing to hold out (one image per class): equal weights at this softer
#: temperature, since no fit can set one (docs/classification.md#how-far-to-trust-the-probabilities)
ONE_SHOT_SCALE = 3.0


def squared_distances(vectors: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
    """(T, A, N) squared Euclidean distances of vectors (T, A, D) to prototypes (T, N, D)."""
    return (vectors.unsqueeze(2) - prototypes.unsqueeze(1)).pow(2).sum(-1)


def loo_distances(
    support: torch.Tensor, labels: torch.Tensor, n_way: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Leave-one-out squared distances (T, S, N) of each support item to the class means of the other items,
    and which items take part (T, S): those whose class has another support item."""
    onehot = class_onehot(labels, n_way, support.dtype)
    labels = labels.long()
    sums = onehot.transpose(1, 2) @ support  # (T, N, D)
    counts = onehot.sum(1)  # (T, N)
    own_count = counts.gather(1, labels)
    d = squared_distances(support, sums / counts.clamp(min=1).unsqueeze(-1))
    own_sum = sums.gather(1, labels.unsqueeze(-1).expand(-1, -1, support.shape[-1]))
    held_out = (own_sum - support) / (own_count - 1).clamp(min=1).unsqueeze(-1)
    own = (support - held_out).pow(2).sum(-1)
    return d.scatter(2, labels.unsqueeze(-1), own.unsqueeze(-1)), own_count >= 2


def query_distances(
    support: torch.Tensor, labels: torch.Tensor, query: torch.Tensor, n_way: int
) -> torch.Tensor:
    """(T, Q, N) squared distances of the queries to the support class means."""
    onehot = class_onehot(labels, n_way, support.dtype)
    prototypes = (onehot.transpose(1, 2) @ support) / onehot.sum(1).clamp(min=1).unsqueeze(-1)
    return squared_distances(query, prototypes)


def weighted_logits(distances: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """Logits (T, A, N) from stacked squared distances (T, K, A, N) and per-space coefficients beta (T, K)."""
    return -torch.einsum("tk,tkan->tan", beta, distances)


def fit_weights(
    loo: Sequence[torch.Tensor], labels: torch.Tensor, usable: torch.Tensor, prior: float = PRIOR, steps: int = 60
) -> torch.Tensor:
    """Per-task coefficients beta (T, K) of the spaces (see the module docstring).

    Args:
        loo: per space, the (T, S, N) `loo_distances`.
        labels: (T, S) support class indices.
        usable: (T, S) the items held out.
        prior: strength of the pull toward the fusion (theta = 0), in held-out items.
        steps: L-BFGS iterations (K parameters per task; the loss is smooth and convex in theta's exponent).
    """
    if prior <= 0:
        raise ValueError(f"prior must be > 0, got {prior}")
    k = len(loo)
    with torch.inference_mode(False), torch.enable_grad():
        d = torch.stack([x.detach().clone() for x in loo], 1).double()  # (T, K, S, N)
        y, m = labels.detach().clone().long(), usable.detach().clone().double()
        n = m.sum(1)  # (T,)
        theta = torch.zeros(d.shape[:2], dtype=torch.float64, device=d.device)
        for t in torch.nonzero(n > 0).flatten().tolist():  # one fit per task: its weights never see another task's
            theta[t] = _fit_task(d[t], y[t], m[t], float(n[t]), prior, steps)
        fitted = (n > 0).unsqueeze(-1)
        beta = torch.where(fitted, SCALE / k * theta.exp(), torch.full_like(theta, ONE_SHOT_SCALE / k))
    return beta.to(loo[0].dtype)


def _fit_task(d: torch.Tensor, y: torch.Tensor, m: torch.Tensor, n: float, prior: float, steps: int) -> torch.Tensor:
    """theta (K,) of one task, from its (K, S, N) distances, (S,) labels and (S,) held-out mask (n items):
    L-BFGS on the task's own loss, so that its stopping tests and line search depend on this task alone."""
    k = d.shape[0]
    theta = torch.zeros(k, dtype=torch.float64, device=d.device, requires_grad=True)
    opt = torch.optim.LBFGS([theta], lr=1.0, max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        logits = weighted_logits(d.unsqueeze(0), SCALE / k * theta.exp().unsqueeze(0))[0]
        ce = F.cross_entropy(logits, y, reduction="none")
        loss = (ce * m).sum() / n + prior / n * theta.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return theta.detach()
