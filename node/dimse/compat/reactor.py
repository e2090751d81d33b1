"""pynetdicom's DUL reactor, tuned for a node that receives studies (pynetdicom 3.0.4).

pynetdicom runs two threads per association: the DUL reactor reads and writes PDUs, the
association reactor runs the DIMSE services. Both poll, and every PDU read goes through several
layers of objects and events. :func:`install` replaces a few of their functions, each one a
drop-in with the library's contract:

* :class:`_ReactorCheckpoint`: a send_* pauses the association reactor for certain (pynetdicom
  let a request run with the reactor still going, which could take its response);
* :class:`_ReactorClock`: each reactor sleeps until what it waits for happens instead of
  polling in 1 ms steps; :func:`_send_pdu` wakes the DUL reactor when there is a PDU to send;
* :func:`_process_recv_primitive`: what the peer sent is read before more is sent (C-CANCEL);
* :func:`_recv`: a PDU read into one buffer instead of 4 KiB at a time;
* :func:`_read_pdu_data`: a P-DATA-TF PDU of an established association goes straight to the
  DIMSE layer (see there).
"""

from __future__ import annotations

import logging
import os
import queue as _queue
import select
import socket
import struct
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any, cast

from pynetdicom import evt
from pynetdicom._handlers import standard_pdu_recv_handler, standard_pdu_sent_handler
from pynetdicom.association import Association
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.transport import AssociationSocket

try:
    import ssl as _ssl
except ImportError:  # pragma: no cover (Python built without OpenSSL)
    _ssl = None  # type: ignore[assignment]

# pynetdicom's own logger: the messages below are the library's, for a function that replaces one.
_pynetdicom_log = logging.getLogger("pynetdicom.dul")


class _ReactorClock:
    """Stand-in for the ``time`` module inside pynetdicom's DUL and association reactors.

    Both reactors poll: each idle turn of their loops sleeps 1 ms (``time.sleep(0.001)``), and
    a C-STORE goes through several turns (data arrives, message decoded, response queued,
    response sent), so on loopback pynetdicom spent more time asleep than working: a bare
    pynetdicom SCP took 1.10 s for 200 CT slices with 1 ms turns, 0.67 s with 0.1 ms turns
    (2 cores, storescu), and shorter sleeps burn the CPU that the handler and the sender need.
    Instead each reactor now sleeps until what it waits for happens (at most 1 ms, as before,
    but for an idle acceptor's association thread):

    * the association reactor, until the DIMSE layer queues a message; an acceptor's also until
      the DUL queues an indication for it (release or abort: :class:`_IndicationQueue`), and
      then up to 50 ms rather than 1 ms (:func:`_association_wait`);
    * the DUL reactor, until its socket is readable or a primitive is queued for sending
      (:func:`_send_pdu` writes a byte to the association's wake-up pipe).

    Every other sleep passes through unchanged.
    """

    LIBRARY_POLL = 0.001

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)

    def sleep(self, seconds: float) -> None:
        if seconds != self.LIBRARY_POLL:
            time.sleep(seconds)
            return
        thread = threading.current_thread()
        if isinstance(thread, DULServiceProvider):
            _dul_wait(thread, seconds)
        elif isinstance(thread, Association):
            _association_wait(thread, seconds)
        else:
            time.sleep(seconds)


# How long an acceptor's association thread waits for something to do before it looks again.
ACCEPTOR_IDLE_WAIT = 0.05


