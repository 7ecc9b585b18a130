"""The learner interface: a plain ``nn.Module``, free of Lightning, logging and file I/O."""

from __future__ import annotations

import functools
import inspect
from typing import Any

import torch
from torch import nn

from imaging_meta.episode import Episode


class Learner(nn.Module):
    """Base class of every learner.

    A learner is given batched episodes (leading task dimension, see `imaging_meta.episode`) and does two
    things: `loss` returns the meta-training loss, and `predict` adapts on the support set and returns
    predictions for the query set. ``task`` says which kind of episode it takes.

    Every subclass records the arguments it was built with (`config`), so that a checkpoint can rebuild it
    without pickling code.
    """

    task: str = "segmentation"
    #: the number of ways a learner with an n-way head was built for; None when any n_way works
    n_way: int | None = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        init = cls.__dict__.get("__init__")
        if init is None:
            return
        signature = inspect.signature(init)

        @functools.wraps(init)
        def recording_init(self, *args, **kw):
            init(self, *args, **kw)
            # the outermost __init__ finishes last, so its record wins; a subclass without an __init__ of its
            # own is recorded by its nearest parent's, under its own class path
            bound = signature.bind(self, *args, **kw)
            bound.apply_defaults()
            arguments = dict(bound.arguments)
            arguments.pop("self")
            self._init_config = {"class_path": f"{type(self).__module__}.{type(self).__qualname__}", "init_args": arguments}

        cls.__init__ = recording_init

    @property
    def config(self) -> dict[str, Any]:
        """``{"class_path", "init_args"}`` that rebuild this learner (as in a LightningCLI YAML)."""
        return getattr(self, "_init_config", {"class_path": f"{type(self).__module__}.{type(self).__qualname__}", "init_args": {}})

    def loss(self, episode: Episode) -> torch.Tensor:
        """Meta-training loss of a batch of episodes (a scalar tensor)."""
        raise NotImplementedError

    def predict(self, episode: Episode) -> torch.Tensor:
        """Query predictions after adapting on the support set.

        Returns:
            segmentation: (T, n_query, H, W) foreground probabilities;
            classification: (T, n_query, n_way) class probabilities.
        """
        raise NotImplementedError


def check_classification_episode(episode: Episode, n_way: int, name: str) -> Episode:
    """The episode, batched, after checking it holds class indices in ``[0, n_way)`` (names the fix otherwise)."""
    ep = episode.unsqueeze()
    if ep.support_labels.dim() != 2 or ep.query_labels.dim() != 2:
        raise ValueError(
            f"{name} is a classification learner: labels must be (T, n) class indices, got support "
            f"{tuple(ep.support_labels.shape)} and query {tuple(ep.query_labels.shape)}; use a classification datamodule"
        )
    top = int(max(ep.support_labels.max(), ep.query_labels.max()))
    if top >= n_way or int(min(ep.support_labels.min(), ep.query_labels.min())) < 0:
        raise ValueError(f"{name} was built with n_way={n_way} but the episode has label {top}; set n_way to the data's n_way")
    return ep


def build_learner(config: dict[str, Any]) -> Learner:
    """Rebuild a learner from its `Learner.config` (only classes under ``imaging_meta.learners``)."""
    import importlib

    class_path = config.get("class_path", "")
    module_name, _, name = class_path.rpartition(".")
    if not module_name.startswith("imaging_meta.learners"):
        raise ValueError(f"refusing to build {class_path!r}: learners must come from imaging_meta.learners")
    cls = getattr(importlib.import_module(module_name), name, None)
    if not (isinstance(cls, type) and issubclass(cls, Learner)):
        raise ValueError(f"{class_path!r} is not an imaging_meta Learner")
    return cls(**config.get("init_args", {}))
