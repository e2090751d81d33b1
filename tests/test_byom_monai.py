"""Bring your own model: a MONAI network, exported and checked with MONAI's own tools, runs in
the node and gives MONAI's labels.

What a MONAI user does, end to end:

1. build a network from ``monai.networks.nets`` (seeded weights) and export it with
   ``monai.networks.utils.convert_to_onnx`` (dynamic batch and spatial axes, verified against
   PyTorch under ONNX Runtime by MONAI itself);
2. write a model card from docs/model-object.md (exclusive classes with a background channel,
   logits, the network's axis codes, a sliding window) and pack it with ``modelnode models pack``;
3. register it in a running node (``modelnode models add``) and send a CT series with dcmtk
   ``storescu``; the node exports the SEG to a storage SCP started here.

The reference is MONAI's own pipeline on the very files sent: ``LoadImage(reader=
"PydicomReader")``, ``Orientation``, ``ScaleIntensityRange`` and ``sliding_window_inference``
whose predictor runs the same ONNX graph in ONNX Runtime; the argmax is brought back to the
DICOM grid by ``Orientation.inverse``. Labels must agree on >= 99.5% of voxels, and every class
MONAI finds in more than 1000 voxels must be in the SEG.

The weights are seeded, not trained: these untrained MONAI networks already give every class
over the chest (each at least 5% of the voxels for the seeds here), and because their instance
norms make each window's output depend on the whole window's content, a window placed or
weighted differently from MONAI's changes labels across the volume. That makes agreement a
strict test of window positions, importance map, orientation and intensity, which is what it
is for.
"""

from __future__ import annotations

import threading
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import highdicom as hd
import numpy as np
import onnxruntime as ort
import pydicom
import pytest
import torch
from monai.inferers import sliding_window_inference
from monai.networks.nets import BasicUNet, UNet
from monai.networks.utils import convert_to_onnx
from monai.transforms import LoadImage, Orientation, ScaleIntensityRange
from node_proc import NodeProcess, node_process, query
from peers import require, run
from pydicom.dataset import Dataset
from pynetdicom import AE, evt
from pynetdicom.sop_class import SegmentationStorage

from models.training.phantoms import write_ct_series

pytestmark = [pytest.mark.slow, pytest.mark.peers]

THREADS = 2  # ONNX Runtime threads on both sides, so neither side has more of the machine
AGREEMENT = 0.995
NONTRIVIAL = 1000  # voxels: a class MONAI finds in more than this must be in the SEG
PACS_AET = "BYOMPACS"
LABELMAP_SEGMENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.66.7"

CARD_TOML = """\
schema = "modelnode.card/1"

[identity]
name = "byom-{name}"
version = "1.0.0"
uid = ""
manufacturer = "modelnode tests"
licence = "Apache-2.0"
intended_use = "Test only: a MONAI network with seeded weights, brought by its user"
created = 2026-12-03

[target]
modalities = ["CT"]
body_parts = ["CHEST"]
anatomy = [{{ value = "51185008", scheme = "SCT", meaning = "Thorax" }}]

[task]
type = "segmentation"
exclusive = true
output = "logits"
activation = "softmax"
{classes}
[input]
layout = "3d"
channels = 1
size = [0, 0, 0]
dtype = "float32"
orientation = "{orientation}"
size_divisor = {divisor}

[input.preprocessing]
rescale = true
window = {{ center = {center}, width = {width} }}
normalize = "none"

[input.sliding_window]
size = {window}
overlap = 0.25
blending = "{blending}"
sigma_scale = 0.125
batch = {batch}
"""

# (label, SNOMED CT type): names only; the seeded network knows nothing of anatomy.
CLASSES = [("lung", "39607008", "Lung"), ("heart", "80891009", "Heart"), ("bone", "272673000", "Bone structure")]


