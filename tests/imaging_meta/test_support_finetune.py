"""`SupportFineTune`: a new head (optionally the encoder's last block) fine-tuned on the augmented support,
around a trained classification learner; deterministic, query-independent, never changing the wrapped learner."""

from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from imaging_meta.backbones import build_encoder
from imaging_meta.episode import Episode
from imaging_meta.learners.base import build_learner
from imaging_meta.learners.descriptors.classifier import DescriptorClassifier
from imaging_meta.learners.metric.protonet import PrototypicalNetwork
from imaging_meta.learners.transfer.finetune import FineTune
from imaging_meta.learners.transfer.support_finetune import (
    SupportFineTune,
    augment_views,
    fit_summary,
    last_block,
    with_support_finetuning,
)
from tests.imaging_meta.fewshot import classification_episode

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "model" / "finetune_cls.yaml"
TINY = {"width": 8}


def protonet():
    torch.manual_seed(0)
    return PrototypicalNetwork(backbone_kwargs=TINY)


def episode(tasks=2, n_query=2, seed=0):
    return classification_episode(n_way=3, n_shot=2, n_query=n_query, tasks=tasks, size=16, seed=seed)


def snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def predict(learner, ep):
    with torch.no_grad():
        return learner.predict(ep)


# --------------------------------------------------------------------------- determinism
@pytest.mark.parametrize("body", ["head", "last"])
def test_predict_is_bitwise_deterministic_and_the_seed_matters(body):
    p, ep = protonet(), episode()
    m = SupportFineTune(p, steps=5, lr=0.1, body=body)
    first, second = predict(m, ep), predict(m, ep)
    assert torch.equal(first, second)
    assert torch.equal(
        predict(SupportFineTune(p, steps=5, lr=0.1, body=body), ep), first
    )  # a new wrapper too
    other = predict(SupportFineTune(p, steps=5, lr=0.1, body=body, seed=1), ep)
    assert not torch.equal(other, first)
    # without augmentation nothing is random: the seed changes nothing
    plain = [
        predict(SupportFineTune(p, steps=5, lr=0.1, body=body, augment=False, seed=s), ep) for s in (0, 1)
    ]
    assert torch.equal(plain[0], plain[1])


