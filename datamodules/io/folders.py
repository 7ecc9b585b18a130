"""`files_under`: the files of a folder tree, entering symbolic links to folders, each real folder once."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path


def files_under(folder: Path, skip: Iterable[str | os.PathLike] = ()) -> list[Path]:
    """Every entry under ``folder`` that is not a folder, at any depth, sorted: files and links to files or to
    nothing, also inside symbolic links to folders, each real folder entered once, by the first path to it in sorted
    order (a link back up is not walked again). ``Path.rglob`` does not enter a linked folder, and its images were
    left out without a word (a review, 2026-12-07); a walk that followed links without remembering the folders it
    had entered never ended on two links back up (a review of the index key).

    Args:
        skip: folders not entered (compared by their real paths), such as a cache folder inside the data folder.
    """
    out: list[Path] = []
    seen = {os.path.realpath(p) for p in skip} - {os.path.realpath(folder)}
    for here, dirs, files in os.walk(folder, followlinks=True):
        real = os.path.realpath(here)
        if real in seen:
            dirs[:] = []
            continue
        seen.add(real)
        dirs.sort()  # the first path to a folder reached twice is the same in every run
        out += [Path(here) / name for name in files]  # links to nothing among them (not folders to os.walk)
    return sorted(out)
