"""The ``imaging-meta`` command.

* ``fit | validate | test``: LightningCLI over `EpisodicModule` and any LightningDataModule
  (``--config`` YAML files from ``configs/``, combined by repeating ``--config``).
* ``demo``: write the synthetic multi-site demo cohort.
* ``scan``: index a folder of DICOM series / NIfTI volumes (report of rejected inputs included).
* ``segment``: few-shot segmentation of a new structure from a checkpoint and a few labelled scans.
* ``classify``: few-shot classification of images against a support folder (one subfolder per class).
* ``results``: train and test every learner on the same fixed test episodes; one table.
* ``evaluate``: a checkpoint on fixed, seeded test episodes per number of shots: metrics with 95% CIs per
  organ/class, site and shot, plots, and the provenance to reproduce them (``results.json``, ``results.md``).
* ``compare``: several ``evaluate`` run folders in one table.

Global options, before or after the command: ``--debug`` (the traceback of an error; also
``IMAGING_META_TRACEBACK=1``) and ``--quiet`` (no progress bars, warnings and errors only). Without ``--debug``
an error is one line on stderr (`imaging_meta.commands.console`): bad input names the file, what is wrong and
the fix (exit status 1); anything else says it is a bug and to rerun with ``--debug`` (exit status 70).
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import logging
import os
import platform
import re
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from imaging_meta.commands.console import (
    EXIT_BUG,
    EXIT_INTERRUPTED,
    EXIT_TERMINATED,
    EXIT_USER_ERROR,
    GLOBAL_OPTIONS,
    USER_ERRORS,
    GlobalOptions,
    console,
    debug_requested,
    error_line,
    non_negative_int,
    parser_error_line,
    peer_stopped,
    positive_int,
    quiet_lightning,
    quiet_output,
    seed_int,
    split_global_options,
    user_error,
)

logger = logging.getLogger(__name__)

LIGHTNING_SUBCOMMANDS = ("fit", "validate", "test")
TOOL_SUBCOMMANDS = ("demo", "scan", "segment", "classify", "results", "evaluate", "compare", "prepare", "configs")
def _init_default(class_path: str, name: str):
    """The default of ``__init__`` argument ``name`` of the class at ``class_path`` (first class in its MRO
    that names it); None when no class does or the class cannot be imported."""
    import importlib
    import inspect

    module, _, attr = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError, ValueError):
        return None
    for klass in getattr(cls, "__mro__", ()):
        if "__init__" in vars(klass):
            param = inspect.signature(klass.__init__).parameters.get(name)
            if param is not None:
                return None if param.default is inspect.Parameter.empty else param.default
    return None


def _new_run_folder(trainer) -> Path | None:
    """The TensorBoard run folder (``version_N``) this run will make, or None: another logger, or one that exists."""
    from lightning.pytorch.loggers import TensorBoardLogger

    logger_ = trainer.logger
    if not isinstance(logger_, TensorBoardLogger):
        return None
    folder = Path(logger_.log_dir)
    return None if folder.exists() else folder


def _remove_own_events(folder: Path) -> None:
    """This process's TensorBoard events files in ``folder`` (``events.out.tfevents.<time>.<host>.<pid>.<n>``), and
    the folder when nothing else is left: another run that chose the same version_N at the same moment keeps its
    own events (a review)."""
    own = f".{platform.node()}.{os.getpid()}."  # the host name TensorBoard writes (socket's; no network module here)
    for f in folder.glob("events.out.tfevents.*"):
        if own in f.name:
            f.unlink(missing_ok=True)
    with contextlib.suppress(OSError):  # not empty, or already gone
        folder.rmdir()


def _checkpoint_place(path: str) -> str:
    """`` (epoch E, step S)`` of a checkpoint file, and its monitored score when it has one: which model the test
    report is about (TensorBoard logs its test scalars at the fit's last step, whichever checkpoint was tested)."""
    from imaging_meta.checkpoint_io import read_checkpoint

    try:
        ckpt = read_checkpoint(path)
    except (OSError, ValueError):
        return ""
    # the monitored score only of the file that callback chose (its best_model_path, or a copy of it under the
    # same name): a last.ckpt carries best.ckpt's score in the same callback state, which is another model's
    scores = [float(v["best_model_score"]) for k, v in (ckpt.get("callbacks") or {}).items()
              if "ModelCheckpoint" in str(k) and isinstance(v, dict) and v.get("best_model_score") is not None
              and Path(str(v.get("best_model_path") or "")).name == Path(path).name]
    score = f", best validation score {scores[0]:.4f}" if scores else ""
    return f" (epoch {ckpt.get('epoch')}, step {ckpt.get('global_step')}{score})"


def learner_n_way(data_n_way: int, learner: dict | None) -> int:
    """The ``data.init_args.n_way -> model.learner.init_args.n_way`` link: a learner gets its ways from the data.

    ``n_way`` is set once, in the data config; learners without an ``n_way`` argument (and segmentation data,
    which has none) leave the link unused. A learner config that still sets ``n_way`` works when it agrees
    with the data (older configs set it in both files) and fails, naming the fix, when it sets another value.
    (A learner ``n_way`` equal to the learner's own default cannot be told from an unset one: the data wins.)

    Args:
        data_n_way: ``data.init_args.n_way``.
        learner: ``model.learner`` as parsed (``class_path``, ``init_args``), before the link sets ``n_way``.
    """
    if learner is None:
        raise ValueError("no learner: add a model config, e.g. --config configs/model/protonet_cls.yaml "
                         "(imaging-meta configs lists them)")
    given = (learner.get("init_args") or {}).get("n_way")
    if given is not None and given != data_n_way and given != _init_default(str(learner.get("class_path")), "n_way"):
        raise ValueError(
            f"model.learner.init_args.n_way={given} but data.init_args.n_way={data_n_way}: n_way is set once, in the "
            "data config, and the learner gets it from there; remove n_way from the model config (and from "
            "--model.learner.init_args), and set data.init_args.n_way (--data.init_args.n_way) instead"
        )
    return data_n_way


def checkpoint_to_test(callbacks: Sequence[Any]) -> str | None:
    """The checkpoint that ``--test_after_fit`` tests: the best by the first monitored `ModelCheckpoint` (the
    trainer configs' ``best.ckpt``); without one that saved anything, the latest state (``last.ckpt``)."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    ckpts = [c for c in callbacks if isinstance(c, ModelCheckpoint)]
    best = [c.best_model_path for c in ckpts if c.monitor is not None and c.best_model_path]
    saved = [c.last_model_path or c.best_model_path for c in ckpts if c.last_model_path or c.best_model_path]
    return next(iter(best or saved), None)


def _version_given(config) -> bool:
    """Whether a run's config fixes its logger's version (else Lightning picks the next ``version_N``)."""
    try:
        loggers = config["trainer"]["logger"]
    except (KeyError, TypeError, AttributeError):
        return False
    for logger_config in loggers if isinstance(loggers, (list, tuple)) else [loggers]:
        try:
            if logger_config["init_args"]["version"] is not None:
                return True
        except (KeyError, TypeError, AttributeError):
            continue
    return False


#: what a run writes in its folder that another run's must not write over: the resolved config, the test report
RUN_FILES = ("config.yaml", "results.md", "results.json")


def _assign(namespace: Any, values: dict) -> None:
    """``values`` into a jsonargparse Namespace in place, keeping a Namespace where it holds one (a learner's
    config) and plain values, dicts included, where it holds those (``backbone_kwargs`` is a dict)."""
    from jsonargparse import Namespace

    for k, v in values.items():
        if isinstance(namespace.get(k), Namespace) and isinstance(v, dict):
            _assign(namespace[k], v)
        else:
            namespace[k] = v


SPAWNED_STRATEGY = ("a strategy that spawns its processes (ddp_spawn, start_method spawn or forkserver) pickles the "
                    "command line's objects, which imaging-meta's CLI cannot: use strategy ddp (it starts one process "
                    "per device by itself: --trainer.strategy ddp --trainer.devices N), or srun/torchrun on a cluster")


FORKED_STRATEGY = ("a strategy that forks its processes (ddp_fork, ddp_notebook, start_method fork) fits in child "
                   "processes whose run folder, test and report the command never sees (the test after fit stopped, "
                   "test printed no report): use strategy ddp (it starts one process per device by itself: "
                   "--trainer.strategy ddp --trainer.devices N), or srun/torchrun on a cluster")


def _start_method(strategy: Any) -> str | None:
    """How a ``trainer.strategy`` value (a registered name, or ``class_path`` with ``init_args``) starts its
    processes apart from the command's own: "spawn" (``ddp_spawn``, start methods spawn and forkserver), "fork"
    (``ddp_fork``, ``ddp_notebook``, start method fork), or None (``ddp``: the command's process is rank 0).
    ``ddp_spawn`` stopped ``fit`` with "internal error ... Can't pickle local object" (a review)."""
    if isinstance(strategy, str):  # Lightning reads the name in any case
        name = strategy.lower()
        if "spawn" in name or "forkserver" in name:
            return "spawn"
        return "fork" if "fork" in name or "notebook" in name else None
    init_args: Any = strategy.get("init_args") if hasattr(strategy, "get") else None
    method = str(init_args.get("start_method") if hasattr(init_args, "get") else None).lower()
    return "spawn" if method in ("spawn", "forkserver") else "fork" if method == "fork" else None


def lightning_cli(args: Sequence[str] | None, run: bool = True):
    """The LightningCLI over `EpisodicModule`; ``run=False`` only parses and instantiates (tests use it)."""
    import torch
    from lightning.pytorch import LightningDataModule
    from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback

    from imaging_meta.checkpoint_io import (
        CheckpointError,
        offline_learner_config,
        plain_hyperparameters,
        read_checkpoint,
    )
    from imaging_meta.module import EpisodicModule

    class ImagingMetaCLI(LightningCLI):
        """LightningCLI with ``--test_after_fit`` (test the best checkpoint on the held-out episodes after fit)
        and one source for ``n_way``: the data config (`learner_n_way`)."""

        @staticmethod
        def subcommands() -> dict[str, set[str]]:
            """Lightning's, without ``predict``: the module has no predict step (`segment` and `classify`
            predict); a config that nests the run under ``predict:`` reached Lightning's own "requires forward"
            error, status 1 (a review)."""
            return {k: v for k, v in LightningCLI.subcommands().items() if k != "predict"}

        def add_arguments_to_parser(self, parser) -> None:
            parser.add_argument("--test_after_fit", type=bool, default=False, help="after fit, test the best checkpoint")
            parser.link_arguments(("data.init_args.n_way", "model.learner"), "model.learner.init_args.n_way",
                                  compute_fn=learner_n_way)

        def parse_arguments(self, parser, args) -> None:
            """As LightningCLI, keeping the model settings given as flags (``--model.KEY``) for `_check_checkpoint`."""
            raw = sys.argv[1:] if args is None else args
            self._model_flags = {a[len("--model."):].split("=", 1)[0].split(".", 1)[0]
                                 for a in (raw if isinstance(raw, (list, tuple)) else []) if isinstance(a, str)
                                 and a.startswith("--model.")}
            super().parse_arguments(parser, args)

        def _parse_ckpt_path(self) -> None:
            """``--ckpt_path``, checked before anything is built: ``test`` and ``validate`` need one (without it the
            initial weights would be scored as "trained"), Lightning's keywords are refused (``last`` without a
            fit in this process starts from scratch), and the file must be a readable checkpoint. The model
            settings come from the checkpoint, as in LightningCLI, except those given as a flag or, in a config,
            with another value than the default: a ``--model.threshold 0.9`` on ``test`` is the threshold tested,
            and so is ``--model.threshold 0.5``, the default (a review: a flag that gave the default, such as
            ``--model.weight_averaging null`` on a resume, was replaced by the checkpoint's value)."""
            sub = self.config.get("subcommand")
            if not sub:
                return
            path = self.config[sub].get("ckpt_path")
            if path is None:
                if sub in ("test", "validate"):
                    raise CheckpointError(f"imaging-meta {sub} needs --ckpt_path RUN/checkpoints/best.ckpt: without a "
                                          "checkpoint it would score the initial, untrained weights")
                if sub == "fit":
                    _refuse_another_jobs_hpc_checkpoint((self.config[sub].get("trainer") or {}).get("default_root_dir"))
                return
            if str(path) == "hpc" and not Path(path).is_file():  # the newest auto-requeue checkpoint, as Lightning
                # resolves it (and again at each later requeue); its content is checked below like any file's
                found = hpc_checkpoints((self.config[sub].get("trainer") or {}).get("default_root_dir"))
                if not found or not found[-1].is_file():
                    raise CheckpointError("--ckpt_path hpc: no hpc_ckpt_<n>.ckpt in the trainer's default_root_dir "
                                          "(the working directory unless set); give the checkpoint file")
                self._check_checkpoint(str(found[-1]), sub)
                return
            keyword = str(path) in ("last", "best", "registry") or str(path).startswith("registry:")
            if keyword and not Path(path).is_file():
                raise CheckpointError(f"--ckpt_path {path}: give the checkpoint file (RUN/checkpoints/last.ckpt to "
                                      f"resume, best.ckpt to test); Lightning's keyword finds none in a new run")
            self._check_checkpoint(path, sub)

        def _check_checkpoint(self, path: str, sub: str) -> None:
            """A missing or foreign file, named; only the settings EpisodicModule saves, each a plain value (a
            class_path, which LightningCLI's own merge would build and call, is refused), merged here from the
            very content checked (LightningCLI's _parse_ckpt_path reads the file again)."""
            content = read_checkpoint(path)
            if not isinstance(content, dict) or not {"state_dict", "pytorch-lightning_version"} <= set(content):
                # a plain state dict, or weights saved by hand: Lightning failed on it with a KeyError (a review)
                raise CheckpointError(f"{path}: not a checkpoint of imaging-meta fit (no Lightning training state); "
                                      "give RUN/checkpoints/last.ckpt to resume, best.ckpt to test, or load bare "
                                      "weights as a pretrained encoder (docs/learners.md)")
            hparams = plain_hyperparameters(content.get("hyper_parameters") or {}, path)
            model = self.config[sub].get("model")
            defaults = {k: p.default for k, p in inspect.signature(EpisodicModule.__init__).parameters.items()}
            flags: set[str] = getattr(self, "_model_flags", set())
            for k, v in hparams.items():  # the checkpoint's settings, except those given as flags or with other values
                if model is not None and k not in flags and (k not in model or model[k] == defaults.get(k)):
                    model[k] = v
            if sub != "fit" and model is not None and model.get("learner") is not None:
                # the checkpoint holds the weights: test and validate do not read the pretrained file (or URL) again,
                # as segment, classify and evaluate do not (a review, 2026-12-07: a moved file stopped `test`)
                from jsonargparse import Namespace, namespace_to_dict

                learner = model["learner"]
                if isinstance(learner, Namespace):
                    _assign(learner, offline_learner_config(namespace_to_dict(learner)))
                elif isinstance(learner, dict):
                    model["learner"] = offline_learner_config(learner)

        def instantiate_trainer(self, **kwargs: Any):
            """The trainer, without the shipped configs' ``LearningRateMonitor`` when ``--trainer.logger false``
            leaves nothing to log to (Lightning stops the run at its first step); a line says so. A trainer with
            ``use_distributed_sampler: true`` runs with it false, with a warning: the episode samplers shard by rank
            themselves, and Lightning would split each rank's share again (a 2-rank test scored half its episodes).
            (It was refused; but the run configs saved by versions before 2026-12-03 hold it, and the README's
            ``--config runs/<name>/version_N/config.yaml`` was then refused for a setting the user never made.)"""
            config = self.config.get(self.subcommand) if self.subcommand else self.config
            if self.subcommand == "fit" and str(config.get("trainer", {}).get("precision")) == "16-true":
                from imaging_meta.module import PRECISION_16_TRUE

                raise ValueError(PRECISION_16_TRUE)  # before the trainer and its run folder exist
            # the parent must be rank 0: what follows the run (the test after fit, the report) happens in it (a review:
            # ddp_fork's fit was taken for another run's by its own test; its test printed no report)
            method = _start_method(config.get("trainer", {}).get("strategy"))
            if method is not None:
                raise ValueError(SPAWNED_STRATEGY if method == "spawn" else FORKED_STRATEGY)
            if config.get("trainer", {}).get("use_distributed_sampler"):
                from lightning.pytorch.utilities import rank_zero_warn

                kwargs["use_distributed_sampler"] = False
                rank_zero_warn("trainer.use_distributed_sampler true (set by you, or by a run config saved by an older "
                               "imaging-meta) is run as false: the episode samplers give each DDP rank its own "
                               "episodes, and Lightning's sampler would split them again")
            if config.get("trainer", {}).get("enable_checkpointing") is False:
                self._drop_checkpoint_callbacks()
            trainer: Any = super().instantiate_trainer(**kwargs)  # `callbacks` is set by Lightning, not declared
            from imaging_meta.requeue import SlurmRequeue

            if not any(isinstance(c, SlurmRequeue) for c in trainer.callbacks):  # inert unless fitting under SLURM
                trainer.callbacks.append(SlurmRequeue())
            if trainer.logger is None:
                from lightning.pytorch.callbacks import LearningRateMonitor
                from lightning.pytorch.utilities import rank_zero_info

                monitors = [c for c in trainer.callbacks if isinstance(c, LearningRateMonitor)]
                if monitors:
                    trainer.callbacks = [c for c in trainer.callbacks if not isinstance(c, LearningRateMonitor)]
                    rank_zero_info("no logger (--trainer.logger false): the learning rate is not logged "
                                   "(LearningRateMonitor left out)")
            return trainer

        def _drop_checkpoint_callbacks(self) -> None:
            """``--trainer.enable_checkpointing false`` with the shipped trainer configs, which declare two
            ``ModelCheckpoint`` callbacks (Lightning refuses the combination): the callbacks are left out, and a
            line says so."""
            from lightning.pytorch.callbacks import ModelCheckpoint
            from lightning.pytorch.utilities import rank_zero_info

            init = self._get(self.config_init, "trainer", default={})
            given = init.get("callbacks") or []
            given = given if isinstance(given, list) else [given]
            kept = [c for c in given if not isinstance(c, ModelCheckpoint)]
            if len(kept) < len(given):
                init["callbacks"] = kept
                rank_zero_info("--trainer.enable_checkpointing false: the config's ModelCheckpoint callbacks are left "
                               "out (no best.ckpt or last.ckpt is written; --test_after_fit tests the last weights)")

        def _run_subcommand(self, subcommand: str) -> None:
            # Lightning creates the logger's version_N folder (its events file) before the data is set up: a run
            # refused at setup (a config mistake, too few patients) left an empty run folder, and the next run took
            # version_N+1 (a review). This process's events files go, and the folder it made with them when empty.
            made = _new_run_folder(self.trainer)
            try:
                super()._run_subcommand(subcommand)
            except BaseException:
                if made is not None:
                    _remove_own_events(made)
                raise

        def before_fit(self) -> None:
            from datamodules.base import EpisodicDataModule

            if self.config[self.subcommand].get("test_after_fit") and isinstance(self.datamodule, EpisodicDataModule):
                self.datamodule.test_after_fit = True  # too few test episodes for the processes: refused at setup

        def after_fit(self) -> None:
            if not self.config[self.subcommand].get("test_after_fit"):
                return
            path = checkpoint_to_test(self.trainer.checkpoint_callbacks)
            self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path=path or None)
            self._print_report(path or None)

        def after_test(self) -> None:
            # the checkpoint's epoch and step with the report: TensorBoard logs a test run at step 0 whichever
            # checkpoint it read (docs/tensorboard.md), so only this line says which model the figures are of
            self._print_report(self.config[self.subcommand].get("ckpt_path"))

        def after_validate(self) -> None:
            path = self.config[self.subcommand].get("ckpt_path")
            if path and self.trainer.is_global_zero:
                sys.stdout.write(f"checkpoint (validated): {path}{_checkpoint_place(str(path))}\n")

        def _print_report(self, checkpoint: str | None = None) -> None:
            paths = getattr(self.model, "report_paths", None)
            if paths and self.trainer.is_global_zero:
                tested = f"\ncheckpoint (tested): {checkpoint}{_checkpoint_place(checkpoint)}" if checkpoint else ""
                sys.stdout.write("\n" + Path(paths[1]).read_text() + f"\nwritten: {paths[0]}\n         {paths[1]}{tested}\n")

    class NewRunFolder(SaveConfigCallback):
        """Saves the resolved config in the run's folder, which must not hold another run's config or test report:
        a fixed logger version, or ``--trainer.logger false`` (the folder is then ``default_root_dir``, by default
        the working directory), would write over them. Nothing is saved under ``fast_dev_run``."""

        def setup(self, trainer, pl_module, stage: str) -> None:
            if self.already_saved or getattr(trainer, "fast_dev_run", False):
                return
            folder = trainer.log_dir  # a broadcast under DDP: every rank calls it
            taken = [n for n in RUN_FILES if (Path(folder) / n).is_file()] if trainer.is_global_zero else []
            taken = trainer.strategy.broadcast(taken)
            if taken and stage == "fit" and slurm_requeue() and hpc_checkpoints(trainer.default_root_dir):
                # a fixed version (e.g. $SLURM_JOB_ID) holds this job's own files from before SLURM requeued it, and
                # the fit goes on there from its hpc checkpoint; it was refused as another run's (a review). Its
                # config.yaml is the one saved then
                return
            if taken and trainer.logger is None:
                raise FileExistsError(
                    f"{folder} already holds {', '.join(taken)} of another run, which this one would write over: "
                    "with --trainer.logger false a run writes into --trainer.default_root_dir (by default the working "
                    "directory); give a new one, e.g. --trainer.default_root_dir runs/validate_2")
            if taken:
                # Lightning chose version_N by listing the folders: another run started at the same moment chose it
                # too, and wrote first (a review of concurrent runs)
                if trainer.logger is not None and not _version_given(self.config):
                    raise FileExistsError(
                        f"{folder} already holds {', '.join(taken)} of another run that started at the same moment and "
                        "took this version_N first; start this run again (it takes the next version_N), or give each "
                        "run its own --trainer.logger.init_args.name")
                raise FileExistsError(
                    f"{folder} already holds {', '.join(taken)} of another run, which this one would write over; run "
                    "into a new folder: leave --trainer.logger.init_args.version unset (each run gets its own "
                    "version_N), or give another --trainer.logger.init_args.save_dir")
            super().setup(trainer, pl_module, stage)
            from datamodules.indexing.pseudonyms import SHIPPED_SALTS, configured_salt

            if trainer.is_global_zero and configured_salt(self.config) not in (None, *SHIPPED_SALTS):
                # the config.yaml just saved holds the secret beside the checkpoints and TensorBoard files that a
                # group shares (a review); evaluate reads it from there when no other is given
                logger.warning("%s holds data.init_args.salt, the secret of this run's pseudonymous ids: keep the run "
                               "folder private, or leave salt out of the config and set IMAGING_META_SALT instead",
                               Path(folder) / "config.yaml")

    class OneLineErrorParser(LightningArgumentParser):
        """Lightning's parser whose errors are one line (`parser_error_line`: the keys and the innermost reason),
        status 2 as before; with ``--debug`` jsonargparse's usage and whole message."""

        def error(self, message: str, ex: Exception | None = None) -> NoReturn:
            if not self.exit_on_error or debug_requested(GlobalOptions()):
                super().error(message, ex)
            words = (getattr(ex, "subcommand_parser", None) or self).prog.replace(" [options]", "").split()
            name = "imaging-meta" + (f" {words[-1]}" if len(words) > 1 else "")  # the program, as run or not
            sys.stderr.write(parser_error_line(message, name))
            raise SystemExit(2)

    torch.set_float32_matmul_precision("high")
    cli = ImagingMetaCLI(
        EpisodicModule,
        LightningDataModule,
        subclass_mode_data=True,
        save_config_callback=NewRunFolder,
        save_config_kwargs={"overwrite": True},  # NewRunFolder has checked the folder
        args=None if args is None else list(args),
        parser_class=OneLineErrorParser,  # a parse error is one line (status 2), not the usage and a nested dump
        auto_configure_optimizers=False,
        # checkpoints are written to a temporary file and renamed: an interrupted save leaves none half-written
        trainer_defaults={"plugins": [{"class_path": "imaging_meta.checkpoint_io.AtomicCheckpointIO"}],
                          "use_distributed_sampler": False,  # the episode samplers shard by rank themselves
                          # gradient-based learners adapt on the support in validation and test: autograd must be on
                          # (Lightning's own default, True, stopped a MAML validate without a trainer config)
                          "inference_mode": False},
        run=run,
    )
    if run:  # the subcommand ended normally (after an error, destroying could wait on the other ranks)
        finish_distributed()
    return cli


