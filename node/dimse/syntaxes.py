"""The transfer syntaxes the node accepts and proposes, in one place."""

from __future__ import annotations

from pydicom import uid as pdu

UNCOMPRESSED: tuple[str, str] = (pdu.ExplicitVRLittleEndian, pdu.ImplicitVRLittleEndian)

# Storage, as an SCP and as a C-GET / C-MOVE receiver. The uncompressed pair comes first (the
# C-GET requestor proposes it in one context and each of the others in a context of its own).
# As an acceptor the requestor's order decides (node.dimse.compat.contexts), so this order only
# matters where the node proposes.
STORAGE: list[str] = [
    *UNCOMPRESSED,
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

# Verification and Query/Retrieve.
QUERY: list[str] = list(UNCOMPRESSED)
