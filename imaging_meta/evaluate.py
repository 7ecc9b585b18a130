"""``imaging-meta evaluate``: a checkpoint on fixed, seeded test episodes -> a report a paper can quote.

The data is rebuilt from the checkpoint itself (the datamodule's settings are stored in it at fit time), so
the test patients, organs and sites are the ones the model never trained on under its protocol
(``in_domain``, ``cross_organ`` or ``cross_site``). A data config given with ``--data-config`` may point at
moved files or another cache, but must keep the split: a different protocol, held-out set or split seed
would test on what the model trained on, and is refused.

For each number of shots, the test episodes are drawn once from the seed, saved to JSON in the run folder,
and every method (the trained learner; the learner at its initial weights; for segmentation, copying the
support mask) is scored on the very same episodes. Nothing random remains, so the same command on the same
checkpoint gives the same numbers to the last digit on a CPU. The report records the checkpoint's and the
episode files' SHA-256, the seed, the package versions and the git commit.
"""

from __future__ import annotations

import hashlib
import importlib
import logging
import os
import platform
import random
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

import imaging_meta
from imaging_meta.episode import Episode
from imaging_meta.evaluation import (
    COPY_MASK,
    TRAINED,
    UNTRAINED,
    PanelKeeper,
    classification_summary,
    segmentation_summary,
    write_evaluation_report,
)
from imaging_meta.learners.base import Learner, build_learner
from imaging_meta.metrics import dice_score, hausdorff95_mm
from imaging_meta.predict import CheckpointError, load_learner, read_checkpoint, resolve_device

logger = logging.getLogger(__name__)


