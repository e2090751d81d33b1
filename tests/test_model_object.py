"""The model object: encoding, verification, refusals, and what dciodvfy says of it."""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
from dataclasses import replace
from pathlib import Path

import pydicom
import pytest
from cards import segmentation_card_dict
from onnx_factory import (
    classification_model,
    segmentation_model,
    segmentation_model_of_parity,
    write_0_1_0_model_object,
)
from peers import require
from pydicom.dataelem import DataElement
from pydicom.uid import ImplicitVRLittleEndian

from iods import model_object as mo
from iods.card import parse_card

pytestmark = pytest.mark.timeout(30)

REFERENCE = Path(__file__).resolve().parent.parent / "models" / "reference"


def _tag(offset: int) -> int:
    return (mo.PRIVATE_GROUP << 16) | 0x1000 | offset


@pytest.fixture
def packed(tmp_path, seg_onnx, seg_card):
    path = tmp_path / "model.dcm"
    mo.write(mo.encode(seg_onnx, seg_card), path)
    return path


def test_encode_decode_returns_the_same_bytes_and_card(packed, seg_onnx, seg_card):
    ds = pydicom.dcmread(packed)
    payload, card = mo.decode(ds)
    assert payload == seg_onnx
    assert card.identity.name == seg_card.identity.name
    assert card.identity.uid == ds.SOPInstanceUID  # the model UID is the instance UID
    assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    assert ds.SOPClassUID == mo.RAW_DATA_STORAGE


def test_searchable_metadata_is_in_standard_attributes(packed):
    ds = pydicom.dcmread(packed)
    assert ds.Modality == "CT"
    assert ds.BodyPartExamined == "CHEST"
    assert ds.SeriesDescription == "test-lung-seg 1.0.0"
    assert ds.StudyDescription == "test-lung-seg"
    assert ds.SoftwareVersions == "1.0.0"
    assert ds.PatientID == mo.LIBRARY_PATIENT_ID
    regions = [i.ConceptCodeSequence[0].CodeValue for i in ds.AcquisitionContextSequence
               if i.ConceptNameCodeSequence[0].CodeValue == mo.TARGET_REGION.value]
    findings = [i.ConceptCodeSequence[0].CodeValue for i in ds.AcquisitionContextSequence
                if i.ConceptNameCodeSequence[0].CodeValue == mo.FINDING.value]
    assert regions == ["39607008", "51185008"]
    assert findings == ["27925004"]
    # Private payload sits in a reserved block, never in the 0x0010-0x00FF creator range.
    assert ds[(mo.PRIVATE_GROUP << 16) | 0x0010].value == mo.PRIVATE_CREATOR
    assert _tag(mo.EL_PAYLOAD) in ds


def test_versions_share_a_study_and_get_their_own_series(seg_onnx):
    v1 = mo.encode(seg_onnx, parse_card(segmentation_card_dict(version="1.0.0")))
    v2_card = parse_card(segmentation_card_dict(version="1.1.0"))
    v2_card = replace(v2_card, provenance=replace(v2_card.provenance, parent_uid=str(v1.SOPInstanceUID)))
    v2 = mo.encode(seg_onnx, v2_card)
    assert v1.StudyInstanceUID == v2.StudyInstanceUID
    assert v1.SeriesInstanceUID != v2.SeriesInstanceUID
    assert v1.SOPInstanceUID != v2.SOPInstanceUID
    ref = v2.ReferencedInstanceSequence[0]
    assert ref.ReferencedSOPInstanceUID == v1.SOPInstanceUID
    assert mo.decode(v2)[1].provenance.parent_uid == v1.SOPInstanceUID


def test_packing_is_deterministic(tmp_path, seg_onnx, seg_card):
    a, b = tmp_path / "a.dcm", tmp_path / "b.dcm"
    mo.write(mo.encode(seg_onnx, seg_card), a)
    mo.write(mo.encode(seg_onnx, seg_card), b)
    assert a.read_bytes() == b.read_bytes()


@pytest.mark.peers
def test_dciodvfy_reports_no_errors(tmp_path, seg_onnx, seg_card):
    dciodvfy = require("dciodvfy")
    parent = mo.encode(seg_onnx, seg_card)
    child_card = parse_card(segmentation_card_dict(version="2.0.0"))
    child_card = replace(child_card, provenance=replace(child_card.provenance, parent_uid=str(parent.SOPInstanceUID)))
    for name, ds in (("parent", parent), ("child", mo.encode(seg_onnx, child_card))):
        path = tmp_path / f"{name}.dcm"
        mo.write(ds, path)
        res = subprocess.run([dciodvfy, str(path)], capture_output=True, text=True, timeout=30)
        out = res.stdout + res.stderr
        assert "RawData" in out
        errors = [line for line in out.splitlines() if "Error" in line]
        assert errors == [], out
        # Only our private elements are unknown to dciodvfy; no standard attribute is amiss.
        warnings = [line for line in out.splitlines() if "Warning" in line and "0x4d4d" not in line]
        assert warnings == [], out


