"""Series arrivals for the pipeline: each image stored counts towards its group's completion.

The C-STORE handler (:mod:`node.dimse.store_scp`) calls :func:`note_arrival` for every image
it indexes, in the same transaction as the index row: an acknowledged instance always counts
towards its series' completion, even across a crash. Results and documents (:data:`NOT_IMAGES`)
do not count. The groups (series, or studies, per called AE title) an association delivered to
are kept in its state (:func:`node.dimse.association.state_of`); when it is released or aborted
(:func:`association_ended`), they may complete (see :mod:`node.pipeline.jobs`).
"""

from __future__ import annotations

from typing import Any

from pydicom.dataset import Dataset

from node.context import NodeContext
from node.dimse.association import state_of
from node.pipeline import jobs
from node.storage import index
from node.storage.db import write_transaction

# Modalities of objects that are results or documents, not images a model could run on.
NOT_IMAGES = {"SEG", "SR", "KO", "PR", "REG", "DOC", "RWV", "PLAN", "RTSTRUCT", "RTPLAN", "RTDOSE"}


def note_arrival(ctx: NodeContext, ds: Dataset, assoc: Any, calling: str) -> None:
    """Count the image ``ds``, just indexed, towards its group; inside the index transaction."""
    primitive = getattr(assoc.requestor, "primitive", None)
    called = str(getattr(primitive, "called_ae_title", "") or "").strip()
    pl = ctx.config.pipeline
    group_by = pl.group_by_called_ae.get(called, pl.group_by)
    study = index.text(ds, "StudyInstanceUID")
    key = study if group_by == "study" else index.text(ds, "SeriesInstanceUID")
    groups = state_of(assoc).groups
    jobs.note_arrival(key, group_by=group_by, study_uid=study, called_ae=called[:16], calling_ae=calling[:16],
                      new_association=key not in groups)
    groups.add(key)


def association_ended(ctx: NodeContext, assoc: Any) -> set[str]:
    """Released or aborted: the series it delivered may now complete (see node.pipeline.jobs).

    Returns the group keys (series or study UIDs) it delivered to, for the pipeline."""
    state = state_of(assoc)
    groups = set(state.groups)
    if groups:
        with ctx.write_lock, write_transaction():
            jobs.association_ended(groups)
        state.groups.clear()
    return groups
