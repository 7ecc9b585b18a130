"""The cost of the user's job: `imaging-meta segment` on a whole CT-sized scan, and where the time goes.

    OMP_NUM_THREADS=1 python -m benchmarks.segment_cost [--quick] [--shape 512 512 300] [--presets demo,fine]
                                                        [--adapt-steps 10] [--repeat 3] [--device cpu|cuda]

A synthetic CT (int16 Hounsfield units: a body, a spine, lungs at the top, a liver and the structure, label 1,
on a third of the slices; 0.78 x 0.78 x 1 mm, so 512 x 512 x 300 spans 400 x 400 x 300 mm) is written as NIfTI
to a temporary folder twice, a labelled support scan and the query (another anatomy); nothing is downloaded.
The checkpoint is ``configs/model/protonet_seg.yaml``'s learner, untrained (seeded; the masks are meaningless,
the cost is a trained one's), saved as `imaging-meta fit` saves it, with a data config's preprocessing:
``demo`` (``demo_segmentation.yaml``: 4.5 mm, 80 x 80 slices) or ``fine`` (``synapse_ct_setting1.yaml``:
1.5 mm, 256 x 256, SSL-ALPNet's slices; it needs far more time and memory, so only on request).

Each run is the real command, ``imaging-meta segment --checkpoint ... --support-image ... --support-label ...
--label-value 1 --query ... --modality CT --device ... --adapt-steps N --scale S`` (`imaging_meta.commands.cli.cli_main`:
so `imaging_meta.commands.segment.segment` and `imaging_meta.volume.segmenter.ScanSegmenter`): the model as trained
(``--scale checkpoint --adapt-steps 0``), with ``--adapt-steps`` (`imaging_meta.adaptation`), and segment's default
recipe (``--scale structure --adapt-steps 40``; not with ``--quick``), each in a fresh process (a user's command starts cold: no warm-up),
the runs of the cases interleaved. Reported: the command's wall and CPU time, query slices per second (the
query's axial slices over the command, and over the segmenter's query prediction alone), the process's peak
resident set (Linux VmHWM) and its rise, and with ``--device cuda`` ``torch.cuda.max_memory_allocated``.

Where the time goes: timers around the command's parts (exclusive wall and CPU time; on CUDA every boundary
synchronises): loading and preprocessing (read, orient, resample, window), the encoder's forward passes
(support and query slices apart: the support slices once per query, through `Learner.fit_support`, or
again for every chunk of query slices for a learner without it), the learner's prototypes and similarities, the scan segmenter's fit and its evidence fusion on the
query, test-time adaptation (superpixels, episodes, steps), post-processing (inverse resampling to the query
grid, largest component, writing the mask); and each part's peak resident set (VmHWM, reset at every
boundary) and CUDA allocation.

``--quick``: 128 x 128 x 40 scans (the same field of view), 2 adaptation steps, one run: a smoke test whose
numbers mean nothing. `benchmarks.run` (``make bench``) runs the ``demo`` preset.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import resource
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import (
    DATA_CONFIGS,
    MODEL_CONFIGS,
    BenchOptions,
    Section,
    _status_kib,
    load_yaml,
    log,
    machine_info,
    release_freed_memory,
    set_threads,
    try_case,
)

CT_SHAPE = (512, 512, 300)
CT_SPACING = (0.78125, 0.78125, 1.0)  # mm: a 400 mm field of view, 300 mm of z
QUICK_SHAPE = (128, 128, 40)
PRESETS = {"demo": "demo_segmentation.yaml", "fine": "synapse_ct_setting1.yaml"}
ADAPT_STEPS = 10
REPEAT = 3  # whole commands per case (each minutes long at 512 x 512 x 300); the per-chunk medians use every chunk


# ------------------------------------------------------------------------------------------- the data
def synthetic_ct(shape: tuple[int, int, int], spacing: tuple[float, float, float], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A CT-like volume (int16 HU) and its label map (uint8: 1 the structure, 2 the liver), both (X, Y, Z)."""
    rng = np.random.default_rng(seed)
    nx, ny, nz = shape
    x = ((np.arange(nx) - nx / 2) * spacing[0]).astype(np.float32)[:, None]
    y = ((np.arange(ny) - ny / 2) * spacing[1]).astype(np.float32)[None, :]
    zs = (np.arange(nz) - nz / 2) * spacing[2]
    jitter = rng.uniform(-6, 6, size=4)
    body = (x / (170 + jitter[0])) ** 2 + (y / (120 + jitter[1])) ** 2 <= 1
    fat = body & ((x / 155) ** 2 + (y / 105) ** 2 > 1)
    spine = (x**2 + (y + 80) ** 2) <= 15**2
    image = np.empty(shape, dtype=np.int16)
    label = np.zeros(shape, dtype=np.uint8)
    for k, z in enumerate(zs):
        hu = np.full((nx, ny), -1000.0, dtype=np.float32)
        hu[body] = 40.0
        hu[fat] = -100.0
        hu[spine] = 450.0
        if z > 90:  # lungs at the top
            for side in (-1, 1):
                hu[((x - side * 75) / 55) ** 2 + (y / 70) ** 2 <= 1] = -850.0
        liver = ((x - 60) / 80) ** 2 + (y / 70) ** 2 + ((z - 20) / 80) ** 2 <= 1
        organ = ((x + 80 + jitter[2]) / 30) ** 2 + ((y + 40 + jitter[3]) / 45) ** 2 + (z / 50) ** 2 <= 1
        hu[liver] = 65.0
        hu[organ] = 50.0
        label[..., k][liver] = 2
        label[..., k][organ] = 1
        hu += rng.standard_normal((nx, ny), dtype=np.float32) * 15.0
        image[..., k] = np.clip(hu, -1024, 3071).astype(np.int16)
    return image, label


