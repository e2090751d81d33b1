"""Sliding-window inference over ONNX Runtime, with importance blending in bounded memory.

The windows, their order and their weights are MONAI's ``sliding_window_inference`` (1.5):

* an image smaller than the window is padded with zeros, split evenly (extra voxel after);
* along each axis the step is ``int(window * (1 - overlap))`` (at least 1, and the whole window
  when the window equals the image), and the last window is moved back to end at the border
  (``monai.data.utils.dense_patch_slices``);
* each window's output is weighted by an importance map, a separable Gaussian with sigma
  ``sigma_scale * window`` or ones, clamped below at ``max(min, 1e-3)``
  (``compute_importance_map``), summed, and divided by the summed weights.

So a MONAI model gives the same blended outputs here as under MONAI, to float rounding.

What is new is the memory. MONAI holds the whole output, [classes, *image] in float32, for the
whole run; for 101 channels of a 600 x 512 x 512 CT that is 59 GiB. Here windows are visited in
order along the first axis, and the accumulator only spans one window's depth along it
([classes, window, *rest]): once every window starting at or before a plane has been added, the
planes before the next start are final, handed to ``finish`` (which keeps only labels or
masks), and the buffer slides on. Peak memory is ``classes x window_0 x rest x 4`` bytes
whatever the depth of the volume.
"""

from __future__ import annotations

import itertools
import math
import os
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np


def scan_starts(image_size: Sequence[int], window: Sequence[int], overlap: float) -> list[list[int]]:
    """Window start indices per axis (image already padded to at least the window)."""
    starts = []
    for n, w in zip(image_size, window, strict=True):
        step = w if w == n else max(int(w * (1 - overlap)), 1)
        count = 1
        for d in range(int(math.ceil(n / step))):
            if d * step + w >= n:
                count = d + 1
                break
        starts.append([d * step - max(d * step + w - n, 0) for d in range(count)])
    return starts


def importance_map(window: Sequence[int], blending: str = "gaussian", sigma_scale: float = 0.125) -> np.ndarray:
    """float32 weights of one window's voxels."""
    if blending == "constant":
        weights = np.ones(tuple(window), np.float32)
    elif blending == "gaussian":
        weights = np.ones((), np.float32)
        for i, w in enumerate(window):
            x = np.arange(w, dtype=np.float32) - np.float32((w - 1) / 2.0)
            sigma = np.float32(w * sigma_scale)
            g = np.exp(x * x / np.float32(-2 * sigma * sigma)).astype(np.float32)
            weights = weights[..., np.newaxis] * g[(np.newaxis,) * i] if i else g
    else:
        raise ValueError(f"blending must be 'gaussian' or 'constant', got {blending!r}")
    return np.maximum(weights, max(float(weights.min()), 1e-3)).astype(np.float32)


