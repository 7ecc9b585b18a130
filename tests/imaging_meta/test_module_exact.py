"""What a mutation review of the Lightning module found unguarded: each validation epoch's score is its own, the
test report holds the test episodes alone, ``test/<metric>`` is the trained learner's mean, the mask threshold is
the one scored at and recorded, the report has its paired differences and the settings that differ from the
checkpoint's, ``baselines: false`` scores no baseline, the untrained copy comes back from the checkpoint, a
validation that predicts NaN stops, and a tuple and a list of the same values are no change of settings."""

import json
import warnings
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Trainer

from imaging_meta.evaluation.methods import TRAINED, UNTRAINED
from imaging_meta.learners.gradient.meta_sgd import MetaSGD
from imaging_meta.learners.metric.protonet_seg import PrototypicalSegmenter
from imaging_meta.module import EpisodicModule, learner_changes
from imaging_meta.tasks import COPY_MASK
from tests.imaging_meta.fewshot import segmentation_episode


class Episodes(torch.utils.data.Dataset):
    def __init__(self, n: int, seed: int = 0) -> None:
        self.n, self.seed = n, seed

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        return segmentation_episode(n_shot=1, n_query=2, tasks=1, size=32, seed=self.seed + i)


def loader(n: int, seed: int = 0):
    return torch.utils.data.DataLoader(Episodes(n, seed), batch_size=None)


def module(seed: int = 0, **kwargs) -> EpisodicModule:
    torch.manual_seed(seed)
    learner = PrototypicalSegmenter(backbone="unet", backbone_kwargs={"out_channels": 8, "features": [4, 4, 8, 8, 16, 4]})
    return EpisodicModule(learner, **kwargs)


def trainer(tmp_path: Path, **kwargs) -> Trainer:
    return Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
                   enable_checkpointing=False, inference_mode=False, default_root_dir=str(tmp_path), **kwargs)