def write_scans(folder: Path, shape: tuple[int, int, int]) -> dict[str, Path]:
    """The support image, its label map and the query image as NIfTI (gzip) in ``folder``."""
    import nibabel as nib

    scale = CT_SHAPE[0] / shape[0], CT_SHAPE[1] / shape[1], CT_SHAPE[2] / shape[2]
    spacing = tuple(s * f for s, f in zip(CT_SPACING, scale, strict=True))
    affine = np.diag([spacing[0], spacing[1], spacing[2], 1.0])
    out = {}
    for name, seed in (("support", 1), ("query", 2)):
        image, label = synthetic_ct(shape, spacing, seed)
        out[name] = folder / f"{name}.nii.gz"
        nib.save(nib.Nifti1Image(image, affine), str(out[name]))
        if name == "support":
            out["support_label"] = folder / "support_label.nii.gz"
            nib.save(nib.Nifti1Image(label, affine), str(out["support_label"]))
    return out


def preprocessing(preset: str) -> dict:
    """The preprocessing settings of a data config, as a checkpoint stores them."""
    init = load_yaml(DATA_CONFIGS / PRESETS[preset])["data"]["init_args"]
    return {"spacing": [float(s) for s in init["spacing"]], "slice_size": [int(s) for s in init["slice_size"]],
            "ct_window": [float(v) for v in init["ct_window"]], "mr_percentiles": [float(v) for v in init["mr_percentiles"]]}


def write_checkpoint(path: Path, preset: str) -> Path:
    """``protonet_seg.yaml``'s learner, untrained and seeded, as `imaging-meta fit` saves it, with ``preset``'s
    preprocessing."""
    from imaging_meta.learners.base import build_learner
    from imaging_meta.module import EpisodicModule

    torch.manual_seed(0)
    learner = build_learner(load_yaml(MODEL_CONFIGS / "protonet_seg.yaml")["model"]["learner"])
    module = EpisodicModule(learner, baselines=False)
    ckpt = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(ckpt)
    ckpt["imaging_meta"]["preprocessing"] = preprocessing(preset)
    torch.save(ckpt, path)
    return path


