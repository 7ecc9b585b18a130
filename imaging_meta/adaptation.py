"""Test-time adaptation on the user's own scans (``segment --adapt-steps``, ``evaluate --adapt-steps``).

Before predicting, a copy of the learner is fine-tuned for ``steps`` optimiser steps on episodes drawn from the
scans at hand, where the domain shift is (the user's scanner, protocol and anatomy):

* **self-supervised superpixel episodes** (SSL-ALPNet, Ouyang et al., ECCV 2020) from the support *and* query
  scans: a superpixel of a slice is the "structure"; the support and the query are two random views of that
  slice (`datamodules.transforms.augment.random_views`). No label is used.
* **supervised support episodes**: two support slices that show the structure, each augmented, one as the
  support and the other as the query, with the support's own masks.

Half of each batch is of each kind. The only label used is the support's. Seeded: the same scans, learner and
seed give the same adapted weights (CPU). The learner the caller passed is never changed.
"""

from __future__ import annotations

import copy
import hashlib
import logging
from collections import OrderedDict
from collections.abc import Iterable, Sequence

import numpy as np
import torch

from datamodules.progress import progress as progress_bar
from datamodules.transforms.augment import SELFSUP_AUGMENT, RandItemAugment, random_views
from datamodules.transforms.superpixels import superpixel_table, volume_superpixels
from imaging_meta.episode import Episode, collate_episodes
from imaging_meta.learners.base import Learner

logger = logging.getLogger(__name__)

#: the default of ``--adapt-steps`` when adaptation is asked for without a number
DEFAULT_STEPS = 40


#: the structure name of adaptation's episodes: a learner whose training loss keeps a head row per structure
#: (`FineTune`) needs one, and refused the nameless episodes, so `segment` failed for it (a review)
ADAPTED_STRUCTURE = "adapted structure"


def structure_name(learner: Learner) -> str:
    """The structure name of ``learner``'s adaptation episodes: `ADAPTED_STRUCTURE`, which a learner with a head row
    per structure name (`FineTune`) adds to the table of its copy; when that table is full, the first name it knows
    (the copy's row is trained and discarded with it, and its predict fits a head of its own; a new name failed
    there with advice to raise max_classes and retrain; a review)."""
    names = getattr(learner, "class_names", None)
    if not isinstance(names, list) or not names or ADAPTED_STRUCTURE in names:
        return ADAPTED_STRUCTURE
    full = len(names) >= int(getattr(learner, "max_classes", len(names) + 1))
    return str(names[0]) if full else ADAPTED_STRUCTURE


def _episode(images: torch.Tensor, masks: torch.Tensor, name: str = ADAPTED_STRUCTURE) -> Episode:
    """A 1-shot, 1-query episode from two views (2, 1, H, W) and their masks (2, 1, H, W), of structure ``name``."""
    m = (masks[:, 0] > 0.5).float()
    return Episode(images[:1], m[:1], images[1:], m[1:], classes=[name])


#: the superpixels of the last support sets, by their volumes' content: a `segment` run adapts once per query with
#: the same support scans, whose superpixels it recomputed for each (a review, 2026-12-06). Queries are not kept
_SUPPORT_SUPERPIXELS: OrderedDict[tuple[str, ...], list[np.ndarray]] = OrderedDict()
SUPPORT_SETS_KEPT = 2


