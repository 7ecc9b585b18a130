"""Under SLURM, the shipped ``configs/trainer/slurm.yaml`` gives Lightning's SLURM environment with the job's rank,
world size and node, and the auto-requeue handler on the signal that docs/distributed.md's sbatch example asks
SLURM to send (issue 18).

The job is simulated with the variables ``srun`` sets (2 nodes x 1 task, this process rank 1 on node 1); the
Trainer is built the way users build it, through LightningCLI without running, on CPU (no GPU here). No process
group is initialised and no signal is sent: the requeue handler is registered, inspected, and the previous
handlers are restored.
"""

from __future__ import annotations

import re
import signal
import sys
from pathlib import Path

import pytest
import yaml
from lightning.fabric.plugins.environments import SLURMEnvironment

from imaging_meta.commands.cli import lightning_cli, main
from tests.helpers import CONFIGS

DOCS = Path(__file__).resolve().parents[2] / "docs" / "distributed.md"
NODES, TASKS_PER_NODE, RANK = 2, 1, 1


@pytest.fixture
def slurm_job(monkeypatch):
    """The environment of rank 1 of a 2-node x 1-task ``srun`` job."""
    job = {
        "SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "imaging-meta", "SLURM_NTASKS": str(NODES * TASKS_PER_NODE),
        "SLURM_NTASKS_PER_NODE": str(TASKS_PER_NODE), "SLURM_NNODES": str(NODES), "SLURM_PROCID": str(RANK),
        "SLURM_LOCALID": "0", "SLURM_NODEID": "1", "SLURM_NODELIST": "gpu[07-08]",
    }
    for name in ("SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "LOCAL_RANK", "RANK", "WORLD_SIZE", "GROUP_RANK",
                 "TORCHELASTIC_RUN_ID", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE"):  # no other cluster environment
        monkeypatch.delenv(name, raising=False)
    for name in ("MASTER_ADDR", "MASTER_PORT"):  # SLURMEnvironment sets them: restored after the test
        monkeypatch.setenv(name, "unset")
        monkeypatch.delenv(name)
    monkeypatch.setattr(sys, "argv", ["imaging-meta"])  # LightningCLI warns about pytest's own arguments
    monkeypatch.setenv("PATH", "/nonexistent")  # no `srun` on PATH (Lightning warns when srun exists but is unused)
    for name, value in job.items():
        monkeypatch.setenv(name, value)
    # building a Trainer as rank 1 sets Lightning's process-wide rank: restored after the test, or every later
    # test in this process would run as rank 1 and log nothing (rank_zero_only skips the loggers)
    import lightning.fabric.utilities.rank_zero as fabric_rank_zero
    import lightning.pytorch.utilities.rank_zero as pytorch_rank_zero
    import lightning_utilities.core.rank_zero as utilities_rank_zero

    for module in (fabric_rank_zero, pytorch_rank_zero, utilities_rank_zero):
        monkeypatch.setattr(module.rank_zero_only, "rank", getattr(module.rank_zero_only, "rank", 0))
    return job


def slurm_trainer(tmp_path: Path, *extra: str):
    """The Trainer of ``configs/trainer/slurm.yaml`` (with the demo data and a model), built by LightningCLI."""
    cli = lightning_cli([
        "--config", str(CONFIGS / "trainer/slurm.yaml"), "--config", str(CONFIGS / "data/demo_segmentation.yaml"),
        "--config", str(CONFIGS / "model/protonet_seg.yaml"), "--trainer.accelerator", "cpu",
        "--trainer.logger.init_args.save_dir", str(tmp_path), "--trainer.default_root_dir", str(tmp_path), *extra,
    ], run=False)
    return cli.trainer


def sbatch_example() -> str:
    text = DOCS.read_text()
    block = next(b for b in re.findall(r"```bash\n(.*?)```", text, re.S) if "#SBATCH" in b)
    return block


def test_slurm_environment_has_the_jobs_rank_world_size_and_node(slurm_job, tmp_path):
    trainer = slurm_trainer(tmp_path, "--trainer.devices", str(TASKS_PER_NODE))
    env = trainer.strategy.cluster_environment
    assert isinstance(env, SLURMEnvironment)
    assert (env.world_size(), env.global_rank(), env.local_rank(), env.node_rank()) == (2, RANK, 0, 1)
    assert (trainer.world_size, trainer.global_rank, trainer.local_rank, trainer.node_rank) == (2, RANK, 0, 1)
    assert trainer.num_nodes == NODES and not trainer.is_global_zero
    assert env.main_address == "gpu07" and env.main_port == 15000 + 4242  # the first node; a port from the job id
    assert env.auto_requeue and env.requeue_signal == signal.SIGUSR1


def test_auto_requeue_handler_is_registered_on_the_documented_signal(slurm_job, tmp_path):
    trainer = slurm_trainer(tmp_path, "--trainer.devices", str(TASKS_PER_NODE))
    requeue_signal = trainer.strategy.cluster_environment.requeue_signal
    # the sbatch example asks SLURM for this signal, with --requeue
    example = sbatch_example()
    asked = re.search(r"--signal=(?:B:)?(SIG\w+)@(\d+)", example)
    assert asked and signal.Signals[asked.group(1)] == requeue_signal, example
    assert "--requeue" in example
    before = {s: signal.getsignal(s) for s in (requeue_signal, signal.SIGTERM)}
    signal.signal(requeue_signal, signal.SIG_DFL)  # Lightning keeps a handler that is already there
    connector = trainer._signal_connector
    try:
        connector.register_signal_handlers()  # what Trainer.fit does first
        handler = signal.getsignal(requeue_signal)
        handlers = getattr(handler, "signal_handlers", [])
        assert [h.__func__ for h in handlers] == [type(connector)._slurm_sigusr_handler_fn], handler
        assert getattr(signal.getsignal(signal.SIGTERM), "signal_handlers", None)  # SIGTERM is bypassed for requeue
    finally:
        connector.teardown()
        for s, h in before.items():
            signal.signal(s, h)
    assert signal.getsignal(requeue_signal) == before[requeue_signal]


def test_the_sbatch_example_matches_the_config(slurm_job):
    """Nodes and tasks per node in the sbatch lines, the srun overrides and the config's defaults agree, and the
    config leaves the requeue signal to Lightning's SLURM default (or sets the one sbatch sends)."""
    example = sbatch_example()
    config = yaml.safe_load((CONFIGS / "trainer/slurm.yaml").read_text())["trainer"]
    nodes = int(re.search(r"#SBATCH --nodes=(\d+)", example).group(1))
    tasks = int(re.search(r"#SBATCH --ntasks-per-node=(\d+)", example).group(1))
    gpus = int(re.search(r"#SBATCH --gpus-per-node=(\d+)", example).group(1))
    assert (config["num_nodes"], config["devices"]) == (nodes, tasks) and gpus == tasks
    assert f"--trainer.num_nodes {nodes}" in example and f"--trainer.devices {tasks}" in example
    assert "srun " in example and "configs/trainer/slurm.yaml" in example
    assert config["use_distributed_sampler"] is False  # the episode samplers shard by rank themselves
    asked = re.search(r"--signal=(?:B:)?(SIG\w+)@", example).group(1)
    environments = [p for p in config.get("plugins") or [] if "SLURMEnvironment" in str(p.get("class_path", ""))]
    for plugin in environments:
        assert plugin.get("init_args", {}).get("requeue_signal", asked) == asked
    assert SLURMEnvironment(auto_requeue=True).requeue_signal == signal.Signals[asked]  # Lightning's default


def test_a_config_that_disagrees_with_the_job_is_one_line_with_the_fix(slurm_job, tmp_path, capsys):
    """slurm.yaml says 4 devices per node; a job with 1 task per node stops before any process group, with
    Lightning's hint, as one line."""
    args = ["fit", "--config", str(CONFIGS / "trainer/slurm.yaml"), "--config", str(CONFIGS / "data/demo_segmentation.yaml"),
            "--config", str(CONFIGS / "model/protonet_seg.yaml"), "--trainer.accelerator", "cpu",
            "--trainer.logger.init_args.save_dir", str(tmp_path), "--trainer.default_root_dir", str(tmp_path)]
    with pytest.raises(SystemExit) as e:
        main(args)
    err = capsys.readouterr().err
    assert e.value.code == 1 and "Traceback" not in err and len(err.splitlines()) == 1, err
    assert err.startswith("imaging-meta fit: error: You set `devices=4`") and "HINT: Set `devices=1`" in err


def test_a_new_job_does_not_resume_an_earlier_jobs_requeue_checkpoint(slurm_job, tmp_path, monkeypatch, capsys):
    """A review: Lightning resumes any fit under SLURM from the hpc_ckpt_<n>.ckpt its auto-requeue left in
    default_root_dir, so a later job in the same folder trained on from the old run, and tested and reported it
    under its own settings. Only a requeued job (SLURM_RESTART_COUNT > 0) may; any other is refused, naming the
    file and the ways out, before anything is built."""
    for n in (1, 2, 10):
        (tmp_path / f"hpc_ckpt_{n}.ckpt").write_bytes(b"an earlier job's")
    from imaging_meta.commands.cli import hpc_checkpoints

    (tmp_path / "hpc_ckpt_0_copy3.txt").write_text("x")  # numbered as Lightning numbers it: 03 (the first number: 0)
    assert [p.name for p in hpc_checkpoints(str(tmp_path))] == [f"hpc_ckpt_{n}.ckpt" for n in (1, 2, 3, 10)]
    (tmp_path / "hpc_ckpt_0_copy3.txt").unlink()
    args = ["fit", "--config", str(CONFIGS / "trainer/slurm.yaml"), "--config", str(CONFIGS / "data/demo_segmentation.yaml"),
            "--config", str(CONFIGS / "model/protonet_seg.yaml"), "--trainer.accelerator", "cpu",
            "--trainer.logger.init_args.save_dir", str(tmp_path), "--trainer.default_root_dir", str(tmp_path)]
    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    with pytest.raises(SystemExit) as e:
        main(args)
    err = capsys.readouterr().err
    assert e.value.code == 1 and "Traceback" not in err, err
    assert f"{tmp_path / 'hpc_ckpt_10.ckpt'}: an auto-requeue checkpoint of an earlier SLURM job" in err
    assert "SLURM_RESTART_COUNT unset" in err and "--trainer.default_root_dir" in err
    assert "--ckpt_path hpc (the newest of them, now and at every later requeue" in err
    # the root as Lightning reads it: '~' (a YAML value no shell expands) and file:// (a review)
    monkeypatch.setenv("HOME", str(tmp_path.parent))
    for root in (f"~/{tmp_path.name}", f"file://{tmp_path}"):
        with pytest.raises(SystemExit):
            main([*args, "--trainer.default_root_dir", root])
        assert f"{tmp_path / 'hpc_ckpt_10.ckpt'}: an auto-requeue checkpoint" in capsys.readouterr().err, root
    # --ckpt_path hpc names the newest, as Lightning resolves it; its content is checked like any file's
    with pytest.raises(SystemExit):
        main([*args, "--ckpt_path", "hpc"])
    assert f"{tmp_path / 'hpc_ckpt_10.ckpt'}: not a PyTorch checkpoint" in capsys.readouterr().err
    # the requeued job itself goes on to Lightning (which then meets the config's 4 devices against 1 task)
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    with pytest.raises(SystemExit):
        main(args)
    assert "an auto-requeue checkpoint" not in capsys.readouterr().err


def test_a_requeued_job_goes_on_in_its_own_fixed_version_folder(slurm_job, tmp_path, monkeypatch):
    """A review: with a fixed logger version (e.g. $SLURM_JOB_ID, the same after a requeue) the requeued job found
    its own config.yaml from before the requeue and was refused as another run; it now goes on there. A job that is
    not a requeue is still refused, and so is a requeue without an hpc checkpoint to resume."""
    from types import SimpleNamespace

    from lightning.pytorch.cli import SaveConfigCallback

    trainer = slurm_trainer(tmp_path, "--trainer.devices", str(TASKS_PER_NODE), "--trainer.logger.init_args.version",
                            "4242")
    (callback,) = [c for c in trainer.callbacks if isinstance(c, SaveConfigCallback)]
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "config.yaml").write_text("the job's own, saved before SLURM requeued it\n")
    stand_in = SimpleNamespace(log_dir=str(folder), is_global_zero=True, logger=object(), fast_dev_run=False,
                               default_root_dir=str(tmp_path), strategy=SimpleNamespace(broadcast=lambda x: x))
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    with pytest.raises(FileExistsError, match="already holds config.yaml"):  # nothing to resume from
        callback.setup(stand_in, None, "fit")
    (tmp_path / "hpc_ckpt_1.ckpt").write_bytes(b"saved at the requeue signal")
    callback.setup(stand_in, None, "fit")  # goes on
    assert (folder / "config.yaml").read_text().startswith("the job's own")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "0")
    with pytest.raises(FileExistsError, match="already holds config.yaml"):
        callback.setup(stand_in, None, "fit")


