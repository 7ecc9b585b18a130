"""Thirteen one-shot alternatives to the task-adaptive classifier's equal weights, measured and not kept.

    python -m benchmarks.one_shot_weighting --checkpoint results/runs/protonet_cls/version_0/checkpoints/best.ckpt

With one support image per class, `TaskAdaptiveClassifier` cannot hold an item out, so it weights its spaces
equally (docs/classification.md). These were measured with the three-space default of 2026-12-05 (embedding,
pixels, histogram); since 2026-12-06 the default also weighs two texture descriptors, and a rerun compares
against that. This script measures, on the same seeded 1-shot episodes of every real set
(`benchmarks.real_classification`), the default against:

* ``aug<prior>``: weights fitted, as at K >= 2 (`weighting.fit_weights`), on ``--copies`` augmented views of each
  support image (`support_finetune.augment_views`) taken as pseudo-queries of known class, scored against the
  unaugmented support; the prior counts support images, not views;
* ``shift<prior>``: the same with translations only (``--shift``, a fraction of the size): how far a space's
  neighbours stay its neighbours when the picture moves a little;
* ``px<size>``: the default with a coarser pixel descriptor inside the weighting;
* ``trans<rounds>``: weights fitted on the task's queries, labelled by the weighted rule's own prediction
  (transductive self-training; never the queries' labels);
* ``emb<share>``: fixed weights, the embedding's share of the sum ``share`` and the descriptors' the rest in equal
  parts (the default: an equal share each, 1/3 of three spaces until 2026-12-06, 1/5 now): how far a different fixed prior would move each set;
* ``confident``: each query answered in the one space where it is most decisive (the largest gap between its two
  most probable classes, each space's probabilities at the weighting's temperature): a per-query choice that needs
  no held-out item and no other query;
* ``block<n>``: the default with a fourth candidate space, the embedding's own feature map after its ``n``-th
  block (Conv-4 backbones), average-pooled to ``--block-pool`` x ``--block-pool`` and task-normalised: the
  encoder's mid-level features, which transfer across domains better than its last layer in the cross-domain
  few-shot literature (CHEF, Adler et al. 2020). It applies at every shot count (``--shots``);
  ``--block-alone`` also scores that space by itself (``block<n> alone``);
* ``lin<scale>`` (only with ``--linear-scales``): the mean of the spaces' probabilities, each a softmax at that
  scale (linear pooling), instead of the sum of their weighted distances;
* ``agree<mix>`` (only with ``--agreement-mixes``): each space's accuracy estimated from how often the spaces
  agree on the task's queries (no labels), the spaces weighted by its log-odds, mixed with equal weights;
* ``fisher``, ``borda``, ``refine``, ``refine-emb`` (only with ``--fisher``, ``--borda``, ``--refine``): weights
  from a label-free Fisher ratio of each space's partition of the queries; a Borda count of the spaces' class
  ranks; prototypes moved by one soft k-means step on the queries, answered by the default rule or in the
  embedding alone (transductive).

Any list option given empty (``--priors`` alone) leaves its variants out; ``--no-confident`` leaves that one out.

It prints one line per set and method (accuracy, 95% interval, paired difference from raw pixels) and the mean
fitted weights of the ``aug`` rows.
"""

from __future__ import annotations

import argparse
from dataclasses import replace

import torch
import torch.nn.functional as F

import benchmarks.real_classification as rc
from imaging_meta.backbones import forward_with_support_statistics
from imaging_meta.checkpoint_io import load_learner
from imaging_meta.commands.classify import loader_settings
from imaging_meta.episode import Episode
from imaging_meta.learners.descriptors.features import concatenate_spaces, task_normalise
from imaging_meta.learners.descriptors.task_adaptive import (
    DEFAULT,
    EMBEDDING,
    Space,
    TaskAdaptiveClassifier,
    mark_colour,
)
from imaging_meta.learners.descriptors.weighting import (
    ONE_SHOT_SCALE,
    SCALE,
    fit_weights,
    query_distances,
    squared_distances,
    weighted_logits,
)
from imaging_meta.learners.prototypes import class_onehot, episode_n_way
from imaging_meta.learners.transfer.support_finetune import Augmentation, augment_views


