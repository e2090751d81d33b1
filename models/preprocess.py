"""The model card's preprocessing, in numpy: the one implementation training and serving share.

The reference models were trained on arrays produced by :func:`prepare` from the very DICOM
files the generators write, and the inference pipeline calls the same function, so what a
model sees at the node is what it saw in training (no train/serve skew).

Order of operations for ``input.preprocessing`` (each step optional, as the card says):

1. ``rescale``: Rescale Slope/Intercept (the modality LUT; HU for CT). ``models.volume``
   applies it when it loads a series; :func:`dataset_pixels` does it for a single instance.
2. ``invert_monochrome1``: a MONOCHROME1 image becomes ``(lo + hi) - x``, where ``lo..hi``
   is the range the stored values can take (from BitsStored, PixelRepresentation and the
   rescale), so bright means dense in either photometric interpretation and window values keep
   their units.
3. ``clip [lo, hi]``: values are limited to the range, units unchanged.
4. ``window {center, width}``: values are limited to ``center +- width / 2`` and mapped
   linearly to [0, 1] (a DICOM linear VOI window with output range [0, 1]).
5. ``normalize``: ``none``; ``minmax`` to [0, 1] by the input's own minimum and maximum;
   ``zscore`` by the input's own mean and standard deviation; ``fixed`` as ``(x - mean) / std``
   with the card's ``mean`` and ``std``. "The input" is one slice for a ``2d`` model and the
   whole volume for a ``3d`` one; a constant input normalises to zeros.
6. Resampling: to ``resample_size`` (rows, columns[, slices-first for 3d]) or, if only
   ``resample_spacing`` is given and the spacing is known, to the size that spacing implies.
   Interpolation is linear with half-pixel centres (``align_corners=False``); when shrinking,
   the triangle filter is widened by the shrink factor (antialiasing, as PIL and torchvision's
   ``antialias=True`` do), so a 512 px slice is averaged down rather than point-sampled.

Model input: float32 [N, C, H, W] for ``2d`` (one item per slice) and [1, C, D, H, W] for
``3d``. Outputs go back with :func:`restore` (same interpolation, to the source grid) and
:func:`to_masks` (per-class thresholds from the card).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from pydicom.dataset import Dataset

from iods.card import Preprocessing

__all__ = [
    "apply_intensity",
    "dataset_pixels",
    "prepare",
    "prepare_dataset",
    "resize",
    "restore",
    "target_size",
    "to_masks",
    "value_range",
]


def value_range(ds: Dataset, *, rescale: bool = True) -> tuple[float, float]:
    """The range the pixel values of ``ds`` can take, after the modality LUT if ``rescale``."""
    bits = int(ds.get("BitsStored", ds.get("BitsAllocated", 16)) or 16)
    signed = int(ds.get("PixelRepresentation", 0) or 0) == 1
    lo, hi = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)
    if rescale:
        slope = float(ds.get("RescaleSlope", 1) or 1)
        intercept = float(ds.get("RescaleIntercept", 0) or 0)
        lo, hi = sorted((lo * slope + intercept, hi * slope + intercept))
    return float(lo), float(hi)


def dataset_pixels(ds: Dataset, pp: Preprocessing) -> np.ndarray:
    """Pixels of one instance as float32 [frames, rows, columns], rescaled if the card asks."""
    arr = ds.pixel_array
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    if frames == 1:
        arr = arr[np.newaxis]
    out = arr.astype(np.float32)
    if pp.rescale and samples == 1:
        slope = float(ds.get("RescaleSlope", 1) or 1)
        intercept = float(ds.get("RescaleIntercept", 0) or 0)
        if slope != 1.0:
            out *= np.float32(slope)
        if intercept != 0.0:
            out += np.float32(intercept)
    return out


def _reduce_axes(ndim: int, layout: str) -> tuple[int, ...]:
    spatial = 2 if layout == "2d" else 3
    return tuple(range(ndim - spatial, ndim))


def apply_intensity(
    pixels: np.ndarray,
    pp: Preprocessing,
    *,
    photometric: str = "MONOCHROME2",
    value_range: tuple[float, float] | None = None,
    layout: str = "2d",
) -> np.ndarray:
    """Steps 2-5 (inversion, clip, window, normalise) on rescaled pixels; float32, same shape.

    ``pixels`` is [..., H, W] for ``2d`` (statistics per slice) or [..., D, H, W] for ``3d``.
    ``value_range`` is :func:`value_range` of the source; without it a MONOCHROME1 image is
    mirrored about its own minimum and maximum.
    """
    x = np.asarray(pixels, dtype=np.float32)
    axes = _reduce_axes(x.ndim, layout)
    if pp.invert_monochrome1 and photometric.upper() == "MONOCHROME1":
        if value_range is not None:
            x = np.float32(value_range[0] + value_range[1]) - x
        else:
            x = (x.min(axis=axes, keepdims=True) + x.max(axis=axes, keepdims=True)) - x
    else:
        x = x.copy()
    if pp.clip is not None:
        np.clip(x, pp.clip[0], pp.clip[1], out=x)
    if pp.window is not None:
        lo = pp.window.center - pp.window.width / 2.0
        np.clip(x, lo, lo + pp.window.width, out=x)
        x -= np.float32(lo)
        x /= np.float32(pp.window.width)
    if pp.normalize == "minmax":
        lo_v = x.min(axis=axes, keepdims=True)
        span = x.max(axis=axes, keepdims=True) - lo_v
        x = np.where(span > 0, (x - lo_v) / np.where(span > 0, span, 1), 0).astype(np.float32)
    elif pp.normalize == "zscore":
        mean = x.mean(axis=axes, keepdims=True, dtype=np.float64)
        std = x.std(axis=axes, keepdims=True, dtype=np.float64)
        x = np.where(std > 0, (x - mean) / np.where(std > 0, std, 1), 0).astype(np.float32)
    elif pp.normalize == "fixed":
        x = ((x - np.float32(pp.mean)) / np.float32(pp.std)).astype(np.float32)
    return x


def _taps(n_in: int, n_out: int, mode: str) -> tuple[np.ndarray, np.ndarray]:
    """Source indices and weights [n_out, taps] of a 1-D resampling with half-pixel centres."""
    scale = n_in / n_out
    centres = (np.arange(n_out) + 0.5) * scale - 0.5
    if mode == "nearest":
        idx = np.clip(np.floor((np.arange(n_out) + 0.5) * scale).astype(np.int64), 0, n_in - 1)
        return idx[:, None], np.ones((n_out, 1), np.float32)
    if mode != "linear":
        raise ValueError(f"interpolation must be 'linear' or 'nearest', got {mode!r}")
    support = max(scale, 1.0)  # triangle half-width in source pixels
    width = int(math.ceil(support)) * 2 + 1
    first = np.floor(centres - support).astype(np.int64) + 1
    idx = first[:, None] + np.arange(width)[None, :]
    w = np.clip(1.0 - np.abs(idx - centres[:, None]) / support, 0.0, None)
    # Taps that fall outside the image are dropped and the rest renormalised (edge handling).
    w[(idx < 0) | (idx >= n_in)] = 0.0
    w /= w.sum(axis=1, keepdims=True)
    return np.clip(idx, 0, n_in - 1), w.astype(np.float32)


def _resize_axis(x: np.ndarray, axis: int, n_out: int, mode: str) -> np.ndarray:
    n_in = x.shape[axis]
    if n_in == n_out:
        return x
    idx, w = _taps(n_in, n_out, mode)
    # The taps as a dense [n_in, n_out] matrix: one BLAS matmul over the last axis instead of a
    # gather per tap (4x faster on a 60 x 512 x 512 volume, same values to float rounding).
    m = np.zeros((n_in, n_out), np.float32)
    np.add.at(m, (idx, np.broadcast_to(np.arange(n_out)[:, None], idx.shape)), w)
    x = np.ascontiguousarray(x, np.float32)
    if axis == x.ndim - 1:
        return x @ m
    if axis == x.ndim - 2:
        return m.T @ x  # batched over the leading axes, each [n_in, W] block contiguous
    return np.moveaxis(np.moveaxis(x, axis, -1) @ m, -1, axis)


def resize(x: np.ndarray, size: Sequence[int], *, mode: str = "linear") -> np.ndarray:
    """Resize the last ``len(size)`` axes of ``x`` (float32 out); see the module notes."""
    out = np.asarray(x, dtype=np.float32)
    for k, n in enumerate(size):
        axis = out.ndim - len(size) + k
        out = _resize_axis(out, axis, int(n), mode)
    return out


def target_size(
    shape: Sequence[int], pp: Preprocessing, spacing: Sequence[float] | None = None
) -> tuple[int, ...] | None:
    """The spatial size the model gets for a source of spatial ``shape`` (None: keep it)."""
    if pp.resample_size is not None:
        return tuple(int(v) for v in pp.resample_size)
    if pp.resample_spacing is not None and spacing is not None:
        n = len(pp.resample_spacing)
        src_shape, src_spacing = list(shape)[-n:], list(spacing)[-n:]
        return tuple(max(1, int(round(s * sp / t))) for s, sp, t in zip(src_shape, src_spacing, pp.resample_spacing,
                                                                       strict=True))
    return None


def prepare(
    pixels: np.ndarray,
    pp: Preprocessing,
    *,
    photometric: str = "MONOCHROME2",
    value_range: tuple[float, float] | None = None,
    layout: str = "2d",
    spacing: Sequence[float] | None = None,
) -> np.ndarray:
    """Rescaled source pixels -> the model's input tensor (float32).

    ``2d``: ``pixels`` [H, W] or [N, H, W] -> [N, 1, h, w].
    ``3d``: ``pixels`` [D, H, W] -> [1, 1, d, h, w].
    ``spacing`` (mm, same axis order as the spatial axes) only matters for ``resample_spacing``.
    """
    x = np.asarray(pixels)
    if layout == "2d":
        if x.ndim == 2:
            x = x[np.newaxis]
        if x.ndim != 3:
            raise ValueError(f"a 2d model takes [H, W] or [N, H, W] pixels, got shape {x.shape}")
        sp = list(spacing)[-2:] if spacing is not None else None
    elif layout == "3d":
        if x.ndim != 3:
            raise ValueError(f"a 3d model takes [D, H, W] pixels, got shape {x.shape}")
        sp = list(spacing) if spacing is not None else None
    else:
        raise ValueError(f"layout must be '2d' or '3d', got {layout!r}")
    x = apply_intensity(x, pp, photometric=photometric, value_range=value_range, layout=layout)
    spatial = 2 if layout == "2d" else 3
    size = target_size(x.shape[-spatial:], pp, sp)
    if size is not None:
        if len(size) != spatial:
            raise ValueError(f"resample size {size} does not match a {layout} model")
        x = resize(x, size)
    return np.ascontiguousarray(x[:, np.newaxis] if layout == "2d" else x[np.newaxis, np.newaxis])


def prepare_dataset(ds: Dataset, pp: Preprocessing, *, layout: str = "2d") -> np.ndarray:
    """One instance (a radiograph, or a multi-frame image) -> the model's input tensor."""
    pixels = dataset_pixels(ds, pp)
    spacing = ds.get("PixelSpacing") or ds.get("ImagerPixelSpacing")
    return prepare(
        pixels,
        pp,
        photometric=str(ds.get("PhotometricInterpretation", "MONOCHROME2")),
        value_range=value_range(ds, rescale=pp.rescale),
        layout=layout,
        # Frames of one instance have no slice spacing here; 3d resampling needs resample_size.
        spacing=[float(v) for v in spacing] if spacing and layout == "2d" else None,
    )


