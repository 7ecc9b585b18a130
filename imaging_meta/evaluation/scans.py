"""Whole-scan protocols: segment a query scan with a support scan, score 3D Dice and HD95 in the query's own
voxel grid, beside the untrained learner and two label-only baselines on the same volumes.

Protocols (issue 15):

* ``whole_scan``: no oracle. The segmenter gets the whole query scan and decides itself which slices show the
  structure, as ``imaging-meta segment`` does for a user.
* ``oracle_extent``: SSL-ALPNet's published 3D protocol, with its rules (`volumes.oracle_chunks`,
  `volumes.support_part_slices`). The query's *true* extent of the structure (from its label map) is split into
  ``chunks`` parts; each is segmented against one support slice, the centre of the matching part of the support's
  slices that show the structure; slices outside the true extent are left empty. It uses the query's labels to
  place the slices, and every record says so (``uses_query_extent``). The slice gate is off there: the oracle has
  chosen the slices. Unlike SSL-ALPNet's model, which is given those support slices alone, the scan segmenter
  still reads the whole support label map: its calibration predicts the support's other slices, with and
  without the structure, and adaptation trains on all of them.

Methods (each a record per query volume): ``trained`` (the scan segmenter with every part), ``trained,
learner only`` (the learner's probability > 0.5, no fusion, no gate, no smoothing), the ablations that switch
one part off, ``untrained encoder`` (the learner's initial weights through the same scan segmenter as
``trained``), ``copy support mask`` (the support's mask at the same relative position: within the body, along
its axial extent and in-plane, for ``whole_scan``, within the structure's extent for ``oracle_extent``) and
``intensity window`` (the query thresholded between the 10th and 90th percentiles of the support's foreground,
in HU for two CTs, otherwise on the learner's [0, 1] scale: MR by its percentiles, CT through its window;
restricted to the true extent under ``oracle_extent``).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from nibabel.affines import voxel_sizes

from datamodules.transforms.volume import volume_transforms
from imaging_meta.evaluation import volumes as V
from imaging_meta.learners.base import Learner
from imaging_meta.volume.scale import MIN_PIXELS, SCALES, scale_and_shortfall
from imaging_meta.volume.segmenter import LEARNER_ONLY, ScanOptions, ScanSegmenter, structure_slices

logger = logging.getLogger(__name__)

if TYPE_CHECKING:
    from monai.transforms import Compose

PROTOCOLS = ("whole_scan", "oracle_extent")
TRAINED_FULL, LEARNER_ONLY_NAME, UNTRAINED_NAME = "trained", "trained, learner only", "untrained encoder"
COPY, WINDOW = "copy support mask", "intensity window"
#: the intensity window with the trained segmenter's own 3D step (`volumes.keep_components` with the support's
#: structure parts): the window as a user would clean it up, so that the model is not compared with a baseline
#: denied the post-processing it gets itself (a review)
WINDOW_3D = "intensity window + 3D step"
ADAPTED = "trained + test-time adaptation"
ABLATIONS: dict[str, dict[str, Any]] = {
    "trained, no intensity": dict(intensity=False),
    "trained, no negative slices": dict(negatives=False),
    "trained, no z smoothing": dict(smooth_z=0.0),
    "trained, no calibration": dict(calibrate=False),
    "trained, keep empty": dict(relax_empty=False),
}


@dataclass(frozen=True)
class Scan:
    """One labelled scan: an image (NIfTI file or DICOM series folder), its label map, the structure's value."""

    image: str | list[str]  # a NIfTI path, a DICOM series folder, or its files in geometric order
    label: str
    value: int
    modality: str
    name: str = ""
    site: str = ""
    patient: str = ""
    case_id: str = ""  # the index's pseudonymous id of the scan (two scans of one patient differ here)


@dataclass
class Loaded:
    raw: np.ndarray  # (X, Y, Z) original grid, raw values (HU on CT)
    truth: np.ndarray  # (X, Y, Z) bool
    spacing: tuple[float, float, float]
    pre: dict  # the preprocessed MetaTensors (image, label) with their invertible transforms
    transforms: Compose | None = None  # the Compose that made ``pre`` (MONAI inverts only with the same transforms)
    affine: np.ndarray | None = None  # the file grid's voxel -> world (RAS) affine: `V.to_ras` orders its axes


