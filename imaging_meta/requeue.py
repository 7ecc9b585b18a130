"""SLURM's auto-requeue at a point every rank reaches together.

Lightning's own handler of the requeue signal (``SIGUSR1``, as ``sbatch --signal=SIGUSR1@90`` asks) saves the
hpc checkpoint and requeues the job from inside the signal handler, at whatever point each process has reached.
The save holds collective operations (Lightning's barrier, and the module's gather of its records), so when the
ranks receive the signal at slightly different moments (across nodes it is not delivered everywhere at once) one
rank waits in the save's barrier while another waits in the step's gradient all-reduce, and the job hangs until
SLURM kills it, with no checkpoint and no requeue (a review, 2026-12-07: signals 0.35 s apart on 2 CPU ranks).
Even in one process the handler could save in the middle of an optimiser step.

`SlurmRequeue` replaces that handler by one that only notes the signal. At the start of each training batch that
opens an accumulation window, and at the end of training, the ranks agree (an all-reduce of one number, the
largest) whether any of them has it, and then all of them run
Lightning's own save-and-requeue together (``_SignalConnector._slurm_sigusr_handler_fn``: the loggers finalised,
the hpc checkpoint saved, ``scontrol requeue`` on rank 0). It acts only under Lightning's SLURM environment with
``auto_requeue`` on (its default), on the environment's ``requeue_signal``; anywhere else it does nothing.
``imaging-meta fit`` adds it to every trainer; a Trainer built by hand takes it in ``callbacks``.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
from types import FrameType
from typing import Any

import torch
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch import Callback, LightningModule, Trainer

logger = logging.getLogger(__name__)


class SlurmRequeue(Callback):
    """Defers SLURM's requeue signal to the start of the next training batch (or the end of training), where every
    rank saves and requeues together."""

    def __init__(self) -> None:
        self.signum: int | None = None  # the signal handled here while fitting under SLURM; None: inactive
        self.asked = False
        self._previous: Any = None

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        # where Lightning's signal connector looks (a one-device strategy has no environment of its own)
        env = getattr(getattr(trainer, "_accelerator_connector", None), "cluster_environment", None)
        if (stage != "fit" or sys.platform == "win32" or threading.current_thread() is not threading.main_thread()
                or not isinstance(env, SLURMEnvironment) or not env.auto_requeue):
            return
        # installed before the trainer registers its handlers (setup comes first), which then keeps this one
        self.signum = int(env.requeue_signal if env.requeue_signal is not None else signal.SIGUSR1)
        self.asked = False
        self._previous = signal.getsignal(self.signum)
        signal.signal(self.signum, self._note)

    def _note(self, signum: int, frame: FrameType | None) -> None:
        logger.info("received signal %d: the job is saved and requeued before the next training batch", signum)
        self.asked = True

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        # at the start of the next batch, after every callback's end of the last one (weight averaging's update
        # included), and only where an accumulation window has closed (a review: at a batch's end the save came
        # before the average's update, and mid-window it dropped the gradients accumulated so far)
        if batch_idx % max(1, int(trainer.accumulate_grad_batches)) == 0:
            self._act_if_asked(trainer, pl_module)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._act_if_asked(trainer, pl_module)  # a signal during the last batch or the last validation (a review)

    def _act_if_asked(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.signum is None:
            return
        asked = torch.tensor([1.0 if self.asked else 0.0], device=pl_module.device)
        if trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(asked, op=torch.distributed.ReduceOp.MAX)
        if asked.item() > 0:
            self.asked = False
            trainer._signal_connector._slurm_sigusr_handler_fn(self.signum, None)  # type: ignore[arg-type]

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._restore()

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        # a failed fit calls no teardown hook, and the signal stayed swallowed (a review); the trainer restores the
        # handlers it found after this hook, this one among them: it is told the one before
        originals = getattr(getattr(trainer, "_signal_connector", None), "_original_handlers", None)
        if isinstance(originals, dict) and self.signum is not None and originals.get(self.signum) == self._note:
            originals[self.signum] = self._previous if self._previous is not None else signal.SIG_DFL
        self._restore()

    def _restore(self) -> None:
        if self.signum is not None:
            signal.signal(self.signum, self._previous if self._previous is not None else signal.SIG_DFL)
            self.signum, self._previous = None, None
