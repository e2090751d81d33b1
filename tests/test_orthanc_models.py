"""Issue 2's promise, end to end: a model stored in a plain PACS comes back as the same ONNX bytes.

A model object is packed, sent to Orthanc with dcmtk's storescu, retrieved with C-MOVE (movescu
with its own receiver, listed in Orthanc's DicomModalities) and with C-GET (dcmtk's getscu and
``modelnode fetch --get``), and unpacked with ``modelnode models unpack``. Sent in Implicit VR
(storescu -xi), it comes back in Implicit VR to movescu, and to modelnode (which takes Raw Data in
Explicit VR only) with its private elements as UN; either way the model must still verify, and
the node must accept the UN version.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest
from cards import segmentation_card_dict
from node_proc import MODELNODE, node_process
from onnx_factory import segmentation_model
from peers import Orthanc, free_port, orthanc, require, run
from pynetdicom.dsutils import split_dataset

EXPLICIT_LE = "1.2.840.10008.1.2.1"
IMPLICIT_LE = "1.2.840.10008.1.2"
# (4D4D,1010), our payload element, written as UN in Explicit VR Little Endian.
PAYLOAD_AS_UN = b"\x4d\x4d\x10\x10UN"


@dataclass
class Setup:
    orthanc: Orthanc
    work: Path
    move_port: int


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> Iterator[Setup]:
    for tool in ("storescu", "movescu", "getscu"):
        require(tool)
    work = tmp_path_factory.mktemp("orthanc-models")
    move_port = free_port()
    with orthanc(work / "orthanc", modalities={"movescu": ("MOVESCU", "127.0.0.1", move_port)}) as o:
        yield Setup(o, work, move_port)


def modelnode(*args: str, cwd: Path) -> str:
    return run([*MODELNODE, *args], cwd=cwd).stdout


def pack(work: Path, version: str, seed: int) -> tuple[Path, bytes, str]:
    """Pack a real ONNX model and its card with the CLI, as a publisher would."""
    import json

    onnx = segmentation_model(seed=seed)
    (work / f"m{seed}.onnx").write_bytes(onnx)
    card = segmentation_card_dict(name="pacs-round-trip", version=version)
    card["identity"]["created"] = str(card["identity"]["created"])
    (work / f"card{seed}.json").write_text(json.dumps(card))
    out = work / f"model-{seed}.dcm"
    modelnode("models", "pack", str(work / f"m{seed}.onnx"), "--card", str(work / f"card{seed}.json"), "-o", str(out),
              cwd=work)
    return out, onnx, str(pydicom.dcmread(out, stop_before_pixels=True).SOPInstanceUID)


def unpack(work: Path, dcm: Path) -> bytes:
    out = dcm.with_suffix(".onnx")
    modelnode("models", "unpack", str(dcm), "-o", str(out), cwd=work)
    return out.read_bytes()


def transfer_syntax(path: Path) -> str:
    return str(split_dataset(path)[0].TransferSyntaxUID)


def movescu(s: Setup, uid: str, out: Path) -> Path:
    out.mkdir()
    # +B writes into the working directory whatever -od says (dcmtk 3.6.7): run it in ``out``.
    run(["movescu", "-S", "-aec", s.orthanc.aet, "-aem", "MOVESCU", "--port", str(s.move_port), "+B", "-od", str(out),
         "127.0.0.1", str(s.orthanc.port), "-k", "QueryRetrieveLevel=IMAGE", "-k", f"SOPInstanceUID={uid}"], cwd=out)
    (got,) = out.iterdir()
    return got


def getscu(s: Setup, uid: str, out: Path) -> Path:
    out.mkdir()
    run(["getscu", "-S", "-aec", s.orthanc.aet, "+B", "-od", str(out), "127.0.0.1", str(s.orthanc.port),
         "-k", "QueryRetrieveLevel=IMAGE", "-k", f"SOPInstanceUID={uid}"], cwd=out)
    (got,) = out.iterdir()
    return got


@pytest.mark.timeout(90)
def test_model_stored_in_orthanc_comes_back_by_move_and_get(setup: Setup) -> None:
    work = setup.work / "explicit"
    work.mkdir()
    path, onnx, uid = pack(work, "1.0.0", seed=11)
    run(["storescu", "-aec", setup.orthanc.aet, "127.0.0.1", str(setup.orthanc.port), str(path)])
    (iid,) = [i for i in setup.orthanc.instances()
              if setup.orthanc.rest(f"/instances/{i}/simplified-tags")["SOPInstanceUID"] == uid]
    assert setup.orthanc.rest(f"/instances/{iid}/metadata?expand")["TransferSyntax"] == EXPLICIT_LE

    moved = movescu(setup, uid, work / "move")
    assert unpack(work, moved) == onnx
    got = getscu(setup, uid, work / "get")  # dcmtk getscu proposes Raw Data Storage in the SCP role
    assert unpack(work, got) == onnx
    out = work / "fetch"
    res = run([*MODELNODE, "fetch", uid, "--to", f"{setup.orthanc.aet}@127.0.0.1:{setup.orthanc.port}", "--get",
               "-o", str(out)], cwd=work)
    assert "1 completed" in res.stdout
    (fetched,) = out.iterdir()
    assert transfer_syntax(fetched) == EXPLICIT_LE
    assert unpack(work, fetched) == onnx


@pytest.mark.timeout(90)
def test_model_sent_in_implicit_vr_comes_back_verifiable(setup: Setup) -> None:
    work = setup.work / "implicit"
    work.mkdir()
    path, onnx, uid = pack(work, "1.0.1", seed=12)
    # -xi: propose Implicit VR Little Endian only; Orthanc stores the model in Implicit VR.
    run(["storescu", "-xi", "-aec", setup.orthanc.aet, "127.0.0.1", str(setup.orthanc.port), str(path)])
    (iid,) = [i for i in setup.orthanc.instances()
              if setup.orthanc.rest(f"/instances/{i}/simplified-tags")["SOPInstanceUID"] == uid]
    assert setup.orthanc.rest(f"/instances/{iid}/metadata?expand")["TransferSyntax"] == IMPLICIT_LE

    # movescu's receiver accepts Implicit VR too: the model comes back as Orthanc stored it.
    moved = movescu(setup, uid, work / "move")
    assert transfer_syntax(moved) == IMPLICIT_LE
    assert unpack(work, moved) == onnx
    # modelnode asks for Raw Data in Explicit VR only: Orthanc converts, and cannot know our
    # private VRs, so the payload and the card arrive as UN.
    out = work / "fetch"
    run([*MODELNODE, "fetch", uid, "--to", f"{setup.orthanc.aet}@127.0.0.1:{setup.orthanc.port}", "--get",
         "-o", str(out)], cwd=work)
    (fetched,) = out.iterdir()
    assert transfer_syntax(fetched) == EXPLICIT_LE
    assert PAYLOAD_AS_UN in fetched.read_bytes()
    assert unpack(work, fetched) == onnx

    # The node takes it back as it is (UN and all) and registers it.
    with node_process(work / "node", storage={"fsync": False}) as node:
        res = node.cli("store", str(fetched), "--to", f"{node.ae_title}@127.0.0.1:{node.port}")
        assert res.returncode == 0, res.stdout + res.stderr
        res = node.cli("find", "--to", f"{node.ae_title}@127.0.0.1:{node.port}", "--level", "SERIES", "--json",
                       "-k", "SeriesDescription=pacs-round-trip*", "-k", "AcquisitionContextSequence")
        assert res.returncode == 0, res.stderr
        assert "pacs-round-trip 1.0.1" in res.stdout and "39607008" in res.stdout
        out = work / "from-node"
        res = node.cli("fetch", uid, "--to", f"{node.ae_title}@127.0.0.1:{node.port}", "--get", "-o", str(out))
        assert res.returncode == 0, res.stderr
        (back,) = out.iterdir()
        assert transfer_syntax(back) == EXPLICIT_LE
        assert unpack(work, back) == onnx
