import hashlib
import json
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from datamodules.base import EpisodicDataModule, digest
from datamodules.indexing.index import Case
from datamodules.indexing.scan import DEFAULT_PATIENT_REGEX
from datamodules.indexing.splits import make_split
from datamodules.sampling.episode_files import check_segmentation_episodes
from datamodules.sampling.samplers_segmentation import SegmentationEpisodeSpec
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
            for held in ("spleen", "kidney_left", *dm.split.val_organs):
                v = cases[ci].organs[held]
                assert not (lbl[..., zs] == v).any(), f"training slice of {organ} shows held-out {held}"
    val_batch = next(iter(dm.val_dataloader()))
    assert all(c[0] in dm.split.val_organs for c in val_batch.classes)


def test_validation_organs_are_neither_test_nor_training_organs(dm):
    """Checkpoint selection (validation Dice) never sees the organs the model is tested on."""
    s = dm.split
    assert s.val_organs and not set(s.val_organs) & set(s.test_organs) and not set(s.val_organs) & set(s.train_organs)
    assert dm.hparams.val_organ_count == 1 and len(s.val_organs) == 1
    assert {c[0] for e in dm.val_dataloader() for c in e.classes} <= set(s.val_organs)
    desc = dm.describe()
    assert (desc["train_organs"], desc["val_organs"], desc["test_organs"]) == (s.train_organs, s.val_organs, s.test_organs)
    with pytest.raises(ValueError, match="name the test organ"):
        SegmentationDataModule(root=str(dm.root), index_path=str(dm.index_path), cache_dir=str(dm.cache_dir),
                               **{**SMALL_DATA, "val_organs": ["spleen"]}).setup("fit")


def test_old_checkpoints_keep_validating_on_the_test_organs(demo_root, demo_index, tmp_path, legacy_checkpoints):
    """A checkpoint whose data settings predate ``val_organ_count`` is read back with 0, which rebuilds its split."""
    from imaging_meta.checkpoint_io import read_checkpoint

    ckpt = read_checkpoint(legacy_checkpoints["protonet_seg"])
    args = ckpt["imaging_meta"]["data"]["init_args"]
    assert args["val_organ_count"] == 0
    old = SegmentationDataModule(**{**args, "root": str(demo_root), "index_path": str(demo_index[1]),
                                    "cache_dir": str(tmp_path), "val_episodes": 0})
    old.setup("test")
    assert old.split.val_organs == old.split.test_organs == ["spleen", "kidney_left"]
    assert old.split_digest() == ckpt["imaging_meta"]["split_digest"]
    old.setup("fit")
    assert old.val_dataloader() == []  # val_episodes 0: fit runs without validation (it raised "no val episodes")


def _edited_file(path: Path, out: Path, edit) -> Path:
    """A copy of the episode file ``path`` with ``edit`` applied to its first episode, sha256 recomputed."""
    payload = json.loads(path.read_text())
    edit(payload["episodes"][0])
    payload["sha256"] = hashlib.sha256(json.dumps(payload["episodes"], sort_keys=True).encode()).hexdigest()
    out.write_text(json.dumps(payload))
    return out


def test_a_test_episode_file_must_keep_the_split(dm, demo_root, demo_index, tmp_path):
    source = dm.episode_files["test"]
    train_case = dm.cases[dm.split.train[0]]
    bad_patient = _edited_file(source, tmp_path / "patient.json",
                               lambda e: e["support"].__setitem__(0, [train_case.case_id, e["support"][0][1]]))
    bad_organ = _edited_file(source, tmp_path / "organ.json", lambda e: e.update(organ=dm.split.train_organs[0]))
    val_organ = _edited_file(source, tmp_path / "val_organ.json", lambda e: e.update(organ=dm.split.val_organs[0]))
    # a label map edited after the file was drawn: episode 0's query slice no longer shows its organ (a review
    # found such a file accepted, its query mask empty)
    first = json.loads(Path(source).read_text())["episodes"][0]
    q_id, _ = first["query"][0]
    q_index = next(i for i, c in enumerate(dm.cases) if c.case_id == q_id)
    shown = set(dm._tables["test"][first["organ"]][q_index])
    empty_z = next(z for z in range(1000) if z not in shown)
    stale = _edited_file(source, tmp_path / "stale.json", lambda e: e["query"].__setitem__(0, [q_id, empty_z]))
    for path, what in ((bad_patient, f"belongs to training patient {train_case.patient}"),
                       (bad_organ, f"organ '{dm.split.train_organs[0]}' is a training organ"),
                       (val_organ, "is a validation organ"),
                       (stale, f"slice {empty_z} of case {q_id} no longer shows '{first['organ']}'")):
        other = SegmentationDataModule(root=str(demo_root), index_path=str(demo_index[1]), cache_dir=str(tmp_path),
                                       test_episodes_file=str(path), **{**SMALL_DATA, "cache": "disk"})
        with pytest.raises(ValueError, match=f"{re.escape(str(path))}: episode 0: .*{re.escape(what)}"):
            other.setup("test")


