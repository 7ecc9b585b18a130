"""Shared pieces of the benchmarks: options, timing, peak memory, process isolation, tables, synthetic episodes.

Everything here is plain Python and torch; the benchmark modules (`benchmarks.learner_steps`,
`benchmarks.maml_vs_higher`, `benchmarks.data_path`) build their cases from it, and `benchmarks.run` prints
and saves what they return.

Peak memory is measured in a fresh process per case (see `run_isolated`), over the timed steps, after the
warm-up steps: on CUDA it is ``torch.cuda.max_memory_allocated`` above what is allocated when the timed steps
begin; on CPU it is the rise of the process's peak resident set (Linux ``VmHWM``, reset to the current RSS
through ``/proc/self/clear_refs``) over its RSS when the timed steps begin, after ``gc.collect()`` and glibc's
``malloc_trim(0)`` have handed the memory the warm-up freed back to the system (without that, memory freed
by the warm-up stays resident and a later step reusing it shows no rise). The warm-up keeps one-time costs
(autograd worker threads, library initialisation: about 20 MiB on CPU) out of the figure; with ``--warmup
0`` they are in it. Where the reset of VmHWM is not allowed, the rise of ``getrusage(RUSAGE_SELF).ru_maxrss``
is used instead, which can only under-count (its mark may already sit above the baseline).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import importlib
import inspect
import math
import multiprocessing as mp
import os
import platform
import re
import resource
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
MODEL_CONFIGS = REPO / "configs" / "model"
DATA_CONFIGS = REPO / "configs" / "data"

#: modules the worker server imports once, so that each isolated case starts without paying for imports
PRELOAD = ("benchmarks._preload", "benchmarks.learner_steps", "benchmarks.maml_vs_higher", "benchmarks.data_path")


# ------------------------------------------------------------------------------------------ options
@dataclass
class BenchOptions:
    """What every benchmark is given.

    Attributes:
        quick: tiny sizes and one or two repetitions (a smoke test, numbers meaningless).
        threads: torch intra-op threads in every case.
        device: ``cpu`` or ``cuda``.
        data_dir: the demo cohort (DICOM and NIfTI files, ``lesions.csv``) for the data-path benchmark.
        repeat: timed repetitions per case (the median is reported).
        warmup: untimed repetitions before them.
        isolate: run each case in a fresh process (needed for honest peak memory); off only for debugging.
        timeout: seconds before an isolated case is stopped and reported as failed.
    """

    quick: bool = False
    threads: int = 1
    device: str = "cpu"
    data_dir: str = "data/demo"
    repeat: int = 10
    warmup: int = 3
    isolate: bool = True
    timeout: float = 900.0


@dataclass
class Section:
    """One printed table: a title, lines saying what was measured and how, the table, and the raw data."""

    key: str
    title: str
    notes: list[str]
    headers: list[str]
    rows: list[list[Any]]
    data: list[dict] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    def markdown(self) -> str:
        parts = [f"### {self.title}", ""]
        parts += [f"{n}" for n in self.notes]
        if self.notes:
            parts.append("")
        parts.append(markdown_table(self.headers, self.rows))
        if self.failures:
            parts += ["", "Failed cases:", *[f"- {f}" for f in self.failures]]
        return "\n".join(parts)

    def to_json(self) -> dict:
        return asdict(self)


# ------------------------------------------------------------------------------------------- tables
def fmt(value: Any, digits: int = 3) -> str:
    """A table cell: floats to ``digits`` significant digits (no exponent below 1e6), None as "n/a"."""
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if math.isnan(value):
            return "n/a"
        if value == 0:
            return "0"
        mag = math.floor(math.log10(abs(value)))
        if mag >= 6 or mag < -4:
            return f"{value:.{digits - 1}e}"
        decimals = max(digits - 1 - mag, 0)
        return f"{value:.{decimals}f}"
    return str(value)


def config_pair_main(
    argv: list[str] | None, description: str, configs: Sequence[str], sizes: Sequence[int],
    measure: Callable[[int, list[str], int, int], list[list]], headers: Sequence[str],
) -> int:
    """The command line of a script that times two forms of each config's step, round-robin in one process
    (`benchmarks.two_pass_queries`, `benchmarks.memory_format`): ``--sizes``, ``--configs``, ``--repeat``,
    ``--warmup``, ``--threads``; prints ``measure(size, configs, repeat, warmup)``'s rows of every size as one
    table with ``headers``."""
    import argparse

    import torch

    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--sizes", nargs="*", type=int, default=list(sizes))
    ap.add_argument("--configs", nargs="*", default=list(configs))
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = [row for size in args.sizes for row in measure(size, args.configs, args.repeat, args.warmup)]
    print(markdown_table(list(headers), rows))
    return 0


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub Markdown table; cells go through `fmt`, ``|`` in a cell is escaped.

    Args:
        headers: column titles.
        rows: one sequence of cells per row, each as long as ``headers``.

    Raises:
        ValueError: if a row's length differs from the headers'.
    """
    cells = [[fmt(c).replace("|", "\\|") for c in row] for row in rows]
    for i, row in enumerate(cells):
        if len(row) != len(headers):
            raise ValueError(f"row {i} has {len(row)} cells, the table has {len(headers)} columns: {row}")
    widths = [max([len(h), *(len(r[j]) for r in cells)]) for j, h in enumerate(headers)]
    numeric = [all(_is_number(r[j]) for r in cells) and bool(cells) for j in range(len(headers))]

    def line(row: Sequence[str]) -> str:
        return "| " + " | ".join(c.rjust(w) if num else c.ljust(w) for c, w, num in zip(row, widths, numeric, strict=True)) + " |"

    rule = "|" + "|".join(("-" * (w + 1) + ":") if num else ("-" * (w + 2)) for w, num in zip(widths, numeric, strict=True)) + "|"
    return "\n".join([line(list(headers)), rule, *(line(r) for r in cells)])


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return text == "n/a"
    return True


