"""node.ops.metrics: the dedicated registry, served over HTTP on loopback and parsed back."""

from __future__ import annotations

import urllib.request
from collections.abc import Iterator

import pytest

from node.ops import metrics


@pytest.fixture
def server() -> Iterator[metrics.MetricsServer]:
    srv = metrics.start_metrics_server(0, "127.0.0.1")
    yield srv
    srv.stop()
    metrics.set_state_sources()


def value(samples: dict, name: str, **labels: str) -> float | None:
    for got, v in samples.get(name, []):
        if all(got.get(k) == want for k, want in labels.items()):
            return v
    return None


@pytest.mark.timeout(30)
def test_endpoint_serves_every_documented_series(server):
    before = metrics.REGISTRY.get_sample_value("modelnode_instances_received_total", {"kind": "image"}) or 0
    metrics.INSTANCES_RECEIVED.labels("image").inc(3)
    metrics.BYTES_RECEIVED.inc(4096)
    metrics.ASSOCIATIONS.labels("rejected").inc()
    metrics.SELECTIONS.labels("no_model").inc()
    metrics.STORE_REFUSED.labels("disk").inc()
    metrics.INFERENCE_SECONDS.observe(1.7)
    metrics.EXPORT_SECONDS.observe(0.02)
    metrics.set_state_sources(jobs=lambda: {"pending": 2, "done": 5}, outbox=lambda: {"queued": 1, "dead": 0},
                              associations=lambda: 3,
                              disk=lambda: {"used_percent": 42.5, "free_bytes": 1e9, "accepting": 1.0})
    url = f"http://127.0.0.1:{server.port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as resp:  # noqa: S310
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain")
    s = metrics.scrape(url)
    assert value(s, "modelnode_instances_received_total", kind="image") == before + 3
    assert value(s, "modelnode_instances_received_total", kind="model") is not None
    assert value(s, "modelnode_bytes_received_total") >= 4096
    for result in ("accepted", "rejected", "aborted", "released"):
        assert value(s, "modelnode_associations_total", result=result) is not None
    assert value(s, "modelnode_selection_total", outcome="no_model") >= 1
    assert value(s, "modelnode_store_refused_total", reason="disk") >= 1
    assert value(s, "modelnode_inference_seconds_count") >= 1
    assert value(s, "modelnode_inference_seconds_bucket", le="2.5") >= 1
    assert value(s, "modelnode_export_seconds_count") >= 1
    assert value(s, "modelnode_jobs", state="pending") == 2 and value(s, "modelnode_jobs", state="done") == 5
    assert value(s, "modelnode_outbox_backlog", state="queued") == 1
    assert value(s, "modelnode_database_up") == 1
    assert value(s, "modelnode_associations_active") == 3
    assert value(s, "modelnode_disk_used_percent") == 42.5
    assert value(s, "modelnode_store_accepting") == 1
    # Only ours: the dedicated registry carries no process or platform collectors.
    assert not any(name.startswith(("process_", "python_")) for name in s)


@pytest.mark.timeout(30)
def test_a_failing_database_does_not_fail_the_scrape(server):
    def broken() -> dict[str, int]:
        raise RuntimeError("database is locked")

    metrics.set_state_sources(jobs=broken, outbox=lambda: {"queued": 0})
    s = metrics.scrape(f"http://127.0.0.1:{server.port}/metrics")
    assert value(s, "modelnode_database_up") == 0
    assert "modelnode_jobs" not in s
    assert value(s, "modelnode_outbox_backlog", state="queued") == 0


@pytest.mark.timeout(30)
def test_state_from_the_node_database(server, app):
    from node.pipeline import jobs

    jobs.Job.create(group_key="1.2.3", group_by="series", study_uid="1.2", state="failed")
    metrics.set_state_sources(database=True)
    s = metrics.scrape(f"http://127.0.0.1:{server.port}/metrics")
    assert value(s, "modelnode_jobs", state="failed") == 1
    assert value(s, "modelnode_jobs", state="pending") == 0
    assert value(s, "modelnode_outbox_backlog", state="dead") == 0
    assert value(s, "modelnode_database_up") == 1


@pytest.mark.timeout(30)
def test_refusal_reasons_are_bounded():
    assert metrics.refusal_reason(0xA700) == "out-of-resources"
    assert metrics.refusal_reason(0xA7FF) == "out-of-resources"
    assert metrics.refusal_reason(0x0124) == "not-authorized"
    assert metrics.refusal_reason(0xA900) == "invalid"
    assert metrics.refusal_reason(0xC100) == "model-refused"
    assert metrics.refusal_reason(0xC211) == "failure"


@pytest.mark.timeout(30)
def test_listens_on_loopback_only_by_default(server):
    assert server._server.server_address[0] == "127.0.0.1"
