"""Self-supervised segmentation episodes from superpixels (after SSL-ALPNet, Ouyang et al., ECCV 2020).

An unlabelled slice becomes a 1-way task: one of its superpixels (`datamodules.transforms.superpixels`, computed once in
the cached preprocessing) is the "organ". The support and the query are independent random views of the
same slice and the same superpixel mask (`datamodules.transforms.augment.random_views`): geometric (rotation,
zoom, shift; the mask follows with nearest-neighbour, then a smooth elastic deformation) and intensity
(gamma, scaling, noise; the image only). The network has to find, in one view, the region it was shown in
the other, which is what few-shot segmentation asks of it later.

The samplers that draw the specs live in `datamodules.sampling.samplers_selfsup`. `SuperpixelEpisodeDataset`
turns a spec into an `Episode`, reading only ``image`` and ``superpixels``. With a supervised dataset beside
it, it also serves supervised specs, so one loader serves a mix.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from datamodules.sampling.samplers_selfsup import SuperpixelEpisodeSpec
from datamodules.transforms.augment import (
    ELASTIC_ALPHA,
    ELASTIC_GRID,
    SELFSUP_AUGMENT,
    RandItemAugment,
    random_views,
)
from datamodules.transforms.volume import as_plain_tensor
from imaging_meta.episode import Episode


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
        image = as_plain_tensor(vol["image"])[..., spec.slice].float()  # (1, H, W)
        mask = (as_plain_tensor(vol["superpixels"])[..., spec.slice] == spec.superpixel).float()  # (1, H, W)
        return random_views(self.augment, image, mask, self.n_shot + self.n_query, spec.seed,
                            self.elastic_alpha, self.elastic_grid)

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
