"""``modelnode config check`` and ``modelnode status``: what an administrator runs first."""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from typing import Any

from node.cli.common import EXIT_INVALID, EXIT_OK
from node.config import ConfigError, load_config


def cmd_config_check(args: argparse.Namespace) -> int:
    path = args.file or args.config
    try:
        cfg = load_config(path)
    except ConfigError as exc:
        print(f"{exc.args[0].splitlines()[0]}:", file=sys.stderr)
        for key, reason in exc.problems:
            print(f"  {key}: {reason}", file=sys.stderr)
        return EXIT_INVALID
    source = cfg.source or "embedded defaults"
    print(f"configuration OK ({source}): AE {cfg.node.ae_title} on {cfg.node.bind}:{cfg.node.port}, "
          f"data {cfg.data_dir}, {len(cfg.peers)} peer(s)")
    return EXIT_OK


def cmd_status(args: argparse.Namespace) -> int:
    from node import jobs, outbox
    from node.app import open_app
    from node.cli.common import config_from_args
    from node.db import _redact
    from node.index import Instance, Study
    from node.registry import ModelRecord

    cfg = config_from_args(args)
    report: dict[str, Any] = {"config": cfg.source or "embedded defaults", "ae_title": cfg.node.ae_title,
                              "port": cfg.node.port, "data_dir": str(cfg.data_dir)}
    try:
        app = open_app(cfg)
    except Exception as exc:  # the database is the one thing status must not crash on
        report["database"] = {"url": _redact(cfg.database_url), "ok": False, "error": str(exc)}
        app = None
    if app is not None:
        try:
            report["database"] = {"url": _redact(cfg.database_url), "ok": True}
            report["instances"] = Instance.select().count()
            report["studies"] = Study.select().count()
            report["models"] = ModelRecord.select().count()
            report["jobs"] = jobs.counts_by_state()
            report["outbox"] = outbox.backlog()
            failed = (jobs.Job.select().where(jobs.Job.state == "failed").order_by(jobs.Job.finished_at.desc()).limit(5))
            report["last_errors"] = [{"job": j.id, "at": str(j.finished_at), "error": j.error} for j in failed]
            dead = (outbox.OutboxItem.select().where(outbox.OutboxItem.state == "dead")
                    .order_by(outbox.OutboxItem.id.desc()).limit(5))
            report["dead_exports"] = [{"sop_uid": d.sop_uid, "to": d.destination, "error": d.last_error} for d in dead]
        finally:
            app.close()
    usage = shutil.disk_usage(cfg.data_dir) if cfg.data_dir.exists() else None
    if usage:
        report["disk"] = {"total_gb": round(usage.total / 1e9, 2), "free_gb": round(usage.free / 1e9, 2),
                          "used_percent": round(100 * (usage.total - usage.free) / usage.total, 1)}
    try:
        from node import scu

        host = "127.0.0.1" if cfg.node.bind in ("0.0.0.0", "::") else cfg.node.bind
        options = scu.Options(calling_ae="MODELNODE-STATUS"[:16], retry=scu.NO_RETRY, connect_timeout=3)
        scu.echo(scu.Address(cfg.node.ae_title, host, cfg.node.port), options)
        report["node_echo"] = f"answering on {host}:{cfg.node.port}"
    except Exception as exc:  # no running node is a fact to report, not a crash
        report["node_echo"] = f"not answering: {exc}"
    if args.json:
        json.dump(report, sys.stdout, indent=2, default=str)
        print()
    else:
        for key, value in report.items():
            if isinstance(value, (dict, list)):
                value = json.dumps(value, default=str)
            print(f"{key:>14}: {value}")
    return EXIT_OK if report.get("database", {}).get("ok") else 1


def register(sub: Any) -> None:
    p = sub.add_parser("config", help="check the configuration file",
                       description="Validate a configuration file; every error is shown with its key and reason.")
    csub = p.add_subparsers(dest="config_command", metavar="ACTION")
    csub.required = True
    sp = csub.add_parser("check", help="validate FILE (default: --config, $MODELNODE_CONFIG or the defaults)")
    sp.add_argument("file", nargs="?", metavar="FILE")
    sp.set_defaults(func=cmd_config_check)
    sp = sub.add_parser("status", help="health: database, queue depth, last errors, disk, and whether the node answers",
                        description="Show the node's state from its database and data directory, and C-ECHO the node.")
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(func=cmd_status)
