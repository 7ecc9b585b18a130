"""Progress bars for the long commands (scan, demo, evaluate, segment, classify, results).

`progress` wraps an iterable in a tqdm bar on stderr when stderr is a terminal, and returns it unchanged
otherwise (logs and CI stay clean); ``IMAGING_META_PROGRESS=1`` forces the bar on, ``0`` off (``imaging-meta
--quiet`` sets it to 0, for child processes too). tqdm comes with Lightning, which draws the bars of fit, validate
and test (``--quiet`` turns those off through the Trainer's ``enable_progress_bar``).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")
#: the environment variable that forces the bars on (1) or off (0)
ENV = "IMAGING_META_PROGRESS"


def enabled() -> bool:
    """Whether bars are drawn: ``IMAGING_META_PROGRESS`` if set (1/0), else whether stderr is a terminal."""
    forced = os.environ.get(ENV)
    if forced is not None:
        return forced.strip().lower() not in ("", "0", "false", "no", "off")
    return bool(getattr(sys.stderr, "isatty", lambda: False)())


def progress(iterable: Iterable[T], desc: str, total: int | None = None, unit: str = "it") -> Iterator[T] | Iterable[T]:
    """``iterable`` with a progress bar labelled ``desc`` (see the module docstring)."""
    if not enabled():
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, total=total, unit=unit, file=sys.stderr, dynamic_ncols=True, leave=False)
