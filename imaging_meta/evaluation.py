"""Episode-level results -> mean ± 95% confidence interval tables (JSON and Markdown).

A record is one query prediction of one episode: ``{"method", "episode", "organ", "site", "dice"}`` for
segmentation, ``{"method", "episode", "class", "site", "acc"}`` for classification.
Scores are first averaged within an episode, then the CI is taken over episodes (the unit that is
sampled), with Student's t quantile.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
from scipy import stats

from datamodules.atomic import atomic_write_text
from imaging_meta.metrics import balanced_accuracy, calibration_bins, macro_auc, ovr_auc

#: the methods every test episode scores: the learner, the learner at its initial weights, copying the support mask
TRAINED, UNTRAINED, COPY_MASK = "trained", "untrained encoder", "copy support mask"


def ordered_methods(methods) -> list[str]:
    """The methods present in ``methods`` (names, or a dict keyed by them): ours first, others sorted."""
    order = [TRAINED, UNTRAINED, COPY_MASK]
    return [m for m in order if m in methods] + sorted(m for m in methods if m not in order)


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


def _md(text: str) -> str:
    """Escape a value for a Markdown table cell (site keys contain '|')."""
    return str(text).replace("|", "\\|")


def to_markdown(summary: dict, methods: Sequence[str] | None = None, title: str = "Dice",
                groups: Sequence[str] = ("organ", "site"), digits: int = 3) -> str:
    """A Markdown table: one row per group value, one column per method (cells as `stat_cell`)."""
    methods = list(methods or summary)
    first = summary[methods[0]]
    header = f"| {title} (mean ± 95% CI) | " + " | ".join(_md(m) for m in methods) + " | episodes |"
    lines = [header, "|" + "---|" * (len(methods) + 2)]
    lines.append("| **all** | " + " | ".join(stat_cell(summary[m]["all"], digits) for m in methods)
                 + f" | {first['all']['n_episodes']} |")
    for g in groups:
        for name in first.get(g, {}):
            cells = [stat_cell(summary[m].get(g, {}).get(name), digits) for m in methods]
            lines.append(f"| {g}: {_md(name)} | " + " | ".join(cells) + f" | {first[g][name]['n_episodes']} |")
    return "\n".join(lines) + "\n"




def write_report(
    out_dir: str | os.PathLike,
    summary: dict,
    context: dict,
    methods: Sequence[str] | None = None,
    groups: Sequence[str] = ("organ", "site"),
) -> tuple[Path, Path]:
    """Write ``results.json`` (summary + context) and ``results.md`` into ``out_dir``.

    ``context["metric"]`` (``dice`` or ``acc``) titles the table; ``context["n_way"]`` adds the chance level.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    js, md = out / "results.json", out / "results.md"
    atomic_write_text(js, json.dumps(json_safe({"context": context, "summary": summary}), indent=1, default=str, allow_nan=False))
    lines = [f"# Results: {context.get('title', 'test episodes')}", ""]
    for k in ("protocol", "n_way", "n_shot", "n_query", "test_organs", "test_classes", "episodes", "episodes_sha256",
              "checkpoint", "machine"):
        if k in context:
            lines.append(f"- {k}: {context[k]}")
    if context.get("metric") == "acc" and context.get("n_way"):
        lines.append(f"- chance: {1 / int(context['n_way']):.3f}")
    title = {"dice": "Dice", "acc": "accuracy"}.get(context.get("metric", "dice"), str(context.get("metric")))
    lines += ["", to_markdown(summary, methods, title=title, groups=groups)]
    atomic_write_text(md, "\n".join(lines))
    return js, md


# ---------------------------------------------------------------- imaging-meta evaluate: summaries
SEG_METRICS = {"dice": "Dice", "hd95": "HD95 (mm)"}
CLS_METRICS = {"acc": "accuracy", "balanced_acc": "balanced accuracy", "auc": "macro AUC", "ece": "ECE"}
LOWER_IS_BETTER = {"hd95", "ece"}


def _by_shot(records: Sequence[dict]) -> dict[int, list[dict]]:
    out: dict[int, list[dict]] = defaultdict(list)
    for r in records:
        out[int(r["shot"])].append(r)
    return dict(sorted(out.items()))


def segmentation_summary(records: Sequence[dict]) -> dict:
    """``{shot: {"dice"|"hd95": {method: {"all", "organ", "site"}}}}`` from per-query records."""
    return {str(k): {m: summarize(recs, m, ("organ", "site")) for m in SEG_METRICS} for k, recs in _by_shot(records).items()}


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


