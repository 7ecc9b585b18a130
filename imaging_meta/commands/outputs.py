"""The files a command will write, checked against its inputs before any work is done.

A command that writes one file per input names each output after its input (``segment``: the query's NIfTI stem
or series folder; ``classify --explain``: the query's number and stem). Two inputs with one name, or an output
folder that holds an input, would then silently replace one result with another, or an input with a result.
`check_outputs` refuses such a plan with one message that names the files, before the checkpoint is even read.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path


def _key(path: Path) -> str:
    """A path's identity on disk: its real path (links and ``..`` resolved), as the OS compares names."""
    return os.path.normcase(os.path.realpath(path))


def check_output_folder(folder: str | os.PathLike, option: str = "--out", writable: bool = True) -> Path:
    """The output folder of a command, refused when a file of that name exists (it would fail after the work).

    Args:
        writable: refuse a folder that cannot be written to (or created); False for a cache that may be complete
            on read-only storage.

    Raises:
        ValueError: ``folder`` exists and is not a folder, lies under a file, or (``writable``) cannot be written to
            or created.
    """
    p = Path(folder)
    if p.exists() and not p.is_dir():
        raise ValueError(f"{p}: a file of that name exists; {option} names the output folder (give a new or existing folder)")
    parent = _nearest_existing_parent(p)
    if not parent.is_dir():  # a file above it: the folder could never be created
        raise ValueError(f"{p}: {parent} is a file, so {option} cannot be created under it")
    where = p if p.is_dir() else parent
    if writable and not os.access(where, os.W_OK | os.X_OK):  # read-only or not ours: say so now, not after the work
        raise ValueError(f"{p}: cannot write in {where} (permission denied or a read-only file system); give "
                         f"another {option}")
    return p


def check_output_file(path: str | os.PathLike, option: str = "--out", example: str = "predictions.csv") -> Path:
    """An output file of a command, refused when a folder of that name exists.

    Args:
        example: a file name to suggest inside a folder given instead of a file.

    Raises:
        ValueError: ``path`` is an existing folder, or ends with a path separator (a folder meant: a file of that
            name was written), exists and is not a regular file (a FIFO, a device), lies under a file, or its
            nearest existing folder cannot be written to (checked before the work, not when the file is written).
    """
    p = Path(path)
    if p.is_dir() or str(path).endswith(("/", os.sep)):
        raise ValueError(f"{path}: names a folder; {option} names the file to write (e.g. {p / example})")
    if p.exists() and not p.is_file():  # a FIFO or a device, which the write would replace (a review)
        raise ValueError(f"{path}: not a regular file (a FIFO, a device or a socket); {option} names the file to write")
    parent = _nearest_existing_parent(p)  # it must be a folder that takes new files
    if not parent.is_dir():
        raise ValueError(f"{p}: {parent} is a file, so {option} cannot be written under it")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"{p}: cannot write in {parent} (permission denied); give another {option}")
    return p


def _ignores_case(folder: Path) -> bool:
    """Whether the file system of ``folder`` (an existing folder, or a file in one) treats names that differ only
    in letter case as one (Windows, macOS, many network shares): a probe file is made and looked up in upper case.
    False where no probe can be made (the folder is refused as not writable elsewhere)."""
    where = folder if folder.is_dir() else folder.parent
    try:
        fd, probe = tempfile.mkstemp(prefix=".case-probe-", dir=where)
    except OSError:
        return False
    try:
        os.close(fd)
        return os.path.exists(os.path.join(where, os.path.basename(probe).upper()))
    finally:
        os.unlink(probe)


def _check_name_length(path: Path, source: str) -> None:
    """Refuse an output whose file name is longer than its file system takes (255 bytes on most): it would fail
    after the work, with the query's result lost."""
    folder = _nearest_existing_parent(path)
    try:
        limit = os.pathconf(folder if folder.is_dir() else folder.parent, "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):  # no pathconf (Windows) or no answer
        limit = 255
    size = len(os.fsencode(path.name))
    if size > limit:
        raise ValueError(f"{path.name}: the name of the output of {source} is {size} bytes, more than the {limit} its "
                         f"file system takes; rename the input with a shorter name")


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
    folded: dict[str, tuple[Path, str]] = {}  # the same, letters folded: one file where case is ignored
    for path, source in planned:
        key = _key(path)
        if key in sources and sources[key] != source:
            raise ValueError(
                f"{path}: {sources[key]} and {source} would both be written to this file (outputs are named after "
                "their input); rename one of them, or run them in separate runs with different output folders"
            )
        sources[key] = source
        other = folded.setdefault(key.casefold(), (path, source))
        if other[1] != source and other[0] != path and _ignores_case(_nearest_existing_parent(path)):
            raise ValueError(
                f"{path} and {other[0]}: the outputs of {source} and {other[1]} differ only in the case of their "
                "letters, and this file system ignores case (one file for both); rename one of the inputs, or run "
                "them in separate runs with different output folders"
            )
        _check_name_length(path, source)
    for p in map(Path, inputs):
        if p.is_file() and _key(p) in sources:
            raise ValueError(
                f"{p}: this input would be overwritten by the output of {sources[_key(p)]}; choose an output "
                "location that holds none of the inputs"
            )
