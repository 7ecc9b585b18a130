"""DDP on 2 CPU processes (gloo): after a few meta-training steps every rank holds the same weights, and they
equal a single-process run over the same episodes; a meta-loss computed outside DDP's forward is caught."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import write_medmnist

ROOT = Path(__file__).resolve().parents[2]


def _run(mode: str, learner: str, data: Path, out: Path, *extra: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "tests.imaging_meta.ddp_check", "--mode", mode, "--learner", learner, "--data", str(data),
           "--out", str(out), *extra]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("ddp_data")
    write_medmnist(folder, n_files=1, classes_per_file=12, per_class=6)
    return folder


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


@pytest.mark.parametrize("learner", ["maml", "maml_once", "reptile", pytest.param("protonet", marks=pytest.mark.slow)])
def test_ddp_ranks_agree_and_match_one_process_over_the_same_episodes(learner, data, tmp_path):
    """``maml`` takes a backward per task inside its loss (each task's graph freed before the next), ``maml_once``
    one backward over the meta-batch: both synchronise the gradients once per step."""
    from tests.imaging_meta.ddp_check import STEPS

    _run("ddp", learner, data, tmp_path)
    _run("single", learner, data, tmp_path)
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    single = torch.load(tmp_path / "single.pt", weights_only=True)
    assert _max_diff(rank0, rank1) == 0.0, "the ranks hold different weights: gradients were not synchronised"
    assert _max_diff(rank0, single) < 1e-5, f"DDP differs from one process over the same episodes by {_max_diff(rank0, single):.3g}"
    # the tiny networks fit in one gradient bucket: one all-reduce per meta-batch, not one per task
    assert [int((tmp_path / f"allreduces{r}.txt").read_text()) for r in (0, 1)] == [STEPS, STEPS]


def test_weight_averaging_under_ddp_keeps_the_ranks_equal_and_averages_the_late_steps(data, tmp_path):
    """`EpisodicModule(weight_averaging=0.5)` on 2 ranks: the weights written at the end (the average of the
    weights after steps 2 and 3 of 3) agree across ranks and with the same average taken by hand in one process."""
    _run("ddp", "maml", data, tmp_path, "--average", "0.5")
    _run("single", "maml", data, tmp_path, "--average", "0.5")
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    single = torch.load(tmp_path / "single.pt", weights_only=True)
    assert _max_diff(rank0, rank1) == 0.0
    assert _max_diff(rank0, single) < 1e-5, f"DDP's average differs from one process's by {_max_diff(rank0, single):.3g}"
    (tmp_path / "plain").mkdir()
    _run("single", "maml", data, tmp_path / "plain")  # the check has teeth: the last step's weights are others
    assert _max_diff(rank0, torch.load(tmp_path / "plain" / "single.pt", weights_only=True)) > 1e-4


@pytest.mark.slow
def test_the_cli_fits_the_default_segmentation_model_on_two_processes(demo_root, demo_index, tmp_path):
    """``make train TRAINER=ddp_cpu``: the shipped ddp_cpu.yaml with protonet_seg.yaml, whose weight averaging
    copies the module, factories from LightningCLI included (it failed with ``cannot pickle '_thread.lock'``)."""
    from tests.helpers import CONFIGS, SMALL_MODEL, data_args

    args = ["fit", "--config", str(CONFIGS / "trainer/ddp_cpu.yaml"), "--config", str(CONFIGS / "data/demo_segmentation.yaml"),
            "--config", str(CONFIGS / "model/protonet_seg.yaml"), *SMALL_MODEL,
            *data_args(demo_root, demo_index[1], tmp_path / "cache"), "--trainer.logger.init_args.save_dir",
            str(tmp_path / "runs"), "--trainer.max_epochs", "2", "--trainer.limit_train_batches", "2",
            "--trainer.limit_val_batches", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    tool = Path(sys.executable).with_name("imaging-meta")  # the installed command: DDP relaunches it per rank
    proc = subprocess.run([str(tool), *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    (last,) = (tmp_path / "runs").glob("*/version_*/checkpoints/last.ckpt")
    assert "averaging_state" in torch.load(last, weights_only=False, map_location="cpu")


def test_meta_loss_outside_the_ddp_forward_is_caught(data, tmp_path):
    """The negative control: the same check fails when each rank steps on its own, unsynchronised gradients."""
    _run("outside", "maml", data, tmp_path)
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert _max_diff(rank0, rank1) > 1e-4


def test_finish_distributed_destroys_the_process_group_and_is_a_no_op_without_one(tmp_path):
    import torch.distributed as dist

    from imaging_meta.commands.cli import finish_distributed

    finish_distributed()  # nothing to destroy
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        assert dist.is_initialized()
        finish_distributed()
        assert not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
