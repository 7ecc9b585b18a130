"""Why a few-shot classifier decided as it did: the support examples it leaned on, and the pixels that mattered.

Two explanations of one query, classified in its own episode against the whole support set (as
`imaging_meta.commands.classify` does):

* `nearest_supports`: the support items nearest to the query, ranked by the learner's own comparison,
  `Learner.support_similarity`, and named by its `Learner.similarity_measure`
  (`imaging_meta.learners.base.SimilarityMeasure`). A metric learner compares as it predicts (for example
  ProtoNet's ``protonet_euclidean``, the matching network's ``matching_attention``). A learner whose pooled
  encoder is not its decision rule (for example the MAML family) gives the Euclidean distance between that
  encoder's features before any adaptation (``encoder_euclidean``), and one without an encoder the Euclidean
  distance between the preprocessed images (``pixel_euclidean``): both stated, model-agnostic stand-ins.
  Every embedding is computed the way the learner computes it: support and query of the task in one forward
  pass (`Learner.embed_episode`), normalised with the support's statistics as in `predict`, so a query's
  neighbours do not depend on the other queries.

* `occlusion_saliency` (Zeiler and Fergus, "Visualizing and Understanding Convolutional Networks", ECCV
  2014): a patch of the query is replaced by the query's mean intensity (or a given value), the occluded
  query is classified in its own episode against the full support set, and the drop of the predicted
  class's probability is recorded; a pixel's saliency is the mean drop over the patches that cover it.
  Model-agnostic: it needs only ``learner.predict``. All occluded copies go through ``predict`` as the
  tasks of a few batched episodes (`imaging_meta.episode.collate_episodes`).

Functions here work on tensors and do no file I/O, except `save_explanation_panel`, which writes one PNG.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from imaging_meta.backbones import is_transductive
from imaging_meta.episode import Episode, collate_episodes
from imaging_meta.learners.base import Learner, SimilarityMeasure


@dataclass
class NearestSupports:
    """The ``k`` support items nearest to each query, nearest first.

    Attributes:
        indices: (Q, k) indices into the episode's support set.
        values: (Q, k) their distances, similarities or attention weights (see ``value_name``).
        measure: short name of the measure (see the module docstring).
        description: one sentence saying what the measure is, for reports.
        value_name: ``distance``, ``similarity`` or ``weight``.
        larger_is_nearer: True for similarities and weights, False for distances.
    """

    indices: torch.Tensor
    values: torch.Tensor
    measure: str
    description: str
    value_name: str
    larger_is_nearer: bool


#: a saliency map whose largest drop of probability is below this is flat (`Occlusion.flat`); the panel's colour
#: scale never spans less than it either, so that rounding noise is not stretched into a heat map (a review)
FLAT_DROP = 1e-4


@dataclass
class Occlusion:
    """An occlusion saliency map of one query.

    Attributes:
        saliency: (H, W) mean drop of the target class's probability when a patch covering the pixel is
            occluded; positive where occluding lowers it, negative where it raises it.
        probabilities: (n_way,) class probabilities of the unoccluded query.
        target: the class index explained (the predicted class unless one was given).
        patch_size: side of the square patch, in pixels.
        stride: step between patch positions, in pixels.
        fill: ``"mean"`` (the query's mean intensity per channel) or the constant used.
        n_occlusions: number of occluded copies classified.
    """

    saliency: torch.Tensor
    probabilities: torch.Tensor
    target: int
    patch_size: int
    stride: int
    fill: str | float
    n_occlusions: int
    #: the largest change of the explained class's probability that occluding one patch made (either way)
    max_patch_drop: float

    @property
    def flat(self) -> bool:
        """Whether no patch moved the explained class's probability by `FLAT_DROP` or more: typically a probability
        saturated at 1.000, which occluding any one patch does not lower. The map then says nothing about the
        pixels (its values are rounding noise, about 1e-7), and the panel and the JSON say so. Judged on the
        patches' own drops, not the map's, whose per-pixel means over overlapping patches are smaller (a review)."""
        return self.max_patch_drop < FLAT_DROP

    @property
    def saturated(self) -> bool:
        """Whether the explained class's probability is 1.000 to four decimals."""
        return float(self.probabilities[self.target]) >= 1.0 - FLAT_DROP


def _one_task(episode: Episode, what: str) -> Episode:
    """The unbatched episode of a single task, with 2D images and at least one support and query item."""
    if episode.batched:
        if episode.n_tasks != 1:
            raise ValueError(f"{what} explains one task at a time; got a batch of {episode.n_tasks} tasks: pass episode.task(t)")
        episode = episode.task(0)
    if episode.query_images.dim() != 4 or episode.support_images.dim() != 4:
        raise ValueError(
            f"{what} takes 2D classification episodes: support (S, C, H, W) and query (Q, C, H, W) images; got "
            f"{tuple(episode.support_images.shape)} and {tuple(episode.query_images.shape)}"
        )
    if episode.support_labels.dim() != 1 or len(episode.support_labels) != len(episode.support_images):
        raise ValueError(
            f"{what} takes classification episodes: support_labels (S,) class indices, got {tuple(episode.support_labels.shape)}"
        )
    if len(episode.support_images) == 0 or len(episode.query_images) == 0:
        raise ValueError(f"{what} needs at least one support and one query item")
    return episode


def support_scores(learner: Learner, episode: Episode) -> tuple[torch.Tensor, SimilarityMeasure]:
    """Similarity of every query to every support item, under the learner's own measure (see the module docstring).

    Runs without gradient. Queries are normalised with the support's statistics (unless the learner was built
    transductive), so one query alone gets the same scores as inside its episode.

    Args:
        learner: a classification learner.
        episode: one unbatched task (or a batch of one): support (S, C, H, W), labels (S,), query (Q, C, H, W).

    Returns:
        ``(values, measure)``: (Q, S) values of `Learner.support_similarity` and its `Learner.similarity_measure`.
    """
    ep = _one_task(episode, "support_scores")
    with torch.no_grad():
        values = learner.support_similarity(ep.unsqueeze())[0]
    return values, learner.similarity_measure


def nearest_supports(learner: Learner, episode: Episode, k: int = 3) -> NearestSupports:
    """The ``k`` support items nearest to each query under the learner's own measure (see the module docstring).

    Ties keep the support order.

    Args:
        learner: a classification learner.
        episode: one unbatched task (or a batch of one): support (S, C, H, W), labels (S,), query (Q, C, H, W).
        k: items per query; at most S are returned.

    Returns:
        A `NearestSupports` with (Q, min(k, S)) indices and values.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1 nearest support items, got {k}")
    values, m = support_scores(learner, episode)
    order = torch.sort(values, dim=1, descending=m.larger_is_nearer, stable=True).indices[:, :k]
    return NearestSupports(order, values.gather(1, order), m.name, m.description, m.value_name, m.larger_is_nearer)


def default_patch(height: int, width: int) -> tuple[int, int]:
    """Occlusion patch and stride for an image: a patch of about 1/7 of the shorter side, half-overlapping.

    28 px: patch 4, stride 2; 32 px: 5 and 2; 84 px: 12 and 6. About 13 x 13 = 169 occluded copies whatever
    the size.
    """
    patch = max(2, round(min(height, width) / 7))
    return patch, max(1, patch // 2)


def _starts(n: int, patch: int, stride: int) -> list[int]:
    """Patch positions along one axis of length ``n``: every ``stride``, the last flush with the edge."""
    starts = list(range(0, n - patch + 1, stride))
    if starts[-1] != n - patch:
        starts.append(n - patch)
    return starts


def _predict_queries(learner: Learner, episode: Episode, images: torch.Tensor, batch_size: int, together: bool) -> torch.Tensor:
    """Class probabilities (N, n_way) of each image of (N, C, H, W) against ``episode``'s support: ``together``,
    up to ``batch_size`` images as the query set of one episode (the support encoded, or a learner adapted, once
    for them); otherwise each image the single query of its own episode, one episode per call."""
    out = []
    with torch.no_grad():  # gradient-based learners switch gradients on in their inner loop themselves
        for start in range(0, len(images), batch_size if together else 1):
            chunk = images[start : start + (batch_size if together else 1)]
            ep = replace(episode, query_images=chunk, query_labels=episode.query_labels[:1].expand(len(chunk)).clone(),
                         query_ids=[f"occluded{start + j}" for j in range(len(chunk))])
            out.append(learner.predict(collate_episodes([ep]))[0].float())
    return torch.cat(out)


def occlusion_saliency(
    learner: Learner,
    episode: Episode,
    target: int | None = None,
    patch_size: int | None = None,
    stride: int | None = None,
    fill: str | float = "mean",
    batch_size: int = 64,
) -> Occlusion:
    """Occlusion saliency of one query's predicted (or ``target``) class.

    Each occluded copy of the query is classified against the full support set, up to ``batch_size`` copies as
    the query set of one episode: a query's answer does not depend on the other queries (the support's statistics
    normalise them), so the support is encoded once per batch of copies. A learner with ``transductive`` norms
    gets one episode per copy, and any other learner is checked (the query first and last in one episode must get
    the same answer; a warning says when it falls back).

    Runs under ``torch.no_grad()``; learners that adapt by gradient (MAML family, fine-tuning, Meta-LSTM)
    turn gradients on inside ``predict`` themselves. Not under ``torch.inference_mode()``.

    Args:
        learner: a classification learner (eval mode).
        episode: one unbatched task (or a batch of one) with one query: support (S, C, H, W), labels (S,),
            query (1, C, H, W).
        target: class index to explain; None: the predicted class.
        patch_size: side of the square occluding patch; None: `default_patch`.
        stride: step between patch positions; None: `default_patch` (half the patch).
        fill: ``"mean"`` (the query's mean per channel, a grey patch) or a constant intensity.
        batch_size: occluded copies (queries) per ``predict`` call.

    Returns:
        An `Occlusion` with the (H, W) saliency map on the query's device.
    """
    ep = _one_task(episode, "occlusion_saliency")
    if len(ep.query_images) != 1:
        raise ValueError(f"occlusion_saliency explains one query at a time; got {len(ep.query_images)} queries: "
                         "give an episode whose query set is the one query")
    if batch_size < 2:
        raise ValueError(f"batch_size must be >= 2 episodes per predict call, got {batch_size}")
    query = ep.query_images[0]
    _, h, w = query.shape
    auto_patch, auto_stride = default_patch(h, w)
    patch = auto_patch if patch_size is None else int(patch_size)
    step = (max(1, patch // 2) if patch_size is not None else auto_stride) if stride is None else int(stride)
    if patch < 1 or step < 1:
        raise ValueError(f"patch_size and stride must be >= 1 pixel, got {patch} and {step}")
    ph, pw = min(patch, h), min(patch, w)
    if fill == "mean":
        value = query.mean(dim=(1, 2), keepdim=True)
    elif isinstance(fill, (int, float)) and not isinstance(fill, bool):
        value = torch.full((query.shape[0], 1, 1), float(fill), dtype=query.dtype, device=query.device)
    else:
        raise ValueError(f"fill must be 'mean' or a number, got {fill!r}")
    positions = [(y, x) for y in _starts(h, ph, step) for x in _starts(w, pw, step)]
    copies = query.unsqueeze(0).repeat(len(positions), 1, 1, 1)
    for i, (y, x) in enumerate(positions):
        copies[i, :, y : y + ph, x : x + pw] = value
    together = not is_transductive(learner)
    if together:
        # the unoccluded query first and last among the queries: the same answer in both places, or one per call
        n = min(batch_size, len(positions) + 2)
        check = _predict_queries(learner, ep, torch.cat([query[None], copies[: n - 2], query[None]]), n, True)
        if not torch.allclose(check[0], check[-1], atol=1e-5):
            warnings.warn(f"{type(learner).__name__}'s prediction for a query depends on the other queries; "
                          "classifying the occluded copies one episode per call (slower)", stacklevel=2)
            together = False
    if not together:
        probs = _predict_queries(learner, ep, torch.cat([query[None], copies]), batch_size, False)
    else:
        rest = _predict_queries(learner, ep, copies[n - 2 :], batch_size, True) if len(copies) > n - 2 else check[:0]
        probs = torch.cat([check[:-1], rest])
    base, occluded = probs[0], probs[1:]
    cls = int(base.argmax()) if target is None else int(target)
    if not 0 <= cls < base.numel():
        raise ValueError(f"target must be a class index in [0, {base.numel()}), got {target}")
    drop = (base[cls] - occluded[:, cls]).to(query.device)
    total = torch.zeros(h, w, dtype=torch.float32, device=query.device)
    count = torch.zeros_like(total)
    for d, (y, x) in zip(drop, positions, strict=True):
        total[y : y + ph, x : x + pw] += d
        count[y : y + ph, x : x + pw] += 1
    return Occlusion(total / count, base, cls, patch, step, fill, len(positions),
                     float(drop.abs().max()) if drop.numel() else 0.0)


def _display(image: torch.Tensor):
    """(C, H, W) -> an (H, W) or (H, W, 3) array in [0, 1] for ``imshow`` (min-max scaled when outside it)."""
    t = image.detach().float().cpu()
    lo, hi = float(t.min()), float(t.max())
    if lo < 0 or hi > 1:
        t = (t - lo) / (hi - lo) if hi > lo else torch.zeros_like(t)
    a = t.numpy()
    return a[0] if a.shape[0] == 1 else a[:3].transpose(1, 2, 0)


def _plain_title(text: str) -> str:
    """A panel title as matplotlib draws it verbatim: a class folder's name that is not UTF-8 (its undecodable
    bytes kept as surrogates, as the CSV keeps them) shown with replacement characters, where matplotlib's font
    code refused it after the CSV was written (a review); and ``$`` escaped, so a name is never read as mathtext."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace").replace("$", r"\$")


