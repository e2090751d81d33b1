"""Image against header (issue 20): the two real radiographs of pydicom-data, relabelled.

RG1 is a chest CR, RG3 a distal tibia CR; the reference body-part classifier was never fitted to
either. With a chest-only and a knee-only site model registered beside the reference models, a
wrong header must not make a region-specific model run: the series is held (or handled as the
site's policy says) with both readings and their figures in the explanation.
"""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file
from region_models import CHEST_MODEL, KNEE_MODEL, write_region_models

from iods import model_object
from iods.anatomy import AnatomyMatch, AnatomyNormaliser, default_normaliser
from iods.results import build_classification_sr, mark_unverified
from models.image_check import as_anatomy, image_readings
from models.runtime import SessionCache
from node.config import SelectionSection
from node.pipeline.selection import ImageReading, SeriesFacts, find_contradiction, select

ROOT = Path(__file__).resolve().parent.parent
REFERENCE = [ROOT / "models" / "reference" / "bodypart_cnn.dcm", ROOT / "models" / "reference" / "lung_unet.dcm"]
BLANK = ("BodyPartExamined", "StudyDescription", "SeriesDescription", "ProtocolName")


@pytest.fixture(scope="module")
def library(tmp_path_factory):
    paths = [*REFERENCE, *write_region_models(tmp_path_factory.mktemp("site"))]
    models, payloads = [], {}
    for p in paths:
        payload, card = model_object.decode(model_object.read_file(p))
        models.append((card.identity.uid, card))
        payloads[card.identity.uid] = payload
    cache = SessionCache()
    return models, (lambda uid: cache.get(uid, payloads[uid]))


def radiograph(name: str, body_part: str | None) -> pydicom.Dataset:
    """RG1/RG3 with BodyPartExamined set to ``body_part``, or every descriptor blanked ("")."""
    ds = pydicom.dcmread(get_testdata_file(f"{name}_UNCR.dcm"))
    if body_part == "":
        for keyword in BLANK:
            if keyword in ds:
                del ds[keyword]
    elif body_part is not None:
        ds.BodyPartExamined = body_part
    return ds


def selection_for(ds, library, policy="hold", called_ae="", decided=""):
    models, load = library
    norm = AnatomyNormaliser()
    settings = SelectionSection(on_contradiction=policy)
    readings = image_readings([ds], models, load, norm)
    facts = SeriesFacts.from_datasets([ds], normaliser=norm, called_ae=called_ae, image_anatomy=as_anatomy(readings),
                                      image_readings=readings, settings=settings)
    if decided:
        from dataclasses import replace

        facts = replace(facts, decided=decided)
    return select(facts, models, settings, normaliser=norm)


@pytest.mark.timeout(120)
@pytest.mark.parametrize(("name", "label", "claimed", "seen"), [("RG1", "KNEE", "Knee", "Chest"),
                                                                 ("RG3", "CHEST", "Chest", "Extremity")])
def test_wrong_header_is_held_with_both_readings(library, name, label, claimed, seen):
    sel = selection_for(radiograph(name, label), library)
    c = sel.facts.contradiction
    assert c is not None and sel.held and sel.best is None and not sel.suitable
    assert (c.header_region, c.image_region) == (claimed, seen)
    assert c.header_probability < 0.15 <= 0.5 <= c.image_probability
    text = sel.explain()
    assert "CONTRADICTION" in text and f"the header says {claimed}" in text and f"{seen} p=" in text
    assert f"p={c.header_probability:.2f}" in text and "held" in text
    d = sel.to_dict()
    assert d["held"] and d["facts"]["contradiction"]["text"] == c.describe() and not d["suitable"]


