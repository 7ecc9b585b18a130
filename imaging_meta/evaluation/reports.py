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
from collections.abc import Collection, Sequence
from pathlib import Path

from datamodules.io.atomic import atomic_write_text
from datamodules.messages import first
from imaging_meta.evaluation.methods import TRAINED, ordered_methods
from imaging_meta.evaluation.statistics import EPISODE_BOOTSTRAP, EPISODE_T, N_BOOT, PATIENT_BOOTSTRAP
from imaging_meta.tasks import SEGMENTATION, Task, get_task

#: metrics of which a lower value is better (marked so in the tables)
LOWER_IS_BETTER = {"hd95", "ece"}
#: the first header cell of a table, by its interval: every table says which interval it shows
TABLE_HEADS = {
    PATIENT_BOOTSTRAP: "mean [95% CI, bootstrap of patients]",
    EPISODE_T: "mean ± 95% CI, Student's t over episodes",
    EPISODE_BOOTSTRAP: "value [95% CI, bootstrap of episodes]",
}


def md_cell(text: str) -> str:
    """Escape a value for a Markdown table cell: '|' (site keys contain it), and line breaks (a DICOM header field
    or a run's name with a newline broke its row in two) as spaces."""
    return " ".join(str(text).replace("|", "\\|").splitlines())


def _digits(metric: str) -> int:
    return 2 if metric == "hd95" else 3  # millimetres


def to_markdown(summary: dict, methods: Sequence[str] | None = None, title: str = "Dice",
                groups: Sequence[str] = ("organ", "site"), digits: int = 3, interval: str = EPISODE_T,
                differences: dict | None = None, reference: str = TRAINED) -> str:
    """A Markdown table: one row per group value, one column per method (cells as `stat_cell`), then one
    ``reference − baseline`` column per entry of ``differences`` (paired; **bold** where the interval excludes
    0), the episodes and, for a patient bootstrap, the patients of the row. The header names ``interval``."""
    methods = list(methods or summary)
    baselines = ordered_methods(differences or {})
    first = summary[methods[0]]
    patients = "n_patients" in first["all"]
    header = (f"| {title} ({TABLE_HEADS[interval]}) | " + " | ".join(md_cell(m) for m in methods)
              + "".join(f" | {md_cell(reference)} − {md_cell(b)}" for b in baselines) + " | episodes |" + (" patients |" if patients else ""))
    lines = [header, "|" + "---|" * (len(methods) + len(baselines) + 2 + patients)]

    def row(label: str, stats: list, own: dict) -> str:
        diffs = [diff_cell(d, digits) for d in stats[len(methods):]]
        cells = [stat_cell(x, digits) for x in stats[: len(methods)]] + diffs
        return (f"| {label} | " + " | ".join(cells) + f" | {own['n_episodes']} |"
                + (f" {own.get('n_patients', '—')} |" if patients else ""))

    def pick(table: dict, keys: list, g: str | None, name: str | None) -> list:
        return [table[k].get("all") if g is None else table[k].get(g, {}).get(name) for k in keys]

    lines.append(row("**all**", pick(summary, methods, None, None) + pick(differences or {}, baselines, None, None), first["all"]))
    for g in groups:
        for name in first.get(g, {}):
            stats = pick(summary, methods, g, name) + pick(differences or {}, baselines, g, name)
            lines.append(row(f"{g}: {md_cell(name)}", stats, first[g][name]))
    return "\n".join(lines) + "\n"


