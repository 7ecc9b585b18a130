"""The cost of mapping a probability map back to the query's grid (`datamodules.transforms.volume.to_source_grid`).

    OMP_NUM_THREADS=1 python -m benchmarks.resample_cost [--shape 512 512 300] [--pre 80 80]

A random map on the preprocessed grid (``--pre`` pixels in-plane at 5 mm, the query's slices) is sampled at every
voxel of a ``--shape`` grid at 0.78 x 0.78 x 1.5 mm, as `segment` does: each output slice bilinearly from its one
preprocessed slice (`_resample_slices`, used when the preprocessing kept the slices), and the same with the
general trilinear sampling forced; their CPU time and largest difference.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch


def main(argv: list[str] | None = None) -> int:
    from datamodules.transforms import volume

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", nargs=3, type=int, default=[512, 512, 300])
    ap.add_argument("--pre", nargs=2, type=int, default=[80, 80])
    args = ap.parse_args(argv)
    shape = tuple(args.shape)
    values = torch.rand(*args.pre, shape[2], generator=torch.Generator().manual_seed(0))
    values_affine = np.diag([5.0, 5.0, 1.5, 1.0])
    values_affine[:3, 3] = [-10.0, -10.0, 0.0]
    affine = np.diag([0.78, 0.78, 1.5, 1.0])
    times, maps = {}, {}
    for name, per_slice in (("per slice (bilinear)", True), ("trilinear", False)):
        chosen = volume._slice_to_slice
        if not per_slice:
            volume._slice_to_slice = lambda *a: False
        try:
            t0 = time.process_time()
            maps[name] = volume._resample_affine(values, values_affine, shape, affine, 8)
            times[name] = time.process_time() - t0
        finally:
            volume._slice_to_slice = chosen
    a, b = maps.values()
    for name, t in times.items():
        print(f"{name}: {t:.2f} CPU s")
    print(f"largest difference: {float(np.abs(a - b).max()):.2e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
