"""An experiment, not a shipped model: does making the phantom radiographs less synthetic move
the body-part classifier's probabilities on real radiographs? (issue 20)

    python -m models.training.augment_experiment    # about 3 minutes on 2 cores

Trains the reference architecture exactly as ``models.training.train`` does (same seeds, steps,
optimiser; the shipped object is the baseline) on every training phantom doubled by a degraded copy: gamma and
contrast jitter, blur, noise, collimation borders and a burnt-in marker (what CR images have
and phantoms lack), the copy min-max normalised again as the card's preprocessing does. Reports
held-out phantom accuracy and the probabilities on pydicom-data's RG1 (chest) and RG3 (distal
tibia), which are only *read*: nothing is fitted or chosen on them. Writes
``build/calib/augment.json``; the shipped object is untouched.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import torch

from models import preprocess
from models.training import train as t

HELDOUT = range(50000, 50040)  # the first 40 of the held-out seeds per class
REAL = (("RG1_UNCR.dcm", "chest"), ("RG3_UNCR.dcm", "limb"))


def degrade(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A degraded copy of min-max normalised images [N, 1, H, W] (float32, 0..1)."""
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


def probabilities(net: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return torch.softmax(net(torch.from_numpy(x.astype(np.float32))), dim=1).numpy()


def shipped() -> Callable[[np.ndarray], np.ndarray]:
    """The shipped object under ONNX Runtime, trained as train_classifier trains (its baseline)."""
    from iods import model_object
    from models.runtime import RuntimeSettings, SessionCache

    payload, _ = model_object.decode(model_object.read_file(t.REFERENCE_DIR / "bodypart_cnn.dcm"))
    loaded = SessionCache(RuntimeSettings(providers=("CPUExecutionProvider",), intra_op_threads=2)).get("b", payload)
    return lambda x: np.concatenate([loaded.run(x[i:i + 32].astype(np.float32)) for i in range(0, len(x), 32)])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="4 seeds per class and 3 steps: a smoke run of the code")
    args = ap.parse_args(argv)
    t._setup_torch()
    train_seeds, held_seeds = (range(0, 4), range(50000, 50004)) if args.quick else (t.XR_TRAIN, HELDOUT)
    sched = t.Schedule(cls_steps=3) if args.quick else t.Schedule()
    x, y = t.xr_dataset(train_seeds, workers=2)
    xh, yh = t.xr_dataset(held_seeds, workers=2)
    xh = xh.astype(np.float32)
    xh_degraded = degrade(xh, np.random.default_rng(7))
    pp = t.body_preprocessing()
    real = {name: preprocess.prepare_dataset(pydicom.dcmread(pydicom.data.get_testdata_file(name)), pp, layout="2d")
            for name, _ in REAL}
    rng = np.random.default_rng(t.SEED)
    xa = np.concatenate([x, degrade(x.astype(np.float32), rng).astype(np.float16)])
    ya = np.concatenate([y, y])
    net = t.train_classifier(xa, ya, sched)
    report = {}
    for name, run in (("as shipped (bodypart_cnn.dcm, no degradation)", shipped()),
                      ("trained on phantoms doubled with degraded copies", lambda a: probabilities(net, a))):
        held, held_degraded = run(xh), run(xh_degraded)
        report[name] = {
            "heldout_accuracy": round(float((held.argmax(1) == yh).mean()), 4),
            "heldout_degraded_accuracy": round(float((held_degraded.argmax(1) == yh).mean()), 4),
            "heldout_images": int(len(yh)),
            "real": {f: {c: round(float(p), 3) for c, p in zip(t.BODY_PART_CLASSES, run(a)[0], strict=True)}
                     for f, a in real.items()},
        }
        print(name, json.dumps(report[name]), flush=True)
    out = t.ROOT / "build" / "calib" / ("augment-quick.json" if args.quick else "augment.json")
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
