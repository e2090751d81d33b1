"""Real DICOM peers for tests: free loopback ports, Orthanc and dcmtk processes.

Every process is started by the test that needs it and stopped by its own pid.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

ORTHANC = shutil.which("Orthanc") or ("/usr/sbin/Orthanc" if Path("/usr/sbin/Orthanc").exists() else None)
PEER_ENV = {**os.environ, "TCP_NODELAY": "1"}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def require(tool: str) -> str:
    path = shutil.which(tool) or (f"/usr/sbin/{tool}" if Path(f"/usr/sbin/{tool}").exists() else None)
    if path is None:
        pytest.fail(f"{tool} is not installed; scripts/test installs it (dcmtk, orthanc, dicom3tools)")
    return path


def wait_port(port: int, timeout: float = 20.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port} after {timeout}s")


def stop(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


@dataclass
class Orthanc:
    aet: str
    port: int
    http_port: int
    workdir: Path
    proc: subprocess.Popen

    def rest(self, path: str, method: str = "GET", body: bytes | None = None) -> object:
        req = urllib.request.Request(f"http://127.0.0.1:{self.http_port}{path}", data=body, method=method)
        with urllib.request.urlopen(req, timeout=30) as resp:  # noqa: S310 (loopback, test-owned)
            data = resp.read()
        return json.loads(data) if data else None

    def instances(self) -> list[str]:
        return self.rest("/instances")  # type: ignore[return-value]

    def file_of(self, orthanc_id: str) -> bytes:
        req = urllib.request.Request(f"http://127.0.0.1:{self.http_port}/instances/{orthanc_id}/file")
        with urllib.request.urlopen(req, timeout=60) as resp:  # noqa: S310
            return resp.read()


@contextmanager
def orthanc(workdir: Path, modalities: dict[str, tuple[str, str, int]] | None = None,
            aet: str = "ORTHANC", port: int | None = None) -> Iterator[Orthanc]:
    """Start an Orthanc on free loopback ports; ``modalities`` maps a name to (AE, host, port)."""
    binary = ORTHANC or require("Orthanc")
    workdir.mkdir(parents=True, exist_ok=True)
    port, http_port = port or free_port(), free_port()
    cfg = {
        "Name": "modelnode-test",
        "DicomAet": aet,
        "DicomPort": port,
        "HttpPort": http_port,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "StorageDirectory": str(workdir / "storage"),
        "IndexDirectory": str(workdir / "index"),
        "DicomModalities": {k: list(v) for k, v in (modalities or {}).items()},
        "DicomCheckCalledAet": False,
        "UnknownSopClassAccepted": True,
        "DicomAlwaysAllowStore": True,
        "DicomAlwaysAllowFind": True,
        "DicomAlwaysAllowGet": True,
        "DicomAlwaysAllowMove": True,
        "DicomScpTimeout": 30,
        "StableAge": 1,
        "Plugins": [],
        "HttpServerEnabled": True,
        "SaveJobs": False,
    }
    cfg_path = workdir / "orthanc.json"
    cfg_path.write_text(json.dumps(cfg, indent=2))
    log = open(workdir / "orthanc.log", "wb")  # noqa: SIM115 (closed below)
    proc = subprocess.Popen([binary, "--verbose", str(cfg_path)], stdout=log, stderr=subprocess.STDOUT,
                            env=PEER_ENV, cwd=workdir)
    try:
        wait_port(port, 30, proc)
        wait_port(http_port, 30, proc)
        yield Orthanc(aet, port, http_port, workdir, proc)
    finally:
        stop(proc)
        log.close()


def _said(output: str | bytes | None) -> str:
    # TimeoutExpired carries bytes even from a text-mode run.
    return output.decode(errors="replace") if isinstance(output, bytes) else output or ""


def run(cmd: list[str], timeout: float = 60, check: bool = True, **kw) -> subprocess.CompletedProcess:
    """Run a peer tool with TCP_NODELAY set; fail with its output when it fails or hangs."""
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=kw.pop("env", PEER_ENV), **kw)
    except subprocess.TimeoutExpired as exc:
        # subprocess.run has killed it; what it said until then shows where it was stuck.
        raise AssertionError(f"{' '.join(cmd)} still running after {timeout} s, killed\nstdout:\n{_said(exc.stdout)}"
                             f"\nstderr:\n{_said(exc.stderr)}") from exc
    if check and res.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {res.returncode}\nstdout:\n{res.stdout}\nstderr:\n{res.stderr}")
    return res


@contextmanager
def tmpfs(mountpoint: Path, size_mb: int) -> Iterator[Path]:
    """A small tmpfs at ``mountpoint`` for disk-full tests; skips the test where mounting needs root."""
    mountpoint.mkdir(parents=True, exist_ok=True)
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", str(mountpoint)],
                         capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {res.stderr.strip()}")
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", "-l", str(mountpoint)], check=False)
