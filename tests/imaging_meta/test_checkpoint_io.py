"""Checkpoints: written atomically, read without pickle, and refused when they belong to another learner."""

from pathlib import Path

import pytest
import torch

from imaging_meta.checkpoint_io import AtomicCheckpointIO, CheckpointError, load_learner, read_checkpoint
from imaging_meta.commands.cli import lightning_cli
from imaging_meta.learners.metric.protonet import PrototypicalNetwork
from imaging_meta.module import EpisodicModule

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def test_an_interrupted_save_leaves_the_previous_checkpoint_whole(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    target = tmp_path / "ckpts" / "last.ckpt"
    io.save_checkpoint({"step": 1, "w": torch.arange(4)}, target)
    before = target.read_bytes()

    def dies_midway(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise KeyboardInterrupt  # the job is killed while writing

    monkeypatch.setattr(torch, "save", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"step": 2, "w": torch.arange(8)}, target)
    assert target.read_bytes() == before
    assert [p.name for p in target.parent.iterdir()] == ["last.ckpt"], "no temporary file is left behind"
    assert torch.load(target, weights_only=True)["step"] == 1


def test_fit_writes_checkpoints_through_the_atomic_writer(tmp_path):
    cli = lightning_cli(["--config", str(CONFIGS / "trainer/cpu.yaml"), "--config", str(CONFIGS / "data/demo_classification.yaml"),
                         "--config", str(CONFIGS / "model/protonet_cls.yaml"), "--trainer.logger.init_args.save_dir",
                         str(tmp_path)], run=False)
    assert isinstance(cli.trainer.strategy.checkpoint_io, AtomicCheckpointIO)


def test_a_checkpoint_of_another_learner_is_refused_with_the_fix():
    module = EpisodicModule(PrototypicalNetwork(backbone="conv4", backbone_kwargs={"width": 4}), baselines=False)
    other = {"imaging_meta": {"learner_config": {"class_path": "imaging_meta.learners.gradient.maml.MAML", "init_args": {}}}}
    with pytest.raises(ValueError, match=r"holds the learner imaging_meta\.learners\.gradient\.maml\.MAML, .*use the checkpoint's model config \(configs/model/"):
        module.on_load_checkpoint(other)
    other["imaging_meta"]["task"] = "classification"
    with pytest.raises(ValueError) as e:
        module.on_load_checkpoint(other)
    assert "configs/model/maml_cls.yaml" in str(e.value) and "maml_seg" not in str(e.value)
    # only configs whose learner is the checkpoint's: a wrapper that holds it as its embedding would be refused too
    # (a review: finetune_cls.yaml and task_adaptive_cls.yaml were named for a ProtoNet checkpoint)
    from imaging_meta.commands.configs import model_configs_of

    assert model_configs_of("imaging_meta.learners.metric.protonet.PrototypicalNetwork", "classification") == [
        "configs/model/protonet_cls.yaml", "configs/model/protonet_resnet_cls.yaml"]
    wide = EpisodicModule(PrototypicalNetwork(backbone="conv4", backbone_kwargs={"width": 8}), baselines=False)
    same = {"imaging_meta": {"learner_config": module.learner.config}, "state_dict": wide.state_dict()}
    with pytest.raises(ValueError, match=r"weights do not fit the learner this run builds: learner\.encoder.* is \[8, 1, 3, 3\] "
                                         r"in the checkpoint and \[4, 1, 3, 3\] here"):
        module.on_load_checkpoint(same)
    # the same learner class with another backbone: other tensor names (it crashed in Lightning's strict load)
    resnet = EpisodicModule(PrototypicalNetwork(backbone="resnet", backbone_kwargs={"depth": 18}), baselines=False)
    other_arch = {"imaging_meta": {"learner_config": module.learner.config}, "state_dict": resnet.state_dict()}
    with pytest.raises(ValueError, match=r"weights do not fit the learner this run builds: \d+ tensor\(s\) of this learner "
                                         r"are not in the checkpoint \(e\.g\. learner\..*; \d+ tensor\(s\) of the checkpoint"):
        module.on_load_checkpoint(other_arch)


def test_a_checkpoint_of_another_task_is_named_before_the_split():
    """A classification checkpoint with a segmentation data config was blamed on the data's split and the salt."""
    module = EpisodicModule(PrototypicalNetwork(backbone="conv4", backbone_kwargs={"width": 4}), baselines=False)

    class Data:
        task = "segmentation"

    module._datamodule = lambda: Data()  # type: ignore[method-assign]
    ckpt = {"imaging_meta": {"learner_config": module.learner.config, "task": "classification"},
            "state_dict": module.state_dict()}
    with pytest.raises(ValueError, match="the checkpoint is a classification model and this run's data is segmentation data"):
        module.on_load_checkpoint(ckpt)


def test_a_pickled_object_in_a_checkpoint_is_never_executed(tmp_path):
    class Payload:
        def __reduce__(self):
            return (Path.write_text, (tmp_path / "pwned", "ran"))

    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "imaging_meta": {"learner_config": Payload()}}, path)
    with pytest.raises(CheckpointError, match=r"evil\.ckpt: holds Python objects besides tensors .* none of its code "
                                              r"ran\. Do not load a file of unknown source with weights_only=False "
                                              r"\(it names [\w.]+\)") as err:
        load_learner(path)
    assert not (tmp_path / "pwned").exists()
    assert "will likely succeed" not in str(err.value)  # torch's advice to load it with weights_only=False