def classification_summary(records: Sequence[dict], seed: int = 0, n_bins: int = 15) -> dict:
    """``{shot: {metric: {method: {"all", "class", "site"}}}, "calibration": ...}`` from per-query records.

    Accuracy is per query (per class: the recall of that class in each episode). Balanced accuracy and
    macro AUC are computed per episode over its queries (per class: that class's recall and one-vs-rest AUC).
    ECE is pooled (see `ece_bootstrap`). ``calibration`` holds the reliability-diagram bins of each method.
    """
    out: dict = {}
    for k, recs in _by_shot(records).items():
        per_query, per_episode = [], []
        groups: dict[tuple, list[dict]] = defaultdict(list)
        for r in recs:
            p = np.asarray(r["probs"])
            name = r["classes"][r["label"]]
            per_query.append({**{x: r[x] for x in ("method", "episode", "site")}, "class": name,
                              "acc": float(int(p.argmax()) == r["label"])})
            groups[(r["method"], r["episode"])].append(r)
        for (method, ep), rs in groups.items():
            probs = torch.tensor([r["probs"] for r in rs], dtype=torch.float64)
            labels = torch.tensor([r["label"] for r in rs])
            n = probs.shape[1]
            site = _episode_site([r["site"] for r in rs])
            per_episode.append({"method": method, "episode": ep, "site": site, "class": "",
                                "balanced_acc": balanced_accuracy(probs, labels, n), "auc": macro_auc(probs, labels, n)})
            for c in range(n):  # per class: its one-vs-rest AUC in this episode
                if (labels == c).any() and (labels != c).any():
                    per_episode.append({"method": method, "episode": ep, "site": None, "class": rs[0]["classes"][c],
                                        "auc_class": ovr_auc(probs[:, c], labels == c)})
        summary_k: dict = {"acc": summarize(per_query, "acc", ("class", "site"))}
        ep_rows = [r for r in per_episode if "balanced_acc" in r]
        cls_rows = [r for r in per_episode if "auc_class" in r]
        summary_k["balanced_acc"] = summarize(ep_rows, "balanced_acc", ("site",))
        for method, s in summary_k["acc"].items():  # a class's balanced accuracy is its recall
            summary_k["balanced_acc"][method]["class"] = s["class"]
        summary_k["auc"] = summarize(ep_rows, "auc", ("site",))
        for method, s in summarize(cls_rows, "auc_class", ("class",)).items():
            summary_k["auc"][method]["class"] = s["class"]
        summary_k["ece"] = {}
        calibration = {}
        for method in sorted({r["method"] for r in recs}):
            mine = [r for r in recs if r["method"] == method]
            entry = {"all": ece_bootstrap(mine, n_bins, seed=seed), "site": {}}
            for site in sorted({r["site"] for r in mine}):
                entry["site"][site] = ece_bootstrap([r for r in mine if r["site"] == site], n_bins, seed=seed)
            summary_k["ece"][method] = entry
            conf = torch.tensor([max(r["probs"]) for r in mine], dtype=torch.float64)
            correct = torch.tensor([float(int(np.argmax(r["probs"])) == r["label"]) for r in mine])
            calibration[method] = calibration_bins(conf, correct, n_bins)
        summary_k["calibration"] = calibration
        out[str(k)] = summary_k
    return out



