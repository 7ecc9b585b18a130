"""Episode-level results -> mean ± 95% confidence interval tables (JSON and Markdown).

A record is one query prediction of one episode: ``{"method", "episode", "organ", "site", "dice"}`` for
segmentation, ``{"method", "episode", "class", "site", "acc"}`` for classification.
Scores are first averaged within an episode, then the CI is taken over episodes (the unit that is
sampled), with Student's t quantile.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path

from scipy import stats


def mean_ci(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float]:
    """Mean and half-width of its ``confidence`` interval (Student's t); half-width 0 for one value."""
    n = len(values)
    if n == 0:
        return float("nan"), float("nan")
    mean = sum(values) / n
    if n == 1:
        return mean, 0.0
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return mean, float(stats.t.ppf(0.5 + confidence / 2, n - 1) * sd / math.sqrt(n))


def summarize(records: Iterable[dict], metric: str = "dice", groups: Sequence[str] = ("organ", "site")) -> dict:
    """Mean ± 95% CI of ``metric`` per method, overall and per value of each grouping field.

    Returns:
        ``{method: {"all": stat, "organ": {name: stat}, "site": {name: stat}}}`` with
        ``stat = {"mean", "ci95", "n_episodes"}``.
    """
    per_episode: dict[tuple, list[float]] = defaultdict(list)
    info: dict[tuple, dict] = {}
    for r in records:
        key = (r["method"], r["episode"])
        per_episode[key].append(float(r[metric]))
        info[key] = r
    by_method: dict[str, dict] = {}
    for (method, ep), vals in sorted(per_episode.items(), key=lambda kv: (kv[0][0], kv[0][1])):
        entry = by_method.setdefault(method, {"all": [], **{g: defaultdict(list) for g in groups}})
        score = sum(vals) / len(vals)
        entry["all"].append(score)
        for g in groups:
            entry[g][str(info[(method, ep)][g])].append(score)

    def stat(vals):
        m, h = mean_ci(vals)
        return {"mean": m, "ci95": h, "n_episodes": len(vals)}

    return {
        method: {"all": stat(e["all"]), **{g: {k: stat(v) for k, v in sorted(e[g].items())} for g in groups}}
        for method, e in by_method.items()
    }


def _md(text: str) -> str:
    """Escape a value for a Markdown table cell (site keys contain '|')."""
    return str(text).replace("|", "\\|")


def _cell(s: dict | None) -> str:
    return "—" if s is None else f"{s['mean']:.3f} ± {s['ci95']:.3f}"


def to_markdown(summary: dict, methods: Sequence[str] | None = None, title: str = "Dice", groups: Sequence[str] = ("organ", "site")) -> str:
    """A Markdown table: one row per group value, one column per method."""
    methods = list(methods or summary)
    first = summary[methods[0]]
    header = f"| {title} (mean ± 95% CI) | " + " | ".join(_md(m) for m in methods) + " | episodes |"
    lines = [header, "|" + "---|" * (len(methods) + 2)]
    lines.append("| **all** | " + " | ".join(_cell(summary[m]["all"]) for m in methods) + f" | {first['all']['n_episodes']} |")
    for g in groups:
        for name in first.get(g, {}):
            cells = [_cell(summary[m].get(g, {}).get(name)) for m in methods]
            lines.append(f"| {g}: {_md(name)} | " + " | ".join(cells) + f" | {first[g][name]['n_episodes']} |")
    return "\n".join(lines) + "\n"


def _atomic_write(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


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
    _atomic_write(js, json.dumps({"context": context, "summary": summary}, indent=1, default=str))
    lines = [f"# Results: {context.get('title', 'test episodes')}", ""]
    for k in ("protocol", "n_way", "n_shot", "n_query", "test_organs", "test_classes", "episodes", "episodes_sha256",
              "checkpoint", "machine"):
        if k in context:
            lines.append(f"- {k}: {context[k]}")
    if context.get("metric") == "acc" and context.get("n_way"):
        lines.append(f"- chance: {1 / int(context['n_way']):.3f}")
    title = {"dice": "Dice", "acc": "accuracy"}.get(context.get("metric", "dice"), str(context.get("metric")))
    lines += ["", to_markdown(summary, methods, title=title, groups=groups)]
    _atomic_write(md, "\n".join(lines))
    return js, md