def test_case_items_read_each_cases_image_and_its_label_map():
    """The volumes' data dicts: the image from the case's image, the label from its label map (an image given as
    its own label map trained on the label maps, and no test noticed: a review, 2026-12-08)."""
    from datamodules.indexing.index import Index
    from datamodules.sampling.slices import case_items

    index = Index(root="/data")
    cases = [Case(case_id="c0", patient="p0", site="s", modality="MR", image="p0/t2.nii.gz", image_format="nifti",
                  label="p0/t2_label.nii.gz", organs={"liver": 1}),
             Case(case_id="c1", patient="p1", site="s", modality="CT", image="p1/ct.nii.gz", image_format="nifti")]
    assert case_items(index, cases) == [
        {"image": index.resolve("p0/t2.nii.gz"), "label": index.resolve("p0/t2_label.nii.gz"), "modality": "MR",
         "case_id": "c0"},
        {"image": index.resolve("p1/ct.nii.gz"), "modality": "CT", "case_id": "c1"}]
    assert case_items(index, cases)[0]["image"].endswith("t2.nii.gz")


def test_a_cross_site_episode_file_must_stay_on_the_test_sites(tmp_path):
    """The check itself, on case records: every slice from a test site, each episode shaped as the run."""
    cases = [Case(case_id=f"c{s}{p}", patient=f"p{s}-{p}", site=f"site{s}", modality="CT", image="x",
                  image_format="nifti", label="y", organs={"liver": 1, "spleen": 2}) for s in range(3) for p in range(6)]
    split = make_split(cases, "cross_site", test_sites=["site2"])
    test, train = split.test, split.train
    ok = SegmentationEpisodeSpec(organ="liver", support=((test[0], 3),), query=((test[1], 4),), seed=0)
    check_segmentation_episodes(tmp_path / "f.json", [ok], cases, split, n_shot=1, n_query=1)
    away = SegmentationEpisodeSpec(organ="liver", support=((test[0], 3),), query=((train[0], 4),), seed=1)
    with pytest.raises(ValueError, match=f"f.json: episode 1: case {cases[train[0]].case_id} is from site 'site0', not a test site"):
        check_segmentation_episodes(tmp_path / "f.json", [ok, away], cases, split, n_shot=1, n_query=1)
    with pytest.raises(ValueError, match="episode 0: 1 support and 1 query slices; this run is 2-shot"):
        check_segmentation_episodes(tmp_path / "f.json", [ok], cases, split, n_shot=2, n_query=1)


def test_an_episode_file_whose_support_and_query_share_a_patient_is_refused(tmp_path):
    """As the sampler draws them: every shot its own patient, no query of a support patient. A file that broke
    this was accepted (a review): its query was a slice of the support's own scan."""
    cases = [Case(case_id=f"c{p}", patient=f"p{p}", site="s", modality="CT", image="x", image_format="nifti",
                  label="y", organs={"liver": 1, "spleen": 2}) for p in range(12)]
    cases.append(Case(case_id="c-second", patient="p0", site="s", modality="CT", image="z", image_format="nifti",
                      label="w", organs={"liver": 1, "spleen": 2}))  # a second scan of patient p0
    split = make_split(cases, "in_domain", seed=0)
    test = split.test
    ok = SegmentationEpisodeSpec(organ="liver", support=((test[0], 3),), query=((test[1], 4),), seed=0)
    check_segmentation_episodes(tmp_path / "f.json", [ok], cases, split, n_shot=1, n_query=1)
    same = SegmentationEpisodeSpec(organ="liver", support=((test[0], 3),), query=((test[0], 5),), seed=1)
    with pytest.raises(ValueError, match=f"episode 1: its support and query share patient\\(s\\) {cases[test[0]].patient}"):
        check_segmentation_episodes(tmp_path / "f.json", [ok, same], cases, split, n_shot=1, n_query=1)
    twice = SegmentationEpisodeSpec(organ="liver", support=((test[0], 3), (test[0], 6)), query=((test[1], 4),), seed=2)
    with pytest.raises(ValueError, match="episode 0: two of its support slices are of one patient"):
        check_segmentation_episodes(tmp_path / "f.json", [twice], cases, split, n_shot=2, n_query=1)
    queries = SegmentationEpisodeSpec(organ="liver", support=((test[0], 3),), query=((test[1], 4), (test[1], 5)), seed=3)
    with pytest.raises(ValueError, match="episode 0: two of its query slices are of one patient"):
        check_segmentation_episodes(tmp_path / "f.json", [queries], cases, split, n_shot=1, n_query=2)


