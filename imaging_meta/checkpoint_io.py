"""`AtomicCheckpointIO`: a checkpoint file is either complete or absent, never half-written.

Lightning writes a local checkpoint through an fsspec transaction whose temporary file lies in the system's
temporary folder; committing it is a move, which becomes a copy when the run folder is on another filesystem
(a cluster's shared disk). A run killed during that copy leaves a truncated ``last.ckpt`` that the next
``fit --ckpt_path last`` would try to trust. Here the bytes go to a temporary file beside the target, are
flushed to disk, and only then take the target's name with ``os.replace``, which is atomic on one
filesystem. Remote URLs (``s3://`` ...) keep Lightning's own writer.

`imaging-meta fit` uses it by default (``trainer.plugins``); any ``plugins`` in a config replace it.

Reading is here too: `read_checkpoint` (``weights_only=True``, no pickled code runs) and `load_learner`. A
checkpoint written before the packages were split into subpackages names its learner, datamodule and item
source by their old flat class paths; `LEGACY_CLASS_PATHS` maps them to the current ones when it is read.
A learner on a pretrained ``resnet`` backbone is rebuilt without reading its ``weights`` file or URL again
(`offline_learner_config`): the checkpoint holds the weights, and the file may be absent where it is loaded.
A checkpoint's data settings that predate an argument whose default changed the split get the value that
rebuilds the old split (`LEGACY_DATA_ARGS`), so ``evaluate`` tests it on the split it was trained under.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

import imaging_meta
from datamodules.io.atomic import atomic_open
from imaging_meta.learners.base import Learner, build_learner, keep_channels_last_on_cpu
from imaging_meta.pretrained import refused_global, without_torch_advice, without_weights

#: class paths of checkpoints written before the subpackages (imaging-meta 0.1.0, main up to 544d8f2)
LEGACY_CLASS_PATHS = {
    **{f"imaging_meta.learners.{name}.{cls}": f"imaging_meta.learners.{family}.{name}.{cls}" for family, name, cls in (
        ("gradient", "maml", "MAML"), ("gradient", "meta_sgd", "MetaSGD"), ("gradient", "anil", "ANIL"),
        ("gradient", "reptile", "Reptile"), ("gradient", "meta_lstm", "MetaLSTM"),
        ("metric", "protonet", "PrototypicalNetwork"), ("metric", "protonet_seg", "PrototypicalSegmenter"),
        ("metric", "siamese", "SiameseNetwork"), ("metric", "matching", "MatchingNetwork"), ("memory", "mann", "MANN"),
        ("transfer", "finetune", "FineTune"), ("transfer", "logreg", "LogisticRegressionProbe"))},
    "datamodules.image_folder.ImageFolder": "datamodules.sources.image_folder.ImageFolder",
    "datamodules.lesion_csv.LesionCSV": "datamodules.sources.lesion_csv.LesionCSV",
    "datamodules.medmnist.MedMNIST": "datamodules.sources.medmnist.MedMNIST",
}


#: datamodule or learner class path -> arguments that a checkpoint without them was trained with: their value
#: then was the old behaviour, which today's default no longer gives. ``val_organ_count`` (issue 14): cross_organ
#: used to validate on the test organs; 0 does so (`datamodules.indexing.splits`). ``centre`` and ``balanced``
#: (2026-12-06): `SupportFineTune`'s cosine head saw uncentred features and its loss weighted every image alike.
LEGACY_DATA_ARGS: dict[str, dict[str, Any]] = {
    "datamodules.segmentation.SegmentationDataModule": {"val_organ_count": 0},
    "imaging_meta.learners.transfer.support_finetune.SupportFineTune": {"centre": False, "balanced": False},
}


def current_class_path(class_path: str) -> str:
    """The class path of today's code for a class path that an older checkpoint recorded."""
    return LEGACY_CLASS_PATHS.get(class_path, class_path)


