"""What the node reads from a UPS workitem and what it writes into one (PS3.4 CC.2.5, PS3.3 C.30).

Reading: :func:`check_create` refuses an N-CREATE the standard forbids (state not SCHEDULED,
a Transaction UID given) and fills in what it may (priority, input readiness);
:func:`requested_model` says whether a workitem is addressed to this node, and :func:`parse_task`
turns one that is into a :class:`Task` (which model, which inputs from which peer, where the
results go), refusing a malformed one with the status and the reason.

The coding scheme of the Scheduled Workitem Code Sequence (0040,4018), documented in
docs/dimse.md:

=================================  ==========================  ====================================
Code Value (or Long Code Value)     Coding Scheme Designator    Code Meaning
=================================  ==========================  ====================================
``SELECT``                          ``99MODELNODE``             the node selects the model
a model name or SOP Instance UID    ``99MODELNODE``             any (e.g. "Lung segmentation")
=================================  ==========================  ====================================

Code Value is SH (16 characters): a longer name or a model UID goes in Long Code Value
(0008,0119), as PS3.3 8.8 prescribes. A workitem coded in any other scheme is kept and served
(a worklist for other performers) but not performed by the node.

Writing: :func:`complete` (the Performed Procedure Sequence with the Output Information
Sequence that references the results), :func:`cancel` (the Progress Information Sequence
with the reason and its code), the event information of :func:`state_report` and
:func:`cancel_requested_report`, N-SET (:func:`apply_modifications`) and N-GET
(:func:`attributes`).
"""

from __future__ import annotations

import datetime as _dt
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from pydicom.datadict import dictionary_VR, keyword_for_tag
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence
from pydicom.tag import Tag

from iods.uids import valid_uid
from node.dimse.status import (
    INVALID_ATTRIBUTE_VALUE,
    MISSING_ATTRIBUTE,
    MISSING_ATTRIBUTE_VALUE,
    UPS_STATE_NOT_SCHEDULED,
)
from node.ups.states import CANCELED, COMPLETED, SCHEDULED

SCHEME = "99MODELNODE"
SELECT = "SELECT"
PRIORITIES = ("HIGH", "MEDIUM", "LOW")
READINESS = ("READY", "UNAVAILABLE", "INCOMPLETE")

# Procedure Step Discontinuation Reasons (CID 9300, DCM) the node gives when it cancels.
REASON_UNSPECIFIED = ("110513", "DCM", "Discontinued for unspecified reason")
REASON_INPUTS_MISSING = ("110523", "DCM", "Object Set incomplete")
REASON_NOT_SUPPORTED = ("110522", "DCM", "Object Types not supported")
REASON_FAILURE = ("110501", "DCM", "Equipment failure")

# Attributes an N-SET may not change: the identity of the instance, its state (N-ACTION
# changes that) and the Transaction UID (it proves the right to change, it is not data).
NOT_SETTABLE = frozenset({Tag("SOPClassUID"), Tag("SOPInstanceUID"), Tag("ProcedureStepState"),
                          Tag("TransactionUID")})


class Refused(ValueError):
    """A workitem or request the node cannot take: the DIMSE status and why."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclass(frozen=True)
class Input:
    """One study to retrieve (all of it, or the series named), from ``retrieve_ae``.

    ``retrieve_ae`` is "" for inputs already in the node (Retrieve AE Title = our own)."""

    study_uid: str
    series_uids: tuple[str, ...]
    retrieve_ae: str


@dataclass(frozen=True)
class Task:
    """What a workitem addressed to the node asks for."""

    model: str  # a model name or UID; "" lets the node select
    inputs: tuple[Input, ...]
    destinations: tuple[str, ...] | None  # Output Destination AEs; None: the [export] routes


@dataclass(frozen=True)
class Result:
    """One instance the node made for a workitem (a SEG or an SR)."""

    sop_class: str
    sop_instance: str
    series_uid: str
    study_uid: str


def now_dt() -> str:
    """A DT value for now, local time with its UTC offset."""
    return _dt.datetime.now().astimezone().strftime("%Y%m%d%H%M%S.%f%z")


def text(ds: Dataset, keyword: str) -> str:
    """A single-valued text element as a stripped string ("" when absent or empty)."""
    value = ds.get(keyword)
    if value is None:
        return ""
    if isinstance(value, (list, tuple, MultiValue)):
        value = next(iter(value), "")
    return str(value).strip()


def code_item(value: str, scheme: str, meaning: str) -> Dataset:
    """A code sequence item; a value longer than SH's 16 characters goes in Long Code Value."""
    item = Dataset()
    if len(value) > 16:
        item.LongCodeValue = value
    else:
        item.CodeValue = value
    item.CodingSchemeDesignator = scheme
    item.CodeMeaning = meaning[:64]
    return item


