"""Summaries -> report files: ``results.json`` and ``results.md`` of ``imaging-meta test`` (`write_report`) and of
``imaging-meta evaluate`` (`write_evaluation_report`, with ``records.csv`` and the PNG figures), and the
``imaging-meta compare`` table (`compare_runs`). The statistics are in `imaging_meta.evaluation.statistics`.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

from datamodules.io.atomic import atomic_write_text
from imaging_meta.evaluation.methods import TRAINED, ordered_methods
from imaging_meta.tasks import SEGMENTATION, Task, get_task

#: metrics of which a lower value is better (marked so in the tables)
LOWER_IS_BETTER = {"hd95", "ece"}


def _md(text: str) -> str:
    """Escape a value for a Markdown table cell (site keys contain '|')."""
    return str(text).replace("|", "\\|")


def _digits(metric: str) -> int:
    return 2 if metric == "hd95" else 3  # millimetres


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
    task: Task | str = SEGMENTATION,
) -> tuple[Path, Path]:
    """Write ``results.json`` (summary + context) and ``results.md`` into ``out_dir`` (``imaging-meta test``).

    The table has the task's metric and report rows (`Task.groups`); ``context["n_way"]`` adds the chance
    level where the task has one.
    """
    task = get_task(task)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    js, md = out / "results.json", out / "results.md"
    atomic_write_text(js, json.dumps(json_safe({"context": context, "summary": summary}), indent=1, default=str, allow_nan=False))
    lines = [f"# Results: {context.get('title', 'test episodes')}", ""]
    for k in ("protocol", "n_way", "n_shot", "n_query", "test_organs", "test_classes", "episodes", "episodes_sha256",
              "checkpoint", "machine"):
        if k in context:
            lines.append(f"- {k}: {context[k]}")
    chance = task.chance(context.get("n_way"))
    if chance is not None:
        lines.append(f"- chance: {chance:.3f}")
    lines += ["", to_markdown(summary, methods, title=task.metric_title, groups=task.groups)]
    atomic_write_text(md, "\n".join(lines))
    return js, md


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


# ---------------------------------------------------------------- imaging-meta evaluate: the report
def citation(context: dict, summary: dict) -> str:
    """One sentence that quotes the headline number with everything needed to reproduce it."""
    task = get_task(context["task"])
    parts = []
    for k in context["shots"]:
        s = summary[str(k)][task.metric][TRAINED]["all"]
        sha = context["episode_files"][str(k)]["sha256"][:12]
        parts.append(f"{k}-shot {task.metric_title} {s['mean']:.3f} ± {s['ci95']:.3f} (mean ± 95% CI over "
                     f"{s['n_episodes']} episodes, episodes sha256 {sha}…)")
    return (f"{context['learner'].rsplit('.', 1)[-1]}, {context['protocol']} protocol: " + "; ".join(parts)
            + f"; checkpoint sha256 {context['checkpoint_sha256'][:12]}…, imaging-meta {context['versions']['imaging_meta']}"
            + f" at commit {context['git_commit'][:12]}.")


def _metric_notes(context: dict, metrics: Sequence[str]) -> list[str]:
    """How the report's metrics were computed, one line per concern, for the metrics it has."""
    lines = []
    if "hd95" in metrics:
        lines.append(f"- masks: probability > {context['threshold']}; HD95 in mm at {context['pixel_spacing_mm']} mm pixels; "
                     "an empty prediction scores the image diagonal")
    if "ece" in metrics:
        lines.append(f"- chance accuracy: {context['data'].get('chance', float('nan')):.3f}; ECE: 15 bins, pooled over queries, "
                     "shown as value [2.5th, 97.5th percentile] of 1,000 bootstrap resamples of episodes")
    if "balanced_acc" in metrics:
        lines.append("- balanced accuracy and macro AUC are computed per episode (per class: its recall and one-vs-rest "
                     "AUC); with balanced queries, balanced accuracy equals accuracy. Per site, they use the episodes "
                     "whose queries all come from that site (the others form 'mixed sites'), while accuracy is per query")
    return lines


