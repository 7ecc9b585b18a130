"""The real configs, composed and shrunk (lightning-hydra-template style), driven through `cli_main`."""

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from imaging_meta.commands.cli import cli_main, lightning_cli
from tests.helpers import CONFIGS, SMALL_MODEL, data_args


@pytest.mark.parametrize("trainer", sorted(p.name for p in (CONFIGS / "trainer").glob("*.yaml")))
def test_every_config_instantiates(trainer, tmp_path):
    """Every trainer x data x model YAML in configs/ parses; everything but GPU trainers instantiates here."""
    datas = sorted((CONFIGS / "data").glob("*.yaml"))
    models = sorted((CONFIGS / "model").glob("*.yaml"))
    assert datas and models
    assert all(m.stem.endswith(("_seg", "_cls")) for m in models), "model configs are named *_seg or *_cls"
    for data in datas:
        data_task = "segmentation" if "SegmentationDataModule" in data.read_text() else "classification"
        for model in (m for m in models if m.stem.endswith("_seg" if data_task == "segmentation" else "_cls")):
            args = ["fit", "--config", str(CONFIGS / "trainer" / trainer), "--config", str(data), "--config", str(model),
                    "--trainer.logger.init_args.save_dir", str(tmp_path)]
            if "accelerator: gpu" in (CONFIGS / "trainer" / trainer).read_text() and not torch.cuda.is_available():
                args.append("--print_config")
                with pytest.raises(SystemExit) as e:
                    lightning_cli(args, run=True)
                assert e.value.code == 0
                continue
            cli = lightning_cli(args[1:], run=False)
            assert cli.model.learner.task == data_task, (data.name, model.name)
            assert cli.datamodule.hparams.n_shot >= 1


def test_n_way_is_set_once_in_the_data_config(tmp_path, capsys):
    """The data config's n_way reaches the learners that take one; an old model config that repeats it works
    when it agrees and fails, naming the fix, when it does not; segmentation (no n_way anywhere) is untouched."""

    def parse(data: str, model: Path, *extra: str):
        return lightning_cli(["--config", str(CONFIGS / "trainer/cpu.yaml"), "--config", str(CONFIGS / "data" / data),
                              "--config", str(model), "--trainer.logger.init_args.save_dir", str(tmp_path), *extra], run=False)

    models = CONFIGS / "model"
    assert not any("n_way" in m.read_text() for m in models.glob("*.yaml")), "n_way belongs in the data configs only"
    cli = parse("demo_classification.yaml", models / "maml_cls.yaml", "--data.init_args.n_way", "3")
    assert cli.datamodule.n_way == 3 and cli.model.learner.n_way == 3
    cli = parse("demo_classification.yaml", models / "protonet_cls.yaml", "--data.init_args.n_way", "3")
    assert cli.datamodule.n_way == 3  # a learner without an n_way argument leaves the link unused
    assert parse("demo_segmentation.yaml", models / "maml_seg.yaml").datamodule.n_way is None

    def old_config(n_way: int) -> Path:  # a model config written before the link: it repeats n_way
        text = (models / "maml_cls.yaml").read_text().replace("task: classification\n",
                                                              f"task: classification\n      n_way: {n_way}\n")
        assert f"n_way: {n_way}" in text
        path = tmp_path / f"maml_cls_{n_way}way.yaml"
        path.write_text(text)
        return path

    assert parse("demo_classification.yaml", old_config(3), "--data.init_args.n_way", "3").model.learner.n_way == 3
    capsys.readouterr()
    with pytest.raises(SystemExit):
        parse("demo_classification.yaml", old_config(3))  # the data says 5
    err = capsys.readouterr().err
    assert "model.learner.init_args.n_way=3 but data.init_args.n_way=5" in err and "remove n_way from the model config" in err


