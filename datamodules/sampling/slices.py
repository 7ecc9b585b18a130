"""Labelled volumes -> slice tables, and the supervised slice episodes `SegmentationDataModule` serves.

`build_slice_table` says which axial slices of which cases show each organ (under setting 2 without the slices
that show a held-out organ at all); the samplers (`datamodules.sampling.samplers_segmentation`) draw episode
specs from such tables, and `SegmentationEpisodeDataset` turns a spec into an `Episode`, reading the pixels of
the preprocessed volumes. `case_items` gives the MONAI data dicts of cases for that preprocessing.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from datamodules.indexing.index import Case, Index
from datamodules.sampling.samplers_segmentation import SegmentationEpisodeSpec
from datamodules.transforms.volume import as_plain_tensor
from imaging_meta.episode import Episode

__all__ = ["SegmentationEpisodeDataset", "build_slice_table", "case_items", "slices_showing"]


def case_items(index: Index, cases: Sequence[Case]) -> list[dict]:
    """MONAI data dicts (absolute paths, modality) for the given cases."""
    items = []
    for c in cases:
        item = {"image": index.resolve(c.image), "modality": c.modality, "case_id": c.case_id}
        if c.label is not None:
            item["label"] = index.resolve(c.label)
        items.append(item)
    return items


def slices_showing(label: torch.Tensor, case: Case, organs: Sequence[str]) -> torch.Tensor:
    """(D,) bool: the axial slices of ``label`` (H, W, D) where any of ``organs`` appears at all."""
    shown = torch.zeros(label.shape[-1], dtype=torch.bool)
    for o in organs:
        if o in case.organs:
            shown |= (label == case.organs[o]).flatten(0, 1).any(0)
    return shown


def build_slice_table(
    labels: Sequence[torch.Tensor],
    cases: Sequence[Case],
    case_ids: Sequence[int],
    organs: Sequence[str],
    min_pixels: int = 20,
    exclude_organs: Sequence[str] = (),
) -> dict[str, dict[int, list[int]]]:
    """Which axial slices show each organ.

    Args:
        labels: ``labels[i]`` is the preprocessed label volume (1, H, W, D) of case index ``case_ids[i]``.
        cases: the case list that ``case_ids`` index into.
        case_ids: case indices to include.
        organs: structures to tabulate.
        min_pixels: a slice counts for an organ when the organ covers at least this many pixels.
        exclude_organs: drop every slice where any of these structures is present at all (SSL-ALPNet
            setting 2).

    Returns:
        organ -> case index -> sorted slice indices.
    """
    table: dict[str, dict[int, list[int]]] = {o: {} for o in organs}
    for lbl, ci in zip(labels, case_ids, strict=True):
        lbl = as_plain_tensor(lbl)[0]
        case = cases[ci]
        banned = slices_showing(lbl, case, exclude_organs)
        for o in organs:
            if o not in case.organs:
                continue
            counts = (lbl == case.organs[o]).flatten(0, 1).sum(0)
            zs = torch.nonzero((counts >= min_pixels) & ~banned).flatten().tolist()
            if zs:
                table[o][ci] = zs
    return table


class SegmentationEpisodeDataset(torch.utils.data.Dataset):
    """Turns a `SegmentationEpisodeSpec` into an unbatched `Episode`; pixels are read here and only here.

    Args:
        volumes: a map-style dataset; ``volumes[i]`` is the preprocessed dict (``image``, ``label``) of case ``i``.
        cases: the case records, aligned with ``volumes``.
        augment: seeded random slice transforms, or None.
    """

    def __init__(self, volumes, cases: Sequence[Case], augment=None) -> None:
        self.volumes = volumes
        self.cases = list(cases)
        self.augment = augment

    def __len__(self) -> int:
        return len(self.cases)

    def _slice(self, case_idx: int, z: int, organ: str, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        vol = self.volumes[case_idx]
        value = self.cases[case_idx].organs[organ]
        image = as_plain_tensor(vol["image"])[..., z].float()  # (1, H, W)
        mask = (as_plain_tensor(vol["label"])[..., z] == value).float()  # (1, H, W)
        if self.augment is not None:
            self.augment.set_random_state(seed=seed)
            out = self.augment({"image": image, "label": mask})
            image, mask = as_plain_tensor(out["image"]).float(), (as_plain_tensor(out["label"]) > 0.5).float()
        return image, mask[0]

    def __getitem__(self, spec: SegmentationEpisodeSpec) -> Episode:
        if not isinstance(spec, SegmentationEpisodeSpec):
            raise TypeError(f"index this dataset with a SegmentationEpisodeSpec (from a sampler), not {type(spec).__name__}")
        items = [self._slice(c, z, spec.organ, spec.seed + j) for j, (c, z) in enumerate(spec.support + spec.query)]
        k = len(spec.support)
        images = torch.stack([i for i, _ in items])
        masks = torch.stack([m for _, m in items])
        q_case = self.cases[spec.query[0][0]]
        return Episode(
            support_images=images[:k],
            support_labels=masks[:k],
            query_images=images[k:],
            query_labels=masks[k:],
            classes=[spec.organ],
            site=q_case.site,
            support_ids=[self.cases[c].case_id for c, _ in spec.support],
            query_ids=[self.cases[c].case_id for c, _ in spec.query],
            meta={"support_slices": [z for _, z in spec.support], "query_slices": [z for _, z in spec.query],
                  "query_sites": [self.cases[c].site for c, _ in spec.query],
                  # each query's pseudonymous patient: the cluster of the patient bootstrap in reports
                  "query_patients": [self.cases[c].patient for c, _ in spec.query]},
        )
