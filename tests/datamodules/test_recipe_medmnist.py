"""`datamodules.recipes.medmnist`: tiny npz files in MedMNIST's exact layout under official names, checked against the
vendored table (MD5, counts, shapes, labels), split by file, fixed test episodes drawn from the test split only,
and the written data config read end to end by the datamodule (one episode file per number of shots)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from datamodules.recipes import medmnist
from datamodules.recipes.medmnist import CONFIG_NAME, MEDMNIST_2D, file_md5, prepare_medmnist
from datamodules.recipes.prepare import PrepareError, main
from tests.helpers import interrupted_on_second_move

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
PER_CLASS = {"train": 3, "val": 2, "test": 8}  # images per class and split: 5-shot + 3 queries fit in the test split
SMALL = dict(shots=(1, 5), queries=3, episodes=6)
TEST_STEMS = ("bloodmnist", "dermamnist", "pathmnist")  # the default test files, in file-name order


def write_medmnist(path: Path, seed: int = 0) -> Path:
    """``path`` (an official name) in MedMNIST's layout: uint8 (N, 28, 28) grey or (N, 28, 28, 3) RGB images as
    the dataset has, int labels (N, 1) cycling through every class, N = classes x PER_CLASS[split]."""
    info = MEDMNIST_2D[path.name[: -len(".npz")]]
    rng = np.random.default_rng(seed + len(path.name))
    n_classes = len(info.classes)
    arrays = {}
    for split, per in PER_CLASS.items():
        n = n_classes * per
        shape = (n, 28, 28) if info.n_channels == 1 else (n, 28, 28, 3)
        arrays[f"{split}_images"] = rng.integers(0, 256, size=shape, dtype=np.uint8)
        arrays[f"{split}_labels"] = rng.permutation(np.arange(n) % n_classes).reshape(n, 1).astype(np.uint8)
    np.savez_compressed(path, **arrays)
    return path


@pytest.fixture
def folder(tmp_path) -> Path:
    """Test files (bloodmnist, pathmnist, dermamnist), the validation file (tissuemnist) and a training file."""
    root = tmp_path / "downloads"
    root.mkdir()
    for name in ("bloodmnist", "pathmnist", "dermamnist", "tissuemnist", "organamnist"):
        write_medmnist(root / f"{name}.npz")
    return root


def publish(monkeypatch, root: Path) -> None:
    """Make the tiny files the published ones: their MD5 and sample counts in the vendored table."""
    for path in root.glob("*.npz"):
        name = path.name[: -len(".npz")]
        info = MEDMNIST_2D[name]
        counts = {s: len(info.classes) * per for s, per in PER_CLASS.items()}
        monkeypatch.setitem(MEDMNIST_2D, name, dataclasses.replace(info, md5={**info.md5, 28: file_md5(path)},
                                                                     n_samples=counts))


def episodes_of(out: Path, shot: int) -> dict:
    return json.loads((out / "episodes" / f"test-5way-{shot}shot-3query.json").read_text())


# ------------------------------------------------------------------------------------------------ checks
def test_the_vendored_table_is_medmnists():
    assert len(MEDMNIST_2D) == 11 and "chestmnist" not in MEDMNIST_2D and not any("3d" in n for n in MEDMNIST_2D)
    blood = MEDMNIST_2D["bloodmnist"]
    assert blood.md5[28] == "7053d0359d879ad8a5505303e11de1dc" and blood.n_samples == {"train": 11959, "val": 1712, "test": 3421}
    assert blood.classes[0] == "basophil" and blood.n_channels == 3 and blood.licence == "CC BY 4.0"
    assert blood.url("bloodmnist", 64) == "https://zenodo.org/records/10519652/files/bloodmnist_64.npz?download=1"
    assert all(set(i.md5) == {28, 64, 128, 224} and all(len(m) == 32 for m in i.md5.values()) for i in MEDMNIST_2D.values())
    assert medmnist.recognise("pathmnist_64.npz") == ("pathmnist", 64)
    assert "multi-label" in medmnist.recognise("chestmnist.npz") and "3D" in medmnist.recognise("organmnist3d.npz")
    assert "not a MedMNIST size" in medmnist.recognise("pathmnist_32.npz")


def test_md5_mismatch_is_refused_naming_the_file_and_out_is_left_as_it_was(folder, tmp_path, monkeypatch):
    out = tmp_path / "prepared"
    with pytest.raises(PrepareError) as e:
        prepare_medmnist(folder, out, **SMALL)
    msg = str(e.value)
    assert msg.startswith("10 problem(s); nothing was prepared")  # every file's MD5 and counts, at once
    blood = folder / "bloodmnist.npz"
    assert f"{blood}: MD5 {file_md5(blood)}, but the published bloodmnist.npz (medmnist 3.0.2) has MD5 " \
           "7053d0359d879ad8a5505303e11de1dc" in msg
    assert "bloodmnist.npz?download=1" in msg and "--allow-unofficial" in msg
    assert all(f"{name}.npz: MD5" in msg for name in ("pathmnist", "dermamnist", "tissuemnist", "organamnist"))
    assert not out.exists() and not list(tmp_path.glob(".prepared*"))
    # an earlier output stays as it was
    with monkeypatch.context() as m:
        publish(m, folder)
        prepare_medmnist(folder, out, **SMALL)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(PrepareError, match="bloodmnist.npz: MD5"):
        prepare_medmnist(folder, out, **SMALL)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_a_refusal_names_the_files_it_skipped_too(folder, tmp_path):
    """A renamed download (``path.npz`` for ``pathmnist.npz``) was named as skipped only when the run succeeded."""
    import shutil

    shutil.copy(folder / "pathmnist.npz", folder / "path.npz")
    with pytest.raises(PrepareError) as e:
        prepare_medmnist(folder, tmp_path / "prepared", **SMALL)
    assert f"skipped (not read): {folder / 'path.npz'}" in str(e.value)


def test_allow_unofficial_proceeds_and_records_it(folder, tmp_path):
    summary = prepare_medmnist(folder, tmp_path / "out", allow_unofficial=True, **SMALL)
    assert [i["official"] for i in summary["inputs"]] == [False] * 5
    blood = next(i for i in summary["inputs"] if i["file"] == "bloodmnist.npz")
    assert blood["md5"] == file_md5(folder / "bloodmnist.npz") and blood["published_md5"] == MEDMNIST_2D["bloodmnist"].md5[28]
    assert any("bloodmnist.npz: MD5" in w and "allow_unofficial" in w for w in summary["warnings"])
    assert any("24 train, 16 val, 64 test images; the published bloodmnist.npz has 11959 train, 1712 val, 3421 test" in w for w in summary["warnings"])
    assert json.loads((tmp_path / "out" / "prepare.json").read_text())["arguments"]["allow_unofficial"] is True
    # the episode files say so too: their episode list (and its sha256) is the same as on the published files
    # every unofficial input, the training and validation files by their part (a review: only test files were)
    assert episodes_of(tmp_path / "out", 1)["meta"]["unofficial_files"] == [
        *TEST_STEMS, "organamnist (training)", "tissuemnist (validation)"]


def test_a_damaged_labels_member_is_named(folder, tmp_path):
    """A pickled (object) label array gave numpy's message alone, without the file."""
    with np.load(folder / "bloodmnist.npz") as f:
        arrays = dict(f)
    arrays["test_labels"] = arrays["test_labels"].astype(object)
    np.savez(folder / "bloodmnist.npz", **arrays)
    with pytest.raises(ValueError, match=r"bloodmnist\.npz: cannot read test_labels \(ValueError: Object arrays"):
        prepare_medmnist(folder, tmp_path / "out", allow_unofficial=True, **SMALL)


