"""The radiomics descriptor (`imaging_meta.learners.descriptors.radiomics`): mirp's IBSI features against values
computed from the IBSI definitions on a known mask; the clear error without the optional extra."""

from __future__ import annotations

import math
import sys

import numpy as np
import pytest
import torch

from imaging_meta.learners.descriptors import radiomics
from imaging_meta.learners.descriptors.features import describe


def reference_statistics(values: np.ndarray) -> dict[str, float]:
    """IBSI first-order statistics (IBSI 1, section 3.3) from their definitions: population moments, excess kurtosis."""
    x = np.asarray(values, dtype=np.float64)
    mu, var = x.mean(), x.var()
    return {
        "stat_mean": mu, "stat_var": var,
        "stat_skew": ((x - mu) ** 3).mean() / var**1.5, "stat_kurt": ((x - mu) ** 4).mean() / var**2 - 3.0,
        "stat_median": float(np.median(x)), "stat_min": x.min(), "stat_max": x.max(), "stat_range": np.ptp(x),
        "stat_energy": (x**2).sum(), "stat_rms": math.sqrt((x**2).mean()), "stat_mad": np.abs(x - mu).mean(),
    }


def known_image() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A 12 x 12 image whose 4 x 5 mask holds known intensities (skewed), with other values outside the mask."""
    rng = np.random.default_rng(0)
    image = rng.random((12, 12))
    inside = np.array([0.1] * 8 + [0.2] * 6 + [0.4] * 4 + [0.9] * 2)
    mask = np.zeros((12, 12), bool)
    mask[3:7, 2:7] = True
    image[mask] = inside
    return image, mask, inside


def test_mirp_first_order_features_match_the_ibsi_definitions_on_a_known_mask():
    pytest.importorskip("mirp", reason="the optional radiomics extra (mirp) is not installed")
    image, mask, inside = known_image()
    feats = radiomics.raw_features(image, mask)
    scale = radiomics.INTENSITY_RANGE
    expected = reference_statistics(inside * scale)
    for name, value in expected.items():
        assert feats[name] == pytest.approx(value, rel=1e-4, abs=1e-6), name
    # the texture families are there too, and the whole image gives other first-order values than the mask
    assert any(k.startswith("cm_") for k in feats) and any(k.startswith("rlm_") for k in feats)
    whole = radiomics.raw_features(image)
    assert whole["stat_mean"] == pytest.approx(image.mean() * scale, rel=1e-4)


def test_the_descriptor_is_per_item_deterministic_and_cached():
    pytest.importorskip("mirp", reason="the optional radiomics extra (mirp) is not installed")
    g = torch.Generator().manual_seed(0)
    items = torch.rand(3, 1, 16, 16, generator=g)
    items[2] = 0.5  # a constant image: undefined moments become 0, not NaN
    a = describe(items, "radiomics")
    b = describe(items.flip(0), "radiomics").flip(0)
    assert a.shape[0] == 3 and torch.isfinite(a).all()
    torch.testing.assert_close(a, b)  # an item's vector never depends on the others
    assert len(radiomics._cache) >= 3


def test_without_the_extra_the_error_names_the_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "mirp", None)  # import mirp now raises ImportError
    assert not radiomics.available()
    with pytest.raises(ImportError, match=r"imaging-meta\[radiomics\]"):
        radiomics.raw_features(np.zeros((4, 4)))


def test_compress_keeps_sign_and_order_and_drops_undefined_values():
    v = np.array([-1000.0, -1.0, 0.0, 1.0, 1000.0, np.nan, np.inf])
    c = radiomics.compress(v)
    assert np.all(np.diff(c[:5]) > 0) and c[2] == 0 and c[5] == 0 and c[6] == 0
    assert c[4] == pytest.approx(math.log1p(1000.0))
    with pytest.raises(ValueError, match="2D items"):
        radiomics.radiomics_descriptor(torch.zeros(2, 1, 4, 4, 4))


def test_mirps_root_logging_is_kept_off_stdout_and_the_root_logger_restored(capsys):
    """mirp configures the root logger at INFO on stdout on every extraction (720 INFO lines for a short fit, with
    --quiet): inside `quiet_root_logging` its INFO lines reach nothing, its warnings (and everyone's) still reach
    stderr, and the root logger is as it was after."""
    import io
    import logging
    import sys

    from imaging_meta.learners.descriptors.radiomics import quiet_root_logging

    root = logging.getLogger()
    saved = list(root.handlers)
    for h in saved:  # as under the CLI, where only the project's loggers have handlers
        root.removeHandler(h)
    try:
        before = (list(root.handlers), root.level)
        with quiet_root_logging():  # what mirp 2.7's extract_features does, in substance
            logging.basicConfig(format="%(levelname)s\t: %(message)s", level=logging.INFO, stream=sys.stdout)
            logging.info("Initialising feature computation")
            logging.getLogger("mirp").warning("a real problem")
            logging.getLogger("user.script").error("the user's own error")
        captured = capsys.readouterr()
        assert "Initialising" not in captured.out + captured.err
        assert "a real problem" in captured.err and "the user's own error" in captured.err
        assert (list(root.handlers), root.level) == before
    finally:
        for h in saved:
            root.addHandler(h)
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    root.addHandler(handler)
    try:
        with quiet_root_logging():  # a root logger with the user's handler: no second handler, INFO dropped
            logging.warning("kept")
            logging.info("dropped")
    finally:
        root.removeHandler(handler)
    assert stream.getvalue() == "kept\n"
