"""Prometheus metrics: one dedicated registry, served on a local port.

The metrics live in :data:`REGISTRY`, not in prometheus_client's global one, so that importing
a library that registers its own collectors does not change what the node exposes, and tests can
read exact values (``REGISTRY.get_sample_value``).

Counters and histograms are updated where things happen (node.security.guard wraps the DIMSE
handlers; the pipeline and exporter time their work). Gauges that describe state — jobs by
state, outbox backlog, active associations, disk — are computed at scrape time by
:class:`StateCollector` from callables registered with :func:`set_state_sources`, so they are
never stale and cost nothing between scrapes.

Series (all prefixed ``modelnode_``): see docs/operations.md.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

log = logging.getLogger("modelnode.metrics")

REGISTRY = CollectorRegistry(auto_describe=True)

INSTANCES_RECEIVED = Counter("modelnode_instances_received", "Instances stored by C-STORE (success statuses)",
                             ["kind"], registry=REGISTRY)
BYTES_RECEIVED = Counter("modelnode_bytes_received", "Bytes of instances stored by C-STORE", registry=REGISTRY)
ASSOCIATIONS = Counter("modelnode_associations", "Association events by result", ["result"], registry=REGISTRY)
STORE_REFUSED = Counter("modelnode_store_refused", "C-STOREs answered with a failure status, by reason",
                        ["reason"], registry=REGISTRY)
SELECTIONS = Counter("modelnode_selection", "Model selections by outcome", ["outcome"], registry=REGISTRY)
CONTRADICTIONS = Counter("modelnode_selection_contradictions",
                         "Series whose images contradict their header, by the policy applied", ["policy"],
                         registry=REGISTRY)
INFERENCE_SECONDS = Histogram(
    "modelnode_inference_seconds", "Wall time of one model run on one series (pre-processing to result objects)",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600), registry=REGISTRY)
EXPORT_SECONDS = Histogram(
    "modelnode_export_seconds", "Wall time of sending one result object to a destination",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60), registry=REGISTRY)
STORE_SECONDS = Histogram(
    "modelnode_store_seconds", "Handler time of one C-STORE (after the data arrived, until the status)",
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1, 5), registry=REGISTRY)
AUDIT_ERRORS = Counter("modelnode_audit_errors", "Audit events that could not be written", registry=REGISTRY)

# Label values that exist from the start, so a dashboard sees 0 rather than no series.
KINDS = ("image", "model")
ASSOCIATION_RESULTS = ("accepted", "rejected", "aborted", "released")
SELECTION_OUTCOMES = ("model", "no_model", "held")
CONTRADICTION_POLICIES = ("hold", "image", "header", "mark")
REFUSAL_REASONS = ("disk", "not-authorized", "out-of-resources", "duplicate", "invalid", "model-refused", "failure")
for _kind in KINDS:
    INSTANCES_RECEIVED.labels(_kind)
for _result in ASSOCIATION_RESULTS:
    ASSOCIATIONS.labels(_result)
for _outcome in SELECTION_OUTCOMES:
    SELECTIONS.labels(_outcome)
for _policy in CONTRADICTION_POLICIES:
    CONTRADICTIONS.labels(_policy)
for _reason in REFUSAL_REASONS:
    STORE_REFUSED.labels(_reason)


def refusal_reason(status: int) -> str:
    """A bounded label for a C-STORE failure status (a raw status would do, but is less readable)."""
    if status == 0x0124:
        return "not-authorized"
    if status == 0x0111:
        return "duplicate"
    if status >> 8 == 0xA7:
        return "out-of-resources"
    if status in (0x0117, 0x0122) or status >> 8 == 0xA9:
        return "invalid"
    if status == 0xC100:
        return "model-refused"
    return "failure"


# --------------------------------------------------------------------------- state at scrape time


class StateCollector(Collector):
    """Gauges read at scrape time. A source that raises yields no samples and sets
    ``modelnode_database_up`` to 0 (for the database sources), instead of failing the scrape."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.jobs: Callable[[], dict[str, int]] | None = None
        self.outbox: Callable[[], dict[str, int]] | None = None
        self.associations: Callable[[], int] | None = None
        self.disk: Callable[[], dict[str, float]] | None = None

    def describe(self) -> Iterable[Any]:
        return []  # computed metrics: nothing to check for name clashes at registration

    def collect(self) -> Iterable[Any]:
        with self._lock:
            jobs, outbox, assocs, disk = self.jobs, self.outbox, self.associations, self.disk
        if jobs is not None or outbox is not None:
            up = 1
            for name, doc, source in (("modelnode_jobs", "Jobs by state", jobs),
                                      ("modelnode_outbox_backlog", "Outbox items by state", outbox)):
                if source is None:
                    continue
                try:
                    counts = source()
                except Exception as exc:  # a scrape must answer even when the database does not
                    log.warning("metrics: %s unavailable: %s", name, exc)
                    up = 0
                    continue
                family = GaugeMetricFamily(name, doc, labels=["state"])
                for state, n in sorted(counts.items()):
                    family.add_metric([state], n)
                yield family
            yield GaugeMetricFamily("modelnode_database_up", "1 if the database answered this scrape", value=up)
        if assocs is not None:
            try:
                yield GaugeMetricFamily("modelnode_associations_active", "Associations in progress", value=assocs())
            except Exception as exc:
                log.warning("metrics: active associations unavailable: %s", exc)
        if disk is not None:
            try:
                d = disk()
            except Exception as exc:
                log.warning("metrics: disk state unavailable: %s", exc)
            else:
                yield GaugeMetricFamily("modelnode_disk_used_percent", "Use of the data directory's file system",
                                        value=d["used_percent"])
                yield GaugeMetricFamily("modelnode_disk_free_bytes", "Free bytes for the node in its data directory",
                                        value=d["free_bytes"])
                yield GaugeMetricFamily("modelnode_store_accepting",
                                        "1 while C-STORE is accepted, 0 above the disk high-water mark",
                                        value=d["accepting"])


