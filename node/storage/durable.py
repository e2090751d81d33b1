"""A received file made durable in the object store, and the store made ready for it at start.

A received file (:mod:`node.storage.receive`) reaches ``objects/ab/cd/<sha256>.dcm`` by a
rename once its fsync is done (:class:`Durable`); the directory entry is fsynced by a worker
while the index transaction commits (SQLite ``synchronous=FULL``). The C-STORE handler
(:mod:`node.dimse.store_scp`) answers success only once the file, its directory entry and the
transaction are on disk, and after a failure nothing of the file stays behind
(:meth:`Durable.abandon`, :func:`discard`). The work beside the handler's own thread runs on
:data:`sync_pool`.

At start, the crash guarantees are kept (:func:`recover` drops an index row whose file a
power cut lost: such an instance was never acknowledged), and what would otherwise slow the
first instances is done once: SQLite's write-ahead log grown to its working size
(:func:`preallocate_wal`) and the fan-out directories of ``objects/`` created
(:func:`make_fanout`). Statuses, the duplicate policy and the crash guarantees: docs/dimse.md.
"""

from __future__ import annotations

import hashlib
import logging
import os
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Protocol

import peewee

from node.context import NodeContext
from node.storage import index
from node.storage.db import write_transaction
from node.storage.objects import ObjectStore, StoredObject, fsync_dir

log = logging.getLogger("modelnode.store")

# SQLite's WAL reaches about this size before its first checkpoint (1000 pages of 4 KiB).
WAL_PREALLOCATE = 4 << 20

# The work beside each C-STORE's own thread: headers parsed while the data arrives, files
# fsynced and parsed while the handler checks and indexes, directories fsynced while it
# commits, spare receive files created. Up to three of those run at once for one C-STORE:
# grow_sync_pool() sizes the pool to three workers per allowed association (threads start only
# when needed).
_WORKERS_PER_ASSOCIATION = 3
sync_pool = ThreadPoolExecutor(max_workers=2 * _WORKERS_PER_ASSOCIATION, thread_name_prefix="store")


def grow_sync_pool(max_associations: int) -> None:
    """Make :data:`sync_pool` large enough for ``max_associations`` C-STOREs at once."""
    global sync_pool
    workers = _WORKERS_PER_ASSOCIATION * max_associations
    if sync_pool._max_workers < workers:
        sync_pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="store")


class _Received(Protocol):
    """What :class:`Durable` needs of a received file (node.storage.receive.ReceiveFile)."""

    def fsync(self) -> None: ...


class Durable:
    """The received file on its way into the store.

    :meth:`start_sync` starts its fsync on a worker, :meth:`place` waits for it, renames the
    file into ``objects/`` and starts the directory fsync on a worker, :meth:`finish` waits for
    that. :meth:`abandon` makes sure nothing of it stays behind after a refusal.
    """

    def __init__(self, store: ObjectStore, src: Path, digest: str, size: int, received: _Received | None) -> None:
        self.store, self.src, self.digest, self.size, self.received = store, src, digest, size, received
        self._stored: StoredObject | None = None
        self._sync: Future[None] | None = None
        self._dirs: Future[None] | None = None

    def start_sync(self) -> None:
        if self.received is not None and self.store.fsync:
            self._sync = sync_pool.submit(self.received.fsync)

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
                    self._dirs = sync_pool.submit(_sync_dirs, self._stored.path.parent, new_dirs)
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
            discard(ctx, self._stored.digest)


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


def discard(ctx: NodeContext, digest: str) -> None:
    """Remove an object file that no index row references (after a refusal or a replacement).

    Under the write lock: a concurrent C-STORE of the same bytes checks, under the same lock,
    that its file is still there before it commits (see :func:`node.dimse.store_scp._index`).
    """
    try:
        with ctx.write_lock:
            if not index.digest_in_use(digest):
                ctx.app.store.remove(digest)
    except (OSError, peewee.PeeweeException) as exc:
        log.warning("could not remove unreferenced object %s: %s", digest, exc)


def hash_file(path: Path) -> str:
    """The SHA-256 of a file that was received without :class:`node.storage.receive.ReceiveFile`."""
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def recover(ctx: NodeContext) -> int:
    """At start: drop the newest index rows whose file is missing; returns how many.

    Only a power cut can cause it (see :func:`node.dimse.store_scp._index`): a new instance's
    (or model's) row committed while its directory entry was not yet on disk. Such an instance was never
    acknowledged. At most one per association was in that window, so the newest rows are enough
    to look at.
    """
    limit = max(64, 4 * ctx.config.node.max_associations)
    store = ctx.app.store
    removed = 0
    rows = index.Instance.select(index.Instance.sop_uid, index.Instance.digest).order_by(
        index.Instance.received_at.desc()).limit(limit)
    for row in list(rows):
        if not store.exists(row.digest):
            from node.storage.registry import ModelRecord

            with ctx.write_lock, write_transaction():
                index.remove_instance(row.sop_uid)
                # A model object is registered in the same transaction as its instance row.
                models = ModelRecord.delete().where(ModelRecord.uid == row.sop_uid).execute()
            log.warning("recovered from a crash: %s %s had no file (never acknowledged); removed from the %s",
                        "model" if models else "instance", row.sop_uid, "registry" if models else "index")
            removed += 1
    return removed


def make_fanout(store: ObjectStore) -> None:
    """Create the 256 first-level directories of ``objects/`` once.

    A C-STORE that has to create a fan-out directory also syncs that directory's parent; in a
    young store most instances create a first-level one (200 instances fall into ~140 of the 256).
    """
    missing = [store.objects / f"{i:02x}" for i in range(256) if not (store.objects / f"{i:02x}").is_dir()]
    for d in missing:
        d.mkdir(exist_ok=True)
    if missing and store.fsync:
        fsync_dir(store.objects)


def preallocate_wal(db: peewee.Database) -> None:
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
