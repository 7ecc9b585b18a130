"""Per-query records -> means with 95% intervals, and paired differences: the statistics of every report.

A record is one query prediction of one episode (see `imaging_meta.evaluation.scoring.score_batch`): at
least ``method``, ``episode``, ``site``, ``patient`` and the task's metric, plus ``organ`` (segmentation) or
``class``, ``classes``, ``label`` and ``probs`` (classification).

**The point estimate** of a cell (a method; overall, or one organ, class or site) is the mean over episodes
of the mean over the episode's queries in the cell; a per-episode score (balanced accuracy, AUC) is that
score. Let episode ``e`` (of ``E``) have ``n_e`` records in the cell, values ``x`` and query patients ``p``:
``theta = sum_r b_r x_r`` with ``b_r = 1 / (E n_e)``.

**The intervals** (`INTERVALS`), both 95%:

* ``patient-bootstrap`` (`DEFAULT_INTERVAL`, the intervals of ``imaging-meta evaluate``): test episodes
  reuse the same few test patients, so episodes are not independent; the patient (the query's) is the
  unit that was sampled. A resample draws the cell's ``P`` patients ``P`` times with replacement (numpy
  ``default_rng(seed)``, `N_BOOT` resamples); patient ``p`` drawn ``w_p`` times keeps every one of its
  records, ``w_p`` times over: ``theta* = sum_r w_p(r) b_r x_r / sum_r w_p(r) b_r`` (a weighted mean of
  records, each weighted by its episode's share and its patient's count; with the same number of queries in
  every episode, simply the mean of the drawn patients' records). The interval is the 2.5th and 97.5th
  percentiles of ``theta*`` (every ``w_p = 1`` gives back ``theta``). A per-episode score belongs to
  the episode's query patients in equal shares. (Support patients recur too; this resamples query patients.)
* ``episode-t``: Student's t over the per-episode means, as if episodes were independent: too narrow when
  they share patients. ``imaging-meta test`` and the validation logs use it (no resampling).

**Paired differences** (`paired_rows`, `differences`): the trained learner's score minus a baseline's on the
same query of the same episode, summarised like a score with the same interval. Resampling patients keeps the
pairs together, so the interval is that of the difference, not of two separate means.

ECE is pooled over queries, not averaged, so its interval is always a bootstrap: of patients, or of episodes
under ``episode-t`` (`ece_bootstrap`).
"""

from __future__ import annotations

import functools
import math
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence

import numpy as np
import torch
from scipy import stats

from imaging_meta.evaluation.methods import TRAINED
from imaging_meta.evaluation.metrics import balanced_accuracy, calibration_bins, macro_auc, ovr_auc
from imaging_meta.tasks import Task

PATIENT_BOOTSTRAP, EPISODE_T, EPISODE_BOOTSTRAP = "patient-bootstrap", "episode-t", "episode-bootstrap"
#: the intervals a report may use (``imaging-meta evaluate --interval``)
INTERVALS = (PATIENT_BOOTSTRAP, EPISODE_T)
DEFAULT_INTERVAL = PATIENT_BOOTSTRAP
#: bootstrap resamples of ``imaging-meta evaluate``
N_BOOT = 2000
#: how each interval is named in report tables (ECE under ``episode-t``: a bootstrap of episodes)
INTERVAL_LABELS = {
    PATIENT_BOOTSTRAP: "95% CI: percentile bootstrap of test patients",
    EPISODE_T: "95% CI: Student's t over episodes",
    EPISODE_BOOTSTRAP: "95% CI: percentile bootstrap of episodes",
}


def interval_description(interval: str, n_boot: int = N_BOOT, seed: int = 0) -> dict:
    """What a report records about its intervals (``context["interval"]``)."""
    check_interval(interval)
    out = {"name": interval, "label": INTERVAL_LABELS[interval], "confidence": 0.95}
    if interval == PATIENT_BOOTSTRAP:
        out |= {"resamples": n_boot, "seed": seed, "unit": "query patient",
                "estimator": "mean over episodes of per-episode means; a resample counts each record as often as "
                             "its patient was drawn; 2.5th and 97.5th percentiles"}
    return out


