"""Which 3D component to keep: `segment`'s rule (the largest connected component, for a support structure in one
part) against label-free alternatives, on the 37 real pairs of `benchmarks.real_segmentation`.

    python -m benchmarks.component_rules --checkpoint runs/protonet_seg/version_0/checkpoints/best.ckpt \
        --maps component_maps --out component_rules.json

Each pair is segmented once, as `benchmarks.real_segmentation` segments it with ``--protocols whole_scan
--no-ablations --adapt-steps 40 --scale structure`` (the model as trained, and adapted), and the probability map
on the query's grid before the component step is kept (``--maps``: one ``.npz`` per pair; a rerun reuses them).
Every rule then picks one connected component (6-connected, as `imaging_meta.evaluation.volumes.largest_component`)
of the map > 0.5, scored as 3D Dice against the query's labels; a structure in several parts keeps every
component, as `segment` does, under every rule:

* ``largest``: the most voxels (`segment`'s rule; it reproduces the benchmark's Dice);
* ``mean probability``, ``max probability``: the most confident component;
* ``log-odds mass``: the sum of the voxels' log-odds (size and confidence together);
* ``support volume``: the volume (mm³) nearest the support structure's, in log ratio;
* ``overlap (oracle)``: the component that overlaps the query's labels most, an upper bound that uses them.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np
from scipy import ndimage

from benchmarks import real_segmentation as RS
from imaging_meta.evaluation import scans as S
from imaging_meta.evaluation import volumes as V

RULES = ("largest", "mean probability", "max probability", "log-odds mass", "support volume", "overlap (oracle)")
METHODS = ("trained", "adapted")  # the model as trained, and adapted (`imaging_meta.adaptation`)


def rule_dice(probs: np.ndarray, truth: np.ndarray, voxel_mm3: float, support_mm3: float, parts: int) -> dict[str, float]:
    """3D Dice of the component each rule keeps of ``probs > 0.5`` (see the module docstring)."""
    mask = probs > 0.5
    labels, n = ndimage.label(mask)
    if parts > 1 or n <= 1:
        d = V.dice3d(V.keep_components(mask, parts), truth)
        return dict.fromkeys(RULES, d)
    idx = np.arange(1, n + 1)
    clipped = np.clip(probs, 1e-4, 1 - 1e-4)
    size = ndimage.sum(mask, labels, idx)
    scores = {
        "largest": size,
        "mean probability": ndimage.mean(probs, labels, idx),
        "max probability": ndimage.maximum(probs, labels, idx),
        "log-odds mass": ndimage.sum(np.log(clipped / (1 - clipped)), labels, idx),
        "support volume": -np.abs(np.log(size * voxel_mm3 / support_mm3)),
        "overlap (oracle)": ndimage.sum(truth, labels, idx),
    }
    return {rule: V.dice3d(labels == int(np.argmax(s)) + 1, truth) for rule, s in scores.items()}


def all_pairs(tmp: Path) -> list[tuple[S.Scan, S.Scan]]:
    return (RS.abdomen_pairs(tmp) + RS.lesion_pairs() + RS.parts_pairs(tmp) + RS.sarcoma_pairs()
            + RS.single_scan_pairs(tmp, "spleen", "ct", "CT", "spleen")
            + RS.single_scan_pairs(tmp, "spine", "t2", "MR", "spinal cord") + RS.cross_patient_spleen_pairs(tmp))


def collect(checkpoint: str, maps: Path, adapt_steps: int = 40) -> None:
    """The probability maps of every pair on its query's grid, before the component step (``maps/NN.npz``)."""
    from imaging_meta.checkpoint_io import load_learner

    learner, extra = load_learner(checkpoint, "cpu")
    pre = extra["preprocessing"]
    maps.mkdir(parents=True, exist_ok=True)
    seen: list[np.ndarray] = []
    to_grid = S.to_query_grid

    def keep(loaded, probs):  # every method's map on the query grid, in the order score_pair segments them
        out = to_grid(loaded, probs)
        seen.append(out)
        return out

    S.to_query_grid = keep
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for k, (s, q) in enumerate(all_pairs(Path(tmp))):
                path = maps / f"{k:02d}.npz"
                if path.is_file():
                    continue
                seen.clear()
                S.score_pair(learner, pre, s, q, "whole_scan", ablations=False, adapt_steps=adapt_steps, scale="structure")
                p = S.structure_preprocessing(pre, s.image, s.label, s.value, s.modality, "structure")
                support, query = S.load_structure(s, p), S.load_structure(q, p, query=True)
                # score_pair's order: trained, learner only, (untrained: not given), adapted
                np.savez_compressed(path, trained=seen[0].astype(np.float16), adapted=seen[2].astype(np.float16),
                                    truth=query.truth, voxel_mm3=float(np.prod(query.spacing)),
                                    support_mm3=float(support.truth.sum() * np.prod(support.spacing)),
                                    parts=V.structure_parts(support.pre["struct"].numpy()), site=q.site, name=q.name)
                print(k, q.site, q.name, flush=True)
    finally:
        S.to_query_grid = to_grid


def score(maps: Path) -> list[dict]:
    rows = []
    for path in sorted(maps.glob("*.npz")):
        z = np.load(path)
        for method in METHODS:
            dice = rule_dice(z[method].astype(np.float32), z["truth"].astype(bool), float(z["voxel_mm3"]),
                             float(z["support_mm3"]), int(z["parts"]))
            rows.append({"site": str(z["site"]), "structure": str(z["name"]), "method": method, **dice})
    return rows


def summary(rows: list[dict]) -> str:
    lines = ["| set | method | " + " | ".join(RULES) + " |", "|---|---|" + "---|" * len(RULES)]
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for r in rows:
        groups[(r["site"], r["method"])].append(r)
    for method in METHODS:
        groups[("~ all pairs", method)] = [r for r in rows if r["method"] == method]
    for (site, method), rs in sorted(groups.items()):
        lines.append(f"| {site.lstrip('~ ')} ({len(rs)}) | {method} | "
                     + " | ".join(f"{np.mean([r[k] for r in rs]):.3f}" for k in RULES) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--maps", type=Path, required=True, help="folder of the probability maps (reused when there)")
    ap.add_argument("--adapt-steps", type=int, default=40)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    collect(args.checkpoint, args.maps, args.adapt_steps)
    rows = score(args.maps)
    print(summary(rows))
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
