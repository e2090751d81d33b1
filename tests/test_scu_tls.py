"""DICOM TLS on the node's SCU paths: ``modelnode echo | store | find | fetch`` and the outbox exporter.

Real peers over loopback, with a PKI made per run (tests/certs.py): dcmtk's storescp ``+tls``
(which requires and verifies a client certificate by default) and a TLS-only ``modelnode serve``.
What must fail fails at once with a message that says it was TLS and why: a server certificate
from an unknown CA, a missing or foreign client certificate, a plain association to a TLS port and
TLS to a plain port.
"""

from __future__ import annotations

import os
import select
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest
from certs import Pki, make_pki
from node_proc import MODELNODE, REPO, node_process, write_config
from peers import free_port, require, stop, wait_port
from pydicom.data import get_testdata_file
from pynetdicom.dsutils import split_dataset

from node.config import parse_config
from node.dimse.compat import client as compat_client
from node.pipeline import outbox
from node.scu import client as scu
from node.scu.receiver import Receiver, start_receiver
from node.security import tls

pytestmark = pytest.mark.peers

CT_SMALL = Path(get_testdata_file("CT_small.dcm"))
MR_SMALL = Path(get_testdata_file("MR_small.dcm"))


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def body(path: Path) -> bytes:
    """The dataset bytes after the File Meta: what a byte-exact transfer keeps (the receiver
    writes its own File Meta)."""
    _, offset = split_dataset(Path(path))
    return Path(path).read_bytes()[offset:]


def received(out: Path, sop_uid: str) -> Path:
    for path in out.iterdir():
        if path.is_file() and pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID == sop_uid:
            return path
    raise AssertionError(f"{sop_uid} not among {sorted(p.name for p in out.iterdir())}")


@dataclass
class Storescp:
    port: int
    out: Path
    proc: subprocess.Popen

    def to(self, host: str = "127.0.0.1") -> str:
        return f"STORESCP@{host}:{self.port}"


