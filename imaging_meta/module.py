"""`EpisodicModule`: the one LightningModule. It wraps any `Learner`.

It owns the training, validation and test steps, the optimiser and scheduler (injected as callables from
the config), the metrics (``train/loss``; segmentation: ``val/dice``, ``val/dice/organ/<name>``,
``val/dice/site/<name>``, ``test/dice``; classification: ``val/acc``, ``val/acc/site/<name>``, ``test/acc``;
both: ``val/score``, which the checkpoint callbacks monitor), TensorBoard image panels, and the test report with its baselines. Only
pseudonymous case ids and site keys reach logs, checkpoints and reports.
"""

from __future__ import annotations

import copy
import logging
import random
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable

import imaging_meta
from imaging_meta.episode import Episode
from imaging_meta.evaluation import (
    COPY_MASK,
    TRAINED,
    UNTRAINED,
    ordered_methods,
    summarize,
    to_markdown,
    write_report,
)
from imaging_meta.learners.base import Learner
from imaging_meta.metrics import dice_score

logger = logging.getLogger(__name__)

METRIC_TITLES = {"dice": "Dice", "acc": "accuracy"}


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


def data_config(dm) -> dict:
    """``{"class_path", "init_args"}`` of a datamodule, as `imaging-meta evaluate` needs it to rebuild the
    split the model was trained on (secrets such as the salt are not hyperparameters, so never stored)."""
    args = {k: v for k, v in dict(getattr(dm, "hparams", {})).items() if not k.startswith("_")}
    source = getattr(dm, "source", None)
    if source is not None and hasattr(source, "config"):
        try:
            args["source"] = source.config()
        except ValueError as e:  # a user's source that does not keep its arguments: evaluate asks for --data-config
            logger.warning("the checkpoint will not record the data source (%s)", e)
    return {"class_path": f"{type(dm).__module__}.{type(dm).__qualname__}", "init_args": args}


