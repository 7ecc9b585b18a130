"""Fixed episode lists as JSON: written once from a seed, read back by later runs and by ``evaluate``.

Files name cases (items) by their pseudonymous ids, never by position, and carry the sha256 of their
episode list so that reports can quote which episodes a result was measured on. The file's ``kind`` is the
``kind`` of its spec class. `check_segmentation_episodes` refuses a segmentation test file that breaks the
split of the run that reads it (training patients or organs, non-test sites); `episodes_sha256` is what
reports quote.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from datamodules.io.atomic import atomic_open
from datamodules.sampling.samplers_classification import ClassificationEpisodeSpec
from datamodules.sampling.samplers_segmentation import SegmentationEpisodeSpec

if TYPE_CHECKING:
    from datamodules.indexing.index import Case
    from datamodules.indexing.splits import Split

EpisodeSpec = SegmentationEpisodeSpec | ClassificationEpisodeSpec


def _segmentation_record(s: SegmentationEpisodeSpec, case_ids: Sequence[str], class_names) -> dict:
    d = asdict(s)
    d["support"] = [[case_ids[c], z] for c, z in s.support]
    d["query"] = [[case_ids[c], z] for c, z in s.query]
    return d


def _classification_record(s: ClassificationEpisodeSpec, case_ids: Sequence[str], class_names: Sequence[str]) -> dict:
    d = asdict(s)
    d["classes"] = [class_names[c] for c in s.classes]
    d["support"] = [case_ids[i] for i in s.support]
    d["query"] = [case_ids[i] for i in s.query]
    return d


def _segmentation_specs(path: Path, episodes: list[dict], where: dict[str, int], class_names) -> list[EpisodeSpec]:
    specs: list[EpisodeSpec] = []
    for e in episodes:
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
    return specs


def _classification_specs(path: Path, episodes: list[dict], where: dict[str, int], class_names) -> list[EpisodeSpec]:
    if class_names is None:
        raise ValueError(f"{path} holds classification episodes: pass class_names to load_episodes")
    cls_at = {n: i for i, n in enumerate(class_names)}
    specs: list[EpisodeSpec] = []
    for e in episodes:
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
    return specs


# spec class -> how one spec is stored; file kind -> how a file's episodes are read back (a file without a
# known kind holds segmentation episodes, as the first files did)
_RECORDS: dict[type, Callable[[Any, Sequence[str], Any], dict]] = {
    SegmentationEpisodeSpec: _segmentation_record, ClassificationEpisodeSpec: _classification_record}
_READERS: dict[str, Callable[[Path, list[dict], dict[str, int], Any], list[EpisodeSpec]]] = {
    SegmentationEpisodeSpec.kind: _segmentation_specs, ClassificationEpisodeSpec.kind: _classification_specs}


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
    spec_class = kinds.pop() if kinds else SegmentationEpisodeSpec
    if spec_class not in _RECORDS:
        raise ValueError(f"save_episodes cannot store {spec_class.__name__}; it stores {sorted(k.__name__ for k in _RECORDS)}")
    if spec_class is ClassificationEpisodeSpec and class_names is None:
        raise ValueError("save_episodes: classification episodes need class_names to store their classes by name")
    episodes = [_RECORDS[spec_class](s, case_ids, class_names) for s in specs]
    payload = {"kind": spec_class.kind, "meta": meta or {}, "episodes": episodes}
    payload["sha256"] = _episodes_digest(episodes)
    text = json.dumps(payload, indent=1)
    try:  # the same file already there (every later run of one setting): not written again, so that a complete
        if path.read_text(encoding="utf-8") == text:  # cache on read-only storage serves its runs
            return path
    except (OSError, UnicodeDecodeError):
        pass
    with atomic_open(path, "w", encoding="utf-8") as f:
        f.write(text)
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
    where = {cid: i for i, cid in enumerate(case_ids)}  # the caller's arguments: outside the file's checks below
    names = None if class_names is None else list(class_names)
    fix = "regenerate it (a cached file: delete it and it is drawn again; a test_episodes_file: unset it or fix it)"
    try:
        with open(path) as f:
            payload = json.load(f)
        if not isinstance(payload, dict) or not isinstance(payload.get("episodes"), list):
            raise ValueError(f"{path}: not an episode file (no list of episodes); {fix}")
        if not isinstance(payload.get("meta", {}), dict):
            raise ValueError(f"{path}: its meta is a {type(payload['meta']).__name__}, not a mapping; {fix}")
        if "sha256" in payload:
            if _episodes_digest(payload["episodes"]) != payload["sha256"]:
                raise ValueError(f"{path}: the episode list does not match its sha256 (the file was edited); {fix}")
        read = _READERS.get(str(payload.get("kind")), _segmentation_specs)
        return read(path, payload["episodes"], where, names), payload.get("meta", {})
    except (KeyError, TypeError, ValueError, AttributeError, IndexError, RecursionError) as e:
        if isinstance(e, ValueError) and str(e).startswith(str(path)):  # already names the file and the fix
            raise
        raise ValueError(f"{path}: not an episode file written by imaging-meta ({type(e).__name__}: {e}); {fix}") from e


def _episodes_digest(episodes: list[dict]) -> str:
    return hashlib.sha256(json.dumps(episodes, sort_keys=True).encode()).hexdigest()


def episodes_sha256(path: str | os.PathLike) -> str:
    """The sha256 of a file's episode list (the one it records; computed for a file written without it), which
    reports quote so that results scored on the same episodes can be matched."""
    payload = json.loads(Path(path).read_text())
    return payload.get("sha256") or _episodes_digest(payload["episodes"])


_STAGE_NAMES = {"train": "training", "val": "validation"}


def _case_problem(case: Case, stage: str | None, organ: str, test_sites: set[str], protocol: str) -> str | None:
    """What is wrong with one case of a test episode (``stage``: the split stage it is in, if any), or None."""
    if protocol == "cross_site" and case.site not in test_sites:
        return f"case {case.case_id} is from site {case.site!r}, not a test site ({sorted(test_sites)})"
    if stage is None:
        return f"case {case.case_id} (patient {case.patient}) is in no stage of this split"
    if stage != "test":
        return f"case {case.case_id} belongs to {_STAGE_NAMES[stage]} patient {case.patient}, not a test patient"
    if organ not in case.organs:
        return f"case {case.case_id} has no {organ!r} in its label map"
    return None


def check_segmentation_episodes(
    path: str | os.PathLike, specs: Sequence[SegmentationEpisodeSpec], cases: Sequence[Case], split: Split,
    n_shot: int, n_query: int, slices: Mapping[str, Mapping[int, Sequence[int]]] | None = None,
) -> None:
    """Refuse a segmentation test episode file that breaks the split it is used with.

    Every episode must target a test organ, draw every slice from a test patient (under cross_site: a test
    site), have ``n_shot`` support and ``n_query`` query slices, every shot and every query from its own patient,
    as the sampler draws them. With ``slices`` (the test stage's slice
    table: organ -> case -> the slices that show it), every slice must still show its organ: a label map edited
    after the file was drawn (the organ removed from a slice) gave an episode whose mask was empty.

    Raises:
        ValueError: naming the file, the first episode that breaks the split and what is wrong with it.
    """
    stage_of = {i: stage for stage in ("train", "val", "test") for i in getattr(split, stage)}
    test_sites = {cases[i].site for i in split.test}
    for e, spec in enumerate(specs):
        problem: str | None
        if len(spec.support) != n_shot or len(spec.query) != n_query:
            problem = (f"{len(spec.support)} support and {len(spec.query)} query slices; this run is {n_shot}-shot "
                       f"with {n_query} queries")
        elif spec.organ not in split.test_organs:
            role = ("a training organ" if spec.organ in split.train_organs
                    else "a validation organ" if spec.organ in split.val_organs else "not in this split")
            problem = f"organ {spec.organ!r} is {role}, not a test organ ({split.test_organs})"
        else:
            problem = next((p for c, _ in spec.support + spec.query if (p := _case_problem(
                cases[c], stage_of.get(c), spec.organ, test_sites, split.protocol)) is not None), None)
        if problem is None:  # as the sampler draws them: every shot and every query its own patient
            shot_patients = [cases[c].patient for c, _ in spec.support]
            shared = sorted(set(shot_patients) & {cases[c].patient for c, _ in spec.query})
            if shared:
                problem = f"its support and query share patient(s) {', '.join(shared[:3])}"
            elif len(set(shot_patients)) < len(shot_patients):
                problem = "two of its support slices are of one patient (every shot is its own patient)"
            elif len({cases[c].patient for c, _ in spec.query}) < len(spec.query):
                problem = "two of its query slices are of one patient (every query is its own patient)"
        if problem is None and slices is not None:
            shown = slices.get(spec.organ, {})
            problem = next((f"slice {z} of case {cases[c].case_id} no longer shows {spec.organ!r} (fewer of its pixels "
                            "than this run's min_organ_pixels, or none, in the label map as it is now): the labels "
                            "changed since the file was drawn, or min_organ_pixels did"
                            for c, z in spec.support + spec.query if z not in set(shown.get(c, ()))), None)
        if problem:
            raise ValueError(f"{path}: episode {e}: {problem}; this file does not fit this run's {split.protocol} split: "
                             "use an episode file drawn for it (or leave test_episodes_file unset to draw one)")
