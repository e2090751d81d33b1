"""pynetdicom's logger of received DIMSE messages, made to survive an N-GET of every attribute.

pynetdicom 3.0.4 binds ``standard_dimse_recv_handler`` to every association; for an N-GET-RQ
whose Attribute Identifier List is empty (PS3.7 10.1.2.1.4: "all attributes", what a UPS
watcher sends to read a whole workitem) its ``_recv_n_get_rq`` takes ``len(None)``, and the node
logged an ERROR with a traceback for a valid request (the request itself was still served).
:func:`install` replaces that one function with a copy that says "all attributes" instead.
"""

from __future__ import annotations

import logging
from typing import Any

from pynetdicom import _handlers

_library_recv_n_get_rq = _handlers._recv_n_get_rq


def _recv_n_get_rq(event: Any) -> list[str]:
    """``_handlers._recv_n_get_rq`` for a request that may ask for all attributes."""
    cs = event.message.command_set
    if cs.get("AttributeIdentifierList", None) is not None:
        return _library_recv_n_get_rq(event)
    lines = [
        f"{' INCOMING DIMSE MESSAGE ':=^76}",
        "Message Type                  : N-GET RQ",
        f"Message ID                    : {cs.MessageID}",
        f"Requested SOP Class UID       : {cs.RequestedSOPClassUID.name}",
        f"Requested SOP Instance UID    : {cs.RequestedSOPInstanceUID}",
        "Attribute Identifier List     : all attributes",
        f"{' END DIMSE MESSAGE ':=^76}",
    ]
    log = logging.getLogger("pynetdicom.events")
    for line in lines:
        log.debug(line)
    return lines


def install() -> None:
    """Process-wide and idempotent."""
    _handlers._recv_n_get_rq = _recv_n_get_rq  # type: ignore[attr-defined]
