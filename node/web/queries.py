"""What the console's pages show, read from the node's tables and audit log (no web imports).

Each function returns plain dicts and lists for a template; the database must be bound and
connected (the pages open a connection per request).
"""

from __future__ import annotations

import datetime as _dt
import json
import shutil
from typing import Any

import peewee

from node.ops import audit
from node.pipeline import jobs, outbox
from node.pipeline.jobs import Job
from node.review import verdicts
from node.storage import index
from node.storage.registry import Filters, ModelRecord, ModelTerm
from node.ups.store import Workitem

JOB_STATES = ("pending", "selected", "running", "done", "failed", "exported", "held")
PAGE_SIZE = 50


def _iso(value: Any) -> str:
    return value.isoformat(sep=" ", timespec="seconds") if isinstance(value, _dt.datetime) else (str(value or ""))


def overview(cfg: Any, now: _dt.datetime | None = None) -> dict[str, Any]:
    now = now or _dt.datetime.now()
    hour_ago = now - _dt.timedelta(hours=1)
    counts = jobs.counts_by_state()
    # The audit log's timestamps are UTC; the tables' are the node's local time.
    since = (_dt.datetime.now(_dt.UTC) - _dt.timedelta(hours=1)).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    recent = [e for e in audit.tail(cfg.audit_path, n=5000, max_bytes=4 << 20) if str(e.get("ts", "")) >= since]
    accepted = sum(1 for e in recent if e.get("event") == audit.ASSOCIATION_ACCEPTED)
    rejected = [e for e in recent if e.get("event") in (audit.ASSOCIATION_REJECTED, audit.IDENTITY_REJECTED)]
    usage = shutil.disk_usage(cfg.data_dir) if cfg.data_dir.exists() else None
    failed = Job.select().where(Job.state == "failed").order_by(Job.finished_at.desc()).limit(5)
    dead = (outbox.OutboxItem.select().where(outbox.OutboxItem.state == "dead")
            .order_by(outbox.OutboxItem.id.desc()).limit(5))
    return {
        "associations_hour": accepted,
        "rejections_hour": len(rejected),
        "instances_hour": index.Instance.select().where(index.Instance.received_at >= hour_ago).count(),
        "queue_depth": sum(counts.get(s, 0) for s in ("pending", "selected", "running")),
        "jobs_by_state": {s: counts.get(s, 0) for s in JOB_STATES if counts.get(s, 0)} or {},
        "outbox": outbox.backlog(),
        "dead_letters": [{"sop_uid": d.sop_uid, "to": d.destination, "error": d.last_error, "job_id": d.job_id}
                         for d in dead],
        "disk": {"total_gb": round(usage.total / 1e9, 1), "free_gb": round(usage.free / 1e9, 1),
                 "used_percent": round(100 * (usage.total - usage.free) / usage.total, 1),
                 "high_water_percent": cfg.storage.high_water_percent} if usage else None,
        "last_errors": [{"job_id": j.id, "at": _iso(j.finished_at), "error": j.error} for j in failed],
        "last_rejections": [{"at": e.get("ts", ""), "event": e.get("event"), "calling_ae": e.get("calling_ae", ""),
                             "reason": e.get("reason", "")} for e in rejected[-5:]],
        "recent_jobs": [job_row(j) for j in Job.select().order_by(Job.id.desc()).limit(10)],
        "models": ModelRecord.select().count(),
    }


def job_row(j: Job) -> dict[str, Any]:
    return {"id": j.id, "state": j.state, "outcome": j.outcome, "model_name": j.model_name, "model_uid": j.model_uid,
            "instances": j.instances, "created_at": _iso(j.created_at), "total": j.timing().get("total"),
            "group_by": j.group_by, "called_ae": j.called_ae, "calling_ae": j.calling_ae, "error": j.error}


