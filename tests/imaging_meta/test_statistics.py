"""The intervals of the reports: the patient-cluster bootstrap against Student's t over episodes, paired
differences, the estimator by hand, and how the tables say which interval they show."""

import math

import numpy as np
import pytest

from imaging_meta.evaluation.reports import to_markdown
from imaging_meta.evaluation.statistics import (
    EPISODE_T,
    INTERVALS,
    PATIENT_BOOTSTRAP,
    _resample_counts,
    cluster_bootstrap,
    cluster_statistic,
    differences,
    evaluation_summary,
    paired_rows,
    summarize,
)
from imaging_meta.tasks import CLASSIFICATION, COPY_MASK, SEGMENTATION

TRAINED = "trained"


def _records(n_patients=12, n_episodes=200, patient_sd=0.15, gain=0.05, noise=0.05, seed=0):
    """Dice records of two methods on the same queries: each query's score is its patient's level (shared by
    both methods, and by every episode that reuses the patient) plus noise; the trained learner adds ``gain``."""
    g = np.random.default_rng(seed)
    level = {f"p{i}": 0.5 + g.normal(0, patient_sd) for i in range(n_patients)}
    recs = []
    for ep in range(n_episodes):
        for j, i in enumerate(g.choice(n_patients, 2, replace=False)):
            p = f"p{i}"
            for method, add in ((TRAINED, gain), (COPY_MASK, 0.0)):
                recs.append({"method": method, "episode": ep, "shot": 1, "patient": p, "query_id": f"case-{p}-{j}",
                             "organ": "liver" if ep % 2 else "spleen", "site": f"s{i % 2}",
                             "dice": level[p] + add + g.normal(0, noise)})
    return recs


def _width(s):
    return s["ci_high"] - s["ci_low"] if "ci_low" in s else 2 * s["ci95"]


def test_patient_bootstrap_is_wider_than_the_episode_t_interval_when_scores_cluster_by_patient():
    recs = _records()
    boot = summarize(recs, "dice", ("organ", "site"), interval=PATIENT_BOOTSTRAP, seed=0)[TRAINED]
    t = summarize(recs, "dice", ("organ", "site"), interval=EPISODE_T)[TRAINED]
    assert boot["all"]["mean"] == pytest.approx(t["all"]["mean"], abs=1e-12)  # the interval changes, not the estimate
    assert boot["all"]["n_patients"] == 12 and boot["all"]["n_episodes"] == 200
    # 200 episodes look like 200 independent draws; there are only 12 patients
    assert _width(boot["all"]) > 2.5 * _width(t["all"])
    assert boot["all"]["ci_low"] < boot["all"]["mean"] < boot["all"]["ci_high"]
    for organ in ("liver", "spleen"):
        assert _width(boot["organ"][organ]) > 2 * _width(t["organ"][organ])
    assert boot["site"]["s0"]["n_patients"] == 6  # a row resamples its own patients


def test_patient_bootstrap_is_deterministic_for_a_seed():
    recs = _records()
    a = summarize(recs, "dice", ("organ",), interval=PATIENT_BOOTSTRAP, seed=3)
    assert a == summarize(recs, "dice", ("organ",), interval=PATIENT_BOOTSTRAP, seed=3)
    other = summarize(recs, "dice", ("organ",), interval=PATIENT_BOOTSTRAP, seed=4)
    assert other[TRAINED]["all"]["mean"] == a[TRAINED]["all"]["mean"]
    assert other[TRAINED]["all"]["ci_low"] != a[TRAINED]["all"]["ci_low"]


@pytest.mark.parametrize("interval", INTERVALS)
def test_paired_difference_excludes_zero_where_the_separate_intervals_overlap(interval):
    recs = _records(n_episodes=40, patient_sd=0.3, gain=0.05, noise=0.03)
    s = summarize(recs, "dice", ("organ",), interval=interval)
    trained, copy = s[TRAINED]["all"], s[COPY_MASK]["all"]

    def bounds(x):
        return (x["ci_low"], x["ci_high"]) if "ci_low" in x else (x["mean"] - x["ci95"], x["mean"] + x["ci95"])

    assert bounds(trained)[0] < bounds(copy)[1]  # the two intervals overlap: apart, they cannot tell
    d = differences(recs, "dice", ("organ",), interval=interval)[COPY_MASK]
    assert d["all"]["mean"] == pytest.approx(trained["mean"] - copy["mean"])  # paired on the same queries
    assert bounds(d["all"])[0] > 0  # paired, the gain is clear
    assert all(bounds(x)[0] > 0 for x in d["organ"].values())


