"""Transfer baselines: Baseline / Baseline++ fine-tuning (classification, segmentation) and the logistic-regression probe."""

import functools
import io
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from imaging_meta.backbones import support_statistics
from imaging_meta.episode import Episode
from imaging_meta.learners.base import build_learner
from imaging_meta.learners.transfer.finetune import FineTune
from imaging_meta.learners.transfer.logreg import LogisticRegressionProbe, fit_logistic_regression
from tests.imaging_meta.fewshot import accuracy, classification_episode, dice, segmentation_episode, short_fit

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "model"
TINY = {"width": 8}
TINY_UNET = {"out_channels": 8, "features": [4, 4, 8, 8, 16, 4]}


def tiny_cls(**kw):
    torch.manual_seed(0)
    return FineTune(backbone="conv4", backbone_kwargs=TINY, finetune_steps=5, finetune_lr=0.1, **kw)


def tiny_seg(**kw):
    torch.manual_seed(0)
    kw = {"finetune_steps": 5, **kw}
    return FineTune(task="segmentation", backbone="unet", backbone_kwargs=TINY_UNET, **kw)


def snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items() if isinstance(v, torch.Tensor)}


# --------------------------------------------------------------------------- class-name table
def test_class_table_grows_in_order_of_first_appearance():
    m = tiny_cls(max_classes=8)
    ep = classification_episode(n_way=3, tasks=2, size=8, seed=0, n_classes=6)
    m.loss(ep)
    expected = list(dict.fromkeys(n for names in ep.classes for n in names))
    assert m.class_names == expected
    m.loss(ep)  # names seen before keep their rows
    assert m.class_names == expected
    assert m.rows(ep.classes[1]).tolist() == [expected.index(n) for n in ep.classes[1]]


def test_class_table_persists_through_state_dict_and_weights_only_load():
    m = tiny_cls(max_classes=8)
    m.loss(classification_episode(n_way=3, tasks=2, size=8, seed=0, n_classes=6))
    buf = io.BytesIO()
    torch.save(m.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    fresh = build_learner(m.config)
    assert fresh.class_names == []
    fresh.load_state_dict(state)
    assert fresh.class_names == m.class_names
    assert fresh.rows(m.class_names).tolist() == list(range(len(m.class_names)))
    ep = classification_episode(n_way=3, tasks=2, size=8, seed=5, n_classes=6)
    assert torch.equal(fresh.loss(ep), m.loss(ep))


def test_class_table_errors_clearly_past_capacity():
    m = tiny_cls(max_classes=4)
    m.loss(classification_episode(n_way=3, tasks=1, size=8, seed=0, n_classes=20))
    with pytest.raises(ValueError, match="max_classes=4.*raise model.learner.init_args.max_classes"):
        for s in range(1, 10):
            m.loss(classification_episode(n_way=3, tasks=1, size=8, seed=s, n_classes=20))
    assert len(m.class_names) <= 4
    other = tiny_cls(max_classes=2)
    with pytest.raises(ValueError, match="max_classes"):
        other.load_state_dict(m.state_dict())


def test_class_table_is_shared_across_ddp_ranks(monkeypatch):
    """Under torch.distributed every rank adds the new names of all ranks, in rank order."""
    import torch.distributed as dist

    other_rank = ["classX", "class1"]
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)

    def all_gather_object(out, obj):
        out[0], out[1] = obj, [n for n in other_rank if n not in m.class_names]

    monkeypatch.setattr(dist, "all_gather_object", all_gather_object)
    m = tiny_cls()
    m.register_classes(["class1", "class2"])
    assert m.class_names == ["class1", "class2", "classX"]


# --------------------------------------------------------------------------- shapes and probabilities
@pytest.mark.parametrize("n_shot", [1, 5])
@pytest.mark.parametrize("learner", ["baselinepp", "baseline", "baselinepp_body", "logreg"])
def test_classification_shapes_and_probabilities(learner, n_shot):
    ep = classification_episode(n_way=5, n_shot=n_shot, n_query=3, tasks=2, size=16, seed=1)
    if learner == "logreg":
        torch.manual_seed(0)
        m = LogisticRegressionProbe(backbone="conv4", backbone_kwargs=TINY, max_iter=20)
    else:
        m = tiny_cls(cosine=learner != "baseline", finetune_body=learner.endswith("_body"))
    loss = m.loss(ep)
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())
    with torch.no_grad():
        p = m.predict(ep)
    assert p.shape == (2, 15, 5)
    assert (p >= 0).all() and torch.allclose(p.sum(-1), torch.ones(2, 15), atol=1e-5)
    # an unbatched episode is one task
    assert m.predict(ep.task(0)).shape == (1, 15, 5)


