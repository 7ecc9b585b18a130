"""`ClassificationEpisodeSampler`: labels in, item indices out; patient-disjoint, seeded, feasibility checked."""

import json
from collections import Counter

import numpy as np
import pytest
import torch

from datamodules.sampling.episode_files import load_episodes, save_episodes
from datamodules.sampling.samplers_classification import (
    ClassificationEpisodeSampler,
    ClassificationEpisodeSpec,
    classification_infeasible,
    splittable,
)


class RaisingDataset(torch.utils.data.Dataset):
    """A dataset whose pixels must never be touched by a sampler."""

    def __len__(self):
        return 10

    def __getitem__(self, i):
        raise AssertionError("the sampler touched pixels")


def cohort(n_classes=8, per_class=12, per_patient=3, n_sites=2, shared_patients=True):
    """Items of ``n_classes`` classes; ``per_patient`` items of a class per patient; patients carry items
    of two neighbouring classes when ``shared_patients`` (as lesion tables do); sites alternate by patient."""
    labels, patients, sites = [], [], []
    for c in range(n_classes):
        for k in range(per_class):
            p = (c * per_class + k) // per_patient
            if shared_patients and c % 2 == 1:
                p = ((c - 1) * per_class + k) // per_patient  # class c shares its patients with class c - 1
            labels.append(c)
            patients.append(f"p{p}")
            sites.append(f"site{p % n_sites}")
    return np.array(labels), patients, sites


NAMES = [f"lesion{c}" for c in range(8)]


def test_sampler_never_touches_pixels_and_shapes_are_n_way_k_shot():
    ds = RaisingDataset()
    labels, patients, sites = cohort()
    s = ClassificationEpisodeSampler(labels, patients, sites, n_way=5, n_shot=2, n_query=3, n_episodes=40, seed=1)
    # the DataLoader's batch sampling (what Lightning iterates, and what set_epoch reaches) never calls ds
    loader = torch.utils.data.DataLoader(ds, sampler=s, batch_size=4)
    batches = list(loader.batch_sampler)
    specs = [spec for b in batches for spec in b]
    assert len(batches) == 10 and len(specs) == 40
    for spec in specs:
        assert isinstance(spec, ClassificationEpisodeSpec)
        assert len(set(spec.classes)) == 5 and len(spec.support) == 10 and len(spec.query) == 15
        # way-major: the n_shot items of way 0, then way 1, ...
        assert [labels[i] for i in spec.support] == [c for c in spec.classes for _ in range(2)]
        assert [labels[i] for i in spec.query] == [c for c in spec.classes for _ in range(3)]
        assert not set(spec.support) & set(spec.query) and len(set(spec.support + spec.query)) == 25


def test_support_and_query_are_patient_disjoint_over_many_episodes():
    labels, patients, sites = cohort(per_patient=4)
    s = ClassificationEpisodeSampler(labels, patients, sites, n_way=4, n_shot=3, n_query=4, n_episodes=300, seed=7)
    for spec in s:
        sup = {patients[i] for i in spec.support}
        qry = {patients[i] for i in spec.query}
        assert not sup & qry, spec


def test_tight_class_is_still_served_exactly():
    # one class: patient A has 5 items, B and C one each: 5-shot 2-query works only with A as the support
    labels = np.array([0] * 7 + [1] * 7)
    patients = ["A"] * 5 + ["B", "C"] + [f"q{i}" for i in range(7)]
    sites = ["s"] * 14
    assert splittable(Counter(patients[:7]), Counter(patients[:7]), 5, 2)
    assert not splittable(Counter(patients[:7]), Counter(patients[:7]), 5, 3)
    s = ClassificationEpisodeSampler(labels, patients, sites, n_way=2, n_shot=5, n_query=2, n_episodes=30, seed=0)
    for spec in s:
        way0 = spec.classes.index(0)
        assert {patients[i] for i in spec.support[way0 * 5 : way0 * 5 + 5]} == {"A"}


def test_tight_class_is_served_by_the_one_item_at_a_time_draw_too():
    # the draw one item at a time (when uniform supports rarely leave room for the query) finds the one way out
    labels = np.array([0] * 7 + [1] * 7)
    patients = ["A"] * 5 + ["B", "C"] + [f"q{i}" for i in range(7)]
    s = ClassificationEpisodeSampler(labels, patients, ["s"] * 14, n_way=2, n_shot=5, n_query=2, n_episodes=30, seed=0)
    s.SUPPORT_TRIES = 0
    for spec in s:
        way0 = spec.classes.index(0)
        assert {patients[i] for i in spec.support[way0 * 5 : way0 * 5 + 5]} == {"A"}
        assert {patients[i] for i in spec.query[way0 * 2 : way0 * 2 + 2]} == {"B", "C"}


