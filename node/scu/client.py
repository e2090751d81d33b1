"""The node as a DICOM client: C-ECHO, C-STORE, C-FIND, C-MOVE and C-GET towards one peer.

Used by the ``modelnode echo/store/find/fetch`` commands and by the node itself (C-MOVE and
C-GET sub-operations go through :func:`send_file`, the outbox exporter through :func:`store`).

DICOM TLS: ``Options.tls`` (pynetdicom's ``tls_args``, an SSL context and the server name to
verify; node.security.tls builds them) makes every association of an operation a TLS one. A failed
handshake (certificate not trusted, wrong host name, the peer refusing our client certificate or
wanting one, no TLS on that port) is a permanent :class:`PeerError` that says it was TLS and why:
pynetdicom 3.0.4 only logs the SSL error and reports an aborted association, so
:func:`associate` keeps the exception itself (see :class:`_TlsWatch`).

Retries: every operation runs under a :class:`RetryPolicy`. A *transient* failure (no TCP
connection, association rejected with result "rejected-transient", association aborted or the
connection lost mid-operation, no answer within the DIMSE timeout) is retried with exponential
backoff; a *definite* answer (a failure status, a permanent rejection) is never retried.

Byte-exact sending: pynetdicom's ``send_c_store`` re-encodes a ``Dataset`` it is given. pydicom
writes back what it read for most files, but not all: it drops group-length elements, turns
``UN`` into known VRs and so on, so a store-then-retrieve round trip would not always be
byte-for-byte. With ``_config.STORE_SEND_CHUNKED_DATASET`` set, ``send_c_store`` given a *path*
streams the file's dataset bytes as they are (after the File Meta), which needs a presentation
context accepted in exactly the file's transfer syntax. :func:`send_file` does that when the
peer accepted the stored syntax and otherwise converts (decompressing where pydicom can) into a
temporary file in a syntax the peer accepted; model objects only ever go out in Explicit VR
Little Endian.
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
import re
import shutil
import ssl
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import (
    UID,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.dsutils import encode_file_meta, split_dataset
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

from iods.uids import RAW_DATA_STORAGE, valid_uid
from node.dimse import syntaxes
from node.dimse.compat import client
from node.dimse.levels import UNIQUE_KEYS
from node.dimse.status import SUCCESS as STATUS_SUCCESS
from node.dimse.status import category as status_category

log = logging.getLogger("modelnode.scu")


UNCOMPRESSED = syntaxes.UNCOMPRESSED
# What a C-GET requestor or a C-MOVE receiver accepts, one presentation context each, so the
# sender can keep a compressed file compressed.
RECEIVE_TRANSFER_SYNTAXES = syntaxes.STORAGE
MAX_CONTEXTS = 128  # PS3.8: presentation context IDs are odd numbers 1-255

# How long the associations of the C-MOVE receiver (fetch's receive_port) get to end by themselves
# once the C-MOVE is over, before they are cut (node.dimse.compat.client.stop_server). A peer releases its
# sub-association before it sends the final C-MOVE response, so this is only spent on one that is
# stuck (in a TLS handshake, or waiting for an A-ASSOCIATE-RQ that never comes).
RECEIVER_CLOSE_GRACE = 2.0

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


class SendRefused(ValueError):
    """One C-STORE cannot be made on this association (no usable presentation context, or a
    conversion the node cannot do). pynetdicom counts it as a failed sub-operation."""


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


class _TlsWatch:
    """Stands in for the SSL context in pynetdicom's ``tls_args`` for one association request and
    keeps the first error of the TLS layer.

    pynetdicom 3.0.4 catches a failed handshake in ``AssociationSocket.connect`` (and, with TLS
    1.3, a client certificate the server refuses or misses arrives as an alert on the first read,
    caught in the DUL reader): it logs, and the caller sees only an aborted association, which
    reads as transient. The socket's own ``do_handshake``, ``recv`` and ``send`` are shadowed on
    that one instance until the association is up (:meth:`detach`), so nothing is monkeypatched
    globally and any ``ssl.SSLContext`` works.
    """

    def __init__(self, context: ssl.SSLContext) -> None:
        self.context = context
        self.error: OSError | None = None
        self.handshake_done = False  # our side finished (with TLS 1.3 the server may still refuse)
        self._sock: ssl.SSLSocket | None = None

    def wrap_socket(self, sock: Any, server_side: bool = False, server_hostname: str | None = None,
                    **kwargs: Any) -> ssl.SSLSocket:
        ssl_sock = self.context.wrap_socket(sock, server_side=server_side, server_hostname=server_hostname, **kwargs)
        for name in ("do_handshake", "recv", "send"):
            setattr(ssl_sock, name, self._watched(getattr(ssl_sock, name), name == "do_handshake"))
        self._sock = ssl_sock
        return ssl_sock

    def _watched(self, method: Callable[..., T], handshake: bool) -> Callable[..., T]:
        def call(*args: Any, **kwargs: Any) -> T:
            try:
                result = method(*args, **kwargs)
            except OSError as exc:
                # The first TLS-layer error wins over a plain socket error it caused (a broken
                # pipe on the next send after the peer's alert).
                if self.error is None or (isinstance(exc, ssl.SSLError) and not isinstance(self.error, ssl.SSLError)):
                    self.error = exc
                raise
            if handshake:
                self.handshake_done = True
            return result
        return call

    def detach(self) -> None:
        """Back to the socket's own methods (the association is established)."""
        if self._sock is not None:
            for name in ("do_handshake", "recv", "send"):
                self._sock.__dict__.pop(name, None)
            self._sock = None