def test_a_learner_built_with_other_settings_than_the_checkpoints_is_named_and_recorded(tmp_path):
    """`imaging-meta test --ckpt_path` builds the learner from the configs it is given: a checkpoint trained with
    ``distance: cosine`` was tested as Euclidean with the shipped config, silently. The difference is now warned
    about and recorded in the test report's context; the same settings say nothing."""
    import warnings

    from imaging_meta.learners.metric.protonet import PrototypicalNetwork
    from imaging_meta.module import EpisodicModule

    trained = PrototypicalNetwork(backbone_kwargs={"width": 4}, distance="cosine")
    module = EpisodicModule(PrototypicalNetwork(backbone_kwargs={"width": 4}), baselines=False)
    checkpoint = {"state_dict": module.state_dict(), "imaging_meta": {"learner_config": trained.config}}
    with pytest.warns(UserWarning, match=r"other settings than the checkpoint's: distance 'cosine' in the checkpoint, "
                                         r"'euclidean' here\. .*--config RUN/config\.yaml"):
        module.on_load_checkpoint(checkpoint)
    assert module.learner_changes == {"distance": ("cosine", "euclidean")}
    same = EpisodicModule(PrototypicalNetwork(backbone_kwargs={"width": 4}, distance="cosine"), baselines=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        same.on_load_checkpoint(checkpoint)
    assert same.learner_changes == {}


def test_3d_patches_with_a_2d_network_is_a_config_error_naming_the_fix():
    """A review: a lesion CSV with patch_size [D, H, W] and a shipped (2D) model config was an internal error."""
    from tests.imaging_meta.fewshot import classification_episode

    module = EpisodicModule(PrototypicalNetwork(backbone="conv4", backbone_kwargs={"width": 4}), baselines=False)
    ep = classification_episode(n_way=2, n_shot=1, n_query=1, tasks=1, size=8, seed=0)
    volume = ep.__class__(ep.support_images[..., None].expand(*ep.support_images.shape, 4), ep.support_labels,
                          ep.query_images[..., None].expand(*ep.query_images.shape, 4), ep.query_labels, batched=True)
    with pytest.raises(ValueError, match=r"the items are 3D .* network is 2D; .*spatial_dims: 3"):
        module._check_batch(volume)
    module._check_batch(ep)  # 2D items: fine


def test_a_damaged_checkpoint_is_not_called_hostile_and_gets_no_advice_to_unpickle_it(tmp_path):
    """torch says "Weights only load failed" for a damaged pickle too, and suggests weights_only=False."""
    import pickle

    path = tmp_path / "damaged.ckpt"
    path.write_bytes(pickle.dumps({"a": 1}, protocol=2)[:5] + b"\x00garbage" * 10)
    with pytest.raises(CheckpointError, match=r"damaged\.ckpt: not a readable imaging-meta checkpoint") as err:
        read_checkpoint(path)
    assert "weights_only" not in str(err.value) and "besides tensors" not in str(err.value)


def test_only_the_settings_fit_writes_pass_from_a_checkpoint():
    from imaging_meta.checkpoint_io import plain_hyperparameters

    ok = {"baselines": True, "threshold": 0.3, "n_log_images": 4, "weight_averaging": None, "_instantiator": "x"}
    assert plain_hyperparameters(ok, "c.ckpt") == {k: v for k, v in ok.items() if k != "_instantiator"}
    for bad in ({"lr_scheduler": "{class_path: os.system}"}, {"threshold": "0.5"}, {"n_log_images": True},
                {"learner": {"class_path": "x"}}, {"_class_path": "os.system"}):
        with pytest.raises(CheckpointError, match="c.ckpt: its hyper_parameters hold"):
            plain_hyperparameters({**ok, **bad}, "c.ckpt")


def test_data_preprocessed_unlike_the_checkpoints_is_named_and_recorded(tmp_path, monkeypatch):
    """`imaging-meta test --ckpt_path` with a data config of another spacing ran silently (a review): Dice 0.518
    at 2 mm for a model trained at 4.5 mm, with nothing in the report. The difference is now warned about and
    recorded in the report; the same preprocessing says nothing."""
    import types
    import warnings

    from imaging_meta.evaluation.reports import write_report
    from imaging_meta.module import preprocessing_changes

    trained = {"spacing": [4.5, 4.5], "slice_size": [80, 80], "ct_window": [-250, 250]}
    assert preprocessing_changes(trained, {**trained, "spacing": (4.5, 4.5), "new_setting": 1}) == {}
    assert preprocessing_changes(trained, {**trained, "spacing": [2.0, 2.0]}) == {"spacing": ([4.5, 4.5], [2.0, 2.0])}
    assert preprocessing_changes(None, trained) == {}
    # a setting only the checkpoint names (a modality set in training) is a change; NaN is NaN (a review)
    assert preprocessing_changes({**trained, "modality": "CT"}, trained) == {"modality": ("CT", None)}
    assert preprocessing_changes({"x": float("nan")}, {"x": float("nan")}) == {}
    module = EpisodicModule(PrototypicalNetwork(backbone_kwargs={"width": 4}), baselines=False)
    checkpoint = {"state_dict": module.state_dict(),
                  "imaging_meta": {"learner_config": module.learner.config, "preprocessing": trained}}
    for preprocessing, changed in (({**trained, "spacing": [2.0, 2.0]}, True), (dict(trained), False)):
        dm = types.SimpleNamespace(task="classification", preprocessing=preprocessing)
        monkeypatch.setattr(module, "_datamodule", lambda dm=dm: dm)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            module.on_load_checkpoint(checkpoint)
        said = [str(w.message) for w in caught if "preprocessed unlike the checkpoint's" in str(w.message)]
        assert bool(said) == changed and module.preprocessing_changes == (
            {"spacing": ([4.5, 4.5], [2.0, 2.0])} if changed else {})
        assert not changed or "spacing [4.5, 4.5] in the checkpoint, [2.0, 2.0] here" in said[0]
    context = {"preprocessing_not_the_checkpoints": {"spacing": {"checkpoint": [4.5, 4.5], "tested": [2.0, 2.0]}}}
    summary = {"trained": {"all": {"mean": 0.5, "ci95": 0.1, "n_episodes": 4}}}
    _, md = write_report(tmp_path, summary, context, ["trained"], task="classification")
    assert "- preprocessing_not_the_checkpoints: {'spacing': {'checkpoint': [4.5, 4.5], 'tested': [2.0, 2.0]}}" in md.read_text()


def _small_checkpoint(path: Path) -> Path:
    """A tiny checkpoint in the format of imaging-meta fit (learner config, weights, Lightning's version key)."""
    module = EpisodicModule(PrototypicalNetwork(backbone="conv4", backbone_kwargs={"width": 4}), baselines=False)
    ckpt = {"state_dict": module.state_dict(), "pytorch-lightning_version": "2.6.0"}
    module.on_save_checkpoint(ckpt)
    torch.save(ckpt, path)
    return path


def test_a_learner_this_version_cannot_build_is_named_with_the_file_and_versions(tmp_path):
    """A review: a checkpoint whose learner class is gone, or that records an argument this version lacks, ended
    in an internal error (ModuleNotFoundError, TypeError) that named neither the file nor the versions."""
    good = torch.load(_small_checkpoint(tmp_path / "good.ckpt"), weights_only=True)
    for name, change in (("gone", {"class_path": "imaging_meta.learners.metric.gone.Gone"}),
                         ("oldarg", {"init_args": {**good["imaging_meta"]["learner_config"]["init_args"], "removed_option": 1}})):
        ckpt = {**good, "imaging_meta": {**good["imaging_meta"],
                                         "learner_config": {**good["imaging_meta"]["learner_config"], **change}}}
        torch.save(ckpt, tmp_path / f"{name}.ckpt")
        with pytest.raises(CheckpointError, match=rf"{name}\.ckpt: its learner .* cannot be built by this version of "
                                                  r"imaging-meta \(.*; the checkpoint was written by .*\): .*retrain it"):
            load_learner(tmp_path / f"{name}.ckpt")


def test_a_checkpoint_changed_after_it_was_written_or_cut_short_is_called_damaged(tmp_path):
    """A review: torch's zip reader checks no CRC, so bytes changed inside a weight tensor loaded silently (a
    segmenter that found nothing); and a checkpoint cut short was called 'not a PyTorch checkpoint file'."""
    import zipfile

    path = _small_checkpoint(tmp_path / "m.ckpt")
    assert read_checkpoint(path)["state_dict"]
    with zipfile.ZipFile(path) as z:
        member = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)  # a tensor's bytes
    data = bytearray(path.read_bytes())
    name_len, extra_len = (int.from_bytes(data[member.header_offset + k : member.header_offset + k + 2], "little")
                           for k in (26, 28))  # the local header's own lengths (torch pads it to align the data)
    start = member.header_offset + 30 + name_len + extra_len
    data[start + 8 : start + 16] = b"\xff" * 8
    (tmp_path / "flipped.ckpt").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"flipped\.ckpt: damaged: .* does not match its checksum .*copy it again"):
        read_checkpoint(tmp_path / "flipped.ckpt")
    (tmp_path / "cut.ckpt").write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"cut\.ckpt: truncated or damaged .*copy it again"):
        read_checkpoint(tmp_path / "cut.ckpt")


