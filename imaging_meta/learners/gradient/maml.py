"""MAML and first-order MAML on a `TaskNetwork`, for few-shot classification and segmentation.

Every task of a batch is adapted on its own support set with the shared functional inner loop
(`imaging_meta.learners.inner_loop`); the meta-parameters are never changed in place, so the same network
serves every task, and BatchNorm running statistics (if a backbone keeps any) are never touched.

The tasks of a meta-batch are adapted either one after the other in a Python loop (``task_batching="loop"``,
the default, with `inner_loop.adapt`), or all at once with ``torch.func.vmap`` over an inner loop written
with ``torch.func.grad`` (``task_batching="vmap"``, with `inner_loop.adapt_functional`); both give the same
losses, meta-gradients and predictions. ``checkpoint_inner=True`` checkpoints every second-order inner step
of the loop, so memory grows more slowly with the number of steps (not possible under vmap).

`loss` takes a backward per task by default (``meta_backward="per_task"``, the loop only): each task's
meta-gradient is taken as soon as its query loss exists (`inner_loop.per_task_backward`), so only one task's
second-order graph is alive at a time, and the loss returned hands the summed gradients to the parameters in
one ``backward`` (one gradient synchronisation under DDP; Lightning's automatic optimisation, clipping,
accumulation and schedulers are unchanged). ``meta_backward="once"`` keeps every task's graph until one
``backward`` over the mean, as before; the meta-gradients are the same. On CPU, `loss` runs the loop's inner
steps and query passes under `inner_loop.FastKernels` (batch norm with a closed-form double backward, the
images' convolution with a matrix-product weight gradient, 2x2 max-pooling from elementwise maxima): the same
values and derivatives, to rounding, in less time (``benchmarks/maml_vs_higher.py``).

Queries are predicted at the adapted weights with the support's batch statistics under those weights
(`task_network.forward_query`): a query's prediction depends on its task's support and on itself only, never
on the other queries. ``backbone_kwargs={"transductive": True}`` restores the query-batch statistics of the
original implementation.

The subclasses each override one thing: `ANIL` which parameters are adapted (`adapted_names`), `MetaSGD` the
inner learning rates (`inner_learning_rates`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import nn
from torch.func import vmap

from imaging_meta.episode import Episode
from imaging_meta.learners.base import Learner, asks_for_channels_last, check_class_labels
from imaging_meta.learners.inner_loop import (
    DecomposedNorms,
    Params,
    adapt_functional,
    fast_kernels,
    functional_forward,
    kernels_if_enabled,
    per_task_backward,
    split_state,
)
from imaging_meta.learners.task_network import TaskNetwork, adapt_on_support, check_task, forward_query


def _detached(tensors: Mapping[str, torch.Tensor]) -> Params:
    return {n: t.detach() for n, t in tensors.items()}


def _float16_autocast() -> bool:
    """Whether float16 autocast is on (its loss scaling would not reach the gradients taken inside `MAML.loss`)."""
    return any(torch.is_autocast_enabled(d) and torch.get_autocast_dtype(d) == torch.float16 for d in ("cpu", "cuda"))


def adapt_and_query_batched(
    net: TaskNetwork,
    episode: Episode,
    steps: int,
    lr: float | Mapping[str, torch.Tensor],
    first_order: bool,
    names: set[str] | None,
    finish: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    differentiable: bool = True,
) -> torch.Tensor:
    """Adapt ``net`` to every task of a batched episode at once (``torch.func.vmap`` over tasks), then apply
    ``finish`` to each task's query logits.

    The meta-parameters are shared by all tasks (not copied); from the first inner step on, each task has its
    own adapted copy, batched along a leading task dimension. Buffers (BatchNorm running statistics, if a
    backbone keeps any) are cloned once per task, as in the Python loop, so the model's own are never
    mutated. Random layers (dropout) draw independently per task. Second order runs under
    `DecomposedNorms`, since the fused normalisation kernels' second derivatives are wrong under vmap.

    Args:
        net: the network holding the meta-parameters.
        episode: a batched episode: support_images (T, N*K, C, *spatial), support_labels (T, N*K) or
            (T, K, H, W), query_images (T, N*Q, C, *spatial), query_labels (T, N*Q) or (T, Q, H, W).
        steps: inner gradient steps.
        lr: inner learning rate, a float or one tensor per adapted parameter.
        first_order: drop the second-order terms.
        names: parameters to adapt (default: all).
        finish: ``finish(logits, query_labels)`` of one task, e.g. its query loss (a scalar) or its
            probabilities; it runs under vmap.
        differentiable: False for prediction: meta-parameters and rates are detached first, so no graph is
            built for them.

    Returns:
        ``finish``'s outputs stacked over the tasks: (T, ...).
    """
    live, frozen = split_state(net, names)
    buffer_names = {n for n, _ in net.named_buffers()}
    buffers = {n: frozen.pop(n) for n in buffer_names}
    if not differentiable:
        live, frozen = _detached(live), _detached(frozen)
        lr = _detached(lr) if isinstance(lr, Mapping) else lr
    # first order: the inner gradients are constants, so the frozen part need not be tracked inside them
    inner_frozen = _detached(frozen) if first_order else frozen
    n_tasks = episode.n_tasks
    task_loss = net.kind.loss
    task_buffers = {n: b.unsqueeze(0).expand(n_tasks, *b.shape).clone() for n, b in buffers.items()}

    def one_task(bufs: Params, xs: torch.Tensor, ys: torch.Tensor, xq: torch.Tensor, yq: torch.Tensor) -> torch.Tensor:
        def support_loss(p: Params, b: Params) -> torch.Tensor:
            return task_loss(functional_forward(net, p, {**inner_frozen, **b}, xs), ys)

        adapted = adapt_functional(net, support_loss, live, steps, lr, first_order, state=(bufs,))
        return finish(forward_query(net, adapted, {**frozen, **bufs}, xs, xq, two_pass=False), yq)  # one pass under vmap

    batched = vmap(one_task, randomness="different")
    args = (task_buffers, episode.support_images, episode.support_labels, episode.query_images, episode.query_labels)
    if differentiable and not first_order and steps > 0:
        with DecomposedNorms():
            return batched(*args)
    return batched(*args)


#: values of ``MAML(task_batching=...)``
TASK_BATCHING = ("loop", "vmap")
#: values of ``MAML(meta_backward=...)``
META_BACKWARD = ("per_task", "once")


def query_in_channels_last(net: nn.Module, images: torch.Tensor) -> bool:
    """Whether the query pass (after the inner loop) runs with channels-last weights and PyTorch's kernels: on a
    CPU, for a network whose backbone asks for it (the 2D Conv-4, `imaging_meta.backbones.Conv4`).

    The query pass is differentiated once (the second-order terms belong to the inner steps, which keep the
    default layout under `inner_loop.FastKernels`), so it can use the kernels that are fastest for a first-order
    pass: about 7-10% off a second-order step of `maml_cls` (docs/benchmarks.md). The same values and
    meta-gradients to rounding (a float64 test compares the two).
    """
    return images.device.type == "cpu" and any(asks_for_channels_last(m) for m in net.modules())


class MAML(Learner):
    """Model-agnostic meta-learning: learn an initialisation from which a few gradient steps fit a new task.

    Finn, Abbeel, Levine. "Model-Agnostic Meta-Learning for Fast Adaptation of Deep Networks." ICML 2017.
    For each task the network is adapted by ``inner_steps`` SGD steps on the support loss; the meta-loss is
    the query loss at the adapted weights, averaged over the tasks, and it is differentiated through the
    adaptation (second order). ``first_order=True`` is the paper's first-order approximation (FOMAML):
    the inner gradients are treated as constants, so the meta-gradient is the query gradient at the adapted
    weights. At test time the paper adapts with more steps than in training; ``eval_inner_steps`` defaults
    to twice ``inner_steps``.

    Classification adapts a pooled encoder and a linear head (`TaskNetwork`) on the support labels;
    segmentation adapts the dense backbone and its 1x1 head on the support masks of the task's structure.

    Args:
        task: ``classification`` or ``segmentation``.
        n_way: classes per episode (classification; ignored for segmentation).
        backbone: registered backbone name (``conv4``, ``resnet12`` for classification; ``unet`` for
            segmentation).
        in_channels: image channels.
        backbone_kwargs: options of the backbone builder (e.g. ``{"width": 32}``); ``"transductive": True``
            normalises the queries with their own batch statistics, as Finn et al.'s code does, so that a
            query's prediction depends on the other queries (default: with the support's statistics).
        inner_steps: inner SGD steps in meta-training.
        inner_lr: inner learning rate.
        eval_inner_steps: inner steps in `predict`; default ``2 * inner_steps``.
        first_order: first-order MAML.
        task_batching: how `loss` and `predict` adapt the tasks of a meta-batch. ``"loop"`` (default): one
            after the other in a Python loop (`inner_loop.adapt`). ``"vmap"``: all at once, with
            ``torch.func.vmap`` over tasks of an inner loop written with ``torch.func.grad``
            (`inner_loop.adapt_functional`); same values and meta-gradients (tested in float64), for second
            and first order, ANIL, Meta-SGD, classification and segmentation; every registered backbone
            vmaps (second order runs under `inner_loop.DecomposedNorms`, see there, which costs time). The
            loop stays the default because vmap was not faster on CPU, and vmap holds every task's
            activations at once, so its peak memory is higher (timings and memory: ``benchmarks/``).
        checkpoint_inner: second-order memory saving. Each inner step of meta-training (support forward,
            inner gradient with ``create_graph``, update) runs under
            ``torch.utils.checkpoint.checkpoint(use_reentrant=False)``: only the parameters are kept between
            steps, and ``backward`` recomputes each step, so memory grows more slowly with ``inner_steps`` and
            deeper backbones or more steps fit, at the cost of time. Same values and meta-gradients.
            Checkpointing the support forward pass alone would save nothing here (the graph of the inner
            gradient keeps the same activations). No effect with ``first_order=True`` or in `predict`, whose
            steps keep no activations. Only with ``task_batching="loop"``: ``torch.func`` transforms cannot
            checkpoint. The saving shows with larger images and more inner steps; on small episodes it buys
            nothing and only costs time (see ``benchmarks/learner_steps.py``).
        meta_backward: how `loss` differentiates the tasks of a meta-batch (``task_batching="loop"``; vmap
            adapts every task at once and always keeps them all). ``"per_task"`` (default): each task's
            meta-gradient is taken as soon as its query loss is built, and its graph freed before the next
            task starts (`inner_loop.per_task_backward`); the loss returned is the mean over the tasks, and its
            ``backward`` adds the summed gradients to the parameters. The work of the backward thus happens
            inside `loss`, which needs gradients enabled (otherwise `loss` is a plain forward). ``"once"``:
            the mean query loss with every task's graph, differentiated by one ``backward``: peak memory grows
            with the number of tasks. Same values and meta-gradients.
    """

    #: the inner loop differentiates the network twice under `inner_loop.FastKernels`, whose kernels are
    #: fastest in the default layout (channels-last measured 1.0-1.15x slower: `benchmarks/memory_format.py`)
    channels_last_on_cpu = False

    def __init__(
        self,
        task: str = "classification",
        n_way: int = 5,
        backbone: str = "conv4",
        in_channels: int = 1,
        backbone_kwargs: dict | None = None,
        inner_steps: int = 5,
        inner_lr: float = 0.01,
        eval_inner_steps: int | None = None,
        first_order: bool = False,
        task_batching: str = "loop",
        checkpoint_inner: bool = False,
        meta_backward: str = "per_task",
    ) -> None:
        super().__init__()
        self.task = check_task(task)
        if task_batching not in TASK_BATCHING:
            raise ValueError(f"task_batching must be one of {TASK_BATCHING}, got {task_batching!r}")
        if meta_backward not in META_BACKWARD:
            raise ValueError(f"meta_backward must be one of {META_BACKWARD}, got {meta_backward!r}")
        if checkpoint_inner and task_batching == "vmap":
            raise ValueError(
                "checkpoint_inner=True needs task_batching='loop': torch.func transforms (vmap, grad) do not "
                "support activation checkpointing; set one of them differently"
            )
        if inner_steps < 0 or (eval_inner_steps is not None and eval_inner_steps < 0):
            raise ValueError(f"inner_steps and eval_inner_steps must be >= 0; got {inner_steps}, {eval_inner_steps}")
        if inner_lr <= 0:
            raise ValueError(f"inner_lr must be > 0, got {inner_lr}")
        self.net = TaskNetwork(self.task, n_way, backbone, in_channels, backbone_kwargs)
        self.n_way = None if self.task_kind.dense else self.net.n_out  # the head fixes the ways
        self.inner_steps = int(inner_steps)
        self.inner_lr = float(inner_lr)
        self.eval_inner_steps = 2 * self.inner_steps if eval_inner_steps is None else int(eval_inner_steps)
        self.first_order = bool(first_order)
        self.task_batching = task_batching
        self.checkpoint_inner = bool(checkpoint_inner)
        self.meta_backward = meta_backward

    # ------------------------------------------------------- what subclasses override
    def adapted_names(self) -> set[str] | None:
        """Names of the parameters of ``net`` the inner loop adapts; None: all of them."""
        return None

    def inner_learning_rates(self) -> float | Mapping[str, torch.Tensor]:
        """The inner learning rate: a float, or one tensor per adapted parameter (keyed by its name in ``net``)."""
        return self.inner_lr

    # ------------------------------------------------------------------ the algorithm
    def adapt_task(self, task: Episode, steps: int, first_order: bool) -> tuple[Params, Params]:
        """Adapt the network on the support set of one unbatched task.

        Args:
            task: an unbatched episode: support_images (N*K, C, *spatial), support_labels (N*K,) or (K, H, W).
            steps: inner steps.
            first_order: drop second-order terms.

        Returns:
            ``(adapted, frozen)`` for `functional_forward`.
        """
        return adapt_on_support(
            self.net, task.support_images, task.support_labels, steps, self.inner_learning_rates(), first_order,
            names=self.adapted_names(), checkpoint=self.checkpoint_inner,
        )

    def adapt_and_query(
        self,
        episode: Episode,
        steps: int,
        first_order: bool,
        finish: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        differentiable: bool = True,
    ) -> torch.Tensor:
        """Adapt on each task's support set and apply ``finish(query_logits, query_labels)`` to each task.

        Honours ``task_batching``: a Python loop over tasks, or one vmapped call.

        Args:
            episode: a batched episode with T tasks.
            steps: inner steps.
            first_order: drop second-order terms.
            finish: maps one task's query logits (N*Q, n_way) or (Q, 2, H, W) and its query labels to an
                output (a loss or probabilities).
            differentiable: False when no meta-gradient is wanted (prediction): the query forward pass runs
                without a graph.

        Returns:
            The T outputs of ``finish``, stacked: (T, ...).
        """
        if self.task_batching == "vmap":
            return adapt_and_query_batched(
                self.net, episode, steps, self.inner_learning_rates(), first_order, self.adapted_names(), finish,
                differentiable=differentiable,
            )
        out = []
        channels_last = query_in_channels_last(self.net, episode.query_images)
        for task in episode.tasks():
            adapted, frozen = self.adapt_task(task, steps, first_order)
            with torch.set_grad_enabled(differentiable and torch.is_grad_enabled()):
                if channels_last:  # differentiated once: PyTorch's channels-last kernels are the fastest here
                    adapted = {n: p.to(memory_format=torch.channels_last) if p.dim() == 4 else p
                               for n, p in adapted.items()}
                    logits = forward_query(self.net, adapted, frozen, task.support_images, task.query_images)
                else:
                    with kernels_if_enabled():
                        logits = forward_query(self.net, adapted, frozen, task.support_images, task.query_images)
            out.append(finish(logits, task.query_labels))
        return torch.stack(out)

    def _backward_per_task(self) -> bool:
        """Whether `loss` takes a backward per task (see ``meta_backward``)."""
        return (self.meta_backward == "per_task" and self.task_batching == "loop" and torch.is_grad_enabled()
                and not _float16_autocast())

    def loss(self, episode: Episode) -> torch.Tensor:
        """Query loss at the adapted weights, averaged over the tasks of a batched episode (a scalar).

        With ``meta_backward="per_task"`` (the default) the meta-gradient of each task is computed here, one
        task at a time; ``backward`` on the result hands their sum to the parameters. The loop runs under
        `inner_loop.fast_kernels`.
        """
        episode = episode.unsqueeze()
        check_class_labels(episode, self.n_way, type(self).__name__)
        steps, first_order, finish = self.inner_steps, self.first_order, self.task_kind.loss
        with fast_kernels(self.task_batching == "loop"):
            if self._backward_per_task():  # one task at a time, through `adapt_and_query` (subclasses override it)
                losses = (self.adapt_and_query(task.unsqueeze(), steps, first_order, finish)[0]
                          for task in episode.tasks())
                return per_task_backward(losses, list(self.parameters()), episode.n_tasks)
            return self.adapt_and_query(episode, steps, first_order, finish).mean()

    def predict(self, episode: Episode) -> torch.Tensor:
        """Adapt on each task's support set (``eval_inner_steps``) and predict its query set.

        Works under ``torch.no_grad()`` (the inner loop turns gradients on); not under
        ``torch.inference_mode()``.

        Args:
            episode: a batched (or unbatched) episode.

        Returns:
            classification: (T, N*Q, n_way) class probabilities; segmentation: (T, Q, H, W) foreground
            probabilities. Detached from the graph.
        """
        episode = episode.unsqueeze()
        check_class_labels(episode, self.n_way, type(self).__name__, query=False)
        probabilities = self.task_kind.probabilities
        # values are the same as second order; dropping the graph of the inner gradients saves memory
        probs = self.adapt_and_query(
            episode, self.eval_inner_steps, True, lambda logits, _: probabilities(logits), differentiable=False
        )
        return probs.detach()

    # ------------------------------------------------------------------ explanations
    def encoder_name(self) -> str | None:
        """The pooled encoder ``net.body`` (explanations compare its features before adaptation); dense
        segmentation bodies have none."""
        return None if self.task_kind.dense else "net.body"
