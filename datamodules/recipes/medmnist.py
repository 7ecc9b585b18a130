"""MedMNIST few-shot recipe: fixed cross-domain test episodes over the MedMNIST 2D ``.npz`` files you downloaded.

MedMNIST v2 (Yang et al., Scientific Data 2023) and MedMNIST+ publish each 2D dataset as one ``.npz`` file per
image size on Zenodo (record 10519652): ``<dataset>.npz`` (28 x 28) and ``<dataset>_64.npz``, ``_128``, ``_224``.
Nothing is downloaded here. `prepare_medmnist` (``imaging-meta prepare medmnist``):

* recognises each file by its name, checks its MD5 against the published one (`MEDMNIST_2D`, vendored from the
  ``medmnist`` package), its per-split sample counts, image shape and label range (the checks of
  `datamodules.sources.medmnist`); every problem of every file is reported at once, in one `PrepareError`;
* splits the classes by file (cross-domain): the test files' classes are the meta-test classes, the validation
  files' the meta-validation classes, every other file's the meta-training classes;
* draws, with a seeded numpy Generator, fixed N-way K-shot test episodes for each K in ``shots`` from the
  official *test* split of the test files only (support and query disjoint), and writes::

    out/medmnist_fewshot.yaml     a data config: ClassificationDataModule over MedMNIST, the class split, and
                                  test_episodes_file with {n_way}/{n_shot}/{n_query} placeholders
    out/episodes/test-5way-1shot-15query.json ...   the fixed episodes (`save_episodes`), one file per K
    out/prepare.json              the files (MD5, official or not), the class split, the arguments, episodes_sha256

The same files and arguments give byte-identical episode files. The output is written beside ``out`` first and
moved in only when everything succeeded, so a failed run leaves ``out`` as it was.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import sys
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from datamodules.io.atomic import atomic_write_text
from datamodules.recipes.medmnist_files import MEDMNIST_2D, SIZES, UNSUPPORTED, ZENODO, MedMNISTFile
from datamodules.recipes.prepare import (
    PrepareError,
    PrepareUsageError,
    _check_out,
    _write_json,
    exclusive,
    install_marked,
    staging_folder,
)
from datamodules.sampling.episode_files import episodes_sha256, save_episodes
from datamodules.sampling.samplers_classification import ClassificationEpisodeSpec
from datamodules.sources.medmnist import SPLITS, _check_images, _check_labels, _stem

GENERATOR = "datamodules.recipes.medmnist"
DATASET = "medmnist"
#: the default class split by file (only the files you pass are used; every other file trains): blood cells,
#: colon histology and skin lesions are tested, kidney histology validates, CT organs, OCT, chest X-ray,
#: breast ultrasound and fundus photographs train
DEFAULT_TEST = ("bloodmnist", "pathmnist", "dermamnist")
DEFAULT_VAL = ("tissuemnist",)
CONFIG_NAME = "medmnist_fewshot.yaml"
EPISODE_NAME = "test-{n_way}way-{n_shot}shot-{n_query}query.json"  # the datamodule fills in the placeholders
_NAME = re.compile(r"([a-z0-9]+)(?:_(\d+))?\.npz")


def recognise(name: str) -> tuple[str, int] | str:
    """(dataset, image size) of an official MedMNIST 2D file name, or why the name is not taken."""
    m = _NAME.fullmatch(name)
    if not m:
        return "not a MedMNIST file name (<dataset>.npz or <dataset>_<size>.npz, e.g. bloodmnist.npz, pathmnist_64.npz)"
    dataset, size = m.group(1), int(m.group(2) or 28)
    if dataset in UNSUPPORTED:
        return f"{dataset} is {UNSUPPORTED[dataset]}"
    if dataset not in MEDMNIST_2D:
        return f"unknown MedMNIST dataset {dataset!r}; the 2D single-label ones are {', '.join(MEDMNIST_2D)}"
    if m.group(2) is not None and size not in SIZES[1:]:
        return f"size {m.group(2)} is not a MedMNIST size (28 is <dataset>.npz; <dataset>_64, _128, _224.npz)"
    return dataset, size


def file_md5(path: Path) -> str:
    h = hashlib.md5(usedforsecurity=False)  # a checksum of the download, as medmnist publishes it
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass(eq=False)
class NpzFile:
    """One recognised input file and what its checks found (``labels``: split -> (n,) int64)."""

    path: Path
    dataset: str
    size: int
    md5: str = ""
    official: bool = False
    labels: dict[str, np.ndarray] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    @property
    def stem(self) -> str:
        return _stem(self.path)  # as `MedMNIST` names the file's classes and items

    @property
    def info(self) -> MedMNISTFile:
        return MEDMNIST_2D[self.dataset]

    def present(self) -> list[int]:
        """The labels the file holds in any split, ascending: its classes, as `MedMNIST` pools them."""
        return sorted(set(np.concatenate([self.labels[s] for s in SPLITS]).tolist()))

    def class_names(self) -> list[str]:
        """The names of `present` in the datamodule's item table: ``<stem>/<class name>``."""
        return [f"{self.stem}/{self.info.classes[c]}" for c in self.present()]

    def record(self, role: str) -> dict[str, Any]:
        """The file in prepare.json."""
        info = self.info
        return {"file": self.path.name, "path": str(self.path), "dataset": self.dataset, "size": self.size, "role": role,
                "md5": self.md5, "published_md5": info.md5[self.size], "official": self.official,
                "python_class": info.python_class, "licence": info.licence, "url": info.url(self.dataset, self.size),
                "n_samples": {s: len(self.labels[s]) for s in SPLITS}}


