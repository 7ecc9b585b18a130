"""Stochastic weight averaging for meta-training: `LateWeightAveraging`, the equal-weight average of every
optimizer step's weights from a fraction of training on (Izmailov et al., "Averaging Weights Leads to Wider
Optima and Better Generalization", UAI 2018, with a constant learning rate).

Why: a few-shot learner's held-out score moves a lot from one epoch to the next (on the demo, `make train`'s test
Dice went 0.488-0.591 over its ten epochs), and validation on one held-out organ picks one of those epochs. The
average of the late weights sits between them. It is Lightning's `WeightAveraging` with four changes:

* averaging starts at ``start`` (a fraction of the fit's optimizer steps, `Trainer.estimated_stepping_batches`),
  not at the first step, which would put the random initial weights in the average;
* until it starts, validation, checkpoints and the end of fit use the current weights (Lightning's callback
  swaps in an average that is still the initial copy);
* a checkpoint loaded to test, validate or predict keeps the averaged weights it holds (Lightning's callback,
  when it is still attached after fit, would load the pre-average weights for ``--test_after_fit``);
* checkpoint selection compares averaged models only: at the first validation of the average, the monitored
  `ModelCheckpoint` callbacks (``best.ckpt``) forget, and delete, the plain checkpoints they kept (a callback
  that keeps every checkpoint, ``save_top_k: -1``, forgets them and keeps the files). Otherwise an
  early epoch that the noisy validation happened to like beats every average (on the demo, epoch 3 of 10 did).

Once averaging has started, every checkpoint holds the average as its ``state_dict`` (what `imaging-meta
evaluate`, ``segment`` and ``classify`` load) and the current weights under ``current_model_state``, so that
``--ckpt_path last.ckpt`` resumes both. `EpisodicModule(weight_averaging=0.5)` adds it (a model config option).
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint, WeightAveraging

#: logged at each validation of a fit: 1 when the weights validated are an average, 0 before averaging starts
AVERAGED_TAG = "val/averaged"

#: the refusal of a fit without a bound on its optimizer steps
UNBOUNDED = ("weight averaging starts at a fraction of the fit's optimizer steps, and this fit has no bound on them "
             "(max_epochs -1 without max_steps): set --trainer.max_epochs or --trainer.max_steps, or leave averaging "
             "out with --model.weight_averaging null")


class LateWeightAveraging(WeightAveraging):
    """The equal-weight average of the weights after every optimizer step from ``start`` of the fit on.

    Args:
        start: when averaging starts, as a fraction in [0, 1) of the fit's optimizer steps.
        device: where the average is kept (default: the model's device).
    """

    def __init__(self, start: float = 0.5, device: str | None = None) -> None:
        if not 0.0 <= float(start) < 1.0:
            raise ValueError(f"weight averaging starts at a fraction of training in [0, 1), got {start}")
        super().__init__(device=device, use_buffers=True)
        self.start = float(start)
        self.start_step = 0
        self.selection_reset = False  # whether the monitored checkpoints have forgotten the plain models

    @property
    def started(self) -> bool:
        """Whether the average holds at least one step's weights."""
        return self._average_model is not None and int(self._average_model.n_averaged) > 0

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage == "fit" and trainer.max_steps == -1 and trainer.max_epochs == -1:
            raise ValueError(UNBOUNDED)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # not in setup: `estimated_stepping_batches` builds the training loader, which there comes before a resumed
        # checkpoint is restored, and a loader with workers starts drawing episodes at once (from epoch 0)
        total = trainer.estimated_stepping_batches
        if not math.isfinite(total):
            raise ValueError(UNBOUNDED)
        self.start_step = math.floor(self.start * total)
        saved = getattr(self, "_saved_start_step", None)
        # a resume with other max_epochs or max_steps differs from training straight to its length only where the
        # average of either started before the resumed step (a review: resumed before either start, it warned of
        # a difference there is none)
        if saved is not None and saved != self.start_step and trainer.global_step > min(saved, self.start_step):
            warnings.warn(
                f"resumed with another length of training ({total} steps in all): weight averaging starts at step "
                f"{self.start_step}, where the run that was saved started it at step {saved}; the result is not the "
                "one training straight to this length gives (a resume is exact with the same max_epochs and "
                "max_steps; with model.weight_averaging: null it continues from the current weights, without their "
                "average)", stacklevel=2)
        super().on_train_start(trainer, pl_module)

    def should_update(self, step_idx: int | None = None, epoch_idx: int | None = None) -> bool:
        return step_idx is not None and step_idx >= self.start_step

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn == "fit" and not trainer.sanity_checking:
            # TensorBoard's mark of which validations scored an average: best.ckpt is chosen among those alone, so
            # a higher val/score before averaging started is not the tested model (a review)
            pl_module.log(AVERAGED_TAG, float(self.started), rank_zero_only=True)
        if self.started:
            if not self.selection_reset:
                forget_selection(trainer)
                self.selection_reset = True
            super().on_validation_epoch_start(trainer, pl_module)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.started:
            super().on_validation_epoch_end(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.started:
            super().on_train_end(trainer, pl_module)

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        if self.started:
            super().on_save_checkpoint(trainer, pl_module, checkpoint)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "selection_reset": self.selection_reset, "start_step": self.start_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.selection_reset = bool(state_dict.get("selection_reset", False))
        self._saved_start_step = state_dict.get("start_step")  # compared with this run's in on_train_start

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        # resuming a fit restores the average and the current weights; anything else keeps the averaged
        # state_dict that Lightning has already loaded into the model
        if trainer.state.fn == "fit" and "averaging_state" in checkpoint:
            super().on_load_checkpoint(trainer, pl_module, checkpoint)


def forget_selection(trainer: pl.Trainer) -> None:
    """Make every monitored `ModelCheckpoint` of the trainer start its selection afresh, so that it compares
    averaged models only.

    The checkpoints a callback keeps (``save_top_k`` of 1 or more, as the shipped ``best.ckpt``) stay on disk
    until the next selection replaces them: they are kept as its worst entries, so its next save writes over
    ``best.ckpt`` in place (a file named by a template is removed once its replacement is saved). They used to be
    deleted when validation started, and a run stopped before that validation ended had no ``best.ckpt`` at all
    (a review). A callback that keeps every checkpoint (``save_top_k: -1``) keeps their files, and forgets them."""
    for cb in trainer.checkpoint_callbacks:
        if not isinstance(cb, ModelCheckpoint) or cb.monitor is None:
            continue
        worst = torch.tensor(-torch.inf if cb.mode == "max" else torch.inf)
        kept = [p for p in cb.best_k_models if p != cb.last_model_path] if cb.save_top_k != -1 else []
        cb.best_k_models = {path: worst for path in kept}
        cb.kth_best_model_path = kept[-1] if kept else ""
        cb.kth_value = worst
        cb.best_model_path = ""
        cb.best_model_score = None
