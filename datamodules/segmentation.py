"""Few-shot segmentation data: preprocessed volumes -> slice tables -> episodes.

`SegmentationDataModule` is what a config points at. It scans ``root`` once (the index is written to the
cache folder), splits patients under a protocol, preprocesses each labelled volume once (MONAI
``CacheDataset`` in memory, or on disk as `datamodules.slice_cache.SliceCache`, MONAI's ``PersistentDataset``
read one slice at a time), builds the slice tables the samplers draw
from, and serves batches of `Episode`s (leading task dimension).

Under cross_organ, validation (which chooses the checkpoint) targets organs held out of both training and
test (``val_organ_count``; `datamodules.indexing.splits` says how they are chosen), and a given test
episode file is checked against the split (`datamodules.sampling.episode_files.check_segmentation_episodes`).
With ``folds_file`` and ``test_fold`` the test patients are one fold of SSL-ALPNet's 5-fold cross-validation.

The slice tables and the slice episode dataset live in `datamodules.sampling.slices` (importable from here too).
"""

from __future__ import annotations

import datetime
import logging
import os
import re
import warnings
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, NoReturn, cast

import torch
from monai.data import CacheDataset, Dataset, PersistentDataset
from monai.data.utils import pickle_hashing
from monai.transforms import Transform
from torch.utils.data import DataLoader

from datamodules.base import STAGE_SEED_OFFSET, EpisodicDataModule, digest
from datamodules.indexing.index import Case, Index, own_patient_note
from datamodules.indexing.pseudonyms import (
    DEFAULT_SALT,
    SITE_KEY_VERSION,
    normalise_modality,
    salt_or_env,
    unsaid_modality,
)
from datamodules.indexing.scan import DEFAULT_PATIENT_REGEX, DEFAULT_SITE_FIELDS, SCAN_VERSION, scan_to_file
from datamodules.indexing.splits import (
    MIN_VAL_PATIENTS,
    PROTOCOLS,
    Split,
    ValOrganFilter,
    make_split,
    match_sites,
    read_fold,
)
from datamodules.io.atomic import atomic_open
from datamodules.io.folders import files_under
from datamodules.messages import first
from datamodules.progress import enabled as progress_enabled
from datamodules.progress import progress
from datamodules.sampling.episode_files import check_segmentation_episodes, load_episodes, save_episodes
from datamodules.sampling.loading import episode_loader
from datamodules.sampling.samplers_segmentation import (
    SegmentationEpisodeSampler,
    SegmentationEpisodeSpec,
    SliceTable,
)
from datamodules.sampling.slices import (
    SegmentationEpisodeDataset,
    build_slice_table,
    case_items,
    slices_showing,
)
from datamodules.slice_cache import SliceCache
from datamodules.transforms.volume import (
    PREPROCESSING_VERSION,
    READER_VERSION,
    as_plain_tensor,
    slice_augmentation,
    volume_transforms,
)

logger = logging.getLogger(__name__)

#: setting 2: a validation organ is chosen only if removing the training slices that show it keeps at least
#: this share of the training slices that the test organs leave
MIN_TRAINING_SLICES_KEPT = 0.75
#: the most threads that fill the in-memory volume cache (each holds one volume at its preprocessing peak)
CACHE_THREADS = 4


