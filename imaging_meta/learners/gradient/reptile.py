"""Reptile: first-order meta-learning by moving the initialisation towards the task-adapted weights."""

from __future__ import annotations

import torch

from imaging_meta.episode import Episode
from imaging_meta.learners.base import Learner, check_class_labels
from imaging_meta.learners.inner_loop import functional_forward
from imaging_meta.learners.task_network import TaskNetwork, adapt_on_support, check_task


class Reptile(Learner):
    """Reptile, written as a loss so that the module's automatic optimisation (and DDP) runs it unchanged.

    Nichol, Achiam, Schulman. "On First-Order Meta-Learning Algorithms." arXiv:1803.02999, 2018.
    For each task, ``inner_steps`` plain SGD steps (learning rate ``inner_lr``) on the task's labelled data
    (support and query together, as the paper trains on all of a task's training examples) give adapted
    weights ``phi_t``; Reptile then moves the meta-weights towards them: ``theta <- theta + eps (phi - theta)``
    with ``phi`` the mean of ``phi_t`` over the tasks of the batch (batched Reptile).

    `loss` returns the surrogate ``L(theta) = mean_t 0.5 * ||theta - stopgrad(phi_t)||^2`` (summed over all
    parameters), whose gradient is exactly ``theta - phi``. One step of ``torch.optim.SGD(lr=eps)`` on it is
    therefore exactly the Reptile interpolation with step size ``eps``, through the ordinary
    ``loss.backward(); optimizer.step()`` of `imaging_meta.module.EpisodicModule`. Under DDP the gradients
    are averaged across ranks, so the step moves towards the mean adapted weights of every rank's tasks:
    batched Reptile with no extra code. With ``torch.optim.Adam`` the same gradient ``theta - phi`` is fed
    to Adam, which is the paper's "Reptile with Adam" variant (its Mini-ImageNet / Omniglot setting). Keep
    weight decay off (it would change the update) and gradient clipping loose.

    `predict` adapts on the support set only (``eval_inner_steps``) and classifies or segments the query.

    Args:
        task: ``classification`` or ``segmentation``.
        n_way: classes per episode (classification; ignored for segmentation).
        backbone: registered backbone name (``conv4``, ``resnet12``; ``unet`` for segmentation).
        in_channels: image channels.
        backbone_kwargs: options of the backbone builder.
        inner_steps: inner SGD steps per task in meta-training.
        inner_lr: inner learning rate.
        eval_inner_steps: inner steps in `predict`; default ``2 * inner_steps``.
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
    ) -> None:
        super().__init__()
        self.task = check_task(task)
        if inner_steps < 1 or (eval_inner_steps is not None and eval_inner_steps < 0):
            raise ValueError(f"Reptile needs inner_steps >= 1 and eval_inner_steps >= 0; got {inner_steps}, {eval_inner_steps}")
        if inner_lr <= 0:
            raise ValueError(f"inner_lr must be > 0, got {inner_lr}")
        self.net = TaskNetwork(self.task, n_way, backbone, in_channels, backbone_kwargs)
        self.n_way = None if self.task_kind.dense else self.net.n_out  # the head fixes the ways
        self.inner_steps = int(inner_steps)
        self.inner_lr = float(inner_lr)
        self.eval_inner_steps = 2 * self.inner_steps if eval_inner_steps is None else int(eval_inner_steps)

    def adapted_weights(self, task: Episode) -> dict[str, torch.Tensor]:
        """``phi_t``: the weights after ``inner_steps`` SGD steps on one task's support and query data.

        Args:
            task: an unbatched episode.

        Returns:
            Detached adapted parameters, keyed by their names in ``net``.
        """
        images = torch.cat([task.support_images, task.query_images])
        labels = torch.cat([task.support_labels, task.query_labels])
        start = {n: p.detach().requires_grad_() for n, p in self.net.named_parameters() if p.requires_grad}
        adapted, _ = adapt_on_support(self.net, images, labels, self.inner_steps, self.inner_lr, True, params=start)
        return {n: v.detach() for n, v in adapted.items()}

    def loss(self, episode: Episode) -> torch.Tensor:
        """The Reptile surrogate ``mean_t 0.5 * sum ||theta - phi_t||^2`` of a batched episode (a scalar).

        Its value is half the mean squared distance travelled by the inner loop (a rough progress signal,
        not a task loss); its gradient is ``theta - mean_t phi_t``.
        """
        episode = episode.unsqueeze()
        check_class_labels(episode, self.n_way, type(self).__name__)
        tasks = episode.tasks()
        params = {n: p for n, p in self.net.named_parameters() if p.requires_grad}
        total = 0.0
        for task in tasks:
            phi = self.adapted_weights(task)
            total = total + sum(0.5 * (params[n] - phi[n]).pow(2).sum() for n in params)
        return total / len(tasks)

    def predict(self, episode: Episode) -> torch.Tensor:
        """Adapt on each task's support set (``eval_inner_steps``) and predict its query set.

        Args:
            episode: a batched (or unbatched) episode.

        Returns:
            classification: (T, N*Q, n_way) class probabilities; segmentation: (T, Q, H, W) foreground
            probabilities. Detached.
        """
        episode = episode.unsqueeze()
        check_class_labels(episode, self.n_way, type(self).__name__, query=False)
        out = []
        for task in episode.tasks():
            start = {n: p.detach().requires_grad_() for n, p in self.net.named_parameters() if p.requires_grad}
            adapted, frozen = adapt_on_support(
                self.net, task.support_images, task.support_labels, self.eval_inner_steps, self.inner_lr, True, params=start
            )
            with torch.no_grad():
                logits = functional_forward(self.net, adapted, frozen, task.query_images)
            out.append(self.task_kind.probabilities(logits).detach())
        return torch.stack(out)

    # ------------------------------------------------------------------ explanations
    def encoder_name(self) -> str | None:
        """The pooled encoder ``net.body`` (explanations compare its features before adaptation); dense
        segmentation bodies have none."""
        return None if self.task_kind.dense else "net.body"
