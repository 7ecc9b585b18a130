"""``imaging-meta configs``: the YAML configs that ship with the package, listed or copied out.

After ``pip install imaging-meta`` there is no repository ``configs/`` folder; the same files are inside the
package (``imaging_meta/configs``; the repository's ``configs`` is a link to them). ``imaging-meta configs``
lists them; ``imaging-meta configs --copy DIR`` writes them to ``DIR`` (never over a file that differs, unless
``--force``), so that every documented ``--config configs/...`` works from ``DIR``'s parent.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

SHIPPED = Path(__file__).resolve().parents[1] / "configs"


def shipped_configs() -> list[Path]:
    """The shipped YAML files, relative to the configs folder, sorted."""
    if not SHIPPED.is_dir():
        raise FileNotFoundError(f"{SHIPPED}: the package's configs folder is missing; reinstall imaging-meta")
    return sorted(p.relative_to(SHIPPED) for p in SHIPPED.rglob("*.yaml"))


def model_configs_of(class_path: str, task: str | None = None) -> list[str]:
    """The shipped model configs (``configs/model/NAME.yaml``) whose learner is ``class_path``, for ``task``
    (``segmentation``: ``*_seg.yaml``, ``classification``: ``*_cls.yaml``; None: both)."""
    folder = SHIPPED / "model"
    if not folder.is_dir():
        return []
    import yaml

    from imaging_meta.tasks import get_task

    suffix = f"_{get_task(task).suffix}" if task else ""  # the task kinds are tasks.py's (ARCHITECTURE.md)
    # the learner's own class_path, not one nested in its arguments: a wrapper (fine-tuning, task-adaptive) holds
    # its embedding's, and was named for a checkpoint of that embedding's learner, which it refuses (a review)
    return [f"configs/model/{p.name}" for p in sorted(folder.glob(f"*{suffix}.yaml"))
            if ((yaml.safe_load(p.read_text()) or {}).get("model") or {}).get("learner", {}).get("class_path")
            == class_path]


def copy_configs(out: str | os.PathLike, force: bool = False) -> list[Path]:
    """Copy every shipped config into ``out`` (keeping the sub-folders); returns the files written.

    Raises:
        FileExistsError: when a file in ``out`` differs from the shipped one and ``force`` is not set, or when
            something that is not a folder stands where a folder must be made, or a folder where a config goes
            (nothing is written then, in either case).
    """
    out = Path(out)
    files = shipped_configs()
    folders = {out} | {out / parent for f in files for parent in f.parents if parent != Path(".")}
    blocked = sorted([d for d in folders if d.exists() and not d.is_dir()]
                     + [out / f for f in files if (out / f).exists() and not (out / f).is_file()])
    if blocked:
        raise FileExistsError(
            f"{blocked[0]}: is in the way of the configs (a file where a folder goes, or a folder where a config "
            f"goes; {len(blocked)} in all); nothing was written. Move it, or copy into another folder"
        )
    clash = [f for f in files if (out / f).is_file() and (out / f).read_bytes() != (SHIPPED / f).read_bytes()]
    if clash and not force:
        raise FileExistsError(
            f"{out}: {len(clash)} config(s) differ from the shipped ones (e.g. {clash[0]}); nothing was written. "
            "Pass --force to overwrite them, or copy into another folder"
        )
    written = []
    for f in files:
        (out / f).parent.mkdir(parents=True, exist_ok=True)
        if not (out / f).is_file() or (out / f).read_bytes() != (SHIPPED / f).read_bytes():
            shutil.copyfile(SHIPPED / f, out / f)
            written.append(out / f)
    return written
