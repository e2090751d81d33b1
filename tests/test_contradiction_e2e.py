"""Issue 20 end to end: dcmtk storescu -> modelnode (a real process) -> Orthanc.

Registered: the reference models and two site models that target one region each (a chest CR
segmenter, a knee CR classifier). Sent: RG1 (a chest CR) labelled KNEE, RG3 (a distal tibia CR)
labelled CHEST, and both with their own or blank headers. The relabelled series must end held,
with both readings named, audited, exported nowhere and visible in ``jobs list``, ``jobs
show``, ``status`` and the selection C-FIND; the others run a model of their region. A person's
decision (``jobs retry --trust image``) then runs the chest series on its image's reading.
"""

from __future__ import annotations

import json
from pathlib import Path

import pydicom
import pytest
from node_proc import node_process
from peers import orthanc, require, run
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid
from region_models import CHEST_MODEL, KNEE_MODEL, write_region_models

pytestmark = [pytest.mark.peers, pytest.mark.slow]

ROOT = Path(__file__).resolve().parent.parent
REFERENCE = [ROOT / "models" / "reference" / "bodypart_cnn.dcm", ROOT / "models" / "reference" / "lung_unet.dcm"]
BODYPART = "modelnode-bodypart-cnn"


def _copy(name: str, out: Path, body_part: str | None) -> tuple[Path, str]:
    """RG1/RG3 as a series of its own: BodyPartExamined ``body_part``; "" blanks every descriptor."""
    ds = pydicom.dcmread(get_testdata_file(f"{name}_UNCR.dcm"))
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = generate_uid(), generate_uid(), generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    if body_part == "":
        for keyword in ("BodyPartExamined", "StudyDescription", "SeriesDescription", "ProtocolName"):
            if keyword in ds:
                del ds[keyword]
    elif body_part is not None:
        ds.BodyPartExamined = body_part
    out.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(out, enforce_file_format=True)
    return out, str(ds.SeriesInstanceUID)


def _jobs(node) -> dict[str, dict]:
    res = node.cli("jobs", "list", "--json")
    assert res.returncode == 0, res.stderr
    return {j["group_key"]: j for j in json.loads(res.stdout)}


def _wait(predicate, what: str, node, timeout: float = 150):
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}\n{node.log()[-6000:]}")


def _orthanc_series_of_results(pacs) -> list[str]:
    """The source series each result in Orthanc refers to (its SR or SEG's referenced series)."""
    out = []
    for oid in pacs.instances():
        ds = pydicom.dcmread(__import__("io").BytesIO(pacs.file_of(oid)))
        for ref in ds.get("ReferencedSeriesSequence", []) or []:
            out.append(str(ref.SeriesInstanceUID))
        for ev in ds.get("CurrentRequestedProcedureEvidenceSequence", []) or []:
            out += [str(s.SeriesInstanceUID) for s in ev.ReferencedSeriesSequence]
    return out


