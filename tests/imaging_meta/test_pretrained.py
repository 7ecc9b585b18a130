"""Pretrained ResNet encoders (imaging_meta/pretrained.py): torchvision's key layout, loading from a file or a
URL (never the network: an unreachable URL fails fast and clearly), the 1-channel adaptation, frozen BatchNorm,
and ProtoNet-seg / ProtoNet from the new configs."""

import functools
import hashlib
import http.server
import os
import socket
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml

from imaging_meta.backbones import (
    SupportBatchNorm2d,
    available_backbones,
    build_backbone,
    build_encoder,
    uses_support_statistics,
)
from imaging_meta.learners.base import build_learner
from imaging_meta.pretrained import (
    FrozenBatchNorm2d,
    ResNet,
    WeightsUnavailableError,
    cached_download,
    load_weights,
    without_weights,
)
from tests.imaging_meta.fewshot import classification_episode, segmentation_episode

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "model"

# names from torchvision's resnet18 / resnet50 state dicts, written out by hand
TORCHVISION_R18 = ["conv1.weight", "bn1.weight", "bn1.running_mean", "bn1.num_batches_tracked", "layer1.0.conv1.weight",
                   "layer1.1.bn2.bias", "layer2.0.downsample.0.weight", "layer2.0.downsample.1.running_var",
                   "layer3.1.conv2.weight", "layer4.1.bn2.running_var"]
TORCHVISION_R50 = ["layer1.0.conv3.weight", "layer1.0.bn3.running_mean", "layer1.0.downsample.0.weight",
                   "layer3.5.conv2.weight", "layer4.2.bn3.weight"]


def torchvision_like_state(depth: int = 18, seed: int = 0) -> dict[str, torch.Tensor]:
    """A random ImageNet-shaped state dict in torchvision's layout: 3-channel conv1, running statistics that are
    not the defaults, and a 1000-class fc."""
    torch.manual_seed(seed)
    net = ResNet(depth, in_channels=3, feature_stride=32)
    state = net.state_dict()
    for k, v in state.items():
        if k.endswith("running_mean"):
            state[k] = 0.1 * torch.randn_like(v)
        elif k.endswith("running_var"):
            state[k] = 0.5 + torch.rand_like(v)
    state["fc.weight"] = torch.randn(1000, net.out_channels)
    state["fc.bias"] = torch.zeros(1000)
    return state


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    state = torchvision_like_state()
    path = tmp_path_factory.mktemp("weights") / "resnet18-f37072fd.pth"
    torch.save(state, path)
    return path, state


def learner_from(config: str, **backbone_kwargs):
    cfg = yaml.safe_load((CONFIGS / config).read_text())["model"]["learner"]
    init = dict(cfg["init_args"])
    init["backbone_kwargs"] = {**init["backbone_kwargs"], **backbone_kwargs}
    torch.manual_seed(0)
    return build_learner({"class_path": cfg["class_path"], "init_args": init})


def one_query(ep, j: int):
    return replace(ep, query_images=ep.query_images[:, j : j + 1], query_labels=ep.query_labels[:, j : j + 1],
                   query_ids=[ids[j : j + 1] for ids in ep.query_ids])


# ------------------------------------------------------------------------------------------ the layout
def test_state_dict_has_torchvision_names_and_sizes():
    r18, r50 = ResNet(18, in_channels=3).state_dict(), ResNet(50, in_channels=3).state_dict()
    assert all(k in r18 for k in TORCHVISION_R18) and all(k in r50 for k in TORCHVISION_R50)
    assert "layer1.0.downsample.0.weight" not in r18  # resnet18's first block keeps 64 channels: no shortcut conv
    # torchvision's resnet18 / resnet50 state dicts hold 122 / 320 entries and 11,689,512 / 25,557,032
    # parameters; without fc (2 entries; 513,000 / 2,049,000 parameters):
    assert (len(r18), len(r50)) == (120, 318)
    count = {d: sum(p.numel() for p in ResNet(d, in_channels=3).parameters()) for d in (18, 50)}
    assert count == {18: 11_689_512 - 513_000, 50: 25_557_032 - 2_049_000}
    assert r18["conv1.weight"].shape == (64, 3, 7, 7) and r50["layer4.2.conv3.weight"].shape == (2048, 512, 1, 1)
    assert "resnet" in available_backbones()