def test_the_estimator_by_hand_and_its_vectorised_bootstrap():
    # episode 0: patients a (1.0) and b (0.0); episode 1: a (1.0). Mean over episodes of episode means: 0.75
    units = [(0, ["a"], 1.0), (0, ["b"], 0.0), (1, ["a"], 1.0)]
    assert cluster_statistic(units) == pytest.approx(0.75)
    # a drawn twice, b never: record weights 1/(E n_e) = 1/4, 1/4, 1/2, times the counts 2, 0, 2 -> 1.0
    assert cluster_statistic(units, {"a": 2, "b": 0}) == pytest.approx(1.0)
    assert cluster_statistic(units, {"a": 0, "b": 2}) == pytest.approx(0.0)
    # the vectorised bootstrap is this statistic on each resample of the sorted patients, then percentiles
    g = np.random.default_rng(1)
    units = [(ep, [f"p{g.integers(5)}"], float(g.random())) for ep in range(30) for _ in range(int(g.integers(1, 4)))]
    patients = sorted({u[1][0] for u in units})
    counts = _resample_counts(len(patients), 7, 300)
    boot = [cluster_statistic(units, dict(zip(patients, row, strict=True))) for row in counts]
    s = cluster_bootstrap(units, seed=7, n_boot=300)
    assert s["ci_low"] == pytest.approx(np.percentile(boot, 2.5)) and s["ci_high"] == pytest.approx(np.percentile(boot, 97.5))
    assert s["mean"] == pytest.approx(cluster_statistic(units))


def test_one_patient_has_no_interval():
    s = cluster_bootstrap([(0, ["a"], 0.4), (1, ["a"], 0.6)])
    assert s["mean"] == pytest.approx(0.5) and s["ci_low"] is None and math.isnan(s["ci95"]) and s["n_patients"] == 1


def test_units_that_all_share_the_same_patients_have_no_interval():
    """Two whole-scan pairs of one support and one query patient: every resample of the two patients gives the
    same mean, so the interval is not a zero width but none; a pair of other patients brings one back."""
    same = [(("a", "b", "spleen"), ["a", "b"], 0.84), (("a", "b", "kidney"), ["a", "b"], 0.73)]
    s = cluster_bootstrap(same)
    assert s["mean"] == pytest.approx(0.785) and s["ci_low"] is None and s["n_patients"] == 2
    s = cluster_bootstrap([*same, (("c", "b", "spleen"), ["b", "c"], 0.5)])
    assert s["ci_low"] is not None and s["ci_low"] < s["ci_high"]


def test_pairs_are_the_same_query_of_the_same_episode():
    rows = [{"method": TRAINED, "episode": 0, "query_id": "q", "patient": "p", "dice": 0.9},
            {"method": TRAINED, "episode": 0, "query_id": "q", "patient": "p", "dice": 0.7},  # two slices of one case
            {"method": TRAINED, "episode": 1, "query_id": "r", "patient": "p", "dice": 0.5},
            {"method": COPY_MASK, "episode": 0, "query_id": "q", "patient": "p", "dice": 0.6},
            {"method": COPY_MASK, "episode": 0, "query_id": "q", "patient": "p", "dice": 0.6}]
    d = paired_rows(rows, "dice")[COPY_MASK]
    assert [round(r["dice"], 6) for r in d] == [0.3, 0.1]  # episode 1 has no copy-mask row: left out
    assert all(r["method"] == COPY_MASK and r["episode"] == 0 for r in d)


