"""DICOM TLS (node.security.tls): BCP 195 contexts against dcmtk and pynetdicom, with a PKI made per run.

An in-process pynetdicom SCP uses ``server_context``; dcmtk's echoscu ``+tls`` and a pynetdicom
SCU using ``tls_args`` connect to it. What must fail fails cleanly: a plain DICOM connection to the
TLS port, TLS 1.1, a CBC or static-RSA suite, a client certificate from another CA.
"""

from __future__ import annotations

import socket
import ssl
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from certs import Pki, make_pki
from peers import require, run
from pynetdicom import AE, evt
from pynetdicom.sop_class import Verification

from node.config import parse_config
from node.security import tls

pytestmark = pytest.mark.peers


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


# The server context's socket timeout (node.network_timeout), longer than any test here may run:
# a server that waited on it instead of closing a connection at once fails by the test's own
# timeout, whatever the machine's speed, instead of passing or failing on a threshold.
IO_TIMEOUT = 600.0


def tls_config(pki: Pki, **tls_keys: object) -> object:
    peers = [{"ae_title": "SECURE", "host": "127.0.0.1", "port": 104, "tls": True}]
    section = {"enabled": True, "certificate": str(pki.server_cert), "private_key": str(pki.server_key),
               "ca_certificates": str(pki.ca), **tls_keys}
    return parse_config({"tls": section, "peers": peers, "node": {"network_timeout": IO_TIMEOUT}})


class Scp:
    def __init__(self, ctx: ssl.SSLContext | None) -> None:
        self.ae = AE("TLSSCP")
        self.ae.add_supported_context(Verification)
        self.ae.acse_timeout = 3  # a connection that never sends an A-ASSOCIATE-RQ ends after this
        self.requests: list[dict[str, str]] = []
        handlers = [(evt.EVT_REQUESTED, lambda e: self.requests.append(tls.session_info(e.assoc)))]
        self.server = self.ae.start_server(("127.0.0.1", 0), block=False, ssl_context=ctx, evt_handlers=handlers)
        self.port = self.server.server_address[1]

    def stop(self) -> None:
        # A connection whose handshake failed stays an association (in pynetdicom's Sta2) until
        # acse_timeout; aborting it from shutdown() makes pynetdicom raise in its reactor thread.
        # So each association thread is joined first (it ends by that timeout at the latest).
        for assoc in self.ae.active_associations:
            _join(assoc, 10 * self.ae.acse_timeout)
        self.ae.shutdown()


def _join(thread: threading.Thread, timeout: float) -> None:
    # threading.enumerate(), hence active_associations, lists a thread from its start() on, but
    # join() refuses it until it runs, which is a moment later.
    while True:
        try:
            thread.join(timeout)
            return
        except RuntimeError:
            time.sleep(0.001)


@pytest.fixture
def scp(pki) -> Iterator[Scp]:
    s = Scp(tls.server_context(tls_config(pki, require_client_certificate=True)))
    yield s
    s.stop()


def echoscu_tls(pki: Pki, port: int, key: Path | None = None, cert: Path | None = None,
                check: bool = True) -> object:
    exe = require("echoscu")
    return run([exe, "-to", "10", "-ta", "10", "+tls", str(key or pki.client_key), str(cert or pki.client_cert),
                "+cf", str(pki.ca), "-aec", "TLSSCP", "127.0.0.1", str(port)], timeout=30, check=check)


# --------------------------------------------------------------------------- what works


@pytest.mark.timeout(60)
def test_dcmtk_echoscu_tls_with_client_certificate(pki, scp):
    echoscu_tls(pki, scp.port)
    assert scp.requests and scp.requests[-1]["client_cn"] == "STORESCU"
    assert scp.requests[-1]["tls"] in ("TLSv1.2", "TLSv1.3")


@pytest.mark.timeout(60)
def test_pynetdicom_client_with_tls_args(pki, scp):
    cfg = tls_config(pki)
    # The node presents its own certificate as a client (the SCP requires one).
    args = tls.tls_args(cfg, "SECURE", "localhost")
    assert args is not None and args[1] == "localhost"
    ae = AE("SECURE")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", scp.port, ae_title="TLSSCP", tls_args=args)
    try:
        assert assoc.is_established
        assert assoc.send_c_echo().Status == 0
    finally:
        assoc.release()
    # A peer without tls = true gets a plain connection.
    assert tls.tls_args(cfg, "OTHER") is None


@pytest.mark.timeout(60)
def test_tls12_with_bcp195_suite_is_accepted(pki, scp):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(pki.ca)
    ctx.load_cert_chain(pki.client_cert, pki.client_key)
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    with socket.create_connection(("127.0.0.1", scp.port), timeout=5) as raw, \
            ctx.wrap_socket(raw, server_hostname="localhost") as s:
        assert s.version() == "TLSv1.2"
        assert s.cipher()[0] in tls.BCP195_CIPHERS.split(":")


