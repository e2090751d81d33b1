"""Issue 7 end to end: the node as a service process, with real peers.

* systemd: a NOTIFY_SOCKET receives READY=1 (port bound, database open), WATCHDOG=1, STOPPING=1.
* TLS: dcmtk's echoscu, storescu and findscu ``+tls`` with certificates made for the test; a plain
  connection to the TLS port fails cleanly.
* SIGTERM in the middle of a 200-instance C-STORE: the association completes (or, past the
  shutdown timeout, the peer sees an A-ABORT), the node exits 0, and every acknowledged instance
  is there after a restart.
* A small tmpfs as the data directory: above the high-water mark C-STORE gets 0xA700, and
  storing resumes once space returns.
* The metrics endpoint, ``modelnode status`` and ``modelnode config check`` of a running node.

The process is the real ``modelnode serve`` (tests/node_proc.py), stopped by its pid.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import socket
import sqlite3
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from certs import Pki, make_pki
from node_proc import MODELNODE, REPO, NodeProcess
from peers import free_port, require, run, tmpfs
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE

pytestmark = [pytest.mark.peers, pytest.mark.slow]


# --------------------------------------------------------------------------- the process


class Service(NodeProcess):
    """The node process (tests/node_proc.py) with what these tests read back."""

    def spawn(self, timeout: float = 60) -> None:
        self._spawn(timeout)

    def terminate(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)

    def wait(self, timeout: float = 60) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def stop(self, timeout: float = 60.0) -> int | None:
        # Longer than the default: a stop may wait node.shutdown_timeout for a drain.
        return super().stop(timeout)

    def wait_log(self, text: str, timeout: float = 60) -> None:
        """Until the node's log has a line with ``text`` (a file has no event: polled)."""
        deadline = time.monotonic() + timeout
        while text not in self.log():
            assert time.monotonic() < deadline, f"no {text!r} in the node's log after {timeout} s\n{self.log()[-3000:]}"
            time.sleep(0.05)

    def audit(self, kind: str | None = None) -> list[dict]:
        path = self.data_dir / "audit.jsonl"
        rows = [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []
        return [r for r in rows if kind is None or r["event"] == kind]

    def sop_uids(self) -> set[str]:
        with sqlite3.connect(self.data_dir / "modelnode.db") as db:
            return {r[0] for r in db.execute("SELECT sop_uid FROM instance")}


@contextmanager
def service(workdir: Path, *, node: dict | None = None, storage: dict | None = None, peers: list[dict] | None = None,
            extra: dict[str, dict] | None = None, env: dict[str, str] | None = None,
            data_dir: Path | None = None) -> Iterator[Service]:
    sections = {"pipeline": {"enabled": False}}
    for name, body in (extra or {}).items():
        sections.setdefault(name, {}).update(body)
    svc = Service.start(workdir, node=node, storage=storage, peers=peers, extra=sections, env=env,
                        data_dir=data_dir, timeout=60)
    try:
        yield svc
    finally:
        svc.stop()


def ct(number: int, study: str, series: str, size: int = 64) -> Dataset:
    ds = Dataset()
    uid = generate_uid()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = CTImageStorage, uid
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, uid
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
    ds.PatientID, ds.PatientName, ds.Modality = "SVC001", "SERVICE^TEST", "CT"
    ds.StudyDate, ds.SeriesNumber, ds.InstanceNumber = "20240101", 1, number
    ds.Rows = ds.Columns = size
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.PixelData = struct.pack(f"<{size * size}H", *([number % 65536] * (size * size)))
    return ds


# --------------------------------------------------------------------------- systemd


@pytest.mark.timeout(120)
def test_notify_socket_gets_ready_watchdog_and_stopping(tmp_path):
    sock_path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(sock_path))
    sock.settimeout(60)
    got: list[str] = []
    env = {"NOTIFY_SOCKET": str(sock_path), "WATCHDOG_USEC": "1500000"}  # a ping every 0.5 s
    try:
        with service(tmp_path / "svc", env=env) as svc:
            while not any(m.startswith("READY=1") for m in got):
                got.append(sock.recv(4096).decode())
            # READY=1 means the port is bound and the database open: a C-ECHO works right away.
            run([require("echoscu"), "-aec", "MODELNODE", "127.0.0.1", str(svc.port)], timeout=30)
            while not any(m == "WATCHDOG=1" for m in got):
                got.append(sock.recv(4096).decode())
            svc.terminate()
            assert svc.wait(60) == 0
            while not any(m.startswith("STOPPING=1") for m in got):
                got.append(sock.recv(4096).decode())
    finally:
        sock.close()
    ready = next(m for m in got if m.startswith("READY=1"))
    assert "STATUS=serving MODELNODE" in ready


