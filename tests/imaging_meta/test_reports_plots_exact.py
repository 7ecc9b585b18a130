"""The report and figure details of ``imaging-meta evaluate`` and ``compare`` to the exact value: table separators,
the ECE note and table header under each interval, the compare note on other episode files, the commits that
trained a checkpoint, which episodes the best/worst panel keeps, error bars of bootstrap intervals, and the bins
each reliability panel draws."""

import json

import pytest
import torch

from imaging_meta.episode import Episode, collate_episodes
from imaging_meta.evaluation import plots
from imaging_meta.evaluation.plots import PanelKeeper, _errors
from imaging_meta.evaluation.reports import (
    _evaluation_markdown,
    _metric_notes,
    compare_runs,
    fit_commits_note,
    to_markdown,
)
from imaging_meta.evaluation.statistics import (
    EPISODE_T,
    PATIENT_BOOTSTRAP,
    evaluation_summary,
    interval_description,
)
from imaging_meta.tasks import CLASSIFICATION, get_task
from tests.imaging_meta.test_evaluate import _cls_records


def _cells(line: str) -> int:
    """The cells of a Markdown table row (escaped pipes are no cell boundaries)."""
    return line.replace("\\|", "").count("|") - 1


# ------------------------------------------------------------------------------------------ tables and notes
def test_the_separator_row_has_a_cell_for_every_header_cell():
    """A patient bootstrap (evaluate's default) adds a "patients" column: a separator row one cell short makes
    GitHub show the table as plain text."""
    for patients in (True, False):
        cell = {"mean": 0.5, "ci_low": 0.4, "ci_high": 0.6, "n_episodes": 3} | ({"n_patients": 4} if patients else {})
        diff = {"mean": 0.1, "ci_low": 0.05, "ci_high": 0.2, "n_episodes": 3}
        summary = {m: {"all": cell, "site": {"a|b": cell}} for m in ("trained", "copy support mask")}
        md = to_markdown(summary, None, "Dice", ("site",), interval=PATIENT_BOOTSTRAP if patients else EPISODE_T,
                         differences={"copy support mask": {"all": diff, "site": {"a|b": diff}}})
        header, separator, *rows = md.splitlines()
        assert header.endswith(" | episodes | patients |") == patients
        assert separator == "|" + "---|" * _cells(header), patients
        assert [_cells(r) for r in rows] == [_cells(header)] * 2, patients


def _ece_context(interval: str) -> dict:
    return {"interval": interval_description(interval, n_boot=300), "data": {"chance": 0.25}}


def test_the_ece_note_names_the_unit_its_bootstrap_resamples():
    """ECE follows a patient bootstrap, else it resamples episodes: under episode-t the note said the resamples
    drew patients."""
    boot = " ".join(_metric_notes(_ece_context(PATIENT_BOOTSTRAP), ("acc", "ece")))
    t = " ".join(_metric_notes(_ece_context(EPISODE_T), ("acc", "ece")))
    assert "shown as value [2.5th, 97.5th percentile] of 300 bootstrap resamples of patients." in boot
    # episode-t records no number of resamples: evaluate's default
    assert "shown as value [2.5th, 97.5th percentile] of 2,000 bootstrap resamples of episodes." in t
    assert "resamples of patients" not in t


def _evaluation_context(interval: str, shots=(1,)) -> dict:
    return {"name": "run", "task": "classification", "protocol": "standard", "learner": "pkg.ProtoNet",
            "checkpoint": "best.ckpt", "checkpoint_sha256": "c" * 64, "seed": 0, "shots": list(shots),
            "episodes_per_shot": 30, "data": {"chance": 1 / 3},
            "episode_files": {str(k): {"file": f"{k}.json", "n_episodes": 30, "sha256": "e" * 64} for k in shots},
            "interval": interval_description(interval, n_boot=200), "versions": {"imaging_meta": "0.1"},
            "git_commit": "abc"}


def _tables(md: str) -> dict:
    """``{section title: the header row of its table}`` of a results.md."""
    lines = md.splitlines()
    return {line[4:]: lines[i + 2] for i, line in enumerate(lines) if line.startswith("### ")}


