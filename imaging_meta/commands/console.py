"""The console of the ``imaging-meta`` command: the global options, ``--quiet``, and errors as one line.

* `split_global_options`: ``--debug`` and ``--quiet`` anywhere before a ``--``, before or after the command.
* `quiet_output`: no progress bars (`datamodules.progress`), the project's loggers at WARNING.
* `console`: the project's log lines on stderr; MONAI's irrelevant notices off unless ``--debug``.
* `user_error` / `error_line`: what `imaging_meta.commands.cli.main` prints instead of a traceback. Bad input
  (`USER_ERRORS`, also under MONAI's ``applying transform`` wrapper or in a DataLoader worker's re-raise) is one
  line that names the file, what is wrong and the fix (exit status 1); anything else is one line that says it
  is a bug, where it was raised, and to rerun with ``--debug`` (exit status 70).
"""

from __future__ import annotations

import builtins
import errno
import logging
import os
import re
import sys
import traceback
import warnings
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

from datamodules.io.atomic import partial_target

#: the options of every command, before or after its name (`split_global_options`)
GLOBAL_OPTIONS = {
    "--debug": "on an error, show the traceback (also: env IMAGING_META_TRACEBACK=1)",
    "--quiet": "no progress bars; log warnings and errors only",
}
#: exit statuses of `main`: bad input (one line on stderr), an unexpected error (a bug), Ctrl-C
EXIT_USER_ERROR, EXIT_BUG, EXIT_INTERRUPTED, EXIT_TERMINATED = 1, 70, 130, 143
PROJECT_LOGGERS = ("imaging_meta", "datamodules")


@dataclass(frozen=True)
class GlobalOptions:
    debug: bool = False
    quiet: bool = False


def debug_requested(options: GlobalOptions) -> bool:
    """``--debug``, or its alias the environment variable ``IMAGING_META_TRACEBACK`` (1, true, yes)."""
    flag = os.environ.get("IMAGING_META_TRACEBACK", "").strip().lower()
    return options.debug or flag not in ("", "0", "false", "no", "off")


def split_global_options(args: Sequence[str]) -> tuple[list[str], GlobalOptions]:
    """``--debug`` and ``--quiet`` taken out of ``args`` wherever they stand before a ``--``: before the command
    (``imaging-meta --debug segment ...``) or after it, for the project's commands and LightningCLI's alike
    (LightningCLI never sees them). The other arguments keep their order."""
    rest: list[str] = []
    found: set[str] = set()
    for i, arg in enumerate(args):
        if arg == "--":
            rest += args[i:]
            break
        if arg in GLOBAL_OPTIONS:
            found.add(arg)
        else:
            rest.append(arg)
    return rest, GlobalOptions(debug="--debug" in found, quiet="--quiet" in found)


@contextmanager
def quiet_output(quiet: bool) -> Iterator[None]:
    """``--quiet``: no progress bars (`datamodules.progress`, through its environment variable, which child
    processes inherit) and the project's loggers at WARNING; everything is restored on exit."""
    if not quiet:
        yield
        return
    from datamodules.progress import ENV as PROGRESS_ENV

    with ExitStack() as stack:
        stack.enter_context(_environ({PROGRESS_ENV: "0", "IMAGING_META_LOGLEVEL": "WARNING"}))
        stack.enter_context(_logger_levels(PROJECT_LOGGERS, logging.WARNING))
        yield


def quiet_lightning() -> None:
    """Lightning's own loggers at WARNING for the rest of the process (imported first: importing Lightning sets
    them to INFO)."""
    import lightning.fabric
    import lightning.pytorch  # noqa: F401

    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)


