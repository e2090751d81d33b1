"""Logging for the node: text or JSON lines, correlation ids, and a guard against PHI.

:func:`configure_logging` replaces whatever handlers the root logger has with one handler on
stderr (systemd sends it to the journal). Every record gets a ``correlation_id``: the id of the
association or job whose work produced it, so ``journalctl -u modelnode | grep a42`` (or
``jq 'select(.correlation_id=="a42")'``) shows one association's story across modules.

Correlation ids
    A :mod:`contextvars` variable, set with :func:`correlation` (a context manager, for jobs and
    other scoped work) or :func:`set_correlation` (for a pynetdicom association: each association
    is its own thread, so setting it in the EVT_REQUESTED handler holds for every handler of that
    association). A thread with no id set falls back to the id of the association it serves
    (:func:`node.dimse.association.peek`), so pynetdicom's own threads carry it too.

PHI policy (docs/operations.md)
    Above DEBUG the node logs UIDs, AE titles, addresses, counts and statuses, never patient
    names, patient IDs, birth dates or other demographics. :class:`PhiFilter` enforces the part
    a filter can see: at INFO and above it redacts ``extra`` fields whose key names a PHI
    attribute, arguments that are pydicom person names or whole datasets, and dict arguments'
    PHI keys. It cannot read free text inside a message, which is why the policy is also a rule
    for the code.
"""

from __future__ import annotations

import contextvars
import json
import logging
import os
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any, TextIO

from node.dimse import association

REDACTED = "<redacted>"

# DICOM keywords (and snake_case spellings) whose values identify a patient. Compared after
# lower-casing and dropping underscores and dashes, so PatientName, patient_name and
# patient-name all match.
PHI_KEYS: frozenset[str] = frozenset(k.lower().replace("_", "") for k in (
    "PatientName", "PatientID", "PatientBirthDate", "PatientBirthTime", "PatientSex", "PatientAge",
    "PatientAddress", "PatientTelephoneNumbers", "PatientMotherBirthName", "OtherPatientIDs",
    "OtherPatientNames", "OtherPatientIDsSequence", "PatientBirthName", "IssuerOfPatientID",
    "MilitaryRank", "EthnicGroup", "PatientReligiousPreference", "MedicalRecordLocator",
    "AccessionNumber", "ReferringPhysicianName", "PerformingPhysicianName", "OperatorsName",
    "NameOfPhysiciansReadingStudy", "RequestingPhysician", "InstitutionName", "InstitutionAddress",
    "ResponsiblePerson", "PatientWeight", "PatientSize", "PatientComments",
))

# LogRecord attributes that are not ``extra`` fields.
_STANDARD_ATTRS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {
    "message", "asctime", "correlation_id", "taskName",
}

_correlation: contextvars.ContextVar[str | None] = contextvars.ContextVar("modelnode_correlation", default=None)


def is_phi_key(key: str) -> bool:
    return key.lower().replace("_", "").replace("-", "") in PHI_KEYS


# --------------------------------------------------------------------------- correlation ids


def set_correlation(cid: str | None) -> contextvars.Token[str | None]:
    """Set the current correlation id (for the rest of this thread/context); returns a reset token."""
    return _correlation.set(cid)


@contextmanager
def correlation(cid: str | None) -> Iterator[str | None]:
    """``with correlation(f"j{job.id}"):`` every record logged inside carries that id."""
    token = _correlation.set(cid)
    try:
        yield cid
    finally:
        _correlation.reset(token)


def current_correlation() -> str | None:
    cid = _correlation.get()
    if cid:
        return cid
    # pynetdicom: an Association is a thread; its DUL thread points back at it with ``assoc``.
    thread = threading.current_thread()
    state = association.peek(thread) or association.peek(getattr(thread, "assoc", None))
    return state.id if state is not None else None


class CorrelationFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if not getattr(record, "correlation_id", None):
            record.correlation_id = current_correlation()
        return True


# --------------------------------------------------------------------------- PHI guard