@dataclass(frozen=True)
class Variant:
    name: str
    network: Callable[[], torch.nn.Module]  # out_channels = 1 + classes
    classes: int
    slices: int
    size: int
    orientation: str
    window: tuple[int, int, int]  # network axis order
    blending: str
    center: float
    width: float
    batch: int
    divisor: int
    seed: int  # phantom seed

    def card(self) -> str:
        classes = "".join(
            f'\n[[task.classes]]\nlabel = "{label}"\n'
            f'category = {{ value = "91723000", scheme = "SCT", meaning = "Anatomical Structure" }}\n'
            f'type = {{ value = "{code}", scheme = "SCT", meaning = "{meaning}" }}\n'
            for label, code, meaning in CLASSES[:self.classes])
        return CARD_TOML.format(name=self.name, classes=classes, orientation=self.orientation, divisor=self.divisor,
                                center=self.center, width=self.width, window=list(self.window),
                                blending=self.blending, batch=self.batch)


def _unet() -> torch.nn.Module:
    torch.manual_seed(0)
    # Narrow (4 to 16 channels) so the two runs over 120 x 512 x 512 stay near half a minute each on 2 cores.
    return UNet(spatial_dims=3, in_channels=1, out_channels=4, channels=(4, 8, 16), strides=(2, 2), num_res_units=1)


def _basic_unet() -> torch.nn.Module:
    torch.manual_seed(1)
    return BasicUNet(spatial_dims=3, in_channels=1, out_channels=3, features=(4, 4, 8, 16, 32, 4))


VARIANTS = [
    # The full case: a 120 x 512 x 512 chest CT, RAS as MONAI trains, Gaussian blending, a window
    # that is not a cube (an axis-order mix-up would show).
    Variant("unet-ras", _unet, classes=3, slices=120, size=512, orientation="RAS", window=(128, 128, 64),
            blending="gaussian", center=-200.0, width=1600.0, batch=1, divisor=4, seed=7301),
    # Cheaper, and every choice the other way: LPS, constant blending, a soft-tissue window, two
    # windows per run, and fewer slices (40) than the window is deep (48), so the volume is padded.
    Variant("basicunet-lps", _basic_unet, classes=2, slices=40, size=256, orientation="LPS", window=(96, 96, 48),
            blending="constant", center=40.0, width=400.0, batch=2, divisor=16, seed=7302),
]


# --------------------------------------------------------------------------- the user's side


def export_with_monai(net: torch.nn.Module, path: Path) -> Path:
    """``convert_to_onnx`` with dynamic batch and spatial axes; MONAI verifies the graph against
    PyTorch under ONNX Runtime. ``dynamo=False``: torch 2.13's default exporter needs onnxscript,
    which the node does not ship; the TorchScript exporter is exact for these networks."""
    axes = {0: "batch", 2: "x", 3: "y", 4: "z"}
    with warnings.catch_warnings():
        # Tracer and deprecation notices about shape checks inside MONAI's blocks, not errors.
        warnings.simplefilter("ignore")
        convert_to_onnx(net.eval(), inputs=[torch.rand(1, 1, 32, 32, 32)], input_names=["image"],
                        output_names=["logits"], dynamic_axes={"image": axes, "logits": axes}, filename=str(path),
                        opset_version=17, verify=True, use_ort=True, rtol=1e-3, atol=1e-5, dynamo=False)
    return path


