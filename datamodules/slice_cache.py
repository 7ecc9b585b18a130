"""The disk cache of preprocessed volumes, readable one slice at a time.

MONAI's ``PersistentDataset`` writes each preprocessed volume with ``torch.save`` and reads the whole file back
for every item. An episode needs a few slices of a volume, so with ``cache: disk`` every slice read the whole
volume: 216 ms for a 256 x 256 x 300 volume with its label, against 0.7 ms for one slice here
(`benchmarks/slice_cache_cost.py`). `SliceCache` stores each volume with its slices (the last axis) as
contiguous blocks and memory-maps the file when reading it back, so slicing a volume reads the pages of that
slice. The values and shapes that a reader sees are unchanged; only the layout in memory differs (a view whose
last axis has the largest stride). Files written before this layout (no ``_LAYOUT`` key) are read as they are.

Memory-mapped reads are private copy-on-write maps: a transform that writes into a loaded tensor never changes
the file. A cache file whose content cannot be read (cut short, emptied, overwritten) is deleted with a warning
naming it, and its volume is preprocessed again; MONAI's own read recomputes only some of these and stopped on the
others. A cache folder that cannot be written while volumes are missing from it is refused (`check_writable`).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
from monai.data import PersistentDataset

#: the key that marks a cache file written slice-major, with the keys whose tensors were moved.
_LAYOUT = "_slice_major_keys"


def _moved(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and value.ndim >= 3


class SliceCache(PersistentDataset):
    """``PersistentDataset`` whose files a slice can be read from without reading the volume (module docstring).

    Every tensor of three or more dimensions in an item (image, label, superpixels: (C, H, W, D)) is stored as
    (D, C, H, W), contiguous, and read back memory-mapped as a (C, H, W, D) view.
    """

    def cache_file(self, item: Any) -> Path:
        """The cache file of ``item`` (MONAI's name: the item's hash and the transforms' hash)."""
        assert self.cache_dir is not None
        return Path(self.cache_dir) / f"{self.hash_func(item).decode('utf-8')}{self.transform_hash}.pt"

    def check_writable(self) -> None:
        """Refuse a cache folder that cannot be written while some of its volumes are missing: MONAI then skips
        the write without a word (``except PermissionError: pass``) and every episode preprocesses its volume again
        (a review: 0.22 against 1.29 steps a second, in every later run too). A complete cache on read-only
        storage is fine: it is only read.

        Raises:
            PermissionError: naming the folder, how many volumes are missing, and the setting to change.
        """
        if self.cache_dir is None or _can_write_in(Path(self.cache_dir)):
            return
        missing = sum(not self.cache_file(item).is_file() for item in self.data)
        if missing:
            raise PermissionError(
                f"{self.cache_dir}: the disk cache folder cannot be written, and {missing} of {len(self.data)} "
                "preprocessed volumes are not in it: every episode would preprocess its volume again. Give a "
                "writable data.init_args.cache_dir, or fill this cache once from an account that can write it")

    def _pre_transform(self, item_transformed: Any) -> Any:
        out = super()._pre_transform(item_transformed)
        if not isinstance(out, dict):
            return out
        keys = [k for k, v in out.items() if _moved(v)]
        stored = {k: (v.movedim(-1, 0).contiguous() if k in keys else v) for k, v in out.items()}
        stored[_LAYOUT] = keys
        return stored

    def _cachecheck(self, item_transformed: Any) -> Any:
        item = None
        if self.cache_dir is not None:
            hashfile = self.cache_file(item_transformed)
            if hashfile.is_file():
                item = self._read(hashfile)
        if item is None:
            item = super()._cachecheck(item_transformed)
        return _restored(item)

    def _read(self, hashfile: Path) -> Any:
        """A cache file's item, memory-mapped (or read whole: a file in torch's older, not memory-mappable format);
        None after deleting, with a warning, a file that cannot be read (cut short, emptied, overwritten), whose
        volume is then preprocessed again. A file that the system cannot open or map (permissions, memory) is
        an error, never deleted."""
        try:
            return torch.load(hashfile, weights_only=self.weights_only, mmap=True)
        except FileNotFoundError:  # deleted meanwhile (another worker found it damaged): computed again
            return None
        except Exception:  # an older format, a file system that cannot map files, damage: read it whole
            pass
        try:
            return torch.load(hashfile, weights_only=self.weights_only)
        except FileNotFoundError:
            return None
        except (OSError, MemoryError):  # the system's refusal, not the file's content: never deleted
            raise
        except Exception as e:  # the file's content is damaged: computed again, never used or fatal
            first = (str(e).strip().splitlines() or [""])[0][:200]  # torch's messages run to many lines
            warnings.warn(f"{hashfile}: unreadable cache file ({type(e).__name__}: {first}); preprocessing its "
                          "volume again", stacklevel=1)
            hashfile.unlink(missing_ok=True)
            return None


def _can_write_in(folder: Path) -> bool:
    """Whether a file can be created in ``folder``, by creating one (``os.access`` misjudges network file systems
    with root squashing, and ACLs)."""
    import tempfile

    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-check-"):
            return True
    except OSError:
        return False


def _restored(item: Any) -> Any:
    """A cached item with its slice-major tensors seen as (C, H, W, D) again; other items as they are."""
    if not isinstance(item, dict) or _LAYOUT not in item:
        return item
    keys = item[_LAYOUT]
    return {k: (v.movedim(0, -1) if k in keys else v) for k, v in item.items() if k != _LAYOUT}
