"""The learner interface, and the learner-side checks of episode labels.

A learner is a plain ``nn.Module``, free of Lightning, logging and file I/O. Besides its two duties (`Learner.loss`
and `Learner.predict`) it says how it compares a query with the support items (`Learner.embed`,
`Learner.support_similarity`, `Learner.similarity_measure`), which is what explanations
(`imaging_meta.commands.explain`) report; the defaults fit any learner, and each family overrides what differs.

Every check of the labels a learner is given lives here (`check_classification_episode`, `classification_batch`,
`check_class_labels`, `check_support_classes`, `check_class_names`, `check_one_structure_per_task`), each with a
message that names the fix.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from imaging_meta.backbones import is_transductive
from imaging_meta.episode import Episode
from imaging_meta.learners.support_norms import forward_with_known_norms, module_norm_layers
from imaging_meta.tasks import Task, get_task


@dataclass(frozen=True)
class SimilarityMeasure:
    """What `Learner.support_similarity` measures between a query and a support item, as reports state it.

    Attributes:
        name: short name (``protonet_euclidean``, ``matching_attention``, ``encoder_euclidean``, ...).
        description: one sentence saying what the measure is.
        value_name: ``distance``, ``similarity`` or ``weight``.
        larger_is_nearer: True for similarities and weights, False for distances.
    """

    name: str
    description: str
    value_name: str
    larger_is_nearer: bool


#: the measure of learners without an encoder of their own: model-agnostic
PIXEL_EUCLIDEAN = SimilarityMeasure(
    "pixel_euclidean",
    "Euclidean distance between the preprocessed query and support images (pixel space); a model-agnostic "
    "stand-in, not the learner's own decision rule",
    "distance",
    False,
)


def encoder_euclidean(learner: nn.Module, name: str) -> SimilarityMeasure:
    """The measure of a learner whose encoder, the submodule ``name``, is not its decision rule (model-agnostic)."""
    return SimilarityMeasure(
        "encoder_euclidean",
        f"Euclidean distance between the features of the learner's encoder ({type(learner).__name__}.{name}) "
        "before any adaptation on the support set; a model-agnostic stand-in, not the learner's own decision rule",
        "distance",
        False,
    )


def embed_tasks(
    encoder: Callable[[torch.Tensor], torch.Tensor], support: torch.Tensor, query: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Embed each task's support and queries, the queries normalised with the support's statistics.

    The backbones' BatchNorm keeps no running statistics; it normalises the task's support and queries with the
    statistics of the support, so a query's embedding depends on its task's support and on itself only: never
    on the other queries, nor on the other tasks of a batch. When ``encoder`` is a module (or a method of one)
    called with its own parameters, the support runs first and the queries then run with its statistics, in
    chunks on a CPU (`imaging_meta.learners.support_norms.forward_in_two_passes`, faster); otherwise, or for a
    norm layer that it does not know, both run in one pass
    (`imaging_meta.backbones.forward_with_support_statistics`). The two agree to rounding. A backbone built with ``transductive=True`` uses the statistics of the
    task's support and queries together instead (transductive batch normalisation, as in MAML's Conv-4
    experiments).

    Args:
        encoder: maps (N, C, *spatial) to (N, D).
        support: (T, S, C, *spatial) support images.
        query: (T, Q, C, *spatial) query images.

    Returns:
        (T, S, D) support and (T, Q, D) query embeddings.
    """
    owner = encoder if isinstance(encoder, nn.Module) else getattr(encoder, "__self__", None)
    layers = module_norm_layers(owner) if isinstance(owner, nn.Module) else {}
    pairs = [forward_with_known_norms(encoder, layers, s, q) for s, q in zip(support, query, strict=True)]
    return torch.stack([s for s, _ in pairs]), torch.stack([q for _, q in pairs])


def asks_for_channels_last(module: nn.Module) -> bool:
    """Whether ``module`` is a backbone that runs faster with channels-last weights on a CPU (its
    ``cpu_channels_last`` attribute: `imaging_meta.backbones.Conv4`)."""
    return bool(getattr(module, "cpu_channels_last", False))


