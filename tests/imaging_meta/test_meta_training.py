"""Meta-training on a small demo cohort must beat the untrained learner on held-out-organ episodes."""

from functools import partial

import lightning.pytorch as pl
import pytest
import torch

from datamodules.segmentation import SegmentationDataModule
from imaging_meta.learners.metric.protonet_seg import PrototypicalSegmenter
from imaging_meta.module import COPY_MASK, TRAINED, UNTRAINED, EpisodicModule
from tests.helpers import SMALL_DATA


# ~30 s: in `make test-full`. Fast tests cover the same path: datamodules/test_selfsup.py::
# test_a_short_self_supervised_fit_beats_the_untrained_encoder_on_held_out_organs (a short fit of this learner and
# EpisodicModule on the demo cohort beats the untrained encoder on held-out organs) and test_cli.py::
# test_fit_fast_dev_run_then_test_writes_the_report (fit, test, trained / untrained / copy-mask rows in results.md)
@pytest.mark.slow
def test_meta_training_beats_the_untrained_encoder(demo_root, demo_index, tmp_path):
    """Cross-organ (setting 2): spleen and left kidney are never trained on, and tested on unseen patients."""
    pl.seed_everything(0, verbose=False)
    kw = dict(SMALL_DATA, episodes_per_epoch=160, val_episodes=4, test_episodes=40, spacing=(7.0, 7.0), slice_size=(48, 48),
              n_query=2, batch_size=4)
    dm = SegmentationDataModule(root=str(demo_root), index_path=str(demo_index[1]), cache_dir=str(tmp_path), **kw)
    learner = PrototypicalSegmenter(backbone_kwargs={"out_channels": 16, "features": [8, 16, 16, 32, 32, 16]},
                                    local_window=4, feature_pool=2, coord_channels=True, location_weight=1.0, bg_weight=0.3)
    model = EpisodicModule(learner, optimizer=partial(torch.optim.AdamW, lr=2e-3))
    trainer = pl.Trainer(accelerator="cpu", max_epochs=4, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0, default_root_dir=tmp_path)
    trainer.fit(model, datamodule=dm)
    trainer.test(model, datamodule=dm, verbose=False)
    s = model.test_summary
    trained, untrained = s[TRAINED]["all"], s[UNTRAINED]["all"]
    assert trained["n_episodes"] == 40 and COPY_MASK in s
    assert trained["mean"] - trained["ci95"] > untrained["mean"] + untrained["ci95"], (trained, untrained)
    assert (tmp_path / "results.md").exists()


def test_reduce_lr_on_plateau_watches_the_score_in_max_mode_or_the_users_monitor():
    """A review (2026-12-07): ReduceLROnPlateau watched val/score (higher is better) in torch's default mode "min",
    cutting the rate while the score rose; a monitor the user named was replaced; and an epoch without validation
    stopped the fit (strict). Now: mode min on val/score is refused, the user's monitor is kept, and the step is
    not strict."""
    from lightning.pytorch.cli import ReduceLROnPlateau as CLIPlateau

    learner = PrototypicalSegmenter(backbone_kwargs={"out_channels": 4, "features": [4, 4, 8, 8, 16, 4]})
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau
    with pytest.raises(ValueError, match="set mode: max"):
        EpisodicModule(learner, lr_scheduler=lambda o: plateau(o)).configure_optimizers()
    cfg = EpisodicModule(learner, lr_scheduler=lambda o: plateau(o, mode="max")).configure_optimizers()["lr_scheduler"]
    assert cfg["monitor"] == "val/score" and cfg["strict"] is False
    mine = EpisodicModule(learner, lr_scheduler=lambda o: CLIPlateau(o, monitor="train/loss_epoch")).configure_optimizers()
    assert mine["lr_scheduler"]["monitor"] == "train/loss_epoch"


@pytest.mark.parametrize("monitor", ["val/score", "hp/val_metric"])
def test_reduce_lr_on_plateau_steps_once_per_validation(monitor, tmp_path):
    """A review: Lightning keeps the last val/score and stepped the plateau scheduler on it again after every epoch
    without validation, each counted as no improvement: with check_val_every_n_epoch 2 and patience 1 the rate was
    cut at the first validation that did not improve. It now steps once per validation."""
    from datamodules.classification import ClassificationDataModule
    from datamodules.sources.medmnist import MedMNIST
    from imaging_meta.learners.gradient.maml import MAML
    from tests.helpers import write_medmnist

    paths = write_medmnist(tmp_path, n_files=1, classes_per_file=12, per_class=6)
    pl.seed_everything(3, verbose=False)
    data = ClassificationDataModule(
        source=MedMNIST(paths=paths, image_size=[16, 16]), cache_dir=str(tmp_path / "cache"), n_way=3, n_shot=1,
        n_query=2, val_classes_count=3, test_classes_count=3, episodes_per_epoch=4, val_episodes=2, test_episodes=2,
        batch_size=2, seed=5)
    steps = []

    class Counted(torch.optim.lr_scheduler.ReduceLROnPlateau):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.monitor = monitor  # as Lightning's CLI scheduler class names its monitor

        def step(self, metrics, *args, **kwargs):
            steps.append(float(metrics))
            return super().step(metrics, *args, **kwargs)

    module = EpisodicModule(MAML(n_way=3, backbone_kwargs={"width": 4}, inner_steps=1, inner_lr=0.1),
                            optimizer=lambda p: torch.optim.Adam(p, lr=0.01), baselines=False,
                            lr_scheduler=lambda o: Counted(o, mode="max", patience=1))
    trainer = pl.Trainer(accelerator="cpu", max_epochs=6, check_val_every_n_epoch=2, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0, inference_mode=False, default_root_dir=tmp_path)
    trainer.fit(module, datamodule=data)
    assert len(steps) == 3  # epochs 1, 3 and 5 validated; 0, 2 and 4 did not
