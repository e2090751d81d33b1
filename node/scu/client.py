"""The node as a DICOM client: C-ECHO, C-STORE, C-FIND, C-MOVE and C-GET towards one peer.

Used by the ``modelnode echo/store/find/fetch`` commands and by the node itself (C-MOVE and
C-GET sub-operations go through :func:`node.scu.send.send_file`, the outbox exporter through
:func:`store`).

DICOM TLS: ``Options.tls`` (pynetdicom's ``tls_args``, an SSL context and the server name to
verify; node.security.tls builds them) makes every association of an operation a TLS one. A failed
handshake (certificate not trusted, wrong host name, the peer refusing our client certificate or
wanting one, no TLS on that port) is a permanent :class:`PeerError` that says it was TLS and why:
pynetdicom 3.0.4 only logs the SSL error and reports an aborted association, so
:func:`associate` keeps the exception itself (see :class:`node.scu.tls_diagnosis.TlsWatch`).

Retries: every operation runs under a :class:`RetryPolicy`. A *transient* failure (no TCP
connection, association rejected with result "rejected-transient", association aborted or the
connection lost mid-operation, no answer within the DIMSE timeout) is retried with exponential
backoff; a *definite* answer (a failure status, a permanent rejection) is never retried.

Files go out byte-exact when the peer accepted their transfer syntax, converted otherwise (see
node.scu.send). A C-MOVE with ``receive_port`` and a C-GET write what comes back through
node.scu.receiver.
"""

from __future__ import annotations

import logging
import random
import re
import ssl
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.presentation import (
    PresentationContext,
    StoragePresentationContexts,
    build_context,
    build_role,
)
from pynetdicom.sop_class import (
    PatientRootQueryRetrieveInformationModelFind,
    PatientRootQueryRetrieveInformationModelGet,
    PatientRootQueryRetrieveInformationModelMove,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
    Verification,
)

from iods.uids import RAW_DATA_STORAGE
from node.dimse.levels import UNIQUE_KEYS
from node.dimse.status import SUCCESS as STATUS_SUCCESS
from node.dimse.status import category as status_category
from node.dimse.syntaxes import STORAGE as STORAGE_SYNTAXES
from node.dimse.syntaxes import UNCOMPRESSED
from node.scu.receiver import Receiver, start_receiver, stop_receiver
from node.scu.send import (
    MAX_CONTEXTS,
    FileInfo,
    SendRefused,
    file_info,
    send_file,
    storage_contexts,
)
from node.scu.tls_diagnosis import TlsWatch, tls_failure

log = logging.getLogger("modelnode.scu")


T = TypeVar("T")


# --------------------------------------------------------------------------- addresses and errors


@dataclass(frozen=True)
class Address:
    """A DICOM peer: AE title, host and port, written ``AE@HOST:PORT`` (IPv6: ``AE@[::1]:104``)."""

    ae_title: str
    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> Address:
        m = re.fullmatch(r"(?P<ae>[^@]{1,16})@(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<host>[^:@\[\]]+)):(?P<port>\d{1,5})", text.strip())
        if not m:
            raise ValueError(f"{text!r} is not AE@HOST:PORT (e.g. ORTHANC@127.0.0.1:4242)")
        ae = m.group("ae").strip()
        if not ae or "\\" in ae or any(ord(c) < 0x20 for c in ae):
            raise ValueError(f"{ae!r} is not a valid AE title (1-16 characters, no backslash)")
        port = int(m.group("port"))
        if not 0 < port < 65536:
            raise ValueError(f"{port} is not a TCP port")
        return cls(ae, m.group("v6") or m.group("host"), port)

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.ae_title}@{host}:{self.port}"


class PeerError(Exception):
    """The peer could not be reached or refused; ``transient`` says whether a retry may help."""

    def __init__(self, message: str, *, transient: bool, status: int | None = None) -> None:
        super().__init__(message)
        self.transient = transient
        self.status = status


class AssociationRejected(PeerError):
    """The peer answered the association request with A-ASSOCIATE-RJ (it is up, and said no)."""


