"""``modelnode run`` and ``modelnode tasks`` against a running node and Orthanc.

Orthanc here is a ``[[peers]]`` entry with ``retrieve = "get"`` and does not know the node's AE
title at all, so the study can only come in by C-GET. ``run`` names one series and the model,
and gives no output AE: the result goes to the ``[export]`` routes.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest
from node_proc import node_process
from peers import orthanc, require, run
from pydicom.uid import generate_uid
from pynetdicom.sop_class import UnifiedProcedureStepPull, UnifiedProcedureStepPush
from ups_peer import UpsPeer, status_of, workitem_dataset

from models.training.phantoms import write_ct_series

pytestmark = [pytest.mark.peers, pytest.mark.slow]


def _segs_in(pacs) -> list[str]:
    out = []
    for oid in pacs.instances():
        tags = pacs.rest(f"/instances/{oid}/simplified-tags")
        if tags.get("Modality") == "SEG":
            out.append(tags["SOPInstanceUID"])
    return out


def _show(node, uid: str) -> dict:
    res = node.cli("tasks", "show", uid, "--json")
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


def _wait_state(node, uid: str, state: str, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        shown = _show(node, uid)
        if shown["state"] == state:
            return shown
        time.sleep(0.2)
    raise AssertionError(f"{uid} not {state} after {timeout} s: {shown}\n{node.log()[-4000:]}")


@pytest.mark.timeout(300)
def test_run_by_c_get_with_a_named_model_then_tasks_list_show_cancel(tmp_path: Path) -> None:
    require("storescu")
    with orthanc(tmp_path / "orthanc") as pacs, UpsPeer("WATCHER") as watcher:
        files = write_ct_series(tmp_path / "ct", 9201, slices=20)
        run(["storescu", "-aec", pacs.aet, "127.0.0.1", str(pacs.port), *map(str, files)], timeout=120)
        [study_id] = pacs.rest("/studies")
        study = pacs.rest(f"/studies/{study_id}")["MainDicomTags"]["StudyInstanceUID"]
        [series] = pacs.rest(f"/studies/{study_id}/series")
        series_uid = series["MainDicomTags"]["SeriesInstanceUID"]
        peers = [{"ae_title": "ORTHANC", "host": "127.0.0.1", "port": pacs.port, "retrieve": "get"},
                 watcher.peer_entry()]
        extra = {"pipeline": {"quiet_seconds": 1.0, "poll_seconds": 0.1},
                 "export": {"routes": [{"destinations": ["ORTHANC"]}], "poll_seconds": 0.1},
                 "inference": {"intra_op_threads": 2}, "ups": {"poll_seconds": 0.1}}
        with node_process(tmp_path / "node", peers=peers, extra=extra, reference_models=True) as node:
            # Refusals exit before anything runs: an unknown source, a model the node does not have.
            res = node.cli("run", "--study", study, "--from", "NOWHERE")
            assert res.returncode == 2 and "not a configured peer" in res.stderr
            res = node.cli("run", "--study", study, "--from", "ORTHANC", "--model", "no-such-model")
            assert res.returncode == 3 and "0x0106" in res.stderr and "no registered model" in res.stderr

            res = node.cli("run", "--study", study, "--series", series_uid, "--from", "ORTHANC",
                           "--model", "modelnode-lung-unet", "--wait", "--json", timeout=240)
            assert res.returncode == 0, res.stderr + node.log()[-4000:]
            outcome = json.loads(res.stdout)
            assert outcome["state"] == "COMPLETED"
            assert outcome["results"] == _segs_in(pacs) and len(outcome["results"]) == 1
            uid = outcome["uid"]
            assert "by C-GET" in node.log()

            shown = _show(node, uid)
            assert shown["model"] == "modelnode-lung-unet" and shown["inputs"][0]["series_uid"] == series_uid
            assert shown["performed_here"] and shown["results"] == outcome["results"]
            job = json.loads(node.cli("jobs", "show", str(shown["jobs"][0]), "--json").stdout)
            assert job["group_by"] == "series" and job["group_key"] == series_uid
            assert "limited to the requested model modelnode-lung-unet" in node.log()
            text = node.cli("tasks", "show", uid).stdout
            assert "COMPLETED" in text and outcome["results"][0] in text

            # A workitem whose inputs are not READY waits; tasks cancel ends it with the reason.
            waiting = workitem_dataset(study, "ORTHANC")
            waiting.InputReadinessState = "INCOMPLETE"
            other = generate_uid()
            with watcher.talk(node) as assoc:
                rsp, _ = assoc.send_n_create(waiting, UnifiedProcedureStepPush, other)
                assert status_of(rsp) == 0x0000
            assert _show(node, other)["state"] == "SCHEDULED"
            res = node.cli("tasks", "cancel", other, "--reason", "not needed any more")
            assert res.returncode == 0, res.stderr
            shown = _wait_state(node, other, "CANCELED")
            assert shown["reason"] == "not needed any more" and shown["jobs"] == []
            res = node.cli("tasks", "cancel", other)
            assert res.returncode == 0 and "0xB304" in res.stdout  # already canceled: a warning

            listed = json.loads(node.cli("tasks", "list", "--json").stdout)
            assert {(t["uid"], t["state"]) for t in listed} == {(uid, "COMPLETED"), (other, "CANCELED")}
            assert [t["uid"] for t in json.loads(node.cli("tasks", "list", "--state", "CANCELED", "--json").stdout)] \
                == [other]
            assert node.cli("tasks", "show", generate_uid()).returncode == 4
            assert node.cli("tasks", "cancel", generate_uid()).returncode == 4

            # INCOMPLETE -> READY by N-SET: the node takes it then.
            later = workitem_dataset(study, "ORTHANC", series=[series_uid])
            later.InputReadinessState = "INCOMPLETE"
            third = generate_uid()
            with watcher.talk(node) as assoc:
                rsp, _ = assoc.send_n_create(later, UnifiedProcedureStepPush, third)
                assert status_of(rsp) == 0x0000
                assert _show(node, third)["state"] == "SCHEDULED"
                mods = later.__class__()
                mods.InputReadinessState = "READY"
                rsp, _ = assoc.send_n_set(mods, UnifiedProcedureStepPull, third)
                assert status_of(rsp) == 0x0000
            assert _wait_state(node, third, "COMPLETED", 180)["results"] == outcome["results"]


@pytest.mark.timeout(60)
def test_run_without_a_running_node_exits_6(tmp_path: Path) -> None:
    from node_proc import MODELNODE, REPO, write_config
    from peers import free_port

    cfg = write_config(tmp_path / "modelnode.toml",
                       {"node": {"port": free_port()}, "storage": {"data_dir": str(tmp_path / "data")}},
                       [{"ae_title": "PACS", "host": "127.0.0.1", "port": free_port()}])
    res = subprocess.run([*MODELNODE, "--config", str(cfg), "run", "--study", "1.2.3", "--from", "PACS",
                          "--timeout", "5"], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert res.returncode == 6 and "not answering" in res.stderr
