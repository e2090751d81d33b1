"""Result objects: SEG and TID 1500 SR built from model output, validated and read back.

Every object is written to disk, checked by dciodvfy (no errors), and read back both by
highdicom and by plain pydicom, so geometry and references are checked against the sources
independently of the library that wrote them.
"""

from __future__ import annotations

import copy
import datetime as dt
import re
import subprocess
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
import pytest
from cards import segmentation_card_dict
from peers import require
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sr.codedict import codes
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from iods.card import ModelCard, parse_card
from iods.results import (
    GROUP_SOURCE_LIMIT,
    ResultError,
    build_classification_sr,
    build_segmentation,
    result_series_description,
    result_uids,
)

CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
DX_IMAGE = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage - For Presentation
MODEL_UID = "2.25.111111111111111111111111111111111111"
OTHER_MODEL_UID = "2.25.222222222222222222222222222222222222"
WHEN = dt.datetime(2026, 11, 21, 10, 30, 0)


# --------------------------------------------------------------------------- sources


def _base(sop_class: str, study: str, series: str, modality: str) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.PatientName = "Phantom^Result"
    ds.PatientID = "RESULTS-1"
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    ds.StudyInstanceUID = study
    ds.SeriesInstanceUID = series
    ds.StudyDate = "20261121"
    ds.StudyTime = "101500"
    ds.AccessionNumber = "ACC1"
    ds.StudyID = "S1"
    ds.ReferringPhysicianName = ""
    ds.Modality = modality
    ds.SeriesNumber = 3
    ds.Manufacturer = "Synthetic Scanner Co"
    ds.ManufacturerModelName = "Phantom 1"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    return ds


def ct_series(n: int = 8, rows: int = 64, cols: int = 48, oblique: bool = True) -> list[Dataset]:
    """A CT series sorted along its normal; oblique so that no axis shortcut would pass."""
    study, series, frame_of_ref = generate_uid(), generate_uid(), generate_uid()
    if oblique:  # a coronal plane turned 20 degrees about the patient's long axis
        a = np.deg2rad(20.0)
        row_dir, col_dir = np.array([np.cos(a), np.sin(a), 0.0]), np.array([0.0, 0.0, -1.0])
    else:
        row_dir, col_dir = np.array([1.0, 0.0, 0.0]), np.array([0.0, 1.0, 0.0])
    normal = np.cross(row_dir, col_dir)
    origin = np.array([-30.0, -20.0, 40.0])
    out = []
    for i in range(n):
        ds = _base(CT_IMAGE, study, series, "CT")
        ds.InstanceNumber = i + 1
        ds.FrameOfReferenceUID = frame_of_ref
        ds.PositionReferenceIndicator = ""
        ds.ImagePositionPatient = [round(float(v), 4) for v in origin + 2.5 * i * normal]
        ds.ImageOrientationPatient = [round(float(v), 6) for v in (*row_dir, *col_dir)]
        ds.PixelSpacing = [0.8, 0.7]  # row spacing != column spacing: catches swapped axes
        ds.SliceThickness = 2.5
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.KVP = 120
        ds.AcquisitionNumber = 1
        ds.RescaleIntercept = -1024
        ds.RescaleSlope = 1
        ds.Rows, ds.Columns = rows, cols
        ds.PixelData = np.zeros((rows, cols), np.uint16).tobytes()
        out.append(ds)
    return out


def radiograph(rows: int = 96, cols: int = 80) -> Dataset:
    """A DX radiograph: projection image, no Frame of Reference, non-square to catch transposes."""
    ds = _base(DX_IMAGE, generate_uid(), generate_uid(), "DX")
    ds.InstanceNumber = 1
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.PatientOrientation = ["L", "F"]
    ds.ImagerPixelSpacing = [0.15, 0.15]
    ds.BodyPartExamined = "CHEST"
    ds.Rows, ds.Columns = rows, cols
    ds.PixelData = np.zeros((rows, cols), np.uint16).tobytes()
    return ds


# --------------------------------------------------------------------------- cards


def _body_part(label: str, code: Any) -> dict[str, Any]:
    return {
        "label": label,
        "category": {"value": "91723000", "scheme": "SCT", "meaning": "Anatomical Structure"},
        "type": {"value": code.value, "scheme": "SCT", "meaning": code.meaning},
    }