def test_feature_strides_and_projection():
    x = torch.randn(2, 1, 64, 64)
    for stride, shape in ((8, (2, 384, 8, 8)), (16, (2, 256, 4, 4)), (32, (2, 512, 2, 2))):
        net = build_backbone("resnet", feature_stride=stride)
        assert net(x).shape == shape and net.out_channels == shape[1] and net.stride == stride
    assert not hasattr(build_backbone("resnet", feature_stride=16), "layer4")  # not built, so no unused parameters
    net = build_backbone("resnet", depth=50, feature_stride=8, out_channels=32)
    assert net(x).shape == (2, 32, 8, 8) and net.out_channels == 32
    assert build_encoder("resnet", width=8)(torch.randn(3, 1, 28, 28)).shape == (3, 64)
    with pytest.raises(ValueError, match="depth"):
        build_backbone("resnet", depth=101)
    with pytest.raises(ValueError, match="feature_stride"):
        build_backbone("resnet", feature_stride=4)


# ------------------------------------------------------------------------------------------ loading
def test_torchvision_file_loads_with_the_grey_adaptation(weights_file):
    path, state = weights_file
    net = build_backbone("resnet", depth=18, weights=str(path), feature_stride=32)
    own = net.state_dict()
    torch.testing.assert_close(own["conv1.weight"], state["conv1.weight"].sum(dim=1, keepdim=True))
    for k in ("layer4.1.bn2.running_var", "layer2.0.downsample.0.weight", "bn1.running_mean"):
        torch.testing.assert_close(own[k], state[k])
    assert not any(k.startswith("fc.") for k in own)
    assert net.imagenet_norm and all(isinstance(m, FrozenBatchNorm2d) for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d))
    # the summed kernel on a grey image == the RGB kernel on that image copied into three channels
    rgb = ResNet(18, in_channels=3, feature_stride=32, freeze_bn=True)
    rgb.load_pretrained(state)
    grey = torch.rand(2, 1, 48, 48)
    grey_net = ResNet(18, 1, feature_stride=32, freeze_bn=True)
    grey_net.load_pretrained(state)
    torch.testing.assert_close(grey_net(grey), rgb(grey.expand(-1, 3, -1, -1)), rtol=1e-4, atol=1e-4)


def test_wrapped_and_module_prefixed_files_load(weights_file, tmp_path):
    path, state = weights_file
    ddp = tmp_path / "ddp.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 90}, ddp)
    model = tmp_path / "model.pth"
    torch.save({"model": state, "optimizer": {"lr": 0.1}}, model)
    for p in (ddp, model):
        loaded = load_weights(p)
        assert set(loaded) == set(state)
        net = build_backbone("resnet", weights=str(p))
        torch.testing.assert_close(net.state_dict()["layer1.0.conv1.weight"], state["layer1.0.conv1.weight"])


