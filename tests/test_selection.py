"""Model selection: each rule of the score, the hard constraints, site rules, determinism,
and the right model first across a broad set of real-world header variants."""

from __future__ import annotations

import copy
import random

import pytest
from cards import segmentation_card_dict
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from iods.card import parse_card
from node.config import SelectionSection, SiteRule
from node.pipeline.selection import SeriesFacts, select, version_key


def card(name, modalities, body_parts, anatomy, *, findings=(), version="1.0.0", layout="2d", channels=1,
         min_slices=1, laterality="", validated=True, photometric=("MONOCHROME2", "MONOCHROME1")):
    data = copy.deepcopy(segmentation_card_dict(name=name, version=version))
    data["target"] = {
        "modalities": list(modalities),
        "body_parts": list(body_parts),
        "anatomy": [{"value": v, "meaning": m} for v, m in anatomy],
        "findings": [{"value": v, "meaning": m} for v, m in findings],
        "laterality": laterality,
    }
    data["input"]["layout"] = layout
    data["input"]["channels"] = channels
    data["input"]["min_slices"] = min_slices
    data["input"]["size"] = [0, 0] if layout == "2d" else [0, 0, 0]
    data["input"]["photometric"] = list(photometric)
    if not validated:
        data["provenance"]["performance"] = {}
    return parse_card(data)


LUNG = ("39607008", "Lung")
THORAX = ("51185008", "Thorax")
KNEE = ("72696002", "Knee")
BRAIN = ("12738006", "Brain")
HEAD = ("69536005", "Head")
ABDOMEN = ("818983003", "Abdomen")
LIVER = ("10200004", "Liver")
PELVIS = ("816092008", "Pelvis")
CAP = ("416775004", "Chest, abdomen and pelvis")
HAND = ("85562004", "Hand")
NODULE = ("27925004", "Nodule")
PTX = ("36118008", "Pneumothorax")

LIBRARY = {
    "ct-lung": card("ct-lung", ["CT"], ["CHEST"], [LUNG, THORAX], findings=[NODULE]),
    "ct-ptx": card("ct-ptx", ["CT"], ["CHEST"], [THORAX], findings=[PTX]),
    "ct-liver": card("ct-liver", ["CT"], ["ABDOMEN"], [LIVER, ABDOMEN]),
    "ct-cap": card("ct-cap", ["CT"], ["CHESTABDPELVIS"], [CAP], min_slices=50, layout="3d"),
    "mr-knee": card("mr-knee", ["MR"], ["KNEE"], [KNEE]),
    "mr-brain": card("mr-brain", ["MR"], ["BRAIN"], [BRAIN, HEAD]),
    "ct-head": card("ct-head", ["CT"], ["HEAD"], [HEAD, BRAIN]),
    "dx-chest": card("dx-chest", ["CR", "DX"], ["CHEST"], [THORAX]),
    "dx-hand": card("dx-hand", ["CR", "DX"], ["HAND"], [HAND]),
    "dx-pelvis": card("dx-pelvis", ["CR", "DX"], ["PELVIS"], [PELVIS]),
}


def models(*names):
    names = names or tuple(LIBRARY)
    return [(f"2.25.{i + 1}", LIBRARY[n]) for i, n in enumerate(names)]


def series(modality="CT", n=1, *, pixels=True, geometry=True, spp=1, photometric="MONOCHROME2", **attrs):
    out = []
    for i in range(n):
        ds = Dataset()
        ds.Modality = modality
        ds.SeriesInstanceUID = "1.2.3"
        ds.SOPInstanceUID = f"1.2.3.{i}"
        ds.SamplesPerPixel = spp
        ds.PhotometricInterpretation = photometric
        if geometry:
            ds.ImagePositionPatient = [0, 0, float(i)]
            ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        if pixels:
            ds.PixelData = b"\0\0"
        for k, v in attrs.items():
            setattr(ds, k, v)
        out.append(ds)
    return out


def rank(datasets, lib=None, settings=None, **kw):
    facts = SeriesFacts.from_datasets(datasets, **kw)
    return select(facts, lib or models(), settings)


def first(sel):
    assert sel.best is not None, sel.explain()
    return sel.best.name


def rule_points(sel, name, rule):
    cand = next(c for c in sel.ranked if c.name == name)
    return sum(p.points for p in cand.components if p.rule == rule)


# ---------------------------------------------------------------- hard constraints


