"""Where a report's numbers came from: package versions, Python, the platform and torch's thread count, and the git
commit of the imaging-meta source (`provenance`), for `imaging-meta evaluate` and `fit`'s test report."""

from __future__ import annotations

import importlib
import platform
import subprocess
from pathlib import Path

import torch

import imaging_meta

PACKAGES = ("torch", "monai", "lightning", "numpy", "scipy", "pydicom", "nibabel", "torchmetrics", "highdicom")


def is_source_checkout(src: Path) -> bool:
    """Whether ``src`` (the folder above the imaging_meta package) is imaging-meta's own source tree: its
    pyproject.toml names the project, and the package is not inside site-packages."""
    pyproject = src / "pyproject.toml"
    if "site-packages" in src.parts or "dist-packages" in src.parts or not pyproject.is_file():
        return False
    return 'name = "imaging-meta"' in pyproject.read_text(errors="replace")


def provenance() -> dict:
    """Package versions, Python, platform and the git commit of the imaging-meta source (``+dirty`` when
    its files differ from it or a file is there that it does not track; ``unknown`` outside a git checkout; for an installed package, which has no
    source checkout, says so rather than read the commit of a repository that happens to enclose it)."""
    versions = {"imaging_meta": imaging_meta.__version__, "python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = importlib.import_module(name).__version__
        except Exception:  # a package that is not installed is recorded as such
            versions[name] = "not installed"
    src = Path(imaging_meta.__file__).resolve().parent.parent
    commit = "unknown"
    # CPU results are byte-identical at the same thread count only (a sum's order follows the threads): recorded
    machine = {"platform": platform.platform(terse=True), "torch_threads": torch.get_num_threads()}
    if not is_source_checkout(src):  # an installed package: a repository around site-packages is not ours
        return {"versions": versions, "git_commit": "installed package (no source checkout)", **machine}
    try:
        head = subprocess.run(["git", "-C", str(src), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        if head.returncode == 0:
            commit = head.stdout.strip()
            # changed tracked files and new untracked ones (a new module changes what runs; `git diff` missed it: a
            # review); ignored files (caches, .pyc) are not source
            status = subprocess.run(["git", "-C", str(src), "status", "--porcelain", "--untracked-files=all", "--",
                                     "imaging_meta", "datamodules"], capture_output=True, text=True, timeout=10)
            commit += "+dirty" if status.returncode == 0 and status.stdout.strip() else ""
    except (OSError, subprocess.SubprocessError):
        pass
    return {"versions": versions, "git_commit": commit, **machine}
