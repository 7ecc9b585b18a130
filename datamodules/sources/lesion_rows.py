"""Parse and check the rows of a lesion CSV (no image is read): columns, coordinates, sizes, duplicates."""

from __future__ import annotations

import csv
import math
import os
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from datamodules.messages import first
from datamodules.sources.items import class_name

CENTRE_COLUMNS = ("x", "y", "z")
BOX_COLUMNS = ("x_min", "y_min", "z_min", "x_max", "y_max", "z_max")
#: every column the reader knows; a header names them in any case
KNOWN_COLUMNS = frozenset(("image", "class", "size_mm", "patient", "site") + CENTRE_COLUMNS + BOX_COLUMNS)
#: errors and examples listed in one message; the rest are counted.
MAX_LISTED = 10


@dataclass
class LesionRow:
    """One usable lesion row of the CSV."""

    line: int
    image: str  # normalised, relative to root
    cls: str
    centre: np.ndarray  # in the CSV's coordinates
    patient: str | None
    site: str | None


def norm_rel(value: str, root: Path) -> str:
    """An ``image`` cell as a normalised POSIX path relative to ``root`` (absolute paths outside root kept)."""
    p = Path(value.strip())
    if p.is_absolute():
        try:  # the folder resolved, not the file: an image under root that links elsewhere is still under root
            p = (p.parent.resolve() / p.name).relative_to(root)
        except ValueError:
            return p.as_posix()
    return Path(os.path.normpath(p.as_posix())).as_posix()


def read_lesion_rows(path: Path, root: Path) -> tuple[list[LesionRow], list[dict[str, Any]]]:
    """Parse and check a lesion CSV (no image is read).

    Args:
        path: the CSV file.
        root: the folder the ``image`` paths are relative to.

    Returns:
        (rows, dropped): the usable rows, and the duplicate rows dropped (``{"line", "reason"}``).

    Raises:
        ValueError: every problem found, each naming the CSV and its line.
    """
    if not path.is_file():
        raise ValueError(f"lesion CSV {path} does not exist; set source.init_args.csv to your lesion table")
    errors: list[str] = []
    rows: list[LesionRow] = []
    try:  # a table saved in another encoding (Latin-1 from a spreadsheet) is named, with the fix (a review)
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            has_centre, has_box = _check_header(reader, path)
            for rec in reader:
                line = reader.line_num
                if not any((v or "").strip() for v in rec.values() if isinstance(v, str)):
                    continue  # blank line
                if None in rec:
                    errors.append(f"{path}: line {line}: more cells than header columns; quote values that hold commas")
                    continue
                problems: list[str] = []
                row = _parse_record(rec, line, root, has_centre, has_box, problems)
                if problems:
                    errors.append(f"{path}: line {line}: " + "; ".join(problems))
                    continue
                assert row is not None  # a record without problems gives a row
                rows.append(row)
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: line {_first_undecodable_line(path)} is not UTF-8 text ({e.reason}); save the lesion "
                         "table as UTF-8 (\"CSV UTF-8\" in a spreadsheet program)") from e
    if errors:
        raise ValueError(f"{len(errors)} bad lesion row(s):\n" + first(errors, MAX_LISTED, "\n"))
    if not rows:
        raise ValueError(f"{path}: no lesion rows; add one row per lesion below the header")
    kept, dropped = _drop_duplicates(rows, path)
    _check_consistent(kept, path)
    _warn_single_lesion_classes(kept, path)
    return kept, dropped


def _first_undecodable_line(path: Path) -> int:
    """The number of the first line of ``path`` that is not UTF-8 (0 when every line decodes)."""
    for number, line in enumerate(path.read_bytes().splitlines(), 1):
        try:
            line.decode("utf-8")
        except UnicodeDecodeError:
            return number
    return 0


