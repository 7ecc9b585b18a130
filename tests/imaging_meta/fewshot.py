"""Synthetic few-shot episodes for learner tests: learnable, seeded, tiny, no files; and the small learners and
meta-gradient checks those tests share.

Classification: a fixed pool of ``n_classes`` random "lesion patterns"; an item is its class pattern,
randomly shifted by a pixel or two, scaled in contrast and with noise, so a learner must generalise over
nuisance variation to new classes. Segmentation: a bright ellipse (the "organ") on a textured background;
the mask is the ellipse.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from imaging_meta.episode import Episode, collate_episodes


def lesion_patterns(n_classes: int, channels: int, size: int, seed: int) -> torch.Tensor:
    """``n_classes`` smooth random class patterns, (n_classes, channels, size, size), seeded by ``seed``."""
    g = torch.Generator().manual_seed(10_000 + seed)
    coarse = torch.randn(n_classes, channels, 4, 4, generator=g)
    return torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)


def _items(patterns: torch.Tensor, cls: torch.Tensor, g: torch.Generator, noise: float) -> torch.Tensor:
    x = patterns[cls].clone()
    for i in range(len(x)):
        dy, dx = (int(v) for v in torch.randint(-1, 2, (2,), generator=g))
        x[i] = torch.roll(x[i], shifts=(dy, dx), dims=(-2, -1))
    contrast = 0.7 + 0.6 * torch.rand(len(x), 1, 1, 1, generator=g)
    return x * contrast + noise * torch.randn(x.shape, generator=g)


def classification_episode(
    n_way: int = 5,
    n_shot: int = 1,
    n_query: int = 2,
    tasks: int = 2,
    size: int = 16,
    channels: int = 1,
    seed: int = 0,
    noise: float = 1.5,
    n_classes: int = 20,
    class_offset: int = 0,
) -> Episode:
    """A batched classification `Episode`: (T, N*K, C, S, S) support, (T, N*Q, C, S, S) query.

    Classes of task ``t`` are drawn from patterns ``class_offset .. class_offset + n_classes - 1`` (use two
    disjoint ranges for meta-train and meta-test classes).
    """
    patterns = lesion_patterns(class_offset + n_classes, channels, size, 0)
    g = torch.Generator().manual_seed(seed)
    eps = []
    for t in range(tasks):
        chosen = class_offset + torch.randperm(n_classes, generator=g)[:n_way]
        ys = torch.arange(n_way).repeat_interleave(n_shot)
        yq = torch.arange(n_way).repeat_interleave(n_query)
        eps.append(
            Episode(
                support_images=_items(patterns, chosen[ys], g, noise),
                support_labels=ys,
                query_images=_items(patterns, chosen[yq], g, noise),
                query_labels=yq,
                classes=[f"class{int(c)}" for c in chosen],
                site="synthetic",
                support_ids=[f"s{t}-{i}" for i in range(len(ys))],
                query_ids=[f"q{t}-{i}" for i in range(len(yq))],
                meta={"seed": seed, "task": t},
            )
        )
    return collate_episodes(eps)


def segmentation_episode(n_shot: int = 1, n_query: int = 2, tasks: int = 2, size: int = 32, seed: int = 0) -> Episode:
    """A batched segmentation `Episode`: (T, K, 1, S, S) images and (T, K, S, S) binary masks."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")

    def item():
        cy, cx = (0.5 * torch.rand(2, generator=g) - 0.25).tolist()
        ry, rx = (0.25 + 0.2 * torch.rand(2, generator=g)).tolist()
        mask = (((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2) <= 1
        img = 0.3 * torch.randn(size, size, generator=g) + mask.float() * (0.8 + 0.4 * torch.rand(1, generator=g))
        return img.unsqueeze(0), mask.float()

    eps = []
    for t in range(tasks):
        s = [item() for _ in range(n_shot)]
        q = [item() for _ in range(n_query)]
        eps.append(
            Episode(
                support_images=torch.stack([i for i, _ in s]),
                support_labels=torch.stack([m for _, m in s]),
                query_images=torch.stack([i for i, _ in q]),
                query_labels=torch.stack([m for _, m in q]),
                classes=["ellipse"],
                site="synthetic",
                support_ids=[f"s{t}-{i}" for i in range(n_shot)],
                query_ids=[f"q{t}-{i}" for i in range(n_query)],
                meta={"seed": seed},
            )
        )
    return collate_episodes(eps)


def accuracy(learner, episode: Episode) -> float:
    """Query accuracy of ``learner.predict`` on a batched classification episode."""
    with torch.no_grad():
        probs = learner.predict(episode)
    return float((probs.argmax(-1) == episode.query_labels).float().mean())


def dice(learner, episode: Episode) -> float:
    """Mean query Dice of ``learner.predict`` (threshold 0.5) on a batched segmentation episode."""
    with torch.no_grad():
        pred = learner.predict(episode) > 0.5
    truth = episode.query_labels > 0.5
    inter = (pred & truth).flatten(2).sum(-1).float()
    return float((2 * inter / (pred.flatten(2).sum(-1) + truth.flatten(2).sum(-1)).clamp(min=1)).mean())


def short_fit(learner, make_episode, steps: int = 30, lr: float = 1e-3, seed: int = 0) -> None:
    """``steps`` Adam steps on ``learner.loss`` over fresh episodes ``make_episode(seed=...)``."""
    torch.manual_seed(seed)
    opt = torch.optim.Adam([p for p in learner.parameters() if p.requires_grad], lr=lr)
    learner.train()
    for s in range(steps):
        opt.zero_grad()
        loss = learner.loss(make_episode(seed=1000 + s))
        assert torch.isfinite(loss), f"non-finite loss at step {s}"
        loss.backward()
        opt.step()
    learner.eval()


# tiny settings and a BatchNorm body shared by the MAML-family and Reptile tests
TINY = {"width": 4, "depth": 2}
TINY_UNET = {"out_channels": 4, "features": [4, 4, 8, 8, 16, 4]}


def tiny_maml(cls=None, **kw):
    """A seeded 3-way MAML-family learner (``cls``: MAML, ANIL, MetaSGD...) on a tiny Conv-4, 2 inner steps."""
    from imaging_meta.learners.gradient.maml import MAML

    torch.manual_seed(0)
    args = {"n_way": 3, "backbone_kwargs": TINY, "inner_steps": 2, "inner_lr": 0.3}
    return (cls or MAML)(**{**args, **kw})


class TrackingBody(nn.Module):
    """A body whose BatchNorm keeps running statistics, as a user's backbone might: (N, 1, H, W) -> (N, 4)."""

    out_features = 4

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())

    def forward(self, x):
        return self.net(x)


def loss_and_grads(learner, ep) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The learner's loss on ``ep`` and the gradient of every parameter (zeros where none reaches it)."""
    learner.zero_grad()
    loss = learner.loss(ep)
    loss.backward()
    return loss.detach(), {n: torch.zeros_like(p) if p.grad is None else p.grad.clone() for n, p in learner.named_parameters()}


def central_difference(loss, p: torch.Tensor, i: tuple, eps: float = 1e-6) -> float:
    """``(loss() at p[i] + eps - loss() at p[i] - eps) / (2 eps)``, with ``p[i]`` restored afterwards."""
    with torch.no_grad():
        p[i] += eps
        plus = loss()
        p[i] -= 2 * eps
        minus = loss()
        p[i] += eps
    return (plus - minus) / (2 * eps)


def assert_gradients_match_finite_differences(learner, ep, grads: dict[str, torch.Tensor], eps: float = 1e-6) -> None:
    """Central finite differences of ``learner.loss(ep)`` on two seeded coordinates of every parameter equal
    ``grads`` (float64 learners), and at least 8 of them are not zero, so the check is not vacuous."""
    g = torch.Generator().manual_seed(0)
    checked = 0
    for name, p in learner.named_parameters():
        for _ in range(2):
            i = tuple(int(torch.randint(s, (1,), generator=g)) for s in p.shape)
            fd = central_difference(lambda: learner.loss(ep).item(), p, i, eps)
            assert grads[name][i].item() == pytest.approx(fd, rel=1e-6, abs=1e-9), (name, i)
            checked += abs(fd) > 1e-6
    assert checked >= 8  # most coordinates have a real gradient
