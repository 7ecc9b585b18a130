"""The one scoring path (`score_batch`): the record schema of both kinds of task, the task's baselines, each
query's own site, and episode ids that stay unique when several DDP ranks score their share of the episodes."""

from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch

from imaging_meta.episode import collate_episodes
from imaging_meta.evaluation.methods import TRAINED, UNTRAINED, restore_untrained, untrained_state
from imaging_meta.evaluation.scoring import query_patient, query_site, score_batch
from imaging_meta.evaluation.statistics import summarize
from imaging_meta.learners.metric.protonet import PrototypicalNetwork
from imaging_meta.module import EpisodicModule
from imaging_meta.tasks import CLASSIFICATION, COPY_MASK, SEGMENTATION, get_task, task_of_learner_config
from tests.imaging_meta.fewshot import classification_episode, segmentation_episode

COMMON = {"method", "episode", "shot", "site", "query_id", "patient"}


def test_segmentation_records_have_dice_organ_and_hd95_with_a_spacing():
    batch = segmentation_episode(n_shot=2, n_query=3, tasks=2)
    batch = replace(batch, meta=[{"query_sites": ["a", "b", "c"]}, {}], site=["s0", "s1"])
    probs = batch.query_labels.float() * 0.9  # the truth itself: Dice 1
    recs = score_batch(SEGMENTATION, batch, {TRAINED: probs}, first_episode=10, spacing=(2.0, 2.0))
    assert [r["method"] for r in recs] == [TRAINED] * 6 + [COPY_MASK] * 6  # the baseline follows the learner
    r = recs[0]
    assert set(r) == COMMON | {"dice", "hd95", "organ"}
    assert r["shot"] == 2 and r["organ"] == "ellipse" and r["dice"] == pytest.approx(1.0) and r["hd95"] == 0.0
    assert [r["episode"] for r in recs[:6]] == [10, 10, 10, 11, 11, 11]
    assert [r["site"] for r in recs[:6]] == ["a", "b", "c", "s1", "s1", "s1"]  # a query's own site when it has one
    assert "hd95" not in score_batch(SEGMENTATION, batch, {TRAINED: probs}, baselines=False)[0]
    assert query_site(batch, 0, 1) == "b" and query_site(batch, 1, 0) == "s1"
    assert [r["patient"] for r in recs[:6]] == batch.query_ids[0] + batch.query_ids[1]  # no patients named: the query


def test_records_name_each_querys_patient_the_cluster_of_the_bootstrap():
    batch = segmentation_episode(n_shot=1, n_query=2, tasks=2)
    batch = replace(batch, meta=[{"query_patients": ["pa", "pb"]}, {"query_patients": ["pa", "pc"]}])
    recs = score_batch(SEGMENTATION, batch, {TRAINED: batch.query_labels.float()}, baselines=False)
    assert [r["patient"] for r in recs] == ["pa", "pb", "pa", "pc"]
    assert query_patient(batch, 1, 1) == "pc"


def test_classification_records_have_accuracy_class_label_and_probabilities():
    batch = classification_episode(n_way=3, n_shot=2, n_query=2, tasks=2)
    probs = torch.nn.functional.one_hot(batch.query_labels, 3).float() * 0.8 + 0.2 / 3
    probs[0, 0] = probs[0, 0].flip(0)  # task 0, query 0 (class 0) is now called class 2
    recs = score_batch(CLASSIFICATION, batch, {TRAINED: probs, UNTRAINED: probs}, shot=2)
    assert len(recs) == 2 * 2 * 6 and {r["method"] for r in recs} == {TRAINED, UNTRAINED}  # no label-only baseline
    r = recs[0]
    assert set(r) == COMMON | {"acc", "class", "classes", "label", "probs"}
    assert r["acc"] == 0.0 and recs[1]["acc"] == 1.0 and r["label"] == 0 and r["class"] == r["classes"][0]
    assert r["shot"] == 2 and len(r["probs"]) == 3 and isinstance(r["episode"], int)
    assert summarize(recs, "acc", CLASSIFICATION.groups)[TRAINED]["all"]["mean"] == pytest.approx((5 / 6 + 1) / 2)