@pytest.mark.timeout(120)
@pytest.mark.parametrize(("name", "label", "right", "wrong"), [
    ("RG1", None, CHEST_MODEL, KNEE_MODEL), ("RG1", "", CHEST_MODEL, KNEE_MODEL), ("RG1", "CHEST", CHEST_MODEL, KNEE_MODEL),
    ("RG3", None, KNEE_MODEL, CHEST_MODEL), ("RG3", "", KNEE_MODEL, CHEST_MODEL), ("RG3", "KNEE", KNEE_MODEL, CHEST_MODEL),
])
def test_right_or_blank_header_runs_a_model_of_the_right_region(library, name, label, right, wrong):
    sel = selection_for(radiograph(name, label), library)
    assert sel.facts.contradiction is None and not sel.held and sel.best is not None
    ranked = [c.name for c in sel.ranked]
    assert right in ranked and wrong not in ranked
    assert sel.best.name in (right, "modelnode-bodypart-cnn")  # the reference classifier targets every region


@pytest.mark.timeout(120)
def test_policies_image_header_mark_and_a_persons_decision(library):
    knee_labelled_chest = radiograph("RG1", "KNEE")
    image = selection_for(knee_labelled_chest, library, policy="image")
    assert image.contradiction_action == "trusted image" and not image.held
    assert CHEST_MODEL in [c.name for c in image.ranked] and KNEE_MODEL not in [c.name for c in image.ranked]
    header = selection_for(knee_labelled_chest, library, policy="header")
    assert header.contradiction_action == "trusted header"
    assert KNEE_MODEL in [c.name for c in header.ranked] and not header.unverified
    mark = selection_for(knee_labelled_chest, library, policy="mark")
    assert mark.contradiction_action == "marked" and mark.best is not None
    assert mark.unverified.startswith("UNVERIFIED") and "Knee" in mark.unverified and "Chest" in mark.unverified
    # Per called AE: the site holds, AI_TRUST_IMAGE trusts the image.
    models, load = library
    norm = AnatomyNormaliser()
    settings = SelectionSection(on_contradiction_by_called_ae={"AI_TRUST_IMAGE": "image"})
    readings = image_readings([knee_labelled_chest], models, load, norm)
    for ae, action in (("AI_TRUST_IMAGE", "trusted image"), ("OTHER", "held")):
        facts = SeriesFacts.from_datasets([knee_labelled_chest], normaliser=norm, called_ae=ae, image_readings=readings,
                                          image_anatomy=as_anatomy(readings), settings=settings)
        assert select(facts, models, settings, normaliser=norm).contradiction_action == action
    # A person decided (modelnode jobs retry --model / --trust): nothing is held or marked.
    decided = selection_for(knee_labelled_chest, library, decided="model")
    assert decided.contradiction_action == "decided by a person" and decided.best is not None
    trusted = selection_for(knee_labelled_chest, library, decided="image")
    assert trusted.contradiction_action.startswith("trusted image") and KNEE_MODEL not in [c.name for c in trusted.ranked]


def _reading(**probs: float) -> ImageReading:
    norm = default_normaliser()
    codes = {"head": "69536005", "chest": "816094009", "abdomen": "818981001", "pelvis": "816092008",
             "limb": "66019005"}
    return ImageReading("cls", tuple((k, norm.region(codes[k]), p) for k, p in probs.items()))


def _header(term: str, confidence: float = 0.9) -> list[AnatomyMatch]:
    return [AnatomyMatch(default_normaliser().region(term), confidence, "BodyPartExamined", term)]


@pytest.mark.timeout(30)
def test_find_contradiction_thresholds_and_containment():
    hesitant = _reading(head=0.05, chest=0.1, abdomen=0.2, pelvis=0.3, limb=0.35)
    sure = _reading(head=0.01, chest=0.9, abdomen=0.03, pelvis=0.03, limb=0.03)
    kw = {"below": 0.15, "other": 0.5}
    assert find_contradiction(_header("KNEE"), [sure], **kw) is not None  # knee is read as "limb": 0.03
    assert find_contradiction(_header("KNEE"), [hesitant], **kw) is None  # no other region is likely
    assert find_contradiction(_header("LUNG"), [sure], **kw) is None  # lung lies inside chest: agrees
    assert find_contradiction(_header("CSPINE"), [sure], **kw) is None  # no class for the spine: cannot tell
    assert find_contradiction([], [sure], **kw) is None  # nothing claimed
    assert find_contradiction(_header("KNEE"), [], **kw) is None  # no classifier
    assert find_contradiction(_header("KNEE"), [sure], below=0.01, other=0.5) is None


