"""The DIMSE service: one pynetdicom AE built from the configuration, with every handler bound.

:class:`Node` owns the AE, the node's state (:class:`node.app.App`) and the
:class:`node.context.NodeContext` that each handler receives. ``serve(config)`` is what
``modelnode serve`` runs: it starts the node, waits for SIGTERM/SIGINT and stops it.

Services (see docs/dimse.md for the conformance statement):

* Verification SCP (C-ECHO).
* Storage SCP (C-STORE, :mod:`node.store`) for every storage SOP class pynetdicom knows, the
  standard's retired ones and, per association, unknown (private) ones (:class:`UnknownStorage`),
  in the uncompressed and the common compressed transfer syntaxes; the same contexts accept the
  SCP role so that C-GET sub-operations can come back over them.
* Query/Retrieve SCP, Patient and Study Root FIND/MOVE/GET (:mod:`node.query`,
  :mod:`node.retrieve`). These modules may not exist yet in a given checkout: the contexts are
  then not offered and the node runs without them.
"""

from __future__ import annotations

import copy
import faulthandler
import importlib
import itertools
import logging
import signal
import threading
import time
from collections.abc import Callable
from types import FrameType
from typing import Any

from pydicom import config as pydicom_config
from pydicom import uid as pdu
from pynetdicom import AE, _config, evt
from pynetdicom.presentation import AllStoragePresentationContexts, PresentationContext
from pynetdicom.service_class import ServiceClass, StorageServiceClass
from pynetdicom.sop_class import (
    PatientRootQueryRetrieveInformationModelFind,
    PatientRootQueryRetrieveInformationModelGet,
    PatientRootQueryRetrieveInformationModelMove,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
    Verification,
    register_uid,
    uid_to_service_class,
)

from node import reactor, store_dimse, systemd
from node import store as store_handler
from node.app import App, open_app
from node.config import Config, ConfigError
from node.context import NodeContext
from node.db import _redact
from node.dimse import compat

log = logging.getLogger("modelnode.server")

# Transfer syntaxes accepted for storage. When a context proposes several, the requestor's
# order decides (_prefer_requestor_syntaxes), so this list only says what is acceptable.
STORAGE_TRANSFER_SYNTAXES: list[str] = [
    pdu.ExplicitVRLittleEndian,
    pdu.ImplicitVRLittleEndian,
    pdu.DeflatedExplicitVRLittleEndian,
    pdu.ExplicitVRBigEndian,
    pdu.JPEGBaseline8Bit,
    pdu.JPEGExtended12Bit,
    pdu.JPEGLossless,
    pdu.JPEGLosslessSV1,
    pdu.JPEGLSLossless,
    pdu.JPEGLSNearLossless,
    pdu.JPEG2000Lossless,
    pdu.JPEG2000,
    pdu.HTJ2KLossless,
    pdu.HTJ2KLosslessRPCL,
    pdu.HTJ2K,
    pdu.RLELossless,
]

QUERY_TRANSFER_SYNTAXES: list[str] = [pdu.ExplicitVRLittleEndian, pdu.ImplicitVRLittleEndian]

FIND_CLASSES = (PatientRootQueryRetrieveInformationModelFind, StudyRootQueryRetrieveInformationModelFind)
MOVE_CLASSES = (PatientRootQueryRetrieveInformationModelMove, StudyRootQueryRetrieveInformationModelMove)
GET_CLASSES = (PatientRootQueryRetrieveInformationModelGet, StudyRootQueryRetrieveInformationModelGet)

_assoc_ids = itertools.count(1)


def _copy_contexts(obj: Any, memo: dict[int, Any] | None = None) -> Any:
    """``copy.deepcopy`` for the one call in ``pynetdicom.transport``: the server's contexts.

    Each new association gets its own copy of the ~180 supported presentation contexts;
    ``deepcopy`` took 31 ms per association for objects whose only mutable part is the list of
    transfer syntaxes (UIDs are immutable strings).
    """
    if isinstance(obj, list) and all(type(cx) is PresentationContext for cx in obj):
        copies = []
        for cx in obj:
            new = copy.copy(cx)
            new._transfer_syntax = list(cx._transfer_syntax)
            copies.append(new)
        return copies
    return copy.deepcopy(obj, memo)


