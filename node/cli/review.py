"""``modelnode review``: verdicts on AI results, listed or given from the command line.

``modelnode review list [--model UID] [--json]``; ``modelnode review accept|reject RESULT_UID``
records a verdict on a result this node made, as a KOS received from a workstation would.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from node.cli.common import EXIT_NOT_FOUND, CliError, config_from_args


def cmd_list(args: argparse.Namespace) -> int:
    from node.app import open_app
    from node.review.verdicts import Verdict

    app = open_app(config_from_args(args))
    try:
        q = Verdict.select().order_by(Verdict.id)
        if args.model:
            q = q.where(Verdict.model_uid == args.model)
        rows = [r.summary() for r in q]
    finally:
        app.close()
    if args.json:
        json.dump(rows, sys.stdout, indent=2)
        print()
    else:
        for r in rows:
            dice = ", ".join(f"{k} {v:.3f}" for k, v in r["dice"].items())
            print(f"{r['received_at'][:19]}  {r['kind']:<10} {r['state']:<14} {r['model_uid'] or '-'}  "
                  f"{dice or r['reason']}")
    return 0


def cmd_verdict(args: argparse.Namespace) -> int:
    from node.app import open_app
    from node.ops.audit import AuditLog
    from node.pipeline.jobs import Job
    from node.review.verdicts import Verdict
    from node.storage.db import write_transaction

    config = config_from_args(args)
    app = open_app(config)
    try:
        job = (Job.select().where(Job.results.contains(args.result_uid)).order_by(Job.id.desc()).first())
        if job is None:
            raise CliError(f"no result {args.result_uid} made by this node", EXIT_NOT_FOUND)
        with write_transaction(app.db):
            row = Verdict.create(sop_uid=f"cli:{args.verdict}:{args.result_uid}:{Verdict.select().count() + 1}",
                                 kind=args.verdict, state="linked", result_uid=args.result_uid,
                                 model_uid=job.model_uid, job_id=job.id, source_series_uid=job.group_key,
                                 reviewer=args.reviewer or "", reason=args.reason or "")
    finally:
        app.close()
    AuditLog.from_config(config).record("verdict", kind=args.verdict, state="linked", result_uid=args.result_uid,
                                        model_uid=row.model_uid, reviewer=args.reviewer, source="cli")
    print(f"{args.verdict}ed result {args.result_uid} of model {row.model_uid}")
    return 0


def register(sub: Any) -> None:
    p = sub.add_parser("review", help="verdicts on AI results: list, accept, reject",
                       description="Radiologists' verdicts on the node's AI results (docs/review.md).")
    rsub = p.add_subparsers(dest="review_command", metavar="ACTION")
    rsub.required = True
    sp = rsub.add_parser("list", help="list verdicts")
    sp.add_argument("--model", metavar="UID")
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(func=cmd_list)
    for verdict in ("accept", "reject"):
        sp = rsub.add_parser(verdict, help=f"{verdict} an AI result by its SOP Instance UID")
        sp.add_argument("result_uid", metavar="RESULT_UID")
        sp.add_argument("--reviewer", help="who gives the verdict (audited)")
        sp.add_argument("--reason")
        sp.set_defaults(func=cmd_verdict, verdict=verdict)
