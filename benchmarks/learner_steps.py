"""Meta-training step time and peak memory of every learner config, and MAML's memory against its settings.

A step is what `imaging_meta.module.EpisodicModule` does per batch under automatic optimisation:
``optimizer.zero_grad(); learner.loss(episode).backward(); optimizer.step()``, with the config's learner and
optimizer, on random episodes of fixed shapes:

* classification (every ``*_cls`` config): 5-way 1-shot, 5 queries per class, a meta-batch of 4 tasks, at
  84x84 and 28x28, one channel; the config's backbone (``n_way`` and ``in_channels`` overridden to fit);
* segmentation (every ``*_seg`` config): 1-shot, 2 queries, a meta-batch of 4 tasks, 128x128.

MAML's optional ``task_batching="vmap"``, ``checkpoint_inner=True`` and ``meta_backward="once"`` (one backward
over the meta-batch, every task's graph alive; the default takes a backward per task inside ``loss``) get rows of
their own when the installed `imaging_meta.learners.gradient.maml.MAML` takes them. The scaling tables hold
second-order MAML's peak memory against inner steps, tasks and image size, beside first-order MAML and ANIL.
"""

from __future__ import annotations

from pathlib import Path

import torch

from benchmarks.common import (
    BenchOptions,
    PeakMemory,
    Section,
    accepts,
    build_from_config,
    classification_episode,
    learner_class,
    load_yaml,
    log,
    memory_method,
    model_configs,
    segmentation_episode,
    summarize,
    sync_for,
    time_calls,
    try_case,
)

CLS_SIZES = (84, 28)
SEG_SIZE = 128
N_WAY, N_SHOT, N_QUERY, TASKS = 5, 1, 5, 4
SEG_SHOT, SEG_QUERY = 1, 2
SCALING_BASE = {"inner_steps": 4, "tasks": 4, "size": 84}
SCALING_SWEEPS = {"inner_steps": (1, 2, 4, 8), "tasks": (1, 2, 4, 8), "size": (28, 56, 84)}

# --quick: tiny shapes and networks (a smoke test; the numbers mean nothing)
QUICK = {
    "cls_sizes": (16,), "seg_size": 32, "tasks": 2, "n_query": 2, "seg_query": 1,
    # backbone name -> the options that shrink it (merged over the config's backbone_kwargs)
    "backbone_kwargs": {
        "unet": {"out_channels": 8, "features": [4, 8, 8, 16, 16, 4]},
        "conv4": {"width": 8},
        "resnet12": {"widths": [4, 8]},
        "resnet": {"depth": 18, "width": 8},
    },
    "scaling_base": {"inner_steps": 1, "tasks": 1, "size": 16},
    "scaling_sweeps": {"inner_steps": (1, 2), "tasks": (1, 2), "size": (16, 24)},
}


def step_case(
    config: str,
    task: str,
    size: int,
    tasks: int,
    n_query: int,
    overrides: dict,
    repeat: int,
    warmup: int,
    device: str = "cpu",
    n_way: int = N_WAY,
    n_shot: int = N_SHOT,
    channels: int = 1,
) -> dict:
    """Time and peak memory of meta-training steps of one config on one episode shape (run in its own process).

    Returns:
        ``{"times_s", "median_ms", ..., "peak_mib", "memory_method", "params", "learner"}``.
    """
    over = {"in_channels": channels, **overrides}
    if task == "classification":
        over["n_way"] = n_way
    learner, optimizer, _ = build_from_config(config, over, device)
    if task == "classification":
        episode = classification_episode(tasks, n_way, n_shot, n_query, size, channels, device=device)
    else:
        episode = segmentation_episode(tasks, n_shot, n_query, size, device=device)
    learner.train()

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss = learner.loss(episode)
        loss.backward()
        optimizer.step()

    for _ in range(warmup):
        step()
    with PeakMemory(device) as mem:
        times = time_calls(step, repeat, 0, sync_for(device))
    return {
        **summarize(times),
        "times_s": times,
        "peak_mib": mem.peak_mib,
        "memory_method": mem.method,
        "params": sum(p.numel() for p in learner.parameters()),
        "learner": type(learner).__name__,
    }


