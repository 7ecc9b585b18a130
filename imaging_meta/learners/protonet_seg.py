"""Prototypical few-shot segmentation (PANet)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from imaging_meta.backbones import build_backbone
from imaging_meta.episode import Episode
from imaging_meta.learners.base import Learner
from imaging_meta.learners.prototypes import cosine_logits, masked_average_pooling


class PrototypicalSegmenter(Learner):
    """PANet: prototype alignment network for few-shot segmentation.

    Wang, Liew, Zou, Zhou, Feng. "PANet: Few-Shot Image Semantic Segmentation with Prototype Alignment."
    ICCV 2019. Foreground and background prototypes are masked averages of the support features; each query
    pixel is classified by the scaled cosine similarity to them. The prototype alignment regulariser (PAR)
    swaps the roles: prototypes pooled from the query under its own predicted mask must segment the support.

    Args:
        backbone: registered backbone name giving dense features (see `imaging_meta.backbones`).
        in_channels: image channels.
        backbone_kwargs: options of the backbone builder.
        scale: cosine-similarity temperature (PANet: 20).
        align_weight: weight of the prototype alignment loss; 0 turns PAR off.
        bg_weight: weight of the background class in the cross-entropy (foreground is 1); below 1 counters
            the small size of organs in a slice.
    """

    task = "segmentation"

    def __init__(
        self,
        backbone: str = "unet",
        in_channels: int = 1,
        backbone_kwargs: dict | None = None,
        scale: float = 20.0,
        align_weight: float = 1.0,
        bg_weight: float = 1.0,
    ) -> None:
        super().__init__()
        self.encoder = build_backbone(backbone, in_channels, **(backbone_kwargs or {}))
        self.scale = float(scale)
        self.align_weight = float(align_weight)
        self.register_buffer("class_weight", torch.tensor([float(bg_weight), 1.0]), persistent=False)

    # ------------------------------------------------------------------ parts
    def features(self, images: torch.Tensor) -> torch.Tensor:
        """(T, N, C, H, W) images -> (T, N, F, h, w) features."""
        t, n = images.shape[:2]
        f = self.encoder(images.flatten(0, 1))
        return f.view(t, n, *f.shape[1:])

    @staticmethod
    def prototypes(features: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """Background and foreground prototypes, averaged over the shots.

        Args:
            features: (T, K, F, h, w).
            masks: (T, K, H, W) foreground masks in [0, 1].

        Returns:
            (T, 2, F): index 0 background, 1 foreground.
        """
        t, k, c = features.shape[:3]
        flat_f, flat_m = features.flatten(0, 1), masks.flatten(0, 1).float()
        fg = masked_average_pooling(flat_f, flat_m).view(t, k, c).mean(1)
        bg = masked_average_pooling(flat_f, 1.0 - flat_m).view(t, k, c).mean(1)
        return torch.stack([bg, fg], dim=1)

    def segment(self, features: torch.Tensor, prototypes: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """Logits of each pixel against the prototypes.

        Args:
            features: (T, N, F, h, w).
            prototypes: (T, 2, F).
            size: output (H, W).

        Returns:
            (T, N, 2, H, W) logits.
        """
        t, n = features.shape[:2]
        protos = prototypes.unsqueeze(1).expand(-1, n, -1, -1).flatten(0, 1)  # (T*N, 2, F)
        logits = cosine_logits(features.flatten(0, 1), protos, self.scale)
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
        s_feat = self.features(ep.support_images)
        q_feat = self.features(ep.query_images)
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