class _Tiny:
    """A one-layer LightningModule over 8 random pairs in batches of 2 (built lazily: Lightning is imported late)."""

    @staticmethod
    def make(fail_at: int | None = None):
        import torch
        from lightning.pytorch import LightningModule

        class Tiny(LightningModule):
            def __init__(self):
                super().__init__()
                self.w = torch.nn.Linear(2, 1)

            def training_step(self, batch, batch_idx):
                if batch_idx == fail_at:
                    raise RuntimeError("a failing step")
                return self.w(batch).pow(2).mean()

            def validation_step(self, batch, batch_idx):
                return None

            def train_dataloader(self):
                return torch.utils.data.DataLoader(torch.randn(8, 2), batch_size=2)

            def val_dataloader(self):
                return torch.utils.data.DataLoader(torch.randn(4, 2), batch_size=2)

            def configure_optimizers(self):
                return torch.optim.SGD(self.parameters(), lr=0.1)

        return Tiny()


def _signalled_fit(tmp_path, monkeypatch, at: str, batch: int = 0, fail_at: int | None = None, **trainer_kw):
    """Fit `_Tiny` under a 1-task SLURM job, sending the requeue signal at ``at`` ("train" batch ``batch``'s start,
    or "val": the last validation); returns what was seen right after the signal, the requeue calls, the
    checkpoints' global steps, and the handler left after the fit."""
    import os

    import torch
    from lightning.pytorch import Callback, Trainer
    from lightning.pytorch.trainer.connectors import signal_connector

    from imaging_meta.requeue import SlurmRequeue

    for name, value in {"SLURM_NTASKS": "1", "SLURM_NTASKS_PER_NODE": "1", "SLURM_NNODES": "1", "SLURM_PROCID": "0",
                        "SLURM_NODEID": "0", "SLURM_NODELIST": "node1"}.items():
        monkeypatch.setenv(name, value)
    calls, seen = [], {}
    monkeypatch.setattr(signal_connector, "call", lambda cmd, **kw: calls.append(cmd) or 0)

    class Signal(Callback):
        def on_train_batch_start(self, trainer, pl_module, b, batch_idx):
            if at == "train" and batch_idx == batch and "sent" not in seen:
                os.kill(os.getpid(), signal.SIGUSR1)
                seen["sent"] = sorted(p.name for p in tmp_path.glob("hpc_ckpt_*"))

        def on_validation_batch_start(self, trainer, pl_module, b, batch_idx, dataloader_idx=0):
            if at == "val" and trainer.current_epoch == trainer.max_epochs - 1 and "sent" not in seen:
                os.kill(os.getpid(), signal.SIGUSR1)
                seen["sent"] = sorted(p.name for p in tmp_path.glob("hpc_ckpt_*"))

    trainer = Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=str(tmp_path),
                      callbacks=[SlurmRequeue(), Signal()], **{"max_epochs": 1, **trainer_kw})
    model = _Tiny.make(fail_at)
    if fail_at is None:
        trainer.fit(model)
    else:
        with pytest.raises(RuntimeError, match="a failing step"):
            trainer.fit(model)
    steps = [torch.load(p, map_location="cpu", weights_only=False)["global_step"]
             for p in sorted(tmp_path.glob("hpc_ckpt_*.ckpt"))]
    return seen, calls, steps, signal.getsignal(signal.SIGUSR1)