def load_scan(scan: Scan, preprocessing: dict, query: bool = False) -> Loaded:
    """The scan in its own grid (raw values, structure mask) and preprocessed as at training; a ``query`` is
    cropped to its body from its image alone, as `segment` crops it (its label would widen the crop)."""
    tf = volume_transforms(
        preprocessing["spacing"],
        preprocessing["slice_size"],
        preprocessing["ct_window"],
        preprocessing["mr_percentiles"],
        body_keeps_labels=not query,
    )
    item = {"image": scan.image, "label": scan.label, "modality": scan.modality}
    raw = tf.transforms[0](item)  # LoadImaged: the file's own grid, with its metadata
    image = np.asarray(raw["image"], dtype=np.float32)
    truth = np.asarray(raw["label"]) == scan.value
    if image.shape != truth.shape:
        raise ValueError(
            f"{scan.label}: label map {truth.shape} is not on the grid of {scan.image} {image.shape}"
        )
    sx, sy, sz = (float(s) for s in voxel_sizes(np.asarray(raw["image"].affine, dtype=np.float64)))
    return Loaded(image, truth, (sx, sy, sz), tf(item), tf, np.asarray(raw["image"].affine, dtype=np.float64))


def load_structure(scan: Scan, preprocessing: dict, query: bool = False) -> Loaded:
    """`load_scan`, with the structure's preprocessed mask as ``pre["struct"]``.

    A ``query`` whose structure lies wholly outside what is segmented (the working slices, or the crop to the body
    found in its image) is scored as it is, on its own grid: as missed, as `segment` would miss it, with a warning
    that names the cause and the fix (until 2026-12-07 the pair stopped the whole evaluation; a structure partly
    outside was always scored so).

    Raises:
        ValueError: the structure is not in the scan, or none of a support's is left after preprocessing.
    """
    loaded = load_scan(scan, preprocessing, query)
    loaded.pre["struct"] = loaded.pre["label"].as_tensor()[0] == scan.value
    if not loaded.truth.any():
        raise ValueError(f"{scan.label}: no voxel of value {scan.value} (the structure) in this scan")
    if not bool(loaded.pre["struct"].any()):
        size, spacing = preprocessing["slice_size"], preprocessing["spacing"]
        field = " x ".join(f"{float(n) * float(sp):.0f}" for n, sp in zip(size, spacing, strict=True))
        # the working slices hold the supports' field of view: a wider query keeps its centre (a review: the error
        # blamed the body crop; the slices had cut the structure away)
        how = (f"the working slices ({field} mm around the body's centre, the supports' field of view at "
               f"{float(min(spacing)):.2f} mm) or the crop to the body found in its image"
               if query else "the resampling and the crop to the slices")
        lost = (f"{scan.label}: the structure (value {scan.value}, {int(loaded.truth.sum())} voxels in the file) is "
                f"not left after preprocessing: {how} removed it ({scan.image})")
        if not query:
            raise ValueError(lost)
        logger.warning("%s; it is scored as missed, as segment would miss it (--scale checkpoint, or supports of the "
                       "query's field of view, keep it)", lost)
    return loaded


def structure_preprocessing(preprocessing: dict, image: str | list[str], label: str, value: int | None,
                            modality: str, scale: str) -> dict:
    """The checkpoint's preprocessing, or (``scale="structure"``) the one chosen from a support's structure
    (`imaging_meta.volume.scale.structure_scale`), measured in the support's own grid.

    Args:
        image: the support scan (a NIfTI path, a DICOM series folder or its files): the slices must hold its body.
        label: the support's label map (it lies on its image's grid, which is checked when it is read).
        value: the structure's value in the label map; None: every non-zero voxel.
        modality: the support's ("CT" windows it, any other is percentile-scaled), to find its body.

    Raises:
        ValueError: an unknown ``scale``; a label map without the structure (naming the file).
    """
    return supports_preprocessing(preprocessing, [(image, label, value, modality)], scale)


def supports_preprocessing(preprocessing: dict, supports: Sequence[tuple[str | list[str], str, int | None, str]],
                           scale: str) -> dict:
    """`structure_preprocessing` for several supports, ``(image, label map, structure value, modality)`` each
    (`imaging_meta.volume.scale.supports_scale`): the thinnest structure sets the spacing and the widest body the
    slice size, whatever the supports' order (the first support's alone decided, and swapping two supports took a
    real query from 3D Dice 0.26 to 0.00; a review)."""
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {SCALES}, got {scale!r}")
    if scale == "checkpoint":
        return preprocessing
    fields = [_structure_field(preprocessing, *support) for support in supports]
    chosen, across = scale_and_shortfall(preprocessing, fields)
    if across is not None:
        width = max(max(field) for _, _, field in fields)
        logger.warning("the support's structure spans %.1f pixels across at %.2f mm, not %d: the support's body (%.0f mm "
                       "wide) must fit in %s pixels, which sets that spacing; crop the support and the query scans around "
                       "the structure to segment it finer", across, min(chosen["spacing"]), MIN_PIXELS, width,
                       " x ".join(str(n) for n in chosen["slice_size"]))
    return chosen


