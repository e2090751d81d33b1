"""``modelnode federate serve`` and ``modelnode federate join``: FedAvg rounds with Flower.

serve (the coordinator) starts a Flower server with the named model's weights, runs the rounds
and packs the aggregate as a new version (lineage: parent, rounds, participants and their case
counts), then sends it by C-STORE to every ``--send AE@HOST:PORT``. join (on each node) runs a
Flower client that trains on the node's reviewed cases and sends back only weights and case
counts. flwr and torch come from the ``federated`` and ``train`` extras; docs/federated.md.

--clients sites are needed before the first round; later rounds go ahead with --min-clients, so
a site that leaves does not stall the others. TLS: --tls-ca/--tls-cert/--tls-key on serve,
--tls-ca on join (Flower's own). Clipping and differential privacy: --dp-clipping-norm and
--dp-noise-multiplier (Flower's server-side fixed clipping), recorded in the new version's card.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import sys
import time
from pathlib import Path
from typing import Any

from node.cli.common import (
    EXIT_INVALID,
    EXIT_NOT_FOUND,
    EXIT_PEER,
    EXIT_USAGE,
    CliError,
    config_from_args,
)
from node.cli.learning import find_model, pack_version


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


def _pem(path: str, what: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise CliError(f"{what} {path}: {exc.strerror or exc}", EXIT_NOT_FOUND) from exc
    # gRPC only says "handshake failed" later on a file that is not PEM; say so now.
    if b"-----BEGIN " not in data:
        raise CliError(f"{what} {path} is not a PEM file", EXIT_INVALID)
    return data


def _server_certificates(args: argparse.Namespace) -> tuple[bytes, bytes, bytes] | None:
    given = [args.tls_ca, args.tls_cert, args.tls_key]
    if not any(given):
        return None
    if not all(given):
        raise CliError("TLS needs all three of --tls-ca, --tls-cert and --tls-key", EXIT_USAGE)
    return _pem(args.tls_ca, "--tls-ca"), _pem(args.tls_cert, "--tls-cert"), _pem(args.tls_key, "--tls-key")


def _privacy(args: argparse.Namespace, federated: Any) -> Any:
    if args.dp_noise_multiplier is None and args.dp_clipping_norm is None:
        return None
    if args.dp_clipping_norm is None:
        raise CliError("--dp-noise-multiplier needs --dp-clipping-norm (the noise is relative to it)", EXIT_USAGE)
    try:
        return federated.Privacy(args.dp_noise_multiplier or 0.0, args.dp_clipping_norm)
    except ValueError as exc:
        raise CliError(str(exc), EXIT_USAGE) from exc


def _min_clients(args: argparse.Namespace) -> int:
    low = args.clients if args.min_clients is None else args.min_clients
    if args.clients < 1 or not 1 <= low <= args.clients:
        raise CliError(f"--min-clients must be between 1 and --clients ({args.clients}), not {low}", EXIT_USAGE)
    return low


def cmd_serve(args: argparse.Namespace) -> int:
    from pydicom.uid import generate_uid

    from iods.card import parse_card
    from node.ops.audit import AuditLog
    from node.scu import client as scu

    federated, ft = _training()
    # Options first: a typo must not cost the wait for the sites.
    min_clients = _min_clients(args)
    certificates = _server_certificates(args)
    privacy = _privacy(args, federated)
    config = config_from_args(args)
    parent, onnx_bytes, card, _ = _parent(config, args.model)
    try:
        ft.architecture_of(card)
    except ft.FinetuneRefused as exc:
        raise CliError(f"{parent.name} {parent.version} cannot be trained: {exc}", EXIT_INVALID) from exc
    t0 = time.perf_counter()
    outcome = federated.serve(card, onnx_bytes, args.address, rounds=args.rounds, clients=args.clients,
                              min_clients=min_clients, steps=args.steps, round_timeout=args.round_timeout,
                              privacy=privacy, certificates=certificates)
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
    dp_text = ""
    command = (f"modelnode federate serve {args.model} --rounds {args.rounds} --steps {args.steps} "
               f"--clients {args.clients} --min-clients {min_clients}")
    if privacy is not None:
        perf.update({"dp_noise_multiplier": privacy.noise_multiplier, "dp_clipping_norm": privacy.clipping_norm,
                     "dp_noise_stdev": privacy.stdev(min_clients)})
        dp_text = (f"; differential privacy: Flower server-side fixed clipping, clipping norm "
                   f"{privacy.clipping_norm:g}, noise multiplier {privacy.noise_multiplier:g} (noise stdev "
                   f"{privacy.stdev(min_clients):g} on each round's average, sized for {min_clients} client(s))")
        command += f" --dp-clipping-norm {privacy.clipping_norm:g} --dp-noise-multiplier {privacy.noise_multiplier:g}"
    data["provenance"] = {
        "parent_uid": parent.uid, "architecture": ft.architecture_of(card), "performance": perf,
        "training_data": (f"federated (Flower, FedAvg) from {parent.name} {parent.version} ({parent.uid}): "
                          f"{outcome.rounds} round(s); participants and training cases: "
                          + ", ".join(f"{n} {c}" for n, c in sorted(outcome.participants.items()))
                          + "; dice figures: last round, weighted mean over the participants' held-out cases"
                          + dp_text),
        "training_command": command,
        "seed": 20261203,
    }
    new_card = parse_card(data)
    out = pack_version(config, "federated", new_card, new_onnx)
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
              "failures": {str(r): n for r, n in sorted(outcome.failures.items())},
              "privacy": None if privacy is None else {"noise_multiplier": privacy.noise_multiplier,
                                                       "clipping_norm": privacy.clipping_norm},
              "tls": certificates is not None, "object": str(out), "sent": sent}
    AuditLog.from_config(config).record("model-federated", model_uid=new_card.identity.uid, parent_uid=parent.uid,
                                        rounds=outcome.rounds, participants=outcome.participants, sent=sent,
                                        failures=report["failures"], privacy=report["privacy"], tls=report["tls"])
    json.dump(report, sys.stdout, indent=2)
    print()
    return 0 if all(v == "stored" for v in sent.values()) else EXIT_PEER


def cmd_join(args: argparse.Namespace) -> int:
    import grpc

    from node.learning.cases import split

    federated, ft = _training()
    root = _pem(args.tls_ca, "--tls-ca") if args.tls_ca else None
    config = config_from_args(args)
    parent, onnx_bytes, card, cases = _parent(config, args.model)
    if len(cases) < 2:
        raise CliError(f"{len(cases)} reviewed case(s) here; a participant needs at least 2", EXIT_INVALID)
    train, held = split(cases)
    # The node as its peers know it (two sites may both call themselves MODELNODE).
    client = federated.NodeClient(f"{config.node.ae_title}:{config.node.port}", card, onnx_bytes,
                                  [ft.Case(c.series_uid, c.datasets, c.labels) for c in train],
                                  [ft.Case(c.series_uid, c.datasets, c.labels) for c in held])
    try:
        federated.join(args.server, client, root_certificates=root, max_wait_time=args.connect_timeout)
    except grpc.RpcError as exc:
        # Flower gives up (--connect-timeout) with gRPC's own error: a refused TLS handshake
        # (wrong CA, or plaintext against a TLS server) reads the same as a server that is down.
        details = exc.details() if callable(getattr(exc, "details", None)) else str(exc)
        raise CliError(f"could not take part in rounds at {args.server}: {details}", EXIT_PEER) from exc
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
    sp.add_argument("--clients", type=int, default=2, help="participants needed before the first round")
    sp.add_argument("--min-clients", type=int, metavar="N",
                    help="fewest participants a later round goes ahead with (default: --clients)")
    sp.add_argument("--steps", type=int, default=20, help="local steps of 8 slices per round")
    sp.add_argument("--round-timeout", type=float, default=600.0,
                    help="seconds a round waits for its participants and for their results (default 600)")
    sp.add_argument("--send", action="append", metavar="AE@HOST:PORT", help="C-STORE the new version there")
    sp.add_argument("--tls-ca", metavar="PEM", help="CA certificate (with --tls-cert and --tls-key: TLS)")
    sp.add_argument("--tls-cert", metavar="PEM", help="this server's certificate")
    sp.add_argument("--tls-key", metavar="PEM", help="this server's private key")
    sp.add_argument("--dp-clipping-norm", type=float, metavar="C",
                    help="clip each client's update to L2 norm C (Flower server-side fixed clipping)")
    sp.add_argument("--dp-noise-multiplier", type=float, metavar="Z",
                    help="add Gaussian noise of stdev Z*C/min-clients to each round's average (default 0)")
    sp.set_defaults(func=cmd_serve)
    sp = fsub.add_parser("join", help="take part in rounds with this node's reviewed cases")
    sp.add_argument("model", metavar="NAME|UID")
    sp.add_argument("--server", default="127.0.0.1:9092")
    sp.add_argument("--tls-ca", metavar="PEM", help="CA that signed the server's certificate (TLS)")
    sp.add_argument("--connect-timeout", type=float, metavar="SECONDS",
                    help="keep trying to reach the server for this long (default: one attempt)")
    sp.set_defaults(func=cmd_join)
