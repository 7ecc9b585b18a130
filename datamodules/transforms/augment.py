"""Seeded random augmentation: classification items and the views of self-supervised episodes.

* `RandItemAugment` (and its dictionary twin `RandItemAugmentd`): a small affine, flips, gamma, intensity
  scaling and noise for a stack of items, each item its own draw, in one vectorised call;
  `classification_augmentation` is the one classification training uses.
* `random_views`: the views of a self-supervised episode (SSL-ALPNet): `RandItemAugment`'s affine and
  intensity draws with `SELFSUP_AUGMENT`, plus a smooth elastic deformation (`elastic_field`, `warp`); the
  mask follows the image with nearest-neighbour sampling.

Slice augmentation of supervised segmentation episodes (MONAI dictionary transforms) lives in
`datamodules.transforms.volume.slice_augmentation`.
"""

from __future__ import annotations

from collections.abc import Collection, Hashable, Sequence
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F
from monai.config import KeysCollection
from monai.transforms import MapTransform, RandomizableTransform


def _rotation(angles: np.ndarray) -> np.ndarray:
    """(n, 2, 2) rotations from (n, 1) angles, or (n, 3, 3) from (n, 3) angles about z, y, x."""
    if angles.shape[1] == 1:
        c, s = np.cos(angles[:, 0]), np.sin(angles[:, 0])
        return np.stack([np.stack([c, -s], -1), np.stack([s, c], -1)], -2)
    out = np.broadcast_to(np.eye(3), (len(angles), 3, 3)).copy()
    for axis, (i, j) in enumerate(((0, 1), (0, 2), (1, 2))):
        c, s = np.cos(angles[:, axis]), np.sin(angles[:, axis])
        r = np.broadcast_to(np.eye(3), (len(angles), 3, 3)).copy()
        r[:, i, i], r[:, i, j], r[:, j, i], r[:, j, j] = c, -s, s, c
        out = out @ r
    return out


