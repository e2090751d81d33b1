"""Security: the allow-list and per-peer permissions, user identity, the handler guard, the
disk guard and the TLS contexts."""
