"""Enhanced multi-frame CT/MR images: one `DicomHeader` per frame, from the functional groups.

An enhanced (or legacy converted enhanced) CT/MR image holds a whole series in one file: its frames share
Rows, Columns and the pixel format, and each frame's geometry and rescale sit in functional groups, in the
frame's item of the PerFrameFunctionalGroupsSequence or, when all frames share them, in the one item of the
SharedFunctionalGroupsSequence:

* PlanePositionSequence > ImagePositionPatient (the position of the frame's first voxel, LPS mm);
* PlaneOrientationSequence > ImageOrientationPatient;
* PixelMeasuresSequence > PixelSpacing (and SpacingBetweenSlices / SliceThickness);
* PixelValueTransformationSequence > RescaleSlope / RescaleIntercept (else the top-level ones, else 1 and 0);
* FrameContentSequence > StackID (one stack at most).

`read_frames` turns them into one header per frame, with the same fields as the header of a single-frame
slice and ``frame`` set, so that `datamodules.io.dicom_series.order_series` sorts the frames along the slice
normal and applies the same checks (orientations, pixel spacings, duplicates, gaps, uneven steps, collinear
positions) as to a series of single-frame files. The frame order in the file never matters.

Only pydicom is needed: highdicom (the optional ``[dicom-seg]`` extra) is not used to read, so enhanced images
are read in every installation, with the same messages and the same MONOCHROME1 handling as single-frame
series.
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter

from pydicom.dataset import Dataset

from datamodules.io.dicom_checks import orientation_problem
from datamodules.io.dicom_header import DicomHeader, as_floats, get_value

_FIX = (
    "export the series again from the source, or convert it to a NIfTI volume (e.g. `dcm2niix -z y <folder>`) "
    "and scan the .nii.gz instead"
)

#: what each functional group holds, for messages: sequence keyword -> attribute.
_GROUPS = {
    "PlanePositionSequence": "ImagePositionPatient",
    "PlaneOrientationSequence": "ImageOrientationPatient",
    "PixelMeasuresSequence": "PixelSpacing",
}


def _group_item(frame_item: Dataset | None, shared_item: Dataset | None, sequence: str) -> Dataset | None:
    """The item of functional group ``sequence`` that applies to a frame: its own, else the shared one."""
    for item in (frame_item, shared_item):
        if item is None:
            continue
        seq = get_value(item, sequence)
        if seq:
            return seq[0]
    return None


def _structure_problem(ds: Dataset, h: DicomHeader) -> str | None:
    """Why the frames of the file cannot form one stack, judged before reading them (tiles, several dimension
    organisations, a per-frame sequence that does not match NumberOfFrames), or None."""
    organisation = str(get_value(ds, "DimensionOrganizationType", "")).strip().upper()
    if organisation.startswith("TILED"):
        return (f"a tiled image (DimensionOrganizationType {organisation}, {h.describe()}), not a CT/MR volume; "
                "move it out of the folder")
    organisations = get_value(ds, "DimensionOrganizationSequence") or []
    if len(organisations) > 1:
        return (
            f"{len(organisations)} dimension organisations (DimensionOrganizationSequence) in one file; only files "
            f"with one organisation of their frames are read; {_FIX}"
        )
    per_frame = get_value(ds, "PerFrameFunctionalGroupsSequence")
    n = h.number_of_frames
    if per_frame is None:
        if n > 1:
            return f"no PerFrameFunctionalGroupsSequence for NumberOfFrames={n}: the file is malformed; {_FIX}"
    elif len(per_frame) != n:
        return (
            f"PerFrameFunctionalGroupsSequence has {len(per_frame)} item(s) for NumberOfFrames={n}: the file is "
            f"malformed; {_FIX}"
        )
    if not get_value(ds, "SharedFunctionalGroupsSequence") and per_frame is None:
        return f"no functional groups (SharedFunctionalGroupsSequence, PerFrameFunctionalGroupsSequence); {_FIX}"
    return None


def _frame_geometry(frame_item: Dataset | None, shared_item: Dataset | None) -> tuple[dict, str | None]:
    """Position, orientation, pixel spacing and slice thickness of one frame, and the first problem (a short
    phrase such as "no ImagePositionPatient (PlanePositionSequence)") or None."""
    values: dict = {}
    for sequence, keyword in _GROUPS.items():
        item = _group_item(frame_item, shared_item, sequence)
        raw = get_value(item, keyword) if item is not None else None
        if raw is None:
            return values, f"no {keyword} ({sequence})"
        parsed = as_floats(raw, 2 if keyword == "PixelSpacing" else 3 if keyword == "ImagePositionPatient" else 6)
        if parsed is None or (keyword == "PixelSpacing" and min(parsed) <= 0):
            return values, f"invalid {keyword} {raw!r} ({sequence})"
        values[keyword] = parsed
    problem = orientation_problem(values["ImageOrientationPatient"])
    if problem:
        return values, f"{problem} (PlaneOrientationSequence)"
    measures = _group_item(frame_item, shared_item, "PixelMeasuresSequence")
    for keyword in ("SpacingBetweenSlices", "SliceThickness"):
        try:
            v = float(get_value(measures or Dataset(), keyword))
        except (TypeError, ValueError):
            continue
        if math.isfinite(v) and v > 0:
            values["thickness"] = v
            break
    return values, None


def _frame_rescale(
    frame_item: Dataset | None, shared_item: Dataset | None, h: DicomHeader
) -> tuple[tuple[float, float] | None, str | None]:
    """((slope, intercept), None) of one frame: its PixelValueTransformationSequence, else the file's top-level
    rescale; or (None, the problem) when unusable (not a number, not finite, or a zero slope)."""
    item = _group_item(frame_item, shared_item, "PixelValueTransformationSequence")
    if item is None:
        slope, intercept = h.rescale_slope, h.rescale_intercept
        where = "RescaleSlope/RescaleIntercept"
    else:
        raw = get_value(item, "RescaleSlope", 1.0), get_value(item, "RescaleIntercept", 0.0)
        where = f"RescaleSlope/RescaleIntercept ({raw[0]!r}, {raw[1]!r}; PixelValueTransformationSequence)"
        try:
            slope, intercept = float(raw[0]), float(raw[1])
        except (TypeError, ValueError):
            slope = intercept = math.nan
    if not (math.isfinite(slope) and math.isfinite(intercept) and slope != 0):
        return None, f"invalid {where}"
    return (slope, intercept), None


def _stack_id(frame_item: Dataset | None, shared_item: Dataset | None) -> str | None:
    """The frame's StackID (FrameContentSequence), or None."""
    item = _group_item(frame_item, shared_item, "FrameContentSequence")
    value = get_value(item, "StackID") if item is not None else None
    return str(value).strip() if value is not None else None