def check_interval(interval: str) -> str:
    if interval not in INTERVALS:
        raise ValueError(f"interval must be one of {', '.join(INTERVALS)}; got {interval!r}")
    return interval


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


def record_patients(r: dict) -> list[str]:
    """The patients a record's score belongs to: ``patients`` (a per-episode score: its query patients), else
    ``patient``, else the query itself (``query_id``), else the episode (then the patient bootstrap is a
    bootstrap of episodes)."""
    if r.get("patients"):
        return [str(p) for p in r["patients"]]
    for key in ("patient", "query_id"):
        if r.get(key) is not None:
            return [str(r[key])]
    return [f"episode {r['episode']}"]


@functools.lru_cache(maxsize=32)
def _resample_counts(n: int, seed: int, n_boot: int) -> np.ndarray:
    """(n_boot, n) counts: how often each of ``n`` sorted units is drawn in each resample of ``n`` draws."""
    counts = np.random.default_rng(seed).multinomial(n, np.full(n, 1 / n), size=n_boot)
    counts.setflags(write=False)
    return counts


def _percentiles(boot: np.ndarray) -> tuple[float, float]:
    lo, hi = np.percentile(boot, [2.5, 97.5])
    return float(lo), float(hi)


def cluster_statistic(units: Sequence[tuple], weights: dict[str, float] | None = None) -> float:
    """The cell statistic of ``units`` (``(episode, patients, value)``) with patient ``p`` counted ``weights[p]``
    times (0 when left out; ``weights=None``: once each, the point estimate, the mean over episodes of
    per-episode means).
    The reference form of the estimator that `cluster_bootstrap` vectorises."""
    sizes = Counter(u[0] for u in units)
    num = den = 0.0
    for ep, patients, x in units:
        for p in patients:
            share = (1.0 if weights is None else weights.get(p, 0.0)) / (len(sizes) * sizes[ep] * len(patients))
            num, den = num + share * x, den + share
    return num / den if den else float("nan")


def cluster_bootstrap(units: Sequence[tuple], seed: int = 0, n_boot: int = N_BOOT) -> dict:
    """Point estimate and patient-bootstrap interval of a cell (see the module docstring).

    Args:
        units: ``(episode, patients, value)`` per record; ``patients`` a list (one patient for a query).

    Returns:
        ``{"mean", "ci95" (half the width), "ci_low", "ci_high", "n_episodes", "n_patients"}``; the bounds are
        None with fewer than two patients, or when every unit has the same patients (two whole-scan pairs of one
        support and one query patient): resampling patients cannot move such a mean, and its interval would be a
        false zero width.
    """
    by_ep: dict = defaultdict(list)
    for ep, _, x in units:
        by_ep[ep].append(x)
    episodes = sorted(by_ep, key=str)
    mean = mean_ci([sum(by_ep[e]) / len(by_ep[e]) for e in episodes])[0]
    patients = sorted({p for _, ps, _ in units for p in ps})
    out = {"mean": mean, "ci95": float("nan"), "ci_low": None, "ci_high": None, "n_episodes": len(episodes),
           "n_patients": len(patients)}
    if len(patients) < 2 or len({tuple(sorted(ps)) for _, ps, _ in units}) < 2:
        return out
    pos = {p: i for i, p in enumerate(patients)}
    num, den = np.zeros(len(patients)), np.zeros(len(patients))
    for ep, ps, x in units:
        share = 1.0 / (len(episodes) * len(by_ep[ep]) * len(ps))
        for p in ps:
            num[pos[p]] += share * x
            den[pos[p]] += share
    w = _resample_counts(len(patients), seed, n_boot)
    boot = (w * num).sum(1) / (w * den).sum(1)  # ufunc sums, not BLAS: the same bytes on any thread count
    lo, hi = _percentiles(boot)
    return out | {"ci95": (hi - lo) / 2, "ci_low": lo, "ci_high": hi}


