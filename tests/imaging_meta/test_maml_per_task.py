"""MAML's backward per task (issue 17): the loss takes each task's meta-gradient as soon as the task's query loss
exists, so only one task's graph is alive at a time; the meta-gradients, the Lightning training loop (clipping,
accumulation, schedulers, logging, checkpoints) and the results equal those of one backward over the meta-batch.
And `inner_loop.FastKernels` give PyTorch's values and first and second derivatives."""

from __future__ import annotations

import contextlib
import weakref
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import Trainer, seed_everything

from datamodules.classification import ClassificationDataModule
from datamodules.sources.medmnist import MedMNIST
from imaging_meta.learners import inner_loop
from imaging_meta.learners.gradient.anil import ANIL
from imaging_meta.learners.gradient.maml import MAML
from imaging_meta.learners.gradient.meta_sgd import MetaSGD
from imaging_meta.learners.inner_loop import FastKernels, fast_kernels, per_task_backward
from imaging_meta.module import EpisodicModule
from tests.helpers import write_medmnist
from tests.imaging_meta.fewshot import TINY_UNET, classification_episode, segmentation_episode, tiny_maml

VARIANTS = [(MAML, {}), (MAML, {"first_order": True}), (ANIL, {}), (MetaSGD, {}), (MAML, {"checkpoint_inner": True}),
            (MAML, {"backbone_kwargs": {"width": 4, "transductive": True}})]
IDS = ["maml", "fomaml", "anil", "metasgd", "checkpoint", "transductive"]


def episode64(tasks=3, seed=0):
    ep = classification_episode(n_way=3, n_shot=2, n_query=2, tasks=tasks, size=8, seed=seed)
    return replace(ep, support_images=ep.support_images.double(), query_images=ep.query_images.double())


def twins(cls, kw):
    """The same learner (same weights), with a backward per task and with one backward."""
    per_task = tiny_maml(cls, **kw).double()
    once = tiny_maml(cls, **kw, meta_backward="once").double()
    once.load_state_dict(per_task.state_dict())
    return per_task, once


def loss_and_grads(learner, ep):
    learner.zero_grad()
    loss = learner.loss(ep)
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in learner.named_parameters()}


# ------------------------------------------------------------------------------------- same gradients
@pytest.mark.parametrize(("cls", "kw"), VARIANTS, ids=IDS)
def test_a_backward_per_task_gives_the_loss_and_meta_gradients_of_one_backward(cls, kw):
    per_task, once = twins(cls, kw)
    assert per_task.meta_backward == "per_task" and once.meta_backward == "once"
    ep = episode64()
    (la, ga), (lb, gb) = loss_and_grads(per_task, ep), loss_and_grads(once, ep)
    torch.testing.assert_close(la, lb, rtol=1e-12, atol=0)
    assert ga.keys() == gb.keys()
    for n in ga:
        assert (ga[n] is None) == (gb[n] is None), n
        if ga[n] is not None:
            torch.testing.assert_close(ga[n], gb[n], rtol=1e-9, atol=1e-14, msg=n)
    assert ga["net.head.weight"].abs().max() > 1e-4


def test_segmentation_with_the_unet():
    def build(mb):
        torch.manual_seed(0)
        return MAML(task="segmentation", backbone="unet", backbone_kwargs=TINY_UNET, inner_steps=2, inner_lr=0.1,
                    meta_backward=mb).double()

    ep = segmentation_episode(n_shot=1, n_query=1, tasks=2, size=32)
    ep = replace(ep, **{k: getattr(ep, k).double() for k in ep.TENSOR_FIELDS})
    (la, ga), (lb, gb) = loss_and_grads(build("per_task"), ep), loss_and_grads(build("once"), ep)
    torch.testing.assert_close(la, lb, rtol=1e-12, atol=0)
    for n in ga:
        torch.testing.assert_close(ga[n], gb[n], rtol=1e-9, atol=1e-14, msg=n)


def test_the_loss_scales_the_gradients_like_any_loss_and_gradients_accumulate():
    per_task, once = twins(MAML, {})
    ep = episode64()
    per_task.zero_grad()
    (3.0 * per_task.loss(ep) + per_task.loss(episode64(seed=1))).backward()
    once.zero_grad()
    (3.0 * once.loss(ep) + once.loss(episode64(seed=1))).backward()
    for (n, a), b in zip(per_task.named_parameters(), once.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-9, atol=1e-14, msg=n)


