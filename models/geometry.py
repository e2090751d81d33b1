"""Patient-space orientation of a volume: from the acquisition grid to a network's axis codes.

A series loads as an array [slice, row, column] (``models.volume``): columns run along the first
direction cosine of ImageOrientationPatient, rows along the second, and slices along their
normal, sorted. Each of those axes points some way in the patient (DICOM's LPS frame: +x to
the patient's Left, +y Posterior, +z Superior).

A network trained on NIfTI through MONAI (``LoadImage`` then ``Orientation(axcodes="RAS")``)
expects its spatial axes to be x, y, z increasing towards Right, Anterior, Superior; one
trained on DICOM arrays may expect "LPS" or the acquisition grid itself. Axis codes name, for
each axis in order, the direction it *increases* towards (nibabel's convention, which MONAI
uses).

Reorienting is a transpose and flips, as in MONAI and nibabel (``io_orientation``): each array
axis is assigned the patient axis its direction is closest to, so an oblique acquisition is
not resampled, only relabelled, and the inverse is exact.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

# Per patient axis (LPS order): the letter for the positive and for the negative direction.
_POSITIVE = "LPS"
_NEGATIVE = "RAI"


class OrientationError(ValueError):
    """The volume's geometry cannot be brought into the requested orientation."""


def axis_codes(directions: np.ndarray) -> str:
    """The code of each array axis, e.g. ``SPL`` for an axial CT [slice, row, column]."""
    assignment = _assign(directions)
    return "".join(_POSITIVE[j] if s > 0 else _NEGATIVE[j] for j, s in assignment)


def _assign(directions: np.ndarray) -> list[tuple[int, float]]:
    """(patient axis, sign) per array axis, greedily by the largest cosine (nibabel's rule)."""
    m = np.abs(np.asarray(directions, float))
    if m.shape != (3, 3) or not np.isfinite(m).all():
        raise OrientationError(f"direction cosines must be 3 x 3 finite values, got {directions!r}")
    out: list[tuple[int, float] | None] = [None, None, None]
    free_rows, free_cols = {0, 1, 2}, {0, 1, 2}
    for _ in range(3):
        i, j = max(((r, c) for r in free_rows for c in free_cols), key=lambda rc: m[rc])
        if m[i, j] <= 1e-6:
            raise OrientationError("direction cosines are degenerate (two axes point the same way)")
        out[i] = (j, float(np.sign(directions[i][j])))
        free_rows.discard(i)
        free_cols.discard(j)
    return out  # type: ignore[return-value]


@dataclass(frozen=True)
class Reorientation:
    """Network axis ``i`` is source axis ``perm[i]``, reversed where ``flip[i]``."""

    perm: tuple[int, int, int] = (0, 1, 2)
    flip: tuple[bool, bool, bool] = (False, False, False)

    @property
    def identity(self) -> bool:
        return self.perm == (0, 1, 2) and not any(self.flip)

    def forward(self, a: np.ndarray) -> np.ndarray:
        """Source array (spatial axes last) -> network axes (a view where possible)."""
        lead = a.ndim - 3
        out = np.transpose(a, (*range(lead), *(lead + p for p in self.perm)))
        for i, f in enumerate(self.flip):
            if f:
                out = np.flip(out, axis=lead + i)
        return out

    def inverse(self, a: np.ndarray) -> np.ndarray:
        """Network-axis array (spatial axes last) -> source axes; exact inverse of forward."""
        lead = a.ndim - 3
        for i, f in enumerate(self.flip):
            if f:
                a = np.flip(a, axis=lead + i)
        back = np.argsort(self.perm)
        return np.transpose(a, (*range(lead), *(lead + int(p) for p in back)))

    def spacing(self, source: Sequence[float]) -> tuple[float, float, float]:
        return tuple(float(source[p]) for p in self.perm)  # type: ignore[return-value]


def reorientation(directions: np.ndarray, code: str) -> Reorientation:
    """The transpose and flips taking arrays with axis ``directions`` (one LPS unit vector per
    array axis, rows) to the axis ``code`` (e.g. "RAS")."""
    code = code.upper()
    assignment = _assign(directions)
    perm: list[int] = []
    flip: list[bool] = []
    for letter in code:
        if letter in _POSITIVE:
            j, want = _POSITIVE.index(letter), 1.0
        elif letter in _NEGATIVE:
            j, want = _NEGATIVE.index(letter), -1.0
        else:
            raise OrientationError(f"unknown axis code {letter!r} in {code!r}")
        src = next(i for i, (axis, _) in enumerate(assignment) if axis == j)
        perm.append(src)
        flip.append(assignment[src][1] != want)
    if sorted(perm) != [0, 1, 2]:
        raise OrientationError(f"axis code {code!r} names a patient axis twice")
    return Reorientation(tuple(perm), tuple(flip))  # type: ignore[arg-type]


def nearest_resize(labels: np.ndarray, size: Sequence[int]) -> np.ndarray:
    """Resize the last ``len(size)`` axes by nearest neighbour with half-pixel centres (the
    sampling ``models.preprocess`` uses, so a grid resampled there maps back voxel for voxel);
    dtype kept, for label maps and masks."""
    out = labels
    lead = labels.ndim - len(size)
    for k, n in enumerate(size):
        axis = lead + k
        n_in = out.shape[axis]
        if n_in == n:
            continue
        idx = np.clip(np.floor((np.arange(n) + 0.5) * (n_in / n)).astype(np.intp), 0, n_in - 1)
        out = np.take(out, idx, axis=axis)
    return np.ascontiguousarray(out)


def divisible_padding(shape: Sequence[int], divisor: Sequence[int]) -> list[tuple[int, int]]:
    """(before, after) padding that makes each size a multiple of its divisor, split evenly
    with the extra voxel after (MONAI ``DivisiblePad(method="symmetric")``)."""
    pads = []
    for n, d in zip(shape, divisor, strict=True):
        extra = (-n) % d
        pads.append((extra // 2, extra - extra // 2))
    return pads
