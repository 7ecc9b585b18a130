"""The committed real 2D classification sets (benchmarks/real/classification/) are exactly what their manifests
list: every listed PNG is there with the listed pixels, and nothing else is in a set's class folders."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.real.prepare_classification import check_set

SETS = Path(__file__).resolve().parents[1] / "benchmarks" / "real" / "classification"
MANIFESTS = sorted(SETS.glob("manifest*.json"))


def _sets() -> list[tuple[str, dict[str, str]]]:
    return [(name, images) for m in MANIFESTS for name, images in json.loads(m.read_text()).items()]


def test_every_set_folder_has_a_manifest():
    assert {name for name, _ in _sets()} == {p.name for p in SETS.iterdir() if p.is_dir()}


@pytest.mark.parametrize(("name", "images"), _sets(), ids=[name for name, _ in _sets()])
def test_a_set_holds_exactly_its_manifest(name, images):
    assert check_set(SETS / name, images, images) == []
    on_disk = {p.relative_to(SETS / name).as_posix() for p in (SETS / name).rglob("*") if p.is_file()}
    assert on_disk == set(images)