def keep_channels_last_on_cpu(learner: nn.Module, device: str | torch.device) -> int:
    """On a CPU, store the convolution weights of the backbones that ask for it in channels-last order.

    oneDNN's channels-last convolutions make a first-order forward and backward of the 2D Conv-4 about 1.5x
    faster on a CPU (`benchmarks/memory_format.py`); the values agree to rounding. A backbone asks through a
    ``cpu_channels_last`` attribute (`imaging_meta.backbones.Conv4`); a learner whose
    ``channels_last_on_cpu`` is False keeps its whole network as it is, and so does any device but the CPU (not
    measured there). `imaging_meta.module.MetaLearningModule.setup` and `imaging_meta.checkpoint_io.load_learner`
    call it; a learner built in Python keeps the default layout unless you call it yourself.

    Returns:
        The number of modules converted.
    """
    if torch.device(device).type != "cpu":
        return 0
    kept = {id(m) for owner in learner.modules() if isinstance(owner, Learner) and not owner.channels_last_on_cpu
            for m in owner.modules()}
    converted = 0
    for m in learner.modules():
        if asks_for_channels_last(m) and id(m) not in kept:
            for t in (*m.parameters(), *m.buffers()):  # what `m.to(memory_format=...)` does, typed
                if t.dim() == 4:  # `to`, not `contiguous`: with one input channel only `to` sets the strides
                    t.data = t.data.to(memory_format=torch.channels_last)
            converted += 1
    return converted


def content_order(images: torch.Tensor, labels: torch.Tensor, seed: int) -> torch.Tensor:
    """A seeded order of each task's support items that depends on the items alone.

    Every item gets a key, a keyed hash (BLAKE2b, key ``seed``) of its pixels (as float32) and its label (a
    class index, or a mask); the items are presented in the order of their keys (ties, identical items, in
    their given order). So the order looks random from task to task, but a task's order depends neither on its
    place in a batch of tasks nor on the order in which its support items are listed, and another ``seed``
    gives another order. MANN presents its support in this order; `SupportFineTune` and Reptile's inner
    minibatches draw their random views and batches in it, so that their answers do not depend on the order
    in which a support folder lists its files.

    Args:
        images: (T, S, C, *spatial) support images.
        labels: (T, S) their class labels, or (T, S, *spatial) their masks.
        seed: the hash key.

    Returns:
        (T, S) item indices, on the images' device.
    """
    pixels = images.detach().to("cpu", torch.float32).flatten(2).contiguous().numpy()
    label_dtype = torch.float32 if labels.is_floating_point() else torch.int64
    classes = labels.detach().to("cpu", label_dtype).reshape(*labels.shape[:2], -1).contiguous().numpy()
    key = int(seed).to_bytes(16, "little", signed=True)
    rows = []
    for task_pixels, task_labels in zip(pixels, classes, strict=True):
        digests = [
            hashlib.blake2b(x.tobytes() + y.tobytes(), digest_size=8, key=key).digest()
            for x, y in zip(task_pixels, task_labels, strict=True)
        ]
        rows.append(sorted(range(len(digests)), key=digests.__getitem__))
    return torch.tensor(rows, dtype=torch.long, device=images.device).view(labels.shape[:2])


