"""MANN: a memory-augmented neural network that learns to bind images to labels in an external memory."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from imaging_meta.backbones import build_encoder
from imaging_meta.episode import Episode
from imaging_meta.learners.base import (
    Learner,
    check_classification_episode,
    check_support_classes,
    content_order,
    embed_tasks,
)


def cosine_similarity(keys: torch.Tensor, memory: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Cosine similarity of every key with every memory slot.

    Args:
        keys: (B, H, W) one key per head.
        memory: (B, S, W) slots.

    Returns:
        (B, H, S) similarities in [-1, 1] (0 for an all-zero slot).
    """
    dots = torch.einsum("bhw,bsw->bhs", keys, memory)
    norms = keys.norm(dim=-1).unsqueeze(-1) * memory.norm(dim=-1).unsqueeze(-2)
    return dots / (norms + eps)


def least_used(usage: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Least-used weights: 1 on the ``n`` slots of smallest usage, 0 elsewhere (ties: the lower slot index).

    Args:
        usage: (B, S) usage weights w^u.
        n: how many slots are "least used" (the paper: the number of reads per step).

    Returns:
        (B, S) weights w^lu, and (B,) the index of the single least-used slot.
    """
    order = torch.sort(usage.detach(), dim=-1, stable=True).indices
    weights = torch.zeros_like(usage).scatter(-1, order[:, :n], 1.0)
    return weights, order[:, 0]


def write_weights(gate: torch.Tensor, prev_read: torch.Tensor, prev_least_used: torch.Tensor) -> torch.Tensor:
    """Least-Recently-Used Access write weights, w^w_t = sigmoid(alpha) w^r_{t-1} + (1 - sigmoid(alpha)) w^lu_{t-1}.

    Args:
        gate: (B, H) sigmoid(alpha) of every head.
        prev_read: (B, H, S) the heads' read weights of the previous step.
        prev_least_used: (B, S) the least-used weights of the previous step.

    Returns:
        (B, H, S) write weights.
    """
    g = gate.unsqueeze(-1)
    return g * prev_read + (1.0 - g) * prev_least_used.unsqueeze(1)


def update_usage(usage: torch.Tensor, read: torch.Tensor, write: torch.Tensor, gamma: float) -> torch.Tensor:
    """w^u_t = gamma w^u_{t-1} + w^r_t + w^w_t, summed over heads: (B, S), (B, H, S), (B, H, S) -> (B, S)."""
    return gamma * usage + read.sum(1) + write.sum(1)


class MemoryState(NamedTuple):
    """The recurrent state, batch B (tasks, or tasks x queries).

    Attributes:
        h: (B, controller_size) controller output.
        c: (B, controller_size) controller cell.
        memory: (B, S, W) memory matrix.
        usage: (B, S) usage weights.
        read_weights: (B, H, S) last read weights.
        reads: (B, H, W) last read vectors.
    """

    h: torch.Tensor
    c: torch.Tensor
    memory: torch.Tensor
    usage: torch.Tensor
    read_weights: torch.Tensor
    reads: torch.Tensor

    def expand(self, n: int) -> MemoryState:
        """Every state repeated ``n`` times, consecutively: batch B -> B * n."""
        return MemoryState(*(v.repeat_interleave(n, dim=0) for v in self))


class MANN(Learner):
    """Memory-augmented neural network with Least-Recently-Used Access.

    Santoro, Bartunov, Botvinick, Wierstra, Lillicrap. "Meta-Learning with Memory-Augmented Neural Networks."
    ICML 2016.

    An encoder (Conv-4) turns each image into ``x_t``. An LSTM controller reads ``[x_t, y_t, r_{t-1}]`` (a
    one-hot label, and the previous read vectors, as in the Neural Turing Machine) and emits, per head, a
    key ``k_t``, a write vector ``a_t`` and a write gate ``alpha_t``. Each step:

    1. reads: ``w^r_t = softmax_i(beta_t * cos(k_t, M_{t-1}(i)))``, ``r_t = sum_i w^r_t(i) M_{t-1}(i)``;
    2. writes: ``w^w_t = sigmoid(alpha_t) w^r_{t-1} + (1 - sigmoid(alpha_t)) w^lu_{t-1}``, after zeroing the
       least-used slot of ``M_{t-1}``; ``M_t(i) = M_{t-1}(i) + sum_heads w^w_t(i) a_t``;
    3. usage: ``w^u_t = gamma w^u_{t-1} + w^r_t + w^w_t``; ``w^lu_t`` marks the ``read_heads`` least-used slots;
    4. output: ``linear([h_t, r_t])`` -> n_way logits.

    ``beta_t = 1 + softplus(.)`` is the NTM key strength (Graves, Wayne, Danihelka, "Neural Turing Machines",
    2014); with ``key_strength=False`` it is 1, the paper's plain softmax over cosine similarities. With
    ``write_key=True`` the write vector is the key itself, ``a_t = k_t``, as in the paper; otherwise it is
    a separate projection of ``h_t`` (the NTM's add vector).

    Deliberate deviations from the paper, for episodic (support/query) training:

    * Each support item is presented *with its own label*, ``[x_t, onehot(y_t)]``, not the paper's offset
      label ``y_{t-1}``. The offset serves the paper's online setting, where a label arrives after the
      prediction; with it, binding an image to its label takes two steps (write the image code, then add
      the label to the slot read at the previous step), which is why the paper trains for 1e5 episodes.
      Here the support labels are known up front, so one step writes a joint (image, label) code into a
      least-used slot. Queries are presented with a zero label.
    * With ``input_skip`` (default) the key sees the controller's input as well as its output,
      ``k_t = tanh(W [h_t, x_t, y_t])``: a written row then holds a joint (image, label) code directly, and a
      query's key (label zero) matches it by the image part. Without it the image code must first pass
      through the LSTM, and the model learns several times more slowly.
    * A step reads the memory *before* its own write (``M_{t-1}``), so a query reads the support set only,
      never its own key (the written vector would match the key perfectly and mask the support slots).

    Episode framing: the support items are presented in a random order. `loss` draws it from torch's global
    generator (seeded by ``seed_everything``), so training sees a new order every episode. `predict` orders
    each task's items by a hash of their own pixels and labels, keyed with ``seed`` (`content_order`): the order
    looks random from task to task and predictions are deterministic, and a task's prediction depends neither
    on its place in a batch of tasks nor on the order its support items are listed in. (It used to draw one
    order per task from a single seeded generator, so the same task got another order, and other answers, at
    another place in the batch.) Every query
    item then takes one step from the state after the whole support, each independently (the state is
    expanded over the queries): a query's prediction depends on neither the order nor the number of the
    other queries. For the same reason the encoder's BatchNorms normalise support and queries with
    statistics of the task's support set (TaskNorm's MetaBN; ``backbone_kwargs={"transductive": True}``: of
    the support and queries together). The loss is the query cross-entropy (a support
    step sees its own label, so its prediction would teach nothing).

    Support recall (``support_recall=True``, on by default; training only): the support items are also
    presented as queries and must be classified by their own labels. Reading a slot back and decoding its
    label is what a query needs too, but a query's read only carries its label once the keys of its class
    match, and the keys only learn to match once reads are decoded: on the demo lesion patches, where
    untrained features of one class are barely closer than those of others, MANN trained without recall
    stayed at the uniform loss (ln 5) for 1,000 episodes at several learning rates and memory sizes, and
    with a protonet-trained encoder. Recalling the support set teaches the read-and-decode path from the
    first step; the query term then teaches the keys. Same items, so no extra encoding cost.

    Args:
        n_way: classes per episode.
        backbone: registered encoder name (``conv4``, ``resnet12``).
        in_channels: image channels.
        backbone_kwargs: options of the backbone builder (e.g. ``{"width": 32}``).
        controller_size: LSTM controller units (the paper: 200).
        memory_slots: memory rows S (the paper: 128).
        memory_width: memory columns W (the paper: 40).
        read_heads: read (and write) heads; also the number of least-used slots (the paper: 4).
        gamma: usage decay.
        key_strength: learn the NTM key strength beta (False: beta = 1, as in the paper).
        write_key: write the key (the paper) rather than a separate add vector.
        input_skip: the key is computed from ``[h_t, x_t, y_t]`` (the controller output and its input)
            rather than from ``h_t`` alone.
        support_recall: in `loss`, also present every support item again as a query (label zero, from the
            state after the whole support) and add its cross-entropy. See "Support recall" above.
        seed: key of the support order in `predict` (`content_order`).
    """

    task = "classification"
    n_way: int  # set in __init__ (Learner declares it as optional)

    def __init__(
        self,
        n_way: int = 5,
        backbone: str = "conv4",
        in_channels: int = 1,
        backbone_kwargs: dict | None = None,
        controller_size: int = 128,
        memory_slots: int = 128,
        memory_width: int = 40,
        read_heads: int = 4,
        gamma: float = 0.95,
        key_strength: bool = True,
        write_key: bool = True,
        input_skip: bool = True,
        support_recall: bool = True,
        seed: int = 0,
    ) -> None:
        super().__init__()
        n_way = self.task_kind.n_outputs(n_way)  # checks n_way >= 2
        if min(controller_size, memory_slots, memory_width, read_heads) < 1 or read_heads > memory_slots:
            raise ValueError(
                "controller_size, memory_slots, memory_width and read_heads must be >= 1 and read_heads <= memory_slots; got "
                f"{controller_size}, {memory_slots}, {memory_width}, {read_heads}"
            )
        if not 0.0 <= gamma <= 1.0:
            raise ValueError(f"gamma must lie in [0, 1], got {gamma}")
        self.n_way = int(n_way)
        self.memory_slots, self.memory_width, self.read_heads = int(memory_slots), int(memory_width), int(read_heads)
        self.gamma = float(gamma)
        self.seed = int(seed)
        self.support_recall = bool(support_recall)
        self.encoder = build_encoder(backbone, in_channels, **(backbone_kwargs or {}))
        reads = self.read_heads * self.memory_width
        self.controller = nn.LSTMCell(self.encoder.out_features + self.n_way + reads, controller_size)
        self.skip = bool(input_skip)
        head_in = controller_size + (self.encoder.out_features + self.n_way if self.skip else 0)
        self.key = nn.Linear(head_in, reads)
        self.add = None if write_key else nn.Linear(controller_size, reads)
        self.alpha = nn.Linear(controller_size, self.read_heads)
        self.strength = nn.Linear(controller_size, self.read_heads) if key_strength else None
        if self.strength is not None:  # start at beta = 10: sharp enough to address single slots
            nn.init.constant_(self.strength.bias, math.log(math.expm1(9.0)))
        self.output = nn.Linear(controller_size + reads, self.n_way)

    # ------------------------------------------------------------------ parts
    def initial_state(self, batch: int, like: torch.Tensor) -> MemoryState:
        """Empty memory (a tiny constant, so that cosine similarities are defined), zero usage and reads."""
        hc = like.new_zeros(batch, self.controller.hidden_size)
        s, w, h = self.memory_slots, self.memory_width, self.read_heads
        return MemoryState(
            hc, hc, like.new_full((batch, s, w), 1e-6), like.new_zeros(batch, s), like.new_zeros(batch, h, s), like.new_zeros(batch, h, w)
        )

    def step(self, x: torch.Tensor, y: torch.Tensor, state: MemoryState) -> tuple[torch.Tensor, MemoryState]:
        """One time step: read the memory, then write to it.

        Args:
            x: (B, D) encoded images.
            y: (B, n_way) one-hot labels of the items (zeros for queries).
            state: the previous `MemoryState`, batch B.

        Returns:
            (B, n_way) logits and the new state.
        """
        b = x.shape[0]
        h, c = self.controller(torch.cat([x, y, state.reads.flatten(1)], 1), (state.h, state.c))
        keys = torch.tanh(self.key(torch.cat([h, x, y], 1) if self.skip else h)).view(b, self.read_heads, self.memory_width)
        similarity = cosine_similarity(keys, state.memory)
        if self.strength is not None:
            similarity = similarity * (1.0 + F.softplus(self.strength(h))).unsqueeze(-1)
        read = similarity.softmax(-1)
        reads = torch.einsum("bhs,bsw->bhw", read, state.memory)
        adds = keys if self.add is None else torch.tanh(self.add(h)).view(b, self.read_heads, self.memory_width)
        prev_least_used, least_index = least_used(state.usage, self.read_heads)
        write = write_weights(torch.sigmoid(self.alpha(h)), state.read_weights, prev_least_used)
        keep = 1.0 - F.one_hot(least_index, self.memory_slots).to(x.dtype)  # zero the least-used slot first
        memory = state.memory * keep.unsqueeze(-1) + torch.einsum("bhs,bhw->bsw", write, adds)
        usage = update_usage(state.usage, read, write, self.gamma)
        logits = self.output(torch.cat([h, reads.flatten(1)], 1))
        return logits, MemoryState(h, c, memory, usage, read, reads)

    def encode(self, support_images: torch.Tensor, query_images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode the support and the queries of each task, BatchNorm with the task's support statistics
        (`imaging_meta.learners.base.embed_tasks`).

        Args:
            support_images: (T, N*K, C, *spatial).
            query_images: (T, Q, C, *spatial).

        Returns:
            (T, N*K, D) and (T, Q, D) embeddings.
        """
        return embed_tasks(self.encoder, support_images, query_images)

    @staticmethod
    def random_order(n_tasks: int, n_support: int) -> torch.Tensor:
        """(T, N*K) a new random order of each task's support items, from torch's global generator (`loss`)."""
        return torch.stack([torch.randperm(n_support) for _ in range(n_tasks)])

    def sequence_logits(
        self,
        support_images: torch.Tensor,
        support_labels: torch.Tensor,
        query_images: torch.Tensor,
        order: torch.Tensor,
    ) -> torch.Tensor:
        """Run each task's support sequence, then every query from the state after it.

        Args:
            support_images: (T, N*K, C, *spatial).
            support_labels: (T, N*K) class indices.
            query_images: (T, Q, C, *spatial).
            order: (T, N*K) the order in which each task's support items are presented.

        Returns:
            (T, Q, n_way) query logits.
        """
        n_tasks, n_support = support_labels.shape
        n_query = query_images.shape[1]
        s_emb, q_emb = self.encode(support_images, query_images)
        order = order.to(s_emb.device)
        s_emb = s_emb.gather(1, order.unsqueeze(-1).expand_as(s_emb))
        onehot = F.one_hot(support_labels.long().gather(1, order), self.n_way).to(s_emb.dtype)
        state = self.initial_state(n_tasks, s_emb)
        for t in range(n_support):
            _, state = self.step(s_emb[:, t], onehot[:, t], state)
        q = q_emb.flatten(0, 1)
        query_logits, _ = self.step(q, q.new_zeros(q.shape[0], self.n_way), state.expand(n_query))
        return query_logits.view(n_tasks, n_query, self.n_way)

    def forward(self, episode: Episode) -> torch.Tensor:
        """(T, Q, n_way) query logits of a (batched) classification episode, each task's support presented in its
        `content_order`; see `sequence_logits`."""
        ep = check_classification_episode(episode, self.n_way, type(self).__name__)
        # a class without a support item: refused, as every other learner refuses it (it was answered; a review)
        check_support_classes(ep.support_labels, self.n_way)
        order = content_order(ep.support_images, ep.support_labels, self.seed)
        return self.sequence_logits(ep.support_images, ep.support_labels, ep.query_images, order)

    # -------------------------------------------------------------- interface
    def loss(self, episode: Episode) -> torch.Tensor:
        """Cross-entropy over the queries (and, with ``support_recall``, the recalled support items), mean
        over the items and tasks of a batched episode (a scalar)."""
        ep = check_classification_episode(episode.unsqueeze(), self.n_way, type(self).__name__)
        images, labels = ep.query_images, ep.query_labels
        if self.support_recall:
            images, labels = torch.cat([ep.support_images, images], 1), torch.cat([ep.support_labels, labels], 1)
        order = self.random_order(*ep.support_labels.shape)
        logits = self.sequence_logits(ep.support_images, ep.support_labels, images, order)
        return F.cross_entropy(logits.flatten(0, 1), labels.long().flatten())

    def predict(self, episode: Episode) -> torch.Tensor:
        """(T, N*Q, n_way) class probabilities of the queries; deterministic, and each task's independent of
        the others in the batch (support order: `content_order`)."""
        return self(episode).softmax(-1)

    # ------------------------------------------------------------------ explanations
    def encoder_name(self) -> str:
        """The image encoder; explanations compare its features of the support and query, embedded as `encode`
        embeds them: a stand-in for the memory's own reads."""
        return "encoder"