def test_implicit_vr_round_trip(tmp_path, packed, seg_onnx):
    ds = pydicom.dcmread(packed)
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    out = tmp_path / "implicit.dcm"
    ds.save_as(out, implicit_vr=True, little_endian=True)
    back = pydicom.dcmread(out)
    assert back.file_meta.TransferSyntaxUID == ImplicitVRLittleEndian
    assert mo.decode(back)[0] == seg_onnx
    assert mo.unpack_file(out, tmp_path / "x.onnx").identity.name == "test-lung-seg"
    assert (tmp_path / "x.onnx").read_bytes() == seg_onnx


def test_private_elements_arriving_as_un_are_accepted(tmp_path, packed, seg_onnx):
    """A PACS without our private dictionary returns the block as UN in Explicit VR."""
    ds = pydicom.dcmread(packed)
    raw = pydicom.filewriter.write_dataset  # noqa: F841 (documenting that we re-encode below)
    for offset in (mo.EL_FORMAT, mo.EL_LENGTH, mo.EL_SHA256, mo.EL_SCHEMA, mo.EL_CARD, mo.EL_PAYLOAD):
        elem = ds[_tag(offset)]
        if elem.VR == "UL":
            value = int(elem.value).to_bytes(4, "little")
        elif isinstance(elem.value, bytes):
            value = elem.value
        else:
            value = str(elem.value).encode()
            value += b" " * (len(value) % 2)
        ds[_tag(offset)] = DataElement(_tag(offset), "UN", value)
    out = tmp_path / "un.dcm"
    ds.save_as(out, enforce_file_format=True)
    back = pydicom.dcmread(out)
    assert back[_tag(mo.EL_PAYLOAD)].VR in ("UN", "OB")
    assert mo.decode(back)[0] == seg_onnx
    assert mo.unpack_file(out, tmp_path / "un.onnx") is not None
    assert (tmp_path / "un.onnx").read_bytes() == seg_onnx


# ---------------------------------------------------------------- refusals, each distinct


def _refusal(path) -> mo.ModelObjectError:
    with pytest.raises(mo.ModelObjectError) as err:
        mo.unpack_file(path, path.with_suffix(".onnx"))
    assert not path.with_suffix(".onnx").exists(), "nothing unverified may be written"
    with pytest.raises(type(err.value)):
        mo.decode(pydicom.dcmread(path))
    return err.value


