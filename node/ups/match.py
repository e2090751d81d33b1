"""C-FIND on workitems (UPS Pull, Watch and Query; PS3.4 CC.2.6 with the matching of C.2.2.2).

Workitems are few next to images (one per request), so the node keeps each as a dataset and
matches in Python, after the database has narrowed the rows by the indexed keys it can (SOP
Instance UID, state: :func:`indexed_keys`).

Matching, per key of the identifier:

* empty: universal (the key is returned);
* a string with ``*`` or ``?`` (not in DA, DT, TM, UI): wildcard;
* DA, DT, TM with a ``-``: range, either end open;
* UI with several values: any of them;
* a sequence with one item: some stored item matches every key of that item (an item whose
  keys are all empty matches anything and asks for those keys back);
* anything else: the value, exactly (PN ignoring case).

The Transaction UID is never matched nor returned.
"""

from __future__ import annotations

import fnmatch
import re

from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.tag import Tag

_NO_WILDCARD = frozenset({"DA", "DT", "TM", "UI", "SQ", "US", "SS", "UL", "SL", "FL", "FD", "AT", "OB", "OW", "UN"})
_RANGE = frozenset({"DA", "DT", "TM"})
TRANSACTION_UID = Tag("TransactionUID")


def _strings(value: object) -> list[str]:
    if value is None or value == "":
        return []
    # Only lists are multiple values: a PersonName iterates too, over its characters.
    if isinstance(value, (list, tuple, MultiValue)):
        return [str(v).strip() for v in value]
    return [str(value).strip()]


def _empty(elem: DataElement) -> bool:
    if elem.VR == "SQ":
        return not elem.value or all(_all_empty(item) for item in elem.value)
    return elem.value is None or elem.value == "" or elem.value == []


def _all_empty(item: Dataset) -> bool:
    return all(_empty(e) for e in item)


def _in_range(query: str, value: str) -> bool:
    low, _, high = query.partition("-")
    # Lexical order is time order for DA, TM and DT of the same precision; pad the open end.
    v = value.replace(":", "")
    return (not low or v >= low.strip()) and (not high or v[: len(high.strip())] <= high.strip())


def _value_matches(vr: str, query: object, stored: object) -> bool:
    wanted, have = _strings(query), _strings(stored)
    if vr == "UI" and len(wanted) > 1:
        return any(h in wanted for h in have)
    if not wanted:
        return True
    q = wanted[0] if len(wanted) == 1 else "\\".join(wanted)
    if vr in _RANGE and "-" in q:
        return any(_in_range(q, h) for h in have)
    if vr not in _NO_WILDCARD and ("*" in q or "?" in q):
        pattern = re.compile(fnmatch.translate(q), re.IGNORECASE if vr == "PN" else 0)
        return any(pattern.match(h) for h in have)
    if vr == "PN":
        return any(h.lower() == q.lower() for h in have)
    return q in have if len(wanted) == 1 else "\\".join(have) == q


def matches(identifier: Dataset, ds: Dataset) -> bool:
    """Whether ``ds`` answers ``identifier`` (the rules of this module's docstring)."""
    for elem in identifier:
        if elem.tag in (TRANSACTION_UID, Tag("SpecificCharacterSet"), Tag("QueryRetrieveLevel")):
            continue
        if elem.tag.group in (0x0000, 0x0002) or _empty(elem):
            continue
        stored = ds.get(elem.tag)
        if elem.VR == "SQ":
            if stored is None or stored.VR != "SQ":
                return False
            query_item = elem.value[0]
            if not any(matches(query_item, item) for item in stored.value):
                return False
            continue
        if stored is None:
            return False
        if not _value_matches(elem.VR, elem.value, stored.value):
            return False
    return True


def response(identifier: Dataset, ds: Dataset) -> Dataset:
    """The keys of ``identifier`` with the values ``ds`` holds (empty where it holds none)."""
    out = Dataset()
    for elem in identifier:
        if elem.tag in (TRANSACTION_UID, Tag("QueryRetrieveLevel")) or elem.tag.group in (0x0000, 0x0002):
            continue
        stored = ds.get(elem.tag)
        if stored is None:
            out.add_new(elem.tag, elem.VR, None if elem.VR != "SQ" else [])
        elif elem.VR == "SQ" and elem.value and len(elem.value[0]) and stored.VR == "SQ":
            # Only the sub-keys asked for, from each stored item.
            out.add_new(elem.tag, "SQ", [response(elem.value[0], item) for item in stored.value])
        else:
            out[elem.tag] = stored
    if "SpecificCharacterSet" in ds:
        out.SpecificCharacterSet = ds.SpecificCharacterSet
    return out


def indexed_keys(identifier: Dataset) -> tuple[list[str] | None, list[str] | None]:
    """(SOP Instance UIDs, states) the identifier asks for exactly, for the database to narrow
    the rows with; None where it asks for any."""
    uids = _strings(identifier.get("SOPInstanceUID")) or None
    state = _strings(identifier.get("ProcedureStepState"))
    states = [state[0]] if len(state) == 1 and "*" not in state[0] and "?" not in state[0] else None
    return uids, states
