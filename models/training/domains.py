"""Chest CT phantoms from a shifted domain: another scanner's contrast and noise.

The reference lung U-Net was trained on :func:`models.training.phantoms.write_ct_series`.
A site whose scanner and reconstruction differ (a softer kernel with another calibration,
lower dose) sees the same anatomy with other intensities. :func:`write_ct_series_domain`
writes the series :func:`~models.training.phantoms.write_ct_series` writes for the same seed
and arguments (same UIDs, geometry and truth: :func:`~models.training.phantoms.ct_truth`), and
then maps its pixels through the domain: ``HU' = centre + contrast * (HU - centre) + noise``,
with the noise drawn from the seed and the domain's name. The generators themselves are left
untouched, so every existing phantom is byte-for-byte what it was.

Numpy and pydicom only (no torch).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom

from models.training.phantoms import write_ct_series


@dataclass(frozen=True)
class Domain:
    name: str
    contrast: float  # scale of HU differences around ``centre``
    centre: float  # HU that stays where it is
    noise: float  # sigma of added white noise, HU
    offset: float = 0.0  # HU added after the scaling (a calibration offset)


DOMAINS = {
    # Compressed contrast with a calibration offset and heavy noise: lung around -520 HU.
    "soft": Domain("soft", contrast=0.45, centre=-100.0, noise=45.0, offset=120.0),
    # Low dose: the same contrast, much more noise, and a darker calibration.
    "lowdose": Domain("lowdose", contrast=0.8, centre=0.0, noise=110.0, offset=-150.0),
    # A bright calibration: everything 300 HU up, mild compression.
    "bright": Domain("bright", contrast=0.6, centre=-400.0, noise=30.0, offset=300.0),
}


def _rng(seed: int, domain: str, k: int) -> np.random.Generator:
    digest = hashlib.sha256(f"modelnode domain {domain} {seed} {k}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def shift(hu: np.ndarray, domain: Domain, rng: np.random.Generator) -> np.ndarray:
    out = domain.centre + domain.contrast * (hu.astype(np.float64) - domain.centre) + domain.offset
    out += rng.normal(0.0, domain.noise, hu.shape)
    return out


def write_ct_series_domain(out_dir: str | Path, seed: int, domain: str, **kw: Any) -> list[Path]:
    """:func:`~models.training.phantoms.write_ct_series` (same arguments), pixels in ``domain``."""
    d = DOMAINS[domain]
    paths = write_ct_series(out_dir, seed, **kw)
    for k, path in enumerate(paths):
        ds = pydicom.dcmread(path)
        slope, intercept = float(ds.RescaleSlope), float(ds.RescaleIntercept)
        hu = ds.pixel_array * slope + intercept
        stored = np.rint((shift(hu, d, _rng(seed, domain, k)) - intercept) / slope)
        hi = (1 << int(ds.BitsStored)) - 1
        ds.PixelData = np.clip(stored, 0, hi).astype(ds.pixel_array.dtype).tobytes()
        ds.SeriesDescription = f"{ds.get('SeriesDescription', '')} {domain}"[:64]
        ds.save_as(path, enforce_file_format=True)
    return paths
