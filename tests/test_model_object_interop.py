"""Issue 13: every model object the node writes is one that dcmtk, dicom3tools and a PACS read.

ONNX files of odd and of even size are packed by ``modelnode models pack`` (the streamed file
path) and by ``encode`` with bytes then ``write``; a 0.1.0 object (odd value length, stray pad
byte) is put right by ``modelnode models repair``; the shipped reference objects come as they
are. Each must be read by ``dcmdump``, pass ``dciodvfy`` without errors, be sent to a real
Orthanc by dcmtk's ``storescu``, come back by C-MOVE to ``movescu`` and unpack to the same ONNX
bytes.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest
from cards import segmentation_card_dict
from node_proc import MODELNODE
from onnx_factory import segmentation_model_of_parity, write_0_1_0_model_object
from peers import Orthanc, free_port, orthanc, require, run

from iods import model_object as mo
from iods.card import parse_card

pytestmark = pytest.mark.peers

REFERENCE = Path(__file__).resolve().parent.parent / "models" / "reference"
OBJECTS = ["odd-pack", "even-pack", "odd-bytes", "even-bytes", "repaired-0.1.0", "lung_unet", "bodypart_cnn"]
# Over read_file's 256 KB deferral, so unpack streams these payloads from the file.
WEIGHT_ELEMS = 80_000


@dataclass(frozen=True)
class Obj:
    path: Path
    onnx: bytes
    uid: str


@dataclass(frozen=True)
class Objects:
    work: Path
    by_name: dict[str, Obj]
    legacy: Obj  # the 0.1.0 object that "repaired-0.1.0" was repaired from


def _card(work: Path, version: str) -> tuple[Path, dict]:
    card = segmentation_card_dict(name="issue-13-interop", version=version)
    card["identity"]["created"] = str(card["identity"]["created"])
    path = work / f"card-{version}.json"
    path.write_text(json.dumps(card))
    return path, card


def _uid(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


@pytest.fixture(scope="module")
def objects(tmp_path_factory) -> Objects:
    work = tmp_path_factory.mktemp("interop")
    made: dict[str, Obj] = {}
    for seed, odd in ((21, True), (22, False)):
        onnx = segmentation_model_of_parity(odd, seed=seed, weight_elems=WEIGHT_ELEMS)
        assert len(onnx) % 2 == odd
        parity = "odd" if odd else "even"
        src = work / f"{parity}.onnx"
        src.write_bytes(onnx)
        # Distinct versions give distinct UIDs: all objects go to the one Orthanc.
        card_path, _ = _card(work, f"1.{seed}.0")
        out = work / f"{parity}-pack.dcm"
        run([*MODELNODE, "models", "pack", str(src), "--card", str(card_path), "-o", str(out)], cwd=work)
        made[f"{parity}-pack"] = Obj(out, onnx, _uid(out))
        _, card = _card(work, f"2.{seed}.0")
        out = work / f"{parity}-bytes.dcm"
        mo.write(mo.encode(onnx, parse_card(card)), out)
        made[f"{parity}-bytes"] = Obj(out, onnx, _uid(out))

    onnx = (work / "odd.onnx").read_bytes()
    _, card = _card(work, "0.1.0")
    legacy = work / "0.1.0.dcm"
    write_0_1_0_model_object(work / "odd.onnx", parse_card(card), legacy)
    repaired = work / "repaired-0.1.0.dcm"
    res = run([*MODELNODE, "models", "repair", str(legacy), "-o", str(repaired)], cwd=work)
    assert "repaired" in res.stdout
    made["repaired-0.1.0"] = Obj(repaired, onnx, _uid(repaired))

    for name in ("lung_unet", "bodypart_cnn"):
        path = REFERENCE / f"{name}.dcm"
        out = work / f"{name}.onnx"
        card = mo.unpack_file(path, out)
        made[name] = Obj(path, out.read_bytes(), card.identity.uid)
    assert sorted(made) == sorted(OBJECTS)
    return Objects(work, made, Obj(legacy, onnx, _uid(legacy)))


def dciodvfy(path: Path) -> tuple[str, list[str], list[str]]:
    """dciodvfy's report, its error lines, and its warnings other than our unknown private tags."""
    res = run([require("dciodvfy"), str(path)], check=False)
    out = res.stdout + res.stderr
    errors = [line for line in out.splitlines() if "Error" in line]
    warnings = [line for line in out.splitlines() if "Warning" in line and "0x4d4d" not in line]
    return out, errors, warnings


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", OBJECTS)
def test_dcmdump_reads_the_object(objects: Objects, name: str) -> None:
    obj = objects.by_name[name]
    res = run([require("dcmdump"), str(obj.path)], check=False)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out
    assert "Bad Value Length" not in out and "is odd" not in out, out
    lines = {line[:11]: line for line in out.splitlines()}
    # The length element holds the true payload length; the OB value is padded to even.
    assert lines["(4d4d,1002)"].startswith(f"(4d4d,1002) UL {len(obj.onnx)} "), out
    assert f"# {len(obj.onnx) + len(obj.onnx) % 2}, 1 " in lines["(4d4d,1010)"], out


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", OBJECTS)
def test_dciodvfy_reports_no_errors(objects: Objects, name: str) -> None:
    out, errors, warnings = dciodvfy(objects.by_name[name].path)
    assert "RawData" in out
    assert errors == [], out
    assert warnings == [], out


