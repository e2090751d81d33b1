"""The association reactor's pause (node.dimse.compat.reactor._ReactorCheckpoint, _association_wait).

A send_* pauses pynetdicom's association reactor so that the reactor cannot take the response it
waits for. With pynetdicom's own ``threading.Event`` a request made right after another one could
run with the reactor going (``_is_paused`` still True from the previous pause): on a loaded
machine tests/test_ups_scp.py's requestor lost its N-GET response to the reactor ("Received
unexpected N-GET service message", then the DIMSE timeout). A reactor running then may also wait
on the DIMSE queue (node.dimse.compat.reactor._association_wait) and take the one wake-up of the
response's ``put``, so that the send_* sees it only at its timeout. These provoke both races
deterministically.
"""

from __future__ import annotations

import queue
import threading
import time
from types import SimpleNamespace

import pytest
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from node.dimse.compat import reactor


class _Reactor(threading.Thread):
    """What pynetdicom's association reactor does with its checkpoint, turn after turn."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self._is_paused = False
        self._kill = False
        self.turns = 0
        self._reactor_checkpoint = reactor._ReactorCheckpoint(self)  # type: ignore[arg-type]

    def run(self) -> None:
        while not self._kill:
            time.sleep(0.001)
            self._is_paused = True
            self._reactor_checkpoint.wait()
            self._is_paused = False
            self.turns += 1


def _pause(assoc: _Reactor) -> None:
    """What a send_* does before it sends."""
    assoc._reactor_checkpoint.clear()
    deadline = time.monotonic() + 5
    while not assoc._is_paused:
        assert time.monotonic() < deadline, "the reactor never paused"
        time.sleep(0.0001)


@pytest.mark.timeout(30)
def test_a_request_right_after_another_finds_the_reactor_paused() -> None:
    assoc = _Reactor()
    assoc.start()
    try:
        _pause(assoc)  # the first request
        turns = assoc.turns
        checkpoint = assoc._reactor_checkpoint
        # The first request ends (set) and the next begins (clear) before the woken reactor
        # thread runs: holding the checkpoint's lock keeps it from running in between.
        with checkpoint._cond:
            checkpoint.set()
            checkpoint.clear()
            assert assoc._is_paused  # what the next send_* reads: it goes on
        time.sleep(0.3)
        # pynetdicom's Event let the reactor run here, during the request: it may take the response.
        assert assoc.turns == turns and assoc._is_paused
        checkpoint.set()  # the second request ends
        deadline = time.monotonic() + 5
        while assoc.turns == turns:
            assert time.monotonic() < deadline, "the reactor did not resume"
            time.sleep(0.01)
    finally:
        assoc._kill = True
        assoc._reactor_checkpoint.set()
        assoc.join(5)


@pytest.mark.timeout(30)
def test_a_request_from_the_reactor_thread_itself_does_not_wait_for_a_pause() -> None:
    """An event handler's send_* (or the release after a network timeout) runs on the reactor."""
    assoc = _Reactor()
    done = threading.Event()

    def handler() -> None:
        assoc._is_paused = False  # (pynetdicom sets it True around handlers; its release path does not)
        _pause(assoc)
        assoc._reactor_checkpoint.set()
        done.set()

    assoc.run = handler  # type: ignore[method-assign]
    assoc.start()
    assert done.wait(5)
    assoc.join(5)


@pytest.mark.timeout(60)
def test_the_reactor_passes_on_the_wake_up_of_a_response_it_only_looked_at() -> None:
    """A send_* blocked in get_msg(block=True) is woken by the response even when the reactor
    waited on the same queue first (Queue.put wakes one waiter, the first)."""
    msgs: queue.Queue = queue.Queue()
    assoc = SimpleNamespace(is_acceptor=False, _kill=False, dimse=SimpleNamespace(msg_queue=msgs),
                            dul=SimpleNamespace(to_user_queue=queue.Queue()))
    looker = threading.Thread(target=reactor._association_wait, args=(assoc, 20.0), daemon=True)
    looker.start()
    _until(lambda: len(msgs.not_empty._waiters) == 1)  # type: ignore[attr-defined]
    got: list[object] = []
    consumer = threading.Thread(target=lambda: got.append(msgs.get(timeout=20)), daemon=True)
    consumer.start()
    _until(lambda: len(msgs.not_empty._waiters) == 2)  # type: ignore[attr-defined]
    start = time.monotonic()
    msgs.put((1, "N-ACTION-RSP"))
    consumer.join(10)
    looker.join(10)
    assert got == [(1, "N-ACTION-RSP")]
    assert time.monotonic() - start < 5


def _until(condition, timeout: float = 5.0) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline
        time.sleep(0.01)


@pytest.mark.timeout(60)
def test_back_to_back_requests_on_a_real_association() -> None:
    """The checkpoint in pynetdicom's reactor: many requests in a row, each answered, then a release."""
    from peers import free_port

    reactor.install_checkpoint()
    scp = AE(ae_title="SCP")
    scp.add_supported_context(Verification)
    port = free_port()
    server = scp.start_server(("127.0.0.1", port), block=False)
    try:
        scu = AE(ae_title="SCU")
        scu.acse_timeout = scu.dimse_timeout = scu.network_timeout = 10
        scu.add_requested_context(Verification)
        assoc = scu.associate("127.0.0.1", port, ae_title="SCP")
        assert assoc.is_established
        assert isinstance(assoc._reactor_checkpoint, reactor._ReactorCheckpoint)
        for _ in range(200):
            status = assoc.send_c_echo()
            assert status is not None and status.Status == 0x0000
        assoc.release()
        assert assoc.is_released
        assoc = scu.associate("127.0.0.1", port, ae_title="SCP")
        assoc.abort()
        assert assoc.is_aborted
    finally:
        server.shutdown()
