"""The shipped reference models and the phantom generators behind them.

* ONNX export parity with PyTorch (skipped where torch is not installed: the node never needs it);
* the shipped model objects, unpacked with ``modelnode models unpack``, run under ONNX Runtime on
  freshly generated studies (seeds never used in training) and meet the quality bars against the
  generators' truth: lung Dice >= 0.95, body-part accuracy >= 0.95;
* the generators are deterministic and write valid DICOM with sane geometry;
* the serving path (generators, preprocessing, CLI) imports without torch.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pydicom
import pytest

from iods.card import load_card
from models.preprocess import prepare, prepare_dataset, resize, to_masks, value_range
from models.training import phantoms
from models.volume import load_volume

ROOT = Path(__file__).resolve().parent.parent
REFERENCE = ROOT / "models" / "reference"
CT_TEST_SEED = 9001  # training uses 1000-1071, held-out evaluation 5000-5015
XR_TEST_SEEDS = range(90000, 90024)  # training 0-359, held-out 50000-50099


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    s = int(a.sum()) + int(b.sum())
    return 1.0 if s == 0 else 2.0 * int(np.logical_and(a, b).sum()) / s


def _unpack(name: str, tmp_path: Path) -> tuple[ort.InferenceSession, object]:
    """``modelnode models unpack`` the shipped object; return an ORT session and its card."""
    src = REFERENCE / f"{name}.dcm"
    out = tmp_path / f"{name}.onnx"
    card_json = tmp_path / f"{name}.json"
    env = {**os.environ, "MODELNODE_DATA_DIR": str(tmp_path / "data")}
    env.pop("MODELNODE_CONFIG", None)
    res = subprocess.run(
        [sys.executable, "-m", "node.cli", "models", "unpack", str(src), "-o", str(out), "--card-out", str(card_json)],
        capture_output=True, text=True, env=env, timeout=60, cwd=ROOT,
    )
    assert res.returncode == 0, f"rc={res.returncode}\n{res.stdout}\n{res.stderr}"
    from iods.card import card_from_json

    card = card_from_json(card_json.read_text())
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    return ort.InferenceSession(str(out), sess_options=opts, providers=["CPUExecutionProvider"]), card


def _run(session: ort.InferenceSession, x: np.ndarray, batch: int = 16) -> np.ndarray:
    name = session.get_inputs()[0].name
    return np.concatenate([session.run(None, {name: x[i:i + batch]})[0] for i in range(0, len(x), batch)])


# --------------------------------------------------------------------------- parity


@pytest.mark.timeout(120)
def test_onnx_export_matches_pytorch(tmp_path):
    torch = pytest.importorskip("torch")
    from models.training.networks import BodyPartNet, UNet2D, WithActivation
    from models.training.train import export_onnx

    torch.manual_seed(0)
    nets = {"segmentation": UNet2D(1, 2, (12, 24, 48, 96)), "classification": BodyPartNet(1, 5)}
    rng = np.random.default_rng(0)
    for task, net in nets.items():
        # Non-trivial BatchNorm statistics, so folding them into the convolutions is exercised.
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.data.uniform_(0.5, 1.5)
                m.bias.data.uniform_(-0.2, 0.2)
        net.eval()
        path = export_onnx(net, tmp_path / f"{task}.onnx", task=task)
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        wrapped = WithActivation(net, "sigmoid" if task == "segmentation" else "softmax").eval()
        # Dynamic batch and (for both graphs) spatial axes: sizes other than the export's.
        for shape in [(1, 1, 128, 128), (3, 1, 128, 128), (2, 1, 96, 160)]:
            x = rng.random(shape, np.float32)
            with torch.no_grad():
                ref = wrapped(torch.from_numpy(x)).numpy()
            got = session.run(None, {"image": x})[0]
            assert got.shape == ref.shape
            assert float(np.abs(got - ref).max()) < 1e-4, (task, shape)


# --------------------------------------------------------------------------- shipped models


@pytest.mark.timeout(90)
def test_shipped_lung_unet_meets_dice_bar_on_fresh_study(tmp_path):
    session, card = _unpack("lung_unet", tmp_path)
    assert card.task.type == "segmentation" and [c.label for c in card.task.classes] == ["lung", "nodule"]
    assert card.provenance.performance["dice_lung_mean"] >= 0.95

    paths = phantoms.write_ct_series(tmp_path / "ct", CT_TEST_SEED)
    truth = phantoms.ct_truth(CT_TEST_SEED)
    # As the node does it: read the files, order and rescale with models.volume, preprocess per the card.
    vol = load_volume([pydicom.dcmread(p) for p in paths], rescale=card.input.preprocessing.rescale)
    x = prepare(vol.pixels, card.input.preprocessing, photometric=vol.photometric,
                value_range=value_range(vol.datasets[0]))
    assert x.shape[1:] == (1, *card.input.size)
    probs = _run(session, x)
    assert probs.shape == (len(paths), 2, *card.input.size) and 0.0 <= probs.min() and probs.max() <= 1.0
    masks = to_masks(probs, [c.threshold for c in card.task.classes], size=vol.shape[1:])
    by_uid = truth.by_uid()
    lung_truth = np.stack([by_uid[str(ds.SOPInstanceUID)][0] for ds in vol.datasets])
    dice = _dice(masks[:, 0], lung_truth)
    assert dice >= 0.95, f"lung Dice {dice:.4f} on seed {CT_TEST_SEED}"


@pytest.mark.timeout(90)
def test_shipped_bodypart_cnn_accuracy_on_fresh_radiographs(tmp_path):
    session, card = _unpack("bodypart_cnn", tmp_path)
    labels = [c.label for c in card.task.classes]
    assert labels == list(phantoms.RADIOGRAPH_LABELS)
    xs, truth = [], []
    for seed in XR_TEST_SEEDS:
        for label in labels:
            path = phantoms.write_radiograph(tmp_path / "xr" / f"{label}-{seed}.dcm", seed, label)
            xs.append(prepare_dataset(pydicom.dcmread(path), card.input.preprocessing))
            truth.append(labels.index(label))
    probs = _run(session, np.concatenate(xs), batch=32)
    assert np.allclose(probs.sum(axis=1), 1.0, atol=1e-4)
    accuracy = float((probs.argmax(axis=1) == np.array(truth)).mean())
    assert accuracy >= 0.95, f"body-part accuracy {accuracy:.3f} on {len(truth)} fresh radiographs"


@pytest.mark.timeout(30)
def test_shipped_cards_are_valid_and_small():
    for name in ("lung_unet", "bodypart_cnn", "thorax_unet3d"):
        card = load_card(REFERENCE / f"{name}.toml")
        assert card.identity.uid.startswith("2.25.")
        assert card.provenance.seed is not None and "train_reference" in card.provenance.training_command
        ds = pydicom.dcmread(REFERENCE / f"{name}.dcm", stop_before_pixels=True)
        assert ds.SOPInstanceUID == card.identity.uid  # the TOML is the card packed in the object
        assert (REFERENCE / f"{name}.dcm").stat().st_size < 4 * 2**20


# --------------------------------------------------------------------------- generators


@pytest.mark.timeout(60)
def test_ct_generator_is_deterministic_and_writes_sane_dicom(tmp_path):
    a = phantoms.ct_chest_volume(4242, slices=12, nodules=2)
    b = phantoms.ct_chest_volume(4242, slices=12, nodules=2)
    assert a.hu.tobytes() == b.hu.tobytes() and np.array_equal(a.lung_mask, b.lung_mask)
    assert a.hu.tobytes() != phantoms.ct_chest_volume(4243, slices=12, nodules=2).hu.tobytes()
    assert a.hu.dtype == np.int16 and a.hu.shape == (12, 256, 256)
    assert a.nodule_mask.any() and not np.any(a.nodule_mask & ~a.lung_mask)
    lung_hu = a.hu[a.lung_mask & ~a.nodule_mask].astype(float)
    assert -950 < np.median(lung_hu) < -750

    first = phantoms.write_ct_series(tmp_path / "a", 4242, slices=12, nodules=2)
    again = phantoms.write_ct_series(tmp_path / "b", 4242, slices=12, nodules=2)
    assert [p.read_bytes() for p in first] == [p.read_bytes() for p in again]
    dss = [pydicom.dcmread(p) for p in first]
    assert len({ds.SeriesInstanceUID for ds in dss}) == 1 and len({ds.SOPInstanceUID for ds in dss}) == 12
    for k, ds in enumerate(dss):
        assert ds.SOPClassUID == pydicom.uid.CTImageStorage and ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
        assert ds.Modality == "CT" and ds.BodyPartExamined == "CHEST" and ds.StudyDescription == "CT THORAX"
        assert [float(v) for v in ds.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
        assert ds.InstanceNumber == k + 1 and ds.RescaleType == "HU" and ds.FrameOfReferenceUID
        hu = ds.pixel_array.astype(np.int32) * int(ds.RescaleSlope) + int(ds.RescaleIntercept)
        assert np.array_equal(hu, a.hu[k])  # the file holds exactly the generated HU
        assert np.allclose([float(v) for v in ds.PixelSpacing], a.spacing[1:], atol=1e-4)
    z = np.array([float(ds.ImagePositionPatient[2]) for ds in dss])
    assert np.allclose(np.diff(z), float(dss[0].SpacingBetweenSlices), atol=1e-3)
    assert np.allclose(np.diff(z), a.spacing[0], atol=1e-3)
    # Both lungs appear, one on each side of the image.
    mid = a.lung_mask[len(a.hu) // 2]
    assert mid[:, :128].sum() > 0 and mid[:, 128:].sum() > 0
    vol = load_volume(dss)
    assert vol.spacing[0] == pytest.approx(a.spacing[0], abs=1e-3)
    assert np.array_equal(vol.pixels, a.hu.astype(np.float32))  # node's slice order = array order

    truth = phantoms.ct_truth(4242, slices=12, nodules=2)
    assert np.array_equal(truth.lung, a.lung_mask) and np.array_equal(truth.nodule, a.nodule_mask)
    assert truth.sop_instance_uids == [str(ds.SOPInstanceUID) for ds in dss]


@pytest.mark.timeout(60)
def test_large_ct_option_and_nodule_truth():
    p = phantoms.ct_chest_params(77, shape=(200, 512, 512), nodules=3)
    assert p.shape == (200, 512, 512) and 1.0 <= p.spacing[0] <= 2.0 and p.spacing[1] < 1.0
    assert len(p.nodules) == 3
    # Render only the slices through the first nodule: its truth is a ball of the right size.
    n = p.nodules[0]
    reach = int(np.ceil(n.radius_mm / p.spacing[0]))
    ks = range(max(0, int(n.center[0]) - reach), min(200, int(n.center[0]) + reach + 2))
    voxels = sum(int(nod.sum()) for _, _, _, nod in phantoms.ct_chest_slices(p, ks))
    expected = 4 / 3 * np.pi * n.radius_mm ** 3 / (p.spacing[0] * p.spacing[1] * p.spacing[2])
    assert 0.7 * expected < voxels < 1.3 * expected


@pytest.mark.timeout(60)
def test_radiograph_generator_is_deterministic_and_writes_valid_cr_dx(tmp_path):
    for label in phantoms.RADIOGRAPH_LABELS:
        a = phantoms.radiograph(7, label)
        assert a.label == label and a.image.dtype == np.uint16
        assert a.image.tobytes() == phantoms.radiograph(7, label).image.tobytes()
        assert a.image.tobytes() != phantoms.radiograph(8, label).image.tobytes()
        assert int(a.image.max()) < 1 << a.bits_stored
    photometrics = set()
    for modality in ("CR", "DX"):
        for seed in range(3):
            path = phantoms.write_radiograph(tmp_path / f"{modality}{seed}.dcm", seed, "chest", modality=modality)
            again = phantoms.write_radiograph(tmp_path / f"{modality}{seed}-again.dcm", seed, "chest", modality=modality)
            assert path.read_bytes() == again.read_bytes()
            ds = pydicom.dcmread(path)
            expected = pydicom.uid.ComputedRadiographyImageStorage if modality == "CR" else \
                pydicom.uid.DigitalXRayImageStorageForPresentation
            assert ds.SOPClassUID == expected and ds.Modality == modality and ds.BodyPartExamined == "CHEST"
            assert ds.ViewPosition in ("PA", "AP") and len(ds.ImagerPixelSpacing) == 2
            if modality == "DX":
                assert ds.PresentationIntentType == "FOR PRESENTATION"
            assert np.array_equal(ds.pixel_array, phantoms.radiograph(seed, "chest").image)
            photometrics.add(ds.PhotometricInterpretation)
    assert photometrics <= {"MONOCHROME1", "MONOCHROME2"}
    # MONOCHROME1 inversion: the preprocessed image is the same whichever way it is stored.
    img = phantoms.radiograph(3, "pelvis")
    pp = load_card(REFERENCE / "bodypart_cnn.toml").input.preprocessing
    vr = (0.0, float((1 << img.bits_stored) - 1))
    other = "MONOCHROME1" if img.photometric == "MONOCHROME2" else "MONOCHROME2"
    a = prepare(img.image, pp, photometric=img.photometric, value_range=vr)
    b = prepare(vr[1] - img.image.astype(np.float32), pp, photometric=other, value_range=vr)
    assert np.allclose(a, b, atol=1e-5)


@pytest.mark.timeout(30)
def test_preprocessing_resampling_round_trip():
    # Linear resampling with half-pixel centres preserves constants and the mean when shrinking.
    x = np.random.default_rng(0).random((2, 256, 200)).astype(np.float32)
    small = resize(x, (128, 100))
    assert small.shape == (2, 128, 100)
    assert np.allclose(small.mean(axis=(1, 2)), x.mean(axis=(1, 2)), atol=1e-3)
    assert np.allclose(resize(np.ones((3, 7), np.float32), (11, 5)), 1.0)
    masks = to_masks(np.full((2, 2, 16, 16), 0.7, np.float32), [0.5, 0.8], size=(64, 64))
    assert masks.shape == (2, 2, 64, 64) and masks[:, 0].all() and not masks[:, 1].any()


@pytest.mark.timeout(60)
def test_serving_path_needs_no_torch(tmp_path):
    # A finder that refuses torch: generators, preprocessing, volume loading and the CLI must not care.
    code = textwrap.dedent(f"""
        import sys
        class NoTorch:
            def find_spec(self, name, path=None, target=None):
                if name == "torch" or name.startswith("torch."):
                    raise ImportError("torch is not installed (simulated)")
        sys.meta_path.insert(0, NoTorch())
        import models.training.phantoms, models.preprocess, models.volume, models.runtime, node.cli
        models.training.phantoms.write_ct_series({str(tmp_path / 'ct')!r}, 1, slices=2)
        assert "torch" not in sys.modules
        print("ok")
    """)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=50, cwd=ROOT)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr
