"""The one scoring path: a batch of episodes and each method's probabilities -> one record per (method, query).

`EpisodicModule` (validation and ``imaging-meta test``) and ``imaging-meta evaluate`` both call
`score_batch`, so a query has the same record wherever it is scored:

=============  ==========================================================================================
``method``     `TRAINED`, `UNTRAINED` or a task baseline (`imaging_meta.tasks.COPY_MASK`)
``episode``    int, unique over a run: the episode's position in the fixed episode list
``shot``       int, support items per class (segmentation: support slices)
``site``       the query's own site (`query_site`)
``query_id``   the pseudonymous id of the query item
``patient``    the query's pseudonymous patient (`query_patient`): the cluster that the patient bootstrap of
               `imaging_meta.evaluation.statistics` resamples
metric         the task's metric (``dice`` or ``acc``), and ``hd95`` (mm) when the task reports it and a pixel
               spacing is given (`QUERY_METRICS`)
task fields    `Task.query_fields`: ``organ`` (segmentation); ``class``, ``classes``, ``label`` and, for
               methods with probabilities, ``probs`` (classification)
=============  ==========================================================================================
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import cast

import torch

from imaging_meta.episode import Episode
from imaging_meta.evaluation.metrics import dice_score, hausdorff95_mm
from imaging_meta.tasks import Task

#: the per-query metrics, by the name a `Task` gives them: (N, ...) decisions, (N, ...) `Task.truth`, the pixel
#: spacing in mm (or None) -> (N,) scores
QUERY_METRICS: dict[str, Callable[[torch.Tensor, torch.Tensor, Sequence[float] | None], torch.Tensor]] = {
    "dice": lambda pred, truth, spacing: dice_score(pred, truth),
    # only with a spacing (NEEDS_SPACING): score_batch leaves it out otherwise
    "hd95": lambda pred, truth, spacing: hausdorff95_mm(pred, truth, cast(Sequence[float], spacing)),
    "acc": lambda pred, truth, spacing: (pred == truth).float(),
}
#: the metrics that are distances in mm: scored only when a pixel spacing is given
NEEDS_SPACING = {"hd95"}


def query_site(episode: Episode, i: int, j: int) -> str:
    """The site of query ``j`` of task ``i`` of a batched episode: its own when the episode lists one site per
    query (``meta["query_sites"]``: each query may come from another patient and scanner), else the episode's."""
    meta = episode.meta[i] if isinstance(episode.meta, list) else None
    sites = (meta or {}).get("query_sites")
    return str(sites[j] if sites else episode.site[i])


def query_patient(episode: Episode, i: int, j: int) -> str:
    """The pseudonymous patient of query ``j`` of task ``i``: ``meta["query_patients"]`` (both datamodules list
    them), else the query's own id (data that does not name patients: each query item is its own cluster)."""
    meta = episode.meta[i] if isinstance(episode.meta, list) else None
    patients = (meta or {}).get("query_patients")
    return str(patients[j] if patients else episode.query_ids[i][j])


def query_scores(task: Task, decisions: torch.Tensor, labels: torch.Tensor,
                 spacing: Sequence[float] | None = None) -> dict[str, torch.Tensor]:
    """The task's per-query metrics of (T, Q, ...) decisions against (T, Q, ...) labels: `Task.metric` and any
    other of its report metrics that `QUERY_METRICS` knows (those of `NEEDS_SPACING` only with a ``spacing``).

    Returns:
        ``{metric: (T, Q) tensor on the CPU}``.
    """
    t, q = labels.shape[:2]
    pred, truth = decisions.flatten(0, 1).cpu(), task.truth(labels).flatten(0, 1).cpu()
    names = dict.fromkeys([task.metric, *task.report_metrics])
    return {m: QUERY_METRICS[m](pred, truth, spacing).view(t, q) for m in names
            if m in QUERY_METRICS and (spacing is not None or m not in NEEDS_SPACING)}


def learner_choices(learner) -> list[dict] | None:
    """What a task-adaptive learner chose for each task of its last ``predict`` (None for other learners)."""
    choice = getattr(learner, "last_choice", None)
    return list(choice) if choice else None


def _choice_fields(choices: Sequence[dict] | None, i: int) -> dict:
    if not choices or i >= len(choices):
        return {}
    c = choices[i]
    return {"choice_space": c.get("space"), "choice_loo_accuracy": (c.get("loo_accuracy") or {}).get(c.get("space")),
            "choice_weights": c.get("weights")}


def score_batch(
    task: Task,
    batch: Episode,
    probs_by_method: Mapping[str, torch.Tensor],
    *,
    first_episode: int = 0,
    episode_stride: int = 1,
    shot: int | None = None,
    threshold: float = 0.5,
    spacing: Sequence[float] | None = None,
    baselines: bool = True,
    choices_by_method: Mapping[str, Sequence[dict] | None] | None = None,
) -> list[dict]:
    """Score every method on the queries of a batch of episodes.

    Args:
        task: the kind of task (decision rule, metric, record fields, baselines).
        batch: T batched episodes of Q queries.
        probs_by_method: each method's probabilities, what `Learner.predict` returns: (T, Q, H, W) foreground
            probabilities or (T, Q, n_way) class probabilities.
        first_episode: the id of the batch's first episode.
        episode_stride: the step between the ids of consecutive episodes of the batch (the world size when
            each rank scores every world-size-th episode; 1 in one process).
        shot: the shots of the episodes (default: read from the batch, `Task.n_shot`).
        threshold: the foreground probability threshold of masks.
        spacing: (row, column) pixel size in mm: adds HD95 to mask records.
        baselines: also score the task's label-only baselines (`Task.baselines`).
        choices_by_method: per method, what a task-adaptive learner chose for each task (its ``last_choice``:
            dicts with ``space`` and ``loo_accuracy``); adds ``choice_space`` and ``choice_loo_accuracy`` (the
            leave-one-out accuracy of the chosen space, None for the K = 1 default) to its records.

    Returns:
        One record per (method, query), method by method, then episode by episode (see the module docstring).
    """
    decisions = {m: task.decide(p, threshold) for m, p in probs_by_method.items()}
    if baselines:
        decisions |= task.baselines(batch)
    shot = task.n_shot(batch) if shot is None else int(shot)
    t, q = batch.query_labels.shape[:2]
    sites = [[query_site(batch, i, j) for j in range(q)] for i in range(t)]
    patients = [[query_patient(batch, i, j) for j in range(q)] for i in range(t)]
    records = []
    for method, decision in decisions.items():
        scores = query_scores(task, decision, batch.query_labels, spacing)
        probs = probs_by_method.get(method)
        probs = None if probs is None else probs.detach().float().cpu()
        for i in range(t):
            for j in range(q):
                records.append({
                    "method": method, "episode": first_episode + i * episode_stride, "shot": shot, "site": sites[i][j],
                    "query_id": batch.query_ids[i][j], "patient": patients[i][j],
                    **{k: float(v[i, j]) for k, v in scores.items()},
                    **task.query_fields(batch, i, j, probs),
                    **_choice_fields((choices_by_method or {}).get(method), i),
                })
    return records
