"""Who is told of which workitem's changes (UPS Watch, PS3.4 CC.2.3).

An AE subscribes to one workitem, or globally (the SOP Instance UID of the UPS Global
Subscription Instance, or of the Filtered Global Subscription Instance with Matching Keys).
A global subscription is kept as a row with an empty workitem UID and is copied onto every
workitem created afterwards (:func:`on_created`) and onto those that exist when it is made, so
an AE may later unsubscribe from one workitem and keep the rest. Unsubscribing globally drops
them all; suspending drops only the global row (no new workitems), keeping the existing ones.

Functions here only read and write the table; call them in a write transaction under the
node's write lock (node.ups.service does).
"""

from __future__ import annotations

from pydicom.dataset import Dataset
from pynetdicom.sop_class import (
    UPSFilteredGlobalSubscriptionInstance,
    UPSGlobalSubscriptionInstance,
)

from node.ups import match
from node.ups.states import FINAL
from node.ups.store import Subscription, Workitem, encode_dataset

GLOBAL_UIDS = frozenset({str(UPSGlobalSubscriptionInstance), str(UPSFilteredGlobalSubscriptionInstance)})


def is_global(uid: str) -> bool:
    return uid in GLOBAL_UIDS


def subscribe_one(ae_title: str, workitem_uid: str, deletion_lock: bool) -> None:
    (Subscription.insert(ae_title=ae_title, workitem_uid=workitem_uid, deletion_lock=deletion_lock)
     .on_conflict(conflict_target=[Subscription.ae_title, Subscription.workitem_uid],
                  update={Subscription.deletion_lock: deletion_lock}).execute())


def subscribe_global(ae_title: str, deletion_lock: bool, keys: Dataset | None) -> list[Workitem]:
    """Subscribe ``ae_title`` to every workitem, now and to come (those matching ``keys`` when
    filtered); returns the existing ones (not final) it now watches, for their state reports."""
    raw = encode_dataset(keys) if keys is not None and len(keys) else None
    (Subscription.insert(ae_title=ae_title, workitem_uid="", deletion_lock=deletion_lock, matching_keys=raw)
     .on_conflict(conflict_target=[Subscription.ae_title, Subscription.workitem_uid],
                  update={Subscription.deletion_lock: deletion_lock, Subscription.matching_keys: raw}).execute())
    watched = []
    for item in Workitem.select().where(Workitem.state.not_in(sorted(FINAL))).order_by(Workitem.id):
        if raw is not None and not match.matches(keys, item.read()):  # type: ignore[arg-type]
            continue
        subscribe_one(ae_title, item.uid, deletion_lock)
        watched.append(item)
    return watched


def unsubscribe(ae_title: str, workitem_uid: str) -> int:
    """Drop one subscription, or with a global UID every subscription of ``ae_title``."""
    q = Subscription.delete().where(Subscription.ae_title == ae_title)
    if not is_global(workitem_uid):
        q = q.where(Subscription.workitem_uid == workitem_uid)
    return q.execute()


def suspend_global(ae_title: str) -> int:
    """Stop subscribing ``ae_title`` to new workitems; the existing subscriptions stay."""
    return (Subscription.delete().where((Subscription.ae_title == ae_title) & (Subscription.workitem_uid == ""))
            .execute())


def on_created(workitem_uid: str, ds: Dataset) -> list[str]:
    """Give a new workitem the subscribers of every global subscription it matches."""
    added = []
    for sub in Subscription.select().where(Subscription.workitem_uid == ""):
        keys = sub.keys()
        if keys is not None and not match.matches(keys, ds):
            continue
        subscribe_one(sub.ae_title, workitem_uid, sub.deletion_lock)
        added.append(sub.ae_title)
    return added


def receivers(workitem_uid: str) -> list[str]:
    """The AE titles to tell of a change to ``workitem_uid``."""
    return [s.ae_title for s in Subscription.select(Subscription.ae_title)
            .where(Subscription.workitem_uid == workitem_uid).order_by(Subscription.id)]