def _structure_field(preprocessing: dict, image: str | list[str], label: str, value: int | None,
                     modality: str) -> tuple[np.ndarray, list[float], tuple[float, float]]:
    """(mask, voxel size, field) of the structure: its mask in RAS order on its scan's own grid, and the in-plane
    extent (mm) the preprocessing keeps of that scan (its body with every labelled voxel and the margin,
    `datamodules.transforms.body`: the same box `FindBodyd` finds when the support is preprocessed).

    Image and label are read and turned to RAS as the preprocessing does, so that the last axis is axial whatever
    the file's storage order (a sagittal or coronal file was measured along its own axes: another scale, another
    mask). They are checked when the support is preprocessed, after this: a label map off its image's grid is
    named then (here its field is its own grid)."""
    from monai.transforms import Orientationd

    from datamodules.transforms.body import body_field, find_body

    tf = volume_transforms(preprocessing["spacing"], preprocessing["slice_size"], preprocessing["ct_window"],
                           preprocessing["mr_percentiles"])
    raw: Any = {"image": image, "label": label}
    for t in tf.transforms[:2]:  # load, channel first
        raw = t(raw)
    raw = next(t for t in tf.transforms if isinstance(t, Orientationd))(raw)
    spacing = [float(v) for v in voxel_sizes(np.asarray(raw["label"].affine, dtype=np.float64))]
    labels = np.asarray(raw["label"])[0]
    mask = labels != 0 if value is None else labels == value
    if not mask.any():
        what = "non-zero voxel" if value is None else f"voxel of value {value}"
        raise ValueError(f"{label}: the label map has no {what} (the structure); check --label-value")
    box = None
    values = np.asarray(raw["image"])[0]
    if values.shape == mask.shape:
        box = find_body(values, spacing, modality, [labels != 0])
    return mask, spacing, body_field(box, spacing, mask.shape)


def to_query_grid(loaded: Loaded, probs: torch.Tensor) -> np.ndarray:
    """A (H, W, D) map on the preprocessed grid -> the query's own grid (linear interpolation)."""
    from datamodules.transforms.volume import to_source_grid

    assert loaded.transforms is not None  # load_scan keeps them
    return np.clip(to_source_grid(loaded.pre["image"], probs, loaded.transforms)[0], 0.0, 1.0)


def _segment(
    learner: Learner,
    options: ScanOptions,
    support: Loaded,
    query: Loaded,
    protocol: str,
    chunks: int,
    pre: dict,
    device,
) -> tuple[np.ndarray, float | None, str | None, float | None]:
    """The method's mask of the query in its own grid, the segmenter's support self-check (`whole_scan`), the
    relaxation it needed to find anything (`ScanSegmenter.relaxed`) and the query's novelty
    (`ScanSegmenter.novelty`; both `whole_scan` only)."""
    s_img, s_mask = support.pre["image"].as_tensor()[0].float(), support.pre["struct"]
    q_img = query.pre["image"].as_tensor()[0].float()
    check, relaxed, novelty = None, None, None
    if protocol == "whole_scan":
        segmenter = ScanSegmenter(learner, options, device).fit([(s_img, s_mask)])
        probs = segmenter.predict(q_img)
        check, relaxed, novelty = segmenter.support_dice, segmenter.relaxed, segmenter.novelty
    else:
        # the query's true extent from its own label map (in RAS order the preprocessed grid's axial slices: the
        # preprocessing resamples in-plane only), not from the preprocessed mask, where an organ's thin tip slices
        # may vanish, leaving them to score as missed while the baselines got the whole extent (a review)
        q_truth = _ras(query)[1]
        if q_truth.shape[-1] != q_img.shape[-1]:
            raise RuntimeError(f"the query has {q_truth.shape[-1]} axial slices in its file, {q_img.shape[-1]} preprocessed")
        q_chunks = V.oracle_chunks(q_truth, chunks)
        s_slices = V.support_part_slices(structure_slices(s_mask), len(q_chunks))
        probs = torch.zeros(q_img.shape)
        # the oracle has already chosen the slices: no slice gate, and no retry of a part found empty (the retry
        # is a rule for a whole query)
        opts = dataclasses.replace(options, negatives=False, relax_empty=False)
        for qc, support_slice in zip(q_chunks, s_slices, strict=True):
            if qc:  # an extent shorter than the parts leaves some empty
                seg = ScanSegmenter(learner, opts, device).fit([(s_img, s_mask)], slices=[[support_slice]])
                probs = torch.maximum(probs, seg.predict(q_img, slices=qc))
    mask = to_query_grid(query, probs) > 0.5
    return V.keep_components(mask, V.structure_parts(s_mask.numpy())), check, relaxed, novelty