def finish_distributed() -> None:
    """Destroy the default process group after a distributed (DDP) run that ended normally, on every rank.

    Lightning leaves it alive. Without this, gloo's worker threads can abort a process at interpreter exit
    ("terminate called without an active exception", exit status -6) after the run itself succeeded: seen in the
    2-rank test under load; pytorch/pytorch#190489 describes it. A no-op when no process group exists.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _tool_parser() -> argparse.ArgumentParser:
    from datamodules.indexing.pseudonyms import DEFAULT_SALT

    p = argparse.ArgumentParser(prog="imaging-meta", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="write the synthetic multi-site demo cohort")
    d.add_argument("--out", required=True, help="output folder")
    d.add_argument("--seed", type=seed_int, default=0, help="the cohort's seed (default 0: the cohort every doc measures)")
    d.add_argument("--patients-per-site", type=positive_int, default=12, help="patients at each of the 4 sites (default 12)")
    d.add_argument("--if-missing", action="store_true", help="do nothing when a complete cohort is already there")

    s = sub.add_parser("scan", help="index a folder of DICOM series and NIfTI volumes (a preview: fit makes its own "
                                    "index from the data config, under cache_dir)")
    s.add_argument("root", help="folder to scan")
    s.add_argument("--out", required=True, help="index JSON to write")
    s.add_argument("--label-names", nargs="+", default=None, metavar="VALUE=NAME",
                   help="structure names of label values, as the data config's label_names (e.g. 1=liver 2=spleen); "
                        "a Decathlon dataset.json names them too")
    s.add_argument("--site-fields", nargs="+", default=None, help="header fields that build the site key")
    s.add_argument("--patient-regex", default=None,
                   help="a NIfTI file's patient: the first group of this pattern in its path (default: a BIDS "
                        "'sub-<id>'; '^([^/]+)/' for one folder per patient; '' for every file its own), as the data "
                        "config's patient_regex")
    s.add_argument("--salt", default=None,
                   help=f"secret for pseudonymous ids (default: env IMAGING_META_SALT, else {DEFAULT_SALT!r}, as fit reads it)")

    _add_segment_parser(sub)

    c = sub.add_parser("classify", help="few-shot classification of images against a support folder")
    c.add_argument("--checkpoint", required=True, help="a classification checkpoint from `imaging-meta fit`")
    c.add_argument("--support", required=True, help="folder with one subfolder of images (PNG, JPEG, TIFF, BMP, DICOM) per class")
    c.add_argument("--query", action="append", required=True, help="image file or folder of images (repeat)")
    c.add_argument("--out", required=True, help="CSV to write (replaced if it exists): path, predicted_class, p_<class>...; --explain writes beside it into <CSV stem>_explain/, replacing an earlier run's explanations")
    c.add_argument("--device", default="auto", help="auto (default: a GPU when there is one), cpu, cuda or cuda:N")
    c.add_argument("--explain", action="store_true",
                   help="also write, per query, its nearest support images and an occlusion saliency map (PNG) "
                        "into <out stem>_explain/")
    c.add_argument("--space", choices=["auto", "learned"], default=None,
                   help="auto (default): per support set, weigh the checkpoint's embedding, raw pixels, intensity "
                        "histograms and two texture descriptors (gradient magnitude, HOG) by leave-one-out over the "
                        "support (equal weights with one image per class); "
                        "learned: the checkpoint's learner alone")
    c.add_argument("--finetune-steps", type=non_negative_int, default=0,
                   help="fit a new head on augmented support images for this many steps (0: off), on the "
                        "checkpoint's learner (a fine-tuning checkpoint keeps its own settings, these steps "
                        "replacing its own); instead of --space auto")

    _add_evaluate_parser(sub)

    m = sub.add_parser("compare", help="several `evaluate` run folders in one table")
    m.add_argument("runs", nargs="+", help="run folders written by `imaging-meta evaluate`")
    m.add_argument("--out", default=None, help="also write the table to this Markdown file")

    cf = sub.add_parser("configs", help="list the YAML configs that ship with the package, or copy them out (--copy DIR)")
    cf.add_argument("--copy", metavar="DIR", help="write every shipped config into DIR (e.g. ./configs)")
    cf.add_argument("--force", action="store_true", help="overwrite files in DIR that differ from the shipped ones")

    pr = sub.add_parser("prepare", help="convert a downloaded public benchmark (Synapse/BTCV, CHAOS MR, MedMNIST) into a folder to train on")
    from datamodules.recipes.prepare import add_arguments as add_prepare_arguments

    add_prepare_arguments(pr)

    r = sub.add_parser("results", help="train and test every learner on the same fixed test episodes; one table")
    from imaging_meta.commands.results import add_arguments

    add_arguments(r)
    for name, command in sub.choices.items():
        _add_global_options(command)
        command.epilog = "examples:\n" + "\n".join(f"  {line}" for line in EXAMPLES[name])
        command.formatter_class = argparse.RawDescriptionHelpFormatter
    return p


#: the examples at the end of each tool command's --help
EXAMPLES = {
    "demo": ["imaging-meta demo --out data/demo --if-missing"],
    "scan": ["imaging-meta scan /data/abdomen --out /data/abdomen/index.json",
             "imaging-meta scan /data/abdomen --out index.json --site-fields Manufacturer ManufacturerModelName"],
    "segment": ["imaging-meta segment --checkpoint runs/protonet_seg/version_0/checkpoints/best.ckpt \\",
                "    --support-image support.nii.gz --support-label support_seg.nii.gz --label-value 3 \\",
                "    --query new_scan.nii.gz --query /pacs/export/series_17 --out predictions/",
                "imaging-meta segment ... --adapt-steps 10 --explain       (adapt to these scans; probability maps too)",
                "imaging-meta segment ... --format dicom-seg                (single-frame DICOM series queries: a .seg.dcm per query)"],
    "classify": ["imaging-meta classify --checkpoint runs/protonet_cls/version_0/checkpoints/best.ckpt \\",
                 "    --support support/ --query new_images/ --out predictions.csv",
                 "imaging-meta classify ... --explain           (nearest support images and saliency maps)",
                 "imaging-meta classify ... --finetune-steps 50 (a new head fitted on the augmented support)"],
    "evaluate": ["imaging-meta evaluate --checkpoint runs/protonet_seg/version_0/checkpoints/best.ckpt \\",
                 "    --out evaluation/protonet_seg --shots 1 5 --episodes 200",
                 "imaging-meta evaluate ... --scan-protocols whole_scan oracle_extent   (3D Dice per query scan)",
                 "imaging-meta evaluate ... --log-dir runs/protonet_seg/version_0      (figures in TensorBoard)"],
    "compare": ["imaging-meta compare evaluation/*/ --out evaluation/comparison.md"],
    "configs": ["imaging-meta configs                  (list them)",
                "imaging-meta configs --copy ./configs (copy them out to edit)"],
    "prepare": ["imaging-meta prepare synapse ~/Downloads/RawData/Training --out data/synapse_prepared",
                "imaging-meta prepare chaos_mr ~/Downloads/CHAOS_Train_Sets/Train_Sets --out data/chaos_mr_prepared",
                "imaging-meta prepare medmnist ~/Downloads/medmnist --out data/medmnist --shots 1 5"],
    "results": ["imaging-meta results --out results",
                "imaging-meta results --out results --learners protonet_cls maml_cls --cls-epochs 3 --train-shots matched"],
}


def _add_global_options(parser: argparse.ArgumentParser) -> None:
    """``--debug`` and ``--quiet`` in a command's help (`cli_main` takes them out before any parser runs)."""
    group = parser.add_argument_group("global options (also before the command)")
    for flag, text in GLOBAL_OPTIONS.items():
        group.add_argument(flag, action="store_true", help=text)


