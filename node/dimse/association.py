"""What the node knows about one association, kept in one object of its own.

pynetdicom hands every handler the library's ``Association``. The node needs to remember a few
things per association across handlers (its log id, who the peer proved to be, what it may do,
what it stored, which series it delivered): they live in an :class:`AssociationState`, found
with :func:`state_of`, never as attributes stuck onto pynetdicom's objects.

States are held in a weak mapping keyed by the association: one disappears with its
association, and a lookup is a dictionary access (the C-STORE path does one per instance).
"""

from __future__ import annotations

import itertools
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

_ids = itertools.count(1)


@dataclass
class Received:
    """What one association stored, for its images-stored audit summary."""

    images: int = 0
    bytes: int = 0
    sop_uids: list[str] = field(default_factory=list)


@dataclass(eq=False)
class AssociationState:
    """The node's state of one association (acceptor or requestor)."""

    id: str
    # node.security: the identity verdict (an IdentityResult), the user it named, the actions
    # the association may perform (None: not decided at the door) and why it was rejected.
    identity: Any = None
    user: str | None = None
    permissions: frozenset[str] | None = None
    reject_reason: str | None = None
    # node.ops.observer: what it stored, for the audit summary.
    received: Received = field(default_factory=Received)
    # node.pipeline.arrivals: the series (or study) keys it delivered instances to.
    groups: set[str] = field(default_factory=set)
    # node.dimse.retrieve_scp: pynetdicom's own send_c_store, before the node's wrapper.
    library_send_c_store: Callable[..., Any] | None = None


_states: weakref.WeakKeyDictionary[Any, AssociationState] = weakref.WeakKeyDictionary()
_lock = threading.Lock()


def state_of(assoc: Any) -> AssociationState:
    """The state of ``assoc``, created (with a fresh id such as ``a42``) on first use."""
    state = _states.get(assoc)
    if state is None:
        with _lock:
            state = _states.get(assoc)
            if state is None:
                state = _states[assoc] = AssociationState(f"a{next(_ids)}")
    return state


def peek(assoc: Any) -> AssociationState | None:
    """The state of ``assoc`` if it has one; never creates one (for log filters and audit)."""
    if assoc is None:
        return None
    try:
        return _states.get(assoc)
    except TypeError:  # not weak-referenceable: not an association
        return None


def assoc_id(assoc: Any) -> str:
    """A short id for log lines, stable for the life of the association."""
    return state_of(assoc).id
