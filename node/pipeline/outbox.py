"""The persistent outbox: results waiting to be sent to the PACS, with backoff and a dead letter.

Each row is one instance for one destination AE. The exporter sends due rows by C-STORE; a row
becomes ``sent`` only when the peer answered success (0x0000, or a warning 0xB000-0xB007
that PS3.4 counts as stored). A failure schedules the next attempt after an exponential backoff
(``base * 2**attempts``, capped), and a row still unsent after ``max_age`` becomes ``dead``
with its last error, which ``modelnode jobs show`` and the metrics report. Nothing is retried
forever and nothing is dropped silently.

How one export attempt calls the peer: :func:`export_options` (one attempt, the node's AE title,
DICOM TLS when the ``[[peers]]`` entry says ``tls = true``).
"""

from __future__ import annotations

import datetime as _dt
import logging
from typing import TYPE_CHECKING

import peewee

from node.config import Config
from node.storage.db import BaseModel, write_transaction

if TYPE_CHECKING:
    from node.scu.client import Options

# Named as before node/ was split into stages, so that log filters and greps keep working.
log = logging.getLogger("node.outbox")

OUTBOX_STATES = ("pending", "sent", "dead")


def _now() -> _dt.datetime:
    return _dt.datetime.now()


class OutboxItem(BaseModel):
    job_id = peewee.IntegerField(null=True, index=True)
    sop_uid = peewee.CharField(max_length=64)
    digest = peewee.CharField(max_length=64)
    destination = peewee.CharField(max_length=16)  # AE title of a configured peer
    state = peewee.CharField(max_length=8, default="pending", index=True)
    attempts = peewee.IntegerField(default=0)
    created_at = peewee.DateTimeField(default=_now)
    next_attempt_at = peewee.DateTimeField(default=_now, index=True)
    sent_at = peewee.DateTimeField(null=True)
    last_error = peewee.TextField(default="")

    class Meta:
        indexes = ((("sop_uid", "destination", "state"), False),)


def enqueue(job_id: int | None, sop_uid: str, digest: str, destination: str) -> OutboxItem:
    """Queue an instance for a destination. A re-run replaces a still-pending copy of the same UID."""
    with write_transaction():
        (OutboxItem.delete().where((OutboxItem.sop_uid == sop_uid) & (OutboxItem.destination == destination)
                                   & (OutboxItem.state == "pending")).execute())
        return OutboxItem.create(job_id=job_id, sop_uid=sop_uid, digest=digest, destination=destination)


def due(now: _dt.datetime | None = None, limit: int = 32) -> list[OutboxItem]:
    now = now or _now()
    return list(OutboxItem.select().where((OutboxItem.state == "pending") & (OutboxItem.next_attempt_at <= now))
                .order_by(OutboxItem.next_attempt_at, OutboxItem.id).limit(limit))


def mark_sent(item_id: int) -> None:
    OutboxItem.update(state="sent", sent_at=_now(), attempts=OutboxItem.attempts + 1,
                      last_error="").where(OutboxItem.id == item_id).execute()


def mark_failed(item: OutboxItem, error: str, *, base_delay: float, max_delay: float,
                max_age: float, now: _dt.datetime | None = None) -> str:
    """Record a failed attempt; returns the new state ("pending" or "dead")."""
    now = now or _now()
    attempts = item.attempts + 1
    age = (now - item.created_at).total_seconds()
    if age >= max_age:
        OutboxItem.update(state="dead", attempts=attempts, last_error=error).where(OutboxItem.id == item.id).execute()
        log.error("export of %s to %s abandoned after %d attempt(s) over %.0f s: %s (dead letter)",
                  item.sop_uid, item.destination, attempts, age, error)
        return "dead"
    delay = min(max_delay, base_delay * (2 ** (attempts - 1)))
    OutboxItem.update(attempts=attempts, last_error=error,
                      next_attempt_at=now + _dt.timedelta(seconds=delay)).where(OutboxItem.id == item.id).execute()
    log.warning("export of %s to %s failed (attempt %d), next try in %.0f s: %s",
                item.sop_uid, item.destination, attempts, delay, error)
    return "pending"


def job_fully_sent(job_id: int) -> bool:
    items = OutboxItem.select().where(OutboxItem.job_id == job_id)
    return items.exists() and not items.where(OutboxItem.state != "sent").exists()


def backlog() -> dict[str, int]:
    rows = OutboxItem.select(OutboxItem.state, peewee.fn.COUNT(OutboxItem.id).alias("n")).group_by(OutboxItem.state)
    out = dict.fromkeys(OUTBOX_STATES, 0)
    out.update({r.state: r.n for r in rows})
    return out


def export_options(cfg: Config, destination: str) -> Options:
    """The ``node.scu.client.Options`` for one C-STORE of an export to ``destination`` (a ``[[peers]]``
    AE title): a single attempt, since the outbox owns retrying with its own backoff and maximum
    age, and TLS (node.security.tls) when that peer has ``tls = true``."""
    from node.scu import client as scu
    from node.security import tls  # pynetdicom only where something is sent

    return scu.Options(calling_ae=cfg.node.ae_title, retry=scu.NO_RETRY, max_pdu=cfg.node.max_pdu or 262144,
                       tls=tls.tls_args(cfg, destination))