def test_published_files_pass_and_episodes_come_from_the_test_split_of_test_files(folder, tmp_path, monkeypatch):
    publish(monkeypatch, folder)
    out = tmp_path / "out"
    summary = prepare_medmnist(folder, out, **SMALL)
    assert all(i["official"] for i in summary["inputs"]) and not summary["warnings"]
    assert summary["split"] == {"train": ["organamnist"], "val": ["tissuemnist"], "test": list(TEST_STEMS)}
    test_classes = summary["classes"]["test"]
    assert len(test_classes) == 8 + 7 + 9 and "bloodmnist/basophil" in test_classes
    labels = {}
    for stem in TEST_STEMS:
        with np.load(folder / f"{stem}.npz") as f:
            labels[stem] = f["test_labels"][:, 0]
    for shot in (1, 5):
        payload = episodes_of(out, shot)
        assert payload["kind"] == "classification" and len(payload["episodes"]) == 6
        assert summary["episodes_sha256"][f"episodes/test-5way-{shot}shot-3query.json"] == payload["sha256"]
        for e in payload["episodes"]:
            assert len(set(e["classes"])) == 5 and set(e["classes"]) <= set(test_classes)
            assert len(e["support"]) == 5 * shot and len(e["query"]) == 5 * 3
            assert not set(e["support"]) & set(e["query"]) and len(set(e["support"] + e["query"])) == 5 * (shot + 3)
            for way, cls in enumerate(e["classes"]):  # way-major; every item of its way's class, from a test split
                stem, name = cls.split("/", 1)
                for item in e["support"][way * shot:(way + 1) * shot] + e["query"][way * 3:(way + 1) * 3]:
                    item_stem, split, index = item.split(":")
                    assert (item_stem, split) == (stem, "test")
                    assert MEDMNIST_2D[stem].classes[labels[stem][int(index)]] == name


