"""Can the scans say where copying the support mask is right? Local image similarity after the copy baseline's
mapping, against how much copying beats `segment`, on the real pairs of `benchmarks.real_segmentation`.

    python -m benchmarks.copy_similarity --checkpoint runs/protonet_seg/version_0/checkpoints/best.ckpt \
        --record benchmarks/results/real_segmentation_baselines_corrected_2026-12-07.json --out copy_similarity.json

Multi-atlas segmentation weighs each atlas's warped labels by the local similarity of the warped atlas image to
the target (locally weighted voting: Artaechevarria et al. 2009, Sabuncu et al. 2010): where the images agree,
the mapping is taken to be right. Here the atlas is the support, mapped as `copy support mask` maps it
(`imaging_meta.evaluation.volumes.map_at_relative_position`: the same relative position in the body along Z, the
body's box in-plane). For each pair the support image is mapped onto the query's grid the same way, both on the
scale the window baseline compares them (`scans.compared_values`: CT in HU, unclipped, or through the CT window
beside an MR; MR by its own percentiles), and their local normalised cross-correlation (a 9 × 9 × 3
voxel window) is averaged inside the copied mask and over the query's body. If such a similarity told where the
mapping is right, it would rise with ``copy − segment`` (the copy's Dice minus `segment`'s default, read from a
``benchmarks.real_segmentation`` record of the same pairs); the record reports Spearman's rank correlation.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
from scipy import ndimage, stats

from benchmarks.component_rules import all_pairs
from imaging_meta.evaluation import scans as S
from imaging_meta.evaluation import volumes as V

WINDOW = (9, 9, 3)
ADAPTED = "trained + test-time adaptation"


def local_ncc(a: np.ndarray, b: np.ndarray, size: tuple[int, int, int] = WINDOW) -> np.ndarray:
    """Normalised cross-correlation of ``a`` and ``b`` in a moving box of ``size`` voxels, per voxel."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    ma, mb = ndimage.uniform_filter(a, size), ndimage.uniform_filter(b, size)
    va = ndimage.uniform_filter(a * a, size) - ma**2
    vb = ndimage.uniform_filter(b * b, size) - mb**2
    cov = ndimage.uniform_filter(a * b, size) - ma * mb
    return cov / np.sqrt(np.clip(va, 1e-6, None) * np.clip(vb, 1e-6, None))


def pair_similarity(support: S.Loaded, query: S.Loaded, modality: str, support_modality: str,
                    preprocessing: dict) -> dict[str, float | None]:
    """The copy's mask and the local similarity of the mapped support image to the query (module docstring)."""
    s_raw, s_truth = S._ras(support)
    q_raw, _ = S._ras(query)
    s_scaled, q_scaled = (x.astype(np.float32) for x in S.compared_values(
        s_raw, q_raw, modality, support_modality, tuple(preprocessing["mr_percentiles"]),
        tuple(preprocessing["ct_window"])))
    mapped = V.map_at_relative_position(s_scaled, s_raw, q_raw, modality, support_modality, np.nan)
    copy = V.copy_mask_at_relative_position(s_truth, s_raw, q_raw, modality, support_modality)
    inside = ~np.isnan(mapped)
    ncc = local_ncc(q_scaled, np.where(inside, mapped, 0.0))
    return {"ncc_copied_mask": float(ncc[copy & inside].mean()) if (copy & inside).any() else None,
            "ncc_body": float(ncc[inside].mean()) if inside.any() else None}


def collect(checkpoint: str, record: list[dict]) -> list[dict]:
    from imaging_meta.checkpoint_io import load_learner

    _, extra = load_learner(checkpoint, "cpu")
    pre = extra["preprocessing"]
    dice = {(r["site"], r["structure"], r["support"], r["query"], r["method"]): r["dice"]
            for r in record if r["protocol"] == "whole_scan"}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for s, q in all_pairs(Path(tmp)):
            p = S.structure_preprocessing(pre, s.image, s.label, s.value, s.modality, "checkpoint")
            loaded_s, loaded_q = S.load_structure(s, p), S.load_structure(q, p, query=True)
            key = (q.site, q.name, S._file_name(s.image), S._file_name(q.image))
            row = {"site": q.site, "structure": q.name, "support": key[2], "query": key[3],
                   "copy": dice.get((*key, S.COPY)), "segment": dice.get((*key, ADAPTED)),
                   **pair_similarity(loaded_s, loaded_q, q.modality, s.modality, p)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def correlations(rows: list[dict]) -> dict[str, dict[str, float]]:
    """Spearman's rho of each similarity with copy − segment, over the pairs where either method finds anything."""
    used = [r for r in rows if r["copy"] is not None and r["segment"] is not None and r["ncc_copied_mask"] is not None
            and max(r["copy"], r["segment"]) > 0]
    gap = [r["copy"] - r["segment"] for r in used]
    out = {}
    for key in ("ncc_copied_mask", "ncc_body"):
        rho, p = stats.spearmanr([r[key] for r in used], gap)
        out[key] = {"spearman_rho": float(rho), "p": float(p), "pairs": len(used)}
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", required=True, help="its preprocessing only (the scans' intensity scale)")
    ap.add_argument("--record", type=Path, required=True, help="a benchmarks.real_segmentation record of the pairs")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    rows = collect(args.checkpoint, json.loads(args.record.read_text()))
    result = {"record": args.record.name, "window": list(WINDOW), "correlations": correlations(rows), "pairs": rows}
    print(json.dumps(result["correlations"], indent=1))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
