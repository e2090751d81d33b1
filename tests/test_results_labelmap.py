"""SEG as LABELMAP (Label Map Segmentation Storage) or BINARY, chosen per model or per route.

* iods.results: both types from the same label map read back (highdicom) as the same labels;
  stacked masks make the same LABELMAP, unless they overlap; 100 classes on 120 slices of
  512 x 512 build in seconds; the objects pass dciodvfy (LABELMAP: see ``_dciodvfy_labelmap``).
* node.config: the [results] section, its validation, and which override wins.
* The node: a study sent to a route configured for LABELMAP comes back as one, whether the
  head start or the job computed it.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from cards import segmentation_card_dict, volume_card_dict
from peers import require
from test_results import MODEL_UID, WHEN, ct_series, radiograph

from iods.card import ModelCard, parse_card
from iods.results import SEGMENTATION_TYPES, ResultError, build_segmentation
from node.config import SEGMENTATION_TYPES as CONFIG_SEGMENTATION_TYPES
from node.config import ConfigError, ResultsOverride, ResultsSection, parse_config

pytestmark = pytest.mark.timeout(120)

LABELMAP_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.7"
SEG_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
# What dciodvfy 2022 (before Supplement 243) says about a valid label map SEG checked as a
# BINARY one: these are exactly the rules the supplement changed for LABELMAP.
SUP243_DIFFERENCES = (
    "Unrecognized enumerated value <LABELMAP> for value 1 of attribute <Segmentation Type>",
    "Value is zero for value 1 of attribute <Segment Number>",  # segment 0: Background
    "SegmentNumber not monotonically increasing from one",  # numbers need not run 1, 2, ...
    "Missing attribute Type 1 Required Element=<SegmentIdentificationSequence>",  # no per-frame segment
)


def _card(classes: int) -> ModelCard:
    d = segmentation_card_dict()
    template = d["task"]["classes"][0]
    d["task"]["classes"] = [dict(template, label=f"class {i}") for i in range(1, classes + 1)]
    d["task"]["exclusive"] = True
    d["task"]["activation"] = "softmax"
    return parse_card(d)


def _label_map(shape: tuple[int, int, int], classes: int, seed: int = 0) -> np.ndarray:
    """Random ellipsoids, one per class, later ones painted over earlier ones."""
    rng = np.random.default_rng(seed)
    n, rows, cols = shape
    out = np.zeros(shape, np.uint8 if classes < 256 else np.uint16)
    for label in range(1, classes + 1):
        c = rng.integers(0, shape)
        r = np.maximum(rng.integers((2, 4, 4), (max(3, n // 6), max(5, rows // 8), max(5, cols // 8))), 1)
        lo, hi = np.maximum(c - r, 0), np.minimum(c + r + 1, shape)
        z, y, x = np.ogrid[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
        inside = ((z - c[0]) / r[0]) ** 2 + ((y - c[1]) / r[1]) ** 2 + ((x - c[2]) / r[2]) ** 2 <= 1
        out[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]][inside] = label
    return out


def _dciodvfy_errors(path: Path) -> list[str]:
    res = subprocess.run([require("dciodvfy"), str(path)], capture_output=True, text=True, timeout=60)
    return [ln for ln in (res.stdout + res.stderr).splitlines() if ln.startswith("Error")]


def _dciodvfy_labelmap(path: Path, tmp_path: Path) -> None:
    """No errors; or, where dciodvfy predates Supplement 243 (it then does not know the SOP
    class), no errors but the supplement's own changes when checked as a Segmentation."""
    errors = _dciodvfy_errors(path)
    if not any("Information Object Not found" in e for e in errors):
        assert errors == []
        return
    ds = pydicom.dcmread(path)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = SEG_SOP_CLASS
    as_seg = tmp_path / f"{path.stem}-as-binary-iod.dcm"
    ds.save_as(as_seg)
    rest = [e for e in _dciodvfy_errors(as_seg) if not any(d in e for d in SUP243_DIFFERENCES)]
    assert rest == [], rest


