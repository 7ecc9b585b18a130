import json
from pathlib import Path

import pytest
import torch

from datamodules.base import EpisodicDataModule, digest
from datamodules.segmentation import SegmentationDataModule
from imaging_meta.episode import Episode
from tests.helpers import SMALL_DATA


@pytest.fixture(scope="module")
def dm(demo_root, demo_index, tmp_path_factory):
    _, index_path = demo_index
    dm = SegmentationDataModule(root=str(demo_root), index_path=str(index_path),
                                cache_dir=str(tmp_path_factory.mktemp("cache")), **SMALL_DATA)
    dm.setup("fit")
    return dm


def test_episodes_have_the_promised_shapes_and_content(dm):
    batch = next(iter(dm.train_dataloader()))
    assert isinstance(batch, Episode) and batch.batched
    assert batch.support_images.shape == (2, 1, 1, 32, 32)
    assert batch.query_labels.shape == (2, 1, 32, 32)
    assert set(torch.unique(batch.support_labels).tolist()) <= {0.0, 1.0}
    for t in range(2):
        assert batch.support_labels[t].sum() > 0 and batch.query_labels[t].sum() > 0
        assert batch.classes[t][0] in dm.split.train_organs
        assert not set(batch.support_ids[t]) & set(batch.query_ids[t])
    assert torch.isfinite(batch.support_images).all()


def test_cross_organ_setting_2_keeps_test_organs_out_of_training(dm):
    cases = dm.cases
    train_table = dm._tables["train"]
    assert set(train_table) == set(dm.split.train_organs)
    for organ, per_case in train_table.items():
        for ci, zs in per_case.items():
            lbl = dm._volumes[ci]["label"][0]
            for held in ("spleen", "kidney_left"):
                v = cases[ci].organs[held]
                assert not (lbl[..., zs] == v).any(), f"training slice of {organ} shows held-out {held}"
    val_batch = next(iter(dm.val_dataloader()))
    assert all(c[0] in ("spleen", "kidney_left") for c in val_batch.classes)


def test_fixed_episodes_are_saved_and_repeat(dm, demo_root, demo_index, tmp_path):
    a = [e.query_ids for e in dm.test_dataloader()]
    b = [e.query_ids for e in dm.test_dataloader()]
    assert a == b
    path = dm.episode_files["test"]
    payload = json.loads(path.read_text())
    assert payload["meta"]["preprocessing"]["slice_size"] == [32, 32]
    # a second data module reading that file tests on the very same episodes
    dm2 = SegmentationDataModule(root=str(demo_root), index_path=str(demo_index[1]), cache_dir=str(tmp_path),
                                 test_episodes_file=str(path), **SMALL_DATA)
    dm2.setup("test")
    assert [e.query_ids for e in dm2.test_dataloader()] == a
    desc = dm.describe()
    assert desc["protocol"] == "cross_organ" and desc["test_organs"] == ["spleen", "kidney_left"]


def test_sampler_feasibility_error_is_clear(demo_root, demo_index, tmp_path):
    kw = dict(SMALL_DATA, n_shot=10)
    dm = SegmentationDataModule(root=str(demo_root), index_path=str(demo_index[1]), cache_dir=str(tmp_path), **kw)
    with pytest.raises(ValueError, match="Lower n_shot or n_query"):
        dm.setup("fit")


def test_report_quotes_the_episode_files_hash(dm):
    desc = dm.describe()
    for stage in ("val", "test"):
        assert desc["episodes_sha256"][stage] == json.loads(dm.episode_files[stage].read_text())["sha256"]


def test_the_episodic_datamodule_contract(dm):
    """What the module and the commands may ask (`EpisodicDataModule`), on a set-up segmentation datamodule."""
    assert isinstance(dm, EpisodicDataModule) and dm.task == "segmentation"
    assert dm.n_way is None and dm.n_shot == SMALL_DATA["n_shot"] and not dm.label_free
    assert dm.preprocessing["slice_size"] == [32, 32]
    test = dm.fixed_episodes("test")
    assert len(test) == SMALL_DATA["test_episodes"] and test == dm.fixed_episodes("test")
    assert [e.query_ids for e in dm.test_dataloader()][0][0] == [dm.cases[c].case_id for c, _ in test[0].query]
    assert set(dm.episode_files) == {"val", "test"} and len(dm.split_digest()) == 16
    # config() rebuilds the same settings: the same episode files, no secret (the salt) stored
    cfg = dm.config()
    assert cfg["class_path"] == "datamodules.segmentation.SegmentationDataModule" and "salt" not in cfg["init_args"]
    rebuilt = SegmentationDataModule(**cfg["init_args"])
    assert rebuilt.episode_path("test") == dm.episode_files["test"]
    # the digest names cache folders and is stored in checkpoints as the split digest: it must never change
    assert digest({"train": ["c-1"], "protocol": "cross_organ", "p": Path("/x")}) == "8ae46709447b7216"