class _OneShotVariant(TaskAdaptiveClassifier):
    """The weighted rule at K >= 2; at K = 1 the weights come from `one_shot_weights` instead of being equal."""

    space = "one-shot variant"

    def one_shot_weights(self, ep: Episode, base: dict, distances: torch.Tensor, n_way: int) -> torch.Tensor:
        """Per-task coefficients beta (T, K) from the task's base spaces and the query distances (T, K, A, N)."""
        raise NotImplementedError

    def _predict(self, ep: Episode):
        n_way, labels = episode_n_way(ep), ep.support_labels
        if bool((class_onehot(labels, n_way).sum(1) >= 2).any()):
            return super()._predict(ep)
        with torch.no_grad():
            base = self.base_spaces(self.task_spaces(ep))
            d = torch.stack([query_distances(fs, labels, fq, n_way) for fs, fq in base.values()], 1)  # (T, K, A, N)
            probs, records = self.one_shot_answer(ep, base, d, n_way)
        return probs.float(), mark_colour(records, ep)

    def one_shot_answer(self, ep: Episode, base: dict, distances: torch.Tensor, n_way: int) -> tuple[torch.Tensor, list]:
        """At K = 1: the probabilities (T, A, N) and one record per task; here the weighted rule with
        `one_shot_weights`."""
        beta = self.one_shot_weights(ep, base, distances, n_way)
        return weighted_logits(distances, beta).softmax(-1), _records(self.space, DEFAULT, base, beta)


