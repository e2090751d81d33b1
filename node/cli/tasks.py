"""``modelnode run`` and ``modelnode tasks list|show|cancel``: AI on request from a shell.

``run`` is a Task Requester: it creates a UPS workitem on the running node (N-CREATE), which
retrieves the study from the peer by C-MOVE (or C-GET), runs the model and sends the results
on, exactly as for a workitem from a RIS or PACS. ``--wait`` follows it to its end (N-GET).
``tasks list`` and ``tasks show`` read the node's database; ``tasks cancel`` asks the running
node (N-ACTION Request UPS Cancel), so that the performer stops and the subscribers hear of it.

The node is called at its configured AE title on 127.0.0.1 (or ``[node] bind``) and
``[node] port``, or at ``--node AE@HOST:PORT``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time
from typing import Any

from node.cli.common import (
    EXIT_CONFLICT,
    EXIT_ERROR,
    EXIT_INVALID,
    EXIT_NOT_FOUND,
    EXIT_PEER,
    EXIT_USAGE,
    CliError,
    config_from_args,
)

# Attributes ``run --wait`` reads at each poll (an empty N-GET list would work too, but makes
# pynetdicom 3.0.4's request logger raise inside the node).
_POLLED = [0x00741000, 0x00741002, 0x00741216]
FINAL = ("COMPLETED", "CANCELED")


def _iso(value: Any) -> str:
    return value.isoformat(timespec="seconds") if isinstance(value, dt.datetime) else (str(value) if value else "")


def _node_address(args: argparse.Namespace, cfg: Any) -> Any:
    from node.scu.client import Address

    if getattr(args, "node", None):
        try:
            return Address.parse(args.node)
        except ValueError as exc:
            raise CliError(f"--node: {exc}", EXIT_USAGE) from exc
    host = cfg.node.bind if cfg.node.bind not in ("0.0.0.0", "::", "") else "127.0.0.1"
    return Address(cfg.node.ae_title, host, cfg.node.port)


def _options(cfg: Any, args: argparse.Namespace) -> Any:
    from node.scu.client import Options, RetryPolicy
    from node.security import tls

    # The node's own port speaks TLS when [tls] is on without a port of its own (node.security.tls).
    own_tls = cfg.tls.enabled and not cfg.tls.port and not getattr(args, "node", None)
    return Options(calling_ae=cfg.node.ae_title, acse_timeout=args.timeout, dimse_timeout=args.timeout,
                   network_timeout=args.timeout, connect_timeout=min(args.timeout, 10.0),
                   retry=RetryPolicy(attempts=2), tls=(tls.client_context(cfg), None) if own_tls else None)


# --------------------------------------------------------------------------- run


def cmd_run(args: argparse.Namespace) -> int:
    from pydicom.uid import generate_uid

    from node.dimse.status import category
    from node.scu import ups as ups_scu
    from node.scu.client import PeerError
    from node.ups import workitem

    cfg = config_from_args(args)
    if cfg.peer(args.source) is None and args.source != cfg.node.ae_title:
        raise CliError(f"--from {args.source!r} is not a configured peer ([[peers]]): the node could not call it",
                       EXIT_USAGE)
    for ae in args.output or []:
        if cfg.peer(ae) is None:
            raise CliError(f"--output {ae!r} is not a configured peer ([[peers]])", EXIT_USAGE)
    try:
        ds = workitem.request(args.study, args.source, series_uids=args.series, model=args.model or "",
                              destinations=args.output, label=args.label or "", priority=args.priority)
    except ValueError as exc:
        raise CliError(str(exc), EXIT_USAGE) from exc
    node = _node_address(args, cfg)
    options = _options(cfg, args)
    uid = args.uid or str(generate_uid())
    try:
        answer = ups_scu.create(node, ds, uid, options)
    except PeerError as exc:
        raise CliError(f"the node is not answering: {exc}", EXIT_PEER) from exc
    if category(answer.status) == "failure":
        raise CliError(f"{node} refused the workitem with 0x{answer.status:04X}: {answer.comment}", EXIT_INVALID)
    print(f"workitem {uid} created on {node}: retrieving study {args.study} from {args.source}"
          + (f" (0x{answer.status:04X}: {answer.comment})" if answer.status else ""), file=sys.stderr)
    if not args.wait:
        print(uid)
        return 0
    deadline = time.monotonic() + args.wait_timeout
    state, attrs = "", None
    while time.monotonic() < deadline:
        try:
            got = ups_scu.get(node, uid, options, _POLLED)
        except PeerError as exc:
            raise CliError(f"the node stopped answering: {exc}", EXIT_PEER) from exc
        attrs = got.dataset
        state = workitem.text(attrs, "ProcedureStepState") if attrs is not None else ""
        if state in FINAL:
            break
        time.sleep(0.5)  # N-GET polling: the shell has no SCP for the node's event reports
    out = {"uid": uid, "state": state or "unknown"}
    if attrs is not None and state == "COMPLETED":
        out["results"] = workitem.results_of(attrs)
    elif attrs is not None and state == "CANCELED":
        out["reason"] = workitem.cancellation_reason(attrs)[0]
    if args.json:
        json.dump(out, sys.stdout, indent=2)
        print()
    else:
        print(f"{uid} {out['state']}" + "".join(f"\n  result {r}" for r in out.get("results", []))
              + (f"\n  reason: {out['reason']}" if out.get("reason") else ""))
    if state == "COMPLETED":
        return 0
    if state not in FINAL:
        raise CliError(f"workitem {uid} is still {state or 'unknown'} after {args.wait_timeout:.0f} s "
                       "(it goes on in the node; `modelnode tasks show` follows it)")
    return EXIT_ERROR


# --------------------------------------------------------------------------- tasks


def _open(args: argparse.Namespace) -> Any:
    from node.app import open_app

    return open_app(config_from_args(args))


def task_dict(item: Any) -> dict[str, Any]:
    """One workitem as ``tasks show --json`` prints it."""
    from node.ups import workitem
    from node.ups.subscriptions import receivers

    ds = item.read()
    model = workitem.requested_model(ds)
    inputs = []
    for entry in ds.get("InputInformationSequence") or []:
        titles = [t for sub in entry.get("DICOMRetrievalSequence") or [] for t in workitem.values(sub.get("RetrieveAETitle"))]
        inputs.append({"study_uid": workitem.text(entry, "StudyInstanceUID"),
                       "series_uid": workitem.text(entry, "SeriesInstanceUID"), "retrieve_ae": titles})
    return {
        "uid": item.uid,
        "state": item.state,
        "stage": item.stage,
        "label": item.label,
        "priority": item.priority,
        "input_readiness": item.readiness,
        "performed_here": item.performed_here,
        "claimed_here": item.claimed_here,
        "requester": item.requester,
        "model": None if model is None else (model or "SELECT"),
        "inputs": inputs,
        "attempts": item.attempts,
        "reason": item.reason,
        "cancel_requested": item.cancel_requested,
        "jobs": item.jobs(),
        "results": workitem.results_of(ds),
        "timings": item.timing(),
        "subscribers": receivers(item.uid),
        "created_at": _iso(item.created_at),
        "started_at": _iso(item.started_at),
        "finished_at": _iso(item.finished_at),
    }


def cmd_list(args: argparse.Namespace) -> int:
    from node.ups.store import Workitem

    app = _open(args)
    try:
        q = Workitem.select().order_by(Workitem.id.desc()).limit(args.limit)
        if args.state:
            q = q.where(Workitem.state == args.state)
        rows = list(q)
        if args.json:
            json.dump([task_dict(w) for w in rows], sys.stdout, indent=2)
            print()
            return 0
        print(f"{'STATE':<11} {'STAGE':<8} {'REQUESTER':<16} {'CREATED':<19}  {'JOBS':<8} {'UID':<40} LABEL / REASON")
        for w in rows:
            print(f"{w.state:<11} {w.stage or '-':<8} {w.requester or '-':<16} {_iso(w.created_at):<19}  "
                  f"{','.join(map(str, w.jobs())) or '-':<8} {w.uid:<40} {w.reason or w.label}")
    finally:
        app.close()
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    from node.ups.store import get

    app = _open(args)
    try:
        item = get(args.uid)
        if item is None:
            raise CliError(f"no workitem {args.uid}", EXIT_NOT_FOUND)
        d = task_dict(item)
    finally:
        app.close()
    if args.json:
        json.dump(d, sys.stdout, indent=2)
        print()
        return 0
    for key in ("uid", "state", "stage", "label", "priority", "input_readiness", "model", "requester", "attempts",
                "reason", "cancel_requested", "created_at", "started_at", "finished_at"):
        print(f"{key:>16}: {d[key] if d[key] not in ('', None) else '-'}")
    for i in d["inputs"]:
        print(f"{'input':>16}: study {i['study_uid']}" + (f" series {i['series_uid']}" if i["series_uid"] else "")
              + f" from {'/'.join(i['retrieve_ae']) or '-'}")
    print(f"{'jobs':>16}: " + (", ".join(map(str, d["jobs"])) or "-") + "   (modelnode jobs show ID)")
    print(f"{'results':>16}: " + (", ".join(d["results"]) or "-"))
    print(f"{'timings':>16}: " + (", ".join(f"{k} {v:.3f} s" for k, v in d["timings"].items()) or "-"))
    print(f"{'subscribers':>16}: " + (", ".join(d["subscribers"]) or "-"))
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    from node.dimse.status import category
    from node.scu import ups as ups_scu
    from node.scu.client import PeerError

    cfg = config_from_args(args)
    node = _node_address(args, cfg)
    try:
        answer = ups_scu.request_cancel(node, args.uid, args.reason, _options(cfg, args))
    except PeerError as exc:
        raise CliError(f"the node is not answering: {exc}", EXIT_PEER) from exc
    if answer.status == 0xC307:
        raise CliError(f"no workitem {args.uid}: {answer.comment}", EXIT_NOT_FOUND)
    if category(answer.status) == "failure":
        raise CliError(f"cancel refused with 0x{answer.status:04X}: {answer.comment}", EXIT_CONFLICT)
    if answer.status:
        print(f"{args.uid}: 0x{answer.status:04X} {answer.comment}")
    else:
        print(f"{args.uid}: cancel requested (a SCHEDULED workitem is CANCELED now; one IN PROGRESS when its "
              "performer stops)")
    return 0


# --------------------------------------------------------------------------- parser


def _node_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--node", metavar="AE@HOST:PORT",
                   help="the node to ask (default: [node] ae_title at 127.0.0.1 or [node] bind, [node] port)")
    p.add_argument("--timeout", type=float, default=30.0, metavar="S", help="seconds to wait for the node (default 30)")


def register(sub: Any) -> None:
    fmt = argparse.RawDescriptionHelpFormatter
    p = sub.add_parser(
        "run", help="run a model on a study held by a peer (a UPS workitem on the node)", formatter_class=fmt,
        description="Ask the running node to retrieve a study (or some of its series) from a peer by C-MOVE "
        "(C-GET for a [[peers]] entry with retrieve = \"get\"), run a model on it (--model, else the one the "
        "selection finds) and send the results to --output (else the [export] routes). It is a UPS workitem "
        "like one from a RIS: `modelnode tasks` lists it. Prints the workitem UID; with --wait, follows it "
        "and exits 0 when COMPLETED, 1 when CANCELED (with the reason).",
        epilog="examples:\n"
        "  modelnode run --study 1.2.840.113619.2.55.3 --from PACS --wait\n"
        "  modelnode run --study 1.2.3 --series 1.2.3.4 --from PACS --model modelnode-lung-unet --output PACS")
    p.add_argument("--study", required=True, metavar="UID", help="Study Instance UID")
    p.add_argument("--from", dest="source", required=True, metavar="AE",
                   help="the [[peers]] entry that holds the study (it must know the node's AE title for C-MOVE)")
    p.add_argument("--series", action="append", metavar="UID", help="only this series (repeatable)")
    p.add_argument("--model", metavar="NAME|UID", help="the model to run (default: the node selects)")
    p.add_argument("--output", action="append", metavar="AE", help="send the results to this peer (repeatable)")
    p.add_argument("--label", help="Procedure Step Label (default: model and study)")
    p.add_argument("--priority", choices=["HIGH", "MEDIUM", "LOW"], default="MEDIUM")
    p.add_argument("--uid", help="the workitem's SOP Instance UID (default: a new one)")
    p.add_argument("--wait", action="store_true", help="wait for COMPLETED or CANCELED")
    p.add_argument("--wait-timeout", type=float, default=3600.0, metavar="S", help="with --wait (default 3600)")
    p.add_argument("--json", action="store_true", help="with --wait: the outcome as JSON")
    _node_options(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("tasks", help="list, inspect and cancel UPS workitems (AI on request)",
                       description="The node's UPS workitems: state, the performer's stage, jobs, results, reasons.")
    tsub = p.add_subparsers(dest="tasks_command", metavar="ACTION")
    tsub.required = True
    sp = tsub.add_parser("list", help="recent workitems, newest first")
    sp.add_argument("--state", type=str.upper, choices=["SCHEDULED", "IN PROGRESS", "COMPLETED", "CANCELED"])
    sp.add_argument("--limit", type=int, default=50)
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(func=cmd_list)
    sp = tsub.add_parser("show", help="one workitem: inputs, model, jobs, results, timings, subscribers")
    sp.add_argument("uid", metavar="UID")
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(func=cmd_show)
    sp = tsub.add_parser("cancel", help="ask the running node to cancel a workitem (N-ACTION Request UPS Cancel)")
    sp.add_argument("uid", metavar="UID")
    sp.add_argument("--reason", default="canceled from the command line", help="Reason For Cancellation")
    _node_options(sp)
    sp.set_defaults(func=cmd_cancel)
