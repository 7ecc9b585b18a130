"""Seeded, patient-disjoint splits: in-domain, cross-organ and cross-site protocols."""

import pytest

from datamodules.indexing.index import Case
from datamodules.indexing.splits import make_split, split_patients

ORGANS = {"liver": 1, "spleen": 2, "kidney_left": 3, "stomach": 4}


def cases(n_sites=3, per_site=8):
    out = []
    for s in range(n_sites):
        for p in range(per_site):
            out.append(Case(case_id=f"c{s}{p}", patient=f"p{s}-{p}", site=f"site{s}", modality="CT", image="x", image_format="nifti",
                            label="y", organs=dict(ORGANS)))
    return out


def test_split_is_disjoint_by_patient_and_seeded():
    tr, va, te = split_patients([f"p{i}" for i in range(40)], 0.2, 0.25, seed=1)
    assert not (tr & va or tr & te or va & te) and len(tr | va | te) == 40
    assert (tr, va, te) == split_patients([f"p{i}" for i in range(40)], 0.2, 0.25, seed=1)
    assert (tr, va, te) != split_patients([f"p{i}" for i in range(40)], 0.2, 0.25, seed=2)


def test_cross_organ_holds_out_organs_and_patients():
    cs = cases()
    s = make_split(cs, "cross_organ", test_organs=["spleen", "kidney_left"], seed=0)
    assert set(s.train_organs) == {"liver", "stomach"}
    assert s.test_organs == ["spleen", "kidney_left"] and s.val_organs == s.test_organs
    assert set(s.excluded_organs) == {"spleen", "kidney_left"}
    pats = {k: s.patients(cs, k) for k in ("train", "val", "test")}
    assert not (pats["train"] & pats["test"] or pats["train"] & pats["val"] or pats["val"] & pats["test"])
    # every site is in every stage
    for k in ("train", "val", "test"):
        assert {cs[i].site for i in getattr(s, k)} == {"site0", "site1", "site2"}
    s1 = make_split(cs, "cross_organ", test_organs=["spleen"], exclude_test_organ_slices=False)
    assert s1.excluded_organs == []


def test_cross_site_never_trains_on_test_sites():
    cs = cases()
    s = make_split(cs, "cross_site", test_sites=["site2"])
    assert {cs[i].site for i in s.test} == {"site2"}
    assert "site2" not in {cs[i].site for i in s.train + s.val}


def test_errors_name_the_fix():
    cs = cases()
    with pytest.raises(ValueError, match="unknown: \\['pancreas'\\]"):
        make_split(cs, "cross_organ", test_organs=["pancreas"])
    with pytest.raises(ValueError, match="matches none of the sites"):
        make_split(cs, "cross_site", test_sites=["nowhere"])
    with pytest.raises(ValueError, match="cover every site"):
        make_split(cs, "cross_site", test_sites=["site"])
    with pytest.raises(ValueError, match="not one of"):
        make_split(cs, "leave_one_out")
