"""Content-addressed object store: every instance is a file named by the SHA-256 of its bytes.

Nothing sent over the network chooses a path: a SOP Instance UID such as ``../../etc`` is just
data in the index. Files are written to ``tmp/``, fsynced, and renamed into
``objects/ab/cd/<sha256>.dcm`` (same filesystem, so the rename is atomic); a crash leaves either
the whole file or a ``.part`` in ``tmp/`` that the next start removes.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

# Named as before node/ was split into stages, so that log filters and greps keep working.
log = logging.getLogger("node.storage")

_DIGEST_RE = re.compile(r"^[0-9a-f]{64}$")
_CHUNK = 4 << 20


@dataclass(frozen=True)
class StoredObject:
    digest: str
    path: Path
    size: int


class HashingWriter:
    """A write-only file wrapper that hashes and counts what passes through it."""

    def __init__(self, fh: BinaryIO) -> None:
        self._fh = fh
        self._hash = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes | bytearray | memoryview) -> int:
        self._hash.update(data)
        self.size += len(data)
        return self._fh.write(data)

    def tell(self) -> int:
        return self.size

    def flush(self) -> None:
        self._fh.flush()

    @property
    def digest(self) -> str:
        return self._hash.hexdigest()


class ObjectStore:
    """Files by content under ``root``; see the module docstring for the guarantees."""

    def __init__(self, root: str | Path, *, fsync: bool = True) -> None:
        self.root = Path(root)
        self.objects = self.root / "objects"
        self.tmp = self.root / "tmp"
        self.fsync = fsync
        self.objects.mkdir(parents=True, exist_ok=True)
        self.tmp.mkdir(parents=True, exist_ok=True)

    def clean_partial(self) -> int:
        """Remove temporary files a crash left behind; returns how many."""
        removed = 0
        for p in self.tmp.glob("*.part"):
            p.unlink(missing_ok=True)
            removed += 1
        if removed:
            log.warning("removed %d partial file(s) left by an interrupted write in %s", removed, self.tmp)
        return removed

    def path(self, digest: str) -> Path:
        if not _DIGEST_RE.match(digest):
            raise ValueError(f"not a SHA-256 digest: {digest!r}")
        return self.objects / digest[:2] / digest[2:4] / f"{digest}.dcm"

    def exists(self, digest: str) -> bool:
        return self.path(digest).is_file()

    @contextmanager
    def writer(self) -> Iterator[HashingWriter]:
        """Yield a writer; on a clean exit the bytes become an object (see :attr:`last`)."""
        fd, tmp = tempfile.mkstemp(suffix=".part", dir=self.tmp)
        try:
            with os.fdopen(fd, "wb", buffering=1 << 20) as fh:
                w = HashingWriter(fh)
                yield w
                fh.flush()
                if self.fsync:
                    os.fsync(fh.fileno())
            self.last = self._commit(Path(tmp), w.digest, w.size)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def put_file(self, src: str | Path) -> StoredObject:
        with open(src, "rb") as fh, self.writer() as w:
            while chunk := fh.read(_CHUNK):
                w.write(chunk)
        return self.last

    def put_bytes(self, data: bytes) -> StoredObject:
        with self.writer() as w:
            w.write(data)
        return self.last

    def adopt(self, tmp_path: Path, digest: str, size: int) -> StoredObject:
        """Move a file already written (and fsynced) inside ``tmp/`` into the store."""
        return self._commit(tmp_path, digest, size)

    def remove(self, digest: str) -> None:
        self.path(digest).unlink(missing_ok=True)

    def _commit(self, tmp: Path, digest: str, size: int) -> StoredObject:
        final = self.path(digest)
        if final.exists():
            # Same content already stored: nothing to gain by replacing it.
            tmp.unlink(missing_ok=True)
            return StoredObject(digest, final, size)
        new_dirs = [d for d in (final.parent.parent, final.parent) if not d.exists()]
        final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, final)
        if self.fsync:
            # A new fan-out directory must itself be durable, or the rename can be lost with it.
            fsync_dir(final.parent)
            for d in new_dirs:
                fsync_dir(d.parent)
        return StoredObject(digest, final, size)


def fsync_dir(path: Path) -> None:
    """Make a directory's entries (a rename into it, a new subdirectory) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