# ------------------------------------------------------------------------------------------------ checks
def _inputs(files_or_folder: str | os.PathLike | Sequence[str | os.PathLike]) -> tuple[list[tuple[Path, str, int]], list[str], list[str]]:
    """(path, dataset, size) of every input file; the problems; the files of a folder that are not taken, and why."""
    entries = [files_or_folder] if isinstance(files_or_folder, (str, os.PathLike)) else list(files_or_folder)
    found: dict[Path, tuple[str, int]] = {}
    problems: list[str] = [] if entries else ["no input: give a folder of MedMNIST .npz files, or the files"]
    skipped: list[str] = []
    for entry in entries:
        p = Path(entry).expanduser().resolve()
        if p.is_dir():
            taken = 0
            for q in sorted(q for q in p.iterdir() if q.name.lower().endswith(".npz") and not q.name.startswith(".")):
                r = recognise(q.name)
                if isinstance(r, str):
                    skipped.append(f"{q}: {r}")
                else:
                    found[q], taken = r, taken + 1
            if not taken:
                problems.append(f"{p}: no MedMNIST 2D file in this folder (<dataset>.npz or <dataset>_<size>.npz, e.g. "
                                "bloodmnist.npz); download them from " + ZENODO.rsplit("/files/", 1)[0])
        elif p.is_file():
            r = recognise(p.name)
            if isinstance(r, str):
                problems.append(f"{p}: {r}")
            else:
                found[p] = r
        else:
            problems.append(f"{p}: no such file or folder")
    by_dataset: dict[str, list[Path]] = {}
    for path, (dataset, _size) in found.items():
        by_dataset.setdefault(dataset, []).append(path)
    problems += [f"{', '.join(map(str, paths))}: {len(paths)} files of {dataset}; pass one (its classes would appear "
                 "twice)" for dataset, paths in by_dataset.items() if len(paths) > 1]
    return [(path, *found[path]) for path in sorted(found, key=lambda q: q.name)], problems, skipped


