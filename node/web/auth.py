"""Who may use the console: users, their roles, sessions and CSRF tokens.

Users are the ``[[users]]`` of the configuration, signed in with the passcode of DICOM user
identity (PBKDF2, :func:`node.security.identity.verify_passcode`), or named by a trusted reverse
proxy's header (``[web] proxy_user_header``). Roles are permissions of that entry: ``console``
reads every page, ``review`` also accepts and rejects results. A user without ``console`` cannot
sign in.

Sessions are random tokens held in the node's memory (nothing secret is derived from a key on
disk or in the repository); a restart signs everyone out. Each session has its own CSRF token,
which every form carries and every POST must return. Before a session exists, the login form is
protected the same way by a double-submit token in a cookie of its own.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from node.security.identity import DEFAULT_ITERATIONS, verify_passcode

SESSION_COOKIE = "modelnode_session"
LOGIN_COOKIE = "modelnode_login"
CSRF_FIELD = "csrf"
CONSOLE = "console"
REVIEW = "review"
MAX_FIELD = 1024  # a longer username or passcode is an attack, not a user


@dataclass(frozen=True)
class WebUser:
    name: str
    permissions: frozenset[str]

    def can(self, permission: str) -> bool:
        return permission in self.permissions


@dataclass
class Session:
    token: str
    user: WebUser
    csrf: str
    expires: float  # time.monotonic()
    via_proxy: bool = False


@dataclass
class Sessions:
    """Server-side sessions by token; thread-safe (pages run on a thread pool)."""

    lifetime_s: float
    _items: dict[str, Session] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def create(self, user: WebUser, *, via_proxy: bool = False) -> Session:
        s = Session(secrets.token_urlsafe(32), user, secrets.token_urlsafe(32), time.monotonic() + self.lifetime_s,
                    via_proxy)
        with self._lock:
            now = time.monotonic()
            for token in [t for t, old in self._items.items() if old.expires <= now]:
                del self._items[token]
            self._items[s.token] = s
        return s

    def get(self, token: str | None) -> Session | None:
        if not token or len(token) > 128:
            return None
        with self._lock:
            s = self._items.get(token)
            if s is not None and s.expires <= time.monotonic():
                del self._items[token]
                return None
            return s

    def drop(self, token: str | None) -> None:
        with self._lock:
            self._items.pop(token or "", None)


def csrf_ok(expected: str, given: Any) -> bool:
    return isinstance(given, str) and bool(expected) and hmac.compare_digest(expected.encode(), given.encode())


class Authenticator:
    """Checks a username and passcode, or a proxy's header, against the configured users."""

    def __init__(self, cfg: Any) -> None:
        self.users = {u.username: u for u in cfg.users}
        self.proxy_header = cfg.web.proxy_user_header.lower()
        self.trusted = {ipaddress.ip_address(a) for a in cfg.web.trusted_proxies}
        # PBKDF2 one check at a time: a flood of sign-ins occupies one core, not the node's.
        self._derive_lock = threading.Lock()

    def console_users(self) -> list[str]:
        return sorted(name for name, u in self.users.items() if CONSOLE in u.permissions)

    def _user(self, name: str) -> WebUser | None:
        u = self.users.get(name)
        if u is None or CONSOLE not in u.permissions:
            return None
        return WebUser(name, frozenset(u.permissions))

    def check_passcode(self, username: str, passcode: str) -> WebUser | None:
        if len(username) > MAX_FIELD or len(passcode) > MAX_FIELD:
            return None
        u = self.users.get(username)
        with self._derive_lock:
            if u is None:
                # The same time as a real check: the delay must not tell which names exist.
                hashlib.pbkdf2_hmac("sha256", passcode.encode(), b"\0" * 16, DEFAULT_ITERATIONS)
                return None
            ok = verify_passcode(u.passcode_hash, passcode.encode("utf-8"))
        return self._user(username) if ok else None

    def from_proxy(self, headers: Any, client_host: str | None) -> WebUser | None:
        """The user a trusted reverse proxy names, or None (header off, untrusted peer, unknown user)."""
        if not self.proxy_header or not client_host:
            return None
        try:
            if ipaddress.ip_address(client_host) not in self.trusted:
                return None
        except ValueError:
            return None
        name = (headers.get(self.proxy_header) or "").strip()
        return self._user(name) if name else None
