"""Disk watermarks with hysteresis: stop storing before the disk is full, resume with room to spare.

:class:`DiskGuard` answers :meth:`~DiskGuard.accepting` for the data directory's file system.
It turns *full* when use reaches ``high_water_percent`` (or free space falls below
``min_free_mb``) and turns back only when use is at or below ``low_water_percent`` (and free
space is at least ``min_free_mb``): the gap keeps a node that hovers around one mark from
flapping between accepting and refusing on every instance. The C-STORE handler answers 0xA700
(Refused: Out of Resources) while the guard says no; senders retry later, which PACS do.

Why a mark below 100%: the SQLite WAL, the job results, the audit log and the file being
received all need room after the last instance is accepted; a file system that really fills
fails them in the middle instead of refusing cleanly at the door.

Use is measured as the node sees it: ``f_bavail`` (blocks an unprivileged user may still use)
against ``f_blocks``, so ext4's reserved blocks count as used. ``statvfs`` is cheap but not
free, so it is re-read at most every ``interval`` seconds.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("modelnode.diskguard")


@dataclass(frozen=True)
class DiskUsage:
    total_bytes: int
    free_bytes: int  # available to unprivileged users

    @property
    def used_percent(self) -> float:
        if self.total_bytes <= 0:
            return 100.0
        return 100.0 * (self.total_bytes - self.free_bytes) / self.total_bytes


def usage(path: str | Path, statvfs: Callable[[str], Any] = os.statvfs) -> DiskUsage:
    st = statvfs(str(path))
    return DiskUsage(total_bytes=st.f_blocks * st.f_frsize, free_bytes=st.f_bavail * st.f_frsize)


class DiskGuard:
    def __init__(self, path: str | Path, high_water_percent: float = 95.0, low_water_percent: float = 90.0,
                 min_free_mb: int = 0, *, interval: float = 0.5,
                 statvfs: Callable[[str], Any] = os.statvfs, clock: Callable[[], float] = time.monotonic) -> None:
        if not 0 < low_water_percent <= high_water_percent <= 100:
            raise ValueError("need 0 < low_water_percent <= high_water_percent <= 100")
        self.path = Path(path)
        self.high = high_water_percent
        self.low = low_water_percent
        self.min_free = min_free_mb << 20
        self.interval = interval
        self._statvfs = statvfs
        self._clock = clock
        self._lock = threading.Lock()
        self._accepting = True
        self._checked_at: float | None = None
        self.last: DiskUsage | None = None

    @classmethod
    def from_config(cls, cfg: Any, **kw: Any) -> DiskGuard:
        st = cfg.storage
        return cls(cfg.data_dir, st.high_water_percent, st.low_water_percent, st.min_free_mb, **kw)

    def accepting(self) -> bool:
        """False while the file system is above its high-water mark (see the module docstring)."""
        now = self._clock()
        with self._lock:
            if self._checked_at is not None and now - self._checked_at < self.interval:
                return self._accepting
            self._checked_at = now
            try:
                u = usage(self.path, self._statvfs)
            except OSError as exc:
                # Cannot tell: keep the last answer; the store itself reports real I/O errors.
                log.warning("disk guard: cannot stat %s: %s", self.path, exc)
                return self._accepting
            self.last = u
            if self._accepting:
                if u.used_percent >= self.high or u.free_bytes < self.min_free:
                    self._accepting = False
                    log.error("disk %s is %.1f%% used (%d MiB free), at or above the high-water mark of %.0f%%: "
                              "refusing C-STORE (0xA700) until it is back at %.0f%%",
                              self.path, u.used_percent, u.free_bytes >> 20, self.high, self.low)
            elif u.used_percent <= self.low and u.free_bytes >= self.min_free:
                self._accepting = True
                log.warning("disk %s is %.1f%% used, at or below the low-water mark of %.0f%%: accepting C-STORE again",
                            self.path, u.used_percent, self.low)
            return self._accepting

    def state(self) -> dict[str, float]:
        """For the metrics gauges and ``modelnode status``."""
        accepting = self.accepting()
        u = self.last or usage(self.path, self._statvfs)
        return {"used_percent": round(u.used_percent, 2), "free_bytes": float(u.free_bytes),
                "accepting": 1.0 if accepting else 0.0}
