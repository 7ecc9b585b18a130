"""Meta-SGD: MAML with a learned, per-parameter inner learning rate."""

from __future__ import annotations

import torch
from torch import nn

from imaging_meta.learners.gradient.maml import MAML


def _key(name: str) -> str:
    """A parameter name as an `nn.ParameterDict` key (which may not contain dots)."""
    return name.replace(".", "__")


class MetaSGD(MAML):
    """Meta-SGD: learn the inner update's direction and size along with the initialisation.

    Li, Zhou, Chen, Li. "Meta-SGD: Learning to Learn Quickly for Few-Shot Learning." arXiv:1707.09835, 2017.
    Every adapted parameter ``theta`` has a learning-rate tensor ``alpha`` of the same shape (initialised
    to ``inner_lr``); an inner step is ``theta - alpha * grad`` (elementwise), and ``alpha`` is meta-trained
    with the weights by the same outer optimiser. The rates are not constrained to be positive, as in the
    paper. They live in ``inner_lrs``, an `nn.ParameterDict` keyed by the parameter's name in ``net`` with
    dots replaced by ``__``. Arguments are those of `MAML`; with either ``task_batching`` the rates receive
    meta-gradients.
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
        task_batching: str = "loop",
        checkpoint_inner: bool = False,
    ) -> None:
        super().__init__(
            task, n_way, backbone, in_channels, backbone_kwargs, inner_steps, inner_lr, eval_inner_steps, first_order,
            task_batching, checkpoint_inner,
        )
        self.inner_lrs = nn.ParameterDict(
            {_key(n): nn.Parameter(torch.full_like(p.detach(), self.inner_lr)) for n, p in self.net.named_parameters()}
        )

    def inner_learning_rates(self) -> dict[str, torch.Tensor]:
        """One learned rate tensor per parameter of ``net``, keyed by the parameter's name."""
        return {n: self.inner_lrs[_key(n)] for n, _ in self.net.named_parameters()}