def _add_segment_parser(sub) -> None:
    g = sub.add_parser("segment", help="few-shot segmentation of a structure the model never saw")
    g.add_argument("--checkpoint", required=True, help="a segmentation checkpoint from `imaging-meta fit`")
    g.add_argument("--support-image", action="append", required=True, help="NIfTI file or DICOM series folder (repeat)")
    g.add_argument("--support-label", action="append", required=True, help="NIfTI label map of each support image (repeat)")
    g.add_argument("--label-value", type=int, default=None, help="structure value in the label maps (default: any non-zero)")
    g.add_argument("--structure-name", default=None,
                   help="the structure's name, written into each mask's NIfTI description and as the DICOM-SEG segment "
                        "label, and how an earlier mask of another structure is told apart (default: 'label <value>' with "
                        "--label-value, else 'structure')")
    g.add_argument("--query", action="append", required=True, help="NIfTI file or DICOM series folder (repeat)")
    g.add_argument("--out", required=True, help="output folder (created): one mask per query, named after it; a mask of that name already there is replaced when it holds a structure of the same name (--structure-name) of the same scan, and refused when it holds another structure, another scan's mask (two series folders of one name) or is no mask of segment: one folder per structure")
    g.add_argument("--modality", default=None, help="CT or MR, when the files do not say")
    g.add_argument("--max-support-slices", type=positive_int, default=12, help="support slices used per support scan (default 12)")
    g.add_argument("--no-largest-component", action="store_true", help="keep every connected component")
    g.add_argument("--device", default="auto", help="auto (default: a GPU when there is one), cpu, cuda or cuda:N")
    g.add_argument("--format", dest="output_format", choices=("nifti", "dicom-seg"), default="nifti",
                   help="mask format; dicom-seg (highdicom) needs single-frame DICOM series queries (not enhanced multi-frame files) and writes <query>.seg.dcm")
    g.add_argument("--explain", action="store_true",
                   help="also write each query's foreground score map (<query>_probability.nii.gz; 0.5 is the threshold "
                        "fitted on the support, so the mask is the map > 0.5 before the component step: not a "
                        "calibrated probability)")
    g.add_argument("--learner-only", action="store_true",
                   help="the learner's probability alone: no intensity evidence, calibration, negative slices, z smoothing "
                        "or retry of an empty answer")
    g.add_argument("--no-intensity", action="store_true", help="do not fuse the support's intensity likelihood")
    g.add_argument("--no-negative-slices", action="store_true",
                   help="do not use the support's slices without the structure to leave query slices empty")
    g.add_argument("--pooled-calibration", action="store_true",
                   help="with several support scans, calibrate on each support slice predicted from all the others (as "
                        "before 2026-12-05) instead of from the other scans alone (default: as a query of another "
                        "patient will be predicted)")
    g.add_argument("--position-prior", action="store_true",
                   help="with two or more support scans, also fuse where the structure lies in the body (each support "
                        "scan's mask at the query's relative position), its weight fitted across the support patients "
                        "(docs/segmentation.md: it helped tumour-centred crops, not the demo; off by default)")
    g.add_argument("--keep-empty", action="store_true",
                   help="keep an empty mask when nothing is found (by default such a query is segmented again without "
                        "the support's intensity evidence, then also without the slice gate, and a warning says so); "
                        "use it when some queries may not show the structure")
    g.add_argument("--empty-if-unlike", action="store_true",
                   help="write an empty mask for a query that looks unlike the support scans (another body region, "
                        "field of view or protocol; the warning that names it is given either way): every scan of another "
                        "region in docs/segmentation.md, but also 3 of 20 other patients' tumour-centred crops. Not "
                        "checked, and warned about: queries of another modality than the supports, and checkpoints whose "
                        "learner has no slice features (only ProtoNet segmentation checkpoints have them)")
    g.add_argument("--adapt-steps", type=non_negative_int, default=40,
                   help="test-time adaptation: before predicting each query, fine-tune a copy on superpixel episodes from "
                        "the support scans and that query and on augmented support slices for N steps (default 40, a measured choice, see "
                        "docs/segmentation.md; 0: off, faster)")
    g.add_argument("--adapt-seed", type=seed_int, default=0, help="seed of the adaptation episodes (default 0)")
    g.add_argument("--scale", choices=("checkpoint", "structure"), default="structure",
                   help="in-plane spacing: one at which the support's structure is at least 12 pixels thick (default; "
                        "the checkpoint's for large organs, finer for thin or small structures), or the checkpoint's")
    g.add_argument("--z-smoothing", type=float, default=0.25,
                   help="weight of each axial neighbour when smoothing the probability along z (default 0.25; 0: off)")


