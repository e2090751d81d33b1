"""The Storage SCP: receive a C-STORE, make it durable, index it, and only then answer success.

The dataset streams to disk as it arrives: pynetdicom's chunked receive
(``STORE_RECV_CHUNKED_DATASET``) writes each P-DATA fragment to a file that :func:`prepare`
places in the object store's ``tmp/`` and that hashes the bytes on their way to the disk
(:class:`ReceiveFile`). Nothing is held in memory but the header, whatever the size. That file
is already the Part-10 file the store keeps: preamble, our File Meta (the request's UIDs, the
presentation context's transfer syntax), then the dataset exactly as sent.

For each C-STORE, :func:`handle_store`:

1. checks the request (SOP Instance UID syntax, SOP class of the presentation context);
2. has a worker fsync the received file, while it checks the header (parsed by another
   worker as the data arrived; pixel data and other large values are never read): its
   structure to the last byte, and that its SOP Class and Instance UIDs match the request;
3. for a model object (Raw Data carrying our private block), verifies it completely
   (:func:`iods.model_object.unpack_file`: checksum, onnx.checker, signature against the card);
4. under the node's write lock, in one transaction: checks for a duplicate, indexes
   patient/study/series/instance (or registers a model), renames the file into
   ``objects/ab/cd/<sha256>.dcm`` once its fsync is done (:class:`_Durable`), and commits
   (SQLite ``synchronous=FULL``) while a worker fsyncs the directory;
5. answers 0x0000 once the file, its directory entry and the transaction are on disk.

Any failure answers a failure status with an Error Comment and a log line, and leaves no file
behind. Statuses, the duplicate policy and the crash guarantees: docs/dimse.md.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import io
import logging
import os
import struct
import sys
import tempfile
import threading
import time
import zlib
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, BinaryIO, NamedTuple

import peewee
from pydicom import dcmread
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_dataset
from pydicom.filewriter import write_file_meta_info as _pydicom_write_file_meta_info
from pydicom.tag import Tag
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian

from iods import model_object
from iods.uids import (
    IMPLEMENTATION_CLASS_UID,
    IMPLEMENTATION_VERSION_NAME,
    RAW_DATA_STORAGE,
    valid_uid,
)
from node.context import NodeContext
from node.dimse.association import assoc_id, state_of
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
from node.storage import index
from node.storage.db import database_proxy, write_transaction
from node.storage.objects import ObjectStore, StoredObject, fsync_dir

log = logging.getLogger("modelnode.store")

# --- statuses (PS3.4 B.2.3 for the Storage Service Class, PS3.7 C for the general ones)

# PS3.5 UI: digits and dots, no empty component, at most 64 characters. Leading zeros inside a
# component are non-conformant but common in the field; they are accepted.
# Values above this stay on disk while indexing (pixel data, a model's payload).
_DEFER = 4096
_HEAD = 64 << 10  # bytes read in one go for the header (a CT header is about 2 KiB)
_CHUNK = 1 << 20
# SQLite's WAL reaches about this size before its first checkpoint (1000 pages of 4 KiB).
WAL_PREALLOCATE = 4 << 20
# A deflated dataset is inflated in memory to be parsed: this much at most.
MAX_INFLATED = 512 << 20

# File Meta of the files we receive: our implementation, not pynetdicom's.

# The work beside each C-STORE's own thread: headers parsed while the data arrives, files
# fsynced and parsed while the handler checks and indexes, directories fsynced while it
# commits, spare receive files created. Up to three of those run at once for one C-STORE:
# prepare() sizes the pool to three workers per allowed association (threads start only when
# needed).
_WORKERS_PER_ASSOCIATION = 3
_sync_pool = ThreadPoolExecutor(max_workers=2 * _WORKERS_PER_ASSOCIATION, thread_name_prefix="store")




class StoreRefused(Exception):
    """A C-STORE that gets a failure status; ``status`` and a reason for the Error Comment."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


# --------------------------------------------------------------------------- receiving