@pytest.mark.timeout(60)
def test_silent_client_does_not_block_the_port(pki, scp):
    """The handshake runs in the association's thread: a client that connects and says nothing
    must not hold up the next one (pynetdicom would do the handshake in its accept loop)."""
    # Were the handshake in the accept loop, the silent connection would hold it for IO_TIMEOUT,
    # and echoscu would fail by its own timeouts (or run's) rather than succeed.
    with socket.create_connection(("127.0.0.1", scp.port), timeout=5):
        echoscu_tls(pki, scp.port)


# --------------------------------------------------------------------------- what fails, cleanly


def _a_associate_rq() -> bytes:
    """A minimal plain A-ASSOCIATE-RQ (PS3.8 9.3.2): what a non-TLS peer sends first."""
    def item(kind: int, body: bytes) -> bytes:
        return struct.pack(">BBH", kind, 0, len(body)) + body
    app = item(0x10, b"1.2.840.10008.3.1.1.1")
    pc = item(0x20, bytes([1, 0, 0, 0]) + item(0x30, Verification.encode()) + item(0x40, b"1.2.840.10008.1.2"))
    ui = item(0x50, item(0x51, struct.pack(">I", 16384)))
    body = struct.pack(">HH", 1, 0) + b"TLSSCP".ljust(16) + b"PLAIN".ljust(16) + b"\0" * 32 + app + pc + ui
    return struct.pack(">BBI", 0x01, 0, len(body)) + body


@pytest.mark.timeout(60)
def test_plain_connection_to_tls_port_fails_cleanly(pki, scp):
    # dcmtk without +tls: a clean failure, not a hang. echoscu would wait for an answer for 300 s
    # and the server for IO_TIMEOUT, both beyond run's 30 s: failing within it means the server
    # closed the connection, and did not time out on it.
    res = run([require("echoscu"), "-to", "10", "-ta", "300", "-aec", "TLSSCP", "127.0.0.1", str(scp.port)],
              timeout=30, check=False)
    assert res.returncode != 0
    assert "Association Request Failed" in res.stdout + res.stderr
    # A raw A-ASSOCIATE-RQ: the node closes the connection (maybe after a TLS alert), never answers in DICOM.
    with socket.create_connection(("127.0.0.1", scp.port), timeout=10) as s:
        s.sendall(_a_associate_rq())
        got = b""
        while chunk := s.recv(4096):
            got += chunk
        assert not got.startswith(b"\x02")  # no A-ASSOCIATE-AC
    assert not scp.requests
    # And the port still serves TLS.
    echoscu_tls(pki, scp.port)


@pytest.mark.timeout(60)
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_tls11_is_refused(pki, scp):
    def client() -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
        ctx.minimum_version = ctx.maximum_version = ssl.TLSVersion.TLSv1_1
        ctx.set_ciphers("ALL:@SECLEVEL=0")
        return ctx

    # This OpenSSL can still speak TLS 1.1 when the server lets it ...
    permissive = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    permissive.minimum_version = ssl.TLSVersion.TLSv1_1
    permissive.set_ciphers("ALL:@SECLEVEL=0")
    permissive.load_cert_chain(pki.server_cert, pki.server_key)
    other = Scp(permissive)
    try:
        with client().wrap_socket(socket.create_connection(("127.0.0.1", other.port), timeout=5)) as s:
            assert s.version() == "TLSv1.1"
    except ssl.SSLError as exc:  # pragma: no cover (an OpenSSL built without TLS 1.1)
        pytest.skip(f"this OpenSSL cannot speak TLS 1.1 at all: {exc}")
    finally:
        other.stop()
    # ... and the node's context refuses it with a protocol-version alert.
    with pytest.raises(ssl.SSLError, match="PROTOCOL_VERSION|UNSUPPORTED_PROTOCOL"):
        client().wrap_socket(socket.create_connection(("127.0.0.1", scp.port), timeout=5))


@pytest.mark.timeout(60)
@pytest.mark.parametrize("suite", ["ECDHE-ECDSA-AES128-SHA256", "ECDHE-ECDSA-AES128-SHA", "AES128-GCM-SHA256"])
def test_non_bcp195_suites_are_refused(pki, scp, suite):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(suite)
    with pytest.raises(ssl.SSLError, match="HANDSHAKE_FAILURE"):
        ctx.wrap_socket(socket.create_connection(("127.0.0.1", scp.port), timeout=5))


