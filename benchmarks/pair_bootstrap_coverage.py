"""How often the whole-scan report's 95% intervals cover the truth: a simulation of (support, query) scan pairs.

    OMP_NUM_THREADS=1 python -m benchmarks.pair_bootstrap_coverage [--reps 200]

Each repetition draws ``P`` patients with an effect each (standard deviation ``patient_sd``), ``n`` distinct
ordered pairs of two of them, and a pair's value = support effect + query effect + independent N(0, 1) noise,
so the true mean is 0. It then counts how often the interval contains 0, for the two-way patient bootstrap of
`imaging_meta.evaluation.statistics.pair_bootstrap` (a pair weighted by the product of its patients' counts,
the report's since 2026-12-06) and for the split weights used before (`cluster_bootstrap` with a pair's weight
split between its two patients), and the mean width of each. Settings: the demo report's (11 patients, 12
pairs), larger and smaller ones.
"""

from __future__ import annotations

import argparse

import numpy as np

SETTINGS = [(20, 10, 0.0), (40, 20, 0.0), (11, 12, 0.0), (11, 12, 0.5), (11, 12, 1.0), (8, 4, 0.0), (8, 4, 1.0)]


def coverage(patients: int, n_pairs: int, patient_sd: float, reps: int, seed: int = 0) -> dict[str, tuple[float, float]]:
    from imaging_meta.evaluation.statistics import cluster_bootstrap, pair_bootstrap

    rng = np.random.default_rng(seed)
    hits = {"two-way": 0, "split weights (before)": 0}
    widths: dict[str, list[float]] = {k: [] for k in hits}
    for r in range(reps):
        effect = rng.normal(0, patient_sd, patients)
        pairs: set[tuple[int, int]] = set()
        while len(pairs) < n_pairs:
            s, q = rng.choice(patients, 2, replace=False)
            pairs.add((int(s), int(q)))
        units = [(f"p{s}", f"p{q}", float(effect[s] + effect[q] + rng.normal())) for s, q in sorted(pairs)]
        two_way = pair_bootstrap(units, seed=r, n_boot=1000)
        split = cluster_bootstrap([((s, q), sorted({s, q}), v) for s, q, v in units], seed=r, n_boot=1000)
        for name, b in (("two-way", two_way), ("split weights (before)", split)):
            if b["ci_low"] is not None:
                hits[name] += b["ci_low"] <= 0.0 <= b["ci_high"]
                widths[name].append(b["ci_high"] - b["ci_low"])
    return {k: (hits[k] / reps, float(np.mean(widths[k]))) for k in hits}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=200)
    args = ap.parse_args(argv)
    print("| patients | pairs | patient sd | two-way: coverage (width) | split weights, before: coverage (width) |")
    print("|---|---|---|---|---|")
    for p, n, sd in SETTINGS:
        c = coverage(p, n, sd, args.reps)
        print(f"| {p} | {n} | {sd:g} | " + " | ".join(f"{cov:.3f} ({w:.2f})" for cov, w in c.values()) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