# --------------------------------------------------------------------------- reading


def check_create(ds: Dataset) -> list[str]:
    """Check an N-CREATE Attribute List and fill in what the node may; returns what it filled.

    Raises :class:`Refused` for what PS3.4 CC.2.5.1.1 forbids: a Procedure Step State other
    than SCHEDULED (0xC309), a Transaction UID (0x0106: the claim gives it), an unknown
    priority or input readiness (0x0106).
    """
    if "ProcedureStepState" not in ds:
        raise Refused(MISSING_ATTRIBUTE, "Procedure Step State (0074,1000) is missing (it must be SCHEDULED)")
    state = text(ds, "ProcedureStepState")
    if state != SCHEDULED:
        raise Refused(UPS_STATE_NOT_SCHEDULED, f"Procedure Step State is {state!r}, not SCHEDULED")
    if text(ds, "TransactionUID"):
        raise Refused(INVALID_ATTRIBUTE_VALUE, "a Transaction UID is given by the claim (N-ACTION), not at N-CREATE")
    filled = []
    priority = text(ds, "ScheduledProcedureStepPriority")
    if not priority:
        ds.ScheduledProcedureStepPriority = "MEDIUM"
        filled.append("Scheduled Procedure Step Priority MEDIUM")
    elif priority not in PRIORITIES:
        raise Refused(INVALID_ATTRIBUTE_VALUE, f"Scheduled Procedure Step Priority {priority!r} is not one of "
                      f"{', '.join(PRIORITIES)}")
    readiness = text(ds, "InputReadinessState")
    if not readiness:
        ds.InputReadinessState = "READY"
        filled.append("Input Readiness State READY")
    elif readiness not in READINESS:
        raise Refused(INVALID_ATTRIBUTE_VALUE, f"Input Readiness State {readiness!r} is not one of {', '.join(READINESS)}")
    if "TransactionUID" in ds:
        del ds.TransactionUID
    ds.ScheduledProcedureStepModificationDateTime = now_dt()
    return filled


def requested_model(ds: Dataset) -> str | None:
    """The model a workitem asks the node for: None when no code is in our scheme (not ours to
    perform), "" for SELECT, else the model's name or UID."""
    for item in ds.get("ScheduledWorkitemCodeSequence") or []:
        if text(item, "CodingSchemeDesignator") == SCHEME:
            value = text(item, "LongCodeValue") or text(item, "CodeValue")
            return "" if value.upper() == SELECT else value
    return None


def _retrieve_ae(item: Dataset) -> list[str]:
    found: list[str] = []
    for sub in item.get("DICOMRetrievalSequence") or []:
        found += values(sub.get("RetrieveAETitle"))
    return found + values(item.get("RetrieveAETitle"))


def values(value: object) -> list[str]:
    """A possibly multi-valued text element's values, stripped, without empty ones."""
    if value is None or value == "":
        return []
    if isinstance(value, (list, tuple, MultiValue)):
        return [str(v).strip() for v in value if str(v).strip()]
    return [str(value).strip()] if str(value).strip() else []