@pytest.mark.parametrize("finetune_body", [False, True])
def test_segmentation_shapes_and_probabilities(finetune_body):
    m = tiny_seg(finetune_body=finetune_body)
    ep = segmentation_episode(n_shot=2, n_query=3, tasks=2, size=32, seed=0)
    loss = m.loss(ep)
    loss.backward()
    assert torch.isfinite(loss) and m.class_names == ["ellipse"]
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())
    with torch.no_grad():
        p = m.predict(ep)
    assert p.shape == (2, 3, 32, 32) and (p >= 0).all() and (p <= 1).all()


def test_pretraining_loss_is_cross_entropy_over_every_seen_class():
    """Golden check: the loss equals the hand-written Baseline++ objective on the body's embeddings."""
    m = tiny_cls(max_classes=16)
    m.loss(classification_episode(n_way=3, tasks=2, size=8, seed=7, n_classes=6))  # register some classes first
    ep = classification_episode(n_way=3, n_shot=2, n_query=1, tasks=2, size=8, seed=3, n_classes=6)
    loss = m.loss(ep)
    n = len(m.class_names)
    w = F.normalize(m.global_weight[:n].detach(), dim=-1)
    expected = []
    for t in range(2):
        x = torch.cat([ep.support_images[t], ep.query_images[t]])
        y = torch.cat([ep.support_labels[t], ep.query_labels[t]])
        target = torch.tensor([m.class_names.index(ep.classes[t][i]) for i in y])
        with support_statistics(len(ep.support_images[t])):  # queries normalised with the support's statistics
            feats = m.body(x).detach()
        logits = 10.0 * F.normalize(feats, dim=-1) @ w.T
        expected.append(F.cross_entropy(logits, target))
    assert torch.allclose(loss.detach(), torch.stack(expected).mean(), atol=1e-6)


def test_segmentation_initial_head_is_the_nearest_mean_discriminant():
    """Without fine-tuning a pixel is foreground exactly when its feature is nearer the support foreground mean."""
    m = tiny_seg(finetune_steps=0)
    f = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    masks = torch.zeros(2, 4, 4, dtype=torch.float64)
    masks[:, :2] = 1
    head = m.initial_head(f, masks, None)
    fg, bg = f.permute(0, 2, 3, 1)[:, :2].reshape(-1, 3).mean(0), f.permute(0, 2, 3, 1)[:, 2:].reshape(-1, 3).mean(0)
    logits = m.foreground_logits(f, head["weight"], head["bias"], (4, 4))[:, 1]
    pix = f.permute(0, 2, 3, 1)
    expected = 0.5 * ((pix - bg).pow(2).sum(-1) - (pix - fg).pow(2).sum(-1))
    assert torch.allclose(logits, expected)


# --------------------------------------------------------------------------- predict is side-effect free
@pytest.mark.parametrize("finetune_body", [False, True])
@pytest.mark.parametrize("grad_mode", ["no_grad", "enable_grad"])
def test_predict_leaves_every_parameter_bit_identical(finetune_body, grad_mode):
    ctx = torch.no_grad if grad_mode == "no_grad" else torch.enable_grad
    for m, ep in [
        (tiny_cls(finetune_body=finetune_body), classification_episode(n_way=3, n_shot=2, tasks=2, size=8, seed=0)),
        (tiny_seg(finetune_body=finetune_body), segmentation_episode(n_shot=1, n_query=1, tasks=1, size=32, seed=0)),
    ]:
        m.loss(ep)
        before = snapshot(m)
        with ctx():
            m.predict(ep)
        after = snapshot(m)
        assert before.keys() == after.keys()
        assert all(torch.equal(before[k], after[k]) for k in before)
        assert all(p.grad is None for p in m.parameters())


