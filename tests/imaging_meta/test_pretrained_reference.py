"""The pretrained ResNet against an independent forward pass written from torchvision's definition (functional
convolutions on the state dict itself), so that a user's ImageNet weights compute what they computed in
torchvision: the blocks, the strides, the input normalisation, the first convolution's adaptation to other channel
counts, the stride-8 features at sizes that are not powers of two; and the network failures a user meets (a server
that never answers, a download cut short)."""

import socket
import threading
import time

import pytest
import torch
import torch.nn.functional as F

from imaging_meta.backbones import SupportBatchNorm2d, build_encoder
from imaging_meta.pretrained import (
    FrozenBatchNorm2d,
    ResNet,
    WeightsUnavailableError,
    load_weights,
)
from tests.imaging_meta.test_pretrained import torchvision_like_state


def _bn(x: torch.Tensor, state: dict, p: str) -> torch.Tensor:
    return F.batch_norm(x, state[f"{p}.running_mean"], state[f"{p}.running_var"], state[f"{p}.weight"],
                        state[f"{p}.bias"], False, 0.0, 1e-5)


def reference_stages(state: dict, x: torch.Tensor) -> list[torch.Tensor]:
    """torchvision's ResNet (v1.5: a bottleneck's stride on its 3x3 convolution) in eval mode, written from its
    definition: the outputs of layer1..layer4."""
    x = F.relu(_bn(F.conv2d(x, state["conv1.weight"], stride=2, padding=3), state, "bn1"))
    x = F.max_pool2d(x, 3, 2, 1)
    outs = []
    for i in range(1, 5):
        j = 0
        while f"layer{i}.{j}.conv1.weight" in state:
            p, stride = f"layer{i}.{j}", 2 if i > 1 and j == 0 else 1
            if f"{p}.conv3.weight" in state:  # bottleneck: 1x1, 3x3 (strided), 1x1
                o = F.relu(_bn(F.conv2d(x, state[f"{p}.conv1.weight"]), state, f"{p}.bn1"))
                o = F.relu(_bn(F.conv2d(o, state[f"{p}.conv2.weight"], stride=stride, padding=1), state, f"{p}.bn2"))
                o = _bn(F.conv2d(o, state[f"{p}.conv3.weight"]), state, f"{p}.bn3")
            else:  # basic block: two 3x3
                o = F.relu(_bn(F.conv2d(x, state[f"{p}.conv1.weight"], stride=stride, padding=1), state, f"{p}.bn1"))
                o = _bn(F.conv2d(o, state[f"{p}.conv2.weight"], padding=1), state, f"{p}.bn2")
            shortcut = x
            if f"{p}.downsample.0.weight" in state:
                shortcut = _bn(F.conv2d(x, state[f"{p}.downsample.0.weight"], stride=stride), state, f"{p}.downsample.1")
            x = F.relu(o + shortcut)
            j += 1
        outs.append(x)
    return outs


IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # torchvision's, written out


def _double(state: dict) -> dict:
    return {k: v.double() if v.is_floating_point() else v for k, v in state.items()}


@pytest.fixture(scope="module", params=[18, 50])
def state(request) -> dict:
    return _double(torchvision_like_state(depth=request.param, seed=request.param))


def _net(state: dict, **kwargs) -> ResNet:
    depth = 50 if "layer1.0.conv3.weight" in state else 18
    net = ResNet(depth, freeze_bn=True, **kwargs).double()
    net.load_pretrained(state)
    return net.eval()


@pytest.mark.parametrize("imagenet_norm", [False, True])
def test_rgb_forward_equals_torchvisions_definition(state, imagenet_norm):
    x = torch.rand(2, 3, 48, 40, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    net = _net(state, in_channels=3, feature_stride=32, imagenet_norm=imagenet_norm)
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float64).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float64).view(1, 3, 1, 1)
    expected = reference_stages(state, (x - mean) / std if imagenet_norm else x)[3]
    with torch.no_grad():  # ImageNet's statistics are float32 constants: a few 1e-7 from the float64 reference
        torch.testing.assert_close(net(x), expected, rtol=1e-5, atol=1e-5)