def test_self_supervision_leaves_out_every_scanner_that_test_sites_names():
    """cross_site: an unlabelled scan of a held-out scanner is not a test case, but test_sites names its site;
    self-supervised episodes took it (a review)."""
    from types import SimpleNamespace

    from datamodules.indexing.index import Index

    def case(i, site, labelled=True):
        return Case(case_id=f"c{i}", patient=f"p{i}", site=site, modality="MR", image=f"{i}.nii.gz",
                    image_format="nifti", label=f"{i}_seg.nii.gz" if labelled else None,
                    organs={"liver": 1} if labelled else {})

    a, b, b2 = "SIEMENS | Avanto | 1.5", "Philips | Ingenia | 1.5", "Philips | Ingenia | inst-3fa2c1 | 3"
    index = Index(root="/x", cases=[case(i, a) for i in range(6)] + [case(10 + i, b) for i in range(4)]
                  + [case(20 + i, b2, labelled=False) for i in range(3)])
    labelled = index.labelled_cases
    split = make_split(labelled, "cross_site", test_sites=["Ingenia"])
    dm = SimpleNamespace(split=split, index=index, cases=labelled, hparams=SimpleNamespace(test_sites=["Ingenia"]))
    assert {labelled[i].site for i in split.test} == {b}
    assert {c.site for c in SegmentationDataModule.selfsup_cases(dm)} == {a}


def test_report_quotes_a_given_test_episode_file(dm, demo_root, demo_index, tmp_path):
    path = dm.episode_files["test"]
    given = SegmentationDataModule(root=str(demo_root), index_path=str(demo_index[1]), cache_dir=str(tmp_path),
                                   test_episodes_file=str(path), **SMALL_DATA)
    given.setup("test")
    desc = given.describe()
    assert desc["episode_files"]["test"] == str(path)
    assert desc["episodes_sha256"]["test"] == json.loads(path.read_text())["sha256"] == dm.describe()["episodes_sha256"]["test"]


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


def test_runs_that_hold_other_cases_write_other_episode_files(tmp_path):
    """Two runs sharing a cache that differ only in which organs, modality, label names, site fields or patient
    rule they read hold other cases (and in val_patients or label-free training, other validation organs), so they must not write one episode file over the other's; the defaults keep
    the names that reports already quote."""
    base = dict(root=str(tmp_path / "scans"), cache_dir=str(tmp_path / "cache"), test_organs=["spleen"])
    (tmp_path / "scans").mkdir()
    default = SegmentationDataModule(**base).episode_path("test")
    h = SegmentationDataModule(**base).hparams
    old_key = digest([SegmentationDataModule(**base).preprocessing, h.protocol, h.test_organs, h.val_organs,
                      h.val_organ_count, h.test_sites, h.split_seed, h.seed, h.n_shot, h.n_query, h.n_parts,
                      h.val_episodes, h.test_episodes, h.min_organ_pixels, h.exclude_test_organ_slices, h.val_fraction,
                      h.test_fraction])
    assert default.name == f"test_episodes-{old_key}.json"
    others = [dict(organs=["spleen", "liver"]), dict(modality="CT"), dict(label_names={1: "spleen"}),
              dict(site_fields=["Manufacturer"]), dict(patient_regex=r"^(\w+)"), dict(salt="ours"),
              dict(val_patients=3), dict(selfsup_ratio=1.0)]  # these two change the validation organs chosen
    paths = {SegmentationDataModule(**base, **o).episode_path("test") for o in others}
    assert default not in paths and len(paths) == len(others)


