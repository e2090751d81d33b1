"""Synthetic phantoms with ground truth: chest CT volumes and projection radiographs.

Everything here is numpy and pydicom only (no torch), because the node's tests and pipelines
generate studies at run time. Every function is a pure function of its seed: the same seed and
arguments give identical pixels, headers and UIDs on any machine, so a test can name a study by
its seed and the training script can reproduce its data set from a list of seeds.

Chest CT
    An analytic chest, rendered slice by slice in millimetres so that 256x256 and 512x512
    grids show the same anatomy: body outline with subcutaneous fat and a muscle wall, two lungs
    (parenchyma about -850 HU with a gravity-dependent gradient and vessels), diaphragm domes
    with liver and stomach below them, heart, aorta, trachea and bronchi, vertebrae with discs,
    ribs, sternum, scapulae, the table, optional solid or part-solid nodules, a point spread
    blur and correlated noise. Truth: the lung mask (the lung fields, vessels and nodules inside
    them included) and the nodule mask, on the same voxel grid.

    Array order is [z, y, x] with index 0 the most *inferior* slice. Written series number
    their instances in that order and place them along +z (ImageOrientationPatient
    1\\0\\0\\0\\1\\0), so sorting by position, by InstanceNumber or taking the arrays as they
    are all agree.

Radiographs
    Projections of 3D phantoms built from ellipsoids (line integrals are exact: each ray's
    chord through each ellipsoid is solved in closed form, and cavities are subtracted chord by
    chord), for five body parts: head, chest, abdomen, pelvis and limb. Each image varies
    patient size, position, in-plane rotation, view, collimation, exposure (quantum noise and
    scatter), the presentation curve and edge enhancement, bit depth, and MONOCHROME1 or 2.
"""

from __future__ import annotations

import datetime as _dt
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import (
    ComputedRadiographyImageStorage,
    CTImageStorage,
    DigitalXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
)

from iods.uids import derived_uid

__all__ = [
    "RADIOGRAPH_LABELS",
    "CTParams",
    "CTTruth",
    "CTVolume",
    "Nodule",
    "Radiograph",
    "ct_chest_params",
    "CT_LABELS",
    "ct_chest_volume",
    "ct_chest_slices",
    "ct_label_map",
    "ct_labels",
    "ct_truth",
    "radiograph",
    "write_ct_series",
    "write_radiograph",
    "study_uid",
]

GENERATOR_VERSION = "modelnode-phantoms 1.0"
MANUFACTURER = "MODELNODE PHANTOMS"
RADIOGRAPH_LABELS = ("head", "chest", "abdomen", "pelvis", "limb")
# Exclusive chest CT labels (ct_labels): value i + 1 is CT_LABELS[i], 0 is background.
CT_LABELS = ("left_lung", "right_lung", "heart")
HU_MIN, HU_MAX = -1024, 3071
# Stored CT values are unsigned 12-bit with this intercept, as many scanners write them.
CT_INTERCEPT = -1024.0

# Synthetic but realistic-looking demographics; names are drawn from these lists by seed.
_FAMILY = ("MILLER", "GARCIA", "NOVAK", "SCHMIDT", "ROSSI", "DUBOIS", "KOWALSKI", "JOHNSON", "SILVA",
           "NIELSEN", "BERG", "MARTIN", "KELLER", "MORENO", "WEBER", "OKAFOR", "TANAKA", "LINDQVIST")
_GIVEN_F = ("ANNA", "MARIA", "SOFIA", "EMMA", "LAURA", "CLARA", "HANNA", "JULIA", "ELENA", "NORA")
_GIVEN_M = ("JONAS", "LUCAS", "DAVID", "PAUL", "MARCO", "TOMAS", "ERIK", "FELIX", "HUGO", "OMAR")
_INSTITUTIONS = ("PHANTOM GENERAL HOSPITAL", "SYNTHETIC UNIVERSITY CLINIC", "MODELNODE TEST CENTRE")


def _uid(*parts: object) -> str:
    """A deterministic 2.25 UID from the parts (so regenerated studies keep their UIDs).

    Name-based (UUID version 5): pydicom's ``generate_uid(prefix=None, ...)`` ignores its
    entropy sources and is random.
    """
    return derived_uid(GENERATOR_VERSION, *(str(p) for p in parts))


def study_uid(kind: str, seed: int) -> str:
    """The StudyInstanceUID a generated study gets (``kind`` is "ct" or "xr")."""
    return _uid(kind, seed, "study")


# =========================================================================== small numerics


def _interp_matrix(n_out: int, n_in: int) -> np.ndarray:
    """Linear interpolation weights [n_out, n_in], pixel centres aligned (half-pixel convention)."""
    x = (np.arange(n_out) + 0.5) * n_in / n_out - 0.5
    x = np.clip(x, 0, n_in - 1)
    i0 = np.floor(x).astype(int)
    i1 = np.minimum(i0 + 1, n_in - 1)
    w1 = x - i0
    m = np.zeros((n_out, n_in), np.float32)
    m[np.arange(n_out), i0] += 1 - w1
    m[np.arange(n_out), i1] += w1
    return m


def _smooth_field(rng: np.random.Generator, shape: tuple[int, int], cells: int) -> np.ndarray:
    """Zero-mean, unit-ish random field that varies over about ``shape / cells`` pixels."""
    coarse = rng.standard_normal((cells + 1, cells + 1)).astype(np.float32)
    return _interp_matrix(shape[0], cells + 1) @ coarse @ _interp_matrix(shape[1], cells + 1).T


def _blur3(img: np.ndarray) -> np.ndarray:
    """Separable [1, 2, 1] / 4 blur with edge replication: a scanner-like point spread."""
    p = np.pad(img, 1, mode="edge")
    v = p[:-2] + 2 * p[1:-1] + p[2:]
    return (v[:, :-2] + 2 * v[:, 1:-1] + v[:, 2:]) / 16.0


def _box_blur(img: np.ndarray, r: int) -> np.ndarray:
    """Mean over a (2r+1)^2 window by cumulative sums (edge replicated)."""
    if r < 1:
        return img.copy()
    p = np.pad(img.astype(np.float64), r, mode="edge")
    c = np.cumsum(np.cumsum(p, axis=0), axis=1)
    c = np.pad(c, ((1, 0), (1, 0)))
    k = 2 * r + 1
    s = c[k:, k:] - c[:-k, k:] - c[k:, :-k] + c[:-k, :-k]
    return (s / (k * k)).astype(np.float32)


def _soft_blur(img: np.ndarray, r: int) -> np.ndarray:
    """Near-Gaussian blur of scale ``r`` (three box passes), without a box's square halos."""
    k = max(1, int(round(r / math.sqrt(3))))
    return _box_blur(_box_blur(_box_blur(img, k), k), k)


def _ellipse(x: np.ndarray, y: np.ndarray, cx: float, cy: float, a: float, b: float,
             p: float = 2.0, angle: float = 0.0) -> np.ndarray:
    """Inside test for a (super)ellipse with semi-axes a, b, rotated by ``angle`` radians.

    ``x`` [1, W] and ``y`` [H, 1] (a grid) are evaluated only inside the bounding box, which
    is what makes rendering hundreds of small structures per slice cheap.
    """
    shape = np.broadcast(x, y).shape
    if a <= 0 or b <= 0:
        return np.zeros(shape, bool)
    if x.ndim == 2 and y.ndim == 2 and x.shape[0] == 1 and y.shape[1] == 1 and x.shape[1] > 1 and y.shape[0] > 1:
        r = max(a, b) * (2 ** 0.5 if p > 2 else 1.0) + 1e-6
        xs, ys = x[0], y[:, 0]
        j0, j1 = _span(xs, cx - r, cx + r)
        i0, i1 = _span(ys, cy - r, cy + r)
        out = np.zeros(shape, bool)
        if j0 < j1 and i0 < i1:
            out[i0:i1, j0:j1] = _ellipse_eval(x[:, j0:j1], y[i0:i1], cx, cy, a, b, p, angle)
        return out
    return _ellipse_eval(x, y, cx, cy, a, b, p, angle)


def _span(coords: np.ndarray, lo: float, hi: float) -> tuple[int, int]:
    """Index range of a monotonic increasing coordinate vector that lies within [lo, hi]."""
    return int(np.searchsorted(coords, lo, "left")), int(np.searchsorted(coords, hi, "right"))


def _ellipse_eval(x: np.ndarray, y: np.ndarray, cx: float, cy: float, a: float, b: float,
                  p: float, angle: float) -> np.ndarray:
    dx, dy = x - cx, y - cy
    if angle:
        c, s = math.cos(angle), math.sin(angle)
        dx, dy = c * dx + s * dy, -s * dx + c * dy
    if p == 2.0:
        return (dx / a) ** 2 + (dy / b) ** 2 <= 1.0
    return np.abs(dx / a) ** p + np.abs(dy / b) ** p <= 1.0


def _dates(rng: np.random.Generator) -> tuple[str, str, str, str, str]:
    """Study date/time, birth date, age and sex drawn from the seed, never from the clock."""
    day = _dt.date(2019, 1, 1) + _dt.timedelta(days=int(rng.integers(0, 6 * 365)))
    t = f"{int(rng.integers(7, 19)):02d}{int(rng.integers(0, 60)):02d}{int(rng.integers(0, 60)):02d}"
    age = int(rng.integers(28, 86))
    birth = day.replace(year=day.year - age) - _dt.timedelta(days=int(rng.integers(1, 360)))
    sex = "F" if rng.random() < 0.5 else "M"
    return day.strftime("%Y%m%d"), t, birth.strftime("%Y%m%d"), f"{age:03d}Y", sex


def _patient(rng: np.random.Generator, sex: str) -> tuple[str, str]:
    given = _GIVEN_F if sex == "F" else _GIVEN_M
    name = f"{_FAMILY[int(rng.integers(len(_FAMILY)))]}^{given[int(rng.integers(len(given)))]}"
    return name, f"PH{int(rng.integers(10**6, 10**7))}"