def test_a_task_gets_the_same_prediction_wherever_it_sits_in_the_batch():
    p, ep = protonet(), episode(tasks=2)
    m = SupportFineTune(p, steps=5, lr=0.1)
    assert m.tasks_independent
    both = predict(m, ep)
    alone = predict(m, ep.task(1).unsqueeze())
    torch.testing.assert_close(alone[0], both[1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("n_shot", [1, 3])
def test_the_answer_does_not_depend_on_the_order_the_support_is_listed_in(n_shot):
    # the views' random transforms follow the support's content order: reordering a support (renaming a file in
    # a support folder) moved probabilities by up to 0.99 when they followed its listed order (a review)
    p = protonet()
    ep = classification_episode(n_way=3, n_shot=n_shot, n_query=2, tasks=1, size=16, seed=1).task(0)
    m = SupportFineTune(p, steps=5, lr=0.5)
    first = predict(m, ep)
    n = ep.support_images.shape[0]
    for perm in (torch.arange(n).flip(0), torch.randperm(n, generator=torch.Generator().manual_seed(3))):
        listed = replace(ep, support_images=ep.support_images[perm], support_labels=ep.support_labels[perm])
        torch.testing.assert_close(predict(m, listed), first, rtol=0, atol=1e-5)  # rounding of batch sums


def test_relabelling_the_classes_permutes_the_answer():
    """The views follow the support's pixels, not its labels: with the labels in the order's hash, swapping two
    classes handed the views to other images and moved probabilities by up to 0.99 (a review)."""
    p = protonet()
    m = SupportFineTune(p, steps=5, lr=0.5)
    swap = torch.tensor([1, 0, 2])
    for seed in range(4):
        ep = classification_episode(n_way=3, n_shot=2, n_query=2, tasks=1, size=16, seed=seed).task(0)
        relabelled = replace(ep, support_labels=swap[ep.support_labels], query_labels=swap[ep.query_labels])
        torch.testing.assert_close(predict(m, relabelled)[..., swap], predict(m, ep), rtol=0, atol=1e-5)


# --------------------------------------------------------------------------- the wrapped learner
@pytest.mark.parametrize("body", ["head", "last", "all"])
def test_the_wrapped_learner_is_never_changed(body):
    p, ep = protonet(), episode()
    before = snapshot(p)
    flags = {n: q.requires_grad for n, q in p.named_parameters()}
    own = predict(p, ep)
    m = SupportFineTune(p, steps=3, lr=0.5, body=body)
    predict(m, ep)
    m.predict(ep)  # with gradients enabled too
    after = snapshot(p)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert flags == {n: q.requires_grad for n, q in p.named_parameters()}
    assert all(q.grad is None for q in p.parameters())
    assert torch.equal(predict(p, ep), own)


def test_loss_is_the_wrapped_learners_loss_and_trains_it():
    p, ep = protonet(), episode()
    m = SupportFineTune(p, steps=3)
    loss = m.loss(ep)
    assert torch.equal(loss, p.loss(ep))
    loss.backward()
    assert all(q.grad is not None for q in p.encoder.parameters())
    assert set(m.state_dict()) == {f"embedding.{k}" for k in p.state_dict()}


# --------------------------------------------------------------------------- queries
@pytest.mark.parametrize("body", ["head", "last"])
def test_a_query_prediction_does_not_depend_on_the_other_queries(body):
    p, ep = protonet(), episode(tasks=1, n_query=3)
    m = SupportFineTune(p, steps=4, lr=0.1, body=body)
    full = predict(m, ep)
    for i in (0, 4):
        one = Episode(
            ep.support_images,
            ep.support_labels,
            ep.query_images[:, i : i + 1],
            ep.query_labels[:, i : i + 1],
            classes=ep.classes,
            batched=True,
        )
        torch.testing.assert_close(predict(m, one)[0, 0], full[0, i], rtol=1e-5, atol=1e-6)
    # other queries in place of the rest
    mixed = ep.query_images.clone()
    mixed[:, 1:] = torch.randn_like(mixed[:, 1:]) * 3
    changed = Episode(
        ep.support_images, ep.support_labels, mixed, ep.query_labels, classes=ep.classes, batched=True
    )
    torch.testing.assert_close(predict(m, changed)[0, 0], full[0, 0], rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- the fit
class Moments(nn.Module):
    """A stand-in encoder: (mean, standard deviation) of each image."""

    def forward(self, x):
        f = x.flatten(1)
        return torch.stack([f.mean(1), f.std(1)], 1)


def weak_prototype_task():
    """Two classes told apart by the mean intensity (0 or 2), whose class means differ more in a nuisance (the
    contrast): the nearest class mean gets 6 of the 8 support items right; a linear head can get all 8."""
    yy, xx = torch.meshgrid(torch.arange(16.0), torch.arange(16.0), indexing="ij")
    pattern = torch.sin(2 * torch.pi * xx / 16) * torch.cos(2 * torch.pi * yy / 16)
    pattern = (pattern - pattern.mean()) / pattern.std()
    means, stds = [0, 0, 0, 0, 2, 2, 2, 2], [4, 4, 4, 0.5, 0.5, 0.5, 0.5, 4]
    x = torch.stack([m + s * pattern for m, s in zip(means, stds, strict=True)])[:, None]
    y = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    return Episode(x, y, x.clone(), y.clone(), classes=["a", "b"])  # the queries are the support images


@pytest.mark.parametrize("head", ["linear", "cosine"])
@pytest.mark.parametrize("augment", [False, True])
def test_finetuning_fits_a_support_that_the_prototype_head_gets_wrong(head, augment):
    p = PrototypicalNetwork()
    p.encoder = Moments()
    ep = weak_prototype_task()
    own = float((predict(p, ep).argmax(-1) == ep.query_labels).float().mean())
    assert own < 1.0
    start = SupportFineTune(p, steps=0, head=head, augment=augment)
    tuned = SupportFineTune(p, steps=100, lr=0.1, head=head, augment=augment)
    acc0 = float((predict(start, ep).argmax(-1) == ep.query_labels).float().mean())
    acc = float((predict(tuned, ep).argmax(-1) == ep.query_labels).float().mean())
    assert acc0 < 1.0 and acc == 1.0
    (record,) = tuned.last_fit
    assert record["support_accuracy"] == (acc0, 1.0)
    assert len(record["losses"]) == 101 and record["losses"][-1] < 0.5 * record["losses"][0]
    assert "support accuracy" in fit_summary(tuned.last_fit)


def test_zero_steps_with_the_linear_head_is_the_nearest_class_mean():
    p, ep = protonet(), episode()
    m = SupportFineTune(p, steps=0, head="linear", augment=False)
    assert torch.equal(predict(m, ep).argmax(-1), predict(p, ep).argmax(-1))
    with torch.inference_mode():  # nothing to fit: no gradient needed
        m.predict(ep)


# --------------------------------------------------------------------------- the body
def test_body_last_fine_tunes_the_last_block_only():
    p, ep = protonet(), episode(tasks=1)
    last = SupportFineTune(p, steps=5, body="last")  # the default lr: 0.1 is too high for a block (loss 3.3 -> 3.5)
    assert last.finetuned_module == "encoder.backbone.layers.3"
    fit = last.fit_task(ep.support_images[0], ep.support_labels[0], 3)
    block = {f"encoder.backbone.layers.3.{n}" for n, _ in p.encoder.backbone.layers[3].named_parameters()}
    assert set(fit.body) == block
    own = dict(p.named_parameters())
    # every one of them moved but the convolution's bias, which the batch-statistics norm after it cancels: its
    # gradient is zero but for rounding (exactly zero when the queries' norm is folded into the convolution)
    assert all(not torch.equal(v, own[k]) for k, v in fit.body.items() if not k.endswith(".0.bias"))
    assert (fit.body["encoder.backbone.layers.3.0.bias"] - own["encoder.backbone.layers.3.0.bias"]).abs().max() < 1e-5
    assert fit.losses[-1] < fit.losses[0]
    head_only = SupportFineTune(p, steps=5, body="head")
    assert head_only.fit_task(ep.support_images[0], ep.support_labels[0], 3).body == {}
    assert not torch.equal(predict(last, ep), predict(head_only, ep))
    assert last.last_fit[0]["finetuned"] == sorted(block) and head_only.last_fit[0]["finetuned"] == []
    every = SupportFineTune(p, steps=1, lr=0.5, body="all")
    assert set(every.fit_task(ep.support_images[0], ep.support_labels[0], 3).body) == {
        f"encoder.{n}" for n, _ in p.encoder.named_parameters()
    }


class OwnParameter(nn.Module):
    def __init__(self):
        super().__init__()
        self.gain = nn.Parameter(torch.ones(1))
        self.conv = nn.Conv2d(1, 2, 3)

    def forward(self, x):
        return self.gain * self.conv(x).mean((2, 3))


@pytest.mark.parametrize(
    ("encoder", "expected"),
    [
        (lambda: build_encoder("conv4", width=4), "backbone.layers.3"),
        (lambda: build_encoder("resnet12", widths=(4, 8)), "backbone.layers.1"),
        (lambda: build_encoder("resnet", depth=18, width=8), "backbone.layer4"),
        (lambda: nn.Sequential(nn.Flatten(), nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2), nn.ReLU()), "3"),
        (OwnParameter, "conv"),
        (lambda: nn.Linear(4, 2), ""),
    ],
)
def test_the_last_block_rule(encoder, expected):
    module = encoder()
    name, block = last_block(module)
    assert name == expected and block is module.get_submodule(name)


# --------------------------------------------------------------------------- grad modes
def test_inference_mode_is_refused_with_the_fix_and_no_grad_works():
    m, ep = SupportFineTune(protonet(), steps=2), episode()
    with torch.inference_mode(), pytest.raises(RuntimeError, match=r"torch\.no_grad\(\)"):
        m.predict(ep)
    probs = predict(m, ep)
    assert probs.shape == (2, 6, 3) and not probs.requires_grad
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, 6))


