"""Seeded, patient-disjoint splits and the evaluation protocols built on them.

Protocols (what the learner may see in meta-training, and what it is tested on):

* ``in_domain``: every structure and site in training; validation and test on unseen patients.
* ``cross_organ``: the ``test_organs`` never appear as a target in meta-training. With
  ``exclude_test_organ_slices`` (SSL-ALPNet's "setting 2", Ouyang et al. ECCV 2020) every training slice
  whose label map shows a held-out organ at all is removed as well, so the organ is not seen as background.
  The label map screened is the preprocessed one, at the working in-plane spacing (nearest neighbour): a
  piece of an organ narrower than a working pixel (at the ends of its extent, often) can vanish from it, and
  its slice then stays, with a faint trace in the image (a review).
  Test uses the test organs on unseen patients. Validation (which picks the checkpoint) uses *validation
  organs*, disjoint from both the test organs and the training organs, on the validation patients, so
  that checkpoint selection never sees a test organ (see "Validation organs" below).
* ``cross_site``: the ``test_sites`` never appear in meta-training or validation; test runs on them.

Fixed test patients (``in_domain`` and ``cross_organ``): instead of a seeded share (``test_fraction``), the
test patients may be given as images, e.g. one fold of SSL-ALPNet's 5-fold cross-validation
(`read_fold` reads a ``folds.json`` of `datamodules.recipes.prepare`: the fold's test images and its support
image). Every patient with one of those images is a test patient; validation is drawn from the others with
``val_fraction`` as usual, and the rest train.

``in_domain`` and ``cross_site`` hold out no organ: every stage targets every structure.

Validation organs (``cross_organ``):

* by default (``val_organ_count=1``) one more organ is held out for validation. The candidates are the
  structures that are not test organs and that the label maps of at least `MIN_VAL_PATIENTS` validation
  patients name (the least an episode needs: one support and one query patient; the datamodule asks for one
  support and ``n_query`` query patients). Among them the choice follows a hash of (split seed, organ name), so
  it is fixed by the split seed and does not depend on ``n_shot`` (every number of shots that ``evaluate`` runs
  rebuilds the same split). ``val_organ_count=k``
  holds out ``k`` such organs. A caller may narrow the candidates (``val_organ_filter``): under setting 2
  `datamodules.segmentation.SegmentationDataModule` drops the organs whose slices would take most training
  slices with them (a structure on nearly every axial slice, such as the vertebrae, the aorta or the
  paraspinal muscles of the demo cohort, would leave none);
* an explicit ``val_organs`` list is used as given (``val_organ_count`` is then ignored), and refused when
  it names a test organ (except under ``val_organ_count=0``, the old behaviour);
* without validation patients (``val_fraction=0``) there is no validation and no validation organ;
* ``val_organ_count=0`` is the behaviour before validation organs existed: validation uses the test organs
  (on the validation patients). Checkpoints written then are read back with it
  (`imaging_meta.checkpoint_io`), so they rebuild the split they were trained on. Checkpoint selection then
  sees the test organs: use it only to reproduce such runs.

Validation organs are never training targets, and under setting 2 training slices that show a validation
organ are removed too, as for the test organs: validation then mimics the test condition (an organ never
seen in training, not even as background).
"""

from __future__ import annotations

import hashlib
import json
import re
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from datamodules.indexing.index import Case

PROTOCOLS = ("in_domain", "cross_organ", "cross_site")
#: a validation organ must be labelled in at least this many validation patients (one support, one query)
MIN_VAL_PATIENTS = 2


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


#: why a checkpoint's split may not be rebuilt although nothing the user set changed (`imaging-meta evaluate` and
#: ``test`` name it when the split digest differs)
SPLIT_RULE_CHANGES = ("or a checkpoint written before 2026-12-07 of a cohort with a patient scanned at two sites (a "
                      "site whose training patients all went to another stage through such a patient now trains on "
                      "one of its own: the split differs, and such a checkpoint cannot be evaluated on it)")


def _rank(key: str, seed: int) -> str:
    """A seeded, platform-independent sort key for a patient id."""
    return hashlib.sha256(f"{seed}:{key}".encode()).hexdigest()