def saliency_range(saliency: torch.Tensor) -> float:
    """The colour scale's half-width for a saliency map: its largest absolute value, never below `FLAT_DROP`
    (a map of rounding noise, about 1e-7, was stretched to full colour and looked like evidence; a review)."""
    return max(float(saliency.detach().abs().max()), FLAT_DROP)


def save_explanation_panel(
    path: str | Path,
    query: torch.Tensor,
    supports: torch.Tensor | Sequence[torch.Tensor],
    support_titles: Sequence[str],
    saliency: torch.Tensor,
    query_title: str = "query",
    saliency_title: str = "occlusion saliency",
) -> Path:
    """One PNG row: the query, its nearest support items, then the saliency map over the query.

    The saliency is drawn with a diverging colour map centred on 0 (red: occluding lowers the explained
    class's probability; blue: it raises it) over the grey query.

    Args:
        path: the PNG to write (its folder must exist).
        query: (C, H, W) the query image.
        supports: (k, C, H, W) the support images shown, nearest first.
        support_titles: one title per support image (class and distance).
        saliency: (H, W) saliency map of the query.
        query_title: title of the query panel.
        saliency_title: title of the saliency panel.

    Returns:
        The path written.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if len(supports) != len(support_titles):
        raise ValueError(f"give one title per support image: {len(supports)} images, {len(support_titles)} titles")
    path = Path(path)
    n = len(supports) + 2
    fig, axes = plt.subplots(1, n, figsize=(2.2 * n, 2.6), squeeze=False)
    axes = axes[0]
    panels = [(query, query_title), *zip(supports, support_titles, strict=True)]
    for ax, (img, title) in zip(axes, panels, strict=False):
        shown = _display(img)
        ax.imshow(shown, cmap="gray" if shown.ndim == 2 else None, vmin=0, vmax=1)
        ax.set_title(_plain_title(title), fontsize=8)
    ax = axes[-1]
    shown = _display(query)
    ax.imshow(shown if shown.ndim == 2 else shown.mean(-1), cmap="gray", vmin=0, vmax=1)
    sal = saliency.detach().float().cpu().numpy()
    m = saliency_range(saliency)
    im = ax.imshow(sal, cmap="RdBu_r", vmin=-m, vmax=m, alpha=0.55)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04).ax.tick_params(labelsize=6)
    ax.set_title(_plain_title(saliency_title), fontsize=8)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    # no timestamps or software versions in the file, as in imaging_meta.evaluation.plots
    fig.savefig(path, dpi=100, bbox_inches="tight", metadata={"Software": None})
    plt.close(fig)
    return path
