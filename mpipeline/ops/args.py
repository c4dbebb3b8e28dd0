"""Command-line arguments that several command families share.

Kept apart from the commands so that ``mpipeline --help`` and a usage error
import nothing but argparse: every handler loads the runtime itself when it runs.
"""

from __future__ import annotations

import argparse
from pathlib import Path

# The config file a command reads when given none (relative to the working directory).
DEFAULT_CONFIG = Path("config/pipeline.toml")


def add_where(parser: argparse.ArgumentParser) -> None:
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--run-dir", type=Path, default=None, metavar="DIR")
    where.add_argument(
        "--config",
        type=Path,
        default=None,
        metavar="FILE",
        help=f"find the run dir from this config (default {DEFAULT_CONFIG})",
    )


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1: {text!r}")
    return value
