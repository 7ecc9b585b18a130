"""Rebuild the real validation sets added on 2026-12-05 from the public GitHub repositories they come from.

Each source is a bare git repository (a clone, or a snapshot) at a pinned commit; nothing is downloaded here:

    python -m benchmarks.real.prepare_github --mirp MIRP.git --ivadomed IVADOMED.git --sct SCT.git \
        --medmnist SNN_MEDMNIST.git --breastmnist AMLS_25_26_SN24205421.git --out benchmarks/real

* ``sarcoma/``: three soft-tissue sarcoma patients (TCIA Soft-tissue-Sarcoma, as mirp's test data ships them:
  ``test/data/sts_images/STS_00N/{CT,MR_T1}/nifti``), each a CT and a T1 MR cropped around the tumour, with the
  tumour mask ("GTV_Mass"). To keep the repository small, each is averaged 2 x 2 in-plane (0.98 to 1.95 mm
  pixels against 3.27 mm slices; the tumours are 4-10 cm across), the image rounded to int16 and the mask kept
  where at least half of the block is tumour (`_block2`). CC BY 3.0.
* ``spleen/``: one abdominal CT cropped around the spleen, with its manual spleen label (Medical Segmentation
  Decathlon Task09 ``spleen2``, as ivadomed's test data ships it: ``ct_scan/sub-spleen2``), image as int16
  (whole numbers: lossless). CC BY-SA 4.0.
* ``spine/``: one T2 MR of the cervical spine of a volunteer with its manual spinal cord label (the
  spinalcordtoolbox test data ``t2/t2.nii.gz``, ``t2/t2_seg-manual.nii.gz``), byte for byte. MIT.
* ``classification/xray_pneumonia/``: 15 normal and 15 pneumonia chest X-rays, 28 x 28 grey (PneumoniaMNIST,
  from Kermany et al.'s paediatric chest X-rays): the first 15 of each class, in file order, of the test split of
  the class-balanced copy in ``aksufatih/snn-medmnist`` (``pneumoniamnist.npz``), as 8-bit PNGs named by their
  index in that copy's test split (not PneumoniaMNIST's own index). CC BY 4.0.
* ``classification/ultrasound_breast/``: 15 malignant and 15 benign-or-normal breast ultrasound images, 28 x 28
  grey (BreastMNIST, from Al-Dhabyani et al.'s BUSI images; added 2026-12-06): the first 15 of each class, in
  file order, of the test split of the copy in ``KamalJain777/AMLS_25_26_SN24205421``
  (``Datasets/BreastMNIST.npz``, at the commit that added it; a later commit deleted it), as 8-bit PNGs named by
  their index in that split. CC BY 4.0.

``manifest_github.json`` records each output's sha256 and its source's (repository, commit, path, sha256);
``--check`` rebuilds everything and compares both with it. The X-rays' pixel digests are also in
``classification/manifest_xray_pneumonia.json`` and ``classification/manifest_ultrasound_breast.json``, as for
the other 2D sets.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import subprocess
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
from PIL import Image

COMMITS = {
    "mirp": ("oncoray/mirp", "d8a6a7264a4d0ccb1f88cc670e0b6d047235909f"),
    "ivadomed": ("ivadomed/data-testing", "794a3075175266758d1bb95d864672a045a7918c"),
    "sct": ("spinalcordtoolbox/sct_testing_data", "af4c7e8783c9dcf8bcfc6c53b190af46260bb875"),
    "medmnist": ("aksufatih/snn-medmnist", "5df79ab2ac7bf898a8c7bf39830053619defa2f7"),
    "breastmnist": ("KamalJain777/AMLS_25_26_SN24205421", "b7f638d33cc9e6dc1a0de213b243598105837d5f"),
}
XRAY_PER_CLASS = 15
XRAY_CLASSES = {0: "normal", 1: "pneumonia"}
#: BreastMNIST's labels (MedMNIST v2: 0 malignant, 1 normal or benign)
BREAST_CLASSES = {0: "malignant", 1: "benign_or_normal"}
#: the MedMNIST copies: set name -> (source key, file in that repository, file-name stem, classes)
MEDMNIST_SETS = {
    "xray_pneumonia": ("medmnist", "pneumoniamnist.npz", "pneumoniamnist", XRAY_CLASSES),
    "ultrasound_breast": ("breastmnist", "Datasets/BreastMNIST.npz", "breastmnist", BREAST_CLASSES),
}


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def blob(git_dir: Path, commit: str, path: str) -> bytes:
    return subprocess.run(["git", f"--git-dir={git_dir}", "show", f"{commit}:{path}"], check=True,
                          capture_output=True).stdout


def _nifti(data: bytes) -> nib.Nifti1Image:
    with tempfile.TemporaryDirectory() as tmp:
        p = Path(tmp) / "x.nii.gz"
        p.write_bytes(data)
        img = nib.load(str(p))
        return nib.Nifti1Image(np.asarray(img.dataobj), img.affine, img.header)


def _as_int(img: nib.Nifti1Image, dtype: type) -> bytes:
    """The image with its values stored as ``dtype``; refuses any value that would change."""
    data = np.asarray(img.dataobj)
    out = data.astype(dtype)
    if not np.array_equal(out.astype(np.float64), data.astype(np.float64)):
        raise ValueError(f"values would change as {np.dtype(dtype).name}")
    new = nib.Nifti1Image(out, img.affine)
    new.header.set_qform(img.affine, int(img.header["qform_code"]))
    new.header.set_sform(img.affine, int(img.header["sform_code"]))
    new.header.set_zooms(img.header.get_zooms()[:3])
    new.header.set_xyzt_units(*img.header.get_xyzt_units())
    with tempfile.TemporaryDirectory() as tmp:
        p = Path(tmp) / "x.nii"
        nib.save(new, str(p))
        raw = p.read_bytes()
    return gzip.compress(raw, compresslevel=9, mtime=0)


def _block2(img: nib.Nifti1Image, label: bool) -> nib.Nifti1Image:
    """The volume averaged over 2 x 2 blocks in-plane (an odd last row or column dropped), its affine adjusted
    so that each new voxel's centre is its block's centre; a label is kept where half the block or more is
    labelled."""
    data = np.asarray(img.dataobj, dtype=np.float64)
    x, y = data.shape[0] // 2 * 2, data.shape[1] // 2 * 2
    mean = data[:x, :y].reshape(x // 2, 2, y // 2, 2, -1).mean((1, 3))
    out = (mean >= 0.5).astype(np.uint8) if label else np.round(mean).astype(np.int16)
    affine = img.affine @ np.diag([2.0, 2.0, 1.0, 1.0])
    affine[:3, 3] = img.affine[:3, :3] @ np.array([0.5, 0.5, 0.0]) + img.affine[:3, 3]
    new = nib.Nifti1Image(out, affine)
    new.header.set_qform(affine, int(img.header["qform_code"]) or 1)
    new.header.set_sform(affine, int(img.header["sform_code"]) or 1)
    new.header.set_xyzt_units(*img.header.get_xyzt_units())
    return new


def build(sources: dict[str, Path], out: Path) -> dict:
    manifest: dict[str, dict] = {}

    def put(name: str, data: bytes, key: str, path: str, source: bytes) -> None:
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_bytes(data)
        repo, commit = COMMITS[key]
        manifest[name] = {"sha256": sha256(data), "source": f"github.com/{repo}@{commit}:{path}",
                          "source_sha256": sha256(source)}

    mirp, commit = sources["mirp"], COMMITS["mirp"][1]
    for n in (1, 2, 3):
        for modality, stem in (("CT", "ct"), ("MR_T1", "mr")):
            base = f"test/data/sts_images/STS_00{n}/{modality}/nifti"
            image = blob(mirp, commit, f"{base}/image/image.nii.gz")
            mask = blob(mirp, commit, f"{base}/mask/mask.nii.gz")
            put(f"sarcoma/sts{n}_{stem}.nii.gz", _as_int(_block2(_nifti(image), False), np.int16), "mirp",
                f"{base}/image/image.nii.gz", image)
            put(f"sarcoma/sts{n}_{stem}_label.nii.gz", _as_int(_block2(_nifti(mask), True), np.uint8), "mirp",
                f"{base}/mask/mask.nii.gz", mask)

    iva, commit = sources["ivadomed"], COMMITS["ivadomed"][1]
    image_path = "ct_scan/sub-spleen2/ct/sub-spleen2_ct.nii.gz"
    label_path = "ct_scan/derivatives/labels/sub-spleen2/ct/sub-spleen2_ct_seg-manual.nii.gz"
    image, label = blob(iva, commit, image_path), blob(iva, commit, label_path)
    put("spleen/ct.nii.gz", _as_int(_nifti(image), np.int16), "ivadomed", image_path, image)
    put("spleen/ct_label.nii.gz", label, "ivadomed", label_path, label)

    sct, commit = sources["sct"], COMMITS["sct"][1]
    for name, path in (("spine/t2.nii.gz", "t2/t2.nii.gz"), ("spine/t2_label.nii.gz", "t2/t2_seg-manual.nii.gz")):
        data = blob(sct, commit, path)
        put(name, data, "sct", path, data)

    for set_name, (key, npz_path, stem, classes) in MEDMNIST_SETS.items():
        npz = blob(sources[key], COMMITS[key][1], npz_path)
        arrays = np.load(io.BytesIO(npz))
        images, labels = arrays["test_images"], arrays["test_labels"].reshape(-1)
        for value, cls in classes.items():
            for i in np.flatnonzero(labels == value)[:XRAY_PER_CLASS]:
                buf = io.BytesIO()
                Image.fromarray(images[i].astype(np.uint8), mode="L").save(buf, format="PNG", optimize=True)
                put(f"classification/{set_name}/{cls}/{stem}_test{i:03d}.png", buf.getvalue(), key,
                    f"{npz_path}[test_images][{i}]", npz)
    return manifest


def _pixels(manifest: dict, root: Path, set_name: str) -> dict:
    """A MedMNIST set's PNG pixel digests, as `tests/test_real_sets.py` reads the 2D sets' manifests."""
    return {set_name: {
        name.split("/", 2)[2]: hashlib.sha256(np.asarray(Image.open(root / name)).tobytes()).hexdigest()
        for name in sorted(manifest) if name.startswith(f"classification/{set_name}/")}}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for key in COMMITS:
        ap.add_argument(f"--{key}", type=Path, required=True, help=f"bare git repository of {COMMITS[key][0]}")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    ap.add_argument("--check", action="store_true", help="compare with the committed manifest instead of writing it")
    args = ap.parse_args(argv)
    sources = {key: getattr(args, key) for key in COMMITS}
    path = args.out / "manifest_github.json"
    pixels_paths = {s: args.out / "classification" / f"manifest_{s}.json" for s in MEDMNIST_SETS}
    if args.check:  # rebuild elsewhere; compare the rebuild and the committed files with the manifests
        with tempfile.TemporaryDirectory() as tmp:
            manifest = build(sources, Path(tmp))
            pixels = {s: _pixels(manifest, Path(tmp), s) for s in MEDMNIST_SETS}
        old = json.loads(path.read_text())
        bad = sorted(k for k in set(old) | set(manifest) if old.get(k) != manifest.get(k))
        bad += sorted(k for k in old if not (args.out / k).is_file()
                      or sha256((args.out / k).read_bytes()) != old[k]["sha256"])
        bad += [str(p) for s, p in pixels_paths.items() if json.loads(p.read_text()) != pixels[s]]
        if bad:
            raise SystemExit(f"differs from {path}: {bad}")
        print(f"all {len(manifest)} files, rebuilt and committed, match {path}")
        return
    manifest = build(sources, args.out)
    path.write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    for s, p in pixels_paths.items():  # as `tests/test_real_sets.py` reads them
        p.write_text(json.dumps(_pixels(manifest, args.out, s), indent=1, sort_keys=True) + "\n")
    print(f"wrote {len(manifest)} files and {path}")


if __name__ == "__main__":
    main()