# --------------------------------------------------------------------------- configs
def test_config_round_trip_rebuilds_the_same_learner():
    p, ep = protonet(), episode()
    m = SupportFineTune(p, steps=3, lr=0.2, body="last", head="linear", copies=2, seed=7, rotation=5.0)
    cfg = m.config
    assert cfg["init_args"]["embedding"] == p.config and cfg["init_args"]["seed"] == 7
    yaml.safe_dump(cfg)  # plain data: a checkpoint keeps it
    fresh = build_learner(cfg)
    fresh.load_state_dict(m.state_dict())
    assert isinstance(fresh.embedding, PrototypicalNetwork) and fresh.config == cfg
    assert torch.equal(predict(fresh, ep), predict(m, ep))


def test_the_model_config_builds():
    learner = yaml.safe_load(CONFIG.read_text())["model"]["learner"]
    m = build_learner(learner)
    assert isinstance(m, SupportFineTune) and isinstance(m.embedding, PrototypicalNetwork)
    assert (m.steps, m.body, m.head, m.copies) == (100, "head", "cosine", 4)
    assert m.encoder_name() == "embedding.encoder"


def test_with_support_finetuning_wraps_once_and_keeps_the_mode():
    p = protonet().eval()
    m = with_support_finetuning(p, 7, body="last", lr=0.05)
    assert isinstance(m, SupportFineTune) and m.embedding is p and not m.training
    assert (m.steps, m.body, m.lr) == (7, "last", 0.05)
    again = with_support_finetuning(m, 3)
    assert again.embedding is p and again.steps == 3 and again.body == "last"  # its settings kept, steps replaced