@contextmanager
def storescp(workdir: Path, pki: Pki | None, peer_cert: str = "-rc") -> Iterator[Storescp]:
    """dcmtk's storescp, bit-preserving (+B: the data set bytes as received) into ``workdir/out``;
    with ``pki`` a TLS-only one whose certificate is the test server's (``peer_cert``: -rc
    requires a client certificate, -vc verifies one if presented). dcmtk 3.6.7's storescp cannot
    bind to one address; the tests only call it on loopback."""
    out = workdir / "out"
    out.mkdir(parents=True, exist_ok=True)
    port = free_port()
    cmd = [require("storescp"), "-ta", "10", "+B", "-od", str(out)]
    if pki is not None:
        cmd += ["+tls", str(pki.server_key), str(pki.server_cert), "+cf", str(pki.ca), peer_cert]
    log = open(workdir / "storescp.log", "wb")  # noqa: SIM115 (closed below)
    proc = subprocess.Popen([*cmd, str(port)], stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_port(port, 20, proc)
        yield Storescp(port, out, proc)
    finally:
        stop(proc)
        log.close()


def modelnode(*args: str, config: Path | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    """``modelnode [--config FILE] ARGS`` as a process (the CLI as an operator runs it)."""
    env = {k: v for k, v in os.environ.items() if k not in ("MODELNODE_CONFIG", "MODELNODE_DATA_DIR")}
    pre = ["--config", str(config)] if config else []
    return subprocess.run([*MODELNODE, *pre, *args], capture_output=True, text=True, timeout=timeout, cwd=REPO,
                          env=env)


def client_flags(pki: Pki, *, cert: bool = True) -> list[str]:
    flags = ["--tls", "--tls-ca", str(pki.ca)]
    return flags + (["--tls-cert", str(pki.client_cert), "--tls-key", str(pki.client_key)] if cert else [])


# "Fails at once" means without waiting for a timeout or a retry: with the CLI's timeouts far
# beyond modelnode()'s 60 s, a failure that waited for one ends in TimeoutExpired, and one that
# retried says "retrying"; no threshold on the machine's speed is needed.
LONG_TIMEOUTS = ["--timeout", "600"]


# --------------------------------------------------------------------------- the CLI against dcmtk


@pytest.mark.timeout(90)
def test_echo_and_store_over_tls_with_a_client_certificate(tmp_path, pki):
    with storescp(tmp_path, pki) as scp:
        res = modelnode("echo", "--to", scp.to(), *client_flags(pki))
        assert res.returncode == 0 and "C-ECHO success" in res.stdout, res.stderr
        res = modelnode("store", str(CT_SMALL), str(MR_SMALL), "--to", scp.to(), *client_flags(pki))
        assert res.returncode == 0 and "stored 2 of 2" in res.stdout, res.stderr
        for src in (CT_SMALL, MR_SMALL):
            uid = str(pydicom.dcmread(src, stop_before_pixels=True).SOPInstanceUID)
            assert body(received(scp.out, uid)) == body(src)
        # The certificate names localhost and 127.0.0.1 only: another loopback address fails the
        # name check, and passes with --tls-no-hostname-check (the CA check stays).
        res = modelnode("echo", "--to", scp.to("127.0.0.2"), *client_flags(pki))
        assert res.returncode == 6 and "certificate verify failed" in res.stderr, res.stderr
        assert "IP address mismatch" in res.stderr or "Hostname mismatch" in res.stderr
        res = modelnode("echo", "--to", scp.to("127.0.0.2"), *client_flags(pki), "--tls-no-hostname-check")
        assert res.returncode == 0, res.stderr
        res = modelnode("echo", "--to", scp.to("localhost"), *client_flags(pki))
        assert res.returncode == 0, res.stderr


@pytest.mark.timeout(90)
def test_required_client_certificate_missing_or_foreign_fails_at_once(tmp_path, pki):
    with storescp(tmp_path, pki, "-rc") as scp:
        res = modelnode("echo", "--to", scp.to(), *client_flags(pki, cert=False), *LONG_TIMEOUTS)
        assert res.returncode == 6, res.stderr
        assert "TLS handshake with" in res.stderr and "client certificate" in res.stderr, res.stderr
        assert "retrying" not in res.stderr
        foreign = ["--tls", "--tls-ca", str(pki.ca), "--tls-cert", str(pki.rogue_cert), "--tls-key", str(pki.rogue_key)]
        res = modelnode("store", str(CT_SMALL), "--to", scp.to(), *foreign, *LONG_TIMEOUTS)
        # With TLS 1.3 the server's verdict on our certificate comes after our side of the
        # handshake: the "unknown ca" alert, or (when the close overtakes it) just the close.
        assert res.returncode == 6 and "TLS handshake with" in res.stderr, res.stderr
        assert "client certificate" in res.stderr, res.stderr
        assert "retrying" not in res.stderr and not list(scp.out.iterdir())
        # The peer still serves a client that presents the right certificate.
        assert modelnode("echo", "--to", scp.to(), *client_flags(pki)).returncode == 0
    # A peer that only verifies a certificate when one comes: no client certificate is fine.
    with storescp(tmp_path / "optional", pki, "-vc") as scp:
        res = modelnode("echo", "--to", scp.to(), *client_flags(pki, cert=False))
        assert res.returncode == 0, res.stderr


@pytest.mark.timeout(90)
def test_server_certificate_from_an_unknown_ca_fails_at_once(tmp_path, pki):
    rogue_ca = pki.directory / "rogue-ca.crt"
    with storescp(tmp_path, pki) as scp:
        for ca in (["--tls-ca", str(rogue_ca)], []):  # a wrong CA file, and the system trust store
            res = modelnode("echo", "--to", scp.to(), "--tls", *ca, "--tls-cert", str(pki.client_cert),
                            "--tls-key", str(pki.client_key), *LONG_TIMEOUTS)
            assert res.returncode == 6, res.stderr
            assert "TLS handshake with" in res.stderr and "certificate verify failed" in res.stderr, res.stderr
            # Final at once: no retries with backoff (LONG_TIMEOUTS: no timeout either).
            assert "retrying" not in res.stderr, res.stderr


@pytest.mark.timeout(90)
def test_plain_to_tls_port_and_tls_to_plain_port_fail_cleanly(tmp_path, pki):
    with storescp(tmp_path / "tls", pki) as scp:
        res = modelnode("echo", "--to", scp.to(), "--retries", "1", "--retry-delay", "0.2", *LONG_TIMEOUTS)
        assert res.returncode == 6 and "aborted the association request" in res.stderr, res.stderr
        assert "DICOM TLS" in res.stderr
        assert modelnode("echo", "--to", scp.to(), *client_flags(pki)).returncode == 0
    with storescp(tmp_path / "plain", None) as scp:
        res = modelnode("echo", "--to", scp.to(), *client_flags(pki), "--retries", "0")
        assert res.returncode == 6 and "TLS handshake with" in res.stderr, res.stderr
        assert "speak TLS" in res.stderr
        assert modelnode("echo", "--to", scp.to()).returncode == 0


@pytest.mark.timeout(30)
def test_bad_tls_options_are_usage_errors(tmp_path, pki):
    res = modelnode("echo", "--to", "X@127.0.0.1:104", "--tls-ca", str(tmp_path / "nope.pem"))
    assert res.returncode == 4 and "--tls-ca" in res.stderr, res.stderr
    res = modelnode("echo", "--to", "X@127.0.0.1:104", "--tls-key", str(pki.client_key))
    assert res.returncode == 2 and "--tls-key needs --tls-cert" in res.stderr, res.stderr
    # The client's certificate with the server's key.
    res = modelnode("echo", "--to", "X@127.0.0.1:104", "--tls-cert", str(pki.client_cert), "--tls-key",
                    str(pki.server_key))
    assert res.returncode == 3 and "--tls-key" in res.stderr, res.stderr


@pytest.mark.timeout(30)
def test_contexts_follow_bcp195(pki):
    ctx = tls.client_context_from(pki.client_cert, pki.client_key, pki.ca)
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
    assert ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname
    assert all(c["name"] in tls.BCP195_CIPHERS.split(":") for c in ctx.get_ciphers() if c["protocol"] == "TLSv1.2")
    assert not tls.client_context_from(ca_certificates=pki.ca, check_hostname=False).check_hostname
    server = tls.server_context_from(pki.server_cert, pki.server_key, pki.ca)
    assert server.minimum_version == ssl.TLSVersion.TLSv1_2 and server.verify_mode == ssl.CERT_OPTIONAL
    assert server.num_tickets == 0


@pytest.mark.timeout(30)
def test_tls_listener_sends_nothing_unasked_after_the_handshake(pki):
    """A TLS 1.3 server sends session tickets right after the handshake unless told not to. They
    made the node's C-MOVE requestor (node.dimse.compat.reactor reads a readable socket before it sends its
    A-ASSOCIATE-RQ) block in SSL_read while our listener waited for that request: the first
    C-MOVE to `fetch --listen --listen-tls` aborted after 30 s about one time in four."""
    ctx = tls.server_context_from(pki.server_cert, pki.server_key, pki.ca, io_timeout=10)
    done, release = threading.Event(), threading.Event()
    with socket.create_server(("127.0.0.1", 0)) as lsock:
        def serve() -> None:
            conn, _ = lsock.accept()
            with ctx.wrap_socket(conn, server_side=True) as s:
                s.do_handshake()  # deferred by the context: done here, as the association's thread does
                done.set()
                release.wait(10)

        server = threading.Thread(target=serve, daemon=True)
        server.start()
        client_ctx = tls.client_context_from(pki.client_cert, pki.client_key, pki.ca)
        with client_ctx.wrap_socket(socket.create_connection(lsock.getsockname(), timeout=10),
                                    server_hostname="127.0.0.1") as client:
            assert client.version() == "TLSv1.3"  # tickets come after the handshake in TLS 1.3 only
            assert done.wait(10)
            readable, _, _ = select.select([client], [], [], 0.5)
            assert not readable and not client.pending(), "the server sent something before the client spoke"
            release.set()
        server.join(10)


def _in_ssl_read(thread: threading.Thread) -> bool:
    """Whether ``thread`` is inside an SSL read (the handshake, or a record), by its Python stack."""
    frame = sys._current_frames().get(thread.ident or -1)
    return frame is not None and frame.f_code.co_filename == ssl.__file__ and frame.f_code.co_name == "read"


def _settled(server, peers: list[socket.socket]) -> bool:
    """Each connection is an association waiting for its A-ASSOCIATE-RQ, and the DUL reader of
    each one that sent bytes sits in its blocking SSL read (the silent one's never reads)."""
    assocs = {a.dul.socket.socket.getpeername(): a for a in server.active_associations
              if a.dul.socket is not None and a.dul.socket.socket is not None}
    mine = [assocs.get(p.getsockname()) for p in peers]
    if None in mine:
        return False
    frames = sys._current_frames()
    waiting = all(frames.get(a.ident) is not None and frames[a.ident].f_code.co_name == "wait" for a in mine)
    return waiting and all(_in_ssl_read(a.dul) for a in mine[1:])


# Every timeout of the receiver, far beyond this test's own: a stop that waited for one of them
# instead of ending the connections would be cut by the test's timeout.
RECEIVER_IO_TIMEOUT = 600.0


@pytest.mark.timeout(60)
def test_move_receiver_stops_promptly_with_connections_stuck_in_tls(tmp_path, pki):
    """`fetch --listen --listen-tls` must exit once the C-MOVE is over, whatever its receiver's
    connections are doing. pynetdicom's DUL reader is not a daemon thread and shutting the server
    down leaves accepted connections alone: one stuck reading (mid-handshake, or waiting for an
    A-ASSOCIATE-RQ) kept the process alive for the socket timeout after it printed its result."""
    ctx = tls.server_context_from(pki.server_cert, pki.server_key, pki.ca, io_timeout=RECEIVER_IO_TIMEOUT)
    options = scu.Options(acse_timeout=RECEIVER_IO_TIMEOUT, network_timeout=RECEIVER_IO_TIMEOUT)
    before = set(threading.enumerate())
    server = start_receiver("RECEIVER", ("127.0.0.1", 0), Receiver(tmp_path), options, ctx)
    address = server.server_address[:2]
    peers = [
        socket.create_connection(address, timeout=10),  # connects, says nothing
        socket.create_connection(address, timeout=10),  # starts a TLS record, never finishes it
        # A full TLS handshake, then no A-ASSOCIATE-RQ: the receiver blocks in SSL_read.
        tls.client_context_from(pki.client_cert, pki.client_key, pki.ca).wrap_socket(
            socket.create_connection(address, timeout=10), server_hostname="127.0.0.1"),
    ]
    try:
        peers[1].sendall(b"\x16\x03\x01")
        # The state to stop in, "each blocked in its read", has no event: poll it, generously.
        deadline = time.monotonic() + 30
        while not _settled(server, peers):
            assert time.monotonic() < deadline, "the receiver's connections never settled into their reads"
            time.sleep(0.01)
        compat_client.stop_server(server, grace=0.5)
        left = [t for t in threading.enumerate() if t not in before and t.is_alive()]
        assert not left, left
    finally:
        for peer in peers:
            peer.close()


# --------------------------------------------------------------------------- the CLI against a TLS node


@pytest.mark.timeout(180)
def test_cli_against_a_tls_node_from_the_configuration(tmp_path, pki):
    """The node's port speaks TLS only and requires client certificates. The operator's
    configuration names it as a [[peers]] entry with tls = true: echo, store, find and fetch
    (C-GET, and C-MOVE to a TLS receiver started by fetch --listen --listen-tls) need no option."""
    receiver_port = free_port()
    node_tls = {"enabled": True, "certificate": str(pki.server_cert), "private_key": str(pki.server_key),
                "ca_certificates": str(pki.ca), "require_client_certificate": True}
    # The node calls the --listen receiver by TLS: it verifies the receiver's certificate (the
    # server's, naming 127.0.0.1) and presents its own.
    receiver = {"ae_title": "RECEIVER", "host": "127.0.0.1", "port": receiver_port, "tls": True}
    with node_process(tmp_path / "node", peers=[receiver], storage={"fsync": False},
                      extra={"tls": node_tls}) as node:
        client_cfg = write_config(tmp_path / "client.toml", {
            "node": {"ae_title": "OPERATOR"},
            "storage": {"data_dir": str(tmp_path / "client-data")},
            "tls": {"certificate": str(pki.client_cert), "private_key": str(pki.client_key),
                    "ca_certificates": str(pki.ca)},
        }, [{"ae_title": node.ae_title, "host": "127.0.0.1", "port": node.port, "tls": True}])
        res = modelnode("echo", "--to", node.ae_title, config=client_cfg)
        assert res.returncode == 0 and "C-ECHO success" in res.stdout, res.stderr + node.log()[-3000:]
        res = modelnode("store", str(CT_SMALL), "--to", node.ae_title, config=client_cfg)
        assert res.returncode == 0 and "stored 1 of 1" in res.stdout, res.stderr
        ds = pydicom.dcmread(CT_SMALL, stop_before_pixels=True)
        res = modelnode("find", "--to", node.ae_title, "--level", "STUDY", "-k", f"StudyInstanceUID={ds.StudyInstanceUID}",
                        "-k", "ModalitiesInStudy", "--json", config=client_cfg)
        assert res.returncode == 0 and '"ModalitiesInStudy": "CT"' in res.stdout, res.stderr
        # C-GET: the instance comes back on the TLS association, byte for byte.
        out = tmp_path / "got"
        res = modelnode("fetch", str(ds.SOPInstanceUID), "--to", node.ae_title, "--get", "-o", str(out),
                        config=client_cfg)
        assert res.returncode == 0 and "1 completed" in res.stdout, res.stderr
        assert body(received(out, str(ds.SOPInstanceUID))) == body(CT_SMALL)
        # The same node by address and options only, no configuration.
        to = f"{node.ae_title}@127.0.0.1:{node.port}"
        res = modelnode("find", "--to", to, "--level", "STUDY", "-k", f"StudyInstanceUID={ds.StudyInstanceUID}",
                        *client_flags(pki))
        assert res.returncode == 0 and "1 match(es)" in res.stderr, res.stderr
        # Without a client certificate the node refuses the handshake: final, and says so.
        res = modelnode("echo", "--to", to, *client_flags(pki, cert=False))
        assert res.returncode == 6 and "TLS handshake with" in res.stderr and "retrying" not in res.stderr, res.stderr
        # C-MOVE to our own receiver over TLS. Our certificate both ways: the server's (it is
        # valid for client and server use and names 127.0.0.1).
        out = tmp_path / "moved"
        res = modelnode("fetch", str(ds.SOPInstanceUID), "--to", to, "--move-to", "RECEIVER", "--listen",
                        str(receiver_port), "--listen-address", "127.0.0.1", "--listen-tls", "-o", str(out), "--tls",
                        "--tls-ca", str(pki.ca), "--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key))
        assert res.returncode == 0 and "1 completed" in res.stdout, res.stderr + node.log()[-3000:]
        assert body(received(out, str(ds.SOPInstanceUID))) == body(CT_SMALL)


# --------------------------------------------------------------------------- the outbox exporter


def exporter_config(tmp_path: Path, pki: Pki, port: int, *, peer_tls: bool = True) -> object:
    """The node's configuration with a PACS peer: tls = true, the node's own certificate (the
    server's: valid for client use) presented to it, the test CA to verify it."""
    return parse_config({
        "node": {"ae_title": "MODELNODE"},
        "storage": {"data_dir": str(tmp_path / "data"), "fsync": False},
        "tls": {"certificate": str(pki.server_cert), "private_key": str(pki.server_key),
                "ca_certificates": str(pki.ca)},
        "peers": [{"ae_title": "PACS", "host": "127.0.0.1", "port": port, "tls": peer_tls},
                  {"ae_title": "PLAIN", "host": "127.0.0.1", "port": port}],
    })


@pytest.mark.timeout(60)
def test_export_options_carry_tls_for_a_tls_peer(tmp_path, pki):
    with storescp(tmp_path, pki, "-rc") as scp:
        cfg = exporter_config(tmp_path, pki, scp.port)
        options = outbox.export_options(cfg, "PACS")
        assert options.tls is not None and options.calling_ae == "MODELNODE" and options.retry.attempts == 1
        assert outbox.export_options(cfg, "PLAIN").tls is None
        [result] = scu.store([CT_SMALL], scu.Address("PACS", "127.0.0.1", scp.port), options)
        assert result.status == 0, result.error
        uid = str(pydicom.dcmread(CT_SMALL, stop_before_pixels=True).SOPInstanceUID)
        assert body(received(scp.out, uid)) == body(CT_SMALL)


@pytest.mark.timeout(90)
def test_exporter_delivers_to_a_tls_peer(tmp_path, pki):
    """The outbox exporter (Pipeline.export_due) sends a queued result to a tls = true peer."""
    from node.app import open_app
    from node.context import NodeContext
    from node.pipeline.worker import Pipeline

    with storescp(tmp_path, pki, "-rc") as scp:
        app = open_app(exporter_config(tmp_path, pki, scp.port))
        try:
            stored = app.store.put_file(CT_SMALL)
            uid = str(pydicom.dcmread(CT_SMALL, stop_before_pixels=True).SOPInstanceUID)
            item = outbox.enqueue(None, uid, stored.digest, "PACS")
            assert Pipeline(NodeContext(app)).export_due() == 1
            row = outbox.OutboxItem.get_by_id(item.id)
            assert row.state == "sent", row.last_error
        finally:
            app.close()
        assert body(received(scp.out, uid)) == body(CT_SMALL)
