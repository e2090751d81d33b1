"""The verdicts per model on the metrics endpoint, read from the database at scrape time.

``modelnode_verdicts{model_uid, verdict}`` (accepted, rejected, corrected, refused),
``modelnode_acceptance_rate{model_uid}`` and ``modelnode_dice_ai_vs_correction{model_uid}``.
Registered by :func:`register` (the Storage SCP's import of :mod:`node.review.intake`).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable
from typing import Any

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from node.ops.metrics import REGISTRY

log = logging.getLogger("modelnode.review")


class VerdictCollector(Collector):
    def describe(self) -> Iterable[Any]:
        return []

    def collect(self) -> Iterable[Any]:
        from node.review.verdicts import all_model_counts
        from node.storage.db import database_proxy

        try:
            with database_proxy.obj.connection_context():
                counts = all_model_counts()
        except Exception as exc:  # a scrape answers even when the database does not
            log.debug("metrics: verdicts unavailable: %s", exc)
            return
        verdicts = GaugeMetricFamily("modelnode_verdicts", "Verdicts on AI results by model",
                                     labels=["model_uid", "verdict"])
        rate = GaugeMetricFamily("modelnode_acceptance_rate", "Accepted / judged results by model",
                                 labels=["model_uid"])
        dice = GaugeMetricFamily("modelnode_dice_ai_vs_correction", "Mean Dice of AI results against corrections",
                                 labels=["model_uid"])
        for uid, c in sorted(counts.items()):
            for key in ("accepted", "rejected", "corrected", "refused"):
                verdicts.add_metric([uid, key], c[key])
            if c["acceptance_rate"] is not None:
                rate.add_metric([uid], c["acceptance_rate"])
            if c["dice_ai_vs_correction"] is not None:
                dice.add_metric([uid], c["dice_ai_vs_correction"])
        yield from (verdicts, rate, dice)


_registered = threading.Lock()
_collector: VerdictCollector | None = None


def register() -> None:
    global _collector
    with _registered:
        if _collector is None:
            _collector = VerdictCollector()
            REGISTRY.register(_collector)