def test_finetuning_fits_the_support_better_than_the_initial_head():
    """More fine-tuning steps lower the support loss, with the body frozen or not."""
    ep = classification_episode(n_way=5, n_shot=2, n_query=2, tasks=1, size=16, seed=2)
    for body in (False, True):
        losses = []
        for steps in (0, 15):
            m = tiny_cls(finetune_body=body)
            m.finetune_steps = steps
            with torch.no_grad():
                p = FineTune.predict_task(m, ep.support_images[0], ep.support_labels[0], ep.support_images[0], 5)
            losses.append(F.nll_loss(p.log(), ep.support_labels[0]).item())
        assert losses[1] < losses[0] - 0.05, (body, losses)


def test_predict_refuses_inference_mode_clearly():
    m = tiny_cls()
    ep = classification_episode(n_way=3, tasks=1, size=8)
    with torch.inference_mode(), pytest.raises(RuntimeError, match="torch.no_grad"):
        m.predict(ep)


def test_bad_arguments_and_episodes_raise_value_errors():
    with pytest.raises(ValueError, match="task"):
        FineTune(task="detection")
    with pytest.raises(ValueError, match="max_classes"):
        FineTune(max_classes=0)
    m = tiny_seg()
    ep = segmentation_episode(tasks=1, size=32)
    bad = Episode(ep.support_images, ep.support_labels, ep.query_images, ep.query_labels, classes=[["a", "b"]], batched=True)
    with pytest.raises(ValueError, match="one structure"):
        m.loss(bad)
    with pytest.raises(ValueError, match="twice"):
        tiny_cls().rows(["a", "a"])


# --------------------------------------------------------------------------- logistic regression
def test_logistic_regression_matches_the_closed_form_optimum_and_separates():
    """Golden check: two points +e1 / -e1; by symmetry W = [[a, 0], [-a, 0]], b = 0, where 2 sigmoid(-2a) = l2 a."""
    x = torch.tensor([[1.0, 0.0], [-1.0, 0.0]])
    y = torch.tensor([0, 1])
    for l2 in (0.1, 1.0):
        w, b = fit_logistic_regression(x, y, 2, l2=l2, max_iter=100)
        lo, hi = 0.0, 100.0
        for _ in range(200):  # bisection on the optimality condition
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if 2 / (1 + math.exp(2 * mid)) > l2 * mid else (lo, mid)
        expected = torch.tensor([[lo, 0.0], [-lo, 0.0]], dtype=torch.float64)
        assert torch.allclose(w, expected, atol=1e-6) and torch.allclose(b, torch.zeros(2, dtype=torch.float64), atol=1e-6)
    # separable 4-way clusters: every support point is classified right, probabilities sum to 1
    g = torch.Generator().manual_seed(0)
    centres = torch.eye(4, 8) * 3
    y = torch.arange(4).repeat_interleave(5)
    x = centres[y] + 0.3 * torch.randn(20, 8, generator=g)
    w, b = fit_logistic_regression(x, y, 4, l2=1.0, max_iter=100)
    p = (x.double() @ w.T + b).softmax(-1)
    assert (p.argmax(-1) == y).all() and torch.allclose(p.sum(-1), torch.ones(20, dtype=torch.float64))
    w2, b2 = fit_logistic_regression(x, y, 4, l2=1.0, max_iter=100)
    assert torch.equal(w, w2) and torch.equal(b, b2), "the fit is deterministic"


def test_logistic_regression_fits_under_inference_mode_as_under_no_grad():
    """The descriptor classifier's ``rule="logreg"`` called this fit under torch.inference_mode() (a Trainer's
    default in validation and test) and crashed with "element 0 of tensors does not require grad" (a review)."""
    from imaging_meta.learners.descriptors.classifier import DescriptorClassifier

    g = torch.Generator().manual_seed(0)
    ep = Episode(torch.rand(6, 1, 8, 8, generator=g), torch.tensor([0, 0, 1, 1, 2, 2]),
                 torch.rand(3, 1, 8, 8, generator=g), torch.tensor([0, 1, 2]), classes=list("abc"))
    learner = DescriptorClassifier(features="pixels", rule="logreg")
    with torch.no_grad():
        expected = learner.predict(ep)
    with torch.inference_mode():
        got = learner.predict(ep)
    assert torch.allclose(got, expected, atol=0, rtol=0)


