"""Federated rounds with Flower across two nodes on loopback (docs/federated.md).

Each node runs the reference lung model on its own shifted domain (``lowdose``, ``soft``) and
gets the truth back as corrections by storescu; ``federate serve`` (the coordinator, on node
A's configuration) runs FedAvg rounds with a ``federate join`` client per node and sends the new
version to both by C-STORE. It must score at least as well as the parent on each domain's
held-out data, and carry its lineage in ``models show`` and in the object.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
from corrections import correction_seg, truth_masks
from node_proc import MODELNODE, REPO, node_process, query, stored_object, wait_jobs
from peers import free_port, require, run, wait_port

from models.training.domains import write_ct_series_domain
from models.training.phantoms import ct_truth

pytest.importorskip("torch")
pytest.importorskip("flwr")
pytestmark = [pytest.mark.peers, pytest.mark.slow]

LUNG = REPO / "models" / "reference" / "lung_unet.dcm"
SLICES = 8
DOMAINS = {"lowdose": (7501, 7502, 7503), "soft": (7601, 7602, 7603)}


def _store(node, *paths: Path) -> None:
    require("storescu")
    run(["storescu", "-R", "-aec", node.ae_title, "127.0.0.1", str(node.port), *map(str, paths)], timeout=120)


def _reviewed(node, tmp_path: Path, domain: str) -> None:
    """The domain's series segmented by the node, and the truth sent back as corrections."""
    series = {}
    for seed in DOMAINS[domain]:
        series[seed] = write_ct_series_domain(tmp_path / domain / str(seed), seed, domain, slices=SLICES)
        _store(node, *series[seed])
    jobs = wait_jobs(node, len(series), timeout=300)
    for job in jobs:
        seed = next(s for s, p in series.items()
                    if pydicom.dcmread(p[0], stop_before_pixels=True).SeriesInstanceUID == job["group_key"])
        sources = [pydicom.dcmread(p, stop_before_pixels=True) for p in series[seed]]
        ai_seg = pydicom.dcmread(stored_object(node, job["results"][0]))
        seg = correction_seg(ai_seg, sources, truth_masks(ct_truth(seed, slices=SLICES), sources))
        seg.save_as(tmp_path / domain / f"corr{seed}.dcm")
        _store(node, tmp_path / domain / f"corr{seed}.dcm")
    deadline = time.monotonic() + 60
    while query(node, "SELECT COUNT(*) FROM verdict WHERE state = 'linked'")[0][0] < len(series):
        assert time.monotonic() < deadline, node.log()[-3000:]
        time.sleep(0.2)


def _cli(node, *args: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in ("MODELNODE_CONFIG", "MODELNODE_DATA_DIR")}
    return subprocess.Popen([*MODELNODE, "--config", str(node.config_path), *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _heldout_cases(tmp_path: Path, domain: str):
    from models.training.finetune import Case

    seed = DOMAINS[domain][0] + 50
    paths = write_ct_series_domain(tmp_path / "heldout" / domain, seed, domain, slices=SLICES)
    truth = ct_truth(seed, slices=SLICES)
    labels = {u: np.stack([truth.lung[i], truth.nodule[i]], -1) for i, u in enumerate(truth.sop_instance_uids)}
    return [Case(str(seed), [pydicom.dcmread(p) for p in paths], labels)]


@pytest.mark.timeout(900)
def test_two_nodes_run_fedavg_rounds_and_receive_the_version_by_c_store(tmp_path):
    extra = {"pipeline": {"quiet_seconds": 1.0, "poll_seconds": 0.1}, "inference": {"intra_op_threads": 1}}
    with node_process(tmp_path / "a", extra=extra) as a, node_process(tmp_path / "b", extra=extra) as b:
        for node in (a, b):
            assert node.cli("models", "add", str(LUNG)).returncode == 0
        [parent] = json.loads(a.cli("models", "list", "--json").stdout)
        _reviewed(a, tmp_path, "lowdose")
        _reviewed(b, tmp_path, "soft")

        port = free_port()
        serve = _cli(a, "federate", "serve", "modelnode-lung-unet", "--address", f"127.0.0.1:{port}",
                     "--rounds", "2", "--clients", "2", "--steps", "15",
                     "--send", f"{a.ae_title}@127.0.0.1:{a.port}", "--send", f"{b.ae_title}@127.0.0.1:{b.port}")
        wait_port(port, timeout=60, proc=serve)
        clients = [_cli(node, "federate", "join", "modelnode-lung-unet", "--server", f"127.0.0.1:{port}")
                   for node in (a, b)]
        out, err = serve.communicate(timeout=800)
        assert serve.returncode == 0, err[-4000:] + out
        for c in clients:
            c_out, c_err = c.communicate(timeout=60)
            assert c.returncode == 0, c_err[-3000:]
        report = json.loads(out)
        (tmp_path / "federate.json").write_text(out)
        assert report["rounds"] == 2, report
        assert sorted(report["participants"].values()) == [2, 2], report

        # Each node received it by C-STORE, with its lineage.
        for node in (a, b):
            res = node.cli("models", "show", report["uid"], "--json")
            assert res.returncode == 0, res.stderr
            shown = json.loads(res.stdout)
            assert shown["parent_uid"] == parent["uid"]
            assert shown["card"]["provenance"]["performance"]["rounds"] == 2
            ds = pydicom.dcmread(shown["file"], stop_before_pixels=True)
            assert ds.ReferencedInstanceSequence[0].ReferencedSOPInstanceUID == parent["uid"]
        fed_file = shown["file"]

    # At least as good as the parent on each domain's held-out data.
    from iods import model_object
    from models.training.finetune import evaluate

    parent_onnx, card = model_object.decode(pydicom.dcmread(LUNG))
    fed_onnx, _ = model_object.decode(pydicom.dcmread(fed_file))
    scores = {}
    for domain in DOMAINS:
        cases = _heldout_cases(tmp_path, domain)
        scores[domain] = (evaluate(card, parent_onnx, cases)["dice_lung"], evaluate(card, fed_onnx, cases)["dice_lung"])
    (tmp_path / "scores.json").write_text(json.dumps(scores))
    assert all(fed >= par for par, fed in scores.values()), scores
