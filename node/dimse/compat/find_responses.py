"""C-FIND responses at the pace of the index (pynetdicom 3.0.4).

pynetdicom's C-FIND SCP (``ServiceClass._c_find_scp``) takes each (status, identifier) the handler
yields, encodes the identifier with pydicom, builds a DIMSE message whose command set is a pydicom
Dataset encoded twice (once for the Command Group Length), splits it into P-DATA primitives and
queues them for the DUL thread, which runs each through its state machine, encodes it as a PDU
and sends it. Measured with py-spy on the running node (issue 19, docs/BENCHMARKS.md), that was
about 0.8 ms of CPU per response on this machine, most of it pydicom's encoder, and each response
crossed from the association's thread to the DUL thread and back. Orthanc answers in 0.2 ms.

This module keeps pynetdicom's C-FIND SCP (statuses, C-CANCEL, the checks between responses)
and replaces what it does per response:

* :class:`EncodedIdentifier`: an identifier the handler encoded itself
  (:mod:`node.dimse.identifier`); :func:`_encode`, installed as ``service_class.encode``, hands
  its bytes through and gives every other dataset to pydicom as before;
* :func:`encode_command`: the C-FIND-RSP command set (PS3.7 9.3.2.2) written by hand, as
  :mod:`.store_messages` does for C-STORE;
* :func:`_send_msg`: the response's P-DATA-TF PDUs (fragmented exactly as pynetdicom fragments
  them) written to the socket by the association's own thread, in one ``send``, when nothing
  is queued before them, the association is established (Sta6), the socket is not TLS, and
  nothing but pynetdicom's logging handlers listens to the events skipped. Otherwise they are
  queued for the DUL thread as pynetdicom does. Writes to an association's socket, from
  either thread, are serialised by a lock (:func:`_socket_send`), so that PDUs never interleave.

C-CANCEL: the DUL thread keeps reading the socket while responses are written (the socket is
full duplex), and pynetdicom checks for a cancel before each response. With queued responses
:func:`hold_back` keeps at most :data:`SEND_QUEUE_LIMIT` waiting, so that a cancel is not stuck
behind thousands of them; written directly, the socket's own buffer is the only queue.

``tests/test_find_dimse.py`` compares every byte with pynetdicom's own encoding, and runs real
C-FINDs (with C-CANCEL) through pynetdicom's SCP with these patches in place.
"""

from __future__ import annotations

import logging
import socket
import ssl
import struct
import threading
import time
import weakref
from collections.abc import Iterator
from typing import Any

from pynetdicom import _config, evt, service_class
from pynetdicom._handlers import standard_dimse_sent_handler, standard_pdu_sent_handler
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_primitives import C_FIND
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.transport import AssociationSocket

from node.dimse.compat import reactor
from node.dimse.compat.store_messages import LAST_COMMAND_FRAGMENT, encode_element, encode_uid

log = logging.getLogger("modelnode.query")
# The loggers of what the direct path skips: pynetdicom's DIMSE and PDU logging handlers (DEBUG)
# and its per-response identifier dump (service_class, DEBUG).
_handlers_log = logging.getLogger("pynetdicom._handlers")
_service_log = logging.getLogger("pynetdicom.service_class")

C_FIND_RSP_FIELD = 0x8020
DATASET_PRESENT = 0x0001
NO_DATASET = 0x0101
_FIRST_DATA_FRAGMENT, _LAST_DATA_FRAGMENT = b"\x00", b"\x02"
_MORE_COMMAND_FRAGMENT = b"\x01"


class EncodedIdentifier:
    """A response identifier its handler already encoded, for one transfer syntax.

    What pynetdicom's C-FIND SCP does with a pending response's identifier, besides encoding it,
    is iterate over it to log it: to that it is an empty dataset (building a pydicom Dataset for
    each response cost 30 µs). It carries ``encoded``, the identifier's bytes in Implicit
    (``implicit_vr``) or Explicit VR Little Endian. Only :func:`_encode` knows to use them:
    should pynetdicom ever encode it some other way, pydicom fails on it and pynetdicom refuses
    the response with 0xC312 (loudly, in the log and to the peer), never a wrong answer.
    """

    __slots__ = ("encoded", "implicit_vr")

    def __init__(self, encoded: bytes, implicit_vr: bool) -> None:
        self.encoded = encoded
        self.implicit_vr = implicit_vr

    def __iter__(self) -> Iterator[Any]:
        return iter(())

    def __len__(self) -> int:
        return 0


def accepts_encoded() -> bool:
    """Whether handlers may yield :class:`EncodedIdentifier` (see :func:`install`).

    Not while pynetdicom dumps response identifiers into its log (DEBUG): it would dump an
    empty dataset.
    """
    return _installed and not (_config.LOG_RESPONSE_IDENTIFIERS and _service_log.isEnabledFor(logging.DEBUG))


