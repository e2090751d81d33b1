"""ONNX Runtime sessions (providers, cache, batching) and series volumes (order, rescale, codecs)."""

from __future__ import annotations

import logging

import numpy as np
import pydicom
import pytest
from onnx_factory import segmentation_model
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian

from models.runtime import CPU, RuntimeSettings, SessionCache, usable_providers
from models.volume import VolumeError, load_volume, sort_slices


@pytest.mark.timeout(60)
def test_cuda_requested_on_a_cpu_machine_falls_back_with_a_log_line(caplog):
    cache = SessionCache(RuntimeSettings(providers=("CUDAExecutionProvider", CPU)))
    with caplog.at_level(logging.WARNING, logger="models.runtime"):
        model = cache.get("m1", segmentation_model())
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this machine has CUDA; the fallback is covered where it has none")
    assert model.providers[0] == CPU and not model.on_gpu
    assert "CUDAExecutionProvider" in caplog.text and "not available" in caplog.text
    assert usable_providers(["CUDAExecutionProvider"]) == ([CPU], ["CUDAExecutionProvider"])


@pytest.mark.timeout(60)
def test_sessions_are_cached_and_bounded_by_size():
    small = segmentation_model()
    cache = SessionCache(RuntimeSettings(providers=(CPU,), cache_bytes=len(small) * 2))
    a = cache.get("a", small)
    assert cache.get("a", small) is a
    cache.get("b", segmentation_model(seed=1))
    cache.get("c", segmentation_model(seed=2))
    assert "a" not in cache and "b" in cache and "c" in cache
    assert cache.bytes_held <= len(small) * 2


@pytest.mark.timeout(60)
def test_batched_run_equals_one_run():
    model = SessionCache(RuntimeSettings(providers=(CPU,), intra_op_threads=1)).get("m", segmentation_model())
    x = np.random.default_rng(0).standard_normal((10, 1, 16, 16)).astype(np.float32)
    whole = model.run(x)
    batched = model.run_batched(x, batch_size=3)
    assert whole.shape == (10, 2, 16, 16)
    np.testing.assert_allclose(batched, whole, rtol=0, atol=1e-6)


def _slice(z: float, instance_number: int, value: int) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPInstanceUID = f"1.2.3.{instance_number}"
    ds.InstanceNumber = instance_number
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.ImagePositionPatient = [0, 0, z]
    ds.PixelSpacing = [0.7, 0.7]
    ds.Rows = ds.Columns = 4
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
    ds.PixelData = np.full((4, 4), value, np.int16).tobytes()
    return ds


@pytest.mark.timeout(60)
def test_slices_sort_along_the_normal_not_by_instance_number():
    # Instance numbers in acquisition order (feet first), positions head-first: geometry wins.
    slices = [_slice(z=10.0 - 2.5 * i, instance_number=i + 1, value=100 * i) for i in range(4)]
    shuffled = [slices[2], slices[0], slices[3], slices[1]]
    vol = load_volume(shuffled)
    assert [ds.InstanceNumber for ds in vol.datasets] == [4, 3, 2, 1]
    assert vol.spacing == (2.5, 0.7, 0.7)
    # Rescale applied: stored 300 -> 300 - 1024 HU.
    assert vol.pixels[0, 0, 0] == pytest.approx(300 - 1024)
    assert [ds.InstanceNumber for ds in sort_slices(shuffled)] == [4, 3, 2, 1]


@pytest.mark.timeout(60)
def test_compressed_series_decode_like_uncompressed():
    ref = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    # JPEG 2000 lossless and RLE against the uncompressed originals of the same images.
    j2k = pydicom.dcmread(get_testdata_file("RG1_J2KR.dcm"))
    unc = pydicom.dcmread(get_testdata_file("RG1_UNCR.dcm"))
    np.testing.assert_array_equal(load_volume([j2k]).pixels, load_volume([unc]).pixels)
    rle = pydicom.dcmread(get_testdata_file("MR_small_RLE.dcm"))
    raw = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    np.testing.assert_array_equal(load_volume([rle]).pixels, load_volume([raw]).pixels)
    assert load_volume([ref]).pixels.shape == (1, 128, 128)


@pytest.mark.timeout(60)
def test_mixed_sizes_are_refused():
    a, b = _slice(0, 1, 0), _slice(1, 2, 0)
    b.Rows = b.Columns = 2
    b.PixelData = np.zeros((2, 2), np.int16).tobytes()
    with pytest.raises(VolumeError, match="differ in size"):
        load_volume([a, b])
