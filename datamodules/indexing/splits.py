"""Seeded, patient-disjoint splits and the evaluation protocols built on them.

Protocols (what the learner may see in meta-training, and what it is tested on):

* ``in_domain``: every structure and site in training; validation and test on unseen patients.
* ``cross_organ``: the ``test_organs`` never appear as a target in meta-training. With
  ``exclude_test_organ_slices`` (SSL-ALPNet's "setting 2", Ouyang et al. ECCV 2020) every training slice
  that contains a test organ at all is removed as well, so the organ is not even seen as background.
  Validation and test use the held-out organs on unseen patients.
* ``cross_site``: the ``test_sites`` never appear in meta-training or validation; test runs on them.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field

from datamodules.indexing.index import Case

PROTOCOLS = ("in_domain", "cross_organ", "cross_site")


@dataclass
class Split:
    """Case indices per stage, and the structures each stage draws episodes for.

    Attributes:
        train, val, test: indices into the case list given to `make_split`.
        train_organs, val_organs, test_organs: structures that are episode targets in each stage.
        excluded_organs: structures whose slices are removed from training (setting 2).
        protocol: the protocol name.
    """

    train: list[int]
    val: list[int]
    test: list[int]
    train_organs: list[str]
    val_organs: list[str]
    test_organs: list[str]
    excluded_organs: list[str] = field(default_factory=list)
    protocol: str = "in_domain"

    def patients(self, cases: Sequence[Case], stage: str) -> set[str]:
        return {cases[i].patient for i in getattr(self, stage)}


def _rank(key: str, seed: int) -> str:
    """A seeded, platform-independent sort key for a patient id."""
    return hashlib.sha256(f"{seed}:{key}".encode()).hexdigest()


def split_patients(
    patients: Sequence[str], val_fraction: float, test_fraction: float, seed: int
) -> tuple[set[str], set[str], set[str]]:
    """Assign each distinct patient to train, val or test, deterministically for a seed.

    The order comes from a hash of (seed, patient), so adding a patient never moves the others.

    Args:
        patients: pseudonymous patient ids (duplicates allowed).
        val_fraction: share of patients for validation, in [0, 1).
        test_fraction: share of patients for test, in [0, 1).
        seed: split seed.

    Returns:
        Three disjoint sets of patient ids.
    """
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ValueError(
            f"val_fraction={val_fraction} and test_fraction={test_fraction} must be in [0, 1) and sum to below 1"
        )
    unique = sorted(set(patients), key=lambda p: _rank(p, seed))
    n = len(unique)
    n_test = round(n * test_fraction)
    n_val = round(n * val_fraction)
    if test_fraction > 0 and n_test == 0 and n >= 3:
        n_test = 1
    if val_fraction > 0 and n_val == 0 and n - n_test >= 2:
        n_val = 1
    test = set(unique[:n_test])
    val = set(unique[n_test : n_test + n_val])
    train = set(unique[n_test + n_val :])
    return train, val, test


def _stratified_split(cases: Sequence[Case], val_fraction: float, test_fraction: float, seed: int):
    """Split patients within each site, so every site is represented in every stage."""
    train, val, test = set(), set(), set()
    for site in sorted({c.site for c in cases}):
        tr, va, te = split_patients([c.patient for c in cases if c.site == site], val_fraction, test_fraction, seed)
        train |= tr
        val |= va
        test |= te
    # a patient scanned at two sites must stay on one side of the split
    val -= test
    train -= val | test
    return train, val, test


def _match_sites(requested: Sequence[str], sites: Sequence[str]) -> list[str]:
    """Site keys matching each requested name (exact key, or a case-insensitive substring of it)."""
    out = []
    for r in requested:
        hits = [s for s in sites if s == r] or [s for s in sites if r.lower() in s.lower()]
        if not hits:
            raise ValueError(f"test site {r!r} matches none of the sites in the index: {sorted(sites)}")
        out.extend(h for h in hits if h not in out)
    return out


def make_split(
    cases: Sequence[Case],
    protocol: str = "in_domain",
    *,
    test_organs: Sequence[str] = (),
    val_organs: Sequence[str] | None = None,
    test_sites: Sequence[str] = (),
    val_fraction: float = 0.15,
    test_fraction: float = 0.25,
    seed: int = 0,
    exclude_test_organ_slices: bool = True,
) -> Split:
    """Split labelled cases by patient under one of `PROTOCOLS`.

    Args:
        cases: labelled cases (each with ``organs``).
        protocol: "in_domain", "cross_organ" or "cross_site".
        test_organs: cross_organ: structures held out of meta-training.
        val_organs: cross_organ: structures for validation episodes (default: ``test_organs``, on the
            validation patients, who are disjoint from the test patients).
        test_sites: cross_site: site keys, or substrings of them, held out for test.
        val_fraction: share of (training-site) patients for validation.
        test_fraction: share of patients for test (in_domain and cross_organ).
        seed: split seed.
        exclude_test_organ_slices: cross_organ: SSL-ALPNet setting 2 (remove training slices that show a
            test organ). Setting 1 when False.

    Returns:
        A `Split`.

    Raises:
        ValueError: unknown protocol or organ/site, or a stage left without cases; the message says what to change.
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol {protocol!r} is not one of {PROTOCOLS}")
    if not cases:
        raise ValueError("no labelled cases to split; check the scan report for rejected inputs")
    all_organs = sorted({o for c in cases for o in c.organs})
    sites = sorted({c.site for c in cases})

    if protocol == "cross_site":
        if not test_sites:
            raise ValueError("the cross_site protocol needs test_sites (site keys or substrings of them)")
        held = set(_match_sites(test_sites, sites))
        if held == set(sites):
            raise ValueError(f"test_sites {list(test_sites)} cover every site; leave at least one for training")
        seen = [c for c in cases if c.site not in held]
        train_p, val_p, _ = _stratified_split(seen, val_fraction, 0.0, seed)
        held_patients = {c.patient for c in cases if c.site in held}
        train_p -= held_patients
        val_p -= held_patients
        split = Split(
            train=[i for i, c in enumerate(cases) if c.site not in held and c.patient in train_p],
            val=[i for i, c in enumerate(cases) if c.site not in held and c.patient in val_p],
            test=[i for i, c in enumerate(cases) if c.site in held],
            train_organs=all_organs,
            val_organs=all_organs,
            test_organs=all_organs,
            protocol=protocol,
        )
    else:
        train_p, val_p, test_p = _stratified_split(cases, val_fraction, test_fraction, seed)
        idx = {s: [i for i, c in enumerate(cases) if c.patient in p] for s, p in (("train", train_p), ("val", val_p), ("test", test_p))}
        if protocol == "cross_organ":
            unknown = sorted(set(test_organs) - set(all_organs)) + sorted(set(val_organs or ()) - set(all_organs))
            if not test_organs or unknown:
                raise ValueError(
                    f"cross_organ needs test_organs from the structures in the index {all_organs}; "
                    f"got {list(test_organs)}" + (f" (unknown: {unknown})" if unknown else "")
                )
            held = sorted(set(test_organs) | set(val_organs or ()))
            train_organs = [o for o in all_organs if o not in held]
            if not train_organs:
                raise ValueError(f"holding out {held} leaves no structure to meta-train on")
            split = Split(
                **idx,
                train_organs=train_organs,
                val_organs=list(val_organs) if val_organs else list(test_organs),
                test_organs=list(test_organs),
                excluded_organs=held if exclude_test_organ_slices else [],
                protocol=protocol,
            )
        else:
            split = Split(**idx, train_organs=all_organs, val_organs=all_organs, test_organs=all_organs, protocol=protocol)

    for stage in ("train", "test"):
        if not getattr(split, stage):
            raise ValueError(
                f"the {protocol} split left no {stage} cases ({len(cases)} cases, {len({c.patient for c in cases})} "
                "patients); add patients or change val_fraction/test_fraction"
            )
    return split
