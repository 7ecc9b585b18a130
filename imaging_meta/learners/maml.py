"""MAML and first-order MAML on a `TaskNetwork`, for few-shot classification and segmentation.

Every task of a batch is adapted on its own support set with the shared functional inner loop
(`imaging_meta.learners.inner_loop.adapt`); the meta-parameters are never changed in place, so the same
network serves every task, and BatchNorm running statistics (if a backbone keeps any) are never touched.

The subclasses each override one thing: `ANIL` which parameters are adapted (`adapted_names`), `MetaSGD` the
inner learning rates (`inner_learning_rates`).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from imaging_meta.episode import Episode
from imaging_meta.learners.base import Learner
from imaging_meta.learners.inner_loop import Params, adapt, functional_forward, split_state
from imaging_meta.learners.task_network import TaskNetwork, check_task, task_loss, task_probabilities


def check_labels(learner: Learner, net: TaskNetwork, episode: Episode, query: bool = True) -> None:
    """Raise a `ValueError` when a classification episode's labels do not fit the network's head.

    Args:
        learner: the learner (named in the message).
        net: its `TaskNetwork`.
        episode: a batched episode; classification labels are (T, N*K) and (T, N*Q) class indices.
        query: check the query labels too (prediction may get query sets without labels).
    """
    if net.task != "classification":
        return
    labels = [episode.support_labels, episode.query_labels] if query else [episode.support_labels]
    low = min(int(y.min()) for y in labels if y.numel())
    top = max(int(y.max()) for y in labels if y.numel())
    if top >= net.n_out or low < 0:
        raise ValueError(
            f"{type(learner).__name__} was built with n_way={net.n_out} but the episode has labels in "
            f"[{low}, {top}]; labels must be class indices in [0, n_way): set model.learner.init_args.n_way "
            "to the data's n_way"
        )


def adapt_on_support(
    net: TaskNetwork,
    images: torch.Tensor,
    labels: torch.Tensor,
    steps: int,
    lr: float | Mapping[str, torch.Tensor],
    first_order: bool,
    names: set[str] | None = None,
    params: Params | None = None,
) -> tuple[Params, Params]:
    """Adapt ``net`` to one task by gradient steps on the task loss of ``images`` and ``labels``.

    Args:
        net: the network holding the meta-parameters.
        images: (N, C, *spatial) inputs of one task.
        labels: (N,) class indices or (N, H, W) masks.
        steps: inner gradient steps.
        lr: inner learning rate, a float or one tensor per adapted parameter.
        first_order: drop the second-order terms.
        names: parameters to adapt (default: all); the others stay at their meta-values.
        params: starting values of the adapted parameters (default: the live meta-parameters).

    Returns:
        ``(adapted, frozen)``: the adapted parameters and the rest of the state, ready for
        `functional_forward`.
    """
    live, frozen = split_state(net, names)
    start = live if params is None else params

    def support_loss(p: Params) -> torch.Tensor:
        return task_loss(net.task, functional_forward(net, p, frozen, images), labels)

    return adapt(net, support_loss, start, steps, lr, first_order), frozen


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
        backbone_kwargs: options of the backbone builder (e.g. ``{"width": 32}``).
        inner_steps: inner SGD steps in meta-training.
        inner_lr: inner learning rate.
        eval_inner_steps: inner steps in `predict`; default ``2 * inner_steps``.
        first_order: first-order MAML.
    """

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
    ) -> None:
        super().__init__()
        self.task = check_task(task)
        if inner_steps < 0 or (eval_inner_steps is not None and eval_inner_steps < 0):
            raise ValueError(f"inner_steps and eval_inner_steps must be >= 0; got {inner_steps}, {eval_inner_steps}")
        if inner_lr <= 0:
            raise ValueError(f"inner_lr must be > 0, got {inner_lr}")
        self.net = TaskNetwork(self.task, n_way, backbone, in_channels, backbone_kwargs)
        self.n_way = int(n_way) if self.task == "classification" else None  # the head fixes the ways
        self.inner_steps = int(inner_steps)
        self.inner_lr = float(inner_lr)
        self.eval_inner_steps = 2 * self.inner_steps if eval_inner_steps is None else int(eval_inner_steps)
        self.first_order = bool(first_order)

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
            names=self.adapted_names(),
        )

    def loss(self, episode: Episode) -> torch.Tensor:
        """Query loss at the adapted weights, averaged over the tasks of a batched episode (a scalar)."""
        episode = episode.unsqueeze()
        check_labels(self, self.net, episode)
        losses = []
        for task in episode.tasks():
            adapted, frozen = self.adapt_task(task, self.inner_steps, self.first_order)
            logits = functional_forward(self.net, adapted, frozen, task.query_images)
            losses.append(task_loss(self.task, logits, task.query_labels))
        return torch.stack(losses).mean()

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
        check_labels(self, self.net, episode, query=False)
        out = []
        for task in episode.tasks():
            # values are the same as second order; dropping the graph of the inner gradients saves memory
            adapted, frozen = self.adapt_task(task, self.eval_inner_steps, first_order=True)
            with torch.no_grad():
                logits = functional_forward(self.net, adapted, frozen, task.query_images)
            out.append(task_probabilities(self.task, logits).detach())
        return torch.stack(out)