_library_encode = service_class.encode


def _encode(ds: Any, is_implicit_vr: bool, is_little_endian: bool, deflated: bool = False) -> bytes | None:
    """``pynetdicom.dsutils.encode`` as ``service_class`` calls it, passing encoded identifiers through."""
    if type(ds) is EncodedIdentifier:
        if ds.implicit_vr == is_implicit_vr and is_little_endian and not deflated:
            return ds.encoded
        log.error("a C-FIND identifier encoded for %s VR Little Endian cannot be sent in this transfer syntax",
                  "Implicit" if ds.implicit_vr else "Explicit")
        return None  # pynetdicom answers 0xC312 (cannot encode the identifier)
    return _library_encode(ds, is_implicit_vr, is_little_endian, deflated)


# --------------------------------------------------------------------------- the command set


def encode_command(primitive: C_FIND) -> bytes | None:
    """The C-FIND-RSP command set for ``primitive``, or None where pynetdicom must encode it.

    What pynetdicom's ``C_FIND_RSP`` message holds (PS3.7 9.3.2.2), in Implicit VR Little
    Endian: Affected SOP Class UID (if set), Command Field, Message ID Being Responded To,
    Command Data Set Type, Status. A response with an Offending Element or an Error Comment
    (a failure) is left to pynetdicom.
    """
    if (primitive.MessageIDBeingRespondedTo is None or primitive.Status is None
            or primitive.OffendingElement is not None or primitive.ErrorComment is not None):
        return None
    present = DATASET_PRESENT if primitive.Identifier is not None else NO_DATASET
    key = (primitive.AffectedSOPClassUID, primitive.MessageIDBeingRespondedTo, present, primitive.Status)
    command = _commands.get(key)
    if command is None:
        command = _encode_command(primitive, present)
        if len(_commands) >= 1024:
            _commands.clear()
        _commands[key] = command
    return command


# The command sets of one C-FIND's responses differ only by status: each is encoded once.
_commands: dict[tuple[Any, int, int, int], bytes] = {}


def _encode_command(primitive: C_FIND, present: int) -> bytes:
    elements = []
    if primitive.AffectedSOPClassUID is not None:
        elements.append(encode_element(0x00000002, encode_uid(str(primitive.AffectedSOPClassUID))))
    elements.append(encode_element(0x00000100, struct.pack("<H", C_FIND_RSP_FIELD)))
    elements.append(encode_element(0x00000120, struct.pack("<H", primitive.MessageIDBeingRespondedTo)))
    elements.append(encode_element(0x00000800, struct.pack("<H", present)))
    elements.append(encode_element(0x00000900, struct.pack("<H", primitive.Status)))
    body = b"".join(elements)
    return encode_element(0x00000000, struct.pack("<I", len(body))) + body


def fragments(data: bytes, max_pdu: int) -> Iterator[bytes]:
    """``data`` cut as pynetdicom cuts a message: pieces of ``max_pdu - 6`` bytes (0: one piece)."""
    if max_pdu == 0 or len(data) <= max_pdu - 6:
        yield data
        return
    step = max_pdu - 6
    for i in range(0, len(data), step):
        yield data[i:i + step]


def message_pdvs(command: bytes, identifier: bytes, max_pdu: int) -> list[bytes]:
    """The PDVs (each with its message control header) of a message, in order, as pynetdicom's
    ``DIMSEMessage.encode_msg`` makes them: the command set's fragments, then the data set's."""
    pdvs = []
    pieces = list(fragments(command, max_pdu))
    pdvs += [_MORE_COMMAND_FRAGMENT + p for p in pieces[:-1]]
    pdvs.append(LAST_COMMAND_FRAGMENT + pieces[-1])
    if identifier:
        pieces = list(fragments(identifier, max_pdu))
        pdvs += [_FIRST_DATA_FRAGMENT + p for p in pieces[:-1]]
        pdvs.append(_LAST_DATA_FRAGMENT + pieces[-1])
    return pdvs


def encode_pdus(context_id: int, pdvs: list[bytes]) -> bytes:
    """One P-DATA-TF PDU per PDV (as pynetdicom sends them), concatenated."""
    return b"".join(reactor.encode_p_data_tf(context_id, pdv) for pdv in pdvs)


# --------------------------------------------------------------------------- sending


_send_locks: weakref.WeakKeyDictionary[AssociationSocket, threading.Lock] = weakref.WeakKeyDictionary()
_send_locks_guard = threading.Lock()


