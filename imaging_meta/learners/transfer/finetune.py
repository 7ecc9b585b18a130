"""Transfer baselines: supervised pre-training on every meta-train class, then a new head fit on the support.

The learner only ever sees episodes. Pre-training over all meta-train classes maps the episodes' class
names (``episode.classes``) to rows of a fixed-capacity global head through a name -> row table that grows
as new names appear in training episodes; the table travels in the state dict (``get_extra_state``), as a
plain list of strings, so that ``torch.load(weights_only=True)`` restores it. Support and query items of a
training episode are both labelled pre-training data.

BatchNorm in the classification backbones keeps no running statistics (it always normalises with batch
statistics), so the body is run on one task's support and query images together, with the support's batch
statistics (`imaging_meta.learners.base.embed_tasks`), in pre-training as in prediction: a query's prediction
depends on its task's support and on itself only, never on the other queries nor on the other tasks of a
batch. ``backbone_kwargs={"transductive": True}`` normalises with the statistics of support and queries
together instead.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from imaging_meta.backbones import (
    backbone_channels,
    build_backbone,
    build_encoder,
    forward_with_support_statistics,
)
from imaging_meta.episode import Episode
from imaging_meta.learners.base import (
    Learner,
    check_class_names,
    check_one_structure_per_task,
    classification_batch,
    embed_tasks,
)
from imaging_meta.learners.inner_loop import Params, adapt, functional_forward, split_state
from imaging_meta.learners.prototypes import episode_n_way, masked_average_pooling
from imaging_meta.learners.task_network import check_task


def check_grad_mode(learner: nn.Module) -> None:
    """Adaptation needs autograd: refuse ``torch.inference_mode`` with the fix."""
    if torch.is_inference_mode_enabled():
        raise RuntimeError(
            f"{type(learner).__name__}.predict fits a new head on the support set and needs autograd, which "
            "torch.inference_mode() forbids: use torch.no_grad() instead (under Lightning: Trainer(inference_mode=False))"
        )


def _unique(names: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(names))


class FineTune(Learner):
    """Baseline and Baseline++: supervised pre-training, then fine-tuning a new head on the support set.

    Chen, Liu, Kira, Wang, Huang. "A Closer Look at Few-shot Classification." ICLR 2019.

    Pre-training (``loss``) is ordinary supervised learning over every class name seen in training episodes:

    * classification: Baseline++ (``cosine=True``) scores an item against every seen global row by the
      scaled cosine between its L2-normalised embedding and the L2-normalised row; Baseline (``cosine=False``)
      uses a linear layer. Cross-entropy over all seen classes.
    * segmentation: each structure name owns a row ``(w, b)`` of a global 1x1-convolution head: a pixel's
      foreground logit is ``w . f + b`` against a background logit of 0, trained with the per-pixel
      cross-entropy plus soft Dice of the segmentation task's loss (`imaging_meta.tasks.SegmentationTask.loss`)
      on that structure's masks.

    Prediction (``predict``) builds a new head for the episode, initialised (not at random) from the support:

    * classification: cosine head rows are the normalised means of the normalised support embeddings of each
      class; the linear head is the nearest-class-mean classifier (rows: the means ``mu``, biases
      ``-|mu|^2 / 2``).
    * segmentation: the linear discriminant of the support foreground and background feature means,
      ``w = mu_fg - mu_bg``, ``b = (|mu_bg|^2 - |mu_fg|^2) / 2`` (foreground where a pixel is nearer ``mu_fg``).

    and takes ``finetune_steps`` functional SGD steps (`imaging_meta.learners.inner_loop.adapt`) of
    ``finetune_lr`` on the support loss, on the head only (the body's features are computed once) or, with
    ``finetune_body``, on the whole network. The learner's own parameters are never changed, and prediction
    works under ``torch.no_grad()`` (gradients are enabled locally), not under ``torch.inference_mode()``.

    Args:
        task: ``classification`` or ``segmentation``.
        backbone: registered backbone name (classification: ``conv4``, ``resnet12``, pooled into vectors;
            segmentation: a dense one such as ``unet``; coarser feature maps are upsampled bilinearly).
        in_channels: image channels.
        backbone_kwargs: options of the backbone builder; ``"transductive": True`` normalises with the
            statistics of support and queries together (see the module docstring).
        max_classes: rows of the global pre-training head: the most class (or structure) names the
            training episodes may name.
        scale: temperature of the cosine classifier (classification with ``cosine``).
        finetune_steps: SGD steps on the support set in ``predict`` (0: the initial head as is).
        finetune_lr: their learning rate.
        finetune_body: fine-tune the whole network, not only the new head (costs a forward and backward
            pass of the body per step).
        cosine: Baseline++'s cosine classifier; False is Baseline's linear classifier (classification only;
            segmentation heads are linear).
    """

    task = "classification"

    def __init__(
        self,
        task: str = "classification",
        backbone: str = "conv4",
        in_channels: int = 1,
        backbone_kwargs: dict | None = None,
        max_classes: int = 64,
        scale: float = 10.0,
        finetune_steps: int = 100,
        finetune_lr: float = 0.01,
        finetune_body: bool = False,
        cosine: bool = True,
    ) -> None:
        super().__init__()
        self.task = check_task(task)
        if max_classes < 1:
            raise ValueError(f"max_classes must be >= 1, got {max_classes}")
        if finetune_steps < 0 or finetune_lr <= 0:
            raise ValueError(f"finetune_steps must be >= 0 and finetune_lr > 0; got {finetune_steps}, {finetune_lr}")
        if scale <= 0:
            raise ValueError(f"scale must be > 0, got {scale}")
        kwargs = dict(backbone_kwargs or {})
        dense = self.task_kind.dense
        if dense:
            self.body = build_backbone(backbone, in_channels, **kwargs)
            dim = backbone_channels(self.body)
        else:
            self.body = build_encoder(backbone, in_channels, **kwargs)
            dim = self.body.out_features
        self.max_classes = int(max_classes)
        self.scale = float(scale)
        self.finetune_steps = int(finetune_steps)
        self.finetune_lr = float(finetune_lr)
        self.finetune_body = bool(finetune_body)
        self.cosine = bool(cosine) and not dense
        bound = 1.0 / math.sqrt(dim)
        self.global_weight = nn.Parameter(torch.empty(self.max_classes, dim).uniform_(-bound, bound))
        # the cosine classifier has no bias: an unused parameter would trouble DDP
        self.global_bias = None if self.cosine else nn.Parameter(torch.zeros(self.max_classes))
        self.class_names: list[str] = []
        self._rows: dict[str, int] = {}

    # ------------------------------------------------------------ name table
    def get_extra_state(self) -> dict[str, list[str]]:
        """The name -> row table, as the list of names in row order (plain strings: ``weights_only`` safe)."""
        return {"class_names": list(self.class_names)}

    def set_extra_state(self, state: dict[str, list[str]]) -> None:
        names = state.get("class_names") if isinstance(state, dict) else None
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise ValueError(
                f"{type(self).__name__}: the checkpoint's extra state must be {{'class_names': [str, ...]}}, got "
                f"{type(state).__name__}; was it written by another learner?"
            )
        if len(names) > self.max_classes or len(set(names)) != len(names):
            raise ValueError(
                f"{type(self).__name__}: the checkpoint names {len(names)} classes ({len(set(names))} distinct) but "
                f"this learner has max_classes={self.max_classes}; build it with the checkpoint's max_classes"
            )
        self.class_names = list(names)
        self._rows = {n: i for i, n in enumerate(names)}

    def register_classes(self, names: Sequence[str]) -> None:
        """Give every new name a row of the global head (in order of first appearance).

        Under ``torch.distributed`` the new names of all ranks are gathered (in rank order) so every rank
        keeps the same table; then every rank must call this, as ``loss`` does at every training step.

        Raises:
            ValueError: when the names would exceed ``max_classes``.
        """
        new = [n for n in _unique(names) if n not in self._rows]
        if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            gathered: list = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(gathered, new)
            new = _unique(n for part in gathered for n in part)
        if not new:
            return
        if len(self.class_names) + len(new) > self.max_classes:
            raise ValueError(
                f"{type(self).__name__}: the training episodes name {len(self.class_names) + len(new)} distinct classes "
                f"(new: {new[:5]}{' ...' if len(new) > 5 else ''}) but the global head has max_classes="
                f"{self.max_classes} rows; raise model.learner.init_args.max_classes in the model config"
            )
        for n in new:
            self._rows[n] = len(self.class_names)
            self.class_names.append(n)

    def rows(self, names: Sequence[str]) -> torch.Tensor:
        """Global head rows (len(names),) of known names, on the head's device."""
        if len(set(names)) != len(names):
            raise ValueError(f"an episode names a class twice: {list(names)}; class names of an episode must be distinct")
        missing = [n for n in names if n not in self._rows]
        if missing:
            raise ValueError(f"{type(self).__name__}: classes {missing} have no row; call register_classes first")
        return torch.tensor([self._rows[n] for n in names], dtype=torch.long, device=self.global_weight.device)

    # ----------------------------------------------------------------- heads
    def class_logits(self, features: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """Classifier logits.

        Args:
            features: (N, D) embeddings.
            weight: (K, D) class rows.
            bias: (K,) biases (linear head) or None (cosine head).

        Returns:
            (N, K) logits: ``scale * cos(f, w_k)`` (cosine) or ``f . w_k + b_k`` (linear).
        """
        if self.cosine:
            return self.scale * F.normalize(features, dim=-1) @ F.normalize(weight, dim=-1).T
        assert bias is not None  # the linear head has biases
        return features @ weight.T + bias

    @staticmethod
    def foreground_logits(features: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
        """Two-class logits of a binary 1x1-convolution head: background 0, foreground ``w . f + b``.

        Args:
            features: (N, D, h, w) dense features.
            weight: (D,) the structure's row.
            bias: () its bias.
            size: output (H, W); logits are upsampled bilinearly when (h, w) differs.

        Returns:
            (N, 2, H, W) logits, as the segmentation task's loss takes them (their softmax foreground is
            ``sigmoid(w . f + b)``).
        """
        z = torch.einsum("ndhw,d->nhw", features, weight) + bias
        if tuple(z.shape[-2:]) != tuple(size):
            z = F.interpolate(z.unsqueeze(1), size=tuple(size), mode="bilinear", align_corners=False)[:, 0]
        return torch.stack([torch.zeros_like(z), z], dim=1)

    def head_logits(self, features: torch.Tensor, head: Params, size: Sequence[int] = ()) -> torch.Tensor:
        """Logits of an episode head ``{"weight", "bias"}``: (N, n_way) or (N, 2, H, W)."""
        if self.task_kind.dense:
            return self.foreground_logits(features, head["weight"], head["bias"], size)
        return self.class_logits(features, head["weight"], head.get("bias"))

    def initial_head(self, support_features: torch.Tensor, support_labels: torch.Tensor, n_way: int | None) -> Params:
        """The new episode head, computed from the support (see the class docstring), detached.

        Args:
            support_features: (N*K, D) embeddings, or (K, D, h, w) dense features.
            support_labels: (N*K,) class indices, or (K, H, W) masks.
            n_way: classes of the episode (classification).

        Returns:
            ``{"weight": (n_way, D), "bias": (n_way,)}`` (no bias for the cosine head) or
            ``{"weight": (D,), "bias": ()}``.
        """
        f = support_features.detach()
        if self.task_kind.dense:
            return self.foreground_head(f, support_labels)
        assert n_way is not None  # classification tasks have one (None is for segmentation)
        return self.class_head(f, support_labels, n_way)

    def class_head(self, features: torch.Tensor, labels: torch.Tensor, n_way: int) -> Params:
        """Cosine rows from the normalised class means of the normalised embeddings, or the nearest-class-mean
        linear classifier.

        Args:
            features: (N*K, D) detached support embeddings.
            labels: (N*K,) class indices.
            n_way: classes of the episode.

        Returns:
            ``{"weight": (n_way, D)}`` (cosine) or ``{"weight": (n_way, D), "bias": (n_way,)}`` (linear).
        """
        onehot = F.one_hot(labels.long(), n_way).to(features.dtype)  # (NK, n_way)
        counts = onehot.sum(0)
        if (counts == 0).any():
            raise ValueError(f"the support set has no item of classes {(counts == 0).nonzero().flatten().tolist()}")
        if self.cosine:
            means = onehot.T @ F.normalize(features, dim=-1) / counts[:, None]
            return {"weight": F.normalize(means, dim=-1)}
        means = onehot.T @ features / counts[:, None]
        return {"weight": means, "bias": -0.5 * means.pow(2).sum(-1)}

    @staticmethod
    def foreground_head(features: torch.Tensor, masks: torch.Tensor) -> Params:
        """The linear discriminant of the support's foreground and background feature means.

        Args:
            features: (K, D, h, w) detached dense features of the support.
            masks: (K, H, W) its masks.

        Returns:
            ``{"weight": (D,), "bias": ()}``: foreground where a pixel is nearer the foreground mean.
        """
        masks = (masks > 0.5).to(features.dtype)
        # means over all support pixels of a class: each shot counts by its share of the class's pixels
        fg_share = masks.flatten(1).mean(1, keepdim=True)
        bg_share = 1.0 - fg_share
        fg = (masked_average_pooling(features, masks) * fg_share).sum(0) / fg_share.sum().clamp(min=1e-6)
        bg = (masked_average_pooling(features, 1.0 - masks) * bg_share).sum(0) / bg_share.sum().clamp(min=1e-6)
        return {"weight": fg - bg, "bias": 0.5 * (bg.pow(2).sum() - fg.pow(2).sum())}

    # ------------------------------------------------------------ training
    def loss(self, episode: Episode) -> torch.Tensor:
        """Supervised pre-training loss of a batch of episodes (support and query items are all labelled).

        Args:
            episode: a batched episode: classification (T, N*K, C, ...) images, (T, N*K) labels, or
                segmentation (T, K, C, H, W) images and (T, K, H, W) masks (and the same for the query).

        Returns:
            The scalar loss, the mean over tasks.
        """
        ep = self._batch(episode)
        dense = self.task_kind.dense
        if dense:
            check_one_structure_per_task(ep)
        else:
            check_class_names(ep, type(self).__name__)
        self.register_classes([n for names in ep.classes for n in names])
        fs, fq = embed_tasks(self.body, ep.support_images, ep.query_images)  # per task, support statistics
        feats, labels = torch.cat([fs, fq], dim=1), torch.cat([ep.support_labels, ep.query_labels], dim=1)
        task_loss = self.task_kind.loss
        losses = []
        for t in range(ep.n_tasks):
            rows = self.rows(ep.classes[t])
            if dense:
                r = rows[0]
                assert self.global_bias is not None  # dense heads are linear (cosine is for classification only)
                logits = self.foreground_logits(feats[t], self.global_weight[r], self.global_bias[r], labels.shape[-2:])
                losses.append(task_loss(logits, labels[t]))
            else:
                n = len(self.class_names)
                bias = None if self.global_bias is None else self.global_bias[:n]
                logits = self.class_logits(feats[t], self.global_weight[:n], bias)
                losses.append(task_loss(logits, rows[labels[t].long()]))
        return torch.stack(losses).mean()

    # ---------------------------------------------------------- prediction
    def predict(self, episode: Episode) -> torch.Tensor:
        """Fit a new head on each task's support set; query predictions.

        Args:
            episode: a batched (or unbatched) episode.

        Returns:
            classification: (T, N*Q, n_way) class probabilities; segmentation: (T, Q, H, W) foreground
            probabilities.
        """
        check_grad_mode(self)
        ep = self._batch(episode)
        out = []
        for t in range(ep.n_tasks):
            n_way = None
            if not self.task_kind.dense:
                # the task's class names, or (an episode built without them) the largest support or query label,
                # `episode_n_way`: a class only the query shows is then refused, not left a column out (a review,
                # 2026-12-08)
                names = ep.classes[t] if t < len(ep.classes) else []
                n_way = len(names) or episode_n_way(ep)
            out.append(self.predict_task(ep.support_images[t], ep.support_labels[t], ep.query_images[t], n_way))
        return torch.stack(out)

    def predict_task(
        self, support_images: torch.Tensor, support_labels: torch.Tensor, query_images: torch.Tensor, n_way: int | None
    ) -> torch.Tensor:
        """One task: fine-tune a new head on the support and predict the query (the one thing subclasses override).

        Args:
            support_images: (N*K, C, ...) or (K, C, H, W).
            support_labels: (N*K,) class indices or (K, H, W) masks.
            query_images: (N*Q, C, ...) or (Q, C, H, W).
            n_way: classes of the task (classification; None for segmentation).

        Returns:
            (N*Q, n_way) class probabilities or (Q, H, W) foreground probabilities.
        """
        size = support_labels.shape[-2:]
        task = self.task_kind
        fs, fq = self.task_features(support_images, query_images)
        head = {k: v.requires_grad_() for k, v in self.initial_head(fs, support_labels, n_way).items()}

        if not self.finetune_body:

            def head_loss(p: Params) -> torch.Tensor:
                return task.loss(self.head_logits(fs, p, size), support_labels)

            head = adapt(self, head_loss, head, self.finetune_steps, self.finetune_lr, first_order=True)
            with torch.no_grad():
                return task.probabilities(self.head_logits(fq, head, size))

        body, frozen = split_state(self.body)
        params = {**{f"body.{k}": v.detach().requires_grad_() for k, v in body.items()}, **{f"head.{k}": v for k, v in head.items()}}

        def split(p: Params) -> tuple[Params, Params]:
            return ({k[5:]: v for k, v in p.items() if k.startswith("body.")}, {k[5:]: v for k, v in p.items() if k.startswith("head.")})

        def body_features(b: Params) -> tuple[torch.Tensor, torch.Tensor]:
            # support and query in one pass, with the support's batch statistics (or both's, if transductive)
            return forward_with_support_statistics(lambda x: functional_forward(self.body, b, frozen, x), support_images, query_images)

        def full_loss(p: Params) -> torch.Tensor:
            b, h = split(p)
            return task.loss(self.head_logits(body_features(b)[0], h, size), support_labels)

        params = adapt(self, full_loss, params, self.finetune_steps, self.finetune_lr, first_order=True)
        with torch.no_grad():
            b, h = split(params)
            return task.probabilities(self.head_logits(body_features(b)[1], h, size))

    def _batch(self, episode: Episode) -> Episode:
        """The episode batched, with classification label shapes checked."""
        return episode.unsqueeze() if self.task_kind.dense else classification_batch(episode, type(self).__name__)

    def task_features(self, support_images: torch.Tensor, query_images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Frozen body features of one task, support and query in one pass (the support's BatchNorm statistics).

        Args:
            support_images: (N*K, C, ...).
            query_images: (N*Q, C, ...).

        Returns:
            (N*K, D) and (N*Q, D) embeddings (dense features for segmentation), without gradient.
        """
        with torch.no_grad():
            fs, fq = embed_tasks(self.body, support_images[None], query_images[None])
        return fs[0], fq[0]

    # ------------------------------------------------------------------ explanations
    def encoder_name(self) -> str | None:
        """The pre-trained pooled body (explanations compare its features); dense segmentation bodies have none."""
        return None if self.task_kind.dense else "body"
