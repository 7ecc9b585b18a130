"""Imported once by the worker server (see `benchmarks.common.run_isolated`), so that every isolated case
starts with the learners, the datamodules and `higher` already imported instead of paying seconds for it."""

from __future__ import annotations

import importlib
import pkgutil

import imaging_meta.learners

for _mod in pkgutil.walk_packages(imaging_meta.learners.__path__, "imaging_meta.learners."):
    importlib.import_module(_mod.name)

for _name in ("datamodules.segmentation", "datamodules.classification", "datamodules.sources.lesion_csv", "datamodules.indexing.scan",
              "higher"):
    try:
        importlib.import_module(_name)
    except ImportError:
        pass  # the case that needs it raises the error that names the package