def test_without_gradients_the_loss_is_a_plain_forward():
    per_task, once = twins(MAML, {})
    ep = episode64()
    with torch.no_grad():
        a, b = per_task.loss(ep), once.loss(ep)
    assert not a.requires_grad
    torch.testing.assert_close(a, b, rtol=1e-12, atol=0)
    assert all(p.grad is None for p in per_task.parameters())


def test_vmap_keeps_one_backward_and_options_are_checked():
    learner = tiny_maml(task_batching="vmap").double()
    assert learner.meta_backward == "per_task" and not learner._backward_per_task()
    with pytest.raises(ValueError, match="meta_backward must be one of \\('per_task', 'once'\\), got 'each'"):
        MAML(meta_backward="each")
    assert MAML().meta_backward == "per_task"
    assert tiny_maml(meta_backward="once").config["init_args"]["meta_backward"] == "once"


def test_per_task_backward_checks_the_number_of_losses_and_skips_frozen_parameters():
    w = torch.ones(2, requires_grad=True)
    frozen = torch.ones(2)
    with pytest.raises(ValueError, match="expected 3 losses, got 2"):
        per_task_backward((w.sum() * k for k in (1.0, 2.0)), [w, frozen], 3)
    loss = per_task_backward(((w * k).sum() for k in (1.0, 2.0)), [w, frozen], 2)
    assert loss.item() == pytest.approx(3.0)
    loss.backward()
    torch.testing.assert_close(w.grad, torch.full((2,), 1.5))
    assert frozen.grad is None


# ------------------------------------------------------------------------------------------- memory
def peak_saved_bytes(learner, ep) -> int:
    """The most bytes that autograd graphs held at once (saved tensors, by storage) during ``loss`` + ``backward``."""
    live: dict[int, list] = {}  # storage address -> [bytes, tensors saved]
    state = {"now": 0, "peak": 0}

    def release(key):
        entry = live.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            state["now"] -= entry[0]
            del live[key]

    def pack(t):
        key = t.untyped_storage().data_ptr()
        if key in live:
            live[key][1] += 1
        else:
            live[key] = [t.untyped_storage().nbytes(), 1]
            state["now"] += live[key][0]
            state["peak"] = max(state["peak"], state["now"])
        holder = t.detach()  # what the graph keeps: freed with the graph's buffers
        weakref.finalize(holder, release, key)
        return holder

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        learner.loss(ep).backward()
    return state["peak"]


def test_a_backward_per_task_holds_one_tasks_graph_at_a_time():
    per_task, once = twins(MAML, {})
    tasks = 4
    ep = episode64(tasks=tasks)
    one_task = peak_saved_bytes(once, episode64(tasks=1))
    assert peak_saved_bytes(once, ep) > 0.9 * tasks * one_task  # every task's graph alive at the peak
    assert peak_saved_bytes(per_task, ep) < 1.5 * one_task


# ------------------------------------------------------------------------------------------ Lightning
def _fit(paths, tmp_path, meta_backward):
    seed_everything(3)
    data = ClassificationDataModule(
        source=MedMNIST(paths=paths, image_size=[16, 16]), cache_dir=str(tmp_path / "cache"), n_way=3, n_shot=1, n_query=2,
        val_classes_count=3, test_classes_count=3, episodes_per_epoch=8, val_episodes=2, test_episodes=2, batch_size=2,
        augment=True, num_workers=0, seed=5,
    )
    learner = MAML(n_way=3, backbone_kwargs={"width": 4}, inner_steps=1, inner_lr=0.1, meta_backward=meta_backward)
    module = EpisodicModule(
        learner, optimizer=lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
        lr_scheduler=lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=1, gamma=0.5), baselines=False,
    )
    trainer = Trainer(
        accelerator="cpu", devices=1, max_steps=6, precision="64-true", logger=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, inference_mode=False, default_root_dir=str(tmp_path),
        gradient_clip_val=0.05, accumulate_grad_batches=2, limit_val_batches=1,
    )
    initial = {k: v.clone() for k, v in learner.state_dict().items()}
    trainer.fit(module, datamodule=data)
    return module, trainer, initial