def test_a_checkpoint_whose_weights_are_not_finite_is_refused_and_a_threshold_is_a_probability(tmp_path):
    """Reviews: a checkpoint of a diverged training (NaN weights) loaded, and `segment` wrote empty masks from it
    and exited 0; and ``--model.threshold 1.5`` was accepted, so every Dice was 0 and best.ckpt picked on zeros."""
    good = torch.load(_small_checkpoint(tmp_path / "good.ckpt"), weights_only=True)
    assert load_learner(tmp_path / "good.ckpt")[0] is not None
    name = next(k for k, v in good["state_dict"].items() if k.startswith("learner.") and v.is_floating_point())
    good["state_dict"][name] = good["state_dict"][name].clone().fill_(float("nan"))
    torch.save(good, tmp_path / "nan.ckpt")
    with pytest.raises(CheckpointError, match=r"nan\.ckpt: 1 weight tensor\(s\) hold NaN or infinite values .*diverged"):
        load_learner(tmp_path / "nan.ckpt")
    # one NaN or one infinite value is enough (the check was only ever tried on a whole NaN tensor)
    for bad in (float("nan"), float("inf")):
        one = torch.load(tmp_path / "good.ckpt", weights_only=True)
        one["state_dict"][name] = one["state_dict"][name].clone()
        one["state_dict"][name].view(-1)[0] = bad
        torch.save(one, tmp_path / "one.ckpt")
        with pytest.raises(CheckpointError, match=r"one\.ckpt: 1 weight tensor\(s\) hold NaN or infinite values"):
            load_learner(tmp_path / "one.ckpt")
    learner = PrototypicalNetwork(backbone="conv4", backbone_kwargs={"width": 4})
    for bad in (1.5, 1.0, -0.1, float("nan")):
        with pytest.raises(ValueError, match=r"threshold must be a foreground probability in \[0, 1\)"):
            EpisodicModule(learner, baselines=False, threshold=bad)
    assert EpisodicModule(learner, baselines=False, threshold=0.0).hparams["threshold"] == 0.0


