"""pynetdicom as a client: byte-exact sending, and servers of the node's own that end promptly."""

from __future__ import annotations

import logging
import socket
import time
from typing import Any

from pynetdicom import _config

from node.dimse.compat.guard import check

log = logging.getLogger("modelnode.scu")


def install_client() -> None:
    """Send files as they are stored (idempotent; node.scu.send.send_file calls it).

    With ``_config.STORE_SEND_CHUNKED_DATASET`` set, ``send_c_store`` given a *path* streams the
    file's dataset bytes after its File Meta instead of re-encoding a Dataset. It only affects
    calls that pass a path, which in this code base are all made by send_file.

    Also the reactor checkpoint that keeps a request's response from the association reactor
    (:class:`node.dimse.compat.reactor._ReactorCheckpoint`).
    """
    from node.dimse.compat.reactor import install_checkpoint

    check()
    _config.STORE_SEND_CHUNKED_DATASET = True
    install_checkpoint()


def daemon_dul(event: Any) -> None:
    """EVT_CONN_OPEN of a receiver association: its DUL thread (not started yet) becomes a daemon.

    pynetdicom makes the DUL reader a non-daemon thread, so one blocked in a read kept the
    process alive after ``modelnode fetch --listen`` had printed its result. stop_server ends
    every association anyway; this is the backstop for one it could not end in time.
    """
    event.assoc.dul.daemon = True


def stop_server(server: Any, grace: float) -> None:
    """Stop an association server (the C-MOVE receiver) and end its associations, promptly.

    ``AssociationServer.shutdown()`` only stops accepting connections: an association already
    accepted lives on. One whose peer stopped talking sits in a blocking read (in the TLS
    handshake, or waiting for the A-ASSOCIATE-RQ) until the socket timeout, and pynetdicom's own
    abort waits for that read to return. So the associations get ``grace`` seconds to end by
    themselves; those still open are aborted and their sockets shut down, which wakes the read.
    """
    server.shutdown()  # no new connections; also joins the threads that handed them over
    assocs = server.active_associations
    deadline = time.monotonic() + grace
    for assoc in assocs:
        assoc.join(max(0.0, deadline - time.monotonic()))
    left = [a for a in assocs if a.is_alive() or a.dul.is_alive()]
    if not left:
        return
    log.warning("C-MOVE receiver %s: closing %d association(s) still open", server.ae_title, len(left))
    for assoc in left:
        if assoc.is_established:
            assoc.abort(block=False)  # an A-ABORT for the peer, if the DUL thread is free to send it
    for assoc in left:
        assoc.join(0.5)
        sock = getattr(assoc.dul.socket, "socket", None)
        if sock is not None and (assoc.is_alive() or assoc.dul.is_alive()):
            try:
                # The plain socket's shutdown: it makes a recv blocked in another thread return.
                # (SSLSocket.shutdown would also drop the SSL object that thread is reading with.)
                socket.socket.shutdown(sock, socket.SHUT_RDWR)
            except OSError:
                pass  # already closed
        if not assoc.is_established and assoc.requestor.primitive is None:
            # Still waiting for the A-ASSOCIATE-RQ: that wait lasts the ACSE timeout even with the
            # connection gone. None is what it returns on a timeout, and the thread then ends.
            assoc.dul.to_user_queue.put(None)
    for assoc in left:
        assoc.join(5)
        if assoc.dul.is_alive():
            assoc.dul.join(5)
