"""The cost of `imaging-meta classify`, with and without ``--explain``, on synthetic PNG folders.

    OMP_NUM_THREADS=1 python -m benchmarks.classify_cost --checkpoint CKPT [--shots 1 20] [--queries 500]
                                                         [--explain-queries 20] [--size 256]

Five classes of seeded synthetic grey PNGs (``--size`` pixels square; a noisy background and a disc whose
brightness and radius depend on the class) are written to a temporary folder: a support folder with ``--shots``
images per class, and a query folder. Each run is the real command in a fresh process (a user's command starts
cold), ``imaging-meta classify --checkpoint CKPT --support ... --query ... --out ...`` and the same with
``--explain`` on ``--explain-queries`` of the queries. Reported: the command's wall time and its CPU time (user +
system, of the child process), per shot count. The accuracy is not the point.
"""

from __future__ import annotations

import argparse
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

N_CLASSES = 5


def write_folders(root: Path, shots: int, queries: int, size: int, seed: int = 0) -> tuple[Path, Path]:
    """``root/support/class<c>/s<i>.png`` (``shots`` per class) and ``root/queries/q<i>.png`` (classes in turn)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size] / size

    def image(c: int) -> Image.Image:
        base = 80 + 20 * c + rng.normal(0, 10, (size, size))
        cx, cy = rng.uniform(0.3, 0.7, 2)
        base[(xx - cx) ** 2 + (yy - cy) ** 2 < (0.1 + 0.05 * c) ** 2] += 60
        return Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))

    support, query = root / "support", root / "queries"
    for c in range(N_CLASSES):
        (support / f"class{c}").mkdir(parents=True, exist_ok=True)
        for i in range(shots):
            image(c).save(support / f"class{c}" / f"s{i:03d}.png")
    query.mkdir(parents=True, exist_ok=True)
    for i in range(queries):
        image(i % N_CLASSES).save(query / f"q{i:05d}.png")
    return support, query


def run(args: list[str]) -> dict:
    """One fresh ``imaging-meta classify`` process: wall and CPU seconds."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "imaging_meta", "classify", "--quiet", *args],
                          capture_output=True, text=True)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode:
        raise RuntimeError(f"classify failed ({proc.returncode}): {proc.stderr[-2000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"wall_s": round(wall, 1), "cpu_s": round(cpu, 1)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", required=True, help="a classification checkpoint (imaging-meta fit)")
    ap.add_argument("--shots", nargs="*", type=int, default=[1, 20])
    ap.add_argument("--queries", type=int, default=500)
    ap.add_argument("--explain-queries", type=int, default=20)
    ap.add_argument("--size", type=int, default=256)
    args = ap.parse_args(argv)
    print("| support images per class | queries | command | wall (s) | CPU (s) |")
    print("|---|---|---|---|---|")
    for shots in args.shots:
        with tempfile.TemporaryDirectory() as tmp:
            support, query = write_folders(Path(tmp), shots, args.queries, args.size)
            base = ["--checkpoint", args.checkpoint, "--support", str(support)]
            plain = run([*base, "--query", str(query), "--out", f"{tmp}/plain/preds.csv"])
            few = Path(tmp) / "few"
            few.mkdir()
            for f in sorted(query.iterdir())[: args.explain_queries]:
                shutil.copy(f, few / f.name)
            explained = run([*base, "--query", str(few), "--out", f"{tmp}/explain/preds.csv", "--explain"])
            for n, name, r in ((args.queries, "classify", plain), (args.explain_queries, "classify --explain", explained)):
                print(f"| {shots} | {n} | `{name}` | {r['wall_s']} | {r['cpu_s']} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
