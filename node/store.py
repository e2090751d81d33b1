"""The Storage SCP: receive a C-STORE, make it durable, index it, and only then answer success.

The dataset streams to disk as it arrives: pynetdicom's chunked receive
(``STORE_RECV_CHUNKED_DATASET``) writes each P-DATA fragment to a temporary file, which
:func:`prepare` places inside the object store's ``tmp/`` and which hashes the bytes on their way
to the disk (:class:`ReceiveFile`). Nothing is held in memory but the header, whatever the size.

For each C-STORE, :func:`handle_store`:

1. checks the request (SOP Instance UID syntax, SOP class of the presentation context);
2. parses the header from the received file (values over 4 KiB stay on disk) and checks that
   SOP Class and SOP Instance UID match the request;
3. for a model object (Raw Data carrying our private block), verifies it completely
   (:func:`iods.model_object.unpack_file`: checksum, onnx.checker, signature against the card);
4. fsyncs the received file and renames it into ``objects/`` under its SHA-256 (the received
   file already is a Part-10 file: preamble, File Meta with the presentation context's transfer
   syntax and the request's UIDs, then the dataset exactly as sent), fsyncs the directory;
5. indexes patient/study/series/instance (and registers a model) in one transaction, with
   SQLite's ``synchronous=FULL``, under the node's write lock;
6. answers 0x0000. Any failure before that answers a failure status with an Error Comment and
   leaves no file behind (a refused file is deleted; a crash leaves at most a ``.part`` in
   ``tmp/`` that the next start removes).

Duplicate SOP Instance UIDs follow ``[storage] duplicate_policy`` (see docs/dimse.md):
identical bytes always succeed without change; different bytes replace the indexed instance
("replace", the default) or are refused with 0x0111 ("reject"). Model objects are immutable
whatever the policy: different bytes under a registered model's UID get 0x0111.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import re
import struct
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, BinaryIO

import peewee
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.filewriter import write_file_meta_info as _pydicom_write_file_meta_info
from pynetdicom import dimse_messages

from iods import model_object
from iods.uids import derived_uid
from node import index
from node.context import NodeContext
from node.db import database_proxy
from node.storage import ObjectStore, StoredObject

log = logging.getLogger("modelnode.store")

# --- statuses (PS3.4 B.2.3 for the Storage Service Class, PS3.7 C for the general ones)
SUCCESS = 0x0000
DUPLICATE_SOP_INSTANCE = 0x0111  # PS3.7 C.4.7: this UID is already stored with other content
INVALID_SOP_INSTANCE = 0x0117  # PS3.7 C.4.11: the SOP Instance UID is not a UID
SOP_CLASS_NOT_SUPPORTED = 0x0122  # request names a class other than the context's
OUT_OF_RESOURCES = 0xA700  # disk full or I/O error: nothing stored, the sender may retry
DATASET_DOES_NOT_MATCH = 0xA900  # dataset's SOP Class/Instance differ from the request
MODEL_REFUSED = 0xA910  # a model object that fails verification (reason in Error Comment)
CANNOT_UNDERSTAND = 0xC210  # the dataset does not parse
PROCESSING_FAILURE = 0xC211  # anything unexpected on our side (also pynetdicom's own code)

# PS3.5 UI: digits and dots, no empty component, at most 64 characters. Leading zeros inside a
# component are non-conformant but common in the field; they are accepted.
_UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")
# Values above this stay on disk while indexing (pixel data, a model's payload).
_DEFER = 4096
_CHUNK = 1 << 20
RAW_DATA_STORAGE = model_object.RAW_DATA_STORAGE

# File Meta of the files we receive: our implementation, not pynetdicom's.
IMPLEMENTATION_UID = str(derived_uid("modelnode", "implementation-class"))
IMPLEMENTATION_VERSION = "MODELNODE_01"

# fsync runs here while the handler parses the header (fsync releases the GIL).
_fsync_pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="fsync")


def valid_uid(value: str) -> bool:
    return 0 < len(value) <= 64 and _UID_RE.match(value) is not None


class StoreRefused(Exception):
    """A C-STORE that gets a failure status; ``status`` and a reason for the Error Comment."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


# --------------------------------------------------------------------------- receiving