def pair_bootstrap(units: Sequence[tuple], seed: int = 0, n_boot: int = N_BOOT) -> dict:
    """Mean over (support, query) scan pairs and a two-way patient bootstrap interval (the whole-scan reports).

    A pair's score depends on two patients, crossed: a support patient recurs in several pairs, and so does a
    query patient. A resample draws the ``P`` patients of all pairs ``P`` times with replacement and counts a pair
    ``w_support * w_query`` times: only when both its patients were drawn. (Splitting a pair's weight between its
    two patients instead keeps it in every resample that draws either, which pulls each resample toward the
    overall mean: a review measured an interval of 0.008 where a t interval over the same 4 pairs was 0.108.)
    Resamples in which no pair counts are left out, and their number is returned. Simulated coverage
    (`benchmarks/pair_bootstrap_coverage.py`, docs/evaluation.md): 0.97-0.995 when pairs vary independently of
    their patients (conservative: a pair's own noise is counted about three times), about 0.95-0.975 with patient
    effects, and too narrow with 4 pairs (0.76-0.86); the split weights covered 0.53-0.77.

    Args:
        units: ``(support patient, query patient, value)`` per pair.

    Returns:
        ``{"mean", "ci95", "ci_low", "ci_high", "n_pairs", "n_patients", "resamples"}``; the bounds are None with
        fewer than three patients (every resample that keeps a pair then keeps them all in the same proportion)
        or when every pair has the same two patients.
    """
    values = np.array([float(u[2]) for u in units])
    patients = sorted({str(p) for s, q, _ in units for p in (s, q)})
    out = {"mean": float(values.mean()) if len(values) else float("nan"), "ci95": float("nan"), "ci_low": None,
           "ci_high": None, "n_pairs": len(units), "n_patients": len(patients), "resamples": 0}
    if len(patients) < 3 or len({(str(s), str(q)) for s, q, _ in units}) < 2:
        return out
    pos = {p: i for i, p in enumerate(patients)}
    counts = _resample_counts(len(patients), seed, n_boot).astype(np.float64)
    weight = counts[:, [pos[str(s)] for s, _, _ in units]] * counts[:, [pos[str(q)] for _, q, _ in units]]
    total = weight.sum(1)
    kept = total > 0
    boot = (weight[kept] * values).sum(1) / total[kept]  # ufunc sums: the same bytes on any thread count
    if not len(boot):
        return out
    lo, hi = _percentiles(boot)
    return out | {"ci95": (hi - lo) / 2, "ci_low": lo, "ci_high": hi, "resamples": int(kept.sum())}


def _episode_t(units: Sequence[tuple]) -> dict:
    by_ep: dict = defaultdict(list)
    for ep, _, x in units:
        by_ep[ep].append(x)
    scores = [sum(v) / len(v) for _, v in sorted(by_ep.items(), key=lambda kv: str(kv[0]))]
    # an episode that cannot be scored (a macro AUC over queries of one class) is left out, as the patient
    # bootstrap leaves it out; it wiped out the whole cell (a review)
    scored = [x for x in scores if not math.isnan(x)]
    m, h = mean_ci(scored) if scored else (float("nan"), float("nan"))
    return {"mean": m, "ci95": h, "n_episodes": len(scored)}


def summarize(records: Iterable[dict], metric: str = "dice", groups: Sequence[str] = ("organ", "site"),
              interval: str = EPISODE_T, seed: int = 0, n_boot: int = N_BOOT) -> dict:
    """Mean and 95% interval of ``metric`` per method, overall and per value of each grouping field.

    Overall, a method's score on an episode is the mean over its queries. Per group value (an organ, a class,
    a site), it is the mean over the episode's queries with that value, over the episodes that have such
    queries: a class seen in 40 episodes is a mean over 40. The interval is ``interval`` (module docstring);
    the default, ``episode-t``, is the cheap one of the validation logs and ``imaging-meta test``.

    Returns:
        ``{method: {"all": stat, "<group>": {value: stat}, ...}}`` with ``stat = {"mean", "ci95", "n_episodes"}``,
        and ``ci_low``, ``ci_high``, ``n_patients`` for the patient bootstrap.
    """
    cells: dict[tuple, list[tuple]] = defaultdict(list)
    for r in records:
        unit = (r["episode"], record_patients(r), float(r[metric]))
        cells[(r["method"], "all", "")].append(unit)
        for g in groups:
            cells[(r["method"], g, str(r[g]))].append(unit)

    def stat(units):
        return _episode_t(units) if interval == EPISODE_T else cluster_bootstrap(units, seed, n_boot)

    out = {}
    for method in sorted({m for m, _, _ in cells}):
        entry = {"all": stat(cells[(method, "all", "")])}
        for g in groups:
            entry[g] = {v: stat(u) for (m, gg, v), u in sorted(cells.items()) if m == method and gg == g}
        out[method] = entry
    return out


