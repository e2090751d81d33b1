""""Which model fits study X?" over plain C-FIND: the selection query.

A workstation that only has ``findscu`` asks the node's *selection AE title*
(``node.select_ae_title``, default ``MODELNODE_SELECT``) a SERIES-level query. The answers are
the model library's series, **best first**, ranked by :mod:`node.pipeline.selection`; a model that does
not fit is not returned. The identifier says what to rank for, in either of two ways:

* the StudyInstanceUID (or SeriesInstanceUID) of a study stored on the node: its series'
  own headers are used, exactly as the pipeline would;
* the study's descriptors as keys: Modality, BodyPartExamined, StudyDescription,
  SeriesDescription, ProtocolName, RequestedProcedureDescription, ReasonForTheRequestedProcedure,
  Laterality, AnatomicRegionSequence. These are *inputs*, not matching keys.

Return keys are filled from each model's series (Modality, BodyPartExamined, SeriesDescription,
SeriesInstanceUID, SoftwareVersions, ...), so the answer can be fed straight to a C-MOVE or
C-GET. Two keys have a special meaning in the answers: SeriesNumber is the rank (1 = best) and
ImageComments carries the score and its reasons, preceded by ``CONTRADICTION in series ...``
when the pipeline found that series' images contradicting its header (held, or handled as
``selection.on_contradiction`` says; docs/selection.md). Example::

    findscu -S -aec MODELNODE_SELECT HOST 11112 -k QueryRetrieveLevel=SERIES \\
        -k Modality=CT -k BodyPartExamined="THORAX" -k StudyDescription="CT Thorax nativ" \\
        -k SeriesInstanceUID -k SeriesDescription -k SeriesNumber -k ImageComments
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterator, Mapping
from typing import Any

import pydicom
from pydicom.dataset import Dataset

from iods.anatomy import AnatomyNormaliser
from node.dimse.query_scp import (
    Match,
    QueryError,
    _peer,
    compute,
    information_model,
    parse_identifier,
    series_matches,
    stream_responses,
)
from node.dimse.status import IDENTIFIER_DOES_NOT_MATCH
from node.pipeline.selection import Candidate, SelectionIndex, SeriesFacts, select
from node.storage import index
from node.storage.registry import CatalogueEntry

log = logging.getLogger("modelnode.query")

# Identifier keys copied into the pseudo-dataset the selection reads.
DESCRIPTOR_KEYS = (
    "Modality", "BodyPartExamined", "StudyDescription", "SeriesDescription", "ProtocolName",
    "RequestedProcedureDescription", "ReasonForTheRequestedProcedure", "Laterality", "AnatomicRegionSequence",
    "RequestedProcedureCodeSequence", "ReasonForRequestedProcedureCodeSequence", "PerformedProcedureStepDescription",
)


def is_selection_query(event: Any, ctx: Any) -> bool:
    # The called AE title as the peer sent it; assoc.acceptor.ae_title is our own title.
    primitive = getattr(event.assoc.requestor, "primitive", None)
    called = str(getattr(primitive, "called_ae_title", "") or "").strip()
    return bool(ctx.config.node.select_ae_title) and called == ctx.config.node.select_ae_title


def _value(identifier: Dataset, keyword: str) -> str:
    elem = identifier.get(keyword)
    if elem is None or elem in ("", None):
        return ""
    value = str(elem).strip()
    return "" if any(ch in value for ch in "*?\\") else value


def _stored_series(identifier: Dataset) -> list[index.Series]:
    study_uid, series_uid = _value(identifier, "StudyInstanceUID"), _value(identifier, "SeriesInstanceUID")
    if not (study_uid or series_uid):
        return []
    q = index.Series.select().join(index.Study).where(index.Series.is_model == False)  # noqa: E712
    q = q.where(index.Series.series_uid == series_uid) if series_uid else q.where(index.Study.study_uid == study_uid)
    return list(q)


def _facts_for_stored(series: index.Series, ctx: Any, norm: Any) -> SeriesFacts:
    rows = list(index.Instance.select().where(index.Instance.series == series).order_by(index.Instance.sop_uid))
    # Headers only: the pixel data stay deferred on disk.
    datasets = [pydicom.dcmread(ctx.app.store.path(r.digest), defer_size="16 KB") for r in rows]
    return SeriesFacts.from_datasets(datasets, normaliser=norm, called_ae=ctx.config.node.ae_title)


def _facts_for_descriptors(identifier: Dataset, norm: Any) -> SeriesFacts:
    ds = Dataset()
    for keyword in DESCRIPTOR_KEYS:
        if keyword in identifier and identifier.get(keyword) not in (None, ""):
            ds[keyword] = identifier[keyword]
    matches = tuple(sorted(norm.normalise_dataset(ds), key=lambda m: (-m.confidence, m.region.code)))
    lat = str(ds.get("Laterality", "") or "")
    # What a header-only question cannot tell (pixels, slices, geometry) is assumed to fit;
    # the pipeline checks it again on the real series.
    return SeriesFacts(
        modality=str(ds.get("Modality", "") or ""),
        anatomy=matches,
        finding_text=str(ds.get("ReasonForTheRequestedProcedure", "") or ""),
        requested_findings=tuple(str(i.CodeValue) for kw in ("ReasonForRequestedProcedureCodeSequence",
                                                             "RequestedProcedureCodeSequence")
                                 for i in (ds.get(kw) or []) if i.get("CodeValue")),
        slices=1 << 20, samples_per_pixel=1, photometric="", has_pixels=True, volumetric=True,
        laterality=lat if lat in ("L", "R", "B") else "",
    )


def _merge(rankings: list[list[Candidate]]) -> list[Candidate]:
    """Best score per model over several series; the order stays deterministic."""
    best: dict[str, Candidate] = {}
    for ranked in rankings:
        for c in ranked:
            if c.uid not in best or c.score > best[c.uid].score:
                best[c.uid] = c
    out = sorted(best.values(), key=lambda c: c.uid)
    out.sort(key=lambda c: c.name)
    out.sort(key=lambda c: -c.score)
    return out


# The normaliser of the site's synonyms and the index of the registry's catalogue, built once
# and again only when either changes (see handle_selection_find).
_cache_lock = threading.Lock()
_normalisers: dict[tuple[tuple[str, str], ...], AnatomyNormaliser] = {}
_index: tuple[Any, Any, SelectionIndex] | None = None  # (catalogue, normaliser, index)


def _normaliser(synonyms: Mapping[str, str]) -> AnatomyNormaliser:
    key = tuple(sorted(synonyms.items()))
    with _cache_lock:
        norm = _normalisers.get(key)
        if norm is None:
            norm = _normalisers[key] = AnatomyNormaliser(extra_synonyms=dict(synonyms))
        return norm


def _selection_index(catalogue: tuple[CatalogueEntry, ...], norm: AnatomyNormaliser) -> SelectionIndex:
    global _index
    cached = _index
    if cached is not None and cached[0] is catalogue and cached[1] is norm:
        return cached[2]
    built = SelectionIndex([(e.uid, e.card) for e in catalogue], norm)
    _index = (catalogue, norm, built)
    return built


def handle_selection_find(event: Any, ctx: Any) -> Iterator[tuple[int | Dataset, Dataset | None]]:
    """EVT_C_FIND on the selection AE title: ranked model series, best first.

    The registry's cards are parsed once (:meth:`node.storage.registry.Registry.catalogue`) and
    indexed by modality and anatomy (:class:`node.pipeline.selection.SelectionIndex`); only the
    models that may fit are ranked, which gives the ranking of all of them. The answers' rows
    are read in one query and streamed (:func:`node.dimse.query_scp.stream_responses`).
    """
    peer = _peer(event)
    try:
        model = information_model(str(event.request.AffectedSOPClassUID))
        query = parse_identifier(event.identifier, model)
        if query.level != "SERIES":
            raise QueryError(IDENTIFIER_DOES_NOT_MATCH, "selection queries are SERIES level")
    except QueryError as exc:
        log.warning("selection C-FIND from %s refused (0x%04X): %s", peer, exc.status, exc.comment)
        yield exc.status_dataset(), None
        return
    identifier = event.identifier
    norm = _normaliser(ctx.config.anatomy.synonyms or {})
    stored = _stored_series(identifier)
    if stored:
        facts = [_facts_for_stored(s, ctx, norm) for s in stored]
    else:
        facts = [_facts_for_descriptors(identifier, norm)]
    catalogue = ctx.app.registry.catalogue()
    models = _selection_index(catalogue, norm)
    settings = ctx.config.selection
    selections = [select(f, models.candidates(f, settings.min_anatomy), settings, normaliser=norm) for f in facts]
    ranked = _merge([s.ranked for s in selections])
    source = f"{len(stored)} stored series" if stored else "descriptors"
    considered = max(len(s.ranked) + len(s.rejected) for s in selections)
    log.info("selection C-FIND from %s (%s): %d model(s) fit; %d of %d considered (the others target another "
             "modality or unrelated anatomy)\n%s", peer, source, len(ranked), considered, len(catalogue),
             "\n".join(s.explain() for s in selections))

    # What the pipeline found for these series: a contradiction between image and header goes
    # into every answer's ImageComments (the C-FIND itself reads headers only).
    note = _contradictions(stored)
    series_of = {e.uid: e.series_uid for e in catalogue}
    rows = series_matches([series_of[c.uid] for c in ranked])
    answers: list[Match] = []
    for rank, cand in enumerate(ranked, 1):
        match = rows.get(series_of[cand.uid])
        if match is None:
            continue  # (removed meanwhile)
        reasons = "; ".join(f"{p.rule} {p.points:+g}" for p in cand.components)
        match.computed["_rank"] = str(rank)
        match.computed["_comments"] = (note + f"rank {rank}, score {cand.score:g}: {reasons}")[:10240]
        answers.append(match)
    if answers:
        compute(answers, "SERIES", query.computed_needed, bool(query.coded))
    overrides = {"SeriesNumber": _rank_of, "ImageComments": _comments_of}
    yield from stream_responses(event, query, answers, ctx.config.node.ae_title, "selection C-FIND", peer,
                                overrides)


def _contradictions(stored: list[index.Series]) -> str:
    """``"CONTRADICTION ...; "`` for each stored series whose latest job found its images
    contradicting its header (node.pipeline.selection.Contradiction), else ""."""
    from node.pipeline import jobs

    notes = []
    for series in stored:
        keys = [series.series_uid, series.study.study_uid]
        job = jobs.Job.select().where(jobs.Job.group_key.in_(keys)).order_by(jobs.Job.id.desc()).first()
        if job is None or not job.selection:
            continue
        try:
            entries = json.loads(job.selection)
        except ValueError:
            continue
        for entry in entries:
            c = entry.get("facts", {}).get("contradiction") if isinstance(entry, dict) else None
            if c and entry.get("series_uid") == series.series_uid:
                state = "HELD for review" if job.state == "held" else entry.get("contradiction_action", c["policy"])
                notes.append(f"CONTRADICTION in series {series.series_uid} ({state}, job {job.id}): {c['text']}; ")
    return "".join(notes)


def _rank_of(match: Match) -> str:
    return match.computed["_rank"]


def _comments_of(match: Match) -> str:
    return match.computed["_comments"]