def write_report(
    out_dir: str | os.PathLike,
    summary: dict,
    context: dict,
    methods: Sequence[str] | None = None,
    task: Task | str = SEGMENTATION,
    differences: dict | None = None,
) -> tuple[Path, Path]:
    """Write ``results.json`` (summary, paired differences, context) and ``results.md`` into ``out_dir``
    (``imaging-meta test``).

    The table has the task's metric and report rows (`Task.groups`), and a ``trained − baseline`` column per
    entry of ``differences`` (`imaging_meta.evaluation.statistics.differences`); ``context["interval"]``
    names the interval (default: Student's t over episodes); ``context["n_way"]`` adds the chance level where
    the task has one.
    """
    task = get_task(task)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    js, md = out / "results.json", out / "results.md"
    doc = {"context": context, "summary": summary, "differences": differences or {}}
    atomic_write_text(js, json.dumps(json_safe(doc), indent=1, default=str, allow_nan=False))
    interval = _interval(context)
    lines = [f"# Results: {context.get('title', 'test episodes')}", ""]
    for k in ("protocol", "n_way", "n_shot", "n_query", "train_organs", "val_organs", "test_organs", "dropped_organs",
              "test_classes", "episodes", "episodes_sha256", "threshold",
              "checkpoint", "learner_settings_not_the_checkpoints", "preprocessing_not_the_checkpoints", "machine",
              "precision"):
        if k in context:
            lines.append(f"- {k}: {context[k]}")
    if "git_commit" in context:  # the source that ran the test, and that trained the model
        lines.append(f"- git commit: `{context['git_commit']}`" + fit_commits_note(context))
    classes = context.get("classes")  # classification: each stage's classes and their items
    if isinstance(classes, dict):
        for stage, counts in classes.items():
            if counts:
                lines.append(f"- {stage} classes: " + ", ".join(f"{c} ({n})" for c, n in counts.items()))
    if context.get("dropped_classes"):
        lines.append(f"- dropped classes: {context['dropped_classes']}")
    chance = task.chance(context.get("n_way"))
    if chance is not None:
        lines.append(f"- chance: {chance:.3f}")
    lines += _interval_notes(interval, test_patients(context), bool(differences))
    lines += ["", to_markdown(summary, methods, title=task.metric_title, groups=task.groups, interval=interval,
                              differences=differences)]
    atomic_write_text(md, "\n".join(lines))
    return js, md


def stat_cell(s: dict | None, digits: int = 3, signed: bool = False) -> str:
    """``mean ± half-width`` (a t-interval); a bootstrap interval as ``value [low, high]``; ``n/a`` without a
    spread. ``signed``: a leading ``+`` on positive values (differences)."""
    if s is None or s.get("mean") is None or _isnan(s["mean"]):
        return "—"
    f = f"{{:{'+' if signed else ''}.{digits}f}}".format
    if "ci_low" in s:
        if s["ci_low"] is None:
            return f"{f(s['mean'])} [n/a]"
        return f"{f(s['mean'])} [{f(s['ci_low'])}, {f(s['ci_high'])}]"
    if s.get("ci95") is None or _isnan(s["ci95"]):
        return f"{f(s['mean'])} ± n/a"
    return f"{f(s['mean'])} ± {s['ci95']:.{digits}f}"


def excludes_zero(s: dict | None, digits: int | None = None) -> bool:
    """Whether the interval of a stat (a paired difference) lies wholly above or below 0; with ``digits``, as the
    cell shows it (bounds rounded to that many decimals: ``[+0.000, +0.020]`` and ``+0.010 ± 0.010`` touch 0)."""
    if s is None or _isnan(s.get("mean")):
        return False

    def shown(v: float) -> float:
        return v if digits is None else round(v, digits)

    if "ci_low" in s:
        return s["ci_low"] is not None and (shown(s["ci_low"]) > 0 or shown(s["ci_high"]) < 0)
    return not _isnan(s.get("ci95")) and abs(shown(s["mean"])) > shown(s["ci95"])


def diff_cell(s: dict | None, digits: int = 3) -> str:
    """A paired difference: signed, **bold** when its interval, as shown, excludes 0."""
    text = stat_cell(s, digits, signed=True)
    return f"**{text}**" if excludes_zero(s, digits) else text


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


# ---------------------------------------------------------------- intervals
def _interval(context: dict) -> str:
    """The interval a report's context names (``context["interval"]["name"]``); Student's t over episodes for
    reports written before intervals were named."""
    given = context.get("interval")
    return (given.get("name") if isinstance(given, dict) else given) or EPISODE_T


