"""One meta-training step with the queries normalised in two passes (the default) against the one-pass form, and
against two passes without the norms folded into the convolutions.

    OMP_NUM_THREADS=1 python -m benchmarks.two_pass_queries [--sizes 84 28] [--repeat 5] [--warmup 2]
                                                           [--configs protonet_cls maml_cls ...]

Every learner normalises a task's queries with the statistics of its support. The default runs the support,
then the queries with its statistics in cache-sized chunks (`imaging_meta.learners.support_norms`); the
one-pass form (`imaging_meta.backbones.forward_with_support_statistics`: support and queries together, the norm
layers' statistics from the support rows with elementary operations) is forced here by giving the learners no
known norm layer, which is what they fall back to. The third form runs two passes but leaves each Conv-4 block's
query norm as a layer of its own (``x * scale + shift``) instead of folding it into the convolution's weight and
bias (`imaging_meta.backbones.folded_norms`, the default). Each config from ``configs/model`` on the same 4 five-way
1-shot tasks with 5 queries per class (1 channel); one step is ``zero_grad``, ``loss``, ``backward`` and the
config's optimiser step; the two forms alternate, round-robin over the configs, in one process; the table gives
the median step of each and the default's ratio to the other two.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Iterator

import imaging_meta.learners.base as base
import imaging_meta.learners.gradient.anil as anil
import imaging_meta.learners.support_norms as support_norms
import imaging_meta.learners.task_network as task_network
from benchmarks.common import MODEL_CONFIGS, build_from_config, classification_episode, config_pair_main
from imaging_meta.backbones import forward_with_support_statistics

CONFIGS = ("protonet_cls", "matching_cls", "mann_cls", "metasgd_cls", "maml_cls", "anil_cls")
FORMS = ("one", "unfolded", "two")


@contextlib.contextmanager
def one_pass() -> Iterator[None]:
    """The learners' one-pass form: no norm layer is known to the two-pass form, so every caller falls back; ANIL's
    encoder, which would run its support pass first to find that out, runs the one-pass form at once."""
    saved = base.module_norm_layers, task_network.support_norm_layers, anil.forward_in_two_passes
    base.module_norm_layers = task_network.support_norm_layers = lambda *a, **k: {}
    anil.forward_in_two_passes = lambda fn, layers, support, query: forward_with_support_statistics(fn, support, query)
    try:
        yield
    finally:
        base.module_norm_layers, task_network.support_norm_layers, anil.forward_in_two_passes = saved


@contextlib.contextmanager
def unfolded() -> Iterator[None]:
    """Two passes, the queries' norms run as layers of their own: `folded_norms` sets nothing."""
    saved = support_norms.folded_norms
    support_norms.folded_norms = lambda lookup: contextlib.nullcontext()
    try:
        yield
    finally:
        support_norms.folded_norms = saved


_FORMS = {"one": one_pass, "unfolded": unfolded, "two": contextlib.nullcontext}


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
    times: dict[tuple[str, str], list[float]] = {(n, f): [] for n in configs for f in FORMS}
    for r in range(warmup + repeat):
        for name in configs:
            for form in FORMS:
                with _FORMS[form]():
                    t = time.perf_counter()
                    steps[name]()
                    if r >= warmup:
                        times[name, form].append(time.perf_counter() - t)
    rows = []
    for name in configs:
        one, flat, two = (statistics.median(times[name, form]) for form in FORMS)
        rows.append([f"{size}x{size}", name, 1000 * one, 1000 * flat, 1000 * two, two / one, two / flat])
    return rows


def main(argv: list[str] | None = None) -> int:
    return config_pair_main(argv, __doc__.split("\n")[0], CONFIGS, [84, 28], measure,
                            ["input", "config", "one pass ms", "two passes, norms unfolded ms", "two passes ms",
                             "x one pass", "x unfolded"])


if __name__ == "__main__":
    raise SystemExit(main())
