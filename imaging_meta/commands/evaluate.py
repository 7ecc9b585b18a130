"""``imaging-meta evaluate``: a checkpoint on fixed, seeded test episodes -> a report a paper can quote.

The data is rebuilt from the checkpoint itself (the datamodule's settings are stored in it at fit time), so
the test patients, organs and sites are the ones the model never trained on under its protocol
(``in_domain``, ``cross_organ`` or ``cross_site``). A data config given with ``--data-config`` may point at
moved files or another cache, but must keep the split: a different protocol, held-out set or split seed
would test on what the model trained on, and is refused.

For each number of shots, the test episodes are drawn once from the seed, saved to JSON in the run folder,
and every method (the trained learner; the learner at its initial weights; the task's label-only baselines,
for segmentation copying the support mask) is scored on the very same episodes, by the scoring path of
``imaging-meta test`` (`imaging_meta.evaluation.scoring.score_batch`). Nothing random remains, so the same command on the same
checkpoint gives the same numbers to the last digit on a CPU. The report records the checkpoint's and the
episode files' SHA-256, the seed, the package versions and the git commit.

Given a ``log_dir`` (a TensorBoard folder, such as the training run's ``runs/<name>/version_N``), the report's
figures are also written there as TensorBoard images (``evaluate/<figure file name>``) and its Markdown as text
(``evaluate/results``, and ``evaluate/scans`` for the whole-scan protocols), at the checkpoint's training step.
The run folder itself holds no event file: the same command gives the same bytes.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from datamodules.base import EpisodicDataModule
from datamodules.indexing.splits import SPLIT_RULE_CHANGES
from datamodules.io.atomic import atomic_write_bytes
from datamodules.progress import progress
from imaging_meta.checkpoint_io import (
    CheckpointError,
    load_learner,
    read_checkpoint,
    resolve_device,
    split_mismatch,
    structure_mismatch,
)
from imaging_meta.commands.console import SEED_LIMIT
from imaging_meta.commands.outputs import check_output_folder
from imaging_meta.evaluation.methods import TRAINED, UNTRAINED, reference_classifiers, restore_untrained
from imaging_meta.evaluation.panels import png_array
from imaging_meta.evaluation.plots import PanelKeeper
from imaging_meta.evaluation.provenance import provenance
from imaging_meta.evaluation.reports import write_evaluation_report
from imaging_meta.evaluation.scoring import learner_choices, score_batch
from imaging_meta.evaluation.statistics import (
    DEFAULT_INTERVAL,
    N_BOOT,
    check_interval,
    evaluation_summary,
    interval_description,
)
from imaging_meta.learners.base import Learner
from imaging_meta.module import changes_record, changes_text, preprocessing_changes
from imaging_meta.pretrained import sha256_file
from imaging_meta.tasks import CLASSIFICATION, Task, get_task

logger = logging.getLogger(__name__)


#: datamodule settings that define who is in the test set: evaluation may not change them.
SPLIT_FIELDS = (
    "protocol", "test_organs", "val_organs", "val_organ_count", "test_sites", "exclude_test_organ_slices",
    "val_fraction", "test_fraction", "split_seed", "train_classes", "val_classes", "test_classes", "val_classes_count",
    "test_classes_count", "n_way", "folds_file", "test_fold", "patient_regex", "organs", "min_organ_pixels",
    "spacing", "slice_size",
)
def data_config_from_checkpoint(ckpt: dict, path: str | os.PathLike) -> dict:
    """The ``{"class_path", "init_args"}`` of the data a checkpoint was trained on.

    Raises:
        CheckpointError: the checkpoint does not record its data, or leaves out an argument its datamodule
            needs (the item source of a user's source class that does not keep its arguments).
    """
    data = (ckpt.get("imaging_meta") or {}).get("data")
    hp = ckpt.get("datamodule_hyper_parameters") or {}
    if data is None and hp.get("_class_path"):  # checkpoints of earlier versions: the datamodule's hyperparameters
        data = {"class_path": hp["_class_path"], "init_args": {k: v for k, v in hp.items() if not k.startswith("_")}}
    if data is None:
        raise CheckpointError(f"{path}: the checkpoint does not say which data it was trained on; pass the data config "
                              "you trained with (--data-config configs/data/<name>.yaml)")
    if foreign_classes(data):  # not imported (see `checkpoint_data`): the arguments it needs are not known
        return data
    missing = _required_arguments(data["class_path"]) - set(data.get("init_args") or {})
    if missing:
        raise CheckpointError(f"{path}: the checkpoint does not record its data {', '.join(sorted(missing))}; pass the "
                              "data config you trained with (--data-config configs/data/<name>.yaml)")
    return data


def foreign_classes(data: Any) -> list[str]:
    """The class paths anywhere in a data config (the datamodule's, its item source's, ...) that are not of the
    ``datamodules`` package."""
    if isinstance(data, dict):
        found = [str(data["class_path"])] if "class_path" in data else []
        return [c for c in found if c.rpartition(".")[0].split(".")[0] != "datamodules"] + [
            c for v in data.values() for c in foreign_classes(v)]
    if isinstance(data, (list, tuple)):
        return [c for v in data for c in foreign_classes(v)]
    return []


def checkpoint_data(data: dict, path: str | os.PathLike) -> dict:
    """A data config read from a checkpoint, to be built: only with classes of the ``datamodules`` package, since
    importing a module runs its code and a checkpoint is data (a user's own datamodule or item source is named in
    the data config they pass with ``--data-config``, which is trusted as code).

    Raises:
        CheckpointError: a class path of another package, naming it and the fix.
    """
    foreign = foreign_classes(data)
    if foreign:
        raise CheckpointError(f"{path}: its data names {', '.join(map(repr, foreign))}, outside the datamodules package, "
                              "which is not imported from a checkpoint; pass the data config you trained with "
                              "(--data-config configs/data/<name>.yaml)")
    return data


def _required_arguments(class_path: str) -> set[str]:
    """The ``__init__`` arguments of a class that have no default."""
    import inspect

    params = inspect.signature(_import_class(class_path).__init__).parameters
    return {k for k, p in params.items() if k != "self" and p.default is inspect.Parameter.empty
            and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}


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
    """Refuse a data config whose test split differs from the one the checkpoint was trained under (values the
    datamodule renamed since, such as a protocol name, compare under their current name)."""
    a, b = trained.get("init_args", {}), given.get("init_args", {})
    cls = _import_class(trained["class_path"]) if trained.get("class_path") == given.get("class_path") else None
    if isinstance(cls, type) and issubclass(cls, EpisodicDataModule):
        a, b = cls.canonical_init_args(a), cls.canonical_init_args(b)
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


def _import_class(class_path: str) -> Any:
    module, _, name = str(class_path).rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"data class_path {class_path!r} cannot be imported: {e}") from e


def _norm(v):
    return [_norm(x) for x in v] if isinstance(v, (list, tuple)) else v


def build_datamodule(config: dict, overrides: dict) -> EpisodicDataModule:
    """Instantiate the datamodule of ``config`` with ``overrides`` (None values leave an argument as it is)."""
    cls = _import_class(config["class_path"])
    if not (isinstance(cls, type) and issubclass(cls, EpisodicDataModule)):
        raise ValueError(f"data class_path {config['class_path']!r} is not an EpisodicDataModule; imaging-meta evaluate "
                         "needs its fixed, seeded test episodes")
    args = dict(config.get("init_args") or {})
    for k, v in overrides.items():
        if v is not None:
            args[k] = v
    return cls(**args)


def resolve_salt(checkpoint: Path, salt: str | None) -> str:
    """The salt of the pseudonymous ids to evaluate with: ``salt`` when given, else the one fit chose from the run's
    own ``config.yaml`` (``RUN/config.yaml`` beside ``RUN/checkpoints/``) by fit's rule (`salt_or_env`: a salt of
    the config's own, else env ``IMAGING_META_SALT``, else the shipped one). Checkpoints never hold the salt (a
    secret, not a hyperparameter); the run folder's config does, and without it a run trained with the folder
    configs' ``salt:`` could not be evaluated at all (a review: every split digest differed). The environment
    came first here and last at fit, so a run with ``IMAGING_META_SALT`` set and its own ``salt:`` in the config
    was evaluated with another salt than it was trained with (a review)."""
    from datamodules.indexing.pseudonyms import salt_or_env

    if salt is not None:
        return salt
    return salt_or_env(_run_config_salt(checkpoint))


def _run_config_salt(checkpoint: Path) -> str | None:
    """The salt the run's own ``config.yaml`` gives its data (or its item source), else None."""
    run_config = checkpoint.resolve().parent.parent / "config.yaml"
    # only a run folder's own config (RUN/checkpoints/x.ckpt): another project's config.yaml two folders up is not
    # this run's (a review)
    if checkpoint.resolve().parent.name == "checkpoints" and run_config.is_file():
        import yaml

        from datamodules.indexing.pseudonyms import configured_salt

        try:
            found = configured_salt(yaml.safe_load(run_config.read_text()))
        except (yaml.YAMLError, OSError):
            found = None
        if found:
            logger.info("the salt of the run's %s is read (--salt to give another)", run_config)
            return found
    return None


