"""Few-shot classification of a user's images: a checkpoint, a support folder (one subfolder per class), queries.

Every image goes through the same preprocessing as in training (size, channels and CT window, read from
the checkpoint). Each query is classified in its own episode against the whole support set, so its
prediction does not depend on which other queries are passed with it (Conv-4 and ResNet-12 normalise with
the statistics of the episode they see).
"""

from __future__ import annotations

import csv
import logging
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch

from imaging_meta.episode import Episode, collate_episodes
from imaging_meta.predict import CheckpointError, load_learner, resolve_device

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".dcm", ".dicom")


def _image_files(folder: Path) -> list[Path]:
    """Image files under ``folder`` (recursively), sorted; DICOM files may have no suffix."""
    files = []
    for f in sorted(folder.rglob("*")):
        if not f.is_file() or f.name.startswith("."):
            continue
        if f.suffix.lower() in IMAGE_SUFFIXES or f.suffix == "":
            files.append(f)
    return files


def support_folder(root: str | os.PathLike) -> tuple[list[str], list[tuple[Path, int]]]:
    """Class names (sorted subfolder names) and (image, label) pairs of a support folder.

    Raises:
        ValueError: when the folder is missing, has fewer than two class subfolders, or a class has no image.
    """
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"{root}: the support must be a folder with one subfolder per class")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if len(classes) < 2:
        raise ValueError(f"{root}: found {len(classes)} class subfolder(s); a support set needs one subfolder per class, at least two")
    items = []
    for i, c in enumerate(classes):
        files = _image_files(root / c)
        if not files:
            raise ValueError(f"{root / c}: no PNG, JPEG or DICOM image in this class folder")
        items += [(f, i) for f in files]
    return classes, items


def query_files(paths: Sequence[str | os.PathLike]) -> list[Path]:
    """Image files of the ``--query`` arguments: files as given, folders expanded (recursively)."""
    out = []
    for p in map(Path, paths):
        if p.is_dir():
            found = _image_files(p)
            if not found:
                raise ValueError(f"{p}: no PNG, JPEG or DICOM image in this query folder")
            out += found
        elif p.is_file():
            out.append(p)
        else:
            raise ValueError(f"{p}: no such query file or folder")
    return out


def _loader_settings(extra: dict, learner) -> dict:
    """``load_image`` settings from the checkpoint's preprocessing section."""
    pre = dict(extra.get("preprocessing") or {})
    size = pre.get("image_size") or pre.get("patch_size")
    if size is None:
        raise CheckpointError("the checkpoint has no image size in its preprocessing; it was not trained on classification data")
    if len(size) != 2:
        raise CheckpointError(
            f"the checkpoint was trained on {len(size)}D patches of size {list(size)}; classify takes 2D images "
            "(PNG, JPEG or single-frame DICOM)"
        )
    channels = pre.get("channels") or learner.config["init_args"].get("in_channels", 1)
    return {"image_size": [int(s) for s in size], "channels": int(channels), "ct_window": pre.get("ct_window", [-250.0, 250.0])}


def classify(
    checkpoint: str | os.PathLike,
    support: str | os.PathLike,
    queries: Sequence[str | os.PathLike],
    out_csv: str | os.PathLike,
    device: str = "auto",
    batch_size: int = 32,
) -> Path:
    """Classify query images against a support folder and write one CSV row per query.

    Args:
        checkpoint: an ``imaging-meta fit`` checkpoint of a classification learner.
        support: folder with one subfolder per class, each holding a few images (PNG, JPEG, DICOM).
        queries: image files and/or folders of images.
        out_csv: the CSV to write: ``path``, ``predicted_class`` and one ``p_<class>`` column per class.
        device: ``auto``, ``cpu`` or ``cuda``.
        batch_size: queries per forward pass (each still in its own episode).

    Returns:
        The path of the CSV.
    """
    from datamodules.image_folder import load_image

    dev = resolve_device(device)
    learner, extra = load_learner(checkpoint, dev)
    if extra.get("task", learner.task) != "classification":
        raise CheckpointError(f"{checkpoint}: a {extra.get('task')} checkpoint; classify needs a classification learner")
    settings = _loader_settings(extra, learner)
    classes, items = support_folder(support)
    n_way = getattr(learner, "n_way", None)
    if n_way is not None and n_way != len(classes):
        raise ValueError(
            f"{support}: {len(classes)} classes ({', '.join(classes)}), but the checkpoint's "
            f"{type(learner).__name__} was meta-trained {n_way}-way and has a {n_way}-way head; give {n_way} class folders"
        )
    counts = torch.bincount(torch.tensor([y for _, y in items]), minlength=len(classes))
    if counts.min() != counts.max():
        logger.info("support classes have different numbers of images: %s", dict(zip(classes, counts.tolist(), strict=True)))
    s_images = torch.stack([load_image(f, **settings) for f, _ in items])
    s_labels = torch.tensor([y for _, y in items], dtype=torch.long)
    qs = query_files(queries)
    rows = []
    for start in range(0, len(qs), batch_size):
        chunk = qs[start : start + batch_size]
        eps = [
            Episode(
                support_images=s_images,
                support_labels=s_labels,
                query_images=load_image(q, **settings).unsqueeze(0),
                query_labels=torch.zeros(1, dtype=torch.long),
                classes=list(classes),
                site="",
                support_ids=[f"support{i}" for i in range(len(items))],
                query_ids=[f"query{start + j}"],
            )
            for j, q in enumerate(chunk)
        ]
        batch = collate_episodes(eps).to(dev)
        with torch.no_grad():
            probs = learner.predict(batch)[:, 0].float().cpu()  # (T, n_way)
        if not torch.isfinite(probs).all():
            raise FloatingPointError(f"non-finite class probabilities for queries {[str(q) for q in chunk]}")
        for q, p in zip(chunk, probs, strict=True):
            rows.append([str(q), classes[int(p.argmax())], *[f"{float(v):.6f}" for v in p]])
    out = Path(out_csv)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", dir=out.parent)
    with os.fdopen(fd, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "predicted_class", *[f"p_{c}" for c in classes]])
        w.writerows(rows)
    os.replace(tmp, out)
    return out
