"""What one slice costs from the disk cache (`cache: disk`): MONAI's `PersistentDataset` against `SliceCache`.

    OMP_NUM_THREADS=1 python -m benchmarks.slice_cache_cost [--shape 256 256 300] [--reads 20]

One preprocessed volume (a float32 image and an int16 label of ``--shape``, as the transforms leave them) is
cached by each dataset in a temporary folder; then ``--reads`` slices are read the way an episode reads them
(`datamodules.sampling.slices.SegmentationEpisodeDataset._slice`: index the dataset, take ``[..., z]``), with the
page cache dropped before each read (``posix_fadvise`` ``DONTNEED``) and without. Prints the median wall time of a
slice and the bytes the process read for it (``rchar`` of ``/proc/self/io``; a memory-mapped read counts as
page faults, not ``rchar``, so its figure is the file's header and index only).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from monai.data import PersistentDataset
from monai.transforms import Lambda


def main(argv: list[str] | None = None) -> int:
    from benchmarks.common import bytes_read, drop_from_page_cache
    from datamodules.slice_cache import SliceCache

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", nargs=3, type=int, default=[256, 256, 300])
    ap.add_argument("--reads", type=int, default=20)
    args = ap.parse_args(argv)
    shape = (1, *args.shape)

    def preprocess(item: dict) -> dict:
        g = torch.Generator().manual_seed(item["seed"])
        return {"image": torch.rand(shape, generator=g), "label": (torch.rand(shape, generator=g) * 3).to(torch.int16),
                "case_id": item["case_id"]}

    items = [{"seed": 0, "case_id": "c0"}]
    with tempfile.TemporaryDirectory() as tmp:
        print(f"one volume of {args.shape} (float32 image, int16 label)")
        for name, cls in (("PersistentDataset (whole file per read)", PersistentDataset),
                          ("SliceCache (slice-major, memory-mapped)", SliceCache)):
            folder = Path(tmp) / cls.__name__
            ds = cls(items, Lambda(preprocess), cache_dir=folder)  # a Transform: cached
            ds[0]  # fills the cache
            size = sum(p.stat().st_size for p in folder.rglob("*.pt"))
            for cold in (True, False):
                times, read = [], []
                for i in range(args.reads):
                    z = (i * 37) % shape[-1]
                    if cold:
                        drop_from_page_cache(folder, "*.pt")
                    before, t0 = bytes_read(), time.perf_counter()
                    vol = ds[0]
                    image, label = vol["image"][..., z].float(), vol["label"][..., z] == 1
                    float(image.sum()) + float(label.sum())
                    times.append(time.perf_counter() - t0)
                    read.append(bytes_read() - before)
                print(f"{name}, {'cold' if cold else 'warm'} page cache: {1000 * statistics.median(times):.1f} ms a "
                      f"slice, {statistics.median(read) / 1e6:.2f} MB read (file {size / 1e6:.0f} MB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