def variants(path: Path) -> list[tuple[str, dict]]:
    """``(row label, overrides)``: the config as it is, then the optional MAML features its learner takes."""
    lcfg = load_yaml(path)["model"]["learner"]
    cls = learner_class(lcfg["class_path"])
    init = lcfg.get("init_args") or {}
    out = [(path.stem, {})]
    if accepts(cls, "task_batching"):
        out.append((f"{path.stem} [vmap]", {"task_batching": "vmap", "_required": ["task_batching"]}))
    if accepts(cls, "checkpoint_inner") and not init.get("first_order", False):
        out.append((f"{path.stem} [checkpoint_inner]", {"checkpoint_inner": True, "_required": ["checkpoint_inner"]}))
    if accepts(cls, "meta_backward"):
        out.append((f"{path.stem} [once]", {"meta_backward": "once", "_required": ["meta_backward"]}))
    return out


def _run(kwargs: dict, opts: BenchOptions, label: str, failures: list[str]) -> dict | None:
    res = try_case(step_case, kwargs, opts, label, failures, "steps")
    if res is not None:
        log(f"[steps] {label}: {res['median_ms']:.1f} ms, peak {res['peak_mib']:.1f} MiB")
    return res


def _cell(res: dict | None, key: str):
    return "error" if res is None else res[key]


def learner_tables(opts: BenchOptions) -> list[Section]:
    """The classification and segmentation tables over every config in ``configs/model``."""
    q = QUICK if opts.quick else None
    cls_sizes = q["cls_sizes"] if q else CLS_SIZES
    seg_size = q["seg_size"] if q else SEG_SIZE
    tasks = q["tasks"] if q else TASKS
    n_query = q["n_query"] if q else N_QUERY
    seg_query = q["seg_query"] if q else SEG_QUERY
    common = {"repeat": opts.repeat, "warmup": opts.warmup, "device": opts.device}
    cls_rows, seg_rows, data, cls_fail, seg_fail = [], [], [], [], []
    for path in model_configs():
        init = load_yaml(path)["model"]["learner"].get("init_args") or {}
        is_seg = path.stem.endswith("_seg") or init.get("task") == "segmentation"
        backbone = init.get("backbone", "unet" if is_seg else "conv4")  # the learners' defaults
        for label, over in variants(path):
            if q:
                over = {**over, "backbone_kwargs": q["backbone_kwargs"][backbone]}
            if is_seg:
                kw = {"config": str(path), "task": "segmentation", "size": seg_size, "tasks": tasks, "n_query": seg_query,
                      "n_shot": SEG_SHOT, "overrides": over, **common}
                res = _run(kw, opts, f"{label} {seg_size}x{seg_size}", seg_fail)
                data.append({"config": label, "task": "segmentation", "size": seg_size, "result": res})
                seg_rows.append([label, _cell(res, "learner"), _cell(res, "params"), _cell(res, "median_ms"),
                                 _cell(res, "iqr_ms"), _cell(res, "peak_mib")])
                continue
            row: list = [label, None, None]
            for size in cls_sizes:
                kw = {"config": str(path), "task": "classification", "size": size, "tasks": tasks, "n_query": n_query,
                      "overrides": over, **common}
                res = _run(kw, opts, f"{label} {size}x{size}", cls_fail)
                data.append({"config": label, "task": "classification", "size": size, "result": res})
                if res is not None:
                    row[1], row[2] = res["learner"], res["params"]
                row += [_cell(res, "median_ms"), _cell(res, "iqr_ms"), _cell(res, "peak_mib")]
            row[1] = row[1] or "error"
            row[2] = row[2] or "error"
            cls_rows.append(row)
    how = (f"A step is `zero_grad` + `learner.loss(episode)` + `backward` + the config's optimizer step; median and "
           f"interquartile range of {opts.repeat} steps after {opts.warmup} warm-up steps; random inputs; "
           f"{opts.threads} thread(s); device {opts.device}.")
    width = "width 8 (--quick)" if q else "the config's width"
    cls_headers = ["config", "learner", "params"]
    for s in cls_sizes:
        cls_headers += [f"{s}x{s} ms", f"{s}x{s} IQR ms", f"{s}x{s} peak MiB"]
    sections = [
        Section("steps_cls", "Meta-training step, classification",
                [f"{N_WAY}-way {N_SHOT}-shot, n_query={n_query} per class, meta-batch {tasks} tasks, 1 channel, "
                 f"the config's backbone (Conv-4, or ResNet) at {width}. `[vmap]` / `[checkpoint_inner]` / `[once]`: MAML's "
                 "`task_batching=\"vmap\"` / `checkpoint_inner=True` / `meta_backward=\"once\"` (one backward over "
                 "the meta-batch instead of the default backward per task).", how, memory_method(opts.device)],
                cls_headers, cls_rows, [d for d in data if d["task"] == "classification"], cls_fail),
        Section("steps_seg", "Meta-training step, segmentation",
                [f"1-way {SEG_SHOT}-shot, n_query={seg_query}, meta-batch {tasks} tasks, {seg_size}x{seg_size}, "
                 f"the config's backbone (MONAI BasicUNet, or ResNet){' (shrunk, --quick)' if q else ''}.", how,
                 memory_method(opts.device)],
                ["config", "learner", "params", f"{seg_size}x{seg_size} ms", "IQR ms", "peak MiB"],
                seg_rows, [d for d in data if d["task"] == "segmentation"], seg_fail),
    ]
    return sections