class Learner(nn.Module):
    """Base class of every learner.

    A learner is given batched episodes (leading task dimension, see `imaging_meta.episode`) and does two
    things: `loss` returns the meta-training loss, and `predict` adapts on the support set and returns
    predictions for the query set. ``task`` names the kind of episode it takes (``"segmentation"`` or
    ``"classification"``, as in configs and checkpoints); `task_kind` is that kind's `imaging_meta.tasks.Task`,
    which every task-dependent decision goes through.

    For explanations a learner compares queries with support items: `support_similarity` under its
    `similarity_measure`. The defaults use `encoder_name`'s encoder (Euclidean distance of its features, a
    stated stand-in) or, without one, the pixels; metric learners override them with their own rule.

    Every subclass records the arguments it was built with (`config`), so that a checkpoint can rebuild it
    without pickling code.
    """

    task: str = "segmentation"
    #: the number of ways a learner with an n-way head was built for; None when any n_way works
    n_way: int | None = None
    #: False when a task's prediction depends on its place in a batch of tasks (explanations then predict one
    #: task per call)
    tasks_independent: bool = True
    #: False when the learner differentiates its network's convolutions twice (MAML's family, under
    #: `inner_loop.FastKernels`): `keep_channels_last_on_cpu` then leaves its network as it is
    channels_last_on_cpu: bool = True

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        init = cls.__dict__.get("__init__")
        if init is None:
            return
        signature = inspect.signature(init)

        @functools.wraps(init)
        def recording_init(self, *args, **kw):
            init(self, *args, **kw)
            # the outermost __init__ finishes last, so its record wins; a subclass without an __init__ of its
            # own is recorded by its nearest parent's, under its own class path
            bound = signature.bind(self, *args, **kw)
            bound.apply_defaults()
            arguments = dict(bound.arguments)
            arguments.pop("self")
            self._init_config = {"class_path": f"{type(self).__module__}.{type(self).__qualname__}", "init_args": arguments}

        cls.__init__ = recording_init  # type: ignore[method-assign]  # wrapping each learner's own __init__ is the point

    @property
    def config(self) -> dict[str, Any]:
        """``{"class_path", "init_args"}`` that rebuild this learner (as in a LightningCLI YAML)."""
        return getattr(self, "_init_config", {"class_path": f"{type(self).__module__}.{type(self).__qualname__}", "init_args": {}})

    @property
    def transductive(self) -> bool:
        """True when the learner's batch normalisation uses the statistics of the queries it is given (a backbone
        built with ``backbone_kwargs={"transductive": True}``), so a query's prediction depends on the other
        queries; False (the default): queries are normalised with their task's support statistics, or each
        on its own (instance norm)."""
        return is_transductive(self)

    @property
    def task_kind(self) -> Task:
        """The `imaging_meta.tasks.Task` named by ``task``: its head size, loss and probabilities."""
        return get_task(self.task)

    # ------------------------------------------------------------------ the two duties
    def loss(self, episode: Episode) -> torch.Tensor:
        """Meta-training loss of a batch of episodes (a scalar tensor)."""
        raise NotImplementedError

    def predict(self, episode: Episode) -> torch.Tensor:
        """Query predictions after adapting on the support set.

        Returns:
            segmentation: (T, n_query, H, W) foreground probabilities;
            classification: (T, n_query, n_way) class probabilities.
        """
        raise NotImplementedError

    # ------------------------------------------------------------------ one support, many query chunks
    def fit_support(self, episode: Episode) -> Any | None:
        """What `predict` computes from the support set alone (a segmenter's prototypes), for `predict_fitted` to
        reuse over the chunks of queries of one support set (a whole scan's slices); None, the default: the
        learner has no such split, or its support's output depends on the queries (batch statistics)."""
        return None

    def predict_fitted(self, fitted: Any, query_images: torch.Tensor) -> torch.Tensor:
        """`predict` of the queries (T, Q, C, H, W) from `fit_support`'s output: the same values as `predict` of
        the whole episode."""
        raise NotImplementedError(f"{type(self).__name__} has no fit_support")

    # ------------------------------------------------------------------ explanations
    def encoder_name(self) -> str | None:
        """The name (for ``get_submodule``) of the submodule that pools images into vectors, (N, C, *spatial) ->
        (N, D), that the default `embed` uses; None (the default): the learner has none."""
        return None

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Embeddings of one task's items, computed together in one forward pass.

        Args:
            images: (N, C, *spatial) a task's support and query images.

        Returns:
            (N, D): the features of the `encoder_name` encoder, or the flattened pixels (float) without one.
        """
        name = self.encoder_name()
        if name is None:
            return images.flatten(1).float()
        return self.get_submodule(name)(images)

    def slice_features(self, images: torch.Tensor) -> torch.Tensor | None:
        """(N, C, H, W) slices -> (N, F, h, w) feature maps, each slice's from itself alone, for comparing whole
        slices (`imaging_meta.volume.appearance`); None, the default, for a learner without such an encoder."""
        return None

    def embed_episode(self, episode: Episode) -> tuple[torch.Tensor, torch.Tensor]:
        """(T, S, D) support and (T, Q, D) query embeddings of a (batched) episode, each task's items embedded
        together by `embed` (see `embed_tasks`), as the learner embeds them in `predict`."""
        ep = episode.unsqueeze()
        return embed_tasks(self.embed, ep.support_images, ep.query_images)

    @property
    def similarity_measure(self) -> SimilarityMeasure:
        """What `support_similarity` returns: by default the Euclidean distance of `embed`'s embeddings."""
        name = self.encoder_name()
        return PIXEL_EUCLIDEAN if name is None else encoder_euclidean(self, name)

    def support_similarity(self, episode: Episode) -> torch.Tensor:
        """How near each query is to each support item, under `similarity_measure`.

        Args:
            episode: a (batched) episode: support (T, S, C, *spatial), query (T, Q, C, *spatial).

        Returns:
            (T, Q, S) distances, similarities or weights (see `similarity_measure`).
        """
        s, q = self.embed_episode(episode)
        return torch.stack([torch.cdist(qt, st) for st, qt in zip(s, q, strict=True)])