def _tune_pynetdicom() -> None:
    """Process-wide pynetdicom settings for a node (set when a :class:`Node` is built).

    * Datasets go to a temporary file as they arrive, not into memory (a model can be 1 GiB).
    * The DUL and association reactors tuned (:mod:`node.reactor`).
    * C-STORE-RQ decoded and C-STORE-RSP encoded by hand (:mod:`node.store_dimse`).
    * :func:`_copy_contexts` for the per-association copy of the supported contexts.

    Nothing is patched unless the installed pynetdicom is the version these patches were written
    for (:func:`node.dimse.compat.check` raises :class:`~node.dimse.compat.IncompatibleLibrary`).
    """
    from pynetdicom import transport

    compat.check()
    _config.STORE_RECV_CHUNKED_DATASET = True
    reactor.install()
    store_dimse.install()
    transport.deepcopy = _copy_contexts  # type: ignore[attr-defined]


# Storage SOP classes of the standard that pynetdicom 3.0.4 does not list: its list (170) has
# only the current medical ones. pydicom's UID dictionary has these too; Media Storage Directory
# Storage (media only) and Storage Commitment (not storage) are left out, and so are the
# non-patient objects (Hanging Protocol, Color Palette, ...), which pynetdicom serves with other
# service classes and the index cannot hold (no study or series).
# tests/test_storage_classes.py checks the two lists against pydicom's dictionary.
RETIRED_STORAGE_SOP_CLASSES: tuple[str, ...] = (
    "1.2.840.10008.5.1.1.27",  # Stored Print Storage
    "1.2.840.10008.5.1.1.29",  # Hardcopy Grayscale Image Storage
    "1.2.840.10008.5.1.1.30",  # Hardcopy Color Image Storage
    "1.2.840.10008.5.1.4.1.1.3",  # Ultrasound Multi-frame Image Storage (Retired)
    "1.2.840.10008.5.1.4.1.1.5",  # Nuclear Medicine Image Storage (Retired)
    "1.2.840.10008.5.1.4.1.1.6",  # Ultrasound Image Storage (Retired)
    "1.2.840.10008.5.1.4.1.1.8",  # Standalone Overlay Storage
    "1.2.840.10008.5.1.4.1.1.9",  # Standalone Curve Storage
    "1.2.840.10008.5.1.4.1.1.9.1",  # Waveform Storage - Trial
    "1.2.840.10008.5.1.4.1.1.10",  # Standalone Modality LUT Storage
    "1.2.840.10008.5.1.4.1.1.11",  # Standalone VOI LUT Storage
    "1.2.840.10008.5.1.4.1.1.12.3",  # X-Ray Angiographic Bi-Plane Image Storage
    "1.2.840.10008.5.1.4.1.1.77.1",  # VL Image Storage - Trial
    "1.2.840.10008.5.1.4.1.1.77.2",  # VL Multi-frame Image Storage - Trial
    "1.2.840.10008.5.1.4.1.1.88.1",  # Text SR Storage - Trial
    "1.2.840.10008.5.1.4.1.1.88.2",  # Audio SR Storage - Trial
    "1.2.840.10008.5.1.4.1.1.88.3",  # Detail SR Storage - Trial
    "1.2.840.10008.5.1.4.1.1.88.4",  # Comprehensive SR Storage - Trial
    "1.2.840.10008.5.1.4.1.1.129",  # Standalone PET Curve Storage
    "1.2.840.10008.5.1.4.34.1",  # RT Beams Delivery Instruction Storage - Trial
)
# Current storage classes of DICOS (security screening) and DICONDE (non-destructive testing).
OTHER_STANDARD_STORAGE_SOP_CLASSES: tuple[str, ...] = (
    "1.2.840.10008.5.1.4.1.1.501.1",  # DICOS CT Image Storage
    "1.2.840.10008.5.1.4.1.1.501.2.1",  # DICOS Digital X-Ray Image Storage - For Presentation
    "1.2.840.10008.5.1.4.1.1.501.2.2",  # DICOS Digital X-Ray Image Storage - For Processing
    "1.2.840.10008.5.1.4.1.1.501.3",  # DICOS Threat Detection Report Storage
    "1.2.840.10008.5.1.4.1.1.501.4",  # DICOS 2D AIT Storage
    "1.2.840.10008.5.1.4.1.1.501.5",  # DICOS 3D AIT Storage
    "1.2.840.10008.5.1.4.1.1.501.6",  # DICOS Quadrupole Resonance (QR) Storage
    "1.2.840.10008.5.1.4.1.1.601.1",  # Eddy Current Image Storage
    "1.2.840.10008.5.1.4.1.1.601.2",  # Eddy Current Multi-frame Image Storage
)