def _labels_back(path: Path, sources: list) -> np.ndarray:
    seg = hd.seg.segread(path)
    return seg.get_pixels_by_source_instance([s.SOPInstanceUID for s in sources], combine_segments=True,
                                             skip_overlap_checks=True)


# --------------------------------------------------------------------------- iods.results


@pytest.mark.peers
def test_labelmap_and_binary_of_one_label_map_read_back_as_the_same_labels(tmp_path):
    card = _card(3)
    src = ct_series(n=8, rows=64, cols=48)
    labels = _label_map((8, 64, 48), 3, seed=7)
    labels[0] = 0  # an empty plane: omitted from both
    assert set(np.unique(labels[1:])) == {0, 1, 2, 3}
    back = {}
    for seg_type in SEGMENTATION_TYPES:
        seg = build_segmentation(src, labels, card, MODEL_UID, content_datetime=WHEN, segmentation_type=seg_type)
        path = tmp_path / f"{seg_type}.dcm"
        seg.save_as(path, enforce_file_format=True)
        back[seg_type] = hd.seg.segread(path)
        assert np.array_equal(_labels_back(path, src), labels), seg_type
        if seg_type == "BINARY":
            assert _dciodvfy_errors(path) == []
        else:
            _dciodvfy_labelmap(path, tmp_path)

    binary, labelmap = back["BINARY"], back["LABELMAP"]
    assert (binary.SOPClassUID, binary.SegmentationType, binary.BitsAllocated) == (SEG_SOP_CLASS, "BINARY", 1)
    assert (labelmap.SOPClassUID, labelmap.SegmentationType) == (LABELMAP_SOP_CLASS, "LABELMAP")
    assert (labelmap.BitsAllocated, labelmap.PhotometricInterpretation, labelmap.SegmentsOverlap) == (8, "MONOCHROME2", "NO")
    assert labelmap.NumberOfFrames == 7, "one frame per non-empty plane"
    # Segment i is card class i in both; LABELMAP adds segment 0, the background.
    assert [int(s.SegmentNumber) for s in labelmap.SegmentSequence] == [0, 1, 2, 3]
    assert labelmap.SegmentSequence[0].SegmentLabel == "Background"
    for b, m in zip(binary.SegmentSequence, labelmap.SegmentSequence[1:], strict=True):
        assert (b.SegmentNumber, b.SegmentLabel, b.RecommendedDisplayCIELabValue) == (
            m.SegmentNumber, m.SegmentLabel, m.RecommendedDisplayCIELabValue)
        assert b.SegmentationAlgorithmIdentificationSequence[0].AlgorithmParameters.startswith(f"model_uid={MODEL_UID}")
    # Both are the same result: same series and instance, so a change of type replaces it.
    assert (binary.SeriesInstanceUID, binary.SOPInstanceUID) == (labelmap.SeriesInstanceUID, labelmap.SOPInstanceUID)
    # The volume reads back in patient space too.
    vol = labelmap.get_volume(combine_segments=True)
    assert set(np.unique(vol.array)) == {0, 1, 2, 3}


@pytest.mark.peers
def test_labelmap_of_a_radiograph(tmp_path):
    dx = radiograph()
    labels = np.zeros((dx.Rows, dx.Columns), np.uint8)
    labels[10:40, 12:30], labels[50:70, 40:60] = 2, 1
    seg = build_segmentation([dx], labels, _card(2), MODEL_UID, content_datetime=WHEN, segmentation_type="LABELMAP")
    path = tmp_path / "dx.dcm"
    seg.save_as(path, enforce_file_format=True)
    _dciodvfy_labelmap(path, tmp_path)
    assert np.array_equal(_labels_back(path, [dx])[0], labels)


