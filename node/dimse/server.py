"""The DIMSE service: one pynetdicom AE built from the configuration, with every handler bound.

:class:`Node` owns the AE, the node's state (:class:`node.app.App`) and the
:class:`node.context.NodeContext` that each handler receives. ``serve(config)`` is what
``modelnode serve`` runs: it starts the node, waits for SIGTERM/SIGINT and stops it.

Services (see docs/dimse.md for the conformance statement):

* Verification SCP (C-ECHO).
* Storage SCP (C-STORE, :mod:`node.dimse.store_scp`) for every storage SOP class pynetdicom
  knows, the standard's retired ones and, per association, unknown (private) ones
  (:mod:`node.dimse.sop_classes`), in the uncompressed and the common compressed transfer
  syntaxes; the same contexts accept the SCP role so that C-GET sub-operations can come back
  over them.
* Query/Retrieve SCP, Patient and Study Root FIND/MOVE/GET (:mod:`node.dimse.find_scp`,
  :mod:`node.dimse.retrieve_scp`).
* Unified Procedure Step SCP, Push, Pull, Watch, Event and Query (:mod:`node.ups.scp`), with the
  node as Task Performer (:mod:`node.ups.performer`) when ``[ups] perform`` is on.
"""

from __future__ import annotations

import faulthandler
import logging
import signal
import threading
import time
from collections.abc import Callable
from types import FrameType
from typing import Any

from pydicom import config as pydicom_config
from pynetdicom import AE, evt
from pynetdicom.sop_class import (
    PatientRootQueryRetrieveInformationModelFind,
    PatientRootQueryRetrieveInformationModelGet,
    PatientRootQueryRetrieveInformationModelMove,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
    UnifiedProcedureStepEvent,
    UnifiedProcedureStepPull,
    UnifiedProcedureStepPush,
    UnifiedProcedureStepQuery,
    UnifiedProcedureStepWatch,
    Verification,
)

from node.app import App, open_app
from node.config import Config, ConfigError
from node.context import NodeContext
from node.dimse import compat, find_scp, retrieve_scp, sop_classes, syntaxes
from node.dimse import store_scp as store_handler
from node.dimse.association import assoc_id
from node.dimse.compat import contexts
from node.ops import systemd
from node.pipeline import arrivals
from node.storage import receive
from node.storage.db import _redact

log = logging.getLogger("modelnode.server")

FIND_CLASSES = (PatientRootQueryRetrieveInformationModelFind, StudyRootQueryRetrieveInformationModelFind)
MOVE_CLASSES = (PatientRootQueryRetrieveInformationModelMove, StudyRootQueryRetrieveInformationModelMove)
GET_CLASSES = (PatientRootQueryRetrieveInformationModelGet, StudyRootQueryRetrieveInformationModelGet)
UPS_CLASSES = (UnifiedProcedureStepPush, UnifiedProcedureStepPull, UnifiedProcedureStepWatch,
               UnifiedProcedureStepEvent, UnifiedProcedureStepQuery)


def _peer_desc(assoc: Any) -> str:
    rq = assoc.requestor
    calling = rq.ae_title or getattr(rq.primitive, "calling_ae_title", "") or "?"
    return f"{calling.strip()}@{rq.address}:{rq.port}"