# Distinct unknown SOP classes registered with pynetdicom in one process. Each is an entry in
# pynetdicom's module-level table, chosen by a peer, so a bound keeps a caller that proposes
# new UIDs on every association from growing it for ever; past it they are rejected.
MAX_UNKNOWN_SOP_CLASSES = 1000


def storage_sop_classes(retired: bool = True) -> list[str]:
    """Every storage SOP class of the standard the node accepts, in UID order.

    pynetdicom's list, the DICOS and DICONDE classes, and with ``retired`` the retired ones.
    """
    uids = {str(cx.abstract_syntax) for cx in AllStoragePresentationContexts}
    uids.update(OTHER_STANDARD_STORAGE_SOP_CLASSES)
    if retired:
        uids.update(RETIRED_STORAGE_SOP_CLASSES)
    return sorted(uids, key=lambda u: [int(c) for c in u.split(".")])


def _serve_as_storage(uid: str) -> None:
    """Make pynetdicom dispatch a C-STORE of ``uid`` to its Storage service class.

    pynetdicom picks the service class of a DIMSE request by its SOP Class UID, and aborts the
    association for one it does not know, even on a context the node accepted; ``register_uid``
    is its public way to add one. Process-wide and idempotent.
    """
    if uid_to_service_class(uid) is StorageServiceClass:
        return
    keyword = pdu.UID(uid).keyword
    if not keyword or hasattr(importlib.import_module("pynetdicom.sop_class"), keyword):
        keyword = "ModelnodeStorage_" + uid.replace(".", "_")
    register_uid(uid, keyword, StorageServiceClass)


class UnknownStorage:
    """Accepts, per association, proposed SOP classes that no one knows, as storage classes.

    An abstract syntax is *unknown* when neither pynetdicom (which knows the standard's service
    classes: worklist, storage commitment, print, UPS ...) nor pydicom's UID dictionary (the whole
    standard, transfer syntaxes included) knows it: a vendor's private SOP class, or a public one
    newer than pydicom. Such a context is added to the association's own copy of the supported
    contexts before negotiation, with the storage transfer syntaxes and roles, so it negotiates
    like a storage context (the requestor's order of transfer syntaxes decides).
    """

    def __init__(self, supported: set[str], transfer_syntaxes: list[str]) -> None:
        self._supported = frozenset(supported)
        self._transfer_syntaxes = list(transfer_syntaxes)
        self._accepted: set[str] = set()
        self._lock = threading.Lock()

    def is_unknown(self, uid: str) -> bool:
        """Whether ``uid`` is an abstract syntax no one knows, to be accepted as storage."""
        if uid in self._accepted:
            return True
        # StorageServiceClass: registered by an earlier Node of this process (_serve_as_storage).
        if uid in self._supported or uid_to_service_class(uid) not in (ServiceClass, StorageServiceClass):
            return False
        name = pdu.UID(uid)
        if name.name != uid or not name.is_valid:
            return False
        with self._lock:
            if uid not in self._accepted:
                if len(self._accepted) >= MAX_UNKNOWN_SOP_CLASSES:
                    log.warning("unknown SOP class %s rejected: %d unknown SOP classes accepted already",
                                uid, MAX_UNKNOWN_SOP_CLASSES)
                    return False
                _serve_as_storage(uid)
                self._accepted.add(uid)
                log.info("accepting unknown SOP class %s as a storage class (storage.accept_unknown_sop_classes)", uid)
        return True

    def add_contexts(self, assoc: Any, proposed: dict[str, list[str]]) -> list[str]:
        """Add a storage context for each unknown abstract syntax proposed; returns their UIDs."""
        unknown = [uid for uid in proposed if uid not in self._supported and self.is_unknown(uid)]
        if unknown:
            added = []
            for uid in unknown:
                cx = PresentationContext()
                cx.abstract_syntax = uid
                cx.transfer_syntax = self._transfer_syntaxes
                cx.scu_role, cx.scp_role = True, True
                added.append(cx)
            assoc.acceptor.supported_contexts = [*assoc.acceptor.supported_contexts, *added]
        return unknown


