"""Pull mode: the node as UPS Pull SCU of external Task Managers (``[ups] pull_from``).

Every ``[ups] pull_seconds`` the puller asks each Task Manager (a ``[[peers]]`` entry) for the
SCHEDULED, READY workitems coded in the node's scheme (C-FIND, UPS Pull), and for each one it
does not know yet:

1. claims it there (N-ACTION Change UPS State to IN PROGRESS with a Transaction UID of its own;
   a workitem another performer claimed first answers 0xC302 and is left alone);
2. reads it whole (N-GET) and keeps a local copy, remembering the manager and the Transaction
   UID (:meth:`node.ups.service.UpsService.adopt`): the local performer then performs the copy
   like any workitem (retrieve, run, store, finish), and local subscribers see it;
3. once the copy is final, writes the outcome back (N-SET of the Performed Procedure Sequence
   with the Output Information, or of the cancellation reason; then N-ACTION to COMPLETED or
   CANCELED). A manager that cannot be reached then is tried again at each round until it
   answers, so a restart in between loses nothing.

A workitem the node cannot perform (a model it does not have, a source that is not one of its
peers) is claimed and at once CANCELED at the manager with the reason, rather than left for
ever SCHEDULED there. Not done: cancel requests made at the manager while the node performs a
workitem (the node would have to subscribe there and serve N-EVENT-REPORTs).
"""

from __future__ import annotations

import logging
import threading

from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from node.context import NodeContext
from node.dimse.status import SUCCESS, UPS_ALREADY_CANCELED, UPS_ALREADY_COMPLETED
from node.scu import ups as ups_scu
from node.scu.client import Address, Options, PeerError, RetryPolicy
from node.storage.db import write_transaction
from node.ups import workitem
from node.ups.calling import peer_address, peer_options
from node.ups.service import UpsService
from node.ups.states import CANCELED, COMPLETED, FINAL
from node.ups.store import Workitem, save

log = logging.getLogger("modelnode.ups")

# What is written back to the manager before the final state change.
_OUTCOME_KEYS = ("UnifiedProcedureStepPerformedProcedureSequence", "ProcedureStepProgressInformationSequence")


def scheduled_query() -> Dataset:
    """The C-FIND identifier of the workitems the node may take: SCHEDULED, READY, in its scheme."""
    ident = Dataset()
    ident.SOPInstanceUID = ""
    ident.ProcedureStepState = "SCHEDULED"
    ident.InputReadinessState = "READY"
    code = Dataset()
    code.CodeValue = ""
    code.CodingSchemeDesignator = workitem.SCHEME
    ident.ScheduledWorkitemCodeSequence = [code]
    ident.ScheduledProcedureStepPriority = ""
    return ident


