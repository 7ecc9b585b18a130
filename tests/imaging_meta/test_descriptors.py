"""Descriptor baselines (issue 16): the fixed descriptors, `DescriptorClassifier`, and the leave-one-out choice of
`TaskAdaptiveClassifier` on tasks built so that one space must win."""

from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from imaging_meta.checkpoint_io import load_learner
from imaging_meta.episode import Episode, collate_episodes
from imaging_meta.learners.base import build_learner
from imaging_meta.learners.descriptors.classifier import DescriptorClassifier
from imaging_meta.learners.descriptors.colour import channel_groups, shared_channels, to_channels
from imaging_meta.learners.descriptors.features import (
    CELLS,
    ORIENTATIONS,
    describe,
    gradient_histogram,
    intensity_histogram,
    orientation_histogram,
    pixel_descriptor,
    task_features,
)
from imaging_meta.learners.descriptors.nearest import leave_one_out, leave_one_out_accuracy
from imaging_meta.learners.descriptors.task_adaptive import SPACES, TaskAdaptiveClassifier, loo_summary
from imaging_meta.learners.metric.protonet import PrototypicalNetwork

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "model"
SIZE = 64


# ------------------------------------------------------------------------------------------ tasks
def _item(kind: str, c: int, g: torch.Generator) -> torch.Tensor:
    """One (1, SIZE, SIZE) item in [0, 1] of class ``c`` of a task where one kind of feature separates the classes.

    ``histogram``: i.i.d. pixels (no spatial pattern) from a class-specific distribution, mean 0.5 for all.
    ``pixels``: one half (left, right, top) bright, the rest dark: every class has the same value distribution.
    ``checker``: noise plus a step on the even (class 0) or odd (class 1) pixels of a checkerboard: equal
    value distributions, and the 2 x 2 area averaging of the pixel descriptor cancels the pattern.
    ``orientation``: stripes running one class-specific way (0, 90 or 45 degrees) at a random phase, contrast
    and level: the same values and edge strengths in every class, and no pixel in a fixed place.
    ``gradient``: Gaussian noise, smoothed over about 3 pixels (class 0) or not (class 1), then standardised to
    one mean and spread: the same value distribution, no orientation, but one class is sharper.
    """
    n = SIZE * SIZE
    if kind == "orientation":
        y, x = torch.meshgrid(torch.arange(SIZE).float(), torch.arange(SIZE).float(), indexing="ij")
        angle = torch.tensor([0.0, 0.5, 0.25][c] * torch.pi)
        u = x * torch.cos(angle) + y * torch.sin(angle)
        phase, contrast, level = (torch.rand(3, generator=g) * torch.tensor([6.283, 0.2, 0.2])).tolist()
        v = level + 0.4 + (0.15 + contrast) * torch.sin(2 * torch.pi * u / 8 + phase)
        return (v + 0.01 * torch.randn(SIZE, SIZE, generator=g)).clamp(0, 1).unsqueeze(0)
    if kind == "gradient":
        v = torch.randn(1, 1, SIZE, SIZE, generator=g)
        if c == 0:
            k = torch.exp(-0.5 * (torch.arange(-4, 5).float() / 1.5) ** 2)
            k = (k[:, None] * k[None]) / (k.sum() ** 2)
            v = torch.nn.functional.conv2d(v, k.view(1, 1, 9, 9), padding=4)
        v = (v - v.mean()) / v.std()
        return (0.5 + 0.12 * v).clamp(0, 1)[0]
    if kind == "histogram":
        if c == 0:  # two modes
            v = 0.5 + 0.3 * (2 * torch.randint(0, 2, (n,), generator=g) - 1) + 0.02 * torch.randn(n, generator=g)
        elif c == 1:  # flat
            v = 0.2 + 0.6 * torch.rand(n, generator=g)
        else:  # one narrow mode
            v = 0.5 + 0.05 * torch.randn(n, generator=g)
        return v.clamp(0, 1).view(1, SIZE, SIZE)
    if kind == "pixels":
        bright = 0.6 + 0.3 * torch.rand(SIZE, SIZE, generator=g)
        dark = 0.1 + 0.3 * torch.rand(SIZE, SIZE, generator=g)
        half = torch.zeros(SIZE, SIZE, dtype=torch.bool)
        if c == 0:
            half[:, : SIZE // 2] = True
        elif c == 1:
            half[:, SIZE // 2 :] = True
        else:
            half[: SIZE // 2] = True
        return torch.where(half, bright, dark).unsqueeze(0)
    parity = (torch.arange(SIZE)[:, None] + torch.arange(SIZE)[None]) % 2
    x = 0.5 + 0.1 * torch.randn(SIZE, SIZE, generator=g) + 0.2 * (parity == c).float()
    return x.clamp(0, 1).unsqueeze(0)


def task_episode(kind: str, n_way: int = 3, n_shot: int = 5, n_query: int = 4, tasks: int = 2, seed: int = 0) -> Episode:
    """A batched episode of ``kind`` tasks (see `_item`)."""
    g = torch.Generator().manual_seed(seed)
    eps = []
    for t in range(tasks):
        ys, yq = torch.arange(n_way).repeat_interleave(n_shot), torch.arange(n_way).repeat_interleave(n_query)
        eps.append(Episode(
            support_images=torch.stack([_item(kind, int(c), g) for c in ys]), support_labels=ys,
            query_images=torch.stack([_item(kind, int(c), g) for c in yq]), query_labels=yq,
            classes=[f"{kind}{c}" for c in range(n_way)], site="synthetic",
            support_ids=[f"s{t}-{i}" for i in range(len(ys))], query_ids=[f"q{t}-{i}" for i in range(len(yq))],
        ))
    return collate_episodes(eps)


class Checkerboard(nn.Module):
    """A stand-in for a learned embedding: the correlation with the checkerboard, which separates ``checker`` tasks."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        sign = 1.0 - 2.0 * ((torch.arange(h)[:, None] + torch.arange(w)[None]) % 2).to(x)
        c = (x.mean(1) * sign).mean((-2, -1))
        return 100 * torch.stack([c, -c], 1)


def stub_embedding() -> PrototypicalNetwork:
    """A prototypical network whose encoder is `Checkerboard`: its own `predict` is the nearest prototype there."""
    net = PrototypicalNetwork(backbone="conv4", backbone_kwargs={"width": 4, "depth": 2})
    net.encoder = Checkerboard()
    return net.eval()


def accuracy(probs: torch.Tensor, episode: Episode) -> float:
    return float((probs.argmax(-1) == episode.query_labels).float().mean())


def tiny_protonet(seed: int = 0) -> PrototypicalNetwork:
    torch.manual_seed(seed)
    return PrototypicalNetwork(backbone="conv4", backbone_kwargs={"width": 4, "depth": 2}).eval()


# ------------------------------------------------------------------------------------ descriptors
def test_descriptor_shapes_norms_and_determinism():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(5, 3, 40, 48, generator=g)
    p, h, gr, o = pixel_descriptor(x), intensity_histogram(x), gradient_histogram(x), orientation_histogram(x)
    # every descriptor describes each of the 3 channels
    assert p.shape == (5, 3 * 32 * 32) and h.shape == (5, 3 * 32) and gr.shape == (5, 3 * 32)
    assert o.shape == (5, 3 * ORIENTATIONS * CELLS**2)
    torch.testing.assert_close(p.mean(1), torch.zeros(5), atol=1e-6, rtol=0)
    torch.testing.assert_close(p.norm(dim=1), torch.ones(5))
    torch.testing.assert_close(h.sum(1), torch.ones(5))
    torch.testing.assert_close(gr.sum(1), torch.ones(5))
    torch.testing.assert_close(o.view(5, 3, -1).norm(dim=-1), torch.ones(5, 3))  # each channel unit norm
    for c in range(3):  # a channel's part is that channel's own descriptor
        torch.testing.assert_close(gr.view(5, 3, -1)[:, c] * 3, gradient_histogram(x[:, c : c + 1]))
        torch.testing.assert_close(o.view(5, 3, -1)[:, c], orientation_histogram(x[:, c : c + 1]))
    for name in ("pixels", "histogram", "gradient", "orientation"):
        batch = describe(x, name)
        assert torch.equal(batch, describe(x, name))  # deterministic
        torch.testing.assert_close(batch[2:3], describe(x[2:3], name))  # each item on its own
    assert pixel_descriptor(torch.rand(2, 1, 10, 12, 14), size=8).shape == (2, 8**3)  # volumes too
    flat = pixel_descriptor(torch.full((1, 1, 16, 16), 0.3))
    assert torch.isfinite(flat).all() and float(flat.abs().max()) == 0.0  # a constant image: the zero vector


def test_histograms_count_intensities_and_ignore_positions():
    img = torch.cat([torch.zeros(1, 1, 8, 4), torch.ones(1, 1, 8, 4)], dim=-1)  # half 0, half 1
    h = intensity_histogram(img)
    assert h[0, 0] == 0.5 and h[0, -1] == 0.5 and h[0, 1:-1].sum() == 0
    shuffled = img.flatten()[torch.randperm(64, generator=torch.Generator().manual_seed(1))].view_as(img)
    assert torch.equal(intensity_histogram(shuffled), h)
    assert not torch.allclose(pixel_descriptor(shuffled), pixel_descriptor(img))
    assert gradient_histogram(torch.full((1, 1, 8, 8), 0.7))[0, 0] == 1.0  # constant: no gradient
    assert float(orientation_histogram(torch.full((1, 1, 8, 8), 0.7)).abs().max()) == 0.0  # and no direction


def test_orientation_histogram_reads_which_way_edges_run_whatever_the_intensities():
    y, x = torch.meshgrid(torch.arange(32).float(), torch.arange(32).float(), indexing="ij")
    vertical = ((x % 8) < 4).float().view(1, 1, 32, 32)  # edges run vertically: the gradient is along x
    horizontal = vertical.transpose(-1, -2)
    ov, oh = orientation_histogram(vertical).view(ORIENTATIONS, CELLS**2), orientation_histogram(horizontal).view(
        ORIENTATIONS, CELLS**2)
    assert ov.sum(1).argmax() == 0 and oh.sum(1).argmax() == ORIENTATIONS // 2  # 0 and 90 degrees
    # an offset and a contrast change leave it unchanged (it is normalised), and so do a flip of the polarity
    torch.testing.assert_close(orientation_histogram(0.2 + 0.5 * vertical), orientation_histogram(vertical))
    torch.testing.assert_close(orientation_histogram(1 - vertical), orientation_histogram(vertical))
    # also at a size that is resampled (gy of +-1e-8 around horizontal gradients split them between the first bin
    # and the last when the bins' edges lay at 0 and pi; a review): 0.051 apart before the bins were centred
    for size in (50, 37):
        yy, xx = torch.meshgrid(torch.arange(size).float(), torch.arange(size).float(), indexing="ij")
        stripes = ((xx % 8) < 4).float().view(1, 1, size, size)
        torch.testing.assert_close(orientation_histogram(0.2 + 0.5 * stripes), orientation_histogram(stripes),
                                   atol=1e-5, rtol=0)
        assert float(orientation_histogram(stripes).view(ORIENTATIONS, -1)[1:].abs().max()) < 1e-3
    # where the edges are counts: edges in the left half only fill the left cells
    left = vertical.clone()
    left[..., 16:] = 0.0
    cells = orientation_histogram(left).view(ORIENTATIONS, CELLS, CELLS).sum(0)
    assert float(cells[:, 1].sum()) < 0.2 * float(cells[:, 0].sum())
    # a small image is upsampled bilinearly: a 45-degree edge of an 8 x 8 image stays at 45 degrees (repeating its
    # pixels made a staircase that put 0.92 of it at 0 and 90 degrees; a review)
    yy, xx = torch.meshgrid(torch.arange(8).float(), torch.arange(8).float(), indexing="ij")
    diagonal = orientation_histogram(((xx + yy) / 14).view(1, 1, 8, 8)).view(ORIENTATIONS, -1).pow(2).sum(1)
    assert int(diagonal.argmax()) == ORIENTATIONS // 4 and float(diagonal[ORIENTATIONS // 4] / diagonal.sum()) > 0.5
    # volumes: the in-plane directions of every plane, averaged
    volume = vertical.unsqueeze(2).expand(1, 1, 3, 32, 32)
    torch.testing.assert_close(orientation_histogram(volume), orientation_histogram(vertical))
    with pytest.raises(ValueError, match="2 or 3 spatial axes"):
        orientation_histogram(torch.rand(2, 1, 16))


def test_the_default_spaces_take_patches_one_slice_deep_and_a_one_pixel_size():
    """The gradient histogram refused a (1, H, W) patch (no gradient across one slice), and the orientation
    histogram a pixel size of 1, which the three-space default took (a review): now the single-pixel axis is
    skipped and the orientation keeps at least 2 pixels."""
    thin = torch.rand(3, 1, 1, 12, 12)
    torch.testing.assert_close(gradient_histogram(thin), gradient_histogram(thin[:, :, 0]))
    assert gradient_histogram(torch.rand(2, 1, 1, 1))[:, 0].tolist() == [1.0, 1.0]  # one pixel: no gradient
    ep = task_episode("pixels", n_shot=2, tasks=1)
    deep = replace(ep, support_images=ep.support_images.unsqueeze(3), query_images=ep.query_images.unsqueeze(3))
    fs, fq = task_features(deep.support_images, deep.query_images, ("gradient", "orientation"))
    assert torch.isfinite(fs).all() and torch.isfinite(fq).all()
    with torch.no_grad():
        probs = TaskAdaptiveClassifier(stub_embedding(), pixel_size=1).predict(ep)
    assert torch.isfinite(probs).all()
    assert intensity_histogram(torch.tensor([[[[-0.5, 1.5]]]]))[0, [0, -1]].tolist() == [0.5, 0.5]  # clamped


def test_task_features_use_the_support_only():
    ep = task_episode("pixels", n_query=3, tasks=1)
    fs, fq = task_features(ep.support_images, ep.query_images, ("pixels", "histogram"))
    _, fq1 = task_features(ep.support_images, ep.query_images[:, 1:2], ("pixels", "histogram"))
    torch.testing.assert_close(fq1[:, 0], fq[:, 1])  # a query's vector does not depend on the other queries
    torch.testing.assert_close(fs.norm(dim=-1), torch.ones(fs.shape[:2]))


def test_leave_one_out_matches_a_brute_force_loop():
    g = torch.Generator().manual_seed(3)
    labels = torch.tensor([[0, 0, 0, 1, 1, 2], [2, 1, 0, 2, 1, 0]])  # task 0: class 2 has one item
    x = torch.randn(2, 6, 4, generator=g)
    for distance in ("euclidean", "cosine"):
        correct, usable = leave_one_out(x, labels, 3, distance)
        for t in range(2):
            for i in range(6):
                keep = torch.arange(6) != i
                protos = torch.stack([x[t][keep & (labels[t] == c)].mean(0) if (keep & (labels[t] == c)).any()
                                      else x[t][labels[t] == c].mean(0) for c in range(3)])
                if distance == "cosine":
                    score = torch.nn.functional.cosine_similarity(x[t, i][None], protos)
                else:
                    score = -(x[t, i][None] - protos).pow(2).sum(-1)
                assert bool(usable[t, i]) == bool((keep & (labels[t] == labels[t, i])).any())
                if usable[t, i]:
                    assert bool(correct[t, i]) == (int(score.argmax()) == int(labels[t, i]))
    acc = leave_one_out_accuracy(x, torch.tensor([[0, 1, 2, 3, 4, 5]] * 2), 6)
    assert torch.isnan(acc).all()  # one item per class: nothing to hold out


# ------------------------------------------------------------------------------- DescriptorClassifier
@pytest.mark.parametrize(("features", "rule", "kind"), [
    ("pixels", "prototype", "pixels"), ("histogram", "prototype", "histogram"), ("pixels", "logreg", "pixels"),
    ("pixels+histogram", "prototype", "histogram"), ("histogram", "prototype", "pixels"),
])
def test_descriptor_classifier_separates_what_its_features_see(features, rule, kind):
    learner = DescriptorClassifier(features=features, rule=rule)
    ep = task_episode(kind)
    with torch.no_grad():
        probs = learner.predict(ep)
    assert probs.shape == (2, 12, 3)
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, 12))
    sees = features == "pixels+histogram" or features == kind
    assert accuracy(probs, ep) == 1.0 if sees else accuracy(probs, ep) < 0.7


def test_descriptor_classifier_learns_only_a_temperature_that_never_changes_a_decision():
    learner = DescriptorClassifier(features="pixels")
    assert [n for n, _ in learner.named_parameters()] == ["log_scale"]
    ep = task_episode("pixels", n_shot=2)
    learner.loss(ep).backward()
    assert learner.log_scale.grad is not None and torch.isfinite(learner.log_scale.grad)
    before = learner.predict(ep).argmax(-1)
    with torch.no_grad():
        learner.log_scale.add_(2.0)
    assert torch.equal(learner.predict(ep).argmax(-1), before)


@pytest.mark.parametrize("name", ["pixels_cls", "histogram_cls"])
def test_descriptor_configs_build_and_rebuild(name):
    config = yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())["model"]["learner"]
    learner = build_learner(config)
    assert isinstance(learner, DescriptorClassifier) and learner.task == "classification"
    assert build_learner(learner.config).config == learner.config
    with pytest.raises(ValueError, match="descriptors from"):
        DescriptorClassifier(features="pixels+edges")
    with pytest.raises(ValueError, match="rule must be"):
        DescriptorClassifier(rule="svm")


# -------------------------------------------------------------------------- TaskAdaptiveClassifier
@pytest.mark.parametrize(("kind", "n_way", "winner"), [
    ("histogram", 3, "histogram"), ("pixels", 3, "pixels"), ("checker", 2, "embedding"),
    ("orientation", 3, "orientation"), ("gradient", 2, "gradient"),
])
def test_leave_one_out_picks_the_space_that_separates_the_task(kind, n_way, winner):
    learner = TaskAdaptiveClassifier(stub_embedding(), rule="select")
    ep = task_episode(kind, n_way=n_way)
    records = learner.choose(ep)
    assert [r["space"] for r in records] == [winner, winner], loo_summary(records)
    for r in records:
        assert r["rule"] == "leave-one-out" and r["loo_items"] == n_way * 5
        assert set(r["loo_accuracy"]) == {"embedding", "pixels", "histogram", "gradient", "orientation", "fusion"}
        assert r["loo_accuracy"][winner] == 1.0
        # i.i.d. pixels of another distribution also have other gradients: the earlier space wins the tie
        also = {"histogram": ("gradient",)}.get(kind, ())
        assert all(v < 1.0 for k, v in r["loo_accuracy"].items() if k not in (winner, "fusion", *also))
    with torch.no_grad():
        probs = learner.predict(ep)
        alone = learner.embedding.predict(ep)
    assert learner.last_choice == records
    assert accuracy(probs, ep) == 1.0
    if winner == "embedding":  # the embedding's own prediction, exactly
        torch.testing.assert_close(probs, alone)
    else:  # where the embedding is blind, the choice is what helps
        assert accuracy(alone, ep) < 0.8


def test_the_choice_and_the_predictions_never_read_the_query_labels():
    learner = TaskAdaptiveClassifier(stub_embedding())
    ep = task_episode("histogram")
    with torch.no_grad():
        reference = learner.predict(ep)
        choice = learner.last_choice
        for garbage in (torch.full(ep.query_labels.shape, float("nan")), torch.full_like(ep.query_labels, 10**6),
                        1 - ep.query_labels):
            hidden = replace(ep, query_labels=garbage)
            assert torch.equal(learner.predict(hidden), reference)
            assert learner.last_choice == choice == learner.choose(hidden)


def test_one_shot_falls_back_to_the_learned_embedding_under_the_select_rule():
    learner = TaskAdaptiveClassifier(stub_embedding(), rule="select")
    ep = task_episode("histogram", n_shot=1)
    with torch.no_grad():
        probs = learner.predict(ep)
        torch.testing.assert_close(probs, learner.embedding.predict(ep))
    for r in learner.last_choice:
        assert r["space"] == "embedding" and r["rule"] == "default" and r["loo_items"] == 0
        assert all(v is None for v in r["loo_accuracy"].values())
    assert "by default" in loo_summary(learner.last_choice)
    other = TaskAdaptiveClassifier(stub_embedding(), default="histogram", rule="select")
    assert [r["space"] for r in other.choose(ep)] == ["histogram", "histogram"]


def test_wraps_a_trained_learner_from_its_checkpoint_and_rebuilds_from_its_config():
    trained = tiny_protonet(seed=1)
    ckpt = {"imaging_meta": {"learner_config": trained.config},
            "state_dict": {f"learner.{k}": v for k, v in trained.state_dict().items()}}
    loaded, _ = load_learner("trained.ckpt", ckpt=ckpt)  # the content of an `imaging-meta fit` checkpoint
    learner = TaskAdaptiveClassifier(loaded, rule="select").eval()
    ep = task_episode("checker", n_way=2, n_shot=1)
    with torch.no_grad():
        torch.testing.assert_close(learner.predict(ep), trained.predict(ep))  # K = 1: the trained embedding
    config = learner.config
    assert config["init_args"]["embedding"] == trained.config
    rebuilt = build_learner(config)
    rebuilt.load_state_dict(learner.state_dict())
    ep5 = task_episode("pixels", n_shot=2)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.eval().predict(ep5), learner.predict(ep5))
    assert rebuilt.last_choice == learner.last_choice
    from_dict = TaskAdaptiveClassifier(trained.config, spaces=["pixels", "embedding"], default="embedding")
    assert from_dict.config["init_args"]["spaces"] == ["pixels", "embedding"]
    loss = learner.loss(task_episode("pixels", n_shot=2))  # meta-training trains the embedding
    loss.backward()
    assert all(p.grad is not None for p in learner.embedding.parameters())
    with pytest.raises(ValueError, match="name the default"):
        TaskAdaptiveClassifier(trained, spaces=["pixels"], default="embedding")


def test_the_choice_reaches_the_evaluation_records():
    from imaging_meta.evaluation.scoring import learner_choices, score_batch
    from imaging_meta.tasks import CLASSIFICATION

    learner = TaskAdaptiveClassifier(stub_embedding())
    ep = task_episode("histogram", n_way=3)
    with torch.no_grad():
        probs = learner.predict(ep)
    recs = score_batch(CLASSIFICATION, ep, {"trained": probs}, choices_by_method={"trained": learner_choices(learner)})
    trained = [r for r in recs if r["method"] == "trained"]
    assert trained and all(r["choice_space"] == "weighted" and r["choice_loo_accuracy"] == 1.0 for r in trained)
    assert all("choice_space" not in r for r in recs if r["method"] != "trained")  # baselines chose nothing
    assert learner_choices(stub_embedding()) is None


# ------------------------------------------------------------------ the weighted rule (the default)
@pytest.mark.parametrize(("kind", "n_way", "winner"), [
    ("histogram", 3, "histogram"), ("pixels", 3, "pixels"), ("checker", 2, "embedding"),
    ("orientation", 3, "orientation"), ("gradient", 2, "gradient"),
])
def test_the_weighting_classifies_tasks_that_only_one_space_separates(kind, n_way, winner):
    learner = TaskAdaptiveClassifier(stub_embedding())
    ep = task_episode(kind, n_way=n_way)
    with torch.no_grad():
        probs = learner.predict(ep)
    records = learner.last_choice
    assert accuracy(probs, ep) == 1.0, loo_summary(records)
    for r in records:
        assert r["space"] == "weighted" and r["rule"] == "weighted leave-one-out" and r["loo_items"] == n_way * 5
        assert set(r["weights"]) == set(SPACES) - {"fusion"}
        assert abs(sum(r["weights"].values()) - 1.0) < 1e-3
        assert r["loo_accuracy"][winner] == 1.0
        assert r["loo_accuracy"]["weighted"] == 1.0
    assert "fitted by leave-one-out" in loo_summary(records)
    assert learner.choose(ep) == records


def test_one_shot_weighted_rule_is_the_equal_weight_fusion():
    """With one image per class: the equal-weight fusion, at the softer one-shot temperature (the same answers as
    at the fitted rule's SCALE, less sure of them)."""
    from imaging_meta.learners.descriptors.nearest import prototype_logits
    from imaging_meta.learners.descriptors.weighting import ONE_SHOT_SCALE, SCALE

    learner = TaskAdaptiveClassifier(stub_embedding())
    ep = task_episode("histogram", n_shot=1)
    with torch.no_grad():
        probs = learner.predict(ep)
        fs, fq, dist = learner.task_spaces(ep)["fusion"]
        fusion = prototype_logits(fs, ep.support_labels, fq, 3, dist, ONE_SHOT_SCALE).softmax(-1)
        sharp = prototype_logits(fs, ep.support_labels, fq, 3, dist, SCALE).softmax(-1)
    torch.testing.assert_close(probs, fusion, atol=1e-5, rtol=1e-4)
    assert ONE_SHOT_SCALE < SCALE and torch.equal(probs.argmax(-1), sharp.argmax(-1))
    assert bool((probs.max(-1).values <= sharp.max(-1).values + 1e-6).all())
    for r in learner.last_choice:
        assert r["space"] == "fusion" and r["rule"] == "default" and r["loo_items"] == 0
        assert all(abs(w - 1 / (len(SPACES) - 1)) < 1e-3 for w in r["weights"].values())
    assert "by default" in loo_summary(learner.last_choice)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_fit_weights_turns_down_a_misleading_space(seed):
    from imaging_meta.learners.descriptors.nearest import leave_one_out_accuracy
    from imaging_meta.learners.descriptors.weighting import fit_weights, loo_distances, weighted_logits

    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(3).repeat_interleave(4)[None]  # one task, 3 classes x 4 shots
    other = (torch.arange(12) % 3)[None]  # clusters that cut across the classes
    good = torch.nn.functional.one_hot(labels, 3).float() + 0.5 * torch.randn(1, 12, 3, generator=g)
    bad = 2 * torch.nn.functional.one_hot(other, 3).float() + 0.3 * torch.randn(1, 12, 3, generator=g)
    spaces = [torch.nn.functional.normalize(x - x.mean(1, keepdim=True), dim=-1) for x in (good, bad)]
    loo, usable = zip(*(loo_distances(x, labels, 3) for x in spaces), strict=True)
    beta = fit_weights(loo, labels, usable[0])
    assert beta[0, 0] / beta.sum() > 0.55, beta
    fitted = (weighted_logits(torch.stack(loo, 1), beta).argmax(-1) == labels).float().mean()
    equal = (weighted_logits(torch.stack(loo, 1), torch.full_like(beta, 5.0)).argmax(-1) == labels).float().mean()
    assert fitted >= equal and fitted >= leave_one_out_accuracy(spaces[1], labels, 3)
    strong = fit_weights(loo, labels, usable[0], prior=1e6)  # an overwhelming prior keeps the fusion
    torch.testing.assert_close(strong, torch.full((1, 2), 5.0, dtype=strong.dtype), atol=1e-3, rtol=0)
    with torch.inference_mode():  # fitting works on inference tensors too
        inf = fit_weights([x.clone() for x in loo], labels.clone(), usable[0].clone())
    torch.testing.assert_close(inf, beta)
    with pytest.raises(ValueError, match="prior"):
        fit_weights(loo, labels, usable[0], prior=0.0)


def test_fit_weights_of_a_task_do_not_depend_on_the_other_tasks_of_its_batch():
    """Each task is fitted on its own: one joint L-BFGS shared its line search and stopping tests across the
    batch, so a task's weights moved (by up to 1e-5) with the tasks beside it."""
    from imaging_meta.learners.descriptors.weighting import fit_weights, loo_distances

    g = torch.Generator().manual_seed(5)
    labels = torch.arange(3).repeat_interleave(3).repeat(6, 1)  # six tasks, 3 classes x 3 shots
    spaces = [torch.nn.functional.normalize(torch.randn(6, 9, 4, generator=g), dim=-1) for _ in range(3)]
    loo, usable = zip(*(loo_distances(x, labels, 3) for x in spaces), strict=True)
    together = fit_weights(loo, labels, usable[0])
    assert not torch.allclose(together[0], together[1])  # the tasks differ, so their fits do
    for t in range(6):
        alone = fit_weights([x[t:t + 1] for x in loo], labels[t:t + 1], usable[0][t:t + 1])
        assert torch.equal(alone[0], together[t]), t


# ------------------------------------------------------------------------------------------ colour
#: two colours with the same mean of the channels and the same luma (0.299 R + 0.587 G + 0.114 B): a grey image,
#: by either conversion, cannot tell them apart
HUE_A = torch.tensor([0.5, 0.5, 0.5])
HUE_B = HUE_A + 0.5 * torch.tensor([-0.473, 0.185, 0.288])


def hue_episode(n_shot: int = 3, n_query: int = 4, tasks: int = 2, seed: int = 0) -> Episode:
    """2-way tasks whose classes differ only in hue: per item, one random texture (the same law for both
    classes) tinted with `HUE_A` or `HUE_B`."""
    g = torch.Generator().manual_seed(seed)

    def item(c: int) -> torch.Tensor:
        texture = 0.6 + 0.8 * torch.rand(1, SIZE, SIZE, generator=g)
        return (texture * (HUE_A if c == 0 else HUE_B).view(3, 1, 1)).clamp(0, 1)

    eps = []
    for t in range(tasks):
        ys, yq = torch.arange(2).repeat_interleave(n_shot), torch.arange(2).repeat_interleave(n_query)
        eps.append(Episode(
            support_images=torch.stack([item(int(c)) for c in ys]), support_labels=ys,
            query_images=torch.stack([item(int(c)) for c in yq]), query_labels=yq,
            classes=["a", "b"], site="synthetic",
            support_ids=[f"s{t}-{i}" for i in range(len(ys))], query_ids=[f"q{t}-{i}" for i in range(len(yq))],
        ))
    return collate_episodes(eps)


def as_grey(ep: Episode, weights=(0.299, 0.587, 0.114)) -> Episode:
    w = torch.tensor(weights).view(1, 1, 3, 1, 1)
    return replace(ep, support_images=(ep.support_images * w).sum(2, keepdim=True),
                   query_images=(ep.query_images * w).sum(2, keepdim=True))


def test_grey_stored_as_three_channels_is_described_exactly_as_grey():
    ep = task_episode("pixels")
    rgb = replace(ep, support_images=to_channels(ep.support_images, 3, dim=2),
                  query_images=to_channels(ep.query_images, 3, dim=2))
    assert rgb.support_images.shape[2] == 3
    s, q = shared_channels(rgb.support_images, rgb.query_images)
    assert torch.equal(s, ep.support_images) and torch.equal(q, ep.query_images)
    for space in (("pixels",), ("histogram",), ("pixels", "histogram", "gradient", "orientation")):
        a, b = task_features(rgb.support_images, rgb.query_images, space), task_features(ep.support_images, ep.query_images, space)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    # the support decides: a colour query in a grey task is described in grey as the loader makes it (luma,
    # stretched over its own range), the others exactly as before; one colour support item makes the task colour
    tinted = rgb.query_images.clone()
    tinted[0, 0, 0] *= 0.5
    s, q = shared_channels(rgb.support_images, tinted)
    assert s.shape[2] == 1 and torch.equal(q[:, 1:], ep.query_images[:, 1:]) and torch.equal(q[0, 1:], ep.query_images[0, 1:])
    luma = 0.299 * tinted[0, 0, 0] + 0.587 * tinted[0, 0, 1] + 0.114 * tinted[0, 0, 2]
    torch.testing.assert_close(q[0, 0, 0], (luma - luma.min()) / (luma.max() - luma.min()))
    # a colour picture and the grey copy a user made of it (luma, then read over its own range) are near copies
    picture = torch.rand(1, 1, 3, 16, 16, generator=torch.Generator().manual_seed(3)) * 0.6 + 0.2
    copy = 0.299 * picture[:, :, 0] + 0.587 * picture[:, :, 1] + 0.114 * picture[:, :, 2]
    copy = ((copy - copy.min()) / (copy.max() - copy.min())).unsqueeze(2).expand(1, 1, 3, 16, 16)
    torch.testing.assert_close(shared_channels(copy, picture)[1], copy[:, :, :1], atol=1e-6, rtol=0)
    coloured = rgb.support_images.clone()
    coloured[0, 0, 0] *= 0.5
    assert shared_channels(coloured, rgb.query_images)[0].shape[2] == 3
    with pytest.raises(ValueError, match="cannot give images with 4 channels"):
        to_channels(torch.zeros(2, 4, 8, 8), 1)


def test_colour_descriptors_separate_classes_that_grey_cannot():
    ep = hue_episode()
    for features in ("pixels", "histogram"):
        learner = DescriptorClassifier(features=features)
        assert learner.reads_colour
        with torch.no_grad():
            assert accuracy(learner.predict(ep), ep) == 1.0
            for weights in ((0.299, 0.587, 0.114), (1 / 3, 1 / 3, 1 / 3)):  # luma, or the mean of the channels
                assert accuracy(learner.predict(as_grey(ep, weights)), ep) <= 0.75


def test_task_adaptive_describes_colour_per_channel_with_a_grey_embedding():
    """A grey-trained embedding sees each colour channel as a grey image (three episodes, vectors concatenated);
    grey stored as RGB gives exactly the grey answer."""
    learner = TaskAdaptiveClassifier(tiny_protonet())
    ep = hue_episode()
    views = learner.embedding_episodes(ep)
    assert len(views) == 3 and all(v.support_images.shape[2] == 1 for v in views)
    torch.testing.assert_close(views[1].query_images[:, :, 0], ep.query_images[:, :, 1], rtol=0, atol=0)
    with torch.no_grad():
        es, _, _ = learner.task_spaces(ep)["embedding"]
        one, _ = learner.embedding.embed_episode(views[0])
        assert es.shape[-1] == 3 * one.shape[-1]
        assert accuracy(learner.predict(ep), ep) == 1.0
        grey = task_episode("pixels")
        rgb = replace(grey, support_images=to_channels(grey.support_images, 3, dim=2),
                      query_images=to_channels(grey.query_images, 3, dim=2))
        assert len(learner.embedding_episodes(rgb)) == 1
        assert torch.equal(learner.predict(rgb), learner.predict(grey))
        select = TaskAdaptiveClassifier(tiny_protonet(), rule="select")
        assert torch.equal(select.predict(rgb), select.predict(grey))
        assert accuracy(select.predict(ep), ep) == 1.0


def test_a_grey_task_answers_the_same_beside_colour_tasks_in_one_batch():
    """classify batches one episode per query: a grey query's answer (and its choice) must not change when a colour
    query shares its batch. Grey and colour tasks run apart (`colour.channel_groups`)."""
    grey = task_episode("pixels", n_shot=1, tasks=2)
    grey3 = replace(grey, support_images=to_channels(grey.support_images, 3, dim=2),
                    query_images=to_channels(grey.query_images, 3, dim=2))
    hue = task_episode("pixels", n_shot=1, tasks=1, seed=5)  # the same shapes, tinted: a colour task
    tint = torch.tensor([1.0, 0.6, 0.3]).view(1, 1, 3, 1, 1)
    hue = replace(hue, support_images=to_channels(hue.support_images, 3, dim=2) * tint,
                  query_images=to_channels(hue.query_images, 3, dim=2) * tint)
    mixed = collate_episodes([grey3.task(0), hue.task(0), grey3.task(1)])
    assert [g.tolist() for g in channel_groups(mixed.support_images, mixed.query_images)] == [[0, 2], [1]]
    for learner in (TaskAdaptiveClassifier(tiny_protonet()), TaskAdaptiveClassifier(tiny_protonet(), rule="select"),
                    DescriptorClassifier(features="pixels+histogram")):
        name = type(learner).__name__
        with torch.no_grad():
            together = learner.predict(mixed)
            choices = list(getattr(learner, "last_choice", [None] * 3))
            alone, alone_choices = [], []
            for one in (grey3.task(0), hue.task(0), grey3.task(1)):
                alone.append(learner.predict(one.unsqueeze()))
                alone_choices += list(getattr(learner, "last_choice", [None]))
            assert torch.equal(together, torch.cat(alone)), name
            assert choices == alone_choices, name
            assert torch.equal(together[[0, 2]], learner.predict(grey)), name  # and grey in RGB is grey


def test_the_choice_says_whether_a_task_was_described_in_colour():
    learner = TaskAdaptiveClassifier(tiny_protonet())
    grey, hue = task_episode("pixels"), hue_episode()
    assert [r["colour"] for r in learner.choose(grey)] == [False, False]
    with torch.no_grad():
        learner.predict(hue)
    assert [r["colour"] for r in learner.last_choice] == [True, True]
    assert loo_summary(learner.last_choice).count("(in colour)") == 2
    assert "(in colour)" not in loo_summary(learner.choose(grey))


def test_the_per_channel_embedding_space_holds_unit_vectors():
    """Under the select rule a colour task chosen in the embedding space gets the nearest prototype at the
    descriptor spaces' temperature, which is meant for unit vectors: the per-channel views are task-normalised."""
    learner = TaskAdaptiveClassifier(tiny_protonet(), rule="select")
    with torch.no_grad():
        fs, fq, dist = learner.task_spaces(hue_episode())["embedding"]
    assert dist == "euclidean"
    torch.testing.assert_close(fs.norm(dim=-1), torch.ones(fs.shape[:2]))
    torch.testing.assert_close(fq.norm(dim=-1), torch.ones(fq.shape[:2]))


def test_a_colour_query_does_not_move_the_answers_of_the_grey_queries_beside_it():
    """Whether a task is grey or colour is decided by its support alone: one colour query among grey ones turned
    the whole task to colour and moved the other queries' probabilities by 0.018 (a review, 2026-12-06)."""
    ep = task_episode("pixels", n_shot=3)
    rgb = replace(ep, support_images=to_channels(ep.support_images, 3, dim=2),
                  query_images=to_channels(ep.query_images, 3, dim=2))
    tinted = rgb.query_images.clone()
    tinted[:, 0, 0] *= 0.5  # the first query of each task in colour
    for rule in ("weighted", "select"):
        learner = TaskAdaptiveClassifier(tiny_protonet(), rule=rule)
        with torch.no_grad():
            grey = learner.predict(rgb)
            mixed = learner.predict(replace(rgb, query_images=tinted))
        torch.testing.assert_close(mixed[:, 1:], grey[:, 1:], atol=1e-6, rtol=0)
