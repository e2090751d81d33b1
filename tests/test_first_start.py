"""A node's first start: the shipped reference models are registered, and only then.

The first test runs the node the way ``scripts/run`` does once it has set up ``.venv``:
``modelnode serve`` in the repository root, with no configuration file (the embedded defaults)
and only the environment, here ``MODELNODE_DATA_DIR`` pointing at an empty directory. It does
not run ``scripts/run`` itself: that script installs what is missing (Debian packages, the
project into ``.venv`` when setup.cfg changed), which a test must not do. ``--bind`` and
``--port`` (overrides ``modelnode serve`` accepts) keep it on a free loopback port; nothing else
differs from what a user gets. Then dcmtk's storescu sends a generated chest CT and the SEG of
the lung U-Net must appear in the node, with no other command: the 3D thorax U-Net fits a chest
CT with the same score, and the ranking's last key (the name) puts the lung U-Net first
(docs/reference-models.md).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pydicom
import pytest
from node_proc import MODELNODE, REPO, NodeProcess, node_process, query
from peers import free_port, require, run, stop, wait_port

from models.training.phantoms import write_ct_series

SEGMENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
LUNG_MODEL = "modelnode-lung-unet"
THORAX_3D = "modelnode-thorax-unet3d"
REFERENCE_NAMES = {"modelnode-lung-unet", "modelnode-bodypart-cnn", "modelnode-thorax-unet3d"}
CT_SEED, CT_SLICES = 9001, 24




def models_in(data_dir: Path) -> dict[str, str]:
    """{name: uid} of the registered models, read straight from the node's database."""
    return dict(query(data_dir / "modelnode.db", "SELECT name, uid FROM modelrecord"))