def _add_evaluate_parser(sub) -> None:
    e = sub.add_parser("evaluate", help="a checkpoint on fixed seeded test episodes: metrics with 95%% CIs, plots, provenance")
    e.add_argument("--checkpoint", required=True, help="a checkpoint from `imaging-meta fit`")
    e.add_argument("--out", required=True, help="run folder for results.json, results.md, plots and episode files")
    e.add_argument("--shots", type=positive_int, nargs="+", default=[1, 5], help="support sizes to evaluate (default: 1 5)")
    e.add_argument("--episodes", type=positive_int, default=200, help="test episodes per number of shots")
    e.add_argument("--seed", type=seed_int, default=0, help="episode seed: the same seed draws the same episodes")
    e.add_argument("--data-config", default=None,
                   help="data YAML to use instead of the settings stored in the checkpoint (must keep its split)")
    e.add_argument("--data-root", default=None, help="the segmentation data folder, when it moved since training (classification: --data-config with the new paths)")
    e.add_argument("--cache-dir", default=None, help="cache folder for the index, volumes and episode files")
    e.add_argument("--batch-size", type=positive_int, default=None, help="episodes per forward pass")
    e.add_argument("--no-baselines", action="store_true",
                   help="do not score the untrained learner and the episodes' label-only baselines (the whole-scan "
                        "protocols always score their copy-mask and intensity-window baselines and ablations)")
    e.add_argument("--panel", type=non_negative_int, default=3, help="best and worst episodes in best_worst.png (0: none)")
    e.add_argument("--name", default=None, help="the run's name in `compare` tables (default: the folder name)")
    e.add_argument("--device", default="auto", help="auto (default: a GPU when there is one), cpu, cuda or cuda:N")
    e.add_argument("--salt", default=None,
                   help="the secret of the pseudonymous ids used at fit (default: as fit chose it from the run's "
                        "config.yaml beside the checkpoints folder: its salt unless a shipped placeholder, else env "
                        "IMAGING_META_SALT, else the default)")
    e.add_argument("--interval", choices=("patient-bootstrap", "episode-t"), default="patient-bootstrap",
                   help="95%% intervals of every table and of the paired trained − baseline differences: a seeded "
                        "percentile bootstrap of the test patients (default), or Student's t over episodes (too narrow "
                        "when episodes reuse the same patients)")
    e.add_argument("--scan-protocols", nargs="+", choices=("whole_scan", "oracle_extent"), default=[],
                   help="also segment whole test scans and score 3D Dice per query volume beside the untrained learner, "
                        "copying the support mask and the intensity window (segmentation; scans.md)")
    e.add_argument("--scan-pairs", type=positive_int, default=4, help="(support, query) scan pairs per test structure")
    e.add_argument("--scan-pairing", choices=("same_site", "cross_site", "any"), default="same_site",
                   help="whole-scan pairs: support and query from the same site (default), from different sites, or any")
    e.add_argument("--adapt-steps", type=non_negative_int, default=0,
                   help="whole-scan protocols: also score the segmenter after N steps of test-time adaptation per pair")
    e.add_argument("--scale", choices=("checkpoint", "structure"), default="checkpoint",
                   help="whole-scan protocols: segment at the checkpoint's spacing, or at one chosen from each support's "
                        "structure (as segment --scale)")
    e.add_argument("--log-dir", default=None,
                   help="also write the figures as TensorBoard images and results.md as text into this folder, e.g. the "
                        "training run's runs/<name>/version_N (never into --out, whose files are reproducible)")