# --------------------------------------------------------------------------- TLS


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def tls_args(pki: Pki) -> list[str]:
    return ["+tls", str(pki.client_key), str(pki.client_cert), "+cf", str(pki.ca)]


@pytest.mark.timeout(180)
def test_dcmtk_tls_tools_against_the_node(tmp_path, pki):
    tls_section = {"enabled": True, "certificate": str(pki.server_cert), "private_key": str(pki.server_key),
                   "ca_certificates": str(pki.ca), "require_client_certificate": True}
    long_timeouts = {"acse_timeout": 600.0, "network_timeout": 600.0}
    with service(tmp_path / "svc", node=long_timeouts, extra={"tls": tls_section}) as svc:
        port = str(svc.port)
        common = ["-to", "20", "-ta", "20", "-aec", "MODELNODE"]
        run([require("echoscu"), *common, *tls_args(pki), "127.0.0.1", port], timeout=60)
        files = [get_testdata_file("CT_small.dcm"), get_testdata_file("MR_small.dcm")]
        run([require("storescu"), *common, *tls_args(pki), "127.0.0.1", port, *files], timeout=60)
        study = "1.3.6.1.4.1.5962.1.2.1.20040119072730.12322"  # CT_small's
        res = run([require("findscu"), "-v", *common, *tls_args(pki), "-S", "-k", "QueryRetrieveLevel=STUDY",
                   "-k", f"StudyInstanceUID={study}", "-k", "ModalitiesInStudy", "127.0.0.1", port], timeout=60)
        assert res.stdout.count("(Pending)") + res.stderr.count("(Pending)") == 1, res.stdout + res.stderr
        # A plain connection to the TLS port fails cleanly, not by a timeout: echoscu would wait
        # 600 s for an answer and the node (node.*_timeout above) as long, both far beyond run's
        # 60 s. The node carries on.
        plain = run([require("echoscu"), "-to", "20", "-ta", "600", "-aec", "MODELNODE", "127.0.0.1", port],
                    timeout=60, check=False)
        assert plain.returncode != 0, plain.stdout + plain.stderr
        run([require("echoscu"), *common, *tls_args(pki), "127.0.0.1", port], timeout=60)
        accepted = svc.audit("association-accepted")
        assert accepted and all(e["tls"] in ("TLSv1.2", "TLSv1.3") and e["client_cn"] == "STORESCU" for e in accepted)
        assert len(svc.sop_uids()) == 2
        stored = svc.audit("images-stored")
        assert stored and stored[0]["instances"] == 2 and study in stored[0]["study_uids"]
        assert "SERVICE" not in (svc.data_dir / "audit.jsonl").read_text()  # no patient names
        # modelnode status reaches a TLS-only node over TLS.
        report = json.loads(svc.cli("status", "--json").stdout)
        assert report["node_echo"].startswith("answering"), report["node_echo"]


# --------------------------------------------------------------------------- SIGTERM


