"""``modelnode models finetune`` and ``modelnode models approve`` (docs/finetune.md).

finetune trains a new version of a stored model on the node's reviewed cases (torch from the
``train`` extra, imported here only), evaluates it against the parent on held-out local cases
and, if no figure regresses, packs it into ``<data_dir>/candidates/<UID>.dcm``: a candidate is
not in the registry, so the selection cannot pick it, and the parent stays as it is. approve
adds the candidate to the registry, where the selection's "newest validated version" takes it.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from node.cli.common import EXIT_INVALID, EXIT_NOT_FOUND, CliError, config_from_args

EXIT_REFUSED = EXIT_INVALID  # cannot be fine-tuned, too few cases, or the new version regressed


def find_model(app: Any, name_or_uid: str) -> Any:
    from node.pipeline.selection import version_key
    from node.storage.registry import Filters

    record = app.registry.get(name_or_uid)
    if record is None:
        named = [r for r in app.registry.list(Filters(name=name_or_uid)) if r.name == name_or_uid]
        record = max(named, key=lambda r: version_key(r.version), default=None)
    if record is None:
        raise CliError(f"no model named or with UID {name_or_uid} in the registry", EXIT_NOT_FOUND)
    return record


def cmd_finetune(args: argparse.Namespace) -> int:
    import pydicom
    from pydicom.uid import generate_uid

    from iods import model_object
    from iods.card import parse_card
    from node.app import open_app
    from node.learning.cases import reviewed_cases, split
    from node.ops.audit import AuditLog

    try:
        from models.training import finetune as ft
    except ImportError as exc:
        raise CliError(f"fine-tuning needs torch (pip install -e '.[train]'): {exc}", EXIT_INVALID) from exc

    config = config_from_args(args)
    app = open_app(config)
    try:
        parent = find_model(app, args.model)
        onnx_bytes, card = model_object.decode(pydicom.dcmread(app.registry.path(parent)))
        try:
            arch = ft.architecture_of(card)
        except ft.FinetuneRefused as exc:
            raise CliError(f"{parent.name} {parent.version} cannot be fine-tuned: {exc}", EXIT_REFUSED) from exc
        cases = reviewed_cases(parent.uid, card, app.store)
    finally:
        app.close()
    if len(cases) < 2:
        raise CliError(f"{parent.name} {parent.version} has {len(cases)} reviewed case(s); fine-tuning needs at least 2 "
                       "(one to train on, one held out)", EXIT_REFUSED)
    train, held = split(cases)
    t0 = time.perf_counter()
    try:
        result = ft.finetune(card, onnx_bytes, [ft.Case(c.series_uid, c.datasets, c.labels) for c in train],
                             [ft.Case(c.series_uid, c.datasets, c.labels) for c in held], steps=args.steps)
    except ft.FinetuneRefused as exc:
        raise CliError(f"{parent.name} {parent.version} cannot be fine-tuned: {exc}", EXIT_REFUSED) from exc
    seconds = round(time.perf_counter() - t0, 1)
    report = {"parent_uid": parent.uid, "parent_version": parent.version, "architecture": arch,
              "cases_train": len(train), "cases_heldout": len(held),
              "corrections": sum(c.kind == "correction" for c in cases),
              "accepted": sum(c.kind == "accept" for c in cases), "steps": result.steps,
              "before": result.before, "after": result.after, "seconds": {**result.seconds, "total": seconds}}
    worse = ft.regressed(result.before, result.after)
    audit = AuditLog.from_config(config)
    if worse:
        report["refused"] = f"regression on held-out cases: {', '.join(worse)}"
        audit.record("model-finetune-refused", model_uid=parent.uid, reason=report["refused"])
        _print(report, args.json)
        return EXIT_REFUSED
    now = _dt.datetime.now()
    data = card.to_dict()
    data["identity"]["uid"] = str(generate_uid(prefix="2.25."))
    data["identity"]["version"] = f"{card.identity.version}-ft{now:%Y%m%d%H%M%S}"
    data["identity"]["created"] = now.date().isoformat()
    perf = {f"{k}_before": v for k, v in result.before.items()}
    perf.update({f"{k}_after": v for k, v in result.after.items()})
    perf.update({k: v for k, v in result.after.items()})  # the version's own figures
    perf.update({"cases_train": float(len(train)), "cases_heldout": float(len(held)), "steps": float(result.steps)})
    data["provenance"] = {
        "parent_uid": parent.uid, "architecture": arch, "performance": perf,
        "training_data": (f"fine-tuned from {parent.name} {parent.version} ({parent.uid}) on {len(train)} reviewed "
                          f"local case(s) ({report['corrections']} corrected, {report['accepted']} accepted in all); "
                          f"figures on {len(held)} held-out local case(s), parent before, this version after"),
        "training_command": f"modelnode models finetune {args.model} --steps {args.steps}",
        "seed": 20261203,
    }
    new_card = parse_card(data)
    out = pack_version(config, "candidates", new_card, result.onnx_bytes)
    report.update({"uid": new_card.identity.uid, "version": new_card.identity.version, "candidate": str(out)})
    audit.record("model-finetuned", model_uid=new_card.identity.uid, parent_uid=parent.uid,
                 cases_train=len(train), cases_heldout=len(held), before=result.before, after=result.after)
    _print(report, args.json)
    return 0


def pack_version(config: Any, folder: str, card: Any, onnx_bytes: bytes) -> Path:
    """A trained version packed as ``<data_dir>/<folder>/<UID>.dcm`` (``models finetune``:
    candidates awaiting approval; ``federate serve``: the aggregate it sends)."""
    from iods import model_object

    out_dir = config.data_dir / folder
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / f"{card.identity.uid}.dcm"
    with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
        onnx_path = Path(tmp) / "model.onnx"
        onnx_path.write_bytes(onnx_bytes)
        model_object.pack_file(onnx_path, card, out)
    return out


def _print(report: dict, as_json: bool) -> None:
    if as_json:
        json.dump(report, sys.stdout, indent=2)
        print()
        return
    for key, value in report.items():
        print(f"{key:>15}: {value}")
    if "uid" in report:
        print(f"not selected until approved: modelnode models approve {report['uid']}")


def cmd_approve(args: argparse.Namespace) -> int:
    from node.app import open_app
    from node.ops.audit import AuditLog

    config = config_from_args(args)
    path = config.data_dir / "candidates" / f"{args.uid}.dcm"
    if not path.is_file():
        raise CliError(f"no fine-tuned candidate {args.uid} (in {path.parent})", EXIT_NOT_FOUND)
    app = open_app(config)
    try:
        record, _ = app.registry.add_file(path, source="finetune")
    finally:
        app.close()
    path.unlink()
    AuditLog.from_config(config).record("model-approved", model_uid=record.uid, parent_uid=record.parent_uid,
                                        reviewer=args.reviewer)
    print(f"approved {record.name} {record.version} ({record.uid}); parent {record.parent_uid}")
    return 0


def register(msub: Any) -> None:
    sp = msub.add_parser("finetune", help="fine-tune a model on this node's reviewed cases (needs torch)",
                         description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sp.add_argument("model", metavar="NAME|UID")
    sp.add_argument("--steps", type=int, default=60, help="optimiser steps of 8 slices (default 60)")
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(func=cmd_finetune)
    sp = msub.add_parser("approve", help="add a fine-tuned candidate to the registry, making it selectable")
    sp.add_argument("uid", metavar="UID")
    sp.add_argument("--reviewer")
    sp.set_defaults(func=cmd_approve)
