"""`ClassificationDataModule` end to end: sources -> class split -> batched N-way K-shot Episodes."""

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from datamodules.base import EpisodicDataModule, digest
from datamodules.classification import ClassificationDataModule, ClassificationEpisodeDataset, split_classes
from datamodules.sampling.samplers_classification import ClassificationEpisodeSampler
from datamodules.sources.items import ItemSource, ItemTable
from datamodules.transforms.augment import RandItemAugment, RandItemAugmentd
from imaging_meta.episode import Episode
from tests.helpers import write_folder


class TableSource(ItemSource):
    """An in-memory source: ``n_classes`` classes, ``per_class`` items each, two items per patient, patients
    alternating between two sites (except class ``small``, which has ``small_count`` items)."""

    def __init__(self, n_classes: int = 9, per_class: int = 8, small: int = -1, small_count: int = 2) -> None:
        self.n_classes, self.per_class, self.small, self.small_count = n_classes, per_class, small, small_count

    def build(self) -> ItemTable:
        labels, patients, sites = [], [], []
        for c in range(self.n_classes):
            for k in range(self.small_count if c == self.small else self.per_class):
                labels.append(c)
                patients.append(f"p{c}-{k // 2}")
                sites.append(f"site{(k // 2) % 2}")
        g = torch.Generator().manual_seed(0)
        return ItemTable(images=torch.rand(len(labels), 1, 8, 8, generator=g), labels=np.array(labels),
                         classes=[f"c{c}" for c in range(self.n_classes)], patients=patients, sites=sites,
                         item_ids=[f"i{i}" for i in range(len(labels))], source={"format": "test"})


SMALL = dict(n_way=2, n_shot=1, n_query=2, val_classes_count=2, test_classes_count=2, episodes_per_epoch=6,
             val_episodes=4, test_episodes=5, batch_size=3, num_workers=0)


def test_image_folder_end_to_end_yields_batched_episodes(tmp_path):
    root = write_folder(tmp_path / "data", n_classes=5, per_class=4)
    source = {"class_path": "datamodules.sources.image_folder.ImageFolder", "init_args": {"root": str(root), "image_size": [16, 16]}}
    dm = ClassificationDataModule(source=source, cache_dir=str(tmp_path / "cache"), **SMALL)
    dm.prepare_data()
    dm.setup("fit")
    split = dm.class_split
    assert sorted(split["train"] + split["val"] + split["test"]) == ["class0", "class1", "class2", "class3", "class4", "ct_class"]
    batch = next(iter(dm.train_dataloader()))
    assert isinstance(batch, Episode) and batch.batched and batch.n_tasks == 3
    assert batch.support_images.shape == (3, 2, 1, 16, 16) and batch.query_images.shape == (3, 4, 1, 16, 16)
    assert batch.support_labels.dtype == torch.int64
    assert batch.support_labels.tolist() == [[0, 1]] * 3 and batch.query_labels.tolist() == [[0, 0, 1, 1]] * 3
    for t in range(3):
        assert set(batch.classes[t]) <= set(split["train"]) and len(set(batch.classes[t])) == 2
        assert not set(batch.support_ids[t]) & set(batch.query_ids[t])
        assert set(batch.meta[t]) == {"seed", "support_sites", "query_sites", "query_patients"}
        assert batch.site[t] == " + ".join(sorted(set(batch.meta[t]["query_sites"])))
    assert torch.isfinite(batch.support_images).all() and float(batch.query_images.max()) <= 1.0
    val = next(iter(dm.val_dataloader()))
    assert all(set(c) <= set(split["val"]) for c in val.classes)
    assert dm.preprocessing["image_size"] == [16, 16] and dm.preprocessing["channels"] == 1
    assert "root" not in dm.preprocessing and "salt" not in json.dumps(dm.preprocessing)
    desc = dm.describe()
    assert desc["format"] == "image_folder" and desc["chance"] == 0.5 and desc["n_way"] == 2
    assert set(desc["classes"]["test"]) == set(split["test"]) and all(v == 4 for v in desc["classes"]["test"].values())
    assert desc["episodes_sha256"]["test"] == json.loads(dm.episode_files["test"].read_text())["sha256"]


