"""node.pipeline.headstart: the model runs during the quiet time, and the job takes that result only if
it was computed from exactly the files and the model the job has."""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from pathlib import Path

import pydicom
import pytest
from node_proc import node_process
from peers import require, run
from pydicom.dataset import Dataset

from models.training.phantoms import ct_truth, write_ct_series
from node.pipeline.headstart import Ahead, HeadStart

ROOT = Path(__file__).resolve().parent.parent
LUNG = ROOT / "models" / "reference" / "lung_unet.dcm"
SEED, SLICES = 9002, 16


def _ahead(digests: tuple[str, ...], model: str = "1.2.3") -> Ahead:
    return Ahead("1.2.840.1", digests, model, Dataset(), {"model": 0.1})


@pytest.mark.timeout(30)
def test_taken_once_and_only_for_the_same_files_and_model() -> None:
    hs = HeadStart()
    hs.compute("1.2.840.1", lambda: _ahead(("a", "b")))
    assert hs.take("1.2.840.1", ("a", "b"), "9.9") is None, "another model was selected"
    hs.compute("1.2.840.1", lambda: _ahead(("a", "b")))
    assert hs.take("1.2.840.1", ("a", "b", "c"), "1.2.3") is None, "an instance arrived since"
    hs.compute("1.2.840.1", lambda: _ahead(("a", "b")))
    got = hs.take("1.2.840.1", ("a", "b"), "1.2.3")
    assert got is not None and got.timings == {"model": 0.1}
    assert hs.take("1.2.840.1", ("a", "b"), "1.2.3") is None, "taken once"
    assert (hs.taken, hs.dropped) == (1, 2)
    hs.compute("1.2.840.1", lambda: 1 / 0)  # a failure is only a missed head start
    assert hs.take("1.2.840.1", ("a", "b"), "1.2.3") is None


class _OnMessage(logging.Handler):
    """Sets ``event`` when a record whose message contains ``text`` is logged."""

    def __init__(self, text: str, event: threading.Event) -> None:
        super().__init__(logging.DEBUG)
        self.text, self.event = text, event

    def emit(self, record: logging.LogRecord) -> None:
        if self.text in record.getMessage():
            self.event.set()


@pytest.mark.timeout(30)
def test_a_job_waits_for_the_head_start_in_progress() -> None:
    hs = HeadStart()
    started, release, waiting = threading.Event(), threading.Event(), threading.Event()

    def slow() -> Ahead:
        started.set()
        assert release.wait(20)
        return _ahead(("a",))

    # The result exists only after ``release``, which is set only once take() has said it waits:
    # a take() that returned at once instead would get None.
    logger = logging.getLogger("modelnode.headstart")
    handler, level = _OnMessage("waits for the head start in progress", waiting), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    got: list[Ahead | None] = []
    computer = threading.Thread(target=hs.compute, args=("1.2.840.1", slow))
    taker = threading.Thread(target=lambda: got.append(hs.take("1.2.840.1", ("a",), "1.2.3")))
    try:
        computer.start()
        assert started.wait(10)
        taker.start()
        assert waiting.wait(10), "take() did not wait for the computation in progress"
    finally:
        release.set()
        computer.join(10)
        if taker.ident is not None:  # started
            taker.join(10)
        logger.removeHandler(handler)
        logger.setLevel(level)
    assert got and got[0] is not None, "the job ran instead of waiting"
    assert hs.taken == 1


def _jobs(node) -> list[dict]:
    res = node.cli("jobs", "list", "--json")
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


def _wait_job(node, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done = [j for j in _jobs(node) if j["state"] in ("done", "exported", "failed")]
        if done:
            return done[0]
        time.sleep(0.2)
    raise AssertionError(f"no job finished in {timeout} s\n{node.log()[-4000:]}")


def _store(node, paths) -> None:
    run([require("storescu"), "-aec", node.ae_title, "127.0.0.1", str(node.port), *map(str, paths)], timeout=120)


def _seg_frames(node, job: dict) -> tuple[int, set[str], Dataset]:
    """The job's SEG as stored in the node: frames, referenced source instances, dataset."""
    [uid] = job["results"]
    con = sqlite3.connect(f"file:{node.data_dir / 'modelnode.db'}?mode=ro", uri=True, timeout=10)
    try:
        [(digest,)] = con.execute("SELECT digest FROM instance WHERE sop_uid = ?", (uid,)).fetchall()
    finally:
        con.close()
    seg = pydicom.dcmread(node.data_dir / "objects" / digest[:2] / digest[2:4] / f"{digest}.dcm")
    refs = {str(item.ReferencedSOPInstanceUID) for s in seg.ReferencedSeriesSequence
            for item in s.ReferencedInstanceSequence}
    return int(seg.NumberOfFrames), refs, seg


@pytest.mark.timeout(240)
def test_job_takes_the_result_computed_during_the_quiet_time(tmp_path):
    extra = {"pipeline": {"quiet_seconds": 6.0, "poll_seconds": 0.1}, "inference": {"intra_op_threads": 2}}
    with node_process(tmp_path / "node", extra=extra) as node:
        assert node.cli("models", "add", str(LUNG)).returncode == 0
        ct = write_ct_series(tmp_path / "ct", SEED, slices=SLICES)
        _store(node, ct)
        job = _wait_job(node)
        log = node.log()
    assert job["state"] in ("done", "exported"), job
    assert job["timings"].get("computed_ahead") == 1.0, job["timings"]
    assert "head start: modelnode-lung-unet computed for series" in log
    assert "result computed during the quiet time taken" in log
    # The result is the one the job would have made: a SEG on every slice, and right.
    frames, refs, seg = _seg_frames(node, job)
    truth = ct_truth(SEED, slices=SLICES)
    assert refs == set(truth.sop_instance_uids)
    assert seg.SegmentSequence[0].SegmentLabel == "lung" and frames > 0


@pytest.mark.timeout(240)
def test_a_late_instance_is_never_missed(tmp_path):
    """A slice arriving after the head start: the result the job takes covers it too."""
    extra = {"pipeline": {"quiet_seconds": 8.0, "poll_seconds": 0.1}, "inference": {"intra_op_threads": 2}}
    with node_process(tmp_path / "node", extra=extra) as node:
        assert node.cli("models", "add", str(LUNG)).returncode == 0
        ct = sorted(write_ct_series(tmp_path / "ct", SEED, slices=SLICES))
        _store(node, ct[:-1])
        deadline = time.monotonic() + 60
        while f"({SLICES - 1} instance(s))" not in node.log():
            assert time.monotonic() < deadline, node.log()[-4000:]
            time.sleep(0.1)
        _store(node, ct[-1:])  # within the quiet time: the same series, one more slice
        job = _wait_job(node)
        log = node.log()
    assert job["state"] in ("done", "exported"), job
    # Computed again once the second association ended, and that one is taken (the first would
    # have been dropped: tests above).
    assert f"({SLICES} instance(s)) in" in log, log[-4000:]
    assert job["timings"].get("computed_ahead") == 1.0, job["timings"]
    _, refs, _ = _seg_frames(node, job)
    assert len(refs) == SLICES, "the result must cover the late slice too"