@pytest.mark.timeout(60)
def test_modality_is_a_hard_constraint():
    sel = rank(series("MR", BodyPartExamined="CHEST"))
    assert sel.best is None or "ct-lung" not in [c.name for c in sel.ranked]
    rej = {r.name: r.reasons for r in sel.rejected}
    assert any("modality MR" in r for r in rej["ct-lung"])


@pytest.mark.timeout(60)
def test_series_without_pixel_data_is_refused():
    sel = rank(series(BodyPartExamined="CHEST", pixels=False))
    assert not sel.suitable
    assert all(any("no pixel data" in r for r in rej.reasons) for rej in sel.rejected if "CT" in LIBRARY[rej.name].target.modalities)


@pytest.mark.timeout(60)
def test_channels_and_photometric_are_hard_constraints():
    sel = rank(series(BodyPartExamined="CHEST", spp=3, photometric="RGB"), models("ct-lung"))
    assert not sel.suitable
    reasons = " ".join(sel.rejected[0].reasons)
    assert "3 samples per pixel" in reasons and "photometric RGB" in reasons


@pytest.mark.timeout(60)
def test_3d_model_needs_geometry_and_enough_slices():
    lib = models("ct-cap")
    few = rank(series(n=10, BodyPartExamined="CHESTABDPELVIS"), lib)
    assert not few.suitable and "at least 50" in " ".join(few.rejected[0].reasons)
    flat = rank(series(n=60, geometry=False, BodyPartExamined="CHESTABDPELVIS"), lib)
    assert not flat.suitable and "3D volume" in " ".join(flat.rejected[0].reasons)
    ok = rank(series(n=60, BodyPartExamined="CHESTABDPELVIS"), lib)
    assert first(ok) == "ct-cap"


@pytest.mark.timeout(60)
def test_laterality_rejects_the_other_side_and_scores_the_same_side():
    left = card("dx-hand-left", ["DX"], ["HAND"], [HAND], laterality="L")
    right = card("dx-hand-right", ["DX"], ["HAND"], [HAND], laterality="R")
    lib = [("2.25.1", left), ("2.25.2", right)]
    sel = rank(series("DX", BodyPartExamined="HAND", Laterality="R"), lib)
    assert [c.name for c in sel.ranked] == ["dx-hand-right"]
    assert rule_points(sel, "dx-hand-right", "laterality") > 0
    assert "laterality R" in " ".join(sel.rejected[0].reasons)


@pytest.mark.timeout(60)
def test_unrelated_anatomy_is_rejected_with_the_reason():
    sel = rank(series("CT", BodyPartExamined="KNEE"), models("ct-lung"))
    assert not sel.suitable
    assert "does not match" in " ".join(sel.rejected[0].reasons)


@pytest.mark.timeout(60)
def test_min_anatomy_zero_admits_unrelated_anatomy_with_no_anatomy_points():
    sel = rank(series("CT", BodyPartExamined="KNEE"), models("ct-lung"), SelectionSection(min_anatomy=0.0))
    assert sel.suitable and first(sel) == "ct-lung"
    assert rule_points(sel, "ct-lung", "anatomy") == 0
    assert "nothing in common" in sel.explain()


@pytest.mark.timeout(60)
def test_no_anatomy_at_all_is_no_suitable_model():
    sel = rank(series("CT"), models("ct-lung"))
    assert not sel.suitable
    assert "no anatomy" in sel.explain()


# ---------------------------------------------------------------- score rules


@pytest.mark.timeout(60)
def test_anatomy_exact_beats_containing_region():
    lib = models("ct-lung", "ct-cap")
    sel = rank(series(n=60, BodyPartExamined="LUNG"), lib)
    assert first(sel) == "ct-lung"
    assert rule_points(sel, "ct-lung", "anatomy") > rule_points(sel, "ct-cap", "anatomy") > 0


@pytest.mark.timeout(60)
def test_anatomy_weights_the_more_trusted_header_on_contradiction():
    sel = rank(series("MR", BodyPartExamined="KNEE", SeriesDescription="t2_tse_tra BRAIN"), models("mr-knee", "mr-brain"))
    assert first(sel) == "mr-knee"
    assert {c.name for c in sel.ranked} == {"mr-knee", "mr-brain"}


