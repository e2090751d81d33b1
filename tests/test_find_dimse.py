"""C-FIND responses by hand (node.dimse.compat.find_responses, node.dimse.identifier): the same
bytes as pynetdicom and pydicom would send, and a real C-FIND with a C-CANCEL in the middle.

If pynetdicom changes what these rely on (its C-FIND-RSP encoding, its fragmentation, the
``encode`` its C-FIND SCP calls), these fail, and so does the guard (tests/test_compat.py).
"""

from __future__ import annotations

import io
import queue
import socket
import ssl
from types import SimpleNamespace

import pytest
from node_proc import node_process
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE, service_class
from pynetdicom.dimse_messages import C_FIND_RSP
from pynetdicom.dimse_primitives import C_FIND
from pynetdicom.dsutils import encode, pretty_dataset
from pynetdicom.pdu import P_DATA_TF
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind

from node.dimse import query_scp
from node.dimse.compat import find_responses
from node.dimse.identifier import IdentifierEncoder, NotEncodable, value_bytes

STUDY_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.2.1"
IMPLICIT, EXPLICIT = "1.2.840.10008.1.2", "1.2.840.10008.1.2.1"


def _rsp(status: int, identifier: bytes | None, sop_class: str | None = STUDY_ROOT_FIND) -> C_FIND:
    p = C_FIND()
    p.MessageID = 9
    p.MessageIDBeingRespondedTo = 9
    if sop_class is not None:
        p.AffectedSOPClassUID = sop_class
    p.Status = status
    if identifier is not None:
        p.Identifier = io.BytesIO(identifier)
    return p


def _library_pdus(p: C_FIND, context_id: int, max_pdu: int) -> bytes:
    msg = C_FIND_RSP()
    msg.primitive_to_message(p)
    out = b""
    for pdata in msg.encode_msg(context_id, max_pdu):
        pdu = P_DATA_TF()
        pdu.from_primitive(pdata)
        out += pdu.encode()
    return out


IDENTIFIER = bytes.fromhex("08005200060000005345524945532000") * 40  # 640 bytes


@pytest.mark.timeout(30)
@pytest.mark.parametrize("status, identifier, sop_class", [
    (0xFF00, IDENTIFIER, STUDY_ROOT_FIND),  # pending, with its identifier
    (0xFF01, IDENTIFIER[:16], STUDY_ROOT_FIND),
    (0x0000, None, STUDY_ROOT_FIND),  # the final success
    (0xFE00, None, STUDY_ROOT_FIND),  # cancel
    (0x0000, None, None),  # no Affected SOP Class UID
    (0xFF00, IDENTIFIER, "1.2.840.10008.5.1.4.1.2.1.1"),  # odd-length UID (Patient Root)
])
@pytest.mark.parametrize("max_pdu", [0, 16384, 200, 64])  # 200 and 64: fragmented
def test_responses_are_the_bytes_pynetdicom_sends(status: int, identifier: bytes | None, sop_class: str | None,
                                                  max_pdu: int) -> None:
    p = _rsp(status, identifier, sop_class)
    command = find_responses.encode_command(p)
    assert command is not None
    ours = find_responses.encode_pdus(3, find_responses.message_pdvs(command, identifier or b"", max_pdu))
    assert ours == _library_pdus(p, 3, max_pdu)


@pytest.mark.timeout(10)
def test_failures_are_left_to_pynetdicom() -> None:
    p = _rsp(0xA900, None)
    p.ErrorComment = "no"
    assert find_responses.encode_command(p) is None
    p = _rsp(0xA900, None)
    p.OffendingElement = [0x00080052]
    assert find_responses.encode_command(p) is None


@pytest.mark.timeout(10)
def test_an_encoded_identifier_passes_only_through_the_patched_encode() -> None:
    ident = find_responses.EncodedIdentifier(b"\x08\x00\x52\x00\x06\x00\x00\x00SERIES", implicit_vr=True)
    assert find_responses._encode(ident, True, True) == ident.encoded
    assert find_responses._encode(ident, False, True) is None  # another syntax: pynetdicom answers 0xC312
    # pynetdicom's own encode fails on it: pynetdicom refuses the response loudly (0xC312).
    assert encode(ident, True, True) is None
    # What else pynetdicom's C-FIND SCP does with an identifier (log it) sees an empty dataset.
    assert list(pretty_dataset(ident)) == []
    ds = Dataset()
    ds.QueryRetrieveLevel = "SERIES"
    assert find_responses._encode(ds, False, True) == encode(ds, False, True)
    # What the patch replaces is what pynetdicom's C-FIND SCP calls.
    assert "encode" in service_class.ServiceClass._c_find_scp.__code__.co_names


def _fake_dimse(*, state: str = "Sta6", queued: int = 0, tls: object = None, closed: bool = False):
    raw = None if closed else (tls or object())
    q: queue.Queue = queue.Queue()
    for _ in range(queued):
        q.put(None)
    sock = SimpleNamespace(socket=raw)
    assoc = SimpleNamespace(get_handlers=lambda event: [])
    dul = SimpleNamespace(socket=sock, to_provider_queue=q, state_machine=SimpleNamespace(current_state=state))
    return SimpleNamespace(dul=dul, assoc=assoc)


