"""PNG figures of an evaluation report (matplotlib, Agg backend, no screen needed).

* ``per_<group>.png``: the trained learner and the baselines per organ or class, and per site, with 95% CIs;
* ``<metric>_vs_shots.png``: each headline metric against the number of shots;
* ``reliability.png`` (classification): accuracy against confidence, with the bin counts;
* ``best_worst.png``: the best and the worst test episodes: support, query, truth and prediction (the
  episodes a `PanelKeeper` kept while they were scored).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from imaging_meta.evaluation.methods import TRAINED, UNTRAINED, ordered_methods
from imaging_meta.evaluation.panels import radiological
from imaging_meta.evaluation.statistics import EPISODE_BOOTSTRAP, EPISODE_T, INTERVAL_LABELS
from imaging_meta.tasks import COPY_MASK, Task, get_task

COLOURS = {TRAINED: "#1f77b4", UNTRAINED: "#9e9e9e", COPY_MASK: "#ff7f0e"}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> str:
    # no timestamps or software versions in the file: the same numbers give the same bytes; written whole or not
    # at all (an interrupted run left an empty PNG beside the earlier report)
    from datamodules.io.atomic import atomic_open

    try:
        with atomic_open(path, "wb") as f:
            fig.savefig(f, format="png", dpi=110, bbox_inches="tight", metadata={"Software": None})
    finally:
        _pyplot().close(fig)
    return path.name


class PanelKeeper:
    """Keeps the ``n`` best and ``n`` worst test episodes of the trained learner (by the mean of the task's
    metric over their queries), with what a reader needs to see them: support, query, truth and prediction.

    Ties are broken by episode number, so the panel is as reproducible as the scores.
    """

    def __init__(self, task: Task | str, n: int, threshold: float = 0.5) -> None:
        self.task, self.n, self.threshold = get_task(task), int(n), float(threshold)
        self.kept: list[dict] = []

    def offer(self, batch, probs: torch.Tensor, records: Sequence[dict], first: int) -> None:
        """Consider the tasks of ``batch`` (episodes ``first``, ``first + 1``, ...); ``probs`` and ``records`` are
        the trained learner's probabilities and per-query records."""
        scores: dict[int, list[float]] = defaultdict(list)
        for r in records:
            scores[r["episode"]].append(r[self.task.metric])
        decisions = self.task.decide(probs, self.threshold)
        for i in range(batch.n_tasks):
            ep = first + i
            item = {"episode": ep, "score": sum(scores[ep]) / len(scores[ep]), "classes": list(batch.classes[i]),
                    "site": str(batch.site[i])}
            self.kept.append(item | (_mask_item if self.task.dense else _class_item)(batch, decisions, i))
        self.kept.sort(key=lambda d: (-d["score"], d["episode"]))
        if len(self.kept) > 2 * self.n:
            self.kept = self.kept[: self.n] + self.kept[-self.n :]

    def best_worst(self) -> tuple[list[dict], list[dict]]:
        k = min(self.n, len(self.kept) // 2) if len(self.kept) < 2 * self.n else self.n
        return self.kept[:k], self.kept[::-1][:k]


def _mask_item(batch, decisions: torch.Tensor, i: int) -> dict:
    """Task ``i`` of a batch of mask episodes: its first support slice and mask, its first query, truth and prediction."""
    return {"support_image": batch.support_images[i, 0, 0].float().cpu(),
            "support_mask": batch.support_labels[i, 0].float().cpu(),
            "query_image": batch.query_images[i, 0, 0].float().cpu(),
            "truth": batch.query_labels[i, 0].float().cpu(), "prediction": decisions[i, 0].cpu()}


def _class_item(batch, decisions: torch.Tensor, i: int) -> dict:
    """Task ``i`` of a batch of class episodes: one support image per class, up to 6 queries, truths and predictions."""
    first_of = [int((batch.support_labels[i] == c).nonzero()[0]) for c in range(len(batch.classes[i]))]
    q = min(6, batch.query_images.shape[1])
    return {"support_images": _middle_slices(batch.support_images[i, first_of, 0]).float().cpu(),
            "query_images": _middle_slices(batch.query_images[i, :q, 0]).float().cpu(),
            "truth": batch.query_labels[i, :q].cpu(), "prediction": decisions[i, :q].cpu()}


def _middle_slices(items: torch.Tensor) -> torch.Tensor:
    """(N, H, W) images as they are; (N, D, H, W) patches by their middle slice along D, as the TensorBoard panel
    shows them (`panels._item`): `best_worst.png` stopped `evaluate` on 3D lesion patches, after every episode was
    scored and before the report was written (a review)."""
    return items[:, items.shape[1] // 2] if items.ndim == 4 else items


def _errors(stats: Sequence[dict | None]) -> list:
    """Error bars of stats: (2, n) below and above the mean for bootstrap intervals (asymmetric), else the
    t-interval's half-widths; 0 where a stat has no interval."""
    if any(s and "ci_low" in s for s in stats):
        ok = [s if s is not None and s.get("ci_low") is not None else None for s in stats]
        # a percentile interval may, rarely, leave the point estimate outside it: no negative bar
        return [[max(0.0, s["mean"] - s["ci_low"]) if s is not None else 0 for s in ok],
                [max(0.0, s["ci_high"] - s["mean"]) if s is not None else 0 for s in ok]]
    return [s["ci95"] if s else 0 for s in stats]


def group_bars(per_method: dict, group: str, title: str, path: Path, interval: str = "95% CI over episodes") -> str | None:
    """Horizontal bars per value of ``group``, one bar per method, with 95% CI error bars (``interval``: how
    the axis names them)."""
    methods = ordered_methods(per_method)
    names = list(per_method[methods[0]].get(group, {}))
    if not names:
        return None
    plt = _pyplot()
    height = 0.8 / len(methods)
    fig, ax = plt.subplots(figsize=(7, 0.5 + 0.45 * len(names) * max(1, len(methods) / 2)))
    y = np.arange(len(names))
    for i, m in enumerate(methods):
        stats = [per_method[m].get(group, {}).get(n) for n in names]
        mean = [s["mean"] if s else np.nan for s in stats]
        ax.barh(y + i * height, mean, height, xerr=_errors(stats), capsize=3, label=m, color=COLOURS.get(m))
    ax.set_yticks(y + height * (len(methods) - 1) / 2)
    ax.set_yticklabels(names)
    ax.invert_yaxis()
    ax.set_xlabel(f"{title} (mean, {interval})")
    ax.legend(loc="best", fontsize=8)
    ax.set_title(f"{title} per {group}")
    return _save(fig, path)


def shots_curve(summary: dict, metric: str, title: str, path: Path, interval: str = "95% CI over episodes") -> str:
    """``metric`` of every method against the number of shots, with 95% CI error bars (``interval``: their name)."""
    plt = _pyplot()
    shots = sorted(int(k) for k in summary)
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for m in ordered_methods(summary[str(shots[0])][metric]):
        s = [summary[str(k)][metric].get(m, {}).get("all") for k in shots]
        mean = [x["mean"] for x in s]
        ax.errorbar(shots, mean, yerr=_errors(s), marker="o", capsize=3, label=m, color=COLOURS.get(m))
    ax.set_xticks(shots)
    ax.set_xlabel("shots")
    ax.set_ylabel(title)
    ax.set_title(f"{title} against the number of shots\n(mean, {interval})", fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def reliability(summary: dict, path: Path) -> str:
    """Reliability diagram of the trained learner, one panel per number of shots."""
    plt = _pyplot()
    shots = sorted(int(k) for k in summary)
    fig, axes = plt.subplots(1, len(shots), figsize=(4 * len(shots), 4), squeeze=False)
    for ax, k in zip(axes[0], shots, strict=True):
        bins = summary[str(k)]["calibration"]["trained"]
        ece = summary[str(k)]["ece"]["trained"]["all"]
        centres = [(b["lo"] + b["hi"]) / 2 for b in bins]
        acc = [b["accuracy"] if b["count"] else 0.0 for b in bins]
        ax.bar(centres, acc, width=bins[0]["hi"] - bins[0]["lo"], edgecolor="k", alpha=0.7, label="accuracy")
        ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
        for c, b in zip(centres, bins, strict=True):
            if b["count"]:
                ax.text(c, 0.02, str(b["count"]), ha="center", fontsize=6, rotation=90)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("confidence (top-class probability)")
        ax.set_ylabel("accuracy")
        interval = f" [{ece['ci_low']:.3f}, {ece['ci_high']:.3f}]" if ece.get("ci_low") is not None else ""
        ax.set_title(f"{k}-shot: ECE {ece['mean']:.3f}{interval}")
        ax.legend(fontsize=7, loc="upper left")
    return _save(fig, path)


def _norm(img) -> np.ndarray:
    a = np.asarray(img, dtype=np.float64)
    lo, hi = float(a.min()), float(a.max())
    return (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)


def best_worst_panel(best: Sequence[dict], worst: Sequence[dict], task: Task | str, path: Path) -> str | None:
    """Rows of episodes (best first, then worst). Masks: support with its mask, query, truth, prediction;
    classes: one support image per class, then queries titled truth → prediction."""
    rows = [("best", e) for e in best] + [("worst", e) for e in worst]
    if not rows:
        return None
    plt = _pyplot()
    if get_task(task).dense:
        cols = 4
        fig, axes = plt.subplots(len(rows), cols, figsize=(2.2 * cols, 2.3 * len(rows)), squeeze=False)
        for r, (kind, e) in enumerate(rows):
            panels = [(e["support_image"], e["support_mask"], "support + mask"), (e["query_image"], None, "query"),
                      (e["query_image"], e["truth"], "truth"), (e["query_image"], e["prediction"], "prediction")]
            for c, (img, mask, title) in enumerate(panels):
                ax = axes[r, c]
                ax.imshow(_norm(img).T, cmap="gray", origin="lower")
                if mask is not None:
                    ax.contour(np.asarray(mask, dtype=float).T, levels=[0.5], colors="r" if c == 3 else "lime",
                               linewidths=1, origin="lower")
                radiological(ax)
                ax.set_xticks([])
                ax.set_yticks([])
                ax.set_title(title if r == 0 else "", fontsize=8)
            axes[r, 0].set_ylabel(f"{kind}: ep {e['episode']}\n{e['classes'][0]}\nDice {e['score']:.2f}", fontsize=7)
    else:
        n_sup = max(len(e["support_images"]) for _, e in rows)
        n_q = max(len(e["query_images"]) for _, e in rows)
        cols = n_sup + n_q
        fig, axes = plt.subplots(len(rows), cols, figsize=(1.4 * cols, 1.7 * len(rows)), squeeze=False)
        for r, (kind, e) in enumerate(rows):
            for c in range(cols):
                ax = axes[r, c]
                ax.set_xticks([])
                ax.set_yticks([])
                if c < len(e["support_images"]):
                    ax.imshow(_norm(e["support_images"][c]), cmap="gray")
                    ax.set_title(f"S: {e['classes'][c]}", fontsize=6)
                elif n_sup <= c < n_sup + len(e["query_images"]):
                    j = c - n_sup
                    t, p = int(e["truth"][j]), int(e["prediction"][j])
                    ax.imshow(_norm(e["query_images"][j]), cmap="gray")
                    ax.set_title(f"Q: {e['classes'][t]}\n→ {e['classes'][p]}", fontsize=6, color="g" if t == p else "r")
                else:
                    ax.axis("off")
            axes[r, 0].set_ylabel(f"{kind}: ep {e['episode']}\nacc {e['score']:.2f}", fontsize=7)
    fig.suptitle("best and worst test episodes (trained learner)", fontsize=9)
    return _save(fig, path)


def evaluation_figures(out: Path, context: dict, summary: dict, task: Task, panels: PanelKeeper | None) -> dict:
    """Every figure of the report; returns ``{figure name: file name}``."""
    metrics, groups = task.report_metrics, task.report_groups
    figures: dict[str, str] = {}
    first = str(context["shots"][0])
    headline = next(iter(metrics))
    interval = context.get("interval")
    given: dict = interval if isinstance(interval, dict) else {}
    label = INTERVAL_LABELS.get(given.get("name", EPISODE_T), "95% CI")
    ece_label = INTERVAL_LABELS[EPISODE_BOOTSTRAP] if given.get("name", EPISODE_T) == EPISODE_T else label  # pooled
    for g in groups:
        f = group_bars(summary[first][headline], g, f"{metrics[headline]}, {first}-shot", out / f"per_{g}.png", label)
        if f:
            figures[f"{metrics[headline]} per {g} ({first}-shot)"] = f
    for m, title in metrics.items():
        if len(context["shots"]) > 1 or m == headline:
            figures[f"{title} against shots"] = shots_curve(summary, m, title, out / f"{m}_vs_shots.png",
                                                                ece_label if m == "ece" else label)
    if "calibration" in summary[first]:
        figures["reliability diagram"] = reliability(summary, out / "reliability.png")
    if panels is not None:
        best, worst = panels.best_worst()
        f = best_worst_panel(best, worst, task, out / "best_worst.png")
        if f:
            figures["best and worst episodes"] = f
    return figures