def test_the_ece_table_names_its_bootstrap_under_episode_t():
    """ECE is pooled over queries, always a bootstrap of episodes: under episode-t its table said "Student's t"
    above ``value [low, high]`` cells."""
    summary = evaluation_summary(get_task(CLASSIFICATION), _cls_records(), interval=EPISODE_T, n_boot=200)
    md = _evaluation_markdown(_evaluation_context(EPISODE_T), summary, get_task(CLASSIFICATION), {})
    heads = _tables(md)
    assert heads["ECE (lower is better)"].startswith("| ECE (value [95% CI, bootstrap of episodes]) | trained |")
    assert heads["accuracy"].startswith("| accuracy (mean ± 95% CI, Student's t over episodes) | trained |")
    assert "2,000 bootstrap resamples of episodes." in md


# ------------------------------------------------------------------------------------------ compare
def _run(tmp_path, name: str, sha: str):
    doc = {"context": {"shots": [1], "task": "segmentation", "protocol": "cross_organ", "name": name, "learner": "L",
                       "episode_files": {"1": {"sha256": sha}}, "interval": {"name": "episode-t"}},
           "summary": {"1": {"dice": {"trained": {"all": {"mean": 0.5, "ci95": 0.1}}},
                             "hd95": {"trained": {"all": {"mean": 9.0, "ci95": 1.0}}}}}, "figures": {}}
    (tmp_path / name).mkdir()
    (tmp_path / name / "results.json").write_text(json.dumps(doc))
    return tmp_path / name


def test_compare_flags_two_runs_on_different_episode_files(tmp_path):
    """Two runs of one protocol on other episode lists are not paired: compare said nothing unless three lists
    differed."""
    a, b, same = _run(tmp_path, "a", "1" * 64), _run(tmp_path, "b", "2" * 64), _run(tmp_path, "same", "1" * 64)
    note = "- segmentation, cross_organ, 1-shot: 2 different episode files; those rows are not on the same episodes"
    assert note in compare_runs([a, b]).splitlines()
    assert "different episode files" not in compare_runs([a, same])


def test_the_report_names_every_commit_that_trained_the_checkpoint():
    """A checkpoint resumed at another commit was trained by both: the report named only the last."""
    assert fit_commits_note({"fit_commits": ["a1", "b2", "c3"]}) == "; trained at commits `a1`, then `b2`, then `c3`"
    assert fit_commits_note({"fit_commits": ["a1"]}) == "; trained at commit `a1`"
    assert fit_commits_note({"fit_commits": []}) == "; the checkpoint does not record the commit that trained it"
    assert fit_commits_note({}) == ""


# ------------------------------------------------------------------------------------------ best and worst panels
def _batch(n: int):
    images = torch.zeros(2, 1, 8, 8)
    ep = Episode(support_images=images, support_labels=torch.tensor([0, 1]), query_images=images,
                 query_labels=torch.tensor([0, 1]), classes=["a", "b"], site="s", support_ids=["s0", "s1"],
                 query_ids=["q0", "q1"])
    return collate_episodes([ep] * n), torch.tensor([[[0.9, 0.1], [0.2, 0.8]]] * n)


