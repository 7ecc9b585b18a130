"""`SegmentationEpisodeSampler`: 1-way K-shot segmentation episodes from a slice table.

The support is K slices of the target structure from K different patients; the query is ``n_query`` slices
from other patients, at the same position relative to the structure's extent in each volume (SSL-ALPNet's
protocol: the extent is cut into ``n_parts`` chunks and support and query come from the same chunk).

The unit drawn is the patient, by design: the ``n_shot + n_query`` patients are a uniform random subset of
those that show the structure (every shot and every query its own patient, so no patient can fill the
support), and a case is drawn uniformly among that patient's cases.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from datamodules.sampling.samplers import EpisodeSampler, TooFewForEpisodes

# organ -> case index -> sorted slice indices (along the axial axis) where the organ is present
SliceTable = Mapping[str, Mapping[int, Sequence[int]]]


@dataclass(frozen=True)
class SegmentationEpisodeSpec:
    """Which slices make one segmentation episode.

    Attributes:
        organ: the target structure (the foreground of every mask in the episode).
        support: (case index, slice index) pairs, one per shot, from distinct patients.
        query: (case index, slice index) pairs, from patients not in the support.
        seed: seed for this episode's random augmentation.
    """

    #: the ``kind`` of an episode file holding these specs (`datamodules.sampling.episode_files`).
    kind: ClassVar[str] = "segmentation"

    organ: str
    support: tuple[tuple[int, int], ...]
    query: tuple[tuple[int, int], ...]
    seed: int


def _slice_at(slices: Sequence[int], r: float) -> int:
    """The slice at relative position ``r`` in [0, 1] of a structure's extent."""
    return int(slices[min(len(slices) - 1, int(round(r * (len(slices) - 1))))])


class SegmentationEpisodeSampler(EpisodeSampler):
    """Draws 1-way K-shot segmentation episodes from a slice table.

    Args:
        slice_table: organ -> case index -> sorted slice indices where the organ is present.
        patients: ``patients[i]`` is the pseudonymous patient of case ``i`` (every index in the table).
        organs: structures to draw episodes for (default: every organ in the table).
        n_shot: support slices per episode, each from a different patient.
        n_query: query slices per episode, each from a different patient outside the support.
        n_episodes: episodes per epoch (across all DDP ranks: each draws ceil(n_episodes / ranks)).
        n_parts: the structure's extent is cut into this many chunks; support and query come from the
            same chunk (SSL-ALPNet). With 0 the relative position is continuous.
        seed: base seed; epoch ``e`` on rank ``r`` draws from (seed, e, r).
        rank: DDP rank; default: read from ``torch.distributed`` when it is initialised.
        world_size: number of DDP ranks; default: likewise.

    Raises:
        ValueError: when no episode can be drawn for an organ; the message says what to change.
    """

    def __init__(
        self,
        slice_table: SliceTable,
        patients: Sequence[str],
        organs: Sequence[str] | None = None,
        n_shot: int = 1,
        n_query: int = 1,
        n_episodes: int = 100,
        n_parts: int = 3,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
    ) -> None:
        if n_shot < 1 or n_query < 1 or n_episodes < 1:
            raise ValueError(f"n_shot, n_query and n_episodes must be >= 1; got {n_shot}, {n_query}, {n_episodes}")
        if n_parts < 0:
            raise ValueError(f"n_parts must be >= 0, got {n_parts}")
        self.patients = list(patients)
        self.organs = list(organs) if organs is not None else sorted(slice_table)
        self.n_shot, self.n_query, self.n_episodes, self.n_parts = n_shot, n_query, n_episodes, n_parts
        self.seed = seed
        self._rank, self._world = rank, world_size
        self.epoch = 0
        self.table = {
            o: {int(c): [int(z) for z in zs] for c, zs in slice_table.get(o, {}).items() if len(zs) > 0}
            for o in self.organs
        }
        self._check_feasible()

    # ------------------------------------------------------------ validation
    def _check_feasible(self) -> None:
        if not self.organs:
            raise ValueError("the sampler has no organs to draw episodes for; check the split's organ lists")
        need = self.n_shot + self.n_query
        problems = []
        for o in self.organs:
            for c in self.table[o]:
                if not 0 <= c < len(self.patients):
                    raise ValueError(f"slice table names case {c} for organ {o!r}, but only {len(self.patients)} patients were given")
            n_pat = len({self.patients[c] for c in self.table[o]})
            if n_pat < need:
                problems.append(f"{o!r} is present in {n_pat} patient(s)")
        if problems:
            raise TooFewForEpisodes(
                f"cannot draw {self.n_shot}-shot episodes with {self.n_query} query patient(s): each episode needs "
                f"n_shot + n_query = {need} different patients showing the organ, but " + "; ".join(problems)
                + ". Lower n_shot or n_query, drop those organs, or move patients into this split "
                "(val_fraction/test_fraction)."
            )

    # -------------------------------------------------------------- drawing
    def draw(self, rng: np.random.Generator) -> SegmentationEpisodeSpec:
        """One episode from ``rng``."""
        organ = self.organs[rng.integers(len(self.organs))]
        by_patient: dict[str, list[int]] = {}
        for c in self.table[organ]:
            by_patient.setdefault(self.patients[c], []).append(c)
        chosen = rng.permutation(sorted(by_patient))[: self.n_shot + self.n_query]
        cases = [int(rng.choice(by_patient[p])) for p in chosen]
        if self.n_parts > 0:
            part = rng.integers(self.n_parts)
            r_support: float = (part + 0.5) / self.n_parts
            lo, hi = part / self.n_parts, (part + 1) / self.n_parts
            r_query = [float(rng.uniform(lo, hi)) for _ in range(self.n_query)]
        else:
            r_support = float(rng.uniform())
            r_query = [r_support] * self.n_query
        support = tuple((c, _slice_at(self.table[organ][c], r_support)) for c in cases[: self.n_shot])
        query = tuple((c, _slice_at(self.table[organ][c], r)) for c, r in zip(cases[self.n_shot :], r_query, strict=True))
        return SegmentationEpisodeSpec(organ=organ, support=support, query=query, seed=int(rng.integers(2**31)))