class AugmentedOneShot(_OneShotVariant):
    """The weighted rule, but at K = 1 the weights are fitted on augmented views of the support."""

    space = "augmented"

    def __init__(self, *args, copies: int = 8, spec: Augmentation = Augmentation(), **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.copies, self.spec = copies, spec
        self.weights: list[list[float]] = []

    def one_shot_weights(self, ep: Episode, base: dict, distances: torch.Tensor, n_way: int) -> torch.Tensor:
        labels = ep.support_labels
        g = torch.Generator().manual_seed(0)
        views = torch.stack(
            [augment_views(ep.support_images[t], self.copies, g, self.spec).clamp(0, 1) for t in range(labels.shape[0])]
        )
        view_labels = labels.repeat(1, self.copies)
        seen = self.base_spaces(self.task_spaces(replace(ep, query_images=views, query_labels=view_labels)))
        onehot = class_onehot(labels, n_way, torch.float32)
        d = []
        for name in base:
            fs, fv = seen[name]
            prototypes = (onehot.transpose(1, 2) @ fs) / onehot.sum(1).clamp(min=1).unsqueeze(-1)
            d.append(squared_distances(fv, prototypes))
        beta = fit_weights(d, view_labels, torch.ones_like(view_labels, dtype=torch.bool), self.prior * self.copies)
        self.weights += (beta / beta.sum(-1, keepdim=True)).tolist()
        return beta


class FixedOneShot(_OneShotVariant):
    """At K = 1, fixed weights: ``share`` of the sum for the embedding, the rest split equally among the others."""

    space = "fixed"

    def __init__(self, *args, share: float = 0.5, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if not 0.0 <= share <= 1.0:
            raise ValueError(f"share must lie in [0, 1], got {share}")
        self.share = share

    def one_shot_weights(self, ep: Episode, base: dict, distances: torch.Tensor, n_way: int) -> torch.Tensor:
        names = list(base)
        rest = (1.0 - self.share) / max(len(names) - 1, 1)
        w = torch.tensor([self.share if n == EMBEDDING else rest for n in names], dtype=distances.dtype)
        return (ONE_SHOT_SCALE * w).expand(distances.shape[0], -1).clone()  # the default's one-shot temperature


class TransductiveOneShot(_OneShotVariant):
    """At K = 1, the weights fitted (as at K >= 2) on the task's own queries, labelled by the current weighted
    rule's prediction (their true labels are never read), for ``rounds`` rounds from equal weights."""

    space = "transductive"

    def __init__(self, *args, rounds: int = 1, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.rounds = rounds

    def one_shot_weights(self, ep: Episode, base: dict, distances: torch.Tensor, n_way: int) -> torch.Tensor:
        beta = torch.full(distances.shape[:2], SCALE / distances.shape[1])
        for _ in range(self.rounds):
            pseudo = weighted_logits(distances, beta).argmax(-1)
            beta = fit_weights(list(distances.unbind(1)), pseudo, torch.ones_like(pseudo, dtype=torch.bool), self.prior)
        return beta


class ConfidentOneShot(_OneShotVariant):
    """At K = 1, each query answered in the space where its two most probable classes are furthest apart."""

    space = "confident"

    def one_shot_answer(self, ep: Episode, base: dict, distances: torch.Tensor, n_way: int) -> tuple[torch.Tensor, list]:
        probs = (-SCALE * distances).softmax(-1)  # (T, K, A, N)
        top = probs.topk(min(2, n_way), -1).values
        pick = (top[..., 0] - top[..., -1]).argmax(1, keepdim=True)  # (T, 1, A): each query's most decisive space
        chosen = probs.gather(1, pick.unsqueeze(-1).expand(-1, -1, -1, n_way))[:, 0]
        share = torch.stack([(pick[:, 0] == k).float().mean(-1) for k in range(len(base))], -1)  # (T, K), sums to 1
        return chosen, _records(self.space, "most decisive space per query", base, share)


class LinearPool(_OneShotVariant):
    """At K = 1, the mean of the spaces' probabilities, each a softmax at temperature ``scale`` (linear pooling: one
    space that is confidently wrong moves the answer by at most its share, where the weighted rule adds its
    distances to the others')."""

    space = "linear pooling"

    def __init__(self, *args, scale: float = ONE_SHOT_SCALE, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.scale = scale

    def one_shot_answer(self, ep: Episode, base: dict, distances: torch.Tensor, n_way: int) -> tuple[torch.Tensor, list]:
        probs = (-self.scale * distances).softmax(-1).mean(1)  # (T, K, A, N) -> (T, A, N)
        return probs, _records(self.space, "mean of the spaces' probabilities", base, torch.ones(distances.shape[:2]))


class AgreementOneShot(_OneShotVariant):
    """At K = 1, each space's accuracy estimated without labels from how often its answers to the task's queries
    agree with the other spaces' (the spectral meta-learner of Parisi et al. 2014, for N classes with symmetric,
    conditionally independent errors: agreement_ij - 1/N = N/(N-1) b_i b_j, b = accuracy - 1/N), and the spaces
    weighted by the log-odds of that accuracy, mixed with equal weights in proportion ``mix``."""

    space = "agreement"

    def __init__(self, *args, mix: float = 1.0, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.mix = mix
        self.estimates: list[list[float]] = []

    def one_shot_weights(self, ep: Episode, base: dict, distances: torch.Tensor, n_way: int) -> torch.Tensor:
        t_count, k = distances.shape[:2]
        answers = distances.argmin(-1)  # (T, K, A)
        agree = (answers.unsqueeze(2) == answers.unsqueeze(1)).double().mean(-1)  # (T, K, K)
        c = ((agree - 1.0 / n_way) * (n_way - 1) / n_way).clamp(min=1e-4)  # b_i b_j
        beta = torch.empty(t_count, k, dtype=torch.float64)
        for t in range(t_count):
            b = torch.empty(k, dtype=torch.float64)
            for i in range(k):  # b_i^2 = mean over pairs (j, l) of c_ij c_il / c_jl
                ratios = [c[t, i, j] * c[t, i, m] / c[t, j, m] for j in range(k) for m in range(j + 1, k)
                          if i not in (j, m)]
                b[i] = torch.stack(ratios).mean().sqrt()
            acc = (1.0 / n_way + b).clamp(max=0.95)
            logodds = (acc * (n_way - 1) / (1 - acc)).log().clamp(min=1e-3)
            w = logodds / logodds.sum()
            self.estimates.append(acc.tolist())
            beta[t] = ONE_SHOT_SCALE * (self.mix * w + (1 - self.mix) / k)
        return beta.to(distances.dtype)


def _records(space: str, rule: str, names, weights: torch.Tensor) -> list[dict]:
    """One choice record per task, with the (T, K) weights normalised to sum 1."""
    w = weights / weights.sum(-1, keepdim=True)
    return [{"space": space, "rule": rule, "weights": dict(zip(names, map(float, w[t]), strict=True)),
             "loo_accuracy": {}, "loo_items": 0} for t in range(w.shape[0])]


def query_fisher(distances: torch.Tensor) -> torch.Tensor:
    """(T, K) label-free Fisher ratio of each space: the task's queries grouped by their nearest prototype in that
    space, the between-group over the within-group scatter of their class-distance profiles (each query's distances
    minus their mean over the classes), each over its degrees of freedom (Calinski-Harabasz). Scale-free, so
    comparable across spaces; 0 when a space puts every query in one class."""
    t_count, k, a, n = distances.shape
    prof = distances - distances.mean(-1, keepdim=True)
    out = torch.zeros(t_count, k, dtype=torch.float64)
    for t in range(t_count):
        for i in range(k):
            x, g = prof[t, i].double(), distances[t, i].argmin(-1)
            groups = g.unique()
            if len(groups) < 2 or len(groups) == a:
                continue
            mu = x.mean(0)
            between = sum(int((g == c).sum()) * (x[g == c].mean(0) - mu).pow(2).sum() for c in groups)
            within = sum((x[g == c] - x[g == c].mean(0)).pow(2).sum() for c in groups)
            out[t, i] = (between / (len(groups) - 1)) / (within / (a - len(groups))).clamp(min=1e-12)
    return out


class FisherOneShot(_OneShotVariant):
    """At K = 1, each space weighted in proportion to its `query_fisher` ratio (how cleanly its own prototype
    partition splits the task's unlabelled queries), the sum kept at ONE_SHOT_SCALE; equal weights if all are 0."""

    space = "fisher"

    def one_shot_weights(self, ep: Episode, base: dict, distances: torch.Tensor, n_way: int) -> torch.Tensor:
        j = query_fisher(distances)
        j = torch.where(j.sum(-1, keepdim=True) > 0, j, torch.ones_like(j))
        return (ONE_SHOT_SCALE * j / j.sum(-1, keepdim=True)).to(distances.dtype)


class BordaOneShot(_OneShotVariant):
    """At K = 1, a Borda count: each space ranks the classes for a query, the ranks are summed, and ties go to the
    default's weighted distance. (For N = 2 a majority vote of the three spaces.)"""

    space = "borda"

    def one_shot_answer(self, ep: Episode, base: dict, distances: torch.Tensor, n_way: int) -> tuple[torch.Tensor, list]:
        ranks = distances.argsort(-1).argsort(-1).to(distances.dtype).sum(1)  # (T, A, N): 0 = nearest, summed
        beta = torch.full(distances.shape[:2], ONE_SHOT_SCALE / distances.shape[1], dtype=distances.dtype)
        score = ranks - 1e-3 * weighted_logits(distances, beta) / ONE_SHOT_SCALE  # default's distances, < 1 rank
        return (-score).softmax(-1), _records(self.space, "Borda count of the spaces' class ranks", base, beta)


class RefinedOneShot(_OneShotVariant):
    """At K = 1, transductive prototype rectification: the task's queries soft-assigned by the default rule (equal
    weights at ONE_SHOT_SCALE), each space's prototype moved to the mean of its support image and the queries so
    weighted (one soft k-means step; Ren et al. 2018, Liu et al. 2020), and the queries answered again by the
    default rule on the moved prototypes (``read="all"``), or in the embedding alone (``read="embedding"``: the
    descriptors only help place its prototypes). An answer depends on the task's other queries."""

    def __init__(self, *args, read: str = "all", **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if read not in ("all", EMBEDDING):
            raise ValueError(f"read must be 'all' or {EMBEDDING!r}, got {read!r}")
        self.read = read
        self.space = "refined" if read == "all" else "refined, read in the embedding"

    def one_shot_answer(self, ep: Episode, base: dict, distances: torch.Tensor, n_way: int) -> tuple[torch.Tensor, list]:
        names = list(base)
        beta = torch.full(distances.shape[:2], ONE_SHOT_SCALE / len(names), dtype=distances.dtype)
        r = weighted_logits(distances, beta).softmax(-1)  # (T, A, N) soft assignment of the queries
        onehot = class_onehot(ep.support_labels, n_way, distances.dtype)  # (T, S, N)
        moved = []
        for fs, fq in base.values():
            sums = onehot.transpose(1, 2) @ fs + r.transpose(1, 2) @ fq  # (T, N, D)
            counts = onehot.sum(1) + r.sum(1)  # (T, N)
            moved.append(squared_distances(fq, sums / counts.unsqueeze(-1)))
        d = torch.stack(moved, 1)
        if self.read == EMBEDDING:
            e = names.index(EMBEDDING)
            beta = torch.zeros_like(beta)
            beta[:, e] = ONE_SHOT_SCALE
        return weighted_logits(d, beta).softmax(-1), _records(self.space, "refined prototypes", names, beta)


class BlockSpace(TaskAdaptiveClassifier):
    """The task-adaptive classifier with one more candidate space: the embedding's feature map after block
    ``block`` of its Conv-4 backbone, average-pooled to ``pool`` x ``pool`` (each task's queries normalised with its
    support's statistics, as the embedding is)."""

    def __init__(self, *args, block: int = 2, pool: int = 4, alone: bool = False, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.alone = alone
        layers = getattr(getattr(getattr(self.embedding, "encoder", None), "backbone", None), "layers", None)
        if layers is None or not 1 <= block <= len(layers):
            raise ValueError(f"block {block}: the embedding has no Conv-4 backbone with that many blocks")
        self.block, self.pool, self.name = block, pool, f"block{block}"

    def _block_features(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        for layer in self.embedding.encoder.backbone.layers[: self.block]:
            h = layer(h)
        return F.adaptive_avg_pool2d(h, self.pool).flatten(1)

    def task_spaces(self, episode: Episode) -> dict[str, Space]:
        out = super().task_spaces(episode)
        views = []
        for view in self.embedding_episodes(episode):
            pairs = [forward_with_support_statistics(self._block_features, s, q)
                     for s, q in zip(view.support_images, view.query_images, strict=True)]
            views.append(task_normalise(torch.stack([s for s, _ in pairs]), torch.stack([q for _, q in pairs])))
        out[self.name] = (*(views[0] if len(views) == 1 else concatenate_spaces(views)), "euclidean")
        return out

    def base_spaces(self, spaces: dict[str, Space]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        base = super().base_spaces(spaces)
        return {self.name: base[self.name]} if self.alone else base


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--sets", nargs="*", default=sorted(p.name for p in rc.SETS.iterdir() if p.is_dir()))
    ap.add_argument("--episodes", type=int, default=60)
    ap.add_argument("--copies", type=int, default=8)
    ap.add_argument("--priors", nargs="*", type=float, default=[4.0, 0.5, 0.05])
    ap.add_argument("--pixel-sizes", nargs="*", type=int, default=[16, 8])
    ap.add_argument("--transductive-rounds", nargs="*", type=int, default=[1, 3])
    ap.add_argument("--shift-priors", nargs="*", type=float, default=[0.5, 0.05],
                    help="also `shift<prior>`: the augmented views translations only (up to --shift of the size)")
    ap.add_argument("--shift", type=float, default=0.1)
    ap.add_argument("--embedding-shares", nargs="*", type=float, default=[0.45, 0.55, 0.65, 0.8],
                    help="also `emb<share>`: fixed weights, this share of the sum for the embedding")
    ap.add_argument("--no-confident", action="store_true", help="leave out `confident`")
    ap.add_argument("--linear-scales", nargs="*", type=float, default=[],
                    help="also `lin<scale>`: the mean of the spaces' probabilities at this softmax scale")
    ap.add_argument("--agreement-mixes", nargs="*", type=float, default=[],
                    help="also `agree<mix>`: weights from the spaces' agreement on the queries, mixed with equal ones")
    ap.add_argument("--fisher", action="store_true", help="also `fisher`: weights from the label-free Fisher ratio")
    ap.add_argument("--borda", action="store_true", help="also `borda`: a Borda count of the spaces' class ranks")
    ap.add_argument("--refine", action="store_true",
                    help="also `refine` and `refine-emb`: prototypes moved by one soft k-means step on the queries")
    ap.add_argument("--blocks", nargs="*", type=int, default=[1, 2],
                    help="also `block<n>`: the embedding's block-n features as a fourth space")
    ap.add_argument("--block-pool", type=int, default=4)
    ap.add_argument("--block-alone", action="store_true", help="also `block<n> alone`: that space by itself")
    ap.add_argument("--shots", nargs="+", type=int, default=[1],
                    help="shot counts (the variants differ from the default at 1 shot, except block<n>)")
    args = ap.parse_args(argv)
    learner, extra = load_learner(args.checkpoint, "cpu")
    learner.eval()
    methods = {"pixels": (rc.descriptor_learners()["pixels"], {"image_size": [64, 64], "channels": 3,
                                                               "ct_window": [-250.0, 250.0]})}
    methods["embedding alone"] = (learner, loader_settings(extra, learner))
    variants: dict[str, TaskAdaptiveClassifier] = {"default": TaskAdaptiveClassifier(learner)}
    variants.update({f"aug{p:g}": AugmentedOneShot(learner, prior=p, copies=args.copies) for p in args.priors})
    shift = Augmentation(flip=False, rotation=0.0, translation=args.shift, zoom=0.0, intensity=0.0)
    variants.update({f"shift{p:g}": AugmentedOneShot(learner, prior=p, copies=args.copies, spec=shift)
                     for p in args.shift_priors})
    variants.update({f"px{s}": TaskAdaptiveClassifier(learner, pixel_size=s) for s in args.pixel_sizes})
    variants.update({f"emb{s:g}": FixedOneShot(learner, share=s) for s in args.embedding_shares})
    variants.update({f"trans{r}": TransductiveOneShot(learner, rounds=r) for r in args.transductive_rounds})
    variants.update({f"lin{s:g}": LinearPool(learner, scale=s) for s in args.linear_scales})
    variants.update({f"agree{m:g}": AgreementOneShot(learner, mix=m) for m in args.agreement_mixes})
    if not args.no_confident:
        variants["confident"] = ConfidentOneShot(learner)
    if args.fisher:
        variants["fisher"] = FisherOneShot(learner)
    if args.borda:
        variants["borda"] = BordaOneShot(learner)
    if args.refine:
        variants["refine"] = RefinedOneShot(learner)
        variants["refine-emb"] = RefinedOneShot(learner, read=EMBEDDING)
    variants.update({f"block{b}": BlockSpace(learner, block=b, pool=args.block_pool) for b in args.blocks})
    if args.block_alone:
        variants.update({f"block{b} alone": BlockSpace(learner, block=b, pool=args.block_pool, alone=True)
                         for b in args.blocks})
    for name, v in variants.items():
        methods[name] = (v.eval(), loader_settings(extra, v))
    episodes = argparse.Namespace(ways=None, queries=5, gap=2, episodes=args.episodes, seed=0, per_query=False)
    for s in args.sets:
        for v in variants.values():
            if isinstance(v, AugmentedOneShot):
                v.weights.clear()
        rc.run_set(s, methods, args.shots, episodes)
        for name, v in variants.items():
            if isinstance(v, AugmentedOneShot) and v.weights:
                mean = torch.tensor(v.weights).mean(0).tolist()
                print(f"{s:18s} {name}: mean weights " + ", ".join(f"{w:.3f}" for w in mean))
            if isinstance(v, AgreementOneShot) and v.estimates:
                mean = torch.tensor(v.estimates).mean(0).tolist()
                print(f"{s:18s} {name}: mean estimated accuracy " + ", ".join(f"{w:.3f}" for w in mean))
                v.estimates.clear()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
