"""DICOM TLS: SSL contexts for the SCP and for every SCU path, following BCP 195.

PS3.15 Annex B.9 ("BCP 195 Non-Downgrading TLS Secure Transport Connection Profile") points at
RFC 9325 (BCP 195). What that means here:

* TLS 1.2 minimum, TLS 1.3 allowed (and preferred: OpenSSL negotiates the highest).
* TLS 1.2 cipher suites: ECDHE key exchange with AEAD ciphers only (AES-GCM, ChaCha20-Poly1305),
  RSA or ECDSA certificates. Left out, with RFC 9325's reasons: static RSA key exchange (no
  forward secrecy, §4.1), ephemeral finite-field DHE (SHOULD NOT, §4.1: unnegotiated group
  sizes, the Raccoon attack), CBC suites (the recommended suites of §4.2 are all AEAD; CBC
  brought Lucky13 and padding oracles). TLS 1.3 suites are OpenSSL's defaults, all AEAD.
* No compression (CRIME), no TLS 1.2 renegotiation.

The SCP: :func:`server_context`. pynetdicom wraps each accepted socket in the *server thread*
(``AssociationServer.get_request``), so an eager handshake would let one silent client stall
every TLS connection behind it. The context returned here therefore defers the handshake to the
association's own thread (OpenSSL does it on the first read) and puts the node's network timeout
on the socket, so a peer that stops mid-handshake costs one association thread, not the port.
Server contexts send no TLS 1.3 session tickets (see :func:`_server_context`).

Ports (``[tls] port``): 0 (the default) makes ``[node] port`` speak TLS only; another port adds a
TLS listener there while ``[node] port`` stays plain, for a migration period. :func:`listeners`
says what to bind.

The SCU: :func:`tls_args` gives pynetdicom's ``ae.associate(..., tls_args=...)`` for a peer with
``tls = true`` (``None`` for the others): the server's certificate is verified against
``[tls] ca_certificates`` (or the system trust store) and, with ``check_hostname``, must name the
peer's host; the node presents its own certificate when it has one (peers that require client
certificates). Every SCU path takes it: the node's C-MOVE sub-associations (node.security.guard), the
outbox exporter (node.pipeline.outbox.export_options) and ``modelnode echo | store | find | fetch``
(node.scu.client ``Options.tls``; the commands' ``--tls*`` options build contexts with
:func:`client_context_from`).

Contexts are built once per distinct setting and cached: certificates are read at start, so a
renewed certificate takes effect at the next restart.
"""

from __future__ import annotations

import functools
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from node.config import Config

# OpenSSL names of the TLS 1.2 suites (RFC 9325 §4.2 and their ECDSA and ChaCha20 siblings).
BCP195_CIPHERS = ":".join((
    "ECDHE-ECDSA-AES128-GCM-SHA256",
    "ECDHE-RSA-AES128-GCM-SHA256",
    "ECDHE-ECDSA-AES256-GCM-SHA384",
    "ECDHE-RSA-AES256-GCM-SHA384",
    "ECDHE-ECDSA-CHACHA20-POLY1305",
    "ECDHE-RSA-CHACHA20-POLY1305",
))
MINIMUM_VERSION = ssl.TLSVersion.TLSv1_2


class TlsConfigError(ValueError):
    """A certificate, key or CA file cannot be used; ``key`` is the configuration key."""

    def __init__(self, key: str, reason: str) -> None:
        super().__init__(f"{key}: {reason}")
        self.key = key
        self.reason = reason


class _DeferredHandshakeContext(ssl.SSLContext):
    """A server context whose sockets do their handshake in the association's thread.

    ``io_timeout`` bounds every blocking read and write on the wrapped socket (handshake
    included); pynetdicom leaves accepted sockets blocking without a timeout.
    """

    io_timeout: float | None = None

    def wrap_socket(self, sock: socket.socket, server_side: bool = False, do_handshake_on_connect: bool = True,
                    suppress_ragged_eofs: bool = True, server_hostname: str | None = None,
                    session: ssl.SSLSession | None = None) -> ssl.SSLSocket:
        if server_side:
            sock.settimeout(self.io_timeout)
            do_handshake_on_connect = False
        return super().wrap_socket(sock, server_side=server_side, do_handshake_on_connect=do_handshake_on_connect,
                                   suppress_ragged_eofs=suppress_ragged_eofs, server_hostname=server_hostname,
                                   session=session)