class Puller:
    """The pull-mode thread (see the module docstring)."""

    def __init__(self, ctx: NodeContext, service: UpsService, managers: list[str], *, interval: float) -> None:
        self.ctx = ctx
        self.service = service
        self.managers = list(managers)
        self.interval = interval
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        service.on_final = lambda uid: self._wake.set()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="modelnode-ups-pull", daemon=True)
        self._thread.start()
        log.info("UPS pull mode: asking %s for workitems every %g s", ", ".join(self.managers), self.interval)

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.round()
            except Exception:
                if self._stop.is_set():
                    return
                log.exception("UPS pull mode error (will retry)")
            self._wake.wait(self.interval)
            self._wake.clear()

    def _options(self, manager: str) -> Options:
        return peer_options(self.ctx.config, manager, retry=RetryPolicy(attempts=1), timeout=30.0)

    def round(self) -> None:
        """Write back what finished, then take what is new."""
        self.write_back()
        for manager in self.managers:
            if self._stop.is_set():
                return
            try:
                self.take(manager)
            except (PeerError, LookupError) as exc:
                log.warning("UPS pull mode: %s: %s", manager, exc)

    # ------------------------------------------------------------------ take

    def take(self, manager: str) -> int:
        """Claim and copy the new workitems of ``manager``; returns how many."""
        address = peer_address(self.ctx.config, manager)
        options = self._options(manager)
        taken = 0
        for found in ups_scu.find(address, scheduled_query(), options):
            uid = workitem.text(found, "SOPInstanceUID")
            if not uid or Workitem.get_or_none(Workitem.uid == uid) is not None:
                continue
            tx = str(generate_uid())
            claim = ups_scu.change_state(address, uid, "IN PROGRESS", tx, options)
            if claim.status != SUCCESS:
                log.info("UPS pull mode: %s of %s not claimed (0x%04X %s)", uid, manager, claim.status, claim.comment)
                continue
            got = ups_scu.get(address, uid, options)
            if got.status != SUCCESS or got.dataset is None:
                self._give_back(address, uid, tx, f"the node could not read the workitem (N-GET 0x{got.status:04X})",
                                options)
                continue
            ds = got.dataset
            ds.ProcedureStepState = "SCHEDULED"  # the local copy starts where the manager's did
            created = self.service.adopt(ds, uid, manager=manager, transaction_uid=tx)
            if not created.ok:
                self._give_back(address, uid, tx, f"the node cannot perform it: {created.reason}", options)
                continue
            taken += 1
            log.info("UPS pull mode: %s claimed at %s and queued here", uid, manager)
        return taken

    def _give_back(self, address: Address, uid: str, tx: str, reason: str, options: Options) -> None:
        """Cancel at the manager a workitem the node claimed and cannot perform."""
        mods = Dataset()
        mods.TransactionUID = tx
        copy = Dataset()
        workitem.cancel(copy, reason, workitem.REASON_NOT_SUPPORTED)
        for key in _OUTCOME_KEYS:
            setattr(mods, key, copy[key].value)
        ups_scu.update(address, uid, mods, options)
        answer = ups_scu.change_state(address, uid, CANCELED, tx, options)
        log.warning("UPS pull mode: %s canceled at %s (0x%04X): %s", uid, address.ae_title, answer.status, reason)

    # ------------------------------------------------------------------ write back

    def write_back(self) -> int:
        """Send the final state of each finished copy to its manager; returns how many went."""
        done = 0
        pending = Workitem.select().where((Workitem.remote_ae != "") & (Workitem.remote_synced == False)  # noqa: E712
                                          & Workitem.state.in_(sorted(FINAL)))
        for item in pending:
            try:
                address = peer_address(self.ctx.config, item.remote_ae)
                options = self._options(item.remote_ae)
                ds = item.read()
                mods = Dataset()
                mods.TransactionUID = item.remote_transaction_uid
                for key in _OUTCOME_KEYS:
                    if key in ds:
                        setattr(mods, key, ds[key].value)
                answer = ups_scu.update(address, item.uid, mods, options)
                if answer.status == SUCCESS:
                    answer = ups_scu.change_state(address, item.uid, item.state, item.remote_transaction_uid, options)
            except (PeerError, LookupError) as exc:
                log.warning("UPS pull mode: %s %s not yet written back to %s: %s", item.uid, item.state,
                            item.remote_ae, exc)
                continue
            ok = answer.status in (SUCCESS, UPS_ALREADY_COMPLETED if item.state == COMPLETED else UPS_ALREADY_CANCELED)
            if ok:
                log.info("UPS pull mode: %s %s written back to %s", item.uid, item.state, item.remote_ae)
            else:
                # A definite refusal (someone else holds it now, say): retrying would not change it.
                log.warning("UPS pull mode: %s refused the %s of %s with 0x%04X: %s", item.remote_ae, item.state,
                            item.uid, answer.status, answer.comment)
            with self.ctx.write_lock, write_transaction(self.ctx.app.db):
                save(item, remote_synced=True)
            done += 1
        return done
