"""The network that gradient-based learners adapt: a backbone and a task head, and its adaptation on a support set.

MAML and its family, Reptile, Meta-LSTM and the fine-tuning baselines all adapt the same kind of network,
so it lives here once. The task kind (`imaging_meta.tasks.Task`) decides its shape:

* classification: a pooled encoder (`imaging_meta.backbones.build_encoder`) and a linear head,
  (N, C, *spatial) -> (N, n_way) logits; labels are class indices in ``[0, n_way)``.
* segmentation (a dense task): dense backbone features and a 1x1 convolution, (N, C, H, W) -> (N, 2, H, W)
  logits (background, foreground); labels are binary masks (N, H, W).

The head is the module ``head``: ANIL adapts only the parameters whose names start with ``head.``.
`adapt_on_support` is the inner loop of one task on such a network (MAML's and Reptile's); `forward_query`
runs the adapted network on the task's queries, normalised with the statistics of its support under the same
weights, so that a query's prediction never depends on the other queries.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from imaging_meta.backbones import (
    backbone_channels,
    batch_statistics_only,
    build_backbone,
    build_encoder,
    uses_support_statistics,
)
from imaging_meta.learners.inner_loop import Params, adapt, functional_forward, split_state
from imaging_meta.learners.support_norms import forward_with_known_norms, support_norm_layers
from imaging_meta.tasks import Task, get_task


def check_task(task: str | Task) -> str:
    """The name of a task kind (``"classification"``, ``"segmentation"``), checked by `imaging_meta.tasks.get_task`.

    Raises:
        ValueError: for any other name, listing the valid ones.
    """
    return get_task(task).name


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
        kind = get_task(task)
        self.task = kind.name
        self.n_out = kind.n_outputs(n_way)
        kwargs = dict(backbone_kwargs or {})
        if kind.dense:
            self.body = build_backbone(backbone, in_channels, **kwargs)
            stride = getattr(self.body, "stride", 1)
            if stride != 1:  # its 1x1 head gave logits 1/stride the mask's size, and the loss an internal error (a review)
                raise ValueError(f"task {self.task!r} predicts a mask the size of the image, and the {backbone!r} backbone "
                                 f"shrinks the image {stride}x: set backbone: unet (with backbone_kwargs as in "
                                 "configs/model/maml_seg.yaml)")
            self.head: nn.Conv2d | nn.Linear = nn.Conv2d(backbone_channels(self.body), self.n_out, kernel_size=1)
        else:
            self.body = build_encoder(backbone, in_channels, **kwargs)
            self.head = nn.Linear(self.body.out_features, self.n_out)
        # every pass of this network runs functionally on copies of its buffers (`inner_loop.split_state`), so
        # running statistics would never follow training: its norms use batch (support) statistics in eval too
        batch_statistics_only(self.body)

    @property
    def kind(self) -> Task:
        """The network's `imaging_meta.tasks.Task`: its loss and probabilities."""
        return get_task(self.task)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, *spatial) -> (N, D) embeddings (classification) or (N, D, H, W) dense features."""
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, *spatial) -> (N, n_way) or (N, 2, H, W) logits."""
        return self.head(self.body(x))

    def head_names(self) -> set[str]:
        """Names of the head's parameters, as ``named_parameters`` gives them (for ANIL)."""
        return {f"head.{n}" for n, _ in self.head.named_parameters()}


def adapt_on_support(
    net: TaskNetwork,
    images: torch.Tensor,
    labels: torch.Tensor,
    steps: int,
    lr: float | Mapping[str, torch.Tensor],
    first_order: bool,
    names: set[str] | None = None,
    params: Params | None = None,
    checkpoint: bool = False,
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
        checkpoint: checkpoint the activations of each inner step (see `inner_loop.adapt`).

    Returns:
        ``(adapted, frozen)``: the adapted parameters and the rest of the state, ready for
        `functional_forward`.
    """
    live, frozen = split_state(net, names)
    start = live if params is None else params
    task_loss = net.kind.loss

    def support_loss(p: Params) -> torch.Tensor:
        return task_loss(functional_forward(net, p, frozen, images), labels)

    return adapt(net, support_loss, start, steps, lr, first_order, checkpoint=checkpoint), frozen


def forward_query(
    net: nn.Module,
    params: Mapping[str, torch.Tensor],
    frozen: Mapping[str, torch.Tensor],
    support_images: torch.Tensor,
    query_images: torch.Tensor,
    two_pass: bool = True,
) -> torch.Tensor:
    """The outputs of ``net`` (with ``params`` and ``frozen`` in place of its state) on one task's queries,
    normalised with the statistics of the task's support under the same weights.

    A backbone with batch statistics (`imaging_meta.backbones.uses_support_statistics`) takes them from the
    support: a query's output depends on the support and on itself only, and gradients flow through the support
    statistics too. By default the support runs first and the queries then run with its statistics, in
    cache-sized chunks on a CPU (`imaging_meta.learners.support_norms.forward_in_two_passes`: the fused
    kernels, faster forward and backward); with ``two_pass=False``, or for a batch-statistics norm layer that
    it does not know, the support and the queries run in one pass under
    `imaging_meta.backbones.support_statistics` (elementary operations: exact derivatives of every order under
    ``torch.func.vmap``, which MAML's vmapped loop needs). The two agree to rounding. Any other network (instance
    norm, a transductive backbone, a body of the user's own) is run on the queries alone.

    Args:
        net: the network holding the meta-parameters.
        params: the (adapted) parameters, as from `adapt_on_support`.
        frozen: the rest of the state.
        support_images: (S, C, *spatial) the task's support.
        query_images: (Q, C, *spatial) its queries.
        two_pass: the two-pass form (default), else the one-pass form.

    Returns:
        (Q, ...) outputs, e.g. (Q, n_way) or (Q, 2, H, W) logits.
    """
    if not uses_support_statistics(net):
        return functional_forward(net, params, frozen, query_images)

    def fn(x: torch.Tensor) -> torch.Tensor:
        return functional_forward(net, params, frozen, x)

    layers = support_norm_layers(net, {**frozen, **params}) if two_pass else {}
    return forward_with_known_norms(fn, layers, support_images, query_images)[1]
