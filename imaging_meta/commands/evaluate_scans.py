"""``imaging-meta evaluate --scan-protocols``: the whole-scan protocols on the test scans of a checkpoint's split.

Pairs: for each test structure, ordered (support scan, query scan) pairs of two different test patients of the
same modality that both show it; at most ``pairs`` per structure, drawn with ``seed``. Each pair is scored by
`imaging_meta.evaluation.scans.score_pair` (3D Dice and HD95 in the query's own grid, every method on the same
volumes). Writes ``scans.json`` (every record) and ``scans.md`` (per protocol: method means with a patient
bootstrap 95% interval, the paired trained - baseline differences, and per-structure rows).
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from datamodules.io.atomic import atomic_open
from datamodules.progress import progress
from imaging_meta.evaluation.reports import json_safe, md_cell
from imaging_meta.evaluation.scans import (
    COPY,
    TRAINED_FULL,
    UNTRAINED_NAME,
    WINDOW,
    WINDOW_3D,
    Scan,
    score_pair,
)
from imaging_meta.evaluation.statistics import pair_bootstrap
from imaging_meta.volume.segmenter import SUPPORT_CHECK_WARN

logger = logging.getLogger(__name__)


PAIRINGS = ("same_site", "cross_site", "any")


def _other_pairing(pairing: str) -> str:
    return "" if pairing == "any" else (f"; --scan-pairing {'cross_site or any' if pairing == 'same_site' else 'same_site or any'}"
                                        " pairs them otherwise")


def chosen_scan_pairs(dm, pairs: int, seed: int, pairing: str) -> tuple[list[dict], list[tuple[Scan, Scan]]]:
    """``dm``'s test scans and the `scan_pairs` of them; refused when there is none (from the index alone:
    `imaging_meta.commands.evaluate.evaluate` asks before it scores any episode; a review)."""
    scans = dm.test_scans()
    chosen = scan_pairs(scans, pairs, seed, pairing)
    if not chosen:
        raise ValueError(
            f"no {pairing} (support, query) pair of test scans of two patients with the same modality shows a test "
            f"structure{_other_pairing(pairing)}"
        )
    return scans, chosen


def scan_pairs(scans: Sequence[dict], pairs: int, seed: int = 0, pairing: str = "same_site") -> list[tuple[Scan, Scan]]:
    """(support, query) pairs of two different patients of the same modality that both show the structure, at most
    ``pairs`` per structure, seeded.

    ``pairing``: ``same_site`` (default: a user's support and query come from their own scanner and protocol),
    ``cross_site`` (different sites: another scanner, and on MR possibly another sequence with other contrasts),
    or ``any``.
    """
    if pairing not in PAIRINGS:
        raise ValueError(f"pairing must be one of {PAIRINGS}, got {pairing!r}")
    out = []
    organs = sorted({o for s in scans for o in s["organs"]})
    for organ in organs:
        have = [s for s in scans if organ in s["organs"]]
        cands = [
            (a, b)
            for a in have
            for b in have
            if a["patient"] != b["patient"]
            and a["modality"] == b["modality"]
            and (pairing == "any" or (a["site"] == b["site"]) == (pairing == "same_site"))
        ]
        random.Random(f"{seed}:{organ}").shuffle(cands)
        def scan(s: dict, organ: str = organ) -> Scan:
            return Scan(s["image"], s["label"], int(s["organs"][organ]), s["modality"], organ, s["site"], s["patient"],
                        str(s.get("case_id", "")))

        out += [(scan(a), scan(b)) for a, b in cands[:pairs]]
    return out


def _patients(r: dict) -> tuple[str, str]:
    """A record's support and query patients (records written before 2026-12-06 named the scans by patient)."""
    return r.get("support_patient", r["support"]), r.get("query_patient", r["query"])


def _interval(recs: Sequence[dict], value, seed: int = 0) -> str:
    """Mean over pairs, with a two-way bootstrap of the patients (support and query) behind them."""
    if not recs:
        return "–"
    b = pair_bootstrap([(*_patients(r), value(r)) for r in recs], seed=seed)
    if b["ci_low"] is None:
        return f"{b['mean']:.3f}"
    return f"{b['mean']:.3f} [{b['ci_low']:.3f}, {b['ci_high']:.3f}]"


def scans_markdown(records: Sequence[dict], seed: int = 0) -> str:
    """Per protocol: each method's mean 3D Dice with a two-way patient bootstrap interval (`pair_bootstrap`,
    resampled with ``seed``), the paired differences trained - baseline, and the means per structure and per site
    of the query with the same intervals."""
    lines = ["# Whole-scan protocols: 3D Dice per query volume", ""]
    for protocol in dict.fromkeys(r["protocol"] for r in records):
        recs = [r for r in records if r["protocol"] == protocol]
        methods = list(dict.fromkeys(r["method"] for r in recs))
        n = len({(r["support"], r["query"], r["structure"]) for r in recs})
        n_patients = len({p for r in recs for p in _patients(r)})
        note = (
            " The query's true extent of the structure is used (SSL-ALPNet's protocol)."
            if protocol == "oracle_extent"
            else ""
        )
        if any(r.get("scale") == "structure" for r in recs):
            note += " Segmented at the spacing chosen from each support's structure (`--scale structure`)."
        steps = sorted({r["adapt_steps"] for r in recs if r.get("adapt_steps")})
        if steps:
            note += f" Test-time adaptation: {', '.join(map(str, steps))} steps (`--adapt-steps`)."
        lines += [
            f"## {protocol}",
            "",
            f"{n} (support, query) volume pairs of {n_patients} patients; 95% intervals: two-way bootstrap over the "
            "patients of the pairs, a pair counted when both its support and its query patient are drawn (none with "
            f"fewer than 3 patients, or when every pair has the same patients).{note}",
            "",
            "| method | 3D Dice | HD95 mm (median) | support self-check (mean) |",
            "|---|---|---|---|",
        ]
        for m in methods:
            mr = [r for r in recs if r["method"] == m]
            hd = [r["hd95"] for r in mr if r["hd95"] is not None and r["hd95"] == r["hd95"]]
            # HD95 is undefined for an empty mask: the median is over the others, and says how many it leaves out
            # (a method that finds nothing in most scans must not look best by a few close ones)
            undefined = f" ({len(mr) - len(hd)} of {len(mr)} empty: not in the median)" if len(hd) < len(mr) else ""
            checks = [r["support_dice"] for r in mr if r.get("support_dice") is not None]
            lines.append(
                f"| {m} | {_interval(mr, lambda r: r['dice'], seed)} | {f'{np.median(hd):.1f}' if hd else '–'}{undefined} | "
                f"{f'{np.mean(checks):.3f}' if checks else '–'} |"
            )
        low = [r for r in recs if r["method"] == TRAINED_FULL and r.get("support_dice") is not None
               and r["support_dice"] < SUPPORT_CHECK_WARN]
        if low:
            lines += ["", f"{len(low)} pair(s) with a support self-check below {SUPPORT_CHECK_WARN} (`segment` warns "
                      f"there): {TRAINED_FULL} 3D Dice {np.mean([r['dice'] for r in low]):.3f} on average there."]
        for m in methods:
            # each relaxation named as the records name it (`segmenter.RELAXATIONS`): the first keeps the slice gate,
            # and every retry read "without the support's intensity evidence or slice gate" (a review)
            for relaxed in dict.fromkeys(r["relaxed"] for r in recs if r["method"] == m and r.get("relaxed")):
                retried = [r for r in recs if r["method"] == m and r.get("relaxed") == relaxed]
                lines += ["", f"{m}: {len(retried)} pair(s) in which it found nothing and predicted again "
                          f"{md_cell(relaxed)} (`segment` warns there; `segment --keep-empty` keeps them empty): "
                          f"3D Dice {np.mean([r['dice'] for r in retried]):.3f} on average there."]
        by_key = {(r["support"], r["query"], r["structure"], r["method"]): r["dice"] for r in recs}
        lines += ["", "| paired difference | mean [95% CI] |", "|---|---|"]
        for base in (UNTRAINED_NAME, COPY, WINDOW, WINDOW_3D):
            pairs = [
                r
                for r in recs
                if r["method"] == TRAINED_FULL and (r["support"], r["query"], r["structure"], base) in by_key
            ]
            if pairs:
                lines.append(
                    f"| {TRAINED_FULL} − {base} | "
                    + _interval(
                        pairs,
                        lambda r, b=base, k=by_key: (
                            r["dice"] - k[(r["support"], r["query"], r["structure"], b)]
                        ),
                        seed,
                    )
                    + " |"
                )
        for field, title in (("structure", "structure"), ("site", "site of the query")):
            # each row says how many pairs its means rest on: a structure of one pair has no interval, and a
            # mean of one pair must not read like a mean of twenty
            lines += ["", f"| {title} | pairs | " + " | ".join(methods) + " |", "|---|---|" + "---|" * len(methods)]
            for value in dict.fromkeys(r.get(field, "") for r in recs):
                mine = [r for r in recs if r.get(field, "") == value]
                n_pairs = len({(r["support"], r["query"], r["structure"]) for r in mine})
                cells = [_interval([r for r in mine if r["method"] == m], lambda r: r["dice"], seed) for m in methods]
                lines.append(f"| {md_cell(value) or '–'} | {n_pairs} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def evaluate_scans(
    learner,
    untrained,
    dm,
    out: Path,
    protocols: Sequence[str],
    pairs: int = 4,
    seed: int = 0,
    ablations: bool = True,
    device="cpu",
    adapt_steps: int = 0,
    pairing: str = "same_site",
    scale: str = "checkpoint",
) -> tuple[Path, Path]:
    """Score the whole-scan protocols on ``dm``'s test scans; write ``scans.json`` and ``scans.md``.
    ``adapt_steps`` > 0 adds the test-time adapted segmenter (`imaging_meta.adaptation`) to every pair;
    ``scale="structure"`` segments each pair at the spacing chosen from its support's structure
    (`imaging_meta.volume.scale.structure_scale`)."""
    scans, chosen = chosen_scan_pairs(dm, pairs, seed, pairing)
    other = _other_pairing(pairing)
    # a test structure without a pair was missing from the tables without a word (a review)
    unpaired = sorted({o for sc in scans for o in sc["organs"]} - {sup.name for sup, _ in chosen})
    left_out = (f"Test structure(s) left out: {', '.join(unpaired)} (no {pairing} pair of two test patients with the "
                f"same modality shows it{other}).\n") if unpaired else ""
    if unpaired:
        logger.warning("whole-scan protocols: %s", left_out.strip())
    records: list[dict] = []
    js, md = out / "scans.json", out / "scans.md"
    work = [(protocol, i, pair) for protocol in protocols for i, pair in enumerate(chosen)]
    logger.info("whole-scan protocols: %d pair(s) x %d protocol(s), each segmented by every method%s; scans.json "
                "and scans.md grow after each pair", len(chosen), len(protocols), " and ablation" if ablations else "")
    for protocol, i, (s, q) in progress(work, "evaluate: whole-scan pairs", unit="pair"):
        # one (protocol, pair) at a time; its records are written before the next starts
        recs = score_pair(
            learner,
            dm.preprocessing,
            s,
            q,
            protocol,
            untrained=untrained,
            ablations=ablations,
            device=device,
            adapt_steps=adapt_steps,
            seed=seed,
            scale=scale,
        )
        for r in recs:  # pseudonymous ids instead of file names: a pair is two scans, the bootstrap's units patients
            r["support"], r["query"] = s.case_id or s.patient, q.case_id or q.patient
            r["support_patient"], r["query_patient"] = s.patient, q.patient
        records += recs
        logger.info(
            "%s %d/%d %s: trained %.3f",
            protocol,
            i + 1,
            len(chosen),
            q.name,
            next(r["dice"] for r in recs if r["method"] == TRAINED_FULL),
        )
        # a run stopped part way keeps the pairs it scored, and its table of them: an earlier run's scans.md stayed
        # beside the new scans.json (a review)
        with atomic_open(js, "w") as f:
            f.write(json.dumps(json_safe(records), indent=1, allow_nan=False) + "\n")  # strict JSON: NaN -> null
        with atomic_open(md, "w") as f:
            f.write(scans_markdown(records, seed) + (f"\n{left_out}" if left_out else ""))
    return js, md