@pytest.mark.timeout(10)
def test_written_straight_only_when_nothing_is_queued_on_an_established_plain_socket() -> None:
    assert find_responses._direct(_fake_dimse()) is not None
    assert find_responses._direct(_fake_dimse(queued=1)) is None  # keep the order of what is queued
    assert find_responses._direct(_fake_dimse(state="Sta13")) is None  # released or aborting
    with socket.socket() as plain, ssl.create_default_context().wrap_socket(
            plain, server_hostname="peer", do_handshake_on_connect=False) as tls:
        assert find_responses._direct(_fake_dimse(tls=tls)) is None  # one SSL object, two threads: no
    assert find_responses._direct(_fake_dimse(closed=True)) is None


# --------------------------------------------------------------------------- identifiers


def _index_rows(app) -> None:
    """Series with every kind of value the encoder meets (and some it must leave to pydicom)."""
    from node.storage.index import Instance, Patient, Series, Study

    p1 = Patient.create(patient_id="PID1", patient_name="Müller^Jörg", birth_date="19700101", sex="M")
    p2 = Patient.create(patient_id="PID2", issuer="ISSUER", patient_name="", sex="")
    s1 = Study.create(study_uid="1.2.3.1", patient=p1, study_date="20200101", study_time="101010.5",
                      accession_number="ACC1", study_id="S1", study_description="CT Thorax nativ (Übersicht)")
    s2 = Study.create(study_uid="1.2.3.22", patient=p2, study_date="", study_time="")
    values = [("1", "CT", "CHEST", "Thorax 1mm"), ("12", "MR", "", ""), ("", "", "", "Naïve ümlaut"),
              ("-3", "CT", "HEAD", "odd"), ("1.5", "OT", "", "not a plain IS"), ("abc", "US", "", "x")]
    for n, (number, modality, body, desc) in enumerate(values):
        series = Series.create(series_uid=f"1.2.3.1.{n}", study=s1 if n % 2 else s2, modality=modality,
                               series_number=number, body_part=body, series_description=desc,
                               manufacturer="modelnode", software_versions="1.0.0")
        for i in range(2):
            Instance.create(sop_uid=f"1.2.3.1.{n}.{i}", series=series, sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
                            instance_number=None if i else 7, transfer_syntax=EXPLICIT, digest="0" * 64, size=1,
                            rows=512 if i else 70000, columns=512, frames=None, samples_per_pixel=1,
                            photometric="MONOCHROME2")


QUERIES = [
    ("SERIES", {"Modality": "", "SeriesDescription": "", "SeriesNumber": "", "BodyPartExamined": "",
                "SeriesInstanceUID": "", "NumberOfSeriesRelatedInstances": "", "PatientName": "",
                "StudyDescription": "", "ImageComments": "", "ReferencedImageSequence": None}),
    ("STUDY", {"StudyInstanceUID": "", "StudyDate": "", "StudyTime": "", "PatientName": "", "PatientID": "",
               "ModalitiesInStudy": "", "NumberOfStudyRelatedInstances": "", "SeriesDescription": ""}),
    ("IMAGE", {"SOPInstanceUID": "", "InstanceNumber": "", "Rows": "", "Columns": "", "NumberOfFrames": "",
               "AvailableTransferSyntaxUID": "", "PhotometricInterpretation": "", "InstanceAvailability": ""}),
]


def _identifier(level: str, keys: dict) -> Dataset:
    """A request identifier; "" asks for a key (universal matching), None for an empty sequence."""
    from pydicom.datadict import dictionary_VR, tag_for_keyword
    from pydicom.sequence import Sequence

    ds = Dataset()
    ds.QueryRetrieveLevel = level
    for keyword, value in keys.items():
        tag = tag_for_keyword(keyword)
        vr = dictionary_VR(tag)
        ds.add_new(tag, vr, Sequence([]) if value is None else (value or None))
    return ds


@pytest.mark.timeout(60)
@pytest.mark.parametrize("syntax", [IMPLICIT, EXPLICIT])
@pytest.mark.parametrize("level, keys", QUERIES, ids=[q[0] for q in QUERIES])
def test_identifiers_are_the_bytes_pydicom_writes(app, syntax: str, level: str, keys: dict) -> None:
    _index_rows(app)
    query = query_scp.parse_identifier(_identifier(level, keys), query_scp.STUDY_ROOT)
    encoder = query_scp.response_encoder(query, "MODELNODE", syntax)
    assert encoder is not None
    found = list(query_scp.matches(query))
    assert found
    fast = 0
    for m in found:
        ours = encoder.encode(m)
        theirs = encode(query_scp.response(m, query, "MODELNODE"), syntax == IMPLICIT, True) if ours is not None \
            else None
        if ours is not None:
            fast += 1
            assert ours == theirs, (m, ours, theirs)
    # Every plain value is encoded by hand; IS "1.5" and "abc" and Rows 70000 are left to pydicom.
    left = {"SERIES": 2, "STUDY": 0, "IMAGE": 6}[level]
    assert fast == len(found) - left