# ------------------------------------------------------------------------------------------- timing
def time_calls(fn: Callable[[], Any], repeat: int, warmup: int = 0, sync: Callable[[], None] | None = None) -> list[float]:
    """Wall-clock seconds of ``repeat`` calls of ``fn`` after ``warmup`` untimed ones.

    Args:
        fn: the work to time.
        repeat: timed calls (>= 1).
        warmup: untimed calls first (allocations, autotuning, lazy initialisation).
        sync: called before reading the clock (e.g. ``torch.cuda.synchronize``).
    """
    if repeat < 1 or warmup < 0:
        raise ValueError(f"repeat must be >= 1 and warmup >= 0, got {repeat}, {warmup}")
    sync = sync or (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return times


def summarize(times: Sequence[float]) -> dict[str, float]:
    """Median, min, max and interquartile range of ``times`` (seconds), in milliseconds."""
    if not times:
        raise ValueError("no times to summarize")
    ms = sorted(1000.0 * t for t in times)
    if len(ms) >= 4:
        q = statistics.quantiles(ms, n=4)
        iqr = q[2] - q[0]
    else:
        iqr = ms[-1] - ms[0]
    return {"median_ms": statistics.median(ms), "min_ms": ms[0], "max_ms": ms[-1], "iqr_ms": iqr, "n": len(ms)}


def sync_for(device: str) -> Callable[[], None]:
    if str(device).startswith("cuda"):
        return torch.cuda.synchronize
    return lambda: None


# ------------------------------------------------------------------------------------------- memory
def _status_kib(name: str) -> int | None:
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    m = re.search(rf"^{name}:\s+(\d+)\s+kB", text, re.MULTILINE)
    return int(m.group(1)) if m else None


def _maxrss_kib() -> int:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r // 1024 if platform.system() == "Darwin" else r  # bytes on macOS, KiB on Linux


def release_freed_memory() -> None:
    """Collect garbage and hand freed heap memory back to the system (glibc ``malloc_trim``; else nothing)."""
    gc.collect()
    name = ctypes.util.find_library("c")
    if name and platform.system() == "Linux":
        try:
            ctypes.CDLL(name).malloc_trim(0)
        except (OSError, AttributeError):
            pass  # not glibc (musl): nothing to trim with


class PeakMemory:
    """Peak memory of the work inside the ``with`` block, above what was in use when it began.

    ``peak_mib`` and ``method`` are set on exit (see the module docstring for the methods). On CPU, entering
    first releases freed heap memory (`release_freed_memory`), so that the baseline holds only live memory.
    """

    def __init__(self, device: str = "cpu") -> None:
        self.device = str(device)
        self.peak_mib: float | None = None
        self.method = ""

    def __enter__(self) -> PeakMemory:
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._base = torch.cuda.memory_allocated()
            self.method = "cuda.max_memory_allocated - allocated after the warm-up"
            return self
        release_freed_memory()
        self._base = _status_kib("VmRSS")
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current RSS
            ok = self._base is not None and _status_kib("VmHWM") is not None
        except OSError:
            ok = False
        if ok:
            self._base = _status_kib("VmRSS")
            self.method = "peak RSS (VmHWM, reset after the warm-up) - RSS after the warm-up (freed memory trimmed)"
        else:
            self._base = _maxrss_kib()
            self.method = "ru_maxrss rise (may under-count: the reset of VmHWM is not allowed here)"
        return self

    def __exit__(self, *exc) -> None:
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            self.peak_mib = (torch.cuda.max_memory_allocated() - self._base) / 2**20
        elif self.method.startswith("peak RSS"):
            self.peak_mib = (_status_kib("VmHWM") - self._base) / 1024
        else:
            self.peak_mib = (_maxrss_kib() - self._base) / 1024


def memory_method(device: str) -> str:
    """The sentence that goes into table notes about how peak memory was measured on ``device``."""
    if str(device).startswith("cuda"):
        return ("Peak memory: `torch.cuda.max_memory_allocated` over the timed steps minus the memory allocated after "
                "the warm-up, in a fresh process per case.")
    return (
        "Peak memory: the rise of the process's peak resident set over the timed steps (Linux VmHWM, reset through "
        "/proc/self/clear_refs after the warm-up) above its RSS at that moment (after gc and glibc malloc_trim "
        "returned what the warm-up freed), in a fresh process per case forked from a server that has only imported "
        "modules. The model, the optimizer state and the episode are in the baseline; activations, the autograd "
        "graph and gradients are in the peak. One-time initialisation (~20 MiB on CPU) is left out by the warm-up."
    )


# ---------------------------------------------------------------------------------------- isolation
_CONTEXT = None


def _context():
    global _CONTEXT
    if _CONTEXT is None:
        methods = mp.get_all_start_methods()
        if "forkserver" in methods:
            ctx = mp.get_context("forkserver")
            ctx.set_forkserver_preload(list(PRELOAD))
        else:  # no forkserver (Windows): a fresh interpreter per case
            ctx = mp.get_context("spawn")
        _CONTEXT = ctx
    return _CONTEXT


def set_threads(threads: int) -> None:
    """``threads`` intra-op threads (and one inter-op thread where that can still be set)."""
    torch.set_num_threads(int(threads))
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass  # already set in this process: it can be set once only


def _resolve(path: str) -> Callable:
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


def _isolated_main(conn, fn_path: str, kwargs: dict, threads: int) -> None:
    try:
        set_threads(threads)
        result = _resolve(fn_path)(**kwargs)
        conn.send(("ok", result))
    except BaseException:  # noqa: BLE001 - the parent reports it
        conn.send(("error", traceback.format_exc()))
    finally:
        conn.close()


class CaseError(RuntimeError):
    """A benchmark case failed (its traceback is the message)."""


def run_isolated(fn: Callable[..., dict], kwargs: dict, opts: BenchOptions) -> dict:
    """``fn(**kwargs)`` in a fresh process (``opts.isolate``) or here; its result must pickle.

    Raises:
        CaseError: the case raised, died or ran past ``opts.timeout`` (the message says which).
    """
    if not opts.isolate:
        try:
            return fn(**kwargs)
        except Exception as e:
            raise CaseError(traceback.format_exc()) from e
    ctx = _context()
    receive, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_isolated_main, args=(send, f"{fn.__module__}:{fn.__qualname__}", kwargs, opts.threads))
    proc.start()
    send.close()
    try:
        if not receive.poll(opts.timeout):
            proc.kill()
            raise CaseError(f"{fn.__qualname__}({kwargs}) ran past --timeout {opts.timeout:.0f} s and was stopped")
        try:
            status, value = receive.recv()
        except EOFError:
            proc.join()
            raise CaseError(f"{fn.__qualname__}({kwargs}) died with exit code {proc.exitcode} (out of memory?)") from None
    finally:
        receive.close()
        proc.join()
    if status != "ok":
        raise CaseError(value)
    return value


