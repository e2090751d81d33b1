"""The issue 7 building blocks wired around node.server.Node, the way serve() should wire them.

Until node.server does this itself (see the INTEGRATION notes of issue 7), the service tests run
this: the real Node (its AE, its handlers, the real Storage SCP), with node.permissions.Security
wrapping the handlers, node.tls listeners, the metrics endpoint, sd_notify and the graceful
SIGTERM. ``SERVE`` below is the command a test process runs; once serve() is wired, pointing it
at ``modelnode serve`` is the only change the tests need.

    python tests/service_harness.py --config FILE      # like `modelnode --config FILE serve`
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
SERVE = [sys.executable, str(Path(__file__).resolve())]


class ServiceNode:
    """Node + Security + TLS listeners + metrics + systemd notification + graceful stop."""

    def __init__(self, cfg: Any) -> None:
        from node.permissions import Security
        from node.server import Node

        self.cfg = cfg
        self.node = Node(cfg)
        self.security = Security(cfg)
        self.servers: list[Any] = []
        self.metrics: Any = None
        self.watchdog: Any = None

    @property
    def ports(self) -> list[int]:
        return [s.server_address[1] for s in self.servers]

    def start(self) -> None:
        from node import metrics, systemd, tls
        from node import store as store_handler

        node, cfg = self.node, self.cfg
        store_handler.prepare(node.ctx)
        handlers = self.security.wrap(node.handlers())
        for listener in tls.listeners(cfg):
            self.servers.append(node.ae.start_server(listener.address, block=False, ssl_context=listener.ssl_context,
                                                     evt_handlers=handlers))
        metrics.set_state_sources(database=True, associations=lambda: len(node.ae.active_associations),
                                  disk=self.security.diskguard.state)
        if cfg.metrics.enabled:
            self.metrics = metrics.start_metrics_server(cfg.metrics.port, cfg.metrics.bind)
        ports = ", ".join(str(p) for p in self.ports)
        systemd.notify(f"READY=1\nSTATUS=serving {cfg.node.ae_title} on {cfg.node.bind} port(s) {ports}")
        self.watchdog = systemd.Watchdog()
        self.watchdog.start()

    def stop(self, timeout: float | None = None) -> None:
        """Stop accepting; let associations finish for ``timeout`` (node.shutdown_timeout); then
        abort what is left and close the node."""
        from node import systemd

        log = logging.getLogger("modelnode.server")
        timeout = self.cfg.node.shutdown_timeout if timeout is None else timeout
        systemd.notify("STOPPING=1")
        if self.watchdog is not None:
            self.watchdog.stop()
        for server in self.servers:
            server.shutdown()  # closes the listening socket: new connections are refused
        ae = self.node.ae

        def busy() -> list[Any]:
            # Associations doing work: established, or requested and being negotiated. A connection
            # that never sent an A-ASSOCIATE-RQ (a port probe) would otherwise hold the stop for
            # the whole ACSE timeout.
            return [a for a in ae.active_associations if a.is_established or a.requestor.primitive is not None]

        deadline = time.monotonic() + timeout
        if busy():
            log.info("draining: %d association(s) in progress, waiting up to %.0f s", len(busy()), timeout)
        while busy() and time.monotonic() < deadline:
            time.sleep(0.05)
        if busy():
            log.warning("shutdown timeout: aborting %d association(s)", len(busy()))
        self.node.stop()  # aborts what is left, stops the pipeline, closes the database
        if self.metrics is not None:
            self.metrics.stop()
        self.security.close()


def main(argv: list[str] | None = None) -> int:
    from node import logsetup, tls
    from node.config import ConfigError, load_config

    p = argparse.ArgumentParser()
    p.add_argument("--config", required=True)
    p.add_argument("--log-json", action="store_true", default=None)
    args = p.parse_args(argv)
    try:
        cfg = load_config(args.config)
    except ConfigError as exc:
        print(f"modelnode: error: {exc}", file=sys.stderr)
        return 3
    problems = tls.validate(cfg)
    if problems:
        print("modelnode: error: " + "; ".join(f"{k}: {r}" for k, r in problems), file=sys.stderr)
        return 3
    logsetup.configure_logging(cfg.logging, json=args.log_json)
    # As node.server.serve() does (see there why).
    from pydicom import config as pydicom_config

    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    pydicom_config.settings.reading_validation_mode = pydicom_config.IGNORE
    pydicom_config.settings.writing_validation_mode = pydicom_config.IGNORE
    service = ServiceNode(cfg)
    stop = threading.Event()

    def on_signal(signum: int, frame: Any) -> None:
        logging.getLogger("modelnode.server").info("received %s", signal.Signals(signum).name)
        stop.set()

    for s in (signal.SIGTERM, signal.SIGINT):
        signal.signal(s, on_signal)
    service.start()
    print(f"modelnode: serving on port(s) {service.ports}", flush=True)
    while not stop.wait(0.5):
        pass
    service.stop()
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    sys.exit(main())