def paired_rows(rows: Sequence[dict], metric: str, reference: str = TRAINED) -> dict[str, list[dict]]:
    """Per method other than ``reference``: rows of ``reference`` minus that method on the same item.

    Rows are paired on the episode, the query (``query_id``) and the class (per-class rows), and the order
    among rows that share those; a row of one method without its pair in the other is left out. A difference
    row is the reference's row (its episode, patient and group fields) with ``metric`` the difference.
    """
    keyed: dict[str, dict[tuple, dict]] = defaultdict(dict)
    seen: Counter = Counter()
    for r in rows:
        key = (r["episode"], r.get("query_id"), r.get("class"))
        keyed[r["method"]][(*key, seen[(r["method"], *key)])] = r
        seen[(r["method"], *key)] += 1
    ref = keyed.get(reference, {})
    out = {}
    for method in sorted(m for m in keyed if m != reference):
        diff = [{**ref[k], "method": method, metric: float(ref[k][metric]) - float(r[metric])}
                for k, r in keyed[method].items() if k in ref]
        if diff:
            out[method] = diff
    return out


def differences(rows: Sequence[dict], metric: str, groups: Sequence[str], interval: str = EPISODE_T, seed: int = 0,
                n_boot: int = N_BOOT, reference: str = TRAINED) -> dict:
    """``reference`` minus each other method, paired (`paired_rows`), summarised as `summarize` does.

    Returns:
        ``{baseline: {"all": stat, "<group>": {value: stat}}}``: the stats of ``reference - baseline``.
    """
    return {m: summarize(d, metric, groups, interval, seed, n_boot)[m] for m, d in paired_rows(rows, metric, reference).items()}


def _by_shot(records: Sequence[dict]) -> dict[int, list[dict]]:
    out: dict[int, list[dict]] = defaultdict(list)
    for r in records:
        out[int(r["shot"])].append(r)
    return dict(sorted(out.items()))


def _episode_site(sites: Sequence[str]) -> str:
    return sites[0] if len(set(sites)) == 1 else "mixed sites"


def _ece_unit(unit: str):
    """The resampling unit of a record for the ECE bootstrap: its episode or its (query) patient."""
    return (lambda r: str(r["episode"])) if unit == "episode" else (lambda r: record_patients(r)[0])


def _ece_counts(records: Sequence[dict], units: Sequence[str], unit: str, n_bins: int) -> np.ndarray:
    """Per unit of ``units`` (episodes or patients), the (U, n_bins, 3) count, sum of confidence and sum of
    correct per confidence bin."""
    key, pos = _ece_unit(unit), {e: i for i, e in enumerate(units)}
    counts = np.zeros((len(units), n_bins, 3))
    for r in records:
        p = np.asarray(r["probs"])
        conf, pred = float(p.max()), int(p.argmax())
        counts[pos[key(r)], min(int(conf * n_bins), n_bins - 1)] += (1.0, conf, float(pred == r["label"]))
    return counts


def _ece(total: np.ndarray) -> np.ndarray:
    """ECE of (..., n_bins, 3) bin totals: sum |sum correct - sum confidence| / count."""
    n = total[..., 0]
    gap = np.abs(total[..., 2] - total[..., 1])  # = count * |acc - conf|
    return gap.sum(-1) / np.maximum(n.sum(-1), 1)