def _with_salt(config: dict, salt: str) -> dict:
    """``{"class_path", "init_args"}`` with ``salt`` set, when its class takes one."""
    import inspect

    cls = _import_class(config["class_path"])
    args = dict(config.get("init_args") or {})
    if "salt" in inspect.signature(cls.__init__).parameters:
        args["salt"] = salt
    return {"class_path": config["class_path"], "init_args": args}


def _seed_all(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


@torch.no_grad()
def run_shot(learner: Learner, untrained: Learner | None, dm: EpisodicDataModule, task: Task, shot: int,
             device: torch.device, threshold: float, spacing, panels: PanelKeeper | None, seed: int,
             baselines: bool = True, references: dict[str, Learner] | None = None) -> list[dict]:
    """Score every method on the datamodule's fixed test episodes; returns the per-query records
    (`score_batch`; episode ids count from 0 in the order of the episode file). ``references``: further methods
    by name (`imaging_meta.evaluation.methods.reference_classifiers`), on the same episodes."""
    _seed_all(seed)
    records: list[dict] = []
    first = 0
    for batch in progress(dm.test_dataloader(), f"evaluate: {shot}-shot", unit="batch"):
        batch = batch.to(device)
        probs = {TRAINED: learner.predict(batch)}
        choices = {TRAINED: learner_choices(learner)}
        if untrained is not None:
            probs[UNTRAINED] = untrained.predict(batch)
            choices[UNTRAINED] = learner_choices(untrained)
        for name, reference in (references or {}).items():
            probs[name] = reference.predict(batch)
            choices[name] = learner_choices(reference)
        for name, p in probs.items():
            if not torch.isfinite(p).all():
                raise FloatingPointError(f"{name}: non-finite predictions on test episodes {first}..{first + batch.n_tasks - 1}")
        recs = score_batch(task, batch, probs, first_episode=first, shot=shot, threshold=threshold, spacing=spacing,
                           baselines=baselines, choices_by_method=choices)
        records += recs
        if panels is not None:
            panels.offer(batch, probs[TRAINED], [r for r in recs if r["method"] == TRAINED], first)
        first += batch.n_tasks
    return records


def _data_for_evaluation(path: Path, ckpt: dict, extra: dict, data_config) -> dict:
    """The data config to evaluate on: the checkpoint's own, or ``data_config`` if it keeps the split (any
    labelled data for a model trained without labels)."""
    label_free = bool(extra.get("label_free"))
    trained_data = data_config_from_checkpoint(ckpt, path)
    if data_config is None:
        if label_free:
            raise ValueError(f"{path} was trained on scans without any label map, so it has no test set; give labelled "
                             "scans to evaluate on with --data-config (e.g. configs/data/folder_segmentation.yaml)")
        return checkpoint_data(trained_data, path)
    config = read_data_config(data_config)
    if label_free:  # nothing labelled was seen: any labelled data may test it, if its scans were not trained on
        logger.warning("%s was trained self-supervised on scans without labels; make sure the scans of %s were "
                       "not among them", path, data_config)
        config = _with_checkpoint_preprocessing(config, extra.get("preprocessing"), str(data_config))
    else:
        check_same_split(trained_data, _with_defaults(config), str(data_config))
    return config


def _with_checkpoint_preprocessing(config: dict, preprocessing: dict | None, source: str) -> dict:
    """``config`` with the checkpoint's ``preprocessing`` (spacing, slice size, CT window, MR percentiles, modality)
    wherever it leaves one out, for a segmentation datamodule. A label-free checkpoint is evaluated on another data
    config, whose class defaults replaced the spacing it trained at, and the warning then said to leave out settings
    that were left out already (a review)."""
    from datamodules.segmentation import SegmentationDataModule

    try:
        cls = _import_class(str(config.get("class_path", "")))
    except ValueError:  # named where the data is built
        return config
    if not preprocessing or not (isinstance(cls, type) and issubclass(cls, SegmentationDataModule)):
        return config
    args = dict(config.get("init_args") or {})
    filled = {k: v for k, v in preprocessing.items() if k not in args}
    if filled:
        logger.info("%s leaves out %s: the checkpoint's are used", source, ", ".join(f"{k} {v}" for k, v in filled.items()))
    return {**config, "init_args": {**args, **filled}}


def _training_split_settings(trained: dict, class_path: str) -> dict:
    """What rebuilds the training run's split although evaluate draws no validation episodes, from the
    checkpoint's own data config ``trained``: a segmentation datamodule's ``val_patients`` (how many validation
    patients a validation organ needs, and a sign that training validated), the one it set, else 1 + n_query when
    it validated, else None (not validated: a ``--data-config`` may not set one). ``{}`` for other data.
    ``class_path``: the class of the data config to be built (the checkpoint's, checked by `checkpoint_data`, or
    the one given), whose defaults fill in what ``trained`` leaves out."""
    from datamodules.segmentation import SegmentationDataModule

    try:
        cls = _import_class(class_path)
    except ValueError:  # named where the data is built
        return {}
    if not (isinstance(cls, type) and issubclass(cls, SegmentationDataModule)):
        return {}
    init_args = _with_defaults({**trained, "class_path": class_path})["init_args"]
    if init_args["val_patients"] is not None:
        return {"val_patients": int(init_args["val_patients"])}
    return {"val_patients": 1 + int(init_args["n_query"]) if int(init_args["val_episodes"]) > 0 else None}


def _too_few(error: BaseException) -> bool:
    """Whether ``error`` (or what it was raised from) says a stage is too small for the episodes' shots."""
    from datamodules.sampling.samplers import TooFewForEpisodes

    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, TooFewForEpisodes):
            return True
        seen = seen.__cause__
    return False


