"""The workitem and subscription tables, and the workitem datasets they keep.

A workitem is kept whole as a dataset (Explicit VR Little Endian bytes), the source of every
N-GET and C-FIND answer, with the columns the node searches and decides on beside it: UID,
state, who performs it and where the performer is. The Transaction UID of a claim is a column
only, never in the dataset, so no answer can leak it.

Listed by :func:`node.app.tables`; created with the other tables on first start.
"""

from __future__ import annotations

import datetime as _dt
import json
from io import BytesIO

import peewee
from pydicom.dataset import Dataset
from pynetdicom.dsutils import decode, encode

from node.storage.db import BaseModel
from node.ups.states import SCHEDULED


def _now() -> _dt.datetime:
    return _dt.datetime.now()


class Workitem(BaseModel):
    """One UPS instance."""

    uid = peewee.CharField(max_length=64, unique=True)
    state = peewee.CharField(max_length=12, default=SCHEDULED, index=True)
    # The Transaction UID of the claim ("" while SCHEDULED). Secret: never returned.
    transaction_uid = peewee.CharField(max_length=64, default="")
    # Addressed to this node (Scheduled Workitem Code in scheme 99MODELNODE): its performer does it.
    performed_here = peewee.BooleanField(default=False, index=True)
    # Claimed by the node's own performer (it holds the Transaction UID), not by a peer.
    claimed_here = peewee.BooleanField(default=False)
    requester = peewee.CharField(max_length=16, default="")  # calling AE of the N-CREATE
    label = peewee.CharField(max_length=64, default="")  # Procedure Step Label
    priority = peewee.CharField(max_length=8, default="MEDIUM")
    readiness = peewee.CharField(max_length=12, default="READY")  # Input Readiness State
    dataset = peewee.BlobField()
    # The performer's progress, so a restarted node resumes where it was: "" (not started),
    # "retrieve", "run" (jobs queued), then none once final.
    stage = peewee.CharField(max_length=12, default="")
    job_ids = peewee.TextField(default="[]")
    attempts = peewee.IntegerField(default=0)  # times the performer started on it
    cancel_requested = peewee.TextField(default="")  # a Request Cancel's reason while IN PROGRESS here
    reason = peewee.TextField(default="")  # why it was CANCELED
    timings = peewee.TextField(default="{}")  # seconds per stage of the performer
    # Pull mode (node.ups.pull): the Task Manager this is a copy of, the Transaction UID the node
    # claimed it there with, and whether its final state was written back there.
    remote_ae = peewee.CharField(max_length=16, default="", index=True)
    remote_transaction_uid = peewee.CharField(max_length=64, default="")
    remote_synced = peewee.BooleanField(default=False)
    created_at = peewee.DateTimeField(default=_now, index=True)
    updated_at = peewee.DateTimeField(default=_now)
    started_at = peewee.DateTimeField(null=True)
    finished_at = peewee.DateTimeField(null=True)

    class Meta:
        table_name = "ups_workitem"

    def read(self) -> Dataset:
        """The workitem's attributes, with its Procedure Step State (the column is the truth)."""
        ds = decode_dataset(bytes(self.dataset))
        ds.ProcedureStepState = self.state
        return ds

    def jobs(self) -> list[int]:
        return json.loads(self.job_ids or "[]")

    def timing(self) -> dict[str, float]:
        return json.loads(self.timings or "{}")


class Subscription(BaseModel):
    """An AE that receives the N-EVENT-REPORTs of one workitem, or of all ("" = global)."""

    ae_title = peewee.CharField(max_length=16)
    workitem_uid = peewee.CharField(max_length=64, default="", index=True)
    deletion_lock = peewee.BooleanField(default=False)
    # A filtered global subscription's Matching Keys (a dataset, like a C-FIND identifier).
    matching_keys = peewee.BlobField(null=True)
    created_at = peewee.DateTimeField(default=_now)

    class Meta:
        table_name = "ups_subscription"
        indexes = ((("ae_title", "workitem_uid"), True),)

    def keys(self) -> Dataset | None:
        return decode_dataset(bytes(self.matching_keys)) if self.matching_keys else None


def encode_dataset(ds: Dataset) -> bytes:
    """``ds`` as Explicit VR Little Endian bytes (no File Meta)."""
    raw = encode(ds, False, True)
    if raw is None:
        raise ValueError("the workitem cannot be encoded in Explicit VR Little Endian")
    return raw


def decode_dataset(raw: bytes) -> Dataset:
    return decode(BytesIO(raw), False, True)


def get(uid: str) -> Workitem | None:
    return Workitem.get_or_none(Workitem.uid == uid)


def save(item: Workitem, ds: Dataset | None = None, **fields: object) -> None:
    """Write ``fields`` (and the dataset, when given) of ``item``; call in a write transaction."""
    if ds is not None:
        fields["dataset"] = encode_dataset(ds)
    fields["updated_at"] = _now()
    Workitem.update(**fields).where(Workitem.id == item.id).execute()
    for key, value in fields.items():
        setattr(item, key, value)