def restore(probs: np.ndarray, size: Sequence[int], *, mode: str = "linear") -> np.ndarray:
    """Model output [N, K, h, w] (or [1, K, d, h, w]) back to the source grid ``size``."""
    return resize(probs, size, mode=mode)


def to_masks(
    probs: np.ndarray,
    thresholds: Sequence[float],
    size: Sequence[int] | None = None,
    *,
    mode: str = "linear",
    chunk: int = 8,
) -> np.ndarray:
    """Probabilities [N, K, ...] -> bool masks [N, K, ...], resized to ``size`` first if given.

    Works through ``chunk`` items at a time, so a 200-slice 512x512 study never holds the
    full-resolution float probabilities in memory (only the boolean masks).
    """
    probs = np.asarray(probs)
    k = probs.shape[1]
    if len(thresholds) != k:
        raise ValueError(f"{len(thresholds)} thresholds for {k} output channels")
    th = np.asarray(thresholds, np.float32).reshape((1, k) + (1,) * (probs.ndim - 2))
    out_spatial = tuple(size) if size is not None else probs.shape[2:]
    out = np.empty((probs.shape[0], k, *out_spatial), bool)
    for i in range(0, probs.shape[0], max(1, chunk)):
        part = probs[i:i + chunk]
        if size is not None:
            part = restore(part, size, mode=mode)
        # Strictly above: a probability of exactly the threshold is not a detection.
        out[i:i + chunk] = part > th
    return out
