"""Meta-LSTM (Ravi & Larochelle, ICLR 2017): shapes, the SGD special case, exact meta-gradients, a short fit."""

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from imaging_meta.episode import Episode
from imaging_meta.learners.base import build_learner
from imaging_meta.learners.gradient.meta_lstm import MetaLSTM, preprocess_gradient
from imaging_meta.learners.inner_loop import adapt, functional_forward, split_state
from tests.imaging_meta.fewshot import accuracy, central_difference, classification_episode, short_fit

SMALL = {"width": 8}
CONFIG = Path(__file__).resolve().parents[2] / "configs" / "model" / "meta_lstm_cls.yaml"


def small(**kw):
    torch.manual_seed(0)
    return MetaLSTM(n_way=5, backbone_kwargs=SMALL, **kw)


def double(ep: Episode) -> Episode:
    return Episode(ep.support_images.double(), ep.support_labels, ep.query_images.double(), ep.query_labels, batched=True)


def test_preprocessing_golden_values():
    x = torch.tensor([1.0, -1e-3, 1e-6, 0.0, -2e-5])
    out = preprocess_gradient(x, p=10.0)
    expected = torch.tensor(
        [[0.0, 1.0], [math.log(1e-3) / 10, -1.0], [-1.0, math.exp(10) * 1e-6], [-1.0, 0.0], [-1.0, -math.exp(10) * 2e-5]]
    )
    assert out.shape == (5, 2)
    assert torch.allclose(out, expected, atol=1e-6)


@pytest.mark.parametrize("n_shot", [1, 5])
def test_shapes_and_probabilities(n_shot):
    m = small(inner_steps=2)
    ep = classification_episode(n_way=5, n_shot=n_shot, n_query=3, tasks=2, size=16)
    probs = m.predict(ep)
    assert probs.shape == (2, 15, 5)
    assert torch.allclose(probs.sum(-1), torch.ones(2, 15), atol=1e-5) and (probs >= 0).all()
    loss = m.loss(ep)
    assert loss.dim() == 0 and torch.isfinite(loss)


def test_gradients_reach_the_meta_learner_and_the_initial_weights():
    m = small(inner_steps=2)
    m.loss(classification_episode(n_way=5, n_shot=1, n_query=2, tasks=2, size=16)).backward()
    for name in ("lstm.weight_ih", "lstm.weight_hh", "lstm.bias_ih", "forget_weight", "forget_bias", "input_weight", "input_bias"):
        g = dict(m.named_parameters())[name].grad
        assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0, name
    for name, p in m.network.named_parameters():  # c_0, the learner's initial weights
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_forget_one_and_constant_input_gate_is_one_sgd_step():
    """f = 1, i = 0.1 everywhere: c_1 = c_0 - 0.1 * grad, exactly `inner_loop.adapt` with one step of lr 0.1."""
    m = small().double()
    with torch.no_grad():
        m.forget_weight.zero_()
        m.forget_bias.fill_(40.0)  # sigmoid(40) == 1 in float64 up to 4e-18
        m.input_weight.zero_()
        m.input_bias.fill_(math.log(0.1 / 0.9))
    ep = double(classification_episode(n_way=5, n_shot=2, n_query=1, tasks=1, size=16, seed=3))
    xs, ys = ep.support_images[0], ep.support_labels[0]
    ours = m.adapt_task(xs, ys, steps=1)
    params, frozen = split_state(m.network)
    sgd = adapt(m.network, lambda p: F.cross_entropy(functional_forward(m.network, p, frozen, xs), ys), params, 1, 0.1)
    assert list(ours) == list(sgd)
    for name in sgd:
        assert torch.allclose(ours[name], sgd[name], rtol=0, atol=1e-12), name
    assert sum((ours[n] - params[n]).abs().sum() for n in params) > 1e-3, "the step did not move the learner"