@dataclass(frozen=True)
class RetryPolicy:
    """``attempts`` tries in all, waiting ``base_delay * 2**n`` (at most ``max_delay``) between."""

    attempts: int = 4
    base_delay: float = 0.5
    max_delay: float = 8.0

    def delay(self, attempt: int) -> float:
        # A little jitter keeps several clients from retrying in lock step.
        return min(self.max_delay, self.base_delay * (2**attempt)) * (1 + random.uniform(0, 0.1))  # noqa: S311


NO_RETRY = RetryPolicy(attempts=1)


@dataclass
class Options:
    """How this side presents itself and how long it waits."""

    calling_ae: str = "MODELNODE"
    acse_timeout: float = 30.0
    dimse_timeout: float = 60.0
    network_timeout: float = 60.0
    connect_timeout: float = 10.0
    max_pdu: int = 262144
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    # DICOM TLS: (client context, server name to verify; None: the peer's host), as node.security.tls's
    # tls_args() or client_context_from() give. None: a plain TCP connection.
    tls: tuple[ssl.SSLContext, str | None] | None = None


def with_retries(operation: Callable[[], T], policy: RetryPolicy, what: str) -> T:
    """Run ``operation``; retry it on transient :class:`PeerError` with backoff."""
    for attempt in range(max(1, policy.attempts)):
        try:
            return operation()
        except PeerError as exc:
            if not exc.transient or attempt + 1 >= policy.attempts:
                raise
            delay = policy.delay(attempt)
            log.warning("%s: %s; retrying in %.1f s (attempt %d of %d)", what, exc, delay, attempt + 2, policy.attempts)
            time.sleep(delay)
    raise AssertionError("unreachable")


def _ae(options: Options) -> AE:
    ae = AE(ae_title=options.calling_ae)
    ae.acse_timeout = options.acse_timeout
    ae.dimse_timeout = options.dimse_timeout
    ae.network_timeout = options.network_timeout
    ae.connection_timeout = options.connect_timeout
    ae.maximum_pdu_size = options.max_pdu
    return ae


_REJECT_REASONS = {
    (1, 1): "no reason given",
    (1, 2): "application context name not supported",
    (1, 3): "calling AE title not recognised",
    (1, 7): "called AE title not recognised",
    (2, 1): "no reason given",
    (2, 2): "protocol version not supported",
    (3, 1): "temporary congestion",
    (3, 2): "local limit exceeded",
}


def associate(
    ae: AE,
    peer: Address,
    *,
    contexts: list[PresentationContext] | None = None,
    ext_neg: list[Any] | None = None,
    evt_handlers: list[Any] | None = None,
    tls: tuple[ssl.SSLContext, str | None] | None = None,
) -> Association:
    """Open an association or raise :class:`PeerError` saying why and whether to retry.

    ``tls``: (SSL context, server name; None for the peer's host) for DICOM TLS.
    """
    watch: TlsWatch | None = None
    tls_args: tuple[TlsWatch, str] | None = None
    if tls is not None:
        watch = TlsWatch(tls[0])
        tls_args = (watch, tls[1] or peer.host)
    # pynetdicom reports a refused TCP connection as an aborted association; EVT_CONN_OPEN (after
    # the TLS handshake, with TLS) tells the two apart.
    connected: list[bool] = []
    handlers = [*(evt_handlers or []), (evt.EVT_CONN_OPEN, lambda event: connected.append(True))]
    try:
        assoc = ae.associate(peer.host, peer.port, contexts=contexts, ae_title=peer.ae_title, ext_neg=ext_neg,
                             evt_handlers=handlers, tls_args=tls_args)  # type: ignore[arg-type]
    except OSError as exc:
        raise PeerError(f"cannot connect to {peer}: {exc}", transient=True) from exc
    if watch is not None:
        watch.detach()
    if assoc.is_established:
        return assoc
    if watch is not None and watch.error is not None:
        failure = tls_failure(str(peer), watch.error, watch.handshake_done)
        raise PeerError(failure.message, transient=failure.transient) from watch.error
    if assoc.is_rejected:
        prim = assoc.acceptor.primitive
        result = getattr(prim, "result", None)
        source = getattr(prim, "result_source", None)
        reason = getattr(prim, "diagnostic", None)
        text = _REJECT_REASONS.get((source or 0, reason or 0), f"source {source}, reason {reason}")
        transient = result == 0x02
        kind = "transient" if transient else "permanent"
        raise AssociationRejected(f"{peer} rejected the association ({kind}: {text})", transient=transient)
    if not connected:
        raise PeerError(f"cannot connect to {peer} (connection refused or timed out)", transient=True)
    if assoc.is_aborted:
        # A TLS-only port closes a plain connection without a DICOM answer: say so.
        hint = "" if tls is not None else " (if the peer expects DICOM TLS on this port, connect with TLS)"
        raise PeerError(f"{peer} aborted the association request{hint}", transient=True)
    raise PeerError(f"no association with {peer} (no answer to the association request)", transient=True)