def test_other_embedding_learners():
    ep = episode(tasks=1)
    torch.manual_seed(0)
    baseline = FineTune(backbone_kwargs=TINY, finetune_steps=1)
    m = SupportFineTune(baseline, steps=2, lr=0.1, body="last")
    assert m.finetuned_module == "body.backbone.layers.3"
    assert predict(m, ep).shape == (1, 6, 3)
    pixels = SupportFineTune(DescriptorClassifier(), steps=2)  # no encoder: its embedding, head only
    assert predict(pixels, ep).shape == (1, 6, 3)


# --------------------------------------------------------------------------- arguments
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"steps": -1}, "steps"),
        ({"steps": 2.5}, "steps"),
        ({"lr": 0.0}, "lr"),
        ({"lr": -1.0}, "lr"),
        ({"body": "middle"}, "body"),
        ({"head": "mlp"}, "head"),
        ({"copies": -1}, "copies"),
        ({"momentum": 1.0}, "momentum"),
        ({"scale": 0.0}, "scale"),
        ({"rotation": -5.0}, "amplitudes"),
        ({"zoom": 1.0}, "amplitudes"),
    ],
)
def test_bad_arguments_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SupportFineTune(protonet(), **kwargs)


def test_bad_embeddings_are_refused():
    from imaging_meta.learners.metric.protonet_seg import PrototypicalSegmenter

    with pytest.raises(ValueError, match="classification Learner"):
        SupportFineTune(
            PrototypicalSegmenter(backbone_kwargs={"out_channels": 4, "features": [4, 4, 8, 8, 16, 4]})
        )
    with pytest.raises(ValueError, match="classification Learner"):
        SupportFineTune(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="body='head'"):
        SupportFineTune(DescriptorClassifier(), body="last")


# --------------------------------------------------------------------------- augmentation
def test_augment_views_are_seeded_and_small():
    x = classification_episode(n_way=2, n_shot=2, tasks=1, size=16).support_images[0]
    views = augment_views(x, 3, torch.Generator().manual_seed(0))
    assert views.shape == (12, *x.shape[1:])
    assert torch.equal(views, augment_views(x, 3, torch.Generator().manual_seed(0)))
    assert not torch.equal(views, augment_views(x, 3, torch.Generator().manual_seed(1)))
    from imaging_meta.learners.transfer.support_finetune import Augmentation

    identity = augment_views(x, 2, torch.Generator(), Augmentation(False, 0.0, 0.0, 0.0, 0.0))
    torch.testing.assert_close(identity, x.repeat(2, 1, 1, 1), rtol=1e-5, atol=1e-5)
    assert augment_views(x, 0, torch.Generator()).shape == (0, *x.shape[1:])
    volumes = augment_views(torch.randn(2, 1, 6, 8, 8), 2, torch.Generator().manual_seed(0))
    assert volumes.shape == (4, 1, 6, 8, 8) and torch.isfinite(volumes).all()