class Sender(threading.Thread):
    """Sends ``n`` instances (None: until the association ends) on one association, ``delay``
    seconds apart; records which were acknowledged. With ``hold_after`` it stops after that many
    acknowledgements, its association open and idle, until :meth:`resume`."""

    def __init__(self, port: int, n: int | None, delay: float = 0.0, hold_after: int | None = None) -> None:
        super().__init__(daemon=True)
        self.study, self.series = generate_uid(), generate_uid()
        self.port, self.n, self.delay, self.hold_after = port, n, delay, hold_after
        self.acked: list[str] = []
        self.failed: list[tuple[str, int]] = []
        self.outcome = ""
        self._progress = threading.Condition()
        self._done = False
        self._resume = threading.Event()

    def run(self) -> None:
        try:
            self._send()
        finally:
            with self._progress:
                self._done = True
                self._progress.notify_all()

    def _send(self) -> None:
        ae = AE("STORESCU")
        ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
        ae.dimse_timeout = ae.network_timeout = 30
        assoc = ae.associate("127.0.0.1", self.port, ae_title="MODELNODE")
        if not assoc.is_established:
            self.outcome = "not established"
            return
        for number in range(1, self.n + 1) if self.n is not None else itertools.count(1):
            ds = ct(number, self.study, self.series)
            try:
                status = assoc.send_c_store(ds) if assoc.is_established else None
            except RuntimeError:  # ended between the check and the send
                status = None
            if not status:  # no response: the association is gone; see how it ended
                assoc.join(30)  # its thread ends once the abort or release is handled
                self.outcome = "aborted" if assoc.is_aborted else "closed"
                return
            with self._progress:
                if status.Status == 0:
                    self.acked.append(str(ds.SOPInstanceUID))
                else:
                    self.failed.append((str(ds.SOPInstanceUID), int(status.Status)))
                self._progress.notify_all()
            if len(self.acked) == self.hold_after:
                self._resume.wait(120)
            if self.delay:
                time.sleep(self.delay)
        assoc.release()
        self.outcome = "released"

    def wait_for(self, acked: int, timeout: float = 60) -> None:
        with self._progress:
            self._progress.wait_for(lambda: len(self.acked) >= acked or self._done, timeout)
        assert len(self.acked) >= acked, f"only {len(self.acked)} acknowledged ({self.outcome})"

    def resume(self) -> None:
        self._resume.set()


@pytest.mark.timeout(240)
def test_sigterm_during_200_instance_store_lets_it_finish(tmp_path):
    # Timeouts far beyond svc.wait's 120 s: a stop that waited for the drain's timeout, or for a
    # connection that never sends an A-ASSOCIATE-RQ, fails there instead of finishing late.
    node = {"shutdown_timeout": 600.0, "acse_timeout": 600.0}
    with service(tmp_path / "svc", node=node) as svc:
        sender = Sender(svc.port, 200, delay=0.01, hold_after=20)
        sender.start()
        sender.wait_for(20)  # and now holds its association open until resumed
        svc.terminate()
        # The listeners are closed before the drain starts: a new association is refused while
        # the old one (held open) goes on.
        svc.wait_log("draining: 1 association(s) in progress")
        assert run([require("echoscu"), "-to", "5", "-aec", "MODELNODE", "127.0.0.1", str(svc.port)],
                   timeout=30, check=False).returncode != 0
        sender.resume()
        sender.join(120)
        assert svc.wait(120) == 0
        assert sender.outcome == "released" and len(sender.acked) == 200 and not sender.failed
        svc.spawn()  # restart on the same data
        assert set(sender.acked) <= svc.sop_uids()
        assert "aborting" not in svc.log()


@pytest.mark.timeout(240)
def test_sigterm_past_the_shutdown_timeout_aborts_cleanly(tmp_path):
    with service(tmp_path / "svc", node={"shutdown_timeout": 1.0}) as svc:
        # A sender that never finishes by itself: the node can only stop by aborting it (one that
        # waited for the association instead would fail svc.wait below).
        sender = Sender(svc.port, None, delay=0.05)
        sender.start()
        sender.wait_for(20)
        svc.terminate()
        assert svc.wait(60) == 0
        sender.join(60)
        assert sender.outcome == "aborted", sender.outcome
        assert len(sender.acked) >= 20
        assert "shutdown timeout: aborting 1 association(s)" in svc.log()
        svc.spawn()
        assert set(sender.acked) <= svc.sop_uids()
        tmp_dir = svc.data_dir / "tmp"
        tmp_left = [p for p in tmp_dir.glob("*.part") if p.stat().st_size] if tmp_dir.exists() else []
        assert tmp_left == []


# --------------------------------------------------------------------------- disk watermarks


