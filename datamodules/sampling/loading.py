"""From an episode dataset and a sampler to a `DataLoader`, and the state that resumes an epoch exactly.

Both datamodules build their loaders here: workers (persistent when there are any), pinned memory when a GPU
is present, and a private generator, seeded with the process's torch seed, so that creating a loader's iterator
never draws from torch's global random stream (which a resumed run must find where the interrupted one left it)
while the workers' own random streams still follow the run's seed. Every random choice of an
episode comes from the seed in its spec, so a batch is the same whatever the worker count.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from lightning.pytorch.trainer.states import TrainerFn
from torch.utils.data import DataLoader, Dataset

from datamodules.sampling.samplers import EpisodeSampler
from imaging_meta.episode import collate_episodes

if TYPE_CHECKING:
    from lightning.fabric.utilities.data import AttributeDict


def episode_loader(dataset: Dataset, sampler: EpisodeSampler | Sequence, batch_size: int, num_workers: int) -> DataLoader:
    """A loader of batched `Episode`s.

    Args:
        dataset: indexed by episode specs.
        sampler: an `EpisodeSampler` (training) or a fixed list of specs (validation, test).
        batch_size: episodes (tasks) per batch.
        num_workers: loader processes; 0 loads in the training process.
    """
    return DataLoader(
        dataset,
        sampler=sampler,
        batch_size=batch_size,
        collate_fn=collate_episodes,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        pin_memory=torch.cuda.is_available(),
        # the workers' base seed: the process's torch seed (``seed_everything``'s), read without drawing from the
        # global stream; a constant gave every run of a seed sweep the same worker random streams (a review)
        generator=torch.Generator().manual_seed(torch.initial_seed()),
    )


class ResumableEpisodes:
    """Mixin for an episodic `LightningDataModule`: checkpoints record how far into its epoch training was.

    Lightning saves ``state_dict()`` in every checkpoint and gives it back to ``load_state_dict`` on resume.
    The training sampler (``self._samplers["train"]``) then skips the episodes this rank had already
    trained on, so a run resumed from a mid-epoch checkpoint sees exactly the episodes an uninterrupted run
    would have seen. A checkpoint written at the end of an epoch needs no skip.
    """

    _resume_state: dict[str, Any] | None

    if TYPE_CHECKING:  # for the type checker: what the LightningDataModule this is mixed into provides

        @property
        def hparams(self) -> AttributeDict: ...

    def state_dict(self) -> dict[str, Any]:
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return {}
        progress = trainer.fit_loop.epoch_loop.batch_progress.current
        # a checkpoint taken in on_train_batch_end (ModelCheckpoint(every_n_train_steps=...)) comes after the
        # batch's optimiser step but before the loop counts it completed: "processed" is what is in the weights
        # whether the epoch's batches are all done: under limit_train_batches an epoch ends before its sampler's
        # last episode, and a step checkpoint after its last batch was taken for a mid-epoch stop (a review)
        finished = progress.processed >= trainer.num_training_batches
        return {"epoch": trainer.current_epoch, "batches_done": progress.processed, "batch_size": self.hparams.batch_size,
                "world_size": trainer.world_size, "epoch_finished": bool(finished)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        trainer = getattr(self, "trainer", None)
        fn = getattr(getattr(trainer, "state", None), "fn", None)
        if fn is not None and fn != TrainerFn.FITTING:  # test and validate restore it too, but train on nothing: a
            return  # warning that the run "is not the one it would have been" was false there (a review)
        self._resume_state = dict(state)
        saved, now = state.get("world_size"), (trainer.world_size if trainer is not None else None)
        if saved is not None and now is not None and saved != now:  # the skip counts one rank's share of the epoch
            warnings.warn(f"resuming a run of {saved} process(es) on {now}: each rank's episodes differ, so the run goes "
                          "on but is not the one it would have been (exact resume needs the same number of processes)",
                          stacklevel=2)
        self._apply_resume()

    def _apply_resume(self) -> None:
        """Give the training sampler the epoch the fit loop runs next and, after a restore, the episodes to skip.

        The epoch is set here, before the loader is built, because a loader with workers draws from its sampler
        as soon as its iterator exists (prefetching), and Lightning creates the first epoch's iterator before it
        calls ``set_epoch``: a resumed run with workers drew epoch 0's episodes (and used up the skip) again."""
        sampler = getattr(self, "_samplers", {}).get("train")
        if sampler is None:
            return
        state = getattr(self, "_resume_state", None)
        if state:
            consumed = state["batches_done"] * state["batch_size"]
            if state.get("epoch_finished") or consumed >= len(sampler):  # (checkpoints before 2026-12-07: the count)
                # saved after the epoch's last batch (a step checkpoint): the fit loop goes on with the next epoch,
                # which it counts only after building the loader; with workers the loader draws at once, so it must
                # draw that epoch, whole (skipping the finished one left the next epoch without a batch)
                self._first_epoch = int(state["epoch"]) + 1
            else:
                sampler.resume(state["epoch"], consumed)
            self._resume_state = None
        trainer = getattr(self, "trainer", None)
        if trainer is not None:
            sampler.set_epoch(max(trainer.fit_loop.epoch_progress.current.processed, getattr(self, "_first_epoch", 0)))
