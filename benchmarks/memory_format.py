"""One meta-training step with the network's weights in the default (contiguous) layout against channels-last.

    OMP_NUM_THREADS=1 python -m benchmarks.memory_format [--sizes 84 32] [--repeat 5] [--warmup 2]
                                                        [--configs protonet_cls anil_cls ...]

On a CPU, `imaging_meta.learners.base.keep_channels_last_on_cpu` stores the weights of the backbones that ask
for it (the 2D Conv-4) in channels-last order, unless the learner differentiates them twice (MAML's family).
This script measures that choice for each config of ``configs/model``: the same learner, its convolution weights
in each layout (every 4D weight of the learner is converted, whatever the rule says), on the same batch of
4 tasks (five-way 1-shot with 5 queries per class, or 1-shot segmentation with 2 queries at the largest multiple
of 16 not above the size), 1 channel. One step is
``zero_grad``, ``loss``, ``backward`` and the config's optimiser step; the two layouts alternate, round-robin
over the configs, in one process; the table gives the median step of each, their ratio, and the layout that
`imaging-meta fit` and `load_learner` pick on a CPU.
"""

from __future__ import annotations

import statistics
import time

import torch

from benchmarks.common import (
    MODEL_CONFIGS,
    build_from_config,
    classification_episode,
    config_pair_main,
    segmentation_episode,
)

CONFIGS = ("protonet_cls", "matching_cls", "mann_cls", "reptile_cls", "anil_cls", "maml_cls", "metasgd_cls",
           "protonet_seg")
LAYOUTS = {"default": torch.contiguous_format, "channels-last": torch.channels_last}


def picked_layout(learner: torch.nn.Module) -> str:
    """The layout of the learner's first 4D weight (what `keep_channels_last_on_cpu` left it in)."""
    for p in learner.parameters():
        if p.dim() == 4:
            return "channels-last" if p.stride() == torch.empty_like(p, memory_format=torch.channels_last).stride() \
                else "default"
    return "default"


def measure(size: int, configs: list[str], repeat: int, warmup: int) -> list[list]:
    seg_size = size - size % 16  # the U-Net takes multiples of 16: 80 x 80 for 84
    episodes = {"classification": classification_episode(4, 5, 1, 5, size, device="cpu"),
                "segmentation": segmentation_episode(4, 1, 2, seg_size, device="cpu")}
    steps, picked = {}, {}
    for name in configs:
        for layout, fmt in LAYOUTS.items():
            seg = name.endswith("_seg")
            overrides = {"in_channels": 1} if seg else {"n_way": 5, "in_channels": 1}
            learner, optimizer, _ = build_from_config(MODEL_CONFIGS / f"{name}.yaml", overrides, "cpu")
            picked[name] = picked_layout(learner)
            learner.to(memory_format=fmt).train()
            episode = episodes["segmentation" if seg else "classification"]

            def step(learner=learner, optimizer=optimizer, episode=episode) -> None:
                optimizer.zero_grad(set_to_none=True)
                learner.loss(episode).backward()
                optimizer.step()

            steps[name, layout] = step
    times: dict[tuple[str, str], list[float]] = {k: [] for k in steps}
    for r in range(warmup + repeat):
        for key, step in steps.items():
            t = time.perf_counter()
            step()
            if r >= warmup:
                times[key].append(time.perf_counter() - t)
    rows = []
    for name in configs:
        plain, last = statistics.median(times[name, "default"]), statistics.median(times[name, "channels-last"])
        side = seg_size if name.endswith("_seg") else size
        rows.append([f"{side}x{side}", name, 1000 * plain, 1000 * last, last / plain, picked[name]])
    return rows


def main(argv: list[str] | None = None) -> int:
    return config_pair_main(argv, __doc__.split("\n")[0], CONFIGS, [84, 32], measure,
                            ["input", "config", "default ms", "channels-last ms", "x default", "picked on a CPU"])


if __name__ == "__main__":
    raise SystemExit(main())
