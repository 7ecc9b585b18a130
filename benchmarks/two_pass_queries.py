"""One meta-training step with the queries normalised in two passes (the default) against the one-pass form.

    OMP_NUM_THREADS=1 python -m benchmarks.two_pass_queries [--sizes 84 28] [--repeat 5] [--warmup 2]
                                                           [--configs protonet_cls maml_cls ...]

Every learner normalises a task's queries with the statistics of its support. The default runs the support,
then the queries with its statistics in cache-sized chunks (`imaging_meta.learners.support_norms`); the
one-pass form (`imaging_meta.backbones.forward_with_support_statistics`: support and queries together, the norm
layers' statistics from the support rows with elementary operations) is forced here by giving the learners no
known norm layer, which is what they fall back to. Each config from ``configs/model`` on the same 4 five-way
1-shot tasks with 5 queries per class (1 channel); one step is ``zero_grad``, ``loss``, ``backward`` and the
config's optimiser step; the two forms alternate, round-robin over the configs, in one process; the table gives
the median step of each and their ratio.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Iterator

import imaging_meta.learners.base as base
import imaging_meta.learners.task_network as task_network
from benchmarks.common import MODEL_CONFIGS, build_from_config, classification_episode, config_pair_main

CONFIGS = ("protonet_cls", "matching_cls", "mann_cls", "metasgd_cls", "maml_cls")


@contextlib.contextmanager
def one_pass() -> Iterator[None]:
    """The learners' one-pass form: no norm layer is known to the two-pass form, so every caller falls back."""
    module_layers, state_layers = base.module_norm_layers, task_network.support_norm_layers
    base.module_norm_layers = task_network.support_norm_layers = lambda *args, **kwargs: {}
    try:
        yield
    finally:
        base.module_norm_layers, task_network.support_norm_layers = module_layers, state_layers


def measure(size: int, configs: list[str], repeat: int, warmup: int) -> list[list]:
    episode = classification_episode(4, 5, 1, 5, size, device="cpu")
    steps = {}
    for name in configs:
        learner, optimizer, _ = build_from_config(MODEL_CONFIGS / f"{name}.yaml", {"n_way": 5, "in_channels": 1}, "cpu")
        learner.train()

        def step(learner=learner, optimizer=optimizer) -> None:
            optimizer.zero_grad(set_to_none=True)
            learner.loss(episode).backward()
            optimizer.step()

        steps[name] = step
    times: dict[tuple[str, str], list[float]] = {(n, f): [] for n in configs for f in ("one", "two")}
    for r in range(warmup + repeat):
        for name in configs:
            for form in ("one", "two"):
                with one_pass() if form == "one" else contextlib.nullcontext():
                    t = time.perf_counter()
                    steps[name]()
                    if r >= warmup:
                        times[name, form].append(time.perf_counter() - t)
    rows = []
    for name in configs:
        one, two = statistics.median(times[name, "one"]), statistics.median(times[name, "two"])
        rows.append([f"{size}x{size}", name, 1000 * one, 1000 * two, two / one])
    return rows


def main(argv: list[str] | None = None) -> int:
    return config_pair_main(argv, __doc__.split("\n")[0], CONFIGS, [84, 28], measure,
                            ["input", "config", "one pass ms", "two passes ms", "x one pass"])


if __name__ == "__main__":
    raise SystemExit(main())
