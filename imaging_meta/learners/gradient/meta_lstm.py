"""Meta-LSTM: an LSTM meta-learner that learns the learner's update rule and its initial weights."""

from __future__ import annotations

import math

import torch
from torch import nn

from imaging_meta.episode import Episode
from imaging_meta.learners.base import Learner, check_classification_episode
from imaging_meta.learners.inner_loop import Params, functional_forward, split_state
from imaging_meta.learners.task_network import TaskNetwork, forward_query


def preprocess_gradient(x: torch.Tensor, p: float = 10.0) -> torch.Tensor:
    """Log-magnitude and sign of each coordinate (Andrychowicz et al. 2016, Appendix A).

    ``x -> (log|x| / p, sign(x))`` where ``|x| >= exp(-p)``, else ``(-1, exp(p) * x)``: inputs whose scale
    spans many orders of magnitude become two bounded features.

    Args:
        x: (*,) values (gradient coordinates or a loss); treated as inputs, never differentiated.
        p: the scale parameter (the paper uses 10).

    Returns:
        (*, 2) features.
    """
    x = x.detach()
    threshold = math.exp(-p)
    big = x.abs() >= threshold
    log_magnitude = torch.where(big, x.abs().clamp_min(threshold).log() / p, -torch.ones_like(x))
    sign = torch.where(big, torch.sign(x), math.exp(p) * x)
    return torch.stack([log_magnitude, sign], dim=-1)


