"""Rules of the splits, the pairing and the episodes that a review (2026-12-07) broke with a one-line change no test
caught; each test here fails on one of those changes (its docstring says which)."""

from __future__ import annotations

import json

import pytest

from datamodules.indexing.index import Case
from datamodules.indexing.scan import scan_folder
from datamodules.indexing.splits import make_split
from datamodules.sampling.episode_files import check_segmentation_episodes
from datamodules.sampling.samplers_classification import ClassificationEpisodeSampler
from datamodules.sampling.samplers_segmentation import SegmentationEpisodeSampler, SegmentationEpisodeSpec
from tests.datamodules.dicom_fixtures import affine_ras, label_for, phantom, write_nifti


def _case(i, patient, site):
    return Case(case_id=f"c{i}", patient=patient, site=site, modality="CT", image=f"{i}.nii.gz", image_format="nifti",
                label="l", organs={"liver": 1})


def _stages(cases, split):
    return {k: {cases[i].patient for i in getattr(split, k)} for k in ("train", "val", "test")}


def test_a_patient_scanned_at_two_sites_is_in_one_stage_for_every_seed():
    """Six of twelve patients of site A were also scanned at B: over 200 seeds no patient is in two stages (without
    the validation side's removal of test patients, about half the seeds put one in validation and test)."""
    cases = ([_case(i, f"a{i}", "A") for i in range(12)] + [_case(100 + i, f"a{i}", "B") for i in range(6)]
             + [_case(200 + i, f"b{i}", "B") for i in range(6)])
    for seed in range(200):
        st = _stages(cases, make_split(cases, "in_domain", seed=seed))
        assert not (st["train"] & st["val"] or st["train"] & st["test"] or st["val"] & st["test"]), seed


def test_every_site_of_three_patients_or_more_has_a_test_and_a_validation_patient():
    """A small site (4 patients beside 20) keeps a test and a validation patient at small fractions."""
    cases = [_case(f"{s}{p}", f"{s}{p}", s) for s, n in (("A", 20), ("B", 4)) for p in range(n)]
    split = make_split(cases, "in_domain", val_fraction=0.1, test_fraction=0.1, seed=0)
    assert {cases[i].site for i in split.test} == {"A", "B"}
    assert {cases[i].site for i in split.val} == {"A", "B"}


def test_an_unlabelled_test_image_does_not_take_a_training_label_of_its_name(tmp_path):
    """``imagesTs/x.nii.gz`` beside ``labelsTr/x.nii.gz``, which dataset.json pairs with ``imagesTr/x.nii.gz``."""
    vol = phantom(seed=0)
    write_nifti(vol, affine_ras(), tmp_path / "imagesTr" / "x.nii.gz")
    write_nifti(label_for(vol), affine_ras(), tmp_path / "labelsTr" / "x.nii.gz")
    write_nifti(vol + 3, affine_ras(), tmp_path / "imagesTs" / "x.nii.gz")
    (tmp_path / "dataset.json").write_text(json.dumps({
        "name": "x", "modality": {"0": "CT"}, "labels": {"0": "background", "1": "liver"},
        "training": [{"image": "./imagesTr/x.nii.gz", "label": "./labelsTr/x.nii.gz"}]}))
    pairs = {c.image: c.label for c in scan_folder(str(tmp_path), salt="s").cases}
    assert pairs == {"imagesTr/x.nii.gz": "labelsTr/x.nii.gz", "imagesTs/x.nii.gz": None}


def test_without_parts_the_query_slice_sits_at_the_supports_relative_position():
    table = {"liver": {0: list(range(0, 31)), 1: list(range(100, 161))}}
    for spec in SegmentationEpisodeSampler(table, ["a", "b"], n_parts=0, n_episodes=100, seed=0):
        (cs, zs), (cq, zq) = spec.support[0], spec.query[0]
        rel_s = (zs - table["liver"][cs][0]) / (len(table["liver"][cs]) - 1)
        rel_q = (zq - table["liver"][cq][0]) / (len(table["liver"][cq]) - 1)
        assert abs(rel_s - rel_q) <= 1 / 30, spec


def test_classes_that_cannot_form_a_patient_disjoint_episode_are_drawn_again():
    """Classes 0, 1 and 2 share their patients in a cycle, so no 3-way episode of those three is patient-disjoint;
    with class 3 every episode can be drawn once the classes are drawn again."""
    labels = [0, 0, 1, 1, 2, 2, 3, 3]
    patients = ["P1", "P2", "P2", "P3", "P3", "P1", "P4", "P5"]
    sampler = ClassificationEpisodeSampler(labels, patients, ["a"] * 8, n_way=3, n_shot=1, n_query=1, n_episodes=50,
                                           seed=0)
    episodes = sampler.fixed_episodes()
    assert len(episodes) == 50 and all(3 in e.classes for e in episodes)


def test_a_segmentation_episode_file_of_another_query_count_or_of_validation_patients_is_refused():
    cases = [_case(p, f"p{p}", "s") for p in range(12)]
    split = make_split(cases, "in_domain", seed=0)
    t, v = split.test, split.val
    two_queries = SegmentationEpisodeSpec("liver", ((t[0], 3),), ((t[1], 4), (t[2], 4)), 0)
    with pytest.raises(ValueError, match="query"):
        check_segmentation_episodes("f.json", [two_queries], cases, split, n_shot=1, n_query=1)
    validation = SegmentationEpisodeSpec("liver", ((t[0], 3),), ((v[0], 4),), 0)
    with pytest.raises(ValueError, match="validation patient"):
        check_segmentation_episodes("f.json", [validation], cases, split, n_shot=1, n_query=1)
