import json
import math
import re

import pytest

from imaging_meta.evaluation.reports import to_markdown, write_report
from imaging_meta.evaluation.statistics import differences, interval_description, mean_ci, summarize


def test_mean_ci_golden():
    m, h = mean_ci([0.5, 0.7, 0.6, 0.8])
    assert m == pytest.approx(0.65)
    # sd = 0.1291, t(0.975, 3) = 3.1824 -> 3.1824 * 0.1291 / 2
    assert h == pytest.approx(0.205431, abs=1e-5)
    m1, h1 = mean_ci([0.3])
    assert m1 == 0.3 and math.isnan(h1)


def test_summarize_averages_queries_within_an_episode_first(tmp_path):
    recs = [
        {"method": "a", "episode": "e1", "organ": "liver", "site": "s1", "dice": 1.0},
        {"method": "a", "episode": "e1", "organ": "liver", "site": "s1", "dice": 0.0},
        {"method": "a", "episode": "e2", "organ": "spleen", "site": "s2", "dice": 0.8},
        {"method": "b", "episode": "e1", "organ": "liver", "site": "s1", "dice": 0.2},
        {"method": "b", "episode": "e2", "organ": "spleen", "site": "s2", "dice": 0.4},
    ]
    s = summarize(recs)
    assert s["a"]["all"]["n_episodes"] == 2 and s["a"]["all"]["mean"] == pytest.approx(0.65)
    assert s["a"]["organ"]["liver"]["mean"] == pytest.approx(0.5)
    assert s["b"]["site"]["s2"]["mean"] == pytest.approx(0.4)
    md = to_markdown(s, ["a", "b"])
    assert "| organ: spleen | 0.800 ± n/a | 0.400 ± n/a | 1 |" in md  # one episode: no spread to show
    js, mdp = write_report(tmp_path, s, {"protocol": "cross_organ"}, ["a", "b"])
    assert json.loads(js.read_text())["summary"]["a"]["all"]["n_episodes"] == 2
    assert "protocol: cross_organ" in mdp.read_text()
    # what each stage used (classification: classes and their items; segmentation: organs dropped for too few
    # patients) and the patients behind the test episodes, not the test split's
    context = {"classes": {"train": {"cyst": 40, "lipoma": 12}, "val": {}, "test": {"abscess": 9}},
               "dropped_classes": {"val": {"adenoma": "2 patients"}}, "dropped_organs": {"train": ["b"]},
               "patients": {"test": 3}, "episode_patients": {"test": 2}}
    text = write_report(tmp_path, s, context, ["a", "b"])[1].read_text()
    assert "- train classes: cyst (40), lipoma (12)\n- test classes: abscess (9)\n" in text and "- val classes" not in text
    assert "- dropped classes: {'val': {'adenoma': '2 patients'}}" in text and "- dropped_organs: {'train': ['b']}" in text
    assert "the same test patients (2 here)" in text


def test_site_keys_with_pipes_do_not_break_the_table():
    recs = [{"method": "a", "episode": "e1", "organ": "liver", "site": "GE | LightSpeed | inst-1", "dice": 0.5}]
    md = to_markdown(summarize(recs), ["a"])
    row = [line for line in md.splitlines() if line.startswith("| site:")][0]
    cells = re.split(r"(?<!\\)\|", row)  # unescaped pipes separate cells
    assert len(cells) == 5 and "GE \\| LightSpeed" in cells[1]  # '', label, value, episodes, ''


def test_the_test_report_shows_paired_differences_and_names_its_interval(tmp_path):
    recs = [{"method": m, "episode": e, "organ": "liver", "site": "s1", "query_id": f"q{e}", "patient": f"p{e % 3}",
             "dice": 0.5 + 0.1 * (e % 3) + (0.05 if m == "trained" else 0.0)} for e in range(6) for m in ("trained", "b")]
    s, d = summarize(recs), differences(recs, "dice", ("organ", "site"))
    assert d["b"]["all"]["mean"] == pytest.approx(0.05) and d["b"]["all"]["ci95"] == pytest.approx(0.0, abs=1e-12)
    js, md = write_report(tmp_path, s, {"interval": interval_description("episode-t")}, ["trained", "b"], differences=d)
    assert json.loads(js.read_text())["differences"]["b"]["organ"]["liver"]["n_episodes"] == 6
    text = md.read_text()
    assert "| Dice (mean ± 95% CI, Student's t over episodes) | trained | b | trained − b | episodes |" in text
    assert "| **all** | 0.650 ± 0.094 | 0.600 ± 0.094 | **+0.050 ± 0.000** | 6 |" in text
    assert "- intervals: Student's t over episodes" in text and "`trained − <baseline>` columns" in text


def test_the_interval_note_names_the_patients_each_shot_resampled():
    """A review: the note gave the first shot's episode patients (10) for a report whose 2-shot table and citation
    bootstrap 12."""
    from imaging_meta.evaluation.reports import _patients_behind
    from imaging_meta.tasks import get_task

    task = get_task("segmentation")
    summary = {str(k): {task.metric: {"trained": {"all": {"n_patients": n}}}} for k, n in ((1, 10), (2, 12))}
    context = {"shots": [1, 2], "data": {"episode_patients": {"test": 10}}}
    assert _patients_behind(context, summary, task) == "10 at 1-shot, 12 at 2-shot"
    summary["2"][task.metric]["trained"]["all"]["n_patients"] = 10
    assert _patients_behind(context, summary, task) == 10
    t_interval = {str(k): {task.metric: {"trained": {"all": {"n_episodes": 5}}}} for k in (1, 2)}
    assert _patients_behind(context, t_interval, task) is None  # the data's count is the first shot's only
    assert _patients_behind({**context, "shots": [1]}, t_interval, task) == 10