def poll(predicate, timeout: float, what: str, log: Path | None = None):
    """``predicate()`` until it is truthy. For database states only: the node sends no event."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            tail = log.read_text(errors="replace")[-4000:] if log is not None and log.exists() else ""
            raise AssertionError(f"timed out after {timeout} s waiting for {what}\n{tail}")
        time.sleep(0.1)


@contextmanager
def serve_like_scripts_run(workdir: Path) -> Iterator[tuple[int, Path, Path]]:
    """``modelnode serve`` on the embedded defaults, data in an empty directory; yields (port, data, log)."""
    data_dir, log_path = workdir / "data", workdir / "node.log"
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "MODELNODE_CONFIG"}
    env.update(MODELNODE_DATA_DIR=str(data_dir), PYTHONUNBUFFERED="1")
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([*MODELNODE, "serve", "--bind", "127.0.0.1", "--port", str(port)],
                                stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env)
    try:
        wait_port(port, 60, proc)
        yield port, data_dir, log_path
    finally:
        stop(proc, 30)


@pytest.mark.peers
@pytest.mark.slow
@pytest.mark.timeout(180)
def test_first_start_segments_a_chest_ct_with_no_other_command(tmp_path: Path) -> None:
    require("storescu")
    ct = write_ct_series(tmp_path / "ct", CT_SEED, slices=CT_SLICES)
    study_uid = str(pydicom.dcmread(ct[0], stop_before_pixels=True).StudyInstanceUID)
    with serve_like_scripts_run(tmp_path / "node") as (port, data_dir, log_path):
        # Registered before the port opened: one INFO line per model with name, version and UID.
        models = models_in(data_dir)
        assert set(models) == REFERENCE_NAMES, models
        log = log_path.read_text()
        for name, uid in models.items():
            line = rf"INFO +node\.registry: model registered: {re.escape(name)} \S+ \({re.escape(uid)}\) from reference$"
            assert len(re.findall(line, log, re.MULTILINE)) == 1, log

        run(["storescu", "-aec", "MODELNODE", "127.0.0.1", str(port), *map(str, ct)], timeout=120)

        db = data_dir / "modelnode.db"
        done = poll(lambda: query(db, "SELECT state, outcome, model_name, results, selection FROM job WHERE state IN "
                                      "('done', 'failed', 'exported')"), 120, "the job to finish", log_path)
        [(state, outcome, model_name, results, selection)] = done
        assert (state, outcome, model_name) == ("done", "result", LUNG_MODEL), done
        # Both CT chest models fit with the same score; the name orders them (docs/reference-models.md).
        [explained] = json.loads(selection)
        ranked = [(c["name"], c["score"]) for c in explained["ranked"]]
        assert [n for n, _ in ranked] == [LUNG_MODEL, THORAX_3D] and ranked[0][1] == ranked[1][1], ranked
        [seg_uid] = json.loads(results)
        rows = query(db, "SELECT i.sop_class_uid, st.study_uid FROM instance i JOIN series s ON s.id = i.series_id "
                         "JOIN study st ON st.id = s.study_id WHERE i.sop_uid = ?", seg_uid)
        assert rows == [(SEGMENTATION_STORAGE, study_uid)]


@pytest.mark.timeout(60)
def test_register_reference_false_leaves_the_registry_empty(tmp_path: Path) -> None:
    # node_proc writes [models] register_reference = false unless told otherwise.
    with node_process(tmp_path / "node") as node:
        assert "register_reference = false" in node.config_path.read_text()
        assert models_in(node.data_dir) == {}
        assert "reference model" not in node.log() and "model registered" not in node.log()


@pytest.mark.timeout(90)
def test_removed_reference_models_stay_removed_after_a_restart(tmp_path: Path) -> None:
    node = NodeProcess.start(tmp_path / "node", reference_models=True)
    try:
        models = models_in(node.data_dir)
        assert set(models) == REFERENCE_NAMES
        for uid in models.values():
            res = node.cli("models", "remove", uid)
            assert res.returncode == 0, res.stderr
        assert models_in(node.data_dir) == {}
        node.restart()
        assert models_in(node.data_dir) == {}
        assert node.log().count("registering the 3 shipped reference model(s)") == 1, node.log()
    finally:
        node.stop()


@pytest.mark.timeout(60)
def test_a_restart_of_a_new_node_registers_nothing_twice(tmp_path: Path) -> None:
    node = NodeProcess.start(tmp_path / "node", reference_models=True)
    try:
        first = models_in(node.data_dir)
        node.restart()
        assert models_in(node.data_dir) == first
        assert node.log().count("model registered:") == len(REFERENCE_NAMES), node.log()
    finally:
        node.stop()


@pytest.mark.timeout(60)
def test_reference_models_unit(tmp_path: Path) -> None:
    """In-process: the registry's view of 'new', and a file that fails verification."""
    from node.app import open_app
    from node.config import parse_config
    from node.storage.registry import reference_model_files, register_reference_models

    files = reference_model_files()
    assert [f.name for f in files] == ["bodypart_cnn.dcm", "lung_unet.dcm", "thorax_unet3d.dcm"]
    app = open_app(parse_config({"storage": {"data_dir": str(tmp_path / "data")}}))
    try:
        broken = tmp_path / "broken.dcm"
        broken.write_bytes(files[0].read_bytes()[:-4096])
        # A broken file is skipped (logged), the others are registered.
        added = register_reference_models(app.registry, [broken, files[1]])
        assert [r.name for r in added] == [LUNG_MODEL]
        assert register_reference_models(app.registry) == []  # not new any more
        app.registry.remove(added[0].uid)
        assert not app.registry.never_held_a_model()
        assert register_reference_models(app.registry) == []
    finally:
        app.close()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("value", ['"yes"', "1"])
def test_register_reference_must_be_a_boolean(tmp_path: Path, value: str) -> None:
    cfg = tmp_path / "modelnode.toml"
    cfg.write_text(f"[models]\nregister_reference = {value}\n")
    res = subprocess.run([*MODELNODE, "config", "check", str(cfg)], capture_output=True, text=True, timeout=60,
                         cwd=REPO)
    assert res.returncode == 3, res.stdout + res.stderr
    assert "models.register_reference: must be bool" in res.stdout + res.stderr
