"""One-shot segmentation on the real validation scans of ``benchmarks/real/`` (see its README), against the
baselines a user would try first, with both whole-scan protocols and the ablation of the scan segmenter.

    python -m benchmarks.real_segmentation --checkpoint runs/protonet_seg/version_0/checkpoints/best.ckpt \
        --out benchmarks/results/real_segmentation.json

Pairs (support -> query), each scored as 3D Dice in the query's own voxel grid:

* ``abdomen``: the CT and the MR, each split at its middle slice: the upper half is the support scan and the
  lower half the query scan (the structures of ``structures.json`` that both halves show);
* ``lesions``: cross-patient, within a modality: lung1 -> lung2, lung2 -> lung1, brain1 -> brain2, brain2 -> brain1;
* ``parts``: thin and multi-part structures of the same abdominal CT, split the same way, each one value or the
  union of several of TotalSegmentator's "total" class map (`CT_PARTS`): ribs, vertebrae, both kidneys as one
  label, the deep back muscles, the colon, the portal and splenic vein. Added after the scan segmenter was
  built (2026-12-04), to measure the thin structures on which issue 15's chest CT failed;
* added on 2026-12-05, after everything above was built and chosen, and measured with the recipes as they
  stood (other real data, the closest thing here to a held-out check; then reused to try alternatives, none kept):
  ``sarcoma``: cross-patient, within a modality, every ordered pair of the three patients (6 CT, 6 MR pairs),
  each scan cropped around its tumour; ``spleen``: the MSD CT split like ``abdomen``; ``spine``: the spinal cord
  of a sagittal T2 MR, reoriented to RAS and split like ``abdomen``;
* ``spleen-x``: the spleen across two patients and contrast phases (the abdominal CT's spleen at a median 35 HU,
  MSD's at 89 HU): the abdominal CT cropped around its spleen to the MSD crop's width, and MSD ``spleen2``, each
  the other's support (added 2026-12-05, after a diagnosis on the same two scans);
* ``cross-modality``: the abdominal CT's structures as the support of the abdominal MR's and the other way round
  (two patients; 2026-12-05).

Nothing here is tuned to these files: they are read as any user's NIfTI files.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np

from imaging_meta.checkpoint_io import load_learner
from imaging_meta.evaluation.methods import restore_untrained
from imaging_meta.evaluation.scans import (
    ADAPTED,
    COPY,
    LEARNER_ONLY_NAME,
    PROTOCOLS,
    TRAINED_FULL,
    WINDOW,
    WINDOW_3D,
    Scan,
    score_pair,
)
from imaging_meta.volume.segmenter import LEARNER_ONLY, ScanOptions

REAL = Path(__file__).resolve().parent / "real"
# TotalSegmentator v2 "total" class map: rib_left_1..12 = 92..103, rib_right_1..12 = 104..115, sacrum and
# vertebrae S1..C1 = 25..50, kidney_right/left = 2/3, autochthon_left/right = 86/87, colon = 20,
# portal_vein_and_splenic_vein = 64
CT_PARTS = {
    "ribs": tuple(range(92, 116)),
    "vertebrae": tuple(range(25, 51)),
    "kidneys": (2, 3),
    "autochthon": (86, 87),
    "colon": (20,),
    "portal and splenic vein": (64,),
}
LESION_PAIRS = [
    ("lung1", "lung2", "CT"),
    ("lung2", "lung1", "CT"),
    ("brain1", "brain2", "MR"),
    ("brain2", "brain1", "MR"),
]


def _half(src: Path, out: Path, upper: bool) -> Path:
    img = nib.load(str(src))
    data = np.asarray(img.dataobj)
    mid = data.shape[2] // 2
    part = data[..., mid:] if upper else data[..., :mid]
    affine = img.affine.copy()
    if upper:
        affine[:3, 3] += affine[:3, 2] * mid
    nib.save(nib.Nifti1Image(part, affine), str(out))
    return out


def _image_halves(tmp: Path, stem: str) -> dict[str, Path]:
    """The upper and lower halves of ``abdomen/<stem>.nii.gz``, written once into ``tmp``."""
    return {part: _half(REAL / "abdomen" / f"{stem}.nii.gz", tmp / f"{stem}_{part}.nii.gz", part == "upper")
            for part in ("upper", "lower")}


def _split_pairs(
    tmp: Path, images: dict[str, Path], modality: str, label: Path, structures: dict[str, int], site: str,
    reverse: bool = False,
) -> list[tuple[Scan, Scan]]:
    """Support (upper half) -> query (lower half) pairs of one scan (its ``_image_halves``), for the structures
    both halves of ``label`` show; ``reverse``: the lower half is the support and the upper half the query."""
    labels = {part: _half(label, tmp / f"{label.name.split('.')[0]}_{part}.nii.gz", part == "upper")
              for part in images}
    pairs = []
    for name, value in structures.items():
        if all((np.asarray(nib.load(str(path)).dataobj) == value).sum() >= 20 for path in labels.values()):
            s, q = (Scan(str(images[p]), str(labels[p]), value, modality, name, site, "one") for p in images)
            pairs.append((q, s) if reverse else (s, q))
    return pairs


def abdomen_pairs(tmp: Path, reverse: bool = False) -> list[tuple[Scan, Scan]]:
    structures = json.loads((REAL / "abdomen" / "structures.json").read_text())
    pairs = []
    for stem, modality in (("ct", "CT"), ("mr", "MR")):
        label_name = f"{stem}_label.nii.gz"
        pairs += _split_pairs(tmp, _image_halves(tmp, stem), modality, REAL / "abdomen" / label_name,
                              structures[label_name], f"abdomen-{stem}", reverse)
    return pairs


def parts_pairs(tmp: Path, reverse: bool = False) -> list[tuple[Scan, Scan]]:
    """The `CT_PARTS` structures of the abdominal CT: one label map per structure (the union of its values,
    as value 1), split like `abdomen_pairs`."""
    ref = nib.load(str(REAL / "abdomen" / "ct_label.nii.gz"))
    labels = np.asarray(ref.dataobj)
    images = _image_halves(tmp, "ct")
    pairs = []
    for n, (name, values) in enumerate(CT_PARTS.items()):
        path = tmp / f"part{n}_label.nii.gz"
        nib.save(nib.Nifti1Image(np.isin(labels, values).astype(np.uint8), ref.affine), str(path))
        pairs += _split_pairs(tmp, images, "CT", path, {name: 1}, "parts-ct", reverse)
    return pairs


def lesion_pairs() -> list[tuple[Scan, Scan]]:
    d = REAL / "lesions"
    out = []
    for s, q, modality in LESION_PAIRS:
        kind = "lung tumour" if modality == "CT" else "brain tumour"
        out.append(
            (
                Scan(str(d / f"{s}.nii.gz"), str(d / f"{s}_label.nii.gz"), 1, modality, kind, "lesions", s),
                Scan(str(d / f"{q}.nii.gz"), str(d / f"{q}_label.nii.gz"), 1, modality, kind, "lesions", q),
            )
        )
    return out


def sarcoma_pairs() -> list[tuple[Scan, Scan]]:
    """Every ordered (support, query) pair of different patients, within each modality; one structure row per
    query scan (its two supports' mean)."""
    d = REAL / "sarcoma"
    out = []
    for stem, modality in (("ct", "CT"), ("mr", "MR")):
        for s in (1, 2, 3):
            for q in (1, 2, 3):
                if s != q:
                    scans = [Scan(str(d / f"sts{n}_{stem}.nii.gz"), str(d / f"sts{n}_{stem}_label.nii.gz"), 1,
                                  modality, f"tumour of sts{q}", f"sarcoma-{stem}", f"sts{n}") for n in (s, q)]
                    out.append((scans[0], scans[1]))
    return out


def _canonical(src: Path, out: Path) -> Path:
    """``src`` reoriented to RAS (`nibabel.as_closest_canonical`), so that its last axis runs foot to head."""
    nib.save(nib.as_closest_canonical(nib.load(str(src))), str(out))
    return out


def single_scan_pairs(tmp: Path, folder: str, stem: str, modality: str, structure: str,
                      reverse: bool = False) -> list[tuple[Scan, Scan]]:
    """One scan and its binary label (``<folder>/<stem>.nii.gz``, ``<stem>_label.nii.gz``), reoriented to RAS and
    split like `abdomen_pairs`."""
    image = _canonical(REAL / folder / f"{stem}.nii.gz", tmp / f"{folder}_{stem}.nii.gz")
    label = _canonical(REAL / folder / f"{stem}_label.nii.gz", tmp / f"{folder}_{stem}_label.nii.gz")
    halves = {part: _half(image, tmp / f"{folder}_{stem}_{part}.nii.gz", part == "upper") for part in ("upper", "lower")}
    return _split_pairs(tmp, halves, modality, label, {structure: 1}, folder, reverse)


def cross_patient_spleen_pairs(tmp: Path) -> list[tuple[Scan, Scan]]:
    """The spleen across two patients (and contrast phases): the abdominal CT cropped to a square of the MSD
    crop's width (130 mm) centred on its spleen's centroid, and the MSD ``spleen2`` CT; each the other's
    support."""
    img, lab = nib.load(str(REAL / "abdomen" / "ct.nii.gz")), nib.load(str(REAL / "abdomen" / "ct_label.nii.gz"))
    data, labels = np.asarray(img.dataobj), np.asarray(lab.dataobj)
    msd = nib.load(str(REAL / "spleen" / "ct.nii.gz"))
    width = msd.shape[0] * float(msd.header.get_zooms()[0])
    centre = np.argwhere(labels == 1).mean(0).round().astype(int)
    half = int(round(width / 2 / float(img.header.get_zooms()[0])))
    x0, y0 = max(0, centre[0] - half), max(0, centre[1] - half)
    box = (slice(x0, centre[0] + half), slice(y0, centre[1] + half))
    affine = img.affine.copy()
    affine[:3, 3] = img.affine[:3, :3] @ np.array([x0, y0, 0]) + img.affine[:3, 3]
    nib.save(nib.Nifti1Image(data[box], affine), str(tmp / "abdomen_spleen_crop.nii.gz"))
    nib.save(nib.Nifti1Image(labels[box], affine), str(tmp / "abdomen_spleen_crop_label.nii.gz"))
    a = Scan(str(tmp / "abdomen_spleen_crop.nii.gz"), str(tmp / "abdomen_spleen_crop_label.nii.gz"), 1, "CT",
             "spleen, across patients", "spleen-x", "abdomen")
    b = Scan(str(REAL / "spleen" / "ct.nii.gz"), str(REAL / "spleen" / "ct_label.nii.gz"), 1, "CT",
             "spleen, across patients", "spleen-x", "msd")
    return [(a, b), (b, a)]


def cross_modality_pairs() -> list[tuple[Scan, Scan]]:
    """The abdominal CT's structures as the support of the abdominal MR's, and the other way round: across
    modalities and patients (the structures both label maps name)."""
    structures = json.loads((REAL / "abdomen" / "structures.json").read_text())
    out = []
    for a, b in (("ct", "mr"), ("mr", "ct")):
        for name, va in structures[f"{a}_label.nii.gz"].items():
            vb = structures[f"{b}_label.nii.gz"].get(name)
            if vb is not None:
                out.append((Scan(str(REAL / "abdomen" / f"{a}.nii.gz"), str(REAL / "abdomen" / f"{a}_label.nii.gz"), va,
                                 a.upper(), name, f"{a}-to-{b}", a),
                            Scan(str(REAL / "abdomen" / f"{b}.nii.gz"), str(REAL / "abdomen" / f"{b}_label.nii.gz"), vb,
                                 b.upper(), name, f"{a}-to-{b}", b)))
    return out


def bootstrap_mean_ci(values: np.ndarray, n_boot: int = 2000, seed: int = 0,
                      groups: Sequence | None = None) -> tuple[float, float]:
    """Percentile bootstrap 95% interval of the mean of ``values``; (nan, nan) for fewer than two units, where
    resampling one gave an interval of zero width (a review).

    The unit resampled is each value, or with ``groups`` (one key per value, e.g. its query volume) each group
    with all its values: a cluster bootstrap, so that several structures or pairs scored on one scan count as one
    draw of a scan, not as independent ones (a review: 37 records from 16 query volumes gave an interval 0.09 too
    narrow at its lower end). Without ``groups`` the draws are those of earlier versions."""
    values = np.asarray(values, dtype=float)
    keys = list(range(len(values))) if groups is None else list(groups)
    if len(keys) != len(values):
        raise ValueError(f"{len(keys)} group keys for {len(values)} values")
    units = list(dict.fromkeys(keys))
    if len(units) < 2:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    if groups is None:
        means = rng.choice(values, size=(n_boot, len(values)), replace=True).mean(1)
    else:
        where = {u: i for i, u in enumerate(units)}
        of = np.array([where[k] for k in keys])
        sums, counts = np.bincount(of, values, len(units)), np.bincount(of, minlength=len(units))
        draws = rng.integers(0, len(units), size=(n_boot, len(units)))
        means = sums[draws].sum(1) / counts[draws].sum(1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


#: the scan a query is cut from, by the set (``site``) of a record whose query is a half of one scan (patient
#: ``one``), or by the ``patient`` the cross-patient sets name (the abdominal CT's spleen crop, the MSD spleen whole,
#: the abdominal CT and MR across modalities)
_HALVES_OF = {"abdomen-ct": "abdominal CT", "parts-ct": "abdominal CT", "abdomen-mr": "abdominal MR",
              "spleen": "MSD spleen CT", "spine": "spinal cord MR"}
_WHOLE_OF = {"abdomen": "abdominal CT", "msd": "MSD spleen CT", "ct": "abdominal CT", "mr": "abdominal MR"}


def query_scan(record: dict) -> str:
    """Which source the query of a record is cut from: the scan, or for the sarcoma and tumour sets the patient (a
    sarcoma patient's CT and MR count as one). Halves, crops and the whole of one scan are one draw of the "all"
    row's interval: keyed by file, the MSD spleen's lower half (``spleen``) and the whole of it (``spleen-x``), and
    the abdominal CT's lower half and its spleen crop, were each two independent draws (a review)."""
    site, patient = str(record.get("site")), str(record.get("patient"))
    if patient == "one":
        return _HALVES_OF.get(site, site)
    return _WHOLE_OF.get(patient, patient)


def summarise(records: list[dict]) -> str:
    lines = []
    for protocol in PROTOCOLS:
        recs = [r for r in records if r["protocol"] == protocol]
        if not recs:
            continue
        methods = list(dict.fromkeys(r["method"] for r in recs))
        structures = list(dict.fromkeys((r["site"], r["structure"]) for r in recs))
        lines += [
            f"\n### {protocol}" + (" (uses the query's true extent)" if protocol == "oracle_extent" else ""),
            "",
            "| set | structure | " + " | ".join(methods) + " |",
            "|---|---|" + "---|" * len(methods),
        ]
        for site, st in structures:
            cells = []
            for m in methods:
                v = [
                    r["dice"] for r in recs if r["method"] == m and r["site"] == site and r["structure"] == st
                ]
                cells.append(f"{np.mean(v):.3f}")
            lines.append(f"| {site} | {st} | " + " | ".join(cells) + " |")
        cells = []
        for m in methods:
            mine = [r for r in recs if r["method"] == m]
            v = np.array([r["dice"] for r in mine])
            lo, hi = bootstrap_mean_ci(v, groups=[query_scan(r) for r in mine])
            cells.append(f"**{v.mean():.3f}** [{lo:.2f}, {hi:.2f}]")
        n_scans = len({query_scan(r) for r in recs})
        lines.append(f"| all | mean [95% CI over the {n_scans} scanned patients or scans the queries are cut from] | "
                     + " | ".join(cells) + " |")
        lines += ["", *paired_lines(recs, structures)]
    return "\n".join(lines)


def paired_lines(recs: list[dict], structures: list[tuple[str, str]]) -> list[str]:
    """The trained segmenter (and its adapted form) minus each baseline, paired over the structures (each the
    mean over its pairs, as in the table): the mean
    and a percentile bootstrap 95% interval (`bootstrap_mean_ci`: 2000 resamples, seed 0) whose unit is a
    structure: it holds for other structures of these scans, not for other scans (several structures share one
    query scan; the table's "all" row resamples the scans)."""

    def dice(method: str) -> np.ndarray:
        return np.array([np.mean([r["dice"] for r in recs if r["method"] == method
                                  and (r["site"], r["structure"]) == s]) for s in structures])

    methods = {r["method"] for r in recs}
    out = []
    for a in (TRAINED_FULL, ADAPTED):
        for b in (COPY, WINDOW, WINDOW_3D, LEARNER_ONLY_NAME):
            if a in methods and b in methods:
                d = dice(a) - dice(b)
                lo, hi = bootstrap_mean_ci(d)
                out.append(f"- {a} − {b}: {d.mean():+.3f} [{lo:+.3f}, {hi:+.3f}] ({int((d > 0).sum())} of {len(d)} better)")
    return out


def compare(file_a: str, method_a: str, file_b: str, method_b: str, protocol: str = "whole_scan") -> str:
    """``method_a`` of one run's records minus ``method_b`` of another's (``--out`` files), paired over the
    (support, query, structure) pairs both scored under ``protocol``: two recipes (a scale, adaptation) on the
    same scans."""
    runs = []
    for file, method in ((file_a, method_a), (file_b, method_b)):
        recs = json.loads(Path(file).read_text())
        runs.append({(r["site"], r["structure"], r["support"], r["query"]): r["dice"] for r in recs
                     if r["method"] == method and r["protocol"] == protocol})
    common = [k for k in runs[0] if k in runs[1]]
    if not common:
        raise SystemExit(f"no structure scored with both {method_a!r} in {file_a} and {method_b!r} in {file_b}")
    d = np.array([runs[0][k] - runs[1][k] for k in common])
    lo, hi = bootstrap_mean_ci(d)
    # pairs that only one run scored are named, not dropped without a word (a run stopped early, other --sets)
    alone = [(len(run) - len(common), file) for run, file in zip(runs, (file_a, file_b), strict=True) if len(run) > len(common)]
    left = "; left out, scored in one run only: " + ", ".join(f"{n} of {f}" for n, f in alone) if alone else ""
    return (f"{method_a} ({file_a}) − {method_b} ({file_b}), {protocol}, {len(d)} pairs: {d.mean():+.3f} "
            f"[{lo:+.3f}, {hi:+.3f}]; better {int((d > 0).sum())}, worse {int((d < 0).sum())}{left}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", required=False, help="the segmentation checkpoint (needed unless --compare)")
    ap.add_argument("--out", default=None, help="write every record here (JSON)")
    ap.add_argument("--protocols", nargs="+", default=list(PROTOCOLS), choices=PROTOCOLS)
    ap.add_argument("--sets", nargs="+", default=["abdomen", "lesions"],
                    choices=["abdomen", "lesions", "parts", "sarcoma", "spleen", "spine", "spleen-x", "cross-modality"])
    ap.add_argument("--no-ablations", action="store_true")
    ap.add_argument("--reverse", action="store_true",
                    help="abdomen, parts, spleen, spine: the lower half is the support and the upper half the query")
    ap.add_argument("--adapt-steps", type=int, default=0, help="also score the test-time adapted segmenter")
    ap.add_argument("--scale", choices=("checkpoint", "structure"), default="checkpoint")
    ap.add_argument("--learner-only", action="store_true",
                    help="the trained (and adapted) rows run the learner alone, as segment does for a query of "
                         "another modality than its support")
    ap.add_argument("--keep-empty", action="store_true",
                    help="no retry of a query found empty (the trained and adapted rows as before 2026-12-05; "
                         "ScanOptions.relax_empty)")
    ap.add_argument("--loo-gap", type=int, default=ScanOptions().loo_gap,
                    help="the calibration's leave-one-out leaves out this many axial neighbours of each support slice "
                         "(ScanOptions.loo_gap; 0: the slice alone, as before 2026-12-05)")
    ap.add_argument("--initial-weights", action="store_true",
                    help="the trained (and adapted) rows start from the checkpoint's initial, untrained weights "
                         "(untrained_state_dict) instead: what meta-training adds to the whole recipe")
    ap.add_argument("--compare", nargs=4, metavar=("A.json", "METHOD_A", "B.json", "METHOD_B"), default=None,
                    help="no scoring: METHOD_A of run A minus METHOD_B of run B, paired over their common pairs")
    args = ap.parse_args()
    if args.compare:
        print(compare(*args.compare))
        return
    if not args.checkpoint:
        ap.error("--checkpoint is required")
    if args.learner_only and not args.no_ablations:
        ap.error("--learner-only needs --no-ablations (each ablation switches off one part of the full segmenter)")
    learner, extra = load_learner(args.checkpoint, "cpu")
    untrained = restore_untrained(extra)
    if args.initial_weights:
        if untrained is None:
            ap.error(f"--initial-weights: {args.checkpoint} keeps no initial weights (it was fitted with baselines: false)")
        learner = restore_untrained(extra)  # a learner of its own: the adaptation fine-tunes a copy of it
    pre = extra["preprocessing"]
    records = []
    with tempfile.TemporaryDirectory() as tmp:
        pairs = (
            (abdomen_pairs(Path(tmp), args.reverse) if "abdomen" in args.sets else [])
            + (lesion_pairs() if "lesions" in args.sets else [])
            + (parts_pairs(Path(tmp), args.reverse) if "parts" in args.sets else [])
            + (sarcoma_pairs() if "sarcoma" in args.sets else [])
            + (single_scan_pairs(Path(tmp), "spleen", "ct", "CT", "spleen", args.reverse) if "spleen" in args.sets else [])
            + (single_scan_pairs(Path(tmp), "spine", "t2", "MR", "spinal cord", args.reverse) if "spine" in args.sets else [])
            + (cross_patient_spleen_pairs(Path(tmp)) if "spleen-x" in args.sets else [])
            + (cross_modality_pairs() if "cross-modality" in args.sets else [])
        )
        for protocol in args.protocols:
            for s, q in pairs:
                recs = score_pair(
                    learner, pre, s, q, protocol, untrained=untrained, ablations=not args.no_ablations,
                    adapt_steps=args.adapt_steps, scale=args.scale,
                    options=LEARNER_ONLY if args.learner_only
                    else ScanOptions(relax_empty=not args.keep_empty, loo_gap=args.loo_gap),
                )
                for r in recs:
                    r["options"] = "learner only" if args.learner_only else "full"
                    if args.initial_weights:
                        r["weights"] = "initial"
                records += recs
                print(
                    f"{protocol} {q.site} {q.name}: "
                    + ", ".join(f"{r['method']} {r['dice']:.3f}" for r in recs),
                    flush=True,
                )
    print(summarise(records))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(records, indent=1) + "\n")


if __name__ == "__main__":
    main()
