"""Calibration of the body-part classifier: how its probabilities behave on images it was not
trained on, and temperature scaling fitted on *synthetic* held-out radiographs (issue 20).

    python -m models.training.calibrate [--per-class 60] [--json build/calib/report.json]

1. Writes ``per_class`` fresh phantom radiographs per body part (seeds 60000+, used nowhere
   else: training 0-359, held-out figures 50000-50099, tests 90000-90023) and runs the shipped
   object (``models/reference/bodypart_cnn.dcm``) on them with the card's preprocessing, under
   ONNX Runtime, as the node does.
2. Fits one temperature T by minimising the negative log-likelihood on those phantoms
   (``p_T ∝ p^(1/T)`` on the softmax output, the same as dividing the logits by T), and reports
   accuracy, NLL and the expected calibration error (15 bins) before and after.
3. Reports, with T = 1 and with the fitted T, every real projection radiograph shipped by the
   installed packages (pydicom-data's RG1 chest and RG3 distal tibia in four encodings each,
   pydicom's CR thumbnails). These are **never** used to fit anything: they are the only real
   check there is.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pydicom

from iods import model_object
from models.infer import predict_classification
from models.runtime import RuntimeSettings, SessionCache
from models.training.phantoms import RADIOGRAPH_LABELS, write_radiograph

ROOT = Path(__file__).resolve().parents[2]
OBJECT = ROOT / "models" / "reference" / "bodypart_cnn.dcm"
SEED0 = 60000

# Real projection radiographs the installed packages ship (file, expected class or None when its
# body part is none of the classes). Searched for with: every .dcm and DICOMDIR-tree file under
# site-packages whose Modality is CR/DX/RG/PX/MG.
REAL = (
    ("RG1_UNCR.dcm", "chest"), ("RG1_UNCI.dcm", "chest"), ("RG1_J2KR.dcm", "chest"), ("RG1_J2KI.dcm", "chest"),
    ("RG3_UNCR.dcm", "limb"), ("RG3_UNCI.dcm", "limb"), ("RG3_J2KR.dcm", "limb"), ("RG3_J2KI.dcm", "limb"),
    ("test_files/dicomdirtests/77654033/CR1/6154", None), ("test_files/dicomdirtests/77654033/CR2/6247", None),
    ("test_files/dicomdirtests/77654033/CR3/6278", None),
    ("charset_files/chrJapMulti.dcm", None), ("charset_files/chrKoreanMulti.dcm", None),  # (no pixels: skipped)
)


def temper(probs: np.ndarray, t: float) -> np.ndarray:
    """Softmax probabilities at temperature ``t`` (rows sum to 1)."""
    logp = np.log(np.clip(probs, 1e-12, 1.0)) / t
    logp -= logp.max(axis=-1, keepdims=True)
    e = np.exp(logp)
    return e / e.sum(axis=-1, keepdims=True)


def nll(probs: np.ndarray, labels: np.ndarray) -> float:
    return float(-np.log(np.clip(probs[np.arange(len(labels)), labels], 1e-12, 1.0)).mean())


def ece(probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> float:
    conf, pred = probs.max(axis=1), probs.argmax(axis=1)
    edges = np.linspace(0, 1, bins + 1)
    total = 0.0
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        inside = (conf > lo) & (conf <= hi)
        if inside.any():
            total += inside.mean() * abs(float((pred[inside] == labels[inside]).mean()) - float(conf[inside].mean()))
    return total


def fit_temperature(probs: np.ndarray, labels: np.ndarray) -> float:
    """The T in [0.05, 20] (log grid, then refined) with the least NLL."""
    grid = np.exp(np.linspace(np.log(0.05), np.log(20.0), 400))
    best = min(grid, key=lambda t: nll(temper(probs, t), labels))
    fine = np.linspace(best * 0.97, best * 1.03, 61)
    return float(min(fine, key=lambda t: nll(temper(probs, t), labels)))


def hold_rates(probs: np.ndarray, labels: np.ndarray, below: float = 0.15, other: float = 0.5) -> dict[str, float]:
    """What the selection's default thresholds would do on phantoms labelled by class: the share
    of right labels held (false holds) and of wrong labels caught (each image against each of
    the four other classes), for the five classes as regions (no containment among them)."""
    n, k = probs.shape
    top = probs.max(axis=1)
    right = (probs[np.arange(n), labels] < below) & (top >= other)
    wrong = [(probs[i, c] < below) and top[i] >= other for i in range(n) for c in range(k) if c != labels[i]]
    return {"right_label_held": round(float(right.mean()), 4), "wrong_label_caught": round(float(np.mean(wrong)), 4),
            "below": below, "other": other}


def _real_path(name: str) -> Path | None:
    if "/" in name:
        p = Path(pydicom.data.__file__).parent / name
        return p if p.is_file() else None
    found = pydicom.data.get_testdata_file(name, download=False)
    return Path(found) if isinstance(found, str) else None


def run(per_class: int = 60) -> dict[str, Any]:
    payload, card = model_object.decode(model_object.read_file(OBJECT))
    loaded = SessionCache(RuntimeSettings(providers=("CPUExecutionProvider",), intra_op_threads=2)).get("c", payload)
    labels_of = [c.label for c in card.task.classes]
    probs, labels = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for k, part in enumerate(RADIOGRAPH_LABELS):
            for i in range(per_class):
                path = write_radiograph(Path(tmp) / f"{part}_{i}.dcm", SEED0 + i, part)
                probs.append(predict_classification([pydicom.dcmread(path)], card, loaded))
                labels.append(labels_of.index(part) if part in labels_of else k)
    p, y = np.asarray(probs), np.asarray(labels)
    t = fit_temperature(p, y)
    holds = {name: hold_rates(q, y) for name, q in (("T=1", p), (f"T={t:.2f}", temper(p, t)))}
    report: dict[str, Any] = {
        "object": str(OBJECT.relative_to(ROOT)), "phantoms": int(len(y)), "seeds": f"{SEED0}-{SEED0 + per_class - 1}",
        "temperature": round(t, 3),
        "synthetic": {name: {"accuracy": round(float((q.argmax(1) == y).mean()), 4), "nll": round(nll(q, y), 4),
                             "ece": round(ece(q, y), 4), "mean_top_p": round(float(q.max(1).mean()), 4)}
                      for name, q in (("T=1", p), (f"T={t:.2f}", temper(p, t)))},
        "contradiction_on_phantoms": holds,
        "real": [],
    }
    for name, expected in REAL:
        path = _real_path(name)
        if path is None:
            continue
        ds = pydicom.dcmread(path)
        if "PixelData" not in ds:
            continue  # (pydicom's charset files: headers only)
        raw = predict_classification([ds], card, loaded)
        row = {"file": name, "modality": str(ds.get("Modality", "")), "body_part": str(ds.get("BodyPartExamined", "")),
               "size": f"{ds.Columns}x{ds.Rows}", "expected": expected}
        for tag, q in (("T=1", raw), ("T=fit", temper(raw[None], t)[0])):
            row[tag] = {label: round(float(v), 3) for label, v in zip(labels_of, q, strict=True)}
        report["real"].append(row)
    return report


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--per-class", type=int, default=60)
    ap.add_argument("--json", type=Path, default=ROOT / "build" / "calib" / "report.json")
    args = ap.parse_args(argv)
    report = run(args.per_class)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2))
    print(json.dumps({k: v for k, v in report.items() if k != "real"}, indent=2))
    for row in report["real"]:
        print(row["file"], row["expected"], "T=1", row["T=1"], "T=fit", row["T=fit"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
