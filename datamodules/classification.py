"""Few-shot classification data: an `ItemSource` -> an `ItemTable` -> a class split -> N-way K-shot episodes.

`ClassificationDataModule` is what a config points at. It builds (or reads from the cache) the item table
of its source (a folder per class, a lesion CSV, MedMNIST files), splits the *classes* into disjoint
meta-train, meta-val and meta-test classes, and serves batches of `Episode`s (leading task dimension).
Validation and test episodes are drawn once from the seed, written to JSON under the cache folder (the
file name carries n_way, n_shot, n_query, seed and protocol, so every learner run with the same settings
is tested on the very same episodes) and read back on later runs.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch import LightningDataModule
from monai.config import KeysCollection
from monai.transforms import MapTransform, RandomizableTransform
from torch.utils.data import DataLoader

from datamodules.items import ItemSource, ItemTable
from datamodules.loading import ResumableEpisodes, episode_loader
from datamodules.samplers import (
    ClassificationEpisodeSampler,
    ClassificationEpisodeSpec,
    classification_infeasible,
    dist_rank_world,
    load_episodes,
    save_episodes,
)
from imaging_meta.episode import Episode

PROTOCOLS = ("standard", "within_site", "cross_site")
STAGES = ("train", "val", "test")


def _rotation(angles: np.ndarray) -> np.ndarray:
    """(n, 2, 2) rotations from (n, 1) angles, or (n, 3, 3) from (n, 3) angles about z, y, x."""
    if angles.shape[1] == 1:
        c, s = np.cos(angles[:, 0]), np.sin(angles[:, 0])
        return np.stack([np.stack([c, -s], -1), np.stack([s, c], -1)], -2)
    out = np.broadcast_to(np.eye(3), (len(angles), 3, 3)).copy()
    for axis, (i, j) in enumerate(((0, 1), (0, 2), (1, 2))):
        c, s = np.cos(angles[:, axis]), np.sin(angles[:, axis])
        r = np.broadcast_to(np.eye(3), (len(angles), 3, 3)).copy()
        r[:, i, i], r[:, i, j], r[:, j, i], r[:, j, j] = c, -s, s, c
        out = out @ r
    return out


class RandItemAugment(RandomizableTransform):
    """Seeded random augmentation of a stack of items (N, C, *spatial) in [0, 1], each item its own draw:
    a small affine (rotation, zoom, shift; bilinear, zero padding), flips, gamma, intensity scaling, noise.

    One vectorised call per stack: MONAI's per-item ``RandAffine`` costs ~30 ms per 32x32 item on a CPU
    core (about a second per 30-item episode), this costs a few milliseconds per episode. It is a MONAI
    ``RandomizableTransform``: ``set_random_state(seed)`` makes the sequence of draws deterministic.
    `RandItemAugmentd` is its dictionary twin.

    Args:
        rotate_degrees: largest rotation (about every axis in 3D).
        scale: largest relative zoom in or out.
        translate: largest shift as a fraction of the size.
        flip_prob: probability of a flip along each spatial axis.
        gamma: contrast (gamma) range, ``x ** gamma``.
        intensity_scale: largest relative intensity scaling.
        noise_std: standard deviation of the additive Gaussian noise.
        prob: probability of each of the affine, gamma, scaling and noise components (per item).
    """

    def __init__(
        self,
        rotate_degrees: float = 10.0,
        scale: float = 0.1,
        translate: float = 0.06,
        flip_prob: float = 0.5,
        gamma: Sequence[float] = (0.8, 1.25),
        intensity_scale: float = 0.1,
        noise_std: float = 0.02,
        prob: float = 0.8,
    ) -> None:
        RandomizableTransform.__init__(self, prob=1.0)
        if not (0 <= prob <= 1 and 0 <= flip_prob <= 1):
            raise ValueError(f"prob and flip_prob must lie in [0, 1], got {prob}, {flip_prob}")
        if len(gamma) != 2 or not 0 < gamma[0] <= gamma[1]:
            raise ValueError(f"gamma must be (low, high) with 0 < low <= high, got {tuple(gamma)}")
        self.rad = float(np.deg2rad(rotate_degrees))
        self.scale, self.translate, self.flip_prob = float(scale), float(translate), float(flip_prob)
        self.gamma = (float(gamma[0]), float(gamma[1]))
        self.intensity_scale, self.noise_std, self.item_prob = float(intensity_scale), float(noise_std), float(prob)

    def randomize(self, shape: Sequence[int]) -> dict[str, np.ndarray]:  # type: ignore[override]
        """Parameters for ``shape`` = (N, C, *spatial): per item affine matrices, flips and intensity draws."""
        n, _, *spatial = shape
        d = len(spatial)
        if d not in (2, 3):
            raise ValueError(f"RandItemAugment takes (N, C, H, W) or (N, C, D, H, W) items, got shape {tuple(shape)}")
        r = self.R
        on = r.rand(n) < self.item_prob
        rot = _rotation(r.uniform(-self.rad, self.rad, (n, 1 if d == 2 else 3)))
        zoom = 1.0 + r.uniform(-self.scale, self.scale, (n, d))
        shift = 2.0 * r.uniform(-self.translate, self.translate, (n, d))  # normalised coordinates span 2
        theta = np.concatenate([rot / zoom[:, None, :], shift[:, :, None]], axis=2)
        theta[~on] = np.concatenate([np.eye(d), np.zeros((d, 1))], axis=1)
        flips = r.rand(n, d) < self.flip_prob
        gamma = np.where(r.rand(n) < self.item_prob, r.uniform(*self.gamma, n), 1.0)
        factor = np.where(r.rand(n) < self.item_prob, 1.0 + r.uniform(-self.intensity_scale, self.intensity_scale, n), 1.0)
        noise_on = r.rand(n) < self.item_prob
        noise = r.standard_normal((n, *shape[1:])) * self.noise_std * noise_on.reshape(-1, *([1] * (len(shape) - 1)))
        return {"theta": theta, "flips": flips, "gamma": gamma, "factor": factor, "noise": noise}

    @staticmethod
    def geometric(x: torch.Tensor, p: dict[str, np.ndarray], mode: str = "bilinear") -> torch.Tensor:
        """The affine and the flips of ``p`` applied to ``x`` (N, C, *spatial)."""
        theta = torch.as_tensor(p["theta"], dtype=x.dtype)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        x = F.grid_sample(x, grid, mode=mode, padding_mode="zeros", align_corners=False)
        flips = torch.as_tensor(p["flips"])
        for axis in range(flips.shape[1]):
            sel = flips[:, axis].reshape(-1, *([1] * (x.ndim - 1)))
            x = torch.where(sel, x.flip(2 + axis), x)
        return x

    @staticmethod
    def intensity(x: torch.Tensor, p: dict[str, np.ndarray]) -> torch.Tensor:
        """Gamma, scaling and noise of ``p`` applied to ``x`` (N, C, *spatial) in [0, 1]; clipped to [0, 1]."""
        view = (-1, *([1] * (x.ndim - 1)))
        x = x.clamp(0.0, 1.0) ** torch.as_tensor(p["gamma"], dtype=x.dtype).reshape(view)
        x = x * torch.as_tensor(p["factor"], dtype=x.dtype).reshape(view) + torch.as_tensor(p["noise"], dtype=x.dtype)
        return x.clamp(0.0, 1.0)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        """(N, C, *spatial) -> augmented (N, C, *spatial) float32, a new draw per item."""
        x = torch.as_tensor(x, dtype=torch.float32)
        p = self.randomize(x.shape)
        return self.intensity(self.geometric(x, p), p)


class RandItemAugmentd(MapTransform, RandomizableTransform):
    """Dictionary twin of `RandItemAugment`: one draw per call, applied to every key alike (``mode`` per key,
    e.g. "nearest" for masks); the intensity part only to ``intensity_keys`` (default: the first key)."""

    def __init__(
        self,
        keys: KeysCollection,
        mode: str | Sequence[str] = "bilinear",
        intensity_keys: KeysCollection | None = None,
        allow_missing_keys: bool = False,
        **kwargs: Any,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob=1.0)
        self.aug = RandItemAugment(**kwargs)
        self.modes = [mode] * len(self.keys) if isinstance(mode, str) else list(mode)
        self.intensity_keys = set([self.keys[0]] if intensity_keys is None else
                                  ([intensity_keys] if isinstance(intensity_keys, str) else intensity_keys))

    def set_random_state(self, seed: int | None = None, state: np.random.RandomState | None = None) -> RandItemAugmentd:
        super().set_random_state(seed, state)
        self.aug.set_random_state(seed, state)
        return self

    def __call__(self, data):  # type: ignore[override]
        d = dict(data)
        first = next(iter(self.key_iterator(d)), None)
        if first is None:
            return d
        p = self.aug.randomize(torch.as_tensor(d[first]).shape)
        for key, mode in zip(self.keys, self.modes, strict=True):
            if key not in d:
                continue
            x = self.aug.geometric(torch.as_tensor(d[key], dtype=torch.float32), p, mode)
            d[key] = self.aug.intensity(x, p) if key in self.intensity_keys else x
        return d


def classification_augmentation(**kwargs: Any) -> RandItemAugment:
    """The training augmentation of classification items (see `RandItemAugment` for the settings)."""
    return RandItemAugment(**kwargs)


class ClassificationEpisodeDataset(torch.utils.data.Dataset):
    """Turns a `ClassificationEpisodeSpec` into an unbatched `Episode`; pixels are read here and only here.

    Labels are way positions: item ``i`` of class ``spec.classes[w]`` gets label ``w``. ``classes`` are the
    ways' class names, ``site`` the query site(s) (joined with " + " when several), ``support_ids`` and
    ``query_ids`` the pseudonymous item ids, ``meta`` the episode seed and the support and query sites.

    Args:
        table: the items.
        augment: random augmentation of the items (`RandItemAugment`), or None. It is
            seeded from ``spec.seed`` once per episode, so an episode is the same whatever the worker.
    """

    def __init__(self, table: ItemTable, augment: RandItemAugment | None = None) -> None:
        self.table = table
        self.augment = augment

    def __len__(self) -> int:
        return len(self.table)

    def _images(self, idx: Sequence[int]) -> torch.Tensor:
        """(n, C, *spatial) float32 items, augmented when configured (a new draw per item)."""
        x = self.table.images[list(idx)].float()
        return x if self.augment is None else self.augment(x)

    def __getitem__(self, spec: ClassificationEpisodeSpec) -> Episode:
        """The episode of ``spec``: support (N*K, C, *spatial), labels (N*K,) in [0, N); query likewise."""
        if not isinstance(spec, ClassificationEpisodeSpec):
            raise TypeError(f"index this dataset with a ClassificationEpisodeSpec (from a sampler), not {type(spec).__name__}")
        t = self.table
        way = {c: w for w, c in enumerate(spec.classes)}
        try:
            ys = torch.tensor([way[int(t.labels[i])] for i in spec.support], dtype=torch.int64)
            yq = torch.tensor([way[int(t.labels[i])] for i in spec.query], dtype=torch.int64)
        except KeyError as e:
            raise ValueError(f"episode {spec} holds an item of class {e.args[0]}, which is not one of its ways") from e
        if self.augment is not None:
            self.augment.set_random_state(seed=spec.seed)
        support, query = self._images(spec.support), self._images(spec.query)
        s_sites = [t.sites[i] for i in spec.support]
        q_sites = [t.sites[i] for i in spec.query]
        return Episode(
            support_images=support,
            support_labels=ys,
            query_images=query,
            query_labels=yq,
            classes=[t.classes[c] for c in spec.classes],
            site=" + ".join(sorted(set(q_sites))),
            support_ids=[t.item_ids[i] for i in spec.support],
            query_ids=[t.item_ids[i] for i in spec.query],
            meta={"seed": spec.seed, "support_sites": s_sites, "query_sites": q_sites},
        )


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _as_source(source: ItemSource | dict) -> ItemSource:
    """An `ItemSource`, or one built from ``{"class_path": ..., "init_args": {...}}`` (a config or checkpoint)."""
    if isinstance(source, ItemSource):
        return source
    if isinstance(source, dict) and "class_path" in source:
        module, _, name = str(source["class_path"]).rpartition(".")
        try:
            cls = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError) as e:
            raise ValueError(f"source class_path {source['class_path']!r} cannot be imported: {e}") from e
        if not (isinstance(cls, type) and issubclass(cls, ItemSource)):
            raise ValueError(f"source class_path {source['class_path']!r} is not an ItemSource")
        return cls(**(source.get("init_args") or {}))
    raise ValueError(
        f"source must be an ItemSource or {{class_path, init_args}}, got {type(source).__name__}; e.g. "
        "source: {class_path: datamodules.image_folder.ImageFolder, init_args: {root: /path/to/classes}}"
    )


def split_classes(
    classes: Sequence[str],
    val_count: int,
    test_count: int,
    seed: int,
    train: Sequence[str] | None = None,
    val: Sequence[str] | None = None,
    test: Sequence[str] | None = None,
) -> dict[str, list[str]]:
    """Disjoint meta-train / meta-val / meta-test class lists.

    Explicit lists are taken as given; a missing val or test list is drawn (``val_count`` / ``test_count``
    classes, seeded) from the classes no explicit list names; a missing train list is what remains.

    Raises:
        ValueError: for unknown or repeated class names, lists that overlap, or too few classes.
    """
    classes = list(classes)
    given = {"train": train, "val": val, "test": test}
    for stage, names in given.items():
        if names is None:
            continue
        unknown = [n for n in names if n not in classes]
        if unknown:
            raise ValueError(f"{stage}_classes names {unknown}, which the data does not have; its classes: {classes}")
        if len(set(names)) != len(names):
            raise ValueError(f"{stage}_classes repeats a class: {list(names)}")
    for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
        if given[a] is not None and given[b] is not None and set(given[a]) & set(given[b]):
            raise ValueError(f"{a}_classes and {b}_classes share {sorted(set(given[a]) & set(given[b]))}; class splits must be disjoint")
    named = {n for names in given.values() if names is not None for n in names}
    pool = [classes[i] for i in np.random.default_rng(seed).permutation(len(classes)) if classes[i] not in named]
    out: dict[str, list[str]] = {}
    for stage, count in (("test", test_count), ("val", val_count)):
        if given[stage] is not None:
            out[stage] = list(given[stage])
            continue
        if count < 0 or count > len(pool):
            raise ValueError(
                f"{stage}_classes_count={count}, but only {len(pool)} class(es) are left to draw from ({len(classes)} in all); "
                f"lower {stage}_classes_count or list the classes explicitly"
            )
        out[stage], pool = pool[:count], pool[count:]
    out["train"] = list(given["train"]) if given["train"] is not None else [c for c in classes if c in set(pool)]
    return {k: out[k] for k in STAGES}


class ClassificationDataModule(ResumableEpisodes, LightningDataModule):
    """N-way K-shot classification episodes from any `ItemSource`.

    Args:
        source: the input format and its settings (``class_path``/``init_args`` in YAML):
            `datamodules.image_folder.ImageFolder`, `datamodules.lesion_csv.LesionCSV`,
            `datamodules.medmnist.MedMNIST`.
        cache_dir: folder for the item table cache and the fixed episode files (None: no files are written).
        n_way: classes per episode.
        n_shot: support items per class.
        n_query: query items per class.
        train_classes: meta-training classes (default: those left after val and test).
        val_classes: meta-validation classes (default: ``val_classes_count`` drawn with ``split_seed``).
        test_classes: meta-test classes (default: ``test_classes_count`` drawn with ``split_seed``).
        val_classes_count: number of seeded validation classes when ``val_classes`` is not given.
        test_classes_count: number of seeded test classes when ``test_classes`` is not given.
        split_seed: seed of the class split.
        protocol: "standard" (support and query from any site, patient-disjoint), "within_site" (the whole
            episode from one site, drawn per episode: a site adapting with its own scanner's images) or
            "cross_site" (support from one site, query from another). It applies in every stage.
        episodes_per_epoch: training episodes per epoch (shared across DDP ranks).
        val_episodes: fixed validation episodes.
        test_episodes: fixed test episodes.
        batch_size: episodes (tasks) per optimisation step.
        augment: seeded random augmentation (small affine, flips, intensity) of training episodes.
        num_workers: DataLoader workers.
        seed: episode seed (training epochs, and the fixed validation and test lists).
        test_episodes_file: a JSON episode file to test on (written by an earlier run), instead of drawing.

    Classes of a stage that cannot fill an episode (too few items or patients) are dropped with a warning
    that names them and their counts; fewer than ``n_way`` usable classes in a stage is an error.
    """

    def __init__(
        self,
        source: ItemSource,
        cache_dir: str | None = ".cache/imaging-meta",
        n_way: int = 5,
        n_shot: int = 1,
        n_query: int = 5,
        train_classes: list[str] | None = None,
        val_classes: list[str] | None = None,
        test_classes: list[str] | None = None,
        val_classes_count: int = 5,
        test_classes_count: int = 5,
        split_seed: int = 0,
        protocol: str = "standard",
        episodes_per_epoch: int = 400,
        val_episodes: int = 100,
        test_episodes: int = 300,
        batch_size: int = 4,
        augment: bool = True,
        num_workers: int = 0,
        seed: int = 0,
        test_episodes_file: str | None = None,
    ) -> None:
        super().__init__()
        if protocol not in PROTOCOLS:
            raise ValueError(f"protocol {protocol!r} is not one of {PROTOCOLS}")
        if min(n_way, n_shot, n_query, batch_size) < 1:
            raise ValueError(f"n_way, n_shot, n_query and batch_size must be >= 1; got {n_way}, {n_shot}, {n_query}, {batch_size}")
        if n_way < 2:
            raise ValueError(f"n_way={n_way}: classification episodes need at least 2 ways")
        self.save_hyperparameters(ignore=["source"])
        self.source = _as_source(source)
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else None
        self.table: ItemTable | None = None
        self.class_split: dict[str, list[str]] = {}
        self.dropped: dict[str, dict[str, str]] = {}
        self.episode_files: dict[str, Path] = {}
        self._samplers: dict[str, ClassificationEpisodeSampler] = {}
        self._episodes: dict[str, list[ClassificationEpisodeSpec]] = {}

    # --------------------------------------------------------------- settings
    @property
    def chance(self) -> float:
        return 1.0 / self.hparams.n_way

    @property
    def preprocessing(self) -> dict[str, Any]:
        """How to prepare a new image like the items (the source's settings; stored in checkpoints and read
        by ``imaging-meta classify``): at least ``image_size`` and ``channels``."""
        pre = dict(self.source.preprocessing())
        if self.table is not None:
            pre.setdefault("channels", int(self.table.images.shape[1]))
            if pre.get("image_size") is None and pre.get("patch_size") is None:
                pre["image_size"] = [int(s) for s in self.table.images.shape[2:]]
        return pre

    # ------------------------------------------------------------------ setup
    def prepare_data(self) -> None:
        """Build the item table cache once (rank 0)."""
        if self.cache_dir is not None:
            self.source.load(self.cache_dir / "items")

    def setup(self, stage: str | None = None) -> None:
        if self.table is not None:
            return
        h = self.hparams
        self.table = self.source.load(self.cache_dir / "items" if self.cache_dir is not None else None)
        self.class_split = split_classes(self.table.classes, h.val_classes_count, h.test_classes_count, h.split_seed,
                                         h.train_classes, h.val_classes, h.test_classes)
        for stage_name, n in (("train", h.episodes_per_epoch), ("val", h.val_episodes), ("test", h.test_episodes)):
            if n <= 0:
                continue
            names = self.class_split[stage_name]
            if not names:
                continue
            classes = self._feasible(stage_name, names)
            self._samplers[stage_name] = ClassificationEpisodeSampler(
                self.table.labels,
                self.table.patients,
                self.table.sites,
                classes=classes,
                n_way=h.n_way,
                n_shot=h.n_shot,
                n_query=h.n_query,
                n_episodes=n,
                cross_site=h.protocol == "cross_site",
                same_site=h.protocol == "within_site",
                seed=h.seed + {"train": 0, "val": 1, "test": 2}[stage_name],
                class_names=self.table.classes,
            )
        for stage_name in ("val", "test"):
            if stage_name in self._samplers:
                self._episodes[stage_name] = self._fixed_episodes(stage_name)

    def _feasible(self, stage: str, names: Sequence[str]) -> list[int]:
        """The stage's class indices that can fill an episode; the others are dropped with a warning."""
        h = self.hparams
        t = self.table
        idx = [t.classes.index(n) for n in names]
        bad = classification_infeasible(t.labels, t.patients, t.sites, idx, h.n_shot, h.n_query,
                                        h.protocol == "cross_site", t.classes, h.protocol == "within_site")
        keep = [c for c in idx if c not in bad]
        if bad:
            self.dropped[stage] = {t.classes[c]: why for c, why in bad.items()}
            warnings.warn(
                f"{stage}: dropping {len(bad)} class(es) that cannot give n_shot={h.n_shot} support and n_query={h.n_query} "
                f"query items from different patients{ {'cross_site': ' at two sites', 'within_site': ' at one site'}.get(h.protocol, '')}: "
                + "; ".join(bad.values()),
                stacklevel=3,
            )
        if len(keep) < h.n_way:
            raise ValueError(
                f"{stage}: {len(keep)} usable class(es) ({', '.join(t.classes[c] for c in keep) or 'none'}) of "
                f"{len(idx)}, but n_way={h.n_way}; lower n_way, n_shot or n_query, or give this stage more classes "
                + ("(train_classes, or fewer val/test classes)" if stage == "train" else f"({stage}_classes or {stage}_classes_count)")
                + (f". Dropped: {'; '.join(bad.values())}" if bad else "")
            )
        return keep

    def episode_path(self, stage: str) -> Path | None:
        """The fixed episodes' JSON file: its name carries the episode shape, seed and protocol, and a digest
        of the data (item ids and labels) and the stage's classes."""
        if self.cache_dir is None:
            return None
        h = self.hparams
        t = self.table
        key = _digest([t.item_ids, t.labels.tolist(), t.classes, self.class_split[stage],
                       h.val_episodes if stage == "val" else h.test_episodes])
        name = f"{stage}-{h.n_way}way-{h.n_shot}shot-{h.n_query}query-seed{h.seed}-{h.protocol}-{key}.json"
        return self.cache_dir / "episodes" / name

    def _fixed_episodes(self, stage: str) -> list[ClassificationEpisodeSpec]:
        """Seeded val/test episodes: read from their JSON file when it exists, else drawn and written."""
        t = self.table
        if stage == "test" and self.hparams.test_episodes_file:
            path = Path(self.hparams.test_episodes_file)
            specs, _ = load_episodes(path, t.item_ids, t.classes)
            self.episode_files[stage] = path
        else:
            path = self.episode_path(stage)
            if path is not None and path.exists():
                specs, _ = load_episodes(path, t.item_ids, t.classes)
                self.episode_files[stage] = path
            else:
                specs = self._samplers[stage].fixed_episodes()
                if path is not None:
                    h = self.hparams
                    meta = {"stage": stage, "protocol": h.protocol, "seed": h.seed, "n_way": h.n_way, "n_shot": h.n_shot,
                            "n_query": h.n_query, "classes": self.class_split[stage], "preprocessing": self.preprocessing}
                    self.episode_files[stage] = save_episodes(specs, t.item_ids, path, meta, class_names=t.classes)
        self._check_specs(stage, specs)
        return specs

    def _check_specs(self, stage: str, specs: Sequence[ClassificationEpisodeSpec]) -> None:
        """Episodes read from a file must still fit this data: shape and classes."""
        h = self.hparams
        where = self.episode_files.get(stage, "the drawn episodes")
        allowed = {self.table.classes.index(n) for n in self.class_split[stage]}
        for s in specs:
            if len(s.classes) != h.n_way or len(s.support) != h.n_way * h.n_shot or len(s.query) != h.n_way * h.n_query:
                raise ValueError(
                    f"{where}: an episode has {len(s.classes)} ways, {len(s.support)} support and {len(s.query)} query items; "
                    f"this run is {h.n_way}-way {h.n_shot}-shot with {h.n_query} queries: use a matching file"
                )
            if not set(s.classes) <= allowed:
                raise ValueError(f"{where}: episodes use classes outside this run's {stage} classes; use a matching file")

    # ------------------------------------------------------------ dataloaders
    def _loader(self, sampler, augment: bool) -> DataLoader:
        h = self.hparams
        aug = classification_augmentation() if augment else None
        dataset = ClassificationEpisodeDataset(self.table, aug)
        return episode_loader(dataset, sampler, h.batch_size, h.num_workers)

    def _fixed_loader(self, stage: str) -> DataLoader:
        if stage not in self._episodes:
            raise ValueError(f"no {stage} episodes: the class split has no {stage} classes or {stage}_episodes is 0")
        rank, world = dist_rank_world()
        return self._loader(self._episodes[stage][rank::world], augment=False)

    def train_dataloader(self) -> DataLoader:
        if "train" not in self._samplers:
            raise ValueError("no training episodes: the class split has no training classes or episodes_per_epoch is 0")
        self._apply_resume()
        return self._loader(self._samplers["train"], augment=self.hparams.augment)

    def val_dataloader(self) -> DataLoader:
        return self._fixed_loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._fixed_loader("test")

    # -------------------------------------------------------------- reporting
    def split_digest(self) -> str:
        """A digest of the meta-train, meta-val and meta-test classes and the protocol (see
        `SegmentationDataModule.split_digest`)."""
        return _digest({"classes": {k: sorted(v) for k, v in self.class_split.items()}, "protocol": self.hparams.protocol})

    def describe(self) -> dict[str, Any]:
        """The data behind a result, for logs and reports (pseudonymous ids only)."""
        h = self.hparams
        t = self.table
        counts = t.class_counts()
        used = {s: ([t.classes[c] for c in self._samplers[s].classes] if s in self._samplers else []) for s in STAGES}
        return {
            "task": "classification",
            "format": t.source.get("format", type(self.source).__name__),
            # file names of skipped inputs stay out of reports (they may carry patient names): only their count
            "source": {k: v for k, v in t.source.items() if k != "rejected"} | {"rejected": len(t.source.get("rejected", []))},
            "preprocessing": self.preprocessing,
            "protocol": h.protocol,
            "n_way": h.n_way,
            "n_shot": h.n_shot,
            "n_query": h.n_query,
            "chance": self.chance,
            "items": len(t),
            "classes": {s: {c: counts[c] for c in used[s]} for s in STAGES},
            "dropped_classes": self.dropped,
            "sites": {s: sorted({t.sites[i] for i in np.flatnonzero(np.isin(t.labels, self._samplers[s].classes))})
                      for s in STAGES if s in self._samplers},
            "episode_files": {k: str(v) for k, v in self.episode_files.items()},
            "episodes_sha256": {k: json.loads(Path(v).read_text())["sha256"] for k, v in self.episode_files.items()},
        }