# What OpenSSL's reason codes mean for someone setting up a peer (the text that follows "why").
_TLS_HINTS = {
    "TLSV13_ALERT_CERTIFICATE_REQUIRED": "the peer requires a client certificate and none was presented",
    "SSLV3_ALERT_HANDSHAKE_FAILURE": "the peer refused the handshake (it may require a client certificate, or "
                                     "share no BCP 195 cipher suite)",
    "TLSV1_ALERT_UNKNOWN_CA": "the peer does not trust the CA of our client certificate",
    "SSLV3_ALERT_BAD_CERTIFICATE": "the peer refused our client certificate",
    "SSLV3_ALERT_CERTIFICATE_UNKNOWN": "the peer refused our client certificate",
    "TLSV1_ALERT_PROTOCOL_VERSION": "no common TLS version (TLS 1.2 or later is required)",
    "UNSUPPORTED_PROTOCOL": "no common TLS version (TLS 1.2 or later is required)",
    "NO_CIPHERS_AVAILABLE": "no common cipher suite (BCP 195 suites only)",
    "WRONG_VERSION_NUMBER": "the peer does not speak TLS on this port",
    "RECORD_LAYER_FAILURE": "the peer does not speak TLS on this port",
    "PACKET_LENGTH_TOO_LONG": "the peer does not speak TLS on this port",
}


# OpenSSL's X509_V_ERR codes: no chain to a CA in use (2, 18, 19, 20, 21), the wrong name (62, 64).
_UNTRUSTED = "the peer's certificate does not chain to the CA certificates in use"
_VERIFY_HINTS = {2: _UNTRUSTED, 18: _UNTRUSTED, 19: _UNTRUSTED, 20: _UNTRUSTED, 21: _UNTRUSTED,
                 62: "it must name the host called", 64: "it must name the host called"}