def skewed_table():
    """Two classes with patients of their own; in each, one patient holds 12 items and six others 2 each."""
    labels, patients = [], []
    for c in range(2):
        for k in range(24):
            labels.append(c)
            patients.append(f"c{c}-big" if k < 12 else f"c{c}-p{(k - 12) // 2}")
    return np.array(labels), patients, ["s"] * 48


def check_items_uniform(sampler_cls, n=4000):
    """Support and query item counts over ``n`` seeded 2-way 3-shot 4-query episodes of `skewed_table`."""
    labels, patients, sites = skewed_table()
    n_shot, n_query = 3, 4
    sup, qry = np.zeros(len(labels)), np.zeros(len(labels))
    q_exp, q_var = np.zeros(len(labels)), np.zeros(len(labels))
    for spec in sampler_cls(labels, patients, sites, n_way=2, n_shot=n_shot, n_query=n_query, n_episodes=n, seed=11):
        taken = {patients[i] for i in spec.support}
        assert not taken & {patients[i] for i in spec.query}, "support and query share a patient"
        sup[list(spec.support)] += 1
        qry[list(spec.query)] += 1
        for c in spec.classes:  # each query item: uniform among the class's items of patients in no support
            free = [i for i in range(len(labels)) if labels[i] == c and patients[i] not in taken]
            q_exp[free] += n_query / len(free)
            q_var[free] += n_query / len(free) * (1 - n_query / len(free))
    # every support item with probability n_shot / 24 (no support here leaves fewer than n_query queries: the big
    # patient and one other hold 14 of the 24 items). 4.5 binomial SDs: ~94 around 500, a miss < 1e-5 per item
    p = n_shot / 24
    assert np.abs(sup - n * p).max() < 4.5 * np.sqrt(n * p * (1 - p)), "support items are not equally likely"
    big = np.array([q.endswith("big") for q in patients])
    assert abs(sup[big].sum() / sup.sum() - 0.5) < 0.03, "the 12-item patients do not get half of the support"
    # queries against the sum of their per-episode probabilities given the supports (a martingale: SD sqrt(var))
    assert (np.abs(qry - q_exp) < 4.5 * np.sqrt(q_var)).all(), "query items are not uniform given the supports"


def test_items_are_drawn_uniformly_not_patients():
    # Under the old rule (the support from the shortest random prefix of patients holding n_shot items) the
    # 12-item patient got about a quarter of the support, not half: this check fails on it (issue 14, point 4).
    check_items_uniform(ClassificationEpisodeSampler)


def test_cross_site_support_and_query_sites_differ():
    labels, patients, sites = cohort(n_sites=3, per_patient=2)
    s = ClassificationEpisodeSampler(labels, patients, sites, n_way=3, n_shot=1, n_query=2, n_episodes=100,
                                     sites_differ=True, seed=2)
    seen_pairs = set()
    for spec in s:
        sup = {sites[i] for i in spec.support}
        qry = {sites[i] for i in spec.query}
        assert len(sup) == 1 and len(qry) == 1 and sup != qry
        assert not {patients[i] for i in spec.support} & {patients[i] for i in spec.query}
        seen_pairs.add((sup.pop(), qry.pop()))
    assert len(seen_pairs) > 1  # the site pair is drawn per episode


def test_within_site_episodes_come_from_one_site_drawn_per_episode():
    labels, patients, sites = cohort(n_sites=3, per_patient=2)
    s = ClassificationEpisodeSampler(labels, patients, sites, n_way=3, n_shot=1, n_query=2, n_episodes=100,
                                     same_site=True, seed=2)
    seen = set()
    for spec in s:
        used = {sites[i] for i in spec.support + spec.query}
        assert len(used) == 1
        assert not {patients[i] for i in spec.support} & {patients[i] for i in spec.query}
        seen |= used
    assert len(seen) == 3
    with pytest.raises(ValueError, match="exclude each other"):
        ClassificationEpisodeSampler(labels, patients, sites, n_way=3, same_site=True, sites_differ=True)
    # 12 items of a class spread over 3 sites cannot give 5 + 5 at one site
    with pytest.raises(ValueError, match="and the query at one site"):
        ClassificationEpisodeSampler(labels, patients, sites, n_way=3, n_shot=5, n_query=5, same_site=True, class_names=NAMES)


def test_cross_site_needs_two_sites():
    labels, patients, sites = cohort(n_sites=1)
    with pytest.raises(ValueError, match="at one site and the query at another.*'lesion0' has 12 item.* at 1 site"):
        ClassificationEpisodeSampler(labels, patients, sites, n_way=3, sites_differ=True, class_names=NAMES)


