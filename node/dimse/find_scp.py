"""The C-FIND SCP: a query on the index, a "which model fits" query on the selection AE, or a
query on UPS workitems (by the SOP class of the request, :mod:`node.ups.scp`)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from pydicom.dataset import Dataset

from node.dimse.query_scp import handle_query
from node.dimse.select_scp import handle_selection_find, is_selection_query
from node.ups import scp as ups_scp


def handle_find(event: Any, ctx: Any, ups: Any = None) -> Iterator[tuple[int | Dataset, Dataset | None]]:
    """EVT_C_FIND handler: workitem queries to ``ups`` (a :class:`node.ups.service.UpsService`,
    when the UPS SCP is on), selection queries to :mod:`node.dimse.select_scp`, the rest to
    :mod:`node.dimse.query_scp`."""
    if ups is not None and ups_scp.is_ups_find(event):
        yield from ups_scp.handle_find(event, ups)
    elif is_selection_query(event, ctx):
        yield from handle_selection_find(event, ctx)
    else:
        yield from handle_query(event, ctx)
