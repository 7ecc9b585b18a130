"""Few-shot classification data: an `ItemSource` -> an `ItemTable` -> a class split -> N-way K-shot episodes.

`ClassificationDataModule` is what a config points at. It builds (or reads from the cache) the item table
of its source (a folder per class, a lesion CSV, MedMNIST files), splits the *classes* into disjoint
meta-train, meta-val and meta-test classes, and serves batches of `Episode`s (leading task dimension).
Validation and test episodes are drawn once from the seed, written to JSON under the cache folder (the
file name carries n_way, n_shot, n_query, seed and protocol, so every learner run with the same settings
is tested on the very same episodes) and read back on later runs.
"""

from __future__ import annotations

import importlib
import logging
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch.utils.data import DataLoader

from datamodules.base import STAGE_SEED_OFFSET, STAGES, EpisodicDataModule, digest
from datamodules.sampling.episode_files import load_episodes, save_episodes
from datamodules.sampling.loading import episode_loader
from datamodules.sampling.samplers_classification import (
    ClassificationEpisodeSampler,
    ClassificationEpisodeSpec,
    classification_infeasible,
)
from datamodules.sources.items import ItemSource, ItemTable, class_name
from datamodules.transforms.augment import RandItemAugment, classification_augmentation
from imaging_meta.episode import Episode

logger = logging.getLogger(__name__)

PROTOCOLS = ("standard", "within_site", "support_query_sites_differ")
#: classification protocol names of earlier versions -> their names now. They are still accepted, with a
#: DeprecationWarning, so that old configs and checkpoints keep working: ``cross_site`` held no site out of
#: training (unlike segmentation's ``cross_site``), it only took support and query from different sites.
RENAMED_PROTOCOLS = {"cross_site": "support_query_sites_differ"}


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
            meta={"seed": spec.seed, "support_sites": s_sites, "query_sites": q_sites,
                  # each query's pseudonymous patient: the cluster of the patient bootstrap in reports
                  "query_patients": [t.patients[i] for i in spec.query]},
        )


def _protocol_name(protocol: str) -> str:
    """``protocol`` under its current name; an unknown one is refused.

    A renamed one gives a DeprecationWarning (at the datamodule's caller), and the same line in the log, as
    Python hides DeprecationWarnings outside ``__main__`` and the command line would never show it.
    """
    if protocol in RENAMED_PROTOCOLS:
        new = RENAMED_PROTOCOLS[protocol]
        msg = (f"classification protocol {protocol!r} is now called {new!r}: write `protocol: {new}`. It takes support "
               "and query from different sites and holds no site out of meta-training (segmentation's 'cross_site' does)")
        warnings.warn(msg, DeprecationWarning, stacklevel=3)
        logger.warning(msg)
        return new
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol {protocol!r} is not one of {PROTOCOLS}")
    return protocol


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
        "source: {class_path: datamodules.sources.image_folder.ImageFolder, init_args: {root: /path/to/classes}}"
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
    given = {k: None if v is None else [class_name(n) for n in v]
             for k, v in {"train": train, "val": val, "test": test}.items()}
    for stage, names in given.items():
        if names is None:
            continue
        unknown = [n for n in names if n not in classes]
        if unknown:
            raise ValueError(f"{stage}_classes names {unknown}, which the data does not have; its classes: {classes}")
        if len(set(names)) != len(names):
            raise ValueError(f"{stage}_classes repeats a class: {list(names)}")
    for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
        names_a, names_b = given[a], given[b]
        if names_a is not None and names_b is not None and set(names_a) & set(names_b):
            raise ValueError(f"{a}_classes and {b}_classes share {sorted(set(names_a) & set(names_b))}; class splits must be disjoint")
    named = {n for names in given.values() if names is not None for n in names}
    pool = [classes[i] for i in np.random.default_rng(seed).permutation(len(classes)) if classes[i] not in named]
    out: dict[str, list[str]] = {}
    for stage, count in (("test", test_count), ("val", val_count)):
        names = given[stage]
        if names is not None:
            out[stage] = list(names)
            continue
        if count < 0 or count > len(pool):
            raise ValueError(
                f"{stage}_classes_count={count}, but only {len(pool)} class(es) are left to draw from ({len(classes)} in all); "
                f"lower {stage}_classes_count or list the classes explicitly"
            )
        out[stage], pool = pool[:count], pool[count:]
    out["train"] = list(given["train"]) if given["train"] is not None else [c for c in classes if c in set(pool)]
    return {k: out[k] for k in STAGES}


