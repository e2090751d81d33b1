"""The UPS state machine (PS3.4 CC.1.1, Table CC.1.1-2): which request moves a workitem where,
and which status answers it. Pure: no database, no DIMSE.

::

    N-CREATE ──> SCHEDULED ──(claim, Transaction UID)──> IN PROGRESS ──> COMPLETED
                     │                                        └────────> CANCELED
                     └──(request cancel: the SCP cancels a workitem nobody performs)──> CANCELED

COMPLETED and CANCELED are final. A workitem IN PROGRESS belongs to whoever claimed it: every
later change (N-SET, completing, cancelling) must carry the Transaction UID given in the claim.
"""

from __future__ import annotations

from dataclasses import dataclass

from node.dimse.status import (
    INVALID_ARGUMENT_VALUE,
    SUCCESS,
    UPS_ALREADY_CANCELED,
    UPS_ALREADY_COMPLETED,
    UPS_ALREADY_COMPLETED_FAILURE,
    UPS_ALREADY_IN_PROGRESS,
    UPS_FINAL_STATE_NOT_MET,
    UPS_MAY_NO_LONGER_BE_UPDATED,
    UPS_MAY_ONLY_BECOME_SCHEDULED_BY_CREATE,
    UPS_NOT_IN_PROGRESS,
    UPS_WRONG_TRANSACTION_UID,
)

SCHEDULED = "SCHEDULED"
IN_PROGRESS = "IN PROGRESS"
COMPLETED = "COMPLETED"
CANCELED = "CANCELED"
STATES = (SCHEDULED, IN_PROGRESS, COMPLETED, CANCELED)
FINAL = frozenset({COMPLETED, CANCELED})


@dataclass(frozen=True)
class Verdict:
    """The answer to a request: its status, the state it leads to (None: unchanged) and why."""

    status: int
    new_state: str | None = None
    reason: str = ""

    @property
    def ok(self) -> bool:
        return self.status == SUCCESS


def change_state(current: str, requested: str, transaction_uid: str, held_uid: str,
                 final_state_problem: str = "") -> Verdict:
    """N-ACTION Change UPS State (action 1) from ``current`` to ``requested``.

    ``transaction_uid``: what the request carries; ``held_uid``: what the claim stored.
    ``final_state_problem``: why the workitem does not meet the requirements of COMPLETED
    ("" when it does), checked by :func:`node.ups.workitem.final_state_problem`.
    """
    if requested == SCHEDULED:
        return Verdict(UPS_MAY_ONLY_BECOME_SCHEDULED_BY_CREATE, reason="a UPS becomes SCHEDULED only by N-CREATE")
    if requested == IN_PROGRESS:
        if current == SCHEDULED:
            if not transaction_uid:
                return Verdict(UPS_WRONG_TRANSACTION_UID, reason="a claim must carry a Transaction UID")
            return Verdict(SUCCESS, IN_PROGRESS)
        if current == IN_PROGRESS:
            return Verdict(UPS_ALREADY_IN_PROGRESS, reason="the UPS is already IN PROGRESS (claimed by another)")
        return Verdict(UPS_MAY_NO_LONGER_BE_UPDATED, reason=f"the UPS is {current} and may no longer be updated")
    if requested not in (COMPLETED, CANCELED):
        return Verdict(INVALID_ARGUMENT_VALUE, reason=f"{requested!r} is not a UPS state")
    if current == SCHEDULED:
        return Verdict(UPS_NOT_IN_PROGRESS, reason=f"the UPS is SCHEDULED: claim it before it can become {requested}")
    if current == IN_PROGRESS:
        if transaction_uid != held_uid:
            return Verdict(UPS_WRONG_TRANSACTION_UID,
                           reason="the Transaction UID is not the one of the claim" if transaction_uid
                           else "no Transaction UID given")
        if requested == COMPLETED and final_state_problem:
            return Verdict(UPS_FINAL_STATE_NOT_MET, reason=final_state_problem)
        return Verdict(SUCCESS, requested)
    if current == requested:
        return Verdict(UPS_ALREADY_COMPLETED if current == COMPLETED else UPS_ALREADY_CANCELED,
                       reason=f"the UPS is already {current}")
    if current == COMPLETED:
        return Verdict(UPS_ALREADY_COMPLETED_FAILURE, reason="the UPS is already COMPLETED")
    return Verdict(UPS_MAY_NO_LONGER_BE_UPDATED, reason=f"the UPS is {current} and may no longer be updated")


def request_cancel(current: str) -> Verdict:
    """N-ACTION Request UPS Cancel (action 2, UPS Push).

    A SCHEDULED workitem has no performer: the SCP cancels it itself (new state CANCELED). One
    IN PROGRESS is its performer's to cancel: the request succeeds, the state stays, and the
    performer (and every subscriber) is told by a UPS Cancel Requested event.
    """
    if current == SCHEDULED:
        return Verdict(SUCCESS, CANCELED)
    if current == IN_PROGRESS:
        return Verdict(SUCCESS)
    if current == CANCELED:
        return Verdict(UPS_ALREADY_CANCELED, reason="the UPS is already CANCELED")
    return Verdict(UPS_ALREADY_COMPLETED_FAILURE, reason="the UPS is already COMPLETED")


def may_set(current: str, transaction_uid: str, held_uid: str) -> Verdict:
    """N-SET: a SCHEDULED workitem may be changed by anyone, one IN PROGRESS only with the
    Transaction UID of its claim, a final one never."""
    if current in FINAL:
        return Verdict(UPS_MAY_NO_LONGER_BE_UPDATED, reason=f"the UPS is {current} and may no longer be updated")
    if current == IN_PROGRESS and transaction_uid != held_uid:
        return Verdict(UPS_WRONG_TRANSACTION_UID,
                       reason="the Transaction UID is not the one of the claim" if transaction_uid
                       else "the UPS is IN PROGRESS and no Transaction UID was given")
    return Verdict(SUCCESS)
