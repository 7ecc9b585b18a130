"""Focal lesions of a demo patient: placement inside host organs, painting into the image, CSV rows."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.ndimage import distance_transform_edt, gaussian_filter

from datamodules.synthetic.dicom_writer import RAS_TO_LPS
from datamodules.synthetic.lesion_types import LESION_TYPES, LesionType
from datamodules.synthetic.phantom import ORGAN_TISSUE, ORGANS
from datamodules.synthetic.sites import Site

_HOST_ORGANS = (1, 2, 3, 4)  # liver, spleen, right and left kidney

#: per host organ: (voxel indices (n, 3), world RAS mm (n, 3), depth below the organ surface mm (n,), organ centre (3,))
_Candidates = dict[int, tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]


@dataclass
class Lesion:
    """One placed lesion: its class, host organ, pose, size and shape parameters."""

    kind: LesionType
    organ: int
    voxel: np.ndarray  # continuous voxel coordinates of the centre
    centre: np.ndarray  # RAS mm
    radius: float  # nominal radius (mm)
    rot: np.ndarray  # lesion frame
    semi: np.ndarray  # relative semi-axes
    bumps: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]  # directions, frequencies, phases, amplitudes
    outward: np.ndarray  # unit vector from the organ's centre to the lesion (RAS), for wedges
    level: float  # layering level (mm along RAS y) for layered lesions


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    """A random (3, 3) rotation (QR of a Gaussian matrix, signs fixed)."""
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    return q * np.sign(np.diag(r))


def _draw_sizes_and_hosts(names: Sequence[str], rng: np.random.Generator) -> list[tuple[float, LesionType, list[int]]]:
    """(diameter mm, class, host organs with the drawn one first) per lesion, largest first (ties keep draw order)."""
    draws = []
    for name in names:
        t = LESION_TYPES[name]
        lo, hi = t.diameter_mm
        d = float(np.exp(rng.uniform(np.log(lo), np.log(hi))))
        organs = list(t.organs)
        p = np.array([t.organs[o] for o in organs], float)
        first = int(rng.choice(organs, p=p / p.sum()))
        draws.append((d, t, [first] + [o for o in organs if o != first]))
    draws.sort(key=lambda x: -x[0])  # stable: ties keep their draw order
    return draws


def _organ_candidates(label: np.ndarray, affine: np.ndarray, spacing) -> _Candidates:
    """The voxels of every host organ with their world position and depth (distance transform on this grid)."""
    cand: _Candidates = {}
    for v in _HOST_ORGANS:
        mask = label == v
        idx = np.argwhere(mask)
        lo_, hi_ = idx.min(0), idx.max(0) + 1
        crop = np.pad(mask[lo_[0]:hi_[0], lo_[1]:hi_[1], lo_[2]:hi_[2]], 1)
        dist = distance_transform_edt(crop, sampling=spacing)[1:-1, 1:-1, 1:-1]
        ijk = idx - lo_
        depth = dist[ijk[:, 0], ijk[:, 1], ijk[:, 2]].astype(np.float64)
        world = (affine[:3, :3] @ idx.T.astype(np.float64)).T + affine[:3, 3]
        cand[v] = (idx, world, depth, world.mean(0))
    return cand


def _choose_centre(d: float, organs: Sequence[int], cand: _Candidates, placed: Sequence[Lesion],
                   rng: np.random.Generator) -> tuple[int, int, float]:
    """(host organ, candidate index, radius mm) of a free centre for a lesion of diameter ``d``.

    The radius shrinks by 15 % at a time (down to 3 mm) until some allowed organ has room; with no room
    anywhere the lesion gets 3 mm at the deepest voxel of the first organ that is not a centre yet.
    """
    radius = d / 2
    choice = None
    while choice is None and radius >= 3.0 - 1e-9:
        for v in organs:
            idx, world, depth, _ = cand[v]
            ok = depth >= 1.1 * radius + 1.0
            for other in placed:
                ok &= np.linalg.norm(world - other.centre, axis=1) >= 1.15 * (radius + other.radius) + 2.0
            if ok.any():
                choice = (v, int(rng.choice(np.flatnonzero(ok))))
                break
        else:
            radius *= 0.85
    if choice is None:  # no room anywhere: the deepest voxel of the first organ that is not a centre yet
        radius = 3.0
        v = organs[0]
        idx, world, depth, _ = cand[v]
        score = depth.copy()
        for other in placed:
            score[np.linalg.norm(world - other.centre, axis=1) < 1.0] = -1.0
        choice = (v, int(np.argmax(score)))
    return choice[0], choice[1], radius


def _shaped_lesion(t: LesionType, v: int, k: int, radius: float, cand: _Candidates, affine: np.ndarray,
                   rng: np.random.Generator) -> Lesion:
    """A lesion of class ``t`` at candidate ``k`` of organ ``v``, with its random pose and shape drawn."""
    idx, world, depth, organ_centre = cand[v]
    voxel = idx[k] + rng.uniform(-0.4, 0.4, 3)
    centre = affine[:3, :3] @ voxel + affine[:3, 3]
    out = centre - organ_centre
    out /= max(float(np.linalg.norm(out)), 1e-6)
    n_b = {"lobulated": 3, "irregular": 6, "spiculated": 12}.get(t.shape, 1)
    dirs = rng.normal(size=(n_b, 3))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    freq = rng.uniform(*{"lobulated": (1.5, 2.5), "irregular": (3.0, 5.0)}.get(t.shape, (1.0, 2.0)), n_b)
    amp = rng.uniform(*{"lobulated": (0.08, 0.15), "irregular": (0.05, 0.12)}.get(t.shape, (0.0, 0.0)), n_b)
    # keyword order is draw order: rotation, semi-axes, phases, then the layering level
    return Lesion(
        kind=t, organ=v, voxel=voxel, centre=centre, radius=radius, rot=_random_rotation(rng),
        semi=rng.uniform(0.85, 1.15, 3), bumps=(dirs, freq, rng.uniform(0, 2 * np.pi, n_b), amp),
        outward=out, level=float(rng.uniform(-0.3, 0.25) * radius),
    )


def place_lesions(names: Sequence[str], label: np.ndarray, affine: np.ndarray, spacing,
                  rng: np.random.Generator) -> list[Lesion]:
    """Non-overlapping lesions inside their host organs, largest first.

    A lesion's centre keeps 1.1 radii (+1 mm) from the organ's boundary (distance transform of the organ
    mask on this grid) and 1.15 summed radii (+2 mm) from other lesions; when the drawn size does not fit
    in any allowed organ the radius shrinks (down to 3 mm), and a lesion that still does not fit is
    centred on the deepest free organ voxel instead.

    Args:
        names: lesion class names, one per lesion (from `draw_lesion_classes`).
        label: (X, Y, Z) organ label map of the patient.
        affine: (4, 4) voxel -> RAS world (mm) of ``label``.
        spacing: (3,) voxel spacing (mm).
        rng: the patient's lesion generator.

    Returns:
        The placed lesions, largest first.
    """
    draws = _draw_sizes_and_hosts(names, rng)
    cand = _organ_candidates(label, affine, spacing)
    placed: list[Lesion] = []
    for d, t, organs in draws:
        v, k, radius = _choose_centre(d, organs, cand, placed, rng)
        placed.append(_shaped_lesion(t, v, k, radius, cand, affine, rng))
    return placed


def _sigmoid(x: np.ndarray) -> np.ndarray:
    """The logistic function, written with tanh (no overflow)."""
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def _box_noise(rng: np.random.Generator, shape, scale_mm: float, spacing) -> np.ndarray:
    """Gaussian-filtered white noise in a lesion's box, unit standard deviation, correlation ``scale_mm``."""
    field = gaussian_filter(rng.normal(size=shape), [max(scale_mm / s, 0.3) for s in spacing], mode="reflect")
    return field / max(float(field.std()), 1e-6)


