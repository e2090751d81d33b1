"""config/modelnode.service: systemd accepts it, and it says what docs/install.md promises."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
UNIT = REPO / "config" / "modelnode.service"


def systemd_analyze() -> str:
    exe = shutil.which("systemd-analyze")
    if exe is None:
        # Debian's systemd package brings it; installing is allowed where the tests run as root.
        res = subprocess.run(["apt-get", "install", "-y", "--no-install-recommends", "systemd"],
                             capture_output=True, text=True, timeout=600)
        exe = shutil.which("systemd-analyze")
        if exe is None:
            pytest.skip(f"systemd-analyze is not installed and apt-get could not install it: {res.stderr[-300:]}")
    return exe


def local_unit(tmp_path: Path) -> Path:
    """The unit with /opt/modelnode/.venv pointing at this checkout's venv: verify checks that
    ExecStart's binary exists."""
    venv_bin = Path(sys.executable).parent
    assert (venv_bin / "modelnode").exists(), "the package must be installed in the venv running the tests"
    text = UNIT.read_text().replace("/opt/modelnode/.venv/bin", str(venv_bin))
    out = tmp_path / "modelnode.service"
    out.write_text(text)
    return out


def directives(text: str) -> dict[str, list[str]]:
    # Not configparser: systemd repeats keys (Environment=, DeviceAllow=) and an empty value resets.
    values: dict[str, list[str]] = {}
    section = ""
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        values.setdefault(f"{section}.{key.strip()}", []).append(value.strip())
    return values


@pytest.mark.timeout(900)
def test_systemd_analyze_verify(tmp_path):
    exe = systemd_analyze()
    unit = local_unit(tmp_path)
    res = subprocess.run([exe, "verify", str(unit)], capture_output=True, text=True, timeout=120)
    # verify exits 0 even for an unknown directive; it only warns. Any line naming the unit fails.
    complaints = [line for line in (res.stdout + res.stderr).splitlines() if "modelnode.service" in line]
    assert res.returncode == 0 and not complaints, res.stdout + res.stderr


@pytest.mark.timeout(900)
def test_systemd_security_exposure_is_low(tmp_path):
    exe = systemd_analyze()
    unit = local_unit(tmp_path)
    res = subprocess.run([exe, "security", "--offline=true", "--no-pager", str(unit)],
                         capture_output=True, text=True, timeout=120)
    m = re.search(r"Overall exposure level for modelnode\.service: ([0-9.]+)", res.stdout + res.stderr)
    if m is None:
        pytest.skip(f"this systemd-analyze has no offline security check: {res.stderr[-200:]}")
    assert float(m.group(1)) <= 2.5, res.stdout


@pytest.mark.timeout(30)
def test_unit_promises():
    d = directives(UNIT.read_text())
    one = {k: v[-1] for k, v in d.items()}
    assert one["Service.Type"] == "notify"
    assert one["Service.NotifyAccess"] == "main"
    assert int(one["Service.WatchdogSec"]) > 0
    assert one["Service.Restart"] == "on-failure"
    assert one["Service.EnvironmentFile"].lstrip("-") == "/etc/default/modelnode"
    assert one["Service.User"] == "modelnode"
    assert one["Service.StateDirectory"] == "modelnode" and one["Service.LogsDirectory"] == "modelnode"
    for key, want in (("ProtectSystem", "strict"), ("NoNewPrivileges", "yes"), ("PrivateTmp", "yes"),
                      ("ProtectHome", "yes")):
        assert one[f"Service.{key}"] == want, key
    # No capability by default; the port-104 drop-in adds exactly CAP_NET_BIND_SERVICE.
    assert one["Service.CapabilityBoundingSet"] == "" and one["Service.AmbientCapabilities"] == ""
    assert "CAP_NET_BIND_SERVICE" in UNIT.read_text()
    assert "config check" in one["Service.ExecStartPre"]
    assert one["Service.ExecStart"].endswith("serve")
    # The node drains for node.shutdown_timeout (30 s default) and then stops its pipeline: systemd
    # must wait longer than that before SIGKILL.
    from node.config import NodeSection

    assert int(one["Service.TimeoutStopSec"]) >= NodeSection().shutdown_timeout + 20
