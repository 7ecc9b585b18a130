"""Run the benchmarks, print Markdown tables, and save them as ``.md`` and ``.json``.

    python -m benchmarks.run [--data-dir data/demo] [--quick] [--only steps,higher,anil,data,segment] [--threads 1]
                             [--device cpu|cuda] [--out benchmarks/results] [--repeat 10] [--warmup 3]

``steps``: `benchmarks.learner_steps` (every learner config; MAML memory scaling); ``higher``:
`benchmarks.maml_vs_higher`; ``anil``: `benchmarks.anil_vs_maml`; ``data``: `benchmarks.data_path`; ``segment``: `benchmarks.segment_cost`
(``imaging-meta segment`` on a synthetic 512 x 512 x 300 CT, with and without test-time adaptation: slices per
second, peak memory, where the time goes). ``--quick`` shrinks everything to a smoke test whose numbers mean
nothing. The exit status is 1 when a case failed or a meta-gradient check did not pass
(the tables are still written). Never part of ``make test``; ``make bench`` runs this.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

BENCHMARKS = ("steps", "higher", "anil", "data", "segment")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default="data/demo", help="the demo cohort, for the data-path benchmark (default: data/demo)")
    p.add_argument("--quick", action="store_true", help="tiny sizes, 2 timed repetitions: a smoke test")
    p.add_argument("--only", default=",".join(BENCHMARKS), help=f"comma-separated subset of {','.join(BENCHMARKS)}")
    p.add_argument("--threads", type=int, default=1, help="torch threads in every case (default 1)")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when available, else cpu")
    p.add_argument("--out", default="benchmarks/results", help="folder for benchmarks.md and benchmarks.json")
    p.add_argument("--repeat", type=int, default=None, help="timed repetitions per case (default 10; --quick 2)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up repetitions per case (default 3; --quick 1)")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds before one case is stopped (default 900)")
    p.add_argument("--inner-steps", type=int, default=None, help="higher: inner steps (default: maml_cls.yaml's)")
    p.add_argument("--inner-lr", type=float, default=None, help="higher: inner learning rate (default: maml_cls.yaml's)")
    p.add_argument("--no-isolate", action="store_true", help="run cases in this process (debugging; memory figures "
                   "are then not trustworthy)")
    args = p.parse_args(argv)
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    bad = [s for s in only if s not in BENCHMARKS]
    if bad or not only:
        p.error(f"--only takes a comma-separated subset of {','.join(BENCHMARKS)}, got {args.only!r}")
    args.only = only
    if args.threads < 1:
        p.error(f"--threads must be >= 1, got {args.threads}")
    return args


def header(info: dict) -> str:
    """The Markdown header naming the machine and the settings."""
    lines = ["# imaging-meta benchmarks", "",
             f"- machine: {info['cpu']}, {info['cores']} cores ({info['usable_cores']} usable), "
             f"load average at start {info['load_average']}",
             f"- device: {info['device']}" + (f" ({info['gpu']})" if info.get("gpu") else ""),
             f"- torch {info['torch']}, Python {info['python']}, lightning {info['lightning']}, monai {info['monai']}, "
             f"higher {info['higher']}",
             f"- threads: {info['threads']}; timed repetitions {info['repeat']} after {info['warmup']} warm-up"
             + (" (--quick: tiny sizes, the numbers mean nothing)" if info["quick"] else ""),
             f"- date: {info['date']}"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # the worker processes start after this: they read the thread count from the environment too
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(args.threads)
    import torch

    from benchmarks.common import BenchOptions, machine_info, set_threads

    set_threads(args.threads)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: torch sees no CUDA device here", file=sys.stderr)
        return 2
    opts = BenchOptions(
        quick=args.quick, threads=args.threads, device=device, data_dir=args.data_dir,
        repeat=args.repeat if args.repeat is not None else (2 if args.quick else 10),
        warmup=args.warmup if args.warmup is not None else (1 if args.quick else 3),
        isolate=not args.no_isolate, timeout=args.timeout,
    )
    info = machine_info(opts)
    sections = []
    started = time.perf_counter()
    for name in args.only:
        if name == "steps":
            from benchmarks import learner_steps

            sections += learner_steps.run(opts)
        elif name == "higher":
            from benchmarks import maml_vs_higher

            sections += maml_vs_higher.run(opts, inner_steps=args.inner_steps, inner_lr=args.inner_lr)
        elif name == "anil":
            from benchmarks import anil_vs_maml

            sections += anil_vs_maml.run(opts)
        elif name == "segment":
            from benchmarks import segment_cost

            sections += segment_cost.run(opts)
        else:
            from benchmarks import data_path

            sections += data_path.run(opts)
    info["seconds"] = round(time.perf_counter() - started, 1)
    md = "\n\n".join([header(info), *(s.markdown() for s in sections)]) + "\n"
    print(md)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "benchmarks.md").write_text(md)
    (out / "benchmarks.json").write_text(json.dumps({"machine": info, "sections": [s.to_json() for s in sections]},
                                                    indent=1, default=str))
    failures = [f"{s.key}: {f}" for s in sections for f in s.failures]
    print(f"wrote {out / 'benchmarks.md'} and {out / 'benchmarks.json'} ({info['seconds']} s)", file=sys.stderr)
    if failures:
        print(f"{len(failures)} failure(s):\n" + "\n".join(failures), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
