"""Deterministic UIDs.

pydicom's ``generate_uid(prefix=None)`` is random whatever entropy it is given, so derived UIDs
(a model's series, a result for a given source series and model) use a name-based UUID
(RFC 4122 version 5) under the ``2.25`` root, as PS3.5 B.2 allows: the same inputs always give
the same UID, and no organisation root needs registering.
"""

from __future__ import annotations

import uuid

from pydicom.uid import UID

# Namespace for every UID modelnode derives; changing it would re-key every derived UID.
_NAMESPACE = uuid.UUID("9a3b0f52-6a7e-5c1d-8a43-6d6f64656c6e")


def derived_uid(*parts: str) -> UID:
    """A stable ``2.25.<decimal>`` UID for the tuple ``parts``."""
    name = "\x1f".join(parts)
    return UID(f"2.25.{uuid.uuid5(_NAMESPACE, name).int}")
