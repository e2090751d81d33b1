"""The UPS SCP's DIMSE handlers: N-CREATE, N-ACTION, N-GET, N-SET and C-FIND on workitems.

Each handler reads the request, asks :class:`node.ups.service.UpsService` and answers its
status. A refusal carries an Error Comment (at most 64 characters, LO) and is logged at WARNING
with the association's id, the peer and the whole reason, e.g.
``[a7] N-SET UPS 1.2.3 from RIS refused with 0xC300: the UPS is COMPLETED and may no longer be updated``.

N-ACTION Action Type IDs (PS3.4 CC.2.1-CC.2.3):

==  ==========================================  =============  ====================================
ID  action                                      SOP class      Action Information the node reads
==  ==========================================  =============  ====================================
1   Change UPS State                            UPS Pull       Procedure Step State, Transaction UID
2   Request UPS Cancel                          UPS Push       Reason For Cancellation, its code,
                                                                Contact Display Name, Contact URI
3   Subscribe to Receive UPS Event Reports      UPS Watch      Receiving AE, Deletion Lock, (filtered
                                                                global) any other keys as a filter
4   Unsubscribe from Receiving UPS Event Rep.   UPS Watch      Receiving AE
5   Suspend Global Subscription                 UPS Watch      Receiving AE
==  ==========================================  =============  ====================================
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

from pydicom.dataset import Dataset
from pydicom.tag import Tag
from pynetdicom.sop_class import (
    UnifiedProcedureStepPull,
    UnifiedProcedureStepPush,
    UnifiedProcedureStepQuery,
    UnifiedProcedureStepWatch,
)

from node.dimse.association import assoc_id
from node.dimse.status import (
    CANCEL,
    INVALID_ATTRIBUTE_VALUE,
    NO_SUCH_ACTION,
    NO_SUCH_ARGUMENT,
    PENDING,
    SUCCESS,
    UNABLE_TO_PROCESS,
    category,
)
from node.ups.service import UpsService
from node.ups.states import Verdict
from node.ups.subscriptions import is_global
from node.ups.workitem import text

log = logging.getLogger("modelnode.ups")

# The UPS SOP classes whose C-FIND queries workitems (UPS Event has no C-FIND).
FIND_CLASSES = frozenset({str(UnifiedProcedureStepPull), str(UnifiedProcedureStepWatch),
                          str(UnifiedProcedureStepQuery), str(UnifiedProcedureStepPush)})

CHANGE_STATE, REQUEST_CANCEL, SUBSCRIBE, UNSUBSCRIBE, SUSPEND = 1, 2, 3, 4, 5
ACTION_NAMES = {CHANGE_STATE: "Change UPS State", REQUEST_CANCEL: "Request UPS Cancel", SUBSCRIBE: "Subscribe",
                UNSUBSCRIBE: "Unsubscribe", SUSPEND: "Suspend Global Subscription"}


def calling_ae(assoc: Any) -> str:
    rq = assoc.requestor
    return (getattr(rq.primitive, "calling_ae_title", "") or rq.ae_title or "").strip()


def _status(code: int, reason: str) -> Dataset:
    rsp = Dataset()
    rsp.Status = code
    if reason:
        rsp.ErrorComment = reason[:64]
    return rsp


def _answer(event: Any, what: str, uid: str, code: int, reason: str) -> Dataset | int:
    """The status to send; a refusal or a warning is logged with its whole reason."""
    if code == SUCCESS:
        return SUCCESS
    level = logging.WARNING if category(code) == "failure" else logging.INFO
    log.log(level, "[%s] %s UPS %s from %s %s with 0x%04X: %s", assoc_id(event.assoc), what, uid,
            calling_ae(event.assoc) or "?", "refused" if level == logging.WARNING else "answered", code, reason)
    return _status(code, reason)


def _read(event: Any, attribute: str) -> Dataset:
    """A request's dataset (empty when it has none); ValueError when it does not decode."""
    try:
        ds = getattr(event, attribute)
    except Exception as exc:  # noqa: BLE001 (pydicom raises several kinds for a bad encoding)
        raise ValueError(f"the {attribute.replace('_', ' ')} does not decode: {exc}") from exc
    return ds if ds is not None else Dataset()


# --------------------------------------------------------------------------- N-CREATE


def handle_n_create(event: Any, service: UpsService) -> tuple[Dataset | int, Dataset | None]:
    """EVT_N_CREATE: a new workitem (UPS Push)."""
    req = event.request
    uid = str(req.AffectedSOPInstanceUID or "")
    try:
        ds = _read(event, "attribute_list")
    except ValueError as exc:
        return _answer(event, "N-CREATE", uid or "?", INVALID_ATTRIBUTE_VALUE, str(exc)), None
    created = service.create(ds, uid or None, calling_ae(event.assoc))
    status = _answer(event, "N-CREATE", created.uid, created.status, created.reason)
    if category(created.status) == "failure":
        return status, None
    reply = Dataset()
    if not uid:
        # pynetdicom moves it into the response's Affected SOP Instance UID (PS3.7 10.1.5.1.4).
        reply.AffectedSOPInstanceUID = created.uid
    return status, reply