def classification_card_dict() -> dict[str, Any]:
    data = copy.deepcopy(segmentation_card_dict(name="test-body-part", version="2.1.0"))
    data["identity"]["intended_use"] = "Research use only: body part of a radiograph"
    data["target"] = {
        "modalities": ["CR", "DX"],
        "body_parts": ["HEAD", "CHEST", "ABDOMEN", "PELVIS"],
        "anatomy": [{"value": "38866009", "scheme": "SCT", "meaning": "Body part structure"}],
    }
    data["task"] = {
        "type": "classification",
        "activation": "softmax",
        "classes": [
            _body_part("head", codes.SCT.Head),
            _body_part("chest", codes.SCT.Chest),
            _body_part("abdomen", codes.SCT.Abdomen),
            _body_part("pelvis", codes.SCT.Pelvis),
        ],
    }
    data["input"] = {"layout": "2d", "channels": 1, "size": [128, 128]}
    return data


@pytest.fixture
def cls_card() -> ModelCard:
    return parse_card(classification_card_dict())


# --------------------------------------------------------------------------- helpers


def dciodvfy(path: Path, expect: str) -> list[str]:
    """Run dciodvfy; fail on any error line, return the warnings for the caller to judge."""
    exe = require("dciodvfy")
    res = subprocess.run([exe, str(path)], capture_output=True, text=True, timeout=60)
    out = res.stdout + res.stderr
    assert expect in out, out
    errors = [line for line in out.splitlines() if line.startswith("Error")]
    assert errors == [], out
    return [line for line in out.splitlines() if line.startswith("Warning")]


def save(ds: Dataset, path: Path) -> Path:
    ds.save_as(path, enforce_file_format=True)
    return path


def source_affine(sources: list[Dataset]) -> np.ndarray:
    """Voxel (slice, row, column) -> patient mm for a series sorted along its normal."""
    iop = np.array(sources[0].ImageOrientationPatient, dtype=float)
    dr, dc = (float(v) for v in sources[0].PixelSpacing)
    first = np.array(sources[0].ImagePositionPatient, dtype=float)
    step = np.array(sources[1].ImagePositionPatient, dtype=float) - first
    affine = np.eye(4)
    affine[:3, 0], affine[:3, 1], affine[:3, 2], affine[:3, 3] = step, iop[3:] * dr, iop[:3] * dc, first
    return affine


