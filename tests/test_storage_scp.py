"""The Verification and Storage SCP, driven by real peers over loopback.

dcmtk's echoscu and storescu send real files (pydicom's test data and the pydicom-data package:
CT, MR, CR, US, SEG, SR in uncompressed and compressed transfer syntaxes); a pynetdicom SCU sends
files verbatim (chunked) for byte-exact checks and crafts the hostile requests. Every assertion
is on what the node stored: its index (read straight from SQLite), its object files, its
statuses. The node runs as a separate process (tests/node_proc.py) and is stopped by its pid.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pydicom
import pytest
from node_proc import NodeProcess, node_process, query
from peers import free_port, require, run
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filereader import _read_file_meta_info, read_preamble
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

pytestmark = pytest.mark.peers

# File, and the storescu option that makes it propose the file's own transfer syntax.
REAL_FILES = [
    ("CT_small.dcm", []),  # CT, explicit VR LE
    ("MR_small_implicit.dcm", []),  # MR, implicit VR LE
    ("MR_small_bigendian.dcm", ["-xb"]),  # MR, explicit VR big endian
    ("693_J2KR.dcm", ["-xv"]),  # CT, JPEG 2000 lossless (pydicom-data)
    ("RG3_J2KR.dcm", ["-xv"]),  # CR, JPEG 2000 lossless (pydicom-data)
    ("US1_J2KI.dcm", ["-xw"]),  # US, JPEG 2000 lossy (pydicom-data)
    ("examples_ybr_color.dcm", ["-xy"]),  # US multi-frame, JPEG baseline
    ("JPEG-lossy.dcm", ["-xx"]),  # NM, JPEG extended
    ("JPGLosslessP14SV1_1s_1f_8b.dcm", ["-xs"]),  # US, JPEG lossless SV1 (pydicom-data)
    ("MR_small_jpeg_ls_lossless.dcm", ["-xt"]),  # MR, JPEG-LS lossless
    ("MR_small_RLE.dcm", ["-xr"]),  # MR, RLE lossless
    ("OBXXXX1A_rle.dcm", ["-xr"]),  # US, RLE lossless (pydicom-data)
    ("image_dfl.dcm", ["-xd"]),  # SC, deflated explicit VR LE
    ("eCT_Supplemental.dcm", []),  # enhanced CT, multi-frame (pydicom-data)
    ("emri_small.dcm", []),  # enhanced MR (pydicom-data)
    ("liver_1frame.dcm", []),  # SEG
    ("test-SR.dcm", []),  # comprehensive SR
]


# --------------------------------------------------------------------------- helpers


def dataset_bytes(path: Path | str) -> tuple[bytes, str]:
    """The encoded dataset after the File Meta, and the transfer syntax it is in."""
    with open(path, "rb") as fh:
        read_preamble(fh, False)
        meta = _read_file_meta_info(fh)
        return fh.read(), str(meta.TransferSyntaxUID)


def _comparable(ds: Dataset) -> Dataset:
    for tag in [t for t in ds.keys() if t.element == 0 or t == 0xFFFCFFFC]:
        del ds[tag]
    return ds


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()




def instance_row(node: NodeProcess, sop_uid: str) -> dict | None:
    rows = query(node, 'SELECT i.digest, i.size, i.transfer_syntax, i.sop_class_uid, s.modality, s.series_uid, '
                       'st.study_uid, p.patient_id FROM instance i JOIN series s ON s.id = i.series_id '
                       'JOIN study st ON st.id = s.study_id JOIN patient p ON p.id = st.patient_id '
                       'WHERE i.sop_uid = ?', sop_uid)
    if not rows:
        return None
    keys = ("digest", "size", "transfer_syntax", "sop_class_uid", "modality", "series_uid", "study_uid", "patient_id")
    return dict(zip(keys, rows[0], strict=True))


def object_files(node: NodeProcess) -> set[Path]:
    return {p for p in (node.data_dir / "objects").rglob("*") if p.is_file()}


def tmp_leftovers(node: NodeProcess) -> list[Path]:
    """Files in tmp/ but the node's empty spare receive files (node.storage.receive.SpareFiles)."""
    return [p for p in (node.data_dir / "tmp").iterdir()
            if not (p.name.startswith("spare-") and p.stat().st_size == 0)]