def _in_unit_range(volume: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(volume.clamp(0, 1).numpy())


def _support_superpixels(volumes: Sequence[torch.Tensor]) -> list[np.ndarray]:
    """`volume_superpixels` of each support volume (H, W, D), memoised per support set by content (copies are
    handed out). Adaptation keeps the default settings in pixels at any spacing: scaled to the spacing as training
    scales them (`settings_for_spacing`), its pseudo-structures at a thin structure's finer spacing grew, and the 37
    real pairs lost 0.015 (docs/segmentation.md, 2026-12-07)."""
    values = [_in_unit_range(v) for v in volumes]
    key = tuple(hashlib.sha256(v.tobytes()).hexdigest() + str(v.shape) for v in values)
    if key not in _SUPPORT_SUPERPIXELS:
        _SUPPORT_SUPERPIXELS[key] = [volume_superpixels(v) for v in values]
        while len(_SUPPORT_SUPERPIXELS) > SUPPORT_SETS_KEPT:
            _SUPPORT_SUPERPIXELS.popitem(last=False)
    _SUPPORT_SUPERPIXELS.move_to_end(key)
    return [sp.copy() for sp in _SUPPORT_SUPERPIXELS[key]]


class AdaptationEpisodes:
    """Draws the adaptation episodes; numpy-seeded, deterministic."""

    def __init__(
        self,
        supports: Sequence[tuple[torch.Tensor, torch.Tensor]],
        queries: Sequence[torch.Tensor],
        seed: int = 0,
        name: str = ADAPTED_STRUCTURE,
    ) -> None:
        self.rng = np.random.default_rng(seed)
        self.name = name  # the structure name of every episode (`structure_name`)
        self.augment = RandItemAugment(**SELFSUP_AUGMENT)
        self.volumes = [img for img, _ in supports] + list(queries)
        self.superpixels = _support_superpixels([img for img, _ in supports]) + [
            volume_superpixels(_in_unit_range(q)) for q in queries]
        self.tables = [superpixel_table(sp) for sp in self.superpixels]
        self.labelled = [
            (img[..., z], mask[..., z].float())
            for img, mask in supports
            for z in torch.nonzero(mask.flatten(0, 1).sum(0) > 0).flatten().tolist()
        ]
        if not any(self.tables) and not self.labelled:
            raise ValueError("no superpixel and no labelled support slice to adapt on")

    def _seed(self) -> int:
        return int(self.rng.integers(2**31 - 1))

    def selfsup(self) -> Episode | None:
        choices = [(v, z) for v, t in enumerate(self.tables) for z in t]
        if not choices:
            return None
        v, z = choices[int(self.rng.integers(len(choices)))]
        ids = self.tables[v][z]
        sp = ids[int(self.rng.integers(len(ids)))]
        image = self.volumes[v][..., z].unsqueeze(0).float()
        mask = torch.from_numpy(self.superpixels[v][..., z] == sp).float().unsqueeze(0)
        images, masks, _ = random_views(self.augment, image, mask, 2, self._seed())
        return _episode(images, masks, self.name)

    def supervised(self) -> Episode | None:
        if not self.labelled:
            return None
        i, j = (int(x) for x in self.rng.integers(len(self.labelled), size=2))
        views = []
        for k in (i, j):
            image, mask = self.labelled[k]
            im, ms, _ = random_views(
                self.augment, image.unsqueeze(0).float(), mask.unsqueeze(0), 1, self._seed()
            )
            views.append((im, ms))
        return _episode(torch.cat([views[0][0], views[1][0]]), torch.cat([views[0][1], views[1][1]]), self.name)

    def batch(self, size: int) -> Episode:
        eps: list[Episode] = []
        for n in range(size):
            ep = self.selfsup() if n % 2 == 0 else self.supervised()
            ep = ep if ep is not None else (self.supervised() or self.selfsup())
            assert ep is not None  # __init__ refuses data with neither a superpixel nor a labelled slice
            eps.append(ep)
        return collate_episodes(eps)


def adapt(
    learner: Learner,
    supports: Sequence[tuple[torch.Tensor, torch.Tensor]],
    queries: Sequence[torch.Tensor],
    steps: int = DEFAULT_STEPS,
    lr: float = 1e-4,
    batch_size: int = 4,
    seed: int = 0,
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> Learner:
    """A copy of ``learner`` fine-tuned on episodes from the support and query scans (see the module docstring).

    Args:
        learner: the meta-trained learner (left unchanged).
        supports: preprocessed (image, structure mask) volumes (H, W, D).
        queries: preprocessed query volumes (H, W, D).
        steps: optimiser steps (0: the learner itself is returned).
        lr: Adam learning rate.
        batch_size: episodes per step.
        seed: the seed of the episodes and of torch.
        progress: show a progress bar (on a terminal, unless ``imaging-meta --quiet``: `datamodules.progress`).
    """
    if steps <= 0:
        return learner
    dev = torch.device(device)
    # the adaptation's own seed, and the caller's random state as it was afterwards: the CPU generator and, on a
    # GPU, that GPU's alone (torch.manual_seed would reseed every GPU, which fork_rng would not restore)
    cuda = [dev.index if dev.index is not None else torch.cuda.current_device()] if dev.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.random.default_generator.manual_seed(seed)
        for index in cuda:
            with torch.cuda.device(index):
                torch.cuda.manual_seed(seed)
        return _adapt(learner, supports, queries, steps, lr, batch_size, seed, device, progress)


def _adapt(learner: Learner, supports: Sequence[tuple[torch.Tensor, torch.Tensor]], queries: Sequence[torch.Tensor],
           steps: int, lr: float, batch_size: int, seed: int, device: torch.device | str, progress: bool) -> Learner:
    episodes = AdaptationEpisodes(supports, queries, seed, structure_name(learner))
    adapted = copy.deepcopy(learner).to(device).train()
    params = [p for p in adapted.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    rounds: Iterable[int] = range(steps)
    if progress:  # drawn on a terminal, off under `imaging-meta --quiet` (`datamodules.progress`)
        rounds = progress_bar(rounds, desc="adapting to the scans", total=steps, unit="step")
    with torch.enable_grad():
        for step in rounds:
            ep = episodes.batch(batch_size).to(device)
            loss = adapted.loss(ep)
            if not torch.isfinite(loss):  # a diverged copy would predict nothing, as an empty mask (a review)
                raise FloatingPointError(f"test-time adaptation: non-finite loss ({float(loss.detach())}) at step "
                                         f"{step + 1} of {steps}; segment without it (--adapt-steps 0)")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if hasattr(rounds, "set_postfix"):
                rounds.set_postfix(loss=f"{loss.item():.3f}")
    logger.info(
        "adapted for %d steps on %d scans (last loss %.3f)",
        steps,
        len(episodes.volumes),
        float(loss.detach()),
    )
    return adapted.eval()
