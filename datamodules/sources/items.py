"""Classification items: the contract between the three input formats and the episode machinery.

Every input format a user has (a folder per class of 2D images, a lesion CSV over 3D volumes, MedMNIST
``.npz`` files) becomes an `ItemTable` through an `ItemSource`: the deterministic preprocessing (reading,
cropping, resampling, intensity scaling) is done once, and the table is cached. Samplers see only
``labels``, ``patients`` and ``sites``; datasets index ``images``.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import unicodedata
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from datamodules.io.atomic import atomic_open


def class_name(raw: str) -> str:
    """A class name as every source and the class lists read it: stripped and in Unicode NFC. A folder unzipped
    from a macOS archive names ``métastase`` in NFD, which looks the same as the config's NFC spelling and was
    either "not in the data" or a second class (a review)."""
    return unicodedata.normalize("NFC", raw.strip())


@dataclass
class ItemTable:
    """Preprocessed classification items.

    Attributes:
        images: (N, C, *spatial) float32 tensor, every item the same shape.
        labels: (N,) int64 array, ``classes[labels[i]]`` is item ``i``'s class.
        classes: class names.
        patients: pseudonymous patient of each item (support and query never share one).
        sites: site key of each item (scanner vendor/model/institution token, or the source's name).
        item_ids: pseudonymous id of each item (e.g. ``<case id>#lesion3``); never a file name with PHI.
        source: how the table was made (format, settings); goes into reports and cache keys.
    """

    images: torch.Tensor
    labels: np.ndarray
    classes: list[str]
    patients: list[str]
    sites: list[str]
    item_ids: list[str]
    source: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.labels = np.asarray(self.labels, dtype=np.int64)
        n = len(self.labels)
        for name in ("images", "patients", "sites", "item_ids"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"ItemTable: {name} has {len(getattr(self, name))} entries, labels has {n}")
        if n and (self.labels.min() < 0 or self.labels.max() >= len(self.classes)):
            raise ValueError(f"ItemTable: labels must lie in [0, {len(self.classes)}), got [{self.labels.min()}, {self.labels.max()}]")
        if len(set(self.classes)) != len(self.classes):
            raise ValueError(f"ItemTable: class names repeat: {sorted(c for c, k in Counter(self.classes).items() if k > 1)}")
        # item by item in blocks: a mask of the whole table was a quarter of its size again, at its peak
        bad_rows = [i + int(j) for i in range(0, n, 256)
                    for j in torch.nonzero(~torch.isfinite(self.images[i : i + 256].flatten(1)).all(1)).flatten()]
        if bad_rows:
            raise ValueError(f"ItemTable: items {[self.item_ids[i] for i in bad_rows[:5]]} hold NaN or Inf values")

    def __len__(self) -> int:
        return len(self.labels)

    def class_counts(self) -> dict[str, int]:
        counts = np.bincount(self.labels, minlength=len(self.classes))
        return {c: int(k) for c, k in zip(self.classes, counts, strict=True)}

    def save(self, path: str | os.PathLike) -> None:
        """Write the table atomically (a ``torch.save`` of tensors, lists and strings: loads with weights_only)."""
        with atomic_open(path, "wb") as f:
            torch.save(
                {
                    "images": self.images,
                    "labels": torch.from_numpy(self.labels),
                    "classes": list(self.classes),
                    "patients": list(self.patients),
                    "sites": list(self.sites),
                    "item_ids": list(self.item_ids),
                    "source": json.dumps(self.source, default=str),
                },
                f,
            )

    @classmethod
    def load(cls, path: str | os.PathLike) -> ItemTable:
        d = torch.load(path, map_location="cpu", weights_only=True)
        return cls(
            images=d["images"],
            labels=d["labels"].numpy(),
            classes=d["classes"],
            patients=d["patients"],
            sites=d["sites"],
            item_ids=d["item_ids"],
            source=json.loads(d["source"]),
        )


#: item tables of one source and settings kept besides the current one, the newest first (`ItemSource.load`)
KEEP_OTHER_TABLES = 1


def _code_versions() -> dict[str, int]:
    """The versions of the volume readers, the preprocessing and the site keys, which item tables depend on (lesion
    patches are cut with the volume readers; DICOM images get their site keys): a table built by older code is
    built again, as the volume caches are (a review, 2026-12-07: an upgrade kept the old patches and sites)."""
    from datamodules.indexing.pseudonyms import SITE_KEY_VERSION
    from datamodules.transforms.volume import PREPROCESSING_VERSION, READER_VERSION

    # "sites": 2, image folders merge site keys that differ only in case (SIEMENS, Siemens), as the volume index does
    return {"reader": READER_VERSION, "preprocessing": PREPROCESSING_VERSION, "site_keys": SITE_KEY_VERSION, "sites": 2}


class ItemSource:
    """One input format. Subclasses take their settings as typed ``__init__`` arguments (LightningCLI
    ``class_path``/``init_args``) and implement `build`.

    Errors name the file and what is wrong; nothing is skipped silently (a source that drops bad inputs
    says so with ``warnings.warn`` and lists them in ``source["rejected"]``).
    """

    #: folders the source does not read (real paths), such as the datamodule's cache folder when it lies inside
    #: the data folder (`skip_folders`); not a setting, so it is not part of the cache key or the config
    _skip: tuple[str, ...] = ()

    def build(self) -> ItemTable:
        """Read and preprocess every item (none from the folders of `skip_folders`)."""
        raise NotImplementedError

    def skip_folders(self, folders: Sequence[str | os.PathLike]) -> None:
        """Leave ``folders`` unread: a lesion table's scan of its root opened every cached table and episode file
        of a cache folder inside it and rejected each as no image (a review)."""
        self._skip = tuple(os.path.realpath(f) for f in folders)

    def settings(self) -> dict[str, Any]:
        """Everything that changes the table (paths, sizes, windows...): the cache key. Default: the
        instance's public attributes."""
        s = {"class": f"{type(self).__module__}.{type(self).__qualname__}",
             **{k: v for k, v in vars(self).items() if not k.startswith("_")}}
        salt = getattr(self, "_salt", None)  # pseudonymising sources keep their salt private; a new one invalidates the cache
        if salt is not None:
            s["salt_digest"] = hashlib.sha256(str(salt).encode()).hexdigest()[:8]
        return s

    def preprocessing(self) -> dict[str, Any]:
        """What a new image needs to be prepared like the table's items (sizes, channels, windows), without
        input paths or secrets: stored in checkpoints and used by ``imaging-meta classify``. Default: `settings`."""
        return self.settings()

    def config(self) -> dict[str, Any]:
        """``{"class_path", "init_args"}`` that rebuilds this source, read from the attributes named like its
        ``__init__`` arguments; the salt (a secret) is left out. Checkpoints store it, so that
        ``imaging-meta evaluate`` can rebuild the data a model was trained on."""
        args: dict[str, Any] = {}
        for name, p in list(inspect.signature(type(self).__init__).parameters.items())[1:]:
            if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) or name == "salt":
                continue
            if hasattr(self, name):
                value = getattr(self, name)
                args[name] = str(value) if isinstance(value, os.PathLike) else (list(value) if isinstance(value, tuple) else value)
            elif p.default is inspect.Parameter.empty:
                raise ValueError(f"{type(self).__name__} keeps no attribute {name!r}; it cannot describe its own config")
        return {"class_path": f"{type(self).__module__}.{type(self).__qualname__}", "init_args": args}

    def files(self) -> list[Path]:
        """Input files whose size and modification time invalidate the cache."""
        return []

    def check_prepared_files(self, recorded: dict[str, str], where: str | Path) -> None:
        """Refuse input files that differ from those an episode file ``where`` recorded (``recorded``: its
        ``files_md5``, file stem -> MD5); sources that record none check nothing."""

    def settings_key(self) -> str:
        """A digest of `settings` and the code versions alone: the tables of one source and settings share it,
        whatever the files."""
        blob = json.dumps({"settings": self.settings(), "code": _code_versions()}, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def cache_key(self) -> str:
        stamp: list[tuple[str, int | None, int | None]] = []
        for f in self.files():
            try:
                st = Path(f).stat()
            except FileNotFoundError:  # a link to nothing: `build` names it (it ended as a bare error here; a review)
                stamp.append((str(f), None, None))
                continue
            stamp.append((str(f), st.st_size, st.st_mtime_ns))
        blob = json.dumps({"settings": self.settings(), "files": stamp, "code": _code_versions()}, sort_keys=True,
                          default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def load(self, cache_dir: str | os.PathLike | None = None) -> ItemTable:
        """`build`, or the cached table under ``cache_dir`` when the settings and input files are unchanged.

        A table is named ``items-<settings key>-<cache key>.pt``; once a new one is written, the tables of the same
        source and settings for earlier states of its files are removed but the newest other one (each is the size
        of the whole table: a folder of 100k images at 224 x 224 left a 19 GB file each time one image changed; a
        review, 2026-12-06). The one kept serves a second machine that shares the cache folder but holds its own
        copy of the data (other modification times); a table removed by another run as it was found is built
        again."""
        if cache_dir is None:
            return self.build()
        folder, settings = Path(cache_dir), self.settings_key()
        path = folder / f"items-{settings}-{self.cache_key()}.pt"
        if path.exists():
            try:
                return ItemTable.load(path)
            except FileNotFoundError:  # removed by another run between the check and the read
                pass
        table = self.build()
        table.save(path)
        others = []
        for p in folder.glob(f"items-{settings}-*.pt"):
            try:
                others.append((p.stat().st_mtime_ns, p))
            except FileNotFoundError:
                continue
        for _, stale in sorted((o for o in others if o[1] != path), reverse=True)[KEEP_OTHER_TABLES:]:
            stale.unlink(missing_ok=True)
        return table
