"""Federated rounds with Flower: a FedAvg server app and a client per node (docs/federated.md).

Only weights (the network's Conv/ConvTranspose arrays, in graph order, as Flower's numpy
parameters: no pickling) and case counts leave a node; its reviewed cases stay there. A client
that fails or disconnects mid-round is dropped from that round's aggregate (FedAvg's
``accept_failures``), so the round completes with the others.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import flwr as fl
import numpy as np
import torch
from flwr.common import Metrics, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server.strategy import FedAvg

from iods.card import ModelCard
from models.training import finetune as ft

log = logging.getLogger("modelnode.federate")


@dataclass
class Outcome:
    weights: list[np.ndarray]
    rounds: int
    participants: dict[str, int] = field(default_factory=dict)  # node -> training cases
    evaluation: dict[str, float] = field(default_factory=dict)  # last round, weighted by held-out cases
    seconds_per_round: list[float] = field(default_factory=list)


def _weighted(metrics: list[tuple[int, Metrics]]) -> Metrics:
    total = sum(n for n, _ in metrics) or 1
    keys = {k for _, m in metrics for k, v in m.items() if isinstance(v, (int, float))}
    return {k: sum(n * float(m.get(k, 0.0)) for n, m in metrics) / total for k in keys}


class _Recording(FedAvg):
    def __init__(self, outcome: Outcome, **kw: Any) -> None:
        super().__init__(**kw)
        self.outcome = outcome
        self._t = time.perf_counter()

    def aggregate_fit(self, server_round, results, failures):  # type: ignore[no-untyped-def]
        if failures:
            log.warning("round %d: %d client(s) failed or left; aggregating the other %d",
                        server_round, len(failures), len(results))
        params, metrics = super().aggregate_fit(server_round, results, failures)
        if params is not None:
            self.outcome.weights = parameters_to_ndarrays(params)
            self.outcome.rounds = server_round
            for _, res in results:
                self.outcome.participants[str(res.metrics.get("node", "?"))] = int(res.num_examples)
        now = time.perf_counter()
        self.outcome.seconds_per_round.append(round(now - self._t, 1))
        self._t = now
        return params, metrics

    def aggregate_evaluate(self, server_round, results, failures):  # type: ignore[no-untyped-def]
        loss, metrics = super().aggregate_evaluate(server_round, results, failures)
        if metrics:
            self.outcome.evaluation = {k: round(float(v), 4) for k, v in metrics.items()}
        return loss, metrics


def serve(card: ModelCard, parent_onnx: bytes, address: str, *, rounds: int = 2, clients: int = 2,
          steps: int = 20, round_timeout: float = 600.0) -> Outcome:
    """Run ``rounds`` FedAvg rounds from the parent's weights; returns the aggregate."""
    torch.set_num_threads(2)
    net = ft.network_from_onnx(card, parent_onnx)
    outcome = Outcome(ft.weights_of(net), 0)
    strategy = _Recording(
        outcome, initial_parameters=ndarrays_to_parameters(outcome.weights),
        fraction_fit=1.0, fraction_evaluate=1.0, min_fit_clients=clients, min_evaluate_clients=clients,
        min_available_clients=clients, accept_failures=True,
        on_fit_config_fn=lambda r: {"round": r, "steps": steps},
        fit_metrics_aggregation_fn=_weighted, evaluate_metrics_aggregation_fn=_weighted,
    )
    fl.server.start_server(server_address=address, strategy=strategy,
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


def join(address: str, client: NodeClient) -> None:
    torch.set_num_threads(2)
    fl.client.start_client(server_address=address, client=client.to_client())


def network_with(card: ModelCard, parent_onnx: bytes, weights: Sequence[np.ndarray]) -> bytes:
    """The ONNX graph of the parent's architecture with ``weights``."""
    net = ft.network_from_onnx(card, parent_onnx)
    ft.set_weights(net, weights)
    return ft.export(net.eval(), card)
