"""A UPS peer for tests: a pynetdicom Task Requester / watcher, with its own SCP for the
N-EVENT-REPORTs the node sends it, on a free loopback port.

Usage::

    with UpsPeer("WATCHER") as peer:                     # listens for events
        node = NodeProcess.start(..., peers=[peer.peer_entry()])
        with peer.talk(node) as assoc:
            status, _ = assoc.send_n_create(workitem_dataset(...), UnifiedProcedureStepPush, uid)
        peer.wait_events(lambda evs: ..., timeout=30)
"""

from __future__ import annotations

import datetime as dt
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from peers import free_port
from pydicom.dataset import Dataset
from pynetdicom import AE, evt
from pynetdicom.sop_class import (
    UnifiedProcedureStepEvent,
    UnifiedProcedureStepPull,
    UnifiedProcedureStepPush,
    UnifiedProcedureStepQuery,
    UnifiedProcedureStepWatch,
    UPSGlobalSubscriptionInstance,
    Verification,
)

from node.dimse.compat.reactor import install_checkpoint

UPS_CLASSES = (UnifiedProcedureStepPush, UnifiedProcedureStepPull, UnifiedProcedureStepWatch,
               UnifiedProcedureStepQuery, Verification)
GLOBAL = UPSGlobalSubscriptionInstance


@dataclass
class Event:
    event_type: int
    uid: str
    info: Dataset

    @property
    def state(self) -> str:
        return str(self.info.get("ProcedureStepState", ""))


def code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    if len(value) > 16:
        item.LongCodeValue = value
    else:
        item.CodeValue = value
    item.CodingSchemeDesignator = scheme
    item.CodeMeaning = meaning
    return item


def workitem_dataset(study_uid: str | None, retrieve_ae: str | None, *, model: str = "SELECT",
                     scheme: str = "99MODELNODE", series: list[str] | None = None,
                     destination: str | None = None, label: str = "AI on request") -> Dataset:
    """An N-CREATE Attribute List as docs/dimse.md shows it: the study (or its series) to run
    on, the AE to retrieve it from, the model (SELECT: the node's choice) and where results go."""
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.PatientName = "AIW^Request"
    ds.PatientID = "AIW-0001"
    ds.ProcedureStepState = "SCHEDULED"
    ds.ScheduledProcedureStepPriority = "MEDIUM"
    ds.InputReadinessState = "READY"
    ds.ProcedureStepLabel = label
    ds.WorklistLabel = "AI"
    ds.ScheduledProcedureStepStartDateTime = dt.datetime.now().strftime("%Y%m%d%H%M%S")
    ds.ScheduledWorkitemCodeSequence = [code(model, scheme, "Select the model that fits" if model == "SELECT"
                                             else f"Run {model}")]
    if study_uid is not None:
        item = Dataset()
        item.TypeOfInstances = "DICOM"
        item.StudyInstanceUID = study_uid
        if series:
            item.SeriesInstanceUID = series[0]
        item.ReferencedSOPSequence = []
        if retrieve_ae is not None:
            where = Dataset()
            where.RetrieveAETitle = retrieve_ae
            item.DICOMRetrievalSequence = [where]
        ds.InputInformationSequence = [item]
    if destination is not None:
        storage = Dataset()
        storage.DestinationAE = destination
        out = Dataset()
        out.DICOMStorageSequence = [storage]
        ds.OutputDestinationSequence = [out]
    return ds


class UpsPeer:
    """A pynetdicom AE that talks UPS to the node and receives its N-EVENT-REPORTs."""

    def __init__(self, ae_title: str = "WATCHER", port: int | None = None) -> None:
        self.ae_title = ae_title
        self.port = port or free_port()
        self.events: list[Event] = []
        self._cond = threading.Condition()
        self._server: Any = None

    def peer_entry(self) -> dict[str, Any]:
        """This AE as a node's ``[[peers]]`` table."""
        return {"ae_title": self.ae_title, "host": "127.0.0.1", "port": self.port}

    def _on_event(self, event: Any) -> tuple[int, None]:
        with self._cond:
            self.events.append(Event(event.event_type, str(event.request.AffectedSOPInstanceUID),
                                     event.event_information))
            self._cond.notify_all()
        return 0x0000, None

    def __enter__(self) -> UpsPeer:
        # pynetdicom 3.0.4 can let its association reactor take a response that a send_* made
        # right after another one waits for (no response, 30 s later): the node's fix, in this
        # process too (node.dimse.compat.reactor._ReactorCheckpoint; nothing else is patched).
        install_checkpoint()
        ae = AE(ae_title=self.ae_title)
        ae.add_supported_context(UnifiedProcedureStepEvent)
        ae.add_supported_context(Verification)
        self._server = ae.start_server(("127.0.0.1", self.port), block=False,
                                       evt_handlers=[(evt.EVT_N_EVENT_REPORT, self._on_event)])
        return self

    def __exit__(self, *exc: object) -> None:
        if self._server is not None:
            self._server.shutdown()

    def events_for(self, uid: str, event_type: int | None = 1) -> list[Event]:
        with self._cond:
            return [e for e in self.events if e.uid == uid and (event_type is None or e.event_type == event_type)]

    def wait_events(self, predicate: Callable[[list[Event]], bool], timeout: float, what: str) -> list[Event]:
        """Wait until ``predicate`` holds for the events received so far; returns them."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not predicate(list(self.events)):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"timed out after {timeout} s waiting for {what}; events: "
                                         f"{[(e.event_type, e.uid, e.state) for e in self.events]}")
                self._cond.wait(left)
            return list(self.events)

    def wait_states(self, uid: str, states: list[str], timeout: float) -> list[Event]:
        """Wait for UPS State Reports of ``uid`` ending with ``states`` in that order."""
        def reached(events: list[Event]) -> bool:
            seen = [e.state for e in events if e.uid == uid and e.event_type == 1]
            return seen[-len(states):] == states
        self.wait_events(reached, timeout, f"states {states} of {uid}")
        return self.events_for(uid)

    @contextmanager
    def talk(self, node: Any, calling: str | None = None) -> Iterator[Any]:
        """An association to ``node`` (anything with ae_title and port) with the UPS contexts."""
        ae = AE(ae_title=calling or self.ae_title)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
        for cls in UPS_CLASSES:
            ae.add_requested_context(cls)
        assoc = ae.associate("127.0.0.1", node.port, ae_title=node.ae_title)
        assert assoc.is_established, "the node refused the association"
        try:
            yield assoc
        finally:
            if assoc.is_established:
                assoc.release()


def status_of(status: Dataset | None) -> int:
    assert status is not None and "Status" in status, "no response"
    return int(status.Status)


def action_info(**attrs: Any) -> Dataset:
    ds = Dataset()
    for key, value in attrs.items():
        setattr(ds, key, value)
    return ds


def find(assoc: Any, **keys: Any) -> list[Dataset]:
    """C-FIND on the node's workitems (UPS Pull); returns the matches."""
    ident = Dataset()
    for key, value in keys.items():
        setattr(ident, key, value)
    out = []
    for status, found in assoc.send_c_find(ident, UnifiedProcedureStepPull):
        code = status_of(status)
        if code in (0xFF00, 0xFF01):
            out.append(found)
        else:
            assert code == 0x0000, f"C-FIND answered 0x{code:04X}"
    return out
