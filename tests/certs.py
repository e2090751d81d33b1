"""Test PKI made with the openssl command line, in a temporary directory, at test time.

Nothing here is a secret worth keeping: every key is generated fresh for one test session and
lives under pytest's tmp_path.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest


@dataclass(frozen=True)
class Pki:
    directory: Path
    ca: Path  # the CA certificate (trust anchor for both sides)
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    rogue_cert: Path  # a client certificate from another CA
    rogue_key: Path


def _openssl(*args: str, cwd: Path) -> None:
    res = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True, timeout=60)
    if res.returncode != 0:
        raise AssertionError(f"openssl {' '.join(args)} failed:\n{res.stderr}")


def _leaf(d: Path, name: str, cn: str, ca: str, ca_key: str, ext: str) -> tuple[Path, Path]:
    (d / f"{name}.ext").write_text(ext)
    _openssl("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={cn}", cwd=d)
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", ca, "-CAkey", ca_key, "-CAcreateserial",
             "-days", "2", "-sha256", "-extfile", f"{name}.ext", "-out", f"{name}.crt", cwd=d)
    return d / f"{name}.crt", d / f"{name}.key"


def _ca(d: Path, name: str) -> None:
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", f"{name}.key", "-out", f"{name}.crt", "-days", "2", "-subj", f"/CN=modelnode test {name}",
             "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
             cwd=d)


def make_pki(directory: Path) -> Pki:
    if shutil.which("openssl") is None:
        pytest.fail("the openssl command line tool is required (Debian package openssl)")
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    _ca(d, "ca")
    _ca(d, "rogue-ca")
    server_ext = ("basicConstraints=CA:FALSE\nkeyUsage=digitalSignature\nextendedKeyUsage=serverAuth,clientAuth\n"
                  "subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    client_ext = "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature\nextendedKeyUsage=clientAuth\n"
    server_cert, server_key = _leaf(d, "server", "localhost", "ca.crt", "ca.key", server_ext)
    client_cert, client_key = _leaf(d, "client", "STORESCU", "ca.crt", "ca.key", client_ext)
    rogue_cert, rogue_key = _leaf(d, "rogue", "ROGUE", "rogue-ca.crt", "rogue-ca.key", client_ext)
    for key in d.glob("*.key"):
        key.chmod(0o600)
    return Pki(d, d / "ca.crt", server_cert, server_key, client_cert, client_key, rogue_cert, rogue_key)