def scaling_variants() -> list[tuple[str, str, dict]]:
    """``(label, config stem, overrides)`` of the MAML memory-scaling tables."""
    from imaging_meta.learners.gradient.maml import MAML

    out = [("MAML, 2nd order", "maml_cls", {"first_order": False})]
    if accepts(MAML, "meta_backward"):
        out.append(("MAML, 2nd order, one backward", "maml_cls",
                    {"first_order": False, "meta_backward": "once", "_required": ["meta_backward"]}))
    if accepts(MAML, "checkpoint_inner"):
        out.append(("MAML, 2nd order, checkpoint_inner", "maml_cls",
                    {"first_order": False, "checkpoint_inner": True, "_required": ["checkpoint_inner"]}))
    if accepts(MAML, "task_batching"):
        out.append(("MAML, 2nd order, vmap", "maml_cls",
                    {"first_order": False, "task_batching": "vmap", "_required": ["task_batching"]}))
    out += [("first-order MAML", "fomaml_cls", {}), ("ANIL, 2nd order", "anil_cls", {})]
    return out


def scaling_tables(opts: BenchOptions) -> list[Section]:
    """Peak memory (and step time) of MAML variants against inner steps, tasks and image size."""
    from benchmarks.common import MODEL_CONFIGS

    q = QUICK if opts.quick else None
    base = q["scaling_base"] if q else SCALING_BASE
    sweeps = q["scaling_sweeps"] if q else SCALING_SWEEPS
    n_query = q["n_query"] if q else N_QUERY
    repeat, warmup = min(opts.repeat, 3), min(opts.warmup, 1)
    sections = []
    names = {"inner_steps": "inner steps", "tasks": "tasks (meta-batch)", "size": "image size"}
    for axis, values in sweeps.items():
        rows, data, failures = [], [], []
        for label, stem, over in scaling_variants():
            row = [label]
            for v in values:
                point = {**base, axis: v}
                o = {**over, "inner_steps": point["inner_steps"]}
                if q:
                    o["backbone_kwargs"] = q["backbone_kwargs"]["conv4"]
                kw = {"config": str(MODEL_CONFIGS / f"{stem}.yaml"), "task": "classification", "size": point["size"],
                      "tasks": point["tasks"], "n_query": n_query, "overrides": o, "repeat": repeat, "warmup": warmup,
                      "device": opts.device}
                res = _run(kw, opts, f"{label} {axis}={v}", failures)
                data.append({"variant": label, **point, "result": res})
                row.append("error" if res is None else f"{res['peak_mib']:.0f} MiB / {res['median_ms']:.0f} ms")
            rows.append(row)
        fixed = ", ".join(f"{names[k]} {v}" for k, v in base.items() if k != axis)
        sections.append(Section(
            f"scaling_{axis}", f"MAML peak memory vs {names[axis]}",
            [f"Cells: peak MiB / median step ms ({repeat} steps after {warmup} warm-up). {N_WAY}-way {N_SHOT}-shot, "
             f"{n_query} queries per class, Conv-4 ({'width 8, --quick' if q else 'maml_cls width'}), {fixed}; "
             f"{opts.threads} thread(s), device {opts.device}.", memory_method(opts.device)],
            ["variant", *[f"{names[axis]} = {v}" for v in values]], rows, data, failures))
    return sections


def run(opts: BenchOptions) -> list[Section]:
    """Every table of this benchmark."""
    torch.manual_seed(0)
    return learner_tables(opts) + scaling_tables(opts)