# --------------------------------------------------------------------------- N-ACTION


def handle_n_action(event: Any, service: UpsService) -> tuple[Dataset | int, Dataset | None]:
    """EVT_N_ACTION: change state, request cancel, subscribe, unsubscribe, suspend."""
    uid = str(event.request.RequestedSOPInstanceUID or "")
    action = event.action_type
    what = f"N-ACTION {ACTION_NAMES.get(action, action)}"
    caller = calling_ae(event.assoc)
    try:
        info = _read(event, "action_information")
    except ValueError as exc:
        return _answer(event, what, uid, INVALID_ATTRIBUTE_VALUE, str(exc)), None
    verdict: Verdict
    if action == CHANGE_STATE:
        requested = text(info, "ProcedureStepState")
        if not requested:
            verdict = Verdict(NO_SUCH_ARGUMENT, reason="no Procedure Step State (0074,1000) in the Action Information")
        else:
            what = f"{what} to {requested}"
            verdict = service.change_state(uid, requested, text(info, "TransactionUID"), caller)
    elif action == REQUEST_CANCEL:
        verdict = service.request_cancel(uid, info, caller)
    elif action in (SUBSCRIBE, UNSUBSCRIBE, SUSPEND):
        receiver = text(info, "ReceivingAE")
        if not receiver:
            verdict = Verdict(NO_SUCH_ARGUMENT, reason="no Receiving AE (0074,1234) in the Action Information")
        elif action == SUBSCRIBE:
            lock = text(info, "DeletionLock").upper() == "TRUE"
            keys = None
            if is_global(uid):
                keys = Dataset()
                for elem in info:
                    if elem.tag not in (Tag("ReceivingAE"), Tag("DeletionLock")):
                        keys.add(elem)
            verdict = service.subscribe(uid, receiver, lock, keys)
        elif action == UNSUBSCRIBE:
            verdict = service.unsubscribe(uid, receiver)
        else:
            verdict = service.suspend(uid, receiver)
    else:
        verdict = Verdict(NO_SUCH_ACTION, reason=f"Action Type ID {action} is not a UPS action")
    return _answer(event, what, uid, verdict.status, verdict.reason), None


# --------------------------------------------------------------------------- N-GET, N-SET


def handle_n_get(event: Any, service: UpsService) -> tuple[Dataset | int, Dataset | None]:
    """EVT_N_GET: the workitem's attributes (those asked for, or all)."""
    uid = str(event.request.RequestedSOPInstanceUID or "")
    tags = [int(t) for t in (event.attribute_identifiers or [])]
    code, ds, reason = service.get(uid, tags or None)
    return _answer(event, "N-GET", uid, code, reason), ds


def handle_n_set(event: Any, service: UpsService) -> tuple[Dataset | int, Dataset | None]:
    """EVT_N_SET: change a workitem's attributes (not its state)."""
    uid = str(event.request.RequestedSOPInstanceUID or "")
    try:
        mods = _read(event, "modification_list")
    except ValueError as exc:
        return _answer(event, "N-SET", uid, INVALID_ATTRIBUTE_VALUE, str(exc)), None
    verdict, _ = service.update(uid, mods, calling_ae(event.assoc))
    return _answer(event, "N-SET", uid, verdict.status, verdict.reason), None


# --------------------------------------------------------------------------- C-FIND


def is_ups_find(event: Any) -> bool:
    """Whether a C-FIND queries workitems (by the SOP class of its request)."""
    return str(event.request.AffectedSOPClassUID or "") in FIND_CLASSES


def handle_find(event: Any, service: UpsService) -> Iterator[tuple[int | Dataset, Dataset | None]]:
    """EVT_C_FIND on a UPS SOP class: the matching workitems, one pending response each."""
    try:
        identifier = event.identifier
    except Exception as exc:  # noqa: BLE001
        yield _answer(event, "C-FIND", "-", UNABLE_TO_PROCESS, f"the identifier does not decode: {exc}"), None
        return
    n = 0
    for ds in service.find(identifier):
        if event.is_cancelled:
            yield CANCEL, None
            return
        n += 1
        yield PENDING, ds
    log.info("[%s] C-FIND on workitems from %s: %d match(es)", assoc_id(event.assoc), calling_ae(event.assoc) or "?", n)
    yield SUCCESS, None
