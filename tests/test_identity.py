"""node.security.identity and its use by node.security.guard.Security: User Identity Negotiation.

dcmtk's storescu sends username and passcode (``-usr``/``-pwd``) to an in-process pynetdicom SCP
whose handlers are wrapped by Security; wrong passcodes, unknown users and missing identities are
rejected and each leaves an audit line.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from peers import require, run
from pydicom.data import get_testdata_file
from pynetdicom import AE, evt
from pynetdicom.pdu_primitives import UserIdentityNegotiation
from pynetdicom.sop_class import CTImageStorage, Verification

from node.config import parse_config
from node.ops.audit import AuditLog
from node.security.diskguard import DiskGuard
from node.security.guard import Security
from node.security.identity import IdentityVerifier, hash_passcode, verify_passcode

FAST = 1000  # PBKDF2 iterations for test users (the default, 600000, costs 0.3 s a check)


def config(tmp_path: Path, required: bool = False, **node: object) -> object:
    users = [
        {"username": "publisher", "passcode_hash": hash_passcode("s3cret pass", iterations=FAST)},
        {"username": "reader", "passcode_hash": hash_passcode("r", iterations=FAST), "permissions": ["echo", "query"]},
    ]
    return parse_config({"storage": {"data_dir": str(tmp_path / "data")}, "node": node, "users": users,
                         "security": {"require_user_identity": required}})


@pytest.mark.timeout(30)
def test_hash_and_verify():
    h = hash_passcode("correct horse", iterations=FAST)
    assert h.startswith("pbkdf2-sha256$1000$") and "correct" not in h
    assert verify_passcode(h, b"correct horse")
    assert not verify_passcode(h, b"correct horsE")
    assert not verify_passcode("sha256$abc", b"x") and not verify_passcode("garbage", b"x")
    assert hash_passcode("x", iterations=FAST) != hash_passcode("x", iterations=FAST)  # salted
    parse_config({"users": [{"username": "u", "passcode_hash": hash_passcode("x")}]})  # the default format validates


@pytest.mark.timeout(30)
def test_verifier_outcomes(tmp_path):
    v = IdentityVerifier(config(tmp_path))
    assert v.verify(None, None, None).ok  # no identity, not required
    ok = v.verify(2, b"publisher", b"s3cret pass")
    assert ok.ok and ok.username == "publisher"
    assert v.verify(2, b"publisher", b"wrong").reason == "wrong passcode"
    assert v.verify(2, b"nobody", b"x").reason == "unknown user"
    assert not v.verify(1, b"publisher", None).ok  # a username alone proves nothing
    assert not v.verify(5, b"a.jwt.token", None).ok
    assert not v.verify(2, b"publisher", b"x" * 5000).ok
    required = IdentityVerifier(config(tmp_path, required=True))
    assert not required.verify(None, None, None).ok


@pytest.mark.timeout(30)
def test_success_is_cached_failures_are_not(tmp_path, monkeypatch):
    from node.security import identity

    # Counted, not timed: the PBKDF2 derivations the verifier runs.
    derived: list[str] = []
    real = identity.verify_passcode

    def counted(stored: str, passcode: bytes) -> bool:
        derived.append(passcode.decode())
        return real(stored, passcode)

    monkeypatch.setattr(identity, "verify_passcode", counted)
    cfg = config(tmp_path)
    cfg.users[0].passcode_hash = hash_passcode("slow", iterations=FAST)
    v = IdentityVerifier(cfg)
    assert v.verify(2, b"publisher", b"slow").ok
    assert v.verify(2, b"publisher", b"slow").ok
    assert derived == ["slow"], "the second success was derived again"
    assert not v.verify(2, b"publisher", b"slow!").ok
    assert not v.verify(2, b"publisher", b"slow!").ok
    assert derived == ["slow", "slow!", "slow!"], "a failure was cached"


@pytest.mark.timeout(30)
def test_passcode_is_never_in_the_configuration_schema(tmp_path):
    from node.config import ConfigError

    with pytest.raises(ConfigError) as info:
        parse_config({"users": [{"username": "u", "passcode": "plain", "passcode_hash": "nope"}]})
    assert {k for k, _ in info.value.problems} == {"users[0].passcode", "users[0].passcode_hash"}
    with pytest.raises(ConfigError) as info:
        parse_config({"security": {"require_user_identity": True}})
    assert info.value.problems[0][0] == "security.require_user_identity"


# --------------------------------------------------------------------------- over the network


class GuardedScp:
    """A pynetdicom SCP whose handlers go through Security, as node.dimse.server's will."""

    def __init__(self, cfg: object, audit_path: Path) -> None:
        self.stored: list[str] = []
        self.ae = AE("MODELNODE")
        self.ae.add_supported_context(Verification)
        self.ae.add_supported_context(CTImageStorage)
        self.audit = AuditLog(audit_path)
        self.security = Security(cfg, audit=self.audit, diskguard=DiskGuard(audit_path.parent))
        handlers = [(evt.EVT_C_ECHO, lambda e: 0x0000), (evt.EVT_C_STORE, self._store)]
        self.server = self.ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=self.security.wrap(handlers))
        self.port = self.server.server_address[1]

    def _store(self, event: object) -> int:
        self.stored.append(str(event.request.AffectedSOPInstanceUID))
        return 0x0000

    def events(self) -> list[dict]:
        try:
            return [json.loads(x) for x in self.audit.path.read_text().splitlines()]
        except FileNotFoundError:
            return []

    def stop(self) -> None:
        self.ae.shutdown()
        self.audit.close()


