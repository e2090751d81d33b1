"""Every change to a workitem, in one place: for the DIMSE handlers (node.ups.scp), the node's own
performer (node.ups.performer) and the CLI.

Each operation checks the request against the state machine (node.ups.states), writes the new
state in one transaction under the node's write lock, and only then queues the N-EVENT-REPORTs
for the workitem's subscribers (node.ups.events). Answers are :class:`~node.ups.states.Verdict`
objects: the DIMSE status, the new state, and the reason a refusal gives in its Error Comment
and log line.

Who may change a workitem IN PROGRESS is whoever holds its Transaction UID. The node's own
claims (:meth:`UpsService.claim`) make one it keeps to itself (``claimed_here``); to a peer the
node is then a performer like any other, and a peer's change without that UID is refused
(0xC301).
"""

from __future__ import annotations

import datetime as _dt
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom.sop_class import UnifiedProcedureStepPush

from iods.uids import valid_uid
from node.context import NodeContext
from node.dimse.status import (
    DUPLICATE_SOP_INSTANCE,
    INVALID_ATTRIBUTE_VALUE,
    SUCCESS,
    UPS_ACTION_NOT_APPROPRIATE,
    UPS_CREATED_WITH_MODIFICATIONS,
    UPS_NO_SUCH_INSTANCE,
    UPS_UNKNOWN_RECEIVING_AE,
    category,
)
from node.ops.audit import WORKITEM, AuditLog
from node.storage.db import write_transaction
from node.storage.registry import ModelRecord
from node.ups import match, states, subscriptions, workitem
from node.ups.events import CANCEL_REQUESTED, STATE_REPORT, EventSender
from node.ups.states import CANCELED, COMPLETED, FINAL, IN_PROGRESS, SCHEDULED, Verdict
from node.ups.store import Workitem, encode_dataset, get, save

log = logging.getLogger("modelnode.ups")

PRIORITY_ORDER = {"HIGH": 0, "MEDIUM": 1, "LOW": 2}


def _now() -> _dt.datetime:
    return _dt.datetime.now()


@dataclass(frozen=True)
class Created:
    """The answer to an N-CREATE: the status, the workitem's UID and why (refusals, warnings)."""

    status: int
    uid: str
    reason: str = ""

    @property
    def ok(self) -> bool:
        """Created (success, or a warning such as 0xB300)."""
        return category(self.status) != "failure"


