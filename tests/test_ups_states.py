"""The UPS state machine (PS3.4 Table CC.1.1-2), workitem parsing and C-FIND matching, without a
network: node.ups.states, node.ups.workitem, node.ups.match."""

from __future__ import annotations

import pytest
from pydicom.dataset import Dataset
from ups_peer import workitem_dataset

from node.ups import match, states, workitem
from node.ups.states import CANCELED, COMPLETED, IN_PROGRESS, SCHEDULED

TX, OTHER = "1.2.3.100", "1.2.3.200"

# (current, requested, transaction UID given) -> (status, new state); the held UID is TX.
CHANGE_STATE = [
    (SCHEDULED, IN_PROGRESS, TX, 0x0000, IN_PROGRESS),
    (SCHEDULED, IN_PROGRESS, "", 0xC301, None),
    (IN_PROGRESS, IN_PROGRESS, OTHER, 0xC302, None),
    (COMPLETED, IN_PROGRESS, TX, 0xC300, None),
    (CANCELED, IN_PROGRESS, TX, 0xC300, None),
    (SCHEDULED, COMPLETED, TX, 0xC310, None),
    (IN_PROGRESS, COMPLETED, TX, 0x0000, COMPLETED),
    (IN_PROGRESS, COMPLETED, OTHER, 0xC301, None),
    (IN_PROGRESS, COMPLETED, "", 0xC301, None),
    (COMPLETED, COMPLETED, TX, 0xB306, None),
    (CANCELED, COMPLETED, TX, 0xC300, None),
    (SCHEDULED, CANCELED, TX, 0xC310, None),
    (IN_PROGRESS, CANCELED, TX, 0x0000, CANCELED),
    (IN_PROGRESS, CANCELED, OTHER, 0xC301, None),
    (CANCELED, CANCELED, TX, 0xB304, None),
    (COMPLETED, CANCELED, TX, 0xC311, None),
    (SCHEDULED, SCHEDULED, TX, 0xC303, None),
    (IN_PROGRESS, SCHEDULED, TX, 0xC303, None),
    (IN_PROGRESS, "DONE", TX, 0x0115, None),
]


@pytest.mark.timeout(10)
@pytest.mark.parametrize(("current", "requested", "given", "status", "new"), CHANGE_STATE)
def test_change_state_follows_the_transition_table(current, requested, given, status, new) -> None:
    held = TX if current != SCHEDULED else ""
    verdict = states.change_state(current, requested, given, held)
    assert (verdict.status, verdict.new_state) == (status, new)
    assert verdict.ok == (status == 0x0000)
    assert verdict.reason or verdict.ok


@pytest.mark.timeout(10)
def test_completion_needs_the_final_state_attributes() -> None:
    ds = Dataset()
    problem = workitem.final_state_problem(ds, COMPLETED)
    assert "Performed Procedure Sequence" in problem
    verdict = states.change_state(IN_PROGRESS, COMPLETED, TX, TX, problem)
    assert verdict.status == 0xC304 and verdict.reason == problem
    workitem.complete(ds, [], ["MODELNODE"], started="20260101120000", model=("m", "model m"), station="MODELNODE")
    assert workitem.final_state_problem(ds, COMPLETED) == ""
    assert workitem.final_state_problem(Dataset(), CANCELED) == ""


@pytest.mark.timeout(10)
@pytest.mark.parametrize(("current", "status", "new"), [
    (SCHEDULED, 0x0000, CANCELED), (IN_PROGRESS, 0x0000, None), (CANCELED, 0xB304, None), (COMPLETED, 0xC311, None),
])
def test_request_cancel(current, status, new) -> None:
    verdict = states.request_cancel(current)
    assert (verdict.status, verdict.new_state) == (status, new)


@pytest.mark.timeout(10)
@pytest.mark.parametrize(("current", "given", "status"), [
    (SCHEDULED, "", 0x0000), (IN_PROGRESS, TX, 0x0000), (IN_PROGRESS, OTHER, 0xC301), (IN_PROGRESS, "", 0xC301),
    (COMPLETED, TX, 0xC300), (CANCELED, TX, 0xC300),
])
def test_n_set(current, given, status) -> None:
    assert states.may_set(current, given, TX if current != SCHEDULED else "").status == status


def _task(ds: Dataset) -> workitem.Task:
    return workitem.parse_task(ds, is_peer=lambda ae: ae in ("PACS", "PACS2"), own_ae="MODELNODE",
                               is_model=lambda m: m == "modelnode-lung-unet")