def _stored(zf: zipfile.ZipFile, key: str, path: Path) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype of an array of the archive, from its .npy header (the data is not read)."""
    with zf.open(f"{key}.npy") as fh:
        try:
            version = np.lib.format.read_magic(fh)
            if version == (1, 0):
                shape, _fortran, dtype = np.lib.format.read_array_header_1_0(fh)
            elif version == (2, 0):
                shape, _fortran, dtype = np.lib.format.read_array_header_2_0(fh)
            else:
                raise ValueError(f"unsupported .npy format version {version}")
        except ValueError as e:
            raise ValueError(f"{path}: {key} is not a readable .npy array ({e}); download the file again") from e
    return tuple(int(n) for n in shape), np.dtype(dtype)


def _shape_only(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """A zero array of the stored shape and dtype that takes no memory, for the image checks of
    `datamodules.sources.medmnist` (they look at dtype and shape; a non-uint8 array keeps one row for their
    NaN check)."""
    rows = shape[:1] if dtype == np.uint8 else tuple(min(n, 1) for n in shape[:1])
    return np.broadcast_to(np.zeros((), dtype=dtype), rows + shape[1:])


def _check_split(f: NpzFile, zf: zipfile.ZipFile, split: str) -> list[str]:
    """Check one split's images (header only) and labels against the published file; keep its labels."""
    info, key = f.info, f"{split}_images"
    expected = (f.size, f.size) if info.n_channels == 1 else (f.size, f.size, 3)
    try:
        shape, dtype = _stored(zf, key, f.path)
        _check_images(_shape_only(shape, dtype), f.path, key)
        if shape[1:] != expected:
            raise ValueError(f"{f.path}: {key} has shape {shape}; {f.path.name} holds {info.n_channels}-channel images "
                             f"of {f.size} x {f.size}, i.e. (N, {', '.join(map(str, expected))}): is it renamed?")
        try:
            with zf.open(f"{split}_labels.npy") as fh:
                raw = np.lib.format.read_array(fh, allow_pickle=False)
        except Exception as e:  # a pickled (object) array, a bad CRC, a cut member
            raise ValueError(f"{f.path}: cannot read {split}_labels ({type(e).__name__}: {e}); the file is damaged or not "
                             "as MedMNIST writes it: download it again") from e
        labels = _check_labels(raw, shape[0], f.path, f"{split}_labels")
    except ValueError as e:
        return [str(e)]
    problems = []
    n = len(info.classes)
    if labels.size and int(labels.max()) >= n:
        problems.append(f"{f.path}: {split}_labels holds label {int(labels.max())}; {f.dataset} has {n} classes "
                        f"(0-{n - 1}: {list(info.classes)})")
    f.labels[split] = labels
    return problems


def _check_counts(f: NpzFile, allow_unofficial: bool) -> list[str]:
    """The images per split against the published file's (a warning with ``allow_unofficial``)."""
    published = f.info.n_samples
    wrong = [s for s in SPLITS if s in f.labels and len(f.labels[s]) != published[s]]
    if not wrong:
        return []
    what = (f"{f.path}: {', '.join(f'{len(f.labels[s])} {s}' for s in wrong)} images; the published {f.path.name} has "
            f"{', '.join(f'{published[s]} {s}' for s in wrong)}")
    if allow_unofficial:
        f.warnings.append(what + " (used as it is: allow_unofficial)")
        return []
    return [what + f"; download it again from {f.info.url(f.dataset, f.size)} (or pass --allow-unofficial)"]


