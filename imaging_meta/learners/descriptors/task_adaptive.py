"""`TaskAdaptiveClassifier`: per task, the learned embedding or a fixed descriptor, whichever the support prefers.

A meta-trained embedding can do worse than raw pixels or an intensity histogram on a user's task (a new
modality, a new kind of class). This learner estimates, from the task's labelled support alone, how each
candidate space would do, and classifies the queries in the best one, so that it does about as well as the
best of the obvious baselines on every task.

The rule, per task:

1. Candidate spaces (``spaces``, in order): ``embedding`` (the wrapped learner's `Learner.embed_episode`
   vectors, compared with its own ``distance`` when it has one, else Euclidean), descriptor spaces
   (``pixels``, ``histogram``, ``gradient`` or a ``+`` combination; see
   `imaging_meta.learners.descriptors.features`), and ``fusion``: every other candidate's vectors centred on the
   support mean, L2-normalised and concatenated (each weighted equally).
2. With at least two support items in some class: the leave-one-out accuracy of the nearest class prototype
   over the support (`imaging_meta.learners.descriptors.nearest.leave_one_out_accuracy`; items of a class with
   one item are not held out) scores each candidate. The best wins; on a tie, the earliest in ``spaces``
   (by default the learned embedding first, then pixels, histogram, fusion).
3. With one support item per class (K = 1) nothing can be held out: the ``default`` space (the learned
   embedding) is used.
4. The queries are classified in the chosen space: by the wrapped learner's own `Learner.predict` when it is
   the embedding (for a prototypical network, the nearest prototype in its embedding: exactly its own
   prediction), else by the nearest prototype with probabilities ``softmax(scale * score)``.

The query labels are never read: they are replaced by zeros before anything sees the episode. The choice
depends on the support only (and, for a transductive embedding, on the query images). `choose` returns it
per task, and `predict` keeps the last one in ``last_choice``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import torch
import torch.nn.functional as F

from imaging_meta.episode import Episode
from imaging_meta.learners.base import Learner, SimilarityMeasure, build_learner, classification_batch
from imaging_meta.learners.descriptors.features import (
    concatenate_spaces,
    descriptor_vectors,
    parse_space,
    task_normalise,
)
from imaging_meta.learners.descriptors.nearest import DISTANCES, leave_one_out_accuracy, prototype_logits
from imaging_meta.learners.prototypes import class_onehot, episode_n_way

EMBEDDING, FUSION = "embedding", "fusion"
#: the default candidates, in the order that breaks ties
SPACES = (EMBEDDING, "pixels", "histogram", FUSION)
#: how a task's space was chosen (``rule`` of a `TaskAdaptiveClassifier.choose` record)
LEAVE_ONE_OUT, DEFAULT = "leave-one-out", "default"

#: a space's task vectors: (T, S, D) support, (T, Q, D) query, and the distance that compares them
Space = tuple[torch.Tensor, torch.Tensor, str]


def blind(episode: Episode) -> Episode:
    """The episode with its query labels replaced by zeros (same shape): what cannot be read cannot leak."""
    return replace(episode, query_labels=torch.zeros(episode.query_labels.shape, dtype=torch.long,
                                                     device=episode.query_labels.device))


class TaskAdaptiveClassifier(Learner):
    """Per task, classify in the space (learned embedding, pixels, histogram, fusion) that wins leave-one-out on
    the support; the learned embedding with one shot per class (see the module docstring).

    Meta-training (`loss`) trains the wrapped embedding learner with its own loss; the descriptors have nothing
    to learn. To wrap a trained learner, pass it: ``TaskAdaptiveClassifier(load_learner(ckpt)[0])``
    (`imaging_meta.checkpoint_io.load_learner`). In a config, ``embedding`` is a learner sub-config
    (``class_path``, ``init_args``); `config` always records it that way, so a checkpoint of this learner
    rebuilds it, weights included.

    Args:
        embedding: the embedding learner (a classification `Learner`), or its ``{"class_path", "init_args"}``.
        spaces: the candidates, in tie-break order: ``embedding``, descriptor spaces, ``fusion``.
        default: the space used when no class has two support items (K = 1).
        scale: softmax temperature of the nearest-prototype probabilities in the descriptor and fusion spaces
            (unit vectors: squared distances lie in [0, 4]).
        pixel_size: pixels per axis of the ``pixels`` descriptor.
        bins: bins of the histograms.
    """

    task = "classification"

    def __init__(
        self,
        embedding: Learner | dict[str, Any],
        spaces: Sequence[str] = SPACES,
        default: str = EMBEDDING,
        scale: float = 10.0,
        pixel_size: int = 32,
        bins: int = 32,
    ) -> None:
        super().__init__()
        if isinstance(embedding, dict):
            embedding = build_learner(embedding)
        if not isinstance(embedding, Learner) or embedding.task_kind is not self.task_kind:
            raise ValueError(f"embedding must be a {self.task_kind.name} Learner (or its config), got {embedding!r:.200}")
        self.spaces = tuple(str(s) for s in spaces)
        if not self.spaces or len(set(self.spaces)) != len(self.spaces) or default not in self.spaces:
            raise ValueError(f"spaces must be distinct and name the default {default!r}; got {list(self.spaces)}")
        for s in self.spaces:
            if s not in (EMBEDDING, FUSION):
                parse_space(s)
        if FUSION in self.spaces and len(self.spaces) < 3:
            raise ValueError(f"{FUSION!r} fuses the other candidates: list at least two more, got {list(self.spaces)}")
        if not scale > 0 or pixel_size < 1 or bins < 1:
            raise ValueError(f"scale must be > 0, pixel_size and bins >= 1; got {scale}, {pixel_size}, {bins}")
        self.embedding = embedding
        self.n_way = embedding.n_way
        self.default = default
        self.scale, self.pixel_size, self.bins = float(scale), int(pixel_size), int(bins)
        distance = getattr(embedding, "distance", "euclidean")
        self.embedding_distance = distance if distance in DISTANCES else "euclidean"
        #: the `choose` records of the last `predict` call, one per task
        self.last_choice: list[dict[str, Any]] = []

    @property
    def config(self) -> dict[str, Any]:
        """As `Learner.config`, with the embedding learner recorded as its own config (never as an object)."""
        cfg = super().config
        return {**cfg, "init_args": {**cfg["init_args"], "embedding": self.embedding.config}}

    @property
    def tasks_independent(self) -> bool:  # type: ignore[override]
        return self.embedding.tasks_independent

    # ------------------------------------------------------------------ the spaces and the choice
    def descriptors(self) -> tuple[str, ...]:
        """The descriptors the candidate spaces use, each once, in order."""
        names = [d for s in self.spaces if s not in (EMBEDDING, FUSION) for d in parse_space(s)]
        return tuple(dict.fromkeys(names))

    def task_spaces(self, episode: Episode) -> dict[str, Space]:
        """Every candidate space's vectors of a batched episode (query labels unused)."""
        descriptors = self.descriptors()
        s = descriptor_vectors(episode.support_images, descriptors, self.pixel_size, self.bins)
        q = descriptor_vectors(episode.query_images, descriptors, self.pixel_size, self.bins)
        normed = {d: task_normalise(s[d], q[d]) for d in descriptors}
        emb = None
        if EMBEDDING in self.spaces:
            es, eq = self.embedding.embed_episode(episode)
            emb = (es.float(), eq.float())
        out: dict[str, Space] = {}
        for name in self.spaces:
            if name == EMBEDDING:
                out[name] = (*emb, self.embedding_distance)
            elif name == FUSION:
                parts = ([task_normalise(*emb)] if emb is not None else []) + [normed[d] for d in descriptors]
                out[name] = (*concatenate_spaces(parts), "euclidean")
            else:
                out[name] = (*concatenate_spaces([normed[d] for d in parse_space(name)]), "euclidean")
        return out

    def decide(self, spaces: dict[str, Space], labels: torch.Tensor, n_way: int) -> list[dict[str, Any]]:
        """The choice per task from the spaces' vectors and the support labels (T, S) (see `choose`)."""
        counts = class_onehot(labels, n_way).sum(1)  # (T, N)
        held_out = (counts * (counts >= 2)).sum(1)  # support items that leave-one-out classifies, per task
        accuracy = {name: leave_one_out_accuracy(fs, labels, n_way, dist) for name, (fs, _, dist) in spaces.items()}
        records = []
        for t in range(labels.shape[0]):
            if int(held_out[t]) == 0:
                records.append({"space": self.default, "rule": DEFAULT, "loo_accuracy": dict.fromkeys(self.spaces),
                                "loo_items": 0})
                continue
            acc = {name: float(a[t]) for name, a in accuracy.items()}
            best = max(self.spaces, key=lambda s: (acc[s], -self.spaces.index(s)))  # ties: the earliest
            records.append({"space": best, "rule": LEAVE_ONE_OUT, "loo_accuracy": acc, "loo_items": int(held_out[t])})
        return records

    def choose(self, episode: Episode) -> list[dict[str, Any]]:
        """The space each task of an episode is classified in, and why.

        Returns:
            One record per task: ``space`` (the chosen candidate's name), ``rule`` (``"leave-one-out"``, or
            ``"default"`` when no class has two support items), ``loo_accuracy`` (candidate -> leave-one-out
            accuracy on the support, None under the default) and ``loo_items`` (the support items held out).
        """
        ep = blind(classification_batch(episode, type(self).__name__))
        with torch.no_grad():
            return self.decide(self.task_spaces(ep), ep.support_labels, episode_n_way(ep))

    # ------------------------------------------------------------------ the two duties
    def loss(self, episode: Episode) -> torch.Tensor:
        """The embedding learner's meta-training loss (the descriptors have nothing to learn)."""
        return self.embedding.loss(episode)

    def predict(self, episode: Episode) -> torch.Tensor:
        """Class probabilities (T, N*Q, n_way) of the query items, each task in its chosen space; sets ``last_choice``."""
        ep = blind(classification_batch(episode, type(self).__name__))
        n_way = episode_n_way(ep)
        with torch.no_grad():
            spaces = self.task_spaces(ep)
            records = self.decide(spaces, ep.support_labels, n_way)
        self.last_choice = records
        learned = self.embedding.predict(ep) if any(r["space"] == EMBEDDING for r in records) else None
        out = []
        for t, r in enumerate(records):
            if r["space"] == EMBEDDING:
                out.append(learned[t].float())
                continue
            fs, fq, dist = spaces[r["space"]]
            logits = prototype_logits(fs[t : t + 1], ep.support_labels[t : t + 1], fq[t : t + 1], n_way, dist, self.scale)
            out.append(logits[0].softmax(-1).float())
        return torch.stack(out)

    # ------------------------------------------------------------------ explanations
    def encoder_name(self) -> str | None:
        """The embedding learner's encoder (for `Learner.embed`)."""
        name = self.embedding.encoder_name()
        return None if name is None else f"embedding.{name}"

    @property
    def similarity_measure(self) -> SimilarityMeasure:
        return SimilarityMeasure(
            "task_adaptive_euclidean",
            "Euclidean distance between the query and the support item in the space the task's leave-one-out "
            "choice picked (learned embedding, L2-normalised when it compares by cosine; or task-normalised "
            "descriptors); TaskAdaptiveClassifier.choose names the space",
            "distance",
            False,
        )

    def support_similarity(self, episode: Episode) -> torch.Tensor:
        """(T, Q, S) Euclidean distances in each task's chosen space (see `similarity_measure`)."""
        ep = blind(classification_batch(episode, type(self).__name__))
        spaces = self.task_spaces(ep)
        records = self.decide(spaces, ep.support_labels, episode_n_way(ep))
        out = []
        for t, r in enumerate(records):
            fs, fq, dist = spaces[r["space"]]
            s, q = (F.normalize(fs[t], dim=-1), F.normalize(fq[t], dim=-1)) if dist == "cosine" else (fs[t], fq[t])
            out.append(torch.cdist(q, s))
        return torch.stack(out)


def loo_summary(records: Sequence[dict[str, Any]]) -> str:
    """One line per task of `TaskAdaptiveClassifier.choose` records, e.g. for logs and ``--explain`` text:
    ``task 0: histogram by leave-one-out over 10 support items (embedding 0.600, pixels 0.500, ...)``."""
    lines = []
    for t, r in enumerate(records):
        accs = ", ".join(
            f"{k} {v:.3f}" for k, v in r["loo_accuracy"].items() if v is not None and not math.isnan(v)
        )
        how = f"by leave-one-out over {r['loo_items']} support items ({accs})" if r["rule"] == LEAVE_ONE_OUT else (
            "by default: fewer than two support items in every class")
        lines.append(f"task {t}: {r['space']} {how}")
    return "\n".join(lines)