def test_evaluation_summary_holds_differences_for_every_metric_and_row():
    recs = [dict(r, hd95=10 * (1 - r["dice"])) for r in _records(n_episodes=40)]
    s = evaluation_summary(SEGMENTATION, recs, seed=0)["1"]
    assert set(s["differences"]) == {"dice", "hd95"}
    d = s["differences"]["dice"][COPY_MASK]
    assert set(d) == {"all", "organ", "site"} and d["all"]["n_patients"] == 12 and d["all"]["ci_low"] > 0
    assert s["differences"]["hd95"][COPY_MASK]["all"]["mean"] < 0
    t = evaluation_summary(SEGMENTATION, recs, seed=0, interval="episode-t")["1"]
    assert "ci_low" not in t["dice"][TRAINED]["all"] and "ci_low" not in t["differences"]["dice"][COPY_MASK]["all"]
    with pytest.raises(ValueError, match="interval must be one of patient-bootstrap, episode-t"):
        evaluation_summary(SEGMENTATION, recs, interval="episodes")


def test_classification_differences_include_the_pooled_ece_and_per_class_cells():
    g = np.random.default_rng(0)
    recs = []
    for ep in range(20):
        for j in range(6):
            label, patient = j % 3, f"p{(ep + j) % 9}"
            for method, sharp in ((TRAINED, 4.0), ("untrained encoder", 0.5)):
                logits = g.normal(0, 1, 3)
                logits[label] += sharp
                p = np.exp(logits) / np.exp(logits).sum()
                recs.append({"method": method, "episode": ep, "shot": 1, "classes": ["a", "b", "c"], "class": "abc"[label],
                             "label": label, "probs": p.tolist(), "acc": float(int(p.argmax()) == label), "site": "s",
                             "query_id": f"q{ep}-{j}", "patient": patient})
    s = evaluation_summary(CLASSIFICATION, recs, seed=0)["1"]
    for m in ("acc", "balanced_acc", "auc", "ece"):
        d = s["differences"][m]["untrained encoder"]["all"]
        assert d["n_patients"] == 9 and d["ci_low"] is not None, m
        assert d["mean"] == pytest.approx(s[m][TRAINED]["all"]["mean"] - s[m]["untrained encoder"]["all"]["mean"]), m
    assert set(s["differences"]["auc"]["untrained encoder"]["class"]) == {"a", "b", "c"}
    assert s["differences"]["acc"]["untrained encoder"]["all"]["ci_low"] > 0


def test_tables_name_their_interval_and_show_paired_differences():
    recs = _records(patient_sd=0.3, n_episodes=60)
    for interval, head in ((PATIENT_BOOTSTRAP, "Dice (mean [95% CI, bootstrap of patients])"),
                           (EPISODE_T, "Dice (mean ± 95% CI, Student's t over episodes)")):
        s = summarize(recs, "dice", ("organ",), interval=interval)
        md = to_markdown(s, [TRAINED, COPY_MASK], "Dice", ("organ",), interval=interval,
                         differences=differences(recs, "dice", ("organ",), interval=interval))
        header, _, first = md.splitlines()[:3]
        assert header.startswith(f"| {head} | trained | copy support mask | trained − copy support mask | episodes |")
        assert header.endswith("patients |") == (interval == PATIENT_BOOTSTRAP)
        assert "| **+0.0" in first  # the paired gain, signed, in bold: its interval excludes 0


def test_the_cli_offers_exactly_the_intervals():
    from imaging_meta.commands.cli import _tool_parser

    args = _tool_parser().parse_args(["evaluate", "--checkpoint", "c", "--out", "o"])
    assert args.interval == PATIENT_BOOTSTRAP
    action = next(a for a in _tool_parser()._subparsers._group_actions[0].choices["evaluate"]._actions
                  if a.dest == "interval")
    assert tuple(action.choices) == INTERVALS


# ------------------------------------------------------------------------------------------ per-episode scores
def _classification_records(n_patients=40, n_episodes=60, n_way=4, per_class=3, skill=1.0, seed=0):
    """Balanced classification episodes (``per_class`` queries of each class, each from a random patient) of
    two methods; a query is right more often for some patients than others (patient effects), so the patient
    is the unit that varies."""
    import torch

    rng = np.random.default_rng(seed)
    ease = rng.normal(0, 1.0, n_patients)
    recs = []
    for e in range(n_episodes):
        for c in range(n_way):
            for k in range(per_class):
                p = int(rng.integers(n_patients))
                for method, s in (("trained", skill), ("untrained encoder", 0.0)):
                    logits = rng.normal(0, 1, n_way)
                    logits[c] += s + ease[p]
                    probs = torch.tensor(logits).softmax(0).tolist()
                    recs.append({"method": method, "episode": e, "shot": 1, "site": "s", "patient": f"p{p}",
                                 "query_id": f"q{c}-{k}", "class": f"c{c}", "classes": [f"c{i}" for i in range(n_way)],
                                 "label": c, "probs": probs, "acc": float(int(np.argmax(probs)) == c)})
    return recs