def test_a_classification_csv_row_keeps_every_probability_and_names_its_classes():
    """records.csv wrote probabilities to 6 decimals (a probability below 5e-7 became a tie at 0, which changed
    the AUC recomputed from it) in the episode's class order, which the CSV did not give."""
    import csv
    import io
    import json

    record = {"method": TRAINED, "shot": 1, "episode": 3, "site": "s", "patient": "p", "query_id": "q", "label": 1,
              "classes": ["normal tissue", "lesion, cystic", "2"], "probs": [3.2e-9, 0.9999999, 9.68e-8]}
    buf = io.StringIO()
    csv.writer(buf).writerows([CLASSIFICATION.csv_columns, CLASSIFICATION.csv_row(record)])
    header, row = csv.reader(io.StringIO(buf.getvalue()))
    got = dict(zip(header, row, strict=True))
    assert [float(v) for v in got["probs"].split()] == record["probs"]
    assert json.loads(got["classes"]) == record["classes"] and got["class"] == "lesion, cystic"
    assert float(got["confidence"]) == 0.9999999 and got["correct"] == "1"
    assert got["choice_space"] == got["choice_loo_accuracy"] == got["choice_weights"] == ""  # not task-adaptive


def test_a_task_adaptive_choice_reaches_records_csv():
    """`score_batch` kept the task-adaptive learner's choice in memory only; records.csv left it out (a review)."""
    import csv
    import io
    import json

    from imaging_meta.evaluation.scoring import _choice_fields

    choice = {"space": "weighted", "loo_accuracy": {"weighted": 0.75, "pixels": 0.5},
              "weights": {"embedding": 0.3, "pixels": 0.7}}
    record = {"method": TRAINED, "shot": 2, "episode": 0, "site": "s", "query_id": "q", "label": 0,
              "classes": ["a", "b"], "probs": [0.6, 0.4], **_choice_fields([choice], 0)}
    buf = io.StringIO()
    csv.writer(buf).writerows([CLASSIFICATION.csv_columns, CLASSIFICATION.csv_row(record)])
    header, row = csv.reader(io.StringIO(buf.getvalue()))
    got = dict(zip(header, row, strict=True))
    assert got["choice_space"] == "weighted" and float(got["choice_loo_accuracy"]) == 0.75
    assert json.loads(got["choice_weights"]) == choice["weights"]


def test_module_episode_ids_are_unique_over_ranks_and_index_the_fixed_list():
    """Rank r scores fixed episodes r, r + world, ... (the datamodules' rank::world share); every record's id
    is the episode's index in the fixed list, whatever the batch size."""
    episodes = classification_episode(n_way=2, n_shot=1, n_query=1, tasks=5).tasks()
    world, ids = 2, {}
    for rank in range(world):
        module = EpisodicModule(PrototypicalNetwork(backbone="conv4", backbone_kwargs={"width": 4}), baselines=False)
        module._trainer = SimpleNamespace(world_size=world, global_rank=rank)
        module.on_validation_epoch_start()
        mine = episodes[rank::world]
        for start in range(0, len(mine), 2):
            batch = collate_episodes(mine[start : start + 2])
            for r in module._score("val", batch, {TRAINED: torch.full((batch.n_tasks, 2, 2), 0.5)}, baselines=False):
                ids.setdefault(r["episode"], set()).add(r["query_id"])
    assert sorted(ids) == [0, 1, 2, 3, 4]
    assert all(q == set(episodes[e].query_ids) for e, q in ids.items())


