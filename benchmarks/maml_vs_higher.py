"""Second-order MAML: imaging_meta's functional inner loop against the peer library `higher`.

Both sides differentiate through the same work: the same `TaskNetwork` (the ``maml_cls`` config's Conv-4,
5-way head; one instance, so the same weights), the same random tasks, the same number of inner SGD steps at
the same inner learning rate, the same support and query losses (`imaging_meta.tasks.CLASSIFICATION.loss`),
the same threads.

* ours: ``MAML.loss(episode).backward()`` (the mean query loss over the tasks). By default (``meta_backward=
  "per_task"``) the loss differentiates each task as soon as its query loss exists and frees its graph (a
  backward per task, as higher's example), and ``backward`` hands the summed gradients over; the row
  ``ours (one backward)`` (``meta_backward="once"``, when the installed MAML takes it) keeps every task's graph
  until one backward, as before;
* higher, as its MAML example does it: for each task ``higher.innerloop_ctx(net, SGD(lr=inner_lr),
  copy_initial_weights=False)``, ``diffopt.step(support loss)`` per inner step, then
  ``(query loss / T).backward()`` inside the context (a backward per task, so one task's graph at a time);
* higher, batched: the same, but the query losses of all tasks are summed and differentiated once, as ours is
  (every task's graph alive at the peak, as in ours).

Before any timing the meta-gradients of every row are checked against ours, so that the rows compare the same
computation: in float64 (a copy of the same network and tasks), where rounding cannot hide a difference,
with ``torch.allclose`` at rtol 1e-6; the largest absolute differences in float32 (as timed: from ours, and
from ours in float64) are reported beside it. Float32 alone cannot decide: second-order gradients through
BatchNorm at 84x84 carry rounding errors of 1e-4 to 1e-3 (the loop's own float32 gradient is that far from
its float64 one), and a batched (vmap) order of operations rounds differently from the loop while computing
the same function. Times are taken round-robin
(one step of each row in turn) so that a noisy machine disturbs every row alike. Peak memory of each row is
measured in a fresh process of its own. A ``vmap`` row (and a ``checkpoint_inner`` row) of ours is added when
the installed MAML takes ``task_batching`` (``checkpoint_inner``).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import replace

import torch

from benchmarks.common import (
    MODEL_CONFIGS,
    BenchOptions,
    CaseError,
    PeakMemory,
    Section,
    accepts,
    build_from_config,
    classification_episode,
    memory_method,
    run_isolated,
    short_error,
    summarize,
    sync_for,
    try_case,
)

SIZES = (28, 84)
N_WAY, N_SHOT, N_QUERY, TASKS = 5, 1, 5, 4
RTOL64, ATOL64 = 1e-6, 1e-12  # float64: the loop and vmap agree to ~1e-15 on Conv-4 at 84x84
QUICK = {"sizes": (16,), "tasks": 2, "n_query": 2, "backbone_kwargs": {"width": 8}}

OURS, HIGHER, HIGHER_BATCHED, OURS_VMAP, OURS_CKPT, OURS_ONCE = (
    "ours (loop over tasks)", "higher (backward per task)", "higher (one backward)", "ours (vmap)", "ours (checkpoint_inner)",
    "ours (one backward)")
#: ours' extra rows: the `MAML` argument that makes them, and its value
OURS_OPTIONS = {OURS_ONCE: ("meta_backward", "once"), OURS_VMAP: ("task_batching", "vmap"),
                OURS_CKPT: ("checkpoint_inner", True)}


def _require_higher():
    try:
        import higher
    except ImportError as e:
        raise ImportError("the MAML benchmark compares against `higher`: install it with `make install-bench` "
                          "(pip install -e '.[bench]')") from e
    return higher


def available_rows() -> list[str]:
    """The rows this installation can run (the optional features of MAML are detected)."""
    from imaging_meta.learners.gradient.maml import MAML

    rows = [OURS, HIGHER, HIGHER_BATCHED]
    return rows + [row for row, (arg, _) in OURS_OPTIONS.items() if accepts(MAML, arg)]


def _setup(size: int, tasks: int, n_query: int, inner_steps: int | None, inner_lr: float | None,
           backbone_kwargs: dict | None, device: str, dtype: torch.dtype = torch.float32):
    """The reference learner (its net is the shared network), the episode, and the settings used (in ``dtype``)."""
    over: dict = {"n_way": N_WAY, "in_channels": 1, "first_order": False}
    if inner_steps is not None:
        over["inner_steps"] = inner_steps
    if inner_lr is not None:
        over["inner_lr"] = inner_lr
    # `higher`'s reference step forwards the queries alone, so ours is built with batch statistics over the
    # queries too (the transductive option): both then compute the same meta-gradient
    over["backbone_kwargs"] = {**(backbone_kwargs or {}), "transductive": True}
    learner, _, init = build_from_config(MODEL_CONFIGS / "maml_cls.yaml", over, device)
    episode = classification_episode(tasks, N_WAY, N_SHOT, n_query, size, 1, seed=1, device=device)
    if dtype != torch.float32:
        learner.to(dtype)
        episode = replace(episode, support_images=episode.support_images.to(dtype),
                          query_images=episode.query_images.to(dtype))
    return learner, episode, over, init


def _steps(rows: list[str], learner, episode, over: dict, device: str) -> dict[str, tuple[Callable[[], None], list]]:
    """``row -> (one meta-gradient computation, the parameters it fills .grad of)``; every row uses the same net
    (the vmap / checkpoint rows: a learner of their own holding a copy of the same weights)."""
    from imaging_meta.tasks import CLASSIFICATION

    net = learner.net
    steps = learner.inner_steps
    lr = learner.inner_lr
    T = episode.n_tasks
    out: dict[str, tuple[Callable[[], None], list]] = {}

    def ours(lrn):
        def step() -> None:
            lrn.zero_grad(set_to_none=True)
            lrn.loss(episode).backward()
        return step

    def with_higher(per_task: bool):
        higher = _require_higher()

        def step() -> None:
            net.zero_grad(set_to_none=True)
            inner_opt = torch.optim.SGD(net.parameters(), lr=lr)
            total = 0.0
            for t in range(T):
                with higher.innerloop_ctx(net, inner_opt, copy_initial_weights=False) as (fnet, diffopt):
                    for _ in range(steps):
                        diffopt.step(CLASSIFICATION.loss(fnet(episode.support_images[t]), episode.support_labels[t]))
                    q = CLASSIFICATION.loss(fnet(episode.query_images[t]), episode.query_labels[t]) / T
                    if per_task:
                        q.backward()
                    else:
                        total = total + q
            if not per_task:
                total.backward()
        return step

    for row in rows:
        if row == OURS:
            out[row] = (ours(learner), list(net.parameters()))
        elif row in (HIGHER, HIGHER_BATCHED):
            out[row] = (with_higher(row == HIGHER), list(net.parameters()))
        elif row in OURS_OPTIONS:
            arg, value = OURS_OPTIONS[row]
            twin, _, _ = build_from_config(MODEL_CONFIGS / "maml_cls.yaml", {**over, arg: value, "_required": [arg]}, device)
            twin.to(next(learner.parameters()).dtype).load_state_dict(learner.state_dict())
            out[row] = (ours(twin), list(twin.net.parameters()))
        else:
            raise ValueError(f"unknown row {row!r}")
    return out


def meta_gradients(rows: list[str], fns: dict) -> dict[str, list[torch.Tensor]]:
    """Each row's meta-gradient, one tensor per parameter (in the order of ``net.parameters()``)."""
    grads = {}
    for row in rows:
        fn, params = fns[row]
        fn()
        grads[row] = [torch.zeros_like(p) if p.grad is None else p.grad.detach().clone() for p in params]
    return grads


