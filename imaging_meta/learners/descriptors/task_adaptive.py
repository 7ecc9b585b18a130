"""`TaskAdaptiveClassifier`: per task, a weighting of the learned embedding and fixed descriptors that the support
prefers (or the one space it prefers).

A meta-trained embedding can do worse than raw pixels or an intensity histogram on a user's task (a new
modality, a new kind of class). This learner estimates, from the task's labelled support alone, how each
candidate space would do, and classifies the queries in the best one, so that it does about as well as the
best of the obvious baselines on every task.

The default rule, ``rule="weighted"``, per task: every candidate space except ``fusion`` is task-normalised, and
the queries go to the nearest class prototype under a weighted sum of the spaces' squared distances, the
weights fitted on the support by leave-one-out with a prior toward equal weights
(`imaging_meta.learners.descriptors.weighting`). With one shot per class nothing can be held out and the
weights stay equal: the ``fusion`` space's answers (at the softer `weighting.ONE_SHOT_SCALE`), the documented
one-shot default of this rule. On the real 2D
sets of ``benchmarks/real/`` a hard choice among leave-one-out accuracies of 2-10 support items was noisier
than the weighting (docs/classification.md).

The other rule, ``rule="select"``, per task:

1. Candidate spaces (``spaces``, in order): ``embedding`` (the wrapped learner's `Learner.embed_episode`
   vectors, compared with its own ``distance`` when it has one, else Euclidean), descriptor spaces
   (``pixels``, ``histogram``, ``gradient``, ``orientation`` or a ``+`` combination; see
   `imaging_meta.learners.descriptors.features`), and ``fusion``: every other candidate's vectors centred on the
   support mean, L2-normalised and concatenated (each weighted equally).
2. With at least two support items in some class: the leave-one-out accuracy of the nearest class prototype
   over the support (`imaging_meta.learners.descriptors.nearest.leave_one_out_accuracy`; items of a class with
   one item are not held out) scores each candidate. The best wins; on a tie, the earliest in ``spaces``
   (by default the learned embedding first, then pixels, histogram, gradient, orientation, fusion).
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
from imaging_meta.learners.base import (
    Learner,
    SimilarityMeasure,
    WrappingLearner,
    classification_batch,
)
from imaging_meta.learners.descriptors.colour import (
    by_channel_group,
    shared_channels,
    stitch_records,
    stitch_tasks,
    to_channels,
)
from imaging_meta.learners.descriptors.features import (
    concatenate_spaces,
    descriptor_vectors,
    parse_space,
    task_normalise,
)
from imaging_meta.learners.descriptors.nearest import DISTANCES, leave_one_out_accuracy, prototype_logits
from imaging_meta.learners.descriptors.weighting import (
    PRIOR,
    fit_weights,
    loo_distances,
    query_distances,
    weighted_logits,
)
from imaging_meta.learners.prototypes import class_onehot, episode_n_way

EMBEDDING, FUSION = "embedding", "fusion"
#: the default candidates, in the order that breaks ties
SPACES = (EMBEDDING, "pixels", "histogram", "gradient", "orientation", FUSION)
#: how a task's space was chosen (``rule`` of a `TaskAdaptiveClassifier.choose` record)
LEAVE_ONE_OUT, WEIGHTED_LOO, DEFAULT = "leave-one-out", "weighted leave-one-out", "default"
#: the two rules: a weighting of the spaces fitted on the support (default), or the one best space
WEIGHTED, SELECT = "weighted", "select"

#: a space's task vectors: (T, S, D) support, (T, Q, D) query, and the distance that compares them
Space = tuple[torch.Tensor, torch.Tensor, str]


def blind(episode: Episode) -> Episode:
    """The episode with its query labels replaced by zeros (same shape): what cannot be read cannot leak."""
    return replace(
        episode,
        query_labels=torch.zeros(
            episode.query_labels.shape, dtype=torch.long, device=episode.query_labels.device
        ),
    )


def mark_colour(records: list[dict[str, Any]], episode: Episode) -> list[dict[str, Any]]:
    """The choice records of an all-grey or all-colour batch (`colour.by_channel_group`), each with ``colour``:
    whether its task was described in colour."""
    colour = shared_channels(episode.support_images, episode.query_images)[0].shape[2] > 1
    for r in records:
        r["colour"] = colour
    return records


def input_channels(learner: torch.nn.Module) -> int | None:
    """The image channels ``learner`` takes: its ``in_channels`` argument, else its first convolution's; None
    for a learner without either (descriptors only)."""
    config = getattr(learner, "config", None)
    declared = config.get("init_args", {}).get("in_channels") if isinstance(config, dict) else None
    if declared is not None:
        return int(declared)
    for m in learner.modules():
        if isinstance(m, (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)):
            return int(m.in_channels)
    return None


class TaskAdaptiveClassifier(WrappingLearner):
    """Per task, classify under a weighting of the spaces (learned embedding, descriptors) fitted by leave-one-out
    on the support, equal weights with one shot per class (``rule="weighted"``, the default), or in the one space
    that wins leave-one-out, the learned embedding with one shot (``rule="select"``; see the module docstring).

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
        rule: ``weighted`` (a per-task weighting of the spaces, the default) or ``select`` (the one best space).
        prior: the weighting's pull toward equal weights, in held-out support items.
    """

    task = "classification"
    #: `imaging_meta.commands.classify.loader_settings` loads colour images in colour for this learner: the
    #: descriptors describe every channel, and a grey-trained embedding each channel (`embedding_episodes`)
    reads_colour = True

    def __init__(
        self,
        embedding: Learner | dict[str, Any],
        spaces: Sequence[str] = SPACES,
        default: str = EMBEDDING,
        scale: float = 10.0,
        pixel_size: int = 32,
        bins: int = 32,
        rule: str = WEIGHTED,
        prior: float = PRIOR,
    ) -> None:
        super().__init__()
        embedding = self.wrap(embedding)
        self.spaces = tuple(str(s) for s in spaces)
        if not self.spaces or len(set(self.spaces)) != len(self.spaces) or default not in self.spaces:
            raise ValueError(
                f"spaces must be distinct and name the default {default!r}; got {list(self.spaces)}"
            )
        for s in self.spaces:
            if s not in (EMBEDDING, FUSION):
                parse_space(s)
        if FUSION in self.spaces and len(self.spaces) < 3:
            raise ValueError(
                f"{FUSION!r} fuses the other candidates: list at least two more, got {list(self.spaces)}"
            )
        if not scale > 0 or pixel_size < 1 or bins < 1:
            raise ValueError(
                f"scale must be > 0, pixel_size and bins >= 1; got {scale}, {pixel_size}, {bins}"
            )
        if rule not in (WEIGHTED, SELECT) or not prior > 0:
            raise ValueError(f"rule must be {WEIGHTED!r} or {SELECT!r} and prior > 0; got {rule!r}, {prior}")
        if rule == WEIGHTED and not [x for x in self.spaces if x != FUSION]:
            raise ValueError(f"the weighted rule needs at least one space besides {FUSION!r}")
        self.rule, self.prior = rule, float(prior)
        self.n_way = embedding.n_way
        self.default = default
        self.scale, self.pixel_size, self.bins = float(scale), int(pixel_size), int(bins)
        distance = getattr(embedding, "distance", "euclidean")
        self.embedding_distance = distance if distance in DISTANCES else "euclidean"
        #: the `choose` records of the last `predict` call, one per task
        self.last_choice: list[dict[str, Any]] = []



    # ------------------------------------------------------------------ the spaces and the choice
    def embedding_episodes(self, episode: Episode) -> list[Episode]:
        """The episodes in which the embedding describes a task's items, whose vectors are concatenated.

        One episode, with the items in the channels the embedding takes (grey stored as three equal channels is
        grey: `colour.shared_channels`; grey given to a colour embedding is repeated). For colour items and an
        embedding that takes one channel (trained on grey images), one episode per colour channel, each channel
        a grey image: the concatenation keeps what tells the channels apart (a stain's colour), which the luma of
        the image would blur.
        """
        s, q = shared_channels(episode.support_images, episode.query_images)
        want, have = input_channels(self.embedding), s.shape[2]
        if want is None or want == have:
            return [replace(episode, support_images=s, query_images=q)]
        if want == 1:
            return [replace(episode, support_images=s[:, :, c : c + 1], query_images=q[:, :, c : c + 1]) for c in range(have)]
        return [replace(episode, support_images=to_channels(s, want, 2), query_images=to_channels(q, want, 2))]

    def descriptors(self) -> tuple[str, ...]:
        """The descriptors the candidate spaces use, each once, in order."""
        names = [d for s in self.spaces if s not in (EMBEDDING, FUSION) for d in parse_space(s)]
        return tuple(dict.fromkeys(names))

    def task_spaces(self, episode: Episode) -> dict[str, Space]:
        """Every candidate space's vectors of a batched episode (query labels unused)."""
        descriptors = self.descriptors()
        s_images, q_images = shared_channels(episode.support_images, episode.query_images)
        s = descriptor_vectors(s_images, descriptors, self.pixel_size, self.bins)
        q = descriptor_vectors(q_images, descriptors, self.pixel_size, self.bins)
        normed = {d: task_normalise(s[d], q[d]) for d in descriptors}
        emb: tuple[torch.Tensor, torch.Tensor] | None = None
        embedding_distance = self.embedding_distance
        if EMBEDDING in self.spaces:
            vectors = [self.embedding.embed_episode(ep) for ep in self.embedding_episodes(episode)]
            if len(vectors) == 1:
                emb = (vectors[0][0].float(), vectors[0][1].float())
            else:  # one view per colour channel: each task-normalised, concatenated to unit vectors
                emb = concatenate_spaces([task_normalise(v[0].float(), v[1].float()) for v in vectors])
                embedding_distance = "euclidean"
        out: dict[str, Space] = {}
        for name in self.spaces:
            if name == EMBEDDING:
                assert emb is not None  # computed above when EMBEDDING is a space
                out[name] = (*emb, embedding_distance)
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
        accuracy = {
            name: leave_one_out_accuracy(fs, labels, n_way, dist) for name, (fs, _, dist) in spaces.items()
        }
        records = []
        for t in range(labels.shape[0]):
            if int(held_out[t]) == 0:
                records.append(
                    {
                        "space": self.default,
                        "rule": DEFAULT,
                        "loo_accuracy": dict.fromkeys(self.spaces),
                        "loo_items": 0,
                    }
                )
                continue
            acc = {name: float(a[t]) for name, a in accuracy.items()}
            best = max(self.spaces, key=lambda s: (acc[s], -self.spaces.index(s)))  # ties: the earliest
            records.append(
                {"space": best, "rule": LEAVE_ONE_OUT, "loo_accuracy": acc, "loo_items": int(held_out[t])}
            )
        return records

    def base_spaces(self, spaces: dict[str, Space]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """The weighted rule's spaces: every candidate but ``fusion``, task-normalised (the descriptor spaces already are)."""
        out = {}
        for name, (fs, fq, _) in spaces.items():
            if name == EMBEDDING:
                out[name] = task_normalise(fs, fq)
            elif name != FUSION:
                out[name] = (fs, fq)
        return out

    def fit(
        self, spaces: dict[str, Space], labels: torch.Tensor, n_way: int
    ) -> tuple[list[dict[str, Any]], torch.Tensor]:
        """The weighted rule: one record per task (see `choose`) and the query logits (T, Q, n_way)."""
        base = self.base_spaces(spaces)
        loo, usable = zip(*(loo_distances(fs, labels, n_way) for fs, _ in base.values()), strict=True)
        beta = fit_weights(loo, labels, usable[0], self.prior)
        weights = beta / beta.sum(-1, keepdim=True)
        distances = torch.stack([query_distances(fs, labels, fq, n_way) for fs, fq in base.values()], 1)
        logits = weighted_logits(distances, beta)
        loo_correct = weighted_logits(torch.stack(loo, 1), beta).argmax(-1) == labels
        single = {name: leave_one_out_accuracy(fs, labels, n_way) for name, (fs, _) in base.items()}
        records = []
        for t in range(labels.shape[0]):
            n = int(usable[0][t].sum())
            acc = {name: (float(a[t]) if n else None) for name, a in single.items()}
            acc[WEIGHTED] = float(loo_correct[t][usable[0][t]].float().mean()) if n else None
            records.append(
                {
                    "space": WEIGHTED if n else FUSION,
                    "rule": WEIGHTED_LOO if n else DEFAULT,
                    "weights": {name: round(float(w), 4) for name, w in zip(base, weights[t], strict=True)},
                    "loo_accuracy": acc,
                    "loo_items": n,
                }
            )
        return records, logits

    def choose(self, episode: Episode) -> list[dict[str, Any]]:
        """The space each task of an episode is classified in, and why.

        Returns:
            One record per task: ``space`` (``"weighted"``, ``"fusion"`` or the chosen candidate's name),
            ``rule`` (``"weighted leave-one-out"`` under the default rule, ``"leave-one-out"`` under ``select``,
            or ``"default"`` when no class has two support items), ``weights`` (the weighted rule's share of
            each space), ``loo_accuracy`` (candidate, and ``"weighted"``, -> leave-one-out accuracy on the
            support, None under the default), ``loo_items`` (the support items held out) and ``colour`` (whether
            the task was described in colour).
        """
        ep = blind(classification_batch(episode, type(self).__name__))
        return stitch_records(by_channel_group(ep, self._choose))

    def _choose(self, ep: Episode) -> list[dict[str, Any]]:
        with torch.no_grad():
            spaces = self.task_spaces(ep)
            if self.rule == WEIGHTED:
                return mark_colour(self.fit(spaces, ep.support_labels, episode_n_way(ep))[0], ep)
            return mark_colour(self.decide(spaces, ep.support_labels, episode_n_way(ep)), ep)

    # ------------------------------------------------------------------ the two duties
    def loss(self, episode: Episode) -> torch.Tensor:
        """The embedding learner's meta-training loss (the descriptors have nothing to learn)."""
        return self.embedding.loss(episode)

    def predict(self, episode: Episode) -> torch.Tensor:
        """Class probabilities (T, N*Q, n_way) of the query items, each task in its chosen space; sets ``last_choice``.

        Grey and colour tasks of one batch run apart (`by_channel_group`): a task's answer never depends on the
        others."""
        ep = blind(classification_batch(episode, type(self).__name__))
        parts = by_channel_group(ep, self._predict)
        self.last_choice = stitch_records([(idx, records) for idx, (_, records) in parts])
        return stitch_tasks([(idx, probs) for idx, (probs, _) in parts])

    def _predict(self, ep: Episode) -> tuple[torch.Tensor, list[dict[str, Any]]]:
        n_way = episode_n_way(ep)
        with torch.no_grad():
            spaces = self.task_spaces(ep)
            if self.rule == WEIGHTED:
                records, logits = self.fit(spaces, ep.support_labels, n_way)
                return logits.softmax(-1).float(), mark_colour(records, ep)
            records = mark_colour(self.decide(spaces, ep.support_labels, n_way), ep)
        views = self.embedding_episodes(ep)
        own = len(views) == 1  # the embedding's own prediction; per colour channel: the nearest prototype below
        learned = self.embedding.predict(views[0]) if own and any(r["space"] == EMBEDDING for r in records) else None
        out = []
        for t, r in enumerate(records):
            if r["space"] == EMBEDDING and own:
                assert learned is not None  # predicted above when a task chose EMBEDDING
                out.append(learned[t].float())
                continue
            fs, fq, dist = spaces[r["space"]]
            logits = prototype_logits(
                fs[t : t + 1], ep.support_labels[t : t + 1], fq[t : t + 1], n_way, dist, self.scale
            )
            out.append(logits[0].softmax(-1).float())
        return torch.stack(out), records

    # ------------------------------------------------------------------ explanations

    @property
    def similarity_measure(self) -> SimilarityMeasure:
        return SimilarityMeasure(
            "task_adaptive_euclidean",
            "Euclidean distance between the query and the support item in the space the task's leave-one-out "
            "fit picked: the task-normalised spaces (learned embedding, descriptors) weighted as fitted "
            "(rule 'weighted'), or the one chosen space (rule 'select'); TaskAdaptiveClassifier.choose says which",
            "distance",
            False,
        )

    def support_similarity(self, episode: Episode) -> torch.Tensor:
        """(T, Q, S) Euclidean distances in each task's chosen space (see `similarity_measure`)."""
        ep = blind(classification_batch(episode, type(self).__name__))
        return stitch_tasks(by_channel_group(ep, self._support_similarity))

    def _support_similarity(self, ep: Episode) -> torch.Tensor:
        spaces = self.task_spaces(ep)
        if self.rule == WEIGHTED:
            records = self.fit(spaces, ep.support_labels, episode_n_way(ep))[0]
            base = self.base_spaces(spaces)
            return torch.stack(
                [
                    sum(
                        r["weights"][name] * torch.cdist(fq[t], fs[t]).pow(2)
                        for name, (fs, fq) in base.items()
                    ).sqrt()
                    for t, r in enumerate(records)
                ]
            )
        records = self.decide(spaces, ep.support_labels, episode_n_way(ep))
        out = []
        for t, r in enumerate(records):
            fs, fq, dist = spaces[r["space"]]
            s, q = (
                (F.normalize(fs[t], dim=-1), F.normalize(fq[t], dim=-1))
                if dist == "cosine"
                else (fs[t], fq[t])
            )
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
        weights = ", ".join(f"{k} {v:.2f}" for k, v in (r.get("weights") or {}).items())
        if r["rule"] == LEAVE_ONE_OUT:
            how = f"by leave-one-out over {r['loo_items']} support items ({accs})"
        elif r["rule"] == WEIGHTED_LOO:
            how = (f"weights {weights} fitted by leave-one-out over {r['loo_items']} support items ({accs}; "
                   f"'{WEIGHTED}' is scored on the items its weights were fitted to, so it is optimistic)")
        else:
            how = "by default: fewer than two support items in every class" + (
                f" (weights {weights})" if weights else ""
            )
        lines.append(f"task {t}: {r['space']} {how}" + (" (in colour)" if r.get("colour") else ""))
    return "\n".join(lines)