def _scan_options(args):
    """The scan segmenter's parts from ``segment``'s flags."""
    import dataclasses

    from imaging_meta.volume.segmenter import LEARNER_ONLY, ScanOptions

    ScanOptions(smooth_z=args.z_smoothing)  # checked whichever options apply (NaN passed with --learner-only)
    if args.learner_only:
        ignored = [flag for flag, given in (("--no-intensity", args.no_intensity), ("--no-negative-slices",
                   args.no_negative_slices), ("--pooled-calibration", args.pooled_calibration),
                   ("--keep-empty", args.keep_empty), ("--z-smoothing", args.z_smoothing != 0.25),
                   ("--position-prior", args.position_prior)) if given]
        if ignored:
            logger.warning("--learner-only uses the learner's probability alone: %s change(s) nothing",
                           ", ".join(ignored))
        return dataclasses.replace(LEARNER_ONLY, max_support_slices=args.max_support_slices)
    return ScanOptions(intensity=not args.no_intensity, negatives=not args.no_negative_slices, smooth_z=args.z_smoothing,
                       max_support_slices=args.max_support_slices, relax_empty=not args.keep_empty,
                       across_scans=not args.pooled_calibration, position=args.position_prior)


def _run_tool(argv: Sequence[str]) -> int:
    args = _tool_parser().parse_args(argv)
    if args.command == "demo":
        from datamodules.synthetic.demo import demo_is_complete, demo_settings, generate_demo_cohort
        from imaging_meta.commands.outputs import check_output_folder

        out = Path(args.out)
        if args.if_missing and demo_is_complete(out):
            have, asked = demo_settings(out), {"seed": args.seed, "patients_per_site": args.patients_per_site}
            if have != asked:  # --if-missing answered "already there" for a cohort of other settings (a review)
                raise ValueError(f"{out}: holds a demo cohort of seed {have and have['seed']} with "
                                 f"{have and have['patients_per_site']} patients per site, not seed {args.seed} with "
                                 f"{args.patients_per_site}; give another --out, or delete the folder to write it again")
            sys.stdout.write(f"demo cohort already in {out}\n")
            return 0
        check_output_folder(out)  # a file, or a folder that cannot be written, named before the work (a finished
        # cohort on a read-only share is still "already there" above)
        summary = generate_demo_cohort(out, seed=args.seed, patients_per_site=args.patients_per_site)
        sys.stdout.write(f"demo cohort written to {out}: {summary}\n")
        return 0
    if args.command == "scan":
        from datamodules.indexing.scan import DEFAULT_SITE_FIELDS, scan_to_file
        from imaging_meta.commands.outputs import check_output_file

        check_output_file(args.out, example="index.json")  # before the scan, which takes minutes on a large folder

        fields = tuple(args.site_fields) if args.site_fields else DEFAULT_SITE_FIELDS
        names: dict[int, str] = {}
        for pair in args.label_names or []:
            value, sep, name = pair.partition("=")
            if not sep or not value.strip().isdigit() or not name.strip():
                raise ValueError(f"--label-names: {pair!r} is not VALUE=NAME with an integer value (e.g. 1=liver)")
            if int(value) == 0:
                raise ValueError(f"--label-names: {pair!r}: 0 is the background, which has no structure name")
            if int(value) in names:
                raise ValueError(f"--label-names: value {int(value)} is named twice ({names[int(value)]!r}, "
                                 f"{name.strip()!r}); give each value one name")
            names[int(value)] = name.strip()
        regex = {} if args.patient_regex is None else {"patient_regex": args.patient_regex}
        from datamodules.indexing.pseudonyms import salt_or_env

        # the datamodules' own rule: an IMAGING_META_SALT set but empty gave the scan an empty secret, and fit the
        # default, so the preview's patient ids were not the training's
        salt = salt_or_env(args.salt)
        index = scan_to_file(args.root, args.out, site_fields=fields, salt=salt, label_names=names or None, **regex)
        sys.stdout.write(index.summary() + f"\nindex written to {args.out}\n")
        return 0
    if args.command == "prepare":
        from datamodules.recipes.prepare import run as run_prepare

        return run_prepare(args)
    if args.command == "segment":
        from imaging_meta.commands.segment import segment

        if len(args.support_image) != len(args.support_label):
            raise ValueError(
                f"give one --support-label per --support-image ({len(args.support_image)} images, {len(args.support_label)} labels)"
            )
        written = segment(
            args.checkpoint,
            list(zip(args.support_image, args.support_label, strict=True)),
            args.query,
            args.out,
            label_value=args.label_value,
            structure_name=args.structure_name,
            modality=args.modality,
            max_support_slices=args.max_support_slices,
            largest_component=not args.no_largest_component,
            device=args.device,
            output_format=args.output_format,
            explain=args.explain,
            options=_scan_options(args),
            adapt_steps=args.adapt_steps,
            adapt_seed=args.adapt_seed,
            scale=args.scale,
            empty_if_unlike=args.empty_if_unlike,
        )
        for w in written:
            sys.stdout.write(f"wrote {w}\n")
        return 0
    if args.command == "classify":
        from imaging_meta.commands.classify import classify

        if args.space is not None and args.finetune_steps:
            logger.warning("--space %s is not used: --finetune-steps answers with the fine-tuned head instead",
                           args.space)
        out = classify(args.checkpoint, args.support, args.query, args.out, device=args.device, explain=args.explain,
                       space=args.space or "auto", finetune_steps=args.finetune_steps)
        sys.stdout.write(f"wrote {out}\n")
        if args.explain:
            from imaging_meta.commands.classify import explain_dir

            sys.stdout.write(f"wrote the explanations into {explain_dir(out)}\n")
        return 0
    if args.command == "evaluate":
        from imaging_meta.commands.evaluate import evaluate

        js, md = evaluate(
            args.checkpoint, args.out, shots=args.shots, episodes=args.episodes, seed=args.seed,
            data_config=args.data_config, data_root=args.data_root, cache_dir=args.cache_dir,
            batch_size=args.batch_size, device=args.device, baselines=not args.no_baselines, n_panel=args.panel,
            name=args.name, salt=args.salt, interval=args.interval, scan_protocols=args.scan_protocols, scan_pairs=args.scan_pairs,
            adapt_steps=args.adapt_steps, scan_pairing=args.scan_pairing, scan_scale=args.scale, log_dir=args.log_dir,
        )
        sys.stdout.write(md.read_text() + f"\nwritten: {js}\n         {md}\n")
        return 0
    if args.command == "configs":
        from imaging_meta.commands.configs import SHIPPED, copy_configs, shipped_configs

        if args.copy is not None and not args.copy.strip():
            raise ValueError("--copy is empty: give the folder to write the configs into (e.g. --copy configs)")
        if args.force and args.copy is None:
            raise ValueError("--force overwrites configs that --copy writes: give --copy DIR with it")
        if args.copy:
            written = copy_configs(args.copy, force=args.force)
            sys.stdout.write(f"{len(written)} config(s) written to {args.copy} (of {len(shipped_configs())})\n")
        else:
            sys.stdout.write(f"# in {SHIPPED}\n" + "".join(f"{f}\n" for f in shipped_configs()))
        return 0
    if args.command == "compare":
        from datamodules.io.atomic import atomic_write_text
        from imaging_meta.evaluation.reports import compare_runs

        if args.out:  # never over a run's own files (its results.md)
            from imaging_meta.commands.outputs import check_output_file, check_outputs

            check_outputs([(check_output_file(args.out, example="comparison.md"), "the comparison table")],
                          [f for run in args.runs if Path(run).is_dir() for f in Path(run).iterdir()])
        table = compare_runs(args.runs)
        if args.out:
            atomic_write_text(args.out, table)
        sys.stdout.write(table)
        return 0
    if args.command == "results":
        from imaging_meta.commands.results import run_results

        return run_results(args)
    raise AssertionError(args.command)