#: datamodule settings that define who is in the test set: evaluation may not change them.
SPLIT_FIELDS = (
    "protocol", "test_organs", "val_organs", "test_sites", "exclude_test_organ_slices", "val_fraction",
    "test_fraction", "split_seed", "train_classes", "val_classes", "test_classes", "val_classes_count",
    "test_classes_count", "n_way",
)
PACKAGES = ("torch", "monai", "lightning", "numpy", "scipy", "pydicom", "nibabel", "torchmetrics", "highdicom")


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def provenance() -> dict:
    """Package versions, Python, platform and the git commit of the imaging-meta source (``+dirty`` when
    tracked files differ from it; ``unknown`` outside a git checkout)."""
    versions = {"imaging_meta": imaging_meta.__version__, "python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = importlib.import_module(name).__version__
        except Exception:  # a package that is not installed is recorded as such
            versions[name] = "not installed"
    src = Path(imaging_meta.__file__).resolve().parent.parent
    commit = "unknown"
    try:
        head = subprocess.run(["git", "-C", str(src), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        if head.returncode == 0:
            commit = head.stdout.strip()
            dirty = subprocess.run(["git", "-C", str(src), "diff", "--quiet", "HEAD", "--", "imaging_meta", "datamodules"],
                                   capture_output=True, timeout=10)
            commit += "+dirty" if dirty.returncode == 1 else ""
    except (OSError, subprocess.SubprocessError):
        pass
    return {"versions": versions, "git_commit": commit, "platform": platform.platform(terse=True)}


def data_config_from_checkpoint(ckpt: dict, path: str | os.PathLike) -> dict:
    """The ``{"class_path", "init_args"}`` of the data a checkpoint was trained on."""
    extra = ckpt.get("imaging_meta") or {}
    if "data" in extra:
        data = extra["data"]
        if "ClassificationDataModule" in data["class_path"] and "source" not in data.get("init_args", {}):
            raise CheckpointError(f"{path}: the checkpoint does not record its data source; pass the data config you "
                                  "trained with (--data-config configs/data/<name>.yaml)")
        return data
    hp = ckpt.get("datamodule_hyper_parameters") or {}
    if hp.get("_class_path") and "SegmentationDataModule" in hp["_class_path"]:  # checkpoints of earlier versions
        return {"class_path": hp["_class_path"], "init_args": {k: v for k, v in hp.items() if not k.startswith("_")}}
    raise CheckpointError(
        f"{path}: the checkpoint does not say which data it was trained on; pass the data config you trained with "
        "(--data-config configs/data/<name>.yaml)"
    )


def read_data_config(path: str | os.PathLike) -> dict:
    """The ``data`` section of a LightningCLI YAML config (``class_path`` and ``init_args``)."""
    import yaml

    p = Path(path)
    try:
        doc = yaml.safe_load(p.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ValueError(f"{p}: cannot read the data config ({e})") from e
    data = (doc or {}).get("data", doc)
    if not isinstance(data, dict) or "class_path" not in data:
        raise ValueError(f"{p}: no data.class_path in this config; give a file from configs/data/")
    return {"class_path": data["class_path"], "init_args": dict(data.get("init_args") or {})}


def check_same_split(trained: dict, given: dict, where: str) -> None:
    """Refuse a data config whose test split differs from the one the checkpoint was trained under."""
    a, b = trained.get("init_args", {}), given.get("init_args", {})
    diff = [f for f in SPLIT_FIELDS if f in a and f in b and _norm(a[f]) != _norm(b[f])]
    if trained.get("class_path") != given.get("class_path"):
        diff.insert(0, "class_path")
    if diff:
        detail = "; ".join(f"{f}: trained {a.get(f, trained.get(f))!r}, given {b.get(f, given.get(f))!r}" for f in diff)
        raise ValueError(
            f"{where}: this data config changes the split the checkpoint was trained under ({detail}). The test set "
            "would then hold patients, organs or sites the model trained on. Evaluate another protocol with a model "
            "fitted under it (`imaging-meta fit ... --data.init_args.protocol ...`)."
        )


def _with_defaults(config: dict) -> dict:
    """``config`` with the class's default for every ``__init__`` argument it leaves out (what it will run with)."""
    import inspect

    cls = _import_class(config["class_path"])
    args = dict(config.get("init_args") or {})
    for k, p in inspect.signature(cls.__init__).parameters.items():
        if k != "self" and k not in args and p.default is not inspect.Parameter.empty:
            args[k] = p.default
    return {"class_path": config["class_path"], "init_args": args}


def _import_class(class_path: str) -> type:
    module, _, name = str(class_path).rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"data class_path {class_path!r} cannot be imported: {e}") from e


def _norm(v):
    return [_norm(x) for x in v] if isinstance(v, (list, tuple)) else v


def build_datamodule(config: dict, overrides: dict):
    """Instantiate the datamodule (and a classification source given as a config dict)."""
    cls = _import_class(config["class_path"])
    args = dict(config.get("init_args") or {})
    for k, v in overrides.items():
        if v is not None:
            args[k] = v
    return cls(**args)


def _with_salt(source: dict, salt: str) -> dict:
    """A classification source config with ``salt`` set, when its class takes one."""
    import inspect

    cls = _import_class(source["class_path"])
    args = dict(source.get("init_args") or {})
    if "salt" in inspect.signature(cls.__init__).parameters:
        args["salt"] = salt
    return {"class_path": source["class_path"], "init_args": args}


def _seed_all(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def _untrained(extra: dict, device: torch.device) -> Learner | None:
    state = extra.get("untrained_state_dict")
    if not state:
        return None
    learner = build_learner(extra["learner_config"])
    learner.load_state_dict(state)
    return learner.to(device).eval()


def _segmentation_records(batch: Episode, preds: dict[str, torch.Tensor], shot: int, first: int, spacing) -> list[dict]:
    """One record per (method, query): Dice and HD95 (mm); the site is the query's own (each query slice
    comes from its own patient)."""
    t, q = batch.query_labels.shape[:2]
    truth = (batch.query_labels > 0.5).flatten(0, 1).cpu()
    out = []
    for method, pred in preds.items():
        p = pred.flatten(0, 1).cpu()
        dice = dice_score(p, truth).view(t, q)
        hd = hausdorff95_mm(p, truth, spacing).view(t, q)
        for i in range(t):
            for j in range(q):
                q_sites = (batch.meta[i] or {}).get("query_sites") if isinstance(batch.meta, list) else None
                out.append({"method": method, "episode": first + i, "shot": shot, "organ": batch.classes[i][0],
                            "site": str(q_sites[j] if q_sites else batch.site[i]), "query_id": batch.query_ids[i][j],
                            "dice": float(dice[i, j]), "hd95": float(hd[i, j])})
    return out


def _classification_records(batch: Episode, probs: dict[str, torch.Tensor], shot: int, first: int) -> list[dict]:
    """One record per (method, query): the class probabilities, the truth and the query's site."""
    out = []
    for method, p in probs.items():
        p = p.float().cpu()
        for i in range(p.shape[0]):
            q_sites = (batch.meta[i] or {}).get("query_sites") if isinstance(batch.meta, list) else None
            for j in range(p.shape[1]):
                site = str(q_sites[j]) if q_sites else str(batch.site[i])
                out.append({"method": method, "episode": first + i, "shot": shot, "classes": list(batch.classes[i]),
                            "label": int(batch.query_labels[i, j]), "probs": [float(v) for v in p[i, j]],
                            "site": site, "query_id": batch.query_ids[i][j]})
    return out


@torch.no_grad()
def run_shot(learner: Learner, untrained: Learner | None, dm, task: str, shot: int, device: torch.device,
             threshold: float, spacing, panels: PanelKeeper | None, seed: int) -> list[dict]:
    """Score every method on the datamodule's fixed test episodes; returns the per-query records."""
    _seed_all(seed)
    records: list[dict] = []
    first = 0
    for batch in dm.test_dataloader():
        batch = batch.to(device)
        probs = {TRAINED: learner.predict(batch)}
        if untrained is not None:
            probs[UNTRAINED] = untrained.predict(batch)
        for name, p in probs.items():
            if not torch.isfinite(p).all():
                raise FloatingPointError(f"{name}: non-finite predictions on test episodes {first}..{first + batch.n_tasks - 1}")
        if task == "segmentation":
            preds = {m: p > threshold for m, p in probs.items()}
            copy = (batch.support_labels.float().mean(1, keepdim=True) > 0.5).expand_as(batch.query_labels)
            preds[COPY_MASK] = copy
            recs = _segmentation_records(batch, preds, shot, first, spacing)
        else:
            recs = _classification_records(batch, probs, shot, first)
        records += recs
        if panels is not None:
            panels.offer(batch, probs[TRAINED], [r for r in recs if r["method"] == TRAINED], first)
        first += batch.n_tasks
    return records


def evaluate(
    checkpoint: str | os.PathLike,
    out_dir: str | os.PathLike,
    shots: Sequence[int] = (1, 5),
    episodes: int = 200,
    seed: int = 0,
    data_config: str | os.PathLike | None = None,
    data_root: str | None = None,
    cache_dir: str | None = None,
    batch_size: int | None = None,
    device: str = "auto",
    baselines: bool = True,
    n_panel: int = 3,
    threshold: float = 0.5,
    name: str | None = None,
    salt: str | None = None,
) -> tuple[Path, Path]:
    """Evaluate a checkpoint on fixed test episodes for each number of shots; write the report.

    Args:
        checkpoint: an ``imaging-meta fit`` checkpoint (read with ``weights_only=True``).
        out_dir: the run folder: ``results.json``, ``results.md``, PNG plots, the episode files.
        shots: support size(s) per class (segmentation: support slices) to evaluate.
        episodes: test episodes per number of shots.
        seed: the episode seed (the same seed draws the same episodes).
        data_config: a data YAML (``configs/data/...``) instead of the settings stored in the checkpoint; it
            must keep the checkpoint's split.
        data_root: the data folder, when it moved since training (segmentation ``root``).
        cache_dir: where the datamodule caches its index, volumes and episode files.
        batch_size: episodes per forward pass (default: the datamodule's).
        device: ``auto``, ``cpu`` or ``cuda``.
        baselines: also score the untrained learner and, for segmentation, copying the support mask.
        n_panel: best and worst episodes shown in the panel figure (0: none).
        threshold: foreground probability threshold of segmentation masks.
        name: the run's name in comparison tables (default: the output folder's name).
        salt: the secret of the pseudonymous ids used at fit (default: env ``IMAGING_META_SALT``, else the
            project default); a different one gives other ids, another split, and is refused.

    Returns:
        The paths of ``results.json`` and ``results.md``.
    """
    path = Path(checkpoint)
    dev = resolve_device(device)
    ckpt = read_checkpoint(path)
    learner, extra = load_learner(path, dev, ckpt)
    trained_data = data_config_from_checkpoint(ckpt, path)
    config = trained_data
    label_free = bool(extra.get("label_free"))
    if data_config is not None:
        config = read_data_config(data_config)
        if label_free:  # nothing labelled was seen: any labelled data may test it, if its scans were not trained on
            logger.warning("%s was trained self-supervised on scans without labels; make sure the scans of %s were "
                           "not among them", path, data_config)
        else:
            check_same_split(trained_data, _with_defaults(config), str(data_config))
    elif label_free:
        raise ValueError(f"{path} was trained on scans without any label map, so it has no test set; give labelled "
                         "scans to evaluate on with --data-config (e.g. configs/data/folder_segmentation.yaml)")
    task = extra.get("task", learner.task)
    untrained = _untrained(extra, dev) if baselines else None
    if not shots or min(shots) < 1:
        raise ValueError(f"shots must be positive integers, got {list(shots)}")
    if episodes < 1:
        raise ValueError(f"episodes must be >= 1, got {episodes}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    classification = "ClassificationDataModule" in str(config["class_path"])
    if data_root is not None and "root" not in config.get("init_args", {}):
        raise ValueError("--data-root moves a segmentation data folder; for classification data pass a --data-config "
                         "whose source points at the new files")
    salt = os.environ.get("IMAGING_META_SALT", "imaging-meta") if salt is None else salt
    if cache_dir is None and not config.get("init_args", {}).get("cache_dir"):
        cache_dir = str(out / "cache")  # the episode files are written there
    # every number of shots is set up before any is scored: an infeasible one fails at once
    dms = {}
    for k in sorted({int(s) for s in shots}):
        overrides = {"n_shot": k, "test_episodes": episodes, "val_episodes": 0, "episodes_per_epoch": 0,
                     "seed": seed, "test_episodes_file": None, "num_workers": 0, "cache_dir": cache_dir,
                     "batch_size": batch_size}
        if classification:
            overrides["source"] = _with_salt(config["init_args"]["source"], salt)
        else:
            overrides |= {"root": data_root, "salt": salt}
        dm = build_datamodule(config, overrides)
        dm.prepare_data()
        dm.setup("test")
        expected = None if label_free else extra.get("split_digest")
        if expected is not None and hasattr(dm, "split_digest") and dm.split_digest() != expected:
            raise ValueError(
                f"{path}: the data rebuilt for evaluation is not split as in training (split digest "
                f"{dm.split_digest()} != {expected}): other pseudonymous ids (a different salt: set IMAGING_META_SALT "
                "or --salt to the training one), other data under the root, or other split settings. The test set "
                "could hold patients, organs or classes the model trained on, so nothing was scored."
            )
        dms[k] = dm
    records, episode_files, describe = [], {}, {}
    panels = PanelKeeper(task, n_panel, threshold) if n_panel > 0 else None
    spacing = None
    for i, (k, dm) in enumerate(dms.items()):
        if task == "segmentation":
            spacing = [float(s) for s in dm.preprocessing["spacing"]]
        target = out / f"episodes-{k}shot.json"
        shutil.copyfile(dm.episode_files["test"], target)
        info = dm.describe()  # it reads the episode file's sha256
        episode_files[str(k)] = {"file": target.name, "sha256": info["episodes_sha256"]["test"],
                                 "n_episodes": len(dm._episodes["test"])}
        describe[str(k)] = {key: v for key, v in info.items() if key not in ("episode_files", "episodes_sha256")}
        records += run_shot(learner, untrained, dm, task, k, dev, threshold, spacing,
                            panels if i == 0 else None, seed)
        logger.info("%d-shot: %d test episodes scored", k, episode_files[str(k)]["n_episodes"])
    first = describe[next(iter(describe))]
    data_by_shot = {k: {x: d.get(x) for x in ("test_organs", "classes", "dropped_classes", "sites")} for k, d in describe.items()}
    context = {
        "name": name or out.resolve().name,
        "task": task,
        "protocol": first.get("protocol"),
        "learner": extra["learner_config"]["class_path"],
        "learner_config": extra["learner_config"],
        "checkpoint": path.name,
        "checkpoint_sha256": sha256_file(path),
        "seed": seed,
        "shots": sorted(int(k) for k in episode_files),
        "episodes_per_shot": episodes,
        "episode_files": episode_files,
        "threshold": threshold if task == "segmentation" else None,
        "pixel_spacing_mm": spacing,
        "data": first,
        "data_by_shot": data_by_shot,
        "device": dev.type,
        **provenance(),
    }
    if task == "segmentation":
        summary = segmentation_summary(records)
    else:
        summary = classification_summary(records, seed=seed)
    return write_evaluation_report(out, context, summary, records, panels)