def cache_threads() -> int:
    """Threads that fill the in-memory cache: `CACHE_THREADS`, or fewer when this process may use fewer cores
    (a SLURM allocation of a node: ``os.sched_getaffinity``, not the node's core count)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(CACHE_THREADS, cores))


def memory_cache(items: list[dict], tf: Any) -> CacheDataset:
    """``items`` through ``tf`` into a MONAI ``CacheDataset``, filled by `cache_threads` threads.

    An error raised in one of the threads (a damaged file) reached the user and then aborted the process (exit 134)
    with threads still running: each thread returns its error instead, and the first is raised here, once every
    thread has finished. The pool is bounded: each thread holds one volume at its preprocessing peak (about 2.5 GB
    for a 512 x 512 x 300 CT), and MONAI's default, a thread per core of the machine, ran a many-core node out of
    memory. The process's warning state is restored once the threads are done: readers enter
    ``warnings.catch_warnings`` in them (nibabel for a NIfTI with a scale factor, pydicom's through
    `datamodules.io.dicom_files`), which is not thread-safe, and an interleaving left a filter or a dead
    recording list behind, swallowing every later warning of the run (a review).
    """
    with warnings.catch_warnings():  # entered and left here, in the main thread: restores filters and showwarning
        ds = CacheDataset(items, _Caught(tf), cache_rate=1.0, num_workers=cache_threads(), progress=progress_enabled(),
                          copy_cache=False)
    for i in range(len(ds)):
        item = ds[i]
        if isinstance(item, _Failed):
            raise item.error
    return ds


class Unservable(ValueError):
    """A split whose stage cannot form its episodes (too few of its patients show its organs)."""


class _Failed:
    """What `_Caught` returns for an item whose transform raised."""

    def __init__(self, error: BaseException) -> None:
        self.error = error


class _Caught(Transform):
    """A transform that returns its exception (as `_Failed`) instead of raising it in a cache-filling thread (a
    MONAI `Transform`, not random: `CacheDataset` caches its output)."""

    def __init__(self, transform: Any) -> None:
        self.transform = transform

    def __call__(self, item: Any) -> Any:
        try:
            return self.transform(item)
        except Exception as e:  # re-raised in the main thread by SegmentationDataModule._cached
            return _Failed(e)


def _stamps(value: Any) -> list:
    """(path, size, mtime in ns) of every existing file that ``value`` names (a path or a list of paths)."""
    paths = value if isinstance(value, (list, tuple)) else [value]
    out = []
    for p in paths:
        if isinstance(p, (str, os.PathLike)) and os.path.isfile(p):
            st = os.stat(p)
            out.append((str(p), st.st_size, st.st_mtime_ns))
    return out


def hash_with_file_stamps(item: dict) -> bytes:
    """The disk cache's key of a data item: MONAI's hash of the item together with the size and modification time
    of the files its image and label name, so that a scan or label map edited in place (a corrected label, a
    swapped left and right) is preprocessed again instead of read from a stale cache file."""
    stamped = {**item, "_stamps": {k: _stamps(item[k]) for k in ("image", "label") if k in item}}
    return pickle_hashing(stamped)


#: how long the ranks wait for each other to fill the disk cache: a first fill of a real cohort can take longer
#: than the process group's own timeout (Lightning's 30 minutes), which killed the run as a gloo/NCCL error
CACHE_FILL_TIMEOUT = datetime.timedelta(days=2)


def _warmed(dataset: PersistentDataset) -> PersistentDataset:
    """Under DDP, every missing cache file is written before any rank reads one, each by one rank.

    MONAI writes a cache file to a temporary folder and moves it into place. On one filesystem that move is
    atomic, but a cache folder on another filesystem than the temporary folder (a shared cluster disk) gets a
    copy, which another rank could read half-written. Rank r fills items r, r + world, ... (the fill is shared,
    and no file has two writers); the ranks then wait for each other at a barrier of their own, on a gloo group
    whose timeout (`CACHE_FILL_TIMEOUT`) a long first fill does not reach, and from then on every rank only
    reads. Later runs with the same preprocessing reuse the files. A rank that fails on bad input stops the
    others at once (their barrier's connection closes).
    """
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return dataset
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    # the group first: making it is itself a wait for every rank (under its own timeout), which a rank that failed
    # during its fill would never join; once connected, a rank's failure closes its connections and stops the others
    try:
        group = torch.distributed.new_group(backend="gloo", timeout=CACHE_FILL_TIMEOUT)
    except (RuntimeError, ValueError):  # pragma: no cover - a torch built without gloo: the default group's timeout
        group = None
    try:
        share = range(rank, len(dataset), world)
        for i in progress(share, f"volumes (preprocessed once, then cached; rank {rank})", total=len(share), unit="volume"):
            dataset[i]  # reads the file, or preprocesses the volume and writes it
        torch.distributed.barrier(group=group)
    finally:
        if group is not None:
            torch.distributed.destroy_process_group(group)
    return dataset


class SegmentationDataModule(EpisodicDataModule):
    """1-way K-shot segmentation episodes from a folder of DICOM series / NIfTI volumes with label maps (an
    `EpisodicDataModule`).

    Args:
        root: folder to scan (DICOM series, NIfTI, label maps, BIDS sidecars, Decathlon dataset.json).
        index_path: where the scan index lives; default ``<cache_dir>/<hash of root>/index-<hash of the scan
            settings>.json`` (one per salt, site fields, label names and patient_regex), rebuilt when a
            file under ``root`` or a scan setting changed since it was written (one ``stat`` per file at each
            start). A path given here is used as it is (no such check: for very large folders on slow file
            systems); set ``rescan`` to rebuild it.
        cache_dir: folder for the index, the preprocessed-volume cache and the fixed episode files.
        rescan: rebuild the index even when it exists.
        protocol: "in_domain", "cross_organ" or "cross_site" (see `datamodules.indexing.splits`).
        test_organs: cross_organ: held-out structures, tested on.
        val_organs: cross_organ: structures for validation episodes (on validation patients), which choose the
            best checkpoint; they must not name a test organ. Default: ``val_organ_count`` organs held out for
            validation (see below).
        val_organ_count: cross_organ, without ``val_organs``: how many more organs to hold out for validation,
            so that checkpoint selection never sees the test organs and validation organs are never training
            targets. The choice is fixed by ``split_seed`` among the organs that are not test organs and are
            labelled in as many validation patients as a one-shot episode needs (1 + ``n_query``, two without
            validation episodes; `datamodules.indexing.splits.choose_val_organs`); when none of those chosen is
            shown on a slice with ``min_organ_pixels`` of it by that many, validation could not run, and the choice
            is made again among those that are.
            Under setting 2 training slices that show a validation organ are removed too, so validation mimics
            the test condition, and an organ qualifies only if that keeps at least `MIN_TRAINING_SLICES_KEPT`
            of the training slices the test organs leave (never the vertebrae, which show on nearly every
            slice). On the demo cohort (configs/data/demo_segmentation.yaml, ``split_seed: 0``) it is the
            gallbladder. 0 validates on the test organs, as before this argument existed (checkpoints written
            then are read back with 0; a warning says that checkpoint selection then sees the test organs).
        test_sites: cross_site: held-out sites (site keys, or whole words of them, case-insensitive).
        exclude_test_organ_slices: cross_organ: SSL-ALPNet setting 2 (True) or setting 1 (False).
        val_fraction: share of patients for validation.
        test_fraction: share of patients for test.
        split_seed: seed of the patient split.
        n_shot: support slices per episode (each from a different patient).
        n_query: query slices per episode.
        n_parts: chunks of an organ's extent for position matching (SSL-ALPNet uses 3).
        episodes_per_epoch: training episodes per epoch (shared across DDP ranks).
        val_episodes: fixed validation episodes.
        test_episodes: fixed test episodes.
        batch_size: episodes (tasks) per optimisation step.
        spacing: in-plane resampling target in mm.
        slice_size: (H, W) of every slice.
        ct_window: HU window for CT normalisation.
        mr_percentiles: percentiles for MR normalisation.
        min_organ_pixels: a slice shows an organ when it has at least this many of its pixels.
        augment: random slice augmentation for training episodes.
        domain_randomisation: with ``augment``, also a bias field, a random intensity remapping and a blur
            (`datamodules.transforms.volume.slice_augmentation`), so that a model meta-trained on one cohort (the
            synthetic demo) meets other scanners' appearance in training (docs/segmentation.md).
        cache: "memory" (MONAI CacheDataset) or "disk" (`SliceCache`, a PersistentDataset under cache_dir).
        num_workers: DataLoader workers.
        seed: episode seed (training epochs, and the fixed validation and test lists).
        label_names: label value -> structure name, for folders without a Decathlon dataset.json. It applies to
            every label map under ``root`` that no ``dataset.json`` in its folder or above describes (lists it among
            its training pairs, or lists none); give a subfolder
            with other labels (tumours beside organs) its own ``dataset.json`` (``{"labels": {"1": "tumour"}}``).
        modality: ``CT`` or ``MR``, for volumes whose files do not say (a NIfTI without a BIDS sidecar or a
            Decathlon ``modality``): CT volumes get the HU window, all others percentile scaling. None (default):
            such volumes are scaled by percentiles, with a warning; it is stored in checkpoints, and
            ``imaging-meta segment`` then scales files that do not say their modality the same way.
        site_fields: header fields that build the site key.
        salt: secret for the pseudonymous ids (set your own for real data). None (default): the environment's
            ``IMAGING_META_SALT``, else the public default; a salt given here is copied into the run's
            ``config.yaml``, so the environment keeps it out of the run folder.
        test_episodes_file: a JSON episode file to test on (written by an earlier run), instead of drawing. Every
            episode must keep this run's split (test patients, test organs, under cross_site test sites) and
            its ``n_shot``/``n_query``, else it is refused; `describe` records the file and its sha256.
        selfsup_ratio: share of self-supervised training episodes (SSL-ALPNet): a superpixel of a scan is the
            target, support and query are two random views of its slice. 0: supervised only; 1: self-supervised
            only, which also trains on a folder without any label map (then there is no validation or test).
            Any scan of a training patient serves, labelled or not; scans of validation and test patients,
            and of held-out sites, never do. Under setting 2, training slices that show a test or validation
            organ are removed (where a label map says so; unlabelled scans cannot be screened).
        superpixels: settings of the superpixels (`datamodules.transforms.superpixels.DEFAULT_SETTINGS`: ``scale``,
            ``sigma``, ``min_size``, ``threshold``, ``min_pixels``, ``max_fraction``); those not given are the
            defaults scaled to ``spacing`` (`settings_for_spacing`: a superpixel covers the same anatomy at any
            pixel size).
        folds_file: in_domain/cross_organ: a ``folds.json`` of `datamodules.recipes.prepare` (SSL-ALPNet's 5
            folds); a relative path that does not exist from the working directory is looked up under ``root``
            (so ``folds.json`` names the prepared folder's). Needs ``test_fold``.
        test_fold: the fold of ``folds_file`` to test on: its test images and its support image are the test
            patients (``test_fraction`` is then unused); validation is drawn from the other patients with
            ``val_fraction``, the rest train. Both None (the default): a seeded ``test_fraction`` share, as before.
        patient_regex: for NIfTI files, the patient is the first match of this pattern in the path relative to
            ``root`` (its first group, if it has one); default: a BIDS ``sub-<id>``. A file in a Decathlon folder,
            or that the pattern does not match, is its own patient (a warning counts those outside Decathlon
            folders). ``'^([^/]+)/'``: one folder per patient; ``'^([^_]+)_'``: ``<patient>_ct.nii.gz``. DICOM
            series use their PatientID.
        organs: the structures to use, by name (a label map of a hundred structures, of which you want a few);
            every other label value is background to them, and a scan that shows none of them is left out.
            None (default): every structure of the label maps, unnamed values included (as ``label_<value>``).
        val_patients: cross_organ, when validation organs are chosen: the validation patients that must show one,
            and a sign that training validates. None (default): 1 + ``n_query`` with validation episodes, 2
            without. ``imaging-meta evaluate``, which draws no validation episodes, sets the training run's when it
            validated, so that it rebuilds the same split.
    """

    task = "segmentation"

    def __init__(
        self,
        root: str,
        index_path: str | None = None,
        cache_dir: str = ".cache/imaging-meta",
        rescan: bool = False,
        protocol: str = "cross_organ",
        test_organs: list[str] | None = None,
        val_organs: list[str] | None = None,
        val_organ_count: int = 1,
        test_sites: list[str] | None = None,
        exclude_test_organ_slices: bool = True,
        val_fraction: float = 0.15,
        test_fraction: float = 0.25,
        split_seed: int = 0,
        n_shot: int = 1,
        n_query: int = 1,
        n_parts: int = 3,
        episodes_per_epoch: int = 200,
        val_episodes: int = 60,
        test_episodes: int = 200,
        batch_size: int = 4,
        spacing: tuple[float, float] = (4.0, 4.0),
        slice_size: tuple[int, int] = (80, 80),
        ct_window: tuple[float, float] = (-250.0, 250.0),
        mr_percentiles: tuple[float, float] = (1.0, 99.0),
        min_organ_pixels: int = 20,
        augment: bool = True,
        domain_randomisation: bool = False,
        cache: str = "memory",
        num_workers: int = 0,
        seed: int = 0,
        label_names: dict[int, str] | None = None,
        modality: str | None = None,
        site_fields: list[str] | None = None,
        salt: str | None = None,
        test_episodes_file: str | None = None,
        selfsup_ratio: float = 0.0,
        superpixels: dict | None = None,
        folds_file: str | None = None,
        test_fold: int | None = None,
        patient_regex: str = DEFAULT_PATIENT_REGEX,
        organs: list[str] | None = None,
        val_patients: int | None = None,
    ) -> None:
        super().__init__()
        try:
            re.compile(patient_regex)
        except re.error as e:
            raise ValueError(f"patient_regex {patient_regex!r} is not a valid regular expression: {e}") from e
        if modality is not None and str(modality).upper() not in ("CT", "MR"):
            raise ValueError(f"modality must be CT or MR (for volumes whose files do not say), got {modality!r}")
        if (folds_file is None) != (test_fold is None):
            raise ValueError(f"folds_file and test_fold go together (got folds_file={folds_file!r}, test_fold={test_fold!r}): "
                             "set both to test on one fold, or neither for a seeded test_fraction share")
        if not 0.0 <= selfsup_ratio <= 1.0:
            raise ValueError(f"selfsup_ratio must lie in [0, 1], got {selfsup_ratio}")
        if protocol not in PROTOCOLS:
            raise ValueError(f"protocol {protocol!r} is not one of {PROTOCOLS}")
        if cache not in ("memory", "disk", "none"):
            raise ValueError(f"cache must be 'memory', 'disk' or 'none', got {cache!r}")
        for name, value, least in (("n_shot", n_shot, 1), ("n_query", n_query, 1), ("batch_size", batch_size, 1),
                                   ("episodes_per_epoch", episodes_per_epoch, 0), ("val_episodes", val_episodes, 0),
                                   ("test_episodes", test_episodes, 0),
                                   # 0 took every slice for one showing the organ: empty masks (a review, 2026-12-08)
                                   ("min_organ_pixels", min_organ_pixels, 1)):
            if int(value) < least:
                raise ValueError(f"{name} must be at least {least}, got {value}")
        if len(spacing) != 2 or not all(float(v) > 0 for v in spacing):
            raise ValueError(f"spacing is the in-plane voxel size in mm, two numbers above 0; got {list(spacing)}")
        if val_patients is not None and int(val_patients) < MIN_VAL_PATIENTS:
            raise ValueError(f"val_patients must be at least {MIN_VAL_PATIENTS}, got {val_patients}")
        if len(slice_size) != 2 or not all(int(v) >= 1 for v in slice_size):
            raise ValueError(f"slice_size is the slices' height and width in pixels, two numbers of at least 1; got "
                             f"{list(slice_size)}")
        self.save_hyperparameters(ignore=["salt"])
        self.root = str(Path(root).expanduser().resolve())
        self.cache_dir = Path(cache_dir).expanduser()
        self.salt = salt = salt_or_env(salt)  # None: IMAGING_META_SALT, else the public default
        # one index per set of scan settings (the salt among them): a run with other settings (evaluate without
        # the training salt, which it then refuses) scans into its own file instead of over the one in use
        scan_settings = digest([list(site_fields or DEFAULT_SITE_FIELDS), label_names, salt,
                                patient_regex if patient_regex != DEFAULT_PATIENT_REGEX else None])
        self.index_path = (Path(index_path) if index_path
                           else self.cache_dir / digest(self.root) / f"index-{scan_settings[:12]}.json")
        self.index: Index | None = None
        self.cases: list[Case] = []
        self.split: Split | None = None
        self._volumes: Dataset | None = None
        self._tables: dict[str, SliceTable] = {}
        self._pixels: dict[int, dict[str, torch.Tensor]] = {}  # `_organ_pixels`

    # --------------------------------------------------------------- settings
    @property
    def label_free(self) -> bool:
        """Self-supervised training on scans without any label map: no split for ``evaluate`` to protect."""
        return self.cases == [] and self.hparams.selfsup_ratio == 1.0

    @property
    def preprocessing(self) -> dict:
        """The deterministic preprocessing settings (stored in checkpoints; `segment` reuses them)."""
        h = self.hparams
        out = {
            "spacing": [float(s) for s in h.spacing],
            "slice_size": [int(s) for s in h.slice_size],
            "ct_window": [float(s) for s in h.ct_window],
            "mr_percentiles": [float(s) for s in h.mr_percentiles],
        }
        modality = self._modality_for_unknown
        return out if modality is None else out | {"modality": modality}  # only when set: earlier digests hold

    @property
    def _modality_for_unknown(self) -> str | None:
        """``CT`` or ``MR`` for volumes whose files do not say (the ``modality`` setting, upper case), or None."""
        return None if self.hparams.modality is None else str(self.hparams.modality).upper()

    # ------------------------------------------------------------------ setup
    def _scan_key(self) -> str:
        """What the index depends on: every file under ``root`` (path, size, modification time; the cache folder
        left out) and the scan settings (site fields, label names, salt, the readers' version)."""
        # each real folder once, as the scan walks them (`_Scanner.walk`): a link back up (a symbolic-link loop)
        # was walked until the path grew too long, or forever with two of them (a review)
        files = []
        for path in files_under(Path(self.root), skip=[self.cache_dir]):
            try:
                st = os.stat(path)
            except OSError:  # a link to nowhere: the scan names it
                continue
            files.append([os.path.relpath(path, self.root), st.st_size, st.st_mtime_ns])
        h = self.hparams
        settings = [files, list(h.site_fields or DEFAULT_SITE_FIELDS), h.label_names, self.salt, READER_VERSION,
                    SITE_KEY_VERSION, SCAN_VERSION]  # an index of older site keys or naming is scanned again (reviews)
        if h.get("patient_regex", DEFAULT_PATIENT_REGEX) != DEFAULT_PATIENT_REGEX:  # the keys of earlier indexes hold
            settings.append(h.patient_regex)
        return digest(settings)

    def prepare_data(self) -> None:
        """Scan ``root`` into the index file when it is missing, when ``rescan`` is set, or when a file under the
        root or a scan setting changed since it was written (rank 0 only)."""
        if not Path(self.root).is_dir() and (self.hparams.rescan or not self.index_path.exists()):
            raise FileNotFoundError(f"data root {self.root} is not a folder; set data.init_args.root in your config "
                                    "(imaging-meta evaluate: --data-root)")
        key_path = self.index_path.with_name(self.index_path.name + ".key")
        key = self._scan_key() if Path(self.root).is_dir() else None
        stale = (self.index_path.exists() and key is not None and self.hparams.index_path is None
                 and (not key_path.exists() or key_path.read_text().strip() != key))
        if stale:
            logger.warning("the files under %s or the scan settings changed since %s was written: scanning again",
                           self.root, self.index_path)
        if self.hparams.rescan or not self.index_path.exists() or stale:
            logger.info("scanning %s into %s", self.root, self.index_path)
            index = scan_to_file(
                self.root,
                self.index_path,
                site_fields=tuple(self.hparams.site_fields or DEFAULT_SITE_FIELDS),
                label_names=self.hparams.label_names,
                salt=self.salt,
                patient_regex=self.hparams.get("patient_regex", DEFAULT_PATIENT_REGEX),
                skip=[self.cache_dir],  # as the index key leaves it out
            )
            logger.info(index.summary())
            if key is not None:
                with atomic_open(key_path, "w") as f:
                    f.write(key + "\n")

    def setup(self, stage: str | None = None) -> None:
        if self.split is not None:
            return
        self._volumes, self._pixels = None, {}  # of the cases set below (an earlier setup may have failed)
        if not self.index_path.exists():
            self.prepare_data()
        h = self.hparams
        self.index = self._with_modality(Index.load(self.index_path))
        if self.index.rejected:
            warnings.warn(
                f"{len(self.index.rejected)} input(s) under {self.root} were rejected; see 'rejected' in {self.index_path}",
                stacklevel=2,
            )
        scanned_with, wanted = self.index.patient_regex, h.get("patient_regex", DEFAULT_PATIENT_REGEX)
        if scanned_with is None and wanted != DEFAULT_PATIENT_REGEX:  # an index of an earlier version: unknown
            warnings.warn(f"{self.index_path} does not record the patient_regex it was scanned with; set "
                          "data.init_args.rescan: true once for patient_regex to apply", stacklevel=2)
        elif scanned_with is not None and scanned_with != wanted:  # an index given as index_path (the one kept
            # under cache_dir is scanned again when the setting changes)
            raise ValueError(f"{self.index_path} was scanned with patient_regex {scanned_with!r} and the data config "
                             f"says {wanted!r}, so its patients are not the ones asked for: set data.init_args.rescan: "
                             f"true, or scan again (imaging-meta scan --patient-regex '{wanted}')")
        self.cases = self.index.labelled_cases
        if h.get("organs"):
            self.cases = self._only_organs(self.cases, list(h.organs))
        if self.index.own_patient:
            warnings.warn(own_patient_note(self.root, self.index.own_patient), stacklevel=2)
        self._check_index_is_current()
        if not self.cases and h.selfsup_ratio == 1.0:  # unlabelled scans only: self-supervised training, no val/test
            if stage in (None, "fit"):  # Lightning then warns of empty validation and an unmonitored checkpoint
                logger.warning("%s holds no label map: training is self-supervised only, with no validation or test "
                               "episodes, so no best checkpoint is chosen; keep last.ckpt (docs/selfsup.md)", self.root)
            self.split = Split([], [], [], [], [], [], protocol=h.protocol)
            self._setup_stages()
        else:
            if not self.cases and stage not in (None, "fit"):  # test and validate score labelled scans: the advice
                # to train on unlabelled ones misled there (a review)
                raise ValueError(f"no labelled case under {self.root}: {stage} needs label maps paired with the images "
                                 "(a self-supervised checkpoint is evaluated on labelled scans: docs/selfsup.md)")
            # a seed is suggested for a new run only: testing a checkpoint needs the split it trained on
            suggest = stage in (None, "fit") and h.episodes_per_epoch > 0
            try:
                self.split = self._make_split()
            except ValueError as e:
                if not suggest:
                    raise
                self._raise_with_a_working_seed(e)
            try:
                self._setup_stages()
            except Unservable as e:
                self.split = None
                if not suggest:
                    raise
                self._raise_with_a_working_seed(e)
            if suggest and not self._validates and self.split is not None and self.split.val:
                # the split keeps its validation patients when validation is off (a checkpoint's split must not
                # change with val_episodes), so a run that validates on nothing trains on fewer scans than it could
                # (SSL-ALPNet trains on every patient outside the fold; a review): say so, with the fix
                held = len({self.cases[i].patient for i in self.split.val})
                warnings.warn(f"val_episodes is 0, and {held} patient(s) held out for validation (val_fraction "
                              f"{h.val_fraction}) are never used: set data.init_args.val_fraction 0 to train on them",
                              stacklevel=2)
        if h.selfsup_ratio > 0 and h.episodes_per_epoch > 0:  # evaluation draws no training episodes
            self._setup_selfsup()

    def _only_organs(self, cases: list[Case], organs: list[str]) -> list[Case]:
        """``cases`` with only ``organs`` among their structures, those that show none of them left out."""
        known = {o for c in cases for o in c.organs}
        unknown = [o for o in organs if o not in known]
        if unknown:
            raise ValueError(f"organs {unknown} are in no label map under {self.root}; the label maps hold "
                             f"{sorted(known)[:40]}{' ...' if len(known) > 40 else ''} (names from label_names or a "
                             "dataset.json)")
        keep = set(organs)
        kept = [replace(c, organs={o: v for o, v in c.organs.items() if o in keep}) for c in cases]
        return [c for c in kept if c.organs]

    def _with_modality(self, index: Index) -> Index:
        """``index`` with the configured ``modality`` for the volumes whose files do not say; without one, a
        warning that names how many there are and how they are scaled."""
        unknown = [c for c in index.cases if normalise_modality(c.modality) is None]
        if not unknown:
            return index
        given = self._modality_for_unknown
        if given is None:
            warnings.warn(unsaid_modality(len(unknown), str(unknown[0].image), self.root, "data.init_args.modality"),
                          stacklevel=3)
            return index
        index.cases = [replace(c, modality=given) if normalise_modality(c.modality) is None else c for c in index.cases]
        return index

    def _raise_with_a_working_seed(self, error: ValueError) -> NoReturn:
        """Raise ``error`` (a split, or a stage's episodes, that failed), naming a split seed that would serve every
        stage when there is one."""
        seed = self._working_split_seed()
        if seed is None:
            raise error
        raise type(error)(f"{str(error).rstrip('.')}. With these patients, split_seed {seed} puts every test and "
                          f"validation organ in enough patients of its split (set data.init_args.split_seed: {seed}; "
                          "it changes which patients are tested)") from error

    def _working_split_seed(self, tries: int = 200) -> int | None:
        """The first of ``tries`` split seeds whose split shows every test and validation organ (and at least one
        training organ) in n_shot + n_query patients of its stage, on a slice with ``min_organ_pixels`` of it (as
        the samplers count); None when ``split_seed`` already does (the error is about something else), when the
        test patients are fixed (``folds_file``) or when no seed does. Each try reads nothing: the organs' pixels
        per slice are counted once per scan (`_organ_pixels`)."""
        h = self.hparams
        if h.folds_file is not None:
            return None
        need = h.n_shot + h.n_query

        def shown_by(ids: Sequence[int], organ: str) -> int:
            return len(self._patients_showing(ids, organ))

        def works(seed: int) -> bool:
            self.hparams.split_seed = seed
            try:
                split = self._make_split()
            except ValueError:
                return False
            stages = [s for s, n in (("val", h.val_episodes), ("test", h.test_episodes)) if n > 0 and getattr(split, s)]
            return (any(shown_by(split.train, o) >= need for o in split.train_organs)
                    and all(shown_by(getattr(split, s), o) >= need for s in stages for o in getattr(split, f"{s}_organs")))

        given = int(h.split_seed)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the warnings of the splits tried are not the user's
                if works(given):
                    return None
                return next((s for s in range(tries) if s != given and works(s)), None)
        finally:
            self.hparams.split_seed = given

    def _patients_showing(self, ids: Sequence[int], organ: str) -> set[str]:
        """The patients of cases ``ids`` that show ``organ`` on a slice with ``min_organ_pixels`` of it (the
        samplers' rule), from `_organ_pixels`."""
        least = self.hparams.min_organ_pixels
        return {self.cases[i].patient for i in ids
                if organ in self.cases[i].organs and bool((self._organ_pixels(i)[organ] >= least).any())}

    def _organ_pixels(self, i: int) -> dict[str, torch.Tensor]:
        """Case ``i``'s structures: name -> (D,) its pixels on each axial slice of the preprocessed label map;
        counted once per case (the split's choices and the seed search read these, not the volumes)."""
        if i not in self._pixels:
            if self._volumes is None:
                self._volumes = self._volume_dataset()
            label, case = as_plain_tensor(self._volumes[i]["label"])[0], self.cases[i]
            self._pixels[i] = {o: (label == v).flatten(0, 1).sum(0) for o, v in case.organs.items()}
        return self._pixels[i]

    def _make_split(self) -> Split:
        h = self.hparams
        if not self.cases:
            raise ValueError(f"no labelled case under {self.root}; to train on unlabelled scans set "
                             "data.init_args.selfsup_ratio: 1.0 (configs/data/selfsup_segmentation.yaml)")

        def split_choosing_among(val_filter: ValOrganFilter | None) -> Split:
            return make_split(
                self.cases,
                h.protocol,
                test_organs=h.test_organs or (),
                val_organs=h.val_organs,
                val_organ_count=h.val_organ_count,
                test_sites=h.test_sites or (),
                val_fraction=h.val_fraction,
                test_fraction=h.test_fraction,
                seed=h.split_seed,
                exclude_test_organ_slices=h.exclude_test_organ_slices,
                val_organ_filter=val_filter,
                test_images=None if h.folds_file is None else read_fold(self._folds_path(), h.test_fold),
                min_val_patients=self._min_val_patients,
                label_free_training=h.selfsup_ratio == 1.0,
            )

        split = split_choosing_among((lambda train, _val, organs: self._organs_that_keep_training(train, organs))
                                     if h.exclude_test_organ_slices else None)
        if self._validates and h.val_organs is None and split.val_organs and not self._usable_val_organs(
                split.train, split.val, list(split.val_organs)):
            # no chosen validation organ is shown on a slice with min_organ_pixels of it by enough validation
            # patients (its label maps name it on a few voxels): validation could not run, and fit stopped. Only
            # then is the choice made again among those that are, so every split that trained before holds
            split = split_choosing_among(self._usable_val_organs)
        seen = sorted(set(split.val_organs) & set(split.test_organs))
        if split.protocol == "cross_organ" and seen and split.val and h.val_episodes > 0:
            warnings.warn(f"validation episodes use the test organ(s) {seen}: the best checkpoint is chosen on the organs "
                          "it is tested on; set val_organ_count >= 1 (or val_organs outside test_organs)", stacklevel=3)
        return split

    @property
    def _validates(self) -> bool:
        """Whether training draws validation episodes: ``val_episodes`` above 0, or ``val_patients`` given
        (``evaluate``, which draws none, passes the training run's when it validated)."""
        return self.hparams.val_episodes > 0 or self.hparams.get("val_patients") is not None

    @property
    def _min_val_patients(self) -> int:
        """The validation patients a chosen validation organ needs: ``val_patients`` when given (``evaluate``
        passes the training run's); else a one-shot validation episode's (independent of the shots evaluated),
        and without validation episodes `MIN_VAL_PATIENTS`, as before the setting existed, so the splits of earlier
        checkpoints hold."""
        given = self.hparams.get("val_patients")
        if given is not None:
            return int(given)
        return 1 + self.hparams.n_query if self.hparams.val_episodes > 0 else MIN_VAL_PATIENTS

    def _folds_path(self) -> Path:
        """``folds_file`` as given, or under ``root`` when it is relative and not found from the working directory."""
        path = Path(self.hparams.folds_file).expanduser()
        return path if path.is_absolute() or path.exists() else Path(self.root) / path

    def _usable_val_organs(self, train: Sequence[int], val: Sequence[int], candidates: list[str]) -> list[str]:
        """The candidate validation organs that validation episodes can use: shown on a slice with
        ``min_organ_pixels`` of it (the sampler's rule; a label map that names an organ on a few voxels does not
        do) by as many validation patients as `_make_split` asks their label maps to name it in; under setting 2
        also `_organs_that_keep_training`. `_make_split` chooses among these only when its first choice, by the
        label maps, left validation nothing to show."""
        usable = [o for o in candidates if len(self._patients_showing(val, o)) >= self._min_val_patients]
        return self._organs_that_keep_training(train, usable) if self.hparams.exclude_test_organ_slices else usable

    def _organs_that_keep_training(self, train: Sequence[int], candidates: list[str]) -> list[str]:
        """Setting 2: the candidate validation organs whose training slices may be removed, keeping at least
        `MIN_TRAINING_SLICES_KEPT` of the training slices that the test organs leave (a structure shown on
        nearly every axial slice, such as the vertebrae, would leave none)."""
        left, kept = 0, dict.fromkeys(candidates, 0)
        for i in train:
            pixels = self._organ_pixels(i)
            depth = len(next(iter(pixels.values()))) if pixels else 0
            free = torch.ones(depth, dtype=torch.bool)
            for o in self.hparams.test_organs or ():
                if o in pixels:
                    free &= pixels[o] == 0
            left += int(free.sum())
            for o in candidates:
                kept[o] += int((free & (pixels[o] == 0)).sum()) if o in pixels else int(free.sum())
        return [o for o in candidates if kept[o] >= MIN_TRAINING_SLICES_KEPT * left]

    def _setup_stages(self) -> None:
        h = self.hparams
        split = self.split
        assert split is not None  # setup() makes the split first
        if self._volumes is None:
            self._volumes = self._volume_dataset()
        volumes = self._volumes
        used = sorted(set(split.train) | set(split.val) | set(split.test))
        # the first run preprocesses each volume here into the disk cache (seconds each; a review: hundreds of CTs
        # took half an hour without a line), later runs read it back
        if self.hparams.cache == "disk":
            logger.info("reading %d preprocessed volumes from the cache under %s (a volume not there yet is "
                        "preprocessed and written once, seconds each)", len(used), self.cache_dir)
        labels = {i: volumes[i]["label"]
                  for i in progress(used, "volumes (preprocessed once, then cached)", total=len(used), unit="volume")}
        for stage_name, organs, exclude in (
            ("train", split.train_organs, split.excluded_organs),
            ("val", split.val_organs, ()),
            ("test", split.test_organs, ()),
        ):
            ids = getattr(self.split, stage_name)
            self._tables[stage_name] = build_slice_table(
                [labels[i] for i in ids], self.cases, ids, organs, h.min_organ_pixels, exclude
            )
        self._samplers = {}
        episodes = {"train": h.episodes_per_epoch, "val": h.val_episodes, "test": h.test_episodes}
        # each stage's organs with enough patients (the samplers'; for a stage without episodes, as training
        # would have had them, without the warnings: evaluate's report names what the checkpoint trained on)
        # with selfsup_ratio 1 training draws no supervised episode: its structures need not serve one (a review:
        # a run on superpixels alone was refused where the labelled training structures could not)
        label_free = h.selfsup_ratio == 1.0
        self._stage_organs: dict[str, list[str]] = {
            s: self._feasible_organs(s, warn=n > 0 and not (label_free and s == "train"))
            for s, n in episodes.items() if getattr(self.split, s)}
        for stage_name, n in episodes.items():
            if n <= 0 or not getattr(self.split, stage_name) or (label_free and stage_name == "train"):
                continue
            organs = self._stage_organs[stage_name]
            try:
                self._samplers[stage_name] = SegmentationEpisodeSampler(
                    self._tables[stage_name],
                    [c.patient for c in self.cases],
                    organs=organs,
                    n_shot=h.n_shot,
                    n_query=h.n_query,
                    n_episodes=n,
                    n_parts=h.n_parts,
                    seed=h.seed + STAGE_SEED_OFFSET[stage_name],
                )
            except ValueError as e:
                if stage_name != "train" or not split.excluded_organs:
                    raise Unservable(f"{stage_name}: {e}") from e
                raise Unservable(
                    f"train: {e} Under setting 2 (exclude_test_organ_slices: true) the training slices that show "
                    f"{split.excluded_organs} were removed first; where those structures are on most slices, little "
                    "is left: set exclude_test_organ_slices: false (setting 1)."
                ) from e
        self._fix_episodes()

    # ------------------------------------------------------- self-supervision
    def selfsup_cases(self) -> list[Case]:
        """The scans self-supervised episodes may use: every indexed scan, labelled or not, except those of
        validation and test patients and of the sites that cross_site holds out."""
        s, index = self.split, self.index
        assert s is not None and index is not None  # after setup()
        held_patients = s.patients(self.cases, "val") | s.patients(self.cases, "test")
        # every indexed site that test_sites names, unlabelled scans' included: a held-out scanner may also have
        # scans without labels, which only self-supervision would see (a review)
        held_sites = (set(match_sites(self.hparams.test_sites or (), {c.site for c in index.cases}))
                      | {self.cases[i].site for i in s.test}) if s.protocol == "cross_site" else set()
        return [c for c in index.cases if c.patient not in held_patients and c.site not in held_sites]

    def _banned_slices(self) -> dict[str, set[int]]:
        """Setting 2: case id -> slices of training scans that show a held-out organ (from their label maps)."""
        split, volumes = self.split, self._volumes
        assert split is not None and volumes is not None  # after _setup_stages()
        out: dict[str, set[int]] = {}
        for i in split.train:
            banned = slices_showing(as_plain_tensor(volumes[i]["label"])[0], self.cases[i], split.excluded_organs)
            out[self.cases[i].case_id] = set(torch.nonzero(banned).flatten().tolist())
        return out

    def _setup_selfsup(self) -> None:
        from datamodules.sampling.samplers_selfsup import MixedEpisodeSampler, SuperpixelEpisodeSampler
        from datamodules.transforms.superpixels import settings_for_spacing, superpixel_table

        h = self.hparams
        assert self.split is not None  # after _setup_stages()
        self.selfsup_volume_cases = self.selfsup_cases()
        if not self.selfsup_volume_cases:
            index = self.index
            if index is not None and not index.cases:  # nothing was held out: every input was rejected (a review)
                raise ValueError(
                    f"no usable scan under {self.root}: the scan rejected {len(index.rejected)} input(s) "
                    f"({first([f'{x.path}: {x.reason}' for x in index.rejected])}); every rejection is "
                    f"listed under 'rejected' in {self.index_path}")
            raise ValueError(f"no scan under {self.root} is left for self-supervision after holding out the "
                             "validation and test patients; lower val_fraction/test_fraction or add unlabelled scans")
        self._selfsup_volumes = self._superpixel_dataset()
        min_pixels = settings_for_spacing(h.spacing, h.superpixels)["min_pixels"]
        banned = self._banned_slices() if self.split.excluded_organs else {}
        tables: dict[int, dict[int, list[int]]] = {}
        unbanned = 0
        without: list[str] = []  # scans that give no superpixel target: named, not dropped without a word (a review)
        for v, case in enumerate(self.selfsup_volume_cases):
            table = superpixel_table(as_plain_tensor(self._selfsup_volumes[v]["superpixels"])[0], min_pixels)
            unbanned += len(table)
            if not any(len(ids) for ids in table.values()):
                without.append(case.image if isinstance(case.image, str) else os.path.dirname(case.image[0]) or ".")
            skip = banned.get(case.case_id, set())
            tables[v] = {z: ids for z, ids in table.items() if z not in skip}
        if without:
            named = (f"{len(without)} of {len(tables)} self-supervision scan(s) have no superpixel of "
                     f"superpixels.min_pixels={min_pixels} pixels or more, so they give no episode: {first(without)}")
            if len(without) == len(tables):
                raise ValueError(f"{named}; lower superpixels.min_pixels, or check that the images are not empty (the "
                                 "body mask keeps what is brighter than superpixels.threshold)")
            warnings.warn(named, stacklevel=2)
        if unbanned and not any(tables.values()):
            raise ValueError(
                f"setting 2 (exclude_test_organ_slices: true) removed every training slice with superpixels ({unbanned}): "
                f"each shows a held-out organ ({', '.join(sorted(self.split.excluded_organs))}); hold out fewer "
                "organs, or set exclude_test_organ_slices: false (setting 1)")
        selfsup = SuperpixelEpisodeSampler(tables, h.episodes_per_epoch, seed=h.seed + 3)
        supervised = self._samplers.get("train")
        if h.selfsup_ratio == 1.0:
            self._samplers["train"] = selfsup
            return
        if supervised is None:  # selfsup_ratio < 1 (it lies in [0, 1])
            raise ValueError("selfsup_ratio < 1 mixes in supervised episodes, but the training split has none")
        self._samplers["train"] = MixedEpisodeSampler(supervised, selfsup, h.selfsup_ratio, h.episodes_per_epoch, seed=h.seed + 4)

    def _superpixel_dataset(self) -> Dataset:
        """Preprocessed images of the self-supervision scans with their superpixel maps, cached like the
        labelled volumes. Only image paths are read: never a label map."""
        from monai.transforms import Compose

        from datamodules.transforms.superpixels import Superpixelsd, settings_for_spacing

        h = self.hparams
        settings = settings_for_spacing(h.spacing, h.superpixels)
        tf = Compose([*volume_transforms(h.spacing, h.slice_size, h.ct_window, h.mr_percentiles, keys=("image",)).transforms,
                      Superpixelsd(keys=("image",), **{k: v for k, v in settings.items()})])
        index = self.index
        assert index is not None  # after setup()
        items = [{"image": index.resolve(c.image), "modality": c.modality, "case_id": c.case_id}
                 for c in self.selfsup_volume_cases]
        return self._cached(items, tf, f"superpixels-{digest([self.preprocessing, settings, READER_VERSION, PREPROCESSING_VERSION])}")

    def _cached(self, items: list[dict], tf: Any, folder: str) -> Dataset:
        """``items`` through ``tf``, cached as configured: in memory, on disk under ``cache_dir/<root>/folder``, or not."""
        if self.hparams.cache == "memory":
            return memory_cache(items, tf)
        if self.hparams.cache == "disk":
            disk = SliceCache(items, tf, cache_dir=self.cache_dir / digest(self.root) / folder,
                              hash_func=hash_with_file_stamps)
            disk.check_writable()
            return _warmed(disk)
        if folder.startswith("superpixels-"):
            warnings.warn("cache: none with self-supervised episodes computes every scan's superpixels again for each "
                          "episode (seconds a scan); use cache: memory or disk", stacklevel=3)
        return Dataset(items, tf)

    def _feasible_organs(self, stage: str, warn: bool = True) -> list[str]:
        """The stage's organs that enough patients show; the others are dropped with a warning that says why."""
        need = self.hparams.n_shot + self.hparams.n_query
        keep = []
        for organ in getattr(self.split, f"{stage}_organs"):
            n = len({self.cases[c].patient for c in self._tables[stage].get(organ, {})})
            if n >= need:
                keep.append(organ)
            elif warn:
                warnings.warn(
                    f"{stage}: dropping {organ!r}: {n} {stage} patient(s) show it on a slice with at least "
                    f"min_organ_pixels={self.hparams.min_organ_pixels} pixels, an episode needs n_shot + n_query = {need}",
                    stacklevel=3,
                )
        return keep or list(getattr(self.split, f"{stage}_organs"))  # none feasible: the sampler explains

    def _check_index_is_current(self) -> None:
        """Fail early, naming the files, when the index lists files that are gone (the data changed since the scan)."""
        index = self.index
        assert index is not None  # setup() loads it first
        missing = []
        # the unlabelled scans too where self-supervision reads them (a review: a deleted one was called corrupt)
        for c in (index.cases if self.hparams.selfsup_ratio > 0 else self.cases):
            paths = index.resolve(c.image)
            label = [cast(str, index.resolve(c.label))] if c.label else []  # one path in, one path out
            for p in (paths if isinstance(paths, list) else [paths]) + label:
                if not Path(p).is_file():
                    missing.append(p)
        if missing and not Path(self.root).is_dir():  # the data moved: rescanning would not help (a review)
            raise FileNotFoundError(
                f"data root {self.root} is not a folder (the index {self.index_path} lists {len(missing)} file(s) under "
                f"it, e.g. {missing[0]}); set data.init_args.root in your config (imaging-meta evaluate: --data-root)")
        if missing:
            raise FileNotFoundError(
                f"the index {self.index_path} is stale: {len(missing)} indexed file(s) no longer exist, e.g. {missing[0]}; "
                "set data.init_args.rescan: true (or delete the index) to scan the folder again"
            )

    def _volume_dataset(self) -> Dataset:
        """The preprocessed labelled volumes, cached as configured."""
        h = self.hparams
        assert self.index is not None  # setup() loads it first
        tf = volume_transforms(h.spacing, h.slice_size, h.ct_window, h.mr_percentiles)
        # a reader or a preprocessing step that changed rebuilds the cache
        key = digest([self.preprocessing, READER_VERSION, PREPROCESSING_VERSION])
        return self._cached(case_items(self.index, self.cases), tf, f"volumes-{key}")

    def _fixed_episodes(self, stage: str) -> list[SegmentationEpisodeSpec]:
        """Fixed, seeded episodes for val/test; written to JSON (and read back from a given file)."""
        split = self.split
        assert split is not None  # after setup()
        case_ids = [c.case_id for c in self.cases]
        if stage == "test" and self.hparams.test_episodes_file:
            path = Path(self.hparams.test_episodes_file)
            loaded, meta = load_episodes(path, case_ids)
            specs = cast(list[SegmentationEpisodeSpec], loaded)  # a segmentation file: check_segmentation_episodes checks it
            if meta.get("preprocessing") not in (None, self.preprocessing):
                raise ValueError(
                    f"{path} was drawn with preprocessing {meta['preprocessing']}, "
                    f"this run uses {self.preprocessing}; slice indices would not match"
                )
            check_segmentation_episodes(path, specs, self.cases, split, self.hparams.n_shot, self.hparams.n_query,
                                        self._tables.get("test"))
            self.episode_files[stage] = path
            return specs
        specs = self._samplers[stage].fixed_episodes()
        meta = {"stage": stage, "protocol": split.protocol, "seed": self.hparams.seed, "preprocessing": self.preprocessing,
                "organs": getattr(self.split, f"{stage}_organs")}
        self.episode_files[stage] = save_episodes(specs, case_ids, self.episode_path(stage), meta)
        return specs

    def episode_path(self, stage: str) -> Path:
        """The fixed episodes' JSON file, named by a digest of every setting that changes them."""
        h = self.hparams
        key = digest([self.preprocessing, h.protocol, h.test_organs, h.val_organs, h.val_organ_count, h.test_sites,
                      h.split_seed, h.seed, h.n_shot, h.n_query, h.n_parts, h.val_episodes, h.test_episodes, h.min_organ_pixels,
                      h.exclude_test_organ_slices, h.val_fraction, h.test_fraction]
                     + ([{"folds_file": h.folds_file, "test_fold": h.test_fold}] if h.folds_file is not None else [])
                     + ([cases] if (cases := self._case_settings()) else []))
        return self.cache_dir / digest(self.root) / f"{stage}_episodes-{key}.json"

    def _case_settings(self) -> dict:
        """The settings not in `episode_path`'s fixed list that change which cases, sites, case ids or validation
        organs the episodes hold, where they are not the defaults (so that the demo's file names stay): two runs
        that differ only in these, sharing a cache, would otherwise write one file over the other's (``val_patients``
        and label-free training change the split's validation organs, a review, 2026-12-08)."""
        h = self.hparams
        return {k: v for k, v in {"organs": h.organs, "modality": h.modality, "label_names": h.label_names,
                                  "site_fields": h.site_fields, "salt": self.salt if self.salt != DEFAULT_SALT else None,
                                  "patient_regex": h.patient_regex if h.patient_regex != DEFAULT_PATIENT_REGEX else None,
                                  "val_patients": h.get("val_patients"),
                                  "label_free_training": True if h.selfsup_ratio == 1.0 else None,
                                  }.items() if v is not None}

    # ------------------------------------------------------------ dataloaders
    def _episode_dataset(self, augment: bool) -> SegmentationEpisodeDataset:
        h = self.hparams
        aug = slice_augmentation(slice_size=h.slice_size, randomise_domain=h.domain_randomisation) if augment else None
        return SegmentationEpisodeDataset(self._volumes, self.cases, aug)

    def _loader(self, sampler, augment: bool) -> DataLoader:
        h = self.hparams
        return episode_loader(self._episode_dataset(augment), sampler, h.batch_size, h.num_workers)

    def train_dataloader(self) -> DataLoader:
        self._refuse_lightning_sampler()
        self._apply_resume()
        h = self.hparams
        if h.episodes_per_epoch == 0:
            raise ValueError("episodes_per_epoch is 0: fit would draw no training episode; set it to at least 1 "
                             "(0 is for evaluating a checkpoint)")
        if h.selfsup_ratio == 0:
            return self._loader(self._samplers["train"], augment=h.augment)
        from datamodules.sampling.selfsup import SuperpixelEpisodeDataset

        dataset = SuperpixelEpisodeDataset(
            self._selfsup_volumes, [c.case_id for c in self.selfsup_volume_cases],
            [c.site for c in self.selfsup_volume_cases], h.n_shot, h.n_query,
            supervised=self._episode_dataset(h.augment) if h.selfsup_ratio < 1 else None,
        )
        return episode_loader(dataset, self._samplers["train"], h.batch_size, h.num_workers)

    def val_dataloader(self) -> DataLoader | list:
        if not self.cases:  # unlabelled scans only: nothing to validate on
            trainer = getattr(self, "trainer", None)
            if trainer is not None and trainer.state.fn == "validate":  # it reported success, having scored
                self.fixed_episodes("val")  # nothing (a review): raises, naming what to run instead
            return []
        return super().val_dataloader()

    # -------------------------------------------------------------- reporting
    def test_scans(self) -> list[dict[str, Any]]:
        split, index = self.split, self.index
        assert split is not None and index is not None  # after setup()
        organs = set(split.test_organs)
        return [{**item, "organs": {o: v for o, v in c.organs.items() if o in organs}, "patient": c.patient, "site": c.site}
                for c, item in ((self.cases[i], case_items(index, [self.cases[i]])[0]) for i in split.test)]

    def _split_identity(self) -> dict[str, Any]:
        """Who is in each stage (pseudonymous case ids) and which structures each stage targets."""
        s = self.split
        assert s is not None  # after setup()
        return ({k: sorted(self.cases[i].case_id for i in getattr(s, k)) for k in ("train", "val", "test")}
                | {"protocol": s.protocol, "train_organs": s.train_organs, "test_organs": s.test_organs,
                   "excluded_organs": s.excluded_organs})

    def structure_values(self) -> dict[str, list[int]] | None:
        values: dict[str, set[int]] = {}
        for case in self.cases:
            for name, value in case.organs.items():
                values.setdefault(name, set()).add(int(value))
        return {name: sorted(v) for name, v in sorted(values.items())}

    def structure_digest(self) -> str | None:
        return digest({case.case_id: sorted(case.organs.items()) for case in self.cases})

    def _describe(self) -> dict[str, Any]:
        """Split sizes and organs."""
        s = self.split
        assert s is not None  # after setup()
        used = getattr(self, "_stage_organs", {})
        # the organs each stage's episodes draw: those of the split that enough of the stage's patients show
        # (the others were dropped with a warning), and the patients the fixed episodes hold
        dropped = {k: [o for o in getattr(s, f"{k}_organs") if o not in used[k]] for k in used}
        return {
            "protocol": s.protocol,
            "patients": {k: len(s.patients(self.cases, k)) for k in ("train", "val", "test")},
            "episode_patients": {k: len({self.cases[c].patient for e in self._episodes[k] for c, _ in (*e.support, *e.query)})
                                 for k in ("val", "test") if k in self._episodes},
            "cases": {k: len(getattr(s, k)) for k in ("train", "val", "test")},
            "dropped_organs": {k: v for k, v in dropped.items() if v},
            "train_organs": used.get("train", s.train_organs),
            "val_organs": used.get("val", s.val_organs),
            "test_organs": used.get("test", s.test_organs),
            "excluded_organs": s.excluded_organs,
            "train_slices": {o: int(sum(len(z) for z in t.values())) for o, t in self._tables["train"].items()},
            "sites": sorted({self.cases[i].site for i in s.test}),
        }