class ClassificationDataModule(EpisodicDataModule):
    """N-way K-shot classification episodes from any `ItemSource` (an `EpisodicDataModule`).

    Args:
        source: the input format and its settings (``class_path``/``init_args`` in YAML):
            `datamodules.sources.image_folder.ImageFolder`, `datamodules.sources.lesion_csv.LesionCSV`,
            `datamodules.sources.medmnist.MedMNIST`.
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
            "support_query_sites_differ" (support from one site, query from another; no site is held out of
            meta-training, unlike segmentation's "cross_site"). It applies in every stage. The earlier name
            of the last, "cross_site", is accepted with a DeprecationWarning and stored under the new name.
        episodes_per_epoch: training episodes per epoch (shared across DDP ranks).
        val_episodes: fixed validation episodes.
        test_episodes: fixed test episodes.
        batch_size: episodes (tasks) per optimisation step.
        augment: seeded random augmentation (small affine, flips, intensity) of training episodes.
        num_workers: DataLoader workers.
        seed: episode seed (training epochs, and the fixed validation and test lists).
        test_episodes_file: a JSON episode file to test on (written by an earlier run, or by ``imaging-meta
            prepare medmnist``), instead of drawing. ``{n_shot}``, ``{n_way}`` and ``{n_query}`` in it are filled
            in with this run's values (``episodes/test-{n_way}way-{n_shot}shot-{n_query}query.json``), so that
            one setting serves every number of shots (``imaging-meta evaluate --shots 1 5``); write ``{{``
            and ``}}`` for literal braces. A missing file is an error naming the path.

    Classes of a stage that cannot fill an episode (too few items or patients) are dropped with a warning
    that names them and their counts; fewer than ``n_way`` usable classes in a stage is an error.
    """

    task = "classification"
    no_episodes_hint = "the class split has no {stage} classes"

    @classmethod
    def canonical_init_args(cls, init_args: dict[str, Any]) -> dict[str, Any]:
        """``init_args`` with a renamed protocol (`RENAMED_PROTOCOLS`) written under its current name."""
        args = dict(init_args)
        if args.get("protocol") in RENAMED_PROTOCOLS:
            args["protocol"] = RENAMED_PROTOCOLS[args["protocol"]]
        return args

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
        protocol = _protocol_name(protocol)
        if min(n_way, n_shot, n_query, batch_size) < 1:
            raise ValueError(f"n_way, n_shot, n_query and batch_size must be >= 1; got {n_way}, {n_shot}, {n_query}, {batch_size}")
        if n_way < 2:
            raise ValueError(f"n_way={n_way}: classification episodes need at least 2 ways")
        self.save_hyperparameters(ignore=["source"])
        self.source = _as_source(source)
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else None
        if self.cache_dir is not None:  # a cache folder inside the data folder is not data
            self.source.skip_folders([self.cache_dir])
        self.table: ItemTable | None = None
        self.class_split: dict[str, list[str]] = {}
        self.dropped: dict[str, dict[str, str]] = {}

    # --------------------------------------------------------------- settings
    @property
    def n_way(self) -> int:
        return int(self.hparams.n_way)

    @property
    def chance(self) -> float:
        """Accuracy of guessing: 1 / n_way."""
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
        self.table = table = self.source.load(self.cache_dir / "items" if self.cache_dir is not None else None)
        planned = {"train": 1, "val": len(h.val_classes) if h.val_classes is not None else h.val_classes_count,
                   "test": len(h.test_classes) if h.test_classes is not None else h.test_classes_count}
        episodes = {"train": h.episodes_per_epoch, "val": h.val_episodes, "test": h.test_episodes}
        stages = [n for n in ("train", "val", "test") if episodes[n] > 0 and planned[n] > 0]  # stages that get classes
        if len(table.classes) < h.n_way * len(stages):
            raise ValueError(
                f"{getattr(self.source, 'root', None) or type(self.source).__name__}: "
                f"{len(table.classes)} class(es), but meta-learning gives each stage ({', '.join(stages)}) classes of "
                f"its own and draws {h.n_way}-way episodes from them: {h.n_way * len(stages)} classes are needed. Lower "
                "n_way, leave validation out (val_episodes: 0, val_classes_count: 0), or, to classify these classes "
                "from a few labelled images, run `imaging-meta classify` with a checkpoint meta-trained on other data"
            )
        self.class_split = split_classes(table.classes, h.val_classes_count, h.test_classes_count, h.split_seed,
                                         h.train_classes, h.val_classes, h.test_classes)
        for stage_name, n in (("train", h.episodes_per_epoch), ("val", h.val_episodes), ("test", h.test_episodes)):
            if n <= 0:
                continue
            names = self.class_split[stage_name]
            if not names:
                continue
            classes = self._feasible(stage_name, names)
            try:
                sampler = ClassificationEpisodeSampler(
                    table.labels,
                    table.patients,
                    table.sites,
                    classes=classes,
                    n_way=h.n_way,
                    n_shot=h.n_shot,
                    n_query=h.n_query,
                    n_episodes=n,
                    sites_differ=h.protocol == "support_query_sites_differ",
                    same_site=h.protocol == "within_site",
                    seed=h.seed + STAGE_SEED_OFFSET[stage_name],
                    class_names=table.classes,
                )
                # training episodes are drawn by the epoch: one drawn here makes an impossible one fail at setup,
                # not at the first batch (validation and test episodes are fixed below)
                if stage_name == "train":
                    sampler.draw(np.random.default_rng(sampler.seed))
            except ValueError as e:  # which stage and classes (a review, 2026-12-07: the sampler names neither)
                setting = ("train_classes (else those left after validation and test)" if stage_name == "train"
                           else f"{stage_name}_classes or {stage_name}_classes_count")
                raise ValueError(f"{stage_name} classes ({', '.join(names)}): {e} The stage's classes are set by "
                                 f"{setting}.") from e
            self._samplers[stage_name] = sampler
        self._warn_shared_patients()
        self._fix_episodes()

    def _warn_shared_patients(self) -> None:
        """Say when patients of the test classes also have images in the training classes: the split is by class,
        so a model may have trained on a test patient's other lesions (a review, 2026-12-06: 247 of 253 test
        patients of a folder with patient ids). Images that are their own patient never share one."""
        t, h = self.table, self.hparams
        if t is None or h.test_episodes <= 0 or not self.class_split.get("test"):
            return
        by_stage = {stage: {t.patients[i] for i in np.flatnonzero(np.isin(t.labels, [t.classes.index(c) for c in names]))}
                    for stage, names in self.class_split.items() if names}
        shared = by_stage.get("test", set()) & by_stage.get("train", set())
        if shared:
            warnings.warn(
                f"{len(shared)} of {len(by_stage['test'])} test patients also have images in the training classes (the "
                "split is by class): a model may have seen a test patient's other lesions. For a patient-disjoint test, "
                "keep each patient's images in one split of classes, or hold those patients' images out of the data",
                stacklevel=3)

    def _feasible(self, stage: str, names: Sequence[str]) -> list[int]:
        """The stage's class indices that can fill an episode; the others are dropped with a warning."""
        h = self.hparams
        t = self.table
        assert t is not None  # setup() loads it first
        idx = [t.classes.index(n) for n in names]
        bad = classification_infeasible(t.labels, t.patients, t.sites, idx, h.n_shot, h.n_query,
                                        h.protocol == "support_query_sites_differ", t.classes, h.protocol == "within_site")
        keep = [c for c in idx if c not in bad]
        if bad:
            self.dropped[stage] = {t.classes[c]: why for c, why in bad.items()}
            warnings.warn(
                f"{stage}: dropping {len(bad)} class(es) that cannot give n_shot={h.n_shot} support and n_query={h.n_query} "
                f"query items from different patients{ {'support_query_sites_differ': ' at two sites', 'within_site': ' at one site'}.get(h.protocol, '')}: "
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
        of the data (item ids, labels, patients and sites: the sampler's rules read them) and the stage's classes."""
        if self.cache_dir is None:
            return None
        h = self.hparams
        t = self.table
        assert t is not None  # after setup()
        key = digest([t.item_ids, t.labels.tolist(), t.classes, self.class_split[stage],
                      h.val_episodes if stage == "val" else h.test_episodes, t.patients, t.sites])
        name = f"{stage}-{h.n_way}way-{h.n_shot}shot-{h.n_query}query-seed{h.seed}-{h.protocol}-{key}.json"
        return self.cache_dir / "episodes" / name

    def _test_episodes_path(self) -> Path:
        """``test_episodes_file`` with ``{n_shot}``, ``{n_way}`` and ``{n_query}`` filled in from this run.

        Raises:
            ValueError: an unknown placeholder. FileNotFoundError: no file at the formatted path.
        """
        h = self.hparams
        template = str(h.test_episodes_file)
        try:
            path = Path(template.format(n_shot=h.n_shot, n_way=h.n_way, n_query=h.n_query)).expanduser()
        except (KeyError, IndexError, ValueError) as e:
            raise ValueError(f"test_episodes_file {template!r}: bad placeholder ({type(e).__name__}: {e}); only {{n_shot}}, "
                             "{n_way} and {n_query} are filled in (write {{ and }} for literal braces)") from e
        if not path.is_file():
            filled = f" ({template!r} with n_way={h.n_way}, n_shot={h.n_shot}, n_query={h.n_query})" if str(path) != template else ""
            raise FileNotFoundError(f"test_episodes_file {path}{filled} does not exist; give an episode file written for "
                                    "this n_way/n_shot/n_query (imaging-meta prepare medmnist --shots ...), or unset "
                                    "test_episodes_file to draw the test episodes")
        return path

    def _fixed_episodes(self, stage: str) -> list[ClassificationEpisodeSpec]:
        """Seeded val/test episodes: read from their JSON file when it exists, else drawn and written."""
        t = self.table
        assert t is not None  # after setup()
        path: Path | None
        specs: list[ClassificationEpisodeSpec]
        if stage == "test" and self.hparams.test_episodes_file:
            path = self._test_episodes_path()
            loaded, meta = load_episodes(path, t.item_ids, t.classes)
            specs = cast(list[ClassificationEpisodeSpec], loaded)  # _check_specs checks them
            if isinstance(meta.get("files_md5"), dict):  # the files they were prepared from
                self.source.check_prepared_files(meta["files_md5"], path)
            self.episode_files[stage] = path
        else:
            path = self.episode_path(stage)
            if path is not None and path.exists():
                specs = cast(list[ClassificationEpisodeSpec], load_episodes(path, t.item_ids, t.classes)[0])
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
        """Episodes read from a file must still fit this data: shape, classes, support and query patients apart,
        and the protocol's site rule (under this run's patients and sites, which may differ from those the file
        was drawn with: a `patient_regex` added, other site fields)."""
        h = self.hparams
        where = self.episode_files.get(stage, "the drawn episodes")
        t = self.table
        assert t is not None  # after setup()
        allowed = {t.classes.index(n) for n in self.class_split[stage]}
        for s in specs:
            if len(s.classes) != h.n_way or len(s.support) != h.n_way * h.n_shot or len(s.query) != h.n_way * h.n_query:
                raise ValueError(
                    f"{where}: an episode has {len(s.classes)} ways, {len(s.support)} support and {len(s.query)} query items; "
                    f"this run is {h.n_way}-way {h.n_shot}-shot with {h.n_query} queries: use a matching file"
                )
            if not set(s.classes) <= allowed:
                raise ValueError(f"{where}: episodes use classes outside this run's {stage} classes; use a matching file")
            every = [*s.support, *s.query]
            if len(set(s.classes)) != len(s.classes) or len(set(every)) != len(every):
                # two ways of one class share its label: every item of both is then right whatever is predicted
                what = "a class in two of its ways" if len(set(s.classes)) != len(s.classes) else "an item twice"
                raise ValueError(f"{where}: an episode has {what} (the sampler draws distinct classes and items); "
                                 "remove the file to draw the episodes again")
            for w, c in enumerate(s.classes):  # way w: support items w*K.., query items w*Q.. (the samplers' order)
                items = (*s.support[w * h.n_shot:(w + 1) * h.n_shot], *s.query[w * h.n_query:(w + 1) * h.n_query])
                moved = next((i for i in items if int(t.labels[i]) != c), None)
                if moved is not None:
                    raise ValueError(
                        f"{where}: an episode's way {w} is class {t.classes[c]!r}, but its item {t.item_ids[moved]} is "
                        f"now of class {t.classes[int(t.labels[moved])]!r}: the data changed since the file was drawn (an "
                        "image relabelled or moved to another class folder, CSV rows edited, added or removed): remove "
                        "the file to draw the episodes again")
            shared = sorted({t.patients[i] for i in s.support} & {t.patients[i] for i in s.query})
            if shared:
                raise ValueError(
                    f"{where}: an episode's support and query share patient(s) {', '.join(shared[:3])} under this run's "
                    "patient grouping (the file was drawn with other patients): remove the file to draw the episodes "
                    "again, or use the grouping it was drawn with")
            sup_sites, qry_sites = {t.sites[i] for i in s.support}, {t.sites[i] for i in s.query}
            if (h.protocol == "support_query_sites_differ" and sup_sites & qry_sites) or (
                    h.protocol == "within_site" and len(sup_sites | qry_sites) > 1):
                raise ValueError(
                    f"{where}: an episode's support sites {sorted(sup_sites)} and query sites {sorted(qry_sites)} break "
                    f"protocol {h.protocol!r} under this run's sites: use a file drawn for this protocol and these sites")

    # ------------------------------------------------------------ dataloaders
    def _loader(self, sampler, augment: bool) -> DataLoader:
        h = self.hparams
        aug = classification_augmentation() if augment else None
        assert self.table is not None  # after setup()
        dataset = ClassificationEpisodeDataset(self.table, aug)
        return episode_loader(dataset, sampler, h.batch_size, h.num_workers)

    def train_dataloader(self) -> DataLoader:
        self._refuse_lightning_sampler()
        if "train" not in self._samplers:
            raise ValueError("no training episodes: the class split has no training classes or episodes_per_epoch is 0")
        self._apply_resume()
        return self._loader(self._samplers["train"], augment=self.hparams.augment)

    # -------------------------------------------------------------- reporting
    def _split_identity(self) -> dict[str, Any]:
        """The meta-train, meta-val and meta-test classes and the protocol (a renamed protocol under its earlier
        name, so that checkpoints written before the rename keep their digest)."""
        old = {new: was for was, new in RENAMED_PROTOCOLS.items()}
        return {"classes": {k: sorted(v) for k, v in self.class_split.items()},
                "protocol": old.get(self.hparams.protocol, self.hparams.protocol)}

    def _describe(self) -> dict[str, Any]:
        h = self.hparams
        t = self.table
        assert t is not None  # after setup()
        samplers = cast(dict[str, ClassificationEpisodeSampler], self._samplers)  # setup() makes only these
        counts = t.class_counts()
        used = {s: ([t.classes[c] for c in samplers[s].classes] if s in samplers else []) for s in STAGES}
        return {
            "task": self.task,
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
            "sites": {s: sorted({t.sites[i] for i in np.flatnonzero(np.isin(t.labels, samplers[s].classes))})
                      for s in STAGES if s in samplers},
        }

    def _init_args(self) -> dict[str, Any]:
        """The hyperparameters and the source's own ``{class_path, init_args}``; a source that cannot describe
        itself is left out with a warning (``evaluate`` then asks for ``--data-config``)."""
        args = super()._init_args()
        try:
            args["source"] = self.source.config()
        except ValueError as e:  # a user's source that does not keep its arguments
            logger.warning("the checkpoint will not record the data source (%s)", e)
        return args
