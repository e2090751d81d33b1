"""C-STORE messages by hand (node.dimse.compat.store_messages): the same as pynetdicom's, byte for byte and field for field."""

from __future__ import annotations

import io

import pytest
from pynetdicom.dimse_messages import C_ECHO_RQ, C_STORE_RQ, C_STORE_RSP
from pynetdicom.dimse_primitives import C_ECHO, C_STORE
from pynetdicom.dsutils import decode, encode

from node.dimse.compat.store_messages import decode_request, encode_command

CT = "1.2.840.10008.5.1.4.1.1.2"


def _primitive(status: int, comment: str | None = None, *, uid: str = "1.2.3.4.5.6.7.8.9.10.11.12",
               sop_class: str | None = CT) -> C_STORE:
    p = C_STORE()
    p.MessageIDBeingRespondedTo = 7
    if sop_class is not None:
        p.AffectedSOPClassUID = sop_class
    p.AffectedSOPInstanceUID = uid
    p.Status = status
    if comment is not None:
        p.ErrorComment = comment
    return p


def _library(p: C_STORE) -> bytes:
    msg = C_STORE_RSP()
    msg.primitive_to_message(p)
    return bytes(encode(msg.command_set, True, True))


@pytest.mark.timeout(30)
@pytest.mark.parametrize("status, comment, uid, sop_class", [
    (0x0000, None, "1.2.3.4.5.6.7.8.9.10.11.12", CT),  # odd-length UID: padded with NUL
    (0x0000, None, "1.2.3.4.5.6.7.8.9.10.11.123", CT),  # even length
    (0xA700, "disk above its high-water mark; retry later", "1.2.3", CT),  # odd comment
    (0xC210, "dataset does not parse (ValueError; details at debug level)", "1.2.3.4", CT),
    (0x0111, "SOP Instance UID already stored with other content (reject)", "1.2", CT),
    (0xB007, "", "1.2.840.1", CT),  # an empty comment is sent empty, as pynetdicom does
    (0x0000, None, "1.2.840.1", None),
])
def test_encoding_matches_pynetdicom(status: int, comment: str | None, uid: str, sop_class: str | None) -> None:
    p = _primitive(status, comment, uid=uid, sop_class=sop_class)
    ours = encode_command(p)
    assert ours is not None
    assert ours == _library(p)
    decoded = decode(io.BytesIO(ours), True, True)
    assert decoded.CommandField == 0x8001 and decoded.Status == status
    assert decoded.AffectedSOPInstanceUID == uid


@pytest.mark.timeout(30)
def test_left_to_pynetdicom() -> None:
    p = _primitive(0xC000, "naïve")
    assert encode_command(p) is None  # not ASCII: pydicom's character sets decide
    p = _primitive(0xA900)
    p.OffendingElement = [0x00080018]
    assert encode_command(p) is None


def _request_bytes(**fields: object) -> bytes:
    p = C_STORE()
    p.MessageID = 12
    p.AffectedSOPClassUID = CT
    p.AffectedSOPInstanceUID = "1.2.3.4.5.6.7.8.9.10.11.12"
    p.Priority = 2
    for k, v in fields.items():
        setattr(p, k, v)
    p.DataSet = io.BytesIO(b"\0" * 8)
    msg = C_STORE_RQ()
    msg.primitive_to_message(p)
    return bytes(encode(msg.command_set, True, True))


@pytest.mark.timeout(30)
@pytest.mark.parametrize("fields", [
    {},
    {"AffectedSOPInstanceUID": "1.2.3.4.5.6.7.8.9.10.11.123"},  # even length: no padding
    {"MoveOriginatorApplicationEntityTitle": "ORTHANC", "MoveOriginatorMessageID": 3},
    {"Priority": 1},
])
def test_request_decoding_matches_pynetdicom(fields: dict) -> None:
    raw = _request_bytes(**fields)
    ours = decode_request(raw)
    assert ours is not None
    library = decode(io.BytesIO(raw), True, True)
    for keyword, value in ours.items():
        expected = library[keyword].value
        assert value == (expected.strip() if isinstance(expected, str) else expected), keyword
    assert set(ours) == {elem.keyword for elem in library}


@pytest.mark.timeout(30)
def test_request_decoding_leaves_the_rest_to_pynetdicom() -> None:
    echo = C_ECHO()
    echo.MessageID = 1
    msg = C_ECHO_RQ()
    msg.primitive_to_message(echo)
    assert decode_request(bytes(encode(msg.command_set, True, True))) is None  # not a C-STORE
    raw = _request_bytes()
    assert decode_request(raw[:-3]) is None  # truncated value
    assert decode_request(raw + b"\x00\x00\x02\x09\x02\x00\x00\x00ab") is None  # unknown element
    no_data = bytearray(raw)
    at = no_data.find(b"\x00\x00\x00\x08\x02\x00\x00\x00")  # (0000,0800) CommandDataSetType
    no_data[at + 8:at + 10] = b"\x01\x01"
    assert decode_request(bytes(no_data)) is None  # no dataset: not for the streaming path


def _dimse(*, acceptor: bool = True, established: bool = True, paused: bool = False, queued: int = 0):
    import queue
    from types import SimpleNamespace

    q: queue.Queue = queue.Queue()
    for _ in range(queued):
        q.put((1, None))
    assoc = SimpleNamespace(is_acceptor=acceptor, is_established=established, _is_paused=paused)
    return SimpleNamespace(assoc=assoc, msg_queue=q)


@pytest.mark.timeout(10)
def test_served_on_the_receiving_thread_only_when_the_association_thread_is_idle() -> None:
    from node.dimse.compat.store_messages import _serve_here

    ct = C_STORE()
    ct.AffectedSOPClassUID = CT
    model = C_STORE()
    model.AffectedSOPClassUID = "1.2.840.10008.5.1.4.1.1.66"  # Raw Data: a model object
    assert _serve_here(_dimse(), ct)
    assert not _serve_here(_dimse(), model)  # verification can take seconds: the association's thread
    assert not _serve_here(_dimse(), model, 2 << 20)
    assert _serve_here(_dimse(), model, 3000)  # a small model object is verified in a millisecond
    assert not _serve_here(_dimse(queued=1), ct)  # something queued before it: keep the order
    assert not _serve_here(_dimse(paused=True), ct)  # that thread is serving something else
    assert not _serve_here(_dimse(acceptor=False), ct)  # our own C-GET: pynetdicom's loop takes it
    assert not _serve_here(_dimse(established=False), ct)