@pytest.mark.timeout(60)
def test_client_certificate_from_another_ca_is_refused(pki, scp):
    res = echoscu_tls(pki, scp.port, pki.rogue_key, pki.rogue_cert, check=False)
    assert res.returncode != 0
    assert not scp.requests
    echoscu_tls(pki, scp.port)  # the port still serves


@pytest.mark.timeout(60)
def test_client_certificate_optional_unless_required(pki):
    """Without require_client_certificate a client may come without a certificate (dcmtk +tla)."""
    optional = Scp(tls.server_context(tls_config(pki)))
    required = Scp(tls.server_context(tls_config(pki, require_client_certificate=True, port=0)))
    try:
        exe = require("echoscu")
        anon = [exe, "-to", "10", "-ta", "10", "+tla", "+cf", str(pki.ca), "-aec", "TLSSCP", "127.0.0.1"]
        assert run([*anon, str(optional.port)], timeout=30, check=False).returncode == 0
        assert run([*anon, str(required.port)], timeout=30, check=False).returncode != 0
    finally:
        optional.stop()
        required.stop()


# --------------------------------------------------------------------------- configuration


@pytest.mark.timeout(30)
def test_validate_names_the_key_at_fault(pki):
    assert tls.validate(tls_config(pki)) == []
    # The client's key with the server's certificate.
    problems = tls.validate(tls_config(pki, private_key=str(pki.client_key)))
    assert [k for k, _ in problems] == ["tls.private_key"]
    garbage = pki.directory / "garbage.pem"
    garbage.write_text("not a certificate\n")
    problems = tls.validate(tls_config(pki, certificate=str(garbage)))
    assert problems and problems[0][0] == "tls.certificate"
    problems = tls.validate(tls_config(pki, ca_certificates=str(garbage)))
    assert problems and problems[0][0] == "tls.ca_certificates"


@pytest.mark.timeout(30)
def test_listeners_port_model(pki):
    plain = parse_config({"node": {"port": 11112}})
    assert [(x.address[1], x.scheme) for x in tls.listeners(plain)] == [(11112, "dicom")]
    only = tls_config(pki)
    assert [(x.address[1], x.scheme) for x in tls.listeners(only)] == [(11112, "dicom-tls")]
    both = tls_config(pki, port=2762)
    assert [(x.address[1], x.scheme) for x in tls.listeners(both)] == [(11112, "dicom"), (2762, "dicom-tls")]
    ctx = tls.server_context(only)
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
    assert all(c["name"] in tls.BCP195_CIPHERS.split(":") for c in ctx.get_ciphers() if c["protocol"] == "TLSv1.2")


@pytest.mark.timeout(30)
def test_config_check_reports_bad_tls_keys(pki, tmp_path):
    from node.config import ConfigError, load_config

    cfg_file = tmp_path / "bad.toml"
    cfg_file.write_text('[tls]\nenabled = true\ncertificate = "/nonexistent.pem"\nrequire_client_certificate = true\nport = 70000\n')
    with pytest.raises(ConfigError) as info:
        load_config(cfg_file)
    keys = {k for k, _ in info.value.problems}
    assert {"tls.private_key", "tls.certificate", "tls.require_client_certificate", "tls.port"} <= keys


@pytest.mark.timeout(120)
def test_node_reactor_associates_with_a_tls13_peer_that_sends_session_tickets(pki):
    """The node's DUL reactor (node.dimse.compat.reactor) as a TLS requestor of dcmtk's storescp.

    OpenSSL servers send TLS 1.3 session tickets right after the handshake; the node's reactor,
    which reads before it sends once the socket is readable, used to read them before sending
    its A-ASSOCIATE-RQ and block until the ACSE timeout (14 times in 30 against storescp).
    """
    import subprocess

    from peers import free_port, wait_port

    from node.dimse.compat import reactor

    reactor.install()  # (what a Node does in its process; process-wide and idempotent)
    port = free_port()
    proc = subprocess.Popen([require("storescp"), "-ta", "5", "+tls", str(pki.server_key), str(pki.server_cert),
                             "+cf", str(pki.ca), str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(port, timeout=20)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.load_verify_locations(pki.ca)
        ctx.load_cert_chain(pki.client_cert, pki.client_key)
        versions, failed = set(), 0
        for _ in range(10):
            ae = AE("NODE")
            ae.add_requested_context(Verification)
            ae.acse_timeout = 3
            assoc = ae.associate("127.0.0.1", port, tls_args=(ctx, "localhost"))
            if assoc.is_established:
                versions.add(assoc.dul.socket.socket.version())
                assert assoc.send_c_echo().Status == 0
                assoc.release()
            else:
                failed += 1
        assert failed == 0, f"{failed} of 10 associations failed"
        assert versions == {"TLSv1.3"}  # (the case that sends tickets)
    finally:
        proc.kill()
        proc.wait(10)
