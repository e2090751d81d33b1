"""One model on one series: the card's input, an ONNX Runtime run, the result object.

Segmentation: the series is loaded as a volume (slices ordered along the normal, rescaled),
prepared exactly as in training (:mod:`models.preprocess`), run in batches of slices, and the
probabilities are resampled back to the source grid and thresholded per class before they
become a SEG on the source slices.

Classification: every image of the series is prepared on its own (a radiograph series may hold
several views of one body part); the class probabilities are averaged over the images and become
a TID 1500 SR.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np
from pydicom.dataset import Dataset

from iods.card import ModelCard
from iods.results import build_classification_sr, build_segmentation
from models import preprocess
from models.runtime import LoadedModel
from models.volume import load_volume


def predict_segmentation(datasets: Sequence[Dataset], card: ModelCard, loaded: LoadedModel, *,
                         batch_size: int = 16, timings: dict[str, float] | None = None
                         ) -> tuple[list[Dataset], np.ndarray]:
    """(source slices in mask order, bool masks [slices, rows, cols, classes])."""
    timings = timings if timings is not None else {}
    pp = card.input.preprocessing
    t = time.perf_counter()
    vol = load_volume(datasets, rescale=pp.rescale)
    timings["decode"] = time.perf_counter() - t
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
    return vol.datasets, np.ascontiguousarray(masks.transpose(0, 2, 3, 1))


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
          segmentation_type: str = "BINARY") -> tuple[Dataset, dict[str, float]]:
    """Run ``loaded`` (the session of ``model_uid``) on a series; returns (result object, timings).

    ``segmentation_type``: BINARY or LABELMAP, how a segmentation result is encoded.
    """
    timings: dict[str, float] = {}
    if card.task.type == "segmentation":
        sources, masks = predict_segmentation(datasets, card, loaded, batch_size=batch_size, timings=timings)
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
