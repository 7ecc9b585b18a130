"""The torchmeta adapter: a torchmeta-style loop runs unchanged on imaging-meta episodes."""

import pytest
import torch

from datamodules.torchmeta_adapter import as_torchmeta, episode_to_torchmeta
from tests.imaging_meta.fewshot import classification_episode


def torchmeta_style_loop(dataloader, model):
    """A loop as written against torchmeta's BatchMetaDataLoader (prototypical accuracy on raw pixels)."""
    accs = []
    for batch in dataloader:
        train_inputs, train_targets = batch["train"]
        test_inputs, test_targets = batch["test"]
        for task in range(train_inputs.size(0)):
            emb_s, emb_q = model(train_inputs[task]), model(test_inputs[task])
            n_way = int(train_targets[task].max()) + 1
            protos = torch.stack([emb_s[train_targets[task] == c].mean(0) for c in range(n_way)])
            pred = torch.cdist(emb_q, protos).argmin(1)
            accs.append(float((pred == test_targets[task]).float().mean()))
    return accs


def test_batches_have_torchmeta_shapes_and_a_torchmeta_loop_runs():
    episodes = [classification_episode(n_way=5, n_shot=2, n_query=3, tasks=4, seed=s) for s in range(3)]
    batches = as_torchmeta(episodes)
    assert len(batches) == 3
    first = next(iter(batches))
    x, y = first["train"]
    assert x.shape == (4, 10, 1, 16, 16) and y.shape == (4, 10) and y.dtype == torch.long
    xq, yq = first["test"]
    assert xq.shape == (4, 15, 1, 16, 16) and yq.shape == (4, 15)
    assert first["meta"]["classes"][0] == episodes[0].classes[0]
    accs = torchmeta_style_loop(batches, lambda t: t.flatten(1))
    assert len(accs) == 12 and sum(accs) / len(accs) > 0.4  # raw-pixel prototypes beat chance (0.2)
    assert len(list(batches)) == 3  # re-iterable, like a DataLoader


def test_unbatched_episode_gets_a_task_dimension_and_bad_items_are_refused():
    ep = classification_episode(tasks=1).task(0)
    b = episode_to_torchmeta(ep)
    assert b["train"][0].shape[0] == 1
    with pytest.raises(TypeError, match="Episodes"):
        list(as_torchmeta([{"train": None}]))


def test_each_pass_over_a_training_loader_draws_new_episodes_and_fixed_ones_stay():
    """A review: torchmeta draws new tasks on every pass; the view replayed the training sampler's first epoch on
    every pass (only Lightning called set_epoch). Each pass after the first now advances the epoch; a loader of
    fixed episodes (validation, test) has no sampler epoch and stays as it is."""
    from datamodules.sampling.loading import episode_loader
    from datamodules.sampling.samplers_classification import ClassificationEpisodeSampler
    from imaging_meta.episode import Episode

    class SpecEpisodes(torch.utils.data.Dataset):  # the spec itself as the episode's support ids
        def __getitem__(self, spec):
            return Episode(torch.zeros(1, 1, 2, 2), torch.zeros(1, dtype=torch.long), torch.zeros(1, 1, 2, 2),
                           torch.zeros(1, dtype=torch.long), support_ids=[repr(spec)])

    labels = [c for c in range(6) for _ in range(4)]
    patients = [f"p{i}" for i in range(len(labels))]
    sampler = ClassificationEpisodeSampler(labels, patients, ["s"] * len(labels), n_way=3, n_shot=1, n_query=1,
                                           n_episodes=4, seed=0)
    view = as_torchmeta(episode_loader(SpecEpisodes(), sampler, batch_size=2, num_workers=0))
    passes = [[b["meta"]["support_ids"] for b in view] for _ in range(3)]
    assert passes[0] != passes[1] != passes[2] != passes[0] and sampler.epoch == 2
    fixed = as_torchmeta(episode_loader(SpecEpisodes(), list(ClassificationEpisodeSampler(
        labels, patients, ["s"] * len(labels), n_way=3, n_shot=1, n_query=1, n_episodes=4, seed=0)), 2, 0))
    assert [b["meta"]["support_ids"] for b in fixed] == [b["meta"]["support_ids"] for b in fixed] == passes[0]
