"""`Episode`: one few-shot task (support set and query set), or a stack of them.

Shapes, for a single episode (``batched=False``):
    support_images: (n_support, C, H, W)
    support_labels: segmentation (n_support, H, W) binary masks; classification (n_support,) class indices
    query_images:   (n_query, C, H, W)
    query_labels:   like ``support_labels`` with n_query

A stacked batch of ``T`` episodes (what the DataLoader yields) adds a leading task dimension to every
tensor, and each metadata field becomes a list of length ``T``. Learners never slice a flat batch by
position: they receive these named fields.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any

import torch


@dataclass
class Episode:
    """A few-shot task. See the module docstring for shapes.

    Attributes:
        support_images: support inputs.
        support_labels: support masks (segmentation) or class indices in ``[0, n_way)`` (classification).
        query_images: query inputs.
        query_labels: query targets, same convention as ``support_labels``.
        classes: the task's class or structure names, ``classes[i]`` is label ``i`` (segmentation: the
            single foreground structure).
        site: site key of the query (or of the whole task when one site is used).
        support_ids: pseudonymous case ids of the support items.
        query_ids: pseudonymous case ids of the query items.
        meta: anything else the data side wants to pass along (slice positions, seeds).
        batched: True when every tensor has a leading task dimension.
    """

    support_images: torch.Tensor
    support_labels: torch.Tensor
    query_images: torch.Tensor
    query_labels: torch.Tensor
    classes: Any = field(default_factory=list)
    site: Any = ""
    support_ids: Any = field(default_factory=list)
    query_ids: Any = field(default_factory=list)
    meta: Any = field(default_factory=dict)
    batched: bool = False

    TENSOR_FIELDS = ("support_images", "support_labels", "query_images", "query_labels")

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Episode:
        """A copy with every tensor moved to ``device``."""
        moved = {k: getattr(self, k).to(device, non_blocking=non_blocking) for k in self.TENSOR_FIELDS}
        return replace(self, **moved)

    def pin_memory(self) -> Episode:
        """A copy with every tensor in pinned memory (the DataLoader calls this when ``pin_memory=True``)."""
        return replace(self, **{k: getattr(self, k).pin_memory() for k in self.TENSOR_FIELDS})

    @property
    def n_tasks(self) -> int:
        return int(self.support_images.shape[0]) if self.batched else 1

    def task(self, t: int) -> Episode:
        """Task ``t`` of a batched episode, as an unbatched ``Episode``."""
        if not self.batched:
            if t != 0:
                raise IndexError(f"an unbatched episode has one task, asked for task {t}")
            return self
        kw = {k: getattr(self, k)[t] for k in self.TENSOR_FIELDS}
        n = self.n_tasks

        def pick(value):  # per-task lists are indexed; metadata shared by every task is kept as it is
            return value[t] if isinstance(value, list) and len(value) == n else value

        meta = {k: pick(getattr(self, k)) for k in ("classes", "site", "support_ids", "query_ids", "meta")}
        return Episode(**kw, **meta, batched=False)

    def tasks(self) -> list[Episode]:
        return [self.task(t) for t in range(self.n_tasks)]

    def unsqueeze(self) -> Episode:
        """A batched episode of one task."""
        if self.batched:
            return self
        return collate_episodes([self])


def collate_episodes(episodes: Sequence[Episode]) -> Episode:
    """Stack unbatched episodes into one batched `Episode` with a leading task dimension.

    Args:
        episodes: unbatched episodes of identical tensor shapes (same n_way, n_shot, n_query, image size).

    Returns:
        A batched `Episode`; tensors are (T, ...), metadata fields are lists of length T.

    Raises:
        ValueError: if the episodes are already batched or their shapes differ.
    """
    if not episodes:
        raise ValueError("collate_episodes needs at least one episode")
    if any(e.batched for e in episodes):
        raise ValueError("collate_episodes takes unbatched episodes; got a batched one")
    stacked = {}
    for k in Episode.TENSOR_FIELDS:
        shapes = {tuple(getattr(e, k).shape) for e in episodes}
        if len(shapes) != 1:
            raise ValueError(
                f"cannot stack episodes whose {k} shapes differ: {sorted(shapes)}; use the same n_shot, "
                "n_query and spatial size for every episode of a batch"
            )
        stacked[k] = torch.stack([getattr(e, k) for e in episodes])
    meta: dict[str, Any] = {f.name: [getattr(e, f.name) for e in episodes] for f in fields(Episode) if f.name not in Episode.TENSOR_FIELDS and f.name != "batched"}
    return Episode(**stacked, **meta, batched=True)