def inspect_file(path: Path, dataset: str, size: int, allow_unofficial: bool = False) -> tuple[NpzFile, list[str]]:
    """Check one file: its MD5 against the published one, then every split's shape, counts and labels.

    Returns:
        The file (its MD5, whether it is the published file, its labels and warnings) and its problems.
    """
    f = NpzFile(path, dataset, size)
    info = f.info
    try:
        f.md5 = file_md5(path)
    except OSError as e:
        return f, [f"{path}: cannot read it ({type(e).__name__}: {e})"]
    published = info.md5[size]
    f.official = f.md5 == published
    problems: list[str] = []
    if not f.official:
        what = (f"{path}: MD5 {f.md5}, but the published {MedMNISTFile.file_name(dataset, size)} (medmnist 3.0.2) has "
                f"MD5 {published}")
        if allow_unofficial:
            f.warnings.append(what + "; used as it is (allow_unofficial) and recorded as unofficial")
        else:
            problems.append(what + f"; download it again from {info.url(dataset, size)}, or pass --allow-unofficial "
                                   "(allow_unofficial=True) to use this file as it is (prepare.json records it)")
    try:
        with zipfile.ZipFile(path) as zf:
            members = {n[: -len(".npy")] for n in zf.namelist() if n.endswith(".npy")}
            missing = [f"{s}_{k}" for s in SPLITS for k in ("images", "labels") if f"{s}_{k}" not in members]
            if missing:
                return f, [*problems, f"{path}: missing key(s) {missing} (it has {sorted(members)}); is it a MedMNIST "
                                      "file? Download it again"]
            for split in SPLITS:
                problems += _check_split(f, zf, split)
            problems += _check_counts(f, allow_unofficial)
    except (OSError, zipfile.BadZipFile) as e:
        problems.append(f"{path}: cannot read it as a .npz archive ({type(e).__name__}: {e}); download it again")
    return f, problems


def _choose(files: list[NpzFile], entries: Sequence[str] | None, default: Sequence[str], flag: str) -> tuple[list[NpzFile], list[str]]:
    """The files named by ``entries`` (a dataset name, a file stem or name, or a path), or the ``default`` datasets
    among ``files``; an entry that names none of them is a problem."""
    if entries is None:
        return [f for f in files if f.dataset in default], []
    chosen: list[NpzFile] = []
    problems = []
    for entry in entries:
        key = Path(str(entry)).name
        key = key[: -len(".npz")] if key.endswith(".npz") else key
        hit = [f for f in files if key in (f.stem, f.dataset)]
        if not hit:
            problems.append(f"{flag} names {entry!r}, which is none of the files given "
                            f"({', '.join(f.path.name for f in files) or 'none'})")
        chosen += [f for f in hit if f not in chosen]
    # in the files' order, not the order typed: the same files give the same pooled classes and episodes
    return [f for f in files if f in chosen], problems


#: MedMNIST files whose classes are the same concepts (OrganMNIST's axial, coronal and sagittal views of one CT
#: organ set): never in two parts of a class split
TWIN_DATASETS = ("organamnist", "organcmnist", "organsmnist")


def split_by_file(files: list[NpzFile], test_files: Sequence[str] | None, val_files: Sequence[str] | None
                  ) -> tuple[dict[str, list[NpzFile]], list[str]]:
    """The class split by file: test and validation files as named (default `DEFAULT_TEST`, `DEFAULT_VAL` among
    the files given), every other file trains; an empty part or a file in two parts is a problem."""
    test, problems = _choose(files, test_files, DEFAULT_TEST, "--test-files (test_files)")
    val, more = _choose(files, val_files, DEFAULT_VAL, "--val-files (val_files)")
    problems += more
    problems += [f"{f.path.name} is both a test and a validation file; a file belongs to one part" for f in test if f in val]
    train = [f for f in files if f not in test and f not in val]
    roles = {f.dataset: part for part, fs in (("training", train), ("validation", val), ("test", test)) for f in fs}
    twins = {d: roles[d] for d in TWIN_DATASETS if d in roles}
    if len(set(twins.values())) > 1:  # one organ in two parts: a "novel" test class already trained on (a review)
        problems.append(f"{', '.join(f'{d} ({r})' for d, r in twins.items())} hold the same 11 abdominal organs in "
                        "three planes: in different parts, a test organ is one the model trained on; keep them in one "
                        "part (--test-files, --val-files), or leave out all but one")
    if not test:
        problems.append(f"no test file: the default test files are {', '.join(DEFAULT_TEST)} (any size); pass them, or "
                        "name your test files with --test-files (test_files)")
    if not val:
        problems.append(f"no validation file: the default is {', '.join(DEFAULT_VAL)} (any size); pass it, or name "
                        "another file with --val-files (val_files)")
    if files and not train:
        problems.append("no training file: every file given is a test or validation file; add MedMNIST files to "
                        "train on")
    return {"train": train, "val": val, "test": test}, problems


