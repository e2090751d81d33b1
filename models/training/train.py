"""Train, evaluate, export and pack the reference models (``python -m models.training.train``).

Run by ``scripts/train_reference``. Data come from ``models.training.phantoms`` (fixed seed lists) and
pass through ``models.preprocess.prepare`` with the preprocessing of the model's own card, the
same function the node runs before inference. Figures are measured on held-out phantoms with
the exported ONNX graph under ONNX Runtime (what ships, not the PyTorch module), written into
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
from models.preprocess import prepare, prepare_dataset, resize, to_masks
from models.training import phantoms
from models.training.networks import (
    BODY_PART_CLASSES,
    LUNG_CLASSES,
    BodyPartNet,
    UNet2D,
    WithActivation,
    parameter_count,
)

ROOT = Path(__file__).resolve().parent.parent
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

LUNG_WIDTHS = (12, 24, 48, 96)
BODY_WIDTHS = (16, 32, 48, 64, 96)
INPUT_SIZE = (128, 128)


@dataclass(frozen=True)
class Schedule:
    unet_steps: int = 420
    unet_batch: int = 16
    cls_steps: int = 360
    cls_batch: int = 32


QUICK = Schedule(unet_steps=30, cls_steps=30)


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
            "version": "1.0.0",
            "uid": model_uid("bodypart_cnn", "1.0.0"),
            "manufacturer": "modelnode",
            "authors": ["modelnode reference models"],
            "licence": "Apache-2.0",
            "intended_use": "Research and testing only: body part of a projection radiograph (head, chest, abdomen, pelvis, limb)",
            "created": CARD_DATE,
            "description": (
                f"Small strided CNN (widths {list(BODY_WIDTHS)}, BatchNorm, global average pooling) trained on "
                "projections of synthetic 3D phantoms (models/phantoms.py). Softmax over five body parts."
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
                f"seeds {XR_TRAIN.start}-{XR_TRAIN.stop - 1} per body part); held-out: "
                f"{len(XR_HELDOUT) * len(BODY_PART_CLASSES)} radiographs, seeds {XR_HELDOUT.start}-{XR_HELDOUT.stop - 1}"
            ),
            "performance": dict(performance or {}),
            "training_command": TRAINING_COMMAND,
            "seed": SEED,
        },
    }


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
            if isinstance(value, dict) and key in ("preprocessing", "performance"):
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
_NOT_IN_CARD = {"training_seconds", "data_seconds"}


def _fmt_perf(perf: dict[str, Any]) -> dict[str, float]:
    """Counts exact, other figures to four significant digits (so a 1e-6 parity figure survives)."""
    out = {}
    for k, v in perf.items():
        if k in _NOT_IN_CARD or not isinstance(v, (int, float)) or not math.isfinite(v):
            continue
        out[k] = float(v) if float(v).is_integer() else float(f"{float(v):.4g}")
    return out


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m models.training.train", description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=REFERENCE_DIR, help="where the cards and model objects go")
    ap.add_argument("--build", type=Path, default=BUILD_DIR, help="ONNX files and the JSON report")
    ap.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1), help="data generation processes")
    ap.add_argument("--quick", action="store_true", help="a few steps only (smoke test; figures meaningless)")
    ap.add_argument("--only", choices=["lung", "bodypart"], help="train one model only")
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
        net = train_classifier(x, labels, sched)
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

    report["total_seconds"] = time.perf_counter() - t_all
    (args.build / "report.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print("\n".join(["", "=== reference models ===", *summary,
                     f"total {report['total_seconds']:.0f} s; report: {args.build / 'report.json'}"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