# ------------------------------------------------------------------------------------------ the timers
class Watermarks:
    """Peak memory since the last `reset`: the process's resident set (Linux VmHWM, reset through
    ``/proc/self/clear_refs``) and, with ``cuda``, ``torch.cuda.max_memory_allocated``; in MiB."""

    def __init__(self, cuda: bool = False) -> None:
        self.cuda = cuda
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.rss = _status_kib("VmHWM") is not None
        except OSError:
            self.rss = False  # no per-stage RSS peaks here; the command's peak is still read at the end

    def read(self) -> tuple[float | None, float | None]:
        rss = _status_kib("VmHWM") / 1024 if self.rss else None
        return rss, (torch.cuda.max_memory_allocated() / 2**20 if self.cuda else None)

    def reset(self) -> None:
        if self.rss:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()


def _max(a: float | None, b: float | None) -> float | None:
    return b if a is None else a if b is None else max(a, b)


@dataclass
class _Frame:
    """A stage being timed: its start (wall and CPU), its children's times, its peaks so far."""

    name: str
    wall: float
    cpu: float
    child_wall: float = 0.0
    child_cpu: float = 0.0
    rss: float | None = None
    cuda: float | None = None


class StageTimer:
    """Exclusive wall and CPU time per named stage (a stage's time excludes the stages timed inside it), and
    with ``marks`` the peak memory during each stage, inclusive of the stages inside it.

    ``sync`` runs at every boundary (``torch.cuda.synchronize`` on CUDA, so that queued kernels are charged to
    the stage that launched them). ``calls[name]`` keeps each call's inclusive wall seconds; ``peak_rss[name]``
    and ``peak_cuda[name]`` the highest peak of its calls (MiB); `overall` the highest peaks seen at all. CPU
    time is the process's (every thread), so it is less sensitive than wall time to other jobs on the machine.
    """

    def __init__(self, sync: Callable[[], None] = lambda: None, marks: Watermarks | None = None) -> None:
        self.sync, self.marks = sync, marks
        self.exclusive: dict[str, float] = defaultdict(float)
        self.exclusive_cpu: dict[str, float] = defaultdict(float)
        self.calls: dict[str, list[float]] = defaultdict(list)
        self.peak_rss: dict[str, float] = {}
        self.peak_cuda: dict[str, float] = {}
        self._seen: list[float | None] = [None, None]  # highest (RSS, CUDA) read so far
        self._stack: list[_Frame] = []

    def _read(self) -> tuple[float | None, float | None]:
        rss, cuda = self.marks.read()
        self._seen = [_max(self._seen[0], rss), _max(self._seen[1], cuda)]
        return rss, cuda

    def overall(self) -> tuple[float | None, float | None]:
        """The highest (RSS, CUDA) peaks since the timer was made, in MiB (None: not measured)."""
        if self.marks is not None:
            self._read()
        return self._seen[0], self._seen[1]

    def begin(self, name: str) -> None:
        self.sync()
        if self.marks is not None:  # the parent's peak so far, then a fresh mark for this stage
            rss, cuda = self._read()
            if self._stack:
                self._stack[-1].rss, self._stack[-1].cuda = _max(self._stack[-1].rss, rss), _max(self._stack[-1].cuda, cuda)
            self.marks.reset()
        self._stack.append(_Frame(name, time.perf_counter(), time.process_time()))

    def end(self) -> None:
        self.sync()
        f = self._stack.pop()
        wall, cpu = time.perf_counter() - f.wall, time.process_time() - f.cpu
        self.exclusive[f.name] += wall - f.child_wall
        self.exclusive_cpu[f.name] += cpu - f.child_cpu
        self.calls[f.name].append(wall)
        if self.marks is not None:
            now = self._read()
            f.rss, f.cuda = _max(f.rss, now[0]), _max(f.cuda, now[1])
            for peaks, value in ((self.peak_rss, f.rss), (self.peak_cuda, f.cuda)):
                if value is not None:
                    peaks[f.name] = max(peaks.get(f.name, 0.0), value)
        if self._stack:
            parent = self._stack[-1]
            parent.child_wall += wall
            parent.child_cpu += cpu
            parent.rss, parent.cuda = _max(parent.rss, f.rss), _max(parent.cuda, f.cuda)

    def inside(self, name: str) -> bool:
        return any(frame.name == name for frame in self._stack)

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        self.begin(name)
        try:
            yield
        finally:
            self.end()

    def wrap(self, fn: Callable, name: str) -> Callable:
        def timed(*args, **kwargs):
            with self.stage(name):
                return fn(*args, **kwargs)

        return timed


