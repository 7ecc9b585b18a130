"""Build the real 2D classification sets under ``benchmarks/real/classification/`` from the committed real scans.

    python -m benchmarks.real.prepare_classification            # rebuild and check against the manifest
    python -m benchmarks.real.prepare_classification --write    # (re)write the PNGs and the manifest

Every image is cut from a scan in ``benchmarks/real/abdomen/`` or ``benchmarks/real/lesions/`` (TotalSegmentator
2.18.0 and pyradiomics 3.1.0 test data, see ``README.md`` there), by a fixed rule that never looks at a
classifier. Each set is a folder with one subfolder per class, as ``imaging-meta classify`` and the
``ImageFolder`` source read it. Images are 8-bit grey PNGs of 64 x 64 pixels, named
``<scan>_z<slice>[_<n>].png`` (the scan name is the patient: ``patient_regex: '^(?P<patient>[a-z]+[0-9]*)_'``).

* ``organs_ct`` and ``organs_mr`` (5 classes: aorta, kidney, liver, spleen, stomach): the axial crop of one
  structure of TotalSegmentator's label map on one slice: the structure's bounding box in that slice, made
  square, enlarged by a quarter, at least 48 mm, resized to 64 x 64. The slices where the structure covers at
  least 15 pixels (135 mm^2) are eligible; left and right kidney are one class; at most 12 crops per class,
  evenly spaced over the eligible ones. CT is windowed to [-160, 240] HU, MR scaled between the 1st and 99th
  percentile of the volume. The labels are TotalSegmentator's model output, not manual annotations.
* ``lesions_lung_ct`` and ``lesions_brain_mr`` (2 classes: lesion, tissue): a 48 mm square patch at the
  tumour's centroid on every slice that shows the tumour (pyradiomics' expert label), and as many patches on
  the same slices centred at a seeded random point of the body (CT above -500 HU; MR above the volume's 20th
  percentile) whose patch does not touch the tumour. CT windowed to [-1000, 400] HU; MR as above.

Only one scan per modality holds the organs, so support and query items of an organ episode come from the same
patient (other slices); the lesion sets hold two patients each.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

HERE = Path(__file__).resolve().parent
OUT = HERE / "classification"
SIZE = 64
MIN_AREA = 15
MAX_PER_CLASS = 12
PATCH_MM = 48.0
SEED = 20261204
ORGAN_CLASSES = {"aorta": ("aorta",), "kidney": ("kidney_left", "kidney_right"), "liver": ("liver",),
                 "spleen": ("spleen",), "stomach": ("stomach",)}
CT_ORGAN_WINDOW, CT_LESION_WINDOW = (-160.0, 240.0), (-1000.0, 400.0)


def _load(path: Path) -> tuple[np.ndarray, tuple[float, float]]:
    img = nib.load(str(path))
    return np.asarray(img.dataobj, dtype=np.float32), tuple(float(z) for z in img.header.get_zooms()[:2])


def _scale(volume: np.ndarray, ct_window: tuple[float, float] | None) -> np.ndarray:
    lo, hi = ct_window if ct_window else np.percentile(volume, [1, 99])
    return np.clip((volume - lo) / max(hi - lo, 1e-6), 0.0, 1.0)


def _crop(plane: np.ndarray, cx: float, cy: float, half_x: float, half_y: float) -> np.ndarray:
    """A crop of ``plane`` (already in [0, 1]) centred at (cx, cy) with half-sides in pixels, zero outside,
    resized to SIZE x SIZE (area-weighted when shrinking, bilinear when enlarging), as uint8."""
    x0, x1 = int(round(cx - half_x)), int(round(cx + half_x))
    y0, y1 = int(round(cy - half_y)), int(round(cy + half_y))
    out = np.zeros((x1 - x0, y1 - y0), np.float32)
    sx0, sy0 = max(x0, 0), max(y0, 0)
    sx1, sy1 = min(x1, plane.shape[0]), min(y1, plane.shape[1])
    out[sx0 - x0 : sx1 - x0, sy0 - y0 : sy1 - y0] = plane[sx0:sx1, sy0:sy1]
    t = torch.from_numpy(out)[None, None]
    mode = "area" if min(out.shape) >= SIZE else "bilinear"
    t = F.interpolate(t, size=(SIZE, SIZE), mode=mode, **({} if mode == "area" else {"align_corners": False}))
    # a quarter turn of the (x, y) array, in the file's own voxel axes (not reoriented): anterior at the top for a
    # file stored R,A,S (the CT), posterior at the top and mirrored for L,P,S (the MR, the lung CTs), mirrored for L,A,S (the brain MRs; a review)
    img = np.rot90(t[0, 0].numpy(), 1)
    return np.round(np.clip(img, 0, 1) * 255).astype(np.uint8)


def evenly(items: list, k: int) -> list:
    """At most ``k`` of ``items``, evenly spaced, the first and the last included."""
    if len(items) <= k:
        return items
    return [items[int(round(i * (len(items) - 1) / (k - 1)))] for i in range(k)]


def organ_set(modality: str) -> dict[str, np.ndarray]:
    root = HERE / "abdomen"
    volume, (px, py) = _load(root / f"{modality}.nii.gz")
    label = np.asarray(nib.load(str(root / f"{modality}_label.nii.gz")).dataobj).astype(np.int32)
    values = json.loads((root / "structures.json").read_text())[f"{modality}_label.nii.gz"]
    scaled = _scale(volume, CT_ORGAN_WINDOW if modality == "ct" else None)
    out = {}
    for cls, structures in ORGAN_CLASSES.items():
        eligible = []
        for s in structures:
            for z in range(label.shape[2]):
                mask = label[:, :, z] == values[s]
                if mask.sum() >= MIN_AREA:
                    eligible.append((z, s, mask))
        eligible.sort(key=lambda e: (e[0], e[1]))
        for z, s, mask in evenly(eligible, MAX_PER_CLASS):
            xs, ys = np.nonzero(mask)
            side_mm = max(PATCH_MM, 1.25 * max((xs.max() - xs.min() + 1) * px, (ys.max() - ys.min() + 1) * py))
            cx, cy = (xs.max() + xs.min()) / 2 + 0.5, (ys.max() + ys.min()) / 2 + 0.5
            tag = "" if len(structures) == 1 else "_" + s.split("_")[-1]
            out[f"{cls}/{modality}_z{z:02d}{tag}.png"] = _crop(scaled[:, :, z], cx, cy, side_mm / 2 / px, side_mm / 2 / py)
    return out


def lesion_set(cases: tuple[str, ...], ct: bool) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(SEED)
    out = {}
    for case in cases:
        volume, (px, py) = _load(HERE / "lesions" / f"{case}.nii.gz")
        label = np.asarray(nib.load(str(HERE / "lesions" / f"{case}_label.nii.gz")).dataobj) > 0
        scaled = _scale(volume, CT_LESION_WINDOW if ct else None)
        body = volume > (-500.0 if ct else np.percentile(volume, 20))
        hx, hy = PATCH_MM / 2 / px, PATCH_MM / 2 / py
        for z in range(label.shape[2]):
            if not label[:, :, z].any():
                continue
            xs, ys = np.nonzero(label[:, :, z])
            out[f"lesion/{case}_z{z:02d}.png"] = _crop(scaled[:, :, z], xs.mean() + 0.5, ys.mean() + 0.5, hx, hy)
            lx, ly = np.nonzero(label.any(axis=2))  # the tumour's footprint over all slices
            cand = np.argwhere(body[:, :, z])
            far = (np.abs(cand[:, None, 0] - lx[None]) > 2 * hx) | (np.abs(cand[:, None, 1] - ly[None]) > 2 * hy)
            inside = (cand[:, 0] > hx) & (cand[:, 0] < volume.shape[0] - hx) & (cand[:, 1] > hy) & (cand[:, 1] < volume.shape[1] - hy)
            cand = cand[far.all(axis=1) & inside]
            if len(cand) == 0:
                raise RuntimeError(f"{case} slice {z}: no body point whose patch misses the tumour")
            x, y = cand[rng.integers(len(cand))]
            out[f"tissue/{case}_z{z:02d}.png"] = _crop(scaled[:, :, z], x + 0.5, y + 0.5, hx, hy)
    return out


def build() -> dict[str, dict[str, np.ndarray]]:
    return {
        "organs_ct": organ_set("ct"),
        "organs_mr": organ_set("mr"),
        "lesions_lung_ct": lesion_set(("lung1", "lung2"), ct=True),
        "lesions_brain_mr": lesion_set(("brain1", "brain2"), ct=False),
    }


def digests(images: dict[str, np.ndarray]) -> dict[str, str]:
    """A set's manifest: the sha256 of each image's pixels, by its path in the set."""
    return {rel: hashlib.sha256(a.tobytes()).hexdigest() for rel, a in sorted(images.items())}


def write_set(root: Path, images: dict[str, np.ndarray]) -> None:
    """Write a set's images under ``root`` as PNGs: 8-bit grey (H, W) or RGB (H, W, 3), as the arrays are."""
    for rel, a in images.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        Image.fromarray(a, mode="RGB" if a.ndim == 3 else "L").save(buf, format="PNG", optimize=False)
        path.write_bytes(buf.getvalue())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--write", action="store_true", help="write the PNGs and manifest.json (default: check only)")
    args = ap.parse_args(argv)
    sets = build()
    manifest = {name: digests(images) for name, images in sets.items()}
    if args.write:
        for name, images in sets.items():
            write_set(OUT / name, images)
        (OUT / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    expected = json.loads((OUT / "manifest.json").read_text())
    bad = [b for name, images in expected.items() for b in check_set(OUT / name, images, manifest.get(name, {}))]
    for name, images in sets.items():
        print(summary(name, images))
    for b in bad:
        print(b, file=sys.stderr)
    return 1 if bad else 0


def check_set(root: Path, expected: dict[str, str], built: dict[str, str]) -> list[str]:
    """What is wrong with a set's PNGs under ``root``: missing, pixels other than ``expected``'s digests, or a rule
    that now ``built`` other pixels."""
    bad = []
    for rel, digest in expected.items():
        path = root / rel
        if not path.is_file():
            bad.append(f"{path}: missing")
        elif hashlib.sha256(np.asarray(Image.open(path)).tobytes()).hexdigest() != digest:
            bad.append(f"{path}: pixels differ from the manifest")
        elif built.get(rel) != digest:
            bad.append(f"{path}: the rule now builds other pixels")
    return bad


def summary(name: str, images: dict) -> str:
    """``name: N images, 12 classA, ...`` of a set's ``class/file`` keys."""
    counts: dict[str, int] = {}
    for rel in images:
        counts[rel.split("/")[0]] = counts.get(rel.split("/")[0], 0) + 1
    return f"{name}: {sum(counts.values())} images, " + ", ".join(f"{c} {n}" for c, n in sorted(counts.items()))


if __name__ == "__main__":
    raise SystemExit(main())