def parse_task(ds: Dataset, *, is_peer: Callable[[str], bool], own_ae: str,
               is_model: Callable[[str], bool]) -> Task:
    """The :class:`Task` of a workitem addressed to the node (see :func:`requested_model`).

    Refuses with 0x0120 (Missing Attribute) a workitem without an Input Information Sequence,
    0x0121 (Missing Attribute Value) one whose sequence is empty, and 0x0106 (Invalid Attribute
    Value) an item without a valid Study Instance UID, with a Type of Instances other than
    DICOM, or whose Retrieve AE Title is none of the ``[[peers]]``, an Output Destination that
    is not a peer, and a model that is not registered. Each reason names the item and the
    attribute.
    """
    model = requested_model(ds)
    if model is None:
        raise Refused(INVALID_ATTRIBUTE_VALUE, f"the Scheduled Workitem Code Sequence has no code in scheme {SCHEME}")
    if model and not is_model(model):
        raise Refused(INVALID_ATTRIBUTE_VALUE, f"Scheduled Workitem Code Sequence: no registered model {model!r} "
                      "(a model name or SOP Instance UID, or SELECT)")
    if "InputInformationSequence" not in ds:
        raise Refused(MISSING_ATTRIBUTE, "Input Information Sequence (0040,4021) is missing: the node needs the "
                      "study to run on and the AE to retrieve it from")
    items = ds.InputInformationSequence
    if not items:
        raise Refused(MISSING_ATTRIBUTE_VALUE, "Input Information Sequence (0040,4021) is empty: the node needs the "
                      "study to run on and the AE to retrieve it from")
    by_study: dict[tuple[str, str], list[str] | None] = {}
    for n, item in enumerate(items, 1):
        where = f"Input Information Sequence item {n}"
        kind = text(item, "TypeOfInstances")
        if kind and kind != "DICOM":
            raise Refused(INVALID_ATTRIBUTE_VALUE, f"{where}: Type of Instances {kind!r} is not DICOM")
        study = text(item, "StudyInstanceUID")
        if not valid_uid(study):
            raise Refused(INVALID_ATTRIBUTE_VALUE, f"{where}: no valid Study Instance UID (0020,000D)")
        series = values(item.get("SeriesInstanceUID"))
        series += [text(s, "SeriesInstanceUID") for s in item.get("ReferencedSeriesSequence") or []]
        bad = [s for s in series if not valid_uid(s)]
        if bad:
            raise Refused(INVALID_ATTRIBUTE_VALUE, f"{where}: Series Instance UID {bad[0]!r} is not a UID")
        titles = _retrieve_ae(item)
        if not titles:
            raise Refused(INVALID_ATTRIBUTE_VALUE, f"{where}: no Retrieve AE Title (0008,0054) in its DICOM Retrieval "
                          "Sequence (0040,E021): the node does not know where to retrieve it from")
        ae = next((t for t in titles if t == own_ae), None)
        if ae is not None:
            ae = ""
        else:
            ae = next((t for t in titles if is_peer(t)), None)
        if ae is None:
            raise Refused(INVALID_ATTRIBUTE_VALUE, f"{where}: Retrieve AE Title {'/'.join(titles)!r} is not a "
                          "configured peer ([[peers]])")
        key = (study, ae)
        if not series or by_study.get(key, []) is None:
            by_study[key] = None  # the whole study
        else:
            by_study[key] = [*(by_study.get(key) or []), *series]
    inputs = tuple(Input(study, tuple(dict.fromkeys(series or ())), ae) for (study, ae), series in by_study.items())
    destinations = None
    if "OutputDestinationSequence" in ds:
        destinations = []
        for item in ds.OutputDestinationSequence:
            for storage in item.get("DICOMStorageSequence") or []:
                destinations += values(storage.get("DestinationAE"))
        unknown = [d for d in destinations if not is_peer(d)]
        if unknown:
            raise Refused(INVALID_ATTRIBUTE_VALUE, f"Output Destination Sequence: Destination AE {unknown[0]!r} is not "
                          "a configured peer ([[peers]])")
        destinations = list(dict.fromkeys(destinations))
    return Task(model, inputs, tuple(destinations) if destinations is not None else None)


def final_state_problem(ds: Dataset, state: str) -> str:
    """Why ``ds`` does not meet the final state requirements of ``state`` ("" when it does).

    COMPLETED needs a Unified Procedure Step Performed Procedure Sequence item with the
    Performed Procedure Step End DateTime and an Output Information Sequence (which may be
    empty: Type 2). CANCELED needs nothing the SCP cannot fill in itself (:func:`cancel`).
    """
    if state != COMPLETED:
        return ""
    items = ds.get("UnifiedProcedureStepPerformedProcedureSequence") or []
    if not items:
        return "no Unified Procedure Step Performed Procedure Sequence (0074,1216)"
    item = items[0]
    if not text(item, "PerformedProcedureStepEndDateTime"):
        return "no Performed Procedure Step End DateTime (0040,4051) in the Performed Procedure Sequence"
    if "OutputInformationSequence" not in item:
        return "no Output Information Sequence (0040,4033) in the Performed Procedure Sequence"
    return ""


# --------------------------------------------------------------------------- writing


