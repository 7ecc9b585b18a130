"""Mixed precision and gradient clipping reach the inner loops: second-order MAML and MANN meta-train under
Lightning's bf16-mixed autocast (on CPU here; gpu.yaml and ddp.yaml use it on GPUs) with finite losses."""

import pytest
import torch
from lightning.pytorch import Trainer, seed_everything

from imaging_meta.learners.gradient.maml import MAML
from imaging_meta.learners.memory.mann import MANN
from imaging_meta.module import EpisodicModule
from tests.imaging_meta.fewshot import classification_episode


class Episodes(torch.utils.data.Dataset):
    def __len__(self):
        return 4

    def __getitem__(self, i):
        return classification_episode(n_way=3, n_shot=1, n_query=2, tasks=2, size=16, seed=i)


@pytest.mark.parametrize(
    "make",
    [lambda: MAML(n_way=3, backbone_kwargs={"width": 4}, inner_steps=2, inner_lr=0.1),
     lambda: MANN(n_way=3, backbone_kwargs={"width": 4}, controller_size=8, memory_slots=6, memory_width=4, read_heads=1)],
    ids=["maml", "mann"],
)
def test_bf16_mixed_with_clipping_trains_and_keeps_float32_weights(make):
    seed_everything(0)
    module = EpisodicModule(make(), optimizer=lambda p: torch.optim.Adam(p, lr=0.01), baselines=False)
    before = {k: v.clone() for k, v in module.learner.state_dict().items()}
    trainer = Trainer(
        accelerator="cpu", devices=1, precision="bf16-mixed", gradient_clip_val=1.0, max_steps=4, logger=False,
        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False, inference_mode=False,
    )
    loader = torch.utils.data.DataLoader(Episodes(), batch_size=None)
    trainer.fit(module, train_dataloaders=loader)
    assert trainer.global_step == 4 and torch.isfinite(trainer.callback_metrics["train/loss"])
    after = module.learner.state_dict()
    assert all(v.dtype == torch.float32 for v in after.values() if v.is_floating_point())
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_a_true_half_precision_test_scores_the_untrained_baseline_in_that_precision(tmp_path):
    """Under ``precision: bf16-true`` Lightning converts the module's weights to bf16, but the untrained copy that
    the baselines score is kept outside the module's submodules: its float32 convolution met bf16 inputs, and
    every test with baselines (the default) stopped at its first step."""
    from imaging_meta.learners.metric.protonet import PrototypicalNetwork

    seed_everything(0)
    module = EpisodicModule(PrototypicalNetwork(backbone_kwargs={"width": 4}), baselines=True)
    trainer = Trainer(accelerator="cpu", devices=1, precision="bf16-true", logger=False, enable_progress_bar=False,
                      enable_model_summary=False, enable_checkpointing=False, default_root_dir=str(tmp_path))
    trainer.test(module, dataloaders=torch.utils.data.DataLoader(Episodes(), batch_size=None))
    assert 0.0 <= float(trainer.callback_metrics["test/acc"]) <= 1.0
    assert module._untrained[0].parameters().__next__().dtype == torch.bfloat16


def _trainer(tmp_path, **kwargs) -> Trainer:
    return Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
                   enable_checkpointing=False, default_root_dir=str(tmp_path), inference_mode=False, **kwargs)


def test_16_true_is_refused_with_what_to_use(tmp_path):
    """Float16 weights turned NaN after one Adam step, reported as a diverged loss (a review)."""
    from imaging_meta.learners.metric.protonet import PrototypicalNetwork

    module = EpisodicModule(PrototypicalNetwork(backbone_kwargs={"width": 4}), baselines=False)
    with pytest.raises(ValueError, match="precision 16-true trains float16 weights.*use bf16-mixed"):
        _trainer(tmp_path, precision="16-true", max_steps=1).fit(
            module, train_dataloaders=torch.utils.data.DataLoader(Episodes(), batch_size=None))


def test_a_loss_that_grows_a_thousandfold_is_warned_about_and_nan_predictions_are_refused(tmp_path):
    """A learning rate of 100 took a loss to 1e27 while it stayed finite (exit 0, a best.ckpt predicting one class);
    NaN predictions were scored as class 0 (chance accuracy) and could be chosen as the best checkpoint."""
    from imaging_meta.learners.metric.protonet import PrototypicalNetwork

    module = EpisodicModule(PrototypicalNetwork(backbone_kwargs={"width": 4}), baselines=False)
    with pytest.warns(UserWarning, match=r"training loss 5e\+03 at step 0 is 5e\+03 times its first steps' \(1\)") as seen:
        for value in (1.0, 1.0, 1.0, 1.0, 1.0, 50.0, 5000.0, 9000.0):  # 50 is below the floor of 100: quiet
            module._diverging(value)
    assert sum("diverging" in str(w.message) for w in seen) == 1  # once
    nan = torch.full((2, 4, 3), float("nan"))
    with pytest.raises(FloatingPointError, match=r"trained: non-finite predictions in validation batch 3 .* diverged"):
        module._finite("validation", "trained", nan, 3)
    assert module._finite("test", "trained", torch.zeros(2, 4, 3), 0).shape == (2, 4, 3)


def test_non_finite_predictions_under_16_true_name_the_precision_not_the_training(tmp_path):
    """A review (2026-12-07): a sound checkpoint tested at --trainer.precision 16-true overflowed, and the error said
    the model had diverged and should be trained again; and the test report did not say its precision."""
    from imaging_meta.learners.metric.protonet import PrototypicalNetwork

    module = EpisodicModule(PrototypicalNetwork(backbone_kwargs={"width": 4}), baselines=False)
    module.trainer = _trainer(tmp_path, precision="16-true")
    nan = torch.full((2, 4, 3), float("nan"))
    with pytest.raises(FloatingPointError, match=r"16-true\) overflow in this learner; run it at 32-true, bf16-true or 16-mixed"):
        module._finite("test", "trained", nan, 0)
    module.trainer = _trainer(tmp_path, precision="32-true")
    with pytest.raises(FloatingPointError, match=r"diverged") as refused:
        module._finite("test", "trained", nan, 0)
    assert "16-true" not in str(refused.value)