def _association_wait(assoc: Association, seconds: float) -> None:
    """One idle turn of the association reactor: wait for a DIMSE message or an indication.

    pynetdicom's loop looks for a queued DIMSE message, a release or abort indication from the
    DUL, a dead DUL thread and the network idle timer, then sleeps 1 ms. Waking every millisecond
    cost an idle association thread 13% of the node's CPU during an ingest (its C-STOREs are
    served on the DUL thread, node.dimse.compat.store_messages): 1,000 turns a second, each taking the GIL.

    An acceptor's thread therefore waits up to :data:`ACCEPTOR_IDLE_WAIT`, woken at once by a
    DIMSE message or an indication. What is left to that timeout is seen later by at most that
    much: a dead DUL thread (its end is preceded by an indication, except after an exception,
    which also sets the kill flag), the kill flag set from another thread, the network idle timer
    (seconds). A requestor keeps 1 ms turns: the node's own requests (C-MOVE sub-operations,
    exports) pause its reactor and wait for it to notice (``_reactor_checkpoint``), once per
    request.
    """
    queue = assoc.dimse.msg_queue
    indications = assoc.dul.to_user_queue
    if assoc.is_acceptor:
        if type(indications) is not _IndicationQueue:
            indications.__class__ = _IndicationQueue  # (same object, same state: a subclass)
            indications.wake = queue.not_empty  # type: ignore[attr-defined]
        seconds = ACCEPTOR_IDLE_WAIT
    with queue.not_empty:
        if not queue._qsize() and not indications.qsize() and not assoc._kill:
            queue.not_empty.wait(seconds)
        if queue._qsize():
            # ``Queue.put`` wakes one waiter, and this one only looks: pass the wake-up on, or a
            # thread blocked in ``get_msg(block=True)`` (a send_* waiting for its response) sleeps
            # out its DIMSE timeout with the response in the queue.
            queue.not_empty.notify()


class _IndicationQueue(_queue.Queue):  # type: ignore[type-arg]
    """The DUL's queue of indications for the association's thread, which it wakes on a put."""

    wake: threading.Condition | None = None

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        super().put(item, block, timeout)
        wake = self.wake
        if wake is not None:
            with wake:
                wake.notify_all()


class _ReactorCheckpoint:
    """``Association._reactor_checkpoint`` (a ``threading.Event`` in pynetdicom), without its race.

    Every send_* (and release) pauses the association reactor so that it cannot take the
    response off the DIMSE queue: it clears the checkpoint and spins until ``_is_paused``; the
    reactor sets ``_is_paused``, waits on the checkpoint, then clears ``_is_paused``. But the
    flag stays True from the previous pause until the reactor thread has actually run after
    being woken: a send_* right after another one (the N-GET after a C-FIND's last response,
    the N-ACTION after the N-GET) that clears the checkpoint before the woken thread got the
    CPU reads that stale True and goes on. An Event's ``wait`` returns once notified even if
    the flag was cleared again, so the reactor then runs unpaused during the request and
    either takes the response itself ("Received unexpected N-GET service message", the send_*
    gets none: DIMSE timeout), or waits in :func:`_association_wait` on the DIMSE queue and
    takes the one wake-up of its ``put`` (the send_* sees its response only at its timeout).
    tests/test_ups_scp.py's requestor lost its N-GET response the first way on a loaded
    machine (1 run in 23; pydicom/pynetdicom#875 reports the same warning).

    Here the reactor thread's ``wait`` returns only while the flag is still set, and clears
    ``_is_paused`` under the same lock, so a ``clear`` either comes first (the reactor keeps
    waiting, paused) or sees ``_is_paused`` False (and the send_* waits for the next pause).
    ``clear`` called on the reactor thread itself (an event handler's send_*, the release after
    a network timeout) marks it paused: it is not running its loop while it makes the request.
    """

    def __init__(self, assoc: Association) -> None:
        self._assoc = assoc
        self._cond = threading.Condition()
        self._flag = True

    def is_set(self) -> bool:
        return self._flag

    def set(self) -> None:
        with self._cond:
            self._flag = True
            self._cond.notify_all()

    def clear(self) -> None:
        with self._cond:
            self._flag = False
            if threading.current_thread() is self._assoc:
                self._assoc._is_paused = True

    def wait(self, timeout: float | None = None) -> bool:
        with self._cond:
            if threading.current_thread() is not self._assoc:
                return self._cond.wait_for(lambda: self._flag, timeout)
            self._assoc._is_paused = True
            if not self._cond.wait_for(lambda: self._flag, timeout):
                return False
            self._assoc._is_paused = False
            return True


_library_association_init = Association.__init__


def _association_init(self: Association, *args: Any, **kwargs: Any) -> None:
    _library_association_init(self, *args, **kwargs)
    self._reactor_checkpoint = _ReactorCheckpoint(self)  # type: ignore[assignment]


