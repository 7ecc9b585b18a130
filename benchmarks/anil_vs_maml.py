"""ANIL's meta-training step against MAML's, timed round-robin in one process.

    python -m benchmarks.run --only anil

ANIL (`learners/gradient/anil.py`) encodes each task once and adapts the head on the features, so its step
should cost a fraction of MAML's, whose inner loop runs the whole encoder at every step. Both learners come
from their shipped configs (`anil_cls`: 5 inner steps, `maml_cls`: 3, both second order), on the same
batch of 4 five-way 1-shot tasks with 5 queries per class, 1 channel. One step is ``zero_grad``, ``loss``,
``backward`` and the config's optimiser step. The steps alternate (MAML, ANIL, MAML, ...), so a change of load
on a shared machine hits both; the table gives the medians of the wall and the process CPU time, and the
median of the per-round ratios. A bare forward and backward of the same Conv-4 over the episode's images
(the support, then the queries with its statistics, as `imaging_meta.learners.support_norms.forward_in_two_passes`
runs them; ANIL's kernels and weight layout) is timed in the same rounds as the floor that any learner that trains
the encoder on these images pays. Both learners are built as `imaging-meta fit` builds them on a CPU
(`imaging_meta.learners.base.keep_channels_last_on_cpu`): MAML's Conv-4 in the default layout under its
`inner_loop.FastKernels`, ANIL's, which is differentiated once, channels-last with PyTorch's kernels.
"""

from __future__ import annotations

import statistics
import time

import torch

from benchmarks.common import MODEL_CONFIGS, BenchOptions, Section, build_from_config, classification_episode
from imaging_meta.learners.support_norms import forward_in_two_passes, support_norm_layers

TASKS, N_WAY, N_SHOT, N_QUERY = 4, 5, 1, 5
ROWS = ("maml_cls", "anil_cls", "Conv-4 forward + backward (floor)")


def _steps(size: int, device: str) -> dict:
    episode = classification_episode(TASKS, N_WAY, N_SHOT, N_QUERY, size, device=device)
    steps = {}
    for name in ROWS[:2]:
        learner, optimizer, _ = build_from_config(MODEL_CONFIGS / f"{name}.yaml", {"n_way": N_WAY, "in_channels": 1},
                                                  device)
        learner.train()

        def step(learner=learner, optimizer=optimizer):
            optimizer.zero_grad(set_to_none=True)
            learner.loss(episode).backward()
            optimizer.step()

        steps[name] = step
    body = learner.net.body  # ANIL's Conv-4, as configured

    layers = support_norm_layers(body, dict(body.named_parameters()))

    def floor():  # PyTorch's kernels and ANIL's weight layout (channels-last on a CPU), as ANIL's encoder runs
        for t in range(TASKS):  # the support, then the queries with its statistics (in chunks on a CPU)
            fs, fq = forward_in_two_passes(body, layers, episode.support_images[t], episode.query_images[t])
            (fs.sum() + fq.sum()).backward()

    steps[ROWS[2]] = floor
    return steps


def measure(size: int, repeat: int, warmup: int, device: str = "cpu") -> dict:
    """Round-robin wall and CPU seconds of each row's step at ``size`` x ``size``."""
    steps = _steps(size, device)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    for _ in range(warmup):
        for fn in steps.values():
            fn()
    wall: dict[str, list[float]] = {k: [] for k in steps}
    cpu: dict[str, list[float]] = {k: [] for k in steps}
    for _ in range(repeat):
        for name, fn in steps.items():
            sync()
            c, w = time.process_time(), time.perf_counter()
            fn()
            sync()
            wall[name].append(time.perf_counter() - w)
            cpu[name].append(time.process_time() - c)
    return {"size": size, "wall": wall, "cpu": cpu}


def run(opts: BenchOptions) -> list[Section]:
    sizes = (16,) if opts.quick else (28, 84)
    rows, data = [], []
    for size in sizes:
        m = measure(size, opts.repeat, opts.warmup, opts.device)
        data.append(m)
        for name in ROWS:
            ratio = [a / b for a, b in zip(m["wall"][name], m["wall"]["maml_cls"], strict=True)]
            cpu_ratio = [a / b for a, b in zip(m["cpu"][name], m["cpu"]["maml_cls"], strict=True)]
            rows.append([f"{size}x{size}", name, 1000 * statistics.median(m["wall"][name]),
                         1000 * statistics.median(m["cpu"][name]), statistics.median(ratio), statistics.median(cpu_ratio)])
    notes = [
        f"{TASKS} tasks, {N_WAY}-way {N_SHOT}-shot, {N_QUERY} queries per class, 1 channel; the shipped configs "
        f"(`anil_cls`: 5 inner steps, `maml_cls`: 3, second order); device {opts.device}, {opts.threads} thread(s). "
        f"{opts.repeat} round-robin rounds after {opts.warmup} warm-up; `x maml` is the median of the per-round "
        "ratios (wall, and process CPU time). The floor row is a bare forward and backward of the Conv-4 over every "
        "task's support and then its queries (with the support's statistics, in chunks on a CPU).",
    ]
    return [Section("anil", "ANIL against MAML: one meta-training step", notes,
                    ["input", "step", "median ms", "CPU ms", "x maml", "x maml (CPU)"], rows, data)]
