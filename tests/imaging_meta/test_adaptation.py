"""Test-time adaptation: seeded and deterministic, never changes the caller's learner, uses the scans."""

from __future__ import annotations

import torch

from imaging_meta.adaptation import AdaptationEpisodes, adapt
from imaging_meta.learners.metric.protonet_seg import PrototypicalSegmenter


def _scans():
    g = torch.Generator().manual_seed(0)
    img = torch.rand(32, 32, 6, generator=g) * 0.2
    img[4:28, 4:28] += 0.3
    mask = torch.zeros(32, 32, 6, dtype=torch.bool)
    mask[10:18, 12:20, 1:5] = True
    img[mask] = 0.9
    query = img.flip(0).clone()
    return [(img, mask)], [query]


def _learner():
    torch.manual_seed(0)
    return PrototypicalSegmenter(backbone_kwargs={"features": [4, 4, 8, 8, 8, 4], "out_channels": 8})


def test_adaptation_is_seeded_and_leaves_the_learner_alone():
    supports, queries = _scans()
    learner = _learner()
    before = {k: v.clone() for k, v in learner.state_dict().items()}
    a = adapt(learner, supports, queries, steps=3, batch_size=2, seed=1, progress=False)
    b = adapt(learner, supports, queries, steps=3, batch_size=2, seed=1, progress=False)
    c = adapt(learner, supports, queries, steps=3, batch_size=2, seed=2, progress=False)
    for k, v in learner.state_dict().items():
        assert torch.equal(v, before[k]), k  # the caller's learner is untouched
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)  # same seed: the same weights
    assert any(not torch.equal(sa[k], sc[k]) for k in sa)  # another seed: other episodes
    assert any(not torch.equal(sa[k], before[k]) for k in sa)  # it did adapt
    assert adapt(learner, supports, queries, steps=0) is learner
    state = torch.random.get_rng_state()  # the caller's random stream is as it was (adapt used to reseed it)
    adapt(learner, supports, queries, steps=1, batch_size=2, seed=1, progress=False)
    assert torch.equal(torch.random.get_rng_state(), state)


def test_adaptation_episodes_use_superpixels_of_both_scans_and_the_support_labels():
    supports, queries = _scans()
    eps = AdaptationEpisodes(supports, queries, seed=0)
    assert len(eps.volumes) == 2 and len(eps.labelled) == 4  # the support's 4 labelled slices
    kinds: list[str] = []
    for kind in ("selfsup", "supervised"):
        method = getattr(eps, kind)
        setattr(eps, kind, lambda method=method, kind=kind: kinds.append(kind) or method())
    batch = eps.batch(4)
    assert batch.support_images.shape[:2] == (4, 1) and batch.query_labels.shape == (4, 1, 32, 32)
    assert all(float(m.sum()) > 0 for m in batch.support_labels)  # every episode has a structure to find
    assert kinds == ["selfsup", "supervised"] * 2  # half of a batch superpixels, half the support's labels

    class Seen(list):  # which scans the superpixel episodes read
        def __getitem__(self, i):
            seen.add(i)
            return list.__getitem__(self, i)

    seen: set[int] = set()
    eps.volumes = Seen(eps.volumes)
    for _ in range(20):
        eps.selfsup()
    assert seen == {0, 1}  # the support's superpixels and the query's


def test_the_support_superpixels_are_computed_once_for_several_queries(monkeypatch):
    """`segment` adapts once per query with the same supports: their superpixels are memoised per support set by
    content (they were recomputed for every query; queries are not kept), and the episodes are the same as
    without the memo."""
    import imaging_meta.adaptation as adaptation

    supports, queries = _scans()
    monkeypatch.setattr(adaptation, "_SUPPORT_SUPERPIXELS", type(adaptation._SUPPORT_SUPERPIXELS)())
    computed = []
    real = adaptation.volume_superpixels
    monkeypatch.setattr(adaptation, "volume_superpixels", lambda v: computed.append(v.shape) or real(v))
    first = AdaptationEpisodes(supports, queries, seed=0).batch(4)
    other_query = [queries[0].flip(1).clone()]
    AdaptationEpisodes([(supports[0][0].clone(), supports[0][1])], other_query, seed=0)
    assert len(computed) == 3  # the support once, each query once
    again = AdaptationEpisodes(supports, queries, seed=0).batch(4)
    torch.testing.assert_close(again.support_images, first.support_images)
    torch.testing.assert_close(again.query_labels, first.query_labels)
    assert len(computed) == 4  # the support from the memo, the query again
    many = [(supports[0][0] * f, supports[0][1]) for f in (1.0, 0.9, 0.8, 0.7, 0.6)]  # five supports, two queries
    for q in (queries, other_query):
        AdaptationEpisodes(many, q, seed=0)
    assert len(computed) == 4 + 5 + 1 + 1  # the five supports once (a set of its own), each query once