def modernize(config: Any) -> Any:
    """``config`` with every ``class_path`` (nested ones too) mapped by `current_class_path`, and the
    ``init_args`` it leaves out filled in from `LEGACY_DATA_ARGS`."""
    if isinstance(config, dict):
        out = {k: modernize(v) for k, v in config.items()}
        if isinstance(out.get("class_path"), str):
            out["class_path"] = current_class_path(out["class_path"])
            if isinstance(out.get("init_args"), dict):
                out["init_args"] = {**LEGACY_DATA_ARGS.get(out["class_path"], {}), **out["init_args"]}
        return out
    if isinstance(config, list):
        return [modernize(v) for v in config]
    return config


def offline_learner_config(config: dict) -> dict:
    """A learner config that builds the same network without reading pretrained weights: for a learner whose
    ``backbone`` is ``resnet``, its ``backbone_kwargs`` pass through `imaging_meta.pretrained.without_weights`
    (``weights`` becomes None; ``freeze_bn`` / ``imagenet_norm`` keep what the weights made them). Any other
    config is returned unchanged; a wrapped learner's (``init_args.embedding``, a `WrappingLearner`) is made
    offline the same way. For rebuilding a learner whose weights come from a checkpoint."""
    init = config.get("init_args") if isinstance(config, dict) else None
    if not isinstance(init, dict):
        return config
    if isinstance(init.get("embedding"), dict):
        init = {**init, "embedding": offline_learner_config(init["embedding"])}
    if init.get("backbone") == "resnet":
        init = {**init, "backbone_kwargs": without_weights(init.get("backbone_kwargs") or {})}
    return {**config, "init_args": init}