@contextmanager
def _open(ae: AE, peer: Address, options: Options, **kw: Any) -> Iterator[Association]:
    assoc = associate(ae, peer, tls=options.tls, **kw)
    try:
        yield assoc
    finally:
        if assoc.is_established:
            assoc.release()


def _status_of(status: Dataset | None, peer: Address, what: str) -> int:
    """The Status of a response; a missing one means the association was lost (transient)."""
    if status is None or "Status" not in status:
        raise PeerError(f"{what}: no response from {peer} (association aborted or timed out)", transient=True)
    return int(status.Status)


# --------------------------------------------------------------------------- C-ECHO


def echo(peer: Address, options: Options | None = None) -> int:
    """C-ECHO ``peer``; returns the status (0x0000) or raises :class:`PeerError`."""
    options = options or Options()
    ae = _ae(options)
    ae.add_requested_context(Verification)

    def attempt() -> int:
        with _open(ae, peer, options) as assoc:
            status = _status_of(assoc.send_c_echo(), peer, "C-ECHO")
        if status != STATUS_SUCCESS:
            raise PeerError(f"C-ECHO: {peer} answered 0x{status:04X}", transient=False, status=status)
        return status

    return with_retries(attempt, options.retry, f"C-ECHO {peer}")


# --------------------------------------------------------------------------- C-STORE


@dataclass
class StoreResult:
    path: Path
    sop_instance: str = ""
    status: int | None = None  # None: not sent (see error)
    error: str = ""

    @property
    def ok(self) -> bool:
        return self.status is not None and status_category(self.status) in ("success", "warning")


def _is_model_file(info: FileInfo) -> bool:
    return info.sop_class == RAW_DATA_STORAGE


def store(
    files: Sequence[str | Path],
    peer: Address,
    options: Options | None = None,
    progress: Callable[[StoreResult], None] | None = None,
) -> list[StoreResult]:
    """C-STORE ``files`` to ``peer``; one :class:`StoreResult` per file, in order.

    Files are sent as they are when the peer accepts their transfer syntax (see
    :func:`node.scu.send.send_file`). A transient failure retries the files not yet answered; a
    failure status for one file is its result and is not retried.
    """
    options = options or Options()
    results = [StoreResult(Path(f)) for f in files]
    infos: list[FileInfo | None] = []
    for r in results:
        try:
            info = file_info(r.path)
            r.sop_instance = str(info.sop_instance)
            infos.append(info)
        except ValueError as exc:
            r.error = str(exc)
            infos.append(None)
            if progress:
                progress(r)
    pending = [i for i, info in enumerate(infos) if info is not None]
    # Each association can carry 128 contexts: group files so that each batch fits.
    for batch in _batches(pending, infos):
        todo = list(batch)

        def attempt(todo: list[int] = todo) -> None:
            items = [(infos[i].sop_class, infos[i].transfer_syntax, _is_model_file(infos[i])) for i in todo]  # type: ignore[union-attr]
            ae = _ae(options)
            with _open(ae, peer, options, contexts=storage_contexts(items)) as assoc:
                while todo:
                    i = todo[0]
                    info = infos[i]
                    assert info is not None
                    r = results[i]
                    try:
                        rsp = send_file(assoc, info, model=_is_model_file(info))
                    except SendRefused as exc:
                        r.error = str(exc)
                        todo.pop(0)
                        if progress:
                            progress(r)
                        continue
                    r.status = _status_of(rsp, peer, f"C-STORE {info.path.name}")
                    if status_category(r.status) == "failure":
                        r.error = f"{peer} answered 0x{r.status:04X}" + (f": {rsp.ErrorComment}" if "ErrorComment" in rsp else "")
                    todo.pop(0)
                    if progress:
                        progress(r)

        with_retries(attempt, options.retry, f"C-STORE to {peer}")
    return results


