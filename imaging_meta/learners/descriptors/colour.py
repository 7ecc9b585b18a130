"""Grey and colour items for the learners that read colour (`DescriptorClassifier`, `TaskAdaptiveClassifier`).

A grey image may arrive as three equal channels (``classify`` loads three channels for these learners). A task
whose support is grey is described as grey, exactly as if it had been loaded with one channel (`shared_channels`);
a colour query in it is described in grey, made as the image loader makes grey (`as_grey`), since its classes
were given in grey. Only the support decides, so that a query's answer never depends on whether another query is
in colour (it did: one colour query turned the whole task to colour and moved the others' probabilities by 0.018;
a review). A batch that mixes grey and colour tasks runs each kind on its own (`channel_groups`,
`by_channel_group`), so that a task's answer never depends on the other tasks of its batch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from imaging_meta.episode import Episode, collate_episodes


def equal_channels(images: torch.Tensor, dim: int) -> torch.Tensor:
    """Per item, whether all its channels (along ``dim``) are equal: a bool tensor of the shape before ``dim``."""
    first = images.narrow(dim, 0, 1)
    return (images == first).flatten(dim).all(-1)


def grey_tasks(support: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
    """(T,) bool: whether every (T, S, C, *spatial) support item of a task has equal channels (grey, or grey stored
    as colour). The queries do not decide (module docstring); ``query`` is taken for the callers' symmetry."""
    if support.shape[2] == 1:
        return torch.ones(support.shape[0], dtype=torch.bool, device=support.device)
    return equal_channels(support, 2).all(1)


def channel_groups(support: torch.Tensor, query: torch.Tensor) -> list[torch.Tensor]:
    """The task indices of a batch, in one group when its tasks are all grey or all colour (`grey_tasks`), else in
    two: the grey tasks, then the colour ones. A learner that reads colour runs each group on its own, so that a
    task's answer never depends on the other tasks of its batch."""
    grey = grey_tasks(support, query)
    if bool(grey.all()) or not bool(grey.any()):
        return [torch.arange(support.shape[0])]
    return [torch.nonzero(grey).flatten().cpu(), torch.nonzero(~grey).flatten().cpu()]


def shared_channels(support: torch.Tensor, query: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch's (T, S, C, *spatial) support and (T, Q, C, *spatial) query items with one channel when every task's
    support items have equal channels (grey stored as RGB), else unchanged: what the descriptors describe. A query
    item in colour then becomes grey as the loader makes it (`as_grey`; one in grey keeps its channel exactly).
    Call it on one of `channel_groups` (all grey or all colour tasks)."""
    if support.shape[2] > 1 and bool(grey_tasks(support, query).all()):
        grey = equal_channels(query, 2).view(*query.shape[:2], *([1] * (query.dim() - 2)))
        return support[:, :, :1], torch.where(grey, query[:, :, :1], as_grey(query))
    return support, query


#: the luma weights of R, G and B (ITU-R BT.601), as the image loader makes a grey image of a colour one
LUMA = (0.299, 0.587, 0.114)


def as_grey(items: torch.Tensor) -> torch.Tensor:
    """(T, Q, C, *spatial) colour items -> (T, Q, 1, *spatial): the luma of three channels (the mean of another
    number of channels), stretched over each item's own range to [0, 1], as a grey picture is read (the loader
    scales each image by its own range), so that a colour copy of a grey support image lands next to it: on it
    when the items were not resized, near it otherwise, since resizing narrows the range stretched here (``classify``
    therefore reads such a query as grey itself, at full size: `datamodules.sources.image_folder.load_image_and_shape`
    with ``colour_as_grey``). (A
    checkpoint that reads 8-bit pictures as value / 255, `datamodules.sources.image_folder.NATIVE_RANGE`, does not
    stretch its grey ones: there the copy lands near, not on, them.)"""
    if items.shape[2] == 3:
        w = torch.tensor(LUMA, dtype=items.dtype, device=items.device).view(1, 1, 3, *([1] * (items.dim() - 3)))
        g = (items * w).sum(2, keepdim=True)
    else:
        g = items.mean(2, keepdim=True)
    flat = g.flatten(2)
    lo, hi = flat.min(-1).values, flat.max(-1).values
    span = (hi - lo).view(*g.shape[:2], *([1] * (g.dim() - 2)))
    lo = lo.view_as(span)
    return torch.where(span > 0, (g - lo) / span.clamp(min=1e-12), g)


def to_channels(images: torch.Tensor, channels: int, dim: int = 1) -> torch.Tensor:
    """Items with ``channels`` channels along ``dim``: unchanged if they have them, grey repeated to three channels.

    Raises:
        ValueError: another conversion (colour to grey is the caller's choice: see
            `imaging_meta.learners.descriptors.task_adaptive.TaskAdaptiveClassifier.embedding_episodes`).
    """
    have = images.shape[dim]
    if have == channels:
        return images
    if have == 1 and channels == 3:
        return images.expand(*images.shape[:dim], 3, *images.shape[dim + 1 :]).contiguous()
    raise ValueError(f"cannot give images with {have} channels to a model that takes {channels}")


def by_channel_group(episode: Episode, run: Callable[[Episode], Any]) -> list[tuple[list[int], Any]]:
    """``run`` on each `channel_groups` sub-batch of a batched episode (grey tasks, colour tasks):
    [(task indices, result)]; one group, the episode itself, when its tasks are all alike."""
    groups = channel_groups(episode.support_images, episode.query_images)
    if len(groups) == 1:
        return [(list(range(episode.n_tasks)), run(episode))]
    return [
        (idx.tolist(), run(collate_episodes([episode.task(int(t)) for t in idx]).to(episode.support_images.device)))
        for idx in groups
    ]


def stitch_tasks(parts: Sequence[tuple[list[int], torch.Tensor]]) -> torch.Tensor:
    """The per-group (T_g, ...) results of `by_channel_group` back in task order: (T, ...)."""
    if len(parts) == 1:
        return parts[0][1]
    first = parts[0][1]
    out = first.new_empty((sum(len(i) for i, _ in parts), *first.shape[1:]))
    for idx, value in parts:
        out[idx] = value
    return out


def stitch_records(parts: Sequence[tuple[list[int], list[dict[str, Any]]]]) -> list[dict[str, Any]]:
    """The per-group choice records of `by_channel_group` back in task order."""
    out: dict[int, dict[str, Any]] = {}
    for idx, records in parts:
        out.update(zip(idx, records, strict=True))
    return [out[t] for t in range(len(out))]
