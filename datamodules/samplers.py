"""Episode samplers: they work on indices and slice tables only, never on pixels.

`SegmentationEpisodeSampler` draws 1-way K-shot segmentation episodes. The support is K slices of the
target structure from K different patients; the query is ``n_query`` slices from other patients, at the
same position relative to the structure's extent in each volume (SSL-ALPNet's protocol: the extent is cut
into ``n_parts`` chunks and support and query come from the same chunk).

`ClassificationEpisodeSampler` draws N-way K-shot classification episodes with a query set from item
labels, patients and sites: support and query are patient-disjoint across the whole episode, and with
``cross_site`` they come from two different sites.

The samplers yield `SegmentationEpisodeSpec`s / `ClassificationEpisodeSpec`s, which a dataset turns into an
`Episode`. Give a spec list to the dataset and you get the same episodes whatever the worker count, device or DDP rank.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from datamodules.atomic import atomic_open

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

    organ: str
    support: tuple[tuple[int, int], ...]
    query: tuple[tuple[int, int], ...]
    seed: int


def dist_rank_world() -> tuple[int, int]:
    """(rank, world size) of torch.distributed when it is initialised, else (0, 1)."""
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    return 0, 1


def _slice_at(slices: Sequence[int], r: float) -> int:
    """The slice at relative position ``r`` in [0, 1] of a structure's extent."""
    return int(slices[min(len(slices) - 1, int(round(r * (len(slices) - 1))))])


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
        # episodes of this rank: the n_episodes are shared out over the ranks
        w, r = self.world_size, self.rank
        return self.n_episodes // w + (1 if r < self.n_episodes % w else 0)

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


