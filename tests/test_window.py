"""Sliding-window inference and orientation against MONAI's own implementation.

The engine (models/window.py) claims MONAI's window positions, importance maps and blended
outputs; these tests hold it to that with monai.inferers.sliding_window_inference on the same
inputs and the same "network", and check the bounded buffer hands on every plane exactly once.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from models import geometry
from models.window import importance_map, scan_starts, sliding_window

torch = pytest.importorskip("torch")
monai_utils = pytest.importorskip("monai.data.utils")
monai_inferers = pytest.importorskip("monai.inferers")

pytestmark = pytest.mark.timeout(120)


def _monai_starts(image, window, overlap):
    from monai.inferers.utils import _get_scan_interval

    interval = _get_scan_interval(image, window, len(image), (overlap,) * len(image))
    slices = monai_utils.dense_patch_slices(image, window, interval)
    return [sorted({s[d].start for s in slices}) for d in range(len(image))]


@pytest.mark.parametrize("image,window,overlap", [
    ((120, 512, 512), (96, 96, 96), 0.25),
    ((96, 100, 97), (96, 64, 32), 0.5),
    ((40, 40), (32, 16), 0.0),
    ((33, 70, 90), (32, 32, 32), 0.9),
    ((64, 64, 64), (64, 64, 64), 0.25),
])
def test_window_positions_are_monais(image, window, overlap):
    assert scan_starts(image, window, overlap) == _monai_starts(image, window, overlap)


@pytest.mark.parametrize("window,blending,sigma", [((96, 96, 96), "gaussian", 0.125), ((16, 40), "gaussian", 0.3),
                                                   ((8, 8, 8), "constant", 0.125)])
def test_importance_map_is_monais(window, blending, sigma):
    ours = importance_map(window, blending, sigma)
    theirs = monai_utils.compute_importance_map(window, mode=blending, sigma_scale=sigma).numpy()
    np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=1e-7)


def _network(x: np.ndarray) -> np.ndarray:
    """A deterministic stand-in for a network whose output depends on where a voxel sits in
    its window (as a real one's does), so blending weights matter: 3 output channels."""
    ramp = np.linspace(-1.0, 1.0, x.shape[2], dtype=np.float32).reshape((1, 1, -1) + (1,) * (x.ndim - 3))
    a = x[:, :1]
    return np.concatenate([a * 2 + ramp, np.sin(3 * a) - ramp, a * a], axis=1).astype(np.float32)


@pytest.mark.parametrize("shape,window,overlap,blending,batch,workers", [
    ((37, 50, 45), (16, 24, 32), 0.25, "gaussian", 1, 1),
    ((20, 30, 30), (16, 16, 16), 0.5, "constant", 3, 2),
    ((10, 30, 12), (16, 16, 16), 0.25, "gaussian", 4, 1),  # smaller than the window: padded
    ((50, 60), (32, 32), 0.25, "gaussian", 2, 3),
])
def test_blended_output_matches_monai(shape, window, overlap, blending, batch, workers):
    rng = np.random.default_rng(7)
    image = rng.normal(size=(1, *shape)).astype(np.float32)

    planes: list[tuple[int, int]] = []
    out = np.zeros((3, *shape), np.float32)

    def finish(lo, hi, summed, weights):
        planes.append((lo, hi))
        out[:, lo:hi] = summed / weights

    n = sliding_window(image, window, _network, finish, overlap=overlap, blending=blending, batch=batch,
                       workers=workers)

    def predictor(t):
        return torch.from_numpy(_network(t.numpy()))

    ref = monai_inferers.sliding_window_inference(torch.from_numpy(image[None]), window, batch, predictor,
                                                  overlap=overlap, mode=blending)[0].numpy()
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-5)
    # Every plane handed on exactly once, in order.
    assert planes[0][0] == 0 and planes[-1][1] == shape[0]
    assert all(a[1] == b[0] for a, b in itertools.pairwise(planes))
    padded = [max(s, w) for s, w in zip(shape, window, strict=True)]
    assert n == int(np.prod([len(s) for s in scan_starts(padded, window, overlap)]))


def test_buffer_is_one_window_deep():
    """The accumulator must not grow with the volume's depth (a 600-slice CT, 100 classes)."""
    seen = []

    def finish(lo, hi, summed, weights):
        seen.append(summed.base.shape if summed.base is not None else summed.shape)

    image = np.zeros((1, 200, 8, 8), np.float32)
    sliding_window(image, (16, 8, 8), lambda x: np.zeros((len(x), 5, 16, 8, 8), np.float32), finish)
    assert {s[:2] for s in seen} == {(5, 16)}


# ----------------------------------------------------------------------------------- geometry


def _directions(iop, normal_sign=1.0):
    row, col = np.asarray(iop[:3], float), np.asarray(iop[3:], float)
    n = np.cross(row, col) * normal_sign
    return np.stack([n, col, row])


def test_axial_ct_codes_and_ras():
    d = _directions([1, 0, 0, 0, 1, 0])
    assert geometry.axis_codes(d) == "SPL"
    reo = geometry.reorientation(d, "RAS")
    a = np.arange(2 * 3 * 4).reshape(2, 3, 4)  # [slice (S), row (P), col (L)]
    ras = reo.forward(a)
    assert ras.shape == (4, 3, 2)
    # RAS axis 0 increases to the Right: the last column (most Left) comes first.
    assert ras[0, 0, 0] == a[0, 2, 3]
    assert reo.spacing((5.0, 0.7, 0.8)) == (0.8, 0.7, 5.0)
    np.testing.assert_array_equal(reo.inverse(ras), a)
    assert geometry.reorientation(d, "SPL").identity


def test_every_orientation_round_trips():
    rng = np.random.default_rng(3)
    a = rng.integers(0, 100, size=(3, 4, 5))
    for perm in itertools.permutations(range(3)):
        for signs in itertools.product((1, -1), repeat=3):
            d = np.zeros((3, 3))
            for axis, (p, s) in enumerate(zip(perm, signs, strict=True)):
                d[axis, p] = s
            # A slightly oblique acquisition keeps its nearest axes.
            d = d + rng.normal(scale=0.05, size=(3, 3))
            for code in ("RAS", "LPS", "SPL", "IRA"):
                reo = geometry.reorientation(d, code)
                out = reo.forward(a)
                assert geometry.axis_codes(np.stack([d[p] * (-1 if f else 1) for p, f in zip(reo.perm, reo.flip, strict=True)])) == code
                np.testing.assert_array_equal(reo.inverse(out), a)


def test_degenerate_directions_refused():
    with pytest.raises(geometry.OrientationError):
        geometry.reorientation(np.array([[1, 0, 0], [1, 0, 0], [0, 0, 1.0]]), "RAS")


def test_nearest_resize_inverts_a_resample_grid():
    labels = np.arange(6, dtype=np.uint8).reshape(1, 6)
    up = geometry.nearest_resize(labels, (1, 12))
    np.testing.assert_array_equal(up[0], np.repeat(np.arange(6), 2))
    assert up.dtype == np.uint8
    assert geometry.divisible_padding((15, 16, 17), (8, 8, 8)) == [(0, 1), (0, 0), (3, 4)]


@pytest.mark.parametrize("k", [2, 8, 101])
def test_channel_argmax_is_numpys_with_its_ties(k):
    from models.window import channel_argmax

    rng = np.random.default_rng(k)
    summed = rng.integers(0, 4, size=(k, 5, 6, 7)).astype(np.float32)  # many ties
    out = np.empty((5, 6, 7), np.uint8)
    channel_argmax(summed, out)
    np.testing.assert_array_equal(out, summed.argmax(axis=0))
