"""AI on request, end to end (IHE AIW-I): a UPS workitem for a study that exists only in Orthanc.

A pynetdicom UPS SCU (tests/ups_peer.py) subscribes to the node's workitems and N-CREATEs one
naming a chest CT held by Orthanc. The node claims it, retrieves the study from Orthanc by
C-MOVE (or C-GET), runs the reference lung U-Net through its pipeline, stores the SEG in Orthanc
and completes the workitem with Output Information referencing the SEG. Faults: the source PACS
down, the node SIGKILLed while the workitem is IN PROGRESS.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from node_proc import NodeProcess, node_process, query
from peers import free_port, orthanc, require, run
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom.sop_class import UnifiedProcedureStepPush, UnifiedProcedureStepWatch
from ups_peer import GLOBAL, UpsPeer, action_info, find, status_of, workitem_dataset

from models.training.phantoms import write_ct_series

pytestmark = [pytest.mark.peers, pytest.mark.slow]

NODE_AE = "MODELNODE"


def _ct_in_orthanc(pacs, tmp_path: Path, seed: int, slices: int = 24, size: int = 256) -> tuple[str, str]:
    """A generated chest CT stored into Orthanc only; (Study, Series Instance UID)."""
    files = write_ct_series(tmp_path / f"ct{seed}", seed, slices=slices, size=size)
    run(["storescu", "-aec", pacs.aet, "127.0.0.1", str(pacs.port), *map(str, files)], timeout=120)
    [study] = pacs.rest("/studies")
    tags = pacs.rest(f"/studies/{study}")["MainDicomTags"]
    [series] = pacs.rest(f"/studies/{study}/series")
    return tags["StudyInstanceUID"], series["MainDicomTags"]["SeriesInstanceUID"]


def _segs_in(pacs) -> list[str]:
    """SOP Instance UIDs of the SEGs Orthanc holds."""
    out = []
    for oid in pacs.instances():
        tags = pacs.rest(f"/instances/{oid}/simplified-tags")
        if tags.get("Modality") == "SEG":
            out.append(tags["SOPInstanceUID"])
    return out


def _wait(predicate, timeout: float, what: str, node: NodeProcess | None = None, poll: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}" + (f"\n{node.log()[-6000:]}" if node else ""))


def _subscribe(watcher: UpsPeer, node: NodeProcess) -> None:
    with watcher.talk(node) as assoc:
        rsp, _ = assoc.send_n_action(action_info(ReceivingAE=watcher.ae_title, DeletionLock="FALSE"), 3,
                                     UnifiedProcedureStepWatch, GLOBAL)
        assert status_of(rsp) == 0x0000


def _create(watcher: UpsPeer, node: NodeProcess, ds: Dataset) -> str:
    uid = generate_uid()
    with watcher.talk(node) as assoc:
        rsp, _ = assoc.send_n_create(ds, UnifiedProcedureStepPush, uid)
        assert status_of(rsp) == 0x0000, f"N-CREATE answered 0x{status_of(rsp):04X}"
    return uid


def _workitem(node: NodeProcess, uid: str) -> dict:
    res = node.cli("tasks", "show", uid, "--json")
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


def _node_config(pacs_port: int, watcher: UpsPeer, **ups: object) -> tuple[list[dict], dict]:
    peers = [{"ae_title": "ORTHANC", "host": "127.0.0.1", "port": pacs_port}, watcher.peer_entry()]
    extra = {
        "pipeline": {"quiet_seconds": 1.0, "poll_seconds": 0.1},
        "export": {"poll_seconds": 0.1, "base_delay_seconds": 0.5, "max_delay_seconds": 1.0},
        "inference": {"intra_op_threads": 2},
        "ups": {"poll_seconds": 0.1, **ups},
    }
    return peers, extra


@pytest.mark.timeout(300)
def test_workitem_retrieves_runs_stores_and_completes_with_the_seg(tmp_path: Path) -> None:
    require("storescu")
    node_port = free_port()
    with (UpsPeer("WATCHER") as watcher,
          orthanc(tmp_path / "orthanc", modalities={NODE_AE: (NODE_AE, "127.0.0.1", node_port)}) as pacs):
        study, _ = _ct_in_orthanc(pacs, tmp_path, 9101)
        peers, extra = _node_config(pacs.port, watcher)
        with node_process(tmp_path / "node", port=node_port, peers=peers, extra=extra,
                          reference_models=True) as node:
            assert query(node, "SELECT COUNT(*) FROM study WHERE study_uid = ?", study) == [(0,)]  # only in Orthanc
            _subscribe(watcher, node)
            uid = _create(watcher, node, workitem_dataset(study, "ORTHANC", destination="ORTHANC",
                                                          label="Lung segmentation"))
            events = watcher.wait_states(uid, ["SCHEDULED", "IN PROGRESS", "COMPLETED"], 240)
            assert [e.state for e in events] == ["SCHEDULED", "IN PROGRESS", "COMPLETED"]

            [seg_uid] = _segs_in(pacs)
            with watcher.talk(node) as assoc:
                rsp, attrs = assoc.send_n_get([], UnifiedProcedureStepPush, uid)
                assert status_of(rsp) == 0x0000 and attrs.ProcedureStepState == "COMPLETED"
                performed = attrs.UnifiedProcedureStepPerformedProcedureSequence[0]
                [output] = performed.OutputInformationSequence
                assert [r.ReferencedSOPInstanceUID for r in output.ReferencedSOPSequence] == [seg_uid]
                assert output.ReferencedSOPSequence[0].ReferencedSOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4"
                assert output.StudyInstanceUID == study
                assert "ORTHANC" in list(output.DICOMRetrievalSequence[0].RetrieveAETitle)
                assert performed.PerformedWorkitemCodeSequence[0].CodingSchemeDesignator == "99MODELNODE"
                assert performed.PerformedProcedureStepEndDateTime
                # C-FIND on the node's UPS finds the completed workitem.
                [found] = find(assoc, ProcedureStepState="COMPLETED", SOPInstanceUID="", ProcedureStepLabel="")
                assert found.SOPInstanceUID == uid and found.ProcedureStepLabel == "Lung segmentation"

            # One job, run by the pipeline as any other: selection, timings, audit, export.
            shown = _workitem(node, uid)
            assert shown["state"] == "COMPLETED" and shown["results"] == [seg_uid]
            [job_id] = shown["jobs"]
            job = json.loads(node.cli("jobs", "show", str(job_id), "--json").stdout)
            assert job["state"] == "exported" and job["model_name"] == "modelnode-lung-unet"
            assert job["selection"][0]["ranked"][0]["name"] == "modelnode-lung-unet"
            assert job["timings"]["inference_total"] > 0
            assert [e["destination"] for e in job["exports"]] == ["ORTHANC"]
            assert shown["timings"]["retrieve"] > 0
            # The instances the C-MOVE brought in became this job, not a job of their own.
            assert len(json.loads(node.cli("jobs", "list", "--json").stdout)) == 1
            assert query(node, "SELECT COUNT(*) FROM arrival") == [(0,)]
            assert query(node, "SELECT COUNT(*) FROM hold") == [(0,)]
            audit = [json.loads(line) for line in (node.data_dir / "audit.jsonl").read_text().splitlines()]
            assert [a["event"] for a in audit].count("result-exported") == 1
            trail = [a for a in audit if a["event"] == "workitem" and a["workitem_uid"] == uid]
            assert [(a["state"], a["by"]) for a in trail] == [("SCHEDULED", "WATCHER"), ("IN PROGRESS", "node"),
                                                              ("COMPLETED", "node")]
            assert trail[0]["study_uids"] == [study] and trail[-1]["results"] == [seg_uid]
            assert f"UPS {uid} COMPLETED: 1 result(s) {seg_uid}" in node.log()


@pytest.mark.timeout(240)
def test_source_pacs_down_cancels_the_workitem_after_the_configured_retries(tmp_path: Path) -> None:
    with UpsPeer("WATCHER") as watcher:
        peers, extra = _node_config(free_port(), watcher, retrieve_attempts=3, retrieve_base_delay=0.2,
                                    retrieve_max_delay=0.5)
        with node_process(tmp_path / "node", peers=peers, extra=extra, reference_models=True) as node:
            _subscribe(watcher, node)
            uid = _create(watcher, node, workitem_dataset(generate_uid(), "ORTHANC"))
            events = watcher.wait_states(uid, ["SCHEDULED", "IN PROGRESS", "CANCELED"], 120)
            reason = events[-1].info.ReasonForCancellation
            assert "inputs not retrieved" in reason and "after 3 attempt(s)" in reason, reason
            assert "cannot connect to ORTHANC" in reason
            assert events[-1].info.ProcedureStepDiscontinuationReasonCodeSequence[0].CodeValue == "110523"
            assert node.log().count("C-MOVE from ORTHANC@127.0.0.1") >= 2  # the retries, logged
            shown = _workitem(node, uid)
            assert shown["state"] == "CANCELED" and shown["reason"] == reason and shown["jobs"] == []
            assert query(node, "SELECT COUNT(*) FROM hold") == [(0,)]
            # The node keeps serving: the next workitem is taken (and fails the same way).
            second = _create(watcher, node, workitem_dataset(generate_uid(), "ORTHANC"))
            watcher.wait_states(second, ["IN PROGRESS", "CANCELED"], 120)


@pytest.mark.parametrize("stage", ["retrieve", "run"])
@pytest.mark.timeout(420)
def test_node_killed_while_in_progress_completes_once_after_restart(tmp_path: Path, stage: str) -> None:
    require("storescu")
    node_port = free_port()
    with (UpsPeer("WATCHER") as watcher,
          orthanc(tmp_path / "orthanc", modalities={NODE_AE: (NODE_AE, "127.0.0.1", node_port)}) as pacs):
        # "run": a series large enough that the model is still running when the kill comes.
        slices, size = (40, 256) if stage == "retrieve" else (120, 512)
        study, _ = _ct_in_orthanc(pacs, tmp_path, 9102, slices=slices, size=size)
        peers, extra = _node_config(pacs.port, watcher)
        # The model must run in the job to be killed there, not during the quiet time.
        extra["pipeline"]["head_start"] = False
        with node_process(tmp_path / "node", port=node_port, peers=peers, extra=extra,
                          reference_models=True) as node:
            _subscribe(watcher, node)
            uid = _create(watcher, node, workitem_dataset(study, "ORTHANC", destination="ORTHANC"))
            if stage == "retrieve":
                _wait(lambda: query(node, "SELECT stage FROM ups_workitem WHERE uid = ?", uid) == [("retrieve",)],
                      60, "the retrieve", node, poll=0.01)
            else:
                _wait(lambda: "job 1: selection for series" in node.log(), 180, "the job running", node, poll=0.01)
            node.kill()
            node.restart()
            events = watcher.wait_states(uid, ["COMPLETED"], 300)
            assert [e.state for e in events].count("COMPLETED") == 1
            shown = _workitem(node, uid)
            assert shown["state"] == "COMPLETED"
            assert len(_segs_in(pacs)) == 1 and shown["results"] == _segs_in(pacs)
            if stage == "retrieve":
                assert shown["attempts"] == 2 and "resuming after a restart (attempt 2)" in node.log()
            else:
                [job_id] = shown["jobs"]
                job = json.loads(node.cli("jobs", "show", str(job_id), "--json").stdout)
                assert job["attempts"] == 2 and job["state"] == "exported"
            audit = [json.loads(line) for line in (node.data_dir / "audit.jsonl").read_text().splitlines()]
            assert [a["event"] for a in audit].count("result-exported") == 1
            assert len(json.loads(node.cli("jobs", "list", "--json").stdout)) == 1


@pytest.mark.timeout(240)
def test_contradicted_series_cancels_the_workitem_with_both_readings_and_sends_nothing(tmp_path: Path) -> None:
    """Issue 20 through AI on request: a chest radiograph labelled KNEE, asked for by a workitem.

    The selection holds the job (the images contradict the header); the workitem is CANCELED
    with the contradiction as its reason, and no result reaches the PACS.
    """
    import pydicom
    from pydicom.data import get_testdata_file

    require("storescu")
    node_port = free_port()
    ds = pydicom.dcmread(get_testdata_file("RG1_UNCR.dcm"))
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = generate_uid(), generate_uid(), generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.BodyPartExamined = "KNEE"
    knee_labelled_chest = tmp_path / "rg1_knee.dcm"
    ds.save_as(knee_labelled_chest, enforce_file_format=True)
    with (UpsPeer("WATCHER") as watcher,
          orthanc(tmp_path / "orthanc", modalities={NODE_AE: (NODE_AE, "127.0.0.1", node_port)}) as pacs):
        run(["storescu", "-aec", pacs.aet, "127.0.0.1", str(pacs.port), str(knee_labelled_chest)], timeout=60)
        before = set(pacs.instances())
        peers, extra = _node_config(pacs.port, watcher)
        with node_process(tmp_path / "node", port=node_port, peers=peers, extra=extra,
                          reference_models=True) as node:
            _subscribe(watcher, node)
            uid = _create(watcher, node, workitem_dataset(str(ds.StudyInstanceUID), "ORTHANC", destination="ORTHANC"))
            events = watcher.wait_states(uid, ["SCHEDULED", "IN PROGRESS", "CANCELED"], 180)
            reason = events[-1].info.ReasonForCancellation
            assert "held for review" in reason and "the header says Knee" in reason and "Chest p=" in reason, reason
            shown = _workitem(node, uid)
            assert shown["state"] == "CANCELED" and shown["results"] == []
            [job_id] = shown["jobs"]
            job = json.loads(node.cli("jobs", "show", str(job_id), "--json").stdout)
            assert (job["state"], job["outcome"], job["results"]) == ("held", "contradiction", []), job
            audit = [json.loads(line) for line in (node.data_dir / "audit.jsonl").read_text().splitlines()]
            assert any(a["event"] == "selection-contradiction" for a in audit)
            assert query(node, "SELECT COUNT(*) FROM outboxitem") == [(0,)]
        assert set(pacs.instances()) == before  # nothing was sent to the PACS
