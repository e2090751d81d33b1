"""systemd integration without a dependency: sd_notify over the NOTIFY_SOCKET datagram socket.

``Type=notify`` units wait for ``READY=1``; ``WatchdogSec=`` expects ``WATCHDOG=1`` at least
every ``WATCHDOG_USEC`` microseconds (we ping at a third of that, as sd_watchdog_enabled(3)
suggests half or less). Outside systemd (no NOTIFY_SOCKET) every call is a no-op.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Callable

# Named as before node/ was split into stages, so that log filters and greps keep working.
log = logging.getLogger("node.systemd")


def notify(message: str) -> bool:
    """Send one sd_notify message; True if a NOTIFY_SOCKET was there to receive it."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):  # abstract namespace socket
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(message.encode())
        return True
    except OSError as exc:
        log.warning("sd_notify(%s) failed: %s", message.split("\n")[0], exc)
        return False


def watchdog_interval() -> float | None:
    """Seconds between WATCHDOG=1 pings, or None when systemd set no watchdog for us."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        return max(0.5, int(usec) / 1e6 / 3)
    except ValueError:
        return None


class Watchdog:
    """Pings WATCHDOG=1 while ``healthy()`` holds, so a wedged node is restarted by systemd."""

    def __init__(self, healthy: Callable[[], bool] = lambda: True, interval: float | None = None) -> None:
        self.interval = interval if interval is not None else watchdog_interval()
        self.healthy = healthy
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self.interval is None:
            return
        self._thread = threading.Thread(target=self._run, name="modelnode-watchdog", daemon=True)
        self._thread.start()
        log.info("systemd watchdog: pinging every %.1f s", self.interval)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            if self.healthy():
                notify("WATCHDOG=1")
            else:
                log.error("health check failed: withholding the watchdog ping so systemd restarts the node")

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(2)
