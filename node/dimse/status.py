"""DIMSE status codes and how to read them (PS3.7 Annex C, PS3.4 B.2.3 and C.4).

Every status the node sends or tests is named here once.
"""

from __future__ import annotations

SUCCESS = 0x0000
PENDING = 0xFF00
PENDING_WARNING = 0xFF01
CANCEL = 0xFE00

# Refusals and failures the node sends.
DUPLICATE_SOP_INSTANCE = 0x0111  # PS3.7 C.4.7: this UID is already stored with other content
INVALID_SOP_INSTANCE = 0x0117  # PS3.7 C.4.11: the SOP Instance UID is not a UID
SOP_CLASS_NOT_SUPPORTED = 0x0122  # request names a class other than the context's
NOT_AUTHORIZED = 0x0124  # PS3.7 C.5: Refused: Not Authorized
OUT_OF_RESOURCES = 0xA700  # PS3.4 B.2.3: disk full or I/O error; nothing stored, the sender may retry
IDENTIFIER_DOES_NOT_MATCH = 0xA900  # dataset or identifier does not match the SOP class
UNABLE_TO_PROCESS = 0xC000  # C-FIND/MOVE/GET: the identifier could not be decoded
UNABLE_TO_READ_INDEX = 0xC001  # C-FIND/MOVE/GET: the node's index could not be read
MODEL_REFUSED = 0xC100  # C-STORE "cannot understand": a model object that fails verification
CANNOT_UNDERSTAND = 0xC210  # C-STORE: the dataset does not parse
PROCESSING_FAILURE = 0xC211  # anything unexpected on our side (also pynetdicom's own code)


def category(status: int) -> str:
    """success, warning, pending, cancel or failure: how a DIMSE status reads (PS3.7 C)."""
    if status == SUCCESS:
        return "success"
    if status in (0x0001, 0x0107, 0x0116) or 0xB000 <= status <= 0xBFFF:
        return "warning"
    if status in (PENDING, PENDING_WARNING):
        return "pending"
    if status == CANCEL:
        return "cancel"
    return "failure"


def is_stored(status: int) -> bool:
    """A C-STORE status meaning the peer kept the instance: success or a warning."""
    return category(status) in ("success", "warning")
