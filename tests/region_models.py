"""Site models that target one region only: a chest CR segmenter and a knee CR classifier.

Real, small ONNX graphs (tests/onnx_factory.py) with validated cards (tests/cards.py), packed as
model objects, for the tests of the contradiction between image and header (issue 20).
"""

from __future__ import annotations

import copy
from pathlib import Path

from cards import segmentation_card_dict
from onnx_factory import classification_model, segmentation_model

from iods import model_object
from iods.card import parse_card

CHEST_MODEL = "site-cr-chest-seg"
KNEE_MODEL = "site-cr-knee-fracture"
RADIOGRAPH_INPUT = {
    "layout": "2d", "channels": 1, "size": [64, 64], "dtype": "float32", "min_slices": 1,
    "photometric": ["MONOCHROME2", "MONOCHROME1"],
    "preprocessing": {"rescale": True, "normalize": "minmax", "resample_size": [64, 64], "invert_monochrome1": True},
}


def chest_card_dict() -> dict:
    d = copy.deepcopy(segmentation_card_dict(name=CHEST_MODEL, version="1.0.0"))
    d["identity"]["intended_use"] = "Research use only: lung fields on a chest radiograph"
    d["target"] = {"modalities": ["CR", "DX"], "body_parts": ["CHEST"],
                   "anatomy": [{"value": "816094009", "scheme": "SCT", "meaning": "Chest"}], "findings": []}
    d["task"]["classes"] = d["task"]["classes"][:1]
    d["input"] = copy.deepcopy(RADIOGRAPH_INPUT)
    return d


def knee_card_dict() -> dict:
    d = copy.deepcopy(segmentation_card_dict(name=KNEE_MODEL, version="1.0.0"))
    d["identity"]["intended_use"] = "Research use only: fracture on a knee radiograph"
    d["target"] = {"modalities": ["CR", "DX"], "body_parts": ["KNEE"],
                   "anatomy": [{"value": "72696002", "scheme": "SCT", "meaning": "Knee"}],
                   "findings": [{"value": "125605004", "scheme": "SCT", "meaning": "Fracture"}]}
    finding = {"value": "49755003", "scheme": "SCT", "meaning": "Morphologically Altered Structure"}
    d["task"] = {"type": "classification", "activation": "softmax", "classes": [
        {"label": "fracture", "category": finding,
         "type": {"value": "125605004", "scheme": "SCT", "meaning": "Fracture"}, "threshold": 0.5},
        {"label": "no fracture", "category": finding,
         "type": {"value": "17621005", "scheme": "SCT", "meaning": "Normal"}, "threshold": 0.5},
    ]}
    d["input"] = copy.deepcopy(RADIOGRAPH_INPUT)
    return d


def write_region_models(folder: Path) -> tuple[Path, Path]:
    """Pack both site models under ``folder``; returns (chest object, knee object)."""
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for name, data, graph in ((CHEST_MODEL, chest_card_dict(), segmentation_model(classes=1)),
                              (KNEE_MODEL, knee_card_dict(), classification_model(classes=2, size=64))):
        onnx_path = folder / f"{name}.onnx"
        onnx_path.write_bytes(graph)
        dcm = folder / f"{name}.dcm"
        model_object.pack_file(onnx_path, parse_card(data), dcm)
        out.append(dcm)
    return out[0], out[1]