class _TimedTransform:
    """A MONAI ``Compose`` whose calls are timed; ``transforms`` (which `segment` inverts) is the original's."""

    def __init__(self, compose, timer: StageTimer, name: str) -> None:
        self._compose, self._timer, self._name = compose, timer, name

    def __call__(self, data):
        with self._timer.stage(self._name):
            return self._compose(data)

    def __getattr__(self, attr):
        return getattr(self._compose, attr)


LOAD = "load + preprocess (read NIfTI, orient, resample, CT window)"
ENC_SUPPORT = "encoder forward: support slices (once a query, or again for every chunk without fit_support)"
ENC_QUERY = "encoder forward: query slices"
ENC_FIT = "encoder forward: support fit (leave-one-out, negative slices)"
LEARNER = "learner: prototypes, similarities, upsampling"
FIT = "scan segmenter fit: intensity model, fusion, threshold, gate"
FUSION = "evidence fusion on the query: intensity, fusion, gate, z smoothing"
ADAPT_SP = "test-time adaptation: superpixels of every slice"
ADAPT_EP = "test-time adaptation: drawing and augmenting episodes"
ADAPT = "test-time adaptation: training steps (loss, backward, Adam)"
INVERT = "post: inverse resampling to the query grid"
COMPONENT = "post: 3D connected components (the largest, or all for a structure in parts)"
WRITE = "post: writing the NIfTI mask"
CHECKS = "support checks (re-read the label map)"
CKPT = "loading the checkpoint"
OTHER = "other (command line, logging, copies)"
STAGES = (CKPT, LOAD, CHECKS, ADAPT_SP, ADAPT_EP, ADAPT, ENC_FIT, ENC_SUPPORT, ENC_QUERY, LEARNER, FIT, FUSION, INVERT,
          COMPONENT, WRITE, OTHER)
PREDICT = "scan segmenter predict (inclusive)"  # for slices per second, not a stage of its own
CHUNK = "learner predict of one query chunk (inclusive)"


def _hook_encoder(learner: torch.nn.Module, timer: StageTimer, chunk_calls: list[int]) -> None:
    """Time the learner's encoder (ProtoNet-seg's ``encoder``, else its `encoder_name`): support slices are the
    first encoder call of each ``predict`` or ``fit_support``, query slices the later ones; inside adaptation it is not timed apart."""
    encoder = getattr(learner, "encoder", None)
    if encoder is None and learner.encoder_name():
        encoder = learner.get_submodule(learner.encoder_name())
    if encoder is None:
        return

    def pre(module, args):
        if timer.inside(ADAPT):
            return
        timer.begin(ENC_FIT if timer.inside(FIT) else ENC_SUPPORT if chunk_calls[0] == 0 else ENC_QUERY)
        chunk_calls[0] += 1

    def post(module, args, output):
        if not timer.inside(ADAPT):
            timer.end()

    encoder.register_forward_pre_hook(pre)
    encoder.register_forward_hook(post)