def ece_bootstrap(records: Sequence[dict], n_bins: int = 15, n_boot: int = 1000, seed: int = 0, unit: str = "episode",
                  minus: Sequence[dict] | None = None) -> dict:
    """ECE pooled over every query, with a 95% interval from a seeded bootstrap of episodes or patients.

    ECE is not an average of per-episode scores (an episode of 25 queries is too few to bin), so its interval
    resamples whole units (``unit``: ``"episode"`` or ``"patient"``): the pooled ECE of each resample, and the
    2.5th and 97.5th percentiles. With ``minus`` (another method's records on the same queries): the ECE of
    ``records`` minus that of ``minus``, both on the same resamples.

    Returns:
        ``{"mean", "ci95", "ci_low", "ci_high", "n_episodes"}`` (``mean`` is the pooled ECE; ``ci95`` half the
        interval's width), and ``n_patients`` for the patient bootstrap.
    """
    key = _ece_unit(unit)
    units = sorted({key(r) for r in [*records, *(minus or [])]})
    parts = [_ece_counts(recs, units, unit, n_bins) for recs in (records, minus or [])]

    def value(weights=None):  # (B,) or () ECE of records, minus that of ``minus``
        totals = [c.sum(0) if weights is None else np.einsum("bu,ukc->bkc", weights, c) for c in parts]
        return _ece(totals[0]) - (_ece(totals[1]) if minus is not None else 0.0)

    out = {"mean": float(value()), "ci95": float("nan"), "ci_low": None, "ci_high": None,
           "n_episodes": len({r["episode"] for r in records})}
    if unit == "patient":
        out["n_patients"] = len(units)
    if len(units) < 2:
        return out
    lo, hi = _percentiles(value(_resample_counts(len(units), seed, n_boot)))
    return out | {"ci95": (hi - lo) / 2, "ci_low": lo, "ci_high": hi}


def _per_episode_rows(recs: Sequence[dict]) -> tuple[list[dict], list[dict]]:
    """Per (method, episode): balanced accuracy and macro AUC over its queries (rows with ``balanced_acc``),
    and each class's one-vs-rest AUC in it (rows with ``auc_class``); ``patients``: the episode's query
    patients, among whom a per-episode score is shared in the patient bootstrap."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in recs:
        groups[(r["method"], r["episode"])].append(r)
    ep_rows, cls_rows = [], []
    for (method, ep), rs in groups.items():
        probs = torch.tensor([r["probs"] for r in rs], dtype=torch.float64)
        labels = torch.tensor([r["label"] for r in rs])
        n = probs.shape[1]
        site = _episode_site([r["site"] for r in rs])
        patients = [p for r in rs for p in record_patients(r)]
        ep_rows.append({"method": method, "episode": ep, "site": site, "class": "", "patients": patients,
                        "balanced_acc": balanced_accuracy(probs, labels, n), "auc": macro_auc(probs, labels, n)})
        for c in range(n):  # per class: its one-vs-rest AUC in this episode
            if (labels == c).any() and (labels != c).any():
                cls_rows.append({"method": method, "episode": ep, "site": None, "class": rs[0]["classes"][c],
                                 "patients": patients, "auc_class": ovr_auc(probs[:, c], labels == c)})
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


def _with_differences(rows: Sequence[dict], metric: str, groups: Sequence[str], opts: dict) -> tuple[dict, dict]:
    """`summarize` and `differences` of ``rows`` with the same options."""
    return summarize(rows, metric, groups, **opts), differences(rows, metric, groups, **opts)


def _merge_class(pair: tuple[dict, dict], rows: Sequence[dict], metric: str, opts: dict) -> tuple[dict, dict]:
    """``pair`` (summary, differences) with the per-class cells of ``metric`` over ``rows`` added."""
    for part, extra in zip(pair, _with_differences(rows, metric, ("class",), opts), strict=True):
        for method, s in extra.items():
            part.setdefault(method, {})["class"] = s["class"]
    return pair


def _per_query(recs: Sequence[dict], metric: str, groups: Sequence[str], opts: dict, n_bins: int) -> tuple[dict, dict]:
    """A per-query score (Dice, HD95, accuracy): the mean over an episode's queries."""
    return _with_differences(recs, metric, groups, opts)