@pytest.fixture
def small_disk(tmp_path) -> Iterator[Path]:
    # 32 MiB, not 8: node.dimse.store_scp preallocates SQLite's WAL at start, which takes about 8 MiB
    # (4 MiB of WAL, checkpointed into the database file as free pages).
    with tmpfs(tmp_path / "disk", 32) as mnt:
        yield mnt


def used_percent(path: Path) -> float:
    st = os.statvfs(path)
    return 100.0 * (st.f_blocks - st.f_bavail) / st.f_blocks


def store_one(port: int, ds: Dataset) -> int:
    ae = AE("STORESCU")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port, ae_title="MODELNODE")
    assert assoc.is_established
    try:
        status = assoc.send_c_store(ds)
        return int(status.Status)
    finally:
        assoc.release()


@pytest.mark.timeout(180)
def test_full_disk_refuses_with_out_of_resources_and_recovers(tmp_path, small_disk):
    storage = {"high_water_percent": 85.0, "low_water_percent": 75.0, "fsync": False}
    with service(tmp_path / "svc", storage=storage, data_dir=small_disk / "data",
                 extra={"metrics": {"enabled": True, "port": free_port()}}) as svc:
        study, series = generate_uid(), generate_uid()
        # Room taken by something else, to just below the high-water mark ...
        start = used_percent(small_disk)
        assert start < 75, f"the node alone uses {start:.0f}% of the 32 MiB"
        filler = small_disk / "filler"
        with open(filler, "wb") as fh:
            while used_percent(small_disk) < 82:
                fh.write(b"\0" * (64 << 10))
                fh.flush()
                os.fsync(fh.fileno())
        # ... then the node's own instances (128 KiB each) cross it, each sent once the guard has
        # read the disk as it is after the one before.
        statuses = []
        for i in range(40):
            guard_reading(svc, small_disk)
            statuses.append(store_one(svc.port, ct(i + 1, study, series, size=256)))
            if statuses[-1] != 0:
                break
        assert statuses[-1] == 0xA700, statuses
        assert statuses[0] == 0
        res = run([require("storescu"), "-v", "-aec", "MODELNODE", "127.0.0.1", str(svc.port),
                   get_testdata_file("CT_small.dcm")], timeout=60, check=False)
        assert res.returncode != 0 and "Refused: OutOfResources" in res.stdout + res.stderr, res.stdout + res.stderr
        # Space comes back (below the low-water mark): storing resumes.
        filler.unlink()
        assert used_percent(small_disk) < 75
        assert guard_reading(svc, small_disk)["modelnode_store_accepting"][0][1] == 1
        assert store_one(svc.port, ct(99, study, series)) == 0
        from node.ops import metrics

        samples = metrics.scrape(f"http://127.0.0.1:{svc_metrics_port(svc)}/metrics")
        refused = {labels["reason"]: v for labels, v in samples["modelnode_store_refused_total"]}
        assert refused["disk"] >= 2
        assert samples["modelnode_store_accepting"][0][1] == 1
        assert "refusing C-STORE" in svc.log() and "accepting C-STORE again" in svc.log()


def guard_reading(svc: Service, disk: Path, timeout: float = 30) -> dict:
    """The node's metrics once its disk guard has read ``disk`` as it is now.

    The guard re-reads statvfs when asked (a C-STORE, a scrape) and its last reading is older than
    its interval (0.5 s); there is no event for a new reading, so the metrics are scraped until
    the free bytes the guard reports are the free bytes the file system has. A C-STORE sent then
    is judged on the disk as it is, however slow the machine.
    """
    from node.ops import metrics

    url = f"http://127.0.0.1:{svc_metrics_port(svc)}/metrics"
    deadline = time.monotonic() + timeout
    while True:
        samples = metrics.scrape(url)
        st = os.statvfs(disk)
        if samples["modelnode_disk_free_bytes"][0][1] == st.f_bavail * st.f_frsize:
            return samples
        assert time.monotonic() < deadline, "the node's disk guard never read the disk as it is"
        time.sleep(0.05)


def svc_metrics_port(svc: Service) -> int:
    import tomllib

    return int(tomllib.loads(svc.config_path.read_text())["metrics"]["port"])