def _evaluation_markdown(context: dict, summary: dict, task: Task, figures: dict) -> str:
    """The text of an evaluation's ``results.md``."""
    lines = [f"# Evaluation: {context['name']}", "",
             f"- task: {context['task']}; protocol: **{context['protocol']}**; learner: `{context['learner']}`",
             f"- checkpoint: {context['checkpoint']} (sha256 `{context['checkpoint_sha256']}`)",
             f"- seed: {context['seed']}; shots: {context['shots']}; episodes per shot: {context['episodes_per_shot']}"]
    for k, f in context["episode_files"].items():
        lines.append(f"- {k}-shot episodes: `{f['file']}` ({f['n_episodes']} episodes, sha256 `{f['sha256']}`)")
    lines += _metric_notes(context, task.report_metrics)
    patients = (context["data"].get("patients") or {}).get("test")
    lines.append("- 95% CIs are over episodes, which resample the same test patients"
                 + (f" ({patients} here)" if patients else "") + ": they hold for these patients, not for a new cohort")
    v = context["versions"]
    lines.append("- versions: " + ", ".join(f"{k} {v[k]}" for k in v) + f"; git commit `{context['git_commit']}`")
    lines += ["", "**Cite as:** " + citation(context, summary), ""]
    for k in context["shots"]:
        lines += [f"## {k}-shot", ""]
        for m, title in task.report_metrics.items():
            per_method = summary[str(k)][m]
            arrow = " (lower is better)" if m in LOWER_IS_BETTER else ""
            groups = ("site",) if m == "ece" else task.report_groups  # ECE is pooled: no per-class cells
            lines += [f"### {title}{arrow}", "",
                      to_markdown(per_method, ordered_methods(per_method), title, groups, digits=_digits(m)), ""]
    lines += ["## Figures", ""]
    for name, f in figures.items():
        lines.append(f"- {name}: ![{name}]({f})")
    return "\n".join(lines) + "\n"


def write_evaluation_report(out_dir: str | os.PathLike, context: dict, summary: dict, records: Sequence[dict],
                            panels=None) -> tuple[Path, Path]:
    """Write ``results.json``, ``records.csv``, ``results.md`` and the PNG plots into ``out_dir``.

    Args:
        out_dir: the run folder.
        context: what was evaluated and how (``task`` names the `Task`).
        summary: `imaging_meta.evaluation.statistics.evaluation_summary` of ``records``.
        records: the per-query records (`imaging_meta.evaluation.scoring.score_batch`).
        panels: a `imaging_meta.evaluation.plots.PanelKeeper`, or None for no panel figure.

    Returns:
        The paths of ``results.json`` and ``results.md``.
    """
    from imaging_meta.evaluation import plots

    task = get_task(context["task"])
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    figures = plots.evaluation_figures(out, context, summary, task, panels)
    js = out / "results.json"
    doc = json_safe({"context": context, "summary": summary, "figures": figures})
    atomic_write_text(js, json.dumps(doc, indent=1, sort_keys=True, allow_nan=False))
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(task.csv_columns)
    w.writerows(task.csv_row(r) for r in records)
    atomic_write_text(out / "records.csv", buf.getvalue())
    md = out / "results.md"
    atomic_write_text(md, _evaluation_markdown(context, summary, task, figures))
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
        runs.append(json.loads(f.read_text()))
    shots = sorted({int(k) for doc in runs for k in doc["context"]["shots"]})
    for doc in runs:
        ctx, summ = doc["context"], doc["summary"]
        metrics = get_task(ctx["task"]).report_metrics
        for k in shots:
            if str(k) not in summ:
                continue
            shas[(ctx["task"], ctx["protocol"], k)].add(ctx["episode_files"][str(k)]["sha256"])
            cells = [f"{m}: {stat_cell(summ[str(k)][m].get(TRAINED, {}).get('all'), _digits(m))}" for m in metrics]
            rows.append(f"| {_md(ctx['name'])} | {ctx['protocol']} | {ctx['learner'].rsplit('.', 1)[-1]} | {k} | "
                        + "; ".join(cells) + f" | `{ctx['episode_files'][str(k)]['sha256'][:12]}` |")
    lines = ["| run | protocol | learner | shots | trained (mean ± 95% CI) | episodes sha256 |", "|---|---|---|---|---|---|"]
    lines += rows
    notes = [f"- {task}, {protocol}, {k}-shot: {len(s)} different episode files; those rows are not on the same episodes"
             for (task, protocol, k), s in sorted(shas.items()) if len(s) > 1]
    return "\n".join(lines) + "\n" + ("\n" + "\n".join(notes) + "\n" if notes else "")
