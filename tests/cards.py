"""Model cards for tests, as the TOML a publisher would write."""

from __future__ import annotations

import copy
import tomllib
from typing import Any

SEGMENTATION_TOML = """
schema = "modelnode.card/1"

[identity]
name = "test-lung-seg"
version = "1.0.0"
uid = ""
manufacturer = "modelnode tests"
authors = ["Test Author"]
licence = "Apache-2.0"
intended_use = "Research use only: lung segmentation on chest CT"
created = 2026-11-21

[target]
modalities = ["CT"]
body_parts = ["CHEST"]
anatomy = [
  { value = "39607008", scheme = "SCT", meaning = "Lung" },
  { value = "51185008", scheme = "SCT", meaning = "Thorax" },
]
findings = [{ value = "27925004", scheme = "SCT", meaning = "Nodule" }]

[task]
type = "segmentation"

[[task.classes]]
label = "lung"
category = { value = "91723000", scheme = "SCT", meaning = "Anatomical Structure" }
type = { value = "39607008", scheme = "SCT", meaning = "Lung" }
threshold = 0.5

[[task.classes]]
label = "nodule"
category = { value = "49755003", scheme = "SCT", meaning = "Morphologically Altered Structure" }
type = { value = "27925004", scheme = "SCT", meaning = "Nodule" }
threshold = 0.5

[input]
layout = "2d"
channels = 1
size = [0, 0]
dtype = "float32"

[input.preprocessing]
rescale = true
window = { center = -600, width = 1500 }
normalize = "minmax"
resample_size = [128, 128]

[provenance]
training_data = "synthetic test data"
performance = { dice_lung = 0.97 }
seed = 1
"""


def segmentation_card_dict(**identity: Any) -> dict[str, Any]:
    data = tomllib.loads(SEGMENTATION_TOML)
    data = copy.deepcopy(data)
    data["identity"].update(identity)
    return data


def volume_card_dict(*, orientation: str = "RAS", window: tuple[int, ...] | None = (32, 32, 32),
                     blending: str = "gaussian", name: str = "test-tissue-3d") -> dict[str, Any]:
    """A 3D card with exclusive classes as docs/model-object.md describes it, for
    onnx_factory.intensity_classes_model (background air, then lung, soft tissue, bone)."""
    d = segmentation_card_dict()
    d["identity"]["name"] = name
    sct = {"scheme": "SCT", "meaning": "Anatomical Structure", "value": "91723000"}
    d["task"] = {
        "type": "segmentation", "exclusive": True, "output": "logits", "activation": "softmax",
        "classes": [
            {"label": "lung", "category": sct, "type": {"value": "39607008", "scheme": "SCT", "meaning": "Lung"}},
            {"label": "soft tissue", "category": sct,
             "type": {"value": "87784001", "scheme": "SCT", "meaning": "Soft tissue"}},
            {"label": "bone", "category": sct, "type": {"value": "272673000", "scheme": "SCT", "meaning": "Bone"}},
        ],
    }
    d["input"] = {"layout": "3d", "channels": 1, "size": [0, 0, 0], "min_slices": 8,
                  "preprocessing": {"rescale": True, "window": {"center": -350.0, "width": 1500.0}}}
    if orientation:
        d["input"]["orientation"] = orientation
    if window:
        d["input"]["sliding_window"] = {"size": list(window), "overlap": 0.25, "blending": blending}
    return d