@contextmanager
def _environ(values: dict[str, str]) -> Iterator[None]:
    """Set environment variables for a while (child processes see them), then restore them."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextmanager
def _logger_levels(names: Sequence[str], level: int | str) -> Iterator[None]:
    loggers = [logging.getLogger(n) for n in names]
    saved = [log.level for log in loggers]
    for log in loggers:
        log.setLevel(level)
    try:
        yield
    finally:
        for log, old in zip(loggers, saved, strict=True):
            log.setLevel(old)


class _StderrHandler(logging.StreamHandler):
    """A log handler that writes to whatever ``sys.stderr`` is at the time (pytest's capture swaps it)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


#: MONAI's notices that concern neither the user nor the result: a GPU DICOM decoder that is not installed,
#: and a changed default that `datamodules.transforms` does not rely on. --debug shows them.
_MONAI_NOISE = (r"NvImgCodecPydicomReader", r".*Orientationd\.__init__:labels")


@contextmanager
def console(debug: bool) -> Iterator[None]:
    """The process's console for one run of `imaging_meta.commands.cli.main`: the project's log lines on stderr (level from
    ``IMAGING_META_LOGLEVEL``, default INFO), MONAI's noise off unless ``debug``, ``IMAGING_META_TRACEBACK=1``
    for child processes when ``debug``. Restored on exit."""
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    level = os.environ.get("IMAGING_META_LOGLEVEL", "INFO").upper()
    if not isinstance(logging.getLevelName(level), int):
        level = "INFO"
    with ExitStack() as stack:
        stack.enter_context(_logger_levels(PROJECT_LOGGERS, level))  # Lightning configures its own loggers
        for name in PROJECT_LOGGERS:
            logging.getLogger(name).addHandler(handler)
            stack.callback(logging.getLogger(name).removeHandler, handler)
        stack.enter_context(warnings.catch_warnings())
        if debug:
            stack.enter_context(_environ({"IMAGING_META_TRACEBACK": "1"}))
        else:
            for pattern in _MONAI_NOISE:
                warnings.filterwarnings("ignore", message=pattern)
            stack.enter_context(_logger_levels(["monai.data.nvimgcodec_pydicom_plugin"], logging.ERROR))
        yield


#: the project's errors for bad input (a file, a folder, a checkpoint, an argument, a failed child run): the
#: message names what is wrong and the fix. `datamodules.io.DicomError`, `DicomSeriesError`,
#: `imaging_meta.checkpoint_io.CheckpointError`, `datamodules.recipes.prepare.PrepareError` are ValueErrors;
#: files that are missing or unreadable raise OSError; an optional extra that is not installed, ImportError
#: (only when it says ``pip install`` or names a module outside the project: `_missing_package`);
#: training that diverged, FloatingPointError; Lightning's MisconfigurationException (`_lightning_misconfiguration`).
#: Anything else (TypeError, KeyError, a bare RuntimeError...) is a bug.
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError, ImportError, FloatingPointError)

_WORKER_ERROR = re.compile(r"^Caught \w+ in DataLoader worker process \d+\.\nOriginal Traceback")
_TRACEBACK_LINE = re.compile(r"^([A-Za-z_][\w.]*): (.*)$")


def _is_user_error_name(name: str) -> bool:
    """Whether an exception class named as in a traceback (``ValueError``, ``datamodules.io.dicom_errors.DicomError``)
    is one of `USER_ERRORS` (looked up among the modules already loaded; nothing is imported)."""
    module, _, attr = name.rpartition(".")
    owner = builtins if not module else sys.modules.get(module)
    cls = getattr(owner, attr, None) if owner is not None else None
    return isinstance(cls, type) and issubclass(cls, USER_ERRORS)


def _worker_error(text: str) -> str | None:
    """The message of the outermost user error in a DataLoader worker's traceback text (torch re-raises a worker's
    exception with the worker's traceback as its message), or None."""
    found = None
    for line in text.splitlines():
        match = _TRACEBACK_LINE.match(line)
        if match and not line.startswith(" ") and _is_user_error_name(match.group(1)):
            found = match.group(2)
    return found


def _lightning_misconfiguration(error: BaseException) -> bool:
    """Whether ``error`` is Lightning's ``MisconfigurationException`` (a trainer setting this machine or run cannot
    honour: ``accelerator: gpu`` without a GPU, a strategy without its devices), by name, so that this module
    never imports Lightning."""
    return any(c.__name__ == "MisconfigurationException" and c.__module__.startswith("lightning.")
               for c in type(error).__mro__)