def _file_meta(sop_class: str, sop_instance: str) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_instance
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = _uid("implementation")
    meta.ImplementationVersionName = "MODELNODE_PH1"
    return meta


def _apply_overrides(ds: Dataset, overrides: Mapping[str, Any] | None) -> None:
    for keyword, value in (overrides or {}).items():
        if value is None:
            if keyword in ds:
                delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)


# =========================================================================== chest CT


@dataclass(frozen=True)
class Nodule:
    """A spherical nodule; ``center`` in voxel coordinates (z, y, x) of the volume."""

    center: tuple[float, float, float]
    radius_mm: float
    hu: float


@dataclass(frozen=True)
class _Vessel:
    lung: int  # 0 right, 1 left
    u: float  # position in the lung's normalised coordinates at t = 0
    v: float
    du: float  # drift per unit t
    dv: float
    t0: float
    t1: float
    radius: float  # mm


@dataclass(frozen=True)
class CTParams:
    """Everything random about one chest CT, drawn from the seed before any pixel is made."""

    seed: int
    shape: tuple[int, int, int]  # (slices, rows, columns)
    spacing: tuple[float, float, float]  # (slice spacing, row spacing, column spacing) mm
    z_first: float  # anatomical z (mm above the lung base) of slice 0 (the most inferior)
    table_z: float  # ImagePositionPatient z of slice 0
    body: tuple[float, float, float, float, float, float]  # cx, cy, A, B, fat, exponent
    muscle: float
    lung_height: float
    lungs: tuple[tuple[float, float, float, float], ...]  # per lung (cx, cy, a, b), right then left
    dome: tuple[float, float]  # dome height (fraction of lung height) right, left
    heart: tuple[float, float, float, float, float]  # cx, cy, a, b, angle
    aorta_r: float
    trachea_r: float
    spine_r: float
    disc_pitch: float
    disc_phase: float
    rib_phase: float
    table_gap: float
    lung_hu: float
    noise_sd: float
    vessels: tuple[_Vessel, ...]
    nodules: tuple[Nodule, ...]
    female: bool

    def z_mm(self, k: float) -> float:
        """Anatomical z (mm above the lung base) of slice index ``k``."""
        return self.z_first + k * self.spacing[0]


class CTVolume(NamedTuple):
    hu: np.ndarray  # int16 [z, y, x] Hounsfield units
    spacing: tuple[float, float, float]  # (z, y, x) mm
    lung_mask: np.ndarray  # bool [z, y, x]
    nodule_mask: np.ndarray  # bool [z, y, x]