def test_patients(data: dict) -> int | None:
    """The patients behind the test episodes (a `describe` dict): those the episodes hold, where it says, else the
    test split's (a split patient who shows no test structure is in no episode)."""
    for key in ("episode_patients", "patients"):
        value = data.get(key)
        if isinstance(value, dict) and value.get("test") is not None:
            return value["test"]
    return None


def _patients_behind(context: dict, summary: dict, task: Task) -> str | int | None:
    """The test patients behind an evaluation's intervals: those each shot's bootstrap resampled (one figure when
    the shots agree), else the data's count when there is one shot. The data's count is the first shot's
    (`describe` of its episodes), which the note gave for every shot (a review: 10 against 12 at 2 shots)."""
    shots = context["shots"]
    counts = {k: ((summary[str(k)].get(task.metric) or {}).get(TRAINED) or {}).get("all", {}).get("n_patients")
              for k in shots}
    if all(v is not None for v in counts.values()):
        values = set(counts.values())
        return values.pop() if len(values) == 1 else ", ".join(f"{v} at {k}-shot" for k, v in counts.items())
    return test_patients(context["data"]) if len(shots) == 1 else None


def _interval_notes(interval: str, patients, differences: bool, n_boot: int | None = None) -> list[str]:
    """The report lines that say what the intervals are and how to read the paired differences."""
    here = f" ({patients} here)" if patients else ""
    if interval == PATIENT_BOOTSTRAP:
        lines = [f"- intervals: 95% percentile bootstrap of the test patients{here}, {n_boot or 'seeded'} resamples. A "
                 "resample draws the patients of a cell with replacement and keeps all their queries; the statistic is "
                 "the mean over episodes of per-episode means, each query counted as often as its patient was drawn. "
                 "Only the query patients are resampled: the support patients are held fixed, so where the support "
                 "drives the spread (copying its mask) this can be narrower than a t-interval over episodes "
                 "(`--interval episode-t`). A percentile bootstrap of few patients also covers less than 95%: read it "
                 "as a lower bound of the uncertainty. It holds for patients like these, "
                 "from these sites"]
    else:
        lines = [f"- intervals: Student's t over episodes. Episodes resample the same test patients{here}, so these "
                 "intervals are too narrow: they hold for these patients, not for a new cohort (`imaging-meta evaluate` "
                 "resamples patients by default)"]
    if differences:
        lines.append("- `trained − <baseline>` columns: the trained learner's score minus the baseline's on the same "
                     "query of the same episode, averaged like a score, with the same kind of interval ("
                     + ("resampling patients keeps the pairs" if interval == PATIENT_BOOTSTRAP else
                        "a t interval over the per-episode means of the differences")
                     + "); **bold** where that interval excludes 0")
    return lines


# ---------------------------------------------------------------- imaging-meta evaluate: the report
def fit_commits_note(context: dict) -> str:
    """``; trained at commit ...`` (the checkpoint's `EpisodicModule.fit_commits`, in order), or that the checkpoint
    does not say (one saved before 2026-12-07); nothing for a context without the field (an older report)."""
    if "fit_commits" not in context:
        return ""
    commits = context["fit_commits"]
    if not commits:
        return "; the checkpoint does not record the commit that trained it"
    return "; trained at commit" + ("s " if len(commits) > 1 else " ") + ", then ".join(f"`{c}`" for c in commits)