def _check_consistent(rows: list[LesionRow], path: Path, scan_of: Callable[[LesionRow], str] | None = None) -> None:
    """Refuse rows that contradict each other: one image under several patients or sites (a blank cell against a
    filled one included: its patches would count as other patients, so support and query could come from one
    scan), and one centre of one image under two classes (the same patch, two labels).

    Args:
        scan_of: which scan a row's image is (after the scan: a DICOM series may be written as its folder or as
            any of its files); default the image path as written.

    Raises:
        ValueError: naming the lines of each contradiction.
    """
    errors = []
    by_image: dict[str, list[LesionRow]] = {}
    for r in rows:
        by_image.setdefault(scan_of(r) if scan_of is not None else r.image, []).append(r)
    for group in by_image.values():
        names = sorted({r.image for r in group})
        image = names[0] if len(names) == 1 else f"{names[0]} (also written {', '.join(names[1:MAX_LISTED])})"
        for what in ("patient", "site"):
            values: dict[str, list[int]] = {}
            for r in group:
                values.setdefault(getattr(r, what) or "", []).append(r.line)
            if len(values) > 1:
                # a patient value is an identifier: only its lines are named, never the value (a review, 2026-12-07:
                # the raw ids reached stderr and the logs); a site is shown as written (README)
                said = "; ".join(f"{(v or 'blank') if what == 'site' else ('blank' if not v else f'value {n + 1}')!r} "
                                 f"on line(s) {', '.join(map(str, lines[:MAX_LISTED]))}"
                                 for n, (v, lines) in enumerate(values.items()))
                errors.append(f"image {image!r} has several {what}s ({said}); give every row of one image the same "
                              f"{what} (or leave it blank on all of them)")
        centres: dict[tuple, tuple[str, int]] = {}
        for r in group:
            key = tuple(np.round(r.centre, 3).tolist())
            if key in centres and centres[key][0] != r.cls:
                errors.append(f"image {image!r}: line {r.line} labels the centre {list(key)} {r.cls!r}, line "
                              f"{centres[key][1]} labels it {centres[key][0]!r}; one lesion has one class")
            centres.setdefault(key, (r.cls, r.line))
    if errors:
        raise ValueError(f"{path}: {len(errors)} contradiction(s) between rows:\n" + first(errors, MAX_LISTED, "\n"))


def _check_header(reader: csv.DictReader, path: Path) -> tuple[bool, bool]:
    """Strip the header names in place, name the known columns in lower case, and check the required columns;
    return (has centre, has box).

    A spreadsheet's ``Image,Class,X,Y,Z`` or ``Patient`` header is read as the lower-case columns: an optional
    column in capitals (``Patient``, ``Site``, ``Size_mm``) was otherwise ignored without a word, and with it the
    patient split (a review). Two header cells that name the same column are refused."""
    header = [h.strip() for h in (reader.fieldnames or [])]
    header = [h.lower() if h.lower() in KNOWN_COLUMNS else h for h in header]
    twice = sorted({h for h in header if h in KNOWN_COLUMNS and header.count(h) > 1})
    if twice:
        raise ValueError(f"{path}: line 1: column(s) {', '.join(twice)} given twice (header names are read without "
                         f"regard to case); the header has {reader.fieldnames}. Keep one of each")
    reader.fieldnames = header
    missing = [c for c in ("image", "class") if c not in header]
    has_centre = all(c in header for c in CENTRE_COLUMNS)
    has_box = all(c in header for c in BOX_COLUMNS)
    if not (has_centre or has_box):
        missing.append("x, y, z (or x_min, y_min, z_min, x_max, y_max, z_max)")
    if missing:
        raise ValueError(
            f"{path}: line 1: missing column(s) {', '.join(missing)}; the header has {header or 'nothing'}. "
            "A lesion CSV needs image, class and a centre x,y,z or a box x_min..z_max (world mm)"
        )
    return has_centre, has_box


def _parse_record(rec: dict[str, str], line: int, root: Path, has_centre: bool, has_box: bool,
                  problems: list[str]) -> LesionRow | None:
    """One CSV record as a row; every problem is appended to ``problems`` (the row is then unusable)."""
    image = (rec.get("image") or "").strip()
    cls = class_name(rec.get("class") or "")
    if not image:
        problems.append("empty image")
    if not cls:
        problems.append("empty class; give every lesion a class name")
    centre = _centre(rec, has_centre, has_box, problems)
    size = (rec.get("size_mm") or "").strip()
    if size:
        try:
            v = float(size)
        except ValueError:
            v = float("nan")
        if not (math.isfinite(v) and v > 0):
            problems.append(f"size_mm {size!r} is not a positive number of mm")
    if problems:
        return None
    assert centre is not None  # _centre gives None only with a problem
    return LesionRow(line=line, image=norm_rel(image, root), cls=cls, centre=centre,
                     patient=(rec.get("patient") or "").strip() or None,
                     site=(rec.get("site") or "").strip() or None)


