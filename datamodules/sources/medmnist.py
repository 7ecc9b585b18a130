"""MedMNIST ``.npz`` files that the user has already downloaded, as an `ItemTable` (nothing is downloaded).

A MedMNIST file holds ``train_images``, ``train_labels``, ``val_images``, ``val_labels``, ``test_images`` and
``test_labels``: uint8 images (N, H, W) grey, (N, H, W, 3) RGB or (N, D, H, W) 3D (a 4D array whose last
axis is 3 is RGB, any other 4D array is a 3D volume), and int labels (N, 1). Multi-label files
(ChestMNIST, labels (N, k)) are refused: an episode needs one class per item.

Several files pool their classes: class ``c`` of ``organamnist.npz`` is named ``organamnist/c``, or
``organamnist/<name>`` with ``class_names``. The official train/val/test splits of a file are pooled too
(``splits``): few-shot episodes are split by class, not by MedMNIST's item splits.

MedMNIST has no patient information: every image is its own patient, so the patient-disjointness of
support and query holds trivially (and says nothing about patient overlap inside MedMNIST itself). The
site of an item is its file's stem. Item ids are ``<stem>:<split>:<index>``.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from datamodules.sources.image_folder import resize_bilinear
from datamodules.sources.items import ItemSource, ItemTable

SPLITS = ("train", "val", "test")
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


@functools.lru_cache(maxsize=64)
def _md5_of(path: str, size: int, mtime_ns: int) -> str:
    """A file's MD5, computed once per process for its size and time: `evaluate` sets up one datamodule per number
    of shots, and each checks the same test files (hundreds of MB for MedMNIST+ sizes)."""
    from datamodules.recipes.medmnist import file_md5

    return file_md5(Path(path))


def _stem(path: Path) -> str:
    return path.name[: -len(".npz")] if path.name.lower().endswith(".npz") else path.stem


def _check_images(arr: np.ndarray, path: Path, key: str) -> str:
    """The layout of an image array ("2d", "rgb" or "3d"); ValueError naming the file and key otherwise."""
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        raise ValueError(f"{path}: {key} holds NaN or Inf values; MedMNIST images are uint8, re-download or repair the file")
    if arr.dtype != np.uint8:
        raise ValueError(f"{path}: {key} has dtype {arr.dtype}, MedMNIST images are uint8 (0..255); convert them or use the original file")
    if arr.ndim == 3:
        return "2d"
    if arr.ndim == 4:
        return "rgb" if arr.shape[-1] == 3 else "3d"
    raise ValueError(
        f"{path}: {key} has shape {arr.shape}; expected (N, H, W) grey, (N, H, W, 3) RGB or (N, D, H, W) 3D images"
    )


def _check_labels(arr: np.ndarray, n: int, path: Path, key: str) -> np.ndarray:
    """(N,) int64 labels from (N,) or (N, 1); ValueError naming the file and key otherwise."""
    if arr.dtype.kind == "f":
        if not np.isfinite(arr).all():
            raise ValueError(f"{path}: {key} holds NaN or Inf values; labels must be integers")
        if not np.array_equal(arr, np.round(arr)):
            raise ValueError(f"{path}: {key} holds non-integer values; labels must be class indices")
    elif arr.dtype.kind not in "iub":
        raise ValueError(f"{path}: {key} has dtype {arr.dtype}; labels must be integer class indices")
    if arr.ndim == 2 and arr.shape[1] > 1:
        raise ValueError(
            f"{path}: {key} has shape {arr.shape}: multi-label data (one 0/1 column per finding, like ChestMNIST) "
            "is not supported; few-shot episodes need exactly one class per image"
        )
    shape = arr.shape
    if arr.ndim == 2:
        arr = arr[:, 0]
    if arr.ndim != 1 or len(arr) != n:
        raise ValueError(f"{path}: {key} has shape {shape}; expected ({n}, 1) or ({n},), one label per image")
    arr = arr.astype(np.int64)
    if n and arr.min() < 0:
        raise ValueError(f"{path}: {key} holds the negative label {int(arr.min())}; labels must be class indices >= 0")
    return arr


class MedMNIST(ItemSource):
    """Pooled MedMNIST ``.npz`` files (see the module docstring).

    Args:
        paths: ``.npz`` files (``organamnist.npz``, ``pathmnist_64.npz``, ...).
        class_names: file stem -> class names by label index (e.g. ``{"organamnist": ["bladder", ...]}``);
            classes of other files are named by their label number.
        splits: which of the file's splits to pool ("train", "val", "test").
        channels: 1 (RGB converted to grey) or 3 (grey repeated).
        image_size: resize every item to this spatial size ([H, W] for 2D, [D, H, W] for 3D); required when
            files of different sizes are pooled.
        max_per_class: keep at most this many items per class (a seeded random subset, to keep memory small).
        seed: seed of that subset.

    Raises:
        ValueError: from `build`, naming the file and key: a missing file or key, a wrong dtype or shape, NaN,
            multi-label data, a label out of range of ``class_names``, or pooled files of different layouts.
    """

    def __init__(
        self,
        paths: list[str],
        class_names: dict[str, list[str]] | None = None,
        splits: list[str] | None = None,
        channels: int = 1,
        image_size: list[int] | None = None,
        max_per_class: int | None = None,
        seed: int = 0,
    ) -> None:
        if isinstance(paths, (str, Path)):
            paths = [paths]
        if not paths:
            raise ValueError("MedMNIST needs at least one .npz path in `paths`")
        self.paths = [str(Path(p).expanduser().resolve()) for p in paths]
        stems = [_stem(Path(p)) for p in self.paths]
        if len(set(stems)) != len(stems):
            raise ValueError(f"MedMNIST paths {self.paths} repeat a file name {stems}; class names are prefixed by the stem, rename one")
        self.class_names = {str(k): [str(n) for n in v] for k, v in (class_names or {}).items()}
        unknown = sorted(set(self.class_names) - set(stems))
        if unknown:
            raise ValueError(f"class_names names files {unknown} that are not among the paths' stems {stems}")
        self.splits = list(splits) if splits is not None else list(SPLITS)
        bad = [s for s in self.splits if s not in SPLITS]
        if bad or not self.splits:
            raise ValueError(f"splits must be a non-empty subset of {list(SPLITS)}, got {self.splits}")
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 (grey) or 3 (RGB), got {channels}")
        self.channels = int(channels)
        self.image_size = [int(s) for s in image_size] if image_size is not None else None
        if self.image_size is not None and (len(self.image_size) not in (2, 3) or min(self.image_size) < 1):
            raise ValueError(f"image_size must be [H, W] or [D, H, W] with positive sizes, got {image_size}")
        if max_per_class is not None and max_per_class < 2:
            raise ValueError(f"max_per_class must be >= 2 (one support and one query item), got {max_per_class}")
        self.max_per_class = max_per_class
        self.seed = int(seed)

    def files(self) -> list[Path]:
        return [Path(p) for p in self.paths]

    def check_prepared_files(self, recorded: dict[str, str], where: str | Path) -> None:
        """Refuse files whose MD5 differs from the one ``where`` (an episode file of `imaging-meta prepare
        medmnist`) was prepared with (``recorded``: file stem -> MD5): its episodes, its sha256 and the report's
        "official" would then describe other data than was scored (a review: a test file replaced after prepare
        was evaluated without a word)."""
        by_stem = {_stem(Path(p)): Path(p) for p in self.paths}
        changed = []
        for stem, md5 in recorded.items():
            if stem in by_stem and by_stem[stem].is_file():
                st = by_stem[stem].stat()
                now = _md5_of(str(by_stem[stem]), st.st_size, st.st_mtime_ns)
                if now != md5:
                    changed.append(f"{by_stem[stem]} (MD5 {now}; prepared with {md5})")
        if changed:
            raise ValueError(f"{where} was prepared from other files than these: {'; '.join(changed)}. Run imaging-meta "
                             "prepare medmnist again on the files you have, or give the files it was prepared with")

    def preprocessing(self) -> dict[str, Any]:
        return {"format": "medmnist", "channels": self.channels, "image_size": self.image_size,
                "intensity": "uint8 / 255"}

    def _load_file(self, path: Path, rng: np.random.Generator) -> tuple[torch.Tensor, np.ndarray, list[str], list[str], str]:
        """Images (n, C, *spatial) float32, labels, class names, item ids, layout of one file."""
        if not path.is_file():
            raise ValueError(f"MedMNIST file {path} does not exist; download it yourself (nothing is downloaded here) and fix `paths`")
        try:
            npz = np.load(path, allow_pickle=False)
        except Exception as e:  # numpy raises several types on a bad archive
            raise ValueError(f"{path}: cannot read it as a .npz archive ({type(e).__name__}: {e}); download it again") from e
        def read(key: str) -> np.ndarray:
            try:  # the archive's index was read; each member is decompressed (and CRC-checked) only here
                return npz[key]
            except Exception as e:
                raise ValueError(f"{path}: cannot read {key} ({type(e).__name__}: {e}); the file is damaged or not as "
                                 "MedMNIST writes it: download it again") from e

        with npz:
            missing = [f"{s}_{k}" for s in self.splits for k in ("images", "labels") if f"{s}_{k}" not in npz.files]
            if missing:
                raise ValueError(f"{path}: missing key(s) {missing} (it has {sorted(npz.files)}); is it a MedMNIST file? "
                                 "Or set `splits` to the splits it has")
            labels_by_split = {}
            layout: str | None = None
            for s in self.splits:
                imgs = read(f"{s}_images")
                lay = _check_images(imgs, path, f"{s}_images")
                if layout is not None and lay != layout:
                    raise ValueError(f"{path}: {s}_images are {lay} but the other splits are {layout}")
                layout = lay
                labels_by_split[s] = _check_labels(read(f"{s}_labels"), len(imgs), path, f"{s}_labels")
            assert layout is not None  # splits is never empty (__init__)
            stem = _stem(path)
            names = self.class_names.get(stem)
            all_labels = np.concatenate([labels_by_split[s] for s in self.splits])
            if names is not None and all_labels.size and all_labels.max() >= len(names):
                where = next(s for s in self.splits if labels_by_split[s].size and labels_by_split[s].max() >= len(names))
                raise ValueError(
                    f"{path}: {where}_labels holds label {int(all_labels.max())}, out of range of the {len(names)} "
                    f"class_names given for {stem!r}; give a name for every label"
                )
            # (split, index) of every item, then the seeded per-class subset
            keys = [(s, i) for s in self.splits for i in range(len(labels_by_split[s]))]
            keep = np.arange(len(keys))
            if self.max_per_class is not None:
                parts = []
                for c in np.unique(all_labels):
                    idx = np.flatnonzero(all_labels == c)
                    if len(idx) > self.max_per_class:
                        idx = np.sort(rng.choice(idx, size=self.max_per_class, replace=False))
                    parts.append(idx)
                keep = np.sort(np.concatenate(parts)) if parts else keep[:0]
            chunks = []
            for s in self.splits:
                sel = np.array([i for (ss, i) in (keys[k] for k in keep) if ss == s], dtype=np.int64)
                if len(sel):
                    chunks.append(read(f"{s}_images")[sel])
        images = self._to_tensor(np.concatenate(chunks), layout) if chunks else torch.zeros(0)
        labels = all_labels[keep]
        present = sorted(set(labels.tolist()))
        cls_names = [f"{stem}/{names[c] if names is not None else c}" for c in present]
        remap = {c: j for j, c in enumerate(present)}
        ids = [f"{stem}:{keys[k][0]}:{keys[k][1]}" for k in keep]
        return images, np.array([remap[c] for c in labels.tolist()], dtype=np.int64), cls_names, ids, layout

    def _to_tensor(self, arr: np.ndarray, layout: str) -> torch.Tensor:
        """uint8 (n, ...) -> float32 (n, C, *spatial) in [0, 1], channels converted and resized."""
        x = arr.astype(np.float32) / 255.0
        if layout == "rgb":
            x = x @ _LUMA if self.channels == 1 else x.transpose(0, 3, 1, 2)
        t = torch.from_numpy(np.ascontiguousarray(x))
        if layout != "rgb" or self.channels == 1:
            t = t.unsqueeze(1)
            if self.channels == 3:
                t = t.repeat(1, 3, *([1] * (t.ndim - 2)))
        if self.image_size is not None:
            spatial = t.shape[2:]
            if len(self.image_size) != len(spatial):
                raise ValueError(
                    f"image_size {self.image_size} has {len(self.image_size)} axes but the images are "
                    f"{len(spatial)}D ({tuple(spatial)}); give [H, W] for 2D files and [D, H, W] for 3D files"
                )
            if list(spatial) != self.image_size:
                if len(spatial) == 2:
                    shrinks = min(s / o for s, o in zip(self.image_size, spatial, strict=True)) < 1
                    t = resize_bilinear(t, self.image_size, antialias=shrinks)
                else:
                    t = F.interpolate(t, size=self.image_size, mode="trilinear", align_corners=False)
        return t.clamp(0.0, 1.0).contiguous()

    def build(self) -> ItemTable:
        rng = np.random.default_rng(self.seed)
        images: list[torch.Tensor] = []
        labels: list[np.ndarray] = []
        classes: list[str] = []
        ids: list[str] = []
        sites: list[str] = []
        shapes: dict[tuple[int, ...], Path] = {}
        for p in map(Path, self.paths):
            imgs, lab, names, item_ids, _layout = self._load_file(p, rng)
            if len(lab) == 0:
                raise ValueError(f"{p}: no images in splits {self.splits}")
            shapes.setdefault(tuple(imgs.shape[1:]), p)
            if len(shapes) > 1:
                (a, pa), (b, pb) = list(shapes.items())[:2]
                raise ValueError(
                    f"{pb}: items of shape {b} (C, *spatial), but {pa} gives {a}; pooled files need one shape: set "
                    "image_size (and the same 2D/3D kind of file)"
                )
            labels.append(lab + len(classes))
            classes += names
            images.append(imgs)
            ids += item_ids
            sites += [_stem(p)] * len(lab)
        return ItemTable(
            images=torch.cat(images),
            labels=np.concatenate(labels),
            classes=classes,
            patients=list(ids),  # no patients in MedMNIST: each image its own
            sites=sites,
            item_ids=ids,
            source={"format": "medmnist", **self.preprocessing(), "files": [Path(p).name for p in self.paths]},
        )
