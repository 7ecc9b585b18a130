"""`SupportFineTune`: fine-tuning on the support, around any trained classification learner that embeds.

Chen, Liu, Kira, Wang, Huang. "A Closer Look at Few-shot Classification." ICLR 2019: their Baseline and
Baseline++ fit a new classifier on the support set, with data augmentation, for a fixed budget of SGD steps.
`SupportFineTune` does that on top of any trained embedding (a ProtoNet, a Baseline++ body, a MAML encoder),
optionally also fine-tuning the encoder's last block. Per task, `SupportFineTune.predict`:

1. Views: the support images and ``copies`` augmented views of each (`augment_views`, plain torch: a random
   horizontal flip, a small rotation, translation and zoom in one ``grid_sample``, an intensity scale and
   shift). Their random parameters come from a ``torch.Generator`` seeded with ``seed`` afresh for every task,
   and are handed to the support images in an order fixed by their pixels (`content_order`), so the same
   episode gives bitwise the same probabilities on every call (on one device, with deterministic kernels: on a
   GPU, ``torch.use_deterministic_algorithms``), and a task's answers depend neither on its place in a batch,
   nor on the order in which its support is listed (a support folder's file names), nor on its class labels. The views are drawn once per task, so with ``body="head"`` the features are computed once.
2. Features: the wrapped learner's own `Learner.embed_episode`, run on the support with the views (for the
   fit) and on the support with the queries (for the prediction). In both passes the backbones' BatchNorm
   normalises with the statistics of the original support (`imaging_meta.backbones.forward_with_support_statistics`),
   so a query's prediction depends on its task's support and on itself only, never on the other queries (a
   backbone built ``transductive`` uses the statistics of whatever it is given, as its learner does).
3. Head: a new head initialised from the support (never at random), as `FineTune` does: cosine rows are the
   normalised class means of the normalised support features (logits ``scale * cos``); the linear head is the
   nearest-class-mean classifier (rows the means ``mu``, biases ``-|mu|^2 / 2``). With ``centre`` (the
   default) the cosine head sees every feature minus the support's centre, the mean of its class means (of the
   original support's features before any fine-tuning, a fixed shift): an embedding whose features all point one way (a ProtoNet's
   are ReLU outputs, pairwise cosine 0.95 and more) otherwise leaves ``scale * cos`` a spread of about 0.5
   between classes: near-uniform probabilities, and a support the head cannot fit (a review, 2026-12-06).
4. Fit: ``steps`` full-batch SGD steps (``lr``, ``momentum``) on the cross-entropy of the support and its
   views, each class weighted by the inverse of its number of support images (a class of 1 image against
   classes of 5 was otherwise never predicted after the fit): of the head only (``body="head"``), of the head and the encoder's last block (``"last"``), or of the
   head and the whole encoder (``"all"``). The encoder runs through ``torch.func.functional_call`` on copies of
   its parameters (and of its buffers): the wrapped learner is never changed. Gradients are enabled locally, so
   ``predict`` works under ``torch.no_grad()``; ``torch.inference_mode()`` is refused with the fix.
5. The queries' class probabilities: the softmax of the fitted head's logits on their (fine-tuned) features.

The last block of an encoder (`last_block`), the module whose parameters ``body="last"`` fine-tunes: start at
the wrapped learner's encoder (`Learner.encoder_name`); while the module has no parameters of its own and
exactly one child module holds parameters, step into that child; then the last block is the last child (in
registration order) that holds parameters, or the module itself when none does. Conv-4 and ResNet-12: the last
of ``Encoder.backbone.layers``; the ``resnet`` backbone: ``layer4`` (``proj`` when it has one). A learner without
an encoder (``encoder_name()`` is None: the descriptor classifiers) can only fit a head (``body="head"``).

`loss` is the wrapped learner's own meta-training loss: meta-training trains the embedding. `predict` keeps one
record per task in ``last_fit`` (the support losses, the support accuracy before and after the fit);
`fit_summary` prints them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from imaging_meta.episode import Episode
from imaging_meta.learners.base import Learner, WrappingLearner, classification_batch, content_order
from imaging_meta.learners.inner_loop import Params
from imaging_meta.learners.prototypes import class_onehot, episode_n_way
from imaging_meta.learners.transfer.finetune import check_grad_mode

#: what ``body`` fine-tunes besides the new head: nothing, the encoder's last block, the whole encoder
BODIES = ("head", "last", "all")
HEADS = ("cosine", "linear")


@dataclass(frozen=True)
class Augmentation:
    """The random transform of `augment_views`; every amplitude is the half-width of a uniform draw.

    Attributes:
        flip: flip left-right with probability 1/2.
        rotation: degrees, in the plane of the last two axes.
        translation: a fraction of the image size, along each axis.
        zoom: relative (0.1: a zoom factor in [0.9, 1.1]).
        intensity: relative scale (``x * (1 + u)``) and a shift by ``u`` times the image's standard deviation.
    """

    flip: bool = True
    rotation: float = 10.0
    translation: float = 0.05
    zoom: float = 0.1
    intensity: float = 0.1

    def __post_init__(self) -> None:
        amplitudes = {
            "rotation": self.rotation,
            "translation": self.translation,
            "zoom": self.zoom,
            "intensity": self.intensity,
        }
        bad = {k: v for k, v in amplitudes.items() if not (v >= 0 and math.isfinite(v))}
        if bad or self.zoom >= 1 or self.intensity >= 1:
            raise ValueError(
                f"augmentation amplitudes must be >= 0 (zoom and intensity < 1), got {amplitudes}"
            )


def _affine(u: torch.Tensor, spec: Augmentation, shape: Sequence[int]) -> torch.Tensor:
    """``affine_grid`` matrices (n, d, d + 1) from uniform draws ``u`` (n, 8): output -> input coordinates."""
    n, d = u.shape[0], len(shape) - 2
    angle = (2 * u[:, 1] - 1) * math.radians(spec.rotation)
    zoom = 1 + (2 * u[:, 2] - 1) * spec.zoom
    sign = torch.where(u[:, 0] < 0.5, -1.0, 1.0) if spec.flip else torch.ones(n, dtype=u.dtype, device=u.device)
    h, w = shape[-2], shape[-1]
    theta = torch.zeros(n, d, d + 1, dtype=u.dtype, device=u.device)
    # a rotation in pixels, written in normalised coordinates (x: the last axis, y: the one before)
    theta[:, 0, 0] = torch.cos(angle) * sign / zoom
    theta[:, 0, 1] = -torch.sin(angle) * (h / w) / zoom
    theta[:, 1, 0] = torch.sin(angle) * (w / h) * sign / zoom
    theta[:, 1, 1] = torch.cos(angle) / zoom
    if d == 3:
        theta[:, 2, 2] = 1 / zoom
    theta[:, :, d] = (2 * u[:, 3 : 3 + d] - 1) * 2 * spec.translation  # normalised coordinates span 2
    return theta


def augment_views(
    images: torch.Tensor, copies: int, generator: torch.Generator, spec: Augmentation = Augmentation()
) -> torch.Tensor:
    """``copies`` random views of each image: flip, rotation, translation and zoom (one bilinear
    ``grid_sample``, reflected at the border), then an intensity scale and shift.

    Args:
        images: (S, C, H, W) or (S, C, D, H, W) floating images.
        copies: views per image (0: none).
        generator: a CPU ``torch.Generator``; every draw comes from it, in a fixed order.
        spec: the amplitudes.

    Returns:
        (copies * S, C, ...) views; view ``j * S + i`` is one of image ``i``.
    """
    if images.dim() not in (4, 5):
        raise ValueError(
            f"augment_views takes (S, C, H, W) or (S, C, D, H, W) images, got {tuple(images.shape)}"
        )
    if copies < 0:
        raise ValueError(f"copies must be >= 0, got {copies}")
    if generator.device.type != "cpu":  # the same seed must give the same views on every device
        raise ValueError(f"augment_views draws from a CPU generator, got one on {generator.device}")
    x = images.repeat(copies, *([1] * (images.dim() - 1)))
    if copies == 0:
        return x
    u = torch.rand(x.shape[0], 8, generator=generator, dtype=torch.float64, device=generator.device)
    theta = _affine(u, spec, x.shape).to(device=x.device, dtype=x.dtype)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    shape = (-1,) + (1,) * (x.dim() - 1)
    scale = (1 + (2 * u[:, 6] - 1) * spec.intensity).to(device=x.device, dtype=x.dtype).view(shape)
    shift = ((2 * u[:, 7] - 1) * spec.intensity).to(device=x.device, dtype=x.dtype).view(shape)
    std = x.flatten(1).std(1).view(shape)
    return x * scale + shift * std


def last_block(encoder: nn.Module) -> tuple[str, nn.Module]:
    """The last block of an encoder, by the rule of the module docstring.

    Returns:
        Its name relative to ``encoder`` (``""`` when it is ``encoder`` itself) and the module.
    """
    path, module = [], encoder
    while True:
        children = [(n, c) for n, c in module.named_children() if next(c.parameters(), None) is not None]
        own = next(module.parameters(recurse=False), None) is not None
        if len(children) == 1 and not own:
            name, module = children[0]
            path.append(name)
            continue
        if children:
            name, module = children[-1]
            path.append(name)
        return ".".join(path), module


def sgd(
    loss_fn: Callable[[Params], torch.Tensor], params: Params, steps: int, lr: float, momentum: float = 0.0
) -> tuple[Params, list[torch.Tensor]]:
    """``steps`` SGD steps (PyTorch's momentum rule: ``v = momentum * v + g``, ``p -= lr * v``), functionally.

    Returns:
        The new parameters (detached) and the loss before each step, detached.
    """
    velocity = {k: torch.zeros_like(v) for k, v in params.items()}
    losses = []
    with torch.enable_grad():  # prediction runs under no_grad; the fit needs gradients
        for _ in range(steps):
            params = {k: v.detach().requires_grad_() for k, v in params.items()}
            loss = loss_fn(params)
            grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
            losses.append(loss.detach())
            for (k, v), g in zip(list(params.items()), grads, strict=True):
                if g is not None:
                    velocity[k] = momentum * velocity[k] + g
                    params[k] = v - lr * velocity[k]
    return {k: v.detach() for k, v in params.items()}, losses


@dataclass
class TaskFit:
    """What `SupportFineTune.fit_task` fitted on one task.

    Attributes:
        head: the new head, ``{"weight": (n_way, D)}`` and, linear, ``"bias"``.
        body: the fine-tuned encoder parameters, by their names in the wrapped learner (empty with
            ``body="head"``).
        losses: the support loss (support and views) before each step and after the last (``steps + 1``).
        support_accuracy_before: the initial head's accuracy on the support images (without views).
    """

    head: Params
    body: Params
    losses: list[float]
    support_accuracy_before: float
    centre: torch.Tensor | None = None  # the (D,) support centre the cosine head's features are shifted by


class _Embedder(nn.Module):
    """One task's `Learner.embed_episode` as a forward pass (so that ``functional_call`` can swap its weights)."""

    def __init__(self, learner: Learner) -> None:
        super().__init__()
        self.learner = learner

    def forward(
        self, support: torch.Tensor, labels: torch.Tensor, rest: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        unlabelled = torch.zeros(1, rest.shape[0], dtype=torch.long, device=rest.device)
        ep = Episode(support[None], labels[None], rest[None], unlabelled, batched=True)
        s, r = self.learner.embed_episode(ep)
        return s[0].float(), r[0].float()


class SupportFineTune(WrappingLearner):
    """Per task, a new head (optionally with the encoder's last block) fine-tuned on the augmented support
    set, on the features of a trained embedding learner (see the module docstring).

    To fine-tune a trained learner on the support: ``SupportFineTune(load_learner(ckpt)[0], steps=100)``
    (`imaging_meta.checkpoint_io.load_learner`), or `with_support_finetuning`. In a config, ``embedding`` is a
    learner sub-config (``class_path``, ``init_args``); `config` always records it that way.

    Args:
        embedding: the trained classification `Learner` whose `Learner.embed_episode` gives the features, or
            its ``{"class_path", "init_args"}``.
        steps: SGD steps per task (0: the initial head as is).
        lr: their learning rate.
        body: ``head`` (the new head only), ``last`` (and the encoder's last block, `last_block`) or ``all``
            (and the whole encoder); ``last`` and ``all`` need a learner with an encoder (`Learner.encoder_name`).
        augment: fit on ``copies`` augmented views of each support image besides the image itself.
        copies: views per support image.
        seed: seeds the views (the same for every task).
        head: ``cosine`` (Baseline++) or ``linear`` (Baseline), both initialised from the support class means.
        scale: temperature of the cosine head.
        centre: the cosine head sees the features minus the support's centre (the mean of its class means; step 3
            of the module docstring); ignored by the linear head. Checkpoints saved before it existed rebuild
            with False (`imaging_meta.checkpoint_io.LEGACY_DATA_ARGS`), as they were trained.
        balanced: weight each class's loss by the inverse of its share of the support (step 4); False weights
            every image alike (checkpoints saved before it existed).
        momentum: SGD momentum.
        flip, rotation, translation, zoom, intensity: the augmentation (`Augmentation`).
    """

    task = "classification"

    def __init__(
        self,
        embedding: Learner | dict[str, Any],
        steps: int = 100,
        lr: float = 0.01,
        body: str = "head",
        augment: bool = True,
        copies: int = 4,
        seed: int = 0,
        head: str = "cosine",
        scale: float = 10.0,
        centre: bool = True,
        balanced: bool = True,
        momentum: float = 0.9,
        flip: bool = True,
        rotation: float = 10.0,
        translation: float = 0.05,
        zoom: float = 0.1,
        intensity: float = 0.1,
    ) -> None:
        super().__init__()
        embedding = self.wrap(embedding)
        if isinstance(steps, bool) or int(steps) != steps or steps < 0:
            raise ValueError(f"steps must be an integer >= 0, got {steps!r}")
        if not (lr > 0 and math.isfinite(lr)) or not scale > 0 or not 0 <= momentum < 1:
            raise ValueError(
                f"lr and scale must be > 0 and momentum in [0, 1); got {lr}, {scale}, {momentum}"
            )
        if body not in BODIES or head not in HEADS:
            raise ValueError(f"body must be one of {BODIES} and head one of {HEADS}; got {body!r}, {head!r}")
        if copies < 0:
            raise ValueError(f"copies must be >= 0, got {copies}")
        self.n_way = embedding.n_way
        self.steps, self.lr, self.momentum, self.scale = int(steps), float(lr), float(momentum), float(scale)
        self.body, self.head, self.centre, self.balanced = body, head, bool(centre), bool(balanced)
        self.copies = int(copies) if augment else 0
        self.seed = int(seed)
        self.augmentation = Augmentation(
            bool(flip), float(rotation), float(translation), float(zoom), float(intensity)
        )
        #: the wrapped learner's submodule that ``body`` fine-tunes ("" with ``body="head"``)
        self.finetuned_module = self._finetuned_module()
        #: one record per task of the last `predict` call (see `fit_task`)
        self.last_fit: list[dict[str, Any]] = []

    def _finetuned_module(self) -> str:
        if self.body == "head":
            return ""
        name = self.embedding.encoder_name()
        if name is None:
            raise ValueError(
                f"body={self.body!r} fine-tunes the encoder, but {type(self.embedding).__name__} names none "
                "(encoder_name() is None); use body='head'"
            )
        if self.body == "all":
            return name
        block, _ = last_block(self.embedding.get_submodule(name))
        module = f"{name}.{block}" if block else name
        if next(self.embedding.get_submodule(module).parameters(), None) is None:
            raise ValueError(
                f"the encoder {name!r} of {type(self.embedding).__name__} has no parameters to fine-tune"
            )
        return module



    # ------------------------------------------------------------------ pieces
    def body_parameters(self) -> Params:
        """Detached copies of the parameters ``body`` fine-tunes, by their names in the wrapped learner (every
        parameter of `finetuned_module`, whatever its ``requires_grad``)."""
        if not self.finetuned_module:
            return {}
        module = self.embedding.get_submodule(self.finetuned_module)
        return {f"{self.finetuned_module}.{n}": p.detach().clone() for n, p in module.named_parameters()}

    def features(
        self, body: Params, support: torch.Tensor, labels: torch.Tensor, rest: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The wrapped learner's (S, D) support and (R, D) features of ``rest`` (views or queries), in one pass
        normalised with the support's statistics, with ``body`` in place of those parameters and copies of its
        buffers (float32)."""
        state = {f"learner.{k}": v.clone() for k, v in self.embedding.named_buffers()}
        state.update({f"learner.{k}": v for k, v in body.items()})
        return functional_call(_Embedder(self.embedding), state, (support, labels, rest), strict=False)

    def initial_head(self, features: torch.Tensor, labels: torch.Tensor, n_way: int) -> Params:
        """The new head from the (S, D) support features: ``{"weight": (n_way, D)}`` (cosine) or with ``"bias"``
        (linear); see the module docstring."""
        onehot = class_onehot(labels[None], n_way, features.dtype)[0]
        counts = onehot.sum(0)[:, None]
        if self.head == "cosine":
            return {"weight": F.normalize(onehot.T @ F.normalize(features, dim=-1) / counts, dim=-1)}
        means = onehot.T @ features / counts
        return {"weight": means, "bias": -0.5 * means.pow(2).sum(-1)}

    def logits(self, features: torch.Tensor, head: Params) -> torch.Tensor:
        """(N, n_way) logits of (N, D) features (already centred, `shifted`): ``scale * cos(f, w_k)`` or
        ``f . w_k + b_k``."""
        if self.head == "cosine":
            return self.scale * F.normalize(features, dim=-1) @ F.normalize(head["weight"], dim=-1).T
        return features @ head["weight"].T + head["bias"]

    def support_centre(self, support: torch.Tensor, labels: torch.Tensor, n_way: int) -> torch.Tensor | None:
        """The (D,) centre of (S, D) support features, the mean of their class means (detached), for the cosine
        head with ``centre``; None otherwise."""
        if not (self.centre and self.head == "cosine"):
            return None
        onehot = class_onehot(labels[None], n_way, support.dtype)[0]
        present = onehot.sum(0) > 0
        means = (onehot.T @ support)[present] / onehot.sum(0)[present, None]
        return means.mean(0).detach()

    @staticmethod
    def shifted(centre: torch.Tensor | None, *features: torch.Tensor) -> list[torch.Tensor]:
        """Each of ``features`` minus ``centre`` (unchanged when it is None)."""
        return list(features) if centre is None else [f - centre for f in features]

    def class_weights(self, labels: torch.Tensor, n_way: int) -> torch.Tensor:
        """(n_way,) loss weights: the inverse of each class's share of the support (1 for balanced classes)."""
        counts = torch.bincount(labels.long(), minlength=n_way).float()
        present = counts > 0
        if not self.balanced:
            return present.float()
        weights = torch.zeros(n_way, device=counts.device)
        weights[present] = counts[present].sum() / (present.sum() * counts[present])
        return weights

    def views(self, support_images: torch.Tensor) -> torch.Tensor:
        """The task's augmented views ``(copies * S, C, ...)``, from a generator seeded with ``seed``."""
        generator = torch.Generator().manual_seed(self.seed)
        return augment_views(support_images, self.copies, generator, self.augmentation)

    # ------------------------------------------------------------------ fitting one task
    def fit_task(self, support_images: torch.Tensor, support_labels: torch.Tensor, n_way: int) -> TaskFit:
        """Fit the new head (and ``body``) of one task on its support and the support's views.

        Args:
            support_images: (S, C, ...).
            support_labels: (S,) class indices.
            n_way: classes of the task.

        Returns:
            The fitted head and body, and how the fit went (`TaskFit`).
        """
        # by the pixels alone: relabelling the classes must not hand the views to other images (equivariance)
        order = content_order(support_images[None], torch.zeros_like(support_labels)[None], 0)[0]
        support_images, support_labels = support_images[order], support_labels[order]
        views = self.views(support_images)
        labels = torch.cat([support_labels, support_labels.repeat(self.copies)]).long()
        weights = self.class_weights(support_labels, n_way).to(support_images.device)
        body0 = self.body_parameters()
        with torch.no_grad():
            raw_s, raw_v = self.features(body0, support_images, support_labels, views)
            centre = self.support_centre(raw_s, support_labels, n_way)
            fs, fv = self.shifted(centre, raw_s, raw_v)
        head0 = self.initial_head(fs, support_labels, n_way)
        before = float((self.logits(fs, head0).argmax(-1) == support_labels).float().mean())
        train = torch.cat([fs, fv])

        def loss_fn(p: Params) -> torch.Tensor:
            head = {k[5:]: v for k, v in p.items() if k.startswith("head.")}
            body = {k[5:]: v for k, v in p.items() if k.startswith("body.")}
            if body:
                feats = torch.cat(self.shifted(centre, *self.features(body, support_images, support_labels, views)))
            else:
                feats = train
            return F.cross_entropy(self.logits(feats, head), labels, weight=weights)

        start = {**{f"head.{k}": v for k, v in head0.items()}, **{f"body.{k}": v for k, v in body0.items()}}
        params, losses = sgd(loss_fn, start, self.steps, self.lr, self.momentum)
        with torch.no_grad():
            losses.append(loss_fn(params))
        return TaskFit(
            head={k[5:]: v for k, v in params.items() if k.startswith("head.")},
            body={k[5:]: v for k, v in params.items() if k.startswith("body.")},
            losses=torch.stack(losses).tolist(),
            support_accuracy_before=before,
            centre=centre,
        )

    def predict_task(
        self,
        support_images: torch.Tensor,
        support_labels: torch.Tensor,
        query_images: torch.Tensor,
        n_way: int,
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        """One task: (Q, n_way) query probabilities, and the record of the fit (see `predict`)."""
        fit = self.fit_task(support_images, support_labels, n_way)
        with torch.no_grad():
            fs, fq = self.shifted(fit.centre, *self.features(fit.body, support_images, support_labels, query_images))
            after = float((self.logits(fs, fit.head).argmax(-1) == support_labels).float().mean())
            probs = self.logits(fq, fit.head).softmax(-1)
        record = {
            "steps": self.steps,
            "body": self.body,
            "finetuned": sorted(fit.body),
            "losses": fit.losses,
            "support_accuracy": (fit.support_accuracy_before, after),
        }
        return probs, record

    # ------------------------------------------------------------------ the two duties
    def loss(self, episode: Episode) -> torch.Tensor:
        """The wrapped learner's meta-training loss (meta-training trains the embedding)."""
        return self.embedding.loss(episode)

    def predict(self, episode: Episode) -> torch.Tensor:
        """Class probabilities (T, N*Q, n_way) of the query items, each task fitted on its own support; sets
        ``last_fit``: one record per task, ``steps``, ``body``, ``finetuned`` (the fine-tuned parameters' names),
        ``losses`` (the support loss before each step and after the last: ``steps + 1`` values) and
        ``support_accuracy`` (of the initial and of the fitted head on the support images, without views)."""
        if self.steps:
            check_grad_mode(self)
        ep = classification_batch(episode, type(self).__name__)
        n_way = episode_n_way(ep)
        out, records = [], []
        for t in range(ep.n_tasks):
            probs, record = self.predict_task(
                ep.support_images[t], ep.support_labels[t], ep.query_images[t], n_way
            )
            out.append(probs)
            records.append(record)
        self.last_fit = records
        return torch.stack(out)

    # ------------------------------------------------------------------ explanations


def with_support_finetuning(learner: Learner, steps: int = 100, **kwargs: Any) -> SupportFineTune:
    """``learner`` (a trained classification learner) fine-tuned on each task's support before it predicts.

    Args:
        learner: the learner to wrap; a `SupportFineTune` is unwrapped first (never fine-tuned twice), and its
            settings are kept (``steps`` and ``kwargs`` replace theirs).
        steps: SGD steps per task.
        **kwargs: the other `SupportFineTune` arguments (``lr``, ``body``, ``augment``, ``seed``, ``head``, ...).

    Returns:
        The wrapper, in ``learner``'s train or eval mode; it shares ``learner``'s parameters and never changes them.
    """
    if isinstance(learner, SupportFineTune):  # its own settings (a fine-tuning checkpoint's), ``kwargs`` over them
        settings = {k: v for k, v in learner.config["init_args"].items() if k not in ("embedding", "steps")}
        kwargs = {**settings, **kwargs}
        learner = learner.embedding
    return SupportFineTune(learner, steps=steps, **kwargs).train(learner.training)


def fit_summary(records: Sequence[dict[str, Any]]) -> str:
    """One line per task of ``SupportFineTune.last_fit``, e.g. ``task 0: head, 100 steps: support loss 1.042 ->
    0.113, support accuracy 0.600 -> 1.000``."""
    lines = []
    for t, r in enumerate(records):
        (a0, a1), losses = r["support_accuracy"], r["losses"]
        lines.append(
            f"task {t}: {r['body']}, {r['steps']} steps: support loss {losses[0]:.3f} -> {losses[-1]:.3f}, "
            f"support accuracy {a0:.3f} -> {a1:.3f}"
        )
    return "\n".join(lines)
