"""Checkpoints written by main before the restructuring (commit 544d8f2) still load through `segment`,
`classify` and `evaluate`. The two files in ``tests/fixtures/main-2026-12`` were written by that commit's code
(a 2-step ProtoNet segmenter fit on the demo cohort of ``conftest.demo_root``, and a 1-epoch ProtoNet
classifier); their class paths are the old, flat ones."""

import csv
import json
from pathlib import Path

import numpy as np
import torch

from imaging_meta.commands.cli import cli_main
from tests.helpers import write_png

FIXTURES = Path(__file__).parent / "fixtures" / "main-2026-12"


def test_old_checkpoints_name_the_old_class_paths():
    seg = torch.load(FIXTURES / "protonet_seg.ckpt", weights_only=True, map_location="cpu")
    assert seg["imaging_meta"]["learner_config"]["class_path"] == "imaging_meta.learners.protonet_seg.PrototypicalSegmenter"
    assert seg["imaging_meta"]["data"]["class_path"] == "datamodules.segmentation.SegmentationDataModule"


def test_old_segmentation_checkpoint_evaluates_and_segments(demo_root, demo_index, tmp_path):
    out = tmp_path / "run"
    assert cli_main(["evaluate", "--checkpoint", str(FIXTURES / "protonet_seg.ckpt"), "--out", str(out),
                     "--shots", "1", "--episodes", "2", "--data-root", str(demo_root),
                     "--cache-dir", str(tmp_path / "cache"), "--panel", "0"]) == 0
    doc = json.loads((out / "results.json").read_text())
    assert doc["context"]["learner"].endswith("PrototypicalSegmenter")
    index, _ = demo_index
    nifti = [c for c in index.labelled_cases if c.image_format == "nifti"]
    support, query = nifti[0], nifti[-1]
    organ = next(iter(support.organs))
    rc = cli_main(["segment", "--checkpoint", str(FIXTURES / "protonet_seg.ckpt"),
                   "--support-image", index.resolve(support.image), "--support-label", index.resolve(support.label),
                   "--label-value", str(support.organs[organ]), "--query", index.resolve(query.image),
                   "--out", str(tmp_path / "masks")])
    assert rc == 0 and list((tmp_path / "masks").glob("*.nii.gz"))


def test_old_classification_checkpoint_classifies(tmp_path):
    rng = np.random.default_rng(1)
    support = tmp_path / "support"
    for c, name in enumerate(("a", "b", "c")):
        for k in range(2):
            write_png(support / name / f"s{k}.png", rng.integers(0, 255, (28, 28)).astype(np.uint8) // (c + 1))
    out = tmp_path / "preds.csv"
    assert cli_main(["classify", "--checkpoint", str(FIXTURES / "protonet_cls.ckpt"), "--support", str(support),
                     "--query", str(support / "a" / "s0.png"), "--out", str(out)]) == 0
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 1 and rows[0]["predicted_class"] in {"a", "b", "c"}
