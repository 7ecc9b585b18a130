"""`ClassificationEpisodeSampler`: N-way K-shot classification episodes with a query set, from item labels,
patients and sites: support and query are patient-disjoint across the whole episode, and with ``cross_site``
they come from two different sites (``same_site``: from one site).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from datamodules.sampling.samplers import EpisodeSampler


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

    #: the ``kind`` of an episode file holding these specs (`datamodules.sampling.episode_files`).
    kind: ClassVar[str] = "classification"

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
