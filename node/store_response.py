"""C-STORE-RSP encoded by hand, the one DIMSE message a busy node sends for every instance.

pynetdicom 3.0 turns each response primitive into a pydicom Dataset, encodes it twice (once to
learn the Command Group Length, once to send) and validates every value on the way: about
0.5 ms of CPU per instance on the association's thread, while the sender waits for the answer.
A C-STORE-RSP has at most eight elements of four VRs, so :func:`encode_command` writes the same
bytes directly (PS3.7 9.3.1.2, Implicit VR Little Endian as PS3.7 6.3.1 requires).
``tests/test_store_response.py`` compares its output with pynetdicom's for every shape of
response the node sends.

:func:`install` wraps ``DIMSEServiceProvider.send_msg``. Anything the hand encoder does not cover
(another message, an Offending Element, a non-ASCII comment, a handler bound to
``EVT_DIMSE_SENT``, a command set larger than the peer's PDU) goes through pynetdicom unchanged.
"""

from __future__ import annotations

import struct
from typing import Any

from pynetdicom import evt
from pynetdicom._handlers import standard_dimse_sent_handler
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.pdu_primitives import P_DATA

C_STORE_RSP_FIELD = 0x8001
NO_DATASET = 0x0101
_LAST_COMMAND_FRAGMENT = b"\x03"  # PS3.8 E.2: command information, last fragment


def _element(tag: int, value: bytes) -> bytes:
    return struct.pack("<HHI", tag >> 16, tag & 0xFFFF, len(value)) + value


def _uid(value: str) -> bytes:
    raw = value.encode("ascii")
    return raw + b"\0" if len(raw) % 2 else raw


def encode_command(primitive: C_STORE) -> bytes | None:
    """The C-STORE-RSP command set for ``primitive``, or None where pynetdicom must do it."""
    if primitive.OffendingElement is not None or primitive.MessageIDBeingRespondedTo is None:
        return None
    status = primitive.Status
    if status is None:
        return None
    comment = primitive.ErrorComment
    elements = []
    if primitive.AffectedSOPClassUID is not None:
        elements.append(_element(0x00000002, _uid(str(primitive.AffectedSOPClassUID))))
    elements.append(_element(0x00000100, struct.pack("<H", C_STORE_RSP_FIELD)))
    elements.append(_element(0x00000120, struct.pack("<H", primitive.MessageIDBeingRespondedTo)))
    elements.append(_element(0x00000800, struct.pack("<H", NO_DATASET)))
    elements.append(_element(0x00000900, struct.pack("<H", status)))
    if comment is not None:
        try:
            raw = str(comment).encode("ascii")
        except UnicodeEncodeError:
            return None  # pydicom's character set handling decides
        elements.append(_element(0x00000902, raw + b" " if len(raw) % 2 else raw))
    if primitive.AffectedSOPInstanceUID is not None:
        elements.append(_element(0x00001000, _uid(str(primitive.AffectedSOPInstanceUID))))
    body = b"".join(elements)
    return _element(0x00000000, struct.pack("<I", len(body))) + body


_library_send_msg = DIMSEServiceProvider.send_msg


def _only_standard_handlers(assoc: Any) -> bool:
    return all(handler[0] is standard_dimse_sent_handler for handler in assoc.get_handlers(evt.EVT_DIMSE_SENT))


def _send_msg(self: DIMSEServiceProvider, primitive: Any, context_id: int) -> None:
    """``DIMSEServiceProvider.send_msg`` with C-STORE-RSP encoded by :func:`encode_command`.

    The event skipped, ``EVT_DIMSE_SENT``, has only pynetdicom's logging handler bound, and that
    handler does nothing for a C-STORE-RSP (pynetdicom 3.0.4).
    """
    if type(primitive) is C_STORE and _only_standard_handlers(self.assoc):
        command = encode_command(primitive)
        limit = self.maximum_pdu_size
        if command is not None and (limit == 0 or len(command) <= limit - 6):  # one fragment, as pynetdicom
            pdata = P_DATA()
            pdata.presentation_data_value_list.append((context_id, _LAST_COMMAND_FRAGMENT + command))
            self.dul.send_pdu(pdata)
            return
    _library_send_msg(self, primitive, context_id)


def install() -> None:
    """Route pynetdicom's message sending through :func:`_send_msg` (idempotent)."""
    if DIMSEServiceProvider.send_msg is not _send_msg:
        DIMSEServiceProvider.send_msg = _send_msg  # type: ignore[method-assign]
