"""The node as a UPS SCU: create a workitem, read it, ask for its cancellation (PS3.4 Annex CC).

Used by ``modelnode run`` (a Task Requester that creates a workitem on the running node) and
``modelnode tasks cancel``. Each call opens one association, retried on transient failures by
the :class:`node.scu.client.RetryPolicy` of its options; a status is returned as it came, with
the peer's Error Comment, for the caller to judge.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from pydicom.dataset import Dataset
from pynetdicom import AE, build_context
from pynetdicom.association import Association
from pynetdicom.sop_class import (
    UnifiedProcedureStepPull,
    UnifiedProcedureStepPush,
    UnifiedProcedureStepWatch,
)

from node.dimse.syntaxes import UNCOMPRESSED
from node.scu.client import Address, Options, PeerError, associate, with_retries

T = TypeVar("T")

CHANGE_STATE, REQUEST_CANCEL = 1, 2


@dataclass(frozen=True)
class Answer:
    """A DIMSE response: its status, Error Comment and dataset (Attribute List, Action Reply)."""

    status: int
    comment: str = ""
    dataset: Dataset | None = None


def _answer(status: Dataset | None, ds: Dataset | None, peer: Address, what: str) -> Answer:
    if status is None or "Status" not in status:
        raise PeerError(f"{what}: no response from {peer} (association aborted or timed out)", transient=True)
    return Answer(int(status.Status), str(status.get("ErrorComment", "") or ""), ds)


def _call(peer: Address, options: Options, what: str, operation: Callable[[Association], T]) -> T:
    def attempt() -> T:
        ae = AE(ae_title=options.calling_ae)
        ae.acse_timeout, ae.dimse_timeout = options.acse_timeout, options.dimse_timeout
        ae.network_timeout, ae.connection_timeout = options.network_timeout, options.connect_timeout
        ae.maximum_pdu_size = options.max_pdu
        contexts = [build_context(c, list(UNCOMPRESSED))
                    for c in (UnifiedProcedureStepPush, UnifiedProcedureStepPull, UnifiedProcedureStepWatch)]
        assoc = associate(ae, peer, contexts=contexts, tls=options.tls)
        try:
            if not assoc.accepted_contexts:
                raise PeerError(f"{peer} does not offer the UPS SOP classes", transient=False)
            return operation(assoc)
        finally:
            if assoc.is_established:
                assoc.release()

    return with_retries(attempt, options.retry, f"{what} {peer}")


def create(peer: Address, ds: Dataset, uid: str, options: Options) -> Answer:
    """N-CREATE the workitem ``ds`` with SOP Instance UID ``uid`` (UPS Push)."""
    return _call(peer, options, "N-CREATE",
                 lambda a: _answer(*a.send_n_create(ds, UnifiedProcedureStepPush, uid), peer, "N-CREATE"))


def get(peer: Address, uid: str, options: Options, tags: list[int] | None = None) -> Answer:
    """N-GET the workitem's attributes (``tags``, or all)."""
    return _call(peer, options, "N-GET",
                 lambda a: _answer(*a.send_n_get(tags or [], UnifiedProcedureStepPush, uid), peer, "N-GET"))


def request_cancel(peer: Address, uid: str, reason: str, options: Options) -> Answer:
    """N-ACTION Request UPS Cancel (UPS Push, action 2) with ``reason``."""
    info = Dataset()
    info.ReasonForCancellation = reason
    return _call(peer, options, "N-ACTION",
                 lambda a: _answer(*a.send_n_action(info, REQUEST_CANCEL, UnifiedProcedureStepPush, uid), peer,
                                   "N-ACTION"))


def change_state(peer: Address, uid: str, state: str, transaction_uid: str, options: Options) -> Answer:
    """N-ACTION Change UPS State (UPS Pull, action 1): claim with ``transaction_uid``, or end."""
    info = Dataset()
    info.ProcedureStepState = state
    info.TransactionUID = transaction_uid
    return _call(peer, options, "N-ACTION",
                 lambda a: _answer(*a.send_n_action(info, CHANGE_STATE, UnifiedProcedureStepPull, uid), peer,
                                   "N-ACTION"))


def update(peer: Address, uid: str, modifications: Dataset, options: Options) -> Answer:
    """N-SET the workitem's attributes (UPS Pull); an IN PROGRESS one needs the Transaction UID
    in ``modifications``."""
    return _call(peer, options, "N-SET",
                 lambda a: _answer(*a.send_n_set(modifications, UnifiedProcedureStepPull, uid), peer, "N-SET"))


def find(peer: Address, identifier: Dataset, options: Options) -> list[Dataset]:
    """C-FIND on the peer's workitems (UPS Pull); the matches, or PeerError on a failure status."""
    def query(assoc: Association) -> list[Dataset]:
        found = []
        for status, ds in assoc.send_c_find(identifier, UnifiedProcedureStepPull):
            answer = _answer(status, ds, peer, "C-FIND")
            if answer.status in (0xFF00, 0xFF01):
                if ds is not None:
                    found.append(ds)
            elif answer.status != 0x0000:
                raise PeerError(f"C-FIND: {peer} answered 0x{answer.status:04X} {answer.comment}".strip(),
                                transient=False, status=answer.status)
        return found

    return _call(peer, options, "C-FIND", query)
