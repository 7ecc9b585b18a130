"""Segment a whole preprocessed scan with a slice-wise learner and the evidence it lacks.

`ScanSegmenter` is what `imaging-meta segment` and the whole-scan protocols of `imaging-meta evaluate` run.
It is fitted on the support scans alone (never a query label):

1. the learner's foreground probability of each query slice against the support slices that show the
   structure (``max_support_slices`` per support scan, spread over the structure);
2. ``intensity``: the log-likelihood ratio of each voxel's intensity under the support's foreground and
   background histograms (`evidence.IntensityModel`);
3. ``calibrate``: a logistic fusion of the learner's logit and the intensity evidence, and a Dice-optimal
   threshold, both fitted on the support: the support slices with the structure are predicted leave-one-out
   (from the other support slices, less those within ``loo_gap`` slices of it in the same scan: near copies),
   those without it from all of them. With two or more support scans
   (``across_scans``), each scan's slices are predicted from the other scans' slices instead, and their intensity
   evidence comes from the other scans' histograms: the calibration then sees what a query from another patient
   will look like, and weighs the intensity evidence by how well it carries from one patient to the next. With
   one support slice there is nothing to leave out; the fusion then adds the two log-odds (weights 1, 1) at
   threshold 0.5. The Dice of
   the leave-one-out support slices after fusion is kept as a self-check (``support_dice``): a model that cannot
   segment the support's own slices from each other will not segment the query;
   ``position`` (off by default; ``segment --position-prior``): with two or more support scans, also where the
   structure lies in the body: each support slice's
   `evidence.position_prior` from the other support scans (their masks at the same relative position), fused as a
   third feature whose weight is fitted across the patients, like the intensity's; at prediction, the prior from
   every support scan. Where the structure's place in the body (or in the crop) carries from patient to patient
   it gains weight, where it does not it loses it; with one support scan nothing can fit that weight, and it is
   not used (within one scan the relative position pairs different anatomy: docs/segmentation.md);
4. ``negatives``: a slice gate fitted on the same support predictions, which leaves a query slice empty when
   its strongest evidence is no stronger than on the support's slices without the structure;
5. ``smooth_z``: each slice's probability averaged with its axial neighbours;
6. ``relax_empty``: a query that comes out empty is predicted again with the support-fitted rules relaxed, one
   at a time (`RELAXATIONS`: without the intensity evidence, then also without the slice gate), from the same
   learner output. Both rules are fitted on the support patient, where the structure's intensities and slices
   stand out; in another patient's scan, and more so in another contrast phase, they can veto everything the
   learner found (docs/segmentation.md). For a query that shows the structure an empty mask is the worst answer
   there is (Dice 0), so relaxing can only help it; a query that may not show the structure should switch it off.
   It is not tried on a query scan that looks unlike the support scans (``novelty``, `appearance.AppearanceCheck`:
   whole slices compared in the learner's features), such as a scan of another body region.

`predict` returns a probability map shifted so that > 0.5 is the decision (the fitted threshold maps to 0.5);
the caller then keeps the largest 3D connected component, or every component when the support's structure is
in several parts (`imaging_meta.evaluation.volumes.keep_components`). Plain torch, no I/O, no Lightning.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass

import torch

from imaging_meta.episode import Episode
from imaging_meta.learners.base import Learner
from imaging_meta.volume.appearance import NOVELTY_WARN, AppearanceCheck
from imaging_meta.volume.evidence import (
    IntensityModel,
    LogisticFusion,
    best_threshold,
    body_extent,
    consecutive_runs,
    logit,
    position_prior,
    slice_gate,
    slice_scores,
    smooth_z,
)


@dataclass(frozen=True)
class ScanOptions:
    """What `ScanSegmenter` adds to the learner (every part can be switched off for an ablation)."""

    intensity: bool = True
    calibrate: bool = True
    negatives: bool = True
    smooth_z: float = 0.25
    max_support_slices: int = 12
    max_negative_slices: int = 12
    query_chunk: int = 16
    relax_empty: bool = True
    across_scans: bool = True
    loo_gap: int = 2
    position: bool = False

    def __post_init__(self) -> None:
        # smoothing gives each axial neighbour this weight and the slice itself 1 - 2 * smooth_z
        if not 0.0 <= self.smooth_z <= 0.5:  # also refuses NaN
            raise ValueError(f"--z-smoothing is the weight of each axial neighbour, from 0 (off) to 0.5; got {self.smooth_z}")
        for name in ("max_support_slices", "max_negative_slices", "query_chunk"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.loo_gap < 0:
            raise ValueError(f"loo_gap must be at least 0, got {self.loo_gap}")

    def as_dict(self) -> dict:
        return asdict(self)


#: `segment` warns, and `evaluate`'s whole-scan report counts the pairs, when the support self-check
#: (`ScanSegmenter.support_dice`) is below this: on the 21 real support -> query pairs of ``benchmarks/real``
#: (docs/segmentation.md) every pair below it scored at most 0.39 on its query
SUPPORT_CHECK_WARN = 0.4

LEARNER_ONLY = ScanOptions(intensity=False, calibrate=False, negatives=False, smooth_z=0.0, relax_empty=False)

#: what `ScanSegmenter.predict` relaxes, in this order, when a query comes out empty (``relax_empty``)
RELAXATIONS: tuple[tuple[str, dict], ...] = (
    ("without intensity evidence", dict(intensity=False)),
    ("without intensity evidence or slice gate", dict(intensity=False, negatives=False)),
)


def spread(zs: list[int], most: int) -> list[int]:
    """At most ``most`` of ``zs``, evenly spread: the one at the centre of each of ``most`` equal parts. (Until
    2026-12-07 the first and the last were always taken: one slice was the structure's tip, two its two tips;
    a review.)"""
    if len(zs) <= most:
        return list(zs)
    return [zs[int((i + 0.5) * len(zs) / most)] for i in range(most)]


def structure_slices(mask: torch.Tensor) -> list[int]:
    """Axial slices of a (H, W, D) mask that show the structure."""
    return torch.nonzero(mask.flatten(0, 1).sum(0) > 0).flatten().tolist()


class ScanSegmenter:
    """Fit on support scans, predict query scans (preprocessed (H, W, D) tensors in [0, 1])."""

    def __init__(
        self, learner: Learner, options: ScanOptions = ScanOptions(), device: torch.device | str = "cpu",
        progress: Callable[..., Iterable] | None = None,
    ):
        self.learner = learner
        self.options = options
        self.device = torch.device(device)
        #: wraps the learner's passes over chunks of slices in a progress bar: ``progress(iterable, desc, total=,
        #: unit=)``, e.g. `datamodules.progress.progress` (this module does no I/O); None: no bar
        self.progress = progress
        self.fusion: LogisticFusion | None = None
        self.intensity: IntensityModel | None = None
        self.threshold = 0.5
        self.gate: float | None = None
        self.support_images: torch.Tensor | None = None
        self.support_masks: torch.Tensor | None = None
        #: the support self-check: Dice of the support slices that show the structure, each predicted from the
        #: others (fused, at the fitted threshold; no gate, smoothing or 3D step); None with fewer than 2 slices
        self.support_dice: float | None = None
        #: which of `RELAXATIONS` the last `predict` used (None: none was needed, or none found anything)
        self.relaxed: str | None = None
        #: how unlike the support scans the last whole query looked (`imaging_meta.volume.appearance`; None: not
        #: measured, for a learner without an encoder or a prediction of chosen slices)
        self.novelty: float | None = None
        self._support_volumes: list[torch.Tensor] = []
        self._appearance: AppearanceCheck | None = None
        # the learner's leave-one-out output on the support (positive slices, negative slices, their images), and
        # with ``across_scans`` the support's intensity evidence out of fold (positive slices, then negative)
        self._support_probs: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self._support_llr: torch.Tensor | None = None
        self._relaxations: dict[ScanOptions, ScanSegmenter] = {}
        self._pos_place: list[tuple[int, int]] = []
        # with ``position`` and two or more support scans: the support volumes and masks, each support slice's
        # position prior from the other scans (positive slices, then negative), and the last query's
        self._scans: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._support_prior: torch.Tensor | None = None
        self._query_prior: torch.Tensor | None = None

    # ------------------------------------------------------------------ learner calls
    def _learned(self, images: torch.Tensor, s_img: torch.Tensor, s_mask: torch.Tensor) -> torch.Tensor:
        """(N, H, W) slices -> (N, H, W) learner probabilities against the support slices (K, 1, H, W)."""
        out = []
        sup_i = s_img.unsqueeze(0).to(self.device)
        sup_m = s_mask.unsqueeze(0).to(self.device)
        # query_chunk is for 80 x 80 slices: fewer per pass for larger ones (memory grows with pixels x prototypes)
        chunk = max(1, int(self.options.query_chunk * 6400 / max(1, images.shape[-2] * images.shape[-1])))
        starts: Iterable[int] = range(0, images.shape[0], chunk)
        n_chunks = -(-images.shape[0] // chunk)
        if self.progress is not None and n_chunks > 1:  # a large query at a fine scale takes minutes here
            starts = self.progress(starts, "segmenting slices", total=n_chunks, unit="chunk")
        fitted, asked = None, n_chunks < 2 or not hasattr(self.learner, "fit_support")
        for start in starts:
            qi = images[start : start + chunk].unsqueeze(1).unsqueeze(0).to(self.device)
            ep = Episode(
                sup_i, sup_m, qi, torch.zeros(qi.shape[:2] + qi.shape[-2:], device=self.device), batched=True
            )
            if not asked:  # the support's part of predict once, not once per chunk
                fitted, asked = self.learner.fit_support(ep), True
            probs = self.learner.predict(ep) if fitted is None else self.learner.predict_fitted(fitted, qi)
            out.append(probs[0].float().cpu())
        return torch.cat(out) if out else images.new_zeros(images.shape)

    def _features(self, probs: torch.Tensor, images: torch.Tensor, llr: torch.Tensor | None = None,
                  prior: torch.Tensor | None = None) -> torch.Tensor:
        """The learner's logit, (with an intensity model) the intensity evidence: ``llr`` when given (the
        support's, out of fold), else the intensity model's for ``images``, and (with a position prior) its logit:
        ``prior`` when given (the support's, out of fold), else the last query's."""
        feats = [logit(probs)]
        if self.intensity is not None:
            feats.append(self.intensity.llr(images) if llr is None else llr)
        if self._support_prior is not None:
            chosen = prior if prior is not None else self._query_prior
            assert chosen is not None and chosen.shape == probs.shape  # predict sets the query's before fusing
            feats.append(logit(chosen))
        return torch.stack(feats, dim=-1)

    def _fused(self, probs: torch.Tensor, images: torch.Tensor, llr: torch.Tensor | None = None,
               prior: torch.Tensor | None = None) -> torch.Tensor:
        """Probabilities after fusion, shifted so that the fitted threshold is 0.5."""
        if not self.options.calibrate:
            return probs
        assert self.fusion is not None  # fit makes it when calibrating
        z = self.fusion.logits(self._features(probs, images, llr, prior).flatten(0, -2)).view(probs.shape)
        return torch.sigmoid(z - float(logit(torch.tensor(self.threshold))))

    # ------------------------------------------------------------------ fit
    @torch.no_grad()
    def fit(
        self, supports: list[tuple[torch.Tensor, torch.Tensor]], slices: list[list[int]] | None = None
    ) -> ScanSegmenter:
        """Fit on (image, mask) support volumes, each (H, W, D).

        Args:
            supports: preprocessed support volumes and their boolean structure masks.
            slices: the support slices to use per volume (default: those with the structure, spread).

        Raises:
            ValueError: a support without the structure; one support volume given twice.
        """
        o = self.options
        for j in range(len(supports)):  # a scan given twice is its own "other patient": the fits across support
            for i in range(j):  # scans would be in fold, and the novelty's reference distance 0 (a review)
                if supports[i][0].shape == supports[j][0].shape and torch.equal(supports[i][0], supports[j][0]):
                    raise ValueError(f"supports {i} and {j} are the same volume: give each support scan once")
        self._support_volumes, self._appearance = [image for image, _ in supports], None
        pos_i, pos_m, neg_i = [], [], []
        pos_scan, neg_scan = [], []  # each slice's support scan
        pos_z: list[int] = []
        neg_z: list[int] = []
        for n, (image, mask) in enumerate(supports):
            present = structure_slices(mask)
            if not present:
                raise ValueError(f"support {n}: the mask has no foreground after preprocessing")
            zs = slices[n] if slices is not None else spread(present, o.max_support_slices)
            pos_i += [image[..., z] for z in zs]
            pos_m += [mask[..., z].float() for z in zs]
            lo, hi = body_extent(image)
            absent = spread([z for z in range(lo, hi + 1) if z not in set(present)], o.max_negative_slices)
            neg_i += [image[..., z] for z in absent]
            pos_scan += [n] * len(zs)
            pos_z += list(zs)
            neg_scan += [n] * len(absent)
            neg_z += list(absent)
        self.support_images = torch.stack(pos_i).unsqueeze(1)  # (K, 1, H, W)
        self.support_masks = torch.stack(pos_m)  # (K, H, W)
        self._relaxations = {}
        self._pos_place = list(zip(pos_scan, pos_z, strict=True))  # (scan, axial slice) of each support slice
        if not o.calibrate:
            return self
        k = self.support_images.shape[0]
        images = self.support_images[:, 0]
        negs = torch.stack(neg_i) if neg_i else images.new_zeros((0,) + images.shape[1:])
        self._support_llr, self._support_prior, self._scans = None, None, list(supports)
        folds = self._across_scans(images, negs, pos_scan, neg_scan) if o.across_scans else None
        if folds is not None:
            p_pos, p_neg, self._support_llr = folds
            if o.position:  # each scan's slices from the other scans' masks: fitted across patients, as a query is
                others = {n: torch.stack([position_prior(img, m, supports[n][0])
                                          for j, (img, m) in enumerate(supports) if j != n]).mean(0)
                          for n in set(pos_scan)}
                places = list(zip(pos_scan, pos_z, strict=True)) + list(zip(neg_scan, neg_z, strict=True))
                self._support_prior = torch.stack([others[n][..., z] for n, z in places])
        else:
            if k >= 2:
                loo = [self._learned(images[i : i + 1], *self._without(i)) for i in range(k)]
                p_pos = torch.cat(loo)
            else:
                p_pos = self._learned(images, self.support_images, self.support_masks)
            p_neg = self._learned(negs, self.support_images, self.support_masks)
        self._support_probs = (p_pos, p_neg, negs)
        self._calibrate()
        return self

    def _across_scans(
        self, images: torch.Tensor, negs: torch.Tensor, pos_scan: list[int], neg_scan: list[int]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None:
        """Leave one support scan out: each scan's slices predicted by the learner from the other scans' slices,
        and their intensity evidence from the other scans' histograms. Returns the learner's probabilities on
        the positive and negative support slices and the intensity evidence on both (positive first; None without
        intensity evidence), or None when there is no such fold: fewer than two scans with slices that show the
        structure, a scan with negative slices only, or other scans without foreground or background pixels."""
        assert self.support_images is not None and self.support_masks is not None
        pos, neg = torch.tensor(pos_scan, dtype=torch.long), torch.tensor(neg_scan, dtype=torch.long)
        masks = self.support_masks > 0.5
        scans = sorted(set(pos_scan))
        if len(scans) < 2 or not set(neg_scan) <= set(scans):
            return None
        for n in scans:  # every fold's other scans need foreground and background pixels to fit on
            others = masks[pos != n]
            if not others.any() or (others.all() and not bool((neg != n).any())):
                return None
        p_pos, p_neg = torch.zeros(images.shape), torch.zeros(negs.shape)
        llr = torch.zeros((images.shape[0] + negs.shape[0],) + images.shape[1:]) if self.options.intensity else None
        for n in scans:
            mine, others = pos == n, pos != n
            mine_neg, others_neg = neg == n, neg != n
            s_img, s_mask = self.support_images[others], self.support_masks[others]
            p_pos[mine] = self._learned(images[mine], s_img, s_mask)
            if mine_neg.any():
                p_neg[mine_neg] = self._learned(negs[mine_neg], s_img, s_mask)
            if llr is not None:
                model = IntensityModel().fit(
                    torch.cat([images[others], negs[others_neg]]),
                    torch.cat([self.support_masks[others], torch.zeros_like(negs[others_neg])]),
                )
                llr[torch.cat([mine, mine_neg])] = model.llr(torch.cat([images[mine], negs[mine_neg]])).cpu()
        return p_pos, p_neg, llr

    def _calibrate(self) -> None:
        """Fit the intensity model, fusion, threshold and gate of ``self.options`` on the support's learner output."""
        assert self.support_images is not None and self.support_masks is not None and self._support_probs is not None
        o = self.options
        p_pos, p_neg, negs = self._support_probs
        self.gate, self.support_dice = None, None
        images = self.support_images[:, 0]
        k = images.shape[0]
        all_i = torch.cat([images, negs])
        all_y = torch.cat([self.support_masks, torch.zeros_like(negs)])
        all_p = torch.cat([p_pos, p_neg])
        self.intensity = IntensityModel().fit(all_i, all_y) if o.intensity else None
        llr = self._support_llr if o.intensity else None  # out of fold, when calibrated across scans
        pri = self._support_prior
        self.fusion = LogisticFusion()
        if k >= 2:
            features = self._features(all_p, all_i, llr, pri).flatten(0, -2)
            self.fusion.fit(features, all_y.flatten())
            weight = self.fusion.weight
            if pri is not None and weight is not None and float(weight[-1]) < 0:  # never an anti-prior (a review): supports
                # whose structures lie apart say the place does not carry, not that the query's lies elsewhere
                features = features.clone()
                features[:, -1] = 0.0  # the prior's weight stays 0 (L2 from 0), the rest fitted without it
                self.fusion.fit(features, all_y.flatten())
            self.threshold = best_threshold(torch.sigmoid(self.fusion.logits(features)), all_y)
        else:  # nothing to leave out: add the log-odds
            n_feat = 2 if o.intensity else 1
            self.fusion.weight, self.fusion.bias = torch.ones(n_feat), torch.zeros(())
            self.threshold = 0.5
        if k >= 2:
            self.support_dice = _dice(self._fused(p_pos, images, None if llr is None else llr[:k],
                                                  None if pri is None else pri[:k]) > 0.5,
                                      self.support_masks > 0.5)
        if o.negatives and negs.shape[0]:
            fused = self._fused(all_p, all_i, llr, pri)  # (K + N, H, W)
            scores = slice_scores(fused.permute(1, 2, 0))
            self.gate = slice_gate(scores[:k], scores[k:])

    def _relaxed(self, changes: dict) -> ScanSegmenter | None:
        """This segmenter with ``changes`` to its options, calibrated on the same support predictions (kept);
        None when the changes change nothing."""
        opts = dataclasses.replace(self.options, relax_empty=False, **changes)
        if opts == dataclasses.replace(self.options, relax_empty=False):
            return None
        if opts not in self._relaxations:
            seg = ScanSegmenter(self.learner, opts, self.device, self.progress)
            seg.support_images, seg.support_masks = self.support_images, self.support_masks
            seg._support_probs, seg._support_llr = self._support_probs, self._support_llr
            seg._support_prior, seg._scans = self._support_prior, self._scans
            seg._calibrate()
            self._relaxations[opts] = seg
        return self._relaxations[opts]

    def _without(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The support slices without slice ``i`` and its axial neighbours of the same scan (within
        ``loo_gap`` slices: near copies of it, which would make the leave-one-out prediction easier than a query's);
        without only ``i`` when nothing else would be left."""
        assert self.support_images is not None and self.support_masks is not None  # in fit, after the supports
        n, z = self._pos_place[i]
        gap = self.options.loo_gap
        keep = [j for j, (m, w) in enumerate(self._pos_place) if j != i and not (m == n and abs(w - z) <= gap)]
        if not keep:
            keep = [j for j in range(self.support_images.shape[0]) if j != i]
        return self.support_images[keep], self.support_masks[keep]

    # ------------------------------------------------------------------ predict
    @property
    def appearance_unchecked(self) -> str | None:
        """Why the last whole query's appearance was not measured (``novelty`` None), when the check could not be
        fitted on the support scans; None otherwise."""
        return self._appearance.unchecked if self._appearance is not None else None

    @property
    def unlike(self) -> bool:
        """Whether the last whole query looked unlike the support scans (``novelty`` above `NOVELTY_WARN`): it
        may be another body region, and its empty answer is not predicted again."""
        return self.novelty is not None and self.novelty > NOVELTY_WARN

    @torch.no_grad()
    def predict(self, volume: torch.Tensor, slices: list[int] | None = None) -> torch.Tensor:
        """(H, W, D) query volume -> (H, W, D) probability map; > 0.5 is the decision.

        With ``relax_empty``, a map without any voxel above 0.5 is predicted again with each of `RELAXATIONS` in
        turn, and the first that finds something is returned (its name in ``self.relaxed``); not for a query
        whose appearance is unlike the support scans' (``self.novelty`` above
        `imaging_meta.volume.appearance.NOVELTY_WARN`), which may not show the structure at all.

        Args:
            slices: predict only these axial slices (the others are 0), as the oracle-extent protocol does.
        """
        if self.support_images is None or self.support_masks is None:  # fit sets both
            raise RuntimeError("ScanSegmenter.predict before fit")
        zs = list(range(volume.shape[-1])) if slices is None else list(slices)
        self.relaxed, self.novelty = None, None
        if slices is None:
            if self._appearance is None:
                self._appearance = AppearanceCheck(self.learner, self.device, self.options.query_chunk).fit(
                    self._support_volumes)
            self.novelty = self._appearance.novelty(volume)
        if not zs:
            return torch.zeros(volume.shape, dtype=torch.float32)
        images = torch.stack([volume[..., z] for z in zs])
        learned = self._learned(images, self.support_images, self.support_masks)
        self._query_prior = None
        if self._support_prior is not None:
            prior = torch.stack([position_prior(img, m, volume) for img, m in self._scans]).mean(0)
            self._query_prior = torch.stack([prior[..., z] for z in zs])
        out = self._decide(learned, images, zs, volume.shape)
        if self.options.relax_empty and self.options.calibrate and not self.unlike and not (out > 0.5).any():
            tried: list[ScanSegmenter] = []
            for name, changes in RELAXATIONS:
                seg = self._relaxed(changes)
                if seg is None or seg in tried:  # nothing to relax, or the same options as the last retry
                    continue
                tried.append(seg)
                seg._query_prior = self._query_prior
                retry = seg._decide(learned, images, zs, volume.shape)
                if (retry > 0.5).any():
                    self.relaxed = name
                    return retry
        return out

    def _decide(self, learned: torch.Tensor, images: torch.Tensor, zs: list[int], shape: torch.Size) -> torch.Tensor:
        """The learner's output on the slices ``zs`` of a query of ``shape`` -> the probability map (fusion,
        gate, z smoothing; slices not in ``zs`` are 0)."""
        probs = self._fused(learned, images)
        if self.gate is not None:
            keep = slice_scores(probs.permute(1, 2, 0)) >= self.gate
            probs = probs * keep.view(-1, 1, 1).float()
        out = torch.zeros(shape, dtype=torch.float32)
        for j, z in enumerate(zs):
            out[..., z] = probs[j]
        if self.options.smooth_z > 0:
            # each run of consecutive predicted slices is smoothed on its own, its ends replicated as at the
            # volume's ends: a slice outside ``zs`` was not predicted (the oracle's chunks are predicted one at a
            # time, each its own run), not found empty. Averaging with its zeros halved a one-slice chunk's
            # probability, and emptied it (a review); outside ``zs`` stays 0, so the oracle's extent stays the extent
            for start, stop in consecutive_runs(zs):
                out[..., start:stop] = smooth_z(out[..., start:stop], self.options.smooth_z)
        return out

    def describe(self) -> dict:
        """What was fitted, for reports and ``segment --explain``."""
        return {
            "options": self.options.as_dict(),
            "support_slices": 0 if self.support_images is None else int(self.support_images.shape[0]),
            "fusion_weight": None
            if self.fusion is None or self.fusion.weight is None
            else self.fusion.weight.tolist(),
            "fusion_bias": None
            if self.fusion is None or self.fusion.bias is None
            else float(self.fusion.bias),
            "threshold": self.threshold,
            "slice_gate": self.gate,
            "position_prior": self._support_prior is not None,
            "support_dice": self.support_dice,
        }


def _dice(pred: torch.Tensor, truth: torch.Tensor) -> float:
    """Dice of two boolean masks, pooled over every pixel (1.0 when both are empty)."""
    total = int(pred.sum()) + int(truth.sum())
    return 1.0 if total == 0 else 2.0 * int((pred & truth).sum()) / total
