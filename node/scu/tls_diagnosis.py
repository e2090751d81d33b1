"""Why a DICOM TLS handshake failed, in words for someone setting up a peer.

A failed handshake (certificate not trusted, wrong host name, the peer refusing our client
certificate or wanting one, no TLS on that port) is a permanent
:class:`node.scu.client.PeerError` that says it was TLS and why: pynetdicom 3.0.4 only logs the
SSL error and reports an aborted association, so :func:`node.scu.client.associate` keeps the
exception itself (see :class:`TlsWatch`) and turns it into a message with :func:`tls_failure`.
"""

from __future__ import annotations

import re
import ssl
from collections.abc import Callable
from typing import Any, NamedTuple, TypeVar

T = TypeVar("T")


class TlsFailure(NamedTuple):
    """What :func:`tls_failure` makes of a TLS-layer error: the message of the
    :class:`node.scu.client.PeerError` to raise, and whether a retry may help."""

    message: str
    transient: bool


class TlsWatch:
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


def tls_failure(peer: str, exc: OSError, handshake_done: bool) -> TlsFailure:
    """What a TLS-layer failure with ``peer`` means: what OpenSSL said and, where known, what it means.

    "Handshake" covers the TLS 1.3 case too where our side had finished (``handshake_done``) and
    the server's verdict on our certificate came as an alert on the first read, or as a close
    or reset that overtook the alert.
    """
    stage = "TLS handshake"
    if handshake_done and isinstance(exc, (ssl.SSLEOFError, ssl.SSLZeroReturnError, ConnectionError)):
        # Closed between the TLS handshake and any DICOM answer: a TLS 1.3 server refusing our
        # client certificate (or missing one) does this; not worth retrying.
        return TlsFailure(f"{stage} with {peer} failed: the peer closed the connection after the handshake (does "
                          "it require a client certificate, or not trust ours?)", transient=False)
    if isinstance(exc, ssl.SSLCertVerificationError):
        # e.g. "certificate verify failed: self-signed certificate in certificate chain"
        why = f"certificate verify failed: {exc.verify_message or exc.reason}"
        hint = _VERIFY_HINTS.get(exc.verify_code or 0)
        return TlsFailure(f"{stage} with {peer} failed: {why}" + (f" ({hint})" if hint else ""), transient=False)
    if isinstance(exc, (ssl.SSLEOFError, ssl.SSLZeroReturnError)) or (
            isinstance(exc, ssl.SSLError) and exc.reason == "UNEXPECTED_EOF_WHILE_READING"):
        return TlsFailure(f"{stage} with {peer} failed: the peer closed the connection (does it speak TLS on this "
                          "port? does it require a client certificate?)", transient=False)
    if isinstance(exc, ssl.SSLError):
        text = re.sub(r"^\[SSL(?:: [A-Z0-9_]+)?\] |\s*\(_ssl\.c:\d+\)$", "", exc.strerror or str(exc)) or str(exc)
        hint = _TLS_HINTS.get(exc.reason or "")
        return TlsFailure(f"{stage} with {peer} failed: {text}" + (f" ({hint})" if hint else ""), transient=False)
    # A reset or a timeout mid-handshake: the network or a busy peer, worth another try (though
    # a plain DICOM port resets a TLS hello too).
    if isinstance(exc, ConnectionError):
        return TlsFailure(f"{stage} with {peer} failed: {exc.strerror or exc} (does the peer speak TLS on this "
                          "port?)", transient=True)
    return TlsFailure(f"{stage} with {peer} failed: {exc.strerror or str(exc) or type(exc).__name__}", transient=True)
