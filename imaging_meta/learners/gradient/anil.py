"""ANIL: MAML that adapts only the network's head in the inner loop."""

from __future__ import annotations

from imaging_meta.learners.gradient.maml import MAML


class ANIL(MAML):
    """Almost No Inner Loop: the body is meta-learned but only the head is adapted per task.

    Raghu, Raghu, Bengio, Vinyals. "Rapid Learning or Feature Reuse? Towards Understanding the Effectiveness
    of MAML." ICLR 2020. The inner loop updates the head's parameters (`TaskNetwork.head_names`: the linear
    classifier, or the 1x1 segmentation convolution); the body keeps its meta-values during adaptation, and
    the meta-gradient still reaches it through the query loss (and, in second order, through the head's
    inner gradients). Arguments are those of `MAML`.
    """

    def adapted_names(self) -> set[str]:
        """The head's parameters only."""
        return self.net.head_names()