STATE = StateCollector()
REGISTRY.register(STATE)


def _in_connection(fn: Callable[[], dict[str, int]]) -> Callable[[], dict[str, int]]:
    """Run a query in its own connection: each scrape runs on a fresh HTTP server thread, and
    peewee's connections are per thread, so one opened here must be closed here too."""
    def run() -> dict[str, int]:
        from node.storage.db import database_proxy

        with database_proxy.obj.connection_context():
            return fn()
    return run


def set_state_sources(*, jobs: Callable[[], dict[str, int]] | None = None,
                      outbox: Callable[[], dict[str, int]] | None = None,
                      associations: Callable[[], int] | None = None,
                      disk: Callable[[], dict[str, float]] | None = None,
                      database: bool = False) -> None:
    """Register what the scrape-time gauges read. ``database=True`` uses the node's own tables
    (node.pipeline.jobs.counts_by_state, node.pipeline.outbox.backlog) for whichever of jobs/outbox is not given."""
    if database:
        from node.pipeline import jobs as _jobs
        from node.pipeline import outbox as _outbox

        jobs = jobs or _in_connection(_jobs.counts_by_state)
        outbox = outbox or _in_connection(_outbox.backlog)
    with STATE._lock:
        STATE.jobs, STATE.outbox, STATE.associations, STATE.disk = jobs, outbox, associations, disk


class MetricsServer:
    """The HTTP endpoint (any path answers with the exposition; ``/metrics`` by convention)."""

    def __init__(self, server: Any, thread: threading.Thread) -> None:
        self._server, self._thread = server, thread

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)


def start_metrics_server(port: int, bind: str = "127.0.0.1") -> MetricsServer:
    """Serve :data:`REGISTRY` on ``bind:port`` (port 0: any free port, see ``.port``).

    Loopback by default: the endpoint has no authentication, and what it shows (AE traffic,
    queue depth) is for the host's own Prometheus or a reverse proxy that adds TLS and auth.
    """
    server, thread = start_http_server(port, addr=bind, registry=REGISTRY)
    log.info("metrics on http://%s:%d/metrics", bind, server.server_address[1])
    return MetricsServer(server, thread)


def scrape(url: str, timeout: float = 3.0) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Fetch and parse an exposition: {sample name: [(labels, value), ...]} (``modelnode status``)."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 (an http URL we build)
        text = resp.read().decode("utf-8")
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, []).append((dict(sample.labels), sample.value))
    return out
