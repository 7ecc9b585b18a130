"""How unlike the support scans a query scan looks, in the learner's own features: a warning for a query that
may not show the structure at all.

The scan segmenter assumes that every query shows the structure; a scan of another body region still gets a
mask, and neither the mask's volume nor the learner's confidence tells the two apart (docs/segmentation.md, "A
query that does not show the structure"). What does is the whole slice. Each slice of the body is described by
the mean and standard deviation over the slice of every channel of the learner's encoder (`describe_slices`),
standardised with the support slices' statistics. A query scan's **novelty** is the median, over its body
slices, of the distance to the nearest support slice, divided by the median distance of a support slice to its
nearest other support slice (not one of its `GAP` neighbours on each side in its own scan, which are near
copies). About 1 is a scan like the support's. Measured with `make train`'s checkpoint and `segment`'s default
recipe (docs/segmentation.md, "A query that does not show the structure"): the other half of the same scan
0.66-2.4 (13 real pairs), another patient's scan of the same region 1.2-9.8 (17 of 20 real pairs; three
tumour-centred sarcoma crops 17.5-32.7) and 1.5-5.3 on the demo (12 pairs), scans of another body region
13.6-46.6 (43 of 43).

Needs a learner whose `Learner.slice_features` gives feature maps (`PrototypicalSegmenter`, `make train`'s); for
others the novelty is None. Plain torch; no labels are read.
"""

from __future__ import annotations

import torch

from imaging_meta.volume.evidence import body_extent

#: above this novelty, `segment` warns that the query may not show the structure, and an empty answer is not
#: predicted again without the support-fitted rules (docs/segmentation.md)
NOVELTY_WARN = 12.0
#: a support slice's neighbours within this many slices of its own scan are not its "nearest other slice"
GAP = 2


@torch.no_grad()
def describe_slices(learner, slices: torch.Tensor, device: torch.device | str = "cpu", chunk: int = 16) -> torch.Tensor | None:
    """(N, H, W) slices -> (N, 2F) per-channel means and standard deviations of the learner's feature maps
    (`Learner.slice_features`); None when the learner gives none."""
    features = getattr(learner, "slice_features", None)
    if not callable(features):
        return None
    out = []
    for start in range(0, slices.shape[0], max(1, chunk)):
        f = features(slices[start : start + chunk].unsqueeze(1).float().to(device))
        if f is None or f.dim() != 4:  # no feature maps from this learner
            return None
        f = f.float().flatten(2)  # (n, F, h * w)
        out.append(torch.cat([f.mean(-1), f.std(-1, unbiased=False)], 1).cpu())
    return torch.cat(out) if out else None


def _body(volume: torch.Tensor) -> list[int]:
    lo, hi = body_extent(volume)
    return list(range(lo, hi + 1))


class AppearanceCheck:
    """Fit on the support volumes ((H, W, D) preprocessed tensors), then `novelty` of a query volume."""

    def __init__(self, learner, device: torch.device | str = "cpu", chunk: int = 16) -> None:
        self.learner, self.device, self.chunk = learner, device, chunk
        self._support: torch.Tensor | None = None  # standardised support descriptors (S, 2F)
        self._centre: torch.Tensor | None = None
        self._scale: torch.Tensor | None = None
        self.reference: float | None = None  # median distance of a support slice to its nearest other one
        #: why `fit` left the check off (None: fitted, or not fitted yet); `novelty` is then None
        self.unchecked: str | None = None

    def _describe(self, volume: torch.Tensor, zs: list[int]) -> torch.Tensor | None:
        return describe_slices(self.learner, volume.permute(2, 0, 1)[zs], self.device, self.chunk)

    def fit(self, volumes: list[torch.Tensor]) -> AppearanceCheck:
        described, places = [], []
        for n, volume in enumerate(volumes):
            zs = _body(volume)
            d = self._describe(volume, zs)
            if d is None:
                self.unchecked = "no slice features in this checkpoint's learner"
                return self  # a learner without an encoder: no check
            described.append(d)
            places += [(n, z) for z in zs]
        feats = torch.cat(described)
        # each support slice is measured against slices beyond its GAP neighbours: fewer body slices give nothing
        # to measure (a review, 2026-12-07: the warning blamed the checkpoint's learner)
        too_few = (f"the support scan{'s have' if len(volumes) > 1 else ' has'} too few body slices ({feats.shape[0]}) "
                   f"to measure how alike slices look (more than {GAP + 1} in one scan, or two scans)")
        if feats.shape[0] < 2:
            self.unchecked = too_few
            return self
        centre, spread = feats.mean(0), feats.std(0)
        # a channel (nearly) constant over the support would turn any query difference into a huge distance
        scale = spread.clamp_min(0.1 * float(spread.median()) + 1e-8)
        support = (feats - centre) / scale
        dist = torch.cdist(support, support)
        scan = torch.tensor([n for n, _ in places])
        z = torch.tensor([z for _, z in places])
        near = (scan[:, None] == scan[None, :]) & ((z[:, None] - z[None, :]).abs() <= GAP)
        dist = dist.masked_fill(near, float("inf"))
        nearest = dist.min(1).values
        nearest = nearest[torch.isfinite(nearest)]
        if nearest.numel() == 0 or not float(nearest.median()) > 0:
            self.unchecked = too_few if nearest.numel() == 0 else "the support slices all look alike in the learner's features"
            return self
        self._support, self._centre, self._scale = support, centre, scale
        self.reference = float(nearest.median())
        return self

    def novelty(self, volume: torch.Tensor) -> float | None:
        """The query's median nearest-support-slice distance over `reference` (None: not fitted)."""
        if self._support is None or self.reference is None:
            return None
        d = self._describe(volume, _body(volume))
        if d is None or d.shape[0] == 0:
            return None
        assert self._centre is not None and self._scale is not None  # set with _support
        nearest = torch.cdist((d - self._centre) / self._scale, self._support).min(1).values
        return float(nearest.median()) / self.reference
