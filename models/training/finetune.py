"""Fine-tuning a stored model on local cases: a trainable network from the ONNX graph, on CPU.

How the trainer gets a network: the card names its architecture
(``provenance.architecture``, e.g. ``"unet2d:12,24,48,96"``); the shipped lung U-Net predates
that field and is recognised by name (:data:`REFERENCE_ARCHITECTURES`). The network is built
from :mod:`models.training.networks` with its BatchNorm layers removed, because the exporter
folded them into the convolutions: the graph's Conv/ConvTranspose initialisers, in graph order,
are then exactly the network's weights and biases, in forward order. The load is checked
(every shape, and ONNX Runtime against torch on one input, max abs difference < 1e-4); any
mismatch refuses with the reason. Weights travel as ONNX initialisers (numpy arrays): nothing is
unpickled.

Training uses the card's own preprocessing (:func:`models.preprocess.prepare`), so there is no
train/serve skew; the new graph is exported as the reference was (opset 17, dynamic axes) and
evaluated, like the parent, with ONNX Runtime on held-out cases at the source grid.
"""

from __future__ import annotations

import io
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import numpy_helper
from pydicom.dataset import Dataset
from torch import nn

from iods.card import ModelCard
from models.preprocess import prepare, resize, to_masks
from models.training.networks import UNet2D, WithActivation
from models.volume import load_volume

REFERENCE_ARCHITECTURES = {"modelnode-lung-unet": "unet2d:12,24,48,96"}
GRAPH_OPS = {"Conv", "ConvTranspose", "Relu", "MaxPool", "Concat", "Sigmoid"}


class FinetuneRefused(ValueError):
    """The model cannot be fine-tuned here; the text says why."""


@dataclass
class Case:
    """One series: its datasets (pixels loaded) and label masks [slices, rows, cols, classes] in
    the order :func:`models.volume.load_volume` puts the slices (``uids``)."""

    key: str
    datasets: list[Dataset]
    labels: dict[str, np.ndarray]  # SOP Instance UID -> bool [rows, cols, classes]


@dataclass
class Result:
    onnx_bytes: bytes
    before: dict[str, float]
    after: dict[str, float]
    steps: int
    seconds: dict[str, float] = field(default_factory=dict)


def architecture_of(card: ModelCard) -> str:
    arch = card.provenance.architecture or REFERENCE_ARCHITECTURES.get(card.identity.name, "")
    if not arch:
        raise FinetuneRefused(f"the card of {card.identity.name} names no trainable architecture "
                              "(provenance.architecture) and it is not a reference network; graph conversion "
                              "is not supported")
    kind, _, params = arch.partition(":")
    if kind != "unet2d":
        raise FinetuneRefused(f"architecture {arch!r} cannot be fine-tuned here (supported: unet2d:<widths>)")
    if card.task.type != "segmentation" or card.input.layout != "2d" or card.task.activation != "sigmoid":
        raise FinetuneRefused("unet2d fine-tuning needs a 2d sigmoid segmentation model")
    return arch


def _strip_batchnorm(module: nn.Module) -> None:
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            setattr(module, name, nn.Identity())
        elif isinstance(child, nn.Conv2d) and child.bias is None:
            setattr(module, name, nn.Conv2d(child.in_channels, child.out_channels, child.kernel_size,
                                            padding=child.padding, bias=True))
        else:
            _strip_batchnorm(child)


def _forward_layers(net: UNet2D) -> list[nn.Module]:
    layers: list[nn.Module] = []
    convs = (nn.Conv2d, nn.ConvTranspose2d)
    for block in net.down:
        layers += [m for m in block if isinstance(m, convs)]
    for up, dec in zip(net.up, net.dec, strict=True):
        layers.append(up)
        layers += [m for m in dec if isinstance(m, convs)]
    layers.append(net.head)
    return layers


