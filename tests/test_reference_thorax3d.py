"""The shipped 3D thorax U-Net (models/reference/thorax_unet3d.dcm) through a running node:
held-out chest CT phantoms in by storescu, SEG out, Dice per class on the source grid.

The phantoms are held out from training (seeds 6000-6007 of ``scripts/train_reference --only
chest3d``; training used 3000-3039). One 256 x 256 and one 512 x 512 series: the SEG is
compared with :func:`models.training.phantoms.ct_labels` at the series' own resolution.
"""

from __future__ import annotations

from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from node_proc import node_process, stored_object, wait_jobs
from peers import require, run

from models.training.phantoms import ct_labels, write_ct_series

pytestmark = [pytest.mark.peers, pytest.mark.slow, pytest.mark.timeout(300)]

MODEL = Path(__file__).resolve().parent.parent / "models" / "reference" / "thorax_unet3d.dcm"
CLASSES = {1: "left lung", 2: "right lung", 3: "heart"}
# (seed, in-plane size, slices) from CHEST3D_HELDOUT in models/training/train.py.
CASES = [(6001, 256, 90), (6005, 512, 120)]


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * float(np.logical_and(a, b).sum()) / max(1.0, float(a.sum() + b.sum()))


def test_shipped_3d_model_segments_held_out_chest_ct_through_the_node(tmp_path: Path) -> None:
    storescu = require("storescu")
    extra = {"pipeline": {"quiet_seconds": 0.5, "poll_seconds": 0.1}}
    series = {seed: write_ct_series(tmp_path / f"ct{seed}", seed, size=size, slices=slices)
              for seed, size, slices in CASES}
    with node_process(tmp_path / "node", extra=extra) as node:
        res = node.cli("models", "add", str(MODEL))
        assert res.returncode == 0, res.stderr
        for paths in series.values():
            run([storescu, "-aec", node.ae_title, "127.0.0.1", str(node.port), *map(str, paths)], timeout=120)
        finished = wait_jobs(node, len(CASES), timeout=240)
        segs = {}
        for job in finished:
            assert job["state"] in ("done", "exported") and job["model_name"] == "modelnode-thorax-unet3d", job
            segs[job["group_key"]] = hd.seg.segread(stored_object(node, job["results"][0]))

    for seed, size, slices in CASES:
        sources = sorted((pydicom.dcmread(p, stop_before_pixels=True) for p in series[seed]),
                         key=lambda ds: int(ds.InstanceNumber))
        seg = segs[str(sources[0].SeriesInstanceUID)]
        assert {int(s.SegmentNumber): s.SegmentLabel for s in seg.SegmentSequence} == CLASSES
        labels = seg.get_pixels_by_source_instance(
            source_sop_instance_uids=[str(ds.SOPInstanceUID) for ds in sources], combine_segments=True,
            ignore_spatial_locations=True)
        truth = ct_labels(seed, size=size, slices=slices)
        assert labels.shape == truth.shape == (slices, size, size)
        dice = {name: _dice(labels == k, truth == k) for k, name in CLASSES.items()}
        # The bar: 0.95 per lung at full resolution; the heart is reported by the card.
        assert dice["left lung"] >= 0.95 and dice["right lung"] >= 0.95, (seed, dice)
        assert dice["heart"] >= 0.8, (seed, dice)