def ct_masks(n: int, rows: int, cols: int) -> np.ndarray:
    """Two overlapping classes with known shapes; slice 0 and the last slice stay empty."""
    m = np.zeros((n, rows, cols, 2), dtype=bool)
    yy, xx = np.mgrid[:rows, :cols]
    for i in range(1, n - 1):
        radius = 6 + 2 * min(i, n - 1 - i)
        m[i, :, :, 0] = (yy - rows // 2) ** 2 + (xx - cols // 3) ** 2 <= radius**2
    m[3:5, 40:46, 30:36, 1] = True
    return m


# --------------------------------------------------------------------------- SEG


@pytest.mark.peers
@pytest.mark.timeout(60)
def test_segmentation_of_a_ct_series_round_trips_exactly(tmp_path, seg_card):
    src = ct_series()
    n, rows, cols = len(src), src[0].Rows, src[0].Columns
    masks = ct_masks(n, rows, cols)
    seg = build_segmentation(src, masks, seg_card, MODEL_UID, content_datetime=WHEN)
    path = save(seg, tmp_path / "seg.dcm")
    assert dciodvfy(path, "Segmentation") == []

    # highdicom reads it back; pixels per source instance equal the input (Dice 1.0).
    back = hd.seg.segread(path)
    uids = [ds.SOPInstanceUID for ds in src]
    got = back.get_pixels_by_source_instance(uids, segment_numbers=[1, 2])
    assert got.shape == masks.shape
    assert np.array_equal(got.astype(bool), masks)
    # The volume highdicom assembles from plane positions lies where the input lies, in mm.
    vol = back.get_volume(combine_segments=False)
    for k in range(2):
        world = np.c_[np.argwhere(vol.array[..., k] > 0), np.ones(int((vol.array[..., k] > 0).sum()))]
        in_source = world @ vol.affine.T @ np.linalg.inv(source_affine(src)).T
        assert np.allclose(in_source, np.round(in_source), atol=1e-3)
        voxels = {tuple(v) for v in np.round(in_source[:, :3]).astype(int)}
        assert voxels == {tuple(v) for v in np.argwhere(masks[..., k])}

    # Independently of highdicom: one frame per (slice, class) with a non-empty mask, each at
    # its source's plane position and referencing that source instance.
    raw = pydicom.dcmread(path)
    expected_frames = {(i, k) for i in range(n) for k in range(2) if masks[i, :, :, k].any()}
    assert raw.NumberOfFrames == len(expected_frames)
    pixels = raw.pixel_array.reshape(raw.NumberOfFrames, rows, cols)
    by_uid = {ds.SOPInstanceUID: i for i, ds in enumerate(src)}
    seen = set()
    for f, item in enumerate(raw.PerFrameFunctionalGroupsSequence):
        ref = item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        i = by_uid[ref]
        k = item.SegmentIdentificationSequence[0].ReferencedSegmentNumber - 1
        pos = [float(v) for v in item.PlanePositionSequence[0].ImagePositionPatient]
        assert np.allclose(pos, [float(v) for v in src[i].ImagePositionPatient], atol=1e-4)
        assert np.array_equal(pixels[f].astype(bool), masks[i, :, :, k])
        seen.add((i, k))
    assert seen == expected_frames
    shared = raw.SharedFunctionalGroupsSequence[0]
    assert [float(v) for v in shared.PixelMeasuresSequence[0].PixelSpacing] == [0.8, 0.7]
    assert np.allclose(
        [float(v) for v in shared.PlaneOrientationSequence[0].ImageOrientationPatient],
        [float(v) for v in src[0].ImageOrientationPatient],
    )
    assert raw.FrameOfReferenceUID == src[0].FrameOfReferenceUID
    referenced = {
        inst.ReferencedSOPInstanceUID
        for s in raw.ReferencedSeriesSequence
        for inst in s.ReferencedInstanceSequence
    }
    assert referenced == set(uids)

    # The result belongs to the source's patient and study.
    for kw in ("PatientID", "PatientName", "StudyInstanceUID", "AccessionNumber", "StudyID"):
        assert raw[kw].value == src[0][kw].value
    assert raw.SeriesInstanceUID != src[0].SeriesInstanceUID
    assert raw.SeriesDescription == "AI test-lung-seg 1.0.0"
    assert raw.SeriesNumber == 1003
    assert raw.Manufacturer == "modelnode"


@pytest.mark.timeout(30)
def test_segments_name_the_model_and_carry_the_card_codes(seg_card):
    src = ct_series(n=4, rows=32, cols=32, oblique=False)
    masks = np.zeros((4, 32, 32, 2), dtype=bool)
    masks[1, 5:9, 5:9, 0] = True
    masks[2, 10:12, 10:12, 1] = True
    seg = build_segmentation(src, masks, seg_card, MODEL_UID, content_datetime=WHEN)
    assert len(seg.SegmentSequence) == len(seg_card.task.classes)
    for item, cls in zip(seg.SegmentSequence, seg_card.task.classes, strict=True):
        assert item.SegmentLabel == cls.label
        assert item.SegmentAlgorithmType == "AUTOMATIC"
        cat = item.SegmentedPropertyCategoryCodeSequence[0]
        typ = item.SegmentedPropertyTypeCodeSequence[0]
        assert (cat.CodeValue, cat.CodingSchemeDesignator) == (cls.category.value, "SCT")
        assert (typ.CodeValue, typ.CodeMeaning) == (cls.type.value, cls.type.meaning)
        algo = item.SegmentationAlgorithmIdentificationSequence[0]
        assert algo.AlgorithmName == seg_card.identity.name
        assert algo.AlgorithmVersion == seg_card.identity.version
        assert algo.AlgorithmSource == seg_card.identity.manufacturer
        family = algo.AlgorithmFamilyCodeSequence[0]
        assert (family.CodeValue, family.CodingSchemeDesignator) == ("123110", "DCM")
        assert family.CodeMeaning == "Artificial Intelligence"
        assert algo.AlgorithmParameters.split(",")[0] == f"model_uid={MODEL_UID}"
        assert "RecommendedDisplayCIELabValue" in item
    assert seg.SegmentSequence[0].RecommendedDisplayCIELabValue != seg.SegmentSequence[1].RecommendedDisplayCIELabValue

    equipment = seg.ContributingEquipmentSequence
    purposes = {e.PurposeOfReferenceCodeSequence[0].CodeValue for e in equipment}
    assert {"109101", "109102"} <= purposes  # acquisition (source) and processing
    node = [e for e in equipment if e.Manufacturer == "modelnode"]
    assert node and node[0].PurposeOfReferenceCodeSequence[0].CodeMeaning == "Processing Equipment"
    model = [e for e in equipment if e.get("DeviceSerialNumber") == MODEL_UID]
    assert model and model[0].ManufacturerModelName == seg_card.identity.name
    assert model[0].SoftwareVersions == seg_card.identity.version
    assert src[0].Manufacturer in {e.Manufacturer for e in equipment}


@pytest.mark.timeout(30)
def test_label_maps_probabilities_and_stacks_encode_the_same_segmentation(seg_card):
    src = ct_series(n=5, rows=24, cols=20, oblique=False)
    labels = np.zeros((5, 24, 20), dtype=np.uint8)
    labels[1:4, 4:12, 3:9] = 1
    labels[2, 15:20, 10:16] = 2
    stacked = np.stack([labels == 1, labels == 2], axis=-1)
    probs = np.where(stacked, 0.9, 0.1).astype(np.float32)
    probs[2, 15, 10, 1] = 0.5  # exactly at the card threshold counts as inside
    built = [
        build_segmentation(src, m, seg_card, MODEL_UID, content_datetime=WHEN)
        for m in (stacked, stacked.astype(np.uint8), labels, probs)
    ]
    for seg in built[1:]:
        assert seg.NumberOfFrames == built[0].NumberOfFrames
        assert seg.PixelData == built[0].PixelData


@pytest.mark.peers
@pytest.mark.timeout(60)
def test_empty_classes_still_make_a_valid_segmentation(tmp_path, seg_card):
    src = ct_series(n=4, rows=32, cols=32, oblique=False)
    uids = [ds.SOPInstanceUID for ds in src]
    # One class empty: its segment is described, it has no frames.
    masks = np.zeros((4, 32, 32, 2), dtype=bool)
    masks[1:3, 8:16, 8:16, 0] = True
    seg = build_segmentation(src, masks, seg_card, MODEL_UID, content_datetime=WHEN)
    assert seg.NumberOfFrames == 2
    assert len(seg.SegmentSequence) == 2
    path = save(seg, tmp_path / "one_empty.dcm")
    assert dciodvfy(path, "Segmentation") == []
    got = hd.seg.segread(path).get_pixels_by_source_instance(uids, segment_numbers=[1, 2])
    assert np.array_equal(got.astype(bool), masks)

    # Nothing found at all: highdicom keeps every (empty) frame, the object stays valid.
    empty = np.zeros((4, 32, 32), dtype=np.uint8)
    seg = build_segmentation(src, empty, seg_card, MODEL_UID, content_datetime=WHEN)
    assert seg.NumberOfFrames == 4 * 2
    path = save(seg, tmp_path / "all_empty.dcm")
    assert dciodvfy(path, "Segmentation") == []
    got = hd.seg.segread(path).get_pixels_by_source_instance(uids)
    assert got.shape == (4, 32, 32, 2) and not got.any()


@pytest.mark.peers
@pytest.mark.timeout(60)
def test_segmentation_of_radiographs(tmp_path, seg_card):
    # A synthetic DX and a real CR from pydicom-data (PixelSpacing 0\0, no Frame of Reference).
    cr = pydicom.dcmread(get_testdata_file("RG1_UNCR.dcm"))
    for name, image in (("dx", radiograph()), ("cr", cr)):
        rows, cols = image.Rows, image.Columns
        labels = np.zeros((rows, cols), dtype=np.uint8)
        labels[rows // 4 : rows // 2, cols // 5 : cols // 2] = 1
        labels[rows // 2 + 5 : rows // 2 + 12, 3:9] = 2
        seg = build_segmentation([image], labels, seg_card, MODEL_UID, content_datetime=WHEN)
        path = save(seg, tmp_path / f"{name}.dcm")
        warnings = dciodvfy(path, "Segmentation")
        # The real CR's own Referring Physician's Name is copied as it is; nothing else is amiss.
        assert [w for w in warnings if "Referring Physician" not in w] == [], warnings
        raw = pydicom.dcmread(path)
        assert "FrameOfReferenceUID" not in raw
        assert list(raw.PatientOrientation) == list(image.PatientOrientation)
        back = hd.seg.segread(path)
        got = back.get_pixels_by_source_instance([image.SOPInstanceUID], combine_segments=True)
        assert np.array_equal(got[0], labels)


@pytest.mark.peers
@pytest.mark.timeout(60)
def test_segmentation_of_a_multiframe_enhanced_ct(tmp_path, seg_card):
    ect = pydicom.dcmread(get_testdata_file("eCT_Supplemental.dcm"))  # real, 2 frames 512x512
    labels = np.zeros((2, ect.Rows, ect.Columns), dtype=np.uint8)
    labels[0, 100:200, 150:260] = 1
    labels[1, 300:320, 300:330] = 2
    seg = build_segmentation([ect], labels, seg_card, MODEL_UID, content_datetime=WHEN)
    path = save(seg, tmp_path / "ect.dcm")
    assert dciodvfy(path, "Segmentation") == []
    back = hd.seg.segread(path)
    got = back.get_pixels_by_source_frame(ect.SOPInstanceUID, [1, 2], combine_segments=True)
    assert np.array_equal(got, labels)


@pytest.mark.peers
@pytest.mark.timeout(60)
def test_sources_missing_type2_attributes_still_give_valid_results(tmp_path, seg_card, cls_card):
    src = ct_series(n=3, rows=16, cols=16, oblique=False)
    for ds in src:
        for kw in ("PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID", "ReferringPhysicianName"):
            delattr(ds, kw)
    masks = np.zeros((3, 16, 16, 2), dtype=bool)
    masks[1, 4:8, 4:8, 0] = True
    # An empty Study ID is legal; dciodvfy only notes that a DICOMDIR would want one.
    seg = build_segmentation(src, masks, seg_card, MODEL_UID)
    warnings = dciodvfy(save(seg, tmp_path / "seg.dcm"), "Segmentation")
    assert [w for w in warnings if "DICOMDIR - Study ID" not in w] == [], warnings
    sr = build_classification_sr(src, [0.1, 0.2, 0.3, 0.4], cls_card, MODEL_UID)
    warnings = dciodvfy(save(sr, tmp_path / "sr.dcm"), "Comprehensive3DSR")
    assert [w for w in warnings if "DICOMDIR - Study ID" not in w] == [], warnings
    # The caller's datasets are neither stripped of pixels nor given the filled-in attributes.
    assert all("PixelData" in ds and "PatientSex" not in ds for ds in src)


@pytest.mark.timeout(30)
def test_bad_masks_are_refused(seg_card, cls_card):
    src = ct_series(n=3, rows=16, cols=16, oblique=False)
    good = np.zeros((3, 16, 16, 2), dtype=bool)
    cases = [
        np.zeros((2, 16, 16, 2), dtype=bool),  # a slice missing
        np.zeros((3, 16, 15, 2), dtype=bool),  # model grid, not resampled back
        np.zeros((3, 16, 16, 3), dtype=bool),  # class count differs from the card
        np.full((3, 16, 16), 3, dtype=np.uint8),  # label beyond the card's classes
        np.full((3, 16, 16, 2), 2, dtype=np.uint8),  # stacked but not binary
        np.full((3, 16, 16, 2), np.nan, dtype=np.float32),
        np.zeros((3, 16, 16), dtype=np.float32),  # a label map must be integers
    ]
    for masks in cases:
        with pytest.raises(ResultError):
            build_segmentation(src, masks, seg_card, MODEL_UID)
    with pytest.raises(ResultError):
        build_segmentation(src, good, cls_card, MODEL_UID)  # not a segmentation model
    with pytest.raises(ResultError):
        build_segmentation([], good, seg_card, MODEL_UID)


# --------------------------------------------------------------------------- UIDs


@pytest.mark.timeout(30)
def test_result_uids_are_deterministic_so_a_rerun_replaces_the_result(seg_card, cls_card):
    series = "1.2.826.0.1.3680043.8.498.1"
    a = result_uids(series, MODEL_UID, "SEG")
    assert a == result_uids(series, MODEL_UID, "SEG")
    assert a[0] != a[1]
    others = {
        result_uids(series, MODEL_UID, "SR"),
        result_uids(series, OTHER_MODEL_UID, "SEG"),
        result_uids(series + "1", MODEL_UID, "SEG"),
    }
    assert a not in others and len(others) == 3
    for uid in (*a, *(u for pair in others for u in pair)):
        assert uid.startswith("2.25.") and len(uid) <= 64 and uid.is_valid
    with pytest.raises(ValueError):
        result_uids(series, MODEL_UID, "PR")  # type: ignore[arg-type]

    src = ct_series(n=3, rows=16, cols=16, oblique=False)
    masks = np.zeros((3, 16, 16, 2), dtype=bool)
    masks[1, 2:5, 2:5, 0] = True
    first = build_segmentation(src, masks, seg_card, MODEL_UID)
    again = build_segmentation(src, masks, seg_card, MODEL_UID)
    other = build_segmentation(src, masks, seg_card, OTHER_MODEL_UID)
    assert (first.SeriesInstanceUID, first.SOPInstanceUID) == (again.SeriesInstanceUID, again.SOPInstanceUID)
    assert (first.SeriesInstanceUID, first.SOPInstanceUID) == result_uids(src[0].SeriesInstanceUID, MODEL_UID, "SEG")
    assert other.SOPInstanceUID != first.SOPInstanceUID

    dx = radiograph()
    p = [0.1, 0.7, 0.1, 0.1]
    sr1 = build_classification_sr([dx], p, cls_card, MODEL_UID)
    sr2 = build_classification_sr([dx], p, cls_card, MODEL_UID)
    assert (sr1.SeriesInstanceUID, sr1.SOPInstanceUID) == (sr2.SeriesInstanceUID, sr2.SOPInstanceUID)
    assert (sr1.SeriesInstanceUID, sr1.SOPInstanceUID) == result_uids(dx.SeriesInstanceUID, MODEL_UID, "SR")

    long = parse_card(segmentation_card_dict(name="n" * 64, version="v" * 64))
    assert len(result_series_description(long)) == 64


# --------------------------------------------------------------------------- SR


def _text_values(ds: Dataset, code_value: str) -> list[str]:
    """TEXT/UIDREF values of every content item named ``code_value``, anywhere in the tree."""
    out = []
    for item in ds.get("ContentSequence", []):
        if item.ConceptNameCodeSequence[0].CodeValue == code_value:
            out.append(str(item.get("TextValue", item.get("UID", ""))))
        out.extend(_text_values(item, code_value))
    return out


def presence_of(group: hd.sr.MeasurementsAndQualitativeEvaluations) -> hd.sr.CodedConcept:
    """The value of the group's "Presence of property" (DCM 121052) evaluation."""
    (item,) = [q for q in group.get_qualitative_evaluations() if q.name.value == "121052"]
    return item.value


@pytest.mark.peers
@pytest.mark.timeout(60)
def test_classification_sr_of_a_radiograph(tmp_path, cls_card):
    dx = radiograph()
    probs = {"head": 0.05, "chest": 0.82, "abdomen": 0.1, "pelvis": 0.03}
    sr = build_classification_sr([dx], probs, cls_card, MODEL_UID, content_datetime=WHEN)
    path = save(sr, tmp_path / "sr.dcm")
    assert dciodvfy(path, "Comprehensive3DSR") == []

    back = hd.sr.srread(path)
    assert isinstance(back, hd.sr.Comprehensive3DSR)
    assert back.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"
    groups = back.content.get_image_measurement_groups()
    assert [g.tracking_identifier for g in groups] == ["chest", "abdomen", "head", "pelvis"]
    top = groups[0]
    assert top.finding_type.value == codes.SCT.Chest.value
    assert top.finding_category.value == "91723000"
    assert top.finding_sites == []  # the class is itself the anatomy
    (measurement,) = top.get_measurements()
    assert measurement.name.value == "111012"  # Certainty of Finding
    assert measurement.unit.value == "%"
    assert measurement.value == pytest.approx(82.0)
    presence = [presence_of(g).value for g in groups]
    assert presence == ["121053", "121054", "121054", "121054"]  # Present, then Absent
    refs = {img.referenced_sop_instance_uid for g in groups for img in g.source_images}
    assert refs == {dx.SOPInstanceUID}

    # Algorithm Identification (TID 4019) in every group, model UID in its parameters; the
    # model is also the device observer.
    raw = pydicom.dcmread(path)
    assert _text_values(raw, "111002") == [f"model_uid={MODEL_UID}"] * 4
    assert _text_values(raw, "111001") == [cls_card.identity.name] * 4
    assert _text_values(raw, "111003") == [cls_card.identity.version] * 4
    assert MODEL_UID in _text_values(raw, "121012")  # Device Observer UID
    # Image Library names the source; the evidence sequence does too.
    assert dx.SOPInstanceUID in {
        item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
        for lib in raw.ContentSequence
        if lib.ConceptNameCodeSequence[0].CodeValue == "111028"  # Image Library
        for group in lib.ContentSequence
        for item in group.ContentSequence
        if "ReferencedSOPSequence" in item
    }
    evidence = raw.CurrentRequestedProcedureEvidenceSequence[0]
    assert evidence.StudyInstanceUID == dx.StudyInstanceUID
    assert evidence.ReferencedSeriesSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == dx.SOPInstanceUID
    purposes = {e.PurposeOfReferenceCodeSequence[0].CodeValue for e in raw.ContributingEquipmentSequence}
    assert "109102" in purposes
    assert MODEL_UID in {e.get("DeviceSerialNumber") for e in raw.ContributingEquipmentSequence}
    assert raw.PatientID == dx.PatientID and raw.StudyInstanceUID == dx.StudyInstanceUID
    assert (raw.CompletionFlag, raw.VerificationFlag) == ("COMPLETE", "UNVERIFIED")
    assert raw.SeriesDescription == "AI test-body-part 2.1.0"


@pytest.mark.peers
@pytest.mark.timeout(60)
def test_classification_sr_of_a_real_cr_and_of_a_ct_series(tmp_path, cls_card):
    # The real CR lacks ImagerPixelSpacing, which highdicom's Image Library entry needs: the SR
    # is made without the library and still references the image from every group.
    cr = pydicom.dcmread(get_testdata_file("RG1_UNCR.dcm"))
    sr = build_classification_sr([cr], np.array([0.7, 0.1, 0.1, 0.1]), cls_card, MODEL_UID)
    path = save(sr, tmp_path / "cr_sr.dcm")
    warnings = dciodvfy(path, "Comprehensive3DSR")
    assert [w for w in warnings if "Referring Physician" not in w] == [], warnings
    groups = hd.sr.srread(path).content.get_image_measurement_groups()
    assert groups[0].finding_type.value == codes.SCT.Head.value
    assert all(cr.SOPInstanceUID in {i.referenced_sop_instance_uid for i in g.source_images} for g in groups)

    # A volume classifier on a CT series: the library lists every slice.
    src = ct_series(n=4, rows=16, cols=16)
    sr = build_classification_sr(src, [0.1, 0.2, 0.6, 0.1], cls_card, MODEL_UID, top_k=2)
    path = save(sr, tmp_path / "ct_sr.dcm")
    assert dciodvfy(path, "Comprehensive3DSR") == []
    back = hd.sr.srread(path)
    groups = back.content.get_image_measurement_groups()
    assert [g.tracking_identifier for g in groups] == ["abdomen", "chest"]
    assert {i.referenced_sop_instance_uid for i in groups[0].source_images} == {d.SOPInstanceUID for d in src}

    # A long series is listed once, in the Image Library, instead of in every group.
    src = ct_series(n=GROUP_SOURCE_LIMIT + 4, rows=8, cols=8)
    sr = build_classification_sr(src, [0.1, 0.2, 0.6, 0.1], cls_card, MODEL_UID)
    path = save(sr, tmp_path / "long_sr.dcm")
    assert dciodvfy(path, "Comprehensive3DSR") == []
    back = hd.sr.srread(path)
    assert all(g.source_images == [] for g in back.content.get_image_measurement_groups())
    library = [i for i in back.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "111028"]
    listed = {
        entry.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
        for group in library[0].ContentSequence
        for entry in group.ContentSequence
        if "ReferencedSOPSequence" in entry
    }
    assert listed == {d.SOPInstanceUID for d in src}


@pytest.mark.timeout(30)
def test_sigmoid_heads_mark_every_class_over_its_threshold(cls_card):
    data = classification_card_dict()
    data["task"]["activation"] = "sigmoid"
    data["task"]["classes"].append(
        {
            "label": "nodule",
            "category": {"value": "49755003", "scheme": "SCT", "meaning": "Morphologically Altered Structure"},
            "type": {"value": "27925004", "scheme": "SCT", "meaning": "Nodule"},
            "threshold": 0.3,
        }
    )
    card = parse_card(data)
    sr = build_classification_sr(
        [radiograph()], {"head": 0.1, "chest": 0.9, "abdomen": 0.5, "pelvis": 0.2, "nodule": 0.35}, card, MODEL_UID
    )
    groups = hd.sr.Comprehensive3DSR.from_dataset(sr).content.get_image_measurement_groups()
    present = {g.tracking_identifier: presence_of(g).meaning for g in groups}
    assert present == {"chest": "Present", "abdomen": "Present", "nodule": "Present", "head": "Absent", "pelvis": "Absent"}
    nodule = next(g for g in groups if g.tracking_identifier == "nodule")
    # A finding (not an anatomy class) is sited on the card's target anatomy.
    assert [s.value.value for s in nodule.finding_sites] == ["38866009"]


@pytest.mark.timeout(30)
def test_bad_probabilities_are_refused(cls_card, seg_card):
    dx = radiograph()
    for probs in (
        [0.5, 0.5],  # too few
        {"head": 0.5, "chest": 0.5, "abdomen": 0.0},  # a class missing
        {"head": 0.5, "chest": 0.5, "abdomen": 0.0, "pelvis": 0.0, "foot": 0.0},
        [1.5, 0.0, 0.0, 0.0],
        [float("nan"), 0.0, 0.0, 1.0],
        [-3.0, 2.0, 1.0, 0.5],  # logits: apply the activation first
    ):
        with pytest.raises(ResultError):
            build_classification_sr([dx], probs, cls_card, MODEL_UID)
    with pytest.raises(ResultError):
        build_classification_sr([dx], [1.0, 0.0], seg_card, MODEL_UID)


@pytest.mark.timeout(60)
def test_fast_overlap_check_agrees_with_highdicom(seg_card):
    """iods.results replaces highdicom's SegmentsOverlap check for stacked boolean masks; it must
    give highdicom's answer, and highdicom must still call it by that name."""
    from iods.results import _Segmentation

    assert "_check_and_cast_pixel_array" in vars(hd.seg.Segmentation), "highdicom renamed its pixel check"
    numbers = np.array([1, 2])
    binary = hd.seg.SegmentationTypeValues.BINARY
    disjoint = np.zeros((3, 16, 16, 2), bool)
    disjoint[0, :4, :4, 0] = disjoint[1, 8:, 8:, 1] = True
    overlapping = disjoint.copy()
    overlapping[1, 8, 8, 0] = True
    for masks, expected in ((disjoint, "NO"), (overlapping, "YES"), (np.zeros_like(disjoint), "NO")):
        ours = _Segmentation._check_and_cast_pixel_array(masks, numbers, binary, np.uint8)
        theirs = hd.seg.Segmentation._check_and_cast_pixel_array(masks, numbers, binary, np.uint8)
        assert ours[1] == theirs[1] == hd.seg.SegmentsOverlapValues(expected)
        assert ours[0].dtype == theirs[0].dtype and np.array_equal(ours[0], theirs[0])

    src = ct_series(n=3, rows=16, cols=16)
    for masks, expected in ((disjoint, "NO"), (overlapping, "YES")):
        seg = build_segmentation(src, masks, seg_card, MODEL_UID, content_datetime=WHEN)
        assert seg.SegmentsOverlap == expected


@pytest.mark.parametrize("name,label", [
    ("byom-monai-unet-ras", "BYOM_MONAI_UNET"),  # the 16th character is a dash: cut, then stripped
    ("modelnode-lung-unet", "MODELNODE_LUNG_U"),
    ("--x--", "X"),
    ("äöü", "AI_RESULT"),
])
def test_content_label_is_a_valid_code_string(name, label):
    from iods.results import _content_label

    assert _content_label(name) == label
    # What highdicom checks before it accepts a ContentLabel (CS: no trailing space or underscore).
    assert re.fullmatch(r"[A-Z0-9_ ]{1,16}", label) and not label.endswith(("_", " "))
