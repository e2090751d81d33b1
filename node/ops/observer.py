"""What the node tells the audit log and the metrics about associations, stores and retrieves.

:class:`Observer` decides nothing: node.security.guard calls it at each step of an association
(accepted, rejected, released, aborted), for each C-STORE outcome and for each model sent by
C-MOVE or C-GET. It reads the index and the registry only to name what was stored: the studies
an association delivered to, and whether an instance was a registered model.
"""

from __future__ import annotations

import logging
from typing import Any

from iods.uids import RAW_DATA_STORAGE
from node.dimse.association import state_of
from node.dimse.status import is_stored
from node.ops import audit as audit_events
from node.ops import metrics
from node.ops.audit import AuditLog, association_fields
from node.storage.index import study_uids_of
from node.storage.registry import model_record

log = logging.getLogger("modelnode.security")


class Observer:
    """Audit events and metrics, fed by the handler guard."""

    def __init__(self, audit: AuditLog) -> None:
        self.audit = audit

    # ------------------------------------------------------------------ associations

    def identity_rejected(self, assoc: Any, user: str | None, reason: str) -> None:
        self.audit.record(audit_events.IDENTITY_REJECTED, **association_fields(assoc),
                          user=user, reason=reason, outcome="rejected")

    def accepted(self, assoc: Any, tls_info: dict[str, str]) -> None:
        metrics.ASSOCIATIONS.labels("accepted").inc()
        perms = state_of(assoc).permissions
        self.audit.record(audit_events.ASSOCIATION_ACCEPTED, **association_fields(assoc), outcome="accepted",
                          permissions=sorted(perms) if perms is not None else None,
                          contexts=len(assoc.accepted_contexts), **tls_info)

    def rejected(self, assoc: Any) -> None:
        metrics.ASSOCIATIONS.labels("rejected").inc()
        state = state_of(assoc)
        reason = state.reject_reason
        if reason is None:
            ident = state.identity
            reason = (f"user identity refused: {ident.reason}" if ident is not None and not ident.ok
                      else "rejected during negotiation (association limit, called AE title or identity)")
        self.audit.record(audit_events.ASSOCIATION_REJECTED, **association_fields(assoc), outcome="rejected",
                          reason=reason)

    def released(self, assoc: Any) -> None:
        metrics.ASSOCIATIONS.labels("released").inc()
        self._summary(assoc, "released")

    def aborted(self, assoc: Any) -> None:
        if assoc.requestor.primitive is None:
            return  # a connection that never asked for an association (port probe, failed TLS)
        metrics.ASSOCIATIONS.labels("aborted").inc()
        self._summary(assoc, "aborted")

    def _summary(self, assoc: Any, outcome: str) -> None:
        got = state_of(assoc).received
        if not got.images:
            return
        self.audit.record(audit_events.IMAGES_STORED, **association_fields(assoc), outcome=outcome,
                          instances=got.images, bytes=got.bytes, study_uids=_study_uids(got.sop_uids))

    # ------------------------------------------------------------------ C-STORE

    def store_refused(self, label: str) -> None:
        metrics.STORE_REFUSED.labels(label).inc()

    def store_answered(self, assoc: Any, sop_class: str, sop_uid: str, size: int, code: int,
                       seconds: float) -> None:
        """The handler answered ``code``: count it, and audit a stored model."""
        metrics.STORE_SECONDS.observe(seconds)
        if not is_stored(code):
            metrics.STORE_REFUSED.labels(metrics.refusal_reason(code)).inc()
            return
        model = _registered_model(sop_uid) if sop_class == RAW_DATA_STORAGE else None
        metrics.INSTANCES_RECEIVED.labels("model" if model is not None else "image").inc()
        metrics.BYTES_RECEIVED.inc(size)
        if model is None:
            got = state_of(assoc).received
            got.images += 1
            got.bytes += size
            got.sop_uids.append(sop_uid)
            return
        fields = association_fields(assoc)
        self.audit.record(audit_events.MODEL_STORED, **fields, outcome="stored", model_uid=sop_uid,
                          name=model.name, version=model.version, payload_sha256=model.payload_sha256, bytes=size)
        parent = model.parent_uid
        if parent and _registered_model(parent) is not None:
            self.audit.record(audit_events.MODEL_REPLACED, **fields, outcome="superseded", model_uid=parent,
                              replaced_by=sop_uid, name=model.name, version=model.version)

    # ------------------------------------------------------------------ C-MOVE / C-GET

    def model_retrieved(self, assoc: Any, operation: str, destination: str, model_uid: str) -> None:
        self.audit.record(audit_events.MODEL_RETRIEVED, **association_fields(assoc), operation=operation,
                          destination=destination, model_uid=model_uid, outcome="sent")

    def close(self) -> None:
        self.audit.close()


def _registered_model(uid: str) -> Any:
    try:
        return model_record(uid)
    except Exception:  # no database bound (a test AE) or a transient error: treat as not a model
        return None


def _study_uids(sop_uids: list[str], limit: int = 50) -> list[str]:
    if not sop_uids:
        return []
    try:
        return study_uids_of(sop_uids, limit)
    except Exception as exc:  # the audit line goes out without them rather than not at all
        log.debug("audit: cannot resolve study UIDs: %s", exc)
        return []
