"""Receiving instances: the C-STORE handler that writes what a peer sends (C-GET sub-operations or
a C-MOVE) into a folder, and the storage SCP a C-MOVE sends to (``fetch``'s ``receive_port``).

Used by :func:`node.scu.client.fetch`, which starts the receiver before the C-MOVE request and
stops it once the final response is in.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import ssl
import tempfile
import threading
from pathlib import Path
from typing import Any, Protocol

from pynetdicom import AE, evt
from pynetdicom.dsutils import encode_file_meta
from pynetdicom.presentation import StoragePresentationContexts

from iods.uids import RAW_DATA_STORAGE, valid_uid
from node.dimse import syntaxes
from node.dimse.compat import client as compat_client
from node.dimse.compat import receive as compat_receive
from node.dimse.status import SUCCESS as STATUS_SUCCESS

log = logging.getLogger("modelnode.scu")


# What a C-GET requestor or a C-MOVE receiver accepts, one presentation context each, so the
# sender can keep a compressed file compressed.

# How long the associations of the C-MOVE receiver (fetch's receive_port) get to end by themselves
# once the C-MOVE is over, before they are cut (node.dimse.compat.client.stop_server). A peer releases its
# sub-association before it sends the final C-MOVE response, so this is only spent on one that is
# stuck (in a TLS handshake, or waiting for an A-ASSOCIATE-RQ that never comes).
RECEIVER_CLOSE_GRACE = 2.0


class _Limits(Protocol):
    """What the receiver takes from a :class:`node.scu.client.Options` (which imports this module)."""

    max_pdu: int
    acse_timeout: float
    network_timeout: float
    dimse_timeout: float


def safe_name(sop_instance: str) -> str:
    """A file name for a received instance: its UID when it is a well-formed UID, never a path."""
    uid = (sop_instance or "").strip()
    if valid_uid(uid):
        return f"{uid}.dcm"
    return f"instance-{hashlib.sha256(uid.encode('utf-8', 'replace')).hexdigest()[:32]}.dcm"


class Receiver:
    """Writes the instances a peer sends (C-GET sub-operations or a C-MOVE) into ``out_dir`` as received."""

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = out_dir
        self.files: list[Path] = []
        self.lock = threading.Lock()

    def handle_store(self, event: Any) -> int:
        try:
            name = safe_name(str(event.request.AffectedSOPInstanceUID))
            fd, tmp = tempfile.mkstemp(suffix=".part", dir=self.out_dir)
            received, received_file = compat_receive.received_file(event.request)
            if received is not None:
                # Chunked receive (pynetdicom's STORE_RECV_CHUNKED_DATASET, set when this runs
                # inside the node): the data set is already a Part-10 file on disk, and the
                # request's DataSet is an empty stand-in (node.dimse.compat.store_messages).
                # Moved, not copied: a receive file left in the store's tmp/ would stay there.
                os.close(fd)
                if received_file is not None and not getattr(received_file, "closed", True):
                    received_file.close()
                shutil.move(received, tmp)
            else:
                with os.fdopen(fd, "wb") as fh:
                    # The data set bytes as received, behind a File Meta naming the context's syntax.
                    fh.write(b"\x00" * 128 + b"DICM")
                    fh.write(encode_file_meta(event.file_meta))
                    fh.write(event.request.DataSet.getvalue())
            path = self.out_dir / name
            os.replace(tmp, path)
        except Exception as exc:  # noqa: BLE001 (any failure becomes a C-STORE failure status)
            log.error("cannot write a received instance: %s", exc)
            return 0xA700
        with self.lock:
            self.files.append(path)
        return STATUS_SUCCESS


def start_receiver(ae_title: str, address: tuple[str, int], receiver: Receiver, options: _Limits,
                   ssl_context: ssl.SSLContext | None = None) -> Any:
    """The storage SCP for a C-MOVE to ``ae_title``; stop it with :func:`stop_receiver`.

    ``ssl_context``: a server context from node.security.tls, which leaves the handshake of an accepted
    connection to the association's thread, under a socket timeout.
    """
    ae = AE(ae_title=ae_title)
    ae.maximum_pdu_size = options.max_pdu
    ae.acse_timeout = options.acse_timeout
    ae.network_timeout = options.network_timeout
    ae.dimse_timeout = options.dimse_timeout
    classes = [str(RAW_DATA_STORAGE)] + [str(cx.abstract_syntax) for cx in StoragePresentationContexts]
    for sop in dict.fromkeys(classes):
        ae.add_supported_context(sop, syntaxes.STORAGE if sop != RAW_DATA_STORAGE else list(syntaxes.UNCOMPRESSED))
    return ae.start_server(address, block=False, ssl_context=ssl_context,
                           evt_handlers=[(evt.EVT_C_STORE, receiver.handle_store), (evt.EVT_CONN_OPEN, compat_client.daemon_dul)])


def stop_receiver(server: Any) -> None:
    """Stop a receiver from :func:`start_receiver`, giving its associations
    :data:`RECEIVER_CLOSE_GRACE` seconds to end by themselves before they are cut."""
    compat_client.stop_server(server, RECEIVER_CLOSE_GRACE)
