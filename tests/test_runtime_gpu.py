"""The GPU paths of models.runtime, where no GPU is: these are the only mocks in the suite.

What cannot run here is the device itself. The mocks stand in for exactly that: an ONNX
Runtime build that lists CUDA and TensorRT but cannot start them, and a device-side I/O
binding whose arithmetic is done by a real CPU session. Everything else (the real graph, the
real CPU session, the fallback and its log line) is real.
"""

from __future__ import annotations

import logging

import numpy as np
import onnxruntime as ort
import pytest
from onnx_factory import intensity_classes_model

from models import runtime
from models.runtime import CPU, CUDA, TENSORRT, LoadedModel, RuntimeSettings, SessionCache

pytestmark = pytest.mark.timeout(60)


def test_gpu_that_cannot_start_falls_back_to_cpu_with_the_reason(monkeypatch, caplog):
    real = ort.InferenceSession
    tried: list[list] = []

    def session(source, sess_options=None, providers=None):
        tried.append(list(providers))
        names = [p[0] if isinstance(p, tuple) else p for p in providers]
        if CUDA in names or TENSORRT in names:
            raise RuntimeError("CUDA failure 100: no CUDA-capable device is detected ; GPU=0")
        return real(source, sess_options=sess_options, providers=providers)

    monkeypatch.setattr(runtime.ort, "get_available_providers", lambda: [TENSORRT, CUDA, CPU])
    monkeypatch.setattr(runtime.ort, "InferenceSession", session)
    cache = SessionCache(RuntimeSettings(providers=(TENSORRT, CUDA, CPU), trt_cache_dir="/nonexistent-not-used"))
    with caplog.at_level(logging.WARNING, logger="models.runtime"):
        loaded = cache.get("m", intensity_classes_model())
    assert loaded.providers == [CPU] and not loaded.on_gpu
    assert any("TensorrtExecutionProvider could not start (CUDA failure 100: no CUDA-capable device" in r.message
               and "running on the CPU" in r.message for r in caplog.records)
    # Asked with provider options first, then CPU alone.
    assert [p[0] if isinstance(p, tuple) else p for p in tried[0]] == [TENSORRT, CUDA, CPU] and tried[1] == [CPU]
    x = np.full((1, 1, 4, 4, 4), 0.6, np.float32)
    assert loaded.run(x).argmax(axis=1).min() == 2  # soft tissue: the session really runs


def test_provider_options(tmp_path):
    cache = SessionCache(RuntimeSettings(trt_cache_dir=str(tmp_path / "trt"), trt_fp16=True, device_id=1))
    opts = dict(cache._with_options([TENSORRT, CUDA, CPU])[:2])
    assert opts[TENSORRT]["trt_engine_cache_enable"] and opts[TENSORRT]["trt_engine_cache_path"] == str(tmp_path / "trt")
    assert opts[TENSORRT]["trt_fp16_enable"] is True and opts[TENSORRT]["device_id"] == 1
    assert opts[CUDA] == {"device_id": 1, "arena_extend_strategy": "kSameAsRequested"}
    assert (tmp_path / "trt").is_dir()


class _DeviceBinding:
    """An I/O binding whose device is a CPU session: records what crossed to and from it."""

    def __init__(self, cpu: ort.InferenceSession, log: list) -> None:
        self.cpu, self.log, self.inputs, self.out = cpu, log, {}, None

    def bind_cpu_input(self, name, array):
        self.log.append(("to_device", name, array.shape))
        self.inputs[name] = array

    def bind_output(self, name, device_type="cpu", device_id=0):
        self.log.append(("output_on", name, device_type, device_id))
        self.name = name

    def copy_outputs_to_cpu(self):
        self.log.append(("to_host",))
        return [self.out]


class _DeviceSession:
    def __init__(self, cpu: ort.InferenceSession) -> None:
        self.cpu, self.log = cpu, []

    def io_binding(self):
        return _DeviceBinding(self.cpu, self.log)

    def run_with_iobinding(self, binding):
        self.log.append(("run",))
        binding.out = self.cpu.run([binding.name], binding.inputs)[0]

    def run(self, *a, **kw):  # the host path must not be taken on a GPU
        raise AssertionError("session.run() called for a GPU session")


def test_gpu_runs_go_through_io_binding():
    cpu = ort.InferenceSession(intensity_classes_model(), providers=[CPU])
    device = _DeviceSession(cpu)
    loaded = LoadedModel(uid="m", session=device, input_name="x", output_names=["logits"],
                         providers=[CUDA, CPU], size=1, load_seconds=0.0, device_id=0)
    x = np.random.default_rng(0).random((2, 1, 8, 8, 8), dtype=np.float32)
    out = loaded.run(x)
    np.testing.assert_array_equal(out, cpu.run(["logits"], {"x": x})[0])
    assert device.log == [("to_device", "x", (2, 1, 8, 8, 8)), ("output_on", "logits", "cuda", 0), ("run",),
                          ("to_host",)]
