"""Prototypical networks for few-shot classification, and the per-task embedding the metric learners share.

The Conv-4 and ResNet-12 encoders use BatchNorm without running statistics, so an item's embedding depends
on the other items in the same forward pass. The metric learners (this file, `imaging_meta.learners.siamese`,
`imaging_meta.learners.matching`) therefore embed each task's support and query *together and per task*
(`embed_tasks`): a task's predictions never depend on the other tasks of a batch, and the batch statistics
are those of the task (transductive batch normalisation, as in MAML's Conv-4 experiments).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from imaging_meta.backbones import build_encoder
from imaging_meta.episode import Episode
from imaging_meta.learners.base import Learner

DISTANCES = ("euclidean", "cosine")


def classification_batch(episode: Episode, learner: str) -> Episode:
    """The episode as a batched classification episode, with its label shapes checked.

    Args:
        episode: batched or unbatched classification episode.
        learner: the calling learner's name, for error messages.

    Returns:
        A batched `Episode`: images (T, N*K, C, *spatial) / (T, N*Q, C, *spatial), labels (T, N*K) / (T, N*Q).
    """
    ep = episode.unsqueeze()
    for name in ("support", "query"):
        images, labels = getattr(ep, f"{name}_images"), getattr(ep, f"{name}_labels")
        if labels.dim() != 2 or images.dim() < 4 or tuple(images.shape[:2]) != tuple(labels.shape):
            raise ValueError(
                f"{learner} is a classification learner: {name}_labels must be (T, n_items) class indices matching "
                f"{name}_images (T, n_items, C, *spatial); got labels {tuple(labels.shape)}, images "
                f"{tuple(images.shape)}. Use a classification datamodule (segmentation episodes carry masks)."
            )
    return ep


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
    """One-hot support labels, checking that every class has a support item.

    Args:
        labels: (T, S) class indices in ``[0, n_way)``.
        n_way: number of classes.
        dtype: floating type of the result.

    Returns:
        (T, S, n_way) one-hot matrix.
    """
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= n_way):
        raise ValueError(
            f"support labels must lie in [0, {n_way}) (n_way from episode.classes), got "
            f"[{int(labels.min())}, {int(labels.max())}]; relabel classes per episode as 0..n_way-1"
        )
    onehot = F.one_hot(labels.long(), n_way).to(dtype)
    if bool((onehot.sum(1) == 0).any()):
        raise ValueError(f"every one of the {n_way} classes needs at least one support item (n_shot >= 1)")
    return onehot


def embed_tasks(encoder: nn.Module, support: torch.Tensor, query: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Embed each task's support and query in one forward pass per task.

    BatchNorm without running statistics then normalises with the task's own statistics, so no task of a
    batch influences another.

    Args:
        encoder: maps (N, C, *spatial) to (N, D).
        support: (T, S, C, *spatial) support images.
        query: (T, Q, C, *spatial) query images.

    Returns:
        (T, S, D) support and (T, Q, D) query embeddings.
    """
    n_support = support.shape[1]
    out = torch.stack([encoder(torch.cat([s, q])) for s, q in zip(support, query, strict=True)])
    return out[:, :n_support], out[:, n_support:]


def class_prototypes(embeddings: torch.Tensor, onehot: torch.Tensor) -> torch.Tensor:
    """Mean support embedding of each class.

    Args:
        embeddings: (T, S, D) support embeddings.
        onehot: (T, S, N) one-hot support labels (every class present).

    Returns:
        (T, N, D) prototypes.
    """
    return onehot.transpose(1, 2) @ embeddings / onehot.sum(1).unsqueeze(-1)


class PrototypicalNetwork(Learner):
    """Prototypical network: classify a query by its distance to the mean support embedding of each class.

    Snell, Swersky, Zemel. "Prototypical Networks for Few-shot Learning." NeurIPS 2017.

    Each class's prototype is the mean embedding of its support items; a query's logits are its negative
    squared Euclidean distances to the prototypes (``distance="euclidean"``, the paper's choice, a linear
    classifier in the embedding), or scaled cosine similarities (``distance="cosine"``). The loss is the
    cross-entropy of the query items. Prototypes are means, so the support order does not matter.

    Each task's support and query are embedded together (see `embed_tasks`), so predictions never depend on
    the other tasks of a batch.

    Args:
        backbone: registered backbone name (``conv4``, ``resnet12``), pooled into embedding vectors.
        in_channels: image channels.
        backbone_kwargs: options of the backbone builder, e.g. ``{"width": 32}``.
        distance: ``euclidean`` (logits = -squared distance) or ``cosine`` (logits = scale * cosine).
        scale: multiplies the logits; None gives 1 for ``euclidean`` and 10 for ``cosine`` (cosines lie in
            [-1, 1], too flat for a softmax unscaled).
        learn_scale: learn the scale (kept positive through its logarithm), as in TADAM's metric scaling
            (Oreshkin, Rodríguez, Lacoste, NeurIPS 2018).
    """

    task = "classification"

    def __init__(
        self,
        backbone: str = "conv4",
        in_channels: int = 1,
        backbone_kwargs: dict | None = None,
        distance: str = "euclidean",
        scale: float | None = None,
        learn_scale: bool = False,
    ) -> None:
        super().__init__()
        if distance not in DISTANCES:
            raise ValueError(f"distance must be one of {DISTANCES}, got {distance!r}")
        if scale is None:
            scale = 1.0 if distance == "euclidean" else 10.0
        if not scale > 0:
            raise ValueError(f"scale must be > 0, got {scale}")
        self.distance = distance
        self.encoder = build_encoder(backbone, in_channels, **(backbone_kwargs or {}))
        log_scale = torch.tensor(math.log(float(scale)))
        if learn_scale:
            self.log_scale = nn.Parameter(log_scale)
        else:
            self.register_buffer("log_scale", log_scale, persistent=False)

    def logits(self, query: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
        """Query logits against the prototypes.

        Args:
            query: (T, Q, D) query embeddings.
            prototypes: (T, N, D).

        Returns:
            (T, Q, N) logits: ``-scale * squared distance`` or ``scale * cosine``.
        """
        if self.distance == "euclidean":
            sim = -(query.unsqueeze(2) - prototypes.unsqueeze(1)).pow(2).sum(-1)
        else:
            sim = F.normalize(query, dim=-1) @ F.normalize(prototypes, dim=-1).transpose(1, 2)
        return self.log_scale.exp() * sim

    def forward(self, episode: Episode) -> torch.Tensor:
        """Query logits (T, N*Q, n_way) of a batched classification episode (support images (T, N*K, C, *spatial))."""
        ep = classification_batch(episode, type(self).__name__)
        s, q = embed_tasks(self.encoder, ep.support_images, ep.query_images)
        onehot = class_onehot(ep.support_labels, episode_n_way(ep), s.dtype)
        return self.logits(q, class_prototypes(s, onehot))

    def loss(self, episode: Episode) -> torch.Tensor:
        """Query cross-entropy, mean over the query items of all tasks (equal counts: the mean over tasks)."""
        ep = classification_batch(episode, type(self).__name__)
        logits = self.forward(ep)
        return F.cross_entropy(logits.flatten(0, 1), ep.query_labels.flatten().long())

    def predict(self, episode: Episode) -> torch.Tensor:
        """Class probabilities (T, N*Q, n_way) of the query items; rows sum to 1."""
        return self.forward(episode).softmax(-1)