def test_symbolic_link_loops_under_the_root_are_walked_once_for_the_index_key(tmp_path):
    """A review: the index key walked the root following links without remembering the folders it had seen, so a
    link back up counted every file again and again (two such links: it never returned), though the scan itself
    lists such links and walks each real folder once."""
    root = tmp_path / "data"
    (root / "a").mkdir(parents=True)
    (root / "a" / "f.txt").write_text("x")
    dm = SegmentationDataModule(root=str(root), cache_dir=str(tmp_path / "cache"))
    before = dm._scan_key()
    (root / "a" / "up").symlink_to("..")
    assert dm._scan_key() == before  # the loop adds no file


def test_a_cache_folder_inside_the_data_folder_is_not_scanned(tmp_path):
    """A review: the index key left the cache folder out, but the scan did not, so every scan after the first
    opened each cached file and rejected it as no image (thousands with a disk cache)."""
    from tests.datamodules.dicom_fixtures import affine_ras, label_for, phantom, write_nifti

    root = tmp_path / "data"
    vol = phantom(seed=1)
    write_nifti(vol, affine_ras(), root / "a.nii.gz")
    write_nifti(label_for(vol), affine_ras(), root / "a_label.nii.gz")
    cache = root / ".cache"
    (cache / "volumes-x").mkdir(parents=True)
    (cache / "volumes-x" / "0.pt").write_bytes(b"cached")
    for rescan in (False, True):
        dm = SegmentationDataModule(root=str(root), cache_dir=str(cache), rescan=rescan)
        dm.prepare_data()
        index = json.loads(dm.index_path.read_text())
        assert [c["image"] for c in index["cases"]] == ["a.nii.gz"] and not index["rejected"], index["rejected"]


def test_the_index_is_rebuilt_when_a_file_or_a_scan_setting_changes(tmp_path, caplog):
    """A sidecar added after the first scan (as the modality warning advises), or new label names, reach the index
    without ``rescan: true``; an unchanged folder is not scanned again."""
    import logging

    from tests.datamodules.dicom_fixtures import affine_ras, label_for, phantom, write_nifti

    root = tmp_path / "data"
    for p in ("a", "b"):
        vol = phantom(seed=ord(p))
        write_nifti(vol + 1100, affine_ras(), root / f"{p}.nii.gz")  # no air at -1000 HU: modality unknown
        write_nifti(label_for(vol), affine_ras(), root / f"{p}_label.nii.gz")

    def index(**kw):
        dm = SegmentationDataModule(root=str(root), cache_dir=str(tmp_path / "cache"), **kw)
        with caplog.at_level(logging.INFO, logger="datamodules.segmentation"):
            caplog.clear()
            dm.prepare_data()
        scanned = "scanning " in caplog.text
        return json.loads(dm.index_path.read_text()), scanned

    first, scanned = index()
    assert scanned and {c["modality"] for c in first["cases"]} == {"unknown"}
    assert index() == (first, False)  # nothing changed: the index is reused
    import datamodules.segmentation as segmentation_module

    try:  # a new way of reading site keys scans again: an index of the old keys held a held-out scanner twice
        segmentation_module.SITE_KEY_VERSION += 1
        assert index()[1]
    finally:
        segmentation_module.SITE_KEY_VERSION -= 1
    (root / "a.json").write_text(json.dumps({"Modality": "MR"}))
    second, scanned = index()
    assert scanned and "scanning again" in caplog.text
    assert sorted(c["modality"] for c in second["cases"]) == ["MR", "unknown"]
    third, scanned = index(label_names={1: "milz"})
    assert scanned and third["label_names"] == {"1": "milz"}
    # a patient pattern is a scan setting too: `a` and `b` are then one patient, and no file is its own patient
    assert len({c["patient"] for c in third["cases"]}) == 2 and len(third["own_patient"]) == 2
    dm = SegmentationDataModule(root=str(root), cache_dir=str(tmp_path / "cache"), label_names={1: "milz"})
    with pytest.warns(UserWarning, match=r"2 image\(s\) under .* name no patient .*data.init_args.patient_regex"):
        with pytest.raises(ValueError):  # two patients are too few to split; the warning comes first
            dm.setup("fit")
    fourth, scanned = index(label_names={1: "milz"}, patient_regex=r"^()")
    assert scanned and len({c["patient"] for c in fourth["cases"]}) == 1 and fourth["own_patient"] == []
    assert fourth["patient_regex"] == "^()"
    fifth, _ = index(label_names={1: "milz"}, patient_regex="")  # every file its own patient, as asked: no warning
    assert len({c["patient"] for c in fifth["cases"]}) == 2 and fifth["own_patient"] == []
    # an index given as index_path is used as it is: one scanned with another pattern is refused, not misread
    given = SegmentationDataModule(root=str(root), index_path=str(tmp_path / "cache" / "x.json"),
                                   cache_dir=str(tmp_path / "cache"), label_names={1: "milz"})
    given.prepare_data()  # scanned with the default pattern
    # a given index is not checked against the folder (slow file systems): a file added later rescans nothing
    scanned_at = (tmp_path / "cache" / "x.json").stat().st_mtime_ns
    (root / "notes.txt").write_text("added after the scan")
    SegmentationDataModule(root=str(root), index_path=str(tmp_path / "cache" / "x.json"),
                           cache_dir=str(tmp_path / "cache"), label_names={1: "milz"}).prepare_data()
    assert (tmp_path / "cache" / "x.json").stat().st_mtime_ns == scanned_at
    mismatched = SegmentationDataModule(root=str(root), index_path=str(tmp_path / "cache" / "x.json"),
                                        cache_dir=str(tmp_path / "cache"), label_names={1: "milz"}, patient_regex="^()")
    with pytest.raises(ValueError, match=rf"x\.json was scanned with patient_regex '{re.escape(DEFAULT_PATIENT_REGEX)}' "
                                         r"and the data config says '\^\(\)'.*rescan: true.*--patient-regex"):
        mismatched.setup("fit")