def network_from_onnx(card: ModelCard, onnx_bytes: bytes) -> nn.Module:
    """The card's architecture with the graph's weights (sigmoid included); refuses on mismatch."""
    arch = architecture_of(card)
    widths = tuple(int(w) for w in arch.partition(":")[2].split(","))
    model = onnx.load_from_string(onnx_bytes)
    ops = {n.op_type for n in model.graph.node}
    if ops - GRAPH_OPS:
        raise FinetuneRefused(f"the graph has operators that {arch} does not: {', '.join(sorted(ops - GRAPH_OPS))}")
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    weights = [[inits[x] for x in n.input[1:] if x in inits] for n in model.graph.node
               if n.op_type in ("Conv", "ConvTranspose")]
    net = UNet2D(card.input.channels, len(card.task.classes), widths)
    _strip_batchnorm(net)
    layers = _forward_layers(net)
    if len(layers) != len(weights):
        raise FinetuneRefused(f"the graph has {len(weights)} convolutions, {arch} {len(layers)}")
    with torch.no_grad():
        for i, (layer, arrays) in enumerate(zip(layers, weights, strict=True)):
            params = [layer.weight, layer.bias]
            if len(arrays) != 2 or any(tuple(a.shape) != tuple(p.shape) for a, p in zip(arrays, params, strict=True)):
                raise FinetuneRefused(f"convolution {i}: graph shapes {[a.shape for a in arrays]} do not fit {arch}")
            for a, p in zip(arrays, params, strict=True):
                p.copy_(torch.from_numpy(np.array(a, copy=True)))
    wrapped = WithActivation(net, "sigmoid").eval()
    x = np.random.default_rng(0).random((1, card.input.channels, 64, 64), dtype=np.float32)
    ref = _session(onnx_bytes).run(None, {model.graph.input[0].name: x})[0]
    with torch.no_grad():
        diff = float(np.abs(wrapped(torch.from_numpy(x)).numpy() - ref).max())
    if diff > 1e-4:
        raise FinetuneRefused(f"the graph does not compute {arch} (max abs difference {diff:.2g})")
    return wrapped


def _session(onnx_bytes: bytes) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    so.inter_op_num_threads = 1
    return ort.InferenceSession(onnx_bytes, so, providers=["CPUExecutionProvider"])


def _inputs(card: ModelCard, case: Case) -> tuple[np.ndarray, list[str]]:
    pp = card.input.preprocessing
    vol = load_volume(case.datasets, rescale=pp.rescale)
    x = prepare(vol.pixels, pp, photometric=vol.photometric, layout="2d", spacing=vol.spacing[1:])
    return x.astype(np.float32), [str(ds.SOPInstanceUID) for ds in vol.datasets]


def _labels(case: Case, uids: list[str], shape: tuple[int, int], classes: int) -> np.ndarray:
    first = next(iter(case.labels.values()))
    empty = np.zeros(first.shape, bool)
    y = np.stack([case.labels.get(u, empty) for u in uids]).astype(np.float32)  # [N, H, W, K]
    return resize(np.moveaxis(y, -1, 1), shape)  # area fractions at the model's grid, [N, K, h, w]


def evaluate(card: ModelCard, onnx_bytes: bytes, cases: Sequence[Case]) -> dict[str, float]:
    """Mean Dice per class over ``cases`` (3D, at the source grid), as the node would segment."""
    sess = _session(onnx_bytes)
    name = sess.get_inputs()[0].name
    thresholds = [c.threshold for c in card.task.classes]
    scores: dict[str, list[float]] = {c.label: [] for c in card.task.classes}
    for case in cases:
        x, uids = _inputs(card, case)
        probs = np.concatenate([sess.run(None, {name: x[i:i + 16]})[0] for i in range(0, len(x), 16)])
        first = next(iter(case.labels.values()))
        pred = to_masks(probs, thresholds, first.shape[:2])  # [N, K, H, W]
        empty = np.zeros(first.shape, bool)
        truth = np.stack([case.labels.get(u, empty) for u in uids])  # [N, H, W, K]
        for k, cls in enumerate(card.task.classes):
            p, t = pred[:, k], truth[..., k]
            total = int(p.sum()) + int(t.sum())
            scores[cls.label].append(1.0 if total == 0 else 2.0 * int((p & t).sum()) / total)
    return {f"dice_{k}": round(float(np.mean(v)), 4) for k, v in scores.items() if v}