def request(study_uid: str, retrieve_ae: str, *, series_uids: list[str] | None = None, model: str = "",
            destinations: list[str] | None = None, label: str = "", priority: str = "MEDIUM") -> Dataset:
    """An N-CREATE Attribute List asking the node to run ``model`` (name or UID; "" lets it
    select) on a study, or on some of its series, retrieved from ``retrieve_ae``; results to
    ``destinations`` (None: the node's export routes). What ``modelnode run`` sends."""
    if priority not in PRIORITIES:
        raise ValueError(f"priority {priority!r} is not one of {', '.join(PRIORITIES)}")
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.ProcedureStepState = SCHEDULED
    ds.ScheduledProcedureStepPriority = priority
    ds.InputReadinessState = "READY"
    ds.ProcedureStepLabel = (label or f"{model or 'AI'} on study {study_uid}")[:64]
    ds.ScheduledProcedureStepStartDateTime = now_dt()
    ds.ScheduledWorkitemCodeSequence = [code_item(model or SELECT, SCHEME,
                                                  f"Run {model}" if model else "Select the model that fits")]
    items = []
    for series in series_uids or [None]:
        item = Dataset()
        item.TypeOfInstances = "DICOM"
        item.StudyInstanceUID = study_uid
        if series:
            item.SeriesInstanceUID = series
        item.ReferencedSOPSequence = []
        where = Dataset()
        where.RetrieveAETitle = retrieve_ae
        item.DICOMRetrievalSequence = [where]
        items.append(item)
    ds.InputInformationSequence = items
    if destinations is not None:
        out = Dataset()
        out.DICOMStorageSequence = []
        for ae in destinations:
            storage = Dataset()
            storage.DestinationAE = ae
            out.DICOMStorageSequence.append(storage)
        ds.OutputDestinationSequence = [out]
    return ds


def results_of(ds: Dataset) -> list[str]:
    """The SOP Instance UIDs the Output Information Sequence references."""
    out = []
    for performed in ds.get("UnifiedProcedureStepPerformedProcedureSequence") or []:
        for item in performed.get("OutputInformationSequence") or []:
            out += [text(r, "ReferencedSOPInstanceUID") for r in item.get("ReferencedSOPSequence") or []]
    return out


def output_information(results: Iterable[Result], retrieve_ae: list[str]) -> Sequence:
    """The Output Information Sequence: one item per result series, each instance in its
    Referenced SOP Sequence, retrievable from the AE titles ``retrieve_ae``."""
    by_series: dict[tuple[str, str], list[Result]] = {}
    for r in results:
        by_series.setdefault((r.study_uid, r.series_uid), []).append(r)
    items = []
    for (study, series), members in by_series.items():
        item = Dataset()
        item.TypeOfInstances = "DICOM"
        item.StudyInstanceUID = study
        item.SeriesInstanceUID = series
        refs = []
        for r in members:
            ref = Dataset()
            ref.ReferencedSOPClassUID = r.sop_class
            ref.ReferencedSOPInstanceUID = r.sop_instance
            refs.append(ref)
        item.ReferencedSOPSequence = refs
        where = Dataset()
        where.RetrieveAETitle = retrieve_ae
        item.DICOMRetrievalSequence = [where]
        items.append(item)
    return Sequence(items)


def complete(ds: Dataset, results: list[Result], retrieve_ae: list[str], *, started: str, model: tuple[str, str],
             station: str) -> None:
    """Write what COMPLETED requires: the Performed Procedure Sequence with start and end, the
    model that ran (Performed Workitem Code: ``model`` = (name or UID, meaning)) and the Output
    Information Sequence referencing ``results``."""
    item = Dataset()
    station_code = code_item(station, SCHEME, f"modelnode {station}")
    item.PerformedStationNameCodeSequence = [station_code]
    item.PerformedProcedureStepStartDateTime = started
    item.PerformedProcedureStepEndDateTime = now_dt()
    item.PerformedWorkitemCodeSequence = [code_item(model[0], SCHEME, model[1])] if model[0] else []
    item.OutputInformationSequence = output_information(results, retrieve_ae)
    ds.UnifiedProcedureStepPerformedProcedureSequence = [item]