def test_the_requeue_signal_is_saved_and_requeued_between_training_batches(slurm_job, monkeypatch, tmp_path):
    """A review: Lightning saved and requeued from inside the signal handler, wherever each rank was, and ranks
    signalled 0.35 s apart hung in two different collectives, with no checkpoint and no requeue. `SlurmRequeue`
    (which `imaging-meta fit` adds) only notes the signal; the ranks agree at the next batch's start, then save and
    requeue together, with Lightning's own procedure."""
    before = signal.getsignal(signal.SIGUSR1)
    seen, calls, steps, after = _signalled_fit(tmp_path, monkeypatch, "train", batch=1)
    assert seen["sent"] == [] and steps == [2]  # not inside the handler: at batch 2's start, after 2 steps
    assert calls == [["scontrol", "requeue", "4242"]] and after == before  # the previous handler is back


@pytest.mark.parametrize("case", ["accumulating", "last_validation", "failed_fit"])
def test_the_deferred_requeue_waits_for_a_whole_step_keeps_the_last_signal_and_restores_on_failure(
        case, slurm_job, monkeypatch, tmp_path):
    """A review: mid-accumulation the save dropped the gradients accumulated so far (now: where a window closes);
    a signal during the last validation was lost (now: acted on at the end of training); and a fit that failed left
    the signal swallowed for the rest of the process."""
    before = signal.getsignal(signal.SIGUSR1)
    if case == "accumulating":
        seen, calls, steps, after = _signalled_fit(tmp_path, monkeypatch, "train", batch=0, accumulate_grad_batches=2)
        assert steps == [1] and len(calls) == 1  # at batch 2's start, after the first whole step
    elif case == "last_validation":
        seen, calls, steps, after = _signalled_fit(tmp_path, monkeypatch, "val", max_epochs=2)
        assert steps == [8] and len(calls) == 1
    else:
        seen, calls, steps, after = _signalled_fit(tmp_path, monkeypatch, "none", fail_at=1)
    assert after == before