def log(msg: str) -> None:
    """Progress on stderr (the tables go to stdout)."""
    print(msg, file=sys.stderr, flush=True)


def try_case(fn: Callable[..., dict], kwargs: dict, opts: BenchOptions, label: str, failures: list[str],
             tag: str) -> dict | None:
    """`run_isolated`, where a failing case is logged as ``[tag] label: FAILED ...``, added to ``failures``,
    and gives None, so that one broken case never stops a benchmark run."""
    try:
        return run_isolated(fn, kwargs, opts)
    except CaseError as e:
        failures.append(f"{label}: {short_error(e)}")
        log(f"[{tag}] {label}: FAILED {short_error(e)}")
        return None


def short_error(err: BaseException) -> str:
    """The last line of a case's traceback."""
    lines = [ln for ln in str(err).strip().splitlines() if ln.strip()]
    return lines[-1] if lines else type(err).__name__


# ------------------------------------------------------------------------------------------ configs
def model_configs() -> list[Path]:
    """Every learner config under ``configs/model``, sorted by name."""
    return sorted(MODEL_CONFIGS.glob("*.yaml"))


def load_yaml(path: str | Path) -> dict:
    with open(path) as f:
        return yaml.safe_load(f)


def learner_class(class_path: str) -> type:
    module, _, name = class_path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def accepts(cls: type, name: str) -> bool:
    """Whether ``cls.__init__`` takes an argument ``name`` (used to detect optional features)."""
    try:
        return name in inspect.signature(cls.__init__).parameters
    except (TypeError, ValueError):
        return False