def storescu(node: NodeProcess, *args: str, aet: str = "STORESCU", timeout: float = 120) -> subprocess.CompletedProcess:
    return run([require("storescu"), "-v", "-aet", aet, "-aec", node.ae_title, "127.0.0.1", str(node.port), *args],
               timeout=timeout, check=False)


def echoscu(node: NodeProcess, aet: str = "ECHOSCU") -> subprocess.CompletedProcess:
    return run([require("echoscu"), "-v", "-aet", aet, "-aec", node.ae_title, "127.0.0.1", str(node.port)],
               timeout=30, check=False)


def assert_serving(node: NodeProcess) -> None:
    res = echoscu(node)
    assert res.returncode == 0 and "Received Echo Response (Success)" in res.stderr, res.stderr
    assert node.alive()


@contextmanager
def pn_association(node: NodeProcess, sop_class: str, transfer_syntax: str, aet: str = "PNSCU") -> Iterator:
    """A pynetdicom association proposing one storage context; datasets are sent verbatim."""
    from pynetdicom import AE, _config

    ae = AE(aet)
    ae.add_requested_context(sop_class, [transfer_syntax])
    old = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True  # send the file's bytes, never re-encode them
    assoc = ae.associate("127.0.0.1", node.port, ae_title=node.ae_title)
    try:
        assert assoc.is_established, "association not accepted"
        yield assoc
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = old
        if assoc.is_established:
            assoc.release()
        ae.shutdown()


def pn_store(node: NodeProcess, path: Path) -> Dataset | None:
    """Send ``path`` verbatim; returns the C-STORE response status dataset (None: aborted)."""
    meta = pydicom.dcmread(path, stop_before_pixels=True).file_meta
    with pn_association(node, meta.MediaStorageSOPClassUID, meta.TransferSyntaxUID) as assoc:
        status = assoc.send_c_store(path)
        return status if status else None


def write_raw_file(path: Path, sop_class: str, sop_uid: str, body: bytes,
                   transfer_syntax: str = ExplicitVRLittleEndian) -> Path:
    """A Part-10 file whose dataset is ``body``, byte for byte (however broken)."""
    from pydicom.filewriter import write_file_meta_info

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = transfer_syntax
    meta.ImplementationClassUID = "1.2.3.4"
    with open(path, "wb") as fh:
        fh.write(b"\0" * 128 + b"DICM")
        write_file_meta_info(fh, meta, enforce_standard=False)
        fh.write(body)
    return path


def small_ct(uid: str, study: str, series: str, number: int, size: int = 64, **extra: object) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = uid
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, uid
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
    ds.PatientID, ds.PatientName, ds.Modality = "KILL001", "SIGKILL^TEST", "CT"
    ds.StudyDate, ds.SeriesNumber, ds.InstanceNumber = "20240101", 1, number
    ds.Rows = ds.Columns = size
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.PixelData = struct.pack(f"<{size * size}H", *([number % 65536] * (size * size)))
    for k, v in extra.items():
        setattr(ds, k, v)
    return ds


@pytest.fixture(scope="module")
def node(tmp_path_factory) -> Iterator[NodeProcess]:
    with node_process(tmp_path_factory.mktemp("storage_scp")) as n:
        yield n


# --------------------------------------------------------------------------- verification


@pytest.mark.timeout(60)
def test_echo(node):
    assert_serving(node)
    assert "association accepted from ECHOSCU@127.0.0.1" in node.log()


# --------------------------------------------------------------------------- storage of real files


