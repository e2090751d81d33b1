"""ONNX Runtime sessions: execution providers from configuration, a bounded cache, batched runs.

Sessions are expensive to create (graph optimisation, and on a GPU the CUDA context and weight
upload), so they are cached per model UID. The cache is bounded by the size of the models it
holds, because a GPU's memory, not a count, is what runs out; the least recently used session
is dropped first.

Providers are tried in the configured order. A provider this build of ONNX Runtime lacks (no
GPU, or the CPU-only wheel) is skipped with one warning per model, and the CPU provider is always
the last resort, so a node configured for CUDA still runs on a machine without one. A GPU
provider that is present but cannot start (no device, driver too old, out of memory) is
reported with ONNX Runtime's reason and the session is created again on the CPU.

On a GPU, runs go through I/O binding: the input is copied to the device once, the output is
allocated there by ONNX Runtime and copied back once, instead of through an intermediate
host tensor. TensorRT, when listed and present, keeps its engines in ``trt_cache_dir`` so only
the first run after a start pays for the engine build.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnxruntime as ort

from models import graph

log = logging.getLogger(__name__)

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
TENSORRT = "TensorrtExecutionProvider"
# Providers whose runs are bound to device memory (ONNX Runtime's device name for I/O binding).
_DEVICE_OF = {CUDA: "cuda", TENSORRT: "cuda"}


@dataclass(frozen=True)
class RuntimeSettings:
    providers: tuple[str, ...] = ("CUDAExecutionProvider", CPU)
    intra_op_threads: int = 0
    inter_op_threads: int = 1
    batch_size: int = 16
    cache_bytes: int = 2 << 30
    trt_cache_dir: str = ""  # TensorRT engine and timing caches; "" keeps none across starts
    trt_fp16: bool = False  # let TensorRT run layers in half precision (validate the model first)
    device_id: int = 0


def usable_providers(wanted: Sequence[str]) -> tuple[list[str], list[str]]:
    """(providers to use, providers skipped because this ONNX Runtime lacks them)."""
    available = set(ort.get_available_providers())
    use = [p for p in wanted if p in available]
    skipped = [p for p in wanted if p not in available]
    if CPU not in use:
        use.append(CPU)
    return use, skipped


def _threads(requested: int) -> int:
    if requested > 0:
        return requested
    # One per core this process may use (cgroups/affinity), not per core of the host.
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


@dataclass
class LoadedModel:
    uid: str
    session: ort.InferenceSession
    input_name: str
    output_names: list[str]
    providers: list[str]
    size: int
    load_seconds: float
    device_id: int = 0

    def run(self, batch: np.ndarray) -> np.ndarray:
        device = _DEVICE_OF.get(self.providers[0])
        if device is None:
            return self.session.run(self.output_names[:1], {self.input_name: batch})[0]
        binding = self.session.io_binding()
        binding.bind_cpu_input(self.input_name, np.ascontiguousarray(batch))
        binding.bind_output(self.output_names[0], device, self.device_id)
        self.session.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()[0]

    def run_batched(self, inputs: np.ndarray, batch_size: int) -> np.ndarray:
        """Run ``inputs`` [N, ...] in batches of ``batch_size`` along N; outputs concatenated."""
        outs = [self.run(np.ascontiguousarray(inputs[i:i + batch_size])) for i in range(0, len(inputs), batch_size)]
        return np.concatenate(outs, axis=0) if outs else np.empty((0,))

    @property
    def on_gpu(self) -> bool:
        return self.providers[0] != CPU


class SessionCache:
    """Sessions per model UID, least recently used dropped first once ``cache_bytes`` is exceeded."""

    def __init__(self, settings: RuntimeSettings | None = None) -> None:
        self.settings = settings or RuntimeSettings()
        self._sessions: OrderedDict[str, LoadedModel] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, uid: str, onnx_bytes_or_path: bytes | str, providers: Sequence[str] | None = None) -> LoadedModel:
        with self._lock:
            hit = self._sessions.get(uid)
            if hit is not None:
                self._sessions.move_to_end(uid)
                return hit
        loaded = self._load(uid, onnx_bytes_or_path, providers or self.settings.providers)
        with self._lock:
            self._sessions[uid] = loaded
            self._sessions.move_to_end(uid)
            self._evict()
        return loaded

    def __contains__(self, uid: str) -> bool:
        return uid in self._sessions

    def __len__(self) -> int:
        return len(self._sessions)

    @property
    def bytes_held(self) -> int:
        return sum(m.size for m in self._sessions.values())

    def _evict(self) -> None:
        # Keep at least the newest session even if it alone exceeds the bound.
        while len(self._sessions) > 1 and self.bytes_held > self.settings.cache_bytes:
            uid, dropped = self._sessions.popitem(last=False)
            log.info("session cache: dropped model %s (%.1f MiB) to stay under %.0f MiB",
                     uid, dropped.size / 2**20, self.settings.cache_bytes / 2**20)

    def _load(self, uid: str, source: bytes | str, wanted: Sequence[str]) -> LoadedModel:
        use, skipped = usable_providers(wanted)
        if skipped:
            log.warning("model %s: execution provider(s) %s not available in this ONNX Runtime (%s); using %s",
                        uid, ", ".join(skipped), ort.get_device(), use[0])
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = _threads(self.settings.intra_op_threads)
        opts.inter_op_num_threads = max(1, self.settings.inter_op_threads)
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        t0 = time.perf_counter()
        size = len(source) if isinstance(source, bytes) else os.path.getsize(source)
        if isinstance(source, bytes):
            source = graph.optimise(source)
        try:
            session = ort.InferenceSession(source, sess_options=opts, providers=self._with_options(use))
        except Exception as exc:  # onnxruntime raises its own Fail/RuntimeException types
            if use == [CPU]:
                raise
            log.warning("model %s: %s could not start (%s); running on the CPU", uid, use[0],
                        str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__)
            use = [CPU]
            session = ort.InferenceSession(source, sess_options=opts, providers=use)
        elapsed = time.perf_counter() - t0
        active = session.get_providers()
        if active[0] != use[0]:
            # ORT falls back silently when a provider fails to initialise (e.g. no CUDA driver).
            log.warning("model %s: %s failed to initialise; running on %s", uid, use[0], active[0])
        log.info("model %s: session ready on %s in %.2f s (%d intra-op thread(s))",
                 uid, active[0], elapsed, opts.intra_op_num_threads)
        return LoadedModel(
            uid=uid,
            session=session,
            input_name=session.get_inputs()[0].name,
            output_names=[o.name for o in session.get_outputs()],
            providers=active,
            size=size,
            load_seconds=elapsed,
            device_id=self.settings.device_id,
        )

    def _with_options(self, providers: Sequence[str]) -> list[str | tuple[str, dict[str, Any]]]:
        out: list[str | tuple[str, dict[str, Any]]] = []
        for p in providers:
            if p == TENSORRT:
                opts: dict[str, Any] = {"device_id": self.settings.device_id,
                                        "trt_fp16_enable": self.settings.trt_fp16}
                if self.settings.trt_cache_dir:
                    os.makedirs(self.settings.trt_cache_dir, exist_ok=True)
                    opts.update(trt_engine_cache_enable=True, trt_engine_cache_path=self.settings.trt_cache_dir,
                                trt_timing_cache_enable=True, trt_timing_cache_path=self.settings.trt_cache_dir)
                out.append((p, opts))
            elif p == CUDA:
                # kSameAsRequested: the arena grows by what a window needs, not by doubling, so a
                # 3D model does not reserve twice its working set on a shared GPU.
                out.append((p, {"device_id": self.settings.device_id, "arena_extend_strategy": "kSameAsRequested"}))
            else:
                out.append(p)
        return out
