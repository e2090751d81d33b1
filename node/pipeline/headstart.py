"""Run a series' model during its quiet time; the job takes the result if nothing changed.

A series becomes a job only after ``pipeline.quiet_seconds`` without a new instance (and once
its associations ended), because nobody can tell from the data whether more slices are coming.
On a node with nothing else to do, that wait is idle time. When the prefetcher has decoded a
group, :class:`HeadStart` runs what the job would run first: selection, then the selected
model and the result object (SEG or SR), on the prefetcher's thread. Nothing is stored, audited
or exported then; that waits for the job, as before.

When the job runs, it selects again (cheap, and authoritative) and takes the head start only if
it was computed for the same model from the same instances, compared by the SHA-256 of every
stored file. Otherwise (an instance arrived or was replaced, a model was added that now wins)
the head start is dropped and the job runs the model itself. Result UIDs are derived from the
source series and the model, so a result computed ahead is the same object the job would have
built; only its timings say "ahead".

The cost is CPU spent on a series that turns out to be incomplete: at most one model run per
pause in the sender's stream. It never starts while a job is running or a C-STORE is being
received (the prefetcher starts work when an association ends), and ``pipeline.head_start =
false`` turns it off.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from pydicom.dataset import Dataset

log = logging.getLogger("modelnode.headstart")

EXPIRY_SECONDS = 600.0


@dataclass
class Ahead:
    """A result computed during the quiet time, and what it was computed from."""

    series_uid: str
    digests: tuple[str, ...]  # sorted SHA-256 of the stored instances used
    model_uid: str
    result: Dataset
    timings: dict[str, float]
    added: float = field(default_factory=time.monotonic)


class HeadStart:
    """Results computed ahead, one per series, each taken at most once."""

    def __init__(self) -> None:
        self._lock = threading.Condition()
        self._ready: dict[str, Ahead] = {}
        self._computing: set[str] = set()
        self.taken = 0
        self.dropped = 0

    def compute(self, series_uid: str, work: Callable[[], Ahead | None]) -> None:
        """Run ``work`` for ``series_uid`` on this thread and keep what it returns."""
        with self._lock:
            self._expire()
            self._computing.add(series_uid)
            self._ready.pop(series_uid, None)
        ahead = None
        try:
            ahead = work()
        except Exception as exc:  # an optimisation only: the job computes it again and reports
            log.debug("head start for series %s failed: %s", series_uid, exc, exc_info=True)
        finally:
            with self._lock:
                self._computing.discard(series_uid)
                if ahead is not None:
                    self._ready[series_uid] = ahead
                self._lock.notify_all()

    def take(self, series_uid: str, digests: tuple[str, ...], model_uid: str,
             wait: float = 600.0) -> Ahead | None:
        """The head start for this series if it matches ``digests`` and ``model_uid``.

        If one is being computed for the series, waits for it (up to ``wait`` seconds) rather
        than run the same model twice at once.
        """
        deadline = time.monotonic() + wait
        with self._lock:
            if series_uid in self._computing:
                # Logged under the lock, before wait() releases it: once this line is out, the
                # computation cannot finish unseen by this job (tests wait on it).
                log.debug("job for series ...%s waits for the head start in progress", series_uid[-12:])
            while series_uid in self._computing and time.monotonic() < deadline:
                self._lock.wait(deadline - time.monotonic())
            ahead = self._ready.pop(series_uid, None)
            if ahead is None:
                return None
            if ahead.digests != digests or ahead.model_uid != model_uid:
                self.dropped += 1
                log.info("head start for series ...%s dropped: computed with model ...%s on %d instance(s), the job "
                         "selected ...%s on %d", series_uid[-12:], ahead.model_uid[-12:], len(ahead.digests),
                         model_uid[-12:], len(digests))
                return None
            self.taken += 1
            return ahead

    def clear(self) -> None:
        with self._lock:
            self._ready.clear()

    def __len__(self) -> int:
        with self._lock:
            return len(self._ready)

    def _expire(self) -> None:
        cutoff = time.monotonic() - EXPIRY_SECONDS
        for uid in [u for u, a in self._ready.items() if a.added < cutoff]:
            del self._ready[uid]