def test_per_episode_scores_without_resampling_are_the_metrics_of_each_episode():
    import torch

    from imaging_meta.evaluation.metrics import balanced_accuracy, macro_auc, ovr_auc
    from imaging_meta.evaluation.statistics import _class_auc, _episode_data, _episode_score

    data = _episode_data(_classification_records(n_episodes=5))
    for ep in data.values():
        probs, labels = torch.tensor(ep["probs"]), torch.tensor(ep["labels"])
        ones = np.ones((1, len(labels)))
        assert _episode_score(ep, "balanced_acc", ones)[0] == pytest.approx(balanced_accuracy(probs, labels, 4), abs=1e-6)
        assert _episode_score(ep, "auc", ones)[0] == pytest.approx(macro_auc(probs, labels, 4), abs=1e-12)
        assert _class_auc(ep["probs"][:, 2], ep["labels"] == 2, ones)[0] == pytest.approx(ovr_auc(probs[:, 2], labels == 2))
    # counting a query twice is counting it twice: the weighted score equals the score of the duplicated episode
    ep = next(iter(data.values()))
    w = np.ones((1, len(ep["labels"])))
    w[0, 0] = 2
    dup = {**ep, "labels": np.concatenate([ep["labels"], ep["labels"][:1]]), "probs": np.concatenate([ep["probs"], ep["probs"][:1]])}
    for metric in ("balanced_acc", "auc"):
        assert _episode_score(ep, metric, w)[0] == pytest.approx(_episode_score(dup, metric, np.ones((1, len(dup["labels"]))))[0])


def test_balanced_accuracy_has_an_interval_as_wide_as_accuracy_when_queries_are_balanced():
    """With balanced queries, balanced accuracy is accuracy, and the two intervals must be alike. They were not:
    each episode's score was kept and only reweighted by its many patients' draws, so the interval of balanced
    accuracy and macro AUC came out about ten times narrower than accuracy's (found by a review, 2026-12-05)."""
    s = evaluation_summary(CLASSIFICATION, _classification_records(), seed=0, interval=PATIENT_BOOTSTRAP, n_boot=400)
    shot = s["1"]
    acc, bal = shot["acc"][TRAINED]["all"], shot["balanced_acc"][TRAINED]["all"]
    assert bal["mean"] == pytest.approx(acc["mean"], abs=1e-6)
    assert 0.7 < bal["ci95"] / acc["ci95"] < 1.4
    auc = shot["auc"][TRAINED]["all"]
    assert auc["ci_low"] < auc["mean"] < auc["ci_high"] and auc["ci95"] > 0.5 * acc["ci95"]
    d_acc, d_bal = shot["differences"]["acc"]["untrained encoder"]["all"], shot["differences"]["balanced_acc"]["untrained encoder"]["all"]
    assert d_bal["mean"] == pytest.approx(d_acc["mean"], abs=1e-6)
    assert 0.7 < d_bal["ci95"] / d_acc["ci95"] < 1.4


