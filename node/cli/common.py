"""Helpers shared by the CLI command modules: exit codes, configuration, progress bars."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from tqdm import tqdm

from node.config import Config, ConfigError, load_config

EXIT_OK = 0
EXIT_ERROR = 1  # anything unexpected
EXIT_USAGE = 2  # argparse's own code for bad arguments
EXIT_INVALID = 3  # the input was refused: invalid model object, card or configuration
EXIT_NOT_FOUND = 4  # no such model, file or instance
EXIT_CONFLICT = 5  # refused because it clashes with what is stored
EXIT_PEER = 6  # a DICOM peer could not be reached or answered with a failure

EXIT_CODES_HELP = """exit codes:
  0  success
  1  unexpected error
  2  bad command-line arguments
  3  input refused (invalid model object, model card or configuration)
  4  not found
  5  conflict with what is stored (e.g. same UID, different model)
  6  DICOM peer unreachable or answered with a failure status
"""

# Files at least this large get a progress bar (when stderr is a terminal).
PROGRESS_THRESHOLD = 8 << 20


class CliError(Exception):
    def __init__(self, message: str, exit_code: int = EXIT_ERROR) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def config_from_args(args: argparse.Namespace) -> Config:
    try:
        cfg = load_config(getattr(args, "config", None))
    except ConfigError as exc:
        raise CliError(str(exc), EXIT_INVALID) from exc
    if getattr(args, "data_dir", None):
        cfg.storage.data_dir = args.data_dir
    return cfg


@contextmanager
def progress_bar(total: int, desc: str) -> Iterator[Callable[[int], None] | None]:
    """A byte progress bar for large files; yields None (no bar) for small ones."""
    if total < PROGRESS_THRESHOLD:
        yield None
        return
    bar = tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, file=sys.stderr, disable=None, leave=False)
    try:
        yield bar.update
    finally:
        bar.close()
