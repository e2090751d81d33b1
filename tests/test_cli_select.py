"""`modelnode select` on files and directories, with the shipped reference models registered."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from models.training.phantoms import write_ct_series, write_radiograph

ROOT = Path(__file__).resolve().parent.parent


def modelnode(*args: str, data: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "MODELNODE_DATA_DIR": str(data)}
    env.pop("MODELNODE_CONFIG", None)
    return subprocess.run([sys.executable, "-m", "node.cli", *args], capture_output=True, text=True, env=env, timeout=100)


@pytest.mark.timeout(120)
def test_select_ranks_and_explains(tmp_path):
    data = tmp_path / "data"
    for name in ("lung_unet.dcm", "bodypart_cnn.dcm"):
        assert modelnode("models", "add", str(ROOT / "models" / "reference" / name), data=data).returncode == 0
    write_ct_series(tmp_path / "study" / "ct", 31, slices=6, size=64)
    write_radiograph(tmp_path / "study" / "xr.dcm", 32, "pelvis", modality="CR",
                     overrides={"BodyPartExamined": None, "StudyDescription": "Becken ap"})
    res = modelnode("select", str(tmp_path / "study"), "--json", data=data)
    assert res.returncode == 0, res.stderr
    out = {r["facts"]["modality"]: r for r in json.loads(res.stdout)}
    assert out["CT"]["ranked"][0]["name"] == "modelnode-lung-unet"
    assert out["CR"]["ranked"][0]["name"] == "modelnode-bodypart-cnn"
    assert any(r["name"] == "modelnode-lung-unet" for r in out["CR"]["rejected"])
    text = modelnode("select", str(tmp_path / "study" / "ct"), data=data)
    assert "1. modelnode-lung-unet" in text.stdout and "anatomy" in text.stdout
    none = modelnode("select", str(tmp_path / "nothing"), data=data)
    assert none.returncode == 4 and "neither a file" in none.stderr


@pytest.mark.timeout(120)
def test_image_check_supplies_anatomy_headers_lack(tmp_path):
    data = tmp_path / "data"
    assert modelnode("models", "add", str(ROOT / "models" / "reference" / "bodypart_cnn.dcm"), data=data).returncode == 0
    blank = {k: None for k in ("BodyPartExamined", "StudyDescription", "SeriesDescription", "ProtocolName",
                               "AnatomicRegionSequence")}
    path = write_radiograph(tmp_path / "xr" / "chest.dcm", 77, "chest", modality="DX", overrides=blank)
    without = json.loads(modelnode("select", str(path), "--json", data=data).stdout)[0]
    assert without["ranked"] == [] and "no anatomy" in json.dumps(without["rejected"])
    res = modelnode("select", str(path), "--json", "--image-check", data=data)
    assert res.returncode == 0, res.stderr
    with_check = json.loads(res.stdout)[0]
    assert with_check["ranked"][0]["name"] == "modelnode-bodypart-cnn"
    assert any("image check" in a and "Chest" in a for a in with_check["facts"]["anatomy"])
