"""The DIMSE service: one pynetdicom AE built from the configuration, with every handler bound.

:class:`Node` owns the AE, the node's state (:class:`node.app.App`) and the
:class:`node.context.NodeContext` that each handler receives. ``serve(config)`` is what
``modelnode serve`` runs: it starts the node, waits for SIGTERM/SIGINT and stops it.

Services (see docs/dimse.md for the conformance statement):

* Verification SCP (C-ECHO).
* Storage SCP (C-STORE, :mod:`node.store`) for every storage SOP class pynetdicom knows, in the
  uncompressed and the common compressed transfer syntaxes; the same contexts accept the SCP role
  so that C-GET sub-operations can come back over them.
* Query/Retrieve SCP, Patient and Study Root FIND/MOVE/GET (:mod:`node.query`,
  :mod:`node.retrieve`). These modules may not exist yet in a given checkout: the contexts are
  then not offered and the node runs without them.
"""

from __future__ import annotations

import importlib
import ipaddress
import itertools
import logging
import signal
import threading
import time
from collections.abc import Callable
from types import FrameType
from typing import Any

from pydicom import uid as pdu
from pynetdicom import AE, _config, evt
from pynetdicom.dul import DULServiceProvider
from pynetdicom.presentation import AllStoragePresentationContexts
from pynetdicom.sop_class import (
    PatientRootQueryRetrieveInformationModelFind,
    PatientRootQueryRetrieveInformationModelGet,
    PatientRootQueryRetrieveInformationModelMove,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
    Verification,
)

from node import store as store_handler
from node.app import App, open_app
from node.config import Config, Peer
from node.context import NodeContext
from node.db import _redact

log = logging.getLogger("modelnode.server")

# Datasets go to a temporary file as they arrive instead of into memory (a model can be 1 GiB).
_config.STORE_RECV_CHUNKED_DATASET = True
# pynetdicom logs every association and message at INFO; our own lines say what matters.
logging.getLogger("pynetdicom").setLevel(logging.WARNING)

# Transfer syntaxes accepted for storage. Uncompressed first: when a requestor proposes several,
# pynetdicom takes the requestor's order, so this list only decides what is acceptable.
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


class _AdaptivePollClock:
    """Stand-in for the ``time`` module inside pynetdicom's DUL and association reactors.

    Both reactors poll: each idle turn sleeps 1 ms (``time.sleep(0.001)``), and a C-STORE goes
    through several turns (data arrives, message decoded, response queued, response sent), so on
    loopback pynetdicom spent more time asleep than working: a bare pynetdicom SCP took 1.10 s
    for 200 CT slices with 1 ms turns and 0.67 s with 0.1 ms turns (2 cores, storescu).
    Polling at 0.1 ms for ever would burn CPU on idle associations, so a reactor polls fast only
    within ``FAST_WINDOW`` of the last PDU its association received (the DUL's idle timer), and
    at the library's 1 ms otherwise. Any other sleep passes through unchanged.
    """

    LIBRARY_POLL = 0.001
    FAST_POLL = 0.0001
    FAST_WINDOW = 0.05  # seconds after the last PDU received

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)

    def sleep(self, seconds: float) -> None:
        if seconds == self.LIBRARY_POLL:
            thread = threading.current_thread()
            dul = thread if isinstance(thread, DULServiceProvider) else getattr(thread, "dul", None)
            last_pdu = getattr(getattr(dul, "_idle_timer", None), "_start_time", None)
            if last_pdu is not None and time.time() - last_pdu < self.FAST_WINDOW:
                seconds = self.FAST_POLL
        time.sleep(seconds)


def _tune_pynetdicom() -> None:
    """Install :class:`_AdaptivePollClock` (pynetdicom 3.0: both modules call ``time.sleep``)."""
    from pynetdicom import association, dul

    if not isinstance(dul.time, _AdaptivePollClock):
        clock = _AdaptivePollClock()
        dul.time = clock  # type: ignore[assignment]
        association.time = clock  # type: ignore[assignment]


def storage_sop_classes() -> list[str]:
    """Every storage SOP class the node accepts (pynetdicom's full list)."""
    return sorted({str(cx.abstract_syntax) for cx in AllStoragePresentationContexts})


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