def test_stacked_masks_that_do_not_overlap_make_the_same_labelmap():
    card = _card(4)
    src = ct_series(n=6, rows=32, cols=32)
    labels = _label_map((6, 32, 32), 4, seed=3)
    stacked = np.stack([labels == k for k in range(1, 5)], axis=-1)
    probabilities = np.where(stacked, 0.9, 0.1).astype(np.float32)
    made = [build_segmentation(src, m, card, MODEL_UID, content_datetime=WHEN, segmentation_type="LABELMAP")
            for m in (labels, stacked, stacked.astype(np.uint8), probabilities)]
    for seg in made[1:]:
        assert seg.PixelData == made[0].PixelData
        assert seg.NumberOfFrames == made[0].NumberOfFrames


def test_many_stacked_classes_make_the_same_binary_seg_as_their_label_map():
    """Beyond a few classes, BINARY from a stack without overlap goes through a label map; with
    an overlap it stays a stack, and every (plane, class) with pixels is still one frame."""
    card = _card(12)
    src = ct_series(n=6, rows=32, cols=32)
    labels = _label_map((6, 32, 32), 12, seed=5)
    stacked = np.stack([labels == k for k in range(1, 13)], axis=-1)
    a, b = (build_segmentation(src, m, card, MODEL_UID, content_datetime=WHEN) for m in (labels, stacked))
    assert (a.PixelData, a.NumberOfFrames, a.SegmentsOverlap) == (b.PixelData, b.NumberOfFrames, "NO")
    stacked[2, 0, 0, :2] = True
    seg = build_segmentation(src, stacked, card, MODEL_UID, content_datetime=WHEN)
    assert seg.SegmentsOverlap == "YES"
    assert seg.NumberOfFrames == int(stacked.any(axis=(1, 2)).sum())


def test_overlapping_masks_are_refused_for_labelmap_and_kept_for_binary():
    card = _card(3)
    src = ct_series(n=4, rows=16, cols=16)
    stacked = np.zeros((4, 16, 16, 3), bool)
    stacked[1, 2:6, 2:6, 0] = True
    stacked[1, 5:9, 5:9, 2] = True  # (1, 5, 5) is in class 1 and class 3
    with pytest.raises(ResultError, match=r"overlap.*plane 1, row 5, column 5.*'class 1', 'class 3'.*BINARY"):
        build_segmentation(src, stacked, card, MODEL_UID, segmentation_type="LABELMAP")
    seg = build_segmentation(src, stacked, card, MODEL_UID, segmentation_type="BINARY")
    assert seg.SegmentsOverlap == "YES"


def test_bad_segmentation_types_and_label_maps_are_refused():
    card = _card(2)
    src = ct_series(n=2, rows=8, cols=8)
    with pytest.raises(ResultError, match="segmentation_type"):
        build_segmentation(src, np.zeros((2, 8, 8), np.uint8), card, MODEL_UID, segmentation_type="FRACTIONAL")
    for seg_type in SEGMENTATION_TYPES:
        with pytest.raises(ResultError, match="0..2"):
            build_segmentation(src, np.full((2, 8, 8), 3, np.uint8), card, MODEL_UID, segmentation_type=seg_type)
        with pytest.raises(ResultError, match="grid"):
            build_segmentation(src, np.zeros((3, 8, 8), np.uint8), card, MODEL_UID, segmentation_type=seg_type)


def test_label_maps_of_any_integer_type_and_more_than_255_classes():
    src = ct_series(n=3, rows=24, cols=24)
    labels = _label_map((3, 24, 24), 3, seed=1)
    card = _card(3)
    reference = build_segmentation(src, labels, card, MODEL_UID, content_datetime=WHEN, segmentation_type="LABELMAP")
    for dtype in (np.int64, np.uint16, np.int32):
        seg = build_segmentation(src, labels.astype(dtype), card, MODEL_UID, content_datetime=WHEN,
                                 segmentation_type="LABELMAP")
        assert seg.PixelData == reference.PixelData
    many = np.zeros((3, 24, 24), np.uint16)
    many[1, :4, :4], many[2, 10:12, 10:12] = 300, 7
    seg = build_segmentation(src, many, _card(300), MODEL_UID, segmentation_type="LABELMAP")
    assert seg.BitsAllocated == 16
    px = seg.get_pixels_by_source_instance([s.SOPInstanceUID for s in src], combine_segments=True)
    assert np.array_equal(px, many)


