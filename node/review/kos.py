"""Accept and reject as a Key Object Selection document (KOS, modality KO) that a workstation sends.

The verdict is the document title (ConceptNameCodeSequence), coded; the judged result is the
one object the KOS references (CurrentRequestedProcedureEvidenceSequence). Codes accepted:

=====================  ================  ============================================
verdict                 scheme, value     meaning
=====================  ================  ============================================
accept                  99MODELNODE ACCEPTED   AI result accepted
reject                  99MODELNODE REJECTED   AI result rejected
reject                  DCM 113001        Rejected for Quality Reasons (CID 7010)
=====================  ================  ============================================

:func:`build` writes one with highdicom (the command in docs/review.md sends it with storescu).
"""

from __future__ import annotations

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

ACCEPTED = Code("ACCEPTED", "99MODELNODE", "AI result accepted")
REJECTED = Code("REJECTED", "99MODELNODE", "AI result rejected")
VERDICTS = {("99MODELNODE", "ACCEPTED"): "accept", ("99MODELNODE", "REJECTED"): "reject",
            ("DCM", "113001"): "reject"}


def verdict_of(ds: Dataset) -> str | None:
    """``accept``, ``reject`` or None (a KOS that is not a verdict on an AI result)."""
    try:
        code = ds.ConceptNameCodeSequence[0]
    except (AttributeError, IndexError):
        return None
    return VERDICTS.get((str(code.CodingSchemeDesignator), str(code.CodeValue)))


def referenced_uids(ds: Dataset) -> list[str]:
    uids = []
    for study in ds.get("CurrentRequestedProcedureEvidenceSequence", []):
        for series in study.get("ReferencedSeriesSequence", []):
            uids += [str(i.ReferencedSOPInstanceUID) for i in series.get("ReferencedSOPSequence", [])]
    return uids


def build(result: Dataset, verdict: str, *, series_uid: str | None = None, sop_uid: str | None = None,
          observer: str = "Reviewer^") -> Dataset:
    """A KOS that accepts or rejects ``result`` (the AI SEG or SR as stored)."""
    if verdict not in ("accept", "reject"):
        raise ValueError(f"verdict must be accept or reject, not {verdict!r}")
    content = hd.ko.KeyObjectSelection(
        document_title=ACCEPTED if verdict == "accept" else REJECTED,
        referenced_objects=[result],
        observer_person_context=hd.sr.ObserverContext(
            observer_type=codes.DCM.Person,
            observer_identifying_attributes=hd.sr.PersonObserverIdentifyingAttributes(name=observer)),
    )
    return hd.ko.KeyObjectSelectionDocument(
        evidence=[result], content=content,
        series_instance_uid=series_uid or hd.UID(), series_number=901,
        sop_instance_uid=sop_uid or hd.UID(), instance_number=1,
        manufacturer="modelnode review", institution_name=None,
    )