@pytest.mark.timeout(420)
def test_relabelled_radiographs_are_held_and_the_others_run(tmp_path):
    require("storescu")
    series = {
        "rg1_knee": _copy("RG1", tmp_path / "in" / "rg1_knee.dcm", "KNEE"),
        "rg3_chest": _copy("RG3", tmp_path / "in" / "rg3_chest.dcm", "CHEST"),
        "rg1_own": _copy("RG1", tmp_path / "in" / "rg1_own.dcm", None),
        "rg3_own": _copy("RG3", tmp_path / "in" / "rg3_own.dcm", None),
        "rg1_blank": _copy("RG1", tmp_path / "in" / "rg1_blank.dcm", ""),
        "rg3_blank": _copy("RG3", tmp_path / "in" / "rg3_blank.dcm", ""),
    }
    uid = {k: v[1] for k, v in series.items()}
    with orthanc(tmp_path / "orthanc") as pacs:
        peers = [{"ae_title": pacs.aet, "host": "127.0.0.1", "port": pacs.port}]
        extra = {"pipeline": {"quiet_seconds": 1.0, "poll_seconds": 0.1},
                 "export": {"routes": [{"destinations": [pacs.aet]}], "poll_seconds": 0.1},
                 "inference": {"intra_op_threads": 2}}
        with node_process(tmp_path / "node", peers=peers, extra=extra) as node:
            for path in [*REFERENCE, *write_region_models(tmp_path / "site")]:
                res = node.cli("models", "add", str(path))
                assert res.returncode == 0, res.stderr
            run(["storescu", "-aec", node.ae_title, "127.0.0.1", str(node.port),
                 *(str(p) for p, _ in series.values())], timeout=120)
            final = ("held", "exported", "done", "failed")
            jobs = _wait(lambda: (j := _jobs(node)) and len(j) == 6 and all(x["state"] in final for x in j.values())
                         and sum(x["state"] == "exported" for x in j.values()) == 4 and j, "six finished jobs", node)

            # The relabelled series: held, both readings named, nothing run, nothing exported.
            for key, claimed, seen in (("rg1_knee", "Knee", "Chest"), ("rg3_chest", "Chest", "Extremity")):
                job = jobs[uid[key]]
                assert (job["state"], job["outcome"]) == ("held", "contradiction"), job
                assert job["results"] == [] and job["model_name"] == ""
                assert json.loads(node.cli("jobs", "show", str(job["id"]), "--json").stdout)["exports"] == []
                assert f"the header says {claimed}" in job["error"] and f"{seen} p=" in job["error"]
                [sel] = job["selection"]
                assert sel["held"] and sel["facts"]["contradiction"]["header_probability"] < 0.15
                shown = node.cli("jobs", "show", str(job["id"]))
                assert "CONTRADICTION (hold: held)" in shown.stdout and f"the header says {claimed}" in shown.stdout
                assert f"jobs retry {job['id']}" in shown.stdout
            # The others: a model of their own region, exported.
            for key, right, wrong in (("rg1_own", CHEST_MODEL, KNEE_MODEL), ("rg1_blank", CHEST_MODEL, KNEE_MODEL),
                                      ("rg3_own", KNEE_MODEL, CHEST_MODEL), ("rg3_blank", KNEE_MODEL, CHEST_MODEL)):
                job = jobs[uid[key]]
                assert job["state"] == "exported" and job["model_name"] in (right, BODYPART), (key, job)
                [sel] = job["selection"]
                assert "contradiction" not in sel["facts"]
                assert right in [c["name"] for c in sel["ranked"]] and wrong not in [c["name"] for c in sel["ranked"]]
            results_for = _orthanc_series_of_results(pacs)
            assert not {uid["rg1_knee"], uid["rg3_chest"]} & set(results_for)
            assert {uid[k] for k in ("rg1_own", "rg3_own", "rg1_blank", "rg3_blank")} <= set(results_for)

            # Audited and counted.
            audit = [json.loads(line) for line in (node.data_dir / "audit.jsonl").read_text().splitlines()]
            events = {a["series_uid"]: a for a in audit if a["event"] == "selection-contradiction"}
            assert set(events) == {uid["rg1_knee"], uid["rg3_chest"]}
            assert events[uid["rg1_knee"]]["header_region"] == "Knee" and events[uid["rg1_knee"]]["image_region"] == "Chest"
            assert all(e["outcome"] == "held" and e["policy"] == "hold" for e in events.values())
            held = [a for a in audit if a["event"] == "selection" and a["outcome"] == "held"]
            assert {a["series_uid"] for a in held} == set(events)

            # Visible in jobs list and status.
            listed = node.cli("jobs", "list", "--state", "held")
            assert listed.stdout.count("held") >= 2 and "contradiction" in listed.stdout
            status = json.loads(node.cli("status", "--json").stdout)
            assert status["jobs"]["held"] == 2
            assert {h["job"] for h in status["held_for_review"]} == {jobs[uid["rg1_knee"]]["id"], jobs[uid["rg3_chest"]]["id"]}

            # The selection C-FIND on the held series says so.
            require("findscu")
            out = tmp_path / "find"
            out.mkdir()
            run(["findscu", "-S", "-aec", "MODELNODE_SELECT", "-X", "-od", str(out), "127.0.0.1", str(node.port),
                 "-k", "QueryRetrieveLevel=SERIES", "-k", f"SeriesInstanceUID={uid['rg1_knee']}",
                 "-k", "SeriesDescription", "-k", "ImageComments"])
            answers = [pydicom.dcmread(p) for p in sorted(out.glob("rsp*.dcm"))]
            assert answers and all("CONTRADICTION" in str(a.ImageComments) and "HELD for review" in str(a.ImageComments)
                                   and "the header says Knee" in str(a.ImageComments) for a in answers)

            # A person reviewed the chest labelled KNEE: trust the image. It runs, on the chest.
            job_id = jobs[uid["rg1_knee"]]["id"]
            res = node.cli("jobs", "retry", str(job_id), "--trust", "image")
            assert res.returncode == 0 and "trusting the image" in res.stdout, res.stderr
            again = _wait(lambda: (j := _jobs(node)[uid["rg1_knee"]])["state"] == "exported" and j,
                          "the reviewed job to be exported", node)
            assert again["model_name"] in (CHEST_MODEL, BODYPART)
            assert again["selection"][0]["contradiction_action"] == "trusted image (decided by a person)"
            assert uid["rg1_knee"] in _orthanc_series_of_results(pacs)