def ort_session(path: Path) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = THREADS
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def monai_reference(series: Path, onnx_path: Path, v: Variant) -> tuple[np.ndarray, np.ndarray]:
    """MONAI's labels on the DICOM grid [slice, row, column] (slices ascending along the normal),
    and the HU volume LoadImage read, on the same grid."""
    image = LoadImage(reader="PydicomReader", ensure_channel_first=True, image_only=True)(str(series))
    # Axis codes in nibabel's sense (the card's): each letter is where the axis increases towards.
    orient = Orientation(axcodes=v.orientation, labels=(("L", "R"), ("P", "A"), ("I", "S")))
    x = orient(image)
    lo = v.center - v.width / 2
    x = ScaleIntensityRange(a_min=lo, a_max=lo + v.width, b_min=0.0, b_max=1.0, clip=True)(x)
    session = ort_session(onnx_path)

    def predictor(batch: torch.Tensor) -> torch.Tensor:
        # The exported graph, not the PyTorch module: both sides then run the same weights and ops.
        return torch.from_numpy(session.run(None, {"image": np.ascontiguousarray(batch.numpy())})[0])

    with torch.no_grad():
        logits = sliding_window_inference(x[None], v.window, v.batch, predictor, overlap=0.25, mode=v.blending,
                                          sigma_scale=0.125)
    labels = orient.inverse(logits[0].argmax(0, keepdim=True))
    assert np.allclose(labels.affine, image.affine), "Orientation.inverse did not restore the loaded grid"
    # PydicomReader's array is [column, row, slice] (swap_ij, as its other readers); checked
    # against pydicom below, so the transpose is a documented fact, not an assumption.
    return (np.asarray(labels[0]).transpose(2, 1, 0).astype(np.uint8),
            np.asarray(image[0]).transpose(2, 1, 0))


def hu_by_position(paths: list[Path]) -> tuple[np.ndarray, list[str]]:
    """HU [slice, row, column] stacked by pydicom, slices by position along the normal; and
    their SOP Instance UIDs in that order."""
    dss = [pydicom.dcmread(p) for p in paths]
    normal = np.cross(*np.asarray(dss[0].ImageOrientationPatient, float).reshape(2, 3))
    dss.sort(key=lambda ds: float(np.dot(normal, np.asarray(ds.ImagePositionPatient, float))))
    hu = np.stack([ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept) for ds in dss])
    return hu.astype(np.float32), [str(ds.SOPInstanceUID) for ds in dss]


# --------------------------------------------------------------------------- the PACS the node exports to


class SegReceiver:
    """A storage SCP on a free loopback port that keeps the first SEG it gets and signals it."""

    def __init__(self) -> None:
        self.received = threading.Event()
        self.seg: Dataset | None = None
        self.ae = AE(PACS_AET)
        self.ae.add_supported_context(SegmentationStorage)
        self.ae.add_supported_context(LABELMAP_SEGMENTATION_STORAGE)  # if [results] segmentation_type says so
        self.server = self.ae.start_server(("127.0.0.1", 0), block=False,
                                           evt_handlers=[(evt.EVT_C_STORE, self._store)])
        self.port = self.server.server_address[1]

    def _store(self, event: evt.Event) -> int:
        ds = event.dataset
        ds.file_meta = event.file_meta
        if self.seg is None:
            self.seg = ds
        self.received.set()
        return 0x0000

    def wait(self, node: NodeProcess, timeout: float) -> Dataset:
        """Wait for the SEG; give up early if the node died or failed the job, with its log."""
        deadline = time.monotonic() + timeout
        while not self.received.wait(1.0):
            failed = query(node, "SELECT error FROM job WHERE state = 'failed'")
            if failed or not node.alive() or time.monotonic() > deadline:
                raise AssertionError(f"no SEG after {timeout} s (failed jobs: {failed})\n{node.log()[-5000:]}")
        assert self.seg is not None
        return self.seg

    def stop(self) -> None:
        self.ae.shutdown()


@contextmanager
def seg_receiver() -> Iterator[SegReceiver]:
    r = SegReceiver()
    try:
        yield r
    finally:
        r.stop()