def _datamodules(path: Path, config: dict, extra: dict, task: Task, shots: Sequence[int], overrides: dict,
                 salt: str) -> tuple[dict[int, EpisodicDataModule], dict[int, str]]:
    """One datamodule per number of shots, set up for test, its task and split checked against the
    checkpoint's. Every one is set up before any is scored, so that bad data fails at once. A number of shots
    whose episodes the test split cannot give (too few patients or images for that many shots) is skipped with
    a warning when fewer shots could be set up on the same data; the fewest shots' error is raised."""
    init_args = config.get("init_args") or {}
    if overrides.get("root") is not None and "root" not in init_args:
        raise ValueError("--data-root moves a segmentation data folder; for classification data pass a --data-config "
                         "whose source points at the new files")
    config = _with_salt(config, salt)
    if isinstance(init_args.get("source"), dict):  # the ids of a configured item source are salted too
        overrides = {**overrides, "source": _with_salt(init_args["source"], salt)}
    dms: dict[int, EpisodicDataModule] = {}
    skipped: dict[int, ValueError] = {}
    for k in sorted({int(s) for s in shots}):
        dm = build_datamodule(config, {**overrides, "n_shot": k})
        if get_task(dm.task) is not task:
            raise ValueError(f"{path}: a {task.name} checkpoint cannot be evaluated on {dm.task} data "
                             f"({config['class_path']}); give a {task.name} data config")
        dm.prepare_data()
        try:
            dm.setup("test")
        except ValueError as e:
            if not dms and _too_few(e):  # the sampler's fixes (the split, the organs) are the training run's here
                raise ValueError(f"{e} (evaluate keeps the training run's split and structures: evaluate fewer shots "
                                 f"than {k} with --shots)") from e
            if not dms:  # the same data with fewer shots failed too (or this is the fewest): not about shots
                raise
            skipped[k] = e  # fewer shots worked on the same data: too few patients or images for this many
            continue
        if dm.label_free:  # a folder of scans without label maps (a self-supervised data config): nothing to score;
            # it ended as an internal error (KeyError 'test'; a review)
            raise ValueError(f"{path}: the data to evaluate on ({init_args.get('root', config['class_path'])}) holds no "
                             "labelled scan, so there is nothing to score; give a --data-config of scans with label "
                             "maps (selfsup_ratio 1.0 trains on unlabelled scans; evaluation needs labels)")
        mismatch = split_mismatch(extra, dm)
        if mismatch is not None:
            raise ValueError(
                f"{path}: the data rebuilt for evaluation is not split as in training (split digest "
                f"{mismatch[0]} != {mismatch[1]}): other pseudonymous ids (a different salt: set IMAGING_META_SALT "
                f"or --salt to the training one), other data under the root, other split settings, {SPLIT_RULE_CHANGES}. "
                "The test set could hold patients, organs or classes the model trained on, so nothing was scored."
            )
        # after the split check: another salt or other scans change the case ids this digest is keyed by too
        renamed = structure_mismatch(extra, dm)
        if renamed is not None:
            raise ValueError(f"{path}: the label maps of the data rebuilt for evaluation name their structures unlike "
                             f"the training data ({renamed}): a held-out structure could be one the model trained on, "
                             "so nothing was scored; use the label_names (and dataset.json files) of the training run")
        dms[k] = dm
    for k, why in skipped.items():
        logger.warning("%d-shot skipped: the test split cannot give %d-shot episodes (%s); scoring %s only",
                       k, k, why, ", ".join(f"{j}-shot" for j in dms))
    return dms, {k: str(why) for k, why in skipped.items()}


