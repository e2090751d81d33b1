"""The Storage SCP: receive a C-STORE, make it durable, index it, and only then answer success.

The dataset streams to disk as it arrives, into a file in the object store's ``tmp/`` that
hashes the bytes on their way to the disk (:mod:`node.storage.receive`; :func:`prepare` routes
pynetdicom's chunked receive there). Nothing is held in memory but the header, whatever the
size, and that file is already the Part-10 file the store keeps.

For each C-STORE, :func:`handle_store`:

1. checks the request (SOP Instance UID syntax, SOP class of the presentation context);
2. has a worker fsync the received file, while it checks the header (parsed by another
   worker as the data arrived; pixel data and other large values are never read): its
   structure to the last byte (:mod:`node.storage.validate`), and that its SOP Class and
   Instance UIDs match the request;
3. for a model object (Raw Data carrying our private block), verifies it completely
   (:func:`iods.model_object.unpack_file`: checksum, onnx.checker, signature against the card);
4. under the node's write lock, in one transaction: checks for a duplicate, indexes
   patient/study/series/instance (or registers a model) and notes the image's arrival for the
   pipeline (:mod:`node.pipeline.arrivals`), renames the file into
   ``objects/ab/cd/<sha256>.dcm`` once its fsync is done (:class:`node.storage.durable.Durable`),
   and commits (SQLite ``synchronous=FULL``) while a worker fsyncs the directory;
5. answers 0x0000 once the file, its directory entry and the transaction are on disk.

Any failure answers a failure status with an Error Comment and a log line, and leaves no file
behind. Statuses, the duplicate policy and the crash guarantees: docs/dimse.md.
"""

from __future__ import annotations

import errno
import logging
import os
import time
from concurrent.futures import Future
from pathlib import Path
from typing import Any, BinaryIO

from pydicom.dataset import Dataset
from pydicom.uid import DeflatedExplicitVRLittleEndian

from iods import model_object
from iods.uids import storable_uid, valid_uid
from node.context import NodeContext
from node.dimse.association import assoc_id
from node.dimse.compat import receive
from node.dimse.status import (
    CANNOT_UNDERSTAND,
    DUPLICATE_SOP_INSTANCE,
    IDENTIFIER_DOES_NOT_MATCH,
    INVALID_SOP_INSTANCE,
    MODEL_REFUSED,
    OUT_OF_RESOURCES,
    PROCESSING_FAILURE,
    SOP_CLASS_NOT_SUPPORTED,
    SUCCESS,
)
from node.pipeline.arrivals import NOT_IMAGES, note_arrival
from node.review import intake as review_intake
from node.storage import durable as durable_store
from node.storage import index
from node.storage.db import database_proxy, write_transaction
from node.storage.durable import Durable, discard, hash_file, make_fanout, preallocate_wal, recover
from node.storage.objects import StoredObject
from node.storage.receive import ReceiveFile, create_file_meta, write_file_meta_info
from node.storage.validate import EarlyHeader, InvalidDataset, index_entry, is_model_dataset, parse

log = logging.getLogger("modelnode.store")


