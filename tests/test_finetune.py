"""``modelnode models finetune`` on corrections from a shifted domain (docs/finetune.md).

The reference lung model runs on phantoms of the ``lowdose`` domain (more noise, another
calibration: its lung Dice drops from 0.99 to about 0.35); the truth goes back as corrections
by storescu; the fine-tuned version must gain at least 0.05 Dice on the held-out cases or
reach 0.95, and stays out of the selection until approved, while the parent is unchanged.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import pydicom
import pytest
from corrections import correction_seg, truth_masks
from node_proc import node_process, query, stored_object, wait_jobs
from peers import require, run

from models.training.domains import write_ct_series_domain
from models.training.phantoms import ct_truth

pytest.importorskip("torch")
pytestmark = [pytest.mark.peers, pytest.mark.slow]

ROOT = Path(__file__).resolve().parent.parent
LUNG = ROOT / "models" / "reference" / "lung_unet.dcm"
DOMAIN, SLICES = "lowdose", 12
SEEDS = (7301, 7302, 7303, 7304, 7305)


def _store(node, *paths: Path) -> None:
    require("storescu")
    run(["storescu", "-R", "-aec", node.ae_title, "127.0.0.1", str(node.port), *map(str, paths)], timeout=120)


def _wait_linked(node, n: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if query(node, "SELECT COUNT(*) FROM verdict WHERE state = 'linked'")[0][0] >= n:
            return
        time.sleep(0.2)
    raise AssertionError(f"{n} linked verdicts not reached\n{node.log()[-3000:]}")


def _series(node, tmp_path: Path, seed: int) -> list[Path]:
    paths = write_ct_series_domain(tmp_path / f"ct{seed}", seed, DOMAIN, slices=SLICES)
    _store(node, *paths)
    return paths


@pytest.mark.timeout(900)
def test_finetune_on_corrections_from_a_shifted_domain_then_approve(tmp_path):
    extra = {"pipeline": {"quiet_seconds": 1.0, "poll_seconds": 0.1}, "inference": {"intra_op_threads": 2}}
    with node_process(tmp_path / "node", extra=extra) as node:
        assert node.cli("models", "add", str(LUNG)).returncode == 0
        [parent] = json.loads(node.cli("models", "list", "--json").stdout)
        parent_file = Path(json.loads(node.cli("models", "show", parent["uid"], "--json").stdout)["file"])
        parent_sha = hashlib.sha256(parent_file.read_bytes()).hexdigest()

        # The shifted domain's studies, the model's results, and the truth sent back as corrections.
        series = {seed: _series(node, tmp_path, seed) for seed in SEEDS}
        jobs = wait_jobs(node, len(SEEDS), timeout=300)
        for job in jobs:
            seed = next(s for s, paths in series.items()
                        if pydicom.dcmread(paths[0], stop_before_pixels=True).SeriesInstanceUID == job["group_key"])
            sources = [pydicom.dcmread(p, stop_before_pixels=True) for p in series[seed]]
            ai_seg = pydicom.dcmread(stored_object(node, job["results"][0]))
            seg = correction_seg(ai_seg, sources, truth_masks(ct_truth(seed, slices=SLICES), sources))
            seg.save_as(tmp_path / f"corr{seed}.dcm")
            _store(node, tmp_path / f"corr{seed}.dcm")
        _wait_linked(node, len(SEEDS))

        res = node.cli("models", "finetune", "modelnode-lung-unet", "--steps", "40", "--json", timeout=800)
        assert res.returncode == 0, res.stderr + res.stdout
        report = json.loads(res.stdout)
        before, after = report["before"]["dice_lung"], report["after"]["dice_lung"]
        assert after >= before + 0.05 or after >= 0.95, report
        assert (report["cases_train"], report["cases_heldout"], report["parent_uid"]) == (3, 2, parent["uid"])
        (tmp_path / "finetune.json").write_text(res.stdout)

        # A candidate: not in the registry, so not selected; the parent unchanged and still selected.
        assert [m["uid"] for m in json.loads(node.cli("models", "list", "--json").stdout)] == [parent["uid"]]
        assert hashlib.sha256(parent_file.read_bytes()).hexdigest() == parent_sha
        _series(node, tmp_path, 7310)
        assert {j["model_uid"] for j in wait_jobs(node, len(SEEDS) + 1)} == {parent["uid"]}

        # Approved: in the registry with its lineage, and selected from now on.
        res = node.cli("models", "approve", report["uid"], "--reviewer", "ml lead")
        assert res.returncode == 0, res.stderr
        shown = json.loads(node.cli("models", "show", report["uid"], "--json").stdout)
        assert shown["parent_uid"] == parent["uid"], shown
        perf = shown["card"]["provenance"]["performance"]
        assert perf["cases_train"] == 3 and perf["dice_lung_before"] == before and perf["dice_lung_after"] == after
        ds = pydicom.dcmread(shown["file"], stop_before_pixels=True)
        assert ds.ReferencedInstanceSequence[0].ReferencedSOPInstanceUID == parent["uid"]
        _series(node, tmp_path, 7311)
        newest = max(wait_jobs(node, len(SEEDS) + 2), key=lambda j: j["id"])
        assert newest["model_uid"] == report["uid"], newest


@pytest.mark.timeout(60)
def test_a_model_whose_architecture_is_not_named_is_refused_with_the_reason():
    from iods import model_object
    from models.training.finetune import FinetuneRefused, architecture_of, network_from_onnx

    _, body = model_object.decode(pydicom.dcmread(ROOT / "models" / "reference" / "bodypart_cnn.dcm"))
    with pytest.raises(FinetuneRefused, match="names no trainable architecture"):
        architecture_of(body)
    onnx_bytes, lung = model_object.decode(pydicom.dcmread(LUNG))
    net = network_from_onnx(lung, onnx_bytes)  # the shipped graph loads exactly (checked inside)
    assert sum(p.numel() for p in net.parameters()) > 0


@pytest.mark.timeout(60)
def test_a_domain_changes_only_the_pixels_of_the_series_it_shifts(tmp_path):
    from models.training.phantoms import write_ct_series

    plain = write_ct_series(tmp_path / "plain", 7401, slices=3)
    shifted = write_ct_series_domain(tmp_path / "shifted", 7401, DOMAIN, slices=3)
    again = write_ct_series_domain(tmp_path / "again", 7401, DOMAIN, slices=3)
    assert [p.read_bytes() for p in shifted] == [p.read_bytes() for p in again]
    for a, b in zip(plain, shifted, strict=True):
        da, db = pydicom.dcmread(a), pydicom.dcmread(b)
        assert (da.SOPInstanceUID, da.ImagePositionPatient) == (db.SOPInstanceUID, db.ImagePositionPatient)
        assert da.PixelData != db.PixelData
    # The generator itself is untouched: a second plain write is byte-identical.
    assert [p.read_bytes() for p in plain] == [p.read_bytes() for p in write_ct_series(tmp_path / "p2", 7401, slices=3)]
