"""Evidence for segmenting a whole scan that a slice-wise learner does not use: intensities, the slices without
the structure, and the axial neighbours. Plain torch on preprocessed volumes (H, W, D); no I/O.

* `IntensityModel`: histograms of the support's foreground and background intensities; the log-likelihood
  ratio of a query intensity under them. This is the evidence of the intensity-window baseline (threshold the
  query between percentiles of the support foreground), made a calibrated feature instead of a hard rule.
* `LogisticFusion`: an L2-regularised logistic regression, fitted on the support alone, that weighs the
  learner's logit against the intensity evidence, per task.
* `best_threshold` and `slice_gate`: a Dice-optimal pixel threshold and a per-slice rule that leaves slices
  empty whose best evidence looks like the support's slices without the structure (negative evidence).
* `smooth_z` and `body_extent`: 3D consistency along z, and where the body lies in a volume.
* `position_prior`: where a support scan shows the structure, carried to a query at the same relative position in
  the body (the copy-the-mask baseline's evidence, blurred).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def logit(p: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    p = p.clamp(eps, 1.0 - eps)
    return torch.log(p) - torch.log1p(-p)


@dataclass
class IntensityModel:
    """Foreground and background intensity histograms of the support (values of the preprocessed volume).

    Args:
        bins: histogram bins over [lo, hi] (values outside are clipped into the end bins).
        lo, hi: the intensity range (the preprocessing maps CT windows and MR percentiles to [0, 1]).
        prior: Laplace count added to every bin, so that an unseen intensity is unlikely, not impossible.
    """

    bins: int = 32
    lo: float = 0.0
    hi: float = 1.0
    prior: float = 1.0
    log_ratio: torch.Tensor | None = None

    def _index(self, values: torch.Tensor) -> torch.Tensor:
        x = (values.float() - self.lo) / (self.hi - self.lo)
        return (x * self.bins).long().clamp(0, self.bins - 1)

    def fit(self, values: torch.Tensor, labels: torch.Tensor) -> IntensityModel:
        """Histograms of ``values`` where ``labels`` is 1 (foreground) and 0 (background).

        Raises:
            ValueError: no foreground or no background value.
        """
        idx, lab = self._index(values.flatten()), labels.flatten() > 0.5
        if not lab.any() or lab.all():
            raise ValueError("the intensity model needs both foreground and background support pixels")
        fg = torch.bincount(idx[lab], minlength=self.bins).float() + self.prior
        bg = torch.bincount(idx[~lab], minlength=self.bins).float() + self.prior
        self.log_ratio = torch.log(fg / fg.sum()) - torch.log(bg / bg.sum())
        return self

    def llr(self, values: torch.Tensor) -> torch.Tensor:
        """log p(value | foreground) - log p(value | background), the shape of ``values``."""
        if self.log_ratio is None:
            raise RuntimeError("IntensityModel.llr before fit")
        return self.log_ratio.to(values.device)[self._index(values)]


class LogisticFusion:
    """p(foreground) = sigmoid(w . features + b), fitted by L-BFGS with an L2 penalty on w.

    Args:
        l2: penalty on the weights (not the bias), per pixel; it keeps the weights finite when the support
            separates perfectly.
    """

    def __init__(self, l2: float = 1e-3) -> None:
        self.l2 = float(l2)
        self.weight: torch.Tensor | None = None
        self.bias: torch.Tensor | None = None

    def fit(self, features: torch.Tensor, labels: torch.Tensor, steps: int = 50) -> LogisticFusion:
        """``features`` (N, F), ``labels`` (N,) in {0, 1}; classes are weighted to equal total weight."""
        x, y = features.double(), labels.double().flatten()
        pos = y.sum().clamp_min(1.0)
        neg = (1 - y).sum().clamp_min(1.0)
        sample_w = torch.where(y > 0.5, 0.5 / pos, 0.5 / neg)
        w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
        b = torch.zeros((), dtype=torch.float64, requires_grad=True)
        opt = torch.optim.LBFGS([w, b], max_iter=steps, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = (sample_w * F.binary_cross_entropy_with_logits(x @ w + b, y, reduction="none")).sum()
            loss = loss + self.l2 * (w * w).sum()
            loss.backward()
            return loss

        with torch.enable_grad():
            opt.step(closure)
        self.weight, self.bias = w.detach().float(), b.detach().float()
        return self

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        if self.weight is None or self.bias is None:  # fit sets both
            raise RuntimeError("LogisticFusion.logits before fit")
        return features.float() @ self.weight.to(features.device) + self.bias.to(features.device)


def best_threshold(probs: torch.Tensor, labels: torch.Tensor, candidates: int = 19) -> float:
    """The threshold in {0.05, ..., 0.95} with the best Dice of ``probs`` > t against ``labels``.

    The fusion weighs the classes equally, so on real supports this is mostly the cap, 0.95; the support's own
    optimum lies higher, but a query is predicted less surely than the support's leave-one-out slices, and freeing
    it lowered the real pairs' Dice (docs/segmentation.md#three-ways-to-close-the-spleens-gap-tried-and-not-kept-2026-12-06)."""
    y = labels.flatten() > 0.5
    p = probs.flatten()
    best, best_t = -1.0, 0.5
    for t in torch.linspace(0.05, 0.95, candidates).tolist():
        pred = p > t
        inter = (pred & y).sum().item()
        denom = pred.sum().item() + y.sum().item()
        dice = 2 * inter / denom if denom else 1.0
        if dice > best + 1e-9:
            best, best_t = dice, t
    return float(best_t)


