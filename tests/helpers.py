"""Small helpers shared by test modules (test modules never import from each other, nor from conftest).

Shared fixtures live in ``conftest.py``; few-shot episodes for learner tests in ``imaging_meta/fewshot.py``;
DICOM / NIfTI writers in ``datamodules/dicom_fixtures.py``.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from imaging_meta.checkpoint_io import modernize
from imaging_meta.learners.base import build_learner
from tests.datamodules.dicom_fixtures import affine_ras, header, write_series
from tests.imaging_meta.fewshot import lesion_patterns

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
#: what main's code at commit 544d8f2 wrote into two checkpoints, as text (see tests/test_legacy_checkpoints.py)
LEGACY_LAYOUTS = Path(__file__).parent / "fixtures" / "main-2026-12" / "layouts.json"

# a small segmentation datamodule on the session's demo cohort (conftest.demo_root / demo_index)
SMALL_DATA = dict(
    protocol="cross_organ",
    test_organs=["spleen", "kidney_left"],
    val_fraction=0.2,
    test_fraction=0.3,
    n_shot=1,
    n_query=1,
    episodes_per_epoch=8,
    val_episodes=4,
    test_episodes=6,
    batch_size=2,
    spacing=(9.0, 9.0),
    slice_size=(32, 32),
    min_organ_pixels=4,
)
# a tiny U-Net for configs/model/*_seg.yaml
SMALL_MODEL = ["--model.learner.init_args.backbone_kwargs", '{"out_channels": 8, "features": [4, 4, 8, 8, 16, 4]}']
# backbone name -> the options that shrink it (`small_backbone_args`)
SMALL_BACKBONES = {
    "unet": {"out_channels": 8, "features": [4, 4, 8, 8, 16, 4]},
    "conv4": {"width": 8},
    "resnet12": {"widths": [4, 8]},
    "resnet": {"depth": 18, "width": 8},
}


def small_backbone_args(model: str) -> list[str]:
    """`cli_main` arguments that shrink the backbone of ``configs/model/<model>.yaml``: its ``backbone_kwargs``
    (a CLI value replaces the whole dict) with the `SMALL_BACKBONES` options of the backbone it names."""
    init = yaml.safe_load((CONFIGS / "model" / f"{model}.yaml").read_text())["model"]["learner"]["init_args"]
    if "backbone" not in init:  # a learner without a network (the descriptor baselines): nothing to shrink
        return []
    kwargs = {**(init.get("backbone_kwargs") or {}), **SMALL_BACKBONES[init["backbone"]]}
    return ["--model.learner.init_args.backbone_kwargs", json.dumps(kwargs)]


def write_png(path: Path, array: np.ndarray, **kw) -> Path:
    """Save ``array`` as a PNG at ``path``, creating its folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, **kw)
    return path


# ------------------------------------------------------------------------------------ CLI arguments
def data_args(root, index_path, cache) -> list[str]:
    """`cli_main` arguments that point a segmentation data config at ``root`` and shrink it to `SMALL_DATA`."""
    args = ["--data.init_args.root", str(root), "--data.init_args.index_path", str(index_path), "--data.init_args.cache_dir", str(cache)]
    for k, v in SMALL_DATA.items():
        args += [f"--data.init_args.{k}", yaml.safe_dump(list(v) if isinstance(v, tuple) else v, default_flow_style=True).strip().removesuffix("\n...")]
    return args


def write_medmnist(folder: Path, n_files: int = 2, classes_per_file: int = 10, per_class: int = 8) -> list[str]:
    """Tiny MedMNIST-format files (uint8 28x28, labels (N, 1)) with learnable class patterns."""
    pats = lesion_patterns(n_files * classes_per_file, 1, 28, 7)[:, 0]
    rng = np.random.default_rng(0)
    paths = []
    for f in range(n_files):
        imgs, labels = [], []
        for c in range(classes_per_file):
            base = pats[f * classes_per_file + c].numpy()
            for _ in range(per_class):
                x = base + 0.5 * rng.standard_normal(base.shape)
                imgs.append(np.clip(128 + 40 * x, 0, 255).astype(np.uint8))
                labels.append([c])
        imgs, labels = np.stack(imgs), np.asarray(labels, dtype=np.int64)
        n = len(imgs)
        order = rng.permutation(n)
        cut = [int(0.7 * n), int(0.85 * n)]
        parts = np.split(order, cut)
        path = folder / f"tinymnist{f}.npz"
        np.savez(path, **{f"{s}_images": imgs[i] for s, i in zip(("train", "val", "test"), parts, strict=True)},
                 **{f"{s}_labels": labels[i] for s, i in zip(("train", "val", "test"), parts, strict=True)})
        paths.append(str(path))
    return paths


