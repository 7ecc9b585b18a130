"""`EpisodicDataModule`: the contract between a datamodule and the code that trains, tests and evaluates on it.

`imaging_meta.module` and the commands ask a datamodule only what this class declares (no attribute probes):

* ``task``: the task kind by name ("segmentation" or "classification"; `imaging_meta.tasks` knows what it means).
* `n_way` (None when the task fixes it), `n_shot`, `preprocessing` (how to prepare a new image like the
  training data; stored in checkpoints), `label_free` (trained without any label: no split to protect).
* `episode_files` and `fixed_episodes`: the seeded validation and test episodes and the JSON files that hold them.
* `split_digest`: who is in each stage; checkpoints store it and ``evaluate`` refuses another split.
* `describe`: the data behind a result, for logs and reports (pseudonymous ids only).
* `config`: the ``{"class_path", "init_args"}`` that rebuilds the datamodule (``evaluate`` reads it back).

`datamodules.segmentation.SegmentationDataModule` and `datamodules.classification.ClassificationDataModule`
are the two implementations. A subclass builds ``self._samplers`` (stage -> `EpisodeSampler`) in ``setup``,
then calls `_fix_episodes`, and implements `_fixed_episodes`, `_loader`, `_split_identity` and `_describe`.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, ClassVar

from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader

from datamodules.sampling.episode_files import episodes_sha256
from datamodules.sampling.loading import ResumableEpisodes
from datamodules.sampling.samplers import EpisodeSampler, dist_rank_world

STAGES = ("train", "val", "test")
#: the sampler of each stage draws from ``seed + STAGE_SEED_OFFSET[stage]``
STAGE_SEED_OFFSET = {"train": 0, "val": 1, "test": 2}


def digest(obj: Any) -> str:
    """16 hex digits of the sha256 of ``obj`` as sorted JSON (``str`` for what JSON cannot hold).

    It names cache folders and episode files and makes the split digest that checkpoints store: changing it
    would orphan every cache and make ``evaluate`` refuse every existing checkpoint.
    """
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


class EpisodicDataModule(ResumableEpisodes, LightningDataModule):
    """Shared base of the episodic datamodules: fixed validation and test episodes, their files and loaders,
    the split digest, the report of the data and the config that rebuilds it (see the module docstring).

    Checkpoints record how far into its epoch training was (`ResumableEpisodes`).
    """

    #: the task kind, by name
    task: ClassVar[str]
    #: what a stage without fixed episodes lacks, for the error message (``{stage}`` is filled in)
    no_episodes_hint: ClassVar[str] = "the split has no {stage} cases"

    def __init__(self) -> None:
        super().__init__()
        self.episode_files: dict[str, Path] = {}
        self._samplers: dict[str, EpisodeSampler] = {}
        self._episodes: dict[str, list] = {}

    # ------------------------------------------------------------ the contract
    @property
    def n_way(self) -> int | None:
        """Classes per episode; None when the task fixes it (segmentation: one structure)."""
        return None

    @property
    def n_shot(self) -> int:
        """Support examples per class (segmentation: support slices per episode)."""
        return int(self.hparams.n_shot)

    @property
    def preprocessing(self) -> dict | None:
        """The deterministic preprocessing of the data (stored in checkpoints; the commands reuse it)."""
        return None

    #: set by ``fit --test_after_fit``: the test episodes are checked for the processes at setup, before training
    test_after_fit: bool = False

    @property
    def label_free(self) -> bool:
        """Whether training sees no label at all (then there is no split for ``evaluate`` to protect)."""
        return False

    def fixed_episodes(self, stage: str) -> list:
        """The fixed, seeded episode specs of ``stage`` ("val" or "test"), after ``setup``.

        Raises:
            ValueError: when the stage has none (no cases or classes in the split, or 0 episodes asked for).
        """
        if stage not in self._episodes:
            if self.label_free:  # a folder without labels: the split has no stage at all (a review)
                raise ValueError(f"no {stage} episodes: the data holds no labelled scan (self-supervised training "
                                 "only); test the checkpoint on labelled scans with imaging-meta evaluate --checkpoint "
                                 "CKPT --data-config <a data config of the labelled scans> (docs/selfsup.md)")
            raise ValueError(f"no {stage} episodes: {self.no_episodes_hint.format(stage=stage)} or {stage}_episodes is 0")
        return list(self._episodes[stage])

    def split_digest(self) -> str:
        """A digest of who is in each stage (pseudonymous ids) and what each stage targets.

        Checkpoints store it; ``imaging-meta evaluate`` recomputes it and refuses to test when it differs, as
        the test set could then hold patients, organs or classes the model trained on (another salt, data
        or split).
        """
        return digest(self._split_identity())

    def structure_values(self) -> dict[str, list[int]] | None:
        """Each structure's label values over the scans (name -> sorted values), for the data of label maps; None
        for other data. Checkpoints store it beside `structure_digest`, to name what changed."""
        return None

    def structure_digest(self) -> str | None:
        """A digest of which label value is which structure in each scan; None for data without label maps.
        Checkpoints store it, and evaluation refuses data where it differs: a structure renamed after training
        (``label_names`` swapped, a ``dataset.json`` edited) kept the split digest, and the held-out organ's score
        was then a trained organ's (a review)."""
        return None

    def test_scans(self) -> list[dict[str, Any]]:
        """The labelled test scans, for whole-scan protocols: dicts with ``image`` (a path, or DICOM files),
        ``label``, ``modality``, ``organs`` (the test structures in it: name -> value), ``patient``, ``site``.
        Only datamodules of volumes have them."""
        raise NotImplementedError(f"{type(self).__name__} has no scans: whole-scan protocols need volume data")

    def describe(self) -> dict[str, Any]:
        """The data behind a result, for logs and reports (pseudonymous ids only), with the episode files
        (drawn, or given as ``test_episodes_file``) and the sha256 of their episode lists."""
        return {
            **self._describe(),
            # absolute: results.json is read from other folders than the one the run started in
            "episode_files": {k: str(Path(v).resolve()) for k, v in self.episode_files.items()},
            "episodes_sha256": {k: episodes_sha256(v) for k, v in self.episode_files.items()},
        }

    @classmethod
    def canonical_init_args(cls, init_args: dict[str, Any]) -> dict[str, Any]:
        """``init_args`` with renamed values written the current way, so that two configs that build the same
        split compare equal (``imaging-meta evaluate``'s split guard). Identity unless a subclass renamed one."""
        return dict(init_args)

    def config(self) -> dict[str, Any]:
        """``{"class_path", "init_args"}`` that rebuilds this datamodule, as ``imaging-meta evaluate`` needs it
        to rebuild the split the model was trained on (secrets such as the salt are not hyperparameters, so
        they are never stored)."""
        return {"class_path": f"{type(self).__module__}.{type(self).__qualname__}", "init_args": self._init_args()}

    # ---------------------------------------------------------- dataloaders
    def val_dataloader(self) -> DataLoader | list:
        if self.hparams.get("val_episodes", 1) == 0:  # validation left out: fit without it (and without best.ckpt)
            trainer = getattr(self, "trainer", None)
            if trainer is not None and trainer.state.fn == "validate":
                raise ValueError("imaging-meta validate scores the validation episodes, and val_episodes is 0: set it "
                                 "to the number of episodes to score")
            return []
        return self._fixed_loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._fixed_loader("test")

    def _fixed_loader(self, stage: str) -> DataLoader:
        """The stage's fixed episodes, shared out over the DDP ranks, without augmentation."""
        self._refuse_lightning_sampler()
        rank, world = dist_rank_world()
        episodes = self.fixed_episodes(stage)
        self._check_shares(stage, len(episodes), world)
        return self._loader(episodes[rank::world], augment=False)

    def _refuse_lightning_sampler(self) -> None:
        """Refuse a trainer of several processes that would put Lightning's distributed sampler over the episode
        samplers, which shard by rank themselves: each rank's share split again, a test scored 3 of its 5 episodes
        and trained half its steps, in silence (a review: a Trainer built by hand keeps Lightning's default; the
        CLI turns it off)."""
        trainer = getattr(self, "trainer", None)
        connector = getattr(trainer, "_accelerator_connector", None)  # where Lightning itself reads the setting
        if trainer is not None and trainer.world_size > 1 and getattr(connector, "use_distributed_sampler", False):
            raise ValueError(f"a Trainer of {trainer.world_size} processes with use_distributed_sampler=True: the "
                             "episode samplers give each process its own episodes, and Lightning's sampler would "
                             "split them again (each rank would train and score a part of its share); build the "
                             "Trainer with use_distributed_sampler=False (as imaging-meta's CLI and trainer configs do)")

    @staticmethod
    def _check_shares(stage: str, n: int, world: int) -> None:
        if n < world:
            # a rank without an episode had an empty loader, which Lightning refused on that rank alone: an "internal
            # error" there, and "another process failed" on the others (a review)
            raise ValueError(f"{stage}: {n} episode(s) for {world} processes; every process scores at least "
                             f"one: give at least {world} ({stage}_episodes, or a {stage} episode file that holds as "
                             "many), or run on fewer devices")

    # ------------------------------------------------------ for subclasses
    def _fix_episodes(self) -> None:
        """Draw (or read) the fixed episodes of every evaluation stage that has a sampler."""
        for stage in ("val", "test"):
            if stage in self._samplers:
                self._episodes[stage] = self._fixed_episodes(stage)
        if self.test_after_fit:  # refused before training, not after it (a review): too few test episodes for the
            # processes, or none at all (a folder without labels has no test stage: it trained, then failed)
            self._check_shares("test", len(self.fixed_episodes("test")), dist_rank_world()[1])

    def _init_args(self) -> dict[str, Any]:
        """The ``init_args`` of `config`: the hyperparameters, without private keys."""
        return {k: v for k, v in dict(self.hparams).items() if not k.startswith("_")}

    def _fixed_episodes(self, stage: str) -> list:
        """The stage's fixed episode specs: drawn from its sampler (and written to a file), or read from one."""
        raise NotImplementedError

    def _loader(self, sampler, augment: bool) -> DataLoader:
        """A loader of batched episodes from a sampler or a list of specs."""
        raise NotImplementedError

    def _split_identity(self) -> dict[str, Any]:
        """What `split_digest` digests."""
        raise NotImplementedError

    def _describe(self) -> dict[str, Any]:
        """The datamodule's own part of `describe`."""
        raise NotImplementedError