def test_epochs_and_ranks_differ_and_are_reproducible():
    labels, patients, sites = cohort()
    kw = dict(n_way=5, n_shot=1, n_query=2, n_episodes=11, seed=5)
    a = ClassificationEpisodeSampler(labels, patients, sites, **kw)
    b = ClassificationEpisodeSampler(labels, patients, sites, **kw)
    first = list(a)
    assert first == list(b) == list(a)
    a.set_epoch(1)
    assert list(a) != first
    b.set_epoch(1)
    assert list(a) == list(b)
    assert list(ClassificationEpisodeSampler(labels, patients, sites, **{**kw, "seed": 6})) != first
    r0 = ClassificationEpisodeSampler(labels, patients, sites, rank=0, world_size=2, **kw)
    r1 = ClassificationEpisodeSampler(labels, patients, sites, rank=1, world_size=2, **kw)
    assert len(r0) == len(r1) == 6
    assert list(r0)[:5] != list(r1)[:5]  # each rank its own episodes
    # fixed episodes depend on the seed only
    assert r0.fixed_episodes(7) == r1.fixed_episodes(7) == a.fixed_episodes(7)
    r0.set_epoch(3)
    assert r0.fixed_episodes(7) == a.fixed_episodes(7)


def test_golden_first_episode():
    """Seeded golden value: a change in the drawing order must be a deliberate one."""
    labels, patients, sites = cohort()
    spec = next(iter(ClassificationEpisodeSampler(labels, patients, sites, n_way=3, n_shot=1, n_query=2, n_episodes=1, seed=0)))
    # literals computed once by printing this spec (numpy 2.4.6) and pasted; a golden value is never recomputed with
    # the same RNG call. Re-pasted when the draw changed from patient prefixes to uniform items (issue 14, point 4).
    assert spec == ClassificationEpisodeSpec(classes=(4, 7, 5), support=(48, 84, 60), query=(52, 58, 91, 94, 69, 70),
                                             seed=1167425779)


def test_infeasible_requests_name_the_class_and_the_fix():
    labels, patients, sites = cohort()
    # lesion3 loses items: 4 items from 2 patients
    keep = [i for i in range(len(labels)) if labels[i] != 3 or i % 12 < 4]
    labels, patients, sites = labels[keep], [patients[i] for i in keep], [sites[i] for i in keep]
    with pytest.raises(ValueError, match=r"n_shot \+ n_query = 6.*'lesion3' has 4 item\(s\) from 2 patient\(s\).*Lower n_shot or n_query, or drop"):
        ClassificationEpisodeSampler(labels, patients, sites, n_way=5, n_shot=1, n_query=5, class_names=NAMES)
    # a single patient can never serve both sides, however many items it has
    one = np.zeros(10, dtype=int)
    with pytest.raises(ValueError, match="class 0 has 10 item.* from 1 patient"):
        ClassificationEpisodeSampler(np.r_[one, one + 1], ["A"] * 10 + [f"b{i}" for i in range(10)], ["s"] * 20, n_way=2)
    assert classification_infeasible(labels, patients, sites, range(8), 1, 5, class_names=NAMES).keys() == {3}
    with pytest.raises(ValueError, match="5-way episodes need at least 5 classes.*lower n_way"):
        ClassificationEpisodeSampler(labels, patients, sites, classes=[0, 1, 2], n_way=5, class_names=NAMES)
    with pytest.raises(ValueError, match="must be >= 1"):
        ClassificationEpisodeSampler(labels, patients, sites, n_shot=0)


def test_classification_episode_json_round_trip(tmp_path):
    labels, patients, sites = cohort()
    specs = ClassificationEpisodeSampler(labels, patients, sites, n_way=4, n_shot=2, n_query=2, n_episodes=9).fixed_episodes()
    ids = [f"i-{i:03d}" for i in range(len(labels))]
    path = save_episodes(specs, ids, tmp_path / "test.json", {"seed": 0}, class_names=NAMES)
    payload = json.loads(path.read_text())
    assert payload["kind"] == "classification" and len(payload["sha256"]) == 64
    assert payload["episodes"][0]["classes"][0].startswith("lesion") and payload["episodes"][0]["support"][0].startswith("i-")
    back, meta = load_episodes(path, ids, NAMES)
    assert back == specs and meta == {"seed": 0}
    # the table was re-indexed (items in another order): ids still find the same items
    perm = np.random.default_rng(0).permutation(len(ids))
    shuffled = [ids[i] for i in perm]
    back2, _ = load_episodes(path, shuffled, NAMES)
    assert [[shuffled[i] for i in s.support] for s in back2] == [[ids[i] for i in s.support] for s in specs]
    with pytest.raises(ValueError, match="not in this table"):
        load_episodes(path, ids[:10], NAMES)
    with pytest.raises(ValueError, match="pass class_names"):
        load_episodes(path, ids)
    payload["episodes"][0]["seed"] += 1
    path.write_text(json.dumps(payload))
    with pytest.raises(ValueError, match="does not match its sha256"):
        load_episodes(path, ids, NAMES)
    with pytest.raises(ValueError, match="need class_names"):
        save_episodes(specs, ids, tmp_path / "x.json")