class AtomicCheckpointIO(TorchCheckpointIO):
    """`TorchCheckpointIO` that writes local checkpoints to a temporary file in the same folder, then renames it."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if "://" in str(path) or storage_options is not None:
            return super().save_checkpoint(checkpoint, path, storage_options)
        with atomic_open(path, "wb") as f:
            torch.save(checkpoint, f)


class CheckpointError(ValueError):
    """A checkpoint that cannot be used here (unreadable, or from a different kind of learner)."""


def _cut_zip(path: Path) -> bool:
    """Whether ``path`` starts as a zip archive but has no end record, which `zipfile.is_zipfile` looks for: an
    interrupted copy or save of a checkpoint (a review: it was called "not a PyTorch checkpoint file")."""
    with open(path, "rb") as f:
        return f.read(4) == b"PK\x03\x04" and not zipfile.is_zipfile(path)


def _torch_file(path: Path) -> bool:
    """Whether ``path`` is in one of the formats ``torch.save`` writes: a zip archive (whole or cut short), or
    (legacy) a pickle."""
    with open(path, "rb") as f:
        start = f.read(1)
    return zipfile.is_zipfile(path) or start == b"\x80" or _cut_zip(path)


def _damaged_member(path: Path) -> str | None:
    """The first member of a zip checkpoint whose CRC-32 does not match its bytes, else None (torch's reader does
    not check them: a checkpoint with flipped bytes inside a weight tensor loaded, and segmented nothing; a review).
    Reads the file once more (tens of MB for the shipped learners)."""
    if not zipfile.is_zipfile(path):
        return None
    try:
        with zipfile.ZipFile(path) as z:
            return z.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        return f"its archive ({type(e).__name__}: {e})"


def read_checkpoint(checkpoint: str | Path) -> dict:
    """The content of a checkpoint file, read with ``weights_only=True``: no pickled code runs."""
    path = Path(checkpoint)
    try:
        content = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such checkpoint file") from None
    except Exception as e:  # any unpickling failure: report the file and the cause
        if path.is_file() and not _torch_file(path):  # a PNG or a text renamed .ckpt: torch's hint is about pickles
            raise CheckpointError(f"{path}: not a PyTorch checkpoint file (neither torch's zip format nor a pickle); "
                                  "give a checkpoint written by imaging-meta fit") from None
        named = refused_global(str(e))
        if "Weights only load failed" in str(e) and named:  # an object refused, not a damaged
            # file (torch says "Weights only load failed" for both); its text goes on to suggest weights_only=False
            raise CheckpointError(
                f"{path}: holds Python objects besides tensors and plain values, which imaging-meta fit never writes; "
                "torch refused to unpickle them (weights_only=True), so none of its code ran. Do not load a file of "
                f"unknown source with weights_only=False (it names {named})") from None
        damaged = _damaged_member(path)
        if damaged is not None:  # bytes changed inside the pickle itself
            raise CheckpointError(f"{path}: damaged: {damaged} does not match its checksum; copy it again") from None
        if _cut_zip(path):
            raise CheckpointError(f"{path}: truncated or damaged (a zip archive without its end: an interrupted copy "
                                  "or save?); copy it again") from None
        raise CheckpointError(f"{path}: not a readable imaging-meta checkpoint ({type(e).__name__}: "
                              f"{without_torch_advice(str(e))}); copy it again, or give a checkpoint written by imaging-meta "
                              "fit") from e
    damaged = _damaged_member(path)
    if damaged is not None:
        raise CheckpointError(f"{path}: damaged: {damaged} does not match its checksum (bytes changed after it was "
                              "written); copy it again from where it was trained")
    if isinstance(content, dict) and isinstance(content.get("imaging_meta"), dict):
        content["imaging_meta"] = modernize(content["imaging_meta"])
    hp = content.get("datamodule_hyper_parameters") if isinstance(content, dict) else None
    if isinstance(hp, dict) and isinstance(hp.get("_class_path"), str):  # what the oldest checkpoints record
        hp["_class_path"] = current_class_path(hp["_class_path"])
        content["datamodule_hyper_parameters"] = {**LEGACY_DATA_ARGS.get(hp["_class_path"], {}), **hp}
    return content


#: the hyperparameters `EpisodicModule` saves (its learner and optimiser are kept out of them), with their types;
#: Lightning adds ``_instantiator`` (a string it drops again)
CHECKPOINT_HPARAMS: dict[str, tuple[type, ...]] = {
    "baselines": (bool,), "threshold": (int, float), "n_log_images": (int,), "weight_averaging": (int, float, type(None)),
}


def plain_hyperparameters(hparams: Any, path: str | Path) -> dict:
    """A checkpoint's ``hyper_parameters``, only those `EpisodicModule` saves, each of its type
    (`CHECKPOINT_HPARAMS`), without Lightning's ``_instantiator``.

    LightningCLI merges a checkpoint's hyperparameters into the run's configuration for ``fit``/``test``/``validate
    --ckpt_path``, where a ``class_path``, given as a mapping or as a string of YAML, is imported, built and called:
    a checkpoint that set its scheduler to ``os.system`` ran a shell command, although no pickled code is ever
    loaded (a review). A checkpoint is data: any other setting is refused, and the caller merges these itself.

    Raises:
        CheckpointError: hyperparameters that are not a mapping, or hold another key or a value of another type.
    """
    if not isinstance(hparams, dict):
        raise CheckpointError(f"{path}: its hyper_parameters are a {type(hparams).__name__}, not a mapping of "
                              "settings; give a checkpoint written by imaging-meta fit")
    settings = {k: v for k, v in hparams.items() if k != "_instantiator"}
    bad = sorted(k for k, v in settings.items() if k not in CHECKPOINT_HPARAMS
                 or not isinstance(v, CHECKPOINT_HPARAMS[k])
                 or (isinstance(v, bool) and bool not in CHECKPOINT_HPARAMS[k]))
    if bad:
        raise CheckpointError(f"{path}: its hyper_parameters hold {', '.join(map(repr, bad))}, which imaging-meta fit "
                              f"never writes so (it writes {', '.join(CHECKPOINT_HPARAMS)}, each a plain value): other "
                              "settings would be built and run (a class_path); a checkpoint from an unknown source "
                              "is refused")
    return settings


def split_mismatch(extra: dict, datamodule: Any) -> tuple[str, str] | None:
    """(the datamodule's split digest, the checkpoint's) when they differ: its test or validation set could then
    hold patients, organs or classes the model trained on. None when they agree, or when the checkpoint's training
    read no label (``label_free``: no split to protect) or predates split digests. ``extra`` is a checkpoint's
    ``imaging_meta`` section; ``datamodule`` has been set up."""
    expected = None if extra.get("label_free") else extra.get("split_digest")
    if expected is None:
        return None
    digest = datamodule.split_digest()
    return None if digest == expected else (digest, expected)


def structure_mismatch(extra: dict, datamodule: Any) -> str | None:
    """What differs when the datamodule's label maps name their structures unlike the checkpoint's training data
    (``structure_digest``: which label value is which structure in each scan), e.g. ``spleen: label values [2] in
    training, [1] here``; None when they agree, or when the checkpoint predates the digest, read no label, or the
    data has no label maps. ``datamodule`` has been set up."""
    expected = None if extra.get("label_free") else extra.get("structure_digest")
    now = datamodule.structure_digest() if expected is not None else None
    if now is None or now == expected:
        return None
    before, after = extra.get("structure_values") or {}, datamodule.structure_values() or {}
    changed = [f"{name}: label values {before.get(name, 'none')} in training, {after.get(name, 'none')} here"
               for name in sorted(set(before) | set(after)) if before.get(name) != after.get(name)]
    return "; ".join(changed) if changed else "the same values per structure, but in other scans"


def load_learner(checkpoint: str | os.PathLike, device: str | torch.device = "cpu", ckpt: dict | None = None) -> tuple[Learner, dict]:
    """Rebuild the trained learner of an ``imaging-meta fit`` checkpoint, without executing pickled code.

    Args:
        checkpoint: the checkpoint file (named in errors).
        device: where the learner goes.
        ckpt: its content, when the caller has already read it with `read_checkpoint`.

    Returns:
        The learner (eval mode, on ``device``) and the checkpoint's ``imaging_meta`` section
        (``learner_config``, ``preprocessing``, ``task``).
    """
    path = Path(checkpoint)
    ckpt = read_checkpoint(path) if ckpt is None else ckpt
    extra = ckpt.get("imaging_meta") if isinstance(ckpt, dict) else None
    if not extra or "learner_config" not in extra or "state_dict" not in ckpt:
        raise CheckpointError(f"{path}: not an imaging-meta checkpoint (no learner config); use a checkpoint from `imaging-meta fit`")
    try:  # the weights are in the checkpoint
        learner = build_learner(offline_learner_config(extra["learner_config"]))
    except (ImportError, AttributeError, TypeError, ValueError) as e:  # a class or argument this version lacks
        recorded = extra["learner_config"].get("class_path") if isinstance(extra["learner_config"], dict) else None
        raise CheckpointError(
            f"{path}: its learner {recorded!r} cannot be built by this version of imaging-meta ("
            f"{imaging_meta.__version__}; the checkpoint was written by {extra.get('version', 'an unknown version')}): "
            f"{type(e).__name__}: {e}; retrain it, or use the version that wrote it") from e
    state = {k[len("learner."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("learner.")}
    # weights that are not finite predict nothing: segment wrote empty masks from them and exited 0 (a review)
    broken = [k for k, v in state.items() if torch.is_tensor(v) and v.is_floating_point() and not torch.isfinite(v).all()]
    if broken:
        raise CheckpointError(f"{path}: {len(broken)} weight tensor(s) hold NaN or infinite values (e.g. {broken[0]}): "
                              "the training that wrote it diverged; use an earlier checkpoint, or train again")
    try:
        learner.load_state_dict(state)
    except RuntimeError as e:
        raise CheckpointError(f"{path}: weights do not fit {extra['learner_config']['class_path']}: {e}") from e
    learner = learner.to(device).eval()
    keep_channels_last_on_cpu(learner, device)
    return learner, extra


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` is the GPU when there is one, else the CPU.

    Raises:
        ValueError: a name that is no device, or a CUDA device this machine or this torch does not have (named
            as the ``--device`` option, before any work).
    """
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"--device {device!r} is not a device: give auto, cpu, cuda or cuda:N") from None
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {device}: imaging-meta runs on cpu or cuda; give auto, cpu, cuda or cuda:N")
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"--device {device}: this torch sees no CUDA GPU (torch {torch.__version__}, CUDA "
                             f"{torch.version.cuda or 'not compiled in'}); give --device cpu or auto")
        if dev.index is not None and dev.index >= count:
            raise ValueError(f"--device {device}: this machine has {count} CUDA GPU(s), numbered from 0")
    return dev
