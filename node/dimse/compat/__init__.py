"""The one place that touches pynetdicom's internals, behind a version check.

modelnode replaces or reads private names of pynetdicom for speed and for behaviour the library
does not offer. Each module here holds one such concern:

* :mod:`.reactor`: the DUL and association reactors (waits instead of 1 ms polls, a PDU read in
  one buffer, P-DATA straight to the DIMSE layer, a reactor pause that holds);
* :mod:`.store_messages`: C-STORE-RQ decoded and C-STORE-RSP encoded by hand, served on the
  thread that received it;
* :mod:`.find_responses`: C-FIND responses whose identifiers the handler encoded, their command
  sets encoded by hand and written straight to the socket;
* :mod:`.receive`: where the chunked receive writes a dataset, and how a handler finds that file;
* :mod:`.contexts`: the per-association copy of the supported contexts, and the requestor's order
  of transfer syntaxes;
* :mod:`.client`: byte-exact sending, and ending a server's stuck associations;
* :mod:`.dimse_log`: pynetdicom's DIMSE message logger, fixed for an N-GET of all attributes.

Those names are not pynetdicom's API and may change in any release, so setup.cfg pins
pynetdicom to :data:`PYNETDICOM_VERSION`, and :func:`check` (run by every ``install_*`` before
anything is patched) refuses to go on, naming the version and the attribute, when the installed
pynetdicom differs or lacks one of the names. Patches are installed explicitly at start
(:func:`install_server` by node.dimse.server.Node; :func:`client.install_client` by
node.scu.send.send_file), never as a side effect of an import.
"""

from __future__ import annotations

from node.dimse.compat.guard import PYNETDICOM_VERSION, IncompatibleLibrary, check

__all__ = ["PYNETDICOM_VERSION", "IncompatibleLibrary", "check", "install_server"]


def install_server() -> None:
    """Process-wide pynetdicom settings for a node (idempotent):

    * datasets go to a file as they arrive, not into memory (a model can be 1 GiB);
    * the tuned reactors (:mod:`.reactor`), C-STORE messages (:mod:`.store_messages`) and
      C-FIND responses (:mod:`.find_responses`);
    * :func:`.contexts.copy_contexts` for the per-association copy of the supported contexts;
    * :mod:`.dimse_log`'s N-GET-RQ logger.
    """
    from pynetdicom import _config, transport

    from node.dimse.compat import contexts, dimse_log, find_responses, reactor, store_messages

    check()
    _config.STORE_RECV_CHUNKED_DATASET = True
    reactor.install()
    store_messages.install()
    find_responses.install()  # (wraps store_messages' send_msg)
    transport.deepcopy = contexts.copy_contexts  # type: ignore[attr-defined]
    dimse_log.install()