def _optional_handler(module: str, name: str) -> Callable[..., Any] | None:
    """``module.name`` if that module exists (the Q/R handlers land separately)."""
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name != module:
            raise
        log.warning("%s is not available: %s is not offered", module, name)
        return None
    return getattr(mod, name)


def assoc_id(assoc: Any) -> str:
    """A short id for log lines, stable for the life of the association."""
    ident = getattr(assoc, "_modelnode_id", None)
    if ident is None:
        ident = f"a{next(_assoc_ids)}"
        assoc._modelnode_id = ident
    return ident


def _peer_desc(assoc: Any) -> str:
    rq = assoc.requestor
    calling = rq.ae_title or getattr(rq.primitive, "calling_ae_title", "") or "?"
    return f"{calling.strip()}@{rq.address}:{rq.port}"


def _proposed_syntaxes(assoc: Any) -> dict[str, list[str]]:
    """{abstract syntax: transfer syntaxes} as proposed (the first context of each wins)."""
    proposed: dict[str, list[str]] = {}
    for cx in assoc.requestor.primitive.presentation_context_definition_list:
        proposed.setdefault(str(cx.abstract_syntax), [str(ts) for ts in cx.transfer_syntax])
    return proposed


def _prefer_requestor_syntaxes(assoc: Any, proposed: dict[str, list[str]] | None = None) -> None:
    """Let the requestor's order of transfer syntaxes decide, not ours.

    pynetdicom accepts, in a context that proposes several transfer syntaxes, the first one of
    the *acceptor's* list that was proposed. A sender knows best what it holds: one with JPEG 2000
    data that proposes JPEG 2000 then Explicit VR Little Endian must not be made to decompress
    (nor, the other way round, to compress lossily). So before negotiation each supported
    context that was proposed gets the requestor's order (of the first context proposed for
    that SOP class), followed by our remaining syntaxes.
    """
    if proposed is None:
        proposed = _proposed_syntaxes(assoc)
    for cx in assoc.acceptor.supported_contexts:
        order = proposed.get(str(cx.abstract_syntax))
        if order and len(cx._transfer_syntax) > 1:
            # Reordered in place: the setter would validate every UID again (~10 ms for ~190
            # contexts, on every association); these are the context's own, already valid.
            ours = {str(ts): ts for ts in cx._transfer_syntax}
            first = [ours[ts] for ts in dict.fromkeys(order) if ts in ours]
            cx._transfer_syntax = first + [ts for ts in cx._transfer_syntax if ts not in first]


