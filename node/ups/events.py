"""N-EVENT-REPORT delivery to subscribers (UPS Event SOP Class, PS3.4 CC.2.4).

The node opens an association to each subscriber (a ``[[peers]]`` entry: its Receiving AE
Title) and sends the reports there, on a thread of its own so that no DIMSE handler and no
performer step waits on a subscriber. Reports to one subscriber go out in the order they were
made, over one association for as many as are waiting. A subscriber that cannot be reached is
tried again after 1, 2, 4 ... s (at most 30 s), ``attempts`` times for the report at the head of
its queue, which is then dropped with a WARNING naming it; a subscriber that answers a failure
status has its report dropped at once (it said no). Reports are not kept across a restart: a
subscriber that missed one reads the state with N-GET or C-FIND.

Event types are those of PS3.4 Table CC.2.4-1 (:data:`STATE_REPORT` ...); each report names the
UPS Event SOP Class and the workitem's SOP Instance UID.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field

from pydicom.dataset import Dataset
from pynetdicom import AE, build_context
from pynetdicom.sop_class import UnifiedProcedureStepEvent

from node.config import Config
from node.dimse.status import category
from node.dimse.syntaxes import UNCOMPRESSED
from node.scu.client import NO_RETRY, PeerError, associate
from node.ups.calling import peer_address, peer_options

log = logging.getLogger("modelnode.ups")

STATE_REPORT = 1
CANCEL_REQUESTED = 2
PROGRESS_REPORT = 3
SCP_STATUS_CHANGE = 4
ASSIGNED = 5
EVENT_NAMES = {STATE_REPORT: "UPS State Report", CANCEL_REQUESTED: "UPS Cancel Requested",
               PROGRESS_REPORT: "UPS Progress Report", SCP_STATUS_CHANGE: "SCP Status Change",
               ASSIGNED: "UPS Assigned"}

MAX_DELAY = 30.0


@dataclass
class Report:
    """One N-EVENT-REPORT for one subscriber."""

    ae_title: str
    event_type: int
    workitem_uid: str
    info: Dataset
    attempts: int = 0

    def describe(self) -> str:
        state = self.info.get("ProcedureStepState", "")
        return f"{EVENT_NAMES.get(self.event_type, self.event_type)}{f' {state}' if state else ''} of {self.workitem_uid}"


@dataclass
class _Queue:
    reports: deque[Report] = field(default_factory=deque)
    due: float = 0.0  # monotonic time of the next attempt


class EventSender:
    """Queues reports per subscriber and delivers them on one thread (see the module docstring)."""

    def __init__(self, cfg: Config, *, attempts: int = 3, base_delay: float = 1.0, timeout: float = 30.0) -> None:
        self.cfg = cfg
        self.attempts = attempts
        self.base_delay = base_delay
        self.timeout = timeout
        self._queues: dict[str, _Queue] = {}
        self._cond = threading.Condition()
        self._stop = False
        self._thread: threading.Thread | None = None
        self._busy = 0  # reports taken off a queue and not yet answered
        self.delivered = 0
        self.dropped = 0

    def send(self, ae_title: str, event_type: int, workitem_uid: str, info: Dataset) -> None:
        """Queue one report for ``ae_title``; never blocks on the network."""
        with self._cond:
            q = self._queues.setdefault(ae_title, _Queue())
            q.reports.append(Report(ae_title, event_type, workitem_uid, info))
            self._cond.notify_all()

    def pending(self) -> int:
        with self._cond:
            return self._busy + sum(len(q.reports) for q in self._queues.values())

    def flush(self, timeout: float, *, due_only: bool = False) -> bool:
        """Wait until every queued report (with ``due_only``: every one due now, not those
        waiting to be tried again) was delivered or dropped; False on timeout."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._busy or any(q.reports and (not due_only or q.due <= time.monotonic())
                                    for q in self._queues.values()):
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
        return True

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="modelnode-ups-events", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Deliver what is due within ``timeout``, then stop (what is left is dropped, logged);
        a subscriber waiting for its next try does not hold the shutdown."""
        self.flush(timeout, due_only=True)
        with self._cond:
            self._stop = True
            left = sum(len(q.reports) for q in self._queues.values())
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
        if left:
            log.warning("UPS events: %d report(s) not delivered at shutdown", left)

    # ------------------------------------------------------------------ the thread

    def _next(self) -> tuple[str, list[Report]] | None:
        """Under the lock: the reports of the first subscriber that is due, taken off its queue."""
        now = time.monotonic()
        for ae, q in self._queues.items():
            if q.reports and q.due <= now:
                batch = list(q.reports)
                q.reports.clear()
                self._busy += len(batch)
                return ae, batch
        return None

    def _wait_time(self) -> float | None:
        dues = [q.due for q in self._queues.values() if q.reports]
        return max(0.0, min(dues) - time.monotonic()) if dues else None

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._stop:
                    taken = self._next()
                    if taken is not None:
                        break
                    self._cond.wait(self._wait_time())
                else:
                    return
            ae, batch = taken
            sent = 0
            try:
                sent = self._deliver(ae, batch)
                failure = None
            except (PeerError, LookupError) as exc:
                failure = exc
            except Exception as exc:  # noqa: BLE001 (a bug here must not stop every later report)
                log.exception("UPS events: delivering to %s", ae)
                failure = exc
            with self._cond:
                self._busy -= len(batch)
                rest = batch[sent:]
                q = self._queues.setdefault(ae, _Queue())
                if failure is not None and rest:
                    head = rest[0]
                    head.attempts += 1
                    if head.attempts >= self.attempts or isinstance(failure, LookupError):
                        log.warning("UPS events: %s to %s dropped after %d attempt(s): %s", head.describe(), ae,
                                    head.attempts, failure)
                        self.dropped += 1
                        rest = rest[1:]
                        q.due = 0.0
                    else:
                        delay = min(MAX_DELAY, self.base_delay * 2 ** (head.attempts - 1))
                        log.warning("UPS events: %s to %s failed (attempt %d of %d), next in %.0f s: %s",
                                    head.describe(), ae, head.attempts, self.attempts, delay, failure)
                        q.due = time.monotonic() + delay
                # Put back what was not sent, ahead of anything queued meanwhile: order is kept.
                q.reports.extendleft(reversed(rest))
                self._cond.notify_all()

    def _deliver(self, ae_title: str, batch: list[Report]) -> int:
        """Send ``batch`` to ``ae_title`` over one association; returns how many were answered."""
        peer = peer_address(self.cfg, ae_title)
        options = peer_options(self.cfg, ae_title, retry=NO_RETRY, timeout=self.timeout)
        ae = AE(ae_title=options.calling_ae)
        ae.acse_timeout, ae.dimse_timeout = options.acse_timeout, options.dimse_timeout
        ae.network_timeout, ae.connection_timeout = options.network_timeout, options.connect_timeout
        assoc = associate(ae, peer, contexts=[build_context(UnifiedProcedureStepEvent, list(UNCOMPRESSED))],
                          tls=options.tls)
        answered = 0
        try:
            if not assoc.accepted_contexts:
                raise PeerError(f"{peer} does not accept the UPS Event SOP Class", transient=False)
            for report in batch:
                status, _ = assoc.send_n_event_report(report.info, report.event_type, UnifiedProcedureStepEvent,
                                                      report.workitem_uid)
                code = int(status.Status) if status is not None and "Status" in status else None
                if code is None:
                    raise PeerError(f"no answer from {peer} (association aborted or timed out)", transient=True)
                answered += 1
                if category(code) == "failure":
                    self.dropped += 1
                    log.warning("UPS events: %s to %s refused with 0x%04X", report.describe(), ae_title, code)
                else:
                    self.delivered += 1
                    log.info("UPS events: %s sent to %s", report.describe(), ae_title)
        finally:
            if assoc.is_established:
                assoc.release()
        return answered
