"""`EpisodicModule`: the one LightningModule. It wraps any `Learner`.

It owns the training, validation and test steps, the optimiser and scheduler (injected as callables from
the config), the metrics (``train/loss``; segmentation: ``val/dice``, ``val/dice/organ/<name>``,
``val/dice/site/<name>``, ``test/dice``; classification: ``val/acc``, ``val/acc/site/<name>``, ``test/acc``;
both: ``val/score``, which the checkpoint callbacks monitor), and the test report with its baselines.

For TensorBoard it logs the run's settings as hyperparameters (`run_hparams`: the learner's class and arguments,
the optimiser's, the scheduler's, the key data and trainer settings) with two hparam metrics, ``hp/val_metric``
(the last validation epoch's ``val/score``) and ``hp/test_metric`` (the trained learner's ``test/<metric>``), so
that the HPARAMS tab compares runs; and an image panel of a fixed episode each validation epoch and at test
(`imaging_meta.evaluation.panels`); docs/tensorboard.md shows them.

What differs between the kinds of task comes from the learner's `Task`; queries are scored by
`imaging_meta.evaluation.scoring.score_batch`, as in ``imaging-meta evaluate``. Only pseudonymous
case ids and site keys reach logs, checkpoints and reports.
"""

from __future__ import annotations

import copy
import functools
import inspect
import json
import logging
import math
import os
import random
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_warn

import imaging_meta
from datamodules.base import EpisodicDataModule
from datamodules.indexing.splits import SPLIT_RULE_CHANGES
from imaging_meta.checkpoint_io import (
    current_class_path,
    modernize,
    offline_learner_config,
    split_mismatch,
    structure_mismatch,
)
from imaging_meta.episode import Episode
from imaging_meta.evaluation.methods import (
    TRAINED,
    UNTRAINED,
    initial_copy,
    ordered_methods,
    restore_untrained,
    untrained_state,
)
from imaging_meta.evaluation.panels import episode_panel
from imaging_meta.evaluation.provenance import provenance
from imaging_meta.evaluation.reports import write_report
from imaging_meta.evaluation.scoring import learner_choices, score_batch
from imaging_meta.evaluation.statistics import EPISODE_T, differences, interval_description, summarize
from imaging_meta.learners.base import Learner, keep_channels_last_on_cpu
from imaging_meta.tasks import COPY_MASK, Task, get_task, task_of_episode

__all__ = ["COPY_MASK", "HP_METRICS", "TRAINED", "UNTRAINED", "EpisodicModule", "rng_states", "set_rng_states"]

logger = logging.getLogger(__name__)

#: the hparam metrics of TensorBoard's HPARAMS tab and their value until they are first measured (Lightning's
#: ``hp_metric`` placeholder, outside the range of a Dice or an accuracy)
HP_METRICS = {"hp/val_metric": -1.0, "hp/test_metric": -1.0}
#: datamodule ``init_args`` that go into the hparams when the datamodule has them
DATA_HPARAMS = ("protocol", "n_query", "batch_size", "episodes_per_epoch", "test_organs", "val_organs", "test_sites",
                "test_fold", "spacing", "augment", "selfsup_ratio", "split_seed", "seed")
#: factory arguments that say how an optimiser or scheduler runs, not what it does
_IMPLEMENTATION_ARGS = {"params", "optimizer", "foreach", "capturable", "differentiable", "fused", "maximize", "last_epoch",
                        "verbose"}


def _gather(records: list[dict]) -> list[dict]:
    """All ranks' records (identity without torch.distributed)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        out: list = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(out, records)
        return [r for part in out for r in part]
    return records


def learner_changes(saved: dict | None, built: dict) -> dict[str, tuple[Any, Any]]:
    """The learner settings (dotted ``init_args`` keys) whose values differ between a checkpoint's learner config
    and the learner built now: ``{key: (checkpoint's, this run's)}``, over the keys both name. Pretrained-weight
    sources are left out (a rebuilt learner never reads them again); empty for a checkpoint without a learner
    config."""
    if not saved:
        return {}

    def flat(config: Any, prefix: str = "") -> dict[str, Any]:
        if isinstance(config, dict):
            out: dict[str, Any] = {}
            for k, v in config.items():
                out.update(flat(v, f"{prefix}{k}."))
            return out
        return {prefix[:-1]: config}

    a = flat(offline_learner_config(modernize(saved)).get("init_args") or {})
    b = flat(offline_learner_config(built).get("init_args") or {})
    # a setting the checkpoint's config does not name did not exist when it was written: not a change; a tuple of the
    # Python API and a list of a YAML config with the same values are no change either (a review)
    return {k: (a[k], b[k]) for k in sorted(set(a) & set(b)) if _plain(a[k]) != _plain(b[k])}


def _plain(value: Any) -> Any:
    """A setting's value for comparing: tuples as lists, numpy scalars as Python numbers, NaN equal to NaN (and to
    nothing else), booleans apart from numbers, other objects (a Path) as their text; ints and floats compare as
    numbers."""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, bool):
        return ("bool", value)
    if isinstance(value, float) and math.isnan(value):
        return _NAN
    return value if value is None or isinstance(value, (str, int, float)) else str(value)  # a Path as its text


_NAN = object()  # `_plain`'s NaN: equal to itself only


def preprocessing_changes(saved: dict | None, now: dict | None) -> dict[str, tuple[Any, Any]]:
    """The data preprocessing settings (spacing, slice size, CT window, ...) that differ between a checkpoint's
    and this run's data: ``{key: (checkpoint's, this run's)}``, over the keys the checkpoint names (one it does
    not name did not exist when it was written; one only it names, such as a ``modality`` set in training and not
    here, is None here); empty when either is unknown."""
    if not saved or not now:
        return {}
    return {k: (saved[k], now.get(k)) for k in sorted(saved) if _plain(saved[k]) != _plain(now.get(k))}


def changes_text(changes: dict[str, tuple[Any, Any]]) -> str:
    """`learner_changes` or `preprocessing_changes` as warnings say them: ``key <checkpoint's> in the checkpoint,
    <this run's> here; ...``."""
    return "; ".join(f"{k} {a!r} in the checkpoint, {b!r} here" for k, (a, b) in changes.items())


