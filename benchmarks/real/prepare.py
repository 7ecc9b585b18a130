"""Rebuild the real validation scans under ``benchmarks/real/`` from the two PyPI source distributions they come from.

The files are committed; this script documents exactly how they were made and lets anyone check it:

    python -m benchmarks.real.prepare --totalsegmentator totalsegmentator-2.18.0.tar.gz \
        --pyradiomics pyradiomics-3.1.0.tar.gz --out benchmarks/real

* ``abdomen/``: TotalSegmentator 2.18.0's test reference files, copied byte for byte: an abdominal CT
  (``example_ct_sm``) and an abdominal MR (``example_mr_sm``), 3 mm isotropic, with their multi-structure
  label maps (``example_seg``, ``example_seg_mr``). The label maps are TotalSegmentator's own reference output,
  not manual annotations.
* ``lesions/``: pyradiomics 3.1.0's test cases ``lung1``, ``lung2`` (CT, one lung tumour each) and ``brain1``,
  ``brain2`` (MR, one brain tumour each), converted from NRRD (LPS) to NIfTI (RAS affine), int16 image, uint8
  label. The two CTs are 512 x 512 in-plane; they are averaged 2 x 2 in-plane (the label by "any voxel of the
  block") to keep the repository small: 1.1-1.3 mm pixels against 5 mm slices.

The manifest records each output's sha256 and its source file's; the README the two distributions' sha256.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import tarfile
from pathlib import Path

import nibabel as nib
import numpy as np

ABDOMEN = {
    "example_ct_sm.nii.gz": "ct.nii.gz",
    "example_seg.nii.gz": "ct_label.nii.gz",
    "example_mr_sm.nii.gz": "mr.nii.gz",
    "example_seg_mr.nii.gz": "mr_label.nii.gz",
}
LESION_CASES = {"lung1": 2, "lung2": 2, "brain1": 1, "brain2": 1}  # case -> in-plane block size

# TotalSegmentator's class maps ("total" for CT, "total_mr" for MR), for the structures the benchmark uses
CT_STRUCTURES = {"spleen": 1, "kidney_right": 2, "kidney_left": 3, "liver": 5, "stomach": 6, "aorta": 52}
MR_STRUCTURES = {"spleen": 1, "kidney_right": 2, "kidney_left": 3, "liver": 5, "stomach": 6, "aorta": 23}


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_nrrd(data: bytes) -> tuple[np.ndarray, np.ndarray]:
    """A gzip or raw, little-endian, 3D NRRD in LPS space -> (array (X, Y, Z), RAS affine)."""
    head, _, body = data.partition(b"\n\n")
    fields = {}
    for line in head.decode("ascii").splitlines()[1:]:
        if line.startswith("#") or ":" not in line:
            continue
        key, value = line.split(":", 1)
        fields[key.strip()] = value.strip()
    dtypes = {"short": "<i2", "int": "<i4", "unsigned char": "u1", "ushort": "<u2", "float": "<f4"}
    sizes = [int(s) for s in fields["sizes"].split()]
    raw = gzip.decompress(body) if fields["encoding"] == "gzip" else body
    array = np.frombuffer(raw, dtype=dtypes[fields["type"]]).reshape(sizes[::-1]).transpose(2, 1, 0)
    dirs = [[float(v) for v in d.strip("()").split(",")] for d in fields["space directions"].split()]
    origin = [float(v) for v in fields["space origin"].strip("()").split(",")]
    if fields.get("space") != "left-posterior-superior":
        raise ValueError(f"unsupported NRRD space {fields.get('space')!r}")
    affine = np.eye(4)
    affine[:3, :3] = np.array(dirs).T
    affine[:3, 3] = origin
    return array, np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine  # LPS -> RAS


def block_reduce(image: np.ndarray, label: np.ndarray, affine: np.ndarray, k: int):
    if k == 1:
        return image, label, affine
    x, y = (image.shape[0] // k) * k, (image.shape[1] // k) * k
    img = image[:x, :y].reshape(x // k, k, y // k, k, -1).mean(axis=(1, 3))
    lbl = label[:x, :y].reshape(x // k, k, y // k, k, -1).max(axis=(1, 3))
    aff = affine.copy()
    aff[:3, :2] *= k
    aff[:3, 3] += affine[:3, :2] @ np.full(2, (k - 1) / 2.0)  # the block's centre
    return np.round(img).astype(np.int16), lbl, aff


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--totalsegmentator", required=True, help="totalsegmentator-2.18.0.tar.gz from PyPI")
    ap.add_argument("--pyradiomics", required=True, help="pyradiomics-3.1.0.tar.gz from PyPI")
    ap.add_argument("--out", default="benchmarks/real")
    args = ap.parse_args()
    out = Path(args.out)
    before = json.loads((out / "manifest.json").read_text()) if (out / "manifest.json").is_file() else {}
    manifest = {}
    with tarfile.open(args.totalsegmentator) as tar:
        (out / "abdomen").mkdir(parents=True, exist_ok=True)
        for src, dst in ABDOMEN.items():
            data = tar.extractfile(f"totalsegmentator-2.18.0/tests/reference_files/{src}").read()
            (out / "abdomen" / dst).write_bytes(data)
            manifest[f"abdomen/{dst}"] = {
                "source": f"totalsegmentator-2.18.0.tar.gz:tests/reference_files/{src}",
                "source_sha256": sha256(data),
            }
        (out / "LICENSE-totalsegmentator.txt").write_bytes(
            tar.extractfile("totalsegmentator-2.18.0/LICENSE").read()
        )
    (out / "abdomen" / "structures.json").write_text(
        json.dumps({"ct_label.nii.gz": CT_STRUCTURES, "mr_label.nii.gz": MR_STRUCTURES}, indent=2) + "\n"
    )
    with tarfile.open(args.pyradiomics) as tar:
        (out / "lesions").mkdir(parents=True, exist_ok=True)
        for case, k in LESION_CASES.items():
            img_b = tar.extractfile(f"pyradiomics-3.1.0/data/{case}_image.nrrd").read()
            lbl_b = tar.extractfile(f"pyradiomics-3.1.0/data/{case}_label.nrrd").read()
            image, affine = read_nrrd(img_b)
            label, _ = read_nrrd(lbl_b)
            image, label, aff = block_reduce(
                image.astype(np.float32), (label > 0).astype(np.uint8), affine, k
            )
            nib.save(nib.Nifti1Image(image.astype(np.int16), aff), str(out / "lesions" / f"{case}.nii.gz"))
            nib.save(
                nib.Nifti1Image(label.astype(np.uint8), aff), str(out / "lesions" / f"{case}_label.nii.gz")
            )
            for name, b in (("image", img_b), ("label", lbl_b)):
                manifest[f"lesions/{case}{'' if name == 'image' else '_label'}.nii.gz"] = {
                    "source": f"pyradiomics-3.1.0.tar.gz:data/{case}_{name}.nrrd",
                    "source_sha256": sha256(b),
                    "in_plane_block": k,
                }
        (out / "LICENSE-pyradiomics.txt").write_bytes(tar.extractfile("pyradiomics-3.1.0/LICENSE.txt").read())
    for rel in manifest:
        manifest[rel]["sha256"] = sha256((out / rel).read_bytes())
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    print(f"wrote {len(manifest)} files under {out}")
    # the check: every rebuilt file against the manifest that was there (the committed one, under benchmarks/real)
    changed = sorted(rel for rel in manifest if rel in before and before[rel].get("sha256") != manifest[rel]["sha256"])
    if changed:
        raise SystemExit(f"{len(changed)} rebuilt file(s) differ from the manifest that was there ({', '.join(changed)}); "
                         "the manifest now holds the new files' sha256 (git diff shows the change)")
    if before:
        print(f"every rebuilt file matches the manifest that was there ({len(before)} entries)")


if __name__ == "__main__":
    main()