def compare_gradients(grads: dict[str, list[torch.Tensor]], ref: list[torch.Tensor], rtol: float = 0.0,
                      atol: float = 0.0) -> dict[str, dict]:
    """Each row's largest absolute difference from ``ref`` and ``allclose(rtol, atol)`` (in ``ref``'s dtype)."""
    out = {}
    for row, gs in grads.items():
        gs = [g.to(r.dtype) for g, r in zip(gs, ref, strict=True)]
        diff = max(float((a - b).abs().max()) for a, b in zip(gs, ref, strict=True))
        ok = all(torch.allclose(a, b, rtol=rtol, atol=atol) for a, b in zip(gs, ref, strict=True))
        out[row] = {"max_abs_diff": diff, "allclose": ok}
    return out


def compare_case(size: int, tasks: int, n_query: int, inner_steps: int | None, inner_lr: float | None,
                 backbone_kwargs: dict | None, rows: list[str], repeat: int, warmup: int, device: str = "cpu") -> dict:
    """Gradient checks (float64, then float32), then round-robin timing of every row in float32 (one process;
    memory is measured apart)."""
    learner, episode, over, init = _setup(size, tasks, n_query, inner_steps, inner_lr, backbone_kwargs, device,
                                          torch.float64)
    learner.train()
    g64 = meta_gradients(rows, _steps(rows, learner, episode, over, device))
    check64 = compare_gradients(g64, g64[OURS], RTOL64, ATOL64)
    del learner, episode
    learner, episode, over, init = _setup(size, tasks, n_query, inner_steps, inner_lr, backbone_kwargs, device)
    learner.train()
    fns = _steps(rows, learner, episode, over, device)
    g32 = meta_gradients(rows, fns)
    check32 = compare_gradients(g32, g32[OURS])  # reported, not judged: float32 rounding differs by order
    error32 = compare_gradients(g32, g64[OURS])  # each row's float32 gradient against the float64 one
    scale = max(float(g.abs().max()) for g in g32[OURS])
    check = {row: {"allclose": check64[row]["allclose"], "max_abs_diff_fp64": check64[row]["max_abs_diff"],
                   "max_abs_diff": check32[row]["max_abs_diff"], "fp32_error": error32[row]["max_abs_diff"],
                   "max_abs_grad": scale}
             for row in rows}
    sync = sync_for(device)
    for _ in range(warmup):
        for row in rows:
            fns[row][0]()
    times: dict[str, list[float]] = {row: [] for row in rows}
    for _ in range(repeat):
        for row in rows:
            sync()
            t0 = time.perf_counter()
            fns[row][0]()
            sync()
            times[row].append(time.perf_counter() - t0)
    return {
        "check": check,
        "times_s": times,
        "summary": {row: summarize(t) for row, t in times.items()},
        "inner_steps": learner.inner_steps,
        "inner_lr": learner.inner_lr,
        "width": (init.get("backbone_kwargs") or {}).get("width"),
        "params": sum(p.numel() for p in learner.net.parameters()),
    }


