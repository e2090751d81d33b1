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
    from node.review.verdicts import NoSuchResult, record_judgement

    config = config_from_args(args)
    app = open_app(config)
    try:
        row = record_judgement(args.result_uid, args.verdict, reviewer=args.reviewer or "", reason=args.reason or "",
                               source="cli", audit=AuditLog.from_config(config))
    except NoSuchResult as exc:
        raise CliError(str(exc), EXIT_NOT_FOUND) from exc
    finally:
        app.close()
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
