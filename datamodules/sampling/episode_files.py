"""Fixed episode lists as JSON: written once from a seed, read back by later runs and by ``evaluate``.

Files name cases (items) by their pseudonymous ids, never by position, and carry the sha256 of their
episode list so that reports can quote which episodes a result was measured on. The file's ``kind`` is the
``kind`` of its spec class.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from datamodules.io.atomic import atomic_open
from datamodules.sampling.samplers_classification import ClassificationEpisodeSpec
from datamodules.sampling.samplers_segmentation import SegmentationEpisodeSpec

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
_RECORDS = {SegmentationEpisodeSpec: _segmentation_record, ClassificationEpisodeSpec: _classification_record}
_READERS = {SegmentationEpisodeSpec.kind: _segmentation_specs, ClassificationEpisodeSpec.kind: _classification_specs}


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
    read = _READERS.get(payload.get("kind"), _segmentation_specs)
    return read(path, payload["episodes"], where, class_names), payload.get("meta", {})
