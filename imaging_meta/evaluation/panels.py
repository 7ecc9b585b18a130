"""Image panels of episodes for TensorBoard's IMAGES tab (matplotlib's Agg canvas: no screen, no pyplot state).

* `segmentation_panel`: one row per episode: the support slice with its mask, the query with its true mask, the
  query with the predicted mask (the true contour drawn over it) and the foreground probability; each row is
  titled with the structure, the query's site and the query's Dice.
* `classification_panel`: one episode: a column per class, its support images under the class name, then its
  queries (in the column of their true class) titled with the true and the predicted class, green when right
  and red when wrong.
* `episode_panel`: the panel of a batch of episodes and the trained learner's probabilities, for the batch's
  kind of task (what `imaging_meta.module.EpisodicModule` logs each validation epoch).
* `figure_array` and `png_array`: a figure or a PNG file as an (H, W, 3) uint8 array, what
  ``SummaryWriter.add_image(tag, array, step, dataformats="HWC")`` takes.

A panel's size in pixels depends only on its layout (rows, columns; never on the text in it), so TensorBoard's
step slider compares like with like from one epoch to the next. Metadata that the data does not give (a
structure, a site) is named as missing in the titles rather than left out silently.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from imaging_meta.episode import Episode
from imaging_meta.evaluation.scoring import query_scores, query_site
from imaging_meta.tasks import Task

#: dots per inch of every panel
DPI = 100
#: inches per cell (width, height) of the two layouts
MASK_CELL = (2.0, 2.25)
CLASS_CELL = (1.35, 1.5)
#: colours: the true mask and a right answer; the predicted mask and a wrong answer
TRUTH, PREDICTION, RIGHT, WRONG = "#00e000", "#ff3030", "#108010", "#d01010"
#: the most classes (columns) and support rows a classification panel shows
MAX_WAYS, MAX_SHOT_ROWS = 10, 2
#: a classification panel's title is wrapped to the figure's width in at most this many lines (a fixed header,
#: so that the image keeps its size from one validation to the next): on one line, a 5-way panel cut off the
#: title's "5-way 1" and its "queries" (a review)
TITLE_LINES = 3


def wrapped_title(title: str, width_inches: float, fontsize: float = 8.0, lines: int = TITLE_LINES) -> str:
    """``title`` in lines that fit ``width_inches`` at ``fontsize`` points (at most ``lines``; the last one ends
    with an ellipsis when there is more)."""
    chars = max(20, int(width_inches * 72 / (0.6 * fontsize)))
    return "\n".join(textwrap.wrap(title, chars, max_lines=lines, placeholder=" …")) if title else ""
NOT_RECORDED = "not recorded"


# ------------------------------------------------------------------------------------------ canvas
def _figure(width: float, height: float):
    """A matplotlib Figure on its own Agg canvas (no pyplot: nothing global, nothing to close)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=DPI)
    FigureCanvasAgg(fig)
    return fig


def figure_array(fig) -> np.ndarray:
    """The rendered figure as an (H, W, 3) uint8 array (exactly its size in inches times `DPI`)."""
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()


def png_array(path: str | Path) -> np.ndarray:
    """A PNG file as an (H, W, 3) uint8 array (transparency dropped onto white)."""
    from PIL import Image

    with Image.open(path) as im:
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.asarray(Image.alpha_composite(white, rgba).convert("RGB")).copy()


def _unit(img) -> np.ndarray:
    """An image scaled to [0, 1] (a constant image is black)."""
    a = np.asarray(img, dtype=np.float64)
    lo, hi = float(a.min()), float(a.max())
    return (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)


def _short(text: str, n: int = 16) -> str:
    text = str(text)
    return text if len(text) <= n else text[: n - 1] + "…"


def _bare(ax) -> None:
    ax.set_xticks([])
    ax.set_yticks([])


# ------------------------------------------------------------------------------------ segmentation
def _slice(ax, image, mask=None, colour: str = TRUTH, outline=None) -> None:
    """An axial slice of a RAS volume in the volume's (x, y) order, shown as `imaging_meta.evaluation.plots`
    shows it, in the radiological convention (`radiological`): the patient's left on the viewer's right, anterior
    up; ``mask`` as a translucent fill with its contour, ``outline`` (a second mask) as a contour only, in `TRUTH`."""
    ax.imshow(_unit(image).T, cmap="gray", origin="lower", interpolation="nearest")
    if mask is not None:
        m = np.asarray(mask, dtype=float) > 0.5
        if m.any():
            from matplotlib.colors import ListedColormap

            ax.imshow(np.ma.masked_where(~m.T, m.T.astype(float)), cmap=ListedColormap([colour]), alpha=0.35,
                      origin="lower", interpolation="nearest", vmin=0, vmax=1)
        if m.any() and not m.all():
            ax.contour(m.T.astype(float), levels=[0.5], colors=[colour], linewidths=1.0, origin="lower")
    if outline is not None:
        o = np.asarray(outline, dtype=float) > 0.5
        if o.any() and not o.all():
            ax.contour(o.T.astype(float), levels=[0.5], colors=[TRUTH], linewidths=0.8, linestyles="dashed",
                       origin="lower")
    radiological(ax)
    _bare(ax)