def citation(context: dict, summary: dict) -> str:
    """One sentence that quotes the headline number, its paired differences from the baselines, and everything
    needed to reproduce it."""
    task = get_task(context["task"])
    parts = []
    for k in context["shots"]:
        s = summary[str(k)][task.metric][TRAINED]["all"]
        sha = context["episode_files"][str(k)]["sha256"][:12]
        if "n_patients" in s:
            how = f"mean [95% CI] from a bootstrap of {s['n_patients']} test patients, {s['n_episodes']} episodes"
        else:
            how = f"mean ± 95% CI over {s['n_episodes']} episodes"
        diffs = (summary[str(k)].get("differences") or {}).get(task.metric, {})
        paired = "".join(f"; {TRAINED} − {b} {stat_cell(diffs[b]['all'], 3, signed=True)}" for b in ordered_methods(diffs))
        unofficial = context["episode_files"][str(k)].get("unofficial_files")
        sha += f"… on unofficial files {', '.join(unofficial)}" if unofficial else "…"
        parts.append(f"{k}-shot {task.metric_title} {stat_cell(s, 3)} ({how}{paired}, episodes sha256 {sha})")
    changed = context.get("preprocessing_not_the_checkpoints") or {}
    return (f"{context['learner'].rsplit('.', 1)[-1]}, {context['protocol']} protocol: " + "; ".join(parts)
            + f"; checkpoint sha256 {context['checkpoint_sha256'][:12]}…, imaging-meta {context['versions']['imaging_meta']}"
            + f" at commit {context['git_commit'][:12]}"
            + (f", on data preprocessed unlike the checkpoint's ({', '.join(changed)})" if changed else "") + ".")