def test_the_configured_learner_starts_as_plain_sgd_with_its_learning_rate():
    """Ravi & Larochelle initialise the gates so that the first updates are SGD with a small learning rate and
    forget = 1. The shipped config's first update is one plain gradient step with lr = input_lr_init (float32,
    gate weights at their random init): at forget_bias_init 5 it was not, since (1 - sigmoid(5)) c_0 was a
    weight decay about 30% the size of the gradient step on the demo."""
    init_args = yaml.safe_load(CONFIG.read_text())["model"]["learner"]["init_args"]
    torch.manual_seed(0)
    m = build_learner(
        {
            "class_path": "imaging_meta.learners.gradient.meta_lstm.MetaLSTM",
            "init_args": {**init_args, "backbone_kwargs": SMALL},
        }
    )
    ep = classification_episode(n_way=5, n_shot=5, n_query=1, tasks=1, size=16, seed=3)
    xs, ys = ep.support_images[0], ep.support_labels[0]
    params, frozen = split_state(m.network)
    ours = m.adapt_task(xs, ys, steps=1)
    sgd = adapt(
        m.network,
        lambda p: F.cross_entropy(functional_forward(m.network, p, frozen, xs), ys),
        params,
        1,
        init_args["input_lr_init"],
    )
    step = torch.cat([(sgd[n] - params[n]).detach().flatten() for n in params])
    error = torch.cat([(ours[n] - sgd[n]).detach().flatten() for n in params])
    assert step.norm() > 1e-3 and error.norm() < 0.01 * step.norm(), (error.norm(), step.norm())


def test_a_zero_head_starts_every_class_alike():
    """zero_head: c_0's head is zero, so before the first update every class has the same logit; the first update
    then gives the head the support's class means of the features (minus their mean), up to the learning rate."""
    m = small(zero_head=True)
    assert not m.network.head.weight.any() and not m.network.head.bias.any()
    ep = classification_episode(n_way=5, n_shot=2, n_query=1, tasks=1, size=16, seed=3)
    xs, ys = ep.support_images[0], ep.support_labels[0]
    params, frozen = split_state(m.network)
    with torch.no_grad():
        logits = functional_forward(m.network, params, frozen, xs)
        feats = m.network.features(xs)
    assert torch.equal(logits, torch.zeros_like(logits))
    with torch.no_grad():
        m.forget_weight.zero_()
        m.forget_bias.fill_(40.0)
        m.input_weight.zero_()
    head = m.adapt_task(xs, ys, steps=1)["head.weight"].detach()
    means = torch.stack([feats[ys == c].mean(0) for c in range(5)])
    expected = 0.01 * (means - means.mean(0)) / 5  # lr * d(-CE)/dW at uniform predictions, mean over 10 items
    assert torch.allclose(head, expected, rtol=1e-3, atol=1e-8)


def test_meta_gradient_matches_finite_differences_for_one_step():
    """With one update the learner's gradient depends on c_0 only, so the meta-gradient w.r.t. the
    meta-learner's weights is exact (no second derivatives are dropped): check it against central differences."""
    m = small(inner_steps=1).double()
    ep = double(classification_episode(n_way=5, n_shot=1, n_query=2, tasks=1, size=16, seed=4))
    named = dict(m.named_parameters())
    checks = [("input_bias", ()), ("forget_bias", ()), ("input_weight", (3,)), ("forget_weight", (20,)), ("lstm.weight_ih", (5, 1))]
    grads = torch.autograd.grad(m.loss(ep), [named[n] for n, _ in checks])
    for (name, idx), g in zip(checks, grads, strict=True):
        # a step of 1e-5: at 1e-6 the rounding of the loss (~1e-16 of 1.6) left an error of 1e-9 on a gradient of
        # 3e-6, above the tolerance on some CPUs; the truncation error at 1e-5 is far below it
        fd = central_difference(lambda: m.loss(ep).item(), named[name], idx, eps=1e-5)
        assert g[idx].item() == pytest.approx(fd, rel=1e-5, abs=1e-9), name


def test_predict_under_no_grad_and_refuses_inference_mode():
    m = small(inner_steps=2, eval_inner_steps=3)
    ep = classification_episode(n_way=5, n_shot=1, n_query=2, tasks=1, size=16)
    with torch.no_grad():
        probs = m.predict(ep)
    assert probs.shape == (1, 10, 5) and not probs.requires_grad
    assert all(p.grad is None for p in m.parameters())
    # with gradients on, the same values, detached (it kept the meta-learner's graph over every step)
    with_grad = m.predict(ep)
    assert with_grad.grad_fn is None and not with_grad.requires_grad and torch.equal(with_grad, probs)
    with torch.inference_mode(), pytest.raises(RuntimeError, match="inference_mode"):
        m.predict(ep)


def test_eval_inner_steps_are_used_by_predict():
    ep = classification_episode(n_way=5, n_shot=1, n_query=2, tasks=1, size=16)
    a, b = small(inner_steps=1, eval_inner_steps=1), small(inner_steps=1, eval_inner_steps=4)
    with torch.no_grad():
        assert not torch.allclose(a.predict(ep), b.predict(ep))


