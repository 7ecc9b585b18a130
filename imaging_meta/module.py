"""`EpisodicModule`: the one LightningModule. It wraps any `Learner`.

It owns the training, validation and test steps, the optimiser and scheduler (injected as callables from
the config), the metrics (``train/loss``; segmentation: ``val/dice``, ``val/dice/organ/<name>``,
``val/dice/site/<name>``, ``test/dice``; classification: ``val/acc``, ``val/acc/site/<name>``, ``test/acc``;
both: ``val/score``, which the checkpoint callbacks monitor), TensorBoard image panels, and the test report
with its baselines. What differs between the kinds of task comes from the learner's `Task`; queries are
scored by `imaging_meta.evaluation.scoring.score_batch`, as in ``imaging-meta evaluate``. Only pseudonymous
case ids and site keys reach logs, checkpoints and reports.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable

import imaging_meta
from datamodules.base import EpisodicDataModule
from imaging_meta.checkpoint_io import current_class_path
from imaging_meta.episode import Episode
from imaging_meta.evaluation.methods import (
    TRAINED,
    UNTRAINED,
    initial_copy,
    ordered_methods,
    restore_untrained,
    untrained_state,
)
from imaging_meta.evaluation.reports import to_markdown, write_report
from imaging_meta.evaluation.scoring import learner_choices, score_batch
from imaging_meta.evaluation.statistics import EPISODE_T, differences, interval_description, summarize
from imaging_meta.learners.base import Learner
from imaging_meta.tasks import COPY_MASK, Task, get_task, task_of_episode

__all__ = ["COPY_MASK", "TRAINED", "UNTRAINED", "EpisodicModule", "rng_states", "set_rng_states"]

logger = logging.getLogger(__name__)


def _gather(records: list[dict]) -> list[dict]:
    """All ranks' records (identity without torch.distributed)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        out: list = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(out, records)
        return [r for part in out for r in part]
    return records


