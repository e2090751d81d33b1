"""User Identity Negotiation (PS3.7 D.3.3.7): username and passcode checked against ``[[users]]``.

Only identity type 2 (username and passcode) is verified. Type 1 (a username alone) proves
nothing, and Kerberos, SAML and JWT (types 3-5) need infrastructure the node does not have:
all of them are rejected. A caller that sends no identity is accepted unless
``[security] require_user_identity`` is on.

Passcodes are stored as PBKDF2-HMAC-SHA256 (``pbkdf2-sha256$ITERATIONS$SALT$HASH``, made by
``modelnode config hash-passcode``), never in clear and not as a bare SHA-256: configuration
files get copied into backups, tickets and repositories, and an unsalted SHA-256 of a
human-chosen passcode falls to a GPU at billions of guesses a second. 600,000 iterations
(OWASP's 2023 figure) cost about 0.3 s of one core here, once per association with an identity;
a successful check is then remembered for the life of the process (keyed by an HMAC under a
random per-process key, so the cache holds nothing an attacker could reuse), and checks run one
at a time so that a flood of wrong passcodes occupies one core, not all of them.

Note that User Identity travels in clear on a plain connection: require TLS where it matters.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from node.dimse.association import state_of

log = logging.getLogger("modelnode.identity")

SCHEME = "pbkdf2-sha256"
DEFAULT_ITERATIONS = 600_000
USERNAME = 1
USERNAME_AND_PASSCODE = 2
_TYPE_NAMES = {1: "username only", 2: "username and passcode", 3: "Kerberos", 4: "SAML", 5: "JWT"}
MAX_FIELD = 1024  # bytes; a longer username or passcode is an attack, not a user


def hash_passcode(passcode: str, *, iterations: int = DEFAULT_ITERATIONS, salt: bytes | None = None) -> str:
    salt = salt if salt is not None else os.urandom(16)
    digest = hashlib.pbkdf2_hmac("sha256", passcode.encode("utf-8"), salt, iterations)
    return f"{SCHEME}${iterations}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def verify_passcode(stored: str, passcode: bytes) -> bool:
    """Constant-time check of ``passcode`` against a :func:`hash_passcode` string."""
    try:
        scheme, iterations, salt, expected = stored.split("$")
        if scheme != SCHEME:
            return False
        digest = hashlib.pbkdf2_hmac("sha256", passcode, base64.b64decode(salt), int(iterations))
        return hmac.compare_digest(digest, base64.b64decode(expected))
    except (ValueError, TypeError):
        return False


@dataclass(frozen=True)
class IdentityResult:
    ok: bool
    username: str | None = None
    reason: str = ""  # why it failed: for the audit log and the warning, never shown to the peer


def _text(value: Any) -> str:
    raw = bytes(value or b"")
    return raw.decode("utf-8", "replace").strip()


class IdentityVerifier:
    """Checks user identities against ``cfg.users``; thread-safe."""

    def __init__(self, cfg: Any, *, cache_size: int = 256) -> None:
        self.users = {u.username: u for u in cfg.users}
        self.required = bool(cfg.security.require_user_identity)
        self._key = os.urandom(32)
        self._ok: OrderedDict[bytes, str] = OrderedDict()
        self._cache_size = cache_size
        self._cache_lock = threading.Lock()
        self._derive_lock = threading.Lock()

    def verify(self, user_id_type: int | None, primary: bytes | None, secondary: bytes | None) -> IdentityResult:
        """The outcome for one request's identity item (``user_id_type`` None: the request had none)."""
        if user_id_type is None:
            if self.required:
                return IdentityResult(False, None, "no user identity, and security.require_user_identity is on")
            return IdentityResult(True)
        primary, secondary = bytes(primary or b""), bytes(secondary or b"")
        if len(primary) > MAX_FIELD or len(secondary) > MAX_FIELD:
            return IdentityResult(False, None, "user identity field too long")
        username = _text(primary)
        if user_id_type != USERNAME_AND_PASSCODE:
            kind = _TYPE_NAMES.get(user_id_type, f"type {user_id_type}")
            return IdentityResult(False, username or None, f"identity type {kind} is not supported (username and passcode only)")
        user = self.users.get(username)
        key = hmac.new(self._key, primary + b"\0" + secondary, hashlib.sha256).digest()
        with self._cache_lock:
            if key in self._ok:
                self._ok.move_to_end(key)
                return IdentityResult(True, self._ok[key])
        if user is None:
            # Spend the same time as a real check, so the answer's delay does not reveal which
            # usernames exist.
            with self._derive_lock:
                hashlib.pbkdf2_hmac("sha256", secondary, b"\0" * 16, DEFAULT_ITERATIONS)
            return IdentityResult(False, username or None, "unknown user")
        with self._derive_lock:
            ok = verify_passcode(user.passcode_hash, secondary)
        if not ok:
            return IdentityResult(False, username, "wrong passcode")
        with self._cache_lock:
            self._ok[key] = username
            while len(self._ok) > self._cache_size:
                self._ok.popitem(last=False)
        return IdentityResult(True, username)

    def verify_assoc(self, assoc: Any) -> IdentityResult:
        """The identity item of a requested association (call in EVT_REQUESTED or later)."""
        item = assoc.requestor.user_identity
        if item is None:
            return self.verify(None, None, None)
        return self.verify(item.user_identity_type, item.primary_field, item.secondary_field)

    def handle_user_id(self, event: Any) -> tuple[bool, bytes | None]:
        """An ``evt.EVT_USER_ID`` handler (pynetdicom rejects the association on False).

        When node.security.guard already checked this association in EVT_REQUESTED, its verdict
        is reused rather than paying for PBKDF2 twice.
        """
        state = state_of(event.assoc)
        done = state.identity
        if isinstance(done, IdentityResult):
            return done.ok, None
        result = self.verify(event.user_id_type, event.primary_field, event.secondary_field)
        state.identity = result
        if result.ok and result.username:
            state.user = result.username
        return result.ok, None