def record_steps(m: MetaLSTM, monkeypatch) -> list[int]:
    """The ``steps`` of every `MetaLSTM.adapt_task` call of ``m``."""
    seen, original = [], m.adapt_task

    def spy(images, labels, steps):
        seen.append(steps)
        return original(images, labels, steps)

    monkeypatch.setattr(m, "adapt_task", spy)
    return seen


def test_predict_runs_the_training_number_of_updates_by_default(monkeypatch):
    """Ravi & Larochelle train the update rule for a fixed horizon T and test with the same T."""
    m = small(inner_steps=2)
    seen = record_steps(m, monkeypatch)
    ep = classification_episode(n_way=5, n_shot=1, n_query=1, tasks=2, size=16)
    m.loss(ep)
    with torch.no_grad():
        m.predict(ep)
    assert m.eval_inner_steps == m.inner_steps == 2 and seen == [2, 2, 2, 2]


def test_the_config_predicts_with_the_updates_it_trains_with(monkeypatch):
    """The shipped config trains and predicts with the same T (it used to predict with twice as many)."""
    init_args = yaml.safe_load(CONFIG.read_text())["model"]["learner"]["init_args"]
    assert init_args.get("eval_inner_steps", init_args["inner_steps"]) == init_args["inner_steps"]
    torch.manual_seed(0)
    m = build_learner({"class_path": "imaging_meta.learners.gradient.meta_lstm.MetaLSTM",
                       "init_args": {**init_args, "backbone_kwargs": SMALL}})
    seen = record_steps(m, monkeypatch)
    with torch.no_grad():
        m.predict(classification_episode(n_way=5, n_shot=1, n_query=1, tasks=1, size=16))
    assert seen == [m.inner_steps] == [init_args["inner_steps"]]


def test_bad_arguments_and_labels():
    with pytest.raises(ValueError, match="input_lr_init"):
        MetaLSTM(input_lr_init=1.5)
    m = small(inner_steps=1)
    ep = classification_episode(n_way=6, n_shot=1, n_query=1, tasks=1, size=16)
    with pytest.raises(ValueError, match="n_way=5"):
        m.loss(ep)


def test_config_rebuilds_the_learner():
    m = small(inner_steps=3, hidden_size=7)
    cfg = m.config
    assert cfg["class_path"] == "imaging_meta.learners.gradient.meta_lstm.MetaLSTM"
    assert cfg["init_args"]["hidden_size"] == 7 and cfg["init_args"]["backbone_kwargs"] == SMALL
    again = build_learner(cfg)
    again.load_state_dict(m.state_dict())
    ep = classification_episode(n_way=5, n_shot=1, n_query=1, tasks=1, size=16)
    with torch.no_grad():
        assert torch.equal(again.predict(ep), m.predict(ep))


def test_short_fit_improves_accuracy_on_unseen_classes():
    """30 meta-training steps of 2 tasks on classes 0-19 lift 5-way 1-shot accuracy on classes 20-39
    (seeds 0, 1, 2: 0.21 -> 0.39, 0.23 -> 0.43, 0.21 -> 0.50; ~4 s of CPU on one thread)."""
    m = small(inner_steps=3)
    held_out = classification_episode(n_way=5, n_shot=1, n_query=5, tasks=8, size=16, seed=123, class_offset=20)
    before = accuracy(m, held_out)
    short_fit(m, lambda seed: classification_episode(n_way=5, n_shot=1, n_query=3, tasks=2, size=16, seed=seed), steps=30, lr=1e-2)
    after = accuracy(m, held_out)
    assert after > before + 0.1 and after > 0.3, (before, after)


@pytest.mark.slow  # ~30 s on 2 idle-ish cores (98 s on the loaded shared machine)
def test_longer_fit_improves_accuracy_on_unseen_classes():
    m = small(inner_steps=3)
    held_out = classification_episode(n_way=5, n_shot=1, n_query=5, tasks=8, size=16, seed=123, class_offset=20)
    before = accuracy(m, held_out)
    short_fit(m, lambda seed: classification_episode(n_way=5, n_shot=1, n_query=3, tasks=4, size=16, seed=seed), steps=30, lr=1e-2)
    after = accuracy(m, held_out)
    assert after > before + 0.15, (before, after)
