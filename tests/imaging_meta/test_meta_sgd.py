"""Meta-SGD's learned inner rates start as the paper draws them (uniform in [0.005, 0.1], seeded, a different
value per element) or as one constant; old checkpoints keep loading; the shipped config says which it uses."""

from pathlib import Path

import pytest
import torch
import yaml

from imaging_meta.learners.base import build_learner
from imaging_meta.learners.gradient.meta_sgd import MetaSGD
from tests.imaging_meta.fewshot import TINY, classification_episode

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "model" / "metasgd_cls.yaml"


def tiny(**kw):
    torch.manual_seed(0)
    return MetaSGD(**{"n_way": 3, "backbone_kwargs": TINY, "inner_steps": 1, "inner_lr": 0.3, **kw})


def rates(learner):
    return {k: v.detach().clone() for k, v in learner.inner_lrs.items()}


def test_the_papers_start_is_uniform_in_its_range_seeded_and_differs_across_parameters():
    learner = tiny(lr_init="uniform", lr_init_seed=3)
    start = rates(learner)
    flat = torch.cat([r.flatten() for r in start.values()])
    assert flat.min() >= 0.005 and flat.max() <= 0.1 and flat.numel() > 100
    assert flat.std() > 0.02 and flat.unique().numel() > 0.9 * flat.numel()  # a value per element, spread out
    assert len({float(r.flatten()[0]) for r in start.values()}) == len(start)  # parameters start differently
    for n, p in learner.net.named_parameters():
        r = start[n.replace(".", "__")]
        assert r.shape == p.shape and r.dtype == p.dtype and r.device == p.device
    again = rates(tiny(lr_init="uniform", lr_init_seed=3))
    other = rates(tiny(lr_init="uniform", lr_init_seed=4))
    assert all(torch.equal(start[k], again[k]) for k in start)  # seeded
    assert all(not torch.equal(start[k], other[k]) for k in start)
    narrow = rates(tiny(lr_init="uniform", lr_init_range=(0.2, 0.25)))
    assert all(((r >= 0.2) & (r <= 0.25)).all() for r in narrow.values())


def test_without_a_seed_the_start_follows_torchs_default_generator():
    a, b = rates(tiny(lr_init="uniform")), rates(tiny(lr_init="uniform"))  # tiny() calls torch.manual_seed(0)
    assert all(torch.equal(a[k], b[k]) for k in a)
    torch.manual_seed(1)
    net_seed_1 = MetaSGD(n_way=3, backbone_kwargs=TINY, lr_init="uniform")
    assert any(not torch.equal(a[k], v.detach()) for k, v in net_seed_1.inner_lrs.items())


def test_the_constant_start_is_inner_lr_everywhere_and_the_measured_default():
    learner = tiny(lr_init="constant")
    assert all(torch.all(r == 0.3) for r in learner.inner_lrs.values())
    default = MetaSGD(n_way=3, backbone_kwargs=TINY)  # constant 0.1: it measured better (docs/learners.md)
    assert default.lr_init == "constant" and all(torch.all(r == 0.1) for r in default.inner_lrs.values())


def test_the_start_does_not_change_the_state_dict_and_old_checkpoints_load():
    """The rates are parameters either way: same keys and shapes, and a checkpoint of one start (or one written
    before the option existed, whose config lacks it) loads into the other."""
    old_config = {"class_path": "imaging_meta.learners.gradient.meta_sgd.MetaSGD",
                  "init_args": {"n_way": 3, "backbone_kwargs": TINY, "inner_steps": 1, "inner_lr": 0.3}}
    old = build_learner(old_config)
    new = tiny(lr_init="uniform", lr_init_seed=0)
    assert {k: v.shape for k, v in old.state_dict().items()} == {k: v.shape for k, v in new.state_dict().items()}
    new.load_state_dict(old.state_dict())
    ep = classification_episode(n_way=3, n_shot=1, n_query=2, tasks=2, size=8)
    assert torch.equal(new.predict(ep), old.predict(ep))
    rebuilt = build_learner(new.config)  # the config records the start's arguments
    assert rebuilt.config == new.config and rebuilt.config["init_args"]["lr_init_range"] == (0.005, 0.1)
    rebuilt.load_state_dict(new.state_dict())
    assert torch.equal(rebuilt.predict(ep), new.predict(ep))


def test_bad_starts_are_refused():
    with pytest.raises(ValueError, match="lr_init must be one of"):
        tiny(lr_init="normal")
    with pytest.raises(ValueError, match="lr_init_range"):
        tiny(lr_init_range=(0.1, 0.005))


def test_the_config_names_its_start():
    init_args = yaml.safe_load(CONFIG.read_text())["model"]["learner"]["init_args"]
    assert init_args["lr_init"] in {"uniform", "constant"}
    learner = build_learner({"class_path": "imaging_meta.learners.gradient.meta_sgd.MetaSGD",
                             "init_args": {**init_args, "backbone_kwargs": TINY}})
    assert learner.lr_init == init_args["lr_init"]