class ReceiveFile:
    """The file pynetdicom streams a C-STORE dataset into; it hashes the bytes as they pass.

    pynetdicom creates it through ``tempfile.NamedTemporaryFile(delete=False, mode="wb",
    suffix=".dcm")`` and uses ``write``, ``file.flush``, ``name`` and ``close``; :func:`prepare`
    replaces that factory with this class so the file lands in the store's ``tmp/`` (same
    filesystem: a rename moves it into ``objects/``) under a name that start-up cleaning removes.
    """

    directory: Path | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        import tempfile

        directory = self.directory or Path(tempfile.gettempdir())
        fd, name = tempfile.mkstemp(prefix="rx-", suffix=".part", dir=directory)
        # Unbuffered: P-DATA fragments are large and pynetdicom flushes after each one anyway.
        self.file = os.fdopen(fd, "wb", buffering=0)
        self.name = name
        self._hash = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes | bytearray | memoryview) -> int:
        self._hash.update(data)
        self.size += len(data)
        return self.file.write(data)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.file.close()

    @property
    def closed(self) -> bool:
        return self.file.closed

    def fsync(self) -> None:
        os.fsync(self.file.fileno())

    @property
    def digest(self) -> str:
        return self._hash.hexdigest()


class _ReceiveMeta:
    """What pynetdicom's ``create_file_meta`` returns, for the hand encoder below."""

    __slots__ = ("sop_class_uid", "sop_instance_uid", "transfer_syntax", "kwargs")

    def __init__(self, *, sop_class_uid: str, sop_instance_uid: str, transfer_syntax: str, **kwargs: Any) -> None:
        self.sop_class_uid = sop_class_uid
        self.sop_instance_uid = sop_instance_uid
        self.transfer_syntax = transfer_syntax
        self.kwargs = kwargs


def _element(group_elem: int, vr: bytes, value: bytes) -> bytes:
    return struct.pack("<HH2sH", 2, group_elem, vr, len(value)) + value


def _ui(value: str) -> bytes:
    raw = str(value).encode("ascii", "replace")
    return raw + b"\0" if len(raw) % 2 else raw


def encode_file_meta(sop_class_uid: str, sop_instance_uid: str, transfer_syntax: str) -> bytes:
    """PS3.10 File Meta Information (group 0002, Explicit VR Little Endian), encoded by hand.

    pydicom's writer takes about 0.4 ms per file, on the receive thread, for seven elements.
    """
    version = IMPLEMENTATION_VERSION.encode("ascii")
    body = b"".join((
        struct.pack("<HH2sHI", 2, 0x0001, b"OB", 0, 2) + b"\x00\x01",
        _element(0x0002, b"UI", _ui(sop_class_uid)),
        _element(0x0003, b"UI", _ui(sop_instance_uid)),
        _element(0x0010, b"UI", _ui(transfer_syntax)),
        _element(0x0012, b"UI", _ui(IMPLEMENTATION_UID)),
        _element(0x0013, b"SH", version + b" " * (len(version) % 2)),
    ))
    return _element(0x0000, b"UL", struct.pack("<I", len(body))) + body


def _create_file_meta(**kwargs: Any) -> Any:
    return _ReceiveMeta(**kwargs)


def _write_file_meta_info(fp: Any, file_meta: Any, enforce_standard: bool = True) -> None:
    if isinstance(file_meta, _ReceiveMeta):
        fp.write(encode_file_meta(file_meta.sop_class_uid, file_meta.sop_instance_uid, file_meta.transfer_syntax))
    else:
        _pydicom_write_file_meta_info(fp, file_meta, enforce_standard)


def prepare(ctx: NodeContext) -> None:
    """Route pynetdicom's receive files into this node's store; remove leftovers of a crash.

    Three names in ``pynetdicom.dimse_messages`` are replaced (pynetdicom 3.0): the temporary
    file factory (:class:`ReceiveFile`) and the two File Meta helpers (:func:`encode_file_meta`).
    """
    store = ctx.app.store
    ReceiveFile.directory = store.tmp
    dimse_messages.NamedTemporaryFile = ReceiveFile  # type: ignore[attr-defined]
    dimse_messages.create_file_meta = _create_file_meta  # type: ignore[attr-defined]
    dimse_messages.write_file_meta_info = _write_file_meta_info  # type: ignore[attr-defined]
    store.clean_partial()


# --------------------------------------------------------------------------- the handler


def _refuse(ds_status: int, reason: str) -> Dataset:
    rsp = Dataset()
    rsp.Status = ds_status
    # Error Comment is LO: at most 64 characters.
    rsp.ErrorComment = reason[:64]
    return rsp