def test_adaptation_progress_bar_follows_the_quiet_switch(monkeypatch, capsys):
    """The bar is drawn when bars are on and not under ``imaging-meta --quiet`` (IMAGING_META_PROGRESS=0)."""
    from datamodules.progress import ENV

    supports, queries = _scans()
    learner = _learner()
    monkeypatch.setenv(ENV, "1")
    adapt(learner, supports, queries, steps=2, batch_size=2, seed=1)
    assert "adapting to the scans" in capsys.readouterr().err
    monkeypatch.setenv(ENV, "0")
    adapt(learner, supports, queries, steps=2, batch_size=2, seed=1)
    assert "adapting to the scans" not in capsys.readouterr().err


def test_adaptation_on_the_cpu_leaves_the_gpus_random_state_alone(monkeypatch):
    """torch.manual_seed reseeds every GPU too (lazily, before CUDA starts), which the fork of the CPU state does
    not undo: on a GPU host, adapting on the CPU changed the caller's CUDA random streams."""
    learner, (supports, queries) = _learner(), _scans()
    calls = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", lambda seed: calls.append(("all", seed)))
    monkeypatch.setattr(torch.cuda, "manual_seed", lambda seed: calls.append(("one", seed)))
    adapt(learner, supports, queries, steps=1, batch_size=2, seed=1, progress=False)
    assert calls == []


def test_adaptation_that_diverges_stops_with_the_step(monkeypatch):
    """A review: a non-finite adaptation loss went on for every step, and the diverged copy's empty masks were
    written as answers."""
    import pytest

    supports, queries = _scans()
    learner = _learner()
    monkeypatch.setattr(PrototypicalSegmenter, "loss", lambda self, ep: torch.tensor(float("nan"), requires_grad=True))
    with pytest.raises(FloatingPointError, match=r"non-finite loss \(nan\) at step 1 of 3; segment without it"):
        adapt(learner, supports, queries, steps=3, batch_size=2, seed=1, progress=False)


def test_adaptation_names_its_structure_for_a_learner_with_a_head_per_structure():
    """`FineTune` for segmentation keeps a head row per structure name and refused adaptation's nameless episodes,
    so `segment` (which adapts by default) failed for a finetune_seg checkpoint (a review)."""
    from imaging_meta.adaptation import ADAPTED_STRUCTURE
    from imaging_meta.learners.transfer.finetune import FineTune

    supports, queries = _scans()
    torch.manual_seed(0)
    learner = FineTune(task="segmentation", backbone="unet",
                       backbone_kwargs={"features": [4, 4, 8, 8, 8, 4], "out_channels": 8}, finetune_steps=2)
    before = {k: v.clone() for k, v in learner.state_dict().items() if torch.is_tensor(v)}
    adapted = adapt(learner, supports, queries, steps=2, batch_size=2, seed=1, progress=False)
    assert adapted.class_names == [ADAPTED_STRUCTURE] and learner.class_names == []
    after = adapted.state_dict()
    assert any(not torch.equal(after[k], v) for k, v in before.items())  # it did adapt
    # a checkpoint whose head table is full adapts with a name it knows (a new one asked to raise max_classes)
    full = FineTune(task="segmentation", backbone="unet", max_classes=2,
                    backbone_kwargs={"features": [4, 4, 8, 8, 8, 4], "out_channels": 8}, finetune_steps=2)
    full.register_classes(["liver", "spleen"])
    assert adapt(full, supports, queries, steps=2, batch_size=2, seed=1, progress=False).class_names == ["liver", "spleen"]
