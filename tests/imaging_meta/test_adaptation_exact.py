"""What a mutation review of test-time adaptation found unguarded: what each episode holds (with the random views
replaced by the slice itself, every image and mask is checked against the scans it came from), two different
views in each superpixel episode, support superpixels kept by content, the optimiser's settings and the batch size,
and the superpixel settings that reach the segmentation."""

from __future__ import annotations

import numpy as np
import torch

import imaging_meta.adaptation as adaptation
from datamodules.transforms.superpixels import (
    DEFAULT_SETTINGS,
    Superpixelsd,
    body_mask,
    slice_superpixels,
    volume_superpixels,
)
from imaging_meta.adaptation import AdaptationEpisodes, adapt
from tests.imaging_meta.test_adaptation import _learner


def _scans():
    """A support whose structure (0.9) moves with the slice, and a query of another body intensity (0.55)."""
    g = torch.Generator().manual_seed(0)
    img = torch.rand(32, 32, 6, generator=g) * 0.05
    img[4:28, 4:28] += 0.3
    mask = torch.zeros(32, 32, 6, dtype=torch.bool)
    for z in range(1, 5):
        mask[6 + 3 * z : 12 + 3 * z, 8:16, z] = True
    img[mask] = 0.9
    query = torch.rand(32, 32, 6, generator=g) * 0.05
    query[6:26, 6:26] += 0.55
    return [(img, mask)], [query]


def identity_views(augment, image, mask, n, seed):
    """`random_views` without the randomness: ``n`` copies of the slice and its mask."""
    return image.unsqueeze(0).repeat(n, 1, 1, 1), mask.unsqueeze(0).repeat(n, 1, 1, 1), {}


def _slice_of(volumes, image: torch.Tensor) -> tuple[int, int]:
    found = [(v, z) for v, vol in enumerate(volumes) for z in range(vol.shape[-1]) if torch.equal(vol[..., z].float(), image)]
    assert len(found) == 1, "an episode image that is no slice of the scans"
    return found[0]


def test_each_episode_is_a_slice_of_the_scans_with_its_own_mask(monkeypatch):
    monkeypatch.setattr(adaptation, "random_views", identity_views)
    (support, mask), = _scans()[0]
    query = _scans()[1][0]
    eps = AdaptationEpisodes([(support, mask)], [query], seed=0)
    volumes = [support, query]
    drawn_from = set()
    for _ in range(30):
        ep = eps.selfsup()
        v, z = _slice_of(volumes, ep.support_images[0, 0])
        drawn_from.add(v)
        sp = eps.superpixels[v][..., z]
        label = ep.support_labels[0].numpy() > 0.5
        ids = np.unique(sp[label])
        assert len(ids) == 1 and ids[0] > 0 and np.array_equal(label, sp == ids[0])  # one superpixel, all of it
        body = body_mask(volumes[v][..., z].clamp(0, 1).numpy())
        assert not (label & ~body).any() and label.sum() <= body.sum() / 2
        assert torch.equal(ep.query_labels[0], ep.support_labels[0])  # a view of the same slice
    assert drawn_from == {0, 1}  # the query's own superpixels, not only the support's
    for _ in range(20):
        ep = eps.supervised()
        for image, label in ((ep.support_images[0, 0], ep.support_labels[0]), (ep.query_images[0, 0], ep.query_labels[0])):
            v, z = _slice_of(volumes, image)
            assert v == 0 and torch.equal(label, mask[..., z].float())  # the support's label of that very slice


def test_the_two_views_of_a_superpixel_episode_differ():
    eps = AdaptationEpisodes(*_scans(), seed=0)
    for _ in range(5):
        ep = eps.selfsup()
        assert not torch.equal(ep.support_images, ep.query_images)


def test_support_superpixels_are_kept_by_content_not_by_shape():
    (support, _), = _scans()[0]
    other = support.flip(1).clone()
    first = adaptation._support_superpixels([support])
    second = adaptation._support_superpixels([other])
    np.testing.assert_array_equal(first[0], volume_superpixels(support.clamp(0, 1).numpy()))
    np.testing.assert_array_equal(second[0], volume_superpixels(other.clamp(0, 1).numpy()))
    assert not np.array_equal(first[0], second[0])


def test_adaptation_runs_adam_at_its_rate_for_its_steps_on_batches_of_its_size(monkeypatch):
    made: list[dict] = []

    class Recorded(torch.optim.Adam):
        def __init__(self, params, lr, **kwargs):
            super().__init__(params, lr=lr, **kwargs)
            made.append({"lr": lr, "steps": 0, "zeroed": 0})

        def step(self, closure=None):
            made[-1]["steps"] += 1
            return super().step(closure)

        def zero_grad(self, set_to_none=True):
            made[-1]["zeroed"] += 1
            return super().zero_grad(set_to_none)

    sizes: list[int] = []
    batch = AdaptationEpisodes.batch
    monkeypatch.setattr(torch.optim, "Adam", Recorded)
    monkeypatch.setattr(AdaptationEpisodes, "batch", lambda self, size: sizes.append(size) or batch(self, size))
    adapt(_learner(), *_scans(), steps=3, lr=3e-3, batch_size=3, seed=0, progress=False)
    assert made == [{"lr": 3e-3, "steps": 3, "zeroed": 3}] and sizes == [3, 3, 3]


# ------------------------------------------------------------------------------------------ superpixels
def test_the_body_is_the_largest_component_even_when_air_outnumbers_it():
    s = np.zeros((40, 40))
    s[5:15, 5:15] = 0.5  # the body: 100 pixels of 1600
    s[30, 30] = 0.5  # a detached speck
    body = body_mask(s)
    assert body.sum() == 100 and body[5:15, 5:15].all() and not body[30, 30]


def test_the_segmentation_settings_reach_the_superpixels():
    g = np.random.default_rng(0)
    s = np.clip(0.4 + 0.2 * g.standard_normal((48, 48)), 0, 1)
    s[:4], s[:, :4] = 0.0, 0.0
    default = slice_superpixels(s, min_pixels=1)
    for setting in ({"scale": 1000.0}, {"sigma": 3.0}, {"min_size": 400}):
        assert not np.array_equal(slice_superpixels(s, min_pixels=1, **setting), default), setting
    assert not np.array_equal(slice_superpixels(s, min_pixels=1, threshold=0.5), default)
    v = np.repeat(s[..., None], 2, axis=-1)
    np.testing.assert_array_equal(volume_superpixels(v, scale=1000.0, min_pixels=1)[..., 1],
                                  slice_superpixels(s, scale=1000.0, min_pixels=1))
    out = Superpixelsd(scale=1000.0, min_pixels=1)({"image": torch.from_numpy(v)[None]})["superpixels"]
    np.testing.assert_array_equal(out[0, ..., 0].numpy(), slice_superpixels(s, scale=1000.0, min_pixels=1))
    assert Superpixelsd(scale=1000.0).settings == {**DEFAULT_SETTINGS, "scale": 1000.0}

