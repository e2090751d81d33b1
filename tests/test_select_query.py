""""Which model fits this study?" with nothing but dcmtk's findscu, on the node's selection AE."""

from __future__ import annotations

import copy

import pydicom
import pytest
from cards import segmentation_card_dict
from node_proc import node_process
from onnx_factory import segmentation_model
from peers import require, run

from iods import model_object
from iods.card import parse_card

pytestmark = pytest.mark.peers


def _model(tmp_path, name, modality, body_part, anatomy):
    data = copy.deepcopy(segmentation_card_dict(name=name))
    data["target"] = {"modalities": [modality], "body_parts": [body_part],
                      "anatomy": [{"value": anatomy[0], "meaning": anatomy[1]}], "findings": []}
    path = tmp_path / f"{name}.dcm"
    model_object.write(model_object.encode(segmentation_model(), parse_card(data)), path)
    return path


def _find(node, out, *keys):
    require("findscu")
    out.mkdir()
    args = ["findscu", "-S", "-aec", "MODELNODE_SELECT", "-X", "-od", str(out), "127.0.0.1", str(node.port)]
    for k in keys:
        args += ["-k", k]
    res = run(args, check=False)
    assert res.returncode == 0, res.stderr
    return [pydicom.dcmread(p) for p in sorted(out.glob("rsp*.dcm"))]


@pytest.mark.timeout(120)
def test_findscu_selection_query_answers_best_first(tmp_path):
    with node_process(tmp_path / "node") as node:
        for args in (("ct-lung", "CT", "CHEST", ("39607008", "Lung")),
                     ("ct-cap", "CT", "CHESTABDPELVIS", ("416775004", "Chest, abdomen and pelvis")),
                     ("ct-liver", "CT", "ABDOMEN", ("10200004", "Liver")),
                     ("mr-knee", "MR", "KNEE", ("72696002", "Knee"))):
            res = node.cli("models", "add", str(_model(tmp_path, *args)))
            assert res.returncode == 0, res.stderr

        # A German chest CT described only by its headers: lung model first, CAP second, others absent.
        rsp = _find(node, tmp_path / "q1", "QueryRetrieveLevel=SERIES", "Modality=CT",
                    "StudyDescription=CT Thorax nativ", "BodyPartExamined=", "SeriesInstanceUID",
                    "SeriesDescription", "SeriesNumber", "ImageComments")
        assert [r.SeriesDescription for r in rsp] == ["ct-lung 1.0.0", "ct-cap 1.0.0"]
        assert [int(r.SeriesNumber) for r in rsp] == [1, 2]
        assert "anatomy" in rsp[0].ImageComments
        # The answer names a model series a workstation can C-MOVE/C-GET straight away.
        app = node.open_app()
        try:
            lung = [m for m in app.registry.list() if m.name == "ct-lung"][0]
            assert rsp[0].SeriesInstanceUID == lung.series_uid
        finally:
            app.close()

        # Nothing fits an MR of the chest: no answers, success.
        assert _find(node, tmp_path / "q2", "QueryRetrieveLevel=SERIES", "Modality=MR", "BodyPartExamined=CHEST",
                     "SeriesDescription") == []

        # A study stored on the node, named by its StudyInstanceUID: its own headers decide.
        study = tmp_path / "study"
        study.mkdir()
        for i in range(3):
            ds = pydicom.dcmread(pydicom.data.get_testdata_file("CT_small.dcm"))
            ds.SOPInstanceUID = f"{ds.SOPInstanceUID}.{i}"
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            ds.InstanceNumber = i + 1
            ds.BodyPartExamined = "ABDOMEN"
            ds.save_as(study / f"{i}.dcm")
        run(["storescu", "-aec", node.ae_title, "127.0.0.1", str(node.port), *map(str, sorted(study.iterdir()))])
        study_uid = pydicom.dcmread(study / "0.dcm").StudyInstanceUID
        rsp = _find(node, tmp_path / "q3", "QueryRetrieveLevel=SERIES", f"StudyInstanceUID={study_uid}",
                    "SeriesDescription", "SeriesNumber")
        assert [r.SeriesDescription for r in rsp][0] == "ct-liver 1.0.0"
        assert "selection C-FIND" in node.log()

        # A non-SERIES selection query is refused with a reason.
        res = run(["findscu", "-v", "-S", "-aec", "MODELNODE_SELECT", "127.0.0.1", str(node.port),
                   "-k", "QueryRetrieveLevel=STUDY"], check=False)
        assert "DataSetDoesNotMatchSOPClass" in res.stderr  # dcmtk's name for 0xA900