@pytest.mark.timeout(300)
def test_mark_policy_per_called_ae_exports_results_marked_unverified(tmp_path):
    """``on_contradiction_by_called_ae = {AI_MARK = "mark"}``: studies sent to AI_MARK run on the
    header's reading, and the SEG or SR says UNVERIFIED where a radiologist reads it."""
    require("storescu")
    knee_label, knee_uid = _copy("RG1", tmp_path / "in" / "rg1_knee.dcm", "KNEE")
    chest_label, chest_uid = _copy("RG3", tmp_path / "in" / "rg3_chest.dcm", "CHEST")
    with orthanc(tmp_path / "orthanc") as pacs:
        peers = [{"ae_title": pacs.aet, "host": "127.0.0.1", "port": pacs.port}]
        extra = {"pipeline": {"quiet_seconds": 1.0, "poll_seconds": 0.1},
                 "export": {"routes": [{"destinations": [pacs.aet]}], "poll_seconds": 0.1},
                 "inference": {"intra_op_threads": 2},
                 # The reference classifier still reads the images; only the site models run here.
                 "selection": {"on_contradiction_by_called_ae": {"AI_MARK": "mark"},
                               "rules": [{"action": "exclude", "called_ae": "AI_MARK", "models": [BODYPART]}]}}
        with node_process(tmp_path / "node", peers=peers, extra=extra) as node:
            for path in [*REFERENCE, *write_region_models(tmp_path / "site")]:
                assert node.cli("models", "add", str(path)).returncode == 0
            run(["storescu", "-aec", "AI_MARK", "127.0.0.1", str(node.port), str(knee_label), str(chest_label)],
                timeout=120)
            jobs = _wait(lambda: (j := _jobs(node)) and len(j) == 2 and all(x["state"] == "exported" for x in j.values())
                         and j, "two exported jobs", node)
            assert jobs[knee_uid]["model_name"] == KNEE_MODEL and jobs[chest_uid]["model_name"] == CHEST_MODEL
            for job in jobs.values():
                assert job["selection"][0]["contradiction_action"] == "marked"
            results = {}
            for oid in pacs.instances():
                ds = pydicom.dcmread(__import__("io").BytesIO(pacs.file_of(oid)))
                results[str(ds.Modality)] = ds
            assert set(results) == {"SEG", "SR"}
            seg, sr = results["SEG"], results["SR"]
            assert seg.SeriesDescription.startswith("UNVERIFIED") and sr.SeriesDescription.startswith("UNVERIFIED")
            assert seg.ContentDescription.startswith("UNVERIFIED")
            comments = [i.TextValue for i in sr.ContentSequence if i.ValueType == "TEXT"]
            assert any("the header says Knee" in c and "Chest p=" in c for c in comments), comments
            audit = [json.loads(line) for line in (node.data_dir / "audit.jsonl").read_text().splitlines()]
            marked = [a for a in audit if a["event"] == "selection-contradiction"]
            assert {(a["series_uid"], a["outcome"], a["policy"]) for a in marked} == {
                (knee_uid, "marked", "mark"), (chest_uid, "marked", "mark")}
