"""``modelnode federate serve`` and ``modelnode federate join``: FedAvg rounds with Flower.

serve (the coordinator) starts a Flower server with the named model's weights, runs the rounds
and packs the aggregate as a new version (lineage: parent, rounds, participants and their case
counts), then sends it by C-STORE to every ``--send AE@HOST:PORT``. join (on each node) runs a
Flower client that trains on the node's reviewed cases and sends back only weights and case
counts. flwr and torch come from the ``federated`` and ``train`` extras; docs/federated.md.
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

from node.cli.common import EXIT_INVALID, EXIT_PEER, CliError, config_from_args
from node.cli.learning import find_model


def _training():
    try:
        from models.training import federated, finetune
    except ImportError as exc:
        raise CliError(f"federated rounds need flwr and torch (pip install -e '.[train,federated]'): {exc}",
                       EXIT_INVALID) from exc
    return federated, finetune


def _parent(config: Any, name_or_uid: str) -> tuple[Any, bytes, Any, Any]:
    import pydicom

    from iods import model_object
    from node.app import open_app
    from node.learning.cases import reviewed_cases

    app = open_app(config)
    try:
        parent = find_model(app, name_or_uid)
        onnx_bytes, card = model_object.decode(pydicom.dcmread(app.registry.path(parent)))
        cases = reviewed_cases(parent.uid, card, app.store)
    finally:
        app.close()
    return parent, onnx_bytes, card, cases


def cmd_serve(args: argparse.Namespace) -> int:
    from pydicom.uid import generate_uid

    from iods import model_object
    from iods.card import parse_card
    from node.ops.audit import AuditLog
    from node.scu import client as scu

    federated, ft = _training()
    config = config_from_args(args)
    parent, onnx_bytes, card, _ = _parent(config, args.model)
    try:
        ft.architecture_of(card)
    except ft.FinetuneRefused as exc:
        raise CliError(f"{parent.name} {parent.version} cannot be trained: {exc}", EXIT_INVALID) from exc
    t0 = time.perf_counter()
    outcome = federated.serve(card, onnx_bytes, args.address, rounds=args.rounds, clients=args.clients,
                              steps=args.steps, round_timeout=args.round_timeout)
    if outcome.rounds == 0:
        raise CliError("no round completed; nothing packed", EXIT_PEER)
    new_onnx = federated.network_with(card, onnx_bytes, outcome.weights)
    now = _dt.datetime.now()
    data = card.to_dict()
    data["identity"]["uid"] = str(generate_uid(prefix="2.25."))
    data["identity"]["version"] = f"{card.identity.version}-fed{now:%Y%m%d%H%M%S}"
    data["identity"]["created"] = now.date().isoformat()
    perf = {k: float(v) for k, v in outcome.evaluation.items() if k.startswith("dice_")}
    perf.update({"rounds": float(outcome.rounds), "participants": float(len(outcome.participants)),
                 "cases_train": float(sum(outcome.participants.values())), "steps_per_round": float(args.steps)})
    data["provenance"] = {
        "parent_uid": parent.uid, "architecture": ft.architecture_of(card), "performance": perf,
        "training_data": (f"federated (Flower, FedAvg) from {parent.name} {parent.version} ({parent.uid}): "
                          f"{outcome.rounds} round(s); participants and training cases: "
                          + ", ".join(f"{n} {c}" for n, c in sorted(outcome.participants.items()))
                          + "; dice figures: last round, weighted mean over the participants' held-out cases"),
        "training_command": f"modelnode federate serve {args.model} --rounds {args.rounds} --steps {args.steps}",
        "seed": 20261203,
    }
    new_card = parse_card(data)
    out_dir = config.data_dir / "federated"
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / f"{new_card.identity.uid}.dcm"
    with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
        onnx_path = Path(tmp) / "model.onnx"
        onnx_path.write_bytes(new_onnx)
        model_object.pack_file(onnx_path, new_card, out)
    sent = {}
    for target in args.send or []:
        peer = scu.Address.parse(target)
        try:
            [result] = scu.store([out], peer, scu.Options(calling_ae=config.node.ae_title))
            sent[target] = "stored" if result.ok else (result.error or f"status 0x{result.status:04X}")
        except scu.PeerError as exc:
            sent[target] = f"failed: {exc}"
    report = {"uid": new_card.identity.uid, "version": new_card.identity.version, "parent_uid": parent.uid,
              "rounds": outcome.rounds, "participants": outcome.participants, "evaluation": outcome.evaluation,
              "seconds_per_round": outcome.seconds_per_round, "seconds": round(time.perf_counter() - t0, 1),
              "object": str(out), "sent": sent}
    AuditLog.from_config(config).record("model-federated", model_uid=new_card.identity.uid, parent_uid=parent.uid,
                                        rounds=outcome.rounds, participants=outcome.participants, sent=sent)
    json.dump(report, sys.stdout, indent=2)
    print()
    return 0 if all(v == "stored" for v in sent.values()) else EXIT_PEER


def cmd_join(args: argparse.Namespace) -> int:
    from node.learning.cases import split

    federated, ft = _training()
    config = config_from_args(args)
    parent, onnx_bytes, card, cases = _parent(config, args.model)
    if len(cases) < 2:
        raise CliError(f"{len(cases)} reviewed case(s) here; a participant needs at least 2", EXIT_INVALID)
    train, held = split(cases)
    # The node as its peers know it (two sites may both call themselves MODELNODE).
    client = federated.NodeClient(f"{config.node.ae_title}:{config.node.port}", card, onnx_bytes,
                                  [ft.Case(c.series_uid, c.datasets, c.labels) for c in train],
                                  [ft.Case(c.series_uid, c.datasets, c.labels) for c in held])
    federated.join(args.server, client)
    print(f"{config.node.ae_title}: rounds finished ({len(train)} training, {len(held)} held-out cases)")
    return 0


def register(sub: Any) -> None:
    p = sub.add_parser("federate", help="federated rounds with Flower (serve, join)", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    fsub = p.add_subparsers(dest="federate_command", metavar="ACTION")
    fsub.required = True
    sp = fsub.add_parser("serve", help="coordinate FedAvg rounds and distribute the result by C-STORE")
    sp.add_argument("model", metavar="NAME|UID")
    sp.add_argument("--address", default="127.0.0.1:9092", help="Flower server address (default 127.0.0.1:9092)")
    sp.add_argument("--rounds", type=int, default=2)
    sp.add_argument("--clients", type=int, default=2, help="participants needed for each round")
    sp.add_argument("--steps", type=int, default=20, help="local steps of 8 slices per round")
    sp.add_argument("--round-timeout", type=float, default=600.0)
    sp.add_argument("--send", action="append", metavar="AE@HOST:PORT", help="C-STORE the new version there")
    sp.set_defaults(func=cmd_serve)
    sp = fsub.add_parser("join", help="take part in rounds with this node's reviewed cases")
    sp.add_argument("model", metavar="NAME|UID")
    sp.add_argument("--server", default="127.0.0.1:9092")
    sp.set_defaults(func=cmd_join)
