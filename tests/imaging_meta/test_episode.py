import pytest
import torch

from imaging_meta.episode import Episode, collate_episodes


def ep(k=2, q=3, h=8):
    return Episode(torch.rand(k, 1, h, h), torch.rand(k, h, h) > 0.5, torch.rand(q, 1, h, h), torch.rand(q, h, h) > 0.5,
                   classes=["liver"], site="s", support_ids=["a"] * k, query_ids=["b"] * q)


def test_collate_and_task_round_trip():
    e1, e2 = ep(), ep()
    b = collate_episodes([e1, e2])
    assert b.batched and b.n_tasks == 2 and b.support_images.shape == (2, 2, 1, 8, 8)
    assert b.classes == [["liver"], ["liver"]]
    t = b.task(1)
    assert torch.equal(t.query_images, e2.query_images) and t.site == "s"
    assert b.to("cpu").support_labels.dtype == torch.bool
    assert e1.unsqueeze().n_tasks == 1
    # each task keeps its own metadata (the two above share theirs: a pick of task 0's would pass)
    e3 = Episode(e2.support_images, e2.support_labels, e2.query_images, e2.query_labels, classes=["spleen"], site="t",
                 support_ids=["c", "d"], query_ids=["e", "f", "g"])
    other = collate_episodes([e1, e3]).task(1)
    assert (other.site, other.classes, other.support_ids, other.query_ids) == ("t", ["spleen"], ["c", "d"], ["e", "f", "g"])
    moved = b.to("meta")  # every tensor goes to the device asked for
    assert all(getattr(moved, k).device.type == "meta" for k in Episode.TENSOR_FIELDS)


def test_collate_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="shapes differ"):
        collate_episodes([ep(k=1), ep(k=2)])


def test_dataloader_pinning_reaches_the_episode(monkeypatch):
    from torch.utils.data._utils.pin_memory import pin_memory

    called = []
    monkeypatch.setattr(Episode, "pin_memory", lambda self: called.append(1) or self)
    pin_memory(ep())
    assert called == [1]


def test_task_of_a_batched_episode_built_directly_keeps_shared_metadata():
    import torch

    from imaging_meta.episode import Episode

    ep = Episode(torch.zeros(3, 2, 1, 4, 4), torch.zeros(3, 2, 4, 4), torch.zeros(3, 1, 1, 4, 4), torch.zeros(3, 1, 4, 4),
                 site="one site", batched=True)
    t = ep.task(2)
    assert t.support_images.shape == (2, 1, 4, 4) and t.site == "one site" and t.classes == []