def _tls_failure(peer: Address, exc: OSError, handshake_done: bool) -> PeerError:
    """The PeerError for a TLS-layer failure: what OpenSSL said and, where known, what it means.

    "Handshake" covers the TLS 1.3 case too where our side had finished (``handshake_done``) and
    the server's verdict on our certificate came as an alert on the first read, or as a close
    or reset that overtook the alert.
    """
    stage = "TLS handshake"
    if handshake_done and isinstance(exc, (ssl.SSLEOFError, ssl.SSLZeroReturnError, ConnectionError)):
        # Closed between the TLS handshake and any DICOM answer: a TLS 1.3 server refusing our
        # client certificate (or missing one) does this; not worth retrying.
        return PeerError(f"{stage} with {peer} failed: the peer closed the connection after the handshake (does "
                         "it require a client certificate, or not trust ours?)", transient=False)
    if isinstance(exc, ssl.SSLCertVerificationError):
        # e.g. "certificate verify failed: self-signed certificate in certificate chain"
        why = f"certificate verify failed: {exc.verify_message or exc.reason}"
        hint = _VERIFY_HINTS.get(exc.verify_code or 0)
        return PeerError(f"{stage} with {peer} failed: {why}" + (f" ({hint})" if hint else ""), transient=False)
    if isinstance(exc, (ssl.SSLEOFError, ssl.SSLZeroReturnError)) or (
            isinstance(exc, ssl.SSLError) and exc.reason == "UNEXPECTED_EOF_WHILE_READING"):
        return PeerError(f"{stage} with {peer} failed: the peer closed the connection (does it speak TLS on this "
                         "port? does it require a client certificate?)", transient=False)
    if isinstance(exc, ssl.SSLError):
        text = re.sub(r"^\[SSL(?:: [A-Z0-9_]+)?\] |\s*\(_ssl\.c:\d+\)$", "", exc.strerror or str(exc)) or str(exc)
        hint = _TLS_HINTS.get(exc.reason or "")
        return PeerError(f"{stage} with {peer} failed: {text}" + (f" ({hint})" if hint else ""), transient=False)
    # A reset or a timeout mid-handshake: the network or a busy peer, worth another try (though
    # a plain DICOM port resets a TLS hello too).
    if isinstance(exc, ConnectionError):
        return PeerError(f"{stage} with {peer} failed: {exc.strerror or exc} (does the peer speak TLS on this "
                         "port?)", transient=True)
    return PeerError(f"{stage} with {peer} failed: {exc.strerror or str(exc) or type(exc).__name__}", transient=True)


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
    watch: _TlsWatch | None = None
    tls_args: tuple[_TlsWatch, str] | None = None
    if tls is not None:
        watch = _TlsWatch(tls[0])
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
        raise _tls_failure(peer, watch.error, watch.handshake_done) from watch.error
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


# --------------------------------------------------------------------------- sending files


@dataclass(frozen=True)
class FileInfo:
    path: Path
    sop_class: UID
    sop_instance: UID
    transfer_syntax: UID
    has_meta: bool


def file_info(path: str | Path) -> FileInfo:
    """SOP class, instance and transfer syntax of a DICOM file, from its File Meta when it has one."""
    path = Path(path)
    try:
        meta, _ = split_dataset(path)
    except (InvalidDicomError, OSError, EOFError, ValueError, AttributeError) as exc:
        raise ValueError(f"{path}: not a DICOM file: {exc}") from exc
    if all(k in meta for k in ("MediaStorageSOPClassUID", "MediaStorageSOPInstanceUID", "TransferSyntaxUID")):
        return FileInfo(path, UID(meta.MediaStorageSOPClassUID), UID(meta.MediaStorageSOPInstanceUID),
                        UID(meta.TransferSyntaxUID), True)
    # No File Meta (or an incomplete one): read the dataset itself to learn what it is.
    try:
        ds = pydicom.dcmread(path, force=True, stop_before_pixels=True)
        sop_class, sop_uid = UID(ds.SOPClassUID), UID(ds.SOPInstanceUID)
    except Exception as exc:  # noqa: BLE001 (pydicom raises many types for garbage)
        raise ValueError(f"{path}: not a DICOM file: {exc}") from exc
    implicit, little = ds.original_encoding
    ts = ImplicitVRLittleEndian if implicit else (ExplicitVRLittleEndian if little else ExplicitVRBigEndian)
    return FileInfo(path, sop_class, sop_uid, ts, False)


def outgoing_syntax(accepted: Iterable[str], stored: str, *, model: bool) -> UID | None:
    """The transfer syntax to send a file in, given what the peer accepted for its SOP class."""
    accepted = {UID(t) for t in accepted}
    if model:
        return ExplicitVRLittleEndian if ExplicitVRLittleEndian in accepted else None
    if stored in accepted:
        return UID(stored)
    for ts in UNCOMPRESSED:
        if ts in accepted:
            return ts
    return None


