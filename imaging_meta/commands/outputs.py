"""The files a command will write, checked against its inputs before any work is done.

A command that writes one file per input names each output after its input (``segment``: the query's NIfTI stem
or series folder; ``classify --explain``: the query's number and stem). Two inputs with one name, or an output
folder that holds an input, would then silently replace one result with another, or an input with a result.
`check_outputs` refuses such a plan with one message that names the files, before the checkpoint is even read.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path


def _key(path: Path) -> str:
    """A path's identity on disk: its real path (links and ``..`` resolved), as the OS compares names."""
    return os.path.normcase(os.path.realpath(path))


def check_output_folder(folder: str | os.PathLike, option: str = "--out") -> Path:
    """The output folder of a command, refused when a file of that name exists (it would fail after the work).

    Raises:
        ValueError: ``folder`` exists and is not a folder, or lies under a file.
    """
    p = Path(folder)
    if p.exists() and not p.is_dir():
        raise ValueError(f"{p}: a file of that name exists; {option} names the output folder (give a new or existing folder)")
    parent = _nearest_existing_parent(p)
    if not parent.is_dir():  # a file above it: the folder could never be created
        raise ValueError(f"{p}: {parent} is a file, so {option} cannot be created under it")
    return p


def check_output_file(path: str | os.PathLike, option: str = "--out") -> Path:
    """An output file of a command, refused when a folder of that name exists.

    Raises:
        ValueError: ``path`` is an existing folder, lies under a file, or its nearest existing folder cannot be
            written to (checked before the work, not when the file is written).
    """
    p = Path(path)
    if p.is_dir():
        raise ValueError(f"{p}: a folder of that name exists; {option} names the file to write (e.g. {p / 'predictions.csv'})")
    parent = _nearest_existing_parent(p)  # it must be a folder that takes new files
    if not parent.is_dir():
        raise ValueError(f"{p}: {parent} is a file, so {option} cannot be written under it")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"{p}: cannot write in {parent} (permission denied); give another {option}")
    return p


def _nearest_existing_parent(path: Path) -> Path:
    """The closest folder (or file) above ``path`` that exists: where its missing folders would be created."""
    return next(parent for parent in path.absolute().parents if parent.exists())


def check_outputs(planned: Sequence[tuple[Path, str]], inputs: Iterable[str | os.PathLike]) -> None:
    """Refuse a plan of outputs that would overwrite an input or write one file twice.

    Args:
        planned: (output path, what it is made from, e.g. the input's path) per file the command will write.
        inputs: every file the command reads (folders are ignored: an output can sit beside a series' files).

    Raises:
        ValueError: two outputs with one path (naming both sources), or an output that is an input file.
    """
    sources: dict[str, str] = {}
    for path, source in planned:
        key = _key(path)
        if key in sources and sources[key] != source:
            raise ValueError(
                f"{path}: {sources[key]} and {source} would both be written to this file (outputs are named after "
                "their input); rename one of them, or run them in separate runs with different output folders"
            )
        sources[key] = source
    for p in map(Path, inputs):
        if p.is_file() and _key(p) in sources:
            raise ValueError(
                f"{p}: this input would be overwritten by the output of {sources[_key(p)]}; choose an output "
                "location that holds none of the inputs"
            )