def handle_store(event: Any, ctx: NodeContext) -> int | Dataset:
    """The ``evt.EVT_C_STORE`` handler; see the module docstring for what it guarantees."""
    from node.server import assoc_id  # late: node.server imports this module

    t0 = time.perf_counter()
    assoc = event.assoc
    aid = assoc_id(assoc)
    calling = (assoc.requestor.ae_title or "").strip()
    req = event.request
    sop_uid = str(req.AffectedSOPInstanceUID or "")
    received: ReceiveFile | None = getattr(req, "_dataset_file", None)
    src = Path(event.dataset_path)
    try:
        stored, is_model = _store(event, ctx, src, received, calling)
    except StoreRefused as exc:
        log.warning("[%s] C-STORE %r from %s refused with 0x%04X: %s",
                    aid, sop_uid[:80], calling, exc.status, exc.reason)
        src.unlink(missing_ok=True)
        return _refuse(exc.status, exc.reason)
    except OSError as exc:
        log.error("[%s] C-STORE %s from %s: cannot store (0x%04X): %s", aid, sop_uid, calling, OUT_OF_RESOURCES, exc, exc_info=True)
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

    # 1. The request itself. A UID is data, never a path, but one that is not a UID is refused.
    if not valid_uid(rq_uid):
        raise StoreRefused(INVALID_SOP_INSTANCE, f"SOP Instance UID {rq_uid[:24]!r} is not a valid UID")
    if rq_class != str(cx.abstract_syntax):
        raise StoreRefused(SOP_CLASS_NOT_SUPPORTED, f"SOP Class {rq_class} sent on a {cx.abstract_syntax} context")

    store = ctx.app.store
    if received is not None and src.parent == store.tmp:
        digest, size = received.digest, received.size
    else:  # pynetdicom wrote the file itself (prepare() not called): hash it, copy it in later
        received = None
        digest, size = _hash_file(src), src.stat().st_size
    # The data is complete. Making the file durable (fsync, rename into objects/, fsync the
    # directory: about 2 ms of waiting on the disk here) runs on another thread while this one
    # parses and indexes; the transaction commits only once the file is in place. A model
    # object (always Raw Data) is verified from the temporary file first, so it is only synced.
    # Opened first, by descriptor: the worker may rename the file while it is parsed here (and
    # pydicom would stat a file name).
    fh = open(os.open(src, os.O_RDONLY), "rb")  # noqa: SIM115 (closed in the finally below)
    durable = _Durable(store, src, digest, size, received, move=rq_class != RAW_DATA_STORAGE)
    try:
        # 2. Parse what indexing needs; values over 4 KiB (pixel data, payloads) stay on disk
        # (and are never read in this function: the file may have moved).
        try:
            ds = _parse(fh, size)
        finally:
            fh.close()
        ds_class = str(ds.get("SOPClassUID", "") or "")
        ds_uid = str(ds.get("SOPInstanceUID", "") or "")
        if ds_class != rq_class:
            raise StoreRefused(DATASET_DOES_NOT_MATCH, f"dataset SOP Class {ds_class or '(none)'} != request's")
        if ds_uid != rq_uid:
            raise StoreRefused(DATASET_DOES_NOT_MATCH, f"dataset SOP Instance UID {ds_uid[:20] or '(none)'} != request's")
        for keyword in ("StudyInstanceUID", "SeriesInstanceUID"):
            value = str(ds.get(keyword, "") or "")
            if not valid_uid(value):
                raise StoreRefused(DATASET_DOES_NOT_MATCH, f"{keyword} {value[:24]!r} is missing or not a UID")

        # 3. A model object is verified completely before anything is committed.
        is_model = model_object.is_model_object(ds)
        card = None
        if is_model:
            try:
                card = model_object.unpack_file(src, None, max_payload=ctx.app.registry.max_payload)
            except model_object.ModelObjectError as exc:
                raise StoreRefused(MODEL_REFUSED, f"{exc.code}: {exc}") from exc

        # 4./5. Index (and register a model) in one transaction, one writer at a time.
        old_digest = _index(ctx, ds, durable, transfer_syntax, calling, is_model, card)
        stored = durable.finish()
    except BaseException:
        durable.abandon(ctx)
        raise
    if old_digest and old_digest != stored.digest:
        _discard(ctx, old_digest)
    return stored, is_model


class _Durable:
    """The received file on its way into the store, on a worker thread.

    ``finish()`` returns it fsynced and renamed into ``objects/`` (the directory fsynced too);
    ``abandon()`` makes sure nothing of it stays behind after a refusal.
    """

    def __init__(self, store: ObjectStore, src: Path, digest: str, size: int,
                 received: ReceiveFile | None, move: bool) -> None:
        self.store, self.src, self.digest, self.size = store, src, digest, size
        self._stored: StoredObject | None = None
        self._job: Future[StoredObject | None] = _fsync_pool.submit(self._run, received, move)

    def _run(self, received: ReceiveFile | None, move: bool) -> StoredObject | None:
        if received is None:
            return self.store.put_file(self.src)  # copies, syncs and renames on its own
        if self.store.fsync:
            received.fsync()
        return self.store.adopt(self.src, self.digest, self.size) if move else None

    def finish(self) -> StoredObject:
        if self._stored is None:
            stored = self._job.result()
            self._stored = stored or self.store.adopt(self.src, self.digest, self.size)
        return self._stored

    def abandon(self, ctx: NodeContext) -> None:
        try:
            stored = self._stored or self._job.result()
        except Exception:  # noqa: S110 (the caller is already reporting the first failure)
            stored = None
        self.src.unlink(missing_ok=True)
        if stored is not None:
            _discard(ctx, stored.digest)


