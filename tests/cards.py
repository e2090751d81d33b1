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