def install_checkpoint() -> None:
    """Give every new association a :class:`_ReactorCheckpoint` (idempotent, process-wide).

    Installed by :func:`install` (a node) and :func:`node.dimse.compat.client.install_client`
    (the node's SCU commands); a process that only requests (a test's pynetdicom peer) may call
    it alone: it changes nothing else of pynetdicom.
    """
    from node.dimse.compat.guard import check

    check()
    Association.__init__ = _association_init  # type: ignore[method-assign]


# One wake-up pipe per DUL (association), kept here rather than on pynetdicom's object.
_wake_pipes: weakref.WeakKeyDictionary[DULServiceProvider, tuple[int, int]] = weakref.WeakKeyDictionary()
_wake_pipes_lock = threading.Lock()


def _wake_pipe(dul: DULServiceProvider) -> tuple[int, int]:
    pipe = _wake_pipes.get(dul)
    if pipe is None:
        with _wake_pipes_lock:
            pipe = _wake_pipes.get(dul)
            if pipe is None:
                r, w = os.pipe()
                os.set_blocking(r, False)
                os.set_blocking(w, False)
                pipe = _wake_pipes[dul] = (r, w)
                # Closed with the DUL object (one pipe per association).
                weakref.finalize(dul, _close_pipe, r, w)
    return pipe


def _close_pipe(r: int, w: int) -> None:
    for fd in (r, w):
        try:
            os.close(fd)
        except OSError:
            pass


def _dul_wait(dul: DULServiceProvider, timeout: float) -> None:
    if not dul.to_provider_queue.empty():
        return
    sock = getattr(dul.socket, "socket", None)
    r, _ = _wake_pipe(dul)
    if sock is None or sock.fileno() < 0:
        select.select([r], [], [], timeout)
    elif _ssl is not None and isinstance(sock, _ssl.SSLSocket) and sock.pending():
        return  # decrypted data already buffered: select() cannot see it
    else:
        try:
            select.select([sock, r], [], [], timeout)
        except (OSError, ValueError):
            time.sleep(timeout)
    try:
        os.read(r, 4096)  # drain the wake-ups
    except (BlockingIOError, OSError):
        pass


_library_send_pdu = DULServiceProvider.send_pdu


def _send_pdu(self: DULServiceProvider, primitive: Any) -> None:
    """``DULServiceProvider.send_pdu``, then wake the DUL reactor (see :class:`_ReactorClock`)."""
    _library_send_pdu(self, primitive)
    try:
        os.write(_wake_pipe(self)[1], b"\0")
    except (BlockingIOError, OSError):
        pass  # the pipe is full: the reactor has wake-ups pending anyway


_library_process_recv_primitive = DULServiceProvider._process_recv_primitive


def _process_recv_primitive(self: DULServiceProvider) -> bool:
    """``DULServiceProvider._process_recv_primitive``, but what the peer sent is read first.

    pynetdicom 3.0.4's DUL reactor either sends one queued primitive or reads one PDU per turn,
    sending first. During a burst of responses (3000 C-FIND matches) the send queue never
    empties, so the peer's C-CANCEL stayed unread until every match had been sent: on a loaded
    machine tests/test_query_retrieve.py::test_find_honours_c_cancel lost that race three times
    in a row. Returning False while the socket has data makes the reactor read it this turn.

    Only once the association is established (Sta6). Before that, a TLS 1.3 server's session
    tickets, sent unasked right after the handshake, make the socket readable with no PDU behind
    them: a requestor that read then, instead of sending its queued A-ASSOCIATE-RQ, blocked in
    SSL_read while the acceptor waited for that request, until the ACSE timeout aborted it (the
    node's C-MOVE sub-associations to a TLS peer: 3 to 14 times in 30 against dcmtk and
    modelnode listeners; 0 in 60 with this condition).
    """
    sock = self.socket
    if (sock is not None and self.to_provider_queue.qsize() and self.state_machine.current_state == "Sta6"
            and sock.ready):
        return False
    return _library_process_recv_primitive(self)