class MetaLSTM(Learner):
    """Meta-LSTM: the learner's parameters are the cell state of an LSTM that learns how to update them.

    Ravi, Larochelle. "Optimization as a Model for Few-Shot Learning." ICLR 2017.

    The learner is a `TaskNetwork` (encoder + linear head). Its flattened parameters are the cell state
    ``c`` of the meta-learner. On the support set, for ``t = 1..T``::

        g_t, L_t = gradient and loss of the learner at c_{t-1}        (inputs: no second derivatives)
        x_t      = LSTM([preprocess(L_t), preprocess(g_t)])           (a standard LSTM layer, per coordinate)
        f_t      = sigmoid(W_F . [x_t, c_{t-1}, f_{t-1}] + b_F)         (forget gate)
        i_t      = sigmoid(W_I . [x_t, c_{t-1}, i_{t-1}] + b_I)         (input gate, a learned learning rate)
        c_t      = f_t * c_{t-1} - i_t * g_t

    All weights are shared across coordinates (every parameter of the learner is one element of the LSTM's
    batch). ``c_0`` is the learner's own (meta-learned) initial parameters; the meta-loss is the query loss
    of the learner at ``c_T``. Gradients and losses are preprocessed as in Andrychowicz, Denil, Gomez,
    Hoffman, Pfau, Schaul, Shillingford, de Freitas, "Learning to learn by gradient descent by gradient
    descent", NeurIPS 2016 (p = 10). ``b_F`` starts large (forget gate near 1) and ``b_I`` small (input gate
    = ``input_lr_init``), so the first updates are close to SGD with that learning rate, as in the paper. How
    close depends on ``b_F``: the update is ``c_0 - i g - (1 - f) c_0``, and the last term, a weight decay, is
    not small next to the step when the parameters are large next to their gradients. On the demo lesions with
    ``b_F = 5`` (the paper draws it from [4, 6]) it was about 30% of the first step's size; with
    ``b_F = 10`` (``1 - f = 5e-5``, 150 times smaller) the first update is SGD to about 0.2%.

    Initial head (``zero_head``). Each task's labels are a fresh assignment of its classes to the ``n_way``
    outputs, so no initial head in ``c_0`` can favour the right class; a random one only makes the first
    predictions confidently wrong in a task-dependent way. With it, on the demo lesions the meta-learner
    lowered the query loss first by shrinking its learning rate (input gate 0.1 -> 0.02) and its parameters
    (forget gate 0.993 -> 0.95) until the learner predicted uniformly (loss ln 5), and stayed at chance. A
    zero head starts every class alike, and the first update turns it into the support's centred class means
    of the features (a prototype classifier, up to scale): MAML's "zeroing trick" (Kao, Chiu, Chen, "MAML is a
    Noisy Contrastive Learner in Classification", ICLR 2022), here only at initialisation.

    Training and test run the same number of updates ``T``. The paper trains the meta-learner "specifically for
    the scenario where a set amount of updates will be made" (its abstract): the gates (learning rate and
    forgetting) are learned for the horizon ``T``, and meta-test runs the same ``T`` updates on the support
    set. So ``eval_inner_steps`` defaults to ``inner_steps``; a different value is a deviation from the paper
    (a config that sets one says so).

    The learner's BatchNorms use batch statistics only (as in the paper, also at test time); they keep no
    running statistics, so adaptation never changes module state. The queries are normalised with the
    statistics of their task's support (`task_network.forward_query`), so a query's prediction never depends
    on the other queries.

    Args:
        n_way: classes per episode.
        backbone: registered encoder name (``conv4``, ``resnet12``).
        in_channels: image channels.
        backbone_kwargs: options of the backbone builder (e.g. ``{"width": 32}``).
        inner_steps: updates on the support set during meta-training (T).
        eval_inner_steps: updates in `predict`; default ``inner_steps`` (the paper's: the same ``T``).
        hidden_size: hidden units of the first (standard) LSTM layer (the paper: 20).
        input_lr_init: initial input gate ``sigmoid(b_I)``, i.e. the initial learning rate.
        forget_bias_init: initial ``b_F`` (sigmoid(5) = 0.993).
        gate_weight_init: the gate weights ``W_F``, ``W_I`` start uniform in +-this value.
        preprocess_p: the ``p`` of the gradient preprocessing.
        zero_head: start the learner's head (in ``c_0``) at zero rather than at PyTorch's random init.
    """

    task = "classification"
    n_way: int  # set in __init__ (Learner declares it as optional)

    def __init__(
        self,
        n_way: int = 5,
        backbone: str = "conv4",
        in_channels: int = 1,
        backbone_kwargs: dict | None = None,
        inner_steps: int = 5,
        eval_inner_steps: int | None = None,
        hidden_size: int = 20,
        input_lr_init: float = 0.01,
        forget_bias_init: float = 5.0,
        gate_weight_init: float = 0.01,
        preprocess_p: float = 10.0,
        zero_head: bool = False,
    ) -> None:
        super().__init__()
        if inner_steps < 1 or (eval_inner_steps is not None and eval_inner_steps < 1):
            raise ValueError(f"inner_steps and eval_inner_steps must be >= 1, got {inner_steps}, {eval_inner_steps}")
        if not 0.0 < input_lr_init < 1.0:
            raise ValueError(f"input_lr_init is the initial input gate, a sigmoid: it must lie in (0, 1), got {input_lr_init}")
        if hidden_size < 1 or preprocess_p <= 0:
            raise ValueError(f"hidden_size must be >= 1 and preprocess_p > 0, got {hidden_size}, {preprocess_p}")
        self.n_way = int(n_way)
        self.inner_steps = int(inner_steps)
        self.eval_inner_steps = int(eval_inner_steps) if eval_inner_steps is not None else self.inner_steps
        self.preprocess_p = float(preprocess_p)
        self.network = TaskNetwork(self.task, n_way, backbone, in_channels, backbone_kwargs)
        if zero_head:  # c_0's head: no class is favoured before the first update (see "Initial head" above)
            nn.init.zeros_(self.network.head.weight)
            assert self.network.head.bias is not None  # TaskNetwork's heads have biases
            nn.init.zeros_(self.network.head.bias)
        # first layer: a standard LSTM over [preprocessed loss (2), preprocessed gradient (2)]
        self.lstm = nn.LSTMCell(4, hidden_size)
        # second layer: the meta-learner cell; weights over [x_t (hidden_size), c_{t-1}, gate_{t-1}]
        self.forget_weight = nn.Parameter(torch.empty(hidden_size + 2).uniform_(-gate_weight_init, gate_weight_init))
        self.forget_bias = nn.Parameter(torch.tensor(float(forget_bias_init)))
        self.input_weight = nn.Parameter(torch.empty(hidden_size + 2).uniform_(-gate_weight_init, gate_weight_init))
        self.input_bias = nn.Parameter(torch.tensor(math.log(input_lr_init / (1.0 - input_lr_init))))

    # ------------------------------------------------------------------ parts
    def _gate(self, weight: torch.Tensor, bias: torch.Tensor, x: torch.Tensor, c: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
        """sigmoid(W . [x, c, prev] + b) for every coordinate: x (P, H), c (P,), prev (P,) -> (P,)."""
        h = x.shape[1]
        return torch.sigmoid(x @ weight[:h] + c * weight[h] + prev * weight[h + 1] + bias)

    def adapt_task(self, support_images: torch.Tensor, support_labels: torch.Tensor, steps: int) -> Params:
        """Run the meta-learner for ``steps`` updates on one task's support set.

        Args:
            support_images: (N*K, C, *spatial).
            support_labels: (N*K,) class indices in ``[0, n_way)``.
            steps: number of updates T (>= 0).

        Returns:
            The learner's parameters ``c_T`` by name (shapes of ``self.network``'s parameters); differentiable
            functions of ``c_0`` and of the meta-learner's weights when called with grad enabled.
        """
        if torch.is_inference_mode_enabled():
            raise RuntimeError(
                "MetaLSTM needs the learner's gradients to adapt, which torch.inference_mode() forbids: call "
                "predict under torch.no_grad() instead, and under Lightning set Trainer(inference_mode=False)"
            )
        params, frozen = split_state(self.network)
        names = list(params)
        shapes = [p.shape for p in params.values()]
        sizes = [p.numel() for p in params.values()]

        def unflatten(flat: torch.Tensor) -> Params:
            return {n: v.view(s) for n, v, s in zip(names, flat.split(sizes), shapes, strict=True)}

        c = torch.cat([p.reshape(-1) for p in params.values()])
        n_coords = c.numel()
        task_loss = self.task_kind.loss
        zeros = c.new_zeros(n_coords, self.lstm.hidden_size)
        state = (zeros, zeros)
        forget = c.new_zeros(n_coords)
        inp = c.new_zeros(n_coords)
        for _ in range(steps):
            with torch.enable_grad():  # predict runs under no_grad; the learner's gradient is an input
                leaf = c.detach().requires_grad_(True)
                loss = task_loss(functional_forward(self.network, unflatten(leaf), frozen, support_images), support_labels)
                (grad,) = torch.autograd.grad(loss, leaf)
            x = torch.cat([preprocess_gradient(loss, self.preprocess_p).expand(n_coords, 2), preprocess_gradient(grad, self.preprocess_p)], 1)
            state = self.lstm(x, state)
            forget = self._gate(self.forget_weight, self.forget_bias, state[0], c, forget)
            inp = self._gate(self.input_weight, self.input_bias, state[0], c, inp)
            c = forget * c - inp * grad
        return unflatten(c)

    def query_logits(self, episode: Episode, steps: int) -> torch.Tensor:
        """(T, N*Q, n_way) query logits of the learner at ``c_T`` of each task."""
        ep = check_classification_episode(episode, self.n_way, type(self).__name__)
        _, frozen = split_state(self.network)
        out = []
        for t in range(ep.n_tasks):
            params = self.adapt_task(ep.support_images[t], ep.support_labels[t], steps)
            out.append(forward_query(self.network, params, frozen, ep.support_images[t], ep.query_images[t]))
        return torch.stack(out)

    # -------------------------------------------------------------- interface
    def loss(self, episode: Episode) -> torch.Tensor:
        """Query cross-entropy at ``c_T``, mean over the tasks of a batched episode (a scalar)."""
        ep = episode.unsqueeze()
        logits = self.query_logits(ep, self.inner_steps)
        return self.task_kind.loss(logits.flatten(0, 1), ep.query_labels.flatten(0, 1))

    def predict(self, episode: Episode) -> torch.Tensor:
        """(T, N*Q, n_way) class probabilities of the queries after ``eval_inner_steps`` updates, detached: the
        meta-learner's graph over every step is not kept, with gradients on or off (as MAML's `predict`)."""
        with torch.no_grad():  # adapt_task turns gradients on for the learner's gradient alone
            return self.query_logits(episode, self.eval_inner_steps).softmax(-1)

    # ------------------------------------------------------------------ explanations
    def encoder_name(self) -> str:
        """The learner's pooled encoder at its initial weights ``c_0`` (explanations compare its features)."""
        return "network.body"