#: the files of an evaluation report besides its figures (`write_evaluation_report`, `evaluate_scans`)
REPORT_FILES = ("results.json", "results.md", "records.csv", "scans.json", "scans.md")


def check_evaluation_folder(out_dir: str | os.PathLike) -> dict | None:
    """``--out`` of `evaluate`: a new folder, or one that holds an earlier evaluation (its ``results.json`` is
    returned, to remove what the new report will not replace); refused when it holds another command's report.

    Raises:
        ValueError: ``out_dir`` is a file or lies under one; it holds a ``results.json`` that no evaluation wrote
            (a training run's test report, which the evaluation's files would replace).
    """
    out = check_output_folder(out_dir, "--out")
    js = out / "results.json"
    if not js.exists():
        return None
    try:
        doc = json.loads(js.read_text())
    except (OSError, ValueError):
        doc = None
    if not (isinstance(doc, dict) and isinstance(doc.get("figures"), dict) and "context" in doc):
        raise ValueError(f"{out}: holds a results.json that imaging-meta evaluate did not write (a training run's "
                         "test report?), which this evaluation would replace; give another --out")
    return doc


def _remove_earlier_evaluation(out: Path, earlier: dict | None, keep: set[str]) -> None:
    """Remove an earlier evaluation's files from ``out`` (its figures, report files and episode files) except
    ``keep``, so that none of them sits beside the new report as if it were part of it."""
    if earlier is None:
        return
    names = set(REPORT_FILES) | {str(f) for f in earlier["figures"].values()}
    names |= {str(e.get("file")) for e in (earlier.get("context") or {}).get("episode_files", {}).values()
              if isinstance(e, dict) and e.get("file")}
    removed = [n for n in sorted(names - keep) if Path(n).name == n and (out / n).is_file()]
    for n in removed:
        (out / n).unlink()
    if removed:
        logger.info("removed %d file(s) of the earlier evaluation in %s: %s", len(removed), out, ", ".join(removed))