def _refuse_another_jobs_hpc_checkpoint(default_root_dir: str | None) -> None:
    """Under SLURM, Lightning resumes ``fit`` without a ``--ckpt_path`` from the newest ``hpc_ckpt_<n>.ckpt`` in the
    trainer's ``default_root_dir`` (the working directory unless set), which its auto-requeue wrote there. That is
    right for the requeued job, and wrong for any later job started in the same folder: it trained on from the old
    run's weights and optimiser state, and tested and reported them under the new settings, without a word (a
    review). A job that SLURM requeued has ``SLURM_RESTART_COUNT`` above 0; any other is refused here, with the ways
    out.

    Raises:
        CheckpointError: naming the checkpoint, when this SLURM job is not a requeue."""
    from lightning.fabric.plugins.environments import SLURMEnvironment

    from imaging_meta.checkpoint_io import CheckpointError

    if not SLURMEnvironment.detect() or slurm_requeue():
        return
    restarts = os.environ.get("SLURM_RESTART_COUNT", "").strip()
    found = hpc_checkpoints(default_root_dir)
    if not found:
        return
    raise CheckpointError(
        f"{found[-1]}: an auto-requeue checkpoint of an earlier SLURM job is in {found[-1].parent}, and this job "
        f"(SLURM_JOB_ID {os.environ.get('SLURM_JOB_ID', '?')}) is not a requeue (SLURM_RESTART_COUNT "
        f"{restarts or 'unset'}), so Lightning would resume the old run instead of starting this one. To start "
        "afresh, move the hpc_ckpt_* files away or give each job its own --trainer.default_root_dir; to go on "
        "with the old run, pass --ckpt_path hpc (the newest of them, now and at every later requeue; a file's own "
        "path would send each requeue back to that file)")