def test_the_episode_files_a_report_names_are_absolute(tmp_path, monkeypatch):
    """results.json names the episode files: a relative cache_dir (the shipped configs' .cache/imaging-meta) must
    not make them relative to the folder the run started in."""
    root = write_folder(tmp_path / "data", n_classes=5, per_class=4)
    monkeypatch.chdir(tmp_path)
    source = {"class_path": "datamodules.sources.image_folder.ImageFolder", "init_args": {"root": str(root), "image_size": [16, 16]}}
    dm = ClassificationDataModule(source=source, cache_dir="cache", **SMALL)
    dm.prepare_data()
    dm.setup("fit")
    named = dm.describe()["episode_files"]
    assert named and all(Path(p).is_absolute() and Path(p).is_file() for p in named.values())


def test_class_split_is_disjoint_and_seeded():
    classes = [f"c{i}" for i in range(12)]
    a = split_classes(classes, 3, 4, seed=0)
    assert a == split_classes(classes, 3, 4, seed=0) and a != split_classes(classes, 3, 4, seed=1)
    assert len(a["val"]) == 3 and len(a["test"]) == 4 and len(a["train"]) == 5
    assert sorted(a["train"] + a["val"] + a["test"]) == sorted(classes)
    fixed = split_classes(classes, 3, 4, seed=5, test=["c0", "c1"])
    assert fixed["test"] == ["c0", "c1"] and not {"c0", "c1"} & set(fixed["train"] + fixed["val"])
    with pytest.raises(ValueError, match="share"):
        split_classes(classes, 3, 4, 0, train=["c0", "c2"], test=["c0"])
    with pytest.raises(ValueError, match="does not have"):
        split_classes(classes, 3, 4, 0, val=["nope"])
    with pytest.raises(ValueError, match="test_classes_count=20"):
        split_classes(classes, 3, 20, 0)


def test_fixed_episodes_are_saved_reloaded_and_shared_by_settings(tmp_path):
    kw = dict(source=TableSource(), cache_dir=str(tmp_path / "cache"), **SMALL)
    dm = ClassificationDataModule(**kw)
    dm.setup("test")
    path = dm.episode_files["test"]
    assert path.name.startswith("test-2way-1shot-2query-seed0-standard-")
    a = [(e.support_ids, e.query_ids) for e in dm.test_dataloader()]
    assert a == [(e.support_ids, e.query_ids) for e in dm.test_dataloader()]
    # another run with the same settings reads the same file (even if the sampler were to change)
    payload = json.loads(path.read_text())
    dm2 = ClassificationDataModule(**kw)
    dm2.setup("test")
    assert dm2.episode_files["test"] == path
    assert [(e.support_ids, e.query_ids) for e in dm2.test_dataloader()] == a
    assert payload["meta"]["n_shot"] == 1 and payload["kind"] == "classification"
    # other settings, other file; an explicit file is used as given and checked against the episode shape
    dm3 = ClassificationDataModule(**{**kw, "n_shot": 2})
    dm3.setup("test")
    assert dm3.episode_files["test"] != path and "2shot" in dm3.episode_files["test"].name
    dm4 = ClassificationDataModule(**{**kw, "cache_dir": str(tmp_path / "other"), "test_episodes_file": str(path)})
    dm4.setup("test")
    assert [(e.support_ids, e.query_ids) for e in dm4.test_dataloader()] == a
    dm5 = ClassificationDataModule(**{**kw, "n_query": 3, "test_episodes_file": str(path)})
    with pytest.raises(ValueError, match=r"this run is 2-way 1-shot with 3 queries"):
        dm5.setup("test")
    # no cache dir: nothing written, the same episodes drawn
    dm6 = ClassificationDataModule(**{**kw, "cache_dir": None})
    dm6.setup("test")
    assert dm6.episode_files == {} and [(e.support_ids, e.query_ids) for e in dm6.test_dataloader()] == a


class RegroupedSource(TableSource):
    """`TableSource`'s items with other patients (4 items each instead of 2) or other sites: what a `patient_regex`
    added to an image folder, or other site fields, change while the items stay the same."""

    def __init__(self, patients: bool = True, sites: bool = False) -> None:
        super().__init__()
        self.regroup_patients, self.regroup_sites = patients, sites

    def build(self) -> ItemTable:
        t = super().build()
        if self.regroup_patients:
            t.patients = [f"{p.rsplit('-', 1)[0]}-{int(p.rsplit('-', 1)[1]) // 2}" for p in t.patients]
        if self.regroup_sites:
            t.sites = [f"site{i % 3}" for i in range(len(t.sites))]
        return t