def build_from_config(path: str | Path, overrides: dict | None = None, device: str = "cpu", seed: int = 0):
    """The learner and its optimizer from a model config, with ``overrides`` of its ``init_args``.

    Overrides whose name the learner does not take are dropped (``n_way`` for learners without a head),
    except those in ``overrides["_required"]``.

    Returns:
        ``(learner, optimizer, init_args)``.
    """
    from imaging_meta.learners.base import build_learner, keep_channels_last_on_cpu

    cfg = load_yaml(path)["model"]
    lcfg = cfg["learner"]
    cls = learner_class(lcfg["class_path"])
    init = dict(lcfg.get("init_args") or {})
    overrides = dict(overrides or {})
    required = set(overrides.pop("_required", ()))
    for k, v in overrides.items():
        if k == "backbone_kwargs" and accepts(cls, k):  # learners without a network take none
            init[k] = {**(init.get(k) or {}), **v}
        elif k in required or accepts(cls, k):
            init[k] = v
    torch.manual_seed(seed)
    learner = build_learner({"class_path": lcfg["class_path"], "init_args": init}).to(device)
    keep_channels_last_on_cpu(learner, device)  # as `imaging-meta fit` and `load_learner` do
    ocfg = cfg.get("optimizer") or {"class_path": "torch.optim.Adam", "init_args": {"lr": 1e-3}}
    opt_cls = learner_class(ocfg["class_path"])
    params = [p for p in learner.parameters() if p.requires_grad]
    optimizer = opt_cls(params, **(ocfg.get("init_args") or {}))
    return learner, optimizer, init