@pytest.mark.timeout(60)
def test_finding_in_the_request_ranks_the_model_that_targets_it():
    coded = rank(series(BodyPartExamined="CHEST"), models("ct-lung", "ct-ptx"), findings=[PTX[0]])
    assert first(coded) == "ct-ptx"
    assert rule_points(coded, "ct-ptx", "finding") > 0 and rule_points(coded, "ct-lung", "finding") == 0
    text = rank(series(BodyPartExamined="CHEST", ReasonForTheRequestedProcedure="V.a. Rundherd re OL"),
                models("ct-ptx", "ct-lung"))
    assert first(text) == "ct-lung"
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = PTX[0], "SCT", PTX[1]
    seq = rank(series(BodyPartExamined="CHEST", ReasonForRequestedProcedureCodeSequence=Sequence([item])),
               models("ct-lung", "ct-ptx"))
    assert first(seq) == "ct-ptx"


@pytest.mark.timeout(60)
def test_without_a_requested_finding_the_finding_rule_is_neutral():
    sel = rank(series(BodyPartExamined="CHEST"), models("ct-lung", "ct-ptx"))
    assert rule_points(sel, "ct-lung", "finding") == rule_points(sel, "ct-ptx", "finding") == 0


@pytest.mark.timeout(60)
def test_newest_validated_version_wins():
    v1 = card("ct-lung", ["CT"], ["CHEST"], [LUNG], version="1.9.0")
    v2 = card("ct-lung", ["CT"], ["CHEST"], [LUNG], version="1.10.0")
    v3 = card("ct-lung", ["CT"], ["CHEST"], [LUNG], version="2.0.0-rc1", validated=False)
    sel = rank(series(BodyPartExamined="CHEST"), [("2.25.1", v1), ("2.25.2", v2), ("2.25.3", v3)])
    assert [c.version for c in sel.ranked] == ["1.10.0", "2.0.0-rc1", "1.9.0"]
    assert version_key("1.10.0") > version_key("1.9.0")


@pytest.mark.timeout(60)
def test_site_rules_pin_exclude_and_route():
    lib = models("ct-lung", "ct-ptx")
    pin = SelectionSection(rules=[SiteRule(action="pin", models=["ct-ptx"])])
    assert first(rank(series(BodyPartExamined="LUNG"), lib, pin)) == "ct-ptx"
    exclude = SelectionSection(rules=[SiteRule(action="exclude", models=["2.25.1"])])
    sel = rank(series(BodyPartExamined="LUNG"), lib, exclude)
    assert [c.name for c in sel.ranked] == ["ct-ptx"] and "excluded" in sel.explain()
    route = SelectionSection(rules=[SiteRule(action="route", models=["ct-ptx"], called_ae="AI_PTX")])
    routed = rank(series(BodyPartExamined="LUNG"), lib, route, called_ae="AI_PTX")
    assert [c.name for c in routed.ranked] == ["ct-ptx"]
    other_ae = rank(series(BodyPartExamined="LUNG"), lib, route, called_ae="MODELNODE")
    assert first(other_ae) == "ct-lung"


@pytest.mark.timeout(60)
def test_ranking_is_deterministic_whatever_the_model_order():
    lib = models()
    ds = series(BodyPartExamined="CHEST", SeriesDescription="Thorax 1.0 B70f")
    want = [(c.name, c.score) for c in rank(ds, lib).ranked]
    for seed in range(5):
        shuffled = lib[:]
        random.Random(seed).shuffle(shuffled)
        assert [(c.name, c.score) for c in rank(ds, shuffled).ranked] == want


@pytest.mark.timeout(60)
def test_explanation_names_every_rule():
    sel = rank(series(BodyPartExamined="CHEST"), models("ct-lung"))
    text = sel.explain()
    for rule in ("anatomy", "finding", "version"):
        assert rule in text
    assert sel.to_dict()["ranked"][0]["name"] == "ct-lung"


# ---------------------------------------------------------------- header variants