def _episode_file(dm: EpisodicDataModule, out: Path, k: int) -> tuple[dict, dict]:
    """The entry of the test episode file of ``dm`` in the report (with its ``source``: `evaluate` copies it into
    the run folder once the report is written), and the data's description (without the cache paths)."""
    source = Path(dm.episode_files["test"])
    info = dm.describe()  # it reads the episode file's sha256
    entry = {"file": f"episodes-{k}shot.json", "sha256": info["episodes_sha256"]["test"],
             "n_episodes": len(dm.fixed_episodes("test")), "source": str(source)}
    # episodes prepared with files whose MD5 is not the published one (`prepare medmnist --allow-unofficial`): the
    # episode list's sha256 is the same as on the official files, so the report must say it
    unofficial = (json.loads(source.read_text()).get("meta") or {}).get("unofficial_files")
    if unofficial:
        entry["unofficial_files"] = list(unofficial)
    return entry, {key: v for key, v in info.items() if key not in ("episode_files", "episodes_sha256")}


def _episodes_per_shot(episode_files: dict, requested: int) -> int | dict[str, int]:
    """The test episodes scored per number of shots: one number, or ``shot -> number`` when they differ."""
    counts = {k: int(v["n_episodes"]) for k, v in episode_files.items() if "n_episodes" in v}
    if not counts:
        return requested
    return next(iter(counts.values())) if len(set(counts.values())) == 1 else counts


