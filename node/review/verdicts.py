"""The verdicts table: one row per correction, acceptance or rejection of an AI result.

A row is written in the C-STORE's own transaction (state ``received``) and completed by
:mod:`node.review.intake` once the object is linked to the result and model it judges, or
refused with the reason. A person's accept or reject from the command line (``modelnode review``)
or the web console (node.web) is recorded by :func:`record_judgement`, the same way for both.
Rows are never deleted with the clinical data they point at, and never replace it.
"""

from __future__ import annotations

import datetime as _dt
import json
import threading
from contextlib import nullcontext
from typing import Any

import peewee

from node.ops.audit import AuditLog
from node.pipeline.jobs import Job
from node.storage.db import BaseModel, write_transaction

KINDS = ("correction", "accept", "reject")
# received: stored, not yet linked; linked: judged result and model known (trainable for a
# correction or an acceptance); refused: the reason says why (geometry, empty, segment types);
# unknown-source: the source series was never seen by this node (kept, flagged, never trained on);
# unlinked: no AI result of this node for that series.
STATES = ("received", "linked", "refused", "unknown-source", "unlinked")


def _now() -> _dt.datetime:
    return _dt.datetime.now()


class Verdict(BaseModel):
    sop_uid = peewee.CharField(max_length=64, unique=True)  # the SEG/KO that carried it; "" + id for the CLI
    kind = peewee.CharField(max_length=12, index=True)
    state = peewee.CharField(max_length=16, default="received", index=True)
    reason = peewee.TextField(default="")
    source_series_uid = peewee.CharField(max_length=64, default="", index=True)
    result_uid = peewee.CharField(max_length=64, default="", index=True)  # the AI result judged
    model_uid = peewee.CharField(max_length=64, default="", index=True)
    job_id = peewee.IntegerField(null=True)
    dice = peewee.TextField(default="{}")  # class name -> Dice of the AI result against the correction
    digest = peewee.CharField(max_length=64, default="")  # the stored object carrying the verdict
    calling_ae = peewee.CharField(max_length=16, default="")
    reviewer = peewee.CharField(max_length=64, default="")
    received_at = peewee.DateTimeField(default=_now, index=True)

    @property
    def trainable(self) -> bool:
        return self.state == "linked" and self.kind in ("correction", "accept")

    def summary(self) -> dict[str, Any]:
        return {"sop_uid": self.sop_uid, "kind": self.kind, "state": self.state, "reason": self.reason,
                "source_series_uid": self.source_series_uid, "result_uid": self.result_uid,
                "model_uid": self.model_uid, "job_id": self.job_id, "dice": json.loads(self.dice or "{}"),
                "trainable": self.trainable, "calling_ae": self.calling_ae, "reviewer": self.reviewer,
                "received_at": str(self.received_at)}


def model_counts(model_uid: str) -> dict[str, Any]:
    """What ``models show`` and the metrics report for one model."""
    rows = list(Verdict.select().where(Verdict.model_uid == model_uid))
    return counts_of(rows)


def counts_of(rows: list[Verdict]) -> dict[str, Any]:
    linked = [r for r in rows if r.state == "linked"]
    n = {k: sum(1 for r in linked if r.kind == k) for k in KINDS}
    judged = sum(n.values())
    dices = [d for r in linked if r.kind == "correction" for d in json.loads(r.dice or "{}").values()]
    return {
        "accepted": n["accept"], "rejected": n["reject"], "corrected": n["correction"],
        "refused": sum(1 for r in rows if r.state != "linked"),
        # A correction counts against acceptance: the radiologist did not take the result as it was.
        "acceptance_rate": round(n["accept"] / judged, 4) if judged else None,
        "dice_ai_vs_correction": round(sum(dices) / len(dices), 4) if dices else None,
    }


def all_model_counts() -> dict[str, dict[str, Any]]:
    rows: dict[str, list[Verdict]] = {}
    for r in Verdict.select().where(Verdict.model_uid != ""):
        rows.setdefault(r.model_uid, []).append(r)
    return {uid: counts_of(rs) for uid, rs in rows.items()}


class NoSuchResult(LookupError):
    """The UID is no result this node made."""


JUDGEMENTS = ("accept", "reject")


def record_judgement(result_uid: str, verdict: str, *, reviewer: str = "", reason: str = "", source: str = "cli",
                     audit: AuditLog | None = None, lock: threading.Lock | None = None) -> Verdict:
    """Record a person's accept or reject of a result this node made; returns the row.

    The row is ``linked`` straight away (the result, its job and its model are known here) and
    audited as ``verdict`` with the reviewer and where it came from (``source``: "cli", "web").
    ``lock`` is the node's write lock when called inside the node's process (the console); the
    CLI runs in a process of its own and relies on the database's lock alone.
    Raises :class:`NoSuchResult` for a UID no job of this node made, ``ValueError`` for a verdict
    other than accept or reject.
    """
    if verdict not in JUDGEMENTS:
        raise ValueError(f"verdict must be one of {', '.join(JUDGEMENTS)}, got {verdict!r}")
    # A job's results are a JSON list of UIDs: the LIKE narrows, the exact check decides (one UID
    # may be a prefix of another).
    candidates = Job.select().where(Job.results.contains(result_uid)).order_by(Job.id.desc())
    job = next((j for j in candidates if result_uid in j.result_uids()), None)
    if job is None:
        raise NoSuchResult(f"no result {result_uid} made by this node")
    with lock if lock is not None else nullcontext(), write_transaction():
        # No object carried this verdict: a key of its own, unique by the count (taken inside the
        # write transaction) and cut to the column's 64 characters (a UID alone may fill them).
        key = f"{source}:{verdict}:{Verdict.select().count() + 1}:{result_uid}"[:64]
        row = Verdict.create(sop_uid=key,
                             kind=verdict, state="linked", result_uid=result_uid,
                             model_uid=job.model_uid, job_id=job.id, source_series_uid=job.group_key,
                             reviewer=reviewer or "", reason=reason or "")
    if audit is not None:
        audit.record("verdict", kind=verdict, state="linked", result_uid=result_uid, model_uid=row.model_uid,
                     job_id=job.id, reviewer=reviewer or None, reason=reason or None, source=source)
    return row
