"""The audit log: one JSON object per line, appended, never rewritten.

Each line has ``ts`` (UTC, ISO 8601 with milliseconds), ``event`` and the fields of that event:
who (``calling_ae``, ``called_ae``, ``address``, ``user`` when one was verified), which
association (``association``), what (``sop_instance_uid``, ``model_uid``, ``study_uids``...),
and ``outcome`` / ``reason``. Patient names, IDs and other demographics are never written: any
field whose key names one (node.ops.logsetup.PHI_KEYS) is dropped on the way in.

Events (docs/operations.md): association-accepted, association-rejected, identity-rejected,
model-stored, model-replaced, model-removed, model-retrieved, images-stored (one summary per
association), selection, selection-contradiction, result-exported, workitem (a UPS workitem
created or changing state), verdict, model-federated, console-login.

Why a file of its own rather than the journal: the audit trail must outlive log rotation and
rate limiting, be read by tools that are not journalctl, and be made append-only by the file
system (``chattr +a``, docs/install.md). The file is opened with O_APPEND and each event is one
``write()``, so concurrent writers (the node and ``modelnode models remove``) never interleave
within a line. A failed write is logged and counted (``modelnode_audit_errors_total``) but never
fails the DICOM operation: a full disk must not turn into refusing every association.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import threading
from collections import deque
from pathlib import Path
from typing import Any

from node.dimse import association
from node.ops.logsetup import is_phi_key

log = logging.getLogger("modelnode.audit")

ASSOCIATION_ACCEPTED = "association-accepted"
ASSOCIATION_REJECTED = "association-rejected"
IDENTITY_REJECTED = "identity-rejected"
MODEL_STORED = "model-stored"
MODEL_REPLACED = "model-replaced"
MODEL_REMOVED = "model-removed"
MODEL_RETRIEVED = "model-retrieved"
IMAGES_STORED = "images-stored"
SELECTION = "selection"
# The images contradict the header (node.pipeline.selection.Contradiction): both readings,
# their probabilities, the policy and what it did (held, trusted image/header, marked).
CONTRADICTION = "selection-contradiction"
RESULT_EXPORTED = "result-exported"
WORKITEM = "workitem"
EVENTS = frozenset({ASSOCIATION_ACCEPTED, ASSOCIATION_REJECTED, IDENTITY_REJECTED, MODEL_STORED, MODEL_REPLACED,
                    MODEL_REMOVED, MODEL_RETRIEVED, IMAGES_STORED, SELECTION, CONTRADICTION, RESULT_EXPORTED,
                    WORKITEM})


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def association_fields(assoc: Any) -> dict[str, Any]:
    """Who is on the other end of a pynetdicom association, for an audit event."""
    rq = assoc.requestor
    state = association.peek(assoc)
    primitive = getattr(rq, "primitive", None)
    calling = (getattr(primitive, "calling_ae_title", None) or rq.ae_title or "").strip()
    called = (getattr(primitive, "called_ae_title", None) or "").strip()
    out: dict[str, Any] = {
        "association": state.id if state is not None else None,
        "calling_ae": calling,
        "called_ae": called,
        "address": rq.address,
        "port": rq.port,
    }
    user = state.user if state is not None else None
    if user:
        out["user"] = user
    return out


class AuditLog:
    """``AuditLog(path).record("model-stored", model_uid=..., **association_fields(assoc))``.

    Thread-safe. ``fsync`` makes every event durable before :meth:`record` returns. A disabled log
    (``enabled=False``) accepts and drops every event, so callers need no conditionals.
    """

    def __init__(self, path: str | Path, *, fsync: bool = False, enabled: bool = True) -> None:
        self.path = Path(path)
        self.fsync = fsync
        self.enabled = enabled
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._inode: tuple[int, int] | None = None

    @classmethod
    def from_config(cls, cfg: Any) -> AuditLog:
        return cls(cfg.audit_path, fsync=cfg.audit.fsync, enabled=cfg.audit.enabled)

    def _open(self) -> int:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        st = os.fstat(fd)
        self._fd, self._inode = fd, (st.st_dev, st.st_ino)
        return fd

    def _current_fd(self) -> int:
        if self._fd is None:
            return self._open()
        # Moved away (archived by an operator): start a new file at the configured path.
        try:
            st = os.stat(self.path)
            same = (st.st_dev, st.st_ino) == self._inode
        except FileNotFoundError:
            same = False
        if not same:
            os.close(self._fd)
            self._fd = None
            return self._open()
        return self._fd

    def record(self, event: str, **fields: Any) -> dict[str, Any] | None:
        """Append one event; returns what was written (None when disabled or on failure)."""
        if not self.enabled:
            return None
        entry: dict[str, Any] = {"ts": _now(), "event": event}
        for key, value in fields.items():
            if value is None or is_phi_key(key):
                continue
            entry[key] = sorted(value) if isinstance(value, (set, frozenset)) else value
        line = (json.dumps(entry, default=str, ensure_ascii=False, separators=(",", ":")) + "\n").encode("utf-8")
        try:
            with self._lock:
                fd = self._current_fd()
                view = memoryview(line)
                while view:
                    n = os.write(fd, view)
                    view = view[n:]
                if self.fsync:
                    os.fsync(fd)
        except OSError as exc:
            log.error("audit log %s: cannot record %s: %s", self.path, event, exc)
            from node.ops import metrics

            metrics.AUDIT_ERRORS.inc()
            return None
        return entry

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None


def tail(path: str | Path, n: int = 20, events: set[str] | None = None, max_bytes: int = 1 << 20) -> list[dict[str, Any]]:
    """The last ``n`` events (of the given kinds) from an audit file, oldest first.

    Reads at most the last ``max_bytes`` of the file: enough for ``modelnode status``.
    """
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            size = fh.seek(0, os.SEEK_END)
            fh.seek(max(0, size - max_bytes))
            data = fh.read()
    except FileNotFoundError:
        return []
    lines = data.split(b"\n")
    if len(data) >= max_bytes:
        lines = lines[1:]  # the first one is probably cut
    out: deque[dict[str, Any]] = deque(maxlen=n)
    for raw in lines:
        if not raw.strip():
            continue
        try:
            entry = json.loads(raw)
        except ValueError:
            continue
        if events is None or entry.get("event") in events:
            out.append(entry)
    return list(out)