def send_file(
    assoc: Association,
    info: FileInfo,
    *,
    model: bool = False,
    tmp_dir: str | Path | None = None,
    send: Callable[..., Dataset] | None = None,
    **kwargs: Any,
) -> Dataset:
    """C-STORE one file over ``assoc``, byte-exact when the peer accepted its transfer syntax.

    Otherwise the file is converted into a syntax the peer accepted (decompressed first if it
    must be) in a temporary file under ``tmp_dir``. Raises :class:`SendRefused` when neither is
    possible; returns the C-STORE response status dataset (empty if the association was lost).
    ``send`` is the original ``send_c_store`` when the association's own method is wrapped.
    """
    client.install_client()
    send = send or assoc.send_c_store
    accepted = [cx.transfer_syntax[0] for cx in assoc.accepted_contexts
                if cx.abstract_syntax == info.sop_class and cx.as_scu]
    if not accepted:
        raise SendRefused(f"{info.sop_instance}: the peer accepted no presentation context for {info.sop_class.name}")
    target = outgoing_syntax(accepted, info.transfer_syntax, model=model)
    if target is None:
        if model:
            raise SendRefused(f"{info.sop_instance}: model objects go out in Explicit VR Little Endian only and the "
                              "peer did not accept it")
        raise SendRefused(f"{info.sop_instance}: the peer accepts {info.sop_class.name} only in "
                          f"{', '.join(UID(t).name for t in accepted)}, not {info.transfer_syntax.name}, and no "
                          "uncompressed syntax to convert to")
    if target == info.transfer_syntax and info.has_meta:
        return send(info.path, **kwargs)
    with _converted(info, target, tmp_dir) as path:
        log.info("%s: sending in %s (stored in %s, not accepted by the peer)", info.sop_instance, target.name,
                 info.transfer_syntax.name)
        return send(path, **kwargs)


@contextmanager
def _converted(info: FileInfo, target: UID, tmp_dir: str | Path | None) -> Iterator[Path]:
    """The file re-encoded in ``target`` (an uncompressed little-endian syntax), as a temporary file."""
    stored = info.transfer_syntax
    if stored == ExplicitVRBigEndian:
        # pydicom converts element values but not the bytes of OW pixel data: refuse, don't corrupt.
        raise SendRefused(f"{info.sop_instance}: stored in Explicit VR Big Endian, which the peer does not accept; "
                          "the node does not byte-swap pixel data")
    try:
        ds = pydicom.dcmread(info.path, force=not info.has_meta)
        if stored.is_compressed:
            ds.decompress()
    except Exception as exc:  # noqa: BLE001 (codec and plugin errors have no common base)
        raise SendRefused(f"{info.sop_instance}: cannot convert from {stored.name} to {target.name}: {exc}") from exc
    if not hasattr(ds, "file_meta") or ds.file_meta is None:
        ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = info.sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = info.sop_instance
    ds.file_meta.TransferSyntaxUID = target
    fd, name = tempfile.mkstemp(suffix=".dcm.part", dir=tmp_dir)
    os.close(fd)
    try:
        ds.save_as(name, enforce_file_format=True, implicit_vr=target.is_implicit_VR, little_endian=True)
        del ds
        yield Path(name)
    finally:
        Path(name).unlink(missing_ok=True)


def storage_contexts(items: Iterable[tuple[str, str, bool]]) -> list[PresentationContext]:
    """Presentation contexts to propose for sending files: (SOP class, stored syntax, is model).

    One context per stored syntax (so compressed files can go as they are) plus, for images, one
    uncompressed fallback per SOP class. Model objects: Explicit VR Little Endian only. Trimmed to
    128, the most used classes first.
    """
    counts: dict[tuple[str, str, bool], int] = {}
    for sop, ts, model in items:
        key = (str(sop), str(ts) if not model else str(ExplicitVRLittleEndian), bool(model))
        counts[key] = counts.get(key, 0) + 1
    exact = sorted(counts, key=lambda k: (-counts[k], k))
    contexts: list[PresentationContext] = []
    seen: set[tuple[str, tuple[str, ...]]] = set()

    def add(sop: str, syntaxes: list[str]) -> None:
        key = (sop, tuple(syntaxes))
        if key not in seen and len(contexts) < MAX_CONTEXTS:
            seen.add(key)
            contexts.append(build_context(sop, syntaxes))

    for sop, ts, _model in exact:
        add(sop, [ts])
    for sop, ts, model in exact:
        if not model and ts not in UNCOMPRESSED:
            add(sop, list(UNCOMPRESSED))
        elif not model:
            add(sop, [t for t in UNCOMPRESSED if t != ts])
    dropped = len(counts) - sum(1 for cx in contexts if len(cx.transfer_syntax) == 1)
    if dropped > 0:
        log.warning("%d SOP class/transfer syntax pair(s) left out: more than %d presentation contexts", dropped,
                    MAX_CONTEXTS)
    return contexts


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
    :func:`send_file`). A transient failure retries the files not yet answered; a failure
    status for one file is its result and is not retried.
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


