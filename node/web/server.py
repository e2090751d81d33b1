"""The console's HTTP server: uvicorn on a thread of the node's process, started and stopped with it.

The socket is bound here, before uvicorn runs, so that a port in use is reported with the
address (:class:`WebBindError`) instead of ending a thread quietly; the node logs it as an error
and goes on serving DICOM without the console (node.dimse.server). Beyond loopback the console speaks HTTPS only, with the node's ``[tls]`` certificate
and key (node.config refuses the configuration otherwise).
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import threading
import time
from typing import Any

from node.ops.audit import AuditLog

log = logging.getLogger("modelnode.web")


class WebBindError(OSError):
    """The console cannot listen on its address."""


class WebServer:
    """``start()`` binds and serves in a daemon thread; ``stop()`` ends the requests in flight and joins it."""

    def __init__(self, config: Any, app: Any, write_lock: threading.Lock, audit: AuditLog | None = None) -> None:
        self.config = config
        self.app = app
        self.write_lock = write_lock
        self.audit = audit
        self._server: Any = None
        self._thread: threading.Thread | None = None
        self._sock: socket.socket | None = None

    @property
    def tls(self) -> bool:
        w, t = self.config.web, self.config.tls
        # Loopback stays plain HTTP (a TLS proxy in front, or the administrator's own browser);
        # anywhere else HTTPS with the node's certificate.
        return not ipaddress.ip_address(w.bind).is_loopback and bool(t.certificate and t.private_key)

    @property
    def port(self) -> int:
        return self._sock.getsockname()[1] if self._sock is not None else self.config.web.port

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.config.web.bind}:{self.port}/"

    def start(self, timeout: float = 10.0) -> None:
        import uvicorn

        from node.web.app import build_app

        w = self.config.web
        family = socket.AF_INET6 if ipaddress.ip_address(w.bind).version == 6 else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((w.bind, w.port))
            sock.listen(128)
        except OSError as exc:
            sock.close()
            raise WebBindError(exc.errno, f"web console cannot listen on {w.bind}:{w.port}: {exc.strerror or exc} "
                                          "(set [web] port, or enabled = false)") from exc
        self._sock = sock
        asgi = build_app(self.config, self.app.db, self.app.store, self.app.registry, write_lock=self.write_lock,
                         audit=self.audit, secure_cookies=self.tls)
        tls = {"ssl_certfile": self.config.tls.certificate, "ssl_keyfile": self.config.tls.private_key} if self.tls else {}
        # log_config None: the node's logging stays as configured; access_log off: it prints
        # query strings (node.web.app.RequestLog logs method, path and status instead). No
        # websockets: the console has none, and an unused protocol is only attack surface.
        uv = uvicorn.Config(asgi, log_config=None, access_log=False, lifespan="off", server_header=False, ws="none",
                            proxy_headers=False, timeout_graceful_shutdown=5, **tls)
        logging.getLogger("uvicorn.error").setLevel(logging.WARNING)
        self._server = uvicorn.Server(uv)
        # uvicorn installs signal handlers only on the main thread: on this one it leaves the
        # node's SIGTERM handling alone.
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [sock]}, name="modelnode-web",
                                        daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started and self._thread.is_alive() and time.monotonic() < deadline:
            self._thread.join(0.02)  # ends early if uvicorn gives up (a bad certificate, say)
        if not self._server.started:
            self.stop()
            raise WebBindError(0, f"web console on {w.bind}:{w.port} did not start (see the log above)")
        log.info("web console on %s", self.url)
        if not any("console" in u.permissions for u in self.config.users):
            # The console is on by default; without this line a newcomer meets a login page no
            # one can pass and nothing that says why.
            log.warning("no [[users]] entry has the console permission, so nobody can sign in to the console: "
                        "add one (passcode_hash from `modelnode config hash-passcode`, permissions "
                        "[\"console\", \"review\"]; docs/console.md)")

    def stop(self, timeout: float = 10.0) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None