def test_grey_input_is_normalised_with_the_average_imagenet_statistics(state):
    """A grey slice, normalised by the RGB statistics' means (0.449, 0.226) and copied into three channels, is what
    the summed first convolution sees."""
    g = torch.rand(2, 1, 40, 40, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    net = _net(state, in_channels=1, feature_stride=16, imagenet_norm=True)
    expected = reference_stages(state, ((g - 0.449) / 0.226).expand(-1, 3, -1, -1))[2]
    with torch.no_grad():
        torch.testing.assert_close(net(g), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("size", [(72, 72), (100, 60)])
def test_stride_8_features_concatenate_layer2_and_layer3_upsampled_to_its_size(state, size):
    x = torch.rand(1, 3, *size, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    net = _net(state, in_channels=3, feature_stride=8)
    c2, c3 = reference_stages(state, x)[1:3]
    expected = torch.cat([c2, F.interpolate(c3, size=c2.shape[-2:], mode="bilinear", align_corners=False)], dim=1)
    with torch.no_grad():
        out = net(x)
    assert out.shape[-2:] == (-(-size[0] // 8), -(-size[1] // 8))
    torch.testing.assert_close(out, expected, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("in_channels", [2, 4])
def test_other_channel_counts_repeat_the_rgb_kernels_scaled_by_three_over_the_count(in_channels):
    state = torchvision_like_state(depth=18, seed=3)
    net = ResNet(18, in_channels=in_channels, freeze_bn=True)
    net.load_pretrained(state)
    rgb = state["conv1.weight"]
    expected = torch.cat([rgb, rgb], dim=1)[:, :in_channels] * (3.0 / in_channels)
    torch.testing.assert_close(net.conv1.weight.detach(), expected)


def test_frozen_stages_freeze_the_stems_batchnorm_too():
    """freeze_stages >= 1 keeps conv1, bn1 and layer1 as loaded: bn1 must not follow the support's statistics."""
    net = ResNet(18, freeze_stages=1, freeze_bn=False)
    assert isinstance(net.bn1, FrozenBatchNorm2d)
    assert all(isinstance(m, FrozenBatchNorm2d) for m in net.layer1.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert all(isinstance(m, SupportBatchNorm2d) for m in net.layer2.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert not isinstance(ResNet(18, freeze_stages=0, freeze_bn=False).bn1, FrozenBatchNorm2d)


def test_an_encoder_pools_by_the_mean():
    torch.manual_seed(0)
    enc = build_encoder("resnet", width=8).eval()
    x = torch.rand(2, 1, 40, 40)
    with torch.no_grad():
        torch.testing.assert_close(enc(x), enc.backbone(x).mean(dim=(2, 3)))


def test_maml_builds_on_pretrained_weights_with_their_frozen_batchnorm(tmp_path):
    """FrozenBatchNorm2d keeps fixed statistics, which MAML's inner loop may use: it must not be refused as a
    BatchNorm that follows training."""
    from imaging_meta.learners.gradient.maml import MAML
    from tests.imaging_meta.fewshot import classification_episode

    path = tmp_path / "resnet18.pth"
    torch.save(torchvision_like_state(depth=18, seed=4), path)
    learner = MAML(backbone="resnet", backbone_kwargs={"weights": str(path), "feature_stride": 16}, n_way=2,
                   inner_steps=1, inner_lr=0.01)
    ep = classification_episode(n_way=2, n_shot=1, n_query=1, tasks=1, size=32)
    assert torch.isfinite(learner.eval().predict(ep)).all()


# ------------------------------------------------------------------------------------------ network failures
def _serve(handle) -> tuple[socket.socket, int, threading.Thread | None]:
    """A loopback listening socket whose accepted connections ``handle`` (or nobody, when None) answers, and the
    thread that answers them (stopped by `_stop`)."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(4)
    thread = None
    if handle is not None:
        def loop():
            try:
                while True:
                    conn, _ = srv.accept()
                    with conn:
                        handle(conn)
            except OSError:
                pass
        thread = threading.Thread(target=loop, daemon=True)
        thread.start()
    return srv, srv.getsockname()[1], thread


def _stop(srv: socket.socket, thread: threading.Thread | None) -> None:
    """Close the server so that its port refuses connections and its thread ends (close() alone wakes no accept()
    blocked in another thread; a review)."""
    try:
        srv.shutdown(socket.SHUT_RDWR)
    except OSError:  # never connected to: nothing to shut down on some platforms
        pass
    srv.close()
    if thread is not None:
        thread.join(timeout=5)
        assert not thread.is_alive()


def test_a_server_that_never_answers_times_out_with_advice(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    srv, port, _ = _serve(None)  # listens, never accepts nor answers
    caught: list[BaseException] = []

    def fetch() -> None:
        try:
            load_weights(f"http://127.0.0.1:{port}/resnet18.pth", cache_dir=tmp_path / "cache", timeout=1.0)
        except BaseException as e:
            caught.append(e)

    worker = threading.Thread(target=fetch, daemon=True)  # without the timeout it waits forever: fail, not hang
    try:
        start = time.monotonic()
        worker.start()
        worker.join(timeout=20)
        assert not worker.is_alive(), "a server that never answers left the download waiting"
        assert time.monotonic() - start < 10
    finally:
        _stop(srv, None)
    assert len(caught) == 1 and isinstance(caught[0], WeightsUnavailableError), caught
    assert "No download is possible from this machine" in str(caught[0])


def test_a_download_cut_short_is_named_not_raised_as_an_internal_error(tmp_path):
    """A chunked response whose connection drops inside a chunk: http.client's IncompleteRead (not an OSError)."""
    def truncated(conn):
        conn.recv(65536)
        conn.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n186a0\r\n" + b"x" * 10)

    srv, port, thread = _serve(truncated)
    url = f"http://127.0.0.1:{port}/resnet18.pth"
    try:
        with pytest.raises(WeightsUnavailableError, match=f"could not fetch pretrained weights from {url} .*IncompleteRead"):
            load_weights(url, cache_dir=tmp_path / "cache", timeout=5.0)
    finally:
        _stop(srv, thread)
    assert not list((tmp_path / "cache").rglob("resnet18.pth"))  # no partial file left to be read as weights

