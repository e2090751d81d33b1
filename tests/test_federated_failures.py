"""Federated rounds when sites fail, leave, or are not who they should be (docs/federated.md).

Real processes on loopback: ``modelnode federate serve`` with the reference lung model, and
Flower clients from tests/fed_client.py: the node's own client on two tiny phantom series
(``honest``), and a bare flwr client that ends its process inside ``fit`` (``die``). Each waits
on events (a port, a process exit); none sleeps a fixed time.

* A client that disconnects mid-round: the round completes with the other one, its aggregate is
  bit for bit what the honest client returned (FedAvg of one result), the server logs the
  "failed or left" line, and a second round goes ahead with the one client left
  (``--min-clients 1``).
* No round completes (the only client dies): nothing is packed, exit 6.
* TLS: with the CA a client completes a round; a plaintext client and one trusting another CA are
  refused (never asked to train). That round also runs with clipping and noise, which the new
  version's card records.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pydicom
import pytest
from certs import make_pki
from fed_client import HONEST, digest
from node_proc import MODELNODE, REPO, write_config
from peers import free_port, wait_port

pytest.importorskip("torch")
pytest.importorskip("flwr")

LUNG = REPO / "models" / "reference" / "lung_unet.dcm"
CLIENT = Path(__file__).resolve().parent / "fed_client.py"
ENV = {k: v for k, v in os.environ.items() if k not in ("MODELNODE_CONFIG", "MODELNODE_DATA_DIR")}


@pytest.fixture(scope="module")
def coordinator(tmp_path_factory) -> Path:
    """A coordinator's configuration with the lung model in its registry (no node running)."""
    d = tmp_path_factory.mktemp("coordinator")
    cfg = write_config(d / "modelnode.toml", {
        "node": {"ae_title": "COORD", "bind": "127.0.0.1", "port": free_port()},
        "storage": {"data_dir": str(d / "data")},
        "models": {"register_reference": False},
    }, [])
    res = subprocess.run([*MODELNODE, "--config", str(cfg), "models", "add", str(LUNG)], cwd=REPO, env=ENV,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    return cfg


class Proc:
    """A child process with its output in files (a pipe nobody reads would fill and block it)."""

    def __init__(self, name: str, cmd: list[str], workdir: Path) -> None:
        self.out, self.err = workdir / f"{name}.out", workdir / f"{name}.err"
        with open(self.out, "wb") as out, open(self.err, "wb") as err:
            self.proc = subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=out, stderr=err)

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"still running after {timeout} s\n{self.said()}") from None

    def said(self) -> str:
        return f"--- stdout ---\n{self.out.read_text()[-3000:]}\n--- stderr ---\n{self.err.read_text()[-6000:]}"

    def stop(self) -> None:
        """By its own pid; SIGKILL if it ignores SIGTERM."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def _wait_for_text(p: Proc, text: str, timeout: float) -> None:
    """Until ``text`` shows in the process's stderr (polling the file; the process is not ours
    to block on)."""
    deadline = time.monotonic() + timeout
    while text not in p.err.read_text(errors="replace"):
        if p.proc.poll() is not None:
            raise AssertionError(f"exited {p.proc.returncode} before saying {text!r}\n{p.said()}")
        if time.monotonic() > deadline:
            raise AssertionError(f"{text!r} not said after {timeout} s\n{p.said()}")
        time.sleep(0.1)


def _serve(cfg: Path, port: int, workdir: Path, *options: str) -> Proc:
    p = Proc("serve", [*MODELNODE, "--config", str(cfg), "federate", "serve", "modelnode-lung-unet",
                       "--address", f"127.0.0.1:{port}", "--steps", "1", *options], workdir)
    try:
        wait_port(port, timeout=120, proc=p.proc)
    except Exception as exc:
        p.stop()
        raise AssertionError(f"{exc}\n{p.said()}") from exc
    return p


def _client(role: str, port: int, out: Path, *options: str) -> Proc:
    out.mkdir(parents=True, exist_ok=True)
    return Proc(role, [sys.executable, str(CLIENT), role, f"127.0.0.1:{port}", str(out), *options], out)


def _packed_digest(path: str) -> str:
    from iods import model_object
    from models.training import finetune as ft

    onnx_bytes, card = model_object.decode(pydicom.dcmread(path))
    return digest(ft.weights_of(ft.network_from_onnx(card, onnx_bytes)))


def _federated_dir(cfg: Path) -> list[Path]:
    d = cfg.parent / "data" / "federated"
    return sorted(d.iterdir()) if d.exists() else []


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_client_dying_mid_round_is_left_out_and_the_next_round_goes_on_without_it(coordinator, tmp_path):
    before = _federated_dir(coordinator)
    port = free_port()
    t0 = time.monotonic()
    # The honest site starts before the coordinator: join keeps trying until it is there.
    honest = _client("honest", port, tmp_path / "honest", "--wait", "120")
    procs = [honest]
    try:
        _wait_for_text(honest, f"no Flower server at 127.0.0.1:{port} yet", 120)
        serve = _serve(coordinator, port, tmp_path, "--rounds", "2", "--clients", "2", "--min-clients", "1",
                       "--round-timeout", "120")
        procs.append(serve)
        dying = _client("die", port, tmp_path / "die")
        procs.append(dying)
        assert dying.wait(120) == 1, dying.said()
        assert serve.wait(180) == 0, serve.said()
        assert honest.wait(60) == 0, honest.said()
        seconds = time.monotonic() - t0
    finally:
        for p in procs:
            p.stop()
    report = json.loads(serve.out.read_text())
    (tmp_path / "report.json").write_text(json.dumps({**report, "wall_seconds": round(seconds, 1)}))
    # The dying client was asked to train in round 1 and died there.
    assert (tmp_path / "die" / "fit").read_text() == "1"
    err = serve.err.read_text()
    assert "round 1: 1 client(s) failed or left; aggregating the other 1" in err, err[-4000:]
    assert report["failures"] == {"1": 1}, report
    # Only the honest client is in the aggregate and the lineage.
    assert report["rounds"] == 2, report
    assert report["participants"] == {HONEST: 1}, report
    h = tmp_path / "honest"
    # Round 1's aggregate (what round 2 started from) is bit for bit the honest client's result,
    # and so is the packed version after round 2: nothing of the dead client mixed in.
    assert (h / "recv-2").read_text() == (h / "sent-1").read_text()
    assert (h / "recv-1").read_text() != (h / "sent-1").read_text()  # it did train
    assert _packed_digest(report["object"]) == (h / "sent-2").read_text()
    # One new object, no partial file or temporary directory left beside it.
    assert _federated_dir(coordinator) == sorted([*before, Path(report["object"])])
    ds = pydicom.dcmread(report["object"], stop_before_pixels=True)
    assert str(ds.SOPInstanceUID) == report["uid"]


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_no_round_completes_so_nothing_is_packed(coordinator, tmp_path):
    before = _federated_dir(coordinator)
    port = free_port()
    # The evaluation after the failed round waits --round-timeout for a client that is gone.
    serve = _serve(coordinator, port, tmp_path, "--rounds", "1", "--clients", "1", "--round-timeout", "3")
    dying = _client("die", port, tmp_path / "die")
    try:
        assert dying.wait(120) == 1, dying.said()
        assert serve.wait(120) == 6, serve.said()
    finally:
        for p in (dying, serve):
            p.stop()
    err = serve.err.read_text()
    assert "round 1: 1 client(s) failed or left; aggregating the other 0" in err, err[-4000:]
    assert "no round completed; nothing packed" in err
    assert serve.out.read_text() == ""
    assert _federated_dir(coordinator) == before


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_tls_admits_the_client_with_the_ca_and_refuses_plaintext_and_another_ca(coordinator, tmp_path):
    pki = make_pki(tmp_path / "pki")
    port = free_port()
    serve = _serve(coordinator, port, tmp_path, "--rounds", "1", "--clients", "1", "--round-timeout", "120",
                   "--tls-ca", str(pki.ca), "--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key),
                   "--dp-clipping-norm", "5", "--dp-noise-multiplier", "0.01")
    procs = [serve]
    try:
        # Refused ones first: were either let in, the server (--clients 1) would ask it to train.
        plain = _client("die", port, tmp_path / "plain", "--wait", "3")
        rogue = _client("die", port, tmp_path / "rogue", "--ca", str(tmp_path / "pki" / "rogue-ca.crt"),
                        "--wait", "3")
        procs += [plain, rogue]
        assert plain.wait(120) != 0 and rogue.wait(120) != 0
        assert serve.proc.poll() is None, serve.said()
        honest = _client("honest", port, tmp_path / "honest", "--ca", str(pki.ca), "--wait", "60")
        procs.append(honest)
        assert serve.wait(180) == 0, serve.said()
        assert honest.wait(60) == 0, honest.said()
    finally:
        for p in procs:
            p.stop()
    for name in ("plain", "rogue"):
        assert not (tmp_path / name / "fit").exists(), f"the {name} client was asked to train"
    assert "CERTIFICATE_VERIFY_FAILED" in rogue.err.read_text()
    report = json.loads(serve.out.read_text())
    assert report["tls"] is True and report["rounds"] == 1, report
    assert report["participants"] == {HONEST: 1}, report
    assert report["privacy"] == {"noise_multiplier": 0.01, "clipping_norm": 5.0}, report
    assert "central DP noise with 0.0500 stdev added" in serve.err.read_text()
    # The new version's card says that it was trained with clipping and noise, and how.
    from iods import model_object

    _, card = model_object.decode(pydicom.dcmread(report["object"]))
    perf = card.provenance.performance
    assert (perf["dp_clipping_norm"], perf["dp_noise_multiplier"], perf["dp_noise_stdev"]) == (5.0, 0.01, 0.05)
    assert "differential privacy: Flower server-side fixed clipping, clipping norm 5" in card.provenance.training_data
    assert "--dp-clipping-norm 5 --dp-noise-multiplier 0.01" in card.provenance.training_command
    audit = [json.loads(line) for line in (coordinator.parent / "data" / "audit.jsonl").read_text().splitlines()]
    [event] = [e for e in audit if e["event"] == "model-federated" and e.get("model_uid") == report["uid"]]
    assert event["tls"] is True and event["privacy"] == report["privacy"], event
    # With noise, the aggregate is no longer what the client sent.
    assert _packed_digest(report["object"]) != (tmp_path / "honest" / "sent-1").read_text()


@pytest.mark.timeout(60)
def test_privacy_wraps_fedavg_in_flowers_server_side_fixed_clipping():
    import numpy as np
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters
    from flwr.server.strategy import DifferentialPrivacyServerSideFixedClipping, FedAvg

    from models.training import federated

    parent = [np.zeros((2, 2), np.float32), np.zeros(3, np.float32)]
    outcome = federated.Outcome([a.copy() for a in parent], 0)
    chosen = federated.strategy(outcome, clients=3, min_clients=2, privacy=federated.Privacy(0.0, 0.5))
    dp = chosen.inner
    assert isinstance(dp, DifferentialPrivacyServerSideFixedClipping)
    # The noise is sized for the fewest clients a round may average (--min-clients).
    assert (dp.noise_multiplier, dp.clipping_norm, dp.num_sampled_clients) == (0.0, 0.5, 2)
    fedavg = dp.strategy
    assert isinstance(fedavg, FedAvg) and fedavg.accept_failures
    assert (fedavg.min_fit_clients, fedavg.min_evaluate_clients, fedavg.min_available_clients) == (2, 2, 2)
    assert federated.Privacy(1.0, 0.5).stdev(2) == 0.25

    # Flower clips: an update of L2 norm 10 reaches the aggregate at norm 0.5 (no noise here).
    dp.current_round_params = parent  # what Flower's configure_fit sets from the global weights
    update = [np.full((2, 2), 5.0, np.float32), np.zeros(3, np.float32)]
    res = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(update), 4, {"node": "A"})
    params, _ = chosen.aggregate_fit(1, [(None, res)], [])
    assert params is not None and outcome.rounds == 1 and outcome.participants == {"A": 4}
    np.testing.assert_allclose(outcome.weights[0], np.full((2, 2), 0.25), rtol=1e-6)
    # A round with a failure is dropped by Flower's DP wrapper; the previous weights stay.
    res = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(update), 4, {"node": "B"})
    params, _ = chosen.aggregate_fit(2, [(None, res)], [RuntimeError("left")])
    assert params is None and outcome.rounds == 1 and outcome.failures == {2: 1}
    assert outcome.participants == {"A": 4}

    plain = federated.strategy(federated.Outcome(parent, 0), clients=2)
    assert isinstance(plain.inner, FedAvg) and plain.inner.min_fit_clients == 2
    with pytest.raises(ValueError, match="min_clients"):
        federated.strategy(federated.Outcome(parent, 0), clients=2, min_clients=3)


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("options", "code", "message"), [
    (["--tls-ca", "{ca}"], 2, "TLS needs all three of --tls-ca, --tls-cert and --tls-key"),
    (["--tls-ca", "{missing}", "--tls-cert", "{ca}", "--tls-key", "{ca}"], 4, "--tls-ca {missing}: No such file"),
    (["--tls-ca", "{ca}", "--tls-cert", "{notpem}", "--tls-key", "{ca}"], 3, "--tls-cert {notpem} is not a PEM file"),
    (["--clients", "2", "--min-clients", "3"], 2, "--min-clients must be between 1 and --clients (2), not 3"),
    (["--min-clients", "0"], 2, "--min-clients must be between 1"),
    (["--dp-noise-multiplier", "1"], 2, "--dp-noise-multiplier needs --dp-clipping-norm"),
    (["--dp-clipping-norm", "0"], 2, "the clipping norm must be positive"),
    (["--dp-clipping-norm", "1", "--dp-noise-multiplier", "-1"], 2, "the noise multiplier must be 0 or more"),
])
def test_serve_refuses_bad_options_before_waiting_for_anyone(tmp_path, capsys, options, code, message):
    from node.cli import main

    paths = {"ca": tmp_path / "ca.pem", "missing": tmp_path / "missing.pem", "notpem": tmp_path / "cert.der"}
    paths["ca"].write_text("-----BEGIN CERTIFICATE-----\n-----END CERTIFICATE-----\n")
    paths["notpem"].write_bytes(b"\x30\x82\x01\x0a")
    fill = {k: str(v) for k, v in paths.items()}
    # No configuration is read (the file does not exist): options are checked first.
    argv = ["--config", str(tmp_path / "absent.toml"), "federate", "serve", "modelnode-lung-unet",
            *(o.format(**fill) for o in options)]
    assert main(argv) == code
    assert message.format(**fill) in capsys.readouterr().err


@pytest.mark.timeout(60)
def test_join_refuses_a_missing_ca_file(tmp_path, capsys):
    from node.cli import main

    missing = tmp_path / "ca.pem"
    assert main(["--config", str(tmp_path / "absent.toml"), "federate", "join", "modelnode-lung-unet",
                 "--tls-ca", str(missing)]) == 4
    assert f"--tls-ca {missing}: No such file" in capsys.readouterr().err


@pytest.mark.timeout(120)
def test_join_that_cannot_reach_the_server_exits_6_after_its_connect_timeout(tmp_path, monkeypatch, capsys,
                                                                               caplog):
    """The node's side stands in for a node with reviewed cases (two phantom series); what is
    tested is join's connection path: it retries, gives up, and says so with exit 6."""
    from types import SimpleNamespace

    import numpy as np

    from iods import model_object
    from models.training.phantoms import ct_truth, write_ct_series
    from node.cli import federate, main
    from node.learning.cases import LocalCase

    onnx_bytes, card = model_object.decode(pydicom.dcmread(LUNG))
    cases = []
    for seed in (8811, 8812):
        paths = write_ct_series(tmp_path / str(seed), seed, slices=2, size=128)
        truth = ct_truth(seed, slices=2, size=128)
        labels = {u: np.stack([truth.lung[i], truth.nodule[i]], -1) for i, u in enumerate(truth.sop_instance_uids)}
        cases.append(LocalCase(str(seed), "correction", [pydicom.dcmread(p) for p in paths], labels))
    monkeypatch.setattr(federate, "config_from_args",
                        lambda args: SimpleNamespace(node=SimpleNamespace(ae_title="SITE", port=11112)))
    monkeypatch.setattr(federate, "_parent", lambda config, name: (None, onnx_bytes, card, cases))
    port = free_port()  # nothing listens there
    t0 = time.monotonic()
    assert main(["federate", "join", "modelnode-lung-unet", "--server", f"127.0.0.1:{port}",
                 "--connect-timeout", "2"]) == 6
    # It tried again (back-off from 0.5 s) before giving up, rather than failing on the first refusal.
    assert 0.5 < time.monotonic() - t0 < 60
    assert f"no Flower server at 127.0.0.1:{port} yet" in caplog.text
    assert f"could not take part in rounds at 127.0.0.1:{port}" in capsys.readouterr().err
