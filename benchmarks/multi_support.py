"""Two support patients, one query patient: the scan segmenter calibrated across the support scans (each scan's
slices predicted from the other scan, `ScanOptions.across_scans`, the default since 2026-12-05) against the
pooled calibration used before (each support slice predicted from every other slice, its own scan's included).

    python -m benchmarks.multi_support --checkpoint runs/protonet_seg/version_0/checkpoints/best.ckpt \
        --sets sarcoma demo --adapt-steps 40 --out multi_support.json

Triples (support, support, query), every scan at the scale `segment` chooses from both supports (`--scale
structure`: the thinner structure sets the spacing, the wider field of view the slices); the first support alone
at its own:

* ``sarcoma``: the three soft-tissue sarcoma patients of ``benchmarks/real/sarcoma`` (see its README), within
  each modality, each patient the query of the two others (3 CT and 3 MR triples);
* ``demo``: the demo cohort's test scans (`imaging-meta demo`; ``data/demo``), held-out organs (spleen, left
  kidney), per organ and site two triples with different queries (the site's patients in a seeded order, each
  query with the next two as its supports; 16 triples).

And the same with the position prior (`ScanOptions.position`, `segment --position-prior`): each support scan's
mask at the query's relative position in the body, a third feature of the fusion whose weight is fitted across
the two supports. Also scored, for context: `segment`'s default with the first support alone (adapted on it and the query
alone), and from the first support: copying its mask at the same relative position and the intensity window.
Run on 2 CPU cores with one thread per process.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import DATA_CONFIGS, load_yaml
from benchmarks.real_segmentation import REAL, bootstrap_mean_ci
from imaging_meta.checkpoint_io import load_learner
from imaging_meta.evaluation import volumes as V
from imaging_meta.evaluation.scans import (
    COPY,
    WINDOW,
    WINDOW_3D,
    Scan,
    baseline_masks,
    load_structure,
    structure_preprocessing,
    supports_preprocessing,
    to_query_grid,
)
from imaging_meta.volume.segmenter import ScanOptions, ScanSegmenter

POSITION = "across scans + position prior"
VARIANTS = {"across scans (default)": ScanOptions(), "pooled (before)": ScanOptions(across_scans=False),
            POSITION: ScanOptions(position=True)}
ONE = "first support alone"


def sarcoma_triples() -> list[tuple[str, list[Scan]]]:
    d = REAL / "sarcoma"
    out = []
    for stem, modality in (("ct", "CT"), ("mr", "MR")):
        for q in (1, 2, 3):
            order = [n for n in (1, 2, 3) if n != q] + [q]
            out.append((f"sarcoma-{stem}", [Scan(str(d / f"sts{n}_{stem}.nii.gz"), str(d / f"sts{n}_{stem}_label.nii.gz"), 1,
                                                 modality, f"tumour of sts{q}", f"sarcoma-{stem}", f"sts{n}") for n in order]))
    return out


def demo_triples(root: str, per_site: int = 2) -> list[tuple[str, list[Scan]]]:
    """Three patients of one site per triple, from the test split of ``configs/data/demo_segmentation.yaml``."""
    from datamodules.segmentation import SegmentationDataModule

    init = dict(load_yaml(DATA_CONFIGS / "demo_segmentation.yaml")["data"]["init_args"])
    init.update(root=root, num_workers=0)
    dm = SegmentationDataModule(**init)
    dm.setup("test")
    scans = dm.test_scans()
    out = []
    for organ in init["test_organs"]:
        for site in sorted({s["site"] for s in scans}):
            have = [s for s in scans if s["site"] == site and organ in s["organs"]]
            patients = sorted({s["patient"] for s in have})
            random.Random(f"{organ}:{site}").shuffle(patients)
            for i in range(min(per_site, len(patients)) if len(patients) >= 3 else 0):
                order = [patients[(i + j) % len(patients)] for j in (1, 2, 0)]  # the supports, then the query
                picked = [next(s for s in have if s["patient"] == p) for p in order]
                out.append((f"demo {organ}", [Scan(s["image"], s["label"], int(s["organs"][organ]), s["modality"], organ,
                                                   s["site"], s["patient"]) for s in picked]))
    return out


def score_triple(learner, preprocessing: dict, scans: list[Scan], adapt_steps: int) -> tuple[dict[str, float], dict]:
    """3D Dice of each method on the query, and each variant's fitted fusion weights (learner, intensity)."""
    # the scale segment chooses: the finest of the two supports' for both, the first support's for it alone
    pre = supports_preprocessing(preprocessing, [(s.image, s.label, s.value, s.modality) for s in scans[:2]], "structure")
    loaded = [load_structure(scan, pre, query=n == 2) for n, scan in enumerate(scans)]
    supports = [(sc.pre["image"].as_tensor()[0].float(), sc.pre["struct"]) for sc in loaded[:2]]
    query = loaded[2]
    q_img = query.pre["image"].as_tensor()[0].float()
    pre_one = structure_preprocessing(preprocessing, scans[0].image, scans[0].label, scans[0].value, scans[0].modality,
                                      "structure")
    if pre_one == pre:
        one, query_one = supports[:1], query
    else:
        first, query_one = load_structure(scans[0], pre_one), load_structure(scans[2], pre_one, query=True)
        one = [(first.pre["image"].as_tensor()[0].float(), first.pre["struct"])]
    from imaging_meta.adaptation import adapt

    def adapted(sup, image):
        return adapt(learner, sup, [image], steps=adapt_steps, seed=0, progress=False) if adapt_steps else learner

    dice, weights = {}, {}
    both = adapted(supports, q_img)
    runs = [(name, options, supports, both, query) for name, options in VARIANTS.items()]
    q_one = query_one.pre["image"].as_tensor()[0].float()
    runs.append((ONE, ScanOptions(), one, adapted(one, q_one), query_one))
    for name, options, sup, lrn, q in runs:
        segmenter = ScanSegmenter(lrn, options).fit(sup)
        if name in VARIANTS:
            weights[name] = segmenter.describe()["fusion_weight"]
        probs = segmenter.predict(q.pre["image"].as_tensor()[0].float())
        parts = max(V.structure_parts(m.numpy()) for _, m in sup)
        dice[name] = V.dice3d(V.keep_components(to_query_grid(q, probs) > 0.5, parts), q.truth)
    base = baseline_masks(loaded[0], query, scans[2].modality, "whole_scan", scans[0].modality,
                          tuple(preprocessing["mr_percentiles"]), tuple(preprocessing["ct_window"]))
    dice["copy first support's mask"] = V.dice3d(base[COPY], query.truth)
    dice["intensity window (first support)"] = V.dice3d(base[WINDOW], query.truth)
    dice["intensity window + 3D step (first support)"] = V.dice3d(base[WINDOW_3D], query.truth)
    return dice, weights


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--sets", nargs="+", default=["sarcoma"], choices=["sarcoma", "demo"])
    ap.add_argument("--demo-root", default="data/demo")
    ap.add_argument("--adapt-steps", type=int, default=40, help="test-time adaptation on both supports and the query")
    ap.add_argument("--out", default=None, help="write every record here (JSON)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    learner, extra = load_learner(args.checkpoint, "cpu")
    triples = (sarcoma_triples() if "sarcoma" in args.sets else []) + (
        demo_triples(args.demo_root) if "demo" in args.sets else [])
    records = []
    for group, scans in triples:
        dice, weights = score_triple(learner, extra["preprocessing"], scans, args.adapt_steps)
        records.append({"set": group, "supports": [s.patient for s in scans[:2]], "query": scans[2].patient,
                        "site": scans[2].site, "structure": scans[2].name, "adapt_steps": args.adapt_steps, "dice": dice,
                        "fusion_weight": weights})
        print(f"{group} {scans[2].patient}: " + ", ".join(f"{k} {v:.3f}" for k, v in dice.items()), flush=True)
    methods = list(records[0]["dice"]) if records else []
    print("\n| set | triples | " + " | ".join(methods) + " |\n|---|---|" + "---|" * len(methods))
    for group in dict.fromkeys(r["set"] for r in records):
        rs = [r for r in records if r["set"] == group]
        print(f"| {group} | {len(rs)} | " + " | ".join(f"{np.mean([r['dice'][m] for r in rs]):.3f}" for m in methods) + " |")
    for group in ("sarcoma", "demo"):
        rs = [r for r in records if r["set"].startswith(group)]
        if rs:
            d = np.array([r["dice"]["across scans (default)"] - r["dice"]["pooled (before)"] for r in rs])
            lo, hi = bootstrap_mean_ci(d)
            print(f"- {group}: across scans − pooled {d.mean():+.3f} [{lo:+.3f}, {hi:+.3f}] over {len(d)} triples "
                  f"({int((d > 0).sum())} better, {int((d < 0).sum())} worse)")
            ratio = [r["fusion_weight"]["across scans (default)"][1] / r["fusion_weight"]["pooled (before)"][1] for r in rs]
            print(f"  intensity weight, across scans / pooled: {min(ratio):.2f}–{max(ratio):.2f} (median "
                  f"{np.median(ratio):.2f})")
            d = np.array([r["dice"][POSITION] - r["dice"]["across scans (default)"] for r in rs])
            lo, hi = bootstrap_mean_ci(d)
            print(f"- {group}: + position prior − across scans {d.mean():+.3f} [{lo:+.3f}, {hi:+.3f}] over {len(d)} "
                  f"triples ({int((d > 0).sum())} better, {int((d < 0).sum())} worse)")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(records, indent=1) + "\n")


if __name__ == "__main__":
    main()