def window_padding(image_size: Sequence[int], window: Sequence[int]) -> list[tuple[int, int]]:
    """(before, after) zero padding that makes each axis at least as long as the window."""
    pads = []
    for n, w in zip(image_size, window, strict=True):
        extra = max(w - n, 0)
        pads.append((extra // 2, extra - extra // 2))
    return pads


def channel_argmax(summed: np.ndarray, out: np.ndarray) -> None:
    """``out[...] = summed.argmax(axis=0)`` (first maximum on ties, as numpy).

    numpy's argmax over a leading axis copies the array with that axis last (1.8 GB for a slab
    of 101 channels); a running maximum over the channels needs one plane's worth and is faster
    from a few channels on.
    """
    if len(summed) < 8:
        out[...] = summed.argmax(axis=0)
        return
    best = summed[0].copy()
    better = np.empty(best.shape, bool)
    out[...] = 0
    for k in range(1, len(summed)):
        np.greater(summed[k], best, out=better)
        np.maximum(best, summed[k], out=best)
        np.putmask(out, better, k)


class _Adder:
    """``summed[:, region] += output * weights``, split over the cores by channel when there
    are many channels: numpy releases the GIL in both passes, and with 100 classes this
    multiply-add over 90 M values per window is what the CPU spends most of its time on
    besides the network."""

    MIN_CHANNELS = 8

    def __init__(self) -> None:
        try:
            cores = len(os.sched_getaffinity(0))
        except AttributeError:
            cores = os.cpu_count() or 1
        self.threads = max(1, cores)
        self._pool: ThreadPoolExecutor | None = None

    def __call__(self, summed: np.ndarray, region: tuple[slice, ...], out: np.ndarray, weights: np.ndarray) -> None:
        k = out.shape[0]
        if k < self.MIN_CHANNELS or self.threads == 1:
            out *= weights
            summed[(slice(None), *region)] += out
            return
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=self.threads, thread_name_prefix="blend")
        step = -(-k // self.threads)

        def part(lo: int) -> None:
            o = out[lo:lo + step]
            o *= weights
            summed[(slice(lo, lo + step), *region)] += o

        for f in [self._pool.submit(part, lo) for lo in range(0, k, step)]:
            f.result()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)


def _in_order(pool: ThreadPoolExecutor | None, workers: int,
              tasks: Sequence[Callable[[], np.ndarray]]) -> Iterator[np.ndarray]:
    """Results of ``tasks`` in order, at most ``workers`` in flight (Executor.map would submit,
    and hold the outputs of, all of them at once)."""
    if pool is None:
        for task in tasks:
            yield task()
        return
    pending: deque[Future] = deque()
    for task in tasks:
        pending.append(pool.submit(task))
        if len(pending) >= workers:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def sliding_window(
    image: np.ndarray,
    window: Sequence[int],
    run: Callable[[np.ndarray], np.ndarray],
    finish: Callable[[int, int, np.ndarray, np.ndarray], None],
    *,
    overlap: float = 0.25,
    blending: str = "gaussian",
    sigma_scale: float = 0.125,
    batch: int = 1,
    workers: int = 1,
    progress: Callable[[int, int], None] | None = None,
) -> int:
    """Run ``run`` on the windows of ``image`` [C, *spatial] and blend the outputs.

    ``run`` takes a float32 batch [b, C, *window] and returns [b, K, *window]. ``finish(lo,
    hi, summed, weights)`` is called once per slab of the first spatial axis, in order and
    covering the image exactly (padding excluded): ``summed`` [K, hi - lo, *rest] is the
    weighted sum of the window outputs, ``weights`` [hi - lo, *rest] the summed weights, so
    ``summed / weights`` is MONAI's blended output (an argmax needs no division). The arrays are
    reused afterwards: copy what you keep. Returns the number of windows run.

    ``workers`` > 1 keeps that many ``run`` calls in flight on threads (ONNX Runtime releases
    the GIL); outputs are still added in window order, so the result does not depend on it.
    """
    spatial = image.shape[1:]
    if len(window) != len(spatial):
        raise ValueError(f"a {len(window)}-D window for a {len(spatial)}-D image")
    pads = window_padding(spatial, window)
    if any(p != (0, 0) for p in pads):
        image = np.pad(image, [(0, 0), *pads])
    padded = image.shape[1:]
    starts = scan_starts(padded, window, overlap)
    weights = importance_map(window, blending, sigma_scale)
    rest = list(itertools.product(*starts[1:]))
    total = len(starts[0]) * len(rest)
    w0 = window[0]
    depth = min(w0, padded[0])
    summed: np.ndarray | None = None  # allocated when the first output tells K
    count = np.zeros((depth, *padded[1:]), np.float32)
    base = 0
    done = 0
    lo0 = pads[0][0]
    hi0 = lo0 + spatial[0]

    def flush(until: int) -> None:
        """Hand on planes [base, until) and slide the buffer so it starts at ``until``."""
        nonlocal base
        n = until - base
        if n <= 0 or summed is None:
            return
        a, b = max(base, lo0), min(until, hi0)
        if a < b:
            inner = tuple(slice(p, p + s) for (p, _), s in zip(pads[1:], spatial[1:], strict=True))
            finish(a - lo0, b - lo0, summed[(slice(None), slice(a - base, b - base), *inner)],
                   count[(slice(a - base, b - base), *inner)])
        summed[:, :depth - n] = summed[:, n:]
        summed[:, depth - n:] = 0
        count[:depth - n] = count[n:]
        count[depth - n:] = 0
        base = until

    def patches(z: int, group: Sequence[tuple[int, ...]]) -> np.ndarray:
        return np.ascontiguousarray(np.stack([
            image[(slice(None), slice(z, z + w0), *(slice(s, s + w) for s, w in zip(pos, window[1:], strict=True)))]
            for pos in group]), np.float32)

    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="window") if workers > 1 else None
    add = _Adder()
    try:
        for z in starts[0]:
            flush(z)
            groups = [rest[i:i + batch] for i in range(0, len(rest), batch)]
            outputs = _in_order(pool, workers, [lambda g=g, z=z: run(patches(z, g)) for g in groups])
            for group, out in zip(groups, outputs, strict=True):
                if out.shape[0] != len(group) or tuple(out.shape[2:]) != tuple(window):
                    raise ValueError(f"the network returned {tuple(out.shape)} for a window batch of "
                                     f"{(len(group), image.shape[0], *window)}; a window model must keep the "
                                     "spatial size")
                if summed is None:
                    summed = np.zeros((out.shape[1], depth, *padded[1:]), np.float32)
                for pos, o in zip(group, out, strict=True):
                    region = (slice(z - base, z - base + w0),
                              *(slice(s, s + w) for s, w in zip(pos, window[1:], strict=True)))
                    add(summed, region, o, weights)
                    count[region] += weights
                done += len(group)
                if progress is not None:
                    progress(done, total)
    finally:
        add.close()
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
    flush(padded[0])
    return done