def test_logistic_regression_probe_fits_its_support():
    torch.manual_seed(0)
    m = LogisticRegressionProbe(backbone="conv4", backbone_kwargs={"width": 16}, l2=1e-3, max_iter=200)
    # 10 points in 16 dimensions: linearly separable
    ep = classification_episode(n_way=5, n_shot=2, n_query=1, tasks=1, size=16, seed=4)
    with torch.no_grad():
        p = m.predict_task(ep.support_images[0], ep.support_labels[0], ep.support_images[0], 5)
    # the query is the support itself (same BatchNorm batch twice, so the same embeddings): fit perfectly
    assert (p.argmax(-1) == ep.support_labels[0]).all()


# --------------------------------------------------------------------------- learning
def _pretraining_improves(m):
    test = classification_episode(n_way=5, n_shot=1, n_query=5, tasks=8, size=16, seed=99, class_offset=20)
    before = accuracy(m, test)
    make = functools.partial(classification_episode, n_way=5, n_shot=1, n_query=2, tasks=4, size=16, class_offset=0, n_classes=20)
    short_fit(m, make, steps=25, lr=3e-3)
    after = accuracy(m, test)
    assert after > before + 0.15, (before, after)
    assert len(m.class_names) == 20


def test_pretraining_improves_accuracy_on_unseen_classes_baselinepp():
    torch.manual_seed(0)
    _pretraining_improves(FineTune(backbone="conv4", backbone_kwargs={"width": 16}, finetune_steps=10, finetune_lr=0.1))


def test_pretraining_improves_accuracy_on_unseen_classes_logreg():
    torch.manual_seed(0)
    _pretraining_improves(LogisticRegressionProbe(backbone="conv4", backbone_kwargs={"width": 16}, max_iter=50))


def test_segmentation_pretraining_improves_dice():
    m = tiny_seg(finetune_steps=10)
    test = segmentation_episode(n_shot=1, n_query=2, tasks=4, size=32, seed=99)
    before = dice(m, test)
    short_fit(m, functools.partial(segmentation_episode, n_shot=1, n_query=2, tasks=2, size=32), steps=20, lr=3e-3)
    after = dice(m, test)
    assert after > before + 0.2 and after > 0.8, (before, after)


# --------------------------------------------------------------------------- configs
@pytest.mark.parametrize(
    "name, episode",
    [
        ("baselinepp_cls", lambda: classification_episode(n_way=5, n_shot=1, n_query=2, tasks=4, size=32, seed=0)),
        ("logreg_cls", lambda: classification_episode(n_way=5, n_shot=1, n_query=2, tasks=4, size=32, seed=0)),
        ("finetune_seg", lambda: segmentation_episode(n_shot=1, n_query=2, tasks=1, size=80, seed=0)),
    ],
)
def test_model_configs_build_and_run_on_demo_sized_episodes(name, episode):
    cfg = yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())["model"]["learner"]
    torch.manual_seed(0)
    m = build_learner(cfg)
    ep = episode()
    assert torch.isfinite(m.loss(ep))
    with torch.no_grad():
        p = m.predict(ep)
    assert p.shape[:2] == ep.query_labels.shape[:2] and torch.isfinite(p).all()


def test_pretraining_needs_class_names():
    ep = classification_episode(n_way=3, tasks=2, size=8)
    nameless = Episode(ep.support_images, ep.support_labels, ep.query_images, ep.query_labels, classes=[[], []], batched=True)
    with pytest.raises(ValueError, match="episode.classes"):
        tiny_cls().loss(nameless)


def test_an_episode_without_class_names_and_a_class_without_support_items():
    """A review: FineTune and the logistic probe indexed ``episode.classes[t]`` and stopped with a bare IndexError on
    an episode built without names (the metric learners take the largest label, `episode_n_way`); and the probe
    fitted a class that had no support item, answering p about 1e-12 for it where every other learner refuses."""
    from dataclasses import replace

    ep = replace(classification_episode(n_way=3, n_shot=2, n_query=2, tasks=1, size=16), classes=[])
    for learner in (tiny_cls(), LogisticRegressionProbe(backbone_kwargs={"width": 8})):
        with torch.no_grad():
            p = learner.predict(ep)
        assert p.shape == (1, 6, 3) and torch.allclose(p.sum(-1), torch.ones(1, 6), atol=1e-5)
    missing = classification_episode(n_way=3, n_shot=2, n_query=2, tasks=1, size=16)
    missing = replace(missing, support_labels=missing.support_labels.clamp(max=1))  # class 2 has no support item
    with pytest.raises(ValueError, match="every one of the 3 classes needs at least one support item"):
        LogisticRegressionProbe(backbone_kwargs={"width": 8}).predict(missing)
    # without names, a class that only the query shows counts too (the support's largest label alone left its
    # column out: p of shape (1, 6, 2), a review, 2026-12-08)
    bare = replace(missing, classes=[])
    for learner in (tiny_cls(), LogisticRegressionProbe(backbone_kwargs={"width": 8})):
        with pytest.raises(ValueError, match=r"no item of classes \[2\]|every one of the 3 classes"), torch.no_grad():
            learner.predict(bare)


