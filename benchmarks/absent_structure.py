"""What `segment` returns for a query that does not show the structure at all: the false positives a user gets
when a scan in the query folder does not cover the organ.

    python -m benchmarks.absent_structure --checkpoint runs/protonet_seg/version_0/checkpoints/best.ckpt \
        --out absent_structure.json

`segment` assumes that every query shows the structure (docs/segmentation.md). Here each structure of the
abdominal CT and MR of ``benchmarks/real/abdomen`` (upper half, as in `benchmarks.real_segmentation`) is the
support, and one `segment` call per structure segments, with the default recipe (or ``--adapt-steps``), the
same scan's lower half, which shows it (the reference), and scans of the same modality that cannot show an
abdominal organ: the three soft-tissue sarcomas of the thigh (CT or T1 MR, ``benchmarks/real/sarcoma``) and,
for MR, the two brain MRs of ``benchmarks/real/lesions``. Recorded per query: the mask's volume in ml, and that
volume as a fraction of the structure's volume in the support half; whether `segment` retried an empty answer;
the query's novelty (`imaging_meta.volume.appearance`) and whether `segment` warned that it looks unlike the
support scan.
Run on 2 CPU cores with one thread per process; one call per structure.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np

from benchmarks.real_segmentation import REAL, abdomen_pairs
from imaging_meta.adaptation import DEFAULT_STEPS
from imaging_meta.commands.segment import segment

ABSENT = {
    "CT": [REAL / "sarcoma" / f"sts{n}_ct.nii.gz" for n in (1, 2, 3)],
    "MR": [REAL / "sarcoma" / f"sts{n}_mr.nii.gz" for n in (1, 2, 3)]
    + [REAL / "lesions" / f"brain{n}.nii.gz" for n in (1, 2)],
}


NOVELTY = re.compile(r"^(?P<name>.+?): \d+ foreground voxels -> .* \(novelty (?P<novelty>[0-9.]+)\)$")


def volume_ml(path: str | Path, value: int | None = None) -> float:
    """The volume (ml) of the voxels of ``path`` equal to ``value`` (None: non-zero)."""
    img = nib.load(str(path))
    data = np.asarray(img.dataobj)
    voxel = float(np.abs(np.linalg.det(img.affine[:3, :3])))
    n = int((data != 0).sum() if value is None else (data == value).sum())
    return n * voxel / 1000.0


class _Retries(logging.Handler):
    """Collects, by query name, `segment`'s warnings that an empty answer was segmented again or that the query
    looks unlike the support scan, and the novelty its log gives."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.names: set[str] = set()
        self.unlike: set[str] = set()
        self.novelty: dict[str, float] = {}

    def clear(self) -> None:
        self.names.clear()
        self.unlike.clear()
        self.novelty.clear()

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if "so it was segmented again" in message:
            self.names.add(message.split(":")[0])
        if " looks unlike the support scan" in message:
            self.unlike.add(message.split(" looks unlike")[0])
        found = NOVELTY.match(message)
        if found:
            self.novelty[found["name"]] = float(found["novelty"])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--adapt-steps", type=int, default=DEFAULT_STEPS)
    ap.add_argument("--structures", nargs="*", default=None, help="only these structure names (default: all)")
    ap.add_argument("--modalities", nargs="*", default=["CT", "MR"])
    ap.add_argument("--out", default=None, help="JSON records")
    args = ap.parse_args(argv)
    retries = _Retries()
    segment_log = logging.getLogger("imaging_meta.commands.segment")
    segment_log.addHandler(retries)
    segment_log.setLevel(logging.INFO)
    records = []
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        for n, (s, q) in enumerate(abdomen_pairs(tmp)):
            if s.modality not in args.modalities or (args.structures and s.name not in args.structures):
                continue
            queries = [Path(q.image), *ABSENT[s.modality]]
            support_ml = volume_ml(s.label, s.value)
            retries.clear()
            masks = segment(args.checkpoint, [(s.image, s.label)], [str(p) for p in queries], tmp / f"out{n}",
                            label_value=s.value, modality=s.modality, device="cpu", adapt_steps=args.adapt_steps)
            for query, mask in zip(queries, masks, strict=True):
                ml = volume_ml(mask)
                rec = {"structure": s.name, "modality": s.modality, "query": query.name, "shows_it": query == Path(q.image),
                       "mask_ml": round(ml, 2), "support_ml": round(support_ml, 2),
                       "fraction_of_support": round(ml / support_ml, 3),
                       "retried": query.name in retries.names, "novelty": retries.novelty.get(query.name),
                       "warned_unlike": query.name in retries.unlike}
                records.append(rec)
                print(f"{s.modality} {s.name:14s} {query.name:22s} shows it: {str(rec['shows_it']):5s} "
                      f"mask {ml:8.1f} ml ({rec['fraction_of_support']:.2f} of the support's {support_ml:.1f} ml)"
                      f"  novelty {rec['novelty']}{'  warned' if rec['warned_unlike'] else ''}"
                      f"{'  retried' if rec['retried'] else ''}", flush=True)
    absent = [r for r in records if not r["shows_it"]]
    if absent:
        empty = sum(r["mask_ml"] == 0 for r in absent)
        fractions = np.array([r["fraction_of_support"] for r in absent])
        print(f"queries without the structure: {len(absent)}; left empty {empty}; retried "
              f"{sum(r['retried'] for r in absent)}; mask as a fraction of the support's structure: median "
              f"{np.median(fractions):.2f}, max {fractions.max():.2f}; warned as unlike the support "
              f"{sum(r['warned_unlike'] for r in absent)}")
    shown = [r for r in records if r["shows_it"]]
    if shown:
        print(f"queries that show it: {len(shown)}; warned as unlike the support {sum(r['warned_unlike'] for r in shown)}")
    if args.out:
        Path(args.out).write_text(json.dumps({"checkpoint": args.checkpoint, "adapt_steps": args.adapt_steps,
                                              "records": records}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
