"""`imaging-meta classify`: what a mutation review found unguarded. The answers themselves (raw pixels, which
need no training, find each query's class: a query read otherwise than its support would not), a support of one
class or with an empty class folder, a query file whose suffix is upper case, a segmentation checkpoint, and a
learner whose probabilities are not finite."""

import csv
from pathlib import Path

import numpy as np
import pytest
import torch

from imaging_meta.commands.classify import classify, query_files, support_folder
from imaging_meta.learners.descriptors.classifier import DescriptorClassifier
from tests.helpers import write_png
from tests.imaging_meta.test_classify_explain import CLASSES, write_folders


def pixels_checkpoint(path: Path, task: str = "classification", learner=None) -> Path:
    learner = learner or DescriptorClassifier(features="pixels")
    torch.save({"state_dict": {f"learner.{k}": v for k, v in learner.state_dict().items()},
                "imaging_meta": {"learner_config": learner.config, "task": task,
                                 "preprocessing": {"image_size": [28, 28], "channels": 1}}}, path)
    return path


def test_raw_pixels_put_each_query_in_its_class(tmp_path):
    """Each query is a noisy copy of its class's pattern; one read flipped or otherwise unlike the support would
    land elsewhere (q2 went to cyst under a left-right flip of the queries)."""
    support, queries = write_folders(tmp_path)
    out = classify(pixels_checkpoint(tmp_path / "px.ckpt"), support, [queries], tmp_path / "p.csv", device="cpu",
                   space="learned")
    rows = list(csv.DictReader(out.open()))
    assert [(Path(r["path"]).name, r["predicted_class"]) for r in rows] == [(f"q{c}.png", n) for c, n in enumerate(CLASSES)]


def test_a_support_of_one_class_or_with_an_empty_class_folder_is_refused(tmp_path):
    img = np.full((8, 8), 100, np.uint8)
    write_png(tmp_path / "one" / "a" / "x.png", img)
    with pytest.raises(ValueError, match=r"one: found 1 class subfolder\(s\); .* at least two"):
        support_folder(tmp_path / "one")
    write_png(tmp_path / "two" / "a" / "x.png", img)
    (tmp_path / "two" / "b").mkdir()
    (tmp_path / "two" / "b" / "notes.txt").write_text("no image")
    with pytest.raises(ValueError, match=r"two/b: no PNG, JPEG, TIFF, BMP or DICOM image in this class folder"):
        support_folder(tmp_path / "two")


def test_a_query_file_with_an_upper_case_suffix_is_read(tmp_path):
    path = write_png(tmp_path / "X.PNG", np.zeros((8, 8), np.uint8))
    assert query_files([path]) == [path]


def test_a_segmentation_checkpoint_is_refused(tmp_path):
    support, queries = write_folders(tmp_path)
    ckpt = pixels_checkpoint(tmp_path / "seg.ckpt", task="segmentation")
    with pytest.raises(Exception, match="a segmentation checkpoint; classify needs a classification learner"):
        classify(ckpt, support, [queries], tmp_path / "p.csv", device="cpu", space="learned")
    assert not (tmp_path / "p.csv").exists()


def test_non_finite_probabilities_are_an_error_naming_the_queries(tmp_path, monkeypatch):
    support, queries = write_folders(tmp_path)
    ckpt = pixels_checkpoint(tmp_path / "px.ckpt")
    monkeypatch.setattr(DescriptorClassifier, "predict",
                        lambda self, ep: torch.full((*ep.query_images.shape[:2], len(CLASSES)), float("nan")))
    with pytest.raises(FloatingPointError, match=r"non-finite class probabilities for queries .*q0\.png"):
        classify(ckpt, support, [queries], tmp_path / "p.csv", device="cpu", space="learned")
