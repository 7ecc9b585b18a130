"""`atomic_open`: write a file so that it is either complete or absent, never half-written.

Every file a later run trusts (the scan index, the item-table cache, episode files, reports, predictions,
checkpoints) is written through it: the bytes go to a temporary file beside the target, are flushed to
disk, and only then take the target's name with ``os.replace``, which is atomic on one filesystem. An
interrupted write (an error, Ctrl-C, a killed job) removes the temporary file and leaves any previous
version of the target untouched.
"""

from __future__ import annotations

import os
import re
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO


@contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", **kwargs) -> Iterator[IO]:
    """Open a temporary file beside ``path`` for writing; on success it replaces ``path``.

    Args:
        path: the target file (its folder is created).
        mode: ``"w"`` (text) or ``"wb"`` (binary).
        **kwargs: passed to ``open`` (``encoding``, ``newline``).

    Yields:
        The open temporary file.

    Raises:
        ValueError: ``path`` exists and is not a regular file (a FIFO, a device): replacing it would lose it.
        OSError: from the file system; one that names no file (a full disk) names ``path``.
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open writes whole files: mode must be 'w' or 'wb', got {mode!r}")
    # a symbolic link is written through, to the file it names (it was replaced by a file of its own, and the file
    # it named kept its old content; a review)
    target = Path(os.path.realpath(path))
    if target.exists() and not target.is_file() and not target.is_dir():
        raise ValueError(f"{path}: not a regular file (a FIFO, a device or a socket), which a write would replace; "
                         "give the path of a file")
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{_temp_name(target.name)}.", suffix=".partial", dir=target.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600: give the file the mode a plain open() would
        with os.fdopen(fd, mode, **kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        name_the_file(e, path)
        raise


def name_the_file(error: BaseException, path: str | os.PathLike) -> None:
    """Give an operating-system error that names no file (a full disk's, from write or fsync) ``path``, so that
    the command's one line says what was being written (a review). One without an errno (PIL's, a caller's) keeps
    its message, which a filename would replace."""
    if isinstance(error, OSError) and error.filename is None and error.errno is not None:
        error.filename = str(path)


#: the bytes of the target's name kept in its temporary file's name, which adds 18 bytes (a dot, a dot, 8 random
#: characters, ".partial"): a name near the file system's 255-byte limit could be written, its temporary file not
TEMP_NAME_BYTES = 96


#: Lightning's SLURM requeue resumes from the largest number it finds in any name holding ``hpc_ckpt_`` in the run's
#: root (all its digits, joined): a killed save's temporary file, ``.hpc_ckpt_2.ckpt.k3z9_a1b.partial``, made it
#: look for ``hpc_ckpt_2391.ckpt`` at every later requeue (a review). Temporary names spell it otherwise.
HPC_KEY, HPC_TEMP = "hpc_ckpt_", "hpc-ckpt-"


def _temp_name(name: str) -> str:
    """``name`` as its temporary file holds it: cut to `TEMP_NAME_BYTES` bytes of UTF-8 on a character boundary,
    ``hpc_ckpt_`` spelt `HPC_TEMP`."""
    return name.encode("utf-8", "surrogateescape")[:TEMP_NAME_BYTES].decode("utf-8", "ignore").replace(HPC_KEY, HPC_TEMP)


#: the temporary files `atomic_open` makes: ``.<target name, maybe cut>.<8 random characters>.partial``
_PARTIAL = re.compile(r"^\.(?P<name>.+)\.[^.]{8}\.partial$")


def partial_target(path: Path) -> Path | None:
    """The file a temporary file of `atomic_open` was to become (its name ending in "…" where it may have been cut
    to `TEMP_NAME_BYTES`), or None when ``path`` is no such temporary file: an error names the file the user asked
    for, not ``.index.json.rw8hfvgo.partial``."""
    match = _PARTIAL.match(path.name)
    if match is None:
        return None
    name = match.group("name").replace(HPC_TEMP, HPC_KEY)
    maybe_cut = len(os.fsencode(name)) > TEMP_NAME_BYTES - 4  # a cut keeps whole characters (up to 4 bytes)
    return path.parent / (name + "…" if maybe_cut else name)


_UMASK_LOCK = threading.Lock()


def _umask() -> int:
    """The process's umask, without changing it where the system says it (Linux: ``/proc/self/status``).

    Elsewhere it is set and put back under a lock: setting it to read it is not thread-safe (two threads left
    the process at 000 for good, and a file another thread created meanwhile got mode 666; a review).
    """
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _UMASK_LOCK:
        mask = os.umask(0)
        os.umask(mask)
    return mask


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` through `atomic_open`."""
    with atomic_open(path, "wb") as f:
        f.write(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` through `atomic_open`."""
    with atomic_open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return Path(path)