@pytest.mark.parametrize("bad, message", [
    ({"n_shot": 0}, "n_shot must be at least 1, got 0"),
    ({"n_query": -1}, "n_query must be at least 1, got -1"),
    ({"val_episodes": -2}, "val_episodes must be at least 0"),
    ({"min_organ_pixels": 0}, "min_organ_pixels must be at least 1, got 0"),
    ({"spacing": [-1.0, 4.5]}, r"spacing is the in-plane voxel size in mm, two numbers above 0; got \[-1.0, 4.5\]"),
    ({"spacing": [0, 4.0]}, r"two numbers above 0; got \[0, 4.0\]"),
    ({"slice_size": [0, 80]}, r"slice_size is the slices' height and width in pixels.*got \[0, 80\]"),
    ({"selfsup_ratio": 1.5}, r"selfsup_ratio must lie in \[0, 1\], got 1.5"),
    ({"val_patients": 1}, "val_patients must be at least 2, got 1"),
    ({"patient_regex": "sub-("}, r"patient_regex 'sub-\(' is not a valid regular expression"),
])
def test_settings_that_cannot_work_are_refused_when_the_datamodule_is_built(tmp_path, bad, message):
    """They failed after scanning the folder, or once training started (``stack expects each tensor to be equal
    size``), or trained silently on a negative spacing."""
    with pytest.raises(ValueError, match=message):
        SegmentationDataModule(root=str(tmp_path), cache_dir=str(tmp_path), **bad)


def test_fit_without_training_episodes_says_so(demo_root, demo_index, tmp_path):
    dm = SegmentationDataModule(root=str(demo_root), index_path=str(demo_index[1]), cache_dir=str(tmp_path),
                                **{**SMALL_DATA, "episodes_per_epoch": 0})
    dm.setup("fit")
    with pytest.raises(ValueError, match="episodes_per_epoch is 0: fit would draw no training episode"):
        dm.train_dataloader()


