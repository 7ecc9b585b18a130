"""`files_under`: the files of a folder tree, entering symbolic links to folders, each real folder once."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from pathlib import Path


def files_under(
    folder: Path,
    skip: Iterable[str | os.PathLike] = (),
    *,
    on_revisit: Callable[[Path, str], None] | None = None,
    on_error: Callable[[OSError], None] | None = None,
) -> list[Path]:
    """Every entry under ``folder`` that is not a folder, at any depth, sorted: files and links to files or to
    nothing, also inside symbolic links to folders. Each real folder is entered once, by the first listing that
    reaches it (a folder's subfolders, in sorted order, are claimed before any of theirs: ``a/link -> b`` beside
    ``b`` is walked as ``b``). ``Path.rglob`` does not enter a linked folder, and its images were left out without
    a word (a review, 2026-12-07); a walk that followed links without remembering the folders it had entered never
    ended on two links back up (a review of the index key). The index scan walks with this too.

    Args:
        skip: folders not entered (compared by their real paths), such as a cache folder inside the data folder.
        on_revisit: called with a folder's path and its real path when it is not entered because that real folder
            is (a link back up, or a second link to one folder).
        on_error: called with the error of a folder that cannot be listed (its files are left out).
    """
    out: list[Path] = []
    seen = {os.path.realpath(folder)}
    skipped = {os.path.realpath(p) for p in skip} - seen
    for here, dirs, files in os.walk(folder, followlinks=True, onerror=on_error):
        keep = []
        for d in sorted(dirs):
            real = os.path.realpath(os.path.join(here, d))
            if real in skipped:
                continue
            if real in seen:
                if on_revisit is not None:
                    on_revisit(Path(here) / d, real)
                continue
            seen.add(real)
            keep.append(d)
        dirs[:] = keep
        out += [Path(here) / name for name in files]  # links to nothing among them (not folders to os.walk)
    return sorted(out)
