"""Which SOP classes the Storage SCP accepts: pynetdicom's list, the standard's retired and other
storage classes it lacks, and, per association, unknown (private) ones.

pynetdicom picks the service class of a request by its SOP Class UID and aborts the association
for one it does not know, so every class accepted here is also registered with pynetdicom as a
storage class (``register_uid``, its public API).
"""

from __future__ import annotations

import importlib
import logging
import threading
from typing import Any

from pydicom import uid as pdu
from pynetdicom.presentation import AllStoragePresentationContexts, PresentationContext
from pynetdicom.service_class import ServiceClass, StorageServiceClass
from pynetdicom.sop_class import register_uid, uid_to_service_class

log = logging.getLogger("modelnode.server")

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


def serve_as_storage(uid: str) -> None:
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
        # StorageServiceClass: registered by an earlier Node of this process (serve_as_storage).
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
                serve_as_storage(uid)
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
