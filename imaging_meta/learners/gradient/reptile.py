"""Reptile: first-order meta-learning by moving the initialisation towards the task-adapted weights."""

from __future__ import annotations

from typing import cast

import torch

from imaging_meta.episode import Episode
from imaging_meta.learners.base import Learner, check_class_labels, content_order
from imaging_meta.learners.inner_loop import Params, split_state
from imaging_meta.learners.task_network import TaskNetwork, adapt_on_support, check_task, forward_query

#: the seed of the minibatch order in `predict`: evaluation is deterministic and a task's prediction does not
#: depend on its place in a batch of tasks; the support is first put in its `content_order` (keyed with this
#: seed), so the minibatches do not depend on the order in which it is listed either
PREDICT_SEED = 0


def minibatch_indices(n: int, batch: int, steps: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """(steps, batch) indices into ``n`` examples: the paper's ``_mini_batches`` stream.

    The examples are shuffled, cut into consecutive batches of ``batch``, and reshuffled whenever they run out
    (a batch may straddle two shuffles; with ``batch > n`` it repeats examples), as in
    ``supervised_reptile/reptile.py`` of Nichol et al. When ``batch == n`` every step sees every example once,
    in their given order (full-batch gradient descent, no randomness).

    Args:
        n: examples in the task's training pool.
        batch: the inner minibatch size.
        steps: inner steps.
        generator: the random source of the shuffles (None: torch's default generator).
    """
    if batch == n:
        return torch.arange(n).repeat(steps, 1)
    if steps == 0:
        return torch.zeros(0, batch, dtype=torch.long)
    epochs = -(-steps * batch // n)
    order = torch.cat([torch.randperm(n, generator=generator) for _ in range(epochs)])
    return order[: steps * batch].view(steps, batch)


class Reptile(Learner):
    """Reptile, written as a loss so that the module's automatic optimisation (and DDP) runs it unchanged.

    Nichol, Achiam, Schulman. "On First-Order Meta-Learning Algorithms." arXiv:1803.02999, 2018.
    For each task, ``inner_steps`` plain SGD steps (learning rate ``inner_lr``) on minibatches drawn from the
    task's data (Algorithm 2: ``W_i = SGD(L_tau_i, phi, k)``) give adapted weights ``phi_t``; Reptile then
    moves the meta-weights towards them: ``theta <- theta + eps (phi - theta)`` with ``phi`` the mean of
    ``phi_t`` over the tasks of the batch (batched Reptile).

    Training and test adapt alike. Meta-training adapts on the task's support set, in minibatches of
    ``inner_batch_size`` (default: the support size, i.e. full-batch steps on the whole support set), which is
    exactly what `predict` does on a test task's support set; the query set is only ever predicted. This
    follows the paper's evaluation, which adapts on a task's ``shots`` training examples only, and its inner
    loop, minibatch steps on one task's examples (``_mini_batches`` of ``supervised_reptile``, reproduced by
    `minibatch_indices`). Where this deviates from the paper's experiments (their hyperparameters are the
    commands in the ``openai/supervised-reptile`` README):

    * the paper meta-trains on a larger pool per task than it evaluates with ("train shots" 10-15 per class
      against 1 or 5 shots at test), in minibatches smaller than that pool. ``train_on_query=True`` gets the
      same here: the pool is support + query, still in support-sized minibatches (or ``inner_batch_size``);
    * the paper's inner optimiser is Adam (beta1 = 0); here it is plain SGD, the algorithm as the paper states
      it (Algorithm 1 and 2);
    * the paper tunes the evaluation iterations separately (usually more than in training: 8 -> 88 for 5-shot
      Mini-ImageNet). ``eval_inner_steps`` defaults to ``inner_steps`` so that test adaptation is the one
      meta-training optimised for; a config that sets more says so.

    `loss` returns the surrogate ``L(theta) = mean_t 0.5 * ||theta - stopgrad(phi_t)||^2`` (summed over all
    parameters), whose gradient is exactly ``theta - phi``. One step of ``torch.optim.SGD(lr=eps)`` on it is
    therefore exactly the Reptile interpolation with step size ``eps``, through the ordinary
    ``loss.backward(); optimizer.step()`` of `imaging_meta.module.EpisodicModule`. Under DDP the gradients
    are averaged across ranks, so the step moves towards the mean adapted weights of every rank's tasks:
    batched Reptile with no extra code. The paper's outer step is that interpolation, with ``eps`` annealed
    linearly to 0 (a scheduler on the SGD learning rate). With ``torch.optim.Adam`` the same gradient
    ``theta - phi`` is fed to Adam instead: an outer Adam step, which is not in the paper (its Adam is the inner
    optimiser). Keep weight decay off (it would change the update) and gradient clipping loose.

    The queries are predicted at the adapted weights, normalised with the statistics of their task's whole
    support set (`task_network.forward_query`): a query's prediction never depends on the other queries.

    Minibatches smaller (or larger) than the pool are shuffled: in training from torch's default generator
    (``seed_everything`` seeds it), in `predict` from a generator seeded per task (`PREDICT_SEED`), so that
    evaluation is deterministic.

    Args:
        task: ``classification`` or ``segmentation``.
        n_way: classes per episode (classification; ignored for segmentation).
        backbone: registered backbone name (``conv4``, ``resnet12``; ``unet`` for segmentation).
        in_channels: image channels.
        backbone_kwargs: options of the backbone builder.
        inner_steps: inner SGD steps per task in meta-training.
        inner_lr: inner learning rate.
        eval_inner_steps: inner steps in `predict`; default ``inner_steps``.
        inner_batch_size: examples per inner step, in training and in `predict`; default (None): the task's
            support size (N*K classification items or K slices), so each step is full-batch on the support set.
        train_on_query: meta-train on the support and query sets together (the paper's larger "train shots"
            pool), still in minibatches of ``inner_batch_size``; default False: the support set only.
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
        inner_batch_size: int | None = None,
        train_on_query: bool = False,
    ) -> None:
        super().__init__()
        self.task = check_task(task)
        if inner_steps < 1 or (eval_inner_steps is not None and eval_inner_steps < 0):
            raise ValueError(f"Reptile needs inner_steps >= 1 and eval_inner_steps >= 0; got {inner_steps}, {eval_inner_steps}")
        if inner_lr <= 0:
            raise ValueError(f"inner_lr must be > 0, got {inner_lr}")
        if inner_batch_size is not None and inner_batch_size < 1:
            raise ValueError(f"inner_batch_size must be >= 1 (or None: the support size), got {inner_batch_size}")
        self.net = TaskNetwork(self.task, n_way, backbone, in_channels, backbone_kwargs)
        self.n_way = None if self.task_kind.dense else self.net.n_out  # the head fixes the ways
        self.inner_steps = int(inner_steps)
        self.inner_lr = float(inner_lr)
        self.eval_inner_steps = self.inner_steps if eval_inner_steps is None else int(eval_inner_steps)
        self.inner_batch_size = None if inner_batch_size is None else int(inner_batch_size)
        self.train_on_query = bool(train_on_query)

    def adapt(
        self, task: Episode, steps: int, pool: tuple[torch.Tensor, torch.Tensor], generator: torch.Generator | None
    ) -> tuple[Params, Params]:
        """``steps`` SGD steps from the meta-weights on minibatches of ``pool``, one task's ``(images, labels)``.

        Minibatches hold ``inner_batch_size`` examples (default: the task's support size); see
        `minibatch_indices`.

        Returns:
            ``(adapted, frozen)`` for `functional_forward`; ``adapted`` starts from detached copies of the
            meta-weights, so no gradient reaches them.
        """
        images, labels = pool
        batch = self.inner_batch_size or len(task.support_images)
        params = {n: p.detach().requires_grad_() for n, p in self.net.named_parameters() if p.requires_grad}
        _, frozen = split_state(self.net)
        for idx in minibatch_indices(len(images), batch, steps, generator).to(images.device):
            params, frozen = adapt_on_support(self.net, images[idx], labels[idx], 1, self.inner_lr, True, params=params)
        return params, frozen

    def adapted_weights(self, task: Episode) -> dict[str, torch.Tensor]:
        """``phi_t``: the weights after ``inner_steps`` SGD steps on one task's training pool.

        The pool is the support set (with ``train_on_query``: support and query), in minibatches of
        ``inner_batch_size``.

        Args:
            task: an unbatched episode.

        Returns:
            Detached adapted parameters, keyed by their names in ``net``.
        """
        pool = (task.support_images, task.support_labels)
        if self.train_on_query:
            pool = (torch.cat([task.support_images, task.query_images]), torch.cat([task.support_labels, task.query_labels]))
        adapted, _ = self.adapt(task, self.inner_steps, pool, None)
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
        total: torch.Tensor | float = 0.0
        for task in tasks:
            phi = self.adapted_weights(task)
            total = total + sum(0.5 * (params[n] - phi[n]).pow(2).sum() for n in params)
        return cast(torch.Tensor, total / len(tasks))  # a tensor: an episode has a task, the net trainable parameters

    def predict(self, episode: Episode) -> torch.Tensor:
        """Adapt on each task's support set (``eval_inner_steps``, minibatches as in training) and predict its
        query set.

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
            generator = torch.Generator().manual_seed(PREDICT_SEED)
            order = content_order(task.support_images[None], task.support_labels[None], PREDICT_SEED)[0]
            pool = (task.support_images[order], task.support_labels[order])
            adapted, frozen = self.adapt(task, self.eval_inner_steps, pool, generator)
            with torch.no_grad():
                logits = forward_query(self.net, adapted, frozen, task.support_images, task.query_images)
            out.append(self.task_kind.probabilities(logits).detach())
        return torch.stack(out)

    # ------------------------------------------------------------------ explanations
    def encoder_name(self) -> str | None:
        """The pooled encoder ``net.body`` (explanations compare its features before adaptation); dense
        segmentation bodies have none."""
        return None if self.task_kind.dense else "net.body"