class SegmentationEpisodeSampler(EpisodeSampler):
    """Draws 1-way K-shot segmentation episodes from a slice table.

    Args:
        slice_table: organ -> case index -> sorted slice indices where the organ is present.
        patients: ``patients[i]`` is the pseudonymous patient of case ``i`` (every index in the table).
        organs: structures to draw episodes for (default: every organ in the table).
        n_shot: support slices per episode, each from a different patient.
        n_query: query slices per episode, each from a different patient outside the support.
        n_episodes: episodes per epoch (across all DDP ranks).
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
            raise ValueError(
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
            r_support = (part + 0.5) / self.n_parts
            lo, hi = part / self.n_parts, (part + 1) / self.n_parts
            r_query = [float(rng.uniform(lo, hi)) for _ in range(self.n_query)]
        else:
            r_support = float(rng.uniform())
            r_query = [r_support] * self.n_query
        support = tuple((c, _slice_at(self.table[organ][c], r_support)) for c in cases[: self.n_shot])
        query = tuple((c, _slice_at(self.table[organ][c], r)) for c, r in zip(cases[self.n_shot :], r_query, strict=True))
        return SegmentationEpisodeSpec(organ=organ, support=support, query=query, seed=int(rng.integers(2**31)))


# ================================================================== classification
@dataclass(frozen=True)
class ClassificationEpisodeSpec:
    """Which items make one N-way K-shot classification episode.

    Attributes:
        classes: the N class indices (into the item table's ``classes``), in way order: way ``i`` is class
            ``classes[i]`` and gets label ``i``.
        support: item indices, way-major: the ``n_shot`` items of way 0, then those of way 1, ...
        query: item indices, way-major likewise (``n_query`` per way); no query item shares a patient with
            any support item of the episode.
        seed: seed for this episode's random augmentation.
    """

    classes: tuple[int, ...]
    support: tuple[int, ...]
    query: tuple[int, ...]
    seed: int


def splittable(
    support_counts: Mapping[str, int], query_counts: Mapping[str, int], n_shot: int, n_query: int
) -> bool:
    """Whether ``n_shot`` support items and ``n_query`` query items can come from disjoint patients.

    A patient with items on both sides (``support_counts`` and ``query_counts`` both name it) can serve one
    side only; the test is exact (a small dynamic programme over the shared patients, sums capped at
    ``n_shot`` and ``n_query``).

    Args:
        support_counts: patient -> number of items eligible for the support.
        query_counts: patient -> number of items eligible for the query.
        n_shot: support items needed.
        n_query: query items needed.
    """
    shared = set(support_counts) & set(query_counts)
    s0 = min(n_shot, sum(k for p, k in support_counts.items() if p not in shared))
    q0 = min(n_query, sum(k for p, k in query_counts.items() if p not in shared))
    states = {(s0, q0)}
    for p in sorted(shared):
        states = {st for s, q in states for st in ((min(n_shot, s + support_counts[p]), q),
                                                   (s, min(n_query, q + query_counts[p])))}
        if (n_shot, n_query) in states:
            return True
    return (n_shot, n_query) in states


def _counts(items: Sequence[int], patients: Sequence[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for i in items:
        out[patients[i]] = out.get(patients[i], 0) + 1
    return out


def classification_infeasible(
    labels: Sequence[int],
    patients: Sequence[str],
    sites: Sequence[str],
    classes: Sequence[int],
    n_shot: int,
    n_query: int,
    cross_site: bool = False,
    class_names: Sequence[str] | None = None,
    same_site: bool = False,
) -> dict[int, str]:
    """Classes that cannot give ``n_shot`` support and ``n_query`` query items from disjoint patients.

    With ``cross_site`` a class must moreover have the support at one site and the query at another; with
    ``same_site`` both at one site.

    Returns:
        class index -> why not (names the class, its item and patient counts); empty when all are feasible.
    """
    labels = np.asarray(labels, dtype=np.int64)
    names = list(class_names) if class_names is not None else None
    bad: dict[int, str] = {}
    for c in classes:
        items = np.flatnonzero(labels == c).tolist()
        n_pat = len({patients[i] for i in items})
        name = repr(names[c]) if names is not None else f"class {c}"
        what = f"{name} has {len(items)} item(s) from {n_pat} patient(s)"
        if not (cross_site or same_site):
            counts = _counts(items, patients)
            if not splittable(counts, counts, n_shot, n_query):
                bad[c] = what
            continue
        by_site: dict[str, list[int]] = {}
        for i in items:
            by_site.setdefault(sites[i], []).append(i)
        ok = any(
            splittable(_counts(by_site[a], patients), _counts(by_site[b], patients), n_shot, n_query)
            for a in by_site for b in by_site if (a == b) == same_site
        )
        if not ok:
            bad[c] = f"{what} at {len(by_site)} site(s)"
    return bad


class ClassificationEpisodeSampler(EpisodeSampler):
    """Draws N-way K-shot classification episodes with a query set, from labels alone.

    Every episode takes ``n_way`` distinct classes, ``n_shot`` support and ``n_query`` query items of each;
    the support and the query are patient-disjoint across the whole episode (no query item shares a
    patient with any support item, of any class). Items of one side may share a patient. With
    ``cross_site`` the support comes from one site and the query from another, both chosen per episode
    among the site pairs where every chosen class can fill its shots and queries.

    Args:
        labels: ``labels[i]`` is the class index of item ``i``.
        patients: pseudonymous patient of each item.
        sites: site key of each item.
        classes: allowed class indices (default: every label present).
        n_way: classes per episode.
        n_shot: support items per class.
        n_query: query items per class.
        n_episodes: episodes per epoch (across all DDP ranks).
        cross_site: support and query from two different sites.
        same_site: support and query from one site (drawn per episode): the few-shot task a site has
            with its own scanner's images.
        seed: base seed; epoch ``e`` on rank ``r`` draws from (seed, e, r).
        rank: DDP rank; default: read from ``torch.distributed`` when it is initialised.
        world_size: number of DDP ranks; default: likewise.
        class_names: names of the class indices, for error messages.

    Raises:
        ValueError: when an allowed class cannot be drawn, or fewer than ``n_way`` classes (cross_site: on
            one site pair) can; the message names the classes, their counts and what to change.
    """

    #: an episode is redrawn at most this many times when a random patient assignment fails.
    MAX_TRIES = 1000

    def __init__(
        self,
        labels: Sequence[int],
        patients: Sequence[str],
        sites: Sequence[str],
        classes: Sequence[int] | None = None,
        n_way: int = 5,
        n_shot: int = 1,
        n_query: int = 5,
        n_episodes: int = 100,
        cross_site: bool = False,
        same_site: bool = False,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        class_names: Sequence[str] | None = None,
    ) -> None:
        if min(n_way, n_shot, n_query, n_episodes) < 1:
            raise ValueError(
                f"n_way, n_shot, n_query and n_episodes must be >= 1; got {n_way}, {n_shot}, {n_query}, {n_episodes}"
            )
        self.labels = np.asarray(labels, dtype=np.int64)
        self.patients = [str(p) for p in patients]
        self.sites = [str(s) for s in sites]
        if not len(self.labels) == len(self.patients) == len(self.sites):
            raise ValueError(
                f"labels, patients and sites must have one entry per item; got {len(self.labels)}, "
                f"{len(self.patients)}, {len(self.sites)}"
            )
        self.classes = sorted({int(c) for c in (classes if classes is not None else np.unique(self.labels))})
        self.class_names = list(class_names) if class_names is not None else None
        self.n_way, self.n_shot, self.n_query, self.n_episodes = n_way, n_shot, n_query, n_episodes
        self.cross_site = bool(cross_site)
        self.same_site = bool(same_site)
        self.seed = seed
        self._rank, self._world = rank, world_size
        self.epoch = 0
        # class -> items; class -> site -> items
        self._items = {c: np.flatnonzero(self.labels == c).tolist() for c in self.classes}
        self._by_site: dict[int, dict[str, list[int]]] = {}
        for c, items in self._items.items():
            for i in items:
                self._by_site.setdefault(c, {}).setdefault(self.sites[i], []).append(i)
        self._check_feasible()

    def _name(self, c: int) -> str:
        return repr(self.class_names[c]) if self.class_names is not None and 0 <= c < len(self.class_names) else f"class {c}"

    # ------------------------------------------------------------ validation
    def _check_feasible(self) -> None:
        if self.cross_site and self.same_site:
            raise ValueError("cross_site and same_site exclude each other: choose one")
        n_classes = len(self.class_names) if self.class_names is not None else None
        unknown = [c for c in self.classes if c < 0 or (n_classes is not None and c >= n_classes)]
        if unknown:
            raise ValueError(f"allowed classes {unknown} are not class indices in [0, {n_classes})")
        if len(self.classes) < self.n_way:
            raise ValueError(
                f"{self.n_way}-way episodes need at least {self.n_way} classes, the sampler was given "
                f"{len(self.classes)} ({', '.join(self._name(c) for c in self.classes)}); lower n_way or add classes"
            )
        bad = classification_infeasible(self.labels, self.patients, self.sites, self.classes, self.n_shot,
                                        self.n_query, self.cross_site, self.class_names, self.same_site)
        if bad:
            where = " at one site and the query at another" if self.cross_site else (" and the query at one site" if self.same_site else "")
            raise ValueError(
                f"cannot draw {self.n_shot}-shot episodes with {self.n_query} query item(s) per class: each class "
                f"needs n_shot + n_query = {self.n_shot + self.n_query} items, the support{where} from patients other "
                "than the query's (so at least 2 patients), but " + "; ".join(bad.values())
                + ". Lower n_shot or n_query, or drop those classes."
            )
        # (support site, query site) -> the classes that can fill an episode on it
        self._pairs: dict[tuple[str, str], frozenset[int]] = {}
        if self.cross_site or self.same_site:
            sites = sorted({s for c in self.classes for s in self._by_site[c]})
            best = 0
            for a in sites:
                for b in sites:
                    if (a == b) != self.same_site:
                        continue
                    ok = frozenset(c for c in self.classes if self._pair_ok(c, a, b))
                    best = max(best, len(ok))
                    if len(ok) >= self.n_way:
                        self._pairs[(a, b)] = ok
            if not self._pairs and self.same_site:
                raise ValueError(
                    f"within-site episodes need {self.n_way} classes that all have {self.n_shot} support and "
                    f"{self.n_query} query item(s) from different patients at one site; the best site has {best} such "
                    f"class(es) (sites: {sites}). Lower n_way, n_shot or n_query, or use protocol 'standard'."
                )
            if not self._pairs:
                raise ValueError(
                    f"cross-site episodes need {self.n_way} classes that all have {self.n_shot} support item(s) at one "
                    f"site and {self.n_query} query item(s) at another; the best site pair has {best} such class(es) "
                    f"(sites: {sites}). Lower n_way, n_shot or n_query, or use protocol 'standard'."
                )

    def _pair_ok(self, c: int, a: str, b: str) -> bool:
        sup, qry = self._by_site[c].get(a, []), self._by_site[c].get(b, [])
        if len(sup) < self.n_shot or len(qry) < self.n_query:
            return False
        return splittable(_counts(sup, self.patients), _counts(qry, self.patients), self.n_shot, self.n_query)

    # -------------------------------------------------------------- drawing
    def _take(self, rng: np.random.Generator, by_patient: dict[str, list[int]], need: int) -> tuple[list[int], set[str]] | None:
        """``need`` items from the shortest random-order prefix of patients that holds enough of them."""
        order = rng.permutation(sorted(by_patient))
        pool: list[int] = []
        used: set[str] = set()
        for p in order:
            if len(pool) >= need:
                break
            pool.extend(by_patient[p])
            used.add(str(p))
        if len(pool) < need:
            return None
        chosen = sorted(int(i) for i in rng.choice(pool, size=need, replace=False))
        return chosen, {self.patients[i] for i in chosen}

    def _fill(self, rng: np.random.Generator, classes: Sequence[int], pair: tuple[str, str] | None):
        """One random patient assignment for the given ways; None when it runs into a dead end."""
        support_patients: set[str] = set()
        query_patients: set[str] = set()
        support: dict[int, list[int]] = {}
        query: dict[int, list[int]] = {}
        for c in rng.permutation(list(classes)).tolist():
            sup_items = self._by_site[c].get(pair[0], []) if pair else self._items[c]
            qry_items = self._by_site[c].get(pair[1], []) if pair else self._items[c]
            by_p: dict[str, list[int]] = {}
            for i in sup_items:
                if self.patients[i] not in query_patients:
                    by_p.setdefault(self.patients[i], []).append(i)
            got = self._take(rng, by_p, self.n_shot)
            if got is None:
                return None
            support[c], pats = got
            support_patients |= pats
            by_p = {}
            for i in qry_items:
                if self.patients[i] not in support_patients:
                    by_p.setdefault(self.patients[i], []).append(i)
            got = self._take(rng, by_p, self.n_query)
            if got is None:
                return None
            query[c], pats = got
            query_patients |= pats
        return support, query

    def _draw_cross_site_ways(self, rng: np.random.Generator) -> tuple[list[int], tuple[str, str]]:
        """Ways one at a time, each uniform among the classes that some still-possible site pair serves
        together with the ways already drawn; then the site pair uniform among those serving all ways."""
        pairs = sorted(self._pairs)
        ways: list[int] = []
        while len(ways) < self.n_way:
            eligible = sorted(set().union(*(self._pairs[p] for p in pairs)) - set(ways))
            c = int(eligible[int(rng.integers(len(eligible)))])
            ways.append(c)
            pairs = [p for p in pairs if c in self._pairs[p]]
        return ways, pairs[int(rng.integers(len(pairs)))]

    def draw(self, rng: np.random.Generator) -> ClassificationEpisodeSpec:
        """One episode from ``rng``.

        The ways are ``n_way`` classes drawn uniformly (cross_site: see `_draw_cross_site_ways`). Per class, in random order, the support takes
        the items of a random prefix of the patients not yet in the query, and the query those of patients
        not in the support; a dead end redraws the assignment.
        """
        for _ in range(self.MAX_TRIES):
            pair = None
            if self.cross_site or self.same_site:
                ways, pair = self._draw_cross_site_ways(rng)
            else:
                ways = [int(c) for c in rng.choice(self.classes, size=self.n_way, replace=False)]
            filled = self._fill(rng, ways, pair)
            if filled is None:
                continue
            support, query = filled
            return ClassificationEpisodeSpec(
                classes=tuple(ways),
                support=tuple(i for c in ways for i in support[c]),
                query=tuple(i for c in ways for i in query[c]),
                seed=int(rng.integers(2**31)),
            )
        raise ValueError(
            f"no patient-disjoint {self.n_way}-way episode found in {self.MAX_TRIES} random tries: the classes "
            f"{', '.join(self._name(c) for c in self.classes)} share too few patients between support and query "
            "candidates. Lower n_shot or n_query, or drop the smallest classes."
        )


# ------------------------------------------------------------------ episode files
EpisodeSpec = SegmentationEpisodeSpec | ClassificationEpisodeSpec


def save_episodes(
    specs: Sequence[EpisodeSpec],
    case_ids: Sequence[str],
    path: str | os.PathLike,
    meta: dict | None = None,
    class_names: Sequence[str] | None = None,
) -> Path:
    """Write episodes to JSON, naming cases (items) by their pseudonymous ids (atomic write).

    Segmentation specs store ``[case id, slice]`` pairs; classification specs store item ids and their
    classes by name. The payload's ``sha256`` is the digest of the episode list, so that reports can quote
    which episodes a result was measured on.

    Args:
        specs: the episodes, all of one kind.
        case_ids: ``case_ids[i]`` is the id of case (classification: item) index ``i``.
        path: output file.
        meta: extra provenance (preprocessing settings, seed) stored beside the episodes.
        class_names: classification: ``class_names[c]`` is the name of class index ``c`` (required).
    """
    path = Path(path)
    kinds = {type(s) for s in specs}
    if len(kinds) > 1:
        raise ValueError(f"save_episodes got a mix of episode kinds {sorted(k.__name__ for k in kinds)}; save one kind per file")
    classification = kinds == {ClassificationEpisodeSpec}
    if classification and class_names is None:
        raise ValueError("save_episodes: classification episodes need class_names to store their classes by name")
    episodes = []
    for s in specs:
        d = asdict(s)
        if classification:
            d["classes"] = [class_names[c] for c in s.classes]
            d["support"] = [case_ids[i] for i in s.support]
            d["query"] = [case_ids[i] for i in s.query]
        else:
            d["support"] = [[case_ids[c], z] for c, z in s.support]
            d["query"] = [[case_ids[c], z] for c, z in s.query]
        episodes.append(d)
    payload = {"kind": "classification" if classification else "segmentation", "meta": meta or {}, "episodes": episodes}
    payload["sha256"] = hashlib.sha256(json.dumps(episodes, sort_keys=True).encode()).hexdigest()
    with atomic_open(path, "w", encoding="utf-8") as f:
        json.dump(payload, f, indent=1)
    return path


def load_episodes(
    path: str | os.PathLike, case_ids: Sequence[str], class_names: Sequence[str] | None = None
) -> tuple[list[EpisodeSpec], dict]:
    """Read episodes written by `save_episodes`; returns the specs (with case/item and class indices) and the metadata.

    Raises:
        ValueError: when the file names cases, items or classes that are not given, or its episode list does
            not match its sha256 (the file was edited); the message says to regenerate it.
    """
    path = Path(path)
    with open(path) as f:
        payload = json.load(f)
    if "sha256" in payload:
        digest = hashlib.sha256(json.dumps(payload["episodes"], sort_keys=True).encode()).hexdigest()
        if digest != payload["sha256"]:
            raise ValueError(f"{path}: the episode list does not match its sha256 (the file was edited); regenerate it")
    where = {cid: i for i, cid in enumerate(case_ids)}
    specs: list[EpisodeSpec] = []
    if payload.get("kind") == "classification":
        if class_names is None:
            raise ValueError(f"{path} holds classification episodes: pass class_names to load_episodes")
        cls_at = {n: i for i, n in enumerate(class_names)}
        for e in payload["episodes"]:
            missing = [cid for cid in e["support"] + e["query"] if cid not in where]
            missing_cls = [c for c in e["classes"] if c not in cls_at]
            if missing or missing_cls:
                raise ValueError(
                    f"{path}: episodes name items {missing[:5]} / classes {missing_cls[:5]} that are not in this table; "
                    "regenerate the file (delete it) or use the data it was drawn from"
                )
            specs.append(
                ClassificationEpisodeSpec(
                    classes=tuple(cls_at[c] for c in e["classes"]),
                    support=tuple(where[c] for c in e["support"]),
                    query=tuple(where[c] for c in e["query"]),
                    seed=int(e["seed"]),
                )
            )
        return specs, payload.get("meta", {})
    for e in payload["episodes"]:
        missing = [cid for cid, _ in e["support"] + e["query"] if cid not in where]
        if missing:
            raise ValueError(f"{path}: episodes name cases that are not in this split/index: {missing[:5]}; regenerate the file")
        specs.append(
            SegmentationEpisodeSpec(
                organ=e["organ"],
                support=tuple((where[c], int(z)) for c, z in e["support"]),
                query=tuple((where[c], int(z)) for c, z in e["query"]),
                seed=int(e["seed"]),
            )
        )
    return specs, payload.get("meta", {})
