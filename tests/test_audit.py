"""node.ops.audit: append-only JSON lines, thread-safe, no PHI."""

from __future__ import annotations

import json
import os
import stat
import threading

import pytest

from node.ops import audit
from node.ops.audit import AuditLog


def lines(path) -> list[dict]:
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines()]


@pytest.mark.timeout(30)
def test_record_writes_one_json_line_per_event(tmp_path):
    log = AuditLog(tmp_path / "sub" / "audit.jsonl")
    entry = log.record(audit.MODEL_STORED, calling_ae="PUBLISHER", association="a7", model_uid="1.2.3",
                       study_uids={"1.2.3.5", "1.2.3.4"}, outcome="stored", skipped=None)
    log.close()
    (got,) = lines(tmp_path / "sub" / "audit.jsonl")
    assert got == entry
    assert got["event"] == "model-stored" and got["calling_ae"] == "PUBLISHER" and got["association"] == "a7"
    assert got["ts"].endswith("Z") and "T" in got["ts"]
    assert got["study_uids"] == ["1.2.3.4", "1.2.3.5"]  # sets are written sorted
    assert "skipped" not in got
    assert stat.S_IMODE(os.stat(tmp_path / "sub" / "audit.jsonl").st_mode) & 0o007 == 0


@pytest.mark.timeout(30)
def test_phi_fields_are_never_written(tmp_path):
    log = AuditLog(tmp_path / "audit.jsonl")
    log.record(audit.IMAGES_STORED, PatientName="DOE^JANE", patient_id="12345", PatientBirthDate="19700101",
               study_uids=["1.2"], instances=3)
    text = (tmp_path / "audit.jsonl").read_text()
    assert "DOE" not in text and "12345" not in text and "1970" not in text
    assert json.loads(text)["instances"] == 3


@pytest.mark.timeout(30)
def test_appends_and_never_truncates(tmp_path):
    path = tmp_path / "audit.jsonl"
    path.write_text('{"ts":"old","event":"selection"}\n')
    log = AuditLog(path)
    log.record(audit.SELECTION, outcome="model")
    log.close()
    AuditLog(path).record(audit.RESULT_EXPORTED, outcome="sent")
    assert [e["event"] for e in lines(path)] == ["selection", "selection", "result-exported"]


@pytest.mark.timeout(60)
def test_concurrent_writers_never_interleave(tmp_path):
    path = tmp_path / "audit.jsonl"
    logs = [AuditLog(path), AuditLog(path)]  # two open files, like the node and the CLI

    def write(n: int) -> None:
        for i in range(200):
            logs[n % 2].record(audit.MODEL_RETRIEVED, writer=n, i=i, pad="x" * 500)

    threads = [threading.Thread(target=write, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    got = lines(path)  # every line parses
    assert len(got) == 800
    assert {(e["writer"], e["i"]) for e in got} == {(n, i) for n in range(4) for i in range(200)}


@pytest.mark.timeout(30)
def test_moved_file_is_reopened(tmp_path):
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path, fsync=True)
    log.record(audit.SELECTION, n=1)
    path.rename(tmp_path / "audit.jsonl.1")
    log.record(audit.SELECTION, n=2)
    assert [e["n"] for e in lines(path)] == [2]
    assert [e["n"] for e in lines(tmp_path / "audit.jsonl.1")] == [1]


@pytest.mark.timeout(30)
def test_write_failure_is_counted_not_raised(tmp_path):
    from node.ops import metrics

    before = metrics.REGISTRY.get_sample_value("modelnode_audit_errors_total") or 0
    (tmp_path / "dir").mkdir()
    log = AuditLog(tmp_path / "dir")  # a directory: open() fails
    assert log.record(audit.SELECTION) is None
    assert metrics.REGISTRY.get_sample_value("modelnode_audit_errors_total") == before + 1


@pytest.mark.timeout(30)
def test_disabled_log_writes_nothing(tmp_path):
    log = AuditLog(tmp_path / "audit.jsonl", enabled=False)
    assert log.record(audit.SELECTION) is None
    assert not (tmp_path / "audit.jsonl").exists()


@pytest.mark.timeout(30)
def test_tail_filters_and_skips_garbage(tmp_path):
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path)
    for i in range(10):
        log.record(audit.ASSOCIATION_ACCEPTED if i % 2 else audit.ASSOCIATION_REJECTED, i=i)
    with open(path, "a") as fh:
        fh.write("not json\n")
    got = audit.tail(path, 3, {audit.ASSOCIATION_REJECTED})
    assert [e["i"] for e in got] == [4, 6, 8]
    assert audit.tail(tmp_path / "missing.jsonl") == []


@pytest.mark.timeout(30)
def test_default_path_is_in_the_data_directory(tmp_path):
    from node.config import parse_config

    cfg = parse_config({"storage": {"data_dir": str(tmp_path)}})
    assert cfg.audit_path == tmp_path / "audit.jsonl"
    cfg = parse_config({"audit": {"path": str(tmp_path / "x.jsonl"), "fsync": True}})
    log = AuditLog.from_config(cfg)
    assert log.path == tmp_path / "x.jsonl" and log.fsync