def test_the_report_names_the_organs_and_patients_the_episodes_use(tmp_path):
    """An organ that too few training patients show is dropped from training (with a warning); the report used to
    list it among the training organs, and to count every test patient although one shows no test structure."""
    from tests.datamodules.dicom_fixtures import affine_ras, write_nifti

    root = tmp_path / "data"
    for i in range(1, 10):
        image = np.full((24, 24, 6), -100.0)
        label = np.zeros((24, 24, 6), np.uint8)
        label[2:10, 2:10, 1:5] = 1
        if i == 1:
            label[14:22, 2:10, 1:5] = 2  # the rare structure: one patient shows it
        if i != 9:
            label[2:10, 14:22, 1:5] = 3  # one patient shows no test structure
        image[label > 0] = 60.0 * label[label > 0]
        write_nifti(image, affine_ras(), root / f"sub-{i:02d}" / "ct.nii.gz")
        write_nifti(label, affine_ras(), root / f"sub-{i:02d}" / "ct_label.nii.gz")
        (root / f"sub-{i:02d}" / "ct.json").write_text(json.dumps({"Modality": "CT"}))
    dm = SegmentationDataModule(root=str(root), cache_dir=str(tmp_path / "cache"), protocol="cross_organ",
                                test_organs=["c"], val_organ_count=0, label_names={1: "a", 2: "b", 3: "c"},
                                exclude_test_organ_slices=False, val_fraction=0.0, test_fraction=0.45, n_query=1,
                                episodes_per_epoch=4, val_episodes=0, test_episodes=6, spacing=(1.5, 1.5),
                                slice_size=(32, 32), cache="none")
    with pytest.warns(UserWarning, match=r"train: dropping 'b'"):
        dm.setup("fit")
    d = dm.describe()
    assert dm.split.train_organs == ["a", "b"] and d["train_organs"] == ["a"] and d["dropped_organs"] == {"train": ["b"]}
    test_patients = {dm.cases[i].patient for i in dm.split.test}
    shown = {dm.cases[i].patient for i in dm.split.test if "c" in dm.cases[i].organs}
    assert d["patients"]["test"] == len(test_patients) and d["episode_patients"]["test"] == len(shown)
    # as evaluate builds it (no training episodes): the report still names what training used, and no warning
    dm = SegmentationDataModule(**{**dict(dm.hparams), "episodes_per_epoch": 0})
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        dm.setup("test")
    d = dm.describe()
    assert d["train_organs"] == ["a"] and d["dropped_organs"] == {"train": ["b"]}


def test_a_validation_organ_is_one_the_validation_episodes_can_show(tmp_path):
    """Label maps that name an organ on a few voxels only (under ``min_organ_pixels`` on every slice) made it a
    candidate: the validation episodes then dropped it and fit stopped ("present in 0 patient(s))"."""
    from datamodules.indexing.splits import _rank
    from tests.datamodules.dicom_fixtures import affine_ras, write_nifti

    root = tmp_path / "data"
    for i in range(1, 10):
        label = np.zeros((24, 24, 6), np.uint8)
        label[2:10, 2:10, 1:5] = 1  # a: 64 pixels a slice
        label[14:16, 2:4, 1:5] = 2  # b: 4 pixels a slice, under min_organ_pixels
        label[2:10, 14:22, 1:5] = 3  # c: the test organ
        label[14:22, 14:22, 1:5] = 4  # d: trained on
        image = np.where(label > 0, 60.0 * label, -100.0)
        write_nifti(image, affine_ras(), root / f"sub-{i:02d}" / "ct.nii.gz")
        write_nifti(label, affine_ras(), root / f"sub-{i:02d}" / "ct_label.nii.gz")
        (root / f"sub-{i:02d}" / "ct.json").write_text(json.dumps({"Modality": "CT"}))
    seed = next(s for s in range(50) if _rank("b", s) < min(_rank("a", s), _rank("d", s)))  # b would come first
    dm = SegmentationDataModule(root=str(root), cache_dir=str(tmp_path / "cache"), protocol="cross_organ",
                                test_organs=["c"], label_names={1: "a", 2: "b", 3: "c", 4: "d"}, split_seed=seed,
                                exclude_test_organ_slices=False, val_fraction=0.35, test_fraction=0.35, n_query=1,
                                episodes_per_epoch=4, val_episodes=4, test_episodes=4, spacing=(1.5, 1.5),
                                slice_size=(32, 32), cache="none")
    dm.setup("fit")  # it stopped here
    assert dm.split.val_organs in (["a"], ["d"])
    # without validation episodes nothing had stopped: the choice by the label maps stands, as in every split
    # that trained before (their checkpoints are evaluated on the same split)
    quiet = SegmentationDataModule(**{**dict(dm.hparams), "val_episodes": 0})
    quiet.setup("fit")
    assert quiet.split.val_organs == ["b"]
    # evaluate draws no validation episodes, and passes the training run's val_patients: the same split
    rebuilt = SegmentationDataModule(**{**dict(dm.hparams), "val_episodes": 0, "episodes_per_epoch": 0, "val_patients": 2})
    rebuilt.setup("test")
    assert rebuilt.split_digest() == dm.split_digest()