def test_a_hundred_classes_on_120_slices_of_512_build_in_seconds():
    """The size of a whole-body model's output. Before label maps went to highdicom as they are,
    BINARY took 147 s and 6 GB here; now about 1.5 s (BINARY) and 0.2 s (LABELMAP) on 2 cores.
    The bound leaves room for a busy machine and still catches that regression."""
    src = ct_series(n=120, rows=512, cols=512, oblique=False)
    labels = _label_map((120, 512, 512), 100, seed=11)
    card = _card(100)
    build_segmentation(src[:2], labels[:2], card, MODEL_UID)  # highdicom's tables of the standard
    frames = {}
    for seg_type in SEGMENTATION_TYPES:
        t = time.perf_counter()
        seg = build_segmentation(src, labels, card, MODEL_UID, segmentation_type=seg_type)
        took = time.perf_counter() - t
        assert took < 15, f"{seg_type}: {took:.1f} s"
        frames[seg_type] = int(seg.NumberOfFrames)
    present = [(labels[p] == k).any() for p in range(120) for k in range(1, 101)]
    assert frames == {"BINARY": sum(present), "LABELMAP": int((labels.reshape(120, -1) > 0).any(axis=1).sum())}


def test_config_and_results_know_the_same_segmentation_types():
    assert CONFIG_SEGMENTATION_TYPES == SEGMENTATION_TYPES


# --------------------------------------------------------------------------- node.config


def test_results_section_defaults_and_parsing():
    assert parse_config({}).results == ResultsSection("BINARY", [])
    cfg = parse_config({"results": {"segmentation_type": "LABELMAP", "overrides": [
        {"model": "whole-body", "segmentation_type": "BINARY"},
        {"called_ae": "AI_LABELMAP", "segmentation_type": "LABELMAP"},
    ]}})
    assert cfg.results.segmentation_type == "LABELMAP"
    assert cfg.results.overrides == [ResultsOverride("BINARY", model="whole-body"),
                                     ResultsOverride("LABELMAP", called_ae="AI_LABELMAP")]


def test_results_section_problems_name_their_keys():
    with pytest.raises(ConfigError) as err:
        parse_config({"results": {"segmentation_type": "binary", "overrides": [
            {"model": "m", "segmentation_type": "FRACTIONAL"},
            {"segmentation_type": "LABELMAP"},
            {"called_ae": "BAD\\AE", "segmentation_type": "LABELMAP"},
            {"model": "m", "segmentation_type": "LABELMAP"},
            {"model": "m", "colour": "red", "segmentation_type": "LABELMAP"},
        ]}})
    problems = dict(err.value.problems)
    assert "BINARY, LABELMAP" in problems["results.segmentation_type"]
    assert "FRACTIONAL" in problems["results.overrides[0].segmentation_type"]
    assert "must name a model, a called_ae or both" in problems["results.overrides[1]"]
    assert "not a valid AE title" in problems["results.overrides[2].called_ae"]
    assert "results.overrides[0]" in problems["results.overrides[3]"]
    assert problems["results.overrides[4].colour"] == "unknown key"
    with pytest.raises(ConfigError) as err:
        parse_config({"results": {"overrides": [{"model": "m"}]}})
    assert dict(err.value.problems)["results.overrides[0].segmentation_type"] == "is required"