@pytest.fixture
def scp(tmp_path) -> Iterator[GuardedScp]:
    (tmp_path / "data").mkdir()
    s = GuardedScp(config(tmp_path), tmp_path / "data" / "audit.jsonl")
    yield s
    s.stop()


def storescu(scp: GuardedScp, *identity: str) -> object:
    ct = get_testdata_file("CT_small.dcm")
    return run([require("storescu"), "-to", "10", "-ta", "10", *identity, "-aet", "PUBLISHER", "-aec", "MODELNODE",
                "127.0.0.1", str(scp.port), ct], timeout=60, check=False)


@pytest.mark.timeout(60)
def test_storescu_with_the_right_passcode_is_accepted(scp):
    res = storescu(scp, "-usr", "publisher", "-pwd", "s3cret pass")
    assert res.returncode == 0, res.stderr
    assert len(scp.stored) == 1
    accepted = [e for e in scp.events() if e["event"] == "association-accepted"]
    assert accepted and accepted[0]["user"] == "publisher" and accepted[0]["calling_ae"] == "PUBLISHER"


@pytest.mark.timeout(60)
def test_wrong_passcode_is_rejected_and_audited(scp):
    res = storescu(scp, "-usr", "publisher", "-pwd", "s3cret pasS")
    assert res.returncode != 0
    assert "Association Rejected" in res.stdout + res.stderr
    assert scp.stored == []
    events = scp.events()
    identity = [e for e in events if e["event"] == "identity-rejected"]
    rejected = [e for e in events if e["event"] == "association-rejected"]
    assert identity and identity[0]["user"] == "publisher" and "wrong passcode" in identity[0]["reason"]
    assert rejected and rejected[0]["calling_ae"] == "PUBLISHER" and rejected[0]["address"] == "127.0.0.1"
    assert "s3cret" not in json.dumps(events)  # never the passcode, right or wrong


@pytest.mark.timeout(60)
def test_unknown_user_is_rejected(scp):
    res = storescu(scp, "-usr", "mallory", "-pwd", "x")
    assert res.returncode != 0
    assert [e["reason"] for e in scp.events() if e["event"] == "identity-rejected"] == [
        "user identity refused: unknown user"]


@pytest.mark.timeout(60)
def test_user_permissions_narrow_the_peer_permissions(scp):
    # reader may echo and query, not store: the storage context is not accepted at all.
    res = storescu(scp, "-usr", "reader", "-pwd", "r")
    assert res.returncode != 0
    assert scp.stored == []
    ae = AE("READER")
    ae.add_requested_context(Verification)
    item = UserIdentityNegotiation()
    item.user_identity_type, item.primary_field, item.secondary_field = 2, b"reader", b"r"
    assoc = ae.associate("127.0.0.1", scp.port, ae_title="MODELNODE", ext_neg=[item])
    try:
        assert assoc.is_established and assoc.send_c_echo().Status == 0
    finally:
        assoc.release()


@pytest.mark.timeout(60)
def test_identity_required(tmp_path):
    (tmp_path / "data").mkdir()
    s = GuardedScp(config(tmp_path, required=True), tmp_path / "data" / "audit.jsonl")
    try:
        assert storescu(s).returncode != 0
        assert storescu(s, "-usr", "publisher", "-pwd", "s3cret pass").returncode == 0
        reasons = [e["reason"] for e in s.events() if e["event"] == "identity-rejected"]
        assert reasons == ["user identity refused: no user identity, and security.require_user_identity is on"]
    finally:
        s.stop()
