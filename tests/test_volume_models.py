"""3D models with exclusive classes through models.infer: windows, orientation, spacing,
enhanced multi-frame sources, and series that do not fit the card.

The network is onnx_factory.intensity_classes_model, a real ONNX graph whose labels can be
computed in numpy, so every assertion compares with an independent truth.
"""

from __future__ import annotations

import copy

import highdicom as hd
import numpy as np
import pydicom
import pytest
from cards import volume_card_dict
from onnx_factory import intensity_classes_model, intensity_classes_truth

from iods.card import parse_card
from iods.results import build_segmentation
from models.infer import InputError, predict_segmentation
from models.runtime import RuntimeSettings, SessionCache
from models.training.phantoms import write_ct_series

pytestmark = pytest.mark.timeout(180)

SHAPE = (20, 96, 96)


@pytest.fixture(scope="module")
def series(tmp_path_factory):
    out = tmp_path_factory.mktemp("ct")
    paths = write_ct_series(out, 4242, shape=SHAPE)
    return [pydicom.dcmread(p) for p in paths]


@pytest.fixture(scope="module")
def sessions():
    return SessionCache(RuntimeSettings(providers=("CPUExecutionProvider",), intra_op_threads=2))


def _windowed(datasets) -> np.ndarray:
    """HU -> window -350/1500 -> [0, 1], slices in instance order (the phantom's +z order)."""
    ordered = sorted(datasets, key=lambda ds: int(ds.InstanceNumber))
    hu = np.stack([ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept) for ds in ordered])
    return np.clip((hu - (-350.0 - 750.0)) / 1500.0, 0.0, 1.0).astype(np.float32)


def _predict(datasets, card_dict, sessions, *, shift=False, name="m"):
    card = parse_card(card_dict)
    loaded = sessions.get(f"{name}-{shift}", intensity_classes_model(shift=shift))
    return predict_segmentation(datasets, card, loaded)


@pytest.mark.parametrize("orientation,blending", [("RAS", "gaussian"), ("LPS", "constant"), ("", "gaussian")])
def test_window_labels_are_the_truth(series, sessions, orientation, blending):
    sources, labels = _predict(series, volume_card_dict(orientation=orientation, blending=blending), sessions)
    truth = intensity_classes_truth(_windowed(series))
    assert labels.dtype == np.uint8 and labels.shape == SHAPE
    assert [int(ds.InstanceNumber) for ds in sources] == list(range(1, SHAPE[0] + 1))
    agree = float((labels == truth).mean())
    assert agree > 0.9999, agree
    assert set(np.unique(labels)) == {0, 1, 2, 3}


@pytest.mark.parametrize("orientation,offset", [
    ("RAS", (0, 0, 1)),   # network axis 0 increases to the Right = towards lower column index
    ("LPS", (0, 0, -1)),  # to the Left = higher column index
    ("PLS", (0, -1, 0)),  # to Posterior = higher row index
    ("", (-1, 0, 0)),     # acquisition grid: along the slices
])
def test_orientation_decides_which_way_the_network_looks(series, sessions, orientation, offset):
    """The shift graph labels a voxel by its neighbour one step back along network axis 0: where
    that neighbour lies in the source grid proves the volume was oriented as the card says."""
    _, labels = _predict(series, volume_card_dict(orientation=orientation, window=None), sessions, shift=True)
    base = intensity_classes_truth(_windowed(series))
    expected = np.roll(base, shift=tuple(-o for o in offset), axis=(0, 1, 2))
    inner = tuple(slice(1, -1) for _ in range(3))
    agree = float((labels[inner] == expected[inner]).mean())
    assert agree > 0.9999, (orientation, agree)


def test_target_spacing_maps_back_to_the_source_grid(series, sessions):
    d = volume_card_dict()
    d["input"]["preprocessing"]["resample_spacing"] = [2.0, 2.0, 2.0]
    _, labels = _predict(series, d, sessions)
    truth = intensity_classes_truth(_windowed(series))
    assert labels.shape == SHAPE
    agree = float((labels == truth).mean())
    assert 0.9 < agree < 1.0, agree  # coarser grid: the edges move, the anatomy stays


def test_enhanced_multiframe_ct_gives_the_same_labels_in_frame_order(series, sessions):
    ordered = sorted(series, key=lambda ds: int(ds.InstanceNumber))
    # Frames deliberately out of patient order: the loader sorts by per-frame position.
    shuffled = [ordered[i] for i in np.random.default_rng(5).permutation(len(ordered))]
    enhanced = hd.legacy.LegacyConvertedEnhancedCTImage(
        shuffled, series_instance_uid=hd.UID(), series_number=99, sop_instance_uid=hd.UID(), instance_number=1)
    enhanced = pydicom.dcmread(pydicom.filebase.DicomBytesIO(_encode(enhanced)))
    assert "ImagePositionPatient" not in enhanced and int(enhanced.NumberOfFrames) == SHAPE[0]
    card = volume_card_dict()
    sources, labels = _predict([enhanced], card, sessions)
    assert len(sources) == 1 and labels.shape == SHAPE
    _, reference = _predict(series, card, sessions)
    # Frame i of the enhanced image is the slice at its PlanePositionSequence.
    z_of_frame = [float(f.PlanePositionSequence[0].ImagePositionPatient[2]) for f in enhanced.PerFrameFunctionalGroupsSequence]
    z_of_slice = [float(ds.ImagePositionPatient[2]) for ds in ordered]
    for frame, z in enumerate(z_of_frame):
        np.testing.assert_array_equal(labels[frame], reference[z_of_slice.index(z)])
    seg = build_segmentation(sources, labels, parse_card(card), "1.2.3.4")
    assert len(seg.SegmentSequence) == 3


def _encode(ds) -> bytes:
    buf = pydicom.filebase.DicomBytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def test_series_that_do_not_fit_the_card_are_refused_with_the_reason(series, sessions):
    d = volume_card_dict()
    d["input"]["min_slices"] = 64
    with pytest.raises(InputError, match="20 slice.*at least 64"):
        _predict(series, d, sessions)
    d = volume_card_dict()
    d["input"]["channels"] = 3
    with pytest.raises(InputError, match="1 sample.*3 channel"):
        _predict(series, d, sessions)
    stripped = [copy.deepcopy(ds) for ds in series]
    for ds in stripped:
        del ds.ImagePositionPatient
    with pytest.raises(InputError, match="oriented RAS.*no patient geometry"):
        _predict(stripped, volume_card_dict(), sessions)


def test_a_window_graph_that_changes_the_size_is_refused(series, sessions):
    """A graph that does not keep the window's size (not a segmentation network) is named."""
    from onnx_factory import segmentation_model  # 2D graph: rank 4, a 3D window cannot run it

    card = parse_card(volume_card_dict())
    loaded = sessions.get("wrong-rank", segmentation_model(classes=4))
    with pytest.raises(Exception, match="(?i)rank|dimension|shape"):
        predict_segmentation(series, card, loaded)