def split_patients(
    patients: Sequence[str], val_fraction: float, test_fraction: float, seed: int
) -> tuple[set[str], set[str], set[str]]:
    """Assign each distinct patient to train, val or test, deterministically for a seed.

    The order comes from a hash of (seed, patient), not from the order or the other ids given. The shares are
    counts (rounded), so adding a patient can move at most one other patient across each stage boundary.

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
    # one patient at least trains: rounded up each, two shares took every patient of a small site (2 of 2 at 0.3
    # each), and in_domain tested a site it never trained on (a review); validation gives way first
    n_val = max(0, min(n_val, n - n_test - 1))
    n_test = max(0, min(n_test, n - 1))
    test = set(unique[:n_test])
    val = set(unique[n_test : n_test + n_val])
    train = set(unique[n_test + n_val :])
    return train, val, test


def _stratified_split(cases: Sequence[Case], val_fraction: float, test_fraction: float, seed: int):
    """Split patients within each site, so every site is represented in every stage (training always, when the site
    has a patient scanned there alone or a patient who trains; validation and test as the shares allow)."""
    train, val, test = set(), set(), set()
    by_site = {site: [c.patient for c in cases if c.site == site] for site in sorted({c.site for c in cases})}
    for patients in by_site.values():
        tr, va, te = split_patients(patients, val_fraction, test_fraction, seed)
        train |= tr
        val |= va
        test |= te
    # a patient scanned at two sites must stay on one side of the split
    val -= test
    train -= val | test
    # ... which took a site's only training patient to another stage (a review: in_domain tested a site it never
    # trained on, 87 of 2,400 seeds × shared patients): the site's patient scanned there alone, last in the seeded
    # order of its validation then its test patients, trains instead
    sites_of: dict[str, set[str]] = {}
    for c in cases:
        sites_of.setdefault(c.patient, set()).add(c.site)
    for site, patients in by_site.items():
        if train & set(patients):
            continue
        for stage in (val, test):
            alone = sorted((p for p in set(patients) & stage if sites_of[p] == {site}), key=lambda p: _rank(p, seed))
            if alone:
                stage.discard(alone[-1])
                train.add(alone[-1])
                break
    return train, val, test


def _names_site(name: str, site: str) -> bool:
    """Whether ``name`` names ``site``: the whole key, or whole words of it (case-insensitive), so that ``GE``
    names ``GE MEDICAL SYSTEMS | LightSpeed VCT`` and not ``Philips | Ingenia`` (a substring did, a review)."""
    word = re.escape(name.strip().lower())  # a word: letters, digits, '_' and '.' ("1.5" whole, "site" not "site_a")
    return name == site or re.search(rf"(?<![0-9a-z_.]){word}(?![0-9a-z_.])", site.lower()) is not None


def match_sites(requested: Sequence[str], sites: Iterable[str]) -> list[str]:
    """Site keys matching each requested name (the exact key, or whole words of it, case-insensitive).

    Raises:
        ValueError: a name that matches none of ``sites`` (the message lists them).
    """
    sites = list(sites)
    out: list[str] = []
    for r in requested:
        hits = [s for s in sites if s == r] or [s for s in sites if r.strip() and _names_site(r, s)]
        if not hits:
            raise ValueError(f"test site {r!r} matches none of the sites in the index: {sorted(sites)} (a name "
                             "matches a whole site key or whole words of it; until 2026-12-06 any substring did)")
        out.extend(h for h in hits if h not in out)
    return out


def read_fold(folds_file: str | Path, fold: int) -> list[str]:
    """The images of fold ``fold`` of a ``folds.json`` (`datamodules.recipes.prepare.ssl_alpnet_folds`): its
    test images, then its support image (if any), as paths relative to the prepared folder.

    Raises:
        ValueError: the file is unreadable or not a folds file, or has no such fold; the message names it.
    """
    path = Path(folds_file)
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"folds_file {path}: cannot read it ({e}); give the folds.json that "
                         "`imaging-meta prepare` wrote into the prepared folder") from e
    folds = doc.get("folds") if isinstance(doc, dict) else None
    if not isinstance(folds, list):
        raise ValueError(f"folds_file {path}: no 'folds' list; give the folds.json that `imaging-meta prepare` wrote")
    by_number = {f.get("fold", i): f for i, f in enumerate(folds) if isinstance(f, dict)}
    if isinstance(fold, bool) or fold not in by_number:
        raise ValueError(f"test_fold {fold!r} is not a fold of {path}: it has folds {sorted(by_number)}")
    entry = by_number[fold]
    images = list(entry.get("test_images") or [])
    if not images:
        raise ValueError(f"folds_file {path}: fold {fold} lists no test_images")
    if entry.get("support_image"):
        images.append(entry["support_image"])
    return [str(i) for i in images]


def _norm_path(p: str) -> str:
    return PurePosixPath(str(p).replace("\\", "/")).as_posix().removeprefix("./")


def patients_of_images(cases: Sequence[Case], images: Sequence[str]) -> set[str]:
    """The patients whose cases have one of ``images`` (paths relative to the index root; a DICOM case
    matches the folder of its slice files).

    Raises:
        ValueError: an image matches no case; the message names every such image.
    """
    by_path: dict[str, str] = {}
    for c in cases:
        if isinstance(c.image, (list, tuple)):
            for f in c.image:
                by_path.setdefault(_norm_path(str(PurePosixPath(_norm_path(f)).parent)), c.patient)
        else:
            by_path[_norm_path(c.image)] = c.patient
    missing = [i for i in images if _norm_path(i) not in by_path]
    if missing:
        raise ValueError(
            f"the test fold names {len(missing)} image(s) that are not labelled cases of the index: {missing}; "
            "the folds file must belong to this root (paths relative to it), and a stale index is rebuilt with "
            "data.init_args.rescan: true"
        )
    return {by_path[_norm_path(i)] for i in images}


#: filters candidate validation organs, given the training and the validation case indices (see `make_split`)
ValOrganFilter = Callable[[Sequence[int], Sequence[int], list[str]], list[str]]


def choose_val_organs(
    cases: Sequence[Case], val: Sequence[int], test_organs: Sequence[str], count: int, seed: int,
    keep: Callable[[list[str]], list[str]] | None = None, min_patients: int = MIN_VAL_PATIENTS,
) -> list[str]:
    """The ``count`` validation organs of cross_organ when none are given (see the module docstring).

    Args:
        cases: the labelled cases.
        val: indices of the validation cases.
        test_organs: the held-out test organs (never chosen).
        count: how many to choose.
        seed: the split seed; the order among the candidates is a hash of (seed, organ).
        keep: the candidates that may be held out, of those given (default: all of them).
        min_patients: the validation patients a candidate's label maps must name (at least `MIN_VAL_PATIENTS`;
            the datamodule passes what a one-shot episode of its ``n_query`` needs).

    Raises:
        ValueError: fewer than ``count`` candidates; the message names them and the settings to change.
    """
    patients: dict[str, set[str]] = {}
    for i in val:
        for o in cases[i].organs:
            patients.setdefault(o, set()).add(cases[i].patient)
    min_patients = max(MIN_VAL_PATIENTS, min_patients)
    candidates = sorted((o for o, p in patients.items() if o not in test_organs and len(p) >= min_patients),
                        key=lambda o: _rank(o, seed))
    allowed = set(keep(candidates)) if keep is not None else set(candidates)
    kept = [o for o in candidates if o in allowed]
    if len(kept) < count:
        raise ValueError(
            f"cross_organ holds out val_organ_count={count} validation organ(s), but only {kept} can be: labelled in "
            f"at least {min_patients} validation patients besides the test organs {list(test_organs)} (the validation "
            f"split holds {len({cases[i].patient for i in val})} patient(s)"
            + (f"; the most any other organ has is {max(len(p) for o, p in patients.items() if o not in test_organs)}"
               if any(o not in test_organs for o in patients) else "") + ")"
            + (f", and shown on slices of enough of them, without removing most training slices under setting 2 "
               f"(refused: {sorted(set(candidates) - allowed)})" if keep is not None else "")
            + "; name them with val_organs, lower val_organ_count, or raise val_fraction"
            # the one fix that works when setting 2 refused them (a review: the others failed in turn)
            + ("; or set exclude_test_organ_slices: false (setting 1), which keeps those slices"
               if keep is not None and set(candidates) - allowed else "")
        )
    return kept[:count]


def _cross_organ(cases: Sequence[Case], idx: dict[str, list[int]], all_organs: list[str], test_organs: Sequence[str],
                 val_organs: Sequence[str] | None, val_organ_count: int, seed: int, exclude: bool,
                 val_organ_filter: ValOrganFilter | None, min_val_patients: int = MIN_VAL_PATIENTS,
                 label_free_training: bool = False) -> Split:
    """The cross_organ split of patients ``idx`` (stage -> case indices): which organs each stage targets."""
    unknown = sorted(set(test_organs) - set(all_organs))
    if not test_organs or unknown:
        raise ValueError(
            f"cross_organ needs test_organs from the structures in the index {all_organs}; "
            f"got {list(test_organs)}" + (f" (unknown: {unknown})" if unknown else "")
            + "; set data.init_args.test_organs to the structures to hold out for testing (some of those)"
        )
    unknown_val = sorted(set(val_organs or ()) - set(all_organs))
    if unknown_val:
        raise ValueError(f"val_organs {list(val_organs or ())} name structures that are not in the index: {unknown_val}; "
                         f"the index has {all_organs}")
    if val_organ_count < 0:
        raise ValueError(f"val_organ_count must be >= 0, got {val_organ_count}")
    if val_organs:
        clash = sorted(set(val_organs) & set(test_organs))
        if clash and val_organ_count > 0:
            raise ValueError(
                f"val_organs {list(val_organs)} name the test organ(s) {clash}: checkpoint selection would see the "
                "organs it is tested on; choose validation organs outside test_organs (or leave val_organs unset)"
            )
        chosen = list(val_organs)
    elif val_organ_count == 0:  # the behaviour before validation organs: validate on the test organs
        chosen = list(test_organs)
    elif not idx["val"]:  # no validation patients (val_fraction=0): nothing to validate, nothing more to hold out
        chosen = []
    else:
        keep = None if val_organ_filter is None else (lambda organs: val_organ_filter(idx["train"], idx["val"], organs))
        chosen = choose_val_organs(cases, idx["val"], test_organs, val_organ_count, seed, keep, min_val_patients)
    held = sorted(set(test_organs) | set(chosen))
    train_organs = [o for o in all_organs if o not in held]
    if not train_organs and not label_free_training:  # label-free training meta-trains on no structure
        raise ValueError(f"holding out {held} (test and validation organs) leaves no structure to meta-train on; "
                         "lower val_organ_count or hold out fewer organs")
    return Split(**idx, train_organs=train_organs, val_organs=chosen, test_organs=list(test_organs),
                 excluded_organs=held if exclude else [], protocol="cross_organ")


def make_split(
    cases: Sequence[Case],
    protocol: str = "in_domain",
    *,
    test_organs: Sequence[str] = (),
    val_organs: Sequence[str] | None = None,
    val_organ_count: int = 1,
    test_sites: Sequence[str] = (),
    val_fraction: float = 0.15,
    test_fraction: float = 0.25,
    seed: int = 0,
    exclude_test_organ_slices: bool = True,
    val_organ_filter: ValOrganFilter | None = None,
    test_images: Sequence[str] | None = None,
    min_val_patients: int = MIN_VAL_PATIENTS,
    label_free_training: bool = False,
) -> Split:
    """Split labelled cases by patient under one of `PROTOCOLS`.

    Args:
        cases: labelled cases (each with ``organs``).
        protocol: "in_domain", "cross_organ" or "cross_site".
        test_organs: cross_organ: structures held out of meta-training and tested on.
        val_organs: cross_organ: structures for validation episodes, disjoint from ``test_organs`` (default:
            ``val_organ_count`` organs chosen by `choose_val_organs`); they are held out of meta-training too.
        val_organ_count: cross_organ, without ``val_organs``: how many validation organs to hold out; 0
            validates on the test organs (the behaviour of checkpoints written before this argument).
        test_sites: cross_site: site keys, or whole words of them (case-insensitive), held out for test.
        val_fraction: share of (training-site) patients for validation.
        test_fraction: share of patients for test (in_domain and cross_organ).
        seed: split seed (patients, and the choice of validation organs).
        exclude_test_organ_slices: cross_organ: SSL-ALPNet setting 2 (remove training slices that show a
            test or validation organ). Setting 1 when False.
        val_organ_filter: cross_organ, when validation organs are chosen: given the training and validation case
            indices and the candidates, those that may be held out (the datamodule: those that enough validation
            patients show on a slice, and under setting 2 whose slices do not cover most training slices). None:
            every candidate may.
        test_images: in_domain and cross_organ: the test patients are exactly the patients of these images
            (paths relative to the index root, e.g. `read_fold`), instead of a ``test_fraction`` share;
            validation is drawn from the other patients. None: the seeded share.
        min_val_patients: cross_organ, when validation organs are chosen: the validation patients a candidate
            must show (`choose_val_organs`).
        label_free_training: meta-training reads no label (self-supervised episodes only): cross_organ may hold
            out every structure (SSL-ALPNet tests all its labelled organs), which otherwise leaves nothing to
            meta-train on.

    Returns:
        A `Split`.

    Raises:
        ValueError: unknown protocol or organ/site, validation organs that name a test organ, a test image
            that is not in ``cases``, or a stage left without cases; the message says what to change.
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol {protocol!r} is not one of {PROTOCOLS}")
    for setting, value, reader in (("test_organs", test_organs, "cross_organ"), ("val_organs", val_organs, "cross_organ"),
                                   ("test_sites", test_sites, "cross_site")):
        if value and protocol != reader:  # a misspelt name there was not checked either (a review)
            warnings.warn(f"{setting} {list(value)} is not read by the {protocol} protocol (only by {reader}), and "
                          f"nothing is held out by it; set {setting} to null, or the protocol to {reader}", stacklevel=2)
    if not cases:
        raise ValueError("no labelled cases to split; check the scan report for rejected inputs")
    all_organs = sorted({o for c in cases for o in c.organs})
    sites = sorted({c.site for c in cases})

    if protocol == "cross_site":
        if test_images is not None:
            raise ValueError("a test fold (folds_file/test_fold) fixes the test patients, which cross_site takes from "
                             "test_sites; use it with in_domain or cross_organ")
        if not test_sites:
            raise ValueError("the cross_site protocol needs test_sites (site keys or whole words of them)")
        held = set(match_sites(test_sites, sites))
        if held == set(sites):
            raise ValueError(f"test_sites {list(test_sites)} cover every site; leave at least one for training")
        seen = [c for c in cases if c.site not in held]
        held_patients = {c.patient for c in cases if c.site in held}
        # a patient also scanned at a held-out site is in no training or validation stage: left out before the
        # split, so that a site whose training patient that was still trains on one of its own (a review)
        train_p, val_p, _ = _stratified_split([c for c in seen if c.patient not in held_patients], val_fraction, 0.0,
                                              seed)
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
        if test_images is None:
            train_p, val_p, test_p = _stratified_split(cases, val_fraction, test_fraction, seed)
        else:
            test_p = patients_of_images(cases, test_images)
            train_p, val_p, _ = _stratified_split([c for c in cases if c.patient not in test_p], val_fraction, 0.0, seed)
        idx = {s: [i for i, c in enumerate(cases) if c.patient in p] for s, p in (("train", train_p), ("val", val_p), ("test", test_p))}
        if protocol == "cross_organ":
            split = _cross_organ(cases, idx, all_organs, test_organs, val_organs, val_organ_count, seed,
                                 exclude_test_organ_slices, val_organ_filter, min_val_patients, label_free_training)
        else:
            split = Split(idx["train"], idx["val"], idx["test"], train_organs=all_organs, val_organs=all_organs,
                          test_organs=all_organs, protocol=protocol)

    for stage in ("train", "test"):
        if not getattr(split, stage):
            raise ValueError(
                f"the {protocol} split left no {stage} cases ({len(cases)} cases, {len({c.patient for c in cases})} "
                "patients); add patients or change val_fraction/test_fraction"
            )
    return split