def test_fit_fast_dev_run_then_test_writes_the_report(demo_root, demo_index, tmp_path, capsys):
    index, index_path = demo_index
    args = ["fit", "--config", str(CONFIGS / "trainer/cpu.yaml"), "--config", str(CONFIGS / "data/demo_segmentation.yaml"),
            "--config", str(CONFIGS / "model/protonet_seg.yaml"), *SMALL_MODEL, *data_args(demo_root, index_path, tmp_path / "cache"),
            "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"), "--trainer.max_epochs", "1",
            "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1", "--test_after_fit", "true"]
    cli = cli_main(args)
    run_dir = Path(cli.trainer.log_dir)
    assert (run_dir / "config.yaml").exists(), "the resolved config is saved with the run"
    md = (run_dir / "results.md").read_text()
    for method in ("trained", "untrained encoder", "copy support mask"):
        assert method in md
    assert "organ: spleen" in md and "organ: kidney_left" in md and "site:" in md
    assert "results.md" in capsys.readouterr().out
    ckpts = list((run_dir / "checkpoints").glob("*.ckpt"))
    assert ckpts
    ckpt = torch.load(ckpts[0], weights_only=True)
    assert ckpt["imaging_meta"]["preprocessing"]["slice_size"] == [32, 32]
    assert "untrained_state_dict" in ckpt["imaging_meta"]
    events = list(run_dir.glob("events.out.tfevents.*"))
    assert events


def test_fast_dev_run(demo_root, demo_index, tmp_path):
    args = ["fit", "--config", str(CONFIGS / "trainer/cpu.yaml"), "--config", str(CONFIGS / "data/demo_segmentation.yaml"),
            "--config", str(CONFIGS / "model/protonet_seg.yaml"), *SMALL_MODEL, *data_args(demo_root, demo_index[1], tmp_path),
            "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"), "--trainer.fast_dev_run", "true",
            "--trainer.default_root_dir", str(tmp_path)]  # fast_dev_run drops the logger: checkpoints go here, not to ./
    cli = cli_main(args)
    assert cli.trainer.state.finished


def test_tool_help_and_errors(capsys):
    from imaging_meta import __version__
    from imaging_meta.commands.cli import TOOL_SUBCOMMANDS

    assert cli_main(["--help"]) == 0
    out = capsys.readouterr().out
    for command in ("fit", "validate", "test", *TOOL_SUBCOMMANDS):  # every command, with what it does
        assert f"\n  {command:<12} " in out, command
    assert "predict" not in out and __version__ in out
    assert cli_main(["--version"]) == 0 and capsys.readouterr().out == f"imaging-meta {__version__}\n"
    with pytest.raises(SystemExit) as e:
        cli_main(["predict", "--config", "x.yaml"])  # there is no predict step: the error names what to use
    assert e.value.code == 2 and "imaging-meta classify" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli_main(["segment", "--checkpoint", "x"])  # missing required arguments


def test_segment_writes_masks_in_the_query_geometry(demo_root, demo_index, tmp_path):
    """Train a moment, then segment a held-out organ on scans given as DICOM and as non-RAS NIfTI."""
    index, index_path = demo_index
    args = ["fit", "--config", str(CONFIGS / "trainer/cpu.yaml"), "--config", str(CONFIGS / "data/demo_segmentation.yaml"),
            "--config", str(CONFIGS / "model/protonet_seg.yaml"), *SMALL_MODEL, *data_args(demo_root, index_path, tmp_path / "c"),
            "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"), "--trainer.max_epochs", "1",
            "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1"]
    cli = cli_main(args)
    ckpt = next(Path(cli.trainer.log_dir, "checkpoints").glob("last*.ckpt"))
    nifti_cases = [c for c in index.labelled_cases if c.image_format == "nifti"]
    dicom_cases = [c for c in index.labelled_cases if c.image_format == "dicom"]
    support = nifti_cases[0]
    queries = [nifti_cases[-1], dicom_cases[0]]
    q_paths = [index.resolve(queries[0].image), str(Path(index.resolve(queries[1].image)[0]).parent)]
    out = tmp_path / "masks"
    rc = cli_main(["segment", "--checkpoint", str(ckpt), "--support-image", index.resolve(support.image),
                   "--support-label", index.resolve(support.label), "--label-value", str(support.organs["spleen"]),
                   "--query", q_paths[0], "--query", q_paths[1], "--out", str(out)])
    assert rc == 0
    # NIfTI query: exactly its own shape and affine
    q_img = nib.load(q_paths[0])
    m0 = nib.load(str(out / (Path(q_paths[0]).name.removesuffix(".nii.gz") + ".nii.gz")))
    assert m0.shape == q_img.shape and np.allclose(m0.affine, q_img.affine, atol=1e-4)
    assert set(np.unique(m0.get_fdata())) <= {0.0, 1.0}
    # DICOM query: the series geometry (the label map of that series has it too)
    lbl = nib.load(index.resolve(queries[1].label))
    m1 = nib.load(str(out / (Path(q_paths[1]).name + ".nii.gz")))
    assert m1.shape == tuple(queries[1].shape)
    assert np.allclose(m1.affine, np.asarray(queries[1].affine), atol=1e-3)
    assert nib.aff2axcodes(m1.affine) == nib.aff2axcodes(np.asarray(queries[1].affine))
    assert lbl.shape == m1.shape or sorted(lbl.shape) == sorted(m1.shape)