@pytest.mark.timeout(120)
def test_storescu_real_files_are_stored_and_indexed(node):
    """Each modality and transfer syntax lands whole: same dataset, its own syntax, a full index row."""
    for name, options in REAL_FILES:
        src = Path(get_testdata_file(name))
        ds = pydicom.dcmread(src)
        res = storescu(node, "-R", *options, str(src))
        assert res.returncode == 0 and "Received Store Response (Success)" in res.stderr, f"{name}:\n{res.stderr}"
        _, source_ts = dataset_bytes(src)
        row = instance_row(node, str(ds.SOPInstanceUID))
        assert row is not None, f"{name} is not indexed"
        assert row["transfer_syntax"] == source_ts, f"{name} was converted to {row['transfer_syntax']}"
        assert row["sop_class_uid"] == str(ds.SOPClassUID)
        assert row["modality"] == str(ds.get("Modality", ""))
        assert (row["study_uid"], row["series_uid"]) == (str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID))
        assert row["patient_id"] == str(ds.get("PatientID", ""))
        stored = node.data_dir / "objects" / row["digest"][:2] / row["digest"][2:4] / f"{row['digest']}.dcm"
        assert stored.is_file() and sha256(stored) == row["digest"] and stored.stat().st_size == row["size"]
        back = pydicom.dcmread(stored)
        assert back.file_meta.TransferSyntaxUID == source_ts
        assert back.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        # storescu re-encodes from memory: it drops Data Set Trailing Padding, recomputes group
        # lengths and writes encapsulated Pixel Data as OB (one file says OW); nothing else changes.
        if "PixelData" in ds:
            assert back.PixelData == ds.PixelData, f"{name}: pixel data changed"
            del back.PixelData, ds.PixelData
        assert _comparable(back) == _comparable(ds), f"{name}: stored dataset differs from the source"
    assert not tmp_leftovers(node)


@pytest.mark.timeout(60)
def test_datasets_are_stored_byte_for_byte(node):
    """Sent verbatim (pynetdicom, chunked), the stored dataset bytes are the sent bytes."""
    for name in ("CT_small.dcm", "MR_small_RLE.dcm", "US1_J2KI.dcm", "examples_ybr_color.dcm",
                 "MR_small_jpeg_ls_lossless.dcm", "image_dfl.dcm", "MR_small_bigendian.dcm"):
        src = Path(get_testdata_file(name))
        status = pn_store(node, src)
        assert status is not None and status.Status == 0x0000, f"{name}: {status}"
        uid = str(pydicom.dcmread(src, stop_before_pixels=True).SOPInstanceUID)
        row = instance_row(node, uid)
        stored = node.data_dir / "objects" / row["digest"][:2] / row["digest"][2:4] / f"{row['digest']}.dcm"
        assert dataset_bytes(stored) == dataset_bytes(src), f"{name} changed on the way"


@pytest.mark.timeout(30)
def test_requestor_order_of_transfer_syntaxes_wins(node):
    """A sender proposing JPEG 2000 before uncompressed gets JPEG 2000 (and the reverse)."""
    from pydicom.uid import JPEG2000Lossless
    from pynetdicom import AE

    for proposed in ([JPEG2000Lossless, ExplicitVRLittleEndian], [ExplicitVRLittleEndian, JPEG2000Lossless]):
        ae = AE("PNSCU")
        ae.add_requested_context(CTImageStorage, proposed)
        assoc = ae.associate("127.0.0.1", node.port, ae_title=node.ae_title)
        try:
            assert assoc.is_established
            assert [cx.transfer_syntax[0] for cx in assoc.accepted_contexts] == [proposed[0]]
        finally:
            assoc.release()
            ae.shutdown()


# --------------------------------------------------------------------------- model objects


def _pack_model(tmp_path: Path, name: str = "scp-test-seg", version: str = "1.0.0") -> Path:
    from cards import segmentation_card_dict
    from onnx_factory import segmentation_model

    from iods import model_object
    from iods.card import parse_card

    card_dict = segmentation_card_dict()
    card_dict["identity"].update(name=name, version=version)
    onnx_path = tmp_path / f"{name}-{version}.onnx"
    onnx_path.write_bytes(segmentation_model(weight_elems=4096))
    out = tmp_path / f"{name}-{version}.dcm"
    model_object.pack_file(onnx_path, parse_card(card_dict), out)
    return out


