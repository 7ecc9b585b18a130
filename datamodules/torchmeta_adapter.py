"""Iterate imaging-meta episodes as torchmeta batches, for research loops written against torchmeta.

``torchmeta`` pins ``torch<1.10`` and cannot be installed beside torch 2.x, but many meta-learning loops
read its batches::

    for batch in dataloader:                      # torchmeta.utils.data.BatchMetaDataLoader
        train_inputs, train_targets = batch["train"]   # (B, N*K, C, H, W), (B, N*K)
        test_inputs, test_targets = batch["test"]      # (B, N*Q, C, H, W), (B, N*Q)

Such a loop moves over with one changed line: build the dataloader with `as_torchmeta` from any
imaging-meta datamodule's loader::

    dataloader = as_torchmeta(datamodule.train_dataloader())

Targets are class indices in ``[0, n_way)`` (classification) or masks (segmentation), exactly as in the
`Episode`; the episode's metadata (class names, site, pseudonymous ids) is under ``batch["meta"]``, a key
torchmeta loops ignore. Each pass over a training loader draws new episodes, as torchmeta draws new tasks: the
view advances its sampler's epoch (`set_epoch`, which Lightning calls in a fit) before every pass after the first
(until 2026-12-07 every pass replayed the first epoch's episodes; a review). Validation and test loaders hold fixed
episodes, and stay fixed.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from imaging_meta.episode import Episode


def episode_to_torchmeta(episode: Episode) -> dict:
    """A batched `Episode` as a torchmeta batch ``{"train": (x, y), "test": (x, y), "meta": {...}}``."""
    ep = episode.unsqueeze()
    return {
        "train": (ep.support_images, ep.support_labels),
        "test": (ep.query_images, ep.query_labels),
        "meta": {"classes": ep.classes, "site": ep.site, "support_ids": ep.support_ids, "query_ids": ep.query_ids},
    }


class TorchmetaBatches:
    """A re-iterable view of a loader of batched Episodes as torchmeta batches (see the module docstring)."""

    def __init__(self, loader: Iterable[Episode]) -> None:
        self.loader = loader
        self.passes = 0

    def __iter__(self) -> Iterator[dict]:
        sampler = getattr(self.loader, "sampler", None)
        if self.passes and callable(getattr(sampler, "set_epoch", None)):  # a training sampler: the next epoch
            sampler.set_epoch(int(getattr(sampler, "epoch", self.passes - 1)) + 1)  # type: ignore[union-attr]
        self.passes += 1
        for episode in self.loader:
            if not isinstance(episode, Episode):
                raise TypeError(f"as_torchmeta needs a loader of imaging-meta Episodes, got {type(episode).__name__}")
            yield episode_to_torchmeta(episode)

    def __len__(self) -> int:
        return len(self.loader)  # type: ignore[arg-type]


def as_torchmeta(loader: Iterable[Episode]) -> TorchmetaBatches:
    """Wrap a DataLoader of imaging-meta episodes so it yields torchmeta-style batches."""
    return TorchmetaBatches(loader)
