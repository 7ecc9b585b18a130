"""The four demo scanner sites: format, grid, vendor, tissue intensities, and each site's voxel grid."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from datamodules.synthetic.phantom import (
    AIR,
    AORTA,
    CANAL,
    CANCELLOUS,
    CORTICAL,
    DISC,
    FAT,
    GALLBLADDER,
    IVC,
    KIDNEY_CORTEX,
    KIDNEY_MEDULLA,
    LIVER,
    MUSCLE,
    SPLEEN,
    STOMACH,
    STOMACH_GAS,
    TABLE,
    VISCERA,
)

# Per-tissue means (physical units) and texture amplitudes; missing tissues get 0.
_CT_BASE = {AIR: -1000, FAT: -100, MUSCLE: 50, VISCERA: 30, CORTICAL: 700, CANCELLOUS: 220, DISC: 80, CANAL: 15,
            AORTA: 40, IVC: 40, TABLE: 100, LIVER: 60, SPLEEN: 45, KIDNEY_CORTEX: 160, KIDNEY_MEDULLA: 100,
            STOMACH: 20, STOMACH_GAS: -1000, GALLBLADDER: 10}
_CT_TEXTURE = {FAT: 8, MUSCLE: 6, CANCELLOUS: 40, LIVER: 8, SPLEEN: 10, KIDNEY_CORTEX: 10, KIDNEY_MEDULLA: 10,
               STOMACH: 10, GALLBLADDER: 3, AORTA: 5, IVC: 8}


@dataclass(frozen=True)
class Site:
    """One scanner site: folder, modality and format, voxel grid, vendor, and its intensity model."""

    key: str
    letter: str
    modality: str
    fmt: str  # "dicom", "bids" or "decathlon"
    matrix: tuple[int, int]
    spacing: tuple[float, float]
    n_slices: int
    slice_spacing: float
    axes: str  # voxel axis codes: "LPS" or "RAS"
    manufacturer: str
    model: str
    institution: str
    field_strength: float | None
    means: dict[int, float]
    texture: dict[int, float]
    noise: float
    bias: float = 0.0
    #: how lesion tissue properties become intensities: ``offset + weights . (hu, arterial, portal, t1, t2)``
    #: (see `LesionType`); CT sites differ in contrast phase, MR sites in weighting.
    lesion_model: tuple[float, float, float, float, float, float] = (0.0, 1.0, 0.0, 1.0, 0.0, 0.0)


def _ct(offsets: dict[int, float], texture: dict[int, float] | None = None) -> tuple[dict, dict]:
    """CT means and textures: the shared base plus a site's contrast-phase offsets and texture changes."""
    means = {t: v + offsets.get(t, 0.0) for t, v in _CT_BASE.items()}
    return means, {**_CT_TEXTURE, **(texture or {})}


_A_MEANS, _A_TEX = _ct({LIVER: 45, SPLEEN: 60, KIDNEY_CORTEX: 20, KIDNEY_MEDULLA: 70, AORTA: 120, IVC: 100, VISCERA: 10})
_B_MEANS, _B_TEX = _ct({LIVER: 15, SPLEEN: 75, KIDNEY_CORTEX: 90, KIDNEY_MEDULLA: 0, AORTA: 260, IVC: 20},
                       {SPLEEN: 25, KIDNEY_CORTEX: 14})