def slurm_requeue() -> bool:
    """Whether this process is a SLURM job that SLURM requeued (``SLURM_RESTART_COUNT`` above 0)."""
    from lightning.fabric.plugins.environments import SLURMEnvironment

    restarts = os.environ.get("SLURM_RESTART_COUNT", "").strip()
    return SLURMEnvironment.detect() and restarts.isdigit() and int(restarts) > 0


def hpc_checkpoints(default_root_dir: str | None) -> list[Path]:
    """The files Lightning's ``ckpt_path="hpc"`` chooses among in the trainer's ``default_root_dir`` (the working
    directory unless set; ``~`` and ``file://`` as Lightning reads them), oldest first: every name that holds
    ``hpc_ckpt_`` and a digit, numbered as Lightning numbers it (every digit after its last ``hpc_ckpt_``, joined:
    ``hpc_ckpt_2_copy3.ckpt`` is 23; the first number alone was taken, a review). Empty for a remote root
    (Lightning's own rule applies)."""
    root = str(default_root_dir) if default_root_dir else os.getcwd()
    if root.startswith("file://"):
        root = root[len("file://"):]
    elif "://" in root:
        return []
    folder = Path(os.path.expanduser(root))
    if not folder.is_dir():
        return []
    numbers = set()
    for p in folder.iterdir():
        if "hpc_ckpt_" in p.name:
            digits = re.sub(r"[^0-9]", "", p.name.split("hpc_ckpt_")[-1])
            if digits:
                numbers.add(int(digits))
    # Lightning resumes from hpc_ckpt_<largest number>.ckpt, whatever file the number came from
    return [folder / f"hpc_ckpt_{n}.ckpt" for n in sorted(numbers)]