def seg_labels(seg_ds: Dataset, path: Path, source_uids: list[str], labels: list[str]) -> np.ndarray:
    """The SEG as a label map on the source grid (0 background, i the card's i-th class)."""
    seg_ds.save_as(path, enforce_file_format=True)
    seg = hd.seg.segread(path)
    by_label = {str(s.SegmentLabel): int(s.SegmentNumber) for s in seg.SegmentSequence}
    assert sorted(by_label) == sorted(labels), by_label
    numbers = [by_label[label] for label in labels]
    masks = seg.get_pixels_by_source_instance(source_sop_instance_uids=source_uids, segment_numbers=numbers,
                                              ignore_spatial_locations=True, assert_missing_frames_are_empty=True)
    masks = np.asarray(masks).astype(bool)  # [slices, rows, cols, classes]
    assert int(masks.sum(axis=-1).max()) <= 1, "exclusive classes overlap in the SEG"
    return (masks * np.arange(1, len(labels) + 1, dtype=np.uint8)).sum(axis=-1, dtype=np.uint8)


# --------------------------------------------------------------------------- the test


@pytest.mark.timeout(600)
@pytest.mark.parametrize("v", VARIANTS, ids=[v.name for v in VARIANTS])
def test_monai_model_in_the_node_gives_monais_labels(tmp_path: Path, v: Variant) -> None:
    storescu = require("storescu")
    onnx_path = export_with_monai(v.network(), tmp_path / "model.onnx")
    card_path = tmp_path / "card.toml"
    card_path.write_text(v.card(), encoding="utf-8")
    labels = [label for label, _, _ in CLASSES[:v.classes]]
    paths = write_ct_series(tmp_path / "ct", v.seed, slices=v.slices, size=v.size)

    with seg_receiver() as pacs:
        peers = [{"ae_title": PACS_AET, "host": "127.0.0.1", "port": pacs.port}]
        extra = {"pipeline": {"quiet_seconds": 1.0, "poll_seconds": 0.1},
                 "export": {"routes": [{"destinations": [PACS_AET]}], "poll_seconds": 0.1},
                 "inference": {"intra_op_threads": THREADS}}
        with node_process(tmp_path / "node", peers=peers, extra=extra) as node:
            packed = tmp_path / "model.dcm"
            res = node.cli("models", "pack", str(onnx_path), "--card", str(card_path), "-o", str(packed))
            assert res.returncode == 0, res.stdout + res.stderr
            res = node.cli("models", "add", str(packed))
            assert res.returncode == 0, res.stdout + res.stderr
            run([storescu, "-aec", node.ae_title, "127.0.0.1", str(node.port), *map(str, paths)], timeout=300)
            seg_ds = pacs.wait(node, timeout=400)
            [(state, timings)] = query(node, "SELECT state, timings FROM job")
            print(f"\n{v.name}: node job {state}, timings {timings}")

    hu, source_uids = hu_by_position(paths)
    node_labels = seg_labels(seg_ds, tmp_path / "seg.dcm", source_uids, labels)
    ref_labels, ref_hu = monai_reference(tmp_path / "ct", onnx_path, v)
    assert np.array_equal(ref_hu, hu), "LoadImage's grid is not the DICOM grid [slice, row, column]"
    assert node_labels.shape == ref_labels.shape == (v.slices, v.size, v.size)

    k = v.classes + 1
    ref_counts = np.bincount(ref_labels.ravel(), minlength=k)
    node_counts = np.bincount(node_labels.ravel(), minlength=k)
    agreement = float(np.mean(node_labels == ref_labels))
    print(f"{v.name}: agreement {agreement:.5f}; voxels per label MONAI {ref_counts.tolist()}, "
          f"node {node_counts.tolist()}")
    # The test's own premise: the seeded network's argmax is not one class.
    assert int((ref_counts > NONTRIVIAL).sum()) >= 2, ref_counts
    assert agreement >= AGREEMENT, (agreement, ref_counts.tolist(), node_counts.tolist())
    for c in range(1, k):
        if ref_counts[c] > NONTRIVIAL:
            assert node_counts[c] > 0, f"class {labels[c - 1]!r}: MONAI {ref_counts[c]} voxels, none in the SEG"
