"""Read a Medical Segmentation Decathlon (or nnU-Net) ``dataset.json``: image/label pairs, label names, modality."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from datamodules.indexing.inputs import Reject
from datamodules.indexing.pseudonyms import normalise_modality


@dataclass
class Decathlon:
    """A dataset description: where it is, its training pairs (absolute paths), label names and modality."""

    path: str
    folder: str
    pairs: dict[str, str] = field(default_factory=dict)  # image abs path -> label abs path
    labels: dict[int, str] = field(default_factory=dict)
    modality: str | None = None
    channels: int = 1  # the image channels its ``channel_names`` (nnU-Net v2) or ``modality`` (v1) name


#: nnU-Net v2's name for the value of voxels that are not annotated (sparse annotation): no structure
IGNORE_LABEL = "ignore"


def parse_label_names(raw: Any) -> dict[int, str]:
    """Label value -> name from a Decathlon ``{"1": "liver"}`` or an nnU-Net v2 ``{"liver": 1}`` mapping."""
    out: dict[int, str] = {}
    if not isinstance(raw, Mapping):
        return out
    for k, v in raw.items():
        if isinstance(v, str):  # Decathlon: {"0": "background", "1": "liver"}
            try:
                out[int(k)] = v
            except (TypeError, ValueError):
                continue
        elif isinstance(v, int) and not isinstance(v, bool):  # nnU-Net v2: {"background": 0, "liver": 1}
            out[int(v)] = str(k)
    values_of: dict[str, list[int]] = {}
    for value, name in sorted(out.items()):
        values_of.setdefault(name, []).append(value)
    shared = {name: values for name, values in values_of.items() if len(values) > 1}
    if shared:  # one name per structure: a second value was renamed '<name>_<value>', half a held-out organ trained on
        name, values = next(iter(shared.items()))
        raise ValueError(f"the label names give {name!r} to values {values}: a structure is one label value, so each "
                         f"needs its own name (e.g. '{name}_left', '{name}_right'), or merge the values in the label maps")
    return out


def parse_decathlon(path: str) -> Decathlon:
    """Read ``dataset.json`` at ``path``; `Reject` when it is not JSON or not a dataset description."""
    try:
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise Reject(f"dataset.json is not valid JSON ({type(e).__name__}: {e})") from e
    if not isinstance(d, dict) or not ({"training", "labels"} & set(d)):
        raise Reject("a dataset.json without 'training' or 'labels': not a Decathlon dataset description")
    folder = os.path.dirname(path)
    try:
        names = parse_label_names(d.get("labels"))
    except ValueError as e:  # not a Reject: its images would be indexed without any name, the distinct ones too
        raise ValueError(f"{path}: its 'labels': {e}") from e
    dec = Decathlon(path=path, folder=folder, labels=names)
    dec.modality = normalise_modality(d.get("modality")) or normalise_modality(d.get("channel_names"))
    named = d.get("channel_names") if isinstance(d.get("channel_names"), Mapping) else d.get("modality")
    dec.channels = max(1, len(named)) if isinstance(named, Mapping) else 1
    training = d.get("training")
    if training is not None and not isinstance(training, list):  # a crash of the whole scan before (a review)
        raise Reject(f"its 'training' is a {type(training).__name__}, not a list of {{\"image\", \"label\"}} pairs")
    for entry in training or []:
        if isinstance(entry, Mapping) and isinstance(entry.get("image"), str) and isinstance(entry.get("label"), str):
            img = os.path.normpath(os.path.join(folder, entry["image"]))
            lbl = os.path.normpath(os.path.join(folder, entry["label"]))
            dec.pairs[img] = lbl
    return dec