def _check_classes(parts: dict[str, list[NpzFile]], shots: Sequence[int], ways: int, queries: int) -> list[str]:
    """One image size for all files; every part has ``ways`` classes; each number of shots has ``ways`` test
    classes with enough test-split images."""
    problems = []
    sizes = {f.size for fs in parts.values() for f in fs}
    if len(sizes) > 1:
        problems.append(f"files of image sizes {sorted(sizes)} "
                        f"({', '.join(f.path.name for fs in parts.values() for f in fs)}); pass files of one size")
    for part, name in (("train", "training"), ("val", "validation"), ("test", "test")):
        n = sum(len(f.present()) for f in parts[part])
        if n < ways:
            problems.append(f"the {name} files ({', '.join(f.path.name for f in parts[part])}) hold {n} classes, fewer "
                            f"than ways={ways}: add {name} files or lower --ways")
    _, names, members = pooled_test_items(parts["test"])
    for k in shots:
        ok = [n for n, m in zip(names, members, strict=True) if len(m) >= k + queries]
        if len(ok) < ways:
            problems.append(f"{k}-shot episodes with {queries} queries need {k + queries} test-split images of each of "
                            f"{ways} classes; only {len(ok)} test class(es) have as many ({', '.join(ok) or 'none'}): "
                            "lower --queries or --ways, or add test files")
    return problems


# ------------------------------------------------------------------------------------------------ episodes
def pooled_test_items(test: Sequence[NpzFile]) -> tuple[list[str], list[str], list[np.ndarray]]:
    """The official test split of the test files: item ids (``<stem>:test:<index>``, as `MedMNIST` names them),
    the pooled test class names, and for each class the indices of its test-split items."""
    ids: list[str] = []
    names: list[str] = []
    members: list[np.ndarray] = []
    for f in test:
        labels = f.labels["test"]
        offset = len(ids)
        ids += [f"{f.stem}:test:{i}" for i in range(len(labels))]
        for c, name in zip(f.present(), f.class_names(), strict=True):
            names.append(name)
            members.append(offset + np.flatnonzero(labels == c))
    return ids, names, members


def draw_episodes(members: Sequence[np.ndarray], ways: int, shot: int, queries: int, episodes: int,
                  seed: int) -> list[ClassificationEpisodeSpec]:
    """``episodes`` seeded episodes: ``ways`` classes drawn among those with ``shot + queries`` items, then for
    each class ``shot + queries`` distinct items, the first ``shot`` the support and the rest the query."""
    rng = np.random.default_rng([seed, shot])
    eligible = [c for c, m in enumerate(members) if len(m) >= shot + queries]
    specs = []
    for _ in range(episodes):
        classes = [eligible[i] for i in rng.choice(len(eligible), size=ways, replace=False)]
        support: list[int] = []
        query: list[int] = []
        for c in classes:
            picked = rng.choice(members[c], size=shot + queries, replace=False).tolist()
            support += picked[:shot]
            query += picked[shot:]
        specs.append(ClassificationEpisodeSpec(classes=tuple(classes), support=tuple(support), query=tuple(query),
                                               seed=int(rng.integers(2**31 - 1))))
    return specs