class EpisodicModule(LightningModule):
    """Meta-trains and evaluates a `Learner` on batches of episodes.

    Args:
        learner: the learner (``class_path``/``init_args`` in YAML).
        optimizer: optimiser factory, called with the parameters.
        lr_scheduler: optional scheduler factory, called with the optimiser.
        baselines: in test, also score the untrained learner (its weights at construction, kept in the
            checkpoint) and, for segmentation, "copy the support mask", on the same episodes.
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
        # a frozen copy of the initial weights: the "untrained encoder" baseline (not a submodule)
        # its parameters keep requires_grad: gradient-based learners adapt them in predict (through
        # torch.autograd.grad, which never fills .grad), and no optimiser ever sees them
        self._untrained = [copy.deepcopy(learner)] if baselines else []
        self._records: dict[str, list[dict]] = {"val": [], "test": []}
        self.test_summary: dict | None = None
        self.report_paths: tuple[Path, Path] | None = None

    # --------------------------------------------------------------- training
    def training_step(self, batch: Episode, batch_idx: int) -> torch.Tensor:
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
    @property
    def metric(self) -> str:
        """``dice`` for segmentation learners, ``acc`` for classification ones."""
        return "dice" if self.learner.task == "segmentation" else "acc"

    @property
    def groups(self) -> tuple[str, ...]:
        """Report rows: per organ and site for segmentation; per site for classification (an episode
        holds several classes, so the unit of the CI, the episode, has no single class)."""
        return ("organ", "site") if self.learner.task == "segmentation" else ("site",)

    def _check_batch(self, batch: Episode) -> None:
        task = self.learner.task
        is_seg = batch.query_labels.dim() == batch.query_images.dim() - 1  # (T, Q, H, W) masks of (T, Q, C, H, W)
        if (task == "segmentation") != is_seg:
            kind = "segmentation masks" if is_seg else "class labels"
            raise ValueError(
                f"the {type(self.learner).__name__} learner is a {task} learner, but the data gives {kind}; "
                "pair a *_seg model config with a segmentation data config and a *_cls one with a classification one"
            )
        n_way = getattr(self.learner, "n_way", None)
        if task == "classification" and n_way is not None and len(batch.classes[0]) != n_way:
            raise ValueError(
                f"the episodes are {len(batch.classes[0])}-way but the learner was built for n_way={n_way}; "
                f"set --model.learner.init_args.n_way {len(batch.classes[0])} or --data.init_args.n_way {n_way}"
            )

    def _records_for(self, batch: Episode, pred: torch.Tensor, method: str, stage: str, batch_idx: int) -> list[dict]:
        """One record per query: Dice of ``pred`` (T, Q, H, W) masks, or accuracy of ``pred`` (T, Q) class indices."""
        t, q = pred.shape[:2]
        if self.metric == "dice":
            scores = dice_score(pred.flatten(0, 1), batch.query_labels.flatten(0, 1) > 0.5).view(t, q).cpu()
        else:
            scores = (pred == batch.query_labels).float().cpu()
        out = []
        for i in range(t):
            for j in range(q):
                site = batch.site[i]
                query_sites = batch.meta[i].get("query_sites") if isinstance(batch.meta, list) and batch.meta[i] else None
                if self.metric == "dice" and query_sites:  # each query slice comes from its own patient
                    site = query_sites[j]
                if self.metric == "acc" and " + " in str(site):  # queries from several sites: one report row
                    site = "mixed sites"
                rec = {
                    "method": method,
                    "episode": f"{stage}-{self.global_rank}-{batch_idx}-{i}",
                    "site": site,
                    "query_id": batch.query_ids[i][j],
                    self.metric: float(scores[i, j]),
                }
                if self.metric == "dice":
                    rec["organ"] = batch.classes[i][0]
                else:
                    rec["class"] = batch.classes[i][int(batch.query_labels[i, j])]
                out.append(rec)
        return out

    def _decide(self, probs: torch.Tensor) -> torch.Tensor:
        """Masks (probability > threshold) or class indices (argmax) from the learner's probabilities."""
        return probs > self.hparams.threshold if self.metric == "dice" else probs.argmax(-1)

    def validation_step(self, batch: Episode, batch_idx: int) -> None:
        self._check_batch(batch)
        probs = self.learner.predict(batch)
        recs = self._records_for(batch, self._decide(probs), TRAINED, "val", batch_idx)
        self._records["val"].extend(recs)
        score = sum(r[self.metric] for r in recs) / len(recs)
        self.log(f"val/{self.metric}", score, prog_bar=True, batch_size=len(recs), sync_dist=True)
        # val/score: what the checkpoint callback of every trainer config monitors, whatever the task
        self.log("val/score", score, batch_size=len(recs), sync_dist=True)
        if batch_idx == 0 and self.metric == "dice":
            self._log_panels(batch, probs)

    def on_validation_epoch_start(self) -> None:
        self._records["val"] = []

    def on_validation_epoch_end(self) -> None:
        records = _gather(self._records["val"])
        if not records or self.trainer.sanity_checking:
            return
        summary = summarize(records, self.metric, self.groups)[TRAINED]
        for group in self.groups:
            for name, s in summary[group].items():
                self.log(f"val/{self.metric}/{group}/{name}", s["mean"], batch_size=s["n_episodes"])

    def on_test_epoch_start(self) -> None:
        self._records["test"] = []
        for m in self._untrained:
            m.to(self.device)

    def test_step(self, batch: Episode, batch_idx: int) -> None:
        self._check_batch(batch)
        recs = self._records_for(batch, self._decide(self.learner.predict(batch)), TRAINED, "test", batch_idx)
        self.log(f"test/{self.metric}", sum(r[self.metric] for r in recs) / len(recs), batch_size=len(recs), sync_dist=True)
        if self.hparams.baselines:
            if self._untrained:
                untrained = self._untrained[0].eval()
                recs += self._records_for(batch, self._decide(untrained.predict(batch)), UNTRAINED, "test", batch_idx)
            if self.metric == "dice":
                copy_pred = batch.support_labels.float().mean(1, keepdim=True) > 0.5  # (T, 1, H, W)
                copy_pred = copy_pred.expand_as(batch.query_labels)
                recs += self._records_for(batch, copy_pred, COPY_MASK, "test", batch_idx)
        self._records["test"].extend(recs)

    def on_test_epoch_end(self) -> None:
        records = _gather(self._records["test"])
        if not records:
            return
        summary = summarize(records, self.metric, self.groups)
        self.test_summary = summary
        for group in self.groups:
            for name, s in summary[TRAINED][group].items():
                self.log(f"test/{self.metric}/{group}/{name}", s["mean"], batch_size=s["n_episodes"])
        out_dir = self.trainer.log_dir or self.trainer.default_root_dir  # a broadcast under DDP: every rank calls it
        if self.global_rank == 0:
            dm = getattr(self.trainer, "datamodule", None)
            context = {"title": "held-out test episodes", "imaging_meta_version": imaging_meta.__version__,
                       "learner": self.learner.config, "metric": self.metric}
            if dm is not None and hasattr(dm, "describe"):
                context.update(dm.describe())
                context["n_shot"] = dm.hparams.n_shot
            ckpt = getattr(self.trainer, "ckpt_path", None)
            if ckpt:
                context["checkpoint"] = str(ckpt)
            methods = ordered_methods(summary)
            self.report_paths = write_report(out_dir, summary, context, methods, groups=self.groups)
            logger.info("results written to %s\n%s", self.report_paths[1],
                        to_markdown(summary, methods, title=METRIC_TITLES[self.metric], groups=self.groups))

    # ---------------------------------------------------------------- logging
    def _log_panels(self, batch: Episode, probs: torch.Tensor) -> None:
        """Query | truth | prediction panels (one row per task) for TensorBoard."""
        exp = getattr(self.logger, "experiment", None)
        if self.global_rank != 0 or not hasattr(exp, "add_image") or self.hparams.n_log_images <= 0:
            return
        rows = []
        for i in range(min(self.hparams.n_log_images, batch.n_tasks)):
            img = batch.query_images[i, 0, 0].float()
            img = (img - img.min()) / (img.max() - img.min() + 1e-6)
            truth = batch.query_labels[i, 0].float()
            pred = (probs[i, 0] > self.hparams.threshold).float()
            rows.append(torch.cat([img, truth, pred, probs[i, 0].float()], dim=1))
        panel = torch.cat(rows, dim=0).clamp(0, 1).unsqueeze(0).cpu()
        exp.add_image("val/query_truth_prediction_probability", panel, self.global_step)

    # ------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        extra = {"learner_config": self.learner.config, "task": self.learner.task, "version": imaging_meta.__version__}
        if self._untrained:
            extra["untrained_state_dict"] = {  # extra state (a learner's class-name table) is kept as it is
                k: v.detach().cpu() if isinstance(v, torch.Tensor) else v for k, v in self._untrained[0].state_dict().items()
            }
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if dm is not None and hasattr(dm, "preprocessing"):
            extra["preprocessing"] = dm.preprocessing
        if dm is not None:
            extra["data"] = data_config(dm)
            if hasattr(dm, "split_digest"):
                extra["split_digest"] = dm.split_digest()
            # self-supervised training on scans without any label map: no split to protect at evaluation
            extra["label_free"] = getattr(dm, "cases", None) == [] and getattr(dm.hparams, "selfsup_ratio", 0) == 1.0
        # every rank's random state (a learner may draw from torch's global generator, e.g. MANN's support
        # order), so that a resumed run continues each rank's random stream exactly
        extra["rng_states"] = _gather([rng_states()])
        checkpoint["imaging_meta"] = extra

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        extra = checkpoint.get("imaging_meta", {})
        if extra.get("learner_config") and extra["learner_config"]["class_path"] != self.learner.config["class_path"]:
            raise ValueError(
                f"the checkpoint holds a {extra['learner_config']['class_path']} learner, but this run builds "
                f"{self.learner.config['class_path']}; use the checkpoint's model config"
            )
        if self._untrained and "untrained_state_dict" in extra:
            self._untrained[0].load_state_dict(extra["untrained_state_dict"])
        states = extra.get("rng_states") or []
        fitting = self._trainer is not None and self.trainer.state.fn == "fit"
        if fitting and len(states) == self.trainer.world_size:  # resuming training: each rank where it was
            set_rng_states(states[self.global_rank])
