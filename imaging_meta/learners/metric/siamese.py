"""Siamese network for few-shot classification, trained with the contrastive loss on pairs mined per task."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from imaging_meta.backbones import build_encoder
from imaging_meta.episode import Episode
from imaging_meta.learners.base import Learner, SimilarityMeasure, classification_batch, embed_tasks
from imaging_meta.learners.prototypes import class_onehot, episode_n_way

MINING = ("all", "hard")
PREDICT_BY = ("nearest", "mean")
REDUCTIONS = ("none", "mean", "sum")


def contrastive_loss(d: torch.Tensor, y: torch.Tensor, margin: float = 1.0, reduction: str = "mean") -> torch.Tensor:
    """Contrastive loss of Hadsell, Chopra, LeCun ("Dimensionality Reduction by Learning an Invariant
    Mapping", CVPR 2006).

    ``L = (1 - y) * d**2 + y * max(0, margin - d)**2``

    Convention (the paper's): ``y = 0`` for a *similar* pair (same class), pulled together; ``y = 1`` for a
    *dissimilar* pair (different classes), pushed apart until it is ``margin`` away. The paper's factors 1/2
    are left out.

    Args:
        d: (...) Euclidean distances between the two embeddings of each pair (>= 0).
        y: (...) pair labels, 1 dissimilar / 0 similar (bool, int or float), same shape as ``d``.
        margin: distance beyond which a dissimilar pair costs nothing (> 0).
        reduction: ``none`` (per pair, shape of ``d``), ``mean`` or ``sum``.

    Returns:
        The loss, (...) or a scalar.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if not margin > 0:
        raise ValueError(f"margin must be > 0, got {margin}")
    if d.shape != y.shape:
        raise ValueError(f"d and y must have the same shape, got {tuple(d.shape)} and {tuple(y.shape)}")
    y = y.to(d.dtype)
    loss = (1 - y) * d.pow(2) + y * (margin - d).clamp(min=0).pow(2)
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    return loss


def pairwise_distances(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Euclidean distances between the rows of ``a`` (T, M, D) and ``b`` (T, P, D): (T, M, P).

    The square root is taken of the squared distance clamped at ``eps``, so that gradients stay finite for
    coinciding embeddings.
    """
    sq = a.pow(2).sum(-1).unsqueeze(2) + b.pow(2).sum(-1).unsqueeze(1) - 2 * a @ b.transpose(1, 2)
    return sq.clamp(min=eps).sqrt()


class SiameseNetwork(Learner):
    """Siamese network: one shared encoder, trained so that same-class items lie close and others far apart.

    Koch, Zemel, Salakhutdinov. "Siamese Neural Networks for One-shot Image Recognition." ICML Deep Learning
    Workshop 2015; trained with the contrastive loss of Hadsell, Chopra, LeCun. "Dimensionality Reduction
    by Learning an Invariant Mapping." CVPR 2006 (see `contrastive_loss`), in place of Koch's weighted-L1
    logistic verification head.

    Training: every task's support and query items are embedded together, with the support's batch statistics
    (see `imaging_meta.learners.base.embed_tasks`), and paired *within the task* (never across tasks of a
    batch). All same-class pairs are positives. Negatives are all different-class pairs (``mining="all"``) or,
    for each anchor item, the ``n_hard`` different-class items closest to it (``mining="hard"``, hard
    negative mining; selected without gradient through the selection). The loss is the mean contrastive loss
    over the positives plus the mean over the negatives, so that the many negatives do not swamp the few
    positives, averaged over tasks.

    Prediction: each query's distance to a class is its distance to the nearest support item of that class
    (``predict_by="nearest"``, Koch's one-shot rule) or the mean of its distances to the class's support
    items (``predict_by="mean"``); class probabilities are ``softmax(-distance / temperature)``.

    Args:
        backbone: registered backbone name (``conv4``, ``resnet12``), pooled into embedding vectors.
        in_channels: image channels.
        backbone_kwargs: options of the backbone builder, e.g. ``{"width": 32}``; ``"transductive": True``
            normalises with the statistics of support and queries together.
        embedding_dim: size of an optional linear projection after the encoder; None uses the pooled
            features directly.
        margin: contrastive margin; with ``normalize`` distances lie in [0, 2], so use a margin in (0, 2].
        mining: ``all`` or ``hard`` negatives (see above).
        n_hard: hard negatives per anchor with ``mining="hard"`` (at most the anchor's negatives).
        predict_by: ``nearest`` or ``mean`` (see above).
        temperature: softmax temperature of the prediction (> 0).
        normalize: L2-normalise the embeddings (distances then lie in [0, 2]).
    """

    task = "classification"

    def __init__(
        self,
        backbone: str = "conv4",
        in_channels: int = 1,
        backbone_kwargs: dict | None = None,
        embedding_dim: int | None = None,
        margin: float = 1.0,
        mining: str = "hard",
        n_hard: int = 2,
        predict_by: str = "nearest",
        temperature: float = 0.1,
        normalize: bool = True,
    ) -> None:
        super().__init__()
        if mining not in MINING:
            raise ValueError(f"mining must be one of {MINING}, got {mining!r}")
        if predict_by not in PREDICT_BY:
            raise ValueError(f"predict_by must be one of {PREDICT_BY}, got {predict_by!r}")
        if n_hard < 1:
            raise ValueError(f"n_hard must be >= 1, got {n_hard}")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if not margin > 0 or (normalize and margin > 2):
            raise ValueError(
                f"margin must be > 0 (and <= 2 with normalize=True: unit vectors are at most 2 apart), got {margin}"
            )
        self.encoder = build_encoder(backbone, in_channels, **(backbone_kwargs or {}))
        if embedding_dim is not None and embedding_dim < 1:
            raise ValueError(f"embedding_dim must be >= 1 or None, got {embedding_dim}")
        self.projection = nn.Linear(self.encoder.out_features, embedding_dim) if embedding_dim else nn.Identity()
        self.margin = float(margin)
        self.mining = mining
        self.n_hard = int(n_hard)
        self.predict_by = predict_by
        self.temperature = float(temperature)
        self.normalize = bool(normalize)

    def _project(self, features: torch.Tensor) -> torch.Tensor:
        """Encoder features (..., D_enc) -> embeddings (..., D): the projection, then the optional L2 norm."""
        x = self.projection(features)
        return F.normalize(x, dim=-1) if self.normalize else x

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """(N, C, *spatial) items of one task, embedded together -> (N, D) embeddings."""
        return self._project(self.encoder(images))

    def encoder_name(self) -> str:
        """The encoder under the projection (`embed`): what ``SupportFineTune(body='last' | 'all')`` fine-tunes (it
        was refused, "names none", a review)."""
        return "encoder"

    def embed_episode(self, episode: Episode) -> tuple[torch.Tensor, torch.Tensor]:
        """(T, S, D) support and (T, Q, D) query embeddings of an episode (batched or one task, as the base method
        takes), each task embedded alone."""
        episode = episode.unsqueeze()
        s, q = embed_tasks(self.encoder, episode.support_images, episode.query_images)
        return self._project(s), self._project(q)

    def pair_loss(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Balanced contrastive loss over the pairs of each task.

        Args:
            embeddings: (T, M, D) embeddings of the items of each task.
            labels: (T, M) their class indices.

        Returns:
            Scalar: mean over tasks of (mean loss of positive pairs + mean loss of mined negative pairs).
        """
        t, m = labels.shape
        d = pairwise_distances(embeddings, embeddings)  # (T, M, M)
        same = labels.unsqueeze(2) == labels.unsqueeze(1)
        upper = torch.ones(m, m, dtype=torch.bool, device=labels.device).triu(1)
        pos = same & upper
        zero = d.new_zeros(t)
        n_pos = pos.sum((1, 2))
        pos_loss = torch.where(
            n_pos > 0, (contrastive_loss(d, torch.zeros_like(d), self.margin, "none") * pos).sum((1, 2)) / n_pos.clamp(min=1), zero
        )
        if self.mining == "all":
            neg = ~same & upper
            n_neg = neg.sum((1, 2))
            neg_loss = (contrastive_loss(d, torch.ones_like(d), self.margin, "none") * neg).sum((1, 2)) / n_neg.clamp(min=1)
        else:
            if int((~same).sum(2).min()) == 0:
                raise ValueError("every item needs a different-class item in its task: use n_way >= 2")
            # each anchor its own n_hard closest negatives, or all it has (a review: every anchor of the batch was
            # capped at the fewest negatives of any anchor, which differ when a task's classes are uneven)
            k = min(self.n_hard, m - 1)
            masked = d.detach().masked_fill(same, float("inf"))
            idx = masked.topk(k, dim=2, largest=False).indices  # (T, M, k)
            valid = masked.gather(2, idx).isfinite()  # picks beyond the anchor's negatives are same-class: left out
            hard = d.gather(2, idx)
            losses = contrastive_loss(hard, torch.ones_like(hard), self.margin, "none") * valid
            neg_loss = losses.sum((1, 2)) / valid.sum((1, 2))
        return (pos_loss + neg_loss).mean()

    def loss(self, episode: Episode) -> torch.Tensor:
        """Contrastive loss of the pairs mined within each task's support and query items (scalar)."""
        ep = classification_batch(episode, type(self).__name__)
        s, q = self.embed_episode(ep)
        embeddings = torch.cat([s, q], dim=1)
        labels = torch.cat([ep.support_labels, ep.query_labels], dim=1)
        return self.pair_loss(embeddings, labels)

    def class_distances(self, episode: Episode) -> torch.Tensor:
        """(T, N*Q, n_way) distance of each query to each class (nearest or mean support distance)."""
        ep = classification_batch(episode, type(self).__name__)
        s, q = self.embed_episode(ep)
        d = pairwise_distances(q, s)  # (T, Q, S)
        onehot = class_onehot(ep.support_labels, episode_n_way(ep), d.dtype)  # (T, S, N)
        if self.predict_by == "mean":
            return d @ onehot / onehot.sum(1, keepdim=True)
        member = onehot.bool().unsqueeze(1)  # (T, 1, S, N)
        return d.unsqueeze(-1).masked_fill(~member, float("inf")).amin(2)

    def predict(self, episode: Episode) -> torch.Tensor:
        """Class probabilities (T, N*Q, n_way), ``softmax(-distance / temperature)``; rows sum to 1."""
        return (-self.class_distances(episode) / self.temperature).softmax(-1)

    # ------------------------------------------------------------------ explanations
    @property
    def similarity_measure(self) -> SimilarityMeasure:
        """The Euclidean distance of the embeddings, which `predict` reduces per class (``predict_by``)."""
        return SimilarityMeasure(
            "siamese_euclidean",
            "Euclidean distance between the query's and the support item's Siamese embeddings (the prediction "
            f"uses the {self.predict_by} distance per class)",
            "distance",
            False,
        )

    def support_similarity(self, episode: Episode) -> torch.Tensor:
        """(T, Q, S) Euclidean distances between the query and support embeddings (`pairwise_distances`)."""
        s, q = self.embed_episode(episode.unsqueeze())
        return pairwise_distances(q, s)