# ---------------------------------------------------------------------- label checks
def check_classification_episode(episode: Episode, n_way: int, name: str) -> Episode:
    """The episode, batched, after checking it holds class indices in ``[0, n_way)`` (names the fix otherwise)."""
    ep = episode.unsqueeze()
    if ep.support_labels.dim() != 2 or ep.query_labels.dim() != 2:
        raise ValueError(
            f"{name} is a classification learner: labels must be (T, n) class indices, got support "
            f"{tuple(ep.support_labels.shape)} and query {tuple(ep.query_labels.shape)}; use a classification datamodule"
        )
    top = int(max(ep.support_labels.max(), ep.query_labels.max()))
    if top >= n_way or int(min(ep.support_labels.min(), ep.query_labels.min())) < 0:
        raise ValueError(f"{name} was built with n_way={n_way} but the episode has label {top}; set n_way to the data's n_way")
    return ep


def classification_batch(episode: Episode, learner: str) -> Episode:
    """The episode as a batched classification episode, with its label shapes checked.

    Args:
        episode: batched or unbatched classification episode.
        learner: the calling learner's name, for error messages.

    Returns:
        A batched `Episode`: images (T, N*K, C, *spatial) / (T, N*Q, C, *spatial), labels (T, N*K) / (T, N*Q).
    """
    ep = episode.unsqueeze()
    for name in ("support", "query"):
        images, labels = getattr(ep, f"{name}_images"), getattr(ep, f"{name}_labels")
        if labels.dim() != 2 or images.dim() < 4 or tuple(images.shape[:2]) != tuple(labels.shape):
            raise ValueError(
                f"{learner} is a classification learner: {name}_labels must be (T, n_items) class indices matching "
                f"{name}_images (T, n_items, C, *spatial); got labels {tuple(labels.shape)}, images "
                f"{tuple(images.shape)}. Use a classification datamodule (segmentation episodes carry masks)."
            )
    return ep


def check_class_labels(episode: Episode, n_way: int | None, learner: str, query: bool = True) -> None:
    """Raise a `ValueError` when the class labels of an episode do not fit a head of ``n_way`` classes.

    Args:
        episode: a batched episode; classification labels are (T, N*K) and (T, N*Q) class indices.
        n_way: the head's classes; None (a learner whose labels are masks): nothing to check.
        learner: the learner's name, for the message.
        query: check the query labels too (prediction may get query sets without labels).
    """
    if n_way is None:
        return
    labels = [episode.support_labels, episode.query_labels] if query else [episode.support_labels]
    low = min(int(y.min()) for y in labels if y.numel())
    top = max(int(y.max()) for y in labels if y.numel())
    if top >= n_way or low < 0:
        raise ValueError(
            f"{learner} was built with n_way={n_way} but the episode has labels in "
            f"[{low}, {top}]; labels must be class indices in [0, n_way): set model.learner.init_args.n_way "
            "to the data's n_way"
        )


