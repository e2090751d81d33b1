"""Training cases for a model from its verdicts: the source series and the labels to learn.

A case is a series with a ``linked`` correction (the labels are the correction's masks) or a
``linked`` acceptance (the labels are the accepted AI result's masks); the latest verdict on a
series wins. ``unknown-source``, ``refused`` and ``unlinked`` verdicts never become cases.
Labels are mapped to the card's classes by segment type (SegmentedPropertyTypeCodeSequence).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import pydicom
from pydicom.dataset import Dataset

from iods.card import ModelCard
from node.review import segs
from node.review.verdicts import Verdict
from node.storage import index
from node.storage.objects import ObjectStore


@dataclass
class LocalCase:
    series_uid: str
    kind: str  # correction | accept
    datasets: list[Dataset]
    labels: dict[str, np.ndarray]  # SOP Instance UID -> bool [rows, cols, classes]


def _labels(masks: segs.Masks, card: ModelCard) -> dict[str, np.ndarray]:
    keys = [f"{c.type.scheme}:{c.type.value}" for c in card.task.classes]
    uids = {u for per in masks.masks.values() for u in per}
    empty = np.zeros((masks.rows, masks.columns), bool)
    return {u: np.stack([masks.masks.get(k, {}).get(u, empty) for k in keys], axis=-1) for u in uids}


def reviewed_cases(model_uid: str, card: ModelCard, store: ObjectStore) -> list[LocalCase]:
    latest: dict[str, Verdict] = {}
    for v in Verdict.select().where(Verdict.model_uid == model_uid, Verdict.state == "linked",
                                    Verdict.kind.in_(("correction", "accept"))).order_by(Verdict.id):
        latest[v.source_series_uid] = v
    cases = []
    for series_uid, v in sorted(latest.items()):
        series = index.Series.get_or_none(index.Series.series_uid == series_uid)
        if series is None:
            continue
        sources = [pydicom.dcmread(store.path(i.digest))
                   for i in index.Instance.select().where(index.Instance.series == series)]
        if v.kind == "correction":
            carrier = pydicom.dcmread(store.path(v.digest))
        else:
            inst = index.Instance.get_or_none(index.Instance.sop_uid == v.result_uid)
            if inst is None:
                continue
            carrier = pydicom.dcmread(store.path(inst.digest))
        labels = _labels(segs.read_masks(carrier), card)
        # Images with no frame in the SEG are empty in it (highdicom omits empty frames).
        empty = np.zeros((int(sources[0].Rows), int(sources[0].Columns), len(card.task.classes)), bool)
        labels = {str(ds.SOPInstanceUID): labels.get(str(ds.SOPInstanceUID), empty) for ds in sources}
        cases.append(LocalCase(series_uid, v.kind, sources, labels))
    return cases


def split(cases: list[LocalCase], heldout_fraction: float = 1 / 3) -> tuple[list[LocalCase], list[LocalCase]]:
    """(train, held out): by a hash of the series UID, so a case stays on its side as cases are added."""
    ordered = sorted(cases, key=lambda c: hashlib.sha256(c.series_uid.encode()).hexdigest())
    n_held = max(1, round(len(ordered) * heldout_fraction))
    return ordered[n_held:], ordered[:n_held]