# (modality, headers, expected model or None). Strings as scanners and RIS write them.
VARIANTS = [
    ("CT", {"BodyPartExamined": "CHEST"}, "ct-lung"),
    ("CT", {"BodyPartExamined": "THORAX"}, "ct-lung"),
    ("CT", {"BodyPartExamined": "LUNG"}, "ct-lung"),
    ("CT", {"BodyPartExamined": "", "SeriesDescription": "Thorax 1.0 B70f"}, "ct-lung"),
    ("CT", {"StudyDescription": "CT THORAX NATIV"}, "ct-lung"),
    ("CT", {"StudyDescription": "CT TORAX SIN CONTRASTE"}, "ct-lung"),
    ("CT", {"StudyDescription": "TC TORACE", "ProtocolName": "TORACE_ROUTINE"}, "ct-lung"),
    ("CT", {"ProtocolName": "1.1 Thorax^01_ThxRoutine (Adult)"}, "ct-lung"),
    ("CT", {"SeriesDescription": "CHEST W/O CONTRAST 1.25MM"}, "ct-lung"),
    ("CT", {"StudyDescription": "TDM THORACIQUE", "SeriesDescription": "POUMON 1.25"}, "ct-lung"),
    ("CT", {"BodyPartExamined": "ABDOMEN"}, "ct-liver"),
    ("CT", {"StudyDescription": "CT ABDOMEN W CONTRAST"}, "ct-liver"),
    ("CT", {"BodyPartExamined": "LIVER"}, "ct-liver"),
    ("CT", {"StudyDescription": "CT Leber 3-phasig"}, "ct-liver"),
    ("CT", {"StudyDescription": "TC ADDOME"}, "ct-liver"),
    ("CT", {"BodyPartExamined": "HEAD"}, "ct-head"),
    ("CT", {"StudyDescription": "CCT nativ", "BodyPartExamined": "SCHAEDEL"}, "ct-head"),
    ("CT", {"StudyDescription": "CT CRANE SANS INJECTION"}, "ct-head"),
    ("CT", {"BodyPartExamined": "BRAIN"}, "ct-head"),
    ("MR", {"BodyPartExamined": "KNEE"}, "mr-knee"),
    ("MR", {"BodyPartExamined": "KNEE", "Laterality": "R"}, "mr-knee"),
    ("MR", {"StudyDescription": "MRT Knie li"}, "mr-knee"),
    ("MR", {"StudyDescription": "IRM GENOU DROIT"}, "mr-knee"),
    ("MR", {"StudyDescription": "RM GINOCCHIO SX"}, "mr-knee"),
    ("MR", {"StudyDescription": "RM RODILLA IZQUIERDA"}, "mr-knee"),
    ("MR", {"BodyPartExamined": "BRAIN"}, "mr-brain"),
    ("MR", {"BodyPartExamined": "HEAD", "SeriesDescription": "t1_mprage_sag"}, "mr-brain"),
    ("MR", {"StudyDescription": "MRT Schädel"}, "mr-brain"),
    ("MR", {"StudyDescription": "IRM CEREBRALE"}, "mr-brain"),
    ("MR", {"StudyDescription": "RM ENCEFALO"}, "mr-brain"),
    ("DX", {"BodyPartExamined": "CHEST"}, "dx-chest"),
    ("CR", {"BodyPartExamined": "CHEST", "ViewPosition": "PA"}, "dx-chest"),
    ("DX", {"StudyDescription": "RX TORACE 2P"}, "dx-chest"),
    ("DX", {"StudyDescription": "Rx Tórax PA y lateral"}, "dx-chest"),
    ("CR", {"StudyDescription": "THORAX PA/LAT"}, "dx-chest"),
    ("DX", {"StudyDescription": "RADIO DU THORAX"}, "dx-chest"),
    ("DX", {"BodyPartExamined": "HAND"}, "dx-hand"),
    ("DX", {"StudyDescription": "XR HAND 3V RT"}, "dx-hand"),
    ("CR", {"StudyDescription": "Hand li d.p./schräg"}, "dx-hand"),
    ("DX", {"StudyDescription": "RX MANO DX"}, "dx-hand"),
    ("DX", {"BodyPartExamined": "PELVIS"}, "dx-pelvis"),
    ("DX", {"StudyDescription": "Becken ap"}, "dx-pelvis"),
    ("CR", {"StudyDescription": "BASSIN FACE"}, "dx-pelvis"),
    ("DX", {"StudyDescription": "RX BACINO"}, "dx-pelvis"),
    # Contradictory: the coded/BodyPart field outranks free text.
    ("CT", {"BodyPartExamined": "CHEST", "SeriesDescription": "ABDOMEN 5.0"}, "ct-lung"),
    ("MR", {"BodyPartExamined": "KNEE", "StudyDescription": "MRT Schädel"}, "mr-knee"),
    # Nothing fits.
    ("CT", {"BodyPartExamined": "KNEE"}, None),
    ("MR", {"BodyPartExamined": "CHEST"}, None),
    ("US", {"BodyPartExamined": "ABDOMEN"}, None),
    ("DX", {"BodyPartExamined": "FOOT"}, None),
    ("CT", {"StudyDescription": "ZZZ QA PHANTOM"}, None),
    ("MG", {"BodyPartExamined": "BREAST"}, None),
]


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("modality", "headers", "expected"), VARIANTS,
                         ids=[f"{m}-{'-'.join(h.values())[:40]}" for m, h, _ in VARIANTS])