def test_the_untrained_learner_round_trips_through_a_checkpoint_section():
    learner = PrototypicalNetwork(backbone="conv4", backbone_kwargs={"width": 4})
    extra = {"untrained_state_dict": untrained_state(learner), "learner_config": learner.config}
    rebuilt = restore_untrained(extra)
    assert not rebuilt.training
    assert all(torch.equal(a, b) for a, b in zip(learner.state_dict().values(), rebuilt.state_dict().values(), strict=True))
    assert restore_untrained({}) is None


def test_the_task_of_a_learner_config_is_read_without_building_it():
    assert task_of_learner_config({"class_path": "imaging_meta.learners.metric.protonet.PrototypicalNetwork"}) is CLASSIFICATION
    assert task_of_learner_config({"class_path": "imaging_meta.learners.metric.protonet_seg.PrototypicalSegmenter"}) is SEGMENTATION
    maml = "imaging_meta.learners.gradient.maml.MAML"
    assert task_of_learner_config({"class_path": maml, "init_args": {"task": "segmentation"}}) is SEGMENTATION
    assert get_task("classification") is CLASSIFICATION
    with pytest.raises(ValueError, match="task must be one of"):
        get_task("detection")


def test_the_epoch_metrics_are_the_mean_over_every_ranks_queries(monkeypatch):
    """With a split of the fixed episodes that is uneven over the ranks (5 on one, 4 on the other), val/score
    (what picks best.ckpt), test/<metric> and hp/test_metric were the mean of the ranks' means, not the report's
    mean over queries. They are computed from the gathered records now."""
    import imaging_meta.module as mod

    module = EpisodicModule(PrototypicalNetwork(backbone="conv4", backbone_kwargs={"width": 4}), baselines=False)
    module._trainer = SimpleNamespace(world_size=2, global_rank=0, sanity_checking=False)
    rank0 = [{"method": TRAINED, "acc": 1.0, "site": "a", "episode": 2 * i, "patient": "p"} for i in range(5)]
    rank1 = [{"method": TRAINED, "acc": 0.0, "site": "a", "episode": 2 * i + 1, "patient": "p"} for i in range(4)]
    monkeypatch.setattr(mod, "_gather", lambda records: rank0 + rank1)  # what all_gather_object gives every rank
    logged: dict[str, float] = {}
    monkeypatch.setattr(module, "log", lambda name, value, **kw: logged.__setitem__(name, float(value)))
    module._records["val"] = rank0
    module.on_validation_epoch_end()
    assert logged["val/score"] == logged["hp/val_metric"] == logged["val/acc"] == pytest.approx(5 / 9)  # not 1/2


def test_the_copy_baseline_is_a_majority_vote_with_ties_as_foreground():
    """Two shots kept only the pixels both support masks share (a tie went to background): the baseline got worse
    with more support at every even number of shots (a review)."""
    from imaging_meta.episode import Episode

    masks = torch.zeros(1, 4, 1, 4)
    masks[0, 0, 0, :2] = 1  # shot 0: pixels 0, 1
    masks[0, 1, 0, 1:3] = 1  # shot 1: pixels 1, 2
    masks[0, 2, 0, 1] = 1  # shot 2: pixel 1
    masks[0, 3, 0, 0] = 1  # shot 3: pixel 0
    ep = Episode(torch.zeros(1, 4, 1, 1, 4), masks, torch.zeros(1, 1, 1, 1, 4), torch.zeros(1, 1, 1, 4), batched=True)
    two = Episode(ep.support_images[:, :2], masks[:, :2], ep.query_images, ep.query_labels, batched=True)
    assert get_task(SEGMENTATION).baselines(two)[COPY_MASK][0, 0, 0].tolist() == [True, True, True, False]
    # four shots: pixel 0 in 2 of 4 (a tie: kept), pixel 1 in 3 of 4, pixel 2 in 1 of 4
    assert get_task(SEGMENTATION).baselines(ep)[COPY_MASK][0, 0, 0].tolist() == [True, True, False, False]