def user_error(error: BaseException) -> str | None:
    """The message of the bad input ``error`` stands for, or None when it is a bug.

    A user error is one of `USER_ERRORS`, or such an error under MONAI's ``RuntimeError("applying transform
    ...")`` (its cause), or in a DataLoader worker's traceback; the outermost one counts, since a project error
    raised ``from`` a library's error adds the file and the fix.
    """
    e: BaseException | None = error
    for _ in range(32):
        if e is None:
            return None
        if _WORKER_ERROR.match(str(e)):
            return _worker_error(str(e))
        if isinstance(e, ImportError) and not _missing_package(e):
            return None  # a broken import inside the project is a bug, not a missing extra
        message = _os_error_message(e) if isinstance(e, OSError) else None
        if message is not None:
            return message
        if isinstance(e, USER_ERRORS) or _lightning_misconfiguration(e):
            return str(e)
        if isinstance(e, RuntimeError) and str(e).startswith("applying transform"):
            e = e.__cause__
            continue
        return None
    return None


#: what an operating-system error on a path means and what to do, by errno: said for reading and writing alike
#: (the error does not say which); the path is the file meant (`_os_error_message`)
_OS_FIXES = {
    errno.EROFS: "on a read-only file system, where nothing can be written; write the output somewhere else (another "
                 "--out, or cache_dir for fit)",
    errno.EACCES: "permission denied to this user; give it read (inputs) or write (outputs) permission, or use "
                  "another path",
    errno.EPERM: "operation not permitted to this user; check the path's owner and permissions, or use another path",
    errno.ENOSPC: "no space left on the device; free some space, or write the output to another disk",
    errno.EDQUOT: "the disk quota is exceeded; free some space, or write the output to another disk",
    errno.EISDIR: "is a folder where a file was expected; give a file's path, or move the folder",
    errno.ENOTDIR: "a part of this path is a file, not a folder; give a path whose folders are folders",
    errno.EEXIST: "a file of that name exists where a folder is to be made; move it, or give another path",
    errno.ENAMETOOLONG: "the name is longer than the file system takes; give a shorter name",
    errno.ENOTEMPTY: "a folder that is not empty is in the way (another run may have written it at the same moment); "
                     "give a new folder",
    errno.ELOOP: "a symbolic link loop; point the link at a file or folder",
}
#: errors that concern the target of a rename (``filename2``), when the error names one
_TARGET_ERRORS = (errno.ENOTEMPTY, errno.EEXIST)
#: errors whose fix does not depend on the path, said without one when the error names none (a full disk does not)
_PATHLESS = (errno.ENOSPC, errno.EDQUOT)


def _os_error_message(error: OSError) -> str | None:
    """A one-line message for an operating-system error the user can fix (`_OS_FIXES`), naming the file the
    command meant (not its temporary ``.partial`` file); None for other errors."""
    fix = _OS_FIXES.get(error.errno) if error.errno is not None else None
    if fix is None:
        return None
    detail = f" ({error.strerror or type(error).__name__})"
    if error.filename is None:
        return fix[0].upper() + fix[1:] + detail if error.errno in _PATHLESS else None
    # a rename's error about its target (a folder in the way) names the target second
    named = error.filename2 if error.errno in _TARGET_ERRORS and error.filename2 is not None else error.filename
    path = Path(os.fsdecode(named))
    path = partial_target(path) or path  # an atomic write's temporary file: the file it was to become
    return f"{path}: {fix}{detail}"


def non_negative_int(text: str) -> int:
    """An argparse type: an integer of at least 0 (argparse names the option in its error)."""
    value = int(text)
    if value < 0:
        raise ValueError(text)  # argparse: "invalid non_negative_int value: '-1'"
    return value


#: one past the largest seed torch's generators take (``manual_seed`` overflows above 2**64 - 1)
SEED_LIMIT = 2**64


def seed_int(text: str) -> int:
    """An argparse type: a seed, an integer in [0, 2**64) (argparse names the option in its error; a review:
    2**64 failed after the checkpoint was read, as "Overflow when unpacking long long")."""
    value = int(text)
    if not 0 <= value < SEED_LIMIT:
        raise ValueError(text)
    return value


