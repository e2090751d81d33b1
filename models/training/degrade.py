"""Degraded copies of phantom radiographs: what real CR images have and the phantoms lack.

The body-part classifier trained on clean phantoms alone gave the right region only 0.61 and
0.55 on the two real radiographs in pydicom-data (RG1 chest, RG3 distal tibia), with pelvis as
the runner-up at 0.29-0.33. Trained on every phantom plus one degraded copy of it (gamma and
contrast jitter, detector blur, quantum noise, collimation bands, a burnt-in marker), the same
network gives 0.92 and 0.72 (docs/reference-models.md, "Calibration"). The recipe was designed
before it was run and not iterated; the two real images were only read, never fitted.
"""

from __future__ import annotations

import numpy as np


def degrade(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A degraded copy of min-max normalised images [N, 1, H, W] (float32, 0..1), normalised
    again as the card's ``minmax`` preprocessing does."""
    out = np.empty(x.shape, np.float32)
    n, _, h, w = x.shape
    for i in range(n):
        a = x[i, 0].astype(np.float32)
        a = np.clip(a, 0, 1) ** rng.uniform(0.6, 1.6)
        a = a * rng.uniform(0.7, 1.1) + rng.uniform(-0.1, 0.15)
        if rng.random() < 0.6:  # detector blur
            k = int(rng.integers(1, 3))
            pad = np.pad(a, k, mode="edge")
            a = sum(pad[dy:dy + h, dx:dx + w] for dy in range(2 * k + 1) for dx in range(2 * k + 1)) / (2 * k + 1) ** 2
        a = a + rng.normal(0, rng.uniform(0.0, 0.06), a.shape)  # quantum noise
        if rng.random() < 0.7:  # collimation: dark or bright bands at the edges
            edge = float(rng.choice([0.0, 1.0]))
            t_, b_ = int(rng.uniform(0, 0.12) * h), int(rng.uniform(0, 0.12) * h)
            l_, r_ = int(rng.uniform(0, 0.12) * w), int(rng.uniform(0, 0.12) * w)
            a[:t_], a[h - b_:], a[:, :l_], a[:, w - r_:] = edge, edge, edge, edge
        if rng.random() < 0.6:  # a burnt-in side marker, the brightest thing in the image
            mh, mw = int(rng.integers(4, 10)), int(rng.integers(4, 10))
            y0, x0 = int(rng.integers(0, h - mh)), int(rng.integers(0, w - mw))
            a[y0:y0 + mh, x0:x0 + mw] = a.max() + 0.3
        lo, hi = float(a.min()), float(a.max())
        out[i, 0] = (a - lo) / (hi - lo) if hi > lo else 0.0
    return out


def with_degraded_copies(x: np.ndarray, labels: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The training set doubled: every image, then a degraded copy of each (same dtype as ``x``)."""
    copies = degrade(x.astype(np.float32), np.random.default_rng(seed)).astype(x.dtype)
    return np.concatenate([x, copies]), np.concatenate([labels, labels])