def _keeper(n: int, scores: list[list[float]], batches: int = 1) -> PanelKeeper:
    """A keeper offered episodes 0, 1, ... whose queries score ``scores`` (accuracy), in ``batches`` batches."""
    keeper = PanelKeeper(CLASSIFICATION, n)
    size = -(-len(scores) // batches)
    for first in range(0, len(scores), size):
        chunk = scores[first: first + size]
        batch, probs = _batch(len(chunk))
        keeper.offer(batch, probs, [{"episode": first + i, "acc": a} for i, s in enumerate(chunk) for a in s], first)
    return keeper


def _episodes(rows: list[dict]) -> list[int]:
    return [e["episode"] for e in rows]


def test_the_best_row_shows_the_best_episode_and_the_worst_the_worst():
    """The panel's "best" row showed the worst episodes when the ranking was the wrong way round."""
    best, worst = _keeper(1, [[0.1, 0.1], [0.9, 0.9]]).best_worst()
    assert _episodes(best) == [1] and _episodes(worst) == [0]
    assert best[0]["score"] == pytest.approx(0.9) and worst[0]["score"] == pytest.approx(0.1)


def test_episodes_are_ranked_by_the_mean_over_their_queries():
    """An episode of one right and one wrong query (mean 0.5) ranked above one of two 0.7 queries when an
    episode's score was its best query."""
    best, worst = _keeper(1, [[1.0, 0.0], [0.7, 0.7], [0.0, 0.2]]).best_worst()
    assert _episodes(best) == [1] and best[0]["score"] == pytest.approx(0.7)
    assert _episodes(worst) == [2] and worst[0]["score"] == pytest.approx(0.1)


def test_no_episode_is_both_best_and_worst_and_the_worst_come_worst_first():
    """With 3 episodes for 2 best and 2 worst, the middle one was shown as both; with enough episodes the worst
    row listed the second worst first."""
    best, worst = _keeper(2, [[0.5], [0.9], [0.1]]).best_worst()
    assert _episodes(best) == [1] and _episodes(worst) == [2]
    # six episodes in two batches (the keeper trims to 2 + 2 after the second); ties broken by episode number
    best, worst = _keeper(2, [[0.5], [0.9], [0.1], [0.3], [0.9], [0.2]], batches=2).best_worst()
    assert _episodes(best) == [1, 4] and _episodes(worst) == [2, 5]
    assert [e["score"] for e in worst] == pytest.approx([0.1, 0.2])


# ------------------------------------------------------------------------------------------ figures
def test_bootstrap_error_bars_are_the_distances_to_each_bound_and_never_negative():
    """matplotlib draws (below, above) the mean: swapped, an interval [0.2, 0.6] around 0.5 was drawn [0.4, 0.8];
    a percentile bound past the mean (rare, but it happens) must give no bar, not a negative one (an error)."""
    asym = {"mean": 0.5, "ci_low": 0.2, "ci_high": 0.6}
    past = {"mean": 0.5, "ci_low": 0.55, "ci_high": 0.8}
    below = {"mean": 0.5, "ci_low": 0.1, "ci_high": 0.45}
    no_ci = {"mean": 0.5, "ci_low": None, "ci_high": None}
    low, high = _errors([asym, past, below, no_ci, None])
    assert low == pytest.approx([0.3, 0.0, 0.4, 0, 0]) and high == pytest.approx([0.1, 0.3, 0.0, 0, 0])
    assert _errors([{"mean": 0.5, "ci95": 0.2}, None]) == [0.2, 0]


def test_each_reliability_panel_draws_its_own_shots_bins(tmp_path, monkeypatch):
    """Every panel of a 2-shot report drew the first shot's accuracy bars and bin counts."""
    records = _cls_records() + [dict(r, shot=5) for r in _cls_records(n_episodes=12, seed=1)]
    summary = evaluation_summary(get_task(CLASSIFICATION), records, interval=EPISODE_T, n_boot=100)
    figures = []
    save = plots._save
    monkeypatch.setattr(plots, "_save", lambda fig, path: figures.append(fig) or save(fig, path))
    plots.reliability({k: summary[k] for k in ("1", "5")}, tmp_path / "reliability.png")
    axes = figures[0].axes
    assert len(axes) == 2
    for ax, k in zip(axes, ("1", "5"), strict=True):
        bins = summary[k]["calibration"]["trained"]
        assert [p.get_height() for p in ax.patches] == pytest.approx(
            [b["accuracy"] if b["count"] else 0.0 for b in bins]), k
        assert [t.get_text() for t in ax.texts] == [str(b["count"]) for b in bins if b["count"]], k
        assert ax.get_title().startswith(f"{k}-shot: ECE {summary[k]['ece']['trained']['all']['mean']:.3f} [")
    assert sum(int(t.get_text()) for t in axes[0].texts) == 180 and sum(int(t.get_text()) for t in axes[1].texts) == 72