# T1-weighted, 1.5 T: fat bright, bile and fluid dark, liver above spleen.
_C_MEANS: dict[int, float] = {
    AIR: 0, FAT: 850, MUSCLE: 330, VISCERA: 260, CORTICAL: 20, CANCELLOUS: 600, DISC: 250, CANAL: 110,
    AORTA: 40, IVC: 60, LIVER: 520, SPLEEN: 380, KIDNEY_CORTEX: 420, KIDNEY_MEDULLA: 300, STOMACH: 150,
    STOMACH_GAS: 0, GALLBLADDER: 90,
}
_C_TEX: dict[int, float] = {
    FAT: 30, MUSCLE: 15, LIVER: 20, SPLEEN: 15, KIDNEY_CORTEX: 15, KIDNEY_MEDULLA: 15, STOMACH: 20,
    CANCELLOUS: 40, GALLBLADDER: 5,
}
# T2-weighted, 3 T: fluid (bile, stomach content, CSF) bright, spleen and kidneys above liver.
_D_MEANS: dict[int, float] = {
    AIR: 0, FAT: 1300, MUSCLE: 350, VISCERA: 800, CORTICAL: 40, CANCELLOUS: 700, DISC: 1500, CANAL: 2000,
    AORTA: 80, IVC: 120, LIVER: 480, SPLEEN: 1000, KIDNEY_CORTEX: 1100, KIDNEY_MEDULLA: 1350, STOMACH: 1900,
    STOMACH_GAS: 0, GALLBLADDER: 2300,
}
_D_TEX: dict[int, float] = {
    FAT: 80, MUSCLE: 40, LIVER: 50, SPLEEN: 80, KIDNEY_CORTEX: 60, KIDNEY_MEDULLA: 60, STOMACH: 120,
    CANCELLOUS: 80, GALLBLADDER: 40,
}

SITES: tuple[Site, ...] = (
    # A: portal-venous phase (unenhanced HU + portal enhancement); B: late arterial phase, noisier
    Site("ct_northfield", "A", "CT", "dicom", (96, 96), (3.6, 3.6), 64, 4.0, "LPS", "SIEMENS",
          "SOMATOM Definition AS", "Northfield General Hospital", None, _A_MEANS, _A_TEX, noise=12.0,
          lesion_model=(0.0, 1.0, 0.0, 1.0, 0.0, 0.0)),
    Site("ct_harbor", "B", "CT", "dicom", (80, 80), (4.4, 4.4), 52, 5.0, "LPS", "GE MEDICAL SYSTEMS",
          "LightSpeed VCT", "Harbor Valley Medical Center", None, _B_MEANS, _B_TEX, noise=25.0,
          lesion_model=(0.0, 1.0, 1.0, 0.0, 0.0, 0.0)),
    # C: T1 between bile (t1 = 0) and fat (t1 = 1); D: T2 between cortical bone (t2 = 0) and bile (t2 = 1)
    Site("mr_bids", "C", "MR", "bids", (72, 72), (4.8, 4.8), 58, 4.5, "RAS", "Philips", "Ingenia",
          "Riverside University Clinic", 1.5, _C_MEANS, _C_TEX, noise=15.0, bias=0.12,
          lesion_model=(90.0, 0.0, 0.0, 0.0, 760.0, 0.0)),
    Site("mr_decathlon", "D", "MR", "decathlon", (64, 64), (5.2, 5.2), 44, 6.0, "LPS", "SIEMENS",
          "MAGNETOM Skyra", "Lakeside Imaging Institute", 3.0, _D_MEANS, _D_TEX, noise=40.0, bias=0.35,
          lesion_model=(40.0, 0.0, 0.0, 0.0, 0.0, 2260.0)),
)


def grid_affine(site: Site, table_z: float) -> np.ndarray:
    """Voxel -> RAS affine of a site: the in-plane grid centred on the table, slices centred at ``table_z``."""
    nx, ny = site.matrix
    sx, sy = site.spacing
    sz = site.slice_spacing
    sign = np.array([-1.0, -1.0]) if site.axes == "LPS" else np.array([1.0, 1.0])
    aff = np.eye(4)
    aff[0, 0], aff[1, 1], aff[2, 2] = sign[0] * sx, sign[1] * sy, sz
    aff[0, 3] = -sign[0] * (nx - 1) / 2 * sx
    aff[1, 3] = -sign[1] * (ny - 1) / 2 * sy
    aff[2, 3] = table_z - (site.n_slices - 1) / 2 * sz
    return aff


def world_grid(affine: np.ndarray, shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """World (RAS, mm) x, y, z of the voxel centres of ``shape`` under ``affine``, float32, broadcastable."""
    i, j, k = (np.arange(n, dtype=np.float32) for n in shape)
    i, j, k = i[:, None, None], j[None, :, None], k[None, None, :]
    a = affine.astype(np.float32)
    x, y, z = (a[r, 0] * i + a[r, 1] * j + a[r, 2] * k + a[r, 3] for r in range(3))
    return x, y, z

