"""node.dimse.compat.reactor's P-DATA-TF coding: the same bytes and items as pynetdicom's, None where it must decide."""

from __future__ import annotations

import struct

import pytest
from pynetdicom.pdu import P_DATA_TF
from pynetdicom.pdu_primitives import P_DATA

from node.dimse.compat.reactor import encode_p_data_tf, split_pdvs


def _pdu(items: list[tuple[int, bytes]]) -> bytes:
    primitive = P_DATA()
    primitive.presentation_data_value_list.extend(items)
    pdu = P_DATA_TF()
    pdu.from_primitive(primitive)
    return pdu.encode()


@pytest.mark.timeout(10)
def test_items_match_pynetdicom() -> None:
    items = [(1, b"\x03" + b"command"), (1, b"\x00" + bytes(range(256)) * 4), (3, b"\x02" + b"last")]
    raw = _pdu(items)
    library = P_DATA_TF()
    library.decode(raw)
    expected = [(i.presentation_context_id, i.presentation_data_value) for i in library.presentation_data_value_items]
    ours = split_pdvs(raw[6:])
    assert ours is not None
    assert [(cid, bytes(data)) for cid, data in ours] == expected == items


@pytest.mark.timeout(10)
@pytest.mark.parametrize("body", [
    b"",  # no item
    struct.pack(">LB", 1, 1),  # an item with no message control header
    struct.pack(">LB", 10, 1) + b"\x00" * 4,  # longer than what follows
    struct.pack(">LB", 3, 1) + b"\x02ab" + b"\x00\x00",  # trailing bytes too short for an item
])
def test_malformed_bodies_are_left_to_pynetdicom(body: bytes) -> None:
    assert split_pdvs(body) is None


@pytest.mark.timeout(10)
def test_one_item_pdu_is_encoded_as_pynetdicom_does() -> None:
    pdv = b"\x03" + bytes(range(200))
    assert encode_p_data_tf(7, pdv) == _pdu([(7, pdv)])


@pytest.mark.timeout(30)
def test_idle_acceptor_thread_is_woken_by_an_indication(monkeypatch) -> None:
    """An acceptor's association thread waits long when idle, but a release or abort
    indication from the DUL (or a DIMSE message) wakes it at once."""
    import queue
    import threading
    from types import SimpleNamespace

    from node.dimse.compat import reactor

    monkeypatch.setattr(reactor, "ACCEPTOR_IDLE_WAIT", 60.0)  # longer than the test may last

    def idle_assoc() -> SimpleNamespace:
        return SimpleNamespace(is_acceptor=True, _kill=False, dimse=SimpleNamespace(msg_queue=queue.Queue()),
                               dul=SimpleNamespace(to_user_queue=queue.Queue()))

    for wake in ("indication", "message"):
        assoc = idle_assoc()
        waiter = threading.Thread(target=reactor._association_wait, args=(assoc, 0.001), daemon=True)
        waiter.start()
        waiter.join(0.3)
        assert waiter.is_alive()  # nothing to do: still waiting
        if wake == "indication":
            assoc.dul.to_user_queue.put("A-RELEASE")  # what pynetdicom's DUL does (AR-2)
        else:
            assoc.dimse.msg_queue.put((1, "C-FIND-RQ"))
        waiter.join(10)
        assert not waiter.is_alive(), f"not woken by a {wake}"
        assert isinstance(assoc.dul.to_user_queue, reactor._IndicationQueue)