def check_support_classes(labels: torch.Tensor, n_way: int) -> None:
    """Raise a `ValueError` unless support labels are class indices in ``[0, n_way)`` and every task has an item
    of every class.

    Args:
        labels: (T, S) support class indices.
        n_way: number of classes (from ``episode.classes``).
    """
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= n_way):
        raise ValueError(
            f"support labels must lie in [0, {n_way}) (n_way from episode.classes), got "
            f"[{int(labels.min())}, {int(labels.max())}]; relabel classes per episode as 0..n_way-1"
        )
    if bool((F.one_hot(labels.long(), n_way).sum(1) == 0).any()):
        raise ValueError(f"every one of the {n_way} classes needs at least one support item (n_shot >= 1)")


def check_class_names(episode: Episode, learner: str) -> None:
    """Raise a `ValueError` unless each task's ``classes`` names every class its labels use (label i is classes[i]).

    Args:
        episode: a batched classification episode.
        learner: the learner's name, for the message.
    """
    top = torch.maximum(episode.support_labels.amax(1), episode.query_labels.amax(1))
    short = [t for t in range(episode.n_tasks)
             if (len(episode.classes[t]) if t < len(episode.classes) else 0) <= int(top[t])]
    if short:
        raise ValueError(
            f"{learner} pre-trains on class names: episode.classes of tasks {short} name fewer "
            "classes than the labels use; the data module must fill episode.classes (label i is classes[i])"
        )


def check_one_structure_per_task(episode: Episode) -> None:
    """Raise a `ValueError` unless every task of a batched segmentation episode names exactly one structure."""
    if any(len(c) != 1 for c in episode.classes):
        raise ValueError(f"segmentation episodes name one structure each, got classes {episode.classes}")


def build_learner(config: dict[str, Any]) -> Learner:
    """Rebuild a learner from its `Learner.config` (only classes under ``imaging_meta.learners``)."""
    import importlib

    class_path = config.get("class_path", "")
    module_name, _, name = class_path.rpartition(".")
    if not module_name.startswith("imaging_meta.learners"):
        raise ValueError(f"refusing to build {class_path!r}: learners must come from imaging_meta.learners")
    cls = getattr(importlib.import_module(module_name), name, None)
    if not (isinstance(cls, type) and issubclass(cls, Learner)):
        raise ValueError(f"{class_path!r} is not an imaging_meta Learner")
    return cls(**config.get("init_args", {}))


class WrappingLearner(Learner):
    """A learner around another, trained, learner of the same task (``self.embedding``): what the task-adaptive
    classifier and support fine-tuning share. ``embedding`` is a `Learner` or its ``{"class_path",
    "init_args"}`` config; `config` always records it as such a sub-config (so a checkpoint of the wrapper
    rebuilds it, weights included), and the wrapper's tasks are independent, and its encoder is, as the
    wrapped learner's."""

    def wrap(self, embedding: Learner | dict[str, Any]) -> Learner:
        """Build (from a config) and check the wrapped learner; set ``self.embedding``."""
        if isinstance(embedding, dict):
            embedding = build_learner(embedding)
        if not isinstance(embedding, Learner) or embedding.task_kind is not self.task_kind:
            raise ValueError(
                f"embedding must be a {self.task_kind.name} Learner (or its config), got {embedding!r:.200}"
            )
        self.embedding = embedding
        return embedding

    @property
    def config(self) -> dict[str, Any]:
        """As `Learner.config`, with the wrapped learner recorded as its own config (never as an object)."""
        cfg = super().config
        return {**cfg, "init_args": {**cfg["init_args"], "embedding": self.embedding.config}}

    @property
    def tasks_independent(self) -> bool:  # type: ignore[override]
        return self.embedding.tasks_independent

    def encoder_name(self) -> str | None:
        """The wrapped learner's encoder (for `Learner.embed`)."""
        name = self.embedding.encoder_name()
        return None if name is None else f"embedding.{name}"