def memory_case(size: int, tasks: int, n_query: int, inner_steps: int | None, inner_lr: float | None,
                backbone_kwargs: dict | None, row: str, steps: int = 2, device: str = "cpu") -> dict:
    """Peak memory of ``steps`` meta-gradient computations of one row after one warm-up (in a fresh process)."""
    learner, episode, over, _ = _setup(size, tasks, n_query, inner_steps, inner_lr, backbone_kwargs, device)
    learner.train()
    fn, _ = _steps([row], learner, episode, over, device)[row]
    fn()
    with PeakMemory(device) as mem:
        for _ in range(steps):
            fn()
    return {"peak_mib": mem.peak_mib, "memory_method": mem.method}


def run(opts: BenchOptions, inner_steps: int | None = None, inner_lr: float | None = None) -> list[Section]:
    """The comparison table (one block of rows per image size)."""
    q = QUICK if opts.quick else None
    sizes = q["sizes"] if q else SIZES
    tasks = q["tasks"] if q else TASKS
    n_query = q["n_query"] if q else N_QUERY
    bk = q["backbone_kwargs"] if q else None
    _require_higher()
    rows = available_rows()
    table, data, failures = [], [], []
    settings = None
    for size in sizes:
        common = {"size": size, "tasks": tasks, "n_query": n_query, "inner_steps": inner_steps, "inner_lr": inner_lr,
                  "backbone_kwargs": bk, "device": opts.device}
        res = try_case(compare_case, {**common, "rows": rows, "repeat": opts.repeat, "warmup": opts.warmup}, opts,
                       f"{size}x{size}", failures, "higher")
        if res is None:
            continue
        settings = res
        mem = {}
        for row in rows:
            try:
                mem[row] = run_isolated(memory_case, {**common, "row": row}, opts)["peak_mib"]
            except CaseError as e:
                failures.append(f"{size}x{size} {row} memory: {short_error(e)}")
                mem[row] = None
        ours_ms = res["summary"][OURS]["median_ms"]
        for row in rows:
            s, c = res["summary"][row], res["check"][row]
            if not c["allclose"]:
                failures.append(f"{size}x{size} {row}: float64 meta-gradient differs from ours "
                                f"(max abs diff {c['max_abs_diff_fp64']:.3g})")
            print(f"[higher] {size}x{size} {row}: grad max|diff| fp64 {c['max_abs_diff_fp64']:.3g} (allclose "
                  f"{c['allclose']}), fp32 {c['max_abs_diff']:.3g}; "
                  f"{s['median_ms']:.1f} ms, peak {mem[row] if mem[row] is None else round(mem[row], 1)} MiB",
                  file=sys.stderr, flush=True)
            table.append([f"{size}x{size}", row, s["median_ms"], s["iqr_ms"], s["median_ms"] / ours_ms, mem[row],
                          c["max_abs_diff_fp64"], c["allclose"], c["max_abs_diff"], c["fp32_error"], c["max_abs_grad"]])
        data.append({"size": size, **common, "result": res, "peak_mib": mem})
    how = ("unknown (every case failed)" if settings is None else
           f"{settings['inner_steps']} inner steps at inner lr {settings['inner_lr']}, Conv-4 width {settings['width']} "
           f"({settings['params']} parameters)")
    notes = [
        f"Second-order MAML meta-gradient (no optimizer step), {N_WAY}-way {N_SHOT}-shot, {n_query} queries per class, "
        f"meta-batch {tasks} tasks, 1 channel, {how}; the same network, tasks and threads ({opts.threads}) for every "
        f"row, device {opts.device}. Median and IQR of {opts.repeat} round-robin steps after {opts.warmup} warm-up "
        f"rounds; `x ours` is the row's median over ours (loop) at that size, so higher/ours > 1 means higher is slower.",
        f"Meta-gradients checked against ours first, on a float64 copy of the same network and tasks: `fp64 max abs "
        f"diff` over all parameters, `same` = `torch.allclose(rtol={RTOL64}, atol={ATOL64})`; `fp32 max abs diff` is "
        "the difference from ours in float32 as timed, `fp32 error` the row's float32 gradient against ours in "
        "float64 (rounding: second-order gradients through BatchNorm lose digits), `max abs grad` their scale. `higher (backward per task)` frees each task's graph before the next (its "
        "MAML example), as `ours (loop over tasks)` does by default (`meta_backward: per_task`); `higher (one "
        "backward)` and `ours (one backward)` (`meta_backward: once`) keep them all until one backward.",
        memory_method(opts.device) + " Two steps after one warm-up per measurement.",
    ]
    headers = ["input", "implementation", "median ms", "IQR ms", "x ours", "peak MiB", "fp64 max abs diff", "same",
               "fp32 max abs diff", "fp32 error", "max abs grad"]
    return [Section("maml_vs_higher", "Second-order MAML: imaging_meta vs higher", notes, headers, table, data, failures)]
