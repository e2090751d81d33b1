"""A 200 MiB model packs and unpacks without holding three copies of its weights in memory."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_200_mib_model_pack_unpack_peak_memory():
    res = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_model_memory"), "--mib", "200", "--json"],
                         capture_output=True, text=True, timeout=170)
    assert res.returncode == 0, res.stderr
    r = json.loads(res.stdout.strip().splitlines()[-1])
    assert r["payload"] >= 200 * (1 << 20)
    for step in ("pack", "unpack"):
        copies = (r[step] - r["baseline"]) / r["payload"]
        # Streaming keeps the weights out of Python; only onnx.checker's parse holds them (~2x).
        assert copies < 2.6, f"{step} held {copies:.2f} copies of the payload"
