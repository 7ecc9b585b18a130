"""The analytic abdominal phantom: one random anatomy per patient, rendered to tissue codes and organ labels."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

#: label value -> structure name of the demo label maps.
ORGANS: dict[int, str] = {
    1: "liver",
    2: "spleen",
    3: "kidney_right",
    4: "kidney_left",
    5: "stomach",
    6: "gallbladder",
    7: "aorta",
    8: "inferior_vena_cava",
    9: "vertebrae",
    10: "psoas",
    11: "paraspinal_muscles",
}

# Tissue codes of the phantom (not the label values).
AIR, FAT, MUSCLE, VISCERA, CORTICAL, CANCELLOUS, DISC, CANAL, AORTA, IVC, TABLE = range(11)
LIVER, SPLEEN, KIDNEY_CORTEX, KIDNEY_MEDULLA, STOMACH, STOMACH_GAS, GALLBLADDER = range(11, 18)
N_TISSUES = 18
ORGAN_TISSUE = {1: LIVER, 2: SPLEEN, 3: KIDNEY_CORTEX, 4: KIDNEY_CORTEX, 5: STOMACH, 6: GALLBLADDER}

# Organ templates in body coordinates (mm, RAS+, z = 0 near L1), for a nominal 300 x 230 mm body:
# centre, semi-axes, (yaw about z, pitch about x, roll about y) in degrees, taper of the y/z axes along x.
# Painted in this order; later organs win where shapes overlap (the gallbladder sits in the liver's fossa).
_TEMPLATES: dict[int, dict[str, Any]] = {
    1: dict(c=(55.0, 5.0, 55.0), s=(88.0, 78.0, 75.0), rot=(10.0, 0.0, 0.0), taper=0.4),  # liver, right
    5: dict(c=(-42.0, 36.0, 70.0), s=(52.0, 36.0, 45.0), rot=(35.0, 0.0, 10.0), taper=0.0),  # stomach, left-anterior
    2: dict(c=(-86.0, -40.0, 65.0), s=(28.0, 50.0, 40.0), rot=(-35.0, 0.0, 0.0), taper=0.0),  # spleen, left-posterior
    3: dict(c=(64.0, -50.0, -8.0), s=(28.0, 25.0, 48.0), rot=(25.0, 0.0, 12.0), taper=0.0),  # right kidney, lower
    4: dict(c=(-64.0, -50.0, 10.0), s=(28.0, 25.0, 48.0), rot=(-25.0, 0.0, -12.0), taper=0.0),  # left kidney
    6: dict(c=(46.0, 42.0, 10.0), s=(14.0, 16.0, 28.0), rot=(0.0, 20.0, 0.0), taper=0.0),  # gallbladder
}


def _rotation(yaw: float, pitch: float, roll: float) -> np.ndarray:
    """(3, 3) rotation ``Rz(yaw) @ Rx(pitch) @ Ry(roll)``, angles in degrees."""
    a, b, c = np.deg2rad([yaw, pitch, roll])
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    ry = np.array([[np.cos(c), 0, np.sin(c)], [0, 1, 0], [-np.sin(c), 0, np.cos(c)]])
    return rz @ rx @ ry


def _random_waves(rng: np.random.Generator, n: int, wavelength: tuple[float, float], amp: tuple[float, float]):
    """Parameters of a sum of ``n`` plane waves with random directions, wavelengths and phases."""
    d = rng.normal(size=(n, 3))
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    k = d * (2 * np.pi / rng.uniform(*wavelength, size=(n, 1)))
    return k.astype(np.float32), rng.uniform(0, 2 * np.pi, n).astype(np.float32), rng.uniform(*amp, n).astype(np.float32)


def eval_waves(waves, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
    """The sum of the plane waves ``waves`` (from `_random_waves`) at (x, y, z), broadcast, float32."""
    k, phase, amp = waves
    out = np.zeros(np.broadcast_shapes(x.shape, y.shape, z.shape), np.float32)
    for i in range(len(phase)):
        out += amp[i] * np.sin(k[i, 0] * x + k[i, 1] * y + k[i, 2] * z + phase[i])
    return out


@dataclass
class _Organ:
    """One organ of a patient: label value, pose, semi-axes, taper and surface bumps (body mm, RAS+)."""

    value: int
    centre: np.ndarray
    semi: np.ndarray
    rot: np.ndarray
    taper: float
    bumps: tuple[np.ndarray, np.ndarray, np.ndarray]  # directions (n, 3), frequencies (n,), phases (n,)
    bump_amp: np.ndarray


class Patient:
    """One random anatomy: body habitus, organ shapes and a smooth elastic displacement, in mm (RAS+)."""

    def __init__(self, rng: np.random.Generator):
        self.ax = rng.uniform(138.0, 160.0)  # body semi-axes (left-right, anterior-posterior)
        self.ay = rng.uniform(104.0, 124.0)
        self.fat = rng.uniform(12.0, 28.0)
        self.muscle = rng.uniform(8.0, 13.0)
        self.shift = np.array([rng.uniform(-8, 8), rng.uniform(-6, 6)])  # body centre off the table centre
        self.z_jitter = rng.uniform(-10.0, 10.0)
        self.vertebra_phase = rng.uniform(0, 32.0)
        self.rib_phase = rng.uniform(0, 2 * np.pi)
        sx, sy = self.ax / 150.0, self.ay / 115.0
        scale = rng.uniform(0.92, 1.08)
        self.organs: list[_Organ] = []
        for value, t in _TEMPLATES.items():
            c = np.array(t["c"]) * np.array([sx, sy, 1.0]) + np.clip(rng.normal(0, [5.0, 4.0, 5.0]), -10, 10)
            s = np.array(t["s"]) * scale * rng.uniform(0.88, 1.12, 3)
            yaw, pitch, roll = t["rot"]
            rot = _rotation(yaw + rng.uniform(-10, 10), pitch + rng.uniform(-6, 6), roll + rng.uniform(-6, 6))
            n_b = 4
            dirs = rng.normal(size=(n_b, 3))
            dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
            bumps = (dirs.astype(np.float32), rng.uniform(1.5, 3.5, n_b).astype(np.float32),
                     rng.uniform(0, 2 * np.pi, n_b).astype(np.float32))
            self.organs.append(_Organ(value, c, s, rot, t["taper"], bumps, rng.uniform(0.02, 0.06, n_b).astype(np.float32)))
        # elastic displacement: three components, each a sum of three long-wavelength waves (mm)
        self.elastic = [_random_waves(rng, 3, (120.0, 320.0), (1.5, 4.0)) for _ in range(3)]
        self.bias = _random_waves(rng, 3, (350.0, 700.0), (0.3, 0.5))
        self.sex = "F" if rng.random() < 0.5 else "M"

    def organ_mask(self, o: _Organ, x: np.ndarray, y: np.ndarray, z: np.ndarray):
        """Inside mask and normalised radius (inf far outside) of one organ at body coordinates (x, y, z)."""
        # only voxels in a bounding cube can be inside: evaluate the shape there
        reach = float(o.semi.max()) * (1.0 + float(o.bump_amp.sum())) * (1.0 + o.taper) + 1.0
        box = ((np.abs(x - np.float32(o.centre[0])) < reach) & (np.abs(y - np.float32(o.centre[1])) < reach)
               & (np.abs(z - np.float32(o.centre[2])) < reach))
        sel = np.flatnonzero(box)
        px = x.ravel()[sel] - np.float32(o.centre[0])
        py = y.ravel()[sel] - np.float32(o.centre[1])
        pz = z.ravel()[sel] - np.float32(o.centre[2])
        r = o.rot.astype(np.float32)
        s = o.semi.astype(np.float32)
        ux = (r[0, 0] * px + r[1, 0] * py + r[2, 0] * pz) / s[0]
        uy = (r[0, 1] * px + r[1, 1] * py + r[2, 1] * pz) / s[1]
        uz = (r[0, 2] * px + r[1, 2] * py + r[2, 2] * pz) / s[2]
        if o.taper:
            t = np.maximum(np.float32(1.0) + np.float32(o.taper) * ux, np.float32(0.3))  # thinner on the left
            uy, uz = uy / t, uz / t
        rad = np.sqrt(ux * ux + uy * uy + uz * uz) + np.float32(1e-6)
        dirs, freq, phase = o.bumps
        eps = np.zeros_like(rad)
        for i in range(len(freq)):
            proj = (dirs[i, 0] * ux + dirs[i, 1] * uy + dirs[i, 2] * uz) / rad
            eps += o.bump_amp[i] * np.sin(freq[i] * np.float32(np.pi) * proj + phase[i])
        inside = np.zeros(x.shape, bool)
        radius = np.full(x.shape, np.inf, np.float32)
        inside.ravel()[sel] = rad < 1.0 + eps
        radius.ravel()[sel] = rad
        return inside, radius

    def render(self, x: np.ndarray, y: np.ndarray, z: np.ndarray, z_anchor: float, table: bool):
        """Tissue codes and organ labels on world coordinates (x, y, z) in mm.

        Args:
            x, y, z: world (RAS+) coordinates of the voxel centres, each shaped like the grid.
            z_anchor: world z of body coordinate z = 0.
            table: draw the CT table under the patient.

        Returns:
            (tissue uint8, label uint8), each shaped like the grid.
        """
        bx = (x - self.shift[0]).astype(np.float32)
        by = (y - self.shift[1]).astype(np.float32)
        bz = (z - z_anchor - self.z_jitter).astype(np.float32)
        qx = bx + eval_waves(self.elastic[0], bx, by, bz)
        qy = by + eval_waves(self.elastic[1], bx, by, bz)
        qz = bz + eval_waves(self.elastic[2], bx, by, bz)
        shape = qx.shape
        tissue = np.full(shape, AIR, np.uint8)
        label = np.zeros(shape, np.uint8)
        body, cavity = self._paint_body(tissue, label, qx, qy, qz, table)
        self._paint_organs(tissue, label, qx, qy, qz, cavity)
        self._paint_spine_and_vessels(tissue, label, qx, qy, qz)
        tissue[~body & (tissue != TABLE)] = AIR
        return tissue, label

    def _paint_body(self, tissue: np.ndarray, label: np.ndarray, qx: np.ndarray, qy: np.ndarray, qz: np.ndarray,
                    table: bool) -> tuple[np.ndarray, np.ndarray]:
        """Paint the table, fat, abdominal wall, ribs, paraspinal and psoas muscles in place.

        Args:
            tissue: (X, Y, Z) tissue codes, painted in place.
            label: (X, Y, Z) label values, painted in place.
            qx, qy, qz: elastically displaced body coordinates (mm), shaped like the grid.
            table: draw the CT table under the patient.

        Returns:
            (body, cavity): the inside of the skin and of the abdominal cavity, as boolean masks.
        """
        ellipse = _ellipse_test(qx, qy)
        ax, ay = self.ax, self.ay
        if table:
            table_top = -ay - 4.0
            tissue[(qy < table_top) & (qy > table_top - 9.0) & (np.abs(qx) < 230.0)] = TABLE
        body = ellipse(0, 0, ax, ay)
        tissue[body] = FAT
        wall_a, wall_b = ax - self.fat, ay - self.fat
        tissue[ellipse(0, 0, wall_a, wall_b)] = MUSCLE
        cav_a, cav_b = wall_a - self.muscle, wall_b - self.muscle
        cavity = ellipse(0, 0, cav_a, cav_b)
        y_vb = self._vertebral_y()
        paraspinal = ellipse(0, y_vb - 36.0, 50.0, 22.0) & ellipse(0, 0, wall_a, wall_b)
        cavity &= ~paraspinal
        tissue[cavity] = VISCERA
        tissue[paraspinal] = MUSCLE
        label[paraspinal] = 11
        # ribs: bony bands in the inner abdominal wall of the upper abdomen, descending anteriorly
        theta = np.arctan2(qy / wall_b, qx / wall_a)
        ring = ellipse(0, 0, cav_a + 9.0, cav_b + 9.0) & ~ellipse(0, 0, cav_a, cav_b)
        band = np.cos(2 * np.pi * (qz + 30.0 * np.sin(theta)) / 32.0 + self.rib_phase) > 0.55
        tissue[ring & band & (np.abs(np.cos(theta)) > 0.3) & (qz > 15.0)] = CORTICAL
        # psoas muscles, thickening caudally
        r_psoas = 7.0 + np.clip(-qz, 0, None) * 0.15
        psoas = (((np.abs(qx) - 42.0) ** 2 + (qy - y_vb + 4.0) ** 2) < r_psoas**2) & (qz < 40.0)
        tissue[psoas & cavity] = MUSCLE
        label[psoas & cavity] = 10
        return body, cavity

    def _paint_organs(self, tissue: np.ndarray, label: np.ndarray, qx: np.ndarray, qy: np.ndarray, qz: np.ndarray,
                      cavity: np.ndarray) -> None:
        """Paint the solid and hollow organs in place, inside the abdominal cavity only (later organs win)."""
        for o in self.organs:
            inside, rad = self.organ_mask(o, qx, qy, qz)
            inside &= cavity
            label[inside] = o.value
            tissue[inside] = ORGAN_TISSUE[o.value]
            if o.value in (3, 4):
                tissue[inside & (rad < 0.55)] = KIDNEY_MEDULLA
            elif o.value == 5:  # gas rises anteriorly in a supine patient
                gas = inside & (qy - o.centre[1] > 0.45 * o.semi[1]) & (rad < 0.85)
                tissue[gas] = STOMACH_GAS

    def _paint_spine_and_vessels(self, tissue: np.ndarray, label: np.ndarray, qx: np.ndarray, qy: np.ndarray,
                                 qz: np.ndarray) -> None:
        """Paint vertebrae, discs, the spinal canal, aorta and IVC in place (last: they win over organ shapes)."""
        ellipse = _ellipse_test(qx, qy)
        y_vb = self._vertebral_y()
        vb = ellipse(0, y_vb, 22.0, 17.0)
        level = np.mod(qz - self.vertebra_phase, 32.0)
        disc = level < 7.0
        spine = np.zeros(qx.shape, bool)
        cancellous = vb & ~disc & ellipse(0, y_vb, 19.5, 14.5)
        tissue[vb] = CORTICAL
        tissue[cancellous] = CANCELLOUS
        tissue[vb & disc] = DISC
        spine |= vb
        posterior = (ellipse(0, y_vb - 30.0, 13.0, 12.0) | ellipse(0, y_vb - 44.0, 5.0, 14.0)
                     | ellipse(0, y_vb - 24.0, 38.0, 5.0)) & ~disc
        tissue[posterior] = CORTICAL
        canal = ellipse(0, y_vb - 29.0, 8.0, 7.0)
        tissue[canal] = CANAL
        spine |= posterior | canal
        aorta = ellipse(-16.0, y_vb + 29.0, 11.0, 11.0)
        ivc = ellipse(22.0, y_vb + 27.0, 13.0, 9.0) & (qz < 90.0)
        tissue[aorta] = AORTA
        tissue[ivc] = IVC
        label[spine] = 9
        label[aorta] = 7
        label[ivc] = 8

    def _vertebral_y(self) -> float:
        """Body y (mm) of the vertebral body centre."""
        return -self.ay + 60.0


def _ellipse_test(qx: np.ndarray, qy: np.ndarray):
    """``ellipse(cx, cy, ax, ay)``: the mask of the axial ellipse with that centre and semi-axes at (qx, qy)."""

    def ellipse(cx, cy, ax, ay):
        return ((qx - cx) / ax) ** 2 + ((qy - cy) / ay) ** 2 < 1.0

    return ellipse
