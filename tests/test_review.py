"""Verdicts on AI results (docs/review.md): corrections and accept/reject sent back by storescu.

One node runs the reference lung model on a phantom; the test sends it what a reading room
would: the truth as a MANUAL SEG, a correction on the wrong grid, a correction for a series the
node never saw, and an accepting KOS; and rejects with ``modelnode review``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
from corrections import correction_seg, truth_masks
from node_proc import node_process, query, stored_object, wait_jobs
from peers import free_port, require, run

from models.training.phantoms import ct_truth, write_ct_series
from node.review import kos

pytestmark = [pytest.mark.peers, pytest.mark.slow]

ROOT = Path(__file__).resolve().parent.parent
LUNG = ROOT / "models" / "reference" / "lung_unet.dcm"
SEED, SLICES = 9001, 12


def _store(node, *paths: Path) -> None:
    require("storescu")
    run(["storescu", "-R", "-aec", node.ae_title, "127.0.0.1", str(node.port), *map(str, paths)], timeout=120)


def _verdict(node, sop_uid: str, timeout: float = 60) -> dict:
    """The verdict row once processed (its state is no longer ``received``)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rows = query(node, "SELECT state, reason, model_uid, result_uid, dice, kind FROM verdict WHERE sop_uid = ?",
                     sop_uid)
        if rows and rows[0][0] != "received":
            state, reason, model_uid, result_uid, dice, kind = rows[0]
            return {"state": state, "reason": reason, "model_uid": model_uid, "result_uid": result_uid,
                    "dice": json.loads(dice), "kind": kind}
        time.sleep(0.1)
    raise AssertionError(f"verdict {sop_uid} not processed\n{node.log()[-4000:]}")


@pytest.mark.timeout(240)
def test_corrections_and_verdicts_are_linked_counted_and_refused_with_reasons(tmp_path):
    metrics_port = free_port()
    extra = {"pipeline": {"quiet_seconds": 1.0, "poll_seconds": 0.1}, "inference": {"intra_op_threads": 2},
             "metrics": {"enabled": True, "port": metrics_port}}
    with node_process(tmp_path / "node", extra=extra) as node:
        assert node.cli("models", "add", str(LUNG)).returncode == 0
        ct = write_ct_series(tmp_path / "ct", SEED, slices=SLICES)
        _store(node, *ct)
        [job] = wait_jobs(node, 1)
        assert job["state"] == "done", job
        [result_uid] = job["results"] if isinstance(job["results"], list) else json.loads(job["results"])
        ai_seg = pydicom.dcmread(stored_object(node, result_uid))
        sources = [pydicom.dcmread(p, stop_before_pixels=True) for p in ct]
        truth = ct_truth(SEED, slices=SLICES)

        # 1. The truth as a correction: linked to the result and the model, Dice of AI vs it.
        good = correction_seg(ai_seg, sources, truth_masks(truth, sources))
        good.save_as(tmp_path / "good.dcm")
        _store(node, tmp_path / "good.dcm")
        v = _verdict(node, good.SOPInstanceUID)
        assert v["state"] == "linked", v
        assert (v["kind"], v["model_uid"], v["result_uid"]) == ("correction", job["model_uid"], result_uid)
        assert v["dice"]["lung"] >= 0.9, v

        # 2. The wrong grid: stored (clinical data), refused as a correction, with a log line.
        small = []
        for ds in sources:
            ds = ds.copy()
            ds.Rows = ds.Columns = 128
            ds.PixelSpacing = [float(x) * 2 for x in ds.PixelSpacing]
            small.append(ds)
        bad = correction_seg(ai_seg, small, truth_masks(truth, sources)[:, ::2, ::2])
        bad.save_as(tmp_path / "bad.dcm")
        _store(node, tmp_path / "bad.dcm")
        v = _verdict(node, bad.SOPInstanceUID)
        assert v["state"] == "refused" and v["reason"].startswith("geometry"), v
        assert f"verdict {bad.SOPInstanceUID}" in node.log() and "geometry" in node.log()

        # 3. A series the node never saw: kept, flagged, not trained on.
        other = write_ct_series(tmp_path / "other", SEED + 50, slices=6)
        other_ds = [pydicom.dcmread(p, stop_before_pixels=True) for p in other]
        stray = correction_seg(ai_seg, other_ds, truth_masks(ct_truth(SEED + 50, slices=6), other_ds))
        stray.save_as(tmp_path / "stray.dcm")
        _store(node, tmp_path / "stray.dcm")
        assert _verdict(node, stray.SOPInstanceUID)["state"] == "unknown-source"

        # 4. Accept as a KOS sent by storescu; reject from the command line.
        accept = kos.build(ai_seg, "accept")
        accept.save_as(tmp_path / "accept.dcm")
        _store(node, tmp_path / "accept.dcm")
        v = _verdict(node, accept.SOPInstanceUID)
        assert (v["state"], v["kind"], v["result_uid"]) == ("linked", "accept", result_uid), v
        res = node.cli("review", "reject", result_uid, "--reviewer", "dr test")
        assert res.returncode == 0, res.stderr

        # Counted per model: models show and the metrics endpoint.
        shown = json.loads(node.cli("models", "show", job["model_uid"], "--json").stdout)
        counts = shown["verdicts"]
        assert (counts["accepted"], counts["rejected"], counts["corrected"]) == (1, 1, 1), counts
        assert counts["acceptance_rate"] == round(1 / 3, 4) and counts["dice_ai_vs_correction"] > 0.3
        from node.ops.metrics import scrape

        samples = scrape(f"http://127.0.0.1:{metrics_port}/metrics")
        corrected = [v for labels, v in samples["modelnode_verdicts"]
                     if labels == {"model_uid": job["model_uid"], "verdict": "corrected"}]
        assert corrected == [1.0], samples.get("modelnode_verdicts")
        audit = [json.loads(line) for line in (node.data_dir / "audit.jsonl").read_text().splitlines()]
        assert sum(1 for a in audit if a["event"] == "verdict") == 5

        # A verdict stored but not linked when the node stopped is linked at the next start.
        node.stop()
        import sqlite3

        con = sqlite3.connect(node.data_dir / "modelnode.db")
        con.execute("UPDATE verdict SET state = 'received', dice = '{}' WHERE sop_uid = ?", (good.SOPInstanceUID,))
        con.commit()
        con.close()
        node.restart()
        v = _verdict(node, good.SOPInstanceUID)
        assert v["state"] == "linked" and v["dice"]["lung"] >= 0.9, v

        # Nothing replaced: the source series and the AI result are as they were.
        assert len(query(node, "SELECT i.id FROM instance i JOIN series s ON i.series_id = s.id "
                               "WHERE s.series_uid = ?", str(sources[0].SeriesInstanceUID))) == SLICES
        assert np.array_equal(pydicom.dcmread(stored_object(node, result_uid)).pixel_array, ai_seg.pixel_array)