# ---------------------------------------------------------------- imaging-meta evaluate: panels and report
class PanelKeeper:
    """Keeps the ``n`` best and ``n`` worst test episodes of the trained learner (by mean Dice or accuracy
    over their queries), with what a reader needs to see them: support, query, truth and prediction.

    Ties are broken by episode number, so the panel is as reproducible as the scores.
    """

    def __init__(self, task: str, n: int, threshold: float = 0.5) -> None:
        self.task, self.n, self.threshold = task, int(n), float(threshold)
        self.kept: list[dict] = []

    def offer(self, batch, probs: torch.Tensor, records: Sequence[dict], first: int) -> None:
        """Consider the tasks of ``batch``; ``records`` are the trained learner's per-query records."""
        scores: dict[int, list[float]] = defaultdict(list)
        for r in records:
            if self.task == "segmentation":
                scores[r["episode"]].append(r["dice"])
            else:
                scores[r["episode"]].append(float(int(np.argmax(r["probs"])) == r["label"]))
        for i in range(batch.n_tasks):
            ep = first + i
            item = {"episode": ep, "score": sum(scores[ep]) / len(scores[ep]), "classes": list(batch.classes[i]),
                    "site": str(batch.site[i])}
            if self.task == "segmentation":
                item |= {"support_image": batch.support_images[i, 0, 0].float().cpu(),
                         "support_mask": batch.support_labels[i, 0].float().cpu(),
                         "query_image": batch.query_images[i, 0, 0].float().cpu(),
                         "truth": batch.query_labels[i, 0].float().cpu(),
                         "probability": probs[i, 0].float().cpu()}
            else:
                first_of = [int((batch.support_labels[i] == c).nonzero()[0]) for c in range(len(batch.classes[i]))]
                q = min(6, batch.query_images.shape[1])
                item |= {"support_images": batch.support_images[i, first_of, 0].float().cpu(),
                         "query_images": batch.query_images[i, :q, 0].float().cpu(),
                         "truth": batch.query_labels[i, :q].cpu(), "prediction": probs[i, :q].argmax(-1).cpu()}
            self.kept.append(item)
        self.kept.sort(key=lambda d: (-d["score"], d["episode"]))
        if len(self.kept) > 2 * self.n:
            self.kept = self.kept[: self.n] + self.kept[-self.n :]

    def best_worst(self) -> tuple[list[dict], list[dict]]:
        k = min(self.n, len(self.kept) // 2) if len(self.kept) < 2 * self.n else self.n
        return self.kept[:k], self.kept[::-1][:k]


def stat_cell(s: dict | None, digits: int = 3) -> str:
    """``mean ± half-width``; a bootstrap interval (ECE) as ``value [low, high]``; ``n/a`` without a spread."""
    if s is None or s.get("mean") is None or _isnan(s["mean"]):
        return "—"
    if "ci_low" in s:
        if s["ci_low"] is None:
            return f"{s['mean']:.{digits}f} [n/a]"
        return f"{s['mean']:.{digits}f} [{s['ci_low']:.{digits}f}, {s['ci_high']:.{digits}f}]"
    if s.get("ci95") is None or _isnan(s["ci95"]):
        return f"{s['mean']:.{digits}f} ± n/a"
    return f"{s['mean']:.{digits}f} ± {s['ci95']:.{digits}f}"


def _isnan(v) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def json_safe(obj):
    """``obj`` with every NaN or infinite float replaced by None, so that it is strict JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def citation(context: dict, summary: dict) -> str:
    """One sentence that quotes the headline number with everything needed to reproduce it."""
    metric = "dice" if context["task"] == "segmentation" else "acc"
    name = {"dice": "Dice", "acc": "accuracy"}[metric]
    parts = []
    for k in context["shots"]:
        s = summary[str(k)][metric]["trained"]["all"]
        sha = context["episode_files"][str(k)]["sha256"][:12]
        parts.append(f"{k}-shot {name} {s['mean']:.3f} ± {s['ci95']:.3f} (mean ± 95% CI over {s['n_episodes']} "
                     f"episodes, episodes sha256 {sha}…)")
    return (f"{context['learner'].rsplit('.', 1)[-1]}, {context['protocol']} protocol: " + "; ".join(parts)
            + f"; checkpoint sha256 {context['checkpoint_sha256'][:12]}…, imaging-meta {context['versions']['imaging_meta']}"
            + f" at commit {context['git_commit'][:12]}.")


def write_evaluation_report(out_dir: str | os.PathLike, context: dict, summary: dict, records: Sequence[dict],
                            panels: PanelKeeper | None = None) -> tuple[Path, Path]:
    """Write ``results.json``, ``records.csv``, ``results.md`` and the PNG plots into ``out_dir``.

    Returns:
        The paths of ``results.json`` and ``results.md``.
    """
    from imaging_meta import plots

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    seg = context["task"] == "segmentation"
    metrics = SEG_METRICS if seg else CLS_METRICS
    groups = ("organ", "site") if seg else ("class", "site")
    figures = plots.evaluation_figures(out, context, summary, metrics, groups, panels)
    js = out / "results.json"
    doc = json_safe({"context": context, "summary": summary, "figures": figures})
    atomic_write_text(js, json.dumps(doc, indent=1, sort_keys=True, allow_nan=False))
    fields = ["method", "shot", "episode", "organ" if seg else "class", "site", "query_id"] + (
        ["dice", "hd95"] if seg else ["label", "correct", "confidence", "probs"])
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(fields)
    for r in records:
        if seg:
            w.writerow([r["method"], r["shot"], r["episode"], r["organ"], r["site"], r["query_id"],
                        f"{r['dice']:.6f}", f"{r['hd95']:.4f}"])
        else:
            p = np.asarray(r["probs"])
            w.writerow([r["method"], r["shot"], r["episode"], r["classes"][r["label"]], r["site"], r["query_id"],
                        r["label"], int(int(p.argmax()) == r["label"]), f"{p.max():.6f}",
                        " ".join(f"{v:.6f}" for v in p)])
    atomic_write_text(out / "records.csv", buf.getvalue())
    lines = [f"# Evaluation: {context['name']}", "",
             f"- task: {context['task']}; protocol: **{context['protocol']}**; learner: `{context['learner']}`",
             f"- checkpoint: {context['checkpoint']} (sha256 `{context['checkpoint_sha256']}`)",
             f"- seed: {context['seed']}; shots: {context['shots']}; episodes per shot: {context['episodes_per_shot']}"]
    for k, f in context["episode_files"].items():
        lines.append(f"- {k}-shot episodes: `{f['file']}` ({f['n_episodes']} episodes, sha256 `{f['sha256']}`)")
    if seg:
        lines.append(f"- masks: probability > {context['threshold']}; HD95 in mm at {context['pixel_spacing_mm']} mm pixels; "
                     "an empty prediction scores the image diagonal")
    else:
        lines.append(f"- chance accuracy: {context['data'].get('chance', float('nan')):.3f}; ECE: 15 bins, pooled over queries, "
                     "shown as value [2.5th, 97.5th percentile] of 1,000 bootstrap resamples of episodes")
        lines.append("- balanced accuracy and macro AUC are computed per episode (per class: its recall and one-vs-rest "
                     "AUC); with balanced queries, balanced accuracy equals accuracy. Per site, they use the episodes "
                     "whose queries all come from that site (the others form 'mixed sites'), while accuracy is per query")
    patients = (context["data"].get("patients") or {}).get("test")
    lines.append("- 95% CIs are over episodes, which resample the same test patients"
                 + (f" ({patients} here)" if patients else "") + ": they hold for these patients, not for a new cohort")
    v = context["versions"]
    lines.append("- versions: " + ", ".join(f"{k} {v[k]}" for k in v) + f"; git commit `{context['git_commit']}`")
    lines += ["", "**Cite as:** " + citation(context, summary), ""]
    for k in context["shots"]:
        lines.append(f"## {k}-shot")
        lines.append("")
        for m, title in metrics.items():
            per_method = summary[str(k)][m]
            arrow = " (lower is better)" if m in LOWER_IS_BETTER else ""
            lines += [f"### {title}{arrow}", "", to_markdown(per_method, ordered_methods(per_method), title,
                                                                    groups if m != "ece" else ("site",),
                                                                    digits=2 if m == "hd95" else 3), ""]
    lines.append("## Figures")
    lines.append("")
    for name, f in figures.items():
        lines.append(f"- {name}: ![{name}]({f})")
    md = out / "results.md"
    atomic_write_text(md, "\n".join(lines) + "\n")
    return js, md


# ---------------------------------------------------------------- imaging-meta compare
def compare_runs(run_dirs: Sequence[str | os.PathLike]) -> str:
    """One Markdown table of the trained learner's headline numbers in several evaluation run folders.

    Runs of one protocol measured on different episode files (another seed or data) are flagged: their
    numbers are not paired, and only the CIs can be compared. Different protocols test different data anyway.
    """
    rows, shas = [], defaultdict(set)
    runs = []
    for d in run_dirs:
        f = Path(d) / "results.json"
        if not f.is_file():
            raise FileNotFoundError(f"{d}: no results.json; run `imaging-meta evaluate --out {d}` first")
        doc = json.loads(f.read_text())
        runs.append(doc)
    shots = sorted({int(k) for doc in runs for k in doc["context"]["shots"]})
    for doc in runs:
        ctx, summ = doc["context"], doc["summary"]
        metrics = SEG_METRICS if ctx["task"] == "segmentation" else CLS_METRICS
        for k in shots:
            if str(k) not in summ:
                continue
            shas[(ctx["task"], ctx["protocol"], k)].add(ctx["episode_files"][str(k)]["sha256"])
            cells = [f"{m}: {stat_cell(summ[str(k)][m].get('trained', {}).get('all'), 2 if m == 'hd95' else 3)}"
                     for m in metrics]
            rows.append(f"| {_md(ctx['name'])} | {ctx['protocol']} | {ctx['learner'].rsplit('.', 1)[-1]} | {k} | "
                        + "; ".join(cells) + f" | `{ctx['episode_files'][str(k)]['sha256'][:12]}` |")
    lines = ["| run | protocol | learner | shots | trained (mean ± 95% CI) | episodes sha256 |", "|---|---|---|---|---|---|"]
    lines += rows
    notes = [f"- {task}, {protocol}, {k}-shot: {len(s)} different episode files; those rows are not on the same episodes"
             for (task, protocol, k), s in sorted(shas.items()) if len(s) > 1]
    return "\n".join(lines) + "\n" + ("\n" + "\n".join(notes) + "\n" if notes else "")