@contextlib.contextmanager
def instrumented(timer: StageTimer) -> Iterator[None]:
    """Timers around the parts of `imaging_meta.commands.segment.segment` (patched, then restored)."""
    import imaging_meta.adaptation as adaptation
    import imaging_meta.commands.segment as seg
    from imaging_meta.volume.segmenter import ScanSegmenter

    chunk_calls = [0]
    patches: list[tuple[object, str, object]] = []

    def patch(owner, attr, value) -> None:
        patches.append((owner, attr, getattr(owner, attr)))
        setattr(owner, attr, value)

    transforms = seg.volume_transforms
    patch(seg, "volume_transforms", lambda *a, **k: _TimedTransform(transforms(*a, **k), timer, LOAD))
    segmenter = seg._segmenter

    def load(*a, **k):
        with timer.stage(CKPT):
            learner, pre = segmenter(*a, **k)
        _hook_encoder(learner, timer, chunk_calls)
        predict = type(learner).predict

        def timed_predict(self, episode):
            chunk_calls[0] = 0
            t0 = time.perf_counter()
            with timer.stage(LEARNER):
                out = predict(self, episode)
            if timer.inside(FUSION):
                timer.calls[CHUNK].append(time.perf_counter() - t0)
            return out

        fit_support, predict_fitted = type(learner).fit_support, type(learner).predict_fitted

        def timed_fit_support(self, episode):  # the support's encoder pass, once for a query's chunks
            chunk_calls[0] = 0
            with timer.stage(LEARNER):
                return fit_support(self, episode)

        def timed_predict_fitted(self, fitted, query_images):
            chunk_calls[0] = 1  # its encoder pass is the query's
            t0 = time.perf_counter()
            with timer.stage(LEARNER):
                out = predict_fitted(self, fitted, query_images)
            if timer.inside(FUSION):
                timer.calls[CHUNK].append(time.perf_counter() - t0)
            return out

        patch(type(learner), "predict", timed_predict)
        patch(type(learner), "fit_support", timed_fit_support)
        patch(type(learner), "predict_fitted", timed_predict_fitted)
        return learner, pre

    patch(seg, "_segmenter", load)
    patch(seg, "check_label_source", timer.wrap(seg.check_label_source, CHECKS))
    patch(seg, "keep_components", timer.wrap(seg.keep_components, COMPONENT))
    patch(seg, "save_nifti", timer.wrap(seg.save_nifti, WRITE))
    patch(seg, "to_source_grid", timer.wrap(seg.to_source_grid, INVERT))
    patch(ScanSegmenter, "fit", timer.wrap(ScanSegmenter.fit, FIT))
    scan_predict = ScanSegmenter.predict

    def timed_scan_predict(self, volume, slices=None):
        with timer.stage(FUSION):
            t0 = time.perf_counter()
            out = scan_predict(self, volume, slices)
            timer.calls[PREDICT].append(time.perf_counter() - t0)
            return out

    patch(ScanSegmenter, "predict", timed_scan_predict)
    patch(adaptation, "adapt", timer.wrap(adaptation.adapt, ADAPT))
    episodes = adaptation.AdaptationEpisodes
    patch(episodes, "__init__", timer.wrap(episodes.__init__, ADAPT_SP))
    patch(episodes, "batch", timer.wrap(episodes.batch, ADAPT_EP))
    try:
        yield
    finally:
        for owner, attr, value in reversed(patches):
            setattr(owner, attr, value)


