"""Federated rounds with Flower: a FedAvg server app and a client per node (docs/federated.md).

Only weights (the network's Conv/ConvTranspose arrays, in graph order, as Flower's numpy
parameters: no pickling) and case counts leave a node; its reviewed cases stay there. A client
that fails or disconnects mid-round is dropped from that round's aggregate (FedAvg's
``accept_failures``), so the round completes with the others; later rounds go ahead with
``min_clients`` participants, so a site that left does not stall them. Transport security is
Flower's TLS, and clipping with differential privacy is Flower's server-side fixed-clipping
wrapper around FedAvg.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import flwr as fl
import grpc
import numpy as np
import torch
from flwr.common import (
    EvaluateIns,
    EvaluateRes,
    FitIns,
    FitRes,
    Metrics,
    Parameters,
    Scalar,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import DifferentialPrivacyServerSideFixedClipping, FedAvg, Strategy

from iods.card import ModelCard
from models.training import finetune as ft

log = logging.getLogger("modelnode.federate")


@dataclass(frozen=True)
class Privacy:
    """Flower's server-side fixed clipping: each client's update (its weights minus the round's
    global weights) is clipped to L2 norm ``clipping_norm``, and Gaussian noise of standard
    deviation ``noise_multiplier * clipping_norm / sampled_clients`` is added to the average.
    ``noise_multiplier`` 0 clips without noise."""

    noise_multiplier: float
    clipping_norm: float

    def __post_init__(self) -> None:
        if self.noise_multiplier < 0:
            raise ValueError(f"the noise multiplier must be 0 or more, not {self.noise_multiplier}")
        if self.clipping_norm <= 0:
            raise ValueError(f"the clipping norm must be positive, not {self.clipping_norm}")

    def stdev(self, sampled_clients: int) -> float:
        return self.noise_multiplier * self.clipping_norm / sampled_clients


@dataclass
class Outcome:
    weights: list[np.ndarray]
    rounds: int  # the last round that produced an aggregate (0: none did)
    # Every node whose weights entered an aggregate in some round -> its training cases.
    participants: dict[str, int] = field(default_factory=dict)
    evaluation: dict[str, float] = field(default_factory=dict)  # last round, weighted by held-out cases
    seconds_per_round: list[float] = field(default_factory=list)
    failures: dict[int, int] = field(default_factory=dict)  # round -> clients that failed or left in fit


def _weighted(metrics: list[tuple[int, Metrics]]) -> Metrics:
    total = sum(n for n, _ in metrics) or 1
    keys = {k for _, m in metrics for k, v in m.items() if isinstance(v, (int, float))}
    return {k: sum(n * float(m.get(k, 0.0)) for n, m in metrics) / total for k in keys}


class _Recording(Strategy):
    """The outermost strategy: waits for participants, records what the rounds produce.

    It wraps the whole chain (FedAvg, or the DP wrapper around FedAvg) so that the weights it
    records are the global weights the server keeps, noise included.
    """

    def __init__(self, inner: Strategy, outcome: Outcome, *, clients: int, min_clients: int,
                 wait_seconds: float) -> None:
        super().__init__()
        self.inner, self.outcome = inner, outcome
        self.clients, self.min_clients, self.wait_seconds = clients, min_clients, wait_seconds
        self.started = False  # a round has had its full --clients
        self._t = time.perf_counter()

    def __repr__(self) -> str:
        return f"modelnode recording ({self.inner!r})"

    def _wait(self, what: str, server_round: int, client_manager: ClientManager) -> bool:
        # Until a round has started with all the sites, wait for all of them; afterwards a
        # round goes ahead with min_clients, so one site leaving does not stall the others.
        need = self.min_clients if self.started else self.clients
        # Flower's own sample() would wait up to a day; a bounded wait lets the round be skipped.
        if client_manager.wait_for(need, timeout=max(1, int(self.wait_seconds))):
            return True
        log.warning("round %d: %d of %d participant(s) connected after %.0f s; no %s this round",
                    server_round, client_manager.num_available(), need, self.wait_seconds, what)
        return False

    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        return self.inner.initialize_parameters(client_manager)

    def configure_fit(self, server_round: int, parameters: Parameters,
                      client_manager: ClientManager) -> list[tuple[ClientProxy, FitIns]]:
        if not self._wait("training", server_round, client_manager):
            return []
        self.started = True
        return self.inner.configure_fit(server_round, parameters, client_manager)

    def configure_evaluate(self, server_round: int, parameters: Parameters,
                           client_manager: ClientManager) -> list[tuple[ClientProxy, EvaluateIns]]:
        if not self._wait("evaluation", server_round, client_manager):
            return []
        return self.inner.configure_evaluate(server_round, parameters, client_manager)

    def aggregate_fit(self, server_round: int, results: list[tuple[ClientProxy, FitRes]],
                      failures: list[tuple[ClientProxy, FitRes] | BaseException],
                      ) -> tuple[Parameters | None, dict[str, Scalar]]:
        if failures:
            self.outcome.failures[server_round] = len(failures)
            log.warning("round %d: %d client(s) failed or left; aggregating the other %d",
                        server_round, len(failures), len(results))
        params, metrics = self.inner.aggregate_fit(server_round, results, failures)
        if params is not None:
            self.outcome.weights = parameters_to_ndarrays(params)
            self.outcome.rounds = server_round
            for _, res in results:
                self.outcome.participants[str(res.metrics.get("node", "?"))] = int(res.num_examples)
        else:
            # Flower's DP wrapper drops a round with any failure (its noise is sized for the
            # clients sampled); the global weights stay those of the round before.
            log.warning("round %d: no aggregate; the previous weights stay", server_round)
        now = time.perf_counter()
        self.outcome.seconds_per_round.append(round(now - self._t, 1))
        self._t = now
        return params, metrics

    def aggregate_evaluate(self, server_round: int, results: list[tuple[ClientProxy, EvaluateRes]],
                           failures: list[tuple[ClientProxy, EvaluateRes] | BaseException],
                           ) -> tuple[float | None, dict[str, Scalar]]:
        loss, metrics = self.inner.aggregate_evaluate(server_round, results, failures)
        if metrics:
            self.outcome.evaluation = {k: round(float(v), 4) for k, v in metrics.items()}
        return loss, metrics

    def evaluate(self, server_round: int, parameters: Parameters) -> tuple[float, dict[str, Scalar]] | None:
        return self.inner.evaluate(server_round, parameters)


def strategy(outcome: Outcome, *, clients: int, min_clients: int | None = None, steps: int = 20,
             wait_seconds: float = 600.0, privacy: Privacy | None = None) -> Strategy:
    """The strategy ``serve`` hands to Flower, from ``outcome.weights`` (the parent's).

    ``clients`` sites are needed before the first round; later rounds (fit and evaluation) go
    ahead with ``min_clients`` (default: ``clients``). With ``privacy``, FedAvg is wrapped in
    Flower's ``DifferentialPrivacyServerSideFixedClipping``.
    """
    low = clients if min_clients is None else min_clients
    if not 1 <= low <= clients:
        raise ValueError(f"min_clients must be between 1 and clients ({clients}), not {low}")
    inner: Strategy = FedAvg(
        initial_parameters=ndarrays_to_parameters(outcome.weights),
        fraction_fit=1.0, fraction_evaluate=1.0, min_fit_clients=low, min_evaluate_clients=low,
        min_available_clients=low, accept_failures=True,
        on_fit_config_fn=lambda r: {"round": r, "steps": steps},
        fit_metrics_aggregation_fn=_weighted, evaluate_metrics_aggregation_fn=_weighted,
    )
    if privacy is not None:
        # Noise sized for the fewest clients a round may average: when more take part, the
        # average carries more noise than needed, never less.
        inner = DifferentialPrivacyServerSideFixedClipping(
            inner, noise_multiplier=privacy.noise_multiplier, clipping_norm=privacy.clipping_norm,
            num_sampled_clients=low)
    return _Recording(inner, outcome, clients=clients, min_clients=low, wait_seconds=wait_seconds)


def serve(card: ModelCard, parent_onnx: bytes, address: str, *, rounds: int = 2, clients: int = 2,
          min_clients: int | None = None, steps: int = 20, round_timeout: float = 600.0,
          privacy: Privacy | None = None, certificates: tuple[bytes, bytes, bytes] | None = None) -> Outcome:
    """Run ``rounds`` FedAvg rounds from the parent's weights; returns the aggregate.

    ``certificates``: (CA, server certificate, server key), PEM bytes, for TLS (Flower's own).
    """
    torch.set_num_threads(2)
    net = ft.network_from_onnx(card, parent_onnx)
    outcome = Outcome(ft.weights_of(net), 0)
    chosen = strategy(outcome, clients=clients, min_clients=min_clients, steps=steps,
                      wait_seconds=round_timeout, privacy=privacy)
    fl.server.start_server(server_address=address, strategy=chosen, certificates=certificates,
                           config=fl.server.ServerConfig(num_rounds=rounds, round_timeout=round_timeout))
    return outcome


class NodeClient(fl.client.NumPyClient):
    """One node's side: trains on its training cases, evaluates on its held-out cases."""

    def __init__(self, node: str, card: ModelCard, parent_onnx: bytes, train: Sequence[ft.Case],
                 heldout: Sequence[ft.Case]) -> None:
        self.node, self.card, self.train_cases, self.heldout = node, card, list(train), list(heldout)
        self.net = ft.network_from_onnx(card, parent_onnx)

    def get_parameters(self, config):  # type: ignore[no-untyped-def]
        return ft.weights_of(self.net)

    def fit(self, parameters, config):  # type: ignore[no-untyped-def]
        ft.set_weights(self.net, parameters)
        ft.train(self.net, self.card, self.train_cases, steps=int(config.get("steps", 20)), batch=8,
                 seed=20261203 + int(config.get("round", 0)))
        return ft.weights_of(self.net), len(self.train_cases), {"node": self.node}

    def evaluate(self, parameters, config):  # type: ignore[no-untyped-def]
        ft.set_weights(self.net, parameters)
        scores = ft.evaluate(self.card, ft.export(self.net, self.card), self.heldout)
        mean = sum(scores.values()) / max(len(scores), 1)
        return 1.0 - mean, len(self.heldout), {**scores, "node": self.node}


class _Watched(fl.client.NumPyClient):
    """Delegates to the node's client and notes whether the server ever reached it."""

    def __init__(self, client: fl.client.NumPyClient) -> None:
        self.client, self.contacted = client, False

    def get_properties(self, config):  # type: ignore[no-untyped-def]
        self.contacted = True
        return self.client.get_properties(config)

    def get_parameters(self, config):  # type: ignore[no-untyped-def]
        self.contacted = True
        return self.client.get_parameters(config)

    def fit(self, parameters, config):  # type: ignore[no-untyped-def]
        self.contacted = True
        return self.client.fit(parameters, config)

    def evaluate(self, parameters, config):  # type: ignore[no-untyped-def]
        self.contacted = True
        return self.client.evaluate(parameters, config)


def join(address: str, client: fl.client.NumPyClient, *, root_certificates: bytes | None = None,
         max_wait_time: float | None = None) -> None:
    """Take part in the server's rounds until it ends them.

    ``root_certificates``: the CA (PEM bytes) that signed the server's certificate, for TLS.
    ``max_wait_time``: keep trying to connect for that many seconds (None: one attempt). Raises
    ``grpc.RpcError`` when it gives up.
    """
    torch.set_num_threads(2)
    deadline = None if max_wait_time is None else time.monotonic() + max_wait_time
    delay = 0.5
    while True:
        watched = _Watched(client)
        try:
            fl.client.start_client(server_address=address, client=watched.to_client(),
                                   root_certificates=root_certificates)
            return
        except grpc.RpcError as exc:
            # Flower's grpc-bidi transport (flwr 1.42) does not retry a connection that is
            # refused, its max_wait_time notwithstanding, so a site started before the
            # coordinator would fail at once. Retry here, but only while no round has reached
            # us: after that, the server ending or dying is not ours to paper over.
            code = exc.code() if callable(getattr(exc, "code", None)) else None
            if (watched.contacted or code != grpc.StatusCode.UNAVAILABLE or deadline is None
                    or time.monotonic() + delay > deadline):
                raise
            details = exc.details() if callable(getattr(exc, "details", None)) else code
            log.warning("no Flower server at %s yet (%s); trying again in %.1f s", address, details, delay)
            time.sleep(delay)
            delay = min(delay * 2, 10.0)


def network_with(card: ModelCard, parent_onnx: bytes, weights: Sequence[np.ndarray]) -> bytes:
    """The ONNX graph of the parent's architecture with ``weights``."""
    net = ft.network_from_onnx(card, parent_onnx)
    ft.set_weights(net, weights)
    return ft.export(net.eval(), card)