def test_organs_limits_the_structures_and_the_scans(tmp_path):
    """A label map of many structures (TotalSegmentator's), of which a user wants a few: every other value is
    background to them, and a scan that shows none of them is left out; an unknown name is refused."""
    from tests.datamodules.dicom_fixtures import affine_ras, write_nifti

    root = tmp_path / "data"
    for i in range(1, 10):
        label = np.zeros((24, 24, 6), np.uint8)
        if i < 9:
            label[2:10, 2:10, 1:5] = 1
            label[2:10, 14:22, 1:5] = 3
            label[14:22, 14:22, 1:5] = 4
        label[14:22, 2:10, 1:5] = 2  # b: in every scan, the only structure of sub-09
        image = np.where(label > 0, 60.0 * label, -100.0)
        write_nifti(image, affine_ras(), root / f"sub-{i:02d}" / "ct.nii.gz")
        write_nifti(label, affine_ras(), root / f"sub-{i:02d}" / "ct_label.nii.gz")
        (root / f"sub-{i:02d}" / "ct.json").write_text(json.dumps({"Modality": "CT"}))
    kw = dict(root=str(root), cache_dir=str(tmp_path / "cache"), protocol="cross_organ", test_organs=["c"],
              val_organs=["d"], label_names={1: "a", 2: "b", 3: "c", 4: "d"}, exclude_test_organ_slices=False,
              val_fraction=0.3, test_fraction=0.3, n_query=1, episodes_per_epoch=4, val_episodes=4, test_episodes=4,
              spacing=(1.5, 1.5), slice_size=(32, 32), cache="none")
    every = SegmentationDataModule(**kw)
    every.setup("fit")
    assert len(every.cases) == 9 and every.split.train_organs == ["a", "b"]
    some = SegmentationDataModule(**kw, organs=["a", "c", "d"])
    some.setup("fit")
    assert len(some.cases) == 8 and some.split.train_organs == ["a"]
    assert all(set(c.organs) <= {"a", "c", "d"} for c in some.cases)
    assert some.split_digest() != every.split_digest()
    with pytest.raises(ValueError, match=r"organs \['liver'\] are in no label map under .*; the label maps hold \['a', 'b', 'c', 'd'\]"):
        SegmentationDataModule(**kw, organs=["a", "liver"]).setup("fit")


def test_a_split_that_leaves_a_test_organ_too_few_patients_names_a_seed_that_does_not(tmp_path):
    """A small folder where the seeded split puts the test organ in too few test patients: the error now names a
    split_seed whose split serves every stage (the user had to search seeds by hand), and that seed works: it
    counts the patients that show the organ on a slice with min_organ_pixels, as the episodes do, not the label
    maps that name it."""
    from tests.datamodules.dicom_fixtures import affine_ras, write_nifti

    root = tmp_path / "data"
    for i in range(1, 11):
        label = np.zeros((24, 24, 6), np.uint8)
        label[2:10, 2:10, 1:5] = 1
        label[14:22, 14:22, 1:5] = 4
        if i <= 2:
            label[2:10, 14:22, 1:5] = 3  # the test organ: two patients show it
        elif i <= 4:
            label[2:4, 14:16, 1:5] = 3  # and two label maps name it on 4 pixels a slice, which episodes cannot use
        image = np.where(label > 0, 60.0 * label, -100.0)
        write_nifti(image, affine_ras(), root / f"sub-{i:02d}" / "ct.nii.gz")
        write_nifti(label, affine_ras(), root / f"sub-{i:02d}" / "ct_label.nii.gz")
        (root / f"sub-{i:02d}" / "ct.json").write_text(json.dumps({"Modality": "CT"}))
    kw = dict(root=str(root), cache_dir=str(tmp_path / "cache"), protocol="cross_organ", test_organs=["c"],
              val_organs=["d"], label_names={1: "a", 3: "c", 4: "d"}, exclude_test_organ_slices=False,
              val_fraction=0.3, test_fraction=0.3, n_query=1, episodes_per_epoch=4, val_episodes=4, test_episodes=4,
              spacing=(1.5, 1.5), slice_size=(32, 32), cache="none")
    failed = None
    for seed in range(20):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                SegmentationDataModule(**kw, split_seed=seed).setup("fit")
        except ValueError as e:
            failed = (seed, str(e))
            break
    assert failed is not None, "no seed of 20 leaves the test organ short: the test would not test anything"
    found = re.search(r"split_seed (\d+) puts every test and validation organ in enough patients of its split", failed[1])
    assert found and int(found.group(1)) != failed[0], failed[1]
    # testing a checkpoint needs the split it trained on: no other seed is suggested there
    with warnings.catch_warnings(), pytest.raises(ValueError) as tested:
        warnings.simplefilter("ignore")
        SegmentationDataModule(**kw, split_seed=failed[0]).setup("test")
    assert "split_seed" not in str(tested.value), str(tested.value)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dm = SegmentationDataModule(**kw, split_seed=int(found.group(1)))
        dm.setup("fit")
    assert dm.describe()["test_organs"] == ["c"]