@pytest.mark.timeout(90)
def test_model_object_is_registered(node, tmp_path):
    dcm = _pack_model(tmp_path)
    uid = str(pydicom.dcmread(dcm, stop_before_pixels=True).SOPInstanceUID)
    res = storescu(node, "-R", str(dcm))
    assert res.returncode == 0 and "Received Store Response (Success)" in res.stderr, res.stderr
    listed = node.cli("models", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    assert uid in listed.stdout and "scp-test-seg" in listed.stdout
    assert query(node, "SELECT s.is_model FROM instance i JOIN series s ON s.id = i.series_id WHERE i.sop_uid = ?",
                 uid) == [(1,)]
    # Sending the same model again changes nothing and succeeds. The CLI command above opened
    # the same data directory; it must leave the node's files in tmp/ (its spare receive files)
    # alone.
    res = storescu(node, "-R", str(dcm))
    assert "Received Store Response (Success)" in res.stderr
    assert query(node, "SELECT count(*) FROM modelrecord WHERE uid = ?", uid) == [(1,)]


@pytest.mark.timeout(90)
def test_tampered_model_is_refused_and_nothing_remains(node, tmp_path):
    dcm = _pack_model(tmp_path, name="scp-tampered")
    ds = pydicom.dcmread(dcm)
    payload = max((e for e in ds if e.tag.is_private and e.VR in ("OB", "UN")), key=lambda e: len(e.value))
    raw = bytearray(payload.value)
    raw[len(raw) // 2] ^= 0xFF
    payload.value = bytes(raw)
    tampered = tmp_path / "tampered.dcm"
    ds.save_as(tampered, enforce_file_format=True)
    before = object_files(node)

    status = pn_store(node, tampered)
    assert status is not None and status.Status == 0xC100, status
    assert "checksum" in str(status.get("ErrorComment", "")).lower(), status
    assert object_files(node) == before, "a refused model left a file in the store"
    assert not tmp_leftovers(node)
    assert instance_row(node, str(ds.SOPInstanceUID)) is None
    assert str(ds.SOPInstanceUID) not in node.cli("models", "list", "--json").stdout
    assert "refused with 0xC100: checksum-mismatch" in node.log()
    # storescu sees the failure too.
    res = storescu(node, "-R", str(tampered))
    assert "Received Store Response (Error: CannotUnderstand)" in res.stderr, res.stderr
    assert_serving(node)


# --------------------------------------------------------------------------- duplicates


def _variant(tmp_path: Path, src: str, name: str, **changes: object) -> Path:
    ds = pydicom.dcmread(get_testdata_file(src))
    for k, v in changes.items():
        setattr(ds, k, v)
    out = tmp_path / name
    ds.save_as(out, enforce_file_format=True)
    return out


@pytest.mark.timeout(60)
def test_duplicate_replace_policy(node, tmp_path):
    uid = generate_uid()
    first = _variant(tmp_path, "MR_small.dcm", "a.dcm", SOPInstanceUID=uid, SeriesDescription="first")
    second = _variant(tmp_path, "MR_small.dcm", "b.dcm", SOPInstanceUID=uid, SeriesDescription="second")
    for f in (first, second):
        ds = pydicom.dcmread(f)
        ds.file_meta.MediaStorageSOPInstanceUID = uid
        ds.save_as(f, enforce_file_format=True)

    assert pn_store(node, first).Status == 0x0000
    old = instance_row(node, uid)["digest"]
    assert pn_store(node, first).Status == 0x0000  # the same bytes again: no change
    assert instance_row(node, uid)["digest"] == old
    assert pn_store(node, second).Status == 0x0000  # other bytes: replaces (default policy)
    new = instance_row(node, uid)["digest"]
    assert new != old
    assert query(node, "SELECT count(*) FROM instance WHERE sop_uid = ?", uid) == [(1,)]
    assert not (node.data_dir / "objects" / old[:2] / old[2:4] / f"{old}.dcm").exists(), "replaced file kept"
    assert (node.data_dir / "objects" / new[:2] / new[2:4] / f"{new}.dcm").exists()


@pytest.mark.timeout(90)
def test_duplicate_reject_policy(tmp_path):
    uid = generate_uid()
    first = _variant(tmp_path, "MR_small.dcm", "a.dcm", SOPInstanceUID=uid, SeriesDescription="first")
    second = _variant(tmp_path, "MR_small.dcm", "b.dcm", SOPInstanceUID=uid, SeriesDescription="second")
    for f in (first, second):
        ds = pydicom.dcmread(f)
        ds.file_meta.MediaStorageSOPInstanceUID = uid
        ds.save_as(f, enforce_file_format=True)
    with node_process(tmp_path / "reject", storage={"duplicate_policy": "reject"}) as n:
        assert pn_store(n, first).Status == 0x0000
        digest = instance_row(n, uid)["digest"]
        files = object_files(n)
        assert pn_store(n, first).Status == 0x0000  # identical bytes are not a conflict
        status = pn_store(n, second)
        assert status.Status == 0x0111, status  # Duplicate SOP Instance
        assert "already stored" in str(status.ErrorComment)
        assert instance_row(n, uid)["digest"] == digest
        assert object_files(n) == files and not tmp_leftovers(n)
        assert_serving(n)


# --------------------------------------------------------------------------- hostile input


@pytest.mark.timeout(60)
@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")
def test_a_malformed_but_harmless_uid_is_stored_with_a_warning(node, tmp_path):
    # Modalities send them (pydicom-data's bad_sequence.dcm: 64 hex digits); Orthanc and
    # storescp store them, so does the node, and says so.
    malformed = "e0a4c06f" * 8
    ds = small_ct(malformed, generate_uid(), generate_uid(), 1)
    path = tmp_path / "malformed.dcm"
    ds.save_as(path, enforce_file_format=True)
    status = pn_store(node, path)
    assert status is not None and status.Status == 0x0000, status
    assert instance_row(node, malformed) is not None
    assert f"C-STORE {malformed} from" in node.log() and "is not a valid UID (PS3.5 9.1)" in node.log()
    assert_serving(node)


@pytest.mark.timeout(60)
@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")
def test_sop_instance_uid_with_dot_dot_is_refused(node, tmp_path):
    hostile = "1.2.3/../../../../etc/passwd"
    ds = small_ct(hostile, generate_uid(), generate_uid(), 1)
    path = tmp_path / "hostile.dcm"
    ds.save_as(path, enforce_file_format=True)
    before = object_files(node)
    status = pn_store(node, path)
    assert status is not None and status.Status == 0x0117, status  # Invalid SOP Instance
    assert "not a valid UID" in str(status.ErrorComment)
    assert object_files(node) == before and not tmp_leftovers(node)
    assert query(node, "SELECT count(*) FROM instance WHERE sop_uid LIKE '%..%'") == [(0,)]
    assert "refused with 0x0117" in node.log()
    assert_serving(node)


@pytest.mark.timeout(60)
@pytest.mark.filterwarnings("ignore:Expected explicit VR")
def test_dataset_that_does_not_parse(node, tmp_path):
    rng = __import__("random").Random(7)
    garbage = write_raw_file(tmp_path / "garbage.dcm", CTImageStorage, generate_uid(),
                             bytes(rng.randrange(256) for _ in range(4000)))
    # Larger than the 64 KiB parsed while it arrives: that early parse fails, the full one refuses.
    large = write_raw_file(tmp_path / "garbage-large.dcm", CTImageStorage, generate_uid(),
                           bytes(rng.randrange(256) for _ in range(300_000)))
    truncated_src = Path(get_testdata_file("CT_small.dcm"))
    body, _ = dataset_bytes(truncated_src)
    truncated = write_raw_file(tmp_path / "truncated.dcm", CTImageStorage,
                               str(pydicom.dcmread(truncated_src).SOPInstanceUID) + ".9", body[: len(body) - 1000])
    before = object_files(node)
    for path in (garbage, large, truncated):
        status = pn_store(node, path)
        # A failure status, or (acceptable, never seen here) a clean abort of that association.
        if status is not None:
            assert status.Status in (0xC210, 0xA900), status
        assert object_files(node) == before and not tmp_leftovers(node)
        assert_serving(node)
    assert "0xC210: dataset does not parse" in node.log()


def _one_pdu(assoc, ds: Dataset, message_id: int = 1) -> bytes:
    """A C-STORE-RQ for ``ds`` with its command and all its dataset fragments in one P-DATA-TF.

    pynetdicom and dcmtk send the command in a PDU of its own; PS3.8 9.3.5 allows both in one.
    """
    from io import BytesIO

    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset
    from pynetdicom.dimse_messages import C_STORE_RQ
    from pynetdicom.dimse_primitives import C_STORE
    from pynetdicom.pdu import P_DATA_TF
    from pynetdicom.pdu_primitives import P_DATA

    cx = assoc.accepted_contexts[0]
    body = DicomBytesIO()
    body.is_implicit_VR, body.is_little_endian = False, True  # explicit VR little endian (the context's)
    write_dataset(body, ds)
    req = C_STORE()
    req.MessageID, req.Priority = message_id, 0
    req.AffectedSOPClassUID, req.AffectedSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
    req.DataSet = BytesIO(body.getvalue())
    msg = C_STORE_RQ()
    msg.primitive_to_message(req)
    together = P_DATA()
    for fragment in msg.encode_msg(cx.context_id, 16384):
        together.presentation_data_value_list.extend(fragment.presentation_data_value_list)
    assert len(together.presentation_data_value_list) > 2  # command + several dataset fragments
    pdu = P_DATA_TF()
    pdu.from_primitive(together)
    return pdu.encode()


@pytest.mark.timeout(60)
def test_command_and_dataset_in_one_pdu_are_stored(node):
    uid = generate_uid()
    ds = small_ct(uid, generate_uid(), generate_uid(), 1, size=128)  # 32 KiB of pixels
    with pn_association(node, CTImageStorage, ExplicitVRLittleEndian) as assoc:
        # Paused as pynetdicom pauses its reactor around a request, so it cannot take the answer.
        assoc._reactor_checkpoint.clear()
        while not assoc._is_paused:
            threading.Event().wait(0.001)
        try:
            assoc.dul.socket.send(_one_pdu(assoc, ds))
            _, rsp = assoc.dimse.get_msg(block=True)
        finally:
            assoc._reactor_checkpoint.set()
    assert rsp is not None and rsp.Status == 0x0000, rsp
    row = instance_row(node, uid)
    assert row is not None and row["patient_id"] == "KILL001" and row["modality"] == "CT"
    stored = node.data_dir / "objects" / row["digest"][:2] / row["digest"][2:4] / f"{row['digest']}.dcm"
    assert pydicom.dcmread(stored).PixelData == ds.PixelData


@pytest.mark.timeout(60)
def test_p_data_item_longer_than_its_pdu_aborts_that_association_only(node):
    """A PDV item whose length runs past the PDU: the association is aborted, nothing is stored."""
    before = object_files(node)
    with pn_association(node, CTImageStorage, ExplicitVRLittleEndian) as assoc:
        cx = assoc.accepted_contexts[0]
        item = struct.pack(">LB", 5000, cx.context_id) + b"\x00" * 100  # claims 5000, holds 101
        assoc.dul.socket.send(struct.pack(">BBL", 0x04, 0, len(item)) + item)
        for _ in range(100):
            if not assoc.is_established:
                break
            threading.Event().wait(0.05)
        assert assoc.is_aborted
    assert object_files(node) == before and not tmp_leftovers(node)
    assert_serving(node)


@pytest.mark.timeout(90)
def test_allow_list_rejects_unknown_callers(tmp_path):
    peers = [
        {"ae_title": "GOODSCU", "host": "127.0.0.1", "port": free_port()},
        {"ae_title": "FARAWAY", "host": "10.254.254.254", "port": 104},
        {"ae_title": "BYNAME", "host": "localhost", "port": 104},
    ]
    with node_process(tmp_path / "allow", node={"allow_list": True}, peers=peers) as n:
        assert echoscu(n, aet="GOODSCU").returncode == 0
        assert echoscu(n, aet="BYNAME").returncode == 0  # host names are not resolved
        for aet in ("STRANGER", "FARAWAY"):
            res = echoscu(n, aet=aet)
            assert res.returncode != 0, res.stderr
            assert "Association Rejected" in res.stderr, res.stderr
            assert "Calling AE Title Not Recognized" in res.stderr or "calling-ae" in res.stderr.lower(), res.stderr
        log = n.log()
        assert "calling AE 'STRANGER' is not a known peer" in log
        assert "calling AE 'FARAWAY' is known at 10.254.254.254, not 127.0.0.1" in log
        res = storescu(n, str(get_testdata_file("CT_small.dcm")), aet="STRANGER")
        assert res.returncode != 0 and not object_files(n)
        assert echoscu(n, aet="GOODSCU").returncode == 0 and n.alive()
        # modelnode status probes with C-ECHO as MODELNODE-STATUS, which is not listed here: the
        # node is reported up, with the reason its echo did not get through.
        echo = json.loads(n.cli("status", "--json").stdout)["node_echo"]
        assert echo.startswith(f"answering on 127.0.0.1:{n.port}, but it rejected the status probe"), echo


# --------------------------------------------------------------------------- concurrency


@pytest.mark.timeout(90)
def test_concurrent_associations(node, tmp_path):
    """Four senders at once, one of them sending what another sends: every instance once, whole."""
    study = generate_uid()
    groups = []
    for g in range(3):
        series = generate_uid()
        paths = []
        for i in range(25):
            path = tmp_path / f"g{g}-{i:02d}.dcm"
            small_ct(generate_uid(), study, series, i + 1, size=128).save_as(path, enforce_file_format=True)
            paths.append(str(path))
        groups.append(paths)
    groups.append(groups[0])  # the same bytes from two associations at the same time
    procs = [subprocess.Popen([require("storescu"), "-aec", node.ae_title, "127.0.0.1", str(node.port), *paths],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for paths in groups]
    for p in procs:
        _, err = p.communicate(timeout=60)
        assert p.returncode == 0, err
    uids = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for paths in groups for p in paths}
    assert len(uids) == 75
    for uid in uids:
        row = instance_row(node, uid)
        assert row is not None
        stored = node.data_dir / "objects" / row["digest"][:2] / row["digest"][2:4] / f"{row['digest']}.dcm"
        assert sha256(stored) == row["digest"]
    assert query(node, "SELECT count(*) FROM instance WHERE series_id IN "
                       "(SELECT s.id FROM series s JOIN study st ON st.id = s.study_id WHERE st.study_uid = ?)",
                 study) == [(75,)]
    assert not tmp_leftovers(node)


# --------------------------------------------------------------------------- crash safety


@pytest.mark.timeout(90)
def test_start_drops_rows_whose_file_a_power_cut_lost(tmp_path):
    """A row committed while its directory entry was not yet on disk is removed at start."""
    with node_process(tmp_path / "n") as n:
        kept = _variant(tmp_path, "CT_small.dcm", "kept.dcm", SOPInstanceUID=generate_uid())
        lost = _variant(tmp_path, "MR_small.dcm", "lost.dcm", SOPInstanceUID=generate_uid())
        for f in (kept, lost):
            ds = pydicom.dcmread(f)
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            ds.save_as(f, enforce_file_format=True)
            assert pn_store(n, f).Status == 0x0000
        lost_uid = str(pydicom.dcmread(lost).SOPInstanceUID)
        digest = instance_row(n, lost_uid)["digest"]
        n.stop()
        (n.data_dir / "objects" / digest[:2] / digest[2:4] / f"{digest}.dcm").unlink()  # what the cut lost
        n.restart()
        assert instance_row(n, lost_uid) is None
        assert instance_row(n, str(pydicom.dcmread(kept).SOPInstanceUID)) is not None
        assert f"instance {lost_uid} had no file" in n.log()
        assert_serving(n)


@pytest.mark.timeout(90)
def test_start_drops_a_model_whose_file_a_power_cut_lost(tmp_path):
    """A model commits while its directory entry is synced too (issue 19): one lost is unregistered."""
    with node_process(tmp_path / "n") as n:
        dcm = _pack_model(tmp_path, name="scp-lost-model")
        uid = str(pydicom.dcmread(dcm, stop_before_pixels=True).SOPInstanceUID)
        assert pn_store(n, dcm).Status == 0x0000
        digest = instance_row(n, uid)["digest"]
        n.stop()
        (n.data_dir / "objects" / digest[:2] / digest[2:4] / f"{digest}.dcm").unlink()  # what the cut lost
        n.restart()
        assert instance_row(n, uid) is None
        assert query(n, "SELECT count(*) FROM modelrecord WHERE uid = ?", uid) == [(0,)]
        assert query(n, "SELECT count(*) FROM modelterm") == [(0,)]
        assert f"model {uid} had no file" in n.log()
        # Sent again, it is registered again.
        assert pn_store(n, dcm).Status == 0x0000
        assert query(n, "SELECT count(*) FROM modelrecord WHERE uid = ?", uid) == [(1,)]
        assert_serving(n)


@pytest.mark.timeout(120)
def test_sigkill_during_store_loses_no_acknowledged_instance(tmp_path):
    """SIGKILL in the middle of 200 C-STOREs: after a restart every acknowledged instance is there."""
    study, series = generate_uid(), generate_uid()
    src = tmp_path / "study"
    src.mkdir()
    files: list[Path] = []
    for i in range(200):
        path = src / f"ct{i:03d}.dcm"
        small_ct(generate_uid(), study, series, i + 1).save_as(path, enforce_file_format=True)
        files.append(path)
    uid_of = {str(p): str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in files}

    n = NodeProcess.start(tmp_path / "node")
    try:
        proc = subprocess.Popen(
            [require("storescu"), "-v", "-aec", n.ae_title, "127.0.0.1", str(n.port), *map(str, files)],
            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env={**os.environ, "TCP_NODELAY": "1"},
        )
        acknowledged: list[str] = []
        killed = threading.Event()
        current: str | None = None
        assert proc.stderr is not None
        for line in proc.stderr:
            m = re.search(r"Sending file: (.+)$", line)
            if m:
                current = m.group(1).strip()
            elif "Received Store Response (Success)" in line and current:
                acknowledged.append(current)
                if len(acknowledged) == 60 and not killed.is_set():
                    n.kill()  # SIGKILL by pid, mid-association
                    killed.set()
        proc.wait(30)
        assert killed.is_set(), "storescu finished before the node could be killed"
        assert 60 <= len(acknowledged) < 200

        n.restart()
        assert not tmp_leftovers(n), "a partial file survived the restart"
        for path in acknowledged:
            row = instance_row(n, uid_of[path])
            assert row is not None, f"acknowledged {path} is not indexed after the crash"
            stored = n.data_dir / "objects" / row["digest"][:2] / row["digest"][2:4] / f"{row['digest']}.dcm"
            assert stored.is_file() and sha256(stored) == row["digest"]
            assert dataset_bytes(stored)[0] == dataset_bytes(path)[0]
        # Nothing half-written: every object file is whole (named by its own SHA-256) ...
        for obj in object_files(n):
            assert sha256(obj) == obj.stem, f"{obj} is not whole"
        # ... and every index row names a file that exists.
        for (digest,) in query(n, "SELECT digest FROM instance"):
            assert (n.data_dir / "objects" / digest[:2] / digest[2:4] / f"{digest}.dcm").is_file()
        # The sender retries the whole study: everything is accepted, each instance once.
        res = storescu(n, *map(str, files))
        assert res.returncode == 0 and res.stderr.count("Received Store Response (Success)") == 200
        assert query(n, "SELECT count(*) FROM instance") == [(200,)]
    finally:
        n.stop()


@pytest.mark.timeout(60)
def test_sigusr1_dumps_thread_stacks_and_the_node_keeps_serving(node):
    import signal
    import time

    os.kill(node.proc.pid, signal.SIGUSR1)
    # faulthandler writes the dump in many pieces and sends no event: poll the log until all of
    # it is there (every thread, the server's too, and the main one waiting in serve()).
    wanted = ("Thread 0x", " in serve\n", "in serve_forever")
    deadline = time.monotonic() + 30
    while not all(w in node.log() for w in wanted):
        assert time.monotonic() < deadline, node.log()[-4000:]
        time.sleep(0.05)
    assert_serving(node)
