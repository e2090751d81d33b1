"""Presentation contexts of an acceptor: copied cheaply per association, and the requestor's
order of transfer syntaxes honoured. Both reach into ``PresentationContext._transfer_syntax``.
"""

from __future__ import annotations

import copy
from typing import Any

from pynetdicom.presentation import PresentationContext


def copy_contexts(obj: Any, memo: dict[int, Any] | None = None) -> Any:
    """``copy.deepcopy`` for the one call in ``pynetdicom.transport``: the server's contexts.

    Each new association gets its own copy of the ~180 supported presentation contexts;
    ``deepcopy`` took 31 ms per association for objects whose only mutable part is the list of
    transfer syntaxes (UIDs are immutable strings).
    """
    if isinstance(obj, list) and all(type(cx) is PresentationContext for cx in obj):
        copies = []
        for cx in obj:
            new = copy.copy(cx)
            new._transfer_syntax = list(cx._transfer_syntax)
            copies.append(new)
        return copies
    return copy.deepcopy(obj, memo)


def proposed_syntaxes(assoc: Any) -> dict[str, list[str]]:
    """{abstract syntax: transfer syntaxes} as proposed (the first context of each wins)."""
    proposed: dict[str, list[str]] = {}
    for cx in assoc.requestor.primitive.presentation_context_definition_list:
        proposed.setdefault(str(cx.abstract_syntax), [str(ts) for ts in cx.transfer_syntax])
    return proposed


def prefer_requestor_syntaxes(assoc: Any, proposed: dict[str, list[str]] | None = None) -> None:
    """Let the requestor's order of transfer syntaxes decide, not ours.

    pynetdicom accepts, in a context that proposes several transfer syntaxes, the first one of
    the *acceptor's* list that was proposed. A sender knows best what it holds: one with JPEG 2000
    data that proposes JPEG 2000 then Explicit VR Little Endian must not be made to decompress
    (nor, the other way round, to compress lossily). So before negotiation each supported
    context that was proposed gets the requestor's order (of the first context proposed for
    that SOP class), followed by our remaining syntaxes.
    """
    if proposed is None:
        proposed = proposed_syntaxes(assoc)
    for cx in assoc.acceptor.supported_contexts:
        order = proposed.get(str(cx.abstract_syntax))
        if order and len(cx._transfer_syntax) > 1:
            # Reordered in place: the setter would validate every UID again (~10 ms for ~190
            # contexts, on every association); these are the context's own, already valid.
            ours = {str(ts): ts for ts in cx._transfer_syntax}
            first = [ours[ts] for ts in dict.fromkeys(order) if ts in ours]
            cx._transfer_syntax = first + [ts for ts in cx._transfer_syntax if ts not in first]