# --------------------------------------------------------------------------- exact heads and settings
def test_the_initial_heads_are_the_documented_class_mean_classifiers():
    """Before any fine-tuning step: Baseline++'s rows are the normalised means of the normalised embeddings, and
    Baseline's linear head is the nearest-class-mean rule (a bias of -|mu|^2 / 2 makes w . f + b = -|f - mu|^2 / 2
    up to a term shared by the classes)."""
    f = torch.tensor([[3.0, 0.0], [1.0, 1.0], [0.0, 2.0], [0.0, 4.0]])
    labels = torch.tensor([0, 0, 1, 1])
    cosine = tiny_cls().class_head(f, labels, 2)["weight"]
    unit = F.normalize(f, dim=-1)
    torch.testing.assert_close(cosine, F.normalize(torch.stack([unit[:2].mean(0), unit[2:].mean(0)]), dim=-1))
    linear = tiny_cls(cosine=False).class_head(f, labels, 2)
    means = torch.stack([f[:2].mean(0), f[2:].mean(0)])
    q = torch.tensor([[2.0, 1.0], [0.5, 2.5]])
    nearest = -0.5 * torch.cdist(q, means).pow(2)
    logits = q @ linear["weight"].T + linear["bias"]
    torch.testing.assert_close(logits - logits[:, :1], nearest - nearest[:, :1])


def test_a_checkpoint_that_fills_every_row_of_the_head_loads():
    m = tiny_cls(max_classes=3)
    m.register_classes(["a", "b", "c"])
    fresh = tiny_cls(max_classes=3)
    fresh.load_state_dict(m.state_dict())
    assert fresh.class_names == ["a", "b", "c"]


@pytest.mark.parametrize("bad", [{"finetune_lr": 0.0}, {"scale": 0.0}])
def test_a_learning_rate_or_scale_of_zero_is_refused(bad):
    with pytest.raises(ValueError, match="finetune_lr > 0|scale must be > 0"):
        FineTune(backbone_kwargs=TINY, **bad)


def test_fine_tuning_the_body_predicts_the_queries_with_the_tuned_body(monkeypatch):
    """With ``finetune_body`` the queries go through the fine-tuned body, not the frozen one: a fine-tuning that
    zeroes the body's weights gives every query the same answer (a constant feature map), where the frozen body's
    features differ from query to query."""
    import imaging_meta.learners.transfer.finetune as finetune

    def zero_body(learner, loss, params, steps, lr, first_order=True):
        return {k: torch.zeros_like(v) if k.startswith("body.") else v for k, v in params.items()}

    monkeypatch.setattr(finetune, "adapt", zero_body)
    ep = classification_episode(n_way=3, n_shot=2, n_query=2, tasks=1, size=16)
    with torch.no_grad():
        p = tiny_cls(finetune_body=True).predict(ep)[0]
        frozen = tiny_cls(finetune_body=False).predict(ep)[0]
    torch.testing.assert_close(p, p[:1].expand_as(p))
    assert not torch.allclose(frozen, frozen[:1].expand_as(frozen))


def test_the_logistic_regressions_bias_is_not_penalised():
    """Only the weights carry the L2 penalty (sklearn's objective): at the optimum the bias's gradient, the sum of
    p - onehot(y) over the items, is 0 for each class, even on unbalanced data with a strong penalty."""
    g = torch.Generator().manual_seed(0)
    y = torch.tensor([0] * 8 + [1] * 2 + [2] * 4)
    x = torch.randn(14, 3, generator=g) + F.one_hot(y, 3).float()
    w, b = fit_logistic_regression(x, y, 3, l2=5.0, max_iter=200)
    p = (x.double() @ w.T + b).softmax(-1)
    torch.testing.assert_close((p - F.one_hot(y, 3).double()).sum(0), torch.zeros(3, dtype=torch.float64), atol=1e-6, rtol=0)
