"""``modelnode jobs list|show|retry``: the pipeline's queue as an administrator sees it."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from typing import Any

from node.cli.common import EXIT_CONFLICT, EXIT_NOT_FOUND, CliError, config_from_args


def _open(args: argparse.Namespace):
    from node.app import open_app

    return open_app(config_from_args(args))


def _iso(value: Any) -> str:
    return value.isoformat(timespec="seconds") if isinstance(value, dt.datetime) else (str(value) if value else "")


def job_dict(job, exports: list | None = None) -> dict[str, Any]:
    return {
        "id": job.id,
        "state": job.state,
        "outcome": job.outcome,
        "group_by": job.group_by,
        "group_key": job.group_key,
        "study_uid": job.study_uid,
        "called_ae": job.called_ae,
        "calling_ae": job.calling_ae,
        "instances": job.instances,
        "model_uid": job.model_uid,
        "model_name": job.model_name,
        "attempts": job.attempts,
        "error": job.error,
        "results": job.result_uids(),
        "timings": job.timing(),
        "created_at": _iso(job.created_at),
        "started_at": _iso(job.started_at),
        "finished_at": _iso(job.finished_at),
        "selection": json.loads(job.selection) if job.selection else [],
        "exports": exports or [],
    }


def cmd_list(args: argparse.Namespace) -> int:
    from node.pipeline.jobs import Job

    app = _open(args)
    try:
        q = Job.select().order_by(Job.id.desc()).limit(args.limit)
        if args.state:
            q = q.where(Job.state == args.state)
        rows = list(q)
        if args.json:
            json.dump([job_dict(j) for j in rows], sys.stdout, indent=2)
            print()
            return 0
        print(f"{'ID':>5}  {'STATE':<9} {'OUTCOME':<18} {'MODEL':<20} {'N':>4}  {'CREATED':<19}  {'TOTAL s':>7}  GROUP")
        for j in rows:
            total = j.timing().get("total")
            print(f"{j.id:>5}  {j.state:<9} {j.outcome or '-':<18} {(j.model_name or '-')[:20]:<20} {j.instances:>4}  "
                  f"{_iso(j.created_at):<19}  {total if total is not None else '-':>7}  {j.group_by} {j.group_key}")
    finally:
        app.close()
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    from node.pipeline.jobs import Job
    from node.pipeline.outbox import OutboxItem

    app = _open(args)
    try:
        job = Job.get_or_none(Job.id == args.id)
        if job is None:
            raise CliError(f"no job {args.id}", EXIT_NOT_FOUND)
        exports = [{"sop_uid": o.sop_uid, "destination": o.destination, "state": o.state, "attempts": o.attempts,
                    "next_attempt_at": _iso(o.next_attempt_at), "sent_at": _iso(o.sent_at), "last_error": o.last_error}
                   for o in OutboxItem.select().where(OutboxItem.job_id == job.id).order_by(OutboxItem.id)]
        d = job_dict(job, exports)
        if args.png:
            _write_montage(app, job, args.png, args.window)
    finally:
        app.close()
    if args.png and not args.json:
        print(f"wrote the overlay montage of job {job.id} to {args.png}")
    if args.json:
        json.dump(d, sys.stdout, indent=2)
        print()
        return 0
    for key in ("id", "state", "outcome", "group_by", "group_key", "called_ae", "calling_ae", "instances",
                "model_name", "model_uid", "attempts", "error", "created_at", "started_at", "finished_at"):
        print(f"{key:>12}: {d[key] if d[key] not in ('', None) else '-'}")
    print(f"{'timings':>12}: " + (", ".join(f"{k} {v:.3f} s" for k, v in d["timings"].items()) or "-"))
    print(f"{'results':>12}: " + (", ".join(d["results"]) or "-"))
    for e in exports:
        print(f"{'export':>12}: {e['sop_uid']} -> {e['destination']} {e['state']} after {e['attempts']} attempt(s)"
              + (f", last error: {e['last_error']}" if e["last_error"] else ""))
    for sel in d["selection"]:
        print(f"\nselection for series {sel.get('series_uid', '')}:")
        c = sel.get("facts", {}).get("contradiction")
        if c:
            print(f"  CONTRADICTION ({c['policy']}: {sel.get('contradiction_action', '')}): {c['text']}")
            if sel.get("held"):
                print(f"  held for review: modelnode jobs retry {d['id']} --model NAME | --trust image | --trust header")
        for c in sel.get("ranked", []):
            print(f"  {c['name']} {c['version']} score {c['score']:g}")
            for comp in c["components"]:
                print(f"      {comp['rule']:<10} {comp['points']:+g}  {comp['reason']}")
        if not sel.get("ranked") and not c:
            print("  no suitable model")
        for r in sel.get("rejected", []):
            print(f"  rejected {r['name']} {r['version']}: {'; '.join(r['reasons'])}")
    return 0


def _write_montage(app, job, path: str, window: str | None) -> None:
    from node.web import render

    try:
        images = render.load_result(app.store, job)
        data = render.montage_png(images, window=window)
    except render.NothingToShow as exc:
        raise CliError(str(exc), EXIT_NOT_FOUND) from exc
    except render.RenderError as exc:
        raise CliError(str(exc)) from exc
    with open(path, "wb") as fh:
        fh.write(data)


def cmd_retry(args: argparse.Namespace) -> int:
    from node.pipeline import jobs

    app = _open(args)
    try:
        if jobs.Job.get_or_none(jobs.Job.id == args.id) is None:
            raise CliError(f"no job {args.id}", EXIT_NOT_FOUND)
        try:
            job = jobs.retry(args.id, model=args.model or "", trust=args.trust or "")
        except ValueError as exc:
            raise CliError(str(exc), EXIT_CONFLICT) from exc
    finally:
        app.close()
    decided = f" with model {args.model}" if args.model else (f", trusting the {args.trust}" if args.trust else "")
    print(f"job {job.id} queued again{decided} (a running node picks it up within its poll interval)")
    return 0


def register(sub: Any) -> None:
    p = sub.add_parser("jobs", help="list, inspect and retry pipeline jobs",
                       description="The pipeline's durable job queue: each job's selection, timings, errors and exports.")
    jsub = p.add_subparsers(dest="jobs_command", metavar="ACTION")
    jsub.required = True
    sp = jsub.add_parser("list", help="recent jobs, newest first")
    sp.add_argument("--state", choices=["pending", "selected", "running", "done", "failed", "exported", "held"])
    sp.add_argument("--limit", type=int, default=50)
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(func=cmd_list)
    sp = jsub.add_parser("show", help="one job with its selection explanation, timings and exports")
    sp.add_argument("id", type=int)
    sp.add_argument("--json", action="store_true")
    sp.add_argument("--png", metavar="FILE",
                    help="also write the result over its images as a PNG montage (the console's overlay)")
    sp.add_argument("--window", choices=["auto", "lung", "soft", "bone", "brain"],
                    help="window/level preset of the montage (default: lung for a lung result on CT)")
    sp.set_defaults(func=cmd_show)
    sp = jsub.add_parser("retry", help="queue a finished, failed or held job again",
                         description="Queue a job again. On a job held because its images contradict its header, "
                                     "--model or --trust is a person's decision after review.")
    sp.add_argument("id", type=int)
    decide = sp.add_mutually_exclusive_group()
    decide.add_argument("--model", metavar="NAME_OR_UID",
                        help="run this model (still checked against the series), whatever the image check says")
    decide.add_argument("--trust", choices=["image", "header"],
                        help="select on the image check's reading, or on the header's")
    sp.set_defaults(func=cmd_retry)
