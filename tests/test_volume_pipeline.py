"""A 3D patch-based model with exclusive classes in a running node: C-STORE in, SEG out; and a
model whose graph does not fit the volume fails its job with the reason while the node serves on.
"""

from __future__ import annotations

import highdicom as hd
import numpy as np
import pydicom
import pytest
from cards import volume_card_dict
from node_proc import jobs, node_process, stored_object, wait_jobs
from onnx_factory import intensity_classes_model, intensity_classes_truth, pool_concat_model
from peers import require, run

from iods import model_object
from iods.card import parse_card
from models.training.phantoms import write_ct_series

pytestmark = [pytest.mark.peers, pytest.mark.slow, pytest.mark.timeout(240)]


def _add_model(node, tmp_path, onnx_bytes: bytes, card: dict) -> None:
    name = card["identity"]["name"]
    onnx_path = tmp_path / f"{name}.onnx"
    onnx_path.write_bytes(onnx_bytes)
    dcm = tmp_path / f"{name}.dcm"
    model_object.pack_file(onnx_path, parse_card(card), dcm)
    res = node.cli("models", "add", str(dcm))
    assert res.returncode == 0, res.stderr


def _store(node, paths) -> None:
    run([require("storescu"), "-aec", node.ae_title, "127.0.0.1", str(node.port), *map(str, paths)], timeout=120)


def _windowed(paths) -> np.ndarray:
    dss = sorted((pydicom.dcmread(p) for p in paths), key=lambda ds: int(ds.InstanceNumber))
    hu = np.stack([ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept) for ds in dss])
    return np.clip((hu + 1100.0) / 1500.0, 0.0, 1.0).astype(np.float32), [ds.SOPInstanceUID for ds in dss]


def test_misfit_graph_fails_its_job_with_the_reason_then_a_3d_model_gives_its_seg(tmp_path):
    extra = {"pipeline": {"quiet_seconds": 0.5, "poll_seconds": 0.1}, "inference": {"intra_op_threads": 2}}
    with node_process(tmp_path / "node", extra=extra) as node:
        # A U-Net-like graph, a card without size_divisor or window, an odd number of slices.
        bad = volume_card_dict(name="unpadded-unet", window=None, orientation="")
        bad["task"]["classes"] = bad["task"]["classes"][:2]
        _add_model(node, tmp_path, pool_concat_model(classes=2), bad)
        _store(node, write_ct_series(tmp_path / "odd", 501, shape=(21, 64, 64)))
        [failed] = wait_jobs(node, 1)
        assert failed["state"] == "failed", failed
        assert "unpadded-unet" in failed["error"] and "[1, 1, 21, 64, 64]" in failed["error"]
        assert "mismatched dimensions" in failed["error"] and "input.size_divisor" in failed["error"]
        assert "failed" in node.log() and node.alive()

        # The node serves on: the model is replaced and the next study gets its SEG.
        assert node.cli("models", "remove", failed["model_uid"]).returncode == 0
        _add_model(node, tmp_path, intensity_classes_model(), volume_card_dict(name="tissue-3d"))
        ct = write_ct_series(tmp_path / "ct", 502, shape=(40, 128, 128))
        _store(node, ct)
        finished = wait_jobs(node, 2)
        job = next(j for j in finished if j["model_name"] == "tissue-3d")
        assert job["state"] in ("done", "exported"), job
        seg = hd.seg.segread(stored_object(node, job["results"][0]))
        assert len(jobs(node)) == 2
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["lung", "soft tissue", "bone"]
    windowed, uids = _windowed(ct)
    truth = intensity_classes_truth(windowed)
    labels = seg.get_pixels_by_source_instance(source_sop_instance_uids=uids, combine_segments=True,
                                               ignore_spatial_locations=True)
    assert labels.shape == truth.shape
    agree = float((labels == truth).mean())
    assert agree > 0.9999, agree