class ReceiveFile:
    """The file pynetdicom streams a C-STORE dataset into; it hashes the bytes as they pass.

    The hash is taken here, on the thread that reads the network, rather than by a worker
    during the fsync: on a real network the receive waits for the wire anyway, and on loopback
    (2 cores, scripts/bench_ingest) both places measured the same.

    pynetdicom creates it through ``tempfile.NamedTemporaryFile(delete=False, mode="wb",
    suffix=".dcm")`` and uses ``write``, ``file.flush``, ``name`` and ``close``; :func:`prepare`
    replaces that factory with this class so the file lands in the store's ``tmp/`` (same
    filesystem: a rename moves it into ``objects/``) under a name that start-up cleaning removes.

    The file itself is usually one of the :data:`spares` created beforehand: creating a file
    took 1 ms on this machine's ext4 while the previous instance's fsyncs were committing, on
    the thread that reads the network.

    Two things happen while the rest of the dataset is still arriving, so that the handler has
    less to do once the last fragment is in (the sender waits for the answer meanwhile):

    * with ``writeback`` on (the store fsyncs), the kernel is asked to start writing every
      256 KiB to disk (``sync_file_range``), so the handler's fsync finds less left to do:
      0.33-0.39 ms instead of 0.8 ms for a 512 KiB CT slice on this machine's disk;
    * once the first 64 KiB are in, a worker parses the header from those bytes and reads the
      index values from it (:attr:`header`, see :func:`_early_header`).
    """

    directory: Path | None = None
    writeback = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        directory = self.directory or Path(tempfile.gettempdir())
        fd, name = spares.take(directory) or tempfile.mkstemp(prefix="rx-", suffix=".part", dir=directory)
        # Unbuffered: P-DATA fragments are large and pynetdicom flushes after each one anyway.
        self.file = os.fdopen(fd, "wb", buffering=0)
        self.name = name
        self.size = 0
        self._synced_to = 0
        self.transfer_syntax: str | None = None  # set with the File Meta (_write_file_meta_info)
        self._head: bytearray | None = bytearray()
        self._hash = hashlib.sha256()
        self.header: Future[EarlyHeader | None] | None = None

    def write(self, data: bytes | bytearray | memoryview) -> int:
        self._hash.update(data)
        written = self.file.write(data)
        self.size += len(data)
        if self._head is not None:
            self._collect_head(data)
        if self.writeback and self.size - self._synced_to >= _WRITEBACK_STEP:
            _start_writeback(self.file.fileno(), self._synced_to, self.size - self._synced_to)
            self._synced_to = self.size
        return written

    def _collect_head(self, data: bytes | bytearray | memoryview) -> None:
        head = self._head
        assert head is not None
        head += data[:_HEAD - len(head)]
        if len(head) >= _HEAD:
            self._head = None
            if self.transfer_syntax and self.transfer_syntax != DeflatedExplicitVRLittleEndian:
                self.header = _sync_pool.submit(_early_header, bytes(head), self.transfer_syntax)

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


class SpareFiles:
    """Empty receive files, created by a worker ahead of need (see :class:`ReceiveFile`).

    Named ``spare-*.part`` in the store's ``tmp/``: start-up cleaning removes them like any
    partial file, and :meth:`clear` (at stop) removes the unused ones. A spare in use keeps its
    name until it is renamed into ``objects/``.
    """

    def __init__(self, target: int = 2) -> None:
        self.target = target
        self._files: list[tuple[int, str]] = []
        self._directory: Path | None = None
        self._creating = 0
        self._lock = threading.Lock()

    def take(self, directory: Path) -> tuple[int, str] | None:
        """A spare in ``directory`` (descriptor, path) or None; starts making the next one."""
        with self._lock:
            if directory != self._directory:
                self._clear_locked()
                self._directory = directory
            taken = self._files.pop() if self._files else None
            missing = self.target - len(self._files) - self._creating
            self._creating += max(missing, 0)
        for _ in range(missing):
            _sync_pool.submit(self._create, directory)
        return taken

    def _create(self, directory: Path) -> None:
        try:
            fd, name = tempfile.mkstemp(prefix="spare-", suffix=".part", dir=directory)
        except OSError as exc:  # the receive path makes its own file then, and reports
            log.debug("cannot create a spare receive file in %s: %s", directory, exc)
            with self._lock:
                self._creating -= 1
            return
        with self._lock:
            self._creating -= 1
            if directory == self._directory:
                self._files.append((fd, name))
                return
        _remove(fd, name)

    def clear(self) -> None:
        """Close and remove the spares not taken."""
        with self._lock:
            self._clear_locked()
            self._directory = None

    def _clear_locked(self) -> None:
        for fd, name in self._files:
            _remove(fd, name)
        self._files.clear()


