"""Checkpoints written by main before the restructuring (commit 544d8f2) still load through `segment`,
`classify` and `evaluate`.

``tests/fixtures/main-2026-12/layouts.json`` records, as text, what that commit's code wrote into two checkpoints
(a 2-step ProtoNet segmenter fit on the demo cohort of ``conftest.demo_root``, and a 1-epoch ProtoNet
classifier): the ``imaging_meta`` section with the old, flat class paths and the learner and data arguments of
the time, Lightning's hyperparameters and the datamodule's, and the datamodule's state, with their folders as
``{root}``, ``{cache_dir}`` and ``{data}`` (the training loop's and optimiser's state, which no command reads,
are left out). `legacy_checkpoint` writes a checkpoint of that layout into the test's folder, with the
weights of a learner built from the recorded config (their names are those of the old files: the tests were
first run on the files themselves, which the repository no longer keeps, as it keeps no checkpoint)."""

import csv
import json

import numpy as np
import torch

from imaging_meta.commands.cli import cli_main
from tests.helpers import legacy_checkpoint, write_png


def test_old_checkpoints_name_the_old_class_paths(tmp_path):
    seg = torch.load(legacy_checkpoint("protonet_seg", tmp_path / "seg.ckpt"), weights_only=True, map_location="cpu")
    assert seg["imaging_meta"]["learner_config"]["class_path"] == "imaging_meta.learners.protonet_seg.PrototypicalSegmenter"
    assert seg["imaging_meta"]["data"]["class_path"] == "datamodules.segmentation.SegmentationDataModule"


def test_old_segmentation_checkpoint_evaluates_and_segments(demo_root, demo_index, tmp_path):
    out = tmp_path / "run"
    ckpt = legacy_checkpoint("protonet_seg", tmp_path / "seg.ckpt", "/gone/cohort", "/gone/cache")
    assert cli_main(["evaluate", "--checkpoint", str(ckpt), "--out", str(out),
                     "--shots", "1", "--episodes", "2", "--data-root", str(demo_root),
                     "--cache-dir", str(tmp_path / "cache"), "--panel", "0"]) == 0
    doc = json.loads((out / "results.json").read_text())
    assert doc["context"]["learner"].endswith("PrototypicalSegmenter")
    index, _ = demo_index
    nifti = [c for c in index.labelled_cases if c.image_format == "nifti"]
    support, query = nifti[0], nifti[-1]
    organ = next(iter(support.organs))
    rc = cli_main(["segment", "--checkpoint", str(ckpt),
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
    ckpt = legacy_checkpoint("protonet_cls", tmp_path / "cls.ckpt", cache_dir="/gone/cache")
    assert cli_main(["classify", "--checkpoint", str(ckpt), "--support", str(support),
                     "--query", str(support / "a" / "s0.png"), "--out", str(out)]) == 0
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 1 and rows[0]["predicted_class"] in {"a", "b", "c"}
