"""ANIL: MAML that adapts only the network's head in the inner loop."""

from __future__ import annotations

from imaging_meta.learners.maml import MAML


class ANIL(MAML):
    """Almost No Inner Loop: the body is meta-learned but only the head is adapted per task.

    Raghu, Raghu, Bengio, Vinyals. "Rapid Learning or Feature Reuse? Towards Understanding the Effectiveness
    of MAML." ICLR 2020. The inner loop updates the head's parameters (`TaskNetwork.head_names`: the linear
    classifier, or the 1x1 segmentation convolution); the body keeps its meta-values during adaptation, and
    the meta-gradient still reaches it through the query loss (and, in second order, through the head's
    inner gradients). Arguments are those of `MAML`.
    """

    # An explicit __init__ so that `Learner` records ANIL's own class path and arguments for checkpoints
    # (`Learner.__init_subclass__` only records in the most derived class that defines __init__).
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
        super().__init__(task, n_way, backbone, in_channels, backbone_kwargs, inner_steps, inner_lr, eval_inner_steps, first_order)

    def adapted_names(self) -> set[str]:
        """The head's parameters only."""
        return self.net.head_names()