def test_the_most_specific_override_wins_route_before_model():
    res = parse_config({"results": {"segmentation_type": "BINARY", "overrides": [
        {"model": "whole-body", "segmentation_type": "LABELMAP"},
        {"called_ae": "AI_BINARY", "segmentation_type": "BINARY"},
        {"called_ae": "AI_LABELMAP", "segmentation_type": "LABELMAP"},
        {"model": "2.25.77", "called_ae": "AI_BINARY", "segmentation_type": "LABELMAP"},
        {"model": "2.25.77", "segmentation_type": "BINARY"},
    ]}}).results

    def for_(name: str, uid: str, ae: str, exclusive: bool = True) -> str:
        return res.segmentation_type_for(uid, name, ae, exclusive=exclusive)

    assert for_("lung", "2.25.1", "MODELNODE") == "BINARY", "nothing matches: the default"
    assert for_("whole-body", "2.25.2", "MODELNODE") == "LABELMAP", "the model, by name"
    assert for_("lung", "2.25.1", "AI_LABELMAP") == "LABELMAP", "the route"
    assert for_("whole-body", "2.25.2", "AI_BINARY") == "BINARY", "the route beats the model"
    assert for_("other", "2.25.77", "AI_BINARY") == "LABELMAP", "model and route together beat both"
    assert for_("other", "2.25.77", "MODELNODE") == "BINARY", "the model, by UID"
    assert for_("whole-body", "2.25.2", "AI_LABELMAP", exclusive=False) == "BINARY", \
        "a model whose classes may overlap always gets BINARY"
    first = ResultsSection("BINARY", [ResultsOverride("LABELMAP", model="m"), ResultsOverride("BINARY", model="2.25.9")])
    assert first.segmentation_type_for("2.25.9", "m", "X", exclusive=True) == "LABELMAP", "equals: the first"


# --------------------------------------------------------------------------- the node


@pytest.mark.peers
@pytest.mark.slow
def test_a_study_sent_to_a_labelmap_route_comes_back_as_labelmap(tmp_path):
    """Route AI_LABELMAP says LABELMAP, the model's own override says BINARY: the route wins, and
    the head start (computed during the quiet time, then taken) is of that type too."""
    from node_proc import node_process, query
    from onnx_factory import intensity_classes_model

    from iods import model_object
    from models.training.phantoms import write_ct_series

    card = parse_card(volume_card_dict(window=None))
    packed = tmp_path / "model.dcm"
    model_object.write(model_object.encode(intensity_classes_model(), card), packed)
    ct = write_ct_series(tmp_path / "ct", 4242, shape=(12, 48, 48))
    extra = {
        "pipeline": {"quiet_seconds": 4.0, "poll_seconds": 0.1},
        "inference": {"intra_op_threads": 2},
        "results": {"overrides": [{"model": card.identity.name, "segmentation_type": "BINARY"},
                                  {"called_ae": "AI_LABELMAP", "segmentation_type": "LABELMAP"}]},
    }
    with node_process(tmp_path / "node", extra=extra) as node:
        assert node.cli("models", "add", str(packed)).returncode == 0
        subprocess.run([require("storescu"), "-aec", "AI_LABELMAP", "127.0.0.1", str(node.port), *map(str, ct)],
                       check=True, capture_output=True, timeout=60)
        deadline = time.monotonic() + 60
        while not (rows := query(node, "SELECT state, results, timings FROM job WHERE state IN ('done', 'exported', "
                                       "'failed')")):
            assert time.monotonic() < deadline, node.log()[-4000:]
            time.sleep(0.2)
        log = node.log()
    [(state, results, timings)] = rows
    assert state in ("done", "exported"), log[-4000:]
    assert '"computed_ahead": 1.0' in timings, timings
    [(digest,)] = query(node, "SELECT digest FROM instance WHERE sop_uid = ?", results.strip('[]"'))
    seg = hd.seg.segread(node.data_dir / "objects" / digest[:2] / digest[2:4] / f"{digest}.dcm")
    assert (seg.SOPClassUID, seg.SegmentationType) == (LABELMAP_SOP_CLASS, "LABELMAP")
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["Background", "lung", "soft tissue", "bone"]
    assert "head start: test-tissue-3d computed" in log