# ------------------------------------------------------------------------------------------- one case
def segment_case(scans: dict, checkpoint: str, out_dir: str, adapt_steps: int, device: str,
                 scale: str = "checkpoint") -> dict:
    """One `imaging-meta segment` command, timed, in this process (run it in a fresh one).

    Returns:
        ``{"rc", "seconds", "cpu_seconds", "stages": {stage: wall seconds}, "stages_cpu": {stage: CPU seconds},
        "stage_rss_mib", "stage_cuda_mib",
        "predict_s", "chunk_ms", "query_slices", "peak_rss_mib", "rss_rise_mib", "cuda_peak_mib"}``;
        ``chunk_ms``: each query chunk's learner predict; peaks in MiB (CUDA: above what was allocated before).
    """
    import nibabel as nib

    from imaging_meta.commands.cli import cli_main

    cuda = device.startswith("cuda")
    argv = ["segment", "--checkpoint", checkpoint, "--support-image", str(scans["support"]), "--support-label",
            str(scans["support_label"]), "--label-value", "1", "--query", str(scans["query"]), "--out", out_dir,
            "--modality", "CT", "--device", device, "--adapt-steps", str(adapt_steps), "--scale", scale]
    if cuda:
        torch.cuda.init()
    release_freed_memory()
    rss_base = (_status_kib("VmRSS") or 0) / 1024
    cuda_base = torch.cuda.memory_allocated() / 2**20 if cuda else 0.0
    timer = StageTimer(torch.cuda.synchronize if cuda else (lambda: None), Watermarks(cuda))
    timer.marks.reset()
    with instrumented(timer), contextlib.redirect_stdout(io.StringIO()):  # the command's "wrote ..." lines
        c0, t0 = time.process_time(), time.perf_counter()
        rc = cli_main(argv)
        seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
    stages, stages_cpu = dict(timer.exclusive), dict(timer.exclusive_cpu)
    stages[OTHER] = seconds - sum(stages.values())
    stages_cpu[OTHER] = cpu_seconds - sum(stages_cpu.values())
    peak_rss, peak_cuda = timer.overall()
    if peak_rss is None:  # no VmHWM reset here: the process's lifetime peak
        peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "rc": rc,
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "stages": stages,
        "stages_cpu": stages_cpu,
        "stage_rss_mib": dict(timer.peak_rss),
        "stage_cuda_mib": {k: v - cuda_base for k, v in timer.peak_cuda.items()},
        "predict_s": sum(timer.calls[PREDICT]),
        "chunk_ms": [1000 * t for t in timer.calls[CHUNK]],
        "query_slices": int(nib.load(str(scans["query"])).shape[2]),
        "peak_rss_mib": peak_rss,
        "rss_rise_mib": peak_rss - rss_base,
        "cuda_peak_mib": peak_cuda - cuda_base if cuda else None,
    }


# ------------------------------------------------------------------------------------------- the tables
def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def _summary(label: str, runs: list[dict]) -> list:
    """One row of the cost table: medians over the runs of a case (peaks: the highest)."""
    seconds = _median([r["seconds"] for r in runs])
    slices = runs[0]["query_slices"]
    predict = _median([r["predict_s"] for r in runs])
    chunks = [t for r in runs for t in r["chunk_ms"]]
    cuda = [r["cuda_peak_mib"] for r in runs if r["cuda_peak_mib"] is not None]
    return [label, len(runs), seconds, _median([r["cpu_seconds"] for r in runs]), slices / seconds,
            slices / predict if predict else None, _median(chunks), len(chunks),
            max(r["peak_rss_mib"] for r in runs), max(r["rss_rise_mib"] for r in runs), max(cuda) if cuda else None]


def _breakdown(labels: list[str], results: list[list[dict]], cuda: bool) -> list[list]:
    """Rows: each stage's median wall and CPU seconds, its share of the command (of the CPU time; on CUDA of the
    wall time) and its peak memory, one column group per case."""
    share_of = ("seconds", "stages") if cuda else ("cpu_seconds", "stages_cpu")
    rows = []
    for stage in STAGES:
        row, seen = [stage], False
        for runs in results:
            wall = _median([r["stages"].get(stage, 0.0) for r in runs])
            cpu = _median([r["stages_cpu"].get(stage, 0.0) for r in runs])
            share = _median([r[share_of[1]].get(stage, 0.0) / r[share_of[0]] for r in runs])
            seen |= wall > 0.0005
            row += [wall, cpu, 100.0 * share, max((r["stage_rss_mib"].get(stage, 0.0) for r in runs), default=0.0) or None]
            if cuda:
                row.append(max((r["stage_cuda_mib"].get(stage, 0.0) for r in runs), default=0.0) or None)
        if seen:
            rows.append(row)
    total = ["total (the command)"]
    for runs in results:
        total += [_median([r["seconds"] for r in runs]), _median([r["cpu_seconds"] for r in runs]), 100.0,
                  max(r["peak_rss_mib"] for r in runs)]
        if cuda:
            total.append(max(r["cuda_peak_mib"] for r in runs))
    return rows + [total]