def radiological(ax) -> None:
    """Turn an axes that shows an axial slice of a RAS volume (x along the axes' x, origin at the bottom, so
    anterior is up) into the radiological view: the patient's left (low x in RAS) on the viewer's right. It drew
    the patient's left on the left, mirrored against every viewer (a review)."""
    if not ax.xaxis_inverted():
        ax.invert_xaxis()


def row_title(structure: str | None, site: str | None, score: float | None, metric_title: str = "Dice") -> str:
    """``"<structure> · site: <site> · <metric> <score>"``, naming what the data did not record (site keys
    may hold ``|``: the separator is ``·``)."""
    structure = _short(structure, 40) if structure else f"structure {NOT_RECORDED}"
    value = f"{metric_title} {score:.3f}" if score is not None and math.isfinite(score) else f"{metric_title} –"
    return f"{structure} · {_site_text(site)} · {value}"


def _site_text(site: str | None) -> str:
    return f"site: {_short(site, 70)}" if site else f"site: {NOT_RECORDED}"


def segmentation_panel(rows: Sequence[dict], metric_title: str = "Dice") -> np.ndarray:
    """One row per dict: ``support_image``, ``support_mask``, ``query_image``, ``truth``, ``prediction`` (2D
    arrays or tensors), optional ``probability`` (2D, in [0, 1]), and the title's ``structure``, ``site`` and
    ``score`` (None when unknown). Returns an (H, W, 3) uint8 array of ``len(rows) * MASK_CELL[1]`` by
    ``4 * MASK_CELL[0]`` inches."""
    if not rows:
        raise ValueError("segmentation_panel needs at least one row")
    cols = 4
    fig = _figure(MASK_CELL[0] * cols, MASK_CELL[1] * len(rows))
    subfigs = fig.subfigures(len(rows), 1, squeeze=False)[:, 0]
    for sf, r in zip(subfigs, rows, strict=True):
        sf.suptitle(row_title(r.get("structure"), r.get("site"), r.get("score"), metric_title), fontsize=9)
        axes = sf.subplots(1, cols, gridspec_kw={"left": 0.02, "right": 0.98, "bottom": 0.03, "top": 0.84, "wspace": 0.06})
        _slice(axes[0], r["support_image"], r["support_mask"], TRUTH)
        axes[0].set_title("support + mask", fontsize=7)
        _slice(axes[1], r["query_image"], r["truth"], TRUTH)
        axes[1].set_title("query + truth", fontsize=7)
        _slice(axes[2], r["query_image"], r["prediction"], PREDICTION, outline=r["truth"])
        axes[2].set_title("prediction (truth dashed)", fontsize=7)
        prob = r.get("probability")
        if prob is None:
            axes[3].axis("off")
        else:
            axes[3].imshow(np.clip(np.asarray(prob, dtype=float), 0, 1).T, cmap="magma", vmin=0, vmax=1,
                           origin="lower", interpolation="nearest")
            axes[3].set_title("foreground probability", fontsize=7)
            radiological(axes[3])  # the same way round as the slices beside it (it was mirrored; a review)
            _bare(axes[3])
    return figure_array(fig)