def _host_matches(peer: Peer, address: str) -> bool:
    """A peer's host restricts callers only when it is an IP address (names are not resolved)."""
    try:
        wanted = ipaddress.ip_address(peer.host)
    except ValueError:
        return True
    try:
        return ipaddress.ip_address(address) == wanted
    except ValueError:
        return False


class Node:
    """The DIMSE node: build with a configuration, then :meth:`start` and :meth:`stop`."""

    def __init__(self, config: Config, app: App | None = None) -> None:
        self.config = config
        _tune_pynetdicom()
        self.app = app or open_app(config)
        self.ctx = NodeContext(self.app)
        self.ae = self._build_ae()
        self._server: Any = None
        self._stopped = threading.Event()

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
        for sop_class in storage_sop_classes():
            # scu_role/scp_role: accept what a C-GET requestor proposes for the sub-operations.
            ae.add_supported_context(sop_class, STORAGE_TRANSFER_SYNTAXES, scu_role=True, scp_role=True)

        self._find = _optional_handler("node.query", "handle_find")
        self._move = _optional_handler("node.retrieve", "handle_move")
        self._get = _optional_handler("node.retrieve", "handle_get")
        for classes, handler in ((FIND_CLASSES, self._find), (MOVE_CLASSES, self._move), (GET_CLASSES, self._get)):
            if handler is not None:
                for sop_class in classes:
                    ae.add_supported_context(sop_class, QUERY_TRANSFER_SYNTAXES)
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
        """Apply the allow-list before any negotiation (A-ASSOCIATE-RJ, permanent, calling AE)."""
        assoc = event.assoc
        if not self.config.node.allow_list:
            return
        calling = (assoc.requestor.primitive.calling_ae_title or "").strip()
        address = assoc.requestor.address
        peer = self.config.peer(calling)
        if peer is None:
            reason = f"calling AE {calling!r} is not a known peer"
        elif not _host_matches(peer, address):
            reason = f"calling AE {calling!r} is known at {peer.host}, not {address}"
        else:
            return
        log.warning("[%s] rejecting association from %s:%s: %s (allow-list is on)",
                    assoc_id(assoc), address, assoc.requestor.port, reason)
        # rejected-permanent, service-user, calling-AE-title-not-recognized (PS3.8 9.3.4)
        assoc.acse.send_reject(0x01, 0x01, 0x03)

    def _on_accepted(self, event: evt.Event) -> None:
        assoc = event.assoc
        contexts = len(assoc.accepted_contexts)
        log.info("[%s] association accepted from %s (%d context(s), max PDU %s)",
                 assoc_id(assoc), _peer_desc(assoc), contexts, assoc.requestor.maximum_length)

    def _on_rejected(self, event: evt.Event) -> None:
        log.info("[%s] association rejected from %s", assoc_id(event.assoc), _peer_desc(event.assoc))

    def _on_aborted(self, event: evt.Event) -> None:
        log.info("[%s] association aborted with %s", assoc_id(event.assoc), _peer_desc(event.assoc))

    def _on_released(self, event: evt.Event) -> None:
        log.info("[%s] association released by %s", assoc_id(event.assoc), _peer_desc(event.assoc))

    def _on_echo(self, event: evt.Event) -> int:
        log.debug("[%s] C-ECHO from %s", assoc_id(event.assoc), _peer_desc(event.assoc))
        return 0x0000

    # ------------------------------------------------------------------ life cycle

    def start(self, block: bool = False) -> None:
        """Listen on the configured address; with ``block`` serve until :meth:`stop`."""
        n = self.config.node
        store_handler.prepare(self.ctx)
        self._server = self.ae.start_server((n.bind, n.port), block=False, evt_handlers=self.handlers())
        log.info("listening as %s on %s:%d", n.ae_title, n.bind, self.port)
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
        self.ae.shutdown()
        self.app.close()
        log.info("stopped")


def serve(config: Config) -> int:
    """Run the node until SIGTERM or SIGINT; returns the process exit code."""
    node = Node(config)
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
