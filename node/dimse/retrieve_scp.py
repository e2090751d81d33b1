"""C-MOVE and C-GET SCP handlers: send stored instances, models and images, at every level.

The identifier is resolved with the C-FIND engine (:func:`node.dimse.query_scp.parse_identifier` in
retrieve mode: the level's unique key is required; then :func:`node.dimse.query_scp.instances_for`).

How the bytes go out. pynetdicom wants the handler to yield a ``Dataset`` per sub-operation and
re-encodes it, which is not byte-exact for every file (see :mod:`node.scu.send`). So the handler yields
a :class:`StoredInstance`, a small ``Dataset`` that only names the stored file, and the
association that will carry the C-STOREs gets its ``send_c_store`` wrapped (per association
object, nothing global): a ``StoredInstance`` goes through :func:`node.scu.send.send_file`, which
streams the file in its stored transfer syntax when the peer accepted it, or converts a copy
(decompressing when it must) when the peer accepted only other syntaxes. Model objects go out in
Explicit VR Little Endian only. A sub-operation that cannot be made raises
:class:`node.scu.send.SendRefused`, which pynetdicom counts as a failed sub-operation (its UID goes in
the Failed SOP Instance UID List), and a log line says why.

* C-GET: the requestor's own association carries the C-STOREs (SCP role for the storage
  classes it proposed); its ``send_c_store`` is wrapped when the request arrives.
* C-MOVE: the destination must be a configured peer (``[[peers]]``), else 0xA801 and a log
  line. pynetdicom opens the association to it with the contexts yielded here (each stored
  SOP class / transfer syntax exactly, plus an uncompressed fallback; models Explicit VR LE
  only) and an EVT_ACCEPTED handler that wraps that association's ``send_c_store``.

Final statuses are pynetdicom's, which follow PS3.4 C.4.2.1.5 / C.4.3.1.3: 0x0000 when every
sub-operation completed, 0xB000 when some failed or had warnings, 0xA702 when all failed, 0xFE00
on C-CANCEL, each with the sub-operation counts. An identifier that cannot be answered gets
0xA900 (or 0xC001 when the index cannot be read) with an Error Comment.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import peewee
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID
from pynetdicom import evt

from node.dimse.association import assoc_id, state_of
from node.dimse.query_scp import (
    QueryError,
    information_model,
    instances_for,
    parse_identifier,
)
from node.dimse.status import CANCEL, PENDING, UNABLE_TO_READ_INDEX
from node.dimse.status import category as status_category
from node.scu.send import (
    FileInfo,
    SendRefused,
    file_info,
    send_file,
    storage_contexts,
)
from node.storage.index import Instance

log = logging.getLogger("modelnode.retrieve")


class StoredInstance(Dataset):
    """What the handlers yield: the identity of a stored file, not its content.

    SOPClassUID and SOPInstanceUID are real elements so that pynetdicom can name the instance in
    its Failed SOP Instance UID List; the file itself is read only when it is sent.
    """

    def __init__(self, row: Instance, path: Path) -> None:
        super().__init__()
        self.SOPClassUID = row.sop_class_uid
        self.SOPInstanceUID = row.sop_uid
        self.file_meta = FileMetaDataset()
        self.file_meta.TransferSyntaxUID = UID(row.transfer_syntax)
        # Plain attributes (lower case): pydicom keeps them out of the dataset's elements.
        self.modelnode_path = path
        self.modelnode_is_model = bool(row.series.is_model)


@dataclass
class Tally:
    """Sub-operation outcomes as seen by the wrapper, for the summary log line."""

    completed: int = 0
    warning: int = 0
    failed: int = 0
    reasons: list[str] = field(default_factory=list)  # why sub-operations failed, in order

    def fail(self, reason: str) -> None:
        self.failed += 1
        self.reasons.append(reason)
        log.warning("sub-operation failed: %s", reason)


def _install_sender(assoc: Any, tmp_dir: Path, tally: Tally) -> None:
    """Wrap ``assoc.send_c_store`` so that a :class:`StoredInstance` is sent from its file."""
    state = state_of(assoc)
    original = state.library_send_c_store
    if original is None:
        original = state.library_send_c_store = assoc.send_c_store

    def send_c_store(dataset: Any, msg_id: int = 1, priority: int = 2, originator_aet: str | None = None,
                     originator_id: int | None = None) -> Dataset:
        kwargs = {"msg_id": msg_id, "priority": priority, "originator_aet": originator_aet,
                  "originator_id": originator_id}
        if not isinstance(dataset, StoredInstance):
            return original(dataset, **kwargs)
        uid = str(dataset.SOPInstanceUID)
        try:
            info = _file_info(dataset)
            status = send_file(assoc, info, model=dataset.modelnode_is_model, tmp_dir=tmp_dir, send=original,
                               **kwargs)
        except SendRefused as exc:
            tally.fail(str(exc))
            raise
        code = int(status.Status) if "Status" in status else None
        category = status_category(code) if code is not None else "lost"
        if category == "lost":
            tally.fail(f"{uid}: no C-STORE response (association lost)")
        elif category == "success":
            tally.completed += 1
        elif category == "warning":
            tally.warning += 1
        else:
            comment = f" ({status.ErrorComment})" if "ErrorComment" in status else ""
            tally.fail(f"{uid}: the peer answered 0x{code:04X}{comment}")
        return status

    assoc.send_c_store = send_c_store


def _file_info(ds: StoredInstance) -> FileInfo:
    path: Path = ds.modelnode_path
    if not path.is_file():
        raise SendRefused(f"{ds.SOPInstanceUID}: the stored file is missing from the object store ({path.name})")
    try:
        info = file_info(path)
    except ValueError as exc:
        raise SendRefused(f"{ds.SOPInstanceUID}: the stored file cannot be read: {exc}") from exc
    if str(info.sop_instance) != str(ds.SOPInstanceUID):
        # The index points at a file of another instance: never send the wrong patient's data.
        raise SendRefused(f"{ds.SOPInstanceUID}: the stored file holds {info.sop_instance}; index and store disagree")
    return info


def _peer(event: Any) -> str:
    assoc = event.assoc
    ident = assoc_id(assoc)
    rq = assoc.requestor
    who = f"{(rq.ae_title or '?').strip()}@{rq.address}"
    return f"[{ident}] {who}" if ident else who


def _resolve(event: Any) -> list[Instance]:
    model = information_model(str(event.request.AffectedSOPClassUID))
    query = parse_identifier(event.identifier, model, retrieve=True)
    try:
        return instances_for(query)
    except peewee.PeeweeException as exc:
        log.error("index error while resolving a retrieve: %s", exc)
        raise QueryError(UNABLE_TO_READ_INDEX, "the node's index cannot be read") from exc


def _items(ctx: Any, instances: list[Instance]) -> list[StoredInstance]:
    store = ctx.app.store
    return [StoredInstance(row, store.path(row.digest)) for row in instances]


def _summary(op: str, peer: str, tally: Tally, total: int) -> None:
    line = (f"{op} for {peer}: {total} sub-operation(s), {tally.completed} completed, {tally.warning} warning, "
            f"{tally.failed} failed")
    if tally.failed:
        log.warning("%s (first failure: %s)", line, tally.reasons[0])
    else:
        log.info("%s", line)


def _sub_operations(event: Any, op: str, peer: str, items: list[StoredInstance], tally: Tally
                    ) -> Iterator[tuple[int, Dataset | None]]:
    for n, item in enumerate(items):
        if event.is_cancelled:
            log.info("%s for %s cancelled after %d of %d sub-operation(s)", op, peer, n, len(items))
            yield CANCEL, None
            return
        yield PENDING, item
    _summary(op, peer, tally, len(items))


def handle_move(event: Any, ctx: Any) -> Iterator[Any]:
    """EVT_C_MOVE handler (see the module docstring for the protocol with pynetdicom)."""
    peer = _peer(event)
    destination = (event.move_destination or "").strip()
    dest = ctx.config.peer(destination)
    if dest is None:
        log.warning("C-MOVE from %s refused (0xA801): move destination %r is not a configured peer "
                    "(add it to [[peers]] in the configuration)", peer, destination)
        yield None, None
        return
    try:
        instances = _resolve(event)
    except QueryError as exc:
        log.warning("C-MOVE from %s refused (0x%04X): %s", peer, exc.status, exc.comment)
        # pynetdicom sends a failure only after the destination and a sub-operation count.
        yield dest.host, dest.port
        yield 1
        yield exc.status_dataset(), None
        return
    items = _items(ctx, instances)
    log.info("C-MOVE from %s to %s (%s:%d): %d instance(s)", peer, destination, dest.host, dest.port, len(items))
    tally = Tally()
    tmp_dir = ctx.app.store.tmp

    def on_accepted(ev: Any) -> None:
        _install_sender(ev.assoc, tmp_dir, tally)

    contexts = storage_contexts((i.SOPClassUID, i.file_meta.TransferSyntaxUID, i.modelnode_is_model) for i in items)
    kwargs: dict[str, Any] = {"evt_handlers": [(evt.EVT_ACCEPTED, on_accepted)], "max_pdu": ctx.config.node.max_pdu}
    if contexts:
        kwargs["contexts"] = contexts
    yield dest.host, dest.port, kwargs
    yield len(items)
    yield from _sub_operations(event, "C-MOVE", peer, items, tally)


def handle_get(event: Any, ctx: Any) -> Iterator[Any]:
    """EVT_C_GET handler: the C-STOREs go back over the requestor's own association."""
    peer = _peer(event)
    try:
        instances = _resolve(event)
    except QueryError as exc:
        log.warning("C-GET from %s refused (0x%04X): %s", peer, exc.status, exc.comment)
        yield 1
        yield exc.status_dataset(), None
        return
    items = _items(ctx, instances)
    log.info("C-GET from %s: %d instance(s)", peer, len(items))
    tally = Tally()
    _install_sender(event.assoc, ctx.app.store.tmp, tally)
    yield len(items)
    yield from _sub_operations(event, "C-GET", peer, items, tally)
