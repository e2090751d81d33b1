"""The node and a real PACS (Orthanc) on loopback: queries and moves in both directions.

* Orthanc queries the node (its REST API drives a C-FIND: /modalities/{node}/query).
* The node moves to Orthanc: Orthanc's /queries/{id}/retrieve (a C-MOVE to the node with
  Orthanc as destination), and dcmtk's movescu asking the node to move to Orthanc.
* Orthanc moves to the node: ``modelnode fetch --move-to`` asks Orthanc for a C-MOVE whose
  destination is the node, and Orthanc's /modalities/{node}/store sends by C-STORE.

Files keep their transfer syntax each way, compressed pixel data byte for byte (nothing is
transcoded). Orthanc itself re-encodes what it receives over DIMSE (DCMTK writes sequences with
explicit lengths and recomputes group lengths), so against Orthanc the test compares content,
not the byte encoding; test_query_retrieve checks byte-exact round trips against dcmtk.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

import pydicom
import pytest
from cards import segmentation_card_dict
from node_proc import NodeProcess, node_process
from onnx_factory import segmentation_model
from peers import Orthanc, free_port, orthanc, require, run
from pydicom.data import get_testdata_file
from pynetdicom.dsutils import split_dataset

# Files without group-length elements: Orthanc (DCMTK) recomputes those when it receives over DIMSE,
# so a file carrying a stale one (pydicom-data's 693_*.dcm) cannot come back byte-exact from it.
FILES = ["CT_small.dcm", "MR2_J2KR.dcm", "SC_rgb_rle.dcm", "emri_small_jpeg_ls_lossless.dcm"]


def body(path: Path) -> tuple[str, bytes]:
    """(transfer syntax, dataset bytes after the File Meta) of a Part-10 file."""
    meta, offset = split_dataset(path)
    return str(meta.TransferSyntaxUID), path.read_bytes()[offset:]


def same_instance(data: bytes, original: Path) -> None:
    """Same transfer syntax, same pixel data bytes, same elements.

    What DCMTK (inside Orthanc) rewrites is left out: group lengths, Data Set Trailing Padding
    (MR_small.dcm has one), and Pixel Data's VR, compared by value only (it writes encapsulated
    pixel data as OB where emri_small_jpeg_ls_lossless.dcm says OW).
    """
    got = pydicom.dcmread(BytesIO(data))
    want = pydicom.dcmread(original)
    assert got.file_meta.TransferSyntaxUID == want.file_meta.TransferSyntaxUID, original.name
    assert got.PixelData == want.PixelData, original.name
    for ds in (got, want):
        for tag in [t for t in ds.keys() if t.element == 0 or t in (0x7FE00010, 0xFFFCFFFC)]:
            del ds[tag]
    assert got == want, original.name


@dataclass
class Pair:
    node: NodeProcess
    orthanc: Orthanc
    work: Path

    @property
    def to_node(self) -> str:
        return f"{self.node.ae_title}@127.0.0.1:{self.node.port}"

    @property
    def to_orthanc(self) -> str:
        return f"{self.orthanc.aet}@127.0.0.1:{self.orthanc.port}"

    def post(self, path: str, body: object) -> object:
        return self.orthanc.rest(path, "POST", json.dumps(body).encode())

    def clear_orthanc(self) -> None:
        for iid in self.orthanc.instances():
            self.orthanc.rest(f"/instances/{iid}", "DELETE")

    def orthanc_files(self) -> dict[str, bytes]:
        """SOP Instance UID -> the file Orthanc stored."""
        out = {}
        for iid in self.orthanc.instances():
            tags = self.orthanc.rest(f"/instances/{iid}/simplified-tags")
            out[tags["SOPInstanceUID"]] = self.orthanc.file_of(iid)
        return out


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> Iterator[Pair]:
    for tool in ("movescu", "storescu"):
        require(tool)
    work = tmp_path_factory.mktemp("orthanc-node")
    node_port = free_port()
    modalities = {"modelnode": ("MODELNODE", "127.0.0.1", node_port)}
    with orthanc(work / "orthanc", modalities=modalities) as o:
        peers = [{"ae_title": o.aet, "host": "127.0.0.1", "port": o.port}]
        with node_process(work / "node", port=node_port, peers=peers, storage={"fsync": False}) as node:
            yield Pair(node, o, work)


def _store_in_node(pair: Pair, paths: list[Path]) -> None:
    res = pair.node.cli("store", *map(str, paths), "--to", pair.to_node)
    assert res.returncode == 0, res.stdout + res.stderr


def _model_file(work: Path) -> tuple[Path, bytes, str]:
    from iods import model_object
    from iods.card import parse_card

    onnx = segmentation_model(seed=7)
    card = parse_card(segmentation_card_dict(name="orthanc-node-seg", version="2.0.0"))
    path = work / "model.dcm"
    ds = model_object.encode(onnx, card)
    model_object.write(ds, path)
    return path, onnx, str(ds.SOPInstanceUID)


@pytest.mark.timeout(90)
def test_orthanc_queries_the_node_and_retrieves_from_it(pair: Pair) -> None:
    from iods import model_object

    model_path, onnx, model_uid = _model_file(pair.work)
    originals = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID): Path(p)
                 for p in map(get_testdata_file, FILES)}
    _store_in_node(pair, [*originals.values(), model_path])
    pair.clear_orthanc()

    # A SERIES-level model look-up from Orthanc, as a workstation would do it.
    q = pair.post("/modalities/modelnode/query", {"Level": "Series", "Query": {
        "Modality": "CT", "BodyPartExamined": "CHEST", "SeriesDescription": "orthanc-node*"}})
    answers = pair.orthanc.rest(f"/queries/{q['ID']}/answers?expand&simplify")
    assert [a["SeriesDescription"] for a in answers] == ["orthanc-node-seg 2.0.0"]
    assert answers[0]["BodyPartExamined"] == "CHEST"

    # STUDY level, every study: Orthanc's own keys (ModalitiesInStudy, counts) are answered.
    q = pair.post("/modalities/modelnode/query", {"Level": "Study", "Query": {
        "StudyInstanceUID": "", "ModalitiesInStudy": "", "NumberOfStudyRelatedInstances": ""}})
    answers = pair.orthanc.rest(f"/queries/{q['ID']}/answers?expand&simplify")
    studies = {str(pydicom.dcmread(p, stop_before_pixels=True).StudyInstanceUID) for p in originals.values()}
    assert studies <= {a["StudyInstanceUID"] for a in answers}
    assert all(a["ModalitiesInStudy"] and int(a["NumberOfStudyRelatedInstances"]) >= 1 for a in answers)

    # Orthanc retrieves every study it found: C-MOVE to the node, destination Orthanc.
    res = pair.post(f"/queries/{q['ID']}/retrieve", {"TargetAet": pair.orthanc.aet, "Synchronous": True})
    assert res["RemoteAet"] == pair.node.ae_title
    got = pair.orthanc_files()
    assert set(originals) | {model_uid} <= set(got)
    for uid, path in originals.items():
        same_instance(got[uid], path)
    back = pair.work / "from-orthanc.dcm"
    back.write_bytes(got[model_uid])
    assert body(back)[0] == "1.2.840.10008.1.2.1"  # the model went out in Explicit VR Little Endian
    model_object.unpack_file(back, pair.work / "back.onnx")
    assert (pair.work / "back.onnx").read_bytes() == onnx
    assert "C-MOVE from" in pair.node.log() and "to ORTHANC" in pair.node.log()


@pytest.mark.timeout(60)
def test_movescu_moves_from_the_node_to_orthanc(pair: Pair) -> None:
    path = Path(get_testdata_file("JPGLosslessP14SV1_1s_1f_8b.dcm"))
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    _store_in_node(pair, [path])
    pair.clear_orthanc()
    res = run(["movescu", "-v", "-S", "-aec", pair.node.ae_title, "-aem", pair.orthanc.aet, "127.0.0.1",
               str(pair.node.port), "-k", "QueryRetrieveLevel=SERIES", "-k", f"StudyInstanceUID={ds.StudyInstanceUID}",
               "-k", f"SeriesInstanceUID={ds.SeriesInstanceUID}"])
    assert "Received Final Move Response (Success)" in res.stderr
    got = pair.orthanc_files()
    same_instance(got[str(ds.SOPInstanceUID)], path)


@pytest.mark.timeout(90)
def test_orthanc_moves_to_the_node(pair: Pair, tmp_path: Path) -> None:
    # Not RLE: Orthanc 1.10 proposes only uncompressed syntaxes for it and cannot transcode RLE itself.
    names = ["MR_small.dcm", "US1_J2KR.dcm", "SC_rgb_jpeg_dcmtk.dcm"]
    paths = [Path(get_testdata_file(n)) for n in names]
    pair.clear_orthanc()
    for p in paths:
        pair.orthanc.rest("/instances", "POST", p.read_bytes())
    uids = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID): p for p in paths}

    # The node's own SCU asks Orthanc for a C-MOVE to the node, by study UID (level found by asking).
    mr = pydicom.dcmread(paths[0], stop_before_pixels=True)
    res = pair.node.cli("fetch", str(mr.StudyInstanceUID), "--to", pair.to_orthanc, "--move-to", pair.node.ae_title)
    assert res.returncode == 0 and "1 completed" in res.stdout, res.stdout + res.stderr
    # Orthanc's REST API: C-STORE the other two to the node.
    others = [iid for iid in pair.orthanc.instances()
              if pair.orthanc.rest(f"/instances/{iid}/simplified-tags")["SOPInstanceUID"] != str(mr.SOPInstanceUID)]
    job = pair.post("/modalities/modelnode/store", {"Resources": others, "Synchronous": True})
    assert job["FailedInstancesCount"] == 0 and job["InstancesCount"] == 2

    # All three are now in the node, as Orthanc sent them: fetch them back by C-GET.
    out = tmp_path / "back"
    for uid in uids:
        res = pair.node.cli("fetch", uid, "--to", pair.to_node, "--get", "-o", str(out))
        assert res.returncode == 0, res.stderr
    for uid, path in uids.items():
        same_instance((out / f"{uid}.dcm").read_bytes(), path)
