"""Self-supervised segmentation episodes from superpixels (after SSL-ALPNet, Ouyang et al., ECCV 2020).

An unlabelled slice becomes a 1-way task: one of its superpixels (`datamodules.superpixels`, computed once in
the cached preprocessing) is the "organ". The support and the query are independent random views of the
same slice and the same superpixel mask: geometric (rotation, zoom, shift; the mask follows with
nearest-neighbour, then a smooth elastic deformation) and intensity (gamma, scaling, noise; the image
only). The network has to find, in one view, the region it was shown in the other, which is what few-shot
segmentation asks of it later.

* `SuperpixelEpisodeSpec`: which volume, slice and superpixel, and the seed of the views. Indices only.
* `SuperpixelEpisodeSampler`: draws specs from superpixel tables (volume -> slice -> superpixel ids); it never
  sees pixels or labels.
* `MixedEpisodeSampler`: each episode is self-supervised with probability ``ratio``, else supervised.
* `SuperpixelEpisodeDataset`: turns a spec into an `Episode`, reading only ``image`` and ``superpixels``.
  With a supervised dataset beside it, it also serves supervised specs, so one loader serves a mix.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from datamodules.classification import RandItemAugment
from datamodules.samplers import EpisodeSampler
from imaging_meta.episode import Episode

#: SSL-ALPNet's views: affine and intensity changes strong enough that the task is not an identity (an
#: elastic deformation is added on top, see `warp`). No flips: left and right mean something in anatomy.
SELFSUP_AUGMENT = {"rotate_degrees": 15.0, "scale": 0.15, "translate": 0.08, "flip_prob": 0.0, "gamma": (0.6, 1.6),
                   "intensity_scale": 0.15, "noise_std": 0.03, "prob": 1.0}


@dataclass(frozen=True)
class SuperpixelEpisodeSpec:
    """One self-supervised episode.

    Attributes:
        volume: index into the self-supervised volume list.
        slice: axial slice index.
        superpixel: the superpixel id (in that slice) that is the foreground.
        seed: seed of the episode's views (support views first, then query views).
    """

    volume: int
    slice: int
    superpixel: int
    seed: int


class SuperpixelEpisodeSampler(EpisodeSampler):
    """Draws `SuperpixelEpisodeSpec`s: a slice uniformly over all tabulated slices, then one of its superpixels.

    Args:
        tables: volume index -> slice index -> superpixel ids large enough to be a target
            (`datamodules.superpixels.superpixel_table`).
        n_episodes: episodes per epoch (shared across DDP ranks).
        seed: base seed.
    """

    def __init__(self, tables: Mapping[int, Mapping[int, Sequence[int]]], n_episodes: int, seed: int = 0) -> None:
        self.slices = [(int(v), int(z), [int(i) for i in ids]) for v, t in sorted(tables.items())
                       for z, ids in sorted(t.items()) if len(ids)]
        if not self.slices:
            raise ValueError(
                "no slice has a superpixel large enough to be a target; lower superpixels.min_pixels or check that the "
                "images are not empty (the body mask keeps what is brighter than superpixels.threshold)"
            )
        if n_episodes < 1:
            raise ValueError(f"n_episodes must be >= 1, got {n_episodes}")
        self.n_episodes, self.seed = int(n_episodes), int(seed)

    def draw(self, rng: np.random.Generator) -> SuperpixelEpisodeSpec:
        v, z, ids = self.slices[int(rng.integers(len(self.slices)))]
        return SuperpixelEpisodeSpec(v, z, ids[int(rng.integers(len(ids)))], int(rng.integers(2**31 - 1)))


class MixedEpisodeSampler(EpisodeSampler):
    """Supervised and self-supervised episodes in one stream: each draw is self-supervised with probability
    ``ratio``. Both parts draw from the same seeded generator, so the mix is as reproducible as either.

    Args:
        supervised: a supervised sampler (its ``draw`` is used).
        selfsup: a `SuperpixelEpisodeSampler`.
        ratio: share of self-supervised episodes, in [0, 1].
        n_episodes: episodes per epoch.
        seed: base seed.
    """

    def __init__(self, supervised: EpisodeSampler, selfsup: SuperpixelEpisodeSampler, ratio: float, n_episodes: int,
                 seed: int = 0) -> None:
        if not 0.0 <= ratio <= 1.0:
            raise ValueError(f"the self-supervised ratio must lie in [0, 1], got {ratio}")
        self.supervised, self.selfsup, self.ratio = supervised, selfsup, float(ratio)
        self.n_episodes, self.seed = int(n_episodes), int(seed)

    def draw(self, rng: np.random.Generator):
        return self.selfsup.draw(rng) if rng.random() < self.ratio else self.supervised.draw(rng)


#: elastic deformation of the views: displacements up to 4% of the half-width, smooth over a 4x4 control grid.
ELASTIC_ALPHA, ELASTIC_GRID = 0.04, 4


def elastic_field(rng: np.random.RandomState, n: int, size: Sequence[int], alpha: float, grid: int) -> np.ndarray:
    """Smooth random displacements (n, H, W, 2) in normalised coordinates: uniform draws in [-alpha, alpha] on
    a ``grid`` x ``grid`` lattice, upsampled bicubically (zero when ``alpha`` is 0)."""
    coarse = rng.uniform(-alpha, alpha, (n, 2, grid, grid)) if alpha > 0 else np.zeros((n, 2, grid, grid))
    fine = torch.nn.functional.interpolate(torch.as_tensor(coarse, dtype=torch.float32), size=tuple(int(s) for s in size),
                                           mode="bicubic", align_corners=True)
    return fine.permute(0, 2, 3, 1).numpy()


def warp(x: torch.Tensor, params: dict, mode: str = "bilinear") -> torch.Tensor:
    """The geometric part of a view: ``params``' affine (`RandItemAugment.randomize`) plus its ``elastic``
    displacement field, applied to ``x`` (N, C, H, W). The views draw no flips."""
    theta = torch.as_tensor(params["theta"], dtype=x.dtype)
    grid = torch.nn.functional.affine_grid(theta, list(x.shape), align_corners=False)
    grid = grid + torch.as_tensor(params["elastic"], dtype=x.dtype)
    return torch.nn.functional.grid_sample(x, grid, mode=mode, padding_mode="zeros", align_corners=False)


def _plain(t) -> torch.Tensor:
    return t.as_tensor() if hasattr(t, "as_tensor") else torch.as_tensor(t)


class SuperpixelEpisodeDataset(torch.utils.data.Dataset):
    """Turns a `SuperpixelEpisodeSpec` into an unbatched `Episode` of ``n_shot`` support and ``n_query`` query
    views; reads ``image`` and ``superpixels`` of the volume, never a label.

    Args:
        volumes: a map-style dataset; ``volumes[i]`` has ``image`` and ``superpixels``, each (1, H, W, D).
        volume_ids: pseudonymous case id of each volume (for the episode's ids).
        sites: site key of each volume.
        n_shot: support views per episode.
        n_query: query views per episode.
        augment: settings of the views (`RandItemAugment` arguments; default `SELFSUP_AUGMENT`).
        supervised: a dataset for supervised specs, when the loader mixes both kinds.
        elastic_alpha: largest elastic displacement, as a fraction of the slice's half-width (0: none).
        elastic_grid: control points per side of the elastic displacement field.
    """

    def __init__(self, volumes, volume_ids: Sequence[str], sites: Sequence[str], n_shot: int, n_query: int,
                 augment: dict | None = None, supervised=None, elastic_alpha: float = ELASTIC_ALPHA,
                 elastic_grid: int = ELASTIC_GRID) -> None:
        self.volumes = volumes
        self.elastic_alpha, self.elastic_grid = float(elastic_alpha), int(elastic_grid)
        self.volume_ids, self.sites = list(volume_ids), list(sites)
        self.n_shot, self.n_query = int(n_shot), int(n_query)
        self.augment = RandItemAugment(**{**SELFSUP_AUGMENT, **(augment or {})})
        self.supervised = supervised

    def __len__(self) -> int:
        return len(self.volume_ids)

    def views(self, spec: SuperpixelEpisodeSpec) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """The ``n_shot + n_query`` views of a spec: images (N, 1, H, W), masks (N, 1, H, W), and the drawn
        transform parameters (`RandItemAugment.randomize`), which are the same for the same spec."""
        vol = self.volumes[spec.volume]
        image = _plain(vol["image"])[..., spec.slice].float()  # (1, H, W)
        mask = (_plain(vol["superpixels"])[..., spec.slice] == spec.superpixel).float()  # (1, H, W)
        n = self.n_shot + self.n_query
        self.augment.set_random_state(seed=spec.seed)
        params = self.augment.randomize((n, *image.shape))
        params["elastic"] = elastic_field(self.augment.R, n, image.shape[-2:], self.elastic_alpha, self.elastic_grid)
        images = RandItemAugment.intensity(warp(image.expand(n, -1, -1, -1), params), params)
        masks = warp(mask.expand(n, -1, -1, -1), params, mode="nearest")
        return images, masks, params

    def __getitem__(self, spec) -> Episode:
        if not isinstance(spec, SuperpixelEpisodeSpec):
            if self.supervised is None:
                raise TypeError(f"index this dataset with a SuperpixelEpisodeSpec, not {type(spec).__name__}")
            return self.supervised[spec]
        images, masks, _ = self.views(spec)
        k = self.n_shot
        vid = self.volume_ids[spec.volume]
        return Episode(
            support_images=images[:k],
            support_labels=(masks[:k, 0] > 0.5).float(),
            query_images=images[k:],
            query_labels=(masks[k:, 0] > 0.5).float(),
            classes=[f"superpixel {spec.superpixel}"],
            site=self.sites[spec.volume],
            support_ids=[vid] * k,
            query_ids=[vid] * self.n_query,
            meta={"support_slices": [spec.slice] * k, "query_slices": [spec.slice] * self.n_query,
                  "query_sites": [self.sites[spec.volume]] * self.n_query, "selfsup": True},
        )
