"""Prototypical networks for few-shot classification.

The Conv-4 and ResNet-12 encoders use BatchNorm without running statistics, so an item's embedding depends
on the other items in the same forward pass. The metric learners (this file, `imaging_meta.learners.metric.siamese`,
`imaging_meta.learners.metric.matching`) therefore embed each task's support and query *together and per task*
(`Learner.embed_episode`, `imaging_meta.learners.base.embed_tasks`), with the support's batch statistics: a
query's prediction depends on its task's support and on itself only, never on the other queries nor on the
other tasks of a batch. ``backbone_kwargs={"transductive": True}`` normalises with the statistics of the
task's support and queries together instead (transductive batch normalisation, as in MAML's Conv-4
experiments).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from imaging_meta.backbones import build_encoder
from imaging_meta.episode import Episode
from imaging_meta.learners.base import Learner, SimilarityMeasure, classification_batch
from imaging_meta.learners.prototypes import class_onehot, class_prototypes, episode_n_way

DISTANCES = ("euclidean", "cosine")


class PrototypicalNetwork(Learner):
    """Prototypical network: classify a query by its distance to the mean support embedding of each class.

    Snell, Swersky, Zemel. "Prototypical Networks for Few-shot Learning." NeurIPS 2017.

    Each class's prototype is the mean embedding of its support items; a query's logits are its negative
    squared Euclidean distances to the prototypes (``distance="euclidean"``, the paper's choice, a linear
    classifier in the embedding), or scaled cosine similarities (``distance="cosine"``). The loss is the
    cross-entropy of the query items. Prototypes are means, so the support order does not matter.

    Each task's support and query are embedded together, with the support's batch statistics (see
    `Learner.embed_episode`), so a prediction depends neither on the other queries nor on the other tasks.

    Args:
        backbone: registered backbone name (``conv4``, ``resnet12``), pooled into embedding vectors.
        in_channels: image channels.
        backbone_kwargs: options of the backbone builder, e.g. ``{"width": 32}``; ``"transductive": True``
            normalises with the statistics of support and queries together (see the module docstring).
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
        s, q = self.embed_episode(ep)
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

    # ------------------------------------------------------------------ explanations
    def encoder_name(self) -> str:
        """The encoder whose embeddings the prototypes average (`embed`)."""
        return "encoder"

    @property
    def similarity_measure(self) -> SimilarityMeasure:
        """The Euclidean distance or the cosine similarity of the embeddings, as ``distance`` says."""
        if self.distance == "cosine":
            return SimilarityMeasure(
                "protonet_cosine",
                "cosine similarity between the query's and the support item's ProtoNet embeddings (the prediction "
                "compares the query with the class means of these)",
                "similarity",
                True,
            )
        return SimilarityMeasure(
            "protonet_euclidean",
            "Euclidean distance between the query's and the support item's ProtoNet embeddings (the prediction "
            "compares the query with the class means of these)",
            "distance",
            False,
        )

    def support_similarity(self, episode: Episode) -> torch.Tensor:
        """(T, Q, S) Euclidean distances or cosine similarities of the query and support embeddings."""
        if self.distance != "cosine":
            return super().support_similarity(episode)
        s, q = self.embed_episode(episode)
        return torch.stack([F.normalize(qt, dim=-1) @ F.normalize(st, dim=-1).T for st, qt in zip(s, q, strict=True)])
