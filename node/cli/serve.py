"""``modelnode serve``: run the DIMSE node in the foreground until SIGTERM or SIGINT."""

from __future__ import annotations

import argparse
import logging

from node.cli.common import EXIT_INVALID, CliError, config_from_args
from node.config import ConfigError, parse_config


def cmd_serve(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    overrides = {k: v for k, v in (("port", args.port), ("bind", args.bind), ("ae_title", args.ae_title)) if v is not None}
    if overrides:
        for key, value in overrides.items():
            setattr(cfg.node, key, value)
        # Re-validate: an override is as untrusted as the file.
        try:
            _revalidate(cfg)
        except ConfigError as exc:
            raise CliError(str(exc), EXIT_INVALID) from exc
    level = cfg.logging.level.upper()
    if args.verbose == 0 and not args.quiet:
        logging.getLogger().setLevel(getattr(logging, level, logging.INFO))

    from node.server import serve  # late: pynetdicom is only needed by this command

    try:
        return serve(cfg)
    except OSError as exc:
        raise CliError(f"cannot listen on {cfg.node.bind}:{cfg.node.port}: {exc.strerror or exc}") from exc


def _revalidate(cfg) -> None:
    import dataclasses

    data = {
        "node": dataclasses.asdict(cfg.node),
        "storage": dataclasses.asdict(cfg.storage),
        "database": dataclasses.asdict(cfg.database),
        "models": dataclasses.asdict(cfg.models),
        "anatomy": dataclasses.asdict(cfg.anatomy),
        "logging": dataclasses.asdict(cfg.logging),
        "peers": [dataclasses.asdict(p) for p in cfg.peers],
    }
    parse_config(data, cfg.source)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="run the DICOM node (C-ECHO, C-STORE, C-FIND, C-MOVE, C-GET)",
        description="Serve the node in the foreground until SIGTERM or SIGINT. The global --config "
        "(or $MODELNODE_CONFIG) names the configuration file; see config/modelnode.toml.",
    )
    p.add_argument("--port", type=int, help="TCP port (overrides [node] port)")
    p.add_argument("--bind", metavar="ADDR", help="address to listen on (overrides [node] bind)")
    p.add_argument("--ae-title", metavar="AET", help="our AE title (overrides [node] ae_title)")
    # `modelnode serve --config FILE` reads as naturally as `modelnode --config FILE serve`.
    p.add_argument("--config", "-c", dest="serve_config", metavar="FILE", help=argparse.SUPPRESS)
    p.set_defaults(func=_dispatch, log_level_floor=logging.INFO)


def _dispatch(args: argparse.Namespace) -> int:
    if getattr(args, "serve_config", None):
        args.config = args.serve_config
    return cmd_serve(args)