def test_stale_episode_files_are_not_reused_when_patients_or_sites_change(tmp_path):
    """The episode file's key left out the patients and sites: a run that grouped the same images into other
    patients read the file drawn before, whose support and query now shared patients, without a word."""
    kw = dict(cache_dir=str(tmp_path / "cache"), **SMALL)
    before = ClassificationDataModule(source=TableSource(), **kw)
    before.setup("test")
    old = before.episode_files["test"]
    after = ClassificationDataModule(source=RegroupedSource(), **kw)
    after.setup("test")
    assert after.episode_files["test"] != old  # drawn again, for the new patients
    t = after.table
    for e in after._fixed_episodes("test"):
        assert not {t.patients[i] for i in e.support} & {t.patients[i] for i in e.query}
    with pytest.raises(ValueError, match="share patient.*under this run's patient grouping"):
        ClassificationDataModule(source=RegroupedSource(), **{**kw, "test_episodes_file": str(old)}).setup("test")
    within = {**kw, "protocol": "within_site", "cache_dir": str(tmp_path / "w")}
    drawn = ClassificationDataModule(source=TableSource(), **within)
    drawn.setup("test")
    with pytest.raises(ValueError, match="break protocol 'within_site'"):
        ClassificationDataModule(source=RegroupedSource(patients=False, sites=True),
                                 **{**within, "test_episodes_file": str(drawn.episode_files["test"])}).setup("test")


class RelabelledSource(TableSource):
    """`TableSource` with one item moved to another class under the same id (a lesion CSV row's class edited)."""

    def __init__(self, item: int = 0, to: int = 1) -> None:
        super().__init__()
        self.item, self.to = item, to

    def build(self) -> ItemTable:
        t = super().build()
        t.labels = t.labels.copy()
        t.labels[self.item] = self.to
        return t


def test_a_test_episode_file_whose_items_changed_class_is_refused(tmp_path):
    """A review: an item relabelled after the file was drawn (same id) was accepted, and its way had no support."""
    kw = dict(cache_dir=str(tmp_path / "cache"), **SMALL)
    drawn = ClassificationDataModule(source=TableSource(), **kw)
    drawn.setup("test")
    first = drawn._fixed_episodes("test")[0]
    moved, way_class = first.support[0], first.classes[0]
    to = next(c for c in range(9) if c not in first.classes)
    given = {**kw, "test_episodes_file": str(drawn.episode_files["test"])}
    ClassificationDataModule(source=TableSource(), **given).setup("test")  # unchanged data: accepted
    with pytest.raises(ValueError, match=f"way 0 is class 'c{way_class}', but its item i{moved} is now of class 'c{to}'"):
        ClassificationDataModule(source=RelabelledSource(moved, to), **given).setup("test")


def test_a_test_episode_file_with_a_class_or_an_item_twice_is_refused(tmp_path):
    """Two ways of one class put every item under one label, so any answer scored right; a query item twice
    counted twice. Both were accepted from a given file (a review)."""
    import hashlib

    kw = dict(cache_dir=str(tmp_path / "cache"), **SMALL)
    drawn = ClassificationDataModule(source=TableSource(), **kw)
    drawn.setup("test")
    payload = json.loads(drawn.episode_files["test"].read_text())
    e = payload["episodes"][0]
    twice_class = {**e, "classes": [e["classes"][0]] * 2, "support": [e["support"][0]] * 2, "query": e["query"][:2] * 2}
    twice_item = {**e, "query": [e["query"][0], e["query"][0], *e["query"][2:]]}
    for name, episode, what in (("class", twice_class, "a class in two of its ways"), ("item", twice_item, "an item twice")):
        episodes = [episode] * len(payload["episodes"])
        edited = {**payload, "episodes": episodes,
                  "sha256": hashlib.sha256(json.dumps(episodes, sort_keys=True).encode()).hexdigest()}
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(edited))
        with pytest.raises(ValueError, match=f"{name}.json: an episode has {what}"):
            ClassificationDataModule(source=TableSource(), **{**kw, "test_episodes_file": str(path)}).setup("test")


class OpaqueSource(TableSource):
    """A source that keeps no attribute named like its argument, so it cannot describe its own config."""

    def __init__(self, table_seed: int) -> None:
        super().__init__()


