"""IBSI radiomics features as a descriptor, computed by mirp (an optional extra: ``pip install 'imaging-meta[radiomics]'``).

mirp (https://github.com/oncoradiomics/mirp, EUPL-1.2) implements the Image Biomarker Standardisation
Initiative's definitions and is validated against the IBSI reference values. Per item, on the grey image
(channels averaged) over the whole image (or the given mask), in 2D (``by_slice``):

* ``statistics``: first-order intensity statistics (mean, variance, skewness, kurtosis, percentiles, energy, ...);
* ``intensity_histogram``: the same on the image discretised into `BINS` bins;
* ``glcm``, ``glrlm``: grey-level co-occurrence and run-length texture matrices, on the discretised image.

mirp needs an imaging modality; the items are passed as ``CT`` with intensities in [0, 1] scaled to
[0, `INTENSITY_RANGE`], which only names the unit (no HU-specific step is configured). The numeric features
come in mirp's column order (`FEATURE_PREFIXES`); undefined values (a constant image has no skewness) become 0,
and every value is compressed by ``sign(x) * log1p(|x|)`` so that features of very different scales can share
one Euclidean space after the task normalisation of `imaging_meta.learners.descriptors.features`.

Items are described one at a time (about 0.2 s each for 64 x 64 on one core) and the result is kept in a small
in-memory cache keyed by the item's bytes, so that a support image reused across episodes is computed once.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import threading
import warnings
from collections import OrderedDict
from collections.abc import Iterator

import numpy as np
import torch

#: the mirp feature families, and the prefixes of their columns
FAMILIES = ("statistics", "intensity_histogram", "glcm", "glrlm")
FEATURE_PREFIXES = ("stat_", "ih_", "cm_", "rlm_")
BINS = 32
INTENSITY_RANGE = 1000.0
CACHE_SIZE = 4096
INSTALL = "radiomics features need the optional extra: pip install 'imaging-meta[radiomics]' (mirp)"

_cache: OrderedDict[str, torch.Tensor] = OrderedDict()
_ROOT_LOCK = threading.Lock()


@contextlib.contextmanager
def quiet_root_logging() -> Iterator[None]:
    """mirp (2.7) calls ``logging.basicConfig(level=INFO, stream=sys.stdout)`` on every extraction and logs through
    the root logger: two INFO lines per item on stdout, even under ``--quiet``, and every library's INFO lines
    after it. While this is entered, the root logger passes warnings and errors only, and, when it has no handler
    (``basicConfig`` and ``logging.info`` then configure one), it holds one that writes them to stderr as Python's
    last-resort handler would: ``basicConfig`` configures nothing, and a warning still reaches the user. Both are
    restored on leaving."""
    root = logging.getLogger()
    with _ROOT_LOCK:
        level = root.level
        guard = None
        if not root.handlers:
            guard = logging.StreamHandler()  # stderr, message only, as logging.lastResort
            guard.setLevel(logging.WARNING)
            root.addHandler(guard)
        root.setLevel(max(level, logging.WARNING))
        try:
            yield
        finally:
            if guard is not None:
                root.removeHandler(guard)
            root.setLevel(level)


def available() -> bool:
    """Whether mirp can be imported."""
    try:
        import mirp  # noqa: F401
    except ImportError:
        return False
    return True


def raw_features(image: np.ndarray, mask: np.ndarray | None = None) -> dict[str, float]:
    """mirp's IBSI features of one 2D grey image (H, W) in [0, 1] within ``mask`` (H, W; None: the whole image),
    by name, in mirp's order, before any transform (NaN where a feature is undefined)."""
    try:
        from mirp import extract_features
    except ImportError as e:
        raise ImportError(INSTALL) from e
    if image.ndim != 2:
        raise ValueError(f"radiomics features take one 2D image (H, W), got shape {image.shape}")
    m = np.ones(image.shape, dtype=bool) if mask is None else np.asarray(mask, dtype=bool)
    if m.shape != image.shape or not m.any():
        raise ValueError(f"the mask must have the image's shape {image.shape} and at least one pixel")
    logging.getLogger("mirp").setLevel(logging.WARNING)
    with warnings.catch_warnings(), quiet_root_logging():
        warnings.simplefilter("ignore")
        tables = extract_features(
            image=(np.asarray(image, dtype=np.float32) * INTENSITY_RANGE)[None],
            mask=m[None],
            image_modality="CT",
            base_feature_families=list(FAMILIES),
            base_discretisation_method="fixed_bin_number",
            base_discretisation_n_bins=BINS,
            by_slice=True,
            no_approximation=True,
        )
    row = tables[0].iloc[0]
    return {k: float(row[k]) for k in tables[0].columns if k.startswith(FEATURE_PREFIXES)}


def compress(values: np.ndarray) -> np.ndarray:
    """``sign(x) * log1p(|x|)``, with NaN and infinities as 0."""
    v = np.nan_to_num(np.asarray(values, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    return np.sign(v) * np.log1p(np.abs(v))


def radiomics_descriptor(images: torch.Tensor) -> torch.Tensor:
    """Compressed IBSI features of items (N, C, H, W) in [0, 1]: (N, D) float32 (see the module docstring)."""
    if images.dim() != 4:
        raise ValueError(f"radiomics features take 2D items (N, C, H, W), got shape {tuple(images.shape)}")
    g = images.detach().float().mean(1).cpu()
    out = []
    for item in g:
        key = hashlib.sha256(item.numpy().tobytes()).hexdigest() + str(tuple(item.shape))
        if key not in _cache:
            feats = raw_features(item.numpy())
            _cache[key] = torch.from_numpy(compress(np.array(list(feats.values())))).float()
            if len(_cache) > CACHE_SIZE:
                _cache.popitem(last=False)
        else:
            _cache.move_to_end(key)
        out.append(_cache[key])
    lengths = {len(v) for v in out}
    if len(lengths) != 1:
        raise RuntimeError(f"mirp returned feature vectors of different lengths {sorted(lengths)}")
    return torch.stack(out).to(images.device)

