"""Read and decode a series while its quiet timer runs, so the job finds its pixels in memory.

When an association that stored images ends, its series (or studies) have to stay quiet for
``pipeline.quiet_seconds`` before a job runs. That wait is idle time for the node, and reading
and decoding the instances is the first thing the job would do (0.25 s for 60 CT slices of
512 x 512 on this project's 2-core reference machine, more for compressed data). The prefetcher
does it then, on one background thread, and hands the decoded datasets to the job.

* Nothing here is needed for correctness: a job asks for each instance by its content digest
  and reads the file itself when the prefetcher does not have it (not yet done, over budget,
  disabled, a node restarted in between).
* Keyed by SHA-256 of the stored file, so a dataset handed out is exactly the file the index
  names, even if the instance was replaced meanwhile.
* Memory is bounded by ``pipeline.prefetch_mb`` (file size plus decoded pixels). Past the bound
  new instances are not cached rather than older ones evicted, so a study larger than the bound
  does not thrash; entries nobody took expire after :data:`EXPIRY_SECONDS`.
* Work starts only when an association ends, never during a C-STORE, so it takes no CPU from
  an ingest in progress.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import pydicom
from pydicom.dataset import Dataset

from node.storage import index
from node.storage.objects import ObjectStore

log = logging.getLogger("modelnode.prefetch")

EXPIRY_SECONDS = 600.0


@dataclass
class _Entry:
    dataset: Dataset
    size: int
    added: float


class Prefetcher:
    """One thread that reads and decodes the instances of groups whose association ended."""

    def __init__(self, store: ObjectStore, budget_bytes: int,
                 after: Callable[[list[str]], None] | None = None) -> None:
        self.store = store
        self.budget = budget_bytes
        self.after = after  # called on this thread with the group keys once they are decoded
        self._cache: OrderedDict[str, _Entry] = OrderedDict()
        self._held = 0
        self._lock = threading.Lock()
        self._requests: queue.Queue[list[str] | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self.hits = 0
        self.misses = 0

    @property
    def enabled(self) -> bool:
        return self.budget > 0

    def start(self) -> None:
        if self.enabled and self._thread is None:
            self._thread = threading.Thread(target=self._run, name="modelnode-prefetch", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        if self._thread is not None:
            self._requests.put(None)
            self._thread.join(timeout)
            self._thread = None
        with self._lock:
            self._cache.clear()
            self._held = 0

    def request(self, group_keys: Iterable[str]) -> None:
        """Series or study UIDs whose instances a job will want soon."""
        keys = sorted(set(group_keys))
        if self.enabled and keys and self._thread is not None:
            self._requests.put(keys)

    def take(self, digest: str) -> Dataset | None:
        """The decoded dataset of the stored file ``digest``, once; None if not prefetched."""
        with self._lock:
            entry = self._cache.pop(digest, None)
            if entry is None:
                self.misses += 1
                return None
            self._held -= entry.size
            self.hits += 1
            return entry.dataset

    def peek(self, digest: str) -> Dataset | None:
        """Like :meth:`take`, but the dataset stays for the job (the head start reads it)."""
        with self._lock:
            entry = self._cache.get(digest)
            return entry.dataset if entry is not None else None

    @property
    def bytes_held(self) -> int:
        with self._lock:
            return self._held

    # ------------------------------------------------------------------ the thread

    def _run(self) -> None:
        while True:
            keys = self._requests.get()
            if keys is None:
                return
            try:
                self._prefetch(keys)
            except Exception:  # a prefetch is an optimisation: the job reads the files itself
                log.exception("prefetch of %d group(s) failed", len(keys))
            if self.after is not None:
                try:
                    self.after(keys)
                except Exception:  # the same: an optimisation (node.pipeline.headstart)
                    log.exception("work after the prefetch of %d group(s) failed", len(keys))

    def _prefetch(self, keys: list[str]) -> None:
        self._expire()
        t0 = time.perf_counter()
        rows = list(index.Instance.select(index.Instance.digest).join(index.Series).join(index.Study)
                    .where((index.Series.is_model == False)  # noqa: E712
                           & (index.Series.series_uid.in_(keys) | index.Study.study_uid.in_(keys))))
        done = 0
        for row in rows:
            with self._lock:
                if row.digest in self._cache:
                    continue
            try:
                ds = pydicom.dcmread(self.store.path(row.digest))
                if "PixelData" in ds:
                    ds.pixel_array  # noqa: B018 (decoded now; pydicom keeps the array on the dataset)
            except Exception as exc:  # the job will meet (and report) the same problem
                log.debug("prefetch: %s not decoded: %s", row.digest[:12], exc)
                continue
            arr = getattr(ds, "_pixel_array", None)
            size = len(ds.get("PixelData", b"") or b"") + (arr.nbytes if arr is not None else 0)
            with self._lock:
                if self._held + size > self.budget:
                    log.info("prefetch: budget of %d MiB reached; the rest is read by the job",
                             self.budget >> 20)
                    return
                self._cache[row.digest] = _Entry(ds, size, time.monotonic())
                self._held += size
            done += 1
        if done:
            log.debug("prefetch: %d instance(s) decoded in %.2f s", done, time.perf_counter() - t0)

    def _expire(self) -> None:
        cutoff = time.monotonic() - EXPIRY_SECONDS
        with self._lock:
            while self._cache:
                digest, entry = next(iter(self._cache.items()))
                if entry.added >= cutoff:
                    break
                del self._cache[digest]
                self._held -= entry.size