def _batches(indices: list[int], infos: list[FileInfo | None]) -> Iterator[list[int]]:
    batch: list[int] = []
    pairs: set[tuple[str, str]] = set()
    for i in indices:
        info = infos[i]
        assert info is not None
        pair = (info.sop_class, info.transfer_syntax)
        # Up to two contexts per pair (exact + fallback): stay under the limit with room to spare.
        if pair not in pairs and 2 * (len(pairs) + 1) > MAX_CONTEXTS and batch:
            yield batch
            batch, pairs = [], set()
        pairs.add(pair)
        batch.append(i)
    if batch:
        yield batch


# --------------------------------------------------------------------------- C-FIND


FIND_MODELS = {"patient": PatientRootQueryRetrieveInformationModelFind, "study": StudyRootQueryRetrieveInformationModelFind}
MOVE_MODELS = {"patient": PatientRootQueryRetrieveInformationModelMove, "study": StudyRootQueryRetrieveInformationModelMove}
GET_MODELS = {"patient": PatientRootQueryRetrieveInformationModelGet, "study": StudyRootQueryRetrieveInformationModelGet}


class QueryFailed(PeerError):
    """The peer answered a C-FIND / C-MOVE / C-GET with a failure status."""


def find(
    peer: Address,
    identifier: Dataset,
    *,
    level: str | None = None,
    model: str = "study",
    options: Options | None = None,
) -> list[Dataset]:
    """C-FIND ``identifier`` (its QueryRetrieveLevel, or ``level``) and return the matches."""
    options = options or Options()
    ident = Dataset()
    ident.update(identifier)
    if level:
        ident.QueryRetrieveLevel = level.upper()
    if "QueryRetrieveLevel" not in ident:
        raise ValueError("a query needs a QueryRetrieveLevel (PATIENT, STUDY, SERIES or IMAGE)")
    sop_class = FIND_MODELS[model]

    def attempt() -> list[Dataset]:
        ae = _ae(options)
        ae.add_requested_context(sop_class, list(UNCOMPRESSED))
        matches: list[Dataset] = []
        with _open(ae, peer, options) as assoc:
            for status, found in assoc.send_c_find(ident, sop_class):
                code = _status_of(status, peer, "C-FIND")
                category = status_category(code)
                if category == "pending":
                    if found is not None:
                        matches.append(found)
                    continue
                if category in ("success", "cancel"):
                    return matches
                comment = f": {status.ErrorComment}" if "ErrorComment" in status else ""
                raise QueryFailed(f"C-FIND: {peer} answered 0x{code:04X}{comment}", transient=False, status=code)
        raise PeerError(f"C-FIND: {peer} sent no final response", transient=True)

    return with_retries(attempt, options.retry, f"C-FIND {peer}")


# --------------------------------------------------------------------------- C-MOVE / C-GET


@dataclass
class FetchResult:
    status: int
    completed: int = 0
    failed: int = 0
    warning: int = 0
    failed_uids: list[str] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.status == STATUS_SUCCESS


def _values(value: Any) -> list[str]:
    """A possibly multi-valued element value as a list of strings."""
    if value is None or value == "":
        return []
    if isinstance(value, str):
        return [value]
    return [str(v) for v in value]


def _retrieve_status(status: Dataset, peer: Address, what: str) -> tuple[int, str]:
    code = _status_of(status, peer, what)
    return code, status_category(code)


def _finish(code: int, status: Dataset, identifier: Dataset | None, peer: Address, what: str) -> FetchResult:
    result = FetchResult(
        code,
        completed=int(status.get("NumberOfCompletedSuboperations", 0) or 0),
        failed=int(status.get("NumberOfFailedSuboperations", 0) or 0),
        warning=int(status.get("NumberOfWarningSuboperations", 0) or 0),
    )
    if identifier is not None and "FailedSOPInstanceUIDList" in identifier:
        result.failed_uids = [v for v in _values(identifier.FailedSOPInstanceUIDList) if v]
    category = status_category(code)
    if category == "failure":
        comment = f": {status.ErrorComment}" if "ErrorComment" in status else ""
        raise QueryFailed(f"{what}: {peer} answered 0x{code:04X}{comment} ({result.completed} completed, "
                          f"{result.failed} failed)", transient=False, status=code)
    return result