def test_the_same_files_and_arguments_give_identical_episode_files(folder, tmp_path, monkeypatch):
    publish(monkeypatch, folder)
    a = prepare_medmnist(folder, tmp_path / "a", **SMALL)
    b = prepare_medmnist([folder / f"{n}.npz" for n in ("organamnist", "tissuemnist", *TEST_STEMS)], tmp_path / "b", **SMALL)
    for name in a["episodes"]:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert a["episodes_sha256"] == b["episodes_sha256"]
    # the test files named in another order (the docs' "defaults, spelled out" command): the same episodes
    typed = prepare_medmnist(folder, tmp_path / "typed", test_files=["pathmnist", "bloodmnist", "dermamnist"], **SMALL)
    assert typed["episodes_sha256"] == a["episodes_sha256"]
    other = prepare_medmnist(folder, tmp_path / "c", **{**SMALL, "seed": 1})
    assert other["episodes_sha256"] != a["episodes_sha256"]
    # preparing again into the same folder replaces it, episode files of other settings included
    prepare_medmnist(folder, tmp_path / "a", shots=(2,), queries=3, episodes=6)
    assert sorted(p.name for p in (tmp_path / "a" / "episodes").iterdir()) == ["test-5way-2shot-3query.json"]


# ------------------------------------------------------------------------------------------------ the datamodule
def test_the_written_config_builds_the_datamodule_for_each_number_of_shots(folder, tmp_path, monkeypatch):
    from imaging_meta.commands.cli import lightning_cli
    from imaging_meta.commands.evaluate import build_datamodule

    publish(monkeypatch, folder)
    out = tmp_path / "out"
    prepare_medmnist(folder, out, **SMALL)
    config = out / CONFIG_NAME
    init_args = yaml.safe_load(config.read_text())["data"]["init_args"]
    assert init_args["source"]["init_args"]["channels"] == 3 and init_args["source"]["init_args"]["image_size"] == [28, 28]
    assert init_args["test_episodes_file"] == str(out / "episodes" / "test-{n_way}way-{n_shot}shot-{n_query}query.json")
    assert "--model.learner.init_args.in_channels 3" in config.read_text()
    # fit's parse of the config as written (1-shot), with the model override the config's comment gives
    cli = lightning_cli(["--config", str(CONFIGS / "trainer/cpu.yaml"), "--config", str(config),
                         "--config", str(CONFIGS / "model/protonet_cls.yaml"), "--model.learner.init_args.in_channels", "3",
                         "--data.init_args.cache_dir", str(tmp_path / "cache"), "--data.init_args.num_workers", "0",
                         "--trainer.logger.init_args.save_dir", str(tmp_path / "runs")], run=False)
    shapes = {}
    for shot, dm in ((1, cli.datamodule), (5, None)):
        if dm is None:  # evaluate --shots: the same config, n_shot overridden
            dm = build_datamodule({"class_path": "datamodules.classification.ClassificationDataModule", "init_args": {
                **init_args, "cache_dir": str(tmp_path / "cache"), "num_workers": 0}}, {"n_shot": shot, "val_episodes": 0})
        dm.setup("test")
        assert dm.episode_files["test"] == out / "episodes" / f"test-5way-{shot}shot-3query.json"
        first = episodes_of(out, shot)["episodes"][0]
        batch = next(iter(dm.test_dataloader()))
        shapes[shot] = (tuple(batch.support_images.shape), tuple(batch.query_images.shape))
        assert batch.support_ids[0] == first["support"] and batch.classes[0] == first["classes"]
        assert dm.class_split["test"] == [c for s in TEST_STEMS for c in dm.class_split["test"] if c.startswith(s + "/")]
    assert shapes == {1: ((4, 5, 3, 28, 28), (4, 15, 3, 28, 28)), 5: ((4, 25, 3, 28, 28), (4, 15, 3, 28, 28))}
    # a test file replaced after prepare: its episodes describe other data (a review: evaluated without a word)
    write_medmnist(folder / "bloodmnist.npz", seed=9)
    dm = build_datamodule({"class_path": "datamodules.classification.ClassificationDataModule", "init_args": {
        **init_args, "cache_dir": str(tmp_path / "cache"), "num_workers": 0}}, {"n_shot": 1, "val_episodes": 0})
    with pytest.raises(ValueError, match=r"test-5way-1shot-3query\.json was prepared from other files than these: "
                                         r".*bloodmnist\.npz \(MD5 [0-9a-f]{32}; prepared with [0-9a-f]{32}\)"):
        dm.setup("test")


