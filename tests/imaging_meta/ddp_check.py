"""Meta-train a learner for a few steps with Lightning's DDP strategy on 2 CPU processes (gloo), or replay
the same episodes in one process; writes the final weights for `test_ddp.py` to compare.

    python -m tests.imaging_meta.ddp_check --mode ddp --learner maml --data DIR --out DIR

Modes:
    ddp:     Trainer(strategy="ddp", devices=2): the meta-loss runs in training_step, inside DDP's forward; the
             gradient all-reduces are counted (allreduces<rank>.txt).
    outside: the negative control: each rank computes the meta-loss and steps its optimiser in
             on_train_batch_start, outside DDP's forward, the mistake that silently skips the sync.
    single:  one process replays rank 0's and rank 1's episodes of each step and averages their losses,
             which is what synchronised DDP computes.

``--average START``: train with `EpisodicModule(weight_averaging=START)`; the weights written are then the
average of the weights after every step from ``floor(START * STEPS)`` on (``single`` averages them by hand).
"""

from __future__ import annotations

import argparse
import copy
import os
from pathlib import Path

import torch
from lightning.pytorch import Callback, Trainer, seed_everything
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

from datamodules.classification import ClassificationDataModule
from datamodules.sampling.loading import episode_loader
from datamodules.sources.medmnist import MedMNIST
from imaging_meta.commands.cli import finish_distributed
from imaging_meta.learners.gradient.maml import MAML
from imaging_meta.learners.gradient.reptile import Reptile
from imaging_meta.learners.metric.protonet import PrototypicalNetwork
from imaging_meta.module import EpisodicModule

# SGD, not Adam, for the comparison with one process: the conv biases before BatchNorm have a gradient that is
# zero up to rounding, and Adam scales that rounding noise up to steps of size lr
STEPS, BATCH, LR = 3, 2, 0.1
LEARNERS = {
    # MAML takes a backward per task inside its loss (the default), or one backward over all tasks
    "maml": lambda: MAML(n_way=3, backbone_kwargs={"width": 4}, inner_steps=1, inner_lr=0.1),
    "maml_once": lambda: MAML(n_way=3, backbone_kwargs={"width": 4}, inner_steps=1, inner_lr=0.1, meta_backward="once"),
    "protonet": lambda: PrototypicalNetwork(backbone_kwargs={"width": 4}),
    # Reptile's outer step is SGD on its surrogate loss (see reptile.py): averaged over ranks it interpolates
    # toward the mean of the ranks' adapted weights
    "reptile": lambda: Reptile(n_way=3, backbone_kwargs={"width": 4}, inner_steps=2, inner_lr=0.1),
}


def datamodule(folder: Path) -> ClassificationDataModule:
    paths = sorted(str(p) for p in folder.glob("*.npz"))
    return ClassificationDataModule(
        source=MedMNIST(paths=paths, image_size=[16, 16]), cache_dir=str(folder / "cache"), n_way=3, n_shot=1, n_query=2,
        val_classes_count=3, test_classes_count=3, episodes_per_epoch=2 * BATCH * STEPS, val_episodes=2, test_episodes=2,
        batch_size=BATCH, augment=True, num_workers=0, seed=5,
    )


def build(name: str) -> torch.nn.Module:
    seed_everything(11)
    return LEARNERS[name]()


class OutsideForward(EpisodicModule):
    """The negative control: meta-loss, backward and step outside the DDP-wrapped forward."""

    def __init__(self, learner, optimizer) -> None:
        super().__init__(learner, optimizer=optimizer, baselines=False)
        self.automatic_optimization = False

    def on_train_batch_start(self, batch, batch_idx) -> None:
        opt = self.optimizers()
        opt.zero_grad()
        self.learner.loss(batch.to(self.device)).backward()
        opt.step()

    def training_step(self, batch, batch_idx):
        return None


_ALLREDUCES = [0]


def counting_allreduce(process_group, bucket):
    """DDP's default all-reduce of a gradient bucket, counted: how many synchronisations each step makes."""
    _ALLREDUCES[0] += 1
    return allreduce_hook(process_group, bucket)


class CountAllreduces(Callback):
    """Registers `counting_allreduce` on the DDP-wrapped model (Lightning registers its own comm hooks on CUDA only)."""

    def on_train_start(self, trainer, pl_module) -> None:
        trainer.strategy.model.register_comm_hook(None, counting_allreduce)


def run_ddp(name: str, data: Path, out: Path, outside: bool, average: float | None = None) -> None:
    learner = build(name)
    factory = lambda p: torch.optim.SGD(p, lr=LR)  # noqa: E731
    module = (OutsideForward(learner, factory) if outside
              else EpisodicModule(learner, optimizer=factory, baselines=False, weight_averaging=average))
    trainer = Trainer(
        accelerator="cpu", devices=2, strategy="ddp", use_distributed_sampler=False, max_steps=STEPS, max_epochs=1,
        limit_val_batches=0, logger=False, enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
        inference_mode=False, callbacks=[] if outside else [CountAllreduces()],
    )
    trainer.fit(module, datamodule=datamodule(data))
    torch.save({k: v.detach().cpu() for k, v in module.learner.state_dict().items()}, out / f"rank{trainer.global_rank}.pt")
    (out / f"allreduces{trainer.global_rank}.txt").write_text(str(_ALLREDUCES[0]))
    finish_distributed()  # as `imaging-meta fit` does: no gloo abort at interpreter exit


def run_single(name: str, data: Path, out: Path, average: float | None = None) -> None:
    dm = datamodule(data)
    dm.setup("fit")
    train = dm._samplers["train"]
    ranks = []
    for r in range(2):  # each rank's sampler, as DDP would build it
        sampler = copy.copy(train)
        sampler._rank, sampler._world = r, 2
        ranks.append(iter(episode_loader(dm.train_dataloader().dataset, sampler, BATCH, 0)))
    learner = build(name)
    opt = torch.optim.SGD(learner.parameters(), lr=LR)
    kept = []  # the weights after each averaged step
    for step in range(STEPS):
        opt.zero_grad()
        loss = torch.stack([learner.loss(next(it)) for it in ranks]).mean()  # DDP averages the ranks' gradients
        loss.backward()
        opt.step()
        if average is not None and step >= int(average * STEPS):
            kept.append({k: v.detach().clone() for k, v in learner.state_dict().items()})
    state = learner.state_dict()
    if kept:
        state = {k: (sum(w[k] for w in kept) / len(kept) if v.is_floating_point() else v) for k, v in state.items()}
    torch.save(state, out / "single.pt")


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--mode", choices=["ddp", "outside", "single"], required=True)
    p.add_argument("--learner", choices=sorted(LEARNERS), required=True)
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--average", type=float, default=None)
    a = p.parse_args()
    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if a.mode == "single":
        run_single(a.learner, a.data, a.out, a.average)
    else:
        run_ddp(a.learner, a.data, a.out, outside=a.mode == "outside", average=a.average)