def _locate(peer: Address, uid: str, model: str, options: Options) -> tuple[str, Dataset]:
    """Find what ``uid`` names on the peer (instance, series or study) and its parents' UIDs."""
    for level in ("IMAGE", "SERIES", "STUDY"):
        key = UNIQUE_KEYS[level]
        q = Dataset()
        setattr(q, key, uid)
        q.StudyInstanceUID = uid if key == "StudyInstanceUID" else ""
        if level in ("IMAGE", "SERIES"):
            q.SeriesInstanceUID = uid if key == "SeriesInstanceUID" else ""
        if level == "IMAGE":
            q.SOPClassUID = ""
        if model == "patient":
            q.PatientID = ""
        if level == "STUDY":
            q.SOPClassesInStudy = ""
        try:
            found = find(peer, q, level=level, model=model, options=options)
        except QueryFailed:
            continue  # a peer that does not support this level or key: try the next
        if found:
            return level, found[0]
    raise LookupError(f"{peer} has no instance, series or study with UID {uid}")


# The unique keys an identifier names above each level (hierarchical retrieve, PS3.4 C.4.2.2.1).
_PARENT_KEYS = {"PATIENT": [], "STUDY": [], "SERIES": ["StudyInstanceUID"],
                "IMAGE": ["StudyInstanceUID", "SeriesInstanceUID"]}


def retrieve_identifier(level: str, uid: str, found: Dataset | None, model: str) -> Dataset:
    """The identifier for a C-MOVE / C-GET of ``uid`` at ``level``, with the parents' unique keys
    taken from ``found`` (a C-FIND answer for it) when there is one."""
    ident = Dataset()
    ident.QueryRetrieveLevel = level
    setattr(ident, UNIQUE_KEYS[level], uid)
    parents = list(_PARENT_KEYS[level])
    if model == "patient" and level != "PATIENT":
        parents.insert(0, "PatientID")
    for key in parents:
        value = found.get(key) if found is not None else None
        if value:
            setattr(ident, key, value)
    return ident


