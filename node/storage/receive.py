"""The files a C-STORE dataset is received into: streamed to disk, hashed on the way.

The dataset streams to disk as it arrives: pynetdicom's chunked receive
(``STORE_RECV_CHUNKED_DATASET``) writes each P-DATA fragment to a file that
:func:`node.dimse.store_scp.prepare` places in the object store's ``tmp/`` and that hashes the
bytes on their way to the disk (:class:`ReceiveFile`). Nothing is held in memory but the header,
whatever the size. That file is already the Part-10 file the store keeps: preamble, our File
Meta (the request's UIDs, the presentation context's transfer syntax; our implementation, not
pynetdicom's: :func:`encode_file_meta`), then the dataset exactly as sent.

Receive files are created ahead of need (:class:`SpareFiles`), and their data is written back
while it arrives (``sync_file_range``), so that the thread reading the network and the handler
after it wait on the disk as little as possible. Where the file goes from there:
:mod:`node.storage.durable`.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import struct
import sys
import tempfile
import threading
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from pydicom.filewriter import write_file_meta_info as _pydicom_write_file_meta_info
from pydicom.uid import DeflatedExplicitVRLittleEndian

from iods.uids import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME
from node.storage import durable
from node.storage.validate import HEAD_SIZE, EarlyHeader, early_header

log = logging.getLogger("modelnode.store")


class ReceiveFile:
    """The file pynetdicom streams a C-STORE dataset into; it hashes the bytes as they pass.

    The hash is taken here, on the thread that reads the network, rather than by a worker
    during the fsync: on a real network the receive waits for the wire anyway, and on loopback
    (2 cores, scripts/bench_ingest) both places measured the same.

    pynetdicom creates it through ``tempfile.NamedTemporaryFile(delete=False, mode="wb",
    suffix=".dcm")`` and uses ``write``, ``file.flush``, ``name`` and ``close``;
    :func:`node.dimse.store_scp.prepare` replaces that factory with this class so the file lands
    in the store's ``tmp/`` (same filesystem: a rename moves it into ``objects/``) under a name
    that start-up cleaning removes.

    The file itself is usually one of the :data:`spares` created beforehand: creating a file
    took 1 ms on this machine's ext4 while the previous instance's fsyncs were committing, on
    the thread that reads the network.

    Two things happen while the rest of the dataset is still arriving, so that the handler has
    less to do once the last fragment is in (the sender waits for the answer meanwhile):

    * with ``writeback`` on (the store fsyncs), the kernel is asked to start writing every
      256 KiB to disk (``sync_file_range``), so the handler's fsync finds less left to do:
      0.33-0.39 ms instead of 0.8 ms for a 512 KiB CT slice on this machine's disk;
    * once the first 64 KiB are in, a worker parses the header from those bytes and reads the
      index values from it (:attr:`header`, see :func:`node.storage.validate.early_header`).
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
        self.transfer_syntax: str | None = None  # set with the File Meta (write_file_meta_info)
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
        head += data[:HEAD_SIZE - len(head)]
        if len(head) >= HEAD_SIZE:
            self._head = None
            if self.transfer_syntax and self.transfer_syntax != DeflatedExplicitVRLittleEndian:
                self.header = durable.sync_pool.submit(early_header, bytes(head), self.transfer_syntax)

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
            durable.sync_pool.submit(self._create, directory)
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


def create_file_meta(**kwargs: Any) -> Any:
    """Stands in for pynetdicom's ``create_file_meta`` in the chunked receive."""
    return _ReceiveMeta(**kwargs)


def write_file_meta_info(fp: Any, file_meta: Any, enforce_standard: bool = True) -> None:
    """Stands in for pydicom's ``write_file_meta_info`` in the chunked receive."""
    if isinstance(file_meta, _ReceiveMeta):
        if isinstance(fp, ReceiveFile):
            fp.transfer_syntax = str(file_meta.transfer_syntax)
        fp.write(encode_file_meta(file_meta.sop_class_uid, file_meta.sop_instance_uid, file_meta.transfer_syntax))
    else:
        _pydicom_write_file_meta_info(fp, file_meta, enforce_standard)
