"""The UPS SCP of a running node, driven by a pynetdicom UPS SCU that is also the subscriber the
node sends its N-EVENT-REPORTs to (PS3.4 Annex CC: Push, Pull, Watch, Event, Query).

Workitems coded in a scheme other than 99MODELNODE are not the node's to perform: the SCU
claims and completes them itself, as a Task Performer pulling from the node's worklist would.
One node serves the module; each test makes its own workitems.
"""

from __future__ import annotations

import datetime as dt
import time

import pytest
from node_proc import NodeProcess, query
from peers import free_port
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom.sop_class import (
    UnifiedProcedureStepPull,
    UnifiedProcedureStepPush,
    UnifiedProcedureStepWatch,
)
from ups_peer import GLOBAL, UpsPeer, action_info, code, find, status_of, workitem_dataset

pytestmark = [pytest.mark.peers]

CHANGE_STATE, REQUEST_CANCEL, SUBSCRIBE, UNSUBSCRIBE, SUSPEND = 1, 2, 3, 4, 5
OTHER = "99OTHERPERFORMER"  # a scheme that is not the node's: the worklist only


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    work = tmp_path_factory.mktemp("ups")
    with UpsPeer("WATCHER") as watcher, UpsPeer("WATCHER2") as second:
        # GHOST is a peer nobody answers for: reports to it fail.
        node = NodeProcess.start(work / "node", peers=[watcher.peer_entry(), second.peer_entry(),
                                                        {"ae_title": "PACS", "host": "127.0.0.1", "port": 9},
                                                        {"ae_title": "GHOST", "host": "127.0.0.1", "port": free_port()},
                                                        {"ae_title": "NOTASKS", "host": "127.0.0.1", "port": 9,
                                                         "permissions": ["echo", "query", "retrieve"]}],
                                 extra={"pipeline": {"poll_seconds": 0.1},
                                        "ups": {"poll_seconds": 0.1, "event_attempts": 2}})
        try:
            with watcher.talk(node) as assoc:
                rsp, _ = assoc.send_n_action(action_info(ReceivingAE="WATCHER", DeletionLock="FALSE"), SUBSCRIBE,
                                             UnifiedProcedureStepWatch, GLOBAL)
                assert status_of(rsp) == 0x0000
            yield node, watcher, second
        finally:
            node.stop()


