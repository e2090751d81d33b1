"""The C-FIND SCP: a query on the index, or a "which model fits" query on the selection AE."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from pydicom.dataset import Dataset

from node.dimse.query_scp import handle_query
from node.dimse.select_scp import handle_selection_find, is_selection_query


def handle_find(event: Any, ctx: Any) -> Iterator[tuple[int | Dataset, Dataset | None]]:
    """EVT_C_FIND handler: selection queries to :mod:`node.dimse.select_scp`, the rest to
    :mod:`node.dimse.query_scp`."""
    if is_selection_query(event, ctx):
        yield from handle_selection_find(event, ctx)
    else:
        yield from handle_query(event, ctx)