# ------------------------------------------------------------------------------------------------ outputs
def _config_text(parts: dict[str, list[NpzFile]], out: Path, shots: Sequence[int], ways: int, queries: int,
                 episodes: int, seed: int) -> str:
    """The data config: every file pooled by `MedMNIST`, the class split by name, the fixed test episodes."""
    files = sorted((f for fs in parts.values() for f in fs), key=lambda f: f.stem)
    size = files[0].size
    channels = 3 if any(f.info.n_channels == 3 for f in files) else 1
    images = sum(len(f.labels[s]) for f in files for s in SPLITS)
    gigabytes = images * channels * size * size * 4 / 1e9
    init_args: dict[str, Any] = {
        "source": {"class_path": "datamodules.sources.medmnist.MedMNIST", "init_args": {
            "paths": [str(f.path) for f in files],
            "class_names": {f.stem: list(f.info.classes) for f in files},
            "splits": list(SPLITS), "channels": channels, "image_size": [size, size]}},
        "cache_dir": ".cache/imaging-meta",
        "n_way": ways, "n_shot": min(shots), "n_query": queries,
        **{f"{part}_classes": [n for f in parts[part] for n in f.class_names()] for part in ("train", "val", "test")},
        "protocol": "standard", "episodes_per_epoch": 400, "val_episodes": 100, "test_episodes": episodes,
        "test_episodes_file": str(out / "episodes" / EPISODE_NAME),
        "batch_size": 4, "augment": True, "num_workers": 2, "seed": seed,
    }
    stems = {part: ", ".join(f.stem for f in fs) for part, fs in parts.items()}
    k = " and ".join(f"{n}-shot" for n in shots)
    rgb = ("RGB files kept in colour, grey ones repeated; the shipped model configs\n#   have in_channels: 1: add "
           "--model.learner.init_args.in_channels 3" if channels == 3 else "every file is grey")
    header = (
        f"# MedMNIST few-shot data config, written by `imaging-meta prepare medmnist` ({GENERATOR}); see\n"
        "# docs/recipes.md. Classes are split by file (cross-domain):\n"
        f"#   test: {stems['test']}\n#   validation: {stems['val']}\n#   training: {stems['train']}\n"
        f"# Fixed test episodes: {k}, {ways}-way, {queries} queries, {episodes} episodes each, drawn from the official\n"
        "# test split of the test files. {n_way}, {n_shot} and {n_query} in test_episodes_file are this run's values, so\n"
        f"# `imaging-meta evaluate --shots {' '.join(map(str, shots))}` reads the matching file for each number of shots.\n"
        f"# channels: {channels} ({rgb}).\n"
        f"# Every image is held in memory as float32 (about {gigabytes:.2g} GB for these files). Leave max_per_class\n"
        "# unset and splits as they are (the episodes name test-split items); leave out training files to save memory.\n"
    )
    data = {"class_path": "datamodules.classification.ClassificationDataModule", "init_args": init_args}
    return header + yaml.safe_dump({"data": data}, sort_keys=False, width=110, allow_unicode=True)


def _write_outputs(staging: Path, out: Path, parts: dict[str, list[NpzFile]], shots: Sequence[int], ways: int,
                   queries: int, episodes: int, seed: int) -> tuple[list[str], dict[str, Any]]:
    """Write the config and the episode files into ``staging``: (their names relative to it, each episode file's
    description)."""
    atomic_write_text(staging / CONFIG_NAME, _config_text(parts, out, shots, ways, queries, episodes, seed))
    ids, names, members = pooled_test_items(parts["test"])
    files = {f.stem: f.md5 for f in parts["test"]}
    # every input whose MD5 is not the published one, the training and validation files named by their part (a
    # review: only test files were marked, so a model trained on an unofficial file was reported as official)
    unofficial = [f.stem for f in parts["test"] if not f.official] + [
        f"{f.stem} ({role})" for part, role in (("train", "training"), ("val", "validation")) for f in parts[part]
        if not f.official]
    described = {}
    for k in shots:
        name = "episodes/" + EPISODE_NAME.format(n_way=ways, n_shot=k, n_query=queries)
        specs = draw_episodes(members, ways, k, queries, episodes, seed)
        meta = {"stage": "test", "generator": GENERATOR, "n_way": ways, "n_shot": k, "n_query": queries, "seed": seed,
                "items": "the official test split of the test files", "files_md5": files, "classes": names,
                "unofficial_files": unofficial}
        save_episodes(specs, ids, staging / name, meta, class_names=names)
        used = sorted({names[c] for s in specs for c in s.classes})
        described[name] = {"n_way": ways, "n_shot": k, "n_query": queries, "n_episodes": len(specs),
                           "classes_drawn_from": [n for n, m in zip(names, members, strict=True) if len(m) >= k + queries],
                           "classes_used": used, "episodes_sha256": episodes_sha256(staging / name)}
    return [CONFIG_NAME, *described], described


