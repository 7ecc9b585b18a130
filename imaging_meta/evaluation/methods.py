"""The methods every test episode scores, and the untrained learner they compare against.

* `TRAINED`: the meta-trained learner;
* `UNTRAINED`: the same learner at its initial weights (the weights it had when `EpisodicModule` was built,
  kept in every checkpoint as ``untrained_state_dict``): what meta-training added;
* the task's label-only baselines (`imaging_meta.tasks.Task.baselines`; segmentation: `COPY_MASK`);
* for classification (`reference_classifiers`): `RAW_PIXELS`, the nearest class mean of 32 x 32 pixels (each
  colour channel kept), the baseline a meta-learner must beat, and `TASK_ADAPTIVE`, the trained learner inside `TaskAdaptiveClassifier`:
  what ``imaging-meta classify`` gives by default.

The untrained learner is made here once for both places that score it: `initial_copy` at fit,
`untrained_state` into the checkpoint, `restore_untrained` back from it (into the module's copy, or as a new
learner for ``imaging-meta evaluate``).
"""

from __future__ import annotations

import copy

import torch

from imaging_meta.learners.base import Learner, build_learner
from imaging_meta.tasks import COPY_MASK

TRAINED, UNTRAINED = "trained", "untrained encoder"
RAW_PIXELS, TASK_ADAPTIVE = "raw pixels", "trained, task-adaptive"

#: reports list these methods first, in this order; any other after them, sorted
METHOD_ORDER = (TRAINED, UNTRAINED, COPY_MASK, TASK_ADAPTIVE, RAW_PIXELS)


def reference_classifiers(learner: Learner) -> dict[str, Learner]:
    """The classification methods scored beside a trained learner: raw pixels, and the learner inside the
    task-adaptive classifier (left out when the learner already is a descriptor or task-adaptive classifier)."""
    from imaging_meta.learners.descriptors.classifier import DescriptorClassifier
    from imaging_meta.learners.descriptors.task_adaptive import TaskAdaptiveClassifier

    out: dict[str, Learner] = {RAW_PIXELS: DescriptorClassifier(features="pixels", pixel_size=32).eval()}
    if not isinstance(learner, (DescriptorClassifier, TaskAdaptiveClassifier)):
        out[TASK_ADAPTIVE] = TaskAdaptiveClassifier(learner).eval()
    return out


def ordered_methods(methods) -> list[str]:
    """The methods present in ``methods`` (names, or a dict keyed by them): ours first, others sorted."""
    return [m for m in METHOD_ORDER if m in methods] + sorted(m for m in methods if m not in METHOD_ORDER)


def initial_copy(learner: Learner) -> Learner:
    """A frozen copy of ``learner``'s initial weights: the untrained baseline.

    Its parameters keep ``requires_grad``: gradient-based learners adapt them in ``predict`` (through
    ``torch.autograd.grad``, which never fills ``.grad``), and no optimiser ever sees them.
    """
    return copy.deepcopy(learner)


def untrained_state(untrained: Learner) -> dict:
    """The untrained learner's state for a checkpoint (CPU tensors; extra state such as a learner's
    class-name table is kept as it is)."""
    return {k: v.detach().cpu() if isinstance(v, torch.Tensor) else v for k, v in untrained.state_dict().items()}


def restore_untrained(extra: dict, into: Learner | None = None, device: str | torch.device = "cpu") -> Learner | None:
    """The untrained learner of a checkpoint.

    Args:
        extra: the checkpoint's ``imaging_meta`` section (``untrained_state_dict``, ``learner_config``).
        into: a learner to load the weights into (the module's copy); None builds one from ``learner_config``.
        device: where a newly built learner goes.

    Returns:
        ``into`` or the new learner (in eval mode, on ``device``), or None when the checkpoint kept no
        untrained weights (a fit with ``baselines: false``); ``into`` is then left as it is.
    """
    state = extra.get("untrained_state_dict")
    if not state:
        return None
    if into is not None:
        into.load_state_dict(state)
        return into
    from imaging_meta.checkpoint_io import offline_learner_config

    learner = build_learner(offline_learner_config(extra["learner_config"]))  # never re-reads pretrained weights
    learner.load_state_dict(state)
    return learner.to(device).eval()