def test_the_episodic_datamodule_contract(tmp_path, caplog):
    """What the module and the commands may ask (`EpisodicDataModule`), on a set-up classification datamodule."""
    dm = ClassificationDataModule(source=TableSource(), cache_dir=str(tmp_path / "cache"), **{**SMALL, "val_episodes": 0})
    dm.setup("fit")
    assert isinstance(dm, EpisodicDataModule) and dm.task == "classification" and dm.describe()["task"] == dm.task
    assert dm.n_way == 2 and dm.n_shot == 1 and not dm.label_free
    test = dm.fixed_episodes("test")
    assert len(test) == SMALL["test_episodes"] and set(dm.episode_files) == {"test"}
    with pytest.raises(ValueError, match="no val episodes: the class split has no val classes or val_episodes is 0"):
        dm.fixed_episodes("val")
    # config() rebuilds the datamodule, its source included: the same split, the same episodes
    cfg = dm.config()
    assert cfg["class_path"] == "datamodules.classification.ClassificationDataModule"
    assert cfg["init_args"]["source"] == {"class_path": f"{__name__}.TableSource",
                                          "init_args": {"n_classes": 9, "per_class": 8, "small": -1, "small_count": 2}}
    rebuilt = ClassificationDataModule(**cfg["init_args"])
    rebuilt.setup("test")
    assert rebuilt.split_digest() == dm.split_digest() and rebuilt.fixed_episodes("test") == test
    # a source that cannot describe itself is left out, with a warning (evaluate then asks for --data-config)
    opaque = ClassificationDataModule(source=OpaqueSource(0), cache_dir=None, **SMALL)
    with caplog.at_level("WARNING", logger="datamodules.classification"):
        assert "source" not in opaque.config()["init_args"]
    assert "will not record the data source" in caplog.text


def test_small_classes_are_dropped_with_a_warning_or_fail_clearly(tmp_path):
    src = TableSource(small=4, small_count=2)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        dm = ClassificationDataModule(source=src, cache_dir=None, train_classes=["c0", "c1", "c2", "c4"],
                                      val_classes=["c5", "c6"], test_classes=["c7", "c8"], **{**SMALL, "val_classes_count": 0})
        dm.setup()
    msgs = [str(w.message) for w in rec if "dropping" in str(w.message)]
    assert len(msgs) == 1 and "train: dropping 1 class" in msgs[0] and "'c4' has 2 item(s) from 1 patient(s)" in msgs[0]
    assert dm.describe()["dropped_classes"] == {"train": {"c4": "'c4' has 2 item(s) from 1 patient(s)"}}
    assert "c4" not in dm.describe()["classes"]["train"]
    dm = ClassificationDataModule(source=src, cache_dir=None, test_classes=["c4", "c8"], **SMALL)
    with pytest.warns(UserWarning, match="test: dropping"), pytest.raises(ValueError, match=r"test: 1 usable class\(es\) \(c8\) of 2, but n_way=2"):
        dm.setup()


def test_support_query_sites_differ_protocol_episodes_cross_sites(tmp_path):
    dm = ClassificationDataModule(source=TableSource(), cache_dir=str(tmp_path), protocol="support_query_sites_differ",
                                  **SMALL)
    dm.setup()
    assert "support_query_sites_differ" in dm.episode_files["val"].name
    for loader in (dm.train_dataloader(), dm.test_dataloader()):
        for batch in loader:
            for t in range(batch.n_tasks):
                s, q = set(batch.meta[t]["support_sites"]), set(batch.meta[t]["query_sites"])
                assert len(s) == 1 and len(q) == 1 and s != q and batch.site[t] == q.pop()
    with pytest.raises(ValueError, match="protocol 'nope'"):
        ClassificationDataModule(source=TableSource(), protocol="nope")


def test_old_cross_site_name_is_accepted_with_a_deprecation_warning(tmp_path):
    # classification's `cross_site` held no site out of training (segmentation's does): it was renamed. The old
    # name, in configs and checkpoints, still works, is stored under the new name and keeps the old split digest
    with pytest.warns(DeprecationWarning, match="'cross_site' is now called 'support_query_sites_differ'") as rec:
        old = ClassificationDataModule(source=TableSource(), cache_dir=str(tmp_path), protocol="cross_site", **SMALL)
    assert rec[0].filename == __file__  # the warning points at the caller
    new = ClassificationDataModule(source=TableSource(), cache_dir=str(tmp_path), protocol="support_query_sites_differ",
                                   **SMALL)
    assert old.hparams.protocol == "support_query_sites_differ" == old.config()["init_args"]["protocol"]
    old.setup()
    new.setup()
    assert old.split_digest() == new.split_digest() == digest({"classes": {k: sorted(v) for k, v in new.class_split.items()},
                                                                 "protocol": "cross_site"})
    assert old.episode_files["test"] == new.episode_files["test"]


