"""The network that gradient-based learners adapt: a backbone and a task head, with the task's loss.

MAML and its family, Reptile, Meta-LSTM and the fine-tuning baselines all adapt the same kind of network,
so it lives here once:

* classification: a pooled encoder (`imaging_meta.backbones.build_encoder`) and a linear head,
  (N, C, *spatial) -> (N, n_way) logits; labels are class indices in ``[0, n_way)``.
* segmentation: dense backbone features and a 1x1 convolution, (N, C, H, W) -> (N, 2, H, W) logits
  (background, foreground); labels are binary masks (N, H, W).

The head is the module ``head``: ANIL adapts only the parameters whose names start with ``head.``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from imaging_meta.backbones import build_backbone, build_encoder

TASKS = ("classification", "segmentation")


def check_task(task: str) -> str:
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    return task


class TaskNetwork(nn.Module):
    """Backbone + head for one task.

    Args:
        task: ``classification`` or ``segmentation``.
        n_way: classes per episode (classification); segmentation always has 2 (background, foreground).
        backbone: registered backbone name (classification: ``conv4``, ``resnet12``; segmentation: ``unet``).
        in_channels: image channels.
        backbone_kwargs: options of the backbone builder.
    """

    def __init__(
        self,
        task: str = "classification",
        n_way: int = 5,
        backbone: str = "conv4",
        in_channels: int = 1,
        backbone_kwargs: dict | None = None,
    ) -> None:
        super().__init__()
        self.task = check_task(task)
        kwargs = dict(backbone_kwargs or {})
        if self.task == "classification":
            if n_way < 2:
                raise ValueError(f"n_way must be >= 2, got {n_way}")
            self.body = build_encoder(backbone, in_channels, **kwargs)
            self.head = nn.Linear(self.body.out_features, n_way)
        else:
            self.body = build_backbone(backbone, in_channels, **kwargs)
            self.head = nn.Conv2d(self.body.out_channels, 2, kernel_size=1)
        self.n_out = n_way if self.task == "classification" else 2

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, *spatial) -> (N, D) embeddings (classification) or (N, D, H, W) dense features."""
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, *spatial) -> (N, n_way) or (N, 2, H, W) logits."""
        return self.head(self.body(x))

    def head_names(self) -> set[str]:
        """Names of the head's parameters, as ``named_parameters`` gives them (for ANIL)."""
        return {f"head.{n}" for n, _ in self.head.named_parameters()}


def task_loss(task: str, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy for both tasks; segmentation adds a soft Dice term, since organs fill a small share of a slice.

    Args:
        task: ``classification`` or ``segmentation``.
        logits: (N, n_way) or (N, 2, H, W).
        labels: (N,) class indices or (N, H, W) binary masks.
    """
    if task == "classification":
        return F.cross_entropy(logits, labels.long())
    target = (labels > 0.5).long()
    ce = F.cross_entropy(logits, target)
    fg = logits.softmax(1)[:, 1]
    t = target.float()
    inter = (fg * t).flatten(1).sum(1)
    dice = (2 * inter + 1.0) / (fg.flatten(1).sum(1) + t.flatten(1).sum(1) + 1.0)
    return ce + (1 - dice).mean()


def task_probabilities(task: str, logits: torch.Tensor) -> torch.Tensor:
    """(N, n_way) class probabilities, or (N, H, W) foreground probabilities."""
    probs = logits.softmax(1)
    return probs if task == "classification" else probs[:, 1]