def test_lightning_training_with_clipping_accumulation_and_a_scheduler_is_unchanged(tmp_path):
    """Automatic optimisation is kept: the same weights, logged losses and learning rates with either backward,
    with gradient clipping that bites, accumulation over two batches and a scheduler. (Exact mid-epoch resume of
    MAML, whose default is now a backward per task, is `test_resume.py`'s.)"""
    paths = write_medmnist(tmp_path, n_files=1, classes_per_file=12, per_class=6)
    per_task, t1, initial = _fit(paths, tmp_path / "per_task", "per_task")
    once, t2, _ = _fit(paths, tmp_path / "once", "once")
    assert t1.global_step == t2.global_step == 6
    assert t1.optimizers[0].param_groups[0]["lr"] == t2.optimizers[0].param_groups[0]["lr"] < 0.1  # it stepped
    for key in ("train/loss_epoch", "val/score"):
        torch.testing.assert_close(t1.callback_metrics[key], t2.callback_metrics[key], rtol=1e-10, atol=0, msg=key)
    for (k, a), b in zip(per_task.learner.state_dict().items(), once.learner.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12, msg=k)
    moved = max(float((a - initial[k].to(a.dtype)).abs().max()) for k, a in per_task.learner.state_dict().items())
    assert moved > 1e-3  # the weights did train


# ---------------------------------------------------------------------------------------- fast kernels
def _derivatives(fn, inputs, probe, fast: bool):
    """``fn``'s value, its gradients with respect to ``inputs`` and the gradients of ``probe(gradients)`` (second
    order), with or without `FastKernels`."""
    with FastKernels() if fast else contextlib.nullcontext():
        y = fn(*inputs)
    r = torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view(y.shape).requires_grad_()
    firsts = torch.autograd.grad((y.tanh() * r).sum(), inputs, create_graph=True, allow_unused=True)
    outer = probe([g for g in firsts if g is not None])
    seconds = torch.autograd.grad(outer, [*inputs, r], allow_unused=True) if outer.requires_grad else ()
    return [y, *firsts, *seconds]


def _assert_same(a, b, exact=False):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert (x is None) == (y is None)
        if x is not None:
            torch.testing.assert_close(y, x, rtol=0 if exact else 1e-9, atol=0 if exact else 1e-12)


@pytest.mark.parametrize("shape", [(5, 4, 40, 40), (6, 3, 1100), (2, 2, 4, 16, 16)], ids=["2d", "1d", "3d"])
def test_batch_norm_kernel_gives_pytorchs_first_and_second_derivatives(shape, monkeypatch):
    monkeypatch.setattr(inner_loop, "_MIN_FAST_NORM", 0)
    g = torch.Generator().manual_seed(0)
    x = (2 * torch.randn(*shape, generator=g, dtype=torch.float64) + 1).requires_grad_()
    w, b = (torch.randn(shape[1], generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))

    def fn(x, w, b):
        return F.batch_norm(x, None, None, w, b, training=True)

    for pick in ([1.0, 0.3, 1.0], [1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0]):
        def probe(gs, pick=pick):
            return sum((gr * gr.detach().sin()).sum() * c for gr, c in zip(gs, pick, strict=True) if c)

        _assert_same(_derivatives(fn, [x, w, b], probe, False), _derivatives(fn, [x, w, b], probe, True))


@pytest.mark.parametrize(("channels", "stride", "padding", "bias"), [(1, 1, 1, True), (3, 2, 0, False), (2, 1, 2, True)])
def test_image_convolution_kernel_gives_pytorchs_first_and_second_derivatives(channels, stride, padding, bias):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, channels, 11, 12, generator=g, dtype=torch.float64)  # the images: no gradient
    w = torch.randn(5, channels, 3, 3, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(5, generator=g, dtype=torch.float64, requires_grad=True) if bias else None
    inputs = [w, b] if bias else [w]

    def fn(w, b=None):
        return F.conv2d(x, w, b, stride, padding)

    def probe(gs):
        return sum((gr.sin() * gr).sum() for gr in gs)

    _assert_same(_derivatives(fn, inputs, probe, False), _derivatives(fn, inputs, probe, True))


def test_max_pool_kernel_is_pytorchs_to_the_bit_with_ties(monkeypatch):
    monkeypatch.setattr(inner_loop, "_MIN_FAST_POOL", 0)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 2, 8, 10, generator=g, dtype=torch.float64).relu()  # ties at zero
    x[:, :, :4, :4] = 1.0  # ties at a positive value: the first maximum in row-major order takes the gradient
    x.requires_grad_()

    def fn(x):
        return F.max_pool2d(x, 2, ceil_mode=True)

    def probe(gs):
        return sum((gr * gr.detach().cos()).sum() for gr in gs)

    _assert_same(_derivatives(fn, [x], probe, False), _derivatives(fn, [x], probe, True), exact=True)
    with FastKernels():  # odd sizes and other windows: PyTorch's
        assert F.max_pool2d(x[..., :7, :], 2, ceil_mode=True).grad_fn.name().startswith("MaxPool2DWithIndices")
        assert F.max_pool2d(x, 3).grad_fn.name().startswith("MaxPool2DWithIndices")
        assert F.max_pool2d(x, 2).grad_fn.name().startswith("_MaxPool2x2")