def _metric_notes(context: dict, metrics: Collection[str]) -> list[str]:
    """How the report's metrics were computed, one line per concern, for the metrics it has."""
    lines = []
    if "hd95" in metrics:
        lines.append(f"- masks: probability > {context['threshold']}; HD95 in mm at {context['pixel_spacing_mm']} mm pixels; "
                     "an empty prediction scores the image diagonal")
    if "ece" in metrics:
        unit = "patients" if _interval(context) == PATIENT_BOOTSTRAP else "episodes"
        n_boot = (context.get("interval") or {}).get("resamples") or N_BOOT
        lines.append(f"- chance accuracy: {context['data'].get('chance', float('nan')):.3f}; ECE: 15 bins, pooled over queries, "
                     f"shown as value [2.5th, 97.5th percentile] of {n_boot:,} bootstrap resamples of {unit}. The "
                     "binned ECE is biased upward (more so in a resample, which repeats queries): the range of a "
                     "well-calibrated model need not contain 0; compare ECEs on the same episodes, not with 0")
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
    data = context.get("data") or {}
    for k in ("train_organs", "val_organs", "test_organs"):
        if data.get(k) is not None:
            lines.append(f"- {k.replace('_', ' ')}: {', '.join(map(str, data[k])) or 'none'}")
    if data.get("dropped_organs"):
        lines.append(f"- dropped organs (too few of the stage's patients show them): {data['dropped_organs']}")
    changed = context.get("preprocessing_not_the_checkpoints") or {}
    if changed:  # the model saw other pixels than it trained on (a --data-config's CT window, patch spacing...)
        lines.append("- **preprocessing_not_the_checkpoints**: " + "; ".join(
            f"{k} {v['checkpoint']!r} in the checkpoint, {v['tested']!r} here" for k, v in changed.items()))
    for k, f in context["episode_files"].items():
        lines.append(f"- {k}-shot episodes: `{f['file']}` ({f['n_episodes']} episodes, episode-list sha256 `{f['sha256']}`)"
                     + (f"; **prepared with files whose MD5 is not the published one: {', '.join(f['unofficial_files'])}** "
                        "(prepared with --allow-unofficial: not comparable with figures on the published files)"
                        if f.get("unofficial_files") else ""))
    lines += _metric_notes(context, task.report_metrics)
    interval = _interval(context)
    any_diffs = any(d for k in context["shots"] for d in (summary[str(k)].get("differences") or {}).values())
    lines += _interval_notes(interval, _patients_behind(context, summary, task), any_diffs,
                             (context.get("interval") or {}).get("resamples"))
    v = context["versions"]
    lines.append("- versions: " + ", ".join(f"{k} {v[k]}" for k in v) + f"; git commit `{context['git_commit']}`"
                 + fit_commits_note(context))
    lines += ["", "**Cite as:** " + citation(context, summary), ""]
    for k in context["shots"]:
        lines += [f"## {k}-shot", ""]
        for m, title in task.report_metrics.items():
            per_method = summary[str(k)][m]
            diffs = (summary[str(k)].get("differences") or {}).get(m)
            arrow = " (lower is better)" if m in LOWER_IS_BETTER else ""
            groups = ("site",) if m == "ece" else task.report_groups  # ECE is pooled: no per-class cells
            shown = EPISODE_BOOTSTRAP if m == "ece" and interval == EPISODE_T else interval  # ECE: always a bootstrap
            lines += [f"### {title}{arrow}", "", to_markdown(per_method, ordered_methods(per_method), title, groups,
                                                             digits=_digits(m), interval=shown, differences=diffs), ""]
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
def _compare_rows(doc: dict, shots: list[int], shas: dict, pixels: dict | None = None,
                  unofficial: dict | None = None) -> list[str]:
    """The rows of one evaluation run's results.json in the comparison table (``shas`` collects its episode
    files' digests, ``pixels`` its preprocessing (None in reports written before it was recorded), ``unofficial``
    the data files of its episodes that are not the published ones)."""
    rows = []
    ctx, summ = doc["context"], doc["summary"]
    metrics = get_task(ctx["task"]).report_metrics
    for k in shots:
        if str(k) not in summ:
            why = (ctx.get("skipped_shots") or {}).get(str(k))
            if why:  # a shot the run could not score is a row that says so, not a missing one
                rows.append(f"| {md_cell(ctx['name'])} | {md_cell(ctx['protocol'])} | "
                            f"{md_cell(str(ctx['learner']).rsplit('.', 1)[-1])} | {k} | not scored: {md_cell(why)} | | |")
            continue
        sha = ctx["episode_files"][str(k)]["sha256"]
        shas[(ctx["task"], ctx["protocol"], k)].add(sha)
        if pixels is not None and ctx.get("preprocessing") is not None:
            pixels[(ctx["task"], ctx["protocol"], k, sha)].add(json.dumps(ctx["preprocessing"], sort_keys=True))
        if unofficial is not None and ctx["episode_files"][str(k)].get("unofficial_files"):
            unofficial[str(ctx["name"])] = list(ctx["episode_files"][str(k)]["unofficial_files"])
        # ECE is always a bootstrap of episodes (pooled over queries): under episode-t its cell says so, not the
        # run's interval column (a review)
        ece_own = " (bootstrap of episodes)" if _interval(ctx) == EPISODE_T else ""
        cells = [f"{m}: {stat_cell(summ[str(k)][m].get(TRAINED, {}).get('all'), _digits(m))}"
                 f"{ece_own if m == 'ece' else ''}" for m in metrics]
        rows.append(f"| {md_cell(ctx['name'])} | {md_cell(ctx['protocol'])} | {md_cell(str(ctx['learner']).rsplit('.', 1)[-1])} "
                    f"| {k} | " + "; ".join(cells) + f" | {md_cell(_interval(ctx))} | `{md_cell(str(sha)[:12])}` |")
    return rows


def _tested_checkpoint(report: Path, doc: dict) -> str:
    """The checkpoint a training run's test report scored: the one its context names (a test of
    `imaging-meta results` lies in a folder of its own, without checkpoints; a review), else the run's best."""
    named = doc["context"].get("checkpoint")
    return str(named) if isinstance(named, str) and named else str(report.parent / "checkpoints" / "best.ckpt")