@pytest.mark.timeout(60)
def test_the_0_1_0_object_is_what_dcmtk_and_dciodvfy_refuse(objects: Objects, pacs: Pacs) -> None:
    """The reason for the repair, shown on the object it starts from, and that it keeps the UID."""
    legacy = objects.legacy
    res = run([require("dcmdump"), str(legacy.path)], check=False)
    assert "is odd" in res.stdout + res.stderr
    out, errors, _ = dciodvfy(legacy.path)
    assert any("Bad Value Length" in line for line in errors), out
    res = run(["storescu", "-aec", pacs.orthanc.aet, "127.0.0.1", str(pacs.orthanc.port), str(legacy.path)],
              check=False)
    assert res.returncode != 0 and "Bad DICOM file" in res.stderr, res.stdout + res.stderr
    repaired = objects.by_name["repaired-0.1.0"]
    assert repaired.uid == legacy.uid
    for obj in (legacy, repaired):
        out = obj.path.with_suffix(".unpacked.onnx")
        assert mo.unpack_file(obj.path, out).identity.uid == legacy.uid
        assert out.read_bytes() == legacy.onnx


@dataclass
class Pacs:
    orthanc: Orthanc
    move_port: int


@pytest.fixture(scope="module")
def pacs(tmp_path_factory) -> Iterator[Pacs]:
    for tool in ("storescu", "movescu"):
        require(tool)
    move_port = free_port()
    work = tmp_path_factory.mktemp("interop-orthanc")
    with orthanc(work, modalities={"movescu": ("MOVESCU", "127.0.0.1", move_port)}) as o:
        yield Pacs(o, move_port)


@pytest.mark.timeout(180)
def test_storescu_to_orthanc_and_back_by_movescu_gives_the_same_onnx(objects: Objects, pacs: Pacs) -> None:
    paths = [str(objects.by_name[name].path) for name in OBJECTS]
    # One association for all: storescu stops on a file it cannot read, so each must be sound.
    run(["storescu", "-aec", pacs.orthanc.aet, "127.0.0.1", str(pacs.orthanc.port), *paths], timeout=120)
    stored = {pacs.orthanc.rest(f"/instances/{i}/simplified-tags")["SOPInstanceUID"]
              for i in pacs.orthanc.instances()}
    assert stored == {objects.by_name[name].uid for name in OBJECTS}

    # All models are one patient in a PACS: one C-MOVE at PATIENT level brings every one back.
    back = objects.work / "moved"
    back.mkdir()
    # +B writes into the working directory whatever -od says (dcmtk 3.6.7): run it in ``back``.
    run(["movescu", "-P", "-aec", pacs.orthanc.aet, "-aem", "MOVESCU", "--port", str(pacs.move_port), "+B",
         "-od", str(back), "127.0.0.1", str(pacs.orthanc.port),
         "-k", "QueryRetrieveLevel=PATIENT", "-k", f"PatientID={mo.LIBRARY_PATIENT_ID}"], cwd=back, timeout=120)
    moved = {_uid(path): path for path in back.iterdir()}
    assert sorted(moved) == sorted(obj.uid for obj in objects.by_name.values())
    for name in OBJECTS:
        obj = objects.by_name[name]
        out = objects.work / f"moved-{name}.onnx"
        card = mo.unpack_file(moved[obj.uid], out)
        assert card.identity.uid == obj.uid
        assert out.read_bytes() == obj.onnx, name