def cls_args(tmp_path: Path, model: str) -> list[str]:
    """`cli_main` arguments (without the subcommand) for a classification model config on tiny MedMNIST files."""
    paths = write_medmnist(tmp_path)
    source = {"class_path": "datamodules.sources.medmnist.MedMNIST", "init_args": {"paths": paths, "image_size": [32, 32]}}
    return [
        "--config", str(CONFIGS / "trainer/cpu.yaml"), "--config", str(CONFIGS / "data/demo_classification.yaml"),
        "--config", str(CONFIGS / f"model/{model}.yaml"),
        "--data.init_args.source", json.dumps(source), "--data.init_args.cache_dir", str(tmp_path / "cache"),
        "--data.init_args.n_query", "2", "--data.init_args.episodes_per_epoch", "4", "--data.init_args.val_episodes", "2",
        "--data.init_args.test_episodes", "4", "--data.init_args.batch_size", "2", "--data.init_args.num_workers", "0",
        *small_backbone_args(model),
        "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"),
    ]


# ------------------------------------------------------------------------------------ image folders
def pattern(c: int, k: int, size=(20, 24)) -> np.ndarray:
    """A class-specific uint8 pattern with per-item noise (never constant)."""
    rng = np.random.default_rng(100 * c + k)
    yy, xx = np.mgrid[0 : size[0], 0 : size[1]]
    base = 127 + 100 * np.sin((c + 1) * xx / 5.0 + c * yy / 7.0)
    return np.clip(base + 10 * rng.standard_normal(size), 0, 255).astype(np.uint8)


def write_dicom(folder: Path, hu: np.ndarray, name: str, **hdr) -> Path:
    """One single-frame CT file holding the 2D HU image ``hu`` (rows, columns) as pixel_array."""
    return write_series(folder, hu.T[:, :, None].astype(np.float64), affine_ras(), hdr=header(**hdr),
                        file_names=[name])[0]


def write_folder(root: Path, n_classes=3, per_class=4, dicom_class=True) -> Path:
    """PNG classes (patients named in the file names: P<k//2>_...) and, optionally, a class of CT DICOMs."""
    for c in range(n_classes):
        for k in range(per_class):
            write_png(root / f"class{c}" / f"P{k // 2}_img{k}.png", pattern(c, k))
    if dicom_class:
        for k in range(per_class):
            hu = (pattern(9, k).astype(np.float64) - 128) * 3  # about -380..380 HU
            write_dicom(root / "ct_class" / f"patient{k}", hu, f"IM_{k}.dcm", PatientID=f"PHITEST-ID-{k % 2}")
    return root


def legacy_checkpoint(name: str, path: Path, root: str = "", cache_dir: str = "") -> Path:
    """Write the checkpoint ``name`` (``protonet_seg`` or ``protonet_cls``) in the recorded old layout to ``path``."""
    text = LEGACY_LAYOUTS.read_text().replace("{root}", root).replace("{cache_dir}", cache_dir).replace("{data}", str(path.parent))
    layout = json.loads(text)[name]
    extra = layout.pop("imaging_meta")
    data = extra.get("data", {}).get("init_args", {})
    for key in ("spacing", "slice_size", "ct_window", "mr_percentiles"):  # tuples in the old files; JSON has lists
        if isinstance(data.get(key), list):
            data[key] = tuple(data[key])
    torch.manual_seed(0)
    learner = build_learner(modernize(extra["learner_config"]))
    weights = learner.state_dict()
    extra = {**extra, "untrained_state_dict": {k: v.clone() for k, v in weights.items()}, "rng_states": []}
    torch.save({**layout, "imaging_meta": extra, "state_dict": {f"learner.{k}": v for k, v in weights.items()}}, path)
    return path


@contextlib.contextmanager
def interrupted_on_second_move(os_module: ModuleType, counts: Callable[[Path], bool]) -> Iterator[list]:
    """Within the block, ``os_module.replace`` raises KeyboardInterrupt when it would move a second file whose
    destination ``counts``: a run stopped while installing its files. Yields the destinations moved before."""
    real, moved = os_module.replace, []

    def stop_after_one(a, b):
        if counts(Path(b)):
            if moved:
                raise KeyboardInterrupt
            moved.append(b)
        return real(a, b)

    with pytest.MonkeyPatch.context() as m:
        m.setattr(os_module, "replace", stop_after_one)
        yield moved
