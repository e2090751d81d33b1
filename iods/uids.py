"""Deterministic UIDs.

pydicom's ``generate_uid(prefix=None)`` is random whatever entropy it is given, so derived UIDs
(a model's series, a result for a given source series and model) use a name-based UUID
(RFC 4122 version 5) under the ``2.25`` root, as PS3.5 B.2 allows: the same inputs always give
the same UID, and no organisation root needs registering.
"""

from __future__ import annotations

import re
import uuid

from pydicom.uid import UID

# Namespace for every UID modelnode derives; changing it would re-key every derived UID.
_NAMESPACE = uuid.UUID("9a3b0f52-6a7e-5c1d-8a43-6d6f64656c6e")


def derived_uid(*parts: str) -> UID:
    """A stable ``2.25.<decimal>`` UID for the tuple ``parts``."""
    name = "\x1f".join(parts)
    return UID(f"2.25.{uuid.uuid5(_NAMESPACE, name).int}")


# --------------------------------------------------------------------------- constants
# One definition each; every module of the node imports them from here.

# The host SOP class of a model object (and of any Raw Data a PACS sends).
RAW_DATA_STORAGE = UID("1.2.840.10008.5.1.4.1.1.66")
# Written in the File Meta of every file the node writes (model objects, received instances).
IMPLEMENTATION_CLASS_UID = UID("2.25.129394751271698390498262386262137618003")
IMPLEMENTATION_VERSION_NAME = "MODELNODE_010"

_UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")


_CONFORMANT_UID_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))+$")


def conformant_uid(value: str) -> bool:
    """A UID exactly as PS3.5 9.1 requires (no leading zeros): what the node itself writes."""
    return 0 < len(value) <= 64 and _CONFORMANT_UID_RE.match(value) is not None


def valid_uid(value: str) -> bool:
    """A UID the node accepts from a peer: digits and dots, at most 64 characters.

    More lenient than :func:`conformant_uid` (modalities do send components with leading
    zeros), and still enough for the node's safety: such a string can never be a path.
    """
    return 0 < len(value) <= 64 and _UID_RE.match(value) is not None


_UID_LIKE_RE = re.compile(r"^[0-9A-Za-z][0-9A-Za-z._-]*$")


def storable_uid(value: str) -> bool:
    """An identifier the node stores even though it may not be a valid UID (:func:`valid_uid`).

    Modalities do send malformed UIDs (hexadecimal digits, a UUID's dashes), and a node next to
    a PACS receives what they send, as Orthanc and dcmtk's storescp do: at most 64 characters of
    letters, digits, dots, dashes and underscores. Never a path (no slash, backslash, space or
    control character, no leading dot), and the node never names a file after it anyway.
    """
    return 0 < len(value) <= 64 and _UID_LIKE_RE.match(value) is not None and ".." not in value
