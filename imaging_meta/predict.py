"""Few-shot segmentation of a user's structure: a checkpoint, a few labelled support scans, query scans.

Every volume goes through the same deterministic preprocessing as in training (read from the checkpoint).
Support slices are taken where the support mask is present; each axial query slice is segmented against
the support; the predicted mask is mapped back through the inverse of the preprocessing, so the NIfTI
that is written has the query's own shape and affine.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from datamodules.dicom import is_nifti, nifti_stem
from datamodules.transforms import volume_transforms
from imaging_meta.episode import Episode
from imaging_meta.learners.base import Learner, build_learner

logger = logging.getLogger(__name__)


class CheckpointError(ValueError):
    """A checkpoint that cannot be used here (unreadable, or from a different kind of learner)."""


def load_learner(checkpoint: str | Path, device: str | torch.device = "cpu") -> tuple[Learner, dict]:
    """Rebuild the trained learner of an ``imaging-meta fit`` checkpoint, without executing pickled code.

    Returns:
        The learner (eval mode, on ``device``) and the checkpoint's ``imaging_meta`` section
        (``learner_config``, ``preprocessing``, ``task``).
    """
    path = Path(checkpoint)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such checkpoint file") from None
    except Exception as e:  # any unpickling failure: report the file and the cause
        raise CheckpointError(f"{path}: not a readable imaging-meta checkpoint ({type(e).__name__}: {e})") from e
    extra = ckpt.get("imaging_meta") if isinstance(ckpt, dict) else None
    if not extra or "learner_config" not in extra or "state_dict" not in ckpt:
        raise CheckpointError(f"{path}: not an imaging-meta checkpoint (no learner config); use a checkpoint from `imaging-meta fit`")
    learner = build_learner(extra["learner_config"])
    state = {k[len("learner."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("learner.")}
    try:
        learner.load_state_dict(state)
    except RuntimeError as e:
        raise CheckpointError(f"{path}: weights do not fit {extra['learner_config']['class_path']}: {e}") from e
    return learner.to(device).eval(), extra


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` is the GPU when there is one, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def image_source(path: str | Path) -> str:
    """A NIfTI path or a DICOM series folder (the DICOM reader groups, checks and orders the folder's slices)."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p}: no such file or folder")
    return str(p)


def modality_of(path: str | Path, given: str | None = None) -> str:
    """CT or MR: ``given``, else the DICOM Modality or the BIDS sidecar's, else an error that says what to pass."""
    if given:
        return given.upper()
    p = Path(path)
    if p.is_dir():
        import pydicom

        first = next((f for f in sorted(p.iterdir()) if f.is_file()), None)
        if first is not None:
            try:
                return str(pydicom.dcmread(first, stop_before_pixels=True).Modality)
            except Exception as e:
                raise ValueError(f"{first}: cannot read the DICOM Modality ({e}); pass --modality") from e
    stem = nifti_stem(p.name) if is_nifti(p.name) else p.stem
    sidecar = p.with_name(stem + ".json")
    if sidecar.exists():
        mod = json.loads(sidecar.read_text()).get("Modality")
        if mod:
            return "MR" if str(mod).upper() in ("MR", "MRI") else str(mod).upper()
    raise ValueError(f"{p}: cannot tell CT from MR (no DICOM header or sidecar 'Modality'); pass --modality CT or MR")


def _support_slices(mask: torch.Tensor, max_slices: int, min_pixels: int = 1) -> list[int]:
    """Axial slices of ``mask`` (H, W, D) that show the structure, evenly spread, at most ``max_slices``."""
    counts = mask.flatten(0, 1).sum(0)
    zs = torch.nonzero(counts >= min_pixels).flatten().tolist()
    if len(zs) > max_slices:
        zs = [zs[int(round(i))] for i in np.linspace(0, len(zs) - 1, max_slices)]
    return zs


def _largest_component(mask: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    labels, n = ndimage.label(mask)
    if n <= 1:
        return mask
    sizes = ndimage.sum(mask, labels, index=range(1, n + 1))
    return labels == (int(np.argmax(sizes)) + 1)


@torch.no_grad()
def segment(
    checkpoint: str | Path,
    supports: Sequence[tuple[str | Path, str | Path]],
    queries: Sequence[str | Path],
    out_dir: str | Path,
    label_value: int | None = None,
    modality: str | None = None,
    max_support_slices: int = 12,
    largest_component: bool = True,
    device: str = "auto",
    query_chunk: int = 16,
) -> list[Path]:
    """Segment ``queries`` with the structure labelled in ``supports``.

    Args:
        checkpoint: a checkpoint from ``imaging-meta fit``.
        supports: (image, label map) pairs; images are NIfTI files or DICOM series folders.
        queries: NIfTI files or DICOM series folders.
        out_dir: folder for ``<query name>.nii.gz`` masks.
        label_value: the structure's value in the label maps (default: every non-zero voxel).
        modality: CT or MR when the files do not say.
        max_support_slices: slices taken from each support scan (spread over the structure).
        largest_component: keep only the largest 3D connected component of each mask.
        device: "auto", "cpu" or "cuda".
        query_chunk: query slices per forward pass.

    Returns:
        The written mask files, one per query.
    """
    from monai.transforms import Compose, Invertd

    dev = resolve_device(device)
    learner, extra = load_learner(checkpoint, dev)
    if extra.get("task", "segmentation") != "segmentation":
        raise CheckpointError(f"{checkpoint}: a {extra.get('task')} checkpoint cannot segment; use `imaging-meta classify`")
    pre = extra.get("preprocessing")
    if not pre:
        raise CheckpointError(f"{checkpoint}: no preprocessing settings stored; re-save it with this version of imaging-meta")
    tf_pair = volume_transforms(pre["spacing"], pre["slice_size"], pre["ct_window"], pre["mr_percentiles"])
    tf_image = volume_transforms(pre["spacing"], pre["slice_size"], pre["ct_window"], pre["mr_percentiles"], keys=("image",))

    # support: slices where the structure is present
    s_images, s_masks = [], []
    for image, label in supports:
        d = tf_pair({"image": image_source(image), "label": str(label), "modality": modality_of(image, modality)})
        lbl = d["label"][0]
        mask = (lbl > 0) if label_value is None else (lbl == label_value)
        zs = _support_slices(mask, max_support_slices)
        if not zs:
            what = "any non-zero voxel" if label_value is None else f"value {label_value}"
            raise ValueError(f"{label}: the label map has no {what} after preprocessing; check --label-value")
        s_images += [d["image"].as_tensor()[..., z] for z in zs]
        s_masks += [mask.as_tensor()[..., z].float() for z in zs]
    support_images = torch.stack(s_images).unsqueeze(0).to(dev)  # (1, K, 1, H, W)
    support_labels = torch.stack(s_masks).unsqueeze(0).to(dev)  # (1, K, H, W)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for query in queries:
        q = Path(query)
        data = tf_image({"image": image_source(q), "modality": modality_of(q, modality)})
        vol = data["image"]  # (1, H, W, D) MetaTensor
        probs = torch.zeros(vol.shape, dtype=torch.float32)
        depth = vol.shape[-1]
        for start in range(0, depth, query_chunk):
            zs = list(range(start, min(depth, start + query_chunk)))
            qi = torch.stack([vol.as_tensor()[..., z] for z in zs]).unsqueeze(0).to(dev)  # (1, Q, 1, H, W)
            ep = Episode(support_images, support_labels, qi, torch.zeros(qi.shape[:2] + qi.shape[-2:], device=dev), batched=True)
            p = learner.predict(ep)[0].float().cpu()  # (Q, H, W)
            for j, z in enumerate(zs):
                probs[0, ..., z] = p[j]
        pred = vol.clone()
        pred.set_array((probs > 0.5).float())
        data["pred"] = pred
        inv = Invertd("pred", transform=Compose(tf_image.transforms), orig_keys="image", nearest_interp=True)(data)
        mask = inv["pred"][0].cpu().numpy() > 0.5
        if largest_component and mask.any():
            mask = _largest_component(mask)
        name = q.name if q.is_dir() else (nifti_stem(q.name) if is_nifti(q.name) else q.stem)
        if q.is_dir():
            affine = np.asarray(inv["pred"].affine, dtype=np.float64)
        else:
            header = nib.load(str(q))
            affine = header.affine
            if mask.shape != header.shape[:3]:
                raise RuntimeError(f"{q}: inverted mask shape {mask.shape} differs from the image {header.shape}")
        target = out / f"{name}.nii.gz"
        nib.save(nib.Nifti1Image(mask.astype(np.uint8), affine), str(target))
        logger.info("%s: %d foreground voxels -> %s", q.name, int(mask.sum()), target)
        written.append(target)
    return written
