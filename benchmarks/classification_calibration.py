"""How well the class probabilities of `classify` mean what they say, on the real 2D sets.

    python -m benchmarks.classification_calibration --checkpoint results/runs/protonet_cls/version_0/checkpoints/best.ckpt

On the same seeded episodes as `benchmarks.real_classification` (every class of a set, 1, 3 and 5 shots, up to 5
queries per class, 60 episodes), for raw pixels, the checkpoint alone and the task-adaptive default: accuracy,
the mean probability of the predicted class (confidence) and the expected calibration error (15 equal-width
bins, pooled over the queries). ``--scales`` also runs the task-adaptive classifier with other values of the
weighting's temperature (`imaging_meta.learners.descriptors.weighting.SCALE`, 10 by default), which changes its
probabilities and, where the weights are fitted (K >= 2), can change its answers.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

import benchmarks.real_classification as rc
import imaging_meta.learners.descriptors.weighting as weighting
from datamodules.sources.image_folder import load_image
from imaging_meta.checkpoint_io import load_learner
from imaging_meta.commands.classify import loader_settings, support_folder
from imaging_meta.learners.descriptors.task_adaptive import TaskAdaptiveClassifier

BINS = 15


def ece(confidence: np.ndarray, correct: np.ndarray, bins: int = BINS) -> float:
    """Expected calibration error: sum over equal-width confidence bins of |correct - confidence|, over all."""
    idx = np.minimum((confidence * bins).astype(int), bins - 1)
    return float(sum(abs(correct[idx == b].sum() - confidence[idx == b].sum()) for b in range(bins)) / len(confidence))


def measure(learner, settings: dict, name: str, shot: int, episodes: int, scale: float | None = None,
            one_shot_scale: float | None = None) -> dict | None:
    """Accuracy, confidence and ECE of ``learner`` on the set's seeded episodes (None: too few images)."""
    classes, items = support_folder(rc.SETS / name)
    eps = rc.sample_episodes(items, len(classes), len(classes), shot, 5, 2, episodes, 0)
    if not eps:
        return None
    default, one_shot = weighting.SCALE, weighting.ONE_SHOT_SCALE
    weighting.SCALE = default if scale is None else scale
    weighting.ONE_SHOT_SCALE = one_shot if one_shot_scale is None else one_shot_scale
    try:
        conf, correct = [], []
        for cls, s_idx, q_idx in eps:
            relabel = {c: k for k, c in enumerate(cls)}
            s_images = torch.stack([load_image(items[i][0], **settings) for i in s_idx])
            q_images = torch.stack([load_image(items[i][0], **settings) for i in q_idx])
            s_labels = torch.tensor([relabel[items[i][1]] for i in s_idx])
            q_labels = torch.tensor([relabel[items[i][1]] for i in q_idx])
            probs, _ = rc.predict_queries(learner, s_images, s_labels, [classes[c] for c in cls], q_images)
            conf += probs.max(-1).values.tolist()
            correct += (probs.argmax(-1) == q_labels).float().tolist()
    finally:
        weighting.SCALE, weighting.ONE_SHOT_SCALE = default, one_shot
    c, k = np.asarray(conf), np.asarray(correct)
    return {"accuracy": float(k.mean()), "confidence": float(c.mean()), "ece": ece(c, k)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--sets", nargs="*", default=sorted(p.name for p in rc.SETS.iterdir() if p.is_dir()))
    ap.add_argument("--shots", nargs="*", type=int, default=[1, 3, 5])
    ap.add_argument("--episodes", type=int, default=60)
    ap.add_argument("--scales", nargs="*", type=float, default=[])
    ap.add_argument("--one-shot-scales", nargs="*", type=float, default=[],
                    help="also the task-adaptive classifier with this ONE_SHOT_SCALE (the temperature of tasks with one "
                         "image per class; the fit of the others is unchanged)")
    args = ap.parse_args(argv)
    learner, extra = load_learner(args.checkpoint, "cpu")
    learner.eval()
    adaptive = TaskAdaptiveClassifier(learner).eval()
    rows = [("raw pixels", rc.descriptor_learners()["pixels"], {"image_size": [64, 64], "channels": 3,
                                                              "ct_window": [-250.0, 250.0]}, None),
            ("embedding alone", learner, loader_settings(extra, learner), None),
            ("task-adaptive (default)", adaptive, loader_settings(extra, adaptive), None)]
    rows += [(f"task-adaptive, SCALE {s:g}", adaptive, loader_settings(extra, adaptive), (s, None)) for s in args.scales]
    rows += [(f"task-adaptive, ONE_SHOT_SCALE {s:g}", adaptive, loader_settings(extra, adaptive), (None, s))
             for s in args.one_shot_scales]
    print("| set | shots | method | accuracy | confidence | ECE |\n|---|---|---|--:|--:|--:|")
    for name in args.sets:
        for shot in args.shots:
            for label, model, settings, scales in rows:
                m = measure(model, settings, name, shot, args.episodes, *(scales or (None, None)))
                if m is not None:
                    print(f"| {name} | {shot} | {label} | {m['accuracy']:.3f} | {m['confidence']:.3f} | {m['ece']:.3f} |",
                          flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