def _is_person_name(value: Any) -> bool:
    from pydicom.valuerep import PersonName

    return isinstance(value, PersonName)


def _is_dataset(value: Any) -> bool:
    from pydicom.dataset import Dataset

    return isinstance(value, Dataset)


def _redact_value(value: Any) -> Any:
    if _is_person_name(value):
        return REDACTED
    if _is_dataset(value):
        # A dataset's repr lists every element, demographics included; its class is enough.
        return f"<{type(value).__name__} redacted>"
    if isinstance(value, Mapping):
        return {k: (REDACTED if isinstance(k, str) and is_phi_key(k) else v) for k, v in value.items()}
    return value


class PhiFilter(logging.Filter):
    """At INFO and above, redact what a filter can recognise as PHI (see the module docstring)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno <= logging.DEBUG:
            return True
        for key in list(vars(record)):
            if key not in _STANDARD_ATTRS and is_phi_key(key):
                setattr(record, key, REDACTED)
        args = record.args
        if isinstance(args, tuple) and args:
            record.args = tuple(_redact_value(a) for a in args)
        elif isinstance(args, Mapping) and args:
            record.args = _redact_value(args)
        return True


# --------------------------------------------------------------------------- formatters


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in vars(record).items() if k not in _STANDARD_ATTRS and not k.startswith("_")}


def _iso(created: float) -> str:
    t = time.gmtime(created)
    return time.strftime("%Y-%m-%dT%H:%M:%S", t) + f".{int(created % 1 * 1000):03d}Z"


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, message, correlation_id, then the extras."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": _iso(record.created),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "correlation_id": getattr(record, "correlation_id", None),
        }
        for key, value in _extras(record).items():
            out.setdefault(key, value)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        return json.dumps(out, default=str, ensure_ascii=False)


# syslog priorities for systemd's SyslogLevelPrefix: journalctl -p warning then filters by level.
_SYSLOG_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}


class TextFormatter(logging.Formatter):
    """``time level logger [correlation]: message``; under journald, ``<prio>logger [id]: message``
    (the journal has its own timestamps and reads the priority prefix)."""

    def __init__(self, journal: bool = False) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s%(cid)s: %(message)s")
        self.journal = journal

    def format(self, record: logging.LogRecord) -> str:
        cid = getattr(record, "correlation_id", None)
        message = record.getMessage()
        # Many handlers already start their message with "[a12]": do not say it twice.
        record.cid = f" [{cid}]" if cid and not message.startswith(f"[{cid}]") else ""
        if self.journal:
            prio = _SYSLOG_PRIORITY.get(record.levelno, 6)
            line = f"<{prio}>{record.name}{record.cid}: {message}"
            if record.exc_info:
                line += "\n" + self.formatException(record.exc_info)
            return line
        return super().format(record)


# --------------------------------------------------------------------------- set-up


def configure_logging(section: Any = None, json: bool | None = None, *, level: int | str | None = None,
                      stream: TextIO | None = None) -> logging.Handler:
    """Install the node's handler on the root logger; returns it.

    ``section`` is ``cfg.logging`` (level, format); ``json`` overrides the format when not None
    (``--log-json``); ``level`` overrides the level (``-v`` / ``-q``). Safe to call again: the
    previous handlers are replaced, not added to.
    """
    fmt = getattr(section, "format", "text")
    use_json = (fmt == "json") if json is None else json
    if level is None:
        level = str(getattr(section, "level", "INFO")).upper()
    if isinstance(level, str):
        level = logging.getLevelName(level.upper())
        if not isinstance(level, int):
            level = logging.INFO
    handler = logging.StreamHandler(stream or sys.stderr)
    journal = stream is None and bool(os.environ.get("JOURNAL_STREAM"))
    handler.setFormatter(JsonFormatter() if use_json else TextFormatter(journal=journal))
    # On the handler, not on loggers: a logger's filters do not see records propagated from
    # its children, a handler's see them all.
    handler.addFilter(CorrelationFilter())
    handler.addFilter(PhiFilter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    logging.captureWarnings(True)
    return handler