def _remove(fd: int, name: str) -> None:
    os.close(fd)
    try:
        os.unlink(name)
    except OSError:
        pass


spares = SpareFiles()

# Start writeback once this much has arrived since the last start.
_WRITEBACK_STEP = 256 << 10
_SYNC_FILE_RANGE_WRITE = 2  # <fcntl.h>: start writing dirty pages, do not wait


def _load_sync_file_range() -> Callable[[int, int, int, int], int] | None:
    """libc's ``sync_file_range`` (Linux), or None: then the fsync does all the work."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn  # type: ignore[no-any-return]


_sync_file_range = _load_sync_file_range()


def _start_writeback(fd: int, offset: int, length: int) -> None:
    # A hint only: a failure here (say, a filesystem without it) is caught by the fsync later.
    if _sync_file_range is not None:
        _sync_file_range(fd, offset, length, _SYNC_FILE_RANGE_WRITE)


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
    version = IMPLEMENTATION_VERSION_NAME.encode("ascii")
    body = b"".join((
        struct.pack("<HH2sHI", 2, 0x0001, b"OB", 0, 2) + b"\x00\x01",
        _element(0x0002, b"UI", _ui(sop_class_uid)),
        _element(0x0003, b"UI", _ui(sop_instance_uid)),
        _element(0x0010, b"UI", _ui(transfer_syntax)),
        _element(0x0012, b"UI", _ui(IMPLEMENTATION_CLASS_UID)),
        _element(0x0013, b"SH", version + b" " * (len(version) % 2)),
    ))
    return _element(0x0000, b"UL", struct.pack("<I", len(body))) + body


def _create_file_meta(**kwargs: Any) -> Any:
    return _ReceiveMeta(**kwargs)


def _write_file_meta_info(fp: Any, file_meta: Any, enforce_standard: bool = True) -> None:
    if isinstance(file_meta, _ReceiveMeta):
        if isinstance(fp, ReceiveFile):
            fp.transfer_syntax = str(file_meta.transfer_syntax)
        fp.write(encode_file_meta(file_meta.sop_class_uid, file_meta.sop_instance_uid, file_meta.transfer_syntax))
    else:
        _pydicom_write_file_meta_info(fp, file_meta, enforce_standard)


def prepare(ctx: NodeContext) -> None:
    """Route pynetdicom's receive files into this node's store; remove leftovers of a crash.

    pynetdicom's chunked receive writes into :class:`ReceiveFile` with the File Meta of
    :func:`encode_file_meta` (routed by :func:`node.dimse.compat.receive.route_receive_files`).
    """
    global _sync_pool
    store = ctx.app.store
    workers = _WORKERS_PER_ASSOCIATION * ctx.config.node.max_associations
    if _sync_pool._max_workers < workers:
        _sync_pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="store")
    recover(ctx)
    _preallocate_wal(ctx.app.db)
    _make_fanout(store)
    ReceiveFile.directory = store.tmp
    ReceiveFile.writeback = store.fsync
    receive.route_receive_files(ReceiveFile, _create_file_meta, _write_file_meta_info)
    store.clean_partial()


def _make_fanout(store: ObjectStore) -> None:
    """Create the 256 first-level directories of ``objects/`` once.

    A C-STORE that has to create a fan-out directory also syncs that directory's parent; in a
    young store most instances create a first-level one (200 instances fall into ~140 of the 256).
    """
    missing = [store.objects / f"{i:02x}" for i in range(256) if not (store.objects / f"{i:02x}").is_dir()]
    for d in missing:
        d.mkdir(exist_ok=True)
    if missing and store.fsync:
        fsync_dir(store.objects)


def _preallocate_wal(db: peewee.Database) -> None:
    """Grow SQLite's write-ahead log to its working size once, at start.

    With ``synchronous=FULL`` every commit fsyncs the WAL. While the WAL file grows, that fsync
    also commits the file's new size to the filesystem journal; once the WAL has wrapped around
    (after a checkpoint, about 4 MiB), commits overwrite blocks already allocated and cost a
    plain flush. SQLite deletes the WAL when the last connection closes, so without this every
    start paid the growing price for its first ~150 instances (1.65 ms against 0.33 ms a commit,
    measured on this machine's disk). Writing 4 MiB once and checkpointing makes the WAL restart
    from its beginning with its blocks in place; the database file keeps the pages as free pages
    that later inserts reuse.
    """
    if not isinstance(db, peewee.SqliteDatabase) or db.database in ("", ":memory:"):
        return
    wal = Path(f"{db.database}-wal")
    if wal.exists() and wal.stat().st_size >= WAL_PREALLOCATE:
        return
    with write_transaction(db):
        db.execute_sql('CREATE TABLE IF NOT EXISTS "_wal_preallocate" ("x" BLOB)')
        db.execute_sql('INSERT INTO "_wal_preallocate" VALUES (zeroblob(?))', (WAL_PREALLOCATE,))
    db.execute_sql('DROP TABLE "_wal_preallocate"')
    db.execute_sql("PRAGMA wal_checkpoint(RESTART)")


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
    durable = _Durable(store, src, digest, size, received)
    # 2. The data is complete: a worker fsyncs it while another parses it (its header was
    # parsed and its index values read while it arrived), and this thread goes on to the checks
    # and the index statements; the rename waits for the fsync. Opened here, by descriptor, so
    # the parser never needs the path.
    durable.start_sync()
    fh = open(os.open(src, os.O_RDONLY), "rb")  # noqa: SIM115 (closed by _parse_and_close)
    header = received.header if received is not None else None
    parsing = _sync_pool.submit(_parse_and_close, fh, size, transfer_syntax, header)
    try:
        ds, entry = parsing.result()
        ds_class = index.text(ds, "SOPClassUID")
        ds_uid = index.text(ds, "SOPInstanceUID")
        if ds_class != rq_class:
            raise StoreRefused(IDENTIFIER_DOES_NOT_MATCH, f"dataset SOP Class {ds_class or '(none)'} != request's")
        if ds_uid != rq_uid:
            raise StoreRefused(IDENTIFIER_DOES_NOT_MATCH, f"dataset SOP Instance UID {ds_uid[:20] or '(none)'} != request's")
        for keyword in ("StudyInstanceUID", "SeriesInstanceUID"):
            value = index.text(ds, keyword)
            if not valid_uid(value):
                raise StoreRefused(IDENTIFIER_DOES_NOT_MATCH, f"{keyword} {value[:24]!r} is missing or not a UID")

        # 3. A model object is verified completely before anything is committed.
        is_model = _is_model(ds)
        card = None
        if is_model:
            try:
                card = model_object.unpack_file(src, None, max_payload=ctx.app.registry.max_payload)
            except model_object.ModelObjectError as exc:
                raise StoreRefused(MODEL_REFUSED, f"{exc.code}: {exc}") from exc

        # 4. Into objects/ and into the index, in one transaction, one writer at a time.
        old_digest = _index(ctx, ds, durable, transfer_syntax, calling, is_model, card, event.assoc, entry)
        stored = durable.finish()
    except BaseException:
        durable.abandon(ctx)
        raise
    if old_digest and old_digest != stored.digest:
        _discard(ctx, old_digest)
    return stored, is_model


class EarlyHeader(NamedTuple):
    """What a worker made of the first bytes of a file while the rest arrived."""

    ds: Dataset
    pixels_at: int  # file offset of the pixel data element
    entry: index.IndexEntry | None  # (None for a model object, or values it could not read)


def _early_header(head: bytes, transfer_syntax: str | None) -> EarlyHeader | None:
    parsed = _parse_head(head, transfer_syntax)
    if parsed is None:
        return None
    ds, pos = parsed
    return EarlyHeader(ds, pos, _entry(ds))


def _entry(ds: Dataset) -> index.IndexEntry | None:
    if _is_model(ds):
        return None  # registered by node.storage.registry, which indexes it itself
    try:
        return index.entry_for(ds)
    except Exception:  # noqa: BLE001 (read again, and refused with a reason, in the transaction)
        return None


def _is_model(ds: Dataset) -> bool:
    # The SOP Class read raw first: nearly nothing is Raw Data, and pydicom's look-up costs more.
    return index.text(ds, "SOPClassUID") == RAW_DATA_STORAGE and model_object.is_model_object(ds)


def _parse_and_close(fh: BinaryIO, size: int, transfer_syntax: str,
                     header: Future[EarlyHeader | None] | None = None,
                     ) -> tuple[Dataset, index.IndexEntry | None]:
    """The dataset (see :func:`_parse`) and, for an image, its index entry (None if it cannot
    be read here: :func:`index.index_instance` then reads it and reports the error)."""
    try:
        # The header parsed while the data arrived (ReceiveFile), when it could be; submitted
        # before this task, so a worker is on it or done with it: waiting cannot deadlock.
        early = header.result() if header is not None else None
        ds = _parse(fh, size, transfer_syntax, (early.ds, early.pixels_at) if early is not None else None)
    finally:
        fh.close()
    if early is not None:
        return ds, early.entry
    return ds, _entry(ds)


class _Durable:
    """The received file on its way into the store.

    :meth:`start_sync` starts its fsync on a worker, :meth:`place` waits for it, renames the
    file into ``objects/`` and starts the directory fsync on a worker, :meth:`finish` waits for
    that. :meth:`abandon` makes sure nothing of it stays behind after a refusal.
    """

    def __init__(self, store: ObjectStore, src: Path, digest: str, size: int, received: ReceiveFile | None) -> None:
        self.store, self.src, self.digest, self.size, self.received = store, src, digest, size, received
        self._stored: StoredObject | None = None
        self._sync: Future[None] | None = None
        self._dirs: Future[None] | None = None

    def start_sync(self) -> None:
        if self.received is not None and self.store.fsync:
            self._sync = _sync_pool.submit(self.received.fsync)

    def place(self) -> StoredObject:
        """The file, whole and fsynced, at its place in ``objects/`` (its directory maybe not yet)."""
        if self._stored is None:
            if self._sync is not None:
                self._sync.result()  # (never renamed before its data is on disk)
            if self.received is None:
                self._stored = self.store.put_file(self.src)  # copies, syncs and renames on its own
            else:
                self._stored, new_dirs = _place(self.store, self.src, self.digest, self.size)
                if self.store.fsync:
                    self._dirs = _sync_pool.submit(_sync_dirs, self._stored.path.parent, new_dirs)
        return self._stored

    def finish(self) -> StoredObject:
        """The file in ``objects/``, its directory entry durable too."""
        stored = self.place()
        if self._dirs is not None:
            self._dirs.result()
        return stored

    def abandon(self, ctx: NodeContext) -> None:
        for pending in (self._sync, self._dirs):
            if pending is not None:
                try:
                    pending.result()
                except Exception:  # noqa: S110 (the caller is already reporting the first failure)
                    pass
        self.src.unlink(missing_ok=True)
        if self._stored is not None:
            _discard(ctx, self._stored.digest)


def _place(store: ObjectStore, src: Path, digest: str, size: int) -> tuple[StoredObject, list[Path]]:
    """:meth:`ObjectStore.adopt` without its directory fsyncs: rename only (see :func:`_sync_dirs`).

    Same rules as the store: an object already there (same bytes) is kept and ``src`` dropped;
    new fan-out directories are returned so that their parents get synced too.
    """
    final = store.path(digest)
    if os.path.exists(final):
        src.unlink(missing_ok=True)
        return StoredObject(digest, final, size), []
    leaf = final.parent
    try:
        os.mkdir(leaf)
        new_dirs = [leaf]
    except FileExistsError:
        new_dirs = []
    except FileNotFoundError:  # the first level too (made at start, so removed since)
        new_dirs = [d for d in (leaf.parent, leaf) if not d.exists()]
        leaf.mkdir(parents=True, exist_ok=True)
    os.replace(src, final)
    return StoredObject(digest, final, size), new_dirs


def _sync_dirs(leaf: Path, new_dirs: list[Path]) -> None:
    fsync_dir(leaf)
    for d in new_dirs:
        fsync_dir(d.parent)


def _index(ctx: NodeContext, ds: Dataset, durable: _Durable, transfer_syntax: str,
           calling: str, is_model: bool, card: Any, assoc: Any = None,
           entry: index.IndexEntry | None = None) -> str | None:
    """Write the index rows; commit once the file they name is in place.

    The statements run while the file is being fsynced, and the commit while its directory
    entry is (each pair waits on the disk at once): the success status still waits for all
    three, nothing is renamed before its data is on disk, and a power cut between the rename's
    sync and the commit is repaired at start (:func:`recover`). A replacement or a model waits
    for the directory first, so that an acknowledged older version is never lost.

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
        if previous is not None or is_model:
            durable.finish()  # an older version is replaced, or a model registered: directory first
        if is_model:
            try:
                ctx.app.registry.register_stored(ds, durable.finish(), card=card, source=calling,
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
                _note_arrival(ctx, ds, assoc, calling)
        # The file's fsync ran under the statements above; the rename waits for it, and the
        # directory fsync it starts runs under the commit.
        stored = durable.place()
        if not os.path.exists(stored.path):
            # Same bytes discarded meanwhile by a refused or replaced twin: let the sender retry.
            raise OSError(errno.ENOENT, "stored file vanished before commit")
    return previous[0] if previous is not None else None


# Modalities of objects that are results or documents, not images a model could run on.
NOT_IMAGES = {"SEG", "SR", "KO", "PR", "REG", "DOC", "RWV", "PLAN", "RTSTRUCT", "RTPLAN", "RTDOSE"}


def _note_arrival(ctx: NodeContext, ds: Dataset, assoc: Any, calling: str) -> None:
    from node.pipeline import jobs

    primitive = getattr(assoc.requestor, "primitive", None)
    called = str(getattr(primitive, "called_ae_title", "") or "").strip()
    pl = ctx.config.pipeline
    group_by = pl.group_by_called_ae.get(called, pl.group_by)
    study = index.text(ds, "StudyInstanceUID")
    key = study if group_by == "study" else index.text(ds, "SeriesInstanceUID")
    groups = state_of(assoc).groups
    jobs.note_arrival(key, group_by=group_by, study_uid=study, called_ae=called[:16], calling_ae=calling[:16],
                      new_association=key not in groups)
    groups.add(key)


def association_ended(ctx: NodeContext, assoc: Any) -> set[str]:
    """Released or aborted: the series it delivered may now complete (see node.pipeline.jobs).

    Returns the group keys (series or study UIDs) it delivered to, for the pipeline."""
    from node.pipeline import jobs

    state = state_of(assoc)
    groups = set(state.groups)
    if groups:
        with ctx.write_lock, write_transaction():
            jobs.association_ended(groups)
        state.groups.clear()
    return groups


def recover(ctx: NodeContext) -> int:
    """At start: drop the newest index rows whose file is missing; returns how many.

    Only a power cut can cause it (see :func:`_index`): a new instance's row committed while
    its directory entry was not yet on disk. Such an instance was never acknowledged. At most one
    per association was in that window, so the newest rows are enough to look at.
    """
    limit = max(64, 4 * ctx.config.node.max_associations)
    store = ctx.app.store
    removed = 0
    rows = index.Instance.select(index.Instance.sop_uid, index.Instance.digest).order_by(
        index.Instance.received_at.desc()).limit(limit)
    for row in list(rows):
        if not store.exists(row.digest):
            with ctx.write_lock, write_transaction():
                index.remove_instance(row.sop_uid)
            log.warning("recovered from a crash: instance %s had no file (never acknowledged); removed from the index",
                        row.sop_uid)
            removed += 1
    return removed


def _parse(fh: BinaryIO, size: int, transfer_syntax: str, header: tuple[Dataset, int] | None = None) -> Dataset:
    """The dataset's header, its structure checked to the last byte; pixel data is not read.

    The header is parsed from the first 64 KiB in memory when it ends there (at the pixel data),
    or taken from ``header`` (:func:`_parse_head`, done while the rest arrived); the pixel data
    element and whatever follows it are then walked without reading values.
    """
    try:
        if transfer_syntax == DeflatedExplicitVRLittleEndian:
            # pydicom inflates the whole dataset in memory: measure it first (a deflate bomb is
            # refused before it costs memory), and check offsets against the inflated size.
            inflated = _inflated_size(fh)
            fh.seek(0)
            ds = dcmread(fh, defer_size=_DEFER)
            _check_structure(ds, inflated)
        else:
            ds, pos = header if header is not None else _read_header(fh, size, transfer_syntax)
            _check_structure(ds, size)
            if pos < size:
                _check_tail(fh, ds, pos, size, transfer_syntax)
    except StoreRefused:
        raise
    except (InvalidDicomError, EOFError, ValueError, KeyError, TypeError, IndexError, NotImplementedError,
            AttributeError, OverflowError, UnicodeDecodeError, struct.error, zlib.error) as exc:
        # The parser's message can quote element values (a name, a date): DEBUG only. The
        # refusal (logged at WARNING, sent to the peer) names the kind of error.
        log.debug("dataset parse error: %s", exc)
        raise StoreRefused(CANNOT_UNDERSTAND, f"dataset does not parse ({type(exc).__name__}; "
                                              "details at debug level)") from exc
    if len(ds) == 0:
        raise StoreRefused(CANNOT_UNDERSTAND, "dataset is empty")
    return ds


_PIXEL_TAGS_LE = {struct.pack("<HH", 0x7FE0, e) for e in (0x0008, 0x0009, 0x0010)}
_PIXEL_TAGS_BE = {struct.pack(">HH", 0x7FE0, e) for e in (0x0008, 0x0009, 0x0010)}
_PIXEL_TAGS = _PIXEL_TAGS_LE | _PIXEL_TAGS_BE
_LONG_VRS = {b"OB", b"OW", b"OF", b"OD", b"OL", b"OV", b"UN", b"UT", b"UC", b"UR", b"SQ"}


# The File Meta's first element as every writer of a receive file encodes it (PS3.10 7.1):
# (0002,0000) File Meta Information Group Length, UL, 4 bytes.
_META_GROUP_LENGTH = struct.pack("<HH2sH", 2, 0, b"UL", 4)
_PIXEL_TAG_VALUES = frozenset({0x7FE00008, 0x7FE00009, 0x7FE00010})
_ENCODINGS: dict[str, tuple[bool, bool]] = {}


def _encoding(transfer_syntax: str) -> tuple[bool, bool]:
    """(implicit VR, little endian) of a transfer syntax, cached (UID() validates each time)."""
    known = _ENCODINGS.get(transfer_syntax)
    if known is None:
        ts = UID(transfer_syntax)
        known = _ENCODINGS[transfer_syntax] = (ts.is_implicit_VR, ts.is_little_endian)
    return known


def _at_pixels(tag: int, vr: str | None, length: int) -> bool:
    return tag in _PIXEL_TAG_VALUES


def _parse_head(head: bytes, transfer_syntax: str | None) -> tuple[Dataset, int] | None:
    """The header parsed from the first bytes of a file that is still arriving, if it ends there.

    Returns the dataset and the offset of its pixel data element, as :func:`_read_header` does.
    None when the header goes on past these bytes or does not parse: the handler then parses
    the whole file itself, and a refusal gets its reason from that parse.

    The File Meta is this node's own (the receive file starts with it), so it is skipped by its
    group length and the dataset is read with pydicom's ``read_dataset`` in the transfer syntax
    of the presentation context: 0.13 ms for a CT header, where ``dcmread`` took 0.37 ms.
    """
    if not transfer_syntax or transfer_syntax == DeflatedExplicitVRLittleEndian:
        return None
    if len(head) < 144 or head[128:132] != b"DICM" or head[132:140] != _META_GROUP_LENGTH:
        return None
    implicit, little = _encoding(transfer_syntax)
    buf = io.BytesIO(head)
    buf.seek(144 + struct.unpack_from("<I", head, 140)[0])
    try:
        ds = read_dataset(buf, implicit, little, stop_when=_at_pixels, defer_size=_DEFER)
    except Exception:  # noqa: BLE001 (any failure means: parse the complete file later)
        return None
    pos = buf.tell()
    return (ds, pos) if len(ds) and head[pos:pos + 4] in _PIXEL_TAGS else None


def _read_header(fh: BinaryIO, size: int, transfer_syntax: str | None = None) -> tuple[Dataset, int]:
    """Parse up to the pixel data; returns the dataset and the file offset where it stopped."""
    head = fh.read(_HEAD)
    if len(head) == size:  # the whole file is in memory: its parse errors are the answer
        buf = io.BytesIO(head)
        ds = dcmread(buf, stop_before_pixels=True, defer_size=_DEFER)
        return ds, buf.tell()
    got = _parse_head(head, transfer_syntax)
    if got is not None:
        return got
    # The header goes on past the first bytes (or they do not parse): parse it from the file.
    fh.seek(0)
    ds = dcmread(fh, stop_before_pixels=True, defer_size=_DEFER)
    return ds, fh.tell()


def _check_tail(fh: BinaryIO, ds: Dataset, pos: int, size: int, transfer_syntax: str) -> None:
    """Walk the pixel data element (and any element after it) from ``pos``; values are not read."""
    ts = UID(transfer_syntax)
    little, implicit = ts.is_little_endian, ts.is_implicit_VR
    order = "<" if little else ">"
    fh.seek(pos)
    head = fh.read(12)
    group, element = struct.unpack(order + "HH", head[:4])
    tag = (group << 16) | element
    if implicit:
        vr, (length,), value_at = None, struct.unpack(order + "I", head[4:8]), pos + 8
    elif head[4:6] in _LONG_VRS:
        vr, (length,), value_at = head[4:6].decode(), struct.unpack(order + "I", head[8:12]), pos + 12
    else:
        vr, (length,), value_at = head[4:6].decode("ascii", "replace"), struct.unpack(order + "H", head[6:8]), pos + 8
    if length == 0xFFFFFFFF:  # encapsulated: items up to the sequence delimiter
        end = value_at
        while True:
            if end + 8 > size:
                raise StoreRefused(CANNOT_UNDERSTAND, "dataset does not parse: pixel data fragments run past the end")
            fh.seek(end)
            item_group, item_elem, item_len = struct.unpack(order + "HHI", fh.read(8))
            end += 8
            if (item_group, item_elem) == (0xFFFE, 0xE0DD):
                break
            if (item_group, item_elem) != (0xFFFE, 0xE000):
                raise StoreRefused(CANNOT_UNDERSTAND, "dataset does not parse: pixel data is not a fragment sequence")
            end += item_len
    else:
        end = value_at + length
    if end > size:
        raise StoreRefused(CANNOT_UNDERSTAND, f"dataset does not parse: element {Tag(tag)} claims {length} bytes, past the end")
    # Index the pixel data as present without reading it (a deferred value).
    ds[tag] = RawDataElement(Tag(tag), vr, length, None, value_at, implicit, little, True, False)
    if end < size:  # elements after the pixel data (padding, signatures): parse them too
        fh.seek(end)
        tail = read_dataset(fh, implicit, little, defer_size=_DEFER)
        _check_structure(tail, size)
        for t in tail.keys():
            ds[t] = tail.get_item(t, keep_deferred=True)


def _inflated_size(fh: BinaryIO) -> int:
    """The size of a deflated dataset once inflated; refused past :data:`MAX_INFLATED`."""
    fh.seek(128 + 4)
    tag, vr, length, group_length = struct.unpack("<I2sHI", fh.read(12))
    if tag != 0x00000002 or vr != b"UL":
        raise StoreRefused(CANNOT_UNDERSTAND, "file meta without a group length")
    fh.seek(128 + 4 + 12 + group_length)
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    total = 0
    while chunk := fh.read(_CHUNK):
        while chunk:
            total += len(inflater.decompress(chunk, _CHUNK))
            chunk = inflater.unconsumed_tail
            if total > MAX_INFLATED:
                raise StoreRefused(CANNOT_UNDERSTAND, f"deflated dataset inflates past {MAX_INFLATED >> 20} MiB")
    return total + len(inflater.flush())


def _check_structure(ds: Dataset, size: int) -> None:
    """Refuse what pydicom reads leniently: an element whose length runs past the end of the data.

    pydicom defers or truncates such a value without complaint, so garbage bytes "parse" into
    one element with a huge length. The values themselves are not read (they may be large).
    """
    for elem in ds._dict.values():  # (as ds.get_item(tag, keep_deferred=True) for each tag, cheaper)
        length = getattr(elem, "length", 0)
        tell = getattr(elem, "value_tell", None)
        if tell is None or length == 0xFFFFFFFF:
            continue
        if tell + length > size:
            raise StoreRefused(
                CANNOT_UNDERSTAND,
                f"dataset does not parse: element {elem.tag} claims {length} bytes, past the end",
            )


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
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


