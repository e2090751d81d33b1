"""`modelnode models ...` as a script would use it: outputs, files and exit codes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest
from cards import SEGMENTATION_TOML, segmentation_card_dict
from onnx_factory import segmentation_model, segmentation_model_of_parity, write_0_1_0_model_object

from iods.card import parse_card

pytestmark = pytest.mark.timeout(60)


def modelnode(*args: str, data_dir: Path, check_rc: int | None = 0) -> subprocess.CompletedProcess:
    env = {**os.environ, "MODELNODE_DATA_DIR": str(data_dir)}
    env.pop("MODELNODE_CONFIG", None)
    res = subprocess.run([sys.executable, "-m", "node.cli", *args], capture_output=True, text=True, env=env, timeout=50)
    if check_rc is not None:
        assert res.returncode == check_rc, f"rc={res.returncode}\n{res.stdout}\n{res.stderr}"
    return res


@pytest.fixture
def files(tmp_path):
    onnx_path = tmp_path / "model.onnx"
    onnx_path.write_bytes(segmentation_model())
    card = tmp_path / "card.toml"
    card.write_text(SEGMENTATION_TOML)
    return onnx_path, card


def test_pack_unpack_add_list_show_remove(tmp_path, files):
    onnx_path, card = files
    data = tmp_path / "data"
    dcm = tmp_path / "model.dcm"
    modelnode("models", "pack", str(onnx_path), "--card", str(card), "-o", str(dcm), data_dir=data)
    uid = pydicom.dcmread(dcm, stop_before_pixels=True).SOPInstanceUID
    out = tmp_path / "back.onnx"
    modelnode("models", "unpack", str(dcm), "-o", str(out), "--card-out", str(tmp_path / "card.json"), data_dir=data)
    assert out.read_bytes() == onnx_path.read_bytes()
    assert json.loads((tmp_path / "card.json").read_text())["identity"]["uid"] == uid

    res = modelnode("models", "add", str(dcm), data_dir=data)
    assert "added" in res.stdout
    res = modelnode("models", "add", str(onnx_path), "--card", str(card), data_dir=data)
    assert "already present" in res.stdout
    listed = json.loads(modelnode("models", "list", "--json", "--modality", "CT", data_dir=data).stdout)
    assert [m["uid"] for m in listed] == [uid]
    assert json.loads(modelnode("models", "list", "--json", "--modality", "MR", data_dir=data).stdout) == []
    assert "test-lung-seg" in modelnode("models", "list", data_dir=data).stdout
    shown = json.loads(modelnode("models", "show", uid, "--json", data_dir=data).stdout)
    assert shown["payload_sha256"] and Path(shown["file"]).exists()
    modelnode("models", "remove", uid, data_dir=data)
    modelnode("models", "show", uid, data_dir=data, check_rc=4)
    modelnode("models", "remove", uid, data_dir=data, check_rc=4)


def test_refusals_have_testable_exit_codes_and_write_nothing(tmp_path, files):
    onnx_path, card = files
    data = tmp_path / "data"
    dcm = tmp_path / "model.dcm"
    modelnode("models", "pack", str(onnx_path), "--card", str(card), "-o", str(dcm), data_dir=data)
    raw = bytearray(dcm.read_bytes())
    raw[-20] ^= 0x55
    bad = tmp_path / "tampered.dcm"
    bad.write_bytes(bytes(raw))
    res = modelnode("models", "unpack", str(bad), "-o", str(tmp_path / "x.onnx"), data_dir=data, check_rc=3)
    assert "checksum-mismatch" in res.stderr
    assert not (tmp_path / "x.onnx").exists()
    res = modelnode("models", "add", str(bad), data_dir=data, check_rc=3)
    assert "checksum-mismatch" in res.stderr
    res = modelnode("models", "pack", str(onnx_path), "--card", str(card), "-o", str(tmp_path / "big.dcm"),
                    "--max-payload", "64", data_dir=data, check_rc=3)
    assert "payload-too-large" in res.stderr
    broken = tmp_path / "broken.toml"
    broken.write_text(SEGMENTATION_TOML.replace('licence = "Apache-2.0"\n', ""))
    res = modelnode("models", "pack", str(onnx_path), "--card", str(broken), "-o", str(tmp_path / "c.dcm"),
                    data_dir=data, check_rc=3)
    assert "identity.licence" in res.stderr
    modelnode("models", "unpack", str(tmp_path / "missing.dcm"), data_dir=data, check_rc=4)
    modelnode("models", "frobnicate", data_dir=data, check_rc=2)


def test_every_models_action_has_help(tmp_path):
    for action in ("pack", "unpack", "repair", "add", "list", "show", "remove"):
        res = modelnode("models", action, "--help", data_dir=tmp_path)
        assert "usage: modelnode models " + action in res.stdout
    assert "exit codes" in modelnode("--help", data_dir=tmp_path).stdout


@pytest.mark.timeout(120)
def test_repair_rewrites_a_0_1_0_object_with_the_same_uid(tmp_path):
    onnx_bytes = segmentation_model_of_parity(True)
    assert len(onnx_bytes) % 2 == 1
    onnx_path, card = tmp_path / "model.onnx", tmp_path / "card.toml"
    onnx_path.write_bytes(onnx_bytes)
    card.write_text(SEGMENTATION_TOML)
    data = tmp_path / "data"
    old, new = tmp_path / "0.1.0.dcm", tmp_path / "new.dcm"
    write_0_1_0_model_object(onnx_path, parse_card(segmentation_card_dict()), old)
    uid = pydicom.dcmread(old, stop_before_pixels=True).SOPInstanceUID

    res = modelnode("models", "repair", str(old), "-o", str(new), data_dir=data)
    assert f"({uid}) repaired (payload value length {len(onnx_bytes)} is odd" in res.stdout
    assert pydicom.dcmread(new, stop_before_pixels=True).SOPInstanceUID == uid
    modelnode("models", "unpack", str(new), "-o", str(tmp_path / "back.onnx"), data_dir=data)
    assert (tmp_path / "back.onnx").read_bytes() == onnx_bytes
    packed = tmp_path / "packed.dcm"
    modelnode("models", "pack", str(onnx_path), "--card", str(card), "-o", str(packed), data_dir=data)
    assert new.read_bytes() == packed.read_bytes()

    again = tmp_path / "again.dcm"
    res = modelnode("models", "repair", str(new), "-o", str(again), data_dir=data)
    assert "already conformant, nothing to repair" in res.stdout
    assert again.read_bytes() == new.read_bytes()


@pytest.mark.timeout(120)
def test_repair_refusals_have_the_usual_exit_codes_and_write_nothing(tmp_path, files):
    onnx_path, _ = files
    data = tmp_path / "data"
    old = tmp_path / "0.1.0.dcm"
    write_0_1_0_model_object(onnx_path, parse_card(segmentation_card_dict()), old)
    raw = bytearray(old.read_bytes())
    raw[-20] ^= 0x55
    bad = tmp_path / "tampered.dcm"
    bad.write_bytes(bytes(raw))
    out = tmp_path / "out" / "new.dcm"
    res = modelnode("models", "repair", str(bad), "-o", str(out), data_dir=data, check_rc=3)
    assert "checksum-mismatch" in res.stderr
    res = modelnode("models", "repair", str(onnx_path), "-o", str(out), data_dir=data, check_rc=3)
    assert "not-a-model-object" in res.stderr
    res = modelnode("models", "repair", str(old), "-o", str(out), "--max-payload", "64", data_dir=data,
                    check_rc=3)
    assert "payload-too-large" in res.stderr
    modelnode("models", "repair", str(tmp_path / "missing.dcm"), "-o", str(out), data_dir=data, check_rc=4)
    modelnode("models", "repair", str(old), data_dir=data, check_rc=2)  # -o is required
    assert not out.parent.exists() or list(out.parent.iterdir()) == []


@pytest.mark.timeout(120)
def test_add_reference_registers_the_shipped_models_in_a_registry_that_holds_others(tmp_path, files):
    """An upgraded node: its registry is not new, so serve adds no reference model; --reference does."""
    from node.storage.registry import reference_model_files

    onnx_path, card = files
    data = tmp_path / "data"
    modelnode("models", "add", str(onnx_path), "--card", str(card), data_dir=data)
    shipped = {pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in reference_model_files()}
    res = modelnode("models", "add", "--reference", data_dir=data)
    assert res.stdout.count(" added") == len(shipped), res.stdout
    listed = {m["uid"] for m in json.loads(modelnode("models", "list", "--json", data_dir=data).stdout)}
    assert shipped < listed and len(listed) == len(shipped) + 1
    again = modelnode("models", "add", "--reference", data_dir=data)
    assert again.stdout.count("already present, unchanged") == len(shipped)
    modelnode("models", "add", "--reference", str(onnx_path), data_dir=data, check_rc=2)
    modelnode("models", "add", data_dir=data, check_rc=2)