def compare_runs(run_dirs: Sequence[str | os.PathLike]) -> str:
    """One Markdown table of the trained learner's headline numbers in several evaluation run folders.

    Runs of one protocol measured on different episode files (another seed or data) are flagged: their
    numbers are not paired, and only the CIs can be compared. Different protocols test different data anyway.
    The ``95% CI`` column names each run's interval (``patient-bootstrap`` cells read ``value [low, high]``,
    ``episode-t`` cells ``mean ± half-width``, except ECE's, a bootstrap of episodes that its cell names).
    """
    rows: list[str] = []
    shas: defaultdict[tuple, set] = defaultdict(set)
    runs, skipped = [], []
    for d in run_dirs:
        f = Path(d) / "results.json"
        if not Path(d).exists():  # a typo: an error, not a note
            raise FileNotFoundError(f"{d}: no such folder; give evaluation run folders (imaging-meta evaluate --out)")
        if not Path(d).is_dir() or not f.is_file():
            # `compare evaluation/*/` also matches the training logs' folder (runs/) beside the run folders, and
            # `evaluation/*` the comparison.md `make evaluate` writes there (it was called "no such folder": a
            # review): what is no run is named under the table, not an error, unless nothing is left
            skipped.append(str(d))
            continue
        try:
            doc = json.loads(f.read_text())
        except (ValueError, RecursionError) as e:  # JSONDecodeError is a ValueError
            raise ValueError(f"{f}: not valid JSON ({type(e).__name__}: {e}); run imaging-meta evaluate again") from None
        if not (isinstance(doc, dict) and isinstance(doc.get("context"), dict) and isinstance(doc.get("summary"), dict)):
            raise ValueError(f"{f}: not a results.json written by imaging-meta evaluate (no context and summary); run "
                             "imaging-meta evaluate again")
        runs.append((f, doc))
    if not runs:
        raise FileNotFoundError(f"{first(skipped, sep=', ')}: no results.json; run `imaging-meta evaluate --out "
                                f"{skipped[0]}` first")
    for f, doc in runs:
        if not isinstance(doc.get("figures"), dict):  # as `evaluate` tells its own reports from others
            # a review: "run imaging-meta evaluate again" here, and `evaluate --out` of that folder is refused
            raise ValueError(
                f"{f}: a training run's test report (imaging-meta test or fit --test_after_fit), not an evaluation; "
                f"compare takes evaluation reports: run imaging-meta evaluate --checkpoint "
                f"{_tested_checkpoint(f, doc)} --out DIR, and compare DIR")
    shots: set[int] = set()
    for f, doc in runs:
        try:
            shots |= {int(k) for k in doc["context"]["shots"]}
            # a shot count no run scored is still a row that says why (it vanished: a review, 2026-12-07)
            shots |= {int(k) for k in doc["context"].get("skipped_shots") or {}}
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{f}: a results.json without its shots ({type(e).__name__}: {e}); run imaging-meta "
                             "evaluate again") from None
    pixels: defaultdict[tuple, set] = defaultdict(set)
    unofficial: dict[str, list] = {}
    for f, doc in runs:
        try:
            rows += _compare_rows(doc, sorted(shots), shas, pixels, unofficial)
        except (KeyError, TypeError, ValueError, AttributeError, IndexError) as e:  # edited, or another program's
            raise ValueError(f"{f}: not a results.json written by imaging-meta evaluate ({type(e).__name__}: {e}); "
                             "run imaging-meta evaluate again") from None
    lines = ["| run | protocol | learner | shots | trained (mean and 95% CI) | 95% CI | episodes sha256 |",
             "|---|---|---|---|---|---|---|"]
    lines += rows
    notes = [f"- {task}, {protocol}, {k}-shot: {len(s)} different episode files; those rows are not on the same episodes"
             for (task, protocol, k), s in sorted(shas.items()) if len(s) > 1]
    notes += [f"- {task}, {protocol}, {k}-shot, episodes `{str(sha)[:12]}`: {len(p)} different preprocessings "
              "(spacing, slice size, window...); those rows are not of the same pixels"
              for (task, protocol, k, sha), p in sorted(pixels.items()) if len(p) > 1]
    notes += [f"- {md_cell(name)}: episodes drawn from data files that are not the published ones ({', '.join(files)})"
              for name, files in sorted(unofficial.items())]
    if skipped:
        notes.append(f"- not evaluation runs (no results.json), left out: {first(skipped, sep=', ')}")
    return "\n".join(lines) + "\n" + ("\n" + "\n".join(notes) + "\n" if notes else "")