def changes_record(changes: dict[str, tuple[Any, Any]]) -> dict[str, dict[str, Any]]:
    """`learner_changes` or `preprocessing_changes` as reports record them: ``{key: {"checkpoint", "tested"}}``."""
    return {k: {"checkpoint": a, "tested": b} for k, (a, b) in changes.items()}


def _query_mean(records: list[dict], metric: str) -> float:
    """The trained learner's mean ``metric`` over its query records."""
    values = [float(r[metric]) for r in records if r["method"] == TRAINED]
    return sum(values) / len(values)


def rng_states() -> dict:
    """This process's torch, CUDA, NumPy and Python random states, in types ``torch.load(weights_only=True)`` reads."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "numpy": [kind, torch.from_numpy(np.asarray(keys).astype(np.int64)), pos, has_gauss, gauss],
             "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        # this process's GPU only: every visible GPU's state would not restore where a rank sees fewer GPUs
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_states(state: dict) -> None:
    """Restore what `rng_states` returned."""
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), int(pos), int(has_gauss), float(gauss)))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available():
        if isinstance(cuda, (list, tuple)):  # checkpoints before 2026-12-06 kept every visible GPU's state
            device = torch.cuda.current_device()
            cuda = cuda[device] if device < len(cuda) else None
        if cuda is not None:
            torch.cuda.set_rng_state(cuda)


def _hparam_value(v):
    """A value TensorBoard's HPARAMS tab shows: numbers and strings as they are, bools as ``"true"``/``"false"``
    (TensorBoard's writer would make them 0 and 1), None as ``"none"``, anything else (lists, tuples, tensors of
    several numbers) as compact JSON or text."""
    if isinstance(v, (bool, np.bool_)):
        return "true" if v else "false"
    if isinstance(v, str):
        return v
    if isinstance(v, (int, float, np.integer, np.floating)):
        return v.item() if isinstance(v, (np.integer, np.floating)) else v
    if isinstance(v, torch.Tensor) and v.numel() == 1:
        return v.item()
    if v is None:
        return "none"
    try:
        return json.dumps(v, default=str)
    except (TypeError, ValueError):
        return str(v)


def flat_hparams(prefix: str, config) -> dict:
    """``{"<prefix>/<key>/<key>...": value}`` of a nested config; a ``{"class_path", "init_args"}`` becomes
    ``<prefix>/class`` (the class's name) and its flattened arguments."""
    if isinstance(config, dict) and "class_path" in config:
        return {f"{prefix}/class": str(config["class_path"]).rpartition(".")[2],
                **flat_hparams(prefix, config.get("init_args") or {})}
    if isinstance(config, dict):
        return {k: v for key, value in config.items() for k, v in flat_hparams(f"{prefix}/{key}", value).items()}
    return {prefix: _hparam_value(config)}


def factory_config(factory: Callable | None) -> dict:
    """``{"class_path", "init_args"}`` of an optimiser or scheduler factory, without calling it: a class (its
    defaults), a `functools.partial` of one (LightningCLI's callables are, with every argument bound) or any
    other callable (its name, no arguments). Arguments such as ``foreach`` and ``fused`` are left out."""
    if factory is None:
        return {"class_path": "none", "init_args": {}}
    kwargs: dict = {}
    while isinstance(factory, functools.partial):
        kwargs = {**factory.keywords, **kwargs}  # an outer partial's arguments win
        cls = next((a for a in reversed(factory.args) if isinstance(a, type)), None)  # jsonargparse's instantiator
        factory = cls if cls is not None else factory.func
    if isinstance(factory, type):
        try:
            params: list[inspect.Parameter] = list(inspect.signature(factory).parameters.values())
        except (TypeError, ValueError):
            params = []
        defaults = {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}
        kwargs = {**defaults, **kwargs}
        name = f"{factory.__module__}.{factory.__qualname__}"
    else:
        name = getattr(factory, "__qualname__", type(factory).__name__)
    return {"class_path": name, "init_args": {k: v for k, v in kwargs.items() if k not in _IMPLEMENTATION_ARGS}}


def data_hparams(dm: EpisodicDataModule) -> dict:
    """The key settings of a datamodule for the hparams: its class, task, n_way (when the task has one), n_shot,
    image size (the preprocessing's slice or image size) and the `DATA_HPARAMS` it was built with."""
    config = dm.config()
    init = config.get("init_args") or {}
    params = {"data/class": str(config["class_path"]).rpartition(".")[2], "data/task": dm.task, "data/n_shot": dm.n_shot}
    if dm.n_way is not None:
        params["data/n_way"] = dm.n_way
    pre = dm.preprocessing or {}
    size = next((pre[k] for k in ("slice_size", "image_size", "patch_size") if pre.get(k) is not None), None)
    if size is not None:
        params["data/image_size"] = "x".join(str(int(s)) for s in size) if isinstance(size, (list, tuple)) else str(size)
    params |= {f"data/{k}": init[k] for k in DATA_HPARAMS if k in init}
    try:  # the organs the split chose (a validation organ drawn by val_organ_count is not in the init args)
        described = dm.describe()
    except AttributeError:  # not set up: no split yet
        described = {}
    params |= {f"data/{k}": described[k] for k in ("val_organs", "test_organs") if described.get(k) is not None}
    return {k: _hparam_value(v) for k, v in params.items()}


#: why ``fit`` refuses ``precision: 16-true`` (the CLI before anything is written, the module for other callers):
#: with float16 weights Adam's eps (1e-8) underflows, and a weight with a zero gradient turned NaN after one step,
#: reported as a diverged loss (a review); updates smaller than float16's resolution are lost with any optimiser
PRECISION_16_TRUE = ("--trainer.precision 16-true trains float16 weights, which the optimiser cannot update reliably "
                     "(Adam's eps underflows: NaN after one step); use bf16-mixed (CPU and recent GPUs), 16-mixed (GPU) "
                     "or bf16-true")


def record_a_stopped_epoch_as_unfinished(trainer: Any, checkpoint: dict) -> None:
    """Record, in ``checkpoint``, an epoch that ``max_steps`` stopped before its last batch as unfinished.

    Lightning runs the epoch's end hooks when ``max_steps`` stops it, and counts it processed there, so a checkpoint
    saved in them (the trainer configs' last.ckpt) says the epoch was processed while its batch count says it was
    not. Resumed, Lightning then either dropped the rest of the epoch (a run by epochs) or finished it while naming
    the next epoch to the samplers, one ahead for the rest of the run (a run by steps): a run extended from that
    checkpoint trained on other episodes than one run whole (a review). With the epoch counted unprocessed, Lightning
    resumes it mid-epoch, as from a checkpoint taken between batches, and the episode sampler's skip makes the run
    exact."""
    if trainer is None or getattr(getattr(trainer, "state", None), "fn", None) != "fit":
        return
    loop = trainer.fit_loop
    epochs, batches = loop.epoch_progress.current, loop.epoch_loop.batch_progress.current
    n_batches = trainer.num_training_batches
    if not (epochs.processed > epochs.completed and isinstance(n_batches, int) and batches.processed < n_batches):
        return
    saved = checkpoint.get("loops", {}).get("fit_loop", {}).get("epoch_progress")
    if saved:
        for part in ("current", "total"):
            saved[part]["processed"] = min(saved[part]["processed"], saved[part]["completed"])


class EpisodicModule(LightningModule):
    """Meta-trains and evaluates a `Learner` on batches of episodes.

    Args:
        learner: the learner (``class_path``/``init_args`` in YAML).
        optimizer: optimiser factory, called with the parameters.
        lr_scheduler: optional scheduler factory, called with the optimiser.
        baselines: in test, also score the untrained learner (its weights at construction, kept in the
            checkpoint) and the task's label-only baselines (segmentation: "copy the support mask"), on the
            same episodes.
        threshold: foreground probability threshold for segmentation masks.
        n_log_images: the TensorBoard image panel of each validation epoch and of the test (0: none) shows this
            many episodes (segmentation: a row each) or queries per class (classification: one episode).
        weight_averaging: from this fraction of the fit's optimizer steps on, validate, checkpoint and finish
            with the equal-weight average of the weights (`imaging_meta.weight_averaging.LateWeightAveraging`);
            None: the weights as trained.
    """

    def __init__(
        self,
        learner: Learner,
        optimizer: OptimizerCallable = torch.optim.Adam,
        lr_scheduler: LRSchedulerCallable | None = None,
        baselines: bool = True,
        threshold: float = 0.5,
        n_log_images: int = 4,
        weight_averaging: float | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(learner, Learner):
            raise TypeError(f"learner must be an imaging_meta Learner, got {type(learner).__name__}")
        if not 0.0 <= threshold < 1.0:  # a probability above 1.5 never happens: every Dice was 0 (a review)
            raise ValueError(f"threshold must be a foreground probability in [0, 1), got {threshold}")
        # the learner and the factories are kept out of hparams: checkpoints must load with weights_only=True
        self.save_hyperparameters(ignore=["learner", "optimizer", "lr_scheduler"])
        self.learner = learner
        self.optimizer_factory: Callable = optimizer
        self.scheduler_factory: Callable | None = lr_scheduler
        # the initial weights: the "untrained encoder" baseline, in a list so that it is not a submodule
        self._untrained = [initial_copy(learner)] if baselines else []
        self._records: dict[str, list[dict]] = {"val": [], "test": []}
        self._seen = {"val": 0, "test": 0}  # episodes this rank has scored in the current epoch
        self._first_losses: list[float] = []  # the training loss of this process's first steps (`_diverging`)
        self._warned_diverging = False
        self.test_summary: dict | None = None
        self.test_differences: dict | None = None  # trained − each baseline, paired on the same queries
        self.report_paths: tuple[Path, Path] | None = None
        #: learner settings that differ from the loaded checkpoint's (`learner_changes`), warned about at load
        self.learner_changes: dict[str, tuple[Any, Any]] = {}
        #: data preprocessing that differs from the loaded checkpoint's (`preprocessing_changes`), warned at load
        self.preprocessing_changes: dict[str, tuple[Any, Any]] = {}
        self._hparams_logged: set[int] = set()  # ids of the loggers that have this run's hparams
        #: the git commits of the source that trained this model, in order (`on_fit_start`; a loaded checkpoint's,
        #: empty for one saved before 2026-12-07, which recorded none)
        self.fit_commits: list[str] = []
        self._fit_commit: str | None = None  # this process's, read when its first fit starts

    @property
    def task(self) -> Task:
        """The learner's kind of task: the metric, decision rule, report rows and baselines."""
        return get_task(self.learner.task)

    def _datamodule(self) -> EpisodicDataModule | None:
        """The trainer's datamodule when it is an `EpisodicDataModule` (a fit on bare dataloaders has none)."""
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        return dm if isinstance(dm, EpisodicDataModule) else None

    # ---------------------------------------------------------------- hparams
    def run_hparams(self) -> dict:
        """This run's settings, flat and scalar-valued, for TensorBoard's HPARAMS tab: ``task``; ``learner/class``
        and every argument of the learner (``learner/inner_lr``, ``learner/backbone``, ``learner/backbone_kwargs/
        width``...); ``optimizer/class`` and its arguments (``optimizer/lr``...); ``lr_scheduler/class`` (``none``
        without one) and its arguments; ``module/threshold``, ``module/baselines``, ``module/weight_averaging``
        (``none`` without it); the datamodule's key settings
        (`data_hparams`); the trainer's ``trainer/max_epochs``, ``trainer/precision``, ... and the global seed."""
        params = {"task": self.task.name, **flat_hparams("learner", self.learner.config),
                  **flat_hparams("optimizer", factory_config(self.optimizer_factory)),
                  **flat_hparams("lr_scheduler", factory_config(self.scheduler_factory)),
                  "module/threshold": self.hparams["threshold"], "module/baselines": self.hparams["baselines"],
                  "module/weight_averaging": self.hparams.get("weight_averaging")}
        dm = self._datamodule()
        if dm is not None:
            params |= data_hparams(dm)
        if self._trainer is not None:
            t = self.trainer
            params |= {"trainer/max_epochs": t.max_epochs, "trainer/max_steps": t.max_steps,  # -1: no step limit
                       "trainer/precision": t.precision, "trainer/world_size": t.world_size,
                       "trainer/accumulate_grad_batches": t.accumulate_grad_batches,
                       "trainer/gradient_clip_val": t.gradient_clip_val}
        if os.environ.get("PL_GLOBAL_SEED") is not None:  # set by seed_everything (the configs' seed_everything)
            params["seed"] = int(os.environ["PL_GLOBAL_SEED"])
        return {k: _hparam_value(v) for k, v in params.items()}

    def setup(self, stage: str) -> None:
        """Log `run_hparams` with the `HP_METRICS` once per logger, before Lightning logs its own hparams:
        TensorBoard shows the first hparams of a run, so ours are the ones the HPARAMS tab lists.

        Before that, on every rank and before the strategy moves or wraps the model, a learner training on a CPU
        keeps its Conv-4's weights channels-last (`imaging_meta.learners.base.keep_channels_last_on_cpu`)."""
        if self._trainer is not None:
            if stage == "fit" and str(self.trainer.precision) == "16-true":
                raise ValueError(PRECISION_16_TRUE)
            keep_channels_last_on_cpu(self.learner, self.trainer.strategy.root_device)
        if stage == "predict" or self._trainer is None or self.global_rank != 0:
            return
        params = None
        for lg in self.trainer.loggers:
            logged = getattr(lg, "hparams", None)  # a dict on TensorBoardLogger; fast_dev_run's DummyLogger has none
            if id(lg) in self._hparams_logged or (isinstance(logged, Mapping) and "learner/class" in logged):
                continue  # fit then test in one run: the hparams are already there, and their metrics measured
            params = params if params is not None else self.run_hparams()
            if isinstance(lg, TensorBoardLogger):
                lg.log_hyperparams(params, metrics=dict(HP_METRICS))
            else:
                lg.log_hyperparams(params)
            self._hparams_logged.add(id(lg))

    # --------------------------------------------------------------- training
    def training_step(self, batch: Episode, batch_idx: int) -> torch.Tensor:
        # under DDP this runs inside the wrapped forward. MAML-family learners differentiate each task inside
        # `loss` and free its graph (`inner_loop.per_task_backward`); the loss they return hands the summed
        # gradients over in Lightning's one backward, so automatic optimisation, clipping, accumulation, loss
        # scaling and DDP's one gradient synchronisation per step are unchanged
        if batch_idx == 0:  # a segmentation model on classification data (or the other way) fails inside the learner
            self._check_batch(batch)
        loss = self.learner.loss(batch)
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"non-finite training loss {loss.item()} at step {self.global_step}; lower the learning rate or check the inputs"
            )
        self._diverging(float(loss.detach()))
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=batch.n_tasks, sync_dist=True)
        return loss

    #: the training loss is diverging when it is this many times its first steps' median (and above `DIVERGED_FLOOR`)
    DIVERGED_RATIO = 1000.0
    DIVERGED_FLOOR = 100.0

    def _diverging(self, value: float) -> None:
        """Warn once when the training loss grows to `DIVERGED_RATIO` times its first 5 steps' median: a learning
        rate of 100 took a Reptile loss to 1e27 while it stayed finite, and the run ended with exit 0 and a
        best.ckpt that predicts one class (a review); a NaN stops the run in ``training_step``."""
        if len(self._first_losses) < 5:
            self._first_losses.append(value)
            return
        reference = float(np.median(self._first_losses))
        if not self._warned_diverging and value > self.DIVERGED_FLOOR and value > self.DIVERGED_RATIO * max(reference, 1e-6):
            self._warned_diverging = True
            rank_zero_warn(f"training loss {value:.3g} at step {self.global_step} is {value / max(reference, 1e-6):.0e} "
                           f"times its first steps' ({reference:.3g}): training is diverging; lower the learning rate "
                           "(or the inner learning rate) and train again")

    def configure_callbacks(self):
        """`LateWeightAveraging` from ``weight_averaging`` (a fraction of training) on, when the config sets it."""
        if self.hparams.get("weight_averaging") is None:
            return []
        from imaging_meta.weight_averaging import LateWeightAveraging

        if self._trainer is not None and any(isinstance(c, LateWeightAveraging) for c in self.trainer.callbacks):
            return []  # still attached from fit (``--test_after_fit``): Lightning warned that it replaced it
        return [LateWeightAveraging(start=self.hparams["weight_averaging"])]

    def _resume_weights(self, checkpoint: dict) -> None:
        """A fit resumed from a checkpoint saved while weights were averaged, without weight averaging of its own,
        continues from the weights training had reached (``current_model_state``), not from their average (the
        checkpoint's ``state_dict``, which Lightning loads): it resumed from the average, silently (a review)."""
        from lightning.pytorch.callbacks import WeightAveraging

        if any(isinstance(c, WeightAveraging) for c in getattr(self.trainer, "callbacks", ())):
            return  # it restores both the average and the current weights
        checkpoint["state_dict"] = checkpoint["current_model_state"]
        rank_zero_warn(
            f"the checkpoint was saved at step {checkpoint.get('global_step')} while weights were averaged, and this "
            "run averages none (model.weight_averaging null): training continues from the weights it had reached "
            "there, without their average")

    def __deepcopy__(self, memo: dict) -> EpisodicModule:
        """A copy whose optimizer and scheduler factories are this module's own, not copies: LightningCLI's factories
        are partials that hold its argument parser, which cannot be copied (under DDP it holds a lock), and the
        copy that weight averaging keeps (`imaging_meta.weight_averaging`) never builds an optimizer."""
        for factory in (self.optimizer_factory, self.scheduler_factory):
            memo[id(factory)] = factory
        new = self.__class__.__new__(self.__class__)
        memo[id(self)] = new
        new.__setstate__(copy.deepcopy(self.__getstate__(), memo))  # the trainer is left out (LightningModule)
        return new

    def configure_optimizers(self):
        opt = self.optimizer_factory(self.learner.parameters())
        if self.scheduler_factory is None:
            return opt
        sched = self.scheduler_factory(opt)
        cfg = {"scheduler": sched, "interval": "epoch"}
        if isinstance(sched, torch.optim.lr_scheduler.ReduceLROnPlateau):
            # the user's monitor if the scheduler names one (Lightning's CLI class does), else val/score; a review
            # (2026-12-07): val/score (Dice, accuracy: higher is better) was watched in torch's default mode "min",
            # which cut the rate while the score rose, and a fit validating every other epoch stopped at the first
            monitor = getattr(sched, "monitor", None) or "val/score"
            if monitor == "val/score" and sched.mode != "max":
                raise ValueError("ReduceLROnPlateau watches val/score (Dice or accuracy: higher is better) and is in "
                                 f"mode {sched.mode!r}: set mode: max in its init_args")
            cfg |= {"monitor": monitor, "strict": False}  # no score yet: no step, not a stop
            self._plateau_monitor = monitor
        return {"optimizer": opt, "lr_scheduler": cfg}

    def lr_scheduler_step(self, scheduler: Any, metric: Any) -> None:
        """Lightning's step, except that ``ReduceLROnPlateau`` on a validation metric steps only after a validation
        (one on a training metric steps every epoch, as Lightning steps it): Lightning keeps the
        last val/score and stepped the scheduler on it again at the end of every epoch without validation, each a
        "no improvement", so that with ``check_val_every_n_epoch: 2`` and ``patience: 1`` the rate was cut at the
        first validation that did not improve (a review)."""
        # val/score, val/<metric>, val/averaged and hp/val_metric are logged at validation only (a review: the
        # HPARAMS column was taken for a training metric and stepped on again after every epoch without validation)
        watches_validation = str(getattr(self, "_plateau_monitor", "val/score")).startswith(("val/", "hp/"))
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau) and watches_validation:
            if metric is None or not getattr(self, "_scored_since_plateau_step", False):
                return
            self._scored_since_plateau_step = False
            scheduler.step(metric)
        else:
            super().lr_scheduler_step(scheduler, metric)

    # ------------------------------------------------------------- evaluation
    def _check_batch(self, batch: Episode) -> None:
        task = self.task
        if not task.labels_fit(batch.query_images, batch.query_labels):
            raise ValueError(
                f"the {type(self.learner).__name__} learner is a {task.name} learner, but the data gives "
                f"{task_of_episode(batch).label_kind}; pair a *_seg model config with a segmentation data config and "
                "a *_cls one with a classification one"
            )
        declared = (self.learner.config.get("init_args") or {}).get("in_channels")
        channels = batch.query_images.shape[2]  # (T, Q, C, *spatial)
        if declared is not None and int(declared) != channels and not getattr(self.learner, "reads_colour", False):
            raise ValueError(
                f"the images have {channels} channel(s) but the {type(self.learner).__name__} learner takes "
                f"in_channels={declared}; make them agree: --model.learner.init_args.in_channels {channels}, or the "
                f"data's channels (an image folder's source.init_args.channels: {declared})"
            )
        spatial = batch.query_images.dim() - 3  # (T, Q, C, *spatial)
        conv = next((m for m in self.learner.modules() if isinstance(m, torch.nn.modules.conv._ConvNd)), None)
        if conv is not None and len(conv.kernel_size) != spatial:
            raise ValueError(
                f"the items are {spatial}D ({list(batch.query_images.shape[3:])}) but the "
                f"{type(self.learner).__name__} learner's network is {len(conv.kernel_size)}D; for 3D patches "
                "(a lesion CSV's patch_size [D, H, W]) build a 3D network: --model.learner.init_args.backbone_kwargs "
                "'{spatial_dims: 3}' (the Conv-4 backbone), or give patch_size [H, W]"
            )
        ways, n_way = task.episode_ways(batch), getattr(self.learner, "n_way", None)
        if ways is not None and n_way is not None and ways != n_way:
            raise ValueError(
                f"the episodes are {ways}-way but the learner was built for n_way={n_way}; "
                f"set --model.learner.init_args.n_way {ways} or --data.init_args.n_way {n_way}"
            )

    def _score(self, stage: str, batch: Episode, probs: dict[str, torch.Tensor], baselines: bool,
               choices: dict | None = None) -> list[dict]:
        """Records of the batch's queries (`score_batch`). Episode ids count this rank's episodes in steps of
        the world size from its rank: each rank scores every world-size-th fixed episode, so the id is the
        episode's position in the fixed list, and no two ranks share an id."""
        world = self.trainer.world_size if self._trainer is not None else 1
        first = self._seen[stage] * world + self.global_rank
        self._seen[stage] += batch.n_tasks
        return score_batch(self.task, batch, probs, first_episode=first, episode_stride=world,
                           threshold=self.hparams["threshold"], baselines=baselines, choices_by_method=choices)

    def _finite(self, stage: str, name: str, probs: torch.Tensor, batch_idx: int) -> torch.Tensor:
        """``probs``, refused when any is NaN or infinite: scored, a NaN counted as class 0 or background, so a
        model that predicts nothing finite had a chance-level score and could be chosen as best.ckpt (a review)."""
        if not torch.isfinite(probs).all():
            why = ("the model has diverged; lower the learning rate (or the inner learning rate) and train again"
                   if name == TRAINED else "the learner at its initial weights gives them: check the inputs and the "
                   "learner's settings, or test with --model.baselines false")
            if self._trainer is not None and str(self.trainer.precision) == "16-true":
                # fit refuses 16-true; a test or validation of a sound checkpoint in float16 overflows (a review)
                why = ("float16 weights and activations (--trainer.precision 16-true) overflow in this learner; "
                       f"run it at 32-true, bf16-true or 16-mixed (otherwise: {why})")
            raise FloatingPointError(f"{name}: non-finite predictions in {stage} batch {batch_idx} (after step "
                                     f"{self.global_step}): {why}")
        return probs

    def validation_step(self, batch: Episode, batch_idx: int) -> None:
        self._check_batch(batch)
        probs = self._finite("validation", TRAINED, self.learner.predict(batch), batch_idx)
        recs = self._score("val", batch, {TRAINED: probs}, baselines=False)
        self._records["val"].extend(recs)
        if batch_idx == 0:  # the fixed validation episodes come in the same order every epoch
            self._log_panel("val", batch, probs)

    def on_validation_epoch_start(self) -> None:
        self._records["val"], self._seen["val"] = [], 0

    def on_validation_epoch_end(self) -> None:
        records = _gather(self._records["val"])
        if not records or self.trainer.sanity_checking:
            return
        task = self.task
        # the mean over every rank's queries, from the gathered records: a mean of the ranks' means would weigh
        # the queries of a rank with fewer episodes (an uneven split) more than the others
        score = _query_mean(records, task.metric)
        self.log(f"val/{task.metric}", score, prog_bar=True, sync_dist=True)  # the same value on every rank
        # val/score: what the checkpoint callback of every trainer config monitors, whatever the task
        self.log("val/score", score, sync_dist=True)
        self.log("hp/val_metric", score, sync_dist=True)  # the HPARAMS tab's column
        self._scored_since_plateau_step = True  # `lr_scheduler_step`
        summary = summarize(records, task.metric, task.groups)[TRAINED]
        for group in task.groups:
            for name, s in summary[group].items():
                # from the gathered records: the same value on every rank (sync_dist says so, and keeps Lightning quiet)
                self.log(f"val/{task.metric}/{group}/{name}", s["mean"], batch_size=s["n_episodes"], sync_dist=True)

    def on_test_epoch_start(self) -> None:
        self._records["test"], self._seen["test"] = [], 0
        for m in self._untrained:  # not a submodule: the precision plugin's dtype ("bf16-true") is given here
            m.to(device=self.device, dtype=cast(torch.dtype, self.dtype))

    def test_step(self, batch: Episode, batch_idx: int) -> None:
        self._check_batch(batch)
        probs = {TRAINED: self._finite("test", TRAINED, self.learner.predict(batch), batch_idx)}
        choices = {TRAINED: learner_choices(self.learner)}
        if self.hparams["baselines"] and self._untrained:
            probs[UNTRAINED] = self._finite("test", UNTRAINED, self._untrained[0].eval().predict(batch), batch_idx)
            choices[UNTRAINED] = learner_choices(self._untrained[0])
        recs = self._score("test", batch, probs, baselines=self.hparams["baselines"], choices=choices)
        self._records["test"].extend(recs)
        if batch_idx == 0:
            self._log_panel("test", batch, probs[TRAINED])

    def on_test_epoch_end(self) -> None:
        records = _gather(self._records["test"])
        if not records:
            return
        task = self.task
        score = _query_mean(records, task.metric)  # every rank's queries (see on_validation_epoch_end)
        self.log(f"test/{task.metric}", score, sync_dist=True)
        self.log("hp/test_metric", score, sync_dist=True)  # the same value: the HPARAMS tab's test column
        # the test report keeps Student's t over episodes (no resampling); `imaging-meta evaluate` bootstraps patients
        summary = summarize(records, task.metric, task.groups, interval=EPISODE_T)
        self.test_summary = summary
        self.test_differences = differences(records, task.metric, task.groups, interval=EPISODE_T)
        for group in task.groups:
            for name, s in summary[TRAINED][group].items():
                self.log(f"test/{task.metric}/{group}/{name}", s["mean"], batch_size=s["n_episodes"], sync_dist=True)
        out_dir = self.trainer.log_dir or self.trainer.default_root_dir  # a broadcast under DDP: every rank calls it
        if getattr(self.trainer, "fast_dev_run", False):  # a smoke test: no logger, and the folder would be the working directory
            logger.info("fast_dev_run: no test report written (test/%s is logged)", task.metric)
            return
        if self.global_rank == 0:
            self.report_paths = self._write_test_report(out_dir, summary, self.test_differences)

    def _write_test_report(self, out_dir: str, summary: dict, diffs: dict | None = None) -> tuple[Path, Path]:
        """``results.json`` and ``results.md`` of the test episodes, with the data and checkpoint they came from,
        and the trained learner minus each baseline, paired on the same queries."""
        task = self.task
        context: dict[str, Any] = {"title": "held-out test episodes", "imaging_meta_version": imaging_meta.__version__,
                   "learner": self.learner.config, "metric": task.metric, "interval": interval_description(EPISODE_T)}
        dm = self._datamodule()
        if dm is not None:
            context.update(dm.describe())
            context["n_shot"] = dm.n_shot
        if self.trainer.ckpt_path:
            context["checkpoint"] = str(self.trainer.ckpt_path)
        # what evaluate's report records of where its numbers came from (a review: fit's had none of it)
        context.update(provenance(), seed_everything=os.environ.get("PL_GLOBAL_SEED"))  # set by seed_everything
        context["fit_commits"] = list(self.fit_commits) or None  # the model's; None: not recorded
        # where it ran, as evaluate records it: GPU results agree with CPU ones only to a few decimals (a review)
        if task.dense:  # the mask threshold the Dice was scored at (a test may set another than the fit's; a review)
            context["threshold"] = self.hparams["threshold"]
        context["device"] = (f"{self.device} ({torch.cuda.get_device_name(self.device)})" if self.device.type == "cuda"
                             else str(self.device))
        context["precision"] = str(self.trainer.precision)  # bf16 scores differ from float32 ones (a review)
        if self.learner_changes:  # tested with other learner settings than the checkpoint was trained with
            context["learner_settings_not_the_checkpoints"] = changes_record(self.learner_changes)
        if self.preprocessing_changes:  # tested on data preprocessed otherwise than the checkpoint's
            context["preprocessing_not_the_checkpoints"] = changes_record(self.preprocessing_changes)
        methods = ordered_methods(summary)
        paths = write_report(out_dir, summary, context, methods, task=task, differences=diffs)
        logger.info("results written to %s and %s", *paths)  # the CLI prints the report itself
        return paths

    # ---------------------------------------------------------------- logging
    def _log_panel(self, stage: str, batch: Episode, probs: torch.Tensor) -> None:
        """``<stage>/panel``: the image panel of the batch (`imaging_meta.evaluation.panels.episode_panel`), in
        every logger that takes images (TensorBoard's ``add_image``), from rank 0, never in the sanity check."""
        if self.global_rank != 0 or self.hparams["n_log_images"] <= 0 or self._trainer is None or self.trainer.sanity_checking:
            return
        experiments = (getattr(lg, "experiment", None) for lg in self.trainer.loggers)
        writers: list[Any] = [e for e in experiments if hasattr(e, "add_image")]
        if not writers:
            return
        image = episode_panel(self.task, batch, probs, self.hparams["threshold"], self.hparams["n_log_images"])
        # at the step of the stage's scalars: Lightning logs a validation inside fit at the count of batches that
        # stepped the optimiser before it (logger_connector.log_metrics), which global_step - 1 equals only when
        # every batch steps (a review: with accumulate_grad_batches 2 and val_check_interval 1 a panel fell one
        # step below its scores)
        fitting = self.trainer.state.fn == "fit" and stage == "val"
        step = self.trainer.fit_loop.epoch_loop._batches_that_stepped if fitting else self.global_step
        for w in writers:
            w.add_image(f"{stage}/panel", image, step, dataformats="HWC")

    # ------------------------------------------------------------ checkpoints
    def on_fit_start(self) -> None:
        """This source's commit joins `fit_commits` (after a resumed checkpoint's are restored; a resume under other
        code adds its own), for the checkpoints and for a test of the model in memory (``--test_after_fit`` without
        checkpoints named no commit: a review)."""
        if self._fit_commit is None:
            self._fit_commit = str(provenance()["git_commit"])
        if not self.fit_commits or self.fit_commits[-1] != self._fit_commit:
            self.fit_commits = [*self.fit_commits, self._fit_commit]

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        extra: dict[str, Any] = {"learner_config": self.learner.config, "task": self.task.name, "version": imaging_meta.__version__}
        if self._untrained:
            extra["untrained_state_dict"] = untrained_state(self._untrained[0])
        dm = self._datamodule()
        if dm is not None:  # what `imaging-meta evaluate`, `segment` and `classify` rebuild from the checkpoint
            if dm.preprocessing is not None:
                extra["preprocessing"] = dm.preprocessing
            extra["data"] = dm.config()
            extra["split_digest"] = dm.split_digest()
            structures = dm.structure_digest()  # which label value is which structure, per scan (over every case)
            if structures is not None:
                extra["structure_digest"], extra["structure_values"] = structures, dm.structure_values()
            # self-supervised training on scans without any label map: no split to protect at evaluation
            extra["label_free"] = dm.label_free
        # every rank's random state (a learner may draw from torch's global generator, e.g. MANN's support
        # order), so that a resumed run continues each rank's random stream exactly
        extra["rng_states"] = _gather([rng_states()])
        # which source trained it, in order (`on_fit_start`): a test or results table names the commit it ran at, and
        # this one says which code made the model (a review)
        extra["fit_commits"] = list(self.fit_commits)
        checkpoint["imaging_meta"] = extra
        record_a_stopped_epoch_as_unfinished(self._trainer, checkpoint)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """`_check_and_restore`, its refusals prefixed with the checkpoint file when a trainer loads one (a review:
        under `fit`/`test --ckpt_path` only Lightning's earlier "Restoring states" line named the file)."""
        try:
            self._check_and_restore(checkpoint)
        except ValueError as e:
            where = self._trainer.ckpt_path if self._trainer is not None else None
            if where is None or str(where) in str(e):
                raise
            raise ValueError(f"{where}: {e}") from e

    def _check_and_restore(self, checkpoint: dict) -> None:
        extra = checkpoint.get("imaging_meta", {})
        self.fit_commits = [str(c) for c in extra.get("fit_commits") or []]
        saved = current_class_path(extra["learner_config"]["class_path"]) if extra.get("learner_config") else None
        if saved and saved != self.learner.config["class_path"]:
            from imaging_meta.commands.configs import model_configs_of

            configs = model_configs_of(saved, extra.get("task"))
            raise ValueError(
                f"the checkpoint holds the learner {saved}, but this run builds {self.learner.config['class_path']}; "
                "use the checkpoint's model config"
                + (f" ({' or '.join(configs)}, or the config.yaml saved beside the checkpoint's run)" if configs
                   else " (the config.yaml saved beside the checkpoint's run)")
            )
        self.learner_changes = learner_changes(extra.get("learner_config"), self.learner.config)
        if self.learner_changes:
            rank_zero_warn(
                "the learner is built with other settings than the checkpoint's: "
                + changes_text(self.learner_changes)
                + ". These are the settings that run (and that a test report records); to run the model as trained, "
                "pass the config saved beside its checkpoints (--config RUN/config.yaml), or use imaging-meta "
                "evaluate, which builds the learner from the checkpoint")
        dm = self._datamodule()
        task = extra.get("task")
        if dm is not None and task and dm.task != task:  # before the split check, which would blame the data's split
            raise ValueError(
                f"the checkpoint is a {task} model and this run's data is {dm.task} data; use a {task} data config "
                "(the config.yaml saved beside the checkpoint's run holds the one it trained on)")
        own = self.state_dict()
        theirs = checkpoint.get("state_dict") or {}
        wrong = [(k, tuple(v.shape), tuple(own[k].shape)) for k, v in theirs.items()
                 if k in own and hasattr(v, "shape") and tuple(v.shape) != tuple(own[k].shape)]
        missing, unexpected = sorted(set(own) - set(theirs)), sorted(set(theirs) - set(own))
        if theirs and (missing or unexpected):  # another architecture of the same learner (resnet against unet)
            raise ValueError(
                "the checkpoint's weights do not fit the learner this run builds: "
                + (f"{len(missing)} tensor(s) of this learner are not in the checkpoint (e.g. {missing[0]})"
                   if missing else "")
                + ("; " if missing and unexpected else "")
                + (f"{len(unexpected)} tensor(s) of the checkpoint are not in this learner (e.g. {unexpected[0]})"
                   if unexpected else "")
                + "; build it as in training: the same model config (its backbone and backbone_kwargs) and learner "
                "arguments: the config.yaml saved beside the checkpoint's run holds them")
        if wrong:
            key, theirs, ours = wrong[0]
            raise ValueError(
                f"the checkpoint's weights do not fit the learner this run builds: {key} is {list(theirs)} in the "
                f"checkpoint and {list(ours)} here ({len(wrong)} such tensor(s)); build it as in training: the same "
                "model config and learner arguments, and the same n_way in the data config"
            )
        mismatch = split_mismatch(extra, dm) if dm is not None else None
        if mismatch is not None:
            raise ValueError(
                f"the data of this run is not split as when the checkpoint was trained (split digest "
                f"{mismatch[0]} != {mismatch[1]}): other data under the root, other split settings (split_seed, "
                "test or validation organs, sites or classes) or other pseudonymous ids (set IMAGING_META_SALT to the "
                f"training one), {SPLIT_RULE_CHANGES}. Its test or validation set could hold patients, organs or classes the model trained "
                "on, so nothing was run; use the data config and settings of the training run: the config it saved "
                "beside its checkpoints holds them all (--config runs/<name>/version_N/config.yaml --ckpt_path ...)"
            )
        # after the split check: another salt or other scans change the case ids this digest is keyed by too
        renamed = structure_mismatch(extra, dm) if dm is not None else None
        if renamed is not None:
            raise ValueError(f"the label maps of this run's data name their structures unlike the checkpoint's "
                             f"training data ({renamed}): a held-out structure could be one the model trained on, so "
                             "nothing was run; use the label_names (and dataset.json files) of the training run")
        self.preprocessing_changes = preprocessing_changes(extra.get("preprocessing"), dm.preprocessing if dm else None)
        if self.preprocessing_changes:  # a user's own data config with another spacing or window (a review)
            rank_zero_warn(
                "this run's data is preprocessed unlike the checkpoint's: "
                + changes_text(self.preprocessing_changes)
                + ". The model then sees other pixels than it trained on, and its scores describe this preprocessing "
                "(a test report records it); to run the model as trained, set these in the data config as the "
                "checkpoint has them (the config.yaml saved beside its run holds them), or use imaging-meta evaluate, "
                "segment or classify, which take the preprocessing from the checkpoint")
        if self._untrained:
            restore_untrained(extra, into=self._untrained[0])
        states = extra.get("rng_states") or []
        fitting = self._trainer is not None and self.trainer.state.fn == "fit"
        if fitting and "current_model_state" in checkpoint:
            self._resume_weights(checkpoint)
        if fitting and len(states) == self.trainer.world_size:  # resuming training: each rank where it was
            set_rng_states(states[self.global_rank])
