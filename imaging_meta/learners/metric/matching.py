"""Matching networks for few-shot classification, with optional full-context embeddings."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from imaging_meta.backbones import build_encoder
from imaging_meta.episode import Episode
from imaging_meta.learners.base import Learner, SimilarityMeasure, classification_batch
from imaging_meta.learners.prototypes import class_onehot, episode_n_way


class SupportContext(nn.Module):
    """The support embedding g of full-context embeddings: a bidirectional LSTM over the support set.

    ``g(x_i) = h_fwd_i + h_bwd_i + g'(x_i)`` (Vinyals et al. 2016, appendix A.2): the forward and backward
    hidden states plus a skip connection from the encoder's embedding ``g'(x_i)``.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.lstm = nn.LSTM(dim, dim, batch_first=True, bidirectional=True)

    def forward(self, support: torch.Tensor) -> torch.Tensor:
        """(T, S, D) support embeddings, in the episode's order -> (T, S, D) context embeddings."""
        out, _ = self.lstm(support)
        fwd, bwd = out.chunk(2, dim=-1)
        return fwd + bwd + support


class QueryAttentionLSTM(nn.Module):
    """The query embedding f of full-context embeddings: an LSTM that reads the support set by attention.

    Vinyals et al. 2016, appendix A.1, for ``k = 1 .. K`` processing steps, starting from ``h_0 = c_0 = 0``::

        r_{k-1} = sum_i a(h_{k-1}, g(x_i)) g(x_i),  a = softmax_i(h_{k-1}^T g(x_i))
        h^_k, c_k = LSTM(f'(x), [h_{k-1}, r_{k-1}], c_{k-1})
        h_k = h^_k + f'(x)

    and ``f(x) = h_K``. The paper's LSTM takes the concatenated state ``[h, r]``; an ``LSTMCell`` with input
    ``[f'(x), r]`` and state ``h`` computes the same gates, ``W_x f' + W_h h + W_r r + b``.
    """

    def __init__(self, dim: int, steps: int) -> None:
        super().__init__()
        if steps < 1:
            raise ValueError(f"fce_steps must be >= 1, got {steps}")
        self.steps = int(steps)
        self.cell = nn.LSTMCell(2 * dim, dim)

    def forward(self, query: torch.Tensor, support: torch.Tensor) -> torch.Tensor:
        """Context query embeddings.

        Args:
            query: (T, Q, D) encoder embeddings f'(x) of the queries.
            support: (T, S, D) context support embeddings g(x_i).

        Returns:
            (T, Q, D) embeddings f(x); each query is processed on its own (its attention reads only the
            support of its task).
        """
        t, n_q, dim = query.shape
        flat_q = query.reshape(t * n_q, dim)
        h = torch.zeros_like(flat_q)
        c = torch.zeros_like(flat_q)
        for _ in range(self.steps):
            attention = (h.view(t, n_q, dim) @ support.transpose(1, 2)).softmax(-1)  # (T, Q, S)
            read = (attention @ support).reshape(t * n_q, dim)
            h_hat, c = self.cell(torch.cat([flat_q, read], dim=-1), (h, c))
            h = h_hat + flat_q
        return h.view(t, n_q, dim)