def test_a_missing_or_unexpected_key_is_named(weights_file, tmp_path):
    _, state = weights_file
    broken = {k: v for k, v in state.items() if k != "layer3.0.bn1.running_var"}
    torch.save(broken, tmp_path / "missing.pth")
    with pytest.raises(ValueError, match=r"missing keys \(layer3\.0\.bn1\.running_var\)"):
        build_backbone("resnet", weights=str(tmp_path / "missing.pth"))
    torch.save({**state, "layer2.0.extra.weight": torch.zeros(1)}, tmp_path / "extra.pth")
    with pytest.raises(ValueError, match=r"unexpected keys \(layer2\.0\.extra\.weight\)"):
        build_backbone("resnet", weights=str(tmp_path / "extra.pth"))
    torch.save({f"backbone.{k}": v for k, v in state.items()}, tmp_path / "prefixed.pth")
    with pytest.raises(ValueError, match="starts with 'backbone.', and without it they fit: strip that prefix"):
        build_backbone("resnet", weights=str(tmp_path / "prefixed.pth"))
    # a fit checkpoint's keys: stripping 'learner.' alone was advised, and did not load (a review)
    torch.save({f"learner.encoder.{k}": v for k, v in state.items()}, tmp_path / "fit.pth")
    with pytest.raises(ValueError, match="starts with 'learner.encoder.', and without it they fit"):
        build_backbone("resnet", weights=str(tmp_path / "fit.pth"))
    with pytest.raises(ValueError, match="shapes differ"):
        build_backbone("resnet", weights=str(weights_file[0]), width=32)
    with pytest.raises(FileNotFoundError, match="no such file"):
        build_backbone("resnet", weights=str(tmp_path / "absent.pth"))
    # layer4 and fc of a torchvision file are skipped where the encoder stops at layer3
    assert build_backbone("resnet", weights=str(weights_file[0]), feature_stride=8).out_channels == 384


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens once the socket is closed


