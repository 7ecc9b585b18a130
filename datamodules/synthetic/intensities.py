"""Site-specific image intensities of a rendered phantom: tissue means, texture, lesions, blur, bias, noise."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.ndimage import gaussian_filter

from datamodules.synthetic.lesions import Lesion, render_lesions
from datamodules.synthetic.phantom import FAT, N_TISSUES, VISCERA, Patient, eval_waves
from datamodules.synthetic.sites import Site


def _lut(values: dict[int, float]) -> np.ndarray:
    """A lookup table tissue code -> value (0 for the tissues ``values`` leaves out)."""
    lut = np.zeros(N_TISSUES, np.float32)
    for t, v in values.items():
        lut[t] = v
    return lut


def _smooth_noise(rng: np.random.Generator, shape, sigma_mm: float, spacing) -> np.ndarray:
    """Gaussian-filtered white noise with unit standard deviation and a correlation length of ``sigma_mm``."""
    field = gaussian_filter(rng.normal(size=shape).astype(np.float32), [sigma_mm / s for s in spacing], mode="wrap")
    return field / max(float(field.std()), 1e-6)


def site_image(site: Site, pat: Patient, tissue: np.ndarray, xyz, rng: np.random.Generator,
               label: np.ndarray | None = None, lesions: Sequence[Lesion] = (),
               rng_lesions: np.random.Generator | None = None) -> np.ndarray:
    """Site-specific intensities: tissue means, texture, lesions, point-spread blur, bias field and noise.

    Args:
        site: the site whose intensity model is used.
        pat: the patient (for the MR bias field).
        tissue: (X, Y, Z) tissue codes from `Patient.render`.
        xyz: world (RAS) coordinates of the voxel centres, three arrays broadcastable to the grid.
        rng: the patient's noise generator (texture, then noise).
        label: (X, Y, Z) organ labels; lesions are painted inside their host organ only.
        lesions: the patient's lesions.
        rng_lesions: the patient's lesion generator (lesion textures).

    Returns:
        (X, Y, Z) float32 image in the site's physical units.
    """
    spacing = (*site.spacing, site.slice_spacing)
    tex_a = _smooth_noise(rng, tissue.shape, 5.0, spacing)  # organ parenchyma
    tex_b = _smooth_noise(rng, tissue.shape, 8.0, spacing)  # bowel loops in mesenteric fat
    img = _lut(site.means)[tissue] + _lut(site.texture)[tissue] * tex_a
    visc = tissue == VISCERA
    # mesentery and bowel: a smooth mix of fat and soft tissue
    w = 1.0 / (1.0 + np.exp(-2.5 * tex_b[visc]))
    img[visc] = w * site.means[FAT] + (1.0 - w) * site.means[VISCERA]
    if lesions:
        assert label is not None and rng_lesions is not None  # lesions come with their label map and generator
        render_lesions(img, label, xyz, site, lesions, rng_lesions)
    sx, sy = site.spacing
    img = gaussian_filter(img, sigma=(1.8 / sx, 1.8 / sy, 1.2 / site.slice_spacing), mode="nearest")
    if site.modality == "CT":
        img = img + rng.normal(0.0, site.noise, img.shape).astype(np.float32)
    else:
        bias = np.exp(site.bias * eval_waves(pat.bias, *xyz)).astype(np.float32)
        s = img * bias
        n1 = rng.normal(0.0, site.noise, img.shape).astype(np.float32)
        n2 = rng.normal(0.0, site.noise, img.shape).astype(np.float32)
        img = np.sqrt((s + n1) ** 2 + n2**2)  # Rician magnitude: never negative
    return img.astype(np.float32)
