"""What every episode sampler shares: DDP ranks, epochs, seeded fixed lists and exact mid-epoch resume.

Samplers work on indices, labels and slice tables only, never on pixels; they yield episode specs, which a
dataset turns into an `Episode`. Give a spec list to the dataset and you get the same episodes whatever the
worker count, device or DDP rank. The concrete samplers:

* `datamodules.sampling.samplers_segmentation.SegmentationEpisodeSampler`: 1-way K-shot slices of a structure.
* `datamodules.sampling.samplers_classification.ClassificationEpisodeSampler`: N-way K-shot items, drawn uniformly, patient-disjoint.
* `datamodules.sampling.samplers_selfsup`: superpixel episodes and a mix of both kinds.

Fixed episode lists are written and read by `datamodules.sampling.episode_files`.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np


def dist_rank_world() -> tuple[int, int]:
    """(rank, world size) of torch.distributed when it is initialised, else (0, 1)."""
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    return 0, 1


class TooFewForEpisodes(ValueError):
    """A stage cannot fill the episodes asked for: too few patients or items for n_shot + n_query (the samplers'
    message says which; `imaging-meta evaluate`, which keeps the training run's split, then names --shots)."""


class EpisodeSampler:
    """What every episode sampler shares: DDP ranks, epochs, and the seeded fixed lists.

    A subclass sets ``n_episodes``, ``seed``, ``epoch`` (0), ``_rank`` and ``_world`` (None: read from
    ``torch.distributed``) and implements `draw`. Epoch ``e`` on rank ``r`` draws from (seed, e, r); fixed
    lists depend on the seed only. `resume` makes the next pass over an epoch start after its first episodes
    (exact mid-epoch resume: they are drawn again, so the rest of the epoch is unchanged, but never loaded).
    """

    n_episodes: int
    seed: int
    epoch: int = 0
    _rank: int | None = None
    _world: int | None = None
    _skip: tuple[int, int] = (-1, 0)  # (epoch, episodes of that epoch already consumed)

    def draw(self, rng: np.random.Generator):
        """One episode spec from ``rng``."""
        raise NotImplementedError

    @property
    def rank(self) -> int:
        return self._rank if self._rank is not None else dist_rank_world()[0]

    @property
    def world_size(self) -> int:
        return self._world if self._world is not None else dist_rank_world()[1]

    def set_epoch(self, epoch: int) -> None:
        """Called by Lightning at each epoch so that each epoch draws new episodes."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        # episodes of this rank: the same count on every rank, ceil(n_episodes / world size), so that every rank
        # takes the same number of steps (an extra step on some ranks waits in its gradient all-reduce for ranks
        # that have finished the epoch: gloo fails, NCCL hangs)
        return -(-self.n_episodes // self.world_size)

    def resume(self, epoch: int, consumed: int) -> None:
        """Make the next pass over ``epoch`` yield its episodes from number ``consumed`` on (this rank's count).

        Args:
            epoch: the epoch that was interrupted.
            consumed: episodes of that epoch this rank had already trained on (>= 0).
        """
        if consumed < 0:
            raise ValueError(f"consumed episodes must be >= 0, got {consumed}")
        self._skip = (int(epoch), int(consumed))

    def __iter__(self) -> Iterator:
        rng = np.random.default_rng([self.seed, self.epoch, self.rank])
        skip_epoch, skip = self._skip
        skip = skip if skip_epoch == self.epoch else 0
        self._skip = (-1, 0)  # one pass only
        for i in range(len(self)):
            spec = self.draw(rng)  # drawn even when skipped: the rest of the epoch stays the same
            if i >= skip:
                yield spec

    def fixed_episodes(self, n: int | None = None) -> list:
        """A fixed list of ``n`` episodes (default ``n_episodes``) for validation or test.

        It depends on the seed only: not on the epoch, the rank or the world size.
        """
        rng = np.random.default_rng([self.seed, 2**31 - 1])
        return [self.draw(rng) for _ in range(n or self.n_episodes)]