def test_an_unreachable_url_fails_fast_and_says_what_to_do(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    url = f"http://127.0.0.1:{_closed_port()}/resnet18-f37072fd.pth"
    start = time.monotonic()
    with pytest.raises(WeightsUnavailableError) as e:
        load_weights(url, timeout=3.0)
    with pytest.raises(OSError, match="No download is possible from this machine"):
        build_backbone("resnet", weights=url)
    assert time.monotonic() - start < 10
    msg = str(e.value)
    assert url in msg and "pass the local file" in msg and "resnet18-f37072fd.pth" in msg


def test_a_file_url_loads_through_the_cache(weights_file, tmp_path):
    path, state = weights_file
    url = path.resolve().as_uri()
    loaded = load_weights(url, cache_dir=tmp_path / "cache")
    assert set(loaded) == set(state) and cached_download(url, tmp_path / "cache").is_file()
    # a name in torch.hub's hash convention whose content does not have that hash is kept per URL, not shared
    assert not (tmp_path / "cache" / path.name).exists()


def _small_state(seed: int) -> dict[str, torch.Tensor]:
    return {"w": torch.full((2,), float(seed))}


def test_two_urls_ending_in_the_same_name_get_their_own_weights(tmp_path):
    """torch.hub caches by file name: the second URL silently loaded the first one's weights (a review)."""
    for site, seed in (("imagenet", 1), ("radimagenet", 2)):
        (tmp_path / site).mkdir()
        torch.save(_small_state(seed), tmp_path / site / "resnet18.pth")
    first = load_weights((tmp_path / "imagenet" / "resnet18.pth").as_uri(), cache_dir=tmp_path / "cache")
    second = load_weights((tmp_path / "radimagenet" / "resnet18.pth").as_uri(), cache_dir=tmp_path / "cache")
    assert first["w"][0] == 1 and second["w"][0] == 2


def test_a_damaged_download_is_named_deleted_and_fetched_again(tmp_path):
    src = tmp_path / "site" / "weights.pth"
    src.parent.mkdir()
    torch.save(_small_state(3), src)
    src.write_bytes(src.read_bytes()[:100])  # a download cut short
    url, cache = src.as_uri(), tmp_path / "cache"
    with pytest.raises(ValueError, match=r"site/weights\.pth: the downloaded file .* is not a weights file .* it was "
                                         r"deleted, so the next run downloads it again"):
        load_weights(url, cache_dir=cache)
    assert not list((cache / "by-url").rglob("weights.pth"))
    torch.save(_small_state(3), src)  # the server has the good file again
    assert load_weights(url, cache_dir=cache)["w"][0] == 3


def test_content_addressed_names_are_verified_and_shared_with_torch_hub(tmp_path):
    """A file named like torchvision's (name-<sha256 prefix>.pth) whose content has that hash is kept where torch.hub
    and torchvision keep it, and found there again without a download."""
    staging = tmp_path / "staging.pth"
    torch.save(_small_state(4), staging)
    digest = hashlib.sha256(staging.read_bytes()).hexdigest()[:8]
    src = tmp_path / "site" / f"resnet18-{digest}.pth"
    src.parent.mkdir()
    staging.rename(src)
    cache = tmp_path / "cache"
    assert load_weights(src.as_uri(), cache_dir=cache)["w"][0] == 4
    assert (cache / src.name).is_file()
    src.unlink()  # no source any more: the verified copy is found
    assert load_weights(src.as_uri(), cache_dir=cache)["w"][0] == 4


def test_bad_urls_say_what_is_wrong(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    with pytest.raises(ValueError, match=r"ftp:// URLs are not supported; give an http\(s\):// or file:// URL"):
        load_weights("ftp://127.0.0.1/x.pth")
    with pytest.raises(WeightsUnavailableError, match=r"could not read pretrained weights from file://.*; check the path"):
        load_weights((tmp_path / "absent.pth").as_uri())
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/no/such/weights.pth"
        with pytest.raises(WeightsUnavailableError, match=r"the server answered HTTP 404 .*check the URL"):
            load_weights(url, timeout=5.0)
    finally:
        server.shutdown()
        server.server_close()
    torch.save({"w": torch.zeros(1), "arch": "resnet18"}, tmp_path / "meta.pth")
    with pytest.raises(ValueError, match=r"its entry 'arch' is a str, not a tensor"):
        load_weights(tmp_path / "meta.pth")


# ------------------------------------------------------------------------------------------ learners
def test_protonet_seg_from_its_config_trains_and_predicts(weights_file):
    learner = learner_from("protonet_resnet_seg.yaml", weights=str(weights_file[0]))
    assert learner.encoder.stride == 8 and not uses_support_statistics(learner.encoder)
    ep = segmentation_episode(n_shot=2, n_query=2, tasks=1, size=64, seed=1)
    learner.train()
    loss = learner.loss(ep)
    loss.backward()
    assert torch.isfinite(loss) and learner.encoder.conv1.weight.grad is not None
    learner.eval()
    with torch.no_grad():
        p = learner.predict(ep)
    assert p.shape == (1, 2, 64, 64) and (p >= 0).all() and (p <= 1).all()


def test_coordinate_channels_with_pretrained_weights_are_refused(weights_file):
    """A review: with coord_channels the pretrained first convolution read the grey slice with its red kernel
    alone and the coordinate maps as green and blue, normalised as colours, without a word."""
    from imaging_meta.learners.metric.protonet_seg import PrototypicalSegmenter

    with pytest.raises(ValueError, match=r"coord_channels adds two coordinate channels .* set coord_channels: false"):
        PrototypicalSegmenter(backbone="resnet", coord_channels=True,
                              backbone_kwargs={"depth": 18, "weights": str(weights_file[0]), "feature_stride": 8})
    assert PrototypicalSegmenter(backbone="resnet", coord_channels=True,  # from scratch: the channels are learned
                                 backbone_kwargs={"depth": 18, "feature_stride": 8}).coord_channels


@pytest.mark.parametrize("freeze_bn", [True, False])
def test_a_query_does_not_depend_on_the_other_queries(weights_file, freeze_bn):
    learner = learner_from("protonet_resnet_seg.yaml", weights=str(weights_file[0]), freeze_bn=freeze_bn)
    assert uses_support_statistics(learner.encoder) is not freeze_bn
    ep = segmentation_episode(n_shot=2, n_query=3, tasks=2, size=64, seed=2)
    modes = ("eval",) if freeze_bn else ("eval", "train")  # support statistics in training, running in eval
    for mode in modes:
        getattr(learner, mode)()
        with torch.no_grad():
            together = learner.predict(ep)
            alone = torch.cat([learner.predict(one_query(ep, j)) for j in range(3)], dim=1)
        torch.testing.assert_close(alone, together, rtol=0, atol=1e-5)


def test_frozen_batchnorm_keeps_its_statistics_through_a_training_step(weights_file):
    learner = learner_from("protonet_resnet_seg.yaml", weights=str(weights_file[0]))
    norms = [m for m in learner.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert norms and all(isinstance(m, FrozenBatchNorm2d) for m in norms)
    before = {k: v.clone() for k, v in learner.state_dict().items() if "running" in k or "num_batches" in k}
    affine = learner.encoder.layer2[0].bn1.weight.detach().clone()
    learner.train()
    assert not any(m.training for m in norms)
    opt = torch.optim.AdamW(learner.parameters(), lr=1e-2)
    learner.loss(segmentation_episode(n_shot=2, n_query=2, tasks=2, size=64, seed=3)).backward()
    opt.step()
    after = learner.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items())
    assert not torch.equal(affine, learner.encoder.layer2[0].bn1.weight)  # the affine part still trains


def test_support_statistics_norms_update_from_the_support_only_when_unfrozen():
    net = build_backbone("resnet", feature_stride=16)
    assert all(isinstance(m, SupportBatchNorm2d) for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert not net.imagenet_norm
    with pytest.raises(ValueError, match="transductive"):
        build_backbone("resnet", freeze_bn=True, transductive=True)


@pytest.mark.parametrize("name", ["MAML", "Reptile", "MetaLSTM"])
def test_gradient_learners_normalise_with_support_statistics_in_eval_mode_too(name):
    """MAML's family runs its network on copies of the buffers, so running statistics never follow training; in
    eval mode its norms kept their initial (0, 1) statistics, which training never used (a train/eval mismatch)."""
    from imaging_meta.learners.gradient.maml import MAML
    from imaging_meta.learners.gradient.meta_lstm import MetaLSTM
    from imaging_meta.learners.gradient.reptile import Reptile

    torch.manual_seed(0)
    cls = {"MAML": MAML, "Reptile": Reptile, "MetaLSTM": MetaLSTM}[name]
    kwargs = {"n_way": 2} | ({"inner_steps": 1, "inner_lr": 0.1} if name != "MetaLSTM" else {})
    learner = cls(backbone="resnet", backbone_kwargs={"depth": 18, "width": 8}, **kwargs)
    ep = classification_episode(n_way=2, n_shot=2, n_query=2, tasks=1, size=32)
    norms = [m for m in learner.modules() if isinstance(m, SupportBatchNorm2d)]
    assert norms and all(m.running_mean is not None for m in norms)
    with torch.no_grad():
        trained_mode = learner.train().predict(ep)
        for m in norms:  # statistics the learner never uses: eval mode must not read them either
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
        eval_mode = learner.eval().predict(ep)
    torch.testing.assert_close(eval_mode, trained_mode)


def test_freeze_stages(weights_file):
    net = build_backbone("resnet", weights=str(weights_file[0]), freeze_bn=False, freeze_stages=2, feature_stride=16)
    frozen = [net.conv1, net.bn1, net.layer1, net.layer2]
    assert all(not p.requires_grad for m in frozen for p in m.parameters())
    assert all(p.requires_grad for p in net.layer3.parameters())
    assert isinstance(net.layer2[0].bn1, FrozenBatchNorm2d) and isinstance(net.layer3[0].bn1, SupportBatchNorm2d)
    net(torch.randn(2, 1, 64, 64)).sum().backward()
    assert net.conv1.weight.grad is None and net.layer3[0].conv1.weight.grad is not None
    with pytest.raises(ValueError, match="freeze_stages"):
        build_backbone("resnet", feature_stride=8, freeze_stages=4)


def test_protonet_cls_from_its_config(weights_file):
    learner = learner_from("protonet_resnet_cls.yaml", weights=str(weights_file[0]))
    ep = classification_episode(n_way=3, n_shot=1, n_query=2, tasks=1, size=32, seed=0)
    learner.loss(ep).backward()
    learner.eval()
    with torch.no_grad():
        p = learner.predict(ep)
    assert p.shape == (1, 6, 3) and torch.allclose(p.sum(-1), torch.ones(1, 6))


def test_without_weights_rebuilds_the_same_network(weights_file):
    kwargs = {"depth": 18, "weights": str(weights_file[0]), "feature_stride": 8}
    offline = without_weights(kwargs)
    assert offline == {**kwargs, "weights": None, "freeze_bn": True, "imagenet_norm": True}
    a, b = build_backbone("resnet", **kwargs).eval(), build_backbone("resnet", **offline).eval()
    b.load_state_dict(a.state_dict())
    x = torch.rand(1, 1, 64, 64)
    torch.testing.assert_close(a(x), b(x))


def test_a_checkpoint_loads_where_the_weights_file_is_gone(weights_file, tmp_path):
    from imaging_meta.checkpoint_io import load_learner
    from imaging_meta.module import EpisodicModule

    local = tmp_path / "resnet18-f37072fd.pth"
    local.write_bytes(weights_file[0].read_bytes())
    learner = learner_from("protonet_resnet_seg.yaml", weights=str(local))
    module = EpisodicModule(learner, baselines=False)
    ckpt = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(ckpt)  # learner config, task, version, as `imaging-meta fit` writes them
    assert ckpt["imaging_meta"]["learner_config"]["init_args"]["backbone_kwargs"]["weights"] == str(local)
    path = tmp_path / "last.ckpt"
    torch.save(ckpt, path)
    local.unlink()
    with pytest.raises(FileNotFoundError):  # what rebuilding from the saved config as it is would do
        build_learner(ckpt["imaging_meta"]["learner_config"])
    loaded, extra = load_learner(path)
    assert extra["learner_config"]["init_args"]["backbone_kwargs"]["weights"] == str(local)  # recorded as trained
    want, got = learner.state_dict(), loaded.state_dict()
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    assert loaded.encoder.imagenet_norm and not uses_support_statistics(loaded.encoder)  # as the weights made them
    assert all(isinstance(m, FrozenBatchNorm2d) for m in loaded.modules() if isinstance(m, torch.nn.BatchNorm2d))
    ep = segmentation_episode(n_shot=1, n_query=2, tasks=1, size=64, seed=4)
    with torch.no_grad():
        torch.testing.assert_close(loaded.predict(ep), learner.eval().predict(ep))


def test_a_wrapped_learner_config_is_made_offline_too(weights_file):
    from imaging_meta.checkpoint_io import offline_learner_config

    inner = {"class_path": "imaging_meta.learners.metric.protonet.PrototypicalNetwork",
             "init_args": {"backbone": "resnet", "backbone_kwargs": {"depth": 18, "weights": str(weights_file[0])}}}
    wrapped = {"class_path": "imaging_meta.learners.descriptors.task_adaptive.TaskAdaptiveClassifier",
               "init_args": {"embedding": inner, "rule": "weighted"}}
    offline = offline_learner_config(wrapped)
    assert offline["init_args"]["embedding"]["init_args"]["backbone_kwargs"]["weights"] is None
    assert offline["init_args"]["rule"] == "weighted" and wrapped["init_args"]["embedding"] is inner  # not mutated
    assert inner["init_args"]["backbone_kwargs"]["weights"] == str(weights_file[0])


def test_a_complete_file_with_objects_besides_tensors_is_not_called_damaged_nor_deleted(tmp_path):
    """weights_only=True refuses a checkpoint that pickles other objects (an argparse Namespace): it was called a
    damaged download and deleted, so every run downloaded it again (a review)."""
    import argparse

    src = tmp_path / "site" / "ckpt.pth"
    src.parent.mkdir()
    torch.save({"state_dict": _small_state(5), "args": argparse.Namespace(lr=0.1)}, src)
    cache = tmp_path / "cache"
    for source in (src.as_uri(), str(src)):
        with pytest.raises(ValueError, match=r"a complete file, but it holds objects besides tensors.*save its weights alone") as err:
            load_weights(source, cache_dir=cache)
        # the object refused, by name; not torch's generic advice to load with weights_only=False (a review, 2026-12-07)
        assert "it names argparse.Namespace" in str(err.value) and "will likely succeed" not in str(err.value)
    assert list((cache / "by-url").rglob("ckpt.pth"))  # kept: nothing to download again


def test_an_error_page_served_as_weights_is_deleted_and_a_replaced_local_file_is_read_again(tmp_path):
    """A review: an HTML page (or JSON) served as the weights was called "a complete file, but it holds objects
    besides tensors" and kept in the cache for good; and a file:// URL was copied once, so a file replaced in
    place kept loading the old weights."""
    src = tmp_path / "site" / "w.pth"
    src.parent.mkdir()
    src.write_text("<!DOCTYPE html><html><body>Proxy authentication required</body></html>")
    cache = tmp_path / "cache"
    with pytest.raises(ValueError, match=r"w\.pth: the downloaded file .* is not a weights file .* it was deleted"):
        load_weights(src.as_uri(), cache_dir=cache)
    assert not list((cache / "by-url").rglob("w.pth"))
    torch.save(_small_state(6), src)
    assert load_weights(src.as_uri(), cache_dir=cache)["w"][0] == 6
    torch.save(_small_state(7), src)  # replaced in place
    st = src.stat()
    os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert load_weights(src.as_uri(), cache_dir=cache)["w"][0] == 7
    (tmp_path / "page.pth").write_text('{"error": "not found"}')  # a local file too: not called complete
    with pytest.raises(ValueError, match=r"page\.pth: not a weights file readable with weights_only=True"):
        load_weights(tmp_path / "page.pth")


def test_a_first_convolution_that_cannot_be_adapted_names_the_file_and_the_setting():
    """A review: a 1-channel conv1 into a 3-channel network said only that RGB kernels can be adapted."""
    from imaging_meta.pretrained import build_resnet

    net = build_resnet(depth=18, in_channels=3)
    state = {k: torch.zeros_like(v) for k, v in net.state_dict().items() if not k.startswith("proj.")}
    state["conv1.weight"] = torch.zeros(64, 1, 7, 7)
    with pytest.raises(ValueError, match=r"grey\.pth: conv1\.weight has 1 input channels; .*set in_channels to 1"):
        net.load_pretrained(state, source="grey.pth")


def test_test_and_validate_do_not_read_the_pretrained_weights_again(demo_root, demo_index, weights_file, tmp_path):
    """A review (2026-12-07): `test --ckpt_path` of a run fitted from a pretrained weights file read the file again
    (a URL: downloaded it again), and stopped when it had moved, though the checkpoint holds the weights and
    segment, classify and evaluate load it without the file."""
    import shutil

    from imaging_meta.commands.cli import cli_main
    from tests.helpers import CONFIGS, data_args

    weights = Path(shutil.copy(weights_file[0], tmp_path / "w.pth"))
    base = ["--config", str(CONFIGS / "trainer/cpu.yaml"), "--config", str(CONFIGS / "data/demo_segmentation.yaml"),
            "--config", str(CONFIGS / "model/protonet_resnet_seg.yaml"),
            "--model.learner.init_args.backbone_kwargs.weights", str(weights),
            *data_args(demo_root, demo_index[1], tmp_path / "cache"), "--trainer.logger.init_args.save_dir",
            str(tmp_path / "runs"), "--data.init_args.test_episodes", "2", "--data.init_args.val_episodes", "2"]
    fit = cli_main(["fit", *base, "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "1",
                    "--trainer.limit_val_batches", "1"])
    (ckpt,) = (Path(fit.trainer.log_dir) / "checkpoints").glob("best*.ckpt")
    weights.unlink()
    for sub in ("test", "validate"):
        cli_main([sub, *base, "--ckpt_path", str(ckpt), "--trainer.logger", "false",
                  "--trainer.default_root_dir", str(tmp_path / sub)])