def _episode_data(recs: Sequence[dict]) -> dict[tuple, dict]:
    """Per (method, episode): its queries in query order (``query_id``, then record order), with their patients,
    labels and class probabilities, the episode's site and class names."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in recs:
        groups[(r["method"], r["episode"])].append(r)
    out = {}
    for key, rs in groups.items():
        rs = sorted(rs, key=lambda r: str(r.get("query_id", "")))  # stable: record order among equal ids
        out[key] = {"ids": [str(r.get("query_id", "")) for r in rs], "patients": [record_patients(r)[0] for r in rs],
                    "labels": np.asarray([int(r["label"]) for r in rs]),
                    "probs": np.asarray([r["probs"] for r in rs], dtype=np.float64),
                    "site": _episode_site([r["site"] for r in rs]), "classes": list(rs[0]["classes"])}
    return out


def _class_auc(scores: np.ndarray, positive: np.ndarray, w: np.ndarray) -> np.ndarray:
    """(B,) one-vs-rest AUC of ``scores`` (Q,) with each query counted ``w`` (B, Q) times (ties one half); NaN
    where a resample holds no positive or no negative. With ``w`` all ones, `metrics.ovr_auc`."""
    pos, neg = scores[positive], scores[~positive]
    wins = (pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])  # (P, N)
    wp, wn = w[:, positive], w[:, ~positive]
    num = np.einsum("bp,pn,bn->b", wp, wins, wn)
    den = wp.sum(1) * wn.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


def _episode_score(ep: dict, metric: str, w: np.ndarray, cls: int | None = None) -> np.ndarray:
    """(B,) an episode's score with each query counted ``w`` (B, Q) times: ``balanced_acc`` (the mean recall of
    the classes present), ``auc`` (the macro one-vs-rest AUC) or ``auc_class`` (class ``cls``'s); NaN where the
    resample leaves nothing to score. With ``w`` all ones: `metrics.balanced_accuracy`, `metrics.macro_auc`."""
    labels, probs = ep["labels"], ep["probs"]
    n = probs.shape[1]
    if metric == "balanced_acc":
        onehot = (labels[:, None] == np.arange(n)[None, :]).astype(np.float64)  # (Q, C)
        correct = (probs.argmax(1) == labels).astype(np.float64)
        num, den = np.einsum("bq,qc->bc", w * correct, onehot), np.einsum("bq,qc->bc", w, onehot)
        recall = np.where(den > 0, num / np.where(den > 0, den, 1.0), 0.0)
        present = (den > 0).sum(1)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(present > 0, recall.sum(1) / np.maximum(present, 1), np.nan)
    classes = [cls] if metric == "auc_class" else range(n)
    aucs = [_class_auc(probs[:, c], labels == c, w) for c in classes if (labels == c).any() and (labels != c).any()]
    if not aucs:
        return np.full(w.shape[0], np.nan)
    stacked = np.stack(aucs)
    valid = ~np.isnan(stacked)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(valid.any(0), np.where(valid, stacked, 0.0).sum(0) / np.maximum(valid.sum(0), 1), np.nan)


def episode_score_bootstrap(cell: Sequence[tuple[dict, dict | None, int | None]], metric: str, seed: int = 0,
                            n_boot: int = N_BOOT) -> dict:
    """Point estimate and patient-bootstrap interval of a per-episode score (balanced accuracy, AUC), or of the
    paired difference of two methods' scores, over a cell of episodes.

    A per-episode score is not a mean of per-query values, so a resample cannot keep the episode's value and
    only reweight it (shared among its query patients, every episode would keep almost its full weight and the
    interval would shrink to nothing). Each resample draws the cell's query patients with replacement, counts
    every query as often as its patient was drawn, **recomputes** each episode's score on those counts, and
    weights the episode by the mean count of its queries (the per-query estimator's weights): ``theta* =
    sum_e c_e v*_e / sum_e c_e``. Every count 1 gives back the mean over episodes of their scores.

    Args:
        cell: ``(episode, other, cls)`` per episode (`_episode_data` values): ``other`` the same episode of the
            method subtracted (None: the score itself), ``cls`` the class of ``auc_class``.

    Returns:
        ``{"mean", "ci95", "ci_low", "ci_high", "n_episodes", "n_patients"}`` (bounds None with fewer than two
        patients), and ``n_resamples``: the resamples that could score the cell (one that drew none of the
        patients holding a class has no AUC for it and is left out of the percentiles).
    """
    patients = sorted({p for ep, _, _ in cell for p in ep["patients"]})
    pos = {p: i for i, p in enumerate(patients)}

    def value(weights: np.ndarray) -> np.ndarray:  # (B, P) patient counts -> (B,)
        num, den = np.zeros(weights.shape[0]), np.zeros(weights.shape[0])
        for ep, other, cls in cell:
            w = weights[:, [pos[p] for p in ep["patients"]]].astype(np.float64)
            v = _episode_score(ep, metric, w, cls)
            if other is not None:
                v = v - _episode_score(other, metric, w, cls)
            c = w.mean(1)
            ok = ~np.isnan(v) & (c > 0)
            num += np.where(ok, c * np.where(ok, v, 0.0), 0.0)
            den += np.where(ok, c, 0.0)
        with np.errstate(invalid="ignore", divide="ignore"):
            return num / den

    def unscorable(ep: dict, cls: int | None) -> bool:  # a macro AUC over queries of one class
        return bool(np.isnan(_episode_score(ep, metric, np.ones((1, len(ep["patients"]))), cls)[0]))

    # the episodes that score the cell (`value` leaves the others out, so they are not counted either)
    scored = sum(not unscorable(ep, cls) and (other is None or not unscorable(other, cls)) for ep, other, cls in cell)
    out = {"mean": float(value(np.ones((1, len(patients))))[0]), "ci95": float("nan"), "ci_low": None,
           "ci_high": None, "n_episodes": scored, "n_patients": len(patients)}
    if len(patients) < 2:
        return out
    boot = value(_resample_counts(len(patients), seed, n_boot))
    boot = boot[~np.isnan(boot)]  # resamples that drew no patient able to score the cell (a rare class's AUC)
    if boot.size < 2:
        return out
    lo, hi = _percentiles(boot)
    return out | {"ci95": (hi - lo) / 2, "ci_low": lo, "ci_high": hi, "n_resamples": int(boot.size)}


def _episode_score_summary(recs: Sequence[dict], metric: str, groups: Sequence[str], opts: dict) -> tuple[dict, dict]:
    """Summary and differences (`TRAINED` minus each method, on the same episodes) of a per-episode score under
    the patient bootstrap, overall, per site, and (``auc`` with ``class`` in ``groups``) each class's AUC."""
    data = _episode_data(recs)
    methods = sorted({m for m, _ in data})
    classes = sorted({c for d in data.values() for c in d["classes"]})

    def cells(method: str, minus: str | None) -> dict:
        eps = []
        for (m, e), d in sorted(data.items(), key=lambda kv: str(kv[0][1])):
            if m != method:
                continue
            other = None if minus is None else data.get((minus, e))
            if minus is not None and (other is None or other["ids"] != d["ids"]):
                continue  # no pair on the same queries
            eps.append((d, other))
        stat = functools.partial(episode_score_bootstrap, metric=metric, seed=opts["seed"], n_boot=opts["n_boot"])
        out = {"all": stat([(d, o, None) for d, o in eps])}
        out["site"] = {s: stat([(d, o, None) for d, o in eps if d["site"] == s]) for s in sorted({d["site"] for d, _ in eps})}
        if metric == "auc" and "class" in groups:  # per class: its one-vs-rest AUC in the episodes that can score it
            out["class"] = {}
            for name in classes:
                cell = [(d, o, d["classes"].index(name)) for d, o in eps if name in d["classes"]]
                cell = [(d, o, c) for d, o, c in cell if (d["labels"] == c).any() and (d["labels"] != c).any()]
                if cell:
                    out["class"][name] = episode_score_bootstrap(cell, "auc_class", opts["seed"], opts["n_boot"])
        return out

    summary = {m: cells(m, None) for m in methods}
    diffs = {m: cells(TRAINED, m) for m in methods if m != TRAINED and TRAINED in methods}
    return summary, diffs


def _balanced_accuracy(recs: Sequence[dict], metric: str, groups: Sequence[str], opts: dict, n_bins: int) -> tuple[dict, dict]:
    """Per episode over its queries; per class, that class's recall (its per-query accuracy)."""
    if opts["interval"] == PATIENT_BOOTSTRAP:
        pair = _episode_score_summary(recs, "balanced_acc", ("site",), opts)
    else:
        pair = _with_differences(_per_episode_rows(recs)[0], "balanced_acc", ("site",), opts)
    return _merge_class(pair, recs, "acc", opts) if "class" in groups else pair


def _macro_auc(recs: Sequence[dict], metric: str, groups: Sequence[str], opts: dict, n_bins: int) -> tuple[dict, dict]:
    """Per episode over its queries; per class, its one-vs-rest AUC in each episode."""
    if opts["interval"] == PATIENT_BOOTSTRAP:
        return _episode_score_summary(recs, "auc", groups, opts)
    ep_rows, cls_rows = _per_episode_rows(recs)
    pair = _with_differences(ep_rows, "auc", ("site",), opts)
    return _merge_class(pair, cls_rows, "auc_class", opts) if "class" in groups else pair


def _ece_summary(recs: Sequence[dict], metric: str, groups: Sequence[str], opts: dict, n_bins: int) -> tuple[dict, dict]:
    """Pooled over the queries of each method, overall and per query site, with a bootstrap interval of
    patients (or of episodes under ``episode-t``); differences against the trained learner likewise."""
    unit = "episode" if opts["interval"] == EPISODE_T else "patient"
    kw = {"n_bins": n_bins, "n_boot": opts["n_boot"], "seed": opts["seed"], "unit": unit}
    by_method: dict[str, list[dict]] = defaultdict(list)
    for r in recs:
        by_method[r["method"]].append(r)

    def cells(mine, minus=None):
        sites = sorted({r["site"] for r in mine})
        site = {s: ece_bootstrap([r for r in mine if r["site"] == s], **kw,
                                 minus=None if minus is None else [r for r in minus if r["site"] == s]) for s in sites}
        return {"all": ece_bootstrap(mine, **kw, minus=minus), "site": site}

    summary = {m: cells(by_method[m]) for m in sorted(by_method)}
    ref = by_method.get(TRAINED)
    diffs = {m: cells(ref, by_method[m]) for m in sorted(by_method) if ref is not None and m != TRAINED}
    return summary, diffs


#: how a report metric is summarised when it is not a per-query mean (`summarize`), by its name
SUMMARIES = {"balanced_acc": _balanced_accuracy, "auc": _macro_auc, "ece": _ece_summary}


def evaluation_summary(task: Task, records: Sequence[dict], seed: int = 0, n_bins: int = 15,
                       interval: str = DEFAULT_INTERVAL, n_boot: int = N_BOOT) -> dict:
    """The ``imaging-meta evaluate`` summary of per-query records, shot by shot.

    Each of the task's report metrics is summarised by its name: a per-query score (Dice, HD95, accuracy; per
    class: the recall of that class in each episode) as the mean over an episode's queries (`summarize`, with
    the task's report rows); balanced accuracy and macro AUC per episode over its queries (per class: that
    class's recall and one-vs-rest AUC); ECE pooled (see `ece_bootstrap`), with the reliability-diagram bins
    of each method under ``calibration``. Every cell has the interval ``interval`` (seeded with ``seed``), and
    ``differences`` holds the trained learner minus each other method, paired on the same queries.

    Returns:
        ``{shot: {metric: {method: {"all", <report row>: {...}}}, "calibration": ...,
        "differences": {metric: {baseline: {"all", <report row>: {...}}}}}}`` (shots as strings).
    """
    opts = {"interval": check_interval(interval), "seed": seed, "n_boot": n_boot}
    out: dict = {}
    for k, recs in _by_shot(records).items():
        summary_k: dict = {}
        diffs_k: dict = {}
        for m in task.report_metrics:
            summary_k[m], diffs_k[m] = SUMMARIES.get(m, _per_query)(recs, m, task.report_groups, opts, n_bins)
        if "ece" in task.report_metrics:
            summary_k["calibration"] = _reliability(recs, n_bins)
        summary_k["differences"] = diffs_k
        out[str(k)] = summary_k
    return out