def test_segment_rejects_bad_checkpoints(tmp_path):
    from imaging_meta.checkpoint_io import CheckpointError, load_learner

    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="bad.ckpt: not a readable"):
        load_learner(bad)
    other = tmp_path / "other.ckpt"
    torch.save({"state_dict": {}}, other)
    with pytest.raises(CheckpointError, match="not an imaging-meta checkpoint"):
        load_learner(other)


def test_the_command_reports_bad_input_without_a_traceback(tmp_path, monkeypatch, capsys):
    import sys

    from imaging_meta.commands import cli

    def reader_fails(*_):
        try:
            raise ValueError(f"{tmp_path / 'IM_0001.dcm'}: missing Bits Stored (0028,0101)")
        except ValueError as inner:
            raise RuntimeError("applying transform <LoadImaged ...>") from inner

    monkeypatch.setattr(cli, "cli_main", reader_fails)
    monkeypatch.setattr(sys, "argv", ["imaging-meta", "segment"])
    monkeypatch.delenv("IMAGING_META_TRACEBACK", raising=False)
    with pytest.raises(SystemExit) as e:
        cli.main()
    err = capsys.readouterr().err
    assert e.value.code == 1 and "Traceback" not in err
    assert err.startswith("imaging-meta segment: error: ValueError: ") and "missing Bits Stored" in err
    assert "applying transform" not in err and "IMAGING_META_TRACEBACK=1" in err
    monkeypatch.setenv("IMAGING_META_TRACEBACK", "1")
    with pytest.raises(RuntimeError, match="applying transform"):  # the traceback, when asked for
        cli.main()


def test_configs_ship_in_the_package_and_copy_out(tmp_path, capsys):
    from imaging_meta.commands.configs import SHIPPED, shipped_configs

    repo = Path(__file__).resolve().parents[2]
    assert (repo / "configs").resolve() == SHIPPED  # the repository's configs/ is the package's
    files = shipped_configs()
    assert Path("model/protonet_cls.yaml") in files and Path("trainer/cpu.yaml") in files
    assert cli_main(["configs"]) == 0 and "data/demo_segmentation.yaml" in capsys.readouterr().out
    out = tmp_path / "configs"
    assert cli_main(["configs", "--copy", str(out)]) == 0
    assert sorted(p.relative_to(out) for p in out.rglob("*.yaml")) == files
    (out / "model/protonet_cls.yaml").write_text("# mine\n")
    with pytest.raises(FileExistsError, match="differ from the shipped"):
        cli_main(["configs", "--copy", str(out)])
    assert (out / "model/protonet_cls.yaml").read_text() == "# mine\n"  # nothing was overwritten
    assert cli_main(["configs", "--copy", str(out), "--force"]) == 0
    assert (out / "model/protonet_cls.yaml").read_bytes() == (SHIPPED / "model/protonet_cls.yaml").read_bytes()
    pyproject = (repo / "pyproject.toml").read_text()
    assert '"configs/*/*.yaml"' in pyproject  # package data: the wheel carries them
