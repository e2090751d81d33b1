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
    # The files the configuration names must also load (TLS certificates and keys): checked here
    # rather than in load_config, which every command runs, whoever runs it.
    from node.security import tls

    problems = tls.validate(cfg)
    if problems:
        print(f"{len(problems)} configuration error(s) in {cfg.source or 'embedded defaults'}:", file=sys.stderr)
        for key, reason in problems:
            print(f"  {key}: {reason}", file=sys.stderr)
        return EXIT_INVALID
    for key, reason in _warnings(cfg):
        print(f"warning: {key}: {reason}", file=sys.stderr)
    source = cfg.source or "embedded defaults"
    listening = ", ".join(f"{x.address[0]}:{x.address[1]} ({x.scheme})" for x in tls.listeners(cfg))
    print(f"configuration OK ({source}): AE {cfg.node.ae_title} on {listening}, "
          f"data {cfg.data_dir}, {len(cfg.peers)} peer(s), {len(cfg.users)} user(s)")
    return EXIT_OK


def _warnings(cfg: Any) -> list[tuple[str, str]]:
    """Valid but probably not meant: said, not refused."""
    out: list[tuple[str, str]] = []
    plain = not cfg.tls.enabled or cfg.tls.port
    if cfg.users and plain:
        out.append(("users", "passcodes travel in clear on the plain port; enable [tls] (port = 0 for TLS only)"))
    if cfg.metrics.enabled and cfg.metrics.bind not in ("127.0.0.1", "::1"):
        out.append(("metrics.bind", f"{cfg.metrics.bind} exposes unauthenticated metrics beyond this host"))
    if not cfg.node.allow_list and cfg.node.bind not in ("127.0.0.1", "::1"):
        out.append(("node.allow_list", "off: any caller that reaches the port gets security.default_permissions"))
    return out


def cmd_hash_passcode(args: argparse.Namespace) -> int:
    """Print a [[users]] passcode_hash. The passcode comes from the terminal or stdin, never argv
    (argv is visible to every user in ps and lands in shell history)."""
    import getpass

    from node.security.identity import DEFAULT_ITERATIONS, hash_passcode

    if sys.stdin.isatty():
        passcode = getpass.getpass("passcode: ")
        if getpass.getpass("again: ") != passcode:
            print("modelnode: the two passcodes differ", file=sys.stderr)
            return EXIT_INVALID
    else:
        passcode = sys.stdin.readline().rstrip("\r\n")
    if not passcode:
        print("modelnode: empty passcode", file=sys.stderr)
        return EXIT_INVALID
    print(hash_passcode(passcode, iterations=args.iterations or DEFAULT_ITERATIONS))
    return EXIT_OK


def cmd_status(args: argparse.Namespace) -> int:
    from node.app import open_app
    from node.cli.common import config_from_args
    from node.pipeline import jobs, outbox
    from node.storage.db import _redact
    from node.storage.index import Instance, Study
    from node.storage.registry import ModelRecord

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
            # Jobs waiting for a person: images and header disagree (modelnode jobs show ID).
            held = jobs.Job.select().where(jobs.Job.state == "held").order_by(jobs.Job.id.desc()).limit(10)
            report["held_for_review"] = [{"job": j.id, "since": str(j.finished_at), "why": j.error} for j in held]
            dead = (outbox.OutboxItem.select().where(outbox.OutboxItem.state == "dead")
                    .order_by(outbox.OutboxItem.id.desc()).limit(5))
            report["dead_exports"] = [{"sop_uid": d.sop_uid, "to": d.destination, "error": d.last_error} for d in dead]
        finally:
            app.close()
    usage = shutil.disk_usage(cfg.data_dir) if cfg.data_dir.exists() else None
    if usage:
        report["disk"] = {"total_gb": round(usage.total / 1e9, 2), "free_gb": round(usage.free / 1e9, 2),
                          "used_percent": round(100 * (usage.total - usage.free) / usage.total, 1)}
        report["disk"].update(_disk_guard(cfg))
    report.update(_live(cfg))
    report["last_rejections"] = _last_rejections(cfg)
    try:
        from node.scu import client as scu

        host = "127.0.0.1" if cfg.node.bind in ("0.0.0.0", "::") else cfg.node.bind
        if cfg.tls.enabled and not cfg.tls.port:
            _echo_tls(cfg, host)  # the node's only port speaks TLS
        else:
            options = scu.Options(calling_ae="MODELNODE-STATUS"[:16], retry=scu.NO_RETRY, connect_timeout=3)
            scu.echo(scu.Address(cfg.node.ae_title, host, cfg.node.port), options)
        report["node_echo"] = f"answering on {host}:{cfg.node.port}"
    except scu.AssociationRejected as exc:
        # Up and answering, but not to this probe: the allow-list is on and has no entry for it.
        report["node_echo"] = (f"answering on {host}:{cfg.node.port}, but it rejected the status probe ({exc}); "
                               "add a [[peers]] entry for MODELNODE-STATUS on this host to get a C-ECHO through")
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


