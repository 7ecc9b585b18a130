"""What a ResNet-18 encoder costs ProtoNet-seg, against the default U-Net (docs/learners.md, "Pretrained encoders").

    OMP_NUM_THREADS=1 python -m benchmarks.pretrained_cost [--size 80] [--tasks 4] [--repeat 10] [--warmup 3]
                                                           [--threads 1] [--device cpu]

Times one training step (``zero_grad`` + ``loss`` + ``backward`` + the config's optimizer step) on a batch of
``--tasks`` one-shot episodes with one query each, and one ``predict`` (eval mode, no gradients) of a one-shot,
one-query episode, both at ``--size`` x ``--size``; median and interquartile range of ``--repeat`` calls after
``--warmup``. Rows: ``configs/model/protonet_seg.yaml`` (U-Net) and ``configs/model/protonet_resnet_seg.yaml``
with ImageNet settings (frozen BatchNorm, ImageNet input normalisation: what ``weights:`` switches on; random
weights cost the same) and from scratch (support-statistics BatchNorm, each task forwarded on its own). No file
and no network is touched. Never part of ``make test``.
"""

from __future__ import annotations

import argparse

import torch

from benchmarks.common import (
    MODEL_CONFIGS,
    BenchOptions,
    build_from_config,
    machine_info,
    markdown_table,
    segmentation_episode,
    set_threads,
    summarize,
    sync_for,
    time_calls,
)

CASES = (
    ("unet (protonet_seg)", "protonet_seg.yaml", {}),
    ("resnet18, ImageNet settings (frozen BN)", "protonet_resnet_seg.yaml",
     {"backbone_kwargs": {"freeze_bn": True, "imagenet_norm": True}}),
    ("resnet18, from scratch (support-statistics BN)", "protonet_resnet_seg.yaml", {}),
)


def measure(config: str, overrides: dict, size: int, tasks: int, repeat: int, warmup: int, device: str) -> dict:
    """Step and predict times of the learner of ``configs/model/<config>`` with ``overrides``."""
    learner, optimizer, _ = build_from_config(MODEL_CONFIGS / config, overrides, device=device)
    train_ep = segmentation_episode(tasks=tasks, n_shot=1, n_query=1, size=size, seed=0, device=device)
    test_ep = segmentation_episode(tasks=1, n_shot=1, n_query=1, size=size, seed=1, device=device)

    def step() -> None:
        learner.train()
        optimizer.zero_grad(set_to_none=True)
        learner.loss(train_ep).backward()
        optimizer.step()

    def predict() -> None:
        learner.eval()
        with torch.no_grad():
            learner.predict(test_ep)

    sync = sync_for(device)
    return {
        "params": sum(p.numel() for p in learner.parameters()),
        "trainable": sum(p.numel() for p in learner.parameters() if p.requires_grad),
        "step": summarize(time_calls(step, repeat, warmup, sync)),
        "predict": summarize(time_calls(predict, repeat, warmup, sync)),
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.pretrained_cost", description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=80)
    p.add_argument("--tasks", type=int, default=4, help="one-shot episodes per training step")
    p.add_argument("--repeat", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    set_threads(args.threads)
    rows = []
    for label, config, over in CASES:
        r = measure(config, over, args.size, args.tasks, args.repeat, args.warmup, args.device)
        rows.append([label, r["params"], r["trainable"], r["step"]["median_ms"], r["step"]["iqr_ms"],
                     r["predict"]["median_ms"], r["predict"]["iqr_ms"]])
    info = machine_info(BenchOptions(threads=args.threads, device=args.device, repeat=args.repeat, warmup=args.warmup))
    print(f"- machine: {info['cpu']}, {info['cores']} cores ({info['usable_cores']} usable), torch {info['torch']}, "
          f"{args.threads} thread(s), device {args.device}, {info['date']}")
    print(f"- step: {args.tasks} one-shot episodes x 1 query, {args.size}x{args.size}; predict: 1 episode, 1 query; "
          f"median (IQR) of {args.repeat} calls after {args.warmup} warm-up\n")
    print(markdown_table(["encoder", "params", "trainable", "step ms", "step IQR ms", "predict ms", "predict IQR ms"], rows))


if __name__ == "__main__":
    main()