def test_an_episode_file_that_is_not_there_is_named(folder, tmp_path, monkeypatch):
    from datamodules.classification import ClassificationDataModule

    publish(monkeypatch, folder)
    out = tmp_path / "out"
    prepare_medmnist(folder, out, **SMALL)
    args = yaml.safe_load((out / CONFIG_NAME).read_text())["data"]["init_args"]
    args.update(cache_dir=None, n_shot=3, episodes_per_epoch=0, val_episodes=0)
    with pytest.raises(FileNotFoundError, match=r"test-5way-3shot-3query\.json \(.*with n_way=5, n_shot=3, n_query=3\) "
                                                r"does not exist"):
        ClassificationDataModule(**args).setup("test")
    args.update(n_shot=1, test_episodes_file=str(out / "episodes" / "test-{ways}way.json"))
    with pytest.raises(ValueError, match=r"bad placeholder \(KeyError: 'ways'\)"):
        ClassificationDataModule(**args).setup("test")


# ------------------------------------------------------------------------------------------------ bad inputs
def test_every_problem_of_files_and_split_is_reported_at_once(folder, tmp_path, monkeypatch):
    publish(monkeypatch, folder)
    (folder / "chestmnist.npz").write_bytes(b"")  # in a folder: skipped, with the reason
    (folder / "notes.npz").write_bytes(b"")
    summary = prepare_medmnist(folder, tmp_path / "ok", **SMALL)
    assert any("chestmnist.npz: chestmnist is multi-label" in s for s in summary["skipped"])
    bad = tmp_path / "bad"
    bad.mkdir()
    write_medmnist(bad / "octmnist.npz")
    with np.load(bad / "octmnist.npz") as f:
        arrays = dict(f)
    arrays["val_labels"][0, 0] = 4  # octmnist has 4 classes, 0-3
    np.savez(bad / "octmnist.npz", **arrays)
    np.savez(bad / "breastmnist.npz", **{**arrays, "train_images": arrays["train_images"][..., None].repeat(3, -1)})
    np.savez(bad / "pneumoniamnist.npz", **{k: v for k, v in arrays.items() if k != "test_labels"})
    files = [folder / "bloodmnist.npz", bad / "octmnist.npz", bad / "breastmnist.npz", bad / "pneumoniamnist.npz",
             tmp_path / "missing.npz", folder / "chestmnist.npz"]
    with pytest.raises(PrepareError) as e:
        prepare_medmnist(files, tmp_path / "out", test_files=["bloodmnist", "retinamnist"], val_files=["octmnist.npz"],
                         allow_unofficial=True, **SMALL)
    msg = str(e.value)
    for expected in (f"{bad / 'octmnist.npz'}: val_labels holds label 4; octmnist has 4 classes",
                     f"{bad / 'breastmnist.npz'}: train_images has shape (12, 28, 28, 3); breastmnist.npz holds 1-channel",
                     f"{bad / 'pneumoniamnist.npz'}: missing key(s) ['test_labels']",
                     f"{tmp_path / 'missing.npz'}: no such file or folder",
                     f"{folder / 'chestmnist.npz'}: chestmnist is multi-label",
                     "--test-files (test_files) names 'retinamnist', which is none of the files given"):
        assert expected in msg, (expected, msg)
    assert not (tmp_path / "out").exists()
    # the split: too few test classes for the ways, no training file, one file in two parts
    with pytest.raises(PrepareError, match=r"the test files \(bloodmnist.npz\) hold 8 classes, fewer than ways=9"):
        prepare_medmnist(folder, tmp_path / "out", test_files=["bloodmnist"], ways=9, **SMALL)
    with pytest.raises(PrepareError) as e:
        prepare_medmnist([folder / "bloodmnist.npz", folder / "tissuemnist.npz"], tmp_path / "out",
                         val_files=["tissuemnist", "bloodmnist"], **SMALL)
    assert "bloodmnist.npz is both a test and a validation file" in str(e.value) and "no training file" in str(e.value)
    with pytest.raises(PrepareError, match=r"9-shot episodes with 3 queries need 12 test-split images"):
        prepare_medmnist(folder, tmp_path / "out", shots=(1, 9), queries=3, episodes=2)