# ------------------------------------------------------------------------------------------ episodes
def classification_episode(tasks: int, n_way: int, n_shot: int, n_query: int, size: int, channels: int = 1,
                           seed: int = 0, device: str = "cpu"):
    """A batched random classification `Episode`: (T, N*K, C, S, S) support, (T, N*Q, C, S, S) query.

    Each task names ``n_way`` distinct classes out of a pool of 20 (learners that pre-train on class names
    need them); labels are way indices in ``[0, n_way)``.
    """
    from imaging_meta.episode import Episode, collate_episodes

    g = torch.Generator().manual_seed(seed)
    eps = []
    for t in range(tasks):
        chosen = torch.randperm(20, generator=g)[:n_way]
        ys = torch.arange(n_way).repeat_interleave(n_shot)
        yq = torch.arange(n_way).repeat_interleave(n_query)
        eps.append(Episode(
            support_images=torch.randn(len(ys), channels, size, size, generator=g),
            support_labels=ys,
            query_images=torch.randn(len(yq), channels, size, size, generator=g),
            query_labels=yq,
            classes=[f"class{int(c)}" for c in chosen],
            site="synthetic",
            support_ids=[f"s{t}-{i}" for i in range(len(ys))],
            query_ids=[f"q{t}-{i}" for i in range(len(yq))],
        ))
    return collate_episodes(eps).to(device)


def segmentation_episode(tasks: int, n_shot: int, n_query: int, size: int, seed: int = 0, device: str = "cpu"):
    """A batched random segmentation `Episode`: (T, K, 1, S, S) images and (T, K, S, S) masks (a bright ellipse)."""
    from imaging_meta.episode import Episode, collate_episodes

    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")

    def item():
        cy, cx = (0.5 * torch.rand(2, generator=g) - 0.25).tolist()
        ry, rx = (0.25 + 0.2 * torch.rand(2, generator=g)).tolist()
        mask = ((((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2) <= 1).float()
        return (0.3 * torch.randn(size, size, generator=g) + mask).unsqueeze(0), mask

    eps = []
    for t in range(tasks):
        s = [item() for _ in range(n_shot)]
        q = [item() for _ in range(n_query)]
        eps.append(Episode(
            support_images=torch.stack([i for i, _ in s]), support_labels=torch.stack([m for _, m in s]),
            query_images=torch.stack([i for i, _ in q]), query_labels=torch.stack([m for _, m in q]),
            classes=[f"organ{t % 3}"], site="synthetic",
            support_ids=[f"s{t}-{i}" for i in range(n_shot)], query_ids=[f"q{t}-{i}" for i in range(n_query)],
        ))
    return collate_episodes(eps).to(device)


# ------------------------------------------------------------------------------------------ machine
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(opts: BenchOptions) -> dict[str, Any]:
    """What the numbers were taken on."""
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    info: dict[str, Any] = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "usable_cores": usable,
        "load_average": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": opts.threads,
        "device": opts.device,
        "gpu": torch.cuda.get_device_name(0) if opts.device.startswith("cuda") and torch.cuda.is_available() else None,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "quick": opts.quick,
        "repeat": opts.repeat,
        "warmup": opts.warmup,
    }
    try:
        import higher

        info["higher"] = getattr(higher, "__version__", None) or _dist_version("higher")
    except ImportError:
        info["higher"] = None
    for name in ("lightning", "monai"):
        info[name] = _dist_version(name)
    return info


def _dist_version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


def bytes_read() -> int:
    """The bytes this process's read calls have returned so far (``rchar`` of ``/proc/self/io``, cached or not)."""
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("rchar"))


def drop_from_page_cache(folder: str | os.PathLike, pattern: str) -> None:
    """Ask the kernel to drop the files ``folder/**/pattern`` from its page cache (``posix_fadvise DONTNEED``,
    which needs no privileges): the next read of them comes from the disk."""
    from pathlib import Path

    for p in Path(folder).rglob(pattern):
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
