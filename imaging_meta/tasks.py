"""The two kinds of few-shot task, segmentation and classification, and everything that differs between them.

This is the one place that knows the task kinds. Everything else asks a `Task` object instead of comparing a
kind string: learners for their head size, loss and probabilities; the Lightning module, `evaluate` and
`results` for the metric, the decision rule, the fields of a per-query record, the baselines, and the
metrics and rows of the reports. A task names its metrics; `imaging_meta.evaluation` knows how to compute
and summarise each metric, by its name.

A task is named by its `Task.name` (``"segmentation"`` or ``"classification"``) in YAML configs, learner
configs and checkpoints; `get_task` turns the name into the object, `task_of_learner_config` reads it from a
learner config.

Shapes (see `imaging_meta.episode`): segmentation labels are masks shaped like the images without the
channel, (N, H, W); classification labels are class indices, (N,). Batched episodes add a leading task
dimension T; their query tensors are (T, Q, ...).

This module imports only torch, NumPy and the episode contract (learners use it; see ARCHITECTURE.md).
"""

from __future__ import annotations

import importlib
import inspect
import json

import numpy as np
import torch
import torch.nn.functional as F

from imaging_meta.episode import Episode

#: the method name of the copy-the-support-mask baseline in records and reports
COPY_MASK = "copy support mask"


