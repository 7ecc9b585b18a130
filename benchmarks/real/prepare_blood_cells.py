"""Build the real colour classification set ``benchmarks/real/classification/cells_blood/`` from the BCCD dataset.

    git clone https://github.com/Shenggan/BCCD_Dataset && git -C BCCD_Dataset checkout d272fb14cdff
    python -m benchmarks.real.prepare_blood_cells --source BCCD_Dataset            # rebuild and check
    python -m benchmarks.real.prepare_blood_cells --source BCCD_Dataset --write    # (re)write PNGs and manifest

BCCD (MIT licence, ``LICENSE-bccd.txt``) holds 364 stained peripheral blood smear photographs (640 x 480 JPEG)
with VOC bounding boxes of three cell types: RBC, WBC and Platelets. The source photographs are not committed;
this script cuts the set from them by a fixed rule that never looks at a classifier:

* every box that is not marked ``difficult`` and lies inside its photograph is eligible; per class, the
  photographs that hold an eligible box are sorted by name and at most ``PER_CLASS`` of them are taken, evenly
  spaced; from each, the first eligible box of that class in the annotation file;
* the crop is a square of ``SIDE_PX`` pixels of the photograph (fixed, so that the cells keep their relative
  sizes, as at a fixed magnification), centred on the box and shifted to stay inside the photograph, resized
  to 64 x 64 (area averaging), kept in colour (8-bit RGB PNG);
* a file is named ``bccd<photograph number>_<class>.png``; a photograph can give one crop to each class.

Colour is this set's point: the stain separates the classes (purple nuclei of white cells and platelets, pink red
cells), and a classifier that reads only grey levels throws that away.
"""

from __future__ import annotations

import argparse
import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from benchmarks.real.prepare_classification import check_set, digests, evenly, summary, write_set

HERE = Path(__file__).resolve().parent
OUT = HERE / "classification" / "cells_blood"
MANIFEST = HERE / "classification" / "manifest_cells_blood.json"
CLASSES = {"RBC": "rbc", "WBC": "wbc", "Platelets": "platelet"}
PER_CLASS = 12
SIDE_PX = 160
SIZE = 64


def _boxes(annotation: Path) -> list[tuple[str, tuple[int, int, int, int]]]:
    root = ET.parse(annotation).getroot()
    width, height = int(root.findtext("size/width") or 0), int(root.findtext("size/height") or 0)
    out = []
    for obj in root.iter("object"):
        name = (obj.findtext("name") or "").strip()
        if name not in CLASSES or (obj.findtext("difficult") or "0").strip() == "1":
            continue
        box = tuple(int(float(obj.findtext(f"bndbox/{k}") or -1)) for k in ("xmin", "ymin", "xmax", "ymax"))
        x0, y0, x1, y1 = box
        if 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height:
            out.append((name, (x0, y0, x1, y1)))
    return out


def _crop(photo: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
    h, w = photo.shape[:2]
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    x0 = int(round(min(max(cx - SIDE_PX / 2, 0), w - SIDE_PX)))
    y0 = int(round(min(max(cy - SIDE_PX / 2, 0), h - SIDE_PX)))
    patch = torch.from_numpy(photo[y0 : y0 + SIDE_PX, x0 : x0 + SIDE_PX].astype(np.float32)).permute(2, 0, 1)
    small = F.interpolate(patch[None], size=(SIZE, SIZE), mode="area")[0]
    return np.round(small.permute(1, 2, 0).clamp(0, 255).numpy()).astype(np.uint8)


def build(source: Path) -> dict[str, np.ndarray]:
    annotations = sorted((source / "BCCD" / "Annotations").glob("BloodImage_*.xml"))
    if not annotations:
        raise FileNotFoundError(f"{source}: no BCCD/Annotations/BloodImage_*.xml; give a checkout of BCCD_Dataset")
    first: dict[str, list[tuple[Path, tuple[int, int, int, int]]]] = {c: [] for c in CLASSES}
    for a in annotations:
        seen = set()
        for name, box in _boxes(a):
            if name not in seen:
                seen.add(name)
                first[name].append((a, box))
    out = {}
    for name, cls in CLASSES.items():
        for a, box in evenly(first[name], PER_CLASS):
            photo_path = source / "BCCD" / "JPEGImages" / (a.stem + ".jpg")
            photo = np.asarray(Image.open(photo_path).convert("RGB"))
            number = a.stem.split("_")[-1]
            out[f"{cls}/bccd{number}_{cls}.png"] = _crop(photo, box)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--source", type=Path, required=True, help="a checkout of github.com/Shenggan/BCCD_Dataset")
    ap.add_argument("--write", action="store_true", help="write the PNGs and the manifest (default: check only)")
    args = ap.parse_args(argv)
    images = build(args.source)
    manifest = digests(images)
    if args.write:
        write_set(OUT, images)
        MANIFEST.write_text(json.dumps({"cells_blood": manifest}, indent=1, sort_keys=True) + "\n")
    bad = check_set(OUT, json.loads(MANIFEST.read_text())["cells_blood"], manifest)
    print(summary("cells_blood", images))
    for b in bad:
        print(b, file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