def positive_int(text: str) -> int:
    """An argparse type: an integer of at least 1."""
    value = int(text)
    if value < 1:
        raise ValueError(text)
    return value


def _missing_package(error: ImportError) -> bool:
    """An ImportError the user fixes by installing something: the project's "pip install ..." messages, or a
    module outside the project that is not installed."""
    if "pip install" in str(error):
        return True
    name = getattr(error, "name", None) or ""
    return isinstance(error, ModuleNotFoundError) and name.split(".")[0] not in PROJECT_LOGGERS


def _one_line(text: str) -> str:
    return " ".join(part.strip() for part in text.splitlines() if part.strip())


#: how a collective of torch.distributed (gloo, NCCL) fails when another process of the run has stopped
_PEER_GONE = re.compile(r"Connection closed by peer|Connection reset by peer|Broken pipe|NCCL communicator was aborted")


def peer_stopped(error: BaseException) -> bool:
    """Whether ``error`` is a distributed collective that failed because another process of the run stopped (its
    own error is what to read): a DDP rank waiting at a barrier when its peer met bad input."""
    distributed = os.environ.get("WORLD_SIZE", "1").strip() not in ("", "0", "1")
    if not distributed:
        try:
            import torch.distributed as dist

            distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        except ImportError:  # pragma: no cover - torch is a dependency
            distributed = False
    return distributed and isinstance(error, RuntimeError) and _PEER_GONE.search(str(error)) is not None


#: lines of jsonargparse's nested message that say what was tried, not what is wrong
_PARSER_FRAMES = ("Does not validate", "Subtypes:", "Errors:", "Given value", "Expected a <class 'NoneType'>",
                  "Problem with given class_path")
_PARSER_KEY = re.compile(r'(?:Parser key|Key) "([^"]+)":?\s*')
#: what a key holds, for the keys a new user most often writes the wrong way
_KEY_HINTS = {"label_names": "label_names maps each label value to its name, e.g. {1: liver, 2: spleen}"}


def parser_error_line(message: str, command: str = "imaging-meta") -> str:
    """The one line for a command line or config that does not parse (a ``fit``/``test``/``validate`` argument or
    YAML key): the keys it is under and the innermost reason. jsonargparse printed the usage and a nested message
    of 60 lines or more, naming no fix, for a misspelt key or a ``label_names`` map written the wrong way round
    (a review, 2026-12-07); ``--debug`` shows it whole."""
    keys = _PARSER_KEY.findall(message)
    lines = [_PARSER_KEY.sub("", line).strip().lstrip("-").strip() for line in message.splitlines()]
    lines = [line for line in lines if line]
    reasons = [line for line in lines if not line.startswith(_PARSER_FRAMES)] or lines or ["the arguments do not parse"]
    where = f"{'.'.join(keys)}: " if keys else ""
    hint = next((f"; {_KEY_HINTS[k]}" for k in reversed(keys) if k in _KEY_HINTS), "")
    return (f"{command}: error: {where}{'; '.join(reasons)}{hint} (`{command} --help` lists the options; --debug "
            "shows the parser's whole message)\n")


def error_line(error: BaseException, command: str = "imaging-meta") -> str:
    """The one line ``imaging-meta`` prints for ``error`` without ``--debug``: the message of bad input (the file,
    what is wrong, the fix), or, for anything else, the exception, where it was raised and what to do."""
    message = user_error(error)
    if message is not None:
        return f"{command}: error: {_one_line(message) or type(error).__name__}\n"
    if peer_stopped(error):
        rank = os.environ.get("RANK", os.environ.get("LOCAL_RANK", "?"))
        return (f"{command}: stopped (process of rank {rank}): another process of this distributed run failed, and its "
                "error, printed by that process (on its node), is the one to read\n")
    frames = traceback.extract_tb(error.__traceback__)
    where = f" at {Path(frames[-1].filename).name}:{frames[-1].lineno} ({frames[-1].name})" if frames else ""
    detail = _one_line(str(error))[:300]
    return (f"{command}: internal error: {type(error).__name__}{': ' + detail if detail else ''}{where}. This is a bug; "
            "rerun with --debug and report it with the traceback\n")
