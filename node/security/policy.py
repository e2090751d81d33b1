"""Who may do what: the allow-list and per-peer permissions, decided from the configuration.

Actions (``[[peers]] permissions``, ``[[users]] permissions``, ``[security] default_permissions``):

=================  ======================================================================
``echo``           C-ECHO
``store-images``   C-STORE of anything that is not a model object
``store-models``   C-STORE of model objects (Raw Data Storage with the modelnode block)
``query``          C-FIND, including the selection query
``retrieve``       C-MOVE and C-GET (of models and of anything else the node holds)
``tasks``          the UPS SOP classes (AI on request: create, claim, query, watch workitems),
                   which make the node retrieve from and send to its peers
=================  ======================================================================

A caller's permissions are those of its ``[[peers]]`` entry (matched by calling AE title and,
when the entry's ``host`` is an address, network or name, by the connection's address);
an unknown caller is rejected with the allow-list on and gets ``default_permissions`` with it
off. A verified user (node.security.identity) narrows them further: both the machine and the
person must be allowed (intersection). A caller left with no permission at all is rejected.

Pure decisions: no pynetdicom events, no audit, no database. :mod:`node.security.guard` applies
them to associations and requests.
"""

from __future__ import annotations

import ipaddress
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pynetdicom import sop_class as _sc

from node.config import PERMISSIONS, Config

ACTIONS = ("echo", "store-images", "store-models", "query", "retrieve", "tasks")
assert set(ACTIONS) == PERMISSIONS


# A-ASSOCIATE-RJ (PS3.8 9.3.4): result, source, reason
REJECT_CALLING_AE = (0x01, 0x01, 0x03)  # permanent, service user, calling AE title not recognized
REJECT_NO_REASON = (0x01, 0x01, 0x01)  # permanent, service user, no reason given

_VERIFICATION = {str(_sc.Verification)}
_FIND = {str(getattr(_sc, n)) for n in dir(_sc) if n.endswith("Find")}
_RETRIEVE = {str(getattr(_sc, n)) for n in dir(_sc) if n.endswith(("Move", "Get"))}
_TASKS = {str(getattr(_sc, n)) for n in dir(_sc) if n.startswith("UnifiedProcedureStep")}
_STORE_OR_RETRIEVE = {"store-images", "store-models", "retrieve"}


# --------------------------------------------------------------------------- host matching


class _Resolver:
    """Host names of peers, resolved at most every ``ttl`` seconds (a PACS behind DNS may move)."""

    def __init__(self, ttl: float = 300.0) -> None:
        self.ttl = ttl
        self._cache: dict[str, tuple[float, frozenset[str]]] = {}
        self._lock = threading.Lock()

    def addresses(self, name: str) -> frozenset[str]:
        now = time.monotonic()
        with self._lock:
            hit = self._cache.get(name)
            if hit and now - hit[0] < self.ttl:
                return hit[1]
        try:
            found = frozenset(str(ipaddress.ip_address(info[4][0].split("%")[0]))
                              for info in socket.getaddrinfo(name, None, proto=socket.IPPROTO_TCP))
        except (OSError, ValueError, UnicodeError):
            found = frozenset()
        with self._lock:
            self._cache[name] = (now, found)
        return found


_resolver = _Resolver()


def host_matches(host: str, address: str, resolve: Callable[[str], frozenset[str]] | None = None) -> bool:
    """Does a connection from ``address`` match a peer's ``host``?

    ``host`` may be an IP address, a network (``10.1.2.0/24``), ``*`` (any) or a host name
    (resolved; a name that does not resolve matches nothing: the allow-list fails closed).
    """
    host = (host or "").strip()
    if host in ("", "*"):
        return True
    try:
        addr = ipaddress.ip_address(address.split("%")[0])
    except ValueError:
        return False
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    try:
        if "/" in host:
            return addr in ipaddress.ip_network(host, strict=False)
        return addr == ipaddress.ip_address(host)
    except ValueError:
        pass
    return str(addr) in (resolve or _resolver.addresses)(host)


# --------------------------------------------------------------------------- decisions


@dataclass(frozen=True)
class Decision:
    ok: bool
    reason: str = ""
    permissions: frozenset[str] = frozenset()
    peer: str | None = None  # the [[peers]] entry that matched
    user: str | None = None  # the verified user, if any
    reject: tuple[int, int, int] = REJECT_NO_REASON
    identity_failed: bool = False


def permissions_for(cfg: Config, calling_ae: str, address: str, username: str | None = None,
                    resolve: Callable[[str], frozenset[str]] | None = None) -> Decision:
    """The caller's permissions (no identity verification here: ``username`` is taken as verified)."""
    calling = (calling_ae or "").strip()
    peer = cfg.peer(calling)
    matched: str | None = None
    if peer is not None and host_matches(peer.host, address, resolve):
        perms = frozenset(peer.permissions)
        matched = peer.ae_title
    elif cfg.node.allow_list:
        reason = (f"calling AE {calling!r} is not a known peer" if peer is None
                  else f"calling AE {calling!r} is known at {peer.host}, not {address}")
        return Decision(False, reason, reject=REJECT_CALLING_AE)
    else:
        # An AE title claimed from the wrong host is treated as unknown, not as that peer.
        perms = frozenset(cfg.security.default_permissions)
    if username is not None:
        user = cfg.user(username)
        perms &= frozenset(user.permissions) if user is not None else frozenset()
    if not perms:
        who = f"user {username!r} at {calling!r}" if username else f"calling AE {calling!r}"
        return Decision(False, f"{who} has no permissions", peer=matched, user=username)
    return Decision(True, "", perms, matched, username)


def allowed(cfg: Config, calling_ae: str, address: str, action: str, username: str | None = None) -> tuple[bool, str]:
    """May ``calling_ae`` at ``address`` (as verified ``username``) do ``action``? (ok, reason)."""
    if action not in PERMISSIONS:
        raise ValueError(f"unknown action {action!r}")
    d = permissions_for(cfg, calling_ae, address, username)
    if not d.ok:
        return False, d.reason
    if action not in d.permissions:
        return False, f"{(calling_ae or '').strip()!r} may not {action}"
    return True, ""


def prune_contexts(assoc: Any, permissions: frozenset[str]) -> None:
    """Before negotiation: stop accepting the contexts of services the caller may not use."""
    drop: set[str] = set()
    if "echo" not in permissions:
        drop |= _VERIFICATION
    if "query" not in permissions:
        drop |= _FIND
    if "retrieve" not in permissions:
        drop |= _RETRIEVE
    if "tasks" not in permissions:
        drop |= _TASKS
    keep_storage = bool(permissions & _STORE_OR_RETRIEVE)
    contexts = []
    for cx in assoc.acceptor.supported_contexts:
        uid = str(cx.abstract_syntax)
        if uid in drop:
            continue
        if not keep_storage and uid not in _VERIFICATION | _FIND | _RETRIEVE | _TASKS:
            continue
        contexts.append(cx)
    if len(contexts) != len(assoc.acceptor.supported_contexts):
        assoc.acceptor.supported_contexts = contexts
