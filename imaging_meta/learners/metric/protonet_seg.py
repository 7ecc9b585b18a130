"""Prototypical few-shot segmentation: PANet, optionally with ALPNet's adaptive local prototypes."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from imaging_meta.backbones import build_backbone, uses_support_statistics
from imaging_meta.episode import Episode
from imaging_meta.learners.base import Learner, embed_tasks
from imaging_meta.learners.prototypes import (
    cosine_logits,
    grouped_class_logits,
    local_prototypes,
    masked_average_pooling,
    normalised_coordinates,
    window_centres,
)


class PrototypicalSegmenter(Learner):
    """PANet: prototype alignment network for few-shot segmentation.

    Wang, Liew, Zou, Zhou, Feng. "PANet: Few-Shot Image Semantic Segmentation with Prototype Alignment."
    ICCV 2019. Foreground and background prototypes are masked averages of the support features; each query
    pixel is classified by the scaled cosine similarity to them. The prototype alignment regulariser (PAR)
    swaps the roles: prototypes pooled from the query under its own predicted mask must segment the support.

    With ``local_window`` > 0 the prototypes are ALPNet's adaptive local prototypes (Ouyang, Biffi, Chen,
    Kart, Qiu, Rueckert. "Self-Supervision with Superpixels: Training Few-shot Medical Image Segmentation
    without Annotation." ECCV 2020): besides the global ones, every window of the support grid that the
    foreground (or background) covers gives a prototype of that class, and each pixel's class logit is a
    softmax-weighted mean of its similarities to the class's prototypes. A multimodal background (fat,
    muscle, bone, other organs) then no longer has to fit one vector.

    With ``location_weight`` > 0 the local prototypes are location-sensitive (after Yu, Liu, Meng, Dai,
    Lin. "A Location-Sensitive Local Prototype Network for Few-Shot Medical Image Segmentation." ISBI 2021):
    the similarity of a pixel to a local prototype is lowered by a learned weight times the squared distance
    between the pixel and the prototype's window, since anatomy keeps its place in resampled, centred slices.

    Args:
        backbone: registered backbone name giving dense features (see `imaging_meta.backbones`).
        in_channels: image channels.
        backbone_kwargs: options of the backbone builder.
        scale: cosine-similarity temperature (PANet: 20).
        align_weight: weight of the prototype alignment loss; 0 turns PAR off.
        bg_weight: weight of the background class in the cross-entropy (foreground is 1); below 1 counters
            the small size of organs in a slice.
        local_window: side (in feature pixels) of ALPNet's local-prototype windows; 0 uses global
            prototypes only (PANet). A structure smaller than a window falls back to its global prototype.
        local_threshold: share of a window the class must cover to give a local prototype.
        feature_pool: average-pool the backbone's dense features by this factor before prototypes and
            similarities (logits are upsampled back, as PANet does with its stride-8 features); windows are
            counted in pooled pixels.
        location_weight: initial weight of the location penalty of local prototypes (learned; 0 turns it
            off). Needs ``local_window`` > 0.
        coord_channels: append two channels of normalised row/column coordinates to the input (CoordConv,
            Liu et al. NeurIPS 2018), so features can carry where a structure lies in the slice; useful when
            slices are resampled to a common spacing and centred, as the datamodules do.
    """

    task = "segmentation"
    class_weight: torch.Tensor  # a buffer (register_buffer in __init__)

    def __init__(
        self,
        backbone: str = "unet",
        in_channels: int = 1,
        backbone_kwargs: dict | None = None,
        scale: float = 20.0,
        align_weight: float = 1.0,
        bg_weight: float = 1.0,
        local_window: int = 0,
        local_threshold: float = 0.95,
        coord_channels: bool = False,
        location_weight: float = 0.0,
        feature_pool: int = 1,
    ) -> None:
        super().__init__()
        if feature_pool < 1:
            raise ValueError(f"feature_pool must be >= 1, got {feature_pool}")
        self.feature_pool = int(feature_pool)
        self.coord_channels = bool(coord_channels)
        if self.coord_channels and (backbone_kwargs or {}).get("weights") is not None:
            # the pretrained first convolution would read the slice with its red kernel alone and the coordinates
            # with green and blue, normalised as colours, without a word (a review)
            raise ValueError("coord_channels adds two coordinate channels to the input, which a pretrained first "
                             "convolution would read as colours: set coord_channels: false with backbone_kwargs.weights "
                             "(as configs/model/protonet_resnet_seg.yaml does)")
        self.encoder = build_backbone(backbone, in_channels + 2 * self.coord_channels, **(backbone_kwargs or {}))
        self.scale = float(scale)
        self.align_weight = float(align_weight)
        if local_window < 0 or not 0 < local_threshold <= 1:
            raise ValueError(f"local_window must be >= 0 and local_threshold in (0, 1]; got {local_window}, {local_threshold}")
        self.local_window = int(local_window)
        self.local_threshold = float(local_threshold)
        if location_weight < 0 or (location_weight > 0 and local_window == 0):
            raise ValueError(f"location_weight must be >= 0 and needs local_window > 0; got {location_weight}, {local_window}")
        # learned in log space so that it stays positive; None: no location term
        self.log_location_weight = (
            torch.nn.Parameter(torch.tensor(float(location_weight)).log()) if location_weight > 0 else None
        )
        self.register_buffer("class_weight", torch.tensor([float(bg_weight), 1.0]), persistent=False)

    # ------------------------------------------------------------------ parts
    def features(self, images: torch.Tensor) -> torch.Tensor:
        """(T, N, C, H, W) images -> (T, N, F, h, w) features, all tasks in one pass (per-image normalisation)."""
        t, n = images.shape[:2]
        f = self.encode(images.flatten(0, 1))
        return f.view(t, n, *f.shape[1:])

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) images -> (N, F, h, w) features: coordinate channels, the encoder, the pooling."""
        if self.coord_channels:
            h, w = x.shape[-2:]
            r, c = normalised_coordinates(h, w, x.device, x.dtype)
            grid = torch.stack([r.view(h, 1).expand(h, w), c.view(1, w).expand(h, w)])  # (2, h, w)
            x = torch.cat([x, grid.expand(x.shape[0], -1, -1, -1)], dim=1)
        f = self.encoder(x)
        if self.feature_pool > 1:
            f = F.avg_pool2d(f, self.feature_pool)
        return f

    def slice_features(self, images: torch.Tensor) -> torch.Tensor:
        """`encode`; one slice at a time for an encoder with batch statistics, whose features of a slice would
        depend on the other slices of its batch."""
        if uses_support_statistics(self.encoder):
            return torch.cat([self.encode(x) for x in images.split(1)])
        return self.encode(images)

    def episode_features(self, support: torch.Tensor, query: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(T, K, F, h, w) support and (T, Q, F, h, w) query features.

        The U-Net normalises each image on its own (instance norm), so support and queries of every task go
        through `features` separately; a backbone with batch statistics is run per task, support and queries
        together with the support's statistics (`imaging_meta.learners.base.embed_tasks`), so that a query's
        features never depend on the other queries or tasks.
        """
        if uses_support_statistics(self.encoder):
            return embed_tasks(self.encode, support, query)
        return self.features(support), self.features(query)

    def prototypes(self, features: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Background and foreground prototypes of the support.

        Args:
            features: (T, K, F, h, w).
            masks: (T, K, H, W) foreground masks in [0, 1].

        Returns:
            prototypes (T, 2, P, F) (index 0 background, 1 foreground; P = 1 + local windows over all shots)
            and their validity (T, 2, P). Slot 0 is the global prototype, averaged over the shots, always valid.
        """
        t, k, c = features.shape[:3]
        flat_f, flat_m = features.flatten(0, 1), masks.flatten(0, 1).float()
        fg = masked_average_pooling(flat_f, flat_m).view(t, k, c).mean(1)
        bg = masked_average_pooling(flat_f, 1.0 - flat_m).view(t, k, c).mean(1)
        protos = torch.stack([bg, fg], dim=1).unsqueeze(2)  # (T, 2, 1, F)
        valid = torch.ones(t, 2, 1, dtype=torch.bool, device=features.device)
        if self.local_window > 0:
            locs, oks = [], []
            for m in (1.0 - flat_m, flat_m):
                p, ok = local_prototypes(flat_f, m, self.local_window, self.local_threshold)  # (T*K, G, F)
                locs.append(p.reshape(t, -1, c))
                oks.append(ok.reshape(t, -1))
            protos = torch.cat([protos, torch.stack(locs, 1)], dim=2)
            valid = torch.cat([valid, torch.stack(oks, 1)], dim=2)
        return protos, valid

    def segment(self, features: torch.Tensor, prototypes: tuple[torch.Tensor, torch.Tensor], size: Sequence[int]) -> torch.Tensor:
        """Logits of each pixel against the prototypes.

        Args:
            features: (T, N, F, h, w).
            prototypes: the output of `prototypes`: (T, 2, P, F) and validity (T, 2, P).
            size: output (H, W).

        Returns:
            (T, N, 2, H, W) logits.
        """
        protos, valid = prototypes
        t, n = features.shape[:2]
        flat = features.flatten(0, 1)
        if protos.shape[2] == 1:  # global prototypes only: PANet
            logits = cosine_logits(flat, protos[:, :, 0].repeat_interleave(n, dim=0), self.scale)
        else:
            centres: torch.Tensor | None = None
            weight: torch.Tensor | float = 0.0
            if self.log_location_weight is not None:
                h, w = flat.shape[-2:]
                windows = window_centres(h, w, self.local_window, flat.device, flat.dtype)  # (G, 2)
                n_shots = (protos.shape[2] - 1) // windows.shape[0]
                # slot 0, the global prototype, has no location
                centres = torch.cat([torch.full_like(windows[:1], float("nan")), windows.repeat(n_shots, 1)])
                weight = self.log_location_weight.exp() * self.scale
            logits = grouped_class_logits(features, protos, valid, self.scale, centres, weight).flatten(0, 1)
        if logits.shape[-2:] != tuple(size):
            logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
        return logits.view(t, n, *logits.shape[1:])

    # -------------------------------------------------------------- interface
    def forward(self, episode: Episode) -> torch.Tensor:
        """Query logits (T, Q, 2, H, W) of a batched episode."""
        return self._forward(episode)[0]

    def _forward(self, episode: Episode):
        ep = episode.unsqueeze()
        size = tuple(ep.query_images.shape[-2:])
        s_feat, q_feat = self.episode_features(ep.support_images, ep.query_images)
        protos = self.prototypes(s_feat, ep.support_labels)
        return self.segment(q_feat, protos, size), s_feat, q_feat

    def loss(self, episode: Episode) -> torch.Tensor:
        ep = episode.unsqueeze()
        q_logits, s_feat, q_feat = self._forward(ep)
        loss = F.cross_entropy(q_logits.flatten(0, 1), ep.query_labels.flatten(0, 1).long(), weight=self.class_weight)
        if self.align_weight > 0:
            # PAR: the query's own prediction (a hard mask, no gradient through it) gives prototypes
            # that must segment the support.
            q_mask = q_logits.argmax(dim=2).float().detach()
            q_protos = self.prototypes(q_feat, q_mask)
            s_logits = self.segment(s_feat, q_protos, tuple(ep.support_images.shape[-2:]))
            loss = loss + self.align_weight * F.cross_entropy(
                s_logits.flatten(0, 1), ep.support_labels.flatten(0, 1).long(), weight=self.class_weight
            )
        return loss

    def predict(self, episode: Episode) -> torch.Tensor:
        """Foreground probability (T, Q, H, W) of every query pixel."""
        return self.forward(episode).softmax(dim=2)[:, :, 1]

    def fit_support(self, episode: Episode) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The support's prototypes (see `prototypes`), computed once for many query chunks (a whole scan at a
        fine scale encoded the support again for each chunk: two thirds of its encoder passes); None for an
        encoder with batch statistics, whose features depend on the queries, and for a subclass (or a stand-in)
        whose ``predict`` or ``forward`` is not this class's, which `predict_fitted` would bypass."""
        own = type(self).predict is _OWN_PREDICT and type(self).forward is _OWN_FORWARD
        if uses_support_statistics(self.encoder) or not own:
            return None
        ep = episode.unsqueeze()
        return self.prototypes(self.features(ep.support_images), ep.support_labels)

    def predict_fitted(self, fitted: tuple[torch.Tensor, torch.Tensor], query_images: torch.Tensor) -> torch.Tensor:
        size = tuple(query_images.shape[-2:])
        return self.segment(self.features(query_images), fitted, size).softmax(dim=2)[:, :, 1]


#: `PrototypicalSegmenter.fit_support` applies only where ``predict`` and ``forward`` are these
_OWN_PREDICT, _OWN_FORWARD = PrototypicalSegmenter.predict, PrototypicalSegmenter.forward