def _frame_problems_message(problems: list[tuple[int, str]], n: int) -> str:
    """One message for the frames that cannot be placed: the most common problem, how many, an example frame."""
    counts = Counter(p for _, p in problems)
    problem, count = counts.most_common(1)[0]
    example = next(i for i, p in problems if p == problem)
    others = f"; {len(counts) - 1} other problem(s) too" if len(counts) > 1 else ""
    which = f"every frame (e.g. frame {example + 1})" if count == n else f"{count} of {n} frames (e.g. frame {example + 1})"
    if problem.startswith("no "):
        return (f"{which}: {problem}, in neither the frame's own nor the shared functional groups{others}; without "
                f"it the frames cannot be placed in a volume; {_FIX}")
    if "Rescale" in problem:
        return f"{which}: {problem}{others}; the stored values cannot be turned into physical values; {_FIX}"
    return f"{which}: {problem}{others}; the frames cannot be placed in a volume; {_FIX}"


def read_frames(ds: Dataset, h: DicomHeader) -> tuple[list[DicomHeader] | None, str | None]:
    """One header per frame of an enhanced CT/MR image, or the reason why its frames cannot form a volume.

    Args:
        ds: the data set (`datamodules.io.dicom_header.is_enhanced`), already past the file checks.
        h: its header (matrix, pixel format, top-level rescale, site attributes).

    Returns:
        (frames, None), frames in file order, each a copy of ``h`` with ``frame``, ``position``,
        ``orientation``, ``pixel_spacing``, ``slice_thickness`` and the rescale of that frame; or (None, the
        reason) for a tiled file, several dimension organisations or stacks, a malformed per-frame sequence,
        or frames without a usable position, orientation, pixel spacing or rescale.
    """
    problem = _structure_problem(ds, h)
    if problem:
        return None, problem
    per_frame = get_value(ds, "PerFrameFunctionalGroupsSequence") or [None] * h.number_of_frames
    shared_seq = get_value(ds, "SharedFunctionalGroupsSequence")
    shared = shared_seq[0] if shared_seq else None
    frames: list[DicomHeader] = []
    problems: list[tuple[int, str]] = []
    stacks: Counter[str] = Counter()
    for i, item in enumerate(per_frame):
        geometry, problem = _frame_geometry(item, shared)
        rescale, rescale_problem = _frame_rescale(item, shared, h)
        problem = problem or rescale_problem
        if problem is not None:
            problems.append((i, problem))
            continue
        assert rescale is not None
        stack = _stack_id(item, shared)
        if stack is not None:
            stacks[stack] += 1
        frames.append(dataclasses.replace(
            h, frame=i, frames=None, problem=None, warnings=[],
            position=geometry["ImagePositionPatient"], orientation=geometry["ImageOrientationPatient"],
            pixel_spacing=geometry["PixelSpacing"], slice_thickness=geometry.get("thickness", h.slice_thickness),
            rescale_slope=rescale[0], rescale_intercept=rescale[1],
        ))
    if problems:
        return None, _frame_problems_message(problems, len(per_frame))
    if len(stacks) > 1:
        desc = ", ".join(f"{s!r} ({n} frames)" for s, n in sorted(stacks.items()))
        return None, (
            f"{len(stacks)} stacks in one file (StackID {desc}); only one stack is read as a volume; export each "
            "stack as its own series, or convert the file with `dcm2niix -z y <folder>`, which writes one volume "
            "per stack, and scan the .nii.gz files instead"
        )
    return frames, None