def test_the_kernels_apply_where_they_fit_and_in_the_loss_only(monkeypatch):
    used = []
    for name in ("_BatchNormTraining", "_InputConv", "_MaxPool2x2"):
        fn = getattr(inner_loop, name)
        monkeypatch.setattr(fn, "apply", (lambda f, n: lambda *a: used.append(n) or f(*a))(fn.apply, name))
    x = torch.randn(4, 3, 40, 40)
    w, b = torch.ones(3, requires_grad=True), torch.zeros(3, requires_grad=True)
    with FastKernels():
        F.batch_norm(x, None, None, w, b, training=True)
        F.batch_norm(x[:, :, :4, :4], None, None, w, b, training=True)  # small: PyTorch's kernel
        F.batch_norm(x, torch.zeros(3), torch.ones(3), w, b, training=True)  # running statistics: PyTorch's
        F.conv2d(x, torch.ones(2, 3, 3, 3, requires_grad=True))
        F.conv2d(x.requires_grad_(), torch.ones(2, 3, 3, 3, requires_grad=True))  # not the images: PyTorch's
        F.conv2d(torch.randn(1, 8, 5, 5), torch.ones(2, 8, 3, 3, requires_grad=True))  # 72 rows unfolded: PyTorch's
    assert used == ["_BatchNormTraining", "_InputConv"]
    monkeypatch.setattr(inner_loop, "_MIN_FAST_POOL", 0)
    ep = classification_episode(n_way=3, n_shot=4, n_query=2, tasks=2, size=64, seed=0)
    for first_order in (False, True):
        used.clear()
        learner = tiny_maml(backbone_kwargs={"width": 4}, first_order=first_order)
        learner.loss(ep).backward()
        assert {"_BatchNormTraining", "_InputConv", "_MaxPool2x2"} <= set(used)
    used.clear()
    learner.predict(ep)
    tiny_maml(backbone_kwargs={"width": 4}, task_batching="vmap").loss(ep).backward()
    assert used == []
    with fast_kernels():  # outside `MAML.loss`: the steps of `adapt` use them too
        inner_loop.adapt(learner.net, lambda p: inner_loop.functional_forward(learner.net, p, {}, ep.support_images[0]).sum(),
                         dict(learner.net.named_parameters()), 1, 0.1)
    assert "_InputConv" in used


@pytest.mark.parametrize(("cls", "kw"), [(MAML, {}), (MAML, {"first_order": True}), (MetaSGD, {}),
                                         (MAML, {"checkpoint_inner": True, "meta_backward": "once"})],
                         ids=["maml", "fomaml", "metasgd", "checkpoint-once"])
def test_kernels_keep_meta_gradients_equal_in_float64(cls, kw, monkeypatch):
    ep = classification_episode(n_way=3, n_shot=2, n_query=2, tasks=2, size=32, seed=0)
    ep = replace(ep, support_images=ep.support_images.double(), query_images=ep.query_images.double())
    learner = tiny_maml(cls, backbone_kwargs={"width": 4}, **kw).double()
    with monkeypatch.context() as m:
        m.setattr(inner_loop, "_FAST", {})  # PyTorch's kernels throughout
        la, ga = loss_and_grads(learner, ep)
        ga = {n: g.clone() for n, g in ga.items()}
    monkeypatch.setattr(inner_loop, "_MIN_FAST_NORM", 0)  # every kernel on every layer it fits
    monkeypatch.setattr(inner_loop, "_MIN_FAST_POOL", 0)
    lb, gb = loss_and_grads(learner, ep)
    torch.testing.assert_close(lb, la, rtol=1e-12, atol=0)
    for n in ga:
        torch.testing.assert_close(gb[n], ga[n], rtol=1e-9, atol=1e-13, msg=n)
