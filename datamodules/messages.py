"""Errors that name many inputs: the first few in the message, the others each in a warning logged before it.

Shared by the readers (`datamodules.sources.image_folder`) and the commands (which import it from here), so that
every "N inputs cannot be read" error reads alike.
"""

from __future__ import annotations

from collections.abc import Sequence

#: an error lists this many inputs that failed; the others are each named in a warning before it
LISTED = 5


def first(items: Sequence[str], most: int = LISTED, sep: str = "; ") -> str:
    """The first ``most`` items joined with ``sep``, and how many more there are (``" (and 3 more)"``): for a
    message that names only a few of many inputs and logs none of the others."""
    return sep.join(items[:most]) + (f" (and {len(items) - most} more)" if len(items) > most else "")


def listed(messages: Sequence[str], most: int = LISTED) -> str:
    """The first ``most`` messages joined, and how many more (those are logged as warnings before the error)."""
    more = f"; and {len(messages) - most} more, each named with its reason in a warning above" if len(messages) > most else ""
    return "; ".join(messages[:most]) + more
