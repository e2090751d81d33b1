"""What a workstation sends back about an AI result: a corrected SEG, or an accept/reject KOS.

The Storage SCP stores and indexes the object like any other (it is clinical data: nothing here
replaces or deletes anything), and calls :func:`note` in the same transaction, which writes a
``received`` verdict row. :func:`process` then runs on this module's own thread, after the
commit: it reads the object, links it to the AI result and the model, checks it, and completes
the row (``linked``) or refuses it as a verdict with the reason, in the log and in the row.

A correction is linked by its source series (ReferencedSeriesSequence) to the latest job of
this node for that series that made a result, and by segment type
(SegmentedPropertyTypeCodeSequence) to the result's segments. A KOS is linked by the result it
references.
"""

from __future__ import annotations

import json
import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pydicom
from pydicom.dataset import Dataset

from node.ops.audit import AuditLog
from node.pipeline.jobs import Job
from node.review import kos, metrics, segs
from node.review.verdicts import Verdict
from node.storage import index
from node.storage.db import write_transaction

log = logging.getLogger("modelnode.review")

# One thread: verdicts are rare and small, and in order per sender.
_worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="review")


def kind_of(ds: Dataset) -> str | None:
    """``correction``, ``accept``, ``reject`` or None for an object that is not a verdict."""
    modality = index.text(ds, "Modality")
    if modality == "SEG":
        return "correction" if segs.is_manual(ds) else None
    if modality == "KO":
        return kos.verdict_of(ds)
    return None


def note(ctx: Any, ds: Dataset, kind: str, digest: str, calling: str) -> None:
    """In the C-STORE's transaction: the row, then processing once the transaction commits."""
    sop_uid = index.text(ds, "SOPInstanceUID")
    Verdict.insert(sop_uid=sop_uid, kind=kind, digest=digest, calling_ae=calling, state="received") \
        .on_conflict_ignore().execute()
    _worker.submit(_process_after_commit, ctx, sop_uid)


def resume(ctx: Any) -> int:
    """At start: process the verdicts a stop or crash left ``received``; returns how many."""
    pending = [v.sop_uid for v in Verdict.select(Verdict.sop_uid).where(Verdict.state == "received")]
    for sop_uid in pending:
        _worker.submit(_process_after_commit, ctx, sop_uid)
    if pending:
        log.info("%d verdict(s) received before the last stop are being linked now", len(pending))
    return len(pending)


def _process_after_commit(ctx: Any, sop_uid: str) -> None:
    with ctx.write_lock:  # held by the C-STORE until its commit
        pass
    try:
        process(ctx, sop_uid)
    except Exception:
        log.exception("verdict %s: processing failed", sop_uid)


def process(ctx: Any, sop_uid: str) -> Verdict | None:
    row = Verdict.get_or_none(Verdict.sop_uid == sop_uid)
    if row is None or row.state != "received":
        return row
    path = ctx.app.store.path(row.digest)
    ds = pydicom.dcmread(path)
    if row.kind == "correction":
        fields = _correction(ctx, ds)
    else:
        fields = _judgement(ds)
    state = fields.get("state", "linked")
    level = logging.INFO if state == "linked" else logging.WARNING
    log.log(level, "verdict %s (%s from %s): %s%s", sop_uid, row.kind, row.calling_ae or "-", state,
            f": {fields['reason']}" if fields.get("reason") else
            f" to model {fields.get('model_uid', '')}, Dice {fields.get('dice', '{}')}")
    with ctx.write_lock, write_transaction(ctx.app.db):
        Verdict.update(state=state, **{k: v for k, v in fields.items() if k != "state"}) \
            .where(Verdict.id == row.id).execute()
    AuditLog.from_config(ctx.config).record(
        "verdict", sop_instance_uid=sop_uid, kind=row.kind, state=state, reason=fields.get("reason"),
        model_uid=fields.get("model_uid"), result_uid=fields.get("result_uid"), calling_ae=row.calling_ae)
    return Verdict.get_by_id(row.id)


def _refused(reason: str, **fields: Any) -> dict[str, Any]:
    return {"state": "refused", "reason": reason, **fields}


def _job_with_result(series_uid: str = "", result_uid: str = "") -> Job | None:
    q = Job.select().where(Job.state.in_(("done", "exported")), Job.results != "[]")
    if series_uid:
        q = q.where(Job.group_key == series_uid)
    if result_uid:
        q = q.where(Job.results.contains(result_uid))
    return q.order_by(Job.finished_at.desc(), Job.id.desc()).first()