def run(opts: BenchOptions, presets: tuple[str, ...] = ("demo",), adapt_steps: int = ADAPT_STEPS,
        shape: tuple[int, int, int] | None = None, repeat: int | None = None) -> list[Section]:
    """The cost table and the breakdown table (`benchmarks.run`'s ``segment``). The runs of the cases are
    interleaved (run 1 of every case, then run 2, ...), so that a change in the machine's load falls on all."""
    # segment's default recipe: --scale structure with these adaptation steps
    from imaging_meta.adaptation import DEFAULT_STEPS

    shape = shape or (QUICK_SHAPE if opts.quick else CT_SHAPE)
    repeat = repeat or (1 if opts.quick else min(opts.repeat, REPEAT))
    steps = min(adapt_steps, 2) if opts.quick else adapt_steps
    failures: list[str] = []
    with tempfile.TemporaryDirectory(prefix="segment_cost_") as tmp:
        folder = Path(tmp)
        t0 = time.perf_counter()
        scans = write_scans(folder, shape)
        log(f"[segment] wrote a {shape[0]}x{shape[1]}x{shape[2]} support, label map and query in {time.perf_counter() - t0:.1f} s")
        cases = []
        for preset in presets:
            ckpt = str(write_checkpoint(folder / f"{preset}.ckpt", preset))
            pre = preprocessing(preset)
            # the model as trained, with adaptation, and segment's default recipe (the structure's scale, 40 steps)
            variants = [("checkpoint", 0)] + ([("checkpoint", steps)] if steps else [])
            variants += [] if opts.quick else [("structure", DEFAULT_STEPS)]
            for scale, n_steps in variants:
                label = f"{preset} ({pre['spacing'][0]:g} mm, {pre['slice_size'][0]}x{pre['slice_size'][1]})" + (
                    f", --adapt-steps {n_steps}" if n_steps else "") + (
                    f", --scale {scale} (segment's default)" if scale == "structure" else "")
                cases.append((label, {"scans": scans, "checkpoint": ckpt, "adapt_steps": n_steps, "device": opts.device,
                                      "scale": scale},
                              {"case": label, "preset": preset, "adapt_steps": n_steps, "scale": scale, "shape": shape,
                               "runs": []}))
        for i in range(repeat):
            for j, (label, kw, record) in enumerate(cases):
                res = try_case(segment_case, {**kw, "out_dir": str(folder / f"out_{j}_{i}")}, opts, label, failures,
                               "segment")
                if res is not None:
                    record["runs"].append(res)
                    log(f"[segment] {label}: {res['seconds']:.1f} s, peak RSS {res['peak_rss_mib']:.0f} MiB")
    done = [(label, record) for label, _, record in cases if record["runs"]]
    rows = [_summary(label, record["runs"]) for label, record in done]
    return _sections(opts, shape, repeat, rows, [label for label, _ in done], [r["runs"] for _, r in done],
                     [record for _, _, record in cases], failures)


