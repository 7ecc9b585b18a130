"""Self-supervised episode samplers (after SSL-ALPNet, Ouyang et al., ECCV 2020): indices only, never pixels.

* `SuperpixelEpisodeSpec`: which volume, slice and superpixel, and the seed of the views.
* `SuperpixelEpisodeSampler`: draws specs from superpixel tables (volume -> slice -> superpixel ids); it never
  sees pixels or labels.
* `MixedEpisodeSampler`: each episode is self-supervised with probability ``ratio``, else supervised.

`datamodules.sampling.selfsup.SuperpixelEpisodeDataset` turns the specs into episodes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from datamodules.sampling.samplers import EpisodeSampler


@dataclass(frozen=True)
class SuperpixelEpisodeSpec:
    """One self-supervised episode.

    Attributes:
        volume: index into the self-supervised volume list.
        slice: axial slice index.
        superpixel: the superpixel id (in that slice) that is the foreground.
        seed: seed of the episode's views (support views first, then query views).
    """

    volume: int
    slice: int
    superpixel: int
    seed: int


class SuperpixelEpisodeSampler(EpisodeSampler):
    """Draws `SuperpixelEpisodeSpec`s: a slice uniformly over all tabulated slices, then one of its superpixels.

    Args:
        tables: volume index -> slice index -> superpixel ids large enough to be a target
            (`datamodules.transforms.superpixels.superpixel_table`).
        n_episodes: episodes per epoch (shared across DDP ranks).
        seed: base seed.
    """

    def __init__(self, tables: Mapping[int, Mapping[int, Sequence[int]]], n_episodes: int, seed: int = 0) -> None:
        self.slices = [(int(v), int(z), [int(i) for i in ids]) for v, t in sorted(tables.items())
                       for z, ids in sorted(t.items()) if len(ids)]
        if not self.slices:
            raise ValueError(
                "no slice has a superpixel large enough to be a target; lower superpixels.min_pixels or check that the "
                "images are not empty (the body mask keeps what is brighter than superpixels.threshold)"
            )
        if n_episodes < 1:
            raise ValueError(f"n_episodes must be >= 1, got {n_episodes}")
        self.n_episodes, self.seed = int(n_episodes), int(seed)

    def draw(self, rng: np.random.Generator) -> SuperpixelEpisodeSpec:
        v, z, ids = self.slices[int(rng.integers(len(self.slices)))]
        return SuperpixelEpisodeSpec(v, z, ids[int(rng.integers(len(ids)))], int(rng.integers(2**31 - 1)))


class MixedEpisodeSampler(EpisodeSampler):
    """Supervised and self-supervised episodes in one stream: each draw is self-supervised with probability
    ``ratio``. Both parts draw from the same seeded generator, so the mix is as reproducible as either.

    Args:
        supervised: a supervised sampler (its ``draw`` is used).
        selfsup: a `SuperpixelEpisodeSampler`.
        ratio: share of self-supervised episodes, in [0, 1].
        n_episodes: episodes per epoch.
        seed: base seed.
    """

    def __init__(self, supervised: EpisodeSampler, selfsup: SuperpixelEpisodeSampler, ratio: float, n_episodes: int,
                 seed: int = 0) -> None:
        if not 0.0 <= ratio <= 1.0:
            raise ValueError(f"the self-supervised ratio must lie in [0, 1], got {ratio}")
        self.supervised, self.selfsup, self.ratio = supervised, selfsup, float(ratio)
        self.n_episodes, self.seed = int(n_episodes), int(seed)

    def draw(self, rng: np.random.Generator):
        return self.selfsup.draw(rng) if rng.random() < self.ratio else self.supervised.draw(rng)