def test_the_command(folder, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["medmnist", str(folder), "--out", str(out), "--queries", "3", "--episodes", "2", "--shots", "1",
                 "--allow-unofficial"]) == 0
    printed = capsys.readouterr()
    assert "5 MedMNIST files prepared" in printed.out and "test bloodmnist, dermamnist, pathmnist" in printed.out
    assert "warning:" in printed.err and (out / "episodes" / "test-5way-1shot-3query.json").is_file()
    assert main(["medmnist", str(folder), "--out", str(tmp_path / "refused"), "--queries", "3"]) == 1
    assert "nothing was prepared" in capsys.readouterr().err and not (tmp_path / "refused").exists()
    assert main(["synapse", str(folder), "--shots", "1"]) == 2
    assert "--shots apply to medmnist only" in capsys.readouterr().err
    # options that cannot work whatever the data are a wrong command line (2); bad data above is 1
    assert main(["medmnist", str(folder), "--out", str(tmp_path / "zero"), "--shots", "0"]) == 2
    assert "must be positive" in capsys.readouterr().err and not (tmp_path / "zero").exists()


def test_a_first_run_stopped_while_installing_does_not_block_the_next(folder, tmp_path, monkeypatch):
    """prepare.json was written only at the end: a first run stopped while moving its files in left the config and
    some episode files without it, and every rerun refused the folder as not an earlier prepare output (a review)."""
    from datamodules.recipes import prepare as module

    publish(monkeypatch, folder)
    out = tmp_path / "out"
    # stopped at the second file (config or episodes) moved into the output folder
    with interrupted_on_second_move(module.os, lambda b: b.is_relative_to(out) and b.name != "prepare.json") as moved:
        with pytest.raises(KeyboardInterrupt):
            prepare_medmnist(folder, out, **SMALL)
    assert moved and json.loads((out / "prepare.json").read_text())["complete"] is False
    summary = prepare_medmnist(folder, out, **SMALL)  # the rerun replaces the partial output
    assert "complete" not in json.loads((out / "prepare.json").read_text())
    assert {f"episodes/{p.name}" for p in (out / "episodes").iterdir()} == set(summary["episodes"])


def test_the_organ_files_of_three_planes_are_never_split_across_parts(folder, tmp_path, monkeypatch):
    """A review: organamnist, organcmnist and organsmnist hold the same 11 organs in three planes; tested on one
    and trained on another, every "novel" test organ had been trained on. Refused; one part for all is fine."""
    write_medmnist(folder / "organcmnist.npz")
    publish(monkeypatch, folder)
    with pytest.raises(PrepareError, match=r"organamnist \(test\), organcmnist \(training\) hold the same 11 abdominal "
                                           r"organs in three planes"):
        prepare_medmnist(folder, tmp_path / "out", test_files=["organamnist", "bloodmnist"], **SMALL)
    prepare_medmnist(folder, tmp_path / "ok", **SMALL)  # both training files (the default split): accepted