def _sections(opts, shape, repeat, cost_rows, labels, results, data, failures) -> list[Section]:
    cuda = opts.device.startswith("cuda")
    where = (f"A synthetic {shape[0]}x{shape[1]}x{shape[2]} CT (int16 NIfTI, gzip; a support with its label map and a "
             f"query), `imaging-meta segment ... --modality CT --device {opts.device}` with the untrained "
             "`protonet_seg` learner and the named data config's preprocessing; each run in a fresh process (cold, as a "
             f"user's command), the cases' runs interleaved, median of {repeat} run(s); {opts.threads} thread(s)."
             + (" --quick: a small volume, the numbers mean nothing." if opts.quick else ""))
    cost = Section(
        "segment_cost", "Whole-scan segmentation (`imaging-meta segment`): time and memory",
        [where, "command s: wall time; CPU s: the process's CPU time (less sensitive to other jobs on the machine). "
         "slices/s: the query's axial slices over the command's wall time, and over the scan segmenter's query "
         "prediction alone. Chunk: the learner's predict of one chunk of query slices (16 at 80x80, 1 at 256x256; "
         "the support's features once a query, through fit_support), median over every chunk of every run. Peak RSS: the "
         "process's highest resident set during the command (Linux VmHWM); rise: above its RSS before the command. "
         "CUDA: `max_memory_allocated` above what was allocated before the command."],
        ["case", "runs", "command s", "CPU s", "slices/s", "predict slices/s", "chunk ms", "chunks", "peak RSS MiB",
         "RSS rise MiB", "CUDA peak MiB"], cost_rows, data, failures)
    headers = ["stage"]
    for label in labels:
        headers += [f"{label}: wall s", "CPU s", "%", "peak RSS MiB"] + (["CUDA peak MiB"] if cuda else [])
    breakdown = Section(
        "segment_profile", "Whole-scan segmentation: where the time goes",
        ["Exclusive wall and CPU seconds per part of the command (a part's time leaves out the parts timed inside "
         "it), medians over the runs; %: the part's share of the command's " + ("wall time (CUDA: every boundary "
         "synchronises)" if cuda else "CPU time (the wall time also holds the waits for other jobs on the machine)")
         + "; the highest resident set (and CUDA allocation) of the process while the part ran, the parts inside it "
         "included."],
        headers, _breakdown(labels, results, cuda) if results else [], [], [])
    return [cost, breakdown]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.segment_cost", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help=f"a {'x'.join(map(str, QUICK_SHAPE))} volume, one run")
    p.add_argument("--shape", type=int, nargs=3, default=None, help="query and support volume shape (default 512 512 300)")
    p.add_argument("--presets", default="demo", help=f"comma-separated subset of {','.join(PRESETS)} (default demo)")
    p.add_argument("--adapt-steps", type=int, default=ADAPT_STEPS, help="also time --adapt-steps N (0: not)")
    p.add_argument("--repeat", type=int, default=None, help=f"commands per case (default {REPEAT}; --quick 1)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--timeout", type=float, default=4 * 3600.0, help="seconds before one command is stopped")
    p.add_argument("--out", default=None, help="also write segment_cost.md here")
    args = p.parse_args(argv)
    presets = tuple(s.strip() for s in args.presets.split(",") if s.strip())
    if not presets or set(presets) - set(PRESETS):
        p.error(f"--presets takes a comma-separated subset of {','.join(PRESETS)}, got {args.presets!r}")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: torch sees no CUDA device here")
    set_threads(args.threads)
    opts = BenchOptions(quick=args.quick, threads=args.threads, device=args.device, repeat=args.repeat or REPEAT,
                        warmup=0, timeout=args.timeout)
    sections = run(opts, presets, args.adapt_steps, tuple(args.shape) if args.shape else None, args.repeat)
    info = machine_info(opts)
    md = "\n\n".join([f"- machine: {info['cpu']}, {info['cores']} cores ({info['usable_cores']} usable), load average "
                      f"{info['load_average']}, torch {info['torch']}, monai {info['monai']}, device {info['device']}"
                      + (f" ({info['gpu']})" if info.get("gpu") else "") + f", {info['date']}",
                      *(s.markdown() for s in sections)]) + "\n"
    print(md)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "segment_cost.md").write_text(md)
    return 1 if any(s.failures for s in sections) else 0


if __name__ == "__main__":
    sys.exit(main())
