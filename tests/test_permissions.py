"""node.security.guard: allow-list, per-peer permissions and what a caller sees when refused."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from peers import require, run
from pydicom.data import get_testdata_file
from pynetdicom import AE, _config, evt
from pynetdicom.sop_class import (
    CTImageStorage,
    RawDataStorage,
    StudyRootQueryRetrieveInformationModelFind,
    Verification,
)

from node.config import parse_config
from node.dimse.status import NOT_AUTHORIZED
from node.ops.audit import AuditLog
from node.security.diskguard import DiskGuard
from node.security.guard import Security
from node.security.policy import allowed, host_matches, permissions_for

ALL = ["echo", "store-images", "store-models", "query", "retrieve"]


def cfg_with(peers: list[dict], allow_list: bool = True, default: list[str] | None = None, tmp: Path | None = None):
    data: dict = {"node": {"allow_list": allow_list}, "peers": peers}
    if default is not None:
        data["security"] = {"default_permissions": default}
    if tmp is not None:
        data["storage"] = {"data_dir": str(tmp)}
    return parse_config(data)


# --------------------------------------------------------------------------- decisions


@pytest.mark.timeout(30)
def test_host_matching():
    assert host_matches("10.0.0.5", "10.0.0.5")
    assert not host_matches("10.0.0.5", "10.0.0.6")
    assert host_matches("10.0.0.0/24", "10.0.0.77")
    assert not host_matches("10.0.0.0/24", "10.0.1.1")
    assert host_matches("*", "192.0.2.1") and host_matches("", "192.0.2.1")
    assert host_matches("127.0.0.1", "::ffff:127.0.0.1")  # IPv4 on a dual-stack socket
    assert host_matches("pacs.example", "10.1.1.1", resolve=lambda name: frozenset({"10.1.1.1"}))
    assert not host_matches("pacs.example", "10.1.1.2", resolve=lambda name: frozenset({"10.1.1.1"}))
    assert not host_matches("does-not-resolve.invalid", "10.1.1.1", resolve=lambda name: frozenset())
    assert host_matches("localhost", "127.0.0.1")  # the real resolver


@pytest.mark.timeout(30)
def test_allow_list_and_permissions():
    cfg = cfg_with([{"ae_title": "PACS", "host": "10.0.0.5", "port": 104, "permissions": ["store-images", "echo"]},
                    {"ae_title": "WS", "host": "10.0.1.0/24", "port": 104, "permissions": ["query", "retrieve"]}])
    assert allowed(cfg, "PACS", "10.0.0.5", "store-images") == (True, "")
    ok, reason = allowed(cfg, "PACS", "10.0.0.5", "store-models")
    assert not ok and "may not store-models" in reason
    ok, reason = allowed(cfg, "PACS", "10.9.9.9", "echo")
    assert not ok and "known at 10.0.0.5" in reason
    ok, reason = allowed(cfg, "STRANGER", "10.0.0.5", "echo")
    assert not ok and "not a known peer" in reason
    assert permissions_for(cfg, "WS", "10.0.1.8").permissions == frozenset({"query", "retrieve"})
    with pytest.raises(ValueError):
        allowed(cfg, "PACS", "10.0.0.5", "delete")


@pytest.mark.timeout(30)
def test_without_allow_list_unknown_callers_get_the_defaults():
    cfg = cfg_with([{"ae_title": "PACS", "host": "10.0.0.5", "port": 104, "permissions": ALL}],
                   allow_list=False, default=["echo", "store-images"])
    assert permissions_for(cfg, "ANYONE", "192.0.2.1").permissions == frozenset({"echo", "store-images"})
    # A known AE title from the wrong host is not that peer.
    assert permissions_for(cfg, "PACS", "192.0.2.1").permissions == frozenset({"echo", "store-images"})
    assert permissions_for(cfg, "PACS", "10.0.0.5").permissions == frozenset(ALL)


@pytest.mark.timeout(30)
def test_no_permissions_is_a_rejection():
    cfg = cfg_with([{"ae_title": "MUTE", "host": "*", "port": 104, "permissions": []}])
    d = permissions_for(cfg, "MUTE", "10.0.0.1")
    assert not d.ok and "no permissions" in d.reason


# --------------------------------------------------------------------------- over the network


class Scp:
    def __init__(self, cfg, tmp: Path) -> None:
        self.stored: list[str] = []
        self.ae = AE("MODELNODE")
        for cx in (Verification, CTImageStorage, RawDataStorage, StudyRootQueryRetrieveInformationModelFind):
            self.ae.add_supported_context(cx)
        self.audit = AuditLog(tmp / "audit.jsonl")
        self.security = Security(cfg, audit=self.audit, diskguard=DiskGuard(tmp))
        handlers = [(evt.EVT_C_ECHO, lambda e: 0), (evt.EVT_C_STORE, self._store), (evt.EVT_C_FIND, self._find)]
        self.server = self.ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=self.security.wrap(handlers))
        self.port = self.server.server_address[1]

    def _store(self, event) -> int:
        self.stored.append(str(event.request.AffectedSOPInstanceUID))
        return 0

    def _find(self, event):
        yield 0x0000, None

    def events(self, kind: str) -> list[dict]:
        path = self.audit.path
        rows = [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []
        return [r for r in rows if r["event"] == kind]

    def stop(self) -> None:
        self.ae.shutdown()
        self.audit.close()


@pytest.fixture
def scp(tmp_path, monkeypatch) -> Iterator[Scp]:
    # As in the node: datasets arrive as files, which is what lets the guard look at a Raw Data header.
    monkeypatch.setattr(_config, "STORE_RECV_CHUNKED_DATASET", True)
    peers = [
        {"ae_title": "ECHOSCU", "host": "127.0.0.1", "port": 104, "permissions": ["echo"]},
        {"ae_title": "SCANNER", "host": "127.0.0.1", "port": 104, "permissions": ["echo", "store-images"]},
        {"ae_title": "PUBLISHER", "host": "127.0.0.1", "port": 104, "permissions": ["store-models"]},
        {"ae_title": "ELSEWHERE", "host": "192.0.2.7", "port": 104},
    ]
    s = Scp(cfg_with(peers, tmp=tmp_path), tmp_path)
    yield s
    s.stop()


def tool(name: str, aet: str, port: int, *args: str) -> object:
    return run([require(name), "-to", "10", "-ta", "10", "-aet", aet, "-aec", "MODELNODE", "127.0.0.1", str(port),
                *args], timeout=60, check=False)


@pytest.mark.timeout(60)
def test_unknown_ae_title_is_rejected_and_audited(scp):
    res = tool("echoscu", "STRANGER", scp.port)
    assert res.returncode != 0 and "Association Rejected" in res.stdout + res.stderr
    res = tool("echoscu", "ELSEWHERE", scp.port)  # known, but bound to another address
    assert res.returncode != 0
    reasons = [(e["calling_ae"], e["reason"]) for e in scp.events("association-rejected")]
    assert reasons == [("STRANGER", "calling AE 'STRANGER' is not a known peer"),
                       ("ELSEWHERE", "calling AE 'ELSEWHERE' is known at 192.0.2.7, not 127.0.0.1")]
    assert tool("echoscu", "ECHOSCU", scp.port).returncode == 0
    (accepted,) = scp.events("association-accepted")
    assert accepted["calling_ae"] == "ECHOSCU" and accepted["permissions"] == ["echo"]


@pytest.mark.timeout(60)
def test_services_a_peer_may_not_use_are_not_negotiated(scp):
    res = tool("findscu", "SCANNER", scp.port, "-S", "-k", "QueryRetrieveLevel=STUDY", "-k", "StudyInstanceUID")
    assert res.returncode != 0  # no acceptable presentation context for Study Root FIND
    assert tool("echoscu", "PUBLISHER", scp.port).returncode != 0  # may store models, not echo
    ct = get_testdata_file("CT_small.dcm")
    assert tool("storescu", "ECHOSCU", scp.port, ct).returncode != 0  # echo only: no storage contexts
    assert scp.stored == []
    assert tool("storescu", "SCANNER", scp.port, ct).returncode == 0
    assert len(scp.stored) == 1


@pytest.mark.timeout(120)
def test_models_and_images_are_told_apart(scp, tmp_path):
    from cards import segmentation_card_dict
    from onnx_factory import segmentation_model

    from iods import model_object
    from iods.card import parse_card

    onnx_path = tmp_path / "m.onnx"
    onnx_path.write_bytes(segmentation_model())
    model = tmp_path / "model.dcm"
    model_object.pack_file(onnx_path, parse_card(segmentation_card_dict()), model)
    ct = get_testdata_file("CT_small.dcm")

    def store(aet: str, path: Path | str) -> int | None:
        ae = AE(aet)
        ae.add_requested_context(RawDataStorage, "1.2.840.10008.1.2.1")
        # The file's own syntax: once node.scu.send.send_file has run (in earlier tests of the
        # session), pynetdicom sends files as stored and does not convert them to the accepted syntax.
        ae.add_requested_context(CTImageStorage, "1.2.840.10008.1.2.1")
        assoc = ae.associate("127.0.0.1", scp.port, ae_title="MODELNODE")
        try:
            assert assoc.is_established
            return int(assoc.send_c_store(Path(path)).Status)
        finally:
            assoc.release()

    assert store("SCANNER", model) == NOT_AUTHORIZED  # store-images only
    assert store("PUBLISHER", ct) == NOT_AUTHORIZED  # store-models only
    assert scp.stored == []
    assert store("SCANNER", ct) == 0
    assert store("PUBLISHER", model) == 0
    assert len(scp.stored) == 2
