"""`ClassificationEpisodeSampler`: N-way K-shot classification episodes with a query set, from item labels,
patients and sites: support and query are patient-disjoint across the whole episode, and with
``sites_differ`` they come from two different sites (``same_site``: from one site).

Items, not patients, are drawn: a way's support is ``n_shot`` of its items drawn uniformly (each item equally
likely, so a patient with many items is neither favoured nor passed over), and its query ``n_query`` items
drawn uniformly among those of patients outside every support of the episode.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from datamodules.sampling.samplers import EpisodeSampler, TooFewForEpisodes


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


def _counts(items: Iterable[int], patients: Sequence[str] | np.ndarray) -> dict[Any, int]:
    """patient (a name, or an integer code) -> how many of ``items`` are theirs."""
    out: dict[Any, int] = {}
    for i in items:
        out[patients[i]] = out.get(patients[i], 0) + 1
    return out


def classification_infeasible(
    labels: Sequence[int] | np.ndarray,
    patients: Sequence[str],
    sites: Sequence[str],
    classes: Sequence[int],
    n_shot: int,
    n_query: int,
    sites_differ: bool = False,
    class_names: Sequence[str] | None = None,
    same_site: bool = False,
) -> dict[int, str]:
    """Classes that cannot give ``n_shot`` support and ``n_query`` query items from disjoint patients.

    With ``sites_differ`` a class must moreover have the support at one site and the query at another;
    with ``same_site`` both at one site.

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
        if not (sites_differ or same_site):
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
    patient with any support item, of any class). Items of one side may share a patient. Items are drawn
    uniformly, not patients (see `draw`). With ``sites_differ`` the support comes from one site and the
    query from another, both chosen per episode among the site pairs where every chosen class can fill its
    shots and queries; no site is held out of any stage (that is segmentation's ``cross_site``).

    Args:
        labels: ``labels[i]`` is the class index of item ``i``.
        patients: pseudonymous patient of each item.
        sites: site key of each item.
        classes: allowed class indices (default: every label present).
        n_way: classes per episode.
        n_shot: support items per class.
        n_query: query items per class.
        n_episodes: episodes per epoch (across all DDP ranks: each draws ceil(n_episodes / ranks)).
        sites_differ: support and query from two different sites (protocol ``support_query_sites_differ``).
        same_site: support and query from one site (drawn per episode): the few-shot task a site has
            with its own scanner's images.
        seed: base seed; epoch ``e`` on rank ``r`` draws from (seed, e, r).
        rank: DDP rank; default: read from ``torch.distributed`` when it is initialised.
        world_size: number of DDP ranks; default: likewise.
        class_names: names of the class indices, for error messages.

    Raises:
        ValueError: when an allowed class cannot be drawn, or fewer than ``n_way`` classes (with a site rule:
            on one site pair) can; the message names the classes, their counts and what to change.
    """

    #: an episode's supports are redrawn at most this many times when they leave a way too few query items...
    MAX_TRIES = 1000
    #: ...and its ways after this many such redraws (so that ways that are hard to fill are not avoided).
    TRIES_PER_WAYS = 20
    #: uniform draws of a way's support before drawing it one item at a time (`_support`).
    SUPPORT_TRIES = 64

    def __init__(
        self,
        labels: Sequence[int] | np.ndarray,
        patients: Sequence[str],
        sites: Sequence[str],
        classes: Sequence[int] | None = None,
        n_way: int = 5,
        n_shot: int = 1,
        n_query: int = 5,
        n_episodes: int = 100,
        sites_differ: bool = False,
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
        self.sites_differ = bool(sites_differ)
        self.same_site = bool(same_site)
        self.seed = seed
        self._rank, self._world = rank, world_size
        self.epoch = 0
        # each item's patient as an integer code; class -> items; class -> site -> items
        codes = np.unique(np.array(self.patients, dtype=str), return_inverse=True)
        self._pcode, self._n_patients = codes[1].reshape(-1), len(codes[0])
        site_of = np.array(self.sites, dtype=str)
        self._items = {c: np.flatnonzero(self.labels == c) for c in self.classes}
        self._by_site: dict[int, dict[str, np.ndarray]] = {
            c: {str(s): items[site_of[items] == s] for s in np.unique(site_of[items])} for c, items in self._items.items()
        }
        self._check_feasible()

    def _name(self, c: int) -> str:
        return repr(self.class_names[c]) if self.class_names is not None and 0 <= c < len(self.class_names) else f"class {c}"

    # ------------------------------------------------------------ validation
    def _check_feasible(self) -> None:
        if self.sites_differ and self.same_site:
            raise ValueError("sites_differ and same_site exclude each other: choose one")
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
                                        self.n_query, self.sites_differ, self.class_names, self.same_site)
        if bad:
            where = " at one site and the query at another" if self.sites_differ else (" and the query at one site" if self.same_site else "")
            raise TooFewForEpisodes(
                f"cannot draw {self.n_shot}-shot episodes with {self.n_query} query item(s) per class: each class "
                f"needs n_shot + n_query = {self.n_shot + self.n_query} items, the support{where} from patients other "
                "than the query's (so at least 2 patients), but " + "; ".join(bad.values())
                + ". Lower n_shot or n_query, or drop those classes."
            )
        # (support site, query site) -> the classes that can fill an episode on it
        self._pairs: dict[tuple[str, str], frozenset[int]] = {}
        if self.sites_differ or self.same_site:
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
                    f"episodes with support and query at different sites need {self.n_way} classes that all have "
                    f"{self.n_shot} support item(s) at one site and {self.n_query} query item(s) at another; the best site pair has {best} such class(es) "
                    f"(sites: {sites}). Lower n_way, n_shot or n_query, or use protocol 'standard'."
                )

    def _pair_ok(self, c: int, a: str, b: str) -> bool:
        sup, qry = self._by_site[c].get(a, ()), self._by_site[c].get(b, ())
        if len(sup) < self.n_shot or len(qry) < self.n_query:
            return False
        return splittable(_counts(sup, self.patients), _counts(qry, self.patients), self.n_shot, self.n_query)

    # -------------------------------------------------------------- drawing
    def _pools(self, c: int, pair: tuple[str, str] | None) -> tuple[np.ndarray, np.ndarray]:
        """The items of class ``c`` eligible for the support and for the query (on ``pair``'s sites)."""
        if pair is None:
            return self._items[c], self._items[c]
        return self._by_site[c][pair[0]], self._by_site[c][pair[1]]

    def _outside(self, qry: np.ndarray, taken: np.ndarray) -> np.ndarray:
        """The items of ``qry`` whose patient holds none of the items ``taken``."""
        mask = np.zeros(self._n_patients, dtype=bool)
        mask[self._pcode[taken]] = True
        return qry[~mask[self._pcode[qry]]]

    def _completable(self, chosen: list[int], sup: np.ndarray, qry: np.ndarray) -> bool:
        """Whether a support begun with ``chosen`` can still be finished and leave room for the query."""
        taken = set(self._pcode[chosen].tolist()) if chosen else set()
        rest = [int(i) for i in np.setdiff1d(sup, chosen)]
        free = [int(i) for i in qry if int(self._pcode[i]) not in taken]
        return splittable(_counts(rest, self._pcode), _counts(free, self._pcode), self.n_shot - len(chosen), self.n_query)

    def _support(self, rng: np.random.Generator, sup: np.ndarray, qry: np.ndarray) -> np.ndarray:
        """``n_shot`` items of one way, uniform among the ``n_shot``-subsets of ``sup`` that leave at least
        ``n_query`` items of ``qry`` from other patients (by rejection). When such subsets are rare (a class
        whose support must come almost wholly from one patient), the items are drawn one at a time instead,
        each uniform among those that keep the episode possible."""
        for _ in range(self.SUPPORT_TRIES):
            chosen = rng.choice(sup, size=self.n_shot, replace=False)
            if len(self._outside(qry, chosen)) >= self.n_query:
                return np.sort(chosen)
        picked: list[int] = []
        while len(picked) < self.n_shot:
            for i in rng.permutation(np.setdiff1d(sup, picked)).tolist():
                if self._completable(picked + [int(i)], sup, qry):
                    picked.append(int(i))
                    break
            else:  # pragma: no cover - the feasibility check at construction rules this out
                raise AssertionError("no support item keeps the episode possible")
        return np.sort(np.asarray(picked, dtype=np.int64))

    def _fill(self, rng: np.random.Generator, ways: Sequence[int], pair: tuple[str, str] | None):
        """Support and query items of the ways; None when the supports leave some way too few query items.

        Every way's support is drawn first (`_support`); then every way's query, ``n_query`` items uniform
        among its query candidates whose patient is in no support of the episode.
        """
        support = {c: self._support(rng, *self._pools(c, pair)) for c in ways}
        taken = np.concatenate(list(support.values()))
        query: dict[int, np.ndarray] = {}
        for c in ways:
            free = self._outside(self._pools(c, pair)[1], taken)
            if len(free) < self.n_query:
                return None
            query[c] = np.sort(rng.choice(free, size=self.n_query, replace=False))
        return support, query

    def _draw_site_pair_ways(self, rng: np.random.Generator) -> tuple[list[int], tuple[str, str]]:
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

    def _draw_ways(self, rng: np.random.Generator) -> tuple[list[int], tuple[str, str] | None]:
        if self.sites_differ or self.same_site:
            return self._draw_site_pair_ways(rng)
        return [int(c) for c in rng.choice(self.classes, size=self.n_way, replace=False)], None

    def draw(self, rng: np.random.Generator) -> ClassificationEpisodeSpec:
        """One episode from ``rng``.

        The ways are ``n_way`` classes drawn uniformly (with a site rule: see `_draw_site_pair_ways`). Each
        way's support is ``n_shot`` of its items drawn uniformly, every item equally likely whatever its
        patient (`_support`); each way's query is then ``n_query`` items drawn uniformly among its items of
        patients in no support of the episode. Supports that leave a way too few query items are redrawn
        (so the support is uniform among those that admit a query), and the ways after `TRIES_PER_WAYS`
        such redraws.
        """
        for t in range(self.MAX_TRIES):
            if t % self.TRIES_PER_WAYS == 0:
                ways, pair = self._draw_ways(rng)
            filled = self._fill(rng, ways, pair)
            if filled is None:
                continue
            support, query = filled
            return ClassificationEpisodeSpec(
                classes=tuple(ways),
                support=tuple(int(i) for c in ways for i in support[c]),
                query=tuple(int(i) for c in ways for i in query[c]),
                seed=int(rng.integers(2**31)),
            )
        raise ValueError(
            f"no patient-disjoint {self.n_way}-way episode found in {self.MAX_TRIES} random tries: the classes "
            f"{', '.join(self._name(c) for c in self.classes)} share too few patients between support and query "
            f"candidates (each class alone can be split between patients, but {self.n_way} at once leave no query "
            "patient that is in no support). Lower n_way, n_shot or n_query, add patients, or drop the classes "
            "whose items come from the same few patients."
        )