def _harden(ctx: ssl.SSLContext) -> None:
    ctx.minimum_version = MINIMUM_VERSION
    ctx.set_ciphers(BCP195_CIPHERS)
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION | ssl.OP_CIPHER_SERVER_PREFERENCE


def _path(value: str) -> str:
    return str(Path(value).expanduser())


def _load_chain(ctx: ssl.SSLContext, certificate: str, private_key: str) -> None:
    try:
        ctx.load_cert_chain(_path(certificate), _path(private_key) if private_key else None)
    except FileNotFoundError as exc:
        raise TlsConfigError("tls.certificate", f"{exc.filename}: no such file") from exc
    except PermissionError as exc:
        raise TlsConfigError("tls.private_key", f"{exc.filename}: permission denied") from exc
    except ssl.SSLError as exc:
        # OpenSSL says "KEY_VALUES_MISMATCH" for a key of another certificate, "PEM lib" for garbage.
        raise TlsConfigError("tls.private_key" if "KEY_VALUES" in str(exc) else "tls.certificate",
                             f"cannot load the certificate and private key: {exc.reason or exc}") from exc


def _load_ca(ctx: ssl.SSLContext, ca_file: str) -> None:
    try:
        ctx.load_verify_locations(cafile=_path(ca_file))
    except (OSError, ssl.SSLError) as exc:
        raise TlsConfigError("tls.ca_certificates", f"cannot load CA certificates: {exc}") from exc


@functools.lru_cache(maxsize=8)
def _server_context(certificate: str, private_key: str, ca_file: str, require_client: bool,
                    io_timeout: float | None) -> ssl.SSLContext:
    ctx = _DeferredHandshakeContext(ssl.PROTOCOL_TLS_SERVER)
    _harden(ctx)
    ctx.io_timeout = io_timeout
    # No TLS 1.3 session tickets. OpenSSL sends them unasked right after the handshake, before the
    # client has said anything; they only serve session resumption, which pynetdicom never does.
    # What they did do is make the client's socket readable with no DICOM data behind it: a
    # requestor whose DUL reads when its socket is readable (node.dimse.compat.reactor's does, before sending
    # its queued A-ASSOCIATE-RQ) then blocks in SSL_read while we wait for that request, until a
    # timeout aborts the association. That is how the node's C-MOVE to `fetch --listen
    # --listen-tls` failed about one time in four.
    ctx.num_tickets = 0
    _load_chain(ctx, certificate, private_key)
    if ca_file:
        _load_ca(ctx, ca_file)
        # Without require_client_certificate a client may present none; one it presents is verified.
        ctx.verify_mode = ssl.CERT_REQUIRED if require_client else ssl.CERT_OPTIONAL
    else:
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def server_context(cfg: Config) -> ssl.SSLContext:
    """The SCP's context (raises :class:`TlsConfigError` naming the key at fault)."""
    t = cfg.tls
    if not t.certificate or not t.private_key:
        raise TlsConfigError("tls.certificate", "the SCP needs tls.certificate and tls.private_key")
    return _server_context(t.certificate, t.private_key, t.ca_certificates, t.require_client_certificate,
                           cfg.node.network_timeout)


@functools.lru_cache(maxsize=8)
def _client_context(certificate: str, private_key: str, ca_file: str, check_hostname: bool) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED and check_hostname by default
    _harden(ctx)
    if ca_file:
        _load_ca(ctx, ca_file)
    else:
        ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
    ctx.check_hostname = check_hostname
    if certificate:
        _load_chain(ctx, certificate, private_key)
    return ctx


def client_context_from(certificate: str | Path = "", private_key: str | Path = "", ca_certificates: str | Path = "",
                        check_hostname: bool = True) -> ssl.SSLContext:
    """A BCP 195 client context from explicit files (the ``--tls-*`` options of the SCU commands).

    ``ca_certificates`` empty: the system trust store. ``certificate`` empty: no client
    certificate; ``private_key`` empty: the key is in the certificate file. Raises
    :class:`TlsConfigError` with the ``tls.*`` key that the file stands for.
    """
    return _client_context(str(certificate or ""), str(private_key or ""), str(ca_certificates or ""),
                           bool(check_hostname))