def get_contexts(sop_classes: Iterable[str], model: str) -> tuple[list[PresentationContext], list[Any]]:
    """Contexts for a C-GET: the GET model and each storage class in each receivable syntax, as SCP."""
    contexts = [build_context(GET_MODELS[model], list(UNCOMPRESSED))]
    classes = list(dict.fromkeys(str(s) for s in sop_classes if s))
    if not classes:
        classes = [str(RAW_DATA_STORAGE)] + [str(cx.abstract_syntax) for cx in StoragePresentationContexts]
    roles = []
    budget = MAX_CONTEXTS - 1
    per_class = max(1, min(len(STORAGE_SYNTAXES), budget // max(1, len(classes))))
    for sop in classes:
        if budget <= 0:
            break
        if sop == RAW_DATA_STORAGE:
            syntaxes = [[ExplicitVRLittleEndian]]
        elif per_class >= 2:
            # The uncompressed pair first, then one context per compressed syntax the budget allows.
            syntaxes = [list(UNCOMPRESSED)] + [[t] for t in STORAGE_SYNTAXES[2:2 + per_class - 1]]
        else:
            syntaxes = [list(UNCOMPRESSED)]
        for ts in syntaxes:
            if budget <= 0:
                break
            contexts.append(build_context(sop, ts))
            budget -= 1
        roles.append(build_role(sop, scp_role=True))
    return contexts, roles


def fetch(
    peer: Address,
    uid: str | None = None,
    *,
    identifier: Dataset | None = None,
    level: str = "auto",
    model: str = "study",
    move_to: str | None = None,
    get: bool = False,
    out_dir: str | Path | None = None,
    receive_port: int | None = None,
    receive_bind: str = "0.0.0.0",
    receive_tls: ssl.SSLContext | None = None,
    options: Options | None = None,
) -> FetchResult:
    """Retrieve ``uid`` (or ``identifier``) from ``peer`` by C-MOVE to ``move_to`` or by C-GET.

    ``level="auto"`` asks the peer first what the UID names (instance, then series, then study)
    and fills in the parents' UIDs. C-GET writes into ``out_dir``; a C-MOVE writes there only when
    ``receive_port`` starts a storage SCP for the move (``move_to`` must then be an AE title the
    peer knows at that port); with ``receive_tls`` (a server context, node.security.tls) it speaks TLS.
    ``options.tls`` covers every association this opens: the C-FINDs of ``level="auto"``, the
    C-MOVE request and the C-GET (whose sub-operations come back on the same association).
    """
    options = options or Options()
    if get == bool(move_to):
        raise ValueError("choose one of move_to (C-MOVE) or get (C-GET)")
    sop_classes: list[str] = []
    if identifier is None:
        if not uid:
            raise ValueError("a UID or an identifier is needed")
        found = None
        if level == "auto":
            level, found = _locate(peer, uid, model, options)
        identifier = retrieve_identifier(level.upper(), uid, found, model)
        if get:
            sop_classes = _sop_classes(peer, level.upper(), identifier, found, model, options)
    out = Path(out_dir) if out_dir else Path.cwd()
    if get or receive_port:
        out.mkdir(parents=True, exist_ok=True)
    receiver = Receiver(out)
    if get:
        return with_retries(lambda: _get_once(peer, identifier, model, sop_classes, receiver, options),
                            options.retry, f"C-GET from {peer}")
    assert move_to is not None
    server = None
    if receive_port:
        server = start_receiver(move_to, (receive_bind, receive_port), receiver, options, receive_tls)
    try:
        result = with_retries(lambda: _move_once(peer, identifier, model, move_to, options), options.retry,
                              f"C-MOVE from {peer}")
    finally:
        if server is not None:
            stop_receiver(server)
    result.files = list(receiver.files)
    return result


def _sop_classes(peer: Address, level: str, identifier: Dataset, found: Dataset | None, model: str,
                 options: Options) -> list[str]:
    """The storage SOP classes a C-GET will bring, so that the request proposes just those.

    Unknown (an empty list) when the peer does not say; :func:`get_contexts` then proposes the
    common storage classes in uncompressed syntaxes.
    """
    if found is not None and "SOPClassUID" in found and found.SOPClassUID:
        return [str(found.SOPClassUID)]
    if found is not None and "SOPClassesInStudy" in found:
        return _values(found.SOPClassesInStudy)
    if level == "SERIES":
        q = Dataset()
        q.StudyInstanceUID = identifier.get("StudyInstanceUID", "")
        q.SeriesInstanceUID = identifier.SeriesInstanceUID
        q.SOPInstanceUID = ""
        q.SOPClassUID = ""
        try:
            return sorted({str(d.SOPClassUID) for d in find(peer, q, level="IMAGE", model=model, options=options)
                           if d.get("SOPClassUID")})
        except QueryFailed:
            return []
    return []


def _get_once(peer: Address, identifier: Dataset, model: str, sop_classes: list[str], receiver: Receiver,
              options: Options) -> FetchResult:
    ae = _ae(options)
    contexts, roles = get_contexts(sop_classes, model)
    handlers = [(evt.EVT_C_STORE, receiver.handle_store)]
    before = len(receiver.files)
    with _open(ae, peer, options, contexts=contexts, ext_neg=roles, evt_handlers=handlers) as assoc:
        last: tuple[Dataset, Dataset | None] | None = None
        for status, ident in assoc.send_c_get(identifier, GET_MODELS[model]):
            code, category = _retrieve_status(status, peer, "C-GET")
            if category == "pending":
                continue
            last = (status, ident)
            break
        if last is None:
            raise PeerError(f"C-GET: {peer} sent no final response", transient=True)
    result = _finish(int(last[0].Status), last[0], last[1], peer, "C-GET")
    result.files = receiver.files[before:]
    return result


def _move_once(peer: Address, identifier: Dataset, model: str, move_to: str, options: Options) -> FetchResult:
    ae = _ae(options)
    ae.add_requested_context(MOVE_MODELS[model], list(UNCOMPRESSED))
    with _open(ae, peer, options) as assoc:
        for status, ident in assoc.send_c_move(identifier, move_to, MOVE_MODELS[model]):
            code, category = _retrieve_status(status, peer, "C-MOVE")
            if category == "pending":
                continue
            return _finish(code, status, ident, peer, "C-MOVE")
    raise PeerError(f"C-MOVE: {peer} sent no final response", transient=True)
