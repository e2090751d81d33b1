"""Train, evaluate, export and pack the reference models (``python -m models.training.train``).

Run by ``scripts/train_reference``. Three models: the 2D lung U-Net (``lung``), the body-part
classifier (``bodypart``) and the patch-trained 3D chest U-Net with exclusive classes
(``chest3d``). Data come from ``models.training.phantoms`` (fixed seed lists) and pass through
``models.preprocess`` with the preprocessing of the model's own card, the same functions the
node runs before inference (for the 3D model also the node's reorientation to RAS and its
resampling to the card's spacing). Figures are measured on held-out phantoms with the exported
ONNX graph under ONNX Runtime (what ships, not the PyTorch module), the 3D model's through the
node's own ``models.infer.predict_segmentation`` on written DICOM series; they are written into
the cards, and the cards and graphs are packed into model objects in ``models/reference``.

Reproducibility: all seeds are fixed, torch uses 2 threads and deterministic algorithms, and the
data generators are pure functions of their seeds, so a rerun on the same platform gives the
same weights; across CPUs the figures agree within noise.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import multiprocessing
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pydicom
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from iods.card import ModelCard, Preprocessing, load_card, parse_card
from iods.uids import derived_uid
from models.preprocess import (
    apply_intensity,
    prepare,
    prepare_dataset,
    resize,
    target_size,
    to_masks,
)
from models.training import phantoms
from models.training.degrade import with_degraded_copies
from models.training.networks import (
    BODY_PART_CLASSES,
    CHEST3D_CLASSES,
    LUNG_CLASSES,
    BodyPartNet,
    UNet2D,
    UNet3D,
    WithActivation,
    parameter_count,
)

ROOT = Path(__file__).resolve().parents[2]  # the repository (this file is models/training/train.py)
REFERENCE_DIR = ROOT / "models" / "reference"
BUILD_DIR = ROOT / "build" / "reference"
SEED = 20261121
THREADS = 2
OPSET = 17
CARD_DATE = "2026-11-21"
TRAINING_COMMAND = "scripts/train_reference (python -m models.training.train)"

# Seed lists. Tests use seeds from 9000 (CT) and 90000 (radiographs) up, never these.
CT_TRAIN = range(1000, 1072)
CT_HELDOUT = range(5000, 5016)
XR_TRAIN = range(0, 360)  # per body part
XR_HELDOUT = range(50000, 50100)  # per body part
# 1.1.0: trained with degraded copies (models/training/degrade.py); 1.0.0 on clean phantoms only.
BODY_VERSION = "1.1.0"

# The 3D chest model: its own seeds (none shared with the lists above or the tests), and per
# held-out scan the in-plane size and slice count (None: the generator's 20-60), so that both
# 256x256 and 512x512 grids and thick and thin slices are measured.
CHEST3D_TRAIN = range(3000, 3040)
CHEST3D_HELDOUT: tuple[tuple[int, int, int | None], ...] = (
    (6000, 256, None), (6001, 256, 90), (6002, 256, 160), (6003, 256, None),
    (6004, 512, None), (6005, 512, 120), (6006, 512, None), (6007, 512, 200),
)

LUNG_WIDTHS = (12, 24, 48, 96)
BODY_WIDTHS = (16, 32, 48, 64, 96)
CHEST3D_WIDTHS = (8, 16, 32, 64)
INPUT_SIZE = (128, 128)
# Network grid of the 3D model, in its (RAS) axis order: mm per voxel and the training patch,
# which is also the card's sliding window.
CHEST3D_SPACING = (2.5, 2.5, 2.5)
CHEST3D_PATCH = (64, 64, 64)


@dataclass(frozen=True)
class Schedule:
    unet_steps: int = 420
    unet_batch: int = 16
    cls_steps: int = 360
    cls_batch: int = 32
    chest_steps: int = 900
    chest_batch: int = 2


QUICK = Schedule(unet_steps=30, cls_steps=30, chest_steps=8)


# --------------------------------------------------------------------------- cards


def _code(value: str, meaning: str) -> dict[str, str]:
    return {"value": value, "scheme": "SCT", "meaning": meaning}


ANATOMICAL_STRUCTURE = _code("91723000", "Anatomical Structure")
MORPHOLOGICALLY_ALTERED = _code("49755003", "Morphologically Altered Structure")
LUNG = _code("39607008", "Lung")
CHEST = _code("816094009", "Chest")
NODULE = _code("27925004", "Nodule")
BODY_PART_CODES = {
    "head": _code("69536005", "Head"),
    "chest": CHEST,
    "abdomen": _code("818981001", "Abdomen"),
    "pelvis": _code("816092008", "Pelvis"),
    "limb": _code("66019005", "Extremity"),
}


def model_uid(name: str, version: str) -> str:
    """Fixed UID per name and version, so retraining replaces rather than forks a model."""
    return derived_uid("modelnode reference model", name, version)


def lung_card_dict(performance: dict[str, float] | None = None) -> dict[str, Any]:
    return {
        "schema": "modelnode.card/1",
        "identity": {
            "name": "modelnode-lung-unet",
            "version": "1.0.0",
            "uid": model_uid("lung_unet", "1.0.0"),
            "manufacturer": "modelnode",
            "authors": ["modelnode reference models"],
            "licence": "Apache-2.0",
            "intended_use": "Research and testing only: lung field and nodule segmentation on chest CT, slice by slice",
            "created": CARD_DATE,
            "description": (
                f"Compact 2D U-Net (widths {list(LUNG_WIDTHS)}, BatchNorm, transposed-convolution upsampling) "
                "trained on synthetic chest CT phantoms (models/phantoms.py). Sigmoid outputs: lung fields "
                "(vessels and nodules inside them included) and nodules. Not validated on patient data."
            ),
        },
        "target": {
            "modalities": ["CT"],
            "body_parts": ["CHEST", "LUNG"],
            "anatomy": [LUNG, CHEST],
            "findings": [NODULE],
        },
        "task": {
            "type": "segmentation",
            "activation": "sigmoid",
            "classes": [
                {"label": "lung", "category": ANATOMICAL_STRUCTURE, "type": LUNG, "threshold": 0.5},
                {"label": "nodule", "category": MORPHOLOGICALLY_ALTERED, "type": NODULE, "threshold": 0.5},
            ],
        },
        "input": {
            "layout": "2d",
            "channels": 1,
            "size": list(INPUT_SIZE),
            "dtype": "float32",
            "min_slices": 1,
            "photometric": ["MONOCHROME2"],
            "preprocessing": {
                "rescale": True,
                "window": {"center": -350.0, "width": 1500.0},
                "normalize": "none",
                "resample_size": list(INPUT_SIZE),
                "invert_monochrome1": True,
            },
        },
        "provenance": {
            "training_data": (
                f"{len(CT_TRAIN)} synthetic chest CT volumes ({phantoms.GENERATOR_VERSION}, seeds "
                f"{CT_TRAIN.start}-{CT_TRAIN.stop - 1}, 256x256, 20-60 slices, 1-3 nodules each); held-out: "
                f"{len(CT_HELDOUT)} volumes, seeds {CT_HELDOUT.start}-{CT_HELDOUT.stop - 1}, 3 nodules requested each"
            ),
            "performance": dict(performance or {}),
            "training_command": TRAINING_COMMAND,
            "seed": SEED,
        },
    }


def body_card_dict(performance: dict[str, float] | None = None) -> dict[str, Any]:
    return {
        "schema": "modelnode.card/1",
        "identity": {
            "name": "modelnode-bodypart-cnn",
            "version": BODY_VERSION,
            "uid": model_uid("bodypart_cnn", BODY_VERSION),
            "manufacturer": "modelnode",
            "authors": ["modelnode reference models"],
            "licence": "Apache-2.0",
            "intended_use": "Research and testing only: body part of a projection radiograph (head, chest, abdomen, pelvis, limb)",
            "created": CARD_DATE,
            "description": (
                f"Small strided CNN (widths {list(BODY_WIDTHS)}, BatchNorm, global average pooling) trained on "
                "projections of synthetic 3D phantoms (models/training/phantoms.py), each also as a degraded copy "
                "(gamma, contrast, blur, noise, collimation, burnt-in marker: models/training/degrade.py). "
                "Softmax over five body parts."
            ),
        },
        "target": {
            "modalities": ["CR", "DX"],
            "body_parts": ["HEAD", "SKULL", "CHEST", "ABDOMEN", "PELVIS", "EXTREMITY", "LOWERLEG", "FOREARM", "KNEE"],
            "anatomy": [BODY_PART_CODES[k] for k in BODY_PART_CLASSES],
        },
        "task": {
            "type": "classification",
            "activation": "softmax",
            "classes": [
                {"label": k, "category": ANATOMICAL_STRUCTURE, "type": BODY_PART_CODES[k], "threshold": 0.5}
                for k in BODY_PART_CLASSES
            ],
        },
        "input": {
            "layout": "2d",
            "channels": 1,
            "size": list(INPUT_SIZE),
            "dtype": "float32",
            "min_slices": 1,
            "photometric": ["MONOCHROME2", "MONOCHROME1"],
            "preprocessing": {
                "rescale": True,
                "normalize": "minmax",
                "resample_size": list(INPUT_SIZE),
                "invert_monochrome1": True,
            },
        },
        "provenance": {
            "training_data": (
                f"{len(XR_TRAIN) * len(BODY_PART_CLASSES)} synthetic radiographs ({phantoms.GENERATOR_VERSION}, "
                f"seeds {XR_TRAIN.start}-{XR_TRAIN.stop - 1} per body part) and a degraded copy of each; held-out: "
                f"{len(XR_HELDOUT) * len(BODY_PART_CLASSES)} radiographs, seeds {XR_HELDOUT.start}-{XR_HELDOUT.stop - 1}"
            ),
            "performance": dict(performance or {}),
            "training_command": TRAINING_COMMAND,
            "seed": SEED,
        },
    }


LEFT_LUNG = _code("44029006", "Left lung")
RIGHT_LUNG = _code("3341006", "Right lung")
HEART = _code("80891009", "Heart")
CHEST3D_CODES = {"left_lung": LEFT_LUNG, "right_lung": RIGHT_LUNG, "heart": HEART}


def chest3d_card_dict(performance: dict[str, float] | None = None) -> dict[str, Any]:
    widths = list(CHEST3D_WIDTHS)
    return {
        "schema": "modelnode.card/1",
        "identity": {
            "name": "modelnode-thorax-unet3d",
            "version": "1.0.0",
            "uid": model_uid("thorax_unet3d", "1.0.0"),
            "manufacturer": "modelnode",
            "authors": ["modelnode reference models"],
            "licence": "Apache-2.0",
            "intended_use": ("Research and testing only: left lung, right lung and heart on chest CT, "
                             "as one volume (3D sliding window)"),
            "created": CARD_DATE,
            "description": (
                f"Small 3D U-Net (widths {widths}, BatchNorm, transposed-convolution upsampling) trained on "
                f"random {CHEST3D_PATCH[0]}^3 patches of synthetic chest CT phantoms (models/training/phantoms.py) "
                f"reoriented to RAS and resampled to {CHEST3D_SPACING[0]:g} mm. Exclusive classes (background, "
                "left lung, right lung, heart); the graph outputs logits. Not validated on patient data."
            ),
        },
        "target": {
            "modalities": ["CT"],
            "body_parts": ["CHEST"],
            "anatomy": [LUNG, CHEST],
        },
        "task": {
            "type": "segmentation",
            "exclusive": True,
            "output": "logits",
            "activation": "softmax",
            "classes": [
                {"label": name.replace("_", " "), "category": ANATOMICAL_STRUCTURE, "type": CHEST3D_CODES[name]}
                for name in CHEST3D_CLASSES
            ],
        },
        "input": {
            "layout": "3d",
            "channels": 1,
            "size": [0, 0, 0],  # dynamic: the sliding window sets what the graph gets
            "dtype": "float32",
            "min_slices": 8,
            "photometric": ["MONOCHROME2"],
            "orientation": "RAS",
            "size_divisor": 2 ** (len(CHEST3D_WIDTHS) - 1),
            "preprocessing": {
                "rescale": True,
                "window": {"center": -350.0, "width": 1500.0},
                "normalize": "none",
                "resample_spacing": list(CHEST3D_SPACING),
                "invert_monochrome1": True,
            },
            "sliding_window": {"size": list(CHEST3D_PATCH), "overlap": 0.25, "blending": "gaussian", "batch": 1},
        },
        "provenance": {
            "training_data": (
                f"{len(CHEST3D_TRAIN)} synthetic chest CT volumes ({phantoms.GENERATOR_VERSION}, seeds "
                f"{CHEST3D_TRAIN.start}-{CHEST3D_TRAIN.stop - 1}; 256x256 or 512x512, 20-200 slices of 1.5-7.5 mm), "
                f"labels from phantoms.ct_labels; held-out: {len(CHEST3D_HELDOUT)} volumes, seeds "
                f"{CHEST3D_HELDOUT[0][0]}-{CHEST3D_HELDOUT[-1][0]}, half 256x256 and half 512x512, "
                "scored on the source grid"
            ),
            "performance": dict(performance or {}),
            "training_command": TRAINING_COMMAND + " --only chest3d",
            "seed": SEED,
        },
    }


def chest3d_preprocessing() -> Preprocessing:
    return parse_card(chest3d_card_dict()).input.preprocessing


def lung_preprocessing() -> Preprocessing:
    return parse_card(lung_card_dict()).input.preprocessing


def body_preprocessing() -> Preprocessing:
    return parse_card(body_card_dict()).input.preprocessing


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return repr(v)  # shortest round-trip form; 1e-06 is valid TOML
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)  # a JSON string is a valid TOML basic string
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{k} = {_toml_value(x)}" for k, x in v.items()) + " }"
    raise TypeError(f"cannot write {type(v).__name__} to TOML")


def to_toml(card: dict[str, Any], header: str = "") -> str:
    """Write a card mapping as readable TOML (tables per section, inline tables for codes)."""
    lines = [f"# {line}" if line else "#" for line in header.splitlines()]
    lines += [f"schema = {_toml_value(card['schema'])}", ""]
    for section in ("identity", "target", "task", "input", "provenance"):
        data = card[section]
        lines.append(f"[{section}]")
        nested: list[tuple[str, Any]] = []
        for key, value in data.items():
            if isinstance(value, dict) and key in ("preprocessing", "performance", "sliding_window"):
                nested.append((key, value))
            elif key == "classes":
                nested.append((key, value))
            else:
                lines.append(f"{key} = {_toml_value(value)}")
        for key, value in nested:
            if key == "classes":
                for item in value:
                    lines += ["", f"[[{section}.classes]]"]
                    lines += [f"{k} = {_toml_value(v)}" for k, v in item.items()]
            else:
                lines += ["", f"[{section}.{key}]"]
                lines += [f"{k} = {_toml_value(v)}" for k, v in value.items()]
        lines.append("")
    return "\n".join(lines)


# --------------------------------------------------------------------------- data


def _ct_item(seed: int, nodules: int | None) -> tuple[np.ndarray, np.ndarray]:
    """One phantom volume -> (inputs float16 [n, 1, h, w], soft targets float16 [n, 2, h, w])."""
    pp = lung_preprocessing()
    vol = phantoms.ct_chest_volume(seed, nodules=nodules)
    # The stored-then-rescaled CT value is exactly the HU the generator made (tested).
    x = prepare(vol.hu.astype(np.float32), pp)
    masks = np.stack([vol.lung_mask, vol.nodule_mask], axis=1).astype(np.float32)
    # Area fractions at the model's resolution: the same linear resampling the outputs go back through.
    y = resize(masks, pp.resample_size or INPUT_SIZE)
    return x.astype(np.float16), y.astype(np.float16)


def _xr_item(seed: int, label: str) -> np.ndarray:
    pp = body_preprocessing()
    r = phantoms.radiograph(seed, label)
    x = prepare(r.image, pp, photometric=r.photometric, value_range=(0.0, float((1 << r.bits_stored) - 1)))
    return x[0].astype(np.float16)


def _parallel(fn: Callable[..., Any], args: Sequence[tuple], desc: str, workers: int) -> list[Any]:
    """Map ``fn`` over ``args`` in order, in worker processes (spawned: no forked torch state)."""
    if workers <= 1:
        return [fn(*a) for a in tqdm(args, desc=desc, unit="item", leave=False)]
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
        futures = [pool.submit(fn, *a) for a in args]
        return [f.result() for f in tqdm(futures, desc=desc, unit="item", leave=False)]


def ct_dataset(seeds: Iterable[int], nodules: Callable[[int], int | None], workers: int) -> tuple[np.ndarray, np.ndarray]:
    items = _parallel(_ct_item, [(s, nodules(s)) for s in seeds], "CT phantoms", workers)
    return np.concatenate([x for x, _ in items]), np.concatenate([y for _, y in items])


def xr_dataset(seeds: Iterable[int], workers: int) -> tuple[np.ndarray, np.ndarray]:
    args = [(s, label) for s in seeds for label in BODY_PART_CLASSES]
    xs = _parallel(_xr_item, args, "radiographs", workers)
    labels = np.array([BODY_PART_CLASSES.index(label) for _, label in args], np.int64)
    return np.stack(xs), labels


# The 3D model sees what the node makes of a series: the acquisition grid [z, y, x] (LPS:
# +x to the patient's left, +y posterior, index 0 most inferior) reoriented to RAS [x, y, z]
# and resampled to the card's spacing (models.infer._predict_volume, models.geometry).


def lps_to_ras(a: np.ndarray) -> np.ndarray:
    """[..., z, y, x] of an axial LPS series -> [..., x, y, z] in RAS: transpose, flip x and y."""
    return np.flip(np.swapaxes(a, -1, -3), axis=(-3, -2))


def ras_to_lps(a: np.ndarray) -> np.ndarray:
    """Inverse of :func:`lps_to_ras`."""
    return np.swapaxes(np.flip(a, axis=(-3, -2)), -1, -3)


def ras_spacing(spacing_zyx: Sequence[float]) -> tuple[float, float, float]:
    return float(spacing_zyx[2]), float(spacing_zyx[1]), float(spacing_zyx[0])


def chest3d_input(hu: np.ndarray, spacing_zyx: Sequence[float], pp: Preprocessing) -> np.ndarray:
    """HU [z, y, x] -> the network grid float32 [X, Y, Z]: intensity, RAS, resampling (node order)."""
    x = lps_to_ras(apply_intensity(hu, pp, layout="3d"))
    size = target_size(x.shape, pp, ras_spacing(spacing_zyx))
    return resize(x, size) if size is not None and tuple(size) != x.shape else np.ascontiguousarray(x, np.float32)


def chest3d_targets(labels: np.ndarray, size: Sequence[int]) -> np.ndarray:
    """Label map [z, y, x] -> uint8 [X, Y, Z] on the network grid: each class's volume fraction
    resampled as the image is, then the largest (so thin slices and 512 grids average down).

    Resampled in the source's axis order and reoriented after, which is the same (the filter
    is symmetric, so flips commute with it) and 5x faster on contiguous arrays.
    """
    fractions = []
    for c in range(1, 1 + len(CHEST3D_CLASSES)):
        # In-plane first (it shrinks), then along z with z as the last, contiguous axis.
        f = resize((labels == c).astype(np.float32), (size[1], size[0]))
        f = resize(np.ascontiguousarray(f.transpose(1, 2, 0)), (size[2],)).transpose(2, 0, 1)
        fractions.append(f)
    # The weights of each output voxel sum to one, so the background is what the classes leave.
    fractions.insert(0, 1.0 - np.sum(fractions, axis=0))
    return np.ascontiguousarray(lps_to_ras(np.argmax(np.stack(fractions), axis=0).astype(np.uint8)))


def chest3d_acquisition(seed: int) -> tuple[int, int | None]:
    """(in-plane size, slices or None for the generator's 20-60) of training phantom ``seed``:
    a quarter on the 512 grid, 40% with the generator's slices (4.5-7.5 mm, often partial
    coverage), the rest with 60-200 slices (1.5-5 mm)."""
    rng = np.random.default_rng([seed, 0x3D])
    size = 512 if rng.random() < 0.25 else 256
    slices = None if rng.random() < 0.4 else int(rng.integers(60, 201))
    return size, slices


def _chest3d_item(seed: int, size: int, slices: int | None) -> tuple[np.ndarray, np.ndarray]:
    pp = chest3d_preprocessing()
    vol = phantoms.ct_chest_volume(seed, size=size, slices=slices)
    x = chest3d_input(vol.hu.astype(np.float32), vol.spacing, pp)
    y = chest3d_targets(phantoms.ct_labels(seed, size=size, slices=slices), x.shape)
    return x.astype(np.float16), y


def chest3d_dataset(seeds: Iterable[int], workers: int) -> list[tuple[np.ndarray, np.ndarray]]:
    return _parallel(_chest3d_item, [(s, *chest3d_acquisition(s)) for s in seeds], "3D chest phantoms", workers)


# --------------------------------------------------------------------------- training


def _setup_torch() -> None:
    torch.manual_seed(SEED)
    np.random.seed(SEED % 2**32)
    torch.set_num_threads(THREADS)
    torch.use_deterministic_algorithms(True, warn_only=True)


def _dice_loss(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """Soft Dice per class over the whole batch (stable for the rare nodule class), weighted sum."""
    p = torch.sigmoid(logits)
    dims = (0, 2, 3)
    inter = (p * target).sum(dims)
    denom = p.sum(dims) + target.sum(dims)
    return ((1 - (2 * inter + eps) / (denom + eps)) * weight).sum()


def train_unet(x: np.ndarray, y: np.ndarray, sched: Schedule) -> UNet2D:
    # Reseeded per model, so training one model alone (--only) gives the same weights.
    torch.manual_seed(SEED)
    g = torch.Generator().manual_seed(SEED)
    net = UNet2D(1, len(LUNG_CLASSES), LUNG_WIDTHS)
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3, weight_decay=1e-4)
    lr = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=sched.unet_steps, pct_start=0.15)
    # Nodules are a tiny fraction of voxels: slices showing one are drawn six times as often,
    # their positives weigh more in the BCE and their Dice term counts double.
    has_nodule = (y[:, 1].reshape(len(y), -1).max(axis=1) > 0.25).astype(np.float64)
    weights = torch.from_numpy(1.0 + 5.0 * has_nodule)
    pos_weight = torch.tensor([1.0, 10.0]).view(1, 2, 1, 1)
    class_weight = torch.tensor([1.0, 2.0])
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    net.train()
    bar = tqdm(range(sched.unet_steps), desc="U-Net", unit="step")
    for _ in bar:
        idx = torch.multinomial(weights, sched.unet_batch, replacement=True, generator=g)
        xb, yb = xt[idx].float(), yt[idx].float()
        logits = net(xb)
        loss = F.binary_cross_entropy_with_logits(logits, yb, pos_weight=pos_weight) + \
            _dice_loss(logits, yb, class_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        lr.step()
        bar.set_postfix(loss=f"{loss.item():.4f}")
    return net.eval()


def train_classifier(x: np.ndarray, labels: np.ndarray, sched: Schedule) -> BodyPartNet:
    torch.manual_seed(SEED + 1)
    g = torch.Generator().manual_seed(SEED + 1)
    net = BodyPartNet(1, len(BODY_PART_CLASSES), BODY_WIDTHS)
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-4)
    lr = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=sched.cls_steps, pct_start=0.15)
    xt, yt = torch.from_numpy(x), torch.from_numpy(labels)
    net.train()
    bar = tqdm(range(sched.cls_steps), desc="body-part CNN", unit="step")
    for _ in bar:
        idx = torch.randint(0, len(xt), (sched.cls_batch,), generator=g)
        xb = xt[idx].float()
        # Mirror half the batch: left/right mirrored radiographs are common (AP vs PA, markers).
        flip = torch.rand(len(idx), generator=g) < 0.5
        xb[flip] = xb[flip].flip(-1)
        loss = F.cross_entropy(net(xb), yt[idx], label_smoothing=0.05)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        lr.step()
        bar.set_postfix(loss=f"{loss.item():.4f}")
    return net.eval()


def _patch_starts(shape: Sequence[int], patch: Sequence[int], centre: Sequence[int] | None,
                  rng: np.random.Generator) -> list[int]:
    """Start of a patch around ``centre`` (random if None). Where the volume is smaller than the
    patch the start is negative and the rest is zero padding, as the node pads such volumes."""
    starts = []
    for axis, (n, p) in enumerate(zip(shape, patch, strict=True)):
        lo, hi = min(0, n - p), max(0, n - p)
        start = int(rng.integers(lo, hi + 1)) if centre is None else centre[axis] - p // 2
        starts.append(min(max(start, lo), hi))
    return starts


def _crop(a: np.ndarray, starts: Sequence[int], patch: Sequence[int]) -> np.ndarray:
    src = tuple(slice(max(s, 0), min(s + p, n)) for s, p, n in zip(starts, patch, a.shape, strict=True))
    out = np.zeros(tuple(patch), a.dtype)
    dst = tuple(slice(sl.start - s, sl.stop - s) for sl, s in zip(src, starts, strict=True))
    out[dst] = a[src]
    return out


def _softmax_dice_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """Soft Dice of the foreground classes over the whole batch, averaged over classes."""
    p = torch.softmax(logits, dim=1)[:, 1:]
    onehot = F.one_hot(target, logits.shape[1]).permute(0, 4, 1, 2, 3)[:, 1:].to(p.dtype)
    dims = (0, 2, 3, 4)
    inter = (p * onehot).sum(dims)
    denom = p.sum(dims) + onehot.sum(dims)
    return (1 - (2 * inter + eps) / (denom + eps)).mean()


def train_chest3d(items: Sequence[tuple[np.ndarray, np.ndarray]], sched: Schedule) -> UNet3D:
    """Random patches of the volumes on the network grid; cross-entropy + Dice."""
    torch.manual_seed(SEED + 2)
    rng = np.random.default_rng(SEED + 2)
    net = UNet3D(1, 1 + len(CHEST3D_CLASSES), CHEST3D_WIDTHS)
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3, weight_decay=1e-4)
    lr = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=sched.chest_steps, pct_start=0.15)
    # Foreground voxels to centre patches on (a subsample: any of them will do).
    foreground = []
    for _, y in items:
        fg = np.argwhere(y > 0)
        foreground.append(fg[rng.permutation(len(fg))[:20000]] if len(fg) else fg)
    net.train()
    # torch's deterministic mode sends 3D convolutions on the CPU to a slow reference kernel
    # (7.3 s instead of 0.75 s per step of two 64^3 patches on 2 threads). The oneDNN kernels
    # are deterministic for a fixed thread count anyway (two runs gave identical weights), so
    # the mode is off while this model trains.
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(False)
    try:
        _chest3d_steps(net, items, foreground, opt, lr, rng, sched)
    finally:
        torch.use_deterministic_algorithms(deterministic, warn_only=torch.is_deterministic_algorithms_warn_only_enabled())
    return net.eval()


def _chest3d_steps(net: UNet3D, items: Sequence[tuple[np.ndarray, np.ndarray]], foreground: list[np.ndarray],
                   opt: torch.optim.Optimizer, lr: torch.optim.lr_scheduler.LRScheduler, rng: np.random.Generator,
                   sched: Schedule) -> None:
    patch = CHEST3D_PATCH
    bar = tqdm(range(sched.chest_steps), desc="3D U-Net", unit="step")
    for _ in bar:
        xs, ys = [], []
        for _ in range(sched.chest_batch):
            i = int(rng.integers(len(items)))
            x, y = items[i]
            # Two thirds of the patches centre on an organ, the rest anywhere: the windows at
            # inference also cover air, table and abdomen, which must come out as background.
            centre = None
            if len(foreground[i]) and rng.random() < 2 / 3:
                centre = foreground[i][int(rng.integers(len(foreground[i])))] + rng.integers(-16, 17, 3)
            starts = _patch_starts(x.shape, patch, centre, rng)
            xs.append(_crop(x, starts, patch))
            ys.append(_crop(y, starts, patch))
        xb = torch.from_numpy(np.stack(xs)[:, np.newaxis].astype(np.float32))
        yb = torch.from_numpy(np.stack(ys).astype(np.int64))
        logits = net(xb)
        loss = F.cross_entropy(logits, yb) + _softmax_dice_loss(logits, yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        lr.step()
        bar.set_postfix(loss=f"{loss.item():.4f}")


# --------------------------------------------------------------------------- export


def export_onnx(net: nn.Module, path: str | Path, *, task: str, size: tuple[int, int] = INPUT_SIZE) -> Path:
    """Export with the activation inside the graph, dynamic batch and spatial axes, opset 17."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    wrapped = WithActivation(net, "sigmoid" if task == "segmentation" else "softmax").eval()
    dummy = torch.zeros(1, 1, *size)
    spatial = {0: "N", 2: "H", 3: "W"}
    out_axes = spatial if task == "segmentation" else {0: "N"}
    with torch.no_grad(), warnings.catch_warnings():
        # The TorchScript exporter is deprecated but exact here; silence its notice, not errors.
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            wrapped, (dummy,), str(path), dynamo=False, opset_version=OPSET, input_names=["image"],
            output_names=["probabilities"], dynamic_axes={"image": spatial, "probabilities": out_axes},
            do_constant_folding=True,
        )
    return path