class Node:
    """The DIMSE node: build with a configuration, then :meth:`start` and :meth:`stop`."""

    def __init__(self, config: Config, app: App | None = None) -> None:
        self.config = config
        _tune_pynetdicom()
        self.app = app or open_app(config)
        self.ctx = NodeContext(self.app)
        self.ae = self._build_ae()
        from node.permissions import Security

        # Allow-list, user identity, per-peer permissions, disk guard, audit and metrics hooks.
        self.security = Security(config)
        self._servers: list[Any] = []
        self._metrics: Any = None
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

        ae.add_supported_context(Verification, QUERY_TRANSFER_SYNTAXES)
        st = self.config.storage
        for sop_class in storage_sop_classes(retired=st.accept_retired_sop_classes):
            _serve_as_storage(sop_class)
            # scu_role/scp_role: accept what a C-GET requestor proposes for the sub-operations.
            ae.add_supported_context(sop_class, STORAGE_TRANSFER_SYNTAXES, scu_role=True, scp_role=True)

        self._find = _optional_handler("node.query", "handle_find")
        self._move = _optional_handler("node.retrieve", "handle_move")
        self._get = _optional_handler("node.retrieve", "handle_get")
        for classes, handler in ((FIND_CLASSES, self._find), (MOVE_CLASSES, self._move), (GET_CLASSES, self._get)):
            if handler is not None:
                for sop_class in classes:
                    ae.add_supported_context(sop_class, QUERY_TRANSFER_SYNTAXES)
        # Known to the negotiation, so never taken for unknown: the retired classes when they
        # are off, too (pydicom knows them).
        self._unknown = (UnknownStorage({str(cx.abstract_syntax) for cx in ae.supported_contexts},
                                        STORAGE_TRANSFER_SYNTAXES)
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
        ]
        if self._find is not None:
            bound.append((evt.EVT_C_FIND, self._find, [ctx]))
        if self._move is not None:
            bound.append((evt.EVT_C_MOVE, self._move, [ctx]))
        if self._get is not None:
            bound.append((evt.EVT_C_GET, self._get, [ctx]))
        return bound

    # ------------------------------------------------------------------ association events

    def _on_requested(self, event: evt.Event) -> None:
        """Before negotiation: the allow-list, unknown SOP classes, the requestor's syntax order."""
        # Security.wrap runs the allow-list and permission checks first and calls this only for
        # an association it lets through.
        assoc = event.assoc
        proposed = _proposed_syntaxes(assoc)
        if self._unknown is not None:
            self._unknown.add_contexts(assoc, proposed)
        _prefer_requestor_syntaxes(assoc, proposed)

    def _on_accepted(self, event: evt.Event) -> None:
        assoc = event.assoc
        contexts = len(assoc.accepted_contexts)
        log.info("[%s] association accepted from %s (%d context(s), max PDU %s)",
                 assoc_id(assoc), _peer_desc(assoc), contexts, assoc.requestor.maximum_length)

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
        groups = store_handler.association_ended(self.ctx, assoc)
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
        from node import metrics, tls

        if self.config.pipeline.enabled:
            from node.pipeline import Pipeline

            # Built before the port opens: that imports ONNX Runtime and highdicom and loads their
            # tables (several hundred ms of CPU under the GIL), which used to run beside the first
            # study received and slowed its C-STOREs by a third. Its threads start once the port
            # is bound, so a node that cannot bind never claims (and spends an attempt of) a job.
            self.pipeline = Pipeline(self.ctx, audit=self.security.audit)
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
        # The port is bound and the database open: tell systemd (no-op outside it).
        systemd.notify(f"READY=1\nSTATUS=serving {n.ae_title} on {n.bind}:{self.port}")
        self._watchdog = systemd.Watchdog()
        self._watchdog.start()
        if block:
            self._stopped.wait()

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
        if self.pipeline is not None:
            # A job cut short here stays 'running' in the database and is requeued at start.
            self.pipeline.stop(timeout=10)
        if self._metrics is not None:
            self._metrics.stop()
        self.security.close()
        store_handler.spares.clear()
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
    from node import tls

    problems = tls.validate(config)
    if problems:
        raise ConfigError(problems, config.source)
    node = Node(config)
    if config.models.register_reference:
        from node.registry import register_reference_models

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