class UpsService:
    """The UPS SCP's state, over the node's database; ``events`` delivers the reports."""

    def __init__(self, ctx: NodeContext, events: EventSender | None = None, audit: AuditLog | None = None) -> None:
        self.ctx = ctx
        cfg = ctx.config
        self.events = events if events is not None else EventSender(cfg, attempts=cfg.ups.event_attempts)
        # Who asked for what on which study, and how it ended (docs/operations.md, "workitem").
        self.audit = audit if audit is not None else AuditLog(cfg.audit_path, enabled=False)
        # The performer registers here to be woken when there is work (a workitem created,
        # made READY, or a cancel requested for one it performs); pull mode to be told when a
        # workitem becomes final (it writes the outcome back to the Task Manager).
        self.on_work: Callable[[], None] = lambda: None
        self.on_final: Callable[[str], None] = lambda uid: None

    # ------------------------------------------------------------------ helpers

    def _is_model(self, name_or_uid: str) -> bool:
        return ModelRecord.select().where((ModelRecord.uid == name_or_uid) | (ModelRecord.name == name_or_uid)).exists()

    def _is_peer(self, ae_title: str) -> bool:
        return self.ctx.config.peer(ae_title) is not None

    def task_of(self, ds: Dataset, *, here: bool = True) -> workitem.Task:
        """The task of a workitem addressed to the node; raises :class:`workitem.Refused`.

        ``here=False`` checks the form only: a node that keeps the worklist for another
        performer (``[ups] perform = false``) cannot judge that performer's peers and models."""
        anything = lambda _: True  # noqa: E731
        return workitem.parse_task(ds, is_peer=self._is_peer if here else anything,
                                   own_ae=self.ctx.config.node.ae_title, is_model=self._is_model if here else anything)

    def _report(self, uid: str, ds: Dataset, *states_reached: str) -> None:
        """A UPS State Report of each state in turn to every subscriber of ``uid``."""
        for ae in subscriptions.receivers(uid):
            for state in states_reached:
                self.events.send(ae, STATE_REPORT, uid, workitem.state_report(ds, state))

    # ------------------------------------------------------------------ UPS Push

    def create(self, ds: Dataset, uid: str | None, requester: str) -> Created:
        """N-CREATE: check, fill in, keep; then tell the global subscribers (UPS State Report,
        SCHEDULED). ``uid``: the request's Affected SOP Instance UID (None: the node makes one)."""
        uid = str(uid or ds.get("SOPInstanceUID") or generate_uid())
        if not valid_uid(uid):
            return Created(INVALID_ATTRIBUTE_VALUE, uid, f"{uid!r} is not a UID")
        try:
            filled = workitem.check_create(ds)
            model = workitem.requested_model(ds)
            performed_here = model is not None and self.ctx.config.ups.perform
            if model is not None:
                # Refused now, with the reason, rather than canceled later: the requester is
                # still on the line and can correct it.
                self.task_of(ds, here=performed_here)
        except workitem.Refused as exc:
            return Created(exc.status, uid, exc.reason)
        ds.SOPClassUID = UnifiedProcedureStepPush
        ds.SOPInstanceUID = uid
        with self.ctx.write_lock, write_transaction(self.ctx.app.db):
            if get(uid) is not None:
                return Created(DUPLICATE_SOP_INSTANCE, uid, f"a UPS with SOP Instance UID {uid} exists already")
            Workitem.create(uid=uid, state=SCHEDULED, performed_here=performed_here, requester=requester[:16],
                            label=workitem.text(ds, "ProcedureStepLabel")[:64],
                            priority=workitem.text(ds, "ScheduledProcedureStepPriority"),
                            readiness=workitem.text(ds, "InputReadinessState"),
                            dataset=encode_dataset(ds))
            watchers = subscriptions.on_created(uid, ds)
        log.info("UPS %s created by %s (%s)%s%s", uid, requester or "?",
                 "performed here" if performed_here else "for another performer",
                 f", model {model or 'selected by the node'}" if model is not None else "",
                 f"; filled in {', '.join(filled)}" if filled else "")
        studies = [workitem.text(i, "StudyInstanceUID") for i in ds.get("InputInformationSequence") or []]
        self.audit.record(WORKITEM, workitem_uid=uid, state=SCHEDULED, by=requester, study_uids=studies,
                          model=None if model is None else (model or "SELECT"))
        for ae in watchers:
            self.events.send(ae, STATE_REPORT, uid, workitem.state_report(ds, SCHEDULED))
        if performed_here:
            self.on_work()
        if filled:
            return Created(UPS_CREATED_WITH_MODIFICATIONS, uid, "filled in " + ", ".join(filled))
        return Created(SUCCESS, uid)

    def adopt(self, ds: Dataset, uid: str, *, manager: str, transaction_uid: str) -> Created:
        """Pull mode: keep a copy of the workitem ``uid`` the node claimed at the Task Manager
        ``manager`` with ``transaction_uid``, for the performer (checked as an N-CREATE is)."""
        if get(uid) is not None:
            return Created(DUPLICATE_SOP_INSTANCE, uid, f"a UPS with SOP Instance UID {uid} exists already")
        if "TransactionUID" in ds:
            del ds.TransactionUID
        try:
            workitem.check_create(ds)
            if workitem.requested_model(ds) is None:
                raise workitem.Refused(INVALID_ATTRIBUTE_VALUE, f"no Scheduled Workitem Code in {workitem.SCHEME}")
            self.task_of(ds)
        except workitem.Refused as exc:
            return Created(exc.status, uid, exc.reason)
        ds.SOPClassUID = UnifiedProcedureStepPush
        ds.SOPInstanceUID = uid
        with self.ctx.write_lock, write_transaction(self.ctx.app.db):
            Workitem.create(uid=uid, state=SCHEDULED, performed_here=True, requester=manager[:16],
                            label=workitem.text(ds, "ProcedureStepLabel")[:64],
                            priority=workitem.text(ds, "ScheduledProcedureStepPriority"),
                            readiness=workitem.text(ds, "InputReadinessState"), dataset=encode_dataset(ds),
                            remote_ae=manager[:16], remote_transaction_uid=transaction_uid)
            watchers = subscriptions.on_created(uid, ds)
        self.audit.record(WORKITEM, workitem_uid=uid, state=SCHEDULED, by=manager, pulled_from=manager)
        for ae in watchers:
            self.events.send(ae, STATE_REPORT, uid, workitem.state_report(ds, SCHEDULED))
        self.on_work()
        return Created(SUCCESS, uid)

    def request_cancel(self, uid: str, info: Dataset, requester: str) -> Verdict:
        """N-ACTION Request UPS Cancel (action 2)."""
        with self.ctx.write_lock, write_transaction(self.ctx.app.db):
            item = get(uid)
            if item is None:
                return Verdict(UPS_NO_SUCH_INSTANCE, reason=f"no UPS {uid}")
            verdict = states.request_cancel(item.state)
            if not verdict.ok:
                return verdict
            ds = item.read()
            reason = workitem.text(info, "ReasonForCancellation") or f"cancel requested by {requester or '?'}"
            if verdict.new_state == CANCELED:
                codes = info.get("ProcedureStepDiscontinuationReasonCodeSequence")
                code = (workitem.REASON_UNSPECIFIED if not codes else
                        (workitem.text(codes[0], "CodeValue") or workitem.text(codes[0], "LongCodeValue"),
                         workitem.text(codes[0], "CodingSchemeDesignator"), workitem.text(codes[0], "CodeMeaning")))
                workitem.cancel(ds, reason, code)
                save(item, ds, state=CANCELED, reason=reason, finished_at=_now(), stage="")
            elif item.claimed_here:
                save(item, cancel_requested=reason)
        if verdict.new_state == CANCELED:
            # PS3.4 CC.2.4.3.1: a SCHEDULED workitem is canceled by the SCP as if it had been
            # claimed and then canceled, and the subscribers see both states.
            log.info("UPS %s canceled at the request of %s (it was SCHEDULED): %s", uid, requester or "?", reason)
            self.audit.record(WORKITEM, workitem_uid=uid, state=CANCELED, by=requester, reason=reason)
            self._report(uid, ds, IN_PROGRESS, CANCELED)
        else:
            log.info("UPS %s: cancel requested by %s while IN PROGRESS%s: %s", uid, requester or "?",
                     " here (the performer stops at its next step)" if item.claimed_here else "", reason)
            event_info = workitem.cancel_requested_report(requester, info)
            for ae in subscriptions.receivers(uid):
                self.events.send(ae, CANCEL_REQUESTED, uid, event_info)
            if item.claimed_here:
                self.on_work()
        return verdict

    # ------------------------------------------------------------------ UPS Pull

    def change_state(self, uid: str, requested: str, transaction_uid: str, by: str) -> Verdict:
        """N-ACTION Change UPS State (action 1), for a peer (the node's own claims use :meth:`claim`
        and :meth:`finish`)."""
        with self.ctx.write_lock, write_transaction(self.ctx.app.db):
            item = get(uid)
            if item is None:
                return Verdict(UPS_NO_SUCH_INSTANCE, reason=f"no UPS {uid}")
            ds = item.read()
            verdict = states.change_state(item.state, requested, transaction_uid, item.transaction_uid,
                                          workitem.final_state_problem(ds, requested))
            if not verdict.ok:
                return verdict
            if verdict.new_state == IN_PROGRESS:
                save(item, state=IN_PROGRESS, transaction_uid=transaction_uid, claimed_here=False, started_at=_now())
            else:
                if verdict.new_state == CANCELED:
                    reason, _ = workitem.cancellation_reason(ds)
                    if not reason:
                        workitem.cancel(ds, f"canceled by its performer {by or '?'}", workitem.REASON_UNSPECIFIED)
                        reason, _ = workitem.cancellation_reason(ds)
                    save(item, ds, state=CANCELED, reason=reason, finished_at=_now())
                else:
                    save(item, ds, state=COMPLETED, finished_at=_now())
        log.info("UPS %s: %s -> %s by %s", uid, "SCHEDULED" if verdict.new_state == IN_PROGRESS else IN_PROGRESS,
                 verdict.new_state, by or "?")
        self.audit.record(WORKITEM, workitem_uid=uid, state=verdict.new_state, by=by)
        self._report(uid, ds, verdict.new_state)  # type: ignore[arg-type]
        return verdict

    def update(self, uid: str, modifications: Dataset, by: str) -> tuple[Verdict, list[str]]:
        """N-SET: (verdict, the attributes changed)."""
        with self.ctx.write_lock, write_transaction(self.ctx.app.db):
            item = get(uid)
            if item is None:
                return Verdict(UPS_NO_SUCH_INSTANCE, reason=f"no UPS {uid}"), []
            verdict = states.may_set(item.state, workitem.text(modifications, "TransactionUID"), item.transaction_uid)
            if not verdict.ok:
                return verdict, []
            ds = item.read()
            before = workitem.text(ds, "InputReadinessState")
            try:
                changed = workitem.apply_modifications(ds, modifications)
                if item.performed_here and item.state == SCHEDULED and workitem.requested_model(ds) is not None:
                    self.task_of(ds)
            except workitem.Refused as exc:
                return Verdict(exc.status, reason=exc.reason), []
            save(item, ds, label=workitem.text(ds, "ProcedureStepLabel")[:64],
                 priority=workitem.text(ds, "ScheduledProcedureStepPriority") or item.priority,
                 readiness=workitem.text(ds, "InputReadinessState") or item.readiness)
        log.info("UPS %s: N-SET by %s changed %s", uid, by or "?", ", ".join(changed) or "nothing")
        if before != workitem.text(ds, "InputReadinessState"):
            # The UPS State Report carries the Input Readiness State too (PS3.4 CC.2.4.2).
            self._report(uid, ds, item.state)
            if item.performed_here:
                self.on_work()
        return verdict, changed

    def get(self, uid: str, tags: list[int] | None) -> tuple[int, Dataset | None, str]:
        """N-GET: (status, attributes, reason)."""
        item = get(uid)
        if item is None:
            return UPS_NO_SUCH_INSTANCE, None, f"no UPS {uid}"
        return SUCCESS, workitem.attributes(item.read(), tags), ""

    def find(self, identifier: Dataset) -> Iterator[Dataset]:
        """C-FIND: the matching workitems, oldest first, as the identifier asks for them."""
        uids, wanted_states = match.indexed_keys(identifier)
        q = Workitem.select().order_by(Workitem.created_at, Workitem.id)
        if uids:
            q = q.where(Workitem.uid.in_(uids))
        if wanted_states:
            q = q.where(Workitem.state.in_(wanted_states))
        for item in q.iterator():
            ds = item.read()
            ds.ProcedureStepState = item.state
            if match.matches(identifier, ds):
                yield match.response(identifier, ds)

    # ------------------------------------------------------------------ UPS Watch

    def subscribe(self, uid: str, ae_title: str, deletion_lock: bool, keys: Dataset | None) -> Verdict:
        """N-ACTION Subscribe (action 3); the subscriber then gets the current state of each
        workitem it now watches (PS3.4 CC.2.3.2)."""
        if not self._is_peer(ae_title):
            return Verdict(UPS_UNKNOWN_RECEIVING_AE,
                           reason=f"Receiving AE {ae_title!r} is not a configured peer: the node cannot call it")
        with self.ctx.write_lock, write_transaction(self.ctx.app.db):
            if subscriptions.is_global(uid):
                watched = subscriptions.subscribe_global(ae_title, deletion_lock, keys)
            else:
                item = get(uid)
                if item is None:
                    return Verdict(UPS_NO_SUCH_INSTANCE, reason=f"no UPS {uid}")
                subscriptions.subscribe_one(ae_title, uid, deletion_lock)
                watched = [item]
        log.info("UPS: %s subscribed to %s (%d workitem(s) now)", ae_title,
                 "every workitem" if subscriptions.is_global(uid) else uid, len(watched))
        for item in watched:
            self.events.send(ae_title, STATE_REPORT, item.uid, workitem.state_report(item.read(), item.state))
        return Verdict(SUCCESS)

    def unsubscribe(self, uid: str, ae_title: str) -> Verdict:
        """N-ACTION Unsubscribe (action 4): one workitem, or with a global UID all of them."""
        with self.ctx.write_lock, write_transaction(self.ctx.app.db):
            if not subscriptions.is_global(uid) and get(uid) is None:
                return Verdict(UPS_NO_SUCH_INSTANCE, reason=f"no UPS {uid}")
            n = subscriptions.unsubscribe(ae_title, uid)
        log.info("UPS: %s unsubscribed from %s (%d subscription(s) dropped)", ae_title,
                 "every workitem" if subscriptions.is_global(uid) else uid, n)
        return Verdict(SUCCESS)

    def suspend(self, uid: str, ae_title: str) -> Verdict:
        """N-ACTION Suspend Global Subscription (action 5)."""
        if not subscriptions.is_global(uid):
            return Verdict(UPS_ACTION_NOT_APPROPRIATE,
                           reason="only a global subscription can be suspended (the SOP Instance UID must be the "
                           "UPS Global Subscription Instance)")
        with self.ctx.write_lock, write_transaction(self.ctx.app.db):
            subscriptions.suspend_global(ae_title)
        log.info("UPS: %s suspended its global subscription", ae_title)
        return Verdict(SUCCESS)

    # ------------------------------------------------------------------ the node as performer

    def claim(self, uid: str | None = None) -> Workitem | None:
        """Claim the next workitem the node performs (SCHEDULED, READY, highest priority, oldest),
        or ``uid``: IN PROGRESS with a Transaction UID of the node's own. None if there is none."""
        with self.ctx.write_lock, write_transaction(self.ctx.app.db):
            q = Workitem.select().where((Workitem.state == SCHEDULED) & (Workitem.performed_here == True)  # noqa: E712
                                        & (Workitem.readiness == "READY"))
            if uid is not None:
                q = q.where(Workitem.uid == uid)
            candidates = sorted(q, key=lambda w: (PRIORITY_ORDER.get(w.priority, 1), w.created_at, w.id))
            if not candidates:
                return None
            item = candidates[0]
            ds = item.read()
            workitem.progress(ds, 0, "claimed by the node")
            save(item, ds, state=IN_PROGRESS, transaction_uid=str(generate_uid()), claimed_here=True,
                 started_at=_now(), stage="retrieve", attempts=item.attempts + 1)
        log.info("UPS %s claimed by the node (IN PROGRESS)", item.uid)
        self.audit.record(WORKITEM, workitem_uid=item.uid, state=IN_PROGRESS, by="node")
        self._report(item.uid, ds, IN_PROGRESS)
        return item

    def set_progress(self, item: Workitem, percent: float, description: str, **fields: object) -> None:
        """Record the performer's progress (and ``fields`` of its row) on a workitem it holds."""
        with self.ctx.write_lock, write_transaction(self.ctx.app.db):
            ds = get(item.uid).read()  # type: ignore[union-attr]
            workitem.progress(ds, percent, description)
            save(item, ds, **fields)

    def finish(self, item: Workitem, *, results: list[workitem.Result] | None = None,
               retrieve_ae: list[str] | None = None, model: tuple[str, str] = ("", ""), reason: str = "",
               code: tuple[str, str, str] = workitem.REASON_FAILURE, timings: str | None = None) -> str:
        """End a workitem the node performs: CANCELED with ``reason`` (and its CID 9300 ``code``)
        when one is given, else COMPLETED with ``results``, retrievable from ``retrieve_ae``
        (default: the node). Returns the final state."""
        fields: dict[str, object] = {} if timings is None else {"timings": timings}
        with self.ctx.write_lock, write_transaction(self.ctx.app.db):
            fresh = get(item.uid)
            if fresh is None or fresh.state in FINAL or not fresh.claimed_here:
                return fresh.state if fresh is not None else CANCELED
            ds = fresh.read()
            started = (fresh.started_at or _now()).astimezone().strftime("%Y%m%d%H%M%S.%f%z")
            if reason:
                workitem.cancel(ds, reason, code, started=started)
                save(fresh, ds, state=CANCELED, reason=reason, finished_at=_now(), stage="", **fields)
                state = CANCELED
            else:
                node_ae = self.ctx.config.node.ae_title
                workitem.complete(ds, results or [], retrieve_ae or [node_ae], started=started, model=model,
                                  station=node_ae)
                workitem.progress(ds, 100, "completed")
                save(fresh, ds, state=COMPLETED, finished_at=_now(), stage="", **fields)
                state = COMPLETED
        self.audit.record(WORKITEM, workitem_uid=item.uid, state=state, by="node", reason=reason or None,
                          results=[r.sop_instance for r in results or []] if state == COMPLETED else None)
        if state == CANCELED:
            log.warning("UPS %s CANCELED: %s", item.uid, reason)
        else:
            log.info("UPS %s COMPLETED: %d result(s) %s", item.uid, len(results or []),
                     ", ".join(r.sop_instance for r in results or []))
        self._report(item.uid, ds, state)
        self.on_final(item.uid)
        return state