def export_logits_onnx(net: nn.Module, path: str | Path, size: Sequence[int]) -> Path:
    """Export a 3D network as it is (logits out), dynamic batch and spatial axes, opset 17."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    axes = {0: "N", 2: "X", 3: "Y", 4: "Z"}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            net.eval(), (torch.zeros(1, 1, *size),), str(path), dynamo=False, opset_version=OPSET,
            input_names=["image"], output_names=["logits"], dynamic_axes={"image": axes, "logits": axes},
            do_constant_folding=True,
        )
    return path


def logits_parity(net: nn.Module, session: ort.InferenceSession, x: np.ndarray) -> float:
    """Max |ONNX Runtime - PyTorch| over the logits for inputs ``x``."""
    with torch.no_grad():
        ref = net.eval()(torch.from_numpy(np.asarray(x, np.float32))).numpy()
    return float(np.abs(run_onnx(session, x, batch=len(x)) - ref).max())


def onnx_session(path: str | Path) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = THREADS
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def run_onnx(session: ort.InferenceSession, x: np.ndarray, batch: int = 32) -> np.ndarray:
    name = session.get_inputs()[0].name
    outs = [session.run(None, {name: np.ascontiguousarray(x[i:i + batch], np.float32)})[0] for i in range(0, len(x), batch)]
    return np.concatenate(outs)


def parity(net: nn.Module, session: ort.InferenceSession, x: np.ndarray, task: str) -> float:
    """Max |ONNX Runtime - PyTorch| over the probabilities for inputs ``x``."""
    wrapped = WithActivation(net, "sigmoid" if task == "segmentation" else "softmax").eval()
    with torch.no_grad():
        ref = wrapped(torch.from_numpy(np.asarray(x, np.float32))).numpy()
    return float(np.abs(run_onnx(session, x) - ref).max())


# --------------------------------------------------------------------------- evaluation


def dice(a: np.ndarray, b: np.ndarray) -> float:
    s = int(a.sum()) + int(b.sum())
    return 1.0 if s == 0 else 2.0 * int(np.logical_and(a, b).sum()) / s


def components(mask: np.ndarray) -> list[np.ndarray]:
    """6-connected components of a (small) 3D mask as arrays of voxel indices."""
    left = {tuple(v) for v in np.argwhere(mask)}
    out = []
    while left:
        seed = left.pop()
        stack, comp = [seed], [seed]
        while stack:
            z, y, x = stack.pop()
            for n in ((z - 1, y, x), (z + 1, y, x), (z, y - 1, x), (z, y + 1, x), (z, y, x - 1), (z, y, x + 1)):
                if n in left:
                    left.remove(n)
                    stack.append(n)
                    comp.append(n)
        out.append(np.array(comp))
    return out


def segment_volume(session: ort.InferenceSession, card: ModelCard, hu: np.ndarray) -> np.ndarray:
    """HU volume [z, y, x] -> bool masks [z, K, y, x], exactly as the node will do it."""
    pp = card.input.preprocessing
    probs = run_onnx(session, prepare(hu.astype(np.float32), pp), batch=16)
    return to_masks(probs, [c.threshold for c in card.task.classes], size=hu.shape[1:])


def evaluate_unet(session: ort.InferenceSession, card: ModelCard, seeds: Iterable[int]) -> dict[str, Any]:
    dices, nodule_dices = [], []
    found = total = false_pos = 0
    for seed in tqdm(list(seeds), desc="held-out CT", unit="scan", leave=False):
        params = phantoms.ct_chest_params(seed, nodules=3)
        vol = phantoms.ct_chest_volume(seed, nodules=3)
        masks = segment_volume(session, card, vol.hu)
        dices.append(dice(masks[:, 0], vol.lung_mask))
        if vol.nodule_mask.any():
            nodule_dices.append(dice(masks[:, 1], vol.nodule_mask))
        comps = components(masks[:, 1])
        dz, dy, dx = vol.spacing
        hit_comp = np.zeros(len(comps), bool)
        for n in params.nodules:
            total += 1
            hit = False
            for i, c in enumerate(comps):
                d = np.sqrt((((c - np.array(n.center)) * np.array([dz, dy, dx])) ** 2).sum(axis=1)).min()
                if d <= n.radius_mm:
                    hit, hit_comp[i] = True, True
            found += hit
        false_pos += int((~hit_comp).sum())
    n_scans = len(dices)
    return {
        "dice_lung_mean": float(np.mean(dices)),
        "dice_lung_min": float(np.min(dices)),
        "dice_nodule_mean": float(np.mean(nodule_dices)) if nodule_dices else float("nan"),
        "nodule_sensitivity": found / total if total else float("nan"),
        "nodule_false_positives_per_scan": false_pos / n_scans,
        "heldout_scans": float(n_scans),
        "heldout_nodules": float(total),
        "nodules_detected": float(found),
    }


def monai_labels(session: ort.InferenceSession, card: ModelCard, hu: np.ndarray,
                 spacing_zyx: Sequence[float]) -> np.ndarray:
    """Labels [z, y, x] on the source grid by an independent path: this module's RAS helper,
    MONAI's ``sliding_window_inference`` over ONNX Runtime, argmax, nearest neighbour back."""
    from monai.inferers import sliding_window_inference

    sw = card.input.sliding_window
    x = chest3d_input(hu.astype(np.float32), spacing_zyx, card.input.preprocessing)
    name = session.get_inputs()[0].name

    def predictor(t: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(session.run(None, {name: np.ascontiguousarray(t.numpy(), np.float32)})[0])

    with torch.no_grad():
        out = sliding_window_inference(torch.from_numpy(x[np.newaxis, np.newaxis]), sw.size, sw.batch, predictor,
                                       overlap=sw.overlap, mode=sw.blending, sigma_scale=sw.sigma_scale)
    labels = out[0].argmax(0).numpy().astype(np.float32)
    ras_shape = lps_to_ras(hu).shape
    return ras_to_lps(resize(labels, ras_shape, mode="nearest").astype(np.uint8))


def evaluate_chest3d(onnx_path: Path, card: ModelCard, cases: Iterable[tuple[int, int, int | None]],
                     workdir: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Dice per class on the source grid of held-out series, as the node segments them: each
    phantom is written as a DICOM series, read back and run through
    ``models.infer.predict_segmentation`` (with a ``models.runtime`` session); and once more
    through :func:`monai_labels`, whose disagreement with the node is reported."""
    from models.infer import predict_segmentation
    from models.runtime import RuntimeSettings, SessionCache

    loaded = SessionCache(RuntimeSettings(providers=("CPUExecutionProvider",), intra_op_threads=THREADS)).get(
        card.identity.uid, str(onnx_path))
    session = onnx_session(onnx_path)
    rows = []
    for seed, size, slices in tqdm(list(cases), desc="held-out 3D CT", unit="scan", leave=False):
        truth = phantoms.ct_labels(seed, size=size, slices=slices)
        with tempfile.TemporaryDirectory(dir=workdir) as tmp:
            paths = phantoms.write_ct_series(tmp, seed, size=size, slices=slices)
            datasets = [pydicom.dcmread(p) for p in paths]
            t0 = time.perf_counter()
            sources, labels = predict_segmentation(datasets, card, loaded)
            seconds = time.perf_counter() - t0
        order = np.argsort([int(ds.InstanceNumber) for ds in sources])
        labels = labels[order]
        vol = phantoms.ct_chest_volume(seed, size=size, slices=slices)
        reference = monai_labels(session, card, vol.hu, vol.spacing)
        row: dict[str, Any] = {"seed": seed, "shape": list(truth.shape), "spacing_mm": list(vol.spacing),
                               "node_seconds": seconds,
                               "node_vs_monai_voxels_differing": int((labels != reference).sum())}
        for i, name in enumerate(CHEST3D_CLASSES, 1):
            row[f"dice_{name}"] = dice(labels == i, truth == i)
            row[f"dice_{name}_monai"] = dice(reference == i, truth == i)
        rows.append(row)
    perf: dict[str, Any] = {}
    for name in CHEST3D_CLASSES:
        values = [r[f"dice_{name}"] for r in rows]
        perf[f"dice_{name}_mean"] = float(np.mean(values))
        perf[f"dice_{name}_min"] = float(np.min(values))
    for grid in (256, 512):
        chosen = [r for r in rows if r["shape"][1] == grid]
        for name in ("left_lung", "right_lung"):
            if chosen:
                perf[f"dice_{name}_mean_{grid}"] = float(np.mean([r[f"dice_{name}"] for r in chosen]))
    perf["heldout_scans"] = float(len(rows))
    perf["node_vs_monai_voxels_differing"] = float(sum(r["node_vs_monai_voxels_differing"] for r in rows))
    return perf, rows


def evaluate_classifier(session: ort.InferenceSession, x: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    pred = run_onnx(session, x).argmax(axis=1)
    k = len(BODY_PART_CLASSES)
    confusion = np.zeros((k, k), int)
    for t, p in zip(labels, pred, strict=True):
        confusion[t, p] += 1
    out: dict[str, Any] = {"accuracy": float((pred == labels).mean()), "heldout_images": float(len(labels))}
    for i, name in enumerate(BODY_PART_CLASSES):
        out[f"recall_{name}"] = float(confusion[i, i] / max(1, confusion[i].sum()))
    out["confusion"] = confusion.tolist()
    return out


# Real images with a known body part: pydicom's test files and pydicom-data (file, expected label).
# None: the body part is known but is none of the classifier's classes (reported, not scored).
REAL_IMAGES: tuple[tuple[str, str | None], ...] = (
    ("RG1_UNCR.dcm", "chest"), ("RG1_UNCI.dcm", "chest"), ("RG1_J2KR.dcm", "chest"), ("RG1_J2KI.dcm", "chest"),
    ("RG3_UNCR.dcm", "limb"), ("RG3_UNCI.dcm", "limb"), ("RG3_J2KR.dcm", "limb"), ("RG3_J2KI.dcm", "limb"),
    ("dicomdirtests/77654033/CR1/6154", None), ("dicomdirtests/77654033/CR2/6247", None),
    ("dicomdirtests/77654033/CR3/6278", None),
    ("J2K_pixelrep_mismatch.dcm", "head"), ("explicit_VR-UN.dcm", "abdomen"), ("bad_sequence.dcm", None),
    ("dicomdirtests/77654033/CT2/17106", "head"), ("dicomdirtests/77654033/CT2/17136", "head"),
    ("dicomdirtests/77654033/CT2/17166", "head"), ("dicomdirtests/77654033/CT2/17196", "head"),
)


def _real_path(name: str) -> Path | None:
    if "/" in name:
        p = Path(pydicom.data.__file__).parent / "test_files" / name
        return p if p.is_file() else None
    # download=False: pydicom-data is installed; nothing is fetched at run time.
    found = pydicom.data.get_testdata_file(name, download=False)
    return Path(found) if isinstance(found, str) else None


def evaluate_real(session: ort.InferenceSession, card: ModelCard) -> list[dict[str, Any]]:
    rows = []
    for name, expected in REAL_IMAGES:
        path = _real_path(name)
        if path is None:
            rows.append({"file": name, "missing": True})
            continue
        ds = pydicom.dcmread(path)
        try:
            x = prepare_dataset(ds, card.input.preprocessing)[:1]
        except Exception as exc:  # an undecodable test file is reported, not fatal
            rows.append({"file": name, "error": f"{type(exc).__name__}: {exc}"})
            continue
        probs = run_onnx(session, x)[0]
        pred = BODY_PART_CLASSES[int(probs.argmax())]
        rows.append({
            "file": name, "modality": str(ds.get("Modality", "")), "body_part": str(ds.get("BodyPartExamined", "")),
            "size": f"{ds.Rows}x{ds.Columns}", "photometric": str(ds.get("PhotometricInterpretation", "")),
            "expected": expected, "predicted": pred, "p": float(probs.max()),
            "correct": None if expected is None else pred == expected,
        })
    return rows


# --------------------------------------------------------------------------- pipeline


def _pack(onnx_path: Path, card_dict: dict[str, Any], out_dir: Path, stem: str, header: str) -> tuple[Path, Path]:
    from iods.model_object import pack_file

    toml_path = out_dir / f"{stem}.toml"
    toml_path.write_text(to_toml(card_dict, header), encoding="utf-8")
    card = load_card(toml_path)  # the shipped TOML must itself be a valid card
    dcm_path = out_dir / f"{stem}.dcm"
    pack_file(onnx_path, card, dcm_path)
    dcm_path.chmod(0o644)  # written via a private temporary file; shipped files are world-readable
    return toml_path, dcm_path


# Wall-clock figures vary from run to run; they go to the report, not into the card, so that a
# rerun on the same platform packs byte-identical model objects.
_NOT_IN_CARD = {"training_seconds", "data_seconds", "node_vs_monai_voxels_differing"}


def _fmt_perf(perf: dict[str, Any]) -> dict[str, float]:
    """Counts exact, other figures to four significant digits (so a 1e-6 parity figure survives)."""
    out = {}
    for k, v in perf.items():
        if k in _NOT_IN_CARD or not isinstance(v, (int, float)) or not math.isfinite(v):
            continue
        out[k] = float(v) if float(v).is_integer() else float(f"{float(v):.4g}")
    return out


def _chest3d(args: argparse.Namespace, sched: Schedule, report: dict[str, Any]) -> list[str]:
    """Train, export, evaluate and pack the 3D chest U-Net; returns the summary lines."""
    assert tuple(phantoms.CT_LABELS) == CHEST3D_CLASSES, "label values and output channels must agree"
    train_seeds = CHEST3D_TRAIN if not args.quick else range(CHEST3D_TRAIN.start, CHEST3D_TRAIN.start + 3)
    held = CHEST3D_HELDOUT if not args.quick else (CHEST3D_HELDOUT[0], CHEST3D_HELDOUT[4])
    t0 = time.perf_counter()
    items = chest3d_dataset(train_seeds, args.workers)
    t_data = time.perf_counter() - t0
    voxels = sum(x.size for x, _ in items)
    print(f"3D chest training data: {len(items)} volumes, {voxels / 1e6:.0f} M voxels at "
          f"{CHEST3D_SPACING[0]:g} mm in {t_data:.0f} s")
    t0 = time.perf_counter()
    net = train_chest3d(items, sched)
    t_train = time.perf_counter() - t0
    onnx_path = export_logits_onnx(net, args.build / "thorax_unet3d.onnx", CHEST3D_PATCH)
    session = onnx_session(onnx_path)
    patch = items[0][0][tuple(slice(0, n) for n in CHEST3D_PATCH)].astype(np.float32)
    diff = max(logits_parity(net, session, patch[np.newaxis, np.newaxis]),
               logits_parity(net, session, np.random.default_rng(2).random((2, 1, 48, 72, 40), np.float32)))
    del items
    card = parse_card(chest3d_card_dict())
    perf, rows = evaluate_chest3d(onnx_path, card, held, args.build)
    perf.update(onnx_torch_max_abs_diff=diff, training_seconds=t_train, data_seconds=t_data,
                parameters=float(parameter_count(net)))
    report["thorax_unet3d"] = {**perf, "scans": rows}
    header = (f"Reference 3D thorax U-Net card, written by python -m models.training.train on {CARD_DATE}.\n"
              "Figures: held-out phantoms, exported graph under ONNX Runtime through models.infer, scored on "
              "the source grid (see docs/reference-models.md).")
    _, dcm_path = _pack(onnx_path, chest3d_card_dict(_fmt_perf(perf)), args.out, "thorax_unet3d", header)
    report["thorax_unet3d"]["object_bytes"] = dcm_path.stat().st_size
    lines = [
        f"3D thorax U-Net ({dcm_path}, {dcm_path.stat().st_size / 2**20:.2f} MiB) on {len(rows)} held-out scans, "
        f"source grid: Dice left lung {perf['dice_left_lung_mean']:.4f} (min {perf['dice_left_lung_min']:.4f}), "
        f"right lung {perf['dice_right_lung_mean']:.4f} (min {perf['dice_right_lung_min']:.4f}), heart "
        f"{perf['dice_heart_mean']:.4f} (min {perf['dice_heart_min']:.4f}); ONNX vs PyTorch max |diff| {diff:.1e}; "
        f"node vs MONAI: {perf['node_vs_monai_voxels_differing']:.0f} voxels differ; trained in {t_train:.0f} s",
    ]
    for r in rows:
        lines.append(f"  seed {r['seed']} {'x'.join(map(str, r['shape']))} ({r['spacing_mm'][0]:.1f} mm slices): "
                     f"left {r['dice_left_lung']:.4f} right {r['dice_right_lung']:.4f} heart {r['dice_heart']:.4f}"
                     f" (MONAI {r['dice_left_lung_monai']:.4f}/{r['dice_right_lung_monai']:.4f}/"
                     f"{r['dice_heart_monai']:.4f}); node {r['node_seconds']:.1f} s")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m models.training.train", description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=REFERENCE_DIR, help="where the cards and model objects go")
    ap.add_argument("--build", type=Path, default=BUILD_DIR, help="ONNX files and the JSON report")
    ap.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1), help="data generation processes")
    ap.add_argument("--quick", action="store_true", help="a few steps only (smoke test; figures meaningless)")
    ap.add_argument("--only", choices=["lung", "bodypart", "chest3d"], help="train one model only")
    args = ap.parse_args(argv)
    sched = QUICK if args.quick else Schedule()
    _setup_torch()
    args.out.mkdir(parents=True, exist_ok=True)
    args.build.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"started": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
                              "python": sys.version.split()[0], "torch": torch.__version__,
                              "onnxruntime": ort.__version__, "threads": THREADS, "seed": SEED}
    t_all = time.perf_counter()
    summary: list[str] = []
    ct_train = CT_TRAIN if not args.quick else range(CT_TRAIN.start, CT_TRAIN.start + 4)
    ct_held = CT_HELDOUT if not args.quick else range(CT_HELDOUT.start, CT_HELDOUT.start + 2)
    xr_train = XR_TRAIN if not args.quick else range(0, 20)
    xr_held = XR_HELDOUT if not args.quick else range(XR_HELDOUT.start, XR_HELDOUT.start + 10)

    if args.only in (None, "lung"):
        t0 = time.perf_counter()
        x, y = ct_dataset(ct_train, lambda s: 1 + s % 3, args.workers)
        t_data = time.perf_counter() - t0
        print(f"CT training data: {len(x)} slices from {len(ct_train)} volumes in {t_data:.0f} s")
        t0 = time.perf_counter()
        net = train_unet(x, y, sched)
        t_train = time.perf_counter() - t0
        onnx_path = export_onnx(net, args.build / "lung_unet.onnx", task="segmentation")
        session = onnx_session(onnx_path)
        card = parse_card(lung_card_dict())
        diff = max(parity(net, session, x[:16].astype(np.float32), "segmentation"),
                   parity(net, session, np.random.default_rng(0).random((2, 1, 96, 160), np.float32), "segmentation"))
        del x, y
        perf = evaluate_unet(session, card, ct_held)
        perf.update(onnx_torch_max_abs_diff=diff, training_seconds=t_train, data_seconds=t_data,
                    parameters=float(parameter_count(net)))
        report["lung_unet"] = perf
        header = (f"Reference lung U-Net card, written by python -m models.training.train on {CARD_DATE}.\n"
                  "Figures: held-out phantoms, exported graph under ONNX Runtime (see docs/reference-models.md).")
        toml_path, dcm_path = _pack(onnx_path, lung_card_dict(_fmt_perf(perf)), args.out, "lung_unet", header)
        report["lung_unet"]["object_bytes"] = dcm_path.stat().st_size
        summary.append(
            f"lung U-Net ({dcm_path}, {dcm_path.stat().st_size / 2**20:.2f} MiB): lung Dice mean "
            f"{perf['dice_lung_mean']:.4f} (min {perf['dice_lung_min']:.4f}) on {len(ct_held)} held-out scans; nodule "
            f"sensitivity {perf['nodule_sensitivity']:.3f} ({perf['nodules_detected']:.0f}/{perf['heldout_nodules']:.0f}), "
            f"{perf['nodule_false_positives_per_scan']:.2f} false positives/scan, nodule Dice {perf['dice_nodule_mean']:.3f}; "
            f"ONNX vs PyTorch max |diff| {diff:.1e}; trained in {t_train:.0f} s")

    if args.only in (None, "bodypart"):
        t0 = time.perf_counter()
        x, labels = xr_dataset(xr_train, args.workers)
        xv, lv = xr_dataset(xr_held, args.workers)
        t_data = time.perf_counter() - t0
        print(f"radiographs: {len(x)} training, {len(xv)} held-out, generated in {t_data:.0f} s")
        t0 = time.perf_counter()
        # Every phantom and a degraded copy of it: real radiographs are read far more surely.
        net = train_classifier(*with_degraded_copies(x, labels, SEED), sched)
        t_train = time.perf_counter() - t0
        onnx_path = export_onnx(net, args.build / "bodypart_cnn.onnx", task="classification")
        session = onnx_session(onnx_path)
        card = parse_card(body_card_dict())
        xv32 = xv.astype(np.float32)
        diff = max(parity(net, session, xv32[:64], "classification"),
                   parity(net, session, np.random.default_rng(1).random((3, 1, 128, 128), np.float32), "classification"))
        perf = evaluate_classifier(session, xv32, lv)
        real = evaluate_real(session, card)
        confusion = perf.pop("confusion")
        perf.update(onnx_torch_max_abs_diff=diff, training_seconds=t_train, data_seconds=t_data,
                    parameters=float(parameter_count(net)))
        # Radiographs are what the model is for; CT slices are out of domain and reported apart.
        for key, modalities in (("real_radiograph", ("CR", "DX")), ("real_ct", ("CT",))):
            scored = [r for r in real if r.get("correct") is not None and r["modality"] in modalities]
            if scored:
                perf[f"{key}_files_scored"] = float(len(scored))
                perf[f"{key}_accuracy"] = sum(r["correct"] for r in scored) / len(scored)
        report["bodypart_cnn"] = {**perf, "confusion": confusion, "classes": list(BODY_PART_CLASSES), "real": real}
        header = (f"Reference body-part classifier card, written by python -m models.training.train on {CARD_DATE}.\n"
                  "Figures: held-out phantoms, exported graph under ONNX Runtime (see docs/reference-models.md).")
        toml_path, dcm_path = _pack(onnx_path, body_card_dict(_fmt_perf(perf)), args.out, "bodypart_cnn", header)
        report["bodypart_cnn"]["object_bytes"] = dcm_path.stat().st_size
        summary.append(
            f"body-part CNN ({dcm_path}, {dcm_path.stat().st_size / 2**20:.2f} MiB): accuracy {perf['accuracy']:.4f} "
            f"on {len(lv)} held-out radiographs; ONNX vs PyTorch max |diff| {diff:.1e}; trained in {t_train:.0f} s")
        summary.append("  confusion (rows true, columns predicted): " + " ".join(BODY_PART_CLASSES))
        for name, row in zip(BODY_PART_CLASSES, confusion, strict=True):
            summary.append(f"  {name:>8}: {row}")
        summary.append("  real images (pydicom test files and pydicom-data; CT slices are out of domain):")
        for r in real:
            if "predicted" in r:
                mark = "n/a" if r["correct"] is None else ("ok" if r["correct"] else "WRONG")
                summary.append(f"    {r['file']:<34} {r['modality']:>2} {r['body_part']:<10} {r['size']:>9} -> "
                               f"{r['predicted']:<8} p={r['p']:.2f} expected {r['expected']} [{mark}]")
            else:
                summary.append(f"    {r['file']:<34} {r.get('error', 'missing')}")
        for key in ("real_radiograph", "real_ct"):
            if f"{key}_accuracy" in perf:
                summary.append(f"  {key.replace('_', ' ')}: {perf[f'{key}_accuracy']:.3f} of "
                               f"{perf[f'{key}_files_scored']:.0f} files with a body part the model knows")

    if args.only in (None, "chest3d"):
        summary += _chest3d(args, sched, report)

    report["total_seconds"] = time.perf_counter() - t_all
    (args.build / "report.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print("\n".join(["", "=== reference models ===", *summary,
                     f"total {report['total_seconds']:.0f} s; report: {args.build / 'report.json'}"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