def _echo_tls(cfg: Any, host: str) -> None:
    """C-ECHO the local node over TLS. It is our own node on this host: its certificate is
    trusted as is (no name check: we call it by address), and ours is presented when readable."""
    import ssl

    from node.scu import client as scu
    from node.security import tls

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = tls.MINIMUM_VERSION
    ctx.check_hostname = False
    ctx.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
    ctx.load_verify_locations(cfg.tls.certificate)
    if cfg.tls.ca_certificates:
        ctx.load_verify_locations(cfg.tls.ca_certificates)
    try:
        ctx.load_cert_chain(cfg.tls.certificate, cfg.tls.private_key)
    except OSError:
        pass  # not readable by this user: fine unless the node requires client certificates
    # node.scu.client says why a handshake failed (pynetdicom alone reports only "not established").
    options = scu.Options(calling_ae="MODELNODE-STATUS", retry=scu.NO_RETRY, connect_timeout=3, acse_timeout=5,
                          network_timeout=5, dimse_timeout=5, tls=(ctx, None))
    scu.echo(scu.Address(cfg.node.ae_title, host, cfg.node.port), options)


def _disk_guard(cfg: Any) -> dict[str, Any]:
    from node.security.diskguard import DiskGuard

    try:
        state = DiskGuard.from_config(cfg).state()
    except (OSError, ValueError) as exc:
        return {"guard": f"unavailable: {exc}"}
    return {"high_water_percent": cfg.storage.high_water_percent, "low_water_percent": cfg.storage.low_water_percent,
            "accepting_store": bool(state["accepting"])}


def _live(cfg: Any) -> dict[str, Any]:
    """What only the running node knows (associations, refusals), from its metrics endpoint."""
    if not cfg.metrics.enabled:
        return {"associations": "unknown: [metrics] enabled = false"}
    from node.ops import metrics

    host = "127.0.0.1" if cfg.metrics.bind in ("0.0.0.0", "::") else cfg.metrics.bind
    host = f"[{host}]" if ":" in host else host
    try:
        samples = metrics.scrape(f"http://{host}:{cfg.metrics.port}/metrics")
    except Exception as exc:  # the node may be down: that is the answer, not a crash
        return {"associations": f"unknown: metrics endpoint not answering ({exc})"}

    def by(name: str, label: str) -> dict[str, float]:
        return {labels.get(label, ""): value for labels, value in samples.get(name, [])}

    def one(name: str) -> float | None:
        values = samples.get(name)
        return values[0][1] if values else None

    return {
        "associations": {"active": one("modelnode_associations_active"), **by("modelnode_associations_total", "result")},
        "received": {**by("modelnode_instances_received_total", "kind"), "bytes": one("modelnode_bytes_received_total")},
        "store_refused": {k: v for k, v in by("modelnode_store_refused_total", "reason").items() if v},
        "store_accepting": one("modelnode_store_accepting"),
    }


def _last_rejections(cfg: Any, n: int = 5) -> list[dict[str, Any]]:
    from node.ops import audit

    if not cfg.audit.enabled:
        return []
    try:
        events = audit.tail(cfg.audit_path, n, {audit.ASSOCIATION_REJECTED, audit.IDENTITY_REJECTED})
    except OSError as exc:
        return [{"error": f"cannot read {cfg.audit_path}: {exc}"}]
    keys = ("ts", "event", "calling_ae", "address", "user", "reason")
    return [{k: e[k] for k in keys if k in e} for e in events]


def register(sub: Any) -> None:
    p = sub.add_parser("config", help="check the configuration file",
                       description="Validate a configuration file; every error is shown with its key and reason.")
    csub = p.add_subparsers(dest="config_command", metavar="ACTION")
    csub.required = True
    sp = csub.add_parser("check", help="validate FILE (default: --config, $MODELNODE_CONFIG or the defaults)")
    sp.add_argument("file", nargs="?", metavar="FILE")
    sp.set_defaults(func=cmd_config_check)
    sp = csub.add_parser("hash-passcode", help="print a [[users]] passcode_hash for a passcode read from the terminal or stdin")
    sp.add_argument("--iterations", type=int, default=0, help="PBKDF2 iterations (default 600000)")
    sp.set_defaults(func=cmd_hash_passcode)
    sp = sub.add_parser("status", help="health: database, queue depth, last errors, disk, and whether the node answers",
                        description="Show the node's state from its database and data directory, and C-ECHO the node.")
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(func=cmd_status)