def test_fit_adds_the_deferred_requeue_to_every_trainer(slurm_job, tmp_path):
    from imaging_meta.requeue import SlurmRequeue

    trainer = slurm_trainer(tmp_path, "--trainer.devices", str(TASKS_PER_NODE))
    assert sum(isinstance(c, SlurmRequeue) for c in trainer.callbacks) == 1


def test_two_ranks_signalled_at_different_batches_both_save_instead_of_hanging(tmp_path):
    """The review's case on 2 CPU ranks (gloo): rank 0 is signalled at batch 1, rank 1 at batch 2. Lightning's
    handler hung there (`requeue_check --lightning-handler`); with `SlurmRequeue` both ranks save after batch 1 and
    after batch 2, and the run ends."""
    import os
    import socket
    import subprocess

    import torch

    root = Path(__file__).resolve().parents[2]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "LOCAL_RANK", "RANK", "WORLD_SIZE"))}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(root))
    procs = [subprocess.Popen([sys.executable, "-m", "tests.imaging_meta.requeue_check", "--rank", str(r), "--port",
                               str(port), "--out", str(tmp_path)], cwd=root, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    try:
        outs = [p.communicate(timeout=240) for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [0, 0], outs[0][1][-3000:] + outs[1][1][-3000:]
    steps = [torch.load(tmp_path / f"hpc_ckpt_{n}.ckpt", map_location="cpu", weights_only=False)["global_step"]
             for n in (1, 2)]
    assert steps == [2, 3]
