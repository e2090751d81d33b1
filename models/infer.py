"""One model on one series: the card's input, an ONNX Runtime run, the result object.

Segmentation: the series is loaded as a volume (slices ordered along the normal, rescaled),
prepared exactly as in training (:mod:`models.preprocess`), run in batches of slices, and the
probabilities are resampled back to the source grid and thresholded per class before they
become a SEG on the source slices. Cards that use the volumetric keys (orientation, sliding
window, size divisor, exclusive classes, logits) take the patient-space path instead: reoriented
to the card's axis codes, resampled to its spacing, run window by window and blended in bounded
memory (:mod:`models.window`), reduced to labels or masks and mapped back to the source grid
(docs/pipeline.md, "3D and patch-based models").

Classification: every image of the series is prepared on its own (a radiograph series may hold
several views of one body part); the class probabilities are averaged over the images and become
a TID 1500 SR.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from pydicom.dataset import Dataset

from iods.card import ModelCard
from iods.results import build_classification_sr, build_segmentation
from models import geometry, preprocess
from models.geometry import Reorientation, reorientation
from models.runtime import LoadedModel
from models.volume import Volume, VolumeError, load_volume
from models.window import channel_argmax, sliding_window


class ModelRunError(RuntimeError):
    """ONNX Runtime refused or failed a run; the message names the model, the input shape and,
    where the card can fix it, the key to set."""


def _runner(loaded: LoadedModel, card: ModelCard) -> Callable[[np.ndarray], np.ndarray]:
    spec = card.input

    def run(x: np.ndarray) -> np.ndarray:
        try:
            return loaded.run(x)
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidArgument types
            # ORT appends its own log line, with terminal colours, after the status message.
            reason = str(exc).split("\x1b")[0].strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            hint = ""
            if spec.size_divisor is None and spec.sliding_window is None:
                hint = (" (a network with pooling needs sizes that are multiples of its total stride: "
                        "set input.size_divisor or input.sliding_window in its card)")
            raise ModelRunError(f"model {card.identity.name!r} failed on an input of shape {list(x.shape)}: "
                                f"{reason}{hint}") from exc

    return run


class InputError(VolumeError):
    """The series does not fit the model's card (channels, slices, geometry): the job fails
    with this message and is not retried."""


def predict_segmentation(datasets: Sequence[Dataset], card: ModelCard, loaded: LoadedModel, *,
                         batch_size: int = 16, timings: dict[str, float] | None = None,
                         window_batch: int = 0, window_workers: int = 0) -> tuple[list[Dataset], np.ndarray]:
    """(source instances, result) for a segmentation card.

    The result is on the source grid, in the order ``build_segmentation`` takes (slices as
    sorted here, or the frames of one multi-frame instance in frame order): bool masks
    [planes, rows, cols, classes] for independent classes, or a label map [planes, rows, cols]
    (0 background, ``i`` the card's ``i``-th class) for exclusive ones.
    """
    timings = timings if timings is not None else {}
    pp = card.input.preprocessing
    t = time.perf_counter()
    vol = load_volume(datasets, rescale=pp.rescale)
    timings["decode"] = time.perf_counter() - t
    _check_fits(vol, card)
    if _classic(card):
        result = _predict_classic(vol, card, loaded, batch_size, timings)
    else:
        result = _predict_volume(vol, card, loaded, timings, _Windows(window_batch, window_workers))
    sources = vol.sources
    if len(sources) == 1 and len(vol.datasets) > 1:
        # One multi-frame image: planes were sorted by position, the SEG follows frame order.
        order = np.argsort(np.asarray(vol.frame_numbers))
        result = np.ascontiguousarray(result[order])
        return sources, result
    return vol.datasets, result


def _classic(card: ModelCard) -> bool:
    """Cards that use none of the volumetric keys run the original path (its speed and output
    are what the shipped 2D models were validated with)."""
    spec, task = card.input, card.task
    return (spec.sliding_window is None and not spec.orientation and spec.size_divisor is None
            and not task.exclusive and task.output == "probabilities")


def _check_fits(vol: Volume, card: ModelCard) -> None:
    """Refuse, with the reason, a volume the card's model cannot take."""
    spec = card.input
    samples = 1 if vol.pixels.ndim == 3 else vol.pixels.shape[-1]
    if samples != spec.channels:
        raise InputError(f"the series has {samples} sample(s) per pixel; model {card.identity.name!r} takes "
                         f"{spec.channels} channel(s)")
    if len(vol.datasets) < spec.min_slices:
        raise InputError(f"the series has {len(vol.datasets)} slice(s); model {card.identity.name!r} needs at "
                         f"least {spec.min_slices}")
    if spec.orientation and vol.directions is None:
        raise InputError(f"model {card.identity.name!r} is oriented {spec.orientation} but the series has no "
                         "patient geometry (ImageOrientationPatient and ImagePositionPatient on every slice)")
    if spec.layout == "3d" and spec.preprocessing.resample_spacing is not None and not vol.has_spacing:
        raise InputError(f"model {card.identity.name!r} resamples to {list(spec.preprocessing.resample_spacing)} mm "
                         "but the series has no PixelSpacing")


def _predict_classic(vol: Volume, card: ModelCard, loaded: LoadedModel, batch_size: int,
                     timings: dict[str, float]) -> np.ndarray:
    pp = card.input.preprocessing
    t = time.perf_counter()
    x = preprocess.prepare(vol.pixels, pp, photometric=vol.photometric,
                           value_range=preprocess.value_range(vol.datasets[0], rescale=pp.rescale),
                           layout=card.input.layout, spacing=vol.spacing)
    timings["preprocess"] = time.perf_counter() - t
    t = time.perf_counter()
    probs = loaded.run_batched(x, batch_size) if card.input.layout == "2d" else loaded.run(x)
    timings["model"] = time.perf_counter() - t
    t = time.perf_counter()
    thresholds = [c.threshold for c in card.task.classes]
    if card.input.layout == "2d":
        masks = preprocess.to_masks(probs, thresholds, size=vol.pixels.shape[1:3])  # [N, K, H, W]
    else:
        # [1, K, D, H, W] -> [D, K, H, W]
        masks = preprocess.to_masks(probs, thresholds, size=vol.pixels.shape[0:3])[0].transpose(1, 0, 2, 3)
    timings["postprocess"] = time.perf_counter() - t
    return np.ascontiguousarray(masks.transpose(0, 2, 3, 1))


@dataclass(frozen=True)
class _Windows:
    """How sliding windows are run: ``batch`` per Run() (0: automatic), ``workers`` Run() calls
    in flight (0: automatic)."""

    batch: int = 0
    workers: int = 0

    def batch_for(self, card_batch: int, loaded: LoadedModel) -> int:
        if self.batch:
            return self.batch
        # On the CPU two 96^3 windows per Run() cost 13% less per window than one (ONNX Runtime
        # keeps both cores busier through the small layers; docs/BENCHMARKS.md), for ~100 MB
        # more. On a GPU the card's batch is the publisher's statement of what fits.
        return card_batch if loaded.on_gpu else max(card_batch, CPU_WINDOW_BATCH)

    def workers_for(self, loaded: LoadedModel) -> int:
        return self.workers or 1


CPU_WINDOW_BATCH = 2


class _Collector:
    """Keeps the decision per voxel of blended outputs: labels (exclusive classes) or masks."""

    def __init__(self, card: ModelCard, shape: Sequence[int]) -> None:
        task = card.task
        self.exclusive = task.exclusive
        k = task.channels
        if self.exclusive:
            self.out = np.zeros(tuple(shape), np.uint8 if k <= 256 else np.uint16)
        else:
            self.out = np.zeros((len(task.classes), *shape), bool)
            t = np.asarray([c.threshold for c in task.classes], np.float64)
            if task.output == "logits":
                # sigmoid(x) > t  <=>  x > logit(t): the threshold moves, the outputs stay as they are.
                with np.errstate(divide="ignore"):
                    t = np.log(t) - np.log1p(-t)
            self.thresholds = t.astype(np.float32).reshape((-1,) + (1,) * len(shape))

    def __call__(self, lo: int, hi: int, summed: np.ndarray, weights: np.ndarray | None) -> None:
        if self.exclusive:
            # Weights are positive and the same for every class: the argmax needs no division.
            channel_argmax(summed, self.out[lo:hi])
        else:
            values = summed / weights if weights is not None else summed
            self.out[:, lo:hi] = values > self.thresholds


def _predict_volume(vol: Volume, card: ModelCard, loaded: LoadedModel, timings: dict[str, float],
                    windows: _Windows) -> np.ndarray:
    spec = card.input
    pp = spec.preprocessing
    t = time.perf_counter()
    value_range = preprocess.value_range(vol.datasets[0], rescale=pp.rescale)
    if spec.layout == "2d":
        result = _predict_slices(vol, card, loaded, value_range, timings, windows)
        timings["model_and_blend"] = time.perf_counter() - t
        return result
    x = preprocess.apply_intensity(vol.pixels, pp, photometric=vol.photometric, value_range=value_range, layout="3d")
    reo = reorientation(vol.directions, spec.orientation) if spec.orientation else Reorientation()
    x = reo.forward(x)
    grid = x.shape  # network axes at the source's resolution
    size = preprocess.target_size(grid, pp, reo.spacing(vol.spacing))
    if size is not None and tuple(size) != tuple(grid):
        x = preprocess.resize(x, size)
    x = np.ascontiguousarray(x, np.float32)[np.newaxis]  # [C=1, *spatial]
    timings["preprocess"] = time.perf_counter() - t
    t = time.perf_counter()
    out = _run_spatial(x, card, loaded, windows)
    timings["model_and_blend"] = time.perf_counter() - t
    t = time.perf_counter()
    # Back to the source grid: labels (or masks) by nearest neighbour, then the axes undone.
    out = geometry.nearest_resize(out, grid)
    out = np.ascontiguousarray(reo.inverse(out))
    if not card.task.exclusive:
        out = np.ascontiguousarray(np.moveaxis(out, 0, -1))  # [K, D, H, W] -> [D, H, W, K]
    timings["postprocess"] = time.perf_counter() - t
    return out


def _run_spatial(x: np.ndarray, card: ModelCard, loaded: LoadedModel, windows: _Windows) -> np.ndarray:
    """x [C, *spatial] on the network grid -> labels [*spatial] or masks [K, *spatial]."""
    spec = card.input
    spatial = x.shape[1:]
    collect = _Collector(card, spatial)
    sw = spec.sliding_window
    if sw is not None:
        sliding_window(x, sw.size, _runner(loaded, card), collect, overlap=sw.overlap, blending=sw.blending,
                       sigma_scale=sw.sigma_scale, batch=windows.batch_for(sw.batch, loaded),
                       workers=windows.workers_for(loaded))
        return collect.out
    pads = geometry.divisible_padding(spatial, spec.size_divisor) if spec.size_divisor else [(0, 0)] * len(spatial)
    if any(p != (0, 0) for p in pads):
        x = np.pad(x, [(0, 0), *pads])
    y = _runner(loaded, card)(np.ascontiguousarray(x[np.newaxis], np.float32))[0]
    inner = tuple(slice(a, a + n) for (a, _), n in zip(pads, spatial, strict=True))
    y = y[(slice(None), *inner)]
    collect(0, spatial[0], y, None)
    return collect.out


def _predict_slices(vol: Volume, card: ModelCard, loaded: LoadedModel, value_range: tuple[float, float],
                    timings: dict[str, float], windows: _Windows) -> np.ndarray:
    """2D models with the volumetric keys (window, exclusive classes, logits): slice by slice."""
    pp = card.input.preprocessing
    rows, cols = vol.pixels.shape[1:3]
    k = len(card.task.classes)
    exclusive = card.task.exclusive
    out = (np.zeros((len(vol.pixels), rows, cols), np.uint8 if card.task.channels <= 256 else np.uint16)
           if exclusive else np.zeros((len(vol.pixels), rows, cols, k), bool))
    for i, plane in enumerate(vol.pixels):
        x = preprocess.apply_intensity(plane, pp, photometric=vol.photometric, value_range=value_range, layout="2d")
        size = preprocess.target_size(x.shape, pp, vol.spacing[1:])
        if size is not None and tuple(size) != x.shape:
            x = preprocess.resize(x, size)
        y = _run_spatial(np.ascontiguousarray(x[np.newaxis], np.float32), card, loaded, windows)
        y = geometry.nearest_resize(y, (rows, cols))
        out[i] = y if exclusive else np.moveaxis(y, 0, -1)
    return out


def predict_classification(datasets: Sequence[Dataset], card: ModelCard, loaded: LoadedModel, *,
                           timings: dict[str, float] | None = None) -> np.ndarray:
    """Class probabilities [K], averaged over the series' images."""
    timings = timings if timings is not None else {}
    pp = card.input.preprocessing
    t = time.perf_counter()
    inputs = [preprocess.prepare_dataset(ds, pp, layout=card.input.layout) for ds in datasets if "PixelData" in ds]
    timings["preprocess"] = time.perf_counter() - t
    t = time.perf_counter()
    probs = np.concatenate([loaded.run(x) for x in inputs], axis=0)
    timings["model"] = time.perf_counter() - t
    return probs.mean(axis=0)


def infer(datasets: Sequence[Dataset], card: ModelCard, model_uid: str, loaded: LoadedModel, *,
          batch_size: int = 16, station_name: str = "MODELNODE",
          segmentation_type: str = "BINARY", window_batch: int = 0,
          window_workers: int = 0) -> tuple[Dataset, dict[str, float]]:
    """Run ``loaded`` (the session of ``model_uid``) on a series; returns (result object, timings).

    ``segmentation_type``: BINARY or LABELMAP, how a segmentation result is encoded.
    """
    timings: dict[str, float] = {}
    if card.task.type == "segmentation":
        sources, masks = predict_segmentation(datasets, card, loaded, batch_size=batch_size, timings=timings,
                                              window_batch=window_batch, window_workers=window_workers)
        t = time.perf_counter()
        result = build_segmentation(sources, masks, card, model_uid, station_name=station_name,
                                    segmentation_type=segmentation_type)
    else:
        probs = predict_classification(datasets, card, loaded, timings=timings)
        t = time.perf_counter()
        result = build_classification_sr(list(datasets), [float(p) for p in probs], card, model_uid,
                                         station_name=station_name)
    timings["build_result"] = time.perf_counter() - t
    return result, timings
