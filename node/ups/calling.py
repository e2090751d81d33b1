"""How the UPS service calls a configured peer: its address and the client options.

Every association the UPS service opens (N-EVENT-REPORT to a subscriber, C-MOVE or C-GET from
a workitem's source) goes to a ``[[peers]]`` entry, as the node's AE title, with DICOM TLS when
that entry says ``tls = true``.
"""

from __future__ import annotations

from node.config import Config
from node.scu.client import Address, Options, RetryPolicy


def peer_address(cfg: Config, ae_title: str) -> Address:
    """The address of the ``[[peers]]`` entry ``ae_title``; LookupError when there is none."""
    peer = cfg.peer(ae_title)
    if peer is None:
        raise LookupError(f"{ae_title!r} is not a configured peer ([[peers]])")
    return Address(peer.ae_title, peer.host, peer.port)


def peer_options(cfg: Config, ae_title: str, *, retry: RetryPolicy, timeout: float) -> Options:
    """Client options for calling ``ae_title``: our AE title, ``timeout`` for every wait on the
    peer (connection at most 10 s), ``retry`` on transient failures, TLS per the peer entry."""
    from node.security import tls  # the ssl contexts are built only when a peer is called

    return Options(calling_ae=cfg.node.ae_title, acse_timeout=min(timeout, 30.0), dimse_timeout=timeout,
                   network_timeout=timeout, connect_timeout=min(timeout, 10.0), max_pdu=cfg.node.max_pdu or 262144,
                   retry=retry, tls=tls.tls_args(cfg, ae_title))
