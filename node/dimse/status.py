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

# N-CREATE, N-SET, N-GET, N-ACTION (PS3.7 C.4 and 10.1).
INVALID_ATTRIBUTE_VALUE = 0x0106  # a value the node cannot use (e.g. an unknown Retrieve AE Title)
N_PROCESSING_FAILURE = 0x0110  # the N- services' "processing failure"
NO_SUCH_SOP_INSTANCE = 0x0112  # N- services outside UPS: no such instance
NO_SUCH_ARGUMENT = 0x0114  # N-ACTION: a required argument is missing
INVALID_ARGUMENT_VALUE = 0x0115  # N-ACTION: an argument has a value the action cannot take
MISSING_ATTRIBUTE = 0x0120  # N-CREATE: a required attribute is absent
MISSING_ATTRIBUTE_VALUE = 0x0121  # N-CREATE: a required attribute is present but empty
NO_SUCH_ACTION = 0x0123  # N-ACTION: an Action Type ID the SOP class does not define

# Unified Procedure Step (PS3.4 CC.2, the service statuses of each DIMSE service; PS3.4 Table
# CC.1.1-2 says which state change answers which).
UPS_CREATED_WITH_MODIFICATIONS = 0xB300
UPS_ALREADY_CANCELED = 0xB304  # warning: already in the requested state of CANCELED
UPS_COERCED = 0xB305
UPS_ALREADY_COMPLETED = 0xB306  # warning: already in the requested state of COMPLETED
UPS_MAY_NO_LONGER_BE_UPDATED = 0xC300  # COMPLETED or CANCELED
UPS_WRONG_TRANSACTION_UID = 0xC301  # the correct Transaction UID was not provided
UPS_ALREADY_IN_PROGRESS = 0xC302
UPS_MAY_ONLY_BECOME_SCHEDULED_BY_CREATE = 0xC303
UPS_FINAL_STATE_NOT_MET = 0xC304  # the final state requirements are not met
UPS_NO_SUCH_INSTANCE = 0xC307  # no such UPS instance on this SCP
UPS_UNKNOWN_RECEIVING_AE = 0xC308  # subscribe: the Receiving AE is not a peer the node can call
UPS_STATE_NOT_SCHEDULED = 0xC309  # N-CREATE: Procedure Step State is not SCHEDULED
UPS_NOT_IN_PROGRESS = 0xC310
UPS_ALREADY_COMPLETED_FAILURE = 0xC311  # cancel a COMPLETED UPS
UPS_PERFORMER_UNREACHABLE = 0xC312
UPS_PERFORMER_WILL_NOT_CANCEL = 0xC313
UPS_ACTION_NOT_APPROPRIATE = 0xC314  # e.g. suspend a subscription to one instance


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
