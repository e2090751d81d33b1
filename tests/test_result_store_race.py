"""A replaced result's file is removed under the write lock, never from under a concurrent store.

The interleaving is forced, not hoped for: the replacing store pauses right after it decided
that the old file is unreferenced, and a second store of bytes identical to that old file runs
then. Before the fix the decision and the removal ran outside the write lock, the second store
indexed its row in between, and the removal left that row pointing at a missing file.
"""

from __future__ import annotations

import threading

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file

from node.context import NodeContext
from node.pipeline import worker
from node.storage import index


class OwnedLock:
    """The node's write lock, telling who holds it and when the second store reaches it."""

    def __init__(self, watched: dict[str, threading.Thread]) -> None:
        self._lock = threading.Lock()
        self.owner: threading.Thread | None = None
        self.watched = watched
        self.second_at_lock = threading.Event()

    def __enter__(self) -> OwnedLock:
        if threading.current_thread() is self.watched.get("second"):
            self.second_at_lock.set()
        self._lock.acquire()
        self.owner = threading.current_thread()
        return self

    def __exit__(self, *exc: object) -> None:
        self.owner = None
        self._lock.release()


def _result(description: str):
    ds = dcmread(get_testdata_file("CT_small.dcm"))
    ds.SeriesDescription = description
    return ds


@pytest.mark.timeout(60)
def test_replacing_a_result_never_removes_a_file_a_concurrent_store_indexed(app, monkeypatch) -> None:
    threads: dict[str, threading.Thread] = {}
    lock = OwnedLock(threads)
    ctx = NodeContext(app, write_lock=lock)  # type: ignore[arg-type]
    old, new = _result("first result"), _result("second result")
    worker.store_result(ctx, old)
    uid = str(old.SOPInstanceUID)
    old_digest = index.Instance.get(index.Instance.sop_uid == uid).digest

    library_in_use = index.digest_in_use
    second_done = threading.Event()
    errors: list[BaseException] = []

    def store_old_bytes_again() -> None:
        try:
            worker.store_result(ctx, _result("first result"))
        except BaseException as exc:  # reported by the assertion below
            errors.append(exc)
        finally:
            second_done.set()

    def digest_in_use(digest: str) -> bool:
        answer = library_in_use(digest)
        if threading.current_thread() is threads["replacing"] and digest == old_digest and "second" not in threads:
            threads["second"] = threading.Thread(target=store_old_bytes_again)
            threads["second"].start()
            assert lock.second_at_lock.wait(30)
            if lock.owner is not threading.current_thread():
                # The decision was taken outside the lock: the second store goes through now.
                assert second_done.wait(30)
        return answer

    monkeypatch.setattr(index, "digest_in_use", digest_in_use)
    threads["replacing"] = threading.Thread(target=worker.store_result, args=(ctx, new))
    threads["replacing"].start()
    threads["replacing"].join(30)
    assert "second" in threads, "the replacing store never checked the old file"
    threads["second"].join(30)
    assert not errors, errors

    row = index.Instance.get(index.Instance.sop_uid == uid)
    assert row.digest == old_digest  # the second store was the last to index the instance
    assert app.store.exists(row.digest), "the indexed instance's file was removed"
    assert app.store.path(row.digest).read_bytes()[128:132] == b"DICM"