def _lock_of(sock: AssociationSocket) -> threading.Lock:
    lock = _send_locks.get(sock)
    if lock is None:
        with _send_locks_guard:
            lock = _send_locks.setdefault(sock, threading.Lock())
    return lock


_library_socket_send = AssociationSocket.send


def _socket_send(self: AssociationSocket, bytestream: bytes) -> None:
    """``AssociationSocket.send``, one writer at a time (the DUL thread, or a C-FIND's responses)."""
    with _lock_of(self):
        _library_socket_send(self, bytestream)


_no_delay_done: weakref.WeakSet[AssociationSocket] = weakref.WeakSet()


def _no_delay(sock: AssociationSocket | None) -> None:
    """Turn Nagle's algorithm off on the association's socket (once).

    pynetdicom leaves it on. A C-FIND answer is a stream of small writes, the last of them (the
    final status) while earlier ones are not yet acknowledged: Nagle holds it back until the
    peer's delayed ACK, and findscu's whole query took 40-50 ms longer on loopback for it.
    """
    if sock is None or sock in _no_delay_done:
        return
    raw = getattr(sock, "socket", None)
    try:
        if raw is not None:
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError:
        pass  # (not TCP, or already closed)
    _no_delay_done.add(sock)


def _direct(dimse: DIMSEServiceProvider) -> AssociationSocket | None:
    """The association's socket if the responses may be written to it from this thread now."""
    dul = dimse.dul
    sock = dul.socket
    raw = getattr(sock, "socket", None)
    if raw is None or isinstance(raw, ssl.SSLSocket):
        return None  # (one SSL object must not be read and written from two threads at once)
    assoc = dimse.assoc
    if (dul.state_machine.current_state != "Sta6" or dul.to_provider_queue.qsize()
            or _handlers_log.isEnabledFor(logging.DEBUG)
            or not reactor.only_library_handlers(assoc, evt.EVT_FSM_TRANSITION)
            or not reactor.only_library_handlers(assoc, evt.EVT_PDU_SENT, standard_pdu_sent_handler)):
        return None
    return sock


_next_send_msg: Any = None


def _send_msg(self: DIMSEServiceProvider, primitive: Any, context_id: int) -> None:
    """``DIMSEServiceProvider.send_msg`` with C-FIND-RSP encoded by hand and, where it may be,
    written straight to the socket (see the module docstring)."""
    if type(primitive) is C_FIND and primitive.MessageIDBeingRespondedTo is not None and \
            reactor.only_library_handlers(self.assoc, evt.EVT_DIMSE_SENT, standard_dimse_sent_handler) and \
            not _handlers_log.isEnabledFor(logging.DEBUG):
        command = encode_command(primitive)
        if command is not None:
            _no_delay(self.dul.socket)
            identifier = primitive.Identifier.getvalue() if primitive.Identifier is not None else b""
            pdvs = message_pdvs(command, identifier, self.maximum_pdu_size)
            sock = _direct(self)
            if sock is not None:
                sock.send(encode_pdus(context_id, pdvs))  # (queues Evt17 itself if the peer is gone)
                return
            for pdv in pdvs:
                pdata = P_DATA()
                pdata.presentation_data_value_list.append((context_id, pdv))
                self.dul.send_pdu(pdata)
            return
    _next_send_msg(self, primitive, context_id)


# Pending responses allowed to wait in the association's send queue (see hold_back).
SEND_QUEUE_LIMIT = 16


def hold_back(assoc: Any, limit: int = SEND_QUEUE_LIMIT) -> None:
    """Hold the next response back while the network has not caught up with the last ones.

    For responses queued for the DUL thread (TLS, or a listener bound to the events the direct
    path skips): pynetdicom queues each response and asks for the next at once, so without this
    a 3000-match answer sat encoded in memory and a C-CANCEL took effect only after the 600-1500
    responses already queued had gone out (measured with dcmtk findscu --cancel 1). Responses
    written straight to the socket never wait in that queue: this returns at once.
    """
    dul = getattr(assoc, "dul", None)
    pending = getattr(dul, "to_provider_queue", None)
    if pending is None:
        return
    while pending.qsize() > limit and assoc.is_established:
        time.sleep(0.0005)


_installed = False


def install() -> None:
    """Route pynetdicom's C-FIND responses through this module (idempotent; after
    :func:`node.dimse.compat.store_messages.install`, whose ``send_msg`` this one wraps)."""
    global _installed, _next_send_msg
    if _installed:
        return
    service_class.encode = _encode  # type: ignore[attr-defined]
    AssociationSocket.send = _socket_send  # type: ignore[method-assign]
    _next_send_msg = DIMSEServiceProvider.send_msg
    DIMSEServiceProvider.send_msg = _send_msg  # type: ignore[method-assign]
    _installed = True