class CTTruth(NamedTuple):
    """Truth for a written series: masks in instance order and the instances they belong to."""

    lung: np.ndarray  # bool [z, y, x], z = InstanceNumber - 1
    nodule: np.ndarray
    sop_instance_uids: list[str]
    nodules: tuple[Nodule, ...]

    def by_uid(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """SOPInstanceUID -> (lung slice, nodule slice), for pipelines that reorder slices."""
        return {u: (self.lung[i], self.nodule[i]) for i, u in enumerate(self.sop_instance_uids)}


def ct_chest_params(
    seed: int,
    *,
    shape: tuple[int, int, int] | None = None,
    size: int = 256,
    slices: int | None = None,
    nodules: int | None = None,
) -> CTParams:
    """Draw the anatomy and acquisition of one chest CT.

    ``shape`` (slices, rows, columns) wins over ``size`` (in-plane) and ``slices``; by default
    the in-plane grid is ``size`` x ``size`` and the slice count is drawn from 20..60.
    ``nodules`` fixes the number of nodules (default: none in a third of the studies, else 1..3).
    Slice spacing follows the slice count (about 300 mm of coverage, between 1 and 7.5 mm), so a
    200-slice study has thin slices and a 20-slice one covers part of the chest.
    """
    rng = np.random.default_rng([seed, 0xC7])
    # Always drawn, so fixing the size does not change the rest of the anatomy's random stream.
    n_default = int(rng.integers(20, 61))
    if shape is None:
        shape = (int(slices) if slices is not None else n_default, size, size)
    n_z, rows, cols = (int(v) for v in shape)
    if min(shape) < 1:
        raise ValueError(f"shape must be positive, got {shape}")

    A = float(rng.uniform(135, 172))  # body lateral semi-axis (mm)
    B = float(rng.uniform(95, 122))  # body AP semi-axis
    fat = float(rng.uniform(6, 24))
    expo = float(rng.uniform(2.1, 2.6))
    muscle = float(rng.uniform(9, 15))
    off_x, off_y = (float(v) for v in rng.uniform(-18, 18, 2))
    fov = float(max(rng.uniform(340, 420), 2 * (A + abs(off_x)) + 30, 2 * (B + abs(off_y)) + 80))
    d_xy = fov / max(rows, cols)
    lung_height = float(rng.uniform(190, 255))
    coverage = float(rng.uniform(270, 340))
    dz = float(np.clip(round(coverage / n_z * 2) / 2, 1.0, 7.5))
    if n_z * dz < coverage:
        # Partial coverage: centre it near the lungs with some jitter.
        centre = lung_height * float(rng.uniform(0.3, 0.7))
    else:
        centre = lung_height * 0.5 + float(rng.uniform(-25, 25))
    z_first = centre - (n_z - 1) * dz / 2
    table_z = float(rng.uniform(-420, -120)) + z_first

    cav_a, cav_b = A - fat - muscle, B - fat - muscle
    lungs = []
    for side in (-1, 1):
        scale = 1.0 if side < 0 else 0.93
        a = cav_a * float(rng.uniform(0.40, 0.46)) * scale
        b = cav_b * float(rng.uniform(0.80, 0.88))
        cx = side * (cav_a - a * float(rng.uniform(1.02, 1.10)))
        cy = cav_b * float(rng.uniform(0.02, 0.08))
        lungs.append((cx, cy, a, b))
    dome = (float(rng.uniform(0.20, 0.30)), float(rng.uniform(0.15, 0.24)))
    heart = (cav_a * float(rng.uniform(0.08, 0.16)), -cav_b * float(rng.uniform(0.05, 0.18)),
             cav_a * float(rng.uniform(0.30, 0.36)), cav_b * float(rng.uniform(0.42, 0.52)),
             float(rng.uniform(-0.5, -0.2)))

    vessels = []
    for _ in range(int(rng.integers(36, 60))):
        lung = int(rng.integers(2))
        r = math.sqrt(float(rng.uniform(0, 0.8)))
        th = float(rng.uniform(0, 2 * math.pi))
        t0 = float(rng.uniform(-0.1, 0.7))
        vessels.append(_Vessel(lung, r * math.cos(th), r * math.sin(th), float(rng.uniform(-0.4, 0.4)),
                               float(rng.uniform(-0.4, 0.4)), t0, t0 + float(rng.uniform(0.2, 0.6)),
                               float(rng.uniform(1.0, 3.5)) * (1.4 - r)))
    params = CTParams(
        seed=seed, shape=(n_z, rows, cols), spacing=(dz, d_xy, d_xy), z_first=z_first, table_z=table_z,
        body=(off_x, off_y, A, B, fat, expo), muscle=muscle, lung_height=lung_height,
        lungs=tuple(lungs), dome=dome, heart=heart, aorta_r=float(rng.uniform(11, 15)),
        trachea_r=float(rng.uniform(7.5, 10.5)), spine_r=float(rng.uniform(14, 18.5)),
        disc_pitch=float(rng.uniform(24, 29)), disc_phase=float(rng.uniform(0, 1)),
        rib_phase=float(rng.uniform(0, 1)), table_gap=float(rng.uniform(12, 35)),
        lung_hu=float(rng.uniform(-880, -820)), noise_sd=float(rng.uniform(9, 24)),
        vessels=tuple(vessels), nodules=(), female=bool(rng.random() < 0.5),
    )
    n_nod = nodules if nodules is not None else (0 if rng.random() < 0.33 else int(rng.integers(1, 4)))
    return replace(params, nodules=_place_nodules(params, rng, int(n_nod)))


def _lung_profile(t: np.ndarray | float) -> np.ndarray:
    """Lung cross-section scale from the base (t = 0) to the apex (t = 1)."""
    t = np.clip(np.asarray(t, float), 0.0, 1.0)
    return np.sqrt(np.clip(1.0 - t ** 1.8, 0.0, 1.0)) * (0.55 + 0.45 * np.clip(t / 0.12, 0, 1) ** 0.5)


def _lung_geometry(p: CTParams, z: float) -> list[tuple[float, float, float, float]]:
    """Per lung (cx, cy, a, b) of its outline at anatomical height ``z`` (mm), body frame."""
    t = z / p.lung_height
    s = float(_lung_profile(t)) if 0.0 <= t < 1.0 else 0.0
    out = []
    for cx, cy, a, b in p.lungs:
        # Towards the apex the lungs move medially and posteriorly.
        out.append((cx * (1 - 0.25 * max(t, 0)), cy + 0.12 * b * max(t, 0), a * s, b * s))
    return out


def _lung_inside(p: CTParams, x: np.ndarray, y: np.ndarray, z: float) -> np.ndarray:
    """Lung membership (body-frame mm) at one height; the single source of the lung truth."""
    right, left = _lung_sides(p, x, y, z)
    return right | left


def _lung_sides(p: CTParams, x: np.ndarray, y: np.ndarray, z: float) -> tuple[np.ndarray, np.ndarray]:
    """(right lung, left lung) at one height: :func:`_lung_inside` split by the lung a voxel is in.

    Each lung is its own outline, so the split follows the anatomy even where a lung reaches
    across the body's midline. Where the two outlines overlap (they do not for the drawn
    parameters; kept exact all the same), the voxel goes to the lung whose outline it lies
    deeper inside.
    """
    t = z / p.lung_height
    shape = np.broadcast(x, y).shape
    if not 0.0 <= t < 1.0:
        return np.zeros(shape, bool), np.zeros(shape, bool)
    _, _, A, B, fat, expo = p.body
    cav_a, cav_b = A - fat - p.muscle, B - fat - p.muscle
    cavity = _ellipse(x, y, 0, 0, cav_a - 3, cav_b - 3, expo)
    # Mediastinal structures, each with a margin of pleura and fat.
    solid = np.zeros(shape, bool)
    for mask in _solid_structures(p, x, y, z, margin=3.0).values():
        solid |= mask
    sides = []
    geometry = _lung_geometry(p, z)
    for i, (cx, cy, a, b) in enumerate(geometry):
        lung = _ellipse(x, y, cx, cy, a, b, 2.3) & cavity
        d = p.dome[i]
        if t < d:
            r = math.sqrt(max(0.0, 1 - (t / d) ** 2))
            lung &= ~_ellipse(x, y, cx * 0.92, cy - 0.22 * b, p.lungs[i][2] * 1.05 * r, p.lungs[i][3] * 0.95 * r)
        sides.append(lung & ~solid)
    right, left = sides
    both = right & left
    if both.any():
        xx, yy = np.broadcast_arrays(x, y)
        depth = [np.abs((xx[both] - cx) / a) ** 2.3 + np.abs((yy[both] - cy) / b) ** 2.3 for cx, cy, a, b in geometry]
        to_left = depth[1] < depth[0]
        right[both] = ~to_left
        left[both] = to_left
    return right, left


def _spine_y(p: CTParams) -> float:
    _, _, A, B, fat, _ = p.body
    return (B - fat - p.muscle) * 0.72


def _solid_structures(p: CTParams, x: np.ndarray, y: np.ndarray, z: float, margin: float = 0.0) -> dict[str, np.ndarray]:
    """Masks of what the lungs wrap around at one height (optionally dilated by ``margin`` mm):
    heart, spine with the paraspinal muscles, aorta (descending, ascending, arch), airways."""
    t = z / p.lung_height
    _, _, A, B, fat, expo = p.body
    cav_b = B - fat - p.muscle
    out: dict[str, np.ndarray] = {}
    hx, hy, ha, hb, hang = p.heart
    if -0.3 < t < 0.6:
        hs = math.sqrt(max(0.0, 1 - ((t - 0.22) / 0.40) ** 2))
        out["heart"] = _ellipse(x, y, hx, hy, ha * hs + margin, hb * hs + margin, 2.0, hang)
    sy = _spine_y(p)
    out["spine"] = _ellipse(x, y, 0, sy, p.spine_r + 4 + margin, p.spine_r + 2 + margin)
    out["paraspinal"] = _ellipse(x, y, 0, sy + p.spine_r + 16, 48 + margin, 22 + margin)
    # Descending aorta left of the spine; ascending aorta and arch higher up.
    out["aorta"] = _ellipse(x, y, p.spine_r * 1.25, sy - p.spine_r * 1.3, p.aorta_r + margin, p.aorta_r + margin)
    if 0.45 < t < 0.80:
        out["ascending"] = _ellipse(x, y, -p.aorta_r * 0.6, -cav_b * 0.25, p.aorta_r * 1.1 + margin,
                                    p.aorta_r * 1.1 + margin)
    if 0.74 < t < 0.84:
        out["arch"] = _ellipse(x, y, p.spine_r * 0.4, sy - p.spine_r * 2.6, p.aorta_r * 1.3 + margin,
                               p.aorta_r * 2.6 + margin)
    airway = np.zeros(np.broadcast(x, y).shape, bool)
    for cx, cy, r in _airways(p, z):
        airway |= _ellipse(x, y, cx, cy, r + 2 + margin, r + 2 + margin)
    out["airway"] = airway
    return out


def _airways(p: CTParams, z: float) -> list[tuple[float, float, float]]:
    """Trachea above the carina, then the two main bronchi diverging: (cx, cy, radius) mm."""
    t = z / p.lung_height
    tr_y = _spine_y(p) - p.spine_r - p.trachea_r - 8
    if t >= 0.62:
        return [(0.0, tr_y, p.trachea_r)]
    if t > 0.48:
        spread = (0.62 - t) / 0.14 * 28
        return [(side * spread, tr_y + 4, p.trachea_r * 0.75) for side in (-1, 1)]
    return []


def _place_nodules(p: CTParams, rng: np.random.Generator, count: int) -> tuple[Nodule, ...]:
    """Nodules wholly inside a lung (checked on 26 surface points and the centre)."""
    n_z, rows, cols = p.shape
    dz, dy, dx = p.spacing
    dirs = np.array([(i, j, k) for i in (-1, 0, 1) for j in (-1, 0, 1) for k in (-1, 0, 1) if (i, j, k) != (0, 0, 0)],
                    float)
    dirs = np.vstack([np.zeros(3), dirs / np.linalg.norm(dirs, axis=1, keepdims=True)])
    placed: list[Nodule] = []
    tries = 0
    while len(placed) < count and tries < 400:
        tries += 1
        radius = float(rng.uniform(3.0, 10.0))
        hu = float(rng.uniform(-60, 60)) if rng.random() < 0.8 else float(rng.uniform(-520, -380))
        lung = int(rng.integers(2))
        cx, cy, a, b = p.lungs[lung]
        th = float(rng.uniform(0, 2 * math.pi))
        rr = math.sqrt(float(rng.uniform(0, 0.85)))
        z_lo = max(p.z_first, 0.0) + radius
        z_hi = min(p.z_mm(n_z - 1), 0.95 * p.lung_height) - radius
        if z_hi <= z_lo:
            continue
        zc = float(rng.uniform(z_lo, z_hi))
        geo = _lung_geometry(p, zc)[lung]
        xc = geo[0] + rr * geo[2] * math.cos(th)
        yc = geo[1] + rr * geo[3] * math.sin(th)
        pts = np.array([xc, yc, zc]) + dirs * (radius + 2.5)
        ok = all(bool(_lung_inside(p, np.array(px), np.array(py), pz)) for px, py, pz in pts)
        if not ok or any(math.dist((xc, yc, zc), _nodule_mm(p, q)) < radius + q.radius_mm + 5 for q in placed):
            continue
        k = (zc - p.z_first) / dz
        row = (yc + p.body[1]) / dy + (rows - 1) / 2
        col = (xc + p.body[0]) / dx + (cols - 1) / 2
        placed.append(Nodule(center=(k, row, col), radius_mm=radius, hu=hu))
    return tuple(placed)


def _nodule_mm(p: CTParams, n: Nodule) -> tuple[float, float, float]:
    """Nodule centre in the body frame (x, y, z mm)."""
    _, rows, cols = p.shape
    dz, dy, dx = p.spacing
    return ((n.center[2] - (cols - 1) / 2) * dx - p.body[0], (n.center[1] - (rows - 1) / 2) * dy - p.body[1],
            p.z_mm(n.center[0]))


def _grid(p: CTParams) -> tuple[np.ndarray, np.ndarray]:
    _, rows, cols = p.shape
    _, dy, dx = p.spacing
    x = ((np.arange(cols) - (cols - 1) / 2) * dx - p.body[0]).astype(np.float32)[None, :]
    y = ((np.arange(rows) - (rows - 1) / 2) * dy - p.body[1]).astype(np.float32)[:, None]
    return x, y


def _render_slice(p: CTParams, k: int, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One axial slice: (HU float32 before quantisation, lung mask, nodule mask)."""
    rng = np.random.default_rng([p.seed, 0x51, k])
    _, rows, cols = p.shape
    z = p.z_mm(k)
    t = z / p.lung_height
    _, _, A, B, fat, expo = p.body
    # Above the apex the trunk narrows towards the neck.
    neck = float(np.clip((t - 1.05) / 0.25, 0, 1))
    A_z, B_z = A * (1 - 0.45 * neck), B * (1 - 0.2 * neck)
    cav_a, cav_b = A_z - fat - p.muscle, B_z - fat - p.muscle
    img = np.full((rows, cols), -1000.0, np.float32)

    # Table: a curved carbon shell with a mattress on top.
    ty = B_z + p.table_gap
    curve = y - (ty + 0.0009 * x ** 2)
    in_table = np.abs(x) < 230
    shell = (curve >= 0) & (curve < 7) & in_table
    mattress = (curve >= -6) & (curve < 0) & in_table
    img[shell] = 250.0
    img[mattress] = -250.0
    table = shell | mattress

    body = _ellipse(x, y, 0, 0, A_z, B_z, expo)
    if p.female and 0.05 < t < 0.75:
        for side in (-1, 1):
            body |= _ellipse(x, y, side * A_z * 0.45, -B_z * 0.75, A_z * 0.33, B_z * 0.45)
    img[body] = -95.0
    inner = _ellipse(x, y, 0, 0, A_z - fat, B_z - fat, expo)
    img[inner] = 48.0
    cavity = _ellipse(x, y, 0, 0, cav_a, cav_b, expo)
    img[cavity] = 36.0
    # Mediastinal fat in front of the heart and great vessels.
    img[cavity & _ellipse(x, y, 0, -cav_b * 0.35, cav_a * 0.22, cav_b * 0.4)] = -85.0

    # Below the domes: liver on the right, stomach (with gas) on the left.
    for i, (cx, cy, a, b) in enumerate(p.lungs):
        d = p.dome[i]
        if t < d:
            r = math.sqrt(max(0.0, 1 - (t / d) ** 2)) if t > 0 else 1.0
            organ = cavity & _ellipse(x, y, cx * 0.92, cy - 0.22 * b, a * 1.05 * r + 10 * (t <= 0),
                                      b * 0.95 * r + 10 * (t <= 0))
            img[organ] = 58.0 if i == 0 else 40.0
            if i == 1 and t < d * 0.8:
                img[organ & _ellipse(x, y, cx * 0.8, cy - 0.55 * b * r, a * 0.45 * r, b * 0.25 * r)] = -1000.0

    solid = _solid_structures(p, x, y, z)
    img[solid["paraspinal"] & inner] = 52.0
    for name in ("heart", "aorta", "ascending", "arch", "airway"):
        if name in solid:
            img[solid[name] & cavity] = 42.0 if name == "heart" else 45.0
    for cx, cy, r in _airways(p, z):
        img[_ellipse(x, y, cx, cy, r, r)] = -1000.0

    # Vertebra: cortical shell, cancellous core, discs, canal, posterior elements.
    spine_y = _spine_y(p)
    disc = ((z / p.disc_pitch + p.disc_phase) % 1.0) < 0.18
    vb = _ellipse(x, y, 0, spine_y, p.spine_r + 3, p.spine_r)
    img[vb] = 90.0 if disc else 780.0
    if not disc:
        img[_ellipse(x, y, 0, spine_y, p.spine_r + 0.5, p.spine_r - 2.5)] = 240.0
    canal_y = spine_y + p.spine_r + 7
    img[_ellipse(x, y, 0, canal_y + 6, 7, 13) & inner] = 520.0
    img[_ellipse(x, y, 0, canal_y, 8, 7)] = 12.0
    img[_ellipse(x, y, 0, canal_y + 17, 4, 10) & inner] = 560.0

    # Sternum and ribs around the cavity wall (positions drift with z, as oblique ribs do).
    if 0.1 < t < 0.85:
        img[_ellipse(x, y, 0, -cav_b - p.muscle * 0.4, 13, 6)] = 420.0
    if -0.3 < t < 1.05:
        phase = (z / 22.0 + p.rib_phase) % 1.0
        for side in (-1, 1):
            for j in range(5):
                ang = math.radians(35 + j * 28 + phase * 24)
                rx = side * (cav_a + p.muscle * 0.35) * math.sin(ang)
                ry = -(cav_b + p.muscle * 0.35) * math.cos(ang)
                tang = math.atan2(ry / (cav_b ** 2), rx / (cav_a ** 2)) + math.pi / 2
                img[_ellipse(x, y, rx, ry, 9, 5, 2.0, tang)] = 720.0
                img[_ellipse(x, y, rx, ry, 6, 2.5, 2.0, tang)] = 260.0
    if 0.55 < t < 1.1:
        for side in (-1, 1):
            img[_ellipse(x, y, side * cav_a * 0.62, B_z * 0.72, 42, 4.5, 2.0, -side * 0.45)] = 480.0

    # Lungs: parenchyma with a posterior (dependent) gradient and low-frequency texture.
    lung = _lung_inside(p, x, y, z)
    if lung.any():
        texture = _smooth_field(rng, (rows, cols), 12) * 18.0
        grad = 45.0 * np.clip(y / cav_b, -1, 1)
        lung_vals = p.lung_hu + grad + texture
        img[lung] = lung_vals[lung]
        ves = np.zeros_like(lung)
        geo = _lung_geometry(p, z)
        for v in p.vessels:
            if not v.t0 <= t <= v.t1:
                continue
            cx, cy, a, b = geo[v.lung]
            u, w = v.u + v.du * (t - v.t0), v.v + v.dv * (t - v.t0)
            ves |= _ellipse(x, y, cx + u * a, cy + w * b, v.radius, v.radius)
        ves &= lung
        img[ves] = 40.0 + 15.0 * texture[ves] / 18.0

    nod = np.zeros((rows, cols), bool)
    dz_, dy, dx = p.spacing
    for n in p.nodules:
        dzm = (k - n.center[0]) * dz_
        if abs(dzm) >= n.radius_mm:
            continue
        r = math.sqrt(n.radius_mm ** 2 - dzm ** 2)
        m = _ellipse(np.arange(cols)[None, :] * dx, np.arange(rows)[:, None] * dy, n.center[2] * dx,
                     n.center[1] * dy, r, r)
        nod |= m
        img[m] = n.hu

    # Nothing but the table lies outside the body outline.
    img[~body & ~table] = -1000.0
    img = _blur3(img)
    noise = rng.standard_normal((rows, cols)).astype(np.float32)
    noise = _blur3(noise) * 2.2  # correlated like reconstructed CT noise, sd about 1
    img += noise * p.noise_sd
    # Pixels outside the reconstruction circle are padding.
    r_fov = min(rows, cols) * dx / 2
    xx = x + p.body[0]
    yy = y + p.body[1]
    img[xx ** 2 + yy ** 2 > r_fov ** 2] = HU_MIN
    return img, lung, nod


def ct_chest_slices(p: CTParams, indices: Iterable[int] | None = None) -> Iterable[tuple[int, np.ndarray, np.ndarray, np.ndarray]]:
    """Yield (index, HU int16 [y, x], lung mask, nodule mask) slice by slice (low memory)."""
    x, y = _grid(p)
    for k in range(p.shape[0]) if indices is None else indices:
        img, lung, nod = _render_slice(p, int(k), x, y)
        yield int(k), np.clip(np.rint(img), HU_MIN, HU_MAX).astype(np.int16), lung, nod


def ct_chest_volume(
    seed: int,
    *,
    shape: tuple[int, int, int] | None = None,
    size: int = 256,
    slices: int | None = None,
    nodules: int | None = None,
) -> CTVolume:
    """A chest CT as (HU int16 [z, y, x], spacing (z, y, x) mm, lung mask, nodule mask).

    Slice 0 is the most inferior. See :func:`ct_chest_params` for the arguments.
    """
    p = ct_chest_params(seed, shape=shape, size=size, slices=slices, nodules=nodules)
    hu = np.empty(p.shape, np.int16)
    lung = np.empty(p.shape, bool)
    nod = np.empty(p.shape, bool)
    for k, img, lm, nm in ct_chest_slices(p):
        hu[k], lung[k], nod[k] = img, lm, nm
    return CTVolume(hu, p.spacing, lung, nod)


def _heart_visible(p: CTParams, x: np.ndarray, y: np.ndarray, z: float) -> np.ndarray:
    """The heart as :func:`_render_slice` leaves it: its outline within the cavity, less what is
    painted over it later (great vessels and airways, which are as dense as the heart and told
    apart only by shape, and the bones). Lungs, their vessels and nodules keep 3 mm off it."""
    t = z / p.lung_height
    shape = np.broadcast(x, y).shape
    if not -0.3 < t < 0.6:
        return np.zeros(shape, bool)
    _, _, A, B, fat, expo = p.body
    neck = float(np.clip((t - 1.05) / 0.25, 0, 1))
    A_z, B_z = A * (1 - 0.45 * neck), B * (1 - 0.2 * neck)
    cav_a, cav_b = A_z - fat - p.muscle, B_z - fat - p.muscle
    inner = _ellipse(x, y, 0, 0, A_z - fat, B_z - fat, expo)
    solid = _solid_structures(p, x, y, z)
    heart = solid["heart"] & _ellipse(x, y, 0, 0, cav_a, cav_b, expo)
    for name in ("aorta", "ascending", "arch", "airway"):
        if name in solid:
            heart &= ~solid[name]
    # Bones, in the order and with the outlines _render_slice paints them.
    spine_y = _spine_y(p)
    canal_y = spine_y + p.spine_r + 7
    heart &= ~_ellipse(x, y, 0, spine_y, p.spine_r + 3, p.spine_r)
    heart &= ~(_ellipse(x, y, 0, canal_y + 6, 7, 13) & inner)
    heart &= ~_ellipse(x, y, 0, canal_y, 8, 7)
    heart &= ~(_ellipse(x, y, 0, canal_y + 17, 4, 10) & inner)
    if 0.1 < t < 0.85:
        heart &= ~_ellipse(x, y, 0, -cav_b - p.muscle * 0.4, 13, 6)
    phase = (z / 22.0 + p.rib_phase) % 1.0
    for side in (-1, 1):
        for j in range(5):
            ang = math.radians(35 + j * 28 + phase * 24)
            rx = side * (cav_a + p.muscle * 0.35) * math.sin(ang)
            ry = -(cav_b + p.muscle * 0.35) * math.cos(ang)
            tang = math.atan2(ry / (cav_b ** 2), rx / (cav_a ** 2)) + math.pi / 2
            heart &= ~_ellipse(x, y, rx, ry, 9, 5, 2.0, tang)
    if 0.55 < t:
        for side in (-1, 1):
            heart &= ~_ellipse(x, y, side * cav_a * 0.62, B_z * 0.72, 42, 4.5, 2.0, -side * 0.45)
    return heart


def ct_label_map(p: CTParams) -> np.ndarray:
    """Exclusive labels uint8 [z, y, x] of the chest CT drawn as ``p``: 0 background, then
    :data:`CT_LABELS` from 1 (left lung, right lung, heart).

    The lungs are the lung truth of :func:`ct_chest_volume` (vessels and nodules inside them
    included), split by the lung each voxel belongs to. Left is the patient's left: +x of the
    array, +column, in the LPS frame the series is written in.
    """
    labels = np.zeros(p.shape, np.uint8)
    x, y = _grid(p)
    for k in range(p.shape[0]):
        z = p.z_mm(k)
        right, left = _lung_sides(p, x, y, z)
        heart = _heart_visible(p, x, y, z)
        labels[k][left] = 1
        labels[k][right] = 2
        labels[k][heart] = 3
    return labels


def ct_labels(
    seed: int,
    *,
    shape: tuple[int, int, int] | None = None,
    size: int = 256,
    slices: int | None = None,
    nodules: int | None = None,
) -> np.ndarray:
    """:func:`ct_label_map` of the chest CT that :func:`ct_chest_volume` and
    :func:`write_ct_series` make for the same arguments (z = InstanceNumber - 1)."""
    return ct_label_map(ct_chest_params(seed, shape=shape, size=size, slices=slices, nodules=nodules))


def _ct_header(p: CTParams) -> dict[str, Any]:
    rng = np.random.default_rng([p.seed, 0xDC])
    date, time, birth, age, sex = _dates(rng)
    if p.female != (sex == "F"):
        sex = "F" if p.female else "M"
    name, pid = _patient(rng, sex)
    kernel = ["B31f", "Br40", "STANDARD", "FC08", "B70f", "LUNG"][int(rng.integers(6))]
    thick = p.spacing[0]
    return {
        "PatientName": name, "PatientID": pid, "PatientBirthDate": birth, "PatientSex": sex, "PatientAge": age,
        "PatientWeight": f"{rng.uniform(50, 110):.0f}", "StudyDate": date, "StudyTime": time,
        "AccessionNumber": f"A{int(rng.integers(10**7, 10**8))}", "StudyID": f"{int(rng.integers(1000, 99999))}",
        "ReferringPhysicianName": f"{_FAMILY[int(rng.integers(len(_FAMILY)))]}^{_GIVEN_M[int(rng.integers(10))]}",
        "InstitutionName": _INSTITUTIONS[int(rng.integers(len(_INSTITUTIONS)))],
        "SeriesDescription": f"THORAX {thick:.1f} {kernel}", "ConvolutionKernel": kernel,
        "KVP": str(int(rng.choice([100, 110, 120, 130]))), "XRayTubeCurrent": int(rng.integers(60, 320)),
        "ExposureTime": int(rng.integers(500, 1000)), "SeriesNumber": int(rng.integers(2, 6)),
    }


def ct_truth(
    seed: int,
    *,
    shape: tuple[int, int, int] | None = None,
    size: int = 256,
    slices: int | None = None,
    nodules: int | None = None,
) -> CTTruth:
    """The truth masks of the series :func:`write_ct_series` writes for the same arguments."""
    p = ct_chest_params(seed, shape=shape, size=size, slices=slices, nodules=nodules)
    lung = np.empty(p.shape, bool)
    nod = np.empty(p.shape, bool)
    x, y = _grid(p)
    for k in range(p.shape[0]):
        _, lung[k], nod[k] = _render_slice(p, k, x, y)
    return CTTruth(lung, nod, [_uid("ct", seed, p.shape, "instance", k) for k in range(p.shape[0])], p.nodules)


def write_ct_series(
    out_dir: str | Path,
    seed: int,
    *,
    shape: tuple[int, int, int] | None = None,
    size: int = 256,
    slices: int | None = None,
    nodules: int | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> list[Path]:
    """Write one chest CT series (CT Image Storage, one file per slice) and return the paths.

    Files are named ``CT{instance:04d}.dcm`` in instance order (slice 0 = most inferior).
    ``overrides`` sets or (with None) deletes attributes by keyword on every slice, e.g.
    ``{"PatientID": "X", "StudyInstanceUID": uid}`` to put several series in one study.
    Truth for the written slices: :func:`ct_truth` with the same arguments.
    """
    p = ct_chest_params(seed, shape=shape, size=size, slices=slices, nodules=nodules)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    h = _ct_header(p)
    n_z, rows, cols = p.shape
    dz, dy, dx = p.spacing
    study = study_uid("ct", seed)
    series = _uid("ct", seed, p.shape, "series")
    frame = _uid("ct", seed, "frame-of-reference")
    x0 = -(cols - 1) / 2 * dx
    y0 = -(rows - 1) / 2 * dy
    paths = []
    for k, hu, _, _ in ct_chest_slices(p):
        sop = _uid("ct", seed, p.shape, "instance", k)
        ds = Dataset()
        ds.file_meta = _file_meta(CTImageStorage, sop)
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.InstanceCreationDate = h["StudyDate"]
        ds.InstanceCreationTime = h["StudyTime"]
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = sop
        ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = h["StudyDate"]
        ds.StudyTime = ds.SeriesTime = ds.AcquisitionTime = ds.ContentTime = h["StudyTime"]
        ds.AccessionNumber = h["AccessionNumber"]
        ds.Modality = "CT"
        ds.Manufacturer = MANUFACTURER
        ds.InstitutionName = h["InstitutionName"]
        ds.ReferringPhysicianName = h["ReferringPhysicianName"]
        ds.StationName = "PHANTOMCT1"
        ds.StudyDescription = "CT THORAX"
        ds.SeriesDescription = h["SeriesDescription"]
        ds.ManufacturerModelName = "Synthetic Chest CT"
        ds.PatientName = h["PatientName"]
        ds.PatientID = h["PatientID"]
        ds.PatientBirthDate = h["PatientBirthDate"]
        ds.PatientSex = h["PatientSex"]
        ds.PatientAge = h["PatientAge"]
        ds.PatientWeight = h["PatientWeight"]
        ds.BodyPartExamined = "CHEST"
        ds.ScanOptions = "HELICAL MODE"
        ds.SliceThickness = f"{dz:.2f}"
        ds.SpacingBetweenSlices = f"{dz:.2f}"
        ds.KVP = h["KVP"]
        ds.DataCollectionDiameter = "500"
        ds.DeviceSerialNumber = f"{seed % 100000:05d}"
        ds.SoftwareVersions = GENERATOR_VERSION
        ds.ReconstructionDiameter = f"{cols * dx:.1f}"
        ds.GantryDetectorTilt = "0"
        ds.TableHeight = f"{150 + p.table_gap:.1f}"
        ds.RotationDirection = "CW"
        ds.ExposureTime = str(h["ExposureTime"])
        ds.XRayTubeCurrent = str(h["XRayTubeCurrent"])
        ds.ConvolutionKernel = h["ConvolutionKernel"]
        ds.PatientPosition = "HFS"
        ds.StudyInstanceUID = study
        ds.SeriesInstanceUID = series
        ds.StudyID = h["StudyID"]
        ds.SeriesNumber = h["SeriesNumber"]
        ds.AcquisitionNumber = 1
        ds.InstanceNumber = k + 1
        z = p.table_z + k * dz
        ds.ImagePositionPatient = [f"{x0:.4f}", f"{y0:.4f}", f"{z:.4f}"]
        ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
        ds.FrameOfReferenceUID = frame
        ds.PositionReferenceIndicator = ""
        ds.SliceLocation = f"{z:.4f}"
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = rows
        ds.Columns = cols
        ds.PixelSpacing = [f"{dy:.6f}", f"{dx:.6f}"]
        ds.BitsAllocated = 16
        ds.BitsStored = 12
        ds.HighBit = 11
        ds.PixelRepresentation = 0
        ds.WindowCenter = ["-600", "40"]
        ds.WindowWidth = ["1500", "400"]
        ds.WindowCenterWidthExplanation = ["LUNG", "MEDIASTINUM"]
        ds.RescaleIntercept = f"{CT_INTERCEPT:.0f}"
        ds.RescaleSlope = "1"
        ds.RescaleType = "HU"
        stored = (hu.astype(np.int32) - int(CT_INTERCEPT)).astype(np.uint16)
        ds.PixelData = stored.tobytes()
        _apply_overrides(ds, overrides)
        path = out / f"CT{k + 1:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


# =========================================================================== radiographs


MU_SOFT = 0.021  # linear attenuation per mm at a typical effective energy
D_BONE = 0.030  # cortical bone minus soft tissue
D_SPONGY = 0.012
D_LUNG = -0.015
D_AIR = -MU_SOFT


@dataclass(frozen=True)
class _Ell:
    """An ellipsoid adding ``mu`` per mm of path, minus the parts inside ``minus``."""

    center: tuple[float, float, float]  # x lateral (+ image right), y vertical (+ down), z depth
    axes: tuple[float, float, float]
    mu: float
    rot: tuple[float, float, float] = (0.0, 0.0, 0.0)  # roll (about the beam), yaw (about y), pitch (about x)
    minus: tuple[_Ell, ...] = ()


def _rotation(roll: float, yaw: float, pitch: float) -> np.ndarray:
    cr, sr = math.cos(roll), math.sin(roll)
    cy, sy = math.cos(yaw), math.sin(yaw)
    cp, sp = math.cos(pitch), math.sin(pitch)
    rz = np.array([[cr, -sr, 0], [sr, cr, 0], [0, 0, 1]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rx = np.array([[1, 0, 0], [0, cp, -sp], [0, sp, cp]])
    return rz @ ry @ rx


def _quadric(e: _Ell, g: np.ndarray, shift: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(centre, M, R diag(a^2) R^T) of an ellipsoid after the global transform x -> g x + shift."""
    r = g @ _rotation(*e.rot)
    a2 = np.square(np.asarray(e.axes, float))
    cov = r @ np.diag(a2) @ r.T
    # Inverse of the covariance-like form, not r diag(1/a^2) r^T: g may scale and mirror.
    m = np.linalg.inv(cov)
    return g @ np.asarray(e.center, float) + shift, m, cov


def _interval(c: np.ndarray, m: np.ndarray, u: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Entry and exit depth of rays (u, v, t) through an ellipsoid; NaN where they miss."""
    qx = u - c[0]
    qy = v - c[1]
    qz = -c[2]
    alpha = m[2, 2]
    beta = m[2, 0] * qx + m[2, 1] * qy + m[2, 2] * qz
    gamma = m[0, 0] * qx * qx + 2 * m[0, 1] * qx * qy + m[1, 1] * qy * qy + 2 * (m[0, 2] * qx + m[1, 2] * qy) * qz \
        + m[2, 2] * qz * qz - 1.0
    disc = beta * beta - alpha * gamma
    with np.errstate(invalid="ignore"):
        root = np.sqrt(np.where(disc > 0, disc, np.nan))
    return (-beta - root) / alpha, (-beta + root) / alpha


def _project(parts: Sequence[_Ell], g: np.ndarray, shift: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Line integrals of attenuation along the beam (depth axis) for a detector grid."""
    out = np.zeros((v.size, u.size), np.float64)
    du = u[1] - u[0]
    dv = v[1] - v[0]
    for e in parts:
        c, m, cov = _quadric(e, g, shift)
        hu, hv = math.sqrt(cov[0, 0]), math.sqrt(cov[1, 1])
        j0 = max(0, int(math.floor((c[0] - hu - u[0]) / du)))
        j1 = min(u.size, int(math.ceil((c[0] + hu - u[0]) / du)) + 1)
        i0 = max(0, int(math.floor((c[1] - hv - v[0]) / dv)))
        i1 = min(v.size, int(math.ceil((c[1] + hv - v[0]) / dv)) + 1)
        if j0 >= j1 or i0 >= i1:
            continue
        uu = u[None, j0:j1]
        vv = v[i0:i1, None]
        t0, t1 = _interval(c, m, uu, vv)
        length = np.nan_to_num(t1 - t0)
        for sub in e.minus:
            sc, sm, _ = _quadric(sub, g, shift)
            s0, s1 = _interval(sc, sm, uu, vv)
            overlap = np.minimum(t1, s1) - np.maximum(t0, s0)
            length -= np.nan_to_num(np.clip(overlap, 0, None))
        out[i0:i1, j0:j1] += e.mu * np.clip(length, 0, None)
    return out


def _seg(p0: tuple[float, float, float], p1: tuple[float, float, float], thick: float, depth: float, mu: float,
         minus: tuple[_Ell, ...] = ()) -> _Ell:
    """An elongated ellipsoid from p0 to p1 (a rib or a bone shaft segment)."""
    dx, dy = p1[0] - p0[0], p1[1] - p0[1]
    half = math.hypot(dx, dy) / 2 + thick * 0.3
    centre = ((p0[0] + p1[0]) / 2, (p0[1] + p1[1]) / 2, (p0[2] + p1[2]) / 2)
    return _Ell(centre, (half, thick / 2, depth / 2), mu, (math.atan2(dy, dx), 0.0, 0.0), minus)


def _arc(points: Sequence[tuple[float, float, float]], thick: float, depth: float, mu: float) -> list[_Ell]:
    return [_seg(a, b, thick, depth, mu) for a, b in zip(points[:-1], points[1:], strict=True)]


def _bezier(p0: Sequence[float], p1: Sequence[float], p2: Sequence[float], n: int = 4) -> list[tuple[float, float, float]]:
    out = []
    for i in range(n + 1):
        s = i / n
        out.append(tuple(float((1 - s) ** 2 * a + 2 * (1 - s) * s * b + s * s * c) for a, b, c in zip(p0, p1, p2, strict=True)))
    return out  # type: ignore[return-value]


def _mirror(e: _Ell) -> _Ell:
    c = e.center
    return _Ell((-c[0], c[1], c[2]), e.axes, e.mu, (-e.rot[0], -e.rot[1], e.rot[2]), tuple(_mirror(m) for m in e.minus))


def _both(parts: Sequence[_Ell]) -> list[_Ell]:
    """Left and right copies of structures given for the patient's right (image left, x < 0)."""
    return [*parts, *(_mirror(e) for e in parts)]


@dataclass(frozen=True)
class _Scene:
    parts: list[_Ell]
    detector: tuple[float, float]  # width, height mm
    centre: tuple[float, float]  # detector centre in phantom coordinates
    views: tuple[str, ...]  # possible ViewPosition values, first = frontal
    lateral_ok: bool
    body_parts: tuple[str, ...]  # BodyPartExamined terms this phantom may be written with


def _head(rng: np.random.Generator) -> _Scene:
    s = float(rng.uniform(0.9, 1.1))
    S = lambda *v: tuple(float(x) * s for x in v)  # noqa: E731
    parts = [
        _Ell((0, 0, 0), S(76, 96, 92), MU_SOFT),
        _Ell((0, 0, 0), S(72, 92, 88), D_BONE, minus=(_Ell((0, 0, 0), S(66, 85, 82), D_BONE),)),
        _Ell(S(0, 55, 45), S(42, 30, 34), D_SPONGY),
        _Ell(S(0, 45, 60), S(8, 20, 25), D_AIR),
        _Ell(S(0, -22, 74), S(12, 8, 8), D_AIR * 0.8),
        _Ell(S(0, 80, 55), S(32, 6, 12), D_BONE * 1.3),
        _Ell(S(0, 93, 54), S(29, 5, 11), D_BONE * 1.3),
        _Ell(S(0, 110, 60), S(20, 10, 8), D_BONE * 0.7),
        _Ell(S(0, 150, -5), S(52, 62, 55), MU_SOFT),
    ]
    parts += _both([
        _Ell(S(-30, 18, 62), S(16, 15, 20), -0.012),
        _Ell(S(-24, 50, 50), S(14, 14, 16), D_AIR * 0.8),
        _Ell(S(-38, 18, -5), S(30, 7, 8), D_BONE * 0.8, (0.35, 0, 0)),
        _seg(S(-45, 95, 0), S(-20, 108, 55), 12 * s, 10 * s, D_BONE * 0.7),
        _seg(S(-48, 55, -5), S(-46, 98, 0), 14 * s, 9 * s, D_BONE * 0.7),
    ])
    for k in range(4):
        parts.append(_Ell(S(0, 122 + 20 * k, -15), S(15, 8, 15), D_BONE * 0.5))
    return _Scene(parts, (float(rng.uniform(230, 260)), float(rng.uniform(280, 310))), (0.0, 25.0 * s),
                  ("AP", "PA"), True, ("HEAD", "SKULL"))


def _ribs(rng: np.random.Generator, w: float, top: float, pitch: float, count: int) -> list[_Ell]:
    parts: list[_Ell] = []
    for k in range(count):
        y = top + pitch * k
        lat = w * (0.70 + 0.25 * math.sin(math.pi * min(1.0, (k + 1) / (count * 0.7))))
        post = _bezier((-18, y, -80), (-lat * 0.9, y - 8, -60), (-lat, y + 35, -5))
        ant = _bezier((-lat, y + 35, -5), (-lat * 0.95, y + 70, 50), (-45, y + 85, 85))
        parts += _arc(post, 8.0, 10.0, D_BONE * 0.55) + _arc(ant, 7.0, 9.0, D_BONE * 0.35)
    return _both(parts)


def _chest(rng: np.random.Generator) -> _Scene:
    w = float(rng.uniform(0.88, 1.12))
    d = float(rng.uniform(0.85, 1.15))
    thorax = _Ell((0, 170, 0), (165 * w, 240, 115 * d), MU_SOFT)
    heart = _Ell((25 * w, 215, 35), (72 * w, 62, 60), 0.0, (float(rng.uniform(-0.45, -0.2)), 0, 0))
    dome_r = _Ell((-70 * w, 290 + float(rng.uniform(-15, 15)), 10), (95 * w, 95, 110), 0.0)
    dome_l = _Ell((75 * w, 305 + float(rng.uniform(-15, 15)), 10), (90 * w, 90, 105), 0.0)
    lung_h = float(rng.uniform(125, 150))
    parts = [
        thorax,
        _Ell((0, -40, -5), (60, 80, 60), MU_SOFT),
        _Ell((-78 * w, 140, -5), (66 * w, lung_h, 85 * d), D_LUNG, minus=(dome_r, heart)),
        _Ell((78 * w, 145, -5), (62 * w, lung_h - 5, 82 * d), D_LUNG, minus=(dome_l, heart)),
        _Ell((0, 40, -10), (9, 75, 9), D_AIR * 0.7),
        _Ell((0, 170, -75), (20, 260, 18), D_SPONGY * 0.6),
        _Ell((70 * w, 320, 20), (30, 18, 30), D_AIR * 0.9),
        _Ell((-10, 105, 0), (18, 25, 18), 0.004),
    ]
    for k in range(12):
        parts.append(_Ell((0, 10 + 24 * k, -72), (21, 10, 18), D_BONE * 0.3))
    parts += _ribs(rng, 165 * w, 15.0, float(rng.uniform(21, 25)), 10)
    parts += _both([
        _Ell((-165 * w, 20, -5), (70, 60, 60), MU_SOFT),
        _Ell((-205 * w, 200, 0), (40, 180, 45), MU_SOFT),
        _Ell((-200 * w, 170, 0), (13, 150, 13), D_BONE, minus=(_Ell((-200 * w, 170, 0), (6, 150, 6), D_BONE),)),
        _Ell((-180 * w, 25, -5), (25, 25, 25), D_SPONGY * 2),
        *_arc([(-15, 10, 50), (-80 * w, 0, 40), (-150 * w, -8, 0)], 9.0, 10.0, D_BONE * 0.8),
        _Ell((-115 * w, 70, -90), (45, 75, 6), D_BONE * 0.6, (0.25, 0, 0)),
    ])
    if rng.random() < 0.4:
        parts += _both([_Ell((-85 * w, 255, 90 * d), (70, 55, 42), MU_SOFT, minus=(thorax,))])
    return _Scene(parts, (float(rng.uniform(350, 430)), float(rng.uniform(400, 430))), (0.0, 170.0),
                  ("PA", "AP"), False, ("CHEST",))


def _abdomen(rng: np.random.Generator) -> _Scene:
    w = float(rng.uniform(0.88, 1.15))
    dome = _Ell((-80 * w, 40, 10), (85 * w, 65, 95), 0.0)
    parts = [
        _Ell((0, 200, 0), (165 * w, 290, 115), MU_SOFT),
        _Ell((-65 * w, 60, 10), (95 * w, 75, 85), 0.0015),
        _Ell((85 * w, 50, -40), (40, 60, 30), 0.001),
        _Ell((-85 * w, -40, -10), (65 * w, 80, 80), D_LUNG, minus=(dome,)),
        _mirror(_Ell((-85 * w, -40, -10), (65 * w, 80, 80), D_LUNG, minus=(dome,))),
    ]
    parts += _both([
        _Ell((-65 * w, 150, -45), (28, 55, 25), 0.0015, (0.2, 0, 0)),
        _seg((-25, 150, -40), (-70, 390, -20), 25, 30, -0.003),
        _Ell((-108 * w, 430, -25), (70, 70, 10), D_BONE * 0.6, (0.3, 0.6, 0)),
    ])
    for k in range(3):
        parts += _both(_arc(_bezier((-40, -20 + 25 * k, -70), (-140 * w, 0 + 25 * k, -40), (-150 * w, 50 + 25 * k, 10)),
                            7.0, 9.0, D_BONE * 0.45))
    for k in range(8):
        y = 20 + 38 * k
        parts.append(_Ell((0, y, -45), (26, 14, 22), D_BONE * 0.55))
        parts += _both([_Ell((-40, y, -55), (20, 4, 8), D_BONE * 0.6)])
    # Colon frame and small-bowel gas.
    for _ in range(int(rng.integers(6, 13))):
        seg = int(rng.integers(3))
        if seg == 0:
            x, y = -110 * w, float(rng.uniform(230, 390))
        elif seg == 1:
            x, y = float(rng.uniform(-110, 110)) * w, float(rng.uniform(160, 200))
        else:
            x, y = 110 * w, float(rng.uniform(200, 390))
        r = float(rng.uniform(12, 26))
        parts.append(_Ell((x, y, float(rng.uniform(-20, 40))), (r, r * float(rng.uniform(0.6, 1.0)), r), D_AIR * float(rng.uniform(0.6, 1.0))))
    for _ in range(int(rng.integers(3, 10))):
        r = float(rng.uniform(6, 14))
        parts.append(_Ell((float(rng.uniform(-70, 70)), float(rng.uniform(220, 360)), float(rng.uniform(0, 50))),
                          (r, r, r), D_AIR * float(rng.uniform(0.5, 0.9))))
    return _Scene(parts, (float(rng.uniform(350, 430)), float(rng.uniform(400, 430))), (0.0, 210.0),
                  ("AP", "PA"), False, ("ABDOMEN", "ABDOMEN"))


def _pelvis(rng: np.random.Generator) -> _Scene:
    w = float(rng.uniform(0.9, 1.12))
    body = _Ell((0, 150, 0), (180 * w, 230, 120), MU_SOFT)
    parts = [
        body,
        _Ell((0, -10, -45), (27, 14, 22), D_BONE * 0.55),
        _Ell((0, 70, -65), (48, 60, 22), D_BONE * 0.45, (0, 0, 0.5)),
        _Ell((0, 200, 58), (6, 14, 12), D_BONE * 0.2),
    ]
    parts += _both([
        _Ell((-100 * w, 350, 0), (85, 170, 85), MU_SOFT, minus=(body,)),
        _Ell((-90 * w, 50, -25), (70 * w, 65, 14), D_BONE * 0.9, (0.3, 0.7, 0)),
        _seg((-40, 0, -40), (-150 * w, 30, -10), 9, 14, D_BONE * 0.8),
        _Ell((-95 * w, 125, 0), (32, 14, 30), D_BONE * 0.8),
        _Ell((-95 * w, 148, 0), (24, 24, 24), D_BONE * 0.8),
        _seg((-100 * w, 150, 0), (-145 * w, 185, 0), 26, 26, D_BONE * 0.6),
        _Ell((-150 * w, 180, -5), (20, 24, 20), D_BONE * 0.6),
        _Ell((-122 * w, 215, -5), (10, 10, 10), D_BONE * 0.5),
        _Ell((-140 * w, 330, 0), (16, 125, 16), D_BONE, (0.12, 0, 0),
             minus=(_Ell((-140 * w, 330, 0), (7, 125, 7), D_BONE, (0.12, 0, 0)),)),
        _seg((-12, 185, 55), (-85 * w, 160, 25), 12, 14, D_BONE * 0.7),
        _seg((-12, 210, 55), (-80 * w, 232, 10), 10, 12, D_BONE * 0.7),
        _Ell((-85 * w, 212, 0), (14, 30, 20), D_BONE * 0.7),
    ])
    for _ in range(int(rng.integers(1, 6))):
        r = float(rng.uniform(8, 18))
        parts.append(_Ell((float(rng.uniform(-80, 80)), float(rng.uniform(20, 110)), 30), (r, r, r), D_AIR * 0.6))
    return _Scene(parts, (float(rng.uniform(400, 430)), float(rng.uniform(330, 360))), (0.0, 160.0),
                  ("AP",), False, ("PELVIS",))


def _limb(rng: np.random.Generator) -> _Scene:
    kind = int(rng.integers(3))  # 0 leg (two bones), 1 forearm (two thin bones), 2 thigh/arm (one bone)
    w = float(rng.uniform(50, 65) if kind == 0 else rng.uniform(32, 44) if kind == 1 else rng.uniform(55, 78))
    parts = [_Ell((0, 0, 0), (w, 300, w * 0.95), MU_SOFT)]
    main_r = w * (0.28 if kind != 2 else 0.24)
    mx = -0.2 * w if kind != 2 else 0.0
    parts.append(_Ell((mx, 0, 0), (main_r, 260, main_r), D_BONE,
                      minus=(_Ell((mx, 0, 0), (main_r * 0.5, 260, main_r * 0.5), D_BONE),)))
    if kind != 2:
        r2 = main_r * (0.45 if kind == 0 else 0.8)
        parts.append(_Ell((0.42 * w, 0, -0.1 * w), (r2, 250, r2), D_BONE,
                          minus=(_Ell((0.42 * w, 0, -0.1 * w), (r2 * 0.45, 250, r2 * 0.45), D_BONE),)))
    joint = float(rng.choice([-1.0, 1.0])) * float(rng.uniform(150, 210))
    if rng.random() < 0.8:
        sgn = math.copysign(1, joint)
        parts.append(_Ell((mx * 0.5, joint - sgn * 22, 0), (w * 0.62, 24, w * 0.55), D_SPONGY * 2))
        parts.append(_Ell((mx * 0.5, joint + sgn * 36, 0), (w * 0.66, 28, w * 0.58), D_SPONGY * 2))
        parts.append(_Ell((mx * 0.3, joint + sgn * 120, 0), (main_r * 1.1, 90, main_r * 1.1), D_BONE,
                          minus=(_Ell((mx * 0.3, joint + sgn * 120, 0), (main_r * 0.5, 90, main_r * 0.5), D_BONE),)))
        parts.append(_Ell((0, joint + sgn * 80, 0), (w * 1.1, 110, w), MU_SOFT))
        if kind == 0 and rng.random() < 0.6:
            parts.append(_Ell((0, joint + sgn * 5, w * 0.55), (18, 22, 10), D_SPONGY * 2))
    body = ("LOWERLEG", "LEG", "EXTREMITY", "KNEE") if kind == 0 else \
        ("FOREARM", "ARM", "EXTREMITY") if kind == 1 else ("EXTREMITY", "FEMUR", "HUMERUS")
    return _Scene(parts, (float(rng.uniform(170, 260)), float(rng.uniform(330, 430))), (0.0, 0.0),
                  ("AP", "PA"), True, body)


_BUILDERS = {"head": _head, "chest": _chest, "abdomen": _abdomen, "pelvis": _pelvis, "limb": _limb}

_GLYPHS = {
    "R": ["11110", "10001", "10001", "11110", "10100", "10010", "10001"],
    "L": ["10000", "10000", "10000", "10000", "10000", "10000", "11111"],
}


class Radiograph(NamedTuple):
    image: np.ndarray  # uint16 [rows, columns], stored values (already inverted if MONOCHROME1)
    label: str  # one of RADIOGRAPH_LABELS
    body_part_examined: str
    view_position: str
    photometric: str
    bits_stored: int
    pixel_spacing: tuple[float, float]  # (row, column) mm at the detector
    laterality: str
    kvp: float
    mas: float


def _label(body_part: str) -> str:
    label = body_part.strip().lower()
    aliases = {"skull": "head", "thorax": "chest", "extremity": "limb", "leg": "limb", "arm": "limb"}
    label = aliases.get(label, label)
    if label not in _BUILDERS:
        raise ValueError(f"unknown body part {body_part!r}; one of {RADIOGRAPH_LABELS}")
    return label


def radiograph(seed: int, body_part: str, *, size: int | None = None) -> Radiograph:
    """A processed ("for presentation") projection radiograph of ``body_part`` with its label.

    ``size`` fixes the longer image side in pixels (default: drawn from 256..384).
    """
    label = _label(body_part)
    rng = np.random.default_rng([seed, RADIOGRAPH_LABELS.index(label), 0x4B])
    scene = _BUILDERS[label](rng)
    long_side = int(size) if size is not None else int(rng.integers(256, 385))
    if size is not None:
        rng.integers(256, 385)
    det_w, det_h = scene.detector
    lateral = scene.lateral_ok and rng.random() < (0.35 if label in ("head", "limb") else 0.12)
    if lateral:
        if label == "head":
            det_w, det_h = det_h * 0.95, det_h
    spacing = max(det_w, det_h) / long_side
    cols = max(32, int(round(det_w / spacing)))
    rows = max(32, int(round(det_h / spacing)))

    # Patient pose: in-plane rotation, slight obliquity, mirror, scale and position.
    roll = math.radians(float(rng.uniform(-25, 25) if label == "limb" else rng.uniform(-8, 8)))
    yaw = math.radians(90.0 + float(rng.uniform(-6, 6))) if lateral else math.radians(float(rng.uniform(-8, 8)))
    pitch = math.radians(float(rng.uniform(-6, 6)))
    g = _rotation(roll, yaw, pitch)
    if rng.random() < 0.5:
        g = np.diag([-1.0, 1.0, 1.0]) @ g
    g *= float(rng.uniform(0.9, 1.1))
    jitter = np.array([rng.uniform(-0.07, 0.07) * det_w, rng.uniform(-0.06, 0.06) * det_h])
    centre = g @ np.array([scene.centre[0], scene.centre[1], 0.0])
    shift = np.array([-centre[0] + jitter[0], -centre[1] + jitter[1], 0.0])
    u = ((np.arange(cols) - (cols - 1) / 2) * spacing).astype(np.float64)
    v = ((np.arange(rows) - (rows - 1) / 2) * spacing).astype(np.float64)
    line = _project(scene.parts, g, shift, u, v) * float(rng.uniform(0.85, 1.15))

    # Exposure: quantum noise on the transmitted photons plus a scatter floor.
    kvp = float(rng.choice([55, 60, 66, 70, 77, 81, 90, 102, 109, 117, 125]))
    mas = float(rng.choice([1.6, 2.0, 2.5, 3.2, 4.0, 5.0, 8.0, 10.0, 16.0, 20.0, 32.0]))
    n0 = 3.0e4 * (mas / 5.0) * (kvp / 70.0) ** 2
    prim = np.exp(-line)
    scatter = float(rng.uniform(0.05, 0.35)) * float(prim.mean())
    counts = n0 * (prim + scatter)
    counts = counts + np.sqrt(counts) * rng.standard_normal(counts.shape)
    sig = -np.log(np.clip(counts, 0.5, None) / n0)

    # Collimation: a rectangle (unexposed outside) of varying size.
    m = [int(rng.uniform(0, 0.12) * n) if rng.random() < 0.7 else 0 for n in (rows, rows, cols, cols)]
    field_mask = np.zeros((rows, cols), bool)
    field_mask[m[0]:rows - m[1], m[2]:cols - m[3]] = True

    # Presentation processing as vendors do it: histogram-based scaling, dynamic range
    # compression with edge/detail enhancement on a coarse scale, then a sigmoid tone curve.
    inside = sig[field_mask]
    lo, hi = np.percentile(inside, [float(rng.uniform(0.5, 3)), float(rng.uniform(98, 99.9))])
    val = np.clip((sig - lo) / max(hi - lo, 1e-6), -0.1, 1.1).astype(np.float32)
    coarse = _soft_blur(val, max(2, int(max(rows, cols) * float(rng.uniform(0.04, 0.10)))))
    val = coarse * float(rng.uniform(0.5, 0.9)) + (val - coarse) * float(rng.uniform(1.2, 2.6))
    fine = _soft_blur(val, max(1, int(max(rows, cols) / 120)))
    val = val + float(rng.uniform(0.0, 0.6)) * (val - fine)
    vlo, vhi = np.percentile(val[field_mask], [0.5, 99.8])
    val = (val - vlo) / max(vhi - vlo, 1e-6)
    gain = float(rng.uniform(1.0, 3.0))
    val = 0.5 + 0.5 * np.tanh(gain * (val - 0.5)) / math.tanh(gain * 0.5)
    bits = int(rng.choice([10, 12, 12, 14, 15]))
    vmax = (1 << bits) - 1
    scale = vmax * float(rng.uniform(0.75, 0.97))
    offset = vmax * float(rng.uniform(0.0, 0.06))
    img = offset + scale * val
    img[~field_mask] = vmax * float(rng.uniform(0.88, 1.0)) + rng.standard_normal(int((~field_mask).sum())) * vmax * 0.004

    laterality = "L" if rng.random() < 0.5 else "R"
    if rng.random() < 0.6:
        glyph = _GLYPHS["L" if g[0, 0] > 0 else "R"]
        cell = max(2, rows // 70)
        r0 = m[0] + int(rng.integers(4, 12))
        c0 = (m[2] + int(rng.integers(4, 12))) if rng.random() < 0.5 else (cols - m[3] - 5 * cell - int(rng.integers(4, 12)))
        for i, rowbits in enumerate(glyph):
            for j, bit in enumerate(rowbits):
                if bit == "1":
                    img[r0 + i * cell:r0 + (i + 1) * cell, c0 + j * cell:c0 + (j + 1) * cell] = vmax * 0.98

    mono1 = rng.random() < 0.4
    img = np.clip(np.rint(img), 0, vmax)
    if mono1:
        img = vmax - img
    view = ("LL" if rng.random() < 0.5 else "RL") if lateral else scene.views[int(rng.integers(len(scene.views)))]
    body = scene.body_parts[int(rng.integers(len(scene.body_parts)))]
    return Radiograph(img.astype(np.uint16), label, body, view, "MONOCHROME1" if mono1 else "MONOCHROME2", bits,
                      (spacing, spacing), laterality if label == "limb" else "", kvp, mas)


_XR_STUDY = {
    "head": "XR SKULL", "chest": "XR CHEST", "abdomen": "XR ABDOMEN", "pelvis": "XR PELVIS", "limb": "XR EXTREMITY",
}
_ANATOMY_CODES = {
    "HEAD": ("69536005", "Head"), "SKULL": ("89546000", "Skull"), "CHEST": ("816094009", "Chest"),
    "THORAX": ("816094009", "Thorax"), "ABDOMEN": ("818981001", "Abdomen"), "PELVIS": ("816092008", "Pelvis"),
    "HIP": ("24136001", "Hip joint"), "EXTREMITY": ("66019005", "Extremity"), "LOWERLEG": ("30021000", "Lower leg"),
    "LEG": ("30021000", "Lower leg"), "KNEE": ("72696002", "Knee"), "FOREARM": ("14975008", "Forearm"),
    "ARM": ("40983000", "Upper arm"), "FEMUR": ("71341001", "Femur"), "HUMERUS": ("85050009", "Humerus"),
}


_VIEW_CODES = {
    "AP": ("399348003", "antero-posterior"), "PA": ("272479007", "postero-anterior"),
    "LL": ("399173006", "left lateral"), "RL": ("399198007", "right lateral"),
}


def write_radiograph(
    path: str | Path,
    seed: int,
    body_part: str,
    *,
    modality: str | None = None,
    size: int | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Path:
    """Write one radiograph as CR Image Storage or DX For Presentation (``modality`` "CR"/"DX",
    default drawn from the seed) and return its path. ``overrides`` as in :func:`write_ct_series`."""
    r = radiograph(seed, body_part, size=size)
    rng = np.random.default_rng([seed, RADIOGRAPH_LABELS.index(r.label), 0xD1])
    modality = modality or ("CR" if rng.random() < 0.5 else "DX")
    if modality not in ("CR", "DX"):
        raise ValueError(f"modality must be CR or DX, got {modality!r}")
    date, time, birth, age, sex = _dates(rng)
    name, pid = _patient(rng, sex)
    sop_class = ComputedRadiographyImageStorage if modality == "CR" else DigitalXRayImageStorageForPresentation
    sop = _uid("xr", seed, r.label, "instance")
    rows, cols = r.image.shape
    ds = Dataset()
    ds.file_meta = _file_meta(sop_class, sop)
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY"] if modality == "DX" else ["ORIGINAL", "PRIMARY", ""]
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = ds.AcquisitionDate = date
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = ds.AcquisitionTime = time
    ds.AccessionNumber = f"X{int(rng.integers(10**7, 10**8))}"
    ds.Modality = modality
    ds.Manufacturer = MANUFACTURER
    ds.InstitutionName = _INSTITUTIONS[int(rng.integers(len(_INSTITUTIONS)))]
    ds.ReferringPhysicianName = f"{_FAMILY[int(rng.integers(len(_FAMILY)))]}^{_GIVEN_F[int(rng.integers(10))]}"
    ds.StationName = "PHANTOMXR1"
    ds.StudyDescription = f"{_XR_STUDY[r.label]} {r.view_position}"
    ds.SeriesDescription = f"{r.body_part_examined} {r.view_position}"
    ds.ManufacturerModelName = "Synthetic Radiography"
    ds.PatientName = name
    ds.PatientID = pid
    ds.PatientBirthDate = birth
    ds.PatientSex = sex
    ds.PatientAge = age
    ds.BodyPartExamined = r.body_part_examined
    ds.KVP = f"{r.kvp:.0f}"
    ds.DeviceSerialNumber = f"{seed % 100000:05d}"
    ds.SoftwareVersions = GENERATOR_VERSION
    ds.ExposureTime = str(int(rng.integers(4, 60)))
    ds.XRayTubeCurrent = str(int(rng.integers(100, 500)))
    ds.Exposure = str(max(1, int(round(r.mas))))
    ds.ExposureInuAs = int(r.mas * 1000)
    ds.ImagerPixelSpacing = [f"{r.pixel_spacing[0]:.4f}", f"{r.pixel_spacing[1]:.4f}"]
    ds.ViewPosition = r.view_position
    ds.StudyInstanceUID = study_uid("xr", f"{r.label}-{seed}")
    ds.SeriesInstanceUID = _uid("xr", seed, r.label, "series")
    ds.StudyID = f"{int(rng.integers(1000, 99999))}"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.PatientOrientation = ["L", "F"] if r.view_position in ("AP", "PA") else ["A", "F"]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = r.photometric
    ds.Rows = rows
    ds.Columns = cols
    ds.BitsAllocated = 16
    ds.BitsStored = r.bits_stored
    ds.HighBit = r.bits_stored - 1
    ds.PixelRepresentation = 0
    center = (1 << r.bits_stored) / 2
    ds.WindowCenter = f"{center:.0f}"
    ds.WindowWidth = f"{(1 << r.bits_stored) * 0.9:.0f}"
    ds.RescaleIntercept = "0"
    ds.RescaleSlope = "1"
    ds.RescaleType = "US"
    ds.BurnedInAnnotation = "NO"
    ds.LossyImageCompression = "00"
    if modality == "DX":
        ds.PresentationIntentType = "FOR PRESENTATION"
        ds.PixelIntensityRelationship = "LOG"
        ds.PixelIntensityRelationshipSign = 1 if r.photometric == "MONOCHROME2" else -1
        ds.DetectorType = "SCINTILLATOR"
        ds.ImageLaterality = r.laterality or "U"
        ds.PixelSpacing = ds.ImagerPixelSpacing
        code = _ANATOMY_CODES.get(r.body_part_examined)
        if code:
            item = Dataset()
            item.CodeValue, item.CodeMeaning = code
            item.CodingSchemeDesignator = "SCT"
            ds.AnatomicRegionSequence = DicomSequence([item])
        ds.PresentationLUTShape = "IDENTITY" if r.photometric == "MONOCHROME2" else "INVERSE"
        ds.PositionerType = "COLUMN"
        ds.AcquisitionContextSequence = DicomSequence([])
    elif r.laterality:
        ds.Laterality = r.laterality
    view_code = _VIEW_CODES.get(r.view_position)
    if view_code and modality == "DX":
        item = Dataset()
        item.CodeValue, item.CodeMeaning = view_code
        item.CodingSchemeDesignator = "SCT"
        ds.ViewCodeSequence = DicomSequence([item])
    ds.PixelData = r.image.tobytes()
    _apply_overrides(ds, overrides)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path