def test_each_validation_epoch_scores_its_own_episodes_and_the_test_report_holds_the_test_ones(tmp_path):
    m = module()
    t = trainer(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        first = float(t.validate(m, loader(3), verbose=False)[0]["val/score"])
        assert len(m._records["val"]) == 3 * 2
        second = float(t.validate(m, loader(2, seed=10), verbose=False)[0]["val/score"])
        assert len(m._records["val"]) == 2 * 2  # not the first epoch's too
        alone = float(trainer(tmp_path / "b").validate(m, loader(2, seed=10), verbose=False)[0]["val/score"])
        assert second == pytest.approx(alone) and first != pytest.approx(second)
        out = t.test(m, loader(4, seed=20), verbose=False)[0]
    summary = m.test_summary
    assert summary[TRAINED]["all"]["n_episodes"] == 4  # no validation episode among them
    # test/dice is the trained learner's mean, not one over the baselines' records too
    assert float(out["test/dice"]) == pytest.approx(summary[TRAINED]["all"]["mean"])
    assert {UNTRAINED, COPY_MASK} <= set(m.test_differences)


def test_the_mask_threshold_is_the_one_scored_at_and_recorded(tmp_path):
    scores = {}
    for threshold in (0.5, 0.05):
        m = module(threshold=threshold, baselines=False)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer(tmp_path / str(threshold)).test(m, loader(3), verbose=False)
        scores[threshold] = m.test_summary[TRAINED]["all"]["mean"]
        report = json.loads((tmp_path / str(threshold) / "results.json").read_text())
        assert report["context"]["threshold"] == threshold
        md = (tmp_path / str(threshold) / "results.md").read_text()
        assert "trained − " not in md and COPY_MASK not in md  # baselines: false scores none
        assert set(m.test_summary) == {TRAINED}
    assert scores[0.5] != pytest.approx(scores[0.05])


def test_the_report_has_the_paired_differences_and_the_settings_not_the_checkpoints(tmp_path):
    m = module()
    m.learner_changes = {"n_parts": (3, 1)}
    m.preprocessing_changes = {"spacing": ([2.0, 2.0], [1.0, 1.0])}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer(tmp_path).test(m, loader(3), verbose=False)
    report = json.loads((tmp_path / "results.json").read_text())
    assert report["context"]["learner_settings_not_the_checkpoints"] == {"n_parts": {"checkpoint": 3, "tested": 1}}
    assert report["context"]["preprocessing_not_the_checkpoints"] == {
        "spacing": {"checkpoint": [2.0, 2.0], "tested": [1.0, 1.0]}}
    md = (tmp_path / "results.md").read_text()
    assert f"trained − {UNTRAINED}" in md and f"trained − {COPY_MASK}" in md


def test_the_untrained_copy_comes_back_from_the_checkpoint_not_this_processs_initialisation(tmp_path):
    trained = module(seed=0)
    ckpt = {"state_dict": trained.state_dict()}
    trained.on_save_checkpoint(ckpt)
    other = module(seed=1)  # another process: other random initial weights
    other.on_load_checkpoint(ckpt)
    for a, b in zip(other._untrained[0].state_dict().values(), trained._untrained[0].state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_a_validation_that_predicts_nan_stops_instead_of_scoring_chance(tmp_path, monkeypatch):
    m = module()
    monkeypatch.setattr(m.learner, "predict", lambda episode: torch.full(episode.query_labels.shape, float("nan")))
    with pytest.raises(FloatingPointError, match="non-finite predictions in validation batch 0"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer(tmp_path).validate(m, loader(1), verbose=False)


def test_a_tuple_and_a_list_of_the_same_values_are_no_change_of_settings():
    """A model built through the Python API (tuples) and tested from a YAML config (lists) was warned about as
    built with other settings than the checkpoint's (a review)."""
    assert learner_changes(MetaSGD(lr_init_range=(0.005, 0.1)).config, MetaSGD(lr_init_range=[0.005, 0.1]).config) == {}
    changed = learner_changes(MetaSGD(lr_init_range=(0.005, 0.1)).config, MetaSGD(lr_init_range=[0.01, 0.1]).config)
    assert changed == {"lr_init_range": ((0.005, 0.1), [0.01, 0.1])}


def test_a_nan_training_loss_stops_the_run(tmp_path, monkeypatch):
    m = module(baselines=False)
    monkeypatch.setattr(m.learner, "loss", lambda episode: torch.tensor(float("nan"), requires_grad=True))
    with pytest.raises(FloatingPointError, match="non-finite training loss nan at step 0"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer(tmp_path, max_steps=1).fit(m, train_dataloaders=loader(1))


def test_a_learning_rate_schedule_steps_once_an_epoch_not_once_a_batch(tmp_path):
    from functools import partial

    m = module(baselines=False, optimizer=partial(torch.optim.SGD, lr=1.0),
               lr_scheduler=partial(torch.optim.lr_scheduler.StepLR, step_size=1, gamma=0.5))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t = trainer(tmp_path, max_epochs=2, limit_val_batches=0)
        t.fit(m, train_dataloaders=loader(3))  # 3 batches an epoch, 2 epochs: 2 scheduler steps, not 6
    assert t.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.25)


def test_settings_compare_as_values_numpy_scalars_nan_paths_and_booleans_included():
    import numpy as np

    from imaging_meta.module import preprocessing_changes

    assert learner_changes(MetaSGD(inner_steps=np.int64(3)).config, MetaSGD(inner_steps=3).config) == {}
    same = preprocessing_changes({"w": float("nan"), "s": [1, 2], "p": "a/b", "m": None},
                                 {"w": np.float64("nan"), "s": (1.0, 2.0), "p": Path("a/b")})
    assert same == {}
    assert preprocessing_changes({"augment": True}, {"augment": 1}) == {"augment": (True, 1)}
    assert list(preprocessing_changes({"w": "NaN"}, {"w": float("nan")})) == ["w"]
    assert preprocessing_changes({"s": [1, 2]}, {"s": [1, 3]}) == {"s": ([1, 2], [1, 3])}