def safe_name(sop_instance: str) -> str:
    """A file name for a received instance: its UID when it is a well-formed UID, never a path."""
    uid = (sop_instance or "").strip()
    if valid_uid(uid):
        return f"{uid}.dcm"
    return f"instance-{hashlib.sha256(uid.encode('utf-8', 'replace')).hexdigest()[:32]}.dcm"


class _Receiver:
    """Writes the instances a peer sends (C-GET sub-operations or a C-MOVE) into ``out_dir`` as received."""

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = out_dir
        self.files: list[Path] = []
        self.lock = threading.Lock()

    def handle_store(self, event: Any) -> int:
        try:
            name = safe_name(str(event.request.AffectedSOPInstanceUID))
            fd, tmp = tempfile.mkstemp(suffix=".part", dir=self.out_dir)
            with os.fdopen(fd, "wb") as fh:
                raw = event.request.DataSet
                if raw is None:
                    # Chunked receive (pynetdicom's STORE_RECV_CHUNKED_DATASET, set when this runs
                    # inside the node): the data set is already a Part-10 file on disk.
                    with open(event.dataset_path, "rb") as src:
                        shutil.copyfileobj(src, fh, 1 << 20)
                else:
                    # The data set bytes as received, behind a File Meta naming the context's syntax.
                    fh.write(b"\x00" * 128 + b"DICM")
                    fh.write(encode_file_meta(event.file_meta))
                    fh.write(raw.getvalue())
            path = self.out_dir / name
            os.replace(tmp, path)
        except Exception as exc:  # noqa: BLE001 (any failure becomes a C-STORE failure status)
            log.error("cannot write a received instance: %s", exc)
            return 0xA700
        with self.lock:
            self.files.append(path)
        return STATUS_SUCCESS


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
    per_class = max(1, min(len(RECEIVE_TRANSFER_SYNTAXES), budget // max(1, len(classes))))
    for sop in classes:
        if budget <= 0:
            break
        if sop == RAW_DATA_STORAGE:
            syntaxes = [[ExplicitVRLittleEndian]]
        elif per_class >= 2:
            # The uncompressed pair first, then one context per compressed syntax the budget allows.
            syntaxes = [list(UNCOMPRESSED)] + [[t] for t in RECEIVE_TRANSFER_SYNTAXES[2:2 + per_class - 1]]
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
    receiver = _Receiver(out)
    if get:
        return with_retries(lambda: _get_once(peer, identifier, model, sop_classes, receiver, options),
                            options.retry, f"C-GET from {peer}")
    assert move_to is not None
    server = None
    if receive_port:
        server = _start_receiver(move_to, (receive_bind, receive_port), receiver, options, receive_tls)
    try:
        result = with_retries(lambda: _move_once(peer, identifier, model, move_to, options), options.retry,
                              f"C-MOVE from {peer}")
    finally:
        if server is not None:
            client.stop_server(server, RECEIVER_CLOSE_GRACE)
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


def _get_once(peer: Address, identifier: Dataset, model: str, sop_classes: list[str], receiver: _Receiver,
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


def _start_receiver(ae_title: str, address: tuple[str, int], receiver: _Receiver, options: Options,
                    ssl_context: ssl.SSLContext | None = None) -> Any:
    """The storage SCP for a C-MOVE to ``ae_title``; stop it with :func:`node.dimse.compat.client.stop_server`.

    ``ssl_context``: a server context from node.security.tls, which leaves the handshake of an accepted
    connection to the association's thread, under a socket timeout.
    """
    ae = AE(ae_title=ae_title)
    ae.maximum_pdu_size = options.max_pdu
    ae.acse_timeout = options.acse_timeout
    ae.network_timeout = options.network_timeout
    ae.dimse_timeout = options.dimse_timeout
    classes = [str(RAW_DATA_STORAGE)] + [str(cx.abstract_syntax) for cx in StoragePresentationContexts]
    for sop in dict.fromkeys(classes):
        ae.add_supported_context(sop, RECEIVE_TRANSFER_SYNTAXES if sop != RAW_DATA_STORAGE else [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    return ae.start_server(address, block=False, ssl_context=ssl_context,
                           evt_handlers=[(evt.EVT_C_STORE, receiver.handle_store), (evt.EVT_CONN_OPEN, client.daemon_dul)])
