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
    from node.ops import logsetup

    logsetup.configure_logging(cfg.logging, json=getattr(args, "log_json", None))
    if args.verbose or args.quiet:
        logging.getLogger().setLevel(logging.ERROR if args.quiet else logging.DEBUG if args.verbose > 1 else logging.INFO)

    from node.dimse import compat

    try:
        # Before node.dimse.server is imported: its modules keep references to the library's functions.
        compat.check()
    except compat.IncompatibleLibrary as exc:
        logging.getLogger("modelnode.server").critical("refusing to start: %s", exc)
        raise CliError(f"refusing to start: {exc}") from exc
    from node.dimse.server import serve  # late: pynetdicom is only needed by this command

    try:
        return serve(cfg)
    except ConfigError as exc:  # TLS files that do not load, keys that do not match
        raise CliError(str(exc), EXIT_INVALID) from exc
    except OSError as exc:
        raise CliError(f"cannot listen on {cfg.node.bind}:{cfg.node.port}: {exc.strerror or exc}") from exc


def _revalidate(cfg) -> None:
    import dataclasses

    # Every section, as the file would have given it: an override is checked with the rest.
    data = {f.name: (dataclasses.asdict(v) if dataclasses.is_dataclass(v) else [dataclasses.asdict(i) for i in v])
            for f in dataclasses.fields(cfg) if f.name != "source" for v in [getattr(cfg, f.name)]}
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
    p.add_argument("--log-json", action="store_true", default=None, help="JSON log lines (overrides [logging] format)")
    # `modelnode serve --config FILE` reads as naturally as `modelnode --config FILE serve`.
    p.add_argument("--config", "-c", dest="serve_config", metavar="FILE", help=argparse.SUPPRESS)
    p.set_defaults(func=_dispatch, log_level_floor=logging.INFO)


def _dispatch(args: argparse.Namespace) -> int:
    if getattr(args, "serve_config", None):
        args.config = args.serve_config
    return cmd_serve(args)
