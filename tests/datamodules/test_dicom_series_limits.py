"""The limits of `order_series`'s checks, each just past its threshold, and what its messages name: the spacing it
reports against its affine, problems counted by kind, orientation, spread, drift and straight-line tolerances."""

from __future__ import annotations

import numpy as np
import pytest

from datamodules.io.dicom import order_series, read_header
from tests.datamodules.dicom_fixtures import edit, phantom, place, truncate, write_series
from tests.datamodules.test_dicom import headers_of, series_error


def test_the_reported_slice_spacing_is_the_step_the_affine_places_slices_with(tmp_path):
    """Steps alternating 3.0 and 3.2 mm (accepted): the spacing the series reports (and the reader's meta and the
    scan index carry) was the median step, 3.0, while its affine steps 3.0909 mm (a review, 2026-12-08)."""
    paths = write_series(tmp_path / "s", phantom(shape=(8, 8, 12)))
    place(paths, [3.0, 3.2] * 5 + [3.0])
    series = order_series(headers_of(paths))
    step = float(np.linalg.norm(series.affine[:3, 2]))
    assert step == pytest.approx(34.0 / 11, abs=1e-4)
    assert series.spacing[2] == pytest.approx(step, abs=1e-6)


def test_files_with_one_problem_in_their_own_numbers_count_as_one_problem(tmp_path):
    """Three files truncated by different amounts share one problem; the message counted each truncation's byte
    figures as another problem ("2 other problem(s) too", a review, 2026-12-08)."""
    paths = write_series(tmp_path / "s", phantom(shape=(8, 8, 6)))
    for p, n in zip(paths[:3], (10, 20, 30), strict=True):
        truncate(p, n)
    reason = series_error(paths)
    assert reason.startswith(f"3 of 6 files cannot be used, e.g. {paths[0].name}: pixel data is truncated"), reason
    assert "other problem" not in reason, reason
    for p in paths[3:]:
        truncate(p, 40)
    reason = series_error(paths)  # every file, by different amounts: the numbers are the example's own
    assert reason.startswith(f"every file (e.g. {paths[0].name}): pixel data is truncated"), reason
    alike = write_series(tmp_path / "t", phantom(shape=(8, 8, 4)))
    for p in alike:
        truncate(p, 40)
    assert series_error(alike).startswith("every file: pixel data is truncated: 88 bytes")  # alike: no example


def test_a_slice_tilted_by_half_a_degree_is_another_orientation(tmp_path):
    """A reformat or a localizer tilted by 0.01 rad among the slices is refused, not merged into the volume."""
    paths = write_series(tmp_path / "s", phantom(shape=(8, 8, 5)))
    a = 0.01
    edit(paths[2], lambda ds: setattr(ds, "ImageOrientationPatient", [1.0, 0.0, 0.0, 0.0, np.cos(a), np.sin(a)]))
    reason = series_error(paths)
    assert "mixed orientations within the series (4 file(s)" in reason and "1 file(s)" in reason, reason


def test_a_spread_of_steps_just_above_the_tolerance_is_uneven(tmp_path):
    """Steps of 3.0 mm and one of 3.45 (relative spread 0.15 > 0.1; the slices stay within 0.06 of a slice from the
    grid, so only the spread check can refuse them)."""
    paths = write_series(tmp_path / "s", phantom(shape=(8, 8, 6)))
    place(paths, [3.0, 3.0, 3.45, 3.0, 3.0])
    reason = series_error(paths)
    assert "relative spread 0.150 > 0.1" in reason, reason
    assert order_series(headers_of(paths), spacing_rtol=0.2).shape == (8, 8, 6)


def test_a_drift_of_a_third_of_a_slice_is_refused_and_names_the_slice(tmp_path):
    """Seven steps of 3.0 mm then eight of 3.27 (spread 0.09, accepted): slice 7 lies 1.01 mm, 0.31 of a slice,
    from the mean step's grid, past the quarter slice allowed; the message names that slice's file."""
    paths = write_series(tmp_path / "s", phantom(shape=(8, 8, 16)))
    place(paths, [3.0] * 7 + [3.27] * 8)
    reason = series_error(paths)
    assert reason.startswith(f"uneven slice spacing: {paths[7].name} lies 1.01 mm (0.31 slices)"), reason


def test_a_slice_half_a_millimetre_off_the_line_is_refused(tmp_path):
    """Half a millimetre sideways (0.4 of the 1.25 mm pixel): more than the tenth of a pixel allowed."""
    paths = write_series(tmp_path / "s", phantom(shape=(8, 8, 6)))
    edit(paths[2], lambda ds: setattr(
        ds, "ImagePositionPatient", [float(ds.ImagePositionPatient[0]) + 0.5, *ds.ImagePositionPatient[1:]]))
    assert "do not lie on a straight line (largest deviation" in series_error(paths)


def test_direction_cosines_six_degrees_from_orthogonal_are_a_problem_of_the_file(tmp_path):
    paths = write_series(tmp_path / "s", phantom(shape=(8, 8, 4)))
    edit(paths[0], lambda ds: setattr(ds, "ImageOrientationPatient", [1.0, 0.0, 0.0, 0.1, 0.995, 0.0]))
    assert "is not two orthogonal unit vectors" in read_header(paths[0]).problem