def test_the_commits_that_trained_a_model_are_kept_in_order_from_the_fits_start(monkeypatch):
    """A review (2026-12-07): the commit that trained a model was recorded only when a checkpoint was saved, so a
    test of the model in memory (--test_after_fit without checkpoints) named none; a resume under other code adds
    its own after the checkpoint's."""
    import imaging_meta.module as module

    commits = iter(["aaa", "bbb"])
    monkeypatch.setattr(module, "provenance", lambda: {"git_commit": next(commits)})
    model = EpisodicModule(PrototypicalNetwork(backbone="conv4", in_channels=1, backbone_kwargs={"width": 4}))
    assert model.fit_commits == []
    model.on_fit_start()
    model.on_fit_start()  # a second fit in the same process: the same source
    assert model.fit_commits == ["aaa"]
    resumed = EpisodicModule(PrototypicalNetwork(backbone="conv4", in_channels=1, backbone_kwargs={"width": 4}))
    resumed._check_and_restore({"imaging_meta": {"fit_commits": ["aaa"]}})
    resumed.on_fit_start()
    assert resumed.fit_commits == ["aaa", "bbb"]


def test_a_checkpoint_missing_a_weight_is_refused_and_a_loaded_learner_is_in_eval_mode(tmp_path):
    """A learner loaded for segment, classify or evaluate has every weight of the checkpoint (a missing tensor would
    leave a random one) and predicts in eval mode (dropout off, BatchNorm on its running statistics)."""
    good = torch.load(_small_checkpoint(tmp_path / "good.ckpt"), weights_only=True)
    learner, _ = load_learner(tmp_path / "good.ckpt")
    assert not learner.training and not any(m.training for m in learner.modules())
    name = next(k for k in good["state_dict"] if k.startswith("learner."))
    del good["state_dict"][name]
    torch.save(good, tmp_path / "missing.ckpt")
    with pytest.raises(CheckpointError, match=r"(?s)missing\.ckpt: weights do not fit .*Missing key"):
        load_learner(tmp_path / "missing.ckpt")
