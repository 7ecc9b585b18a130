"""Per-query records -> mean ± 95% confidence intervals: the statistics of every report.

A record is one query prediction of one episode (see `imaging_meta.evaluation.scoring.score_batch`): at
least ``method``, ``episode``, ``site`` and the task's metric, plus ``organ`` (segmentation) or ``class``,
``classes``, ``label`` and ``probs`` (classification). Scores are first averaged within an episode, then the
CI is taken over episodes (the unit that is sampled), with Student's t quantile.

`summarize` serves ``imaging-meta test`` and the validation logs; `evaluation_summary` the report of
``imaging-meta evaluate``, where a `Task` names its report metrics and each is summarised by its name.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Sequence

import numpy as np
import torch
from scipy import stats

from imaging_meta.evaluation.metrics import balanced_accuracy, calibration_bins, macro_auc, ovr_auc
from imaging_meta.tasks import Task


def mean_ci(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float]:
    """Mean and half-width of its ``confidence`` interval (Student's t); NaN half-width for one value (one
    episode says nothing about the spread)."""
    n = len(values)
    if n == 0:
        return float("nan"), float("nan")
    mean = sum(values) / n
    if n == 1:
        return mean, float("nan")
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return mean, float(stats.t.ppf(0.5 + confidence / 2, n - 1) * sd / math.sqrt(n))


def summarize(records: Iterable[dict], metric: str = "dice", groups: Sequence[str] = ("organ", "site")) -> dict:
    """Mean ± 95% CI of ``metric`` per method, overall and per value of each grouping field.

    The unit of the CI is the episode. Overall, a method's score on an episode is the mean over its queries.
    Per group value (an organ, a class, a site), it is the mean over the episode's queries with that value,
    and the CI is over the episodes that have such queries: a class seen in 40 episodes gets a CI over 40.

    Returns:
        ``{method: {"all": stat, "<group>": {value: stat}, ...}}`` with ``stat = {"mean", "ci95", "n_episodes"}``.
    """
    cells: dict[tuple, list[float]] = defaultdict(list)
    methods: list[str] = []
    for r in records:
        if r["method"] not in methods:
            methods.append(r["method"])
        v = float(r[metric])
        cells[(r["method"], "all", "", r["episode"])].append(v)
        for g in groups:
            cells[(r["method"], g, str(r[g]), r["episode"])].append(v)
    by: dict[tuple, list[float]] = defaultdict(list)
    for (method, g, value, _ep), vals in sorted(cells.items(), key=lambda kv: tuple(str(x) for x in kv[0])):
        by[(method, g, value)].append(sum(vals) / len(vals))

    def stat(vals):
        m, h = mean_ci(vals)
        return {"mean": m, "ci95": h, "n_episodes": len(vals)}

    out = {}
    for method in sorted(methods):
        entry = {"all": stat(by[(method, "all", "")])}
        for g in groups:
            entry[g] = {value: stat(v) for (m, gg, value), v in sorted(by.items()) if m == method and gg == g}
        out[method] = entry
    return out


def _by_shot(records: Sequence[dict]) -> dict[int, list[dict]]:
    out: dict[int, list[dict]] = defaultdict(list)
    for r in records:
        out[int(r["shot"])].append(r)
    return dict(sorted(out.items()))


def _episode_site(sites: Sequence[str]) -> str:
    return sites[0] if len(set(sites)) == 1 else "mixed sites"


def ece_bootstrap(records: Sequence[dict], n_bins: int = 15, n_boot: int = 1000, seed: int = 0) -> dict:
    """ECE pooled over every query, with a 95% interval from a seeded bootstrap over episodes.

    ECE is not an average of per-episode scores (an episode of 25 queries is too few to bin), so its CI
    resamples whole episodes: the pooled ECE of each resample, and the 2.5th and 97.5th percentiles.

    Returns:
        ``{"mean", "ci95", "ci_low", "ci_high", "n_episodes"}`` (``mean`` is the pooled ECE; ``ci95`` half the
        interval's width).
    """
    episodes = sorted({r["episode"] for r in records})
    pos = {e: i for i, e in enumerate(episodes)}
    stats_ = np.zeros((len(episodes), n_bins, 3))  # count, sum of confidence, sum of correct
    for r in records:
        p = np.asarray(r["probs"])
        conf, pred = float(p.max()), int(p.argmax())
        b = min(int(conf * n_bins), n_bins - 1)
        stats_[pos[r["episode"]], b] += (1.0, conf, float(pred == r["label"]))

    def ece(total):  # total: (..., n_bins, 3)
        n = total[..., 0]
        gap = np.abs(total[..., 2] - total[..., 1])  # |sum correct - sum confidence| = count * |acc - conf|
        return gap.sum(-1) / np.maximum(n.sum(-1), 1)

    point = float(ece(stats_.sum(0)))
    rng = np.random.default_rng(seed)
    weights = rng.multinomial(len(episodes), np.full(len(episodes), 1 / len(episodes)), size=n_boot)  # (B, E)
    boot = ece(np.einsum("be,ekc->bkc", weights, stats_))
    if len(episodes) < 2:
        return {"mean": point, "ci95": float("nan"), "ci_low": None, "ci_high": None, "n_episodes": len(episodes)}
    lo, hi = (float(x) for x in np.percentile(boot, [2.5, 97.5]))
    return {"mean": point, "ci95": (hi - lo) / 2, "ci_low": lo, "ci_high": hi, "n_episodes": len(episodes)}


def _per_episode_rows(recs: Sequence[dict]) -> tuple[list[dict], list[dict]]:
    """Per (method, episode): balanced accuracy and macro AUC over its queries (rows with ``balanced_acc``),
    and each class's one-vs-rest AUC in it (rows with ``auc_class``)."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in recs:
        groups[(r["method"], r["episode"])].append(r)
    ep_rows, cls_rows = [], []
    for (method, ep), rs in groups.items():
        probs = torch.tensor([r["probs"] for r in rs], dtype=torch.float64)
        labels = torch.tensor([r["label"] for r in rs])
        n = probs.shape[1]
        site = _episode_site([r["site"] for r in rs])
        ep_rows.append({"method": method, "episode": ep, "site": site, "class": "",
                        "balanced_acc": balanced_accuracy(probs, labels, n), "auc": macro_auc(probs, labels, n)})
        for c in range(n):  # per class: its one-vs-rest AUC in this episode
            if (labels == c).any() and (labels != c).any():
                cls_rows.append({"method": method, "episode": ep, "site": None, "class": rs[0]["classes"][c],
                                 "auc_class": ovr_auc(probs[:, c], labels == c)})
    return ep_rows, cls_rows


def _reliability(recs: Sequence[dict], n_bins: int) -> dict:
    """The reliability-diagram bins of each method (see `calibration_bins`)."""
    out = {}
    for method in sorted({r["method"] for r in recs}):
        mine = [r for r in recs if r["method"] == method]
        conf = torch.tensor([max(r["probs"]) for r in mine], dtype=torch.float64)
        correct = torch.tensor([float(int(np.argmax(r["probs"])) == r["label"]) for r in mine])
        out[method] = calibration_bins(conf, correct, n_bins)
    return out


def _balanced_accuracy(recs: Sequence[dict], groups: Sequence[str], seed: int, n_bins: int) -> dict:
    """Per episode over its queries; per class, that class's recall (its per-query accuracy)."""
    out = summarize(_per_episode_rows(recs)[0], "balanced_acc", ("site",))
    if "class" in groups:
        for method, s in summarize(recs, "acc", ("class",)).items():
            out[method]["class"] = s["class"]
    return out


def _macro_auc(recs: Sequence[dict], groups: Sequence[str], seed: int, n_bins: int) -> dict:
    """Per episode over its queries; per class, its one-vs-rest AUC in each episode."""
    ep_rows, cls_rows = _per_episode_rows(recs)
    out = summarize(ep_rows, "auc", ("site",))
    if "class" in groups:
        for method, s in summarize(cls_rows, "auc_class", ("class",)).items():
            out[method]["class"] = s["class"]
    return out


def _ece(recs: Sequence[dict], groups: Sequence[str], seed: int, n_bins: int) -> dict:
    """Pooled over the queries of each method, overall and per query site, with a bootstrap interval."""
    out = {}
    for method in sorted({r["method"] for r in recs}):
        mine = [r for r in recs if r["method"] == method]
        sites = sorted({r["site"] for r in mine})
        out[method] = {"all": ece_bootstrap(mine, n_bins, seed=seed),
                       "site": {site: ece_bootstrap([r for r in mine if r["site"] == site], n_bins, seed=seed) for site in sites}}
    return out


#: how a report metric is summarised when it is not a per-query mean (`summarize`), by its name
SUMMARIES = {"balanced_acc": _balanced_accuracy, "auc": _macro_auc, "ece": _ece}


def evaluation_summary(task: Task, records: Sequence[dict], seed: int = 0, n_bins: int = 15) -> dict:
    """The ``imaging-meta evaluate`` summary of per-query records, shot by shot.

    Each of the task's report metrics is summarised by its name: a per-query score (Dice, HD95, accuracy; per
    class: the recall of that class in each episode) as the mean over an episode's queries (`summarize`, with
    the task's report rows); balanced accuracy and macro AUC per episode over its queries (per class: that
    class's recall and one-vs-rest AUC); ECE pooled (see `ece_bootstrap`), with the reliability-diagram bins
    of each method under ``calibration``.

    Returns:
        ``{shot: {metric: {method: {"all", <report row>: {...}}}, "calibration": ...}}`` (shots as strings).
    """
    out: dict = {}
    for k, recs in _by_shot(records).items():
        summary_k = {m: SUMMARIES[m](recs, task.report_groups, seed, n_bins) if m in SUMMARIES
                     else summarize(recs, m, task.report_groups) for m in task.report_metrics}
        if "ece" in task.report_metrics:
            summary_k["calibration"] = _reliability(recs, n_bins)
        out[str(k)] = summary_k
    return out
