"""Pull mode: one node as UPS Pull SCU of another Task Manager (``[ups] pull_from``).

The manager here is a second modelnode with ``[ups] perform = false`` (a worklist only), so the
workitem lives there as it would in a RIS's or PACS's Task Manager; a pynetdicom requester
creates it there and watches it there. The performer node finds it by C-FIND, claims it, reads
it, retrieves the study from Orthanc, runs the lung U-Net, stores the SEG in Orthanc and writes
the outcome back: the manager's workitem ends COMPLETED with Output Information referencing the
SEG, and a workitem the performer cannot perform is claimed and CANCELED there with the reason.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from node_proc import node_process
from peers import free_port, orthanc, require, run
from pydicom.uid import generate_uid
from pynetdicom.sop_class import UnifiedProcedureStepPush, UnifiedProcedureStepWatch
from ups_peer import GLOBAL, UpsPeer, action_info, status_of, workitem_dataset

from models.training.phantoms import write_ct_series

pytestmark = [pytest.mark.peers, pytest.mark.slow]


@pytest.mark.timeout(300)
def test_performer_pulls_a_workitem_from_a_task_manager_and_writes_the_outcome_back(tmp_path: Path) -> None:
    require("storescu")
    performer_port = free_port()
    with (UpsPeer("REQUESTER") as requester,
          orthanc(tmp_path / "orthanc", modalities={"PERFORMER": ("PERFORMER", "127.0.0.1", performer_port)}) as pacs):
        files = write_ct_series(tmp_path / "ct", 9301, slices=20)
        run(["storescu", "-aec", pacs.aet, "127.0.0.1", str(pacs.port), *map(str, files)], timeout=120)
        [study_id] = pacs.rest("/studies")
        study = pacs.rest(f"/studies/{study_id}")["MainDicomTags"]["StudyInstanceUID"]
        orthanc_peer = {"ae_title": "ORTHANC", "host": "127.0.0.1", "port": pacs.port}
        manager_port = free_port()
        # The manager does not know ORTHANC: as a worklist only, it checks a workitem's form, not
        # whether it could retrieve the inputs itself.
        with node_process(tmp_path / "manager", ae_title="MANAGER", port=manager_port,
                          peers=[requester.peer_entry()],
                          extra={"ups": {"perform": False}}) as manager:
            with requester.talk(manager) as assoc:
                rsp, _ = assoc.send_n_action(action_info(ReceivingAE="REQUESTER"), 3, UnifiedProcedureStepWatch, GLOBAL)
                assert status_of(rsp) == 0x0000
                uid, refused = generate_uid(), generate_uid()
                rsp, _ = assoc.send_n_create(workitem_dataset(study, "ORTHANC", destination="ORTHANC"),
                                             UnifiedProcedureStepPush, uid)
                assert status_of(rsp) == 0x0000
            requester.wait_states(uid, ["SCHEDULED"], 15)
            manager_peer = {"ae_title": "MANAGER", "host": "127.0.0.1", "port": manager_port}
            extra = {"pipeline": {"quiet_seconds": 1.0, "poll_seconds": 0.1},
                     "export": {"poll_seconds": 0.1}, "inference": {"intra_op_threads": 2},
                     "ups": {"pull_from": ["MANAGER"], "pull_seconds": 0.5, "poll_seconds": 0.1}}
            with node_process(tmp_path / "performer", ae_title="PERFORMER", port=performer_port,
                              peers=[orthanc_peer, manager_peer], extra=extra,
                              reference_models=True) as performer:
                events = requester.wait_states(uid, ["SCHEDULED", "IN PROGRESS", "COMPLETED"], 240)
                assert [e.state for e in events] == ["SCHEDULED", "IN PROGRESS", "COMPLETED"]
                segs = [t["SOPInstanceUID"] for t in (pacs.rest(f"/instances/{i}/simplified-tags")
                                                      for i in pacs.instances()) if t.get("Modality") == "SEG"]
                assert len(segs) == 1
                with requester.talk(manager) as assoc:
                    rsp, attrs = assoc.send_n_get([0x00741000, 0x00741216], UnifiedProcedureStepPush, uid)
                    assert attrs.ProcedureStepState == "COMPLETED"
                    [output] = attrs.UnifiedProcedureStepPerformedProcedureSequence[0].OutputInformationSequence
                    assert [r.ReferencedSOPInstanceUID for r in output.ReferencedSOPSequence] == segs
                local = json.loads(performer.cli("tasks", "show", uid, "--json").stdout)
                assert local["state"] == "COMPLETED" and local["requester"] == "MANAGER"

                # One it cannot perform: a source the performer does not know.
                with requester.talk(manager) as assoc:
                    ds = workitem_dataset(study, "REQUESTER")
                    rsp, _ = assoc.send_n_create(ds, UnifiedProcedureStepPush, refused)
                    assert status_of(rsp) == 0x0000
                events = requester.wait_states(refused, ["SCHEDULED", "IN PROGRESS", "CANCELED"], 60)
                assert "not a configured peer" in events[-1].info.ReasonForCancellation
                assert performer.cli("tasks", "show", refused).returncode == 4  # never kept there
            assert "written back to MANAGER" in performer.log()