class RandItemAugment(RandomizableTransform):
    """Seeded random augmentation of a stack of items (N, C, *spatial) in [0, 1], each item its own draw:
    a small affine (rotation, zoom, shift; bilinear, zero padding), flips, gamma, intensity scaling, noise.

    One vectorised call per stack, where MONAI's ``RandAffine`` would run once per item. It is a MONAI
    ``RandomizableTransform``: ``set_random_state(seed)`` makes the sequence of draws deterministic.
    `RandItemAugmentd` is its dictionary twin.

    Args:
        rotate_degrees: largest rotation (about every axis in 3D).
        scale: largest relative zoom in or out.
        translate: largest shift as a fraction of the size.
        flip_prob: probability of a flip along each spatial axis.
        gamma: contrast (gamma) range, ``x ** gamma``.
        intensity_scale: largest relative intensity scaling.
        noise_std: standard deviation of the additive Gaussian noise.
        prob: probability of each of the affine, gamma, scaling and noise components (per item).
    """

    def __init__(
        self,
        rotate_degrees: float = 10.0,
        scale: float = 0.1,
        translate: float = 0.06,
        flip_prob: float = 0.5,
        gamma: Sequence[float] = (0.8, 1.25),
        intensity_scale: float = 0.1,
        noise_std: float = 0.02,
        prob: float = 0.8,
    ) -> None:
        RandomizableTransform.__init__(self, prob=1.0)
        if not (0 <= prob <= 1 and 0 <= flip_prob <= 1):
            raise ValueError(f"prob and flip_prob must lie in [0, 1], got {prob}, {flip_prob}")
        if len(gamma) != 2 or not 0 < gamma[0] <= gamma[1]:
            raise ValueError(f"gamma must be (low, high) with 0 < low <= high, got {tuple(gamma)}")
        self.rad = float(np.deg2rad(rotate_degrees))
        self.scale, self.translate, self.flip_prob = float(scale), float(translate), float(flip_prob)
        self.gamma = (float(gamma[0]), float(gamma[1]))
        self.intensity_scale, self.noise_std, self.item_prob = float(intensity_scale), float(noise_std), float(prob)

    def randomize(self, shape: Sequence[int]) -> dict[str, np.ndarray]:  # type: ignore[override]
        """Parameters for ``shape`` = (N, C, *spatial): per item affine matrices, flips and intensity draws."""
        n, _, *spatial = shape
        d = len(spatial)
        if d not in (2, 3):
            raise ValueError(f"RandItemAugment takes (N, C, H, W) or (N, C, D, H, W) items, got shape {tuple(shape)}")
        r = self.R
        on = r.rand(n) < self.item_prob
        rot = _rotation(r.uniform(-self.rad, self.rad, (n, 1 if d == 2 else 3)))
        zoom = 1.0 + r.uniform(-self.scale, self.scale, (n, d))
        shift = 2.0 * r.uniform(-self.translate, self.translate, (n, d))  # normalised coordinates span 2
        theta = np.concatenate([rot / zoom[:, None, :], shift[:, :, None]], axis=2)
        theta[~on] = np.concatenate([np.eye(d), np.zeros((d, 1))], axis=1)
        flips = r.rand(n, d) < self.flip_prob
        gamma = np.where(r.rand(n) < self.item_prob, r.uniform(*self.gamma, n), 1.0)
        factor = np.where(r.rand(n) < self.item_prob, 1.0 + r.uniform(-self.intensity_scale, self.intensity_scale, n), 1.0)
        noise_on = r.rand(n) < self.item_prob
        noise = r.standard_normal((n, *shape[1:])) * self.noise_std * noise_on.reshape(-1, *([1] * (len(shape) - 1)))
        return {"theta": theta, "flips": flips, "gamma": gamma, "factor": factor, "noise": noise}

    @staticmethod
    def geometric(x: torch.Tensor, p: dict[str, np.ndarray], mode: str = "bilinear") -> torch.Tensor:
        """The affine and the flips of ``p`` applied to ``x`` (N, C, *spatial)."""
        theta = torch.as_tensor(p["theta"], dtype=x.dtype)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        x = F.grid_sample(x, grid, mode=mode, padding_mode="zeros", align_corners=False)
        flips = torch.as_tensor(p["flips"])
        for axis in range(flips.shape[1]):
            sel = flips[:, axis].reshape(-1, *([1] * (x.ndim - 1)))
            x = torch.where(sel, x.flip(2 + axis), x)
        return x

    @staticmethod
    def intensity(x: torch.Tensor, p: dict[str, np.ndarray]) -> torch.Tensor:
        """Gamma, scaling and noise of ``p`` applied to ``x`` (N, C, *spatial) in [0, 1]; clipped to [0, 1]."""
        view = (-1, *([1] * (x.ndim - 1)))
        x = x.clamp(0.0, 1.0) ** torch.as_tensor(p["gamma"], dtype=x.dtype).reshape(view)
        x = x * torch.as_tensor(p["factor"], dtype=x.dtype).reshape(view) + torch.as_tensor(p["noise"], dtype=x.dtype)
        return x.clamp(0.0, 1.0)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, *spatial) -> augmented (N, C, *spatial) float32, a new draw per item."""
        x = torch.as_tensor(x, dtype=torch.float32)
        p = self.randomize(x.shape)
        return self.intensity(self.geometric(x, p), p)


class RandItemAugmentd(MapTransform, RandomizableTransform):
    """Dictionary twin of `RandItemAugment`: one draw per call, applied to every key alike (``mode`` per key,
    e.g. "nearest" for masks); the intensity part only to ``intensity_keys`` (default: the first key)."""

    def __init__(
        self,
        keys: KeysCollection,
        mode: str | Sequence[str] = "bilinear",
        intensity_keys: KeysCollection | None = None,
        allow_missing_keys: bool = False,
        **kwargs: Any,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob=1.0)
        self.aug = RandItemAugment(**kwargs)
        self.modes = [mode] * len(self.keys) if isinstance(mode, str) else list(mode)
        # intensity_keys: one key (a string) or a collection of keys
        self.intensity_keys = set([self.keys[0]] if intensity_keys is None else
                                  ([intensity_keys] if isinstance(intensity_keys, str)
                                   else cast(Collection[Hashable], intensity_keys)))

    def set_random_state(self, seed: int | None = None, state: np.random.RandomState | None = None) -> RandItemAugmentd:
        super().set_random_state(seed, state)
        self.aug.set_random_state(seed, state)
        return self

    def __call__(self, data):
        d = dict(data)
        first = next(iter(self.key_iterator(d)), None)
        if first is None:
            return d
        p = self.aug.randomize(torch.as_tensor(d[first]).shape)
        for key, mode in zip(self.keys, self.modes, strict=True):
            if key not in d:
                continue
            x = self.aug.geometric(torch.as_tensor(d[key], dtype=torch.float32), p, mode)
            d[key] = self.aug.intensity(x, p) if key in self.intensity_keys else x
        return d


def classification_augmentation(**kwargs: Any) -> RandItemAugment:
    """The training augmentation of classification items (see `RandItemAugment` for the settings)."""
    return RandItemAugment(**kwargs)


#: SSL-ALPNet's views: affine and intensity changes strong enough that the task is not an identity (an
#: elastic deformation is added on top, see `warp`). No flips: left and right mean something in anatomy.
SELFSUP_AUGMENT: dict[str, Any] = {"rotate_degrees": 15.0, "scale": 0.15, "translate": 0.08, "flip_prob": 0.0,
                                   "gamma": (0.6, 1.6), "intensity_scale": 0.15, "noise_std": 0.03, "prob": 1.0}


#: elastic deformation of the views: displacements up to 4% of the half-width, smooth over a 4x4 control grid.
ELASTIC_ALPHA, ELASTIC_GRID = 0.04, 4


def elastic_field(rng: np.random.RandomState, n: int, size: Sequence[int], alpha: float, grid: int) -> np.ndarray:
    """Smooth random displacements (n, H, W, 2) in normalised coordinates: uniform draws in [-alpha, alpha] on
    a ``grid`` x ``grid`` lattice, upsampled bicubically (zero when ``alpha`` is 0)."""
    coarse = rng.uniform(-alpha, alpha, (n, 2, grid, grid)) if alpha > 0 else np.zeros((n, 2, grid, grid))
    fine = F.interpolate(torch.as_tensor(coarse, dtype=torch.float32), size=tuple(int(s) for s in size),
                                           mode="bicubic", align_corners=True)
    return fine.permute(0, 2, 3, 1).numpy()


def warp(x: torch.Tensor, params: dict, mode: str = "bilinear") -> torch.Tensor:
    """The geometric part of a view: ``params``' affine (`RandItemAugment.randomize`) plus its ``elastic``
    displacement field, applied to ``x`` (N, C, H, W). The views draw no flips."""
    theta = torch.as_tensor(params["theta"], dtype=x.dtype)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    grid = grid + torch.as_tensor(params["elastic"], dtype=x.dtype)
    return F.grid_sample(x, grid, mode=mode, padding_mode="zeros", align_corners=False)


def random_views(
    augment: RandItemAugment,
    image: torch.Tensor,
    mask: torch.Tensor,
    n: int,
    seed: int,
    elastic_alpha: float = ELASTIC_ALPHA,
    elastic_grid: int = ELASTIC_GRID,
) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """``n`` random views of one slice and its mask, drawn from ``seed``.

    Args:
        augment: the affine and intensity settings (e.g. ``RandItemAugment(**SELFSUP_AUGMENT)``); it is reseeded.
        image: (1, H, W) slice in [0, 1].
        mask: (1, H, W) float mask.
        n: number of views.
        seed: seed of the draws: the same seed gives the same views.
        elastic_alpha: largest elastic displacement, as a fraction of the half-width (0: none).
        elastic_grid: control points per side of the elastic displacement field.

    Returns:
        images (n, 1, H, W), masks (n, 1, H, W) (nearest-neighbour, 0 or 1), and the drawn parameters
        (`RandItemAugment.randomize` plus ``elastic``), so that `warp` can repeat a view.

    Views in which the mask's region is lost (moved out of the slice, or a thin region missed by the nearest-
    neighbour warp) while ``mask`` has one are drawn again, all ``n`` together, from seeds derived from ``seed``
    (up to `VIEW_REDRAWS` times; then the last draw is kept): an episode whose support view has no foreground
    taught the learner to find what it was never shown (a review found 1 in 300 superpixel episodes of real scans).
    """
    for attempt in range(VIEW_REDRAWS + 1):
        augment.set_random_state(seed=(seed + attempt * 1_000_003) % 2**32)
        params = augment.randomize((n, *image.shape))
        params["elastic"] = elastic_field(augment.R, n, image.shape[-2:], elastic_alpha, elastic_grid)
        masks = warp(mask.expand(n, -1, -1, -1), params, mode="nearest")
        if not bool((mask > 0.5).any()) or bool((masks > 0.5).flatten(1).any(1).all()):
            break
    images = RandItemAugment.intensity(warp(image.expand(n, -1, -1, -1), params), params)
    return images, masks, params


#: how many times `random_views` draws all views again when one lost the mask's region
VIEW_REDRAWS = 8
