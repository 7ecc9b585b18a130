"""`DescriptorClassifier`: few-shot classification on fixed image descriptors, the baseline a learner must beat."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from imaging_meta.episode import Episode
from imaging_meta.learners.base import Learner, SimilarityMeasure, check_support_classes, classification_batch
from imaging_meta.learners.descriptors.colour import by_channel_group, stitch_tasks
from imaging_meta.learners.descriptors.features import (
    concatenate_spaces,
    describe,
    parse_space,
    task_features,
)
from imaging_meta.learners.descriptors.nearest import DISTANCES, prototype_logits
from imaging_meta.learners.prototypes import episode_n_way
from imaging_meta.learners.transfer.logreg import fit_logistic_regression

RULES = ("prototype", "logreg")


class DescriptorClassifier(Learner):
    """Classify queries on fixed descriptors of the images: raw pixels, intensity histogram, or both.

    The descriptors (`imaging_meta.learners.descriptors.features`) are computed per item, centred on the task's
    support mean and L2-normalised per descriptor (``pixels+histogram``: concatenated, each descriptor weighted
    equally). Then either

    * ``rule="prototype"``: the nearest class mean of the support (``distance``: negative squared Euclidean
      distance, or cosine similarity), or
    * ``rule="logreg"``: a multinomial logistic regression with an L2 penalty fit on the support by L-BFGS
      (`imaging_meta.learners.transfer.logreg.fit_logistic_regression`, as ``logreg_cls`` does).

    Nothing about the decision is learned. The one parameter, ``log_scale``, is a softmax temperature that
    multiplies the logits: meta-training (query cross-entropy) calibrates the probabilities and never changes a
    predicted class. It also gives the optimiser of `imaging_meta.module.EpisodicModule` a parameter.

    Args:
        features: ``pixels``, ``histogram``, ``gradient`` or several joined by ``+`` (``pixels+histogram``).
        rule: ``prototype`` or ``logreg``.
        distance: of the ``prototype`` rule: ``euclidean`` or ``cosine``.
        scale: initial temperature; None gives 10 for ``prototype`` (unit vectors: distances lie in [0, 4]) and 1
            for ``logreg``.
        l2: L2 penalty of the logistic regression (scikit-learn's ``C = 1 / l2``).
        max_iter: L-BFGS iterations of the logistic regression.
        pixel_size: pixels per axis of the ``pixels`` descriptor (32: 32 x 32 in 2D).
        bins: bins of the histograms.
    """

    task = "classification"
    #: `imaging_meta.commands.classify.loader_settings` loads colour images in colour for this learner (the
    #: ``pixels`` and ``histogram`` descriptors describe every channel)
    reads_colour = True

    def __init__(
        self,
        features: str = "pixels",
        rule: str = "prototype",
        distance: str = "euclidean",
        scale: float | None = None,
        l2: float = 1.0,
        max_iter: int = 100,
        pixel_size: int = 32,
        bins: int = 32,
    ) -> None:
        super().__init__()
        if rule not in RULES:
            raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
        if distance not in DISTANCES:
            raise ValueError(f"distance must be one of {DISTANCES}, got {distance!r}")
        if scale is None:
            scale = 10.0 if rule == "prototype" else 1.0
        if not scale > 0 or l2 <= 0 or max_iter < 1 or pixel_size < 1 or bins < 1:
            raise ValueError(
                f"scale and l2 must be > 0, max_iter, pixel_size and bins >= 1; got {scale}, {l2}, {max_iter}, "
                f"{pixel_size}, {bins}"
            )
        self.descriptors = parse_space(features)
        self.rule = rule
        self.distance = distance
        self.l2, self.max_iter = float(l2), int(max_iter)
        self.pixel_size, self.bins = int(pixel_size), int(bins)
        self.log_scale = nn.Parameter(torch.tensor(math.log(float(scale))))

    def task_features(self, episode: Episode) -> tuple[torch.Tensor, torch.Tensor]:
        """(T, S, D) support and (T, Q, D) query vectors of a batched episode (task-normalised descriptors)."""
        return task_features(episode.support_images, episode.query_images, self.descriptors, self.pixel_size, self.bins)

    def forward(self, episode: Episode) -> torch.Tensor:
        """Query logits (T, N*Q, n_way) of a (batched) classification episode; query labels are never read. Grey
        and colour tasks of one batch run apart, so that a task's answer never depends on the others."""
        ep = classification_batch(episode, type(self).__name__)
        return stitch_tasks(by_channel_group(ep, self._forward))

    def _forward(self, ep: Episode) -> torch.Tensor:
        fs, fq = self.task_features(ep)
        n_way = episode_n_way(ep)
        if self.rule == "prototype":
            logits = prototype_logits(fs, ep.support_labels, fq, n_way, self.distance)
        else:
            check_support_classes(ep.support_labels, n_way)
            rows = []
            for s, y, q in zip(fs, ep.support_labels, fq, strict=True):
                weight, bias = fit_logistic_regression(s, y, n_way, self.l2, self.max_iter)
                rows.append((q.to(weight.dtype) @ weight.T + bias).to(q.dtype))
            logits = torch.stack(rows)
        return self.log_scale.exp() * logits

    def loss(self, episode: Episode) -> torch.Tensor:
        """Query cross-entropy (trains the temperature only)."""
        ep = classification_batch(episode, type(self).__name__)
        return F.cross_entropy(self.forward(ep).flatten(0, 1), ep.query_labels.flatten().long())

    def predict(self, episode: Episode) -> torch.Tensor:
        """Class probabilities (T, N*Q, n_way) of the query items; rows sum to 1."""
        return self.forward(episode).softmax(-1)

    # ------------------------------------------------------------------ explanations
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """(N, D) the descriptors of items (N, C, *spatial), each L2-normalised, concatenated (not task-centred)."""
        vectors = [F.normalize(describe(images, d, self.pixel_size, self.bins), dim=-1) for d in self.descriptors]
        return concatenate_spaces([(v, v) for v in vectors])[0]

    @property
    def similarity_measure(self) -> SimilarityMeasure:
        """The Euclidean distance of the task-normalised descriptors that the decision uses."""
        return SimilarityMeasure(
            "descriptor_euclidean",
            f"Euclidean distance between the query's and the support item's {'+'.join(self.descriptors)} descriptors, "
            "centred on the task's support mean and L2-normalised (the vectors the classifier compares)",
            "distance",
            False,
        )

    def support_similarity(self, episode: Episode) -> torch.Tensor:
        """(T, Q, S) Euclidean distances of the task-normalised query and support descriptors."""
        fs, fq = self.task_features(episode.unsqueeze())
        return torch.cdist(fq, fs)