def train(net: nn.Module, card: ModelCard, cases: Sequence[Case], *, steps: int = 120, batch: int = 12,
          lr: float = 1e-3, seed: int = 20261203) -> nn.Module:
    """Fine-tune ``net`` (WithActivation) on every slice of ``cases``: BCE + soft Dice, AdamW."""
    torch.manual_seed(seed)
    xs, ys = [], []
    for case in cases:
        x, uids = _inputs(card, case)
        xs.append(x)
        ys.append(_labels(case, uids, x.shape[-2:], len(card.task.classes)))
    x_all = torch.from_numpy(np.concatenate(xs))
    y_all = torch.from_numpy(np.concatenate(ys).astype(np.float32))
    rng = np.random.default_rng(seed)
    inner = net.net
    inner.train()
    opt = torch.optim.AdamW(inner.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.2)
    bce = nn.BCEWithLogitsLoss()
    for _ in range(steps):
        idx = torch.from_numpy(rng.choice(len(x_all), size=min(batch, len(x_all)), replace=False))
        logits = inner(x_all[idx])
        y = y_all[idx]
        p = torch.sigmoid(logits)
        dice = 1 - (2 * (p * y).sum((0, 2, 3)) + 1) / (p.sum((0, 2, 3)) + y.sum((0, 2, 3)) + 1)
        loss = bce(logits, y) + dice.mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    inner.eval()
    return net.eval()


def export(net: nn.Module, card: ModelCard) -> bytes:
    buf = io.BytesIO()
    x = torch.zeros((1, card.input.channels, *card.input.size), dtype=torch.float32)
    torch.onnx.export(net, (x,), buf, dynamo=False, opset_version=17, input_names=["image"],
                      output_names=["probabilities"],
                      dynamic_axes={"image": {0: "n", 2: "h", 3: "w"}, "probabilities": {0: "n", 2: "h", 3: "w"}})
    return buf.getvalue()


def finetune(card: ModelCard, parent_onnx: bytes, train_cases: Sequence[Case], heldout: Sequence[Case],
             *, steps: int = 120, seed: int = 20261203) -> Result:
    """Train from the parent's weights, export, and evaluate both graphs on ``heldout``."""
    torch.set_num_threads(2)
    t0 = time.perf_counter()
    net = network_from_onnx(card, parent_onnx)
    before = evaluate(card, parent_onnx, heldout)
    t1 = time.perf_counter()
    train(net, card, train_cases, steps=steps, batch=8, seed=seed)
    t2 = time.perf_counter()
    new = export(net, card)
    after = evaluate(card, new, heldout)
    t3 = time.perf_counter()
    return Result(new, before, after, steps,
                  {"load_and_evaluate_parent": round(t1 - t0, 2), "train": round(t2 - t1, 2),
                   "export_and_evaluate": round(t3 - t2, 2)})


def regressed(before: dict[str, float], after: dict[str, float], *, mean_tolerance: float = 0.005,
              class_tolerance: float = 0.05) -> list[str]:
    """Why the new version regresses (empty if it does not): the mean Dice over classes lower by
    more than ``mean_tolerance``, or any one class lower by more than ``class_tolerance`` (a small
    class, such as the nodules, moves by a few hundredths between runs on two held-out cases)."""
    reasons = []
    mean_before = sum(before.values()) / max(len(before), 1)
    mean_after = sum(after.get(k, 0.0) for k in before) / max(len(before), 1)
    if mean_after < mean_before - mean_tolerance:
        reasons.append(f"mean Dice {mean_before:.4f} -> {mean_after:.4f}")
    reasons += [f"{k} {v:.4f} -> {after.get(k, 0.0):.4f}" for k, v in before.items()
                if after.get(k, 0.0) < v - class_tolerance]
    return reasons


def weights_of(net: nn.Module) -> list[np.ndarray]:
    """The network's weights and biases in forward order (the graph's initialiser order)."""
    inner = net.net if isinstance(net, WithActivation) else net
    return [p.detach().numpy().copy() for layer in _forward_layers(inner) for p in (layer.weight, layer.bias)]


def set_weights(net: nn.Module, arrays: Sequence[np.ndarray]) -> None:
    inner = net.net if isinstance(net, WithActivation) else net
    params = [p for layer in _forward_layers(inner) for p in (layer.weight, layer.bias)]
    if len(params) != len(arrays) or any(tuple(a.shape) != tuple(p.shape) for a, p in zip(arrays, params, strict=True)):
        raise FinetuneRefused("the weights received do not fit the network")
    with torch.no_grad():
        for p, a in zip(params, arrays, strict=True):
            p.copy_(torch.from_numpy(np.array(a, dtype=np.float32, copy=True)))
