"""What a real scanner writes and the clean benchmark files lack: does `segment` give the same mask?

The abdominal CT and MR of ``benchmarks/real/abdomen`` are split as in `benchmarks.real_segmentation`
(upper half the support, lower half the query), and each variant below is applied to the support alone, to the
query alone, or to both, then scored against the unchanged labels (3D Dice, `segment`'s scan segmenter at the
structure's scale without adaptation, as `score_pair` runs it):

* ``wide_fov``: CT, the same body in a 170 x 170 grid (about 510 mm across): air around it, -3024 HU outside
  the reconstruction circle (a wider field of view; the file's own crop is tight around the body, so no circle
  fits in it without cutting the body; the padding value itself is clipped away by the CT window: -3024, -2048
  and -1024 gave the same masks in the review that found this);
* ``wide_fov_couch``: the same with a CT couch under the body (two +250 HU shells around foam);
* ``zero_background``: MR, every voxel outside the body set to 0 (a scanner or converter that masks the
  background);
* ``bright``: MR, 3% of the body's voxels outside the labelled structures, in 3 x 3 in-plane patches, set to
  10 times the median tissue value (coil hot spots, bright vessels or fat in a sequence that makes them so);
* ``bright_small``: the same with 0.3%.

    python -m benchmarks.scanner_values --checkpoint runs/protonet_seg/version_0/checkpoints/best.ckpt \\
        --out scanner_values.json

Found by a review (2026-12-06); docs/segmentation.md, "What a scanner writes", has the figures.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from benchmarks.real_segmentation import REAL, _half
from imaging_meta.checkpoint_io import load_learner
from imaging_meta.evaluation.scans import TRAINED_FULL, Scan, score_pair

#: four structures of each scan (kidney_right of the CT and the stomachs left out: few voxels in one half or a
#: low Dice either way); `benchmarks.real_segmentation`'s abdomen pairs have 6 and 5
STRUCTURES = {"CT": {"spleen": 1, "kidney_left": 3, "liver": 5, "aorta": 52},
              "MR": {"spleen": 1, "kidney_right": 2, "liver": 5, "aorta": 23}}
WIDE = 170  # voxels across the wider grid

Volume = tuple[np.ndarray, np.ndarray, np.ndarray]  # values, labels, affine
Variant = Callable[[np.ndarray, np.ndarray, np.ndarray], Volume]


def _outside_circle(nx: int, ny: int) -> np.ndarray:
    x, y = np.meshgrid(np.arange(nx), np.arange(ny), indexing="ij")
    return ((x - (nx - 1) / 2) / (nx / 2)) ** 2 + ((y - (ny - 1) / 2) / (ny / 2)) ** 2 > 1


def wide_fov(v: np.ndarray, lab: np.ndarray, affine: np.ndarray, couch: bool = False) -> Volume:
    nx, ny, nz = v.shape
    ox, oy = (WIDE - nx) // 2, (WIDE - ny) // 2
    rng = np.random.default_rng(0)
    big = -1000 + rng.normal(0, 10, (WIDE, WIDE, nz)).round()
    big[ox : ox + nx, oy : oy + ny] = v
    if couch:  # under the body (the grid's second axis runs posterior to anterior in RAS)
        xs = slice(10, WIDE - 10)
        big[xs, oy - 3 : oy - 1] = 250 + rng.normal(0, 20, (WIDE - 20, 2, nz)).round()
        big[xs, oy - 12 : oy - 3] = -850 + rng.normal(0, 20, (WIDE - 20, 9, nz)).round()
        big[xs, oy - 14 : oy - 12] = 250 + rng.normal(0, 20, (WIDE - 20, 2, nz)).round()
    big[_outside_circle(WIDE, WIDE)] = -3024
    big_lab = np.zeros((WIDE, WIDE, nz), lab.dtype)
    big_lab[ox : ox + nx, oy : oy + ny] = lab
    a = affine.copy()
    a[:3, 3] -= a[:3, 0] * ox + a[:3, 1] * oy
    return big, big_lab, a


def _body(v: np.ndarray) -> np.ndarray:
    """The MR's body: above a tenth of the 99th percentile of its non-zero voxels, closed, filled, the largest
    part."""
    body = v > 0.1 * np.percentile(v[v != 0], 99)
    body = np.stack([ndimage.binary_fill_holes(ndimage.binary_closing(body[..., z], iterations=2))
                     for z in range(v.shape[2])], -1)
    parts, n = ndimage.label(body)
    return parts == (1 + int(np.argmax(ndimage.sum(body, parts, range(1, n + 1))))) if n else body


def zero_background(v: np.ndarray, lab: np.ndarray, affine: np.ndarray) -> Volume:
    out = v.copy()
    out[~_body(v)] = 0
    return out, lab, affine


def bright(v: np.ndarray, lab: np.ndarray, affine: np.ndarray, share: float = 0.03) -> Volume:
    body = _body(v)
    outside = body & (lab == 0)
    where = np.argwhere(outside)
    centres = np.zeros(v.shape, bool)  # about share of the body once each centre grows to a 3 x 3 patch
    pick = where[np.random.default_rng(2).choice(len(where), int(share * body.sum() / 9), replace=False)]
    centres[tuple(pick.T)] = True
    patches = ndimage.binary_dilation(centres, np.ones((3, 3, 1), bool)) & outside
    out = v.copy()
    out[patches] = 10 * float(np.median(v[body]))
    return out, lab, affine


VARIANTS: dict[str, tuple[str, Variant]] = {
    "wide_fov": ("CT", wide_fov),
    "wide_fov_couch": ("CT", lambda v, lab, a: wide_fov(v, lab, a, couch=True)),
    "zero_background": ("MR", zero_background),
    "bright": ("MR", bright),
    "bright_small": ("MR", lambda v, lab, a: bright(v, lab, a, 0.003)),
}


def halves(tmp: Path, name: str, volume: Volume) -> dict[str, tuple[str, str]]:
    """The upper and lower halves of a volume and its labels, written as NIfTI and split as
    `benchmarks.real_segmentation` splits its scans: part -> (image, label)."""
    values, labels, affine = volume
    image, label = tmp / f"{name}.nii.gz", tmp / f"{name}_label.nii.gz"
    nib.save(nib.Nifti1Image(values.astype(np.float32), affine), str(image))
    nib.save(nib.Nifti1Image(labels.astype(np.uint8), affine), str(label))
    return {part: (str(_half(image, tmp / f"{name}_{part}.nii.gz", part == "upper")),
                   str(_half(label, tmp / f"{name}_label_{part}.nii.gz", part == "upper")))
            for part in ("upper", "lower")}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--scale", default="structure", choices=["checkpoint", "structure"])
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    learner, extra = load_learner(args.checkpoint, "cpu")
    learner.eval()
    records = []
    with tempfile.TemporaryDirectory() as folder:
        tmp = Path(folder)
        originals = {}
        for modality, stem in (("CT", "ct"), ("MR", "mr")):
            img = nib.load(str(REAL / "abdomen" / f"{stem}.nii.gz"))
            lab = np.asarray(nib.load(str(REAL / "abdomen" / f"{stem}_label.nii.gz")).dataobj)
            originals[modality] = (np.asarray(img.dataobj, dtype=np.float32), lab, img.affine)
        files = {m: halves(tmp, f"{m}_original", vol) for m, vol in originals.items()}
        runs = [(m, "original", "original") for m in originals if any(VARIANTS[v][0] == m for v in args.variants)]
        for name in args.variants:
            modality, change = VARIANTS[name]
            files[name] = halves(tmp, name, change(*originals[modality]))
            runs += [(modality, name, "original"), (modality, "original", name), (modality, name, name)]
        for modality, s_var, q_var in runs:
            s_files = files[modality if s_var == "original" else s_var]["upper"]
            q_files = files[modality if q_var == "original" else q_var]["lower"]
            for structure, value in STRUCTURES[modality].items():
                support = Scan(s_files[0], s_files[1], value, modality, structure)
                query = Scan(q_files[0], q_files[1], value, modality, structure)
                recs = score_pair(learner, extra["preprocessing"], support, query, ablations=False, scale=args.scale)
                dice = {r["method"]: round(float(r["dice"]), 3) for r in recs}
                record = {"support": s_var, "query": q_var, "modality": modality, "structure": structure, **dice}
                records.append(record)
                print(json.dumps(record), flush=True)
    print(summarise(records))
    if args.out:
        Path(args.out).write_text(json.dumps(records, indent=1) + "\n")
    return 0


def summarise(records: list[dict]) -> str:
    """A table of the trained segmenter's mean Dice per (support, query) variant, with the change from the
    originals."""
    base: dict[str, float] = {}
    lines = ["| support | query | structures | trained, mean 3D Dice | change |", "|---|---|---|---|---|"]
    groups: dict[tuple[str, str, str], list[float]] = {}
    for r in records:
        groups.setdefault((r["modality"], r["support"], r["query"]), []).append(r[TRAINED_FULL])
    for (modality, s, q), values in groups.items():
        mean = float(np.mean(values))
        if s == q == "original":
            base[modality] = mean
        change = mean - base[modality] if modality in base else float("nan")
        lines.append(f"| {modality} {s} | {q} | {len(values)} | {mean:.3f} | {change:+.3f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