# ---------------------------------------------------------------------------------- classification
def _item(ax, image) -> None:
    """An item: RGB when it has 3 channels, else its first channel in grey; a 3D patch (C, D, H, W) by its middle
    slice along D."""
    a = np.asarray(image, dtype=np.float64)
    if a.ndim == 4:
        a = a[:, a.shape[1] // 2]
    if a.ndim == 3 and a.shape[0] == 3:
        ax.imshow(_unit(a).transpose(1, 2, 0), interpolation="nearest")
    else:
        ax.imshow(_unit(a[0] if a.ndim == 3 else a), cmap="gray", interpolation="nearest")
    _bare(ax)


def _frame(ax, colour: str) -> None:
    for spine in ax.spines.values():
        spine.set_edgecolor(colour)
        spine.set_linewidth(2.5)


def classification_panel(support_images, support_labels, query_images, query_labels, predictions,
                         classes: Sequence[str], title: str = "", max_queries_per_class: int = 2) -> np.ndarray:
    """One episode: a column per class (the first `MAX_WAYS`), up to `MAX_SHOT_ROWS` rows of support images
    under their class name, then up to ``max_queries_per_class`` rows of queries, each in the column of its
    true class and titled ``true → predicted``, green when right and red when wrong.

    Args:
        support_images, query_images: (N, C, H, W) items.
        support_labels, query_labels, predictions: (N,) class indices.
        classes: the class names, ``classes[i]`` is label ``i`` (names missing from it are shown as numbers).
        title: the figure's title.

    Returns:
        An (H, W, 3) uint8 array; its size depends only on the number of classes, shots and queries shown.
    """
    ys, yq, pred = (torch.as_tensor(t).long().cpu() for t in (support_labels, query_labels, predictions))
    n_way = int(max(int(ys.max()), int(yq.max()), int(pred.max()))) + 1
    names = [str(classes[c]) if c < len(classes) else f"class {c}" for c in range(n_way)]
    ways = min(n_way, MAX_WAYS)
    support = [[k for k in range(len(ys)) if int(ys[k]) == c][:MAX_SHOT_ROWS] for c in range(ways)]
    queries = [[k for k in range(len(yq)) if int(yq[k]) == c][:max(1, max_queries_per_class)] for c in range(ways)]
    s_rows, q_rows = max(map(len, support)), max(1, max(map(len, queries)))
    header = 0.2 + 0.16 * TITLE_LINES  # inches: the title's lines, the same for every title
    fig = _figure(CLASS_CELL[0] * ways, CLASS_CELL[1] * (s_rows + q_rows) + header)
    grid = fig.add_gridspec(s_rows + q_rows, ways, left=0.06, right=0.98, bottom=0.02,
                         top=1 - header / fig.get_figheight(), hspace=0.45, wspace=0.15)
    for c in range(ways):
        for r in range(s_rows):
            ax = fig.add_subplot(grid[r, c])
            if r < len(support[c]):
                _item(ax, support_images[support[c][r]])
                ax.set_title(_short(names[c]) if r == 0 else "", fontsize=7, fontweight="bold")
            else:
                ax.axis("off")
            if c == 0:
                ax.set_ylabel("support", fontsize=7)
        for r in range(q_rows):
            ax = fig.add_subplot(grid[s_rows + r, c])
            if r >= len(queries[c]):
                ax.axis("off")
                continue
            k = queries[c][r]
            t, p = int(yq[k]), int(pred[k])
            colour = RIGHT if t == p else WRONG
            _item(ax, query_images[k])
            _frame(ax, colour)
            ax.set_title(f"{_short(names[t], 12)}\n→ {_short(names[p], 12)}", fontsize=6, color=colour)
            if c == 0:
                ax.set_ylabel("query", fontsize=7)
    shown = "" if ways == n_way else f" (first {ways} of {n_way} classes)"
    fig.suptitle(wrapped_title(f"{title}{shown}", 0.92 * fig.get_figwidth()), fontsize=8, va="top",
                 y=1 - 0.08 / fig.get_figheight())
    return figure_array(fig)


# -------------------------------------------------------------------------------------- episodes
def _site(batch: Episode, i: int, j: int) -> str | None:
    try:
        return query_site(batch, i, j) or None
    except (IndexError, TypeError, KeyError):
        return None


def _episode_site(batch: Episode, i: int) -> str | None:
    site = batch.site[i] if isinstance(batch.site, list) and i < len(batch.site) else batch.site
    return str(site) if site not in (None, "", []) else None


def _classes(batch: Episode, i: int) -> list[str]:
    classes = batch.classes[i] if isinstance(batch.classes, list) and i < len(batch.classes) else batch.classes
    return [str(c) for c in classes] if isinstance(classes, (list, tuple)) else []


def episode_panel(task: Task, batch: Episode, probs: torch.Tensor, threshold: float = 0.5, n: int = 4) -> np.ndarray:
    """The panel of a batched episode and the trained learner's probabilities of its queries.

    Masks: the first query of each of the first ``n`` tasks, one row each (`segmentation_panel`), titled with
    its Dice (`imaging_meta.evaluation.scoring.query_scores`, as in the records). Classes: the first task
    (`classification_panel`), up to ``n`` queries per class, titled with its accuracy and site.
    """
    probs = probs.detach().float().cpu()
    decisions = task.decide(probs, threshold)
    labels = batch.query_labels.cpu()
    scores = query_scores(task, decisions, labels)[task.metric]  # (T, Q)
    if task.dense:
        rows = []
        for i in range(min(max(1, n), batch.n_tasks)):
            names = _classes(batch, i)
            rows.append({"support_image": batch.support_images[i, 0, 0].float().cpu(),
                         "support_mask": batch.support_labels[i, 0].float().cpu(),
                         "query_image": batch.query_images[i, 0, 0].float().cpu(), "truth": labels[i, 0].float(),
                         "prediction": decisions[i, 0].float(), "probability": probs[i, 0],
                         "structure": names[0] if names else None, "site": _site(batch, i, 0),
                         "score": float(scores[i, 0])})
        return segmentation_panel(rows, task.metric_title)
    site = _episode_site(batch, 0)  # a classification episode names the sites of all its queries
    n_way = int(batch.support_labels[0].max()) + 1
    n_shot = int(batch.support_labels.shape[1]) // max(1, n_way)
    # the score before the sites, whose text may be long: the title's last line is cut when it does not fit
    title = (f"{n_way}-way {n_shot}-shot episode · {task.metric_title} {float(scores[0].mean()):.3f} on "
             f"{scores.shape[1]} queries · {_site_text(site)}")
    return classification_panel(batch.support_images[0].float().cpu(), batch.support_labels[0], batch.query_images[0].float().cpu(),
                                labels[0], decisions[0], _classes(batch, 0), title, max_queries_per_class=n)