def _without_embedding(config: dict | None) -> dict | None:
    """A reference learner's config without its wrapped embedding (which is the checkpoint's learner, recorded as
    ``learner_config``)."""
    if not isinstance(config, dict):
        return None
    init = {k: v for k, v in (config.get("init_args") or {}).items() if k != "embedding"}
    return {"class_path": config.get("class_path"), "init_args": init}


def _context(path: Path, out: Path, extra: dict, task: Task, describe: dict, episode_files: dict, **settings) -> dict:
    """What a report records about how it was made (``settings``: name, seed, episodes, threshold, spacing, device)."""
    first = describe[next(iter(describe))]
    data_by_shot = {k: {x: d.get(x) for x in ("train_organs", "val_organs", "test_organs", "classes", "dropped_classes", "sites")}
                    for k, d in describe.items()}
    return {
        "name": settings["name"] or out.resolve().name,
        "task": task.name,
        "protocol": first.get("protocol"),
        "learner": extra["learner_config"]["class_path"],
        "learner_config": extra["learner_config"],
        "checkpoint": path.name,
        "checkpoint_sha256": sha256_file(path),
        "seed": settings["seed"],
        "shots": sorted(int(k) for k in episode_files),
        # what was scored: a fixed test episode file (test_episodes_file) may hold another number than --episodes
        "episodes_per_shot": _episodes_per_shot(episode_files, settings["episodes"]),
        "episode_files": episode_files,
        "threshold": settings["threshold"] if task.dense else None,
        "pixel_spacing_mm": settings["spacing"],
        "data": first,
        "data_by_shot": data_by_shot,
        "device": settings["device"],
        **provenance(),
        "fit_commits": extra.get("fit_commits"),  # the source that trained the checkpoint; None: not recorded
    }