def test_augmentation_is_seeded_per_episode_and_changes_pixels():
    table = TableSource().build()
    spec = ClassificationEpisodeSampler(table.labels, table.patients, table.sites, n_way=3, n_shot=2, n_query=2,
                                        n_episodes=1).fixed_episodes()[0]
    dm = ClassificationDataModule(source=TableSource(), cache_dir=None, **SMALL)
    dm.setup()
    aug = dm.train_dataloader().dataset.augment
    assert aug is not None
    plain = ClassificationEpisodeDataset(table)[spec]
    a = ClassificationEpisodeDataset(table, aug)[spec]
    b = ClassificationEpisodeDataset(table, aug)[spec]
    assert torch.equal(a.support_images, b.support_images) and torch.equal(a.query_images, b.query_images)
    assert not torch.equal(a.support_images, plain.support_images)
    assert torch.equal(plain.support_images, table.images[list(spec.support)])
    assert a.support_labels.tolist() == [0, 0, 1, 1, 2, 2] and a.classes == [table.classes[c] for c in spec.classes]
    with pytest.raises(TypeError, match="ClassificationEpisodeSpec"):
        ClassificationEpisodeDataset(table)[0]


def test_item_augmentation_components_and_dictionary_twin():
    x = torch.rand(6, 1, 12, 10, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(RandItemAugment(prob=0.0, flip_prob=0.0)(x), x, atol=1e-6)  # identity draw
    flipped = RandItemAugment(prob=0.0, flip_prob=1.0)(x)
    assert torch.allclose(flipped, x.flip(-1).flip(-2), atol=1e-6)
    # a pure 180-degree rotation is the double flip
    rot = RandItemAugment(rotate_degrees=180.0, scale=0.0, translate=0.0, flip_prob=0.0, gamma=(1, 1), intensity_scale=0.0,
                          noise_std=0.0, prob=1.0)
    p = rot.randomize(x.shape)
    p["theta"][:] = np.array([[-1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])
    assert torch.allclose(RandItemAugment.geometric(x, p), x.flip(-1).flip(-2), atol=1e-5)
    a, b = RandItemAugment(), RandItemAugment()
    a.set_random_state(3)
    b.set_random_state(3)
    ya, yb = a(x), b(x)
    assert torch.equal(ya, yb) and not torch.equal(ya[0], ya[1]) and float(ya.min()) >= 0 and float(ya.max()) <= 1
    x3 = torch.rand(2, 1, 6, 8, 8)
    assert RandItemAugment()(x3).shape == (2, 1, 6, 8, 8)
    # the dictionary twin applies one geometric draw to image and mask alike, intensity to the image only
    mask = (x > 0.5).float()
    d = RandItemAugmentd(["image", "label"], mode=["bilinear", "nearest"], prob=1.0, flip_prob=0.0, gamma=(1, 1),
                         intensity_scale=0.0, noise_std=0.0)
    d.set_random_state(4)
    out = d({"image": mask.clone(), "label": mask})
    assert set(out["label"].unique().tolist()) <= {0.0, 1.0}
    agree = ((out["image"] > 0.5) == (out["label"] > 0.5)).float().mean()
    assert agree > 0.9 and not torch.equal(out["label"], mask)


def test_too_few_classes_for_disjoint_stages_says_how_many_are_needed(tmp_path):
    """Five classes cannot give three stages of 5-way episodes. The errors used to point from one setting to the
    next (val_classes_count, then 'no training classes', then 'no val episodes'); now one message says how many
    classes the stages need and what to do (found by a review, 2026-12-05)."""
    root = write_folder(tmp_path / "data", n_classes=5, per_class=4, dicom_class=False)
    source = {"class_path": "datamodules.sources.image_folder.ImageFolder", "init_args": {"root": str(root), "image_size": [16, 16]}}
    dm = ClassificationDataModule(source=source, cache_dir=str(tmp_path / "cache"), n_way=5, n_shot=1, n_query=1,
                                  val_classes_count=5, test_classes_count=5)
    with pytest.raises(ValueError, match=r"5 class\(es\), but .* \(train, val, test\) .* 15 classes are needed.*imaging-meta classify"):
        dm.setup()
    two = ClassificationDataModule(source=source, cache_dir=str(tmp_path / "cache"), n_way=2, n_shot=1, n_query=1,
                                   val_classes_count=0, test_classes_count=2)
    two.setup()  # 2-way train and test from five classes; no validation classes, so no validation (as before)
    assert len(two.class_split["test"]) == 2 and len(two.class_split["train"]) == 3


def test_test_patients_with_images_in_training_classes_are_warned_about(tmp_path):
    """The class split leaves a patient's images of a test class and of a training class in two splits: said,
    with the count (a review, 2026-12-06); patients of one class each are not."""

    class SharedPatients(TableSource):
        def build(self) -> ItemTable:
            table = super().build()
            table.patients = [f"p-{k % 4}" for k in range(len(table.labels))]  # four patients across all classes
            return table

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        ClassificationDataModule(source=TableSource(), cache_dir=str(tmp_path / "a"), **SMALL).setup("fit")
    assert not [w for w in seen if "test patients also have images" in str(w.message)]
    with pytest.warns(UserWarning, match=r"4 of 4 test patients also have images in the training classes"):
        ClassificationDataModule(source=SharedPatients(), cache_dir=str(tmp_path / "b"), **SMALL).setup("fit")


def test_fewer_fixed_episodes_than_processes_is_refused_naming_the_setting(tmp_path, monkeypatch):
    """A rank numbered at or above the episode count got an empty loader, which Lightning refused on that rank
    alone: an "internal error" there and "another process failed" on the others (a review). Now every rank refuses
    it at once, naming the setting; with enough episodes the ranks share them out."""
    import datamodules.base as base

    root = write_folder(tmp_path / "data", n_classes=5, per_class=4)
    source = {"class_path": "datamodules.sources.image_folder.ImageFolder", "init_args": {"root": str(root), "image_size": [16, 16]}}
    dm = ClassificationDataModule(source=source, cache_dir=str(tmp_path / "cache"), **{**SMALL, "test_episodes": 1})
    dm.prepare_data()
    dm.setup("test")
    for rank in (0, 1):
        monkeypatch.setattr(base, "dist_rank_world", lambda rank=rank: (rank, 2))
        with pytest.raises(ValueError, match=r"test: 1 episode\(s\) for 2 processes.*test_episodes"):
            dm.test_dataloader()
    monkeypatch.setattr(base, "dist_rank_world", lambda: (1, 2))
    dm = ClassificationDataModule(source=source, cache_dir=str(tmp_path / "cache"), **{**SMALL, "test_episodes": 3})
    dm.prepare_data()
    dm.setup("test")
    assert sum(len(b.classes) for b in dm.test_dataloader()) == 1  # rank 1 of 2: the second of three episodes


class SharedPatientsSource(ItemSource):
    """Three classes of two items each whose patients interlock (p1: a, c; p2: a, b; p3: b, c): each class alone
    has a support and a query patient, but no 3-way episode keeps every query patient out of every support."""

    def build(self) -> ItemTable:
        patients = ["p1", "p2", "p2", "p3", "p1", "p3"]
        return ItemTable(images=torch.rand(6, 1, 8, 8, generator=torch.Generator().manual_seed(0)),
                         labels=np.array([0, 0, 1, 1, 2, 2]), classes=["a", "b", "c"], patients=patients,
                         sites=["s"] * 6, item_ids=[f"i{i}" for i in range(6)], source={"format": "test"})


def test_an_impossible_n_way_episode_fails_at_setup_naming_the_stage_and_n_way(tmp_path):
    """A review (2026-12-07): the sampler's error advised only lower n_shot or n_query (both already 1), named no
    stage, and for training came at the first batch. It now comes at setup, names the stage, its classes and the
    setting that sets them, and says to lower n_way."""
    dm = ClassificationDataModule(source=SharedPatientsSource(), cache_dir=str(tmp_path), n_way=3, n_shot=1, n_query=1,
                                  val_classes_count=0, test_classes_count=0, val_episodes=0, test_episodes=0,
                                  episodes_per_epoch=4, batch_size=2, num_workers=0)
    with pytest.raises(ValueError) as err:
        dm.setup("fit")
    message = str(err.value)
    assert message.startswith("train classes (a, b, c): no patient-disjoint 3-way episode"), message
    assert "Lower n_way" in message and "set by train_classes" in message


def test_too_few_test_episodes_for_the_processes_are_refused_at_setup_under_test_after_fit(tmp_path, monkeypatch):
    """A review (2026-12-07): with ``fit --test_after_fit`` and fewer test episodes than processes, the whole fit ran
    and then the test was refused. The CLI marks the datamodule, and setup refuses it before any training."""
    monkeypatch.setattr("datamodules.base.dist_rank_world", lambda: (0, 2))  # rank 0 of 2
    few = {**SMALL, "test_episodes": 1}
    ClassificationDataModule(source=TableSource(), cache_dir=str(tmp_path), **few).setup()  # a plain fit: as before
    dm = ClassificationDataModule(source=TableSource(), cache_dir=str(tmp_path), **few)
    dm.test_after_fit = True
    with pytest.raises(ValueError, match=r"test: 1 episode\(s\) for 2 processes; every process scores at least one"):
        dm.setup()


def test_a_trainer_with_lightnings_distributed_sampler_is_refused_by_every_loader(tmp_path):
    """A review (2026-12-07): a Trainer built by hand for 2 processes keeps Lightning's default
    ``use_distributed_sampler=True``, which split each rank's episodes again: a test scored 3 of its 5 episodes and
    each rank trained half its steps, in silence. Every loader now refuses it, naming the setting; one process, or
    the setting off, is as before."""
    from lightning.pytorch import Trainer

    dm = ClassificationDataModule(source=TableSource(), cache_dir=str(tmp_path), **SMALL)
    dm.setup()
    dm.trainer = Trainer(accelerator="cpu", devices=2, strategy="ddp", logger=False, enable_progress_bar=False)
    for loader in (dm.train_dataloader, dm.val_dataloader, dm.test_dataloader):
        with pytest.raises(ValueError, match=r"2 processes with use_distributed_sampler=True.*use_distributed_sampler=False"):
            loader()
    for trainer in (Trainer(accelerator="cpu", devices=2, strategy="ddp", use_distributed_sampler=False, logger=False),
                    Trainer(accelerator="cpu", devices=1, logger=False)):
        dm.trainer = trainer
        assert next(iter(dm.test_dataloader())) is not None


def test_a_cached_episode_file_is_read_back_keyed_by_the_stage_classes_and_refused_for_other_classes(tmp_path,
                                                                                                    monkeypatch):
    """Mutations a review found no test caught: a cached file redrawn instead of read (the sampler draws the same
    episodes, so reading it back looked the same); the stage's classes left out of the file's key (other test
    classes then refused the cached file instead of drawing their own); a given file whose episodes use other
    classes than this run's test classes accepted; each episode's query patients taken from the support."""
    from datamodules.sampling.samplers_classification import ClassificationEpisodeSampler

    kw = dict(source=TableSource(), cache_dir=str(tmp_path / "cache"), **{**SMALL, "val_classes": ["c0", "c1"]})
    first = ClassificationDataModule(**{**kw, "test_classes": ["c2", "c3"]})
    first.setup("test")
    episodes = [(e.support_ids, e.query_ids) for e in first.test_dataloader()]
    batch = next(iter(first.test_dataloader()))
    patient = dict(zip(first.table.item_ids, first.table.patients, strict=True))
    for t in range(batch.n_tasks):
        assert batch.meta[t]["query_patients"] == [patient[i] for i in batch.query_ids[t]]

    def never(self, *args, **kwargs):
        raise AssertionError("the cached episodes were drawn again, not read")

    monkeypatch.setattr(ClassificationEpisodeSampler, "fixed_episodes", never)
    again = ClassificationDataModule(**{**kw, "test_classes": ["c2", "c3"]})
    again.setup("test")  # reads the cached file
    assert [(e.support_ids, e.query_ids) for e in again.test_dataloader()] == episodes
    monkeypatch.undo()
    other = ClassificationDataModule(**{**kw, "test_classes": ["c4", "c5"]})
    other.setup("test")  # its own file, drawn for its classes
    assert other.episode_files["test"] != first.episode_files["test"]
    given = ClassificationDataModule(**{**kw, "test_classes": ["c4", "c5"],
                                        "test_episodes_file": str(first.episode_files["test"])})
    with pytest.raises(ValueError, match="episodes use classes outside this run's test classes"):
        given.setup("test")