@pytest.mark.timeout(10)
def test_parse_task_reads_model_inputs_and_destinations() -> None:
    ds = workitem_dataset("1.2.3.4", "PACS", model="modelnode-lung-unet", series=["1.2.3.4.5"], destination="PACS2")
    assert ds.ScheduledWorkitemCodeSequence[0].LongCodeValue == "modelnode-lung-unet"  # longer than SH
    task = _task(ds)
    assert task.model == "modelnode-lung-unet"
    assert task.inputs == (workitem.Input("1.2.3.4", ("1.2.3.4.5",), "PACS"),)
    assert task.destinations == ("PACS2",)
    assert _task(workitem_dataset("1.2.3.4", "MODELNODE")).inputs[0].retrieve_ae == ""  # already here
    assert _task(workitem_dataset("1.2.3.4", "PACS")).destinations is None  # the export routes
    assert workitem.requested_model(workitem_dataset("1.2.3.4", "PACS")) == ""  # SELECT
    assert workitem.requested_model(workitem_dataset("1.2.3.4", "PACS", model="X", scheme="99OTHER")) is None


@pytest.mark.timeout(10)
def test_the_request_modelnode_run_sends_parses_back() -> None:
    ds = workitem.request("1.2.3.4", "PACS", series_uids=["1.2.3.4.5", "1.2.3.4.6"], model="modelnode-lung-unet",
                          destinations=["PACS2"])
    task = _task(ds)
    assert task.inputs == (workitem.Input("1.2.3.4", ("1.2.3.4.5", "1.2.3.4.6"), "PACS"),)
    assert task.model == "modelnode-lung-unet" and task.destinations == ("PACS2",)
    assert workitem.check_create(ds) == []


@pytest.mark.timeout(10)
def test_check_create_fills_in_and_refuses() -> None:
    ds = workitem_dataset("1.2.3.4", "PACS")
    del ds.ScheduledProcedureStepPriority
    del ds.InputReadinessState
    assert workitem.check_create(ds) == ["Scheduled Procedure Step Priority MEDIUM", "Input Readiness State READY"]
    ds.TransactionUID = TX
    with pytest.raises(workitem.Refused) as refused:
        workitem.check_create(ds)
    assert refused.value.status == 0x0106
    ds = workitem_dataset("1.2.3.4", "PACS")
    ds.ProcedureStepState = "COMPLETED"
    with pytest.raises(workitem.Refused) as refused:
        workitem.check_create(ds)
    assert refused.value.status == 0xC309


@pytest.mark.timeout(10)
def test_matching() -> None:
    ds = workitem_dataset("1.2.3.4", "PACS", label="Lung segmentation")
    ds.SOPInstanceUID = "1.2.3.9"
    ds.ScheduledProcedureStepStartDateTime = "20261203091500"

    def q(**keys) -> Dataset:
        ident = Dataset()
        for k, v in keys.items():
            setattr(ident, k, v)
        return ident

    assert match.matches(q(ProcedureStepState="SCHEDULED", ProcedureStepLabel=""), ds)
    assert not match.matches(q(ProcedureStepState="COMPLETED"), ds)
    assert match.matches(q(ProcedureStepLabel="Lung*"), ds)
    assert match.matches(q(PatientName="aiw^req*"), ds)  # PN ignores case
    assert match.matches(q(SOPInstanceUID=["1.2.3.8", "1.2.3.9"]), ds)  # UID list
    assert match.matches(q(ScheduledProcedureStepStartDateTime="20261203-20261204"), ds)
    assert not match.matches(q(ScheduledProcedureStepStartDateTime="20261204-"), ds)
    code = Dataset()
    code.CodingSchemeDesignator = "99MODELNODE"
    code.CodeValue = ""
    assert match.matches(q(ScheduledWorkitemCodeSequence=[code]), ds)
    code.CodingSchemeDesignator = "DCM"
    assert not match.matches(q(ScheduledWorkitemCodeSequence=[code]), ds)
    ident = q(ProcedureStepLabel="", TransactionUID="", ScheduledWorkitemCodeSequence=[Dataset()])
    ds.TransactionUID = TX  # never kept in a workitem, but never returned either
    answer = match.response(ident, ds)
    assert answer.ProcedureStepLabel == "Lung segmentation" and "TransactionUID" not in answer
    assert answer.ScheduledWorkitemCodeSequence[0].CodeValue == "SELECT"