def cli_main(args: Sequence[str] | None = None):
    """Entry point that tests can call: ``cli_main(["fit", "--config", ...])``; errors propagate (`main` turns
    them into one line). ``--quiet`` and ``--debug`` may stand anywhere (`split_global_options`); ``--quiet``
    applies here (`quiet_output`), ``--debug`` matters to `main` only.

    Returns the LightningCLI object for Lightning subcommands, or the exit code of a tool subcommand.
    """
    from_argv = args is None
    args, options = split_global_options(sys.argv[1:] if args is None else args)
    with quiet_output(options.quiet):
        if args and args[0] in TOOL_SUBCOMMANDS:
            return _run_tool(args)
        if args and args[0] in ("-V", "--version"):
            from imaging_meta import __version__

            sys.stdout.write(f"imaging-meta {__version__}\n")
            return 0
        if args and args[0] == "predict":
            sys.stderr.write(
                "imaging-meta predict: there is no Lightning predict step. Predict with a checkpoint and a few labelled "
                "examples instead:\n  imaging-meta segment ...   (a structure in new scans)\n"
                "  imaging-meta classify ...  (new images against a support folder)\n"
            )
            raise SystemExit(2)
        if not args or args[0] in ("-h", "--help"):
            sys.stdout.write(main_help())
            if not args:
                raise SystemExit(2)
            return 0
        if options.quiet:
            quiet_lightning()
            args = [*args, "--trainer.enable_progress_bar=false"]
        if not from_argv:
            return lightning_cli(args)
        # LightningCLI reads sys.argv itself, and DDP's launcher starts the other ranks with it: without the
        # global options (LightningCLI does not know them), with what --quiet means for the Trainer
        sys.argv[1:] = args
        return lightning_cli(None)


def main_help() -> str:
    """``imaging-meta --help``: every command with what it does, and where each one's own help is."""
    from imaging_meta import __version__

    tools = next(a for a in _tool_parser()._actions if isinstance(a, argparse._SubParsersAction))
    lines = [
        f"imaging-meta {__version__}: few-shot meta-learning for medical images",
        "",
        "usage: imaging-meta <command> [options]      imaging-meta <command> --help      imaging-meta --version",
        "",
        "Training and testing (LightningCLI; combine YAML files from configs/ with repeated --config):",
        "  fit          meta-train a learner: imaging-meta fit --config configs/trainer/cpu.yaml \\",
        "                 --config configs/data/demo_segmentation.yaml --config configs/model/protonet_seg.yaml",
        "  validate     score a checkpoint on the validation episodes (--ckpt_path)",
        "  test         score a checkpoint on the fixed test episodes, with the report (--ckpt_path)",
        "",
        "Tools:",
    ]
    for choice in tools._choices_actions:
        lines.append(f"  {choice.dest:<12} {(choice.help or '').replace('%%', '%')}")
    lines += ["", "Global options (before or after the command):"]
    lines += [f"  {flag:<12} {text}" for flag, text in GLOBAL_OPTIONS.items()]
    lines += [
        "",
        f"Exit status: 0 done, {EXIT_USER_ERROR} bad input (one line on stderr: the file, what is wrong, the fix), 2 bad "
        f"arguments,",
        f"  {EXIT_BUG} an unexpected error (a bug: rerun with --debug and report it), {EXIT_INTERRUPTED} interrupted (Ctrl-C),",
        f"  {EXIT_TERMINATED} terminated (SIGTERM, a scheduler's stop).",
        "",
        "Docs: README.md and docs/ in the repository.",
    ]
    return "\n".join(lines) + "\n"


def _command_name(args: Sequence[str]) -> str:
    known = (*LIGHTNING_SUBCOMMANDS, *TOOL_SUBCOMMANDS)
    return "imaging-meta" + next((f" {a}" for a in args if a in known), "")


class Terminated(BaseException):
    """Raised in the main thread when the process gets SIGTERM (a scheduler's stop) outside Lightning's own
    handling: the ``finally`` blocks run (temporary ``.partial`` files are removed), and the exit status says so."""


def _terminate(signum: int, frame: Any) -> None:
    raise Terminated()


def _other_threads_alive() -> bool:
    return any(t is not threading.main_thread() and t.is_alive() for t in threading.enumerate())


def _leave(code: int) -> NoReturn:
    """Exit with ``code`` after an interrupt. Worker threads still running torch code (a cache being filled)
    abort the interpreter's shutdown ("terminate called without an active exception", status 134; a review):
    with any alive, this thread's ``finally`` blocks having run, the process leaves at once, as the signal's
    default would."""
    if _other_threads_alive():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    raise SystemExit(code) from None


def main(argv: Sequence[str] | None = None) -> None:
    """The ``imaging-meta`` command: `cli_main` with errors as one line on stderr (see the module docstring).

    SIGINT (Ctrl-C) ends with status 130, SIGTERM with 143, each with one line that says so, also where Lightning
    handled the signal in ``fit`` (it ends a SIGTERM with a bare ``SystemExit``, status 0, and a Ctrl-C with
    status 1: a scheduler took a killed run for a finished one; a review).

    Args:
        argv: the arguments after the program name (default: ``sys.argv[1:]``).
    """
    args, options = split_global_options(sys.argv[1:] if argv is None else argv)
    debug = debug_requested(options)
    name = _command_name(args)
    previous = signal.getsignal(signal.SIGTERM)
    ours = previous is signal.SIG_DFL and threading.current_thread() is threading.main_thread()  # not a caller's
    if ours:
        signal.signal(signal.SIGTERM, _terminate)
    try:
        _main(argv, name, debug)
    finally:
        if ours:
            signal.signal(signal.SIGTERM, previous)


def _main(argv: Sequence[str] | None, name: str, debug: bool) -> None:
    with console(debug):
        try:
            result = cli_main(None if argv is None else list(argv))
        except KeyboardInterrupt:
            sys.stderr.write(f"{name}: interrupted\n")
            _leave(EXIT_INTERRUPTED)
        except Terminated:
            sys.stderr.write(f"{name}: terminated (SIGTERM)\n")
            _leave(EXIT_TERMINATED)
        except SystemExit as e:
            if type(e).__name__ == "SIGTERMException":  # Lightning's, raised after its SIGTERM handler ran
                sys.stderr.write(f"{name}: terminated (SIGTERM)\n")
                raise SystemExit(EXIT_TERMINATED) from None
            if e.code == 1 and isinstance(e.__context__, KeyboardInterrupt):  # Lightning's exit(1) after Ctrl-C
                sys.stderr.write(f"{name}: interrupted\n")
                raise SystemExit(EXIT_INTERRUPTED) from None
            raise
        except Exception as e:  # noqa: BLE001 - classified: bad input (one line) or a bug (one line, and how to report it)
            if debug:
                raise
            sys.stderr.write(error_line(e, name))
            raise SystemExit(EXIT_USER_ERROR if user_error(e) is not None or peer_stopped(e) else EXIT_BUG) from None
    if isinstance(result, int):
        raise SystemExit(result)


__all__ = ["USER_ERRORS", "cli_main", "error_line", "finish_distributed", "lightning_cli", "main", "main_help", "user_error"]
