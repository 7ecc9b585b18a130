"""The disk cache of preprocessed volumes, readable one slice at a time.

MONAI's ``PersistentDataset`` writes each preprocessed volume with ``torch.save`` and reads the whole file back
for every item. An episode needs a few slices of a volume, so with ``cache: disk`` every slice read the whole
volume: 216 ms for a 256 x 256 x 300 volume with its label, against 0.7 ms for one slice here
(`benchmarks/slice_cache_cost.py`). `SliceCache` stores each volume with its slices (the last axis) as
contiguous blocks and memory-maps the file when reading it back, so slicing a volume reads the pages of that
slice. The values and shapes that a reader sees are unchanged; only the layout in memory differs (a view whose
last axis has the largest stride). Files written before this layout (no ``_LAYOUT`` key) are read as they are.

Memory-mapped reads are private copy-on-write maps: a transform that writes into a loaded tensor never changes
the file. A cache file that cannot be read (cut short, emptied, overwritten) is deleted with a warning naming it,
and its volume is preprocessed again; MONAI's own read recomputes only some of these and stopped on the others.
"""

from __future__ import annotations

import warnings
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
            name = self.hash_func(item_transformed).decode("utf-8") + self.transform_hash
            hashfile = self.cache_dir / f"{name}.pt"
            if hashfile.is_file():
                try:
                    item = torch.load(hashfile, weights_only=self.weights_only, mmap=True)
                except Exception as e:  # cut short, emptied, overwritten: computed again, never used or fatal
                    warnings.warn(f"{hashfile}: unreadable cache file ({type(e).__name__}: {e}); preprocessing "
                                  "its volume again", stacklevel=2)
                    hashfile.unlink(missing_ok=True)
                    item = None
        if item is None:
            item = super()._cachecheck(item_transformed)
        return _restored(item)


def _restored(item: Any) -> Any:
    """A cached item with its slice-major tensors seen as (C, H, W, D) again; other items as they are."""
    if not isinstance(item, dict) or _LAYOUT not in item:
        return item
    keys = item[_LAYOUT]
    return {k: (v.movedim(0, -1) if k in keys else v) for k, v in item.items() if k != _LAYOUT}