def test_another_salt_scans_into_its_own_index_and_leaves_the_one_in_use(demo_root, tmp_path):
    """A review: `evaluate` without the training salt rescanned over the training run's index before refusing the
    checkpoint, so the next fit or evaluate had to scan again."""
    kw = dict(root=str(demo_root), cache_dir=str(tmp_path), **SMALL_DATA)
    used = SegmentationDataModule(salt="s3cret", **kw)
    other = SegmentationDataModule(salt="imaging-meta", **kw)
    assert used.index_path != other.index_path and used.index_path.parent == other.index_path.parent
    assert SegmentationDataModule(salt="s3cret", **kw).index_path == used.index_path  # the same settings: one file


def test_a_structure_renamed_after_training_is_named_and_the_split_digest_alone_misses_it(tmp_path):
    """label_names swapped after training (or a dataset.json edited) kept the split digest: evaluate then scored a
    trained structure as the held-out one (a review). The structure digest tells them apart, and the message names
    the values."""
    from imaging_meta.checkpoint_io import structure_mismatch
    from tests.datamodules.dicom_fixtures import affine_ras, write_nifti

    root = tmp_path / "data"
    for i in range(1, 7):
        label = np.zeros((24, 24, 6), np.uint8)
        label[2:10, 2:10, 1:5] = 1
        label[2:10, 14:22, 1:5] = 3
        image = np.where(label > 0, 60.0 * label, -100.0)
        write_nifti(image, affine_ras(), root / f"sub-{i:02d}" / "ct.nii.gz")
        write_nifti(label, affine_ras(), root / f"sub-{i:02d}" / "ct_label.nii.gz")
        (root / f"sub-{i:02d}" / "ct.json").write_text(json.dumps({"Modality": "CT"}))
    common = dict(root=str(root), cache_dir=str(tmp_path / "cache"), protocol="cross_organ", test_organs=["c"],
                  exclude_test_organ_slices=False,
                  val_organ_count=0, val_fraction=0.0, test_fraction=0.4, n_query=1, episodes_per_epoch=2,
                  val_episodes=0, test_episodes=2, spacing=(1.5, 1.5), slice_size=(32, 32), cache="none")
    trained = SegmentationDataModule(label_names={1: "a", 3: "c"}, **common)
    swapped = SegmentationDataModule(label_names={1: "c", 3: "a"}, **common)
    for dm in (trained, swapped):
        dm.setup("test")
    assert trained.split_digest() == swapped.split_digest()  # the names and the patients are the same
    extra = {"structure_digest": trained.structure_digest(), "structure_values": trained.structure_values()}
    assert trained.structure_values() == {"a": [1], "c": [3]}
    assert structure_mismatch(extra, trained) is None
    assert structure_mismatch(extra, swapped) == ("a: label values [1] in training, [3] here; "
                                                  "c: label values [3] in training, [1] here")
    assert structure_mismatch({"split_digest": "x"}, swapped) is None  # a checkpoint from before the digest