def rng_states() -> dict:
    """This process's torch, CUDA, NumPy and Python random states, in types ``torch.load(weights_only=True)`` reads."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
             "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_states(state: dict) -> None:
    """Restore what `rng_states` returned."""
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), int(pos), int(has_gauss), float(gauss)))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


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
        n_log_images: query/truth/prediction panels logged to TensorBoard per validation epoch.
    """

    def __init__(
        self,
        learner: Learner,
        optimizer: OptimizerCallable = torch.optim.Adam,
        lr_scheduler: LRSchedulerCallable | None = None,
        baselines: bool = True,
        threshold: float = 0.5,
        n_log_images: int = 4,
    ) -> None:
        super().__init__()
        if not isinstance(learner, Learner):
            raise TypeError(f"learner must be an imaging_meta Learner, got {type(learner).__name__}")
        # the learner and the factories are kept out of hparams: checkpoints must load with weights_only=True
        self.save_hyperparameters(ignore=["learner", "optimizer", "lr_scheduler"])
        self.learner = learner
        self.optimizer_factory: Callable = optimizer
        self.scheduler_factory: Callable | None = lr_scheduler
        # the initial weights: the "untrained encoder" baseline, in a list so that it is not a submodule
        self._untrained = [initial_copy(learner)] if baselines else []
        self._records: dict[str, list[dict]] = {"val": [], "test": []}
        self._seen = {"val": 0, "test": 0}  # episodes this rank has scored in the current epoch
        self.test_summary: dict | None = None
        self.test_differences: dict | None = None  # trained − each baseline, paired on the same queries
        self.report_paths: tuple[Path, Path] | None = None

    @property
    def task(self) -> Task:
        """The learner's kind of task: the metric, decision rule, report rows and baselines."""
        return get_task(self.learner.task)

    def _datamodule(self) -> EpisodicDataModule | None:
        """The trainer's datamodule when it is an `EpisodicDataModule` (a fit on bare dataloaders has none)."""
        dm = self.trainer.datamodule if self._trainer is not None else None
        return dm if isinstance(dm, EpisodicDataModule) else None

    # --------------------------------------------------------------- training
    def training_step(self, batch: Episode, batch_idx: int) -> torch.Tensor:
        # under DDP this runs inside the wrapped forward. MAML-family learners differentiate each task inside
        # `loss` and free its graph (`inner_loop.per_task_backward`); the loss they return hands the summed
        # gradients over in Lightning's one backward, so automatic optimisation, clipping, accumulation, loss
        # scaling and DDP's one gradient synchronisation per step are unchanged
        loss = self.learner.loss(batch)
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"non-finite training loss {loss.item()} at step {self.global_step}; lower the learning rate or check the inputs"
            )
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=batch.n_tasks, sync_dist=True)
        return loss

    def configure_optimizers(self):
        opt = self.optimizer_factory(self.learner.parameters())
        if self.scheduler_factory is None:
            return opt
        sched = self.scheduler_factory(opt)
        cfg = {"scheduler": sched, "interval": "epoch"}
        if isinstance(sched, torch.optim.lr_scheduler.ReduceLROnPlateau):
            cfg["monitor"] = "val/score"
        return {"optimizer": opt, "lr_scheduler": cfg}

    # ------------------------------------------------------------- evaluation
    def _check_batch(self, batch: Episode) -> None:
        task = self.task
        if not task.labels_fit(batch.query_images, batch.query_labels):
            raise ValueError(
                f"the {type(self.learner).__name__} learner is a {task.name} learner, but the data gives "
                f"{task_of_episode(batch).label_kind}; pair a *_seg model config with a segmentation data config and "
                "a *_cls one with a classification one"
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
                           threshold=self.hparams.threshold, baselines=baselines, choices_by_method=choices)

    def validation_step(self, batch: Episode, batch_idx: int) -> None:
        self._check_batch(batch)
        probs = self.learner.predict(batch)
        recs = self._score("val", batch, {TRAINED: probs}, baselines=False)
        self._records["val"].extend(recs)
        metric = self.task.metric
        score = sum(r[metric] for r in recs) / len(recs)
        self.log(f"val/{metric}", score, prog_bar=True, batch_size=len(recs), sync_dist=True)
        # val/score: what the checkpoint callback of every trainer config monitors, whatever the task
        self.log("val/score", score, batch_size=len(recs), sync_dist=True)
        if batch_idx == 0 and self.task.dense:
            self._log_panels(batch, probs)

    def on_validation_epoch_start(self) -> None:
        self._records["val"], self._seen["val"] = [], 0

    def on_validation_epoch_end(self) -> None:
        records = _gather(self._records["val"])
        if not records or self.trainer.sanity_checking:
            return
        task = self.task
        summary = summarize(records, task.metric, task.groups)[TRAINED]
        for group in task.groups:
            for name, s in summary[group].items():
                self.log(f"val/{task.metric}/{group}/{name}", s["mean"], batch_size=s["n_episodes"])

    def on_test_epoch_start(self) -> None:
        self._records["test"], self._seen["test"] = [], 0
        for m in self._untrained:
            m.to(self.device)

    def test_step(self, batch: Episode, batch_idx: int) -> None:
        self._check_batch(batch)
        probs = {TRAINED: self.learner.predict(batch)}
        choices = {TRAINED: learner_choices(self.learner)}
        if self.hparams.baselines and self._untrained:
            probs[UNTRAINED] = self._untrained[0].eval().predict(batch)
            choices[UNTRAINED] = learner_choices(self._untrained[0])
        recs = self._score("test", batch, probs, baselines=self.hparams.baselines, choices=choices)
        metric = self.task.metric
        trained = [r[metric] for r in recs if r["method"] == TRAINED]
        self.log(f"test/{metric}", sum(trained) / len(trained), batch_size=len(trained), sync_dist=True)
        self._records["test"].extend(recs)

    def on_test_epoch_end(self) -> None:
        records = _gather(self._records["test"])
        if not records:
            return
        task = self.task
        # the test report keeps Student's t over episodes (no resampling); `imaging-meta evaluate` bootstraps patients
        summary = summarize(records, task.metric, task.groups, interval=EPISODE_T)
        self.test_summary = summary
        self.test_differences = differences(records, task.metric, task.groups, interval=EPISODE_T)
        for group in task.groups:
            for name, s in summary[TRAINED][group].items():
                self.log(f"test/{task.metric}/{group}/{name}", s["mean"], batch_size=s["n_episodes"])
        out_dir = self.trainer.log_dir or self.trainer.default_root_dir  # a broadcast under DDP: every rank calls it
        if self.global_rank == 0:
            self.report_paths = self._write_test_report(out_dir, summary, self.test_differences)

    def _write_test_report(self, out_dir: str, summary: dict, diffs: dict | None = None) -> tuple[Path, Path]:
        """``results.json`` and ``results.md`` of the test episodes, with the data and checkpoint they came from,
        and the trained learner minus each baseline, paired on the same queries."""
        task = self.task
        context = {"title": "held-out test episodes", "imaging_meta_version": imaging_meta.__version__,
                   "learner": self.learner.config, "metric": task.metric, "interval": interval_description(EPISODE_T)}
        dm = self._datamodule()
        if dm is not None:
            context.update(dm.describe())
            context["n_shot"] = dm.n_shot
        if self.trainer.ckpt_path:
            context["checkpoint"] = str(self.trainer.ckpt_path)
        methods = ordered_methods(summary)
        paths = write_report(out_dir, summary, context, methods, task=task, differences=diffs)
        logger.info("results written to %s\n%s", paths[1],
                    to_markdown(summary, methods, title=task.metric_title, groups=task.groups, differences=diffs))
        return paths

    # ---------------------------------------------------------------- logging
    def _log_panels(self, batch: Episode, probs: torch.Tensor) -> None:
        """Query | truth | prediction | probability panels of masks (one row per task) for TensorBoard."""
        exp = getattr(self.logger, "experiment", None)
        if self.global_rank != 0 or not hasattr(exp, "add_image") or self.hparams.n_log_images <= 0:
            return
        rows = []
        for i in range(min(self.hparams.n_log_images, batch.n_tasks)):
            img = batch.query_images[i, 0, 0].float()
            img = (img - img.min()) / (img.max() - img.min() + 1e-6)
            truth = batch.query_labels[i, 0].float()
            pred = self.task.decide(probs[i, 0], self.hparams.threshold).float()
            rows.append(torch.cat([img, truth, pred, probs[i, 0].float()], dim=1))
        panel = torch.cat(rows, dim=0).clamp(0, 1).unsqueeze(0).cpu()
        exp.add_image("val/query_truth_prediction_probability", panel, self.global_step)

    # ------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        extra = {"learner_config": self.learner.config, "task": self.task.name, "version": imaging_meta.__version__}
        if self._untrained:
            extra["untrained_state_dict"] = untrained_state(self._untrained[0])
        dm = self._datamodule()
        if dm is not None:  # what `imaging-meta evaluate`, `segment` and `classify` rebuild from the checkpoint
            if dm.preprocessing is not None:
                extra["preprocessing"] = dm.preprocessing
            extra["data"] = dm.config()
            extra["split_digest"] = dm.split_digest()
            # self-supervised training on scans without any label map: no split to protect at evaluation
            extra["label_free"] = dm.label_free
        # every rank's random state (a learner may draw from torch's global generator, e.g. MANN's support
        # order), so that a resumed run continues each rank's random stream exactly
        extra["rng_states"] = _gather([rng_states()])
        checkpoint["imaging_meta"] = extra

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        extra = checkpoint.get("imaging_meta", {})
        saved = current_class_path(extra["learner_config"]["class_path"]) if extra.get("learner_config") else None
        if saved and saved != self.learner.config["class_path"]:
            raise ValueError(
                f"the checkpoint holds a {saved} learner, but this run builds "
                f"{self.learner.config['class_path']}; use the checkpoint's model config"
            )
        if self._untrained:
            restore_untrained(extra, into=self._untrained[0])
        states = extra.get("rng_states") or []
        fitting = self._trainer is not None and self.trainer.state.fn == "fit"
        if fitting and len(states) == self.trainer.world_size:  # resuming training: each rank where it was
            set_rng_states(states[self.global_rank])