def test_header_variant(modality, headers, expected):
    sel = rank(series(modality, **headers), [m for m in models() if m[1].identity.name != "ct-cap"])
    got = sel.best.name if sel.best else None
    assert got == expected, sel.explain()


# ---------------------------------------------------------------- the index (many models)


def _big_library(n: int, seed: int) -> list[tuple[str, object]]:
    """``n`` models of many kinds and versions, some with body parts only, some 3D, lateral, or
    targeting findings: what a registry shared across hospitals holds."""
    rng = random.Random(seed)
    kinds = [
        (["CT"], ["CHEST"], [LUNG, THORAX]), (["CT"], ["CHEST"], [("123456789", "Unknown region")]),
        (["CT"], ["ABDOMEN"], [LIVER, ABDOMEN]),
        (["CT"], ["HEAD"], [HEAD, BRAIN]), (["CT"], ["CHESTABDPELVIS"], [CAP]), (["CT"], ["PELVIS"], [PELVIS]),
        (["MR"], ["KNEE"], [KNEE]), (["MR"], ["BRAIN"], [BRAIN, HEAD]), (["MR"], ["LIVER"], [LIVER]),
        (["CR", "DX"], ["CHEST"], [THORAX]), (["DX"], ["HAND"], [HAND]), (["CR", "DX"], ["PELVIS"], [PELVIS]),
        (["MG"], ["BREAST"], [("76752008", "Breast")]), (["US"], ["ABDOMEN"], [ABDOMEN]),
        (["CT", "MR"], ["HEAD"], [BRAIN]),
    ]
    out = []
    for i in range(n):
        modalities, parts, codes = kinds[rng.randrange(len(kinds))]
        c = card(f"model-{rng.randrange(n // 3 + 1)}", modalities, parts, codes,
                 findings=[NODULE] if rng.random() < 0.2 else [PTX] if rng.random() < 0.1 else [],
                 version=f"{rng.randrange(3)}.{rng.randrange(12)}.0", validated=rng.random() < 0.7,
                 laterality=rng.choice(["", "", "", "L", "R"]),
                 layout="3d" if rng.random() < 0.2 else "2d", min_slices=rng.choice([1, 1, 20]))
        out.append((f"2.25.{1000 + i}", c))
    return out


def _facts_to_try():
    out = [SeriesFacts.from_datasets(series(modality, **headers)) for modality, headers, _ in VARIANTS]
    out += [SeriesFacts.from_datasets(series("CT", 30, BodyPartExamined="CHEST", ReasonForTheRequestedProcedure="Rundherd")),
            SeriesFacts.from_datasets(series("MR", BodyPartExamined="KNEE", Laterality="L")),
            SeriesFacts.from_datasets(series("CT", BodyPartExamined="")),
            SeriesFacts.from_datasets(series("", BodyPartExamined="CHEST")),
            SeriesFacts.from_datasets(series("CT", StudyDescription="CT_THORAX_NATIV"), called_ae="AI_PTX")]
    return out


@pytest.mark.timeout(300)
@pytest.mark.parametrize("min_anatomy", [0.5, 0.4, 0.75, 0.0])
def test_the_index_gives_the_ranking_of_every_model(min_anatomy):
    """SelectionIndex.candidates() then select() ranks exactly as select() over every model."""
    from dataclasses import asdict

    from iods.anatomy import default_normaliser
    from node.pipeline.selection import SelectionIndex

    norm = default_normaliser()
    lib = _big_library(300, seed=int(min_anatomy * 100))
    idx = SelectionIndex(lib, norm)
    rule_sets = [[], [SiteRule(action="pin", models=["model-3"]), SiteRule(action="exclude", models=[lib[0][0]])],
                 [SiteRule(action="route", models=["model-1", "model-2"], called_ae="AI_PTX")]]
    compared = considered = ranked = 0
    for rules in rule_sets:
        settings = SelectionSection(min_anatomy=min_anatomy, rules=rules)
        for facts in _facts_to_try():
            every = select(facts, lib, settings)
            candidates = idx.candidates(facts, min_anatomy)
            indexed = select(facts, candidates, settings)
            assert [asdict(c) for c in indexed.ranked] == [asdict(c) for c in every.ranked], facts
            assert {r.uid for r in indexed.rejected} <= {r.uid for r in every.rejected}
            compared += 1
            considered += len(candidates)
            ranked += len(every.ranked)
    assert compared > (2 if min_anatomy == 0.0 else 100)
    if min_anatomy > 0:
        assert ranked > 0
        assert considered < compared * len(lib) / 3  # the index leaves most models out