class _OneWayFeatures(PrototypicalNetwork):
    """A ProtoNet whose features all point one way (a large constant part, as ReLU features have), the class
    in a small part: the first pixels of the image."""

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        flat = images.flatten(1)
        return torch.cat([torch.full((len(flat), 32), 10.0), 0.5 * flat[:, :4]], 1)


def _one_way_episode(counts=(3, 3, 3), n_query=2):
    g = torch.Generator().manual_seed(0)
    codes = torch.eye(3)[:, :3]

    def images(k, n):
        out = torch.rand(n, 1, 8, 8, generator=g) * 0.1
        out.view(n, -1)[:, :3] += codes[k]
        return out

    support = torch.cat([images(k, n) for k, n in enumerate(counts)])
    labels = torch.cat([torch.full((n,), k) for k, n in enumerate(counts)])
    query = torch.cat([images(k, n_query) for k in range(3)])
    return Episode(support, labels, query, torch.arange(3).repeat_interleave(n_query))


def test_the_cosine_head_centres_features_that_all_point_one_way():
    """A review: on ProtoNet features (pairwise cosine 0.95 and more) the cosine head's logits spread by about 0.5:
    near-uniform probabilities (top 0.27 in 5 ways), and a query that is a support image answered wrongly."""
    learner, ep = _OneWayFeatures(backbone_kwargs=TINY), _one_way_episode()
    plain = predict(SupportFineTune(learner, steps=20, lr=0.1, centre=False), ep)[0]
    centred = SupportFineTune(learner, steps=20, lr=0.1)
    probs = predict(centred, ep)[0]
    assert float(plain.max(-1).values.mean()) < 0.45  # near uniform in 3 ways
    assert float(probs.max(-1).values.mean()) > 0.8 and bool((probs.argmax(-1) == ep.query_labels).all())
    assert centred.last_fit[0]["support_accuracy"][1] == 1.0


def test_an_uneven_support_keeps_its_smaller_classes():
    """A review: 1 kidney image against 5 of each other class, and after fine-tuning kidney was never predicted;
    the loss now weights each class by the inverse of its share of the support."""
    learner, ep = _OneWayFeatures(backbone_kwargs=TINY), _one_way_episode(counts=(1, 6, 6), n_query=4)
    m = SupportFineTune(learner, steps=50, lr=0.1, augment=False)
    weights = m.class_weights(ep.support_labels, 3)
    assert weights.tolist() == pytest.approx([13 / 3, 13 / 18, 13 / 18])
    assert m.class_weights(torch.tensor([0, 0, 1, 1, 2, 2]), 3).tolist() == [1.0, 1.0, 1.0]  # balanced: unchanged
    probs = predict(m, ep)[0]
    assert bool((probs.argmax(-1)[:4] == 0).all())  # the one-image class is still found
    # the fit's first loss is the class-weighted cross-entropy of the initial head on the support
    with torch.no_grad():
        raw, _ = m.features({}, ep.support_images, ep.support_labels, ep.support_images[:0])
        (feats,) = m.shifted(m.support_centre(raw, ep.support_labels, 3), raw)
        logits = m.logits(feats, m.initial_head(feats, ep.support_labels, 3))
    weighted = torch.nn.functional.cross_entropy(logits, ep.support_labels, weight=weights)
    assert m.last_fit[0]["losses"][0] == pytest.approx(float(weighted), rel=1e-5)
    assert m.last_fit[0]["losses"][0] != pytest.approx(
        float(torch.nn.functional.cross_entropy(logits, ep.support_labels)), rel=1e-3)


def test_a_checkpoint_saved_before_centring_rebuilds_as_it_was_trained_and_classify_keeps_its_settings():
    """A review: a fine-tuning checkpoint from before 2026-12-06 ran centred without a word, and `classify
    --finetune-steps` reset a fine-tuning checkpoint's own settings to the defaults."""
    from imaging_meta.checkpoint_io import modernize

    old = {"class_path": "imaging_meta.learners.transfer.support_finetune.SupportFineTune",
           "init_args": {"embedding": protonet().config, "steps": 5, "head": "cosine"}}
    built = build_learner(modernize(old))
    assert built.centre is False and built.balanced is False
    assert build_learner(modernize({**old, "init_args": {**old["init_args"], "centre": True}})).centre is True
    assert SupportFineTune(protonet()).centre is True  # today's default
    tuned = SupportFineTune(protonet(), steps=5, centre=False, lr=0.2, body="last")
    again = with_support_finetuning(tuned, 7)
    assert (again.steps, again.centre, again.lr, again.body) == (7, False, 0.2, "last")
    assert with_support_finetuning(tuned, 7, lr=0.05).lr == 0.05