def job_list(*, state: str = "", model: str = "", outcome: str = "", page: int = 1) -> dict[str, Any]:
    q = Job.select(Job.id, Job.state, Job.outcome, Job.model_name, Job.model_uid, Job.instances, Job.created_at,
                   Job.timings, Job.group_by, Job.called_ae, Job.calling_ae, Job.error)
    if state:
        q = q.where(Job.state == state)
    if model:
        q = q.where((Job.model_uid == model) | (Job.model_name == model))
    if outcome:
        q = q.where(Job.outcome == outcome)
    total = q.count()
    pages = max(1, -(-total // PAGE_SIZE))
    page = min(max(1, page), pages)
    rows = [job_row(j) for j in q.order_by(Job.id.desc()).paginate(page, PAGE_SIZE)]
    outcomes = [o for (o,) in Job.select(Job.outcome).distinct().where(Job.outcome != "").tuples()]
    models = [(u, n) for (u, n) in Job.select(Job.model_uid, Job.model_name).distinct()
              .where(Job.model_uid != "").tuples()]
    return {"rows": rows, "total": total, "page": page, "pages": pages, "outcomes": sorted(outcomes),
            "models": sorted(models, key=lambda m: m[1])}


# Stage names in the job's timings, in the order they happen, with what the timeline calls them.
TIMELINE_STAGES = (
    ("waited_since_last_instance", "quiet", "the series was quiet: waiting since the last instance"),
    ("load", "load", "read and decode the series"),
    ("select", "selected", "the model chosen for the series"),
    ("waited_for_head_start", "head start", "waited for the inference started during the quiet time"),
    ("session", "session", "ONNX Runtime session ready"),
    ("decode", "decode", "pixels decoded for the model"),
    ("preprocess", "preprocess", "intensity and resampling"),
    ("model", "inference", "ONNX Runtime"),
    ("model_and_blend", "inference", "ONNX Runtime, sliding window and blending"),
    ("postprocess", "postprocess", "thresholds and masks back on the source grid"),
    ("build_result", "encode", "the SEG or SR built"),
    ("store_result", "stored", "result stored and indexed"),
)


def timeline(job: Job) -> list[dict[str, Any]]:
    """The job's stages as (name, seconds, start offset) for a bar chart, received first."""
    t = job.timing()
    steps: list[dict[str, Any]] = []
    offset = 0.0
    known = {k for k, _, _ in TIMELINE_STAGES} | {"total", "inference_total", "computed_ahead"}
    ordered = list(TIMELINE_STAGES) + [(k, k.replace("_", " "), "") for k in t if k not in known]
    for key, label, hint in ordered:
        if key not in t:
            continue
        seconds = float(t[key])
        steps.append({"key": key, "label": label, "hint": hint, "seconds": seconds, "start": offset})
        offset += max(seconds, 0.0)
    span = max(offset, 1e-6)
    for s in steps:
        s["left"] = round(100 * s["start"] / span, 2)
        s["width"] = round(max(100 * s["seconds"] / span, 0.4), 2)
    return steps


def job_detail(job: Job) -> dict[str, Any]:
    exports = [{"sop_uid": o.sop_uid, "destination": o.destination, "state": o.state, "attempts": o.attempts,
                "sent_at": _iso(o.sent_at), "last_error": o.last_error}
               for o in outbox.OutboxItem.select().where(outbox.OutboxItem.job_id == job.id).order_by(outbox.OutboxItem.id)]
    results = []
    for uid in job.result_uids():
        row = index.Instance.get_or_none(index.Instance.sop_uid == uid)
        results.append({"uid": uid, "sop_class_uid": row.sop_class_uid if row else "",
                        "kind": ("SEG" if row and row.sop_class_uid.endswith(".66.4") else "SR" if row else "missing"),
                        "verdicts": [v.summary() for v in verdicts.Verdict.select()
                                     .where(verdicts.Verdict.result_uid == uid).order_by(verdicts.Verdict.id)]})
    events = [("received", _iso(job.created_at)), ("started", _iso(job.started_at)), ("finished", _iso(job.finished_at))]
    return {
        "job": job_row(job), "study_uid": job.study_uid, "group_key": job.group_key, "attempts": job.attempts,
        "events": [(k, v) for k, v in events if v], "timeline": timeline(job), "timings": job.timing(),
        # The model ran during the quiet time (node.pipeline.headstart): its stages overlap the wait.
        "computed_ahead": bool(job.timing().get("computed_ahead")),
        "selection": json.loads(job.selection) if job.selection else [], "exports": exports, "results": results,
    }


def _term_options(kind: str) -> list[tuple[str, str]]:
    rows = (ModelTerm.select(ModelTerm.value, ModelTerm.meaning).distinct().where(ModelTerm.kind == kind)
            .order_by(ModelTerm.value).tuples())
    return [(v, m or v) for v, m in rows]


def model_list(registry: Any, *, modality: str = "", anatomy: str = "", finding: str = "") -> dict[str, Any]:
    records = registry.list(Filters(modality=modality, anatomy=anatomy, finding=finding))
    counts = verdicts.all_model_counts()
    ran = dict(Job.select(Job.model_uid, peewee.fn.COUNT(Job.id)).where(Job.model_uid != "")
               .group_by(Job.model_uid).tuples())
    rows = []
    for r in records:
        card = r.card
        rows.append({"uid": r.uid, "name": r.name, "version": r.version, "task": r.task,
                     "modalities": list(card.target.modalities),
                     "anatomy": [c.meaning or c.value for c in card.target.anatomy],
                     "findings": [c.meaning or c.value for c in card.target.findings],
                     "parent_uid": r.parent_uid, "jobs": ran.get(r.uid, 0),
                     "acceptance_rate": (counts.get(r.uid) or {}).get("acceptance_rate")})
    return {"rows": rows, "modalities": _term_options("modality"), "anatomies": _term_options("anatomy"),
            "findings": _term_options("finding")}


def lineage(uid: str) -> list[list[dict[str, str]]]:
    """The model's version tree as generations: its ancestors, it, its descendants."""
    by_uid = {r.uid: r for r in ModelRecord.select(ModelRecord.uid, ModelRecord.name, ModelRecord.version,
                                                   ModelRecord.parent_uid)}
    chain = []
    seen: set[str] = set()
    cur = by_uid.get(uid)
    while cur is not None and cur.uid not in seen:
        seen.add(cur.uid)
        chain.append(cur)
        cur = by_uid.get(cur.parent_uid) if cur.parent_uid else None
    generations: list[list[dict[str, str]]] = []
    for r in reversed(chain):
        generations.append([{"uid": r.uid, "name": r.name, "version": r.version, "parent": r.parent_uid}])
    # A parent named on the card but not registered here: shown, greyed.
    if chain and chain[-1].parent_uid and chain[-1].parent_uid not in by_uid:
        generations.insert(0, [{"uid": chain[-1].parent_uid, "name": "(not registered)", "version": "", "parent": ""}])
    frontier = {uid}
    while frontier:
        children = [r for r in by_uid.values() if r.parent_uid in frontier and r.uid not in seen]
        if not children:
            break
        seen.update(c.uid for c in children)
        generations.append([{"uid": c.uid, "name": c.name, "version": c.version, "parent": c.parent_uid}
                            for c in sorted(children, key=lambda c: c.version)])
        frontier = {c.uid for c in children}
    return generations


def model_detail(record: ModelRecord) -> dict[str, Any]:
    from node.storage.registry import record_summary

    ran = Job.select().where(Job.model_uid == record.uid).order_by(Job.id.desc()).limit(50)
    return {"summary": record_summary(record), "verdicts": verdicts.model_counts(record.uid),
            "lineage": lineage(record.uid), "jobs": [job_row(j) for j in ran],
            "card_json": json.dumps(json.loads(record.card_json), indent=2)}


def workitems(limit: int = 100) -> list[dict[str, Any]]:
    out = []
    for w in Workitem.select().order_by(Workitem.id.desc()).limit(limit):
        job_ids = w.jobs()
        results = []
        for j in Job.select().where(Job.id.in_(job_ids)) if job_ids else []:
            results.extend({"job_id": j.id, "uid": u} for u in j.result_uids())
        out.append({"uid": w.uid, "state": w.state, "label": w.label, "priority": w.priority,
                    "requester": w.requester, "performed_here": w.performed_here, "stage": w.stage,
                    "jobs": job_ids, "results": results, "reason": w.reason or w.cancel_requested,
                    "remote_ae": w.remote_ae, "created_at": _iso(w.created_at), "finished_at": _iso(w.finished_at)})
    return out