def _judgement(ds: Dataset) -> dict[str, Any]:
    uids = kos.referenced_uids(ds)
    for uid in uids:
        job = _job_with_result(result_uid=uid)
        if job is not None:
            return {"result_uid": uid, "model_uid": job.model_uid, "job_id": job.id,
                    "source_series_uid": job.group_key}
    return {"state": "unlinked", "reason": f"references no result of this node ({', '.join(uids) or 'nothing'})"}


def _correction(ctx: Any, ds: Dataset) -> dict[str, Any]:
    try:
        series_uid = str(ds.ReferencedSeriesSequence[0].SeriesInstanceUID)
    except (AttributeError, IndexError):
        return _refused("no ReferencedSeriesSequence: the source series is unknown")
    try:
        corrected = segs.read_masks(ds)
    except (segs.SegmentationError, AttributeError, ValueError) as exc:
        return _refused(str(exc), source_series_uid=series_uid)
    series = index.Series.get_or_none(index.Series.series_uid == series_uid)
    if series is None:
        return {"state": "unknown-source", "source_series_uid": series_uid,
                "reason": "the source series was never received by this node; kept, not trained on"}
    sources = list(index.Instance.select().where(index.Instance.series == series))
    # Geometry: same grid, the same images, the same frame of reference.
    grid = {(s.rows, s.columns) for s in sources}
    if grid != {(corrected.rows, corrected.columns)}:
        return _refused(f"geometry: the SEG is {corrected.rows}x{corrected.columns}, the source series "
                        f"{', '.join(f'{r}x{c}' for r, c in sorted(grid, key=str))}", source_series_uid=series_uid)
    uids = {s.sop_uid for s in sources}
    named = {uid for per in corrected.masks.values() for uid in per}
    if named - uids:
        return _refused(f"geometry: {len(named - uids)} frame(s) reference images not in the source series",
                        source_series_uid=series_uid)
    frames = {s.attributes().get("FrameOfReferenceUID", "") for s in sources} - {""}
    if corrected.frame_of_reference and frames and frames != {corrected.frame_of_reference}:
        return _refused("geometry: FrameOfReferenceUID differs from the source series'", source_series_uid=series_uid)
    if not any(m.any() for per in corrected.masks.values() for m in per.values()):
        return _refused("empty: no segment has a pixel set", source_series_uid=series_uid)
    job = _job_with_result(series_uid=series_uid)
    if job is None:
        return {"state": "unlinked", "source_series_uid": series_uid,
                "reason": "this node made no result for the source series"}
    ai, result_uid = _ai_masks(ctx, job)
    if ai is None:
        return {"state": "unlinked", "source_series_uid": series_uid, "job_id": job.id, "model_uid": job.model_uid,
                "reason": "the job's result is no longer stored or is not a SEG"}
    unknown = sorted(t.meaning for k, t in corrected.types.items() if k not in ai.types)
    if unknown:
        return _refused(f"segment types not among the model's classes: {', '.join(unknown)}",
                        source_series_uid=series_uid, model_uid=job.model_uid, job_id=job.id, result_uid=result_uid)
    order = sorted(uids)
    dice = {ai.types[k].label or ai.types[k].meaning: round(segs.dice(ai.masks[k], corrected.masks[k], order,
                                                 (corrected.rows, corrected.columns)), 4)
            for k in corrected.types}
    return {"source_series_uid": series_uid, "result_uid": result_uid, "model_uid": job.model_uid,
            "job_id": job.id, "dice": json.dumps(dice)}


def _ai_masks(ctx: Any, job: Job) -> tuple[segs.Masks | None, str]:
    for uid in json.loads(job.results or "[]"):
        inst = index.Instance.get_or_none(index.Instance.sop_uid == uid)
        if inst is None or index.Series.get_by_id(inst.series_id).modality != "SEG":
            continue
        path: Path = ctx.app.store.path(inst.digest)
        try:
            return segs.read_masks(pydicom.dcmread(path)), uid
        except (OSError, segs.SegmentationError) as exc:
            log.warning("job %s: result %s cannot be read back: %s", job.id, uid, exc)
    return None, ""


metrics.register()
