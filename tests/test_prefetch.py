"""node.pipeline.prefetch: a series is read and decoded once its association ends, handed out once by
digest, and never beyond its memory budget."""

from __future__ import annotations

import io
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest

from models.training.phantoms import write_ct_series
from node.pipeline.prefetch import Prefetcher
from node.storage import index
from node.storage.db import write_transaction

pytestmark = pytest.mark.timeout(60)


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


def _wait(predicate, timeout: float = 10.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.01)
    return False


def test_series_is_decoded_in_the_background_and_taken_once(app, tmp_path):
    digests = _store_series(app, tmp_path)
    series_uid = str(pydicom.dcmread(app.store.path(digests[0])).SeriesInstanceUID)
    pf = Prefetcher(app.store, 64 << 20)
    pf.start()
    try:
        pf.request({series_uid})
        assert _wait(lambda: pf.bytes_held > 0 and len(pf._cache) == len(digests))
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


def test_study_keys_work_and_the_budget_is_never_exceeded(app, tmp_path):
    digests = _store_series(app, tmp_path, slices=6)
    study_uid = str(pydicom.dcmread(app.store.path(digests[0])).StudyInstanceUID)
    one = 2 * 64 * 64 * 2  # stored pixels plus decoded array (uint16): 16 KiB per slice
    pf = Prefetcher(app.store, 3 * one + one // 2)
    pf.start()
    try:
        pf.request({study_uid})
        assert _wait(lambda: len(pf._cache) == 3)
        time.sleep(0.2)
        assert len(pf._cache) == 3 and pf.bytes_held <= pf.budget
    finally:
        pf.stop()


def test_disabled_prefetcher_does_nothing(app, tmp_path):
    digests = _store_series(app, tmp_path, slices=2)
    pf = Prefetcher(app.store, 0)
    pf.start()
    pf.request({"1.2.3"})
    assert pf._thread is None and pf.take(digests[0]) is None
    pf.stop()