def _recv(self: AssociationSocket, nr_bytes: int) -> bytearray:
    """``AssociationSocket.recv`` reading straight into one buffer instead of 4 KiB at a time.

    pynetdicom 3.0 reads a PDU with ``socket.recv(4096)`` in a loop and extends a bytearray:
    25,600 calls through Python for a 100 MiB study. Same contract: blocks until ``nr_bytes``
    are read, returns what it has if the peer closes, lets socket errors through.
    """
    sock = cast(socket.socket, self.socket)
    buf = bytearray(nr_bytes)
    view = memoryview(buf)
    got = 0
    while got < nr_bytes:
        n = sock.recv_into(view[got:], nr_bytes - got)
        if not n:
            del view
            return buf[:got]
        got += n
    return buf


# --------------------------------------------------------------------------- reading a PDU

_PDU_HEADER = struct.Struct(">BBL")
_PDV_HEADER = struct.Struct(">LB")
_PDU_TYPES = frozenset(range(0x01, 0x08))
P_DATA_TF = 0x04


def _read_pdu_data(self: DULServiceProvider) -> None:
    """``DULServiceProvider._read_pdu_data`` with a short path for P-DATA-TF in Sta6.

    pynetdicom copies each PDU into ``bytes``, decodes it into PDU and item objects (copying
    every fragment again), triggers two events, queues the FSM event, and on the next turn the
    FSM pops the PDU, triggers a third event and converts it into a ``P_DATA`` primitive for
    the DIMSE layer. storescu sends a 512 KiB CT slice as 5 PDUs, so that is done 1,000 times
    for a 200-slice study, on the thread the sender waits on.

    In Sta6 (association established), event 10 (P-DATA-TF received) always leads to action
    DT-2 (send the P-DATA indication to the DIMSE layer) and back to Sta6. When nothing but
    pynetdicom's no-op logging handler is bound to the events involved, this function splits
    the PDV items itself (as views of the one buffer the PDU was read into) and hands the
    ``P_DATA`` to the DIMSE layer directly. While that message is still incomplete and its next
    PDU is already readable, it reads that one too, without a turn of the reactor (which checks
    timers and queues and polls the socket twice). Everything else, and any PDU whose items do
    not add up, takes the library's path with the library's error handling.
    """
    while _read_one_pdu(self):
        if not _more_of_this_message(self):
            return
        self._idle_timer.restart()  # (what the reactor does after each PDU read)


def _read_one_pdu(self: DULServiceProvider) -> bool:
    """Read one PDU; True if it went straight to the DIMSE layer (see :func:`_read_pdu_data`)."""
    sock = cast(AssociationSocket, self.socket)
    try:
        head = sock.recv(6)
    except (OSError, TimeoutError) as exc:
        _connection_lost(self, exc)
        return False
    if len(head) != 6:
        self.event_queue.put("Evt17")
        return False
    pdu_type, _, length = _PDU_HEADER.unpack(head)
    if pdu_type not in _PDU_TYPES:
        _pynetdicom_log.error(f"Unknown PDU type received '0x{pdu_type:02X}'")
        self.event_queue.put("Evt19")  # unrecognised or invalid PDU
        return False
    try:
        body = sock.recv(length)
    except (OSError, TimeoutError) as exc:
        _connection_lost(self, exc)
        return False
    if len(body) != length:
        _pynetdicom_log.error(f"The received PDU is shorter than expected ({6 + len(body)} of "
                              f"{6 + length} bytes received)")
        self.event_queue.put("Evt17")
        return False

    if pdu_type == P_DATA_TF and _direct(self):
        pdvs = split_pdvs(body)
        if pdvs is not None:
            primitive = P_DATA()
            primitive.presentation_data_value_list.extend(pdvs)  # (the setter wants lists)
            self.assoc.dimse.receive_primitive(primitive)
            return True

    try:
        pdu, event = self._decode_pdu(head + body)
        self.event_queue.put(event)
    except Exception as exc:
        _pynetdicom_log.error("Unable to decode the received PDU data")
        _pynetdicom_log.exception(exc)
        self.event_queue.put("Evt19")
        return False
    self._recv_pdu.put(pdu)
    return False


def _connection_lost(dul: DULServiceProvider, exc: BaseException) -> None:
    _pynetdicom_log.error("Connection closed before the entire PDU was received")
    _pynetdicom_log.exception(exc)
    dul.event_queue.put("Evt17")  # transport connection closed