class Task:
    """What differs between segmentation and classification. Subclasses fill every attribute and method.

    Attributes:
        name: the kind's name in configs and checkpoints.
        suffix: the model and data config name suffix (``protonet_seg.yaml``) and the prefix of the
            `imaging-meta results` options of this kind (``--seg-data``).
        metric: the per-query score of records and logs (``dice`` or ``acc``; `imaging_meta.evaluation.scoring`
            computes it by name).
        metric_title: the metric as a table title.
        groups: the rows of a ``test`` report and of the validation logs besides "all" (fields of a record).
        report_metrics: the metrics of an ``imaging-meta evaluate`` report (name: title), the headline first
            (`imaging_meta.evaluation.statistics` summarises each by name).
        report_groups: the rows of an ``imaging-meta evaluate`` report besides "all".
        baseline_methods: the methods of `baselines`, as they appear in reports.
        dense: True when labels are masks shaped like the images (segmentation).
        label_kind: what the labels are, in error messages.
        sweep_shots: whether ``imaging-meta results`` tests every ``--shots`` count, or only the data config's.
        csv_columns: the header of an evaluation's ``records.csv`` (see `csv_row`).
    """

    name: str = ""
    suffix: str = ""
    metric: str = ""
    metric_title: str = ""
    groups: tuple[str, ...] = ()
    report_metrics: dict[str, str] = {}
    report_groups: tuple[str, ...] = ()
    baseline_methods: tuple[str, ...] = ()
    dense: bool = False
    label_kind: str = ""
    sweep_shots: bool = False
    csv_columns: tuple[str, ...] = ()

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"

    # ---------------------------------------------------------------- learner side
    def n_outputs(self, n_way: int) -> int:
        """Logit channels of a task head for an ``n_way`` episode."""
        raise NotImplementedError

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The training loss of head logits against labels (a scalar)."""
        raise NotImplementedError

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """What `Learner.predict` returns, from head logits."""
        raise NotImplementedError

    def labels_fit(self, images: torch.Tensor, labels: torch.Tensor) -> bool:
        """Whether ``labels`` are this task's kind of labels for ``images`` (any leading dimensions)."""
        return (labels.dim() == images.dim() - 1) == self.dense

    def episode_ways(self, episode: Episode) -> int | None:
        """The number of classes of a batched episode, when its learner's head must match it (else None)."""
        return None

    def n_shot(self, episode: Episode) -> int:
        """The shots of a batched episode: support items per class (segmentation: support slices)."""
        raise NotImplementedError

    def chance(self, n_way: int | None) -> float | None:
        """The chance level of `metric` for ``n_way`` episodes, when there is one."""
        return None

    # ------------------------------------------------------------- evaluation side
    def decide(self, probs: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
        """The decision from a learner's probabilities: masks, or class indices."""
        raise NotImplementedError

    def baselines(self, episode: Episode) -> dict[str, torch.Tensor]:
        """Decisions of the task's label-only baselines on a batched episode, by method name (none by default)."""
        return {}

    def truth(self, labels: torch.Tensor) -> torch.Tensor:
        """The labels as `decide`'s decisions are scored against (same shape as ``labels``)."""
        raise NotImplementedError

    def query_fields(self, episode: Episode, i: int, j: int, probs: torch.Tensor | None) -> dict:
        """The task's fields of the record of query ``j`` of task ``i`` (``probs``: the method's (T, Q, ...)
        probabilities on the CPU, None for a label-only baseline)."""
        raise NotImplementedError

    def csv_row(self, record: dict) -> list:
        """One ``records.csv`` row of a record, in the order of `csv_columns`."""
        raise NotImplementedError


class SegmentationTask(Task):
    """One structure per episode: binary masks; Dice (and HD95 in evaluation) per query; rows per organ and per site."""

    name = "segmentation"
    suffix = "seg"
    metric = "dice"
    metric_title = "Dice"
    groups = ("organ", "site")
    report_metrics = {"dice": "Dice", "hd95": "HD95 (mm)"}
    report_groups = ("organ", "site")
    baseline_methods = (COPY_MASK,)
    dense = True
    label_kind = "segmentation masks"
    sweep_shots = False
    csv_columns = ("method", "shot", "episode", "organ", "site", "patient", "query_id", "dice", "hd95")

    def n_outputs(self, n_way: int) -> int:
        return 2  # background, foreground

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Cross-entropy plus a soft Dice term, since organs fill a small share of a slice.

        Args:
            logits: (N, 2, H, W).
            labels: (N, H, W) binary masks.
        """
        target = (labels > 0.5).long()
        ce = F.cross_entropy(logits, target)
        fg = logits.softmax(1)[:, 1]
        t = target.float()
        inter = (fg * t).flatten(1).sum(1)
        dice = (2 * inter + 1.0) / (fg.flatten(1).sum(1) + t.flatten(1).sum(1) + 1.0)
        return ce + (1 - dice).mean()

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """(N, 2, H, W) logits -> (N, H, W) foreground probabilities."""
        return logits.softmax(1)[:, 1]

    def n_shot(self, episode: Episode) -> int:
        return int(episode.support_labels.shape[1])

    def decide(self, probs: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
        """(..., H, W) foreground probabilities -> boolean masks (probability > threshold)."""
        return probs > threshold

    def baselines(self, episode: Episode) -> dict[str, torch.Tensor]:
        """Copying the support mask (the majority vote of the support masks, a tie counted as foreground) to every
        query: (T, Q, H, W). With ties as background, two shots kept only what both masks share, and the baseline
        got worse with more support at every even number of shots (0.49 at 2 shots against 0.55 at 1; a review)."""
        copy = episode.support_labels.float().mean(1, keepdim=True) >= 0.5
        return {COPY_MASK: copy.expand_as(episode.query_labels)}

    def truth(self, labels: torch.Tensor) -> torch.Tensor:
        """(..., H, W) masks -> boolean masks (label > 0.5)."""
        return labels > 0.5

    def query_fields(self, episode: Episode, i: int, j: int, probs: torch.Tensor | None) -> dict:
        """The organ of the episode."""
        return {"organ": episode.classes[i][0]}

    def csv_row(self, record: dict) -> list:
        r = record
        return [r["method"], r["shot"], r["episode"], r["organ"], r["site"], r.get("patient", ""), r["query_id"], f"{r['dice']:.6f}",
                f"{r['hd95']:.4f}"]


class ClassificationTask(Task):
    """N classes per episode: class indices; accuracy per query; rows per site (an episode has several classes,
    so the unit of the CI, the episode, has no single class); an evaluation adds balanced accuracy, macro AUC
    and calibration, with rows per class too."""

    name = "classification"
    suffix = "cls"
    metric = "acc"
    metric_title = "accuracy"
    groups = ("site",)
    report_metrics = {"acc": "accuracy", "balanced_acc": "balanced accuracy", "auc": "macro AUC", "ece": "ECE"}
    report_groups = ("class", "site")
    dense = False
    label_kind = "class labels"
    sweep_shots = True
    #: ``probs`` in the order of ``classes`` (a JSON list of the episode's class names), each at full precision
    #: ``choice_*``: what a task-adaptive learner chose for the query's task (`imaging_meta.evaluation.scoring`;
    #: empty for other learners): its space, that space's leave-one-out accuracy, and its weights per space (JSON)
    csv_columns = ("method", "shot", "episode", "class", "site", "patient", "query_id", "label", "correct", "confidence",
                   "probs", "classes", "choice_space", "choice_loo_accuracy", "choice_weights")

    def n_outputs(self, n_way: int) -> int:
        if n_way < 2:
            raise ValueError(f"n_way must be >= 2, got {n_way}")
        return int(n_way)

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of (N, n_way) logits against (N,) class indices."""
        return F.cross_entropy(logits, labels.long())

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """(N, n_way) logits -> (N, n_way) class probabilities."""
        return logits.softmax(1)

    def episode_ways(self, episode: Episode) -> int | None:
        return len(episode.classes[0])

    def n_shot(self, episode: Episode) -> int:
        return int(episode.support_labels.shape[1]) // len(episode.classes[0])

    def chance(self, n_way: int | None) -> float | None:
        return 1 / int(n_way) if n_way else None

    def decide(self, probs: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
        """(..., n_way) probabilities -> class indices (argmax); ``threshold`` is not used."""
        return probs.argmax(-1)

    def truth(self, labels: torch.Tensor) -> torch.Tensor:
        """Class indices, as they are."""
        return labels

    def query_fields(self, episode: Episode, i: int, j: int, probs: torch.Tensor | None) -> dict:
        """The query's true class name, the episode's class names, the label and the class probabilities."""
        label = int(episode.query_labels[i, j])
        out = {"class": episode.classes[i][label], "classes": list(episode.classes[i]), "label": label}
        if probs is not None:
            out["probs"] = [float(v) for v in probs[i, j]]
        return out

    def csv_row(self, record: dict) -> list:
        r = record
        p = np.asarray(r["probs"])
        return [r["method"], r["shot"], r["episode"], r["classes"][r["label"]], r["site"], r.get("patient", ""),
                r["query_id"], r["label"],
                int(int(p.argmax()) == r["label"]), repr(float(p.max())), " ".join(repr(float(v)) for v in p),
                json.dumps(list(r["classes"])), r.get("choice_space") or "",
                "" if r.get("choice_loo_accuracy") is None else repr(float(r["choice_loo_accuracy"])),
                "" if r.get("choice_weights") is None else json.dumps(r["choice_weights"], sort_keys=True)]


SEGMENTATION = SegmentationTask()
CLASSIFICATION = ClassificationTask()
TASKS: dict[str, Task] = {t.name: t for t in (SEGMENTATION, CLASSIFICATION)}


def get_task(task: str | Task) -> Task:
    """The `Task` of a name (``"segmentation"``, ``"classification"``) or the task itself.

    Raises:
        ValueError: for any other name, listing the valid ones.
    """
    if isinstance(task, Task):
        return task
    try:
        return TASKS[str(task)]
    except KeyError:
        raise ValueError(f"task must be one of {sorted(TASKS)}, got {task!r}") from None


def task_of_episode(episode: Episode) -> Task:
    """The kind of task a (batched or not) episode holds, from the shape of its labels."""
    return SEGMENTATION if SEGMENTATION.labels_fit(episode.query_images, episode.query_labels) else CLASSIFICATION


def task_of_learner_config(config: dict) -> Task:
    """The task of a learner ``{"class_path", "init_args"}`` config, without building the learner: its
    ``task`` argument, else the default of that argument, else its class's ``task``.

    Raises:
        ValueError: a class path that cannot be imported.
    """
    module, _, name = str(config["class_path"]).rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as e:
        raise ValueError(f"learner class_path {config['class_path']!r} cannot be imported: {e}") from e
    args = config.get("init_args") or {}
    if "task" in args:
        return get_task(args["task"])
    param = inspect.signature(cls.__init__).parameters.get("task")
    if param is not None and param.default is not inspect.Parameter.empty:
        return get_task(param.default)
    return get_task(cls.task)