def write_tensorboard(log_dir: str | os.PathLike, out: Path, results_json: Path, texts: dict[str, Path], step: int = 0) -> Path:
    """The figures of an evaluation report (``results.json``'s ``figures``, PNGs in ``out``) as TensorBoard
    images ``evaluate/<file name without .png>``, and ``texts`` (tag suffix -> Markdown file) as
    ``evaluate/<suffix>`` text, at ``step``, in an event file under ``log_dir``. Returns ``log_dir``."""
    from torch.utils.tensorboard import SummaryWriter

    figures = json.loads(results_json.read_text()).get("figures") or {}
    log_dir = Path(log_dir)
    writer = SummaryWriter(log_dir=str(log_dir))
    try:
        for file in figures.values():
            writer.add_image(f"evaluate/{Path(file).stem}", png_array(out / file), step, dataformats="HWC")
        for name, path in texts.items():
            writer.add_text(f"evaluate/{name}", path.read_text(), step)
    finally:
        writer.close()
    return log_dir


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
    interval: str = DEFAULT_INTERVAL,
    scan_protocols: Sequence[str] = (),
    scan_pairs: int = 4,
    adapt_steps: int = 0,
    scan_pairing: str = "same_site",
    scan_scale: str = "checkpoint",
    log_dir: str | os.PathLike | None = None,
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
        baselines: also score the untrained learner and the task's label-only baselines (segmentation:
            copying the support mask).
        n_panel: best and worst episodes shown in the panel figure (0: none).
        threshold: foreground probability threshold of segmentation masks.
        name: the run's name in comparison tables (default: the output folder's name).
        salt: the secret of the pseudonymous ids used at fit (default: fit's rule applied to the run's
            ``config.yaml`` beside its ``checkpoints/`` folder: its salt unless a shipped placeholder, else env
            ``IMAGING_META_SALT``, else the project default; `resolve_salt`). A different one gives other ids:
            where the split is by patient (segmentation), another split, which is refused; a class split
            (classification) is the same split under other ids, and is scored.
        interval: the 95% intervals of every table, and of the paired ``trained − baseline`` differences:
            ``patient-bootstrap`` (seeded percentile bootstrap of the test patients, `N_BOOT` resamples) or
            ``episode-t`` (Student's t over episodes; too narrow when episodes share patients). See
            `imaging_meta.evaluation.statistics`.
        scan_protocols: also score these whole-scan protocols (``whole_scan``, ``oracle_extent``) on the test
            scans, into ``scans.json`` and ``scans.md`` (`imaging_meta.commands.evaluate_scans`).
        scan_pairs: (support, query) scan pairs per test structure for the whole-scan protocols.
        adapt_steps: also score the whole-scan protocols after test-time adaptation on each pair's scans.
        scan_pairing: ``same_site``, ``cross_site`` or ``any`` (`imaging_meta.commands.evaluate_scans.scan_pairs`).
        scan_scale: the whole-scan protocols' in-plane spacing: ``checkpoint`` or ``structure`` (as ``segment --scale``).
        log_dir: also write the figures as TensorBoard images and the Markdown reports as text into this
            folder (`write_tensorboard`), at the checkpoint's global step; None: no TensorBoard events.

    Returns:
        The paths of ``results.json`` and ``results.md``.
    """
    check_interval(interval)
    # every option and output folder before the checkpoint is read and anything is written or scored
    if not shots or min(shots) < 1:
        raise ValueError(f"shots must be positive integers, got {list(shots)}")
    if episodes < 1:
        raise ValueError(f"episodes must be >= 1, got {episodes}")
    if not 0 <= seed < SEED_LIMIT:
        raise ValueError(f"--seed must be >= 0 and below 2**64, got {seed}")
    if scan_protocols and scan_pairs < 1:
        raise ValueError(f"--scan-pairs must be >= 1, got {scan_pairs}")
    if adapt_steps < 0:
        raise ValueError(f"--adapt-steps must be >= 0, got {adapt_steps}")
    if adapt_steps and not scan_protocols:
        logger.warning("--adapt-steps applies to the whole-scan protocols only; add --scan-protocols")
    if scan_scale != "checkpoint" and not scan_protocols:
        logger.warning("--scale %s applies to the whole-scan protocols only; add --scan-protocols", scan_scale)
    earlier = check_evaluation_folder(out_dir)
    # a complete cache may sit on read-only storage (slice_cache.check_writable): only the events must be written
    for folder, option, writable in ((cache_dir, "--cache-dir", False), (log_dir, "--log-dir", True)):
        if folder is not None:
            check_output_folder(folder, option, writable=writable)
    if log_dir is not None and Path(log_dir).resolve().is_relative_to(Path(out_dir).resolve()):
        raise ValueError(f"--log-dir {log_dir} lies in --out {out_dir}, whose files are reproducible byte for byte; "
                         "write the TensorBoard events elsewhere (e.g. the training run's version_N folder)")
    path = Path(checkpoint)
    dev = resolve_device(device)
    ckpt = read_checkpoint(path)
    learner, extra = load_learner(path, dev, ckpt)
    config = _data_for_evaluation(path, ckpt, extra, data_config)
    task = get_task(extra.get("task", learner.task))
    untrained = restore_untrained(extra, device=dev) if baselines else None
    # classification: raw pixels and what `classify` gives by default, on the same episodes
    references = {k: v.to(dev) for k, v in reference_classifiers(learner).items()} if (
        baselines and task is CLASSIFICATION) else None
    if scan_protocols and not task.dense:
        raise ValueError(f"--scan-protocols {' '.join(scan_protocols)}: whole-scan protocols segment scans; "
                         f"{path} is a {task.name} checkpoint")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if cache_dir is None and not config.get("init_args", {}).get("cache_dir"):
        cache_dir = str(out / "cache")  # the episode files are written there
    overrides = {"test_episodes": episodes, "val_episodes": 0, "episodes_per_epoch": 0, "seed": seed,
                 "test_episodes_file": None, "num_workers": 0, "cache_dir": cache_dir, "batch_size": batch_size,
                 "root": data_root}
    if not extra.get("label_free"):  # the training run's split, whichever data config is given
        trained = data_config_from_checkpoint(ckpt, path)
        for key, value in _training_split_settings(trained, str(config.get("class_path", ""))).items():
            if value is None:  # an override of None is no override: leave the setting out of the config instead
                config = {**config, "init_args": {k: v for k, v in (config.get("init_args") or {}).items() if k != key}}
            else:
                overrides[key] = value
    salt = resolve_salt(path, salt)
    dms, skipped = _datamodules(path, config, extra, task, shots, overrides, salt)
    # a --data-config that keeps the split may still preprocess otherwise (a CT window, a patch spacing): the model
    # then sees other pixels than it trained on, and that run's report read like the real one (a review)
    preprocessing = next((dm.preprocessing for dm in dms.values() if dm.preprocessing is not None), None)
    changed = preprocessing_changes(extra.get("preprocessing"), preprocessing)
    if changed:
        logger.warning("the data is preprocessed unlike the checkpoint's: %s. The model sees other pixels than it trained "
                       "on, and the report describes this preprocessing (results.json and results.md record it); leave "
                       "these settings out of --data-config, or set them as the checkpoint has them, to evaluate the model "
                       "as trained", changes_text(changed))
    if scan_protocols:  # no pair of test scans to score them on: refused before the episodes (a review)
        from imaging_meta.commands.evaluate_scans import chosen_scan_pairs

        chosen_scan_pairs(next(iter(dms.values())), scan_pairs, seed, scan_pairing)
    records, episode_files, describe = [], {}, {}
    panels = PanelKeeper(task, n_panel, threshold) if n_panel > 0 else None
    spacing = None
    for i, (k, dm) in enumerate(dms.items()):
        if task.dense:  # masks: HD95 in mm at the pixel size they were resampled to
            spacing = [float(s) for s in (dm.preprocessing or {})["spacing"]]
        episode_files[str(k)], describe[str(k)] = _episode_file(dm, out, k)
        records += run_shot(learner, untrained, dm, task, k, dev, threshold, spacing, panels if i == 0 else None, seed,
                            baselines, references)
        logger.info("%d-shot: %d test episodes scored", k, episode_files[str(k)]["n_episodes"])
    context = _context(path, out, extra, task, describe, episode_files, name=name, seed=seed, episodes=episodes,
                       threshold=threshold, spacing=spacing, device=dev.type)
    context["interval"] = interval_description(interval, N_BOOT, seed)
    if scan_protocols:  # how the whole-scan rows were made (scans.json's records say it too)
        context["scan_protocols"] = {"protocols": list(scan_protocols), "pairs": scan_pairs, "pairing": scan_pairing,
                                     "scale": scan_scale, "adapt_steps": adapt_steps}
    # what `compare` checks besides the episodes: two runs on one episode list can still see other pixels
    context["preprocessing"] = preprocessing
    if changed:
        context["preprocessing_not_the_checkpoints"] = changes_record(changed)
    if skipped:  # asked for, but the test split cannot give them: said in results.json, not only in the log
        context["skipped_shots"] = {str(k): why for k, why in skipped.items()}
    if references:  # how the reference rows were made (the task-adaptive row's spaces changed on 2026-12-06)
        context["reference_methods"] = {name: _without_embedding(getattr(ref, "config", None))
                                        for name, ref in references.items()}
    summary = evaluation_summary(task, records, seed=seed, interval=interval, n_boot=N_BOOT)
    # the new report first, each file whole (atomic), then its episode files, then the earlier run's files it no
    # longer has: an interrupted run left the earlier report without its files, or beside the new episode files
    sources = {shot: Path(e.pop("source")) for shot, e in episode_files.items()}
    js, md = write_evaluation_report(out, context, summary, records, panels)
    for shot, e in episode_files.items():
        atomic_write_bytes(out / e["file"], sources[shot].read_bytes())
    written = json.loads(js.read_text())
    # the earlier run's whole-scan files go too: the scan pairs below are slow, and a run stopped among them left
    # the earlier scans.md beside the new report (a review)
    _remove_earlier_evaluation(out, earlier, keep={f["file"] for f in episode_files.values() if "file" in f}
                               | {"results.json", "results.md", "records.csv"} | {str(f) for f in written["figures"].values()})
    texts: dict[str, Path] = {}
    try:
        if scan_protocols:  # after the episode report is written: a run stopped among the slow scan pairs keeps it
            from imaging_meta.commands.evaluate_scans import evaluate_scans

            scans_js, texts["scans"] = evaluate_scans(learner, untrained, next(iter(dms.values())), out,
                                                      scan_protocols, scan_pairs, seed, device=dev,
                                                      adapt_steps=adapt_steps, pairing=scan_pairing, scale=scan_scale)
            logger.info("whole-scan protocols %s scored into %s", list(scan_protocols), scans_js)
    finally:  # the episode report reaches TensorBoard also when the scan pairs stop (it got nothing; a review)
        if log_dir is not None:
            where = write_tensorboard(log_dir, out, js, {"results": md, **texts}, step=int(ckpt.get("global_step") or 0))
            logger.info("figures written to TensorBoard in %s", where)
    return js, md