class MatchingNetwork(Learner):
    """Matching network: a query's class distribution is an attention-weighted vote of the support labels.

    Vinyals, Blundell, Lillicrap, Kavukcuoglu, Wierstra. "Matching Networks for One Shot Learning."
    NeurIPS 2016.

    ``P(y | x, S) = sum_i a(x, x_i) y_i`` with ``a(x, x_i) = softmax_i(scale * cos(f(x), g(x_i)))`` and
    ``y_i`` the one-hot support labels: these are the class probabilities; the loss is the negative log of
    the true class's probability (clamped away from 0). Without full-context embeddings ``f = g`` is the
    encoder and the support order does not matter. With ``fce=True``, ``g`` is a bidirectional LSTM over the
    support embeddings with a skip connection (`SupportContext`) and ``f`` an attention LSTM that reads the
    support over ``fce_steps`` steps (`QueryAttentionLSTM`); the bidirectional LSTM sees the support in the
    episode's order (the samplers give it grouped by class), so predictions then depend on that order.

    Each task's support and query are embedded together, with the support's batch statistics (see
    `Learner.embed_episode`), so a prediction depends neither on the other queries nor on the other tasks.

    Args:
        backbone: registered backbone name (``conv4``, ``resnet12``), pooled into embedding vectors.
        in_channels: image channels.
        backbone_kwargs: options of the backbone builder, e.g. ``{"width": 32}``; ``"transductive": True``
            normalises with the statistics of support and queries together.
        fce: use full-context embeddings.
        fce_steps: processing steps K of the attention LSTM.
        scale: multiplies the cosines before the softmax; 1 is the paper's attention (cosines lie in
            [-1, 1], so the attention stays soft).
        eps: probabilities are clamped to at least ``eps`` before the logarithm of the loss.
    """

    task = "classification"

    def __init__(
        self,
        backbone: str = "conv4",
        in_channels: int = 1,
        backbone_kwargs: dict | None = None,
        fce: bool = False,
        fce_steps: int = 3,
        scale: float = 1.0,
        eps: float = 1e-8,
    ) -> None:
        super().__init__()
        if not scale > 0:
            raise ValueError(f"scale must be > 0, got {scale}")
        if not 0 < eps < 1:
            raise ValueError(f"eps must lie in (0, 1), got {eps}")
        self.encoder = build_encoder(backbone, in_channels, **(backbone_kwargs or {}))
        dim = self.encoder.out_features
        self.fce = bool(fce)
        self.support_context = SupportContext(dim) if self.fce else None
        self.query_context = QueryAttentionLSTM(dim, fce_steps) if self.fce else None
        self.scale = float(scale)
        self.eps = float(eps)

    def encoder_name(self) -> str:
        """The encoder g' = f' (`embed`), before the full-context embeddings."""
        return "encoder"

    def embed_episode(self, episode: Episode) -> tuple[torch.Tensor, torch.Tensor]:
        """g(support) (T, S, D) and f(query) (T, Q, D) of a batched episode."""
        s, q = super().embed_episode(episode)
        if self.fce:
            assert self.support_context is not None and self.query_context is not None  # built when fce
            s = self.support_context(s)
            q = self.query_context(q, s)
        return s, q

    def attention(self, query: torch.Tensor, support: torch.Tensor) -> torch.Tensor:
        """Softmax over the support of the scaled cosine similarities.

        Args:
            query: (T, Q, D).
            support: (T, S, D).

        Returns:
            (T, Q, S) attention weights; each row sums to 1.
        """
        cos = F.normalize(query, dim=-1) @ F.normalize(support, dim=-1).transpose(1, 2)
        return (self.scale * cos).softmax(-1)

    def predict(self, episode: Episode) -> torch.Tensor:
        """Class probabilities (T, N*Q, n_way): attention-weighted sums of the one-hot support labels."""
        ep = classification_batch(episode, type(self).__name__)
        s, q = self.embed_episode(ep)
        onehot = class_onehot(ep.support_labels, episode_n_way(ep), s.dtype)
        return self.attention(q, s) @ onehot

    def loss(self, episode: Episode) -> torch.Tensor:
        """Negative log-likelihood of the query labels, mean over the query items of all tasks."""
        ep = classification_batch(episode, type(self).__name__)
        probs = self.predict(ep)
        return F.nll_loss(probs.clamp(min=self.eps).log().flatten(0, 1), ep.query_labels.flatten().long())

    # ------------------------------------------------------------------ explanations
    @property
    def similarity_measure(self) -> SimilarityMeasure:
        """The attention weight, the share of a support item's label in a query's predicted distribution."""
        return SimilarityMeasure(
            "matching_attention",
            "attention weight a(query, support item) of the matching network: the share of the support item's "
            "label in the predicted class distribution",
            "weight",
            True,
        )

    def support_similarity(self, episode: Episode) -> torch.Tensor:
        """(T, Q, S) attention weights a(query, support item) (`attention`); each row sums to 1."""
        s, q = self.embed_episode(episode)
        return self.attention(q, s)