@pytest.mark.timeout(120)
def test_marked_sr_says_unverified_where_the_radiologist_reads(library, tmp_path):
    import highdicom as hd
    import numpy as np

    models, _ = library
    card = next(c for _, c in models if c.identity.name == "modelnode-bodypart-cnn")
    ds = radiograph("RG1", None)
    sr = build_classification_sr([ds], np.array([0.01, 0.6, 0.01, 0.33, 0.05]), card, card.identity.uid)
    mark_unverified(sr, "UNVERIFIED: image and header disagree: the header says Knee ...")
    assert sr.SeriesDescription.startswith("UNVERIFIED ")
    items = [i for i in sr.ContentSequence if i.ValueType == "TEXT"]
    assert items and items[-1].TextValue.startswith("UNVERIFIED") and items[-1].ConceptNameCodeSequence[0].CodeValue == "121106"
    path = tmp_path / "sr.dcm"
    sr.save_as(path, enforce_file_format=True)
    again = hd.sr.srread(path)
    assert again.SeriesDescription.startswith("UNVERIFIED")
    import shutil
    import subprocess

    if shutil.which("dciodvfy"):
        res = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
        assert [ln for ln in (res.stdout + res.stderr).splitlines() if "Error" in ln] == []


@pytest.mark.timeout(30)
def test_temperature_scaling_functions():
    import numpy as np

    from models.training.calibrate import ece, fit_temperature, hold_rates, nll, temper

    rng = np.random.default_rng(0)
    logits = rng.normal(0, 1.5, (2000, 5))
    true = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    labels = np.array([rng.choice(5, p=row) for row in true])  # calibrated at T = 1 by construction
    sharp = np.exp(3 * logits) / np.exp(3 * logits).sum(1, keepdims=True)  # overconfident by 3x
    t = fit_temperature(sharp, labels)
    assert 2.4 < t < 3.6
    assert nll(temper(sharp, t), labels) < nll(sharp, labels) and ece(temper(sharp, t), labels) < ece(sharp, labels)
    assert np.allclose(temper(sharp, 1.0), sharp, atol=1e-6)
    assert hold_rates(np.eye(5)[labels] * 0.9 + 0.02, labels) == {"right_label_held": 0.0, "wrong_label_caught": 1.0,
                                                                   "below": 0.15, "other": 0.5}


@pytest.mark.timeout(30)
def test_held_job_and_a_persons_decision_in_the_queue(app):
    from node.pipeline import jobs

    jobs.note_arrival("1.2.3", group_by="series", study_uid="1.2", called_ae="MODELNODE", calling_ae="CR1",
                      new_association=True)
    jobs.association_ended({"1.2.3"})
    import datetime as dt

    [job] = jobs.promote_ready(0, now=dt.datetime.now() + dt.timedelta(seconds=1))
    assert jobs.claim_next().id == job.id
    jobs.transition(job.id, "held", outcome=jobs.OUTCOME_CONTRADICTION, error="held for review: ...")
    held = jobs.Job.get_by_id(job.id)
    assert held.state == "held" and held.finished_at is not None and jobs.counts_by_state()["held"] == 1
    assert jobs.claim_next() is None  # a held job waits for a person
    assert jobs.decision_of(jobs.request_of(job.id)) == ""
    jobs.retry(job.id, trust="image")
    assert jobs.Job.get_by_id(job.id).state == "pending" and jobs.decision_of(jobs.request_of(job.id)) == "image"
    jobs.retry(job.id, model="site-cr-chest-seg")
    request = jobs.request_of(job.id)
    assert jobs.decision_of(request) == "model" and request.model == "site-cr-chest-seg"
    with pytest.raises(ValueError):
        jobs.retry(job.id, model="x", trust="image")
    with pytest.raises(ValueError):
        jobs.retry(job.id, trust="both")