def cancel(ds: Dataset, reason: str, code: tuple[str, str, str], *, started: str = "") -> None:
    """Write the cancellation: its time, the reason as text (LT) and as a CID 9300 code, in the
    Procedure Step Progress Information Sequence; and the Performed Procedure Sequence's end."""
    progress = (ds.get("ProcedureStepProgressInformationSequence") or [Dataset()])[0]
    progress.ProcedureStepCancellationDateTime = now_dt()
    progress.ReasonForCancellation = reason[:10240]
    progress.ProcedureStepDiscontinuationReasonCodeSequence = [code_item(*code)]
    ds.ProcedureStepProgressInformationSequence = [progress]
    performed = (ds.get("UnifiedProcedureStepPerformedProcedureSequence") or [Dataset()])[0]
    if started and not text(performed, "PerformedProcedureStepStartDateTime"):
        performed.PerformedProcedureStepStartDateTime = started
    performed.PerformedProcedureStepEndDateTime = now_dt()
    if "OutputInformationSequence" not in performed:
        performed.OutputInformationSequence = []
    ds.UnifiedProcedureStepPerformedProcedureSequence = [performed]


def progress(ds: Dataset, percent: float, description: str) -> None:
    """Procedure Step Progress (0-100) and its description, for N-GET and C-FIND."""
    item = (ds.get("ProcedureStepProgressInformationSequence") or [Dataset()])[0]
    item.ProcedureStepProgress = f"{max(0.0, min(100.0, percent)):.0f}"
    item.ProcedureStepProgressDescription = description[:1024]
    ds.ProcedureStepProgressInformationSequence = [item]


def cancellation_reason(ds: Dataset) -> tuple[str, Sequence | None]:
    """(Reason For Cancellation, Discontinuation Reason Code Sequence) as written by :func:`cancel`
    (or by the performer that canceled it)."""
    for item in ds.get("ProcedureStepProgressInformationSequence") or []:
        return text(item, "ReasonForCancellation"), item.get("ProcedureStepDiscontinuationReasonCodeSequence")
    return "", None


def state_report(ds: Dataset, state: str) -> Dataset:
    """Event Information of a UPS State Report (Event Type 1, PS3.4 CC.2.4.2)."""
    info = Dataset()
    info.ProcedureStepState = state
    info.InputReadinessState = text(ds, "InputReadinessState") or "READY"
    if state == CANCELED:
        reason, codes = cancellation_reason(ds)
        if reason:
            info.ReasonForCancellation = reason
        if codes:
            info.ProcedureStepDiscontinuationReasonCodeSequence = codes
    return info


def cancel_requested_report(requesting_ae: str, request: Dataset) -> Dataset:
    """Event Information of UPS Cancel Requested (Event Type 2): who asks, why, whom to call."""
    info = Dataset()
    info.RequestingAE = requesting_ae
    for keyword in ("ReasonForCancellation", "ProcedureStepDiscontinuationReasonCodeSequence",
                    "ContactURI", "ContactDisplayName"):
        if keyword in request:
            setattr(info, keyword, request[keyword].value)
    return info


def apply_modifications(ds: Dataset, modifications: Dataset) -> list[str]:
    """N-SET: replace each element of ``modifications`` in ``ds`` (whole sequences, as PS3.7
    10.1.3 says); returns the keywords changed. Refuses (0x0106) what N-SET may not change."""
    changed = []
    for elem in modifications:
        if elem.tag in NOT_SETTABLE:
            if elem.tag == Tag("TransactionUID"):
                continue
            raise Refused(INVALID_ATTRIBUTE_VALUE, f"{elem.keyword or elem.tag} may not be changed by N-SET"
                          + (" (N-ACTION Change UPS State changes it)" if elem.tag == Tag("ProcedureStepState") else ""))
        if elem.tag.is_private or elem.tag.group in (0x0000, 0x0002):
            continue
        ds[elem.tag] = elem
        changed.append(elem.keyword or str(elem.tag))
    ds.ScheduledProcedureStepModificationDateTime = now_dt()
    return changed


def attributes(ds: Dataset, tags: list[int] | None) -> Dataset:
    """N-GET: the attributes asked for (all when none are), never the Transaction UID (PS3.4
    CC.2.7: it stays with the performer). One asked for but absent comes back empty."""
    out = Dataset()
    wanted = [Tag(t) for t in tags] if tags else [e.tag for e in ds]
    for tag in wanted:
        if tag == Tag("TransactionUID"):
            continue
        if tag in ds:
            out[tag] = ds[tag]
        elif keyword_for_tag(tag):
            out.add_new(tag, dictionary_VR(tag), None)
    if "SpecificCharacterSet" in ds:
        out.SpecificCharacterSet = ds.SpecificCharacterSet
    return out