@pytest.mark.parametrize("body", ["last", "all"])
def test_a_siamese_network_names_its_encoder_and_fine_tunes_it(body):
    """A review: SiameseNetwork named no encoder, so ``body='last'`` was refused ("names none; use body='head'")
    though it has one; and its ``embed_episode`` took batched episodes only, where the base method takes either."""
    from imaging_meta.learners.metric.siamese import SiameseNetwork

    torch.manual_seed(0)
    siamese = SiameseNetwork(backbone_kwargs=TINY)
    assert siamese.encoder_name() == "encoder"
    ep = episode(tasks=1)
    p = predict(SupportFineTune(siamese, steps=3, lr=0.1, body=body), ep)
    assert p.shape == (1, 6, 3) and torch.allclose(p.sum(-1), torch.ones(1, 6), atol=1e-5)
    one = Episode(ep.support_images[0], ep.support_labels[0], ep.query_images[0], ep.query_labels[0])
    s1, q1 = siamese.embed_episode(one)
    s2, q2 = siamese.embed_episode(ep)
    assert torch.allclose(s1, s2) and torch.allclose(q1, q2)


def test_views_that_copy_the_support_exactly_fit_as_the_support_alone():
    """With every amplitude 0 each view is its image: fitting on 4 copies with their labels is fitting on the
    support (the loss is a mean), so each view must carry its own image's label (view j * S + i is of image i)."""
    ep = _one_way_episode(counts=(1, 2, 3), n_query=2)
    still = dict(flip=False, rotation=0.0, translation=0.0, zoom=0.0, intensity=0.0)
    learner = _OneWayFeatures(backbone_kwargs=TINY)
    copied = predict(SupportFineTune(learner, steps=10, lr=0.5, copies=4, **still), ep)
    alone = predict(SupportFineTune(learner, steps=10, lr=0.5, augment=False), ep)
    torch.testing.assert_close(copied, alone, atol=1e-4, rtol=0)


def test_the_centre_is_the_mean_of_the_class_means_and_the_linear_head_is_not_centred():
    features = torch.tensor([[0.0, 0.0], [0.0, 0.0], [0.0, 0.0], [4.0, 2.0]])
    labels = torch.tensor([0, 0, 0, 1])
    cosine = SupportFineTune(protonet(), steps=1)
    torch.testing.assert_close(cosine.support_centre(features, labels, 2), torch.tensor([2.0, 1.0]))
    assert SupportFineTune(protonet(), steps=1, head="linear").support_centre(features, labels, 2) is None


def test_flips_happen_and_rotations_keep_pixels_square():
    """Flip alone: about half the views are the image flipped left-right. A rotation of a 8 x 16 image turns its
    pixels, in pixel units, by an orthogonal matrix (the normalised coordinates' aspect ratio undone)."""
    from imaging_meta.learners.transfer.support_finetune import Augmentation, _affine

    x = torch.rand(1, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    views = augment_views(x, 16, torch.Generator().manual_seed(0), Augmentation(True, 0.0, 0.0, 0.0, 0.0))
    flipped = [bool(torch.allclose(v, x[0].flip(-1), atol=1e-5)) for v in views]
    kept = [bool(torch.allclose(v, x[0], atol=1e-5)) for v in views]
    assert all(a != b for a, b in zip(flipped, kept, strict=True)) and 3 <= sum(flipped) <= 13
    u = torch.rand(5, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    theta = _affine(u, Augmentation(False, 40.0, 0.0, 0.0, 0.0), (5, 1, 8, 16))[:, :, :2]
    pixels = torch.diag(torch.tensor([16.0, 8.0], dtype=torch.float64))  # (x: width, y: height) half-extents x 2
    m = pixels @ theta @ torch.linalg.inv(pixels)
    torch.testing.assert_close(m @ m.transpose(1, 2), torch.eye(2, dtype=torch.float64).expand(5, 2, 2))
