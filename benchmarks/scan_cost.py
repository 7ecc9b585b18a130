"""What indexing a folder of DICOM series costs (`datamodules.indexing.scan.scan_folder`, as `fit` and `scan` run it).

    OMP_NUM_THREADS=1 python -m benchmarks.scan_cost [--slices 300] [--size 512] [--repeat 3]

Writes one CT series of ``--slices`` slices of ``--size``² int16 pixels into a temporary folder, then indexes it
``--repeat`` times, each after asking the kernel to drop the files from its page cache (``posix_fadvise``
``DONTNEED``, which needs no privileges), and again with the pixel data read whole (`read_header` without
deferral, as before 2026-12-06). Prints the wall time and the bytes that the process read (``rchar`` of
``/proc/self/io``: every byte a read call returned, cached or not).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np


def _write_series(folder: Path, slices: int, size: int) -> None:
    from datamodules.synthetic.demo import write_dicom_series

    rng = np.random.default_rng(0)
    affine = np.diag([-0.78, -0.78, 1.5, 1.0])
    header = {"PatientID": "BENCH01", "PatientName": "Bench^Scan", "Manufacturer": "ACME"}
    volume = rng.integers(-1000, 1500, (size, size, slices)).astype(np.float64)
    write_dicom_series(volume, affine, folder / "patient01" / "ct", header=header, rng=rng)


def main(argv: list[str] | None = None) -> int:
    from benchmarks.common import bytes_read, drop_from_page_cache
    from datamodules.indexing.scan import scan_folder
    from datamodules.io import dicom_files

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--slices", type=int, default=300)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        _write_series(root, args.slices, args.size)
        total = sum(p.stat().st_size for p in root.rglob("*.dcm"))
        print(f"{args.slices} slices of {args.size}x{args.size}, {total / 1e6:.1f} MB on disk")
        deferred = dicom_files.HEADER_DEFER_BYTES
        for name, defer in (("header only (pixel data deferred)", deferred), ("pixel data read", 1 << 40)):
            dicom_files.HEADER_DEFER_BYTES = defer
            times, read = [], []
            try:
                for _ in range(args.repeat):
                    drop_from_page_cache(root, "*.dcm")
                    before, t0 = bytes_read(), time.perf_counter()
                    index = scan_folder(root)
                    times.append(time.perf_counter() - t0)
                    read.append(bytes_read() - before)
                    assert len(index.cases) == 1, index.rejected
            finally:
                dicom_files.HEADER_DEFER_BYTES = deferred
            print(f"{name}: {statistics.median(times):.2f} s (median of {args.repeat}), {max(read) / 1e6:.1f} MB read")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