class StoreRefused(Exception):
    """A C-STORE that gets a failure status; ``status`` and a reason for the Error Comment."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


def prepare(ctx: NodeContext) -> None:
    """Route pynetdicom's receive files into this node's store; remove leftovers of a crash.

    pynetdicom's chunked receive writes into :class:`node.storage.receive.ReceiveFile` with the
    File Meta of :func:`node.storage.receive.encode_file_meta` (routed by
    :func:`node.dimse.compat.receive.route_receive_files`).
    """
    store = ctx.app.store
    durable_store.grow_sync_pool(ctx.config.node.max_associations)
    recover(ctx)
    preallocate_wal(ctx.app.db)
    make_fanout(store)
    ReceiveFile.directory = store.tmp
    ReceiveFile.writeback = store.fsync
    receive.route_receive_files(ReceiveFile, create_file_meta, write_file_meta_info)
    store.clean_partial()
    review_intake.resume(ctx)  # verdicts stored before a crash but not yet linked


# --------------------------------------------------------------------------- the handler


def _refuse(ds_status: int, reason: str) -> Dataset:
    rsp = Dataset()
    rsp.Status = ds_status
    # Error Comment is LO: at most 64 characters of the default repertoire, no backslash.
    rsp.ErrorComment = reason.encode("ascii", "replace").decode("ascii").replace("\\", "/")[:64]
    return rsp


def handle_store(event: Any, ctx: NodeContext) -> int | Dataset:
    """The ``evt.EVT_C_STORE`` handler; see the module docstring for what it guarantees."""

    t0 = time.perf_counter()
    assoc = event.assoc
    aid = assoc_id(assoc)
    calling = (assoc.requestor.ae_title or "").strip()
    req = event.request
    sop_uid = str(req.AffectedSOPInstanceUID or "")
    _, received = receive.received_file(req)
    src = Path(event.dataset_path)
    try:
        stored, is_model = _store(event, ctx, src, received, calling)
    except StoreRefused as exc:
        log.warning("[%s] C-STORE %r from %s refused with 0x%04X: %s",
                    aid, sop_uid[:80], calling, exc.status, exc.reason)
        src.unlink(missing_ok=True)
        return _refuse(exc.status, exc.reason)
    except OSError as exc:
        log.error("[%s] C-STORE %s from %s: cannot store (0x%04X): %s", aid, sop_uid, calling, OUT_OF_RESOURCES, exc,
                  exc_info=log.isEnabledFor(logging.DEBUG))
        src.unlink(missing_ok=True)
        return _refuse(OUT_OF_RESOURCES, f"cannot store: {exc.strerror or exc}")
    except Exception as exc:
        log.exception("[%s] C-STORE %s from %s failed (0x%04X)", aid, sop_uid, calling, PROCESSING_FAILURE)
        src.unlink(missing_ok=True)
        return _refuse(PROCESSING_FAILURE, f"processing failure: {type(exc).__name__}")
    log.debug("[%s] stored %s (%s, %d bytes%s) in %.1f ms", aid, sop_uid, stored.digest[:12], stored.size,
              ", model" if is_model else "", (time.perf_counter() - t0) * 1000)
    return SUCCESS


def _store(event: Any, ctx: NodeContext, src: Path, received: ReceiveFile | None,
           calling: str) -> tuple[StoredObject, bool]:
    req = event.request
    cx = event.context
    rq_class = str(req.AffectedSOPClassUID or "")
    rq_uid = str(req.AffectedSOPInstanceUID or "")
    transfer_syntax = str(cx.transfer_syntax)

    # 1. The request itself. A UID is data, never a path: a malformed one that is harmless is
    # stored with a warning (modalities send them), anything else is refused.
    if not storable_uid(rq_uid):
        raise StoreRefused(INVALID_SOP_INSTANCE, f"SOP Instance UID {rq_uid[:24]!r} is not a valid UID")
    if not valid_uid(rq_uid):
        log.warning("[%s] C-STORE %s from %s: the SOP Instance UID is not a valid UID (PS3.5 9.1); "
                    "stored as received", assoc_id(event.assoc), rq_uid, calling)
    if rq_class != str(cx.abstract_syntax):
        raise StoreRefused(SOP_CLASS_NOT_SUPPORTED, f"SOP Class {rq_class} sent on a {cx.abstract_syntax} context")

    store = ctx.app.store
    if received is not None and src.parent == store.tmp:
        digest, size = received.digest, received.size
    else:  # pynetdicom wrote the file itself (prepare() not called): hash it, copy it in later
        received = None
        digest, size = hash_file(src), src.stat().st_size
    durable = Durable(store, src, digest, size, received)
    # 2. The data is complete: a worker fsyncs it while this thread parses it (its header was
    # parsed and its index values read by another worker while it arrived) and goes on to the
    # checks and the index statements; the rename waits for the fsync. Opened here, by
    # descriptor, so the parser never needs the path. (Parsing on a worker too only added a
    # hand-off: this thread waited for it.)
    durable.start_sync()
    fh = open(os.open(src, os.O_RDONLY), "rb")  # noqa: SIM115 (closed by _parse_and_close)
    header = received.header if received is not None else None
    try:
        ds, entry = _parse_and_close(fh, size, transfer_syntax, header)
        ds_class = index.text(ds, "SOPClassUID")
        ds_uid = index.text(ds, "SOPInstanceUID")
        if ds_class != rq_class:
            raise StoreRefused(IDENTIFIER_DOES_NOT_MATCH, f"dataset SOP Class {ds_class or '(none)'} != request's")
        if ds_uid != rq_uid:
            raise StoreRefused(IDENTIFIER_DOES_NOT_MATCH, f"dataset SOP Instance UID {ds_uid[:20] or '(none)'} != request's")
        for keyword in ("StudyInstanceUID", "SeriesInstanceUID"):
            value = index.text(ds, keyword)
            if not storable_uid(value):
                raise StoreRefused(IDENTIFIER_DOES_NOT_MATCH, f"{keyword} {value[:24]!r} is missing or not a UID")

        # 3. A model object is verified completely before anything is committed.
        is_model = is_model_dataset(ds)
        model = None
        if is_model:
            model = _verify_model(ds, src, transfer_syntax, ctx.app.registry.max_payload)

        # 4. Into objects/ and into the index, in one transaction, one writer at a time.
        old_digest = _index(ctx, ds, durable, transfer_syntax, calling, is_model, model, event.assoc, entry)
        stored = durable.finish()
    except BaseException:
        durable.abandon(ctx)
        raise
    if old_digest and old_digest != stored.digest:
        discard(ctx, old_digest)
    return stored, is_model


def _verify_model(ds: Dataset, src: Path, transfer_syntax: str, max_payload: int,
                  ) -> tuple[model_object.ModelCard, model_object.PayloadInfo]:
    """Checksum, onnx.checker, card and shapes of a model object (refused with 0xC100 if any fails).

    From the dataset the handler parsed (:func:`iods.model_object.verify`); a deflated one is
    read again from its file (its parsed offsets are those of the inflated data).
    """
    try:
        if transfer_syntax == DeflatedExplicitVRLittleEndian:
            card = model_object.unpack_file(src, None, max_payload=max_payload)
            return card, model_object.read_card(model_object.read_file(src), max_payload=max_payload)[1]
        return model_object.verify(ds, src, max_payload=max_payload)
    except model_object.ModelObjectError as exc:
        raise StoreRefused(MODEL_REFUSED, f"{exc.code}: {exc}") from exc


def _parse_and_close(fh: BinaryIO, size: int, transfer_syntax: str,
                     header: Future[EarlyHeader | None] | None = None,
                     ) -> tuple[Dataset, index.IndexEntry | None]:
    """The dataset (see :func:`node.storage.validate.parse`) and, for an image, its index entry
    (None if it cannot be read here: :func:`index.index_instance` then reads it and reports the
    error). A dataset that does not parse or hold together is refused as Cannot understand."""
    try:
        # The header parsed while the data arrived (ReceiveFile), when it could be; submitted
        # before this task, so a worker is on it or done with it: waiting cannot deadlock.
        early = header.result() if header is not None else None
        ds = parse(fh, size, transfer_syntax, (early.ds, early.pixels_at) if early is not None else None)
    except InvalidDataset as exc:
        raise StoreRefused(CANNOT_UNDERSTAND, exc.reason) from exc
    finally:
        fh.close()
    if early is not None:
        return ds, early.entry
    return ds, index_entry(ds)


def _index(ctx: NodeContext, ds: Dataset, durable: Durable, transfer_syntax: str,
           calling: str, is_model: bool, model: tuple[Any, Any] | None, assoc: Any = None,
           entry: index.IndexEntry | None = None) -> str | None:
    """Write the index rows; commit once the file they name is in place.

    The statements run while the file is being fsynced, and the commit while its directory
    entry is (each pair waits on the disk at once): the success status still waits for all
    three, nothing is renamed before its data is on disk, and a power cut between the rename's
    sync and the commit is repaired at start (:func:`node.storage.durable.recover`). A
    replacement or a model waits for the directory first, so that an acknowledged older version
    is never lost.

    Returns the digest the instance pointed at before, if any.
    """
    from node.storage.registry import ModelConflict

    db = database_proxy.obj
    policy = ctx.config.storage.duplicate_policy
    with ctx.write_lock, write_transaction(db):
        previous = index.stored_digest(index.text(ds, "SOPInstanceUID"), with_model_flag=True)
        if previous is not None:
            old_digest, old_is_model = previous
            if old_digest == durable.digest:
                durable.finish()  # (dropped in favour of the identical file already there)
                return None  # the same object again: nothing changes, success
            if policy == "reject" or old_is_model or is_model:
                raise StoreRefused(DUPLICATE_SOP_INSTANCE,
                                   f"SOP Instance UID already stored with other content ({policy})")
        if previous is not None:
            durable.finish()  # an older version is replaced: directory first
        if is_model:
            card, payload = model if model is not None else (None, None)
            try:
                # Registered where its file is going: as for an image, the file's fsync runs
                # under these statements and its directory's under the commit
                # (node.storage.durable.recover drops a model whose file a power cut lost).
                target = StoredObject(durable.digest, ctx.app.store.path(durable.digest), durable.size)
                ctx.app.registry.register_stored(ds, target, card=card, payload=payload, source=calling,
                                                 transfer_syntax=transfer_syntax)
            except ModelConflict as exc:
                raise StoreRefused(DUPLICATE_SOP_INSTANCE, f"{exc.code}: model is immutable") from exc
        else:
            row, prev = index.index_instance(ds, digest=durable.digest, size=durable.size,
                                             transfer_syntax=transfer_syntax, calling_ae=calling, entry=entry)
            if prev is not None and prev.series_id != row.series_id:
                index.prune_series(prev.series_id)
            if assoc is not None and ctx.config.pipeline.enabled and index.text(ds, "Modality") not in NOT_IMAGES:
                # Same transaction as the index row: an acknowledged instance always counts
                # towards its series' completion, even across a crash.
                note_arrival(ctx, ds, assoc, calling)
            elif (verdict := review_intake.kind_of(ds)) is not None:
                # A correction or an accept/reject of an AI result: stored as received, then
                # linked to the result and the model after the commit (node.review.intake).
                review_intake.note(ctx, ds, verdict, durable.digest, calling)
        # The file's fsync ran under the statements above; the rename waits for it, and the
        # directory fsync it starts runs under the commit.
        stored = durable.place()
        if not os.path.exists(stored.path):
            # Same bytes discarded meanwhile by a refused or replaced twin: let the sender retry.
            raise OSError(errno.ENOENT, "stored file vanished before commit")
    return previous[0] if previous is not None else None
