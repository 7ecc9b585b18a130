"""Logistic regression on frozen, L2-normalised features of a supervised pre-trained network."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from imaging_meta.learners.base import check_support_classes
from imaging_meta.learners.transfer.finetune import FineTune


def fit_logistic_regression(
    features: torch.Tensor, labels: torch.Tensor, n_way: int, l2: float = 1.0, max_iter: int = 100
) -> tuple[torch.Tensor, torch.Tensor]:
    """Multinomial logistic regression with an L2 penalty, fit by full-batch L-BFGS (deterministic).

    Minimises ``sum_i CE(W x_i + b, y_i) + l2 / 2 * |W|^2`` (the bias is not penalised), which is
    scikit-learn's ``LogisticRegression(C=1 / l2)`` objective. The problem is strictly convex for
    ``l2 > 0``, so the zero start and the strong-Wolfe line search give the same answer on every run.

    Args:
        features: (N, D) training features.
        labels: (N,) class indices in ``[0, n_way)``.
        n_way: number of classes.
        l2: penalty weight (> 0).
        max_iter: L-BFGS iterations.

    Returns:
        weight (n_way, D) and bias (n_way,), in float64.
    """
    if l2 <= 0 or max_iter < 1:
        raise ValueError(f"l2 must be > 0 and max_iter >= 1; got {l2}, {max_iter}")
    # the fit needs autograd whatever the caller's mode: under torch.inference_mode() (a Trainer's default in
    # validation and test) it raised "element 0 of tensors does not require grad" (a review); clones made outside
    # inference mode are ordinary tensors, as `weighting.fit_weights` makes them
    with torch.inference_mode(False), torch.enable_grad():
        x = features.detach().clone().to(torch.float64)
        y = labels.detach().clone().long()
        weight = torch.zeros(n_way, x.shape[1], dtype=torch.float64, device=x.device, requires_grad=True)
        bias = torch.zeros(n_way, dtype=torch.float64, device=x.device, requires_grad=True)
        opt = torch.optim.LBFGS(
            [weight, bias], lr=1.0, max_iter=max_iter, tolerance_grad=1e-9, tolerance_change=1e-12, history_size=20,
            line_search_fn="strong_wolfe",
        )

        def closure() -> torch.Tensor:
            opt.zero_grad()
            loss = F.cross_entropy(x @ weight.T + bias, y, reduction="sum") + 0.5 * l2 * weight.pow(2).sum()
            loss.backward()
            return loss

        opt.step(closure)
    return weight.detach(), bias.detach()


class LogisticRegressionProbe(FineTune):
    """Logistic regression on frozen embeddings of a network pre-trained on every meta-train class.

    Tian, Wang, Krishnan, Tenenbaum, Isola. "Rethinking Few-Shot Image Classification: a Good Embedding Is
    All You Need?" ECCV 2020. Pre-training is `FineTune`'s (Chen, Liu, Kira, Wang, Huang. "A Closer Look at
    Few-shot Classification." ICLR 2019): cross-entropy over every class name seen in training episodes, with
    a cosine (or linear) global head. At test time the body is frozen, the support and query embeddings are
    L2-normalised, and a multinomial logistic regression (`fit_logistic_regression`) fit on the support
    gives the query class probabilities. Classification only.

    Args:
        backbone: registered backbone name (``conv4``, ``resnet12``), pooled into vectors.
        in_channels: image channels.
        backbone_kwargs: options of the backbone builder.
        max_classes: rows of the global pre-training head (the most class names training episodes may name).
        scale: temperature of the cosine pre-training classifier.
        cosine: cosine pre-training classifier (Baseline++); False: linear (Baseline).
        l2: L2 penalty weight of the logistic regression (scikit-learn's ``C = 1 / l2``; the default 1.0 is
            scikit-learn's default, which Tian et al. use).
        max_iter: L-BFGS iterations.
    """

    task = "classification"

    def __init__(
        self,
        backbone: str = "conv4",
        in_channels: int = 1,
        backbone_kwargs: dict | None = None,
        max_classes: int = 64,
        scale: float = 10.0,
        cosine: bool = True,
        l2: float = 1.0,
        max_iter: int = 100,
    ) -> None:
        super().__init__(
            task="classification", backbone=backbone, in_channels=in_channels, backbone_kwargs=backbone_kwargs,
            max_classes=max_classes, scale=scale, finetune_steps=0, cosine=cosine,
        )
        if l2 <= 0 or max_iter < 1:
            raise ValueError(f"l2 must be > 0 and max_iter >= 1; got {l2}, {max_iter}")
        self.l2 = float(l2)
        self.max_iter = int(max_iter)

    def predict_task(
        self, support_images: torch.Tensor, support_labels: torch.Tensor, query_images: torch.Tensor, n_way: int | None
    ) -> torch.Tensor:
        """One task: logistic regression on the normalised support embeddings, query probabilities.

        Args:
            support_images: (N*K, C, ...).
            support_labels: (N*K,) class indices.
            query_images: (N*Q, C, ...).
            n_way: classes of the task.

        Returns:
            (N*Q, n_way) class probabilities.
        """
        assert n_way is not None  # a classification learner: predict gives every task its way count
        # a class without a support item: refused, as every other learner does (it was fitted at p about 1e-12)
        check_support_classes(support_labels.view(1, -1), n_way)
        fs, fq = self.task_features(support_images, query_images)
        fs, fq = F.normalize(fs, dim=-1), F.normalize(fq, dim=-1)
        weight, bias = fit_logistic_regression(fs, support_labels, n_way, self.l2, self.max_iter)
        return (fq.to(weight.dtype) @ weight.T + bias).softmax(-1).to(fq.dtype)