class Node:
    """The DIMSE node: build with a configuration, then :meth:`start` and :meth:`stop`."""

    def __init__(self, config: Config, app: App | None = None) -> None:
        self.config = config
        compat.install_server()
        self.app = app or open_app(config)
        self.ctx = NodeContext(self.app)
        self.ae = self._build_ae()
        from node.security.guard import Security

        # Allow-list, user identity, per-peer permissions, disk guard, audit and metrics hooks.
        self.security = Security(config)
        # AI on request (node.ups): the workitems, their subscribers and, from start(), the performer.
        self.ups: Any = None
        self.performer: Any = None
        self.puller: Any = None
        if config.ups.enabled:
            from node.ups.service import UpsService

            self.ups = UpsService(self.ctx, audit=self.security.audit)
        self._servers: list[Any] = []
        self._metrics: Any = None
        self._web: Any = None  # node.web.server.WebServer with [web] enabled
        self._server: Any = None
        self._stopped = threading.Event()
        self.pipeline: Any = None
        self._watchdog: Any = None

    # ------------------------------------------------------------------ AE

    def _build_ae(self) -> AE:
        n = self.config.node
        ae = AE(ae_title=n.ae_title)
        ae.maximum_pdu_size = n.max_pdu
        ae.maximum_associations = n.max_associations
        ae.acse_timeout = n.acse_timeout
        ae.dimse_timeout = n.dimse_timeout
        ae.network_timeout = n.network_timeout
        ae.require_called_aet = n.require_called_ae

        ae.add_supported_context(Verification, syntaxes.QUERY)
        st = self.config.storage
        for sop_class in sop_classes.storage_sop_classes(retired=st.accept_retired_sop_classes):
            sop_classes.serve_as_storage(sop_class)
            # scu_role/scp_role: accept what a C-GET requestor proposes for the sub-operations. When
            # a context proposes several syntaxes the requestor's order decides
            # (compat.contexts.prefer_requestor_syntaxes): the list only says what is acceptable.
            ae.add_supported_context(sop_class, syntaxes.STORAGE, scu_role=True, scp_role=True)

        for sop_class in (*FIND_CLASSES, *MOVE_CLASSES, *GET_CLASSES):
            ae.add_supported_context(sop_class, syntaxes.QUERY)
        if self.config.ups.enabled:
            for sop_class in UPS_CLASSES:
                ae.add_supported_context(sop_class, syntaxes.QUERY)
        # Known to the negotiation, so never taken for unknown: the retired classes when they
        # are off, too (pydicom knows them).
        known = {str(cx.abstract_syntax) for cx in ae.supported_contexts}
        self._unknown = (sop_classes.UnknownStorage(known, syntaxes.STORAGE)
                         if st.accept_unknown_sop_classes else None)
        return ae

    def handlers(self) -> list[tuple[Any, Callable[..., Any], list[Any]]]:
        ctx = self.ctx
        bound: list[tuple[Any, Callable[..., Any], list[Any]]] = [
            (evt.EVT_REQUESTED, self._on_requested, []),
            (evt.EVT_ACCEPTED, self._on_accepted, []),
            (evt.EVT_REJECTED, self._on_rejected, []),
            (evt.EVT_ABORTED, self._on_aborted, []),
            (evt.EVT_RELEASED, self._on_released, []),
            (evt.EVT_C_ECHO, self._on_echo, []),
            (evt.EVT_C_STORE, store_handler.handle_store, [ctx]),
            (evt.EVT_C_FIND, find_scp.handle_find, [ctx, self.ups]),
            (evt.EVT_C_MOVE, retrieve_scp.handle_move, [ctx]),
            (evt.EVT_C_GET, retrieve_scp.handle_get, [ctx]),
        ]
        if self.ups is not None:
            from node.ups import scp as ups_scp

            bound += [
                (evt.EVT_N_CREATE, ups_scp.handle_n_create, [self.ups]),
                (evt.EVT_N_ACTION, ups_scp.handle_n_action, [self.ups]),
                (evt.EVT_N_GET, ups_scp.handle_n_get, [self.ups]),
                (evt.EVT_N_SET, ups_scp.handle_n_set, [self.ups]),
            ]
        return bound

    # ------------------------------------------------------------------ association events

    def _on_requested(self, event: evt.Event) -> None:
        """Before negotiation: the allow-list, unknown SOP classes, the requestor's syntax order."""
        # Security.wrap runs the allow-list and permission checks first and calls this only for
        # an association it lets through.
        assoc = event.assoc
        proposed = contexts.proposed_syntaxes(assoc)
        if self._unknown is not None:
            self._unknown.add_contexts(assoc, proposed)
        contexts.prefer_requestor_syntaxes(assoc, proposed)

    def _on_accepted(self, event: evt.Event) -> None:
        assoc = event.assoc
        log.info("[%s] association accepted from %s (%d context(s), max PDU %s)",
                 assoc_id(assoc), _peer_desc(assoc), len(assoc.accepted_contexts), assoc.requestor.maximum_length)

    def _on_rejected(self, event: evt.Event) -> None:
        log.info("[%s] association rejected from %s", assoc_id(event.assoc), _peer_desc(event.assoc))

    def _on_aborted(self, event: evt.Event) -> None:
        assoc = event.assoc
        self._association_ended(assoc)
        # A connection that never sent an A-ASSOCIATE-RQ (a port probe) is not worth an INFO line.
        level = logging.INFO if assoc.requestor.primitive is not None else logging.DEBUG
        log.log(level, "[%s] association aborted with %s", assoc_id(assoc), _peer_desc(assoc))

    def _on_released(self, event: evt.Event) -> None:
        self._association_ended(event.assoc)
        log.info("[%s] association released by %s", assoc_id(event.assoc), _peer_desc(event.assoc))

    def _association_ended(self, assoc: Any) -> None:
        groups = arrivals.association_ended(self.ctx, assoc)
        if self.pipeline is not None and groups:
            self.pipeline.association_ended(groups)

    def _on_echo(self, event: evt.Event) -> int:
        log.debug("[%s] C-ECHO from %s", assoc_id(event.assoc), _peer_desc(event.assoc))
        return 0x0000

    # ------------------------------------------------------------------ life cycle

    def start(self, block: bool = False) -> None:
        """Listen on the configured address; with ``block`` serve until :meth:`stop`."""
        n = self.config.node
        store_handler.prepare(self.ctx)
        from node.ops import metrics
        from node.security import tls

        if self.config.pipeline.enabled:
            from node.pipeline.worker import Pipeline

            # Built before the port opens: that imports ONNX Runtime and highdicom and loads their
            # tables (several hundred ms of CPU under the GIL), which used to run beside the first
            # study received and slowed its C-STOREs by a third. Its threads start once the port
            # is bound, so a node that cannot bind never claims (and spends an attempt of) a job.
            self.pipeline = Pipeline(self.ctx, audit=self.security.audit)
        if self.config.web.enabled:
            # Before the DICOM port opens, like the pipeline: importing the web stack costs
            # 70 ms of CPU under the GIL here, which need not run beside the first C-STOREs.
            from node.web.server import WebBindError, WebServer

            web = WebServer(self.config, self.app, self.ctx.write_lock, self.security.audit)
            try:
                web.start()
                self._web = web
            except WebBindError as exc:
                # The console is a view of the node: a taken port must not stop it receiving studies.
                log.error("%s; serving DICOM without the console", exc.strerror or exc)
        handlers = self.security.wrap(self.handlers())
        for listener in tls.listeners(self.config):
            self._servers.append(self.ae.start_server(listener.address, block=False, ssl_context=listener.ssl_context,
                                                      evt_handlers=handlers))
            log.info("listening as %s on %s:%d (%s)", n.ae_title, listener.address[0],
                     self._servers[-1].server_address[1], listener.scheme)
        self._server = self._servers[0]
        metrics.set_state_sources(database=True, associations=lambda: len(self.ae.active_associations),
                                  disk=self.security.diskguard.state)
        if self.config.metrics.enabled:
            self._metrics = metrics.start_metrics_server(self.config.metrics.port, self.config.metrics.bind)
        if self.pipeline is not None:
            self.pipeline.start()
        self._start_ups()
        # The registry's cards for the selection C-FIND, parsed once now rather than in the
        # first query (0.6 s for 2,000 models; Registry.catalogue).
        threading.Thread(target=self._read_catalogue, name="modelnode-catalogue", daemon=True).start()
        # The port is bound and the database open: tell systemd (no-op outside it).
        systemd.notify(f"READY=1\nSTATUS=serving {n.ae_title} on {n.bind}:{self.port}")
        self._watchdog = systemd.Watchdog()
        self._watchdog.start()
        if block:
            self._stopped.wait()

    def _read_catalogue(self) -> None:
        try:
            self.app.registry.catalogue()
        except Exception as exc:  # noqa: BLE001 (the first selection C-FIND reads it again and reports)
            log.debug("model catalogue not read ahead: %s", exc)
        finally:
            try:
                self.app.db.close()  # (this thread's connection)
            except Exception:  # noqa: BLE001,S110 (stopping meanwhile: nothing to close)
                pass

    def _start_ups(self) -> None:
        """The event sender and, with ``[ups] perform`` and the pipeline on, the Task Performer."""
        if self.ups is None:
            return
        self.ups.events.start()
        if not self.config.ups.perform:
            return
        if self.pipeline is None:
            log.warning("UPS: [ups] perform is on but [pipeline] is disabled: workitems addressed to the node "
                        "stay SCHEDULED")
            return
        from node.ups.performer import Performer

        self.performer = Performer(self.ctx, self.ups, self.pipeline.wake)
        self.performer.start()
        if self.config.ups.pull_from:
            from node.ups.pull import Puller

            self.puller = Puller(self.ctx, self.ups, self.config.ups.pull_from, interval=self.config.ups.pull_seconds)
            self.puller.start()

    @property
    def port(self) -> int:
        """The port actually bound (differs from the configuration when that says 0)."""
        if self._server is None:
            return self.config.node.port
        return self._server.server_address[1]

    def stop(self) -> None:
        """Stop listening, end the associations in progress and close the database."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        log.info("stopping: %d association(s) active", len(self.ae.active_associations))
        systemd.notify("STOPPING=1")
        if self._watchdog is not None:
            self._watchdog.stop()
        for server in self._servers:
            server.shutdown()  # the listening sockets close: new callers are refused
        self._drain(self.config.node.shutdown_timeout)
        self.ae.shutdown()
        if self.puller is not None:
            self.puller.stop(timeout=10)
        if self.performer is not None:
            # A workitem cut short stays IN PROGRESS in the database and is resumed at start.
            self.performer.stop(timeout=10)
        if self.ups is not None:
            self.ups.events.stop(timeout=5)
        if self.pipeline is not None:
            # A job cut short here stays 'running' in the database and is requeued at start.
            self.pipeline.stop(timeout=10)
        if self._metrics is not None:
            self._metrics.stop()
        if self._web is not None:
            self._web.stop()
        self.security.close()
        receive.spares.clear()
        self.app.close()
        log.info("stopped")

    def _drain(self, timeout: float) -> None:
        """Let associations in progress finish for up to ``timeout`` seconds."""
        def busy() -> list[Any]:
            # Established or negotiating; a port probe that never sent A-ASSOCIATE-RQ would
            # otherwise hold the stop for the whole ACSE timeout.
            return [a for a in self.ae.active_associations if a.is_established or a.requestor.primitive is not None]

        deadline = time.monotonic() + timeout
        if busy():
            log.info("draining: %d association(s) in progress, waiting up to %.0f s", len(busy()), timeout)
        while busy() and time.monotonic() < deadline:
            time.sleep(0.05)
        if busy():
            log.warning("shutdown timeout: aborting %d association(s)", len(busy()))


def serve(config: Config) -> int:
    """Run the node until SIGTERM or SIGINT; returns the process exit code."""
    # pynetdicom logs every association and message at INFO; our own lines say what matters.
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    # pydicom checks every value it reads or sets against its VR and only warns (the default,
    # WARN). The node stores what it receives as received and checks itself what it relies on
    # (UIDs, structure, model objects), and pynetdicom builds two command sets per message through
    # those checks: 0.2 s of CPU for 200 C-STOREs, a sixth of the node's work (scripts/bench_ingest).
    # Process-wide, so set here, in the node's own process only.
    pydicom_config.settings.reading_validation_mode = pydicom_config.IGNORE
    pydicom_config.settings.writing_validation_mode = pydicom_config.IGNORE
    from node.security import tls

    problems = tls.validate(config)
    if problems:
        raise ConfigError(problems, config.source)
    node = Node(config)
    if config.models.register_reference:
        from node.storage.registry import register_reference_models

        # Before the port opens: the first study a new node receives finds its models.
        register_reference_models(node.app.registry)
    print(
        f"modelnode: serving {config.node.ae_title} on {config.node.bind}:{config.node.port} "
        f"data {config.data_dir} database {_redact(config.database_url)}",
        flush=True,
    )
    stop_requested = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        log.info("received %s", signal.Signals(signum).name)
        stop_requested.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    # `kill -USR1 <pid>` writes every thread's stack to stderr (the journal under systemd): what
    # a stuck association is waiting for, without stopping the node.
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    try:
        node.start(block=False)
        # Event.wait with a timeout keeps the main thread responsive to signals.
        while not stop_requested.wait(1.0):
            pass
    finally:
        node.stop()
        for s, h in previous.items():
            signal.signal(s, h)
    return 0