def test_tampered_payload_is_refused(packed):
    ds = pydicom.dcmread(packed)
    payload = bytearray(ds[_tag(mo.EL_PAYLOAD)].value)
    payload[len(payload) // 2] ^= 0xFF
    ds[_tag(mo.EL_PAYLOAD)].value = bytes(payload)
    ds.save_as(packed)
    err = _refusal(packed)
    assert isinstance(err, mo.ChecksumMismatch)
    assert "does not match the recorded" in str(err)


def test_wrong_checksum_is_refused(packed):
    ds = pydicom.dcmread(packed)
    ds[_tag(mo.EL_SHA256)].value = "0" * 64
    ds.save_as(packed)
    err = _refusal(packed)
    assert isinstance(err, mo.ChecksumMismatch)
    assert "0" * 64 in str(err)


def test_malformed_checksum_is_refused(packed):
    ds = pydicom.dcmread(packed)
    ds[_tag(mo.EL_SHA256)].value = "not-a-digest"
    ds.save_as(packed)
    err = _refusal(packed)
    assert isinstance(err, mo.ChecksumMismatch)
    assert "not a SHA-256" in str(err)


def test_non_onnx_payload_is_refused(tmp_path, seg_card):
    junk = b"\x89PNG\r\n\x1a\n" + b"definitely not a protobuf" * 10
    path = tmp_path / "junk.dcm"
    mo.write(mo.encode(junk, seg_card, verify=False), path)
    err = _refusal(path)
    assert isinstance(err, mo.InvalidOnnx)


def test_truncated_file_is_refused(packed):
    data = packed.read_bytes()
    packed.write_bytes(data[:-50])
    with pytest.raises(mo.TruncatedPayload, match="truncated"):
        mo.unpack_file(packed, packed.with_suffix(".onnx"))
    assert not packed.with_suffix(".onnx").exists()


def test_missing_card_field_is_refused_naming_it(packed):
    ds = pydicom.dcmread(packed)
    card = json.loads(ds[_tag(mo.EL_CARD)].value)
    del card["identity"]["licence"]
    ds[_tag(mo.EL_CARD)].value = json.dumps(card)
    ds.save_as(packed)
    err = _refusal(packed)
    assert isinstance(err, mo.InvalidCard)
    assert err.field == "identity.licence"


def test_oversized_payload_is_refused(tmp_path, packed, seg_onnx, seg_card):
    with pytest.raises(mo.PayloadTooLarge, match="over the limit of 100 bytes"):
        mo.encode(seg_onnx, seg_card, max_payload=100)
    with pytest.raises(mo.PayloadTooLarge):
        mo.unpack_file(packed, tmp_path / "x.onnx", max_payload=100)
    with pytest.raises(mo.PayloadTooLarge):
        mo.decode(pydicom.dcmread(packed), max_payload=100)


def test_graph_that_disagrees_with_the_card_is_refused(seg_card):
    with pytest.raises(mo.ShapeMismatch, match="3 channels, card has 2 classes"):
        mo.encode(segmentation_model(classes=3), seg_card)
    with pytest.raises(mo.ShapeMismatch, match="fixed at 32, card input.size says dynamic"):
        mo.encode(classification_model(classes=2), seg_card)


def test_distinct_refusals_have_distinct_codes():
    codes = {cls.code for cls in (mo.NotAModelObject, mo.PayloadTooLarge, mo.TruncatedPayload,
                                  mo.ChecksumMismatch, mo.InvalidOnnx, mo.ShapeMismatch, mo.InvalidCard)}
    assert len(codes) == 7


def test_a_ct_image_is_not_a_model_object():
    ds = pydicom.dcmread(pydicom.data.get_testdata_file("CT_small.dcm"))
    assert not mo.is_model_object(ds)
    with pytest.raises(mo.NotAModelObject):
        mo.decode(ds)


# ---------------------------------------------------------------- even value length (issue 13)


def _payload_value(path) -> tuple[int, int]:
    """The payload element's declared value length and the file offset of its value."""
    ds = pydicom.dcmread(path, defer_size="1 KB")
    raw = ds.get_item(_tag(mo.EL_PAYLOAD), keep_deferred=True)
    return raw.length, raw.value_tell


def _assert_padded(path, payload: bytes) -> None:
    """PS3.5 7.1.1: an even value length, an odd payload padded with one trailing 00H."""
    length, at = _payload_value(path)
    data = path.read_bytes()
    assert length == len(payload) + len(payload) % 2
    assert len(data) == at + length, "nothing may follow the payload element"
    assert data[at:at + len(payload)] == payload
    assert data[at + len(payload):] == b"\x00" * (len(payload) % 2)
    assert pydicom.dcmread(path)[_tag(mo.EL_LENGTH)].value == len(payload)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("weight_elems", [0, 80_000], ids=["in-memory", "deferred"])
@pytest.mark.parametrize("odd", [True, False], ids=["odd", "even"])
def test_payload_value_is_even_on_every_write_path(tmp_path, seg_card, odd, weight_elems):
    # 80 000 float weights put the payload over read_file's 256 KB deferral: unpack streams it.
    onnx_bytes = segmentation_model_of_parity(odd, weight_elems=weight_elems)
    assert len(onnx_bytes) % 2 == odd
    src = tmp_path / "model.onnx"
    src.write_bytes(onnx_bytes)
    by_file, by_bytes, by_stream = tmp_path / "file.dcm", tmp_path / "bytes.dcm", tmp_path / "stream.dcm"
    mo.pack_file(src, seg_card, by_file)
    mo.write(mo.encode(onnx_bytes, seg_card), by_bytes)
    mo.write(mo.encode(io.BytesIO(onnx_bytes), seg_card), by_stream)
    for path in (by_file, by_bytes, by_stream):
        _assert_padded(path, onnx_bytes)
        assert mo.decode(pydicom.dcmread(path))[0] == onnx_bytes
        mo.unpack_file(path, tmp_path / "back.onnx")
        assert (tmp_path / "back.onnx").read_bytes() == onnx_bytes
    assert by_file.read_bytes() == by_bytes.read_bytes() == by_stream.read_bytes()


@pytest.fixture(params=[0, 80_000], ids=["in-memory", "deferred"])
def legacy(request, tmp_path, seg_card):
    """An odd payload packed as 0.1.0 did, and the same model packed today."""
    onnx_bytes = segmentation_model_of_parity(True, weight_elems=request.param)
    assert len(onnx_bytes) % 2 == 1
    src = tmp_path / "model.onnx"
    src.write_bytes(onnx_bytes)
    old, new = tmp_path / "0.1.0.dcm", tmp_path / "today.dcm"
    write_0_1_0_model_object(src, seg_card, old)
    mo.pack_file(src, seg_card, new)
    return old, new, onnx_bytes


@pytest.mark.timeout(60)
def test_a_0_1_0_object_with_its_odd_length_still_decodes_and_unpacks(tmp_path, legacy):
    old, new, onnx_bytes = legacy
    # 0.1.0's layout: the odd length itself, then the stray pad byte after the element.
    length, at = _payload_value(old)
    data = old.read_bytes()
    assert length == len(onnx_bytes) and length % 2 == 1
    assert data[at:] == onnx_bytes + b"\x00"
    # Byte for byte today's object but for the length field just before the value.
    assert data[:at - 4] + data[at:] == new.read_bytes()[:at - 4] + new.read_bytes()[at:]
    assert int.from_bytes(new.read_bytes()[at - 4:at], "little") == length + 1

    payload, card = mo.decode(pydicom.dcmread(old))
    assert payload == onnx_bytes
    assert mo.unpack_file(old, tmp_path / "x.onnx").identity.uid == card.identity.uid
    assert (tmp_path / "x.onnx").read_bytes() == onnx_bytes
    _, info = mo.read_card(mo.read_file(old))
    assert info == mo.PayloadInfo(len(onnx_bytes), hashlib.sha256(onnx_bytes).hexdigest())


@pytest.mark.timeout(60)
def test_repair_file_pads_a_0_1_0_object_and_keeps_everything_else(tmp_path, legacy):
    old, new, onnx_bytes = legacy
    out = tmp_path / "repaired.dcm"
    result = mo.repair_file(old, out)
    assert not result.was_conformant
    assert result.changes == (f"payload value length {len(onnx_bytes)} is odd: padded to {len(onnx_bytes) + 1}",)
    assert result.uid == pydicom.dcmread(old, stop_before_pixels=True).SOPInstanceUID
    assert out.read_bytes() == new.read_bytes()  # same UID, same attributes, as packed today
    _assert_padded(out, onnx_bytes)

    again = tmp_path / "again.dcm"
    result = mo.repair_file(out, again)
    assert result.was_conformant and result.changes == ()
    assert again.read_bytes() == out.read_bytes()


@pytest.mark.timeout(60)
def test_repair_file_writes_explicit_vr_and_private_vrs_back(tmp_path, legacy):
    """A model that came back from a PACS in Implicit VR, or with its block as UN, is normalized."""
    old, new, onnx_bytes = legacy
    implicit = tmp_path / "implicit.dcm"
    ds = pydicom.dcmread(old)
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    ds.save_as(implicit, implicit_vr=True, little_endian=True)
    result = mo.repair_file(implicit, tmp_path / "from-implicit.dcm")
    assert any(c.startswith("transfer syntax 1.2.840.10008.1.2 ->") for c in result.changes)
    assert (tmp_path / "from-implicit.dcm").read_bytes() == new.read_bytes()

    ds = pydicom.dcmread(new)
    for offset in (mo.EL_FORMAT, mo.EL_LENGTH, mo.EL_SHA256, mo.EL_SCHEMA, mo.EL_CARD):
        elem = ds[_tag(offset)]
        value = int(elem.value).to_bytes(4, "little") if elem.VR == "UL" else str(elem.value).encode()
        ds[_tag(offset)] = DataElement(_tag(offset), "UN", value + b" " * (len(value) % 2))
    as_un = tmp_path / "un.dcm"
    ds.save_as(as_un, enforce_file_format=True)
    assert pydicom.dcmread(as_un).get_item(_tag(mo.EL_SCHEMA)).VR == "UN"
    result = mo.repair_file(as_un, tmp_path / "from-un.dcm")
    assert result.changes == ("(4D4D,1001) UN -> CS", "(4D4D,1002) UN -> UL", "(4D4D,1003) UN -> LO",
                              "(4D4D,1004) UN -> LO", "(4D4D,1005) UN -> UT")
    assert (tmp_path / "from-un.dcm").read_bytes() == new.read_bytes()


@pytest.mark.timeout(60)
def test_repair_file_refuses_what_unpack_refuses_and_writes_nothing(tmp_path, legacy):
    old, _, _ = legacy
    data = bytearray(old.read_bytes())
    data[-20] ^= 0x55
    bad = tmp_path / "tampered.dcm"
    bad.write_bytes(bytes(data))
    out = tmp_path / "out" / "repaired.dcm"
    with pytest.raises(mo.ChecksumMismatch):
        mo.repair_file(bad, out)
    assert list(out.parent.iterdir()) == [], "no output and no temporary file may be left"
    with pytest.raises(mo.NotAModelObject):
        mo.repair_file(pydicom.data.get_testdata_file("CT_small.dcm"), out)
    assert list(out.parent.iterdir()) == []


@pytest.mark.timeout(30)
def test_a_payload_file_that_shrinks_before_writing_leaves_no_object(tmp_path, seg_card):
    onnx_bytes = segmentation_model_of_parity(True)
    src = tmp_path / "model.onnx"
    src.write_bytes(onnx_bytes)
    out = tmp_path / "out" / "model.dcm"
    with open(src, "rb") as fh:
        ds = mo.encode(fh, seg_card)  # hashed: the length element now promises every byte
        src.write_bytes(onnx_bytes[:-10])
        with pytest.raises(OSError, match="changed while being packed"):
            mo.write(ds, out)
    assert list(out.parent.iterdir()) == []


@pytest.mark.timeout(30)
@pytest.mark.parametrize("name", ["lung_unet", "bodypart_cnn", "thorax_unet3d"])
def test_shipped_reference_objects_have_even_payload_values(name):
    path = REFERENCE / f"{name}.dcm"
    length, at = _payload_value(path)
    card, info = mo.read_card(mo.read_file(path))
    assert length % 2 == 0 and length == info.length + info.length % 2
    assert path.stat().st_size == at + length
    assert path.read_bytes()[at + info.length:] == b"\x00" * (info.length % 2)
    assert card.identity.uid == pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID


# --------------------------------------------------------------------------- verify (the Storage SCP's path)


def _parsed(path: Path):
    """The dataset as the Storage SCP parses a received file (large values left on disk)."""
    from node.storage.validate import parse

    with open(path, "rb") as fh:
        return parse(fh, path.stat().st_size, str(pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID))


@pytest.mark.parametrize("weight_elems", [0, 4096, 40000], ids=["inline", "deferred", "past-the-first-64-KiB"])
def test_verify_checks_what_unpack_checks_without_reading_the_file_again(tmp_path, seg_card, weight_elems):
    path = tmp_path / "m.dcm"
    onnx_bytes = segmentation_model(weight_elems=weight_elems, seed=weight_elems)
    mo.write(mo.encode(onnx_bytes, seg_card), path)
    card, payload = mo.verify(_parsed(path), path)
    assert card == mo.unpack_file(path, None) and payload.sha256 == hashlib.sha256(onnx_bytes).hexdigest()
    assert payload.length == len(onnx_bytes)
    # A flipped payload byte: refused as unpack_file refuses it.
    raw = bytearray(path.read_bytes())
    at = raw.rfind(onnx_bytes[-64:]) + 10
    raw[at] ^= 0xFF
    bad = tmp_path / "bad.dcm"
    bad.write_bytes(bytes(raw))
    with pytest.raises(mo.ChecksumMismatch):
        mo.verify(_parsed(bad), bad)
    with pytest.raises(mo.ChecksumMismatch):
        mo.unpack_file(bad, None)


def test_the_checker_runs_once_per_payload_digest_and_the_card_is_checked_every_time(tmp_path, seg_card, monkeypatch):
    runs = []
    library = mo._checked_signature
    monkeypatch.setattr(mo, "_checked_signature", lambda payload: runs.append(1) or library(payload))
    onnx_bytes = segmentation_model(seed=1234)
    first, second = tmp_path / "a.dcm", tmp_path / "b.dcm"
    mo.write(mo.encode(onnx_bytes, seg_card), first)
    renamed = replace(seg_card, identity=replace(seg_card.identity, name="same-weights"))
    mo.write(mo.encode(onnx_bytes, renamed), second)
    runs.clear()  # (encode checks too)
    mo.verify(_parsed(first), first)
    mo.verify(_parsed(second), second)
    assert len(runs) == 1  # same bytes (SHA-256 computed over them here): checked once
    # Same weights, a card that disagrees with the graph: still refused.
    data = segmentation_card_dict(name="three-classes")
    data["task"]["classes"].append({**data["task"]["classes"][0], "label": "third"})
    wrong = parse_card(data)
    third = tmp_path / "c.dcm"
    mo.write(mo.encode(onnx_bytes, wrong, verify=False), third)
    with pytest.raises(mo.ShapeMismatch):
        mo.verify(_parsed(third), third)
    assert len(runs) == 1