# ------------------------------------------------------------------------------------------------ prepare
def _check_arguments(shots: Sequence[int], ways: int, queries: int, episodes: int) -> list[int]:
    shots = sorted({int(k) for k in shots})
    if not shots or min(shots) < 1 or ways < 2 or queries < 1 or episodes < 1:
        raise PrepareUsageError(f"shots {shots} must be positive (at least one), ways >= 2, queries >= 1 and episodes >= 1; "
                                f"got ways={ways}, queries={queries}, episodes={episodes}")
    return shots


def prepare_medmnist(
    files_or_folder: str | os.PathLike | Sequence[str | os.PathLike],
    out: str | os.PathLike,
    test_files: Sequence[str] | None = None,
    val_files: Sequence[str] | None = None,
    shots: Sequence[int] = (1, 5),
    ways: int = 5,
    queries: int = 15,
    episodes: int = 600,
    seed: int = 0,
    allow_unofficial: bool = False,
) -> dict[str, Any]:
    """Check MedMNIST 2D files, split their classes by file and write a data config and fixed test episodes.

    Args:
        files_or_folder: a folder of ``.npz`` files (those with a MedMNIST 2D name are taken, the others listed as
            skipped), or paths of files (and folders).
        out: the folder to write (new, empty, or an earlier MedMNIST output, which is replaced).
        test_files: the test files, by dataset name (``bloodmnist``), file name or path; default `DEFAULT_TEST`
            among the files given.
        val_files: the validation files likewise; default `DEFAULT_VAL`. Every other file trains.
        shots: an episode file for each number of support images per class.
        ways: classes per episode (the pooled test classes must have as many).
        queries: query images per class.
        episodes: episodes per file.
        seed: the seed of the episodes (and of the data config's training episodes).
        allow_unofficial: use files whose MD5 or sample counts differ from the published ones; prepare.json and
            the warnings record them.

    Returns:
        The content of ``out/prepare.json``.

    Raises:
        PrepareError: every problem of every file and of the split at once; ``out`` is then left as it was.
    """
    shots = _check_arguments(shots, ways, queries, episodes)
    out = Path(out).expanduser().resolve()
    with exclusive(out):  # one prepare at a time per output folder (`prepare.exclusive`)
        earlier = _check_out(out, DATASET)
        found, problems, skipped = _inputs(files_or_folder)
        files = []
        for path, dataset, size in found:
            f, more = inspect_file(path, dataset, size, allow_unofficial)
            files.append(f)
            problems += more
        parts, more = split_by_file(files, test_files, val_files)
        problems += more
        if not problems:  # needs every file's labels
            problems += _check_classes(parts, shots, ways, queries)
        if problems:  # the files skipped as not MedMNIST's named too: a renamed file is often the cause
            raise PrepareError(f"{len(problems)} problem(s); nothing was prepared:\n" + "\n".join(problems)
                               + "".join(f"\nskipped (not read): {w}" for w in skipped))
        with staging_folder(out) as staging:
            written, described = _write_outputs(staging, out, parts, shots, ways, queries, episodes, seed)
            # a provisional marker first (a first run stopped while installing blocked every rerun: a review);
            # episode files of an earlier run with other settings go
            install_marked(staging, out, DATASET, written, earlier)
        arguments = {"files_or_folder": [str(p) for p in ([files_or_folder] if isinstance(files_or_folder, (str, os.PathLike))
                                                          else files_or_folder)],
                     "test_files": None if test_files is None else list(test_files),
                     "val_files": None if val_files is None else list(val_files), "shots": shots, "ways": ways,
                     "queries": queries, "episodes": episodes, "seed": seed, "allow_unofficial": allow_unofficial}
        summary = _summary(parts, skipped, arguments, described, written)
        _write_json(out / "prepare.json", summary)  # last: it marks a complete output
        return summary