def server_context_from(certificate: str | Path, private_key: str | Path, ca_certificates: str | Path = "",
                        require_client_certificate: bool = False, io_timeout: float | None = None) -> ssl.SSLContext:
    """A BCP 195 server context from explicit files (the storage SCP that ``fetch --listen`` starts)."""
    if not certificate:
        raise TlsConfigError("tls.certificate", "a TLS listener needs a certificate and its private key")
    if require_client_certificate and not ca_certificates:
        raise TlsConfigError("tls.require_client_certificate", "needs CA certificates to verify client certificates")
    return _server_context(str(certificate), str(private_key or ""), str(ca_certificates or ""),
                           bool(require_client_certificate), io_timeout)


def client_context(cfg: Config, peer: Any = None) -> ssl.SSLContext:
    """The context for calling ``peer`` (any object with ``host``; the same for every peer today).

    ``peer`` is accepted so that per-peer settings (a pinned CA, a server name) can be added
    without changing the callers.
    """
    t = cfg.tls
    return _client_context(t.certificate, t.private_key, t.ca_certificates, t.check_hostname)


def tls_args(cfg: Config, ae_title: str, host: str | None = None) -> tuple[ssl.SSLContext, str] | None:
    """``tls_args`` for ``ae.associate`` when calling ``ae_title`` (a ``[[peers]]`` entry with
    ``tls = true``), else None. ``host`` overrides the peer's host as the expected server name."""
    peer = cfg.peer(ae_title.strip())
    if peer is None or not peer.tls:
        return None
    return client_context(cfg, peer), host or peer.host


@dataclass(frozen=True)
class Listener:
    address: tuple[str, int]
    ssl_context: ssl.SSLContext | None

    @property
    def scheme(self) -> str:
        return "dicom-tls" if self.ssl_context is not None else "dicom"


def listeners(cfg: Config) -> list[Listener]:
    """What the SCP binds: ``ae.start_server(l.address, ssl_context=l.ssl_context, ...)`` for each."""
    n, t = cfg.node, cfg.tls
    if not t.enabled:
        return [Listener((n.bind, n.port), None)]
    ctx = server_context(cfg)
    if t.port:
        return [Listener((n.bind, n.port), None), Listener((n.bind, t.port), ctx)]
    return [Listener((n.bind, n.port), ctx)]


def validate(cfg: Config) -> list[tuple[str, str]]:
    """Build every context the configuration implies; (key, reason) for each that fails.

    ``modelnode config check`` calls this (the plain configuration check only sees that the
    files exist), and so should ``serve`` before it binds anything.
    """
    problems: list[tuple[str, str]] = []
    builds = []
    if cfg.tls.enabled:
        builds.append(lambda: server_context(cfg))
    if any(p.tls for p in cfg.peers):
        builds.append(lambda: client_context(cfg))
    for build in builds:
        try:
            build()
        except TlsConfigError as exc:
            if (exc.key, exc.reason) not in problems:
                problems.append((exc.key, exc.reason))
    return problems


def session_info(assoc: Any) -> dict[str, str]:
    """TLS facts about an association for the audit log: version, cipher, client certificate
    subject CN. Empty for a plain connection (or before the handshake)."""
    sock = getattr(getattr(getattr(assoc, "dul", None), "socket", None), "socket", None)
    if not isinstance(sock, ssl.SSLSocket):
        return {}
    info: dict[str, str] = {}
    try:
        version, cipher = sock.version(), sock.cipher()
        if version:
            info["tls"] = version
        if cipher:
            info["cipher"] = cipher[0]
        cert = sock.getpeercert()
    except (OSError, ValueError):
        return info
    for rdn in (cert or {}).get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                info["client_cn"] = value
    return info


def with_move_tls(cfg: Config, item: Any, destination: str) -> Any:
    """The first yield of a C-MOVE handler (address, port), with TLS for ``destination``.

    pynetdicom opens the C-MOVE sub-association from that yield; a ``[[peers]]`` entry with
    ``tls = true`` gets the node's client context through the yield's keyword arguments.
    """
    if not isinstance(item, tuple) or len(item) < 2 or item[0] is None:
        return item
    args = tls_args(cfg, destination, str(item[0]))
    if args is None:
        return item
    kwargs = dict(item[2]) if len(item) > 2 and item[2] else {}
    kwargs.setdefault("tls_args", args)
    return (item[0], item[1], kwargs)