def _lesion_shape_radius(les: Lesion, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Normalised radius (< 1 inside) and lesion-frame coordinates at offsets ``p`` (3, ...) mm from the centre."""
    t = les.kind
    r0 = les.radius
    u = np.tensordot(les.rot.T, p, axes=1) / (r0 * les.semi[:, None, None, None])
    rad = np.sqrt((u**2).sum(0)) + 1e-6
    uh = u / rad
    if t.shape == "wedge":
        along = np.tensordot(les.outward, p, axes=1) / r0
        perp = np.sqrt(np.maximum((p**2).sum(0) / r0**2 - along**2, 0.0))
        return np.maximum(np.abs(along), perp / (0.15 + 0.75 * (along + 1.0) / 2.0)), u
    dirs, freq, phase, amp = les.bumps
    proj = np.tensordot(dirs, uh, axes=1)  # (n, ...)
    if t.shape == "spiculated":
        spikes = (np.maximum(proj, 0.0) ** 24).sum(0)
        return rad / (1.0 + 0.7 * spikes), u
    if t.shape in ("lobulated", "irregular"):
        bump = (amp[:, None, None, None] * np.sin(freq[:, None, None, None] * np.pi * proj
                                                  + phase[:, None, None, None])).sum(0)
        return rad / (1.0 + bump), u
    return rad, u


def render_lesions(img: np.ndarray, label: np.ndarray, xyz, site: Site, lesions: Sequence[Lesion],
                   rng: np.random.Generator) -> None:
    """Paint the lesions into ``img`` (before blur and noise), in place, inside their host organs only."""
    spacing = np.array([*site.spacing, site.slice_spacing])
    model = np.asarray(site.lesion_model, np.float64)
    for les in lesions:
        t = les.kind
        half = (1.7 * les.radius * 1.2 + 4.0) / spacing
        lo = np.maximum(np.floor(les.voxel - half).astype(int), 0)
        hi = np.minimum(np.ceil(les.voxel + half).astype(int) + 1, label.shape)
        box = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
        shape = tuple(int(b - a) for a, b in zip(lo, hi, strict=True))
        p = np.stack([xyz[a][box].astype(np.float64) - les.centre[a] for a in range(3)])
        r, u = _lesion_shape_radius(les, p)
        if t.margin == "sharp":
            w = np.clip(0.5 + (1.0 - r) * les.radius / 1.2, 0.0, 1.0)
        else:
            r = r * (1.0 + 0.1 * _box_noise(rng, shape, 3.0, spacing))
            w = _sigmoid((1.0 - r) * les.radius / 3.0)
        if t.texture == "rim":
            s = _sigmoid((r - 0.62) / 0.06)
        elif t.texture == "nodular":
            s = _sigmoid((r - 0.6) / 0.05) * _sigmoid((_box_noise(rng, shape, 0.25 * les.radius, spacing) - 0.3) / 0.25)
        elif t.texture == "scar":
            phi = np.arctan2(u[1], u[0])
            spokes = _sigmoid((np.abs(np.cos(2.5 * phi)) - 0.9) / 0.025) * _sigmoid((0.75 - r) / 0.05)
            s = np.maximum(_sigmoid((0.2 - r) / 0.04), spokes)
        elif t.texture == "mosaic":
            s = _sigmoid(_box_noise(rng, shape, max(0.3 * les.radius, 4.0), spacing) / 0.3)
        elif t.texture == "layered":
            s = _sigmoid((les.level - p[1]) / 1.5)
        else:
            s = np.zeros(shape)
        main = model[0] + float(model[1:] @ np.asarray(t.main, np.float64))
        value = main * (1.0 - s)
        if t.second is not None:
            value = value + s * (model[0] + float(model[1:] @ np.asarray(t.second, np.float64)))
        value = value + t.grain * site.texture.get(ORGAN_TISSUE[les.organ], 0.0) * _box_noise(rng, shape, 3.0, spacing)
        w = w * (label[box] == les.organ)
        img[box] = ((1.0 - w) * img[box] + w * value).astype(np.float32)


def lesion_rows(site: Site, image: str, lesions: Sequence[Lesion]) -> list[dict[str, str]]:
    """The ``lesions.csv`` rows of one image: class, LPS centre (mm, 2 decimals), diameter and host organ.

    Args:
        site: the image's site (unused; rows look the same at every site).
        image: the ``image`` column, relative to the cohort root.
        lesions: the image's lesions.

    Returns:
        One dict per lesion, keyed by `LESION_COLUMNS`.
    """
    rows = []
    for les in lesions:
        lps = les.centre * RAS_TO_LPS
        rows.append({
            "image": image, "class": les.kind.name,
            "x": f"{lps[0]:.2f}", "y": f"{lps[1]:.2f}", "z": f"{lps[2]:.2f}",
            "size_mm": f"{2 * les.radius:.1f}", "organ": ORGANS[les.organ],
        })
    return rows

