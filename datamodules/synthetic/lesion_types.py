"""The 18 demo lesion classes (geometry and tissue properties) and which patients have which."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class LesionType:
    """A focal lesion class: where it grows, how often, its geometry, and its physical tissue properties.

    Tissue properties are 5-vectors ``(hu, arterial, portal, t1, t2)``: unenhanced CT attenuation (HU), the
    extra HU in the late arterial and in the portal-venous phase, and the relative T1 and T2 signal in
    [0, 1] (T1: 0 as dark as bile, 1 as bright as fat; T2: 0 as dark as cortical bone, 1 as bright as bile).
    Each site renders them through its own ``lesion_model``, so the same lesion looks different on the
    portal-venous CT (A), the noisier arterial CT (B), T1 MR (C) and T2 MR (D).

    Attributes:
        name: class name (the ``class`` column of ``lesions.csv``).
        organs: host label value -> relative probability.
        period: a patient has the class when ``(patient + offset) % period == 0``, with an offset drawn per
            site and seed; periods divide 12, so 12 patients per site give exactly ``4 * 12 / period``
            patients with the class.
        count: (min, max) lesions of the class in a patient who has it.
        diameter_mm: (min, max) nominal diameter (smaller when the organ has no room).
        shape: "round", "lobulated", "irregular", "spiculated" or "wedge" (base towards the capsule).
        margin: "sharp" or "ill_defined".
        texture: how ``second`` mixes into ``main``: "homogeneous" (not at all), "rim" (an outer ring),
            "nodular" (peripheral nodules), "scar" (central stellate scar), "mosaic" (smooth random
            patches) or "layered" (the dependent, posterior part of the lesion).
        enhancement: the enhancement pattern in words (the numbers are in ``main`` and ``second``).
        main: tissue properties of the lesion body.
        second: tissue properties of the rim / nodules / scar / other tissue / dependent layer.
        grain: texture amplitude, as a fraction of the host organ's parenchymal texture.
    """

    name: str
    organs: dict[int, float]
    period: int
    count: tuple[int, int]
    diameter_mm: tuple[float, float]
    shape: str
    margin: str
    texture: str
    enhancement: str
    main: tuple[float, float, float, float, float]
    second: tuple[float, float, float, float, float] | None = None
    grain: float = 0.5


_KIDNEYS = {3: 0.5, 4: 0.5}
#: the lesion classes of the demo cohort, in the order their offsets are drawn.
LESION_TYPES: dict[str, LesionType] = {t.name: t for t in (
    LesionType("cyst", {1: 0.45, 3: 0.2, 4: 0.2, 2: 0.15}, 1, (2, 4), (6, 30), "round", "sharp", "homogeneous",
               "none (water density)", (5, 0, 0, 0.02, 0.97), grain=0.2),
    LesionType("haemangioma", {1: 1.0}, 2, (1, 2), (10, 40), "lobulated", "sharp", "nodular",
               "peripheral nodular, filling in", (40, 0, 15, 0.12, 0.88), (40, 190, 120, 0.12, 0.88)),
    LesionType("metastasis", {1: 0.8, 2: 0.2}, 2, (1, 3), (8, 35), "irregular", "ill_defined", "rim",
               "rim, hypovascular necrotic core", (25, 0, 10, 0.22, 0.62), (45, 55, 70, 0.35, 0.45)),
    LesionType("hepatocellular_carcinoma", {1: 1.0}, 3, (1, 2), (15, 40), "lobulated", "sharp", "mosaic",
               "arterial hyperenhancement, portal washout, mosaic", (50, 95, 20, 0.45, 0.42), (35, 35, 0, 0.3, 0.6)),
    LesionType("focal_nodular_hyperplasia", {1: 1.0}, 4, (2, 3), (15, 40), "lobulated", "sharp", "scar",
               "bright homogeneous arterial, central scar", (55, 110, 50, 0.55, 0.25), (20, 0, 10, 0.15, 0.85)),
    LesionType("adenoma", {1: 1.0}, 6, (2, 3), (12, 35), "round", "sharp", "homogeneous",
               "mild arterial, intracellular fat (T1 bright)", (30, 55, 40, 0.78, 0.32)),
    LesionType("abscess", {1: 0.8, 2: 0.2}, 6, (2, 3), (15, 40), "irregular", "ill_defined", "rim",
               "thick enhancing rim, fluid centre, oedema", (15, 0, 0, 0.05, 0.92), (50, 60, 80, 0.35, 0.5)),
    LesionType("cholangiocarcinoma", {1: 1.0}, 6, (2, 3), (15, 40), "spiculated", "ill_defined", "mosaic",
               "delayed progressive, fibrous", (45, 15, 45, 0.3, 0.45), (40, 5, 20, 0.25, 0.6)),
    LesionType("focal_fat", {1: 1.0}, 4, (2, 3), (10, 30), "wedge", "ill_defined", "homogeneous",
               "fat-containing parenchyma, no mass effect", (-15, 10, 35, 0.72, 0.35)),
    LesionType("lipoma", {1: 0.5, 3: 0.25, 4: 0.25}, 6, (2, 3), (8, 25), "round", "sharp", "homogeneous",
               "none (fat density)", (-100, 0, 0, 1.0, 0.56), grain=0.3),
    LesionType("angiomyolipoma", _KIDNEYS, 3, (1, 2), (8, 30), "lobulated", "sharp", "mosaic",
               "fat with enhancing vessels", (-90, 0, 0, 1.0, 0.56), (40, 130, 80, 0.35, 0.3)),
    LesionType("calcification", {1: 0.4, 2: 0.3, 3: 0.15, 4: 0.15}, 2, (1, 2), (6, 10), "round", "sharp",
               "homogeneous", "calcified (very dense; MR signal void)", (750, 0, 0, 0.0, 0.0), grain=0.2),
    LesionType("haematoma", {1: 0.6, 2: 0.4}, 6, (2, 3), (15, 40), "lobulated", "sharp", "layered",
               "none; dense dependent blood", (40, 0, 0, 0.45, 0.72), (78, 0, 0, 0.82, 0.3)),
    LesionType("lymphoma", {2: 1.0}, 4, (2, 3), (8, 25), "round", "ill_defined", "homogeneous",
               "mild homogeneous", (40, 25, 30, 0.3, 0.48)),
    LesionType("renal_cell_carcinoma", _KIDNEYS, 3, (1, 2), (12, 40), "lobulated", "sharp", "mosaic",
               "avid heterogeneous, necrosis", (40, 150, 90, 0.35, 0.5), (25, 0, 5, 0.15, 0.85)),
    LesionType("infarct", {2: 0.5, 3: 0.25, 4: 0.25}, 4, (2, 3), (12, 30), "wedge", "sharp", "homogeneous",
               "none (perfusion defect)", (35, 0, 5, 0.3, 0.55)),
    LesionType("oncocytoma", _KIDNEYS, 6, (2, 3), (12, 35), "round", "sharp", "scar",
               "avid homogeneous, central stellate scar", (40, 110, 100, 0.35, 0.4), (20, 0, 20, 0.2, 0.8)),
    LesionType("splenic_hamartoma", {2: 1.0}, 6, (2, 3), (10, 25), "round", "sharp", "mosaic",
               "heterogeneous arterial, iso portal", (45, 130, 75, 0.4, 0.55), (45, 70, 65, 0.38, 0.5)),
)}

#: columns of ``lesions.csv`` (the lesion-CSV input format of `datamodules.sources.lesion_csv`, plus ``organ``)
LESION_COLUMNS = ("image", "class", "x", "y", "z", "size_mm", "organ")


def draw_lesion_classes(seed: int, site_index: int, patient: int) -> list[str]:
    """The lesion classes of one demo patient, one entry per lesion (deterministic).

    Class ``t`` is present when ``(patient + offset_t) % t.period == 0``, with offsets drawn once per
    (seed, site): 12 consecutive patients of a site hold exactly ``12 / period`` patients with it, whatever
    the seed. The number of lesions of a present class is drawn from ``t.count`` with a generator that
    depends only on (seed, site, patient).

    Args:
        seed: cohort seed.
        site_index: index into `SITES`.
        patient: 1-based patient number within the site.

    Returns:
        Class names, in `LESION_TYPES` order, repeated once per lesion.
    """
    schedule = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(site_index, 0, 0)))  # patient 0: unused
    offsets = schedule.integers(0, 12, size=len(LESION_TYPES))
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(site_index, patient, 3)))
    counts = [int(rng.integers(t.count[0], t.count[1] + 1)) for t in LESION_TYPES.values()]
    out: list[str] = []
    for t, off, n in zip(LESION_TYPES.values(), offsets, counts, strict=True):
        if (patient + int(off)) % t.period == 0:
            out += [t.name] * n
    return out