# --------------------------------------------------------------------------- health


@pytest.mark.timeout(180)
def test_metrics_status_and_config_check_of_a_running_node(tmp_path):
    metrics_port = free_port()
    peers = [{"ae_title": "STORESCU", "host": "127.0.0.1", "port": 104},
             {"ae_title": "MODELNODE-STATUS", "host": "127.0.0.1", "port": 104, "permissions": ["echo"]}]
    with service(tmp_path / "svc", node={"allow_list": True}, peers=peers,
                 extra={"metrics": {"enabled": True, "port": metrics_port}}) as svc:
        run([require("storescu"), "-aec", "MODELNODE", "127.0.0.1", str(svc.port), get_testdata_file("CT_small.dcm")],
            timeout=60)
        stranger = run([require("echoscu"), "-aet", "STRANGER", "-aec", "MODELNODE", "127.0.0.1", str(svc.port)],
                       timeout=60, check=False)
        assert stranger.returncode != 0
        from node.ops import metrics

        s = metrics.scrape(f"http://127.0.0.1:{metrics_port}/metrics")
        by = {name: {tuple(sorted(labels.items())): v for labels, v in rows} for name, rows in s.items()}
        assert by["modelnode_instances_received_total"][(("kind", "image"),)] == 1
        assert by["modelnode_bytes_received_total"][()] > 0
        assert by["modelnode_associations_total"][(("result", "accepted"),)] >= 1
        assert by["modelnode_associations_total"][(("result", "rejected"),)] == 1
        assert by["modelnode_jobs"][(("state", "pending"),)] == 0
        assert by["modelnode_database_up"][()] == 1

        status = svc.cli("status", "--json")
        report = json.loads(status.stdout)
        assert report["database"]["ok"]
        assert report["associations"]["accepted"] >= 1 and report["associations"]["rejected"] == 1
        assert report["received"]["image"] == 1
        assert report["disk"]["accepting_store"] is True
        assert report["last_rejections"][-1]["calling_ae"] == "STRANGER"
        assert "not a known peer" in report["last_rejections"][-1]["reason"]
        assert report["node_echo"] == f"answering on 127.0.0.1:{svc.port}"


        check = svc.cli("config", "check")
        assert check.returncode == 0 and "configuration OK" in check.stdout


@pytest.mark.timeout(120)
def test_config_check_cli_names_every_bad_key(tmp_path, pki):
    bad = tmp_path / "bad.toml"
    bad.write_text(
        "[node]\nport = 0\n[tls]\nenabled = true\n"
        f'certificate = "{pki.server_cert}"\nprivate_key = "{pki.client_key}"\n'
        "[storage]\nhigh_water_percent = 50.0\nlow_water_percent = 60.0\n"
        '[[users]]\nusername = "u"\npasscode_hash = "plain"\n'
    )
    env = {k: v for k, v in os.environ.items() if k not in ("MODELNODE_CONFIG", "MODELNODE_DATA_DIR")}
    res = subprocess.run([*MODELNODE, "config", "check", str(bad)], capture_output=True, text=True, timeout=60,
                         cwd=REPO, env=env)
    assert res.returncode == 3
    for key in ("node.port", "storage.low_water_percent", "users[0].passcode_hash"):
        assert f"  {key}: " in res.stderr, res.stderr
    # Once the schema is right, the key that does not match the certificate is named.
    bad.write_text(f'[tls]\nenabled = true\ncertificate = "{pki.server_cert}"\nprivate_key = "{pki.client_key}"\n')
    res = subprocess.run([*MODELNODE, "config", "check", str(bad)], capture_output=True, text=True, timeout=60,
                         cwd=REPO, env=env)
    assert res.returncode == 3 and "  tls.private_key: " in res.stderr, res.stderr
    # And hash-passcode reads the passcode from stdin, never from argv.
    res = subprocess.run([*MODELNODE, "config", "hash-passcode", "--iterations", "1000"], input="pw\n",
                         capture_output=True, text=True, timeout=60, cwd=REPO, env=env)
    from node.security.identity import verify_passcode

    assert res.returncode == 0 and verify_passcode(res.stdout.strip(), b"pw")
