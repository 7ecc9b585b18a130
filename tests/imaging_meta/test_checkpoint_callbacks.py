"""The shipped trainer configs keep two checkpoints: ``best.ckpt`` (the model that validation selects; what
``--test_after_fit`` tests) and ``last.ckpt`` (the latest state, every epoch, for resuming). Lightning's own
``save_last: true`` rewrites ``last.ckpt`` only when the monitored checkpoint improves, so with it a run whose
validation peaked at epoch 3 of 10 had a ``last.ckpt`` of epoch 3, and a run without validation had none."""

import pytest
import torch
import yaml
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import instantiate_class
from torch.utils.data import DataLoader, TensorDataset

from imaging_meta.commands.cli import checkpoint_to_test
from tests.helpers import CONFIGS

TRAINERS = sorted(p.name for p in (CONFIGS / "trainer").glob("*.yaml"))


def config_checkpoints(name: str, dirpath) -> list[ModelCheckpoint]:
    """The ModelCheckpoint callbacks of a shipped trainer config, as LightningCLI builds them."""
    callbacks = yaml.safe_load((CONFIGS / "trainer" / name).read_text())["trainer"]["callbacks"]
    return [instantiate_class((), {**cb, "init_args": {**cb.get("init_args", {}), "dirpath": dirpath}})
            for cb in callbacks if cb["class_path"].endswith(".ModelCheckpoint")]


class Scored(LightningModule):
    """A linear model whose validation score is given per epoch."""

    def __init__(self, scores):
        super().__init__()
        self.scores = scores
        self.layer = torch.nn.Linear(2, 1)

    def training_step(self, batch, _):
        return self.layer(batch[0]).pow(2).mean()

    def validation_step(self, batch, _):
        self.log("val/score", self.scores[self.current_epoch])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _fit(callbacks, scores, validate=True, epochs=4):
    data = DataLoader(TensorDataset(torch.randn(8, 2)), batch_size=4)
    trainer = Trainer(max_epochs=epochs, callbacks=callbacks, logger=False, enable_progress_bar=False,
                      enable_model_summary=False, num_sanity_val_steps=0, accelerator="cpu", devices=1)
    trainer.fit(Scored(scores), train_dataloaders=data, val_dataloaders=data if validate else None)
    return trainer


@pytest.mark.parametrize("name", TRAINERS)
def test_every_trainer_config_keeps_the_best_and_the_latest(name, tmp_path):
    callbacks = config_checkpoints(name, tmp_path)
    trainer = _fit(callbacks, scores=[0.2, 0.9, 0.5, 0.3])  # validation peaks at epoch 1 of 0-3
    best, last = torch.load(tmp_path / "best.ckpt", weights_only=True), torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert (best["epoch"], last["epoch"]) == (1, 3)
    assert last["global_step"] == trainer.global_step == 8
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.ckpt", "last.ckpt"]
    assert checkpoint_to_test(trainer.checkpoint_callbacks) == str(tmp_path / "best.ckpt")


def test_without_validation_the_latest_is_kept_and_tested(tmp_path):
    """Self-supervised training on unlabelled scans has no validation: last.ckpt is still written."""
    trainer = _fit(config_checkpoints("default.yaml", tmp_path), scores=[], validate=False, epochs=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]
    assert torch.load(tmp_path / "last.ckpt", weights_only=True)["epoch"] == 1
    assert checkpoint_to_test(trainer.checkpoint_callbacks) == str(tmp_path / "last.ckpt")


def test_lightnings_save_last_alone_would_keep_the_best_epoch(tmp_path):
    """The negative control: the old config's single callback (save_last: true) leaves last.ckpt at epoch 1."""
    old = ModelCheckpoint(dirpath=tmp_path, monitor="val/score", mode="max", save_top_k=1, save_last=True,
                          filename="best-{epoch:02d}")
    _fit([old], scores=[0.2, 0.9, 0.5, 0.3])
    assert torch.load(tmp_path / "last.ckpt", weights_only=True)["epoch"] == 1
