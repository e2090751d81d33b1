"""node.pipeline.prefetch: a series is read and decoded once its association ends, handed out once by
digest, and never beyond its memory budget."""

from __future__ import annotations

import io
import queue
from pathlib import Path

import numpy as np
import pydicom
import pytest

from models.training.phantoms import write_ct_series
from node.pipeline.prefetch import Prefetcher
from node.storage import index
from node.storage.db import write_transaction


def _store_series(app, tmp_path: Path, slices: int = 4) -> list[str]:
    digests = []
    for path in write_ct_series(tmp_path / "ct", 11, size=64, slices=slices):
        ds = pydicom.dcmread(path)
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        stored = app.store.put_bytes(buf.getvalue())
        with write_transaction(app.db):
            index.index_instance(ds, digest=stored.digest, size=stored.size,
                                 transfer_syntax=str(ds.file_meta.TransferSyntaxUID), calling_ae="CT")
        digests.append(stored.digest)
    return digests


def _prefetcher(app, budget: int) -> tuple[Prefetcher, queue.Queue[list[str]]]:
    """A started prefetcher and the queue its thread puts each request's keys on once it is done
    with them (its ``after`` hook): the event the tests wait on."""
    done: queue.Queue[list[str]] = queue.Queue()
    pf = Prefetcher(app.store, budget, after=done.put)
    pf.start()
    return pf, done


@pytest.mark.timeout(60)
def test_series_is_decoded_in_the_background_and_taken_once(app, tmp_path):
    digests = _store_series(app, tmp_path)
    series_uid = str(pydicom.dcmread(app.store.path(digests[0])).SeriesInstanceUID)
    pf, done = _prefetcher(app, 64 << 20)
    try:
        pf.request({series_uid})
        assert done.get(timeout=30) == [series_uid]
        assert pf.bytes_held > 0
        for d in digests:
            ds = pf.take(d)
            assert ds is not None
            # The decoded array is already there, and it is the stored file's.
            assert getattr(ds, "_pixel_array", None) is not None
            assert np.array_equal(ds.pixel_array, pydicom.dcmread(app.store.path(d)).pixel_array)
        assert pf.take(digests[0]) is None, "handed out once"
        assert pf.bytes_held == 0 and pf.hits == len(digests) and pf.misses == 1
    finally:
        pf.stop()


@pytest.mark.timeout(60)
def test_study_keys_work_and_the_budget_is_never_exceeded(app, tmp_path):
    digests = _store_series(app, tmp_path, slices=6)
    study_uid = str(pydicom.dcmread(app.store.path(digests[0])).StudyInstanceUID)
    one = 2 * 64 * 64 * 2  # stored pixels plus decoded array (uint16): 16 KiB per slice
    pf, done = _prefetcher(app, 3 * one + one // 2)
    try:
        pf.request({study_uid})
        # The request is finished with: whatever it would cache past the budget, it has cached.
        assert done.get(timeout=30) == [study_uid]
        assert sum(pf.peek(d) is not None for d in digests) == 3 and pf.bytes_held <= pf.budget
    finally:
        pf.stop()


@pytest.mark.timeout(60)
def test_disabled_prefetcher_does_nothing(app, tmp_path):
    digests = _store_series(app, tmp_path, slices=2)
    pf = Prefetcher(app.store, 0)
    pf.start()
    pf.request({"1.2.3"})
    assert pf._thread is None and pf.take(digests[0]) is None
    pf.stop()