def _wait_log(node: NodeProcess, text: str, timeout: float = 10.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        log = node.log()
        if text in log:
            return log
        time.sleep(0.05)
    raise AssertionError(f"{text!r} not in the node's log after {timeout} s\n{node.log()[-3000:]}")


def _foreign(label: str = "for another performer") -> Dataset:
    return workitem_dataset(generate_uid(), "PACS", model="12345", scheme=OTHER, label=label)


def _create(assoc, ds: Dataset, uid: str | None = None) -> tuple[int, str]:
    uid = uid or generate_uid()
    rsp, _ = assoc.send_n_create(ds, UnifiedProcedureStepPush, uid)
    return status_of(rsp), uid


def _change(assoc, uid: str, state: str, transaction_uid: str | None) -> Dataset:
    info = action_info(ProcedureStepState=state)
    if transaction_uid is not None:
        info.TransactionUID = transaction_uid
    rsp, _ = assoc.send_n_action(info, CHANGE_STATE, UnifiedProcedureStepPull, uid)
    return rsp


def _performed(end: bool = True) -> Dataset:
    """What a performer writes before COMPLETED: the Performed Procedure Sequence."""
    item = Dataset()
    item.PerformedProcedureStepStartDateTime = dt.datetime.now().strftime("%Y%m%d%H%M%S")
    if end:
        item.PerformedProcedureStepEndDateTime = dt.datetime.now().strftime("%Y%m%d%H%M%S")
    item.OutputInformationSequence = []
    mods = Dataset()
    mods.UnifiedProcedureStepPerformedProcedureSequence = [item]
    return mods


@pytest.mark.timeout(90)
def test_pull_claim_complete_with_the_statuses_and_events_of_each_step(env) -> None:
    node, watcher, _ = env
    with watcher.talk(node) as assoc:
        status, uid = _create(assoc, _foreign())
        assert status == 0x0000
        watcher.wait_states(uid, ["SCHEDULED"], 15)

        # UPS Pull: the worklist query finds it SCHEDULED, N-GET reads it.
        [found] = find(assoc, SOPInstanceUID=uid, ProcedureStepState="", ProcedureStepLabel="",
                       ScheduledWorkitemCodeSequence=[Dataset()])
        assert found.ProcedureStepState == "SCHEDULED" and found.ProcedureStepLabel == "for another performer"
        assert found.ScheduledWorkitemCodeSequence[0].CodingSchemeDesignator == OTHER
        rsp, attrs = assoc.send_n_get([0x00741000, 0x00100020, 0x00081195], UnifiedProcedureStepPush, uid)
        assert status_of(rsp) == 0x0000
        assert attrs.ProcedureStepState == "SCHEDULED" and attrs.PatientID == "AIW-0001"
        assert "TransactionUID" not in attrs or not attrs.TransactionUID

        # Claim: COMPLETED before the claim is 0xC310, the claim itself needs a Transaction UID.
        assert status_of(_change(assoc, uid, "COMPLETED", generate_uid())) == 0xC310
        assert status_of(_change(assoc, uid, "IN PROGRESS", None)) == 0xC301
        tx = generate_uid()
        assert status_of(_change(assoc, uid, "IN PROGRESS", tx)) == 0x0000
        watcher.wait_states(uid, ["SCHEDULED", "IN PROGRESS"], 15)

        # Someone else: a second claim, an N-SET and a completion without the right UID.
        assert status_of(_change(assoc, uid, "IN PROGRESS", generate_uid())) == 0xC302
        mods = _performed()
        mods.TransactionUID = generate_uid()
        rsp, _ = assoc.send_n_set(mods, UnifiedProcedureStepPull, uid)
        assert status_of(rsp) == 0xC301
        assert status_of(_change(assoc, uid, "COMPLETED", generate_uid())) == 0xC301
        assert status_of(_change(assoc, uid, "SCHEDULED", tx)) == 0xC303
        # The performer: COMPLETED needs the final state attributes first (0xC304).
        assert status_of(_change(assoc, uid, "COMPLETED", tx)) == 0xC304
        mods = _performed()
        mods.TransactionUID = tx
        rsp, _ = assoc.send_n_set(mods, UnifiedProcedureStepPull, uid)
        assert status_of(rsp) == 0x0000
        assert status_of(_change(assoc, uid, "COMPLETED", tx)) == 0x0000
        watcher.wait_states(uid, ["SCHEDULED", "IN PROGRESS", "COMPLETED"], 15)
        assert status_of(_change(assoc, uid, "COMPLETED", tx)) == 0xB306  # already: a warning

        # Bad input on a final workitem: each with its status and a log line that says why.
        rsp, _ = assoc.send_n_set(_performed(), UnifiedProcedureStepPull, uid)
        assert status_of(rsp) == 0xC300
        assert "ErrorComment" in rsp and "COMPLETED" in rsp.ErrorComment
        _wait_log(node, f"N-SET UPS {uid} from WATCHER refused with 0xC300: the UPS is COMPLETED and may no longer be updated")
        rsp, _ = assoc.send_n_action(action_info(ReasonForCancellation="too late"), REQUEST_CANCEL,
                                     UnifiedProcedureStepPush, uid)
        assert status_of(rsp) == 0xC311
        [done] = find(assoc, SOPInstanceUID=uid, ProcedureStepState="COMPLETED")
        assert done.SOPInstanceUID == uid
    assert [e.state for e in watcher.events_for(uid)] == ["SCHEDULED", "IN PROGRESS", "COMPLETED"]


@pytest.mark.timeout(60)
def test_unknown_uid_and_duplicate_create_get_their_status_and_a_log_line(env) -> None:
    node, watcher, _ = env
    unknown = generate_uid()
    with watcher.talk(node) as assoc:
        assert status_of(_change(assoc, unknown, "IN PROGRESS", generate_uid())) == 0xC307
        _wait_log(node, f"N-ACTION Change UPS State to IN PROGRESS UPS {unknown} from WATCHER refused with 0xC307: "
                  f"no UPS {unknown}")
        rsp, _ = assoc.send_n_get([], UnifiedProcedureStepPush, unknown)
        assert status_of(rsp) == 0xC307
        _wait_log(node, f"N-GET UPS {unknown} from WATCHER refused with 0xC307")
        # An N-GET of all attributes is valid; pynetdicom 3.0.4's own message logger used to raise on it.
        assert "Exception raised in user's 'evt.EVT_DIMSE_RECV'" not in node.log()
        rsp, _ = assoc.send_n_action(action_info(ReasonForCancellation="x"), REQUEST_CANCEL,
                                     UnifiedProcedureStepPush, unknown)
        assert status_of(rsp) == 0xC307

        status, uid = _create(assoc, _foreign())
        assert status == 0x0000
        status, _ = _create(assoc, _foreign(), uid)
        assert status == 0x0111
        _wait_log(node, f"N-CREATE UPS {uid} from WATCHER refused with 0x0111: a UPS with SOP Instance UID {uid} "
                  "exists already")
        rsp, _ = assoc.send_n_action(action_info(ReceivingAE="WATCHER"), 9, UnifiedProcedureStepPush, uid)
        assert status_of(rsp) == 0x0123
        assert len(find(assoc, SOPInstanceUID=uid)) == 1


@pytest.mark.parametrize(("case", "status", "said"), [
    ("no input sequence", 0x0120, "Input Information Sequence (0040,4021) is missing"),
    ("empty input sequence", 0x0121, "Input Information Sequence (0040,4021) is empty"),
    ("no retrieve AE", 0x0106, "item 1: no Retrieve AE Title"),
    ("unknown retrieve AE", 0x0106, "item 1: Retrieve AE Title 'NOWHERE' is not a configured peer"),
    ("no study", 0x0106, "item 1: no valid Study Instance UID"),
    ("unknown model", 0x0106, "no registered model 'no-such-model'"),
    ("unknown destination", 0x0106, "Destination AE 'NOWHERE' is not a configured peer"),
    ("not scheduled", 0xC309, "Procedure Step State is 'IN PROGRESS', not SCHEDULED"),
])
@pytest.mark.timeout(60)
def test_malformed_workitems_are_refused_at_create_and_the_node_keeps_serving(env, case, status, said) -> None:
    node, watcher, _ = env
    study = generate_uid()
    ds = workitem_dataset(study, "PACS")
    if case == "no input sequence":
        del ds.InputInformationSequence
    elif case == "empty input sequence":
        ds.InputInformationSequence = []
    elif case == "no retrieve AE":
        del ds.InputInformationSequence[0].DICOMRetrievalSequence
    elif case == "unknown retrieve AE":
        ds.InputInformationSequence[0].DICOMRetrievalSequence[0].RetrieveAETitle = "NOWHERE"
    elif case == "no study":
        del ds.InputInformationSequence[0].StudyInstanceUID
    elif case == "unknown model":
        ds = workitem_dataset(study, "PACS", model="no-such-model")
    elif case == "unknown destination":
        ds = workitem_dataset(study, "PACS", destination="NOWHERE")
    elif case == "not scheduled":
        ds.ProcedureStepState = "IN PROGRESS"
    with watcher.talk(node) as assoc:
        got, uid = _create(assoc, ds)
        assert got == status, f"0x{got:04X}"
        _wait_log(node, f"N-CREATE UPS {uid} from WATCHER refused with 0x{status:04X}: ")
        assert said in node.log()
        assert find(assoc, SOPInstanceUID=uid) == []
        # Still serving, on the same association: a valid workitem goes in.
        got, _ = _create(assoc, _foreign())
        assert got == 0x0000
    assert node.alive()


@pytest.mark.timeout(60)
def test_cancel_request_on_a_scheduled_workitem_cancels_it_with_the_reason(env) -> None:
    node, watcher, _ = env
    with watcher.talk(node) as assoc:
        status, uid = _create(assoc, _foreign())
        assert status == 0x0000
        info = action_info(ReasonForCancellation="ordered twice", ContactDisplayName="Dr. Who")
        info.ProcedureStepDiscontinuationReasonCodeSequence = [code("110510", "DCM", "Duplicate order")]
        rsp, _ = assoc.send_n_action(info, REQUEST_CANCEL, UnifiedProcedureStepPush, uid)
        assert status_of(rsp) == 0x0000
        events = watcher.wait_states(uid, ["SCHEDULED", "IN PROGRESS", "CANCELED"], 15)
        assert events[-1].info.ReasonForCancellation == "ordered twice"
        assert events[-1].info.ProcedureStepDiscontinuationReasonCodeSequence[0].CodeValue == "110510"
        rsp, attrs = assoc.send_n_get([], UnifiedProcedureStepPush, uid)
        assert attrs.ProcedureStepState == "CANCELED"
        progress = attrs.ProcedureStepProgressInformationSequence[0]
        assert progress.ReasonForCancellation == "ordered twice"
        rsp, _ = assoc.send_n_action(info, REQUEST_CANCEL, UnifiedProcedureStepPush, uid)
        assert status_of(rsp) == 0xB304  # already canceled: a warning
        assert status_of(_change(assoc, uid, "IN PROGRESS", generate_uid())) == 0xC300


@pytest.mark.timeout(60)
def test_subscriptions_per_workitem_and_their_refusals(env) -> None:
    node, watcher, second = env
    with watcher.talk(node) as assoc:
        status, uid = _create(assoc, _foreign())
        assert status == 0x0000
        # WATCHER2 watches this workitem only: it gets its current state at once.
        rsp, _ = assoc.send_n_action(action_info(ReceivingAE="WATCHER2", DeletionLock="FALSE"), SUBSCRIBE,
                                     UnifiedProcedureStepWatch, uid)
        assert status_of(rsp) == 0x0000
        second.wait_states(uid, ["SCHEDULED"], 15)
        rsp, _ = assoc.send_n_action(action_info(ReceivingAE="STRANGER"), SUBSCRIBE, UnifiedProcedureStepWatch, uid)
        assert status_of(rsp) == 0xC308
        rsp, _ = assoc.send_n_action(action_info(ReceivingAE="WATCHER2"), SUBSCRIBE, UnifiedProcedureStepWatch,
                                     generate_uid())
        assert status_of(rsp) == 0xC307
        rsp, _ = assoc.send_n_action(action_info(ReceivingAE="WATCHER2"), SUSPEND, UnifiedProcedureStepWatch, uid)
        assert status_of(rsp) == 0xC314
        rsp, _ = assoc.send_n_action(action_info(ReceivingAE="WATCHER2"), UNSUBSCRIBE, UnifiedProcedureStepWatch, uid)
        assert status_of(rsp) == 0x0000
    rows = query(node, "SELECT ae_title FROM ups_subscription WHERE workitem_uid = ?", uid)
    assert rows == [("WATCHER",)]


@pytest.mark.timeout(60)
def test_a_peer_without_the_tasks_permission_gets_no_ups_context(env) -> None:
    node, watcher, _ = env
    with watcher.talk(node, calling="NOTASKS") as assoc:
        accepted = {str(cx.abstract_syntax) for cx in assoc.accepted_contexts}
        assert accepted == {"1.2.840.10008.1.1"}  # Verification only: UPS Push/Pull/Watch/Query refused
    with watcher.talk(node) as assoc:
        assert str(UnifiedProcedureStepPush) in {str(cx.abstract_syntax) for cx in assoc.accepted_contexts}


@pytest.mark.timeout(60)
def test_a_subscriber_that_cannot_be_reached_delays_no_one_and_is_given_up_on(env) -> None:
    node, watcher, _ = env
    with watcher.talk(node) as assoc:
        status, uid = _create(assoc, _foreign())
        assert status == 0x0000
        rsp, _ = assoc.send_n_action(action_info(ReceivingAE="GHOST"), SUBSCRIBE, UnifiedProcedureStepWatch, uid)
        assert status_of(rsp) == 0x0000
        tx = generate_uid()
        assert status_of(_change(assoc, uid, "IN PROGRESS", tx)) == 0x0000
    # WATCHER hears of the claim while GHOST's first report still waits for its next try.
    watcher.wait_states(uid, ["SCHEDULED", "IN PROGRESS"], 15)
    _wait_log(node, f"UPS events: UPS State Report SCHEDULED of {uid} to GHOST dropped after 2 attempt(s): "
              "cannot connect to GHOST", timeout=30)
    _wait_log(node, f"UPS events: UPS State Report IN PROGRESS of {uid} to GHOST dropped after 2 attempt(s)",
              timeout=30)


@pytest.mark.timeout(90)
def test_workitems_and_subscriptions_survive_a_restart(env) -> None:
    node, watcher, _ = env
    with watcher.talk(node) as assoc:
        status, uid = _create(assoc, _foreign("kept across restarts"))
        assert status == 0x0000
        tx = generate_uid()
        assert status_of(_change(assoc, uid, "IN PROGRESS", tx)) == 0x0000
    node.restart()
    with watcher.talk(node) as assoc:
        [found] = find(assoc, SOPInstanceUID=uid, ProcedureStepState="", ProcedureStepLabel="")
        assert found.ProcedureStepState == "IN PROGRESS" and found.ProcedureStepLabel == "kept across restarts"
        # The claim survives too: only its Transaction UID moves it on.
        assert status_of(_change(assoc, uid, "CANCELED", generate_uid())) == 0xC301
        assert status_of(_change(assoc, uid, "CANCELED", tx)) == 0x0000
    # The global subscription survived: the restarted node still reports to WATCHER.
    watcher.wait_states(uid, ["IN PROGRESS", "CANCELED"], 15)