def test_a_rare_class_keeps_an_interval_when_some_resamples_draw_none_of_its_patients():
    """A class held by 2 of 18 patients is absent from about e^-2 of the resamples, which have no AUC for it; those
    resamples are left out of the percentiles instead of making both bounds NaN (found by a review, 2026-12-05)."""
    import torch

    rng = np.random.default_rng(0)
    recs = []
    for e in range(30):
        for q in range(6):
            label = q % 3
            patient = f"p{label}-{rng.integers(2 if label == 0 else 8)}"
            for method, s in ((TRAINED, 2.0), ("untrained encoder", 0.0)):
                logits = rng.normal(0, 1, 3)
                logits[label] += s
                probs = torch.tensor(logits).softmax(0).tolist()
                recs.append({"method": method, "episode": e, "shot": 1, "site": "s", "patient": patient,
                             "query_id": f"q{q}", "class": f"c{label}", "classes": ["c0", "c1", "c2"], "label": label,
                             "probs": probs, "acc": float(int(np.argmax(probs)) == label)})
    s = evaluation_summary(CLASSIFICATION, recs, seed=0, interval=PATIENT_BOOTSTRAP, n_boot=500)["1"]
    rare = s["auc"][TRAINED]["class"]["c0"]
    assert rare["ci_low"] is not None and rare["ci_low"] <= rare["mean"] <= rare["ci_high"]
    assert 0.5 * 500 < rare["n_resamples"] < 500
    assert not math.isnan(s["differences"]["auc"]["untrained encoder"]["class"]["c0"]["ci95"])


def test_a_difference_is_bold_only_when_its_interval_as_shown_excludes_zero():
    """Bold was decided on the unrounded bounds: ``**+0.010 [+0.000, +0.020]**`` read as significant while its
    shown bound touches 0, and ``+0.010 ± 0.010`` too."""
    from imaging_meta.evaluation.reports import diff_cell

    assert diff_cell({"mean": 0.010, "ci_low": 0.0004, "ci_high": 0.020}) == "+0.010 [+0.000, +0.020]"
    assert diff_cell({"mean": 0.010, "ci_low": 0.0006, "ci_high": 0.020}) == "**+0.010 [+0.001, +0.020]**"
    assert diff_cell({"mean": -1.0, "ci_low": -2.0, "ci_high": -0.004}, digits=2) == "-1.00 [-2.00, -0.00]"
    assert diff_cell({"mean": 0.0104, "ci95": 0.0096}) == "+0.010 ± 0.010"
    assert diff_cell({"mean": 0.012, "ci95": 0.010}) == "**+0.012 ± 0.010**"


@pytest.mark.parametrize("interval", [EPISODE_T, PATIENT_BOOTSTRAP])
def test_an_episode_that_cannot_be_scored_is_left_out_and_not_counted(interval):
    """A macro AUC over queries of one class is undefined: the episode-t interval let it turn the whole cell into
    NaN, and the patient bootstrap left it out but counted it (a review). Both now score the other 9 of 10."""
    from imaging_meta.tasks import get_task

    rng = np.random.default_rng(0)
    recs = []
    for e in range(10):
        labels = [0, 0, 0] if e == 0 else [0, 1, 0, 1]
        for j, label in enumerate(labels):
            probs = rng.dirichlet([1, 1]).tolist()
            recs.append(dict(method="trained", episode=e, shot=1, site="A", query_id=f"{e}_{j}",
                             patient=f"p{rng.integers(5)}", acc=float(np.argmax(probs) == label),
                             **{"class": "ab"[label]}, classes=["a", "b"], label=label, probs=probs))
    auc = evaluation_summary(get_task(CLASSIFICATION), recs, interval=interval, n_boot=200)["1"]["auc"]["trained"]["all"]
    assert auc["n_episodes"] == 9 and auc["mean"] == pytest.approx(0.4444444, abs=1e-6)


def test_the_whole_scan_differences_are_resampled_with_the_reports_seed():
    """`scans_markdown(records, seed)` resampled every row with ``seed`` but the paired differences with 0."""
    from imaging_meta.commands.evaluate_scans import scans_markdown
    from imaging_meta.evaluation.scans import COPY, TRAINED_FULL

    rng = np.random.default_rng(0)
    recs = [dict(protocol="whole_scan", method=m, support=f"s{i}", query=f"q{i}", support_patient=f"p{i}",
                 query_patient=f"p{(i + 1) % 8}", structure="liver", site="A", dice=float(rng.random()), hd95=None)
            for i in range(8) for m in (TRAINED_FULL, COPY)]

    def difference_row(seed: int) -> str:
        return next(line for line in scans_markdown(recs, seed).splitlines() if line.startswith(f"| {TRAINED_FULL} − "))

    assert difference_row(0) != difference_row(7) and difference_row(7) == difference_row(7)