def slice_scores(probs: torch.Tensor) -> torch.Tensor:
    """Per axial slice of ``probs`` (H, W, D): the largest 3 x 3 average of the probability, (D,)."""
    pooled = F.avg_pool2d(probs.permute(2, 0, 1).unsqueeze(1), 3, stride=1, padding=1)
    return pooled.flatten(1).amax(1)


def slice_gate(positive: torch.Tensor, negative: torch.Tensor) -> float | None:
    """The slice-score threshold that best separates the support's slices with the structure (``positive``
    scores) from those without (``negative``), by balanced accuracy; None when there is no negative slice or
    the scores do not separate better than chance."""
    if negative.numel() == 0 or positive.numel() == 0:
        return None
    cands = torch.cat([positive, negative]).unique()
    best, best_t = 0.5, None
    for t in cands.tolist():
        acc = 0.5 * ((positive >= t).float().mean() + (negative < t).float().mean()).item()
        if acc > best + 1e-9:
            best, best_t = acc, t
    if best_t is None:
        return None
    # halfway to the highest negative below it: a margin for query slices a little weaker than the support's
    below = negative[negative < best_t]
    return float((best_t + below.max().item()) / 2) if below.numel() else float(best_t)


def smooth_z(probs: torch.Tensor, weight: float = 0.25) -> torch.Tensor:
    """Average each axial slice of (H, W, D) with its two neighbours, (w, 1 - 2w, w); edges are replicated."""
    if probs.shape[-1] < 2 or weight <= 0:
        return probs
    padded = torch.cat([probs[..., :1], probs, probs[..., -1:]], dim=-1)
    return weight * padded[..., :-2] + (1 - 2 * weight) * padded[..., 1:-1] + weight * padded[..., 2:]


def consecutive_runs(zs: list[int]) -> list[tuple[int, int]]:
    """The runs of consecutive values in ``zs`` as ``(start, stop)`` ranges, in increasing order:
    ``[5, 6, 7, 9, 3] -> [(3, 4), (5, 8), (9, 10)]``."""
    runs: list[tuple[int, int]] = []
    for z in sorted(set(zs)):
        if runs and runs[-1][1] == z:
            runs[-1] = (runs[-1][0], z + 1)
        else:
            runs.append((z, z + 1))
    return runs


def body_extent(volume: torch.Tensor, level: float = 0.05, share: float = 0.1) -> tuple[int, int]:
    """First and last axial slice of a preprocessed (H, W, D) volume whose body area (voxels above ``level``)
    is at least ``share`` of the largest slice's; the whole range when there is no body."""
    area = (volume > level).flatten(0, 1).float().sum(0)
    if area.max() <= 0:
        return 0, volume.shape[-1] - 1
    zs = torch.nonzero(area >= share * area.max()).flatten()
    return int(zs.min()), int(zs.max())


def position_prior(support: torch.Tensor, mask: torch.Tensor, query: torch.Tensor, sigma: float = 3.0,
                   reach: int = 2, floor: float = 0.05) -> torch.Tensor:
    """(H, W, D) for the query (H, W, D): for each query slice, the support's (H', W', D') mask at the same relative
    position within the body's z extent (`body_extent`), and its ``reach`` axial neighbours on each side (their
    maximum), resized in-plane to the query's grid, blurred with a Gaussian of ``sigma`` pixels, scaled so that its
    highest value is 1, and mapped into [``floor``, 1 - ``floor``]. Preprocessed volumes are centred on the body in-plane, so the in-plane position
    carries too. What copying the support mask knows, as a soft map: `imaging_meta.volume.segmenter` fuses it only
    with two or more support scans, where its weight is fitted across patients."""
    s_lo, s_hi = body_extent(support)
    q_lo, q_hi = body_extent(query)
    h, w, d = query.shape
    m = F.interpolate(mask.float().permute(2, 0, 1).unsqueeze(1), size=(h, w), mode="bilinear", align_corners=False)
    r = max(1, int(3 * sigma))
    x = torch.arange(-r, r + 1, dtype=torch.float32)
    g = torch.exp(-(x**2) / (2 * sigma**2))
    g = g / g.sum()
    m = F.conv2d(F.conv2d(m, g.view(1, 1, -1, 1), padding=(r, 0)), g.view(1, 1, 1, -1), padding=(0, r))[:, 0]
    m = m / m.amax().clamp(min=1e-6)  # a structure narrower than the blur still reaches 1 where it is
    out = torch.zeros(h, w, d)
    for z in range(d):
        sz = int(round(s_lo + (z - q_lo) / max(q_hi - q_lo, 1) * (s_hi - s_lo)))
        lo, hi = max(0, sz - reach), min(m.shape[0] - 1, sz + reach)
        if lo <= hi:
            out[..., z] = m[lo : hi + 1].amax(0)
    return floor + (1.0 - 2.0 * floor) * out.clamp(0.0, 1.0)