@pytest.mark.timeout(10)
def test_what_the_encoder_leaves_to_pydicom() -> None:
    for vr, value in (("IS", "1.5"), ("IS", " 7"), ("US", 70000), ("US", "7"), ("CS", "Ä"), ("UI", "1.2 "),
                      ("DS", "1.5"), ("UL", 5)):
        with pytest.raises(NotEncodable):
            value_bytes(vr, value)
    assert value_bytes("UI", "1.2.3") == b"1.2.3\0"
    assert value_bytes("PN", "Jörg") == "Jörg ".encode()
    assert value_bytes("SQ", None) == b""
    with pytest.raises(ValueError):
        IdentifierEncoder([(0x00100010, "PN", None, "a"), (0x00100010, "PN", None, "b")], True)
    # A coded sequence key, or another transfer syntax: the whole query goes the pydicom way.
    query = query_scp.parse_identifier(_identifier("SERIES", {"AcquisitionContextSequence": None}),
                                       query_scp.STUDY_ROOT)
    assert query_scp.response_encoder(query, "MODELNODE", EXPLICIT) is None
    query = query_scp.parse_identifier(_identifier("SERIES", {"Modality": ""}), query_scp.STUDY_ROOT)
    assert query_scp.response_encoder(query, "MODELNODE", "1.2.840.10008.1.2.2") is None
    assert query_scp.response_encoder(query, "MODÈLE", EXPLICIT) is None  # (an AE title pydicom would refuse)


# --------------------------------------------------------------------------- on the network


def _seed(node, n: int) -> str:
    from node.storage.db import open_database
    from node.storage.index import Instance, Patient, Series, Study

    db = open_database(f"sqlite:///{node.data_dir / 'modelnode.db'}")
    try:
        with db.atomic():
            patient = Patient.create(patient_id="BULK", patient_name="Bulk^Cancel")
            study = Study.create(study_uid=generate_uid(), patient=patient, study_date="20190101")
            series = Series.create(series_uid=generate_uid(), study=study, modality="OT")
            rows = [{"sop_uid": f"2.25.{i}", "series": series.id, "sop_class_uid": "1.2.3",
                     "instance_number": i, "transfer_syntax": EXPLICIT, "digest": "0" * 64, "size": 0}
                    for i in range(n)]
            for i in range(0, n, 500):
                Instance.insert_many(rows[i:i + 500]).execute()
        return series.series_uid
    finally:
        db.close()


@pytest.mark.timeout(120)
def test_a_c_cancel_in_the_middle_of_the_stream(tmp_path) -> None:
    total = 20000
    with node_process(tmp_path / "node") as node:
        series_uid = _seed(node, total)
        ae = AE(ae_title="CANCELLER")
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
        query = _identifier("IMAGE", {"SeriesInstanceUID": series_uid, "SOPInstanceUID": "", "InstanceNumber": ""})
        assoc = ae.associate("127.0.0.1", node.port, ae_title=node.ae_title)
        assert assoc.is_established
        try:
            context_id = assoc.accepted_contexts[0].context_id
            # Without a cancel: every match, in instance order.
            numbers = [int(ident.InstanceNumber) for status, ident in
                       assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind) if status.Status != 0]
            assert numbers == list(range(total))
            # With one after the tenth response: cut short, final status Cancel.
            got, final = 0, None
            for status, _ident in assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind, msg_id=7):
                if status.Status in (0xFF00, 0xFF01):
                    got += 1
                    if got == 10:
                        assoc.send_c_cancel(7, context_id)
                else:
                    final = status.Status
            assert final == 0xFE00
            assert 10 <= got < total
            # The association still serves the next query.
            rows = list(assoc.send_c_find(_identifier("SERIES", {"SeriesInstanceUID": series_uid, "Modality": ""}),
                                          StudyRootQueryRetrieveInformationModelFind))
            assert [str(i.Modality) for s, i in rows if i is not None] == ["OT"]
        finally:
            assoc.release()
        assert "cancelled after" in node.log()


@pytest.mark.timeout(60)
def test_responses_queued_for_the_dul_thread_when_they_cannot_go_straight(monkeypatch) -> None:
    """The fallback path (TLS, or a listener on the skipped events): PDUs queued, same bytes."""
    sent: list = []
    dimse = SimpleNamespace(maximum_pdu_size=100, dul=SimpleNamespace(socket=None, send_pdu=sent.append),
                            assoc=SimpleNamespace(get_handlers=lambda event: []))
    monkeypatch.setattr(find_responses, "_direct", lambda d: None)
    p = _rsp(0xFF00, IDENTIFIER[:300])
    find_responses._send_msg(dimse, p, 5)
    pdus = b""
    for pdata in sent:
        pdu = P_DATA_TF()
        pdu.from_primitive(pdata)
        pdus += pdu.encode()
    assert len(sent) > 2 and pdus == _library_pdus(p, 5, 100)