def _more_of_this_message(dul: DULServiceProvider) -> bool:
    """A DIMSE message is half received, its next PDU is readable, and nothing else waits."""
    return (dul.assoc.dimse.message is not None and not dul._kill_thread and not dul.to_provider_queue.qsize()
            and not dul.event_queue.qsize() and cast(AssociationSocket, dul.socket).ready)


def only_library_handlers(assoc: Any, event: Any, standard: Callable[..., Any] | None = None) -> bool:
    """Nothing is bound to ``event`` but pynetdicom's own ``standard`` logging handler (if any).

    The short paths here and in node.dimse.compat.store_messages skip some of pynetdicom's events; they are
    taken only when nobody (a user, a test, a plugin) listens to those events.
    """
    return all(handler[0] is standard for handler in assoc.get_handlers(event))


def _direct(dul: DULServiceProvider) -> bool:
    """Whether a P-DATA-TF may skip the FSM and the events (see :func:`_read_pdu_data`)."""
    assoc = dul.assoc
    return (dul.state_machine.current_state == "Sta6" and not dul.event_queue.qsize()
            and only_library_handlers(assoc, evt.EVT_DATA_RECV) and only_library_handlers(assoc, evt.EVT_FSM_TRANSITION)
            and only_library_handlers(assoc, evt.EVT_PDU_RECV, standard_pdu_recv_handler))


def send_now(dul: DULServiceProvider, context_id: int, pdv: bytes) -> bool:
    """Send one PDV as a P-DATA-TF right now if this is the DUL thread in Sta6; else False.

    For a response served on the DUL thread (:func:`node.dimse.compat.store_messages._serve_here`): queuing it
    would only have this same thread take it off the queue on its next turn and run it through
    the FSM (event 9 in Sta6 is action DT-1, send the PDU, back to Sta6). Only when nothing is
    queued before it and nothing but pynetdicom's no-op logging handler is bound to the events
    that path would trigger.
    """
    if (threading.current_thread() is not dul or dul.state_machine.current_state != "Sta6"
            or dul.to_provider_queue.qsize() or not only_library_handlers(dul.assoc, evt.EVT_FSM_TRANSITION)
            or not only_library_handlers(dul.assoc, evt.EVT_PDU_SENT, standard_pdu_sent_handler)):
        return False
    cast(AssociationSocket, dul.socket).send(encode_p_data_tf(context_id, pdv))
    return True


def encode_p_data_tf(context_id: int, pdv: bytes) -> bytes:
    """A P-DATA-TF PDU holding one PDV item (PS3.8 9.3.5): ``pdv`` starts with its control header."""
    item = _PDV_HEADER.pack(len(pdv) + 1, context_id) + pdv
    return _PDU_HEADER.pack(P_DATA_TF, 0, len(item)) + item


def split_pdvs(body: bytes | bytearray) -> list[tuple[int, memoryview]] | None:
    """The PDV items of a P-DATA-TF body (PS3.8 9.3.5.1) as (context ID, view), or None.

    None for no item, an item too short to hold its message control header, or a length that
    runs past the PDU: pynetdicom's decoder then handles the PDU (and refuses it).
    """
    view = memoryview(body)
    items: list[tuple[int, memoryview]] = []
    pos, end = 0, len(body)
    while pos < end:
        if pos + 6 > end:
            return None
        length, context_id = _PDV_HEADER.unpack_from(body, pos)
        if length < 2 or pos + 4 + length > end:
            return None
        items.append((context_id, view[pos + 5:pos + 4 + length]))
        pos += 4 + length
    return items or None


def install() -> None:
    """Replace the reactor functions described above (idempotent)."""
    from pynetdicom import association, dul

    install_checkpoint()
    AssociationSocket.recv = _recv  # type: ignore[method-assign]
    DULServiceProvider._read_pdu_data = _read_pdu_data  # type: ignore[method-assign]
    if not isinstance(dul.time, _ReactorClock):
        clock = _ReactorClock()
        dul.time = clock  # type: ignore[assignment]
        association.time = clock  # type: ignore[assignment]
        DULServiceProvider.send_pdu = _send_pdu  # type: ignore[method-assign]
        DULServiceProvider._process_recv_primitive = _process_recv_primitive  # type: ignore[method-assign]
