"""The ``imaging-meta`` command.

* ``fit | validate | test | predict``: LightningCLI over `EpisodicModule` and any LightningDataModule
  (``--config`` YAML files from ``configs/``, combined by repeating ``--config``).
* ``demo``: write the synthetic multi-site demo cohort.
* ``scan``: index a folder of DICOM series / NIfTI volumes (report of rejected inputs included).
* ``segment``: few-shot segmentation of a new structure from a checkpoint and a few labelled scans.
* ``classify``: few-shot classification of images against a support folder (one subfolder per class).
* ``results``: train and test every learner on the same fixed test episodes; one table.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

LIGHTNING_SUBCOMMANDS = ("fit", "validate", "test", "predict")
TOOL_SUBCOMMANDS = ("demo", "scan", "segment", "classify", "results")


def lightning_cli(args: Sequence[str] | None, run: bool = True):
    """The LightningCLI over `EpisodicModule`; ``run=False`` only parses and instantiates (tests use it)."""
    import torch
    from lightning.pytorch import LightningDataModule
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.cli import LightningCLI

    from imaging_meta.module import EpisodicModule

    class ImagingMetaCLI(LightningCLI):
        """LightningCLI with ``--test_after_fit``: test the best checkpoint on the held-out episodes after fit."""

        def add_arguments_to_parser(self, parser) -> None:
            parser.add_argument("--test_after_fit", type=bool, default=False, help="after fit, test the best checkpoint")

        def after_fit(self) -> None:
            if not self.config[self.subcommand].get("test_after_fit"):
                return
            ckpt = next((c for c in self.trainer.checkpoint_callbacks if isinstance(c, ModelCheckpoint)), None)
            path = (ckpt.best_model_path or ckpt.last_model_path) if ckpt else None
            self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path=path or None)
            self._print_report()

        def after_test(self) -> None:
            self._print_report()

        def _print_report(self) -> None:
            paths = getattr(self.model, "report_paths", None)
            if paths and self.trainer.is_global_zero:
                sys.stdout.write("\n" + Path(paths[1]).read_text() + f"\nwritten: {paths[0]}\n         {paths[1]}\n")

    torch.set_float32_matmul_precision("high")
    return ImagingMetaCLI(
        EpisodicModule,
        LightningDataModule,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        args=None if args is None else list(args),
        auto_configure_optimizers=False,
        run=run,
    )


def _tool_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="imaging-meta", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="write the synthetic multi-site demo cohort")
    d.add_argument("--out", required=True, help="output folder")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--patients-per-site", type=int, default=12)
    d.add_argument("--if-missing", action="store_true", help="do nothing when a complete cohort is already there")

    s = sub.add_parser("scan", help="index a folder of DICOM series and NIfTI volumes")
    s.add_argument("root", help="folder to scan")
    s.add_argument("--out", required=True, help="index JSON to write")
    s.add_argument("--site-fields", nargs="+", default=None, help="header fields that build the site key")
    s.add_argument("--salt", default=os.environ.get("IMAGING_META_SALT", "imaging-meta"),
                   help="secret for pseudonymous ids (or env IMAGING_META_SALT)")

    g = sub.add_parser("segment", help="few-shot segmentation of a structure the model never saw")
    g.add_argument("--checkpoint", required=True)
    g.add_argument("--support-image", action="append", required=True, help="NIfTI file or DICOM series folder (repeat)")
    g.add_argument("--support-label", action="append", required=True, help="NIfTI label map of each support image (repeat)")
    g.add_argument("--label-value", type=int, default=None, help="structure value in the label maps (default: any non-zero)")
    g.add_argument("--query", action="append", required=True, help="NIfTI file or DICOM series folder (repeat)")
    g.add_argument("--out", required=True, help="output folder")
    g.add_argument("--modality", default=None, help="CT or MR, when the files do not say")
    g.add_argument("--max-support-slices", type=int, default=12, help="support slices used per support scan")
    g.add_argument("--no-largest-component", action="store_true", help="keep every connected component")
    g.add_argument("--device", default="auto")

    c = sub.add_parser("classify", help="few-shot classification of images against a support folder")
    c.add_argument("--checkpoint", required=True)
    c.add_argument("--support", required=True, help="folder with one subfolder of images (PNG, JPEG, DICOM) per class")
    c.add_argument("--query", action="append", required=True, help="image file or folder of images (repeat)")
    c.add_argument("--out", required=True, help="CSV to write: path, predicted_class, p_<class>...")
    c.add_argument("--device", default="auto")

    r = sub.add_parser("results", help="train and test every learner on the same fixed test episodes; one table")
    from imaging_meta.results import add_arguments

    add_arguments(r)
    return p


def _run_tool(argv: Sequence[str]) -> int:
    args = _tool_parser().parse_args(argv)
    if args.command == "demo":
        from datamodules.demo import demo_is_complete, generate_demo_cohort

        out = Path(args.out)
        if args.if_missing and demo_is_complete(out):
            sys.stdout.write(f"demo cohort already in {out}\n")
            return 0
        summary = generate_demo_cohort(out, seed=args.seed, patients_per_site=args.patients_per_site)
        sys.stdout.write(f"demo cohort written to {out}: {summary}\n")
        return 0
    if args.command == "scan":
        from datamodules.scan import DEFAULT_SITE_FIELDS, scan_to_file

        fields = tuple(args.site_fields) if args.site_fields else DEFAULT_SITE_FIELDS
        index = scan_to_file(args.root, args.out, site_fields=fields, salt=args.salt)
        sys.stdout.write(index.summary() + f"\nindex written to {args.out}\n")
        return 0
    if args.command == "segment":
        from imaging_meta.predict import segment

        if len(args.support_image) != len(args.support_label):
            raise SystemExit(
                f"give one --support-label per --support-image ({len(args.support_image)} images, {len(args.support_label)} labels)"
            )
        written = segment(
            args.checkpoint,
            list(zip(args.support_image, args.support_label, strict=True)),
            args.query,
            args.out,
            label_value=args.label_value,
            modality=args.modality,
            max_support_slices=args.max_support_slices,
            largest_component=not args.no_largest_component,
            device=args.device,
        )
        for w in written:
            sys.stdout.write(f"wrote {w}\n")
        return 0
    if args.command == "classify":
        from imaging_meta.classify import classify

        out = classify(args.checkpoint, args.support, args.query, args.out, device=args.device)
        sys.stdout.write(f"wrote {out}\n")
        return 0
    if args.command == "results":
        from imaging_meta.results import run_results

        return run_results(args)
    raise AssertionError(args.command)


def cli_main(args: Sequence[str] | None = None):
    """Entry point that tests can call: ``cli_main(["fit", "--config", ...])``.

    Returns the LightningCLI object for Lightning subcommands, or the exit code of a tool subcommand.
    """
    from_argv = args is None
    args = list(sys.argv[1:] if args is None else args)
    if args and args[0] in TOOL_SUBCOMMANDS:
        return _run_tool(args)
    if not args or args[0] in ("-h", "--help"):
        sys.stdout.write(
            "usage: imaging-meta {fit,validate,test,predict} --config CONFIG.yaml [...]\n"
            "       imaging-meta {demo,scan,segment,classify,results} ...  (see imaging-meta demo --help, ...)\n"
        )
        if not args:
            raise SystemExit(2)
        return 0
    return lightning_cli(None if from_argv else args)


def main() -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    for name in ("imaging_meta", "datamodules"):  # Lightning configures its own loggers
        log = logging.getLogger(name)
        log.addHandler(handler)
        log.setLevel(os.environ.get("IMAGING_META_LOGLEVEL", "INFO"))
    result = cli_main()
    if isinstance(result, int):
        raise SystemExit(result)
