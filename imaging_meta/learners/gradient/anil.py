"""ANIL: MAML that adapts only the network's head in the inner loop, on features encoded once per task.

Since the body keeps its meta-values during adaptation, its features of a task's support and queries do not
change from one inner step to the next. ANIL therefore encodes each task once: the support, then the queries
normalised with the support's statistics (as `task_network.forward_query` normalises them), and adapts the head
alone on the support features (a linear layer, or the 1x1 segmentation convolution): each inner step costs a
head forward and backward, not a pass of the whole encoder. The meta-gradient still reaches the body through
the query features and, in second order, through the support features inside the head's inner gradients.
Losses, meta-gradients and predictions equal those of MAML restricted to the head's parameters, the
formulation before (tested in float64 in ``tests/imaging_meta/test_anil.py``); the state dict and the config
are unchanged, so checkpoints written before load as they are.

One difference remains, and only for a body with random layers (dropout; no registered backbone has any by
default): the support is encoded with one draw of the random masks, not a new draw per inner step.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch.func import functional_call, vmap

from imaging_meta.backbones import forward_with_support_statistics, uses_support_statistics
from imaging_meta.episode import Episode
from imaging_meta.learners.gradient.maml import MAML
from imaging_meta.learners.inner_loop import Params, adapt, adapt_functional, split_state
from imaging_meta.learners.support_norms import forward_in_two_passes, support_norm_layers

_BODY, _HEAD = "body.", "head."


def _strip(params: Mapping[str, torch.Tensor], prefix: str) -> Params:
    """The entries of ``params`` whose name starts with ``prefix``, keyed by the rest of the name."""
    return {n[len(prefix):]: t for n, t in params.items() if n.startswith(prefix)}


class ANIL(MAML):
    """Almost No Inner Loop: the body is meta-learned but only the head is adapted per task.

    Raghu, Raghu, Bengio, Vinyals. "Rapid Learning or Feature Reuse? Towards Understanding the Effectiveness
    of MAML." ICLR 2020. The inner loop updates the head's parameters (`TaskNetwork.head_names`: the linear
    classifier, or the 1x1 segmentation convolution) on the body's features of the support, which are
    computed once per task (see the module docstring); the body keeps its meta-values during adaptation, and
    the meta-gradient still reaches it through the query loss (and, in second order, through the head's
    inner gradients). Arguments are those of `MAML`: ``first_order`` drops the second-order terms,
    ``task_batching="vmap"`` adapts the tasks of a batch at once, ``checkpoint_inner`` checkpoints each
    (now cheap) head step. The state dict and the config are MAML's, as before.

    The body is differentiated once only (the second-order terms are the head's), so it runs PyTorch's own
    kernels, not `inner_loop.FastKernels`, and on a CPU a Conv-4 body keeps channels-last weights
    (`imaging_meta.learners.base.keep_channels_last_on_cpu`): about 1.5x faster (`benchmarks/memory_format.py`).
    """

    channels_last_on_cpu = True

    def adapted_names(self) -> set[str]:
        """The head's parameters only."""
        return self.net.head_names()

    # ------------------------------------------------------------------ pieces
    def _split(self, detach: bool = False) -> tuple[Params, Params]:
        """``(head, frozen)``: the head's live parameters (keyed ``head.*``) and the rest of the state (body
        parameters, clones of the buffers), as `inner_loop.split_state` gives them; detached for prediction."""
        head, frozen = split_state(self.net, self.adapted_names())
        if detach:
            head = {n: p.detach() for n, p in head.items()}
            frozen = {n: t.detach() for n, t in frozen.items()}
        return head, frozen

    def _body(self, frozen: Mapping[str, torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
        """The body as a function of its input, with its parameters and buffers taken from ``frozen``."""
        state = _strip(frozen, _BODY)
        return lambda x: functional_call(self.net.body, state, (x,), strict=True)

    def encode(
        self, frozen: Mapping[str, torch.Tensor], support: torch.Tensor, query: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The body's features of one task's support and queries, with the body's state taken from ``frozen``.

        A body with support statistics (`imaging_meta.backbones.uses_support_statistics`) normalises the
        queries with the support's statistics, as `task_network.forward_query` does: the support is run on its
        own (as in MAML's inner loop), keeping each norm layer's statistics, then the queries with them, on a CPU in
        cache-sized chunks (`imaging_meta.learners.support_norms.forward_in_two_passes`); if the body also has a
        batch-statistics norm of another kind, the queries are run after the support in one pass, as `task_network.forward_query` runs them. Any other body (the U-Net's
        instance norm, a transductive backbone) is run on each set on its own.

        Returns:
            (S, D) and (Q, D) embeddings, or (S, D, H, W) and (Q, D, H, W) dense features.
        """
        body = self._body(frozen)
        if not uses_support_statistics(self.net):
            return body(support), body(query)
        fs, fq = forward_in_two_passes(body, support_norm_layers(self.net.body, frozen, _BODY), support, query)
        if fq is None:  # a batch-statistics norm of the user's own: the queries as forward_query runs them
            fq = forward_with_support_statistics(body, support, query)[1]
        return fs, fq

    def head_logits(self, head: Mapping[str, torch.Tensor], features: torch.Tensor) -> torch.Tensor:
        """The head, with parameters ``head`` (keyed ``head.*``), on body features: (N, n_way) or (N, 2, H, W)."""
        return functional_call(self.net.head, _strip(head, _HEAD), (features,), strict=True)

    def adapt_head(
        self, head: Params, features: torch.Tensor, labels: torch.Tensor, steps: int, first_order: bool
    ) -> Params:
        """``steps`` inner SGD steps of the head on one task's support features (`inner_loop.adapt`).

        Second order keeps the graph of every step, so the meta-gradient reaches ``head`` and, through
        ``features``, the body; first order treats the inner gradients as constants.
        """
        inner = features.detach() if first_order else features
        task_loss = self.net.kind.loss

        def support_loss(p: Params) -> torch.Tensor:
            return task_loss(self.head_logits(p, inner), labels)

        return adapt(self.net, support_loss, head, steps, self.inner_learning_rates(), first_order,
                     checkpoint=self.checkpoint_inner)

    # ------------------------------------------------------------------ the algorithm
    def adapt_task(self, task: Episode, steps: int, first_order: bool) -> tuple[Params, Params]:
        """Adapt the head on the support set of one unbatched task (the body's support features, computed once).

        Returns:
            ``(adapted, frozen)`` as `MAML.adapt_task` gives them: the adapted head and the rest of the state
            (the body's meta-parameters themselves), ready for `task_network.forward_query`.
        """
        head, frozen = self._split()
        with torch.enable_grad():  # the support features carry the body's graph, as MAML's inner loop does
            fs = self._body(frozen)(task.support_images)
        return self.adapt_head(head, fs, task.support_labels, steps, first_order), frozen

    def adapt_and_query(
        self,
        episode: Episode,
        steps: int,
        first_order: bool,
        finish: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        differentiable: bool = True,
    ) -> torch.Tensor:
        """Encode each task once, adapt the head on its support features and apply
        ``finish(query_logits, query_labels)`` to each task (see `MAML.adapt_and_query`).

        Honours ``task_batching``: a Python loop over tasks, or one vmapped call. With ``differentiable=False``
        (prediction) the body runs without a graph.
        """
        if self.task_batching == "vmap":
            return self._adapt_and_query_batched(episode, steps, first_order, finish, differentiable)
        graph = differentiable and torch.is_grad_enabled()
        head, frozen = self._split()  # the head stays live: the inner loop differentiates the support loss in it
        out = []
        for task in episode.tasks():
            with torch.set_grad_enabled(graph):
                fs, fq = self.encode(frozen, task.support_images, task.query_images)
            adapted = self.adapt_head(head, fs, task.support_labels, steps, first_order or not graph)
            with torch.set_grad_enabled(graph):
                out.append(finish(self.head_logits(adapted, fq), task.query_labels))
        return torch.stack(out)

    def _adapt_and_query_batched(
        self,
        episode: Episode,
        steps: int,
        first_order: bool,
        finish: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        differentiable: bool,
    ) -> torch.Tensor:
        """`adapt_and_query` with ``torch.func.vmap`` over the tasks (`inner_loop.adapt_functional` on the head).

        Buffers are cloned once per task and passed through vmap (never mutated in place). The body is only
        differentiated once (second order differentiates the head twice, never the body), so, unlike MAML's
        vmapped loop, no `inner_loop.DecomposedNorms` is needed.
        """
        head, frozen = self._split(detach=not differentiable)
        buffer_names = {n for n, _ in self.net.named_buffers()}
        buffers = {n: frozen.pop(n) for n in buffer_names}
        n_tasks = episode.n_tasks
        task_buffers = {n: b.unsqueeze(0).expand(n_tasks, *b.shape).clone() for n, b in buffers.items()}
        task_loss = self.net.kind.loss
        lr = self.inner_learning_rates()
        if not differentiable and isinstance(lr, Mapping):
            lr = {n: r.detach() for n, r in lr.items()}

        def one_task(bufs: Params, xs: torch.Tensor, ys: torch.Tensor, xq: torch.Tensor, yq: torch.Tensor) -> torch.Tensor:
            fs, fq = self.encode({**frozen, **bufs}, xs, xq)
            inner = fs.detach() if first_order else fs

            def support_loss(p: Params) -> torch.Tensor:
                return task_loss(self.head_logits(p, inner), ys)

            adapted = adapt_functional(self.net, support_loss, head, steps, lr, first_order)
            return finish(self.head_logits(adapted, fq), yq)

        batched = vmap(one_task, randomness="different")
        return batched(task_buffers, episode.support_images, episode.support_labels, episode.query_images,
                       episode.query_labels)
