"""node.ops.logsetup: JSON lines, correlation ids, the PHI guard."""

from __future__ import annotations

import io
import json
import logging
import threading
from collections.abc import Iterator

import pytest
from pydicom.dataset import Dataset
from pydicom.valuerep import PersonName

from node.config import parse_config
from node.ops import logsetup


@pytest.fixture
def capture() -> Iterator[tuple[io.StringIO, callable]]:
    """Install the node's logging on a string buffer; restore the root logger afterwards."""
    root = logging.getLogger()
    saved_handlers, saved_level = list(root.handlers), root.level
    buf = io.StringIO()

    def install(fmt: str = "json", level: str = "INFO", json_switch: bool | None = None) -> None:
        section = parse_config({"logging": {"format": fmt, "level": level}}).logging
        logsetup.configure_logging(section, json=json_switch, stream=buf)

    yield buf, install
    for h in list(root.handlers):
        root.removeHandler(h)
    for h in saved_handlers:
        root.addHandler(h)
    root.setLevel(saved_level)


def records(buf: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in buf.getvalue().splitlines()]


@pytest.mark.timeout(30)
def test_json_lines_parse_with_the_documented_keys(capture):
    buf, install = capture
    install("json")
    log = logging.getLogger("modelnode.test")
    log.info("stored %s", "1.2.3", extra={"sop_instance_uid": "1.2.3", "bytes": 10})
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("failed")
    log.debug("not shown at INFO")
    first, second = records(buf)
    assert first["message"] == "stored 1.2.3" and first["level"] == "INFO" and first["logger"] == "modelnode.test"
    assert first["ts"].endswith("Z") and first["correlation_id"] is None
    assert first["sop_instance_uid"] == "1.2.3" and first["bytes"] == 10
    assert "ValueError: boom" in second["exc"]


@pytest.mark.timeout(30)
def test_cli_switch_overrides_the_configured_format(capture):
    buf, install = capture
    install("text", json_switch=True)
    logging.getLogger("modelnode.test").warning("hello")
    assert records(buf)[0]["message"] == "hello"
    buf.truncate(0), buf.seek(0)
    install("json", json_switch=False)
    logging.getLogger("modelnode.test").warning("hello")
    assert buf.getvalue().rstrip().endswith("WARNING modelnode.test: hello")


@pytest.mark.timeout(30)
def test_correlation_ids_per_context_and_per_thread(capture):
    buf, install = capture
    install("json")
    log = logging.getLogger("modelnode.pipeline")
    with logsetup.correlation("j42"):
        log.info("job started")
        with logsetup.correlation("j43"):
            log.info("nested")
        log.info("job done")
    log.info("outside")

    def association_thread() -> None:
        logsetup.set_correlation("a7")  # what Security.on_requested does, in the association's thread
        log.info("in association")

    t = threading.Thread(target=association_thread)
    t.start()
    t.join()
    log.info("main thread unaffected")

    class FakeAssociation(threading.Thread):  # pynetdicom: the association is the thread
        def run(self) -> None:
            log.info("from the association thread, no context set")

    from node.dimse import association

    fa = FakeAssociation()
    association.state_of(fa).id = "a9"
    fa.start()
    fa.join()
    got = [(r["message"], r["correlation_id"]) for r in records(buf)]
    assert got == [("job started", "j42"), ("nested", "j43"), ("job done", "j42"), ("outside", None),
                   ("in association", "a7"), ("main thread unaffected", None),
                   ("from the association thread, no context set", "a9")]


@pytest.mark.timeout(30)
def test_text_format_shows_the_correlation_id_once(capture):
    buf, install = capture
    install("text")
    log = logging.getLogger("modelnode.server")
    with logsetup.correlation("a3"):
        log.info("[a3] association accepted")
        log.info("C-STORE ok")
    out = buf.getvalue().splitlines()
    assert out[0].endswith("modelnode.server: [a3] association accepted")
    assert out[1].endswith("modelnode.server [a3]: C-STORE ok")


@pytest.mark.timeout(30)
def test_phi_is_redacted_above_debug(capture):
    buf, install = capture
    install("json", level="DEBUG")
    log = logging.getLogger("modelnode.store")
    ds = Dataset()
    ds.PatientName, ds.PatientID = "DOE^JANE", "PID-998877"
    name = PersonName("DOE^JANE")
    log.info("patient %s", name, extra={"PatientID": "PID-998877", "patient_birth_date": "19700101",
                                        "sop_instance_uid": "1.2.3"})
    log.warning("dataset %s", ds)
    log.info("keys %s", {"PatientName": "DOE^JANE", "Modality": "CT"})
    log.debug("debug may show %s", name)
    info, warning, keys, debug = records(buf)
    text = json.dumps([info, warning, keys])
    assert "DOE" not in text and "PID-998877" not in text and "19700101" not in text
    assert info["message"] == "patient <redacted>" and info["PatientID"] == "<redacted>"
    assert info["sop_instance_uid"] == "1.2.3"  # UIDs are not PHI here and stay
    assert warning["message"] == "dataset <Dataset redacted>"
    assert "'Modality': 'CT'" in keys["message"]
    assert debug["message"] == "debug may show DOE^JANE"


@pytest.mark.timeout(30)
def test_configure_twice_does_not_duplicate_lines(capture):
    buf, install = capture
    install("json")
    install("json")
    logging.getLogger("modelnode.test").info("once")
    assert len(records(buf)) == 1


@pytest.mark.timeout(30)
def test_journal_text_has_priority_prefix(monkeypatch):
    handler = logging.StreamHandler(io.StringIO())
    fmt = logsetup.TextFormatter(journal=True)
    record = logging.LogRecord("modelnode.x", logging.ERROR, __file__, 1, "broken %s", ("disk",), None)
    record.correlation_id = "a1"
    handler.setFormatter(fmt)
    assert fmt.format(record) == "<3>modelnode.x [a1]: broken disk"