def _file_name(image: str | list) -> str:
    """A NIfTI file's name, or a DICOM series' folder name."""
    return Path(image[0]).parent.name if isinstance(image, (list, tuple)) else Path(image).name


def _extent(mask: np.ndarray) -> tuple[int, int] | None:
    zs = np.nonzero(mask.reshape(-1, mask.shape[-1]).any(0))[0]
    return (int(zs[0]), int(zs[-1])) if zs.size else None


def _ras(loaded: Loaded) -> tuple[np.ndarray, np.ndarray]:
    """The scan's raw values and structure mask in RAS axis order (Z the axial axis), as the baselines need."""
    if loaded.affine is None:
        return loaded.raw, loaded.truth
    return V.to_ras(loaded.raw, loaded.affine), V.to_ras(loaded.truth, loaded.affine)


def compared_values(s_raw: np.ndarray, q_raw: np.ndarray, modality: str, support_modality: str | None = None,
                    mr_percentiles: tuple[float, float] = (1.0, 99.0),
                    ct_window: tuple[float, float] = (-250.0, 250.0)) -> tuple[np.ndarray, np.ndarray]:
    """A support's and a query's raw values on the scale the window baseline compares them: the values the learner
    is given (MR by its own percentiles; CT in HU as stored, or on the learner's [0, 1] through its window when the
    other scan is not CT: a review found HU against [0, 1] taking the whole query or nothing)."""
    both_ct = (support_modality or modality).upper() == modality.upper() == "CT"
    ct = None if both_ct else ct_window
    return (V.scaled_like_the_learner(s_raw, support_modality or modality, mr_percentiles, ct),
            V.scaled_like_the_learner(q_raw, modality, mr_percentiles, ct))


def baseline_masks(support: Loaded, query: Loaded, modality: str, protocol: str,
                   support_modality: str | None = None,
                   mr_percentiles: tuple[float, float] = (1.0, 99.0),
                   ct_window: tuple[float, float] = (-250.0, 250.0)) -> dict[str, np.ndarray]:
    """The copy-mask and window baselines (the window also with the trained rows' 3D step, `WINDOW_3D`) on the
    query's file grid, computed with both scans in RAS order: a
    support and a query stored in different axis orders (LPS DICOM against RAS NIfTI, a sagittal file) are aligned
    along the body's axial axis, not along whichever axis each file stores last. ``modality`` is the query's,
    ``support_modality`` the support's (default: the same): each scan's body is found by its own modality's rule
    (a CT support's body found by the MR rule lost its soft-tissue slices; a review)."""
    s_raw, s_truth = _ras(support)
    q_raw, q_truth = _ras(query)
    s_scaled, q_scaled = compared_values(s_raw, q_raw, modality, support_modality, mr_percentiles, ct_window)
    window = V.intensity_window(s_scaled, s_truth, q_scaled)
    if protocol == "whole_scan":
        copy = V.copy_mask_at_relative_position(s_truth, s_raw, q_raw, modality, support_modality)
    else:
        qe, se = _extent(q_truth), _extent(s_truth)
        copy = np.zeros(q_truth.shape, dtype=bool)
        inside = np.zeros(q_truth.shape[-1], dtype=bool)
        if qe is not None and se is not None:
            inside[qe[0] : qe[1] + 1] = True
            # relative position within the two structures' extents, and in-plane within each body's box over
            # those slices (until 2026-12-08 uniform 'body' images made the box the whole plane, so a query with
            # more air around the same body got the copied mask in the wrong place, as whole_scan's did before
            # 2026-12-07; a review)
            copy[..., qe[0] : qe[1] + 1] = V.copy_mask_at_relative_position(
                s_truth[..., se[0] : se[1] + 1], s_raw[..., se[0] : se[1] + 1], q_raw[..., qe[0] : qe[1] + 1],
                modality, support_modality)
        window = window & inside.reshape(1, 1, -1)
    # the support's parts as the trained rows count them, on its preprocessed mask (`_segment`; a resampling that
    # closes or opens a gap between two parts changed the count; a review, 2026-12-07), else on the file's grid
    struct = support.pre.get("struct")
    parts = V.structure_parts(np.asarray(struct) if struct is not None else s_truth)
    window_3d = V.keep_components(window, parts)
    if query.affine is not None:
        copy, window, window_3d = (V.from_ras(m, query.affine) for m in (copy, window, window_3d))
    return {COPY: copy, WINDOW: window, WINDOW_3D: window_3d}


