"""The errors of DICOM reading: a file that cannot be read, and a group of files that is not a volume."""

from __future__ import annotations

import os
from collections.abc import Sequence


class DicomError(ValueError):
    """A DICOM file cannot be read; the message names the file and what to do.

    Attributes:
        path: the file.
        reason: the reason without the path, for reports.
    """

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


class NotDicomError(DicomError):
    """The file is not a DICOM file at all (no 'DICM' marker and no recognisable DICOM data set)."""


class DicomSeriesError(ValueError):
    """A group of DICOM files does not form a usable volume; ``reason`` says why and what to fix.

    Attributes:
        paths: the files of the series.
        reason: the reason, without the file list.
    """

    def __init__(self, paths: Sequence[str], reason: str):
        self.paths = [str(p) for p in paths]
        self.reason = reason
        where = self.paths[0] if len(self.paths) == 1 else f"{common_folder(self.paths)} ({len(self.paths)} files)"
        super().__init__(f"{where}: {reason}")


def common_folder(paths: Sequence[str]) -> str:
    """The deepest folder that holds all of ``paths`` (the first one's folder when they cannot be compared)."""
    parents = [os.path.dirname(p) for p in paths]
    if not parents:
        return ""
    try:
        return os.path.commonpath(parents)
    except ValueError:  # a mix of absolute and relative paths
        return parents[0]