def test_the_note_on_paired_differences_names_the_interval_in_use():
    """A review: under Student's t the note said the difference intervals resample patients."""
    from imaging_meta.evaluation.reports import _interval_notes

    boot = " ".join(_interval_notes(PATIENT_BOOTSTRAP, 9, True, 2000))
    t = " ".join(_interval_notes(EPISODE_T, 9, True))
    assert "resampling patients keeps the pairs" in boot and "resampling patients" not in t
    assert "a t interval over the per-episode means of the differences" in t


def test_each_bootstrap_resample_draws_as_many_units_as_there_are():
    """A resample of n patients draws n of them (an off-by-one widened every interval without a test failing:
    the by-hand checks reuse the same counts). Against the textbook: 400 patients of one N(0, 1) value each give
    a 95% half-width near 1.96 / sqrt(400)."""
    assert (_resample_counts(7, 0, 50).sum(1) == 7).all() and (_resample_counts(400, 3, 20).sum(1) == 400).all()
    values = np.random.default_rng(1).normal(size=400)
    cell = cluster_bootstrap([(i, [f"p{i}"], float(v)) for i, v in enumerate(values)], seed=0, n_boot=4000)
    assert cell["ci95"] == pytest.approx(1.96 * values.std() / 20, rel=0.08)


def test_per_episode_scores_pair_their_queries_name_their_classes_and_sites():
    """Mutations a review found no test caught: a paired difference of per-episode scores whose other method was
    scored unpaired; per-class AUC cells under other classes' names; balanced accuracy's per-class rows dropped; an
    episode of two sites counted under one; episodes of other queries paired."""
    import torch

    from imaging_meta.evaluation.metrics import ovr_auc

    recs = _classification_records(n_patients=12, n_episodes=30, n_way=3)
    skill = {"c0": 3.0, "c1": 1.0, "c2": 0.0}  # the classes' AUCs differ, so a cell under another name is wrong
    rng = np.random.default_rng(5)
    for r in recs:
        logits = rng.normal(0, 1, 3)
        logits[r["label"]] += skill[r["class"]]
        r["probs"] = torch.tensor(logits).softmax(0).tolist()
        r["acc"] = float(int(np.argmax(r["probs"])) == r["label"])
        r["site"] = "s1" if (r["episode"] == 0 and r["query_id"].startswith("q0")) else "s0"  # episode 0: two sites
    # a baseline that answers exactly as the trained learner: every paired difference is 0, in every resample
    twin = [{**r, "method": "copy"} for r in recs if r["method"] == TRAINED]
    # and one whose episode 1 holds other queries: it cannot be paired there
    other = [{**r, "method": "other", "query_id": r["query_id"] + ("x" if r["episode"] == 1 else "")}
             for r in recs if r["method"] == TRAINED]
    all_recs = recs + twin + other
    boot = evaluation_summary(CLASSIFICATION, all_recs, seed=0, interval=PATIENT_BOOTSTRAP, n_boot=200)["1"]
    for metric in ("balanced_acc", "auc"):
        same = boot["differences"][metric]["copy"]["all"]
        assert same["mean"] == 0.0 and same["ci_low"] == same["ci_high"] == 0.0, metric
        assert boot["differences"][metric]["other"]["all"]["n_episodes"] == 29, metric
        assert "mixed sites" in boot[metric][TRAINED]["site"], metric
    assert set(boot["balanced_acc"][TRAINED]["class"]) == {"c0", "c1", "c2"}
    t = evaluation_summary(CLASSIFICATION, all_recs, seed=0, interval=EPISODE_T)["1"]
    assert set(t["balanced_acc"][TRAINED]["class"]) == {"c0", "c1", "c2"}
    assert "mixed sites" in t["balanced_acc"][TRAINED]["site"]
    for c, name in enumerate(("c0", "c1", "c2")):
        by_hand = []
        for e in range(30):
            mine = [r for r in recs if r["method"] == TRAINED and r["episode"] == e]
            probs = torch.tensor([r["probs"] for r in mine], dtype=torch.float64)
            labels = torch.tensor([r["label"] for r in mine])
            by_hand.append(ovr_auc(probs[:, c], labels == c))
        assert t["auc"][TRAINED]["class"][name]["mean"] == pytest.approx(np.mean(by_hand)), name