def score_pair(
    learner: Learner,
    preprocessing: dict,
    support: Scan,
    query: Scan,
    protocol: str = "whole_scan",
    untrained: Learner | None = None,
    ablations: bool = True,
    chunks: int = 3,
    options: ScanOptions = ScanOptions(),
    device="cpu",
    adapt_steps: int = 0,
    seed: int = 0,
    scale: str = "checkpoint",
) -> list[dict]:
    """One record per method for the query volume (3D Dice, HD95 in mm, and what was compared).

    With ``adapt_steps`` > 0 one more method, ``trained + test-time adaptation``: the scan segmenter on a copy of
    the learner adapted on this support and query scan (`imaging_meta.adaptation.adapt`, seeded with ``seed``).
    ``scale="structure"`` segments at a spacing chosen from the support structure's size
    (`imaging_meta.volume.scale.structure_scale`) instead of the checkpoint's.

    Raises:
        ValueError: an unknown protocol, or a support or query without the structure.
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    preprocessing = structure_preprocessing(preprocessing, support.image, support.label, support.value,
                                            support.modality, scale)
    s, q = load_structure(support, preprocessing), load_structure(query, preprocessing, query=True)
    preds: dict[str, np.ndarray] = {}
    variants = {
        TRAINED_FULL: (learner, options),
        LEARNER_ONLY_NAME: (learner, dataclasses.replace(LEARNER_ONLY)),
    }
    if ablations:
        # each ablation switches off one part: without the retry of an empty answer, which relaxes other parts.
        # The oracle has no slice gate and no retry already (`_segment`): those two would repeat "trained".
        off = {"negatives", "relax_empty"} if protocol == "oracle_extent" else set()
        variants.update({k: (learner, dataclasses.replace(options, **{"relax_empty": False, **v}))
                         for k, v in ABLATIONS.items() if not set(v) <= off})
    if untrained is not None:
        # the same recipe as "trained": the difference is what meta-training added (with the learner alone it also
        # counted the recipe: +0.80 with identical weights; a review)
        variants[UNTRAINED_NAME] = (untrained, options)
    if adapt_steps > 0:
        from imaging_meta.adaptation import adapt

        s_vol, q_vol = s.pre["image"].as_tensor()[0].float(), q.pre["image"].as_tensor()[0].float()
        adapted = adapt(learner, [(s_vol, s.pre["struct"])], [q_vol], steps=adapt_steps, seed=seed, device=device,
                        progress=False)
        variants[ADAPTED] = (adapted, options)
    checks: dict[str, float | None] = {}
    relaxations: dict[str, str | None] = {}
    novelties: dict[str, float | None] = {}
    for name, (lrn, opts) in variants.items():
        preds[name], checks[name], relaxations[name], novelties[name] = _segment(
            lrn, opts, s, q, protocol, chunks, preprocessing, device)
    preds.update(baseline_masks(s, q, query.modality, protocol, support.modality,
                                tuple(preprocessing["mr_percentiles"]), tuple(preprocessing["ct_window"])))
    return [
        {
            "protocol": protocol,
            "method": name,
            "dice": V.dice3d(pred, q.truth),
            "hd95": V.hd95(pred, q.truth, q.spacing, q.affine),  # the affine: a sheared (tilted) grid in mm
            "structure": query.name,
            "support": _file_name(support.image),
            "query": _file_name(query.image),
            "site": query.site,
            "patient": query.patient,
            "uses_query_extent": protocol == "oracle_extent",
            "scale": scale,
            # the adapted row's steps: two runs' adapted rows are otherwise named alike (a review)
            "adapt_steps": adapt_steps if name == ADAPTED else None,
            "support_dice": checks.get(name),  # the segmenter's self-check on the support (None: not measured)
            "relaxed": relaxations.get(name),  # an empty answer predicted again without these rules (None: no)
            "novelty": novelties.get(name),  # how unlike the support the query looked (None: not measured)
        }
        for name, pred in preds.items()
    ]