def _centre(rec: dict[str, str], has_centre: bool, has_box: bool, problems: list[str]) -> np.ndarray | None:
    """The lesion centre (3,) from x, y, z, else from the middle of a complete box; None on a problem."""
    centre = None
    given = [c for c in CENTRE_COLUMNS if (rec.get(c) or "").strip()] if has_centre else []
    if has_box and given and len(given) < len(CENTRE_COLUMNS):  # never silently the box's centre instead (a review)
        empty = [c for c in CENTRE_COLUMNS if c not in given]
        problems.append(f"a partial centre: {', '.join(given)} given, {', '.join(empty)} empty; give all three, or "
                        "none to use the box")
        return None
    if has_centre and len(given) == len(CENTRE_COLUMNS):
        centre = _numbers(rec, CENTRE_COLUMNS, problems)
    elif has_box and all((rec.get(c) or "").strip() for c in BOX_COLUMNS):
        box = _numbers(rec, BOX_COLUMNS, problems)
        if box is not None:
            if np.any(box[3:] < box[:3]):
                problems.append(f"box maximum below its minimum ({box.tolist()}); swap them")
            centre = (box[:3] + box[3:]) / 2
    else:
        empty = [c for c in (CENTRE_COLUMNS if has_centre else BOX_COLUMNS) if not (rec.get(c) or "").strip()]
        problems.append(f"missing coordinate(s) {', '.join(empty)}")
    return centre


def _numbers(rec: dict[str, str], columns: Sequence[str], problems: list[str]) -> np.ndarray | None:
    """The finite numbers in ``columns``, or None after appending the first problem."""
    values = []
    for c in columns:
        text = (rec.get(c) or "").strip()
        try:
            v = float(text)
        except ValueError:
            problems.append(f"{c} = {text!r} is not a number")
            return None
        if not math.isfinite(v):
            problems.append(f"{c} is {text} (NaN/Inf); give the coordinate in mm")
            return None
        values.append(v)
    return np.array(values, dtype=np.float64)


def _drop_duplicates(rows: list[LesionRow], path: Path, scan_of: Callable[[LesionRow], str] | None = None,
                     ) -> tuple[list[LesionRow], list[dict[str, Any]]]:
    """Keep the first of rows with the same image (``scan_of``, as in `_check_consistent`), class and centre;
    warn about the others and return them."""
    dropped: list[dict[str, Any]] = []
    seen: dict[tuple, int] = {}
    kept = []
    for r in rows:
        key = (scan_of(r) if scan_of is not None else r.image, r.cls, *np.round(r.centre, 3).tolist())
        if key in seen:
            dropped.append({"line": r.line, "reason": f"duplicate of line {seen[key]} (same image, class and centre)"})
            continue
        seen[key] = r.line
        kept.append(r)
    if dropped:
        shown = ", ".join(f"line {d['line']} ({d['reason']})" for d in dropped[:MAX_LISTED])
        # stacklevel 4: the caller of LesionCSV.read_rows
        warnings.warn(f"{path}: {len(dropped)} duplicate row(s) dropped: {shown}", stacklevel=4)
    return kept, dropped


def _warn_single_lesion_classes(rows: list[LesionRow], path: Path) -> None:
    """Warn about classes with one lesion: an episode needs one support and one query lesion of a class."""
    counts = Counter(r.cls for r in rows)
    single = sorted(c for c, k in counts.items() if k == 1)
    if single:
        where = ", ".join(f"{c!r} (line {next(r.line for r in rows if r.cls == c)})" for c in single[:MAX_LISTED])
        warnings.warn(
            f"{path}: class(es) with a single lesion: {where}; a few-shot episode needs at least two lesions "
            "of a class (one support, one query), so these classes cannot be sampled",
            stacklevel=4,
        )