def _index(ctx: NodeContext, ds: Dataset, durable: _Durable, transfer_syntax: str,
           calling: str, is_model: bool, card: Any) -> str | None:
    """Write the index rows; the commit waits for the durable file.

    Returns the digest the instance pointed at before, if any.
    """
    from node.registry import ModelConflict

    db = database_proxy.obj
    policy = ctx.config.storage.duplicate_policy
    with ctx.write_lock, db.atomic():
        previous = index.stored_digest(str(ds.SOPInstanceUID), with_model_flag=True)
        if previous is not None:
            old_digest, old_is_model = previous
            if old_digest == durable.digest:
                durable.finish()  # (renamed onto the identical file already there)
                return None  # the same object again: nothing changes, success
            if policy == "reject" or old_is_model or is_model:
                raise StoreRefused(DUPLICATE_SOP_INSTANCE,
                                   f"SOP Instance UID already stored with other content ({policy})")
        if is_model:
            try:
                ctx.app.registry.register_stored(ds, durable.finish(), card=card, source=calling,
                                                 transfer_syntax=transfer_syntax)
            except ModelConflict as exc:
                raise StoreRefused(DUPLICATE_SOP_INSTANCE, f"{exc.code}: model is immutable") from exc
        else:
            row, prev = index.index_instance(ds, digest=durable.digest, size=durable.size,
                                             transfer_syntax=transfer_syntax, calling_ae=calling)
            if prev is not None and prev.series_id != row.series_id:
                _prune_series(prev.series_id)
            durable.finish()  # the rows commit only once the file they name is in place
        if not durable.finish().path.exists():
            # Same bytes discarded meanwhile by a refused or replaced twin: let the sender retry.
            raise OSError(errno.ENOENT, "stored file vanished before commit")
    return previous[0] if previous is not None else None


def _parse(fh: BinaryIO, size: int) -> Dataset:
    try:
        ds = dcmread(fh, defer_size=_DEFER)
        _check_structure(ds, size)
    except StoreRefused:
        raise
    except (InvalidDicomError, EOFError, ValueError, KeyError, TypeError, IndexError, NotImplementedError,
            AttributeError, OverflowError, UnicodeDecodeError) as exc:
        raise StoreRefused(CANNOT_UNDERSTAND, f"dataset does not parse: {exc}") from exc
    if len(ds) == 0:
        raise StoreRefused(CANNOT_UNDERSTAND, "dataset is empty")
    return ds


def _check_structure(ds: Dataset, size: int) -> None:
    """Refuse what pydicom reads leniently: an element whose length runs past the end of the data.

    pydicom defers or truncates such a value without complaint, so garbage bytes "parse" into
    one element with a huge length. The values themselves are not read (they may be large).
    """
    for tag in ds.keys():
        elem = ds.get_item(tag, keep_deferred=True)
        length = getattr(elem, "length", 0)
        tell = getattr(elem, "value_tell", None)
        if tell is None or length == 0xFFFFFFFF:
            continue
        if tell + length > size:
            raise StoreRefused(
                CANNOT_UNDERSTAND,
                f"dataset does not parse: element {elem.tag} claims {length} bytes, past the end",
            )


def _prune_series(series_id: int) -> None:
    """A replaced instance moved to another series: drop the rows it left empty."""
    series = index.Series.get_or_none(index.Series.id == series_id)
    if series is None or series.instances.exists():
        return
    study = series.study
    series.delete_instance()
    if not study.series.exists():
        patient = study.patient
        study.delete_instance()
        if not patient.studies.exists():
            patient.delete_instance()


def _discard(ctx: NodeContext, digest: str) -> None:
    """Remove an object file that no index row references (after a refusal or a replacement).

    Under the write lock: a concurrent C-STORE of the same bytes checks, under the same lock,
    that its file is still there before it commits (see :func:`_index`).
    """
    try:
        with ctx.write_lock:
            if not index.digest_in_use(digest):
                ctx.app.store.remove(digest)
    except (OSError, peewee.PeeweeException) as exc:
        log.warning("could not remove unreferenced object %s: %s", digest, exc)


def _hash_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