def _summary(parts: dict[str, list[NpzFile]], skipped: list[str], arguments: dict[str, Any],
             described: dict[str, Any], written: list[str]) -> dict[str, Any]:
    return {
        "generator": GENERATOR,
        "dataset": DATASET,
        "description": "MedMNIST 2D files -> a cross-domain few-shot data config and fixed test episodes",
        "table": "medmnist 3.0.2 INFO (medmnist/info.py, Apache-2.0): class names, n_samples, n_channels, licence, MD5",
        "inputs": sorted((f.record(part) for part, fs in parts.items() for f in fs), key=lambda r: r["file"]),
        "skipped": skipped,
        "split": {part: [f.stem for f in fs] for part, fs in parts.items()},
        "classes": {part: [n for f in fs for n in f.class_names()] for part, fs in parts.items()},
        "arguments": arguments,
        "config": CONFIG_NAME,
        "episodes": described,
        "episodes_sha256": {name: d["episodes_sha256"] for name, d in described.items()},
        "numpy": np.__version__,  # the episodes come from its Generator
        "files": written,
        "warnings": [w for fs in parts.values() for f in fs for w in f.warnings],
    }


# ------------------------------------------------------------------------------------------------ command
_OPTIONS = {"test_files": "--test-files", "val_files": "--val-files", "shots": "--shots", "ways": "--ways",
            "queries": "--queries", "episodes": "--episodes", "seed": "--seed", "allow_unofficial": "--allow-unofficial"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``imaging-meta prepare medmnist`` (`datamodules.recipes.prepare.add_arguments` adds them)."""
    g = p.add_argument_group("medmnist (docs/recipes.md)")
    g.add_argument("--test-files", nargs="+", metavar="NAME", default=None,
                   help=f"test files: dataset or file names (default: {' '.join(DEFAULT_TEST)}, those you have)")
    g.add_argument("--val-files", nargs="+", metavar="NAME", default=None,
                   help=f"validation files (default: {' '.join(DEFAULT_VAL)}); every other file trains")
    g.add_argument("--shots", type=int, nargs="+", default=None, help="an episode file per number of shots (default: 1 5)")
    g.add_argument("--ways", type=int, default=None, help="classes per episode (default: 5)")
    g.add_argument("--queries", type=int, default=None, help="query images per class (default: 15)")
    g.add_argument("--episodes", type=int, default=None, help="episodes per file (default: 600)")
    g.add_argument("--seed", type=int, default=None, help="episode seed (default: 0)")
    g.add_argument("--allow-unofficial", action="store_true", default=None,
                   help="use files whose MD5 or sample counts differ from the published ones (recorded in prepare.json)")


def options_given(args: argparse.Namespace) -> list[str]:
    """The medmnist options on a command line (another dataset refuses them)."""
    return [flag for dest, flag in _OPTIONS.items() if getattr(args, dest, None) is not None]


def run(args: argparse.Namespace) -> int:
    out = Path(args.out) if args.out else Path("data") / f"{DATASET}_prepared"
    kwargs = {dest: getattr(args, dest) for dest in _OPTIONS if getattr(args, dest, None) is not None}
    try:
        summary = prepare_medmnist(args.source, out, **kwargs)
    except PrepareError as e:  # bad input data: 1, as every command; a wrong command line: 2
        print(f"imaging-meta prepare: {e}", file=sys.stderr)
        return 2 if isinstance(e, PrepareUsageError) else 1
    for w in summary["warnings"]:
        print(f"warning: {w}", file=sys.stderr)
    for w in summary["skipped"]:
        print(f"skipped: {w}", file=sys.stderr)
    split = summary["split"]
    print(f"{len(summary['inputs'])} MedMNIST files prepared in {out}: test {', '.join(split['test'])}; validation "
          f"{', '.join(split['val'])}; training {', '.join(split['train'])}")
    for name, d in summary["episodes"].items():
        print(f"  {out / name}: {d['n_episodes']} episodes, {d['n_way']}-way {d['n_shot']}-shot {d['n_query']} queries")
    print(f"data config: {out / CONFIG_NAME}")
    return 0
