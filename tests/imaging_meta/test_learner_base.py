"""Learners record the arguments they were built with, so checkpoints rebuild them without pickled code."""

import pytest

from imaging_meta.learners.base import build_learner
from imaging_meta.learners.gradient.maml import MAML


class NoInit(MAML):
    """A subclass without an __init__ of its own."""


def test_a_subclass_without_init_records_its_parents_arguments_under_its_own_path():
    learner = NoInit(n_way=3, inner_steps=2)
    cfg = learner.config
    assert cfg["class_path"].endswith(".NoInit")
    assert cfg["init_args"]["n_way"] == 3 and cfg["init_args"]["inner_steps"] == 2


def test_build_learner_round_trip_and_refuses_foreign_classes():
    learner = MAML(n_way=4, backbone_kwargs={"width": 8})
    again = build_learner(learner.config)
    assert type(again) is MAML and again.config == learner.config
    with pytest.raises(ValueError, match="imaging_meta.learners"):
        build_learner({"class_path": "os.system", "init_args": {}})
