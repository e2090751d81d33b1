"""The ``modelnode`` command line.

Each command group lives in its own module and registers itself in :data:`COMMANDS`; this module
only builds the parser, sets up logging and maps exceptions to exit codes that scripts can test.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from node.cli.common import EXIT_CODES_HELP, CliError

# Modules that add subcommands: each has ``register(subparsers)``.
COMMANDS = ("node.cli.models", "node.cli.serve", "node.cli.scu", "node.cli.select", "node.cli.jobs", "node.cli.tasks",
            "node.cli.admin", "node.cli.review", "node.cli.federate")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="modelnode",
        description="A DICOM node that stores deep-learning models as DICOM objects, selects and runs them.",
        epilog=EXIT_CODES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", "-c", metavar="FILE", help="configuration file (default: $MODELNODE_CONFIG or embedded defaults)")
    parser.add_argument("--data-dir", metavar="DIR", help="data directory (overrides the configuration)")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)")
    parser.add_argument("-q", "--quiet", action="store_true", help="only errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMANDS:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.ERROR if args.quiet else (logging.WARNING, logging.INFO, logging.DEBUG)[min(args.verbose, 2)]
    if getattr(args, "log_level_floor", None) is not None and not args.quiet and args.verbose == 0:
        level = args.log_level_floor
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)-7s %(name)s: %(message)s", stream=sys.stderr)
    try:
        return int(args.func(args) or 0)
    except CliError as exc:
        print(f"modelnode: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("modelnode: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
